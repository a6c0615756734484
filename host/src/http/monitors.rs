//! Appendix C: resource monitors of clusters and nodes, from the machine sampler's
//! history (never measured on the request path). Utilisations are fractions (0-1),
//! sizes GB. Trend lists are `[{"<timestamp ms>": value}, ...]`, oldest first.

use std::collections::BTreeMap;

use axum::extract::State;
use serde::{Deserialize, Serialize, Serializer};

use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, PartialSchema, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::envelope::{Answer, CodeString, CodeStringBody, CodeStringFailures, Failure, Reply};
use super::input::{Params, PathParam};
use super::App;
use crate::machine::{Sample, XpuSample};

/// One point of a trend: serialised as `{"<timestamp ms>": value}`.
#[derive(Clone, Copy, Debug)]
pub struct TrendPoint(pub u64, pub f64);

impl Serialize for TrendPoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = BTreeMap::new();
        map.insert(self.0.to_string(), self.1);
        map.serialize(s)
    }
}

impl PartialSchema for TrendPoint {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .description(Some(
                "One point: the sample's time (ms since the epoch) as the key",
            ))
            .additional_properties(Some(ObjectBuilder::new().schema_type(Type::Number)))
            .examples([serde_json::json!({ "1764201600000": 0.42 })])
            .into()
    }
}

impl ToSchema for TrendPoint {}

/// Table C.7.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct XpuMonitorInfo {
    xpu_memory: Option<u32>,
    xpu_memory_used: Option<f64>,
    xpu_memory_used_list: Vec<TrendPoint>,
    /// Unknown when the driver cannot read it: null, never 0.
    xpu_utilization: Option<f64>,
    xpu_utilization_list: Vec<TrendPoint>,
    xpu_type: String,
    /// A simulated card (not in table C.7).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    simulated: bool,
    /// Not in table C.7: which card (`driver/index`, as replicas name theirs), its
    /// health, memory used over total, video- and picture-decode utilisation
    /// (0-1; null when the driver cannot read them), and the partitions on it.
    card: String,
    health: &'static str,
    xpu_memory_utilization: Option<f64>,
    video_decode_utilization: Option<f64>,
    picture_decode_utilization: Option<f64>,
    instances: Vec<InstanceMonitorInfo>,
}

/// A partition on a card, with what its driver measured (not in the text).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceMonitorInfo {
    partition: String,
    /// Who holds it: `service:<id>`, `workload:<cluster>/<namespace>/<name>`, ...
    owner: Option<String>,
    /// 0-1; null when the driver cannot measure it.
    xpu_utilization: Option<f64>,
    /// GB.
    xpu_memory_used: Option<f64>,
    /// GB: the partition's memory quota.
    xpu_memory: f64,
}

/// Tables C.6 and C.10: the shared figures.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    cpu: u32,
    /// Null without a sample (no node, or before the first one).
    cpu_utilization: Option<f64>,
    cpu_utilization_list: Vec<TrendPoint>,
    memory: u32,
    memory_used: Option<f64>,
    memory_used_list: Vec<TrendPoint>,
    /// Null when the data directory's disk is not found.
    disk: Option<u32>,
    disk_used: Option<f64>,
    disk_used_list: Vec<TrendPoint>,
    xpu_monitors: Vec<XpuMonitorInfo>,
}

/// Table C.6.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct ClusterMonitorInfo {
    id: u64,
    cluster_name: String,
    #[serde(flatten)]
    usage: Usage,
}

/// Table C.10.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct NodeMonitorInfo {
    id: u64,
    ip: String,
    #[serde(flatten)]
    usage: Usage,
    /// The scheduling labels its accelerators' drivers publish (not in the text).
    xpu_labels: Vec<super::DriverLabels>,
}

/// Table C.8 (the node id also comes in the path).
#[derive(Debug, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct NodeMonitorRequest {
    pub cluster_code: String,
    /// The path's id again (accepted when equal; not documented).
    #[serde(default)]
    #[param(ignore)]
    #[schema(ignore)]
    pub node_id: Option<String>,
}

fn trend(
    history: &[std::sync::Arc<Sample>],
    value: impl Fn(&Sample) -> Option<f64>,
) -> Vec<TrendPoint> {
    history
        .iter()
        .filter_map(|s| value(s).map(|v| TrendPoint(s.at_ms, v)))
        .collect()
}

