//! The recovery role of one VPG: one journal per VM (opened with sparse sequences, so
//! every journal carries stream sequence numbers), the receiver actor that fences senders
//! and appends their entries, the acknowledgement path (computed by [`AckTracker`], sent
//! at once when every journal shows it, else once persisted as a floor in `stream.json`),
//! periodic journal maintenance
//! (promotion of history older than the window), point-in-time images, and block hashes
//! of the newest durable image for delta sync ([`RecoveryVpg::compare_blocks`]).
//!
//! Tasks of a VPG: the actor; one durability forwarder per journal (wakes the actor when
//! a journal's durable position moves); the ack persister; the maintenance ticker. All
//! stop on the VPG's cancellation token and are joined by [`RecoveryVpg::stop`].

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tandem_core::ids::{VmId, VpgId};
use tandem_journal::{
    CheckpointId, CheckpointState, Generation, ImageOptions, Journal, JournalConfig,
    PointInTimeImage, RecordBody, Seq, UnixMillis, VolumeId, VolumeSpec,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    error::{VraError, VraResult},
    fence::{AckTracker, FenceError, SessionId, StreamFence, check_generation},
    hashes,
    model::{Entry, EntryBody, RecoveryAssignment},
};

/// How often journals are maintained (history window promotion, limits).
const MAINTAIN_EVERY: Duration = Duration::from_secs(5);

/// A byte range of one volume of a recovered VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRange {
    /// The VM.
    pub vm: VmId,
    /// Its volume.
    pub volume: VolumeId,
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

/// A checkpoint of the VPG as seen across its journals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpgCheckpoint {
    /// The marker (from the first journal).
    pub checkpoint: tandem_journal::Checkpoint,
    /// Its stream sequence.
    pub seq: Seq,
    /// Durable in every journal.
    pub durable: bool,
    /// Images can be opened at it in every journal.
    pub usable: bool,
}

/// Which storage keeps a recovery VPG's entries from becoming durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFault {
    /// The datastore is full; the journal resumes once space returns.
    RecoveryStorage,
    /// A journal write or fsync failed; the journal must be reopened.
    Journal,
}

/// Counters and positions of a recovery VPG, for status.
#[derive(Debug, Default)]
pub struct RecoveryCounters {
    /// Write records received.
    pub writes: AtomicU64,
    /// Bytes received in write records.
    pub write_bytes: AtomicU64,
    /// Highest sequence acknowledged to the sender (persisted first).
    pub acked: AtomicU64,
    /// Highest sequence durable in every journal.
    pub durable: AtomicU64,
    /// Sessions accepted.
    pub sessions: AtomicU64,
    /// Whether a session is open.
    pub connected: AtomicU64,
    /// Rates of write records and bytes received.
    pub rates: crate::rates::RateMeter<2>,
}

/// Where acknowledgements stand: what is durable in every journal that holds it, and the
/// lowest durable position of any journal (which a restart reopens at, with no help).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AckProgress {
    acked: Seq,
    in_every_journal: Seq,
}

impl AckProgress {
    /// What may be acknowledged when `floor` is persisted: a restart resumes at the larger
    /// of the journals' lowest durable position and the floor, and must not resume below
    /// anything acknowledged.
    fn safe(&self, floor: Seq) -> Seq {
        self.acked.min(self.in_every_journal.max(floor))
    }
}

/// Persisted acknowledgement floor of a VPG (`<state dir>/stream.json`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct StreamFloor {
    generation: u64,
    acked: u64,
}

enum Msg {
    Hello {
        generation: Generation,
        reply: oneshot::Sender<VraResult<(SessionId, Seq, Seq)>>,
    },
    Batch {
        session: SessionId,
        entries: Vec<Entry>,
        reply: oneshot::Sender<VraResult<()>>,
    },
    End {
        session: SessionId,
    },
    Checkpoints {
        reply: oneshot::Sender<Vec<VpgCheckpoint>>,
    },
}

struct Lane {
    vm: VmId,
    journal: Arc<Journal>,
}

