//! Recovery operations as the site manager starts, commits, rolls back and stops them
//! (failover tests, failovers): requests are checked against the replicated state and the
//! live status, the checkpoint is chosen from the recovery VRAs' journals, and the
//! operation is recorded in the replicated state with its task and event. The recovery
//! site's leader then drives the VRAs (`control/recovery.rs`).

use tandem_core::DomainError;
use tandem_core::events::EventCode;
use tandem_core::ids::{HostId, RecoveryOpId, VpgId};
use tandem_core::protection::protected_plans;
use tandem_core::recovery::{
    CheckpointChoice, CommitPolicy, FailoverTest, ListedCheckpoint, RecoveryIntent, RecoveryKind,
    RecoveryOp, RecoveryPoint, RecoveryStep, Shutdown, TestStep, TestVerdict, choose_checkpoint,
};
use tandem_core::state::Command;
use tandem_core::tasks::TaskKind;
use tandem_proto::v1;
use tandem_proto::vra_convert::sync_name;

use crate::control;
use crate::error::ApiResult;
use crate::site::{SiteManager, now_ms};

/// A failover or move as asked, before it is recorded.
struct RecoveryPlan {
    kind: RecoveryKind,
    /// For its task and event.
    what: String,
    point: RecoveryPoint,
    policy: CommitPolicy,
    shutdown: Shutdown,
    to_last_checkpoint: bool,
    /// Protect the VMs back on commit.
    reverse: bool,
}

/// What an operator tells a running task (`TaskService.TaskInput`).
#[derive(Debug, Clone)]
pub enum TaskInput {
    /// Commit or roll back the failover or move the task runs.
    Recovery(RecoveryIntent),
    /// Stop the failover test the task runs, with this verdict.
    StopTest(TestVerdict),
}

impl SiteManager {
    /// Gives a running task the operator's word: the failover, move or failover test whose
    /// task it is takes it as from its own command. Answers the task.
    pub async fn task_input(
        &self,
        task: u64,
        input: TaskInput,
    ) -> ApiResult<tandem_core::tasks::Task> {
        let vpg = self
            .node()
            .read(move |s| {
                let recovery = s.recoveries.values().find(|r| r.task == task);
                let test = s.tests.values().find(|t| t.task == task);
                match (&input, recovery, test) {
                    (TaskInput::Recovery(_), Some(op), _) => Ok(op.vpg.clone()),
                    (TaskInput::StopTest(_), _, Some(t)) => Ok(t.vpg.clone()),
                    _ => Err(DomainError::precondition(format!(
                        "task {task} is not a running {} here",
                        match input {
                            TaskInput::Recovery(_) => "failover or move",
                            TaskInput::StopTest(_) => "failover test",
                        }
                    ))),
                }
                .map(|vpg| (vpg, input))
            })
            .await??;
        match vpg {
            (vpg, TaskInput::Recovery(intent)) => {
                self.recovery_input(vpg, intent).await?;
            }
            (vpg, TaskInput::StopTest(verdict)) => {
                self.stop_failover_tests(vec![vpg], verdict).await?;
            }
        }
        self.task(task).await
    }

    /// Starts a failover test of each VPG (recovered at this site), at the checkpoint
    /// `choice` names. Every VPG is checked, and its checkpoint chosen, before any starts.
    pub async fn start_failover_tests(
        &self,
        vpgs: Vec<VpgId>,
        choice: CheckpointChoice,
    ) -> ApiResult<Vec<FailoverTest>> {
        let mut planned = Vec::with_capacity(vpgs.len());
        for id in vpgs {
            let check = id.clone();
            self.node()
                .read(move |s| s.check_testable(&check))
                .await??;
            self.check_recoverable(&id).await?;
            let point = self.choose_point(&id, &choice).await?;
            planned.push((id, point));
        }
        let mut started = Vec::with_capacity(planned.len());
        for (id, point) in planned {
            let what = format!("failover test at {}", point.label());
            let Some(task) = self
                .start_task(TaskKind::FailoverTest, Some(&id), None, what.clone())
                .await
            else {
                return Err(crate::error::ApiError::unavailable(
                    "the test's task could not be recorded",
                ));
            };
            let test = FailoverTest {
                vpg: id.clone(),
                task,
                point,
                step: TestStep::Starting,
                started_ms: now_ms(),
                volumes: Vec::new(),
                verdict: None,
                stop_requested_ms: 0,
                error: None,
            };
            let cmd = Command::StartFailoverTest { test: test.clone() };
            self.start_recorded(cmd, task, EventCode::FailoverTestStarted, &id, &what)
                .await?;
            started.push(test);
        }
        Ok(started)
    }

