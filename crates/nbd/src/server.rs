//! The NBD server: accepts connections on a bound listener, negotiates with the pure
//! [`Negotiation`] state machine, and serves requests with many in flight per connection.
//!
//! Per connection, a reader loop decodes requests ([`RequestDecoder`]) and starts each
//! valid one at once, keeping them in a `FuturesUnordered` so that any number run
//! concurrently (bounded by a per-connection budget of in-flight payload bytes) and
//! complete in any order; a writer task serializes the replies as they complete,
//! batching those that are ready into one socket write. Device calls may take any time
//! (a protected volume holds writes during a checkpoint freeze); devices that need
//! parallel CPU or blocking IO run it on their own threads, as [`crate::FileDevice`]
//! does. Driving the requests from the reader rather than spawning a task for each saves
//! two thread wake-ups per request, which is what lets the server keep up with nbdkit.
//!
//! Shutdown is structured: when the token is cancelled the server stops accepting, every
//! connection stops reading, finishes its in-flight requests, writes their replies and
//! closes; a connection that has not finished within [`ServerConfig::shutdown_grace`] is
//! dropped (its requests cancelled). Removing an export does the same to its
//! connections. No task outlives [`NbdServer::serve`].

use std::{
    sync::{Arc, PoisonError},
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{
    FutureExt,
    stream::{FuturesUnordered, StreamExt},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::{
    error::NbdError,
    exports::{ExportEntry, Exports, OpKind},
    proto::{
        Command, Cookie, DEFAULT_MAX_PAYLOAD, Decoded, ErrorCode, ExportDescription, Negotiation,
        NegotiationEvent, PREFERRED_BLOCK_SIZE, ProtocolError, RequestDecoder, TlsPolicy, cmd,
        put_simple_reply,
    },
};

/// How much the reader asks the socket for at a time when frames are small.
const READ_CHUNK: usize = 64 * 1024;
/// Replies are gathered up to this many bytes before a socket write.
const WRITE_BATCH: usize = 256 * 1024;
/// Read data up to this size is copied into the batch; larger data is written in place.
const INLINE_DATA_MAX: usize = 64 * 1024;
/// Write payloads at least this large are read straight into pooled buffers.
const DIRECT_PAYLOAD_MIN: usize = 64 * 1024;
/// Bytes of payload buffers a connection keeps for reuse.
const POOL_KEEP_BYTES: usize = 64 * 1024 * 1024;
/// How long a connection refused for an oversized write drains input before closing.
const LINGER: Duration = Duration::from_secs(2);
/// Unit of the in-flight budget.
const BUDGET_UNIT: usize = 4096;

/// Tunables of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest read or write payload, advertised as the maximum block size (at least
    /// 4096). A larger write is refused with `EINVAL` and its connection closed; a larger
    /// read gets `EINVAL`.
    pub max_payload: u32,
    /// Payload bytes (reads and writes) a connection may have in flight; requests beyond
    /// it wait before being dispatched. At least one maximal request always fits.
    pub max_inflight_bytes: usize,
    /// Connections in their handshake (the oldest shed for a newer one), connections
    /// served (one more refused), and the time a handshake may take.
    pub admission: tandem_net::Limits,
    /// Time a connection has, after shutdown or removal of its export, to finish its
    /// in-flight requests before it is dropped.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_inflight_bytes: 128 * 1024 * 1024,
            admission: tandem_net::Limits::default(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl ServerConfig {
    fn budget_units(&self) -> usize {
        let max_request = 1 + self.max_payload as usize / BUDGET_UNIT;
        (self.max_inflight_bytes / BUDGET_UNIT).max(max_request)
    }
}

/// A connection's byte stream once negotiated: TCP, a Unix socket, or TLS over TCP.
pub trait NbdIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> NbdIo for T {}

/// The server side of a TLS handshake on a TCP connection whose client sent
/// `NBD_OPT_STARTTLS` (the caller's TLS stack and policy: whom it admits is its own).
pub trait StartTls: Send + Sync + 'static {
    /// Runs the handshake; answers the encrypted stream, or an error when the client is
    /// not admitted.
    fn accept(
        &self,
        tcp: TcpStream,
    ) -> futures::future::BoxFuture<'static, std::io::Result<Box<dyn NbdIo>>>;
}

/// The TLS a server requires of its TCP clients.
#[derive(Clone)]
struct TlsRequired(Arc<dyn StartTls>);

impl std::fmt::Debug for TlsRequired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsRequired")
    }
}

