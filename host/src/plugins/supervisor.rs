//! Supervision of one long-lived plugin instance (an "incarnation").
//!
//! Modelled on wasmCloud's plugin supervisor and Envoy's fail-and-reload: a trap, a
//! timeout or running out of memory poisons the incarnation, which is dropped. The
//! next call after a backoff (doubling, capped) starts a fresh one. More crashes than
//! the restart budget within the window mark the plugin unhealthy: it is no longer
//! called until an operator replaces it. Nothing a plugin does reaches further than
//! its own incarnation: the host, and every other plugin, carry on.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use wasmtime::Store;

use super::calls::CallStats;
use crate::runtime::PluginState;

/// Restart budget and backoff.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RestartPolicy {
    /// Crashes tolerated within `window-s`; one more marks the plugin unhealthy.
    pub max_restarts: u32,
    pub window_s: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 3,
            window_s: 60,
            backoff_initial_ms: 200,
            backoff_max_ms: 5000,
        }
    }
}

impl RestartPolicy {
    fn backoff(&self, crashes: usize) -> Duration {
        let exp = crashes.saturating_sub(1).min(20) as u32;
        let ms = self.backoff_initial_ms.saturating_mul(1u64 << exp);
        Duration::from_millis(ms.min(self.backoff_max_ms))
    }
}

/// A live instance of a plugin: its store and whatever the kind keeps beside it.
pub trait Incarnation: Send + 'static {
    fn store(&mut self) -> &mut Store<PluginState>;
}

/// Why a call did not return a value.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error("plugin trapped: {0}")]
    Trap(String),
    #[error("plugin call exceeded its {0:?} deadline")]
    Timeout(Duration),
    #[error("plugin exceeded its memory limit")]
    OutOfMemory,
    #[error("plugin failed to start: {0}")]
    Start(String),
    #[error("plugin is restarting; next attempt in {0:?}")]
    Restarting(Duration),
    #[error("plugin is unhealthy: {0}")]
    Unhealthy(String),
    #[error("plugin is busy: its current call has run for {0:?}")]
    Busy(Duration),
    /// A call stayed inside a host function far past its deadline: the instance was
    /// given up on (its thread stays until the host call returns) and replaced.
    #[error("plugin call stuck in a host call for {0:?}; the instance was abandoned")]
    Abandoned(Duration),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Health {
    /// Loaded; no incarnation started yet.
    Idle,
    Running,
    /// Crashed; a new incarnation starts after the backoff.
    Restarting {
        retry_in_ms: u64,
    },
    /// Its last start failed (instantiation or init): it is tried again after the
    /// backoff, and counts against the restart budget like a crash.
    StartFailed {
        retry_in_ms: u64,
    },
    /// Over its restart budget: not called again until replaced.
    Unhealthy {
        reason: String,
    },
}

#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Status {
    #[serde(flatten)]
    pub health: Health,
    pub restarts: u32,
    pub crashes: u32,
    pub last_error: Option<String>,
    #[serde(with = "unix_ms_opt")]
    #[schema(value_type = Option<u64>)]
    pub last_crash: Option<SystemTime>,
    /// When the next incarnation may start (while restarting).
    #[serde(skip)]
    retry_at: Option<Instant>,
}

/// What an instance is doing, as the APIs that show replicas (B.7 pods, F.5
/// replicas, I.6 packages) put it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not started yet.
    Starting,
    Running,
    /// Crashed; a new instance starts after the backoff.
    Restarting,
    /// Cannot start, or over its restart budget.
    Failed,
}

impl Status {
    pub fn phase(&self) -> Phase {
        match self.health {
            Health::Idle => Phase::Starting,
            Health::Running => Phase::Running,
            Health::Restarting { .. } => Phase::Restarting,
            Health::StartFailed { .. } | Health::Unhealthy { .. } => Phase::Failed,
        }
    }

    /// One line on what the instance is doing and, when it is not running, why.
    pub fn describe(&self) -> String {
        let last = self.last_error.as_deref().unwrap_or("a crash");
        match &self.health {
            Health::Idle => "starting".into(),
            Health::Running => "running".into(),
            Health::Restarting { retry_in_ms } => {
                format!("restarting in {retry_in_ms} ms after: {last}")
            }
            Health::StartFailed { retry_in_ms } => {
                format!("cannot start (next attempt in {retry_in_ms} ms): {last}")
            }
            Health::Unhealthy { reason } => format!("given up: {reason}"),
        }
    }
}

