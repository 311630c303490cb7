//! What can go wrong where media is kept: the local disk or the object storage.

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("no such object")]
    NotFound,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The storage did not answer, or refused: the cause may name the endpoint, so it is logged
    /// and never sent to a client.
    #[error("object storage: {0}")]
    Unavailable(String),
}

impl From<object_store::Error> for MediaError {
    fn from(err: object_store::Error) -> Self {
        match err {
            object_store::Error::NotFound { .. } => MediaError::NotFound,
            other => MediaError::Unavailable(other.to_string()),
        }
    }
}