/// An NBD server over a registry of exports.
#[derive(Debug, Clone)]
pub struct NbdServer {
    exports: Exports,
    config: Arc<ServerConfig>,
    admission: tandem_net::Admission,
    tls: Option<TlsRequired>,
}

/// A bound listener of either kind.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// The next connection, and who it is from (for the logs).
    async fn accept(&self) -> std::io::Result<(Accepted, String)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                Ok((Accepted::Tcp(stream), peer.to_string()))
            }
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                Ok((Accepted::Unix(stream), "local".to_string()))
            }
        }
    }
}

/// An accepted connection before its handshake.
enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A connection's stream after its handshake.
enum Negotiated {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<dyn NbdIo>),
}

impl NbdServer {
    /// A server with the default configuration.
    pub fn new(exports: Exports) -> Self {
        Self::with_config(exports, ServerConfig::default())
    }

    /// A server with the given configuration (a `max_payload` under 4096 is raised to it).
    pub fn with_config(exports: Exports, mut config: ServerConfig) -> Self {
        config.max_payload = config.max_payload.max(PREFERRED_BLOCK_SIZE);
        Self {
            exports,
            admission: tandem_net::Admission::new(config.admission),
            config: Arc::new(config),
            tls: None,
        }
    }

    /// Requires TLS of every TCP client: `NBD_OPT_STARTTLS` before any other option (no
    /// export list, no export, no size in plaintext), then `tls`'s handshake. Unix socket
    /// clients (the local host) are not asked for it.
    pub fn requiring_tls(mut self, tls: Arc<dyn StartTls>) -> Self {
        self.tls = Some(TlsRequired(tls));
        self
    }

    /// The registry this server serves (add and remove exports through it at any time).
    pub fn exports(&self) -> &Exports {
        &self.exports
    }

    /// Serves connections from `listener` until `shutdown` is cancelled, then closes every
    /// connection (see the module docs) and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), NbdError> {
        let local = listener.local_addr()?.to_string();
        self.serve_on(Listener::Tcp(listener), &local, shutdown)
            .await
    }

    /// Serves connections from a Unix socket `listener` (the local host's clients; never
    /// TLS) until `shutdown` is cancelled, as [`NbdServer::serve`] does.
    pub async fn serve_unix(
        self,
        listener: UnixListener,
        shutdown: CancellationToken,
    ) -> Result<(), NbdError> {
        let local = listener
            .local_addr()?
            .as_pathname()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "unnamed unix socket".into());
        self.serve_on(Listener::Unix(listener), &local, shutdown)
            .await
    }

    async fn serve_on(
        self,
        listener: Listener,
        local: &str,
        shutdown: CancellationToken,
    ) -> Result<(), NbdError> {
        info!(%local, tls = self.tls.is_some(), "nbd server listening");
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(joined) = connections.join_next(), if !connections.is_empty() => {
                    log_join(joined);
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let span = tracing::info_span!("nbd_conn", %peer);
                        connections.spawn(
                            run_connection(
                                stream,
                                self.admission.arrive(),
                                self.exports.clone(),
                                Arc::clone(&self.config),
                                self.tls.clone(),
                                shutdown.clone(),
                            )
                            .instrument(span),
                        );
                    }
                    Err(err) => {
                        // Out of descriptors and the like: back off rather than spin.
                        warn!(error = %err, "accept failed");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                },
            }
        }
        // Refuse new clients while the open connections drain.
        drop(listener);
        info!(%local, connections = connections.len(), "nbd server stopping");
        while let Some(joined) = connections.join_next().await {
            log_join(joined);
        }
        info!(%local, "nbd server stopped");
        Ok(())
    }
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(err) = joined
        && err.is_panic()
    {
        tracing::error!(error = %err, "connection task panicked");
    }
}

