//! A VPG recovered to this VRA by a failover or a move. Before commit its volumes are the
//! point-in-time images at the chosen checkpoint under durable overlays: journals and
//! replicas stay exactly as they were and the replication stream is refused, so a rollback
//! gives the recovery role back untouched. Commit promotes every journal to the checkpoint
//! while the VMs keep running on the images (promotion writes only records up to the
//! checkpoint, which is where the images read the journal, never what they read from the
//! replica), then serves the replicas with the overlays on top and merges the overlays into
//! them behind the running VMs, then serves the replicas alone. The phase is persisted in
//! `<vpg state dir>/recovered.json` before its work starts, so a restart resumes it.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tandem_core::ids::{RecoveryOpId, VmId, VpgId};
use tandem_journal::{
    CheckpointId, DurableOverlay, Generation, ImageOptions, Journal, PointInTimeImage, VolumeId,
};
use tandem_nbd::{BlockDevice, IoFuture};
use tandem_proto::v1 as pb;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    error::{VraError, VraResult},
    model::RecoveryAssignment,
    state::write_atomic,
};

/// Overlay blocks are merged into a replica in pieces of at most this many bytes (the
/// VM's IO on the volume waits for one piece).
const MERGE_CHUNK: u64 = 1 << 20;
/// Zeroes are written to a replica in pieces of at most this many bytes.
const ZERO_CHUNK: u64 = 1 << 20;
/// How long a commit or rollback waits for the last users of the old journals to go.
const RELEASE_PATIENCE: Duration = Duration::from_secs(10);

/// Where a recovered VPG is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecoveredPhase {
    /// Images at the checkpoint under overlays; a rollback is still possible.
    BeforeCommit,
    /// Committed: the journals are being promoted to the checkpoint.
    Promoting,
    /// The overlays are being merged into the replicas.
    Merging,
    /// The replicas are the VMs' volumes.
    Live,
}

impl RecoveredPhase {
    fn to_pb(self) -> pb::RecoveredPhase {
        match self {
            Self::BeforeCommit => pb::RecoveredPhase::BeforeCommit,
            Self::Promoting => pb::RecoveredPhase::Promoting,
            Self::Merging => pb::RecoveredPhase::Merging,
            Self::Live => pb::RecoveredPhase::Live,
        }
    }
}

/// What is persisted of a recovered VPG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveredRecord {
    /// The operation that recovered it.
    pub op_id: RecoveryOpId,
    /// The checkpoint recovered to.
    pub checkpoint: CheckpointId,
    /// Where it is.
    pub phase: RecoveredPhase,
    /// The generation the commit moved the VPG to.
    pub new_generation: Option<Generation>,
    /// The recovery role it replaced: its journals and replicas, given back by a rollback.
    pub assignment: RecoveryAssignment,
}

/// The record's file in a VPG's state directory.
pub fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("recovered.json")
}

fn overlay_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("recovery")
}

/// Loads a VPG's record, if it was recovered here.
pub fn load_record(state_dir: &Path) -> VraResult<Option<RecoveredRecord>> {
    let path = record_path(state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| VraError::Io {
                op: "parse recovered record",
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VraError::io("read recovered record", path)(e)),
    }
}

fn save_record(state_dir: &Path, r: &RecoveredRecord) -> VraResult<()> {
    let bytes = serde_json::to_vec_pretty(r).map_err(|e| VraError::Io {
        op: "encode recovered record",
        path: record_path(state_dir),
        source: io::Error::other(e),
    })?;
    write_atomic(&record_path(state_dir), &bytes)
}

/// Removes what a recovered VPG keeps in its state directory (after a rollback, or when
/// it is unassigned).
pub fn remove_state(state_dir: &Path) -> VraResult<()> {
    match std::fs::remove_dir_all(overlay_dir(state_dir)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(VraError::io("remove overlays", overlay_dir(state_dir))(e));
        }
        _ => {}
    }
    match std::fs::remove_file(record_path(state_dir)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(VraError::io(
            "remove recovered record",
            record_path(state_dir),
        )(e)),
        _ => Ok(()),
    }
}

