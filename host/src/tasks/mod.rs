//! Video-analysis tasks (Appendix G).
//!
//! A task's rules are opened as a session on the least-loaded worker of its service:
//! the algorithm plugin validates them there. Its pipeline (`crate::pipeline`) then
//! reads the stream and feeds the session frames; the task's status is what the
//! pipeline reports: PENDING until the first frame (and while reconnecting, saying
//! so), RUNNING while frames flow, PAUSED after a pause (decoding stopped),
//! FINISHED when a finite source ends, ERROR with the reason. Events go to the
//! rules' destinations through the durable outbox.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock, Weak};

use serde::{Deserialize, Serialize};

pub mod events;
pub mod spec;

use crate::error::{Error, Result};
use crate::pipeline::decode::{Hwaccel, Settings};
use crate::pipeline::deliver::Outbox;
use crate::pipeline::source::Source;
use crate::pipeline::{Analyse, Pipeline, Report, State};
use crate::plugins::algorithm::{AlgorithmFailure, AlgorithmWorker, SessionId};
use crate::runtime::bindings::analyzer::{self, AnalyzerError, Event};
use crate::runtime::frames::Frame;
use crate::services::{ServiceStatus, Services};
use crate::store::{Store, Table};
use spec::{AreaParam, AreaType, RestartPolicy, TaskCreateRequest, TaskInfo};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatus {
    Pending,
    Running,
    Paused,
    Finished,
    Error,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub algo_service_id: String,
    pub restart_policy: RestartPolicy,
    pub task_info: TaskInfo,
    pub status: TaskStatus,
    pub status_desc: String,
    pub created_ms: u64,
    /// The last times its service's replica was moved to another card, oldest first.
    #[serde(default)]
    pub moves: Vec<ReplicaMove>,
}

/// A task's replica moved off a card (it turned unhealthy).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReplicaMove {
    pub at_ms: u64,
    /// The cards, as `driver/index`.
    pub from: String,
    pub to: String,
    pub reason: String,
}

/// Moves a task's detail keeps.
const MOVES_KEPT: usize = 8;

/// How tasks reach video.
#[derive(Clone, Debug)]
pub struct VideoOptions {
    /// The ffmpeg binary (a name is looked up on PATH).
    pub ffmpeg: PathBuf,
    pub hwaccel: HwaccelMode,
    /// Pipelines running at once, at most.
    pub max_running_tasks: usize,
}

/// Which decoder tasks try first (`[video] hwaccel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HwaccelMode {
    Auto,
    None,
    Cuda,
    Vaapi,
}

/// The DRM render node VA-API decodes on.
const RENDER_NODE: &str = "/dev/dri/renderD128";

impl HwaccelMode {
    /// The decoder for a replica on `card` (driver, index) of `xpu_type`. NVDEC is
    /// addressed by CUDA ordinal, which `runtime::cuda` maps cards to; a card in
    /// MIG mode has none, and its streams are decoded on the CPU.
    fn choose(self, card: Option<(&str, u32)>, xpu_type: &str) -> Option<Hwaccel> {
        let cuda =
            |index| crate::runtime::cuda::ordinal(index).map(|device| Hwaccel::Cuda { device });
        let vaapi = || Hwaccel::Vaapi {
            device: PathBuf::from(RENDER_NODE),
        };
        match self {
            HwaccelMode::None => None,
            HwaccelMode::Cuda => cuda(card.map_or(0, |c| c.1)),
            HwaccelMode::Vaapi => Some(vaapi()),
            HwaccelMode::Auto => match card {
                Some((_, index)) if xpu_type.to_ascii_uppercase().starts_with("NVIDIA") => {
                    cuda(index)
                }
                _ if std::path::Path::new(RENDER_NODE).exists() => Some(vaapi()),
                _ => None,
            },
        }
    }
}

/// A task and its search record (G.17) rendered once, when the task is written:
/// a search copies JSON instead of building and serialising views.
pub struct Stored {
    pub record: Arc<TaskRecord>,
    /// Shared with the pages that carry it: a search copies pointers.
    pub summary: Arc<serde_json::value::RawValue>,
}

