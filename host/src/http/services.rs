//! Appendix F: algorithm services (`/CAP/AlgoServices`): pools of algorithm-plugin
//! workers, one per replica, placed on this machine's accelerators.

use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::algorithms::Empty;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::envelope::{Answer, CodeInt, CodeIntBody, CodeIntFailures, Failure, Reply};
use super::input::{Body, PathParam};
use super::page::{self, Page};
use super::App;
use crate::plugins::supervisor::Phase;
use crate::services::{ServiceRecord, ServiceStatus};

/// Table F.6.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceCreateRequest {
    /// `KEY=value` entries separated by commas; blank entries are skipped.
    #[schema(pattern = r"^(\s*|[^,=]*[^\s,=][^,=]*=[^,]*)(,(\s*|[^,=]*[^\s,=][^,=]*=[^,]*))*$")]
    pub envs: String,
    #[schema(minimum = 1, maximum = 64)]
    pub replicas: u32,
    /// Not blank.
    #[schema(pattern = r"\S")]
    pub gpu_type: String,
    pub algo_id: String,
}

/// Table F.10: both optional.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSearchRequest {
    #[serde(default = "first_page")]
    #[schema(minimum = 1)]
    pub page_number: u32,
    #[serde(default = "default_size")]
    #[schema(minimum = 1, maximum = 1000)]
    pub page_size: u32,
}

fn first_page() -> u32 {
    1
}

fn default_size() -> u32 {
    20
}

/// Table F.11's record.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct ServiceView {
    id: String,
    algo_id: String,
    replicas: u32,
    gpu_type: String,
    envs: String,
}

fn view(s: &ServiceRecord) -> ServiceView {
    ServiceView {
        id: s.id.clone(),
        algo_id: s.algo_id.clone(),
        replicas: s.replicas,
        gpu_type: s.gpu_type.clone(),
        envs: s.envs.clone(),
    }
}

/// Table F.13's replica, with what its worker is doing and where it runs (not in
/// the table; clients ignore them).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct ReplicaDetail {
    node_host: String,
    node_ipv4: String,
    status: ServiceStatus,
    status_desc: String,
    #[serde(flatten)]
    placed: super::Placed,
    /// The execution providers its models run on (`cpu`, `cuda`).
    inference: Vec<&'static str>,
}

/// Table F.13.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct ServiceDetail {
    #[serde(flatten)]
    service: ServiceView,
    status: ServiceStatus,
    status_desc: String,
    gpu_quota: f64,
    replicas_detail: Vec<ReplicaDetail>,
}

pub fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(create))
        .routes(routes!(search))
        .routes(routes!(detail, delete))
}

/// F.2: Create a service; the answer is its id.
#[utoipa::path(post, path = "/CAP/AlgoServices", tag = "F", request_body = ServiceCreateRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<String>), CodeIntFailures))]
async fn create(
    State(app): State<App>,
    Body(request, ..): Body<ServiceCreateRequest, CodeInt>,
) -> Answer<CodeInt, String> {
    let service = app
        .blocking(move |app| {
            let xpus = app.xpus();
            app.services.create(
                &request.algo_id,
                request.replicas,
                &request.gpu_type,
                &request.envs,
                &xpus,
            )
        })
        .await?;
    Ok(Reply::data(service.id))
}

/// F.3: Delete a service.
#[utoipa::path(delete, path = "/CAP/AlgoServices/{id}", tag = "F", params(("id" = String, Path, description = "The service's id")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<Empty>), CodeIntFailures))]
async fn delete(
    State(app): State<App>,
    PathParam(id, ..): PathParam<CodeInt>,
) -> Answer<CodeInt, Empty> {
    app.blocking(move |app| app.services.delete(&id, app.tasks.count_for(&id)))
        .await?;
    Ok(Reply::data(Empty {}))
}

/// F.4: Search services.
#[utoipa::path(post, path = "/CAP/AlgoServices:search", tag = "F", request_body = ServiceSearchRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<Page<ServiceView>>), CodeIntFailures))]
async fn search(
    State(app): State<App>,
    Body(request, ..): Body<ServiceSearchRequest, CodeInt>,
) -> Answer<CodeInt, Page<ServiceView>> {
    page::check(request.page_number, request.page_size).map_err(Failure::bad_request)?;
    let services = app.services.list();
    Ok(Reply::data(page::of(
        services.iter(),
        request.page_number,
        request.page_size,
        view,
    )))
}

/// F.5: A service's detail.
#[utoipa::path(get, path = "/CAP/AlgoServices/{id}", tag = "F", params(("id" = String, Path, description = "The service's id")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<ServiceDetail>), CodeIntFailures))]
async fn detail(
    State(app): State<App>,
    PathParam(id, ..): PathParam<CodeInt>,
) -> Answer<CodeInt, ServiceDetail> {
    let service = app.services.get(&id)?;
    let live = app.services.status(&id)?;
    let facts = app.machine.facts();
    Ok(Reply::data(ServiceDetail {
        replicas_detail: live
            .replicas
            .into_iter()
            .map(|replica| ReplicaDetail {
                node_host: facts.host_name.clone(),
                node_ipv4: app.external_ip().to_string(),
                status: match replica.worker.phase() {
                    Phase::Running => ServiceStatus::Running,
                    Phase::Starting | Phase::Restarting => ServiceStatus::Starting,
                    Phase::Failed => ServiceStatus::Error,
                },
                status_desc: replica.worker.describe(),
                placed: app.placed(replica.placement.as_ref()),
                inference: replica.inference,
            })
            .collect(),
        status: live.status,
        status_desc: live.reason,
        gpu_quota: service.gpu_quota,
        service: view(&service),
    }))
}
