//! The demo the README's main command runs: a two-site lab on loopback (3 managers and 2
//! hosts with their VRAs per site), every inter-site connection through the lab's link
//! emulator. Everything goes through the managers' API, as an operator would drive it:
//! pairing, inventory, a VPG of 4 VMs on 2 hosts (and a VM in two VPGs refused); the
//! managers then assign the VRAs, sync, and checkpoint at the VPG's interval. Under the
//! verifying workload ([`tandem_testkit::workload`]) over NBD, the demo follows both sites' view of
//! the VPG and the recovery site's checkpoint list, and checks the point-in-time images of
//! listed checkpoints against the source (equal to it at one cut the checkpoint's
//! timestamp allows, closed under happened-before): in steady protection, under a new
//! leader after a kill -9 of site-a's leader (no event or task lost), during and after a
//! link cut (Site disconnection / Recovery is possible, then the sync), and after a kill
//! -9 of a recovery VRA; the last image, a named checkpoint taken after the workload
//! stops, must hold every acknowledged write. Then the recovery operations: a failover
//! test, a move to site-b committed with reverse protection (site-a's disks delta-synced,
//! bytes printed) and the move back, and a failover after kill -9 of all of site-a, each
//! checked against every acknowledged write. The demo opens images at the recovery VRAs
//! to check them and drives no VRA. Each step prints PASS or FAIL with its figures (RPO,
//! times, bytes); any FAIL makes the exit status non-zero. Every process the demo starts
//! is stopped when it ends, also on failure and on Ctrl-C.

mod faults;
mod options;
mod recovery;
mod rpo;
mod setup;
mod watch;
mod workload;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use tokio_util::sync::CancellationToken;

use tandem_testkit::lab::Lab;

use faults::*;
pub use options::DemoOptions;
use options::*;
use recovery::*;
pub use rpo::bench_rpo;
use setup::*;
use watch::*;
use workload::*;

