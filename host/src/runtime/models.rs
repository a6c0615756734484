//! The process's model sessions: one ONNX Runtime session per model (by content
//! hash) shared by every plugin instance that loads it, sessions built off the
//! plugin's call path, and runs stopped at their caller's deadline.
//!
//! Why: a session is tens of megabytes and, without a global pool, its own threads.
//! A plugin that called `model.load` in a loop used to get a session per call and
//! took the machine down (10,000 threads). Now a load of a model already loaded is a
//! lookup; a load still building is waited for no longer than the call's deadline
//! (the build goes on, and the next load picks it up); at most `MAX_BUILDING`
//! builds run at once, each allowed `[plugin-limits] model-load-timeout-ms`. Runs
//! are armed with ONNX Runtime's terminate flag, which a watchdog thread sets at the
//! deadline, so a model that would run for a minute gives its worker back.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ort::session::{RunOptions, Session};

use super::batching::{Batching, Combiner};
use super::bindings::wit_inference::InferenceError;
use super::inference::Provider;
use super::worker::Worker;
use crate::plugins::calls::Latency;
use crate::sync::lock;

/// Loader threads alive at once, process-wide, abandoned ones included: each is busy
/// for as long as its model takes to optimise, and cannot be stopped. Past it, loads
/// of new models answer "load it again later".
const MAX_BUILDING: usize = 2;

/// How long a build's failure is remembered: a plugin retrying a bad model in a loop
/// gets the same answer instead of a new build each time.
const FAILURE_MEMORY: Duration = Duration::from_secs(30);

/// A session nobody holds stays cached this long (a plugin restarting reloads it).
const IDLE_KEEP: Duration = Duration::from_secs(60);

/// Where a model's session lives.
pub enum Backend {
    /// In this process.
    InProcess(Mutex<Session>),
    /// In its partition's worker process (`worker`), one input at a time.
    Worker(Remote),
}

/// A model loaded into a worker: the worker, the model's name there, and its bytes
/// and load timeout (it is loaded again into a worker that was restarted).
pub struct Remote {
    pub worker: Arc<Worker>,
    pub key: String,
    pub bytes: Arc<[u8]>,
    pub load_timeout: Duration,
}

/// A loaded model, shared by every instance that loaded the same file.
pub struct SharedModel {
    pub provider: Provider,
    pub input: String,
    /// The input's declared shape (-1 where dynamic).
    pub input_shape: Vec<i64>,
    pub backend: Backend,
    pub batching: Batching,
    /// Runs waiting to be batched, when the model batches (its input and every
    /// output have a dynamic first dimension, it runs on an accelerator in this
    /// process, and batching is on).
    pub combiner: Option<Combiner>,
    /// Session runs, and the requests they served (more requests than runs: batches).
    pub runs: AtomicU64,
    pub requests: AtomicU64,
    /// How long its runs took.
    pub latency: Mutex<Latency>,
}

impl SharedModel {
    pub fn new(
        provider: Provider,
        input: String,
        input_shape: Vec<i64>,
        backend: Backend,
        batchable: bool,
        batching: Batching,
    ) -> SharedModel {
        SharedModel {
            provider,
            input,
            input_shape,
            backend,
            batching,
            combiner: (batchable
                && batching.max > 1
                && (provider != Provider::Cpu || batching.on_cpu))
                .then(Combiner::default),
            runs: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            latency: Mutex::new(Latency::default()),
        }
    }
}

enum Slot {
    Building {
        since: Instant,
    },
    Ready {
        model: Arc<SharedModel>,
        idle_since: Instant,
    },
    Failed {
        error: InferenceError,
        at: Instant,
    },
}

/// Builds a session from model bytes (the inference backend's job).
pub type Build = Box<dyn FnOnce() -> Result<SharedModel, InferenceError> + Send>;

#[derive(Default)]
pub struct ModelCache {
    state: Mutex<State>,
    settled: Condvar,
}

#[derive(Default)]
struct State {
    slots: HashMap<String, Slot>,
    /// Loader threads still running, abandoned builds included.
    loaders: usize,
}

