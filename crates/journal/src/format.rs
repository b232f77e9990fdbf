//! On-disk encodings: the segment header, the record frame (a checksummed header and
//! a checksummed payload) and record payloads. Pure byte manipulation, no IO; see
//! `docs/journal-format.md` for the layout.

use bytes::Bytes;

use crate::types::{
    Checkpoint, CheckpointId, CheckpointKind, Generation, RecordBody, SegmentId, Seq, UnixMillis,
    VolumeId,
};

/// Magic at the start of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"TNDMJSEG";
/// Segment format version.
pub const SEGMENT_VERSION: u32 = 1;
/// Size of the segment header in bytes.
pub const SEGMENT_HEADER_LEN: u64 = 64;
/// Size of a record header in bytes.
pub const RECORD_HEADER_LEN: usize = 40;
/// Size of the fixed part of a write payload (volume, reserved, offset).
pub const WRITE_PREFIX_LEN: usize = 16;

pub(crate) const KIND_WRITE: u8 = 1;
pub(crate) const KIND_ZERO: u8 = 2;
pub(crate) const KIND_TRIM: u8 = 3;
pub(crate) const KIND_CHECKPOINT: u8 = 4;

/// The decoded header of a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The segment's id (also in its file name).
    pub id: SegmentId,
    /// Sequence number of the segment's first record.
    pub base_seq: Seq,
    /// Per-journal salt that seeds every record checksum in the segment.
    pub salt: u64,
    /// When the segment was created.
    pub created: UnixMillis,
}

impl SegmentHeader {
    /// Encodes the header into its fixed 64 bytes.
    #[must_use]
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
        b[0..8].copy_from_slice(SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.id.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.base_seq.0.to_le_bytes());
        b[32..40].copy_from_slice(&self.salt.to_le_bytes());
        b[40..48].copy_from_slice(&self.created.0.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a segment header.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, String> {
        if b.len() < SEGMENT_HEADER_LEN as usize {
            return Err(format!("segment header truncated at {} bytes", b.len()));
        }
        if &b[0..8] != SEGMENT_MAGIC {
            return Err("bad segment magic".into());
        }
        let crc = u32_at(b, 60);
        if crc32c::crc32c(&b[0..60]) != crc {
            return Err("segment header checksum mismatch".into());
        }
        let version = u32_at(b, 8);
        if version != SEGMENT_VERSION {
            return Err(format!("unsupported segment version {version}"));
        }
        let header_len = u32_at(b, 12);
        if u64::from(header_len) != SEGMENT_HEADER_LEN {
            return Err(format!("unexpected segment header length {header_len}"));
        }
        Ok(SegmentHeader {
            id: SegmentId(u64_at(b, 16)),
            base_seq: Seq(u64_at(b, 24)),
            salt: u64_at(b, 32),
            created: UnixMillis(u64_at(b, 40)),
        })
    }
}

/// The CRC seed derived from a journal salt.
#[must_use]
pub fn crc_seed(salt: u64) -> u32 {
    crc32c::crc32c(&salt.to_le_bytes())
}

/// The decoded fixed header of a record frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Payload length in bytes.
    pub payload_len: u32,
    /// Record kind code.
    pub kind: u8,
    /// Checksum of the payload.
    pub payload_crc: u32,
    /// Sequence number.
    pub seq: Seq,
    /// Writer generation.
    pub generation: Generation,
    /// Segment offset at which the write batch holding this record began: every byte
    /// of the segment before it had been made durable when this record was written.
    pub commit_base: u64,
}

/// Why a record header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderFault {
    /// The header checksum does not match.
    Checksum,
    /// The checksum matches but a field is impossible.
    Invalid,
}

impl RecordHeader {
    /// Decodes and checks a record header; `max_payload` bounds the length field.
    pub fn decode(b: &[u8], seed: u32, max_payload: u32) -> Result<RecordHeader, HeaderFault> {
        debug_assert!(b.len() >= RECORD_HEADER_LEN);
        let crc = u32_at(b, 0);
        if crc32c::crc32c_append(seed, &b[4..RECORD_HEADER_LEN]) != crc {
            return Err(HeaderFault::Checksum);
        }
        let h = RecordHeader {
            payload_len: u32_at(b, 4),
            kind: b[8],
            payload_crc: u32_at(b, 12),
            seq: Seq(u64_at(b, 16)),
            generation: Generation(u64_at(b, 24)),
            commit_base: u64_at(b, 32),
        };
        if b[9] != 0 || b[10] != 0 || b[11] != 0 {
            return Err(HeaderFault::Invalid);
        }
        if !(KIND_WRITE..=KIND_CHECKPOINT).contains(&h.kind)
            || h.payload_len > max_payload
            || h.seq > Seq::MAX
        {
            return Err(HeaderFault::Invalid);
        }
        Ok(h)
    }
}

