//! Driver plugins: one long-lived, supervised incarnation per plugin.
//!
//! The incarnation is started (instantiated, then `init` with the manifest's config)
//! on first use and again after a crash. Calls are blocking: async callers run them
//! on blocking threads.
//!
//! Partitions created through the host outlive incarnations. The host keeps a ledger
//! of them and reconciles it with each new incarnation: partitions the driver still
//! reports (hardware keeps MIG instances across a plugin restart) are kept, missing
//! ones (a simulator starts empty) are created again. Callers keep the id they were
//! given; the ledger maps it to the id in the current incarnation.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Engine, Store};

use super::contract::{self, Violation};
use super::supervisor::{lock, CallError, Incarnation, RestartPolicy, Status, Supervised};
use crate::runtime::bindings::driver_types::{
    Device, DriverError, DriverInfo, Label, Metrics, Partition, PartitionSpec,
};
use crate::runtime::bindings::{DriverBindings, DriverPre};
use crate::runtime::{PluginLimits, PluginState, Sandbox};

pub struct DriverIncarnation {
    store: Store<PluginState>,
    bindings: DriverBindings,
}

impl Incarnation for DriverIncarnation {
    fn store(&mut self) -> &mut Store<PluginState> {
        &mut self.store
    }
}

/// A driver call failed: either the plugin itself (trap, timeout, unhealthy...) or
/// the driver answered with its typed error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DriverFailure {
    #[error(transparent)]
    Plugin(#[from] CallError),
    #[error("driver error: {0}")]
    Driver(DriverError),
    /// The driver answered, but the answer breaks the contract (ranges, counts,
    /// sizes): it is not used.
    #[error("driver answer refused: {0}")]
    Contract(Violation),
}

pub struct Driver {
    supervised: Supervised<DriverIncarnation>,
    info: std::sync::Mutex<Option<DriverInfo>>,
    ledger: std::sync::Mutex<Vec<LedgerEntry>>,
    limits: Arc<PluginLimits>,
    /// The devices of the last good `devices()` answer: what samples and partitions
    /// are checked against.
    devices: std::sync::Mutex<Option<Kept>>,
    /// The last answer that broke the contract, while no good one has come since.
    violation: std::sync::Mutex<Option<Violation>>,
    /// Answers refused since the plugin was loaded.
    refused: std::sync::atomic::AtomicU64,
}

/// The devices of a driver's last good `devices()` answer.
#[derive(Clone)]
struct Kept {
    /// The devices version the driver gave with them; none: ask again before the
    /// next sample.
    version: Option<u64>,
    devices: Arc<[Device]>,
}

/// A sample, and the devices it belongs to.
#[derive(Clone, Debug)]
pub struct Reading {
    pub devices: Arc<[Device]>,
    pub metrics: Metrics,
}

/// A partition created through the host.
#[derive(Clone, Debug)]
struct LedgerEntry {
    /// The id callers were given.
    id: String,
    /// Its id in the current incarnation.
    driver_id: String,
    spec: PartitionSpec,
    /// The process that does its work, as the driver was last told
    /// (`bind_process`); told again to each new incarnation.
    process: Option<u32>,
}

fn same_spec(a: &PartitionSpec, b: &PartitionSpec) -> bool {
    a.device_index == b.device_index
        && a.isolation == b.isolation
        && a.slicing == b.slicing
        && a.memory_quota_mib == b.memory_quota_mib
        && a.compute_share_pct == b.compute_share_pct
}

