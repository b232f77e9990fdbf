//! The protected role of one VPG: its volumes served over NBD ([`ProtectedVolume`]), its
//! bounded replication buffer, the checkpoint barrier actor (freeze / thaw / abort with a
//! timeout) and the sender task that streams the buffer to the recovery VRA.
//!
//! Write path: reserve buffer space (the VRA-wide RAM budget; when it is exhausted the
//! write waits, which back-pressures the NBD client: no bitmap fallback yet), lock the
//! written range of the volume, apply the write to the local image, enter it into the
//! buffer (which assigns its stream sequence), unlock, then wait while the VPG is frozen,
//! and acknowledge. Markers enter the buffer without a reservation so that a full buffer
//! cannot block a thaw.

use std::{
    io,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use tandem_core::ids::{VmId, VpgId};
use tandem_journal::{Checkpoint, CheckpointId, Seq, VolumeId};
use tandem_nbd::{BlockDevice, FileDevice, IoFuture};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    connector::Connector,
    error::{VraError, VraResult},
    model::{EntryBody, ProtectedAssignment},
    ranges::RangeLocks,
    sender,
    window::SendWindow,
};

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
    /// Largest single reservation (the whole budget).
    pub budget_total: u64,
    /// Counters.
    pub counters: ProtectedCounters,
    /// Set when the stream could not resume without loss: a sync is needed.
    pub needs_sync: AtomicBool,
    /// Whether the sender is connected.
    pub connected: AtomicBool,
    /// The last stream error.
    pub last_error: Mutex<String>,
    /// The checkpoint currently frozen (0: none).
    pub frozen_cp: AtomicU64,
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

    async fn reserve(&self, cost: u64) -> io::Result<u64> {
        let cost = cost.min(self.budget_total).min(u64::from(u32::MAX));
        let permit = tokio::select! {
            p = self.budget.acquire_many(cost as u32) => p.map_err(|_| shutting_down())?,
            () = self.cancel.cancelled() => return Err(shutting_down()),
        };
        permit.forget();
        Ok(cost)
    }

    fn push(&self, body: EntryBody, cost: u64) -> Seq {
        let seq = self.window().push(body, cost);
        self.wake.notify_one();
        seq
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

    /// A snapshot of the window's positions: (written, sent, acked, bytes, entries, anchored).
    pub fn positions(&self) -> (Seq, Seq, Seq, u64, usize, bool) {
        let w = self.window();
        (
            w.written_seq(),
            w.sent_seq(),
            w.acked_seq(),
            w.bytes(),
            w.len(),
            w.anchored(),
        )
    }
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
    ranges: RangeLocks,
    vpg: Arc<ProtectedShared>,
}

impl ProtectedVolume {
    async fn replicated(
        &self,
        offset: u64,
        len: u64,
        apply: IoFuture<'_, ()>,
        body: EntryBody,
    ) -> io::Result<()> {
        let cost = self.vpg.reserve(body.cost()).await?;
        let guard = self.ranges.lock(offset, len).await;
        if let Err(e) = apply.await {
            drop(guard);
            self.vpg.release(cost);
            return Err(e);
        }
        self.vpg.push(body, cost);
        drop(guard);
        let c = &self.vpg.counters;
        c.writes.fetch_add(1, Ordering::Relaxed);
        c.write_bytes.fetch_add(len, Ordering::Relaxed);
        self.vpg.thawed().await
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
                    None if self.shared.needs_sync.load(Ordering::Relaxed) => {
                        Err(self.err("the vpg needs a sync; no checkpoints until it is done"))
                    }
                    None if !self.shared.positions().5 => {
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
                        let seq = self.shared.push(EntryBody::Checkpoint(checkpoint), 0);
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
    /// Opens (creating missing) images and starts the barrier and the sender.
    pub fn start(
        assignment: ProtectedAssignment,
        budget: Arc<Semaphore>,
        budget_total: u64,
        connector: Connector,
        host_id: String,
        parent: &CancellationToken,
    ) -> VraResult<Self> {
        let cancel = parent.child_token();
        let (frozen_tx, frozen_rx) = watch::channel(false);
        let shared = Arc::new(ProtectedShared {
            assignment: assignment.clone(),
            window: Mutex::new(SendWindow::new()),
            wake: Notify::new(),
            budget,
            budget_total,
            counters: ProtectedCounters::default(),
            needs_sync: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            last_error: Mutex::new(String::new()),
            frozen_cp: AtomicU64::new(0),
            frozen: frozen_rx,
            cancel: cancel.clone(),
        });
        let mut volumes = Vec::new();
        for vm in &assignment.vms {
            let vm_id = Arc::new(vm.vm.clone());
            for vol in &vm.volumes {
                let image = open_or_create(&vol.path, vol.size)?;
                volumes.push((
                    export_name(&vm.vm, vol.id),
                    Arc::new(ProtectedVolume {
                        image,
                        vm: vm_id.clone(),
                        volume: vol.id,
                        ranges: RangeLocks::default(),
                        vpg: shared.clone(),
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
            connector,
            host_id,
            cancel.clone(),
        ));
        tasks.close();
        info!(vpg = %assignment.vpg, generation = assignment.generation.0, volumes = volumes.len(), "protected vpg started");
        Ok(Self {
            shared,
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

    /// Stops the barrier and the sender, releases the buffer.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.tasks.wait().await;
        let freed = self.shared.window().clear();
        self.shared.release(freed);
        info!(vpg = %self.shared.assignment.vpg, "protected vpg stopped");
    }
}

fn open_or_create(path: &std::path::Path, size: u64) -> VraResult<FileDevice> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(VraError::io("create datastore dir", parent))?;
    }
    let image = if path.exists() {
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
