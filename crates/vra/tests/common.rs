//! Harness of the VRA's process tests: starts `tandem-vra` binaries on loopback port 0,
//! drives them through `VraControl`, and runs real NBD clients against them.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tandem_proto::v1::{self as pb, vra_control_client::VraControlClient};
use tonic::transport::Channel;

/// How long a test waits for a condition before failing.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running `tandem-vra` process; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct VraProcess {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub host: String,
    pub control: String,
    pub nbd: String,
    log: PathBuf,
}

impl VraProcess {
    /// Starts a VRA with its data dir under `root/host` and waits for its address file.
    pub fn start(root: &Path, host: &str) -> Self {
        Self::start_on(root, host, "127.0.0.1:0")
    }

    /// Starts a VRA whose control listener binds `control` (to restart on the same port).
    pub fn start_on(root: &Path, host: &str, control: &str) -> Self {
        let data_dir = root.join(host);
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let addr_file = data_dir.join("addr.json");
        let _ = std::fs::remove_file(&addr_file);
        let log = root.join(format!("{host}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        // The replication protocol alone, without a site CA: TLS between VRAs is tested
        // end to end over labs (tests/tests/tls.rs).
        let child = Command::new(env!("CARGO_BIN_EXE_tandem-vra"))
            .arg("--insecure")
            .arg("--host-id")
            .arg(host)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--control-listen")
            .arg(control)
            .arg("--nbd-listen")
            .arg("127.0.0.1:0")
            .arg("--ram-mb")
            .arg("64")
            .arg("--addr-file")
            .arg(&addr_file)
            .env("RUST_LOG", "info,tandem_vra=debug,h2=warn,tower=warn")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn tandem-vra");
        let deadline = Instant::now() + PATIENCE;
        let addrs: serde_json::Value = loop {
            if let Ok(bytes) = std::fs::read(&addr_file)
                && let Ok(v) = serde_json::from_slice(&bytes)
            {
                break v;
            }
            assert!(
                Instant::now() < deadline,
                "vra {host} did not start; see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            child: Some(child),
            data_dir,
            host: host.to_string(),
            control: addrs["control"].as_str().expect("control").to_string(),
            nbd: addrs["nbd"].as_str().expect("nbd").to_string(),
            log,
        }
    }

    /// A control client.
    pub async fn client(&self) -> VraControlClient<Channel> {
        VraControlClient::connect(format!("http://{}", self.control))
            .await
            .expect("connect control")
    }

    /// `nbd://` URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.nbd)
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid")),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("sigterm");
        c.wait().expect("wait")
    }

    /// The process log (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for VraProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One VM of a test VPG: id and volume sizes.
pub struct TestVm {
    pub id: &'static str,
    pub sizes: Vec<u64>,
}

/// Replica path of a volume on the recovery VRA.
pub fn replica_path(root: &Path, vm: &str, vol: u32) -> PathBuf {
    root.join("ds-b").join(format!("{vm}-{vol}.replica"))
}

/// Source image path of a volume on the protected VRA.
pub fn image_path(root: &Path, vm: &str, vol: u32) -> PathBuf {
    root.join("ds-a").join(format!("{vm}-{vol}.img"))
}

/// Assigns a VPG: recovery on `b`, protected on `a`.
pub async fn assign(
    root: &Path,
    a: &VraProcess,
    b: &VraProcess,
    vpg: &str,
    generation: u64,
    vms: &[TestVm],
    compression: bool,
) {
    let extra = AssignExtra {
        recovery_address: &b.control,
        preseeded: false,
        priority: pb::VraPriority::Medium,
    };
    assign_with(root, a, b, vpg, generation, vms, compression, extra).await;
}

/// How [`assign_with`] differs from [`assign`].
pub struct AssignExtra<'a> {
    /// The address the protected VRA reaches `b` at (a link proxy).
    pub recovery_address: &'a str,
    /// The replicas are preseeded (delta sync instead of initial sync).
    pub preseeded: bool,
    pub priority: pb::VraPriority,
}

/// [`assign`], with a proxied recovery address, preseeding and priority.
#[allow(clippy::too_many_arguments)]
pub async fn assign_with(
    root: &Path,
    a: &VraProcess,
    b: &VraProcess,
    vpg: &str,
    generation: u64,
    vms: &[TestVm],
    compression: bool,
    extra: AssignExtra<'_>,
) {
    let rec = pb::AssignRecoveryRequest {
        vpg_id: vpg.into(),
        generation,
        vms: vms
            .iter()
            .map(|vm| pb::RecoveryVm {
                vm_id: vm.id.into(),
                volumes: vm
                    .sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &size)| pb::VraVolume {
                        volume_id: i as u32,
                        size_bytes: size,
                        path: root
                            .join("ds-b")
                            .join(format!("{vm}-{i}.replica", vm = vm.id))
                            .display()
                            .to_string(),
                        preseeded: false,
                    })
                    .collect(),
                journal_dir: root
                    .join("ds-b")
                    .join("journals")
                    .join(vm.id)
                    .display()
                    .to_string(),
                datastore_path: String::new(),
            })
            .collect(),
        journal_history_secs: 3600,
        journal_warning_bytes: 0,
        journal_hard_limit_bytes: 0,
        remove_dropped_vm_data: false,
        keep_vm_ids: Vec::new(),
        protected_site_id: String::new(),
    };
    b.client()
        .await
        .assign_recovery(rec)
        .await
        .expect("assign recovery");
    let prot = pb::AssignProtectedRequest {
        vpg_id: vpg.into(),
        generation,
        vms: vms
            .iter()
            .map(|vm| pb::ProtectedVm {
                vm_id: vm.id.into(),
                volumes: vm
                    .sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &size)| pb::VraVolume {
                        volume_id: i as u32,
                        size_bytes: size,
                        path: image_path(root, vm.id, i as u32).display().to_string(),
                        preseeded: false,
                    })
                    .collect(),
            })
            .collect(),
        recovery_vra_address: extra.recovery_address.to_string(),
        wan_compression: compression,
        priority: extra.priority as i32,
        freeze_timeout_ms: 10_000,
        preseeded: extra.preseeded,
        recovery_site_id: String::new(),
    };
    a.client()
        .await
        .assign_protected(prot)
        .await
        .expect("assign protected");
}

