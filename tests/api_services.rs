//! Appendices F and G over HTTP: services placed on the (simulated) cards with real
//! partitions, tasks bound to them, and the refusals that keep state consistent.

use std::time::Duration;

use crate::support::*;
use reqwest::Method;
use serde_json::json;

/// Installs the passthrough package (gpu quota 0.5 on SIMULATED XPU16) and an
/// algorithm for it; returns the algorithm id.
fn install_passthrough(server: &TestServer, platform: &FileServer) -> String {
    let (url, md5) = platform.publish("pt.tar.gz", &passthrough_package("XPUD-PT-3.0.0"));
    server.post(
        "/CAP/AlgoFilePackages",
        json!({ "id": "pkg-1", "md5": md5, "url": url }),
    );
    assert!(wait_for(Duration::from_secs(20), || server
        .get("/CAP/AlgoFilePackages/pkg-1")
        .1["data"]["status"]
        == 0));
    let (url, md5) = platform.publish("a.json", br#"{"relatedAlgoFilePackageId": "pkg-1"}"#);
    server.post(
        "/CAP/AlgoPackages",
        json!({ "id": "MEGCITY:3843938347", "md5": md5, "url": url }),
    );
    assert!(wait_for(Duration::from_secs(20), || server
        .get("/CAP/AlgoPackages/MEGCITY:3843938347")
        .1["data"]["status"]
        == 0));
    "MEGCITY:3843938347".to_string()
}

/// Table G.8's example, typos fixed, with what this build reads: an RTSP source
/// (where nothing listens: the task keeps reconnecting) instead of `iot://`, and an
/// HTTP destination instead of Kafka.
fn example_task(service: &str) -> serde_json::Value {
    json!({
        "algoServiceId": service,
        "restartPolicy": "ALWAYS",
        "taskInfo": {
            "labels": { "algoCabinName": "megcity-a2", "version": "2.0.1" },
            "rulesParams": [{
                "areas": [{
                    "areaid": 0,
                    "areaType": "POLYGON",
                    "points": [{"x": 0.0, "y": 1.0}, {"x": 1.0, "y": 1.0}, {"x": 1.0, "y": 0.0}, {"x": 0.0, "y": 0.0}]
                }],
                "destinations": { "HTTPDest": { "url": "http://127.0.0.1:9/events" } },
                "eventType": "ILLEGAL_ADV",
                "extendParams": { "sensitivity": "低", "durationThreshold": 1, "repeatAlarmIntervalThreshold": 720 },
                "labels": {},
                "masks": []
            }],
            "streamOptions": {
                "videoStreamOptions": {
                    "resolution": "PIXELS_200W",
                    "url": "rtsp://127.0.0.1:9/camera"
                }
            }
        }
    })
}

#[test]
fn services_place_replicas_and_tasks_bind_to_them() {
    let platform = FileServer::start();
    let server = TestServer::start(&["sim-xpu"]);
    let algo = install_passthrough(&server, &platform);

    // F.2, the text's example with this machine's gpuType.
    let (status, body) = server.post(
        "/CAP/AlgoServices",
        json!({ "envs": "threadCount=8, timeOut=2000, k1=v1, k2=v2", "replicas": 2, "gpuType": "SIMULATED XPU16", "algoId": algo }),
    );
    assert_eq!(status, 200, "{body}");
    let service = body["data"].as_str().unwrap().to_string();

    // F.5
    let (_, body) = server.get(&format!("/CAP/AlgoServices/{service}"));
    let data = &body["data"];
    assert_eq!(data["status"], "runing", "{body}");
    assert_eq!(data["gpuQuota"], 0.5);
    assert_eq!(data["replicas"], 2);
    assert_eq!(data["envs"], "threadCount=8, timeOut=2000, k1=v1, k2=v2");
    assert_eq!(data["replicasDetail"].as_array().unwrap().len(), 2);
    // Two half-card partitions in the driver.
    assert_eq!(partitions(&server, "sim-xpu"), 2);
    // Each replica shows its partition's figures as the driver reports them.
    let reported = reported_partitions(&server, "sim-xpu");
    assert!(wait_for(Duration::from_secs(10), || {
        let (_, body) = server.get(&format!("/CAP/AlgoServices/{service}"));
        body["data"]["replicasDetail"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r.get("aiUtilizationPct").is_some())
    }));
    let (_, body) = server.get(&format!("/CAP/AlgoServices/{service}"));
    for replica in body["data"]["replicasDetail"].as_array().unwrap() {
        let partition = reported
            .iter()
            .find(|p| replica["partition"] == p.id.as_str())
            .unwrap_or_else(|| panic!("{replica}"));
        assert_eq!(replica["memoryQuotaMib"], partition.spec.memory_quota_mib);
        assert!(replica["memoryUsedMib"].as_u64().is_some(), "{replica}");
        // A share of a simulated card: no device of its own, no inference worker.
        assert!(replica.get("partitionDevice").is_none(), "{replica}");
    }

    // Over-commit: 3 x 0.5 more would need 1.5 cards; 1 is left. Refused, nothing taken.
    let (status, body) = server.post(
        "/CAP/AlgoServices",
        json!({ "envs": "", "replicas": 3, "gpuType": "SIMULATED_XPU16", "algoId": algo }),
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body["msg"].as_str().unwrap().contains("not enough"),
        "{body}"
    );
    assert_eq!(partitions(&server, "sim-xpu"), 2);
    let (status, body) = server.post(
        "/CAP/AlgoServices",
        json!({ "envs": "", "replicas": 1, "gpuType": "NVidia A2", "algoId": algo }),
    );
    assert_eq!(status, 409);
    assert!(
        body["msg"].as_str().unwrap().contains("SIMULATED_XPU16"),
        "{body}"
    );

    // F.4 and D.5's allocation detail.
    let (_, body) = server.post(
        "/CAP/AlgoServices:search",
        json!({ "pageNumber": 1, "pageSize": 20 }),
    );
    assert_eq!(body["data"]["total"], 1);
    assert_eq!(body["data"]["records"][0]["algoId"], algo.as_str());
    std::thread::sleep(Duration::from_millis(100));
    let (_, body) = server.get("/CAP/Status");
    let detail = &body["data"]["opsInfos"][0]["gpuUsedetail"];
    assert_eq!(detail.as_array().unwrap().len(), 1, "{detail}");
    assert_eq!(detail[0]["algoId"], algo.as_str());
    assert_eq!(detail[0]["gpuQuota"], 1.0);
    // And what its two partitions use, as the driver reports them.
    let used = detail[0]["memoryUsedMib"].as_u64().expect("memory used");
    let utilization = detail[0]["aiUtilizationPct"].as_f64().expect("utilisation");
    assert!(used > 0 && (0.0..=100.0).contains(&utilization), "{detail}");

    // The algorithm is in use.
    let (status, _) = server.call(Method::DELETE, &format!("/CAP/AlgoPackages/{algo}"), None);
    assert_eq!(status, 409);

    // G.2
    let (status, body) = server.post("/CAP/AlgoTasks", example_task(&service));
    assert_eq!(status, 200, "{body}");
    let created = &body["data"]["createdStreams"][0];
    assert_eq!(created["algoServiceId"], service.as_str());
    assert_eq!(created["taskInfo"]["status"], "PENDING");
    assert_eq!(body["data"]["updatedStreams"], json!([]));
    let task = created["taskInfo"]["id"].as_str().unwrap().to_string();

    // G.7: PENDING, and it says why: nothing serves the camera's address.
    assert!(wait_for(Duration::from_secs(20), || server
        .get(&format!("/CAP/AlgoTasks/{task}"))
        .1["data"]["taskInfo"]["statusDesc"]
        .as_str()
        .unwrap()
        .starts_with("reconnecting (attempt ")));
    let (_, body) = server.get(&format!("/CAP/AlgoTasks/{task}"));
    assert_eq!(body["data"]["taskInfo"]["status"], "PENDING");
    assert_eq!(
        body["data"]["taskInfo"]["labels"]["algoCabinName"],
        "megcity-a2"
    );
    assert_eq!(body["data"]["restartPolicy"], "ALWAYS");

    // G.6 filters.
    let search = |filter: serde_json::Value| {
        let mut request = json!({ "pageNumber": 1, "pageSize": 20 });
        request
            .as_object_mut()
            .unwrap()
            .extend(filter.as_object().unwrap().clone());
        server.post("/CAP/AlgoTasks:search", request).1["data"]["total"].clone()
    };
    assert_eq!(search(json!({})), 1);
    assert_eq!(search(json!({ "eventType": "ILLEGAL_ADV" })), 1);
    assert_eq!(search(json!({ "eventType": "OTHER" })), 0);
    assert_eq!(search(json!({ "algoServiceId": service })), 1);

    // G.5 / G.4
    let (status, body) = server.post(&format!("/CAP/AlgoTasks/{task}:pause"), json!({}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], true);
    assert_eq!(
        server.get(&format!("/CAP/AlgoTasks/{task}")).1["data"]["taskInfo"]["status"],
        "PAUSED"
    );
    let (status, _) = server.post(&format!("/CAP/AlgoTasks/{task}:resume"), json!({}));
    assert_eq!(status, 200);
    assert_eq!(
        server.get(&format!("/CAP/AlgoTasks/{task}")).1["data"]["taskInfo"]["status"],
        "PENDING"
    );
    let (status, _) = server.post(&format!("/CAP/AlgoTasks/{task}:explode"), json!({}));
    assert_eq!(status, 404);

    // The service keeps its task; the task goes, then the service, then its partitions.
    let (status, body) = server.call(
        Method::DELETE,
        &format!("/CAP/AlgoServices/{service}"),
        None,
    );
    assert_eq!(status, 409, "{body}");
    let (status, _) = server.call(Method::DELETE, &format!("/CAP/AlgoTasks/{task}"), None);
    assert_eq!(status, 200);
    let (status, _) = server.call(
        Method::DELETE,
        &format!("/CAP/AlgoServices/{service}"),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(partitions(&server, "sim-xpu"), 0);
    let (status, body) = server.get(&format!("/CAP/AlgoServices/{service}"));
    assert_eq!(status, 404);
    assert_eq!(body["code"], 404);
}

#[test]
fn bad_tasks_and_services_are_refused_with_the_field() {
    let platform = FileServer::start();
    let server = TestServer::start(&["sim-xpu"]);
    let algo = install_passthrough(&server, &platform);
    let (_, body) = server.post(
        "/CAP/AlgoServices",
        json!({ "envs": "a=1", "replicas": 1, "gpuType": "SIMULATED_XPU16", "algoId": algo }),
    );
    let service = body["data"].as_str().unwrap().to_string();

    for (request, field, status) in [
        (
            json!({ "envs": "a=1, oops", "replicas": 1, "gpuType": "SIMULATED_XPU16", "algoId": algo }),
            "oops",
            400,
        ),
        (
            json!({ "envs": "", "replicas": 0, "gpuType": "SIMULATED_XPU16", "algoId": algo }),
            "replicas",
            400,
        ),
        (
            json!({ "envs": "", "replicas": "two", "gpuType": "SIMULATED_XPU16", "algoId": algo }),
            "replicas",
            400,
        ),
        (
            json!({ "envs": "", "replicas": 1, "gpuType": "SIMULATED_XPU16", "algoId": "nope" }),
            "nope",
            404,
        ),
    ] {
        let (got, body) = server.post("/CAP/AlgoServices", request);
        assert_eq!(got, status, "{body}");
        assert!(
            body["msg"].as_str().unwrap().contains(field),
            "{field}: {body}"
        );
    }

    let mut bad_area = example_task(&service);
    bad_area["taskInfo"]["rulesParams"][0]["areas"][0]["points"] =
        json!([{"x": 0.0, "y": 0.0}, {"x": 1.0, "y": 1.0}]);
    // A point outside the frame.
    let mut off_frame = example_task(&service);
    off_frame["taskInfo"]["rulesParams"][0]["areas"][0]["points"][0] = json!({"x": 1.5, "y": 0.0});
    // What only the algorithm knows: passthrough refuses a model it does not ship.
    let mut refused_by_algorithm = example_task(&service);
    refused_by_algorithm["taskInfo"]["rulesParams"][0]["extendParams"] =
        json!({ "model": "missing.onnx" });
    let mut bad_resolution = example_task(&service);
    bad_resolution["taskInfo"]["streamOptions"]["videoStreamOptions"]["resolution"] =
        json!("PIXELS_9000W");
    let mut no_destination = example_task(&service);
    no_destination["taskInfo"]["rulesParams"][0]["destinations"] = json!({});
    let mut bad_policy = example_task(&service);
    bad_policy["restartPolicy"] = json!("SOMETIMES");
    for (request, field, status) in [
        (
            bad_area,
            "areas[0].points: Polygon needs at least 3 points",
            400,
        ),
        (
            off_frame,
            "areas[0].points[0]: (1.5, 0) is outside the frame",
            400,
        ),
        (refused_by_algorithm, "refused them", 400),
        (
            bad_resolution,
            "taskInfo.streamOptions.videoStreamOptions.resolution",
            400,
        ),
        (no_destination, "destinations", 400),
        (bad_policy, "restartPolicy", 400),
        (example_task("no-such-service"), "no-such-service", 404),
    ] {
        let (got, body) = server.post("/CAP/AlgoTasks", request);
        assert_eq!(got, status, "{body}");
        assert!(
            body["msg"].as_str().unwrap().contains(field),
            "{field}: {body}"
        );
    }
    let (_, body) = server.post(
        "/CAP/AlgoTasks:search",
        json!({ "pageNumber": 1, "pageSize": 20 }),
    );
    assert_eq!(body["data"]["total"], 0);
}

#[test]
fn task_search_stays_right_across_deletes_and_pages() {
    let platform = FileServer::start();
    let server = TestServer::start(&["sim-xpu"]);
    let algo = install_passthrough(&server, &platform);
    let service = server
        .post(
            "/CAP/AlgoServices",
            json!({ "envs": "", "replicas": 1, "gpuType": "SIMULATED_XPU16", "algoId": algo }),
        )
        .1["data"]
        .as_str()
        .unwrap()
        .to_string();
    let mut ids = Vec::new();
    for event in ["A", "B", "A", "A", "B"] {
        let mut task = example_task(&service);
        task["taskInfo"]["rulesParams"][0]["eventType"] = json!(event);
        let (status, body) = server.post("/CAP/AlgoTasks", task);
        assert_eq!(status, 200, "{body}");
        ids.push(
            body["data"]["createdStreams"][0]["taskInfo"]["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    server.call(Method::DELETE, &format!("/CAP/AlgoTasks/{}", ids[2]), None);
    let search = |filter: serde_json::Value| {
        let mut request = json!({ "pageNumber": 1, "pageSize": 2 });
        request
            .as_object_mut()
            .unwrap()
            .extend(filter.as_object().unwrap().clone());
        server.post("/CAP/AlgoTasks:search", request).1["data"].clone()
    };
    let ids_of = |page: &serde_json::Value| -> Vec<String> {
        page["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["taskInfo"]["id"].as_str().unwrap().to_string())
            .collect()
    };
    let a = search(json!({ "eventType": "A" }));
    assert_eq!(a["total"], 2);
    assert_eq!(ids_of(&a), vec![ids[0].clone(), ids[3].clone()]);
    let b = search(json!({ "eventType": "B", "pageNumber": 2, "pageSize": 1 }));
    assert_eq!(b["total"], 2);
    assert_eq!(ids_of(&b), vec![ids[4].clone()]);
    let all = search(json!({ "pageNumber": 2 }));
    assert_eq!(all["total"], 4);
    assert_eq!(ids_of(&all), vec![ids[3].clone(), ids[4].clone()]);
    let one = search(json!({ "id": ids[1], "eventType": "B", "algoServiceId": service }));
    assert_eq!(one["total"], 1);
    assert_eq!(
        search(json!({ "id": ids[1], "eventType": "A" }))["total"],
        0
    );
    assert_eq!(search(json!({ "algoServiceId": "other" }))["total"], 0);
}

/// F.2 `gpuType: CPU` places replicas without an accelerator where the package says
/// it runs there; F.5 says so per replica; the instances see exactly the service's
/// `envs` (after the package's `env`) and nothing of the host's environment.
#[test]
fn cpu_replicas_get_the_service_envs_and_nothing_of_the_hosts() {
    let platform = FileServer::start();
    let server = TestServer::start(&["sim-xpu"]);
    let algo = install_algorithm(
        &server,
        &platform,
        "pt",
        &passthrough_package("XPUD-PT-CPU"),
    );
    let (status, body) = server.post(
        "/CAP/AlgoServices",
        json!({ "envs": "threadCount=8, LOG_LEVEL=debug, k1=v1", "replicas": 1, "gpuType": "CPU", "algoId": algo }),
    );
    assert_eq!(status, 200, "{body}");
    let service = body["data"].as_str().unwrap().to_string();
    let (_, body) = server.get(&format!("/CAP/AlgoServices/{service}"));
    let data = &body["data"];
    assert_eq!(data["status"], "runing", "{body}");
    assert_eq!(data["gpuQuota"], 0.0);
    assert!(
        data["statusDesc"].as_str().unwrap().contains("on CPU"),
        "{body}"
    );
    let replicas = data["replicasDetail"].as_array().unwrap();
    assert_eq!(replicas.len(), 1);
    assert_eq!(replicas[0]["status"], "runing");
    assert!(replicas[0].get("card").is_none(), "{body}");
    assert_eq!(partitions(&server, "sim-xpu"), 0);

    let worker = server.app.services.workers(&service).unwrap()[0].clone();
    let attributes = echoed_launch(&worker);
    assert_eq!(
        attributes["env"],
        json!({ "LOG_LEVEL": "debug", "threadCount": "8", "k1": "v1" }),
        "the package's env, then the service's envs, and nothing else"
    );
    assert_eq!(attributes["args"], json!([]));
}

/// A service whose workers cannot start is `error` in F.5, per replica, with the
/// reason; it never read `runing`.
#[test]
fn a_service_follows_its_workers() {
    let platform = FileServer::start();
    let server = TestServer::start(&["sim-xpu"]);
    let package =
        passthrough_package_with("XPUD-PT-TINY", |m| set(m, "limits", "memory-mib", 1.into()));
    let algo = install_algorithm(&server, &platform, "tiny", &package);
    let (status, body) = server.post(
        "/CAP/AlgoServices",
        json!({ "envs": "", "replicas": 2, "gpuType": "CPU", "algoId": algo }),
    );
    assert_eq!(status, 200, "{body}");
    let service = body["data"].as_str().unwrap().to_string();
    let (_, body) = server.get(&format!("/CAP/AlgoServices/{service}"));
    let data = &body["data"];
    assert_eq!(data["status"], "error", "{body}");
    assert!(
        data["statusDesc"]
            .as_str()
            .unwrap()
            .contains("replica 0: cannot start"),
        "{body}"
    );
    for replica in data["replicasDetail"].as_array().unwrap() {
        assert_eq!(replica["status"], "error", "{replica}");
        assert!(
            replica["statusDesc"].as_str().unwrap().contains("memory"),
            "{replica}"
        );
    }
}
