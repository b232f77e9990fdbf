//! A small async NBD client, for tests and the lab's workload generator.
//!
//! [`NbdClient::connect`] negotiates with `NBD_OPT_GO` (fixed newstyle, simple replies).
//! Requests take `&self`, so a caller pipelines by running several at once (for example
//! with `futures::future::join_all`): each request is written whole under a lock, and a
//! reader task owned by the client routes replies to their callers by cookie, in whatever
//! order the server sends them. The client does not check ranges against the export, so
//! tests can send out-of-range and oversized requests on purpose.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::{TcpStream, ToSocketAddrs, UnixStream},
    sync::oneshot,
};
use tokio_util::task::AbortOnDropHandle;

use crate::{
    error::NbdError,
    proto::{
        Cookie, ErrorCode, GREETING_LEN, IHAVEOPT, InfoRequest, NBD_MAGIC, OPTION_REPLY_HEADER_LEN,
        OptionReplyHeader, ProtocolError, RequestHeader, SIMPLE_REPLY_LEN, SimpleReply,
        client_flags, cmd, cmd_flags, handshake_flags, info, opt, put_option, rep,
        transmission_flags,
    },
};

/// Longest option reply the client accepts.
const MAX_OPTION_REPLY: u32 = 1024 * 1024;

/// What the server told the client about the export it connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum block size (1 when the server sent none).
    pub min_block: u32,
    /// Preferred block size (4096 when the server sent none).
    pub preferred_block: u32,
    /// Maximum payload (32 MiB when the server sent none).
    pub max_block: u32,
}

impl ExportInfo {
    /// Whether the export refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & transmission_flags::READ_ONLY != 0
    }
}

struct Pending {
    read_len: Option<u32>,
    tx: oneshot::Sender<Result<Bytes, NbdError>>,
}

#[derive(Default)]
struct PendingTable {
    map: HashMap<u64, Pending>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    table: Mutex<PendingTable>,
}

impl Shared {
    fn table(&self) -> std::sync::MutexGuard<'_, PendingTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn close(&self) {
        let mut table = self.table();
        table.closed = true;
        for (_, pending) in table.map.drain() {
            let _ = pending.tx.send(Err(NbdError::Disconnected));
        }
    }
}

/// A connection to one export of an NBD server.
pub struct NbdClient {
    info: ExportInfo,
    writer: tokio::sync::Mutex<WriteHalf>,
    shared: Arc<Shared>,
    broken: AtomicBool,
    next_cookie: AtomicU64,
    reader: AbortOnDropHandle<()>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("info", &self.info)
            .finish()
    }
}

impl NbdClient {
    /// Connects to `addr` and selects `export` with `NBD_OPT_GO`.
    pub async fn connect(addr: impl ToSocketAddrs, export: &str) -> Result<Self, NbdError> {
        let stream = TcpStream::connect(addr).await?;
        Self::connect_stream(stream, export).await
    }

    /// Connects to `endpoint`: a Unix socket path (absolute) or a plain TCP `host:port`.
    pub async fn connect_to(endpoint: &str, export: &str) -> Result<Self, NbdError> {
        if endpoint.starts_with('/') {
            let stream = UnixStream::connect(endpoint).await?;
            let (rd, wr) = stream.into_split();
            Self::negotiate(Box::new(rd), Box::new(wr), export).await
        } else {
            Self::connect(endpoint, export).await
        }
    }

    /// Connects to the export an `nbd://host:port/export` or
    /// `nbd+unix:///export?socket=PATH` URI names (the forms the managers list volumes in).
    pub async fn connect_uri(uri: &str) -> Result<Self, NbdError> {
        let bad = || NbdError::InvalidExportName {
            name: uri.to_string(),
            reason: "not an nbd://host:port/export or nbd+unix:///export?socket=PATH uri",
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
            let (export, socket) = rest.split_once("?socket=").ok_or_else(bad)?;
            if !socket.starts_with('/') {
                return Err(bad());
            }
            return Self::connect_to(socket, export).await;
        }
        let (addr, export) = uri
            .strip_prefix("nbd://")
            .and_then(|rest| rest.split_once('/'))
            .ok_or_else(bad)?;
        Self::connect(addr, export).await
    }

    /// Negotiates over an already connected stream.
    pub async fn connect_stream(stream: TcpStream, export: &str) -> Result<Self, NbdError> {
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        Self::negotiate(Box::new(rd), Box::new(wr), export).await
    }