/// Status of one VPG on a VRA.
pub async fn vpg_status(v: &VraProcess, vpg: &str) -> pb::VpgReplicationStatus {
    let s = v
        .client()
        .await
        .get_status(pb::GetVraStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    s.vpgs
        .into_iter()
        .find(|p| p.vpg_id == vpg)
        .expect("vpg in status")
}

/// Polls `f` until it returns `Some`, failing after [`PATIENCE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the protected side is connected and level: no sync running or owed.
pub async fn wait_connected(a: &VraProcess, vpg: &str) {
    wait_for("the stream to connect and the syncs to finish", || async {
        let s = vpg_status(a, vpg).await;
        is_level(&s).then_some(())
    })
    .await;
}

/// Connected, nothing tracked or dirty, no sync running or owed.
pub fn is_level(s: &pb::VpgReplicationStatus) -> bool {
    s.connected
        && s.sync.is_none()
        && s.dirty_bytes == 0
        && !s.tracking
        && s.state != pb::VpgStreamState::NeedsSync as i32
}

/// Freezes, copies the source images (the state at the checkpoint), thaws.
pub async fn checkpoint_with_copies(
    a: &VraProcess,
    vpg: &str,
    id: u64,
    copies: &[(PathBuf, PathBuf)],
) {
    let mut c = a.client().await;
    // A VPG that is syncing refuses checkpoints until it is level again.
    wait_for("a freeze to be accepted", || {
        let mut c = c.clone();
        async move {
            c.freeze(pb::FreezeRequest {
                vpg_id: vpg.into(),
                checkpoint_id: id,
            })
            .await
            .ok()
        }
    })
    .await;
    for (src, dst) in copies {
        std::fs::copy(src, dst).expect("copy source image");
    }
    c.thaw(pb::ThawRequest {
        vpg_id: vpg.into(),
        checkpoint_id: id,
        // Now: a checkpoint stamped long ago would be promoted by the journal's history
        // window (maintenance) while the test still wants it.
        timestamp_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64,
        kind: pb::VraCheckpointKind::Manual as i32,
        name: format!("cp-{id}"),
    })
    .await
    .expect("thaw");
}

/// Waits until checkpoint `id` is durable in every journal of the VPG on `b`.
pub async fn wait_durable_checkpoint(b: &VraProcess, vpg: &str, id: u64) {
    wait_for("the checkpoint to be durable everywhere", || async {
        let cps = b
            .client()
            .await
            .list_checkpoints(pb::ListCheckpointsRequest { vpg_id: vpg.into() })
            .await
            .ok()?
            .into_inner();
        cps.checkpoints
            .iter()
            .any(|c| c.checkpoint_id == id && c.durable && c.usable)
            .then_some(())
    })
    .await;
}

/// Opens a point-in-time export and returns its name.
pub async fn open_pit(b: &VraProcess, vpg: &str, vm: &str, vol: u32, id: u64) -> String {
    b.client()
        .await
        .open_export(pb::OpenExportRequest {
            vpg_id: vpg.into(),
            vm_id: vm.into(),
            volume_id: vol,
            checkpoint_id: id,
            writable: false,
        })
        .await
        .expect("open export")
        .into_inner()
        .export_name
}

/// Runs a program, returning its exit code; panics if it cannot start.
pub fn run(program: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `qemu-io` commands against an NBD URI; panics on failure.
pub fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let (code, out) = run("qemu-io", &args);
    assert_eq!(code, 0, "qemu-io failed: {out}");
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io reported: {out}"
    );
}

