//! The recovery controller, on the leader of the site that runs a recovery operation.
//!
//! Failover tests: it opens a writable scratch image of every volume at the test's
//! checkpoint on the recovery VRA of the volume's host, opens again an image that a
//! restarted VRA lost, and once the operator stops the test closes them all and ends the
//! test (result, task and event in one command).
//!
//! Failovers: every recovery VRA of the VPG starts the recovery before commit (its VMs'
//! volumes at the checkpoint); then the operator's word or the commit policy decides. A
//! commit first moves the VPG to a new generation in the replicated state (the point of no
//! return), then has every VRA promote and merge until its volumes are live on their
//! replicas; a rollback has every VRA give its recovery role back as it was.
//!
//! Every step is idempotent (the VRAs key theirs by the operation's id) and starts from
//! the replicated state, so a new leader repeats the current one; each step boundary is a
//! compare-and-set on the step, so a deposed leader's late proposal changes nothing.

use std::time::Duration;

use tandem_core::ids::{HostId, VmId};
use tandem_core::pairing::PeerSite;
use tandem_core::protection::recovery_plans;
use tandem_core::recovery::{
    FailoverTest, RecoveryAdvance, RecoveryIntent, RecoveryOp, RecoveryPoint, RecoveryStep,
    TestProgress, TestStep, TestVolume,
};
use tandem_core::state::{Command, SiteState};
use tandem_proto::v1;
use tokio_util::sync::CancellationToken;

use super::reconcile::applied;
use super::{TICK, call_vra_status, every, vra_request};
use crate::failpoint;
use crate::site::{SiteManager, now_ms};

/// How long a stopping test waits for a VRA that cannot be reached before it ends without
/// closing that VRA's images (they are not persisted: they go when the VRA restarts).
pub const CLOSE_PATIENCE: Duration = Duration::from_secs(30);

/// Drives the site's recovery operations every tick and soon after each committed change
/// (a stop reaches the VRAs at once), until `cancel`.
pub async fn run(site: SiteManager, cancel: CancellationToken) {
    every(TICK, &cancel, Some(applied(&site, &cancel)), || async {
        if site.control().live.observed_any() {
            pass(&site).await;
        }
    })
    .await;
}

/// One pass over every running test.
async fn pass(site: &SiteManager) {
    // A linearizable read: a new leader acts on the committed state, never a stale one.
    let state = match site.node().read(|s| s.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "recovery: no state");
            return;
        }
    };
    for test in state.tests.values() {
        match test.step {
            TestStep::Starting | TestStep::Running => serve(site, &state, test).await,
            TestStep::Stopping => stop(site, &state, test).await,
        }
    }
    for op in state.recoveries.values() {
        drive(site, &state, op).await;
    }
}

/// The recovery VRAs of an operation's VPG: (host, control address).
fn recovery_vras(state: &SiteState, op: &RecoveryOp) -> Result<Vec<(HostId, String)>, String> {
    let vpg = state
        .vpgs
        .get(&op.vpg)
        .ok_or_else(|| format!("VPG {} is gone", op.vpg))?;
    let plans = recovery_plans(vpg, state).map_err(|e| e.to_string())?;
    plans
        .into_iter()
        .map(|p| {
            let host = state
                .hosts
                .get(&p.host)
                .ok_or_else(|| format!("host {} is not in the inventory", p.host))?;
            Ok((p.host, host.vra_address.clone()))
        })
        .collect()
}

