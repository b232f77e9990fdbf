//! 2. The checkpoint barrier: fio completion latency on two protected VRAs, without and with a checkpoint every second.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use tandem_proto::v1::{self as pb, vra_control_client::VraControlClient};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::units::percentile;

use super::files::*;
use super::fio::*;
use super::harness::*;
use super::machine::*;
use super::settings::*;

/// Barrier durations (freeze sent -> last thaw answered) of the checkpoints taken.
#[derive(Debug, Default)]
pub(super) struct Barriers {
    pub(super) taken: u64,
    pub(super) refused: u64,
    pub(super) millis: Vec<f64>,
}

/// Takes a checkpoint of the VPG on every protected VRA every `interval`: freeze all, then
/// thaw all (an unanswered or refused freeze aborts the others).
pub(super) async fn checkpointer(
    clients: Vec<VraControlClient<Channel>>,
    interval: Duration,
    stop: CancellationToken,
) -> Barriers {
    let mut out = Barriers::default();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut id = 0u64;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        id += 1;
        let start = Instant::now();
        let mut freezes = tokio::task::JoinSet::new();
        for (i, c) in clients.iter().enumerate() {
            let mut c = c.clone();
            freezes.spawn(async move {
                let r = c
                    .freeze(pb::FreezeRequest {
                        vpg_id: VPG.into(),
                        checkpoint_id: id,
                    })
                    .await;
                (i, r.is_ok())
            });
        }
        let mut frozen = Vec::new();
        while let Some(r) = freezes.join_next().await {
            if let Ok((i, true)) = r {
                frozen.push(i);
            }
        }
        let all = frozen.len() == clients.len();
        let ts = unix_ms();
        let mut thaws = tokio::task::JoinSet::new();
        for i in frozen {
            let mut c = clients[i].clone();
            thaws.spawn(async move {
                if all {
                    c.thaw(pb::ThawRequest {
                        vpg_id: VPG.into(),
                        checkpoint_id: id,
                        timestamp_ms: ts,
                        kind: pb::VraCheckpointKind::Automatic as i32,
                        name: String::new(),
                    })
                    .await
                    .is_ok()
                } else {
                    let _ = c
                        .abort(pb::AbortRequest {
                            vpg_id: VPG.into(),
                            checkpoint_id: id,
                        })
                        .await;
                    false
                }
            });
        }
        let mut thawed = all;
        while let Some(r) = thaws.join_next().await {
            thawed &= r.unwrap_or(false);
        }
        if thawed {
            out.taken += 1;
            out.millis.push(start.elapsed().as_secs_f64() * 1000.0);
        } else {
            out.refused += 1;
        }
    }
    out.millis.sort_by(f64::total_cmp);
    out
}

pub(super) async fn bench_checkpoint(s: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    println!(
        "\n== checkpoint barrier: QD32 4 KiB randwrite on each of 2 protected VRAs, checkpoint every {} ms",
        s.cp_interval.as_millis()
    );
    let root = fresh_dir(&s.dir.join("checkpoint"))?;
    let size = s.volume_bytes;
    let vms = [
        Placement::new(&root, "vm-1", size),
        Placement::new(&root, "vm-2", size),
    ];
    for vm in &vms {
        zero_file(&vm.image, size)?;
    }
    let mut protected = Vec::new();
    let mut recovery = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        let b = start_vra(s, &root, &format!("host-b{}", i + 1), None).await?;
        let a = start_vra(s, &root, &format!("host-a{}", i + 1), None).await?;
        assign_recovery(&b, &[vm], s.journal_limit).await?;
        assign_protected(&a, &b.control, &[vm], false).await?;
        protected.push(a);
        recovery.push(b);
    }
    for a in &protected {
        wait_level(a, Duration::from_secs(600)).await?;
    }
    let uris: Vec<String> = protected
        .iter()
        .zip(&vms)
        .map(|(a, vm)| a.uri(&format!("{}/0", vm.vm.id)))
        .collect();

    let machine = quiet(s).await;
    let base = fio(&uris, "randwrite", "4k", 32, size, s.cp_secs).await?;
    println!("without checkpoints: {}", base.line());
    for a in &protected {
        wait_level(a, Duration::from_secs(300)).await?;
    }

    let machine2 = quiet(s).await;
    let mut clients = Vec::new();
    for a in &protected {
        clients.push(a.client().await?);
    }
    let stop = CancellationToken::new();
    let cps = tokio::spawn(checkpointer(clients, s.cp_interval, stop.clone()));
    let with = fio(&uris, "randwrite", "4k", 32, size, s.cp_secs).await;
    stop.cancel();
    let barriers = cps.await?;
    let with = with?;
    println!("with checkpoints:    {}", with.line());
    let bp50 = percentile(&barriers.millis, 0.5);
    let bp99 = percentile(&barriers.millis, 0.99);
    let bmax = barriers.millis.last().copied().unwrap_or(0.0);
    println!(
        "barrier (freeze sent -> both thawed): p50 {bp50:.2} ms p99 {bp99:.2} ms max {bmax:.2} ms, \
         {} checkpoints, {} refused or aborted",
        barriers.taken, barriers.refused
    );
    let stall_p50 = (with.clat_p50_us - base.clat_p50_us) / 1000.0;
    let stall_p99 = (with.clat_p99_us - base.clat_p99_us) / 1000.0;
    let stall_p999 = (with.clat_p999_us - base.clat_p999_us) / 1000.0;
    let ok = stall_p99 <= 2.0 && barriers.refused == 0 && barriers.taken > 0;
    println!(
        "write stall (clat with - without): p50 {stall_p50:+.2} ms p99 {stall_p99:+.2} ms \
         p99.9 {stall_p999:+.2} ms; max {:.1} ms vs {:.1} ms; IOPS {:.2}x ({})",
        with.clat_max_us / 1000.0,
        base.clat_max_us / 1000.0,
        with.iops / base.iops.max(1e-9),
        if ok { "ok" } else { "ABOVE FLOOR 2 ms" }
    );
    let mut t = String::new();
    let _ = write!(
        t,
        "stall p50 {stall_p50:+.2} ms p99 {stall_p99:+.2} ms (clat p99 {:.2} ms, max {:.1} ms); \
         barrier p50 {bp50:.2} ms p99 {bp99:.2} ms; {} cps",
        with.clat_p99_us / 1000.0,
        with.clat_max_us / 1000.0,
        barriers.taken
    );
    rows.push(Row {
        bench: "checkpoint barrier, 2 VRAs, QD32".into(),
        tandem: t,
        yardstick: format!(
            "no checkpoints: clat p50 {:.2} ms p99 {:.2} ms max {:.1} ms",
            base.clat_p50_us / 1000.0,
            base.clat_p99_us / 1000.0,
            base.clat_max_us / 1000.0
        ),
        ratio: format!("{:.2}x IOPS", with.iops / base.iops.max(1e-9)),
        floor: "stall p99 <= 2 ms".into(),
        met: ok,
        machine: format!("{machine} / {machine2}"),
        figure: stall_p99,
        unit: " ms stall p99",
    });
    for v in protected.into_iter().chain(recovery) {
        drop(v);
    }
    s.clean(&root);
    Ok(())
}
