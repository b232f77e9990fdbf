//! Point-in-time images: the image of one volume at a checkpoint is the replica disk
//! plus the journal's records up to the checkpoint, newest wins; the latest durable image
//! ([`Journal::open_latest_image`], for delta sync) is the same up to the durable position
//! instead. A per-image region map (built on open from the in-memory record index, no disk
//! scan) says for every byte range where its newest content lives, so reads go straight
//! to the replica or to a segment file. An optional scratch overlay (an unnamed sparse file in a scratch
//! directory) takes writes for failover tests; it is thrown away with the image and
//! never touches the replica or the journal.
//!
//! An open image pins its sequence: promotion never moves the replica past it, and
//! the image keeps the segment files it reads open even if promotion frees them.

use std::{
    collections::HashMap,
    fs::File,
    io,
    num::NonZeroU64,
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use rustix::fs::{Advice, fadvise};
use tandem_nbd::{BlockDevice, IoFuture};
use tracing::{debug, info};

use crate::{
    error::{JournalError, Result},
    extents::{ExtentMap, Piece, Source},
    format::{RECORD_HEADER_LEN, RecordHeader, crc_seed},
    journal::{Journal, Shared},
    types::{CheckpointId, SegmentId, Seq, VolumeId},
};

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    /// Directory for a scratch overlay that takes writes; `None` makes the image read-only.
    pub scratch_dir: Option<PathBuf>,
    /// Re-verify the checksum of every journal record the image uses before serving it
    /// (guards against damage since the journal was opened).
    pub verify: bool,
}

/// Removes an image's pin when the image goes away.
#[derive(Debug)]
struct PinGuard {
    shared: Arc<Shared>,
    seq: Seq,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if let Some(n) = st.pins.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                st.pins.remove(&self.seq);
            }
        }
    }
}

#[derive(Debug)]
struct Overlay {
    file: File,
    map: RwLock<ExtentMap>,
}

#[derive(Debug)]
struct ImageInner {
    volume: VolumeId,
    /// `None` for a latest durable image.
    checkpoint: Option<CheckpointId>,
    seq: Seq,
    size: u64,
    base: ExtentMap,
    segments: HashMap<SegmentId, Arc<File>>,
    replica: Arc<File>,
    overlay: Option<Overlay>,
    prefetched_to: AtomicU64,
    _pin: PinGuard,
}

/// The image of one volume at one checkpoint. Cloning shares it.
#[derive(Debug, Clone)]
pub struct PointInTimeImage {
    inner: Arc<ImageInner>,
}

/// Which point an image is opened at.
#[derive(Debug, Clone, Copy)]
enum At {
    /// A checkpoint that is durable and not promoted.
    Checkpoint(CheckpointId),
    /// The newest durable record, whatever it is.
    LatestDurable,
}

impl Journal {
    /// Opens the image of `volume` at checkpoint `id`.
    pub fn open_image(
        &self,
        id: CheckpointId,
        volume: VolumeId,
        opts: &ImageOptions,
    ) -> Result<PointInTimeImage> {
        self.open_at(At::Checkpoint(id), volume, opts)
    }

    /// Opens the newest durable image of `volume`: the replica plus every durable
    /// record, checkpoint or not (delta sync compares against it). Like a checkpoint
    /// image it pins its sequence ([`PointInTimeImage::seq`], the durable position when
    /// it was opened): records that become durable later are not in it, and promotion
    /// never moves the replica past it while it is open.
    pub fn open_latest_image(
        &self,
        volume: VolumeId,
        opts: &ImageOptions,
    ) -> Result<PointInTimeImage> {
        self.open_at(At::LatestDurable, volume, opts)
    }

