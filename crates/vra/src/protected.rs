//! The protected role of one VPG: its volumes served over NBD ([`ProtectedVolume`]), its
//! bounded replication buffer, the checkpoint barrier actor (freeze / thaw / abort with a
//! timeout) and the sender task that streams the buffer to the recovery VRA.
//!
//! Write path: wait while the VPG is frozen (a write that enters after a freeze must land
//! after that checkpoint's marker, or a checkpoint could hold a write without one it
//! depends on from another VRA that thawed earlier), reserve buffer space (the VRA-wide
//! RAM budget; when it stays exhausted, or the stream is down and it is exhausted, the VPG
//! switches to tracking writes in its dirty map instead, see [`crate::sync`]), lock the
//! written range of the volume, apply the write to the local image, enter it into the
//! buffer (which assigns its stream sequence) or mark it dirty, unlock, and acknowledge.
//! Markers enter the buffer without a reservation so that a full buffer cannot block a
//! thaw.

use std::{
    collections::BTreeMap,
    io,
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use tandem_core::ids::{VmId, VpgId};
use tandem_core::status::SyncTrigger;
use tandem_journal::{Checkpoint, CheckpointId, Seq, VolumeId};
use tandem_nbd::{BlockDevice, FileDevice, IoFuture};
use tandem_proto::v1 as pb;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    bandwidth::Limiter,
    connector::Connector,
    dirty::DirtyMap,
    error::{VraError, VraResult},
    model::{EntryBody, ProtectedAssignment},
    pool::BufferPool,
    ranges::{RangeGuard, RangeLocks},
    sender,
    state::write_atomic,
    sync::{self as syncer, SyncShared},
    window::SendWindow,
};

/// How long a write waits for buffer space while the stream is up before the VPG switches
/// to tracking writes in its dirty map (a short burst is absorbed, a slow link is not).
const BUFFER_WAIT: Duration = Duration::from_millis(200);

/// Whether a write got buffer space or is tracked in the dirty map.
enum Admission {
    Buffered(u64),
    Tracked,
}

/// How a protected VPG starts.
#[derive(Debug)]
pub enum StartKind {
    /// A new assignment: initial sync (or delta sync for preseeded replicas).
    New,
    /// Restored after this VRA restarted: the dirty map it persisted when it stopped
    /// cleanly (bitmap sync), or none (delta sync: unacknowledged writes may be lost).
    Restored(Option<DirtyMap>),
    /// Replacing the assignment of an older generation, whose sync state carries over.
    Replaced(Carry),
}

/// The sync state a stopped protected VPG hands to its successor.
#[derive(Debug, Clone)]
pub struct Carry {
    /// Regions still to send (unacknowledged writes folded in).
    pub map: DirtyMap,
    /// A delta sync was owed.
    pub delta_owed: bool,
}

/// Counters of a protected VPG.
#[derive(Debug, Default)]
pub struct ProtectedCounters {
    /// Writes (incl. zeroes and trims) acknowledged.
    pub writes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Write payload bytes sent, before compression.
    pub wan_raw: AtomicU64,
    /// Write payload bytes sent, after compression.
    pub wan_sent: AtomicU64,
    /// Successful connections.
    pub sessions: AtomicU64,
    /// Successful connections after the first.
    pub reconnects: AtomicU64,
}

/// Counters of one protected VM (the seed's VMs tab shows its IO, throughput and WAN
/// traffic).
#[derive(Debug, Default)]
pub struct VmCounters {
    /// Writes (incl. zeroes and trims) acknowledged.
    pub writes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Write payload bytes sent, after compression.
    pub wan_sent: AtomicU64,
    /// Rates of the three, per second.
    pub rates: crate::rates::RateMeter<3>,
}

