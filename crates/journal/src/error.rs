//! The journal's error type.

use std::{io, path::PathBuf, sync::Arc};

use crate::types::{CheckpointId, Generation, SegmentId, Seq, VolumeId};

/// Result alias for journal operations.
pub type Result<T, E = JournalError> = std::result::Result<T, E>;

/// Everything that can go wrong in the journal engine.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An IO call failed.
    #[error("journal io error during {op} on {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Stored data failed its checksum or framing checks somewhere that is not a torn
    /// tail; the journal refuses to serve it.
    #[error("journal corrupt in segment {segment} at offset {offset}: {reason}")]
    Corrupt {
        /// Segment holding the bad bytes (`SegmentId(u64::MAX)` for the marker file).
        segment: SegmentId,
        /// Byte offset within that segment.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// The replica marker file failed its checksum.
    #[error("replica marker {path} corrupt: {reason}")]
    CorruptMarker {
        /// The marker file.
        path: PathBuf,
        /// What check failed.
        reason: String,
    },
    /// An append's sequence number is not the next one.
    #[error("sequence gap: expected {expected}, got {got}")]
    SequenceGap {
        /// The sequence the journal expects next.
        expected: Seq,
        /// The sequence offered.
        got: Seq,
    },
    /// An append's sequence number is already in the journal.
    #[error("duplicate sequence {got}: journal already holds up to {last}")]
    SequenceDuplicate {
        /// The sequence offered.
        got: Seq,
        /// The last sequence the journal holds.
        last: Seq,
    },
    /// An append came from a writer older than the journal's current generation.
    #[error("fenced: record generation {got} is older than the journal's {current}")]
    Fenced {
        /// The generation offered.
        got: Generation,
        /// The journal's current generation.
        current: Generation,
    },
    /// A data record names a volume the journal does not know.
    #[error("unknown volume {0}")]
    UnknownVolume(VolumeId),
    /// A data record falls outside its volume.
    #[error("range {offset}+{len} outside volume {volume} of size {size}")]
    OutOfRange {
        /// The volume.
        volume: VolumeId,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The volume's size.
        size: u64,
    },
    /// A record is larger than the configured maximum.
    #[error("record of {len} bytes exceeds the maximum of {max}")]
    RecordTooLarge {
        /// Encoded payload length.
        len: u64,
        /// Configured maximum.
        max: u64,
    },
    /// A checkpoint id is already in the journal.
    #[error("checkpoint {0} already exists")]
    DuplicateCheckpoint(CheckpointId),
    /// The checkpoint is not in the journal.
    #[error("checkpoint {0} not found")]
    CheckpointNotFound(CheckpointId),
    /// The checkpoint exists but no image can be built at it (promoted past, or not durable yet).
    #[error("checkpoint {id} is not usable: {reason}")]
    CheckpointUnusable {
        /// The checkpoint.
        id: CheckpointId,
        /// Why.
        reason: &'static str,
    },
    /// Promotion cannot go as far as asked because an open image needs the history.
    #[error("promotion to {target} blocked by an open image at sequence {pinned}")]
    Pinned {
        /// The requested promotion point.
        target: Seq,
        /// The oldest sequence an open image needs.
        pinned: Seq,
    },
    /// The configuration is invalid.
    #[error("invalid journal configuration: {0}")]
    Config(String),
    /// A replica file does not match its volume.
    #[error("replica {path} has size {actual}, volume needs {expected}")]
    ReplicaSize {
        /// The replica file.
        path: PathBuf,
        /// Its size on disk.
        actual: u64,
        /// The configured volume size.
        expected: u64,
    },
    /// An earlier write or fsync failed; the journal refuses further work until reopened.
    #[error("journal failed earlier and must be reopened: {0}")]
    Poisoned(Arc<str>),
    /// The journal is shutting down.
    #[error("journal is closed")]
    Closed,
}

impl JournalError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        JournalError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Whether this error means the device is out of space (or quota): writing the same
    /// data again can succeed once space is freed.
    #[must_use]
    pub fn is_out_of_space(&self) -> bool {
        matches!(
            self,
            JournalError::Io { source, .. }
                if source.kind() == io::ErrorKind::StorageFull
                    || source.kind() == io::ErrorKind::QuotaExceeded
        )
    }

    /// Whether this error reports damaged stored data.
    #[must_use]
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            JournalError::Corrupt { .. } | JournalError::CorruptMarker { .. }
        )
    }
}

impl From<JournalError> for io::Error {
    fn from(e: JournalError) -> io::Error {
        let kind = match &e {
            JournalError::Io { source, .. } => source.kind(),
            JournalError::Corrupt { .. } | JournalError::CorruptMarker { .. } => {
                io::ErrorKind::InvalidData
            }
            JournalError::OutOfRange { .. } => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}