/// A record frame ready to be written: the header with the payload's fixed part (or the
/// whole payload of a record without data), then a write's data. The data stays the
/// buffer it arrived in, so it is not copied before the kernel takes it.
#[derive(Debug)]
pub(crate) struct Frame {
    /// Header, then the payload's fixed part.
    pub(crate) head: Vec<u8>,
    /// A write's data (empty for other records).
    pub(crate) data: Bytes,
}

impl Frame {
    /// Bytes the frame takes in a segment.
    pub(crate) fn len(&self) -> usize {
        self.head.len() + self.data.len()
    }

    /// The frame as one buffer.
    #[cfg(test)]
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        [&self.head[..], &self.data[..]].concat()
    }
}

/// Writes the header of a frame whose payload (`payload_len` bytes) is already in place,
/// leaving the commit base and the header checksum to [`seal_frame`].
pub(crate) fn write_header(
    head: &mut [u8],
    payload_len: u32,
    kind: u8,
    payload_crc: u32,
    seq: Seq,
    generation: Generation,
) {
    head[4..8].copy_from_slice(&payload_len.to_le_bytes());
    head[8] = kind;
    head[9] = 0;
    head[10..12].copy_from_slice(&0u16.to_le_bytes());
    head[12..16].copy_from_slice(&payload_crc.to_le_bytes());
    head[16..24].copy_from_slice(&seq.0.to_le_bytes());
    head[24..32].copy_from_slice(&generation.0.to_le_bytes());
}

/// Sets a frame's commit base and computes its header checksum (`head` is the frame's
/// first bytes, at least the header).
pub(crate) fn seal_frame(head: &mut [u8], seed: u32, commit_base: u64) {
    head[32..40].copy_from_slice(&commit_base.to_le_bytes());
    let crc = crc32c::crc32c_append(seed, &head[4..RECORD_HEADER_LEN]);
    head[0..4].copy_from_slice(&crc.to_le_bytes());
}

/// Encodes a record body into a frame. The payload checksum is computed here;
/// [`seal_frame`] completes the header when the frame's place in a write batch is known.
pub(crate) fn encode_frame(
    body: &RecordBody,
    seq: Seq,
    generation: Generation,
    seed: u32,
) -> Frame {
    let (kind, mut head, data) = match body {
        RecordBody::Write {
            volume,
            offset,
            data,
        } => {
            let mut f = Vec::with_capacity(RECORD_HEADER_LEN + WRITE_PREFIX_LEN);
            f.resize(RECORD_HEADER_LEN, 0);
            f.extend_from_slice(&volume.0.to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes());
            f.extend_from_slice(&offset.to_le_bytes());
            (KIND_WRITE, f, data.clone())
        }
        RecordBody::Zero {
            volume,
            offset,
            len,
        }
        | RecordBody::Trim {
            volume,
            offset,
            len,
        } => {
            let mut f = Vec::with_capacity(RECORD_HEADER_LEN + 24);
            f.resize(RECORD_HEADER_LEN, 0);
            f.extend_from_slice(&volume.0.to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes());
            f.extend_from_slice(&offset.to_le_bytes());
            f.extend_from_slice(&len.to_le_bytes());
            let kind = if matches!(body, RecordBody::Zero { .. }) {
                KIND_ZERO
            } else {
                KIND_TRIM
            };
            (kind, f, Bytes::new())
        }
        RecordBody::Checkpoint(cp) => {
            let name = cp.name.as_deref().unwrap_or("").as_bytes();
            let vm = cp.vm.as_deref().unwrap_or("").as_bytes();
            let mut f = Vec::with_capacity(RECORD_HEADER_LEN + 24 + name.len() + vm.len());
            f.resize(RECORD_HEADER_LEN, 0);
            f.extend_from_slice(&cp.id.0.to_le_bytes());
            f.extend_from_slice(&cp.timestamp.0.to_le_bytes());
            f.push(cp.kind.to_u8());
            let flags = u8::from(cp.name.is_some()) | (u8::from(cp.vm.is_some()) << 1);
            f.push(flags);
            f.extend_from_slice(&(name.len() as u16).to_le_bytes());
            f.extend_from_slice(&(vm.len() as u16).to_le_bytes());
            f.extend_from_slice(&0u16.to_le_bytes());
            f.extend_from_slice(name);
            f.extend_from_slice(vm);
            (KIND_CHECKPOINT, f, Bytes::new())
        }
    };
    let payload_crc = crc32c::crc32c_append(
        crc32c::crc32c_append(seed, &head[RECORD_HEADER_LEN..]),
        &data,
    );
    let payload_len = (head.len() - RECORD_HEADER_LEN + data.len()) as u32;
    write_header(&mut head, payload_len, kind, payload_crc, seq, generation);
    Frame { head, data }
}