enum Backend {
    /// Before commit and while promoting.
    Image {
        image: PointInTimeImage,
        overlay: Arc<DurableOverlay>,
    },
    Merging {
        replica: Arc<File>,
        overlay: Arc<DurableOverlay>,
    },
    Live {
        replica: Arc<File>,
    },
}

struct VolumeState {
    vm: VmId,
    volume: VolumeId,
    size: u64,
    replica_path: PathBuf,
    backend: RwLock<Backend>,
}

/// One volume of a recovered VM, served over NBD as `"<vm>/<volume>"` through every phase.
/// A phase switch waits for the requests in flight (they hold the backend for reading).
#[derive(Clone)]
pub struct RecoveredVolume {
    inner: Arc<VolumeState>,
}

impl std::fmt::Debug for RecoveredVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RecoveredVolume({}/{})",
            self.inner.vm, self.inner.volume
        )
    }
}

fn open_replica(path: &Path) -> io::Result<Arc<File>> {
    Ok(Arc::new(
        OpenOptions::new().read(true).write(true).open(path)?,
    ))
}

fn zero_file(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; ZERO_CHUNK.min(len) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = ZERO_CHUNK.min(offset + len - at);
        file.write_all_at(&zeroes[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

impl VolumeState {
    fn backend(&self) -> std::sync::RwLockReadGuard<'_, Backend> {
        self.backend.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} outside a volume of {} bytes",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        match &*self.backend() {
            Backend::Image { image, overlay } => {
                overlay.read(&|o, b| image.read_at(o, b), offset, buf)
            }
            Backend::Merging { replica, overlay } => {
                overlay.read(&|o, b| replica.read_exact_at(b, o), offset, buf)
            }
            Backend::Live { replica } => replica.read_exact_at(buf, offset),
        }
    }

    /// Writes `data` (`None`: `len` zeroes).
    fn write_at(&self, offset: u64, data: Option<&[u8]>, len: u64, fua: bool) -> io::Result<()> {
        self.check(offset, len)?;
        let into_overlay = |overlay: &DurableOverlay, base: tandem_journal::overlay::BaseRead| {
            match data {
                Some(d) => overlay.write(base, offset, d)?,
                None => overlay.write_zeroes(base, offset, len)?,
            }
            if fua { overlay.flush() } else { Ok(()) }
        };
        let into_replica = |replica: &File| {
            match data {
                Some(d) => replica.write_all_at(d, offset)?,
                None => zero_file(replica, offset, len)?,
            }
            if fua { replica.sync_data() } else { Ok(()) }
        };
        match &*self.backend() {
            Backend::Image { image, overlay } => into_overlay(overlay, &|o, b| image.read_at(o, b)),
            // A range the overlay holds part of is written there (the merge carries it
            // over); anything else goes to the replica directly.
            Backend::Merging { replica, overlay } if overlay.holds(offset, len) => {
                into_overlay(overlay, &|o, b| replica.read_exact_at(b, o))
            }
            Backend::Merging { replica, .. } | Backend::Live { replica } => into_replica(replica),
        }
    }

    fn flush(&self) -> io::Result<()> {
        match &*self.backend() {
            Backend::Image { overlay, .. } => overlay.flush(),
            // The overlay's discards are made durable only after the replica holds their
            // bytes durably.
            Backend::Merging { replica, overlay } => {
                replica.sync_data()?;
                overlay.flush()
            }
            Backend::Live { replica } => replica.sync_data(),
        }
    }

    fn phase_bytes(&self) -> u64 {
        match &*self.backend() {
            Backend::Image { overlay, .. } | Backend::Merging { overlay, .. } => {
                overlay.written_bytes()
            }
            Backend::Live { .. } => 0,
        }
    }

    /// Serves the replica (promoted to the checkpoint) under the overlay; the image goes
    /// and with it its pin.
    fn to_merging(&self) -> io::Result<()> {
        let mut b = self.backend.write().unwrap_or_else(PoisonError::into_inner);
        if let Backend::Image { overlay, .. } = &*b {
            let overlay = overlay.clone();
            *b = Backend::Merging {
                replica: open_replica(&self.replica_path)?,
                overlay,
            };
        }
        Ok(())
    }

    /// Moves one piece of the overlay into the replica; true once nothing is left (the
    /// volume is then live on its replica).
    fn merge_step(&self) -> io::Result<bool> {
        let mut b = self.backend.write().unwrap_or_else(PoisonError::into_inner);
        let Backend::Merging { replica, overlay } = &*b else {
            return Ok(true);
        };
        let Some(&(start, len)) = overlay.written().first() else {
            // Every discard durable before the replica alone serves: a restart must not
            // merge a stale piece over writes made after this.
            overlay.flush()?;
            let replica = replica.clone();
            let path = overlay.path().to_path_buf();
            *b = Backend::Live { replica };
            drop(b);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            return Ok(true);
        };
        let n = len.min(MERGE_CHUNK);
        let mut buf = vec![0u8; n as usize];
        overlay.read(&|o, b| replica.read_exact_at(b, o), start, &mut buf)?;
        replica.write_all_at(&buf, start)?;
        replica.sync_data()?;
        overlay.discard(start, n)?;
        Ok(false)
    }
}

