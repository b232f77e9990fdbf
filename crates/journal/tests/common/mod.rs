//! Helpers shared by the journal's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bytes::Bytes;
use tandem_journal::{
    Checkpoint, CheckpointId, CheckpointKind, JournalConfig, RecordBody, UnixMillis, VolumeId,
    VolumeSpec,
};

/// `n` volumes of `size` bytes with replicas in `dir/replicas`.
pub fn volumes(dir: &Path, n: u32, size: u64) -> Vec<VolumeSpec> {
    let rdir = dir.join("replicas");
    std::fs::create_dir_all(&rdir).expect("replica dir");
    (0..n)
        .map(|i| VolumeSpec {
            id: VolumeId(i),
            size,
            replica_path: rdir.join(format!("vol{i}.img")),
        })
        .collect()
}

/// A small-segment configuration for tests.
pub fn small_config(dir: &Path, n: u32, size: u64, segment_size: u64) -> JournalConfig {
    let mut cfg = JournalConfig::new(volumes(dir, n, size));
    cfg.segment_size = segment_size;
    cfg.max_payload = u32::try_from(segment_size / 2).expect("payload");
    cfg
}

/// Journal directory inside a test directory.
pub fn jdir(dir: &Path) -> PathBuf {
    dir.join("journal")
}

/// A write record with a recognisable pattern.
pub fn write(volume: u32, offset: u64, len: usize, tag: u64) -> RecordBody {
    RecordBody::Write {
        volume: VolumeId(volume),
        offset,
        data: pattern(len, tag),
    }
}

/// Bytes derived from `tag` so that different writes differ.
pub fn pattern(len: usize, tag: u64) -> Bytes {
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push((x >> 24) as u8);
    }
    Bytes::from(v)
}

/// An automatic checkpoint record.
pub fn checkpoint(id: u64, ts: u64) -> RecordBody {
    RecordBody::Checkpoint(Checkpoint {
        id: CheckpointId(id),
        timestamp: UnixMillis(ts),
        kind: CheckpointKind::Automatic,
        name: None,
        vm: None,
    })
}

/// A single-threaded runtime for tests that drive async appends.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Reads a whole image.
pub fn read_image(img: &tandem_journal::PointInTimeImage) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(img.size()).expect("size")];
    img.read_at(0, &mut buf).expect("read image");
    buf
}

/// A test-size knob: `name` from the environment, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A seed from `name` in the environment, else a random one; printed so a failure can be rerun.
pub fn seed(name: &str) -> u64 {
    let s = std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed: {s} (rerun with {name}={s})");
    s
}

/// BLAKE3 of every file under `dir` (path-sorted), for "untouched" checks.
pub fn hash_tree(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).expect("read file");
                out.push((p, blake3::hash(&bytes).to_hex().to_string()));
            }
        }
    }
    out.sort();
    out
}
