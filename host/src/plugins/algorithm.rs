//! Algorithm plugins: a plugin is a template, a worker is one running instance of it
//! (a workload replica), and a session is one task's analysis inside a worker.
//!
//! Workers are supervised like drivers. Sessions survive a worker's crash: the
//! worker keeps each session's rules and reopens it in the new incarnation before
//! its next frame, so a task sees one failed frame, not a dead analysis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Resource, ResourceAny};
use wasmtime::{Engine, Store};

use super::supervisor::{lock, CallError, Incarnation, RestartPolicy, Status, Supervised};
use crate::runtime::bindings::analyzer::{AnalyzerError, Event, Rule};
use crate::runtime::bindings::{AlgorithmBindings, AlgorithmPre};
use crate::runtime::frames::Frame;
use crate::runtime::{Launch, PluginState, Sandbox};

/// What is needed to start workers of one algorithm plugin.
#[derive(Clone)]
pub struct AlgorithmPlugin {
    name: String,
    engine: Engine,
    sandbox: Sandbox,
    pre: AlgorithmPre,
    policy: RestartPolicy,
    timeout: Duration,
}

pub struct AlgorithmIncarnation {
    store: Store<PluginState>,
    bindings: AlgorithmBindings,
    /// The guest's session resources, by session id.
    sessions: HashMap<u64, ResourceAny>,
}

