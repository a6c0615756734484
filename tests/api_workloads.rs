//! Appendix B over HTTP: workloads of an installed algorithm package, their pods,
//! scaling that really starts and stops workers and frees their share.

use std::time::Duration;

use crate::support::*;
use reqwest::Method;
use serde_json::json;

fn setup() -> (FileServer, TestServer, String) {
    let server = TestServer::start(&["sim-xpu"]);
    let (platform, cluster) = install_and_make_a_cluster(&server);
    (platform, server, cluster)
}

/// The passthrough package installed as `pkg`, and a cluster: (its file server,
/// the cluster's code).
fn install_and_make_a_cluster(server: &TestServer) -> (FileServer, String) {
    let platform = FileServer::start();
    let (url, md5) = platform.publish("pt.tar.gz", &passthrough_package("XPUD-PT-4.0.0"));
    server.post(
        "/CAP/AlgoFilePackages",
        json!({ "id": "pkg", "md5": md5, "url": url }),
    );
    assert!(wait_for(Duration::from_secs(20), || server
        .get("/CAP/AlgoFilePackages/pkg")
        .1["data"]["status"]
        == 0));
    let (_, body) = server.post("/CCP/clusters", json!({
        "name": "c",
        "spec": { "version": "1.20.4", "nodes": [{ "nodeResource": { "cpu": 1, "mem": 1, "rootDiskSize": 1, "localDiskSize": 0 }, "count": 1 }] }
    }));
    let cluster = body["data"]["clusterCode"].as_str().unwrap().to_string();
    (platform, cluster)
}

/// Table B.9's example, typos fixed (a duplicate `replicas`), sized for this machine.
fn example_workload(cluster: &str) -> serde_json::Value {
    json!({
        "clusterCode": cluster,
        "nameSpace": "default",
        "name": "human-detect",
        "labels": { "app": "test" },
        "labelSelector": { "app": "test" },
        "containerName": "test-container",
        "image": "XPUD-PT-4.0.0",
        "xpuType": "SIMULATED_XPU16",
        "cpu": 1,
        "memory": 1,
        "xpu": 0.5,
        "replicas": 2
    })
}

