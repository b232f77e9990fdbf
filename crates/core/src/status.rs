//! The seed's VPG statuses, substatuses, alert colours and synchronization triggers, with
//! their exact display strings, and the function that derives a VPG's status from what is
//! observed about it.
//!
//! One deliberate wording change: the seed's "Zerto Virtual Manager paused protection" is
//! shown as "Site Manager paused protection" (our site manager plays that role).

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! display_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $($variant,)* }

        impl $name {
            /// Every value, in the seed's order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The string an operator sees.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }

            /// The value whose display string is `s` (case-insensitive).
            pub fn from_display(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str().eq_ignore_ascii_case(s))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

display_enum!(
    /// The VPG's protection status (the seed's "Status" column).
    VpgStatus {
        Deleting => "Deleting",
        FailingOver => "Failing Over",
        HistoryNotMeetingSla => "History Not Meeting SLA",
        Initializing => "Initializing",
        MeetingSla => "Meeting SLA",
        Moving => "Moving",
        NotMeetingSla => "Not Meeting SLA",
        Recovered => "Recovered",
        RpoNotMeetingSla => "RPO Not Meeting SLA",
    }
);

display_enum!(
    /// The VPG's substatus (the seed's "State" column); `None` is shown as "—".
    VpgSubstatus {
        None => "—",
        BackingUp => "Backing Up",
        BitmapSyncing => "Bitmap Syncing",
        CommittingFailover => "Committing Failover",
        CommittingMove => "Committing Move",
        CreatingVpg => "Creating VPG",
        DeletingTheVpg => "Deleting the VPG",
        DeltaSyncing => "Delta Syncing",
        DeltaSyncingAVolume => "Delta syncing a volume",
        Error => "Error",
        FailingOverBeforeCommit => "Failing over - Before commit",
        InitialSync => "Initial Sync",
        JournalStorageError => "Journal storage error",
        MovingBeforeCommit => "Moving - Before commit",
        NeedsConfiguration => "Needs Configuration",
        Promoting => "Promoting",
        RecoveryIsPossible => "Recovery is possible",
        RecoveryStorageError => "Recovery storage error",
        RecoveryStorageProfileError => "Recovery storage profile error",
        RollingBack => "Rolling back",
        RollingBackFailover => "Rolling back Failover",
        RollingBackMove => "Rolling back Move",
        SiteDisconnection => "Site disconnection",
        SiteDisconnectionNoCheckpoints => "Site disconnection. No checkpoints",
        Syncing => "Syncing",
        UserPausedProtection => "User paused protection",
        VmNotProtected => "VM not protected",
        VolumeInitialSync => "Volume Initial Sync",
        VpgHasNoVms => "VPG has no VMs",
        VpgWaitingToBeRemoved => "VPG waiting to be removed",
        ManagerPausedProtection => "Site Manager paused protection",
    }
);

display_enum!(
    /// The alert colour of a VPG.
    AlertColor {
        Green => "Green",
        Orange => "Orange",
        Red => "Red",
    }
);

display_enum!(
    /// Why a synchronization is running (the seed's "VPG Synchronization Triggers").
    SyncTrigger {
        ForceSync => "Force Sync",
        NetworkCongestion => "Network Congestion",
        ProtectedStorageError => "Protected Storage Error",
        ProtectedVraCongestion => "Protected VRA Congestion",
        RecoveryOrJournalStorageError => "Recovery or Journal Storage Error",
        RecoveryStorageCongestion => "Recovery Storage Congestion",
        RecoveryVraCommunicationProblem => "Recovery VRA Communication Problem",
        VpgConfigurationChanged => "VPG Configuration Changed",
    }
);

/// The kind of synchronization a VPG is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SyncKind {
    /// Type of synchronization still being evaluated.
    Evaluating,
    Initial,
    Delta,
    Bitmap,
    VolumeInitial,
    VolumeDelta,
}

impl SyncKind {
    fn substatus(self) -> VpgSubstatus {
        match self {
            SyncKind::Evaluating => VpgSubstatus::Syncing,
            SyncKind::Initial => VpgSubstatus::InitialSync,
            SyncKind::Delta => VpgSubstatus::DeltaSyncing,
            SyncKind::Bitmap => VpgSubstatus::BitmapSyncing,
            SyncKind::VolumeInitial => VpgSubstatus::VolumeInitialSync,
            SyncKind::VolumeDelta => VpgSubstatus::DeltaSyncingAVolume,
        }
    }

