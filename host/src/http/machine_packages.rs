//! Appendix I: algorithm packages on this machine in CAD mode
//! (`/CAD/machine/algoFilePackages`, `/CAD/machine/algoPackages`; the text also
//! writes `algopackages` and `algorithmPackages`, all served).

use axum::extract::State;
use serde::{Deserialize, Serialize};

use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::envelope::{Answer, CodeString, CodeStringBody, CodeStringFailures, Failure, Reply};
use super::input::{Body, Params, PathParam};
use super::App;
use crate::dates::format_ms;
use crate::machine_packages::{MachinePackage, RunState};
use crate::package::PackageType;

/// Table I.8.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FilePackageRequest {
    pub algo_file_package_id: u64,
    #[serde(default)]
    pub auth_address: Option<String>,
    #[serde(default)]
    pub license_file: Option<String>,
}

/// Table I.10.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstallRequest {
    #[schema(pattern = r"^[A-Za-z0-9_.-]{1,127}$")]
    pub algo_package_code: String,
    #[serde(default)]
    pub args: String,
}

/// Table I.12.
#[derive(Debug, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListRequest {
    #[serde(default)]
    pub status: Option<RunState>,
}

/// Table I.14.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct MachineAlgoPackage {
    algo_package_name: String,
    algo_package_type: PackageType,
    algo_package_version: String,
    algo_package_code: String,
    status: RunState,
    created_date: String,
}

fn view((package, state): &(MachinePackage, RunState)) -> MachineAlgoPackage {
    MachineAlgoPackage {
        algo_package_name: package.manifest.package.name.clone(),
        algo_package_type: package.manifest.package.kind,
        algo_package_version: package.manifest.package.version.clone(),
        algo_package_code: package.code.clone(),
        status: *state,
        created_date: format_ms(package.created_ms),
    }
}

/// Documented as `algoPackages`; the text also writes `algopackages` and
/// `algorithmPackages`.
pub fn routes() -> OpenApiRouter<App> {
    let spelt = |router, routes| {
        super::also_spelt(
            router,
            routes,
            "/CAD/machine/algoPackages",
            &[
                "/CAD/machine/algopackages",
                "/CAD/machine/algorithmPackages",
            ],
        )
    };
    let router = OpenApiRouter::new()
        .routes(routes!(receive_file))
        .routes(routes!(delete_file));
    let router = spelt(router, routes!(list, install));
    spelt(router, routes!(detail, uninstall))
}

/// I.2: Receive an algorithm file package: fetched from the platform at `[platform] package-url`, `{id}` replaced.
#[utoipa::path(post, path = "/CAD/machine/algoFilePackages", tag = "I", request_body = FilePackageRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<utoipa::TupleUnit>), CodeStringFailures))]
async fn receive_file(
    State(app): State<App>,
    Body(request, ..): Body<FilePackageRequest, CodeString>,
) -> Answer<CodeString, ()> {
    let id = request.algo_file_package_id.to_string();
    let template = app.package_url.clone().ok_or_else(|| {
        Failure::conflict(
            "this machine has no platform package URL configured ([platform] package-url)",
        )
    })?;
    let url = template.replace("{id}", &id);
    if let (Some(address), Some(file)) = (&request.auth_address, &request.license_file) {
        tracing::info!(package = %id, auth_address = %address, license_file = %file, "package licence reference received");
    }
    let pushed = id.clone();
    app.blocking(move |app| app.packages.push_file_unchecked(&pushed, &url))
        .await?;
    tokio::spawn(app.packages.clone().install_file(id));
    Ok(Reply::empty())
}

/// I.3: Delete a received file package.
#[utoipa::path(delete, path = "/CAD/machine/algoFilePackages/{id}", tag = "I",
    params(("id" = String, Path, description = "The file package's id")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<utoipa::TupleUnit>), CodeStringFailures))]
async fn delete_file(
    State(app): State<App>,
    PathParam(id, ..): PathParam<CodeString>,
) -> Answer<CodeString, ()> {
    app.blocking(move |app| app.packages.delete_file(&id, app.user_of_file_package(&id)))
        .await?;
    Ok(Reply::empty())
}

/// I.4: Install and start an algorithm package.
#[utoipa::path(post, path = "/CAD/machine/algoPackages", tag = "I", request_body = InstallRequest,
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<utoipa::TupleUnit>), CodeStringFailures))]
async fn install(
    State(app): State<App>,
    Body(request, ..): Body<InstallRequest, CodeString>,
) -> Answer<CodeString, ()> {
    app.blocking(move |app| {
        let xpus = app.xpus();
        app.machine_packages
            .install(&request.algo_package_code, &request.args, &xpus)
    })
    .await?;
    Ok(Reply::empty())
}

/// I.5: Uninstall an algorithm package.
#[utoipa::path(delete, path = "/CAD/machine/algoPackages/{code}", tag = "I", params(("code" = String, Path, description = "The algorithm package's code")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<utoipa::TupleUnit>), CodeStringFailures))]
async fn uninstall(
    State(app): State<App>,
    PathParam(code, ..): PathParam<CodeString>,
) -> Answer<CodeString, ()> {
    app.blocking(move |app| app.machine_packages.uninstall(&code))
        .await?;
    Ok(Reply::empty())
}

/// I.6: List the installed algorithm packages.
#[utoipa::path(get, path = "/CAD/machine/algoPackages", tag = "I", params(ListRequest),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<Vec<MachineAlgoPackage>>), CodeStringFailures))]
async fn list(
    State(app): State<App>,
    Params(request, ..): Params<ListRequest, CodeString>,
) -> Answer<CodeString, Vec<MachineAlgoPackage>> {
    Ok(Reply::data(
        app.machine_packages
            .list()
            .iter()
            .filter(|(_, state)| request.status.is_none_or(|s| s == *state))
            .map(view)
            .collect(),
    ))
}

/// I.7: An installed algorithm package's detail.
#[utoipa::path(get, path = "/CAD/machine/algoPackages/{code}", tag = "I", params(("code" = String, Path, description = "The algorithm package's code")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<MachineAlgoPackage>), CodeStringFailures))]
async fn detail(
    State(app): State<App>,
    PathParam(code, ..): PathParam<CodeString>,
) -> Answer<CodeString, MachineAlgoPackage> {
    Ok(Reply::data(view(&app.machine_packages.get(&code)?)))
}
