//! Algorithm services (Appendix F): pools of algorithm-plugin workers run in
//! process, one per replica.
//!
//! Each replica is placed by the [`Scheduler`] on an accelerator of the service's
//! `gpuType` with the algorithm's GPU quota (from its package's `runtime.gpu`), or on
//! CPU when `gpuType` is `CPU` and the package says it runs there. Its status is
//! read from the live workers: `runing` while every one runs, `starting` while some
//! start or restart, `error` (with the reason) when one cannot run.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::machine::XpuSample;
use crate::package::Runtime;
use crate::packages::Packages;
use crate::plugins::algorithm::{AlgorithmPlugin, AlgorithmWorker};
use crate::plugins::supervisor::{Phase, Status as WorkerStatus};
use crate::runtime::Launch;
use crate::scheduler::{Ask, Placement, Scheduler};
use crate::store::{Store, Table};

/// Most replicas one service may ask for.
pub const MAX_REPLICAS: u32 = 64;

/// The F.2 `gpuType` that asks for replicas without an accelerator.
pub const CPU: &str = "CPU";

/// One live replica: where it runs and what its worker is doing.
#[derive(Clone, Debug)]
pub struct ReplicaState {
    pub placement: Option<Placement>,
    pub worker: WorkerStatus,
    /// The execution providers its models run on.
    pub inference: Vec<&'static str>,
}

/// A service's status, read from its live workers.
#[derive(Clone, Debug)]
pub struct LiveStatus {
    pub status: ServiceStatus,
    pub reason: String,
    pub replicas: Vec<ReplicaState>,
}