    /// Whether checkpoints may be taken during this sync (never, per the seed).
    pub fn allows_checkpoints(self) -> bool {
        false
    }

    /// Whether a recovery is possible during this sync: only bitmap sync keeps the last
    /// checkpoint usable.
    pub fn allows_recovery(self) -> bool {
        matches!(self, SyncKind::Bitmap)
    }
}

/// The operation a VPG is in, if any, and its phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operation {
    /// Created; waiting for its first sync to finish.
    Creating,
    FailoverBeforeCommit,
    FailoverCommitting,
    FailoverPromoting,
    FailoverRollingBack,
    MoveBeforeCommit,
    MoveCommitting,
    MovePromoting,
    MoveRollingBack,
    /// A clone or similar operation being undone.
    RollingBack,
    Deleting,
    /// A delete failed; waiting for retry or force delete.
    DeleteFailed,
    /// The VPG was recovered at the peer and is not protected any more.
    Recovered,
}

impl Operation {
    /// Whether protection can be paused or resumed during this operation (while the VPG
    /// is being created, yes: the initial sync resumes as a bitmap sync).
    pub fn allows_pause(self) -> bool {
        matches!(self, Self::Creating)
    }

    /// Whether a delete can start (or restart) during this operation: not while a
    /// recovery runs.
    pub fn allows_delete(self) -> bool {
        matches!(
            self,
            Self::Creating | Self::Deleting | Self::DeleteFailed | Self::Recovered
        )
    }
}

/// A problem that stops or degrades protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Fault {
    /// The recovery site cannot be reached from the protected site.
    SiteDisconnected,
    /// The protected site cannot be reached from the recovery site.
    ProtectedSiteDown,
    JournalStorage,
    RecoveryStorage,
    RecoveryStorageProfile,
    VmNotProtected,
    NeedsConfiguration,
    /// A manager-to-VRA link or other internal error.
    Error,
}

/// Who paused protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Pause {
    User,
    Manager,
}

/// Everything the SLA evaluator observes about a VPG at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VpgObservation {
    pub vm_count: usize,
    pub operation: Option<Operation>,
    pub sync: Option<SyncKind>,
    /// Whether the running sync was requested by the operator (force sync).
    pub forced: bool,
    pub pause: Option<Pause>,
    pub faults: Vec<Fault>,
    pub backup_running: bool,
    /// Seconds since the last checkpoint durable in every journal; `None` if there is none.
    pub actual_rpo_secs: Option<u64>,
    pub target_rpo_secs: u64,
    /// Whether the journal holds the configured history.
    pub history_met: bool,
    /// Whether any usable checkpoint exists.
    pub has_checkpoints: bool,
    /// Set after a rolled-back failover or move.
    pub after_rollback: bool,
    /// The recovery site has not seen a failover test of the VPG within its reminder
    /// interval (an alert, not a status).
    #[serde(default)]
    pub test_overdue: bool,
}

/// The status an operator sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpgState {
    pub status: VpgStatus,
    pub substatus: VpgSubstatus,
    pub alert: AlertColor,
}

impl VpgObservation {
    fn rpo_met(&self) -> bool {
        matches!(self.actual_rpo_secs, Some(rpo) if rpo <= self.target_rpo_secs)
    }

