//! The HTTP API: health and the plugin listing, and the standard's endpoints, one
//! module per appendix:
//!
//! | module | appendix | paths |
//! |---|---|---|
//! | [`clusters`] | A | `/CCP/clusters`, `/CCP/cluster/nodes` |
//! | [`workloads`] | B | `/CCP/algoService/workloads`, `/CCP/algoService/pods` |
//! | [`monitors`] | C | `/CCP/cluster/monitors`, `/CCP/node/monitors` |
//! | [`compute`] | D.5 | `/CAP/Status` |
//! | [`algorithms`] | E | `/CAP/AlgoFilePackages`, `/CAP/AlgoPackages` |
//! | [`services`] | F | `/CAP/AlgoServices` |
//! | [`tasks`] | G | `/CAP/AlgoTasks` |
//! | [`machine`] | H.5 | `/CAD/machine/status` |
//! | [`machine_packages`] | I | `/CAD/machine/algoFilePackages`, `/CAD/machine/algoPackages` |

use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::Method;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

pub mod algorithms;
pub mod clusters;
pub mod compute;
mod envelope;
mod input;
pub mod machine;
pub mod machine_packages;
pub mod monitors;
pub mod oauth;
mod page;
pub mod services;
pub mod tasks;
pub mod workloads;

use crate::clusters::XpuResource;
use crate::clusters::{Clusters, NodeOffer};
use crate::error::Error;
use crate::machine::Machine;
use crate::machine_packages::MachinePackages;
use crate::packages::Packages;
use crate::plugins::registry::PluginView;
use crate::plugins::Registry;
use crate::runtime::engine::Allocator;
use crate::sampler::SampleCache;
use crate::services::Services;
use crate::store::Store;
use crate::tasks::Tasks;
use crate::workloads::Workloads;

/// Everything the handlers share.
pub struct AppState {
    pub auth: Arc<crate::auth::Auth>,
    /// None when serving plain HTTP (`--insecure-http`).
    pub tls: Option<Arc<crate::tls::Tls>>,
    pub registry: Arc<Registry>,
    pub samples: Arc<SampleCache>,
    pub machine: Arc<Machine>,
    pub store: Arc<Store>,
    pub clusters: Clusters,
    pub packages: Arc<Packages>,
    pub services: Arc<Services>,
    pub tasks: Arc<Tasks>,
    pub workloads: Arc<Workloads>,
    /// Who holds each card's partitions (the monitors name them).
    pub scheduler: Arc<crate::scheduler::Scheduler>,
    /// The address the server is bound to.
    pub listen: SocketAddr,
    /// This machine's code in CAD mode (Appendix H).
    pub machine_code: String,
    pub machine_packages: MachinePackages,
    /// Where the platform serves file packages in CAD mode (I.2), `{id}` in it.
    pub package_url: Option<String>,
    /// `GET /metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
}

#[derive(Clone)]
pub struct App(pub Arc<AppState>);

impl Deref for App {
    type Target = AppState;
    fn deref(&self) -> &AppState {
        &self.0
    }
}

/// Where a replica (F.5) or pod (B.7) runs, and what its partition uses as the
/// driver reports it (§10.1 d; not in the tables, clients ignore them). A figure
/// the driver does not report is absent.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placed {
    /// `driver/index` of its card; absent on CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    card: Option<String>,
    /// The driver's partition, where it made one.
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<String>,
    /// The partition's device as its inference worker sees it (a MIG instance's
    /// uuid, a time slice's card's), where the driver named one: the models run
    /// in that worker, and its usage is the partition's.
    #[serde(skip_serializing_if = "Option::is_none")]
    partition_device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ai_utilization_pct: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_used_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_quota_mib: Option<u64>,
}

/// One driver's scheduling labels on this node (A.9, C.3; not in the text).
#[derive(Clone, Debug, serde::Serialize, ToSchema)]
pub struct DriverLabels {
    pub driver: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// How a client reaches this xpud (A.6).
pub struct Access {
    pub external_address: String,
    pub inner_address: String,
    /// The CA to trust (PEM); empty over plain HTTP or when xpud is not told the CA
    /// of a configured certificate.
    pub ca_cert: String,
}

impl App {
    /// Runs state changes (which write the store) on a blocking thread.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&App) -> crate::error::Result<T> + Send + 'static,
    ) -> crate::error::Result<T> {
        let app = self.clone();
        tokio::task::spawn_blocking(move || f(&app))
            .await
            .map_err(|e| Error::Internal(anyhow::anyhow!("worker thread failed: {e}")))?
    }

