//! A verifying workload for write-order fidelity: writers over NBD against several
//! volumes, a log of every write's issue and acknowledgement, and a checker that proves an
//! image of those volumes (a checkpoint's point-in-time export, a replica disk, a copy)
//! equals the source at one consistent cut that a checkpoint's window allows.
//!
//! # Writers and blocks
//!
//! Every volume has a region of `region_blocks` 4 KiB blocks at its start, split among the
//! writers that write it by `block % n` (`n` writers), so every block has exactly one
//! writer ([`History::owner`]). With [`Spread::AcrossVolumes`] (the default) every writer
//! writes every volume, like an application with its log on one disk and its data on
//! another: a write to one volume then often depends on a write to another, which is
//! what tests the ordering across volumes, VMs and VRAs. With [`Spread::OneVolume`]
//! writer `k` writes only volume `k % volumes`. A writer keeps one write in flight at a
//! time (queue depth 1), to one of its blocks chosen by an RNG seeded from the run's seed,
//! and numbers its writes 1, 2, 3, ...
//! Each write is one whole block and describes itself ([`encode_block`]): a magic, the run's
//! seed, the volume, the writer, the sequence number, the block, a checksum, and a payload
//! derived from (seed, writer, seq). From a block alone the checker can tell which write
//! it holds and regenerate its exact bytes. Bytes outside the regions must stay zero.
//!
//! # Happened before
//!
//! Every issue and every acknowledgement is an event in one log, numbered by one counter
//! under a lock. A write's issue is logged before its request is sent and its
//! acknowledgement after its reply arrived, so the log order agrees with real time: when
//! `u`'s acknowledgement precedes `w`'s issue in the log, `u` was acknowledged before `w`
//! was sent, and an application could have waited for `u` before issuing `w`. That is the
//! relation the checker enforces: `w` depends on every write acknowledged before `w` was
//! issued, of any writer on any volume (the writer's own earlier writes included). The
//! dependency vector of `w`, for every writer how many of its writes had been
//! acknowledged, is read off the log ([`History::deps`]); with queue depth 1 the
//! acknowledged writes of a writer are always a prefix of its writes, so the vector is exact.
//!
//! # Marks and windows
//!
//! [`Workload::mark`] returns the log position: every event at or before the mark was
//! logged before the call returned, every later one after the call began. A checkpoint is
//! bracketed by a [`CutWindow`]: `acked_before`, a mark taken before `Freeze` is sent, and
//! `issued_after`, a mark taken after `Thaw` returned. Its image must hold every write
//! acknowledged at or before `acked_before`, no write issued after `issued_after`, and, of
//! the writes in between, a set closed under happened-before.
//!
//! # Windows from timestamps
//!
//! A checkpoint the managers take is known by its timestamp alone, stamped while every VRA
//! of the VPG is frozen. The log indexes itself by wall-clock milliseconds (every process
//! of a lab reads the same clock), so [`Workload::window_at`] turns a timestamp into a
//! window: `acked_before` covers the events logged before its millisecond began,
//! `issued_after` those logged before the next one began. A write acknowledged earlier was
//! acknowledged before the freeze; a write issued later was sent after it.
//!
//! # The check
//!
//! [`check_image`] reads every block of every volume. A block must be zero (never
//! written) or a well-formed write of this run by the block's writer, byte for byte. Then,
//! with `cut[j]` the newest write of writer `j` the image shows:
//!
//! 1. no visible write was issued after `issued_after`;
//! 2. every write acknowledged at or before `acked_before` is included: its block holds it
//!    or a newer write;
//! 3. the image is closed under happened-before: within a writer, every block holds the
//!    writer's newest write to it up to `cut[j]` (its earlier writes are dependencies of
//!    `cut[j]`); across writers, every write acknowledged before the latest-issued visible
//!    write was issued is included. Dependency vectors grow with issue order, so the visible
//!    write issued last carries every dependency of every included write.
//!
//! When all hold, the image is exactly the source after the writes `1..=cut[j]` of every
//! writer `j`, a state the source went through; the checker regenerates that image from
//! the history alone and compares its BLAKE3 hash with that of the bytes read.

use std::{
    fmt,
    hash::BuildHasher,
    io,
    os::unix::fs::FileExt,
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use tandem_nbd::{BlockDevice, IoFuture, NbdClient, NbdError};
use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Size of a workload block, and of every write.
pub const BLOCK_SIZE: u64 = 4096;
/// Environment variable that fixes the seed of [`seed_from_env`] (decimal or `0x` hex).
pub const SEED_ENV: &str = "TANDEM_WORKLOAD_SEED";

const BLOCK_LEN: usize = BLOCK_SIZE as usize;
const MAGIC: [u8; 8] = *b"TNDMWKL1";
const CHECKSUM_AT: usize = 40;
const CHECKSUM_LEN: usize = 16;
const PAYLOAD_AT: usize = CHECKSUM_AT + CHECKSUM_LEN;
const PAYLOAD_CONTEXT: &str = "tandem-lab workload payload v1";
/// The checker reads images this many bytes at a time (less if the reader says so).
const READ_CHUNK: u64 = 1024 * 1024;
/// How long a stopping writer waits for its NBD connection to close.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);
static ZERO_BLOCK: [u8; BLOCK_LEN] = [0; BLOCK_LEN];

/// A position in a workload's event log (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mark(u64);

impl Mark {
    /// The position before any event.
    pub const ORIGIN: Mark = Mark(0);

    /// The number of events logged at or before this mark.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.0)
    }
}

/// A writer of a workload, numbered from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriterId(pub u32);

impl WriterId {
    fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for WriterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// One write: its writer and its sequence number (from 1) among that writer's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteId {
    /// The writer that issued it.
    pub writer: WriterId,
    /// Its place among the writer's writes, from 1.
    pub seq: u64,
}

impl WriteId {
    /// Write `seq` of `writer`.
    pub fn new(writer: WriterId, seq: u64) -> Self {
        Self { writer, seq }
    }
}

impl fmt::Display for WriteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.writer, self.seq)
    }
}

/// What a block of an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Zeroes: no write of the workload.
    Zero,
    /// That write.
    Write(WriteId),
}

impl fmt::Display for BlockState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Zero => f.write_str("zeroes"),
            Self::Write(id) => write!(f, "{id}"),
        }
    }
}

/// The window around a checkpoint: the image must hold every write acknowledged at or
/// before `acked_before` and no write issued after `issued_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutWindow {
    /// A mark taken before `Freeze` was sent.
    pub acked_before: Mark,
    /// A mark taken after `Thaw` returned.
    pub issued_after: Mark,
}

impl CutWindow {
    /// The window between two marks.
    pub fn new(acked_before: Mark, issued_after: Mark) -> Self {
        Self {
            acked_before,
            issued_after,
        }
    }

    /// A window of one mark: every write acknowledged by then, no write issued after.
    pub fn exact(mark: Mark) -> Self {
        Self::new(mark, mark)
    }
}

/// Where the workload finds one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeTarget {
    /// Address of the NBD server (`host:port`).
    pub addr: String,
    /// Export name.
    pub export: String,
}

