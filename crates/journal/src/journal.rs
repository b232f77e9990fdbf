//! The journal of one VM: appends with caller-provided contiguous sequence numbers and
//! generation fencing, group-commit durability, the in-memory index (checkpoints and
//! data records), crash recovery on open, promotion into the replica disks and the
//! size limits.
//!
//! Threads: every open journal owns a committer thread (writes accepted frames in one
//! batch, one `fdatasync` per batch, then moves the durable position) and a promoter
//! thread (early promotion at the hard limit). Both are joined on [`Journal::close`] or
//! drop. Appenders never do IO: they encode their frame, take the state lock to check
//! and place it, and wait for the durable position to pass their sequence.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fs::OpenOptions,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    append::Appender,
    error::{JournalError, Result},
    extents::Source,
    format::{
        Frame, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, SegmentHeader, WRITE_PREFIX_LEN,
        checkpoint_fits, crc_seed, decode_payload, encode_frame, payload_len, seal_frame,
    },
    replica::{Replica, ReplicaMarker, VolumeSpec, open_replica, read_marker, write_marker},
    segment::{
        ParseEnd, ParseMode, create_segment, list_segments, parse_header, parse_records,
        read_prefix, remove_file, segment_path, sync_dir, truncate_file,
    },
    types::{
        Checkpoint, CheckpointId, Generation, JournalPosition, Record, RecordBody, SegmentId, Seq,
        UnixMillis, VolumeId,
    },
};

/// Default segment size: 64 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;
/// Default maximum payload of one record: 8 MiB.
pub const DEFAULT_MAX_PAYLOAD: u32 = 8 << 20;

/// Settings of one journal.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// A new segment is started when the next record would take the active one past this.
    pub segment_size: u64,
    /// Largest payload of one record.
    pub max_payload: u32,
    /// Journal size at which the status turns to [`SizeLevel::Warning`].
    pub warning_bytes: Option<u64>,
    /// Journal size at which the oldest history is promoted early.
    pub hard_limit_bytes: Option<u64>,
    /// History to keep; [`Journal::maintain`] promotes what is older.
    pub history_window: Option<Duration>,
    /// The VM's volumes and their replica disks.
    pub volumes: Vec<VolumeSpec>,
    /// Whether sequence numbers may skip values (strictly increasing instead of
    /// contiguous). The VRA sets it so that every VM journal of a VPG carries the
    /// replication stream's own sequence numbers: each journal holds its VM's entries
    /// and every checkpoint marker, so the stream position of any record is known after
    /// a restart. Default: off (contiguous).
    pub sparse_seqs: bool,
}

impl JournalConfig {
    /// A configuration with default sizes and no limits.
    #[must_use]
    pub fn new(volumes: Vec<VolumeSpec>) -> Self {
        JournalConfig {
            segment_size: DEFAULT_SEGMENT_SIZE,
            max_payload: DEFAULT_MAX_PAYLOAD,
            warning_bytes: None,
            hard_limit_bytes: None,
            history_window: None,
            volumes,
            sparse_seqs: false,
        }
    }

    fn validate(&self) -> Result<()> {
        let min = SEGMENT_HEADER_LEN + RECORD_HEADER_LEN as u64 + u64::from(self.max_payload);
        if self.segment_size < min {
            return Err(JournalError::Config(format!(
                "segment size {} cannot hold a record of the maximum payload {} (needs {min})",
                self.segment_size, self.max_payload
            )));
        }
        if (WRITE_PREFIX_LEN as u64) > u64::from(self.max_payload) {
            return Err(JournalError::Config("maximum payload too small".into()));
        }
        if let (Some(w), Some(h)) = (self.warning_bytes, self.hard_limit_bytes)
            && w > h
        {
            return Err(JournalError::Config(format!(
                "warning threshold {w} above hard limit {h}"
            )));
        }
        if let Some(h) = self.hard_limit_bytes
            && h < 2 * self.segment_size
        {
            return Err(JournalError::Config(format!(
                "hard limit {h} must be at least two segments ({})",
                2 * self.segment_size
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for v in &self.volumes {
            if !seen.insert(v.id) {
                return Err(JournalError::Config(format!(
                    "volume {} listed twice",
                    v.id
                )));
            }
        }
        Ok(())
    }
}

/// How full the journal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SizeLevel {
    /// Below the warning threshold.
    #[default]
    Normal,
    /// At or above the warning threshold.
    Warning,
    /// At or above the hard limit (early promotion is under way or blocked).
    HardLimit,
}

/// Status the VRA reports upwards; published on every change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JournalStatus {
    /// Journal size in bytes (all segment files).
    pub size_bytes: u64,
    /// Size relative to the thresholds.
    pub level: SizeLevel,
    /// History was promoted early because of the hard limit ("History Not Meeting SLA").
    pub history_not_meeting_sla: bool,
    /// How many early promotions happened since open.
    pub early_promotions: u64,
}

/// The durable position as published to waiters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Durability {
    /// Every record up to and including this sequence is fsynced (0: none).
    pub seq: Seq,
    /// Set when a write or fsync failed; no further record becomes durable.
    pub failed: Option<Arc<str>>,
    /// Set while the device is out of space: records wait and are written again once
    /// there is room (nothing is lost; durability resumes by itself).
    pub stalled: Option<Arc<str>>,
}

/// Whether an image can be built at a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointState {
    /// Durable and not older than the replica: images can be opened at it.
    Usable,
    /// Appended but not fsynced yet.
    NotDurable,
    /// The replica has moved past it (or is moving past it).
    Promoted,
}

/// A checkpoint as listed by [`Journal::checkpoints`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// The checkpoint marker.
    pub checkpoint: Checkpoint,
    /// Its sequence number.
    pub seq: Seq,
    /// Where its record is.
    pub position: JournalPosition,
    /// Whether an image can be built at it.
    pub state: CheckpointState,
}

/// Counters the VRA reports.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JournalStats {
    /// Records accepted since open.
    pub appends: u64,
    /// Payload bytes accepted since open.
    pub append_bytes: u64,
    /// Data fsyncs of segment files since open.
    pub fsyncs: u64,
    /// Records made durable since open.
    pub durable_records: u64,
    /// `durable_records / fsyncs`.
    pub records_per_fsync: f64,
    /// Size of all segment files.
    pub size_bytes: u64,
    /// Number of segment files.
    pub segments: usize,
    /// Highest sequence accepted.
    pub last_seq: Seq,
    /// Highest sequence written to its segment file (maybe not yet durable).
    pub written_seq: Seq,
    /// Highest sequence durable.
    pub durable_seq: Seq,
    /// The replicas hold every record up to this sequence.
    pub replica_seq: Seq,
    /// Oldest checkpoint an image can be built at.
    pub oldest_usable_checkpoint: Option<(CheckpointId, UnixMillis)>,
    /// Newest checkpoint an image can be built at.
    pub newest_usable_checkpoint: Option<(CheckpointId, UnixMillis)>,
    /// Promotions since open.
    pub promotions: u64,
    /// Records applied to replicas since open.
    pub promoted_records: u64,
    /// Segment files freed since open.
    pub freed_segments: u64,
    /// Early promotions at the hard limit since open.
    pub early_promotions: u64,
    /// Size relative to the thresholds.
    pub level: SizeLevel,
    /// History was promoted early because of the hard limit.
    pub history_not_meeting_sla: bool,
}