/// Runs one step of a failover.
async fn drive(site: &SiteManager, state: &SiteState, op: &RecoveryOp) {
    let vras = match recovery_vras(state, op) {
        Ok(v) => v,
        Err(e) => return advance(site, op, op.step, None, Some(e), None).await,
    };
    match op.step {
        RecoveryStep::PreparingSource | RecoveryStep::Opening
            if op.intent == Some(RecoveryIntent::Rollback) =>
        {
            advance(site, op, RecoveryStep::RollingBack, None, None, None).await;
        }
        RecoveryStep::PreparingSource => prepare_source(site, state, op).await,
        RecoveryStep::HandingOver => match finish_move(site, state, op, true).await {
            Ok(()) => end(site, op).await,
            Err(e) if !protected_site_reachable(site, state, op) => {
                // Committed here whatever it says: the protected site reads the outcome
                // from this site's report when it returns, and stands down then.
                tracing::warn!(vpg = %op.vpg, error = %e,
                    "the protected site cannot be told: it stands down when it returns");
                end(site, op).await;
            }
            Err(e) => {
                let error = Some(format!("removing the protected VMs: {e}"));
                advance(site, op, op.step, None, error, None).await;
            }
        },
        RecoveryStep::Opening => open_recovered(site, op, &vras).await,
        RecoveryStep::BeforeCommit => {
            let intent = match (op.intent, op.policy.due(op.step_since_ms, now_ms())) {
                (Some(i), _) => Some(i),
                (None, Some(due)) => {
                    tracing::info!(vpg = %op.vpg, ?due, "the commit policy decides");
                    let cmd = Command::RecoveryInput {
                        vpg: op.vpg.clone(),
                        intent: due,
                    };
                    site.node().propose(cmd).await.ok().map(|_| due)
                }
                (None, None) => None,
            };
            match intent {
                Some(RecoveryIntent::Commit) => {
                    advance(site, op, RecoveryStep::Committing, None, None, None).await;
                }
                Some(RecoveryIntent::Rollback) => {
                    advance(site, op, RecoveryStep::RollingBack, None, None, None).await;
                }
                None => {}
            }
        }
        RecoveryStep::Committing => {
            // Past every generation either site has seen, so that the old protected site's
            // VRAs, whatever they hold, are stale from now on.
            let vpg = state.vpgs.get(&op.vpg);
            let here = vpg.map_or(op.from_generation, |v| v.generation);
            let there = vpg
                .and_then(|v| site.control().live.peer_vpg(&v.protected_site, &v.id))
                .flatten()
                .map_or(0, |p| p.generation);
            let g = here.max(there).max(op.from_generation) + 1;
            advance(site, op, RecoveryStep::Promoting, None, None, Some(g)).await;
        }
        RecoveryStep::Promoting => promote(site, op, &vras).await,
        RecoveryStep::RollingBack => roll_back(site, state, op, &vras).await,
    }
}

/// Records a failover's move to `to` (or, at the same step, its progress) when it changed.
async fn advance(
    site: &SiteManager,
    op: &RecoveryOp,
    to: RecoveryStep,
    volumes: Option<Vec<TestVolume>>,
    error: Option<String>,
    new_generation: Option<u64>,
) {
    if to == op.step && error == op.error && volumes.as_ref().is_none_or(|v| *v == op.volumes) {
        return;
    }
    if to != op.step {
        tracing::info!(vpg = %op.vpg, op = %op.id, from = op.step.name(), to = to.name(), "recovery step");
    }
    let cmd = Command::AdvanceRecovery {
        advance: RecoveryAdvance {
            vpg: op.vpg.clone(),
            op: op.id.clone(),
            from: op.step,
            to,
            volumes,
            error,
            new_generation,
            point: None,
            now_ms: now_ms(),
        },
    };
    match site.node().propose(cmd).await {
        Ok(_) if to != op.step => failpoint::hit(&format!("recovery-step:{}", to.name())),
        Ok(_) => {}
        Err(e) => tracing::warn!(vpg = %op.vpg, error = %e, "recovery progress not recorded"),
    }
}