/// Serves raw image files, each as an export named after its file stem, until `shutdown`
/// is cancelled. Files that cannot be opened for writing are served read-only.
pub async fn serve_files(
    listener: TcpListener,
    paths: Vec<std::path::PathBuf>,
    shutdown: CancellationToken,
) -> Result<(), NbdError> {
    let exports = Exports::new();
    for path in paths {
        let name = path
            .file_stem()
            .and_then(|stem| stem.to_str())
            .ok_or_else(|| NbdError::InvalidExportName {
                name: path.display().to_string(),
                reason: "file stem is empty or not utf-8",
            })?
            .to_owned();
        let device = match crate::file::FileDevice::open(&path) {
            Ok(device) => device,
            Err(NbdError::File { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                warn!(path = %path.display(), "file is not writable; serving it read-only");
                crate::file::FileDevice::open_read_only(&path)?
            }
            Err(err) => return Err(err),
        };
        exports.insert(name, Arc::new(device))?;
    }
    NbdServer::new(exports).serve(listener, shutdown).await
}

async fn run_connection(
    stream: Accepted,
    pending: tandem_net::Pending,
    exports: Exports,
    config: Arc<ServerConfig>,
    tls: Option<TlsRequired>,
    shutdown: CancellationToken,
) {
    match serve_connection(stream, pending, exports, config, tls, shutdown).await {
        Ok(()) => debug!("connection closed"),
        Err(NbdError::Protocol(err)) => {
            warn!(error = %err, "protocol violation; connection closed");
        }
        Err(NbdError::Io(err)) => debug!(error = %err, "connection closed by io error"),
        Err(NbdError::Disconnected) => debug!("client left during the handshake"),
        Err(NbdError::HandshakeTimeout) => debug!("handshake timed out or shed"),
        Err(err) => warn!(error = %err, "connection closed"),
    }
}

async fn serve_connection(
    stream: Accepted,
    pending: tandem_net::Pending,
    exports: Exports,
    config: Arc<ServerConfig>,
    tls: Option<TlsRequired>,
    shutdown: CancellationToken,
) -> Result<(), NbdError> {
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let handshake = tokio::time::timeout(
        pending.handshake_timeout(),
        handshake(stream, &mut input, &exports, &config, tls),
    );
    // A connection that does not finish its handshake (TLS included) in time, or is shed
    // for a newer one meanwhile, is closed: idle connections cannot keep clients out.
    let selected = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        () = pending.shed().cancelled() => return Err(NbdError::HandshakeTimeout),
        result = handshake => result.map_err(|_| NbdError::HandshakeTimeout)??,
    };
    let Some((
        stream,
        Selected {
            name,
            export,
            entry,
        },
    )) = selected
    else {
        debug!("client aborted the handshake");
        return Ok(());
    };
    let Some(_active) = pending.admit() else {
        return Err(NbdError::TooManyConnections);
    };
    let span = tracing::info_span!("export", export = %name);
    async move {
        match stream {
            Negotiated::Tcp(s) => {
                let (rd, wr) = s.into_split();
                transmission(rd, wr, input, export, entry, config, shutdown).await
            }
            Negotiated::Unix(s) => {
                let (rd, wr) = s.into_split();
                transmission(rd, wr, input, export, entry, config, shutdown).await
            }
            Negotiated::Tls(s) => {
                let (rd, wr) = tokio::io::split(s);
                transmission(rd, wr, input, export, entry, config, shutdown).await
            }
        }
    }
    .instrument(span)
    .await
}

/// The export a client chose.
struct Selected {
    name: String,
    export: ExportDescription,
    entry: Arc<ExportEntry>,
}

/// What one run of [`negotiate`] ended with.
enum Step {
    Selected(Selected),
    Aborted,
    StartTls,
}

