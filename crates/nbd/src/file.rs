//! A block device backed by a raw image file.
//!
//! Reads and writes are positioned (`pread`/`pwrite` through [`FileExt`]). Requests of up
//! to 1 MiB are first tried in place, on the calling thread: reads with `RWF_NOWAIT`,
//! which succeeds only when the page cache can serve them without blocking; writes with
//! `RWF_NOWAIT` too, or, where the file system refuses it for buffered writes (ext4), with
//! a plain `pwrite` guarded against dirty-page throttling (see `Inner::write_in_place`).
//! In the common cached case that saves a hand-off to another thread, which costs more
//! CPU than the copy itself. Whatever cannot be done in place runs on the device's own
//! threads: four for reads and syncs, one for writes, trims and write-zeroes (buffered
//! writes to one file are serialized by its inode lock anyway, and threads contending
//! for it spin). Flush and FUA call `fdatasync`. Trim punches a hole and write-zeroes
//! zeroes the range in place (`fallocate`), both falling back to writing zeroes where the
//! file system cannot. The threads are joined when the last handle is dropped.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;

use crate::{
    device::{BlockDevice, IoFuture},
    error::NbdError,
    pool::IoPool,
};

/// Zeroes are written from a buffer of this size when `fallocate` is not available.
const ZERO_CHUNK: usize = 1024 * 1024;
/// An in-place write slower than this suspends in-place writes (see `write_in_place`).
const SLOW_IN_PLACE: Duration = Duration::from_millis(20);
/// How long in-place writes stay suspended after a slow one.
const IN_PLACE_BACKOFF: Duration = Duration::from_secs(1);
/// Threads per device for blocking calls.
const IO_THREADS: usize = 4;
/// Reads and writes up to this size are first tried in place: reads with `RWF_NOWAIT`,
/// writes with `RWF_NOWAIT` or, where that is refused, a guarded plain write. Copying 1 MiB
/// into the page cache takes a few hundred microseconds; handing it to another thread
/// costs more CPU than that (wake-ups, and the payload read on a cold cache).
const NOWAIT_MAX: usize = 1024 * 1024;

/// A raw image file served as a block device. Its size is the file's length when opened.
#[derive(Debug, Clone)]
pub struct FileDevice {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    /// Threads for blocking reads and syncs.
    pool: IoPool,
    /// The thread for blocking writes, trims and write-zeroes.
    write_pool: IoPool,
    /// Cleared when the kernel or file system does not support `RWF_NOWAIT` reads.
    nowait_read: AtomicBool,
    /// Cleared when it does not support `RWF_NOWAIT` writes (buffered writes often not).
    nowait_write: AtomicBool,
    /// Base of the clock below.
    epoch: Instant,
    /// Nanoseconds after `epoch` until which in-place writes are suspended.
    in_place_suspended_until: AtomicU64,
}

impl FileDevice {
    /// Opens an existing image for reading and writing.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NbdError> {
        Self::open_with(path.as_ref(), false)
    }

    /// Opens an existing image read-only; writes are refused with `EPERM`.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self, NbdError> {
        Self::open_with(path.as_ref(), true)
    }

    /// Creates a new sparse image of `size` bytes (the file must not exist) and opens it.
    pub fn create_sparse(path: impl AsRef<Path>, size: u64) -> Result<Self, NbdError> {
        create_sparse_file(path.as_ref(), size)?;
        Self::open(path)
    }

    fn open_with(path: &Path, read_only: bool) -> Result<Self, NbdError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(NbdError::file(path))?;
        let metadata = file.metadata().map_err(NbdError::file(path))?;
        if !metadata.is_file() {
            return Err(NbdError::File {
                path: path.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                file,
                path: path.to_owned(),
                size: metadata.len(),
                read_only,
                pool: IoPool::new("nbd-file-io", IO_THREADS).map_err(NbdError::file(path))?,
                write_pool: IoPool::new("nbd-file-write", 1).map_err(NbdError::file(path))?,
                nowait_read: AtomicBool::new(cfg!(target_os = "linux")),
                nowait_write: AtomicBool::new(cfg!(target_os = "linux")),
                epoch: Instant::now(),
                in_place_suspended_until: AtomicU64::new(0),
            }),
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T, F>(&self, op: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        self.inner.pool.run(move || op(&inner)).await
    }

    /// Like `blocking`, on the device's single writer thread: buffered writes to one file
    /// are serialized by the kernel anyway (the inode lock), and several threads
    /// contending for it spin and burn far more CPU than one thread writing in turn.
    async fn blocking_write<T, F>(&self, op: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        self.inner.write_pool.run(move || op(&inner)).await
    }
}

