//! Entry points of the replication fuzz targets in `fuzz/` (built with the `fuzzing`
//! feature), also replayed over the checked-in corpus by `tests/tests/fuzz_corpus.rs`: the
//! protobuf messages one VRA sends another, decoded with prost as tonic does and then
//! validated and applied by the same pure code the services use. Any panic, and any entry
//! or answer let through that the code after the checks could not use, is a bug.
//!
//! Each input is a selector byte, then the message's bytes; a stream is a sequence of
//! length-delimited messages.

use prost::Message;
use tandem_journal::{Generation, Seq};
use tandem_proto::v1 as pb;

use crate::{
    fence::StreamFence,
    hashes::{self, HASH_LEN},
    model::{self, EntryBody, MAX_ENTRY_DATA},
    window::SendWindow,
};

/// What the recovery VRA decodes from a protected VRA: a replication stream (selector
/// 0), a block hashes request (1) or a compare request (2).
pub fn replication_receiver(data: &[u8]) {
    let Some((&selector, message)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => receive_stream(message),
        1 => {
            let Ok(r) = pb::BlockHashesRequest::decode(message) else {
                return;
            };
            if model::parse_vpg(&r.vpg_id).is_err() || model::parse_vm(&r.vm_id).is_err() {
                return;
            }
            for volume_size in volume_sizes(r.offset) {
                if let Ok(blocks) =
                    hashes::check_request(r.offset, r.length, r.block_size, volume_size)
                {
                    let expected = r.length.div_ceil(u64::from(r.block_size));
                    assert_eq!(blocks as u64, expected, "block count of {r:?}");
                    assert!(blocks as u64 <= hashes::MAX_BLOCKS);
                }
            }
        }
        _ => {
            let Ok(r) = pb::CompareBlocksRequest::decode(message) else {
                return;
            };
            if model::parse_vpg(&r.vpg_id).is_err() || model::parse_vm(&r.vm_id).is_err() {
                return;
            }
            for volume_size in volume_sizes(r.offset) {
                let checked = hashes::check_compare(
                    r.offset,
                    r.length,
                    r.coarse_block_size,
                    r.fine_block_size,
                    r.coarse_hashes.len(),
                    volume_size,
                );
                // What the receiver does with a request the checks let through, over an
                // image of zeroes (only for ranges small enough to allocate here).
                if checked.is_ok() && r.length <= 1 << 20 {
                    let image = vec![0u8; r.length as usize];
                    let mut differences = hashes::Differences::default();
                    differences.add(
                        &image,
                        0,
                        r.coarse_block_size as usize,
                        r.fine_block_size as usize,
                        &r.coarse_hashes,
                    );
                }
            }
        }
    }
}

/// Volume sizes to check a range against: one the range may end in, and a large one.
fn volume_sizes(offset: u64) -> [u64; 2] {
    [offset.saturating_add(1 << 20), model::MAX_VOLUME_BYTES]
}

/// The receiver's side of a replication stream at generation 3, resuming after sequence
/// 10 with entries up to 20 held: a hello, then batches, decoded and fenced as the
/// replication service and the VPG's receiver do.
fn receive_stream(mut stream: &[u8]) {
    let mut fence = StreamFence::new(Generation(3));
    let mut session = None;
    let mut last = None;
    while !stream.is_empty() {
        let Ok(request) = pb::ReplicateRequest::decode_length_delimited(&mut stream) else {
            return;
        };
        match (request.msg, session) {
            (Some(pb::replicate_request::Msg::Hello(hello)), None) => {
                if model::parse_vpg(&hello.vpg_id).is_err() {
                    return;
                }
                match fence.hello(Generation(hello.generation), Seq(10), Seq(20)) {
                    Ok(id) => session = Some(id),
                    Err(_) => return,
                }
            }
            (Some(pb::replicate_request::Msg::Batch(batch)), Some(id)) => {
                let Ok(entries) = model::batch_from_pb(batch.entries) else {
                    return;
                };
                for entry in entries {
                    if let EntryBody::Write { data, .. } = &entry.body {
                        assert!(!data.is_empty() && data.len() <= MAX_ENTRY_DATA as usize);
                    }
                    if fence.accept(id, entry.seq).is_err() {
                        return;
                    }
                    assert!(
                        last.is_none_or(|last| entry.seq > last),
                        "sequence went back"
                    );
                    assert!(entry.seq > Seq(10), "entry at or before the resume point");
                    last = Some(entry.seq);
                }
            }
            _ => return,
        }
    }
}

/// What the protected VRA decodes from a recovery VRA: a replication stream's acks
/// (selector 0) or a compare answer (1).
pub fn replication_sender(data: &[u8]) {
    let Some((&selector, message)) = data.split_first() else {
        return;
    };
    if selector % 2 == 0 {
        receive_acks(message);
        return;
    }
    // A compare answer for a piece of up to 64 KiB in coarse blocks of 16 KiB and fine
    // blocks of 4 KiB, its length from the selector's upper bits.
    let (coarse, fine) = (16 * 1024, 4 * 1024);
    let len = 1 + u64::from(selector >> 1) * 512;
    let Ok(r) = pb::CompareBlocksResponse::decode(message) else {
        return;
    };
    if !hashes::compare_answer_fits(len, coarse, fine, &r.differing, r.fine_hashes.len()) {
        return;
    }
    // Each differing block takes its fine hashes from the answer, in order.
    let mut theirs = r.fine_hashes.as_slice();
    for &k in &r.differing {
        let block = hashes::block_len(len, coarse, k);
        assert!(block > 0, "block {k} outside a piece of {len} bytes");
        let fine_blocks = block.div_ceil(fine) as usize;
        theirs = &theirs[fine_blocks * HASH_LEN..];
    }
    assert!(theirs.is_empty(), "fine hashes left over");
}

/// The sender's side of a stream: a window holding a few entries meets the receiver's
/// first ack (where to resume), then later ones; between acks it sends a batch.
fn receive_acks(mut stream: &[u8]) {
    let mut window = SendWindow::new();
    for n in 0..5u32 {
        window.push(n, 100);
    }
    let mut connected = false;
    while !stream.is_empty() {
        let Ok(ack) = pb::ReplicateAck::decode_length_delimited(&mut stream) else {
            return;
        };
        if connected {
            if window.on_ack(Seq(ack.durable_seq)).is_err() {
                return;
            }
        } else {
            if window
                .on_connected(Seq(ack.durable_seq), Seq(ack.held_seq))
                .is_err()
            {
                return;
            }
            connected = true;
        }
        assert!(window.acked_seq() <= window.sent_seq());
        assert!(window.sent_seq() <= window.written_seq());
        window.push(5, 100);
        window.next_batch(250, 4);
    }
}
