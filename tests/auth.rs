//! §9 over real HTTPS: every endpoint behind a bearer token with the right scope,
//! the token endpoint's answers, key rotation under load, the failed-authentication
//! limit, certificates replaced on disk, and a real TLS client (curl).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::{json, Value};
use xpud::auth::jwt::{self, Claims};
use xpud::auth::keys::KeyRing;

fn claims(exp: u64) -> Claims {
    Claims {
        iss: jwt::ISSUER.into(),
        sub: "admin".into(),
        scope: "read write".into(),
        iat: exp.saturating_sub(3600),
        exp,
        jti: "test".into(),
    }
}

fn now_s() -> u64 {
    xpud::dates::now_ms() / 1000
}

/// The envelope's code for a refusal, wherever the path's appendix puts it.
fn envelope_code(body: &Value) -> u16 {
    match &body["code"] {
        Value::String(code) => code.parse().unwrap(),
        Value::Number(code) => code.as_u64().unwrap() as u16,
        other => panic!("no envelope code: {other} in {body}"),
    }
}

fn xpud_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xpud"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run xpud")
}

#[test]
fn every_endpoint_refuses_bad_tokens_and_takes_a_good_one() {
    let server = TestServer::start(&["sim-xpu"]);
    let api = &server.client;
    // Signed by the server's own key, but expired.
    let store = xpud::store::Store::open(&server.data.path().join("xpud.db")).unwrap();
    let expired = jwt::sign(
        &KeyRing::load(&store).unwrap().active(),
        &claims(now_s() - 10),
    );
    // Well formed and in date, signed by a key the server never had.
    let unknown = jwt::sign(&KeyRing::ephemeral().active(), &claims(now_s() + 600));
    let read_only = api.token(Some("read"));

    let (_, document) = server.get("/openapi.json");
    let mut checked = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let concrete = path.replace('{', "probe-").replace('}', "");
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let Some(security) = operation["security"].as_array() else {
                assert!(
                    ["/healthz", "/oauth/token"].contains(&path.as_str()),
                    "{method} {path} is documented as open"
                );
                continue;
            };
            let scope = security[0]["oauth2"][0].as_str().unwrap();
            let body = (method != reqwest::Method::GET).then(|| json!({}));
            let call = |token: Option<&str>| {
                let mut request = api
                    .http
                    .request(method.clone(), format!("{}{concrete}", server.base));
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                if let Some(body) = &body {
                    request = request.json(body);
                }
                server.client.send_raw(request)
            };
            for (token, why) in [
                (None, "no token"),
                (Some("not.a.token"), "malformed"),
                (Some(expired.as_str()), "expired"),
                (Some(unknown.as_str()), "unknown key"),
            ] {
                let (status, challenge, body) = call(token);
                assert_eq!(status, 401, "{method} {path} with {why}: {body}");
                assert!(
                    challenge.starts_with("Bearer realm=\"xpud\""),
                    "{challenge}"
                );
                if token.is_some() {
                    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
                }
                assert_eq!(envelope_code(&body), 401, "{method} {path}: {body}");
            }
            let (_, challenge, body) = call(Some(&expired));
            assert!(challenge.contains("expired"), "{challenge} {body}");
            let (status, challenge, body) = call(Some(&read_only));
            if scope == "write" {
                assert_eq!(status, 403, "{method} {path} with a read token: {body}");
                assert!(challenge.contains("insufficient_scope"), "{challenge}");
                assert_eq!(envelope_code(&body), 403, "{body}");
            } else {
                assert!(status != 401 && status != 403, "{method} {path}: {body}");
            }
            let (status, _, body) = call(Some(&api.token));
            assert!(status != 401 && status != 403, "{method} {path}: {body}");
            checked += 1;
        }
    }
    // 43 endpoints of the standard, the plugin listing and the metrics.
    assert_eq!(checked, 45);
    let (status, _, body) = server
        .client
        .send_raw(api.http.get(format!("{}/openapi.json", server.base)));
    assert_eq!(status, 401, "{body}");
    let (status, _) = api.call_as(None, reqwest::Method::GET, "/healthz", None);
    assert_eq!(status, 200);
}