#[test]
fn workloads_run_pods_and_scale_for_real() {
    let (_platform, server, cluster) = setup();
    let (status, body) = server.post("/CCP/algoService/workloads", example_workload(&cluster));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["code"], "0");
    assert_eq!(
        body["data"],
        json!({ "workloadName": "human-detect", "namespace": "default" })
    );
    assert_eq!(partitions(&server, "sim-xpu"), 2);

    // B.6 (the text's lower-case spelling of the path).
    let (status, body) = server.get(&format!(
        "/CCP/algoservice/workloads/human-detect?clusterCode={cluster}&namespace=default"
    ));
    assert_eq!(status, 200, "{body}");
    let data = &body["data"];
    assert_eq!(data["status"], "Running", "{body}");
    assert_eq!(data["xpu"], 0.5);
    assert_eq!(data["xpuMemory"], 8.0);
    assert_eq!(data["image"], "XPUD-PT-4.0.0");
    let created = data["createdDate"].as_str().unwrap();
    assert_eq!(created.len(), "yyyy-MM-dd HH:mm:ss.SSS".len(), "{created}");

    // B.7 / B.8
    let (_, body) = server.call(
        Method::GET,
        "/CCP/algoService/pods",
        Some(json!({ "clusterCode": cluster, "namespace": "default", "workloadName": "human-detect" })),
    );
    let pods = body["data"]["pods"].as_array().unwrap().clone();
    assert_eq!(pods.len(), 2);
    for pod in &pods {
        assert_eq!(pod["status"], "Running");
        assert_eq!(pod["ready"], true);
        assert_eq!(pod["restarts"], 0);
        assert_eq!(pod["deploymentName"], "human-detect");
        assert_eq!(pod["labels"], json!([{ "name": "app", "value": "test" }]));
        assert!(pod["name"].as_str().unwrap().starts_with("human-detect-"));
    }
    let name = pods[0]["name"].as_str().unwrap();
    let (status, body) = server.get(&format!(
        "/CCP/algoService/pods/{name}?clusterCode={cluster}&namespace=default&workloadName=human-detect"
    ));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["name"], name);
    let (status, _) = server.get(&format!(
        "/CCP/algoService/pods/nope?clusterCode={cluster}&namespace=default&workloadName=human-detect"
    ));
    assert_eq!(status, 404);

    // B.4: more pods than the node has cores is refused (each pod reserves its
    // cpu), nothing changes; then down to 1, which frees a partition.
    let scale = |replicas: u32| {
        server.call(
            Method::PUT,
            "/CCP/algoService/workloads/human-detect",
            Some(json!({ "clusterCode": cluster, "namespace": "default", "replicas": replicas })),
        )
    };
    let count = || {
        server.call(
            Method::GET,
            "/CCP/algoService/pods",
            Some(json!({ "clusterCode": cluster, "namespace": "default", "workloadName": "human-detect" })),
        ).1["data"]["pods"].as_array().unwrap().len()
    };
    let cores = server.app.machine.facts().cpu_cores;
    let (status, body) = scale(cores + 1);
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().starts_with("cpu:"),
        "{body}"
    );
    assert_eq!(count(), 2);
    assert_eq!(partitions(&server, "sim-xpu"), 2);
    assert_eq!(scale(1).0, 200);
    assert_eq!(count(), 1);
    assert_eq!(partitions(&server, "sim-xpu"), 1);

    // B.5 with the text's page request.
    let (_, body) = server.call(
        Method::GET,
        "/CCP/algoService/workloads",
        Some(json!({ "clusterCode": cluster, "namespace": "default",
                     "pageRequest": { "pageNumber": 1, "pageSize": 20, "orderList": [{ "property": "id", "direction": "desc" }] } })),
    );
    assert_eq!(body["data"]["total"], 1, "{body}");
    assert_eq!(
        body["data"]["pageContent"][0]["workloadName"],
        "human-detect"
    );
    assert_eq!(body["data"]["pageContent"][0]["replicas"], 1);
    let (status, body) = server.get(&format!(
        "/CCP/algoService/workloads?clusterCode={cluster}&pageNumber=0"
    ));
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("pageNumber"));

    // The cluster cannot go while the workload runs, nor the package its pods run;
    // B.3 then they can.
    let (status, _) = server.call(Method::DELETE, &format!("/CCP/clusters/{cluster}"), None);
    assert_eq!(status, 409);
    let (status, body) = server.call(Method::DELETE, "/CAP/AlgoFilePackages/pkg", None);
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("human-detect"), "{body}");
    let (status, body) = server.call(
        Method::DELETE,
        "/CCP/algoService/workloads/human-detect",
        Some(json!({ "clusterCode": cluster, "namespace": "default" })),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(partitions(&server, "sim-xpu"), 0);
    let (status, _) = server.get(&format!(
        "/CCP/algoService/workloads/human-detect?clusterCode={cluster}"
    ));
    assert_eq!(status, 404);
    let (status, _) = server.call(Method::DELETE, &format!("/CCP/clusters/{cluster}"), None);
    assert_eq!(status, 200);
    let (status, body) = server.call(Method::DELETE, "/CAP/AlgoFilePackages/pkg", None);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn bad_workloads_are_refused_with_the_field() {
    let (_platform, server, cluster) = setup();
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut request = example_workload(&cluster);
        edit(&mut request);
        server.post("/CCP/algoService/workloads", request)
    };
    for (edit, field, status) in [
        (
            &(|r: &mut serde_json::Value| r["image"] = json!("NO-SUCH-1.0"))
                as &dyn Fn(&mut serde_json::Value),
            "NO-SUCH-1.0",
            404,
        ),
        (
            &|r: &mut serde_json::Value| r["labelSelector"] = json!({ "app": "other" }),
            "labelSelector",
            400,
        ),
        (
            &|r: &mut serde_json::Value| r["xpu"] = json!(0.25),
            "xpu",
            400,
        ),
        (
            &|r: &mut serde_json::Value| r["xpuType"] = json!("NVIDIA_T4"),
            "NVIDIA_T4",
            409,
        ),
        (
            &|r: &mut serde_json::Value| r["cpu"] = json!(10_000),
            "cpu",
            409,
        ),
        (
            &|r: &mut serde_json::Value| {
                r.as_object_mut().unwrap().remove("containerName");
            },
            "containerName",
            400,
        ),
        (
            &|r: &mut serde_json::Value| r["clusterCode"] = json!("cluster-nope"),
            "cluster-nope",
            404,
        ),
    ] {
        let (got, body) = with(edit);
        assert_eq!(got, status, "{field}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(field),
            "{field}: {body}"
        );
    }
    assert_eq!(partitions(&server, "sim-xpu"), 0);
    assert_eq!(
        server
            .post("/CCP/algoService/workloads", example_workload(&cluster))
            .0,
        200
    );
    let (status, body) = server.post("/CCP/algoService/workloads", example_workload(&cluster));
    assert_eq!(status, 409, "{body}");
}