/// Renders a task's search record; the wire layer supplies it, so that this
/// module need not know the wire format.
pub type RenderSummary = fn(&TaskRecord) -> Arc<serde_json::value::RawValue>;

impl Stored {
    fn new(record: TaskRecord, render: RenderSummary) -> Stored {
        Stored {
            summary: render(&record),
            record: Arc::new(record),
        }
    }
}

/// Write access to the tasks; rebuilds the search index when dropped.
struct Writing<'a> {
    tasks: &'a Tasks,
    state: std::sync::RwLockWriteGuard<'a, Vec<Stored>>,
}

impl std::ops::Deref for Writing<'_> {
    type Target = Vec<Stored>;
    fn deref(&self) -> &Vec<Stored> {
        &self.state
    }
}

impl std::ops::DerefMut for Writing<'_> {
    fn deref_mut(&mut self) -> &mut Vec<Stored> {
        &mut self.state
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        *crate::sync::write(&self.tasks.index) = Index::of(&self.state);
    }
}

/// What a search (G.6) asks for.
#[derive(Default)]
pub struct Filter<'a> {
    pub id: Option<&'a str>,
    pub service: Option<&'a str>,
    pub event_type: Option<&'a str>,
}

#[derive(Default)]
struct Index {
    by_event: HashMap<String, Vec<usize>>,
    by_service: HashMap<String, Vec<usize>>,
}

impl Index {
    fn of(tasks: &[Stored]) -> Index {
        let mut index = Index::default();
        for (position, stored) in tasks.iter().enumerate() {
            let task = &stored.record;
            index
                .by_service
                .entry(task.algo_service_id.clone())
                .or_default()
                .push(position);
            let mut events: Vec<&str> = task
                .task_info
                .rules_params
                .iter()
                .map(|r| r.event_type.as_str())
                .collect();
            events.sort_unstable();
            events.dedup();
            for event in events {
                index
                    .by_event
                    .entry(event.to_string())
                    .or_default()
                    .push(position);
            }
        }
        index
    }
}

struct Binding {
    worker: Arc<AlgorithmWorker>,
    session: SessionId,
}

/// A task's session, as its pipeline analyses through it.
struct Session {
    worker: Arc<AlgorithmWorker>,
    session: SessionId,
}

impl Analyse for Session {
    fn analyse(&self, frame: &Frame) -> std::result::Result<Vec<Event>, String> {
        self.worker
            .process(self.session, frame)
            .map_err(|e| e.to_string())
    }
}

/// Where a task's pipeline reports: its status, and its events into the outbox.
struct TaskReport {
    tasks: Weak<Tasks>,
    task: String,
    /// What events are made from (a task's rules and ids do not change).
    record: Arc<TaskRecord>,
    /// The service's algorithm, named in every event.
    algo_id: String,
    /// What the running status says.
    running: String,
}

impl Report for TaskReport {
    fn state(&self, state: State) {
        let Some(tasks) = self.tasks.upgrade() else {
            return;
        };
        let (status, desc) = match state {
            State::Waiting(why) => (TaskStatus::Pending, why),
            State::Running => (TaskStatus::Running, self.running.clone()),
            State::Reconnecting { attempt, reason } => (
                TaskStatus::Pending,
                format!("reconnecting (attempt {attempt}): {reason}"),
            ),
            State::Finished => (TaskStatus::Finished, "the source ended".into()),
            State::Failed(reason) => (TaskStatus::Error, reason),
        };
        // A pause or a delete that raced the report wins.
        let applied = tasks.transition(&self.task, |task| {
            if matches!(task.status, TaskStatus::Paused) {
                return Ok(());
            }
            task.status = status;
            task.status_desc = desc;
            Ok(())
        });
        if let Err(e) = applied {
            tracing::debug!(task = %self.task, "status not recorded: {e}");
        }
    }

    fn events(&self, frame: &Frame, events: Vec<Event>) {
        let Some(tasks) = self.tasks.upgrade() else {
            return;
        };
        for (destination, documents) in
            events::documents(&self.record, &self.algo_id, frame, &events)
        {
            tasks.outbox.enqueue(&self.task, &destination, &documents);
        }
    }
}