    /// Resolves `at` to a sequence, pins it and builds the image's region map, all under
    /// one lock of the journal state.
    fn open_at(&self, at: At, volume: VolumeId, opts: &ImageOptions) -> Result<PointInTimeImage> {
        let shared = self.shared().clone();
        let replica = shared
            .volumes
            .get(&volume)
            .ok_or(JournalError::UnknownVolume(volume))?
            .clone();
        let (seq, metas, segments, salts, pin) = {
            let mut st = shared.lock();
            let seq = match at {
                At::Checkpoint(id) => st.usable_checkpoint(id)?,
                // Promotion never goes past the durable position, so it is never below
                // the usable floor.
                At::LatestDurable => st.durable_seq,
            };
            *st.pins.entry(seq).or_insert(0) += 1;
            let pin = PinGuard {
                shared: shared.clone(),
                seq,
            };
            let floor = st.replica_seq;
            let metas: Vec<_> = st
                .writes
                .iter()
                .take_while(|w| w.seq <= seq)
                .filter(|w| w.volume == volume && w.seq > floor)
                .copied()
                .collect();
            let mut segments = HashMap::new();
            let mut salts = HashMap::new();
            for (sid, s) in &st.segments {
                if let Some(f) = &s.file {
                    segments.insert(*sid, f.clone());
                    salts.insert(*sid, s.header.salt);
                }
            }
            (seq, metas, segments, salts, pin)
        };
        let mut base = ExtentMap::new();
        for m in &metas {
            if let Source::Journal { segment, .. } = m.src
                && !segments.contains_key(&segment)
            {
                return Err(JournalError::Corrupt {
                    segment,
                    offset: m.frame.offset,
                    reason: "segment of an indexed record is missing".into(),
                });
            }
            base.insert(m.offset, m.len, m.src);
        }
        if opts.verify {
            let max = shared.cfg.max_payload;
            let mut buf = Vec::new();
            for m in metas
                .iter()
                .filter(|m| matches!(m.src, Source::Journal { .. }))
            {
                let segment = m.frame.segment;
                let file = &segments[&segment];
                let seed = crc_seed(salts[&segment]);
                buf.resize(usize::try_from(m.frame_len).unwrap_or(0), 0);
                let corrupt = |reason: &str| JournalError::Corrupt {
                    segment,
                    offset: m.frame.offset,
                    reason: reason.to_string(),
                };
                file.read_exact_at(&mut buf, m.frame.offset)
                    .map_err(|e| JournalError::io("read segment", PathBuf::new(), e))?;
                let h = RecordHeader::decode(&buf[..RECORD_HEADER_LEN], seed, max)
                    .map_err(|_| corrupt("record header checksum mismatch on read"))?;
                if h.seq != m.seq
                    || crc32c::crc32c_append(seed, &buf[RECORD_HEADER_LEN..]) != h.payload_crc
                {
                    return Err(corrupt("record payload checksum mismatch on read"));
                }
            }
        }
        let overlay = match &opts.scratch_dir {
            Some(dir) => {
                let file = tempfile::tempfile_in(dir)
                    .map_err(|e| JournalError::io("create scratch overlay", dir, e))?;
                file.set_len(replica.spec.size)
                    .map_err(|e| JournalError::io("size scratch overlay", dir, e))?;
                Some(Overlay {
                    file,
                    map: RwLock::new(ExtentMap::new()),
                })
            }
            None => None,
        };
        let checkpoint = match at {
            At::Checkpoint(id) => Some(id),
            At::LatestDurable => None,
        };
        match checkpoint {
            Some(id) => info!(
                checkpoint = id.0,
                volume = volume.0,
                seq = seq.0,
                records = metas.len(),
                extents = base.len(),
                overlay = overlay.is_some(),
                "opened point-in-time image"
            ),
            // Delta sync opens many of these: keep them out of the info log.
            None => debug!(
                volume = volume.0,
                seq = seq.0,
                records = metas.len(),
                extents = base.len(),
                overlay = overlay.is_some(),
                "opened latest durable image"
            ),
        }
        Ok(PointInTimeImage {
            inner: Arc::new(ImageInner {
                volume,
                checkpoint,
                seq,
                size: replica.spec.size,
                base,
                segments,
                replica: replica.file.clone(),
                overlay,
                prefetched_to: AtomicU64::new(0),
                _pin: pin,
            }),
        })
    }
}

