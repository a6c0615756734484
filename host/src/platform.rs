//! The calls xpud makes on the platform: in CAP mode `/ACP/Register`, `/ACP/Keepalive`
//! and `/ACP/UnRegister` (D.2-D.4), in CAD mode `/CAD/machine/register`,
//! `/keepalive` and `/unregister` (H.2-H.4).
//!
//! Each mode runs its own loop: register until the platform says success (capped
//! exponential backoff with jitter between tries: a platform that is down sees a
//! trickle, never a busy loop), then keep alive every `expires / 3`; a keepalive that
//! fails sends it back to registering. A graceful shutdown unregisters. The password
//! is sent to the platform and nowhere else: never logged.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Central analysis platform (Appendix D).
    Cap,
    /// Central analysis device: a machine (Appendix H).
    Cad,
}

#[derive(Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PlatformConfig {
    /// The platform's base URL, e.g. `http://10.0.0.2:8080`; none: no calls are made.
    pub url: Option<String>,
    pub modes: Vec<Mode>,
    /// The device id this xpud registers under in CAP mode; default: its node id.
    pub id: Option<String>,
    /// Credentials of this xpud's API, sent with the registration.
    pub username: Option<String>,
    pub password: Option<String>,
    /// Keepalive expiry told to the platform; keepalives go every third of it.
    pub expires_s: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// CAD mode: where the platform serves algorithm file packages (I.2 sends only
    /// an id), e.g. `http://10.0.0.2:8080/packages/{id}.tar.gz`.
    pub package_url: Option<String>,
    /// CA certificates (PEM) trusted for the platform's HTTPS besides the system's:
    /// its calls and the packages downloaded from it.
    pub ca_bundle: Option<std::path::PathBuf>,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            url: None,
            modes: vec![Mode::Cap],
            id: None,
            username: None,
            password: None,
            expires_s: 60,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            package_url: None,
            ca_bundle: None,
        }
    }
}

/// Every key but the password's value: the example-config test compares the
/// defaults through this, so a key left out here could drift unseen.
impl std::fmt::Debug for PlatformConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformConfig")
            .field("url", &self.url)
            .field("modes", &self.modes)
            .field("id", &self.id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("expires_s", &self.expires_s)
            .field("backoff_initial_ms", &self.backoff_initial_ms)
            .field("backoff_max_ms", &self.backoff_max_ms)
            .field("package_url", &self.package_url)
            .field("ca_bundle", &self.ca_bundle)
            .finish()
    }
}

/// Who this xpud is, to the platform.
#[derive(Clone, Debug)]
pub struct Identity {
    /// CAP device id.
    pub id: String,
    /// CAD machine code.
    pub code: String,
    /// Where the platform reaches this xpud's API.
    pub address: SocketAddr,
}

#[derive(Clone)]
pub struct Platform {
    config: PlatformConfig,
    identity: Identity,
    client: reqwest::Client,
}

/// Tables D.6 and H.6 (H's has `code` for `id` and no `type`).
#[derive(Serialize)]
struct Register<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    ip: String,
    port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<&'a str>,
}

/// Tables D.10 and H.8.
#[derive(Serialize)]
struct Keepalive<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    expires: u64,
}

/// Tables D.8 and H.7.
#[derive(Serialize)]
struct Unregister<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<&'a str>,
}

impl Mode {
    fn path(self, call: &str) -> String {
        match (self, call) {
            (Mode::Cap, "register") => "/ACP/Register".into(),
            (Mode::Cap, "keepalive") => "/ACP/Keepalive".into(),
            (Mode::Cap, _) => "/ACP/UnRegister".into(),
            (Mode::Cad, call) => format!("/CAD/machine/{call}"),
        }
    }
}