pub struct Tasks {
    store: Arc<Store>,
    services: Arc<Services>,
    /// Shared, so that searches read records in place instead of copying them.
    state: RwLock<Vec<Stored>>,
    /// Positions in `state` by event type and by service; rebuilt with every write
    /// (writes are rare, searches are not), always under `state`'s write lock.
    index: RwLock<Index>,
    bindings: Mutex<HashMap<String, Binding>>,
    render: RenderSummary,
    outbox: Arc<Outbox>,
    pipelines: Mutex<HashMap<String, Pipeline>>,
    video: VideoOptions,
    me: Weak<Tasks>,
}

fn area(a: &AreaParam) -> analyzer::Area {
    analyzer::Area {
        id: a.areaid,
        area_type: match a.area_type {
            AreaType::Polygon => analyzer::AreaType::Polygon,
            AreaType::SingleLine => analyzer::AreaType::SingleLine,
            AreaType::SingleLineBoth => analyzer::AreaType::SingleLineBoth,
            AreaType::MultiLine => analyzer::AreaType::MultiLine,
            AreaType::MultiLineBoth => analyzer::AreaType::MultiLineBoth,
        },
        points: a
            .points
            .iter()
            .map(|p| analyzer::Point { x: p.x, y: p.y })
            .collect(),
    }
}

/// The task's rules as the algorithm world takes them.
fn rules(info: &TaskInfo) -> Vec<analyzer::Rule> {
    info.rules_params
        .iter()
        .map(|r| analyzer::Rule {
            event_type: r.event_type.clone(),
            areas: r.areas.iter().map(area).collect(),
            masks: r.masks.iter().map(area).collect(),
            extend_params: r
                .extend_params
                .as_ref()
                .map(|p| serde_json::Value::Object(p.clone()).to_string())
                .unwrap_or_else(|| "{}".into()),
        })
        .collect()
}

fn validate(request: &TaskCreateRequest) -> Result<()> {
    let info = &request.task_info;
    if info.rules_params.is_empty() {
        return Err(Error::Invalid(
            "taskInfo.rulesParams: at least one rule".into(),
        ));
    }
    for (i, rule) in info.rules_params.iter().enumerate() {
        if rule.event_type.trim().is_empty() {
            return Err(Error::Invalid(format!(
                "taskInfo.rulesParams[{i}].eventType: must not be empty"
            )));
        }
        let shapes = rule.areas.iter().enumerate().map(|(j, a)| ("areas", j, a));
        let masks = rule.masks.iter().enumerate().map(|(j, a)| ("masks", j, a));
        for (list, j, area) in shapes.chain(masks) {
            let at = format!("taskInfo.rulesParams[{i}].{list}[{j}].points");
            let needed = AreaParam::min_points(area.area_type);
            if area.points.len() < needed {
                return Err(Error::Invalid(format!(
                    "{at}: {:?} needs at least {needed} points, got {}",
                    area.area_type,
                    area.points.len()
                )));
            }
            let unit = 0.0..=1.0;
            if let Some((k, p)) = area
                .points
                .iter()
                .enumerate()
                .find(|(_, p)| !unit.contains(&p.x) || !unit.contains(&p.y))
            {
                return Err(Error::Invalid(format!(
                    "{at}[{k}]: ({}, {}) is outside the frame: points are normalised to 0-1",
                    p.x, p.y
                )));
            }
        }
        if rule.destinations.http_dest.is_none() && rule.destinations.event_dest.is_none() {
            return Err(Error::Invalid(format!(
                "taskInfo.rulesParams[{i}].destinations: HTTPDest or eventDest"
            )));
        }
        if let Some(http) = &rule.destinations.http_dest {
            let url = http.url.trim();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::Invalid(format!(
                    "taskInfo.rulesParams[{i}].destinations.HTTPDest.url: an http:// or https:// URL"
                )));
            }
        }
        if let Some(mq) = rule
            .destinations
            .event_dest
            .as_ref()
            .and_then(|e| e.mq_dest.as_ref())
        {
            mq.check().map_err(|e| {
                Error::Invalid(format!(
                    "taskInfo.rulesParams[{i}].destinations.eventDest.mqDest.{e}"
                ))
            })?;
        }
    }
    let url = &info.stream_options.video_stream_options.url;
    if url.trim().is_empty() {
        return Err(Error::Invalid(
            "taskInfo.streamOptions.videoStreamOptions.url: must not be empty".into(),
        ));
    }
    Source::parse(url).map_err(Error::Invalid)?;
    Ok(())
}

