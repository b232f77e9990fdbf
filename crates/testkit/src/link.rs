//! The lab's link emulator: per site pair, TCP proxies that count, cut, delay and throttle
//! every inter-site connection of a lab.
//!
//! A [`Link`] (one per site pair, named `site-a<->site-b`) owns one proxy listener on
//! `127.0.0.1:0` per upstream address that one site dials at the other. The lab hands the
//! dialing site the proxy's address instead of the real one, so the bytes cross the link:
//! `a -> b` is what site a's side of a connection sends, whatever site dialed it.
//!
//! Per direction a link adds a one-way delay (each chunk is timestamped when read and
//! released when its time has come, so a delay does not cap throughput) and a bandwidth
//! limit (one token bucket per direction, shared by every connection of the link). A cut
//! either drops (open connections are reset, new ones are reset right after accept) or
//! blackholes (connections stay open, nothing is forwarded, up to [`HOLD_CAPACITY`] bytes
//! per connection and direction are held and delivered in order after heal, and the sender
//! then stalls on TCP flow control, like a pulled cable).
//!
//! Actors: [`LinkEmulator`] is the registry of links, [`Link`] the handle of one link's
//! actor, which owns the link's settings (published to the connection tasks through a
//! `watch` channel) and its listeners. Counters are atomics shared with the connection
//! tasks. Every task is spawned on one [`TaskTracker`] under one [`CancellationToken`].
//! [`TokenBucket`] and [`DelayQueue`] hold the pacing logic without IO.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bytes a connection holds per direction (delayed, throttled or blackholed) before it
/// stops reading from the sender.
pub const HOLD_CAPACITY: usize = 8 << 20;
/// The largest one-way delay a link accepts.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
const READ_SIZE: usize = 64 << 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAILBOX: usize = 64;

/// Errors of the link emulator.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no link named {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("binding a proxy listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("the link emulator has stopped")]
    Stopped,
}

/// One direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Bytes sent by site a's side of a connection.
    AToB,
    BToA,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::AToB, Direction::BToA];

    fn index(self) -> usize {
        match self {
            Direction::AToB => 0,
            Direction::BToA => 1,
        }
    }

    pub fn reverse(self) -> Direction {
        match self {
            Direction::AToB => Direction::BToA,
            Direction::BToA => Direction::AToB,
        }
    }
}

/// How a cut link behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CutMode {
    /// Open connections are reset; new ones are reset right after accept.
    Drop,
    /// Connections stay open; nothing is forwarded; data is held until heal.
    Blackhole,
}

/// One change to a link's conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkChange {
    Cut(CutMode),
    Heal,
    /// Added one-way latency; `direction` `None` means both.
    Delay {
        direction: Option<Direction>,
        delay: Duration,
    },
    /// Bandwidth limit in bytes per second, 0 for none; `direction` `None` means both.
    Throttle {
        direction: Option<Direction>,
        bytes_per_sec: u64,
    },
}

/// A proxy of a link: the dialing site connects to `listen`, the link connects to `upstream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyInfo {
    pub listen: String,
    pub upstream: String,
    /// The dialing site.
    pub from: String,
    pub to: String,
}

/// Conditions and counters of one direction of a link.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionState {
    pub delay_ms: u64,
    /// 0: unlimited.
    pub throttle_bps: u64,
    /// Bytes delivered in this direction.
    pub bytes: u64,
    /// Bytes read from the sender and not delivered yet.
    pub held_bytes: u64,
    /// Connections dialed in this direction, ever accepted.
    pub connections_total: u64,
    pub connections_open: u64,
    /// Connections reset right after accept because the link was cut (drop).
    pub connections_refused: u64,
}

/// A snapshot of a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    pub name: String,
    pub a: String,
    pub b: String,
    /// `None`: the link is up.
    pub cut: Option<CutMode>,
    pub a_to_b: DirectionState,
    pub b_to_a: DirectionState,
    pub proxies: Vec<ProxyInfo>,
}

impl LinkState {
    pub fn direction(&self, d: Direction) -> &DirectionState {
        match d {
            Direction::AToB => &self.a_to_b,
            Direction::BToA => &self.b_to_a,
        }
    }
}

