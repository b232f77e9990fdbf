//! The demo's recovery operations: the workload's end and its named checkpoint, a move there and back, and a failover after site-a is lost.

use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use tandem_nbd::NbdClient;
use tandem_proto::v1;
use tandem_proto::v1::{
    recovery_service_client::RecoveryServiceClient, vpg_service_client::VpgServiceClient,
};

use crate::units::fmt_bytes;
use tandem_testkit::lab::Lab;
use tandem_testkit::workload::{History, ImageReader, check_final};

use super::options::*;
use super::watch::*;

/// A move to site-b with nothing lost, reverse protection, and the move back: site-a's VMs
/// are powered off and drained, a last checkpoint is taken and the VMs come up at site-b
/// holding every write the workload acknowledged; the commit protects them back to site-a,
/// whose disks of them take only a delta sync (bytes sent reported). The move back runs at
/// site-a the same way and protects the VMs forward again; every write is still there.
pub(crate) async fn move_and_back(lab: &Lab, report: &mut Report, run: &Run) {
    let ctx = &run.ctx;
    let t = Instant::now();
    let r = move_once(lab, ctx, run, &ctx.b, &ctx.a, 1).await;
    report.image("move", r.is_ok());
    let there = r.is_ok();
    report.step("move to site-b, nothing lost; protected back (delta)", t, r);
    if !there {
        return;
    }
    let t = Instant::now();
    let r = move_once(lab, ctx, run, &ctx.a, &ctx.b, 0).await;
    report.image("move back", r.is_ok());
    report.step("move back to site-a, nothing lost; protected again", t, r);
}

/// One move of the demo's VPG to the site of `to` (its VRAs: `lab.vras[to_site]`), from
/// the site of `from`, committed with reverse protection.
pub(crate) async fn move_once(
    lab: &Lab,
    ctx: &Ctx,
    run: &Run,
    to: &Managers,
    from: &Managers,
    to_site: usize,
) -> Result<String> {
    let t = Instant::now();
    let history = run.history.as_ref().context("no workload history")?;
    let vpg = ctx.vpg.clone();
    let started = to
        .ask(|ch| {
            let vpg = vpg.clone();
            async move {
                RecoveryServiceClient::new(ch)
                    .start_move(v1::StartMoveRequest {
                        reverse: v1::ReverseProtection::Yes as i32,
                        vpg_id: vpg,
                        commit_policy: v1::CommitPolicyKind::Manual as i32,
                        commit_after_secs: 0,
                    })
                    .await
            }
        })
        .await?;
    let (op, clients) = before_commit(to, &ctx.vpg, &started.op_id).await?;
    let up_in = t.elapsed();
    let checked = check_recovered(history, &clients).await;
    for c in clients {
        let _ = c.disconnect().await;
    }
    let moved = checked?;
    let (_, sub) = to.shown(&ctx.vpg).await?;
    to.ask(|ch| {
        let vpg = vpg.clone();
        async move {
            RecoveryServiceClient::new(ch)
                .commit_recovery(v1::RecoveryRef { vpg_id: vpg })
                .await
        }
    })
    .await?;
    to.wait_no_recovery(&ctx.vpg, "the commit to end").await?;
    let committed = t.elapsed();
    let mut seen = Vec::new();
    to.wait_shown(&ctx.vpg, PATIENCE, &mut seen, |s, _| s == "Meeting SLA")
        .await?;
    let direction = to.vpg(&ctx.vpg).await?.direction;
    if direction != "outgoing" {
        bail!("{} shows the VPG {direction} after the move", to.site);
    }
    let protected_in = t.elapsed();
    // What the delta syncs of the old site's disks sent, once every protected VRA of the
    // new site ran its own.
    let (finished, _) =
        tandem_testkit::protect::finished_syncs(lab, to_site, &ctx.vpg, PATIENCE).await?;
    let sent: u64 = finished.iter().map(|s| s.sent_bytes).sum();
    let hashes: u64 = finished.iter().map(|s| s.hash_bytes).sum();
    let kinds: Vec<i32> = finished.iter().map(|s| s.kind).collect();
    let deltas = [
        v1::VraSyncKind::Delta as i32,
        v1::VraSyncKind::VolumeDelta as i32,
    ];
    if kinds.is_empty() || kinds.iter().any(|k| !deltas.contains(k)) {
        bail!("the protection back ran {kinds:?}, not delta syncs");
    }
    let total: u64 = op.volumes.iter().map(|v| v.size_bytes).sum();
    // The old site learns the end of the syncs from the new one's reports: only once it
    // shows Meeting SLA too may the VPG move back (a sync refuses recovery there).
    let mut seen_old = Vec::new();
    from.wait_shown(&ctx.vpg, PATIENCE, &mut seen_old, |s, _| s == "Meeting SLA")
        .await?;
    let (old_status, old_sub) = from.shown(&ctx.vpg).await?;
    Ok(format!(
        "{:?} taken; {} volumes up at {} in {} ({sub}) holding {} writes = all \
         acknowledged; committed in {}, protected back to {} in {} (delta sync of {} of \
         volumes: {} of checksums exchanged, {} of data sent; {} shows {old_status} / \
         {old_sub})",
        op.checkpoint_name,
        op.volumes.len(),
        to.site,
        secs(up_in),
        moved.writes_included,
        secs(committed),
        from.site,
        secs(protected_in),
        fmt_bytes(total),
        fmt_bytes(hashes),
        fmt_bytes(sent),
        from.site,
    ))
}

