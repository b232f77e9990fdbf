//! The demo's faults under protection: a failover test, kill -9 of a leader, a link cut, kill -9 of a recovery VRA.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_nbd::NbdClient;
use tandem_proto::v1;
use tandem_proto::v1::{
    recovery_service_client::RecoveryServiceClient, vra_control_client::VraControlClient,
};

use crate::units::fmt_bytes;
use tandem_testkit::lab::{Lab, wait_leader};
use tandem_testkit::link::CutMode;
use tandem_testkit::workload::ImageReader;

use super::options::*;
use super::setup::*;
use super::watch::*;

/// A failover test at site-b under the workload, as an operator runs it: started at the
/// latest checkpoint, its test images (served by the recovery VRAs) checked against the
/// source at that checkpoint, a test VM's write, checkpoints going on during it, then
/// stopped, leaving no image behind. Reports one step.
pub(crate) async fn failover_test(report: &mut Report, run: &Run) {
    let ctx = &run.ctx;
    let t = Instant::now();
    let r = async {
        let vpg = ctx.vpg.clone();
        let started = ctx
            .b
            .ask(|ch| {
                let vpg = vpg.clone();
                async move {
                    RecoveryServiceClient::new(ch)
                        .start_failover_test(v1::StartFailoverTestRequest {
                            vpg_ids: vec![vpg],
                            checkpoint: None,
                        })
                        .await
                }
            })
            .await?;
        let task = started.tests.first().context("no test started")?.task_id;
        let test = until_some("the test images", PATIENCE, || async {
            let tests = ctx.b.failover_tests(&ctx.vpg).await.ok()?;
            tests.into_iter().find(|t| t.step == "running")
        })
        .await?;
        let served_in = t.elapsed();
        let mut volumes = test.volumes.clone();
        volumes.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        let mut clients = Vec::new();
        for v in &volumes {
            clients.push(NbdClient::connect_uri(&v.nbd_uri).await?);
        }
        let cp = v1::Checkpoint {
            id: test.checkpoint_id,
            timestamp_ms: test.checkpoint_ms,
            ..Default::default()
        };
        let checked = async {
            let images: Vec<&dyn ImageReader> =
                clients.iter().map(|c| c as &dyn ImageReader).collect();
            let (r, window) = run.check_at(&cp, &images).await?;
            // A test VM writes to its volume and reads it back.
            let marker = bytes::Bytes::from(vec![0x5c; 64 << 10]);
            clients[0].write(0, marker.clone(), false).await?;
            let back = clients[0].read(0, marker.len() as u32).await?;
            if back != marker {
                bail!("the test VM did not read back what it wrote");
            }
            anyhow::Ok((r, window))
        }
        .await;
        for c in clients {
            let _ = c.disconnect().await;
        }
        let (r, window) = checked?;
        let during = ctx.usable(test.checkpoint_ms + 1, now_ms()).len();
        ctx.b
            .ask(|ch| {
                let vpg = vpg.clone();
                async move {
                    RecoveryServiceClient::new(ch)
                        .stop_failover_test(v1::StopFailoverTestRequest {
                            vpg_ids: vec![vpg],
                            failed: false,
                            note: "demo: images checked against the source".into(),
                        })
                        .await
                }
            })
            .await?;
        until_some("the test to stop", PATIENCE, || async {
            ctx.b
                .failover_tests(&ctx.vpg)
                .await
                .ok()
                .filter(|t| t.is_empty())
        })
        .await?;
        for v in &ctx.vms {
            let exports = VraControlClient::new(tandem_testkit::process::vra_control(
                &v.rec_control,
                v.rec_harness.as_ref(),
            )?)
            .get_status(v1::GetVraStatusRequest {})
            .await?
            .into_inner()
            .exports;
            if let Some(left) = exports.iter().find(|e| e.ends_with("/rw")) {
                bail!("test image {left} left at {}", v.rec_host);
            }
        }
        report.note(
            "failover test",
            format!(
                "images served {} after the request, checkpoint {}",
                secs(served_in),
                test.checkpoint_id
            ),
        );
        Ok(format!(
            "task {task}: {} test images at checkpoint {}{window} served {} after the \
             request, holding {} writes; a test VM wrote and read 64 KiB; {during} \
             checkpoints listed during the test; stopped, no image left",
            volumes.len(),
            test.checkpoint_id,
            secs(served_in),
            r.writes_included,
        ))
    }
    .await;
    report.image("failover test", r.is_ok());
    report.step("failover test at site-b = source, stopped", t, r);
}