#[test]
fn an_algorithm_that_is_its_own_archive_installs_and_runs_as_a_workload_image() {
    // E.6's text never says what `url` holds; a platform may push the package
    // archive itself as the algorithm, with the text's own `"md5": ""`.
    let (platform, server, cluster) = setup();
    let (url, _) = platform.publish("algo.tar.gz", &passthrough_package("XPUD-SELF-1.0.0"));
    let (status, body) = server.post(
        "/CAP/AlgoPackages",
        json!({ "id": "algo-self", "md5": "", "url": url }),
    );
    assert_eq!(status, 200, "{body}");
    let mut last = json!(null);
    assert!(wait_for(Duration::from_secs(20), || {
        last = server.get("/CAP/AlgoPackages/algo-self").1;
        last["data"]["status"] != 1
    }));
    assert_eq!(last["data"]["status"], 0, "{last}");
    assert_eq!(last["data"]["relatedAlgoFilePackageId"], "algo-self");
    // Its archive is a file package of its own, under the algorithm's id.
    let (_, body) = server.get("/CAP/AlgoFilePackages/algo-self");
    assert_eq!(body["data"]["status"], 0, "{body}");

    // B.2's image may name the algorithm.
    let mut workload = example_workload(&cluster);
    workload["image"] = json!("algo-self");
    workload["name"] = json!("self-contained");
    let (status, body) = server.post("/CCP/algoService/workloads", workload);
    assert_eq!(status, 200, "{body}");

    // The bundled package cannot be deleted on its own; it goes with the algorithm.
    let (status, _) = server.call(Method::DELETE, "/CAP/AlgoFilePackages/algo-self", None);
    assert_eq!(status, 409);
}

