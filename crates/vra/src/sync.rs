//! Syncs of a protected VPG: the shared sync state ([`SyncShared`]: dirty map, tracking,
//! pause, requested delta sync, progress) and the syncer task that brings the recovery
//! site level with the protected volumes when the stream alone cannot:
//!
//! - bitmap sync: regions written while writes were tracked instead of buffered (link
//!   down, buffer full, paused) are read and sent again;
//! - initial sync: regions never sent, skipping those that read as zeroes (a fresh replica
//!   is zero there);
//! - delta sync: the local volume's coarse (16 KiB) block hashes go to the recovery VRA,
//!   which compares them with its newest image and answers the fine (4 KiB) hashes of the
//!   coarse blocks that differ; only differing fine blocks are sent.
//!
//! Sync data travels in the ordinary stream, as writes read under the volume's range lock,
//! so it is ordered with the VPG's own writes and lands in the journal like them: the
//! last checkpoint before a bitmap sync stays recoverable during it. While a sync runs,
//! new writes stream as usual and no checkpoints are taken; the VPG is consistent again
//! once every region has been sent.

use std::{
    collections::VecDeque,
    os::unix::fs::FileExt,
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError, atomic::Ordering},
    time::{Duration, Instant},
};

use tandem_core::status::SyncTrigger;
use tandem_journal::UnixMillis;
use tandem_proto::v1::{self as pb, replication_client::ReplicationClient};
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};
use tracing::{info, warn};

use crate::{
    connector::Connector,
    dirty::{DirtyMap, REGION, Run},
    hashes::{
        HASH_LEN, HASHING, SCAN_CHUNK, block_len, compare_answer_fits, fine_differs, hash_blocks,
    },
    model::EntryBody,
    protected::{ProtectedShared, ProtectedVolume},
};

/// Regions a bitmap or initial sync reads at once (1 MiB).
const RUN_REGIONS: u64 = 16;
/// Coarse block of a delta sync: both sides hash every byte once at this size, and the
/// fine blocks of the coarse blocks that differ once more. BLAKE3 (AVX-512, measured here)
/// runs at 4.1 GB/s on 16 KiB inputs, 4.4 on 64 KiB and 2.3 on 4 KiB; with 1% of 4 KiB
/// blocks changed at random, 4% of 16 KiB blocks differ against 15% of 64 KiB ones, so
/// 16 KiB hashes least in all.
const COARSE: u64 = 16 << 10;
/// Fine block of a delta sync: the unit that is sent when it differs.
const FINE: u64 = 4 << 10;
/// Bytes of a volume compared per request (1024 coarse blocks).
const PIECE: u64 = 16 << 20;
/// Compare requests in flight: local hashing (see [`HASHING`]) runs ahead of the
/// recovery VRA's work on the earlier pieces, so that neither side waits for the other.
const COMPARES_IN_FLIGHT: usize = 8;
/// How often an idle syncer looks again without being woken.
const IDLE_POLL: Duration = Duration::from_millis(250);

/// The kind of sync running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// Regions never sent, every volume.
    Initial,
    /// Block hashes compared, every volume.
    Delta,
    /// Regions written while tracked.
    Bitmap,
    /// Regions never sent, some volumes (added or grown).
    VolumeInitial,
    /// Block hashes compared, one volume.
    VolumeDelta,
}

impl SyncKind {
    fn to_pb(self) -> pb::VraSyncKind {
        match self {
            SyncKind::Initial => pb::VraSyncKind::Initial,
            SyncKind::Delta => pb::VraSyncKind::Delta,
            SyncKind::Bitmap => pb::VraSyncKind::Bitmap,
            SyncKind::VolumeInitial => pb::VraSyncKind::VolumeInitial,
            SyncKind::VolumeDelta => pb::VraSyncKind::VolumeDelta,
        }
    }
}