    /// Derives status, substatus and alert colour, following the seed's table.
    pub fn evaluate(&self) -> VpgState {
        use VpgStatus as S;
        use VpgSubstatus as Sub;

        let state = |status, substatus, alert| VpgState {
            status,
            substatus,
            alert,
        };

        // Operations decide the status outright.
        if let Some(op) = self.operation {
            let (status, sub) = match op {
                Operation::Creating => (
                    S::Initializing,
                    self.sync.map_or(Sub::CreatingVpg, SyncKind::substatus),
                ),
                Operation::FailoverBeforeCommit => (S::FailingOver, Sub::FailingOverBeforeCommit),
                Operation::FailoverCommitting => (S::FailingOver, Sub::CommittingFailover),
                Operation::FailoverPromoting => (S::FailingOver, Sub::Promoting),
                Operation::FailoverRollingBack => (S::FailingOver, Sub::RollingBackFailover),
                Operation::MoveBeforeCommit => (S::Moving, Sub::MovingBeforeCommit),
                Operation::MoveCommitting => (S::Moving, Sub::CommittingMove),
                Operation::MovePromoting => (S::Moving, Sub::Promoting),
                Operation::MoveRollingBack => (S::Moving, Sub::RollingBackMove),
                Operation::RollingBack => (S::Initializing, Sub::RollingBack),
                Operation::Deleting => (S::Deleting, Sub::DeletingTheVpg),
                Operation::DeleteFailed => (S::Deleting, Sub::VpgWaitingToBeRemoved),
                Operation::Recovered => (S::Recovered, Sub::None),
            };
            let alert = match op {
                Operation::Creating => AlertColor::Green,
                Operation::DeleteFailed => AlertColor::Red,
                _ => AlertColor::Orange,
            };
            return state(status, sub, alert);
        }

        // Conditions that stop replication: Not Meeting SLA, red.
        if self.vm_count == 0 {
            return state(S::NotMeetingSla, Sub::VpgHasNoVms, AlertColor::Red);
        }
        let fault_sub = self.faults.iter().map(|f| match f {
            Fault::SiteDisconnected if !self.has_checkpoints => Sub::SiteDisconnectionNoCheckpoints,
            Fault::SiteDisconnected => Sub::SiteDisconnection,
            Fault::ProtectedSiteDown => Sub::RecoveryIsPossible,
            Fault::JournalStorage => Sub::JournalStorageError,
            Fault::RecoveryStorage => Sub::RecoveryStorageError,
            Fault::RecoveryStorageProfile => Sub::RecoveryStorageProfileError,
            Fault::VmNotProtected => Sub::VmNotProtected,
            Fault::NeedsConfiguration => Sub::NeedsConfiguration,
            Fault::Error => Sub::Error,
        });
        if let Some(sub) = fault_sub.min_by_key(|s| fault_rank(*s)) {
            return state(S::NotMeetingSla, sub, AlertColor::Red);
        }
        if let Some(pause) = self.pause {
            let sub = match pause {
                Pause::User => Sub::UserPausedProtection,
                Pause::Manager => Sub::ManagerPausedProtection,
            };
            return state(S::NotMeetingSla, sub, AlertColor::Red);
        }

        // Replicating (possibly syncing): the SLA figures decide the status.
        let status = match (self.rpo_met(), self.history_met) {
            (true, true) => S::MeetingSla,
            (true, false) => S::HistoryNotMeetingSla,
            (false, true) => S::RpoNotMeetingSla,
            (false, false) => S::NotMeetingSla,
        };
        let sub = match self.sync {
            // A delta sync not asked for by the operator means the sites drifted apart.
            Some(SyncKind::Delta) if !self.forced => {
                return state(S::NotMeetingSla, Sub::DeltaSyncing, AlertColor::Orange);
            }
            Some(SyncKind::VolumeDelta) => {
                return state(
                    S::NotMeetingSla,
                    Sub::DeltaSyncingAVolume,
                    AlertColor::Orange,
                );
            }
            Some(kind) => kind.substatus(),
            None if self.backup_running => Sub::BackingUp,
            None if self.after_rollback => Sub::RecoveryIsPossible,
            None => Sub::None,
        };
        let alert = if status == S::MeetingSla {
            AlertColor::Green
        } else if self.sync.is_some() && self.actual_rpo_secs.is_none() {
            // Syncing with no checkpoint yet is still "being replicated".
            AlertColor::Green
        } else {
            AlertColor::Orange
        };
        state(status, sub, alert)
    }
}

