//! Algorithm workloads and their pods (Appendix B) on the single-machine backend.
//!
//! A workload's `image` names an installed algorithm file package (by id or package
//! code, or by the id of an E.6 algorithm that runs it); its pods are algorithm-plugin workers run in process, placed by the
//! [`Scheduler`] like service replicas. `replicas` is real: scaling up places and
//! starts workers, scaling down stops the newest and frees their share. A pod's
//! status, restarts and readiness are its worker's supervisor's.
//!
//! B.2's `cpu` and `memory` are reserved from the node per pod, like the cards'
//! shares: pods never over-commit it. `command` and `args` become the pod's WASI
//! arguments (split like a shell would, without expansion).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::clusters::{ClusterStatus, Clusters};
use crate::error::{Error, Result};
use crate::machine::XpuSample;
use crate::packages::{Packages, Status};
use crate::plugins::algorithm::{AlgorithmPlugin, AlgorithmWorker};
use crate::plugins::supervisor::{Phase, Status as WorkerStatus};
use crate::runtime::Launch;
use crate::scheduler::{Ask, Scheduler};
use crate::store::{Store, Table};

/// Most replicas one workload may ask for.
pub const MAX_REPLICAS: u32 = 64;

/// What the node offers pods: B.2's `cpu` (cores) and `memory` (GiB) per pod are
/// reserved from it.
#[derive(Clone, Copy, Debug)]
pub struct NodeCapacity {
    pub cpu: u32,
    pub memory_gb: f64,
}

/// Splits a command line into words: blanks separate, single quotes keep
/// everything, double quotes keep all but `\"` and `\\`, a backslash outside quotes
/// escapes the next character. No expansion of any kind.
pub fn split_words(field: &str, line: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    let unclosed = |what: &str| Error::Invalid(format!("{field}: unclosed {what}"));
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => current.push(c),
                        None => return Err(unclosed("single quote")),
                    }
                }
            }
            '"' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => current.push(c),
                            Some(c) => {
                                current.push('\\');
                                current.push(c);
                            }
                            None => return Err(unclosed("double quote")),
                        },
                        Some(c) => current.push(c),
                        None => return Err(unclosed("double quote")),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err(Error::Invalid(format!("{field}: ends with a backslash"))),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

