//! Fencing end to end: a protected site that comes back from a partition into a VPG that
//! was recovered (or deleted) at the other site meanwhile stands down: its VRAs refuse
//! writes to the VPG's volumes, it shows no Meeting SLA, it counts what its VMs wrote
//! after the recovery's checkpoint, and it converges to the other site's state. Real
//! processes (2 sites x 3 managers, 2 VRAs each), the WAN cut and healed through the lab's
//! link emulator, the old VMs' writes made with qemu-io.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_proto::v1;
use tandem_proto::v1::monitoring_service_client::MonitoringServiceClient;
use tandem_testkit::lab::Lab;
use tandem_testkit::link::CutMode;
use tandem_testkit::protect::wait_vpg_cli;
use tandem_tests::any_channel;
use tandem_tests::ops::*;

/// How soon after the heal the returning site must have stood down (the bound).
const STAND_DOWN_WITHIN: Duration = Duration::from_secs(5);

/// The NBD URI of VM 0's first volume as the protected site's VRA serves it.
fn old_vm_volume(lab: &Lab) -> String {
    tandem_nbd::endpoint_uri(&lab.vras[0][0].nbd_socket, "vm-0/0")
}

/// Fails `vpg` over at the site of `apis_b` (reverse protection `reverse`: yes or no)
/// and commits it.
async fn fail_over(apis_b: &[String], vpg: &str, reverse: &str) -> Result<()> {
    tandem(
        apis_b,
        &[
            "failover",
            "start",
            vpg,
            "--reverse",
            reverse,
            "--wait",
            "--timeout",
            "60",
        ],
    )
    .await?;
    tandem(
        apis_b,
        &["failover", "commit", vpg, "--wait", "--timeout", "60"],
    )
    .await?;
    wait_ended(apis_b).await
}

/// The VPG as `apis` shows it.
async fn vpg(apis: &[String], id: &str) -> Result<v1::Vpg> {
    tandem_json(apis, &["vpg", "get", id]).await
}

