//! Newtypes for the journal's identifiers and positions, and the record bodies that
//! callers append (writes, zeroes, trims and checkpoint markers).

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Sequence number of a journal record. Contiguous: every record takes the next one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

impl Seq {
    /// The highest sequence number a record may carry (the one after it must exist).
    pub const MAX: Seq = Seq(u64::MAX - 1);

    /// The sequence number after this one.
    #[must_use]
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Writer generation carried by every record; a record from an older generation than
/// the journal has seen is refused (fencing of stale senders).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Identifier of a segment file; segments of one journal are numbered upwards.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct SegmentId(pub u64);

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Identifier of a checkpoint, assigned by the protected site's manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CheckpointId(pub u64);

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Identifier of a volume within a VM (a VM has at most 60: 4 controllers x 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VolumeId(pub u32);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A byte position in the journal: segment and offset within its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JournalPosition {
    /// Segment holding the position.
    pub segment: SegmentId,
    /// Byte offset within the segment file.
    pub offset: u64,
}

impl fmt::Display for JournalPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

/// Unix time in milliseconds.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// The current wall-clock time.
    #[must_use]
    pub fn now() -> UnixMillis {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        UnixMillis(u64::try_from(ms).unwrap_or(u64::MAX))
    }
}

/// How a checkpoint was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CheckpointKind {
    /// Taken every few seconds by the checkpoint coordinator.
    Automatic,
    /// Added by an operator, usually named.
    Manual,
    /// Requested by an agent in a VM after quiescing its applications.
    ApplicationConsistent,
}

impl CheckpointKind {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            CheckpointKind::Automatic => 1,
            CheckpointKind::Manual => 2,
            CheckpointKind::ApplicationConsistent => 3,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Option<CheckpointKind> {
        match v {
            1 => Some(CheckpointKind::Automatic),
            2 => Some(CheckpointKind::Manual),
            3 => Some(CheckpointKind::ApplicationConsistent),
            _ => None,
        }
    }
}

/// A checkpoint marker as appended to the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Identifier, unique within the journal.
    pub id: CheckpointId,
    /// One timestamp for every VM of the VPG, stamped by the protected site manager.
    pub timestamp: UnixMillis,
    /// How it was taken.
    pub kind: CheckpointKind,
    /// Operator-given name (manual checkpoints).
    pub name: Option<String>,
    /// The VM whose agent requested it (application-consistent checkpoints).
    pub vm: Option<String>,
}

/// The body of a record the caller appends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordBody {
    /// Data written to a volume.
    Write {
        /// Target volume.
        volume: VolumeId,
        /// Byte offset in the volume.
        offset: u64,
        /// The bytes written.
        data: Bytes,
    },
    /// A range of a volume set to zeroes (NBD WRITE_ZEROES).
    Zero {
        /// Target volume.
        volume: VolumeId,
        /// Byte offset in the volume.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A range of a volume discarded (NBD TRIM); images read it back as zeroes.
    Trim {
        /// Target volume.
        volume: VolumeId,
        /// Byte offset in the volume.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A checkpoint marker.
    Checkpoint(Checkpoint),
}

impl RecordBody {
    /// The volume range this record changes, if it is a data record.
    #[must_use]
    pub fn volume_range(&self) -> Option<(VolumeId, u64, u64)> {
        match self {
            RecordBody::Write {
                volume,
                offset,
                data,
            } => Some((*volume, *offset, data.len() as u64)),
            RecordBody::Zero {
                volume,
                offset,
                len,
            }
            | RecordBody::Trim {
                volume,
                offset,
                len,
            } => Some((*volume, *offset, *len)),
            RecordBody::Checkpoint(_) => None,
        }
    }
}

/// A record read back from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its sequence number.
    pub seq: Seq,
    /// The generation of the writer that appended it.
    pub generation: Generation,
    /// Where its frame starts.
    pub position: JournalPosition,
    /// Its body.
    pub body: RecordBody,
}