/// kill -9 of site-a's leader under the workload: a new leader, checkpoints resume under
/// it, no definition, task or event lost; an image under the new leader is checked.
pub(crate) async fn leader_kill(lab: &mut Lab, report: &mut Report, run: &Run) -> Result<()> {
    let ctx = &run.ctx;
    let t = Instant::now();
    let r = async {
        let events = ctx.a.events().await?;
        let tasks = ctx.a.tasks().await?;
        let status = wait_leader(&lab.sites[0][0].api, 3, Duration::from_secs(5)).await?;
        let leader = status.leader_id;
        let idx = lab.sites[0]
            .iter()
            .position(|p| p.id == leader)
            .context("leader not in lab")?;
        let acked = run.workload()?.acked();
        let killed_ms = now_ms();
        let killed_at = Instant::now();
        lab.sites[0][idx].kill9().await?;
        let survivor = lab.sites[0]
            .iter()
            .find(|p| p.id != leader)
            .context("no survivor")?
            .api
            .clone();
        let new_leader = until_some("a new leader", Duration::from_secs(10), || async {
            wait_leader(&survivor, 3, Duration::from_millis(300))
                .await
                .ok()
                .filter(|s| s.leader_id != leader && s.leader_id != 0)
                .map(|s| s.leader_id)
        })
        .await?;
        let elected = killed_at.elapsed();
        let cp = ctx.usable_after(killed_ms, Duration::from_secs(30)).await?;
        let resumed = Duration::from_millis(cp.timestamp_ms.saturating_sub(killed_ms));
        let acked_since = run.workload()?.acked() - acked;
        let (events_after, tasks_after) = (ctx.a.events().await?, ctx.a.tasks().await?);
        let lost_events = events
            .iter()
            .filter(|e| {
                !events_after
                    .iter()
                    .any(|x| x.id == e.id && x.code == e.code)
            })
            .count();
        let lost_tasks = tasks
            .iter()
            .filter(|e| !tasks_after.iter().any(|x| x.id == e.id))
            .count();
        ctx.a
            .vpg(&ctx.vpg)
            .await
            .context("the VPG after the kill")?;
        if lost_events + lost_tasks > 0 {
            bail!("{lost_events} events and {lost_tasks} tasks lost with the leader");
        }
        if resumed > Duration::from_secs(10) {
            bail!(
                "the first checkpoint under the new leader came {} after the kill",
                secs(resumed)
            );
        }
        lab.sites[0][idx].start("join").await?;
        lab.write_file()?;
        report.note(
            "leader kill",
            format!(
                "new leader after {}, checkpoints again {} after the kill",
                ms(elected),
                secs(resumed)
            ),
        );
        Ok((
            cp,
            format!(
                "killed leader {leader}; node {new_leader} leads after {}; its first checkpoint \
                 {} after the kill; {acked_since} writes acked meanwhile; all {} events and {} \
                 tasks kept; node {leader} restarted",
                ms(elected),
                secs(resumed),
                events.len(),
                tasks.len(),
            ),
        ))
    }
    .await;
    let cp = match r {
        Ok((cp, figures)) => {
            report.step("kill -9 site-a leader under the workload", t, Ok(figures));
            cp
        }
        Err(e) => {
            report.step("kill -9 site-a leader under the workload", t, Err(e));
            return Ok(());
        }
    };
    let t = Instant::now();
    let r = run.check(&cp, None).await;
    report.image("new leader", r.is_ok());
    report.step("checkpoint of the new leader = source", t, r);
    Ok(())
}

