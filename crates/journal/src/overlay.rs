//! Durable overlays: what a recovered VM writes to its volume before the recovery is
//! committed, kept apart from the replica and the journal (so that a rollback leaves both
//! as they were) and surviving a crash of the VRA. An overlay is a sparse file the size of
//! the volume; its allocated blocks are the blocks written, so after a restart the map of
//! what was written is rebuilt from the file itself (`SEEK_DATA` / `SEEK_HOLE`), with no
//! log beside it. For that to hold, the overlay only ever writes whole blocks of
//! [`OVERLAY_BLOCK`] bytes: a write that covers part of a block is completed with the
//! block's current content (the overlay's, else the base image's) first, and zeroes are
//! written as zero data. Flush is `fdatasync`. [`OverlayImage`] serves a read-only
//! point-in-time image with an overlay on top over NBD.
//!
//! A volume whose size is not a whole number of blocks gets a file rounded up to one; the
//! padding past the volume's end is zeroes and never read.
//!
//! The file system must report allocation exactly (ext4, xfs, tmpfs do for blocks written
//! with `pwrite` into a file of fixed size).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use rustix::fs::SeekFrom;
use tandem_nbd::{BlockDevice, IoFuture};

use crate::extents::{ExtentMap, Source};
use crate::pit::PointInTimeImage;

/// The unit an overlay writes in.
pub const OVERLAY_BLOCK: u64 = 4096;

/// Zeroes are written in pieces of at most this many bytes.
const ZERO_CHUNK: u64 = 1 << 20;

/// Reads the image under an overlay: `(offset, buffer)`.
pub type BaseRead<'a> = &'a (dyn Fn(u64, &mut [u8]) -> io::Result<()> + Sync);

/// A volume's durable overlay (see the module docs).
#[derive(Debug)]
pub struct DurableOverlay {
    path: PathBuf,
    file: File,
    size: u64,
    /// The blocks written (as `Source::Scratch` extents).
    written: RwLock<ExtentMap>,
    /// Serializes writes: a partial block is read, completed and written as one.
    writing: Mutex<()>,
}

fn range_check(size: u64, offset: u64, len: u64) -> io::Result<()> {
    if offset.checked_add(len).is_none_or(|e| e > size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} outside a volume of {size} bytes"),
        ));
    }
    Ok(())
}

