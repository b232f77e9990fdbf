//! Recovery operations end to end, on real processes: 2 sites x 3 managers, 2 hosts with a
//! VRA per site, every inter-site connection through the lab's link emulator, driven as an
//! operator would (the `tandem` CLI, `-o json`) and checked with real NBD clients.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_nbd::NbdClient;
use tandem_proto::v1;
use tandem_proto::v1::{
    monitoring_service_client::MonitoringServiceClient, task_service_client::TaskServiceClient,
    vpg_service_client::VpgServiceClient, vra_control_client::VraControlClient,
};
use tandem_testkit::lab::{Lab, wait_leader};
use tandem_testkit::protect::wait_vpg_cli;
use tandem_testkit::workload::{ImageReader, Workload, check_image};
use tandem_tests::channel;
use tandem_tests::ops::*;

async fn tests_running(apis: &[String]) -> Result<Vec<v1::FailoverTest>> {
    let r: v1::FailoverTests = tandem_json(apis, &["failover-test", "list"]).await?;
    Ok(r.tests)
}

/// A failover test under a verifying workload: the test images equal the source at the
/// test's checkpoint (checked over NBD against what the workload acknowledged), a test VM
/// writes to its volume, protection and checkpoints go on, a kill -9 of the recovery
/// site's leader and of a recovery VRA do not end the test (the VRA's images come back),
/// and the stop records the verdict and the note and leaves nothing behind: no export, no
/// scratch file, and no byte the test VM wrote in any journal or replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_test_serves_its_checkpoint_while_protection_goes_on_and_leaves_nothing()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut lab, apis_a, apis_b, mut seen) = recovery_lab(dir.path(), "vpg-web").await?;

    let workload = recovery_workload(&lab).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Not at the protected site.
    let refused = tandem(&apis_a, &["failover-test", "start", "vpg-web"]).await;
    let refused = refused.expect_err("a test started at the protected site");
    assert!(
        refused.to_string().contains("failed precondition")
            && refused.to_string().contains("recovered at site"),
        "{refused}"
    );

    // Started at the recovery site, at the latest checkpoint: every volume served.
    let started: v1::FailoverTests = tandem_json(
        &apis_b,
        &[
            "failover-test",
            "start",
            "vpg-web",
            "--wait",
            "--timeout",
            "30",
        ],
    )
    .await?;
    let test = started.tests.first().context("no test")?.clone();
    assert_eq!(
        (test.step.as_str(), test.volumes.len()),
        ("running", 4),
        "{test:?}"
    );
    let cp = test.checkpoint_id;
    eprintln!("testing at checkpoint {cp} ({} ms)", test.checkpoint_ms);
    let mut volumes = test.volumes.clone();
    volumes.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));

    // The test images are the source at the checkpoint: every write acknowledged before it
    // is there, none issued after it, and the cut is closed under happened-before.
    let window = {
        let start = Instant::now();
        loop {
            if let Some(w) = workload.window_at(test.checkpoint_ms) {
                break w;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("no workload window at the checkpoint's time");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut clients = Vec::new();
    for v in &volumes {
        clients.push(NbdClient::connect_uri(&v.nbd_uri).await?);
    }
    let images: Vec<&dyn ImageReader> = clients.iter().map(|c| c as &dyn ImageReader).collect();
    let report = check_image(&workload.history(), &window, &images)
        .await
        .map_err(|e| anyhow::anyhow!("test image at checkpoint {cp}: {e}"))?;
    eprintln!("test images hold {} writes", report.writes_included);
    for c in clients {
        c.disconnect().await?;
    }

    // A test VM writes to its volume (and reads it back).
    let test_vm = &volumes[0].nbd_uri;
    qemu_io(test_vm, "write -P 0x5c 0 2M")?;
    qemu_io(test_vm, "read -P 0x5c 0 2M")?;

    // Protection and checkpoints go on; the VPG shows the test as its operation.
    let b = channel(&apis_b[0]).await?;
    let start = Instant::now();
    loop {
        let list = VpgServiceClient::new(b.clone())
            .list_checkpoints(v1::ListCheckpointsQuery {
                vpg_id: "vpg-web".into(),
                page_size: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .checkpoints;
        if list.iter().filter(|c| c.id > cp && c.usable).count() >= 2 {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("checkpoints stopped during the test: {list:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let g: v1::Vpg = tandem_json(&apis_b, &["vpg", "get", "vpg-web"]).await?;
    assert_eq!(
        g.status.as_ref().map(|s| s.operation.as_str()),
        Some("Failover Test"),
        "{g:?}"
    );
    wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(10),
        &mut seen,
        |g| g.status.as_ref().is_some_and(|s| s.status == "Meeting SLA"),
    )
    .await?;
    // No edit while the test runs: the recovery site refuses it.
    let a = channel(&apis_a[0]).await?;
    let g = VpgServiceClient::new(a.clone())
        .get_vpg(v1::GetRequest {
            id: "vpg-web".into(),
        })
        .await?
        .into_inner();
    let mut settings = g.settings;
    if let Some(s) = settings.as_mut() {
        s.target_rpo_secs = 120;
    }
    let edit = VpgServiceClient::new(a)
        .update_vpg(v1::UpdateVpgRequest {
            id: "vpg-web".into(),
            generation: g.generation,
            spec: Some(v1::VpgSpec {
                name: g.name.clone(),
                recovery_site_id: g.recovery_site_id.clone(),
                settings,
                vms: g.vms.iter().filter_map(|v| v.placement.clone()).collect(),
            }),
            keep_removed_recovery_disks: false,
        })
        .await
        .expect_err("an edit during a failover test");
    assert!(
        edit.message().contains("failover test") && edit.message().contains("stop it"),
        "{edit:?}"
    );

    // kill -9 of the recovery site's leader: the test goes on under the next one.
    let survivors = kill_leader(&mut lab, 1).await?;
    // kill -9 of the recovery VRA of host 0: its images are opened again once it is back.
    lab.vras[1][0].kill9().await?;
    lab.vras[1][0].start().await?;
    let host0 = lab.vras[1][0].host.clone();
    let start = Instant::now();
    loop {
        // Until a new leader is elected, reads fail: retried.
        let tests = tests_running(&survivors).await.unwrap_or_default();
        let exports = VraControlClient::new(lab.vras[1][0].control_channel().await?)
            .get_status(v1::GetVraStatusRequest {})
            .await?
            .into_inner()
            .exports;
        let back = tests.first().is_some_and(|t| {
            t.step == "running"
                && t.error.is_empty()
                && t.volumes
                    .iter()
                    .filter(|v| v.host_id == host0)
                    .all(|v| exports.contains(&v.export_name))
        });
        if back {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the test's images did not come back: {tests:?}, exports {exports:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Stopped with a verdict and a note: the result is kept, nothing is left behind.
    tandem(
        &survivors,
        &[
            "failover-test",
            "stop",
            "vpg-web",
            "--failed",
            "--note",
            "app did not start",
        ],
    )
    .await?;
    let start = Instant::now();
    while !tests_running(&survivors).await?.is_empty() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("the test did not stop");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b = channel(&survivors[0]).await?;
    let task = TaskServiceClient::new(b.clone())
        .get_task(v1::GetTaskRequest { id: test.task_id })
        .await?
        .into_inner();
    assert_eq!(task.state, "failed", "{task:?}");
    assert!(task.message.contains("app did not start"), "{task:?}");
    let events = MonitoringServiceClient::new(b.clone())
        .list_events(v1::ListEventsQuery {
            code: "EV0061".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    assert!(
        events.iter().any(
            |e| e.description.contains("failed") && e.description.contains("app did not start")
        ),
        "{events:?}"
    );
    for vra in &lab.vras[1] {
        let exports = VraControlClient::new(vra.control_channel().await?)
            .get_status(v1::GetVraStatusRequest {})
            .await?
            .into_inner()
            .exports;
        assert!(
            exports.iter().all(|e| !e.starts_with("pit/")),
            "test images left at {}: {exports:?}",
            vra.host
        );
        let scratch = vra.dir.join("vpgs").join("vpg-web").join("scratch");
        if scratch.exists() {
            let left: Vec<_> = std::fs::read_dir(&scratch)?.collect();
            assert!(left.is_empty(), "scratch files left: {left:?}");
        }
    }
    let history = workload.stop().await;
    assert!(history.failures().is_empty(), "{:?}", history.failures());
    // What the test VM wrote never reached a journal or a replica.
    if let Some(f) = holds_run(&dir.path().join(&lab.site_names[1]), 0x5c, 64 << 10)? {
        bail!("the test VM's data is in {}", f.display());
    }
    let g: v1::Vpg = tandem_json(&survivors, &["vpg", "get", "vpg-web"]).await?;
    assert_eq!(
        g.status.as_ref().map(|s| s.operation.as_str()),
        Some(""),
        "{g:?}"
    );
    lab.down().await;
    Ok(())
}

/// The source image of a protected volume at site 0 (`<ds>/<vm>/c<c>u<u>.img`).
fn source_image(lab: &Lab, vm: &str, volume_id: u32) -> Result<std::path::PathBuf> {
    let name = format!("c{}u{}.img", volume_id / 15, volume_id % 15);
    for e in std::fs::read_dir(lab.dir.join(&lab.site_names[0]))? {
        let p = e?.path().join(vm).join(&name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("no source image of {vm}/{volume_id}")
}

/// blake3 of every file in the sites' datastores (sources, journals, replicas).
fn datastore_hashes(lab: &Lab) -> Result<std::collections::BTreeMap<std::path::PathBuf, String>> {
    let mut out = std::collections::BTreeMap::new();
    for site in &lab.site_names {
        let mut dirs: Vec<std::path::PathBuf> = std::fs::read_dir(lab.dir.join(site))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_dir()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("ds-"))
            })
            .collect();
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d)? {
                let p = e?.path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    out.insert(
                        p.clone(),
                        blake3::hash(&std::fs::read(&p)?).to_hex().to_string(),
                    );
                }
            }
        }
    }
    Ok(out)
}

/// A failover after kill -9 of every manager and VRA of the protected site: the VMs come
/// up at the latest checkpoint (the recovered volumes hold every write the workload
/// acknowledged by it and none it issued after it), first before commit, then committed
/// with the recovery site's leader killed while promoting; the volumes stay served
/// throughout, what a recovered VM writes before commit is kept by the commit, and the VPG
/// ends Recovered. RTO: from the request to every volume answering NBD reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_after_the_protected_site_is_killed_recovers_the_latest_checkpoint() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let (mut lab, _, apis_b, _) = recovery_lab(dir.path(), "vpg-fo").await?;
    let workload = recovery_workload(&lab).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The protected site is lost: every manager and VRA, kill -9.
    for m in &mut lab.sites[0] {
        m.kill9().await?;
    }
    for v in &mut lab.vras[0] {
        v.kill9().await?;
    }

    // Refused while nothing decides: a bad policy, an unknown VPG.
    let bad = tandem(
        &apis_b,
        &[
            "failover",
            "start",
            "vpg-fo",
            "--commit-policy",
            "auto-commit=0",
        ],
    )
    .await
    .expect_err("a zero auto-commit");
    assert!(bad.to_string().contains("commit_after_secs"), "{bad}");
    assert!(
        tandem(&apis_b, &["failover", "start", "no-such-vpg"])
            .await
            .is_err()
    );

    let requested = Instant::now();
    let op: v1::RecoveryOperations = tandem_json(
        &apis_b,
        &["failover", "start", "vpg-fo", "--wait", "--timeout", "60"],
    )
    .await?;
    let op = op.operations.first().context("no failover")?.clone();
    assert_eq!(
        (op.step.as_str(), op.volumes.len()),
        ("before commit", 4),
        "{op:?}"
    );
    // RTO: every recovered volume answers a read.
    for v in &op.volumes {
        let c = NbdClient::connect_uri(&v.nbd_uri).await?;
        c.read(0, 4096).await?;
        c.disconnect().await?;
    }
    let rto = requested.elapsed();
    eprintln!(
        "failover to checkpoint {} ({} ms): RTO {} ms, 4 volumes",
        op.checkpoint_id,
        op.checkpoint_ms,
        rto.as_millis()
    );
    let window = workload
        .window_at(op.checkpoint_ms)
        .context("no workload window at the checkpoint's time")?;
    // The writers stopped when the protected VRAs died.
    let history = workload.stop().await;
    let included = check_recovered(&history, &window, &op).await?;
    eprintln!("recovered volumes hold {included} writes");
    let s = status_of(&apis_b, "vpg-fo").await?;
    assert_eq!(
        (s.status.as_str(), s.substatus.as_str()),
        ("Failing Over", "Failing over - Before commit"),
        "{s:?}"
    );
    // A second failover of the same VPG is refused.
    let again = tandem(&apis_b, &["failover", "start", "vpg-fo"]).await;
    assert!(again.is_err(), "a second failover started");

    // A recovered VM writes before commit, past the workload's region (its first 4 MiB).
    let vm1 = op
        .volumes
        .iter()
        .find(|v| v.vm_id == "vm-1")
        .context("vm-1/0")?
        .nbd_uri
        .clone();
    qemu_io(&vm1, "write -P 0x6e 8M 2M")?;

    // Commit, and kill -9 of the recovery site's leader while it runs.
    tandem(&apis_b, &["failover", "commit", "vpg-fo"]).await?;
    let survivors = kill_leader(&mut lab, 1).await?;
    let start = Instant::now();
    loop {
        let ops = recoveries(&survivors).await;
        if ops.as_ref().is_ok_and(|o| o.is_empty()) {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the commit did not end: {ops:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let s = status_of(&survivors, "vpg-fo").await?;
    assert_eq!(s.status, "Recovered", "{s:?}");
    let task = TaskServiceClient::new(channel(&survivors[0]).await?)
        .get_task(v1::GetTaskRequest { id: op.task_id })
        .await?
        .into_inner();
    assert_eq!(task.state, "succeeded", "{task:?}");
    assert!(task.message.contains("committed"), "{task:?}");

    // After commit the volumes are the replicas: the VM's write is there, also after a
    // restart of its VRA (the replica is the VM's disk now), and the rest is still the
    // checkpoint.
    qemu_io(&vm1, "read -P 0x6e 8M 2M")?;
    let host = op
        .volumes
        .iter()
        .find(|v| v.vm_id == "vm-1")
        .context("vm-1")?
        .host_id
        .clone();
    let vra = lab.vras[1]
        .iter_mut()
        .find(|v| v.host == host)
        .context("vra of vm-1")?;
    vra.kill9().await?;
    vra.start().await?;
    qemu_io(&vm1, "read -P 0x6e 8M 2M")?;
    qemu_io(&vm1, "write -z 8M 2M")?;
    let included_after = check_recovered(&history, &window, &op).await?;
    assert_eq!(included_after, included);
    lab.down().await;
    Ok(())
}

/// A failover rolled back: the recovered VMs ran and wrote before commit, yet every
/// source, journal and replica file is byte for byte as it was (protection paused around
/// it so nothing else writes), and protection resumes to Meeting SLA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_failover_leaves_everything_as_it_was_and_protection_resumes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut lab, apis_a, apis_b, mut seen) = recovery_lab(dir.path(), "vpg-fo").await?;
    let workload = recovery_workload(&lab).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let history = workload.stop().await;
    assert!(history.failures().is_empty(), "{:?}", history.failures());
    // Everything written is in a checkpoint; then nothing moves.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tandem(&apis_a, &["vpg", "pause", "vpg-fo"]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = datastore_hashes(&lab)?;

    let op: v1::RecoveryOperations = tandem_json(
        &apis_b,
        &["failover", "start", "vpg-fo", "--wait", "--timeout", "60"],
    )
    .await?;
    let op = op.operations.first().context("no failover")?.clone();
    assert_eq!(op.step, "before commit", "{op:?}");
    // Nothing was written after the last checkpoint: the recovered volumes are the
    // sources.
    for v in &op.volumes {
        let source = source_image(&lab, &v.vm_id, v.volume_id)?;
        let out = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&source)
            .arg(&v.nbd_uri)
            .output()?;
        assert!(
            out.status.success(),
            "{} differs from {}: {}",
            v.nbd_uri,
            source.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    for v in &op.volumes {
        qemu_io(&v.nbd_uri, "write -P 0x6f 0 1M")?;
    }
    tandem(&apis_b, &["failover", "rollback", "vpg-fo", "--wait"]).await?;
    assert!(recoveries(&apis_b).await?.is_empty());
    let after = datastore_hashes(&lab)?;
    assert_eq!(before.len(), after.len());
    for (path, h) in &before {
        assert_eq!(Some(h), after.get(path), "{} changed", path.display());
    }
    let events = MonitoringServiceClient::new(channel(&apis_b[0]).await?)
        .list_events(v1::ListEventsQuery {
            code: "EV0064".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    assert_eq!(events.len(), 1, "{events:?}");
    let s = status_of(&apis_b, "vpg-fo").await?;
    assert_ne!(s.status, "Failing Over", "{s:?}");
    // Site a stood down while the failover ran; it takes protection up again once it
    // reads the rollback in site b's report.
    wait_vpg_cli(&apis_a, "vpg-fo", Duration::from_secs(20), &mut seen, |g| {
        g.stood_down.is_none()
    })
    .await?;

    tandem(&apis_a, &["vpg", "resume", "vpg-fo"]).await?;
    wait_vpg_cli(
        &apis_a,
        "vpg-fo",
        Duration::from_secs(60),
        &mut seen,
        meeting_sla,
    )
    .await?;
    lab.down().await;
    Ok(())
}

/// A move under the verifying workload: the protected VMs are powered off (their writers
/// see their volumes go), everything they wrote drains, a last checkpoint is taken, and
/// the VMs come up at the recovery site holding every acknowledged write; the commit
/// removes the protected VMs at the old site and the VPG ends Recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_loses_no_acknowledged_write_and_removes_the_protected_vms() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut lab, _, apis_b, _) = recovery_lab(dir.path(), "vpg-mv").await?;
    let workload = recovery_workload(&lab).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let bad = tandem(&apis_b, &["move", "start", "vpg-mv", "--checkpoint", "7"]).await;
    assert!(bad.is_err(), "a move to a chosen checkpoint");
    tandem(&apis_b, &["move", "start", "vpg-mv", "--reverse", "no"]).await?;
    // kill -9 of the recovery site's leader while the move prepares its source or opens
    // the volumes: the next leader takes the step over.
    let apis_b = kill_leader(&mut lab, 1).await?;
    let start = Instant::now();
    let op = loop {
        let ops = recoveries(&apis_b).await.unwrap_or_default();
        if let Some(op) = ops.into_iter().find(|o| o.step == "before commit") {
            break op;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the move did not reach before commit");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((op.kind.as_str(), op.volumes.len()), ("move", 4), "{op:?}");
    assert!(op.checkpoint_name.starts_with("move "), "{op:?}");
    // The writers lost their volumes with the power-off.
    let history = workload.stop().await;
    eprintln!(
        "{} writes acknowledged, {} failed when the VMs were powered off",
        history.acked_writes(),
        history.failures().len()
    );
    let exact = tandem_testkit::workload::CutWindow::exact(history.end());
    let included = check_recovered(&history, &exact, &op).await?;
    eprintln!("moved volumes hold {included} writes: every acknowledged one");
    let s = status_of(&apis_b, "vpg-mv").await?;
    assert_eq!(
        (s.status.as_str(), s.substatus.as_str()),
        ("Moving", "Moving - Before commit"),
        "{s:?}"
    );
    let protected = vra_vpg_status(&lab, 0, "vpg-mv").await?;
    assert!(
        !protected.is_empty() && protected.iter().all(|g| g.powered_off),
        "{protected:?}"
    );

    tandem(&apis_b, &["move", "commit", "vpg-mv"]).await?;
    // kill -9 of the protected site's leader: the handover reaches the next one.
    let apis_a = kill_leader(&mut lab, 0).await?;
    wait_ended(&apis_b).await?;
    let s = status_of(&apis_b, "vpg-mv").await?;
    assert_eq!(s.status, "Recovered", "{s:?}");
    // The old protected site removes its protected VMs.
    let start = Instant::now();
    loop {
        let left = vra_vpg_status(&lab, 0, "vpg-mv").await?;
        let shown = status_of(&apis_a, "vpg-mv").await?;
        if left.is_empty() && shown.status == "Recovered" {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("site-a still protects: {left:?}, shows {shown:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(check_recovered(&history, &exact, &op).await?, included);
    lab.down().await;
    Ok(())
}

/// Reverse protection and failback: a move under the verifying workload protects the VMs
/// back on commit, and the old protected site's disks (the VMs' own, as they were when
/// they were powered off) take a delta sync that sends only the blocks the VMs wrote at
/// the new site; a move back then brings the VMs home byte for byte as they were there,
/// and protects them forward again with a delta sync that sends nothing that matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_protects_back_with_a_delta_sync_and_a_move_back_brings_every_byte_home()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut lab, apis_a, apis_b, _) = recovery_lab(dir.path(), "vpg-rv").await?;
    let workload = recovery_workload(&lab).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    tandem(&apis_b, &["move", "start", "vpg-rv", "--watch"]).await?;
    let op = before_commit(&apis_b).await?;
    let history = workload.stop().await;
    let exact = tandem_testkit::workload::CutWindow::exact(history.end());
    let included = check_recovered(&history, &exact, &op).await?;
    eprintln!("moved volumes hold {included} writes: every acknowledged one");
    // What the VMs write at site b before commit: only this differs from site a's disks.
    let pattern_uri = op_uris(&op)[0].clone();
    let written = qemu_io(&pattern_uri, "write -P 0x5a 4M 1M")?;
    eprintln!("{written}");

    tandem(&apis_b, &["move", "commit", "vpg-rv"]).await?;
    wait_ended(&apis_b).await?;
    let mut seen = Vec::new();
    let turned = wait_vpg_cli(&apis_b, "vpg-rv", Duration::from_secs(90), &mut seen, |g| {
        meeting_sla(g) && g.direction == "outgoing"
    })
    .await?;
    eprintln!("site b, protecting back: {seen:?}; {turned:?}");
    let syncs = last_syncs(&lab, 1, "vpg-rv").await?;
    let sent: u64 = syncs.iter().map(|s| s.1).sum();
    eprintln!(
        "reverse protection: delta syncs {syncs:?}, {sent} bytes of data sent for 64 MiB of volumes"
    );
    assert_eq!(
        syncs.len(),
        2,
        "a protected VRA per host at site b: {syncs:?}"
    );
    assert!(
        syncs.iter().all(|s| [
            v1::VraSyncKind::Delta as i32,
            v1::VraSyncKind::VolumeDelta as i32
        ]
        .contains(&s.0)),
        "{syncs:?}"
    );
    assert!((MIB..=8 * MIB).contains(&sent), "{sent} bytes sent");
    // Site a took the new direction: its VMs are gone from its inventory and its VRAs
    // hold the recovery role over the VMs' old disks.
    let at_a: v1::Vpg = tandem_json(&apis_a, &["vpg", "get", "vpg-rv"]).await?;
    assert_eq!(at_a.generation, turned.generation, "{at_a:?}");
    let vms: v1::ListVmsResponse = tandem_json(&apis_a, &["vm", "list", "--inventory"]).await?;
    assert!(vms.vms.iter().all(|v| !v.id.starts_with("vm-")), "{vms:?}");
    let roles = vra_vpg_status(&lab, 0, "vpg-rv").await?;
    assert!(
        roles.len() == 2 && roles.iter().all(|g| g.role == v1::VraRole::Recovery as i32),
        "{roles:?}"
    );

    // Nothing writes: site b's volumes, as its VMs see them.
    let at_b = site_uris(&lab, 1);
    let hashes_b = volume_hashes(&at_b).await?;

    // The move back (failback) runs at site a, now the recovery site.
    tandem(&apis_a, &["move", "start", "vpg-rv"]).await?;
    let back = before_commit(&apis_a).await?;
    assert_eq!(volume_hashes(&op_uris(&back)).await?, hashes_b);
    // The operator's word, given to the move's task this time.
    let task = back.task_id.to_string();
    let wrong = tandem(&apis_a, &["task", "input", &task, "stop"]).await;
    assert!(
        wrong.is_err_and(|e| e.to_string().contains("not a running failover test")),
        "a move's task took a test's input"
    );
    tandem(&apis_a, &["task", "input", &task, "commit"]).await?;
    // kill -9 of site a's leader while it commits and protects forward again.
    let apis_a = kill_leader(&mut lab, 0).await?;
    wait_ended(&apis_a).await?;
    let home = wait_vpg_cli(
        &apis_a,
        "vpg-rv",
        Duration::from_secs(90),
        &mut seen,
        meeting_sla,
    )
    .await?;
    let syncs = last_syncs(&lab, 0, "vpg-rv").await?;
    let sent: u64 = syncs.iter().map(|s| s.1).sum();
    eprintln!("protected forward again: {syncs:?}, {sent} bytes sent; {home:?}");
    assert!(sent < MIB, "{sent} bytes sent where nothing differs");
    let vms: v1::ListVmsResponse = tandem_json(&apis_a, &["vm", "list", "--inventory"]).await?;
    assert_eq!(
        vms.vms.iter().filter(|v| v.id.starts_with("vm-")).count(),
        4
    );
    let at_a = site_uris(&lab, 0);
    assert_eq!(volume_hashes(&at_a).await?, hashes_b);
    lab.down().await;
    Ok(())
}

/// Fencing and reverse protection after a disaster: site a is lost (kill -9 of every
/// manager and VRA), site b fails over with reverse protection (committed by its
/// auto-commit policy) and shows Needs
/// Configuration while site a is gone; site a comes back believing it still protects the
/// VPG and its VMs write, yet its stale stream is refused and nothing of it reaches the
/// recovered VMs; it takes the new direction from site b (its VMs and their volumes go, its
/// VRAs become the recovery VRAs over the VMs' old disks), and a delta sync brings those
/// disks in line with site b: Meeting SLA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_protected_site_is_fenced_takes_the_new_direction_and_delta_syncs() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let (mut lab, _, apis_b, _) = recovery_lab(dir.path(), "vpg-fb").await?;
    let workload = recovery_workload(&lab).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for m in &mut lab.sites[0] {
        m.kill9().await?;
    }
    for v in &mut lab.vras[0] {
        v.kill9().await?;
    }
    // The commit policy commits it 3 s into before commit, no operator needed.
    tandem(
        &apis_b,
        &[
            "failover",
            "start",
            "vpg-fb",
            "--reverse",
            "yes",
            "--commit-policy",
            "auto-commit=3",
        ],
    )
    .await?;
    let op = before_commit(&apis_b).await?;
    let window = workload
        .window_at(op.checkpoint_ms)
        .context("no workload window at the checkpoint's time")?;
    let history = workload.stop().await;
    check_recovered(&history, &window, &op).await?;
    wait_ended(&apis_b).await?;
    let mut seen = Vec::new();
    wait_vpg_cli(&apis_b, "vpg-fb", Duration::from_secs(30), &mut seen, |g| {
        g.direction == "outgoing"
            && g.status
                .as_ref()
                .is_some_and(|s| s.substatus == "Needs Configuration")
    })
    .await?;
    // Nothing writes at site b from here: its VMs' volumes as they must stay.
    let at_b = site_uris(&lab, 1);
    let hashes_b = volume_hashes(&at_b).await?;

    // Site a returns as it was: its VRAs serve the VMs again, which write.
    for v in &mut lab.vras[0] {
        v.start().await?;
    }
    let stale = tandem_nbd::endpoint_uri(&lab.vras[0][0].nbd_socket, "vm-0/0");
    qemu_io(&stale, "write -P 0x77 8M 1M")?;
    for m in &mut lab.sites[0] {
        m.start("join").await?;
    }
    let apis_a = lab.endpoints(0);
    let turned = wait_vpg_cli(
        &apis_b,
        "vpg-fb",
        Duration::from_secs(120),
        &mut seen,
        |g| meeting_sla(g) && g.direction == "outgoing",
    )
    .await?;
    eprintln!("site b after site a returned: {seen:?}");
    let syncs = last_syncs(&lab, 1, "vpg-fb").await?;
    let sent: u64 = syncs.iter().map(|s| s.1).sum();
    eprintln!("reverse protection after the return: {syncs:?}, {sent} bytes sent for 64 MiB");
    // At least the stale write is undone; far from everything is sent.
    assert!((MIB..=32 * MIB).contains(&sent), "{sent} bytes sent");
    assert_eq!(
        volume_hashes(&at_b).await?,
        hashes_b,
        "site a reached the recovered VMs"
    );
    // Site a took the new direction: no VM of the VPG, no export of it, recovery VRAs.
    let at_a: v1::Vpg = tandem_json(&apis_a, &["vpg", "get", "vpg-fb"]).await?;
    assert_eq!(
        (at_a.direction.as_str(), at_a.generation),
        ("incoming", turned.generation),
        "{at_a:?}"
    );
    let vms: v1::ListVmsResponse = tandem_json(&apis_a, &["vm", "list", "--inventory"]).await?;
    assert!(vms.vms.iter().all(|v| !v.id.starts_with("vm-")), "{vms:?}");
    let roles = vra_vpg_status(&lab, 0, "vpg-fb").await?;
    assert!(
        roles.len() == 2 && roles.iter().all(|g| g.role == v1::VraRole::Recovery as i32),
        "{roles:?}"
    );
    assert!(
        NbdClient::connect_uri(&stale).await.is_err(),
        "site a still serves its old VM"
    );
    lab.down().await;
    Ok(())
}

/// The failpoints the managers of a lab hit, from their logs (for failure messages).
fn failpoints_hit(dir: &std::path::Path) -> Vec<String> {
    let mut hit = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().is_some_and(|n| n == "manager.log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                hit.extend(
                    text.lines()
                        .filter(|l| l.contains("failpoint hit"))
                        .map(|l| format!("{}: {}", p.display(), l.trim())),
                );
            }
        }
    }
    hit
}

/// Waits (restarting the managers of `site` that die meanwhile) until `done` holds for the
/// operations listed at `site`; answers them and how many managers died.
async fn revive_until(
    lab: &mut Lab,
    site: usize,
    what: &str,
    done: impl Fn(&[v1::RecoveryOperation]) -> bool,
) -> Result<(Vec<v1::RecoveryOperation>, usize)> {
    let start = Instant::now();
    let mut died = 0;
    loop {
        died += revive(lab, site).await?;
        if let Ok(ops) = recoveries(&lab.endpoints(site)).await
            && done(&ops)
        {
            return Ok((ops, died));
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("{what}: not within 120 s ({died} managers died)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Kill -9 of the leader at exactly each step boundary of a move (which has a failover's
/// steps and its own): every manager of the recovery site carries failpoints that abort
/// the process right after it commits the move into opening, before commit, committing,
/// promoting and removing the protected VMs, so each boundary kills whichever node leads
/// then (the test restarts it). The move still ends committed, with every acknowledged
/// write and the VPG protected back; the failover steps' boundaries are the same ones.
/// Then a move back is rolled back with the other site's leader killed right after it
/// commits the rollback: it ends rolled back, the VMs running where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_at_every_step_boundary_of_a_move_ends_it_committed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut lab, _, _, _) = recovery_lab(dir.path(), "vpg-fp").await?;
    let steps = [
        "opening",
        "before commit",
        "committing",
        "promoting",
        "removing the protected VMs",
    ];
    let armed: Vec<String> = steps.iter().map(|s| format!("recovery-step:{s}")).collect();
    arm_failpoints(&mut lab, 1, &armed.join(",")).await?;
    let workload = recovery_workload(&lab).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    tandem(&lab.endpoints(1), &["move", "start", "vpg-fp"]).await?;
    let (ops, died_before) = revive_until(&mut lab, 1, "before commit", |ops| {
        ops.iter().any(|o| o.step == "before commit")
    })
    .await?;
    let op = ops.into_iter().next().context("no move")?;
    let history = workload.stop().await;
    let exact = tandem_testkit::workload::CutWindow::exact(history.end());
    let included = check_recovered(&history, &exact, &op).await?;
    // The commit may meet a leader that is just dying: the word is given again until one
    // takes it (the first word stands).
    // A death restarted here counts too (it was a boundary's).
    let start = Instant::now();
    let mut died_at_commit = 0;
    while let Err(e) = tandem(&lab.endpoints(1), &["move", "commit", "vpg-fp"]).await {
        died_at_commit += revive(&mut lab, 1).await?;
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the commit was not taken: {e}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (_, died_after) = revive_until(&mut lab, 1, "the move's end", |ops| ops.is_empty()).await?;
    let died = died_before + died_at_commit + died_after;
    eprintln!(
        "move ended with {died} leaders killed at its step boundaries; {included} writes moved"
    );
    // A deposed leader's late proposal may hit a failpoint too: at least one death per
    // boundary.
    assert!(
        died >= steps.len(),
        "{died} deaths: a failpoint did not fire; fired: {:?}",
        failpoints_hit(&lab.dir)
    );
    let mut seen = Vec::new();
    wait_vpg_cli(
        &lab.endpoints(1),
        "vpg-fp",
        Duration::from_secs(90),
        &mut seen,
        |g| meeting_sla(g) && g.direction == "outgoing",
    )
    .await?;
    assert_eq!(check_recovered(&history, &exact, &op).await?, included);

    // The move back, rolled back, with site a's leader killed as it commits the rollback.
    arm_failpoints(&mut lab, 0, "recovery-step:rolling back").await?;
    tandem(&lab.endpoints(0), &["move", "start", "vpg-fp"]).await?;
    revive_until(&mut lab, 0, "the move back before commit", |ops| {
        ops.iter().any(|o| o.step == "before commit")
    })
    .await?;
    tandem(&lab.endpoints(0), &["move", "rollback", "vpg-fp"]).await?;
    let (_, died) = revive_until(&mut lab, 0, "the rollback's end", |ops| ops.is_empty()).await?;
    assert!(died >= 1, "the rollback's failpoint did not fire");
    eprintln!("move back rolled back with {died} leader(s) killed as it committed the rollback");
    // Site b's VMs run again with everything, and protect towards site a as before.
    wait_vpg_cli(
        &lab.endpoints(1),
        "vpg-fp",
        Duration::from_secs(90),
        &mut seen,
        |g| meeting_sla(g) && g.direction == "outgoing",
    )
    .await?;
    let at_b = site_uris(&lab, 1);
    assert_eq!(check_uris(&history, &exact, &at_b).await?, included);
    lab.down().await;
    Ok(())
}

/// A move rolled back: the recovered VMs wrote before commit, yet the sources and the
/// replicas are byte for byte as they were, the protected VMs are powered on again and
/// protection resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_move_powers_the_protected_vms_on_again() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut lab, apis_a, apis_b, mut seen) = recovery_lab(dir.path(), "vpg-mb").await?;
    let workload = recovery_workload(&lab).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let op: v1::RecoveryOperations = tandem_json(
        &apis_b,
        &["move", "start", "vpg-mb", "--wait", "--timeout", "60"],
    )
    .await?;
    let op = op.operations.first().context("no move")?.clone();
    assert_eq!(op.step, "before commit", "{op:?}");
    let history = workload.stop().await;
    let images = |h: std::collections::BTreeMap<std::path::PathBuf, String>| {
        h.into_iter()
            .filter(|(p, _)| p.extension().is_some_and(|e| e == "img" || e == "replica"))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let before = images(datastore_hashes(&lab)?);
    assert_eq!(before.len(), 8, "{before:?}");
    for v in &op.volumes {
        qemu_io(&v.nbd_uri, "write -P 0x71 12M 1M")?;
    }
    tandem(&apis_b, &["move", "rollback", "vpg-mb"]).await?;
    // kill -9 of the recovery site's leader while it rolls back: it ends rolled back.
    let apis_b = kill_leader(&mut lab, 1).await?;
    wait_ended(&apis_b).await?;
    assert_eq!(
        images(datastore_hashes(&lab)?),
        before,
        "after the rollback"
    );
    // The protected VMs are on again, with every acknowledged write, and protected.
    let protected = vra_vpg_status(&lab, 0, "vpg-mb").await?;
    assert!(protected.iter().all(|g| !g.powered_off), "{protected:?}");
    let exact = tandem_testkit::workload::CutWindow::exact(history.end());
    check_uris(&history, &exact, &site_uris(&lab, 0))
        .await
        .context("the protected volumes after the rollback")?;
    wait_vpg_cli(
        &apis_a,
        "vpg-mb",
        Duration::from_secs(60),
        &mut seen,
        meeting_sla,
    )
    .await?;
    lab.down().await;
    Ok(())
}

/// A failover that shuts the protected VMs down first (both sites up): they are powered
/// off and drained, the failover goes to a last checkpoint taken after (the latest was
/// asked), so every write the workload acknowledged is in the recovered volumes; the
/// commit removes the protected VMs at the old site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_shuts_the_protected_vms_down_loses_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (lab, apis_a, apis_b, _) = recovery_lab(dir.path(), "vpg-sd").await?;
    let workload = recovery_workload(&lab).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let op: v1::RecoveryOperations = tandem_json(
        &apis_b,
        &[
            "failover",
            "start",
            "vpg-sd",
            "--shutdown",
            "yes",
            "--wait",
            "--timeout",
            "60",
        ],
    )
    .await?;
    let op = op.operations.first().context("no failover")?.clone();
    assert_eq!(
        (op.kind.as_str(), op.step.as_str()),
        ("failover", "before commit"),
        "{op:?}"
    );
    assert!(
        op.checkpoint_name.starts_with("move "),
        "the last checkpoint: {op:?}"
    );
    let history = workload.stop().await;
    let exact = tandem_testkit::workload::CutWindow::exact(history.end());
    check_recovered(&history, &exact, &op).await?;
    let protected = vra_vpg_status(&lab, 0, "vpg-sd").await?;
    assert!(protected.iter().all(|g| g.powered_off), "{protected:?}");
    tandem(
        &apis_b,
        &["failover", "commit", "vpg-sd", "--wait", "--timeout", "60"],
    )
    .await?;
    let start = Instant::now();
    while !vra_vpg_status(&lab, 0, "vpg-sd").await?.is_empty()
        || status_of(&apis_a, "vpg-sd").await?.status != "Recovered"
    {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("site-a still protects vpg-sd");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut lab = lab;
    lab.down().await;
    Ok(())
}

/// The TLS handshakes the lab's managers and VRAs refused so far, as their logs say.
fn handshakes_refused(lab: &Lab) -> usize {
    let logs = lab
        .sites
        .iter()
        .flatten()
        .map(|m| m.dir.join("manager.log"))
        .chain(lab.vras.iter().flatten().map(|v| v.dir.join("vra.log")));
    logs.map(|path| {
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .matches("TLS handshake failed")
            .count()
    })
    .sum()
}

/// Resets every connection between the two sites: the VRAs' streams and the managers'
/// calls come back on new handshakes. Protection goes on through it: writes are
/// acknowledged, and both sites see the VPG meet its SLA again.
async fn reset_link_and_meet_sla(
    lab: &Lab,
    workload: &Workload,
    apis: [&Vec<String>; 2],
    seen: &mut Seen,
) -> Result<()> {
    let link = lab.links.get(&lab.link_name(0, 1)).await?;
    link.cut(tandem_testkit::link::CutMode::Drop).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    link.heal().await?;
    let acked = workload.acked();
    workload.wait_acked(acked + 100).await?;
    for apis in apis {
        wait_vpg_cli(apis, "vpg-rot", Duration::from_secs(30), seen, meeting_sla).await?;
    }
    Ok(())
}

/// Certificates renewed by the managers under the workload, then the site's CA rotated:
/// with a 60 s lifetime, every manager renews its own and the leaders their VRAs' (each
/// VRA makes its key) when a third is left, and every node takes up its new certificate
/// while it serves (no restart, open connections go on); the first certificates expire,
/// the connections between the sites come back on the renewed ones after a reset. Then
/// site A's CA is rotated, its leader killed with -9 as it starts and restarted: every
/// node and site B trust the new CA, it issues, every
/// certificate is renewed, the old CA is retired, and the connections come back on the
/// new CA's certificates after another reset. Protection stays Meeting SLA, and a move
/// afterwards (which drains every write across) loses no acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_and_a_rotated_ca_are_taken_up_under_the_workload_and_no_write_is_lost()
-> Result<()> {
    use tandem_tls::TlsConfig;
    use tandem_tls::pki::PkiDir;
    let dir = tempfile::tempdir()?;
    let (mut lab, apis_a, apis_b, mut seen) =
        recovery_lab_with(dir.path(), "vpg-rot", &[("TANDEM_CERT_TTL_SECS", "60")]).await?;
    let workload = recovery_workload(&lab).await?;

    // Every node, with the certificate it holds now.
    let mut nodes = Vec::new();
    for site in 0..2 {
        for m in &lab.sites[site] {
            nodes.push((
                site,
                format!("manager {} of {}", m.id, m.site),
                m.api.clone(),
                m.dir.join("data"),
            ));
        }
        for v in &lab.vras[site] {
            nodes.push((
                site,
                format!("VRA {}", v.host),
                v.control.clone(),
                v.dir.join("data"),
            ));
        }
    }
    let mut before = Vec::new();
    for (_, _, _, data) in &nodes {
        before.push(
            TlsConfig::load(&PkiDir::new(data.join("pki")))?
                .chain_leaf()
                .to_vec(),
        );
    }
    // Within one lifetime each serves another, the one its managers renewed.
    let start = Instant::now();
    for ((site, who, addr, _), old) in nodes.iter().zip(&before) {
        let harness = lab.harness(*site)?.client();
        loop {
            let served = tandem_tls::dial::served_certificate(addr, harness.clone())
                .await
                .map_err(|e| anyhow::anyhow!("{who}: {e}"))?;
            if served != *old {
                break;
            }
            if start.elapsed() > Duration::from_secs(75) {
                bail!(
                    "{who} still serves the certificate it had {:?} ago",
                    start.elapsed()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!("{who} serves a renewed certificate ({:?})", start.elapsed());
    }
    // Past the first certificates' end: whatever connects now does so on renewed ones.
    tokio::time::sleep(Duration::from_secs(5)).await;
    reset_link_and_meet_sla(&lab, &workload, [&apis_a, &apis_b], &mut seen).await?;

    // Site A's CA is rotated under the workload: the new CA is trusted everywhere (site
    // A's managers and VRAs, site B's managers and VRAs) before it issues; then every
    // certificate is renewed, and the old CA is retired everywhere.
    let refused_before = handshakes_refused(&lab);
    let before: v1::Site = tandem_json(&apis_a, &["site", "get"]).await?;
    let old_ca = before.issuing_ca_fingerprint.clone();
    let rotating: v1::Site = tandem_json(&apis_a, &["site", "rotate-ca"]).await?;
    // The operator's clients need the new CA before it issues.
    lab.trust_operator_cas(&rotating.ca_bundle_pem)?;
    let new_ca = rotating
        .ca_fingerprints
        .iter()
        .find(|f| **f != old_ca)
        .cloned()
        .context("the rotation names no new CA")?;
    assert_eq!(rotating.ca_fingerprints.len(), 2, "{rotating:?}");
    // kill -9 of site A's leader as the rotation starts: it goes on from the replicated
    // state under the next leader, and waits for the killed member until it is back.
    let leader = wait_leader(&apis_a[0], 3, Duration::from_secs(10))
        .await?
        .leader_id;
    let killed = lab.sites[0]
        .iter()
        .position(|m| m.id == leader)
        .context("site A's leader is not in the lab")?;
    lab.sites[0][killed].kill9().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.sites[0][killed].start("join").await?;
    eprintln!(
        "killed site A's leader (manager {leader}) as the rotation started, and restarted it"
    );
    let start = Instant::now();
    let mut phase = rotating.ca_rotation.clone();
    let mut waits = String::new();
    eprintln!("CA rotation of site A: {phase}");
    let done = loop {
        let s: v1::Site = tandem_json(&apis_a, &["site", "get"]).await?;
        if s.ca_rotation != phase || s.ca_rotation_waits_for != waits {
            phase = s.ca_rotation.clone();
            waits = s.ca_rotation_waits_for.clone();
            eprintln!(
                "CA rotation of site A: {phase:?}, waits for {waits:?} ({:?})",
                start.elapsed()
            );
        }
        if phase.is_empty() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!(
                "the CA rotation of site A is still {phase:?} after {:?}",
                start.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(done.issuing_ca_fingerprint, new_ca);
    assert_eq!(done.ca_fingerprints, vec![new_ca.clone()]);
    assert_eq!(done.node_certificates.len(), 3, "{done:?}");
    assert!(
        done.node_certificates
            .iter()
            .all(|c| c.issuer_fingerprint == new_ca),
        "{done:?}"
    );
    // Every node of site A holds a certificate of the new CA and trusts it alone; site B
    // trusts it alone for site A.
    let start = Instant::now();
    loop {
        let mut stale = Vec::new();
        for (site, who, _, data) in &nodes {
            let tls = TlsConfig::load(&PkiDir::new(data.join("pki")))?;
            if *site == 0
                && (tls.ca_fingerprint().ok().as_ref() != Some(&new_ca)
                    || tls.own_ca_fingerprints() != vec![new_ca.clone()])
            {
                stale.push(who.clone());
            }
        }
        let peers: v1::ListPeersResponse = tandem_json(&apis_b, &["pair", "list"]).await?;
        if tandem_tls::cert::check_ca_bundle(&peers.peers[0].ca_pem)? != vec![new_ca.clone()] {
            stale.push("site B's record of site A".into());
        }
        if stale.is_empty() {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("still on the old CA of site A: {}", stale.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for code in ["EV0072", "EV0073", "EV0074"] {
        let events: v1::EventList =
            tandem_json(&apis_a, &["event", "list", "--code", code]).await?;
        assert_eq!(events.events.len(), 1, "site A's {code} events: {events:?}");
    }
    eprintln!("site A's CA rotated from {old_ca} to {new_ca}");
    // No node refused a handshake through it: each trusted a CA before it met a
    // certificate of it, and until the last certificate of a CA was gone.
    assert_eq!(
        handshakes_refused(&lab),
        refused_before,
        "handshakes failed during the rotation"
    );
    // Everything reconnects on certificates of the new CA alone.
    reset_link_and_meet_sla(&lab, &workload, [&apis_a, &apis_b], &mut seen).await?;
    assert!(
        !lab.sites.iter_mut().flatten().any(|m| m.died()),
        "a manager died"
    );

    tandem(&apis_b, &["move", "start", "vpg-rot", "--reverse", "no"]).await?;
    let op = before_commit(&apis_b).await?;
    let history = workload.stop().await;
    let exact = tandem_testkit::workload::CutWindow::exact(history.end());
    let included = check_recovered(&history, &exact, &op).await?;
    eprintln!(
        "{} writes acknowledged; the moved volumes hold {included}, every acknowledged one",
        history.acked_writes()
    );
    lab.down().await;
    Ok(())
}
