//! Appends a write batch to a segment file: whole blocks with direct IO (the data goes
//! from a reused aligned buffer to the disk, not through fresh page-cache pages, whose
//! first touch is most of a buffered append's cost), the last partial block with a
//! buffered write. Files therefore never hold padding, and their format does not depend on
//! how they were written.
//!
//! The block a batch starts in was partly written by the batch before; it is written again
//! whole, with the same bytes for its durable part, from the copy kept in memory (or read
//! back once after a restart or an error). Filesystems without direct IO get gathered
//! buffered writes.

use std::{
    fs::{File, OpenOptions},
    io::{self, IoSlice},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::Path,
    sync::mpsc,
};

use crate::{format::Frame, types::SegmentId};

/// Direct IO unit: offsets, lengths and buffer addresses are multiples of it (4 KiB suits
/// devices with 512-byte and 4 KiB logical blocks).
const BLOCK: usize = 4096;

/// Bytes staged before a direct write goes out (batches larger than this are written in
/// several direct writes).
const STAGING: usize = 4 << 20;

/// Smallest batch written with direct IO. Below it a direct write would add a device round
/// trip before the fsync's own, for little copying saved.
const DIRECT_FROM: usize = 256 << 10;

/// Most buffers one `pwritev` takes (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Appends batches to the segment files of one journal (owned by its committer).
#[derive(Debug, Default)]
pub(crate) struct Appender {
    /// Direct IO was refused by this journal's filesystem: buffered writes only.
    buffered_only: bool,
    /// The segment being appended to with direct IO.
    direct: Option<DirectSegment>,
    /// Staging buffers kept between batches (two while batches need more than one).
    spare: Vec<Stage>,
}

#[derive(Debug)]
struct DirectSegment {
    segment: SegmentId,
    file: File,
    /// The segment's bytes from the last block boundary up to its end (`end`).
    tail: Vec<u8>,
    /// Where the segment ends as far as this appender knows (`None` after an error).
    end: Option<u64>,
}

impl Appender {
    /// Writes `frames` back to back at `base` of `segment` (`file` is its buffered handle,
    /// `path` its name). Not durable until the file is synced.
    pub(crate) fn append<'a>(
        &mut self,
        segment: SegmentId,
        path: &Path,
        file: &File,
        base: u64,
        frames: impl Iterator<Item = &'a Frame> + Clone,
    ) -> io::Result<()> {
        let bytes: usize = frames.clone().map(Frame::len).sum();
        if !self.buffered_only && bytes >= DIRECT_FROM {
            match self.append_direct(segment, path, file, base, bytes, frames.clone()) {
                Ok(()) => return Ok(()),
                // The filesystem or device refuses direct IO (or this alignment): the
                // batch is written again, buffered, and so is every later one.
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    tracing::info!(error = %e, path = %path.display(), "direct IO refused; journal appends are buffered");
                    self.buffered_only = true;
                    self.direct = None;
                    self.spare = Vec::new();
                }
                Err(e) => {
                    if let Some(d) = &mut self.direct {
                        d.end = None;
                    }
                    return Err(e);
                }
            }
        }
        // The tail kept for direct writes is stale once the file grows without them.
        if let Some(d) = &mut self.direct {
            d.end = None;
        }
        write_gathered_at(file, frames, base)
    }

    fn append_direct<'a>(
        &mut self,
        segment: SegmentId,
        path: &Path,
        file: &File,
        base: u64,
        bytes: usize,
        frames: impl Iterator<Item = &'a Frame>,
    ) -> io::Result<()> {
        let d = match &mut self.direct {
            Some(d) if d.segment == segment => d,
            slot => slot.insert(DirectSegment {
                segment,
                file: OpenOptions::new()
                    .write(true)
                    .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                    .open(path)?,
                tail: Vec::new(),
                end: None,
            }),
        };
        let start = align_down(base);
        if d.end != Some(base) {
            d.tail = vec![0; (base - start) as usize];
            file.read_exact_at(&mut d.tail, start)?;
        }
        d.end = None;
        let mut spare = std::mem::take(&mut self.spare);
        let first = spare.pop().unwrap_or_else(Stage::new);
        let direct = &d.file;
        let head = &d.tail[..];
        let staged = if head.len() + bytes <= STAGING {
            // One direct write: nothing to overlap it with.
            let staged = stage_frames(first, head, start, frames, |mut full, at| {
                direct.write_all_at(full.window(), at)?;
                Ok(full)
            })?;
            direct.write_all_at(staged.whole(), staged.at)?;
            staged
        } else {
            std::thread::scope(|scope| {
                write_pipelined(scope, direct, first, &mut spare, head, start, frames)
            })?
        };
        let rest = staged.rest();
        if !rest.is_empty() {
            file.write_all_at(rest, staged.at + staged.whole().len() as u64)?;
        }
        d.tail.clear();
        d.tail.extend_from_slice(rest);
        d.end = Some(staged.at + staged.filled as u64);
        spare.push(staged.stage);
        spare.truncate(2);
        self.spare = spare;
        Ok(())
    }
}

