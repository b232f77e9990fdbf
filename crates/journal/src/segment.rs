//! Segment files: naming, creation, and the record parser used by recovery (which
//! tells a torn tail from corruption) and by promotion (which accepts no fault at all).

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use crate::{
    error::{JournalError, Result},
    format::{RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN, SegmentHeader},
    types::SegmentId,
};

/// File name suffix of segment files.
pub const SEGMENT_SUFFIX: &str = ".seg";

/// Path of a segment file in a journal directory.
#[must_use]
pub fn segment_path(dir: &Path, id: SegmentId) -> PathBuf {
    dir.join(format!("{:016x}{SEGMENT_SUFFIX}", id.0))
}

/// Lists the segment files of a directory, in id order.
pub fn list_segments(dir: &Path) -> Result<Vec<(SegmentId, PathBuf)>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| JournalError::io("list segments", dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| JournalError::io("list segments", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        if stem.len() != 16 {
            continue;
        }
        if let Ok(id) = u64::from_str_radix(stem, 16) {
            // The journal numbers the next segment after the last one.
            if id == u64::MAX {
                return Err(JournalError::Corrupt {
                    segment: SegmentId(id),
                    offset: 0,
                    reason: "segment id is the last one there is".into(),
                });
            }
            out.push((SegmentId(id), entry.path()));
        }
    }
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}

/// Creates a segment file holding only its header, and makes it and its directory
/// entry durable before any record is written to it.
pub fn create_segment(dir: &Path, header: &SegmentHeader) -> Result<File> {
    let path = segment_path(dir, header.id);
    // Not `create_new`: an attempt that ran out of space may have left the file behind,
    // and the segment id is new, so whatever is there is that attempt's.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| JournalError::io("create segment", &path, e))?;
    file.write_all_at(&header.encode(), 0)
        .map_err(|e| JournalError::io("write segment header", &path, e))?;
    file.sync_data()
        .map_err(|e| JournalError::io("sync segment header", &path, e))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Fsyncs a directory so that entries created or removed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| JournalError::io("sync directory", dir, e))
}

/// Reads `len` bytes of a file from offset 0.
pub fn read_prefix(file: &File, path: &Path, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| JournalError::io("read segment", path, e))?;
    Ok(buf)
}

/// How a parse of a segment's records ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseEnd {
    /// Every byte up to the end belongs to a valid record.
    Clean,
    /// A torn tail starts at `at`: the bytes from there on were never durable.
    Torn {
        /// Offset of the first byte that is not part of a valid record.
        at: u64,
        /// What was wrong there.
        reason: &'static str,
    },
}

/// What the parser may forgive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseMode {
    /// Any fault is corruption (sealed segments, promotion of durable data).
    Strict,
    /// A fault with no later proof of durability is a torn tail (the last segment).
    Recover,
}

/// Decodes the segment header at the start of `bytes`.
pub fn parse_header(bytes: &[u8], id: SegmentId) -> Result<SegmentHeader> {
    let h = SegmentHeader::decode(bytes).map_err(|reason| JournalError::Corrupt {
        segment: id,
        offset: 0,
        reason,
    })?;
    if h.id != id {
        return Err(JournalError::Corrupt {
            segment: id,
            offset: 0,
            reason: format!("segment header names segment {}", h.id),
        });
    }
    Ok(h)
}

/// Parses the records of a segment image (`bytes` starts with the segment header).
/// Calls `visit` with each valid record's header, frame offset and payload, in order.
/// In [`ParseMode::Recover`] a fault is a torn tail unless a later valid record of the
/// same segment was written after the faulty bytes had been made durable (its commit
/// base lies beyond them), in which case it is corruption.
pub fn parse_records(
    bytes: &[u8],
    id: SegmentId,
    seed: u32,
    max_payload: u32,
    mode: ParseMode,
    mut visit: impl FnMut(&RecordHeader, u64, &[u8]) -> Result<()>,
) -> Result<ParseEnd> {
    let len = bytes.len() as u64;
    if len < SEGMENT_HEADER_LEN {
        return Err(JournalError::Corrupt {
            segment: id,
            offset: 0,
            reason: format!("segment of {len} bytes is shorter than its header"),
        });
    }
    let mut pos = SEGMENT_HEADER_LEN;
    loop {
        if pos == len {
            return Ok(ParseEnd::Clean);
        }
        match frame_at(bytes, pos, seed, max_payload) {
            Ok((h, payload)) => {
                if h.commit_base > pos || h.commit_base < SEGMENT_HEADER_LEN {
                    return Err(JournalError::Corrupt {
                        segment: id,
                        offset: pos,
                        reason: format!("record commit base {} impossible", h.commit_base),
                    });
                }
                visit(&h, pos, payload)?;
                pos += RECORD_HEADER_LEN as u64 + u64::from(h.payload_len);
            }
            Err(reason) => {
                if mode == ParseMode::Strict {
                    return Err(JournalError::Corrupt {
                        segment: id,
                        offset: pos,
                        reason: reason.to_string(),
                    });
                }
                if let Some((later, h)) = durable_record_after(bytes, pos, seed, max_payload) {
                    return Err(JournalError::Corrupt {
                        segment: id,
                        offset: pos,
                        reason: format!(
                            "{reason}, followed by record seq {} at offset {later} written after \
                             offset {} was durable",
                            h.seq, h.commit_base
                        ),
                    });
                }
                return Ok(ParseEnd::Torn { at: pos, reason });
            }
        }
    }
}

