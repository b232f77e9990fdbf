//! The site's event log: every operation and status transition, with a stable code, kept
//! in the replicated state as a bounded history (the oldest go first).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::ids::VpgId;

/// Events kept per site; older ones are dropped.
pub const MAX_EVENTS: usize = 5000;

/// What happened. Codes are stable: operators and scripts match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventCode {
    VpgCreated,
    VpgEdited,
    VpgDeleteStarted,
    VpgDeleted,
    VpgDeleteFailed,
    ProtectionPaused,
    ProtectionResumed,
    ForceSyncStarted,
    CheckpointAdded,
    StatusChanged,
    /// The seed's EV0040: recovery disks kept when VMs left protection; the description
    /// names their locations.
    RecoveryDisksKept,
    PeerBandwidthLimitSet,
    /// The two sites' copies of a definition differed and were brought in line.
    DefinitionReconciled,
    SiteUnpaired,
    /// A protected VM's volumes (or memory) changed in the inventory and its VPG follows.
    VpgFollowedInventory,
    /// The site manager paused protection for the VPG's replication pause time.
    ProtectionPausedByManager,
    /// The site manager's pause ended (its time was over).
    ProtectionResumedByManager,
    /// A failover test started (the description names its checkpoint).
    FailoverTestStarted,
    /// A failover test stopped (the description gives its verdict and the operator's note).
    FailoverTestStopped,
    /// A failover or move started (the description names its checkpoint).
    RecoveryStarted,
    /// A failover or move was committed: the VMs run at the recovery site.
    RecoveryCommitted,
    /// A failover or move was rolled back: everything is as it was before it.
    RecoveryRolledBack,
    /// A committed failover or move turned the VPG around: the recovered VMs are protected
    /// towards the old protected site, or that site took the new direction.
    ReverseProtection,
    /// An operator's call that changes the site (the audit trail): the description names
    /// the caller's token, the call and its outcome.
    OperatorCall,
    /// A manager or a VRA exchanged a join token for its certificate.
    NodeEnrolled,
    /// A rotation of the site's CA started: the new CA is trusted everywhere first.
    CaRotationStarted,
    /// The new CA issues; certificates of the old one are renewed.
    CaIssuing,
    /// The old CA is retired from every trust store.
    CaRetired,
    /// This site stood a VPG down: another site recovered it (or deleted it after running
    /// its VMs); its VRAs take no writes to the VPG's volumes and stop replicating.
    StoodDown,
    /// What a stood-down VPG's VMs wrote here that the other site does not hold, per
    /// volume (kept on this site's disks until the operator chooses).
    Divergence,
    /// The peer rolled back the recovery this site stood down for: protection resumes.
    StoodUp,
}

impl EventCode {
    pub const ALL: [EventCode; 31] = [
        Self::VpgCreated,
        Self::VpgEdited,
        Self::VpgDeleteStarted,
        Self::VpgDeleted,
        Self::VpgDeleteFailed,
        Self::ProtectionPaused,
        Self::ProtectionResumed,
        Self::ForceSyncStarted,
        Self::CheckpointAdded,
        Self::StatusChanged,
        Self::RecoveryDisksKept,
        Self::PeerBandwidthLimitSet,
        Self::DefinitionReconciled,
        Self::SiteUnpaired,
        Self::VpgFollowedInventory,
        Self::ProtectionPausedByManager,
        Self::ProtectionResumedByManager,
        Self::FailoverTestStarted,
        Self::FailoverTestStopped,
        Self::RecoveryStarted,
        Self::RecoveryCommitted,
        Self::RecoveryRolledBack,
        Self::ReverseProtection,
        Self::OperatorCall,
        Self::NodeEnrolled,
        Self::CaRotationStarted,
        Self::CaIssuing,
        Self::CaRetired,
        Self::StoodDown,
        Self::Divergence,
        Self::StoodUp,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Self::VpgCreated => "EV0001",
            Self::VpgEdited => "EV0002",
            Self::VpgDeleteStarted => "EV0003",
            Self::VpgDeleted => "EV0004",
            Self::VpgDeleteFailed => "EV0005",
            Self::ProtectionPaused => "EV0010",
            Self::ProtectionResumed => "EV0011",
            Self::ForceSyncStarted => "EV0012",
            Self::CheckpointAdded => "EV0020",
            Self::StatusChanged => "EV0030",
            Self::RecoveryDisksKept => "EV0040",
            Self::PeerBandwidthLimitSet => "EV0050",
            Self::DefinitionReconciled => "EV0006",
            Self::SiteUnpaired => "EV0051",
            Self::VpgFollowedInventory => "EV0007",
            Self::ProtectionPausedByManager => "EV0013",
            Self::ProtectionResumedByManager => "EV0014",
            Self::FailoverTestStarted => "EV0060",
            Self::FailoverTestStopped => "EV0061",
            Self::RecoveryStarted => "EV0062",
            Self::RecoveryCommitted => "EV0063",
            Self::RecoveryRolledBack => "EV0064",
            Self::ReverseProtection => "EV0065",
            Self::OperatorCall => "EV0070",
            Self::NodeEnrolled => "EV0071",
            Self::CaRotationStarted => "EV0072",
            Self::CaIssuing => "EV0073",
            Self::CaRetired => "EV0074",
            Self::StoodDown => "EV0066",
            Self::Divergence => "EV0067",
            Self::StoodUp => "EV0068",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }
}

/// One event as proposed (the log gives it its id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    pub at_ms: u64,
    pub code: EventCode,
    pub vpg: Option<VpgId>,
    pub description: String,
}

/// One event in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing from 1 over the life of the site (never reused after drops).
    pub id: u64,
    pub at_ms: u64,
    pub code: EventCode,
    pub vpg: Option<VpgId>,
    pub description: String,
}

/// The bounded log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventLog {
    events: VecDeque<Event>,
    next_id: u64,
}

impl EventLog {
    /// Appends `e`; answers its id.
    pub fn push(&mut self, e: NewEvent) -> u64 {
        self.next_id = self.next_id.max(1);
        let id = self.next_id;
        self.next_id += 1;
        self.events.push_back(Event {
            id,
            at_ms: e.at_ms,
            code: e.code,
            vpg: e.vpg,
            description: e.description,
        });
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
        id
    }

    /// Oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Event> {
        self.events.iter()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: u64) -> NewEvent {
        NewEvent {
            at_ms: i,
            code: EventCode::VpgCreated,
            vpg: None,
            description: format!("e{i}"),
        }
    }

    #[test]
    fn the_log_is_bounded_and_ids_keep_increasing() {
        let mut log = EventLog::default();
        for i in 0..(MAX_EVENTS as u64 + 10) {
            assert_eq!(log.push(ev(i)), i + 1);
        }
        assert_eq!(log.len(), MAX_EVENTS);
        assert_eq!(log.iter().next().map(|e| e.id), Some(11));
        assert_eq!(
            log.iter().last().map(|e| e.id),
            Some(MAX_EVENTS as u64 + 10)
        );
    }

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in EventCode::ALL {
            assert!(seen.insert(c.code()), "{c:?}");
            assert_eq!(EventCode::from_code(c.code()), Some(c));
        }
        assert_eq!(EventCode::RecoveryDisksKept.code(), "EV0040");
    }
}
