//! The verifying workload over NBD on the protected volumes, and steady protection's figures.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::units::fmt_bytes;
use tandem_testkit::workload::{Spread, VolumeTarget, Workload, WorkloadConfig, seed_from_env};

use super::options::*;
use super::watch::*;

/// Starts the verifying workload over NBD on the protected volumes.
pub(crate) async fn start_workload(opts: &DemoOptions, run: &mut Run) -> Result<String> {
    let ctx = run.ctx.clone();
    let targets = ctx
        .vms
        .iter()
        .map(|v| VolumeTarget::new(&v.prot_nbd, format!("{}/0", v.vm)))
        .collect();
    let config = WorkloadConfig {
        volumes: targets,
        writers: opts.writers,
        spread: Spread::AcrossVolumes,
        region_blocks: None,
        seed: seed_from_env(),
        pace: opts.pace,
        fua: false,
    };
    let workload = Workload::start(config).await?;
    let seed = workload.seed();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rate = workload.acked() as f64 / t.elapsed().as_secs_f64();
    run.workload = Some(workload);
    Ok(format!(
        "{} writers each writing all {} volumes, 4 KiB writes at {rate:.0}/s ({}/s); seed \
         {seed:#x} (TANDEM_WORKLOAD_SEED={seed:#x} repeats it)",
        opts.writers,
        ctx.vms.len(),
        fmt_bytes((rate * 4096.0) as u64),
    ))
}

/// Figures of steady protection since `from`: a checkpoint every interval, the RPO.
pub(crate) fn steady(
    opts: &DemoOptions,
    report: &mut Report,
    run: &Run,
    from: Instant,
) -> Result<String> {
    let ctx = &run.ctx;
    let w = Window::of(ctx, from, Instant::now());
    // One checkpoint per interval, less one for the first and the last partial interval.
    let expected = (opts.steady.as_millis() / ctx.interval.as_millis().max(1))
        .saturating_sub(1)
        .max(1) as usize;
    if w.usable_after_ms.len() < expected {
        bail!(
            "{} checkpoints listed, {} usable, {expected} expected; site-a showed {}",
            w.listed,
            w.usable_after_ms.len(),
            w.shown.join(" -> ")
        );
    }
    if let Some(max) = w.rpo_max()
        && max > TARGET_RPO
    {
        bail!("RPO reached {} (target {})", secs(max), secs(TARGET_RPO));
    }
    report.note(
        "steady protection",
        format!(
            "{} checkpoints, {}; {}",
            w.usable_after_ms.len(),
            w.usable_figures(),
            w.rpo_figures()
        ),
    );
    Ok(format!(
        "{} listed by the recovery site in {} ({expected} due), {}; {}; site-a showed {}",
        count(w.usable_after_ms.len(), "usable checkpoint"),
        secs(opts.steady),
        w.usable_figures(),
        w.rpo_figures(),
        w.shown.join(" -> ")
    ))
}
