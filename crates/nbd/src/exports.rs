//! The registry of exports a server offers, and their counters.
//!
//! [`Exports`] is a cheaply cloneable handle: the server reads it at every handshake, and
//! its owner (the lab, or the VRA opening point-in-time images) adds and removes exports
//! while the server runs. Removing an export closes the connections that use it, after
//! their in-flight requests (see [`crate::server`]).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio_util::sync::CancellationToken;

use crate::{
    device::BlockDevice,
    error::NbdError,
    proto::{ExportCatalog, ExportDescription, MAX_NAME_LEN},
};

/// Counters of one export, summed over all its connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Read requests completed (successfully or not).
    pub reads: u64,
    /// Write requests completed.
    pub writes: u64,
    /// Flush requests completed.
    pub flushes: u64,
    /// Trim requests completed.
    pub trims: u64,
    /// Write-zeroes requests completed.
    pub write_zeroes: u64,
    /// Requests that carried the FUA flag.
    pub fua: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes stored by successful writes.
    pub bytes_written: u64,
    /// Requests answered with an error (refused by validation or failed by the device).
    pub errors: u64,
    /// Connections currently in transmission on this export.
    pub connections: u64,
    /// Connections that ever entered transmission on this export.
    pub connections_total: u64,
}

/// The kinds of requests the counters tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Other,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    write_zeroes: AtomicU64,
    fua: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    connections: AtomicU64,
    connections_total: AtomicU64,
}

impl Counters {
    pub(crate) fn record(&self, kind: OpKind, fua: bool, bytes: u64, ok: bool) {
        let counter = match kind {
            OpKind::Read => Some(&self.reads),
            OpKind::Write => Some(&self.writes),
            OpKind::Flush => Some(&self.flushes),
            OpKind::Trim => Some(&self.trims),
            OpKind::WriteZeroes => Some(&self.write_zeroes),
            OpKind::Other => None,
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if fua {
            self.fua.fetch_add(1, Ordering::Relaxed);
        }
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match kind {
            OpKind::Read => {
                self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
            }
            OpKind::Write => {
                self.bytes_written.fetch_add(bytes, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    pub(crate) fn connection_opened(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(Arc::clone(self))
    }

    fn snapshot(&self) -> ExportStats {
        ExportStats {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            trims: self.trims.load(Ordering::Relaxed),
            write_zeroes: self.write_zeroes.load(Ordering::Relaxed),
            fua: self.fua.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            connections_total: self.connections_total.load(Ordering::Relaxed),
        }
    }
}

/// Decrements the open-connections gauge when a connection ends.
#[derive(Debug)]
pub(crate) struct ConnectionGuard(Arc<Counters>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One export in the registry (an opaque handle): its device, its counters, and a token
/// cancelled when it is removed.
#[derive(Debug)]
pub struct ExportEntry {
    pub(crate) device: Arc<dyn BlockDevice>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) removed: CancellationToken,
}

/// A registry of named exports, shared by a server and whoever manages its exports.
#[derive(Debug, Clone, Default)]
pub struct Exports {
    inner: Arc<RwLock<BTreeMap<String, Arc<ExportEntry>>>>,
}

impl Exports {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an export. Names are non-empty UTF-8 of at most 4096 bytes without NUL.
    pub fn insert(
        &self,
        name: impl Into<String>,
        device: Arc<dyn BlockDevice>,
    ) -> Result<(), NbdError> {
        let name = name.into();
        check_name(&name)?;
        let mut map = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if map.contains_key(&name) {
            return Err(NbdError::ExportExists(name));
        }
        tracing::info!(export = %name, size = device.size(), read_only = device.is_read_only(), "export added");
        map.insert(
            name,
            Arc::new(ExportEntry {
                device,
                counters: Arc::default(),
                removed: CancellationToken::new(),
            }),
        );
        Ok(())
    }

    /// Removes an export; connections using it finish their in-flight requests and close.
    /// Returns whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        let removed = self
            .inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        match removed {
            Some(entry) => {
                entry.removed.cancel();
                tracing::info!(export = %name, "export removed");
                true
            }
            None => false,
        }
    }

    /// Whether an export of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// Names of all exports, sorted.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// The device behind an export.
    pub fn device(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        self.read().get(name).map(|entry| Arc::clone(&entry.device))
    }

    /// A snapshot of an export's counters.
    pub fn stats(&self, name: &str) -> Option<ExportStats> {
        self.read().get(name).map(|entry| entry.counters.snapshot())
    }

    /// Snapshots of every export's counters.
    pub fn all_stats(&self) -> Vec<(String, ExportStats)> {
        self.read()
            .iter()
            .map(|(name, entry)| (name.clone(), entry.counters.snapshot()))
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<ExportEntry>>> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }
}

fn check_name(name: &str) -> Result<(), NbdError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > MAX_NAME_LEN {
        "longer than 4096 bytes"
    } else if name.contains('\0') {
        "contains NUL"
    } else {
        return Ok(());
    };
    Err(NbdError::InvalidExportName {
        name: name.chars().take(64).collect(),
        reason,
    })
}

impl ExportCatalog for Exports {
    type Handle = Arc<ExportEntry>;

    fn names(&self) -> Vec<String> {
        Exports::names(self)
    }

    /// The empty name selects the only export when there is exactly one.
    fn lookup(&self, name: &str) -> Option<(ExportDescription, Arc<ExportEntry>)> {
        let map = self.read();
        let entry = if name.is_empty() && map.len() == 1 {
            map.values().next()
        } else {
            map.get(name)
        }?;
        let description = ExportDescription {
            size: entry.device.size(),
            read_only: entry.device.is_read_only(),
        };
        Some((description, Arc::clone(entry)))
    }
}