/// Runs the demo in `opts.dir` (a fresh temporary directory by default, removed after a
/// passing run); `shutdown` (Ctrl-C) stops it, and ends a `keep` lab. Every process it
/// started is stopped before it returns. The exit code is a failure on any FAIL.
pub async fn run(opts: DemoOptions, shutdown: CancellationToken) -> Result<ExitCode> {
    let temporary = opts.dir.is_none();
    let dir = opts.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tandem-demo-{}-{}", std::process::id(), now_ms()))
    });
    // A lab directory holds the data of its processes: a used one would resume them.
    if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "{} is not empty: the demo needs a fresh lab directory",
            dir.display()
        );
    }
    println!(
        "Tandem demo: two sites x (3 managers, {HOSTS} hosts with a VRA) on loopback, every \
         inter-site connection through the link emulator (lab in {})",
        dir.display()
    );
    let started = Instant::now();
    let mut report = Report::default();

    let t = Instant::now();
    let up = tokio::select! {
        r = start_lab(&dir, &opts) => r,
        () = shutdown.cancelled() => Err(anyhow!("interrupted")),
    };
    let mut lab = match up {
        Ok(lab) => {
            let joined = joins_recorded(&lab).await.map(|joined| {
                format!(
                    "{joined}; VRA buffers {} MiB; lab.json in {}",
                    opts.vra_ram_mib,
                    dir.display()
                )
            });
            report.step("start 2 sites x 3 managers, 2 VRAs each", t, joined);
            lab
        }
        Err(e) => {
            report.step("start 2 sites x 3 managers, 2 VRAs each", t, Err(e));
            println!("logs in {}", dir.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    let result = tokio::select! {
        r = steps(&mut lab, &opts, &mut report) => r,
        () = shutdown.cancelled() => Err(anyhow!("interrupted")),
    };
    if let Err(e) = result {
        report.failures += 1;
        println!("FAIL  demo stopped: {e:#}");
    }
    if opts.keep && report.failures == 0 {
        println!(
            "lab kept running (Ctrl-C stops it): tandem -e {}",
            lab.endpoints(0).join(",")
        );
        println!(
            "  its links: tandem-lab link --dir {} list",
            lab.dir.display()
        );
        shutdown.cancelled().await;
    }
    lab.down().await;
    if !report.images.is_empty() {
        let equal = report.images.iter().filter(|(_, ok)| *ok).count();
        let which: Vec<String> = report
            .images
            .iter()
            .map(|(w, ok)| format!("{w} {}", if *ok { "equal" } else { "DIFFERENT" }))
            .collect();
        report.note(
            "images checked",
            format!(
                "{equal} of {} equal the source at their checkpoint ({})",
                report.images.len(),
                which.join(", ")
            ),
        );
    }
    if !report.summary.is_empty() {
        println!("\nSummary");
        for (what, figures) in &report.summary {
            println!("  {what:<20} {figures}");
        }
    }
    println!(
        "\n{}: {} passed, {} failed, {} in all",
        if report.failures == 0 {
            "all steps passed"
        } else {
            "SOME STEPS FAILED"
        },
        report.passes,
        report.failures,
        secs(started.elapsed())
    );
    if report.failures == 0 && temporary && !opts.keep {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            println!("could not remove {}: {e}", dir.display());
        }
    } else {
        println!("lab directory (logs, images, journals): {}", dir.display());
    }
    Ok(if report.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn steps(lab: &mut Lab, opts: &DemoOptions, report: &mut Report) -> Result<()> {
    let protection = manager_steps(lab, opts, report).await?;
    protection_steps(lab, opts, report, &protection).await
}

async fn protection_steps(
    lab: &mut Lab,
    opts: &DemoOptions,
    report: &mut Report,
    protection: &Protection,
) -> Result<()> {
    let mut run = new_run(lab, opts, protection)?;
    let r = protection_steps_in(lab, opts, report, &mut run).await;
    run.end().await;
    r
}

async fn protection_steps_in(
    lab: &mut Lab,
    opts: &DemoOptions,
    report: &mut Report,
    run: &mut Run,
) -> Result<()> {
    let ctx = run.ctx.clone();
    let started = Instant::now();
    let started_ms = now_ms();

    let t = Instant::now();
    let mut seen = Vec::new();
    let r = ctx
        .a
        .wait_shown(&ctx.vpg, Duration::from_secs(120), &mut seen, |s, _| {
            s == "Meeting SLA"
        })
        .await
        .map(|took| {
            report.note("protection", format!("Meeting SLA after {}", secs(took)));
            format!(
                "site-a showed {}; no VRA driven by the demo",
                seen.join(" -> ")
            )
        });
    let ok = r.is_ok();
    report.step("the managers protect it: Meeting SLA", t, r);
    if !ok {
        bail!("cannot go on without protection");
    }
    run.start_monitor();

    let t = Instant::now();
    let r = start_workload(opts, run).await;
    let ok = r.is_ok();
    report.step("verifying workload over NBD, 4 volumes", t, r);
    if !ok {
        bail!("cannot go on without the workload");
    }

    let t = Instant::now();
    tokio::time::sleep(opts.steady).await;
    let r = steady(opts, report, run, t);
    report.step("checkpoints by the managers every interval", t, r);

    let t = Instant::now();
    let r = async {
        let cp = ctx.latest_usable().await?;
        run.check(&cp, None).await
    }
    .await;
    report.image("steady", r.is_ok());
    report.step("listed checkpoint's image = source", t, r);

    failover_test(report, run).await;

    leader_kill(lab, report, run).await?;
    link_cut(lab, opts, report, run).await?;
    recovery_vra_kill(lab, opts, report, run).await?;

    let t = Instant::now();
    let r = finish(report, run).await;
    report.image("final", r.is_ok());
    report.step("stop workload; named checkpoint holds all", t, r);

    move_and_back(lab, report, run).await;
    disaster_failover(lab, report, run).await;

    let all = Window::of(&ctx, started, Instant::now());
    let listed = ctx.usable(started_ms, now_ms()).len();
    report.note(
        "checkpoints",
        format!(
            "{listed} usable listed by the recovery site in {}; {}",
            secs(started.elapsed()),
            all.usable_figures()
        ),
    );
    Ok(())
}
