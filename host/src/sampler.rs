//! Periodic sampling of every driver plugin into a cache.
//!
//! Request handlers read the cache; they never call a plugin. Each driver is
//! sampled on its own blocking thread, and a driver whose previous sample is still
//! running (a plugin stuck until its deadline) is skipped, so one slow driver
//! delays nobody else.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crate::plugins::driver::{Driver, DriverFailure};
use crate::plugins::Registry;
use crate::runtime::bindings::driver_types::{Device, Metrics};

/// The latest readings of one driver.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub devices: Vec<Device>,
    pub metrics: Metrics,
    pub at: SystemTime,
}

#[derive(Default)]
pub struct SampleCache {
    snapshots: RwLock<HashMap<String, Snapshot>>,
    in_flight: Mutex<HashSet<String>>,
}

impl SampleCache {
    pub fn get(&self, driver: &str) -> Option<Snapshot> {
        crate::sync::read(&self.snapshots).get(driver).cloned()
    }

    fn put(&self, driver: &str, snapshot: Snapshot) {
        crate::sync::write(&self.snapshots).insert(driver.to_string(), snapshot);
    }

    fn remove(&self, driver: &str) {
        crate::sync::write(&self.snapshots).remove(driver);
    }

    /// Drops drivers that are no longer loaded.
    fn retain(&self, names: &HashSet<String>) {
        crate::sync::write(&self.snapshots).retain(|name, _| names.contains(name));
    }
}

fn sample_one(driver: &Driver) -> Result<Snapshot, DriverFailure> {
    let devices = driver.devices()?;
    let metrics = driver.sample()?;
    Ok(Snapshot {
        devices,
        metrics,
        at: SystemTime::now(),
    })
}

/// Samples every loaded driver once, now, on this thread (blocking): what start-up
/// needs before the periodic sampler has run.
pub fn sample_all_now(registry: &Registry, cache: &SampleCache) {
    for (name, driver) in registry.drivers() {
        match sample_one(&driver) {
            Ok(snapshot) => cache.put(&name, snapshot),
            Err(e) => tracing::warn!(plugin = %name, "no sample at start: {e}"),
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
            for (name, driver) in drivers {
                if !crate::sync::lock(&cache.in_flight).insert(name.clone()) {
                    continue;
                }
                let cache = cache.clone();
                tokio::task::spawn_blocking(move || {
                    match sample_one(&driver) {
                        Ok(snapshot) => cache.put(&name, snapshot),
                        // A broken answer's figures are dropped, never mixed in (the
                        // driver logged why).
                        Err(DriverFailure::Contract(_)) => cache.remove(&name),
                        // The supervisor has logged crashes; a restarting or unhealthy
                        // driver simply has no fresh sample.
                        Err(e) => tracing::debug!(plugin = %name, "no sample: {e}"),
                    }
                    crate::sync::lock(&cache.in_flight).remove(&name);
                });
            }
        }
    })
}