    /// This machine's accelerators now, from the drivers' latest samples (taken at
    /// start, before the first request, and every sampler interval after). The one
    /// source for inventories and placements alike.
    pub fn xpus(&self) -> Vec<crate::machine::XpuSample> {
        let drivers: Vec<String> = self
            .registry
            .drivers()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        crate::machine::xpus(&self.samples, &drivers)
    }

    /// What this machine offers pods (B.2 cpu and memory are reserved from it).
    pub fn node_capacity(&self) -> crate::workloads::NodeCapacity {
        let facts = self.machine.facts();
        crate::workloads::NodeCapacity {
            cpu: facts.cpu_cores,
            memory_gb: facts.memory_total_gb,
        }
    }

    /// What still runs file package `id` (an installed package, a workload's pods):
    /// such a package is not deleted.
    pub fn user_of_file_package(&self, id: &str) -> Option<String> {
        self.machine_packages
            .user_of_file(id)
            .or_else(|| self.workloads.user_of_package(id))
    }

    /// Where a replica or pod runs, with its partition's current figures.
    pub fn placed(&self, placement: Option<&crate::scheduler::Placement>) -> Placed {
        let card = placement.and_then(|p| p.card.as_ref());
        let partition = placement.and_then(|p| p.partition.clone());
        let figures = card
            .zip(partition.as_ref())
            .and_then(|((driver, _), partition)| self.samples.instance(driver, partition));
        Placed {
            card: card.map(|(driver, index)| format!("{driver}/{index}")),
            partition,
            partition_device: placement.and_then(|p| p.partition_device.clone()),
            ai_utilization_pct: figures.as_ref().and_then(|f| f.ai_utilization_pct),
            memory_used_mib: figures.as_ref().and_then(|f| f.memory_used_mib),
            memory_quota_mib: figures.as_ref().map(|f| f.memory_quota_mib),
        }
    }

    /// The scheduling labels each driver publishes for this node (what
    /// `labelSelector` keys under `xpu.` select cards by).
    pub fn xpu_labels(&self) -> Vec<DriverLabels> {
        let mut out: Vec<DriverLabels> = Vec::new();
        for xpu in self.xpus() {
            let driver = xpu.card().map_or(&*xpu.key, |(d, _)| d);
            if out.iter().any(|l| l.driver == driver) {
                continue;
            }
            out.push(DriverLabels {
                driver: driver.to_string(),
                labels: xpu.labels.iter().cloned().collect(),
            });
        }
        out
    }

    /// This machine's accelerators by type.
    pub fn xpu_inventory(&self) -> Vec<XpuResource> {
        let mut inventory: Vec<XpuResource> = Vec::new();
        for xpu in self.xpus() {
            match inventory
                .iter_mut()
                .find(|x| *x.xpu_type == *xpu.xpu_type && x.simulated == xpu.simulated)
            {
                Some(entry) => entry.num += 1,
                None => inventory.push(XpuResource {
                    xpu_type: xpu.xpu_type.to_string(),
                    num: 1,
                    simulated: xpu.simulated,
                }),
            }
        }
        inventory
    }

    /// What this machine offers a cluster as a node.
    pub fn node_offer(&self) -> NodeOffer {
        let facts = self.machine.facts();
        NodeOffer {
            node_id: self.machine.node_id(),
            cpu: facts.cpu_cores,
            memory_gb: facts.memory_total_gb,
            disk_gb: facts.disk_total_gb,
            xpus: self.xpu_inventory(),
        }
    }

    /// The address other machines reach this one at.
    pub fn external_ip(&self) -> IpAddr {
        self.machine.facts().ip
    }

    /// A.6: the addresses, and the CA and client pair of the TLS in use (empty when
    /// serving plain HTTP).
    pub fn access(&self) -> anyhow::Result<Access> {
        let port = self.listen.port();
        let ca_cert = match &self.tls {
            Some(tls) => tls.ca_pem()?.unwrap_or_default(),
            None => String::new(),
        };
        Ok(Access {
            external_address: SocketAddr::new(self.external_ip(), port).to_string(),
            inner_address: SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port).to_string(),
            ca_cert,
        })
    }
}

