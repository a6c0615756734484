//! Appendix B: algorithm workloads and pods (`/CCP/algoService/...`; the text also
//! writes `/CCP/algoservice/...`, and both are served). Tables B.9-B.30.

use std::collections::BTreeMap;

use axum::extract::State;
use serde::{Deserialize, Serialize};

use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::envelope::{Answer, CodeString, CodeStringBody, CodeStringFailures, Failure, Reply};
use super::input::{Body, Params, PathParam};
use super::App;
use crate::dates::format_ms;
use crate::workloads::{PodState, WorkloadRecord, WorkloadSpec};

type Fail = Failure<CodeString>;

/// Table B.9.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadCreateRequest {
    pub cluster_code: String,
    #[schema(pattern = r"^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name_space: String,
    #[schema(pattern = r"^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Must select the pod labels: each key is in `labels` with the same value.
    pub label_selector: BTreeMap<String, String>,
    #[schema(maximum = 64)]
    pub replicas: u32,
    pub container_name: String,
    pub image: String,
    #[schema(minimum = 1)]
    pub cpu: u32,
    pub xpu_type: String,
    #[schema(schema_with = xpu_share_schema)]
    pub xpu: f64,
    pub memory: u32,
    /// Accelerator memory per pod, GB (an extension; B.6 reports it). Absent: the
    /// same share of the card's memory as `xpu`. A pod without a card (`xpu` 0)
    /// holds none.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub xpu_memory: Option<u32>,
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub args: Option<String>,
}

/// B.2's `xpu`: a share of one card in tenths (up to 1), or a whole number of cards.
fn xpu_share_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Type};
    let number = || {
        ObjectBuilder::new()
            .schema_type(Type::Number)
            .minimum(Some(0.0))
    };
    AnyOfBuilder::new()
        .item(number().maximum(Some(1.0)).multiple_of(Some(0.1)))
        .item(number().multiple_of(Some(1.0)))
        .description(Some(
            "A share of one card in tenths (up to 1), or a whole number of cards",
        ))
        .build()
        .into()
}

/// Table B.11.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct WorkloadResult {
    workload_name: String,
    namespace: String,
}

/// Tables B.12, B.22 and B.24: the workload's coordinates (the name may come in the path).
#[derive(Debug, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    pub cluster_code: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The path's name again (accepted when equal; not documented).
    #[serde(default)]
    #[param(ignore)]
    #[schema(ignore)]
    pub workload_name: Option<String>,
}

/// Table B.14.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadScaleRequest {
    pub cluster_code: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The path's name again (accepted when equal; not documented).
    #[serde(default)]
    #[schema(ignore)]
    pub workload_name: Option<String>,
    #[schema(maximum = 64)]
    pub replicas: u32,
}

fn default_namespace() -> String {
    "default".into()
}

/// Tables B.17 and B.18.
#[derive(Debug, Deserialize, Serialize, Clone, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiPageRequest {
    #[schema(minimum = 1)]
    pub page_number: u32,
    #[schema(minimum = 1, maximum = 1000)]
    pub page_size: u32,
    #[serde(default)]
    pub order_list: Vec<ApiOrder>,
}

#[derive(Debug, Deserialize, Serialize, Clone, ToSchema)]
pub struct ApiOrder {
    #[serde(default)]
    pub property: Option<String>,
    #[serde(default)]
    pub direction: Option<String>,
}

/// Table B.16. As a query string, `pageNumber`/`pageSize` may stand alone.
#[derive(Debug, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadListRequest {
    pub cluster_code: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub workload_name: Option<String>,
    #[serde(default)]
    pub page_request: Option<ApiPageRequest>,
    #[serde(default)]
    #[param(minimum = 1)]
    pub page_number: Option<u32>,
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub page_size: Option<u32>,
}

/// Table B.21: a workload in B.5's list.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct WorkloadSummary {
    namespace: String,
    workload_name: String,
    replicas: u32,
    created_date: String,
}

