//! `xpud serve` as a process, over real HTTP: health, the plugin listing, and a
//! crashing plugin becoming visible as unhealthy while everything else carries on.

use std::process::{Child, Stdio};
use std::time::Duration;

use crate::support::*;
use serde_json::Value;

struct Serve {
    child: Child,
    base: String,
    log: std::path::PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- xpud log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn serve(data: &std::path::Path, plugins: &PluginDir) -> Serve {
    serve_with(data, plugins, "", "", &[])
}

/// `top` goes at the top of the config file (top-level keys), `runtime` into its
/// `[runtime]` table; `env` is added to the server's environment.
fn serve_with(
    data: &std::path::Path,
    plugins: &PluginDir,
    top: &str,
    runtime: &str,
    env: &[(&str, &str)],
) -> Serve {
    let config = data.join("xpud.toml");
    std::fs::write(
        &config,
        format!(
            "{top}data-dir = {:?}\nplugin-dir = {:?}\nlisten = \"127.0.0.1:0\"\n\
             [restart]\nmax-restarts = 1\nbackoff-initial-ms = 20\n\
             [sampler]\ninterval-ms = 50\n[runtime]\nsimulated-devices = true\n{runtime}",
            data.join("state"),
            plugins.path()
        ),
    )
    .unwrap();
    let log = data.join("xpud.log");
    let (child, base) = spawn_xpud_with(
        &config,
        Stdio::from(std::fs::File::create(&log).unwrap()),
        env,
    );
    Serve { child, base, log }
}

fn plugin<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
}

#[test]
fn serve_lists_plugins_and_shows_a_crashing_one_as_unhealthy() {
    let data = tempfile::tempdir().unwrap();
    let plugins = PluginDir::new();
    plugins.install("sim-xpu");
    plugins.install("passthrough");
    let server = serve(data.path(), &plugins);
    let api = ApiClient::connect(&server.base, &data.path().join("state"));
    let get = |path: &str| {
        let (status, body) = api.call(reqwest::Method::GET, path, None);
        assert_eq!(status, 200, "{path}: {body}");
        body
    };

    assert_eq!(get("/healthz")["status"], "ok");
    // The sampler fills in the devices shortly after start.
    assert!(wait_for(Duration::from_secs(10), || {
        let list = get("/plugins");
        plugin(&list, "sim-xpu")
            .is_some_and(|p| p["devices"].as_array().is_some_and(|d| d.len() == 2))
    }));
    let list = get("/plugins");
    let sim = plugin(&list, "sim-xpu").unwrap();
    assert_eq!(sim["state"], "loaded");
    assert_eq!(sim["kind"], "driver");
    assert_eq!(sim["instance"]["state"], "running");
    assert_eq!(sim["devices"][0]["accelerator_type"], "SIMULATED_XPU16");
    assert_eq!(plugin(&list, "passthrough").unwrap()["kind"], "algorithm");

    // A plugin that traps on every sample is dropped in while serving.
    plugins.install_as("chaos", "chaos", |m| {
        set(m, "config", "mode", "trap".into())
    });
    assert!(
        wait_for(Duration::from_secs(15), || {
            let list = get("/plugins");
            plugin(&list, "chaos").is_some_and(|p| p["instance"]["state"] == "unhealthy")
        }),
        "chaos never became unhealthy"
    );
    let list = get("/plugins");
    let chaos = plugin(&list, "chaos").unwrap();
    assert_eq!(chaos["instance"]["restarts"], 1);
    assert!(chaos["instance"]["last_error"]
        .as_str()
        .unwrap()
        .contains("trapped"));
    // Everything else carries on.
    assert_eq!(get("/healthz")["status"], "ok");
    assert_eq!(
        plugin(&list, "sim-xpu").unwrap()["instance"]["state"],
        "running"
    );
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("plugin marked unhealthy"), "{log}");

    // Removal is picked up too.
    plugins.remove("passthrough");
    assert!(wait_for(Duration::from_secs(10), || {
        plugin(&get("/plugins"), "passthrough").is_none()
    }));
}

#[test]
fn an_advertised_address_the_listener_does_not_serve_is_warned_about() {
    let data = tempfile::tempdir().unwrap();
    let plugins = PluginDir::new();
    let server = serve_with(
        data.path(),
        &plugins,
        "advertise-address = \"192.0.2.2\"\n",
        "",
        &[],
    );
    let api = ApiClient::connect(&server.base, &data.path().join("state"));
    assert_eq!(api.call(reqwest::Method::GET, "/healthz", None).0, 200);
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("not one this"), "{log}");
    assert!(log.contains("192.0.2.2"), "{log}");
}

/// Replicas are placed by NVML's card index, and run their models on that CUDA
/// ordinal: a server whose environment numbers CUDA devices otherwise says so.
#[test]
fn serve_warns_when_cuda_numbers_devices_unlike_the_cards() {
    let data = tempfile::tempdir().unwrap();
    let plugins = PluginDir::new();
    let server = serve_with(
        data.path(),
        &plugins,
        "",
        "",
        &[
            ("CUDA_DEVICE_ORDER", "FASTEST_FIRST"),
            ("CUDA_VISIBLE_DEVICES", "1,0"),
        ],
    );
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("CUDA_DEVICE_ORDER=FASTEST_FIRST"), "{log}");
    assert!(log.contains("CUDA_VISIBLE_DEVICES=1,0"), "{log}");
}

/// On a machine with a card in MIG mode, CUDA is shown the other cards only (a
/// process that sees a MIG instance sees no other GPU): said at start.
#[test]
fn serve_hides_cards_in_mig_mode_from_cuda() {
    let Ok(library) = fake_nvml() else {
        eprintln!("skipped: the stand-in NVML library cannot be built");
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let plugins = PluginDir::new();
    let server = serve_with(
        data.path(),
        &plugins,
        "",
        &format!("nvml-library = {library:?}\n"),
        &[],
    );
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        log.contains("cards in MIG mode (1) have no CUDA device")
            && log.contains("GPU-8a8b7d6e-3a0f-4c2b-9e1d-5f4a3b2c1d0e"),
        "{log}"
    );
}
