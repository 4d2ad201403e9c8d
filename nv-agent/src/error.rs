//! The library's errors. Each carries one line an operator can act on.
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NvError {
    /// The request is malformed or violates a rule; nothing was changed.
    #[error("{0}")]
    Invalid(String),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with what exists (duplicate, in use).
    #[error("{0}")]
    Conflict(String),
    #[error("store: {0}")]
    Store(String),
    #[error("datapath: {0}")]
    Datapath(String),
    #[error("netlink: {0}")]
    Netlink(String),
    /// Cluster mode: etcd is unreachable or refused the request.
    #[error("etcd: {0}")]
    Cluster(String),
}

pub type Result<T, E = NvError> = std::result::Result<T, E>;

pub fn invalid(msg: impl Into<String>) -> NvError {
    NvError::Invalid(msg.into())
}
