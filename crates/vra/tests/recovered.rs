//! Process tests of recovery at the VRA (failover and move before and after commit)
//! between two `tandem-vra` processes with real NBD clients: the recovered volumes equal
//! the source at the checkpoint (`qemu-img compare`); a rollback leaves every journal and
//! replica file byte for byte as it was and the stream resumes; a commit promotes, merges
//! what the VMs wrote before it and serves the replicas; kill -9 of the recovery VRA
//! before and after commit keeps flushed writes and the phase.

mod common;

use std::{
    collections::BTreeMap,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use common::*;
use tandem_proto::v1 as pb;

const MIB: u64 = 1 << 20;
const VPG: &str = "vpg-r";

fn vms() -> Vec<TestVm> {
    vec![
        TestVm {
            id: "vm-1".into(),
            sizes: vec![8 * MIB, 2 * MIB],
        },
        TestVm {
            id: "vm-2".into(),
            sizes: vec![4 * MIB],
        },
    ]
}

const VOLUMES: [(&str, u32); 3] = [("vm-1", 0), ("vm-1", 1), ("vm-2", 0)];

/// blake3 of every file under `dir`, by path.
fn hash_tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).expect("read file");
                out.insert(p, blake3::hash(&bytes).to_hex().to_string());
            }
        }
    }
    out
}

/// Protects, writes, takes checkpoint 1 (with copies of the source at it), writes more
/// after it and waits until all of it is durable at `b`. Returns the copies.
async fn protect_with_history(root: &Path, a: &VraProcess, b: &VraProcess) -> Vec<PathBuf> {
    assign(root, a, b, VPG, 1, &vms(), true).await;
    wait_connected(a, VPG).await;
    qemu_io(
        &a.uri("vm-1/0"),
        &["write -P 0xaa 0 1M", "write -P 0xbb 3M 512k"],
    );
    qemu_io(&a.uri("vm-1/1"), &["write -P 0x11 4k 8k"]);
    qemu_io(&a.uri("vm-2/0"), &["write -P 0x22 1M 1M"]);
    let copies: Vec<(PathBuf, PathBuf)> = VOLUMES
        .iter()
        .map(|&(vm, vol)| {
            (
                image_path(root, vm, vol),
                root.join(format!("{vm}-{vol}.cp1")),
            )
        })
        .collect();
    checkpoint_with_copies(a, VPG, 1, &copies).await;
    // After the checkpoint: in the journal, never in a recovery to checkpoint 1.
    qemu_io(&a.uri("vm-1/0"), &["write -P 0xcc 0 512k"]);
    qemu_io(&a.uri("vm-2/0"), &["write -P 0xdd 0 4k"]);
    wait_durable_checkpoint(b, VPG, 1).await;
    wait_for("everything written to be acknowledged", || async {
        let s = vpg_status(a, VPG).await;
        (s.acked_seq == s.written_seq && is_level(&s)).then_some(())
    })
    .await;
    copies.into_iter().map(|(_, c)| c).collect()
}

async fn start_recovery(b: &VraProcess, op: &str, checkpoint: u64) -> pb::RecoveryVolumes {
    b.client()
        .await
        .expect("control client")
        .start_recovery(pb::StartRecoveryRequest {
            vpg_id: VPG.into(),
            generation: 1,
            checkpoint_id: checkpoint,
            op_id: op.into(),
        })
        .await
        .expect("start recovery")
        .into_inner()
}

async fn rollback(b: &VraProcess, op: &str) -> Result<(), tonic::Status> {
    b.client()
        .await
        .expect("control client")
        .rollback_recovery(pb::RollbackRecoveryRequest {
            vpg_id: VPG.into(),
            op_id: op.into(),
        })
        .await
        .map(|_| ())
}

fn assert_volumes_equal(b: &VraProcess, copies: &[PathBuf], what: &str) {
    for (&(vm, vol), copy) in VOLUMES.iter().zip(copies) {
        let (code, out) = qemu_img_compare(copy, &b.uri(&format!("{vm}/{vol}")));
        assert_eq!(code, 0, "{what}: {vm}/{vol}: {out}\n{}", b.log_tail());
    }
}

