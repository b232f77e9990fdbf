//! Fencing: exactly one site owns a VPG's VMs. A recovery site says in its reports what
//! it recovered ([`RecoveryClaim`]) and what it deleted ([`Tombstone`]); a protected site
//! that learns that its VPG was recovered elsewhere stands down ([`StandDown`]): its VRAs
//! stop taking writes to the VPG's volumes and stop replicating, its managers stop pushing
//! the definition, and the blocks its VMs wrote that the recovery does not hold are counted
//! per volume ([`VolumeDivergence`]) and kept until the operator chooses. [`verdict`] is
//! the rule, pure and unit-tested; the leader's fence controller applies it.

use serde::{Deserialize, Serialize};

use crate::ids::{RecoveryOpId, SiteId, VmId, VpgId};
use crate::recovery::{RecoveryKind, RecoveryOp, RecoveryPoint, RecoveryStep};
use crate::status::Operation;
use crate::vpg::Vpg;

/// Tombstones a site keeps of VPGs it deleted (the oldest go first).
pub const MAX_TOMBSTONES: usize = 1024;

/// Where a recovery of a VPG stands, as the site that runs it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimPhase {
    /// The recovered VMs run on before-commit volumes (rollback still possible); the
    /// VPG's operation at the recovery site.
    Running { operation: Operation },
    /// Committed: the VPG is at this generation from now on (the point of no return).
    Committed { generation: u64 },
    /// Rolled back (or rolling back): everything goes back to how it was.
    RolledBack,
}

/// What a recovery site says about a failover or move of a VPG it ran or runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryClaim {
    pub op: RecoveryOpId,
    pub kind: RecoveryKind,
    pub point: RecoveryPoint,
    /// The VPG's generation when the operation started.
    pub from_generation: u64,
    pub phase: ClaimPhase,
    /// On commit the recovered VMs are protected back to the old protected site.
    pub reverse: bool,
    /// The operation shut the protected VMs down first (a move, a failover with shutdown):
    /// their site is done with them once it commits.
    pub source_shut_down: bool,
}

impl RecoveryClaim {
    /// What an operation in flight claims: nothing while it only prepares the source (the
    /// protected site must still replicate to drain), running from the moment the
    /// recovery VRAs hold the VPG, committed once it has its new generation.
    pub fn of_op(op: &RecoveryOp) -> Option<Self> {
        let phase = match op.step {
            RecoveryStep::PreparingSource => return None,
            RecoveryStep::Opening | RecoveryStep::BeforeCommit | RecoveryStep::Committing => {
                ClaimPhase::Running {
                    operation: op.step.operation(op.kind),
                }
            }
            RecoveryStep::Promoting | RecoveryStep::HandingOver => ClaimPhase::Committed {
                generation: op.new_generation.unwrap_or(op.from_generation + 1),
            },
            RecoveryStep::RollingBack => ClaimPhase::RolledBack,
        };
        Some(Self::with_phase(op, phase))
    }

    /// The claim of an operation that ended (committed or rolled back).
    pub fn ended(op: &RecoveryOp, committed: bool) -> Self {
        let phase = if committed {
            ClaimPhase::Committed {
                generation: op.new_generation.unwrap_or(op.from_generation + 1),
            }
        } else {
            ClaimPhase::RolledBack
        };
        Self::with_phase(op, phase)
    }

    fn with_phase(op: &RecoveryOp, phase: ClaimPhase) -> Self {
        Self {
            op: op.id.clone(),
            kind: op.kind,
            point: op.point.clone(),
            from_generation: op.from_generation,
            phase,
            reverse: op.reverse,
            source_shut_down: op.touches_source(),
        }
    }

    pub fn committed(&self) -> bool {
        matches!(self.phase, ClaimPhase::Committed { .. })
    }

