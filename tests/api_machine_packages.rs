//! Appendix I over HTTP: a machine in CAD mode receives a file package by id from the
//! platform, installs (and so starts) it by code, lists it, uninstalls it.

use std::time::Duration;

use crate::support::*;
use reqwest::Method;
use serde_json::json;

#[test]
fn machine_packages_install_run_and_uninstall() {
    let platform = FileServer::start();
    platform.publish("17.tar.gz", &passthrough_package("XPUD-PT-5.0.0"));
    let template = format!("{}/{{id}}.tar.gz", platform.base);
    let server = TestServer::start_with(&["sim-xpu"], |config| {
        config.platform.package_url = Some(template);
    });

    // I.2, the text's example.
    let (status, body) = server.post(
        "/CAD/machine/algoFilePackages",
        json!({ "algoFilePackageId": 17, "authAddress": "127.0.0.1:8080", "licenseFile": "/auth_license.txt" }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["code"], "0");
    assert!(wait_for(Duration::from_secs(20), || server
        .get("/CAP/AlgoFilePackages/17")
        .1["data"]["status"]
        == 0));

    // I.4, the text's example with this package's code and this machine's cards.
    let (status, body) = server.post(
        "/CAD/machine/algoPackages",
        json!({ "algoPackageCode": "XPUD-PT-5.0.0", "args": "xpuType=SIMULATED_XPU16" }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(partitions(&server, "sim-xpu"), 1);
    let (status, _) = server.post(
        "/CAD/machine/algoPackages",
        json!({ "algoPackageCode": "XPUD-PT-5.0.0" }),
    );
    assert_eq!(status, 409);
    let (status, body) = server.post(
        "/CAD/machine/algoPackages",
        json!({ "algoPackageCode": "BAIDU-HUMAN_ATTR_ALERT-1.0.0" }),
    );
    assert_eq!(status, 404);
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("BAIDU-HUMAN_ATTR_ALERT-1.0.0"));
    let (status, body) = server.post(
        "/CAD/machine/algoPackages",
        json!({ "algoPackageCode": "has space" }),
    );
    assert_eq!(status, 400);
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("algoPackageCode"));

    // I.6 (the text's `algopackages` spelling), with and without the status filter.
    let (_, body) = server.get("/CAD/machine/algopackages?status=RUNNING");
    let list = body["data"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{body}");
    assert_eq!(list[0]["algoPackageCode"], "XPUD-PT-5.0.0");
    assert_eq!(list[0]["algoPackageName"], "passthrough");
    assert_eq!(list[0]["algoPackageType"], "ENGINE");
    assert_eq!(list[0]["algoPackageVersion"], "0.1.0");
    assert_eq!(list[0]["status"], "RUNNING");
    assert_eq!(list[0]["createdDate"].as_str().unwrap().len(), 23);
    let (_, body) = server.call(
        Method::GET,
        "/CAD/machine/algoPackages",
        Some(json!({ "status": "STOPPED" })),
    );
    assert_eq!(body["data"], json!([]));
    let (status, _) = server.get("/CAD/machine/algoPackages?status=PAUSED");
    assert_eq!(status, 400);

    // I.7 (the text's `algorithmPackages` spelling).
    let (status, body) = server.get("/CAD/machine/algorithmPackages/XPUD-PT-5.0.0");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["status"], "RUNNING");

    // I.3 refuses while installed; I.5 then I.3.
    let (status, _) = server.call(Method::DELETE, "/CAD/machine/algoFilePackages/17", None);
    assert_eq!(status, 409);
    let (status, _) = server.call(
        Method::DELETE,
        "/CAD/machine/algopackages/XPUD-PT-5.0.0",
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(partitions(&server, "sim-xpu"), 0);
    let (status, _) = server.call(Method::DELETE, "/CAD/machine/algoFilePackages/17", None);
    assert_eq!(status, 200);
    let (status, body) = server.get("/CAD/machine/algoPackages/XPUD-PT-5.0.0");
    assert_eq!(status, 404);
    assert_eq!(body["code"], "404");
}

#[test]
fn a_machine_without_a_package_url_says_so() {
    let server = TestServer::start(&[]);
    let (status, body) = server.post(
        "/CAD/machine/algoFilePackages",
        json!({ "algoFilePackageId": 1 }),
    );
    assert_eq!(status, 409);
    assert!(
        body["message"].as_str().unwrap().contains("package-url"),
        "{body}"
    );
    let (status, body) = server.post(
        "/CAD/machine/algoFilePackages",
        json!({ "algoFilePackageId": "one" }),
    );
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("algoFilePackageId"),
        "{body}"
    );
}
