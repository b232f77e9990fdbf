//! Recovery operations end to end, on real processes: 2 sites x 3 managers, 2 hosts with a
//! VRA per site, every inter-site connection through the lab's link emulator, driven as an
//! operator would (the `tandem` CLI, `-o json`) and checked with real NBD clients.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_lab::lab::{Lab, binary, wait_leader};
use tandem_lab::protect::{self, ProtectOptions, wait_vpg_cli};
use tandem_lab::workload::{ImageReader, VolumeTarget, Workload, WorkloadConfig, check_image};
use tandem_nbd::NbdClient;
use tandem_proto::v1;
use tandem_proto::v1::{
    monitoring_service_client::MonitoringServiceClient, task_service_client::TaskServiceClient,
    vpg_service_client::VpgServiceClient, vra_control_client::VraControlClient,
};
use tandem_tests::channel;

const MIB: u64 = 1 << 20;

/// Runs `tandem -e APIS ARGS`; answers what it printed, or fails with its stderr.
async fn tandem(apis: &[String], args: &[&str]) -> Result<Vec<u8>> {
    let out = tokio::process::Command::new(binary("tandem"))
        .args(["-e", &apis.join(",")])
        .args(args)
        .output()
        .await
        .context("running tandem")?;
    if !out.status.success() {
        bail!(
            "tandem {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// Runs `tandem -e APIS ARGS -o json` and parses what it prints.
async fn tandem_json<T: serde::de::DeserializeOwned>(apis: &[String], args: &[&str]) -> Result<T> {
    let args = [args, &["-o", "json"]].concat();
    let out = tandem(apis, &args).await?;
    serde_json::from_slice(&out).with_context(|| {
        format!(
            "tandem {} printed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out)
        )
    })
}

fn qemu_io(uri: &str, command: &str) -> Result<String> {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", command, uri])
        .output()
        .context("running qemu-io")?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success()
        || text.contains("Pattern verification failed")
        || text.contains("failed")
    {
        bail!("qemu-io {command:?} on {uri}: {text}");
    }
    Ok(text)
}

/// Whether any file under `root` holds `run` bytes of `byte` in a row (on 4 KiB
/// boundaries: how a test VM's write would land in a journal or a replica).
fn holds_run(root: &std::path::Path, byte: u8, run: usize) -> Result<Option<std::path::PathBuf>> {
    use std::io::Read;
    let want = vec![byte; 4096];
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)? {
            let path = e?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let mut f = std::fs::File::open(&path)?;
            let mut buf = vec![0u8; 4096];
            let mut streak = 0;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                if n == 4096 && buf == want {
                    streak += 4096;
                    if streak >= run {
                        return Ok(Some(path));
                    }
                } else {
                    streak = 0;
                }
            }
        }
    }
    Ok(None)
}

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
    let mut lab = Lab::up(dir.path(), 2, 3).await?;
    lab.start_vras(2).await?;
    let options = ProtectOptions {
        vpg: "vpg-web".into(),
        vms: 4,
        volume_bytes: 16 * MIB,
        memory_mib: 512,
        settings: v1::VpgSettings {
            checkpoint_interval_secs: 1,
            journal_history_secs: 3600,
            target_rpo_secs: 60,
            ..Default::default()
        },
    };
    protect::protect(&lab, &options).await?;
    let (apis_a, apis_b) = (lab.endpoints(0), lab.endpoints(1));
    let mut seen = Vec::new();
    wait_vpg_cli(
        &apis_a,
        "vpg-web",
        Duration::from_secs(60),
        &mut seen,
        |g| g.status.as_ref().is_some_and(|s| s.status == "Meeting SLA"),
    )
    .await?;

    let targets = (0..4)
        .map(|i| VolumeTarget::new(&lab.vras[0][i % 2].nbd, format!("vm-{i}/0")))
        .collect();
    let mut config = WorkloadConfig::new(targets);
    config.region_blocks = Some(1024);
    let seed = config.seed;
    eprintln!(
        "workload seed {seed}; rerun: TANDEM_WORKLOAD_SEED={seed} cargo nextest run -p tandem-tests --test recovery"
    );
    let workload = Workload::start(config).await?;
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
    let status = wait_leader(&apis_b[0], 3, Duration::from_secs(10)).await?;
    let leader = lab.sites[1]
        .iter()
        .position(|p| p.id == status.leader_id)
        .context("leader not in the lab")?;
    lab.sites[1][leader].kill9().await?;
    let survivors: Vec<String> = apis_b
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, a)| a.clone())
        .collect();
    // kill -9 of the recovery VRA of host 0: its images are opened again once it is back.
    lab.vras[1][0].kill9().await?;
    lab.vras[1][0].start().await?;
    let host0 = lab.vras[1][0].host.clone();
    let start = Instant::now();
    loop {
        // Until a new leader is elected, reads fail: retried.
        let tests = tests_running(&survivors).await.unwrap_or_default();
        let exports = VraControlClient::new(channel(&lab.vras[1][0].control).await?)
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
        let exports = VraControlClient::new(channel(&vra.control).await?)
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
