//! [`LogStore`]: openraft's `RaftLogStorage` over any [`RaftBackend`].

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError, Vote};
use tokio::sync::{mpsc, oneshot};

use super::{BackendError, MetaKey, RaftBackend};
use crate::codec;
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

/// How many of the newest entries are kept decoded in memory, so that replication to
/// followers (which rereads what was just appended) does not go back to the backend.
const RECENT_ENTRIES: usize = 8192;

/// The Raft log, vote and committed log id of one node.
#[derive(Debug)]
pub struct LogStore<B> {
    backend: Arc<B>,
    /// Appended batches on their way to the backend; see [`log_writer`].
    writes: mpsc::UnboundedSender<LogOp>,
    /// The newest appended entries, a contiguous run ending at the last log entry. Entries
    /// not yet written to the backend are always here; older ones may be evicted.
    recent: Arc<Mutex<Recent>>,
}

/// The in-memory tail of the log.
#[derive(Debug, Default)]
struct Recent {
    entries: BTreeMap<u64, Entry>,
    /// The highest index written to the backend (entries above it live only here).
    written: u64,
}

/// Work for the log writer, in append order.
enum LogOp {
    Append {
        entries: Vec<(u64, Vec<u8>)>,
        callback: LogFlushed<TypeConfig>,
    },
    /// Answered once every append queued before it is written and flushed.
    Barrier(oneshot::Sender<Result<(), String>>),
}

impl<B> Clone for LogStore<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            writes: self.writes.clone(),
            recent: self.recent.clone(),
        }
    }
}

fn io_err(e: &(impl std::error::Error + 'static)) -> io::Error {
    io::Error::other(e.to_string())
}

/// Writes appended entries to the backend and makes them durable, off openraft's core
/// loop: everything queued while a write and fsync run goes into the next one, and callbacks
/// complete in append order. Doing backend writes and fsyncs inside `append` stalled the
/// Raft core (heartbeats, replication replies, new client writes) on every entry. The task
/// ends when the last `LogStore` clone is dropped.
async fn log_writer<B: RaftBackend>(
    backend: Arc<B>,
    recent: Arc<Mutex<Recent>>,
    mut ops: mpsc::UnboundedReceiver<LogOp>,
) {
    while let Some(first) = ops.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = ops.try_recv() {
            batch.push(more);
        }
        let mut entries = Vec::new();
        let mut callbacks = Vec::new();
        let mut barriers = Vec::new();
        for op in batch {
            match op {
                LogOp::Append {
                    entries: e,
                    callback,
                } => {
                    entries.extend(e);
                    callbacks.push(callback);
                }
                LogOp::Barrier(done) => barriers.push(done),
            }
        }
        let last = entries.last().map(|(i, _)| *i);
        let mut result = if entries.is_empty() {
            Ok(())
        } else {
            backend.append_entries(entries)
        };
        if result.is_ok() {
            result = backend.flush().await;
        }
        if let (Ok(()), Some(last)) = (&result, last) {
            let mut recent = recent.lock().expect("log cache poisoned");
            recent.written = recent.written.max(last);
            let written = recent.written;
            while recent.entries.len() > RECENT_ENTRIES {
                match recent.entries.first_key_value() {
                    Some((&oldest, _)) if oldest <= written => {
                        recent.entries.pop_first();
                    }
                    _ => break,
                }
            }
        }
        for callback in callbacks {
            match &result {
                Ok(()) => callback.log_io_completed(Ok(())),
                Err(e) => callback.log_io_completed(Err(io_err(e))),
            }
        }
        for done in barriers {
            let _ = done.send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
    }
}

impl<B: RaftBackend> LogStore<B> {
    /// Opens the log on a backend and finishes an interrupted purge (entries at or below the
    /// last purged log id that are still present are removed).
    pub fn open(backend: Arc<B>) -> Result<Self, StorageError> {
        let (writes, pending) = mpsc::unbounded_channel();
        let recent: Arc<Mutex<Recent>> = Arc::default();
        tokio::spawn(log_writer(backend.clone(), recent.clone(), pending));
        let store = Self {
            backend,
            writes,
            recent,
        };
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

    /// Waits until every entry appended so far is in the backend and durable.
    async fn barrier(&self) -> Result<(), StorageError> {
        let (done, wait) = oneshot::channel();
        let stopped = || {
            let e = io::Error::other("log writer stopped");
            StorageError::from(StorageIOError::write_logs(&e))
        };
        self.writes
            .send(LogOp::Barrier(done))
            .map_err(|_| stopped())?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(StorageIOError::write_logs(&io::Error::other(msg)).into()),
            Err(_) => Err(stopped()),
        }
    }
}

impl<B: RaftBackend> RaftLogReader<TypeConfig> for LogStore<B> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        {
            let recent = self.recent.lock().expect("log cache poisoned");
            let first = match start {
                Bound::Included(i) => Some(i),
                Bound::Excluded(i) => i.checked_add(1),
                Bound::Unbounded => None,
            };
            // Served from memory when the cache holds the start of the range (the run is
            // contiguous up to the last entry, so it then holds all of it).
            if let (Some(first), Some(oldest)) = (first, recent.entries.keys().next())
                && first >= *oldest
            {
                return Ok(recent
                    .entries
                    .range((start, end))
                    .map(|(_, e)| e.clone())
                    .collect());
            }
        }
        let raw = self
            .backend
            .read_entries(start, end)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let mut out = std::collections::BTreeMap::new();
        for (index, bytes) in &raw {
            out.insert(*index, Self::decode_entry(*index, bytes)?);
        }
        // Entries not yet written to the backend come from memory.
        let recent = self.recent.lock().expect("log cache poisoned");
        for (index, entry) in recent.entries.range((start, end)) {
            out.entry(*index).or_insert_with(|| entry.clone());
        }
        Ok(out.into_values().collect())
    }
}