/// Checks that a checkpoint's strings fit the encoding.
pub(crate) fn checkpoint_fits(cp: &Checkpoint) -> bool {
    cp.name
        .as_deref()
        .is_none_or(|n| n.len() <= usize::from(u16::MAX))
        && cp
            .vm
            .as_deref()
            .is_none_or(|n| n.len() <= usize::from(u16::MAX))
}

/// Decodes a payload whose checksum has been verified.
pub fn decode_payload(kind: u8, payload: &[u8]) -> Result<RecordBody, String> {
    match kind {
        KIND_WRITE => {
            if payload.len() < WRITE_PREFIX_LEN {
                return Err("write payload too short".into());
            }
            Ok(RecordBody::Write {
                volume: VolumeId(u32_at(payload, 0)),
                offset: u64_at(payload, 8),
                data: Bytes::copy_from_slice(&payload[WRITE_PREFIX_LEN..]),
            })
        }
        KIND_ZERO | KIND_TRIM => {
            if payload.len() != 24 {
                return Err("zero/trim payload has the wrong length".into());
            }
            let volume = VolumeId(u32_at(payload, 0));
            let offset = u64_at(payload, 8);
            let len = u64_at(payload, 16);
            Ok(if kind == KIND_ZERO {
                RecordBody::Zero {
                    volume,
                    offset,
                    len,
                }
            } else {
                RecordBody::Trim {
                    volume,
                    offset,
                    len,
                }
            })
        }
        KIND_CHECKPOINT => {
            if payload.len() < 24 {
                return Err("checkpoint payload too short".into());
            }
            let id = CheckpointId(u64_at(payload, 0));
            let timestamp = UnixMillis(u64_at(payload, 8));
            let kind = CheckpointKind::from_u8(payload[16])
                .ok_or_else(|| format!("unknown checkpoint kind {}", payload[16]))?;
            let flags = payload[17];
            let name_len = usize::from(u16::from_le_bytes([payload[18], payload[19]]));
            let vm_len = usize::from(u16::from_le_bytes([payload[20], payload[21]]));
            if payload.len() != 24 + name_len + vm_len {
                return Err("checkpoint payload has the wrong length".into());
            }
            if (flags & 1 == 0 && name_len != 0) || (flags & 2 == 0 && vm_len != 0) {
                return Err("checkpoint text present but flagged absent".into());
            }
            let name_bytes = &payload[24..24 + name_len];
            let vm_bytes = &payload[24 + name_len..];
            let text = |b: &[u8]| {
                String::from_utf8(b.to_vec())
                    .map_err(|_| "checkpoint text is not utf-8".to_string())
            };
            Ok(RecordBody::Checkpoint(Checkpoint {
                id,
                timestamp,
                kind,
                name: if flags & 1 != 0 {
                    Some(text(name_bytes)?)
                } else {
                    None
                },
                vm: if flags & 2 != 0 {
                    Some(text(vm_bytes)?)
                } else {
                    None
                },
            }))
        }
        other => Err(format!("unknown record kind {other}")),
    }
}