/// What recovery found when the journal was opened.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpenReport {
    /// Segment files scanned.
    pub segments_scanned: usize,
    /// Records found valid.
    pub records: u64,
    /// A torn tail was cut off: (segment, offset, bytes removed, reason).
    pub torn_tail: Option<(SegmentId, u64, u64, &'static str)>,
    /// Segment files removed (header-only last segment, or wholly promoted).
    pub removed_segments: Vec<SegmentId>,
    /// An interrupted promotion to this sequence was finished.
    pub resumed_promotion: Option<Seq>,
}

/// What a promotion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PromoteReport {
    /// Replica point before.
    pub from: Seq,
    /// Replica point after.
    pub to: Seq,
    /// Records applied to the replicas.
    pub records_applied: u64,
    /// Segment files freed.
    pub segments_freed: u64,
    /// Bytes of segment files freed.
    pub bytes_freed: u64,
}

/// Why a promotion runs (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PromoteReason {
    Window,
    Checkpoint,
    HardLimit,
    Resume,
}

impl PromoteReason {
    fn as_str(self) -> &'static str {
        match self {
            PromoteReason::Window => "history window",
            PromoteReason::Checkpoint => "checkpoint",
            PromoteReason::HardLimit => "hard limit",
            PromoteReason::Resume => "resume after restart",
        }
    }
}

/// One data record in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriteMeta {
    pub seq: Seq,
    pub volume: VolumeId,
    pub offset: u64,
    pub len: u64,
    pub src: Source,
    pub frame: JournalPosition,
    pub frame_len: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct CheckpointEntry {
    pub checkpoint: Checkpoint,
    pub position: JournalPosition,
}

#[derive(Debug)]
pub(crate) struct SegState {
    pub path: PathBuf,
    pub file: Option<Arc<std::fs::File>>,
    pub header: SegmentHeader,
    pub last_seq: Option<Seq>,
    pub len: u64,
    pub durable_len: u64,
}

#[derive(Debug)]
struct Pending {
    segment: SegmentId,
    offset: u64,
    seq: Seq,
    frame: Frame,
}

#[derive(Debug, Default)]
struct Counters {
    appends: u64,
    append_bytes: u64,
    fsyncs: u64,
    durable_records: u64,
    promotions: u64,
    promoted_records: u64,
    freed_segments: u64,
}

#[derive(Debug)]
pub(crate) struct State {
    next_seq: Option<Seq>,
    last_seq: Seq,
    written_seq: Seq,
    pub durable_seq: Seq,
    generation: Generation,
    pub segments: BTreeMap<SegmentId, SegState>,
    active: Option<SegmentId>,
    next_segment: SegmentId,
    pending: Vec<Pending>,
    pub writes: VecDeque<WriteMeta>,
    pub checkpoints: BTreeMap<Seq, CheckpointEntry>,
    pub checkpoint_ids: HashMap<CheckpointId, Seq>,
    pub replica_seq: Seq,
    pub promoting_to: Option<Seq>,
    pub pins: BTreeMap<Seq, usize>,
    failed: Option<Arc<str>>,
    shutdown: bool,
    promote_requested: bool,
    counters: Counters,
    history_not_meeting_sla: bool,
    early_promotions: u64,
}

impl State {
    fn size(&self) -> u64 {
        self.segments.values().map(|s| s.len).sum()
    }

    /// Whether a segment holds nothing an image could still need once the replicas are
    /// current to `point`. The checkpoint at exactly `point` stays (images at it are
    /// the replica itself), so the segment holding it is kept.
    fn freeable(&self, s: &SegState, point: Seq) -> bool {
        s.last_seq
            .is_some_and(|l| l < point || (l == point && !self.checkpoints.contains_key(&l)))
    }

    fn min_pin(&self) -> Option<Seq> {
        self.pins.keys().next().copied()
    }

    /// The oldest sequence an image may be opened at.
    pub fn usable_floor(&self) -> Seq {
        self.promoting_to
            .map_or(self.replica_seq, |p| p.max(self.replica_seq))
    }

    /// The sequence of checkpoint `id`, if images can be opened at it.
    pub fn usable_checkpoint(&self, id: CheckpointId) -> Result<Seq> {
        let seq = *self
            .checkpoint_ids
            .get(&id)
            .ok_or(JournalError::CheckpointNotFound(id))?;
        let reason = match self.checkpoint_state(seq) {
            CheckpointState::Usable => return Ok(seq),
            CheckpointState::NotDurable => "not durable yet",
            CheckpointState::Promoted => "older than the replica",
        };
        Err(JournalError::CheckpointUnusable { id, reason })
    }

    /// Whether images can be opened at the checkpoint whose marker is at `seq`.
    pub fn checkpoint_state(&self, seq: Seq) -> CheckpointState {
        if seq < self.usable_floor() {
            CheckpointState::Promoted
        } else if seq > self.durable_seq {
            CheckpointState::NotDurable
        } else {
            CheckpointState::Usable
        }
    }
}

/// State shared by the journal handle, its threads and its images.
#[derive(Debug)]
pub(crate) struct Shared {
    pub dir: PathBuf,
    pub cfg: JournalConfig,
    pub salt: u64,
    pub seed: u32,
    pub volumes: BTreeMap<VolumeId, Replica>,
    pub state: Mutex<State>,
    commit_cv: Condvar,
    durable_cv: Condvar,
    promote_cv: Condvar,
    durable_tx: watch::Sender<Durability>,
    status_tx: watch::Sender<JournalStatus>,
    promote_lock: Mutex<()>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn status_of(&self, st: &State) -> JournalStatus {
        let size = st.size();
        let level = if self.cfg.hard_limit_bytes.is_some_and(|h| size >= h) {
            SizeLevel::HardLimit
        } else if self.cfg.warning_bytes.is_some_and(|w| size >= w) {
            SizeLevel::Warning
        } else {
            SizeLevel::Normal
        };
        JournalStatus {
            size_bytes: size,
            level,
            history_not_meeting_sla: st.history_not_meeting_sla,
            early_promotions: st.early_promotions,
        }
    }

    fn publish_status(&self, st: &State) {
        let status = self.status_of(st);
        self.status_tx.send_if_modified(|cur| {
            if cur.level != status.level
                || cur.history_not_meeting_sla != status.history_not_meeting_sla
                || cur.early_promotions != status.early_promotions
                || cur.size_bytes != status.size_bytes
            {
                if cur.level != status.level {
                    match status.level {
                        SizeLevel::Normal => info!(size = status.size_bytes, "journal size normal"),
                        SizeLevel::Warning => {
                            warn!(
                                size = status.size_bytes,
                                "journal size above warning threshold"
                            );
                        }
                        SizeLevel::HardLimit => {
                            warn!(size = status.size_bytes, "journal size at hard limit");
                        }
                    }
                }
                *cur = status;
                true
            } else {
                false
            }
        });
    }
}