struct Actor {
    vpg: VpgId,
    generation: Generation,
    lanes: Vec<Lane>,
    by_vm: HashMap<VmId, usize>,
    fence: StreamFence,
    tracker: AckTracker,
    durable_moved: Arc<Notify>,
    to_persist: watch::Sender<AckProgress>,
    persisted: watch::Receiver<Seq>,
    counters: Arc<RecoveryCounters>,
    last_error: Arc<Mutex<String>>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.durable_moved.notified() => self.refresh_durable(),
                msg = rx.recv() => match msg {
                    Some(m) => self.handle(m),
                    None => break,
                },
            }
        }
    }

    fn refresh_durable(&mut self) {
        for (i, lane) in self.lanes.iter().enumerate() {
            let d = lane.journal.subscribe_durable().borrow().clone();
            if let Some(f) = &d.failed {
                self.set_error(format!("journal of vm {} failed: {f}", lane.vm));
            }
            self.tracker.durable(i, d.seq);
        }
        let progress = AckProgress {
            acked: self.tracker.acked(),
            in_every_journal: self.tracker.min_durable(),
        };
        self.counters
            .durable
            .store(progress.acked.0, Ordering::Relaxed);
        self.to_persist.send_if_modified(|cur| {
            if progress.acked > cur.acked || progress.in_every_journal > cur.in_every_journal {
                *cur = progress;
                true
            } else {
                false
            }
        });
    }

    fn set_error(&self, e: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = e;
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Hello { generation, reply } => {
                // A resuming sender continues after the persisted acknowledgement (everything
                // up to it is durable everywhere; journals skip resent entries they hold); a
                // sender that cannot resume starts after everything any journal holds.
                self.refresh_durable();
                let resume = *self.persisted.borrow();
                let held = self
                    .lanes
                    .iter()
                    .map(|l| l.journal.last_seq())
                    .max()
                    .unwrap_or(Seq(0))
                    .max(self.tracker.received_seq())
                    .max(resume);
                let r = self
                    .fence
                    .hello(generation, resume, held)
                    .map(|s| (s, resume, held))
                    .map_err(|e| self.fence_error(e));
                if r.is_ok() {
                    self.counters.sessions.fetch_add(1, Ordering::Relaxed);
                    self.counters.connected.store(1, Ordering::Relaxed);
                }
                let _ = reply.send(r);
            }
            Msg::Batch {
                session,
                entries,
                reply,
            } => {
                let r = self.batch(session, entries);
                if let Err(e) = &r {
                    self.set_error(e.to_string());
                }
                self.refresh_durable();
                let _ = reply.send(r);
            }
            Msg::End { session } => {
                self.fence.end(session);
                if self.fence.current().is_none() {
                    self.counters.connected.store(0, Ordering::Relaxed);
                }
            }
            Msg::Checkpoints { reply } => {
                let _ = reply.send(self.checkpoints());
            }
        }
    }

    fn fence_error(&self, e: FenceError) -> VraError {
        fence_error(&self.vpg, e)
    }

    fn batch(&mut self, session: SessionId, entries: Vec<Entry>) -> VraResult<()> {
        for e in entries {
            self.fence
                .accept(session, e.seq)
                .map_err(|err| self.fence_error(err))?;
            let seq = e.seq;
            let (vm, record) = match e.body {
                EntryBody::Checkpoint(cp) => {
                    for i in 0..self.lanes.len() {
                        self.submit(i, seq, RecordBody::Checkpoint(cp.clone()))?;
                    }
                    self.tracker.received(seq);
                    continue;
                }
                EntryBody::Write {
                    vm,
                    volume,
                    offset,
                    data,
                } => {
                    self.counters.writes.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .write_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    (
                        vm,
                        RecordBody::Write {
                            volume,
                            offset,
                            data,
                        },
                    )
                }
                EntryBody::Zero {
                    vm,
                    volume,
                    offset,
                    len,
                } => (
                    vm,
                    RecordBody::Zero {
                        volume,
                        offset,
                        len,
                    },
                ),
                EntryBody::Trim {
                    vm,
                    volume,
                    offset,
                    len,
                } => (
                    vm,
                    RecordBody::Trim {
                        volume,
                        offset,
                        len,
                    },
                ),
            };
            let lane = *self.by_vm.get(vm.as_ref()).ok_or_else(|| {
                VraError::Stream(format!("entry {seq} for vm {vm} not in vpg {}", self.vpg))
            })?;
            self.submit(lane, seq, record)?;
            self.tracker.received(e.seq);
        }
        Ok(())
    }

    /// Hands a record to a journal unless it already holds that sequence (a resend).
    fn submit(&mut self, lane: usize, seq: Seq, record: RecordBody) -> VraResult<()> {
        let journal = &self.lanes[lane].journal;
        if seq <= journal.last_seq() {
            return Ok(());
        }
        journal.submit(seq, self.generation, record)?;
        self.tracker.submitted(lane, seq);
        Ok(())
    }

    fn checkpoints(&self) -> Vec<VpgCheckpoint> {
        let per_lane: Vec<HashMap<CheckpointId, tandem_journal::CheckpointInfo>> = self
            .lanes
            .iter()
            .map(|l| {
                l.journal
                    .checkpoints()
                    .into_iter()
                    .map(|c| (c.checkpoint.id, c))
                    .collect()
            })
            .collect();
        let Some(first) = self.lanes.first() else {
            return Vec::new();
        };
        first
            .journal
            .checkpoints()
            .into_iter()
            .map(|c| {
                let states: Vec<Option<CheckpointState>> = per_lane
                    .iter()
                    .map(|m| m.get(&c.checkpoint.id).map(|i| i.state))
                    .collect();
                VpgCheckpoint {
                    durable: states.iter().all(|s| {
                        matches!(s, Some(CheckpointState::Usable | CheckpointState::Promoted))
                    }),
                    usable: states.iter().all(|s| *s == Some(CheckpointState::Usable)),
                    seq: c.seq,
                    checkpoint: c.checkpoint,
                }
            })
            .collect()
    }
}