impl VolumeTarget {
    /// Export `export` of the server at `addr`.
    pub fn new(addr: impl ToString, export: impl Into<String>) -> Self {
        Self {
            addr: addr.to_string(),
            export: export.into(),
        }
    }
}

/// Which volumes a writer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// Every writer writes every volume (one NBD connection to each).
    AcrossVolumes,
    /// Writer `k` writes only volume `k % volumes`.
    OneVolume,
}

/// What to run. Every target must be a distinct volume: two targets naming the same
/// volume make the writers overwrite each other and the checks fail.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// The volumes, in the order images are later given to the checker.
    pub volumes: Vec<VolumeTarget>,
    /// Writers (at least 1).
    pub writers: u32,
    /// Which volumes a writer writes.
    pub spread: Spread,
    /// Blocks written at the start of every volume; `None` for the whole volume.
    pub region_blocks: Option<u64>,
    /// Seed of the block choices and payloads.
    pub seed: u64,
    /// Pause of a writer between two writes (zero: back to back).
    pub pace: Duration,
    /// Whether writes carry FUA.
    pub fua: bool,
}

impl WorkloadConfig {
    /// Two writers per volume, each writing every volume, over the whole of every volume,
    /// back to back, with the seed of [`seed_from_env`].
    pub fn new(volumes: Vec<VolumeTarget>) -> Self {
        let writers = u32::try_from(volumes.len())
            .unwrap_or(u32::MAX / 2)
            .saturating_mul(2);
        Self {
            volumes,
            writers,
            spread: Spread::AcrossVolumes,
            region_blocks: None,
            seed: seed_from_env(),
            pace: Duration::ZERO,
            fua: false,
        }
    }
}

/// The seed in [`SEED_ENV`] if it is set and parses, else a random one.
pub fn seed_from_env() -> u64 {
    if let Ok(text) = std::env::var(SEED_ENV) {
        let text = text.trim();
        let parsed = match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => text.parse(),
        };
        match parsed {
            Ok(seed) => return seed,
            Err(err) => warn!(value = %text, error = %err, "ignoring unparsable workload seed"),
        }
    }
    std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
}

/// Why a workload could not start or reach a goal.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The configuration cannot run.
    #[error("invalid workload config: {0}")]
    Config(&'static str),
    /// A writer could not connect to its volume.
    #[error("volume {volume}: connect to export {export:?} at {addr}: {source}")]
    Connect {
        volume: u32,
        addr: String,
        export: String,
        #[source]
        source: NbdError,
    },
    /// The export refuses writes.
    #[error("volume {volume}: export {export:?} is read-only")]
    ReadOnly { volume: u32, export: String },
    /// The region does not fit the volume, or has fewer blocks than the volume has writers.
    #[error(
        "volume {volume}: a region of {region_blocks} blocks for {writers} writers does not fit {size} bytes"
    )]
    Region {
        volume: u32,
        size: u64,
        region_blocks: u64,
        writers: u32,
    },
    /// Every writer stopped (after a failed write) before the goal was reached.
    #[error(
        "every writer stopped after {acked} acknowledged writes; first failure: {first_failure}"
    )]
    Stopped { acked: u64, first_failure: String },
}

/// The size and written region of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeLayout {
    /// Size in bytes.
    pub size: u64,
    /// Blocks the workload writes, from block 0.
    pub region_blocks: u64,
}

/// Who writes which blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    writers: u32,
    spread: Spread,
    volumes: Vec<VolumeLayout>,
}

impl Layout {
    fn volume_count(&self) -> u32 {
        self.volumes.len() as u32
    }

    /// How many writers write `volume`.
    fn writers_of(&self, volume: u32) -> u32 {
        match self.spread {
            Spread::AcrossVolumes => self.writers,
            Spread::OneVolume => self
                .writers
                .saturating_sub(volume)
                .div_ceil(self.volume_count()),
        }
    }

    /// The writer of `block` of `volume`, if the block is in the volume's region.
    fn owner(&self, volume: u32, block: u64) -> Option<WriterId> {
        let layout = self.volumes.get(volume as usize)?;
        let writers = self.writers_of(volume);
        if block >= layout.region_blocks || writers == 0 {
            return None;
        }
        let index = (block % u64::from(writers)) as u32;
        Some(WriterId(match self.spread {
            Spread::AcrossVolumes => index,
            Spread::OneVolume => volume + index * self.volume_count(),
        }))
    }

    /// The blocks of `writer`: per volume it writes, (volume, first block, stride).
    fn blocks_of(&self, writer: WriterId) -> Vec<(u32, u64, u64)> {
        match self.spread {
            Spread::AcrossVolumes => (0..self.volume_count())
                .map(|volume| (volume, u64::from(writer.0), u64::from(self.writers)))
                .collect(),
            Spread::OneVolume => {
                let volume = writer.0 % self.volume_count();
                let first = u64::from(writer.0 / self.volume_count());
                vec![(volume, first, u64::from(self.writers_of(volume)))]
            }
        }
    }
}

/// The log entry of one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRecord {
    /// Volume written.
    pub volume: u32,
    /// Block written.
    pub block: u64,
    /// When it was issued (logged just before the request was sent).
    pub issued_at: Mark,
    /// When its acknowledgement was logged; `None` while in flight, or if it failed.
    pub acked_at: Option<Mark>,
}

/// A write that failed; its writer issued nothing after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterFailure {
    /// The failed write (it may or may not have reached the volume).
    pub write: WriteId,
    /// The error.
    pub error: String,
}

/// A write visible in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisibleWrite {
    /// The write.
    pub id: WriteId,
    /// Its volume.
    pub volume: u32,
    /// Its block.
    pub block: u64,
}

/// Encodes the block that write `seq` of `writer` puts at `block` of `volume` in the run
/// of `seed`. Layout (little-endian): magic `TNDMWKL1` at 0, seed at 8, volume at 16,
/// writer at 20, seq at 24, block at 32; at 40 the first 16 bytes of the BLAKE3 of bytes
/// `0..40` and `56..4096`; at 56 a payload, the BLAKE3 XOF of (seed, writer, seq).
pub fn encode_block(seed: u64, volume: u32, writer: WriterId, seq: u64, block: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK_LEN];
    buf[0..8].copy_from_slice(&MAGIC);
    buf[8..16].copy_from_slice(&seed.to_le_bytes());
    buf[16..20].copy_from_slice(&volume.to_le_bytes());
    buf[20..24].copy_from_slice(&writer.0.to_le_bytes());
    buf[24..32].copy_from_slice(&seq.to_le_bytes());
    buf[32..40].copy_from_slice(&block.to_le_bytes());
    let mut payload = blake3::Hasher::new_derive_key(PAYLOAD_CONTEXT);
    payload.update(&seed.to_le_bytes());
    payload.update(&writer.0.to_le_bytes());
    payload.update(&seq.to_le_bytes());
    payload.finalize_xof().fill(&mut buf[PAYLOAD_AT..]);
    let sum = checksum(&buf);
    buf[CHECKSUM_AT..PAYLOAD_AT].copy_from_slice(&sum);
    buf
}

