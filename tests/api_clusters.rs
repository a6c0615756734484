//! Appendix A over HTTP: clusters and nodes on the single-machine backend, with the
//! text's example requests (JSON typos fixed).

use crate::support::*;
use reqwest::Method;
use serde_json::json;

/// Table A.10's example, typos fixed (a missing comma).
fn example_cluster() -> serde_json::Value {
    json!({
        "regionId": "cn-bj-d",
        "name": "test-open-clusters",
        "spec": {
            "version": "1.18.9",
            "hostNetwork": "192.168.0.0/20",
            "nodes": [{
                "nodeResource": {
                    "cpu": 4, "mem": 8, "rootDiskSize": 40, "localDiskSize": 0,
                    "xpuResources": { "xpuType": "NVIDIA_T4", "num": 4 }
                },
                "count": 2
            }]
        }
    })
}

/// A cluster this machine can hold: one node, one simulated card.
fn fitting_cluster(name: &str) -> serde_json::Value {
    json!({
        "name": name,
        "spec": {
            "version": "1.24.3",
            "nodes": [{
                "nodeResource": {
                    "cpu": 1, "mem": 1, "rootDiskSize": 1, "localDiskSize": 0,
                    "xpuResources": [{ "xpuType": "SIMULATED_XPU16", "num": 1 }]
                },
                "count": 1
            }]
        }
    })
}

fn ok(status: u16, body: &serde_json::Value) {
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["code"], "0", "{body}");
    assert_eq!(body["message"], "success");
    assert!(body["requestId"].as_str().is_some_and(|id| !id.is_empty()));
}

#[test]
fn clusters_and_nodes_follow_this_machine() {
    let server = TestServer::start(&["sim-xpu"]);

    // The text's example asks for two nodes with four T4s: not here, and it says why.
    let (status, body) = server.post("/CCP/clusters", example_cluster());
    ok(status, &body);
    assert_eq!(body["data"]["status"], "create_failed");
    assert_eq!(body["data"]["name"], "test-open-clusters");
    assert!(body["data"]["reason"]
        .as_str()
        .unwrap()
        .contains("asks for 2"));
    let failed = body["data"]["clusterCode"].as_str().unwrap().to_string();

    let (status, body) = server.post("/CCP/clusters", fitting_cluster("edge"));
    ok(status, &body);
    assert_eq!(body["data"]["status"], "running", "{body}");
    let code = body["data"]["clusterCode"].as_str().unwrap().to_string();

    // The machine is taken now.
    let (_, body) = server.post("/CCP/clusters", fitting_cluster("second"));
    assert_eq!(body["data"]["status"], "create_failed");
    assert!(body["data"]["reason"]
        .as_str()
        .unwrap()
        .contains("already belongs"));

    // A.4 and A.5.
    let (status, body) = server.get("/CCP/clusters");
    ok(status, &body);
    let list = body["data"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list[1]["metadata"]["clusterCode"], code.as_str());
    assert_eq!(list[1]["spec"]["nodes"][0]["count"], 1);
    let (status, body) = server.get(&format!("/CCP/clusters/{code}"));
    ok(status, &body);
    assert_eq!(body["data"]["phase"], "running");
    assert_eq!(body["data"]["spec"]["version"], "1.24.3");
    let (_, body) = server.get(&format!("/CCP/clusters/{failed}"));
    assert_eq!(body["data"]["phase"], "create_failed");

    // A.6: where to reach this xpud.
    let (status, body) = server.get(&format!("/CCP/clusters/{code}/license?regionId=cn-bj-d"));
    ok(status, &body);
    let port = server.base.rsplit(':').next().unwrap();
    assert!(body["data"]["externalAddress"]
        .as_str()
        .unwrap()
        .ends_with(port));
    assert!(body["data"]["caCertData"].is_string());

    // A.9, with the parameters as a query and as a body.
    let (status, body) = server.get(&format!("/CCP/cluster/nodes?clusterCode={code}"));
    ok(status, &body);
    let nodes = body["data"].as_array().unwrap();
    assert_eq!(nodes.len(), 1);
    let node = &nodes[0];
    let node_id = node["nodeId"].as_str().unwrap().to_string();
    assert_eq!(node["machineType"], "GPU");
    assert!(node["cpu"].as_u64().unwrap() >= 1);
    assert_eq!(node["memory"], node["memoy"]);
    assert_eq!(node["internalIp"], node["interalIp"]);
    assert_eq!(
        node["xpuResources"],
        json!([{ "xpuType": "SIMULATED_XPU16", "num": 2, "simulated": true }])
    );
    let (_, by_body) = server.call(
        Method::GET,
        "/CCP/cluster/nodes",
        Some(json!({ "regionId": "cn-bj-d", "clusterCode": code })),
    );
    assert_eq!(by_body["data"], body["data"]);

    // A.7 / A.8: the node is taken; remove it, add it back.
    let add = json!({
        "regionId": "cn-bj-d", "clusterCode": code, "count": 1,
        "spec": { "nodeResource": { "cpu": 1, "mem": 1, "rootDiskSize": 1, "localDiskSize": 0 } }
    });
    let (status, body) = server.post("/CCP/cluster/nodes", add.clone());
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "409");
    let (status, body) = server.call(
        Method::DELETE,
        "/CCP/cluster/nodes",
        Some(json!({ "clusterCode": code, "nodeId": ["node-elsewhere"] })),
    );
    assert_eq!(status, 404, "{body}");
    assert!(body["message"].as_str().unwrap().contains("node-elsewhere"));
    let (status, body) = server.call(
        Method::DELETE,
        "/CCP/cluster/nodes",
        Some(json!({ "regionId": "cn-bj-d", "clusterCode": code, "nodeId": [node_id] })),
    );
    ok(status, &body);
    let (_, body) = server.get(&format!("/CCP/cluster/nodes?clusterCode={code}"));
    assert_eq!(body["data"], json!([]));
    let (status, body) = server.post("/CCP/cluster/nodes", add);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["code"], "0");
    assert_eq!(body["nodeId"], json!([node_id]));

    // A.3.
    let (status, body) = server.call(Method::DELETE, &format!("/CCP/clusters/{code}"), None);
    ok(status, &body);
    let (status, body) = server.get(&format!("/CCP/clusters/{code}"));
    assert_eq!(status, 404);
    assert_eq!(body["code"], "404");
    assert!(body["message"].as_str().unwrap().contains(&code));
}