impl RecoveredVolume {
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&VolumeState) -> io::Result<T> + Send + 'static,
    ) -> IoFuture<'_, T> {
        let inner = self.inner.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&inner))
                .await
                .map_err(|e| io::Error::other(format!("recovered volume io task failed: {e}")))?
        })
    }

    /// The VM.
    pub fn vm(&self) -> &VmId {
        &self.inner.vm
    }

    /// The volume.
    pub fn volume(&self) -> VolumeId {
        self.inner.volume
    }
}

impl BlockDevice for RecoveredVolume {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        self.blocking(move |v| {
            let mut buf = vec![0u8; len as usize];
            v.read_at(offset, &mut buf)?;
            Ok(Bytes::from(buf))
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        self.blocking(move |v| v.write_at(offset, Some(&data), data.len() as u64, fua))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.blocking(VolumeState::flush)
    }

    fn trim(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.blocking(move |v| v.write_at(offset, None, len, false))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        self.blocking(move |v| v.write_at(offset, None, len, fua))
    }
}

/// A VPG recovered here (see the module docs).
pub struct RecoveredVpg {
    vpg: VpgId,
    state_dir: PathBuf,
    record: Mutex<RecoveredRecord>,
    volumes: Vec<(String, RecoveredVolume)>,
    /// Open until the commit has promoted them.
    journals: Mutex<Vec<(VmId, Arc<Journal>)>>,
    committing: AtomicBool,
    error: Mutex<String>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for RecoveredVpg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecoveredVpg({})", self.vpg)
    }
}

/// The export name of a recovered volume (the protected role's name for it).
pub fn export_name(vm: &VmId, volume: VolumeId) -> String {
    format!("{vm}/{}", volume.0)
}

