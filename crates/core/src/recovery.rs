//! Recovery operations kept in the replicated state of the site that runs them. Today the
//! failover test: the recovery site serves every volume of a VPG, at a checkpoint, as a
//! writable scratch image (test VMs come up on it) while protection and checkpoints go on,
//! until the operator stops the test with a verdict; what the test VMs wrote is thrown
//! away with the scratch overlays. The rules that start, advance and end a test live here;
//! the recovery site's leader (`control/recovery.rs`) drives the VRAs through them.

use serde::{Deserialize, Serialize};

use crate::error::DomainError;
use crate::ids::{HostId, VmId, VpgId};

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
    /// The VRA's NBD listener (host:port).
    pub nbd_address: String,
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