    /// Stops the failover tests of these VPGs with the operator's verdict; the recovery
    /// controller closes their images and records the result.
    pub async fn stop_failover_tests(
        &self,
        vpgs: Vec<VpgId>,
        verdict: TestVerdict,
    ) -> ApiResult<()> {
        verdict.validate()?;
        let check = vpgs.clone();
        self.node()
            .read(move |s| {
                check.iter().try_for_each(|id| {
                    if s.tests.contains_key(id) {
                        Ok(())
                    } else {
                        Err(DomainError::precondition(format!(
                            "VPG {id} has no failover test running"
                        )))
                    }
                })
            })
            .await??;
        for vpg in vpgs {
            self.node()
                .propose(Command::StopFailoverTest {
                    vpg,
                    verdict: verdict.clone(),
                    now_ms: now_ms(),
                })
                .await?;
        }
        Ok(())
    }

    /// The running failover tests (of these VPGs; all when empty).
    pub async fn failover_tests(&self, vpgs: Vec<VpgId>) -> ApiResult<Vec<FailoverTest>> {
        self.node()
            .read(move |s| {
                s.tests
                    .values()
                    .filter(|t| vpgs.is_empty() || vpgs.contains(&t.vpg))
                    .cloned()
                    .collect()
            })
            .await
    }

    /// Fails a VPG over to this site at the checkpoint `choice` names: its VMs come up on
    /// before-commit volumes (the journals and replicas stay as they were until commit),
    /// then `policy` (or the operator) commits or rolls back. Works with the protected site
    /// gone.
    pub async fn start_failover(
        &self,
        id: VpgId,
        choice: CheckpointChoice,
        policy: CommitPolicy,
        shutdown: Shutdown,
        reverse: Option<bool>,
    ) -> ApiResult<RecoveryOp> {
        policy.validate()?;
        let check = id.clone();
        let (own, peer, reverse_default) = self
            .node()
            .read(move |s| {
                s.check_recoverable_here(&check)?;
                let vpg = &s.vpgs[&check];
                Ok::<_, DomainError>((
                    s.site_id().cloned(),
                    vpg.protected_site.clone(),
                    vpg.settings.reverse.enabled,
                ))
            })
            .await??;
        let own = own.ok_or_else(|| DomainError::precondition("site is not initialized"))?;
        if shutdown != Shutdown::No && !self.peer_reachable(&peer, &id).await? {
            return Err(DomainError::precondition(format!(
                "the protected site {peer} cannot be reached to shut its VMs down: fail over \
                 without shutting them down"
            ))
            .into());
        }
        self.check_recoverable(&id).await?;
        let point = self.choose_point(&id, &choice).await?;
        let what = format!(
            "failover to {}{}",
            point.label(),
            match shutdown {
                Shutdown::No => "",
                Shutdown::Yes => ", the protected VMs shut down first",
                Shutdown::Force => ", the protected VMs powered off first",
            }
        );
        let to_last = shutdown == Shutdown::Yes && choice == CheckpointChoice::Latest;
        let plan = RecoveryPlan {
            kind: RecoveryKind::Failover,
            what,
            point,
            policy,
            shutdown,
            to_last_checkpoint: to_last,
            reverse: reverse.unwrap_or(reverse_default),
        };
        self.begin_recovery(id, own, plan).await
    }

