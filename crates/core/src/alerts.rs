//! Alerts: raised while a VPG's status shows a problem an operator must look at, cleared
//! when it goes. Derived from the one status snapshot, never stored apart from it.

use serde::{Deserialize, Serialize};

use crate::status::{Fault, VpgObservation};

/// What an alert is about. Codes are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AlertKind {
    RpoOverTarget,
    HistoryShort,
    StorageError,
    SiteDisconnected,
    VraError,
    ProtectionPaused,
    TestOverdue,
}

/// How bad it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Severity {
    Warning,
    Error,
}

impl AlertKind {
    pub fn code(self) -> &'static str {
        match self {
            Self::RpoOverTarget => "AL0001",
            Self::HistoryShort => "AL0002",
            Self::StorageError => "AL0003",
            Self::SiteDisconnected => "AL0004",
            Self::VraError => "AL0005",
            Self::ProtectionPaused => "AL0006",
            Self::TestOverdue => "AL0007",
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            Self::RpoOverTarget
            | Self::HistoryShort
            | Self::ProtectionPaused
            | Self::TestOverdue => Severity::Warning,
            Self::StorageError | Self::SiteDisconnected | Self::VraError => Severity::Error,
        }
    }

    pub fn summary(self) -> &'static str {
        match self {
            Self::RpoOverTarget => "actual RPO is above the target RPO",
            Self::HistoryShort => "the journal does not hold the configured history",
            Self::StorageError => "a journal or recovery storage error stops replication",
            Self::SiteDisconnected => "the peer site cannot be reached",
            Self::VraError => "a VRA of the VPG cannot be reached or does not protect it",
            Self::ProtectionPaused => "protection is paused",
            Self::TestOverdue => "no failover test within the VPG's test reminder interval",
        }
    }
}

/// The alerts a VPG's observation raises, in a stable order.
pub fn alerts(o: &VpgObservation) -> Vec<AlertKind> {
    let mut out = Vec::new();
    let has = |f: &[Fault]| o.faults.iter().any(|x| f.contains(x));
    // A VPG without any checkpoint yet (creating) is not late: its RPO starts at the first.
    if o.actual_rpo_secs.is_some_and(|r| r > o.target_rpo_secs) {
        out.push(AlertKind::RpoOverTarget);
    }
    if !o.history_met {
        out.push(AlertKind::HistoryShort);
    }
    if has(&[
        Fault::JournalStorage,
        Fault::RecoveryStorage,
        Fault::RecoveryStorageProfile,
    ]) {
        out.push(AlertKind::StorageError);
    }
    if has(&[Fault::SiteDisconnected, Fault::ProtectedSiteDown]) {
        out.push(AlertKind::SiteDisconnected);
    }
    if has(&[Fault::Error, Fault::VmNotProtected]) {
        out.push(AlertKind::VraError);
    }
    if o.pause.is_some() {
        out.push(AlertKind::ProtectionPaused);
    }
    if o.test_overdue {
        out.push(AlertKind::TestOverdue);
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Pause;

    fn healthy() -> VpgObservation {
        VpgObservation {
            vm_count: 1,
            operation: None,
            sync: None,
            forced: false,
            pause: None,
            faults: Vec::new(),
            backup_running: false,
            actual_rpo_secs: Some(3),
            target_rpo_secs: 10,
            history_met: true,
            has_checkpoints: true,
            after_rollback: false,
            test_overdue: false,
        }
    }

    #[test]
    fn a_healthy_vpg_raises_nothing() {
        assert!(alerts(&healthy()).is_empty());
        let mut o = healthy();
        o.actual_rpo_secs = None;
        assert!(alerts(&o).is_empty(), "no checkpoint yet is not a late RPO");
    }

    #[test]
    fn each_problem_raises_its_alert() {
        let mut o = healthy();
        o.actual_rpo_secs = Some(11);
        assert_eq!(alerts(&o), [AlertKind::RpoOverTarget]);
        let mut o = healthy();
        o.history_met = false;
        assert_eq!(alerts(&o), [AlertKind::HistoryShort]);
        let mut o = healthy();
        o.test_overdue = true;
        assert_eq!(alerts(&o), [AlertKind::TestOverdue]);
        assert_eq!(AlertKind::TestOverdue.code(), "AL0007");
        let mut o = healthy();
        o.faults = vec![Fault::RecoveryStorage, Fault::SiteDisconnected];
        assert_eq!(
            alerts(&o),
            [AlertKind::StorageError, AlertKind::SiteDisconnected]
        );
        let mut o = healthy();
        o.faults = vec![Fault::ProtectedSiteDown];
        assert_eq!(alerts(&o), [AlertKind::SiteDisconnected]);
        let mut o = healthy();
        o.pause = Some(Pause::User);
        assert_eq!(alerts(&o), [AlertKind::ProtectionPaused]);
        assert_eq!(AlertKind::ProtectionPaused.severity(), Severity::Warning);
        assert_eq!(AlertKind::StorageError.severity(), Severity::Error);
    }
}
