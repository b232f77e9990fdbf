//! The one place that maps domain errors to gRPC status codes.

use tandem_core::DomainError;
use tonic::{Code, Status};

/// Maps a domain error to the gRPC status an API client sees.
pub fn to_status(e: &DomainError) -> Status {
    let code = match e {
        DomainError::Invalid(_) => Code::InvalidArgument,
        DomainError::NotFound { .. } => Code::NotFound,
        DomainError::AlreadyExists { .. } => Code::AlreadyExists,
        DomainError::Conflict { .. } => Code::Aborted,
        DomainError::FailedPrecondition(_) => Code::FailedPrecondition,
    };
    Status::new(code, e.to_string())
}
