//! Appendix G: video-analysis tasks (`/CAP/AlgoTasks`). Wire types follow tables
//! G.8-G.19; `extendParams` is the one free-form object the text leaves untyped.

use axum::extract::State;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};

use super::algorithms::Empty;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::envelope::{Answer, CodeInt, CodeIntBody, CodeIntFailures, Failure, Reply};
use super::input::{Body, PathParam};
use super::page::{self, Page};
use super::App;
use crate::tasks::spec::{RestartPolicy, StreamOptions, TaskCreateRequest, TaskLabels};
use crate::tasks::{Filter, Progress, TaskRecord, TaskStatus};
use serde_json::value::RawValue;

/// Table G.9's stream entry.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct CreatedStream {
    algo_service_id: String,
    task_info: CreatedTaskInfo,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct CreatedTaskInfo {
    id: String,
    status: TaskStatus,
    stream_options: CreatedStreamOptions,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct CreatedStreamOptions {
    video_stream_options: CreatedVideo,
}

#[derive(Serialize, ToSchema)]
struct CreatedVideo {
    url: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct CreateResult {
    created_streams: Vec<CreatedStream>,
    updated_streams: Vec<CreatedStream>,
}

/// Table G.16.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskSearchRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub algo_service_id: Option<String>,
    #[serde(default)]
    pub event_type: Option<String>,
    #[schema(minimum = 1, maximum = 1000)]
    pub page_size: u32,
    #[schema(minimum = 1)]
    pub page_number: u32,
}

/// Table G.17's record; G.19's detail adds the status description and the stream.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct TaskView {
    algo_service_id: String,
    restart_policy: RestartPolicy,
    task_info: TaskInfoView,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct TaskInfoView {
    id: String,
    labels: TaskLabels,
    status: TaskStatus,
    /// What the task is doing or why it stopped (detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    status_desc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    /// Frames decoded, analysed and failed, events raised, queued, delivered and
    /// dropped (detail only; not in table G.19).
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<Progress>,
    /// The last times its service's replica was moved off a card that turned
    /// unhealthy, oldest first (detail only; not in the text).
    #[serde(skip_serializing_if = "Option::is_none")]
    replica_moves: Option<Vec<ReplicaMoveView>>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct ReplicaMoveView {
    /// When, as `createdDate` is written.
    at: String,
    /// The cards, as `driver/index`.
    from: String,
    to: String,
    reason: String,
}

fn view(task: &TaskRecord) -> TaskView {
    TaskView {
        algo_service_id: task.algo_service_id.clone(),
        restart_policy: task.restart_policy,
        task_info: TaskInfoView {
            id: task.id.clone(),
            labels: task.task_info.labels.clone(),
            status: task.status,
            status_desc: None,
            stream_options: None,
            progress: None,
            replica_moves: None,
        },
    }
}

/// A task's search record as JSON, rendered when the task is written.
pub fn summary_json(task: &TaskRecord) -> std::sync::Arc<RawValue> {
    let json = serde_json::to_string(&view(task)).expect("task views serialise");
    RawValue::from_string(json)
        .expect("serde_json wrote valid JSON")
        .into()
}

fn detail_view(task: &TaskRecord, progress: Progress) -> TaskView {
    let mut view = view(task);
    view.task_info.status_desc = Some(task.status_desc.clone());
    view.task_info.stream_options = Some(task.task_info.stream_options.clone());
    view.task_info.progress = Some(progress);
    view.task_info.replica_moves = Some(
        task.moves
            .iter()
            .map(|m| ReplicaMoveView {
                at: crate::dates::format_ms(m.at_ms),
                from: m.from.clone(),
                to: m.to.clone(),
                reason: m.reason.clone(),
            })
            .collect(),
    );
    view
}

pub fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::with_openapi(TaskActions::openapi())
        .routes(routes!(create))
        .routes(routes!(search))
        .routes(routes!(detail, delete))
        // axum routes no parameter with a suffix (`{id}:pause`): `act` takes the whole
        // segment and splits it; the two actions are documented on their own.
        .route("/CAP/AlgoTasks/{id}", post(act))
}

#[derive(OpenApi)]
#[openapi(paths(resume, pause))]
struct TaskActions;

/// G.2: Create a task.
#[utoipa::path(post, path = "/CAP/AlgoTasks", tag = "G", request_body = TaskCreateRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<CreateResult>), CodeIntFailures))]
async fn create(
    State(app): State<App>,
    Body(request, ..): Body<TaskCreateRequest, CodeInt>,
) -> Answer<CodeInt, CreateResult> {
    let task = app.blocking(move |app| app.tasks.create(request)).await?;
    Ok(Reply::data(CreateResult {
        created_streams: vec![CreatedStream {
            algo_service_id: task.algo_service_id.clone(),
            task_info: CreatedTaskInfo {
                id: task.id.clone(),
                status: task.status,
                stream_options: CreatedStreamOptions {
                    video_stream_options: CreatedVideo {
                        url: task
                            .task_info
                            .stream_options
                            .video_stream_options
                            .url
                            .clone(),
                    },
                },
            },
        }],
        updated_streams: Vec::new(),
    }))
}

/// G.3: Delete a task.
#[utoipa::path(delete, path = "/CAP/AlgoTasks/{id}", tag = "G", params(("id" = String, Path, description = "The task's id")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<Empty>), CodeIntFailures))]
async fn delete(
    State(app): State<App>,
    PathParam(id, ..): PathParam<CodeInt>,
) -> Answer<CodeInt, Empty> {
    app.blocking(move |app| app.tasks.delete(&id)).await?;
    Ok(Reply::data(Empty {}))
}

/// Whether a `/CAP/AlgoTasks/{segment}` names an action (`{id}:pause`,
/// `{id}:resume`, or an unknown one) rather than a task: task ids have no ':'.
fn is_action(segment: &str) -> bool {
    segment.contains(':')
}

/// The methods `/CAP/AlgoTasks/{segment}` takes, said truthfully: axum sees one
/// route for the task and its actions, and would offer POST on a task and GET on an
/// action. A task is read and deleted; its actions are posted.
pub async fn honest_allow(request: axum::extract::Request, next: Next) -> Response {
    use axum::http::{header::ALLOW, HeaderValue};
    let segment = request
        .uri()
        .path()
        .strip_prefix("/CAP/AlgoTasks/")
        .filter(|s| !s.is_empty() && !s.contains('/') && !s.ends_with(":search"))
        .map(str::to_string);
    let Some(segment) = segment else {
        return next.run(request).await;
    };
    let allowed = if is_action(&segment) {
        "POST"
    } else {
        "GET,HEAD,DELETE"
    };
    let method = request.method().clone();
    let mut response = if is_action(&segment) && method != axum::http::Method::POST {
        Failure::<CodeInt>::new(
            axum::http::StatusCode::METHOD_NOT_ALLOWED,
            format!("{} does not take {method}", request.uri().path()),
        )
        .into_response()
    } else if !is_action(&segment) && method == axum::http::Method::POST {
        Failure::<CodeInt>::new(
            axum::http::StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} does not take POST (its actions do: {{id}}:pause, {{id}}:resume)",
                request.uri().path()
            ),
        )
        .into_response()
    } else {
        next.run(request).await
    };
    if response.status() == axum::http::StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allowed));
    }
    response
}