/// A workload whose pods cannot start is Failed in B.6 with the reason, its pods are
/// Failed in B.7, and the supervisor keeps trying on its own schedule (within its
/// restart budget) without anyone calling the pods.
#[test]
fn a_workload_whose_pods_cannot_start_is_not_running() {
    let platform = FileServer::start();
    let server = TestServer::start(&["sim-xpu"]);
    // 1 MiB is less than the plugin's initial memory: every start fails.
    let package =
        passthrough_package_with("XPUD-PT-TINY", |m| set(m, "limits", "memory-mib", 1.into()));
    let (url, md5) = platform.publish("tiny.tar.gz", &package);
    server.post(
        "/CAP/AlgoFilePackages",
        json!({ "id": "tiny", "md5": md5, "url": url }),
    );
    assert!(wait_for(Duration::from_secs(20), || server
        .get("/CAP/AlgoFilePackages/tiny")
        .1["data"]["status"]
        == 0));
    let (_, body) = server.post("/CCP/clusters", json!({
        "name": "c",
        "spec": { "version": "1.20.4", "nodes": [{ "nodeResource": { "cpu": 1, "mem": 1, "rootDiskSize": 1, "localDiskSize": 0 }, "count": 1 }] }
    }));
    let cluster = body["data"]["clusterCode"].as_str().unwrap().to_string();
    let mut workload = example_workload(&cluster);
    workload["image"] = "XPUD-PT-TINY".into();
    let (status, body) = server.post("/CCP/algoService/workloads", workload);
    assert_eq!(status, 200, "{body}");

    let detail = || {
        server
            .get(&format!(
                "/CCP/algoService/workloads/human-detect?clusterCode={cluster}&namespace=default"
            ))
            .1["data"]
            .clone()
    };
    let data = detail();
    assert_eq!(data["status"], "Failed", "{data}");
    let why = data["statusDesc"].as_str().unwrap();
    assert!(
        why.contains("cannot start") || why.contains("given up"),
        "{why}"
    );
    assert!(why.contains("memory"), "{why}");

    let (_, body) = server.call(
        Method::GET,
        "/CCP/algoService/pods",
        Some(json!({ "clusterCode": cluster, "namespace": "default", "workloadName": "human-detect" })),
    );
    for pod in body["data"]["pods"].as_array().unwrap() {
        assert_eq!(pod["status"], "Failed", "{pod}");
        assert_eq!(pod["ready"], false, "{pod}");
    }
    // Retried on the supervisor's schedule until the budget is spent (3 restarts
    // in 60 s by default, backoffs 200, 400, 800 ms): given up, said so.
    assert!(
        wait_for(Duration::from_secs(10), || detail()["statusDesc"]
            .as_str()
            .unwrap()
            .contains("given up: 4 crashes")),
        "{}",
        detail()
    );
}

/// Replicas 0 is Stopped, not Running.
#[test]
fn a_workload_scaled_to_zero_is_stopped() {
    let (_platform, server, cluster) = setup();
    let mut workload = example_workload(&cluster);
    workload["replicas"] = 0.into();
    let (status, body) = server.post("/CCP/algoService/workloads", workload);
    assert_eq!(status, 200, "{body}");
    let (_, body) = server.get(&format!(
        "/CCP/algoService/workloads/human-detect?clusterCode={cluster}&namespace=default"
    ));
    assert_eq!(body["data"]["status"], "Stopped", "{body}");
}

/// B.2's cpu and memory are reserved per pod: pods never over-commit the node, a
/// release frees them. `command` and `args` are the pod's arguments.
#[test]
fn pods_reserve_the_nodes_cores_and_get_their_arguments() {
    let (_platform, server, cluster) = setup();
    let cores = server.app.machine.facts().cpu_cores;
    let mut big = example_workload(&cluster);
    big["name"] = "big".into();
    big["replicas"] = 1.into();
    big["cpu"] = cores.into();
    big["command"] = "detect --threads 4".into();
    big["args"] = r#"--zone "gate a" '$HOME'"#.into();
    let (status, body) = server.post("/CCP/algoService/workloads", big);
    assert_eq!(status, 200, "{body}");

    let mut small = example_workload(&cluster);
    small["name"] = "small".into();
    small["replicas"] = 1.into();
    small["cpu"] = 1.into();
    let (status, body) = server.post("/CCP/algoService/workloads", small.clone());
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("reserved by running pods"),
        "{body}"
    );
    let scale = |name: &str, replicas: u32| {
        server.call(
            Method::PUT,
            &format!("/CCP/algoService/workloads/{name}"),
            Some(json!({ "clusterCode": cluster, "namespace": "default", "replicas": replicas })),
        )
    };
    assert_eq!(scale("big", 2).0, 409);

    // The pod runs with exactly those arguments.
    let worker = server.app.workloads.workers()[0].clone();
    let attributes = echoed_launch(&worker);
    assert_eq!(
        attributes["args"],
        json!(["detect", "--threads", "4", "--zone", "gate a", "$HOME"])
    );
    assert_eq!(attributes["env"], json!({}));

    // Scaled to 0, the cores are free again.
    assert_eq!(scale("big", 0).0, 200);
    let (status, body) = server.post("/CCP/algoService/workloads", small);
    assert_eq!(status, 200, "{body}");

    let mut unclosed = example_workload(&cluster);
    unclosed["name"] = "unclosed".into();
    unclosed["args"] = "'oops".into();
    let (status, body) = server.post("/CCP/algoService/workloads", unclosed);
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("args"), "{body}");
}

