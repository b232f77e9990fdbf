//! Journal storage engine of a recovery site: per protected VM, append-only segment files
//! of CRC-framed records (writes, zeroes, trims, checkpoint markers) with contiguous
//! sequence numbers and writer generations, group-commit fsync with separate written and
//! durable positions, crash recovery, an index from checkpoints and regions to journal
//! positions, promotion into replica disks, size limits, and point-in-time images served
//! as NBD block devices with an optional scratch overlay.
//!
//! The VRA opens one [`Journal`] per VM with a [`JournalConfig`], appends with
//! [`Journal::append`] / [`Journal::append_batch`], lists [`Journal::checkpoints`], calls
//! [`Journal::maintain`] periodically, promotes with [`Journal::promote_to_checkpoint`]
//! and exports [`Journal::open_image`] results (they implement
//! [`tandem_nbd::BlockDevice`]); [`Journal::open_latest_image`] opens the newest durable
//! image of a volume (checkpoint or not) for delta sync.
//!
//! `fuzz` (feature `fuzzing`) holds the entry points of the fuzz targets in `fuzz/`.

mod append;
pub mod error;
pub mod extents;
pub mod format;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod journal;
pub mod overlay;
pub mod pit;
pub mod replica;
pub mod segment;
pub mod types;

pub use error::{JournalError, Result};
pub use journal::{
    CheckpointInfo, CheckpointState, DEFAULT_MAX_PAYLOAD, DEFAULT_SEGMENT_SIZE, Durability,
    Journal, JournalConfig, JournalStats, JournalStatus, OpenReport, PromoteReport, SizeLevel,
};
pub use overlay::{DurableOverlay, OVERLAY_BLOCK, OverlayImage};
pub use pit::{ImageOptions, PointInTimeImage};
pub use replica::{ReplicaMarker, VolumeSpec};
pub use types::{
    Checkpoint, CheckpointId, CheckpointKind, Generation, JournalPosition, Record, RecordBody,
    SegmentId, Seq, UnixMillis, VolumeId,
};
