//! Appendix I: algorithm packages on this machine in CAD mode
//! (`/CAD/machine/algoFilePackages`, `/CAD/machine/algoPackages`; the text also
//! writes `algopackages` and `algorithmPackages`, all served).

use axum::extract::State;
use axum::routing::{delete, get};
use axum::Router;
use serde::{Deserialize, Serialize};

use super::envelope::{Answer, CodeString, Failure, Reply};
use super::input::{Body, Params, PathParam};
use super::App;
use crate::dates::format_ms;
use crate::machine_packages::{MachinePackage, RunState};
use crate::package::PackageType;

/// Table I.8.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FilePackageRequest {
    pub algo_file_package_id: u64,
    #[serde(default)]
    pub auth_address: Option<String>,
    #[serde(default)]
    pub license_file: Option<String>,
}

/// Table I.10.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallRequest {
    pub algo_package_code: String,
    #[serde(default)]
    pub args: String,
}

/// Table I.12.
#[derive(Debug, Deserialize)]
pub struct ListRequest {
    #[serde(default)]
    pub status: Option<RunState>,
}

/// Table I.14.
#[derive(Serialize)]
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

pub fn routes() -> Router<App> {
    let mut router = Router::new()
        .route(
            "/CAD/machine/algoFilePackages",
            axum::routing::post(receive_file),
        )
        .route("/CAD/machine/algoFilePackages/{id}", delete(delete_file));
    for spelling in ["algoPackages", "algopackages", "algorithmPackages"] {
        router = router
            .route(&format!("/CAD/machine/{spelling}"), get(list).post(install))
            .route(
                &format!("/CAD/machine/{spelling}/{{code}}"),
                get(detail).delete(uninstall),
            );
    }
    router
}

/// I.2: fetched from the platform at `[platform] package-url`, `{id}` replaced.
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

/// I.3
async fn delete_file(
    State(app): State<App>,
    PathParam(id, ..): PathParam<CodeString>,
) -> Answer<CodeString, ()> {
    app.blocking(move |app| {
        app.packages
            .delete_file(&id, app.machine_packages.user_of_file(&id))
    })
    .await?;
    Ok(Reply::empty())
}

/// I.4: installs and starts.
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

/// I.5
async fn uninstall(
    State(app): State<App>,
    PathParam(code, ..): PathParam<CodeString>,
) -> Answer<CodeString, ()> {
    app.blocking(move |app| app.machine_packages.uninstall(&code))
        .await?;
    Ok(Reply::empty())
}

/// I.6
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

/// I.7
async fn detail(
    State(app): State<App>,
    PathParam(code, ..): PathParam<CodeString>,
) -> Answer<CodeString, MachineAlgoPackage> {
    Ok(Reply::data(view(&app.machine_packages.get(&code)?)))
}