/// A running recovery VPG.
#[derive(Debug)]
pub struct RecoveryVpg {
    assignment: RecoveryAssignment,
    tx: mpsc::Sender<Msg>,
    journals: Vec<(VmId, Arc<Journal>)>,
    acked: watch::Receiver<Seq>,
    counters: Arc<RecoveryCounters>,
    last_error: Arc<Mutex<String>>,
    scratch_dir: PathBuf,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecoveryMsg")
    }
}

impl RecoveryVpg {
    /// Opens the journals (blocking IO: call from a blocking context) and starts the
    /// actor. `state_dir` holds the VPG's `stream.json` and scratch overlays.
    pub fn start(
        assignment: RecoveryAssignment,
        state_dir: &Path,
        parent: &CancellationToken,
    ) -> VraResult<Self> {
        std::fs::create_dir_all(state_dir)
            .map_err(VraError::io("create vpg state dir", state_dir))?;
        let journals = open_journals(&assignment)?;
        let floor = read_floor(state_dir)
            .filter(|f| f.generation <= assignment.generation.0)
            .map_or(Seq(0), |f| Seq(f.acked));
        let durable: Vec<Seq> = journals.iter().map(|(_, j)| j.durable_seq()).collect();
        let tracker = AckTracker::new(&durable, floor);
        let mut tracker_probe = tracker.clone();
        let start = tracker_probe.acked();
        let cancel = parent.child_token();
        let tasks = TaskTracker::new();
        let counters = Arc::new(RecoveryCounters::default());
        counters.acked.store(start.0, Ordering::Relaxed);
        counters.durable.store(start.0, Ordering::Relaxed);
        let last_error = Arc::new(Mutex::new(String::new()));
        let durable_moved = Arc::new(Notify::new());
        for (_, j) in &journals {
            let mut rx = j.subscribe_durable();
            let notify = durable_moved.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        r = rx.changed() => {
                            if r.is_err() {
                                break;
                            }
                            notify.notify_one();
                        }
                    }
                }
            });
        }
        let (to_persist, persist_rx) = watch::channel(AckProgress {
            acked: start,
            in_every_journal: start,
        });
        let (acked_tx, acked_rx) = watch::channel(start);
        tasks.spawn(persist_acks(
            state_dir.to_path_buf(),
            assignment.generation,
            persist_rx,
            acked_tx,
            counters.clone(),
            last_error.clone(),
            cancel.clone(),
        ));
        tasks.spawn(maintain(
            journals.iter().map(|(_, j)| j.clone()).collect(),
            assignment.vpg.clone(),
            cancel.clone(),
        ));
        let lanes: Vec<Lane> = journals
            .iter()
            .map(|(vm, j)| Lane {
                vm: vm.clone(),
                journal: j.clone(),
            })
            .collect();
        let by_vm = lanes
            .iter()
            .enumerate()
            .map(|(i, l)| (l.vm.clone(), i))
            .collect();
        let (tx, rx) = mpsc::channel(64);
        let actor = Actor {
            vpg: assignment.vpg.clone(),
            generation: assignment.generation,
            lanes,
            by_vm,
            fence: StreamFence::new(assignment.generation),
            tracker,
            durable_moved,
            to_persist,
            persisted: acked_rx.clone(),
            counters: counters.clone(),
            last_error: last_error.clone(),
        };
        tasks.spawn(actor.run(rx, cancel.clone()));
        tasks.close();
        info!(vpg = %assignment.vpg, generation = assignment.generation.0, resume = start.0, "recovery vpg started");
        Ok(Self {
            scratch_dir: state_dir.join("scratch"),
            assignment,
            tx,
            journals,
            acked: acked_rx,
            counters,
            last_error,
            cancel,
            tasks,
        })
    }

    /// The VPG.
    pub fn id(&self) -> &VpgId {
        &self.assignment.vpg
    }

    /// The assignment.
    pub fn assignment(&self) -> &RecoveryAssignment {
        &self.assignment
    }

    /// Counters.
    pub fn counters(&self) -> &RecoveryCounters {
        &self.counters
    }

    /// The last error.
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Per VM journal: size, durable position, newest durable and oldest usable checkpoint,
    /// size level.
    pub fn journal_status(&self) -> Vec<tandem_proto::v1::VraJournalStatus> {
        use tandem_journal::CheckpointState;
        self.journals
            .iter()
            .map(|(vm, j)| {
                let st = j.status();
                let cps = j.checkpoints();
                let mut usable = cps.iter().filter(|c| c.state == CheckpointState::Usable);
                let oldest = usable.clone().next();
                let newest = usable.next_back();
                tandem_proto::v1::VraJournalStatus {
                    vm_id: vm.to_string(),
                    size_bytes: st.size_bytes,
                    durable_seq: j.durable_seq().0,
                    last_durable_checkpoint_id: newest.map_or(0, |c| c.checkpoint.id.0),
                    oldest_checkpoint_id: oldest.map_or(0, |c| c.checkpoint.id.0),
                    oldest_checkpoint_ms: oldest.map_or(0, |c| c.checkpoint.timestamp.0),
                    above_warning: st.level != tandem_journal::SizeLevel::Normal,
                    history_not_meeting_sla: st.history_not_meeting_sla,
                }
            })
            .collect()
    }

    /// Total journal bytes.
    pub fn journal_bytes(&self) -> u64 {
        self.journals
            .iter()
            .map(|(_, j)| j.status().size_bytes)
            .sum()
    }

    /// Why entries cannot become durable, if they cannot: a journal's write or fsync
    /// failed (an I/O error: it refuses entries until it is reopened), or a journal waits
    /// for space on a full datastore (it resumes by itself once space is freed). A failed
    /// journal counts first.
    pub fn storage_fault(&self) -> Option<(StorageFault, String)> {
        let states: Vec<_> = self
            .journals
            .iter()
            .map(|(vm, j)| (vm, j.subscribe_durable().borrow().clone()))
            .collect();
        let failed = states.iter().find_map(|(vm, d)| {
            let f = d.failed.as_ref()?;
            Some((
                StorageFault::Journal,
                format!("journal storage error: journal of vm {vm} failed: {f}"),
            ))
        });
        failed.or_else(|| {
            states.iter().find_map(|(vm, d)| {
                let f = d.stalled.as_ref()?;
                Some((
                    StorageFault::RecoveryStorage,
                    format!("recovery storage error: journal of vm {vm}: {f}"),
                ))
            })
        })
    }

    /// The storage fault's description (see [`Self::storage_fault`]).
    pub fn storage_error(&self) -> Option<String> {
        self.storage_fault().map(|(_, e)| e)
    }

    /// Whether a journal failed hard and every file it would write can be written again
    /// (the cause, say a read-only or immutable file, is gone): reopening it then brings
    /// the VPG back. The probe opens each segment file for writing and creates and
    /// removes a file in each failed journal's directory.
    pub fn journal_failure_resolved(&self) -> bool {
        let mut any = false;
        for (_, j) in &self.journals {
            if j.subscribe_durable().borrow().failed.is_none() {
                continue;
            }
            any = true;
            if !dir_writable(j.dir()) {
                return false;
            }
        }
        any
    }

    /// The VPG's journals by VM (a recovery before commit keeps them open).
    pub fn journals(&self) -> Vec<(VmId, Arc<Journal>)> {
        self.journals.clone()
    }

    /// The VPG's cancellation token (sessions end with it).
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    async fn ask<T>(&self, msg: impl FnOnce(oneshot::Sender<T>) -> Msg) -> VraResult<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(msg(tx))
            .await
            .map_err(|_| VraError::ShuttingDown)?;
        rx.await.map_err(|_| VraError::ShuttingDown)
    }

    /// Accepts a sender; returns the session, where it resumes, the highest sequence any
    /// journal holds (where a sender that cannot resume starts after), and a receiver of
    /// the acknowledged position.
    pub async fn hello(
        &self,
        generation: Generation,
    ) -> VraResult<(SessionId, Seq, Seq, watch::Receiver<Seq>)> {
        let (s, resume, held) = self.ask(|reply| Msg::Hello { generation, reply }).await??;
        Ok((s, resume, held, self.acked.clone()))
    }

    /// Appends a batch of a session's entries (returns once they are handed to the
    /// journals; durability is reported through the acknowledged position).
    pub async fn batch(&self, session: SessionId, entries: Vec<Entry>) -> VraResult<()> {
        self.ask(|reply| Msg::Batch {
            session,
            entries,
            reply,
        })
        .await?
    }

    /// A session ended.
    pub async fn end(&self, session: SessionId) {
        let _ = self.tx.send(Msg::End { session }).await;
    }

    /// The VPG's checkpoints, oldest first.
    pub async fn checkpoints(&self) -> VraResult<Vec<VpgCheckpoint>> {
        self.ask(|reply| Msg::Checkpoints { reply }).await
    }

    /// Opens a point-in-time image of one volume at a checkpoint usable in every journal;
    /// `writable`: over a scratch overlay (an unnamed file in the VPG's scratch directory,
    /// gone with the image).
    pub async fn open_image(
        &self,
        vm: &VmId,
        volume: VolumeId,
        checkpoint: CheckpointId,
        writable: bool,
    ) -> VraResult<PointInTimeImage> {
        let cps = self.checkpoints().await?;
        let unusable = |reason: &str| VraError::CheckpointUnusable {
            vpg: self.assignment.vpg.clone(),
            id: checkpoint.0,
            reason: reason.into(),
        };
        let cp = cps
            .iter()
            .find(|c| c.checkpoint.id == checkpoint)
            .ok_or_else(|| unusable("not in the journals"))?;
        if !cp.durable {
            return Err(unusable("not durable in every journal of the vpg"));
        }
        if !cp.usable {
            return Err(unusable("promoted into the replicas"));
        }
        let journal = self
            .journals
            .iter()
            .find(|(v, _)| v == vm)
            .map(|(_, j)| j.clone())
            .ok_or_else(|| tandem_core::DomainError::not_found("vm", vm))?;
        let opts = ImageOptions {
            scratch_dir: writable.then(|| self.scratch_dir.clone()),
            verify: false,
        };
        if let Some(dir) = &opts.scratch_dir {
            std::fs::create_dir_all(dir).map_err(VraError::io("create scratch dir", dir))?;
        }
        let image =
            tokio::task::spawn_blocking(move || journal.open_image(checkpoint, volume, &opts))
                .await
                .map_err(|_| VraError::ShuttingDown)??;
        Ok(image)
    }

    /// Checks a peer's generation against the assignment's, as the stream's hello does
    /// (older: fenced as stale; newer: not assigned here yet).
    pub fn check_generation(&self, generation: Generation) -> VraResult<()> {
        check_generation(generation, self.assignment.generation)
            .map_err(|e| fence_error(&self.assignment.vpg, e))
    }

    /// Hashes of the newest durable image of one volume (replica plus every durable
    /// journal record, checkpoint or not) over `length` bytes from `offset` in blocks of
    /// `block_size` ([`hashes::check_request`] says which ranges are valid), and the stream
    /// sequence the image reflects: every entry of the stream up to it that touches the
    /// volume is in the image. The peer's `generation` is fenced first, as for the stream.
    pub async fn block_hashes(
        &self,
        generation: Generation,
        range: &ImageRange,
        block_size: u32,
    ) -> VraResult<(Vec<u8>, Seq)> {
        self.check_generation(generation)?;
        let size = self.volume_size(&range.vm, range.volume)?;
        let blocks = hashes::check_request(range.offset, range.length, block_size, size)?;
        let block = block_size as usize;
        let out = Vec::with_capacity(blocks * hashes::HASH_LEN);
        let chunk = hashes::SCAN_CHUNK.max(u64::from(block_size));
        self.scan_latest_image(range, chunk, out, move |out, _, data| {
            hashes::hash_blocks(data, block, out);
        })
        .await
    }

    /// Delta sync's compare ([`hashes::check_compare`] says which requests are valid):
    /// reads the range of the newest durable image once, and answers which coarse blocks
    /// hash differently from the sender's `coarse_hashes`, with the fine hashes of each,
    /// and the stream sequence the image reflects (as for [`Self::block_hashes`]).
    pub async fn compare_blocks(
        &self,
        generation: Generation,
        range: &ImageRange,
        coarse: u32,
        fine: u32,
        coarse_hashes: Vec<u8>,
    ) -> VraResult<(hashes::Differences, Seq)> {
        self.check_generation(generation)?;
        let size = self.volume_size(&range.vm, range.volume)?;
        hashes::check_compare(
            range.offset,
            range.length,
            coarse,
            fine,
            coarse_hashes.len(),
            size,
        )?;
        let chunk = hashes::SCAN_CHUNK.max(u64::from(coarse));
        let (coarse, fine) = (coarse as usize, fine as usize);
        self.scan_latest_image(
            range,
            chunk,
            hashes::Differences::default(),
            move |d, at, data| {
                // Chunks hold whole coarse blocks: both are powers of two.
                let first = (at / coarse as u64) as usize;
                let theirs = &coarse_hashes[first * hashes::HASH_LEN..];
                d.add(data, first as u32, coarse, fine, theirs);
            },
        )
        .await
    }

    /// The size of one volume of a VM of this VPG.
    fn volume_size(&self, vm: &VmId, volume: VolumeId) -> VraResult<u64> {
        let spec = self
            .assignment
            .vms
            .iter()
            .find(|v| &v.vm == vm)
            .ok_or_else(|| tandem_core::DomainError::not_found("vm", vm))?;
        Ok(spec
            .volumes
            .iter()
            .find(|v| v.id == volume)
            .ok_or_else(|| tandem_core::DomainError::not_found("volume", format!("{vm}/{volume}")))?
            .size)
    }

    /// Reads `length` bytes of the newest durable image of a volume from `offset` in
    /// pieces of `chunk` bytes and folds each (with its position in the range) into
    /// `state`.
    ///
    /// The image is read on a blocking thread, within the process's hashing jobs
    /// ([`hashes::HASHING`]), never through the VPG's actor, so the replication stream keeps flowing. While it runs, the
    /// image pins its position against promotion. Dropping the future stops the job at its
    /// next chunk.
    async fn scan_latest_image<S: Send + 'static>(
        &self,
        range: &ImageRange,
        chunk: u64,
        mut state: S,
        mut fold: impl FnMut(&mut S, u64, &[u8]) + Send + 'static,
    ) -> VraResult<(S, Seq)> {
        let ImageRange {
            vm,
            volume,
            offset,
            length,
        } = range.clone();
        let journal = self
            .journals
            .iter()
            .find(|(v, _)| *v == vm)
            .map(|(_, j)| j.clone())
            .ok_or_else(|| tandem_core::DomainError::not_found("vm", &vm))?;
        let _permit = hashes::HASHING
            .acquire()
            .await
            .map_err(|_| VraError::ShuttingDown)?;
        // Durable in every journal before the image is opened, so in it too.
        let acked = *self.acked.borrow();
        let cancel = self.cancel.child_token();
        let _stop_on_drop = cancel.clone().drop_guard();
        let started = std::time::Instant::now();
        let dir = journal.dir().to_path_buf();
        let scanned = tokio::task::spawn_blocking(move || {
            let image = journal.open_latest_image(volume, &ImageOptions::default())?;
            // Requests are checked: `chunk` is at most 16 MiB.
            let mut buf = vec![0u8; chunk.min(length) as usize];
            let mut done = 0;
            while done < length {
                if cancel.is_cancelled() {
                    return Err(VraError::ShuttingDown);
                }
                let n = (length - done).min(buf.len() as u64) as usize;
                image
                    .read_at(offset + done, &mut buf[..n])
                    .map_err(|e| VraError::io("read latest image", dir.clone())(e))?;
                fold(&mut state, done, &buf[..n]);
                done += n as u64;
            }
            Ok::<_, VraError>((state, image.seq()))
        })
        .await
        .map_err(|_| VraError::ShuttingDown)?;
        if self.cancel.is_cancelled() {
            return Err(VraError::ShuttingDown);
        }
        let (state, seq) = scanned?;
        debug!(
            vpg = %self.assignment.vpg,
            vm = %vm,
            volume = volume.0,
            offset,
            length,
            image_seq = seq.0,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "latest image scanned"
        );
        Ok((state, seq.max(acked)))
    }

    /// Stops the VPG's tasks; the journals close when the last image of them is gone.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.tasks.wait().await;
        info!(vpg = %self.assignment.vpg, "recovery vpg stopped");
    }
}