fn checksum(block: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&block[..CHECKSUM_AT]);
    hasher.update(&block[PAYLOAD_AT..]);
    let mut sum = [0; CHECKSUM_LEN];
    sum.copy_from_slice(&hasher.finalize().as_bytes()[..CHECKSUM_LEN]);
    sum
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut raw = [0; 4];
    raw.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(raw)
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut raw = [0; 8];
    raw.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(raw)
}

/// Decodes block `block` of `volume`: `None` for zeroes, else the write it holds, checked
/// byte for byte against [`encode_block`].
fn decode_block(
    seed: u64,
    volume: u32,
    block: u64,
    data: &[u8],
) -> Result<Option<WriteId>, Corruption> {
    if data.iter().all(|&byte| byte == 0) {
        return Ok(None);
    }
    if data[..8] != MAGIC {
        let mut found = [0; 8];
        found.copy_from_slice(&data[..8]);
        return Err(Corruption::BadMagic { found });
    }
    if checksum(data)[..] != data[CHECKSUM_AT..PAYLOAD_AT] {
        return Err(Corruption::Checksum);
    }
    let header_seed = le_u64(&data[8..]);
    if header_seed != seed {
        return Err(Corruption::ForeignRun { seed: header_seed });
    }
    let (header_volume, header_block) = (le_u32(&data[16..]), le_u64(&data[32..]));
    if header_volume != volume || header_block != block {
        return Err(Corruption::Misplaced {
            volume: header_volume,
            block: header_block,
        });
    }
    let id = WriteId::new(WriterId(le_u32(&data[20..])), le_u64(&data[24..]));
    if id.seq == 0 {
        return Err(Corruption::ZeroSeq);
    }
    let expected = encode_block(seed, volume, id.writer, id.seq, block);
    if let Some(offset) = expected.iter().zip(data).position(|(a, b)| a != b) {
        return Err(Corruption::Payload { write: id, offset });
    }
    Ok(Some(id))
}

/// SplitMix64: a small, seedable, stable generator (the block choices of a seed must not
/// change with a dependency's version).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    fn for_writer(seed: u64, writer: WriterId) -> Self {
        Self(seed ^ (u64::from(writer.0) + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with the next bytes of the sequence.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    acked: u64,
    live: usize,
}

#[derive(Debug, Default)]
struct Log {
    clock: u64,
    writes: Vec<Vec<WriteRecord>>,
    failures: Vec<WriterFailure>,
    /// Wall-clock index of the log: `(ms, clock)` for the first event logged in each
    /// millisecond `ms` (since the Unix epoch), with `clock` the position before it; so
    /// every event at or before `clock` was logged before `ms` began.
    ticks: Vec<(u64, u64)>,
}

impl Log {
    /// Advances the clock for one event, indexing it by wall-clock time.
    fn next_event(&mut self) -> u64 {
        let now = unix_ms();
        if self.ticks.last().is_none_or(|&(ms, _)| now > ms) {
            self.ticks.push((now, self.clock));
        }
        self.clock += 1;
        self.clock
    }

    /// The window of a cut taken by someone else at wall-clock time `at_ms`, a moment
    /// known to lie in `[at_ms, at_ms + 1)` ms (a checkpoint's timestamp, stamped while
    /// every VRA of its VPG was frozen): every write acknowledged before `at_ms` began
    /// must be in it, none issued after `at_ms + 1`. `None` until the log has passed that
    /// moment.
    fn window_at(&self, at_ms: u64) -> Option<CutWindow> {
        // The first events logged at or after `at_ms` / after `at_ms + 1` began.
        let at = self.ticks.partition_point(|&(ms, _)| ms < at_ms);
        let after = self.ticks.partition_point(|&(ms, _)| ms <= at_ms);
        let acked_before = self
            .ticks
            .get(at)
            .map_or(Mark(self.clock), |&(_, clock)| Mark(clock));
        let issued_after = match self.ticks.get(after) {
            Some(&(ms, clock)) if ms > at_ms => Mark(clock),
            // Nothing logged since: the current position, once the moment is past.
            _ if unix_ms() > at_ms + 1 => Mark(self.clock),
            _ => return None,
        };
        Some(CutWindow::new(acked_before, issued_after))
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug)]
struct Shared {
    seed: u64,
    layout: Layout,
    log: Mutex<Log>,
    progress: watch::Sender<Progress>,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn issue(&self, writer: WriterId, volume: u32, block: u64) -> u64 {
        let mut guard = self.log();
        let log = &mut *guard;
        let issued_at = Mark(log.next_event());
        let writes = &mut log.writes[writer.index()];
        writes.push(WriteRecord {
            volume,
            block,
            issued_at,
            acked_at: None,
        });
        writes.len() as u64
    }

    fn ack(&self, id: WriteId) {
        {
            let mut guard = self.log();
            let log = &mut *guard;
            let acked_at = Mark(log.next_event());
            log.writes[id.writer.index()][(id.seq - 1) as usize].acked_at = Some(acked_at);
        }
        self.progress.send_modify(|progress| progress.acked += 1);
    }

    fn fail(&self, id: WriteId, error: &NbdError) {
        self.log().failures.push(WriterFailure {
            write: id,
            error: error.to_string(),
        });
    }

    fn history(&self) -> History {
        let log = self.log();
        History::new(
            self.seed,
            self.layout.clone(),
            log.writes.clone(),
            log.failures.clone(),
            Mark(log.clock),
        )
    }
}

/// Counts a writer out of [`Progress::live`] however its task ends.
struct LiveGuard<'a>(&'a Shared);

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0
            .progress
            .send_modify(|progress| progress.live = progress.live.saturating_sub(1));
    }
}

/// A writer's share of one volume: blocks `first_block + i * stride`, `i < owned`.
struct WriterVolume {
    volume: u32,
    first_block: u64,
    stride: u64,
    owned: u64,
    client: NbdClient,
}

struct Writer {
    id: WriterId,
    volumes: Vec<WriterVolume>,
    pace: Duration,
    fua: bool,
}

async fn run_writer(shared: Arc<Shared>, writer: Writer, cancel: CancellationToken) {
    let _live = LiveGuard(&shared);
    let Writer {
        id,
        volumes,
        pace,
        fua,
    } = writer;
    let total: u64 = volumes.iter().map(|share| share.owned).sum();
    let mut rng = SplitMix64::for_writer(shared.seed, id);
    let mut seq = 0;
    while !cancel.is_cancelled() && total > 0 {
        seq += 1;
        let mut pick = rng.next_u64() % total;
        let Some(share) = volumes.iter().find(|share| {
            let here = pick < share.owned;
            if !here {
                pick -= share.owned;
            }
            here
        }) else {
            break;
        };
        let (volume, block) = (share.volume, share.first_block + share.stride * pick);
        let data = Bytes::from(encode_block(shared.seed, volume, id, seq, block));
        let logged = shared.issue(id, volume, block);
        debug_assert_eq!(logged, seq, "only the writer appends to its log");
        let write = WriteId::new(id, seq);
        // Not raced against the token: a stopping writer finishes its in-flight write, so
        // its outcome is known.
        if let Err(err) = share.client.write(block * BLOCK_SIZE, data, fua).await {
            warn!(writer = id.0, volume, seq, error = %err, "workload write failed; writer stops");
            shared.fail(write, &err);
            break;
        }
        shared.ack(write);
        if !pace.is_zero() {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(pace) => {}
            }
        }
    }
    for share in volumes {
        disconnect(share.client).await;
    }
}

