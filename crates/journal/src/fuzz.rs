//! Entry points of the fuzz targets in `fuzz/` (built with the `fuzzing` feature), also
//! replayed over the checked-in corpus by `tests/tests/fuzz_corpus.rs`: segment images and
//! replica markers as found on disk, read by the same code recovery and promotion use. Any
//! panic, a parse that skips or repeats bytes, and a journal that opens once but not twice
//! are bugs.
//!
//! Random bytes rarely carry valid CRC32C checksums, so a flag in the first input byte has
//! the harness seal every checksum before parsing, which lets the fuzzer reach the record
//! decoders and the index.

use std::path::Path;

use crate::{
    error::JournalError,
    format::{
        RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, crc_seed, decode_payload, payload_len, u32_at,
        u64_at,
    },
    journal::{Journal, JournalConfig},
    replica::{MARKER_FILE, MARKER_LEN, VolumeSpec},
    segment::{ParseEnd, ParseMode, parse_header, parse_records, segment_path},
    types::{SegmentId, VolumeId},
};

/// Largest record payload of the fuzzed journals: small, so that no input allocates much.
const MAX_PAYLOAD: u32 = 64 * 1024;
/// Bit of the first input byte: seal every checksum before parsing.
const SEAL: u8 = 1;

/// One segment image, parsed as recovery (the last segment) and promotion (every other)
/// parse it. Input: a flags byte (bit 0: seal the checksums), then the image.
pub fn segment(data: &[u8]) {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    let mut image = image.to_vec();
    if flags & SEAL != 0 {
        seal_segment(&mut image, None);
    }
    let id = SegmentId(if image.len() >= 24 {
        u64_at(&image, 16)
    } else {
        1
    });
    // Recovery reads the header first; the records parser must cope without it too.
    let salt = match parse_header(&image, id) {
        Ok(header) => header.salt,
        Err(_) if image.len() >= 40 => u64_at(&image, 32),
        Err(_) => 0,
    };
    let seed = crc_seed(salt);
    for mode in [ParseMode::Strict, ParseMode::Recover] {
        let mut next = SEGMENT_HEADER_LEN;
        let parsed = parse_records(&image, id, seed, MAX_PAYLOAD, mode, |h, off, payload| {
            assert_eq!(off, next, "record where none was expected");
            assert_eq!(payload.len(), h.payload_len as usize);
            next = off + (RECORD_HEADER_LEN + payload.len()) as u64;
            if let Ok(body) = decode_payload(h.kind, payload) {
                assert_eq!(
                    payload_len(&body),
                    payload.len() as u64,
                    "{body:?} decoded from a payload of another length"
                );
            }
            Ok(())
        });
        match parsed {
            Ok(ParseEnd::Clean) => assert_eq!(next, image.len() as u64, "clean end elsewhere"),
            Ok(ParseEnd::Torn { at, .. }) => {
                assert_eq!(mode, ParseMode::Recover, "torn tail in strict mode");
                assert_eq!(at, next, "torn tail elsewhere than after the last record");
            }
            Err(JournalError::Corrupt { .. }) => {}
            Err(other) => panic!("parse failed with {other}"),
        }
    }
}

/// A journal directory opened, read back, promoted, closed and opened again. Input: a
/// flags byte (bit 0: seal the checksums; bit 1: a 56-byte replica marker follows; bit
/// 2: sparse sequence numbers; bits 3-4: one to four segment files follow, each but the
/// last preceded by its length as a little-endian `u16`).
pub fn open(data: &[u8]) {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let base = Path::new("/dev/shm");
    let dir = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    }
    .expect("temporary directory");
    let journal_dir = dir.path().join("journal");
    std::fs::create_dir(&journal_dir).expect("journal directory");
    if flags & 2 != 0 {
        let (marker, after) = rest.split_at(MARKER_LEN.min(rest.len()));
        let mut marker = marker.to_vec();
        if flags & SEAL != 0 && marker.len() == MARKER_LEN {
            let crc = crc32c::crc32c(&marker[..MARKER_LEN - 4]);
            marker[MARKER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        }
        std::fs::write(journal_dir.join(MARKER_FILE), marker).expect("write marker");
        rest = after;
    }
    let segments = 1 + usize::from(flags >> 3 & 3);
    for i in 0..segments {
        let id = SegmentId(i as u64 + 1);
        let len = if i + 1 == segments {
            rest.len()
        } else if rest.len() >= 2 {
            let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
            rest = &rest[2..];
            len.min(rest.len())
        } else {
            break;
        };
        let (image, after) = rest.split_at(len);
        rest = after;
        let mut image = image.to_vec();
        if flags & SEAL != 0 {
            seal_segment(&mut image, Some(id));
        }
        std::fs::write(segment_path(&journal_dir, id), image).expect("write segment");
    }
    let config = JournalConfig {
        segment_size: 4 * u64::from(MAX_PAYLOAD),
        max_payload: MAX_PAYLOAD,
        sparse_seqs: flags & 4 != 0,
        ..JournalConfig::new(vec![
            VolumeSpec {
                id: VolumeId(0),
                size: 1 << 20,
                replica_path: dir.path().join("vol0.img"),
            },
            VolumeSpec {
                id: VolumeId(1),
                size: 64 * 1024,
                replica_path: dir.path().join("vol1.img"),
            },
        ])
    };
    let Ok(journal) = Journal::open(&journal_dir, config.clone()) else {
        return;
    };
    journal
        .read_records()
        .expect("a journal that opened reads back");
    let durable = journal.durable_seq();
    let newest_usable = journal
        .checkpoints()
        .into_iter()
        .rfind(|c| c.state == crate::journal::CheckpointState::Usable);
    if let Some(checkpoint) = newest_usable {
        // A promotion may fail on data the scan let through (and poison the journal);
        // that is an error to report, not a panic.
        let _ = journal.promote_to_checkpoint(checkpoint.checkpoint.id);
    }
    let poisoned = journal.close().is_err();
    let reopened = Journal::open(&journal_dir, config);
    if !poisoned {
        let reopened = reopened.expect("a journal that opened and closed opens again");
        assert_eq!(reopened.durable_seq(), durable, "durable position moved");
        reopened.close().expect("close");
    }
}

/// Seals the checksums of a segment image in place: the header's (setting its segment id
/// to `id` if given) and those of every record whose frame fits, in order.
fn seal_segment(image: &mut [u8], id: Option<SegmentId>) {
    let header_len = SEGMENT_HEADER_LEN as usize;
    if image.len() < header_len {
        return;
    }
    if let Some(id) = id {
        image[16..24].copy_from_slice(&id.0.to_le_bytes());
    }
    let crc = crc32c::crc32c(&image[..60]);
    image[60..64].copy_from_slice(&crc.to_le_bytes());
    let seed = crc_seed(u64_at(image, 32));
    let mut pos = header_len;
    while pos + RECORD_HEADER_LEN <= image.len() {
        let payload = pos + RECORD_HEADER_LEN;
        let end = payload.saturating_add(u32_at(image, pos + 4) as usize);
        if end > image.len() {
            return;
        }
        let payload_crc = crc32c::crc32c_append(seed, &image[payload..end]);
        image[pos + 12..pos + 16].copy_from_slice(&payload_crc.to_le_bytes());
        let header_crc = crc32c::crc32c_append(seed, &image[pos + 4..payload]);
        image[pos..pos + 4].copy_from_slice(&header_crc.to_le_bytes());
        pos = end;
    }
}