/// Calls `call` on every VRA at once; the errors, by host.
async fn on_every_vra<T, F, Fut>(
    site: &SiteManager,
    vras: &[(HostId, String)],
    call: F,
) -> (Vec<(HostId, T)>, Vec<String>)
where
    F: Fn(
        HostId,
        tandem_proto::v1::vra_control_client::VraControlClient<tonic::transport::Channel>,
    ) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let calls = vras.iter().map(|(host, addr)| {
        let client = site.control().vra(addr);
        let call = &call;
        async move {
            let r = match client {
                Ok(c) => call(host.clone(), c).await,
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            };
            (host.clone(), r)
        }
    });
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for (host, r) in futures::future::join_all(calls).await {
        match r {
            Ok(t) => ok.push((host, t)),
            Err(s) => errors.push(format!("host {host}: {}", s.message())),
        }
    }
    (ok, errors)
}

/// Every recovery VRA opens its VMs' volumes before commit.
async fn open_recovered(site: &SiteManager, op: &RecoveryOp, vras: &[(HostId, String)]) {
    let (opened, errors) = on_every_vra(site, vras, |_, mut c| async move {
        let req = v1::StartRecoveryRequest {
            vpg_id: op.vpg.to_string(),
            generation: op.from_generation,
            checkpoint_id: op.point.checkpoint_id,
            op_id: op.id.to_string(),
        };
        c.start_recovery(vra_request(req))
            .await
            .map(|r| r.into_inner())
    })
    .await;
    let mut volumes: Vec<TestVolume> = opened
        .into_iter()
        .flat_map(|(host, r)| {
            let (addr, socket) = (r.nbd_address, r.nbd_socket);
            r.volumes.into_iter().filter_map(move |v| {
                Some(TestVolume {
                    vm: VmId::parse("vm_id", &v.vm_id).ok()?,
                    volume_id: v.volume_id,
                    host: host.clone(),
                    export_name: v.export_name,
                    nbd_address: addr.clone(),
                    nbd_socket: socket.clone(),
                    size_bytes: v.size_bytes,
                })
            })
        })
        .collect();
    volumes.sort_by(|a, b| (&a.vm, a.volume_id).cmp(&(&b.vm, b.volume_id)));
    if errors.is_empty() {
        tracing::info!(vpg = %op.vpg, volumes = volumes.len(), checkpoint = op.point.checkpoint_id,
            "recovered volumes served before commit");
        advance(
            site,
            op,
            RecoveryStep::BeforeCommit,
            Some(volumes),
            None,
            None,
        )
        .await;
    } else {
        let error = format!("starting the recovery: {}", errors.join("; "));
        advance(
            site,
            op,
            RecoveryStep::Opening,
            Some(volumes),
            Some(error),
            None,
        )
        .await;
    }
}

/// Every recovery VRA commits (promotes, merges); the operation ends once every volume is
/// live on its replica.
async fn promote(site: &SiteManager, op: &RecoveryOp, vras: &[(HostId, String)]) {
    let Some(g) = op.new_generation else { return };
    let (states, mut errors) = on_every_vra(site, vras, |_, mut c| async move {
        let req = v1::CommitRecoveryRequest {
            vpg_id: op.vpg.to_string(),
            op_id: op.id.to_string(),
            new_generation: g,
        };
        c.commit_recovery(vra_request(req)).await?;
        let status = c
            .get_status(vra_request(v1::GetVraStatusRequest {}))
            .await?
            .into_inner();
        Ok(status
            .vpgs
            .into_iter()
            .find(|s| s.vpg_id == op.vpg.as_str()))
    })
    .await;
    let mut waiting = 0;
    for (host, s) in states {
        match s {
            Some(s) if s.recovered_phase == v1::RecoveredPhase::Live as i32 => {}
            Some(s) if !s.last_error.is_empty() => {
                errors.push(format!("host {host}: {}", s.last_error));
            }
            _ => waiting += 1,
        }
    }
    if errors.is_empty() && waiting == 0 {
        tracing::info!(vpg = %op.vpg, generation = g, kind = op.kind.name(), "committed: volumes live");
        if op.touches_source() {
            advance(site, op, RecoveryStep::HandingOver, None, None, None).await;
        } else {
            end(site, op).await;
        }
        return;
    }
    let error = (!errors.is_empty()).then(|| format!("promoting: {}", errors.join("; ")));
    advance(site, op, RecoveryStep::Promoting, None, error, None).await;
}