impl VmCounters {
    /// Writes, write bytes and WAN bytes per second, and the cumulative counters.
    pub fn to_pb(&self, vm: &VmId) -> pb::VraVmStatus {
        let counters = [
            self.writes.load(Ordering::Relaxed),
            self.write_bytes.load(Ordering::Relaxed),
            self.wan_sent.load(Ordering::Relaxed),
        ];
        let rates = self.rates.rates(counters);
        pb::VraVmStatus {
            vm_id: vm.to_string(),
            writes: counters[0],
            write_bytes: counters[1],
            wan_bytes_sent: counters[2],
            write_iops: rates[0],
            write_bytes_per_sec: rates[1],
            wan_bytes_per_sec: rates[2],
        }
    }
}

/// State shared by a protected VPG's volumes, barrier and sender.
#[derive(Debug)]
pub struct ProtectedShared {
    /// The assignment.
    pub assignment: ProtectedAssignment,
    /// The replication window (entries not yet acknowledged).
    pub window: Mutex<SendWindow<EntryBody>>,
    /// Wakes the sender when entries are pushed.
    pub wake: Notify,
    /// The VRA-wide buffer budget, in bytes.
    pub budget: Arc<Semaphore>,
    /// The pool the budget belongs to (for eviction by priority).
    pool: Arc<BufferPool>,
    /// The bandwidth limit of the site pair the stream goes over.
    pub limiter: Limiter,
    /// Largest single reservation (the whole budget).
    pub budget_total: u64,
    /// Counters.
    pub counters: ProtectedCounters,
    /// Set when the stream could not resume without loss: a sync is needed.
    pub needs_sync: AtomicBool,
    /// Whether the sender is connected.
    pub connected: AtomicBool,
    /// Rates of writes, write bytes and WAN bytes sent.
    pub rates: crate::rates::RateMeter<3>,
    /// Per VM counters, one entry for every VM of the assignment.
    pub vms: BTreeMap<VmId, Arc<VmCounters>>,
    /// The last stream error.
    pub last_error: Mutex<String>,
    /// What the recovery VRA last said keeps it from making entries durable (empty: none).
    pub remote_storage_error: Mutex<String>,
    /// The checkpoint currently frozen (0: none).
    pub frozen_cp: AtomicU64,
    /// Dirty map, tracking, pause and sync progress.
    pub sync: SyncShared,
    /// Set when the window gave up entries: the sender reconnects, so that the stream
    /// continues wherever the receiver is.
    pub restart_stream: AtomicBool,
    /// How far the recovery VRA has made the stream durable, for those who wait on it.
    durable: watch::Sender<u64>,
    frozen: watch::Receiver<bool>,
    cancel: CancellationToken,
}

impl ProtectedShared {
    fn window(&self) -> std::sync::MutexGuard<'_, SendWindow<EntryBody>> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns buffer space.
    pub fn release(&self, bytes: u64) {
        if bytes > 0 {
            self.budget
                .add_permits(usize::try_from(bytes).unwrap_or(usize::MAX));
        }
    }

    /// Reserves buffer space, waiting for it; returns the cost reserved.
    pub(crate) async fn reserve(&self, cost: u64) -> io::Result<u64> {
        let cost = cost.min(self.budget_total).min(u64::from(u32::MAX));
        let permit = tokio::select! {
            p = self.budget.acquire_many(cost as u32) => p.map_err(|_| shutting_down())?,
            () = self.cancel.cancelled() => return Err(shutting_down()),
        };
        permit.forget();
        Ok(cost)
    }

    fn try_reserve(&self, cost: u64) -> io::Result<bool> {
        match self.budget.try_acquire_many(cost as u32) {
            Ok(p) => {
                p.forget();
                Ok(true)
            }
            Err(tokio::sync::TryAcquireError::Closed) => Err(shutting_down()),
            Err(tokio::sync::TryAcquireError::NoPermits) => Ok(false),
        }
    }

    /// Enters an entry holding `cost` reserved bytes into the buffer.
    pub(crate) fn push_entry(&self, body: EntryBody, cost: u64) -> Seq {
        let seq = self.window().push(body, cost);
        self.wake.notify_one();
        seq
    }