/// The name of the link between two sites, whatever the order they are given in.
pub fn link_name(x: &str, y: &str) -> String {
    let (a, b) = if x <= y { (x, y) } else { (y, x) };
    format!("{a}<->{b}")
}

// ------------------------------------------------------------------ pacing without IO

/// A token bucket for one direction of a link. A sender may send while the bucket is not in
/// debt; sending takes its size from the bucket, possibly into debt, which the rate pays back
/// before the next piece goes. Over a transfer of `n` bytes that makes the rate exact up to
/// one burst and one piece: it lasts at least `(n - burst - piece) / rate`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket; `bytes_per_sec` 0 is unlimited.
    pub fn new(bytes_per_sec: u64, now: Instant) -> Self {
        TokenBucket {
            rate: bytes_per_sec,
            tokens: Self::burst_of(bytes_per_sec) as f64,
            at: now,
        }
    }

    /// Bytes per second; 0 is unlimited.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn burst_of(rate: u64) -> u64 {
        (rate / 10).max(1)
    }

    /// What the bucket holds when full: a tenth of a second at the rate.
    pub fn burst(&self) -> u64 {
        Self::burst_of(self.rate)
    }

    /// The largest piece to send at once, so that pacing stays smooth; `usize::MAX` when
    /// unlimited.
    pub fn piece(&self) -> usize {
        if self.rate == 0 {
            usize::MAX
        } else {
            (self.rate / 20).clamp(256, 16 << 10) as usize
        }
    }

    pub fn set_rate(&mut self, bytes_per_sec: u64, now: Instant) {
        self.refill(now);
        let was_unlimited = self.rate == 0;
        self.rate = bytes_per_sec;
        let burst = self.burst() as f64;
        self.tokens = if was_unlimited {
            burst
        } else {
            self.tokens.min(burst)
        };
    }

    /// When the next piece may go: `now` unless the bucket is in debt.
    pub fn ready_at(&mut self, now: Instant) -> Instant {
        if self.rate == 0 {
            return now;
        }
        self.refill(now);
        if self.tokens >= 0.0 {
            now
        } else {
            now + Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }

    /// Spends `n` bytes.
    pub fn take(&mut self, n: usize, now: Instant) {
        if self.rate == 0 {
            return;
        }
        self.refill(now);
        self.tokens -= n as f64;
    }

    fn refill(&mut self, now: Instant) {
        if now > self.at {
            let dt = (now - self.at).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst() as f64);
            self.at = now;
        }
    }
}

/// The bytes of one direction of one connection between being read and being delivered, in
/// order, each chunk with the time it was read. A chunk is due `delay` after it was read,
/// with the delay in force when it is looked at; only the oldest chunk is ever released, so
/// order holds even when the delay shrinks.
#[derive(Debug)]
pub struct DelayQueue {
    chunks: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
    capacity: usize,
}

impl DelayQueue {
    /// A queue that has room while it holds fewer than `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        DelayQueue {
            chunks: VecDeque::new(),
            bytes: 0,
            capacity,
        }
    }

    pub fn push(&mut self, read_at: Instant, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        self.bytes += data.len();
        self.chunks.push_back((read_at, data));
    }

    pub fn has_room(&self) -> bool {
        self.bytes < self.capacity
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// When the oldest chunk is due; `None` when empty.
    pub fn due_at(&self, delay: Duration) -> Option<Instant> {
        self.chunks.front().map(|(t, _)| *t + delay)
    }

    /// Up to `max` bytes of the oldest chunk if it is due at `now`; the rest of the chunk
    /// keeps its time.
    pub fn pop_due(&mut self, now: Instant, delay: Duration, max: usize) -> Option<Vec<u8>> {
        let (read_at, data) = self.chunks.front_mut()?;
        if *read_at + delay > now {
            return None;
        }
        let max = max.max(1);
        let piece = if data.len() > max {
            let rest = data.split_off(max);
            std::mem::replace(data, rest)
        } else {
            self.chunks.pop_front()?.1
        };
        self.bytes -= piece.len();
        Some(piece)
    }
}