#[test]
fn bad_cluster_requests_name_the_field_and_change_nothing() {
    let server = TestServer::start(&["sim-xpu"]);
    let count = || {
        server.get("/CCP/clusters").1["data"]
            .as_array()
            .unwrap()
            .len()
    };

    let mut missing = fitting_cluster("x");
    missing.as_object_mut().unwrap().remove("name");
    let (status, body) = server.post("/CCP/clusters", missing);
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("missing field `name`"),
        "{body}"
    );

    let mut wrong = fitting_cluster("x");
    wrong["spec"]["nodes"][0]["count"] = json!("two");
    let (status, body) = server.post("/CCP/clusters", wrong);
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.nodes[0].count"),
        "{body}"
    );

    let mut version = fitting_cluster("x");
    version["spec"]["version"] = json!("1.19.0");
    let (status, body) = server.post("/CCP/clusters", version);
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("spec.version"),
        "{body}"
    );

    let (status, body) = server.post_raw("/CCP/clusters", b"{\"name\": ".to_vec());
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("not valid JSON"),
        "{body}"
    );

    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let (status, body) = server.post_raw("/CCP/clusters", huge.into_bytes());
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "413");

    let (status, body) = server.get("/CCP/cluster/nodes");
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("clusterCode"),
        "{body}"
    );

    // Names and codes never carry control characters or bidirectional overrides
    // (NUL, a newline, U+202E), in a body or a query.
    for name in [r"a\u0000b", r"line\nbreak", r"evil\u202etxt"] {
        let body = format!("{{\"name\": \"{name}\"}}");
        let (status, body) = server.post_raw("/CCP/clusters", body.into_bytes());
        assert_eq!(status, 400, "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .starts_with("name: control"),
            "{body}"
        );
    }
    let (status, body) = server.get("/CCP/cluster/nodes?clusterCode=x%00y");
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("clusterCode"),
        "{body}"
    );

    assert_eq!(count(), 0);
}

#[test]
fn unknown_paths_and_wrong_methods_answer_in_the_appendix_envelope() {
    let server = TestServer::start(&[]);
    let (status, body) = server.get("/CCP/nothing/here");
    assert_eq!(status, 404);
    assert_eq!(body["code"], "404");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("/CCP/nothing/here"));
    let (status, body) = server.call(Method::PUT, "/CCP/clusters", None);
    assert_eq!(status, 405);
    assert_eq!(body["code"], "405");
    let (status, body) = server.get("/CAP/Nothing");
    assert_eq!(status, 404);
    assert_eq!(body["code"], 404);
    assert!(body["msg"].as_str().unwrap().contains("/CAP/Nothing"));
    let (status, body) = server.call(Method::DELETE, "/CAP/Status", None);
    assert_eq!(status, 405);
    assert_eq!(body["code"], 405);
    assert!(body["message"].is_string());
}