/// After a restart whose pods cannot be started again (here: their cards are gone),
/// B.6 says Failed and why, not Running with the replicas it had.
#[test]
fn pods_that_do_not_come_back_after_a_restart_are_not_running() {
    let (_platform, mut first, cluster) = setup();
    let (status, body) = first.post("/CCP/algoService/workloads", example_workload(&cluster));
    assert_eq!(status, 200, "{body}");
    first.shutdown();
    let data = first.data.path().to_path_buf();
    // The same state, without the driver whose cards the pods were placed on.
    let second = TestServer::start_with(&[], |config| config.data_dir = data);
    let (status, body) = second.get(&format!(
        "/CCP/algoService/workloads/human-detect?clusterCode={cluster}&namespace=default"
    ));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["status"], "Failed", "{body}");
    let why = body["data"]["statusDesc"].as_str().unwrap();
    assert!(
        why.contains("after a restart") && why.contains("SIMULATED_XPU16"),
        "{why}"
    );
    assert_eq!(body["data"]["replicas"], 2);
}

/// Card <-> instance: each pod's partition is in /metrics, B.7 and the monitors
/// with the quota and device the driver reported for it, and the workload that
/// holds it.
#[test]
fn each_pods_partition_is_in_the_metrics_with_its_owner() {
    let (_platform, server, cluster) = setup();
    let (status, body) = server.post("/CCP/algoService/workloads", example_workload(&cluster));
    assert_eq!(status, 200, "{body}");
    let reported = reported_partitions(&server, "sim-xpu");
    assert_eq!(reported.len(), 2);
    let owner = format!("workload:{cluster}/default/human-detect");
    let instances = || {
        let (_, _, text) = server.client.get_text("/metrics", false);
        openmetrics(&text)
            .into_iter()
            .find(|f| f["name"] == "xpud_instance_memory_quota_mib")
            .map(|f| f["samples"].as_array().unwrap().clone())
            .unwrap_or_default()
    };
    assert!(wait_for(Duration::from_secs(10), || instances().len() == 2));
    let samples = instances();
    for partition in &reported {
        let sample = samples
            .iter()
            .find(|s| s["labels"]["partition"] == partition.id.as_str())
            .unwrap_or_else(|| panic!("{} not in {samples:?}", partition.id));
        assert_eq!(sample["labels"]["owner"], owner.as_str());
        assert_eq!(
            sample["labels"]["gpu"],
            partition.spec.device_index.to_string().as_str()
        );
        assert_eq!(
            sample["value"].as_f64().unwrap(),
            partition.spec.memory_quota_mib as f64
        );
    }
    // B.7: each pod names its card and partition, with the same figures.
    let (_, body) = server.call(
        Method::GET,
        "/CCP/algoService/pods",
        Some(json!({ "clusterCode": cluster, "namespace": "default", "workloadName": "human-detect" })),
    );
    let pods = body["data"]["pods"].as_array().unwrap();
    let mut named: Vec<&str> = pods
        .iter()
        .map(|pod| {
            let partition = reported
                .iter()
                .find(|p| pod["partition"] == p.id.as_str())
                .unwrap_or_else(|| panic!("{pod}"));
            assert_eq!(pod["memoryQuotaMib"], partition.spec.memory_quota_mib);
            assert_eq!(
                pod["card"],
                format!("sim-xpu/{}", partition.spec.device_index).as_str()
            );
            partition.id.as_str()
        })
        .collect();
    named.dedup();
    assert_eq!(named.len(), 2, "one partition per pod");
    // The monitors (C.2) show each card's partitions with who holds them and
    // what the driver measured, beside the card's own figures.
    let monitors = || {
        server.get(&format!("/CCP/cluster/monitors/{cluster}")).1["data"]["xpuMonitors"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    assert!(wait_for(Duration::from_secs(10), || monitors()
        .iter()
        .map(|m| m["instances"].as_array().map_or(0, Vec::len))
        .sum::<usize>()
        == 2));
    let monitors = monitors();
    assert_eq!(monitors.len(), 2);
    for card in &monitors {
        assert!(
            card["card"].as_str().unwrap().starts_with("sim-xpu/"),
            "{card}"
        );
        assert_eq!(card["health"], "healthy");
        let utilisation = card["xpuMemoryUtilization"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&utilisation), "{card}");
        assert!(card["videoDecodeUtilization"].as_f64().is_some(), "{card}");
        for instance in card["instances"].as_array().unwrap() {
            let partition = reported
                .iter()
                .find(|p| instance["partition"] == p.id.as_str())
                .unwrap_or_else(|| panic!("{instance}"));
            assert_eq!(
                card["card"],
                format!("sim-xpu/{}", partition.spec.device_index).as_str()
            );
            assert_eq!(instance["owner"], owner.as_str());
            assert_eq!(
                instance["xpuMemory"].as_f64().unwrap(),
                partition.spec.memory_quota_mib as f64 / 1024.0
            );
            assert!(instance["xpuMemoryUsed"].as_f64().is_some(), "{instance}");
        }
    }
}

/// The node carries its drivers' labels (A.9, C.3), and `labelSelector` keys
/// under `xpu.` choose cards by them: a selector no card satisfies is refused
/// naming what each card lacked.
#[test]
fn labels_published_by_drivers_are_shown_and_select_cards() {
    let (_platform, server, cluster) = setup();
    let (_, nodes) = server.get(&format!("/CCP/cluster/nodes?clusterCode={cluster}"));
    let labels = &nodes["data"][0]["xpuLabels"];
    let sim = labels
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["driver"] == "sim-xpu")
        .unwrap_or_else(|| panic!("{nodes}"));
    assert_eq!(sim["labels"]["xpu.model"], "SIMULATED_XPU16");
    assert_eq!(sim["labels"]["xpu.count"], "2");
    assert_eq!(sim["labels"]["xpu.simulated"], "true");
    let node = nodes["data"][0]["nodeId"].as_str().unwrap();
    let (_, monitors) = server.get(&format!("/CCP/node/monitors/{node}?clusterCode={cluster}"));
    assert_eq!(monitors["data"]["xpuLabels"], *labels, "{monitors}");

    let mut elsewhere = example_workload(&cluster);
    elsewhere["labelSelector"] = json!({ "app": "test", "xpu.model": "NVIDIA_T4" });
    let (status, body) = server.post("/CCP/algoService/workloads", elsewhere);
    assert_eq!(status, 409, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("sim-xpu/0 lacks xpu.model=NVIDIA_T4 (has SIMULATED_XPU16)"),
        "{message}"
    );
    assert_eq!(partitions(&server, "sim-xpu"), 0, "nothing was placed");

    let mut here = example_workload(&cluster);
    here["labelSelector"] = json!({ "app": "test", "xpu.model": "SIMULATED_XPU16" });
    let (status, body) = server.post("/CCP/algoService/workloads", here);
    assert_eq!(status, 200, "{body}");
    assert_eq!(partitions(&server, "sim-xpu"), 2);
}