/// A task's counters: its pipeline's (absent while none runs) and its delivery's.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// The decoder in use (`cpu`, `cuda`, `vaapi`; `cpu (cuda unavailable: ...)`
    /// after a fallback); absent while no pipeline runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoder: Option<String>,
    /// The execution providers the task's algorithm runs its models on (`cpu`,
    /// `cuda`); empty when it runs none.
    pub inference: Vec<&'static str>,
    pub frames_decoded: Option<u64>,
    pub frames_analysed: Option<u64>,
    pub frames_failed: Option<u64>,
    /// Frames of a live source skipped because a newer one came before the
    /// algorithm was free: how far analysis falls short of the analysis rate.
    pub frames_dropped: Option<u64>,
    pub events: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_analysis_error: Option<String>,
    pub events_queued: u64,
    /// The bytes of the events queued.
    pub events_queued_bytes: u64,
    pub events_delivered: u64,
    /// Dropped past the queue bound, oldest first.
    pub events_dropped: u64,
    /// Refused for good by their destination (too large), and so dropped.
    pub events_refused: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_error: Option<String>,
}

impl Tasks {
    /// `render` makes the search record of a task when it is written.
    pub fn new(
        store: Arc<Store>,
        services: Arc<Services>,
        outbox: Arc<Outbox>,
        video: VideoOptions,
        render: RenderSummary,
    ) -> Arc<Tasks> {
        Arc::new_cyclic(|me| Tasks {
            render,
            store,
            services,
            state: RwLock::new(Vec::new()),
            index: RwLock::new(Index::default()),
            bindings: Mutex::new(HashMap::new()),
            outbox,
            pipelines: Mutex::new(HashMap::new()),
            video,
            me: me.clone(),
        })
    }

    /// Starts the task's pipeline (and its delivery); its status follows.
    fn start_pipeline(&self, task: &TaskRecord) -> Result<()> {
        let binding = self
            .bindings()
            .get(&task.id)
            .map(|b| Session {
                worker: b.worker.clone(),
                session: b.session,
            })
            .ok_or_else(|| Error::Conflict(format!("task {} has no session", task.id)))?;
        let placement = self
            .services
            .placement_of(&task.algo_service_id, &binding.worker);
        let hwaccel = self.video.hwaccel.choose(
            placement.as_ref().and_then(|(p, _)| {
                p.card
                    .as_ref()
                    .map(|(driver, index)| (driver.as_str(), *index))
            }),
            placement.as_ref().map_or("", |(_, t)| t.as_str()),
        );
        let video = &task.task_info.stream_options.video_stream_options;
        let source = Source::parse(&video.url).map_err(Error::Invalid)?;
        let (width, height) = video.resolution.size();
        let fps = self.services.analysis_fps(&task.algo_service_id);
        let settings = Settings {
            fps,
            width,
            height,
            skip_unreferenced: fps <= crate::pipeline::decode::SKIP_UNREFERENCED_UP_TO_FPS,
        };
        self.outbox.open(&task.id);
        let report = TaskReport {
            tasks: self.me.clone(),
            task: task.id.clone(),
            record: Arc::new(task.clone()),
            algo_id: self.services.get(&task.algo_service_id)?.algo_id,
            running: format!(
                "analysing {} at {} fps, {width}x{height}",
                source.redacted(),
                settings.fps
            ),
        };
        let pipeline = Pipeline::start(
            crate::pipeline::Spec {
                task: task.id.clone(),
                source,
                settings,
                hwaccel,
                retry_forever: task.restart_policy == RestartPolicy::Always,
                ffmpeg: self.video.ffmpeg.clone(),
            },
            Arc::new(binding),
            Arc::new(report),
        )
        .map_err(|e| Error::Internal(anyhow::anyhow!("start the task's pipeline: {e}")))?;
        let mut pipelines = crate::sync::lock(&self.pipelines);
        if pipelines.len() >= self.video.max_running_tasks {
            // Another start took the last place meanwhile.
            drop(pipelines);
            drop(pipeline);
            return Err(Error::Conflict(format!(
                "the limit of running tasks ([video] max-running-tasks = {}) is reached",
                self.video.max_running_tasks
            )));
        }
        pipelines.insert(task.id.clone(), pipeline);
        Ok(())
    }