/// What B.2 asks for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkloadSpec {
    pub cluster_code: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub label_selector: BTreeMap<String, String>,
    pub replicas: u32,
    pub container_name: String,
    pub image: String,
    pub cpu: u32,
    pub xpu_type: String,
    pub xpu: f64,
    /// GiB.
    pub memory: u32,
    /// Accelerator memory per pod, GB; `None`: the share of the card's.
    #[serde(default)]
    pub xpu_memory: Option<u32>,
    pub command: Option<String>,
    pub args: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodRecord {
    pub name: String,
    pub created_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkloadRecord {
    pub spec: WorkloadSpec,
    /// The file package the image resolved to.
    pub package_id: String,
    pub pods: Vec<PodRecord>,
    pub created_ms: u64,
}

impl WorkloadRecord {
    pub fn key(&self) -> String {
        key(
            &self.spec.cluster_code,
            &self.spec.namespace,
            &self.spec.name,
        )
    }
}

/// A pod's worker, started, at `placement`: its models run on that card (or the
/// CPU). A pod that fails to start stays, failed, for the keeper to revive.
fn start_pod(
    algorithm: &AlgorithmPlugin,
    spec: &WorkloadSpec,
    placement: &crate::scheduler::Placement,
    args: Vec<String>,
) -> Arc<AlgorithmWorker> {
    let worker = algorithm.spawn_worker_with(Launch {
        env: Vec::new(),
        args,
        device: placement.device(&spec.xpu_type),
    });
    if let Err(e) = worker.start() {
        tracing::warn!(workload = %spec.name, "pod failed to start: {e}");
    }
    worker
}

impl WorkloadSpec {
    /// What `count` pods ask of the scheduler, on cards `selector` chooses.
    fn ask<'a>(&'a self, count: u32, selector: &'a BTreeMap<String, String>) -> Ask<'a> {
        Ask {
            count,
            quota: self.xpu,
            memory_mib: self.xpu_memory.map(|gb| u64::from(gb) * 1024),
            xpu_type: &self.xpu_type,
            selector,
        }
    }

    /// The `labelSelector` pairs that select cards (keys under `xpu.`).
    pub fn card_selector(&self) -> BTreeMap<String, String> {
        self.label_selector
            .iter()
            .filter(|(k, _)| is_card_label(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// A label key drivers publish (`xpu.model`, `xpu.count`, ...): in a
/// `labelSelector`, it selects the cards pods go on rather than the pods.
fn is_card_label(key: &str) -> bool {
    key.starts_with("xpu.")
}

fn key(cluster: &str, namespace: &str, name: &str) -> String {
    format!("{cluster}/{namespace}/{name}")
}

/// A pod as the API shows it.
#[derive(Clone, Debug)]
pub struct PodState {
    pub pod: PodRecord,
    pub workload: WorkloadSpec,
    pub worker: WorkerStatus,
    /// Its card and partition (none on CPU).
    pub placement: Option<crate::scheduler::Placement>,
}

impl PodState {
    /// Kubernetes' pod phases: Pending until started, Running (a crashed worker
    /// restarting after its backoff is Running, not ready), Failed when its worker
    /// cannot start or is over its restart budget.
    pub fn phase(&self) -> &'static str {
        match self.worker.phase() {
            Phase::Starting => "Pending",
            Phase::Running | Phase::Restarting => "Running",
            Phase::Failed => "Failed",
        }
    }

    pub fn ready(&self) -> bool {
        self.worker.phase() == Phase::Running
    }

    pub fn description(&self) -> String {
        self.worker.describe()
    }
}

/// A workload's status, derived from its live pods.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadStatus {
    /// Running (every pod ready), Pending (some starting or restarting), Failed
    /// (a pod cannot run, or pods are missing), Stopped (no replicas asked for).
    pub status: &'static str,
    /// Why, in one line.
    pub reason: String,
}

struct Live {
    record: WorkloadRecord,
    workers: Vec<Arc<AlgorithmWorker>>,
    /// Why the record's pods could not be started again after a restart.
    restore_error: Option<String>,
}

pub struct Workloads {
    store: Arc<Store>,
    packages: Arc<Packages>,
    scheduler: Arc<Scheduler>,
    state: RwLock<Vec<Live>>,
    /// Held from the node-capacity check to the record of what it admitted (B.2,
    /// B.4), so that two requests cannot both take the last cores.
    admission: std::sync::Mutex<()>,
}

fn pod_name(workload: &str) -> String {
    let suffix: String = uuid::Uuid::new_v4()
        .simple()
        .to_string()
        .chars()
        .take(5)
        .collect();
    format!("{workload}-{suffix}")
}

/// A pod's WASI arguments: `command` split into words (else the workload's name as
/// the program name), then `args` split into words.
fn arguments(spec: &WorkloadSpec) -> Result<Vec<String>> {
    let mut argv = match spec.command.as_deref().filter(|c| !c.trim().is_empty()) {
        Some(command) => split_words("command", command)?,
        None => vec![spec.name.clone()],
    };
    if let Some(args) = &spec.args {
        argv.extend(split_words("args", args)?);
    }
    Ok(argv)
}

fn validate(spec: &WorkloadSpec) -> Result<()> {
    let dns = |field: &str, value: &str| -> Result<()> {
        let ok = !value.is_empty()
            && value.len() <= 63
            && value.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.'
            })
            && value
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric());
        if ok {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "{field} {value:?}: 1-63 lower-case letters, digits, '-', '_' or '.'"
            )))
        }
    };
    dns("name", &spec.name)?;
    dns("nameSpace", &spec.namespace)?;
    if spec.replicas > MAX_REPLICAS {
        return Err(Error::Invalid(format!(
            "replicas {}: 0-{MAX_REPLICAS}",
            spec.replicas
        )));
    }
    if !(spec.xpu >= 0.0 && (spec.xpu * 10.0).fract().abs() < 1e-9)
        || (spec.xpu > 1.0 && spec.xpu.fract() != 0.0)
    {
        return Err(Error::Invalid(format!(
            "xpu {}: a share with one decimal up to 1, or a whole number of cards",
            spec.xpu
        )));
    }
    if spec.cpu == 0 {
        return Err(Error::Invalid("cpu: at least 1".into()));
    }
    if spec.xpu_memory == Some(0) {
        return Err(Error::Invalid(
            "xpuMemory 0: GB of accelerator memory per pod, at least 1 (or absent: the xpu \
             share of the card's)"
                .into(),
        ));
    }
    arguments(spec)?;
    if let Some((k, v)) = spec
        .label_selector
        .iter()
        .filter(|(k, _)| !is_card_label(k))
        .find(|(k, v)| spec.labels.get(*k) != Some(*v))
    {
        return Err(Error::Invalid(format!(
            "labelSelector {k}={v} does not select the pod labels (keys under xpu. \
             select cards by their drivers' labels instead)"
        )));
    }
    Ok(())
}