/// A share of a card whose driver cannot partition it cannot be enforced: it is
/// refused with the reason; the whole card is not.
#[test]
fn a_share_of_a_card_that_cannot_be_shared_is_refused() {
    let (_platform, server, cluster) = setup();
    server.plugins.install_as("chaos", "chaos", |m| {
        set(m, "config", "mode", "unshared".into())
    });
    assert!(wait_for(Duration::from_secs(10), || server
        .app
        .xpus()
        .iter()
        .any(|x| &*x.xpu_type == "CHAOS_TEST")));
    let mut workload = example_workload(&cluster);
    workload["xpuType"] = json!("CHAOS_TEST");
    workload["replicas"] = json!(1);
    let (status, body) = server.post("/CCP/algoService/workloads", workload.clone());
    assert_eq!(status, 409, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("driver chaos cannot share card 0"),
        "{message}"
    );
    workload["xpu"] = json!(1);
    let (status, body) = server.post("/CCP/algoService/workloads", workload);
    assert_eq!(status, 200, "{body}");
}

/// B.2's `xpuMemory` (an extension; GB per pod) is held in the ledger beside the
/// share: it becomes the pod's partition quota and B.6's `xpuMemory`, and a card
/// whose memory is given out takes no more, whatever share it has left.
#[test]
fn pods_hold_the_accelerator_memory_they_ask_for() {
    let (platform, server, cluster) = setup();
    let mut workload = example_workload(&cluster);
    workload["xpu"] = json!(0.1);
    workload["xpuMemory"] = json!(12);
    workload["replicas"] = json!(1);
    let (status, body) = server.post("/CCP/algoService/workloads", workload.clone());
    assert_eq!(status, 200, "{body}");
    let (_, body) = server.call(
        Method::GET,
        "/CCP/algoService/workloads/human-detect",
        Some(json!({ "clusterCode": cluster, "namespace": "default" })),
    );
    assert_eq!(body["data"]["xpuMemory"], 12.0, "{body}");
    // The first card has 0.9 of its compute but 4 of its 16 GB left: the second
    // 12 GB pod goes to the other card.
    workload["name"] = json!("second");
    let (status, body) = server.post("/CCP/algoService/workloads", workload.clone());
    assert_eq!(status, 200, "{body}");
    let reported = reported_partitions(&server, "sim-xpu");
    let mut devices: Vec<u32> = reported.iter().map(|p| p.spec.device_index).collect();
    devices.sort();
    assert_eq!(devices, vec![0, 1]);
    assert!(reported
        .iter()
        .all(|p| p.spec.memory_quota_mib == 12 * 1024));

    // A service replica asks for half a card and so half its memory (its package's
    // limit is 0): no card has 8 GB left. Refused, naming what each card has.
    let algo = install_algorithm(
        &server,
        &platform,
        "pt",
        &passthrough_package("XPUD-PT-5.0.0"),
    );
    let (status, body) = server.post(
        "/CAP/AlgoServices",
        json!({ "envs": "", "replicas": 1, "gpuType": "SIMULATED_XPU16", "algoId": algo }),
    );
    assert_eq!(status, 409, "{body}");
    let message = body["msg"].as_str().unwrap();
    assert!(
        message.contains("sim-xpu/0 has 0.90 and 4096 MiB free")
            && message.contains("sim-xpu/1 has 0.90 and 4096 MiB free"),
        "{message}"
    );
    assert_eq!(reported_partitions(&server, "sim-xpu").len(), 2);

    workload["xpuMemory"] = json!(0);
    workload["name"] = json!("third");
    let (status, body) = server.post("/CCP/algoService/workloads", workload);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("xpuMemory"),
        "{body}"
    );
}

/// A pod on a card that turns unhealthy is placed again on a healthy card of its
/// type; its partition moves with it.
#[test]
fn a_pod_on_a_card_that_turns_unhealthy_moves() {
    let failing = FailingCard::start();
    let server = &failing.server;
    let (_platform, cluster) = install_and_make_a_cluster(server);
    let mut workload = example_workload(&cluster);
    workload["xpuType"] = json!("CHAOS_TEST");
    workload["replicas"] = json!(1);
    let (status, body) = server.post("/CCP/algoService/workloads", workload);
    assert_eq!(status, 200, "{body}");
    let card = || {
        let (_, body) = server.call(
            Method::GET,
            "/CCP/algoService/pods",
            Some(json!({ "clusterCode": cluster, "namespace": "default", "workloadName": "human-detect" })),
        );
        body["data"]["pods"][0]["card"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(card(), "chaos/0");
    failing.fail();
    assert!(wait_for(Duration::from_secs(20), || card() == "chaos/1"));
    let partitions = reported_partitions(server, "chaos");
    assert_eq!(partitions.len(), 1, "{partitions:?}");
    assert_eq!(partitions[0].spec.device_index, 1);
}
