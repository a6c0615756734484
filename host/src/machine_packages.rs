//! Algorithm packages installed on this machine in CAD mode (Appendix I).
//!
//! Installing a package (by its code, from an installed algorithm file package)
//! starts it: one algorithm-plugin worker, placed by the [`Scheduler`] when its
//! `args` name an `xpuType` (with the package's GPU quota). Its status is RUNNING
//! while the worker lives, STOPPED while it cannot start or once its supervisor
//! gives up on it.

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::machine::XpuSample;
use crate::package::PackageManifest;
use crate::packages::{Packages, Status};
use crate::plugins::algorithm::AlgorithmWorker;
use crate::plugins::supervisor::Phase;
use crate::scheduler::{Ask, Scheduler};
use crate::services::parse_envs;
use crate::store::{Store, Table};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachinePackage {
    pub code: String,
    pub args: String,
    pub file_package_id: String,
    pub manifest: PackageManifest,
    pub created_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum RunState {
    Running,
    Stopped,
}

struct Installed {
    package: MachinePackage,
    worker: Option<Arc<AlgorithmWorker>>,
}

pub struct MachinePackages {
    store: Arc<Store>,
    packages: Arc<Packages>,
    scheduler: Arc<Scheduler>,
    state: RwLock<Vec<Installed>>,
}

impl MachinePackages {
    pub fn new(
        store: Arc<Store>,
        packages: Arc<Packages>,
        scheduler: Arc<Scheduler>,
    ) -> MachinePackages {
        MachinePackages {
            store,
            packages,
            scheduler,
            state: RwLock::new(Vec::new()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Installed>> {
        crate::sync::read(&self.state)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Installed>> {
        crate::sync::write(&self.state)
    }

    /// Places and starts the package's worker.
    fn start(&self, package: &MachinePackage, xpus: &[XpuSample]) -> Result<Arc<AlgorithmWorker>> {
        let args =
            parse_envs(&package.args).map_err(|e| Error::Invalid(e.replacen("envs", "args", 1)))?;
        let plugin = self
            .packages
            .plugin_of_file(&package.file_package_id)
            .ok_or_else(|| {
                Error::Conflict(format!(
                    "package {}: its plugin is not loaded",
                    package.code
                ))
            })?;
        let algorithm = plugin.algorithm().cloned().ok_or_else(|| {
            Error::Conflict(format!("package {}: not an algorithm", package.code))
        })?;
        if let Some((_, xpu_type)) = args.iter().find(|(k, _)| k == "xpuType") {
            let gpu = package.manifest.runtime.gpu.first();
            let ask = Ask {
                count: 1,
                quota: gpu.map_or(1.0, |g| g.quota),
                memory_mib: gpu.and_then(|g| g.memory_mib()),
                xpu_type,
                selector: &Default::default(),
            };
            self.scheduler
                .reserve(&format!("machine:{}", package.code), &ask, xpus)?;
        }
        let worker = algorithm.spawn_worker();
        if let Err(e) = worker.start() {
            tracing::warn!(package = %package.code, "algorithm package failed to start: {e}");
        }
        Ok(worker)
    }

    pub fn restore(&self, xpus: &[XpuSample]) -> anyhow::Result<()> {
        for (_, package) in self.store.load::<MachinePackage>(Table::MachinePackages)? {
            let worker = match self.start(&package, xpus) {
                Ok(worker) => Some(worker),
                Err(e) => {
                    tracing::error!(package = %package.code, "cannot start again: {e}");
                    None
                }
            };
            self.write().push(Installed { package, worker });
        }
        Ok(())
    }

    /// I.4. Blocking.
    pub fn install(&self, code: &str, args: &str, xpus: &[XpuSample]) -> Result<MachinePackage> {
        if !crate::package::valid_code(code) {
            return Err(Error::Invalid(format!(
                "algoPackageCode {code:?}: letters, digits, '_', '-' or '.', under 128 characters"
            )));
        }
        if self.read().iter().any(|i| i.package.code == code) {
            return Err(Error::Conflict(format!(
                "algorithm package {code} is already installed"
            )));
        }
        let file = self
            .packages
            .files()
            .into_iter()
            .find(|f| f.manifest.as_ref().is_some_and(|m| m.package.code == code))
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no algorithm file package carries algoPackageCode {code:?}"
                ))
            })?;
        if file.status != Status::Ready {
            return Err(Error::Conflict(format!(
                "its file package {} is not ready: {}",
                file.id, file.status_desc
            )));
        }
        let manifest = file.manifest.clone().ok_or_else(|| {
            Error::Conflict(format!(
                "file package {} has no recorded manifest; push it again",
                file.id
            ))
        })?;
        let package = MachinePackage {
            code: code.to_string(),
            args: args.to_string(),
            file_package_id: file.id.clone(),
            manifest,
            created_ms: crate::dates::now_ms(),
        };
        let worker = self.start(&package, xpus)?;
        if let Err(e) = self.store.put(Table::MachinePackages, code, &package) {
            self.scheduler.release(&format!("machine:{code}"));
            return Err(e.into());
        }
        self.write().push(Installed {
            package: package.clone(),
            worker: Some(worker),
        });
        Ok(package)
    }

    /// I.5. Blocking.
    pub fn uninstall(&self, code: &str) -> Result<()> {
        let mut state = self.write();
        if !state.iter().any(|i| i.package.code == code) {
            return Err(Error::NotFound(format!(
                "no installed algorithm package {code:?}"
            )));
        }
        self.store.delete(Table::MachinePackages, code)?;
        state.retain(|i| i.package.code != code);
        drop(state);
        self.scheduler.release(&format!("machine:{code}"));
        Ok(())
    }

    fn run_state(installed: &Installed) -> RunState {
        // A worker that cannot start is not running, whatever its next attempt.
        match installed.worker.as_ref().map(|w| w.status().phase()) {
            Some(Phase::Failed) | None => RunState::Stopped,
            Some(_) => RunState::Running,
        }
    }

    pub fn list(&self) -> Vec<(MachinePackage, RunState)> {
        self.read()
            .iter()
            .map(|i| (i.package.clone(), Self::run_state(i)))
            .collect()
    }

    pub fn get(&self, code: &str) -> Result<(MachinePackage, RunState)> {
        self.read()
            .iter()
            .find(|i| i.package.code == code)
            .map(|i| (i.package.clone(), Self::run_state(i)))
            .ok_or_else(|| Error::NotFound(format!("no installed algorithm package {code:?}")))
    }

    /// Every live worker, for the keeper that revives crashed ones.
    pub fn workers(&self) -> Vec<Arc<AlgorithmWorker>> {
        self.read()
            .iter()
            .filter_map(|i| i.worker.clone())
            .collect()
    }

    /// The installed package using file package `id`, if one does.
    pub fn user_of_file(&self, id: &str) -> Option<String> {
        self.read()
            .iter()
            .find(|i| i.package.file_package_id == id)
            .map(|i| format!("installed algorithm package {}", i.package.code))
    }
}