/// The figures of `nodes` machines (this one, or none).
fn usage(app: &App, nodes: usize) -> Usage {
    if nodes == 0 {
        return Usage {
            cpu: 0,
            cpu_utilization: None,
            cpu_utilization_list: Vec::new(),
            memory: 0,
            memory_used: None,
            memory_used_list: Vec::new(),
            disk: Some(0),
            disk_used: None,
            disk_used_list: Vec::new(),
            xpu_monitors: Vec::new(),
        };
    }
    let facts = app.machine.facts();
    let history = app.machine.history();
    let latest = history.last();
    let owners = app.scheduler.partition_owners();
    let xpu_monitors = latest
        .map(|now| {
            now.xpus
                .iter()
                .enumerate()
                .map(|(i, xpu)| {
                    // Each card's trend is one pass over the history (cards keep
                    // their place from sample to sample): bounded, and cheap enough
                    // for the request path.
                    let of = |s: &Sample, figure: fn(&XpuSample) -> Option<f64>| {
                        crate::machine::card(s, &xpu.key, i).and_then(figure)
                    };
                    XpuMonitorInfo {
                        xpu_memory: xpu.memory_total_gb.map(|g| g.round() as u32),
                        xpu_memory_used: xpu.memory_used_gb,
                        xpu_memory_used_list: trend(&history, |s| of(s, |x| x.memory_used_gb)),
                        xpu_utilization: xpu.utilization,
                        xpu_utilization_list: trend(&history, |s| of(s, |x| x.utilization)),
                        xpu_type: xpu.xpu_type.to_string(),
                        simulated: xpu.simulated,
                        card: xpu.key.to_string(),
                        health: crate::sampler::health_name(xpu.health),
                        xpu_memory_utilization: match (xpu.memory_used_gb, xpu.memory_total_gb) {
                            (Some(used), Some(total)) if total > 0.0 => Some(used / total),
                            _ => None,
                        },
                        video_decode_utilization: xpu.decode_utilization,
                        picture_decode_utilization: xpu.picture_decode_utilization,
                        instances: instances(app, &owners, xpu),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    Usage {
        cpu: facts.cpu_cores,
        cpu_utilization: latest.map(|s| s.cpu_utilization),
        cpu_utilization_list: trend(&history, |s| Some(s.cpu_utilization)),
        memory: facts.memory_total_gb.round() as u32,
        memory_used: latest.map(|s| s.memory_used_gb),
        memory_used_list: trend(&history, |s| Some(s.memory_used_gb)),
        disk: facts.disk_total_gb.map(|gb| gb.round() as u32),
        disk_used: latest.and_then(|s| s.disk_used_gb),
        disk_used_list: trend(&history, |s| s.disk_used_gb),
        xpu_monitors,
    }
}

/// The partitions on card `xpu` and who holds them.
fn instances(
    app: &App,
    owners: &std::collections::HashMap<(String, String), String>,
    xpu: &XpuSample,
) -> Vec<InstanceMonitorInfo> {
    let Some((driver, index)) = xpu.card() else {
        return Vec::new();
    };
    app.samples
        .instances_on(driver, index)
        .into_iter()
        .map(|i| InstanceMonitorInfo {
            owner: owners
                .get(&(driver.to_string(), i.partition_id.clone()))
                .cloned(),
            partition: i.partition_id,
            xpu_utilization: i.ai_utilization_pct.map(|p| f64::from(p) / 100.0),
            xpu_memory_used: i.memory_used_mib.map(|m| m as f64 / 1024.0),
            xpu_memory: i.memory_quota_mib as f64 / 1024.0,
        })
        .collect()
}

pub fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(cluster_monitor))
        .routes(routes!(node_monitor))
}

/// C.2: A cluster's resource monitor.
#[utoipa::path(get, path = "/CCP/cluster/monitors/{clusterCode}", tag = "C",
    params(("clusterCode" = String, Path, description = "The cluster's code")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<ClusterMonitorInfo>), CodeStringFailures))]
async fn cluster_monitor(
    State(app): State<App>,
    PathParam(code, ..): PathParam<CodeString>,
) -> Answer<CodeString, ClusterMonitorInfo> {
    let cluster = app.clusters.get(&code)?;
    let nodes = app.clusters.nodes(&code)?.len();
    Ok(Reply::data(ClusterMonitorInfo {
        id: cluster.id,
        cluster_name: cluster.name,
        usage: usage(&app, nodes),
    }))
}

/// C.3: A node's resource monitor.
#[utoipa::path(get, path = "/CCP/node/monitors/{nodeId}", tag = "C",
    params(("nodeId" = String, Path, description = "The node's id"), NodeMonitorRequest),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<NodeMonitorInfo>), CodeStringFailures))]
async fn node_monitor(
    State(app): State<App>,
    PathParam(node_id, ..): PathParam<CodeString>,
    Params(request, ..): Params<NodeMonitorRequest, CodeString>,
) -> Answer<CodeString, NodeMonitorInfo> {
    if let Some(other) = request.node_id.filter(|n| *n != node_id) {
        return Err(Failure::bad_request(format!(
            "nodeId {other:?} does not match the path's {node_id:?}"
        )));
    }
    app.clusters.get(&request.cluster_code)?;
    if app.clusters.cluster_of(&node_id).as_deref() != Some(request.cluster_code.as_str()) {
        return Err(Failure::not_found(format!(
            "no node {node_id:?} in cluster {}",
            request.cluster_code
        )));
    }
    Ok(Reply::data(NodeMonitorInfo {
        // The single machine is node 1.
        id: 1,
        ip: app.external_ip().to_string(),
        usage: usage(&app, 1),
        xpu_labels: app.xpu_labels(),
    }))
}