/// `qemu-img compare` of a raw file and a raw NBD export: 0 identical, 1 different.
pub fn qemu_img_compare(file: &Path, uri: &str) -> (i32, String) {
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &file.display().to_string(),
            uri,
        ],
    )
}

/// Random writes of 4 KiB to 64 KiB over NBD to volume 0 of each VM, until `stop`;
/// each writer answers how many writes were acknowledged. A failed write ends a writer.
pub fn spawn_writers(
    nbd: &str,
    vms: &[(&str, u64)],
    seed: u64,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinSet<u64> {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let mut writers = tokio::task::JoinSet::new();
    for (i, &(vm, size)) in vms.iter().enumerate() {
        let addr = nbd.to_string();
        let export = format!("{vm}/0");
        let stop = stop.clone();
        writers.spawn(async move {
            let Ok(client) = tandem_nbd::NbdClient::connect(addr.as_str(), &export).await else {
                return 0;
            };
            let mut rng = StdRng::seed_from_u64(seed + i as u64);
            let mut n = 0u64;
            while !stop.is_cancelled() {
                let blocks = rng.gen_range(1..=16u64);
                let off = rng.gen_range(0..(size / 4096 - blocks)) * 4096;
                let mut data = vec![0u8; (blocks * 4096) as usize];
                rng.fill(&mut data[..]);
                if client
                    .write(off, bytes::Bytes::from(data), false)
                    .await
                    .is_err()
                {
                    break;
                }
                n += 1;
            }
            n
        });
    }
    writers
}

/// Stops writers and returns the writes acknowledged.
pub async fn stop_writers(
    stop: &tokio_util::sync::CancellationToken,
    mut writers: tokio::task::JoinSet<u64>,
) -> u64 {
    stop.cancel();
    let mut total = 0;
    while let Some(n) = writers.join_next().await {
        total += n.expect("writer");
    }
    total
}

/// Copies of the source images of volume 0 of each VM, named after `tag`.
pub fn copies(root: &Path, vms: &[&str], tag: &str) -> Vec<(PathBuf, PathBuf)> {
    vms.iter()
        .map(|vm| (image_path(root, vm, 0), root.join(format!("{vm}.{tag}"))))
        .collect()
}

/// Checks that the point-in-time image of checkpoint `id` equals each copy.
pub async fn assert_checkpoint_equals(
    b: &VraProcess,
    vpg: &str,
    id: u64,
    copies: &[(PathBuf, PathBuf)],
    vms: &[&str],
) {
    wait_durable_checkpoint(b, vpg, id).await;
    for (vm, (_, copy)) in vms.iter().zip(copies) {
        let name = open_pit(b, vpg, vm, 0, id).await;
        let (code, out) = qemu_img_compare(copy, &b.uri(&name));
        assert_eq!(code, 0, "{vm} at checkpoint {id}: {out}\n{}", b.log_tail());
    }
}