    async fn admit(&self, want: u64) -> io::Result<Admission> {
        if self.sync.tracking() {
            return Ok(Admission::Tracked);
        }
        let cost = want.min(self.budget_total).min(u64::from(u32::MAX));
        if self.try_reserve(cost)? {
            return Ok(Admission::Buffered(cost));
        }
        // Full: a lower-priority VPG gives up its buffer first.
        while let Some(victim) = self.pool.victim_for(self.assignment.priority) {
            victim.start_tracking(SyncTrigger::ProtectedVraCongestion);
            if self.try_reserve(cost)? {
                return Ok(Admission::Buffered(cost));
            }
        }
        let connected = self.connected.load(Ordering::Relaxed);
        if connected && let Ok(r) = tokio::time::timeout(BUFFER_WAIT, self.reserve(cost)).await {
            return r.map(Admission::Buffered);
        }
        let storage = !self
            .remote_storage_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        self.start_tracking(if storage {
            SyncTrigger::RecoveryOrJournalStorageError
        } else if connected {
            SyncTrigger::NetworkCongestion
        } else {
            SyncTrigger::RecoveryVraCommunicationProblem
        });
        Ok(Admission::Tracked)
    }

    /// Switches to tracking writes in the dirty map: what the buffer holds is given up and
    /// marked dirty, and its space is freed. A bitmap sync follows once the stream is up.
    pub(crate) fn start_tracking(&self, trigger: SyncTrigger) {
        let mut st = self.sync.lock();
        if st.tracking {
            return;
        }
        st.tracking = true;
        if st.trigger.is_none() {
            st.trigger = Some(trigger);
        }
        let (items, freed) = self.window().abandon();
        fold_into(&mut st.map, &items);
        drop(st);
        self.release(freed);
        self.restart_stream.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        warn!(vpg = %self.assignment.vpg, trigger = trigger.as_str(), dropped = items.len(), "buffering stopped; writes are tracked for a bitmap sync");
        self.sync.wake.notify_one();
    }

    fn mark_dirty(&self, index: usize, offset: u64, len: u64) {
        if let Some(v) = self.sync.lock().map.volume_mut(index) {
            v.mark_dirty(offset, len);
        }
    }

    async fn thawed(&self) -> io::Result<()> {
        if !*self.frozen.borrow() {
            return Ok(());
        }
        let mut rx = self.frozen.clone();
        tokio::select! {
            r = rx.wait_for(|f| !*f) => r.map(|_| ()).map_err(|_| shutting_down()),
            () = self.cancel.cancelled() => Err(shutting_down()),
        }
    }

    /// Records the last stream error.
    pub fn set_error(&self, e: impl ToString) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = e.to_string();
    }

    /// Tells `WaitDurable`'s waiters where the window's acknowledged (durable) position
    /// is now; call after every window change that moves it.
    pub fn publish_durable(&self, acked: u64) {
        self.durable
            .send_if_modified(|d| std::mem::replace(d, acked) != acked);
    }

    /// Follows how far the recovery VRA has made the stream durable.
    pub fn watch_durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// A snapshot of the window's positions.
    pub fn positions(&self) -> Positions {
        let w = self.window();
        Positions {
            written: w.written_seq(),
            sent: w.sent_seq(),
            acked: w.acked_seq(),
            bytes: w.bytes(),
            entries: w.len(),
            anchored: w.anchored(),
        }
    }
}

/// Where a protected VPG's replication window stands.
#[derive(Debug, Clone, Copy)]
pub struct Positions {
    /// Highest sequence assigned to a write or marker.
    pub written: Seq,
    /// Highest sequence sent on the stream.
    pub sent: Seq,
    /// Highest sequence the recovery VRA acknowledged as durable.
    pub acked: Seq,
    /// Bytes held (unacknowledged).
    pub bytes: u64,
    /// Entries held (unacknowledged).
    pub entries: usize,
    /// Sequence numbers are aligned with the receiver's stream.
    pub anchored: bool,
}

fn shutting_down() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "vpg is being unassigned")
}