mod unix_ms_opt {
    use std::time::{SystemTime, UNIX_EPOCH};
    pub fn serialize<S: serde::Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }
}

/// One call into an incarnation at a time. A caller waits for its turn no longer
/// than the plugin's timeout: a call wedged inside a host function (which no epoch
/// deadline interrupts) must not wedge every caller behind it. Past
/// `abandon_after`, the wedged call's turn is taken from it: the gate opens to a
/// new generation, and the stuck call, when it comes back, finds it is no longer
/// the current one.
struct Gate {
    state: Mutex<GateState>,
    freed: Condvar,
}

#[derive(Default)]
struct GateState {
    busy_since: Option<Instant>,
    /// Callers waiting for their turn: with none, leaving needs no wake-up (a
    /// notify is a futex syscall even when nobody waits).
    waiting: u32,
    /// Bumped when a stuck call's turn is taken from it.
    generation: u64,
}

struct Ticket<'a> {
    gate: &'a Gate,
    generation: u64,
    /// When the turn began: the call's deadline counts from here.
    entered: Instant,
    /// The previous call was stuck this long and has been abandoned.
    abandoned: Option<Duration>,
}

impl Gate {
    /// Waits at most `wait` from `now` for the turn. The clock is read again only
    /// where the turn was busy: an uncontended call reads it once, in its caller.
    fn enter(
        &self,
        now: Instant,
        wait: Duration,
        abandon_after: Duration,
    ) -> Result<Ticket<'_>, Duration> {
        let give_up = now + wait;
        let mut entered = now;
        let mut state = lock(&self.state);
        let mut abandoned = None;
        while let Some(since) = state.busy_since {
            let now = Instant::now();
            entered = now;
            if now - since >= abandon_after {
                state.generation += 1;
                state.busy_since = None;
                abandoned = Some(now - since);
                break;
            }
            if now >= give_up {
                return Err(now - since);
            }
            state.waiting += 1;
            state = self
                .freed
                .wait_timeout(state, give_up - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
            state.waiting -= 1;
            entered = Instant::now();
        }
        state.busy_since = Some(entered);
        Ok(Ticket {
            gate: self,
            generation: state.generation,
            entered,
            abandoned,
        })
    }

    fn generation(&self) -> u64 {
        lock(&self.state).generation
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.gate.state);
        // An abandoned call's turn belongs to another caller now.
        if state.generation != self.generation {
            return;
        }
        state.busy_since = None;
        if state.waiting > 0 {
            self.gate.freed.notify_one();
        }
    }
}

struct Inner<I> {
    incarnation: Option<I>,
    crashes: VecDeque<Instant>,
    retry_at: Option<Instant>,
    unhealthy: Option<String>,
    ever_started: bool,
}

type StartFn<I> = Box<dyn Fn() -> Result<I, CallError> + Send + Sync>;

pub struct Supervised<I: Incarnation> {
    plugin: String,
    /// The plugin's call figures, shared by all its instances.
    calls: Arc<CallStats>,
    policy: RestartPolicy,
    timeout: Duration,
    start: StartFn<I>,
    gate: Gate,
    inner: Mutex<Inner<I>>,
    /// Kept apart from `inner` so that reading it never waits for a running call.
    status: Mutex<Status>,
    /// A revival (`revive_if_due`) is under way.
    reviving: std::sync::atomic::AtomicBool,
}

impl<I: Incarnation> Supervised<I> {
    /// `start` builds a new incarnation (instantiate, then any init the kind needs).
    pub fn new(
        plugin: &str,
        calls: Arc<CallStats>,
        policy: RestartPolicy,
        timeout: Duration,
        start: impl Fn() -> Result<I, CallError> + Send + Sync + 'static,
    ) -> Self {
        Supervised {
            plugin: plugin.to_string(),
            calls,
            policy,
            timeout,
            start: Box::new(start),
            gate: Gate {
                state: Mutex::new(GateState::default()),
                freed: Condvar::new(),
            },
            inner: Mutex::new(Inner {
                incarnation: None,
                crashes: VecDeque::new(),
                retry_at: None,
                unhealthy: None,
                ever_started: false,
            }),
            status: Mutex::new(Status {
                health: Health::Idle,
                restarts: 0,
                crashes: 0,
                last_error: None,
                last_crash: None,
                retry_at: None,
            }),
            reviving: false.into(),
        }
    }

    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    pub fn status(&self) -> Status {
        let mut status = lock(&self.status).clone();
        if let Some(at) = status.retry_at {
            let retry_in_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64;
            match &mut status.health {
                Health::Restarting { retry_in_ms: ms }
                | Health::StartFailed { retry_in_ms: ms } => *ms = retry_in_ms,
                _ => {}
            }
        }
        status
    }

