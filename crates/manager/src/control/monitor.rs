//! On the leader: turns each VPG's status transitions into events (EV0030), against the
//! status recorded last in the replicated state (so a leader change loses or repeats
//! none), keeps when each alert was raised, and follows the running tasks to their end,
//! all from the one status snapshot.

use std::time::{Duration, Instant};

use tandem_core::events::{EventCode, NewEvent};
use tandem_core::ids::VpgId;
use tandem_core::observe::LiveStatus;
use tandem_core::recovery::{RecoveryStep, TestStep};
use tandem_core::state::{Command, SiteState};
use tandem_core::status::Operation;
use tandem_core::tasks::{Task, TaskKind};
use tandem_core::vpg::Vpg;
use tokio_util::sync::CancellationToken;

use super::every_tick;
use crate::site::{SiteManager, now_ms};

/// A new leader's first statuses are a baseline, not transitions: until the poller has
/// seen every VRA and peer (their staleness bound), what it shows may still be filling in.
pub const BASELINE: Duration = Duration::from_secs(5);

/// Watches statuses until `cancel`.
pub async fn run(site: SiteManager, cancel: CancellationToken) {
    let started = Instant::now();
    every_tick(&cancel, || step(&site, started)).await;
}

async fn step(site: &SiteManager, started: Instant) {
    let now = now_ms();
    let live = &site.control().live;
    let (protected, statuses) = site.node().read_local(|s| {
        let statuses = s
            .vpgs
            .values()
            .map(|g| (g.id.clone(), g.name.clone(), live.status(s, g, now)))
            .collect::<Vec<_>>();
        let protected: Vec<Vpg> = s
            .vpgs
            .values()
            .filter(|g| Some(&g.protected_site) == s.site_id())
            .cloned()
            .collect();
        (protected, statuses)
    });
    live.note_statuses(&statuses, now);
    if started.elapsed() < BASELINE {
        return;
    }
    follow_tasks(site, &statuses, now).await;
    super::sync_pause::step(site, &protected, &statuses, now).await;
    record_statuses(site, &statuses, now).await;
}

/// Records each VPG's status where it differs from the one recorded last (by this leader
/// or one before it): EV0030 for a change, nothing for a VPG's first. Changes during a
/// leader's baseline are told once it ends, as one change from the recorded status.
async fn record_statuses(site: &SiteManager, statuses: &[(VpgId, String, LiveStatus)], now: u64) {
    let recorded = site.node().read_local(|s| s.recorded_status.clone());
    for (vpg, name, st) in statuses {
        let to = st.state;
        let event = match recorded.get(vpg) {
            Some(from) if (from.status, from.substatus) == (to.status, to.substatus) => continue,
            Some(from) => Some(NewEvent {
                at_ms: now,
                code: EventCode::StatusChanged,
                vpg: Some(vpg.clone()),
                description: format!(
                    "VPG {name:?}: {} / {} -> {} / {} ({})",
                    from.status, from.substatus, to.status, to.substatus, to.alert
                ),
            }),
            None => None,
        };
        let cmd = Command::RecordStatus {
            vpg: vpg.clone(),
            state: to,
            event,
        };
        if let Err(e) = site.node().propose(cmd).await {
            tracing::warn!(vpg = %vpg, error = %e, "status change not recorded");
        }
    }
}

/// A force sync that has not shown its sync yet may still be starting.
const FORCE_SYNC_GRACE_MS: u64 = 3000;

/// What a running task has come to: still running at some progress, or ended.
enum Outcome {
    Running(u8, String),
    Ended(bool, String),
}