    /// Records a failover or move with its task and event; the recovery controller takes
    /// it from there.
    async fn begin_recovery(
        &self,
        id: VpgId,
        own: tandem_core::ids::SiteId,
        plan: RecoveryPlan,
    ) -> ApiResult<RecoveryOp> {
        let RecoveryPlan {
            kind,
            what,
            point,
            policy,
            shutdown,
            to_last_checkpoint,
            reverse,
        } = plan;
        let task_kind = match kind {
            RecoveryKind::Failover => TaskKind::Failover,
            RecoveryKind::Move => TaskKind::Move,
        };
        let Some(task) = self
            .start_task(task_kind, Some(&id), None, what.clone())
            .await
        else {
            return Err(crate::error::ApiError::unavailable(format!(
                "the {}'s task could not be recorded",
                kind.name()
            )));
        };
        let from_generation = self
            .node()
            .read({
                let id = id.clone();
                move |s| s.vpgs.get(&id).map_or(0, |v| v.generation)
            })
            .await?;
        let now = now_ms();
        let mut op = RecoveryOp {
            id: RecoveryOpId::minted(format!("{own}-{task}")),
            kind,
            vpg: id.clone(),
            task,
            point,
            policy,
            from_generation,
            new_generation: None,
            step: RecoveryStep::Opening,
            started_ms: now,
            step_since_ms: now,
            intent: None,
            volumes: Vec::new(),
            error: None,
            shutdown,
            to_last_checkpoint,
            reverse,
        };
        // A move, or a failover that shuts the protected VMs down, first has the protected
        // site power them off (and drain).
        if op.touches_source() {
            op.step = RecoveryStep::PreparingSource;
        }
        let cmd = Command::BeginRecovery { op: op.clone() };
        self.start_recorded(cmd, task, EventCode::RecoveryStarted, &id, &what)
            .await?;
        Ok(op)
    }

    /// Commits or rolls back the failover or move of a VPG (before commit only; the first
    /// word stands). Answers the operation as it is now.
    pub async fn recovery_input(&self, id: VpgId, intent: RecoveryIntent) -> ApiResult<RecoveryOp> {
        let (index, _) = self
            .node()
            .propose_indexed(Command::RecoveryInput {
                vpg: id.clone(),
                intent,
            })
            .await?;
        // Read back here, at the index the input was applied at: the leader may be gone
        // already (the operation it drives on may kill it, as chaos tests do), and the
        // answer must not depend on reaching it again.
        let vpg = id.clone();
        self.node()
            .read_after(index, move |s| s.recoveries.get(&vpg).cloned())
            .await?
            .ok_or_else(|| DomainError::not_found("recovery operation", &id).into())
    }

    /// Protects a VPG recovered here without reverse protection back towards its old
    /// protected site (`ProtectBack`); answers the turned VPG.
    pub async fn protect_back(
        &self,
        id: VpgId,
        pool: Option<tandem_core::ids::PoolId>,
    ) -> ApiResult<crate::site::VpgView> {
        self.node()
            .propose(Command::ProtectBack {
                vpg: id.clone(),
                pool,
                now_ms: crate::site::now_ms(),
            })
            .await?;
        self.vpg(id).await
    }

    /// The failovers and moves running at this site (of these VPGs; all when empty).
    pub async fn recoveries(&self, vpgs: Vec<VpgId>) -> ApiResult<Vec<RecoveryOp>> {
        self.node()
            .read(move |s| {
                s.recoveries
                    .values()
                    .filter(|r| vpgs.is_empty() || vpgs.contains(&r.vpg))
                    .cloned()
                    .collect()
            })
            .await
    }

    /// Moves a VPG to this (its recovery) site with nothing lost, both sites up: the
    /// protected site powers its VMs off, everything they wrote becomes durable here, a last
    /// checkpoint is taken, and the VMs come up here at it, before commit; then commit (the
    /// protected VMs are removed) or roll back (they are powered on again).
    pub async fn start_move(
        &self,
        id: VpgId,
        policy: CommitPolicy,
        reverse: Option<bool>,
    ) -> ApiResult<RecoveryOp> {
        policy.validate()?;
        let check = id.clone();
        let (own, peer) = self
            .node()
            .read(move |s| {
                s.check_recoverable_here(&check)?;
                let vpg = &s.vpgs[&check];
                Ok::<_, DomainError>((s.site_id().cloned(), vpg.protected_site.clone()))
            })
            .await??;
        let own = own.ok_or_else(|| DomainError::precondition("site is not initialized"))?;
        if !self.peer_reachable(&peer, &id).await? {
            return Err(DomainError::precondition(format!(
                "the protected site {peer} cannot be reached: a move needs both sites \
                 (fail over instead)"
            ))
            .into());
        }
        self.check_recoverable(&id).await?;
        let what = "move (to the protected site's last checkpoint)".to_string();
        // The checkpoint is the protected site's last, known once it is drained.
        let point = RecoveryPoint {
            checkpoint_id: 0,
            timestamp_ms: 0,
            name: String::new(),
        };
        let plan = RecoveryPlan {
            kind: RecoveryKind::Move,
            what,
            point,
            policy,
            shutdown: Shutdown::Yes,
            to_last_checkpoint: true,
            // The seed's default for a move.
            reverse: reverse.unwrap_or(true),
        };
        self.begin_recovery(id, own, plan).await
    }