    async fn negotiate(rd: ReadHalf, mut wr: WriteHalf, export: &str) -> Result<Self, NbdError> {
        let mut rd = BufReader::with_capacity(256 * 1024, rd);
        greet(&mut rd, &mut wr).await?;
        let mut data = BytesMut::new();
        InfoRequest {
            name: export.to_owned(),
            requests: vec![info::BLOCK_SIZE],
        }
        .encode(&mut data);
        send_option(&mut wr, opt::GO, &data).await?;
        let mut info = ExportInfo {
            name: export.to_owned(),
            size: 0,
            flags: 0,
            min_block: 1,
            preferred_block: 4096,
            max_block: 32 * 1024 * 1024,
        };
        let mut got_export = false;
        loop {
            let (header, mut payload) = read_option_reply(&mut rd, opt::GO).await?;
            match header.reply {
                rep::INFO => {
                    if payload.len() < 2 {
                        return Err(ProtocolError::MalformedReply("short info reply").into());
                    }
                    match payload.get_u16() {
                        info::EXPORT if payload.len() == 10 => {
                            info.size = payload.get_u64();
                            info.flags = payload.get_u16();
                            got_export = true;
                        }
                        info::BLOCK_SIZE if payload.len() == 12 => {
                            info.min_block = payload.get_u32();
                            info.preferred_block = payload.get_u32();
                            info.max_block = payload.get_u32();
                        }
                        _ => {}
                    }
                }
                rep::ACK if got_export => break,
                rep::ACK => {
                    return Err(ProtocolError::MalformedReply(
                        "go acknowledged without export info",
                    )
                    .into());
                }
                reply => return Err(refused(opt::GO, reply, &payload)),
            }
        }
        let shared = Arc::new(Shared::default());
        let reader = tandem_runtime::scoped(read_replies(rd, Arc::clone(&shared)));
        Ok(Self {
            info,
            writer: tokio::sync::Mutex::new(wr),
            shared,
            broken: AtomicBool::new(false),
            next_cookie: AtomicU64::new(1),
            reader,
        })
    }

    /// Lists the exports of the server at `addr` (`NBD_OPT_LIST`, then `NBD_OPT_ABORT`).
    pub async fn list_exports(addr: impl ToSocketAddrs) -> Result<Vec<String>, NbdError> {
        let (rd, wr) = TcpStream::connect(addr).await?.into_split();
        Self::list(Box::new(rd), Box::new(wr)).await
    }

    /// [`NbdClient::list_exports`] of the server at `endpoint` (a Unix socket path or a
    /// plain TCP `host:port`).
    pub async fn list_exports_at(endpoint: &str) -> Result<Vec<String>, NbdError> {
        if endpoint.starts_with('/') {
            let (rd, wr) = UnixStream::connect(endpoint).await?.into_split();
            Self::list(Box::new(rd), Box::new(wr)).await
        } else {
            Self::list_exports(endpoint).await
        }
    }

    async fn list(rd: ReadHalf, mut wr: WriteHalf) -> Result<Vec<String>, NbdError> {
        let mut rd = BufReader::new(rd);
        greet(&mut rd, &mut wr).await?;
        send_option(&mut wr, opt::LIST, &[]).await?;
        let mut names = Vec::new();
        loop {
            let (header, mut payload) = read_option_reply(&mut rd, opt::LIST).await?;
            match header.reply {
                rep::SERVER => {
                    if payload.len() < 4 {
                        return Err(ProtocolError::MalformedReply("short server reply").into());
                    }
                    let len = payload.get_u32() as usize;
                    if len > payload.len() {
                        return Err(
                            ProtocolError::MalformedReply("export name overruns reply").into()
                        );
                    }
                    names.push(String::from_utf8_lossy(&payload[..len]).into_owned());
                }
                rep::ACK => break,
                reply => return Err(refused(opt::LIST, reply, &payload)),
            }
        }
        send_option(&mut wr, opt::ABORT, &[]).await?;
        // The server acknowledges the abort and closes; either outcome is fine.
        let _ = read_option_reply(&mut rd, opt::ABORT).await;
        Ok(names)
    }