/// One protected volume, served over NBD: writes go to the image and into the VPG's
/// replication buffer.
#[derive(Debug)]
pub struct ProtectedVolume {
    image: FileDevice,
    vm: Arc<VmId>,
    volume: VolumeId,
    /// Position in the VPG's dirty map.
    index: usize,
    ranges: RangeLocks,
    vpg: Arc<ProtectedShared>,
    counters: Arc<VmCounters>,
}

impl ProtectedVolume {
    async fn replicated(
        &self,
        offset: u64,
        len: u64,
        apply: IoFuture<'_, ()>,
        body: EntryBody,
    ) -> io::Result<()> {
        self.vpg.thawed().await?;
        let admission = self.vpg.admit(body.cost()).await?;
        let guard = self.ranges.lock(offset, len).await;
        if let Err(e) = apply.await {
            drop(guard);
            if let Admission::Buffered(cost) = admission {
                self.vpg.release(cost);
            }
            return Err(e);
        }
        match admission {
            Admission::Buffered(cost) => {
                self.vpg.push_entry(body, cost);
            }
            Admission::Tracked => self.vpg.mark_dirty(self.index, offset, len),
        }
        drop(guard);
        for (writes, bytes) in [
            (&self.vpg.counters.writes, &self.vpg.counters.write_bytes),
            (&self.counters.writes, &self.counters.write_bytes),
        ] {
            writes.fetch_add(1, Ordering::Relaxed);
            bytes.fetch_add(len, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.image.size()
    }

    /// The VM.
    pub fn vm(&self) -> &VmId {
        &self.vm
    }

    /// The image file of the volume (read directly by delta sync's hashing).
    pub(crate) fn image_path(&self) -> &std::path::Path {
        self.image.path()
    }

    /// The volume id.
    pub fn volume(&self) -> VolumeId {
        self.volume
    }

    /// Locks a range against writes (syncs read under it so that the stream orders their
    /// data with concurrent writes).
    pub(crate) async fn lock_range(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.ranges.lock(offset, len).await
    }

    /// Reads the local image.
    pub(crate) async fn read_image(&self, offset: u64, len: u64) -> io::Result<Bytes> {
        let len = u32::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "read too large"))?;
        self.image.read(offset, len).await
    }

    /// A stream entry writing `data` at `offset` of this volume.
    pub(crate) fn write_entry(&self, offset: u64, data: Bytes) -> EntryBody {
        EntryBody::Write {
            vm: self.vm.clone(),
            volume: self.volume,
            offset,
            data,
        }
    }
}

/// Marks the ranges of given-up entries dirty.
fn fold_into(map: &mut DirtyMap, items: &[EntryBody]) {
    for item in items {
        let (vm, volume, offset, len) = match item {
            EntryBody::Write {
                vm,
                volume,
                offset,
                data,
            } => (vm, *volume, *offset, data.len() as u64),
            EntryBody::Zero {
                vm,
                volume,
                offset,
                len,
            }
            | EntryBody::Trim {
                vm,
                volume,
                offset,
                len,
            } => (vm, *volume, *offset, *len),
            EntryBody::Checkpoint(_) => continue,
        };
        if let Some(i) = map.index_of(vm, volume)
            && let Some(v) = map.volume_mut(i)
        {
            v.mark_dirty(offset, len);
        }
    }
}

impl BlockDevice for ProtectedVolume {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        self.image.read(offset, len)
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        let len = data.len() as u64;
        let body = EntryBody::Write {
            vm: self.vm.clone(),
            volume: self.volume,
            offset,
            data: data.clone(),
        };
        Box::pin(self.replicated(offset, len, self.image.write(offset, data, fua), body))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.image.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        let body = EntryBody::Trim {
            vm: self.vm.clone(),
            volume: self.volume,
            offset,
            len,
        };
        Box::pin(self.replicated(offset, len, self.image.trim(offset, len), body))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        let body = EntryBody::Zero {
            vm: self.vm.clone(),
            volume: self.volume,
            offset,
            len,
        };
        Box::pin(self.replicated(offset, len, self.image.write_zeroes(offset, len, fua), body))
    }
}