/// Reads at least this large trigger journal prefetch.
const PREFETCH_MIN: usize = 128 << 10;
/// How far ahead of a large read the journal pieces are prefetched.
const PREFETCH_WINDOW: u64 = 16 << 20;

fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    if offset.checked_add(len).is_none_or(|e| e > size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} outside image of size {size}"),
        ));
    }
    Ok(())
}

impl ImageInner {
    fn read_base(&self, offset: u64, buf: &mut [u8], pieces: &mut Vec<Piece>) -> io::Result<()> {
        self.base.lookup(offset, buf.len() as u64, pieces);
        for p in pieces.iter() {
            let at = (p.start - offset) as usize;
            let dst = &mut buf[at..at + p.len as usize];
            match p.src {
                None => self.replica.read_exact_at(dst, p.start)?,
                Some(Source::Zero) => dst.fill(0),
                Some(Source::Journal { segment, pos }) => {
                    let f = self.segments.get(&segment).ok_or_else(|| {
                        io::Error::other(format!("segment {segment} not held by image"))
                    })?;
                    f.read_exact_at(dst, pos)?;
                }
                Some(Source::Scratch) => {
                    return Err(io::Error::other("scratch extent in base map"));
                }
            }
        }
        Ok(())
    }

    /// Sequential readers: asks the kernel to start reading the journal pieces of the
    /// next [`PREFETCH_WINDOW`] now, so that those scattered reads proceed in parallel
    /// (the replica is mostly sequential and gets the kernel's own readahead). Advice
    /// only: a failure costs speed, never correctness.
    fn prefetch(&self, offset: u64, len: u64, pieces: &mut Vec<Piece>) {
        let done = self.prefetched_to.load(Ordering::Relaxed);
        let from = if (offset..=offset + PREFETCH_WINDOW).contains(&done) {
            done
        } else {
            offset
        };
        let to = (offset + len + PREFETCH_WINDOW).min(self.size);
        if to <= from || (from != offset && to - from < PREFETCH_WINDOW / 4) {
            return;
        }
        self.prefetched_to.store(to, Ordering::Relaxed);
        self.base.lookup(from, to - from, pieces);
        for p in pieces.iter() {
            if let (Some(Source::Journal { segment, pos }), Some(n)) =
                (p.src, NonZeroU64::new(p.len))
                && let Some(f) = self.segments.get(&segment)
            {
                let _ = fadvise(&**f, pos, Some(n), Advice::WillNeed);
            }
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let mut pieces = Vec::new();
        if buf.len() >= PREFETCH_MIN && !self.base.is_empty() {
            self.prefetch(offset, buf.len() as u64, &mut pieces);
        }
        let Some(ov) = &self.overlay else {
            return self.read_base(offset, buf, &mut pieces);
        };
        let mut top = Vec::new();
        ov.map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .lookup(offset, buf.len() as u64, &mut top);
        for p in &top {
            let at = (p.start - offset) as usize;
            let dst = &mut buf[at..at + p.len as usize];
            match p.src {
                None => self.read_base(p.start, dst, &mut pieces)?,
                Some(Source::Zero) => dst.fill(0),
                Some(Source::Scratch) => ov.file.read_exact_at(dst, p.start)?,
                Some(Source::Journal { .. }) => {
                    return Err(io::Error::other("journal extent in overlay map"));
                }
            }
        }
        Ok(())
    }

    fn overlay(&self) -> io::Result<&Overlay> {
        self.overlay.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "point-in-time image without scratch overlay is read-only",
            )
        })
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        check_range(self.size, offset, data.len() as u64)?;
        let ov = self.overlay()?;
        ov.file.write_all_at(data, offset)?;
        ov.map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(offset, data.len() as u64, Source::Scratch);
        Ok(())
    }

    fn zero_at(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        let ov = self.overlay()?;
        ov.map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(offset, len, Source::Zero);
        Ok(())
    }
}

impl Drop for ImageInner {
    fn drop(&mut self) {
        debug!(
            checkpoint = self.checkpoint.map(|c| c.0),
            volume = self.volume.0,
            seq = self.seq.0,
            "closing point-in-time image"
        );
    }
}