    /// What the server said about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdError> {
        self.request(cmd::READ, 0, offset, len, None).await
    }

    /// Writes `data` at `offset`; with `fua`, the server makes it durable before replying.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), NbdError> {
        let len = u32::try_from(data.len()).map_err(|_| {
            NbdError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "write payload over 4 GiB",
            ))
        })?;
        let flags = if fua { cmd_flags::FUA } else { 0 };
        self.request(cmd::WRITE, flags, offset, len, Some(data))
            .await
            .map(drop)
    }

    /// Asks the server to make every completed write durable.
    pub async fn flush(&self) -> Result<(), NbdError> {
        self.request(cmd::FLUSH, 0, 0, 0, None).await.map(drop)
    }

    /// Discards a range (it reads back as zeroes from this crate's devices).
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.request(cmd::TRIM, 0, offset, len, None)
            .await
            .map(drop)
    }

    /// Writes `len` zero bytes at `offset`.
    pub async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), NbdError> {
        let flags = if fua { cmd_flags::FUA } else { 0 };
        self.request(cmd::WRITE_ZEROES, flags, offset, len, None)
            .await
            .map(drop)
    }

    /// Sends a request with any command type and flags, for tests of the server's
    /// validation. A `payload` is sent after the header (its length is not checked against
    /// `len`); a successful reply carries `read_len` bytes of data.
    pub async fn raw_request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<Bytes>,
        read_len: Option<u32>,
    ) -> Result<Bytes, NbdError> {
        self.send(kind, flags, offset, len, payload, read_len).await
    }

    /// Sends `NBD_CMD_DISC` and waits for the server to close the connection.
    pub async fn disconnect(self) -> Result<(), NbdError> {
        {
            let mut writer = self.writer.lock().await;
            let mut header = BytesMut::with_capacity(28);
            RequestHeader {
                flags: 0,
                kind: cmd::DISC,
                cookie: Cookie(0),
                offset: 0,
                length: 0,
            }
            .encode(&mut header);
            writer.write_all(&header).await?;
            writer.shutdown().await?;
        }
        let _ = self.reader.await;
        Ok(())
    }

    async fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<Bytes>,
    ) -> Result<Bytes, NbdError> {
        let read_len = (kind == cmd::READ).then_some(len);
        self.send(kind, flags, offset, len, payload, read_len).await
    }

    async fn send(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<Bytes>,
        read_len: Option<u32>,
    ) -> Result<Bytes, NbdError> {
        if self.broken.load(Ordering::Acquire) {
            return Err(NbdError::Disconnected);
        }
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut table = self.shared.table();
            if table.closed {
                return Err(NbdError::Disconnected);
            }
            table.map.insert(cookie, Pending { read_len, tx });
        }
        let mut header = BytesMut::with_capacity(28);
        RequestHeader {
            flags,
            kind,
            cookie: Cookie(cookie),
            offset,
            length: len,
        }
        .encode(&mut header);
        let sent = {
            let mut writer = self.writer.lock().await;
            // If this future is dropped mid-write the stream is torn: mark it broken.
            let mut guard = BrokenOnDrop {
                flag: &self.broken,
                armed: true,
            };
            let result = match payload {
                Some(payload) => {
                    let mut chain = header.freeze().chain(payload);
                    writer.write_all_buf(&mut chain).await
                }
                None => writer.write_all(&header).await,
            };
            guard.armed = false;
            result
        };
        if let Err(err) = sent {
            self.broken.store(true, Ordering::Release);
            self.shared.table().map.remove(&cookie);
            return Err(err.into());
        }
        rx.await.unwrap_or(Err(NbdError::Disconnected))
    }
}

struct BrokenOnDrop<'a> {
    flag: &'a AtomicBool,
    armed: bool,
}

impl Drop for BrokenOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.flag.store(true, Ordering::Release);
        }
    }
}

async fn greet<R, W>(rd: &mut R, wr: &mut W) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = [0u8; GREETING_LEN];
    rd.read_exact(&mut greeting)
        .await
        .map_err(eof_is_disconnect)?;
    let mut buf = &greeting[..];
    let magic = buf.get_u64();
    let opt_magic = buf.get_u64();
    let flags = buf.get_u16();
    if magic != NBD_MAGIC {
        return Err(ProtocolError::BadReplyMagic(magic).into());
    }
    if opt_magic != IHAVEOPT {
        return Err(ProtocolError::BadReplyMagic(opt_magic).into());
    }
    if flags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError::MalformedReply("server does not speak fixed newstyle").into());
    }
    let mut reply = client_flags::FIXED_NEWSTYLE;
    if flags & handshake_flags::NO_ZEROES != 0 {
        reply |= client_flags::NO_ZEROES;
    }
    wr.write_all(&reply.to_be_bytes()).await?;
    Ok(())
}

