//! Why a request against the server's state was refused. The HTTP layer turns each
//! kind into its status (400, 404, 409, 500) inside the endpoint's envelope.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is well-formed but asks for something invalid.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// It contradicts the current state (a duplicate code, an object in use, ...).
    #[error("{0}")]
    Conflict(String),
    /// The server failed (the store, a plugin): logged, not shown in detail.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