    /// "failover to checkpoint 12 (generation 5)" or "move to checkpoint 12, before
    /// commit", for messages.
    pub fn describe(&self) -> String {
        let what = format!("{} to {}", self.kind.name(), self.point.label());
        match self.phase {
            ClaimPhase::Running { .. } => format!("{what}, before commit"),
            ClaimPhase::Committed { generation } => {
                format!("{what}, committed (generation {generation})")
            }
            ClaimPhase::RolledBack => format!("{what}, rolled back"),
        }
    }
}

/// What a site keeps of a VPG it deleted, so that a peer returning with an older copy
/// learns that it is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub vpg: VpgId,
    pub name: String,
    pub protected_site: SiteId,
    pub recovery_site: SiteId,
    pub generation: u64,
    pub deleted_ms: u64,
    /// The deleting site ran the VPG's VMs: it protected them, or had recovered them.
    pub owned_by_deleter: bool,
}

impl Tombstone {
    /// Whether it is of `vpg` as this site holds it, not of an older VPG of the same id
    /// (`vpg` was made after the delete: re-created).
    pub fn outlived(&self, vpg: &Vpg) -> bool {
        self.deleted_ms > vpg.created_at_ms
    }

    /// The tombstone of `vpg` deleted at `site` at `now_ms`.
    pub fn of(vpg: &Vpg, site: &SiteId, now_ms: u64) -> Self {
        Self {
            vpg: vpg.id.clone(),
            name: vpg.name.clone(),
            protected_site: vpg.protected_site.clone(),
            recovery_site: vpg.recovery_site.clone(),
            generation: vpg.generation,
            deleted_ms: now_ms,
            // Recovered: its VMs moved from the protected site to the recovery site.
            owned_by_deleter: if vpg.operation == Some(Operation::Recovered) {
                &vpg.recovery_site == site
            } else {
                &vpg.protected_site == site
            },
        }
    }
}

/// Blocks a protected VM wrote that a recovery elsewhere does not hold: written after the
/// last write its recovery VRA acknowledged (the buffer and the dirty map at the stand-down).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDivergence {
    pub host: crate::ids::HostId,
    pub vm: VmId,
    pub volume_id: u32,
    pub bytes: u64,
    /// False when the VRA cannot tell (it restarted without a clean stop, or it could not
    /// be reached): only a block-hash comparison would.
    pub known: bool,
}

/// Why a protected site stood a VPG down: the peer's claim, or its tombstone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StandDownCause {
    Recovered(RecoveryClaim),
    Deleted(Tombstone),
}

/// A VPG this site protects, stood down because another site owns its VMs now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandDown {
    /// The site that recovered (or deleted) the VPG.
    pub by: SiteId,
    pub cause: StandDownCause,
    pub since_ms: u64,
    /// Counted once every VRA of the VPG here stood down (or could not be reached in time).
    pub divergence: Option<Vec<VolumeDivergence>>,
}

impl StandDown {
    /// The claim it stands down for, if a recovery.
    pub fn claim(&self) -> Option<&RecoveryClaim> {
        match &self.cause {
            StandDownCause::Recovered(c) => Some(c),
            StandDownCause::Deleted(_) => None,
        }
    }

    /// Whether the other site passed the point of no return (or deleted the VPG): this
    /// site never takes the VPG's VMs back by itself.
    pub fn final_(&self) -> bool {
        self.claim().is_none_or(RecoveryClaim::committed)
    }

    /// The peer's operation while its recovery is before commit (this site shows it).
    pub fn peer_operation(&self) -> Option<Operation> {
        match self.claim()?.phase {
            ClaimPhase::Running { operation } => Some(operation),
            _ => None,
        }
    }

    /// What happened, for an operator: "site B failed the VPG over to checkpoint 12,
    /// committed (generation 5)".
    pub fn describe(&self) -> String {
        match &self.cause {
            StandDownCause::Recovered(c) => format!("site {} ran a {}", self.by, c.describe()),
            StandDownCause::Deleted(t) => format!(
                "site {} deleted the VPG at generation {} after it ran its VMs",
                self.by, t.generation
            ),
        }
    }