/// Progress of one sync.
#[derive(Debug, Clone)]
pub struct Progress {
    /// What runs.
    pub kind: SyncKind,
    /// Why, when the seed names a trigger.
    pub trigger: Option<SyncTrigger>,
    /// Bytes to examine (grows when more regions get dirty meanwhile).
    pub total: u64,
    /// Bytes examined.
    pub done: u64,
    /// Write data the sync pushed into the stream.
    pub sent: u64,
    /// Hash bytes received (delta sync).
    pub hash_bytes: u64,
    /// Everything is sent; the sync ends once the recovery VRA holds it durably.
    pub awaiting_acks: bool,
    /// Runs pushed into the stream and not yet durable at the recovery VRA: (the stream
    /// position once pushed, bytes examined). Progress counts them once durable.
    in_flight: VecDeque<(u64, u64)>,
    in_flight_bytes: u64,
    /// The stream position of the last data the sync pushed.
    last_pushed_seq: Option<u64>,
    started: Instant,
    started_ms: u64,
}

impl Progress {
    fn new(kind: SyncKind, trigger: Option<SyncTrigger>, total: u64) -> Self {
        Self {
            kind,
            trigger,
            total,
            done: 0,
            sent: 0,
            hash_bytes: 0,
            awaiting_acks: false,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            last_pushed_seq: None,
            started: Instant::now(),
            started_ms: UnixMillis::now().0,
        }
    }

    /// `bytes` were examined and `sent` of them pushed; the stream reaches `seq` with them.
    fn pushed(&mut self, seq: u64, bytes: u64, sent: u64) {
        self.done += bytes;
        self.sent += sent;
        if sent == 0 {
            // Nothing to wait for (zeroes a fresh replica already holds).
            return;
        }
        self.last_pushed_seq = Some(seq);
        self.in_flight_bytes += bytes;
        let full = self.in_flight.len() >= MAX_IN_FLIGHT_RUNS;
        match self.in_flight.back_mut() {
            // Bounded: past this many runs in flight, the newest absorbs the next.
            Some(last) if full => *last = (seq, last.1 + bytes),
            _ => self.in_flight.push_back((seq, bytes)),
        }
    }

    /// The recovery VRA holds the stream durably up to `durable`.
    fn settle(&mut self, durable: u64) {
        while let Some(&(seq, bytes)) = self.in_flight.front() {
            if seq > durable {
                break;
            }
            self.in_flight.pop_front();
            self.in_flight_bytes -= bytes;
        }
    }

    /// The status message. Progress counts what the recovery VRA holds durably (not what
    /// was merely put on the wire): a sync over a slow link shows its real pace.
    pub fn to_pb(&self) -> pb::VraSyncStatus {
        let durable_done = self.done.saturating_sub(self.in_flight_bytes);
        let percent = (durable_done.min(self.total) * 100)
            .checked_div(self.total)
            .map_or(100, |p| p as u32);
        // Sent is not yet there: 100% only once the recovery VRA holds it.
        let percent = if self.awaiting_acks {
            percent.min(99)
        } else {
            percent
        };
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta_secs = if durable_done == 0 || durable_done >= self.total {
            0
        } else {
            let rate = durable_done as f64 / elapsed.max(1e-3);
            ((self.total - durable_done) as f64 / rate).ceil() as u64
        };
        pb::VraSyncStatus {
            kind: self.kind.to_pb() as i32,
            total_bytes: self.total,
            done_bytes: durable_done,
            percent,
            eta_secs,
            sent_bytes: self.sent,
            hash_bytes: self.hash_bytes,
            trigger: self
                .trigger
                .map(|t| t.as_str().to_string())
                .unwrap_or_default(),
            started_ms: self.started_ms,
        }
    }
}

/// How long a sync waits for acknowledgements that stopped moving once all is sent.
const ACK_TAIL_WAIT: Duration = Duration::from_secs(2);