    /// The protected VRAs of a VPG this site protects: (host, control address).
    async fn protected_vras(&self, id: &VpgId) -> ApiResult<Vec<(HostId, String)>> {
        let id = id.clone();
        Ok(self
            .node()
            .read(move |s| {
                let vpg = s
                    .vpgs
                    .get(&id)
                    .ok_or_else(|| DomainError::not_found(VpgId::KIND, &id))?;
                if Some(&vpg.protected_site) != s.site_id() {
                    return Err(DomainError::precondition(format!(
                        "VPG {id} is not protected by this site"
                    )));
                }
                protected_plans(vpg, s)?
                    .into_iter()
                    .map(|p| {
                        let host = s
                            .hosts
                            .get(&p.host)
                            .ok_or_else(|| DomainError::not_found(HostId::KIND, &p.host))?;
                        Ok((p.host, host.vra_address.clone()))
                    })
                    .collect()
            })
            .await??)
    }

    /// Powers the protected VMs of a VPG off or on at every protected VRA of it.
    async fn set_vm_power(&self, vras: &[(HostId, String)], id: &VpgId, on: bool) -> ApiResult<()> {
        for (host, addr) in vras {
            let req = v1::SetVmPowerRequest {
                vpg_id: id.to_string(),
                on,
            };
            self.control()
                .vra(addr)?
                .set_vm_power(control::vra_request(req))
                .await
                .map_err(|s| {
                    crate::error::ApiError::unavailable(format!(
                        "VRA of host {host}: {}",
                        s.message()
                    ))
                })?;
        }
        Ok(())
    }

    /// The protected site's part of a move (`SitePeer.PrepareMove`): VMs off, drained,
    /// then the last checkpoint.
    pub async fn prepare_move(
        &self,
        id: VpgId,
        op: RecoveryOpId,
        drain: bool,
    ) -> ApiResult<v1::PeerMoveResponse> {
        let check = id.clone();
        self.node()
            .read(move |s| s.check_operable(&check))
            .await??;
        let vras = self.protected_vras(&id).await?;
        self.set_vm_power(&vras, &id, false).await?;
        if !drain {
            tracing::info!(vpg = %id, op = %op, "protected VMs powered off (not drained)");
            return Ok(v1::PeerMoveResponse {
                done: true,
                ..Default::default()
            });
        }
        let mut waiting = Vec::new();
        for (host, addr) in &vras {
            let status = self
                .control()
                .vra(addr)?
                .get_status(control::vra_request(v1::GetVraStatusRequest {}))
                .await
                .map_err(|s| {
                    crate::error::ApiError::unavailable(format!(
                        "VRA of host {host}: {}",
                        s.message()
                    ))
                })?
                .into_inner();
            let drained = status
                .vpgs
                .iter()
                .find(|g| g.vpg_id == id.as_str())
                .is_some_and(|g| {
                    g.connected
                        && g.acked_seq >= g.written_seq
                        && g.dirty_bytes == 0
                        && !g.tracking
                        && g.sync.is_none()
                        && g.state != v1::VpgStreamState::NeedsSync as i32
                });
            if !drained {
                waiting.push(format!(
                    "host {host} to drain its writes to the recovery site"
                ));
            }
        }
        if !waiting.is_empty() {
            return Ok(v1::PeerMoveResponse {
                done: false,
                waiting_for: waiting.join("; "),
                ..Default::default()
            });
        }
        let taken = self
            .add_checkpoint(
                vec![id.clone()],
                format!("move {op}"),
                control::checkpoints::Kind::Manual,
                None,
            )
            .await?
            .pop()
            .ok_or_else(|| crate::error::ApiError::internal("no checkpoint taken"))?;
        tracing::info!(vpg = %id, op = %op, checkpoint = taken.id, "move: VMs off, drained, last checkpoint taken");
        Ok(v1::PeerMoveResponse {
            done: true,
            checkpoint_id: taken.id,
            checkpoint_ms: taken.timestamp_ms,
            checkpoint_name: taken.name,
            waiting_for: String::new(),
        })
    }

