//! The VRA's error type and the one place that maps it to gRPC status codes.

use std::path::PathBuf;

use tandem_core::{DomainError, ids::VpgId};
use tandem_journal::{Generation, JournalError};
use tonic::{Code, Status};

/// Errors of the VRA's domain operations.
#[derive(Debug, thiserror::Error)]
pub enum VraError {
    /// A request failed validation, or named something that does not exist.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The VPG has no role on this VRA.
    #[error("vpg {0} is not assigned to this vra")]
    VpgNotFound(VpgId),
    /// A recovery datastore's directory is not on this host (not mounted, say).
    #[error("recovery datastore {} not found on this host", .0.display())]
    DatastoreMissing(PathBuf),
    /// The VPG has the other role on this VRA.
    #[error("vpg {vpg} has the {role} role on this vra")]
    WrongRole {
        /// The VPG.
        vpg: VpgId,
        /// The role it has.
        role: &'static str,
    },
    /// A sender or assignment carries an older generation than the VPG's (fenced).
    #[error("stale generation {got} for vpg {vpg}: it is at generation {current}")]
    StaleGeneration {
        /// The VPG.
        vpg: VpgId,
        /// The generation presented.
        got: Generation,
        /// The VPG's current generation here.
        current: Generation,
    },
    /// A sender carries a newer generation than this VRA was assigned (retry later).
    #[error("generation {got} for vpg {vpg} is newer than the assigned {current}")]
    UnknownGeneration {
        /// The VPG.
        vpg: VpgId,
        /// The generation presented.
        got: Generation,
        /// The VPG's current generation here.
        current: Generation,
    },
    /// A checkpoint barrier request that does not fit the barrier's state.
    #[error("checkpoint barrier of vpg {vpg}: {reason}")]
    Barrier {
        /// The VPG.
        vpg: VpgId,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint that is not durable in every journal of the VPG (or is promoted).
    #[error("checkpoint {id} of vpg {vpg} is not usable: {reason}")]
    CheckpointUnusable {
        /// The VPG.
        vpg: VpgId,
        /// The checkpoint.
        id: u64,
        /// Why.
        reason: String,
    },
    /// The replication stream broke its protocol (gap, duplicate, unknown volume...).
    #[error("replication stream: {0}")]
    Stream(String),
    /// A journal operation failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// An NBD export operation failed.
    #[error(transparent)]
    Nbd(#[from] tandem_nbd::NbdError),
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The VRA (or the VPG's actor) is shutting down.
    #[error("vra is shutting down")]
    ShuttingDown,
    /// A request's shape is wrong (checked on receipt).
    #[error("{0}")]
    Invalid(String),
    /// The caller's certificate does not entitle it to this call.
    #[error("{0}")]
    Denied(String),
    /// This VRA cannot do that as it runs (e.g. `--insecure`: no certificates).
    #[error("{0}")]
    Precondition(String),
    /// Something of the VRA's own failed (a channel of a session that ended).
    #[error("{0}")]
    Internal(String),
}

impl VraError {
    /// Builds a closure that wraps an IO error with its context.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }

    /// The gRPC status a client sees for this error.
    pub fn to_status(&self) -> Status {
        let code = match self {
            Self::Domain(e) => return tandem_proto::status::to_status(e),
            Self::VpgNotFound(_) | Self::DatastoreMissing(_) => Code::NotFound,
            Self::WrongRole { .. }
            | Self::StaleGeneration { .. }
            | Self::UnknownGeneration { .. }
            | Self::Barrier { .. }
            | Self::CheckpointUnusable { .. } => Code::FailedPrecondition,
            Self::Stream(_) => Code::InvalidArgument,
            Self::Journal(e) => match e {
                JournalError::Fenced { .. }
                | JournalError::CheckpointUnusable { .. }
                | JournalError::Pinned { .. } => Code::FailedPrecondition,
                JournalError::CheckpointNotFound(_) => Code::NotFound,
                JournalError::SequenceGap { .. }
                | JournalError::SequenceDuplicate { .. }
                | JournalError::UnknownVolume(_)
                | JournalError::OutOfRange { .. }
                | JournalError::RecordTooLarge { .. }
                | JournalError::DuplicateCheckpoint(_) => Code::InvalidArgument,
                JournalError::Closed => Code::Unavailable,
                _ => Code::Internal,
            },
            Self::Nbd(tandem_nbd::NbdError::ExportExists(_)) => Code::AlreadyExists,
            Self::Nbd(tandem_nbd::NbdError::InvalidExportName { .. }) => Code::InvalidArgument,
            Self::Nbd(_) | Self::Io { .. } => Code::Internal,
            Self::ShuttingDown => Code::Unavailable,
            Self::Invalid(_) => Code::InvalidArgument,
            Self::Denied(_) => Code::PermissionDenied,
            Self::Precondition(_) => Code::FailedPrecondition,
            Self::Internal(_) => Code::Internal,
        };
        Status::new(code, self.to_string())
    }
}

impl From<VraError> for Status {
    fn from(e: VraError) -> Self {
        e.to_status()
    }
}

/// Result of VRA operations.
pub type VraResult<T> = Result<T, VraError>;