/// B.6: the summary and the detail, in one object.
#[derive(Serialize, ToSchema)]
struct WorkloadInfo {
    #[serde(flatten)]
    summary: WorkloadSummary,
    #[serde(flatten)]
    detail: WorkloadDetail,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct WorkloadDetail {
    xpu_type: String,
    xpu: f64,
    cpu_type: &'static str,
    cpu: u32,
    /// GB of accelerator memory per pod.
    xpu_memory: Option<f64>,
    memory: u32,
    /// Derived from the live pods: Running (all ready), Pending, Failed (a pod
    /// cannot run, or pods are missing), Stopped (0 replicas).
    status: &'static str,
    /// Why the status is what it is (not in table B.6; clients ignore it).
    status_desc: String,
    image: String,
}

/// Table B.20 with rule 5's page fields.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct WorkloadPage {
    page_request: ApiPageRequest,
    page_number: u32,
    page_size: u32,
    total: usize,
    page_content: Vec<WorkloadSummary>,
}

/// Table B.28.
#[derive(Serialize, ToSchema)]
struct Label {
    name: String,
    value: String,
}

/// Table B.27.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct PodVo {
    name: String,
    node_name: String,
    #[serde(rename = "hostIP")]
    host_ip: String,
    #[serde(rename = "podIP")]
    pod_ip: String,
    /// Pods run inside xpud: this is the port xpud serves on.
    port: u16,
    status: &'static str,
    status_desc: String,
    image: String,
    restarts: u32,
    /// Seconds.
    age: u64,
    ready: bool,
    deployment_name: String,
    labels: Vec<Label>,
    #[serde(flatten)]
    placed: super::Placed,
}

/// Table B.26.
#[derive(Serialize, ToSchema)]
struct PodList {
    pods: Vec<PodVo>,
}

/// B.24 with B.29's pod name.
#[derive(Debug, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct PodRequest {
    pub cluster_code: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub workload_name: String,
    /// The path's name again (accepted when equal; not documented).
    #[serde(default)]
    #[param(ignore)]
    #[schema(ignore)]
    pub pod_name: Option<String>,
}

fn summary(record: &WorkloadRecord) -> WorkloadSummary {
    WorkloadSummary {
        namespace: record.spec.namespace.clone(),
        workload_name: record.spec.name.clone(),
        replicas: record.spec.replicas,
        created_date: format_ms(record.created_ms),
    }
}

fn info(app: &App, record: &WorkloadRecord) -> crate::error::Result<WorkloadInfo> {
    let status = app.workloads.status(
        &record.spec.cluster_code,
        &record.spec.namespace,
        &record.spec.name,
    )?;
    // What a pod holds in the ledger; before any is placed, what it will ask for.
    let held = app
        .workloads
        .pod_memory_mib(record)
        .map(|mib| mib as f64 / 1024.0);
    let card_gb = app.machine.latest().and_then(|s| {
        s.xpus
            .iter()
            .find(|x| crate::scheduler::same_type(&x.xpu_type, &record.spec.xpu_type))
            .and_then(|x| x.memory_total_gb)
    });
    let asked = record
        .spec
        .xpu_memory
        .filter(|_| record.spec.xpu > 0.0)
        .map(f64::from);
    let detail = WorkloadDetail {
        xpu_type: record.spec.xpu_type.clone(),
        xpu: record.spec.xpu,
        cpu_type: std::env::consts::ARCH,
        cpu: record.spec.cpu,
        xpu_memory: held
            .or(asked)
            .or_else(|| card_gb.map(|gb| gb * record.spec.xpu)),
        memory: record.spec.memory,
        status: status.status,
        status_desc: status.reason,
        image: record.spec.image.clone(),
    };
    Ok(WorkloadInfo {
        summary: summary(record),
        detail,
    })
}

