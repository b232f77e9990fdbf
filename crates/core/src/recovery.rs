//! Recovery operations kept in the replicated state of the site that runs them. Today the
//! failover test: the recovery site serves every volume of a VPG, at a checkpoint, as a
//! writable scratch image (test VMs come up on it) while protection and checkpoints go on,
//! until the operator stops the test with a verdict; what the test VMs wrote is thrown
//! away with the scratch overlays. The rules that start, advance and end a test live here;
//! the recovery site's leader (`control/recovery.rs`) drives the VRAs through them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::DomainError;
use crate::ids::{HostId, RecoveryOpId, VmId, VpgId};
use crate::inventory::{PowerState, Vm, Volume};
use crate::protection::{recovery_vm_dir, replica_path, volume_id};
use crate::state::SiteState;
use crate::status::Operation;
use crate::vpg::{SourceVolume, VmPlacement, VmSource, Vpg, VpgVm};

/// The longest note an operator may leave with a test's verdict.
pub const MAX_TEST_NOTE_LEN: usize = 1024;

/// Which checkpoint a recovery operation goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointChoice {
    /// The newest checkpoint usable in every journal of the VPG.
    Latest,
    /// The newest usable checkpoint an operator named.
    LatestNamed,
    /// A checkpoint by its id.
    Id(u64),
    /// The newest usable checkpoint with this name.
    Name(String),
}

/// A checkpoint a recovery operation goes to, as the recovery site's journals list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    pub checkpoint_id: u64,
    pub timestamp_ms: u64,
    /// The operator's name for it (empty: an automatic checkpoint).
    pub name: String,
}

impl RecoveryPoint {
    /// "checkpoint 12" or "checkpoint 12 (\"before-upgrade\")", for messages.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            format!("checkpoint {}", self.checkpoint_id)
        } else {
            format!("checkpoint {} ({:?})", self.checkpoint_id, self.name)
        }
    }
}

/// A checkpoint as listed, for [`choose_checkpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedCheckpoint {
    pub point: RecoveryPoint,
    /// Images can be opened at it in every journal of the VPG.
    pub usable: bool,
}

/// Resolves `choice` over the VPG's checkpoints (oldest first).
pub fn choose_checkpoint(
    vpg: &VpgId,
    choice: &CheckpointChoice,
    listed: &[ListedCheckpoint],
) -> Result<RecoveryPoint, DomainError> {
    let usable = || listed.iter().rev().filter(|c| c.usable);
    let found = match choice {
        CheckpointChoice::Latest => usable().next(),
        CheckpointChoice::LatestNamed => usable().find(|c| !c.point.name.is_empty()),
        CheckpointChoice::Name(name) => usable().find(|c| &c.point.name == name),
        CheckpointChoice::Id(id) => {
            let c = listed
                .iter()
                .find(|c| c.point.checkpoint_id == *id)
                .ok_or_else(|| DomainError::not_found("checkpoint", id))?;
            if !c.usable {
                return Err(DomainError::precondition(format!(
                    "checkpoint {id} of VPG {vpg} is not usable (not durable in every journal, \
                     or promoted out of the history)"
                )));
            }
            Some(c)
        }
    };
    found.map(|c| c.point.clone()).ok_or_else(|| {
        DomainError::precondition(format!(
            "VPG {vpg} has no usable checkpoint{}",
            match choice {
                CheckpointChoice::Latest => String::new(),
                CheckpointChoice::LatestNamed => " with a name".into(),
                CheckpointChoice::Name(n) => format!(" named {n:?}"),
                CheckpointChoice::Id(_) => String::new(),
            }
        ))
    })
}

/// Where a failover test stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TestStep {
    /// Opening a scratch image of every volume at the checkpoint.
    Starting,
    /// Every volume is served; test VMs use them.
    Running,
    /// The operator stopped it: closing the images, then recording the result.
    Stopping,
}

/// One volume of a test VM: a writable scratch image at the checkpoint, served over NBD by
/// the recovery VRA of its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestVolume {
    pub vm: VmId,
    pub volume_id: u32,
    pub host: HostId,
    pub export_name: String,
    /// The VRA's NBD listener (host:port; TLS required unless the VRA runs insecure).
    pub nbd_address: String,
    /// The VRA's NBD Unix socket on its host (empty in state written before it existed).
    #[serde(default)]
    pub nbd_socket: String,
    pub size_bytes: u64,
}