async fn disconnect(client: NbdClient) {
    match tokio::time::timeout(DISCONNECT_GRACE, client.disconnect()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => debug!(error = %err, "workload disconnect failed"),
        Err(_) => debug!("workload disconnect timed out"),
    }
}

async fn connect(volume: u32, target: &VolumeTarget) -> Result<NbdClient, WorkloadError> {
    let client = NbdClient::connect_to(&target.addr, &target.export)
        .await
        .map_err(|source| WorkloadError::Connect {
            volume,
            addr: target.addr.clone(),
            export: target.export.clone(),
            source,
        })?;
    if client.info().read_only() {
        return Err(WorkloadError::ReadOnly {
            volume,
            export: target.export.clone(),
        });
    }
    Ok(client)
}

/// A running verifying workload. Dropping it aborts the writers; [`Workload::stop`] ends
/// them cleanly and returns the history.
#[derive(Debug)]
pub struct Workload {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl Workload {
    /// Connects every writer to the volumes it writes, then starts them all.
    pub async fn start(config: WorkloadConfig) -> Result<Self, WorkloadError> {
        let volume_count = u32::try_from(config.volumes.len())
            .map_err(|_| WorkloadError::Config("too many volumes"))?;
        if volume_count == 0 {
            return Err(WorkloadError::Config("no volumes"));
        }
        if config.writers == 0 {
            return Err(WorkloadError::Config("no writers"));
        }
        let mut layout = Layout {
            writers: config.writers,
            spread: config.spread,
            volumes: vec![
                VolumeLayout {
                    size: 0,
                    region_blocks: 0,
                };
                config.volumes.len()
            ],
        };
        for (volume, target) in (0u32..).zip(&config.volumes) {
            let probe = connect(volume, target).await?;
            let size = probe.size();
            disconnect(probe).await;
            let region_blocks = config.region_blocks.unwrap_or(size / BLOCK_SIZE);
            let fits = region_blocks
                .checked_mul(BLOCK_SIZE)
                .is_some_and(|bytes| bytes <= size);
            let writers = layout.writers_of(volume);
            if !fits || region_blocks < u64::from(writers) {
                return Err(WorkloadError::Region {
                    volume,
                    size,
                    region_blocks,
                    writers,
                });
            }
            layout.volumes[volume as usize] = VolumeLayout {
                size,
                region_blocks,
            };
        }
        let mut writers = Vec::with_capacity(config.writers as usize);
        for id in (0..config.writers).map(WriterId) {
            let mut volumes = Vec::new();
            for (volume, first_block, stride) in layout.blocks_of(id) {
                let region_blocks = layout.volumes[volume as usize].region_blocks;
                volumes.push(WriterVolume {
                    volume,
                    first_block,
                    stride,
                    owned: (region_blocks - first_block).div_ceil(stride),
                    client: connect(volume, &config.volumes[volume as usize]).await?,
                });
            }
            writers.push(Writer {
                id,
                volumes,
                pace: config.pace,
                fua: config.fua,
            });
        }
        let (progress, _) = watch::channel(Progress {
            acked: 0,
            live: writers.len(),
        });
        let shared = Arc::new(Shared {
            seed: config.seed,
            layout,
            log: Mutex::new(Log {
                clock: 0,
                writes: vec![Vec::new(); writers.len()],
                failures: Vec::new(),
                ticks: Vec::new(),
            }),
            progress,
        });
        info!(
            seed = config.seed,
            volumes = config.volumes.len(),
            writers = writers.len(),
            spread = ?config.spread,
            "workload started"
        );
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for writer in writers {
            tasks.spawn(run_writer(Arc::clone(&shared), writer, cancel.clone()));
        }
        Ok(Self {
            shared,
            cancel,
            tasks,
        })
    }

    /// The seed of this run (log it: it reproduces block choices and payloads).
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// The current position in the event log.
    pub fn mark(&self) -> Mark {
        Mark(self.shared.log().clock)
    }

    /// The window of a checkpoint someone else took, known by its timestamp (see "Windows
    /// from timestamps" in the module docs); `None` while that moment is not past.
    pub fn window_at(&self, at_ms: u64) -> Option<CutWindow> {
        self.shared.log().window_at(at_ms)
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.shared.progress.borrow().acked
    }

    /// Waits until at least `total` writes have been acknowledged since the start; fails
    /// if every writer stopped first. Returns the count reached.
    pub async fn wait_acked(&self, total: u64) -> Result<u64, WorkloadError> {
        let mut progress = self.shared.progress.subscribe();
        let reached = progress
            .wait_for(|progress| progress.acked >= total || progress.live == 0)
            .await
            .map(|progress| *progress)
            .unwrap_or_default();
        if reached.acked >= total {
            return Ok(reached.acked);
        }
        let first_failure = self
            .shared
            .log()
            .failures
            .first()
            .map_or_else(|| "none".to_owned(), |failure| failure.error.clone());
        Err(WorkloadError::Stopped {
            acked: reached.acked,
            first_failure,
        })
    }

    /// A copy of the history so far, to check images while the workload keeps running.
    /// Take it after the windows to check are closed: a write issued later is unknown to it.
    pub fn history(&self) -> History {
        self.shared.history()
    }

    /// Stops the writers (each finishes its in-flight write, so every write that did not
    /// fail is acknowledged) and returns the history. A writer held up (a frozen volume
    /// that never thaws) holds up this call.
    pub async fn stop(mut self) -> History {
        self.cancel.cancel();
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(err) = joined
                && err.is_panic()
            {
                std::panic::resume_unwind(err.into_panic());
            }
        }
        let history = self.shared.history();
        info!(
            seed = history.seed,
            writes = history.total_writes(),
            failures = history.failures.len(),
            "workload stopped"
        );
        history
    }
}

/// The log of a run: layout, every write of every writer, and failures.
#[derive(Debug, Clone)]
pub struct History {
    seed: u64,
    layout: Layout,
    writes: Vec<Vec<WriteRecord>>,
    failures: Vec<WriterFailure>,
    end: Mark,
    /// Per writer, (volume, block, seq) of every write, sorted.
    by_block: Vec<Vec<(u32, u64, u64)>>,
}

impl History {
    fn new(
        seed: u64,
        layout: Layout,
        writes: Vec<Vec<WriteRecord>>,
        failures: Vec<WriterFailure>,
        end: Mark,
    ) -> Self {
        let by_block = writes
            .iter()
            .map(|records| {
                let mut triples: Vec<(u32, u64, u64)> = (1u64..)
                    .zip(records)
                    .map(|(seq, record)| (record.volume, record.block, seq))
                    .collect();
                triples.sort_unstable();
                triples
            })
            .collect();
        Self {
            seed,
            layout,
            writes,
            failures,
            end,
            by_block,
        }
    }