/// The whole handshake of a connection: the greeting, the options and, where the server
/// requires TLS, the upgrade; answers the stream the transmission goes on, or None when
/// the client aborted.
async fn handshake(
    stream: Accepted,
    input: &mut BytesMut,
    exports: &Exports,
    config: &ServerConfig,
    tls: Option<TlsRequired>,
) -> Result<Option<(Negotiated, Selected)>, NbdError> {
    let policy = match (&stream, &tls) {
        (Accepted::Tcp(_), Some(_)) => TlsPolicy::Required,
        _ => TlsPolicy::Off,
    };
    let mut negotiation = Negotiation::with_tls(config.max_payload, policy);
    let mut greeting = BytesMut::with_capacity(32);
    Negotiation::greeting(&mut greeting);
    let mut tcp = match stream {
        Accepted::Unix(mut s) => {
            s.write_all(&greeting).await?;
            return Ok(
                match negotiate(&mut s, input, &mut negotiation, exports).await? {
                    Step::Selected(chosen) => Some((Negotiated::Unix(s), chosen)),
                    Step::Aborted => None,
                    Step::StartTls => return Err(ProtocolError::Finished.into()),
                },
            );
        }
        Accepted::Tcp(s) => s,
    };
    tcp.set_nodelay(true)?;
    tcp.write_all(&greeting).await?;
    let step = negotiate(&mut tcp, input, &mut negotiation, exports).await?;
    let (step, stream) = match (step, tls) {
        (Step::StartTls, Some(TlsRequired(acceptor))) => {
            if !input.is_empty() {
                return Err(ProtocolError::PlaintextAfterStartTls(input.len()).into());
            }
            let mut tls = acceptor.accept(tcp).await?;
            let step = negotiate(&mut tls, input, &mut negotiation, exports).await?;
            (step, Negotiated::Tls(tls))
        }
        (step, _) => (step, Negotiated::Tcp(tcp)),
    };
    match step {
        Step::Selected(chosen) => Ok(Some((stream, chosen))),
        Step::Aborted => Ok(None),
        // A second STARTTLS is refused by the negotiation; one without TLS configured too.
        Step::StartTls => Err(ProtocolError::Finished.into()),
    }
}

/// Runs the option haggling on `io` until the client chose an export, aborted, or asked
/// for TLS.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    input: &mut BytesMut,
    negotiation: &mut Negotiation,
    exports: &Exports,
) -> Result<Step, NbdError> {
    let mut out = BytesMut::with_capacity(256);
    loop {
        let event = negotiation.advance(input, exports, &mut out);
        if !out.is_empty() {
            io.write_all(&out).await?;
            io.flush().await?;
            out.clear();
        }
        match event? {
            NegotiationEvent::NeedMore(more) => {
                input.reserve(more);
                if io.read_buf(input).await? == 0 {
                    return Err(NbdError::Disconnected);
                }
            }
            NegotiationEvent::Transmission {
                name,
                export,
                handle,
            } => {
                return Ok(Step::Selected(Selected {
                    name,
                    export,
                    entry: handle,
                }));
            }
            NegotiationEvent::Aborted => return Ok(Step::Aborted),
            NegotiationEvent::StartTls => return Ok(Step::StartTls),
        }
    }
}

/// A reply on its way to the writer. The permit returns the request's budget once the
/// reply is written.
struct Reply {
    cookie: Cookie,
    error: ErrorCode,
    data: Option<Bytes>,
    _permit: Option<OwnedSemaphorePermit>,
}

async fn transmission<R, W>(
    mut rd: R,
    wr: W,
    input: BytesMut,
    export: ExportDescription,
    entry: Arc<ExportEntry>,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let _connection = entry.counters.connection_opened();
    info!(
        size = export.size,
        read_only = export.read_only,
        "client entered transmission"
    );
    let writer_failed = CancellationToken::new();
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = StopSignals {
        shutdown: shutdown.clone(),
        removed: entry.removed.clone(),
        writer_failed: writer_failed.clone(),
    };
    // The writer runs as its own task so that, under load, replies go out on another
    // core while this one reads and dispatches; it is aborted if this future is dropped.
    let writer = tandem_runtime::scoped(write_replies(wr, rx, writer_failed).in_current_span());
    let both = async {
        let reader = read_requests(
            &mut rd,
            input,
            export,
            Arc::clone(&entry),
            &config,
            tx,
            stop,
        );
        let (read, write) = tokio::join!(reader, writer);
        if matches!(
            read,
            Err(NbdError::Protocol(ProtocolError::PayloadTooLarge { .. }))
        ) {
            linger(&mut rd, config.max_payload).await;
        }
        (
            read,
            write.unwrap_or_else(|err| Err(NbdError::Io(std::io::Error::other(err)))),
        )
    };
    let hard_stop = async {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = entry.removed.cancelled() => {}
        }
        tokio::time::sleep(config.shutdown_grace).await;
    };
    tokio::select! {
        (read, write) = both => {
            read?;
            write?;
            Ok(())
        }
        () = hard_stop => {
            warn!(grace = ?config.shutdown_grace, "connection did not finish in time; dropping it");
            Ok(())
        }
    }
}

struct StopSignals {
    shutdown: CancellationToken,
    removed: CancellationToken,
    writer_failed: CancellationToken,
}

