//! Model test: random batches of pipelined requests from the client, through the server,
//! to a `FileDevice` and to a `MemDevice`, checked against a `Vec<u8>` model of the
//! volume after every batch (reads) and at the end (the whole image, and the file itself).

mod common;

use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;
use proptest::prelude::*;
use tandem_nbd::{
    BlockDevice, ErrorCode, Exports, FileDevice, MemDevice, NbdClient, create_sparse_file,
};

const SIZE: u64 = 256 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        len: u32,
        seed: u8,
        fua: bool,
    },
    Read {
        offset: u64,
        len: u32,
    },
    Trim {
        offset: u64,
        len: u32,
    },
    Zero {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    /// A write that reaches past the end: refused, nothing changes.
    WriteOutOfRange {
        offset: u64,
        len: u32,
    },
}

impl Op {
    /// The byte range the op touches, and whether it changes data.
    fn span(&self) -> Option<(u64, u64, bool)> {
        match *self {
            Op::Write { offset, len, .. }
            | Op::Trim { offset, len }
            | Op::Zero { offset, len, .. } => Some((offset, offset + u64::from(len), true)),
            Op::Read { offset, len } => Some((offset, offset + u64::from(len), false)),
            Op::Flush | Op::WriteOutOfRange { .. } => None,
        }
    }
}

fn in_range() -> impl Strategy<Value = (u64, u32)> {
    // Mostly small requests; some large enough for the server's direct payload path.
    let len = prop_oneof![4 => 1u32..=16384, 1 => 16385u32..=(SIZE as u32)];
    (0..SIZE, len).prop_map(|(offset, len)| {
        let len = u64::from(len).min(SIZE - offset) as u32;
        (offset, len.max(1))
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (in_range(), any::<u8>(), any::<bool>())
            .prop_map(|((offset, len), seed, fua)| Op::Write { offset, len, seed, fua }),
        4 => in_range().prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => in_range().prop_map(|(offset, len)| Op::Trim { offset, len }),
        1 => (in_range(), any::<bool>()).prop_map(|((offset, len), fua)| Op::Zero { offset, len, fua }),
        1 => Just(Op::Flush),
        1 => (0u64..4096, 1u32..8192).prop_map(|(back, len)| Op::WriteOutOfRange {
            // Ends `len - back` bytes past the end.
            offset: SIZE - back.min(u64::from(len) - 1),
            len,
        }),
    ]
}

fn pattern(seed: u8, len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

/// Drops ops that conflict with earlier ones of the same batch, so that running the batch
/// concurrently has one possible outcome.
fn conflict_free(batch: Vec<Op>) -> Vec<Op> {
    let mut kept: Vec<Op> = Vec::new();
    for op in batch {
        let conflicts = op.span().is_some_and(|(start, end, writes)| {
            kept.iter().any(|other| {
                other
                    .span()
                    .is_some_and(|(s, e, w)| (writes || w) && start < e && s < end)
            })
        });
        if !conflicts {
            kept.push(op);
        }
    }
    kept
}

/// Counts of reads, writes and refused writes done.
async fn run_batches(
    client: &NbdClient,
    model: &mut [u8],
    batches: Vec<Vec<Op>>,
) -> (u64, u64, u64) {
    let (mut reads, mut writes, mut refused) = (0, 0, 0);
    for batch in batches {
        let batch = conflict_free(batch);
        let results = join_all(batch.iter().map(|op| async move {
            match *op {
                Op::Write {
                    offset,
                    len,
                    seed,
                    fua,
                } => client
                    .write(offset, Bytes::from(pattern(seed, len)), fua)
                    .await
                    .map(|()| None),
                Op::Read { offset, len } => client.read(offset, len).await.map(Some),
                Op::Trim { offset, len } => client.trim(offset, len).await.map(|()| None),
                Op::Zero { offset, len, fua } => {
                    client.write_zeroes(offset, len, fua).await.map(|()| None)
                }
                Op::Flush => client.flush().await.map(|()| None),
                Op::WriteOutOfRange { offset, len } => client
                    .write(offset, Bytes::from(vec![0xee; len as usize]), false)
                    .await
                    .map(|()| None),
            }
        }))
        .await;
        for (op, result) in batch.iter().zip(results) {
            match *op {
                Op::Write {
                    offset, len, seed, ..
                } => {
                    result.unwrap();
                    writes += 1;
                    let range = offset as usize..(offset + u64::from(len)) as usize;
                    model[range].copy_from_slice(&pattern(seed, len));
                }
                Op::Read { offset, len } => {
                    reads += 1;
                    let data = result.unwrap().unwrap();
                    let range = offset as usize..(offset + u64::from(len)) as usize;
                    assert_eq!(&data[..], &model[range], "read {offset}+{len}");
                }
                Op::Trim { offset, len } | Op::Zero { offset, len, .. } => {
                    result.unwrap();
                    model[offset as usize..(offset + u64::from(len)) as usize].fill(0);
                }
                Op::Flush => {
                    result.unwrap();
                }
                Op::WriteOutOfRange { offset, len } => {
                    let err = result.unwrap_err();
                    assert_eq!(
                        err.remote_error(),
                        Some(ErrorCode::EINVAL),
                        "{offset}+{len}"
                    );
                    refused += 1;
                }
            }
        }
    }
    (reads, writes, refused)
}

async fn check_model(
    device: Arc<dyn BlockDevice>,
    initial: Vec<u8>,
    batches: Vec<Vec<Op>>,
) -> Vec<u8> {
    let exports = Exports::new();
    exports.insert("disk", device).unwrap();
    let server = common::TestServer::start(exports).await;
    let client = NbdClient::connect(server.addr, "disk").await.unwrap();
    let mut model = initial;
    let (reads, writes, refused) = run_batches(&client, &mut model, batches).await;
    // The whole image, read back in pipelined chunks.
    let chunks = join_all(
        (0..SIZE)
            .step_by(65536)
            .map(|offset| client.read(offset, 65536)),
    )
    .await;
    let image: Vec<u8> = chunks
        .into_iter()
        .flat_map(|c| c.unwrap().to_vec())
        .collect();
    assert_eq!(image, model);
    let stats = server.exports.stats("disk").unwrap();
    assert_eq!(stats.reads, reads + SIZE / 65536);
    assert_eq!(stats.writes, writes + refused);
    assert_eq!(stats.errors, refused);
    client.disconnect().await.unwrap();
    server.stop().await;
    model
}

fn batches() -> impl Strategy<Value = Vec<Vec<Op>>> {
    proptest::collection::vec(proptest::collection::vec(op(), 1..12), 1..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn file_device_through_the_server_matches_the_model(batches in batches(), seed in any::<u64>()) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let initial = if seed % 2 == 0 {
            create_sparse_file(&path, SIZE).unwrap();
            vec![0; SIZE as usize]
        } else {
            let written = common::random_image(dir.path(), "disk.raw", SIZE as usize, seed);
            std::fs::read(written).unwrap()
        };
        let device = Arc::new(FileDevice::open(&path).unwrap());
        let model = runtime.block_on(check_model(device, initial, batches));
        prop_assert_eq!(std::fs::read(&path).unwrap(), model);
    }

    #[test]
    fn mem_device_through_the_server_matches_the_model(batches in batches(), seed in any::<u64>()) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let initial = common::random_bytes(SIZE as usize, seed);
        let device = Arc::new(MemDevice::from_vec(initial.clone()));
        let model = runtime.block_on(check_model(Arc::clone(&device) as Arc<dyn BlockDevice>, initial, batches));
        prop_assert_eq!(device.contents(), model);
    }
}