    /// The run's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The last event of the history.
    pub fn end(&self) -> Mark {
        self.end
    }

    /// The volumes, in the order of the run's targets.
    pub fn volumes(&self) -> &[VolumeLayout] {
        &self.layout.volumes
    }

    /// Which volumes a writer writes.
    pub fn spread(&self) -> Spread {
        self.layout.spread
    }

    /// Number of writers.
    pub fn writer_count(&self) -> usize {
        self.writes.len()
    }

    /// The writer that owns `block` of `volume`, if the block is in the volume's region.
    pub fn owner(&self, volume: u32, block: u64) -> Option<WriterId> {
        self.layout.owner(volume, block)
    }

    /// Every write of `writer`, in order (entry `i` is write `i + 1`).
    pub fn writes(&self, writer: WriterId) -> &[WriteRecord] {
        self.writes.get(writer.index()).map_or(&[], Vec::as_slice)
    }

    /// One write.
    pub fn write(&self, id: WriteId) -> Option<&WriteRecord> {
        let index = usize::try_from(id.seq.checked_sub(1)?).ok()?;
        self.writes(id.writer).get(index)
    }

    /// Writes that failed; each was the last of its writer.
    pub fn failures(&self) -> &[WriterFailure] {
        &self.failures
    }

    /// Writes issued.
    pub fn total_writes(&self) -> u64 {
        self.writes.iter().map(|writes| writes.len() as u64).sum()
    }

    /// Writes acknowledged.
    pub fn acked_writes(&self) -> u64 {
        self.writes
            .iter()
            .flatten()
            .filter(|record| record.acked_at.is_some())
            .count() as u64
    }

    /// The bytes `id` wrote to its block.
    pub fn write_bytes(&self, id: WriteId) -> Option<Vec<u8>> {
        let record = self.write(id)?;
        Some(encode_block(
            self.seed,
            record.volume,
            id.writer,
            id.seq,
            record.block,
        ))
    }

    /// The dependency vector of `id`: for every writer, how many of its writes (a prefix)
    /// were acknowledged before `id` was issued.
    pub fn deps(&self, id: WriteId) -> Option<Vec<u64>> {
        let issued_at = self.write(id)?.issued_at;
        Some(
            self.writes
                .iter()
                .map(|writes| {
                    writes.partition_point(|w| w.acked_at.is_some_and(|at| at < issued_at)) as u64
                })
                .collect(),
        )
    }

    /// Per writer, how many of its writes were acknowledged at or before `mark` (a prefix:
    /// writes are acknowledged in order).
    pub fn acked_by(&self, mark: Mark) -> Vec<u64> {
        self.writes
            .iter()
            .map(|writes| {
                writes.partition_point(|w| w.acked_at.is_some_and(|at| at <= mark)) as u64
            })
            .collect()
    }

    /// Per writer, how many of its writes were issued at or before `mark`.
    pub fn issued_by(&self, mark: Mark) -> Vec<u64> {
        self.writes
            .iter()
            .map(|writes| writes.partition_point(|w| w.issued_at <= mark) as u64)
            .collect()
    }

    /// Per writer, every write issued: the cut of the whole history.
    pub fn latest(&self) -> Vec<u64> {
        self.writes
            .iter()
            .map(|writes| writes.len() as u64)
            .collect()
    }

    /// The newest write of `writer` to `block` of `volume` among its writes `1..=at_most`
    /// (0: none).
    fn newest_write_to(&self, writer: WriterId, volume: u32, block: u64, at_most: u64) -> u64 {
        let triples = &self.by_block[writer.index()];
        let place = (volume, block);
        let start = triples.partition_point(|&(v, b, _)| (v, b) < place);
        let end = triples
            .partition_point(|&(v, b, seq)| (v, b) < place || ((v, b) == place && seq <= at_most));
        if end > start { triples[end - 1].2 } else { 0 }
    }

    /// The write `block` of `volume` holds in the image of `cut`.
    fn newest_at(&self, volume: u32, block: u64, cut: &[u64]) -> Option<WriteId> {
        let writer = self.owner(volume, block)?;
        let seq = self.newest_write_to(writer, volume, block, cut[writer.index()]);
        (seq > 0).then(|| WriteId::new(writer, seq))
    }

    fn check_cut(&self, cut: &[u64]) {
        assert_eq!(
            cut.len(),
            self.writer_count(),
            "a cut has one entry per writer"
        );
    }

    /// The writes visible in the image of `cut` (writes `1..=cut[j]` of every writer `j`).
    ///
    /// # Panics
    /// If `cut` does not have one entry per writer.
    pub fn visible_writes(&self, cut: &[u64]) -> Vec<VisibleWrite> {
        self.check_cut(cut);
        let mut visible = Vec::new();
        for (volume, layout) in (0u32..).zip(&self.layout.volumes) {
            for block in 0..layout.region_blocks {
                if let Some(id) = self.newest_at(volume, block, cut) {
                    visible.push(VisibleWrite { id, volume, block });
                }
            }
        }
        visible
    }

    /// The images of every volume after writes `1..=cut[j]` of every writer `j`, in memory
    /// (for tests and small volumes).
    ///
    /// # Panics
    /// If `cut` does not have one entry per writer.
    pub fn images_at(&self, cut: &[u64]) -> Vec<Vec<u8>> {
        self.check_cut(cut);
        let mut images: Vec<Vec<u8>> = self
            .layout
            .volumes
            .iter()
            .map(|layout| vec![0; layout.size as usize])
            .collect();
        for write in self.visible_writes(cut) {
            let start = (write.block * BLOCK_SIZE) as usize;
            let bytes = encode_block(
                self.seed,
                write.volume,
                write.id.writer,
                write.id.seq,
                write.block,
            );
            images[write.volume as usize][start..start + BLOCK_LEN].copy_from_slice(&bytes);
        }
        images
    }

    /// BLAKE3 of the image of `volume` at `cut`, generated block by block.
    fn expected_hash(&self, volume: u32, cut: &[u64]) -> blake3::Hash {
        let layout = self.layout.volumes[volume as usize];
        let mut hasher = blake3::Hasher::new();
        for block in 0..layout.region_blocks {
            match self.newest_at(volume, block, cut) {
                Some(id) => {
                    hasher.update(&encode_block(self.seed, volume, id.writer, id.seq, block));
                }
                None => {
                    hasher.update(&ZERO_BLOCK);
                }
            }
        }
        let mut rest = layout.size - layout.region_blocks * BLOCK_SIZE;
        while rest > 0 {
            let len = rest.min(BLOCK_SIZE);
            hasher.update(&ZERO_BLOCK[..len as usize]);
            rest -= len;
        }
        hasher.finalize()
    }
}

/// Read access to one volume's image, for the checker.
pub trait ImageReader: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Largest read the checker may ask for.
    fn max_read(&self) -> u32 {
        READ_CHUNK as u32
    }

    /// Reads `len` bytes at `offset` (within the image).
    fn read_at(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes>;
}