/// Opens the journal of every VM of a recovery assignment (blocking IO: recovery scans,
/// fsyncs), creating the replica directories.
pub(crate) fn open_journals(
    assignment: &RecoveryAssignment,
) -> VraResult<Vec<(VmId, Arc<Journal>)>> {
    let mut journals = Vec::new();
    for vm in &assignment.vms {
        let volumes = vm
            .volumes
            .iter()
            .map(|v| {
                if let Some(parent) = v.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent)
                        .map_err(VraError::io("create replica dir", parent))?;
                }
                Ok(VolumeSpec {
                    id: v.id,
                    size: v.size,
                    replica_path: v.path.clone(),
                })
            })
            .collect::<VraResult<Vec<_>>>()?;
        let mut cfg = JournalConfig::new(volumes);
        cfg.sparse_seqs = true;
        cfg.history_window = assignment.history_secs.map(Duration::from_secs);
        cfg.warning_bytes = assignment.warning_bytes;
        cfg.hard_limit_bytes = assignment.hard_limit_bytes;
        let journal = Journal::open(&vm.journal_dir, cfg)?;
        let report = journal.open_report();
        info!(
            vpg = %assignment.vpg,
            vm = %vm.vm,
            durable_seq = journal.durable_seq().0,
            records = report.records,
            torn_tail = report.torn_tail.is_some(),
            "journal opened"
        );
        journals.push((vm.vm.clone(), Arc::new(journal)));
    }
    Ok(journals)
}