impl Incarnation for AlgorithmIncarnation {
    fn store(&mut self) -> &mut Store<PluginState> {
        &mut self.store
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AlgorithmFailure {
    #[error(transparent)]
    Plugin(#[from] CallError),
    #[error("analyzer error: {0}")]
    Analyzer(AnalyzerError),
    #[error("no session {0}")]
    NoSession(u64),
}

pub type SessionId = u64;

pub struct AlgorithmWorker {
    supervised: Supervised<AlgorithmIncarnation>,
    /// Execution providers its models have run on (`cpu`, `cuda`).
    providers: Arc<std::sync::Mutex<std::collections::BTreeSet<&'static str>>>,
    rules: Mutex<HashMap<SessionId, Vec<Rule>>>,
    next_session: AtomicU64,
}

impl AlgorithmPlugin {
    pub fn new(
        name: &str,
        engine: Engine,
        sandbox: Sandbox,
        pre: AlgorithmPre,
        policy: RestartPolicy,
        timeout: Duration,
    ) -> AlgorithmPlugin {
        AlgorithmPlugin {
            name: name.to_string(),
            engine,
            sandbox,
            pre,
            policy,
            timeout,
        }
    }

    /// A new worker with no environment or arguments; its instance starts on first
    /// use.
    pub fn spawn_worker(&self) -> Arc<AlgorithmWorker> {
        self.spawn_worker_with(Launch::default())
    }

    /// A new worker whose instances start with exactly `launch`'s environment and
    /// arguments.
    pub fn spawn_worker_with(&self, launch: Launch) -> Arc<AlgorithmWorker> {
        let mut template = self.clone();
        template.sandbox.launch = launch;
        // This worker's own record of the providers its models run on.
        template.sandbox.providers = Default::default();
        let providers = template.sandbox.providers.clone();
        let start = move || -> Result<AlgorithmIncarnation, CallError> {
            let mut store = template
                .sandbox
                .new_store(&template.engine)
                .map_err(|e| CallError::Start(format!("{e:#}")))?;
            PluginState::set_deadline(&mut store, std::time::Instant::now(), template.timeout);
            let bindings = template
                .pre
                .instantiate(&mut store)
                .map_err(|e| CallError::Start(format!("{e:#}")))?;
            Ok(AlgorithmIncarnation {
                store,
                bindings,
                sessions: HashMap::new(),
            })
        };
        Arc::new(AlgorithmWorker {
            providers,
            supervised: Supervised::new(
                &self.name,
                self.sandbox.calls.clone(),
                self.policy.clone(),
                self.timeout,
                start,
            ),
            rules: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
        })
    }
}

/// Opens `rules` as a session in this incarnation.
fn open_in(
    inc: &mut AlgorithmIncarnation,
    id: SessionId,
    rules: &[Rule],
) -> wasmtime::Result<Result<(), AnalyzerError>> {
    let opened = inc.bindings.open(&mut inc.store, rules)?;
    Ok(opened.map(|resource| {
        inc.sessions.insert(id, resource);
    }))
}

impl AlgorithmWorker {
    pub fn status(&self) -> Status {
        self.supervised.status()
    }

    /// Starts the worker's instance now (it would start on first use anyway).
    pub fn start(&self) -> Result<(), AlgorithmFailure> {
        self.supervised.call("start", |_| Ok(()))?;
        Ok(())
    }

    /// Starts a new instance if the last one crashed or could not start and its
    /// backoff has passed. Blocking.
    pub fn revive_if_due(&self) {
        self.supervised.revive_if_due();
    }

    fn revival_due(&self) -> bool {
        self.supervised.revival_due()
    }

    /// The execution providers this worker's models run on, e.g. `["cpu"]`;
    /// empty while it has loaded none.
    pub fn providers(&self) -> Vec<&'static str> {
        lock(&self.providers).iter().copied().collect()
    }

    /// How many sessions (tasks) the worker holds.
    pub fn sessions(&self) -> usize {
        lock(&self.rules).len()
    }

    /// Opens an analysis session with a task's rules; the plugin validates them.
    pub fn open_session(&self, rules: Vec<Rule>) -> Result<SessionId, AlgorithmFailure> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.supervised
            .call("session.open", |inc| open_in(inc, id, &rules))?
            .map_err(AlgorithmFailure::Analyzer)?;
        lock(&self.rules).insert(id, rules);
        Ok(id)
    }

    /// Runs one frame through a session. The frame is lent to the guest as a handle
    /// for the duration of the call; no pixels are copied unless the guest asks.
    pub fn process(
        &self,
        session: SessionId,
        frame: &Frame,
    ) -> Result<Vec<Event>, AlgorithmFailure> {
        let rules = lock(&self.rules)
            .get(&session)
            .cloned()
            .ok_or(AlgorithmFailure::NoSession(session))?;
        self.supervised
            .call("session.process", |inc| {
                if !inc.sessions.contains_key(&session) {
                    // First frame after a restart: reopen with the session's rules.
                    if let Err(e) = open_in(inc, session, &rules)? {
                        return Ok(Err(e));
                    }
                }
                let resource = inc.sessions[&session];
                let handle = inc.store.data_mut().table().push(frame.clone())?;
                let events = inc.bindings.process(
                    &mut inc.store,
                    resource,
                    Resource::new_borrow(handle.rep()),
                );
                // The frame handle goes whether or not the guest returned cleanly.
                inc.store.data_mut().table().delete(handle)?;
                events
            })?
            .map_err(AlgorithmFailure::Analyzer)
    }

    /// Ends a session and lets the guest free its state.
    pub fn close_session(&self, session: SessionId) -> Result<(), AlgorithmFailure> {
        if lock(&self.rules).remove(&session).is_none() {
            return Err(AlgorithmFailure::NoSession(session));
        }
        match self
            .supervised
            .call("session.close", |inc| match inc.sessions.remove(&session) {
                Some(resource) => resource.resource_drop(&mut inc.store),
                None => Ok(()),
            }) {
            // A worker that is down has no guest state left to free.
            Ok(()) | Err(CallError::Restarting(_)) | Err(CallError::Unhealthy(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// How often the keeper looks for workers to bring back.
const KEEPER_INTERVAL: Duration = Duration::from_millis(250);

/// Brings crashed workers, and workers that could not start, back on their
/// supervisor's schedule (its backoff and restart budget), like a kubelet: a
/// replica with no task to call it does not stay down. `workers` lists every live
/// worker (pods, service replicas, installed packages).
pub fn spawn_keeper(
    workers: impl Fn() -> Vec<Arc<AlgorithmWorker>> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(KEEPER_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            ticks.tick().await;
            for worker in workers().into_iter().filter(|w| w.revival_due()) {
                tokio::task::spawn_blocking(move || worker.revive_if_due());
            }
        }
    })
}
