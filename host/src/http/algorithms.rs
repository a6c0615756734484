//! Appendix E: algorithm file packages and algorithms pushed by the platform
//! (`/CAP/AlgoFilePackages`, `/CAP/AlgoPackages`). A push answers at once; the
//! download runs in the background and the package's `status` (0 ready,
//! 1 downloading, 2 failed) and `statusDesc` say how it went.

use axum::extract::State;
use serde::{Deserialize, Serialize};

use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::envelope::{Answer, CodeInt, CodeIntBody, CodeIntFailures, Failure, Reply};
use super::input::{Body, PathParam};
use super::page::{self, Page};
use super::App;
use crate::package::{EnvVar, GpuRequirement};
use crate::packages::{Algorithm, FilePackage};

/// Tables E.10 and E.18.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PushRequest {
    /// 1-128 characters, no '/', '\\', blanks or control characters, no leading '.'.
    #[schema(pattern = r"^[^./\\\s\x00-\x1f\x7f-\x9f][^/\\\s\x00-\x1f\x7f-\x9f]{0,127}$")]
    pub id: String,
    /// 32 hex digits, or empty: not given (the download is not checked).
    #[schema(pattern = r"^([0-9a-fA-F]{32})?$")]
    pub md5: String,
    /// An http or https URL with a host (a name whose last label starts with a
    /// letter, or an IPv4 address).
    #[schema(
        pattern = r"^https?://(([A-Za-z0-9-]+\.)*[A-Za-z][A-Za-z0-9-]*|((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9]))(:[1-9][0-9]{0,3})?(/[^\s]*)?$"
    )]
    pub url: String,
}

/// Table E.14 (E.22 has no `name`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SearchRequest {
    #[schema(minimum = 1)]
    pub page_number: u32,
    #[schema(minimum = 1, maximum = 1000)]
    pub page_size: u32,
    #[serde(default)]
    pub name: Option<String>,
}

/// `data: {}`.
#[derive(Serialize, ToSchema)]
pub struct Empty {}

#[derive(Serialize, ToSchema)]
struct Deleted {
    id: String,
}

/// Table E.15's record.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct FilePackageRecord {
    id: String,
    name: String,
    version: String,
    author: String,
    description: String,
    status: u8,
    status_desc: String,
}

#[derive(Serialize, ToSchema)]
struct NameValue {
    name: String,
    value: String,
}

fn env(vars: &[EnvVar]) -> Vec<NameValue> {
    vars.iter()
        .map(|v| NameValue {
            name: v.name.clone(),
            value: v.value.clone(),
        })
        .collect()
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct BinView {
    #[serde(rename = "type")]
    kind: String,
    remote_uri: String,
    local_uri: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct CapacitiesView {
    stream_video_quota: u32,
    stream_capture_quota: u32,
    analyze_quota: u32,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct GpuView {
    quota: f64,
    limit: f64,
    vendor: String,
    accelerator: String,
    capacities: CapacitiesView,
    resolution: String,
}

fn gpu(g: &GpuRequirement) -> GpuView {
    GpuView {
        quota: g.quota,
        limit: g.limit,
        vendor: g.vendor.clone(),
        accelerator: g.accelerator.clone(),
        capacities: CapacitiesView {
            stream_video_quota: g.capacities.stream_video_quota,
            stream_capture_quota: g.capacities.stream_capture_quota,
            analyze_quota: g.capacities.analyze_quota,
        },
        resolution: g.resolution.clone(),
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct RuntimeView {
    cmd: String,
    env: Vec<NameValue>,
    gpu: Vec<GpuView>,
}

/// Table E.17.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct FilePackageDetail {
    #[serde(flatten)]
    record: FilePackageRecord,
    tags: Vec<String>,
    env: Vec<NameValue>,
    bin: BinView,
    algo_runtime: RuntimeView,
}

fn record(file: &FilePackage) -> FilePackageRecord {
    let info = file.manifest.as_ref().map(|m| &m.package);
    FilePackageRecord {
        id: file.id.clone(),
        name: info.map(|p| p.name.clone()).unwrap_or_default(),
        version: info.map(|p| p.version.clone()).unwrap_or_default(),
        author: info.map(|p| p.author.clone()).unwrap_or_default(),
        description: info.map(|p| p.description.clone()).unwrap_or_default(),
        status: file.status.into(),
        status_desc: file.status_desc.clone(),
    }
}

/// Tables E.23 and E.25.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct AlgorithmRecord {
    id: String,
    url: String,
    related_algo_file_package_id: String,
    status: u8,
    status_desc: String,
}

fn algorithm_record(a: &Algorithm) -> AlgorithmRecord {
    AlgorithmRecord {
        id: a.id.clone(),
        url: a.url.clone(),
        related_algo_file_package_id: a.file_package_id.clone().unwrap_or_default(),
        status: a.status.into(),
        status_desc: a.status_desc.clone(),
    }
}

pub fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(push_file))
        .routes(routes!(search_files))
        .routes(routes!(file_detail, delete_file))
        .routes(routes!(push_algorithm))
        .routes(routes!(search_algorithms))
        .routes(routes!(algorithm_detail, delete_algorithm))
}

/// E.2: Push an algorithm file package.
#[utoipa::path(post, path = "/CAP/AlgoFilePackages", tag = "E", request_body = PushRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<Empty>), CodeIntFailures))]
async fn push_file(
    State(app): State<App>,
    Body(request, ..): Body<PushRequest, CodeInt>,
) -> Answer<CodeInt, Empty> {
    let id = request.id.clone();
    app.blocking(move |app| {
        app.packages
            .push_file(&request.id, &request.md5, &request.url)
    })
    .await?;
    tokio::spawn(app.packages.clone().install_file(id));
    Ok(Reply::data(Empty {}))
}

/// E.3: Delete an algorithm file package.
#[utoipa::path(delete, path = "/CAP/AlgoFilePackages/{id}", tag = "E", params(("id" = String, Path, description = "The file package's id")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<Deleted>), CodeIntFailures))]
async fn delete_file(
    State(app): State<App>,
    PathParam(id, ..): PathParam<CodeInt>,
) -> Answer<CodeInt, Deleted> {
    let deleted = id.clone();
    app.blocking(move |app| app.packages.delete_file(&id, app.user_of_file_package(&id)))
        .await?;
    Ok(Reply::data(Deleted { id: deleted }))
}

/// E.4: Search algorithm file packages.
#[utoipa::path(post, path = "/CAP/AlgoFilePackages:search", tag = "E", request_body = SearchRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<Page<FilePackageRecord>>), CodeIntFailures))]
async fn search_files(
    State(app): State<App>,
    Body(request, ..): Body<SearchRequest, CodeInt>,
) -> Answer<CodeInt, Page<FilePackageRecord>> {
    page::check(request.page_number, request.page_size).map_err(Failure::bad_request)?;
    let files: Vec<FilePackage> = app
        .packages
        .files()
        .into_iter()
        .filter(|f| match &request.name {
            None => true,
            Some(name) => f
                .manifest
                .as_ref()
                .is_some_and(|m| m.package.name.contains(name.as_str())),
        })
        .collect();
    Ok(Reply::data(page::of(
        files.iter(),
        request.page_number,
        request.page_size,
        record,
    )))
}

/// E.5: An algorithm file package's detail.
#[utoipa::path(get, path = "/CAP/AlgoFilePackages/{id}", tag = "E", params(("id" = String, Path, description = "The file package's id")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<FilePackageDetail>), CodeIntFailures))]
async fn file_detail(
    State(app): State<App>,
    PathParam(id, ..): PathParam<CodeInt>,
) -> Answer<CodeInt, FilePackageDetail> {
    let file = app.packages.file(&id)?;
    let manifest = file.manifest.as_ref();
    let local = app.packages.package_path(&file.id);
    Ok(Reply::data(FilePackageDetail {
        record: record(&file),
        tags: manifest.map(|m| m.package.tags.clone()).unwrap_or_default(),
        env: manifest.map(|m| env(&m.package.env)).unwrap_or_default(),
        bin: BinView {
            kind: manifest.map(|m| m.bin.kind.clone()).unwrap_or_default(),
            remote_uri: manifest
                .map(|m| m.bin.remote_uri.clone())
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| file.url.clone()),
            local_uri: if manifest.is_some() {
                local.display().to_string()
            } else {
                String::new()
            },
        },
        algo_runtime: RuntimeView {
            cmd: manifest.map(|m| m.runtime.cmd.clone()).unwrap_or_default(),
            env: manifest.map(|m| env(&m.runtime.env)).unwrap_or_default(),
            gpu: manifest
                .map(|m| m.runtime.gpu.iter().map(gpu).collect())
                .unwrap_or_default(),
        },
    }))
}

