//! Appendix D, served part: `GET /CAP/Status` (D.5), this machine's compute and its
//! use, from the machine sampler. D.2-D.4 are calls xpud makes on the platform.
//! Use figures are percentages (0-100); sizes GB.

use axum::extract::State;
use serde::Serialize;

use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::envelope::{Answer, CodeIntMessage, CodeIntMessageBody, CodeIntMessageFailures, Reply};
use super::App;

/// Table D.12, `basicInfos[]`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct BasicInfo {
    ip: String,
    host_name: String,
    cpu: u32,
    gpu: u32,
    /// How many of `gpu` are simulated (not in table D.12; absent when none is).
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu_simulated: Option<u32>,
    /// The accelerator types present, comma-separated.
    gpu_type: String,
    memory: f64,
    /// Null when the data directory's disk is not found.
    disk: Option<f64>,
    os: String,
}

/// Table D.12, `gpuUsedetail[]`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuUseDetail {
    pub algo_id: String,
    pub gpu_quota: f64,
    /// Its partitions' AI utilisation as their drivers report it, mean of those
    /// that report one, % (not in the table; absent when none does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ai_utilization_pct: Option<f64>,
    /// Memory its partitions use, summed over those that report it, MiB (not in
    /// the table; absent when none does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used_mib: Option<u64>,
}

/// Table D.12, `opsInfos[]`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct OpsInfo {
    ip: String,
    host_name: String,
    /// Null until the first machine sample.
    cpu_use: Option<f64>,
    /// Mean utilisation of the accelerators that report one; null when none does.
    gpu_use: Option<f64>,
    /// Null until the first machine sample.
    memory_use: Option<f64>,
    /// Null until the first machine sample, or when the data directory's disk is
    /// not found.
    disk_use: Option<f64>,
    gpu_usedetail: Vec<GpuUseDetail>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct CapStatus {
    basic_infos: Vec<BasicInfo>,
    ops_infos: Vec<OpsInfo>,
}

/// `part` of `whole` in percent, one decimal; none of nothing.
fn percent(part: f64, whole: f64) -> Option<f64> {
    (whole > 0.0).then(|| (part / whole * 1000.0).round() / 10.0)
}

pub fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new().routes(routes!(status))
}

/// D.5: This machine's compute and its use.
#[utoipa::path(get, path = "/CAP/Status", tag = "D",
    responses((status = 200, description = "Success, in the appendix's envelope", body = CodeIntMessageBody<CapStatus>), CodeIntMessageFailures))]
async fn status(State(app): State<App>) -> Answer<CodeIntMessage, CapStatus> {
    let facts = app.machine.facts();
    let latest = app.machine.latest();
    let inventory = app.xpu_inventory();
    let ip = app.external_ip().to_string();
    let readings: Vec<f64> = latest
        .iter()
        .flat_map(|s| s.xpus.iter().filter_map(|x| x.utilization))
        .collect();
    let ops = OpsInfo {
        ip: ip.clone(),
        host_name: facts.host_name.clone(),
        cpu_use: latest
            .as_ref()
            .map(|s| (s.cpu_utilization * 1000.0).round() / 10.0),
        gpu_use: (!readings.is_empty()).then(|| {
            (readings.iter().sum::<f64>() / readings.len() as f64 * 1000.0).round() / 10.0
        }),
        memory_use: latest
            .as_ref()
            .and_then(|s| percent(s.memory_used_gb, s.memory_total_gb)),
        disk_use: latest
            .as_ref()
            .and_then(|s| percent(s.disk_used_gb?, s.disk_total_gb?)),
        gpu_usedetail: app
            .services
            .placements_by_algorithm()
            .into_iter()
            .map(|(algo_id, placements)| {
                let figures: Vec<_> = placements
                    .iter()
                    .filter_map(|p| {
                        let (driver, _) = p.card.as_ref()?;
                        app.samples.instance(driver, p.partition.as_ref()?)
                    })
                    .collect();
                let utilization: Vec<f64> = figures
                    .iter()
                    .filter_map(|f| f.ai_utilization_pct.map(f64::from))
                    .collect();
                let memory: Vec<u64> = figures.iter().filter_map(|f| f.memory_used_mib).collect();
                GpuUseDetail {
                    algo_id,
                    gpu_quota: placements.iter().map(|p| p.quota).sum(),
                    ai_utilization_pct: (!utilization.is_empty())
                        .then(|| utilization.iter().sum::<f64>() / utilization.len() as f64),
                    memory_used_mib: (!memory.is_empty()).then(|| memory.iter().sum()),
                }
            })
            .collect(),
    };
    let basic = BasicInfo {
        ip,
        host_name: facts.host_name.clone(),
        cpu: facts.cpu_cores,
        gpu: inventory.iter().map(|x| x.num).sum(),
        gpu_simulated: Some(
            inventory
                .iter()
                .filter(|x| x.simulated)
                .map(|x| x.num)
                .sum(),
        )
        .filter(|n| *n > 0),
        gpu_type: inventory
            .iter()
            .map(|x| x.xpu_type.as_str())
            .collect::<Vec<_>>()
            .join(","),
        memory: (facts.memory_total_gb * 10.0).round() / 10.0,
        disk: facts.disk_total_gb.map(|gb| (gb * 10.0).round() / 10.0),
        os: facts.os.clone(),
    };
    Ok(Reply::data(CapStatus {
        basic_infos: vec![basic],
        ops_infos: vec![ops],
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_share_of_nothing_is_unknown_not_zero() {
        assert_eq!(super::percent(1.0, 4.0), Some(25.0));
        assert_eq!(super::percent(0.0, 0.0), None);
    }
}
