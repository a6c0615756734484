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
    /// The stand-in serves HTTPS with a certificate from a CA of its own...
    tls: tokio_rustls::TlsAcceptor,
    /// ...which xpud is told to trust (`platform.ca-bundle`).
    ca_bundle: tempfile::NamedTempFile,
}

/// A CA, and a certificate for 127.0.0.1 issued by it.
fn platform_tls() -> (tokio_rustls::TlsAcceptor, tempfile::NamedTempFile) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let bundle = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bundle.path(), ca.pem()).unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), bundle)
}

impl Platform {
    /// Picks a free port, not yet listening.
    fn new() -> Platform {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (tls, ca_bundle) = platform_tls();
        Platform {
            runtime: tokio::runtime::Runtime::new().unwrap(),
            addr,
            calls: Arc::default(),
            serving: None,
            tls,
            ca_bundle,
        }
    }

    fn up(&mut self) {
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind(self.addr))
            .unwrap();
        let app = standin(self.calls.clone());
        let tls = self.tls.clone();
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
    let bundle = platform.ca_bundle.path().to_path_buf();
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