impl StopSignals {
    async fn stopped(&self) -> &'static str {
        tokio::select! {
            () = self.shutdown.cancelled() => "server shutting down",
            () = self.removed.cancelled() => "export removed",
            () = self.writer_failed.cancelled() => "reply stream failed",
        }
    }
}

/// After refusing a request whose payload cannot be trusted, the reply and the FIN have
/// been sent; closing now, with the client's payload unread, would make the kernel reset
/// the connection, which can destroy the reply before the client reads it. So read and
/// discard for a little while (or up to `limit` bytes, or until the client closes) first.
async fn linger<R: AsyncRead + Unpin>(rd: &mut R, limit: u32) {
    let mut sink = vec![0u8; 64 * 1024];
    let mut left = u64::from(limit) + 64 * 1024;
    let drain = async {
        while left > 0 {
            match rd.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n as u64),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

async fn read_requests<R: AsyncRead + Unpin>(
    rd: &mut R,
    mut input: BytesMut,
    export: ExportDescription,
    entry: Arc<ExportEntry>,
    config: &ServerConfig,
    tx: mpsc::UnboundedSender<Reply>,
    stop: StopSignals,
) -> Result<(), NbdError> {
    let mut decoder = RequestDecoder::new(export, config.max_payload);
    let budget = Arc::new(Semaphore::new(config.budget_units()));
    let buffers = Arc::new(BufferPool::default());
    let mut inflight = FuturesUnordered::new();
    // A decoded request waiting for budget.
    let mut waiting: Option<(Cookie, Command)> = None;
    // A large write payload being read straight into a reusable buffer.
    let mut direct: Option<DirectPayload> = None;
    let result = loop {
        if waiting.is_none() {
            let next = match direct.take() {
                Some(payload) if payload.is_full() => {
                    decoder.finish_payload(payload.freeze()).map(Some)
                }
                Some(payload) => {
                    direct = Some(payload);
                    Ok(None)
                }
                None => decoder.decode(&mut input),
            };
            match next {
                Ok(Some(Decoded::Request { cookie, command })) => {
                    let units = budget_units(&command);
                    match Arc::clone(&budget).try_acquire_many_owned(units) {
                        Ok(permit) => {
                            inflight.push(execute(
                                Arc::clone(&entry),
                                command,
                                pending_reply(&tx, cookie, permit),
                            ));
                        }
                        Err(_) => waiting = Some((cookie, command)),
                    }
                    continue;
                }
                Ok(Some(Decoded::Reject {
                    cookie,
                    kind,
                    error,
                })) => {
                    debug!(%cookie, kind = command_name(kind), %error, "request refused");
                    entry.counters.record(op_kind(kind), false, 0, false);
                    send_error(&tx, cookie, error);
                    continue;
                }
                Ok(Some(Decoded::RejectAndClose { cookie, reason })) => {
                    entry.counters.record(OpKind::Write, false, 0, false);
                    send_error(&tx, cookie, ErrorCode::EINVAL);
                    break Err(NbdError::Protocol(reason));
                }
                Ok(Some(Decoded::Disconnect)) => {
                    debug!("client sent disconnect");
                    break Ok(());
                }
                Ok(None) if direct.is_some() => {}
                Ok(None) => match decoder.pending_payload() {
                    Some(len) if len >= DIRECT_PAYLOAD_MIN => {
                        // The decoder returned without consuming, so `input` holds less
                        // than the payload, and all of it is payload.
                        let mut buffer = buffers.take(len);
                        let have = input.len().min(len);
                        buffer.data[..have].copy_from_slice(&input[..have]);
                        input.advance(have);
                        direct = Some(DirectPayload {
                            buffer,
                            filled: have,
                        });
                    }
                    _ => {
                        let missing = decoder.frame_len().saturating_sub(input.len());
                        input.reserve(missing.max(READ_CHUNK));
                    }
                },
                Err(err) => break Err(err.into()),
            }
        }
        let units = waiting
            .as_ref()
            .map_or(0, |(_, command)| budget_units(command));
        tokio::select! {
            biased;
            reason = stop.stopped() => {
                debug!(reason, "stopped reading requests");
                break Ok(());
            }
            Some(()) = inflight.next(), if !inflight.is_empty() => {}
            permit = Arc::clone(&budget).acquire_many_owned(units), if waiting.is_some() => {
                let (Ok(permit), Some((cookie, command))) = (permit, waiting.take()) else {
                    // The semaphore is never closed.
                    break Ok(());
                };
                inflight.push(execute(Arc::clone(&entry), command, pending_reply(&tx, cookie, permit)));
            }
            read = read_some(rd, &mut input, direct.as_mut()), if waiting.is_none() => match read {
                Ok(0) => {
                    let pending = input.len() + direct.as_ref().map_or(0, |d| d.filled);
                    if pending == 0 {
                        debug!("client closed the connection");
                    } else {
                        info!(pending, "client closed the connection mid-request");
                    }
                    break Ok(());
                }
                Ok(_) => {}
                Err(err) => break Err(err.into()),
            },
        }
    };
    // Finish what is in flight so that every accepted request gets its reply.
    while inflight.next().await.is_some() {}
    drop(tx);
    result
}

/// Reads from the socket into the direct payload if one is being read, else into `input`.
async fn read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    input: &mut BytesMut,
    direct: Option<&mut DirectPayload>,
) -> std::io::Result<usize> {
    match direct {
        Some(payload) => {
            let n = rd.read(&mut payload.buffer.data[payload.filled..]).await?;
            payload.filled += n;
            Ok(n)
        }
        None => rd.read_buf(&mut (&mut *input).limit(READ_CHUNK)).await,
    }
}

/// A write payload read straight from the socket into a pooled buffer.
struct DirectPayload {
    buffer: PooledBuffer,
    filled: usize,
}

impl DirectPayload {
    fn is_full(&self) -> bool {
        self.filled == self.buffer.data.len()
    }

    fn freeze(self) -> Bytes {
        Bytes::from_owner(self.buffer)
    }
}

/// Large write payloads of one connection reuse a few buffers, which saves allocating,
/// page-faulting in and freeing a fresh buffer for every request.
#[derive(Default)]
struct BufferPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    fn take(self: &Arc<Self>, len: usize) -> PooledBuffer {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            free.iter()
                .position(|buffer| buffer.capacity() >= len)
                .map(|index| free.swap_remove(index))
        };
        let data = match reused {
            Some(mut data) => {
                data.resize(len, 0);
                data
            }
            None => vec![0; len],
        };
        PooledBuffer {
            data,
            pool: Arc::clone(self),
        }
    }
}