/// Runs of a sync tracked while in flight; more merge into the newest.
const MAX_IN_FLIGHT_RUNS: usize = 4096;

/// A requested delta sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaRequest {
    /// Some volumes (by position, sorted, distinct), or every volume.
    pub volumes: Option<Vec<usize>>,
    /// Why.
    pub trigger: Option<SyncTrigger>,
}

/// The sync state of a protected VPG.
#[derive(Debug)]
pub struct SyncState {
    /// Regions still to send.
    pub map: DirtyMap,
    /// Writes are tracked in the map instead of buffered.
    pub tracking: bool,
    /// Protection is paused (tracking until resumed).
    pub paused: bool,
    /// A delta sync is wanted.
    pub delta: Option<DeltaRequest>,
    /// Why tracking started (reported with the sync that follows).
    pub trigger: Option<SyncTrigger>,
    /// The sync running.
    pub running: Option<Progress>,
    /// The last sync that finished.
    pub last: Option<Progress>,
}

impl SyncState {
    /// The sync running, or the one due next (with no progress yet), for status; the
    /// stream is durable at the recovery VRA up to `durable`. A due sync while the stream
    /// is not `established` is shown as being evaluated.
    pub fn current_pb(&mut self, durable: u64, established: bool) -> Option<pb::VraSyncStatus> {
        if let Some(p) = &mut self.running {
            p.settle(durable);
            return Some(p.to_pb());
        }
        let due = self.due_pb();
        if established {
            return due;
        }
        // Due, with no stream to the recovery VRA: its kind is being evaluated ("Syncing").
        due.map(|mut p| {
            p.kind = pb::VraSyncKind::Evaluating as i32;
            p
        })
    }

    /// The sync that is due and not running, if any.
    fn due_pb(&self) -> Option<pb::VraSyncStatus> {
        if let Some(d) = &self.delta {
            let kind = if d.volumes.is_some() {
                SyncKind::VolumeDelta
            } else {
                SyncKind::Delta
            };
            return Some(Progress::new(kind, d.trigger, 0).to_pb());
        }
        // Tracking, or regions left: the sync that will send them is due.
        if !self.map.is_clean() || self.tracking {
            let kind = map_kind(&self.map);
            let trigger = if kind == SyncKind::Bitmap {
                self.trigger
            } else {
                None
            };
            return Some(Progress::new(kind, trigger, self.map.pending_bytes()).to_pb());
        }
        None
    }
}

fn map_kind(map: &DirtyMap) -> SyncKind {
    let volumes = map.volumes();
    if !volumes.is_empty() && volumes.iter().all(|v| v.all_initial()) {
        // Nothing of the VPG was ever sent.
        SyncKind::Initial
    } else if volumes.iter().any(|v| v.has_initial()) {
        // Volumes added (or grown) since.
        SyncKind::VolumeInitial
    } else {
        SyncKind::Bitmap
    }
}

/// Sync state shared by the write path, the sender, the syncer and the control service.
#[derive(Debug)]
pub struct SyncShared {
    state: Mutex<SyncState>,
    /// Wakes the syncer.
    pub wake: Notify,
}

impl SyncShared {
    /// Sync state over `map`.
    pub fn new(map: DirtyMap) -> Self {
        Self {
            state: Mutex::new(SyncState {
                map,
                tracking: false,
                paused: false,
                delta: None,
                trigger: None,
                running: None,
                last: None,
            }),
            wake: Notify::new(),
        }
    }

    /// Locks the state (lock order: this before the replication window).
    pub fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether writes go to the dirty map.
    pub fn tracking(&self) -> bool {
        self.lock().tracking
    }

    /// Whether anything keeps the recovery site from being level (no checkpoints then).
    pub fn busy(&self) -> bool {
        let s = self.lock();
        s.tracking || s.running.is_some() || s.delta.is_some() || !s.map.is_clean()
    }