/// The protected site is lost (kill -9 of every manager and VRA of site-a) and site-b's
/// managers fail the VPG over to the latest checkpoint: RTO from the request to every
/// recovered volume answering a read; the volumes hold every write the workload
/// acknowledged (it stopped before, so the latest checkpoint holds all of it), before
/// commit and again once the commit has promoted the journals and the VPG is Recovered.
pub(crate) async fn disaster_failover(lab: &mut Lab, report: &mut Report, run: &Run) {
    let ctx = &run.ctx;
    let t = Instant::now();
    let r = async {
        let history = run.history.as_ref().context("no workload history")?;
        for m in &mut lab.sites[0] {
            m.kill9().await?;
        }
        for v in &mut lab.vras[0] {
            v.kill9().await?;
        }
        let requested = Instant::now();
        let vpg = ctx.vpg.clone();
        let op = ctx
            .b
            .ask(|ch| {
                let vpg = vpg.clone();
                async move {
                    RecoveryServiceClient::new(ch)
                        .start_failover(v1::StartFailoverRequest {
                            reverse: v1::ReverseProtection::Default as i32,
                            vpg_id: vpg,
                            checkpoint: None,
                            commit_policy: v1::CommitPolicyKind::Manual as i32,
                            commit_after_secs: 0,
                            shutdown: v1::ShutdownVms::No as i32,
                        })
                        .await
                }
            })
            .await?;
        let (op, clients) = before_commit(&ctx.b, &ctx.vpg, &op.op_id).await?;
        for c in &clients {
            c.read(0, 4096).await?;
        }
        let rto = requested.elapsed();
        let volumes = clients.len();
        let before = check_recovered(history, &clients).await?;
        let (_, sub) = ctx.b.shown(&ctx.vpg).await?;
        ctx.b
            .ask(|ch| {
                let vpg = vpg.clone();
                async move {
                    RecoveryServiceClient::new(ch)
                        .commit_recovery(v1::RecoveryRef { vpg_id: vpg })
                        .await
                }
            })
            .await?;
        let committing = Instant::now();
        ctx.b
            .wait_no_recovery(&ctx.vpg, "the commit to end")
            .await?;
        let promoted = committing.elapsed();
        let (status, _) = ctx.b.shown(&ctx.vpg).await?;
        if status != "Recovered" {
            bail!("site-b shows {status} after the commit");
        }
        let after = check_recovered(history, &clients).await?;
        for c in clients {
            let _ = c.disconnect().await;
        }
        report.note(
            "failover",
            format!(
                "RTO {} (request -> {volumes} volumes answering reads), commit {}",
                ms(rto),
                secs(promoted)
            ),
        );
        Ok(format!(
            "site-a gone (3 managers, 2 VRAs); failover to checkpoint {}: RTO {}, {sub}, \
             {} writes = all acknowledged; committed in {} (promoted behind the VMs), \
             Recovered, still {} writes",
            op.checkpoint_id,
            ms(rto),
            before.writes_included,
            secs(promoted),
            after.writes_included
        ))
    }
    .await;
    report.image("failover", r.is_ok());
    report.step("kill -9 site-a; failover at site-b = source", t, r);
}