/// The NBD export name of a protected volume.
pub fn export_name(vm: &VmId, volume: VolumeId) -> String {
    format!("{vm}/{volume}")
}

enum BarrierMsg {
    Freeze {
        id: CheckpointId,
        reply: oneshot::Sender<VraResult<()>>,
    },
    Thaw {
        checkpoint: Checkpoint,
        reply: oneshot::Sender<VraResult<Seq>>,
    },
    Abort {
        id: CheckpointId,
        reply: oneshot::Sender<VraResult<()>>,
    },
}

/// The checkpoint barrier of one VPG: holds acknowledgements while frozen.
struct BarrierActor {
    rx: mpsc::Receiver<BarrierMsg>,
    frozen_tx: watch::Sender<bool>,
    shared: Arc<ProtectedShared>,
    frozen: Option<(CheckpointId, tokio::time::Instant)>,
}

impl BarrierActor {
    async fn run(mut self, cancel: CancellationToken) {
        loop {
            let deadline = self.frozen.map(|(_, d)| d);
            tokio::select! {
                () = cancel.cancelled() => break,
                () = sleep_until(deadline) => {
                    if let Some((id, _)) = self.frozen.take() {
                        warn!(vpg = %self.shared.assignment.vpg, checkpoint = id.0, "freeze timed out, aborting");
                        self.release();
                    }
                }
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
            }
        }
        self.release();
    }

    fn release(&mut self) {
        self.frozen = None;
        self.shared.frozen_cp.store(0, Ordering::Relaxed);
        self.frozen_tx.send_replace(false);
    }

    fn err(&self, reason: impl Into<String>) -> VraError {
        VraError::Barrier {
            vpg: self.shared.assignment.vpg.clone(),
            reason: reason.into(),
        }
    }

