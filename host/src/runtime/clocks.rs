//! WASI monotonic-clock sleeps bounded by the current call's deadline.
//!
//! Epoch deadlines stop wasm code, not a guest blocked inside a host call, and the
//! one blocking host call a sandboxed plugin can make at will is a sleep
//! (`subscribe-duration`/`subscribe-instant`, then `poll`). These replacements of
//! the two subscribe functions look at the call in progress: a sleep that ends
//! before the call's deadline is left alone; one that would outlast it means the
//! call will miss its deadline anyway, so the guest is stopped at once (its epoch
//! deadline is moved to now: it traps at its next check, as a timeout). Outside a
//! call (no deadline) sleeps are left alone.

use std::time::{Duration, Instant};

use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime::StoreContextMut;
use wasmtime_wasi::p2::{subscribe, DynPollable, Pollable};
use wasmtime_wasi::HostMonotonicClock;

use super::PluginState;

/// The WASI version wasmtime-wasi registers its clocks under; the linker matches
/// guests' semver-compatible imports (e.g. 0.2.6) to it.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// The sandbox's monotonic clock: nanoseconds since the store was created. The
/// host keeps the origin, to turn `subscribe-instant` into a duration.
#[derive(Clone, Copy)]
pub struct SandboxClock {
    pub origin: Instant,
}

impl HostMonotonicClock for SandboxClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

struct Sleep(tokio::time::Instant);

#[wasmtime_wasi::async_trait]
impl Pollable for Sleep {
    async fn ready(&mut self) {
        tokio::time::sleep_until(self.0).await;
    }
}

/// Whether a sleep of `duration` would outlast the call's `deadline`.
fn outlasts(duration: Duration, deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|deadline| Instant::now() + duration > deadline)
}

fn sleep(table: &mut ResourceTable, duration: Duration) -> wasmtime::Result<Resource<DynPollable>> {
    // A duration too far ahead to represent sleeps "forever" (a year is forever here).
    let until = tokio::time::Instant::now()
        .checked_add(duration)
        .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600));
    let sleep = table.push(Sleep(until))?;
    subscribe(table, sleep)
}

/// A sleep of `duration`, unless it would outlast the call: then the guest is made
/// to trap at its next epoch check, and the sleep it gets back is empty.
fn subscribe_bounded(
    store: &mut StoreContextMut<'_, PluginState>,
    duration: Duration,
) -> wasmtime::Result<(Resource<DynPollable>,)> {
    let duration = if outlasts(duration, store.data().call_deadline) {
        store.set_epoch_deadline(0);
        Duration::ZERO
    } else {
        duration
    };
    Ok((sleep(store.data_mut().table(), duration)?,))
}

/// Replaces the WASI subscribe functions added by `wasmtime_wasi::p2::add_to_linker_sync`.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: StoreContextMut<'_, PluginState>, (nanos,): (u64,)| {
            subscribe_bounded(&mut store, Duration::from_nanos(nanos))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut store: StoreContextMut<'_, PluginState>, (when,): (u64,)| {
            let now = store.data().clock.now();
            subscribe_bounded(&mut store, Duration::from_nanos(when.saturating_sub(now)))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sleeps_past_the_deadline_inside_a_call_count() {
        let hour = Duration::from_secs(3600);
        assert!(!outlasts(hour, None));
        assert!(outlasts(
            hour,
            Some(Instant::now() + Duration::from_millis(100))
        ));
        assert!(outlasts(
            Duration::ZERO,
            Some(Instant::now() - Duration::from_secs(1))
        ));
        assert!(!outlasts(
            Duration::from_millis(1),
            Some(Instant::now() + hour)
        ));
    }
}