/// Waits for operation `op_id` of `vpg` at `site` to be before commit; answers it with an
/// NBD client on volume 0 of each VM, in VM order.
pub(crate) async fn before_commit(
    site: &Managers,
    vpg: &str,
    op_id: &str,
) -> Result<(v1::RecoveryOperation, Vec<NbdClient>)> {
    let op = until_some("the recovered volumes", PATIENCE, || async {
        site.recoveries(vpg)
            .await
            .ok()?
            .into_iter()
            .find(|o| o.op_id == op_id && o.step == "before commit")
    })
    .await?;
    let mut volumes: Vec<&v1::RecoveredVolume> =
        op.volumes.iter().filter(|v| v.volume_id == 0).collect();
    volumes.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    let mut clients = Vec::new();
    for v in &volumes {
        clients.push(NbdClient::connect_uri(&v.nbd_uri).await?);
    }
    Ok((op, clients))
}

/// Checks recovered volumes (one per VM, in order) against the whole stopped workload.
pub(crate) async fn check_recovered(
    history: &History,
    clients: &[NbdClient],
) -> Result<tandem_testkit::workload::CheckReport> {
    let images: Vec<&dyn ImageReader> = clients.iter().map(|c| c as &dyn ImageReader).collect();
    check_final(history, &images)
        .await
        .map_err(|e| anyhow!("recovered volumes: {e}"))
}

/// Stops the workload, waits for Meeting SLA, takes a named checkpoint through the API and
/// checks that its image holds every acknowledged write.
pub(crate) async fn finish(report: &mut Report, run: &mut Run) -> Result<String> {
    let ctx = run.ctx.clone();
    let workload = run.workload.take().context("no workload")?;
    let history = workload.stop().await;
    if let Some(f) = history.failures().first() {
        bail!(
            "{} writes failed, first {}: {}",
            history.failures().len(),
            f.write,
            f.error
        );
    }
    let t = Instant::now();
    let mut seen = Vec::new();
    ctx.a
        .wait_shown(&ctx.vpg, PATIENCE, &mut seen, |s, _| s == "Meeting SLA")
        .await?;
    let vpg = ctx.vpg.clone();
    let taken = ctx
        .a
        .ask(|ch| {
            let vpg = vpg.clone();
            async move {
                VpgServiceClient::new(ch)
                    .add_checkpoint(v1::AddCheckpointRequest {
                        vpg_ids: vec![vpg],
                        name: "demo-final".into(),
                        kind: v1::CheckpointKind::Manual as i32,
                        vm_id: String::new(),
                    })
                    .await
            }
        })
        .await?
        .checkpoints
        .into_iter()
        .next()
        .context("no checkpoint taken")?;
    let cp = until_some("the named checkpoint to be usable", PATIENCE, || async {
        ctx.b
            .checkpoints(&ctx.vpg, taken.timestamp_ms)
            .await
            .ok()?
            .into_iter()
            .find(|c| c.id == taken.id && c.usable)
    })
    .await?;
    let usable_after = t.elapsed();
    let checked = run.check(&cp, Some(&history)).await?;
    run.history = Some(history.clone());
    let g = ctx.a.vpg(&ctx.vpg).await?;
    let s = g.status.unwrap_or_default();
    report.note(
        "workload",
        format!(
            "{} writes, all acknowledged, none failed; VPG provisioned {}, used {}",
            history.acked_writes(),
            fmt_bytes(s.provisioned_bytes),
            fmt_bytes(s.used_bytes),
        ),
    );
    Ok(format!(
        "{} writes acked, none failed; checkpoint '{}' usable {} after the stop; {checked}",
        history.acked_writes(),
        cp.name,
        secs(usable_after)
    ))
}