// ------------------------------------------------------------------ shared state

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct DirSettings {
    delay: Duration,
    throttle_bps: u64,
}

/// What a link's connection tasks obey; published by the link actor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Settings {
    cut: Option<CutMode>,
    dirs: [DirSettings; 2],
}

#[derive(Debug, Default)]
struct Counters {
    bytes: AtomicU64,
    held: AtomicU64,
    total: AtomicU64,
    open: AtomicU64,
    refused: AtomicU64,
}

/// Counters and buckets of a link, shared by its connection tasks.
#[derive(Debug)]
struct LinkShared {
    dirs: [Counters; 2],
    buckets: [Mutex<TokenBucket>; 2],
}

impl LinkShared {
    fn bucket(&self, d: Direction) -> std::sync::MutexGuard<'_, TokenBucket> {
        self.buckets[d.index()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

// ------------------------------------------------------------------ the registry

enum EmulatorMsg {
    Link {
        a: String,
        b: String,
        reply: oneshot::Sender<Result<Link, LinkError>>,
    },
    Get {
        name: String,
        reply: oneshot::Sender<Option<Link>>,
    },
    List {
        reply: oneshot::Sender<Vec<Link>>,
    },
}

struct EmulatorActor {
    rx: mpsc::Receiver<EmulatorMsg>,
    links: BTreeMap<String, Link>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl EmulatorActor {
    async fn run(mut self) {
        loop {
            let msg = tokio::select! {
                () = self.cancel.cancelled() => break,
                msg = self.rx.recv() => match msg {
                    Some(m) => m,
                    None => break,
                },
            };
            match msg {
                EmulatorMsg::Link { a, b, reply } => {
                    let _ = reply.send(self.link(&a, &b));
                }
                EmulatorMsg::Get { name, reply } => {
                    let _ = reply.send(self.links.get(&name).cloned());
                }
                EmulatorMsg::List { reply } => {
                    let _ = reply.send(self.links.values().cloned().collect());
                }
            }
        }
    }

    fn link(&mut self, x: &str, y: &str) -> Result<Link, LinkError> {
        if x == y {
            return Err(LinkError::Invalid(format!(
                "a link joins two different sites, not {x:?} to itself"
            )));
        }
        if x.is_empty() || y.is_empty() {
            return Err(LinkError::Invalid("a site name is empty".into()));
        }
        let name = link_name(x, y);
        if let Some(l) = self.links.get(&name) {
            return Ok(l.clone());
        }
        let (a, b) = if x <= y { (x, y) } else { (y, x) };
        let link = Link::start(a, b, &self.cancel, &self.tracker);
        self.links.insert(name, link.clone());
        Ok(link)
    }
}

/// The lab's links, by name. Cloneable handle of the registry actor.
#[derive(Debug, Clone)]
pub struct LinkEmulator {
    tx: mpsc::Sender<EmulatorMsg>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for EmulatorMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EmulatorMsg::Link { .. } => "Link",
            EmulatorMsg::Get { .. } => "Get",
            EmulatorMsg::List { .. } => "List",
        })
    }
}