impl ModelCache {
    /// The model whose bytes hash to `key`: the cached session, or one built by
    /// `build` on a loader thread. Waits for a build until `wait_until`; a build
    /// past `build_timeout` is abandoned: its failure is the answer from then on (its
    /// thread cannot be stopped; it still counts against `MAX_BUILDING`, and a
    /// session it does produce in the end is kept).
    pub fn get_or_build(
        self: &Arc<Self>,
        key: &str,
        build: impl FnOnce() -> Build,
        wait_until: Instant,
        build_timeout: Duration,
    ) -> Result<Arc<SharedModel>, InferenceError> {
        let mut build = Some(build);
        let mut state = lock(&self.state);
        Self::sweep(&mut state.slots);
        loop {
            let loaders = state.loaders;
            let slot = state.slots.get_mut(key);
            match slot {
                Some(Slot::Ready { model, .. }) => return Ok(model.clone()),
                Some(Slot::Failed { error, .. }) => return Err(error.clone()),
                Some(Slot::Building { since }) => {
                    let building = since.elapsed();
                    if building > build_timeout {
                        let error = InferenceError::Runtime(format!(
                            "the model was still loading after {} s, past the limit \
                             ([plugin-limits] model-load-timeout-ms): abandoned",
                            building.as_secs(),
                        ));
                        tracing::warn!("model load abandoned: {error:?}");
                        if let Some(slot) = state.slots.get_mut(key) {
                            *slot = Slot::Failed {
                                error: error.clone(),
                                at: Instant::now(),
                            };
                        }
                        return Err(error);
                    }
                    let now = Instant::now();
                    if now >= wait_until {
                        return Err(InferenceError::Runtime(format!(
                            "the model is still loading ({} ms so far); load it again later",
                            building.as_millis()
                        )));
                    }
                    state = self
                        .settled
                        .wait_timeout(state, wait_until - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                None => {
                    if loaders >= MAX_BUILDING {
                        return Err(InferenceError::Runtime(format!(
                            "{loaders} models are loading already; load it again later"
                        )));
                    }
                    // This arm runs once: the slot it fills is `Building` from now on.
                    let Some(build) = build.take() else {
                        return Err(InferenceError::Runtime("model load raced itself".into()));
                    };
                    state.slots.insert(
                        key.to_string(),
                        Slot::Building {
                            since: Instant::now(),
                        },
                    );
                    let job = build();
                    let cache = self.clone();
                    let owned_key = key.to_string();
                    let spawned =
                        std::thread::Builder::new()
                            .name("model-load".into())
                            .spawn(move || {
                                let result = job();
                                let mut state = lock(&cache.state);
                                state.loaders -= 1;
                                let now = Instant::now();
                                let slot = match result {
                                    Ok(model) => Slot::Ready {
                                        model: Arc::new(model),
                                        idle_since: now,
                                    },
                                    Err(error) => Slot::Failed { error, at: now },
                                };
                                state.slots.insert(owned_key, slot);
                                cache.settled.notify_all();
                            });
                    match spawned {
                        Ok(_) => state.loaders += 1,
                        Err(e) => {
                            state.slots.remove(key);
                            return Err(InferenceError::Runtime(format!(
                                "cannot start a model loader thread: {e}"
                            )));
                        }
                    }
                }
            }
        }
    }

    /// Forgets remembered failures and sessions nobody has held for a while.
    fn sweep(slots: &mut HashMap<String, Slot>) {
        slots.retain(|_, slot| match slot {
            Slot::Building { .. } => true,
            Slot::Failed { at, .. } => at.elapsed() < FAILURE_MEMORY,
            Slot::Ready { model, idle_since } => {
                if Arc::strong_count(model) > 1 {
                    *idle_since = Instant::now();
                    true
                } else {
                    idle_since.elapsed() < IDLE_KEEP
                }
            }
        });
    }

    /// The sessions built, by key (model hash @ device).
    pub fn ready(&self) -> Vec<(String, Arc<SharedModel>)> {
        lock(&self.state)
            .slots
            .iter()
            .filter_map(|(key, slot)| match slot {
                Slot::Ready { model, .. } => Some((key.clone(), model.clone())),
                _ => None,
            })
            .collect()
    }

    /// Sessions alive in the cache (for tests and diagnostics).
    pub fn sessions(&self) -> usize {
        lock(&self.state)
            .slots
            .values()
            .filter(|s| matches!(s, Slot::Ready { .. }))
            .count()
    }
}

/// Sets the terminate flag of runs that pass their deadline. One thread for the
/// process, started with the first run.
pub struct Watchdog {
    armed: Mutex<Vec<(Instant, u64, Arc<RunOptions>)>>,
    changed: Condvar,
    next: std::sync::atomic::AtomicU64,
}

/// Disarms its run when dropped.
pub struct Armed {
    id: u64,
}

impl Drop for Armed {
    fn drop(&mut self) {
        let watchdog = Watchdog::get();
        lock(&watchdog.armed).retain(|(_, id, _)| *id != self.id);
    }
}

impl Watchdog {
    fn get() -> &'static Watchdog {
        static WATCHDOG: OnceLock<&'static Watchdog> = OnceLock::new();
        WATCHDOG.get_or_init(|| {
            let watchdog: &'static Watchdog = Box::leak(Box::new(Watchdog {
                armed: Mutex::new(Vec::new()),
                changed: Condvar::new(),
                next: 0.into(),
            }));
            let spawned = std::thread::Builder::new()
                .name("inference-watchdog".into())
                .spawn(move || watchdog.watch());
            if let Err(e) = spawned {
                tracing::error!("cannot start the inference watchdog: {e}; runs will not be stopped at their deadline");
            }
            watchdog
        })
    }

    /// Terminates `options`' run at `deadline` unless the returned guard is dropped first.
    pub fn arm(deadline: Instant, options: Arc<RunOptions>) -> Armed {
        let watchdog = Watchdog::get();
        let id = watchdog
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&watchdog.armed).push((deadline, id, options));
        watchdog.changed.notify_one();
        Armed { id }
    }

    fn watch(&self) {
        let mut armed = lock(&self.armed);
        loop {
            let now = Instant::now();
            armed.retain(|(deadline, _, options)| {
                if *deadline <= now {
                    if let Err(e) = options.terminate() {
                        tracing::error!("cannot stop an inference run at its deadline: {e}");
                    }
                    false
                } else {
                    true
                }
            });
            let next = armed.iter().map(|(deadline, _, _)| *deadline).min();
            armed = match next {
                None => self.changed.wait(armed).unwrap_or_else(|p| p.into_inner()),
                Some(at) => {
                    self.changed
                        .wait_timeout(armed, at.saturating_duration_since(now))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing(message: &'static str, delay: Duration) -> impl FnOnce() -> Build {
        move || {
            Box::new(move || {
                std::thread::sleep(delay);
                Err(InferenceError::InvalidModel(message.into()))
            })
        }
    }

    #[test]
    fn a_slow_build_is_not_waited_for_past_the_deadline_and_not_started_twice() {
        let cache = Arc::new(ModelCache::default());
        let soon = || Instant::now() + Duration::from_millis(50);
        let timeout = Duration::from_secs(60);
        let started = Instant::now();
        let first = cache.get_or_build(
            "m",
            failing("bad", Duration::from_millis(300)),
            soon(),
            timeout,
        );
        assert!(started.elapsed() < Duration::from_millis(250));
        match first {
            Err(InferenceError::Runtime(m)) => assert!(m.contains("still loading"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
        // A second load while it builds starts nothing new: `build` would panic.
        let second = cache.get_or_build("m", || panic!("built twice"), soon(), timeout);
        assert!(matches!(second, Err(InferenceError::Runtime(_))));
        // Once it settles, its failure is the answer, without a new build.
        let later = Instant::now() + Duration::from_secs(5);
        let third = cache.get_or_build("m", || panic!("built twice"), later, timeout);
        assert!(matches!(third, Err(InferenceError::InvalidModel(m)) if m == "bad"));
    }

    #[test]
    fn builds_at_once_are_bounded() {
        let cache = Arc::new(ModelCache::default());
        let now = Instant::now;
        let timeout = Duration::from_secs(60);
        for key in ["a", "b"] {
            let _ = cache.get_or_build(
                key,
                failing("x", Duration::from_millis(500)),
                now(),
                timeout,
            );
        }
        match cache.get_or_build("c", || panic!("over the bound"), now(), timeout) {
            Err(InferenceError::Runtime(m)) => assert!(m.contains("loading already"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
    }
}