impl DurableOverlay {
    /// Opens the overlay at `path` for a volume of `size` bytes, creating it empty if it
    /// does not exist; an existing one keeps what was written (and flushed) into it.
    pub fn open(path: impl AsRef<Path>, size: u64) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        if size == 0 || !size.is_multiple_of(512) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an overlay's volume size must be a positive multiple of 512",
            ));
        }
        let file_len = size.div_ceil(OVERLAY_BLOCK) * OVERLAY_BLOCK;
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let len = file.metadata()?.len();
        if existed && len != file_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "overlay {} holds {len} bytes, its volume {size}",
                    path.display()
                ),
            ));
        }
        if !existed {
            file.set_len(file_len)?;
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        let written = allocated(&file, file_len)?;
        Ok(Self {
            path,
            file,
            size,
            written: RwLock::new(written),
            writing: Mutex::new(()),
        })
    }

    /// Its file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The ranges written so far, in order and coalesced, each a whole number of blocks
    /// (the last may end at the volume's end instead).
    pub fn written(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for mut p in self.map().iter() {
            p.len = p.len.min(self.size.saturating_sub(p.start));
            if p.len == 0 {
                continue;
            }
            match out.last_mut() {
                Some((start, len)) if *start + *len == p.start => *len += p.len,
                _ => out.push((p.start, p.len)),
            }
        }
        out
    }

    /// Bytes written so far.
    pub fn written_bytes(&self) -> u64 {
        self.written().iter().map(|(_, len)| len).sum()
    }

    /// Whether anything in `[offset, offset + len)` was written here.
    pub fn holds(&self, offset: u64, len: u64) -> bool {
        self.map().intersects(offset, len)
    }

    /// Forgets `[offset, offset + len)` (whole blocks, or up to the volume's end): reads
    /// of it go to the base again and its blocks are deallocated. Durable after
    /// [`Self::flush`]; the caller makes the base hold the range durably first (a merge).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        range_check(self.size, offset, len)?;
        let end = if offset + len == self.size {
            self.size.div_ceil(OVERLAY_BLOCK) * OVERLAY_BLOCK
        } else {
            offset + len
        };
        if !offset.is_multiple_of(OVERLAY_BLOCK) || !end.is_multiple_of(OVERLAY_BLOCK) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("discard of {offset}+{len}: not whole overlay blocks"),
            ));
        }
        let _one = self
            .writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            offset,
            end - offset,
        )?;
        self.written
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(offset, end - offset);
        Ok(())
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, ExtentMap> {
        self.written
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads `buf.len()` bytes at `offset`: what was written here, else the base image.
    pub fn read(&self, base: BaseRead<'_>, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        range_check(self.size, offset, buf.len() as u64)?;
        let mut pieces = Vec::new();
        self.map().lookup(offset, buf.len() as u64, &mut pieces);
        for p in &pieces {
            let at = (p.start - offset) as usize;
            let dst = &mut buf[at..at + p.len as usize];
            match p.src {
                Some(_) => self.file.read_exact_at(dst, p.start)?,
                None => base(p.start, dst)?,
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` (whole blocks; a partial block is completed from what it
    /// holds now). Durable after [`Self::flush`].
    pub fn write(&self, base: BaseRead<'_>, offset: u64, data: &[u8]) -> io::Result<()> {
        range_check(self.size, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let _one = self
            .writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = offset / OVERLAY_BLOCK * OVERLAY_BLOCK;
        let end = (offset + data.len() as u64).div_ceil(OVERLAY_BLOCK) * OVERLAY_BLOCK;
        if start == offset && end == offset + data.len() as u64 {
            self.file.write_all_at(data, offset)?;
        } else {
            let mut whole = vec![0u8; (end - start) as usize];
            // Only the first and the last block can be partial: read just those, and
            // only what lies within the volume (the rest is padding).
            let head = (OVERLAY_BLOCK.min(self.size - start)) as usize;
            self.read(base, start, &mut whole[..head])?;
            if end - start > OVERLAY_BLOCK {
                let tail = end - OVERLAY_BLOCK;
                let n = (OVERLAY_BLOCK.min(self.size - tail)) as usize;
                let at = (tail - start) as usize;
                self.read(base, tail, &mut whole[at..at + n])?;
            }
            let at = (offset - start) as usize;
            whole[at..at + data.len()].copy_from_slice(data);
            self.file.write_all_at(&whole, start)?;
        }
        self.written
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(start, end - start, Source::Scratch);
        Ok(())
    }

    /// Writes `len` zero bytes at `offset` (as data: the blocks count as written).
    pub fn write_zeroes(&self, base: BaseRead<'_>, offset: u64, len: u64) -> io::Result<()> {
        range_check(self.size, offset, len)?;
        let zeroes = vec![0u8; ZERO_CHUNK.min(len) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = ZERO_CHUNK.min(offset + len - at);
            self.write(base, at, &zeroes[..n as usize])?;
            at += n;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Removes the overlay's file (a rollback, or a commit that merged it).
    pub fn remove(self) -> io::Result<()> {
        let path = self.path.clone();
        drop(self);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The allocated ranges of `file`, whole blocks, as `Source::Scratch` extents.
fn allocated(file: &File, size: u64) -> io::Result<ExtentMap> {
    let mut map = ExtentMap::new();
    let mut at = 0;
    while at < size {
        let data = match rustix::fs::seek(file, SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = rustix::fs::seek(file, SeekFrom::Hole(data))?.min(size);
        // Whole blocks only: the overlay never allocates part of one.
        let start = data / OVERLAY_BLOCK * OVERLAY_BLOCK;
        let end = hole.div_ceil(OVERLAY_BLOCK) * OVERLAY_BLOCK;
        map.insert(start, end.min(size) - start, Source::Scratch);
        at = hole.max(data + 1);
    }
    Ok(map)
}

/// A read-only point-in-time image with a durable overlay on top, served over NBD: the
/// volume of a recovered VM before commit.
#[derive(Debug, Clone)]
pub struct OverlayImage {
    base: PointInTimeImage,
    overlay: Arc<DurableOverlay>,
}

impl OverlayImage {
    /// `base` and `overlay` must be of the same volume size.
    pub fn new(base: PointInTimeImage, overlay: Arc<DurableOverlay>) -> io::Result<Self> {
        if base.size() != overlay.size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "image of {} bytes under an overlay of {}",
                    base.size(),
                    overlay.size()
                ),
            ));
        }
        Ok(Self { base, overlay })
    }

    /// The overlay.
    pub fn overlay(&self) -> &Arc<DurableOverlay> {
        &self.overlay
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&PointInTimeImage, &DurableOverlay) -> io::Result<T> + Send + 'static,
    ) -> IoFuture<'_, T> {
        let (base, overlay) = (self.base.clone(), self.overlay.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&base, &overlay))
                .await
                .map_err(|e| io::Error::other(format!("overlay io task failed: {e}")))?
        })
    }
}

fn base_of(image: &PointInTimeImage) -> impl Fn(u64, &mut [u8]) -> io::Result<()> + Sync + '_ {
    move |offset, buf| image.read_at(offset, buf)
}

impl BlockDevice for OverlayImage {
    fn size(&self) -> u64 {
        self.overlay.size()
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        self.run(move |base, ov| {
            let mut buf = vec![0u8; len as usize];
            ov.read(&base_of(base), offset, &mut buf)?;
            Ok(Bytes::from(buf))
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        self.run(move |base, ov| {
            ov.write(&base_of(base), offset, &data)?;
            if fua { ov.flush() } else { Ok(()) }
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.run(|_, ov| ov.flush())
    }

    fn trim(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.run(move |base, ov| ov.write_zeroes(&base_of(base), offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        self.run(move |base, ov| {
            ov.write_zeroes(&base_of(base), offset, len)?;
            if fua { ov.flush() } else { Ok(()) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    const SIZE: u64 = 1 << 20;

    fn base_image(seed: u64) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..SIZE).map(|_| rng.r#gen()).collect()
    }

    fn reader(base: &[u8]) -> impl Fn(u64, &mut [u8]) -> io::Result<()> + Sync + '_ {
        move |offset, buf| {
            buf.copy_from_slice(&base[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    fn contents(ov: &DurableOverlay, base: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; SIZE as usize];
        ov.read(&reader(base), 0, &mut out).expect("read");
        out
    }

    /// Random writes, unaligned ones and zeroes among them, against a model of the
    /// volume; then the overlay is reopened (as after a crash of its VRA, its writes
    /// flushed) and still reads the same, with the written map rebuilt from the file.
    #[test]
    fn reads_what_was_written_over_the_base_and_after_a_reopen() {
        let seed = std::env::var("TANDEM_OVERLAY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        eprintln!(
            "seed {seed}; rerun: TANDEM_OVERLAY_SEED={seed} cargo nextest run -p tandem-journal overlay"
        );
        let mut rng = StdRng::seed_from_u64(seed);
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("vm-0-0.overlay");
        let base = base_image(seed ^ 1);
        let mut model = base.clone();
        let ov = DurableOverlay::open(&path, SIZE).expect("open");
        assert!(ov.written().is_empty());
        assert_eq!(
            contents(&ov, &base),
            base,
            "an empty overlay reads the base"
        );
        for _ in 0..60 {
            let offset = rng.gen_range(0..SIZE - 1);
            let len = rng.gen_range(1..=(SIZE - offset).min(16_000));
            if rng.gen_bool(0.2) {
                ov.write_zeroes(&reader(&base), offset, len).expect("zero");
                model[offset as usize..(offset + len) as usize].fill(0);
            } else {
                let data: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
                ov.write(&reader(&base), offset, &data).expect("write");
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
        }
        assert_eq!(contents(&ov, &base), model);
        ov.flush().expect("flush");
        let written = ov.written();
        assert!(
            written
                .iter()
                .all(|(s, l)| s.is_multiple_of(OVERLAY_BLOCK) && l.is_multiple_of(OVERLAY_BLOCK))
        );
        drop(ov);
        let ov = DurableOverlay::open(&path, SIZE).expect("reopen");
        assert_eq!(
            ov.written(),
            written,
            "the written map rebuilt from the file"
        );
        assert_eq!(contents(&ov, &base), model, "content after the reopen");
        ov.remove().expect("remove");
        assert!(!path.exists());
    }

    #[test]
    fn a_partial_block_keeps_the_rest_of_the_block_from_the_base() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = base_image(7);
        let ov = DurableOverlay::open(tmp.path().join("o"), SIZE).expect("open");
        ov.write(&reader(&base), 4096 + 100, &[0xee; 10])
            .expect("write");
        assert_eq!(ov.written(), [(4096, 4096)]);
        let mut block = vec![0u8; 4096];
        ov.read(&reader(&base), 4096, &mut block).expect("read");
        let mut want = base[4096..8192].to_vec();
        want[100..110].fill(0xee);
        assert_eq!(block, want);
    }

    #[test]
    fn bad_ranges_and_sizes_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = base_image(3);
        assert!(DurableOverlay::open(tmp.path().join("odd"), 1000).is_err());
        let path = tmp.path().join("o");
        let ov = DurableOverlay::open(&path, SIZE).expect("open");
        assert!(ov.write(&reader(&base), SIZE - 1, &[1, 2]).is_err());
        assert!(ov.write_zeroes(&reader(&base), u64::MAX, 2).is_err());
        let mut buf = [0u8; 2];
        assert!(ov.read(&reader(&base), SIZE - 1, &mut buf).is_err());
        drop(ov);
        assert!(
            DurableOverlay::open(&path, SIZE * 2).is_err(),
            "an overlay of another size is not reused"
        );
    }

    /// A volume of a size that is not whole blocks: its last block is written partly, and
    /// discarding what was written (a merge) gives the base back, also after a reopen.
    #[test]
    fn a_volume_that_ends_mid_block_and_discards() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let size = SIZE - 512;
        let base = base_image(11);
        let base = &base[..size as usize];
        let path = tmp.path().join("o");
        let ov = DurableOverlay::open(&path, size).expect("open");
        ov.write(&reader(base), size - 100, &[0xab; 100])
            .expect("write the end");
        ov.write(&reader(base), 8192, &[0xcd; 4096]).expect("write");
        assert_eq!(ov.written(), [(8192, 4096), (size - 3584, 3584)]);
        let mut tail = vec![0u8; 3584];
        ov.read(&reader(base), size - 3584, &mut tail)
            .expect("read");
        let mut want = base[(size - 3584) as usize..].to_vec();
        want[3484..].fill(0xab);
        assert_eq!(tail, want);
        assert!(ov.holds(8000, 200) && !ov.holds(0, 8192));
        assert!(ov.discard(8192, 100).is_err(), "part of a block");
        ov.discard(size - 3584, 3584).expect("discard the end");
        ov.flush().expect("flush");
        assert_eq!(ov.written(), [(8192, 4096)]);
        drop(ov);
        let ov = DurableOverlay::open(&path, size).expect("reopen");
        assert_eq!(ov.written(), [(8192, 4096)]);
        ov.discard(8192, 4096).expect("discard");
        let mut all = vec![0u8; size as usize];
        ov.read(&reader(base), 0, &mut all).expect("read");
        assert_eq!(all, base, "nothing written is left");
    }

    /// Over a real image at a checkpoint: writes through the NBD device land in the
    /// overlay only; the replica and the journal are as they were.
    #[test]
    fn an_overlay_image_keeps_the_replica_and_the_journal_as_they_were() {
        use crate::{
            Checkpoint, CheckpointId, CheckpointKind, Generation, ImageOptions, Journal,
            JournalConfig, RecordBody, Seq, UnixMillis, VolumeId, VolumeSpec,
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        let size = 64 << 10;
        let replica = tmp.path().join("vol0.img");
        let cfg = JournalConfig::new(vec![VolumeSpec {
            id: VolumeId(0),
            size,
            replica_path: replica.clone(),
        }]);
        let j = Journal::open(tmp.path().join("journal"), cfg).expect("open");
        let record = RecordBody::Write {
            volume: VolumeId(0),
            offset: 0,
            data: Bytes::from(vec![0x11; 8192]),
        };
        j.submit(Seq(1), Generation(1), record).expect("write");
        let cp = Checkpoint {
            id: CheckpointId(7),
            timestamp: UnixMillis(1),
            kind: CheckpointKind::Automatic,
            name: None,
            vm: None,
        };
        j.submit(Seq(2), Generation(1), RecordBody::Checkpoint(cp))
            .expect("checkpoint");
        j.wait_durable_blocking(Seq(2)).expect("durable");
        let records = j.read_records().expect("records").len();
        let replica_before = std::fs::read(&replica).expect("replica");
        let image = j
            .open_image(CheckpointId(7), VolumeId(0), &ImageOptions::default())
            .expect("image");
        let ov = Arc::new(DurableOverlay::open(tmp.path().join("ov"), size).expect("overlay"));
        let dev = OverlayImage::new(image, ov.clone()).expect("device");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            dev.write(4096 + 10, Bytes::from(vec![0x22; 100]), true)
                .await
                .expect("write");
            dev.write_zeroes(16384, 4096, false).await.expect("zeroes");
            dev.flush().await.expect("flush");
            let got = dev.read(0, 20480).await.expect("read");
            let mut want = vec![0x11; 8192];
            want[4096 + 10..4096 + 110].fill(0x22);
            want.resize(20480, 0);
            assert_eq!(got.as_ref(), want.as_slice());
        });
        assert_eq!(ov.written(), [(4096, 4096), (16384, 4096)]);
        drop(dev);
        assert_eq!(std::fs::read(&replica).expect("replica"), replica_before);
        assert_eq!(j.read_records().expect("records").len(), records);
        j.close().expect("close");
    }
}