/// Brings a fresh incarnation in line with the ledger. Returns the ledger as it now
/// stands: entries whose partition could not be restored are dropped, and logged.
///
/// A driver that cannot say which partitions exist has not started: creating the
/// ledger's partitions again on hardware that kept them would allocate them twice.
/// The start fails, and is retried after the backoff.
fn reconcile(
    plugin: &str,
    store: &mut Store<PluginState>,
    bindings: &DriverBindings,
    ledger: Vec<LedgerEntry>,
) -> Result<Vec<LedgerEntry>, CallError> {
    let start_error = |e: wasmtime::Error| CallError::Start(format!("{e:#}"));
    let present = bindings
        .partitions(&mut *store)
        .map_err(start_error)?
        .map_err(|e| {
            CallError::Start(format!(
                "cannot list partitions to reconcile {} held by the host: {e}",
                ledger.len()
            ))
        })?;
    let mut kept = Vec::with_capacity(ledger.len());
    for mut entry in ledger {
        if !present
            .iter()
            .any(|p| p.id == entry.driver_id && same_spec(&p.spec, &entry.spec))
        {
            match bindings
                .create_partition(&mut *store, entry.spec)
                .map_err(start_error)?
            {
                Ok(partition) => {
                    tracing::info!(plugin, partition = %entry.id, driver_id = %partition.id, "partition restored after restart");
                    entry.driver_id = partition.id;
                }
                Err(e) => {
                    tracing::error!(plugin, partition = %entry.id, "partition lost in restart, cannot restore: {e}");
                    continue;
                }
            }
        }
        if let Some(pid) = entry.process {
            // Not fatal: the partition runs, its usage is unknown until the
            // host names its process again.
            match bindings
                .bind_process(&mut *store, &entry.driver_id, pid)
                .map_err(start_error)?
            {
                Ok(()) | Err(DriverError::Unsupported(_)) => {}
                Err(e) => {
                    tracing::warn!(plugin, partition = %entry.id, pid, "the restarted driver was not told the partition's process: {e}");
                    entry.process = None;
                }
            }
        }
        kept.push(entry);
    }
    Ok(kept)
}

impl Driver {
    pub fn new(
        name: &str,
        engine: Engine,
        sandbox: Sandbox,
        pre: DriverPre,
        config: Vec<(String, String)>,
        policy: RestartPolicy,
        timeout: Duration,
    ) -> Arc<Driver> {
        let plugin = name.to_string();
        let limits = sandbox.limits.clone();
        let calls = sandbox.calls.clone();
        Arc::new_cyclic(|weak: &std::sync::Weak<Driver>| {
            let weak = weak.clone();
            let start = move || -> Result<DriverIncarnation, CallError> {
                let start_error = |e: wasmtime::Error| CallError::Start(format!("{e:#}"));
                let mut store = sandbox
                    .new_store(&engine)
                    .map_err(|e| CallError::Start(format!("{e:#}")))?;
                PluginState::set_deadline(&mut store, std::time::Instant::now(), timeout);
                let bindings = pre.instantiate(&mut store).map_err(start_error)?;
                let info = bindings
                    .init(&mut store, &config)
                    .map_err(start_error)?
                    .map_err(|e| CallError::Start(format!("init refused: {e}")))?;
                contract::info(&info, &sandbox.limits)
                    .map_err(|v| CallError::Start(format!("init answer refused: {v}")))?;
                if let Some(driver) = weak.upgrade() {
                    *lock(&driver.info) = Some(info);
                    // A new incarnation counts its devices versions afresh: the kept
                    // devices are asked for again at its first sample.
                    if let Some(kept) = lock(&driver.devices).as_mut() {
                        kept.version = None;
                    }
                    let ledger = lock(&driver.ledger).clone();
                    if !ledger.is_empty() {
                        let kept = reconcile(&plugin, &mut store, &bindings, ledger)?;
                        *lock(&driver.ledger) = kept;
                    }
                }
                Ok(DriverIncarnation { store, bindings })
            };
            Driver {
                supervised: Supervised::new(name, calls, policy, timeout, start),
                info: std::sync::Mutex::new(None),
                ledger: std::sync::Mutex::new(Vec::new()),
                limits,
                devices: std::sync::Mutex::new(None),
                violation: std::sync::Mutex::new(None),
                refused: 0.into(),
            }
        })
    }

    pub fn status(&self) -> Status {
        self.supervised.status()
    }

    /// Answers refused since the plugin was loaded.
    pub fn answers_refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why the driver's last answer was refused, until a good one comes.
    pub fn violation(&self) -> Option<Violation> {
        lock(&self.violation).clone()
    }