/// A number in [0.5, 1): spreads retries of many machines apart.
fn jitter() -> f64 {
    0.5 + (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 2000.0
}

impl Platform {
    /// `None` when no platform URL is configured.
    /// `plain_http`: whether an `http://` platform is accepted (`--insecure-http`);
    /// otherwise the registration's password would cross the network readable.
    pub fn new(
        config: &PlatformConfig,
        identity: Identity,
        plain_http: bool,
    ) -> anyhow::Result<Option<Platform>> {
        let Some(url) = &config.url else {
            return Ok(None);
        };
        crate::fetch::check_url(url).map_err(|e| anyhow::anyhow!("platform.{e}"))?;
        if url.starts_with("http://") && !plain_http {
            anyhow::bail!(
                "platform.url {url:?} is plain HTTP, which would send the platform credentials readable: use https (or --insecure-http for local development)"
            );
        }
        if config.expires_s < 3 {
            anyhow::bail!("platform.expires-s must be at least 3");
        }
        let mut client = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if let Some(bundle) = &config.ca_bundle {
            let pem = std::fs::read(bundle)
                .with_context(|| format!("platform.ca-bundle {}", bundle.display()))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!(
                    "platform.ca-bundle {}: not PEM certificates",
                    bundle.display()
                )
            })?;
            if certificates.is_empty() {
                anyhow::bail!(
                    "platform.ca-bundle {}: no certificate in it",
                    bundle.display()
                );
            }
            for certificate in certificates {
                client = client.add_root_certificate(certificate);
            }
        }
        let client = client.build()?;
        Ok(Some(Platform {
            config: config.clone(),
            identity,
            client,
        }))
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}{path}",
            self.config
                .url
                .as_deref()
                .unwrap_or("")
                .trim_end_matches('/')
        )
    }

    /// One call; success is HTTP 2xx with code 0 (D: the integer, H: "0").
    async fn call(&self, mode: Mode, call: &str, body: &impl Serialize) -> Result<(), String> {
        let url = self.url(&mode.path(call));
        let response = self
            .client
            .post(&url)
            .json(body)
            .send()
            .await
            .map_err(|e| format!("POST {url}: {}", e.without_url()))?;
        let status = response.status();
        let reply: Value = response.json().await.map_err(|e| {
            format!(
                "POST {url}: HTTP {status}, answer is not JSON: {}",
                e.without_url()
            )
        })?;
        let code_ok = reply["code"] == 0 || reply["code"] == "0";
        if status.is_success() && code_ok {
            Ok(())
        } else {
            Err(format!(
                "POST {url}: HTTP {status}, code {}, message {}",
                reply["code"], reply["message"]
            ))
        }
    }

    fn ids(&self, mode: Mode) -> (Option<&str>, Option<&str>) {
        match mode {
            Mode::Cap => (Some(self.identity.id.as_str()), None),
            Mode::Cad => (None, Some(self.identity.code.as_str())),
        }
    }

    async fn register(&self, mode: Mode) -> Result<(), String> {
        let (id, code) = self.ids(mode);
        let body = Register {
            id,
            code,
            kind: (mode == Mode::Cap).then_some("AI_CLOUD"),
            ip: self.identity.address.ip().to_string(),
            port: self.identity.address.port(),
            username: self.config.username.as_deref(),
            password: self.config.password.as_deref(),
        };
        self.call(mode, "register", &body).await
    }

    async fn keepalive(&self, mode: Mode) -> Result<(), String> {
        let (id, code) = self.ids(mode);
        let body = Keepalive {
            id,
            code,
            expires: self.config.expires_s,
        };
        self.call(mode, "keepalive", &body).await
    }

    /// The wait before the next try. Never longer than the keepalive interval: a
    /// platform that comes back hears from this machine within `expires / 3`, before
    /// it would count the machine lost.
    fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.min(20);
        let keepalive_ms = self.config.expires_s.saturating_mul(1000) / 3;
        let ms = self
            .config
            .backoff_initial_ms
            .saturating_mul(1u64 << exp)
            .min(self.config.backoff_max_ms)
            .min(keepalive_ms);
        Duration::from_millis((ms as f64 * jitter()) as u64)
    }

    /// Registers and keeps alive, for every configured mode, until aborted.
    pub fn spawn(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.config
            .modes
            .iter()
            .map(|&mode| {
                let platform = self.clone();
                tokio::spawn(async move { platform.run(mode).await })
            })
            .collect()
    }

    async fn run(&self, mode: Mode) {
        let every = Duration::from_secs(self.config.expires_s) / 3;
        let mut failures: u32 = 0;
        loop {
            match self.register(mode).await {
                Ok(()) => {
                    tracing::info!(
                        ?mode,
                        platform = self.config.url.as_deref().unwrap_or(""),
                        "registered with the platform"
                    );
                    failures = 0;
                    loop {
                        tokio::time::sleep(every).await;
                        if let Err(e) = self.keepalive(mode).await {
                            tracing::warn!(?mode, "keepalive failed, registering again: {e}");
                            break;
                        }
                    }
                }
                Err(e) => {
                    let wait = self.backoff(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(
                        ?mode,
                        retry_in_ms = wait.as_millis() as u64,
                        "cannot register with the platform: {e}"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Unregisters every mode; bounded by the client's timeout.
    pub async fn unregister(&self) {
        for &mode in &self.config.modes {
            let (id, code) = self.ids(mode);
            let body = Unregister {
                id,
                code,
                username: (mode == Mode::Cad)
                    .then_some(self.config.username.as_deref())
                    .flatten(),
                password: (mode == Mode::Cad)
                    .then_some(self.config.password.as_deref())
                    .flatten(),
            };
            match self.call(mode, "unregister", &body).await {
                Ok(()) => tracing::info!(?mode, "unregistered from the platform"),
                Err(e) => tracing::warn!(?mode, "cannot unregister: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_never_in_debug_output() {
        let config = PlatformConfig {
            password: Some("s3cret".into()),
            ..Default::default()
        };
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn a_plain_http_platform_needs_the_insecure_flag() {
        let config = PlatformConfig {
            url: Some("http://10.0.0.2:8080".into()),
            ..Default::default()
        };
        let identity = || Identity {
            id: "x".into(),
            code: "y".into(),
            address: "127.0.0.1:1".parse().unwrap(),
        };
        let refused = Platform::new(&config, identity(), false).err().unwrap();
        assert!(refused.to_string().contains("plain HTTP"), "{refused}");
        assert!(Platform::new(&config, identity(), true).unwrap().is_some());
        let missing = PlatformConfig {
            url: Some("https://10.0.0.2".into()),
            ca_bundle: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let refused = Platform::new(&missing, identity(), false).err().unwrap();
        assert!(
            format!("{refused:#}").contains("platform.ca-bundle"),
            "{refused:#}"
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let platform = Platform {
            config: PlatformConfig::default(),
            identity: Identity {
                id: "x".into(),
                code: "y".into(),
                address: "127.0.0.1:1".parse().unwrap(),
            },
            client: reqwest::Client::new(),
        };
        let first = platform.backoff(0);
        assert!(
            first >= Duration::from_millis(250) && first < Duration::from_millis(500),
            "{first:?}"
        );
        let late = platform.backoff(30);
        // Capped by the keepalive interval (60 s / 3), below backoff-max-ms.
        assert!(
            late >= Duration::from_millis(10_000) && late <= Duration::from_millis(20_000),
            "{late:?}"
        );
        let short = Platform {
            config: PlatformConfig {
                expires_s: 9,
                ..PlatformConfig::default()
            },
            ..platform
        };
        for failures in 0..40 {
            assert!(short.backoff(failures) <= Duration::from_secs(3));
        }
    }
}