    /// Refuses one more running pipeline past `[video] max-running-tasks`.
    fn check_capacity(&self) -> Result<()> {
        let running = crate::sync::lock(&self.pipelines).len();
        let max = self.video.max_running_tasks;
        if running >= max {
            return Err(Error::Conflict(format!(
                "{running} tasks are analysing video, the limit ([video] max-running-tasks = \
                 {max}): pause or delete one first"
            )));
        }
        Ok(())
    }

    /// Stops the task's pipeline, if it runs (blocking until its thread ends).
    fn stop_pipeline(&self, id: &str) {
        let pipeline = crate::sync::lock(&self.pipelines).remove(id);
        if let Some(mut pipeline) = pipeline {
            pipeline.stop();
        }
    }

    /// The counters of a task's pipeline and delivery, for its detail.
    pub fn progress(&self, id: &str) -> Progress {
        Progress {
            events_queued: self.outbox.queued(id),
            ..self.progress_without_queue(id)
        }
    }

    /// `progress` but `events_queued` (a query of the store).
    fn progress_without_queue(&self, id: &str) -> Progress {
        let pipelines = crate::sync::lock(&self.pipelines);
        let stats = pipelines.get(id).map(|p| p.stats.clone());
        drop(pipelines);
        let delivery = self.outbox.delivery(id);
        let inference = self
            .bindings()
            .get(id)
            .map(|b| b.worker.providers())
            .unwrap_or_default();
        Progress {
            inference,
            decoder: stats
                .as_ref()
                .map(|s| crate::sync::lock(&s.decoder).clone()),
            frames_decoded: stats
                .as_ref()
                .map(|s| s.frames_decoded.load(Ordering::Relaxed)),
            frames_analysed: stats
                .as_ref()
                .map(|s| s.frames_analysed.load(Ordering::Relaxed)),
            frames_failed: stats
                .as_ref()
                .map(|s| s.frames_failed.load(Ordering::Relaxed)),
            frames_dropped: stats
                .as_ref()
                .map(|s| s.frames_dropped.load(Ordering::Relaxed)),
            events: stats.as_ref().map(|s| s.events.load(Ordering::Relaxed)),
            last_analysis_error: stats
                .as_ref()
                .and_then(|s| crate::sync::lock(&s.last_analysis_error).clone()),
            events_queued: 0,
            events_queued_bytes: delivery
                .as_ref()
                .map_or(0, |d| d.queued_bytes.load(Ordering::Relaxed)),
            events_delivered: delivery
                .as_ref()
                .map_or(0, |d| d.delivered.load(Ordering::Relaxed)),
            events_dropped: delivery
                .as_ref()
                .map_or(0, |d| d.dropped.load(Ordering::Relaxed)),
            events_refused: delivery
                .as_ref()
                .map_or(0, |d| d.refused.load(Ordering::Relaxed)),
            delivery_error: delivery
                .as_ref()
                .and_then(|d| crate::sync::lock(&d.last_error).clone()),
        }
    }

    /// Stops every pipeline and delivery loop (server shutdown).
    pub fn stop_all(&self) {
        let pipelines: Vec<Pipeline> = crate::sync::lock(&self.pipelines)
            .drain()
            .map(|(_, p)| p)
            .collect();
        drop(pipelines);
        self.outbox.close_all();
    }