/// The operator's verdict when stopping a test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestVerdict {
    pub passed: bool,
    pub note: String,
}

impl TestVerdict {
    pub fn validate(&self) -> Result<(), DomainError> {
        if self.note.len() > MAX_TEST_NOTE_LEN {
            return Err(DomainError::invalid(
                "note",
                format!("must be at most {MAX_TEST_NOTE_LEN} bytes"),
            ));
        }
        Ok(())
    }
}

/// A failover test that runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverTest {
    pub vpg: VpgId,
    /// Its task, which also names the test (unique within the site).
    pub task: u64,
    pub point: RecoveryPoint,
    pub step: TestStep,
    pub started_ms: u64,
    /// The volumes served so far.
    pub volumes: Vec<TestVolume>,
    /// Given when the operator stops it.
    pub verdict: Option<TestVerdict>,
    /// When the operator stopped it (0: running).
    #[serde(default)]
    pub stop_requested_ms: u64,
    /// Why the current step has not finished yet (retried every pass).
    pub error: Option<String>,
}

/// How a failover test ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResult {
    pub task: u64,
    pub point: RecoveryPoint,
    pub started_ms: u64,
    pub stopped_ms: u64,
    pub verdict: TestVerdict,
}

/// A change to a running test, by its leader; applied only to the test it names (`task`),
/// so that a deposed leader's late proposal changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestProgress {
    pub vpg: VpgId,
    pub task: u64,
    pub step: TestStep,
    pub volumes: Vec<TestVolume>,
    pub error: Option<String>,
}

/// A failover (run at the recovery site, working while the protected site is gone) or a
/// move (both sites up, nothing lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecoveryKind {
    Failover,
    Move,
}

impl RecoveryKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Failover => "failover",
            Self::Move => "move",
        }
    }
}

/// Where a failover or move stands. Every step is idempotent at the VRAs (keyed by the
/// operation's id), so the leader that finds the operation at a step runs that step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecoveryStep {
    /// A move: the protected site powers its VMs off, waits until everything they wrote
    /// is durable here, and takes a last checkpoint (the one the move recovers to).
    PreparingSource,
    /// The recovery VRAs open every volume at the checkpoint, before commit.
    Opening,
    /// The VMs run on their before-commit volumes; waiting for commit or rollback.
    BeforeCommit,
    /// Commit asked: the VPG moves to its new generation (the point of no return).
    Committing,
    /// Committed: the VRAs promote the journals and merge what the VMs wrote.
    Promoting,
    /// A committed move: the protected site removes its (powered off) protected VMs.
    HandingOver,
    /// Rollback asked: the VRAs give the recovery role back as it was (and a move's
    /// protected VMs are powered on again).
    RollingBack,
}

impl RecoveryStep {
    pub fn name(self) -> &'static str {
        match self {
            Self::PreparingSource => "preparing the source",
            Self::Opening => "opening",
            Self::BeforeCommit => "before commit",
            Self::Committing => "committing",
            Self::Promoting => "promoting",
            Self::HandingOver => "removing the protected VMs",
            Self::RollingBack => "rolling back",
        }
    }

    /// The VPG's operation (and so its status) at this step.
    pub fn operation(self, kind: RecoveryKind) -> Operation {
        match (kind, self) {
            (
                RecoveryKind::Failover,
                Self::PreparingSource | Self::Opening | Self::BeforeCommit,
            ) => Operation::FailoverBeforeCommit,
            (RecoveryKind::Failover, Self::Committing | Self::HandingOver) => {
                Operation::FailoverCommitting
            }
            (RecoveryKind::Failover, Self::Promoting) => Operation::FailoverPromoting,
            (RecoveryKind::Failover, Self::RollingBack) => Operation::FailoverRollingBack,
            (RecoveryKind::Move, Self::PreparingSource | Self::Opening | Self::BeforeCommit) => {
                Operation::MoveBeforeCommit
            }
            (RecoveryKind::Move, Self::Committing | Self::HandingOver) => Operation::MoveCommitting,
            (RecoveryKind::Move, Self::Promoting) => Operation::MovePromoting,
            (RecoveryKind::Move, Self::RollingBack) => Operation::MoveRollingBack,
        }
    }

    /// Whether the operator may still choose commit or rollback.
    pub fn takes_input(self) -> bool {
        matches!(
            self,
            Self::PreparingSource | Self::Opening | Self::BeforeCommit
        )
    }
}

