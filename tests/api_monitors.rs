//! Appendices C, D.5 and H.5 over HTTP: this machine's figures and its accelerators',
//! from the samplers, in each appendix's envelope.

use crate::support::*;
use serde_json::json;
use std::time::Duration;

fn running_cluster(server: &TestServer) -> (String, String) {
    let (_, body) = server.post(
        "/CCP/clusters",
        json!({
            "name": "monitored",
            "spec": { "version": "1.22.1", "nodes": [{
                "nodeResource": { "cpu": 1, "mem": 1, "rootDiskSize": 1, "localDiskSize": 0 },
                "count": 1
            }]}
        }),
    );
    assert_eq!(body["data"]["status"], "running", "{body}");
    let code = body["data"]["clusterCode"].as_str().unwrap().to_string();
    let (_, nodes) = server.get(&format!("/CCP/cluster/nodes?clusterCode={code}"));
    let node = nodes["data"][0]["nodeId"].as_str().unwrap().to_string();
    (code, node)
}

/// `[{"<ms>": value}, ...]`, oldest first, each point the figure the machine
/// recorded at that instant (`figure` of the sample with that time); returns the
/// last point's time.
fn assert_trend(
    server: &TestServer,
    list: &serde_json::Value,
    figure: impl Fn(&xpud::machine::Sample) -> Option<f64>,
) -> u64 {
    let history = server.app.machine.history();
    let points = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"));
    assert!(points.len() >= 2, "{list}");
    let mut last = 0u64;
    for point in points {
        let entry = point.as_object().unwrap();
        assert_eq!(entry.len(), 1);
        let (ts, value) = entry.iter().next().unwrap();
        let ts: u64 = ts.parse().unwrap();
        assert!(ts >= last);
        last = ts;
        let recorded = history
            .iter()
            .find(|s| s.at_ms == ts)
            .unwrap_or_else(|| panic!("no sample at {ts}"));
        let expected = figure(recorded).unwrap();
        let value = value.as_f64().unwrap();
        assert!(
            (value - expected).abs() < 1e-9,
            "{ts}: {value} != {expected}"
        );
    }
    last
}

/// `value` is `figure` of a sample recorded at or after `since`: the figure
/// answered is the machine's latest, not a constant.
fn assert_recorded(
    server: &TestServer,
    value: &serde_json::Value,
    since: u64,
    figure: impl Fn(&xpud::machine::Sample) -> Option<f64>,
) {
    let value = value
        .as_f64()
        .unwrap_or_else(|| panic!("not a number: {value}"));
    assert!(
        server
            .app
            .machine
            .history()
            .iter()
            .filter(|s| s.at_ms >= since)
            .any(|s| figure(s).is_some_and(|f| (f - value).abs() < 1e-9)),
        "{value} is no recorded figure"
    );
}