fn fence_error(vpg: &VpgId, e: FenceError) -> VraError {
    match e {
        FenceError::Stale { got, current } => VraError::StaleGeneration {
            vpg: vpg.clone(),
            got,
            current,
        },
        FenceError::Newer { got, current } => VraError::UnknownGeneration {
            vpg: vpg.clone(),
            got,
            current,
        },
        other => VraError::Stream(other.to_string()),
    }
}

fn floor_path(dir: &Path) -> PathBuf {
    dir.join("stream.json")
}

fn read_floor(dir: &Path) -> Option<StreamFloor> {
    let bytes = std::fs::read(floor_path(dir)).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(f) => Some(f),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "ignoring unreadable stream floor");
            None
        }
    }
}

/// Persists the acknowledged position, then publishes it to the sessions.
async fn persist_acks(
    dir: PathBuf,
    generation: Generation,
    mut rx: watch::Receiver<AckProgress>,
    acked: watch::Sender<Seq>,
    counters: Arc<RecoveryCounters>,
    last_error: Arc<Mutex<String>>,
    cancel: CancellationToken,
) {
    // The floor on disk: the restart position the journals alone do not show. A journal
    // that receives nothing for a while (a VM that does not write) keeps the lowest
    // durable position low; only then is the floor written before an acknowledgement.
    let mut floor = *acked.borrow();
    let publish = |safe: Seq| {
        if safe > *acked.borrow() {
            counters.acked.store(safe.0, Ordering::Relaxed);
            acked.send_replace(safe);
        }
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            r = rx.changed() => if r.is_err() { break },
        }
        let progress = *rx.borrow_and_update();
        publish(progress.safe(floor));
        if progress.safe(floor) >= progress.acked {
            continue;
        }
        let record = StreamFloor {
            generation: generation.0,
            acked: progress.acked.0,
        };
        let d = dir.clone();
        let written = tokio::task::spawn_blocking(move || {
            crate::state::write_atomic(
                &floor_path(&d),
                &serde_json::to_vec(&record).unwrap_or_default(),
            )
        })
        .await;
        match written {
            Ok(Ok(())) => {
                floor = progress.acked;
                publish(rx.borrow().safe(floor));
            }
            Ok(Err(e)) => {
                warn!(error = %e, "persisting the stream floor failed");
                *last_error.lock().unwrap_or_else(PoisonError::into_inner) = e.to_string();
            }
            Err(_) => break,
        }
    }
}