fn pod_vo(app: &App, pod: &PodState) -> PodVo {
    let ip = app.external_ip().to_string();
    PodVo {
        name: pod.pod.name.clone(),
        node_name: app.machine.facts().host_name.clone(),
        host_ip: ip.clone(),
        pod_ip: ip,
        port: app.listen.port(),
        status: pod.phase(),
        status_desc: pod.description(),
        image: pod.workload.image.clone(),
        restarts: pod.worker.restarts,
        age: (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            .saturating_sub(pod.pod.created_ms))
            / 1000,
        ready: pod.ready(),
        deployment_name: pod.workload.name.clone(),
        labels: pod
            .workload
            .labels
            .iter()
            .map(|(name, value)| Label {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        placed: app.placed(pod.placement.as_ref()),
    }
}

/// Documented under `/CCP/algoService`; the text also writes `/CCP/algoservice`.
pub fn routes() -> OpenApiRouter<App> {
    let spelt = |router, routes| super::also_spelt(router, routes, BASE, &["/CCP/algoservice"]);
    let router = OpenApiRouter::new();
    let router = spelt(router, routes!(list, create));
    let router = spelt(router, routes!(detail, scale, delete));
    let router = spelt(router, routes!(pods));
    spelt(router, routes!(pod))
}

const BASE: &str = "/CCP/algoService";

/// The name from the path, checked against the one in the parameters, if any.
fn same_name(path: &str, given: Option<&str>) -> Result<(), Fail> {
    match given {
        Some(other) if other != path => Err(Fail::bad_request(format!(
            "workloadName {other:?} does not match the path's {path:?}"
        ))),
        _ => Ok(()),
    }
}

/// B.2: Create a workload.
#[utoipa::path(post, path = "/CCP/algoService/workloads", tag = "B", request_body = WorkloadCreateRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<WorkloadResult>), CodeStringFailures))]
async fn create(
    State(app): State<App>,
    Body(request, ..): Body<WorkloadCreateRequest, CodeString>,
) -> Answer<CodeString, WorkloadResult> {
    let spec = WorkloadSpec {
        cluster_code: request.cluster_code,
        namespace: request.name_space,
        name: request.name,
        labels: request.labels,
        label_selector: request.label_selector,
        replicas: request.replicas,
        container_name: request.container_name,
        image: request.image,
        cpu: request.cpu,
        xpu_type: request.xpu_type,
        xpu: request.xpu,
        memory: request.memory,
        xpu_memory: request.xpu_memory,
        command: request.command,
        args: request.args,
    };
    let record = app
        .blocking(move |app| {
            app.workloads
                .create(spec, &app.clusters, &app.xpus(), app.node_capacity())
        })
        .await?;
    Ok(Reply::data(WorkloadResult {
        workload_name: record.spec.name,
        namespace: record.spec.namespace,
    }))
}

/// B.3: Delete a workload.
#[utoipa::path(delete, path = "/CCP/algoService/workloads/{workloadName}", tag = "B", params(("workloadName" = String, Path, description = "The workload's name"), WorkloadRef),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<utoipa::TupleUnit>), CodeStringFailures))]
async fn delete(
    State(app): State<App>,
    PathParam(name, ..): PathParam<CodeString>,
    Params(request, ..): Params<WorkloadRef, CodeString>,
) -> Answer<CodeString, ()> {
    same_name(&name, request.workload_name.as_deref())?;
    app.blocking(move |app| {
        app.workloads
            .delete(&request.cluster_code, &request.namespace, &name)
    })
    .await?;
    Ok(Reply::empty())
}

/// B.4: Scale a workload.
#[utoipa::path(put, path = "/CCP/algoService/workloads/{workloadName}", tag = "B", params(("workloadName" = String, Path, description = "The workload's name")),
    request_body = WorkloadScaleRequest, responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<utoipa::TupleUnit>), CodeStringFailures))]
async fn scale(
    State(app): State<App>,
    PathParam(name, ..): PathParam<CodeString>,
    Body(request, ..): Body<WorkloadScaleRequest, CodeString>,
) -> Answer<CodeString, ()> {
    same_name(&name, request.workload_name.as_deref())?;
    app.blocking(move |app| {
        app.workloads.scale(
            &request.cluster_code,
            &request.namespace,
            &name,
            request.replicas,
            &app.xpus(),
            app.node_capacity(),
        )
    })
    .await?;
    Ok(Reply::empty())
}

