//! The block-device abstraction that every NBD export serves.
//!
//! Buffers are owned (`Bytes`) so that an implementation can hand them to a blocking
//! pool or an actor; futures are boxed so that exports of different kinds can live side
//! by side as `Arc<dyn BlockDevice>`. An implementation may await freely (a protected
//! volume, for example, holds a write's acknowledgement during a checkpoint freeze).

use std::{fmt, future::Future, io, pin::Pin};

use bytes::Bytes;

/// A boxed, sendable future of an IO result.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// A fixed-size, byte-addressed device. Callers (the NBD server) check every range
/// against [`BlockDevice::size`] before calling, so implementations may assume
/// `offset + len <= size()`.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes, fixed for the life of an export.
    fn size(&self) -> u64;

    /// Whether writes, trims and write-zeroes are refused.
    fn is_read_only(&self) -> bool {
        false
    }

    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes>;

    /// Writes `data` at `offset`; with `fua`, the data is durable when the future resolves.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()>;

    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<'_, ()>;

    /// Tells the device that a range is no longer needed; reads of it may return anything
    /// until it is written again (this implementation family returns zeroes).
    fn trim(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;

    /// Writes `len` zero bytes at `offset`; with `fua`, durable when the future resolves.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()>;
}

impl fmt::Debug for dyn BlockDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockDevice")
            .field("size", &self.size())
            .field("read_only", &self.is_read_only())
            .finish()
    }
}