/// Every recovery VRA rolls back; the operation ends once all have.
async fn roll_back(
    site: &SiteManager,
    state: &SiteState,
    op: &RecoveryOp,
    vras: &[(HostId, String)],
) {
    let (_, errors) = on_every_vra(site, vras, |_, mut c| async move {
        let req = v1::RollbackRecoveryRequest {
            vpg_id: op.vpg.to_string(),
            op_id: op.id.to_string(),
        };
        c.rollback_recovery(vra_request(req)).await.map(|_| ())
    })
    .await;
    if !errors.is_empty() {
        let error = format!("rolling back: {}", errors.join("; "));
        return advance(site, op, RecoveryStep::RollingBack, None, Some(error), None).await;
    }
    if op.touches_source()
        && let Err(e) = finish_move(site, state, op, false).await
    {
        if protected_site_reachable(site, state, op) {
            let error = Some(format!("powering the protected VMs on again: {e}"));
            return advance(site, op, RecoveryStep::RollingBack, None, error, None).await;
        }
        // A rollback never waits for a site that is gone.
        tracing::warn!(vpg = %op.vpg, error = %e,
            "rolled back without the protected site: its VMs stay powered off there");
    }
    end(site, op).await;
}

/// Whether the protected site of the operation's VPG answers this site's poller.
fn protected_site_reachable(site: &SiteManager, state: &SiteState, op: &RecoveryOp) -> bool {
    state
        .vpgs
        .get(&op.vpg)
        .and_then(|v| site.control().live.peer_vpg(&v.protected_site, &v.id))
        .is_some()
}

/// Ends a promoted (committed) or rolled-back operation.
async fn end(site: &SiteManager, op: &RecoveryOp) {
    let cmd = Command::EndRecovery {
        vpg: op.vpg.clone(),
        op: op.id.clone(),
        now_ms: now_ms(),
    };
    match site.node().propose(cmd).await {
        Ok(_) => {
            tracing::info!(vpg = %op.vpg, kind = op.kind.name(), step = op.step.name(), "recovery operation ended")
        }
        Err(e) => tracing::warn!(vpg = %op.vpg, error = %e, "recovery end not recorded"),
    }
}

/// The protected site of the operation's VPG, as paired.
fn protected_peer<'a>(state: &'a SiteState, op: &RecoveryOp) -> Result<&'a PeerSite, String> {
    let vpg = state
        .vpgs
        .get(&op.vpg)
        .ok_or_else(|| format!("VPG {} is gone", op.vpg))?;
    state
        .peers
        .get(&vpg.protected_site)
        .ok_or_else(|| format!("site {} is not paired", vpg.protected_site))
}

/// A move's first step: the protected site powers its VMs off, drains, and takes the last
/// checkpoint, which the move then recovers to.
async fn prepare_source(site: &SiteManager, state: &SiteState, op: &RecoveryOp) {
    let peer = match protected_peer(state, op) {
        Ok(p) => p,
        Err(e) => return advance(site, op, op.step, None, Some(e), None).await,
    };
    let r = site
        .peer_call(peer, |mut c| {
            let req = v1::PeerMoveRequest {
                vpg_id: op.vpg.to_string(),
                op_id: op.id.to_string(),
                drain: op.drains_source(),
            };
            async move { c.prepare_move(req).await }
        })
        .await;
    match r {
        Ok(done) if done.done => {
            let point = if op.to_last_checkpoint {
                RecoveryPoint {
                    checkpoint_id: done.checkpoint_id,
                    timestamp_ms: done.checkpoint_ms,
                    name: done.checkpoint_name,
                }
            } else {
                op.point.clone()
            };
            tracing::info!(vpg = %op.vpg, checkpoint = point.checkpoint_id, "move: the protected site is drained");
            advance_to_point(site, op, point).await;
        }
        Ok(waiting) => {
            let error = Some(format!("waiting for {}", waiting.waiting_for));
            advance(site, op, op.step, None, error, None).await;
        }
        Err(e) => {
            let error = Some(format!("preparing the protected site: {e}"));
            advance(site, op, op.step, None, error, None).await;
        }
    }
}