    /// No incarnation runs, the plugin is not given up on, and the backoff has
    /// passed. Never waits for a running call.
    pub fn revival_due(&self) -> bool {
        let status = lock(&self.status);
        matches!(
            status.health,
            Health::Restarting { .. } | Health::StartFailed { .. }
        ) && status.retry_at.is_none_or(|at| at <= Instant::now())
            && !self.reviving.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Starts a new incarnation if none runs and the backoff has passed: a crashed
    /// or never-started instance comes back on the supervisor's schedule, not only
    /// when someone calls it. Blocking; a no-op while another revival runs.
    pub fn revive_if_due(&self) {
        if !self.revival_due()
            || self
                .reviving
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        // Errors are recorded in the status by the call itself.
        let _ = self.call("start", |_| Ok(()));
        self.reviving
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// How long a call may stay in a host function past its deadline before its
    /// instance is given up on: twice the deadline, and a second of grace.
    fn abandon_after(&self) -> Duration {
        self.timeout * 2 + Duration::from_secs(1)
    }

    /// Runs `f` against the live incarnation, starting one first if needed, with the
    /// call deadline armed. Any error out of `f` poisons the incarnation.
    ///
    /// The incarnation is taken out of `inner` for the call, so that a call stuck in
    /// a host function holds only its own instance: past `abandon_after`, the next
    /// caller counts it as a crash and starts a fresh one.
    /// Calls `function` (its name, for the call figures) through `f`.
    pub fn call<R>(
        &self,
        function: &'static str,
        f: impl FnOnce(&mut I) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let started = Instant::now();
        let result = self.call_unrecorded(started, f);
        self.calls
            .record(function, started.elapsed(), result.as_ref().map(|_| ()));
        result
    }

    fn call_unrecorded<R>(
        &self,
        started: Instant,
        f: impl FnOnce(&mut I) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let turn = self
            .gate
            .enter(started, self.timeout, self.abandon_after())
            .map_err(|busy_for| {
                if busy_for > self.timeout * 2 {
                    tracing::warn!(plugin = %self.plugin, busy_ms = busy_for.as_millis() as u64, "plugin call is far past its deadline: blocked in a host call");
                }
                CallError::Busy(busy_for)
            })?;
        let mut inner = lock(&self.inner);
        if let Some(stuck_for) = turn.abandoned {
            // The stuck call holds its incarnation; `inner` has none to give.
            inner.incarnation = None;
            self.crashed(&mut inner, &CallError::Abandoned(stuck_for));
        }
        if let Some(reason) = &inner.unhealthy {
            return Err(CallError::Unhealthy(reason.clone()));
        }
        // The call's time counts from its turn, or from after a start it waited for.
        let mut began = turn.entered;
        if inner.incarnation.is_none() {
            if let Some(at) = inner.retry_at {
                let now = Instant::now();
                if now < at {
                    return Err(CallError::Restarting(at - now));
                }
            }
            let start = (self.start)();
            began = Instant::now();
            match start {
                Ok(incarnation) => {
                    inner.incarnation = Some(incarnation);
                    inner.retry_at = None;
                    let mut status = lock(&self.status);
                    if inner.ever_started {
                        status.restarts += 1;
                        tracing::info!(plugin = %self.plugin, restarts = status.restarts, "plugin restarted");
                    }
                    inner.ever_started = true;
                    status.health = Health::Running;
                    status.retry_at = None;
                }
                Err(e) => {
                    self.crashed(&mut inner, &e);
                    return Err(e);
                }
            }
        }
        let Some(mut incarnation) = inner.incarnation.take() else {
            return Err(CallError::Start("no instance after a start".into()));
        };
        drop(inner);
        let store = incarnation.store();
        PluginState::set_deadline(store, began, self.timeout);
        store.data_mut().limiter.denied = false;
        let result = f(&mut incarnation);
        let mut inner = lock(&self.inner);
        if self.gate.generation() != turn.generation {
            // Given up on while it was stuck: a new incarnation (or its backoff)
            // has taken over; this one is dropped now that its call is back.
            tracing::info!(plugin = %self.plugin, "an abandoned plugin call returned; its instance is dropped");
            return result.map_err(|e| classify(e, incarnation.store(), self.timeout));
        }
        match result {
            Ok(value) => {
                inner.incarnation = Some(incarnation);
                Ok(value)
            }
            Err(error) => {
                let error = classify(error, incarnation.store(), self.timeout);
                drop(incarnation);
                self.crashed(&mut inner, &error);
                Err(error)
            }
        }
    }

    fn crashed(&self, inner: &mut Inner<I>, error: &CallError) {
        let now = Instant::now();
        let window = Duration::from_secs(self.policy.window_s);
        inner.crashes.push_back(now);
        while inner
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            inner.crashes.pop_front();
        }
        let mut status = lock(&self.status);
        status.crashes += 1;
        status.last_error = Some(error.to_string());
        status.last_crash = Some(SystemTime::now());
        if inner.crashes.len() > self.policy.max_restarts as usize {
            let reason = format!(
                "{} crashes within {}s, last: {error}",
                inner.crashes.len(),
                self.policy.window_s
            );
            tracing::error!(plugin = %self.plugin, "plugin marked unhealthy: {reason}");
            status.health = Health::Unhealthy {
                reason: reason.clone(),
            };
            inner.unhealthy = Some(reason);
        } else {
            let backoff = self.policy.backoff(inner.crashes.len());
            tracing::warn!(plugin = %self.plugin, backoff_ms = backoff.as_millis() as u64, "plugin crashed: {error}; restarting after backoff");
            inner.retry_at = Some(now + backoff);
            status.retry_at = inner.retry_at;
            let retry_in_ms = backoff.as_millis() as u64;
            status.health = if matches!(error, CallError::Start(_)) {
                Health::StartFailed { retry_in_ms }
            } else {
                Health::Restarting { retry_in_ms }
            };
        }
    }
}

/// Turns the error out of a guest call into what happened, with the plugin's last
/// stderr lines (where a Rust panic message lands) for context.
fn classify(
    error: wasmtime::Error,
    store: &mut Store<PluginState>,
    timeout: Duration,
) -> CallError {
    if store.data().limiter.denied {
        return CallError::OutOfMemory;
    }
    if let Some(wasmtime::Trap::Interrupt) = error.downcast_ref::<wasmtime::Trap>() {
        return CallError::Timeout(timeout);
    }
    let stderr = store.data().stderr_tail();
    let reason = trap_reason(&error);
    if stderr.is_empty() {
        CallError::Trap(reason)
    } else {
        CallError::Trap(format!("{reason} (stderr: {stderr})"))
    }
}

/// Longest trap reason kept (a deep wasm backtrace can run to many kilobytes).
const MAX_REASON: usize = 4096;

/// What trapped, and where: wasmtime's message is "error while executing at wasm
/// backtrace: <frames>" with the cause (the trap code, or a host error) in the
/// error's chain. Both are kept, on one line, the cause first.
fn trap_reason(error: &wasmtime::Error) -> String {
    let cause = error
        .downcast_ref::<wasmtime::Trap>()
        .map(|trap| trap.to_string())
        .or_else(|| error.chain().last().map(|e| e.to_string()))
        .unwrap_or_default();
    let context: Vec<String> = error
        .chain()
        .map(|e| e.to_string())
        .filter(|e| *e != cause)
        .collect();
    let mut reason = cause;
    if !context.is_empty() {
        reason.push_str(" (");
        reason.push_str(
            &context
                .join(": ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        );
        reason.push(')');
    }
    if reason.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push_str(" [truncated]");
    }
    reason
}

pub(crate) use crate::sync::lock;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let policy = RestartPolicy {
            max_restarts: 3,
            window_s: 60,
            backoff_initial_ms: 100,
            backoff_max_ms: 250,
        };
        assert_eq!(policy.backoff(1), Duration::from_millis(100));
        assert_eq!(policy.backoff(2), Duration::from_millis(200));
        assert_eq!(policy.backoff(3), Duration::from_millis(250));
        assert_eq!(policy.backoff(64), Duration::from_millis(250));
    }
}
