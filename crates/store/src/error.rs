//! Errors of the [`SiteStore`](crate::SiteStore) facade, shaped for the manager: each says
//! whether to forward to the leader, answer `UNAVAILABLE`, or report an unknown outcome.

use std::time::Duration;

use crate::types::{NodeId, NodeInfo};

/// Proposing a command failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader; the command was not applied. Forward it to `leader`.
    #[error("not the leader: forward to node {leader_id} at {}", leader.api_addr)]
    ForwardToLeader {
        /// The leader's node id.
        leader_id: NodeId,
        /// The leader's addresses.
        leader: NodeInfo,
    },
    /// No leader could be found or reached; the command was not applied.
    #[error("no leader available: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// The command could not be encoded for the log; it was not applied.
    #[error("cannot encode the command: {0}")]
    Encode(String),
    /// The command was submitted but no outcome came back in time: it may or may not be
    /// applied (now or later).
    #[error("no outcome within {0:?}; the command may or may not be applied")]
    Timeout(Duration),
    /// The Raft node stopped (shutdown or a storage failure); an in-flight command may or
    /// may not be applied.
    #[error("raft node stopped: {0}")]
    Stopped(String),
}

/// A linearizable read failed; nothing stale was returned.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    /// This node is not the leader; read from `leader`.
    #[error("not the leader: read from node {leader_id} at {}", leader.api_addr)]
    ForwardToLeader {
        /// The leader's node id.
        leader_id: NodeId,
        /// The leader's addresses.
        leader: NodeInfo,
    },
    /// No leader could be found, or leadership could not be confirmed in time.
    #[error("no leader available: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// The Raft node stopped.
    #[error("raft node stopped: {0}")]
    Stopped(String),
}

/// A membership change failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MembershipError {
    /// This node is not the leader; send the change to `leader`.
    #[error("not the leader: forward to node {leader_id} at {}", leader.api_addr)]
    ForwardToLeader {
        /// The leader's node id.
        leader_id: NodeId,
        /// The leader's addresses.
        leader: NodeInfo,
    },
    /// The change is not allowed now (another change in progress, unknown learner, empty
    /// voter set).
    #[error("membership change rejected: {0}")]
    Rejected(String),
    /// No leader available; nothing changed.
    #[error("no leader available: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// No outcome in time; the change may or may not take effect.
    #[error("membership change not confirmed within {0:?}")]
    Timeout(Duration),
    /// The Raft node stopped.
    #[error("raft node stopped: {0}")]
    Stopped(String),
}

/// Bootstrapping the cluster failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InitError {
    /// This node is not among the initial members.
    #[error("this node is not among the initial members: {0}")]
    NotInMembers(String),
    /// The Raft node stopped.
    #[error("raft node stopped: {0}")]
    Stopped(String),
}

/// Opening the store failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The configuration is invalid.
    #[error("invalid store config: {0}")]
    Config(String),
    /// The data directory could not be prepared.
    #[error("data directory {dir}: {source}")]
    Io {
        /// The directory.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The storage backend failed to open.
    #[error(transparent)]
    Backend(#[from] crate::storage::BackendError),
    /// The stored log or state machine could not be loaded.
    #[error("loading raft state: {0}")]
    Storage(String),
}

/// Shutting down failed (the Raft task panicked); storage was still flushed if possible.
#[derive(Debug, Clone, thiserror::Error)]
#[error("shutdown: {0}")]
pub struct ShutdownError(pub String);