/// G.4 (`{id}:resume`) and G.5 (`{id}:pause`): one path segment.
async fn act(
    State(app): State<App>,
    PathParam(segment, ..): PathParam<CodeInt>,
) -> Answer<CodeInt, bool> {
    let (id, action) = segment.rsplit_once(':').ok_or_else(|| {
        Failure::not_found(format!("no such endpoint: POST /CAP/AlgoTasks/{segment}"))
    })?;
    match action {
        "resume" => resume(app, id.to_string()).await,
        "pause" => pause(app, id.to_string()).await,
        other => Err(Failure::not_found(format!(
            "no action {other:?}: POST /CAP/AlgoTasks/{{id}}:resume or :pause"
        ))),
    }
}

/// G.4: Resume a task.
#[utoipa::path(post, path = "/CAP/AlgoTasks/{id}:resume", tag = "G", params(("id" = String, Path, description = "The task's id")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<bool>), CodeIntFailures))]
async fn resume(app: App, id: String) -> Answer<CodeInt, bool> {
    app.blocking(move |app| app.tasks.resume(&id)).await?;
    Ok(Reply::data(true))
}

/// G.5: Pause a task.
#[utoipa::path(post, path = "/CAP/AlgoTasks/{id}:pause", tag = "G", params(("id" = String, Path, description = "The task's id")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<bool>), CodeIntFailures))]
async fn pause(app: App, id: String) -> Answer<CodeInt, bool> {
    app.blocking(move |app| app.tasks.pause(&id)).await?;
    Ok(Reply::data(true))
}

/// G.6: Search tasks.
#[utoipa::path(post, path = "/CAP/AlgoTasks:search", tag = "G", request_body = TaskSearchRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<Page<TaskView>>), CodeIntFailures))]
async fn search(
    State(app): State<App>,
    Body(request, ..): Body<TaskSearchRequest, CodeInt>,
) -> Answer<CodeInt, Page<std::sync::Arc<RawValue>>> {
    page::check(request.page_number, request.page_size).map_err(Failure::bad_request)?;
    let filter = Filter {
        id: request.id.as_deref(),
        service: request.algo_service_id.as_deref(),
        event_type: request.event_type.as_deref(),
    };
    let (total, records) = app
        .tasks
        .search(&filter, request.page_number, request.page_size);
    let page = Page {
        page_number: request.page_number,
        page_size: request.page_size,
        total,
        records,
    };
    Ok(Reply::data(page))
}

/// G.7: A task's detail.
#[utoipa::path(get, path = "/CAP/AlgoTasks/{id}", tag = "G", params(("id" = String, Path, description = "The task's id")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<TaskView>), CodeIntFailures))]
async fn detail(
    State(app): State<App>,
    PathParam(id, ..): PathParam<CodeInt>,
) -> Answer<CodeInt, TaskView> {
    let task = app.tasks.get(&id)?;
    let progress = app.blocking(move |app| Ok(app.tasks.progress(&id))).await?;
    Ok(Reply::data(detail_view(&task, progress)))
}