struct PooledBuffer {
    data: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        let mut free = self
            .pool
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let kept: usize = free.iter().map(Vec::capacity).sum();
        if kept + data.capacity() <= POOL_KEEP_BYTES {
            free.push(data);
        }
    }
}

fn pending_reply(
    tx: &mpsc::UnboundedSender<Reply>,
    cookie: Cookie,
    permit: OwnedSemaphorePermit,
) -> PendingReply {
    PendingReply {
        tx: Some(tx.clone()),
        cookie,
        permit: Some(permit),
    }
}

fn send_error(tx: &mpsc::UnboundedSender<Reply>, cookie: Cookie, error: ErrorCode) {
    // A send fails only when the writer is gone, and then the connection is closing.
    let _ = tx.send(Reply {
        cookie,
        error,
        data: None,
        _permit: None,
    });
}

fn budget_units(command: &Command) -> u32 {
    let bytes = match command {
        Command::Read { len, .. } => *len as usize,
        Command::Write { data, .. } => data.len(),
        _ => 0,
    };
    (1 + bytes / BUDGET_UNIT) as u32
}

fn op_kind(kind: u16) -> OpKind {
    match kind {
        cmd::READ => OpKind::Read,
        cmd::WRITE => OpKind::Write,
        cmd::FLUSH => OpKind::Flush,
        cmd::TRIM => OpKind::Trim,
        cmd::WRITE_ZEROES => OpKind::WriteZeroes,
        _ => OpKind::Other,
    }
}

fn command_name(kind: u16) -> &'static str {
    match kind {
        cmd::READ => "read",
        cmd::WRITE => "write",
        cmd::DISC => "disc",
        cmd::FLUSH => "flush",
        cmd::TRIM => "trim",
        cmd::CACHE => "cache",
        cmd::WRITE_ZEROES => "write_zeroes",
        cmd::BLOCK_STATUS => "block_status",
        _ => "unknown",
    }
}

