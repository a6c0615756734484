//! Periodic sampling of every driver plugin into a cache.
//!
//! Request handlers read the cache; they never call a plugin. Each driver is
//! sampled on its own blocking thread, and a driver whose previous sample is still
//! running (a plugin stuck until its deadline) is skipped, so one slow driver
//! delays nobody else.
//!
//! A snapshot carries its time. One older than a few intervals is not served: a
//! driver that crashed, hangs or answers errors has no figures and no cards until it
//! answers again (the transition is logged at warn, and shown in `GET /plugins`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crate::plugins::driver::{Driver, DriverFailure, Reading};
use crate::plugins::Registry;
use crate::runtime::bindings::driver_types::{Device, InstanceMetrics, Label, Metrics};
use crate::runtime::inference::PartitionDevice;

/// Sampling intervals a driver may miss before its figures are withdrawn.
const MISSED_INTERVALS: u32 = 3;
/// The shortest age at which figures are withdrawn: a busy machine may delay one
/// sample of a fast sampler, and that is not a driver failure.
const MIN_MAX_AGE: Duration = Duration::from_secs(1);

/// The latest readings of one driver.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The driver says its devices are simulated.
    pub simulated: bool,
    /// Shared with the driver and the snapshots before, while they do not change.
    pub devices: Arc<[Device]>,
    pub metrics: Metrics,
    /// The scheduling labels the driver publishes (`xpu.model`, `xpu.count`, ...).
    pub labels: Labels,
    /// Rounds since the labels were asked for.
    pub labels_age: u32,
    pub at: SystemTime,
}

/// A driver's scheduling labels, (key, value).
pub type Labels = Arc<[(String, String)]>;

/// Labels change with the devices, not between samples: they are asked for again
/// when a device comes, goes, or changes type, memory or health, and at least every
/// this many rounds.
pub const LABELS_EVERY: u32 = 30;

/// How a driver's sampling goes, as `GET /plugins` shows it.
#[derive(Clone, Debug, Default)]
pub struct Sampling {
    /// When its last good answer came.
    pub sampled_at: Option<SystemTime>,
    /// Its figures are withdrawn: no good answer for longer than the cache's
    /// maximum age (or its last answer broke the contract).
    pub stale: bool,
    /// Why the last attempt gave no sample, when it did not.
    pub last_error: Option<String>,
}

/// A device whose health its driver reported changed.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthChange {
    #[schema(value_type = u64)]
    #[serde(serialize_with = "unix_ms")]
    pub at: SystemTime,
    pub device: String,
    pub index: u32,
    pub from: &'static str,
    pub to: &'static str,
}

fn unix_ms<S: serde::Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(
        at.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

/// Health changes kept per driver (the newest).
const HEALTH_CHANGES_KEPT: usize = 32;

pub fn health_name(health: crate::runtime::bindings::driver_types::Health) -> &'static str {
    use crate::runtime::bindings::driver_types::Health;
    match health {
        Health::Healthy => "healthy",
        Health::Degraded => "degraded",
        Health::Unhealthy => "unhealthy",
        Health::Unknown => "unknown",
    }
}

pub struct SampleCache {
    snapshots: RwLock<HashMap<String, Snapshot>>,
    /// Each driver's latest device health changes, oldest first.
    health_changes: Mutex<HashMap<String, std::collections::VecDeque<HealthChange>>>,
    in_flight: Mutex<HashSet<String>>,
    /// Why each driver's last attempt failed, and whether its figures are withdrawn.
    failures: Mutex<HashMap<String, Failure>>,
    max_age: Duration,
}

#[derive(Default)]
struct Failure {
    last_error: Option<String>,
    withdrawn: bool,
}

impl SampleCache {
    /// A cache for drivers sampled every `interval`.
    pub fn new(interval: Duration) -> SampleCache {
        SampleCache {
            snapshots: RwLock::default(),
            health_changes: Mutex::default(),
            in_flight: Mutex::default(),
            failures: Mutex::default(),
            max_age: (interval * MISSED_INTERVALS).max(MIN_MAX_AGE),
        }
    }

    fn fresh(&self, snapshot: &Snapshot) -> bool {
        snapshot
            .at
            .elapsed()
            .map_or(true, |age| age <= self.max_age)
    }

