//! Video-analysis tasks (Appendix G).
//!
//! A task's rules are opened as a session on the least-loaded worker of its service:
//! the algorithm plugin validates them there. The video pipeline that would feed the
//! session frames is not part of this build, so a task stays PENDING, and its status
//! description says so: nothing pretends to be RUNNING.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

pub mod spec;

use crate::error::{Error, Result};
use crate::plugins::algorithm::{AlgorithmFailure, AlgorithmWorker, SessionId};
use crate::runtime::bindings::analyzer::{self, AnalyzerError};
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
}

/// Why a bound task is not running.
const NO_PIPELINE: &str =
    "rules accepted by the algorithm; waiting for the video pipeline, which this build does not have: no frames are analysed yet";

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
    }
    let url = &info.stream_options.video_stream_options.url;
    if url.trim().is_empty() {
        return Err(Error::Invalid(
            "taskInfo.streamOptions.videoStreamOptions.url: must not be empty".into(),
        ));
    }
    Ok(())
}

impl Tasks {
    /// `render` makes the search record of a task when it is written.
    pub fn new(store: Arc<Store>, services: Arc<Services>, render: RenderSummary) -> Tasks {
        Tasks {
            render,
            store,
            services,
            state: RwLock::new(Vec::new()),
            index: RwLock::new(Index::default()),
            bindings: Mutex::new(HashMap::new()),
        }
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
                }
            }
        }
        *self.write() = tasks
            .into_iter()
            .map(|t| Stored::new(t, self.render))
            .collect();
        Ok(())
    }

    /// Opens the task's rules on its service's least-loaded worker.
    fn bind(&self, task: &TaskRecord) -> Result<()> {
        let service = self.services.get(&task.algo_service_id)?;
        if service.status != ServiceStatus::Running {
            return Err(Error::Conflict(format!(
                "algorithm service {} is not running: {}",
                service.id, service.status_desc
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
        let task = TaskRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            algo_service_id: request.algo_service_id,
            restart_policy: request.restart_policy,
            task_info: request.task_info,
            status: TaskStatus::Pending,
            status_desc: NO_PIPELINE.into(),
            created_ms: crate::dates::now_ms(),
        };
        self.bind(&task)?;
        if let Err(e) = self.store.put(Table::Tasks, &task.id, &task) {
            self.unbind(&task.id);
            return Err(e.into());
        }
        self.write().push(Stored::new(task.clone(), self.render));
        Ok(task)
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

    /// G.5
    pub fn pause(&self, id: &str) -> Result<()> {
        self.transition(id, |task| match task.status {
            TaskStatus::Pending | TaskStatus::Running => {
                task.status = TaskStatus::Paused;
                task.status_desc = "paused".into();
                Ok(())
            }
            TaskStatus::Paused => Ok(()),
            other => Err(Error::Conflict(format!(
                "task {} is {other:?}: only a live task pauses",
                task.id
            ))),
        })
    }

    /// G.4: a paused task goes back to waiting for its pipeline.
    pub fn resume(&self, id: &str) -> Result<()> {
        self.transition(id, |task| match task.status {
            TaskStatus::Paused | TaskStatus::Pending => {
                task.status = TaskStatus::Pending;
                task.status_desc = NO_PIPELINE.into();
                Ok(())
            }
            other => Err(Error::Conflict(format!(
                "task {} is {other:?}: only a paused task resumes",
                task.id
            ))),
        })
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
        self.unbind(id);
        Ok(())
    }
}
