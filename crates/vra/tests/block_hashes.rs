//! Process tests of `Replication.BlockHashes` on a recovery `tandem-vra`: the hashes are
//! those of the newest durable image (replica plus every durable journal record, also
//! after the last checkpoint) and equal hashes computed locally from the source volume;
//! bad requests get field-level INVALID_ARGUMENT, unknown names NOT_FOUND and a wrong
//! generation FAILED_PRECONDITION, and the VRA keeps serving; hashing 1 GiB does not hold
//! up the acknowledgements of the replication stream.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use tandem_proto::v1::{self as pb, replicate_request::Msg, replication_client::ReplicationClient};
use tandem_vra::hashes::{HASH_LEN, block_hash, hash_blocks};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming, transport::Channel};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A volume whose size is not a multiple of 4 KiB, so its last block is short.
const ODD: u64 = 6 * MIB + 4 * KIB + 512;

async fn replication(v: &VraProcess) -> ReplicationClient<Channel> {
    ReplicationClient::connect(format!("http://{}", v.control))
        .await
        .expect("connect replication")
}

fn request(
    vpg: &str,
    vm: &str,
    volume: u32,
    offset: u64,
    length: u64,
    block: u32,
) -> pb::BlockHashesRequest {
    pb::BlockHashesRequest {
        vpg_id: vpg.into(),
        generation: 1,
        vm_id: vm.into(),
        volume_id: volume,
        offset,
        length,
        block_size: block,
    }
}

/// Hashes of a whole volume on `b`, asked for in requests of at most 4096 blocks and
/// 1 GiB; returns them and the smallest durable position reported.
async fn remote_hashes(
    b: &VraProcess,
    vpg: &str,
    vm: &str,
    volume: u32,
    size: u64,
    block: u32,
) -> (Vec<u8>, u64) {
    let mut client = replication(b).await;
    let per_request = (4096 * u64::from(block)).min(GIB);
    let mut out = Vec::new();
    let mut durable = u64::MAX;
    let mut offset = 0;
    while offset < size {
        let len = per_request.min(size - offset);
        let r = client
            .block_hashes(request(vpg, vm, volume, offset, len, block))
            .await
            .unwrap_or_else(|e| panic!("hashes of {vm}/{volume} at {offset}+{len}: {e}"))
            .into_inner();
        assert_eq!(
            r.hashes.len() as u64,
            len.div_ceil(u64::from(block)) * HASH_LEN as u64,
            "one hash per block"
        );
        out.extend_from_slice(&r.hashes);
        durable = durable.min(r.durable_seq);
        offset += len;
    }
    (out, durable)
}

/// Hashes of a file computed here: first 16 bytes of BLAKE3 per block (independently of
/// the VRA's module), and the same through [`hash_blocks`].
fn local_hashes(path: &Path, block: u32) -> Vec<u8> {
    let data = std::fs::read(path).expect("read source image");
    let mut independent = Vec::new();
    for chunk in data.chunks(block as usize) {
        independent.extend_from_slice(&blake3::hash(chunk).as_bytes()[..16]);
    }
    let mut shared = Vec::new();
    hash_blocks(&data, block as usize, &mut shared);
    assert!(independent == shared, "hash_blocks is not truncated BLAKE3");
    independent
}

/// Waits until everything the protected VRA has written is acknowledged; returns that
/// sequence.
async fn wait_all_acked(a: &VraProcess, vpg: &str) -> u64 {
    let written = vpg_status(a, vpg).await.written_seq;
    wait_for("every write to be acknowledged", || async {
        let s = vpg_status(a, vpg).await;
        (s.acked_seq >= written).then_some(())
    })
    .await;
    written
}