    /// The driver's latest snapshot, if it is recent enough to be served.
    pub fn get(&self, driver: &str) -> Option<Snapshot> {
        crate::sync::read(&self.snapshots)
            .get(driver)
            .filter(|s| self.fresh(s))
            .cloned()
    }

    /// What `driver` reports now of its partition `partition`: none while its
    /// figures are stale or when it reports none. Read in place.
    pub fn instance(&self, driver: &str, partition: &str) -> Option<InstanceMetrics> {
        crate::sync::read(&self.snapshots)
            .get(driver)
            .filter(|s| self.fresh(s))?
            .metrics
            .instances
            .iter()
            .find(|i| i.partition_id == partition)
            .cloned()
    }

    /// What `driver` reports now of the partitions on its card `index` (none while
    /// its figures are stale).
    pub fn instances_on(&self, driver: &str, index: u32) -> Vec<InstanceMetrics> {
        crate::sync::read(&self.snapshots)
            .get(driver)
            .filter(|s| self.fresh(s))
            .map(|s| {
                s.metrics
                    .instances
                    .iter()
                    .filter(|i| i.device_index == index)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How the driver's sampling goes.
    pub fn sampling(&self, driver: &str) -> Sampling {
        let sampled_at = crate::sync::read(&self.snapshots).get(driver).map(|s| s.at);
        let failures = crate::sync::lock(&self.failures);
        let failure = failures.get(driver);
        Sampling {
            sampled_at,
            stale: self.get(driver).is_none() && (sampled_at.is_some() || failure.is_some()),
            last_error: failure.and_then(|f| f.last_error.clone()),
        }
    }

    pub fn put(&self, driver: &str, snapshot: Snapshot) {
        let mut snapshots = crate::sync::write(&self.snapshots);
        match snapshots.get_mut(driver) {
            Some(kept) => {
                self.note_health(driver, kept, &snapshot);
                *kept = snapshot;
            }
            None => {
                snapshots.insert(driver.to_string(), snapshot);
            }
        }
        drop(snapshots);
        if let Some(failure) = crate::sync::lock(&self.failures).remove(driver) {
            if failure.withdrawn {
                tracing::warn!(plugin = %driver, "driver answers again: its cards are back");
            }
        }
    }

    /// Logs and keeps the devices whose health changed between two samples.
    fn note_health(&self, driver: &str, before: &Snapshot, now: &Snapshot) {
        if Arc::ptr_eq(&before.devices, &now.devices) {
            return;
        }
        for device in now.devices.iter() {
            let Some(was) = before.devices.iter().find(|d| d.id == device.id) else {
                continue;
            };
            if was.health == device.health {
                continue;
            }
            let (from, to) = (health_name(was.health), health_name(device.health));
            if to == "healthy" {
                tracing::info!(plugin = %driver, device = %device.id, from, to, "device health changed");
            } else {
                tracing::warn!(plugin = %driver, device = %device.id, from, to, "device health changed");
            }
            let mut changes = crate::sync::lock(&self.health_changes);
            let kept = changes.entry(driver.to_string()).or_default();
            if kept.len() == HEALTH_CHANGES_KEPT {
                kept.pop_front();
            }
            kept.push_back(HealthChange {
                at: now.at,
                device: device.id.clone(),
                index: device.index,
                from,
                to,
            });
        }
    }

    /// The labels of `driver`'s last snapshot and their age, while they still hold
    /// for `devices` (the same devices, none changed) and are not too old.
    fn labels_for(&self, driver: &str, devices: &Arc<[Device]>) -> Option<(Labels, u32)> {
        let snapshots = crate::sync::read(&self.snapshots);
        let last = snapshots.get(driver)?;
        let same = Arc::ptr_eq(&last.devices, devices)
            || last.devices.len() == devices.len()
                && last.devices.iter().zip(devices.iter()).all(|(a, b)| {
                    a.id == b.id
                        && a.accelerator_type == b.accelerator_type
                        && a.memory_total_mib == b.memory_total_mib
                        && a.health == b.health
                });
        (same && last.labels_age + 1 < LABELS_EVERY)
            .then(|| (last.labels.clone(), last.labels_age + 1))
    }

    /// The driver's latest device health changes, oldest first.
    pub fn health_changes(&self, driver: &str) -> Vec<HealthChange> {
        crate::sync::lock(&self.health_changes)
            .get(driver)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Records a failed attempt. A broken answer withdraws the figures at once; any
    /// other failure leaves them until they are too old.
    fn failed(&self, driver: &str, error: &DriverFailure) {
        if matches!(error, DriverFailure::Contract(_)) {
            crate::sync::write(&self.snapshots).remove(driver);
        }
        crate::sync::lock(&self.failures)
            .entry(driver.to_string())
            .or_default()
            .last_error = Some(error.to_string());
        self.withdraw_if_stale(driver);
    }

    /// Logs, once, that a driver's figures are no longer served.
    fn withdraw_if_stale(&self, driver: &str) {
        // Read in place: this runs for every driver on every tick.
        let (sampled, fresh, cards) = crate::sync::read(&self.snapshots)
            .get(driver)
            .map_or((false, false, 0), |s| {
                (true, self.fresh(s), s.devices.len())
            });
        if fresh {
            return;
        }
        let mut failures = crate::sync::lock(&self.failures);
        // Never answered and never failed: not asked yet (the first tick comes before
        // the first sample), so nothing is withdrawn.
        if !sampled && failures.get(driver).is_none_or(|f| f.last_error.is_none()) {
            return;
        }
        let failure = failures.entry(driver.to_string()).or_default();
        if failure.withdrawn {
            return;
        }
        failure.withdrawn = true;
        tracing::warn!(
            plugin = %driver,
            cards,
            max_age_ms = self.max_age.as_millis() as u64,
            "driver has no current sample: its cards are withdrawn from the figures and from placement; last error: {}",
            failure.last_error.as_deref().unwrap_or("none: its call has not returned")
        );
    }

    /// Drops drivers that are no longer loaded.
    fn retain(&self, names: &HashSet<String>) {
        crate::sync::write(&self.snapshots).retain(|name, _| names.contains(name));
        crate::sync::lock(&self.health_changes).retain(|name, _| names.contains(name));
        crate::sync::lock(&self.failures).retain(|name, _| names.contains(name));
    }
}

/// What a sampling round asks of a driver. The server samples plugins
/// ([`Driver`]); the benchmark also samples the same driver code compiled natively,
/// so that both sides of its comparison pay the sampler's own work.
pub trait Sampled {
    /// A sample and the devices it belongs to (asked for again only when the
    /// driver's devices version says they changed).
    fn sample(&self) -> Result<Reading, DriverFailure>;
    fn labels(&self) -> Result<Vec<Label>, DriverFailure>;
    /// The driver says its devices are simulated.
    fn simulated(&self) -> bool;
}

impl Sampled for Driver {
    fn sample(&self) -> Result<Reading, DriverFailure> {
        Driver::sample(self)
    }
    fn labels(&self) -> Result<Vec<Label>, DriverFailure> {
        Driver::labels(self)
    }
    fn simulated(&self) -> bool {
        Driver::simulated(self)
    }
}

/// One sampling round of `driver`: its figures, its devices when they changed, and
/// its labels when they may have changed (`LABELS_EVERY`).
pub fn sample_one(
    name: &str,
    driver: &impl Sampled,
    cache: &SampleCache,
) -> Result<Snapshot, DriverFailure> {
    let Reading { devices, metrics } = driver.sample()?;
    let (labels, labels_age) = match cache.labels_for(name, &devices) {
        Some(kept) => kept,
        // Labels are not figures: a driver that publishes none (or fails to) still
        // has its cards counted, and selectors find nothing on them.
        None => {
            let labels = driver.labels().unwrap_or_else(|e| {
                tracing::debug!(plugin = %name, "no scheduling labels: {e}");
                Vec::new()
            });
            (labels.into_iter().map(|l| (l.key, l.value)).collect(), 0)
        }
    };
    Ok(Snapshot {
        simulated: driver.simulated(),
        devices,
        metrics,
        labels,
        labels_age,
        at: SystemTime::now(),
    })
}

/// Tells `driver` which process does the work of each of its partitions whose
/// models run in an inference worker (`processes`: the workers alive now), before
/// it is asked for figures, since a partition's usage is that of its process. The
/// driver itself is asked only when a partition's process changed.
fn bind_processes(name: &str, driver: &Driver, processes: &[(Arc<PartitionDevice>, u32)]) {
    for (partition, pid) in processes.iter().filter(|(p, _)| p.driver == name) {
        if let Err(e) = driver.bind_process(&partition.partition, *pid) {
            tracing::debug!(plugin = %name, partition = %partition.partition, pid, "the driver was not told the partition's process: {e}");
        }
    }
}

/// Samples every loaded driver once, now, on this thread (blocking): what start-up
/// needs before the periodic sampler has run.
pub fn sample_all_now(registry: &Registry, cache: &SampleCache) {
    let processes = registry.runtime().inference().worker_processes();
    for (name, driver) in registry.drivers() {
        bind_processes(&name, &driver, &processes);
        match sample_one(&name, driver.as_ref(), cache) {
            Ok(snapshot) => cache.put(&name, snapshot),
            Err(e) => {
                tracing::warn!(plugin = %name, "no sample at start: {e}");
                cache.failed(&name, &e);
            }
        }
    }
}

/// Samples every loaded driver each `interval` until the task is aborted.
pub fn spawn(
    registry: Arc<Registry>,
    cache: Arc<SampleCache>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            ticks.tick().await;
            let drivers = registry.drivers();
            cache.retain(&drivers.iter().map(|(name, _)| name.clone()).collect());
            let processes: Arc<[_]> = registry.runtime().inference().worker_processes().into();
            for (name, driver) in drivers {
                // A driver stuck in its previous sample is not asked again, but its
                // figures still age.
                cache.withdraw_if_stale(&name);
                if !crate::sync::lock(&cache.in_flight).insert(name.clone()) {
                    continue;
                }
                let (cache, processes) = (cache.clone(), processes.clone());
                tokio::task::spawn_blocking(move || {
                    bind_processes(&name, &driver, &processes);
                    match sample_one(&name, driver.as_ref(), &cache) {
                        Ok(snapshot) => cache.put(&name, snapshot),
                        // The supervisor or the contract check has logged the cause;
                        // the transition to "no figures" is logged by the cache.
                        Err(e) => {
                            tracing::debug!(plugin = %name, "no sample: {e}");
                            cache.failed(&name, &e);
                        }
                    }
                    crate::sync::lock(&cache.in_flight).remove(&name);
                });
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::supervisor::CallError;

    fn snapshot(age: Duration) -> Snapshot {
        Snapshot {
            simulated: false,
            devices: Arc::from([]),
            metrics: Metrics {
                cards: Vec::new(),
                instances: Vec::new(),
            },
            labels: Arc::from([]),
            labels_age: 0,
            at: SystemTime::now() - age,
        }
    }

    #[test]
    fn snapshots_older_than_a_few_intervals_are_not_served() {
        let cache = SampleCache::new(Duration::from_secs(2));
        cache.put("a", snapshot(Duration::from_secs(5)));
        assert!(cache.get("a").is_some());
        assert!(!cache.sampling("a").stale);
        cache.put("a", snapshot(Duration::from_secs(7)));
        assert!(cache.get("a").is_none());
        cache.failed(
            "a",
            &DriverFailure::Plugin(CallError::Timeout(Duration::from_secs(1))),
        );
        let sampling = cache.sampling("a");
        assert!(sampling.stale && sampling.sampled_at.is_some());
        assert!(sampling.last_error.unwrap().contains("deadline"));
        // A good answer clears the failure.
        cache.put("a", snapshot(Duration::ZERO));
        let sampling = cache.sampling("a");
        assert!(!sampling.stale && sampling.last_error.is_none());
    }

    #[test]
    fn a_driver_not_asked_yet_has_nothing_withdrawn() {
        let cache = SampleCache::new(Duration::from_secs(1));
        // The sampler's first tick comes before the first sample.
        cache.withdraw_if_stale("a");
        assert!(!crate::sync::lock(&cache.failures).contains_key("a"));
        assert!(!cache.sampling("a").stale);
        // A first call that fails withdraws it (there is nothing to serve).
        cache.failed(
            "a",
            &DriverFailure::Plugin(CallError::Timeout(Duration::from_secs(1))),
        );
        assert!(crate::sync::lock(&cache.failures)["a"].withdrawn);
        assert!(cache.sampling("a").stale);
    }

    #[test]
    fn the_floor_keeps_a_fast_sampler_from_flapping() {
        let cache = SampleCache::new(Duration::from_millis(50));
        cache.put("a", snapshot(Duration::from_millis(600)));
        assert!(cache.get("a").is_some());
    }
}