    fn handle(&mut self, msg: BarrierMsg) {
        match msg {
            BarrierMsg::Freeze { id, reply } => {
                let r = match self.frozen {
                    Some((cur, _)) if cur == id => Ok(()),
                    Some((cur, _)) => Err(self.err(format!("checkpoint {cur} is frozen"))),
                    None if self.shared.needs_sync.load(Ordering::Relaxed)
                        || self.shared.sync.busy() =>
                    {
                        Err(self.err("the vpg is syncing; no checkpoints until it is done"))
                    }
                    None if !self.shared.positions().anchored => {
                        Err(self.err("the stream to the recovery vra is not established yet"))
                    }
                    None => {
                        let timeout =
                            Duration::from_millis(self.shared.assignment.freeze_timeout_ms);
                        self.frozen = Some((id, tokio::time::Instant::now() + timeout));
                        self.shared.frozen_cp.store(id.0, Ordering::Relaxed);
                        self.frozen_tx.send_replace(true);
                        Ok(())
                    }
                };
                let _ = reply.send(r);
            }
            BarrierMsg::Thaw { checkpoint, reply } => {
                let r = match self.frozen {
                    Some((cur, _)) if cur == checkpoint.id => {
                        let seq = self.shared.push_entry(EntryBody::Checkpoint(checkpoint), 0);
                        self.release();
                        Ok(seq)
                    }
                    Some((cur, _)) => {
                        Err(self.err(format!("checkpoint {cur} is frozen, not {}", checkpoint.id)))
                    }
                    None => Err(self.err(format!(
                        "checkpoint {} is not frozen (aborted, timed out, or never frozen)",
                        checkpoint.id
                    ))),
                };
                let _ = reply.send(r);
            }
            BarrierMsg::Abort { id, reply } => {
                let r = match self.frozen {
                    Some((cur, _)) if cur == id => {
                        self.release();
                        Ok(())
                    }
                    Some((cur, _)) => {
                        Err(self.err(format!("checkpoint {cur} is frozen, not {id}")))
                    }
                    // Aborting what is no longer frozen is harmless.
                    None => Ok(()),
                };
                let _ = reply.send(r);
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A running protected VPG: its volumes (to be exported), barrier and sender.
#[derive(Debug)]
pub struct ProtectedVpg {
    shared: Arc<ProtectedShared>,
    /// Where the dirty map is kept across a clean restart.
    map_path: PathBuf,
    barrier: mpsc::Sender<BarrierMsg>,
    volumes: Vec<(String, Arc<ProtectedVolume>)>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for BarrierMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BarrierMsg")
    }
}

impl ProtectedVpg {
    /// Opens (creating missing) images and starts the barrier, the sender and the syncer.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        assignment: ProtectedAssignment,
        start: StartKind,
        map_path: PathBuf,
        pool: Arc<BufferPool>,
        limiter: Limiter,
        connector: Connector,
        host_id: String,
        parent: &CancellationToken,
    ) -> VraResult<Self> {
        let cancel = parent.child_token();
        let (frozen_tx, frozen_rx) = watch::channel(false);
        let layout: Vec<(VmId, VolumeId, u64)> = assignment
            .vms
            .iter()
            .flat_map(|vm| vm.volumes.iter().map(|v| (vm.vm.clone(), v.id, v.size)))
            .collect();
        let preseeded: Vec<bool> = assignment
            .vms
            .iter()
            .flat_map(|vm| vm.volumes.iter().map(|v| v.preseeded))
            .collect();
        let mut window = SendWindow::new();
        let mut delta = false;
        // Volumes whose replica is a preseeded copy, at the generation they joined in:
        // delta-synced.
        let mut preseeded_new = Vec::new();
        let map = match start {
            StartKind::New => {
                let mut map = DirtyMap::new(layout);
                if assignment.preseeded {
                    delta = true;
                } else {
                    for (i, pre) in preseeded.iter().enumerate() {
                        if *pre {
                            preseeded_new.push(i);
                        } else if let Some(v) = map.volume_mut(i) {
                            v.mark_initial();
                        }
                    }
                }
                map
            }
            StartKind::Restored(Some(saved)) => {
                window.trust_resync();
                saved.carry_to(layout)
            }
            StartKind::Restored(None) => {
                delta = true;
                DirtyMap::new(layout)
            }
            StartKind::Replaced(old) => {
                window.trust_resync();
                delta = old.delta_owed;
                let mut map = old.map.carry_to(layout.iter().cloned());
                // Preseeded marks the generation a VM (re)joins in: its replica may differ
                // from what this VRA last sent (it may never have seen the VM leave), so
                // only checksums can tell what to send.
                for (i, (vm, vol, size)) in layout.into_iter().enumerate() {
                    if !preseeded[i] {
                        continue;
                    }
                    if old.map.index_of(&vm, vol).is_none() {
                        // Carried over as never sent; the replica says otherwise.
                        if let Some(v) = map.volume_mut(i) {
                            *v = crate::dirty::VolumeMap::new(vm, vol, size);
                        }
                    }
                    preseeded_new.push(i);
                }
                map
            }
        };
        let acked_at_start = window.acked_seq().0;
        let shared = Arc::new(ProtectedShared {
            assignment: assignment.clone(),
            window: Mutex::new(window),
            wake: Notify::new(),
            budget: pool.budget.clone(),
            budget_total: pool.total,
            pool: pool.clone(),
            limiter,
            counters: ProtectedCounters::default(),
            needs_sync: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            rates: crate::rates::RateMeter::new([0; 3]),
            vms: assignment
                .vms
                .iter()
                .map(|vm| (vm.vm.clone(), Arc::new(VmCounters::default())))
                .collect(),
            last_error: Mutex::new(String::new()),
            remote_storage_error: Mutex::new(String::new()),
            frozen_cp: AtomicU64::new(0),
            sync: SyncShared::new(map),
            restart_stream: AtomicBool::new(false),
            durable: watch::Sender::new(acked_at_start),
            frozen: frozen_rx,
            cancel: cancel.clone(),
        });
        if delta {
            shared.sync.request_delta(None, None);
        } else if !preseeded_new.is_empty() {
            info!(vpg = %assignment.vpg, volumes = ?preseeded_new, "preseeded volumes: delta sync");
            shared.sync.request_delta(Some(preseeded_new), None);
        }
        pool.register(&shared);
        let mut volumes = Vec::new();
        for vm in &assignment.vms {
            let vm_id = Arc::new(vm.vm.clone());
            let vm_counters = shared.vms[&vm.vm].clone();
            for vol in &vm.volumes {
                let image = open_or_create(&vol.path, vol.size)?;
                let index = volumes.len();
                volumes.push((
                    export_name(&vm.vm, vol.id),
                    Arc::new(ProtectedVolume {
                        image,
                        vm: vm_id.clone(),
                        volume: vol.id,
                        index,
                        ranges: RangeLocks::default(),
                        vpg: shared.clone(),
                        counters: vm_counters.clone(),
                    }),
                ));
            }
        }
        let tasks = TaskTracker::new();
        let (tx, rx) = mpsc::channel(16);
        let actor = BarrierActor {
            rx,
            frozen_tx,
            shared: shared.clone(),
            frozen: None,
        };
        tasks.spawn(actor.run(cancel.clone()));
        tasks.spawn(sender::run(
            shared.clone(),
            connector.clone(),
            host_id,
            cancel.clone(),
        ));
        tasks.spawn(syncer::run(
            shared.clone(),
            volumes.iter().map(|(_, v)| v.clone()).collect(),
            connector,
            cancel.clone(),
        ));
        tasks.close();
        info!(vpg = %assignment.vpg, generation = assignment.generation.0, volumes = volumes.len(), "protected vpg started");
        Ok(Self {
            shared,
            map_path,
            barrier: tx,
            volumes,
            cancel,
            tasks,
        })
    }

    /// The VPG.
    pub fn id(&self) -> &VpgId {
        &self.shared.assignment.vpg
    }

    /// The assignment.
    pub fn assignment(&self) -> &ProtectedAssignment {
        &self.shared.assignment
    }

    /// The shared state (status).
    pub fn shared(&self) -> &Arc<ProtectedShared> {
        &self.shared
    }

    /// Waits until the stream is durable up to `seq` or `timeout` passes; answers how far
    /// it is durable.
    pub async fn wait_durable(&self, seq: u64, timeout: std::time::Duration) -> u64 {
        let mut durable = self.shared.durable.subscribe();
        let _ = tokio::time::timeout(timeout, durable.wait_for(|d| *d >= seq)).await;
        *durable.borrow()
    }

    /// The volumes and their export names.
    pub fn volumes(&self) -> &[(String, Arc<ProtectedVolume>)] {
        &self.volumes
    }

    async fn ask<T>(
        &self,
        msg: impl FnOnce(oneshot::Sender<VraResult<T>>) -> BarrierMsg,
    ) -> VraResult<T> {
        let (tx, rx) = oneshot::channel();
        self.barrier
            .send(msg(tx))
            .await
            .map_err(|_| VraError::ShuttingDown)?;
        rx.await.map_err(|_| VraError::ShuttingDown)?
    }

    /// Holds back acknowledgements of new writes.
    pub async fn freeze(&self, id: CheckpointId) -> VraResult<()> {
        self.ask(|reply| BarrierMsg::Freeze { id, reply }).await
    }

    /// Appends the marker, then releases held writes; returns the marker's sequence.
    pub async fn thaw(&self, checkpoint: Checkpoint) -> VraResult<Seq> {
        self.ask(|reply| BarrierMsg::Thaw { checkpoint, reply })
            .await
    }

    /// Releases held writes without a marker.
    pub async fn abort(&self, id: CheckpointId) -> VraResult<()> {
        self.ask(|reply| BarrierMsg::Abort { id, reply }).await
    }

    /// Pauses protection: writes are tracked in the dirty map until [`ProtectedVpg::resume`].
    pub fn pause(&self) {
        self.shared.sync.lock().paused = true;
        self.shared
            .start_tracking(SyncTrigger::RecoveryVraCommunicationProblem);
        // A pause is the operator's, not a trigger of the seed's.
        self.shared.sync.lock().trigger = None;
    }

    /// Resumes protection; a bitmap sync follows.
    pub fn resume(&self) {
        self.shared.sync.lock().paused = false;
        self.shared.sync.wake.notify_one();
    }

    /// Asks for a delta sync of every volume, or of one (`vm`, `volume`).
    pub fn force_sync(&self, volume: Option<(&VmId, VolumeId)>) -> VraResult<()> {
        let index = match volume {
            None => None,
            Some((vm, vol)) => Some(
                self.volumes
                    .iter()
                    .position(|(_, v)| v.vm() == vm && v.volume() == vol)
                    .ok_or_else(|| {
                        tandem_core::DomainError::not_found("volume", format!("{vm}/{vol}"))
                    })?,
            ),
        };
        self.shared
            .sync
            .request_delta(index.map(|i| vec![i]), Some(SyncTrigger::ForceSync));
        Ok(())
    }

    /// Stops the barrier, the sender and the syncer and releases the buffer. Returns what
    /// a successor needs: the dirty map with everything unacknowledged folded in, and
    /// whether a delta sync was owed. With `persist`, the map is also saved so that a
    /// restart resumes with a bitmap sync (not when a delta sync was owed: only hashes can
    /// tell what differs then, and without a saved map a restart does a delta sync).
    pub async fn stop(&self, persist: bool) -> Carry {
        self.cancel.cancel();
        self.tasks.wait().await;
        let carry = {
            let mut st = self.shared.sync.lock();
            let (items, freed) = self.shared.window().abandon();
            fold_into(&mut st.map, &items);
            self.shared.release(freed);
            Carry {
                map: st.map.clone(),
                delta_owed: st.delta.is_some() || self.shared.needs_sync.load(Ordering::Relaxed),
            }
        };
        if persist && !carry.delta_owed {
            if let Some(dir) = self.map_path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match write_atomic(&self.map_path, &carry.map.encode()) {
                Ok(()) => {
                    info!(vpg = %self.shared.assignment.vpg, dirty_bytes = carry.map.pending_bytes(), "dirty map saved")
                }
                Err(e) => {
                    warn!(vpg = %self.shared.assignment.vpg, error = %e, "could not save the dirty map; a delta sync follows the restart")
                }
            }
        } else {
            let _ = std::fs::remove_file(&self.map_path);
        }
        info!(vpg = %self.shared.assignment.vpg, "protected vpg stopped");
        carry
    }

    /// Where the dirty map of `vpg` is kept under a VRA's data directory.
    pub fn map_path(data_dir: &std::path::Path, vpg: &VpgId) -> PathBuf {
        data_dir.join("protected").join(format!("{vpg}.dirty"))
    }

    /// Loads (and removes: it only stands for the clean stop that wrote it) a saved map.
    pub fn take_saved_map(path: &std::path::Path) -> Option<DirtyMap> {
        let bytes = std::fs::read(path).ok()?;
        let _ = std::fs::remove_file(path);
        match DirtyMap::decode(&bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring a damaged dirty map; a delta sync follows");
                None
            }
        }
    }
}

fn open_or_create(path: &std::path::Path, size: u64) -> VraResult<FileDevice> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(VraError::io("create datastore dir", parent))?;
    }
    let image = if path.exists() {
        // A volume grown in the inventory: the hypervisor's disk grows with it (zeroes).
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(VraError::io("open image", path))?;
        let len = file
            .metadata()
            .map_err(VraError::io("stat image", path))?
            .len();
        if len < size {
            file.set_len(size)
                .map_err(VraError::io("grow image", path))?;
            info!(path = %path.display(), from = len, to = size, "image grown to its volume's size");
        }
        drop(file);
        FileDevice::open(path)?
    } else {
        FileDevice::create_sparse(path, size)?
    };
    if image.size() != size {
        return Err(tandem_core::DomainError::precondition(format!(
            "image {} has {} bytes, the volume {size}",
            path.display(),
            image.size()
        ))
        .into());
    }
    Ok(image)
}
