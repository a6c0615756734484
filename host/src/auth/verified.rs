//! Tokens already verified: a client sends the same token with every request until
//! it expires, so after the first check a lookup (a few hundred nanoseconds) stands
//! in for the signature check (1.8 µs). Only tokens whose signature held are kept;
//! a hit is still refused once the token expires or its key stops verifying.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::jwt::Claims;
use crate::sync::{read, write};

/// Tokens kept at most; when full, the cache starts over.
const CAPACITY: usize = 4096;

struct Entry {
    kid: Box<str>,
    claims: Arc<Claims>,
}

#[derive(Default)]
pub struct VerifiedTokens {
    entries: RwLock<HashMap<Box<str>, Entry>>,
}

impl VerifiedTokens {
    /// The claims of `token` if it was verified before, is still in date, and its
    /// key (`key_verifies`) still verifies.
    pub fn get(
        &self,
        token: &str,
        now_s: u64,
        key_verifies: impl Fn(&str) -> bool,
    ) -> Option<Arc<Claims>> {
        let entries = read(&self.entries);
        let entry = entries.get(token)?;
        (entry.claims.exp > now_s && key_verifies(&entry.kid)).then(|| entry.claims.clone())
    }

    pub fn insert(&self, token: &str, kid: &str, claims: Arc<Claims>) {
        let mut entries = write(&self.entries);
        if entries.len() >= CAPACITY {
            entries.clear();
        }
        entries.insert(
            token.into(),
            Entry {
                kid: kid.into(),
                claims,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Arc<Claims> {
        Arc::new(Claims {
            iss: "xpud".into(),
            sub: "a".into(),
            scope: "read".into(),
            iat: 0,
            exp,
            jti: "j".into(),
        })
    }

    #[test]
    fn hits_end_with_the_token_or_its_key() {
        let cache = VerifiedTokens::default();
        cache.insert("t", "k1", claims(100));
        assert!(cache.get("t", 50, |_| true).is_some());
        assert!(cache.get("t", 100, |_| true).is_none(), "expired");
        assert!(
            cache.get("t", 50, |kid| kid != "k1").is_none(),
            "key retired"
        );
        assert!(cache.get("other", 50, |_| true).is_none());
        for i in 0..CAPACITY {
            cache.insert(&i.to_string(), "k1", claims(100));
        }
        assert!(read(&cache.entries).len() <= CAPACITY);
    }
}