#[test]
fn the_token_endpoint_answers_as_rfc_6749_says() {
    let server = TestServer::start(&[]);
    let api = &server.client;
    let secret = api.admin_secret();
    let grant = [("grant_type", "client_credentials")];

    // HTTP Basic, and credentials in the body.
    let (status, body) = api.token_request(&grant, Some(("admin", &secret)));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "read write");
    let (status, body) = api.token_request(
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "admin"),
            ("client_secret", &secret),
            ("scope", "read"),
        ],
        None,
    );
    assert_eq!(
        (status, body["scope"].as_str()),
        (200, Some("read")),
        "{body}"
    );

    let error = |status: u16, body: &Value| (status, body["error"].as_str().unwrap().to_string());
    let (status, body) = api.token_request(&grant, Some(("admin", "wrong")));
    assert_eq!(error(status, &body), (401, "invalid_client".into()));
    let (status, body) = api.token_request(&grant, Some(("nobody", &secret)));
    assert_eq!(error(status, &body), (401, "invalid_client".into()));
    let (status, body) = api.token_request(&grant, None);
    assert_eq!(error(status, &body), (401, "invalid_client".into()));
    let (status, body) = api.token_request(&[("grant_type", "password")], Some(("admin", &secret)));
    assert_eq!(error(status, &body), (400, "unsupported_grant_type".into()));
    let (status, body) = api.token_request(&[], Some(("admin", &secret)));
    assert_eq!(error(status, &body), (400, "invalid_request".into()));
    let (status, body) = api.token_request(
        &[("grant_type", "client_credentials"), ("scope", "admin")],
        Some(("admin", &secret)),
    );
    assert_eq!(error(status, &body), (400, "invalid_scope".into()));
    let (status, body) = api.token_request(
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "admin"),
            ("client_secret", &secret),
        ],
        Some(("admin", &secret)),
    );
    assert_eq!(error(status, &body), (400, "invalid_request".into()));
    let (status, _, body) = api.send_raw(
        api.http
            .post(format!("{}/oauth/token", server.base))
            .json(&json!({"grant_type": "client_credentials"})),
    );
    assert_eq!(error(status, &body), (400, "invalid_request".into()));
}