    /// The protected site's end of a move (`SitePeer.FinishMove`): committed, the VPG is
    /// Recovered here and the reconciler removes its protected VMs; rolled back, the VMs
    /// are powered on again.
    pub async fn finish_move(&self, id: VpgId, op: RecoveryOpId, committed: bool) -> ApiResult<()> {
        if committed {
            let check = id.clone();
            let generation = self
                .node()
                .read(move |s| s.vpgs.get(&check).map(|v| (v.generation, v.operation)))
                .await?;
            match generation {
                None | Some((_, Some(tandem_core::status::Operation::Recovered))) => {}
                Some((generation, _)) => {
                    self.node()
                        .propose(Command::SetVpgOperation {
                            id: id.clone(),
                            generation,
                            operation: Some(tandem_core::status::Operation::Recovered),
                            event: Some(crate::site::new_event(
                                EventCode::RecoveryCommitted,
                                &id,
                                format!(
                                    "move {op} committed at the peer site: the protected VMs \
                                     are removed here"
                                ),
                            )),
                        })
                        .await?;
                }
            }
            return Ok(());
        }
        let vras = self.protected_vras(&id).await?;
        self.set_vm_power(&vras, &id, true).await?;
        tracing::info!(vpg = %id, op = %op, "move rolled back: the protected VMs are on again");
        Ok(())
    }

    /// Proposes the command that starts a recovery operation; its task fails with it when
    /// it is refused, else the start is recorded as an event.
    async fn start_recorded(
        &self,
        cmd: Command,
        task: u64,
        code: EventCode,
        id: &VpgId,
        what: &str,
    ) -> ApiResult<()> {
        if let Err(e) = self.node().propose(cmd).await {
            self.end_task(Some(task), false, e.to_string()).await;
            return Err(e);
        }
        self.record_event(code, Some(id), format!("{what} started"))
            .await;
        Ok(())
    }

    /// Whether paired site `peer` answers about VPG `vpg`, as the leader sees it (only the
    /// leader polls the paired sites: a follower taking the call asks it).
    async fn peer_reachable(
        &self,
        peer: &tandem_core::ids::SiteId,
        vpg: &VpgId,
    ) -> ApiResult<bool> {
        let req = control::LeaderRequest::PeerReachable {
            site: peer.clone(),
            vpg: vpg.clone(),
        };
        match self.leader_call(req).await? {
            control::LeaderResponse::Reachable(r) => Ok(r),
            other => Err(crate::error::ApiError::internal(format!(
                "unexpected leader answer {other:?}"
            ))),
        }
    }

    /// Recovery is not possible while a sync other than a bitmap sync runs (the seed: the
    /// replica is not consistent during an initial, delta or volume sync).
    async fn check_recoverable(&self, id: &VpgId) -> ApiResult<()> {
        let view = self.vpg(id.clone()).await?;
        let sync = view.live.as_ref().and_then(|l| l.observation.sync);
        if let Some(kind) = sync.filter(|k| !k.allows_recovery()) {
            return Err(DomainError::precondition(format!(
                "VPG {id} is running a sync ({}): recovery is not possible until it ends",
                sync_name(kind)
            ))
            .into());
        }
        Ok(())
    }

    /// The checkpoint `choice` names, among those usable in every journal of the VPG.
    async fn choose_point(
        &self,
        id: &VpgId,
        choice: &CheckpointChoice,
    ) -> ApiResult<RecoveryPoint> {
        let listed: Vec<ListedCheckpoint> = control::recovery_checkpoints(self, id)
            .await?
            .into_iter()
            .map(|c| {
                let (name, _) = tandem_proto::vra_convert::split_marker_name(&c.name);
                ListedCheckpoint {
                    point: RecoveryPoint {
                        checkpoint_id: c.checkpoint_id,
                        timestamp_ms: c.timestamp_ms,
                        name,
                    },
                    usable: c.usable,
                }
            })
            .collect();
        Ok(choose_checkpoint(id, choice, &listed)?)
    }
}