fn assert_refused<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needle: &str,
) {
    let e = r.expect_err("request must be refused");
    assert_eq!(e.code(), code, "{e}");
    assert!(e.message().contains(needle), "{needle:?} not in {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_of_the_newest_durable_image_equal_the_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    let vms = vec![
        TestVm {
            id: "vm-1".into(),
            sizes: vec![ODD, 2 * MIB],
        },
        TestVm {
            id: "vm-2".into(),
            sizes: vec![4 * MIB],
        },
    ];
    assign(root, &a, &b, "vpg-h", 1, &vms, true).await;
    wait_connected(&a, "vpg-h").await;

    qemu_io(
        &a.uri("vm-1/0"),
        &[
            "write -P 0xaa 0 1M",
            "write -P 0xbb 3M 512k",
            "write -z 3M 64k",
            // The short last block.
            &format!("write -P 0x5c {} 4608", ODD - 4608),
        ],
    );
    qemu_io(&a.uri("vm-2/0"), &["write -P 0x22 1M 1M"]);
    let copies = [(image_path(root, "vm-1", 0), root.join("vm-1-0.cp1"))];
    checkpoint_with_copies(&a, "vpg-h", 1, &copies).await;
    // After the last checkpoint: in the newest durable image, not in checkpoint 1.
    qemu_io(
        &a.uri("vm-1/0"),
        &["write -P 0xcc 512k 4k", "write -P 0xdd 5M 72k"],
    );
    qemu_io(&a.uri("vm-1/1"), &["write -P 0x11 4k 8k"]);
    let written = wait_all_acked(&a, "vpg-h").await;
    wait_durable_checkpoint(&b, "vpg-h", 1).await;

    for (vm, vol, size) in [
        ("vm-1", 0u32, ODD),
        ("vm-1", 1, 2 * MIB),
        ("vm-2", 0, 4 * MIB),
    ] {
        let source = image_path(root, vm, vol);
        for block in [4 * KIB as u32, 64 * KIB as u32, MIB as u32, 16 * MIB as u32] {
            let (remote, durable) = remote_hashes(&b, "vpg-h", vm, vol, size, block).await;
            assert!(
                remote == local_hashes(&source, block),
                "{vm}/{vol} in blocks of {block} differs from the source\n{}",
                b.log_tail()
            );
            assert!(
                durable >= written,
                "durable_seq {durable} < written {written}"
            );
        }
    }
    // The checkpoint copy differs where the later writes went.
    let (remote, _) = remote_hashes(&b, "vpg-h", "vm-1", 0, ODD, 64 * KIB as u32).await;
    assert!(remote != local_hashes(&root.join("vm-1-0.cp1"), 64 * KIB as u32));

    let mut c = replication(&b).await;
    // A range inside the volume, and one ending on the short last block.
    let data = std::fs::read(image_path(root, "vm-1", 0)).expect("source");
    for (offset, len, block) in [
        (MIB, 3 * 64 * KIB, 64 * KIB),
        (5 * MIB, 8 * KIB, 4 * KIB),
        (6 * MIB, 4 * KIB + 512, 4 * KIB),
        (4 * MIB, ODD - 4 * MIB, MIB),
    ] {
        let r = c
            .block_hashes(request("vpg-h", "vm-1", 0, offset, len, block as u32))
            .await
            .expect("hashes")
            .into_inner();
        let mut want = Vec::new();
        hash_blocks(
            &data[offset as usize..(offset + len) as usize],
            block as usize,
            &mut want,
        );
        assert!(
            r.hashes == want,
            "range {offset}+{len} in blocks of {block}"
        );
    }

    // Bad requests: the right code, a field-level message.
    let good = request("vpg-h", "vm-1", 0, 0, MIB, 64 * KIB as u32);
    let bad = |f: fn(&mut pb::BlockHashesRequest)| {
        let mut r = good.clone();
        f(&mut r);
        r
    };
    for (req, code, needle) in [
        (
            bad(|r| r.block_size = 3000),
            Code::InvalidArgument,
            "block_size",
        ),
        (
            bad(|r| r.block_size = 2048),
            Code::InvalidArgument,
            "block_size",
        ),
        (
            bad(|r| r.block_size = 32 << 20),
            Code::InvalidArgument,
            "block_size",
        ),
        (bad(|r| r.offset = 4096), Code::InvalidArgument, "offset"),
        (bad(|r| r.length = 0), Code::InvalidArgument, "length"),
        (
            bad(|r| {
                r.block_size = 4096;
                r.length = 4097 * 4096;
            }),
            Code::InvalidArgument,
            "length",
        ),
        (
            bad(|r| {
                r.volume_id = 1;
                r.offset = MIB;
                r.length = 2 * MIB;
            }),
            Code::InvalidArgument,
            "past the end",
        ),
        (
            bad(|r| r.offset = 7 * MIB),
            Code::InvalidArgument,
            "not inside the volume",
        ),
        (
            bad(|r| r.length = MIB + 512),
            Code::InvalidArgument,
            "multiple of block_size",
        ),
        (bad(|r| r.vm_id = "vm-9".into()), Code::NotFound, "vm-9"),
        (bad(|r| r.volume_id = 7), Code::NotFound, "volume"),
        (bad(|r| r.vpg_id = "vpg-x".into()), Code::NotFound, "vpg-x"),
        (
            bad(|r| r.generation = 2),
            Code::FailedPrecondition,
            "generation",
        ),
        (
            bad(|r| r.generation = 0),
            Code::FailedPrecondition,
            "stale generation",
        ),
    ] {
        assert_refused(c.block_hashes(req).await, code, needle);
    }
    // The protected VRA has no recovery image to hash.
    assert_refused(
        replication(&a).await.block_hashes(good.clone()).await,
        Code::FailedPrecondition,
        "protected",
    );

    // Compare: the source's coarse hashes with one coarse block changed (the last, short
    // one too) are answered with exactly those blocks and their fine hashes.
    let source = std::fs::read(image_path(root, "vm-2", 0)).expect("source");
    let mut mine = Vec::new();
    hash_blocks(&source, 64 * KIB as usize, &mut mine);
    mine[5 * HASH_LEN] ^= 1;
    mine[63 * HASH_LEN + 3] ^= 1;
    let compare = |coarse_hashes: Vec<u8>| pb::CompareBlocksRequest {
        vpg_id: "vpg-h".into(),
        generation: 1,
        vm_id: "vm-2".into(),
        volume_id: 0,
        offset: 0,
        length: 4 * MIB,
        coarse_block_size: 64 * KIB as u32,
        fine_block_size: 4 * KIB as u32,
        coarse_hashes,
    };
    let r = c
        .compare_blocks(compare(mine.clone()))
        .await
        .expect("compare")
        .into_inner();
    assert_eq!(r.differing, [5, 63]);
    let mut fine = Vec::new();
    hash_blocks(
        &source[5 * 64 * KIB as usize..6 * 64 * KIB as usize],
        4096,
        &mut fine,
    );
    hash_blocks(&source[63 * 64 * KIB as usize..], 4096, &mut fine);
    assert!(r.fine_hashes == fine, "fine hashes of the differing blocks");
    // Malformed compares are refused with their field named.
    let mut short = compare(mine[HASH_LEN..].to_vec());
    assert_refused(
        c.compare_blocks(short.clone()).await,
        Code::InvalidArgument,
        "coarse_hashes",
    );
    short.coarse_hashes = mine.clone();
    short.fine_block_size = 64 * KIB as u32;
    assert_refused(
        c.compare_blocks(short.clone()).await,
        Code::InvalidArgument,
        "fine_block_size",
    );
    short.fine_block_size = 4096;
    short.generation = 0;
    assert_refused(
        c.compare_blocks(short).await,
        Code::FailedPrecondition,
        "stale generation",
    );

    // The VRA keeps serving: hashes, and the stream.
    c.block_hashes(good)
        .await
        .expect("a good request after bad ones");
    qemu_io(&a.uri("vm-2/0"), &["write -P 0x33 0 64k"]);
    wait_all_acked(&a, "vpg-h").await;
    let (remote, _) = remote_hashes(&b, "vpg-h", "vm-2", 0, 4 * MIB, 64 * KIB as u32).await;
    assert!(remote == local_hashes(&image_path(root, "vm-2", 0), 64 * KIB as u32));
}

