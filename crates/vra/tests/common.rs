//! Harness of the VRA's process tests: standalone `tandem-vra` binaries on loopback port 0
//! (`tandem_testkit::process`), driven through `VraControl` as a site's managers would
//! (`tandem_testkit::vra`), with real NBD clients against them. The helpers here panic:
//! a failure is the test's.
// Each test binary uses a part of the harness.
#![allow(dead_code, unused_imports)]

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tandem_proto::v1 as pb;
use tandem_testkit::process::VraOptions;
pub use tandem_testkit::process::VraProcess;
pub use tandem_testkit::vra::{Assignment, TestVm, image_path, is_level, replica_path};

/// How long a test waits for a condition before failing.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Starts a plaintext (`--insecure`) VRA of `host` in `root/host`: the replication protocol
/// alone, without a site CA (TLS between VRAs is tested over labs, tests/tests/tls.rs).
pub async fn start(root: &Path, host: &str) -> VraProcess {
    let opts = VraOptions {
        bin: Some(env!("CARGO_BIN_EXE_tandem-vra").into()),
        ..VraOptions::default()
    };
    VraProcess::standalone(root, host, opts)
        .await
        .unwrap_or_else(|e| panic!("starting vra {host}: {e:#}"))
}

/// kill -9, then the same VRA again from its data directory, on the same addresses.
pub async fn restart_after_kill9(v: &mut VraProcess) {
    v.kill9().await.expect("kill -9");
    v.start().await.expect("restart");
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
    let mut x = Assignment::new(root, vpg, vms);
    x.generation = generation;
    x.compression = compression;
    assign_with(a, b, &x).await;
}

/// Assigns `x`: recovery on `b`, protected on `a`.
pub async fn assign_with(a: &VraProcess, b: &VraProcess, x: &Assignment<'_>) {
    tandem_testkit::vra::assign(a, b, x)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Status of one VPG on a VRA.
pub async fn vpg_status(v: &VraProcess, vpg: &str) -> pb::VpgReplicationStatus {
    tandem_testkit::vra::vpg_status(v, vpg)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Polls `f` until it returns `Some`, failing after [`PATIENCE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    tandem_testkit::eventually::until_some(what, PATIENCE, &mut f)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits until the protected side is connected and level: no sync running or owed.
pub async fn wait_connected(a: &VraProcess, vpg: &str) {
    tandem_testkit::vra::wait_status(a, vpg, "level", PATIENCE, is_level)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Freezes, copies the source images (the state at the checkpoint), thaws.
pub async fn checkpoint_with_copies(
    a: &VraProcess,
    vpg: &str,
    id: u64,
    copies: &[(PathBuf, PathBuf)],
) {
    let mut c = a.client().await.expect("control client");
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
            .ok()?
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
        .expect("control client")
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

/// Runs a program, returning its exit code and output; panics if it cannot start.
pub fn run(program: &str, args: &[&str]) -> (i32, String) {
    tandem_testkit::yardstick::run(program, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `qemu-io` commands against an NBD URI; panics on failure.
pub fn qemu_io(uri: &str, cmds: &[&str]) {
    tandem_testkit::yardstick::qemu_io(uri, cmds).unwrap_or_else(|e| panic!("{e:#}"));
}

/// `qemu-img compare` of a raw file and a raw NBD export: 0 identical, 1 different.
pub fn qemu_img_compare(file: &Path, uri: &str) -> (i32, String) {
    tandem_testkit::yardstick::qemu_img_compare(&file.display().to_string(), uri)
        .unwrap_or_else(|e| panic!("{e:#}"))
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