impl<T: ImageReader + ?Sized> ImageReader for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn max_read(&self) -> u32 {
        (**self).max_read()
    }

    fn read_at(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        (**self).read_at(offset, len)
    }
}

impl ImageReader for NbdClient {
    fn size(&self) -> u64 {
        NbdClient::size(self)
    }

    fn max_read(&self) -> u32 {
        self.info().max_block
    }

    fn read_at(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        Box::pin(async move { self.read(offset, len).await.map_err(io::Error::other) })
    }
}

fn slice_at(data: &[u8], offset: u64, len: u32) -> io::Result<Bytes> {
    usize::try_from(offset)
        .ok()
        .and_then(|start| Some(start..start.checked_add(len as usize)?))
        .and_then(|range| data.get(range))
        .map(Bytes::copy_from_slice)
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read beyond the image"))
}

impl ImageReader for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        Box::pin(std::future::ready(slice_at(self, offset, len)))
    }
}

impl ImageReader for Bytes {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        Box::pin(std::future::ready(slice_at(self, offset, len)))
    }
}

/// An image behind an in-process block device (an export of an [`tandem_nbd::Exports`]).
#[derive(Debug, Clone)]
pub struct DeviceImage(pub Arc<dyn BlockDevice>);

impl ImageReader for DeviceImage {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        self.0.read(offset, len)
    }
}

/// A raw image file, read with `pread` on the blocking pool.
#[derive(Debug, Clone)]
pub struct FileImage {
    file: Arc<std::fs::File>,
    size: u64,
}

impl FileImage {
    /// Opens `path` for reading; its size is taken now.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            file: Arc::new(file),
            size,
        })
    }
}

impl ImageReader for FileImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        let file = Arc::clone(&self.file);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0; len as usize];
                file.read_exact_at(&mut buf, offset)?;
                Ok(Bytes::from(buf))
            })
            .await
            .map_err(io::Error::other)?
        })
    }
}

/// How a block fails to be a write of this run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// Non-zero bytes without the workload's magic.
    #[error("not zero and no workload header (starts {found:02x?})")]
    BadMagic { found: [u8; 8] },
    /// The checksum does not match: a torn or corrupted block.
    #[error("checksum mismatch: torn or corrupted block")]
    Checksum,
    /// A well-formed block of another run.
    #[error("written by another run (seed {seed:#018x})")]
    ForeignRun { seed: u64 },
    /// A well-formed block that belongs elsewhere.
    #[error("holds the block of volume {volume} block {block}")]
    Misplaced { volume: u32, block: u64 },
    /// A header with sequence number 0.
    #[error("header names sequence 0")]
    ZeroSeq,
    /// A write by a writer that does not own the block.
    #[error("holds {write}, but the block belongs to {owner}")]
    WrongWriter { write: WriteId, owner: WriterId },
    /// The bytes differ from the write's generator although the checksum matches.
    #[error("bytes of {write} differ from its generator at byte {offset}")]
    Payload { write: WriteId, offset: usize },
    /// A write the history logged to another block.
    #[error("holds {write}, which the history logged to volume {volume} block {block}")]
    NotAsLogged {
        write: WriteId,
        volume: u32,
        block: u64,
    },
}

/// The first way an image fails the check.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The window closes before it opens.
    #[error("acked_before {acked_before} is after issued_after {issued_after}")]
    InvalidWindow {
        acked_before: Mark,
        issued_after: Mark,
    },
    /// Not one image per volume.
    #[error("{got} images for {expected} volumes")]
    VolumeCount { expected: usize, got: usize },
    /// An image's size differs from its source volume's.
    #[error("volume {volume}: image of {actual} bytes, source of {expected}")]
    SizeMismatch {
        volume: u32,
        expected: u64,
        actual: u64,
    },
    /// An image could not be read.
    #[error("volume {volume}: read of {len} bytes at {offset}: {source}")]
    Read {
        volume: u32,
        offset: u64,
        len: u32,
        #[source]
        source: io::Error,
    },
    /// A block of the region is neither zero nor a write of this run.
    #[error("volume {volume} block {block}: {kind}")]
    Corrupt {
        volume: u32,
        block: u64,
        kind: Corruption,
    },
    /// A byte outside the workload's region is not zero.
    #[error("volume {volume}: byte {offset} outside the workload's region is {value:#04x}")]
    NotZero { volume: u32, offset: u64, value: u8 },
    /// A well-formed write of this run that the history does not hold: issued after the
    /// history was taken, so after any window it covers.
    #[error("volume {volume} block {block} holds {write}, which the history does not know")]
    UnknownWrite {
        volume: u32,
        block: u64,
        write: WriteId,
    },
    /// A write issued after the window closed is visible.
    #[error(
        "volume {volume} block {block} holds {write}, issued at {issued_at}, after the window closed at {issued_after}"
    )]
    IssuedAfterWindow {
        write: WriteId,
        volume: u32,
        block: u64,
        issued_at: Mark,
        issued_after: Mark,
    },
    /// A write acknowledged before the window opened is missing.
    #[error(
        "{write}, acknowledged at {acked_at} before the window opened at {acked_before}, is missing: volume {volume} block {block} holds {found}"
    )]
    MissingAcknowledged {
        write: WriteId,
        volume: u32,
        block: u64,
        acked_at: Mark,
        acked_before: Mark,
        found: BlockState,
    },
    /// The image is not closed under happened-before: `dependent` is visible, `missing`
    /// was acknowledged before `dependent` was issued, and `missing` is not included.
    #[error(
        "{dependent} (issued at {dependent_issued_at}) is visible but {missing} (acknowledged at {missing_acked_at}) is missing: volume {volume} block {block} holds {found}"
    )]
    MissingDependency {
        dependent: WriteId,
        dependent_issued_at: Mark,
        missing: WriteId,
        missing_acked_at: Mark,
        volume: u32,
        block: u64,
        found: BlockState,
    },
    /// The hash of the bytes read differs from that of the image the history implies
    /// (only if the other checks missed something).
    #[error("volume {volume}: image hash {actual} differs from the expected {expected}")]
    HashMismatch {
        volume: u32,
        expected: blake3::Hash,
        actual: blake3::Hash,
    },
}

/// The hashes of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeCheck {
    /// Size in bytes.
    pub size: u64,
    /// Region blocks holding a write.
    pub blocks_written: u64,
    /// BLAKE3 of the source at the image's cut, generated from the history.
    pub expected: blake3::Hash,
    /// BLAKE3 of the bytes read.
    pub actual: blake3::Hash,
}

