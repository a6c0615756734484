//! Appendix E over HTTP: file packages and algorithms pushed, downloaded from a
//! local "platform", verified, installed, listed, deleted; and what goes wrong.

use std::time::Duration;

use crate::support::*;
use reqwest::Method;
use serde_json::json;

fn wait_status(server: &TestServer, path: &str) -> serde_json::Value {
    let mut last = json!(null);
    let settled = wait_for(Duration::from_secs(20), || {
        last = server.get(path).1;
        last["data"]["status"] != 1
    });
    assert!(settled, "{path} never left downloading: {last}");
    last
}

#[test]
fn packages_and_algorithms_install_and_run() {
    // The platform serves its packages over HTTPS, from a CA xpud is told to trust.
    let tls = TestTls::new();
    let platform = FileServer::start_tls(&tls);
    let bundle = tls.ca_bundle.path().to_path_buf();
    let server = TestServer::start_with(&[], |c| c.platform.ca_bundle = Some(bundle));
    let (url, md5) = platform.publish("pt.tar.gz", &passthrough_package("XPUD-PT-1.0.0"));

    // E.2, the text's example shape with real values.
    let id = "7a90a32d-8ae8-4ffa-b000-07ef71058bab";
    let (status, body) = server.post(
        "/CAP/AlgoFilePackages",
        json!({ "id": id, "md5": md5, "url": url }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({ "code": 0, "msg": "success", "data": {} }));

    // E.5
    let body = wait_status(&server, &format!("/CAP/AlgoFilePackages/{id}"));
    let data = &body["data"];
    assert_eq!(data["status"], 0, "{body}");
    assert_eq!(data["name"], "passthrough");
    assert_eq!(data["version"], "0.1.0");
    assert_eq!(data["author"], "xpud");
    assert_eq!(data["tags"], json!(["demo"]));
    assert_eq!(
        data["env"],
        json!([{ "name": "LOG_LEVEL", "value": "info" }])
    );
    assert_eq!(data["bin"]["type"], "wasm");
    assert!(data["bin"]["localUri"].as_str().unwrap().ends_with(id));
    let gpu = &data["algoRuntime"]["gpu"][0];
    assert_eq!(gpu["quota"], 0.5);
    assert_eq!(gpu["resolution"], "PIXELS_200W");
    assert_eq!(gpu["capacities"]["streamVideoQuota"], 6);

    // E.4, 1-based pages with the total.
    let (_, body) = server.post(
        "/CAP/AlgoFilePackages:search",
        json!({ "pageNumber": 1, "pageSize": 20, "name": "pass" }),
    );
    assert_eq!(body["data"]["total"], 1, "{body}");
    assert_eq!(body["data"]["pageNumber"], 1);
    assert_eq!(body["data"]["records"][0]["id"], id);
    let (_, body) = server.post(
        "/CAP/AlgoFilePackages:search",
        json!({ "pageNumber": 1, "pageSize": 20, "name": "nothing" }),
    );
    assert_eq!(body["data"]["total"], 0);

    // E.6 / E.9 / E.8: an algorithm naming the package.
    let (doc_url, doc_md5) = platform.publish(
        "algo.json",
        json!({ "relatedAlgoFilePackageId": id })
            .to_string()
            .as_bytes(),
    );
    let (status, body) = server.post(
        "/CAP/AlgoPackages",
        json!({ "id": "algo-1", "md5": doc_md5, "url": doc_url }),
    );
    assert_eq!(status, 200, "{body}");
    let body = wait_status(&server, "/CAP/AlgoPackages/algo-1");
    assert_eq!(body["data"]["status"], 0, "{body}");
    assert_eq!(body["data"]["relatedAlgoFilePackageId"], id);
    let (_, body) = server.post(
        "/CAP/AlgoPackages:search",
        json!({ "pageNumber": 1, "pageSize": 20 }),
    );
    assert_eq!(body["data"]["total"], 1);
    assert_eq!(body["data"]["records"][0]["url"], doc_url.as_str());
    // The standard's own example sends `"md5": ""`: not given, accepted, shown as is.
    let (status, body) = server.post(
        "/CAP/AlgoPackages",
        json!({ "id": "algo-no-md5", "md5": "", "url": doc_url }),
    );
    assert_eq!(status, 200, "{body}");
    let body = wait_status(&server, "/CAP/AlgoPackages/algo-no-md5");
    assert_eq!(body["data"]["status"], 0, "{body}");
    let (status, _) = server.call(
        reqwest::Method::DELETE,
        "/CAP/AlgoPackages/algo-no-md5",
        None,
    );
    assert_eq!(status, 200);

    // The installed plugin runs.
    let plugin = server.app.packages.plugin_of_algorithm("algo-1").unwrap();
    let worker = plugin.algorithm().unwrap().spawn_worker();
    let session = worker
        .open_session(vec![xpud::runtime::bindings::analyzer::Rule {
            event_type: "X".into(),
            areas: vec![],
            masks: vec![],
            extend_params: "{}".into(),
        }])
        .unwrap();
    let frame = xpud::runtime::frames::Frame::new(
        32,
        32,
        0,
        xpud::runtime::bindings::wit_frames::PixelFormat::Gray8,
        vec![7u8; 1024].into(),
    )
    .unwrap();
    assert_eq!(
        worker.process(session, &frame).unwrap()[0].event_type,
        "FRAME_SEEN"
    );

    // In use: the package cannot go; the algorithm can, then the package.
    let (status, body) = server.call(Method::DELETE, &format!("/CAP/AlgoFilePackages/{id}"), None);
    assert_eq!(status, 409);
    assert_eq!(body["code"], 409);
    assert!(body["msg"].as_str().unwrap().contains("algo-1"), "{body}");
    let (status, _) = server.call(Method::DELETE, "/CAP/AlgoPackages/algo-1", None);
    assert_eq!(status, 200);
    let (status, body) = server.call(Method::DELETE, &format!("/CAP/AlgoFilePackages/{id}"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["id"], id);
    assert!(!server.data.path().join("packages/files").join(id).exists());
    let (status, body) = server.get(&format!("/CAP/AlgoFilePackages/{id}"));
    assert_eq!(status, 404);
    assert_eq!(body["code"], 404);
}

#[test]
fn failed_downloads_leave_nothing_and_say_why() {
    let platform = FileServer::start();
    let server = TestServer::start(&[]);
    let package = passthrough_package("XPUD-PT-2.0.0");
    let (url, _) = platform.publish("pt.tar.gz", &package);
    let files = server.data.path().join("packages/files");

    // md5 mismatch.
    let wrong = "0123456789abcdef0123456789abcdef";
    server.post(
        "/CAP/AlgoFilePackages",
        json!({ "id": "p-md5", "md5": wrong, "url": url }),
    );
    let body = wait_status(&server, "/CAP/AlgoFilePackages/p-md5");
    assert_eq!(body["data"]["status"], 2);
    assert!(
        body["data"]["statusDesc"]
            .as_str()
            .unwrap()
            .contains("md5 mismatch"),
        "{body}"
    );
    assert!(!files.join("p-md5").exists());

    // Not there.
    let missing = format!("{}/missing.tar.gz", platform.base);
    server.post(
        "/CAP/AlgoFilePackages",
        json!({ "id": "p-404", "md5": wrong, "url": missing }),
    );
    let body = wait_status(&server, "/CAP/AlgoFilePackages/p-404");
    assert!(
        body["data"]["statusDesc"].as_str().unwrap().contains("404"),
        "{body}"
    );

    // Not a package.
    let (junk_url, junk_md5) = platform.publish("junk.tar.gz", b"not an archive");
    server.post(
        "/CAP/AlgoFilePackages",
        json!({ "id": "p-junk", "md5": junk_md5, "url": junk_url }),
    );
    let body = wait_status(&server, "/CAP/AlgoFilePackages/p-junk");
    assert_eq!(body["data"]["status"], 2);
    assert!(!files.join("p-junk").exists());
    // A failed push can be retried under its id; a good one cannot be pushed twice.
    let md5 = hex::encode(<md5::Md5 as md5::Digest>::digest(&package));
    server.post(
        "/CAP/AlgoFilePackages",
        json!({ "id": "p-junk", "md5": md5, "url": url }),
    );
    assert_eq!(
        wait_status(&server, "/CAP/AlgoFilePackages/p-junk")["data"]["status"],
        0
    );
    let (status, body) = server.post(
        "/CAP/AlgoFilePackages",
        json!({ "id": "p-junk", "md5": md5, "url": url }),
    );
    assert_eq!(status, 409, "{body}");

    // An algorithm whose package is not installed fails, saying so.
    let (doc_url, doc_md5) = platform.publish("a.json", br#"{"relatedAlgoFilePackageId": "nope"}"#);
    server.post(
        "/CAP/AlgoPackages",
        json!({ "id": "a-1", "md5": doc_md5, "url": doc_url }),
    );
    let body = wait_status(&server, "/CAP/AlgoPackages/a-1");
    assert_eq!(body["data"]["status"], 2);
    assert!(
        body["data"]["statusDesc"]
            .as_str()
            .unwrap()
            .contains("not installed"),
        "{body}"
    );

    // Bad requests: named fields, nothing recorded.
    let before = server
        .post(
            "/CAP/AlgoFilePackages:search",
            json!({ "pageNumber": 1, "pageSize": 50 }),
        )
        .1["data"]["total"]
        .clone();
    for (request, field) in [
        (
            json!({ "id": "x", "md5": "7a90a32d-8ae8-4ffa-b000-07ef71058bab", "url": url }),
            "md5",
        ),
        (
            json!({ "id": "x", "md5": wrong, "url": "file:///etc/passwd" }),
            "url",
        ),
        (json!({ "id": "../x", "md5": wrong, "url": url }), "id"),
        (json!({ "md5": wrong, "url": url }), "id"),
        (json!({ "id": 5, "md5": wrong, "url": url }), "id"),
    ] {
        let (status, body) = server.post("/CAP/AlgoFilePackages", request);
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["code"], 400);
        assert!(
            body["msg"].as_str().unwrap().contains(field),
            "{field}: {body}"
        );
    }
    let (status, body) = server.post(
        "/CAP/AlgoFilePackages:search",
        json!({ "pageNumber": 0, "pageSize": 20 }),
    );
    assert_eq!(status, 400);
    assert!(body["msg"].as_str().unwrap().contains("pageNumber"));
    let after = server
        .post(
            "/CAP/AlgoFilePackages:search",
            json!({ "pageNumber": 1, "pageSize": 50 }),
        )
        .1["data"]["total"]
        .clone();
    assert_eq!(before, after);
}