#[test]
fn keys_rotate_twice_under_load_and_no_good_token_is_refused() {
    let server = TestServer::start_with(&["sim-xpu"], |c| c.auth.key_rotation_interval_s = 0);
    let data = server.data.path().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kid = |token: &str| -> String {
        use base64::Engine;
        let header = token.split('.').next().unwrap();
        let header: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header)
                .unwrap(),
        )
        .unwrap();
        header["kid"].as_str().unwrap().to_string()
    };
    let first = server.client.token.clone();
    let mut tokens = vec![first.clone()];
    let load = {
        let (base, stop, first) = (server.base.clone(), stop.clone(), first.clone());
        let data = data.clone();
        std::thread::spawn(move || {
            let client = ApiClient::connect(&base, &data);
            let mut calls = 0;
            let mut token = first;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, body) =
                    client.call_as(Some(&token), reqwest::Method::GET, "/CAP/Status", None);
                assert_eq!(status, 200, "call {calls}: {body}");
                calls += 1;
                if calls % 25 == 0 {
                    // A client renewing its token now and then gets the current key's.
                    token = client.token(None);
                }
            }
            calls
        })
    };
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(500));
        let out = xpud_cli(&["keys", "rotate", "--data-dir", data.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The server reads the keys again within its refresh interval.
        let before = kid(tokens.last().unwrap());
        assert!(wait_for(Duration::from_secs(10), || {
            kid(&server.client.token(None)) != before
        }));
        tokens.push(server.client.token(None));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let calls = load.join().expect("no call was refused");
    assert!(calls > 20, "{calls} calls");
    // Three keys signed; every token still verifies.
    let kids: std::collections::BTreeSet<String> = tokens.iter().map(|t| kid(t)).collect();
    assert_eq!(kids.len(), 3);
    for token in &tokens {
        let (status, body) =
            server
                .client
                .call_as(Some(token), reqwest::Method::GET, "/CAP/Status", None);
        assert_eq!(status, 200, "{body}");
    }
    let out = xpud_cli(&["keys", "list", "--data-dir", data.to_str().unwrap()]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert_eq!(listing.lines().count(), 3, "{listing}");
    assert_eq!(listing.matches("signing").count(), 1, "{listing}");
}

#[test]
fn failed_authentications_are_limited_per_address() {
    let server = TestServer::start_with(&[], |c| c.auth.failed_auth_limit = 3);
    let api = &server.client;
    let grant = [("grant_type", "client_credentials")];
    for _ in 0..2 {
        let (status, _) = api.token_request(&grant, Some(("admin", "wrong")));
        assert_eq!(status, 401);
    }
    // A forged token counts too.
    let forged = jwt::sign(&KeyRing::ephemeral().active(), &claims(now_s() + 600));
    let (status, _) = api.call_as(Some(&forged), reqwest::Method::GET, "/CAP/Status", None);
    assert_eq!(status, 401);
    // Over the limit: the token endpoint refuses even good credentials (a guesser
    // must not keep guessing), with an RFC 6749 error and Retry-After...
    let (status, _challenge, body) = api.send_raw(
        api.http
            .post(format!("{}/oauth/token", server.base))
            .basic_auth("admin", Some(api.admin_secret()))
            .form(&grant),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("invalid_client")),
        "{body}"
    );
    // ...forged tokens get 429...
    let (status, body) = api.call_as(Some(&forged), reqwest::Method::GET, "/CAP/Status", None);
    assert_eq!(status, 429, "{body}");
    assert_eq!(envelope_code(&body), 429);
    // ...but a valid token is always served: a guesser behind the same NAT cannot
    // lock the platform out.
    for _ in 0..5 {
        let (status, body) = api.call(reqwest::Method::GET, "/CAP/Status", None);
        assert_eq!(status, 200, "{body}");
    }
    // /healthz stays open.
    assert_eq!(
        api.call_as(None, reqwest::Method::GET, "/healthz", None).0,
        200
    );
}

#[test]
fn clients_are_managed_from_the_command_line_while_serving() {
    let server = TestServer::start(&[]);
    let data = server.data.path().to_str().unwrap().to_string();
    let out = xpud_cli(&[
        "client",
        "add",
        "platform",
        "--scopes",
        "read",
        "--data-dir",
        &data,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let grant = [("grant_type", "client_credentials")];
    let (status, body) = server
        .client
        .token_request(&grant, Some(("platform", &secret)));
    assert_eq!(
        (status, body["scope"].as_str()),
        (200, Some("read")),
        "{body}"
    );
    let token = body["access_token"].as_str().unwrap().to_string();
    let (status, _) = server.client.call_as(
        Some(&token),
        reqwest::Method::POST,
        "/CCP/clusters",
        Some(json!({})),
    );
    assert_eq!(status, 403);

    let list = xpud_cli(&["client", "list", "--data-dir", &data]);
    let listing = String::from_utf8_lossy(&list.stdout);
    assert!(listing.contains("platform\tread"), "{listing}");
    assert!(!listing.contains(&secret));
    let db = std::fs::read(server.data.path().join("xpud.db")).unwrap();
    assert!(
        !String::from_utf8_lossy(&db).contains(&secret),
        "the secret is stored"
    );

    let out = xpud_cli(&["client", "remove", "platform", "--data-dir", &data]);
    assert!(out.status.success());
    let (status, _) = server
        .client
        .token_request(&grant, Some(("platform", &secret)));
    assert_eq!(status, 401);
    let out = xpud_cli(&["client", "remove", "platform", "--data-dir", &data]);
    assert!(!out.status.success());
}

#[test]
fn curl_trusting_the_generated_ca_gets_a_token_and_calls_and_without_it_fails() {
    let server = TestServer::start(&[]);
    let ca = server.data.path().join("tls/ca.pem");
    let secret = server.client.admin_secret();
    let token_url = format!("{}/oauth/token", server.base);
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&ca)
        .args([
            "-u",
            &format!("admin:{secret}"),
            "-d",
            "grant_type=client_credentials",
        ])
        .arg(&token_url)
        .output()
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = body["access_token"].as_str().unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&ca)
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("{}/CAP/Status", server.base))
        .output()
        .unwrap();
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["code"], 0, "{body}");
    // Not trusting the CA: the handshake fails (curl's exit 60: peer certificate).
    let out = Command::new("curl")
        .args(["-sS", "-d", "grant_type=client_credentials"])
        .arg(&token_url)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(60),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A.6 needs the write scope, answers the CA the server's certificate chains to