/// Cuts the link under the workload, heals it after `opts.cut`, and checks a checkpoint
/// from before the cut (during it) and one after the heal. Reports three steps.
pub(crate) async fn link_cut(
    lab: &mut Lab,
    opts: &DemoOptions,
    report: &mut Report,
    run: &Run,
) -> Result<()> {
    let ctx = &run.ctx;
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    let t = Instant::now();
    let before_cut = ctx.latest_usable().await;
    let cut_state = link.cut(CutMode::Drop).await?;
    let cut_at = Instant::now();
    let cut_ms = now_ms();
    let r = async {
        let before_cut = before_cut.context("no usable checkpoint before the cut")?;
        let mut seen_a = Vec::new();
        let mut seen_b = Vec::new();
        let a_after = ctx
            .a
            .wait_shown(&ctx.vpg, opts.cut, &mut seen_a, |_, sub| {
                sub.starts_with("Site disconnection")
            })
            .await?;
        let b_after = ctx
            .b
            .wait_shown(&ctx.vpg, opts.cut, &mut seen_b, |_, sub| {
                sub == "Recovery is possible"
            })
            .await?;
        // Recovery to the last checkpoint before the cut stays possible during it: the
        // recovery site lists it and its image is whole.
        let listed = ctx.b.checkpoints(&ctx.vpg, 0).await?;
        if !listed.iter().any(|c| c.id == before_cut.id && c.usable) {
            bail!(
                "the recovery site no longer lists checkpoint {}",
                before_cut.id
            );
        }
        let image = run.check(&before_cut, None).await;
        report.image("during the cut", image.is_ok());
        let image = image.context("the last checkpoint before the cut")?;
        let link_now = link.state().await?;
        let refused = link_now.a_to_b.connections_refused - cut_state.a_to_b.connections_refused;
        Ok(format!(
            "site-a: {} after {}; site-b: {} after {}; link refused {refused} connections; \
             during the cut the recovery site lists {} usable checkpoints and {image}",
            seen_a.last().cloned().unwrap_or_default(),
            secs(a_after),
            seen_b.last().cloned().unwrap_or_default(),
            secs(b_after),
            listed.iter().filter(|c| c.usable).count(),
        ))
    }
    .await;
    // Whatever happened, heal after the cut's length.
    tokio::time::sleep(opts.cut.saturating_sub(cut_at.elapsed())).await;
    let healed_state = link.heal().await?;
    let heal_at = Instant::now();
    let heal_ms = now_ms();
    report.step(
        &format!("cut the link {} under the workload", secs(opts.cut)),
        t,
        r,
    );

    let r = async {
        let mut seen = Vec::new();
        let took = ctx
            .a
            .wait_shown(&ctx.vpg, PATIENCE, &mut seen, |s, _| s == "Meeting SLA")
            .await?;
        let link_now = link.state().await?;
        let outage = Window::of(ctx, cut_at, Instant::now());
        let crossed = link_now.a_to_b.bytes - healed_state.a_to_b.bytes;
        let during = ctx.usable(cut_ms, heal_ms).len();
        report.note(
            "link cut",
            format!(
                "{}; Meeting SLA {} after the heal; site-a showed {}; site-b {}; {}",
                secs(opts.cut),
                secs(took),
                outage.shown.join(" -> "),
                outage.shown_b.join(" -> "),
                outage.rpo_figures()
            ),
        );
        Ok(format!(
            "site-a showed {} after the heal, Meeting SLA after {}; link counted {} a->b \
             since the heal (sync + live writes, lz4); {during} checkpoints of the cut usable \
             (those still in the protected buffer when it filled are lost with it); {}",
            seen.join(" -> "),
            secs(took),
            fmt_bytes(crossed),
            outage.rpo_figures()
        ))
    }
    .await;
    report.step("heal: sync, then Meeting SLA", heal_at, r);

    let t = Instant::now();
    let r = async {
        let cp = ctx.usable_after(heal_ms, PATIENCE).await?;
        run.check(&cp, None).await
    }
    .await;
    report.image("after the cut", r.is_ok());
    report.step("checkpoint after the heal = source", t, r);
    Ok(())
}

/// kill -9 of a recovery VRA: the VPG shows it; after the restart the managers bring it
/// back to Meeting SLA with no operator; a checkpoint after that is checked.
pub(crate) async fn recovery_vra_kill(
    lab: &mut Lab,
    opts: &DemoOptions,
    report: &mut Report,
    run: &Run,
) -> Result<()> {
    let ctx = &run.ctx;
    let t = Instant::now();
    let host = lab.vras[1][0].host.clone();
    let r = async {
        lab.vras[1][0].kill9().await?;
        let killed_at = Instant::now();
        let mut seen = Vec::new();
        let shown_after = ctx
            .a
            .wait_shown(&ctx.vpg, PATIENCE, &mut seen, |s, _| s != "Meeting SLA")
            .await;
        let problems = ctx
            .b
            .vpg(&ctx.vpg)
            .await
            .ok()
            .and_then(|g| g.status)
            .map(|s| s.problems)
            .unwrap_or_default();
        lab.vras[1][0].start_with(&vra_args(opts)).await?;
        lab.write_file()?;
        let restarted = Instant::now();
        let shown_after = shown_after?;
        let back = ctx
            .a
            .wait_shown(&ctx.vpg, PATIENCE, &mut seen, |s, _| s == "Meeting SLA")
            .await?;
        report.note(
            "recovery VRA kill",
            format!(
                "shown after {}, Meeting SLA {} after the restart",
                secs(shown_after),
                secs(back)
            ),
        );
        Ok(format!(
            "{host} killed; site-a showed {} ({} after the kill; site-b: {}); restarted after \
             {}, Meeting SLA again {} after, no operator",
            seen.join(" -> "),
            secs(shown_after),
            if problems.is_empty() {
                "no problem listed".to_string()
            } else {
                problems.join("; ")
            },
            secs(restarted.duration_since(killed_at)),
            secs(back)
        ))
    }
    .await;
    report.step("kill -9 recovery VRA, managers recover", t, r);
    let t = Instant::now();
    let r = async {
        let cp = ctx.usable_after(now_ms(), PATIENCE).await?;
        run.check(&cp, None).await
    }
    .await;
    report.image("after the VRA kill", r.is_ok());
    report.step("checkpoint after the restart = source", t, r);
    Ok(())
}