/// Writes `byte` over `[offset, offset + len)` of a file.
fn pattern_into(path: &Path, offset: u64, len: u64, byte: u8) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open copy");
    f.write_all_at(&vec![byte; len as usize], offset)
        .expect("write copy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_recovery_leaves_journals_and_replicas_as_they_were() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    let copies = protect_with_history(root, &a, &b).await;
    let before = hash_tree(&root.join("ds-b"));
    assert!(before.len() > 3, "journals and replicas: {before:?}");

    let rec = start_recovery(&b, "op-1", 1).await;
    assert_eq!(rec.volumes.len(), 3, "{rec:?}");
    assert_eq!(rec.nbd_address, b.nbd);
    let again = start_recovery(&b, "op-1", 1).await;
    assert_eq!(
        again.volumes.len(),
        3,
        "the same operation: the same answer"
    );
    let other = b
        .client()
        .await
        .expect("control client")
        .start_recovery(pb::StartRecoveryRequest {
            vpg_id: VPG.into(),
            generation: 1,
            checkpoint_id: 1,
            op_id: "op-2".into(),
        })
        .await
        .expect_err("another operation");
    assert_eq!(other.code(), tonic::Code::FailedPrecondition, "{other:?}");
    let s = vpg_status(&b, VPG).await;
    assert_eq!(s.role, pb::VraRole::Recovered as i32, "{s:?}");
    assert_eq!(
        s.recovered_phase,
        pb::RecoveredPhase::BeforeCommit as i32,
        "{s:?}"
    );
    assert_volumes_equal(&b, &copies, "recovered before commit");

    // The recovered VMs write; the protected side goes on writing, refused by b.
    qemu_io(&b.uri("vm-1/0"), &["write -P 0x5a 2M 1M", "flush"]);
    qemu_io(&a.uri("vm-2/0"), &["write -P 0x77 2M 64k"]);
    wait_for("the protected side to stop replicating", || async {
        let s = vpg_status(&a, VPG).await;
        (!s.connected && s.dirty_bytes > 0).then_some(())
    })
    .await;

    // kill -9 of the recovery VRA: the recovery comes back with the flushed write.
    let mut b = b;
    restart_after_kill9(&mut b).await;
    let s = vpg_status(&b, VPG).await;
    assert_eq!(
        s.recovered_phase,
        pb::RecoveredPhase::BeforeCommit as i32,
        "{s:?}"
    );
    let mut expected = std::fs::read(&copies[0]).expect("copy");
    expected[2 * MIB as usize..3 * MIB as usize].fill(0x5a);
    let written = root.join("vm-1-0.written");
    std::fs::write(&written, &expected).expect("expected");
    let (code, out) = qemu_img_compare(&written, &b.uri("vm-1/0"));
    assert_eq!(code, 0, "the flushed write after the restart: {out}");

    rollback(&b, "op-1").await.expect("rollback");
    let s = vpg_status(&b, VPG).await;
    assert_eq!(s.role, pb::VraRole::Recovery as i32, "{s:?}");
    let status = b
        .client()
        .await
        .expect("control client")
        .get_status(pb::GetVraStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(status.exports.is_empty(), "{:?}", status.exports);
    // Only the stream's own state may differ (none of it is in ds-b): every journal and
    // replica file is as it was.
    assert_eq!(hash_tree(&root.join("ds-b")), before, "after the rollback");
    assert!(
        !b.data_dir()
            .join("vpgs")
            .join(VPG)
            .join("recovery")
            .exists(),
        "the overlays are gone"
    );
    // A repeated rollback is fine.
    rollback(&b, "op-1").await.expect("rollback again");

    // Protection resumes (a bitmap sync), and a new checkpoint is right.
    wait_connected(&a, VPG).await;
    let copies2 = copies_of(root, "cp2");
    checkpoint_with_copies(&a, VPG, 2, &copies2).await;
    wait_durable_checkpoint(&b, VPG, 2).await;
    for (&(vm, vol), (_, copy)) in VOLUMES.iter().zip(&copies2) {
        let name = open_pit(&b, VPG, vm, vol, 2).await;
        let (code, out) = qemu_img_compare(copy, &b.uri(&name));
        assert_eq!(code, 0, "{vm}/{vol} at checkpoint 2: {out}");
    }
}

fn copies_of(root: &Path, tag: &str) -> Vec<(PathBuf, PathBuf)> {
    VOLUMES
        .iter()
        .map(|&(vm, vol)| {
            (
                image_path(root, vm, vol),
                root.join(format!("{vm}-{vol}.{tag}")),
            )
        })
        .collect()
}

async fn wait_phase(b: &VraProcess, phase: pb::RecoveredPhase) -> pb::VpgReplicationStatus {
    wait_for("the recovered phase", || async {
        let s = vpg_status(b, VPG).await;
        (s.recovered_phase == phase as i32).then_some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_recovery_merges_the_vms_writes_into_the_replicas() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = start(root, "host-a").await;
    let mut b = start(root, "host-b").await;
    let copies = protect_with_history(root, &a, &b).await;
    start_recovery(&b, "op-1", 1).await;
    // Written before commit, some of it partial blocks and at the end of a volume.
    qemu_io(
        &b.uri("vm-1/0"),
        &["write -P 0x5a 2M 1M", "write -P 0x5b 100 1000", "flush"],
    );
    qemu_io(&b.uri("vm-1/1"), &["write -P 0x5c 2044k 4k", "flush"]);
    pattern_into(&copies[0], 2 * MIB, MIB, 0x5a);
    pattern_into(&copies[0], 100, 1000, 0x5b);
    pattern_into(&copies[1], 2044 * 1024, 4096, 0x5c);

    let mut c = b.client().await.expect("control client");
    let stale = c
        .commit_recovery(pb::CommitRecoveryRequest {
            vpg_id: VPG.into(),
            op_id: "op-1".into(),
            new_generation: 1,
        })
        .await
        .expect_err("the generation must move on");
    assert_eq!(stale.code(), tonic::Code::InvalidArgument, "{stale:?}");
    c.commit_recovery(pb::CommitRecoveryRequest {
        vpg_id: VPG.into(),
        op_id: "op-1".into(),
        new_generation: 2,
    })
    .await
    .expect("commit");
    let late = rollback(&b, "op-1")
        .await
        .expect_err("no rollback after commit");
    assert_eq!(late.code(), tonic::Code::FailedPrecondition, "{late:?}");
    // Written while the commit runs.
    qemu_io(&b.uri("vm-2/0"), &["write -P 0x5d 3M 8k", "flush"]);
    pattern_into(&copies[2], 3 * MIB, 8192, 0x5d);
    let s = wait_phase(&b, pb::RecoveredPhase::Live).await;
    assert_eq!(s.recovered_generation, 2, "{s:?}");
    assert!(s.recovered.iter().all(|v| v.overlay_bytes == 0), "{s:?}");
    assert_volumes_equal(&b, &copies, "live after commit");
    // The replicas themselves hold it, and the journals are gone.
    for (&(vm, vol), copy) in VOLUMES.iter().zip(&copies) {
        let replica = replica_path(root, vm, vol);
        assert_eq!(
            std::fs::read(&replica).expect("replica"),
            std::fs::read(copy).expect("copy"),
            "{vm}/{vol}'s replica"
        );
    }
    assert!(!root.join("ds-b").join("journals").join("vm-1").exists());
    assert!(
        !b.data_dir()
            .join("vpgs")
            .join(VPG)
            .join("recovery")
            .exists()
    );

    // The old protected side is refused, and a restart keeps the recovered VPG live.
    let sa = vpg_status(&a, VPG).await;
    assert!(!sa.connected, "{sa:?}");
    restart_after_kill9(&mut b).await;
    let s = vpg_status(&b, VPG).await;
    assert_eq!(s.recovered_phase, pb::RecoveredPhase::Live as i32, "{s:?}");
    qemu_io(&b.uri("vm-1/0"), &["write -P 0x5e 0 4k", "flush"]);
    pattern_into(&copies[0], 0, 4096, 0x5e);
    assert_volumes_equal(&b, &copies, "live after a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_vra_killed_while_committing_finishes_the_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = start(root, "host-a").await;
    let mut b = start(root, "host-b").await;
    let copies = protect_with_history(root, &a, &b).await;
    start_recovery(&b, "op-9", 1).await;
    qemu_io(&b.uri("vm-1/0"), &["write -P 0x61 1M 6M", "flush"]);
    pattern_into(&copies[0], MIB, 6 * MIB, 0x61);
    b.client()
        .await
        .expect("control client")
        .commit_recovery(pb::CommitRecoveryRequest {
            vpg_id: VPG.into(),
            op_id: "op-9".into(),
            new_generation: 5,
        })
        .await
        .expect("commit");
    // Wherever the commit is (promoting, merging or done), a kill -9 resumes it.
    restart_after_kill9(&mut b).await;
    let s = wait_phase(&b, pb::RecoveredPhase::Live).await;
    assert_eq!(s.recovered_generation, 5, "{s:?}");
    assert_volumes_equal(&b, &copies, "live after a kill while committing");
    drop(a);
}

async fn exports(v: &VraProcess) -> Vec<String> {
    v.client()
        .await
        .expect("control client")
        .get_status(pb::GetVraStatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .exports
}

/// A move powers the protected VMs off: their exports go, replication goes on, and the
/// power state survives kill -9 of the protected VRA; powered on, they are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powered_off_vms_stay_off_across_a_restart_until_powered_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mut a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    assign(root, &a, &b, VPG, 1, &vms(), true).await;
    wait_connected(&a, VPG).await;
    qemu_io(&a.uri("vm-1/0"), &["write -P 0x42 0 64k"]);
    let power = |on: bool| pb::SetVmPowerRequest {
        vpg_id: VPG.into(),
        on,
    };
    a.client()
        .await
        .expect("control client")
        .set_vm_power(power(false))
        .await
        .expect("power off");
    assert!(exports(&a).await.is_empty(), "{:?}", exports(&a).await);
    let s = vpg_status(&a, VPG).await;
    assert!(s.powered_off, "{s:?}");
    // What was written before drains to the recovery side.
    wait_for("the writes to drain", || async {
        let s = vpg_status(&a, VPG).await;
        (s.acked_seq == s.written_seq && is_level(&s)).then_some(())
    })
    .await;
    restart_after_kill9(&mut a).await;
    assert!(exports(&a).await.is_empty(), "still off after a restart");
    assert!(vpg_status(&a, VPG).await.powered_off);
    a.client()
        .await
        .expect("control client")
        .set_vm_power(power(true))
        .await
        .expect("power on");
    assert_eq!(exports(&a).await.len(), 3, "{:?}", exports(&a).await);
    qemu_io(&a.uri("vm-1/0"), &["read -P 0x42 0 64k"]);
    assert!(!vpg_status(&a, VPG).await.powered_off);
    let refused = b
        .client()
        .await
        .expect("control client")
        .set_vm_power(power(false))
        .await
        .expect_err("not the protected role");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
}