/// Whether every file in `dir` opens for writing and a new file can be created in it.
fn dir_writable(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_file() && std::fs::OpenOptions::new().write(true).open(&path).is_err() {
            return false;
        }
    }
    let probe = dir.join(".write-probe");
    let created = std::fs::File::create(&probe).is_ok();
    let _ = std::fs::remove_file(&probe);
    created
}

/// Promotes history older than the window and enforces limits, every few seconds.
async fn maintain(journals: Vec<Arc<Journal>>, vpg: VpgId, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(MAINTAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        for j in &journals {
            let j = j.clone();
            match tokio::task::spawn_blocking(move || j.maintain(UnixMillis::now())).await {
                Ok(Ok(r)) if r.records_applied > 0 => {
                    debug!(vpg = %vpg, records = r.records_applied, "journal history promoted");
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!(vpg = %vpg, error = %e, "journal maintenance failed"),
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_wait_for_the_floor_only_beyond_what_every_journal_shows() {
        let p = AckProgress {
            acked: Seq(50),
            in_every_journal: Seq(20),
        };
        assert_eq!(p.safe(Seq(0)), Seq(20), "an idle journal holds it back");
        assert_eq!(p.safe(Seq(35)), Seq(35), "the floor on disk releases more");
        assert_eq!(p.safe(Seq(80)), Seq(50), "never beyond what is durable");
        let busy = AckProgress {
            acked: Seq(50),
            in_every_journal: Seq(50),
        };
        assert_eq!(
            busy.safe(Seq(0)),
            Seq(50),
            "every journal shows it: no floor needed"
        );
    }
}
