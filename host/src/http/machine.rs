//! Appendix H, served part: `GET /CAD/machine/status/{deviceCode}` (H.5). H.2-H.4 are
//! calls xpud makes on the platform. Figures are strings, as table H.10 says:
//! utilisation a fraction ("0.11" is 11 %), sizes GB.

use axum::extract::State;
use serde::Serialize;

use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::envelope::{Answer, CodeString, CodeStringBody, CodeStringFailures, Failure, Reply};
use super::input::PathParam;
use super::App;

/// Table H.10.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct DeviceInfo {
    device_code: String,
    is_online: bool,
    cpu_utilization: Option<String>,
    mem_usage: Option<String>,
    mem_free: Option<String>,
    disk_usage: Option<String>,
    disk_free: Option<String>,
}

pub fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new().routes(routes!(status))
}

/// H.5: This machine's status.
#[utoipa::path(get, path = "/CAD/machine/status/{deviceCode}", tag = "H",
    params(("deviceCode" = String, Path, description = "This machine's code")),
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeStringBody<DeviceInfo>), CodeStringFailures))]
async fn status(
    State(app): State<App>,
    PathParam(code, ..): PathParam<CodeString>,
) -> Answer<CodeString, DeviceInfo> {
    if code != app.machine_code {
        return Err(Failure::not_found(format!(
            "no machine {code:?}: this machine's code is {:?}",
            app.machine_code
        )));
    }
    let latest = app.machine.latest();
    let gb = |v: f64| format!("{v:.3}");
    Ok(Reply::data(DeviceInfo {
        device_code: code,
        is_online: true,
        cpu_utilization: latest.as_ref().map(|s| format!("{:.2}", s.cpu_utilization)),
        mem_usage: latest.as_ref().map(|s| gb(s.memory_used_gb)),
        mem_free: latest
            .as_ref()
            .map(|s| gb((s.memory_total_gb - s.memory_used_gb).max(0.0))),
        disk_usage: latest.as_ref().and_then(|s| s.disk_used_gb).map(gb),
        disk_free: latest
            .as_ref()
            .and_then(|s| Some(gb((s.disk_total_gb? - s.disk_used_gb?).max(0.0)))),
    }))
}
