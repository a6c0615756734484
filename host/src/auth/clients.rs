//! OAuth2 clients: an id, a secret stored only as its argon2 hash, and the scopes
//! the client may ask for. Clients come from the configuration (`[[auth.clients]]`)
//! and from the store (`xpud client add`); the server reads the store at each token
//! request, so clients added or removed on a running server count at once.

use anyhow::{bail, Context};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rusqlite::{params, OptionalExtension};
use serde::Deserialize;

use super::Scope;
use crate::store::Store;

/// A client in the configuration.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfiguredClient {
    pub id: String,
    /// The secret's argon2 hash (PHC string), as `xpud client hash` prints it.
    pub secret_hash: String,
    #[serde(default = "all_scopes")]
    pub scopes: Vec<Scope>,
}

pub fn all_scopes() -> Vec<Scope> {
    vec![Scope::Read, Scope::Write]
}

/// A client as `xpud client list` shows it.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: String,
    pub scopes: Vec<Scope>,
    pub created_ms: i64,
}

/// The hash of a secret nobody knows (made once with `hash_secret` and thrown
/// away), verified against when the client id is unknown, so that an unknown id
/// costs what a wrong secret costs. A constant, not made at start: a decoy that
/// failed to hash would make unknown ids answer faster than known ones. Its
/// parameters are `Argon2::default()`'s, as every stored hash's (a test holds it).
const DECOY: &str = "$argon2id$v=19$m=19456,t=2,p=1$eDq1tq8C3O6yP6T13oK8Tw$ty3zKv47OFHzcDenMBx8lEN2J+uomeSEuapey/klXyY";

pub fn hash_secret(secret: &str) -> anyhow::Result<String> {
    let salt = SaltString::encode_b64(&super::random_bytes::<16>()?)
        .map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Ok(Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hash the secret: {e}"))?
        .to_string())
}

fn verify_secret(secret: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A random secret: 32 bytes, base64url.
pub fn new_secret() -> anyhow::Result<String> {
    Ok(URL_SAFE_NO_PAD.encode(super::random_bytes::<32>()?))
}

fn check_id(id: &str) -> anyhow::Result<()> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        bail!("client id {id:?}: 1-64 characters of A-Z a-z 0-9 - _ .");
    }
    Ok(())
}

