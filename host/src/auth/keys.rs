//! Token signing keys, and their rotation.
//!
//! Keys live in the store (`signing_keys`), so that `xpud keys rotate` works on a
//! running server: the server reads the table again every few seconds. The newest
//! unretired key signs. Rotating adds a key and gives every older one a
//! `retire_at_ms` far enough ahead that each token it signed expires first (the token
//! lifetime, plus the time a server may take to notice the rotation); once that
//! passes the key is deleted, and its tokens, all expired, fail as signed by an
//! unknown key.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use rusqlite::params;

use crate::store::Store;
use crate::sync::{read, write};

/// How often a server reads the keys again; also the margin added to a retiring
/// key's life for the tokens it signed before the server noticed a rotation.
pub const REFRESH: Duration = Duration::from_secs(2);
const NOTICE_MARGIN_MS: i64 = 60_000;

pub struct SigningKey {
    pub kid: String,
    mac: ring::hmac::Key,
    pub created_ms: i64,
    /// When it stops verifying; None while it is the signing key.
    pub retire_at_ms: Option<i64>,
}

impl SigningKey {
    pub fn mac(&self) -> &ring::hmac::Key {
        &self.mac
    }
}

/// The keys a server signs and verifies with, as last read from the store.
pub struct KeyRing {
    keys: RwLock<Vec<Arc<SigningKey>>>,
}

/// What `xpud keys list` shows: no secrets.
#[derive(Debug)]
pub struct KeyInfo {
    pub kid: String,
    pub created_ms: i64,
    pub retire_at_ms: Option<i64>,
}

impl KeyRing {
    /// Reads the keys, creating the first one on a new store.
    pub fn load(store: &Store) -> anyhow::Result<KeyRing> {
        let ring = KeyRing {
            keys: RwLock::new(Vec::new()),
        };
        if read_keys(store)?.iter().all(|k| k.retire_at_ms.is_some()) {
            rotate(store, Duration::ZERO)?;
        }
        ring.refresh(store)?;
        Ok(ring)
    }

    /// A ring with one key of its own, outside any store (tests, benchmarks).
    pub fn ephemeral() -> KeyRing {
        let secret = super::random_bytes::<32>().expect("random source");
        KeyRing {
            keys: RwLock::new(vec![Arc::new(SigningKey {
                kid: uuid::Uuid::new_v4().simple().to_string(),
                mac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
                created_ms: crate::dates::now_ms() as i64,
                retire_at_ms: None,
            })]),
        }
    }

    /// Reads the store again: a rotation made elsewhere takes effect here.
    pub fn refresh(&self, store: &Store) -> anyhow::Result<()> {
        let keys = read_keys(store)?;
        if keys.is_empty() {
            anyhow::bail!("no signing key in the store");
        }
        *write(&self.keys) = keys.into_iter().map(Arc::new).collect();
        Ok(())
    }

    /// The key new tokens are signed with: the newest unretired one.
    pub fn active(&self) -> Arc<SigningKey> {
        let keys = read(&self.keys);
        keys.iter()
            .filter(|k| k.retire_at_ms.is_none())
            .max_by_key(|k| k.created_ms)
            .or_else(|| keys.iter().max_by_key(|k| k.created_ms))
            .cloned()
            .expect("a key ring always holds a key")
    }

    /// The key named `kid`, if it still verifies.
    pub fn verifying(&self, kid: &str) -> Option<Arc<SigningKey>> {
        let now = crate::dates::now_ms() as i64;
        read(&self.keys)
            .iter()
            .find(|k| k.kid == kid && k.retire_at_ms.is_none_or(|at| now < at))
            .cloned()
    }
}

/// Adds a signing key; older keys retire once the tokens they signed (living at
/// most `token_ttl`) have expired, and keys past retirement are deleted. Returns
/// the new key's id.
pub fn rotate(store: &Store, token_ttl: Duration) -> anyhow::Result<String> {
    let kid = uuid::Uuid::new_v4().simple().to_string();
    let secret = super::random_bytes::<32>()?.to_vec();
    let now = crate::dates::now_ms() as i64;
    let retire_at = now + token_ttl.as_millis() as i64 + NOTICE_MARGIN_MS;
    store
        .with(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "DELETE FROM signing_keys WHERE retire_at_ms IS NOT NULL AND retire_at_ms <= ?1",
                params![now],
            )?;
            tx.execute(
                "UPDATE signing_keys SET retire_at_ms = ?1 WHERE retire_at_ms IS NULL",
                params![retire_at],
            )?;
            tx.execute(
                "INSERT INTO signing_keys (kid, secret, created_ms, retire_at_ms) VALUES (?1, ?2, ?3, NULL)",
                params![kid, secret, now],
            )?;
            tx.commit()
        })
        .context("rotate the signing keys")?;
    Ok(kid)
}

/// The keys without their secrets, newest first.
pub fn list(store: &Store) -> anyhow::Result<Vec<KeyInfo>> {
    Ok(read_keys(store)?
        .into_iter()
        .rev()
        .map(|k| KeyInfo {
            kid: k.kid,
            created_ms: k.created_ms,
            retire_at_ms: k.retire_at_ms,
        })
        .collect())
}

fn read_keys(store: &Store) -> anyhow::Result<Vec<SigningKey>> {
    store
        .with(|conn| {
            let mut statement = conn.prepare(
                "SELECT kid, secret, created_ms, retire_at_ms FROM signing_keys ORDER BY created_ms, rowid",
            )?;
            let rows = statement.query_map([], |row| {
                let secret: Vec<u8> = row.get(1)?;
                Ok(SigningKey {
                    kid: row.get(0)?,
                    mac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
                    created_ms: row.get(2)?,
                    retire_at_ms: row.get(3)?,
                })
            })?;
            rows.collect()
        })
        .context("read the signing keys")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_previous_key_verifying_until_its_tokens_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("xpud.db")).unwrap();
        let ring = KeyRing::load(&store).unwrap();
        let first = ring.active().kid.clone();

        let second = rotate(&store, Duration::from_secs(3600)).unwrap();
        // Not seen until the ring reads the store again.
        assert_eq!(ring.active().kid, first);
        ring.refresh(&store).unwrap();
        assert_eq!(ring.active().kid, second);
        assert!(ring.verifying(&first).is_some());
        assert!(ring.verifying(&second).is_some());

        // A key whose tokens have all expired stops verifying, and the next
        // rotation deletes it.
        store
            .with(|c| {
                c.execute(
                    "UPDATE signing_keys SET retire_at_ms = 1 WHERE kid = ?1",
                    params![first],
                )
            })
            .unwrap();
        ring.refresh(&store).unwrap();
        assert!(ring.verifying(&first).is_none());
        rotate(&store, Duration::from_secs(3600)).unwrap();
        let kids: Vec<String> = list(&store).unwrap().into_iter().map(|k| k.kid).collect();
        assert_eq!(kids.len(), 2);
        assert!(!kids.contains(&first));

        // A reopened store keeps its keys.
        drop(store);
        let store = Store::open(&dir.path().join("xpud.db")).unwrap();
        assert_eq!(list(&store).unwrap().len(), 2);
    }
}