    /// Every task with its counters, as the metrics show them: one read of the
    /// state, one query of the event queue.
    pub fn all_progress(&self) -> Vec<(Arc<TaskRecord>, Progress)> {
        let records: Vec<Arc<TaskRecord>> = self.read().iter().map(|s| s.record.clone()).collect();
        let mut queued = self.outbox.queued_by_task();
        records
            .into_iter()
            .map(|record| {
                let mut progress = self.progress_without_queue(&record.id);
                progress.events_queued = queued.remove(&record.id).unwrap_or(0);
                (record, progress)
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Stored>> {
        crate::sync::read(&self.state)
    }

    /// The state for writing; the index is rebuilt when the guard goes.
    fn write(&self) -> Writing<'_> {
        Writing {
            tasks: self,
            state: crate::sync::write(&self.state),
        }
    }

    fn bindings(&self) -> std::sync::MutexGuard<'_, HashMap<String, Binding>> {
        crate::sync::lock(&self.bindings)
    }

    /// Loads the tasks and binds the live ones to their services again.
    pub fn restore(&self) -> anyhow::Result<()> {
        let mut tasks: Vec<TaskRecord> = self
            .store
            .load(Table::Tasks)?
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        for task in &mut tasks {
            if matches!(
                task.status,
                TaskStatus::Pending | TaskStatus::Running | TaskStatus::Paused
            ) {
                if let Err(e) = self.bind(task) {
                    task.status = TaskStatus::Error;
                    task.status_desc = format!("after a restart: {e}");
                    self.store.put(Table::Tasks, &task.id, &*task)?;
                } else if task.status == TaskStatus::Running {
                    // Nothing is analysed yet: RUNNING comes back with the first frame.
                    task.status = TaskStatus::Pending;
                    task.status_desc = "after a restart: opening the source".into();
                    self.store.put(Table::Tasks, &task.id, &*task)?;
                }
            }
        }
        *self.write() = tasks
            .iter()
            .cloned()
            .map(|t| Stored::new(t, self.render))
            .collect();
        // Events queued before the restart go out; live tasks analyse again.
        for task in &tasks {
            self.outbox.open(&task.id);
            if task.status == TaskStatus::Pending {
                if let Err(e) = self.start_pipeline(task) {
                    tracing::error!(task = %task.id, "pipeline not started after a restart: {e}");
                    let _ = self.transition(&task.id, |t| {
                        t.status = TaskStatus::Error;
                        t.status_desc = format!("after a restart: {e}");
                        Ok(())
                    });
                }
            }
        }
        Ok(())
    }

    /// Opens the task's rules on its service's least-loaded worker.
    fn bind(&self, task: &TaskRecord) -> Result<()> {
        let service = self.services.get(&task.algo_service_id)?;
        let live = self.services.status(&service.id)?;
        if live.status != ServiceStatus::Running {
            return Err(Error::Conflict(format!(
                "algorithm service {} is not running: {}",
                service.id, live.reason
            )));
        }
        let worker = self
            .services
            .workers(&service.id)?
            .into_iter()
            .min_by_key(|w| w.sessions())
            .ok_or_else(|| {
                Error::Conflict(format!("algorithm service {} has no replica", service.id))
            })?;
        let session = worker
            .open_session(rules(&task.task_info))
            .map_err(|e| match e {
                AlgorithmFailure::Analyzer(AnalyzerError::InvalidRules(why)) => Error::Invalid(
                    format!("taskInfo.rulesParams: the algorithm refused them: {why}"),
                ),
                other => Error::Conflict(format!("algorithm service {}: {other}", service.id)),
            })?;
        self.bindings()
            .insert(task.id.clone(), Binding { worker, session });
        Ok(())
    }

    fn unbind(&self, id: &str) {
        if let Some(binding) = self.bindings().remove(id) {
            if let Err(e) = binding.worker.close_session(binding.session) {
                tracing::warn!(task = %id, "cannot close the task's session: {e}");
            }
        }
    }

    /// G.6: the total of matching tasks and the search records of page `number`
    /// (1-based) of `size`, in creation order. Filters the index answers cost the
    /// page, not the table.
    pub fn search(
        &self,
        filter: &Filter<'_>,
        number: u32,
        size: u32,
    ) -> (usize, Vec<Arc<serde_json::value::RawValue>>) {
        let state = self.read();
        let index = crate::sync::read(&self.index);
        let all: Vec<usize>;
        let (candidates, exact): (&[usize], bool) = match (filter.event_type, filter.service) {
            (Some(event), service) => (
                index.by_event.get(event).map_or(&[][..], Vec::as_slice),
                service.is_none() && filter.id.is_none(),
            ),
            (None, Some(service)) => (
                index.by_service.get(service).map_or(&[][..], Vec::as_slice),
                filter.id.is_none(),
            ),
            (None, None) => {
                all = (0..state.len()).collect();
                (&all, filter.id.is_none())
            }
        };
        let first = (number as usize - 1).saturating_mul(size as usize);
        let window = first..first.saturating_add(size as usize);
        if exact {
            let records = candidates
                .iter()
                .skip(first)
                .take(size as usize)
                .map(|&i| state[i].summary.clone())
                .collect();
            return (candidates.len(), records);
        }
        let mut total = 0;
        let mut records = Vec::new();
        for &i in candidates {
            let task = &state[i].record;
            let matches = filter.id.is_none_or(|id| id == task.id)
                && filter.service.is_none_or(|s| s == task.algo_service_id)
                && filter.event_type.is_none_or(|e| {
                    task.task_info
                        .rules_params
                        .iter()
                        .any(|r| r.event_type == e)
                });
            if matches {
                if window.contains(&total) {
                    records.push(state[i].summary.clone());
                }
                total += 1;
            }
        }
        (total, records)
    }

    pub fn get(&self, id: &str) -> Result<Arc<TaskRecord>> {
        self.read()
            .iter()
            .find(|t| t.record.id == id)
            .map(|t| t.record.clone())
            .ok_or_else(|| Error::NotFound(format!("no task {id:?}")))
    }

    /// Tasks of a service.
    pub fn count_for(&self, service: &str) -> usize {
        self.read()
            .iter()
            .filter(|t| t.record.algo_service_id == service)
            .count()
    }

    /// G.2. Blocking.
    pub fn create(&self, request: TaskCreateRequest) -> Result<TaskRecord> {
        validate(&request)?;
        self.check_capacity()?;
        let task = TaskRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            algo_service_id: request.algo_service_id,
            restart_policy: request.restart_policy,
            task_info: request.task_info,
            status: TaskStatus::Pending,
            status_desc: "starting its pipeline".into(),
            created_ms: crate::dates::now_ms(),
            moves: Vec::new(),
        };
        self.bind(&task)?;
        if let Err(e) = self.store.put(Table::Tasks, &task.id, &task) {
            self.unbind(&task.id);
            return Err(e.into());
        }
        self.write().push(Stored::new(task.clone(), self.render));
        if let Err(e) = self.start_pipeline(&task) {
            // The task exists; it says why it does not analyse.
            let _ = self.transition(&task.id, |t| {
                t.status = TaskStatus::Error;
                t.status_desc = e.to_string();
                Ok(())
            });
        }
        Ok(TaskRecord::clone(&*self.get(&task.id)?))
    }