/// A move's protected site drained: the move opens the volumes at its last checkpoint.
async fn advance_to_point(site: &SiteManager, op: &RecoveryOp, point: RecoveryPoint) {
    let cmd = Command::AdvanceRecovery {
        advance: RecoveryAdvance {
            vpg: op.vpg.clone(),
            op: op.id.clone(),
            from: op.step,
            to: RecoveryStep::Opening,
            volumes: None,
            error: None,
            new_generation: None,
            point: Some(point),
            now_ms: now_ms(),
        },
    };
    match site.node().propose(cmd).await {
        Ok(_) => failpoint::hit(&format!("recovery-step:{}", RecoveryStep::Opening.name())),
        Err(e) => tracing::warn!(vpg = %op.vpg, error = %e, "move progress not recorded"),
    }
}

/// Tells the protected site how a move ended.
async fn finish_move(
    site: &SiteManager,
    state: &SiteState,
    op: &RecoveryOp,
    committed: bool,
) -> Result<(), String> {
    let peer = protected_peer(state, op)?;
    site.peer_call(peer, |mut c| {
        let req = v1::PeerFinishMoveRequest {
            vpg_id: op.vpg.to_string(),
            op_id: op.id.to_string(),
            committed,
        };
        async move { c.finish_move(req).await }
    })
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// A volume a test serves, and the VRA that serves it.
struct Wanted {
    vm: VmId,
    volume_id: u32,
    host: HostId,
    vra: String,
}

/// Every volume of every VM of the test's VPG, on the recovery host of its VM.
fn wanted(state: &SiteState, test: &FailoverTest) -> Result<Vec<Wanted>, String> {
    let vpg = state
        .vpgs
        .get(&test.vpg)
        .ok_or_else(|| format!("VPG {} is gone", test.vpg))?;
    let plans = recovery_plans(vpg, state).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for plan in plans {
        let host = state
            .hosts
            .get(&plan.host)
            .ok_or_else(|| format!("host {} is not in the inventory", plan.host))?;
        for vm in plan.vms {
            for v in vm.volumes {
                out.push(Wanted {
                    vm: vm.vm.clone(),
                    volume_id: v.volume_id,
                    host: plan.host.clone(),
                    vra: host.vra_address.clone(),
                });
            }
        }
    }
    Ok(out)
}

/// Opens what the test does not serve yet (or no longer: a VRA that restarted lost its
/// images, and what the test VM wrote with them).
async fn serve(site: &SiteManager, state: &SiteState, test: &FailoverTest) {
    let wanted = match wanted(state, test) {
        Ok(w) => w,
        Err(e) => return progress(site, test, test.step, test.volumes.clone(), Some(e)).await,
    };
    let live = &site.control().live;
    let mut volumes = Vec::with_capacity(wanted.len());
    let mut errors = Vec::new();
    for w in wanted {
        let served = test
            .volumes
            .iter()
            .find(|v| v.vm == w.vm && v.volume_id == w.volume_id && v.host == w.host);
        if let Some(v) = served {
            let lost = live
                .vra(&w.host)
                .is_some_and(|o| o.vpgs.is_ok() && !o.exports.contains(&v.export_name));
            if !lost {
                volumes.push(v.clone());
                continue;
            }
            tracing::warn!(vpg = %test.vpg, export = %v.export_name, host = %w.host,
                "a test image is gone (its VRA restarted): opening it again, without what the test VM wrote");
        }
        let req = v1::OpenExportRequest {
            vpg_id: test.vpg.to_string(),
            vm_id: w.vm.to_string(),
            volume_id: w.volume_id,
            checkpoint_id: test.point.checkpoint_id,
            writable: true,
        };
        let opened = match site.control().vra(&w.vra) {
            Ok(mut c) => c
                .open_export(vra_request(req))
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.message().to_string()),
            Err(e) => Err(e.to_string()),
        };
        match opened {
            Ok(e) => volumes.push(TestVolume {
                vm: w.vm,
                volume_id: w.volume_id,
                host: w.host,
                export_name: e.export_name,
                nbd_address: e.nbd_address,
                nbd_socket: e.nbd_socket,
                size_bytes: e.size_bytes,
            }),
            Err(e) => errors.push(format!(
                "VM {} volume {} on host {}: {e}",
                w.vm, w.volume_id, w.host
            )),
        }
    }
    let step = if errors.is_empty() {
        TestStep::Running
    } else {
        test.step
    };
    let error = (!errors.is_empty()).then(|| format!("opening test images: {}", errors.join("; ")));
    if step == TestStep::Running && test.step == TestStep::Starting {
        tracing::info!(vpg = %test.vpg, volumes = volumes.len(), checkpoint = test.point.checkpoint_id,
            "failover test images served");
    }
    progress(site, test, step, volumes, error).await;
}

