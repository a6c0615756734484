//! HTTP load: requests/s and p99 latency of `GET /CAP/Status` and
//! `POST /CAP/AlgoTasks:search` (1,000 tasks stored), beside trivial axum handlers
//! in the same run: one answering a dozen bytes, one answering a static body as large
//! as the search's (so that the handler's own cost shows apart from the payload's).
//!
//! `cargo bench --bench api_load` (after scripts/build-plugins). Client and server
//! share the machine: the figures compare handlers under identical conditions. A
//! last section drives the router in process (no socket, no client) to show each
//! handler's own cost.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tower::ServiceExt;

const CONNECTIONS: usize = 32;
/// Each row runs in slices of SLICE, the rows taking turns ROUNDS times: a
/// neighbour loading the machine for a while weighs on every row alike, and the
/// ratios between rows hold where back-to-back runs of seconds each did not.
const SLICE: Duration = Duration::from_millis(500);
const ROUNDS: u32 = 8;

struct Figures {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

/// Hammers `url` from CONNECTIONS keep-alive connections for one SLICE; returns
/// every request's latency. Every request carries `token` (the baselines ignore
/// it; xpud checks it).
fn load(url: &str, body: Option<&serde_json::Value>, token: &str) -> Vec<Duration> {
    let token = Arc::new(format!("Bearer {token}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = Arc::new(url.to_string());
    let body = Arc::new(body.map(|b| b.to_string()));
    runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(CONNECTIONS)
            .build()
            .unwrap();
        let deadline = Instant::now() + SLICE;
        let tasks: Vec<_> = (0..CONNECTIONS)
            .map(|_| {
                let (client, url, body) = (client.clone(), url.clone(), body.clone());
                let token = token.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let started = Instant::now();
                        let request = match body.as_deref() {
                            Some(body) => client
                                .post(url.as_str())
                                .header("content-type", "application/json")
                                .body(body.to_string()),
                            None => client.get(url.as_str()),
                        };
                        let request = request.header("authorization", token.as_str());
                        let response = request.send().await.expect("request");
                        assert!(response.status().is_success(), "{}", response.status());
                        response.bytes().await.expect("body");
                        latencies.push(started.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all
    })
}

fn figures(mut latencies: Vec<Duration>) -> Figures {
    latencies.sort();
    Figures {
        rps: latencies.len() as f64 / (SLICE * ROUNDS).as_secs_f64(),
        p50: latencies[latencies.len() / 2],
        p99: latencies[latencies.len() * 99 / 100],
    }
}

fn main() {
    // The trivial handlers: same axum, same kind of runtime.
    let trivial_runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = trivial_runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let trivial_base = format!("http://{}", listener.local_addr().unwrap());
    let trivial = format!("{trivial_base}/trivial");
    let sized_body: Arc<std::sync::OnceLock<bytes::Bytes>> = Arc::default();
    let sized_for_server = sized_body.clone();
    trivial_runtime.spawn(async move {
        let app = axum::Router::new()
            .route(
                "/trivial",
                axum::routing::get(|| async { axum::Json(json!({ "code": 0 })) }),
            )
            .route(
                "/static",
                axum::routing::post(move || {
                    let body = sized_for_server.get().cloned().unwrap_or_default();
                    async move { ([("content-type", "application/json")], body) }
                }),
            );
        axum::serve(listener, app).await
    });

    // xpud with 1,000 tasks.
    let platform = FileServer::start();
    // Plain HTTP like the baselines: the handlers are compared, TLS is not. Every
    // request is authorised by its token, as in production.
    let server = TestServer::start_with(&["sim-xpu"], |c| c.tls.insecure_http = true);
    let token = server.client.token.clone();
    let (url, md5) = platform.publish("pt.tar.gz", &passthrough_package("XPUD-PT-BENCH"));
    server.post(
        "/CAP/AlgoFilePackages",
        json!({ "id": "pkg", "md5": md5, "url": url }),
    );
    assert!(wait_for(Duration::from_secs(30), || server
        .get("/CAP/AlgoFilePackages/pkg")
        .1["data"]["status"]
        == 0));
    let (url, md5) = platform.publish("a.json", br#"{"relatedAlgoFilePackageId": "pkg"}"#);
    server.post(
        "/CAP/AlgoPackages",
        json!({ "id": "algo", "md5": md5, "url": url }),
    );
    assert!(wait_for(Duration::from_secs(30), || server
        .get("/CAP/AlgoPackages/algo")
        .1["data"]["status"]
        == 0));
    let (_, body) = server.post(
        "/CAP/AlgoServices",
        json!({ "envs": "", "replicas": 2, "gpuType": "SIMULATED_XPU16", "algoId": "algo" }),
    );
    let service = body["data"].as_str().unwrap().to_string();
    let started = Instant::now();
    for i in 0..1000 {
        let (status, body) = server.post("/CAP/AlgoTasks", json!({
            "algoServiceId": service,
            "restartPolicy": "ALWAYS",
            "taskInfo": {
                "labels": { "algoCabinName": "passthrough", "version": "0.1.0" },
                "rulesParams": [{
                    "areas": [{ "areaid": 0, "areaType": "POLYGON",
                                "points": [{"x": 0.0, "y": 0.0}, {"x": 1.0, "y": 0.0}, {"x": 1.0, "y": 1.0}] }],
                    "destinations": { "HTTPDest": { "url": "http://127.0.0.1:9/events" } },
                    "eventType": if i % 2 == 0 { "INTRUSION" } else { "LOITERING" }
                }],
                "streamOptions": { "videoStreamOptions": { "resolution": "PIXELS_200W", "url": format!("rtsp://127.0.0.1/cam{i}") } }
            }
        }));
        assert_eq!(status, 200, "{body}");
    }
    println!(
        "stored 1000 tasks in {:.1} s (each acknowledged after a durable write)\n",
        started.elapsed().as_secs_f64()
    );

    let search = json!({ "pageNumber": 3, "pageSize": 20, "eventType": "INTRUSION" });
    let search_answer = server
        .post("/CAP/AlgoTasks:search", search.clone())
        .1
        .to_string();
    println!("a search answer is {} bytes", search_answer.len());
    let _ = sized_body.set(bytes::Bytes::from(search_answer));
    println!(
        "{CONNECTIONS} connections; the rows take turns, {ROUNDS} slices of {SLICE:?} each; client and server on this machine\n"
    );
    println!(
        "{:<48} {:>9} {:>9} {:>9} {:>11}",
        "", "req/s", "p50", "p99", "vs baseline"
    );
    let show = |name: &str, f: &Figures, baseline: &Figures| {
        println!(
            "{name:<48} {:>9.0} {:>7.2}ms {:>7.2}ms {:>10.0}%",
            f.rps,
            f.p50.as_secs_f64() * 1000.0,
            f.p99.as_secs_f64() * 1000.0,
            f.rps / baseline.rps * 100.0
        );
    };
    let status_url = format!("{}/CAP/Status", server.base);
    let search_url = format!("{}/CAP/AlgoTasks:search", server.base);
    let static_url = format!("{trivial_base}/static");
    let rows: [(&str, Option<&serde_json::Value>); 4] = [
        (&trivial, None),
        (&status_url, None),
        (&search_url, Some(&search)),
        (&static_url, Some(&search)),
    ];
    let mut latencies: Vec<Vec<Duration>> = vec![Vec::new(); rows.len()];
    for _ in 0..ROUNDS {
        for (row, (url, body)) in latencies.iter_mut().zip(rows) {
            row.extend(load(url, body, &token));
        }
    }
    let rows: [Vec<Duration>; 4] = latencies.try_into().expect("four rows");
    let [tiny, status, searching, sized] = rows.map(figures);
    show("trivial handler, 12-byte answer (baseline A)", &tiny, &tiny);
    show("GET /CAP/Status (vs A)", &status, &tiny);
    show(
        "POST /CAP/AlgoTasks:search, page of 20 (vs A)",
        &searching,
        &tiny,
    );
    show(
        "trivial handler, same-size static answer (B)",
        &sized,
        &sized,
    );
    show(
        "POST /CAP/AlgoTasks:search, page of 20 (vs B)",
        &searching,
        &sized,
    );

    // The handlers' own cost: the router driven in process, one request at a time.
    let router = xpud::http::router(server.app.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let per_request = |method: &str, path: &str, body: Option<serde_json::Value>| {
        let body = body.map(|b| b.to_string());
        let run = |n: u32| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..n {
                    let mut request = axum::http::Request::builder()
                        .method(method)
                        .uri(path)
                        .header("authorization", format!("Bearer {token}"));
                    if body.is_some() {
                        request = request.header("content-type", "application/json");
                    }
                    let request = request
                        .body(axum::body::Body::from(body.clone().unwrap_or_default()))
                        .unwrap();
                    let response = router.clone().oneshot(request).await.unwrap();
                    // A refusal (401, 400...) is fast and would be timed as success.
                    assert!(
                        response.status().is_success(),
                        "{method} {path}: {}",
                        response.status()
                    );
                    axum::body::to_bytes(response.into_body(), usize::MAX)
                        .await
                        .unwrap();
                }
                started.elapsed() / n
            })
        };
        run(2_000);
        run(20_000)
    };
    println!("\nin process, one request at a time (no socket, no client):");
    println!(
        "  GET /CAP/Status                                {:?}",
        per_request("GET", "/CAP/Status", None)
    );
    for (name, body) in [
        (
            "search, page of 20, eventType filter",
            json!({ "pageNumber": 3, "pageSize": 20, "eventType": "INTRUSION" }),
        ),
        (
            "search, page of 1, eventType filter",
            json!({ "pageNumber": 3, "pageSize": 1, "eventType": "INTRUSION" }),
        ),
        (
            "search, page of 20, no filter",
            json!({ "pageNumber": 3, "pageSize": 20 }),
        ),
    ] {
        println!(
            "  {name:<46} {:?}",
            per_request("POST", "/CAP/AlgoTasks:search", Some(body))
        );
    }
}
