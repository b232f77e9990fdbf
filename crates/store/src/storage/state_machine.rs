//! [`StateMachineStore`]: openraft's `RaftStateMachine` over any [`RaftBackend`]. The site state
//! is applied in memory and persisted as snapshots in the backend.

use std::io::Cursor;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};
use tandem_core::state::SiteState;

use super::{BackendError, MetaKey, RaftBackend};
use crate::codec;
use crate::types::{
    ApplyResult, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// The state machine of one node: the site state and what Raft applied to produce it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SmSnapshot {
    /// Log id of the last entry applied.
    pub last_applied: Option<LogId>,
    /// The last membership applied.
    pub last_membership: StoredMembership,
    /// The site state.
    pub state: SiteState,
}

/// A snapshot as kept in the backend.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    /// The site state, as JSON (see `crate::types` on why JSON for domain values).
    data: Vec<u8>,
}

/// Shared, lock-protected state machine contents; readers take the read lock briefly.
pub(crate) type SharedSm = Arc<RwLock<SmSnapshot>>;

pub(crate) fn read_sm(sm: &SharedSm) -> RwLockReadGuard<'_, SmSnapshot> {
    sm.read().unwrap_or_else(|e| e.into_inner())
}

fn write_sm(sm: &SharedSm) -> RwLockWriteGuard<'_, SmSnapshot> {
    sm.write().unwrap_or_else(|e| e.into_inner())
}

/// The state machine of one node, persisted through snapshots in a backend.
#[derive(Debug)]
pub struct StateMachineStore<B> {
    backend: Arc<B>,
    sm: SharedSm,
}

impl<B> Clone for StateMachineStore<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            sm: self.sm.clone(),
        }
    }
}

impl<B: RaftBackend> StateMachineStore<B> {
    /// Opens the state machine, restoring it from the backend's last snapshot if there is one.
    pub fn open(backend: Arc<B>) -> Result<Self, StorageError> {
        let store = Self {
            backend,
            sm: Arc::default(),
        };
        if let Some(stored) = store.stored_snapshot()? {
            let state = decode_state(&stored.meta, &stored.data)?;
            tracing::info!(
                snapshot_id = %stored.meta.snapshot_id,
                last_log_id = ?stored.meta.last_log_id,
                "state machine restored from snapshot"
            );
            *write_sm(&store.sm) = SmSnapshot {
                last_applied: stored.meta.last_log_id,
                last_membership: stored.meta.last_membership,
                state,
            };
        }
        Ok(store)
    }

    /// A copy of the current contents (not linearizable: what this node has applied).
    pub fn current(&self) -> SmSnapshot {
        read_sm(&self.sm).clone()
    }

    pub(crate) fn shared(&self) -> SharedSm {
        self.sm.clone()
    }

    fn stored_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        let Some(bytes) = self
            .backend
            .get_meta(MetaKey::Snapshot)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        else {
            return Ok(None);
        };
        let stored = codec::decode(&bytes).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Some(stored))
    }

    async fn save_snapshot(&self, stored: &StoredSnapshot) -> Result<(), StorageError> {
        let sig = Some(stored.meta.signature());
        let bytes =
            codec::encode(stored).map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        self.backend
            .put_meta(MetaKey::Snapshot, bytes)
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        self.backend
            .flush()
            .await
            .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
        Ok(())
    }

    fn next_snapshot_seq(&self) -> Result<u64, StorageError> {
        let current = match self
            .backend
            .get_meta(MetaKey::SnapshotSeq)
            .map_err(|e| StorageIOError::read(&e))?
        {
            Some(bytes) => codec::decode::<u64>(&bytes).map_err(|e| StorageIOError::read(&e))?,
            None => 0,
        };
        let next = current + 1;
        let bytes = codec::encode(&next).map_err(|e| StorageIOError::write(&e))?;
        self.backend
            .put_meta(MetaKey::SnapshotSeq, bytes)
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(next)
    }
}

fn decode_state(meta: &SnapshotMeta, data: &[u8]) -> Result<SiteState, StorageError> {
    serde_json::from_slice(data).map_err(|e| {
        let e = BackendError::Corrupt {
            what: "snapshot data",
            detail: e.to_string(),
        };
        StorageIOError::read_snapshot(Some(meta.signature()), &e).into()
    })
}

impl<B: RaftBackend> RaftSnapshotBuilder<TypeConfig> for StateMachineStore<B> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Copy under the lock, encode outside it.
        let current = self.current();
        let data = serde_json::to_vec(&current.state)
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        let seq = self.next_snapshot_seq()?;
        let snapshot_id = match current.last_applied {
            Some(last) => format!("{}-{}-{seq}", last.leader_id, last.index),
            None => format!("--{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: current.last_applied,
            last_membership: current.last_membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.save_snapshot(&stored).await?;
        tracing::info!(
            snapshot_id = %meta.snapshot_id,
            bytes = stored.data.len(),
            "snapshot built"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl<B: RaftBackend> RaftStateMachine<TypeConfig> for StateMachineStore<B> {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let sm = read_sm(&self.sm);
        Ok((sm.last_applied, sm.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries = entries.into_iter();
        let mut replies = Vec::with_capacity(entries.size_hint().0);
        let mut sm = write_sm(&self.sm);
        for entry in entries {
            sm.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => ApplyResult(Vec::new()),
                EntryPayload::Normal(p) => ApplyResult(
                    p.into_commands()
                        .into_iter()
                        .map(|c| sm.state.apply(c))
                        .collect(),
                ),
                EntryPayload::Membership(membership) => {
                    sm.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    ApplyResult(Vec::new())
                }
            };
            replies.push(reply);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state = decode_state(meta, &data)?;
        // Durable first: after a crash the node restarts from this snapshot.
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.save_snapshot(&stored).await?;
        *write_sm(&self.sm) = SmSnapshot {
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
            state,
        };
        tracing::info!(
            snapshot_id = %meta.snapshot_id,
            last_log_id = ?meta.last_log_id,
            "snapshot installed"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.stored_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
