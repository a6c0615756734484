//! `GET /metrics`: valid OpenMetrics, token-protected, with the drivers' cards
//! under DCGM exporter's names and labels, the host, the plugins and the tasks.

use crate::support::*;

fn family<'a>(families: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    families
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no family {name}"))
}

#[test]
fn metrics_are_openmetrics_with_the_cards_the_host_and_the_plugins() {
    let server = TestServer::start(&["sim-xpu"]);
    let (status, _, _) = server.client.get_text("/metrics", true);
    assert_eq!(status, 401, "like every other endpoint, a token is needed");
    let (status, content_type, text) = server.client.get_text("/metrics", false);
    assert_eq!(status, 200, "{text}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let families = openmetrics(&text);

    // The simulator's two cards, as DCGM exporter labels them.
    let util = family(&families, "DCGM_FI_DEV_GPU_UTIL");
    assert_eq!(util["type"], "gauge");
    let samples = util["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2, "{util}");
    for sample in samples {
        let labels = &sample["labels"];
        assert_eq!(labels["modelName"], "SIMULATED_XPU16");
        assert_eq!(labels["driver"], "sim-xpu");
        assert!(labels["UUID"].as_str().is_some_and(|u| !u.is_empty()));
        assert!(labels["Hostname"].as_str().is_some_and(|h| !h.is_empty()));
        let value = sample["value"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&value), "{value}");
    }
    let gpus: Vec<&str> = samples
        .iter()
        .map(|s| s["labels"]["gpu"].as_str().unwrap())
        .collect();
    assert_eq!(gpus, ["0", "1"]);
    let info = family(&families, "xpud_device_info");
    assert_eq!(info["samples"][0]["labels"]["simulated"], "true");
    // Health is a state set: one state of four is current per card.
    let health = family(&families, "xpud_device_health")["samples"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(health.len(), 8);
    assert_eq!(
        health.iter().filter(|s| s["value"] == 1.0).count(),
        2,
        "{health:?}"
    );
    for name in [
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_TOTAL",
        "DCGM_FI_DEV_DEC_UTIL",
    ] {
        assert_eq!(
            family(&families, name)["samples"].as_array().unwrap().len(),
            2,
            "{name}"
        );
    }

    // The host, and the plugins' state.
    let cpu = &family(&families, "xpud_host_cpu_utilization_ratio")["samples"][0];
    assert!((0.0..=1.0).contains(&cpu["value"].as_f64().unwrap()));
    let memory = &family(&families, "xpud_host_memory_total_bytes")["samples"][0];
    assert!(memory["value"].as_f64().unwrap() > 0.0);
    let loaded = family(&families, "xpud_plugin_state")["samples"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| {
            s["labels"]["plugin"] == "sim-xpu"
                && s["labels"]["state"] == "loaded"
                && s["value"] == 1.0
        });
    assert!(loaded);
    let stale = &family(&families, "xpud_driver_sample_stale")["samples"][0];
    assert_eq!(stale["value"], 0.0);
    // Each plugin function's calls, with a latency histogram.
    let samples = family(&families, "xpud_plugin_calls")["samples"]
        .as_array()
        .unwrap()
        .clone();
    let sampled = samples
        .iter()
        .find(|s| s["labels"]["plugin"] == "sim-xpu" && s["labels"]["function"] == "sample")
        .expect("sim-xpu's sample calls");
    assert!(sampled["value"].as_f64().unwrap() >= 1.0);
    let durations = family(&families, "xpud_plugin_call_duration_seconds");
    assert_eq!(durations["type"], "histogram");
    let count = durations["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["name"] == "xpud_plugin_call_duration_seconds_count"
                && s["labels"]["function"] == "sample"
        })
        .expect("a count per function");
    assert!(count["value"].as_f64().unwrap() >= 1.0);
    // Counters carry OpenMetrics' _total.
    let restarts = family(&families, "xpud_plugin_restarts");
    assert_eq!(restarts["type"], "counter");
    assert_eq!(restarts["samples"][0]["name"], "xpud_plugin_restarts_total");
}

/// The example Grafana dashboard reads only metrics xpud serves.
#[test]
fn the_example_dashboard_reads_metrics_that_exist() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("examples/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let served = std::fs::read_to_string(repo().join("host/src/metrics.rs")).unwrap();
    let mut read = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let names = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("xpud_") || w.starts_with("DCGM_"));
            for name in names {
                let family = name.strip_suffix("_total").unwrap_or(name);
                assert!(
                    served.contains(&format!("\"{family}\"")),
                    "{}: {name} is not served",
                    panel["title"]
                );
                read += 1;
            }
        }
    }
    assert!(read >= 12, "{read}");
}

/// A driver whose sample hangs (until its 20 s call deadline) delays neither
/// /CAP/Status nor /metrics: both read the sampler's cache, never the plugin.
#[test]
fn a_hanging_driver_delays_neither_the_status_nor_the_metrics() {
    use std::time::{Duration, Instant};
    let server = TestServer::start(&["sim-xpu"]);
    server.plugins.install_as("chaos", "chaos", |m| {
        let m = set(m, "config", "mode", "sleep".into());
        set(m, "limits", "call-timeout-ms", 20_000.into())
    });
    assert!(wait_for(Duration::from_secs(10), || {
        server.get("/plugins").1["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "chaos" && p["state"] == "loaded")
    }));
    // Its first sample is in flight now, for 20 s.
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let started = Instant::now();
        let (status, _, text) = server.client.get_text("/metrics", false);
        assert_eq!(status, 200);
        assert!(
            text.contains("DCGM_FI_DEV_GPU_UTIL"),
            "sim-xpu's cards still there"
        );
        let (status, _) = server.get("/CAP/Status");
        assert_eq!(status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "held up for {:?} by a hanging driver",
            started.elapsed()
        );
    }
}