/// The journal of one VM. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Journal {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    report: OpenReport,
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir`, recovering from a crash: a torn
    /// tail of the last segment is cut off, corruption anywhere else fails the open with
    /// [`JournalError::Corrupt`], and an interrupted promotion is finished.
    pub fn open(dir: impl AsRef<Path>, cfg: JournalConfig) -> Result<Journal> {
        cfg.validate()?;
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)
            .map_err(|e| JournalError::io("create journal dir", &dir, e))?;
        let marker = read_marker(&dir)?;
        let mut volumes = BTreeMap::new();
        for spec in &cfg.volumes {
            volumes.insert(spec.id, open_replica(spec)?);
        }
        let (mut st, salt, report) = recover(&dir, &cfg, marker.as_ref())?;
        let salt = salt.unwrap_or_else(rand::random);
        let status = JournalStatus::default();
        let durability = Durability {
            seq: st.durable_seq,
            failed: None,
            stalled: None,
        };
        let resume = marker
            .filter(|m| m.promoting_to > m.seq)
            .map(|m| m.promoting_to);
        st.promote_requested = false;
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            cfg,
            salt,
            seed: crc_seed(salt),
            volumes,
            state: Mutex::new(st),
            commit_cv: Condvar::new(),
            durable_cv: Condvar::new(),
            promote_cv: Condvar::new(),
            durable_tx: watch::Sender::new(durability),
            status_tx: watch::Sender::new(status),
            promote_lock: Mutex::new(()),
        });
        {
            let st = shared.lock();
            shared.publish_status(&st);
        }
        let mut journal = Journal {
            shared: shared.clone(),
            threads: Vec::new(),
            report,
        };
        if let Some(target) = resume {
            info!(target = target.0, "finishing interrupted promotion");
            promote_through(&shared, target, PromoteReason::Resume)?;
            journal.report.resumed_promotion = Some(target);
        }
        let s = shared.clone();
        let committer = std::thread::Builder::new()
            .name("journal-commit".into())
            .spawn(move || {
                // The committer keeps the disk busy and needs the CPU only briefly between
                // writes: under contention (a VRA decrypting and decoding a stream on a
                // shared host) it should not queue behind that work while the disk idles.
                // Raising a thread's priority takes CAP_SYS_NICE; without it, nothing changes.
                if let Err(e) =
                    rustix::process::setpriority_process(Some(rustix::thread::gettid()), -5)
                {
                    tracing::debug!(error = %e, "journal committer keeps the default priority");
                }
                committer_loop(&s)
            })
            .map_err(|e| JournalError::io("spawn committer", &dir, e))?;
        journal.threads.push(committer);
        let s = shared.clone();
        let promoter = std::thread::Builder::new()
            .name("journal-promote".into())
            .spawn(move || promoter_loop(&s))
            .map_err(|e| JournalError::io("spawn promoter", &dir, e))?;
        journal.threads.push(promoter);
        {
            let st = shared.lock();
            info!(
                dir = %dir.display(),
                segments = st.segments.len(),
                durable_seq = st.durable_seq.0,
                replica_seq = st.replica_seq.0,
                checkpoints = st.checkpoints.len(),
                "journal opened"
            );
        }
        Ok(journal)
    }

    /// The journal directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// What recovery found on open.
    #[must_use]
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// The configured volumes.
    #[must_use]
    pub fn volumes(&self) -> Vec<VolumeSpec> {
        self.shared
            .volumes
            .values()
            .map(|r| r.spec.clone())
            .collect()
    }

    /// Accepts a record at `seq` (which must be the next sequence; on a journal that
    /// never held a record, any non-zero sequence starts it) without waiting for
    /// durability. Returns the sequence.
    pub fn submit(&self, seq: Seq, generation: Generation, body: RecordBody) -> Result<Seq> {
        self.accept(Some(seq), generation, &body)
    }

    /// Accepts a record at the next sequence without waiting for durability.
    pub fn submit_next(&self, generation: Generation, body: RecordBody) -> Result<Seq> {
        self.accept(None, generation, &body)
    }

    /// Appends a record at `seq` and waits until it is durable.
    pub async fn append(&self, seq: Seq, generation: Generation, body: RecordBody) -> Result<Seq> {
        let seq = self.submit(seq, generation, body)?;
        self.wait_durable(seq).await?;
        Ok(seq)
    }

    /// Appends a record at the next sequence and waits until it is durable.
    pub async fn append_next(&self, generation: Generation, body: RecordBody) -> Result<Seq> {
        let seq = self.submit_next(generation, body)?;
        self.wait_durable(seq).await?;
        Ok(seq)
    }

    /// Appends a batch of records (contiguous sequences, as the replication receiver gets
    /// them) and waits until all are durable; returns the durable sequence, which the
    /// receiver acknowledges. On an error, the records before the faulty one were
    /// accepted ([`Journal::last_seq`] tells how far).
    pub async fn append_batch(
        &self,
        generation: Generation,
        records: impl IntoIterator<Item = (Seq, RecordBody)>,
    ) -> Result<Seq> {
        let mut last = None;
        for (seq, body) in records {
            last = Some(self.submit(seq, generation, body)?);
        }
        match last {
            Some(seq) => self.wait_durable(seq).await,
            None => Ok(self.durable_seq()),
        }
    }

    /// Waits until `seq` is durable; returns the durable sequence then.
    pub async fn wait_durable(&self, seq: Seq) -> Result<Seq> {
        let mut rx = self.shared.durable_tx.subscribe();
        loop {
            {
                let d = rx.borrow_and_update();
                if d.seq >= seq {
                    return Ok(d.seq);
                }
                if let Some(f) = &d.failed {
                    return Err(JournalError::Poisoned(f.clone()));
                }
            }
            if rx.changed().await.is_err() {
                return Err(JournalError::Closed);
            }
        }
    }

    /// Blocking form of [`Journal::wait_durable`] for threads outside a runtime.
    pub fn wait_durable_blocking(&self, seq: Seq) -> Result<Seq> {
        let mut st = self.shared.lock();
        loop {
            if st.durable_seq >= seq {
                return Ok(st.durable_seq);
            }
            if let Some(f) = &st.failed {
                return Err(JournalError::Poisoned(f.clone()));
            }
            if st.shutdown && st.pending.is_empty() {
                return Err(JournalError::Closed);
            }
            st = self
                .shared
                .durable_cv
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// A receiver of the durable position.
    #[must_use]
    pub fn subscribe_durable(&self) -> watch::Receiver<Durability> {
        self.shared.durable_tx.subscribe()
    }

    /// A receiver of the size / SLA status.
    #[must_use]
    pub fn subscribe_status(&self) -> watch::Receiver<JournalStatus> {
        self.shared.status_tx.subscribe()
    }

    /// The current size / SLA status.
    #[must_use]
    pub fn status(&self) -> JournalStatus {
        let st = self.shared.lock();
        self.shared.status_of(&st)
    }

    /// Highest durable sequence (0: none).
    #[must_use]
    pub fn durable_seq(&self) -> Seq {
        self.shared.lock().durable_seq
    }

    /// Highest sequence written to its segment file, maybe not yet durable.
    #[must_use]
    pub fn written_seq(&self) -> Seq {
        self.shared.lock().written_seq
    }

    /// Highest sequence accepted.
    #[must_use]
    pub fn last_seq(&self) -> Seq {
        self.shared.lock().last_seq
    }

    /// The sequence the next record must carry, if the journal has one in mind.
    #[must_use]
    pub fn next_seq(&self) -> Option<Seq> {
        self.shared.lock().next_seq
    }

    /// Highest writer generation seen.
    #[must_use]
    pub fn generation(&self) -> Generation {
        self.shared.lock().generation
    }

    /// The replicas hold every record up to this sequence.
    #[must_use]
    pub fn replica_seq(&self) -> Seq {
        self.shared.lock().replica_seq
    }

    /// Every checkpoint still in the journal, oldest first, with whether an image can be
    /// built at it.
    #[must_use]
    pub fn checkpoints(&self) -> Vec<CheckpointInfo> {
        let st = self.shared.lock();
        st.checkpoints
            .iter()
            .map(|(&seq, e)| CheckpointInfo {
                checkpoint: e.checkpoint.clone(),
                seq,
                position: e.position,
                state: st.checkpoint_state(seq),
            })
            .collect()
    }

    /// One checkpoint.
    pub fn checkpoint(&self, id: CheckpointId) -> Result<CheckpointInfo> {
        let st = self.shared.lock();
        let seq = *st
            .checkpoint_ids
            .get(&id)
            .ok_or(JournalError::CheckpointNotFound(id))?;
        let e = &st.checkpoints[&seq];
        Ok(CheckpointInfo {
            checkpoint: e.checkpoint.clone(),
            seq,
            position: e.position,
            state: st.checkpoint_state(seq),
        })
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> JournalStats {
        let st = self.shared.lock();
        let status = self.shared.status_of(&st);
        let usable: Vec<_> = st
            .checkpoints
            .iter()
            .filter(|(seq, _)| st.checkpoint_state(**seq) == CheckpointState::Usable)
            .map(|(_, e)| (e.checkpoint.id, e.checkpoint.timestamp))
            .collect();
        let c = &st.counters;
        JournalStats {
            appends: c.appends,
            append_bytes: c.append_bytes,
            fsyncs: c.fsyncs,
            durable_records: c.durable_records,
            records_per_fsync: if c.fsyncs == 0 {
                0.0
            } else {
                c.durable_records as f64 / c.fsyncs as f64
            },
            size_bytes: status.size_bytes,
            segments: st.segments.len(),
            last_seq: st.last_seq,
            written_seq: st.written_seq,
            durable_seq: st.durable_seq,
            replica_seq: st.replica_seq,
            oldest_usable_checkpoint: usable.first().copied(),
            newest_usable_checkpoint: usable.last().copied(),
            promotions: c.promotions,
            promoted_records: c.promoted_records,
            freed_segments: c.freed_segments,
            early_promotions: st.early_promotions,
            level: status.level,
            history_not_meeting_sla: status.history_not_meeting_sla,
        }
    }

    /// Reads back every durable record still in the journal, in order (diagnostics and
    /// tests; verifies checksums).
    pub fn read_records(&self) -> Result<Vec<Record>> {
        let segs: Vec<(SegmentId, PathBuf, Arc<std::fs::File>, u64)> = {
            let st = self.shared.lock();
            st.segments
                .iter()
                .filter_map(|(id, s)| {
                    s.file
                        .clone()
                        .map(|f| (*id, s.path.clone(), f, s.durable_len))
                })
                .collect()
        };
        let mut out = Vec::new();
        for (id, path, file, len) in segs {
            let bytes = read_prefix(&file, &path, len)?;
            let header = parse_header(&bytes, id)?;
            parse_records(
                &bytes,
                id,
                crc_seed(header.salt),
                self.shared.cfg.max_payload,
                ParseMode::Strict,
                |h, off, payload| {
                    let body = decode_payload(h.kind, payload).map_err(|reason| {
                        JournalError::Corrupt {
                            segment: id,
                            offset: off,
                            reason,
                        }
                    })?;
                    out.push(Record {
                        seq: h.seq,
                        generation: h.generation,
                        position: JournalPosition {
                            segment: id,
                            offset: off,
                        },
                        body,
                    });
                    Ok(())
                },
            )?;
        }
        Ok(out)
    }

    /// Promotes everything up to checkpoint `id` into the replicas (after a failover
    /// commit, for example). Checkpoints before it become unusable.
    pub fn promote_to_checkpoint(&self, id: CheckpointId) -> Result<PromoteReport> {
        let seq = {
            let st = self.shared.lock();
            st.usable_checkpoint(id)?
        };
        promote_through(&self.shared, seq, PromoteReason::Checkpoint)
    }

    /// Promotes history older than `cutoff`: up to the newest durable checkpoint stamped
    /// at or before it (and not past an open image). Does nothing if there is none.
    pub fn promote_older_than(&self, cutoff: UnixMillis) -> Result<PromoteReport> {
        let target = {
            let st = self.shared.lock();
            let floor = st.usable_floor();
            let cap = st
                .min_pin()
                .map_or(st.durable_seq, |p| p.min(st.durable_seq));
            if floor > cap {
                return Ok(PromoteReport {
                    from: st.replica_seq,
                    to: st.replica_seq,
                    ..PromoteReport::default()
                });
            }
            st.checkpoints
                .range(floor..=cap)
                .rev()
                .find(|(_, e)| e.checkpoint.timestamp <= cutoff)
                .map(|(&seq, _)| seq)
        };
        match target {
            Some(seq) => promote_through(&self.shared, seq, PromoteReason::Window),
            None => {
                let st = self.shared.lock();
                Ok(PromoteReport {
                    from: st.replica_seq,
                    to: st.replica_seq,
                    ..PromoteReport::default()
                })
            }
        }
    }

    /// Periodic upkeep (the VRA's promoter calls it every few seconds with the wall
    /// clock): promotes history older than the configured window, enforces the hard
    /// limit, and clears "History Not Meeting SLA" once the journal again holds the
    /// whole window (or, with no window set, is below its warning threshold).
    pub fn maintain(&self, now: UnixMillis) -> Result<PromoteReport> {
        let mut report = PromoteReport::default();
        let window = self.shared.cfg.history_window;
        if let Some(window) = window {
            let cutoff = UnixMillis(now.0.saturating_sub(window.as_millis() as u64));
            report = self.promote_older_than(cutoff)?;
        }
        if let Some(r) = enforce_hard_limit(&self.shared)? {
            report = r;
        }
        let mut st = self.shared.lock();
        if st.history_not_meeting_sla {
            let size = st.size();
            let ok = match window {
                Some(window) => {
                    let cutoff = UnixMillis(now.0.saturating_sub(window.as_millis() as u64));
                    st.checkpoints.iter().any(|(seq, e)| {
                        st.checkpoint_state(*seq) == CheckpointState::Usable
                            && e.checkpoint.timestamp <= cutoff
                    })
                }
                None => self.shared.cfg.warning_bytes.is_none_or(|w| size < w),
            };
            if ok {
                info!("journal history meets its sla again");
                st.history_not_meeting_sla = false;
            }
        }
        self.shared.publish_status(&st);
        Ok(report)
    }

    /// Runs the hard-limit check now (the committer also triggers it in the background).
    pub fn enforce_limits(&self) -> Result<Option<PromoteReport>> {
        enforce_hard_limit(&self.shared)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting records, waits for the accepted ones to become durable and joins
    /// the journal's threads.
    pub fn close(mut self) -> Result<()> {
        self.shutdown();
        let st = self.shared.lock();
        match &st.failed {
            Some(f) => Err(JournalError::Poisoned(f.clone())),
            None => Ok(()),
        }
    }

    fn shutdown(&mut self) {
        {
            let mut st = self.shared.lock();
            st.shutdown = true;
        }
        self.shared.commit_cv.notify_all();
        self.shared.promote_cv.notify_all();
        self.shared.durable_cv.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                warn!("journal thread panicked");
            }
        }
    }

    fn accept(&self, want: Option<Seq>, generation: Generation, body: &RecordBody) -> Result<Seq> {
        let shared = &*self.shared;
        let plen = payload_len(body);
        if plen > u64::from(shared.cfg.max_payload) {
            return Err(JournalError::RecordTooLarge {
                len: plen,
                max: u64::from(shared.cfg.max_payload),
            });
        }
        if let Some((volume, offset, len)) = body.volume_range() {
            let replica = shared
                .volumes
                .get(&volume)
                .ok_or(JournalError::UnknownVolume(volume))?;
            let size = replica.spec.size;
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(JournalError::OutOfRange {
                    volume,
                    offset,
                    len,
                    size,
                });
            }
        }
        if let RecordBody::Checkpoint(cp) = body
            && !checkpoint_fits(cp)
        {
            return Err(JournalError::Config(
                "checkpoint name or vm longer than 65535 bytes".into(),
            ));
        }
        // Encoding (payload copy and checksum) happens outside the lock.
        let mut frame = encode_frame(body, Seq(0), generation, shared.seed);
        let frame_len = frame.len() as u64;

        let mut st = shared.lock();
        if let Some(f) = &st.failed {
            return Err(JournalError::Poisoned(f.clone()));
        }
        if st.shutdown {
            return Err(JournalError::Closed);
        }
        if generation < st.generation {
            return Err(JournalError::Fenced {
                got: generation,
                current: st.generation,
            });
        }
        let seq = match (want, st.next_seq) {
            (Some(s), Some(n)) if s == n => s,
            (Some(s), Some(n)) if s < n => {
                return Err(JournalError::SequenceDuplicate {
                    got: s,
                    last: st.last_seq,
                });
            }
            (Some(s), Some(_)) if shared.cfg.sparse_seqs => s,
            (Some(s), Some(n)) => {
                return Err(JournalError::SequenceGap {
                    expected: n,
                    got: s,
                });
            }
            (Some(s), None) => s,
            (None, Some(n)) => n,
            (None, None) => Seq(1),
        };
        if seq == Seq(0) || seq > Seq::MAX {
            return Err(JournalError::SequenceGap {
                expected: st.next_seq.unwrap_or(Seq(1)),
                got: seq,
            });
        }
        if let RecordBody::Checkpoint(cp) = body
            && st.checkpoint_ids.contains_key(&cp.id)
        {
            return Err(JournalError::DuplicateCheckpoint(cp.id));
        }
        frame.head[16..24].copy_from_slice(&seq.0.to_le_bytes());

        // Place the frame: roll to a new segment when it would not fit.
        let roll = match st.active.and_then(|a| st.segments.get(&a)) {
            None => true,
            Some(s) => s.last_seq.is_some() && s.len + frame_len > shared.cfg.segment_size,
        };
        if roll {
            let id = st.next_segment;
            st.next_segment = SegmentId(id.0 + 1);
            let header = SegmentHeader {
                id,
                base_seq: seq,
                salt: shared.salt,
                created: UnixMillis::now(),
            };
            st.segments.insert(
                id,
                SegState {
                    path: segment_path(&shared.dir, id),
                    file: None,
                    header,
                    last_seq: None,
                    len: SEGMENT_HEADER_LEN,
                    durable_len: SEGMENT_HEADER_LEN,
                },
            );
            st.active = Some(id);
            debug!(segment = id.0, base_seq = seq.0, "starting segment");
        }
        let Some(segment) = st.active else {
            return Err(JournalError::Closed);
        };
        let offset = {
            let Some(s) = st.segments.get_mut(&segment) else {
                return Err(JournalError::Closed);
            };
            let offset = s.len;
            s.len += frame_len;
            s.last_seq = Some(seq);
            offset
        };
        let position = JournalPosition { segment, offset };
        match body {
            RecordBody::Write {
                volume,
                offset: voff,
                data,
            } => st.writes.push_back(WriteMeta {
                seq,
                volume: *volume,
                offset: *voff,
                len: data.len() as u64,
                src: Source::Journal {
                    segment,
                    pos: offset + (RECORD_HEADER_LEN + WRITE_PREFIX_LEN) as u64,
                },
                frame: position,
                frame_len,
            }),
            RecordBody::Zero {
                volume,
                offset: voff,
                len,
            }
            | RecordBody::Trim {
                volume,
                offset: voff,
                len,
            } => st.writes.push_back(WriteMeta {
                seq,
                volume: *volume,
                offset: *voff,
                len: *len,
                src: Source::Zero,
                frame: position,
                frame_len,
            }),
            RecordBody::Checkpoint(cp) => {
                st.checkpoint_ids.insert(cp.id, seq);
                st.checkpoints.insert(
                    seq,
                    CheckpointEntry {
                        checkpoint: cp.clone(),
                        position,
                    },
                );
            }
        }
        st.pending.push(Pending {
            segment,
            offset,
            seq,
            frame,
        });
        st.last_seq = seq;
        st.next_seq = Some(seq.next());
        st.generation = generation;
        st.counters.appends += 1;
        st.counters.append_bytes += plen;
        drop(st);
        shared.commit_cv.notify_one();
        Ok(seq)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
        }
    }
}

/// Rebuilds the in-memory state by scanning the segment files.
fn recover(
    dir: &Path,
    cfg: &JournalConfig,
    marker: Option<&ReplicaMarker>,
) -> Result<(State, Option<u64>, OpenReport)> {
    let replica_seq = marker.map_or(Seq(0), |m| m.seq);
    let mut st = State {
        next_seq: (replica_seq > Seq(0)).then(|| replica_seq.next()),
        last_seq: replica_seq,
        written_seq: replica_seq,
        durable_seq: replica_seq,
        generation: marker.map_or(Generation(0), |m| m.generation),
        segments: BTreeMap::new(),
        active: None,
        next_segment: SegmentId(1),
        pending: Vec::new(),
        writes: VecDeque::new(),
        checkpoints: BTreeMap::new(),
        checkpoint_ids: HashMap::new(),
        replica_seq,
        promoting_to: None,
        pins: BTreeMap::new(),
        failed: None,
        shutdown: false,
        promote_requested: false,
        counters: Counters::default(),
        history_not_meeting_sla: marker.is_some_and(|m| m.history_short),
        early_promotions: 0,
    };
    let mut report = OpenReport::default();
    let mut salt = None;
    let files = list_segments(dir)?;
    let n = files.len();
    let mut last_seq: Option<Seq> = None;
    let mut scan_generation = Generation(0);
    for (i, (id, path)) in files.into_iter().enumerate() {
        let is_last = i + 1 == n;
        st.next_segment = SegmentId(id.0 + 1);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| JournalError::io("open segment", &path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| JournalError::io("stat segment", &path, e))?
            .len();
        let bytes = read_prefix(&file, &path, file_len)?;
        report.segments_scanned += 1;
        let header = match parse_header(&bytes, id) {
            Ok(h) => h,
            Err(e) => {
                // The header is made durable before any record is written, so a last
                // segment with a bad header and nothing after it never held a record.
                if is_last && file_len <= SEGMENT_HEADER_LEN {
                    warn!(
                        segment = id.0,
                        "removing last segment with incomplete header"
                    );
                    remove_file(&path)?;
                    sync_dir(dir)?;
                    report.removed_segments.push(id);
                    continue;
                }
                return Err(e);
            }
        };
        if let Some(exp) = last_seq.map(Seq::next)
            && (header.base_seq < exp || (header.base_seq != exp && !cfg.sparse_seqs))
        {
            return Err(JournalError::Corrupt {
                segment: id,
                offset: 0,
                reason: format!("segment starts at seq {}, expected {exp}", header.base_seq),
            });
        }
        if last_seq.is_none()
            && !cfg.sparse_seqs
            && replica_seq > Seq(0)
            && header.base_seq > replica_seq.next()
        {
            return Err(JournalError::Corrupt {
                segment: id,
                offset: 0,
                reason: format!(
                    "records {} to {} missing between the replica and the first segment",
                    replica_seq.next(),
                    Seq(header.base_seq.0 - 1)
                ),
            });
        }
        let seed = crc_seed(header.salt);
        let mode = if is_last {
            ParseMode::Recover
        } else {
            ParseMode::Strict
        };
        let mut expect = header.base_seq;
        let mut seg_last = None;
        let mut records = 0u64;
        let end = parse_records(
            &bytes,
            id,
            seed,
            cfg.max_payload,
            mode,
            |h, off, payload| {
                let corrupt = |reason: String| JournalError::Corrupt {
                    segment: id,
                    offset: off,
                    reason,
                };
                if h.seq < expect || (h.seq != expect && !cfg.sparse_seqs) {
                    return Err(corrupt(format!(
                        "record seq {} where {expect} expected",
                        h.seq
                    )));
                }
                if h.generation < scan_generation {
                    return Err(corrupt(format!(
                        "record generation {} below earlier {scan_generation}",
                        h.generation
                    )));
                }
                scan_generation = h.generation;
                let body = decode_payload(h.kind, payload).map_err(corrupt)?;
                index_record(&mut st, h.seq, id, off, &body, replica_seq, cfg)
                    .map_err(|e| corrupt(e.to_string()))?;
                expect = h.seq.next();
                seg_last = Some(h.seq);
                records += 1;
                Ok(())
            },
        )?;
        let valid_end = match end {
            ParseEnd::Clean => file_len,
            ParseEnd::Torn { at, reason } => {
                warn!(
                    segment = id.0,
                    offset = at,
                    removed = file_len - at,
                    reason,
                    "truncating torn tail"
                );
                truncate_file(&file, &path, at)?;
                report.torn_tail = Some((id, at, file_len - at, reason));
                at
            }
        };
        report.records += records;
        let Some(seg_last) = seg_last else {
            if is_last {
                info!(segment = id.0, "removing last segment with no records");
                remove_file(&path)?;
                sync_dir(dir)?;
                report.removed_segments.push(id);
                continue;
            }
            return Err(JournalError::Corrupt {
                segment: id,
                offset: SEGMENT_HEADER_LEN,
                reason: "sealed segment holds no record".into(),
            });
        };
        last_seq = Some(seg_last);
        salt = Some(header.salt);
        st.segments.insert(
            id,
            SegState {
                path,
                file: Some(Arc::new(file)),
                header,
                last_seq: Some(seg_last),
                len: valid_end,
                durable_len: valid_end,
            },
        );
        st.active = Some(id);
    }
    st.generation = st.generation.max(scan_generation);
    if let Some(l) = last_seq {
        if l < replica_seq {
            // Every record left is already in the replicas (promotion freed the rest).
        } else {
            st.last_seq = l;
            st.written_seq = l;
            st.durable_seq = l;
            st.next_seq = Some(l.next());
        }
    }
    // Segments wholly promoted before a crash: finish freeing them.
    let promoted: Vec<SegmentId> = st
        .segments
        .iter()
        .filter(|(_, s)| st.freeable(s, replica_seq))
        .map(|(id, _)| *id)
        .collect();
    for id in promoted {
        if let Some(s) = st.segments.remove(&id) {
            info!(segment = id.0, "removing segment already promoted");
            remove_file(&s.path)?;
            report.removed_segments.push(id);
            if st.active == Some(id) {
                st.active = None;
            }
        }
    }
    if !report.removed_segments.is_empty() {
        sync_dir(dir)?;
    }
    drop_unreachable_checkpoints(&mut st);
    Ok((st, salt, report))
}

/// Adds a record found by the scan to the index.
fn index_record(
    st: &mut State,
    seq: Seq,
    segment: SegmentId,
    off: u64,
    body: &RecordBody,
    replica_seq: Seq,
    cfg: &JournalConfig,
) -> Result<()> {
    let frame_len = RECORD_HEADER_LEN as u64 + payload_len(body);
    let position = JournalPosition {
        segment,
        offset: off,
    };
    match body {
        RecordBody::Checkpoint(cp) => {
            if st.checkpoint_ids.insert(cp.id, seq).is_some() {
                return Err(JournalError::DuplicateCheckpoint(cp.id));
            }
            st.checkpoints.insert(
                seq,
                CheckpointEntry {
                    checkpoint: cp.clone(),
                    position,
                },
            );
        }
        _ => {
            let Some((volume, voff, len)) = body.volume_range() else {
                return Ok(());
            };
            if seq <= replica_seq {
                return Ok(());
            }
            // Records of volumes no longer configured are kept on disk but not indexed.
            let Some(spec) = cfg.volumes.iter().find(|v| v.id == volume) else {
                warn!(
                    volume = volume.0,
                    seq = seq.0,
                    "record for an unconfigured volume"
                );
                return Ok(());
            };
            if voff.checked_add(len).is_none_or(|e| e > spec.size) {
                return Err(JournalError::OutOfRange {
                    volume,
                    offset: voff,
                    len,
                    size: spec.size,
                });
            }
            let src = match body {
                RecordBody::Write { .. } => Source::Journal {
                    segment,
                    pos: off + (RECORD_HEADER_LEN + WRITE_PREFIX_LEN) as u64,
                },
                _ => Source::Zero,
            };
            st.writes.push_back(WriteMeta {
                seq,
                volume,
                offset: voff,
                len,
                src,
                frame: position,
                frame_len,
            });
        }
    }
    Ok(())
}

/// Forgets checkpoints whose record's segment has been freed.
fn drop_unreachable_checkpoints(st: &mut State) {
    let gone: Vec<Seq> = st
        .checkpoints
        .iter()
        .filter(|(_, e)| !st.segments.contains_key(&e.position.segment))
        .map(|(&s, _)| s)
        .collect();
    for s in gone {
        if let Some(e) = st.checkpoints.remove(&s) {
            st.checkpoint_ids.remove(&e.checkpoint.id);
        }
    }
}

/// How long the committer waits before writing again after running out of space.
const OUT_OF_SPACE_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

fn committer_loop(shared: &Shared) {
    let mut appender = Appender::default();
    loop {
        let mut batch = {
            let mut st = shared.lock();
            loop {
                if !st.pending.is_empty() && st.failed.is_none() {
                    break;
                }
                if st.shutdown || st.failed.is_some() {
                    return;
                }
                st = shared
                    .commit_cv
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            std::mem::take(&mut st.pending)
        };
        let mut stalled = false;
        loop {
            match commit_batch(shared, &mut appender, &mut batch) {
                Ok(()) => break,
                // Out of space: nothing is lost yet (the records are still here and the
                // durable position has not moved); report it and write the same records
                // again until there is room. Later appends queue behind them.
                Err(e) if e.is_out_of_space() => {
                    if !stalled {
                        stalled = true;
                        warn!(error = %e, records = batch.len(), "journal out of space; retrying until space is freed");
                        let msg: Arc<str> = Arc::from(format!("out of space: {e}"));
                        shared.durable_tx.send_modify(|d| d.stalled = Some(msg));
                    }
                    let st = shared.lock();
                    if st.shutdown {
                        return;
                    }
                    drop(
                        shared
                            .commit_cv
                            .wait_timeout(st, OUT_OF_SPACE_RETRY)
                            .unwrap_or_else(std::sync::PoisonError::into_inner),
                    );
                }
                Err(e) => {
                    let msg: Arc<str> = Arc::from(e.to_string());
                    warn!(error = %e, "journal write failed; refusing further appends");
                    let mut st = shared.lock();
                    st.failed = Some(msg.clone());
                    st.pending.clear();
                    drop(st);
                    shared.durable_tx.send_modify(|d| d.failed = Some(msg));
                    shared.durable_cv.notify_all();
                    return;
                }
            }
        }
        if stalled {
            info!("journal has space again; appends continue");
            shared.durable_tx.send_modify(|d| d.stalled = None);
        }
    }
}

/// Writes a batch (grouped by segment, in order) and fsyncs it, then publishes the new
/// durable position. Groups are removed from `batch` as they become durable, so that after
/// an error `batch` holds exactly what still has to be written.
fn commit_batch(shared: &Shared, appender: &mut Appender, batch: &mut Vec<Pending>) -> Result<()> {
    while !batch.is_empty() {
        let start = 0;
        let segment = batch[start].segment;
        let end = batch[start..]
            .iter()
            .position(|p| p.segment != segment)
            .map_or(batch.len(), |n| start + n);
        let group = &mut batch[start..end];
        let (file, path) = {
            let st = shared.lock();
            let s = st.segments.get(&segment).ok_or(JournalError::Closed)?;
            (s.file.clone(), (s.path.clone(), s.header))
        };
        let (path, header) = path;
        let file = match file {
            Some(f) => f,
            None => {
                let f = Arc::new(create_segment(&shared.dir, &header)?);
                let mut st = shared.lock();
                if let Some(s) = st.segments.get_mut(&segment) {
                    s.file = Some(f.clone());
                }
                f
            }
        };
        let base = group[0].offset;
        let mut group_end = base;
        for p in group.iter_mut() {
            debug_assert_eq!(p.offset, group_end);
            seal_frame(&mut p.frame.head, shared.seed, base);
            group_end += p.frame.len() as u64;
        }
        let last = group[group.len() - 1].seq;
        let count = group.len() as u64;
        appender
            .append(segment, &path, &file, base, group.iter().map(|p| &p.frame))
            .map_err(|e| JournalError::io("write segment", &path, e))?;
        shared.lock().written_seq = last;
        file.sync_data()
            .map_err(|e| JournalError::io("sync segment", &path, e))?;
        let hard = {
            let mut st = shared.lock();
            st.durable_seq = last;
            if let Some(s) = st.segments.get_mut(&segment) {
                s.durable_len = group_end;
            }
            st.counters.fsyncs += 1;
            st.counters.durable_records += count;
            shared.publish_status(&st);
            let over = shared.cfg.hard_limit_bytes.is_some_and(|h| st.size() > h);
            if over && !st.promote_requested {
                st.promote_requested = true;
                true
            } else {
                false
            }
        };
        shared.durable_tx.send_modify(|d| d.seq = last);
        shared.durable_cv.notify_all();
        if hard {
            shared.promote_cv.notify_one();
        }
        batch.drain(..end);
    }
    Ok(())
}

fn promoter_loop(shared: &Shared) {
    loop {
        {
            let mut st = shared.lock();
            while !st.promote_requested && !st.shutdown {
                st = shared
                    .promote_cv
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if st.shutdown {
                return;
            }
        }
        if let Err(e) = enforce_hard_limit(shared) {
            warn!(error = %e, "early promotion at the hard limit failed");
        }
        shared.lock().promote_requested = false;
    }
}

/// At the hard limit: promotes the oldest whole segments early so that the journal is
/// at least one segment below the limit, and reports "History Not Meeting SLA".
fn enforce_hard_limit(shared: &Shared) -> Result<Option<PromoteReport>> {
    let Some(hard) = shared.cfg.hard_limit_bytes else {
        return Ok(None);
    };
    // Hold the promotion lock throughout, so that the target is chosen with no other
    // promotion in flight.
    let _one = shared
        .promote_lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let target = {
        let st = shared.lock();
        let size = st.size();
        if size <= hard {
            return Ok(None);
        }
        let goal = hard.saturating_sub(shared.cfg.segment_size);
        let mut freed = 0;
        let mut target = st.replica_seq;
        for s in st.segments.values() {
            if size - freed <= goal {
                break;
            }
            let Some(last) = s.last_seq else { break };
            if last > st.durable_seq {
                break;
            }
            // A segment ending in the checkpoint at the replica point is kept, so to
            // free it the replica must move one record further.
            let mut t = last;
            if st.checkpoints.contains_key(&t) {
                if t >= st.durable_seq {
                    break;
                }
                t = t.next();
            }
            target = target.max(t);
            freed += s.len;
        }
        let capped = st.min_pin().map_or(target, |p| target.min(p));
        if capped < target {
            warn!(
                target = target.0,
                pinned = capped.0,
                "early promotion limited by an open image"
            );
        }
        capped
    };
    let report = if target > shared.lock().usable_floor() {
        Some(promote_through_locked(
            shared,
            target,
            PromoteReason::HardLimit,
        )?)
    } else {
        None
    };
    let mut st = shared.lock();
    st.history_not_meeting_sla = true;
    if report.is_some() {
        st.early_promotions += 1;
    }
    warn!(
        size = st.size(),
        hard_limit = hard,
        replica_seq = st.replica_seq.0,
        "journal at hard limit: history promoted early, history not meeting sla"
    );
    shared.publish_status(&st);
    Ok(report)
}

/// Applies every record up to `target` to the replicas and frees the segments that hold
/// only promoted records. Crash-safe: the marker first records the intent, replicas are
/// fsynced before the marker records the new point, and segments are deleted last.
fn promote_through(shared: &Shared, target: Seq, reason: PromoteReason) -> Result<PromoteReport> {
    let _one = shared
        .promote_lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    promote_through_locked(shared, target, reason)
}

/// [`promote_through`] for a caller that holds the promotion lock.
fn promote_through_locked(
    shared: &Shared,
    target: Seq,
    reason: PromoteReason,
) -> Result<PromoteReport> {
    type SegRef = (SegmentId, PathBuf, Arc<std::fs::File>, u64, u64);
    let (from, generation, segs): (Seq, Generation, Vec<SegRef>) = {
        let mut st = shared.lock();
        if target > st.durable_seq {
            return Err(JournalError::Config(format!(
                "cannot promote to {target}: durable only to {}",
                st.durable_seq
            )));
        }
        if let Some(pin) = st.min_pin()
            && target > pin
        {
            return Err(JournalError::Pinned {
                target,
                pinned: pin,
            });
        }
        if let Some(p) = st.promoting_to
            && target < p
        {
            return Err(JournalError::Config(format!(
                "an unfinished promotion to {p} must complete before promoting to {target}"
            )));
        }
        let from = st.replica_seq;
        if target > from {
            st.promoting_to = Some(target);
        }
        let segs = st
            .segments
            .iter()
            .filter(|(_, s)| s.last_seq.is_some_and(|l| l > from) && s.header.base_seq <= target)
            .filter_map(|(id, s)| {
                s.file
                    .clone()
                    .map(|f| (*id, s.path.clone(), f, s.durable_len, s.header.salt))
            })
            .collect();
        (from, st.generation, segs)
    };
    let mut report = PromoteReport {
        from,
        to: from.max(target),
        ..PromoteReport::default()
    };
    if target > from {
        let mut applied = 0;
        let history_short =
            reason == PromoteReason::HardLimit || shared.lock().history_not_meeting_sla;
        let marker = |seq: Seq, promoting_to: Seq| ReplicaMarker {
            seq,
            promoting_to,
            generation,
            written: UnixMillis::now(),
            history_short,
        };
        if let Err(e) = apply_to_replicas(
            shared,
            marker(from, target),
            marker(target, Seq(0)),
            &segs,
            &mut applied,
        ) {
            // If any write reached a replica, images below the target stay refused
            // (as they would be after a restart, which resumes the promotion).
            if applied == 0 {
                shared.lock().promoting_to = None;
            }
            warn!(error = %e, target = target.0, applied, "promotion failed");
            return Err(e);
        }
        report.records_applied = applied;
    }
    // Forget promoted records; free segments that hold nothing newer.
    let freed: Vec<(SegmentId, PathBuf, u64)> = {
        let mut st = shared.lock();
        let point = st.replica_seq.max(target);
        st.replica_seq = point;
        st.promoting_to = None;
        while st.writes.front().is_some_and(|w| w.seq <= point) {
            st.writes.pop_front();
        }
        let pending_segs: std::collections::HashSet<SegmentId> =
            st.pending.iter().map(|p| p.segment).collect();
        let active = st.active;
        let ids: Vec<SegmentId> = st
            .segments
            .iter()
            .filter(|(id, s)| st.freeable(s, point) && !pending_segs.contains(id))
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in ids {
            if active == Some(id) {
                st.active = None;
            }
            if let Some(s) = st.segments.remove(&id) {
                out.push((id, s.path, s.len));
            }
        }
        drop_unreachable_checkpoints(&mut st);
        st.counters.promotions += u64::from(target > from);
        st.counters.promoted_records += report.records_applied;
        st.counters.freed_segments += out.len() as u64;
        shared.publish_status(&st);
        out
    };
    for (_, path, len) in &freed {
        remove_file(path)?;
        report.segments_freed += 1;
        report.bytes_freed += len;
    }
    if !freed.is_empty() {
        sync_dir(&shared.dir)?;
    }
    if target > from || !freed.is_empty() {
        info!(
            reason = reason.as_str(),
            from = from.0,
            to = report.to.0,
            records = report.records_applied,
            segments_freed = report.segments_freed,
            bytes_freed = report.bytes_freed,
            "promoted journal history into replicas"
        );
    }
    Ok(report)
}

/// The IO part of a promotion: intent marker, replica writes, replica fsync, marker.
fn apply_to_replicas(
    shared: &Shared,
    intent: ReplicaMarker,
    done: ReplicaMarker,
    segs: &[(SegmentId, PathBuf, Arc<std::fs::File>, u64, u64)],
    applied: &mut u64,
) -> Result<()> {
    let (from, target) = (intent.seq, done.seq);
    write_marker(&shared.dir, &intent)?;
    let mut touched = std::collections::BTreeSet::new();
    for (id, path, file, len, salt) in segs {
        let bytes = read_prefix(file, path, *len)?;
        parse_header(&bytes, *id)?;
        parse_records(
            &bytes,
            *id,
            crc_seed(*salt),
            shared.cfg.max_payload,
            ParseMode::Strict,
            |h, off, payload| {
                if h.seq <= from || h.seq > target {
                    return Ok(());
                }
                let body =
                    decode_payload(h.kind, payload).map_err(|reason| JournalError::Corrupt {
                        segment: *id,
                        offset: off,
                        reason,
                    })?;
                let Some((volume, voff, vlen)) = body.volume_range() else {
                    return Ok(());
                };
                let Some(replica) = shared.volumes.get(&volume) else {
                    return Ok(());
                };
                let rpath = &replica.spec.replica_path;
                match &body {
                    RecordBody::Write { data, .. } => replica
                        .file
                        .write_all_at(data, voff)
                        .map_err(|e| JournalError::io("write replica", rpath, e))?,
                    _ => crate::replica::write_zeroes(&replica.file, rpath, voff, vlen)?,
                }
                touched.insert(volume);
                *applied += 1;
                Ok(())
            },
        )?;
    }
    for volume in touched {
        let replica = &shared.volumes[&volume];
        replica
            .file
            .sync_data()
            .map_err(|e| JournalError::io("sync replica", &replica.spec.replica_path, e))?;
    }
    write_marker(&shared.dir, &done)?;
    Ok(())
}