/// Which fault to show first when several hold: the one an operator must act on first.
fn fault_rank(s: VpgSubstatus) -> u8 {
    match s {
        VpgSubstatus::JournalStorageError => 0,
        VpgSubstatus::RecoveryStorageError => 1,
        VpgSubstatus::RecoveryStorageProfileError => 2,
        VpgSubstatus::SiteDisconnectionNoCheckpoints => 3,
        VpgSubstatus::SiteDisconnection => 4,
        VpgSubstatus::RecoveryIsPossible => 5,
        VpgSubstatus::VmNotProtected => 6,
        VpgSubstatus::NeedsConfiguration => 7,
        _ => 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> VpgObservation {
        VpgObservation {
            vm_count: 2,
            operation: None,
            sync: None,
            forced: false,
            pause: None,
            faults: vec![],
            backup_running: false,
            actual_rpo_secs: Some(5),
            target_rpo_secs: 300,
            history_met: true,
            has_checkpoints: true,
            after_rollback: false,
            test_overdue: false,
        }
    }

    #[test]
    fn display_strings_match_the_seed() {
        assert_eq!(
            VpgStatus::RpoNotMeetingSla.to_string(),
            "RPO Not Meeting SLA"
        );
        assert_eq!(
            VpgSubstatus::SiteDisconnectionNoCheckpoints.to_string(),
            "Site disconnection. No checkpoints"
        );
        assert_eq!(
            VpgSubstatus::VpgWaitingToBeRemoved.as_str(),
            "VPG waiting to be removed"
        );
        assert_eq!(
            SyncTrigger::RecoveryOrJournalStorageError.as_str(),
            "Recovery or Journal Storage Error"
        );
        assert_eq!(VpgStatus::ALL.len(), 9);
        assert_eq!(SyncTrigger::ALL.len(), 8);
        for s in VpgSubstatus::ALL {
            assert_eq!(VpgSubstatus::from_display(s.as_str()), Some(*s));
        }
    }

    #[test]
    fn healthy_vpg_meets_sla() {
        let s = healthy().evaluate();
        assert_eq!(
            (s.status, s.substatus, s.alert),
            (VpgStatus::MeetingSla, VpgSubstatus::None, AlertColor::Green)
        );
    }

    #[test]
    fn rpo_and_history_decide_the_sla_status() {
        let mut o = healthy();
        o.actual_rpo_secs = Some(301);
        assert_eq!(o.evaluate().status, VpgStatus::RpoNotMeetingSla);
        assert_eq!(o.evaluate().alert, AlertColor::Orange);
        o.history_met = false;
        assert_eq!(o.evaluate().status, VpgStatus::NotMeetingSla);
        o.actual_rpo_secs = Some(1);
        assert_eq!(o.evaluate().status, VpgStatus::HistoryNotMeetingSla);
    }

    #[test]
    fn syncs_map_to_the_seed_rows() {
        let mut o = healthy();
        o.sync = Some(SyncKind::Bitmap);
        assert_eq!(o.evaluate().substatus, VpgSubstatus::BitmapSyncing);
        assert_eq!(o.evaluate().status, VpgStatus::MeetingSla);
        o.sync = Some(SyncKind::Delta);
        o.forced = true;
        assert_eq!(o.evaluate().status, VpgStatus::MeetingSla);
        o.forced = false;
        assert_eq!(o.evaluate().status, VpgStatus::NotMeetingSla);
        assert_eq!(o.evaluate().substatus, VpgSubstatus::DeltaSyncing);
        o.sync = Some(SyncKind::VolumeInitial);
        o.actual_rpo_secs = Some(1000);
        assert_eq!(o.evaluate().status, VpgStatus::RpoNotMeetingSla);
        assert_eq!(o.evaluate().substatus, VpgSubstatus::VolumeInitialSync);
        assert!(SyncKind::Bitmap.allows_recovery());
        assert!(!SyncKind::Delta.allows_recovery());
    }

    #[test]
    fn creation_and_operations() {
        let mut o = healthy();
        o.operation = Some(Operation::Creating);
        assert_eq!(o.evaluate().substatus, VpgSubstatus::CreatingVpg);
        o.sync = Some(SyncKind::Initial);
        assert_eq!(
            (o.evaluate().status, o.evaluate().substatus),
            (VpgStatus::Initializing, VpgSubstatus::InitialSync)
        );
        o.operation = Some(Operation::DeleteFailed);
        assert_eq!(o.evaluate().substatus, VpgSubstatus::VpgWaitingToBeRemoved);
        o.operation = Some(Operation::MovePromoting);
        assert_eq!(
            (o.evaluate().status, o.evaluate().substatus),
            (VpgStatus::Moving, VpgSubstatus::Promoting)
        );
    }

    #[test]
    fn faults_are_red_and_ranked() {
        let mut o = healthy();
        o.faults = vec![Fault::SiteDisconnected];
        assert_eq!(o.evaluate().substatus, VpgSubstatus::SiteDisconnection);
        assert_eq!(o.evaluate().alert, AlertColor::Red);
        o.has_checkpoints = false;
        assert_eq!(
            o.evaluate().substatus,
            VpgSubstatus::SiteDisconnectionNoCheckpoints
        );
        o.faults.push(Fault::JournalStorage);
        assert_eq!(o.evaluate().substatus, VpgSubstatus::JournalStorageError);
        let mut o = healthy();
        o.vm_count = 0;
        assert_eq!(o.evaluate().substatus, VpgSubstatus::VpgHasNoVms);
        let mut o = healthy();
        o.pause = Some(Pause::User);
        assert_eq!(o.evaluate().substatus, VpgSubstatus::UserPausedProtection);
        let mut o = healthy();
        o.after_rollback = true;
        assert_eq!(o.evaluate().substatus, VpgSubstatus::RecoveryIsPossible);
    }
}
