//! Access tokens: JWTs (RFC 7519) signed with HS256 (RFC 7515).
//!
//! xpud both issues and verifies its tokens, so a shared-secret MAC fits: no public
//! key has to reach anyone, and checking a token costs one HMAC (about a
//! microsecond) where an Ed25519 signature costs tens. The header names the key
//! (`kid`) so that keys can rotate while tokens signed by the previous one stay good.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::keys::{KeyRing, SigningKey};

/// Who issues the tokens, and the only issuer accepted.
pub const ISSUER: &str = "xpud";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The client the token was issued to.
    pub sub: String,
    /// Space-separated scopes (RFC 6749 §3.3).
    pub scope: String,
    /// Seconds since the epoch.
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
}

impl Claims {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scope.split(' ').any(|s| s == scope)
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    kid: String,
}

/// Why a token was refused; the text goes into `WWW-Authenticate`'s description.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a JWT this server issued")]
    Malformed,
    #[error("the token is signed with an algorithm other than HS256")]
    Algorithm,
    #[error("the token's signing key is unknown or retired")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token has expired")]
    Expired,
}

pub fn sign(key: &SigningKey, claims: &Claims) -> String {
    let header = Header {
        alg: "HS256".into(),
        typ: Some("JWT".into()),
        kid: key.kid.clone(),
    };
    let mut token = format!("{}.{}", encode(&header), encode(claims));
    let tag = ring::hmac::sign(key.mac(), token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(tag.as_ref()));
    token
}

/// Checks a token's form, key, signature, issuer and expiry, in that order; the
/// claims are read only once the signature holds.
pub fn verify(token: &str, keys: &KeyRing, now_s: u64) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(header_part), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header: Header = decode_json(header_part)?;
    if header.alg != "HS256" {
        return Err(TokenError::Algorithm);
    }
    let key = keys.verifying(&header.kid).ok_or(TokenError::UnknownKey)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| TokenError::Malformed)?;
    let signed = &token[..header_part.len() + 1 + payload.len()];
    // Constant time: ring compares the tags without an early exit.
    ring::hmac::verify(key.mac(), signed.as_bytes(), &signature)
        .map_err(|_| TokenError::Signature)?;
    let claims: Claims = decode_json(payload)?;
    if claims.iss != ISSUER {
        return Err(TokenError::Malformed);
    }
    if claims.exp <= now_s {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

/// The `kid` of a token's header (no other check).
pub fn key_id(token: &str) -> Option<String> {
    let header: Header = decode_json(token.split('.').next()?).ok()?;
    Some(header.kid)
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

fn encode<T: Serialize>(part: &T) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(part).expect("token parts serialise"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: "platform".into(),
            scope: "read write".into(),
            iat: 100,
            exp,
            jti: "j".into(),
        }
    }

    #[test]
    fn tokens_verify_until_they_expire_and_not_when_touched() {
        let ring = KeyRing::ephemeral();
        let token = sign(&ring.active(), &claims(200));
        assert_eq!(verify(&token, &ring, 150).unwrap(), claims(200));
        assert!(verify(&token, &ring, 150).unwrap().has_scope("write"));
        assert_eq!(verify(&token, &ring, 200), Err(TokenError::Expired));

        // Another payload under the same signature.
        let (head, rest) = token.split_once('.').unwrap();
        let signature = rest.split_once('.').unwrap().1;
        let forged = format!(
            "{head}.{}.{signature}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(10_000)).unwrap())
        );
        assert_eq!(verify(&forged, &ring, 150), Err(TokenError::Signature));
        assert_eq!(verify("a.b", &ring, 150), Err(TokenError::Malformed));
        assert_eq!(verify("", &ring, 150), Err(TokenError::Malformed));

        let other = KeyRing::ephemeral();
        assert_eq!(verify(&token, &other, 150), Err(TokenError::UnknownKey));

        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"x"}"#),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(200)).unwrap())
        );
        assert_eq!(verify(&none, &ring, 150), Err(TokenError::Algorithm));
    }
}