impl LinkEmulator {
    /// Starts the registry; everything it starts stops when `cancel` is cancelled.
    pub fn start(cancel: CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(MAILBOX);
        let tracker = TaskTracker::new();
        tracker.spawn(
            EmulatorActor {
                rx,
                links: BTreeMap::new(),
                cancel: cancel.clone(),
                tracker: tracker.clone(),
            }
            .run(),
        );
        LinkEmulator {
            tx,
            cancel,
            tracker,
        }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> EmulatorMsg,
    ) -> Result<T, LinkError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| LinkError::Stopped)?;
        rx.await.map_err(|_| LinkError::Stopped)
    }

    /// The link between two sites, started if it does not exist yet.
    pub async fn link(&self, x: &str, y: &str) -> Result<Link, LinkError> {
        let (a, b) = (x.to_string(), y.to_string());
        self.call(|reply| EmulatorMsg::Link { a, b, reply }).await?
    }

    /// The link named `name`.
    pub async fn get(&self, name: &str) -> Result<Link, LinkError> {
        let n = name.to_string();
        self.call(|reply| EmulatorMsg::Get { name: n, reply })
            .await?
            .ok_or_else(|| LinkError::NotFound(name.to_string()))
    }

    /// Every link, by name.
    pub async fn links(&self) -> Result<Vec<Link>, LinkError> {
        self.call(|reply| EmulatorMsg::List { reply }).await
    }

    /// The states of every link, by name.
    pub async fn states(&self) -> Result<Vec<LinkState>, LinkError> {
        let mut out = Vec::new();
        for l in self.links().await? {
            out.push(l.state().await?);
        }
        Ok(out)
    }

    /// The address site `from` dials to reach `upstream` in site `to` across their link;
    /// the link and its proxy are started on first use.
    pub async fn proxy(
        &self,
        from: &str,
        to: &str,
        upstream: &str,
    ) -> Result<SocketAddr, LinkError> {
        self.link(from, to).await?.add_proxy(from, upstream).await
    }

    /// Stops every link, listener and connection, and waits for their tasks.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

// ------------------------------------------------------------------ one link

enum LinkMsg {
    AddProxy {
        from: String,
        upstream: String,
        reply: oneshot::Sender<Result<SocketAddr, LinkError>>,
    },
    Change {
        change: LinkChange,
        reply: oneshot::Sender<Result<LinkState, LinkError>>,
    },
    State {
        reply: oneshot::Sender<LinkState>,
    },
}

impl std::fmt::Debug for LinkMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkMsg::AddProxy { from, upstream, .. } => {
                write!(f, "AddProxy({from} -> {upstream})")
            }
            LinkMsg::Change { change, .. } => write!(f, "Change({change:?})"),
            LinkMsg::State { .. } => f.write_str("State"),
        }
    }
}

#[derive(Debug)]
struct Proxy {
    /// Direction of what the dialer sends.
    dir: Direction,
    upstream: String,
    listen: SocketAddr,
}