/// The operator's word on a failover or move before commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecoveryIntent {
    Commit,
    Rollback,
}

/// What happens before commit when nobody decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommitPolicy {
    /// Wait for the operator.
    Manual,
    /// Commit once the VMs have run before commit this long.
    AutoCommit { after_secs: u64 },
    /// Roll back once the VMs have run before commit this long.
    AutoRollback { after_secs: u64 },
}

/// The longest a commit policy may wait (a day).
pub const MAX_COMMIT_POLICY_SECS: u64 = 24 * 3600;

impl CommitPolicy {
    pub fn validate(&self) -> Result<(), DomainError> {
        match *self {
            Self::Manual => Ok(()),
            Self::AutoCommit { after_secs } | Self::AutoRollback { after_secs }
                if after_secs > MAX_COMMIT_POLICY_SECS =>
            {
                Err(DomainError::invalid(
                    "commit_policy.after_secs",
                    format!("must be at most {MAX_COMMIT_POLICY_SECS}"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// The decision the policy takes for an operation before commit since `since_ms`.
    pub fn due(&self, since_ms: u64, now_ms: u64) -> Option<RecoveryIntent> {
        let waited = |secs: u64| now_ms.saturating_sub(since_ms) >= secs * 1000;
        match *self {
            Self::Manual => None,
            Self::AutoCommit { after_secs } => waited(after_secs).then_some(RecoveryIntent::Commit),
            Self::AutoRollback { after_secs } => {
                waited(after_secs).then_some(RecoveryIntent::Rollback)
            }
        }
    }
}

/// What a failover does with the protected VMs first, when their site can be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Shutdown {
    /// Leave them running.
    #[default]
    No,
    /// Power them off and wait until everything they wrote is durable at the recovery
    /// site (a failover to the latest checkpoint then goes to a last one taken after).
    Yes,
    /// Power them off, without waiting.
    Force,
}

/// A failover or move that runs at this site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryOp {
    pub id: RecoveryOpId,
    pub kind: RecoveryKind,
    pub vpg: VpgId,
    pub task: u64,
    pub point: RecoveryPoint,
    pub policy: CommitPolicy,
    /// The VPG's generation when it started; the commit moves it past every generation
    /// either site has seen.
    pub from_generation: u64,
    pub new_generation: Option<u64>,
    pub step: RecoveryStep,
    pub started_ms: u64,
    pub step_since_ms: u64,
    pub intent: Option<RecoveryIntent>,
    /// The recovered volumes served so far (with their NBD addresses).
    pub volumes: Vec<TestVolume>,
    /// Why the current step has not finished yet (retried every pass).
    pub error: Option<String>,
    /// A failover's shutdown of the protected VMs (a move always powers them off).
    #[serde(default)]
    pub shutdown: Shutdown,
    /// The operation goes to the protected site's last checkpoint, taken once it is
    /// drained (a move; a failover to the latest checkpoint with shutdown).
    #[serde(default)]
    pub to_last_checkpoint: bool,
    /// On commit, the recovered VMs are protected back towards the old protected site,
    /// over their original disks there (a delta sync).
    #[serde(default)]
    pub reverse: bool,
}

impl RecoveryOp {
    /// Whether the protected site takes part: it powers its VMs off first, removes them on
    /// commit and powers them on again on rollback.
    pub fn touches_source(&self) -> bool {
        self.kind == RecoveryKind::Move || self.shutdown != Shutdown::No
    }

    /// Whether the protected site waits until everything its VMs wrote is durable at the
    /// recovery site before it answers.
    pub fn drains_source(&self) -> bool {
        self.kind == RecoveryKind::Move || self.shutdown == Shutdown::Yes
    }
}

/// The definition that protects a VPG recovered at this site back towards its old
/// protected site, at `generation`, and the recovered VMs as this site's inventory takes
/// them: they run on their recovery disks where those are, and the old protected site's
/// original disks become the preseeded recovery disks (only a delta sync runs). Why not,
/// when the definition lacks what that needs.
pub fn reversed(
    vpg: &Vpg,
    site: &SiteState,
    generation: u64,
    now_ms: u64,
) -> Result<(Vpg, Vec<Vm>), String> {
    let pool = vpg.settings.reverse.pool.clone().ok_or_else(|| {
        format!(
            "no resource pool at site {} for the VMs protected back (settings.reverse.pool_id)",
            vpg.protected_site
        )
    })?;
    let mut vms = Vec::with_capacity(vpg.vms.len());
    let mut inventory = Vec::with_capacity(vpg.vms.len());
    for m in &vpg.vms {
        let p = &m.placement;
        let source = m.source.as_ref().ok_or_else(|| {
            format!(
                "the definition does not say where VM {} is at site {} (made before this was \
                 recorded)",
                p.vm_id, vpg.protected_site
            )
        })?;
        let ds = site
            .datastores
            .get(&p.recovery_datastore)
            .ok_or_else(|| format!("datastore {} is not here", p.recovery_datastore))?;
        let dir = recovery_vm_dir(&ds.path, &vpg.id, &p.vm_id);
        let mut volumes = Vec::with_capacity(m.footprint.volumes.len());
        let mut disk_paths = BTreeMap::new();
        let mut here = Vec::with_capacity(m.footprint.volumes.len());
        for &(controller, unit, size_bytes) in &m.footprint.volumes {
            let original = source
                .volumes
                .iter()
                .find(|v| v.controller == controller && v.unit == unit)
                .ok_or_else(|| {
                    format!(
                        "the definition does not say where volume c{controller}u{unit} of VM {} \
                         is at site {}",
                        p.vm_id, vpg.protected_site
                    )
                })?;
            let path = replica_path(&dir, p, controller, unit);
            disk_paths.insert(volume_id(controller, unit), original.path.clone());
            volumes.push(Volume {
                controller,
                unit,
                size_bytes,
                datastore_id: p.recovery_datastore.clone(),
                path: Some(path.clone()),
            });
            here.push(SourceVolume {
                controller,
                unit,
                datastore: p.recovery_datastore.clone(),
                path,
            });
        }
        let original_ds = source
            .volumes
            .first()
            .map(|v| v.datastore.clone())
            .ok_or_else(|| format!("VM {} has no volumes", p.vm_id))?;
        let f = &m.footprint;
        inventory.push(Vm {
            id: p.vm_id.clone(),
            name: f.vm_name.clone(),
            host_id: p.recovery_host.clone(),
            power: PowerState::On,
            memory_mib: f.memory_mib.max(1),
            cpus: f.cpus.max(1),
            cpu_reservation_mhz: f.cpu_reservation_mhz,
            memory_reservation_mib: f.memory_reservation_mib.min(f.memory_mib.max(1)),
            volumes,
        });
        vms.push(VpgVm {
            placement: VmPlacement {
                vm_id: p.vm_id.clone(),
                recovery_host: source.host.clone(),
                recovery_datastore: original_ds,
                recovery_pool: pool.clone(),
                preseeded: true,
                disk_paths,
            },
            footprint: m.footprint.clone(),
            source: Some(VmSource {
                host: p.recovery_host.clone(),
                volumes: here,
            }),
        });
    }
    let mut settings = vpg.settings.clone();
    // Protected back the other way, the VMs would take this site's pool again.
    settings.reverse.pool = vpg.vms.first().map(|m| m.placement.recovery_pool.clone());
    let turned = Vpg {
        id: vpg.id.clone(),
        name: vpg.name.clone(),
        generation,
        protected_site: vpg.recovery_site.clone(),
        recovery_site: vpg.protected_site.clone(),
        settings,
        vms,
        created_at_ms: vpg.created_at_ms,
        updated_at_ms: now_ms,
        operation: None,
        paused: false,
        manager_paused_until_ms: 0,
        keep_recovery_disks: false,
        delete_started_ms: 0,
        keep_removed_recovery_disks: false,
        kept_recovery_vms: Default::default(),
        reversed_at: generation,
    };
    Ok((turned, inventory))
}

/// A leader's move of an operation from one step to another (or, with `from == to`, a
/// progress or error update); applied only while the operation is at `from`, so a deposed
/// leader's late proposal changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryAdvance {
    pub vpg: VpgId,
    pub op: RecoveryOpId,
    pub from: RecoveryStep,
    pub to: RecoveryStep,
    pub volumes: Option<Vec<TestVolume>>,
    pub error: Option<String>,
    /// Committing to Promoting only: the VPG's generation from now on.
    pub new_generation: Option<u64>,
    /// A move's source prepared: the last checkpoint, the one it recovers to.
    #[serde(default)]
    pub point: Option<RecoveryPoint>,
    pub now_ms: u64,
}

/// Whether a VPG is due a failover test: never tested (or last tested) longer ago than its
/// reminder interval (months of 30 days; 0: no reminder). Counts from its creation when it
/// was never tested.
pub fn test_overdue(
    reminder_months: u32,
    created_ms: u64,
    last: Option<&TestResult>,
    now_ms: u64,
) -> bool {
    if reminder_months == 0 {
        return false;
    }
    let since = last.map_or(created_ms, |r| r.stopped_ms);
    let interval = u64::from(reminder_months) * 30 * 24 * 3600 * 1000;
    now_ms.saturating_sub(since) > interval
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(id: u64, name: &str, usable: bool) -> ListedCheckpoint {
        ListedCheckpoint {
            point: RecoveryPoint {
                checkpoint_id: id,
                timestamp_ms: id * 1000,
                name: name.into(),
            },
            usable,
        }
    }

    #[test]
    fn commit_policies_decide_once_their_time_is_up() {
        assert_eq!(CommitPolicy::Manual.due(0, u64::MAX), None);
        let commit = CommitPolicy::AutoCommit { after_secs: 30 };
        assert_eq!(commit.due(1_000, 30_999), None);
        assert_eq!(commit.due(1_000, 31_000), Some(RecoveryIntent::Commit));
        let rollback = CommitPolicy::AutoRollback { after_secs: 1 };
        assert_eq!(rollback.due(5_000, 6_000), Some(RecoveryIntent::Rollback));
        assert!(
            CommitPolicy::AutoCommit {
                after_secs: MAX_COMMIT_POLICY_SECS + 1
            }
            .validate()
            .is_err()
        );
        assert_eq!(
            RecoveryStep::Promoting.operation(RecoveryKind::Move),
            Operation::MovePromoting
        );
        assert!(
            RecoveryStep::BeforeCommit.takes_input() && !RecoveryStep::Committing.takes_input()
        );
    }

    #[test]
    fn checkpoint_choices_resolve_to_usable_checkpoints_only() {
        let vpg = VpgId::minted("g".into());
        let listed = [
            cp(1, "", false),
            cp(2, "before-upgrade", true),
            cp(3, "", true),
            cp(4, "nightly", true),
            cp(5, "", false),
        ];
        let pick = |c: CheckpointChoice| choose_checkpoint(&vpg, &c, &listed);
        assert_eq!(pick(CheckpointChoice::Latest).unwrap().checkpoint_id, 4);
        assert_eq!(pick(CheckpointChoice::LatestNamed).unwrap().name, "nightly");
        assert_eq!(
            pick(CheckpointChoice::Name("before-upgrade".into()))
                .unwrap()
                .checkpoint_id,
            2
        );
        assert_eq!(pick(CheckpointChoice::Id(3)).unwrap().checkpoint_id, 3);
        assert!(matches!(
            pick(CheckpointChoice::Id(5)),
            Err(DomainError::FailedPrecondition(m)) if m.contains("not usable")
        ));
        assert!(matches!(
            pick(CheckpointChoice::Id(9)),
            Err(DomainError::NotFound { .. })
        ));
        assert!(pick(CheckpointChoice::Name("gone".into())).is_err());
        assert!(matches!(
            choose_checkpoint(&vpg, &CheckpointChoice::Latest, &[cp(1, "", false)]),
            Err(DomainError::FailedPrecondition(m)) if m.contains("no usable checkpoint")
        ));
    }

    #[test]
    fn a_test_is_due_after_its_reminder_interval() {
        let month = 30 * 24 * 3600 * 1000u64;
        assert!(!test_overdue(0, 0, None, 100 * month));
        assert!(!test_overdue(6, 0, None, 6 * month));
        assert!(test_overdue(6, 0, None, 6 * month + 1));
        let last = TestResult {
            task: 1,
            point: RecoveryPoint {
                checkpoint_id: 1,
                timestamp_ms: 0,
                name: String::new(),
            },
            started_ms: 5 * month,
            stopped_ms: 5 * month,
            verdict: TestVerdict {
                passed: true,
                note: String::new(),
            },
        };
        assert!(!test_overdue(6, 0, Some(&last), 7 * month));
        assert!(test_overdue(1, 0, Some(&last), 7 * month));
    }

    #[test]
    fn a_long_note_is_refused() {
        let v = TestVerdict {
            passed: true,
            note: "x".repeat(MAX_TEST_NOTE_LEN + 1),
        };
        assert!(v.validate().is_err());
    }
}
