//! OAuth2 over HTTP: the token endpoint (RFC 6749 §4.4, client credentials) and the
//! bearer guard every other endpoint stands behind (RFC 6750). Only `/healthz` and
//! the token endpoint are open.
//!
//! A refusal by the guard is written in the envelope of the appendix the path
//! belongs to, with `WWW-Authenticate` saying what was wrong: 401 for a missing,
//! malformed, forged, unknown-key or expired token, 403 for a token without the
//! scope the endpoint needs. Failed client authentications and forged tokens count
//! against the client's address; past the limit those (and only those) get 429
//! until the window ends. A valid token is always served.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, PRAGMA, RETRY_AFTER, WWW_AUTHENTICATE,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::App;
use crate::auth::jwt::TokenError;
use crate::auth::{GrantError, Scope};

pub const TOKEN_PATH: &str = "/oauth/token";

/// Paths served without a token.
const OPEN: [&str; 2] = ["/healthz", TOKEN_PATH];

/// The scope an endpoint needs: reads are GETs and the `:search` queries (POSTs
/// that change nothing); everything else writes, and so does A.6 (`.../license`),
/// the access material a platform is configured from.
pub fn required_scope(method: &Method, path: &str) -> Option<Scope> {
    if OPEN.contains(&path) {
        None
    } else if path.ends_with("/license") {
        Some(Scope::Write)
    } else if *method == Method::GET || *method == Method::HEAD || path.ends_with(":search") {
        Some(Scope::Read)
    } else {
        Some(Scope::Write)
    }
}

/// The peer's address, as the connection loop recorded it.
fn peer(request_extensions: &axum::http::Extensions) -> IpAddr {
    request_extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())
}

fn retry_after(mut response: Response, wait: std::time::Duration) -> Response {
    let seconds = wait.as_secs().max(1);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// Lets a request with a good token through, and answers the rest.
pub async fn guard(State(app): State<App>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let Some(needed) = required_scope(request.method(), path) else {
        return next.run(request).await;
    };
    let envelope = super::family_of(path);
    let address = peer(request.extensions());
    let refuse = |status: u16, challenge: String, message: &str| {
        let mut response = envelope(status, message);
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response.headers_mut().insert(WWW_AUTHENTICATE, value);
        }
        response
    };
    let token = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = token else {
        return refuse(
            401,
            r#"Bearer realm="xpud""#.into(),
            "an access token is required: Authorization: Bearer <token> (POST /oauth/token issues one)",
        );
    };
    let claims = match app.auth.verify(token) {
        Ok(claims) => claims,
        Err(e) => {
            // An expired token is a client that should fetch a new one; the others
            // are guesses or forgeries, and count against the address. Only they are
            // throttled: a valid token is always served, so that a guesser behind
            // the platform's NAT cannot lock the platform out.
            if e != TokenError::Expired {
                if let Err(wait) = app.auth.limiter().check(address) {
                    return retry_after(
                        envelope(
                            429,
                            &format!(
                                "too many failed authentications from {address}; retry in {} s",
                                wait.as_secs().max(1)
                            ),
                        ),
                        wait,
                    );
                }
                app.auth.limiter().record_failure(address);
            }
            return refuse(
                401,
                format!(r#"Bearer realm="xpud", error="invalid_token", error_description="{e}""#),
                &format!("invalid access token: {e}"),
            );
        }
    };
    if !claims.has_scope(needed.as_str()) {
        return refuse(
            403,
            format!(
                r#"Bearer realm="xpud", error="insufficient_scope", scope="{}""#,
                needed.as_str()
            ),
            &format!(
                "{} {path} needs the {} scope; the token has: {}",
                request.method(),
                needed.as_str(),
                claims.scope
            ),
        );
    }
    next.run(request).await
}

/// The token request's form fields (RFC 6749 §4.4.2; client credentials may come
/// in the body instead of HTTP Basic, §2.3.1).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct TokenRequest {
    /// `client_credentials`
    #[schema(pattern = "^client_credentials$")]
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    /// Space-separated, some of `read write`; none: all the client may have.
    scope: Option<String>,
}

/// RFC 6749 §5.1.
#[derive(Serialize, ToSchema)]
pub struct TokenResponse {
    access_token: String,
    /// `Bearer`
    token_type: &'static str,
    /// Seconds.
    expires_in: u64,
    scope: String,
}

/// RFC 6749 §5.2.
#[derive(Serialize, ToSchema)]
pub struct TokenErrorBody {
    /// `invalid_request`, `invalid_client` (also with 429, after too many failed
    /// client authentications from this address), `unsupported_grant_type` or
    /// `invalid_scope`.
    error: &'static str,
    error_description: String,
}

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn token_error(
    status: StatusCode,
    error: &'static str,
    description: impl Into<String>,
) -> Response {
    no_store(
        (
            status,
            Json(TokenErrorBody {
                error,
                error_description: description.into(),
            }),
        )
            .into_response(),
    )
}

