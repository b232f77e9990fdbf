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
    /// Staging memory; the aligned window of it is used.
    staging: Vec<u8>,
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
            match self.append_direct(segment, path, file, base, frames.clone()) {
                Ok(()) => return Ok(()),
                // The filesystem or device refuses direct IO (or this alignment): the
                // batch is written again, buffered, and so is every later one.
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    tracing::info!(error = %e, path = %path.display(), "direct IO refused; journal appends are buffered");
                    self.buffered_only = true;
                    self.direct = None;
                    self.staging = Vec::new();
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
        if self.staging.is_empty() {
            self.staging = vec![0; STAGING + BLOCK];
        }
        let start = align_down(base);
        if d.end != Some(base) {
            d.tail = vec![0; (base - start) as usize];
            file.read_exact_at(&mut d.tail, start)?;
        }
        d.end = None;
        let skip = self.staging.as_ptr().align_offset(BLOCK);
        let stage = &mut self.staging[skip..skip + STAGING];
        let mut at = start;
        let mut filled = d.tail.len();
        stage[..filled].copy_from_slice(&d.tail);
        for frame in frames {
            for mut part in [&frame.head[..], &frame.data[..]] {
                while !part.is_empty() {
                    if filled == STAGING {
                        d.file.write_all_at(stage, at)?;
                        at += STAGING as u64;
                        filled = 0;
                    }
                    let n = part.len().min(STAGING - filled);
                    stage[filled..filled + n].copy_from_slice(&part[..n]);
                    filled += n;
                    part = &part[n..];
                }
            }
        }
        let whole = filled / BLOCK * BLOCK;
        if whole > 0 {
            d.file.write_all_at(&stage[..whole], at)?;
        }
        if filled > whole {
            file.write_all_at(&stage[whole..filled], at + whole as u64)?;
        }
        d.tail.clear();
        d.tail.extend_from_slice(&stage[whole..filled]);
        d.end = Some(at + filled as u64);
        Ok(())
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

    /// Batches of every shape (inside a block, across blocks, beyond the staging buffer,
    /// after a forgotten tail) leave exactly the bytes a plain append would.
    #[test]
    fn appends_equal_a_plain_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seg");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        file.write_all_at(&[9u8; 64], 0).expect("header");
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
}