    /// Asks for a delta sync.
    /// Asks for a delta sync of `volumes` (by position; `None`: every volume), merged with
    /// one already due: a whole-VPG request covers any other, volume requests add up.
    pub fn request_delta(&self, volumes: Option<Vec<usize>>, trigger: Option<SyncTrigger>) {
        {
            let mut s = self.lock();
            let volumes = match (s.delta.as_ref().map(|d| &d.volumes), volumes) {
                (Some(None), _) | (_, None) => None,
                (Some(Some(due)), Some(mut more)) => {
                    more.extend_from_slice(due);
                    Some(more)
                }
                (None, Some(more)) => Some(more),
            }
            .map(|mut v| {
                v.sort_unstable();
                v.dedup();
                v
            });
            let trigger = trigger.or(s.delta.as_ref().and_then(|d| d.trigger));
            s.delta = Some(DeltaRequest { volumes, trigger });
        }
        self.wake.notify_one();
    }
}

/// Why a sync pass stopped early.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("stopped")]
    Stopped,
    #[error("writes are tracked again (link down, buffer full or paused)")]
    Tracking,
    #[error("hashes from the recovery vra: {0}")]
    Hashes(String),
    #[error("reading the protected volume: {0}")]
    Read(std::io::Error),
}

/// Runs until `cancel`: whenever the stream is up and something is left to sync, syncs it.
pub async fn run(
    shared: Arc<ProtectedShared>,
    volumes: Vec<Arc<ProtectedVolume>>,
    connector: Connector,
    cancel: CancellationToken,
) {
    loop {
        if !wait_for_work(&shared, &cancel).await {
            return;
        }
        {
            // From here on new writes stream again; what was tracked is in the map.
            let mut s = shared.sync.lock();
            s.tracking = false;
        }
        match sync_once(&shared, &volumes, &connector, &cancel).await {
            Ok(()) => {}
            Err(PassError::Stopped) => return,
            Err(e) => {
                warn!(vpg = %shared.assignment.vpg, error = %e, "sync interrupted");
                shared.set_error(&e);
                {
                    let mut s = shared.sync.lock();
                    if let Some(p) = s.running.take() {
                        s.last = Some(p);
                    }
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(IDLE_POLL) => {}
                }
            }
        }
    }
}

/// Waits until the stream is established and there is something to sync; false on cancel.
async fn wait_for_work(shared: &ProtectedShared, cancel: &CancellationToken) -> bool {
    loop {
        // A recovery VRA that cannot make entries durable (full datastore) would only pile
        // the sync's data up in its memory: wait until it can again.
        let remote_ok = shared
            .remote_storage_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        let ready =
            shared.connected.load(Ordering::Relaxed) && shared.positions().anchored && remote_ok;
        let work = {
            let s = shared.sync.lock();
            !s.paused
                && (s.tracking
                    || s.delta.is_some()
                    || !s.map.is_clean()
                    || shared.needs_sync.load(Ordering::Relaxed))
        };
        if ready && work {
            return true;
        }
        tokio::select! {
            () = cancel.cancelled() => return false,
            () = shared.sync.wake.notified() => {}
            () = tokio::time::sleep(IDLE_POLL) => {}
        }
    }
}

async fn sync_once(
    shared: &Arc<ProtectedShared>,
    volumes: &[Arc<ProtectedVolume>],
    connector: &Connector,
    cancel: &CancellationToken,
) -> Result<(), PassError> {
    if shared.needs_sync.load(Ordering::Relaxed) {
        // The stream could not resume without loss: only hashes can tell what differs.
        shared.sync.request_delta(None, None);
    }
    let delta = shared.sync.lock().delta.clone();
    if let Some(req) = delta {
        delta_sync(shared, volumes, connector, cancel, &req).await?;
        let mut s = shared.sync.lock();
        if s.delta.as_ref() == Some(&req) {
            s.delta = None;
        }
        drop(s);
        shared.needs_sync.store(false, Ordering::Relaxed);
    }
    map_sync(shared, volumes, cancel).await?;
    until_durable(shared, cancel).await?;
    let mut s = shared.sync.lock();
    if let Some(mut p) = s.running.take() {
        p.settle(u64::MAX);
        info!(
            vpg = %shared.assignment.vpg,
            kind = ?p.kind,
            bytes = p.done,
            sent = p.sent,
            secs = p.started.elapsed().as_secs_f64(),
            "sync finished"
        );
        s.last = Some(p);
    }
    s.trigger = None;
    Ok(())
}