/// Copies `head` (the bytes before `start + head.len()` in its block) and then `frames`
/// into staging buffers from `first` on, handing each full one to `flush` with the offset
/// it belongs at; `flush` returns the buffer to fill next. Returns the last buffer, partly
/// filled: its whole blocks and the rest are the caller's to write.
fn stage_frames<'a>(
    first: Stage,
    head: &[u8],
    start: u64,
    frames: impl Iterator<Item = &'a Frame>,
    mut flush: impl FnMut(Stage, u64) -> io::Result<Stage>,
) -> io::Result<Staged> {
    let mut staged = Staged {
        stage: first,
        at: start,
        filled: head.len(),
    };
    staged.stage.window()[..head.len()].copy_from_slice(head);
    for frame in frames {
        for mut part in [&frame.head[..], &frame.data[..]] {
            while !part.is_empty() {
                if staged.filled == STAGING {
                    let at = staged.at;
                    staged.stage = flush(std::mem::replace(&mut staged.stage, Stage::empty()), at)?;
                    staged.at += STAGING as u64;
                    staged.filled = 0;
                }
                let n = part.len().min(STAGING - staged.filled);
                staged.stage.window()[staged.filled..staged.filled + n].copy_from_slice(&part[..n]);
                staged.filled += n;
                part = &part[n..];
            }
        }
    }
    Ok(staged)
}

/// Stages and writes a batch larger than one staging buffer, copying into one buffer while
/// a writer thread writes the other: the disk is not left idle while the committer copies
/// (nor while it waits for a core to copy on). The writer inherits the committer's priority.
fn write_pipelined<'scope, 'a>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    direct: &'scope File,
    first: Stage,
    spare: &mut Vec<Stage>,
    head: &[u8],
    start: u64,
    frames: impl Iterator<Item = &'a Frame>,
) -> io::Result<Staged> {
    let (full_tx, full_rx) = mpsc::sync_channel::<(Stage, u64)>(1);
    let (done_tx, done_rx) = mpsc::channel::<(Stage, io::Result<()>)>();
    std::thread::Builder::new()
        .name("journal-write".into())
        .spawn_scoped(scope, move || {
            for (mut stage, at) in full_rx {
                let written = direct.write_all_at(stage.window(), at);
                let failed = written.is_err();
                // After a failure nothing more is written: the batch fails as a whole.
                if done_tx.send((stage, written)).is_err() || failed {
                    break;
                }
            }
        })?;
    let mut in_flight = 0usize;
    let settle = |spare: &mut Vec<Stage>| -> io::Result<()> {
        let (stage, written) = done_rx
            .recv()
            .map_err(|_| io::Error::other("journal writer stopped"))?;
        spare.push(stage);
        written
    };
    let staged = stage_frames(first, head, start, frames, |full, at| {
        if full_tx.send((full, at)).is_err() {
            // The writer stopped after a failed write: its error is among those waiting.
            for _ in 0..in_flight {
                settle(spare)?;
            }
            return Err(io::Error::other("journal writer stopped"));
        }
        in_flight += 1;
        if spare.is_empty() {
            settle(spare)?;
            in_flight -= 1;
        }
        Ok(spare.pop().unwrap_or_else(Stage::new))
    })?;
    drop(full_tx);
    // The last whole blocks go out from here, alongside the writer's last write.
    let last = direct.write_all_at(staged.whole(), staged.at);
    for _ in 0..in_flight {
        settle(spare)?;
    }
    last.map(|()| staged)
}

/// A staging buffer: `STAGING` bytes whose start is aligned for direct IO.
#[derive(Debug)]
struct Stage {
    buf: Vec<u8>,
    skip: usize,
}

impl Stage {
    fn new() -> Stage {
        let buf = vec![0; STAGING + BLOCK];
        // Moving the Vec does not move its memory, so the alignment holds.
        let skip = buf.as_ptr().align_offset(BLOCK);
        Stage { buf, skip }
    }

    /// A placeholder that is never written through.
    fn empty() -> Stage {
        Stage {
            buf: Vec::new(),
            skip: 0,
        }
    }

    fn window(&mut self) -> &mut [u8] {
        &mut self.buf[self.skip..self.skip + STAGING]
    }
}

/// The last staging buffer of a batch: `filled` bytes that belong at `at`.
#[derive(Debug)]
struct Staged {
    stage: Stage,
    at: u64,
    filled: usize,
}