#[test]
fn cluster_and_node_monitors_report_this_machine_with_trends() {
    let server = TestServer::start(&["sim-xpu"]);
    let (code, node) = running_cluster(&server);
    // A few machine samples make a trend.
    std::thread::sleep(std::time::Duration::from_millis(300));

    let (status, body) = server.get(&format!("/CCP/cluster/monitors/{code}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["code"], "0");
    let data = &body["data"];
    assert_eq!(data["clusterName"], "monitored");
    assert!(data["id"].as_u64().unwrap() >= 1);
    let facts = server.app.machine.facts();
    assert_eq!(data["cpu"], facts.cpu_cores);
    assert_eq!(data["memory"], facts.memory_total_gb.round() as u64);
    // Each trend point is what was recorded then; the current figure is one of the
    // samples at or after the trend's end.
    let cpu = |s: &xpud::machine::Sample| Some(s.cpu_utilization);
    let memory = |s: &xpud::machine::Sample| Some(s.memory_used_gb);
    let disk = |s: &xpud::machine::Sample| s.disk_used_gb;
    let since = assert_trend(&server, &data["cpuUtilizationList"], cpu);
    assert_recorded(&server, &data["cpuUtilization"], since, cpu);
    let since = assert_trend(&server, &data["memoryUsedList"], memory);
    assert_recorded(&server, &data["memoryUsed"], since, memory);
    let since = assert_trend(&server, &data["diskUsedList"], disk);
    assert_recorded(&server, &data["diskUsed"], since, disk);
    let xpus = data["xpuMonitors"].as_array().unwrap();
    assert_eq!(xpus.len(), 2);
    assert_eq!(xpus[0]["xpuType"], "SIMULATED_XPU16");
    assert_eq!(xpus[0]["xpuMemory"], 16);
    let card = |s: &xpud::machine::Sample| s.xpus[0].utilization;
    let since = assert_trend(&server, &xpus[0]["xpuUtilizationList"], card);
    assert_recorded(&server, &xpus[0]["xpuUtilization"], since, card);
    // sim-xpu's utilisation moves: the figures are its readings, not a constant.
    let history = server.app.machine.history();
    let readings: std::collections::HashSet<u64> = history
        .iter()
        .filter_map(|s| s.xpus[0].utilization.map(f64::to_bits))
        .collect();
    assert!(readings.len() > 1, "{readings:?}");

    let (status, body) = server.get(&format!("/CCP/node/monitors/{node}?clusterCode={code}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["id"], 1);
    assert!(body["data"]["ip"]
        .as_str()
        .unwrap()
        .parse::<std::net::IpAddr>()
        .is_ok());
    assert_eq!(body["data"]["xpuMonitors"].as_array().unwrap().len(), 2);

    // Wrong or missing parameters, unknown ids.
    let (status, body) = server.get(&format!("/CCP/node/monitors/{node}"));
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("clusterCode"));
    let (status, _) = server.get(&format!(
        "/CCP/node/monitors/node-nowhere?clusterCode={code}"
    ));
    assert_eq!(status, 404);
    let (status, body) = server.get("/CCP/cluster/monitors/cluster-nowhere");
    assert_eq!(status, 404);
    assert_eq!(body["code"], "404");
}

#[test]
fn cap_status_uses_the_integer_envelope_and_reports_the_accelerators() {
    let server = TestServer::start(&["sim-xpu"]);
    let (status, body) = server.get("/CAP/Status");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["code"], 0);
    assert_eq!(body["message"], "success");
    let basic = &body["data"]["basicInfos"][0];
    assert_eq!(basic["gpu"], 2);
    assert_eq!(basic["gpuType"], "SIMULATED_XPU16");
    assert!(basic["hostName"].as_str().is_some_and(|h| !h.is_empty()));
    assert!(basic["memory"].as_f64().unwrap() > 0.0);
    assert!(basic["os"].as_str().is_some_and(|o| !o.is_empty()));
    let ops = &body["data"]["opsInfos"][0];
    assert_eq!(ops["ip"], basic["ip"]);
    // Percentages of what the machine recorded, one decimal.
    let percent = |x: f64| (x * 1000.0).round() / 10.0;
    assert_recorded(&server, &ops["cpuUse"], 0, |s| {
        Some(percent(s.cpu_utilization))
    });
    assert_recorded(&server, &ops["memoryUse"], 0, |s| {
        Some(percent(s.memory_used_gb / s.memory_total_gb))
    });
    assert_recorded(&server, &ops["gpuUse"], 0, |s| {
        let readings: Vec<f64> = s.xpus.iter().filter_map(|x| x.utilization).collect();
        Some(percent(
            readings.iter().sum::<f64>() / readings.len() as f64,
        ))
    });
    assert_eq!(ops["gpuUsedetail"], json!([]));
}

#[test]
fn machine_status_answers_for_this_machine_only() {
    let server = TestServer::start(&[]);
    let host = sysinfo_host_name();
    let code = format!("node-{host}");
    let (status, body) = server.get(&format!("/CAD/machine/status/{code}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["code"], "0");
    let data = &body["data"];
    assert_eq!(data["deviceCode"], code.as_str());
    assert_eq!(data["isOnline"], true);
    let cpu: f64 = data["cpuUtilization"].as_str().unwrap().parse().unwrap();
    assert!((0.0..=1.0).contains(&cpu));
    for field in ["memUsage", "memFree", "diskUsage", "diskFree"] {
        let gb: f64 = data[field].as_str().unwrap().parse().unwrap();
        assert!(gb >= 0.0, "{field}");
    }
    let (status, body) = server.get("/CAD/machine/status/someone-else");
    assert_eq!(status, 404);
    assert!(body["message"].as_str().unwrap().contains("someone-else"));
}

/// The node id the server derives from the host name.
fn sysinfo_host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    raw.trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// A driver that dies after its first samples: its cards leave D.5, the monitors,
/// the inventory placement reads, and `GET /plugins` says why, within a few
/// sampling intervals (the test server samples every 50 ms; figures older than a
/// second are withdrawn).
#[test]
fn a_dead_drivers_cards_leave_every_figure_within_a_few_intervals() {
    let server = TestServer::start(&["sim-xpu"]);
    let (code, _) = running_cluster(&server);
    let gpus = |server: &TestServer| -> (u64, usize) {
        let (_, status) = server.get("/CAP/Status");
        let (_, monitors) = server.get(&format!("/CCP/cluster/monitors/{code}"));
        (
            status["data"]["basicInfos"][0]["gpu"].as_u64().unwrap(),
            monitors["data"]["xpuMonitors"].as_array().unwrap().len(),
        )
    };
    let dies_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 4000;
    server.plugins.install_as("chaos", "chaos", |m| {
        let m = set(m, "config", "mode", "die-at".into());
        set(m, "config", "at-ms", dies_at.to_string().into())
    });
    assert!(
        wait_for(Duration::from_secs(3), || gpus(&server) == (3, 3)),
        "chaos's card never showed: {:?}",
        gpus(&server)
    );
    assert!(server
        .app
        .xpus()
        .iter()
        .any(|x| &*x.xpu_type == "CHAOS_TEST"));

    let withdrawn = wait_for(Duration::from_secs(12), || gpus(&server) == (2, 2));
    assert!(
        withdrawn,
        "the dead driver's card stayed: {:?}",
        gpus(&server)
    );
    assert!(!server
        .app
        .xpus()
        .iter()
        .any(|x| &*x.xpu_type == "CHAOS_TEST"));
    let row = |name: &str| {
        let (_, list) = server.get("/plugins");
        list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap()
    };
    let chaos = row("chaos");
    assert_eq!(chaos["stale"], true, "{chaos}");
    assert!(chaos.get("devices").is_none(), "{chaos}");
    let error = chaos["sample_error"].as_str().unwrap();
    assert!(
        error.contains("trapped") || error.contains("restarting") || error.contains("unhealthy"),
        "{error}"
    );
    // sim-xpu, beside it, is current.
    assert_eq!(row("sim-xpu").get("stale"), None);
}

/// A simulator passes for compute only when the operator asks for it, and then its
/// cards say they are simulated wherever they appear.
#[test]
fn simulated_cards_load_only_on_request_and_say_so() {
    let server = TestServer::start_with(&["sim-xpu"], |c| c.runtime.simulated_devices = false);
    let (_, status) = server.get("/CAP/Status");
    assert_eq!(status["data"]["basicInfos"][0]["gpu"], 0, "{status}");
    let (_, list) = server.get("/plugins");
    let sim = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "sim-xpu")
        .unwrap()
        .clone();
    assert_eq!(sim["state"], "refused", "{sim}");
    assert!(
        sim["refused"]
            .as_str()
            .unwrap()
            .contains("simulated-devices"),
        "{sim}"
    );
    let (code, _) = running_cluster(&server);
    let (_, nodes) = server.get(&format!("/CCP/cluster/nodes?clusterCode={code}"));
    assert_eq!(nodes["data"][0]["machineType"], "CPU", "{nodes}");

    let server = TestServer::start(&["sim-xpu"]);
    let (_, status) = server.get("/CAP/Status");
    assert_eq!(status["data"]["basicInfos"][0]["gpu"], 2);
    assert_eq!(status["data"]["basicInfos"][0]["gpuSimulated"], 2);
    let (_, list) = server.get("/plugins");
    assert!(list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "sim-xpu" && p["simulated"] == true));
    let (code, _) = running_cluster(&server);
    let (_, nodes) = server.get(&format!("/CCP/cluster/nodes?clusterCode={code}"));
    assert_eq!(
        nodes["data"][0]["xpuResources"],
        json!([{ "xpuType": "SIMULATED_XPU16", "num": 2, "simulated": true }])
    );
    let (_, monitors) = server.get(&format!("/CCP/cluster/monitors/{code}"));
    assert_eq!(monitors["data"]["xpuMonitors"][0]["simulated"], true);
}

/// Device health transitions are logged and kept: `/plugins` lists each
/// driver's changes and every device's current health.
#[test]
fn device_health_changes_are_kept_and_shown() {
    let server = TestServer::start(&[]);
    server.plugins.install_as("chaos", "chaos", |m| {
        set(m, "config", "mode", "health-cycle".into())
    });
    let changes = || -> Vec<(String, String)> {
        server.get("/plugins").1["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "chaos")
            .and_then(|p| p["health_changes"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|c| {
                assert_eq!(c["device"], "chaos:0");
                assert!(c["at"].as_u64().unwrap() > 0);
                (
                    c["from"].as_str().unwrap().to_string(),
                    c["to"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let cycle = [
        ("healthy", "degraded"),
        ("degraded", "unhealthy"),
        ("unhealthy", "healthy"),
    ];
    assert!(
        wait_for(Duration::from_secs(15), || {
            let seen = changes();
            cycle
                .iter()
                .all(|(from, to)| seen.iter().any(|(f, t)| f == from && t == to))
        }),
        "{:?}",
        changes()
    );
    let (_, plugins) = server.get("/plugins");
    let chaos = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "chaos")
        .unwrap();
    let health = chaos["devices"][0]["health"].as_str().unwrap();
    assert!(
        ["healthy", "degraded", "unhealthy"].contains(&health),
        "{chaos}"
    );
}