/// Waits until the recovery VRA holds durably the data the running sync pushed: until
/// then the VPG is not level, and its sync still runs. A stream that breaks meanwhile
/// tracks again, and the next pass sends what is lost.
async fn until_durable(
    shared: &ProtectedShared,
    cancel: &CancellationToken,
) -> Result<(), PassError> {
    let Some(written) = shared
        .sync
        .lock()
        .running
        .as_ref()
        .and_then(|p| p.last_pushed_seq)
    else {
        return Ok(());
    };
    let mut durable = shared.watch_durable();
    if *durable.borrow() >= written {
        return Ok(());
    }
    if let Some(p) = shared.sync.lock().running.as_mut() {
        p.awaiting_acks = true;
    }
    let mut moved_at = Instant::now();
    let mut last = *durable.borrow();
    let result = loop {
        let now = *durable.borrow_and_update();
        if now >= written {
            break Ok(());
        }
        if now != last {
            (last, moved_at) = (now, Instant::now());
        }
        if let Err(e) = check_going(shared, cancel) {
            break Err(e);
        }
        // Everything is on the wire and the recovery VRA has acknowledged nothing new for
        // a while: its acknowledgement of the stream's tail can lag until the next entry
        // (seen after an initial sync with no other writes; not understood yet). The
        // sync's data is sent; end it rather than wait for the VPG's next write.
        if shared.positions().sent.0 >= written && moved_at.elapsed() > ACK_TAIL_WAIT {
            warn!(
                vpg = %shared.assignment.vpg, durable = now, sync_end = written,
                "sync ends before the recovery VRA acknowledged its tail"
            );
            break Ok(());
        }
        tokio::select! {
            () = cancel.cancelled() => break Err(PassError::Stopped),
            changed = durable.changed() => if changed.is_err() { break Err(PassError::Stopped) },
            // Tracking starts without a durable change: look again now and then.
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    };
    if let Some(p) = shared.sync.lock().running.as_mut() {
        p.awaiting_acks = false;
    }
    result
}

fn check_going(shared: &ProtectedShared, cancel: &CancellationToken) -> Result<(), PassError> {
    if cancel.is_cancelled() {
        return Err(PassError::Stopped);
    }
    let s = shared.sync.lock();
    if s.tracking || s.paused {
        return Err(PassError::Tracking);
    }
    Ok(())
}

/// Sends the map's regions (bitmap and initial sync) until the map is clean.
async fn map_sync(
    shared: &Arc<ProtectedShared>,
    volumes: &[Arc<ProtectedVolume>],
    cancel: &CancellationToken,
) -> Result<(), PassError> {
    {
        let mut s = shared.sync.lock();
        if s.map.is_clean() {
            return Ok(());
        }
        let kind = map_kind(&s.map);
        let total = s.map.pending_bytes();
        let trigger = if kind == SyncKind::Bitmap {
            s.trigger
        } else {
            None
        };
        match s.running.as_mut() {
            // This pass's delta sync ran first: what is left in the map is part of it, and
            // keeps its kind and trigger (a Force Sync is not re-labelled a bitmap sync of
            // an older trigger).
            Some(p) => p.total += total,
            None => {
                s.running = Some(Progress::new(kind, trigger, total));
                info!(vpg = %shared.assignment.vpg, ?kind, bytes = total, "sync started");
            }
        }
    }
    loop {
        check_going(shared, cancel)?;
        // The next run, in volume order; the bits are cleared as it is taken, so a write
        // that lands after this sets them again and is sent again.
        let taken = {
            let mut s = shared.sync.lock();
            let pending = s.map.pending_bytes();
            if let Some(p) = s.running.as_mut() {
                p.total = p.done + pending;
            }
            let mut taken = None;
            for i in 0..s.map.volumes().len() {
                if let Some(run) = s.map.volume_mut(i).and_then(|v| v.take_run(RUN_REGIONS)) {
                    taken = Some((i, run));
                    break;
                }
            }
            taken
        };
        let Some((index, run)) = taken else {
            return Ok(());
        };
        let len = run.len;
        match send_run(shared, &volumes[index], &run).await {
            Ok(sent) => {
                let seq = shared.positions().written.0;
                let mut s = shared.sync.lock();
                if let Some(p) = s.running.as_mut() {
                    p.pushed(seq, len, sent);
                }
            }
            Err(e) => {
                // Not sent: mark it again so that nothing is lost.
                if let Some(v) = shared.sync.lock().map.volume_mut(index) {
                    v.mark_dirty(run.offset, run.len);
                }
                return Err(e);
            }
        }
    }
}

/// Waits while the buffer is more than half full, so that a sync leaves room for the
/// VPG's own writes (which would otherwise be pushed into tracking by the sync's data).
async fn leave_room(shared: &ProtectedShared) {
    while shared.positions().bytes > shared.budget_total / 2 {
        if shared.sync.tracking() || shared.restart_stream.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Reads one run under its range lock and pushes what must be sent (regions never sent
/// that read as zeroes are already right on a fresh replica); returns the bytes.
async fn send_run(
    shared: &ProtectedShared,
    volume: &ProtectedVolume,
    run: &Run,
) -> Result<u64, PassError> {
    send_parts(shared, volume, run.offset, run.len, REGION, |k, bytes| {
        run.must_send.get(k).copied().unwrap_or(true) || bytes.iter().any(|b| *b != 0)
    })
    .await
}

/// Reads `len` bytes at `offset` under their range lock, so that the stream orders them
/// with concurrent writes, and pushes the `granule`-sized parts that `keep` chooses
/// (adjacent ones in one entry); returns the bytes pushed. The room is reserved before the
/// lock is taken, so the lock is never held while waiting for buffer space.
async fn send_parts(
    shared: &ProtectedShared,
    volume: &ProtectedVolume,
    offset: u64,
    len: u64,
    granule: u64,
    keep: impl Fn(usize, &[u8]) -> bool,
) -> Result<u64, PassError> {
    leave_room(shared).await;
    // Enough for the range split in one entry per part.
    let reserved = shared
        .reserve(len + EntryBody::OVERHEAD * len.div_ceil(granule))
        .await
        .map_err(|_| PassError::Stopped)?;
    let guard = volume.lock_range(offset, len).await;
    let data = match volume.read_image(offset, len).await {
        Ok(d) => d,
        Err(e) => {
            drop(guard);
            shared.release(reserved);
            return Err(PassError::Read(e));
        }
    };
    let mut pieces: Vec<(u64, u64)> = Vec::new();
    for (k, bytes) in data.chunks(granule as usize).enumerate() {
        if !keep(k, bytes) {
            continue;
        }
        let start = k as u64 * granule;
        let n = bytes.len() as u64;
        match pieces.last_mut() {
            Some((s, l)) if *s + *l == start => *l += n,
            _ => pieces.push((start, n)),
        }
    }
    let mut sent = 0;
    let mut used = 0;
    for (start, n) in pieces {
        let body = volume.write_entry(
            offset + start,
            data.slice(start as usize..(start + n) as usize),
        );
        // At most one entry per part: the costs stay within the reservation.
        let cost = body.cost().min(reserved - used);
        used += cost;
        sent += n;
        shared.push_entry(body, cost);
    }
    drop(guard);
    // What was reserved but not needed (parts left out) goes back.
    shared.release(reserved - used);
    Ok(sent)
}

/// Delta sync of one volume or all. Each piece of a volume is read and hashed in coarse
/// blocks locally; the recovery VRA hashes the same piece of its newest image once and
/// answers which coarse blocks differ, with their fine hashes (one round trip a piece,
/// several pieces in flight); the fine blocks that differ are sent.
async fn delta_sync(
    shared: &Arc<ProtectedShared>,
    volumes: &[Arc<ProtectedVolume>],
    connector: &Connector,
    cancel: &CancellationToken,
    req: &DeltaRequest,
) -> Result<(), PassError> {
    let indexes: Vec<usize> = match &req.volumes {
        Some(v) => v.clone(),
        None => (0..volumes.len()).collect(),
    };
    let total: u64 = indexes
        .iter()
        .filter_map(|i| volumes.get(*i))
        .map(|v| v.size())
        .sum();
    let kind = if req.volumes.is_some() {
        SyncKind::VolumeDelta
    } else {
        SyncKind::Delta
    };
    shared.sync.lock().running = Some(Progress::new(kind, req.trigger, total));
    info!(vpg = %shared.assignment.vpg, ?kind, bytes = total, "sync started");
    let channel = tokio::select! {
        () = cancel.cancelled() => return Err(PassError::Stopped),
        c = connector.connect(&shared.assignment.recovery_vra) => c.map_err(|e| PassError::Hashes(e.to_string()))?,
    };
    let client = ReplicationClient::new(channel)
        .max_decoding_message_size(crate::sender::MAX_STREAM_MESSAGE);
    for volume in indexes.iter().filter_map(|i| volumes.get(*i)) {
        let size = volume.size();
        // Dropping the queue (on error) aborts the compares still in flight.
        let mut in_flight: VecDeque<AbortOnDropHandle<Result<Compared, PassError>>> =
            VecDeque::new();
        let mut offset = 0;
        loop {
            while in_flight.len() < COMPARES_IN_FLIGHT && offset < size {
                check_going(shared, cancel)?;
                let len = PIECE.min(size - offset);
                in_flight.push_back(tandem_runtime::scoped(compare_piece(
                    shared.clone(),
                    client.clone(),
                    volume.clone(),
                    offset,
                    len,
                )));
                offset += len;
            }
            let Some(next) = in_flight.pop_front() else {
                break;
            };
            let compared = next.await.map_err(|_| PassError::Stopped)??;
            check_going(shared, cancel)?;
            send_differences(shared, volume, &compared).await?;
            if let Some(p) = shared.sync.lock().running.as_mut() {
                p.done += compared.len;
                p.hash_bytes += compared.hash_bytes;
            }
        }
    }
    Ok(())
}

/// The recovery VRA's answer for one piece of a volume.
#[derive(Debug)]
struct Compared {
    offset: u64,
    len: u64,
    differing: Vec<u32>,
    fine_hashes: Vec<u8>,
    /// Hash bytes that crossed the wire both ways.
    hash_bytes: u64,
}

/// Reads and hashes one piece locally and has the recovery VRA compare it with its image.
async fn compare_piece(
    shared: Arc<ProtectedShared>,
    mut client: ReplicationClient<tonic::transport::Channel>,
    volume: Arc<ProtectedVolume>,
    offset: u64,
    len: u64,
) -> Result<Compared, PassError> {
    let path = volume.image_path().to_path_buf();
    let coarse_hashes = {
        let _permit = HASHING.acquire().await.map_err(|_| PassError::Stopped)?;
        tokio::task::spawn_blocking(move || hash_file(&path, offset, len))
            .await
            .map_err(|_| PassError::Stopped)?
            .map_err(PassError::Read)?
    };
    let sent = coarse_hashes.len() as u64;
    let r = client
        .compare_blocks(pb::CompareBlocksRequest {
            vpg_id: shared.assignment.vpg.to_string(),
            generation: shared.assignment.generation.0,
            vm_id: volume.vm().to_string(),
            volume_id: volume.volume().0,
            offset,
            length: len,
            coarse_block_size: COARSE as u32,
            fine_block_size: FINE as u32,
            coarse_hashes,
        })
        .await
        .map_err(|s| PassError::Hashes(s.message().to_string()))?
        .into_inner();
    // The answer must name blocks of this piece, in order, with all their fine hashes.
    if !compare_answer_fits(len, COARSE, FINE, &r.differing, r.fine_hashes.len()) {
        return Err(PassError::Hashes(format!(
            "malformed compare answer for {}+{len}: {} differing blocks, {} fine hash bytes",
            offset,
            r.differing.len(),
            r.fine_hashes.len()
        )));
    }
    Ok(Compared {
        offset,
        len,
        hash_bytes: sent + r.fine_hashes.len() as u64,
        differing: r.differing,
        fine_hashes: r.fine_hashes,
    })
}

/// The coarse hashes of `len` bytes of a file from `offset`, read in [`SCAN_CHUNK`]
/// pieces into one buffer, each hashed while it is still in the CPU's cache.
fn hash_file(path: &Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut out = Vec::with_capacity(len.div_ceil(COARSE) as usize * HASH_LEN);
    let mut buf = vec![0u8; SCAN_CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(SCAN_CHUNK) as usize;
        file.read_exact_at(&mut buf[..n], offset + done)?;
        hash_blocks(&buf[..n], COARSE as usize, &mut out);
        done += n as u64;
    }
    Ok(out)
}

/// Sends the fine blocks of the differing coarse blocks of one piece whose hashes differ
/// from the recovery VRA's, compared on the data read under the range lock.
async fn send_differences(
    shared: &ProtectedShared,
    volume: &ProtectedVolume,
    compared: &Compared,
) -> Result<(), PassError> {
    let mut theirs = compared.fine_hashes.as_slice();
    let mut sent = 0;
    for &k in &compared.differing {
        let block = compared.offset + u64::from(k) * COARSE;
        let blen = block_len(compared.len, COARSE, k);
        let (fine, rest) = theirs.split_at((blen.div_ceil(FINE) as usize) * HASH_LEN);
        theirs = rest;
        sent += send_parts(shared, volume, block, blen, FINE, |f, bytes| {
            fine_differs(fine, f, bytes)
        })
        .await?;
    }
    let seq = shared.positions().written.0;
    if let Some(p) = shared.sync.lock().running.as_mut() {
        p.sent += sent;
        if sent > 0 {
            // The delta sync ends once what differed is durable there too.
            p.last_pushed_seq = Some(seq);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(s: &SyncShared) -> Option<DeltaRequest> {
        s.lock().delta.clone()
    }

    #[test]
    fn delta_requests_add_up_and_a_whole_vpg_request_covers_the_rest() {
        let s = SyncShared::new(DirtyMap::default());
        s.request_delta(Some(vec![3, 1]), None);
        s.request_delta(Some(vec![1, 2]), Some(SyncTrigger::ForceSync));
        let d = due(&s).expect("due");
        assert_eq!(d.volumes, Some(vec![1, 2, 3]));
        assert_eq!(d.trigger, Some(SyncTrigger::ForceSync));
        // A later request without a trigger keeps the one due.
        s.request_delta(Some(vec![0]), None);
        assert_eq!(due(&s).unwrap().trigger, Some(SyncTrigger::ForceSync));
        s.request_delta(None, None);
        assert_eq!(due(&s).unwrap().volumes, None);
        s.request_delta(Some(vec![5]), None);
        assert_eq!(due(&s).unwrap().volumes, None, "the whole VPG stays due");
    }
}