/// What a passing check established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Per writer, the writes `1..=cut[j]` the image holds: the image equals the source
    /// after exactly these writes.
    pub cut: Vec<u64>,
    /// Per writer, the writes acknowledged before the window opened (all included).
    pub required: Vec<u64>,
    /// Per writer, the writes issued before the window closed.
    pub issued: Vec<u64>,
    /// Region blocks checked, over all volumes.
    pub blocks_checked: u64,
    /// Bytes read, over all volumes.
    pub bytes_checked: u64,
    /// Blocks holding a write (each the newest write of the cut to its block).
    pub writes_visible: u64,
    /// Writes included (the sum of `cut`).
    pub writes_included: u64,
    /// Writes included that the window did not require (in flight around the checkpoint).
    pub writes_in_window: u64,
    /// The largest number of writes of one writer issued before the window closed but not
    /// included.
    pub max_lag: u64,
    /// Per volume, its hashes.
    pub volumes: Vec<VolumeCheck>,
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} writes included ({} required, {} from the window), {} visible in {} blocks, max lag {}",
            self.writes_included,
            self.required.iter().sum::<u64>(),
            self.writes_in_window,
            self.writes_visible,
            self.blocks_checked,
            self.max_lag
        )?;
        for (volume, check) in self.volumes.iter().enumerate() {
            write!(f, "; v{volume} {}", &check.actual.to_hex()[..16])?;
        }
        Ok(())
    }
}

/// Reads every block of one image: the seq of its owner's write each region block holds
/// (0: zeroes), and the hash of the bytes.
async fn scan_volume(
    history: &History,
    volume: u32,
    image: &dyn ImageReader,
) -> Result<(Vec<u64>, blake3::Hash), CheckError> {
    let layout = history.layout.volumes[volume as usize];
    if image.size() != layout.size {
        return Err(CheckError::SizeMismatch {
            volume,
            expected: layout.size,
            actual: image.size(),
        });
    }
    let chunk =
        (READ_CHUNK.min(u64::from(image.max_read())) / BLOCK_SIZE * BLOCK_SIZE).max(BLOCK_SIZE);
    let mut seqs = vec![0u64; layout.region_blocks as usize];
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0;
    while offset < layout.size {
        let len = chunk.min(layout.size - offset) as u32;
        let read_error = |source| CheckError::Read {
            volume,
            offset,
            len,
            source,
        };
        let data = image.read_at(offset, len).await.map_err(read_error)?;
        if data.len() != len as usize {
            return Err(read_error(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read of {} bytes", data.len()),
            )));
        }
        hasher.update(&data);
        for (block, bytes) in (offset / BLOCK_SIZE..).zip(data.chunks(BLOCK_LEN)) {
            match history.owner(volume, block) {
                Some(owner) => {
                    let corrupt = |kind| CheckError::Corrupt {
                        volume,
                        block,
                        kind,
                    };
                    let Some(write) =
                        decode_block(history.seed, volume, block, bytes).map_err(corrupt)?
                    else {
                        continue;
                    };
                    if write.writer != owner {
                        return Err(corrupt(Corruption::WrongWriter { write, owner }));
                    }
                    let Some(record) = history.write(write) else {
                        return Err(CheckError::UnknownWrite {
                            volume,
                            block,
                            write,
                        });
                    };
                    if (record.volume, record.block) != (volume, block) {
                        return Err(corrupt(Corruption::NotAsLogged {
                            write,
                            volume: record.volume,
                            block: record.block,
                        }));
                    }
                    seqs[block as usize] = write.seq;
                }
                None => {
                    if let Some(at) = bytes.iter().position(|&byte| byte != 0) {
                        return Err(CheckError::NotZero {
                            volume,
                            offset: block * BLOCK_SIZE + at as u64,
                            value: bytes[at],
                        });
                    }
                }
            }
        }
        offset += u64::from(len);
    }
    Ok((seqs, hasher.finalize()))
}

struct Seen {
    write: VisibleWrite,
    record: WriteRecord,
}