async fn send_option<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let mut buf = BytesMut::with_capacity(16 + data.len());
    put_option(&mut buf, option, data);
    wr.write_all(&buf).await?;
    Ok(())
}

async fn read_option_reply<R: AsyncRead + Unpin>(
    rd: &mut R,
    option: u32,
) -> Result<(OptionReplyHeader, Bytes), NbdError> {
    let mut raw = [0u8; OPTION_REPLY_HEADER_LEN];
    rd.read_exact(&mut raw).await.map_err(eof_is_disconnect)?;
    let header = OptionReplyHeader::decode(&raw)?;
    if header.option != option {
        return Err(ProtocolError::MalformedReply("reply to a different option").into());
    }
    if header.len > MAX_OPTION_REPLY {
        return Err(ProtocolError::MalformedReply("option reply too long").into());
    }
    let mut payload = BytesMut::zeroed(header.len as usize);
    rd.read_exact(&mut payload)
        .await
        .map_err(eof_is_disconnect)?;
    Ok((header, payload.freeze()))
}

fn refused(option: u32, reply: u32, payload: &[u8]) -> NbdError {
    if reply & rep::ERR_BIT == 0 {
        return ProtocolError::MalformedReply("unexpected option reply type").into();
    }
    NbdError::OptionRefused {
        option,
        reply,
        message: String::from_utf8_lossy(payload).into_owned(),
    }
}

fn eof_is_disconnect(err: std::io::Error) -> NbdError {
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        NbdError::Disconnected
    } else {
        NbdError::Io(err)
    }
}

/// The URI of `export` at `endpoint` (a Unix socket path or a plain TCP `host:port`), as
/// [`NbdClient::connect_uri`], qemu and libnbd take it.
pub fn endpoint_uri(endpoint: &str, export: &str) -> String {
    if endpoint.starts_with('/') {
        format!("nbd+unix:///{export}?socket={endpoint}")
    } else {
        format!("nbd://{endpoint}/{export}")
    }
}

/// The client's halves of its connection (TCP or a Unix socket).
type ReadHalf = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type WriteHalf = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

async fn read_replies(mut rd: BufReader<ReadHalf>, shared: Arc<Shared>) {
    let result = read_replies_inner(&mut rd, &shared).await;
    if let Err(err) = result {
        tracing::debug!(error = %err, "nbd client reply stream ended");
    }
    shared.close();
}

async fn read_replies_inner(rd: &mut BufReader<ReadHalf>, shared: &Shared) -> Result<(), NbdError> {
    let mut raw = [0u8; SIMPLE_REPLY_LEN];
    loop {
        rd.read_exact(&mut raw).await.map_err(eof_is_disconnect)?;
        let reply = SimpleReply::decode(&raw)?;
        let pending = shared
            .table()
            .map
            .remove(&reply.cookie.0)
            .ok_or(ProtocolError::MalformedReply("reply to an unknown cookie"))?;
        let result = if reply.error != ErrorCode::OK {
            Err(NbdError::Remote(reply.error))
        } else if let Some(len) = pending.read_len {
            let mut data = BytesMut::zeroed(len as usize);
            rd.read_exact(&mut data).await.map_err(eof_is_disconnect)?;
            Ok(data.freeze())
        } else {
            Ok(Bytes::new())
        };
        let _ = pending.tx.send(result);
    }
}

/// Encodes a request header (for tests that speak raw bytes).
pub fn encode_request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Bytes {
    let mut buf = BytesMut::with_capacity(28);
    RequestHeader {
        flags,
        kind,
        cookie: Cookie(cookie),
        offset,
        length: len,
    }
    .encode(&mut buf);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_uri_that_is_not_nbd_is_refused_before_any_connection() {
        for uri in [
            "http://127.0.0.1:1/x",
            "nbd://127.0.0.1:1",
            "vm-0/0",
            "nbd+unix:///vm-0/0",
            "nbd+unix:///vm-0/0?socket=relative.sock",
        ] {
            let e = NbdClient::connect_uri(uri).await.expect_err(uri);
            assert!(
                matches!(e, NbdError::InvalidExportName { .. }),
                "{uri}: {e}"
            );
        }
    }
}
