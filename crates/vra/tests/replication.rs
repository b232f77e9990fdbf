//! Process tests of replication between two `tandem-vra` processes with real NBD clients:
//! point-in-time images at checkpoints equal copies of the source taken at the checkpoint
//! (`qemu-img compare`), `fio --verify=crc32c` passes on a replicating volume, a stale
//! sender is refused and writes nothing, and a recovery VRA killed with SIGKILL resumes
//! without losing an acknowledged sequence.

mod common;

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tandem_proto::v1::{self as pb, replicate_request::Msg, replication_client::ReplicationClient};

const MIB: u64 = 1 << 20;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_image_equals_the_source_at_the_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    assign(root, &a, &b, "vpg-1", 1, &vms(), true).await;
    wait_connected(&a, "vpg-1").await;

    qemu_io(
        &a.uri("vm-1/0"),
        &[
            "write -P 0xaa 0 1M",
            "write -P 0xbb 3M 512k",
            "write -z 4M 64k",
        ],
    );
    qemu_io(&a.uri("vm-1/1"), &["write -P 0x11 4k 8k"]);
    qemu_io(&a.uri("vm-2/0"), &["write -P 0x22 1M 1M"]);

    let copies: Vec<(PathBuf, PathBuf)> = [("vm-1", 0), ("vm-1", 1), ("vm-2", 0)]
        .iter()
        .map(|&(vm, vol)| {
            (
                image_path(root, vm, vol),
                root.join(format!("{vm}-{vol}.cp1")),
            )
        })
        .collect();
    checkpoint_with_copies(&a, "vpg-1", 1, &copies).await;

    // Later writes must not show in the image at checkpoint 1.
    qemu_io(&a.uri("vm-1/0"), &["write -P 0xcc 0 512k"]);
    qemu_io(&a.uri("vm-2/0"), &["write -P 0xdd 0 4k"]);

    wait_durable_checkpoint(&b, "vpg-1", 1).await;
    for &(vm, vol) in &[("vm-1", 0u32), ("vm-1", 1), ("vm-2", 0)] {
        let name = open_pit(&b, "vpg-1", vm, vol, 1).await;
        let copy = root.join(format!("{vm}-{vol}.cp1"));
        let (code, out) = qemu_img_compare(&copy, &b.uri(&name));
        assert_eq!(
            code, 0,
            "{vm}/{vol} at checkpoint 1 differs from the source copy: {out}"
        );
    }
    let name = open_pit(&b, "vpg-1", "vm-1", 0, 1).await;
    let (code, out) = qemu_img_compare(&image_path(root, "vm-1", 0), &b.uri(&name));
    assert_eq!(code, 1, "the later write must not be in the image: {out}");

    // A second checkpoint carries the later writes.
    let copies2: Vec<(PathBuf, PathBuf)> = [("vm-1", 0), ("vm-2", 0)]
        .iter()
        .map(|&(vm, vol)| {
            (
                image_path(root, vm, vol),
                root.join(format!("{vm}-{vol}.cp2")),
            )
        })
        .collect();
    checkpoint_with_copies(&a, "vpg-1", 2, &copies2).await;
    wait_durable_checkpoint(&b, "vpg-1", 2).await;
    for (_, copy) in &copies2 {
        let stem = copy
            .file_stem()
            .expect("stem")
            .to_str()
            .expect("utf8")
            .to_string();
        let (vm, vol) = stem.rsplit_once('-').expect("vm-vol");
        let name = open_pit(&b, "vpg-1", vm, vol.parse().expect("vol"), 2).await;
        let (code, out) = qemu_img_compare(copy, &b.uri(&name));
        assert_eq!(code, 0, "{stem} at checkpoint 2: {out}");
    }

    // Status shows the stream, compression and the last durable checkpoint.
    let sa = vpg_status(&a, "vpg-1").await;
    assert!(
        sa.wan_bytes_sent < sa.wan_bytes_raw,
        "patterns compress: {sa:?}"
    );
    let sb = vpg_status(&b, "vpg-1").await;
    assert_eq!(sb.last_durable_checkpoint_id, 2, "{sb:?}");
    // Per journal: both VMs hold checkpoints 1 (oldest) to 2 (newest).
    assert_eq!(sb.journals.len(), 2, "{sb:?}");
    for j in &sb.journals {
        assert_eq!(
            (j.oldest_checkpoint_id, j.last_durable_checkpoint_id),
            (1, 2),
            "{j:?}"
        );
        assert!(j.size_bytes > 0 && j.durable_seq > 0, "{j:?}");
    }

    // Closing an export removes it.
    let mut cb = b.client().await.expect("control client");
    cb.close_export(pb::CloseExportRequest {
        export_name: name.clone(),
    })
    .await
    .expect("close");
    let exports = cb
        .get_status(pb::GetVraStatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .exports;
    assert!(!exports.contains(&name), "{exports:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verify_passes_on_a_replicating_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    let vms = vec![TestVm {
        id: "vm-1".into(),
        sizes: vec![16 * MIB],
    }];
    assign(root, &a, &b, "vpg-f", 1, &vms, false).await;
    wait_connected(&a, "vpg-f").await;
    let uri = a.uri("vm-1/0");
    let (code, out) = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--time_based=0",
            "--output-format=terse",
        ],
    );
    assert_eq!(code, 0, "fio failed: {out}");
    // What fio wrote is replicated: the image at a checkpoint equals the source.
    let copy = root.join("fio.cp1");
    checkpoint_with_copies(
        &a,
        "vpg-f",
        1,
        &[(image_path(root, "vm-1", 0), copy.clone())],
    )
    .await;
    wait_durable_checkpoint(&b, "vpg-f", 1).await;
    let name = open_pit(&b, "vpg-f", "vm-1", 0, 1).await;
    let (code, out) = qemu_img_compare(&copy, &b.uri(&name));
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_datastore_is_refused_and_a_stale_sender_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let b = start(root, "host-b").await;
    let journal_dir = root.join("ds-b").join("journals").join("vm-1");
    let assignment = |datastore: &std::path::Path| pb::AssignRecoveryRequest {
        vpg_id: "vpg-s".into(),
        generation: 5,
        vms: vec![pb::RecoveryVm {
            vm_id: "vm-1".into(),
            volumes: vec![pb::VraVolume {
                volume_id: 0,
                size_bytes: MIB,
                path: root
                    .join("ds-b")
                    .join("vm-1-0.replica")
                    .display()
                    .to_string(),
                preseeded: false,
            }],
            journal_dir: journal_dir.display().to_string(),
            datastore_path: datastore.display().to_string(),
        }],
        ..Default::default()
    };
    // A recovery datastore that is not on the host (not mounted) is not created: NOT_FOUND.
    let refused = b
        .client()
        .await
        .expect("control client")
        .assign_recovery(assignment(&root.join("ds-b")))
        .await
        .expect_err("a missing datastore is refused");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert!(refused.message().contains("ds-b"), "{refused:?}");
    assert!(!root.join("ds-b").exists(), "the datastore was created");
    std::fs::create_dir_all(root.join("ds-b")).expect("mount ds-b");
    b.client()
        .await
        .expect("control client")
        .assign_recovery(assignment(&root.join("ds-b")))
        .await
        .expect("assign");
    let mut client = ReplicationClient::connect(format!("http://{}", b.control))
        .await
        .expect("connect");
    let write = pb::ReplicateRequest {
        msg: Some(Msg::Batch(pb::ReplicateBatch {
            entries: vec![pb::ReplicateEntry {
                seq: 1,
                body: Some(pb::replicate_entry::Body::Write(pb::ReplicatedWrite {
                    vm_id: "vm-1".into(),
                    volume_id: 0,
                    offset: 0,
                    data: vec![0xee; 4096].into(),
                    raw_len: 0,
                })),
            }],
        })),
    };
    for generation in [4u64, 1] {
        let hello = pb::ReplicateRequest {
            msg: Some(Msg::Hello(pb::ReplicateHello {
                vpg_id: "vpg-s".into(),
                generation,
                sender_id: "old-host".into(),
                resume_from: 1,
            })),
        };
        let err = client
            .replicate(futures::stream::iter(vec![hello, write.clone()]))
            .await
            .expect_err("stale sender must be refused");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(err.message().contains("stale generation"), "{err}");
    }
    let s = vpg_status(&b, "vpg-s").await;
    assert_eq!((s.writes, s.durable_seq, s.acked_seq), (0, 0, 0), "{s:?}");
    let segments = std::fs::read_dir(&journal_dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(segments, 0, "nothing may reach the journal");
    let replica = std::fs::read(root.join("ds-b").join("vm-1-0.replica")).expect("replica");
    assert!(
        replica.iter().all(|&b| b == 0),
        "nothing may reach the replica"
    );
    // The current generation is accepted on the same service.
    let hello = pb::ReplicateRequest {
        msg: Some(Msg::Hello(pb::ReplicateHello {
            vpg_id: "vpg-s".into(),
            generation: 5,
            sender_id: "new-host".into(),
            resume_from: 1,
        })),
    };
    let mut acks = client
        .replicate(futures::stream::iter(vec![hello, write]).chain(futures::stream::pending()))
        .await
        .expect("current generation accepted")
        .into_inner();
    assert_eq!(
        acks.message()
            .await
            .expect("ack")
            .expect("first ack")
            .durable_seq,
        0
    );
    let ack = acks.message().await.expect("ack").expect("second ack");
    assert_eq!(ack.durable_seq, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_vra_killed_mid_stream_resumes_without_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = start(root, "host-a").await;
    let mut b = start(root, "host-b").await;
    let vms = vec![
        TestVm {
            id: "vm-1".into(),
            sizes: vec![16 * MIB],
        },
        TestVm {
            id: "vm-2".into(),
            sizes: vec![16 * MIB],
        },
    ];
    assign(root, &a, &b, "vpg-k", 1, &vms, true).await;
    wait_connected(&a, "vpg-k").await;

    // Writers over NBD on both VMs, running across the kill.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut writers = tokio::task::JoinSet::new();
    for (i, vm) in ["vm-1", "vm-2"].into_iter().enumerate() {
        let addr = a.nbd.clone();
        let stop = stop.clone();
        writers.spawn(async move {
            let client = Arc::new(
                tandem_nbd::NbdClient::connect(addr.as_str(), &format!("{vm}/0"))
                    .await
                    .expect("nbd connect"),
            );
            let mut rng = StdRng::seed_from_u64(i as u64 + 7);
            let mut n = 0u64;
            while !stop.is_cancelled() {
                let blocks = rng.gen_range(1..=16u64);
                let off = rng.gen_range(0..(16 * MIB / 4096 - blocks)) * 4096;
                let mut data = vec![0u8; (blocks * 4096) as usize];
                rng.fill(&mut data[..]);
                client
                    .write(off, Bytes::from(data), false)
                    .await
                    .expect("write");
                n += 1;
            }
            n
        });
    }
    // Let some of the stream become durable, then kill the receiver mid-stream.
    let before = wait_for("acknowledged progress", || async {
        let s = vpg_status(&a, "vpg-k").await;
        (s.acked_seq > 200).then_some(s.acked_seq)
    })
    .await;
    b.kill9().await.expect("kill -9");
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.start().await.expect("restart");
    // The restarted receiver reports every acknowledged sequence as durable.
    let after = vpg_status(&b, "vpg-k").await;
    assert!(
        after.durable_seq >= before,
        "acknowledged {before} before the kill, durable {} after restart",
        after.durable_seq
    );
    // The stream resumes where the receiver is, without needing a sync.
    wait_for("the stream to resume", || async {
        let s = vpg_status(&a, "vpg-k").await;
        (s.connected && s.acked_seq > before + 100).then_some(())
    })
    .await;
    stop.cancel();
    let mut total = 0;
    while let Some(n) = writers.join_next().await {
        total += n.expect("writer");
    }
    assert!(total > 0);
    let s = vpg_status(&a, "vpg-k").await;
    assert_ne!(
        s.state,
        pb::VpgStreamState::NeedsSync as i32,
        "{s:?}\n{}",
        a.log_tail()
    );
    assert!(s.reconnects >= 1, "{s:?}");

    // A later checkpoint image is still correct.
    let copies: Vec<(PathBuf, PathBuf)> = ["vm-1", "vm-2"]
        .iter()
        .map(|vm| (image_path(root, vm, 0), root.join(format!("{vm}.cp1"))))
        .collect();
    checkpoint_with_copies(&a, "vpg-k", 1, &copies).await;
    wait_durable_checkpoint(&b, "vpg-k", 1).await;
    for vm in ["vm-1", "vm-2"] {
        let name = open_pit(&b, "vpg-k", vm, 0, 1).await;
        let (code, out) = qemu_img_compare(&root.join(format!("{vm}.cp1")), &b.uri(&name));
        assert_eq!(code, 0, "{vm}: {out}\n{}", b.log_tail());
    }
    // A clean shutdown on SIGTERM.
    assert!(
        b.terminate().await.expect("terminate").success(),
        "{}",
        b.log_tail()
    );
}
