//! Durability: objects of every kind survive `kill -9` of the real binary, and
//! come back live (services placed again, tasks bound again).

use std::process::{Child, Stdio};
use std::time::Duration;

use crate::support::*;
use serde_json::json;

struct Xpud {
    child: Child,
    base: String,
}

impl Drop for Xpud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(config: &std::path::Path) -> Xpud {
    let (child, base) = spawn_xpud(config, Stdio::null());
    Xpud { child, base }
}

#[test]
fn everything_acknowledged_survives_kill_dash_nine() {
    let platform = FileServer::start();
    let data = tempfile::tempdir().unwrap();
    let plugins = PluginDir::new();
    plugins.install("sim-xpu");
    let config = data.path().join("xpud.toml");
    std::fs::write(
        &config,
        format!(
            "data-dir = {:?}\nplugin-dir = {:?}\nlisten = \"127.0.0.1:0\"\n[sampler]\ninterval-ms = 50\n\
             [runtime]\nsimulated-devices = true\n",
            data.path().join("state"),
            plugins.path()
        ),
    )
    .unwrap();

    let first = start(&config);
    let api = ApiClient::connect(&first.base, &data.path().join("state"));
    assert!(wait_for(Duration::from_secs(10), || api.get("/CAP/Status")
        ["data"]["basicInfos"][0]["gpu"]
        == 2));
    let cluster = api.post("/CCP/clusters", json!({
        "name": "kept",
        "spec": { "version": "1.24.1", "nodes": [{ "nodeResource": { "cpu": 1, "mem": 1, "rootDiskSize": 1, "localDiskSize": 0 }, "count": 1 }] }
    }))["data"]["clusterCode"].as_str().unwrap().to_string();
    let (url, md5) = platform.publish("pt.tar.gz", &passthrough_package("XPUD-PT-9.0.0"));
    api.post(
        "/CAP/AlgoFilePackages",
        json!({ "id": "pkg", "md5": md5, "url": url }),
    );
    assert!(wait_for(Duration::from_secs(20), || api
        .get("/CAP/AlgoFilePackages/pkg")["data"]["status"]
        == 0));
    let (url, md5) = platform.publish("a.json", br#"{"relatedAlgoFilePackageId": "pkg"}"#);
    api.post(
        "/CAP/AlgoPackages",
        json!({ "id": "algo", "md5": md5, "url": url }),
    );
    assert!(wait_for(Duration::from_secs(20), || api
        .get("/CAP/AlgoPackages/algo")["data"]["status"]
        == 0));
    let service = api.post(
        "/CAP/AlgoServices",
        json!({ "envs": "k=v", "replicas": 2, "gpuType": "SIMULATED_XPU16", "algoId": "algo" }),
    )["data"]
        .as_str()
        .unwrap()
        .to_string();
    let task = api.post("/CAP/AlgoTasks", json!({
        "algoServiceId": service,
        "restartPolicy": "NEVER",
        "taskInfo": {
            "labels": { "algoCabinName": "passthrough", "version": "0.1.0" },
            "rulesParams": [{ "areas": [], "destinations": { "HTTPDest": { "url": "http://127.0.0.1:9/events" } }, "eventType": "FRAME_SEEN" }],
            "streamOptions": { "videoStreamOptions": { "resolution": "PIXELS_400W", "url": "rtsp://127.0.0.1/cam" } }
        }
    }))["data"]["createdStreams"][0]["taskInfo"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.post(&format!("/CAP/AlgoTasks/{task}:pause"), json!({}));
    let workload = api.post(
        "/CCP/algoService/workloads",
        json!({
            "clusterCode": cluster, "nameSpace": "default", "name": "kept-workload",
            "labels": { "app": "k" }, "labelSelector": { "app": "k" }, "replicas": 2,
            "containerName": "c", "image": "XPUD-PT-9.0.0", "cpu": 1, "xpuType": "SIMULATED_XPU16",
            "xpu": 0.5, "memory": 1
        }),
    );
    assert_eq!(workload["code"], "0", "{workload}");

    // No goodbye: SIGKILL.
    drop(first);

    let second = start(&config);
    let api = ApiClient::connect(&second.base, &data.path().join("state"));
    assert_eq!(
        api.get(&format!("/CCP/clusters/{cluster}"))["data"]["phase"],
        "running"
    );
    assert_eq!(
        api.get(&format!("/CCP/cluster/nodes?clusterCode={cluster}"))["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let package = api.get("/CAP/AlgoFilePackages/pkg");
    assert_eq!(package["data"]["status"], 0, "{package}");
    assert_eq!(package["data"]["name"], "passthrough");
    assert_eq!(
        api.get("/CAP/AlgoPackages/algo")["data"]["relatedAlgoFilePackageId"],
        "pkg"
    );
    let detail = api.get(&format!("/CAP/AlgoServices/{service}"));
    assert_eq!(detail["data"]["status"], "runing", "{detail}");
    assert_eq!(detail["data"]["replicas"], 2);
    let detail = api.get(&format!("/CAP/AlgoTasks/{task}"));
    assert_eq!(detail["data"]["taskInfo"]["status"], "PAUSED", "{detail}");
    assert_eq!(detail["data"]["restartPolicy"], "NEVER");
    let (_, pods) = api.call(
        reqwest::Method::GET,
        "/CCP/algoService/pods",
        Some(json!({
            "clusterCode": cluster, "namespace": "default", "workloadName": "kept-workload"
        })),
    );
    let pods = pods["data"]["pods"].as_array().unwrap().clone();
    assert_eq!(pods.len(), 2);
    assert!(pods.iter().all(|p| p["ready"] == true), "{pods:?}");
    // The ledger came back whole: the service's and the workload's halves (and
    // their memory) fill both cards again, so one more half is refused, every card
    // named.
    let (status, refused) = api.call(
        reqwest::Method::POST,
        "/CAP/AlgoServices",
        Some(json!({ "envs": "", "replicas": 1, "gpuType": "SIMULATED_XPU16", "algoId": "algo" })),
    );
    assert_eq!(status, 409, "{refused}");
    let message = refused["msg"].as_str().unwrap();
    assert!(
        message.contains("sim-xpu/0 has 0.00 and 0 MiB free")
            && message.contains("sim-xpu/1 has 0.00 and 0 MiB free"),
        "{message}"
    );
    // Live again: the task resumes on its re-placed service.
    assert_eq!(
        api.post(&format!("/CAP/AlgoTasks/{task}:resume"), json!({}))["data"],
        true
    );
    assert_eq!(
        api.get(&format!("/CAP/AlgoTasks/{task}"))["data"]["taskInfo"]["status"],
        "PENDING"
    );
}

/// A stored row that cannot be read stops the start, naming its table and key:
/// an acknowledged object never silently disappears.
#[test]
fn an_unreadable_stored_row_stops_the_start_and_names_itself() {
    let data = tempfile::tempdir().unwrap();
    {
        let store = xpud::store::Store::open(&data.path().join("xpud.db")).unwrap();
        store
            .put(
                xpud::store::Table::Clusters,
                "cluster-broken",
                &json!({ "not": "a cluster" }),
            )
            .unwrap();
    }
    let config = xpud::config::ServeConfig {
        data_dir: data.path().to_path_buf(),
        plugin_dir: Some(data.path().join("plugins")),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    std::fs::create_dir(data.path().join("plugins")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let error = match runtime.block_on(xpud::server::Server::start(&config)) {
        Ok(_) => panic!("started over an unreadable row"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("table clusters, row \"cluster-broken\""),
        "{error}"
    );
}