    /// The divergence, per volume, for an operator ("vm-0/0 1048576 bytes, ...").
    pub fn describe_divergence(&self) -> String {
        match &self.divergence {
            None => "not counted yet".into(),
            Some(d) if d.is_empty() => "none".into(),
            Some(d) => d
                .iter()
                .map(|v| {
                    if v.known {
                        format!("{}/{} {} bytes", v.vm, v.volume_id, v.bytes)
                    } else {
                        format!("{}/{} unknown", v.vm, v.volume_id)
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// What the peer site says about a VPG this site protects, from its last report.
#[derive(Debug, Clone, Copy)]
pub enum PeerSays<'a> {
    /// The peer's report could not be read: nothing changes.
    Unreachable,
    /// It holds the VPG (at this generation) with this claim, if any.
    Holds {
        generation: u64,
        claim: Option<&'a RecoveryClaim>,
    },
    /// It holds no copy; it deleted one if `tombstone` says so.
    Gone { tombstone: Option<&'a Tombstone> },
}

/// What this (protected) site does about the peer's word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changes.
    Keep,
    /// Stand down (or update the stand-down to this cause).
    StandDown(StandDownCause),
    /// The peer rolled its recovery back: take protection up again.
    StandUp,
}

/// The rule: a site that protects `vpg` stands down when the peer runs a recovery of it
/// (before commit: until a rollback), committed one at a newer generation, or deleted it
/// after running its VMs; anything older than this site's definition is stale and ignored.
/// A final stand-down (committed, deleted) is never undone.
pub fn verdict(vpg: &Vpg, current: Option<&StandDown>, peer: PeerSays<'_>) -> Verdict {
    let stand_down = |cause: StandDownCause| match current {
        Some(c) if c.cause == cause => Verdict::Keep,
        _ => Verdict::StandDown(cause),
    };
    let lift = || match current {
        Some(c) if !c.final_() => Verdict::StandUp,
        _ => Verdict::Keep,
    };
    match peer {
        PeerSays::Unreachable => Verdict::Keep,
        PeerSays::Holds { claim: None, .. } => lift(),
        PeerSays::Holds {
            claim: Some(claim),
            generation,
        } => match claim.phase {
            ClaimPhase::Committed { generation: g } if g > vpg.generation => {
                stand_down(StandDownCause::Recovered(claim.clone()))
            }
            ClaimPhase::Running { .. }
                if claim.from_generation >= vpg.generation && generation >= vpg.generation =>
            {
                if current.is_some_and(StandDown::final_) {
                    Verdict::Keep
                } else {
                    stand_down(StandDownCause::Recovered(claim.clone()))
                }
            }
            ClaimPhase::RolledBack => match current.and_then(StandDown::claim) {
                Some(c) if c.op == claim.op => lift(),
                _ => Verdict::Keep,
            },
            // Stale: from before this site's definition.
            _ => lift(),
        },
        PeerSays::Gone { tombstone: Some(t) }
            if t.owned_by_deleter && t.generation >= vpg.generation && t.outlived(vpg) =>
        {
            stand_down(StandDownCause::Deleted(t.clone()))
        }
        PeerSays::Gone { .. } => Verdict::Keep,
    }
}

/// Whether this site, which recovers `vpg`, lets its copy go because the protected site
/// (whose VMs run) deleted the VPG meanwhile: only a delete by the site that ran the VMs,
/// of a generation not older than this copy, while nothing runs here.
pub fn follows_delete(vpg: &Vpg, recovering_here: bool, tombstone: Option<&Tombstone>) -> bool {
    tombstone.is_some_and(|t| {
        t.owned_by_deleter
            && t.generation >= vpg.generation
            && t.protected_site == vpg.protected_site
            && t.outlived(vpg)
    }) && !recovering_here
        && vpg.operation.is_none_or(|op| op == Operation::Creating)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::{CommitPolicy, Shutdown};

    fn vpg(generation: u64) -> Vpg {
        Vpg {
            id: VpgId::minted("vpg".into()),
            name: "vpg".into(),
            generation,
            protected_site: SiteId::minted("a".into()),
            recovery_site: SiteId::minted("b".into()),
            settings: crate::vpg::VpgSettings::default(),
            vms: Vec::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            operation: None,
            paused: false,
            manager_paused_until_ms: 0,
            keep_recovery_disks: false,
            delete_started_ms: 0,
            keep_removed_recovery_disks: false,
            kept_recovery_vms: Default::default(),
            reversed_at: 0,
        }
    }

    fn op(step: RecoveryStep, from: u64) -> RecoveryOp {
        RecoveryOp {
            id: RecoveryOpId::minted("op-1".into()),
            kind: RecoveryKind::Failover,
            vpg: VpgId::minted("vpg".into()),
            task: 1,
            point: RecoveryPoint {
                checkpoint_id: 12,
                timestamp_ms: 1000,
                name: String::new(),
            },
            policy: CommitPolicy::Manual,
            from_generation: from,
            new_generation: (step == RecoveryStep::Promoting).then_some(from + 1),
            step,
            started_ms: 0,
            step_since_ms: 0,
            intent: None,
            volumes: Vec::new(),
            error: None,
            shutdown: Shutdown::No,
            to_last_checkpoint: false,
            reverse: false,
        }
    }

    fn holds<'a>(generation: u64, claim: Option<&'a RecoveryClaim>) -> PeerSays<'a> {
        PeerSays::Holds { generation, claim }
    }

    fn stood(cause: StandDownCause) -> StandDown {
        StandDown {
            by: SiteId::minted("b".into()),
            cause,
            since_ms: 0,
            divergence: None,
        }
    }

    #[test]
    fn a_source_being_prepared_claims_nothing_and_a_rollback_claims_no_ownership() {
        assert_eq!(
            RecoveryClaim::of_op(&op(RecoveryStep::PreparingSource, 3)),
            None
        );
        let c = RecoveryClaim::of_op(&op(RecoveryStep::RollingBack, 3)).unwrap();
        assert_eq!(c.phase, ClaimPhase::RolledBack);
        let c = RecoveryClaim::of_op(&op(RecoveryStep::Promoting, 3)).unwrap();
        assert_eq!(c.phase, ClaimPhase::Committed { generation: 4 });
    }

    #[test]
    fn a_recovery_before_commit_stands_the_protected_site_down_until_it_is_rolled_back() {
        let g = vpg(3);
        let running = RecoveryClaim::of_op(&op(RecoveryStep::BeforeCommit, 3)).unwrap();
        let v = verdict(&g, None, holds(3, Some(&running)));
        assert_eq!(
            v,
            Verdict::StandDown(StandDownCause::Recovered(running.clone()))
        );
        let current = stood(StandDownCause::Recovered(running.clone()));
        assert_eq!(
            verdict(&g, Some(&current), holds(3, Some(&running))),
            Verdict::Keep,
            "already stood down for it"
        );
        assert_eq!(
            verdict(&g, Some(&current), PeerSays::Unreachable),
            Verdict::Keep
        );
        let rolled = RecoveryClaim::ended(&op(RecoveryStep::RollingBack, 3), false);
        assert_eq!(
            verdict(&g, Some(&current), holds(3, Some(&rolled))),
            Verdict::StandUp
        );
        assert_eq!(
            verdict(&g, Some(&current), holds(3, None)),
            Verdict::StandUp,
            "the peer forgot the operation"
        );
    }

    #[test]
    fn a_commit_stands_down_for_good_and_stale_claims_change_nothing() {
        let g = vpg(3);
        let running = RecoveryClaim::of_op(&op(RecoveryStep::BeforeCommit, 3)).unwrap();
        let mut committed_op = op(RecoveryStep::Promoting, 3);
        committed_op.new_generation = Some(5);
        let committed = RecoveryClaim::ended(&committed_op, true);
        let before = stood(StandDownCause::Recovered(running));
        assert_eq!(
            verdict(&g, Some(&before), holds(5, Some(&committed))),
            Verdict::StandDown(StandDownCause::Recovered(committed.clone()))
        );
        let after = stood(StandDownCause::Recovered(committed.clone()));
        assert_eq!(
            verdict(&g, Some(&after), holds(5, None)),
            Verdict::Keep,
            "never stands up after a commit"
        );
        // A site that took the VPG back since (a failback at generation 7) ignores it.
        assert_eq!(
            verdict(&vpg(7), None, holds(7, Some(&committed))),
            Verdict::Keep
        );
        // A rollback of another operation than the one stood down for changes nothing.
        let mut other = op(RecoveryStep::RollingBack, 3);
        other.id = RecoveryOpId::minted("op-2".into());
        let other = RecoveryClaim::ended(&other, false);
        assert_eq!(
            verdict(&g, Some(&after), holds(5, Some(&other))),
            Verdict::Keep
        );
    }

    #[test]
    fn a_delete_by_the_site_that_ran_the_vms_stands_down_and_other_deletes_do_not() {
        let g = vpg(3);
        let t = Tombstone {
            vpg: g.id.clone(),
            name: g.name.clone(),
            protected_site: SiteId::minted("b".into()),
            recovery_site: SiteId::minted("a".into()),
            generation: 5,
            deleted_ms: 9,
            owned_by_deleter: true,
        };
        assert_eq!(
            verdict(
                &g,
                None,
                PeerSays::Gone {
                    tombstone: Some(&t)
                }
            ),
            Verdict::StandDown(StandDownCause::Deleted(t.clone()))
        );
        let recovery_copy = Tombstone {
            owned_by_deleter: false,
            ..t.clone()
        };
        assert_eq!(
            verdict(
                &g,
                None,
                PeerSays::Gone {
                    tombstone: Some(&recovery_copy)
                }
            ),
            Verdict::Keep,
            "the recovery site dropped its copy: this site still runs the VMs"
        );
        assert_eq!(
            verdict(&g, None, PeerSays::Gone { tombstone: None }),
            Verdict::Keep
        );
        let again = Vpg {
            created_at_ms: 10,
            ..g.clone()
        };
        assert_eq!(
            verdict(
                &again,
                None,
                PeerSays::Gone {
                    tombstone: Some(&t)
                }
            ),
            Verdict::Keep,
            "a VPG of the same id made after the delete"
        );
        let older = Tombstone { generation: 2, ..t };
        assert_eq!(
            verdict(
                &g,
                None,
                PeerSays::Gone {
                    tombstone: Some(&older)
                }
            ),
            Verdict::Keep
        );
    }

    #[test]
    fn a_recovery_site_follows_only_the_protected_sites_own_delete_of_its_copy() {
        let mut g = vpg(3);
        // This copy is site b's, the recovery site; site a deleted it while b was away.
        let t = Tombstone {
            vpg: g.id.clone(),
            name: g.name.clone(),
            protected_site: SiteId::minted("a".into()),
            recovery_site: SiteId::minted("b".into()),
            generation: 3,
            deleted_ms: 9,
            owned_by_deleter: true,
        };
        assert!(follows_delete(&g, false, Some(&t)));
        assert!(!follows_delete(&g, true, Some(&t)), "a recovery runs here");
        assert!(!follows_delete(&g, false, None));
        let older = Tombstone {
            generation: 2,
            ..t.clone()
        };
        assert!(!follows_delete(&g, false, Some(&older)));
        let mut again = g.clone();
        again.created_at_ms = 10;
        assert!(
            !follows_delete(&again, false, Some(&t)),
            "a VPG of the same id made after the delete"
        );
        g.operation = Some(Operation::Recovered);
        assert!(!follows_delete(&g, false, Some(&t)), "its VMs run here");
    }
}