/// Records the test's progress when it changed.
async fn progress(
    site: &SiteManager,
    test: &FailoverTest,
    step: TestStep,
    volumes: Vec<TestVolume>,
    error: Option<String>,
) {
    if step == test.step && volumes == test.volumes && error == test.error {
        return;
    }
    let cmd = Command::ProgressFailoverTest {
        progress: TestProgress {
            vpg: test.vpg.clone(),
            task: test.task,
            step,
            volumes,
            error,
        },
    };
    if let Err(e) = site.node().propose(cmd).await {
        tracing::warn!(vpg = %test.vpg, error = %e, "failover test progress not recorded");
    }
}

/// Closes every image of a stopping test, then ends it. A VRA that cannot be reached for
/// [`CLOSE_PATIENCE`] after the stop is left behind, and named in the result.
async fn stop(site: &SiteManager, state: &SiteState, test: &FailoverTest) {
    let patience_over =
        now_ms().saturating_sub(test.stop_requested_ms) > CLOSE_PATIENCE.as_millis() as u64;
    let mut open = Vec::new();
    let mut left = Vec::new();
    for v in &test.volumes {
        let Some(host) = state.hosts.get(&v.host) else {
            continue;
        };
        let name = v.export_name.clone();
        let r = call_vra_status(site, &host.vra_address, |mut c| async move {
            c.close_export(vra_request(v1::CloseExportRequest { export_name: name }))
                .await
        })
        .await;
        match r {
            // Closed, or already gone (closed by an earlier pass, or lost with a restart).
            Ok(()) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(_) if patience_over => left.push(format!("{} on host {}", v.export_name, v.host)),
            Err(s) => open.push(format!(
                "{} on host {}: {}",
                v.export_name,
                v.host,
                s.message()
            )),
        }
    }
    if !open.is_empty() {
        let error = Some(format!("closing test images: {}", open.join("; ")));
        return progress(site, test, test.step, test.volumes.clone(), error).await;
    }
    let cmd = Command::EndFailoverTest {
        vpg: test.vpg.clone(),
        task: test.task,
        stopped_ms: now_ms(),
        left,
    };
    match site.node().propose(cmd).await {
        Ok(_) => tracing::info!(vpg = %test.vpg, task = test.task, "failover test ended"),
        Err(e) => tracing::warn!(vpg = %test.vpg, error = %e, "failover test end not recorded"),
    }
}
