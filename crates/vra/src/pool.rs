//! The VRA-wide replication buffer shared by its protected VPGs: the RAM budget, and the
//! choice of which VPG stops buffering when it runs out (lowest priority first, the one
//! holding the most first), so that a higher-priority VPG keeps streaming.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use tandem_core::vpg::Priority;
use tokio::sync::Semaphore;

use crate::protected::ProtectedShared;

/// The buffer budget and the protected VPGs drawing on it.
#[derive(Debug)]
pub struct BufferPool {
    /// Free bytes, as permits.
    pub budget: Arc<Semaphore>,
    /// The whole budget in bytes.
    pub total: u64,
    members: Mutex<Vec<Weak<ProtectedShared>>>,
}

/// What eviction needs to know of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// Its priority.
    pub priority: Priority,
    /// Buffer bytes it holds.
    pub bytes: u64,
    /// Whether it already tracks writes instead of buffering.
    pub tracking: bool,
}

/// The member that should give up its buffer for a VPG of priority `for_priority`: among
/// those of strictly lower priority that hold bytes and still buffer, the lowest priority,
/// then the most bytes. Pure, for testing.
pub fn pick_victim(members: &[Holding], for_priority: Priority) -> Option<usize> {
    members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.priority < for_priority && m.bytes > 0 && !m.tracking)
        .min_by_key(|(_, m)| (m.priority, std::cmp::Reverse(m.bytes)))
        .map(|(i, _)| i)
}

impl BufferPool {
    /// A pool of `total` bytes.
    pub fn new(total: u64) -> Arc<Self> {
        let permits = usize::try_from(total)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Arc::new(Self {
            budget: Arc::new(Semaphore::new(permits)),
            total,
            members: Mutex::new(Vec::new()),
        })
    }

    /// Adds a protected VPG (dropped VPGs leave by themselves).
    pub fn register(&self, vpg: &Arc<ProtectedShared>) {
        let mut m = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        m.retain(|w| w.strong_count() > 0);
        m.push(Arc::downgrade(vpg));
    }

    /// The VPG that should stop buffering so that one of `priority` can buffer, if any.
    pub fn victim_for(&self, priority: Priority) -> Option<Arc<ProtectedShared>> {
        let live: Vec<Arc<ProtectedShared>> = self
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let holdings: Vec<Holding> = live
            .iter()
            .map(|v| Holding {
                priority: v.assignment.priority,
                bytes: v.positions().bytes,
                tracking: v.sync.tracking(),
            })
            .collect();
        pick_victim(&holdings, priority).map(|i| live[i].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(priority: Priority, bytes: u64, tracking: bool) -> Holding {
        Holding {
            priority,
            bytes,
            tracking,
        }
    }

    #[test]
    fn the_lowest_priority_holding_the_most_goes_first() {
        let m = [
            h(Priority::Medium, 900, false),
            h(Priority::Low, 100, false),
            h(Priority::Low, 500, false),
            h(Priority::Low, 999, true),
            h(Priority::High, 5000, false),
        ];
        assert_eq!(pick_victim(&m, Priority::High), Some(2));
        assert_eq!(pick_victim(&m, Priority::Medium), Some(2));
        assert_eq!(
            pick_victim(&m, Priority::Low),
            None,
            "never an equal priority"
        );
        assert_eq!(pick_victim(&m[..1], Priority::High), Some(0));
        assert_eq!(
            pick_victim(&[h(Priority::Low, 0, false)], Priority::High),
            None
        );
    }
}