fn outcome(t: &Task, s: &SiteState, st: Option<&LiveStatus>, now: u64) -> Outcome {
    let vpg = t.vpg.as_ref().and_then(|id| s.vpgs.get(id));
    let sync = || {
        st.and_then(|st| st.figures.sync.as_ref()).map_or_else(
            || Outcome::Running(0, "waiting for the VRAs".into()),
            |p| Outcome::Running(p.percent.min(99) as u8, format!("{:?} sync", p.kind)),
        )
    };
    let level = st.is_some_and(|st| st.level);
    match (t.kind, vpg) {
        (TaskKind::DeleteVpg, None) => Outcome::Ended(true, "deleted".into()),
        (TaskKind::DeleteVpg, Some(g)) if g.operation == Some(Operation::DeleteFailed) => {
            Outcome::Ended(
                false,
                "VPG waiting to be removed: retry the delete or force it".into(),
            )
        }
        (TaskKind::DeleteVpg, Some(_)) => Outcome::Running(50, "unassigning the VRAs".into()),
        (_, None) => Outcome::Ended(false, "the VPG was deleted".into()),
        (TaskKind::CreateVpg, Some(g)) if g.operation != Some(Operation::Creating) => {
            Outcome::Ended(true, "protected: initial sync done".into())
        }
        (TaskKind::EditVpg, Some(g)) if t.generation.is_some_and(|e| g.generation > e) => {
            Outcome::Ended(true, "superseded by a later edit".into())
        }
        (TaskKind::EditVpg, Some(g)) if level && t.generation == Some(g.generation) => {
            Outcome::Ended(true, "the VRAs protect the new definition".into())
        }
        (TaskKind::ForceSync, Some(_))
            if level && now.saturating_sub(t.started_ms) > FORCE_SYNC_GRACE_MS =>
        {
            Outcome::Ended(true, "delta sync done".into())
        }
        (TaskKind::CreateVpg | TaskKind::EditVpg | TaskKind::ForceSync, Some(_)) => sync(),
        // A test's end ends its task (EndFailoverTest); until then it shows the step.
        (TaskKind::FailoverTest, Some(g)) => match s.tests.get(&g.id).filter(|x| x.task == t.id) {
            Some(x) => {
                let (progress, what) = match x.step {
                    TestStep::Starting => (10, "opening the test images".to_string()),
                    TestStep::Running => (
                        50,
                        format!("test running: {} volumes served", x.volumes.len()),
                    ),
                    TestStep::Stopping => (90, "closing the test images".to_string()),
                };
                match &x.error {
                    Some(e) => Outcome::Running(progress, format!("{what} ({e})")),
                    None => Outcome::Running(progress, what),
                }
            }
            None => Outcome::Ended(false, "the failover test is gone".into()),
        },
        // A failover's end ends its task (EndRecovery); until then it shows the step.
        (TaskKind::Failover | TaskKind::Move, Some(g)) => {
            match s.recoveries.get(&g.id).filter(|x| x.task == t.id) {
                Some(x) => {
                    let progress = match x.step {
                        RecoveryStep::PreparingSource => 5,
                        RecoveryStep::Opening => 10,
                        RecoveryStep::BeforeCommit => 40,
                        RecoveryStep::Committing => 60,
                        RecoveryStep::Promoting => 80,
                        RecoveryStep::HandingOver => 95,
                        RecoveryStep::RollingBack => 90,
                    };
                    let what = format!("{} ({} volumes)", x.step.name(), x.volumes.len());
                    match &x.error {
                        Some(e) => Outcome::Running(progress, format!("{what}: {e}")),
                        None => Outcome::Running(progress, what),
                    }
                }
                None => Outcome::Ended(false, "the operation is gone".into()),
            }
        }
        // Instant tasks end with their call; one left running (its caller died) ends here.
        (_, Some(_)) => Outcome::Ended(true, "done".into()),
    }
}

async fn follow_tasks(site: &SiteManager, statuses: &[(VpgId, String, LiveStatus)], now: u64) {
    let decided: Vec<(u64, Outcome, u8, String)> = site.node().read_local(|s| {
        s.tasks
            .running()
            .iter()
            .map(|t| {
                let st = t
                    .vpg
                    .as_ref()
                    .and_then(|id| statuses.iter().find(|(g, _, _)| g == id))
                    .map(|(_, _, st)| st);
                (t.id, outcome(t, s, st, now), t.progress, t.message.clone())
            })
            .collect()
    });
    for (id, o, progress, message) in decided {
        match o {
            Outcome::Running(p, m) if (p, &m) != (progress, &message) => {
                let cmd = Command::UpdateTask {
                    id,
                    progress: p,
                    message: m,
                };
                if let Err(e) = site.node().propose(cmd).await {
                    tracing::debug!(task = id, error = %e, "task progress not recorded");
                }
            }
            Outcome::Running(..) => {}
            Outcome::Ended(ok, m) => site.end_task(Some(id), ok, m).await,
        }
    }
}