/// (checked by a TLS client trusting only it), hands out no client pair (nothing
/// checks one), and says so when the CA file cannot be read instead of answering "".
#[test]
fn the_license_needs_write_and_carries_the_ca_that_signs_the_server() {
    let server = TestServer::start(&[]);
    let (_, created) = server.post(
        "/CCP/clusters",
        json!({ "name": "licensed", "spec": { "version": "1.22.1", "nodes": [{
            "nodeResource": { "cpu": 1, "mem": 1, "rootDiskSize": 1, "localDiskSize": 0 },
            "count": 1
        }]}}),
    );
    let code = created["data"]["clusterCode"].as_str().unwrap().to_string();
    let path = format!("/CCP/clusters/{code}/license");
    let read_only = server.client.token(Some("read"));
    let (status, body) = server.client.send(
        server
            .client
            .http
            .get(format!("{}{path}", server.base))
            .bearer_auth(&read_only),
    );
    assert_eq!(status, 403, "{body}");

    let (status, body) = server.get(&path);
    assert_eq!(status, 200, "{body}");
    let ca = body["data"]["caCertData"].as_str().unwrap().to_string();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{body}");
    assert_eq!(body["data"]["clientCertData"], "");
    assert_eq!(body["data"]["clientKeyData"], "");
    // The CA answered is the one that signs what the server serves.
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    let (status, _) = server
        .client
        .send(trusting.get(format!("{}/healthz", server.base)));
    assert_eq!(status, 200);

    std::fs::remove_file(server.data.path().join("tls/ca.pem")).unwrap();
    let (status, body) = server.get(&path);
    // The details (the file and the OS error) go to the log, not to the client.
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["code"], "500", "{body}");
}

/// Writes a fresh CA's server certificate and key (and the CA) into `dir`; returns the CA.
fn issue(dir: &std::path::Path) -> String {
    let (ca, cert, key) = localhost_certificate();
    // Key first, then the certificate, each written whole.
    std::fs::write(dir.join("server.key.new"), key.serialize_pem()).unwrap();
    std::fs::rename(dir.join("server.key.new"), dir.join("server.key")).unwrap();
    std::fs::write(dir.join("server.pem.new"), cert.pem()).unwrap();
    std::fs::rename(dir.join("server.pem.new"), dir.join("server.pem")).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca).unwrap();
    ca
}

#[test]
fn a_certificate_replaced_on_disk_is_served_without_a_restart() {
    let certs = tempfile::tempdir().unwrap();
    let first_ca = issue(certs.path());
    let dir = certs.path().to_path_buf();
    let server = TestServer::start_with(&[], |c| {
        c.tls.cert = Some(dir.join("server.pem"));
        c.tls.key = Some(dir.join("server.key"));
        c.tls.ca = Some(dir.join("ca.pem"));
    });
    let trusting = |ca: &str| {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
            .tls_built_in_root_certs(false)
            .build()
            .unwrap()
    };
    let healthz = |client: &reqwest::Client| {
        server
            .client
            .try_send(client.get(format!("{}/healthz", server.base)))
            .ok()
            .map(|(status, _, _)| status)
    };
    assert_eq!(healthz(&trusting(&first_ca)), Some(200));
    std::thread::sleep(Duration::from_millis(1100)); // a new modification time
    let second_ca = issue(certs.path());
    let started = Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), || healthz(&trusting(&second_ca))
            == Some(200)),
        "the new certificate was not picked up"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        healthz(&trusting(&first_ca)),
        None,
        "a client trusting only the old CA still connects"
    );
}

#[test]
fn keys_rotate_on_their_interval_too() {
    let server = TestServer::start_with(&[], |c| c.auth.key_rotation_interval_s = 1);
    let kid = |token: &str| token.split('.').next().unwrap().to_string();
    let first = server.client.token.clone();
    assert!(wait_for(Duration::from_secs(10), || {
        kid(&server.client.token(None)) != kid(&first)
    }));
    let (status, body) =
        server
            .client
            .call_as(Some(&first), reqwest::Method::GET, "/CAP/Status", None);
    assert_eq!(status, 200, "the previous key's token is refused: {body}");
}

#[test]
fn configured_clients_authenticate_with_a_hash_made_by_the_cli() {
    let mut hash = Command::new(env!("CARGO_BIN_EXE_xpud"))
        .args(["client", "hash"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    hash.stdin
        .take()
        .unwrap()
        .write_all(b"platform-secret\n")
        .unwrap();
    let out = hash.wait_with_output().unwrap();
    assert!(out.status.success());
    let secret_hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(secret_hash.starts_with("$argon2id$"), "{secret_hash}");
    let server = TestServer::start_with(&[], |c| {
        c.auth.clients = vec![xpud::auth::clients::ConfiguredClient {
            id: "platform".into(),
            secret_hash,
            scopes: vec![xpud::auth::Scope::Read],
        }]
    });
    // With a client configured, no admin is made.
    assert!(!server.data.path().join("admin.secret").exists());
    let grant = [("grant_type", "client_credentials")];
    let (status, body) = server
        .client
        .token_request(&grant, Some(("platform", "platform-secret")));
    assert_eq!(
        (status, body["scope"].as_str()),
        (200, Some("read")),
        "{body}"
    );
}
