//! Reading requests: JSON bodies and GET parameters, with errors that name the
//! field, in the endpoint's own envelope.
//!
//! - [`Body`]: a JSON body. A wrong type or a missing field is a 400 whose message
//!   names the field's path (`spec.nodes[0].count: invalid type ...`); a body over the
//!   limit is a 413. Unknown fields are ignored.
//! - [`Params`]: the text describes "request bodies" for several GET endpoints; they
//!   are accepted as query parameters and, when a body is present, as JSON.
//! - Names, codes and ids (any field whose name ends in `name`, `code` or `id`, and
//!   path segments) never carry control characters or bidirectional overrides: they
//!   end up in logs, file names and other systems' screens. Such a request is a 400
//!   naming the field.

use std::marker::PhantomData;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::envelope::{Failure, Family};
use crate::text::is_hidden_control;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub struct Body<T, F>(pub T, pub PhantomData<F>);

/// Parses JSON naming the failing field. The path is tracked only when parsing
/// fails (a second, slower pass): good requests pay plain serde_json.
pub fn parse_json<T: DeserializeOwned, F>(bytes: &[u8]) -> Result<T, Failure<F>> {
    let mut typed = serde_json::from_slice::<T>(bytes).ok();
    let suspect = may_hide_control(bytes);
    if !suspect {
        if let Some(typed) = typed.take() {
            return Ok(typed);
        }
    }
    // The slow path, for bodies that may hide control characters or did not read
    // as `T`: one generic parse serves both checks below.
    if let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(bytes) {
        if let Some(field) = suspect
            .then(|| control_in_names(&value, "", false))
            .flatten()
        {
            return Err(Failure::bad_request(format!(
                "{field}: control characters and bidirectional overrides are not allowed \
                 in names, codes and ids"
            )));
        }
        if let Some(typed) = typed {
            return Ok(typed);
        }
        // JSON Schema's integers are numbers without a fraction: `25.0` is one, and a
        // schema-driven client may send it so. Such numbers are read as integers.
        if whole_floats_to_integers(&mut value) {
            if let Ok(typed) = serde_json::from_value(value) {
                return Ok(typed);
            }
        }
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

/// Whether a name-like key says its value is a name, a code or an id.
pub fn names_something(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.ends_with("name") || key.ends_with("code") || key.ends_with("id")
}

/// Turns numbers like `25.0` into integers; whether any was changed.
fn whole_floats_to_integers(value: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            let whole = f.fract() == 0.0 && f.abs() < 9.0e15;
            if whole {
                *value = if f < 0.0 {
                    Value::from(f as i64)
                } else {
                    Value::from(f as u64)
                };
            }
            whole
        }
        // Every item is visited (no short circuit): each may need turning.
        Value::Array(items) => items
            .iter_mut()
            .map(whole_floats_to_integers)
            .fold(false, |a, b| a | b),
        Value::Object(fields) => fields
            .values_mut()
            .map(whole_floats_to_integers)
            .fold(false, |a, b| a | b),
        _ => false,
    }
}

/// Cheap test on the raw body: JSON carries control characters only escaped
/// (`\n`, `\u0000`), bidirectional overrides escaped or as their UTF-8 bytes. Most
/// bodies have neither and skip the walk.
fn may_hide_control(bytes: &[u8]) -> bool {
    bytes
        .windows(2)
        .any(|w| w[0] == b'\\' && matches!(w[1], b'b' | b'f' | b'n' | b'r' | b't' | b'u'))
        || bytes.windows(3).any(|w| {
            w[0] == 0xe2 && matches!((w[1], w[2]), (0x80, 0xaa..=0xae) | (0x81, 0xa6..=0xa9))
        })
}

/// The path of the first name, code or id holding a hidden control character.
fn control_in_names(value: &serde_json::Value, path: &str, named: bool) -> Option<String> {
    use serde_json::Value;
    match value {
        Value::String(s) if named && s.chars().any(is_hidden_control) => Some(path.to_string()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| control_in_names(item, &format!("{path}[{i}]"), named)),
        Value::Object(fields) => fields.iter().find_map(|(key, item)| {
            let at = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            control_in_names(item, &at, names_something(key))
        }),
        _ => None,
    }
}

/// Refuses a request whose declared body is over the limit before a byte of it is
/// read, where that is what serves the client: one that sent `Expect:
/// 100-continue` (it waits for our word before sending) gets 413 instead of "100
/// Continue", and a body too large to drain is not read at all. The connection is
/// closed after the answer. A body over the limit but small enough to drain is read
/// and dropped by `body_bytes`, so that a client that is still writing gets the 413
/// rather than a reset.
pub async fn refuse_oversized(
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let waits_for_us = request
        .headers()
        .get(axum::http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    let refuse_now = |length: u64| {
        length > MAX_BODY_BYTES as u64
            && (waits_for_us || length > (MAX_BODY_BYTES + DRAIN_BYTES) as u64)
    };
    match declared {
        Some(length) if refuse_now(length) => {
            let mut response = super::family_of(request.uri().path())(
                413,
                &format!("request body of {length} bytes is larger than {MAX_BODY_BYTES} bytes"),
            );
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            response
        }
        _ => next.run(request).await,
    }
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
        if let Some((key, _)) = form_urlencoded::parse(query.as_bytes())
            .find(|(key, value)| names_something(key) && value.chars().any(is_hidden_control))
        {
            return Err(Failure::bad_request(format!(
                "query parameter {key}: control characters and bidirectional overrides are \
                 not allowed in names, codes and ids"
            )));
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
        let axum::extract::Path(value) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| Failure::bad_request(e.body_text()))?;
        if value.chars().any(is_hidden_control) {
            return Err(Failure::bad_request(
                "the id in the path has control characters or bidirectional overrides",
            ));
        }
        Ok(PathParam(value, PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_codes_and_ids_refuse_hidden_controls_naming_the_field() {
        let refused = |body: &str| {
            parse_json::<serde_json::Value, ()>(body.as_bytes())
                .err()
                .map(|f| f.message)
        };
        let message = refused(r#"{"clusterName": "a\u0000b"}"#).unwrap();
        assert!(message.starts_with("clusterName: control"), "{message}");
        let message = refused(r#"{"spec": {"nodes": [{"nodeCode": "n\u202e1"}]}}"#).unwrap();
        assert!(message.starts_with("spec.nodes[0].nodeCode:"), "{message}");
        // Raw UTF-8 of an override, not escaped.
        assert!(refused("{\"algoId\": \"x\u{2066}y\"}").is_some());
        // Free text may have newlines; names may have any printable text.
        assert!(refused(r#"{"description": "two\nlines"}"#).is_none());
        assert!(refused(r#"{"clusterName": "中心集群 \u4e2d"}"#).is_none());
    }

    #[test]
    fn whole_numbers_written_as_floats_are_integers() {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Page {
            page_number: u32,
            share: f64,
        }
        let page: Page = parse_json::<Page, ()>(br#"{"pageNumber": 22300.0, "share": 0.5}"#)
            .map_err(|f| f.message)
            .unwrap();
        assert_eq!((page.page_number, page.share), (22300, 0.5));
        let refused = parse_json::<Page, ()>(br#"{"pageNumber": 1.5, "share": 1}"#)
            .err()
            .unwrap();
        assert!(
            refused.message.starts_with("pageNumber:"),
            "{}",
            refused.message
        );
    }
}
