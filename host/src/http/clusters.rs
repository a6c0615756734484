//! Appendix A: cluster compute management (`/CCP/clusters`, `/CCP/cluster/nodes`).
//!
//! Wire types follow tables A.10-A.34. Where the text's identifiers are misspelt
//! (`interallp`, `memoy` in table A.34) responses carry both the corrected name and
//! the text's spelling, so clients written from either work.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::envelope::{Answer, CodeString, CodeStringBody, CodeStringFailures, Failure, Reply};
use super::input::{Body, Params, PathParam};
use super::App;
use crate::clusters::{
    ClusterRecord, ClusterSpec, ClusterStatus, NodeRecord, ResourceSpec, XpuResource,
};

type Fail = Failure<CodeString>;

/// Table A.10.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterCreateRequest {
    #[serde(default)]
    pub region_id: Option<String>,
    /// Not blank.
    #[schema(pattern = r"\S")]
    pub name: String,
    pub spec: ClusterSpec,
}

/// Table A.16.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct CreatedCluster {
    cluster_code: String,
    name: String,
    status: ClusterStatus,
    /// Why the cluster failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Table A.22.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    cluster_code: String,
    name: String,
}

/// Tables A.21 and A.25 (`phase` in the detail only).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct ClusterView {
    metadata: Metadata,
    spec: ClusterSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    phase: Option<ClusterStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

fn view(cluster: &ClusterRecord, with_phase: bool) -> ClusterView {
    ClusterView {
        metadata: Metadata {
            cluster_code: cluster.code.clone(),
            name: cluster.name.clone(),
        },
        spec: cluster.spec.clone(),
        phase: with_phase.then_some(cluster.status),
        reason: if with_phase {
            cluster.reason.clone()
        } else {
            None
        },
    }
}

/// `regionId` is optional everywhere and not used by a single machine.
#[derive(Debug, Default, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct RegionQuery {
    #[serde(default)]
    pub region_id: Option<String>,
}

/// Table A.26 (the code also comes in the path).
#[derive(Debug, Default, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct ClusterQuery {
    #[serde(default)]
    pub region_id: Option<String>,
    /// The path's code again (accepted when equal; not documented, since a schema
    /// cannot say "equal to the path's").
    #[serde(default)]
    #[param(ignore)]
    pub cluster_code: Option<String>,
}

/// Table A.28.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct CertData {
    external_address: String,
    ca_cert_data: String,
    /// Empty: xpud authorises by OAuth2 token and checks no client certificate, so
    /// it hands out none.
    client_cert_data: String,
    /// Empty, as `clientCertData`.
    client_key_data: String,
    inner_address: String,
}

/// Table A.29.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCreateRequest {
    #[serde(default)]
    pub region_id: Option<String>,
    pub cluster_code: String,
    #[schema(minimum = 1)]
    pub count: u32,
    pub spec: NodeCreateSpec,
}

/// A.29's `spec`: a NodeSpec whose count is the request's `count`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCreateSpec {
    pub node_resource: ResourceSpec,
}

/// Table A.30: the node ids at the top level, beside code and message.
#[derive(Serialize, ToSchema)]
struct NodeCreateResponse {
    code: &'static str,
    message: &'static str,
    #[serde(rename = "requestId")]
    request_id: String,
    #[serde(rename = "nodeId")]
    node_id: Vec<String>,
}

impl IntoResponse for NodeCreateResponse {
    fn into_response(self) -> Response {
        (StatusCode::OK, Json(self)).into_response()
    }
}

/// Table A.31.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeDeleteRequest {
    #[serde(default)]
    pub region_id: Option<String>,
    pub cluster_code: String,
    #[schema(min_items = 1)]
    pub node_id: Vec<String>,
}

/// Table A.32.
#[derive(Debug, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct NodeListRequest {
    #[serde(default)]
    pub region_id: Option<String>,
    pub cluster_code: String,
}

/// Table A.34.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct NodeView {
    node_id: String,
    internal_ip: String,
    /// The text's spelling of `internalIp`.
    #[serde(rename = "interalIp")]
    interal_ip: String,
    external_ip: String,
    /// GPU when the node has accelerators, else CPU.
    machine_type: &'static str,
    cpu: u32,
    /// GB.
    memory: u32,
    /// The text's spelling of `memory`.
    memoy: u32,
    /// GB.
    /// Null when the data directory's disk is not found.
    disk: Option<u32>,
    xpu_resources: Vec<XpuResource>,
    /// The scheduling labels its accelerators' drivers publish (not in the text):
    /// `labelSelector` keys under `xpu.` select cards by them.
    xpu_labels: Vec<super::DriverLabels>,
}

pub fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(list_clusters, create_cluster))
        .routes(routes!(cluster_detail, delete_cluster))
        .routes(routes!(license))
        .routes(routes!(list_nodes, create_nodes, delete_nodes))
}

/// A.2: Create a cluster.
#[utoipa::path(post, path = "/CCP/clusters", tag = "A", request_body = ClusterCreateRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<CreatedCluster>), CodeStringFailures))]
async fn create_cluster(
    State(app): State<App>,
    Body(request, ..): Body<ClusterCreateRequest, CodeString>,
) -> Answer<CodeString, CreatedCluster> {
    let cluster = app
        .blocking(move |app| {
            app.clusters.create(
                request.name,
                request.region_id,
                request.spec,
                &app.node_offer(),
            )
        })
        .await?;
    Ok(Reply::data(CreatedCluster {
        cluster_code: cluster.code,
        name: cluster.name,
        status: cluster.status,
        reason: cluster.reason,
    }))
}