/// Waits for an acknowledgement of at least `want`.
async fn ack(acks: &mut Streaming<pb::ReplicateAck>, want: u64) {
    loop {
        let a = acks.message().await.expect("ack").expect("ack stream open");
        if a.durable_seq >= want {
            return;
        }
    }
}

/// A sender driven by hand: writes `len` bytes of `byte` at `offset` with sequence `seq`.
fn write_entry(seq: u64, offset: u64, byte: u8, len: usize) -> pb::ReplicateRequest {
    pb::ReplicateRequest {
        msg: Some(Msg::Batch(pb::ReplicateBatch {
            entries: vec![pb::ReplicateEntry {
                seq,
                body: Some(pb::replicate_entry::Body::Write(pb::ReplicatedWrite {
                    vm_id: "vm-1".into(),
                    volume_id: 0,
                    offset,
                    data: vec![byte; len].into(),
                    raw_len: 0,
                })),
            }],
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_a_gib_does_not_hold_up_the_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let b = start(root, "host-b").await;
    b.client()
        .await
        .expect("control client")
        .assign_recovery(pb::AssignRecoveryRequest {
            vpg_id: "vpg-g".into(),
            generation: 1,
            vms: vec![pb::RecoveryVm {
                vm_id: "vm-1".into(),
                volumes: vec![pb::VraVolume {
                    volume_id: 0,
                    size_bytes: GIB,
                    path: root.join("ds-b/vm-1-0.replica").display().to_string(),
                    preseeded: false,
                }],
                journal_dir: root.join("ds-b/journals/vm-1").display().to_string(),
                datastore_path: String::new(),
            }],
            ..Default::default()
        })
        .await
        .expect("assign recovery");
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::ReplicateRequest {
        msg: Some(Msg::Hello(pb::ReplicateHello {
            vpg_id: "vpg-g".into(),
            generation: 1,
            sender_id: "test".into(),
            resume_from: 1,
        })),
    })
    .await
    .expect("hello");
    let mut acks = replication(&b)
        .await
        .replicate(ReceiverStream::new(rx))
        .await
        .expect("stream accepted")
        .into_inner();
    ack(&mut acks, 0).await;
    // Every write lands on the first MiB with the same bytes, so the image the hashes are
    // of is the same whichever of them it holds.
    tx.send(write_entry(1, 0, 0x7e, MIB as usize))
        .await
        .expect("send");
    ack(&mut acks, 1).await;

    let hashing = tokio::spawn({
        let b_control = b.control.clone();
        async move {
            let started = Instant::now();
            let mut c = ReplicationClient::connect(format!("http://{b_control}"))
                .await
                .expect("connect");
            let r = c
                .block_hashes(request("vpg-g", "vm-1", 0, 0, GIB, MIB as u32))
                .await;
            (r, started.elapsed())
        }
    });
    let mut seq = 1;
    let mut acked_while_hashing = 0;
    let mut worst = Duration::ZERO;
    while !hashing.is_finished() {
        seq += 1;
        let sent = Instant::now();
        tx.send(write_entry(seq, 0, 0x7e, 64 * KIB as usize))
            .await
            .expect("send");
        tokio::time::timeout(PATIENCE, ack(&mut acks, seq))
            .await
            .expect("ack while hashing");
        worst = worst.max(sent.elapsed());
        if !hashing.is_finished() {
            acked_while_hashing += 1;
        }
    }
    let (r, took) = hashing.await.expect("hashing task");
    let r = r.expect("hashes of 1 GiB").into_inner();
    eprintln!(
        "hashing 1 GiB took {took:?}; {acked_while_hashing} writes acknowledged meanwhile, \
         slowest ack {worst:?}"
    );
    let mut want = block_hash(&vec![0x7e; MIB as usize]).to_vec();
    let zero = block_hash(&vec![0; MIB as usize]);
    for _ in 1..1024 {
        want.extend_from_slice(&zero);
    }
    assert!(r.hashes == want, "hashes of the 1 GiB image");
    assert!(
        r.durable_seq >= 1 && r.durable_seq <= seq,
        "{}",
        r.durable_seq
    );
    if took > Duration::from_millis(500) {
        assert!(
            acked_while_hashing > 0,
            "no write was acknowledged during {took:?} of hashing"
        );
    }
}
