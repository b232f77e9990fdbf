//! NBD server over a block-device trait, plus a small async client for tests and the lab.
//!
//! - [`device`] holds the [`BlockDevice`] trait every export implements.
//! - [`file`](mod@file) holds [`FileDevice`], a raw image file served with `pread`/`pwrite`.
//! - [`mem`] holds [`MemDevice`], an in-memory device for tests.
//! - [`proto`] is the wire protocol as pure, IO-free decoders and encoders.
//! - [`exports`] holds [`Exports`], the run-time registry of named exports, with counters.
//! - [`server`] holds [`NbdServer`] and [`serve_files`].
//! - [`client`] holds [`NbdClient`].
//! - `fuzz` (feature `fuzzing`) holds the entry points of the fuzz targets in `fuzz/`.

pub mod client;
pub mod device;
pub mod error;
pub mod exports;
pub mod file;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod mem;
mod pool;
pub mod proto;
pub mod server;

pub use client::{ExportInfo, NbdClient, endpoint_uri};
pub use device::{BlockDevice, IoFuture};
pub use error::NbdError;
pub use exports::{ExportStats, Exports};
pub use file::{FileDevice, create_sparse_file};
pub use mem::MemDevice;
pub use proto::{Cookie, ErrorCode};
pub use server::{NbdServer, ServerConfig, serve_files};