/// Encoded length of a payload for a body.
#[must_use]
pub fn payload_len(body: &RecordBody) -> u64 {
    match body {
        RecordBody::Write { data, .. } => (WRITE_PREFIX_LEN + data.len()) as u64,
        RecordBody::Zero { .. } | RecordBody::Trim { .. } => 24,
        RecordBody::Checkpoint(cp) => {
            (24 + cp.name.as_deref().map_or(0, str::len) + cp.vm.as_deref().map_or(0, str::len))
                as u64
        }
    }
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_header_round_trips_and_detects_flips() {
        let h = SegmentHeader {
            id: SegmentId(7),
            base_seq: Seq(42),
            salt: 0xdead_beef,
            created: UnixMillis(1234),
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        for i in 0..b.len() {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(SegmentHeader::decode(&c).is_err(), "flip at {i} undetected");
        }
    }

    #[test]
    fn frames_round_trip() {
        let seed = crc_seed(99);
        let bodies = [
            RecordBody::Write {
                volume: VolumeId(3),
                offset: 4096,
                data: Bytes::from_static(b"hello"),
            },
            RecordBody::Zero {
                volume: VolumeId(1),
                offset: 0,
                len: 512,
            },
            RecordBody::Trim {
                volume: VolumeId(2),
                offset: 10,
                len: 20,
            },
            RecordBody::Checkpoint(Checkpoint {
                id: CheckpointId(5),
                timestamp: UnixMillis(77),
                kind: CheckpointKind::ApplicationConsistent,
                name: Some("before upgrade".into()),
                vm: Some("vm-1".into()),
            }),
            RecordBody::Checkpoint(Checkpoint {
                id: CheckpointId(6),
                timestamp: UnixMillis(78),
                kind: CheckpointKind::Automatic,
                name: None,
                vm: None,
            }),
        ];
        for (i, body) in bodies.iter().enumerate() {
            let mut frame = encode_frame(body, Seq(i as u64 + 1), Generation(3), seed);
            assert_eq!(
                frame.len() as u64,
                RECORD_HEADER_LEN as u64 + payload_len(body)
            );
            seal_frame(&mut frame.head, seed, 64);
            let f = frame.to_vec();
            let h = RecordHeader::decode(&f, seed, u32::MAX).expect("header");
            assert_eq!(h.seq, Seq(i as u64 + 1));
            assert_eq!(h.generation, Generation(3));
            assert_eq!(h.commit_base, 64);
            let payload = &f[RECORD_HEADER_LEN..];
            assert_eq!(crc32c::crc32c_append(seed, payload), h.payload_crc);
            assert_eq!(&decode_payload(h.kind, payload).expect("payload"), body);
            // a different salt does not validate
            assert!(RecordHeader::decode(&f, crc_seed(100), u32::MAX).is_err());
        }
    }

    #[test]
    fn checkpoint_text_flagged_absent_is_refused() {
        // Found by the journal_segment fuzz target: the bytes of a name or VM flagged
        // absent were skipped silently, so the record decoded to a checkpoint that
        // encodes to another length.
        let body = RecordBody::Checkpoint(Checkpoint {
            id: CheckpointId(2),
            timestamp: UnixMillis(2000),
            kind: CheckpointKind::Manual,
            name: Some("name".into()),
            vm: Some("vm-1".into()),
        });
        let frame = encode_frame(&body, Seq(1), Generation(1), crc_seed(1));
        let payload = frame.head[RECORD_HEADER_LEN..].to_vec();
        assert_eq!(decode_payload(KIND_CHECKPOINT, &payload), Ok(body));
        for flags in [0, 1, 2] {
            let mut p = payload.clone();
            p[17] = flags;
            assert!(
                decode_payload(KIND_CHECKPOINT, &p).is_err(),
                "flags {flags}"
            );
        }
    }

    #[test]
    fn a_record_at_the_last_sequence_number_is_invalid() {
        // Found by the journal_open fuzz target: recovery computed the sequence after
        // u64::MAX.
        let seed = crc_seed(1);
        let body = RecordBody::Zero {
            volume: VolumeId(0),
            offset: 0,
            len: 512,
        };
        for (seq, valid) in [(Seq::MAX, true), (Seq(u64::MAX), false)] {
            let mut frame = encode_frame(&body, seq, Generation(1), seed);
            seal_frame(&mut frame.head, seed, 64);
            let decoded = RecordHeader::decode(&frame.to_vec(), seed, u32::MAX);
            assert_eq!(decoded.is_ok(), valid, "{seq}");
            if !valid {
                assert_eq!(decoded, Err(HeaderFault::Invalid));
            }
        }
    }
}
