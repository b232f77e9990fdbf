//! Replica disks (one raw image file per volume) and the checksummed marker that says
//! up to which sequence number they are current.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    error::{JournalError, Result},
    format::{u32_at, u64_at},
    segment::sync_dir,
    types::{Generation, Seq, UnixMillis, VolumeId},
};

/// Name of the marker file in the journal directory.
pub const MARKER_FILE: &str = "replica.marker";
const MARKER_TMP: &str = "replica.marker.tmp";
const MARKER_MAGIC: &[u8; 8] = b"TNDMRPL1";
/// Bytes of the marker file.
pub(crate) const MARKER_LEN: usize = 56;

/// A volume of the protected VM and where its replica disk lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The volume.
    pub id: VolumeId,
    /// Its size in bytes.
    pub size: u64,
    /// The raw image file holding its replica.
    pub replica_path: PathBuf,
}

/// "Every replica disk holds every record up to `seq`."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaMarker {
    /// Replicas are current up to and including this sequence (0: nothing promoted yet).
    pub seq: Seq,
    /// A promotion to this sequence was started and not finished (0: none). On open
    /// the journal finishes it before serving any image, because the replicas may
    /// already hold some of its writes.
    pub promoting_to: Seq,
    /// Highest writer generation the journal had seen when the marker was written.
    pub generation: Generation,
    /// When the marker was written.
    pub written: UnixMillis,
    /// History had been promoted early for the hard limit and the journal did not hold
    /// its whole window again yet ("History Not Meeting SLA" survives a reopen).
    pub history_short: bool,
}

/// Bit 0 of the flags word: [`ReplicaMarker::history_short`].
const FLAG_HISTORY_SHORT: u32 = 1;

impl ReplicaMarker {
    fn encode(&self) -> [u8; MARKER_LEN] {
        let mut b = [0u8; MARKER_LEN];
        b[0..8].copy_from_slice(MARKER_MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        let flags = if self.history_short {
            FLAG_HISTORY_SHORT
        } else {
            0
        };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.generation.0.to_le_bytes());
        b[32..40].copy_from_slice(&self.written.0.to_le_bytes());
        b[40..48].copy_from_slice(&self.promoting_to.0.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..52]);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8], path: &Path) -> Result<ReplicaMarker> {
        let bad = |reason: &str| JournalError::CorruptMarker {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if b.len() != MARKER_LEN {
            return Err(bad("wrong length"));
        }
        if &b[0..8] != MARKER_MAGIC {
            return Err(bad("bad magic"));
        }
        if crc32c::crc32c(&b[0..52]) != u32_at(b, 52) {
            return Err(bad("checksum mismatch"));
        }
        if u32_at(b, 8) != 1 {
            return Err(bad("unsupported version"));
        }
        let marker = ReplicaMarker {
            seq: Seq(u64_at(b, 16)),
            generation: Generation(u64_at(b, 24)),
            written: UnixMillis(u64_at(b, 32)),
            promoting_to: Seq(u64_at(b, 40)),
            history_short: u32_at(b, 12) & FLAG_HISTORY_SHORT != 0,
        };
        if marker.seq > Seq::MAX || marker.promoting_to > Seq::MAX {
            return Err(bad("sequence beyond the last one a record may carry"));
        }
        Ok(marker)
    }
}

/// Reads the marker of a journal directory, if one was ever written.
pub fn read_marker(dir: &Path) -> Result<Option<ReplicaMarker>> {
    let path = dir.join(MARKER_FILE);
    match std::fs::read(&path) {
        Ok(b) => ReplicaMarker::decode(&b, &path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(JournalError::io("read replica marker", path, e)),
    }
}

/// Writes the marker atomically: temporary file, fsync, rename, directory fsync.
pub fn write_marker(dir: &Path, marker: &ReplicaMarker) -> Result<()> {
    let tmp = dir.join(MARKER_TMP);
    let path = dir.join(MARKER_FILE);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| JournalError::io("create replica marker", &tmp, e))?;
    f.write_all_at(&marker.encode(), 0)
        .and_then(|()| f.sync_all())
        .map_err(|e| JournalError::io("write replica marker", &tmp, e))?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| JournalError::io("rename replica marker", &path, e))?;
    sync_dir(dir)
}

/// An open replica disk.
#[derive(Debug, Clone)]
pub struct Replica {
    /// The volume it belongs to.
    pub spec: VolumeSpec,
    /// The open image file.
    pub file: Arc<File>,
}

/// Opens (creating a sparse, zero-filled file if missing) the replica of a volume.
pub fn open_replica(spec: &VolumeSpec) -> Result<Replica> {
    let path = &spec.replica_path;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| JournalError::io("open replica", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| JournalError::io("stat replica", path, e))?
        .len();
    if len > spec.size {
        return Err(JournalError::ReplicaSize {
            path: path.clone(),
            actual: len,
            expected: spec.size,
        });
    }
    if len < spec.size {
        file.set_len(spec.size)
            .and_then(|()| file.sync_all())
            .map_err(|e| JournalError::io("size replica", path, e))?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(Replica {
        spec: spec.clone(),
        file: Arc::new(file),
    })
}

/// Writes `len` zero bytes at `offset` of a file.
pub fn write_zeroes(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; usize::try_from(CHUNK.min(len)).unwrap_or(0)];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        file.write_all_at(&zeros[..n as usize], offset + done)
            .map_err(|e| JournalError::io("zero replica range", path, e))?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips_and_detects_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_marker(dir.path()).expect("read"), None);
        let m = ReplicaMarker {
            seq: Seq(10),
            promoting_to: Seq(12),
            generation: Generation(2),
            written: UnixMillis(5),
            history_short: true,
        };
        write_marker(dir.path(), &m).expect("write");
        assert_eq!(read_marker(dir.path()).expect("read"), Some(m));
        let path = dir.path().join(MARKER_FILE);
        let mut b = std::fs::read(&path).expect("read bytes");
        b[17] ^= 4;
        std::fs::write(&path, &b).expect("write bytes");
        assert!(read_marker(dir.path()).is_err());
    }

    #[test]
    fn a_marker_at_the_last_sequence_number_is_corrupt() {
        // Found by the journal_open fuzz target: recovery computed the sequence after a
        // replica point of u64::MAX.
        let dir = tempfile::tempdir().expect("tempdir");
        for (seq, promoting_to) in [(Seq(u64::MAX), Seq(0)), (Seq(1), Seq(u64::MAX))] {
            let m = ReplicaMarker {
                seq,
                promoting_to,
                generation: Generation(1),
                written: UnixMillis(0),
                history_short: false,
            };
            std::fs::write(dir.path().join(MARKER_FILE), m.encode()).expect("write");
            let err = read_marker(dir.path()).expect_err("out of range");
            assert!(matches!(err, JournalError::CorruptMarker { .. }), "{err}");
        }
    }
}