struct LinkActor {
    name: String,
    a: String,
    b: String,
    rx: mpsc::Receiver<LinkMsg>,
    settings: watch::Sender<Settings>,
    shared: Arc<LinkShared>,
    proxies: Vec<Proxy>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl LinkActor {
    async fn run(mut self) {
        loop {
            let msg = tokio::select! {
                () = self.cancel.cancelled() => break,
                msg = self.rx.recv() => match msg {
                    Some(m) => m,
                    None => break,
                },
            };
            match msg {
                LinkMsg::AddProxy {
                    from,
                    upstream,
                    reply,
                } => {
                    let _ = reply.send(self.add_proxy(&from, upstream).await);
                }
                LinkMsg::Change { change, reply } => {
                    let r = self.apply(change).map(|()| self.state());
                    let _ = reply.send(r);
                }
                LinkMsg::State { reply } => {
                    let _ = reply.send(self.state());
                }
            }
        }
    }

    async fn add_proxy(&mut self, from: &str, upstream: String) -> Result<SocketAddr, LinkError> {
        let dir = if from == self.a {
            Direction::AToB
        } else if from == self.b {
            Direction::BToA
        } else {
            return Err(LinkError::Invalid(format!(
                "site {from:?} is not an end of link {}",
                self.name
            )));
        };
        if let Some(p) = self
            .proxies
            .iter()
            .find(|p| p.dir == dir && p.upstream == upstream)
        {
            return Ok(p.listen);
        }
        match upstream.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => {
                return Err(LinkError::Invalid(format!(
                    "upstream {upstream:?} is not host:port"
                )));
            }
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?;
        tracing::debug!(link = %self.name, %listen, %upstream, ?dir, "proxy started");
        self.tracker.spawn(accept_loop(Accept {
            listener,
            upstream: Arc::from(upstream.as_str()),
            dir,
            link: self.shared.clone(),
            settings: self.settings.subscribe(),
            cancel: self.cancel.clone(),
            tracker: self.tracker.clone(),
        }));
        self.proxies.push(Proxy {
            dir,
            upstream,
            listen,
        });
        Ok(listen)
    }

    fn apply(&mut self, change: LinkChange) -> Result<(), LinkError> {
        let dirs = |d: Option<Direction>| match d {
            Some(d) => vec![d],
            None => Direction::BOTH.to_vec(),
        };
        match change {
            LinkChange::Cut(mode) => self.settings.send_modify(|s| s.cut = Some(mode)),
            LinkChange::Heal => self.settings.send_modify(|s| s.cut = None),
            LinkChange::Delay { direction, delay } => {
                if delay > MAX_DELAY {
                    return Err(LinkError::Invalid(format!(
                        "a delay is at most {} ms",
                        MAX_DELAY.as_millis()
                    )));
                }
                self.settings.send_modify(|s| {
                    for d in dirs(direction) {
                        s.dirs[d.index()].delay = delay;
                    }
                });
            }
            LinkChange::Throttle {
                direction,
                bytes_per_sec,
            } => {
                let now = Instant::now();
                for d in dirs(direction) {
                    self.shared.bucket(d).set_rate(bytes_per_sec, now);
                }
                self.settings.send_modify(|s| {
                    for d in dirs(direction) {
                        s.dirs[d.index()].throttle_bps = bytes_per_sec;
                    }
                });
            }
        }
        tracing::info!(link = %self.name, ?change, "link changed");
        Ok(())
    }

    fn state(&self) -> LinkState {
        let s = *self.settings.borrow();
        let dir = |d: Direction| {
            let c = &self.shared.dirs[d.index()];
            let ds = s.dirs[d.index()];
            DirectionState {
                delay_ms: ds.delay.as_millis() as u64,
                throttle_bps: ds.throttle_bps,
                bytes: c.bytes.load(Ordering::Relaxed),
                held_bytes: c.held.load(Ordering::Relaxed),
                connections_total: c.total.load(Ordering::Relaxed),
                connections_open: c.open.load(Ordering::Relaxed),
                connections_refused: c.refused.load(Ordering::Relaxed),
            }
        };
        LinkState {
            name: self.name.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            cut: s.cut,
            a_to_b: dir(Direction::AToB),
            b_to_a: dir(Direction::BToA),
            proxies: self
                .proxies
                .iter()
                .map(|p| {
                    let (from, to) = match p.dir {
                        Direction::AToB => (&self.a, &self.b),
                        Direction::BToA => (&self.b, &self.a),
                    };
                    ProxyInfo {
                        listen: p.listen.to_string(),
                        upstream: p.upstream.clone(),
                        from: from.clone(),
                        to: to.clone(),
                    }
                })
                .collect(),
        }
    }
}

/// The link between two sites: handle of its actor.
#[derive(Debug, Clone)]
pub struct Link {
    name: Arc<str>,
    a: Arc<str>,
    b: Arc<str>,
    tx: mpsc::Sender<LinkMsg>,
}

impl Link {
    /// Starts the link between sites `a` and `b` (named `a<->b`), its tasks on `tracker`,
    /// stopped by `cancel`. [`LinkEmulator::link`] is the usual way to get one.
    pub fn start(a: &str, b: &str, cancel: &CancellationToken, tracker: &TaskTracker) -> Link {
        let name = format!("{a}<->{b}");
        let (tx, rx) = mpsc::channel(MAILBOX);
        let now = Instant::now();
        let shared = Arc::new(LinkShared {
            dirs: Default::default(),
            buckets: [
                Mutex::new(TokenBucket::new(0, now)),
                Mutex::new(TokenBucket::new(0, now)),
            ],
        });
        tracker.spawn(
            LinkActor {
                name: name.clone(),
                a: a.to_string(),
                b: b.to_string(),
                rx,
                settings: watch::Sender::new(Settings::default()),
                shared,
                proxies: Vec::new(),
                cancel: cancel.clone(),
                tracker: tracker.clone(),
            }
            .run(),
        );
        Link {
            name: name.into(),
            a: a.into(),
            b: b.into(),
            tx,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn a(&self) -> &str {
        &self.a
    }

    pub fn b(&self) -> &str {
        &self.b
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> LinkMsg,
    ) -> Result<T, LinkError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| LinkError::Stopped)?;
        rx.await.map_err(|_| LinkError::Stopped)
    }