/// Reads the form, refusing a parameter given twice (RFC 6749 §3.2).
fn parse_form(body: &[u8]) -> Result<TokenRequest, String> {
    let mut request = TokenRequest::default();
    for (name, value) in form_urlencoded::parse(body) {
        let slot = match name.as_ref() {
            "grant_type" => &mut request.grant_type,
            "client_id" => &mut request.client_id,
            "client_secret" => &mut request.client_secret,
            "scope" => &mut request.scope,
            _ => continue,
        };
        if slot.replace(value.into_owned()).is_some() {
            return Err(format!("{name} is given more than once"));
        }
    }
    Ok(request)
}

/// HTTP Basic client credentials: each part form-encoded, then base64 (§2.3.1).
fn basic_credentials(headers: &HeaderMap) -> Option<Result<(String, String), String>> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decode = || -> Option<(String, String)> {
        let text = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
        let (id, secret) = text.split_once(':')?;
        let unescape = |s: &str| {
            form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
        };
        Some((unescape(id)?, unescape(secret)?))
    };
    Some(decode().ok_or_else(|| "the Basic credentials are not base64 of id:secret".to_string()))
}

/// Issues an access token to a client that proves its secret.
#[utoipa::path(post, path = "/oauth/token", tag = "xpud",
    request_body(content = TokenRequest, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "The access token", body = TokenResponse),
        (status = 400, description = "invalid_request, unsupported_grant_type or invalid_scope", body = TokenErrorBody),
        (status = 401, description = "invalid_client", body = TokenErrorBody),
        (status = 429, description = "invalid_client: too many failed client authentications from this address; Retry-After says when to try again", body = TokenErrorBody),
    ))]
pub async fn token(State(app): State<App>, request: Request) -> Response {
    let address = peer(request.extensions());
    if let Err(wait) = app.auth.limiter().check(address) {
        return retry_after(
            // RFC 6749 §5.2 has no throttling error (`slow_down` is RFC 8628's device
            // flow): the client authentication is what is refused, for now.
            token_error(
                StatusCode::TOO_MANY_REQUESTS,
                "invalid_client",
                format!(
                    "too many failed authentications from {address}; retry in {} s",
                    wait.as_secs().max(1)
                ),
            ),
            wait,
        );
    }
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let form = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form {
        return token_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        );
    }
    let body = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(body) => body,
        Err(_) => {
            return token_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the body could not be read (at most 64 KiB)",
            )
        }
    };
    let form = match parse_form(&body) {
        Ok(form) => form,
        Err(e) => return token_error(StatusCode::BAD_REQUEST, "invalid_request", e),
    };
    match form.grant_type.as_deref() {
        None => {
            return token_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type is missing",
            )
        }
        Some("client_credentials") => {}
        Some(other) => {
            return token_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("grant_type {other:?}: only client_credentials"),
            )
        }
    }
    let basic = basic_credentials(&headers);
    let in_body = form.client_id.is_some() || form.client_secret.is_some();
    let (id, secret) = match (basic, in_body) {
        (Some(_), true) => {
            return token_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "client credentials came both in the Authorization header and in the body: use one",
            )
        }
        (Some(Err(e)), false) => return token_error(StatusCode::BAD_REQUEST, "invalid_request", e),
        (Some(Ok(pair)), false) => pair,
        (None, _) => match (form.client_id, form.client_secret) {
            (Some(id), Some(secret)) => (id, secret),
            _ => {
                return challenge_basic(token_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "client authentication is required: HTTP Basic, or client_id and client_secret in the body",
                ))
            }
        },
    };
    let scope = form.scope;
    let auth = app.auth.clone();
    let issued = tokio::task::spawn_blocking(move || auth.issue(&id, &secret, scope.as_deref()))
        .await
        .map_err(|e| GrantError::Internal(anyhow::anyhow!("token worker failed: {e}")))
        .and_then(|r| r);
    match issued {
        Ok(issued) => no_store(
            Json(TokenResponse {
                access_token: issued.access_token,
                token_type: "Bearer",
                expires_in: issued.expires_in,
                scope: issued.scope,
            })
            .into_response(),
        ),
        Err(GrantError::InvalidClient) => {
            app.auth.limiter().record_failure(address);
            challenge_basic(token_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "unknown client or wrong secret",
            ))
        }
        Err(GrantError::InvalidScope(message)) => {
            token_error(StatusCode::BAD_REQUEST, "invalid_scope", message)
        }
        Err(GrantError::Internal(e)) => {
            tracing::error!("token request failed: {e:#}");
            token_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal error; see the server log",
            )
        }
    }
}

fn challenge_basic(mut response: Response) -> Response {
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static(r#"Basic realm="xpud""#),
    );
    response
}
