//! Reading requests: JSON bodies and GET parameters, with errors that name the
//! field, in the endpoint's own envelope.
//!
//! - [`Body`]: a JSON body. A wrong type or a missing field is a 400 whose message
//!   names the field's path (`spec.nodes[0].count: invalid type ...`); a body over the
//!   limit is a 413. Unknown fields are ignored.
//! - [`Params`]: the text describes "request bodies" for several GET endpoints; they
//!   are accepted as query parameters and, when a body is present, as JSON.

use std::marker::PhantomData;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::envelope::{Failure, Family};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub struct Body<T, F>(pub T, pub PhantomData<F>);

/// Parses JSON naming the failing field. The path is tracked only when parsing
/// fails (a second, slower pass): good requests pay plain serde_json.
pub fn parse_json<T: DeserializeOwned, F>(bytes: &[u8]) -> Result<T, Failure<F>> {
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("request body is not valid JSON: {inner}")
        } else if path == "." {
            format!("request body: {inner}")
        } else {
            format!("{path}: {inner}")
        };
        Failure::bad_request(message)
    })
}

/// Past the limit, how much more of a body is read (and dropped) before answering
/// 413: a client still writing when the server closes the connection gets a reset
/// instead of the answer.
const DRAIN_BYTES: usize = 16 * 1024 * 1024;

async fn body_bytes<F>(req: Request) -> Result<Bytes, Failure<F>> {
    use http_body_util::BodyExt;
    let mut body = req.into_body();
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    // Most bodies arrive as one frame: kept as it is, not copied.
    let mut first: Option<Bytes> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, format!("request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= MAX_BODY_BYTES {
            match first.take() {
                None if bytes.is_empty() => first = Some(data),
                earlier => {
                    if let Some(earlier) = earlier {
                        bytes.extend_from_slice(&earlier);
                    }
                    bytes.extend_from_slice(&data);
                }
            }
        } else if seen > MAX_BODY_BYTES + DRAIN_BYTES {
            break;
        }
    }
    if seen > MAX_BODY_BYTES {
        return Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {MAX_BODY_BYTES} bytes"),
        ));
    }
    Ok(first.unwrap_or_else(|| Bytes::from(bytes)))
}

impl<S, T, F> FromRequest<S> for Body<T, F>
where
    S: Send + Sync,
    T: DeserializeOwned,
    F: Family,
{
    type Rejection = Failure<F>;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req).await?;
        if bytes.is_empty() {
            return Err(Failure::bad_request(
                "request body is empty; a JSON object is required",
            ));
        }
        Ok(Body(parse_json(&bytes)?, PhantomData))
    }
}

/// GET parameters: the JSON body when there is one, else the query string.
pub struct Params<T, F>(pub T, pub PhantomData<F>);

impl<S, T, F> FromRequest<S> for Params<T, F>
where
    S: Send + Sync,
    T: DeserializeOwned,
    F: Family,
{
    type Rejection = Failure<F>;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let query = req.uri().query().unwrap_or("").to_string();
        let bytes = body_bytes(req).await?;
        if bytes.iter().any(|b| !b.is_ascii_whitespace()) {
            return Ok(Params(parse_json(&bytes)?, PhantomData));
        }
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(|value| Params(value, PhantomData))
            .map_err(|e| {
                let path = e.path().to_string();
                Failure::bad_request(if path == "." {
                    format!("query: {}", e.into_inner())
                } else {
                    format!("query parameter {path}: {}", e.into_inner())
                })
            })
    }
}

/// A path segment, with a rejection in the endpoint's envelope.
pub struct PathParam<F>(pub String, pub PhantomData<F>);

impl<S, F> FromRequestParts<S> for PathParam<F>
where
    S: Send + Sync,
    F: Family,
{
    type Rejection = Failure<F>;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| PathParam(value, PhantomData))
            .map_err(|e| Failure::bad_request(e.body_text()))
    }
}