impl RecoveredVpg {
    /// Opens a recovered VPG in the record's phase (blocking IO). `journals`: the recovery
    /// role's open journals, before the commit has promoted them (else unused). The record
    /// is saved first.
    pub fn open(
        record: RecoveredRecord,
        state_dir: &Path,
        journals: Vec<(VmId, Arc<Journal>)>,
        parent: &CancellationToken,
    ) -> VraResult<Self> {
        let ovl_dir = overlay_dir(state_dir);
        std::fs::create_dir_all(&ovl_dir).map_err(VraError::io("create overlay dir", &ovl_dir))?;
        save_record(state_dir, &record)?;
        let mut volumes = Vec::new();
        for vm in &record.assignment.vms {
            let journal = journals.iter().find(|(v, _)| *v == vm.vm).map(|(_, j)| j);
            for v in &vm.volumes {
                let overlay_path = ovl_dir.join(format!("{}-{}.overlay", vm.vm, v.id.0));
                let overlay = || {
                    DurableOverlay::open(&overlay_path, v.size)
                        .map(Arc::new)
                        .map_err(VraError::io("open overlay", &overlay_path))
                };
                let backend = match record.phase {
                    RecoveredPhase::BeforeCommit | RecoveredPhase::Promoting => {
                        let journal = journal.ok_or_else(|| {
                            VraError::Stream(format!("no open journal for vm {}", vm.vm))
                        })?;
                        Backend::Image {
                            image: journal.open_image(
                                record.checkpoint,
                                v.id,
                                &ImageOptions::default(),
                            )?,
                            overlay: overlay()?,
                        }
                    }
                    RecoveredPhase::Merging => Backend::Merging {
                        replica: open_replica(&v.path)
                            .map_err(VraError::io("open replica", &v.path))?,
                        overlay: overlay()?,
                    },
                    RecoveredPhase::Live => Backend::Live {
                        replica: open_replica(&v.path)
                            .map_err(VraError::io("open replica", &v.path))?,
                    },
                };
                volumes.push((
                    export_name(&vm.vm, v.id),
                    RecoveredVolume {
                        inner: Arc::new(VolumeState {
                            vm: vm.vm.clone(),
                            volume: v.id,
                            size: v.size,
                            replica_path: v.path.clone(),
                            backend: RwLock::new(backend),
                        }),
                    },
                ));
            }
        }
        let tasks = TaskTracker::new();
        Ok(Self {
            vpg: record.assignment.vpg.clone(),
            state_dir: state_dir.to_path_buf(),
            record: Mutex::new(record),
            volumes,
            journals: Mutex::new(journals),
            committing: AtomicBool::new(false),
            error: Mutex::new(String::new()),
            cancel: parent.child_token(),
            tasks,
        })
    }

    /// The VPG.
    pub fn id(&self) -> &VpgId {
        &self.vpg
    }

