//! An in-memory block device, for tests and as the reference the file device is checked
//! against (the model test runs the same operations on both).

use std::sync::{Mutex, PoisonError};

use bytes::Bytes;

use crate::device::{BlockDevice, IoFuture};

/// A block device held in a `Vec<u8>`; flush is a no-op.
#[derive(Debug)]
pub struct MemDevice {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemDevice {
    /// A zeroed device of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self::from_vec(vec![0; size])
    }

    /// A device holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self {
            data: Mutex::new(data),
            read_only: false,
        }
    }

    /// The same device, refusing writes.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn range(&self, offset: u64, len: u64) -> std::io::Result<std::ops::Range<usize>> {
        let size = self.lock().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "range beyond the device",
            )),
        }
    }

    fn fill(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.writable()?;
        let range = self.range(offset, len)?;
        self.lock()[range].fill(0);
        Ok(())
    }

    fn writable(&self) -> std::io::Result<()> {
        if self.read_only {
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "device is read-only",
            ))
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        let result = self
            .range(offset, u64::from(len))
            .map(|range| Bytes::copy_from_slice(&self.lock()[range]));
        Box::pin(std::future::ready(result))
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> IoFuture<'_, ()> {
        let result = self.writable().and_then(|()| {
            let range = self.range(offset, data.len() as u64)?;
            self.lock()[range].copy_from_slice(&data);
            Ok(())
        });
        Box::pin(std::future::ready(result))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn trim(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(self.fill(offset, len)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(self.fill(offset, len)))
    }
}