    /// Checks an answer against the contract, and remembers the verdict.
    fn vet<R>(
        &self,
        answer: R,
        check: impl FnOnce(&R) -> Result<(), Violation>,
    ) -> Result<R, DriverFailure> {
        match check(&answer) {
            Ok(()) => {
                lock(&self.violation).take();
                Ok(answer)
            }
            Err(violation) => Err(self.refuse(violation)),
        }
    }

    /// Records a broken answer (logged once per distinct reason).
    fn refuse(&self, violation: Violation) -> DriverFailure {
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut last = lock(&self.violation);
        if last.as_deref() != Some(violation.as_str()) {
            tracing::warn!(plugin = %self.supervised.plugin(), "driver degraded: answer refused: {violation}");
        }
        *last = Some(violation.clone());
        DriverFailure::Contract(violation)
    }

    /// What the driver said of itself at its last start.
    pub fn info(&self) -> Option<DriverInfo> {
        lock(&self.info).clone()
    }

    /// Whether the driver said its devices are simulated (read in place).
    pub fn simulated(&self) -> bool {
        lock(&self.info).as_ref().is_some_and(|i| i.simulated)
    }

    /// The caller-facing id of a partition id of the current incarnation.
    fn stable_id(&self, driver_id: &str) -> String {
        lock(&self.ledger)
            .iter()
            .find(|e| e.driver_id == driver_id)
            .map_or_else(|| driver_id.to_string(), |e| e.id.clone())
    }

    /// Takes over the partitions `previous` (an older version of this plugin) created:
    /// they are reconciled at this driver's first start, as after a restart.
    pub fn inherit_partitions(&self, previous: &Driver) {
        *lock(&self.ledger) = lock(&previous.ledger).clone();
    }

    /// Starts the driver now (it would start on first use anyway).
    pub fn start(&self) -> Result<DriverInfo, DriverFailure> {
        self.supervised.call("start", |_| Ok(()))?;
        Ok(self.info().expect("set by a successful start"))
    }

    fn call<R>(
        &self,
        function: &'static str,
        f: impl FnOnce(
            &mut Store<PluginState>,
            &DriverBindings,
        ) -> wasmtime::Result<Result<R, DriverError>>,
    ) -> Result<R, DriverFailure> {
        self.supervised
            .call(function, |inc| f(&mut inc.store, &inc.bindings))?
            .map_err(DriverFailure::Driver)
    }

    /// Asks the driver for its devices now (and keeps them for the next sample).
    pub fn devices(&self) -> Result<Arc<[Device]>, DriverFailure> {
        Ok(self.refresh_devices(None)?.devices)
    }

    /// Asks for the devices, checks them, and keeps them under `version`.
    fn refresh_devices(&self, version: Option<u64>) -> Result<Kept, DriverFailure> {
        let devices = self.call("devices", |s, b| b.devices(s))?;
        let devices = self.vet(devices, |d| contract::devices(d, &self.limits))?;
        let fresh = Kept {
            version,
            devices: Arc::from(devices),
        };
        *lock(&self.devices) = Some(fresh.clone());
        Ok(fresh)
    }

    /// Samples the cards and partitions, with the devices the sample belongs to:
    /// the kept ones while the driver's devices version says they did not change,
    /// else asked for again. The sample is checked against them.
    pub fn sample(&self) -> Result<Reading, DriverFailure> {
        let (metrics, version) = self.call("sample", |s, b| b.sample(s))?;
        let kept = lock(&self.devices).clone();
        let kept = match kept {
            Some(kept) if version.is_some() && kept.version == version => kept,
            _ => self.refresh_devices(version)?,
        };
        let mut metrics = self.vet(metrics, |m| {
            contract::metrics(m, &kept.devices, &self.limits)
        })?;
        for instance in &mut metrics.instances {
            instance.partition_id = self.stable_id(&instance.partition_id);
        }
        Ok(Reading {
            devices: kept.devices,
            metrics,
        })
    }