impl PointInTimeImage {
    /// The volume this image is of.
    #[must_use]
    pub fn volume(&self) -> VolumeId {
        self.inner.volume
    }

    /// The checkpoint this image is at; `None` for an image opened with
    /// [`Journal::open_latest_image`], which is at a durable position, not a checkpoint.
    #[must_use]
    pub fn checkpoint(&self) -> Option<CheckpointId> {
        self.inner.checkpoint
    }

    /// The sequence the image is at (and pins): its checkpoint's, or for a latest image
    /// the durable position when it was opened. Every record up to it is in the image,
    /// none after it.
    #[must_use]
    pub fn seq(&self) -> Seq {
        self.inner.seq
    }

    /// Size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Whether the image takes writes (has a scratch overlay).
    #[must_use]
    pub fn is_writable(&self) -> bool {
        self.inner.overlay.is_some()
    }

    /// Number of journal extents in the image's region map.
    #[must_use]
    pub fn journal_extents(&self) -> usize {
        self.inner.base.len()
    }

    /// Reads `buf.len()` bytes at `offset` (blocking).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }

    /// Writes into the scratch overlay (blocking); fails on a read-only image.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.inner.write_at(offset, data)
    }

    /// Zeroes a range in the scratch overlay; fails on a read-only image.
    pub fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.zero_at(offset, len)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("image io task failed: {e}")))?
}

/// The NBD export of an image. Flush is a no-op: the scratch overlay is thrown away
/// with the image, so there is nothing to make durable.
impl BlockDevice for PointInTimeImage {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn is_read_only(&self) -> bool {
        self.inner.overlay.is_none()
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || {
            let mut buf = vec![0u8; len as usize];
            inner.read_at(offset, &mut buf)?;
            Ok(Bytes::from(buf))
        }))
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> IoFuture<'_, ()> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || inner.write_at(offset, &data)))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn trim(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || inner.zero_at(offset, len)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> IoFuture<'_, ()> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || inner.zero_at(offset, len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Generation, JournalConfig, RecordBody, VolumeSpec};

    /// A record that is written but whose group fsync has not completed is not in a latest
    /// image. The committer moves the durable position only after the fsync; the test
    /// holds it back by hand (nothing is pending, so the committer does not touch it).
    #[test]
    fn latest_image_leaves_out_records_not_yet_durable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let size = 64 << 10;
        let cfg = JournalConfig::new(vec![VolumeSpec {
            id: VolumeId(0),
            size,
            replica_path: tmp.path().join("vol0.img"),
        }]);
        let j = Journal::open(tmp.path().join("journal"), cfg).expect("open");
        let write = |seq: u64, byte: u8| {
            j.submit(
                Seq(seq),
                Generation(1),
                RecordBody::Write {
                    volume: VolumeId(0),
                    offset: (seq - 1) * 4096,
                    data: Bytes::from(vec![byte; 4096]),
                },
            )
            .expect("submit");
        };
        write(1, 0x11);
        write(2, 0x22);
        write(3, 0x33);
        j.wait_durable_blocking(Seq(3)).expect("durable");
        j.shared().lock().durable_seq = Seq(2);
        let img = j
            .open_latest_image(VolumeId(0), &ImageOptions::default())
            .expect("latest image");
        j.shared().lock().durable_seq = Seq(3);
        assert_eq!(img.seq(), Seq(2));
        assert_eq!(img.checkpoint(), None);
        let mut buf = vec![0u8; 3 * 4096];
        img.read_at(0, &mut buf).expect("read");
        assert!(buf[..4096].iter().all(|&b| b == 0x11));
        assert!(buf[4096..8192].iter().all(|&b| b == 0x22));
        assert!(
            buf[8192..].iter().all(|&b| b == 0),
            "a record not yet durable is in the latest image"
        );
        let now = j
            .open_latest_image(VolumeId(0), &ImageOptions::default())
            .expect("latest image");
        now.read_at(0, &mut buf).expect("read");
        assert!(buf[8192..].iter().all(|&b| b == 0x33));
        drop((img, now));
        j.close().expect("close");
    }
}