/// The API document's frame; the paths and schemas come from the handlers'
/// `#[utoipa::path]` attributes as each module's routes are registered.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "xpud",
        description = "The central computing power interfaces of the video-analytics \
            standard (Part 4), served by xpud. Each appendix answers in its own envelope \
            (`CodeStringBody`: A, B, C, H, I; `CodeIntBody`: E, F, G; `CodeIntMessageBody`: \
            D). GET parameters may come as a query string or as a JSON body. Pages are \
            1-based."
    ),
    tags(
        (name = "A", description = "Appendix A: cluster compute management"),
        (name = "B", description = "Appendix B: algorithm workloads and their pods"),
        (name = "C", description = "Appendix C: cluster and node resource monitors"),
        (name = "D", description = "Appendix D.5: this machine's compute and its use"),
        (name = "E", description = "Appendix E: algorithm file packages and algorithms"),
        (name = "F", description = "Appendix F: algorithm services"),
        (name = "G", description = "Appendix G: video analysis tasks"),
        (name = "H", description = "Appendix H.5: machine status (CAD mode)"),
        (name = "I", description = "Appendix I: machine algorithm packages (CAD mode)"),
        (name = "xpud", description = "xpud's own endpoints"),
    ),
    // Referenced by hand-written schemas (G.2's `destinations`), not by a derive;
    // and what a task delivers to its destinations (docs/events.md).
    components(schemas(
        crate::tasks::spec::HttpDest,
        crate::tasks::spec::EventDest,
        crate::tasks::events::EventDocument
    ))
)]
struct ApiDoc;

/// The API and its OpenAPI document, built from the same registrations.
pub fn api() -> (Router<App>, utoipa::openapi::OpenApi) {
    let (router, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(oauth::token))
        .routes(routes!(plugins))
        .routes(routes!(metrics))
        .merge(named("clusters", clusters::routes()))
        .merge(named("workloads", workloads::routes()))
        .merge(named("monitors", monitors::routes()))
        .merge(named("compute", compute::routes()))
        .merge(named("algorithms", algorithms::routes()))
        .merge(named("services", services::routes()))
        .merge(named("tasks", tasks::routes()))
        .merge(named("machine", machine::routes()))
        .merge(named("machine_packages", machine_packages::routes()))
        .split_for_parts();
    secure(&mut document);
    (router, document)
}

/// Names the token endpoint as the OAuth2 scheme and, on every operation but the
/// open ones, the scope it needs (the rule the guard applies).
fn secure(document: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::{
        ClientCredentials, Flow, OAuth2, Scopes, SecurityRequirement, SecurityScheme,
    };
    let scopes = Scopes::from_iter([
        ("read", "GET endpoints and the :search queries"),
        ("write", "everything that changes state"),
    ]);
    let scheme = SecurityScheme::OAuth2(OAuth2::new([Flow::ClientCredentials(
        ClientCredentials::new(oauth::TOKEN_PATH, scopes),
    )]));
    document
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme("oauth2", scheme);
    for (path, item) in document.paths.paths.iter_mut() {
        for (method, operation) in operations(item) {
            if let Some(scope) = oauth::required_scope(&method, path) {
                operation.security =
                    Some(vec![SecurityRequirement::new("oauth2", [scope.as_str()])]);
            }
        }
    }
}

