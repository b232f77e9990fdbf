//! What the recovery and fencing tests share: a lab protecting one VPG of 4 VMs, the
//! `tandem` CLI as an operator runs it, the verifying workload on the VMs' volumes, and
//! looks at operations, statuses and VRAs.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tandem_nbd::NbdClient;
use tandem_proto::v1;
use tandem_proto::v1::vra_control_client::VraControlClient;
use tandem_testkit::lab::{Lab, wait_leader};
use tandem_testkit::protect::{self, ProtectOptions, wait_vpg_cli};
use tandem_testkit::workload::{ImageReader, VolumeTarget, Workload, WorkloadConfig, check_image};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// The (status, substatus) pairs a wait saw, as `wait_vpg_cli` records them.
pub type Seen = Vec<(String, String)>;

/// Runs `tandem -e APIS ARGS`; answers what it printed, or fails with its stderr.
pub async fn tandem(apis: &[String], args: &[&str]) -> Result<Vec<u8>> {
    let out = tokio::process::Command::from(tandem_testkit::operator::cli())
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
pub async fn tandem_json<T: serde::de::DeserializeOwned>(
    apis: &[String],
    args: &[&str],
) -> Result<T> {
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

pub fn qemu_io(uri: &str, command: &str) -> Result<String> {
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

/// kill -9 of site `site`'s leader; answers the API addresses of the others.
pub async fn kill_leader(lab: &mut Lab, site: usize) -> Result<Vec<String>> {
    let apis = lab.endpoints(site);
    let status = wait_leader(&apis[0], 3, Duration::from_secs(10)).await?;
    let leader = lab.sites[site]
        .iter()
        .position(|p| p.id == status.leader_id)
        .context("leader not in the lab")?;
    lab.sites[site][leader].kill9().await?;
    Ok(apis
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, a)| a.clone())
        .collect())
}

/// A lab of 2 sites x 3 managers and 2 VRAs each, with `vpg` (see [`recovery_options`])
/// protected and Meeting SLA; answers the lab, both sites' APIs and the statuses seen.
pub async fn recovery_lab(
    dir: &std::path::Path,
    vpg: &str,
) -> Result<(Lab, Vec<String>, Vec<String>, Seen)> {
    recovery_lab_with(dir, vpg, &[]).await
}

/// [`recovery_lab`] with `manager_env` in every manager's environment.
pub async fn recovery_lab_with(
    dir: &std::path::Path,
    vpg: &str,
    manager_env: &[(&str, &str)],
) -> Result<(Lab, Vec<String>, Vec<String>, Seen)> {
    let mut lab = Lab::up_with(dir, 2, 3, manager_env).await?;
    lab.start_vras(2).await?;
    protect::protect(&lab, &recovery_options(vpg)).await?;
    let (apis_a, apis_b) = (lab.endpoints(0), lab.endpoints(1));
    let mut seen = Vec::new();
    wait_vpg_cli(
        &apis_a,
        vpg,
        Duration::from_secs(60),
        &mut seen,
        meeting_sla,
    )
    .await?;
    Ok((lab, apis_a, apis_b, seen))
}

pub fn meeting_sla(g: &v1::Vpg) -> bool {
    g.status.as_ref().is_some_and(|s| s.status == "Meeting SLA")
}

/// The options of the recovery tests' VPG: 4 VMs on 2 hosts, a checkpoint a second.
pub fn recovery_options(vpg: &str) -> ProtectOptions {
    ProtectOptions {
        volumes_per_vm: 1,
        vpg: vpg.into(),
        vms: 4,
        volume_bytes: 16 * MIB,
        memory_mib: 512,
        settings: v1::VpgSettings {
            checkpoint_interval_secs: 1,
            journal_history_secs: 3600,
            target_rpo_secs: 60,
            ..Default::default()
        },
    }
}

/// Starts the verifying workload on volume 0 of each VM of the recovery tests' VPG.
pub async fn recovery_workload(lab: &Lab) -> Result<Workload> {
    let targets = (0..4)
        .map(|i| VolumeTarget::new(&lab.vras[0][i % 2].nbd_socket, format!("vm-{i}/0")))
        .collect();
    let mut config = WorkloadConfig::new(targets);
    config.region_blocks = Some(1024);
    let seed = config.seed;
    eprintln!(
        "workload seed {seed}; rerun: TANDEM_WORKLOAD_SEED={seed} cargo nextest run -p tandem-tests --test recovery"
    );
    Ok(Workload::start(config).await?)
}

pub async fn recoveries(apis: &[String]) -> Result<Vec<v1::RecoveryOperation>> {
    let r: v1::RecoveryOperations = tandem_json(apis, &["failover", "list"]).await?;
    Ok(r.operations)
}

/// Checks the recovered volume 0 of every VM against what the workload acknowledged by
/// the checkpoint (and issued after it): every acknowledged write is there, none later.
pub async fn check_recovered(
    workload_history: &tandem_testkit::workload::History,
    window: &tandem_testkit::workload::CutWindow,
    op: &v1::RecoveryOperation,
) -> Result<u64> {
    check_uris(workload_history, window, &op_uris(op))
        .await
        .with_context(|| format!("recovered volumes at checkpoint {}", op.checkpoint_id))
}

/// Checks volume 0 of every VM, as `uris` serve them in VM order, against what the
/// workload acknowledged by `window`; answers how many writes they hold.
pub async fn check_uris(
    workload_history: &tandem_testkit::workload::History,
    window: &tandem_testkit::workload::CutWindow,
    uris: &[String],
) -> Result<u64> {
    let mut clients = Vec::new();
    for uri in uris {
        // A VPG can show Meeting SLA a moment before its VRAs serve every volume again
        // (after a rollback, a stand-up): the check waits for the volume, briefly.
        let start = Instant::now();
        let client = loop {
            match NbdClient::connect_uri(uri).await {
                Ok(c) => break c,
                Err(e) if start.elapsed() > Duration::from_secs(30) => {
                    return Err(anyhow::anyhow!("{uri}: {e}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        clients.push(client);
    }
    let images: Vec<&dyn ImageReader> = clients.iter().map(|c| c as &dyn ImageReader).collect();
    let report = check_image(workload_history, window, &images).await?;
    for c in clients {
        c.disconnect().await?;
    }
    Ok(report.writes_included)
}

/// The NBD URIs of volume 0 of each VM as `site`'s VRAs serve them (VM i on host i % 2),
/// in VM order.
pub fn site_uris(lab: &Lab, site: usize) -> Vec<String> {
    (0..4)
        .map(|i| tandem_nbd::endpoint_uri(&lab.vras[site][i % 2].nbd_socket, &format!("vm-{i}/0")))
        .collect()
}

/// Restarts the managers of `site` one by one with failpoints `points` armed.
pub async fn arm_failpoints(lab: &mut Lab, site: usize, points: &str) -> Result<()> {
    for i in 0..lab.sites[site].len() {
        let m = &mut lab.sites[site][i];
        m.env = vec![("TANDEM_FAILPOINTS".into(), points.into())];
        m.kill9().await?;
        m.start("join").await?;
        wait_leader(&lab.sites[site][i].api, 3, Duration::from_secs(30)).await?;
    }
    Ok(())
}

pub async fn status_of(apis: &[String], vpg: &str) -> Result<v1::VpgStatus> {
    let g: v1::Vpg = tandem_json(apis, &["vpg", "get", vpg]).await?;
    g.status.context("no status")
}

/// Waits until no failover or move runs at the site of `apis`.
pub async fn wait_ended(apis: &[String]) -> Result<()> {
    let start = Instant::now();
    while !recoveries(apis).await.is_ok_and(|o| o.is_empty()) {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the operation did not end: {:?}", recoveries(apis).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The status of a VPG on every VRA of a site that reports it.
pub async fn vra_vpg_status(
    lab: &Lab,
    site: usize,
    vpg: &str,
) -> Result<Vec<v1::VpgReplicationStatus>> {
    let mut out = Vec::new();
    for vra in &lab.vras[site] {
        let s = VraControlClient::new(vra.control_channel().await?)
            .get_status(v1::GetVraStatusRequest {})
            .await?
            .into_inner();
        out.extend(s.vpgs.into_iter().filter(|g| g.vpg_id == vpg));
    }
    Ok(out)
}

/// blake3 of each VM's volume 0 (`vm-0/0` ...) as `uris` serve them over NBD, in VM order.
pub async fn volume_hashes(uris: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for uri in uris {
        let c = NbdClient::connect_uri(uri).await?;
        let mut h = blake3::Hasher::new();
        let mut at = 0;
        while at < 16 * MIB {
            h.update(&c.read(at, MIB as u32).await?);
            at += MIB;
        }
        c.disconnect().await?;
        out.push(h.finalize().to_hex().to_string());
    }
    Ok(out)
}

/// The NBD URIs of volume 0 of every VM of an operation, in VM order.
pub fn op_uris(op: &v1::RecoveryOperation) -> Vec<String> {
    let mut v: Vec<&v1::RecoveredVolume> = op.volumes.iter().filter(|v| v.volume_id == 0).collect();
    v.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    v.into_iter().map(|v| v.nbd_uri.clone()).collect()
}

/// Waits for a failover or move at `apis` to reach before commit.
pub async fn before_commit(apis: &[String]) -> Result<v1::RecoveryOperation> {
    let start = Instant::now();
    loop {
        let ops = recoveries(apis).await.unwrap_or_default();
        if let Some(op) = ops.into_iter().find(|o| o.step == "before commit") {
            return Ok(op);
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!(
                "no operation reached before commit: {:?}",
                recoveries(apis).await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The last sync each protected VRA of `site` ran for `vpg`, once none runs one and each
/// ran one: (kind, bytes sent).
pub async fn last_syncs(lab: &Lab, site: usize, vpg: &str) -> Result<Vec<(i32, u64)>> {
    let (syncs, _) = protect::finished_syncs(lab, site, vpg, Duration::from_secs(60)).await?;
    Ok(syncs.into_iter().map(|s| (s.kind, s.sent_bytes)).collect())
}

/// Restarts the managers of `site` that died (failpoints); answers how many.
pub async fn revive(lab: &mut Lab, site: usize) -> Result<usize> {
    let mut n = 0;
    for m in &mut lab.sites[site] {
        if m.died() {
            m.child = None;
            m.start("join").await?;
            n += 1;
        }
    }
    Ok(n)
}

/// Whether any file under `root` (or `root` itself, a file) holds `run` bytes of `byte`
/// in a row (on 4 KiB boundaries: how a test VM's write would land in a journal or a
/// replica).
pub fn holds_run(
    root: &std::path::Path,
    byte: u8,
    run: usize,
) -> Result<Option<std::path::PathBuf>> {
    if root.is_file() {
        return Ok(file_holds_run(root, byte, run)?.then(|| root.to_path_buf()));
    }
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)? {
            let path = e?.path();
            if path.is_dir() {
                dirs.push(path);
            // (Sockets, such as a VRA's NBD socket, are not data.)
            } else if path.is_file() && file_holds_run(&path, byte, run)? {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}

fn file_holds_run(path: &std::path::Path, byte: u8, run: usize) -> Result<bool> {
    use std::io::Read;
    let want = vec![byte; 4096];
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 4096];
    let mut streak = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        if n == 4096 && buf == want {
            streak += 4096;
            if streak >= run {
                return Ok(true);
            }
        } else {
            streak = 0;
        }
    }
}