    /// The address site `from` (an end of this link) dials to reach `upstream` at the other
    /// end; the proxy is started on first use and the same one is returned afterwards.
    pub async fn add_proxy(&self, from: &str, upstream: &str) -> Result<SocketAddr, LinkError> {
        let (from, upstream) = (from.to_string(), upstream.to_string());
        self.call(|reply| LinkMsg::AddProxy {
            from,
            upstream,
            reply,
        })
        .await?
    }

    /// Applies a change and returns the state after it.
    pub async fn set(&self, change: LinkChange) -> Result<LinkState, LinkError> {
        self.call(|reply| LinkMsg::Change { change, reply }).await?
    }

    pub async fn cut(&self, mode: CutMode) -> Result<LinkState, LinkError> {
        self.set(LinkChange::Cut(mode)).await
    }

    pub async fn heal(&self) -> Result<LinkState, LinkError> {
        self.set(LinkChange::Heal).await
    }

    /// Added one-way latency; `direction` `None` means both.
    pub async fn delay(
        &self,
        direction: Option<Direction>,
        delay: Duration,
    ) -> Result<LinkState, LinkError> {
        self.set(LinkChange::Delay { direction, delay }).await
    }

    /// Bandwidth limit, 0 for none; `direction` `None` means both.
    pub async fn throttle(
        &self,
        direction: Option<Direction>,
        bytes_per_sec: u64,
    ) -> Result<LinkState, LinkError> {
        self.set(LinkChange::Throttle {
            direction,
            bytes_per_sec,
        })
        .await
    }