/// Sends a request's reply exactly once: explicitly, or with `EIO` if the request's task
/// is dropped before it finished (a panicking or aborted device call).
struct PendingReply {
    tx: Option<mpsc::UnboundedSender<Reply>>,
    cookie: Cookie,
    permit: Option<OwnedSemaphorePermit>,
}

impl PendingReply {
    fn send(mut self, error: ErrorCode, data: Option<Bytes>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Reply {
                cookie: self.cookie,
                error,
                data,
                _permit: self.permit.take(),
            });
        }
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Reply {
                cookie: self.cookie,
                error: ErrorCode::EIO,
                data: None,
                _permit: self.permit.take(),
            });
        }
    }
}

/// Runs one request and sends its reply; a panicking device call is answered with `EIO`
/// (by `PendingReply`'s drop) instead of taking the connection down.
async fn execute(entry: Arc<ExportEntry>, command: Command, pending: PendingReply) {
    let name = command.name();
    let cookie = pending.cookie;
    if std::panic::AssertUnwindSafe(execute_inner(entry, command, pending))
        .catch_unwind()
        .await
        .is_err()
    {
        tracing::error!(%cookie, op = name, "device call panicked");
    }
}

async fn execute_inner(entry: Arc<ExportEntry>, command: Command, pending: PendingReply) {
    let device = &*entry.device;
    let (kind, fua, bytes) = match &command {
        Command::Read { len, .. } => (OpKind::Read, false, u64::from(*len)),
        Command::Write { data, fua, .. } => (OpKind::Write, *fua, data.len() as u64),
        Command::Flush => (OpKind::Flush, false, 0),
        Command::Trim { len, fua, .. } => (OpKind::Trim, *fua, u64::from(*len)),
        Command::WriteZeroes { len, fua, .. } => (OpKind::WriteZeroes, *fua, u64::from(*len)),
    };
    let name = command.name();
    let result = match command {
        Command::Read { len: 0, .. } => Ok(Some(Bytes::new())),
        Command::Read { offset, len } => match device.read(offset, len).await {
            Ok(data) if data.len() == len as usize => Ok(Some(data)),
            Ok(data) => Err(std::io::Error::other(format!(
                "device returned {} bytes for a read of {len}",
                data.len()
            ))),
            Err(err) => Err(err),
        },
        Command::Write { offset, data, fua } => {
            if data.is_empty() {
                Ok(None)
            } else {
                device.write(offset, data, fua).await.map(|()| None)
            }
        }
        Command::Flush => device.flush().await.map(|()| None),
        Command::Trim { len: 0, .. } | Command::WriteZeroes { len: 0, .. } => Ok(None),
        Command::Trim { offset, len, fua } => {
            let trimmed = device.trim(offset, u64::from(len)).await;
            match trimmed {
                Ok(()) if fua => device.flush().await.map(|()| None),
                other => other.map(|()| None),
            }
        }
        Command::WriteZeroes { offset, len, fua } => device
            .write_zeroes(offset, u64::from(len), fua)
            .await
            .map(|()| None),
    };
    match result {
        Ok(data) => {
            entry.counters.record(kind, fua, bytes, true);
            pending.send(ErrorCode::OK, data);
        }
        Err(err) => {
            let error = ErrorCode::from_io(&err);
            warn!(cookie = %pending.cookie, op = name, error = %err, reply = %error, "device request failed");
            entry.counters.record(kind, fua, bytes, false);
            pending.send(error, None);
        }
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    rx: mpsc::UnboundedReceiver<Reply>,
    failed: CancellationToken,
) -> Result<(), NbdError> {
    let result = write_replies_inner(wr, rx).await;
    if result.is_err() {
        failed.cancel();
    }
    result.map_err(NbdError::from)
}

async fn write_replies_inner<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            put_simple_reply(&mut out, reply.cookie, reply.error);
            match reply.data {
                Some(data) if data.len() > INLINE_DATA_MAX => {
                    let mut chain = Buf::chain(&out[..], &data[..]);
                    wr.write_all_buf(&mut chain).await?;
                    out.clear();
                }
                Some(data) => out.extend_from_slice(&data),
                None => {}
            }
            if out.len() >= WRITE_BATCH {
                wr.write_all(&out).await?;
                out.clear();
            }
            next = rx.try_recv().ok();
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            out.clear();
        }
        // Nothing more is ready: what a TLS stream still holds goes out now (a no-op on
        // a socket).
        wr.flush().await?;
    }
    wr.shutdown().await
}
