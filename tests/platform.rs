//! Registration with the platform (D.2-D.4, H.2-H.4) against a local stand-in that
//! is down at first, comes up, goes down and comes back.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

type Calls = Arc<Mutex<Vec<(String, Value)>>>;

/// The platform side: records every call, answers success in its envelope.
fn standin(calls: Calls) -> Router {
    async fn acp(
        State(calls): State<Calls>,
        Path(call): Path<String>,
        Json(body): Json<Value>,
    ) -> Json<Value> {
        calls.lock().unwrap().push((format!("ACP/{call}"), body));
        Json(json!({ "code": 0, "message": "success", "data": {} }))
    }
    async fn cad(
        State(calls): State<Calls>,
        Path(call): Path<String>,
        Json(body): Json<Value>,
    ) -> Json<Value> {
        calls.lock().unwrap().push((format!("CAD/{call}"), body));
        Json(json!({ "code": "0", "message": "success", "data": null }))
    }
    Router::new()
        .route("/ACP/{call}", post(acp))
        .route("/CAD/machine/{call}", post(cad))
        .with_state(calls)
}

struct Platform {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    calls: Calls,
    serving: Option<tokio::task::JoinHandle<()>>,
    /// The stand-in serves HTTPS with a certificate from a CA of its own, which
    /// xpud is told to trust (`platform.ca-bundle`).
    tls: TestTls,
}

impl Platform {
    /// Picks a free port, not yet listening.
    fn new() -> Platform {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        Platform {
            runtime: tokio::runtime::Runtime::new().unwrap(),
            addr,
            calls: Arc::default(),
            serving: None,
            tls: TestTls::new(),
        }
    }

    fn up(&mut self) {
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind(self.addr))
            .unwrap();
        let app = standin(self.calls.clone());
        let tls = self.tls.acceptor.clone();
        self.serving = Some(self.runtime.spawn(async move {
            let _ = xpud::transport::serve(listener, app, Some(tls), std::future::pending()).await;
        }));
    }

    fn down(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
            let _ = self.runtime.block_on(serving);
        }
    }

    fn count(&self, call: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, _)| c == call)
            .count()
    }

    fn last(&self, call: &str) -> Value {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(c, _)| c == call)
            .unwrap()
            .1
            .clone()
    }
}

#[test]
fn registration_survives_a_platform_that_goes_down_and_comes_back() {
    let mut platform = Platform::new();
    let url = format!("https://{}", platform.addr);
    let bundle = platform.tls.ca_bundle.path().to_path_buf();
    let mut server = TestServer::start_with(&[], |config| {
        config.machine_code = Some("machine_code".into());
        config.platform.url = Some(url);
        config.platform.ca_bundle = Some(bundle);
        config.platform.modes = vec![xpud::platform::Mode::Cap, xpud::platform::Mode::Cad];
        config.platform.id = Some("300000000601".into());
        config.platform.username = Some("username".into());
        config.platform.password = Some("password".into());
        config.platform.expires_s = 3;
        config.platform.backoff_initial_ms = 50;
        config.platform.backoff_max_ms = 200;
    });
    let port = server
        .base
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u64>()
        .unwrap();

    // Down: xpud keeps trying, and keeps serving.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(server.get("/healthz").1["status"], "ok");
    platform.up();
    assert!(wait_for(Duration::from_secs(5), || platform
        .count("ACP/Register")
        == 1
        && platform.count("CAD/register") == 1));
    let register = platform.last("ACP/Register");
    assert_eq!(register["id"], "300000000601");
    assert_eq!(register["type"], "AI_CLOUD");
    assert_eq!(register["port"], port);
    assert_eq!(register["username"], "username");
    assert_eq!(register["password"], "password");
    assert!(register["ip"]
        .as_str()
        .unwrap()
        .parse::<std::net::IpAddr>()
        .is_ok());
    let register = platform.last("CAD/register");
    assert_eq!(register["code"], "machine_code");
    assert_eq!(register["port"], port);

    // Keepalives every expires/3 = 1 s.
    assert!(wait_for(Duration::from_secs(4), || platform
        .count("ACP/Keepalive")
        >= 1
        && platform.count("CAD/keepalive") >= 1));
    assert_eq!(
        platform.last("ACP/Keepalive"),
        json!({ "id": "300000000601", "expires": 3 })
    );
    assert_eq!(
        platform.last("CAD/keepalive"),
        json!({ "code": "machine_code", "expires": 3 })
    );

    // Down again: a keepalive fails; back up: xpud registers again.
    platform.down();
    std::thread::sleep(Duration::from_millis(1500));
    platform.up();
    assert!(wait_for(Duration::from_secs(5), || platform
        .count("ACP/Register")
        >= 2
        && platform.count("CAD/register") >= 2));
    assert_eq!(server.get("/healthz").1["status"], "ok");

    // A graceful stop unregisters.
    server.shutdown();
    assert_eq!(
        platform.last("ACP/UnRegister"),
        json!({ "id": "300000000601" })
    );
    let unregister = platform.last("CAD/unregister");
    assert_eq!(unregister["code"], "machine_code");
    assert_eq!(unregister["username"], "username");
}