    /// A copy of its record.
    pub fn record(&self) -> RecoveredRecord {
        self.record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Its volumes with their export names.
    pub fn volumes(&self) -> &[(String, RecoveredVolume)] {
        &self.volumes
    }

    /// The volumes as reported in status.
    pub fn volume_status(&self) -> Vec<pb::RecoveredVolumeStatus> {
        self.volumes
            .iter()
            .map(|(name, v)| pb::RecoveredVolumeStatus {
                vm_id: v.inner.vm.to_string(),
                volume_id: v.inner.volume.0,
                export_name: name.clone(),
                size_bytes: v.inner.size,
                overlay_bytes: v.inner.phase_bytes(),
            })
            .collect()
    }

    /// Its phase as reported in status.
    pub fn phase_pb(&self) -> pb::RecoveredPhase {
        self.record().phase.to_pb()
    }

    /// Why the commit is not going on (empty: it is, or it is done).
    pub fn last_error(&self) -> String {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_phase(
        &self,
        phase: RecoveredPhase,
        new_generation: Option<Generation>,
    ) -> VraResult<()> {
        let mut r = self.record.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = r.clone();
        next.phase = phase;
        if new_generation.is_some() {
            next.new_generation = new_generation;
        }
        save_record(&self.state_dir, &next)?;
        *r = next;
        Ok(())
    }

    /// Commits at `new_generation` (the first commit's generation holds; a repeat is a
    /// no-op): returns once Promoting is persisted; the work goes on in the background
    /// (resumed after a restart by [`Self::resume`]).
    pub fn commit(self: &Arc<Self>, new_generation: Generation) -> VraResult<()> {
        let r = self.record();
        if let Some(g) = r.new_generation
            && g != new_generation
        {
            return Err(tandem_core::DomainError::precondition(format!(
                "vpg {} was committed at generation {}, not {}",
                self.vpg, g.0, new_generation.0
            ))
            .into());
        }
        if new_generation <= r.assignment.generation {
            return Err(tandem_core::DomainError::invalid(
                "new_generation",
                format!("must be above {}", r.assignment.generation.0),
            )
            .into());
        }
        if r.phase == RecoveredPhase::BeforeCommit {
            self.set_phase(RecoveredPhase::Promoting, Some(new_generation))?;
        }
        self.resume();
        Ok(())
    }

    /// Runs the commit's remaining work in the background, unless it runs or is done.
    pub fn resume(self: &Arc<Self>) {
        let phase = self.record().phase;
        if matches!(phase, RecoveredPhase::BeforeCommit | RecoveredPhase::Live)
            || self.committing.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let me = self.clone();
        self.tasks.spawn(async move {
            let r = me.run_commit().await;
            let mut err = me.error.lock().unwrap_or_else(PoisonError::into_inner);
            match r {
                Ok(()) => err.clear(),
                Err(e) => {
                    warn!(vpg = %me.vpg, error = %e, "committing a recovery stopped");
                    *err = e.to_string();
                }
            }
            drop(err);
            me.committing.store(false, Ordering::SeqCst);
        });
    }

    async fn run_commit(self: &Arc<Self>) -> VraResult<()> {
        let checkpoint = self.record().checkpoint;
        if self.record().phase == RecoveredPhase::Promoting {
            let journals = self
                .journals
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let started = std::time::Instant::now();
            let promotions: Vec<_> = journals
                .into_iter()
                .map(|(_, j)| {
                    tokio::task::spawn_blocking(move || j.promote_to_checkpoint(checkpoint))
                })
                .collect();
            for p in promotions {
                p.await.map_err(|_| VraError::ShuttingDown)??;
            }
            info!(vpg = %self.vpg, checkpoint = checkpoint.0, elapsed_ms = started.elapsed().as_millis() as u64, "journals promoted to the recovered checkpoint");
            for (_, v) in &self.volumes {
                let v = v.inner.clone();
                tokio::task::spawn_blocking(move || v.to_merging())
                    .await
                    .map_err(|_| VraError::ShuttingDown)?
                    .map_err(VraError::io("open replica", &self.state_dir))?;
            }
            self.set_phase(RecoveredPhase::Merging, None)?;
        }
        if self.record().phase == RecoveredPhase::Merging {
            self.drop_journals().await;
            // Records after the checkpoint are not part of the recovered VMs, and the
            // stream's state belongs to the old role.
            let a = self.record().assignment;
            for vm in &a.vms {
                remove_if_there(&vm.journal_dir, true)?;
            }
            remove_if_there(&self.state_dir.join("stream.json"), false)?;
            remove_if_there(&self.state_dir.join("scratch"), true)?;
            for (_, v) in &self.volumes {
                loop {
                    if self.cancel.is_cancelled() {
                        return Err(VraError::ShuttingDown);
                    }
                    let step = v.inner.clone();
                    let done = tokio::task::spawn_blocking(move || step.merge_step())
                        .await
                        .map_err(|_| VraError::ShuttingDown)?
                        .map_err(VraError::io("merge overlay", &v.inner.replica_path))?;
                    if done {
                        break;
                    }
                }
            }
            self.set_phase(RecoveredPhase::Live, None)?;
            remove_if_there(&overlay_dir(&self.state_dir), true)?;
            info!(vpg = %self.vpg, "recovered volumes live on their replicas");
        }
        Ok(())
    }

    /// Closes the journals once their last users are gone (or after a patience).
    pub async fn drop_journals(&self) {
        let journals =
            std::mem::take(&mut *self.journals.lock().unwrap_or_else(PoisonError::into_inner));
        let weak: Vec<_> = journals.iter().map(|(_, j)| Arc::downgrade(j)).collect();
        drop(journals);
        let deadline = tokio::time::Instant::now() + RELEASE_PATIENCE;
        while weak.iter().any(|w| w.strong_count() > 0) {
            if tokio::time::Instant::now() > deadline {
                warn!(vpg = %self.vpg, "old journals still referenced; going on");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the background work.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

fn remove_if_there(path: &Path, dir: bool) -> VraResult<()> {
    let r = if dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(VraError::io("remove", path)(e)),
        _ => Ok(()),
    }
}
