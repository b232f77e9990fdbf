//! sled [`RaftBackend`]: two trees in one database, `raft_meta` (values by key name) and
//! `raft_log` (entries by big-endian index, so key order is index order).

use std::ops::Bound;
use std::path::Path;

use super::memory::range_is_empty;
use super::{BackendError, MetaKey, RaftBackend};

const META_TREE: &str = "raft_meta";
const LOG_TREE: &str = "raft_log";
/// sled's page cache budget. The site state is small; this bounds memory, not disk.
const CACHE_CAPACITY: u64 = 64 * 1024 * 1024;
/// sled's IO buffer size. sled stores any value over a quarter of it as a file of its own
/// (created, fsynced, later unlinked): at sled's default (512 KiB) group-committed log
/// entries of over 128 KiB did so, and file churn took a large share of a busy leader's
/// time. At 4 MiB every entry the batcher makes (at most 512 KiB) stays inline.
const SEGMENT_SIZE: usize = 4 << 20;

/// The IO buffer size an existing database was created with (sled refuses another one).
fn persisted_segment_size(dir: &Path) -> Option<usize> {
    let conf = std::fs::read_to_string(dir.join("conf")).ok()?;
    conf.lines()
        .find_map(|l| l.strip_prefix("segment_size:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A sled database holding one node's Raft log, vote and snapshots.
#[derive(Debug, Clone)]
pub struct SledBackend {
    db: sled::Db,
    meta: sled::Tree,
    log: sled::Tree,
}

impl SledBackend {
    /// Opens (or creates) the database in `dir`. Fails if another handle holds it open.
    pub fn open(dir: &Path) -> Result<Self, BackendError> {
        let db = sled::Config::new()
            .path(dir)
            .segment_size(persisted_segment_size(dir).unwrap_or(SEGMENT_SIZE))
            .cache_capacity(CACHE_CAPACITY)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let meta = db.open_tree(META_TREE)?;
        let log = db.open_tree(LOG_TREE)?;
        tracing::debug!(dir = %dir.display(), recovered = db.was_recovered(), "sled store opened");
        Ok(Self { db, meta, log })
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, BackendError> {
        Ok(self.db.size_on_disk()?)
    }

    /// Synchronously flushes every buffered write to disk.
    pub fn flush_blocking(&self) -> Result<(), BackendError> {
        self.db.flush()?;
        Ok(())
    }

    fn remove_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        if range_is_empty(start, end) {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for item in self.log.range((key_bound(start), key_bound(end))) {
            let (key, _) = item?;
            batch.remove(key);
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_bound(b: Bound<u64>) -> Bound<[u8; 8]> {
    match b {
        Bound::Included(i) => Bound::Included(key(i)),
        Bound::Excluded(i) => Bound::Excluded(key(i)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

fn index_of(k: &[u8]) -> Result<u64, BackendError> {
    let bytes: [u8; 8] = k.try_into().map_err(|_| BackendError::Corrupt {
        what: "log key",
        detail: format!("{} bytes, want 8", k.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

impl RaftBackend for SledBackend {
    fn get_meta(&self, key: MetaKey) -> Result<Option<Vec<u8>>, BackendError> {
        Ok(self.meta.get(key.as_str())?.map(|v| v.to_vec()))
    }

    fn put_meta(&self, key: MetaKey, value: Vec<u8>) -> Result<(), BackendError> {
        self.meta.insert(key.as_str(), value)?;
        Ok(())
    }

    fn append_entries(&self, entries: Vec<(u64, Vec<u8>)>) -> Result<(), BackendError> {
        let mut batch = sled::Batch::default();
        for (index, value) in entries {
            batch.insert(&key(index), value);
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }

    fn read_entries(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<Vec<(u64, Vec<u8>)>, BackendError> {
        if range_is_empty(start, end) {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for item in self.log.range((key_bound(start), key_bound(end))) {
            let (k, v) = item?;
            out.push((index_of(&k)?, v.to_vec()));
        }
        Ok(out)
    }

    fn last_entry(&self) -> Result<Option<(u64, Vec<u8>)>, BackendError> {
        match self.log.last()? {
            Some((k, v)) => Ok(Some((index_of(&k)?, v.to_vec()))),
            None => Ok(None),
        }
    }

    fn remove_entries_from(&self, index: u64) -> Result<(), BackendError> {
        self.remove_range(Bound::Included(index), Bound::Unbounded)
    }

    fn remove_entries_through(&self, index: u64) -> Result<(), BackendError> {
        self.remove_range(Bound::Unbounded, Bound::Included(index))
    }

    async fn flush(&self) -> Result<(), BackendError> {
        // Flushes the whole page cache (every tree) and fsyncs.
        self.db.flush_async().await?;
        Ok(())
    }
}