    pub async fn state(&self) -> Result<LinkState, LinkError> {
        self.call(|reply| LinkMsg::State { reply }).await
    }
}

// ------------------------------------------------------------------ connections

struct Accept {
    listener: TcpListener,
    upstream: Arc<str>,
    dir: Direction,
    link: Arc<LinkShared>,
    settings: watch::Receiver<Settings>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

async fn accept_loop(a: Accept) {
    loop {
        let accepted = tokio::select! {
            () = a.cancel.cancelled() => return,
            r = a.listener.accept() => r,
        };
        match accepted {
            Ok((client, _)) => {
                a.tracker.spawn(serve_connection(
                    client,
                    a.upstream.clone(),
                    a.dir,
                    a.link.clone(),
                    a.settings.clone(),
                    a.cancel.clone(),
                ));
            }
            Err(e) => {
                tracing::warn!(upstream = %a.upstream, error = %e, "proxy accept failed");
                tokio::select! {
                    () = a.cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}

/// Closes a socket with a reset rather than a FIN.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// Counts a connection open for as long as it lives.
struct OpenGuard<'a>(&'a Counters);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(
    client: TcpStream,
    upstream: Arc<str>,
    dir: Direction,
    link: Arc<LinkShared>,
    mut settings: watch::Receiver<Settings>,
    cancel: CancellationToken,
) {
    let counters = &link.dirs[dir.index()];
    let _ = client.set_nodelay(true);
    if settings.borrow().cut == Some(CutMode::Drop) {
        counters.refused.fetch_add(1, Ordering::Relaxed);
        reset(client);
        return;
    }
    counters.total.fetch_add(1, Ordering::Relaxed);
    counters.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(counters);

    // Through a blackhole the upstream is not dialed until heal, like a SYN lost on a pulled
    // cable; the client's first bytes wait in its socket.
    let cut = tokio::select! {
        () = cancel.cancelled() => return,
        s = settings.wait_for(|s| s.cut != Some(CutMode::Blackhole)) => match s {
            Ok(s) => s.cut,
            Err(_) => return,
        },
    };
    if cut == Some(CutMode::Drop) {
        reset(client);
        return;
    }
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&*upstream));
    let server = tokio::select! {
        () = cancel.cancelled() => return,
        r = connect => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%upstream, error = %e, "proxy cannot reach upstream");
                reset(client);
                return;
            }
            Err(_) => {
                tracing::debug!(%upstream, "proxy timed out reaching upstream");
                reset(client);
                return;
            }
        },
    };
    let _ = server.set_nodelay(true);
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let stop = cancel.child_token();
    let finish = |end: PumpEnd| {
        if end != PumpEnd::Eof {
            stop.cancel();
        }
        end
    };
    let (up, down) = tokio::join!(
        async {
            finish(
                pump(
                    &mut client_rd,
                    &mut server_wr,
                    dir,
                    &link,
                    settings.clone(),
                    &stop,
                )
                .await,
            )
        },
        async {
            finish(
                pump(
                    &mut server_rd,
                    &mut client_wr,
                    dir.reverse(),
                    &link,
                    settings.clone(),
                    &stop,
                )
                .await,
            )
        },
    );
    tracing::debug!(%upstream, ?up, ?down, "proxied connection ended");
    // A cut or a failure on one side resets both, as a broken path would.
    if [up, down]
        .iter()
        .any(|e| matches!(e, PumpEnd::Cut | PumpEnd::Failed))
    {
        if let Ok(c) = client_rd.reunite(client_wr) {
            reset(c);
        }
        if let Ok(s) = server_rd.reunite(server_wr) {
            reset(s);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PumpEnd {
    /// The sender closed and everything it sent was delivered.
    Eof,
    /// The link was cut (drop).
    Cut,
    /// A read or write failed.
    Failed,
    /// The connection or the lab is stopping.
    Stopped,
}

/// Moves one direction of a connection: reads as soon as bytes come (timestamping them),
/// releases them when due, within the bucket, unless the link is blackholed.
async fn pump(
    src: &mut OwnedReadHalf,
    dst: &mut OwnedWriteHalf,
    dir: Direction,
    link: &LinkShared,
    mut settings: watch::Receiver<Settings>,
    stop: &CancellationToken,
) -> PumpEnd {
    let counters = &link.dirs[dir.index()];
    let mut queue = DelayQueue::new(HOLD_CAPACITY);
    let mut buf = vec![0u8; READ_SIZE];
    let mut eof = false;
    let end = loop {
        let s = *settings.borrow_and_update();
        if s.cut == Some(CutMode::Drop) {
            break PumpEnd::Cut;
        }
        if eof && queue.is_empty() {
            break PumpEnd::Eof;
        }
        let delay = s.dirs[dir.index()].delay;
        let now = Instant::now();
        let send_at = match (s.cut, queue.due_at(delay)) {
            (None, Some(due)) => Some(due.max(link.bucket(dir).ready_at(now))),
            _ => None,
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => break PumpEnd::Stopped,
            r = settings.changed() => {
                if r.is_err() {
                    break PumpEnd::Stopped;
                }
            }
            () = sleep_until(send_at.unwrap_or(now)), if send_at.is_some() => {
                let now = Instant::now();
                let piece = {
                    let mut bucket = link.bucket(dir);
                    let piece = queue.pop_due(now, delay, bucket.piece().min(READ_SIZE));
                    if let Some(p) = &piece {
                        bucket.take(p.len(), now);
                    }
                    piece
                };
                let Some(piece) = piece else { continue };
                counters.held.fetch_sub(piece.len() as u64, Ordering::Relaxed);
                let wrote = tokio::select! {
                    r = dst.write_all(&piece) => r,
                    () = stop.cancelled() => break PumpEnd::Stopped,
                    r = settings.wait_for(|s| s.cut == Some(CutMode::Drop)) => {
                        break if r.is_ok() { PumpEnd::Cut } else { PumpEnd::Stopped };
                    }
                };
                if wrote.is_err() {
                    break PumpEnd::Failed;
                }
                counters.bytes.fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
            r = src.read(&mut buf), if !eof && queue.has_room() => match r {
                Ok(0) => eof = true,
                Ok(n) => {
                    queue.push(Instant::now(), buf[..n].to_vec());
                    counters.held.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(_) => break PumpEnd::Failed,
            },
        }
    };
    counters
        .held
        .fetch_sub(queue.bytes() as u64, Ordering::Relaxed);
    if end == PumpEnd::Eof {
        let _ = dst.shutdown().await;
    }
    end
}

#[cfg(test)]
mod tests;