    fn transition(
        &self,
        id: &str,
        change: impl FnOnce(&mut TaskRecord) -> Result<()>,
    ) -> Result<()> {
        let mut state = self.write();
        let stored = state
            .iter_mut()
            .find(|t| t.record.id == id)
            .ok_or_else(|| Error::NotFound(format!("no task {id:?}")))?;
        let mut changed = TaskRecord::clone(&stored.record);
        change(&mut changed)?;
        self.store.put(Table::Tasks, id, &changed)?;
        *stored = Stored::new(changed, self.render);
        Ok(())
    }

    /// Tasks analysing on `old`, a replica that moved off a card to another, go with
    /// it: each is bound again on its service (a new session on a live replica),
    /// its pipeline restarted if it was running, and the move kept in its detail.
    pub fn follow_moved_replica(
        &self,
        old: &Arc<AlgorithmWorker>,
        from: &str,
        to: &str,
        reason: &str,
    ) {
        let ids: Vec<String> = self
            .bindings()
            .iter()
            .filter(|(_, b)| Arc::ptr_eq(&b.worker, old))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let Ok(task) = self.get(&id) else { continue };
            let live = matches!(task.status, TaskStatus::Pending | TaskStatus::Running);
            if live {
                self.stop_pipeline(&id);
            }
            self.unbind(&id);
            let moved = ReplicaMove {
                at_ms: crate::dates::now_ms(),
                from: from.to_string(),
                to: to.to_string(),
                reason: reason.to_string(),
            };
            let note = format!("its replica moved from {from} ({reason}) to {to}");
            let _ = self.transition(&id, |t| {
                t.moves.push(moved);
                let excess = t.moves.len().saturating_sub(MOVES_KEPT);
                t.moves.drain(..excess);
                if live {
                    t.status = TaskStatus::Pending;
                    t.status_desc = format!("{note}: opening the source again");
                }
                Ok(())
            });
            let rebound = self.bind(&task).and_then(|()| {
                if live {
                    self.start_pipeline(&*self.get(&id)?)
                } else {
                    Ok(())
                }
            });
            match rebound {
                Ok(()) => {
                    tracing::info!(task = %id, %from, %to, "task follows its replica to another card")
                }
                Err(e) => {
                    tracing::error!(task = %id, "task cannot follow its moved replica: {e}");
                    let _ = self.transition(&id, |t| {
                        t.status = TaskStatus::Error;
                        t.status_desc = format!("{note}, and the task could not follow: {e}");
                        Ok(())
                    });
                }
            }
        }
    }

    /// G.5: decoding stops, no more events; queued ones are still delivered.
    pub fn pause(&self, id: &str) -> Result<()> {
        self.transition(id, |task| match task.status {
            TaskStatus::Pending | TaskStatus::Running => {
                task.status = TaskStatus::Paused;
                task.status_desc = "paused: not decoding".into();
                Ok(())
            }
            TaskStatus::Paused => Ok(()),
            other => Err(Error::Conflict(format!(
                "task {} is {other:?}: only a live task pauses",
                task.id
            ))),
        })?;
        self.stop_pipeline(id);
        Ok(())
    }

    /// G.4: a paused task decodes again: PENDING until its first frame.
    pub fn resume(&self, id: &str) -> Result<()> {
        if self.get(id)?.status == TaskStatus::Paused {
            self.check_capacity()?;
        }
        let mut was_paused = false;
        self.transition(id, |task| match task.status {
            TaskStatus::Paused => {
                was_paused = true;
                task.status = TaskStatus::Pending;
                task.status_desc = "resuming: opening the source".into();
                Ok(())
            }
            TaskStatus::Pending | TaskStatus::Running => Ok(()),
            other => Err(Error::Conflict(format!(
                "task {} is {other:?}: only a paused task resumes",
                task.id
            ))),
        })?;
        if was_paused {
            let task = self.get(id)?;
            self.start_pipeline(&task)?;
        }
        Ok(())
    }

    /// G.3
    pub fn delete(&self, id: &str) -> Result<()> {
        let mut state = self.write();
        if !state.iter().any(|t| t.record.id == id) {
            return Err(Error::NotFound(format!("no task {id:?}")));
        }
        self.store.delete(Table::Tasks, id)?;
        state.retain(|t| t.record.id != id);
        drop(state);
        self.stop_pipeline(id);
        self.outbox.forget(id);
        self.unbind(id);
        Ok(())
    }
}

#[cfg(test)]
mod decoder_tests {
    use super::*;

    #[test]
    fn nvdec_is_chosen_for_a_replica_on_an_nvidia_card() {
        assert_eq!(
            HwaccelMode::Auto.choose(Some(("nvidia", 2)), "NVIDIA_T4"),
            Some(Hwaccel::Cuda { device: 2 })
        );
        assert_eq!(
            HwaccelMode::None.choose(Some(("nvidia", 2)), "NVIDIA_T4"),
            None
        );
        assert_eq!(
            HwaccelMode::Cuda.choose(None, "CPU"),
            Some(Hwaccel::Cuda { device: 0 })
        );
        // Not on an NVIDIA card: VA-API only where a render node exists.
        let elsewhere = HwaccelMode::Auto.choose(Some(("sim-xpu", 0)), "SIMULATED_XPU16");
        assert_eq!(
            elsewhere.is_some(),
            std::path::Path::new(RENDER_NODE).exists()
        );
    }
}