/// The operations of the methods xpud serves, with their method.
fn operations(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = (Method, &mut utoipa::openapi::path::Operation)> {
    [
        (Method::GET, &mut item.get),
        (Method::PUT, &mut item.put),
        (Method::POST, &mut item.post),
        (Method::DELETE, &mut item.delete),
    ]
    .into_iter()
    .filter_map(|(method, operation)| Some((method, operation.as_mut()?)))
}

/// The OpenAPI document as JSON.
pub fn openapi_json() -> String {
    render(&api().1)
}

fn render(document: &utoipa::openapi::OpenApi) -> String {
    let mut value = serde_json::to_value(document).expect("an OpenAPI document always serialises");
    forbid_hidden_controls(&mut value);
    serde_json::to_string_pretty(&value).expect("a JSON value always serialises")
}

/// `text::is_hidden_control` (what `input` refuses in names, codes and ids), as a
/// JSON Schema pattern: change the two together.
const NO_HIDDEN_CONTROLS: &str =
    "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$";
const NOT_BLANK_NO_HIDDEN_CONTROLS: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*[^\\s\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069][^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$";

/// Writes the rule `input` applies into the document, from the same test
/// (`input::names_something`): path parameters, and query parameters and
/// properties named like names, codes and ids, take no hidden control characters.
/// A schema-driven client then never sends what the server refuses.
fn forbid_hidden_controls(value: &mut serde_json::Value) {
    use serde_json::Value;
    fn is_string(schema: &Value) -> bool {
        match schema.get("type") {
            Some(Value::String(t)) => t == "string",
            Some(Value::Array(types)) => types.iter().any(|t| t == "string"),
            _ => false,
        }
    }
    fn constrain(schema: &mut Value) {
        if schema.get("type") == Some(&Value::from("array")) {
            if let Some(items) = schema.get_mut("items") {
                constrain(items);
            }
            return;
        }
        if !is_string(schema) {
            return;
        }
        let pattern = match schema.get("pattern").and_then(Value::as_str) {
            None => NO_HIDDEN_CONTROLS,
            // "Not blank" (`\S`, written on the field) and no hidden controls.
            Some(r"\S") => NOT_BLANK_NO_HIDDEN_CONTROLS,
            Some(_) => return,
        };
        if let Some(schema) = schema.as_object_mut() {
            schema.insert("pattern".into(), pattern.into());
        }
    }
    match value {
        Value::Object(map) => {
            let location = map.get("in").and_then(Value::as_str).map(str::to_string);
            let name = map
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let applies = match location.as_deref() {
                Some("path") => true,
                Some("query") => input::names_something(&name),
                _ => false,
            };
            if applies {
                if let Some(schema) = map.get_mut("schema") {
                    constrain(schema);
                }
            }
            if let Some(Value::Object(properties)) = map.get_mut("properties") {
                for (key, schema) in properties.iter_mut() {
                    if input::names_something(key) {
                        constrain(schema);
                    }
                }
            }
            for child in map.values_mut() {
                forbid_hidden_controls(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(forbid_hidden_controls),
        _ => {}
    }
}

pub fn router(app: App) -> Router {
    let (router, document) = api();
    // Rendered once: the document does not change while serving.
    let document = Bytes::from(render(&document));
    router
        .route(
            "/openapi.json",
            get(move || async move { ([(CONTENT_TYPE, "application/json")], document) }),
        )
        // Bodies are read, and limited, by `input` (which drains what is over).
        .layer(DefaultBodyLimit::disable())
        .fallback(no_such_endpoint)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn(tasks::honest_allow))
        // Outermost: no route, not even a 404, answers without a token.
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            oauth::guard,
        ))
        // Before anything reads a body, or asks for one with "100 Continue".
        .layer(axum::middleware::from_fn(input::refuse_oversized))
        .with_state(app)
}

/// Operation ids are the handlers' names, which repeat across modules (`create`,
/// `detail`): the module's name makes them unique.
fn named(module: &str, mut router: OpenApiRouter<App>) -> OpenApiRouter<App> {
    for item in router.get_openapi_mut().paths.paths.values_mut() {
        for (_, operation) in operations(item) {
            if let Some(id) = &operation.operation_id {
                operation.operation_id = Some(format!("{module}_{id}"));
            }
        }
    }
    router
}

/// Serves `routes` at its documented path and, undocumented, at the same path with
/// `prefix` spelt each of `spellings` ways (the text spells some paths several ways).
fn also_spelt(
    router: OpenApiRouter<App>,
    routes: UtoipaMethodRouter<App>,
    prefix: &str,
    spellings: &[&str],
) -> OpenApiRouter<App> {
    let mut router = router;
    for path in routes.1.paths.keys() {
        for spelling in spellings {
            router = router.route(&path.replacen(prefix, spelling, 1), routes.2.clone());
        }
    }
    router.routes(routes)
}

/// The envelope family of the appendix a path belongs to.
fn family_of(path: &str) -> fn(u16, &str) -> axum::response::Response {
    use envelope::{CodeInt, CodeIntMessage, CodeString, Family};
    if path.starts_with("/CAP/Status") || path.starts_with("/ACP/") {
        |code, message| CodeIntMessage::body::<()>(code, message, None)
    } else if path.starts_with("/CAP/") {
        |code, message| CodeInt::body::<()>(code, message, None)
    } else {
        |code, message| CodeString::body::<()>(code, message, None)
    }
}

/// Unknown paths answer 404 in the envelope of the appendix they look like.
async fn no_such_endpoint(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> axum::response::Response {
    family_of(uri.path())(404, &format!("no such endpoint: {method} {}", uri.path()))
}

/// A known path with a method it does not take answers 405, likewise.
async fn wrong_method(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> axum::response::Response {
    family_of(uri.path())(405, &format!("{} does not take {method}", uri.path()))
}

/// Everything xpud observes, for Prometheus: cards (DCGM exporter's names and
/// labels) and their instances, the host, the plugins, each task's pipeline and
/// delivery, the model sessions. Read from what the API reads; never calls a
/// plugin.
#[utoipa::path(get, path = "/metrics", tag = "xpud", responses((status = 200, description = "The OpenMetrics text exposition", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String)))]
async fn metrics(State(state): State<App>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let metrics = state.metrics.clone();
    // The event queues are counted in the store: off the async threads.
    match tokio::task::spawn_blocking(move || metrics.render()).await {
        Ok(Ok(text)) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::metrics::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        _ => {
            tracing::error!("cannot render the metrics");
            axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Liveness: answers while the server runs.
#[utoipa::path(get, path = "/healthz", tag = "xpud", responses((status = 200, description = "The server is up", body = Object, example = json!({"status": "ok"}))))]
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

#[derive(serde::Serialize, ToSchema)]
struct PluginList {
    allocator: Allocator,
    plugin_dir: String,
    plugins: Vec<PluginRow>,
}

#[derive(serde::Serialize, ToSchema)]
struct PluginRow {
    #[serde(flatten)]
    plugin: PluginView,
    /// Drivers: what the current sample found (none while the figures are stale).
    #[serde(skip_serializing_if = "Option::is_none")]
    devices: Option<Vec<DeviceRow>>,
    /// Drivers: when the last good sample was taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    sampled_at_ms: Option<u64>,
    /// Drivers: no current sample, so its cards are absent from every figure and
    /// from placement until it answers again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stale: bool,
    /// Drivers: why the last sampling attempt failed, while it keeps failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    sample_error: Option<String>,
    /// Drivers: their devices' latest health changes (up to 32), oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    health_changes: Vec<crate::sampler::HealthChange>,
}

#[derive(serde::Serialize, ToSchema)]
struct DeviceRow {
    id: String,
    index: u32,
    accelerator_type: String,
    /// As the driver reports it: healthy, degraded, unhealthy, unknown (an
    /// unhealthy card is not placed on).
    health: &'static str,
    memory_total_mib: Option<u64>,
    pci_bus_id: Option<String>,
}

/// Loaded and refused plugins with their state. Reads the registry's and the
/// supervisors' bookkeeping and the sampler's cache only: it never calls a plugin.
#[utoipa::path(get, path = "/plugins", tag = "xpud", responses((status = 200, description = "The plugin directory's state", body = PluginList)))]
async fn plugins(State(state): State<App>) -> Json<PluginList> {
    let plugins = state
        .registry
        .views()
        .into_iter()
        .map(|plugin| {
            let snapshot = state.samples.get(&plugin.name);
            let sampling = state.samples.sampling(&plugin.name);
            PluginRow {
                devices: snapshot.as_ref().map(|s| {
                    s.devices
                        .iter()
                        .map(|d| DeviceRow {
                            id: d.id.clone(),
                            index: d.index,
                            accelerator_type: d.accelerator_type.clone(),
                            health: crate::sampler::health_name(d.health),
                            memory_total_mib: d.memory_total_mib,
                            pci_bus_id: d.pci_bus_id.clone(),
                        })
                        .collect()
                }),
                sampled_at_ms: sampling.sampled_at.and_then(|at| {
                    at.duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_millis() as u64)
                }),
                stale: sampling.stale,
                sample_error: sampling.last_error,
                health_changes: state.samples.health_changes(&plugin.name),
                plugin,
            }
        })
        .collect();
    Json(PluginList {
        allocator: state.registry.runtime().allocator(),
        plugin_dir: state.registry.plugin_dir().display().to_string(),
        plugins,
    })
}