fn scopes_text(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_scopes(text: &str) -> Vec<Scope> {
    text.split(' ').filter_map(Scope::parse).collect()
}

/// Adds a client to the store with a new random secret, which is returned: it is
/// shown once and kept nowhere.
pub fn add(store: &Store, id: &str, scopes: &[Scope]) -> anyhow::Result<String> {
    check_id(id)?;
    if scopes.is_empty() {
        bail!("a client needs at least one scope");
    }
    let secret = new_secret()?;
    let hash = hash_secret(&secret)?;
    let inserted = store.with(|conn| {
        conn.execute(
            "INSERT INTO clients (id, secret_hash, scopes, created_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO NOTHING",
            params![id, hash, scopes_text(scopes), crate::dates::now_ms() as i64],
        )
    })?;
    if inserted == 0 {
        bail!("client {id:?} exists already; remove it first to give it a new secret");
    }
    Ok(secret)
}

/// Removes a client from the store; tokens it holds stay good until they expire.
pub fn remove(store: &Store, id: &str) -> anyhow::Result<bool> {
    let removed =
        store.with(|conn| conn.execute("DELETE FROM clients WHERE id = ?1", params![id]))?;
    Ok(removed > 0)
}

pub fn list(store: &Store) -> anyhow::Result<Vec<ClientInfo>> {
    store
        .with(|conn| {
            let mut statement =
                conn.prepare("SELECT id, scopes, created_ms FROM clients ORDER BY id")?;
            let rows = statement.query_map([], |row| {
                Ok(ClientInfo {
                    id: row.get(0)?,
                    scopes: parse_scopes(&row.get::<_, String>(1)?),
                    created_ms: row.get(2)?,
                })
            })?;
            rows.collect()
        })
        .context("read the clients")
}

/// The clients a server knows: the configured ones and the store's.
pub struct Clients {
    configured: Vec<ConfiguredClient>,
}

impl Clients {
    pub fn new(configured: Vec<ConfiguredClient>) -> anyhow::Result<Clients> {
        for client in &configured {
            check_id(&client.id)?;
            PasswordHash::new(&client.secret_hash).map_err(|e| {
                anyhow::anyhow!(
                    "auth.clients {:?}: secret-hash is not an argon2 PHC string ({e}); `xpud client hash` makes one",
                    client.id
                )
            })?;
        }
        Ok(Clients { configured })
    }

    /// Whether any client exists at all.
    pub fn any(&self, store: &Store) -> anyhow::Result<bool> {
        Ok(!self.configured.is_empty() || !list(store)?.is_empty())
    }

    /// The client's scopes if `secret` is its secret. Slow on purpose (argon2): run
    /// it off the async threads. Unknown ids cost the same as wrong secrets.
    pub fn authenticate(
        &self,
        store: &Store,
        id: &str,
        secret: &str,
    ) -> anyhow::Result<Option<Vec<Scope>>> {
        let found = match self.configured.iter().find(|c| c.id == id) {
            Some(c) => Some((c.secret_hash.clone(), c.scopes.clone())),
            None => store
                .with(|conn| {
                    conn.query_row(
                        "SELECT secret_hash, scopes FROM clients WHERE id = ?1",
                        params![id],
                        |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)),
                    )
                    .optional()
                })?
                .map(|(hash, scopes)| (hash, parse_scopes(&scopes))),
        };
        Ok(match found {
            Some((hash, scopes)) => verify_secret(secret, &hash).then_some(scopes),
            None => {
                verify_secret(secret, DECOY);
                None
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decoy_costs_what_a_stored_hash_costs() {
        let decoy = PasswordHash::new(DECOY).unwrap();
        let stored = hash_secret("anything").unwrap();
        let stored = PasswordHash::new(&stored).unwrap();
        assert_eq!(decoy.algorithm, stored.algorithm);
        assert_eq!(decoy.version, stored.version);
        assert_eq!(decoy.params, stored.params);
        assert!(!verify_secret("anything", DECOY));
    }

    #[test]
    fn clients_authenticate_by_their_secret_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("xpud.db")).unwrap();
        let secret = add(&store, "platform", &[Scope::Read]).unwrap();
        assert!(add(&store, "platform", &[Scope::Read])
            .unwrap_err()
            .to_string()
            .contains("exists"));
        assert!(add(&store, "bad id", &[Scope::Read]).is_err());
        let configured = ConfiguredClient {
            id: "ops".into(),
            secret_hash: hash_secret("s3cret").unwrap(),
            scopes: all_scopes(),
        };
        let clients = Clients::new(vec![configured]).unwrap();
        assert_eq!(
            clients.authenticate(&store, "platform", &secret).unwrap(),
            Some(vec![Scope::Read])
        );
        assert_eq!(
            clients.authenticate(&store, "platform", "wrong").unwrap(),
            None
        );
        assert_eq!(
            clients.authenticate(&store, "nobody", &secret).unwrap(),
            None
        );
        assert_eq!(
            clients.authenticate(&store, "ops", "s3cret").unwrap(),
            Some(all_scopes())
        );
        // The store holds the hash, never the secret.
        let stored: String = store
            .with(|c| c.query_row("SELECT secret_hash FROM clients", [], |r| r.get(0)))
            .unwrap();
        assert!(stored.starts_with("$argon2id$") && !stored.contains(&secret));
        assert!(remove(&store, "platform").unwrap());
        assert_eq!(
            clients.authenticate(&store, "platform", &secret).unwrap(),
            None
        );
        assert!(Clients::new(vec![ConfiguredClient {
            id: "x".into(),
            secret_hash: "plain".into(),
            scopes: all_scopes()
        }])
        .is_err());
    }
}