    pub fn create_partition(&self, spec: PartitionSpec) -> Result<Partition, DriverFailure> {
        let partition = self.call("create-partition", |s, b| b.create_partition(s, spec))?;
        let devices = lock(&self.devices).as_ref().map(|k| k.devices.clone());
        let checked = contract::created(&spec, &partition, devices.as_deref(), &self.limits);
        if let Err(violation) = checked {
            // Whatever the driver made is not what was asked for: undo it.
            let id = partition.id.clone();
            if let Err(e) = self.call("destroy-partition", |s, b| b.destroy_partition(s, &id)) {
                tracing::warn!(plugin = %self.supervised.plugin(), partition = %id, "cannot destroy a partition that broke the contract: {e}");
            }
            return Err(self.refuse(violation));
        }
        let mut ledger = lock(&self.ledger);
        // A restarted simulator may hand out an id a caller already holds.
        let mut id = partition.id.clone();
        let mut n = 1;
        while ledger.iter().any(|e| e.id == id) {
            id = format!("{}.{n}", partition.id);
            n += 1;
        }
        // The ledger holds what was made (it may cover more than was asked): that is
        // what the driver reports again after a restart.
        ledger.push(LedgerEntry {
            id: id.clone(),
            driver_id: partition.id,
            spec: partition.spec,
            process: None,
        });
        Ok(Partition {
            id,
            spec: partition.spec,
        })
    }

    pub fn destroy_partition(&self, id: &str) -> Result<(), DriverFailure> {
        let driver_id = lock(&self.ledger)
            .iter()
            .find(|e| e.id == id)
            .map_or_else(|| id.to_string(), |e| e.driver_id.clone());
        self.call("destroy-partition", |s, b| {
            b.destroy_partition(s, &driver_id)
        })?;
        lock(&self.ledger).retain(|e| e.id != id);
        Ok(())
    }

    pub fn partitions(&self) -> Result<Vec<Partition>, DriverFailure> {
        let partitions = self.call("partitions", |s, b| b.partitions(s))?;
        let mut partitions = self.vet(partitions, |p| contract::partitions(p, &self.limits))?;
        for partition in &mut partitions {
            partition.id = self.stable_id(&partition.id);
        }
        Ok(partitions)
    }

    pub fn labels(&self) -> Result<Vec<Label>, DriverFailure> {
        let labels = self.call("labels", |s, b| b.labels(s))?;
        self.vet(labels, |l| contract::labels(l, &self.limits))
    }

    /// The device a process is given to run on partition `id` alone (a MIG
    /// instance's uuid); `None` for a share of a card.
    pub fn partition_device(&self, id: &str) -> Result<Option<String>, DriverFailure> {
        let driver_id = lock(&self.ledger)
            .iter()
            .find(|e| e.id == id)
            .map_or_else(|| id.to_string(), |e| e.driver_id.clone());
        let device = self.call("partition-device", |s, b| b.partition_device(s, &driver_id))?;
        self.vet(device, |d| match d {
            Some(device) => contract::partition_device(id, device, &self.limits),
            None => Ok(()),
        })
    }

    /// Process `pid` now does the work of partition `id` (one the host created):
    /// what the device measures of it is the partition's usage. The driver is
    /// told once, and again after a restart, so a caller may say it every round.
    /// A driver that does not measure by process is not asked again.
    pub fn bind_process(&self, id: &str, pid: u32) -> Result<(), DriverFailure> {
        let driver_id = {
            let ledger = lock(&self.ledger);
            let Some(entry) = ledger.iter().find(|e| e.id == id) else {
                return Err(DriverFailure::Driver(DriverError::NotFound(format!(
                    "no partition {id} was created through the host"
                ))));
            };
            if entry.process == Some(pid) {
                return Ok(());
            }
            entry.driver_id.clone()
        };
        let told = self.call("bind-process", |s, b| b.bind_process(s, &driver_id, pid));
        if matches!(
            told,
            Ok(()) | Err(DriverFailure::Driver(DriverError::Unsupported(_)))
        ) {
            if let Some(entry) = lock(&self.ledger).iter_mut().find(|e| e.id == id) {
                entry.process = Some(pid);
            }
        }
        told
    }

    /// The process partition `id` was last bound to.
    pub fn bound_process(&self, id: &str) -> Option<u32> {
        lock(&self.ledger)
            .iter()
            .find(|e| e.id == id)
            .and_then(|e| e.process)
    }
}
