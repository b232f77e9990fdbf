//! Durable storage of one Raft node behind a narrow byte-level trait, [`RaftBackend`], with a
//! sled implementation ([`SledBackend`]) and an in-memory one ([`MemoryBackend`]).
//!
//! Everything openraft needs is built once on top of the trait: [`LogStore`] implements
//! `RaftLogStorage` and [`StateMachineStore`] implements `RaftStateMachine`, so both backends
//! share one implementation of the Raft rules and one conformance suite
//! (`openraft::testing::Suite`). Replacing sled means writing one more backend.
//!
//! What is durable: log entries and the vote are flushed before openraft is told they are
//! written; the last purged log id, truncations and snapshots are flushed too. The committed
//! log id is written without a flush (losing it only means re-learning it from the leader).
//! The state machine lives in memory and is persisted as snapshots (site state, last applied
//! log id, last membership); on open it is restored from the last snapshot and openraft
//! re-applies the committed log entries after it.

// openraft's trait methods return its `StorageError` by value; helpers return the same type.
#![allow(
    clippy::result_large_err,
    reason = "openraft's StorageError is large and is what its storage traits return"
)]

mod log_store;
mod memory;
mod sled_backend;
pub(crate) mod state_machine;

use std::future::Future;
use std::ops::Bound;

pub use log_store::LogStore;
pub use memory::MemoryBackend;
pub use sled_backend::SledBackend;
pub use state_machine::{SmSnapshot, StateMachineStore};

/// A small value kept beside the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaKey {
    /// The current vote (term and voted-for).
    Vote,
    /// The last log id known to be committed.
    Committed,
    /// The last purged log id.
    LastPurged,
    /// The current state machine snapshot (metadata and data).
    Snapshot,
    /// A counter making snapshot ids unique.
    SnapshotSeq,
}

impl MetaKey {
    /// The stable on-disk name of the key.
    pub fn as_str(self) -> &'static str {
        match self {
            MetaKey::Vote => "vote",
            MetaKey::Committed => "committed",
            MetaKey::LastPurged => "last_purged",
            MetaKey::Snapshot => "snapshot",
            MetaKey::SnapshotSeq => "snapshot_seq",
        }
    }
}

/// A storage backend failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// sled reported an error.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value could not be decoded.
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// The decoding failure.
        detail: String,
    },
}

/// Byte-level storage of one Raft node: metadata values by key, and log entries by index.
///
/// Writes may be buffered; they are durable once a later [`RaftBackend::flush`] returns.
pub trait RaftBackend: Send + Sync + 'static {
    /// Reads a metadata value.
    fn get_meta(&self, key: MetaKey) -> Result<Option<Vec<u8>>, BackendError>;
    /// Writes a metadata value.
    fn put_meta(&self, key: MetaKey, value: Vec<u8>) -> Result<(), BackendError>;
    /// Writes log entries (index, encoded entry), replacing any at the same index.
    fn append_entries(&self, entries: Vec<(u64, Vec<u8>)>) -> Result<(), BackendError>;
    /// Reads the entries whose index is within the bounds, in index order.
    fn read_entries(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<Vec<(u64, Vec<u8>)>, BackendError>;
    /// The entry with the highest index.
    fn last_entry(&self) -> Result<Option<(u64, Vec<u8>)>, BackendError>;
    /// Removes every entry with an index of `index` or more.
    fn remove_entries_from(&self, index: u64) -> Result<(), BackendError>;
    /// Removes every entry with an index of `index` or less.
    fn remove_entries_through(&self, index: u64) -> Result<(), BackendError>;
    /// Makes every earlier write durable.
    fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send;
}
