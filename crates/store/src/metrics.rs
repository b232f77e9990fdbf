//! [`StoreMetrics`]: a plain snapshot of a node's Raft status for `cluster status`, health
//! checks and tests.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{RaftMetrics, ServerState};
use serde::Serialize;

use crate::types::{NodeId, NodeInfo};

/// The Raft role of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Role {
    /// Leads the cluster: accepts writes and linearizable reads.
    Leader,
    /// A voter following a leader.
    Follower,
    /// A voter campaigning for leadership.
    Candidate,
    /// A non-voting member (or a node not yet part of a cluster).
    Learner,
    /// Shutting down or stopped.
    Shutdown,
}

impl From<ServerState> for Role {
    fn from(s: ServerState) -> Self {
        match s {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        }
    }
}

/// What a node knows about itself and its cluster, at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreMetrics {
    /// This node's id.
    pub node_id: NodeId,
    /// This node's role.
    pub role: Role,
    /// The current term.
    pub term: u64,
    /// The leader this node knows of.
    pub leader_id: Option<NodeId>,
    /// The leader's addresses, when known.
    pub leader: Option<NodeInfo>,
    /// Index of the last entry in the local log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to the local state machine.
    pub last_applied_index: Option<u64>,
    /// Index covered by the local snapshot.
    pub snapshot_index: Option<u64>,
    /// Index up to which the local log has been purged.
    pub purged_index: Option<u64>,
    /// Voting members (of the last config if a joint change is in progress).
    pub voters: BTreeSet<NodeId>,
    /// Non-voting members.
    pub learners: BTreeSet<NodeId>,
    /// Every member's addresses.
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// Set when the Raft task stopped on a fatal error.
    pub fatal: Option<String>,
}

impl From<&RaftMetrics<NodeId, NodeInfo>> for StoreMetrics {
    fn from(m: &RaftMetrics<NodeId, NodeInfo>) -> Self {
        let membership = m.membership_config.membership();
        let nodes: BTreeMap<NodeId, NodeInfo> =
            membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let leader = m.current_leader.and_then(|id| nodes.get(&id).cloned());
        Self {
            node_id: m.id,
            role: m.state.into(),
            term: m.current_term,
            leader_id: m.current_leader,
            leader,
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            nodes,
            fatal: m.running_state.as_ref().err().map(|e| e.to_string()),
        }
    }
}
