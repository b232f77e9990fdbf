//! [`LogStore`]: openraft's `RaftLogStorage` over any [`RaftBackend`].

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError, Vote};
use tokio::sync::mpsc;

use super::{BackendError, MetaKey, RaftBackend};
use crate::codec;
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

/// The Raft log, vote and committed log id of one node.
#[derive(Debug)]
pub struct LogStore<B> {
    backend: Arc<B>,
    /// Appended batches waiting for their fsync; see [`group_flusher`].
    flushes: mpsc::UnboundedSender<LogFlushed<TypeConfig>>,
}

impl<B> Clone for LogStore<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            flushes: self.flushes.clone(),
        }
    }
}

/// Makes appended entries durable off openraft's core loop: one flush covers every batch
/// appended before it started, and callbacks complete in append order. Awaiting the fsync
/// inside `append` would stall the Raft core (heartbeats, replication replies, new client
/// writes) for every fsync. The task ends when the last `LogStore` clone is dropped.
async fn group_flusher<B: RaftBackend>(
    backend: Arc<B>,
    mut pending: mpsc::UnboundedReceiver<LogFlushed<TypeConfig>>,
) {
    while let Some(first) = pending.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = pending.try_recv() {
            batch.push(more);
        }
        let result = backend.flush().await;
        for callback in batch {
            match &result {
                Ok(()) => callback.log_io_completed(Ok(())),
                Err(e) => callback.log_io_completed(Err(io_err(e))),
            }
        }
    }
}

fn io_err(e: &(impl std::error::Error + 'static)) -> io::Error {
    io::Error::other(e.to_string())
}

impl<B: RaftBackend> LogStore<B> {
    /// Opens the log on a backend and finishes an interrupted purge (entries at or below the
    /// last purged log id that are still present are removed).
    pub fn open(backend: Arc<B>) -> Result<Self, StorageError> {
        let (flushes, pending) = mpsc::unbounded_channel();
        tokio::spawn(group_flusher(backend.clone(), pending));
        let store = Self { backend, flushes };
        if let Some(purged) = store.read_meta::<LogId>(MetaKey::LastPurged)? {
            store
                .backend
                .remove_entries_through(purged.index)
                .map_err(|e| StorageIOError::write_logs(&e))?;
        }
        Ok(store)
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: MetaKey,
    ) -> Result<Option<T>, StorageError> {
        let Some(bytes) = self
            .backend
            .get_meta(key)
            .map_err(|e| StorageIOError::read(&e))?
        else {
            return Ok(None);
        };
        let value = codec::decode(&bytes).map_err(|e| StorageIOError::read(&e))?;
        Ok(Some(value))
    }

    fn write_meta<T: serde::Serialize>(&self, key: MetaKey, value: &T) -> Result<(), BackendError> {
        let bytes = codec::encode(value).map_err(|e| BackendError::Corrupt {
            what: key.as_str(),
            detail: e.to_string(),
        })?;
        self.backend.put_meta(key, bytes)
    }

    fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, StorageError> {
        let entry: Entry = codec::decode(bytes).map_err(|e| StorageIOError::read_logs(&e))?;
        if entry.log_id.index != index {
            let e = BackendError::Corrupt {
                what: "log entry",
                detail: format!("stored at index {index} but holds {}", entry.log_id),
            };
            return Err(StorageIOError::read_logs(&e).into());
        }
        Ok(entry)
    }
}

impl<B: RaftBackend> RaftLogReader<TypeConfig> for LogStore<B> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        let raw = self
            .backend
            .read_entries(start, end)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        raw.iter()
            .map(|(index, bytes)| Self::decode_entry(*index, bytes))
            .collect()
    }
}

impl<B: RaftBackend> RaftLogStorage<TypeConfig> for LogStore<B> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(MetaKey::LastPurged)?;
        let last = self
            .backend
            .last_entry()
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let last_log_id = match last {
            Some((index, bytes)) => Some(Self::decode_entry(index, &bytes)?.log_id),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last_log_id.max(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.write_meta(MetaKey::Vote, vote)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        self.backend
            .flush()
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.read_meta(MetaKey::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed: a lost committed id is re-learned from the leader; the next flush of
        // entries or vote persists it anyway.
        self.write_meta(MetaKey::Committed, &committed)
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .read_meta::<Option<LogId>>(MetaKey::Committed)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes = codec::encode(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            encoded.push((entry.log_id.index, bytes));
        }
        if let Err(e) = self.backend.append_entries(encoded) {
            callback.log_io_completed(Err(io_err(&e)));
            return Err(StorageIOError::write_logs(&e).into());
        }
        // openraft may only count entries once they are durable: the flusher calls back
        // after the fsync that covers them.
        if let Err(mpsc::error::SendError(callback)) = self.flushes.send(callback) {
            let e = io::Error::other("log flusher stopped");
            callback.log_io_completed(Err(io::Error::other("log flusher stopped")));
            return Err(StorageIOError::write_logs(&e).into());
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(since = %log_id, "truncate raft log");
        self.backend
            .remove_entries_from(log_id.index)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.backend
            .flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(upto = %log_id, "purge raft log");
        // Record the purge point first: a crash in between leaves entries that `open` removes.
        self.write_meta(MetaKey::LastPurged, &log_id)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.backend
            .remove_entries_through(log_id.index)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.backend
            .flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