impl<B: RaftBackend> RaftLogStorage<TypeConfig> for LogStore<B> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(MetaKey::LastPurged)?;
        let newest = self
            .recent
            .lock()
            .expect("log cache poisoned")
            .entries
            .last_key_value()
            .map(|(_, e)| e.log_id);
        if let Some(newest) = newest {
            return Ok(LogState {
                last_purged_log_id,
                last_log_id: Some(newest).max(last_purged_log_id),
            });
        }
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
        let mut decoded = Vec::new();
        for entry in entries {
            let bytes = codec::encode(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            encoded.push((entry.log_id.index, bytes));
            decoded.push(entry);
        }
        {
            let mut recent = self.recent.lock().expect("log cache poisoned");
            for entry in decoded {
                // A gap (after a purge or snapshot install) restarts the contiguous run.
                if let Some((&last, _)) = recent.entries.last_key_value()
                    && entry.log_id.index != last + 1
                {
                    recent.entries.clear();
                }
                recent.entries.insert(entry.log_id.index, entry);
            }
        }
        // openraft may only count entries once they are durable: the writer calls back after
        // the fsync that covers them.
        if let Err(mpsc::error::SendError(op)) = self.writes.send(LogOp::Append {
            entries: encoded,
            callback,
        }) {
            let e = io::Error::other("log writer stopped");
            if let LogOp::Append { callback, .. } = op {
                callback.log_io_completed(Err(io::Error::other("log writer stopped")));
            }
            return Err(StorageIOError::write_logs(&e).into());
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(since = %log_id, "truncate raft log");
        self.barrier().await?;
        self.recent
            .lock()
            .expect("log cache poisoned")
            .entries
            .retain(|&i, _| i < log_id.index);
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
        self.barrier().await?;
        self.recent
            .lock()
            .expect("log cache poisoned")
            .entries
            .retain(|&i, _| i > log_id.index);
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