/// B.5: List workloads.
#[utoipa::path(get, path = "/CCP/algoService/workloads", tag = "B", params(WorkloadListRequest),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<WorkloadPage>), CodeStringFailures))]
async fn list(
    State(app): State<App>,
    Params(request, ..): Params<WorkloadListRequest, CodeString>,
) -> Answer<CodeString, WorkloadPage> {
    app.clusters.get(&request.cluster_code)?;
    let page = request.page_request.clone().unwrap_or(ApiPageRequest {
        page_number: request.page_number.unwrap_or(1),
        page_size: request.page_size.unwrap_or(20),
        order_list: Vec::new(),
    });
    super::page::check(page.page_number, page.page_size)
        .map_err(|e| Fail::bad_request(format!("pageRequest.{e}")))?;
    let mut records: Vec<WorkloadRecord> = app
        .workloads
        .list(&request.cluster_code)
        .into_iter()
        .filter(|w| w.spec.namespace == request.namespace)
        .filter(|w| {
            request
                .workload_name
                .as_ref()
                .is_none_or(|n| *n == w.spec.name)
        })
        .collect();
    for (i, order) in page.order_list.iter().enumerate().rev() {
        let descending = match order
            .direction
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(other) => {
                return Err(Fail::bad_request(format!(
                    "pageRequest.orderList[{i}].direction {other:?}: asc or desc"
                )))
            }
        };
        match order.property.as_deref().unwrap_or("createdDate") {
            "id" | "createdDate" => records.sort_by_key(|w| w.created_ms),
            "workloadName" | "name" => records.sort_by(|a, b| a.spec.name.cmp(&b.spec.name)),
            "replicas" => records.sort_by_key(|w| w.spec.replicas),
            other => {
                return Err(Fail::bad_request(format!(
                    "pageRequest.orderList[{i}].property {other:?}: id, createdDate, workloadName or replicas"
                )))
            }
        }
        if descending {
            records.reverse();
        }
    }
    let listed = super::page::of(records.iter(), page.page_number, page.page_size, |w| {
        summary(w)
    });
    Ok(Reply::data(WorkloadPage {
        page_number: listed.page_number,
        page_size: listed.page_size,
        total: listed.total,
        page_content: listed.records,
        page_request: page,
    }))
}

/// B.6: A workload's detail.
#[utoipa::path(get, path = "/CCP/algoService/workloads/{workloadName}", tag = "B", params(("workloadName" = String, Path, description = "The workload's name"), WorkloadRef),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<WorkloadInfo>), CodeStringFailures))]
async fn detail(
    State(app): State<App>,
    PathParam(name, ..): PathParam<CodeString>,
    Params(request, ..): Params<WorkloadRef, CodeString>,
) -> Answer<CodeString, WorkloadInfo> {
    same_name(&name, request.workload_name.as_deref())?;
    let record = app
        .workloads
        .get(&request.cluster_code, &request.namespace, &name)?;
    Ok(Reply::data(info(&app, &record)?))
}

/// B.7: List a workload's pods.
#[utoipa::path(get, path = "/CCP/algoService/pods", tag = "B", params(PodRequest),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<PodList>), CodeStringFailures))]
async fn pods(
    State(app): State<App>,
    Params(request, ..): Params<PodRequest, CodeString>,
) -> Answer<CodeString, PodList> {
    let pods = app.workloads.pods(
        &request.cluster_code,
        &request.namespace,
        &request.workload_name,
    )?;
    Ok(Reply::data(PodList {
        pods: pods.iter().map(|p| pod_vo(&app, p)).collect(),
    }))
}

/// B.8: A pod's detail.
#[utoipa::path(get, path = "/CCP/algoService/pods/{podName}", tag = "B",
    params(("podName" = String, Path, description = "The pod's name"), PodRequest),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<PodVo>), CodeStringFailures))]
async fn pod(
    State(app): State<App>,
    PathParam(name, ..): PathParam<CodeString>,
    Params(request, ..): Params<PodRequest, CodeString>,
) -> Answer<CodeString, PodVo> {
    if let Some(other) = request.pod_name.as_deref().filter(|p| *p != name) {
        return Err(Fail::bad_request(format!(
            "podName {other:?} does not match the path's {name:?}"
        )));
    }
    let pods = app.workloads.pods(
        &request.cluster_code,
        &request.namespace,
        &request.workload_name,
    )?;
    let pod = pods.iter().find(|p| p.pod.name == name).ok_or_else(|| {
        Fail::not_found(format!(
            "no pod {name:?} in workload {}",
            request.workload_name
        ))
    })?;
    Ok(Reply::data(pod_vo(&app, pod)))
}