/// The events of the site of `apis` after event `after` (all codes, or `code`).
async fn events_after(apis: &[String], after: u64, code: &str) -> Result<Vec<v1::Event>> {
    Ok(MonitoringServiceClient::new(any_channel(apis).await?)
        .list_events(v1::ListEventsQuery {
            after_id: after,
            code: code.into(),
            limit: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events)
}

/// The id of the newest event of the site of `apis`.
async fn last_event_id(apis: &[String]) -> Result<u64> {
    Ok(events_after(apis, 0, "").await?.last().map_or(0, |e| e.id))
}

/// Divergent bytes counted at the stood-down site for VM `vm`'s volume `volume`, and
/// whether the count is exact; `None` until counted.
fn divergence(g: &v1::Vpg, vm: &str, volume: u32) -> Option<(u64, bool)> {
    let d = g.stood_down.as_ref().filter(|d| d.counted)?;
    Some(
        d.divergence
            .iter()
            .filter(|v| v.vm_id == vm && v.volume_id == volume)
            .fold((0, true), |(b, k), v| (b + v.bytes, k && v.known)),
    )
}

/// Total divergent bytes over every volume (None until counted).
fn divergent_total(g: &v1::Vpg) -> Option<u64> {
    let d = g.stood_down.as_ref().filter(|d| d.counted)?;
    Some(d.divergence.iter().map(|v| v.bytes).sum())
}

/// Waits at most `within` for site a (`apis_a`) to have stood `id` down: the old VM's
/// volume refuses NBD clients, the VPG shows no Meeting SLA and its divergence is counted.
/// Answers the VPG as it was then and how long it took.
async fn wait_stood_down(
    lab: &Lab,
    apis_a: &[String],
    id: &str,
    within: Duration,
) -> Result<(v1::Vpg, Duration)> {
    let start = Instant::now();
    let stale = old_vm_volume(lab);
    loop {
        // A read: a probe that succeeds must not add to what diverged.
        let refused = qemu_io(&stale, "read 0 4k").is_err();
        let g = vpg(apis_a, id).await;
        if let Ok(g) = &g {
            let meeting = g.status.as_ref().is_some_and(|s| s.status == "Meeting SLA");
            if refused && !meeting && divergence(g, "vm-0", 0).is_some() {
                return Ok((g.clone(), start.elapsed()));
            }
        }
        if start.elapsed() > within {
            bail!("site a did not stand down within {within:?} (volume refused: {refused}): {g:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The scenario of the issue: the WAN is cut, site b fails the VPG over and commits
/// without reverse protection, a VM at site a writes 1 MiB, the WAN heals. Within 5 s site
/// a refuses writes to the VPG's volumes, shows no Meeting SLA, and reports the 1 MiB as
/// divergent; then it shows Needs Configuration ("reverse protection is not specified"),
/// both sites name site b as where the VMs run, and site b's event log gains no flood of
/// refused pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_returning_after_a_committed_failover_stands_down_and_reports_what_diverged()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let (lab, apis_a, apis_b, _) = recovery_lab(dir.path(), "vpg-sd").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    link.cut(CutMode::Drop).await?;
    fail_over(&apis_b, "vpg-sd", "no").await?;
    // The old VM goes on writing at site a: 1 MiB after the failover's checkpoint.
    qemu_io(&old_vm_volume(&lab), "write -P 0x5a 4M 1M")?;
    let before_heal = last_event_id(&apis_b).await?;

    link.heal().await?;
    let (g, took) = wait_stood_down(&lab, &apis_a, "vpg-sd", STAND_DOWN_WITHIN).await?;
    eprintln!(
        "site a stood down {took:?} after the heal: {:?}",
        g.stood_down
    );
    assert_eq!(divergence(&g, "vm-0", 0), Some((MIB, true)), "{g:?}");
    assert_eq!(divergent_total(&g), Some(MIB), "{g:?}");
    assert!(
        qemu_io(&old_vm_volume(&lab), "write -P 0x5b 6M 64k").is_err(),
        "site a took a write after standing down"
    );

    let mut seen = Vec::new();
    let at_a = wait_vpg_cli(&apis_a, "vpg-sd", Duration::from_secs(20), &mut seen, |g| {
        g.status
            .as_ref()
            .is_some_and(|s| s.substatus == "Needs Configuration")
    })
    .await?;
    let st = at_a.status.as_ref().context("no status")?;
    assert_eq!(st.status, "Not Meeting SLA", "{st:?}");
    assert!(
        st.problems
            .iter()
            .any(|p| p == "reverse protection is not specified"),
        "{st:?}"
    );
    let at_b = vpg(&apis_b, "vpg-sd").await?;
    assert_eq!(
        at_b.status.as_ref().map(|s| s.status.as_str()),
        Some("Recovered")
    );
    assert_eq!(at_a.owner_site_id, at_b.owner_site_id, "who runs the VMs");
    assert_eq!(at_b.owner_site_id, at_b.recovery_site_id, "{at_b:?}");
    // The divergence is named in an event at site a.
    let told = events_after(&apis_a, 0, "EV0067").await?;
    assert!(
        told.iter()
            .any(|e| e.description.contains("vm-0/0 1048576 bytes")),
        "{told:?}"
    );
    // Ten more seconds: no push of the old definition, no flood of refusals at site b.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let audited = events_after(&apis_b, before_heal, "EV0070").await?;
    eprintln!("site b audited {} calls since the heal", audited.len());
    assert!(audited.len() <= 3, "{audited:#?}");
    assert!(qemu_io(&old_vm_volume(&lab), "read 0 4k").is_err());

    // The operator chooses reverse protection after all: site a's disks become the
    // recovery disks and the delta sync overwrites what diverged there (it lands in site
    // a's journal first: the disk takes it once promoted).
    let image = vm0_disk_at_a(&lab)?;
    assert!(holds_run(&image, 0x5a, MIB as usize)?.is_some());
    tandem(&apis_b, &["failover", "protect-back", "vpg-sd"]).await?;
    wait_vpg_cli(&apis_b, "vpg-sd", Duration::from_secs(90), &mut seen, |g| {
        meeting_sla(g) && g.direction == "outgoing"
    })
    .await?;
    let at_a = vpg(&apis_a, "vpg-sd").await?;
    assert_eq!(at_a.direction, "incoming", "{at_a:?}");
    assert!(at_a.stood_down.is_none(), "{at_a:?}");
    let syncs = last_syncs(&lab, 1, "vpg-sd").await?;
    let sent: u64 = syncs.iter().map(|s| s.1).sum();
    eprintln!("protected back: {syncs:?}, {sent} bytes sent for 64 MiB");
    assert!(
        (MIB..=8 * MIB).contains(&sent),
        "the delta sync sent {sent} bytes for the 1 MiB that diverged"
    );
    let mut lab = lab;
    lab.down().await;
    Ok(())
}

/// The disk of VM 0's first volume at site a.
fn vm0_disk_at_a(lab: &Lab) -> Result<std::path::PathBuf> {
    lab.dir
        .join(&lab.site_names[0])
        .read_dir()?
        .filter_map(|e| e.ok().map(|e| e.path().join("vm-0").join("c0u0.img")))
        .find(|p| p.exists())
        .context("vm-0's disk at site a is gone")
}

/// The same with the failover still before commit at the heal: site a stands down within
/// 5 s and shows the peer's operation; the rollback at site b then takes protection up
/// again at site a, whose writes during the cut reach site b (a bitmap sync), and its VMs
/// write again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_returning_during_a_failover_before_commit_stands_down_until_the_rollback()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let (lab, apis_a, apis_b, mut seen) = recovery_lab(dir.path(), "vpg-bc").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    link.cut(CutMode::Drop).await?;
    tandem(
        &apis_b,
        &["failover", "start", "vpg-bc", "--wait", "--timeout", "60"],
    )
    .await?;
    qemu_io(&old_vm_volume(&lab), "write -P 0x5c 2M 512k")?;
    link.heal().await?;
    let (g, took) = wait_stood_down(&lab, &apis_a, "vpg-bc", STAND_DOWN_WITHIN).await?;
    eprintln!("site a stood down {took:?} after the heal");
    assert_eq!(divergence(&g, "vm-0", 0), Some((512 << 10, true)), "{g:?}");
    let st = g.status.as_ref().context("no status")?;
    assert_eq!(
        (st.status.as_str(), st.substatus.as_str()),
        ("Failing Over", "Failing over - Before commit"),
        "{st:?}"
    );
    assert!(g.stood_down.as_ref().is_some_and(|d| !d.r#final), "{g:?}");

    tandem(
        &apis_b,
        &[
            "failover",
            "rollback",
            "vpg-bc",
            "--wait",
            "--timeout",
            "60",
        ],
    )
    .await?;
    let back = wait_vpg_cli(&apis_a, "vpg-bc", Duration::from_secs(60), &mut seen, |g| {
        g.stood_down.is_none() && meeting_sla(g)
    })
    .await?;
    assert_eq!(back.owner_site_id, back.protected_site_id);
    // Its VRA serves the volume again once it stood up (the pass after the command).
    let start = Instant::now();
    while let Err(e) = qemu_io(&old_vm_volume(&lab), "write -P 0x5d 8M 64k") {
        if start.elapsed() > Duration::from_secs(15) {
            return Err(e.context("site a's VM cannot write after the rollback"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What the VM wrote at site a during the cut reached site b's journals (bitmap sync).
    let site_b = dir.path().join(&lab.site_names[1]);
    let start = Instant::now();
    // (A bitmap sync sends 64 KiB regions: journal records whose payload need not be
    // 4 KiB-aligned in the segment file.)
    while holds_run(&site_b, 0x5c, 32 << 10)?.is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("site a's write during the cut never reached site b");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let up = events_after(&apis_a, 0, "EV0068").await?;
    assert_eq!(up.len(), 1, "{up:?}");
    let mut lab = lab;
    lab.down().await;
    Ok(())
}

/// With reverse protection, and kill -9 of site a's leader right after it recorded the
/// stand-down: the next leader stands the VRAs down and counts what diverged; then site a
/// takes the new direction (its disks become the recovery disks) and the delta sync
/// overwrites what diverged: site b's VMs' volumes are what site b wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_site_counts_what_diverged_then_takes_the_new_direction_across_a_leader_kill()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut lab, apis_a, apis_b, mut seen) = recovery_lab(dir.path(), "vpg-rv").await?;
    arm_failpoints(&mut lab, 0, "stand-down:proposed").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    link.cut(CutMode::Drop).await?;
    fail_over(&apis_b, "vpg-rv", "yes").await?;
    qemu_io(&old_vm_volume(&lab), "write -P 0x5e 4M 1M")?;
    let at_b = site_uris(&lab, 1);
    let hashes_b = volume_hashes(&at_b).await?;
    link.heal().await?;
    // The leader that records the stand-down dies at once; the next one completes it.
    let start = Instant::now();
    let mut died = 0;
    let counted = loop {
        died += revive(&mut lab, 0).await?;
        if let Ok(g) = vpg(&apis_a, "vpg-rv").await
            && (divergence(&g, "vm-0", 0).is_some() || g.direction == "incoming")
        {
            break g;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("site a did not stand down ({died} managers died)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("{died} leader(s) of site a died at the stand-down; then: {counted:?}");
    assert!(died >= 1, "the failpoint did not fire");
    let told = events_after(&apis_a, 0, "EV0067").await?;
    assert!(
        told.iter()
            .any(|e| e.description.contains("vm-0/0 1048576 bytes")),
        "{told:?}"
    );
    let turned = wait_vpg_cli(
        &apis_b,
        "vpg-rv",
        Duration::from_secs(120),
        &mut seen,
        |g| meeting_sla(g) && g.direction == "outgoing",
    )
    .await?;
    let at_a = vpg(&apis_a, "vpg-rv").await?;
    assert_eq!(
        (at_a.direction.as_str(), at_a.generation),
        ("incoming", turned.generation)
    );
    assert_eq!(at_a.owner_site_id, turned.owner_site_id);
    assert_eq!(
        volume_hashes(&at_b).await?,
        hashes_b,
        "site a reached the VMs at site b"
    );
    lab.down().await;
    Ok(())
}

/// A move whose commit site a missed (the WAN cut after the VMs were drained): site b
/// ends the move without it, and site a, back, ends where a handover would have left it:
/// Recovered, its protected VMs removed, nothing diverged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_missed_a_moves_commit_ends_as_the_handover_would_have_left_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (lab, apis_a, apis_b, mut seen) = recovery_lab(dir.path(), "vpg-mm").await?;
    // Site b ends "Creating" on its own pass: no move before.
    wait_vpg_cli(&apis_b, "vpg-mm", Duration::from_secs(30), &mut seen, |g| {
        g.status.as_ref().is_some_and(|s| s.operation.is_empty())
    })
    .await?;
    tandem(
        &apis_b,
        &[
            "move",
            "start",
            "vpg-mm",
            "--reverse",
            "no",
            "--wait",
            "--timeout",
            "60",
        ],
    )
    .await?;
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    link.cut(CutMode::Drop).await?;
    tandem(
        &apis_b,
        &["move", "commit", "vpg-mm", "--wait", "--timeout", "60"],
    )
    .await?;
    wait_ended(&apis_b).await?;
    assert_eq!(status_of(&apis_b, "vpg-mm").await?.status, "Recovered");
    link.heal().await?;
    let at_a = wait_vpg_cli(&apis_a, "vpg-mm", Duration::from_secs(30), &mut seen, |g| {
        g.status.as_ref().is_some_and(|s| s.status == "Recovered")
    })
    .await?;
    assert_eq!(divergent_total(&at_a), Some(0), "{at_a:?}");
    let start = Instant::now();
    while !vra_vpg_status(&lab, 0, "vpg-mm").await?.is_empty() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("site a's VRAs still hold vpg-mm");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let at_b = vpg(&apis_b, "vpg-mm").await?;
    assert_eq!(at_a.owner_site_id, at_b.owner_site_id);
    let mut lab = lab;
    lab.down().await;
    Ok(())
}

/// A VPG failed over with reverse protection and then deleted at site b while site a was
/// cut off: site a, back, stands down (what its VMs wrote is counted), lets its VRAs go
/// (their disks stay) and removes its copy, saying where the disks are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_missed_a_delete_after_a_failover_removes_its_copy_and_keeps_its_disks()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let (lab, apis_a, apis_b, _) = recovery_lab(dir.path(), "vpg-dl").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    link.cut(CutMode::Drop).await?;
    fail_over(&apis_b, "vpg-dl", "yes").await?;
    // Site a cannot be reached: the delete is forced.
    tandem(&apis_b, &["vpg", "delete", "vpg-dl", "--force"]).await?;
    qemu_io(&old_vm_volume(&lab), "write -P 0x5f 4M 256k")?;
    link.heal().await?;
    let start = Instant::now();
    loop {
        let gone = tandem(&apis_a, &["vpg", "get", "vpg-dl"]).await.is_err();
        if gone && vra_vpg_status(&lab, 0, "vpg-dl").await?.is_empty() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!(
                "site a still holds vpg-dl: {:?}",
                vpg(&apis_a, "vpg-dl").await
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(qemu_io(&old_vm_volume(&lab), "read 0 4k").is_err());
    let told = events_after(&apis_a, 0, "EV0004").await?;
    assert!(
        told.iter()
            .any(|e| e.description.contains("vm-0/0 262144 bytes")),
        "{told:?}"
    );
    // The old VM's disk is still there, with what it wrote.
    let image = vm0_disk_at_a(&lab)?;
    let bytes = std::fs::read(&image)?;
    assert!(
        bytes[4 << 20..(4 << 20) + (256 << 10)]
            .iter()
            .all(|b| *b == 0x5f)
    );
    let mut lab = lab;
    lab.down().await;
    Ok(())
}

/// The other way round: the protected site deletes the VPG (forced: the recovery site
/// cannot be reached); the recovery site, back, deletes its copy too and keeps the
/// recovery disks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_site_that_missed_a_delete_removes_its_copy_and_keeps_the_recovery_disks()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let (lab, apis_a, apis_b, _) = recovery_lab(dir.path(), "vpg-rd").await?;
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    link.cut(CutMode::Drop).await?;
    tandem(&apis_a, &["vpg", "delete", "vpg-rd", "--force"]).await?;
    link.heal().await?;
    let start = Instant::now();
    loop {
        let gone = tandem(&apis_b, &["vpg", "get", "vpg-rd"]).await.is_err();
        if gone && vra_vpg_status(&lab, 1, "vpg-rd").await?.is_empty() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!(
                "site b still holds vpg-rd: {:?}",
                vpg(&apis_b, "vpg-rd").await
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let kept = events_after(&apis_b, 0, "EV0040").await?;
    assert!(
        kept.iter().any(|e| e.description.contains(".replica")),
        "{kept:?}"
    );
    let replicas = site_files(&dir.path().join(&lab.site_names[1]), ".replica")?;
    assert_eq!(replicas, 4, "the recovery disks stay");
    let mut lab = lab;
    lab.down().await;
    Ok(())
}

/// How many files under `root` end in `suffix`.
fn site_files(root: &std::path::Path, suffix: &str) -> Result<usize> {
    let mut n = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                n += 1;
            }
        }
    }
    Ok(n)
}