/// Checks that `images` (one per volume, in the run's order) equal the source at one cut
/// that `window` allows and that is closed under happened-before (see the module docs).
/// Returns the first violation found: corruption in volume and block order, then a write
/// issued after the window, then a missing acknowledged write, then a missing dependency.
pub async fn check_image(
    history: &History,
    window: &CutWindow,
    images: &[&dyn ImageReader],
) -> Result<CheckReport, CheckError> {
    if window.acked_before > window.issued_after {
        return Err(CheckError::InvalidWindow {
            acked_before: window.acked_before,
            issued_after: window.issued_after,
        });
    }
    if images.len() != history.layout.volumes.len() {
        return Err(CheckError::VolumeCount {
            expected: history.layout.volumes.len(),
            got: images.len(),
        });
    }
    let mut found = Vec::with_capacity(images.len());
    let mut actual = Vec::with_capacity(images.len());
    for (volume, image) in (0u32..).zip(images) {
        let (seqs, hash) = scan_volume(history, volume, *image).await?;
        found.push(seqs);
        actual.push(hash);
    }
    let state = |volume: u32, block: u64| {
        let seq = found[volume as usize][block as usize];
        match history.owner(volume, block) {
            Some(writer) if seq > 0 => BlockState::Write(WriteId::new(writer, seq)),
            _ => BlockState::Zero,
        }
    };
    // Every block of every region, with its owner, in volume and block order.
    let blocks = || {
        (0u32..)
            .zip(&history.layout.volumes)
            .flat_map(move |(volume, layout)| {
                (0..layout.region_blocks).filter_map(move |block| {
                    history
                        .owner(volume, block)
                        .map(|writer| (volume, block, writer))
                })
            })
    };

    let mut cut = vec![0u64; history.writer_count()];
    let mut seen = Vec::new();
    for (volume, block, writer) in blocks() {
        let seq = found[volume as usize][block as usize];
        if seq == 0 {
            continue;
        }
        let id = WriteId::new(writer, seq);
        let slot = &mut cut[writer.index()];
        *slot = (*slot).max(seq);
        if let Some(record) = history.write(id) {
            seen.push(Seen {
                write: VisibleWrite { id, volume, block },
                record: *record,
            });
        }
    }

    // 1. Nothing issued after the window closed.
    if let Some(late) = seen
        .iter()
        .filter(|seen| seen.record.issued_at > window.issued_after)
        .min_by_key(|seen| seen.record.issued_at)
    {
        return Err(CheckError::IssuedAfterWindow {
            write: late.write.id,
            volume: late.write.volume,
            block: late.write.block,
            issued_at: late.record.issued_at,
            issued_after: window.issued_after,
        });
    }

    // 2. Everything acknowledged before the window opened; report the earliest missing.
    let required = history.acked_by(window.acked_before);
    let mut missing_acked: Option<CheckError> = None;
    let mut earliest = Mark(u64::MAX);
    for (volume, block, writer) in blocks() {
        let newest = history.newest_write_to(writer, volume, block, required[writer.index()]);
        if found[volume as usize][block as usize] >= newest {
            continue;
        }
        let write = WriteId::new(writer, newest);
        let acked_at = history
            .write(write)
            .and_then(|record| record.acked_at)
            .unwrap_or(Mark::ORIGIN);
        if acked_at < earliest {
            earliest = acked_at;
            missing_acked = Some(CheckError::MissingAcknowledged {
                write,
                volume,
                block,
                acked_at,
                acked_before: window.acked_before,
                found: state(volume, block),
            });
        }
    }
    if let Some(err) = missing_acked {
        return Err(err);
    }

    // 3a. Closure within a writer: every block holds the writer's newest write to it up
    // to the writer's newest visible write, which depends on all the earlier ones.
    for (volume, block, writer) in blocks() {
        let newest = history.newest_write_to(writer, volume, block, cut[writer.index()]);
        if found[volume as usize][block as usize] >= newest {
            continue;
        }
        let dependent = WriteId::new(writer, cut[writer.index()]);
        let missing = WriteId::new(writer, newest);
        return Err(CheckError::MissingDependency {
            dependent,
            dependent_issued_at: history
                .write(dependent)
                .map_or(Mark::ORIGIN, |record| record.issued_at),
            missing,
            missing_acked_at: history
                .write(missing)
                .and_then(|record| record.acked_at)
                .unwrap_or(Mark::ORIGIN),
            volume,
            block,
            found: state(volume, block),
        });
    }

    // 3b. Closure across writers: dependency vectors grow with issue order, so the
    // visible write issued last carries the dependencies of every included write.
    if let Some(last_issue) = seen.iter().map(|seen| seen.record.issued_at).max() {
        for (index, writes) in history.writes.iter().enumerate() {
            let needed =
                writes.partition_point(|w| w.acked_at.is_some_and(|at| at < last_issue)) as u64;
            if needed <= cut[index] {
                continue;
            }
            // Write cut + 1 of this writer is not included (no block holds it or a newer
            // write) and was acknowledged before `last_issue`.
            let missing = WriteId::new(WriterId(index as u32), cut[index] + 1);
            let Some(record) = history.write(missing) else {
                continue;
            };
            let Some(missing_acked_at) = record.acked_at else {
                continue;
            };
            // The earliest-issued visible write that depends on it.
            let Some(dependent) = seen
                .iter()
                .filter(|seen| seen.record.issued_at > missing_acked_at)
                .min_by_key(|seen| seen.record.issued_at)
            else {
                continue;
            };
            let volume = record.volume;
            return Err(CheckError::MissingDependency {
                dependent: dependent.write.id,
                dependent_issued_at: dependent.record.issued_at,
                missing,
                missing_acked_at,
                volume,
                block: record.block,
                found: state(volume, record.block),
            });
        }
    }

    // The image is the source after exactly `cut`: compare hashes as the last word.
    let mut volumes = Vec::with_capacity(images.len());
    for (volume, layout) in (0u32..).zip(&history.layout.volumes) {
        let expected = history.expected_hash(volume, &cut);
        let actual = actual[volume as usize];
        if expected != actual {
            return Err(CheckError::HashMismatch {
                volume,
                expected,
                actual,
            });
        }
        volumes.push(VolumeCheck {
            size: layout.size,
            blocks_written: found[volume as usize]
                .iter()
                .filter(|&&seq| seq > 0)
                .count() as u64,
            expected,
            actual,
        });
    }
    let issued = history.issued_by(window.issued_after);
    let writes_included = cut.iter().sum();
    let writes_in_window = cut
        .iter()
        .zip(&required)
        .map(|(cut, required)| cut.saturating_sub(*required))
        .sum();
    let max_lag = issued
        .iter()
        .zip(&cut)
        .map(|(issued, cut)| issued.saturating_sub(*cut))
        .max()
        .unwrap_or(0);
    Ok(CheckReport {
        required,
        issued,
        blocks_checked: history.layout.volumes.iter().map(|l| l.region_blocks).sum(),
        bytes_checked: history.layout.volumes.iter().map(|l| l.size).sum(),
        writes_visible: seen.len() as u64,
        writes_included,
        writes_in_window,
        max_lag,
        volumes,
        cut,
    })
}

/// Checks images taken after the workload stopped and replication converged: they must
/// hold every acknowledged write, that is, the newest write of every block (a write that
/// failed may or may not be there).
pub async fn check_final(
    history: &History,
    images: &[&dyn ImageReader],
) -> Result<CheckReport, CheckError> {
    check_image(history, &CutWindow::exact(history.end()), images).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timestamp_gets_the_window_of_the_events_around_its_millisecond() {
        // Events 1..=5 logged in ms 100, 6..=9 in ms 102, 10..=12 in ms 103.
        let log = Log {
            clock: 12,
            ticks: vec![(100, 0), (102, 5), (103, 9)],
            ..Log::default()
        };
        // Nothing logged in ms 101: both bounds fall between events 5 and 6.
        assert_eq!(log.window_at(101), Some(CutWindow::new(Mark(5), Mark(5))));
        // In ms 102, events 6..=9 may fall either side of the moment.
        assert_eq!(log.window_at(102), Some(CutWindow::new(Mark(5), Mark(9))));
        assert_eq!(log.window_at(99), Some(CutWindow::new(Mark(0), Mark(0))));
        // The last millisecond logged: everything since is inside, once the moment passed.
        assert_eq!(log.window_at(103), Some(CutWindow::new(Mark(9), Mark(12))));
        // A moment not yet reached has no window.
        assert_eq!(log.window_at(u64::MAX - 2), None);
    }

    #[test]
    fn the_log_indexes_each_millisecond_once() {
        let mut log = Log::default();
        for _ in 0..1000 {
            log.next_event();
        }
        assert_eq!(log.clock, 1000);
        assert!(!log.ticks.is_empty());
        assert!(
            log.ticks
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
        );
        assert_eq!(log.ticks[0], (log.ticks[0].0, 0));
    }

    #[test]
    fn workload_blocks_round_trip_and_reject_damage() {
        let block = encode_block(7, 1, WriterId(3), 42, 9);
        assert_eq!(
            decode_block(7, 1, 9, &block),
            Ok(Some(WriteId::new(WriterId(3), 42)))
        );
        assert_eq!(decode_block(7, 1, 9, &ZERO_BLOCK), Ok(None));
        assert_eq!(
            decode_block(8, 1, 9, &block),
            Err(Corruption::ForeignRun { seed: 7 })
        );
        assert_eq!(
            decode_block(7, 1, 10, &block),
            Err(Corruption::Misplaced {
                volume: 1,
                block: 9
            })
        );
        for at in [0, 12, 30, 45, 100, 4095] {
            let mut damaged = block.clone();
            damaged[at] ^= 0x20;
            assert!(decode_block(7, 1, 9, &damaged).is_err(), "flip at {at}");
        }
    }

    #[test]
    fn workload_writers_choose_the_same_blocks_for_a_seed() {
        let mut a = SplitMix64::for_writer(5, WriterId(1));
        let mut b = SplitMix64::for_writer(5, WriterId(1));
        let mut c = SplitMix64::for_writer(5, WriterId(2));
        let (xs, ys, zs): (Vec<u64>, Vec<u64>, Vec<u64>) = (0..8)
            .map(|_| (a.next_u64(), b.next_u64(), c.next_u64()))
            .fold(
                (vec![], vec![], vec![]),
                |(mut x, mut y, mut z), (p, q, r)| {
                    x.push(p);
                    y.push(q);
                    z.push(r);
                    (x, y, z)
                },
            );
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }
}
