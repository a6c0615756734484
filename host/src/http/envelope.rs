//! The standard's response envelopes, one per family of appendices:
//!
//! | family | appendices | success | failure |
//! |---|---|---|---|
//! | [`CodeString`] | A, B, C, H, I | `{"code": "0", "message", "requestId", "data"}` | `code` = the HTTP status as a string |
//! | [`CodeInt`] | E, F, G | `{"code": 0, "msg", "data"}` | `code` = the HTTP status |
//! | [`CodeIntMessage`] | D | `{"code": 0, "message", "data"}` | `code` = the HTTP status |
//!
//! Handlers return `Result<Reply<F, T>, Failure<F>>`: the family is part of the type,
//! so a failure is always written in its endpoint's envelope.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::{RefOr, Response as ApiResponse, ResponseBuilder};
use utoipa::{IntoResponses, PartialSchema, ToSchema};

/// An envelope family.
pub trait Family: Send + 'static {
    fn body<T: Serialize>(code: u16, message: &str, data: Option<T>) -> Response;
    /// The schema of a failure in this family, for the API document.
    fn failure_schema() -> RefOr<utoipa::openapi::schema::Schema>;
}

/// Appendices A, B, C, H and I.
pub struct CodeString;
/// Appendices E, F and G.
pub struct CodeInt;
/// Appendix D.
pub struct CodeIntMessage;

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The body of every A, B, C, H and I answer.
#[derive(Serialize, ToSchema)]
pub struct CodeStringBody<T> {
    /// `"0"` on success, else the HTTP status.
    #[schema(example = "0")]
    code: String,
    message: String,
    #[serde(rename = "requestId")]
    request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<T>,
}

/// The body of every E, F and G answer.
#[derive(Serialize, ToSchema)]
pub struct CodeIntBody<T> {
    /// 0 on success, else the HTTP status.
    #[schema(example = 0)]
    code: u16,
    msg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<T>,
}

/// The body of every D answer.
#[derive(Serialize, ToSchema)]
pub struct CodeIntMessageBody<T> {
    /// 0 on success, else the HTTP status.
    #[schema(example = 0)]
    code: u16,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<T>,
}

/// The envelope's code for an HTTP status: 0 for success, the status otherwise.
fn envelope_code(code: u16) -> u16 {
    if code < 300 {
        0
    } else {
        code
    }
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The body as JSON. Written into a buffer that fits a page of records at once
/// (axum's `Json` starts at 128 bytes and regrows for anything larger).
fn json(code: u16, body: &impl Serialize) -> Response {
    let mut buffer = Vec::with_capacity(4096);
    match serde_json::to_writer(&mut buffer, body) {
        Ok(()) => (
            status(code),
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            buffer,
        )
            .into_response(),
        Err(e) => {
            tracing::error!("answer not serialisable: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

impl Family for CodeString {
    fn body<T: Serialize>(code: u16, message: &str, data: Option<T>) -> Response {
        let body = CodeStringBody {
            code: envelope_code(code).to_string(),
            message: message.to_owned(),
            request_id: request_id(),
            data,
        };
        json(code, &body)
    }

    fn failure_schema() -> RefOr<utoipa::openapi::schema::Schema> {
        CodeStringBody::<()>::schema()
    }
}

impl Family for CodeInt {
    fn body<T: Serialize>(code: u16, message: &str, data: Option<T>) -> Response {
        let body = CodeIntBody {
            code: envelope_code(code),
            msg: message.to_owned(),
            data,
        };
        json(code, &body)
    }

    fn failure_schema() -> RefOr<utoipa::openapi::schema::Schema> {
        CodeIntBody::<()>::schema()
    }
}

impl Family for CodeIntMessage {
    fn body<T: Serialize>(code: u16, message: &str, data: Option<T>) -> Response {
        let body = CodeIntMessageBody {
            code: envelope_code(code),
            message: message.to_owned(),
            data,
        };
        json(code, &body)
    }

    fn failure_schema() -> RefOr<utoipa::openapi::schema::Schema> {
        CodeIntMessageBody::<()>::schema()
    }
}

/// The failures any endpoint may answer with, in its family's envelope, for the API
/// document: `4XX` (the message says what was wrong, naming the field) and `5XX`.
fn failures<F: Family>() -> BTreeMap<String, RefOr<ApiResponse>> {
    let response = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(F::failure_schema()))
                    .build(),
            )
            .build()
            .into()
    };
    BTreeMap::from([
        (
            "4XX".to_string(),
            response("The request was refused; `message` says why, naming the field"),
        ),
        (
            "5XX".to_string(),
            response("The server failed; the detail is in its log"),
        ),
    ])
}

/// [`failures`] of appendices A, B, C, H and I.
pub struct CodeStringFailures;
/// [`failures`] of appendices E, F and G.
pub struct CodeIntFailures;
/// [`failures`] of appendix D.
pub struct CodeIntMessageFailures;

impl IntoResponses for CodeStringFailures {
    fn responses() -> BTreeMap<String, RefOr<ApiResponse>> {
        failures::<CodeString>()
    }
}

impl IntoResponses for CodeIntFailures {
    fn responses() -> BTreeMap<String, RefOr<ApiResponse>> {
        failures::<CodeInt>()
    }
}

impl IntoResponses for CodeIntMessageFailures {
    fn responses() -> BTreeMap<String, RefOr<ApiResponse>> {
        failures::<CodeIntMessage>()
    }
}

/// A successful answer carrying `data` (or none: the text's `EmptyResponse`).
pub struct Reply<F, T> {
    data: Option<T>,
    family: PhantomData<F>,
}

impl<F, T> Reply<F, T> {
    pub fn data(data: T) -> Self {
        Reply {
            data: Some(data),
            family: PhantomData,
        }
    }
}

impl<F> Reply<F, ()> {
    pub fn empty() -> Self {
        Reply {
            data: None,
            family: PhantomData,
        }
    }
}

impl<F: Family, T: Serialize> IntoResponse for Reply<F, T> {
    fn into_response(self) -> Response {
        F::body(200, "success", self.data)
    }
}

/// A failed request: an HTTP status and a message that names what was wrong.
#[derive(Debug)]
pub struct Failure<F> {
    pub status: StatusCode,
    pub message: String,
    family: PhantomData<F>,
}

impl<F> Failure<F> {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
            family: PhantomData,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    /// A failure of the server itself; the detail goes to the log, not the client.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!("request failed: {error}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the server log",
        )
    }
}

impl<F: Family> IntoResponse for Failure<F> {
    fn into_response(self) -> Response {
        F::body::<()>(self.status.as_u16(), &self.message, None)
    }
}

pub type Answer<F, T> = Result<Reply<F, T>, Failure<F>>;

impl<F> From<crate::error::Error> for Failure<F> {
    fn from(error: crate::error::Error) -> Self {
        use crate::error::Error;
        match error {
            Error::Invalid(message) => Failure::bad_request(message),
            Error::NotFound(message) => Failure::not_found(message),
            Error::Conflict(message) => Failure::conflict(message),
            Error::Internal(error) => Failure::internal(format!("{error:#}")),
        }
    }
}