/// Creates a new sparse file of `size` bytes; fails if the file exists.
pub fn create_sparse_file(path: impl AsRef<Path>, size: u64) -> Result<(), NbdError> {
    let path = path.as_ref();
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(NbdError::file(path))?;
    file.set_len(size).map_err(NbdError::file(path))?;
    Ok(())
}

impl Inner {
    /// Appends to `buf` what the page cache holds from `offset + buf.len()` on, without
    /// blocking (`RWF_NOWAIT`), until `buf` holds `len` bytes or a read would block.
    fn read_nowait(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        while buf.len() < len && self.nowait_read.load(Ordering::Relaxed) {
            match preadv2_nowait(&self.file, buf, len, offset + buf.len() as u64) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => match rustix::io::Errno::from_io_error(&e) {
                    Some(rustix::io::Errno::AGAIN) => break,
                    Some(rustix::io::Errno::INTR) => {}
                    Some(
                        rustix::io::Errno::OPNOTSUPP
                        | rustix::io::Errno::NOSYS
                        | rustix::io::Errno::INVAL,
                    ) => self.nowait_read.store(false, Ordering::Relaxed),
                    _ => return Err(e),
                },
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (buf, offset, len);
        Ok(())
    }

    /// Writes `data` at `offset` without blocking, as far as the kernel allows; returns
    /// how many bytes were written (possibly none).
    fn write_nowait(&self, data: &[u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        #[cfg(target_os = "linux")]
        while done < data.len() && self.nowait_write.load(Ordering::Relaxed) {
            use rustix::io::{Errno, ReadWriteFlags, pwritev2};
            let slices = [io::IoSlice::new(&data[done..])];
            match pwritev2(
                &self.file,
                &slices,
                offset + done as u64,
                ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => {}
                Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {
                    self.nowait_write.store(false, Ordering::Relaxed);
                }
                Err(err) => return Err(err.into()),
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (data, offset);
        Ok(done)
    }

    /// Where `RWF_NOWAIT` writes are not supported (ext4 buffered writes, for one), writes
    /// a small buffer in place with a plain `pwrite`: into the page cache that takes a few
    /// microseconds, far less than a hand-off to a pool thread and back. It can block when
    /// the kernel throttles dirty pages, so a write slower than [`SLOW_IN_PLACE`] suspends
    /// in-place writes for [`IN_PLACE_BACKOFF`]; meanwhile writes go to the pool. Returns
    /// how many bytes were written (none while suspended).
    fn write_in_place(&self, data: &[u8], offset: u64) -> io::Result<usize> {
        let now = self.epoch.elapsed();
        if now.as_nanos() < u128::from(self.in_place_suspended_until.load(Ordering::Relaxed)) {
            return Ok(0);
        }
        self.file.write_all_at(data, offset)?;
        let took = self.epoch.elapsed().saturating_sub(now);
        if took > SLOW_IN_PLACE {
            let until = (now + took + IN_PLACE_BACKOFF).as_nanos();
            self.in_place_suspended_until
                .store(u64::try_from(until).unwrap_or(u64::MAX), Ordering::Relaxed);
            tracing::debug!(path = %self.path.display(), took = ?took, "slow in-place write; using the io pool for a while");
        }
        Ok(data.len())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "device is read-only",
            ))
        } else {
            Ok(())
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Zeroes a range: `fallocate` with `mode` where supported, else written zeroes.
    fn zero_range(&self, offset: u64, len: u64, punch_hole: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        #[cfg(target_os = "linux")]
        {
            use rustix::fs::{FallocateFlags, fallocate};
            let mode = if punch_hole {
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
            } else {
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
            };
            match fallocate(&self.file, mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(err)
                    if err == rustix::io::Errno::OPNOTSUPP
                        || err == rustix::io::Errno::NOSYS
                        || err == rustix::io::Errno::INVAL => {}
                Err(err) => return Err(err.into()),
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = punch_hole;
        self.write_zero_bytes(offset, len)
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        // The buffer is not zeroed first: reads fill it, and zeroing it cost a tenth of
        // a sync's CPU.
        let len = len as usize;
        let mut buf = Vec::with_capacity(len);
        if len <= NOWAIT_MAX {
            if let Err(err) = self.inner.read_nowait(&mut buf, offset, len) {
                return Box::pin(std::future::ready(Err(err)));
            }
            if buf.len() == len {
                return Box::pin(std::future::ready(Ok(Bytes::from(buf))));
            }
        }
        Box::pin(self.blocking(move |inner| {
            while buf.len() < len {
                let at = offset + buf.len() as u64;
                match rustix::io::pread(&inner.file, rustix::buffer::spare_capacity(&mut buf), at) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // The spare capacity may have been larger than asked for.
            buf.truncate(len);
            Ok(Bytes::from(buf))
        }))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        let mut done = 0;
        if !self.inner.read_only && !fua && data.len() <= NOWAIT_MAX {
            let written = match self.inner.write_nowait(&data, offset) {
                Ok(n) if n < data.len() && !self.inner.nowait_write.load(Ordering::Relaxed) => self
                    .inner
                    .write_in_place(&data[n..], offset + n as u64)
                    .map(|m| n + m),
                other => other,
            };
            match written {
                Ok(n) if n == data.len() => return Box::pin(std::future::ready(Ok(()))),
                Ok(n) => done = n,
                Err(err) => return Box::pin(std::future::ready(Err(err))),
            }
        }
        Box::pin(async move {
            self.blocking_write(move |inner| {
                inner.check_writable()?;
                inner.file.write_all_at(&data[done..], offset + done as u64)
            })
            .await?;
            if fua {
                self.blocking(|inner| inner.file.sync_data()).await?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.blocking(|inner| {
            if inner.read_only {
                return Ok(());
            }
            inner.file.sync_data()
        }))
    }

    fn trim(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.blocking_write(move |inner| {
            inner.check_writable()?;
            inner.zero_range(offset, len, true)
        }))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.blocking_write(move |inner| {
                inner.check_writable()?;
                inner.zero_range(offset, len, false)
            })
            .await?;
            if fua {
                self.blocking(|inner| inner.file.sync_data()).await?;
            }
            Ok(())
        })
    }
}

/// One `preadv2(RWF_NOWAIT)` into `buf`'s spare capacity, at most up to `len` bytes in
/// `buf`; returns how many bytes it read. Reading into uninitialized memory needs a raw
/// call: rustix's `preadv2` takes initialized slices only.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn preadv2_nowait(file: &File, buf: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let want = len.saturating_sub(buf.len());
    let spare = buf.spare_capacity_mut();
    let want = want.min(spare.len());
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: want,
    };
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
    // SAFETY: the one iovec covers the first `want` bytes of `buf`'s spare capacity,
    // memory the Vec owns and nothing else refers to while `buf` is borrowed mutably; the
    // kernel only writes into it.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: the kernel initialized the first `n` bytes of the spare capacity
    // (`n <= want <= spare.len()`).
    unsafe { buf.set_len(buf.len() + n.min(want)) };
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_write_trim_zero_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let device = FileDevice::create_sparse(&path, 1 << 20).unwrap();
        assert_eq!(device.size(), 1 << 20);
        device
            .write(4096, Bytes::from(vec![0xab; 8192]), true)
            .await
            .unwrap();
        assert_eq!(
            &device.read(4096, 8192).await.unwrap()[..],
            &[0xab; 8192][..]
        );
        device.trim(4096, 4096).await.unwrap();
        device.write_zeroes(8192 + 100, 200, false).await.unwrap();
        device.flush().await.unwrap();
        let data = device.read(4096, 8192).await.unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0));
        assert!(data[4096..4196].iter().all(|&b| b == 0xab));
        assert!(data[4196..4396].iter().all(|&b| b == 0));
        assert!(data[4396..].iter().all(|&b| b == 0xab));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    }

    #[tokio::test]
    async fn read_only_device_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.raw");
        create_sparse_file(&path, 65536).unwrap();
        let device = FileDevice::open_read_only(&path).unwrap();
        assert!(device.is_read_only());
        let err = device
            .write(0, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(create_sparse_file(&path, 1).is_err());
    }
}
