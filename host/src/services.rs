//! Algorithm services (Appendix F): pools of algorithm-plugin workers run in
//! process, one per replica.
//!
//! Each replica is placed by the [`Scheduler`] on an accelerator of the service's
//! `gpuType` with the algorithm's GPU quota (from its package's `runtime.gpu`). A
//! service is `runing` once every worker has started, `error` (with the reason)
//! otherwise.

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::machine::XpuSample;
use crate::packages::Packages;
use crate::plugins::algorithm::AlgorithmWorker;
use crate::scheduler::{Placement, Scheduler};
use crate::store::{Store, Table};

/// Most replicas one service may ask for.
pub const MAX_REPLICAS: u32 = 64;

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
    pub placements: Vec<Placement>,
    pub created_ms: u64,
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

    /// GPU quota held, by algorithm (D.5 `gpuUsedetail`).
    pub fn quota_by_algorithm(&self) -> Vec<(String, f64)> {
        let mut totals: Vec<(String, f64)> = Vec::new();
        for running in self.read().iter() {
            let held: f64 = running
                .record
                .placements
                .iter()
                .filter(|p| p.card.is_some())
                .map(|p| p.quota)
                .sum();
            if held == 0.0 {
                continue;
            }
            match totals
                .iter_mut()
                .find(|(algo, _)| *algo == running.record.algo_id)
            {
                Some((_, total)) => *total += held,
                None => totals.push((running.record.algo_id.clone(), held)),
            }
        }
        totals
    }

    /// Places every replica, makes partitions where drivers can, starts the workers.
    /// On failure nothing stays allocated.
    fn place_and_start(
        &self,
        record: &mut ServiceRecord,
        xpus: &[XpuSample],
    ) -> Result<Vec<Arc<AlgorithmWorker>>> {
        let plugin = self.packages.plugin_of_algorithm(&record.algo_id)?;
        let algorithm = plugin
            .algorithm()
            .ok_or_else(|| {
                Error::Conflict(format!(
                    "algorithm {} does not carry an algorithm plugin",
                    record.algo_id
                ))
            })?
            .clone();
        let owner = format!("service:{}", record.id);
        record.placements = self
            .scheduler
            .reserve(
                &owner,
                record.replicas,
                record.gpu_quota,
                &record.gpu_type,
                xpus,
            )
            .map_err(|e| match e {
                Error::Conflict(why) => {
                    Error::Conflict(format!("gpuType {:?}: {why}", record.gpu_type))
                }
                other => other,
            })?;
        let workers: Vec<Arc<AlgorithmWorker>> = (0..record.replicas)
            .map(|_| algorithm.spawn_worker())
            .collect();
        let failures: Vec<String> = workers
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.start().err().map(|e| format!("replica {i}: {e}")))
            .collect();
        if failures.is_empty() {
            record.status = ServiceStatus::Running;
            record.status_desc = format!("{} replica(s) running", record.replicas);
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
        let gpu_quota = algorithm
            .file_package_id
            .as_deref()
            .and_then(|id| self.packages.file(id).ok())
            .and_then(|f| f.manifest)
            .and_then(|m| m.runtime.gpu.first().map(|g| g.quota))
            .unwrap_or(0.0);
        if !(0.0..=1.0).contains(&gpu_quota) {
            return Err(Error::Conflict(format!(
                "algorithm {algo_id}: its package asks for gpu quota {gpu_quota}; 0-1 per replica"
            )));
        }
        let mut record = ServiceRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            algo_id: algo_id.to_string(),
            replicas,
            gpu_type: gpu_type.to_string(),
            envs: envs.to_string(),
            status: ServiceStatus::Starting,
            status_desc: "starting".into(),
            gpu_quota,
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