/// E.6: Push an algorithm.
#[utoipa::path(post, path = "/CAP/AlgoPackages", tag = "E", request_body = PushRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<Empty>), CodeIntFailures))]
async fn push_algorithm(
    State(app): State<App>,
    Body(request, ..): Body<PushRequest, CodeInt>,
) -> Answer<CodeInt, Empty> {
    let id = request.id.clone();
    app.blocking(move |app| {
        app.packages
            .push_algorithm(&request.id, &request.md5, &request.url)
    })
    .await?;
    tokio::spawn(app.packages.clone().install_algorithm(id));
    Ok(Reply::data(Empty {}))
}

/// E.7: Delete an algorithm.
#[utoipa::path(delete, path = "/CAP/AlgoPackages/{id}", tag = "E", params(("id" = String, Path, description = "The algorithm's id")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<Empty>), CodeIntFailures))]
async fn delete_algorithm(
    State(app): State<App>,
    PathParam(id, ..): PathParam<CodeInt>,
) -> Answer<CodeInt, Empty> {
    app.blocking(move |app| {
        // A package bundled in the algorithm's archive goes with it: whatever uses
        // that package holds the algorithm too.
        let in_use = app.services.user_of(&id).or_else(|| {
            app.packages
                .bundled_package(&id)
                .and_then(|file| app.user_of_file_package(&file))
        });
        app.packages.delete_algorithm(&id, in_use)
    })
    .await?;
    Ok(Reply::data(Empty {}))
}

/// E.8: Search algorithms.
#[utoipa::path(post, path = "/CAP/AlgoPackages:search", tag = "E", request_body = SearchRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<Page<AlgorithmRecord>>), CodeIntFailures))]
async fn search_algorithms(
    State(app): State<App>,
    Body(request, ..): Body<SearchRequest, CodeInt>,
) -> Answer<CodeInt, Page<AlgorithmRecord>> {
    page::check(request.page_number, request.page_size).map_err(Failure::bad_request)?;
    let algorithms = app.packages.algorithms();
    Ok(Reply::data(page::of(
        algorithms.iter(),
        request.page_number,
        request.page_size,
        algorithm_record,
    )))
}

/// E.9: An algorithm's detail.
#[utoipa::path(get, path = "/CAP/AlgoPackages/{id}", tag = "E", params(("id" = String, Path, description = "The algorithm's id")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntBody<AlgorithmRecord>), CodeIntFailures))]
async fn algorithm_detail(
    State(app): State<App>,
    PathParam(id, ..): PathParam<CodeInt>,
) -> Answer<CodeInt, AlgorithmRecord> {
    Ok(Reply::data(algorithm_record(&app.packages.algorithm(&id)?)))
}
