//! Errors of the manager's operations, and their one mapping to gRPC statuses.

use tandem_core::DomainError;
use tonic::Status;

/// Why an API operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request or the state forbids it; the operator must change something.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// No leader can be reached, or the cluster cannot commit now; retrying may help.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// The peer site refused or failed; its status is passed on with context.
    #[error("peer site: {0}")]
    Peer(String, tonic::Code),
    /// The leader answered a forwarded request with this status.
    #[error("{0}")]
    Forwarded(String, tonic::Code),
    /// What the caller presented does not let it do this (a join token that does not
    /// match, a proof that does not verify).
    #[error("{0}")]
    Denied(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A request's shape is wrong (checked on receipt, before any domain rule).
    #[error("{0}")]
    Invalid(String),
    /// The caller presented no credential this port accepts.
    #[error("{0}")]
    Unauthenticated(String),
    /// This node cannot take the request as it is (e.g. a member's call to a node without
    /// TLS).
    #[error("{0}")]
    Precondition(String),
}

impl ApiError {
    pub fn unavailable(msg: impl std::fmt::Display) -> Self {
        Self::Unavailable(msg.to_string())
    }

    pub fn internal(msg: impl std::fmt::Display) -> Self {
        Self::Internal(msg.to_string())
    }

    pub fn invalid(msg: impl std::fmt::Display) -> Self {
        Self::Invalid(msg.to_string())
    }

    pub fn denied(msg: impl std::fmt::Display) -> Self {
        Self::Denied(msg.to_string())
    }

    pub fn unauthenticated(msg: impl std::fmt::Display) -> Self {
        Self::Unauthenticated(msg.to_string())
    }

    pub fn precondition(msg: impl std::fmt::Display) -> Self {
        Self::Precondition(msg.to_string())
    }

    /// Wraps a status returned by a peer site.
    pub fn from_peer(s: Status) -> Self {
        let code = match s.code() {
            // A peer that cannot be reached leaves this site unable to act, not the request bad.
            tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => {
                tonic::Code::Unavailable
            }
            c => c,
        };
        Self::Peer(s.message().to_string(), code)
    }

    /// Wraps a status returned by this site's leader for a forwarded request.
    pub fn forwarded(s: Status) -> Self {
        Self::Forwarded(s.message().to_string(), s.code())
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Domain(d) => tandem_proto::status::to_status(&d),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::Peer(m, code) => Status::new(code, format!("peer site: {m}")),
            ApiError::Forwarded(m, code) => Status::new(code, m),
            ApiError::Denied(m) => Status::permission_denied(m),
            ApiError::Internal(m) => Status::internal(m),
            ApiError::Invalid(m) => Status::invalid_argument(m),
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::Precondition(m) => Status::failed_precondition(m),
        }
    }
}

/// Shorthand for API results.
pub type ApiResult<T> = Result<T, ApiError>;