impl Staged {
    /// Its whole blocks (written with direct IO).
    fn whole(&self) -> &[u8] {
        &self.filled_bytes()[..self.filled / BLOCK * BLOCK]
    }

    /// The partial block after them (written buffered, and kept as the next batch's head).
    fn rest(&self) -> &[u8] {
        &self.filled_bytes()[self.filled / BLOCK * BLOCK..]
    }

    fn filled_bytes(&self) -> &[u8] {
        &self.stage.buf[self.stage.skip..self.stage.skip + self.filled]
    }
}

fn align_down(offset: u64) -> u64 {
    offset / BLOCK as u64 * BLOCK as u64
}

/// Writes frames back to back at `offset` with gathered buffered writes.
fn write_gathered_at<'a>(
    file: &File,
    frames: impl Iterator<Item = &'a Frame>,
    mut offset: u64,
) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = frames
        .flat_map(|f| [IoSlice::new(&f.head), IoSlice::new(&f.data)])
        .filter(|s| !s.is_empty())
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let take = rest.len().min(MAX_IOVECS);
        match rustix::io::pwritev(file, &rest[..take], offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                offset += n as u64;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(head: usize, data: usize, byte: u8) -> Frame {
        Frame {
            head: vec![byte; head],
            data: Bytes::from(vec![byte.wrapping_add(1); data]),
        }
    }

    /// A fresh file at `path` holding a 64-byte header of 9s.
    fn segment_with_header(path: &Path) -> File {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .expect("create");
        file.write_all_at(&[9u8; 64], 0).expect("header");
        file
    }

    /// Batches of every shape (inside a block, across blocks, beyond the staging buffer,
    /// after a forgotten tail) leave exactly the bytes a plain append would.
    #[test]
    fn appends_equal_a_plain_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seg");
        let file = segment_with_header(&path);
        let mut expect = vec![9u8; 64];
        let mut appender = Appender::default();
        let shapes: &[&[(usize, usize)]] = &[
            &[(56, 100)],
            &[(56, DIRECT_FROM), (56, 4096), (40, 0)],
            &[(56, 4096), (56, 4096), (40, 0)],
            &[(56, STAGING + 3 * BLOCK + 17)],
            &[(56, 1)],
            &[(56, DIRECT_FROM + 8192 - 57)],
            &[(56, 2 * STAGING), (56, 5000)],
            &[(56, 3 * STAGING), (56, STAGING + 1), (56, 3 * BLOCK)],
            &[(56, 2 * STAGING - 56 - 56 - 40)],
        ];
        for (i, batch) in shapes.iter().enumerate() {
            if i == 5 {
                appender.direct = None;
            }
            let frames: Vec<Frame> = batch
                .iter()
                .map(|&(h, d)| frame(h, d, i as u8 * 2))
                .collect();
            let base = expect.len() as u64;
            appender
                .append(SegmentId(1), &path, &file, base, frames.iter())
                .expect("append");
            for f in &frames {
                expect.extend_from_slice(&f.to_vec());
            }
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut File::open(&path).expect("open"), &mut got)
                .expect("read");
            assert_eq!(got.len(), expect.len(), "batch {i}: file length");
            assert!(got == expect, "batch {i}: contents differ");
        }
    }

    /// A batch larger than the staging buffers that meets a full disk fails with the
    /// disk's own error (the committer retries ENOSPC), whichever thread's write met it,
    /// and the same batch written again once there is room leaves the right bytes.
    #[test]
    fn a_full_disk_fails_a_pipelined_batch_with_its_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).expect("mount point");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
            .arg(&mount)
            .status()
            .expect("run mount");
        assert!(mounted.success(), "mounting a tmpfs needs root");
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(self.0)
                    .status();
            }
        }
        let _unmount = Unmount(&mount);

        let ballast = mount.join("ballast");
        std::fs::write(&ballast, vec![1u8; 12 << 20]).expect("ballast");
        let path = mount.join("seg");
        let file = segment_with_header(&path);
        let frames = vec![frame(56, 4 * STAGING, 3), frame(40, 100, 5)];
        let mut appender = Appender::default();
        let err = appender
            .append(SegmentId(1), &path, &file, 64, frames.iter())
            .expect_err("the disk is full");
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::NOSPC.raw_os_error()),
            "{err}"
        );

        std::fs::remove_file(&ballast).expect("free space");
        appender
            .append(SegmentId(1), &path, &file, 64, frames.iter())
            .expect("append once there is room");
        let mut expect = vec![9u8; 64];
        for f in &frames {
            expect.extend_from_slice(&f.to_vec());
        }
        let got = std::fs::read(&path).expect("read");
        assert_eq!(got.len(), expect.len(), "file length");
        assert!(got == expect, "contents differ");
    }
}