/// A.3: Delete a cluster.
#[utoipa::path(delete, path = "/CCP/clusters/{clusterCode}", tag = "A", params(("clusterCode" = String, Path, description = "The cluster's code")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<utoipa::TupleUnit>), CodeStringFailures))]
async fn delete_cluster(
    State(app): State<App>,
    PathParam(code, ..): PathParam<CodeString>,
) -> Answer<CodeString, ()> {
    app.blocking(move |app| match app.workloads.count_in(&code) {
        0 => app.clusters.delete(&code),
        n => Err(crate::error::Error::Conflict(format!(
            "cluster {code} still runs {n} workload(s); delete them first"
        ))),
    })
    .await?;
    Ok(Reply::empty())
}

/// A.4: List the clusters.
#[utoipa::path(get, path = "/CCP/clusters", tag = "A", params(RegionQuery),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<Vec<ClusterView>>), CodeStringFailures))]
async fn list_clusters(
    State(app): State<App>,
    Params(..): Params<RegionQuery, CodeString>,
) -> Answer<CodeString, Vec<ClusterView>> {
    Ok(Reply::data(
        app.clusters.list().iter().map(|c| view(c, false)).collect(),
    ))
}

/// A.5: A cluster's detail.
#[utoipa::path(get, path = "/CCP/clusters/{clusterCode}", tag = "A", params(("clusterCode" = String, Path, description = "The cluster's code")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<ClusterView>), CodeStringFailures))]
async fn cluster_detail(
    State(app): State<App>,
    PathParam(code, ..): PathParam<CodeString>,
) -> Answer<CodeString, ClusterView> {
    Ok(Reply::data(view(&app.clusters.get(&code)?, true)))
}

/// A.6: Where and how to reach this xpud, and the CA to trust (empty over plain
/// HTTP). Needs the write scope: it is what a platform is configured from.
#[utoipa::path(get, path = "/CCP/clusters/{clusterCode}/license", tag = "A", params(("clusterCode" = String, Path, description = "The cluster's code"), ClusterQuery),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<CertData>), CodeStringFailures))]
async fn license(
    State(app): State<App>,
    PathParam(code, ..): PathParam<CodeString>,
    Params(query, ..): Params<ClusterQuery, CodeString>,
) -> Answer<CodeString, CertData> {
    if let Some(other) = query.cluster_code.filter(|c| *c != code) {
        return Err(Fail::bad_request(format!(
            "clusterCode {other:?} does not match the path's {code:?}"
        )));
    }
    app.clusters.get(&code)?;
    let access = app.access().map_err(crate::error::Error::Internal)?;
    Ok(Reply::data(CertData {
        external_address: access.external_address,
        ca_cert_data: access.ca_cert,
        client_cert_data: String::new(),
        client_key_data: String::new(),
        inner_address: access.inner_address,
    }))
}

/// A.7: Add nodes to a cluster.
#[utoipa::path(post, path = "/CCP/cluster/nodes", tag = "A", request_body = NodeCreateRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = NodeCreateResponse), CodeStringFailures))]
async fn create_nodes(
    State(app): State<App>,
    Body(request, ..): Body<NodeCreateRequest, CodeString>,
) -> Result<NodeCreateResponse, Fail> {
    let nodes = app
        .blocking(move |app| {
            app.clusters.add_nodes(
                &request.cluster_code,
                request.count,
                request.spec.node_resource,
                &app.node_offer(),
            )
        })
        .await?;
    Ok(NodeCreateResponse {
        code: "0",
        message: "success",
        request_id: uuid::Uuid::new_v4().to_string(),
        node_id: nodes,
    })
}

/// A.8: Remove nodes from a cluster.
#[utoipa::path(delete, path = "/CCP/cluster/nodes", tag = "A", request_body = NodeDeleteRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<utoipa::TupleUnit>), CodeStringFailures))]
async fn delete_nodes(
    State(app): State<App>,
    Body(request, ..): Body<NodeDeleteRequest, CodeString>,
) -> Answer<CodeString, ()> {
    app.blocking(move |app| {
        app.clusters
            .remove_nodes(&request.cluster_code, &request.node_id)
    })
    .await?;
    Ok(Reply::empty())
}

/// A.9: List a cluster's nodes.
#[utoipa::path(get, path = "/CCP/cluster/nodes", tag = "A", params(NodeListRequest),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<Vec<NodeView>>), CodeStringFailures))]
async fn list_nodes(
    State(app): State<App>,
    Params(request, ..): Params<NodeListRequest, CodeString>,
) -> Answer<CodeString, Vec<NodeView>> {
    let nodes = app.clusters.nodes(&request.cluster_code)?;
    let facts = app.machine.facts();
    let ip = facts.ip.to_string();
    let xpus = app.xpu_inventory();
    let labels = app.xpu_labels();
    Ok(Reply::data(
        nodes
            .iter()
            .map(|node: &NodeRecord| {
                let memory = facts.memory_total_gb as u32;
                NodeView {
                    node_id: node.node_id.clone(),
                    internal_ip: ip.clone(),
                    interal_ip: ip.clone(),
                    external_ip: app.external_ip().to_string(),
                    machine_type: if xpus.is_empty() { "CPU" } else { "GPU" },
                    cpu: facts.cpu_cores,
                    memory,
                    memoy: memory,
                    disk: facts.disk_total_gb.map(|gb| gb as u32),
                    xpu_resources: xpus.clone(),
                    xpu_labels: labels.clone(),
                }
            })
            .collect(),
    ))
}
