//! `GET /metrics`: valid OpenMetrics, token-protected, with the drivers' cards
//! under DCGM exporter's names and labels, the host, the plugins and the tasks;
//! and Prometheus itself scraping a running server.

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
                // Counters' and histograms' samples carry a suffix their family lacks.
                let family = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(name);
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

/// A process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The JSON a plain HTTP GET answers, if any.
fn get_json(url: &str) -> Option<serde_json::Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async { reqwest::get(url).await.ok()?.json().await.ok() })
}

/// Prometheus itself scrapes a running xpud, configured as an operator would: a
/// token from xpud's OAuth2 endpoint (client credentials), /metrics over HTTPS
/// with xpud's CA. Its query API then has the cards under DCGM's names.
#[test]
fn prometheus_scrapes_a_running_server_with_a_token_of_its_own() {
    let Some(prometheus) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("prometheus"))
            .find(|p| p.is_file())
    }) else {
        eprintln!("skipped: no prometheus on PATH (scripts/install-prometheus installs it)");
        return;
    };
    let server = TestServer::start(&["sim-xpu"]);
    let data = server.data.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    let ca = data.join("tls/ca.pem");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n\
             scrape_configs:\n\
             \x20 - job_name: xpud\n\
             \x20   scheme: https\n\
             \x20   tls_config: {{ ca_file: '{ca}' }}\n\
             \x20   oauth2:\n\
             \x20     client_id: admin\n\
             \x20     client_secret_file: '{secret}'\n\
             \x20     token_url: '{base}/oauth/token'\n\
             \x20     tls_config: {{ ca_file: '{ca}' }}\n\
             \x20   static_configs:\n\
             \x20     - targets: ['{target}']\n",
            ca = ca.display(),
            secret = data.join("admin.secret").display(),
            base = server.base,
            target = server.base.trim_start_matches("https://"),
        ),
    )
    .unwrap();
    let log = dir.path().join("prometheus.log");
    let _prometheus = Killed(
        std::process::Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start prometheus"),
    );
    let api = format!("http://127.0.0.1:{port}/api/v1");
    let mut series = Vec::new();
    let scraped = wait_for(std::time::Duration::from_secs(30), || {
        series = get_json(&format!("{api}/query?query=DCGM_FI_DEV_GPU_UTIL"))
            .and_then(|answer| answer["data"]["result"].as_array().cloned())
            .unwrap_or_default();
        series.len() == 2
    });
    assert!(
        scraped,
        "Prometheus did not scrape both cards: {series:?}\ntargets: {}\nlog: {}",
        get_json(&format!("{api}/targets")).unwrap_or_default(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    for s in &series {
        let labels = &s["metric"];
        assert_eq!(labels["modelName"], "SIMULATED_XPU16", "{s}");
        assert_eq!(labels["job"], "xpud");
        let value: f64 = s["value"][1].as_str().unwrap().parse().unwrap();
        assert!((0.0..=100.0).contains(&value), "{s}");
    }
    // Its own view of the target: healthy, scraped with the token it fetched.
    let targets = get_json(&format!("{api}/targets")).unwrap();
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{target}");

    // Every query of the example dashboard is PromQL Prometheus accepts, and those
    // on the cards and the host have data (the task and instance panels need tasks
    // and partitions, which this server has none of).
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("examples/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let url = reqwest::Url::parse_with_params(&format!("{api}/query"), [("query", expr)])
                .unwrap();
            let answer = get_json(url.as_str()).unwrap_or_default();
            assert_eq!(answer["status"], "success", "{expr}: {answer}");
            if expr.starts_with("DCGM_") || expr.starts_with("xpud_host_") {
                let result = answer["data"]["result"].as_array().unwrap();
                assert!(!result.is_empty(), "{expr}: no data");
            }
        }
    }
}