/// The GPU share and memory (MiB, where the package's `limit` names it) one replica
/// of an algorithm asks for on `gpu_type`, from its package's `runtime` (0 on
/// CPU). A type the package cannot run on is refused with the reason, never placed
/// on something else.
fn replica_ask(algo_id: &str, runtime: &Runtime, gpu_type: &str) -> Result<(f64, Option<u64>)> {
    if gpu_type.eq_ignore_ascii_case(CPU) {
        if runtime.runs_on_cpu() {
            return Ok((0.0, None));
        }
        return Err(Error::Conflict(format!(
            "gpuType {gpu_type}: algorithm {algo_id} needs an accelerator (its package's \
             runtime.gpu names {}) and does not say it runs on CPU (runtime.cpu)",
            runtime
                .gpu
                .iter()
                .map(|g| format!("{}_{}", g.vendor, g.accelerator))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let Some(first) = runtime.gpu.first() else {
        return Err(Error::Conflict(format!(
            "gpuType {gpu_type}: algorithm {algo_id} names no accelerator (its package's \
             runtime.gpu is empty); it runs on CPU: ask for gpuType {CPU}"
        )));
    };
    let gpu = runtime
        .gpu
        .iter()
        .find(|g| crate::scheduler::same_type(&format!("{}_{}", g.vendor, g.accelerator), gpu_type))
        .unwrap_or(first);
    let quota = gpu.quota;
    if !(quota > 0.0 && quota <= 1.0) {
        return Err(Error::Conflict(format!(
            "algorithm {algo_id}: its package asks for gpu quota {quota}; more than 0, up to 1 \
             per replica"
        )));
    }
    Ok((quota, gpu.memory_mib()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum ServiceStatus {
    #[serde(rename = "starting")]
    Starting,
    /// The text's spelling (table F.13).
    #[serde(rename = "runing")]
    Running,
    #[serde(rename = "error")]
    Error,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub id: String,
    pub algo_id: String,
    pub replicas: u32,
    pub gpu_type: String,
    /// As sent: `k1=v1, k2=v2`.
    pub envs: String,
    pub status: ServiceStatus,
    pub status_desc: String,
    /// GPU share of one replica.
    pub gpu_quota: f64,
    /// Accelerator memory of one replica (MiB), where its package names it.
    #[serde(default)]
    pub gpu_memory_mib: Option<u64>,
    pub placements: Vec<Placement>,
    pub created_ms: u64,
}

impl ServiceRecord {
    /// What `count` replicas of the service ask of the scheduler.
    fn ask(&self, count: u32) -> Ask<'_> {
        static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
        Ask {
            count,
            quota: self.gpu_quota,
            memory_mib: self.gpu_memory_mib,
            xpu_type: &self.gpu_type,
            selector: &NO_LABELS,
        }
    }
}

/// A worker (not started) for a replica of `record` placed at `placement`: its
/// models run on that card (or the CPU).
fn replica(
    algorithm: &AlgorithmPlugin,
    record: &ServiceRecord,
    placement: &Placement,
    env: Vec<(String, String)>,
) -> Arc<AlgorithmWorker> {
    algorithm.spawn_worker_with(Launch {
        env,
        args: Vec::new(),
        device: placement.device(&record.gpu_type),
    })
}

/// A replica moved to another card.
pub struct Moved {
    /// The cards, as `driver/index`.
    pub from: String,
    pub to: String,
    /// The worker that ran on the old card, now out of the service.
    pub replaced: Option<Arc<AlgorithmWorker>>,
}

/// `k1=v1, k2=v2` (table F.6). Errors name the entry.
pub fn parse_envs(envs: &str) -> std::result::Result<Vec<(String, String)>, String> {
    envs.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| match entry.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!("envs: {entry:?} is not key=value")),
        })
        .collect()
}

struct Running {
    record: ServiceRecord,
    workers: Vec<Arc<AlgorithmWorker>>,
}

pub struct Services {
    store: Arc<Store>,
    packages: Arc<Packages>,
    scheduler: Arc<Scheduler>,
    state: RwLock<Vec<Running>>,
}

impl Services {
    pub fn new(store: Arc<Store>, packages: Arc<Packages>, scheduler: Arc<Scheduler>) -> Services {
        Services {
            store,
            packages,
            scheduler,
            state: RwLock::new(Vec::new()),
        }
    }

    /// Loads the services and starts them again (placements and partitions are made
    /// anew: a driver's partitions do not outlive the process).
    pub fn restore(&self, xpus: &[XpuSample]) -> anyhow::Result<()> {
        let records: Vec<ServiceRecord> = self
            .store
            .load(Table::Services)?
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        for mut record in records {
            record.placements.clear();
            let running = match self.place_and_start(&mut record, xpus) {
                Ok(workers) => Running { record, workers },
                Err(e) => {
                    record.status = ServiceStatus::Error;
                    record.status_desc = format!("after a restart: {e}");
                    tracing::error!(service = %record.id, "{}", record.status_desc);
                    Running {
                        record,
                        workers: Vec::new(),
                    }
                }
            };
            self.store
                .put(Table::Services, &running.record.id, &running.record)?;
            self.write().push(running);
        }
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Running>> {
        crate::sync::read(&self.state)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Running>> {
        crate::sync::write(&self.state)
    }

    pub fn list(&self) -> Vec<ServiceRecord> {
        self.read().iter().map(|r| r.record.clone()).collect()
    }

    pub fn get(&self, id: &str) -> Result<ServiceRecord> {
        self.read()
            .iter()
            .find(|r| r.record.id == id)
            .map(|r| r.record.clone())
            .ok_or_else(|| Error::NotFound(format!("no algorithm service {id:?}")))
    }

    pub fn workers(&self, id: &str) -> Result<Vec<Arc<AlgorithmWorker>>> {
        self.read()
            .iter()
            .find(|r| r.record.id == id)
            .map(|r| r.workers.clone())
            .ok_or_else(|| Error::NotFound(format!("no algorithm service {id:?}")))
    }

    /// Frames per second the service's algorithm analyses (its package's
    /// `runtime.analysis-fps`).
    pub fn analysis_fps(&self, id: &str) -> f64 {
        self.get(id)
            .ok()
            .and_then(|s| self.packages.algorithm(&s.algo_id).ok())
            .and_then(|a| a.file_package_id)
            .and_then(|f| self.packages.file(&f).ok())
            .and_then(|f| f.manifest)
            .map_or(crate::package::DEFAULT_ANALYSIS_FPS, |m| {
                m.runtime.analysis_fps()
            })
    }

    /// F.5's status: what the live workers are doing, one entry per live replica.
    pub fn status(&self, id: &str) -> Result<LiveStatus> {
        let state = self.read();
        let running = state
            .iter()
            .find(|r| r.record.id == id)
            .ok_or_else(|| Error::NotFound(format!("no algorithm service {id:?}")))?;
        let record = &running.record;
        let replicas: Vec<ReplicaState> = running
            .workers
            .iter()
            .enumerate()
            .map(|(i, worker)| ReplicaState {
                placement: record.placements.get(i).cloned(),
                worker: worker.status(),
                inference: worker.providers(),
            })
            .collect();
        let asked = record.replicas as usize;
        let live = |status, reason| LiveStatus {
            status,
            reason,
            replicas: replicas.clone(),
        };
        if replicas.len() < asked {
            let reason = if replicas.is_empty() && record.status == ServiceStatus::Error {
                record.status_desc.clone()
            } else {
                format!("{} of {asked} replicas exist", replicas.len())
            };
            return Ok(live(ServiceStatus::Error, reason));
        }
        let describe = |phase: Phase| -> Vec<String> {
            replicas
                .iter()
                .enumerate()
                .filter(|(_, r)| r.worker.phase() == phase)
                .map(|(i, r)| format!("replica {i}: {}", r.worker.describe()))
                .collect()
        };
        let failed = describe(Phase::Failed);
        if !failed.is_empty() {
            return Ok(live(ServiceStatus::Error, failed.join("; ")));
        }
        let up = replicas
            .iter()
            .filter(|r| r.worker.phase() == Phase::Running)
            .count();
        let on = if record.gpu_quota == 0.0 {
            CPU.to_string()
        } else {
            record.gpu_type.clone()
        };
        if up == asked {
            return Ok(live(
                ServiceStatus::Running,
                format!("{up} replica(s) running on {on}"),
            ));
        }
        let mut waiting = describe(Phase::Starting);
        waiting.extend(describe(Phase::Restarting));
        Ok(live(
            ServiceStatus::Starting,
            format!(
                "{up}/{asked} replicas running on {on}; {}",
                waiting.join("; ")
            ),
        ))
    }

    /// Where `worker`, a replica of service `id`, runs: its placement, and the
    /// service's accelerator type when it holds a card.
    pub fn placement_of(
        &self,
        id: &str,
        worker: &Arc<AlgorithmWorker>,
    ) -> Option<(Placement, String)> {
        let state = self.read();
        let running = state.iter().find(|r| r.record.id == id)?;
        let index = running
            .workers
            .iter()
            .position(|w| Arc::ptr_eq(w, worker))?;
        let placement = running.record.placements.get(index)?.clone();
        Some((placement, running.record.gpu_type.clone()))
    }

    /// Every live worker (replica), for the keeper that revives crashed ones.
    pub fn all_workers(&self) -> Vec<Arc<AlgorithmWorker>> {
        self.read()
            .iter()
            .flat_map(|r| r.workers.iter().cloned())
            .collect()
    }

    /// The service using algorithm `algo_id`, if one does.
    pub fn user_of(&self, algo_id: &str) -> Option<String> {
        self.read()
            .iter()
            .find(|r| r.record.algo_id == algo_id)
            .map(|r| format!("algorithm service {}", r.record.id))
    }

    /// The card placements held, by algorithm (D.5 `gpuUsedetail`).
    pub fn placements_by_algorithm(&self) -> Vec<(String, Vec<Placement>)> {
        let mut held: Vec<(String, Vec<Placement>)> = Vec::new();
        for running in self.read().iter() {
            let on_cards = running
                .record
                .placements
                .iter()
                .filter(|p| p.card.is_some())
                .cloned();
            match held
                .iter_mut()
                .find(|(algo, _)| *algo == running.record.algo_id)
            {
                Some((_, placements)) => placements.extend(on_cards),
                None => held.push((running.record.algo_id.clone(), on_cards.collect())),
            }
        }
        held.retain(|(_, placements)| !placements.is_empty());
        held
    }

    /// The environment of a service's instances: the package's `env`, then F.2
    /// `envs` (which win). Nothing of the host's.
    fn environment(&self, record: &ServiceRecord) -> Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = self
            .packages
            .algorithm(&record.algo_id)
            .ok()
            .and_then(|a| a.file_package_id)
            .and_then(|id| self.packages.file(&id).ok())
            .and_then(|f| f.manifest)
            .map(|m| {
                m.package
                    .env
                    .into_iter()
                    .map(|e| (e.name, e.value))
                    .collect()
            })
            .unwrap_or_default();
        for (key, value) in parse_envs(&record.envs).map_err(Error::Invalid)? {
            env.retain(|(k, _)| *k != key);
            env.push((key, value));
        }
        Ok(env)
    }

    /// Moves replica `index` of service `id` off its card: a new placement on
    /// another card, a new worker there, started; the service's record then holds
    /// them. Returns the replaced worker (its tasks move to the new one) and where
    /// the replica was and is. Nothing changes when no card has room.
    pub fn move_replica(
        &self,
        id: &str,
        index: usize,
        expected: &Placement,
        xpus: &[XpuSample],
    ) -> Result<Moved> {
        let record = self.get(id)?;
        let algorithm = self.algorithm(&record)?;
        let env = self.environment(&record)?;
        let (old, new) = self.scheduler.move_placement(
            &format!("service:{id}"),
            index,
            expected,
            &record.ask(1),
            xpus,
        )?;
        let worker = replica(&algorithm, &record, &new, env);
        if let Err(e) = worker.start() {
            tracing::warn!(service = %id, replica = index, "moved replica failed to start: {e}");
        }
        let replaced = {
            let mut state = self.write();
            let running = state
                .iter_mut()
                .find(|r| r.record.id == id)
                .ok_or_else(|| Error::NotFound(format!("no algorithm service {id:?}")))?;
            if let Some(slot) = running.record.placements.get_mut(index) {
                *slot = new.clone();
            }
            let old_worker = running
                .workers
                .get_mut(index)
                .map(|slot| std::mem::replace(slot, worker));
            if let Err(e) = self.store.put(Table::Services, id, &running.record) {
                tracing::error!(service = %id, "cannot record the moved replica: {e}");
            }
            old_worker
        };
        Ok(Moved {
            from: old.card_name(),
            to: new.card_name(),
            replaced,
        })
    }

    /// The algorithm plugin a service runs.
    fn algorithm(&self, record: &ServiceRecord) -> Result<AlgorithmPlugin> {
        self.packages
            .plugin_of_algorithm(&record.algo_id)?
            .algorithm()
            .cloned()
            .ok_or_else(|| {
                Error::Conflict(format!(
                    "algorithm {} does not carry an algorithm plugin",
                    record.algo_id
                ))
            })
    }

    /// Places every replica, makes partitions where drivers can, starts the workers.
    /// On failure nothing stays allocated.
    fn place_and_start(
        &self,
        record: &mut ServiceRecord,
        xpus: &[XpuSample],
    ) -> Result<Vec<Arc<AlgorithmWorker>>> {
        let algorithm = self.algorithm(record)?;
        let owner = format!("service:{}", record.id);
        record.placements = self
            .scheduler
            .reserve(&owner, &record.ask(record.replicas), xpus)
            .map_err(|e| match e {
                Error::Conflict(why) => {
                    Error::Conflict(format!("gpuType {:?}: {why}", record.gpu_type))
                }
                other => other,
            })?;
        let env = self.environment(record)?;
        let workers: Vec<Arc<AlgorithmWorker>> = record
            .placements
            .iter()
            .map(|placement| replica(&algorithm, record, placement, env.clone()))
            .collect();
        let failures: Vec<String> = workers
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.start().err().map(|e| format!("replica {i}: {e}")))
            .collect();
        if failures.is_empty() {
            record.status = ServiceStatus::Running;
            record.status_desc = format!("{} replica(s) started", record.replicas);
        } else {
            record.status = ServiceStatus::Error;
            record.status_desc = failures.join("; ");
        }
        Ok(workers)
    }

    /// F.2. Blocking.
    pub fn create(
        &self,
        algo_id: &str,
        replicas: u32,
        gpu_type: &str,
        envs: &str,
        xpus: &[XpuSample],
    ) -> Result<ServiceRecord> {
        if replicas == 0 || replicas > MAX_REPLICAS {
            return Err(Error::Invalid(format!(
                "replicas {replicas}: 1-{MAX_REPLICAS}"
            )));
        }
        parse_envs(envs).map_err(Error::Invalid)?;
        if gpu_type.trim().is_empty() {
            return Err(Error::Invalid("gpuType: must not be empty".into()));
        }
        let algorithm = self.packages.algorithm(algo_id)?;
        let file_id = algorithm.file_package_id.ok_or_else(|| {
            Error::Conflict(format!(
                "algorithm {algo_id} is not ready: it has no installed file package"
            ))
        })?;
        let manifest = self.packages.file(&file_id)?.manifest.ok_or_else(|| {
            Error::Conflict(format!(
                "algorithm {algo_id}: its file package {file_id} is not installed"
            ))
        })?;
        let (gpu_quota, gpu_memory_mib) = replica_ask(algo_id, &manifest.runtime, gpu_type)?;
        let mut record = ServiceRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            algo_id: algo_id.to_string(),
            replicas,
            gpu_type: gpu_type.to_string(),
            envs: envs.to_string(),
            status: ServiceStatus::Starting,
            status_desc: "starting".into(),
            gpu_quota,
            gpu_memory_mib,
            placements: Vec::new(),
            created_ms: crate::dates::now_ms(),
        };
        let workers = self.place_and_start(&mut record, xpus)?;
        if let Err(e) = self.store.put(Table::Services, &record.id, &record) {
            self.scheduler.release(&format!("service:{}", record.id));
            return Err(e.into());
        }
        self.write().push(Running {
            record: record.clone(),
            workers,
        });
        Ok(record)
    }

    /// F.3. `tasks` is how many tasks still use it: a service with tasks stays.
    pub fn delete(&self, id: &str, tasks: usize) -> Result<()> {
        if tasks > 0 {
            return Err(Error::Conflict(format!(
                "algorithm service {id} still has {tasks} task(s); delete them first"
            )));
        }
        let mut state = self.write();
        let position = state
            .iter()
            .position(|r| r.record.id == id)
            .ok_or_else(|| Error::NotFound(format!("no algorithm service {id:?}")))?;
        self.store.delete(Table::Services, id)?;
        state.remove(position);
        drop(state);
        self.scheduler.release(&format!("service:{id}"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_goes_where_its_package_says_it_can_run() {
        let gpu = |quota| crate::package::GpuRequirement {
            quota,
            limit: 0.0,
            vendor: "NVIDIA".into(),
            accelerator: "T4".into(),
            capacities: Default::default(),
            resolution: String::new(),
        };
        let runtime = |gpu: Vec<_>, cpu| Runtime {
            cmd: String::new(),
            env: Vec::new(),
            gpu,
            cpu,
            analysis_fps: None,
        };
        // No accelerator named: CPU only, and a gpuType is refused with the way out.
        let cpu_only = runtime(vec![], None);
        assert_eq!(replica_ask("a", &cpu_only, "cpu").unwrap().0, 0.0);
        let error = replica_ask("a", &cpu_only, "NVIDIA_T4").unwrap_err();
        assert!(error.to_string().contains("ask for gpuType CPU"), "{error}");
        // An accelerator named: its quota; CPU only where the package says so.
        let t4 = runtime(vec![gpu(0.5)], None);
        assert_eq!(replica_ask("a", &t4, "NVIDIA T4").unwrap().0, 0.5);
        let error = replica_ask("a", &t4, "CPU").unwrap_err();
        assert!(error.to_string().contains("NVIDIA_T4"), "{error}");
        assert_eq!(
            replica_ask("a", &runtime(vec![gpu(0.5)], Some(true)), "CPU")
                .unwrap()
                .0,
            0.0
        );
        assert!(replica_ask("a", &runtime(vec![gpu(1.5)], None), "NVIDIA_T4").is_err());
        // The package's limit is the replica's accelerator memory, in GB.
        let with_limit = crate::package::GpuRequirement {
            limit: 4.0,
            ..gpu(0.5)
        };
        assert_eq!(
            replica_ask("a", &runtime(vec![with_limit], None), "NVIDIA_T4").unwrap(),
            (0.5, Some(4096))
        );
    }

    #[test]
    fn envs_parse_and_errors_name_the_entry() {
        assert_eq!(
            parse_envs("threadCount=8, timeOut=2000, k1=v1").unwrap(),
            vec![
                ("threadCount".into(), "8".into()),
                ("timeOut".into(), "2000".into()),
                ("k1".into(), "v1".into())
            ]
        );
        assert!(parse_envs("").unwrap().is_empty());
        assert!(parse_envs("a=1, oops").unwrap_err().contains("\"oops\""));
    }
}