impl Workloads {
    pub fn new(store: Arc<Store>, packages: Arc<Packages>, scheduler: Arc<Scheduler>) -> Workloads {
        Workloads {
            store,
            packages,
            scheduler,
            state: RwLock::new(Vec::new()),
            admission: std::sync::Mutex::new(()),
        }
    }

    /// Refuses `pods` more pods of `spec` when, with what every workload's pods
    /// hold, they would not fit the node's cores or memory.
    fn admit(&self, spec: &WorkloadSpec, pods: u32, node: NodeCapacity) -> Result<()> {
        let (cores, gib) = self.read().iter().fold((0u64, 0u64), |(c, m), l| {
            let n = l.workers.len() as u64;
            (
                c + u64::from(l.record.spec.cpu) * n,
                m + u64::from(l.record.spec.memory) * n,
            )
        });
        let want_cores = u64::from(spec.cpu) * u64::from(pods);
        let want_gib = u64::from(spec.memory) * u64::from(pods);
        if cores + want_cores > u64::from(node.cpu) {
            return Err(Error::Conflict(format!(
                "cpu: {pods} pod(s) x {} cores do not fit the node: {cores} of its {} cores are \
                 reserved by running pods",
                spec.cpu, node.cpu
            )));
        }
        if (gib + want_gib) as f64 > node.memory_gb {
            return Err(Error::Conflict(format!(
                "memory: {pods} pod(s) x {} GiB do not fit the node: {gib} of its {:.1} GiB are \
                 reserved by running pods",
                spec.memory, node.memory_gb
            )));
        }
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Live>> {
        crate::sync::read(&self.state)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Live>> {
        crate::sync::write(&self.state)
    }

    /// The algorithm plugin of an installed package, named by its id or package
    /// code, or by the id of an algorithm (E.6) that runs it.
    fn resolve_image(&self, image: &str) -> Result<(String, AlgorithmPlugin)> {
        let by_algorithm = self
            .packages
            .algorithm(image)
            .ok()
            .and_then(|a| a.file_package_id);
        let file = self
            .packages
            .files()
            .into_iter()
            .find(|f| {
                f.id == image
                    || f.manifest.as_ref().is_some_and(|m| m.package.code == image)
                    || by_algorithm.as_deref() == Some(f.id.as_str())
            })
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "image {image:?}: no algorithm package with that id or code, and no \
                     ready algorithm with that id"
                ))
            })?;
        if file.status != Status::Ready {
            return Err(Error::Conflict(format!(
                "image {image:?}: the package is not ready: {}",
                file.status_desc
            )));
        }
        let plugin = self.packages.plugin_of_file(&file.id).ok_or_else(|| {
            Error::Conflict(format!("image {image:?}: the package has no loaded plugin"))
        })?;
        let algorithm = plugin
            .algorithm()
            .cloned()
            .ok_or_else(|| Error::Conflict(format!("image {image:?}: not an algorithm")))?;
        Ok((file.id, algorithm))
    }

    /// Moves pod `index` of the workload keyed `key` off its card: a new placement
    /// on another card its ask fits, a new worker there; the old worker goes.
    /// Returns where the pod was and is. Nothing changes when no card has room.
    pub fn move_pod(
        &self,
        key: &str,
        index: usize,
        expected: &crate::scheduler::Placement,
        xpus: &[XpuSample],
    ) -> Result<(String, String)> {
        let spec = {
            let state = self.read();
            state
                .iter()
                .find(|l| l.record.key() == key)
                .map(|l| l.record.spec.clone())
                .ok_or_else(|| Error::NotFound(format!("no workload {key:?}")))?
        };
        let (_, algorithm) = self.resolve_image(&spec.image)?;
        let selector = spec.card_selector();
        let (old, new) = self.scheduler.move_placement(
            &format!("workload:{key}"),
            index,
            expected,
            &spec.ask(1, &selector),
            xpus,
        )?;
        let worker = start_pod(&algorithm, &spec, &new, arguments(&spec)?);
        if let Some(live) = self.write().iter_mut().find(|l| l.record.key() == key) {
            if let Some(slot) = live.workers.get_mut(index) {
                *slot = worker;
            }
        }
        Ok((old.card_name(), new.card_name()))
    }

    /// Starts `count` new pods' workers, placed for `owner`.
    fn start_pods(
        &self,
        spec: &WorkloadSpec,
        algorithm: &AlgorithmPlugin,
        count: u32,
        xpus: &[XpuSample],
    ) -> Result<Vec<Arc<AlgorithmWorker>>> {
        let owner = format!(
            "workload:{}",
            key(&spec.cluster_code, &spec.namespace, &spec.name)
        );
        // The placements live in the scheduler's ledger under `owner`.
        let selector = spec.card_selector();
        let placements = self
            .scheduler
            .reserve(&owner, &spec.ask(count, &selector), xpus)?;
        let args = arguments(spec)?;
        Ok(placements
            .iter()
            .map(|placement| start_pod(algorithm, spec, placement, args.clone()))
            .collect())
    }

    /// Loads the workloads and starts their pods again.
    pub fn restore(&self, xpus: &[XpuSample]) -> anyhow::Result<()> {
        let records: Vec<WorkloadRecord> = self
            .store
            .load(Table::Workloads)?
            .into_iter()
            .map(|(_, w)| w)
            .collect();
        for record in records {
            let workers = self
                .resolve_image(&record.spec.image)
                .and_then(|(_, algorithm)| {
                    self.start_pods(&record.spec, &algorithm, record.pods.len() as u32, xpus)
                });
            let (workers, restore_error) = match workers {
                Ok(workers) => (workers, None),
                Err(e) => {
                    tracing::error!(workload = %record.key(), "cannot restart its pods: {e}");
                    (
                        Vec::new(),
                        Some(format!("pods not started after a restart: {e}")),
                    )
                }
            };
            self.write().push(Live {
                record,
                workers,
                restore_error,
            });
        }
        Ok(())
    }

    /// B.2. Blocking.
    pub fn create(
        &self,
        spec: WorkloadSpec,
        clusters: &Clusters,
        xpus: &[XpuSample],
        node: NodeCapacity,
    ) -> Result<WorkloadRecord> {
        validate(&spec)?;
        let cluster = clusters.get(&spec.cluster_code)?;
        if cluster.status != ClusterStatus::Running || clusters.nodes(&cluster.code)?.is_empty() {
            return Err(Error::Conflict(format!(
                "cluster {} has no running node",
                cluster.code
            )));
        }
        let _admission = crate::sync::lock(&self.admission);
        self.admit(&spec, spec.replicas, node)?;
        let id = key(&spec.cluster_code, &spec.namespace, &spec.name);
        if self.read().iter().any(|l| l.record.key() == id) {
            return Err(Error::Conflict(format!(
                "workload {} already exists in namespace {} of cluster {}",
                spec.name, spec.namespace, spec.cluster_code
            )));
        }
        let (package_id, algorithm) = self.resolve_image(&spec.image)?;
        let workers = self.start_pods(&spec, &algorithm, spec.replicas, xpus)?;
        let now = crate::dates::now_ms();
        let record = WorkloadRecord {
            pods: (0..spec.replicas)
                .map(|_| PodRecord {
                    name: pod_name(&spec.name),
                    created_ms: now,
                })
                .collect(),
            spec,
            package_id,
            created_ms: now,
        };
        if let Err(e) = self.store.put(Table::Workloads, &id, &record) {
            self.scheduler.release(&format!("workload:{id}"));
            return Err(e.into());
        }
        self.write().push(Live {
            record: record.clone(),
            workers,
            restore_error: None,
        });
        Ok(record)
    }

    fn find<'a>(state: &'a [Live], cluster: &str, namespace: &str, name: &str) -> Result<&'a Live> {
        let id = key(cluster, namespace, name);
        state.iter().find(|l| l.record.key() == id).ok_or_else(|| {
            Error::NotFound(format!(
                "no workload {name:?} in namespace {namespace:?} of cluster {cluster:?}"
            ))
        })
    }

    pub fn get(&self, cluster: &str, namespace: &str, name: &str) -> Result<WorkloadRecord> {
        Ok(Self::find(&self.read(), cluster, namespace, name)?
            .record
            .clone())
    }

    pub fn list(&self, cluster: &str) -> Vec<WorkloadRecord> {
        self.read()
            .iter()
            .filter(|l| l.record.spec.cluster_code == cluster)
            .map(|l| l.record.clone())
            .collect()
    }

    /// Workloads in a cluster (a cluster with workloads is not deleted).
    pub fn count_in(&self, cluster: &str) -> usize {
        self.read()
            .iter()
            .filter(|l| l.record.spec.cluster_code == cluster)
            .count()
    }

    /// The accelerator memory one pod holds in the ledger (MiB), once placed.
    pub fn pod_memory_mib(&self, record: &WorkloadRecord) -> Option<u64> {
        self.scheduler
            .held_by(&format!("workload:{}", record.key()))
            .iter()
            .find_map(|p| p.memory_mib)
    }

    pub fn pods(&self, cluster: &str, namespace: &str, name: &str) -> Result<Vec<PodState>> {
        let state = self.read();
        let live = Self::find(&state, cluster, namespace, name)?;
        // Pods and their placements are in the same order: scaling up appends to
        // both, scaling down takes the last of both.
        let placements = self
            .scheduler
            .held_by(&format!("workload:{}", live.record.key()));
        Ok(live
            .record
            .pods
            .iter()
            .zip(&live.workers)
            .enumerate()
            .map(|(i, (pod, worker))| PodState {
                pod: pod.clone(),
                workload: live.record.spec.clone(),
                worker: worker.status(),
                placement: placements.get(i).cloned(),
            })
            .collect())
    }

    /// B.6's status: what the live pods are doing, never what was asked for.
    pub fn status(&self, cluster: &str, namespace: &str, name: &str) -> Result<WorkloadStatus> {
        let state = self.read();
        let live = Self::find(&state, cluster, namespace, name)?;
        let asked = live.record.spec.replicas as usize;
        let status = |status, reason| Ok(WorkloadStatus { status, reason });
        if asked == 0 {
            return status("Stopped", "scaled to 0 replicas".into());
        }
        if live.workers.len() < asked {
            return status(
                "Failed",
                live.restore_error
                    .clone()
                    .unwrap_or_else(|| format!("{} of {asked} pods exist", live.workers.len())),
            );
        }
        let pods: Vec<(&PodRecord, WorkerStatus)> = live
            .record
            .pods
            .iter()
            .zip(&live.workers)
            .map(|(pod, worker)| (pod, worker.status()))
            .collect();
        let not = |phase: Phase| {
            pods.iter()
                .filter(|(_, s)| s.phase() == phase)
                .map(|(pod, s)| format!("pod {}: {}", pod.name, s.describe()))
                .collect::<Vec<_>>()
        };
        let failed = not(Phase::Failed);
        if !failed.is_empty() {
            return status("Failed", failed.join("; "));
        }
        let ready = pods
            .iter()
            .filter(|(_, s)| s.phase() == Phase::Running)
            .count();
        if ready == asked {
            return status("Running", format!("{ready}/{asked} pods ready"));
        }
        let mut waiting = not(Phase::Starting);
        waiting.extend(not(Phase::Restarting));
        status(
            "Pending",
            format!("{ready}/{asked} pods ready; {}", waiting.join("; ")),
        )
    }

    /// Every live worker (pod), for the keeper that revives crashed ones.
    pub fn workers(&self) -> Vec<Arc<AlgorithmWorker>> {
        self.read()
            .iter()
            .flat_map(|l| l.workers.iter().cloned())
            .collect()
    }

    /// The workload using file package `package_id`, if one does.
    pub fn user_of_package(&self, package_id: &str) -> Option<String> {
        self.read()
            .iter()
            .find(|l| l.record.package_id == package_id)
            .map(|l| format!("workload {}", l.record.key()))
    }

    /// B.4. Blocking.
    pub fn scale(
        &self,
        cluster: &str,
        namespace: &str,
        name: &str,
        replicas: u32,
        xpus: &[XpuSample],
        node: NodeCapacity,
    ) -> Result<()> {
        if replicas > MAX_REPLICAS {
            return Err(Error::Invalid(format!(
                "replicas {replicas}: 0-{MAX_REPLICAS}"
            )));
        }
        let id = key(cluster, namespace, name);
        let _admission = crate::sync::lock(&self.admission);
        let (spec, current) = {
            let state = self.read();
            let live = Self::find(&state, cluster, namespace, name)?;
            (live.record.spec.clone(), live.record.pods.len() as u32)
        };
        if replicas > current {
            self.admit(&spec, replicas - current, node)?;
        }
        let owner = format!("workload:{id}");
        let per_pod = if spec.xpu > 1.0 { spec.xpu as usize } else { 1 };
        let mut state = self.write();
        let live = state
            .iter_mut()
            .find(|l| l.record.key() == id)
            .ok_or_else(|| Error::NotFound(format!("no workload {name:?}")))?;
        let mut record = live.record.clone();
        record.spec.replicas = replicas;
        if replicas > current {
            let (_, algorithm) = self.resolve_image(&spec.image)?;
            let workers = self.start_pods(&spec, &algorithm, replicas - current, xpus)?;
            let now = crate::dates::now_ms();
            record.pods.extend((current..replicas).map(|_| PodRecord {
                name: pod_name(&spec.name),
                created_ms: now,
            }));
            if let Err(e) = self.store.put(Table::Workloads, &id, &record) {
                self.scheduler
                    .release_last(&owner, (replicas - current) as usize * per_pod);
                return Err(e.into());
            }
            live.workers.extend(workers);
        } else if replicas < current {
            record.pods.truncate(replicas as usize);
            self.store.put(Table::Workloads, &id, &record)?;
            live.workers.truncate(replicas as usize);
            self.scheduler
                .release_last(&owner, (current - replicas) as usize * per_pod);
        } else {
            self.store.put(Table::Workloads, &id, &record)?;
        }
        live.record = record;
        Ok(())
    }

    /// B.3. Blocking.
    pub fn delete(&self, cluster: &str, namespace: &str, name: &str) -> Result<()> {
        let id = key(cluster, namespace, name);
        let mut state = self.write();
        Self::find(&state, cluster, namespace, name)?;
        self.store.delete(Table::Workloads, &id)?;
        state.retain(|l| l.record.key() != id);
        drop(state);
        self.scheduler.release(&format!("workload:{id}"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_lines_split_like_a_shell_without_expansion() {
        let split = |line| super::split_words("args", line);
        assert_eq!(
            split(r#"--name "a b" 'c d' e\ f "q\"q" $HOME"#).unwrap(),
            vec!["--name", "a b", "c d", "e f", "q\"q", "$HOME"]
        );
        assert_eq!(split("  ").unwrap(), Vec::<String>::new());
        assert_eq!(split("''").unwrap(), vec![""]);
        let error = split("'open").unwrap_err().to_string();
        assert!(error.contains("args: unclosed single quote"), "{error}");
    }
}
