//! [`FaultInjector`]: a shared switchboard of cut links for in-process cluster tests. The
//! sender checks it before every RPC (a cut link is `Unreachable`), and the receiving server
//! checks it against the sender's node id carried in every request (a cut link is refused
//! with `UNAVAILABLE`), so one handle shared by all nodes cuts both directions.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use crate::types::NodeId;

/// Cut (directed) links between Raft nodes. Cloning shares the switchboard.
#[derive(Debug, Clone, Default)]
pub struct FaultInjector {
    cut: Arc<RwLock<BTreeSet<(NodeId, NodeId)>>>,
}

impl FaultInjector {
    /// A switchboard with every link up.
    pub fn new() -> Self {
        Self::default()
    }

    fn update(&self, f: impl FnOnce(&mut BTreeSet<(NodeId, NodeId)>)) {
        let mut cut = self.cut.write().unwrap_or_else(|e| e.into_inner());
        f(&mut cut);
    }

    /// Cuts messages from `from` to `to` (one direction).
    pub fn cut_link(&self, from: NodeId, to: NodeId) {
        tracing::info!(from, to, "fault: link cut");
        self.update(|c| {
            c.insert((from, to));
        });
    }

    /// Restores messages from `from` to `to`.
    pub fn heal_link(&self, from: NodeId, to: NodeId) {
        self.update(|c| {
            c.remove(&(from, to));
        });
    }

    /// Cuts `node` off from every one of `peers`, in both directions.
    pub fn isolate(&self, node: NodeId, peers: impl IntoIterator<Item = NodeId>) {
        let peers: Vec<NodeId> = peers.into_iter().filter(|p| *p != node).collect();
        tracing::info!(node, ?peers, "fault: node isolated");
        self.update(|c| {
            for p in peers {
                c.insert((node, p));
                c.insert((p, node));
            }
        });
    }

    /// Restores every link to and from `node`.
    pub fn heal(&self, node: NodeId) {
        tracing::info!(node, "fault: node healed");
        self.update(|c| c.retain(|(a, b)| *a != node && *b != node));
    }

    /// Restores every link.
    pub fn heal_all(&self) {
        tracing::info!("fault: all links healed");
        self.update(|c| c.clear());
    }

    /// Whether messages from `from` to `to` are cut.
    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.cut
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(from, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolate_cuts_both_directions_and_heal_restores() {
        let f = FaultInjector::new();
        f.isolate(1, [2, 3, 1]);
        assert!(f.is_cut(1, 2) && f.is_cut(2, 1) && f.is_cut(3, 1) && f.is_cut(1, 3));
        assert!(!f.is_cut(2, 3));
        assert!(!f.is_cut(1, 1));
        f.cut_link(2, 3);
        f.heal(1);
        assert!(!f.is_cut(1, 2) && !f.is_cut(3, 1));
        assert!(f.is_cut(2, 3) && !f.is_cut(3, 2));
        f.heal_all();
        assert!(!f.is_cut(2, 3));
    }
}
