//! OAuth2 (RFC 6749) for every standard endpoint (§9): clients, signed access
//! tokens with scopes, rotating signing keys, and a limit on failed
//! authentications. The HTTP side (token endpoint, bearer guard) is
//! `http::oauth`.
//!
//! Tokens are JWTs (see [`jwt`]) rather than opaque ids in the store: checking one
//! needs no database read on the request path, and a key id in each token lets
//! keys rotate without a restart and without refusing a valid token.

pub mod clients;
pub mod jwt;
pub mod keys;
pub mod limiter;
mod verified;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::store::Store;
use clients::{Clients, ConfiguredClient};
use jwt::{Claims, TokenError};
use keys::KeyRing;
use limiter::FailureLimiter;
use verified::VerifiedTokens;

/// `N` bytes from the system's random source (secrets, salts, signing keys).
pub fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
    Ok(bytes)
}

/// What a token allows: reads (GET and the `:search` queries) or changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            _ => None,
        }
    }
}

/// `[auth]` in the configuration.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AuthConfig {
    /// How long an access token is good for.
    pub token_ttl_s: u64,
    /// A new signing key this often; 0: only when `xpud keys rotate` says so.
    pub key_rotation_interval_s: u64,
    /// Failed authentications one client address may make in a window...
    pub failed_auth_limit: u32,
    /// ...of this many seconds, before it is refused until the window ends.
    pub failed_auth_window_s: u64,
    /// Clients besides those added with `xpud client add`.
    pub clients: Vec<ConfiguredClient>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_ttl_s: 3600,
            key_rotation_interval_s: 86_400,
            failed_auth_limit: 10,
            failed_auth_window_s: 60,
            clients: Vec::new(),
        }
    }
}

impl AuthConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=86_400).contains(&self.token_ttl_s) {
            bail!("auth.token-ttl-s: 1-86400 seconds");
        }
        if self.failed_auth_limit == 0 {
            bail!("auth.failed-auth-limit: at least 1");
        }
        if self.failed_auth_window_s == 0 {
            bail!("auth.failed-auth-window-s: at least 1 second");
        }
        Ok(())
    }
}

/// A token issued at the token endpoint.
pub struct Issued {
    pub access_token: String,
    pub expires_in: u64,
    pub scope: String,
}

/// Why the token endpoint refused a client (RFC 6749 §5.2).
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("client authentication failed")]
    InvalidClient,
    #[error("{0}")]
    InvalidScope(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub struct Auth {
    store: Arc<Store>,
    keys: KeyRing,
    clients: Clients,
    limiter: FailureLimiter,
    verified: VerifiedTokens,
    token_ttl: Duration,
    rotation_interval: Option<Duration>,
}

impl Auth {
    pub fn new(config: &AuthConfig, store: Arc<Store>) -> anyhow::Result<Auth> {
        config.validate()?;
        Ok(Auth {
            keys: KeyRing::load(&store)?,
            clients: Clients::new(config.clients.clone())?,
            limiter: FailureLimiter::new(
                config.failed_auth_limit,
                Duration::from_secs(config.failed_auth_window_s),
            ),
            verified: VerifiedTokens::default(),
            token_ttl: Duration::from_secs(config.token_ttl_s),
            rotation_interval: (config.key_rotation_interval_s > 0)
                .then(|| Duration::from_secs(config.key_rotation_interval_s)),
            store,
        })
    }

    /// With no client anywhere, adds `admin` (read and write) and writes its secret
    /// to `DATA_DIR/admin.secret` (0600), so that a server started with no
    /// configuration can be used at once. Returns that file when it exists.
    pub fn bootstrap(&self, data_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
        let file = data_dir.join("admin.secret");
        if !self.clients.any(&self.store)? {
            let secret = clients::add(&self.store, "admin", &clients::all_scopes())?;
            crate::tls::write_private(&file, secret.as_bytes())?;
            tracing::info!(secret_file = %file.display(), "created OAuth2 client \"admin\" (read, write)");
        }
        Ok(file.exists().then_some(file))
    }

    pub fn limiter(&self) -> &FailureLimiter {
        &self.limiter
    }

    /// The client-credentials grant: a token for `client_id` if `secret` is its
    /// secret, with the scopes asked for (all of the client's when none are).
    /// Slow on purpose (argon2): call it off the async threads.
    pub fn issue(
        &self,
        client_id: &str,
        secret: &str,
        requested: Option<&str>,
    ) -> Result<Issued, GrantError> {
        let allowed = self
            .clients
            .authenticate(&self.store, client_id, secret)?
            .ok_or(GrantError::InvalidClient)?;
        let scopes: Vec<Scope> = match requested.map(str::trim).filter(|s| !s.is_empty()) {
            None => allowed,
            Some(text) => {
                let mut scopes = Vec::new();
                for word in text.split(' ').filter(|w| !w.is_empty()) {
                    match Scope::parse(word) {
                        Some(scope) if allowed.contains(&scope) => scopes.push(scope),
                        Some(scope) => {
                            return Err(GrantError::InvalidScope(format!(
                                "client {client_id:?} may not ask for scope {:?}",
                                scope.as_str()
                            )))
                        }
                        None => {
                            return Err(GrantError::InvalidScope(format!(
                                "unknown scope {word:?}: read, write"
                            )))
                        }
                    }
                }
                scopes
            }
        };
        let scope = scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let now = crate::dates::now_ms() / 1000;
        let claims = Claims {
            iss: jwt::ISSUER.into(),
            sub: client_id.into(),
            scope: scope.clone(),
            iat: now,
            exp: now + self.token_ttl.as_secs(),
            jti: uuid::Uuid::new_v4().simple().to_string(),
        };
        tracing::info!(client = client_id, scope = %scope, "access token issued");
        Ok(Issued {
            access_token: jwt::sign(&self.keys.active(), &claims),
            expires_in: self.token_ttl.as_secs(),
            scope,
        })
    }

    /// A bearer token's claims, if it is good now: the signature is checked the
    /// first time a token is seen, expiry and key every time.
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, TokenError> {
        let now = crate::dates::now_ms() / 1000;
        if let Some(claims) = self
            .verified
            .get(token, now, |kid| self.keys.verifying(kid).is_some())
        {
            return Ok(claims);
        }
        let claims = Arc::new(jwt::verify(token, &self.keys, now)?);
        if let Some(kid) = jwt::key_id(token) {
            self.verified.insert(token, &kid, claims.clone());
        }
        Ok(claims)
    }

    /// Keeps the keys current: reads rotations made by `xpud keys rotate`, and
    /// rotates when the active key is older than the configured interval.
    pub fn spawn_maintenance(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let auth = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(keys::REFRESH);
            loop {
                ticks.tick().await;
                let auth = auth.clone();
                let result = tokio::task::spawn_blocking(move || auth.maintain()).await;
                if let Ok(Err(e)) = result {
                    tracing::error!("signing keys: {e:#}");
                }
            }
        })
    }

    fn maintain(&self) -> anyhow::Result<()> {
        if let Some(interval) = self.rotation_interval {
            let age_ms = crate::dates::now_ms() as i64 - self.keys.active().created_ms;
            if age_ms >= interval.as_millis() as i64 {
                let kid = keys::rotate(&self.store, self.token_ttl)?;
                tracing::info!(kid = %kid, "signing key rotated (interval)");
            }
        }
        self.keys.refresh(&self.store)
    }
}