/// Decodes and verifies the frame at `pos`.
fn frame_at(
    bytes: &[u8],
    pos: u64,
    seed: u32,
    max_payload: u32,
) -> Result<(RecordHeader, &[u8]), &'static str> {
    let len = bytes.len() as u64;
    if len - pos < RECORD_HEADER_LEN as u64 {
        return Err("incomplete record header");
    }
    let p = pos as usize;
    let h =
        RecordHeader::decode(&bytes[p..p + RECORD_HEADER_LEN], seed, max_payload).map_err(|f| {
            match f {
                crate::format::HeaderFault::Checksum => "record header checksum mismatch",
                crate::format::HeaderFault::Invalid => "record header invalid",
            }
        })?;
    let end = pos + RECORD_HEADER_LEN as u64 + u64::from(h.payload_len);
    if end > len {
        return Err("incomplete record payload");
    }
    let payload = &bytes[p + RECORD_HEADER_LEN..end as usize];
    if crc32c::crc32c_append(seed, payload) != h.payload_crc {
        return Err("record payload checksum mismatch");
    }
    Ok((h, payload))
}

/// Searches the bytes after a fault at `bad` for a valid record whose commit base lies
/// beyond `bad`, which proves the faulty bytes had been durable.
fn durable_record_after(
    bytes: &[u8],
    bad: u64,
    seed: u32,
    max_payload: u32,
) -> Option<(u64, RecordHeader)> {
    let len = bytes.len() as u64;
    let mut q = bad + 1;
    while q + RECORD_HEADER_LEN as u64 <= len {
        if let Ok((h, _)) = frame_at(bytes, q, seed, max_payload)
            && h.commit_base > bad
            && h.commit_base <= q
        {
            return Some((q, h));
        }
        q += 1;
    }
    None
}

/// Truncates a file to `len` and makes the new length durable.
pub fn truncate_file(file: &File, path: &Path, len: u64) -> Result<()> {
    file.set_len(len)
        .and_then(|()| file.sync_all())
        .map_err(|e| JournalError::io("truncate segment", path, e))
}

/// Removes a file, treating "already gone" as success.
pub fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(JournalError::io("remove segment", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{crc_seed, encode_frame, seal_frame};
    use crate::types::UnixMillis;
    use crate::types::{Generation, RecordBody, Seq, VolumeId};
    use bytes::Bytes;

    fn build(batches: &[usize]) -> Vec<u8> {
        let seed = crc_seed(1);
        let mut seg = SegmentHeader {
            id: SegmentId(1),
            base_seq: Seq(1),
            salt: 1,
            created: UnixMillis(0),
        }
        .encode()
        .to_vec();
        let mut seq = 1;
        for &n in batches {
            let base = seg.len() as u64;
            for _ in 0..n {
                let mut f = encode_frame(
                    &RecordBody::Write {
                        volume: VolumeId(0),
                        offset: 0,
                        data: Bytes::from(vec![seq as u8; 100]),
                    },
                    Seq(seq),
                    Generation(1),
                    seed,
                );
                seal_frame(&mut f.head, seed, base);
                seg.extend_from_slice(&f.to_vec());
                seq += 1;
            }
        }
        seg
    }

    fn count(bytes: &[u8], mode: ParseMode) -> Result<(usize, ParseEnd)> {
        let mut n = 0;
        let end = parse_records(
            bytes,
            SegmentId(1),
            crc_seed(1),
            1 << 20,
            mode,
            |_, _, _| {
                n += 1;
                Ok(())
            },
        )?;
        Ok((n, end))
    }

    #[test]
    fn damage_in_the_last_batch_is_a_torn_tail() {
        let seg = build(&[2, 3]);
        let frame = RECORD_HEADER_LEN + 16 + 100;
        let mut bad = seg.clone();
        // second record of the last batch (record 4 of 5)
        bad[64 + 3 * frame + 50] ^= 1;
        let (n, end) = count(&bad, ParseMode::Recover).expect("recover");
        assert_eq!(n, 3);
        assert!(matches!(end, ParseEnd::Torn { at, .. } if at == (64 + 3 * frame) as u64));
        assert!(count(&bad, ParseMode::Strict).is_err());
    }

    #[test]
    fn a_segment_file_with_the_last_id_is_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(segment_path(dir.path(), SegmentId(u64::MAX)), []).expect("write");
        let err = list_segments(dir.path()).expect_err("last id");
        assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn a_segment_shorter_than_its_header_is_corrupt() {
        // Found by the journal_segment fuzz target: the parser subtracted past zero.
        let seg = build(&[1]);
        for mode in [ParseMode::Strict, ParseMode::Recover] {
            let err = count(&seg[..40], mode).expect_err("short segment");
            assert!(
                matches!(err, JournalError::Corrupt { offset: 0, .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn damage_before_a_later_batch_is_corruption() {
        let seg = build(&[2, 3]);
        let mut bad = seg.clone();
        bad[64 + 10] ^= 1;
        let err = count(&bad, ParseMode::Recover).expect_err("corrupt");
        assert!(
            matches!(err, JournalError::Corrupt { offset: 64, .. }),
            "{err}"
        );
    }
}
