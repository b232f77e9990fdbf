//! TLS 1.3 connections whose records this crate seals and opens itself. rustls runs the
//! handshake (its unbuffered API) and then hands over the traffic keys and the key
//! schedule (its kernel-connection API, made for kTLS); [`TlsStream`] encrypts and
//! decrypts the application records with ring's AEAD in buffers it keeps for the life of
//! the connection. rustls's own stream allocates a buffer per record each way and copies
//! received data twice more, which cost a replication stream more CPU than AES itself.
//!
//! What this layer takes over from rustls after the handshake, per RFC 8446: the record
//! framing (at most 2^14 bytes of plaintext per record, the inner content type, padding),
//! the per-record nonce, key updates both ways (answering one the peer requests, and
//! updating its own sending keys before the cipher suite's confidentiality limit),
//! session tickets (given to rustls on a client), and close_notify. Anything else after
//! the handshake ends the connection with an error.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use ring::aead;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::crypto::cipher::{Iv, Nonce};
use rustls::kernel::KernelConnection;
use rustls::pki_types::CertificateDer;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Most plaintext in one record.
const MAX_FRAGMENT: usize = 1 << 14;
/// Record header: content type, legacy version, length.
const HEADER: usize = 5;
/// AEAD tag of every suite TLS 1.3 has.
const TAG: usize = 16;
/// Largest record body a peer may send (RFC 8446 5.2: plaintext + 256).
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
/// Read buffer of a new connection: room for two full records.
const READ_BUFFER_MIN: usize = 2 * (HEADER + MAX_CIPHERTEXT);
/// A connection whose reads fill its buffer grows it up to 16 records (a replication
/// stream's receiver then makes a syscall per 256 KiB or so); a quiet one stays small.
const READ_BUFFER_MAX: usize = 16 * (HEADER + MAX_CIPHERTEXT);
/// Largest handshake flight accepted (certificate chains of a few certificates).
const MAX_HANDSHAKE_BUFFER: usize = 256 << 10;
/// A read with room for this much plaintext opens records in the reader's buffer.
const DIRECT_READ_MIN: usize = 4 * MAX_FRAGMENT;

const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;
const ALERT_CLOSE_NOTIFY: u8 = 0;

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// One direction's key and where it is in its sequence.
struct Direction {
    key: aead::LessSafeKey,
    iv: Iv,
    seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Self> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(invalid("tls: a cipher suite this layer does not run")),
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| invalid("tls: traffic key of the wrong length"))?;
        Ok(Self {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record, which then counts as used.
    fn next_nonce(&mut self) -> io::Result<aead::Nonce> {
        let nonce = Nonce::new(&self.iv, self.seq).0;
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| invalid("tls: record sequence exhausted"))?;
        Ok(aead::Nonce::assume_unique_for_key(nonce))
    }
}

/// rustls's side of the connection after the handshake: the key schedule.
enum Keys {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Keys {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Keys::Client(k) => k.update_tx_secret(),
            Keys::Server(k) => k.update_tx_secret(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Keys::Client(k) => k.update_rx_secret(),
            Keys::Server(k) => k.update_rx_secret(),
        }
    }

    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Keys::Client(k) => k.negotiated_cipher_suite(),
            Keys::Server(k) => k.negotiated_cipher_suite(),
        }
    }
}

/// A TLS 1.3 connection over TCP after its handshake.
pub struct TlsStream {
    io: TcpStream,
    keys: Keys,
    tx: Direction,
    rx: Direction,
    /// Sending keys are updated once this many records have been sealed with them.
    tx_limit: u64,
    peer_certificates: Vec<CertificateDer<'static>>,
    /// Received bytes: `rbuf[rstart..rend]` not yet taken; `rbuf[plain]` is decrypted
    /// application data not yet read.
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    plain: std::ops::Range<usize>,
    /// Sealed records not yet written: `wbuf[wstart..]`.
    wbuf: Vec<u8>,
    wstart: usize,
    /// The peer sent close_notify.
    read_closed: bool,
    /// close_notify is sealed (no more application data).
    write_closed: bool,
    /// A received record was refused: nothing after it can be trusted or read.
    read_failed: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("io", &self.io)
            .field("tx_seq", &self.tx.seq)
            .field("rx_seq", &self.rx.seq)
            .finish_non_exhaustive()
    }
}

/// The two kinds of unbuffered connection, driven by one handshake loop.
trait Handshaking: Sized {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// The peer's certificate chain, once the handshake is done.
    fn peer(&self) -> Vec<CertificateDer<'static>>;
    /// The traffic keys and the key schedule, once the handshake is done.
    fn into_keys(self) -> Result<(rustls::ExtractedSecrets, Keys), rustls::Error>;
}

macro_rules! handshaking {
    ($conn:ty, $data:ty, $keys:ident) => {
        impl Handshaking for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn peer(&self) -> Vec<CertificateDer<'static>> {
                self.peer_certificates()
                    .map(<[_]>::to_vec)
                    .unwrap_or_default()
            }
            fn into_keys(self) -> Result<(rustls::ExtractedSecrets, Keys), rustls::Error> {
                let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
                Ok((secrets, Keys::$keys(kernel)))
            }
        }
    };
}
handshaking!(UnbufferedClientConnection, ClientConnectionData, Client);
handshaking!(UnbufferedServerConnection, ServerConnectionData, Server);

/// What the handshake leaves behind besides the connection: bytes received past it and
/// application data rustls already opened.
struct Leftover {
    received: Vec<u8>,
    plaintext: Vec<u8>,
}

/// Runs the handshake of `conn` over `io` until application data may flow.
async fn handshake<C: Handshaking>(io: &mut TcpStream, conn: &mut C) -> io::Result<Leftover> {
    let mut incoming = vec![0u8; 8 << 10];
    let mut filled = 0;
    let mut outgoing: Vec<u8> = Vec::new();
    let mut plaintext = Vec::new();
    loop {
        enum Next {
            Process,
            Transmit,
            Read,
            Done,
        }
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..filled]);
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                incoming.copy_within(discard..filled, 0);
                send_alert(io, conn, &mut incoming[..filled - discard]).await;
                return Err(invalid(e));
            }
        };
        let next = match state {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(invalid)?;
                    discard += record.discard;
                    plaintext.extend_from_slice(record.payload);
                }
                Next::Process
            }
            ConnectionState::EncodeTlsData(mut data) => {
                encode(&mut data, &mut outgoing)?;
                Next::Process
            }
            ConnectionState::TransmitTlsData(data) => {
                data.done();
                Next::Transmit
            }
            ConnectionState::BlockedHandshake => Next::Read,
            ConnectionState::WriteTraffic(_) => Next::Done,
            other => return Err(invalid(format!("tls: {other:?} during the handshake"))),
        };
        incoming.copy_within(discard..filled, 0);
        filled -= discard;
        match next {
            Next::Process => {}
            Next::Transmit => {
                io.write_all(&outgoing).await?;
                outgoing.clear();
            }
            Next::Read => {
                if filled == incoming.len() {
                    if incoming.len() >= MAX_HANDSHAKE_BUFFER {
                        return Err(invalid("tls: handshake message too large"));
                    }
                    incoming.resize(incoming.len() * 2, 0);
                }
                let n = io.read(&mut incoming[filled..]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tls: connection closed during the handshake",
                    ));
                }
                filled += n;
            }
            Next::Done => {
                if !outgoing.is_empty() {
                    io.write_all(&outgoing).await?;
                }
                incoming.truncate(filled);
                return Ok(Leftover {
                    received: incoming,
                    plaintext,
                });
            }
        }
    }
}

/// Appends the handshake record `data` holds to `outgoing`.
fn encode<D>(
    data: &mut rustls::unbuffered::EncodeTlsData<'_, D>,
    outgoing: &mut Vec<u8>,
) -> io::Result<()> {
    let at = outgoing.len();
    let mut room = 4096;
    loop {
        outgoing.resize(at + room, 0);
        match data.encode(&mut outgoing[at..]) {
            Ok(n) => {
                outgoing.truncate(at + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(need)) => room = need.required_size,
            Err(e) => return Err(invalid(e)),
        }
    }
}

/// After a failed handshake, sends the alert rustls queued (a refused certificate, say)
/// so that the peer learns why; best effort, as the connection is dropped after.
async fn send_alert<C: Handshaking>(io: &mut TcpStream, conn: &mut C, incoming: &mut [u8]) {
    let mut outgoing = Vec::new();
    let mut filled = incoming.len();
    for _ in 0..4 {
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming[..filled]);
        let done = match state {
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                encode(&mut data, &mut outgoing).is_err()
            }
            Ok(ConnectionState::TransmitTlsData(data)) => {
                data.done();
                false
            }
            _ => true,
        };
        incoming.copy_within(discard..filled, 0);
        filled -= discard;
        if done {
            break;
        }
    }
    if !outgoing.is_empty() {
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(1), io.write_all(&outgoing)).await;
    }
}

/// How many records one set of sending keys seals: well inside the suite's
/// confidentiality limit (2^24.5 records for AES-GCM), as rustls keeps it.
fn tx_limit(keys: &Keys) -> io::Result<u64> {
    match keys.suite() {
        SupportedCipherSuite::Tls13(s) => Ok(s
            .common
            .confidentiality_limit
            .saturating_sub(1 << 16)
            .max(1)),
        #[allow(unreachable_patterns)]
        _ => Err(invalid("tls: only TLS 1.3 runs here")),
    }
}

/// The client side: handshake with `config` over `io`, then records of our own.
pub async fn connect(
    config: std::sync::Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
    io: TcpStream,
) -> io::Result<TlsStream> {
    establish(
        io,
        UnbufferedClientConnection::new(config, name).map_err(invalid)?,
    )
    .await
}

/// The server side: handshake with `config` over `io`, then records of our own.
pub async fn accept(
    config: std::sync::Arc<rustls::ServerConfig>,
    io: TcpStream,
) -> io::Result<TlsStream> {
    establish(
        io,
        UnbufferedServerConnection::new(config).map_err(invalid)?,
    )
    .await
}

async fn establish<C: Handshaking>(mut io: TcpStream, mut conn: C) -> io::Result<TlsStream> {
    let leftover = handshake(&mut io, &mut conn).await?;
    let peer = conn.peer();
    let (secrets, keys) = conn.into_keys().map_err(invalid)?;
    TlsStream::new(io, keys, secrets, peer, leftover)
}

/// The record starting at `bytes[0]`: its header and its whole length (header
/// included), once its header is there; the record may not all be there yet.
fn parse_header(bytes: &[u8]) -> io::Result<Option<([u8; HEADER], usize)>> {
    let Some(h) = bytes.get(..HEADER) else {
        return Ok(None);
    };
    let header = [h[0], h[1], h[2], h[3], h[4]];
    if header[0] != CONTENT_APPLICATION_DATA || header[1] != 3 {
        return Err(invalid(format!(
            "tls: unexpected record type {} after the handshake",
            header[0]
        )));
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
        return Err(invalid(format!("tls: record of {len} bytes")));
    }
    Ok(Some((header, HEADER + len)))
}

/// Opens the record body at `in_out[src..]` (after its header) into the start of
/// `in_out`; answers its content type and its payload's length.
fn open_at(
    rx: &mut Direction,
    header: [u8; HEADER],
    in_out: &mut [u8],
    src: usize,
) -> io::Result<(u8, usize)> {
    let nonce = rx.next_nonce()?;
    let opened = rx
        .key
        .open_within(nonce, aead::Aad::from(header), in_out, src..)
        .map_err(|_| invalid("tls: a record failed to decrypt"))?;
    let Some(last) = opened.iter().rposition(|&b| b != 0) else {
        return Err(invalid("tls: a record without a content type"));
    };
    Ok((opened[last], last))
}

impl TlsStream {
    fn new(
        io: TcpStream,
        keys: Keys,
        secrets: rustls::ExtractedSecrets,
        peer_certificates: Vec<CertificateDer<'static>>,
        leftover: Leftover,
    ) -> io::Result<Self> {
        let tx = Direction::new(secrets.tx.0, secrets.tx.1)?;
        let rx = Direction::new(secrets.rx.0, secrets.rx.1)?;
        let tx_limit = tx_limit(&keys)?;
        let mut rbuf =
            vec![0u8; READ_BUFFER_MIN.max(leftover.received.len() + leftover.plaintext.len())]
                .into_boxed_slice();
        // Application data rustls opened during the handshake is read first.
        let p = leftover.plaintext.len();
        rbuf[..p].copy_from_slice(&leftover.plaintext);
        rbuf[p..p + leftover.received.len()].copy_from_slice(&leftover.received);
        Ok(Self {
            io,
            keys,
            tx,
            rx,
            tx_limit,
            peer_certificates,
            rbuf,
            rstart: p,
            rend: p + leftover.received.len(),
            plain: 0..p,
            wbuf: Vec::new(),
            wstart: 0,
            read_closed: false,
            write_closed: false,
            read_failed: false,
        })
    }

    /// The peer's certificate chain (leaf first), empty if it sent none.
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        &self.peer_certificates
    }

    #[cfg(test)]
    fn set_tx_limit(&mut self, records: u64) {
        self.tx_limit = records;
    }

    /// Seals `data` (at most [`MAX_FRAGMENT`] bytes) as one record of content type
    /// `content` at the end of the write buffer.
    fn seal(&mut self, content: u8, data: &[u8]) -> io::Result<()> {
        let start = self.begin_record(data.len())?;
        self.wbuf.extend_from_slice(data);
        self.finish_record(start, content)
    }

    /// Starts a record at the end of the write buffer (its plaintext is appended to the
    /// buffer next, at most [`MAX_FRAGMENT`] bytes, `expect` of them known now); answers
    /// where it starts. Updates the sending keys first when they are due.
    fn begin_record(&mut self, expect: usize) -> io::Result<usize> {
        if self.tx.seq >= self.tx_limit {
            self.update_tx_keys()?;
        }
        let start = self.wbuf.len();
        self.wbuf.reserve(HEADER + expect + 1 + TAG);
        // The header, its length filled in by `finish_record`.
        self.wbuf
            .extend_from_slice(&[CONTENT_APPLICATION_DATA, 3, 3, 0, 0]);
        Ok(start)
    }

    /// Seals the record begun at `start` (its plaintext is the rest of the write buffer)
    /// as content type `content`.
    fn finish_record(&mut self, start: usize, content: u8) -> io::Result<()> {
        let len = self.wbuf.len() - start - HEADER;
        debug_assert!(len <= MAX_FRAGMENT);
        let body = len + 1 + TAG;
        let header = [
            CONTENT_APPLICATION_DATA,
            3,
            3,
            (body >> 8) as u8,
            body as u8,
        ];
        self.wbuf[start..start + HEADER].copy_from_slice(&header);
        self.wbuf.push(content);
        let nonce = self.tx.next_nonce()?;
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(
                nonce,
                aead::Aad::from(header),
                &mut self.wbuf[start + HEADER..],
            )
            .map_err(|_| invalid("tls: sealing a record failed"))?;
        self.wbuf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Tells the peer, under the current keys, that the next records use new ones (not
    /// asking it to update its own), then switches.
    fn update_tx_keys(&mut self) -> io::Result<()> {
        const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0];
        // Sealed under the old keys: `seal` must not come back here.
        self.tx_limit = u64::MAX;
        self.seal(CONTENT_HANDSHAKE, &KEY_UPDATE_NOT_REQUESTED)?;
        let (seq, secrets) = self.keys.update_tx().map_err(invalid)?;
        self.tx = Direction::new(seq, secrets)?;
        self.tx_limit = tx_limit(&self.keys)?;
        Ok(())
    }

    /// Sends the key update a received record asked for, without waiting for it to be
    /// written.
    fn answer_key_update(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.wstart < self.wbuf.len()
            && let Poll::Ready(Err(e)) = self.poll_write_out(cx)
        {
            return Err(e);
        }
        Ok(())
    }

    /// Writes sealed records out until the buffer is empty or the socket would block.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wstart < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wstart..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wstart += n;
        }
        self.wbuf.clear();
        self.wstart = 0;
        Poll::Ready(Ok(()))
    }

    /// Opens the complete record at the front of the read buffer, if there is one.
    /// Answers whether one was taken.
    fn open_record(&mut self) -> io::Result<bool> {
        let Some((header, len)) = parse_header(&self.rbuf[self.rstart..self.rend])? else {
            return Ok(false);
        };
        if self.rend - self.rstart < len {
            return Ok(false);
        }
        let body = self.rstart + HEADER..self.rstart + len;
        self.rstart = body.end;
        let (content, n) = open_at(&mut self.rx, header, &mut self.rbuf[body.clone()], 0)?;
        self.take_content(content, body.start..body.start + n)
            .map(|()| true)
    }

    /// Takes an opened record's payload, `rbuf[payload]`, of type `content`.
    fn take_content(&mut self, content: u8, payload: std::ops::Range<usize>) -> io::Result<()> {
        match content {
            CONTENT_APPLICATION_DATA => self.plain = payload,
            CONTENT_ALERT => match self.rbuf[payload] {
                [_, ALERT_CLOSE_NOTIFY] => self.read_closed = true,
                [_, description] => {
                    return Err(invalid(format!(
                        "tls: received fatal alert: {:?}",
                        rustls::AlertDescription::from(description)
                    )));
                }
                _ => return Err(invalid("tls: a malformed alert")),
            },
            CONTENT_HANDSHAKE => self.post_handshake(payload)?,
            other => return Err(invalid(format!("tls: unexpected content type {other}"))),
        }
        Ok(())
    }

    /// Reads from the socket straight into the caller's buffer and opens the records in
    /// place there, so that the plaintext is not copied again out of this stream's buffer
    /// (a tenth of a receiving VRA's CPU in a sync). Taken when nothing is waiting to be
    /// read here and the caller has room for several records. Answers how many bytes of
    /// plaintext it gave the caller: none when only part of a record came, or a record
    /// other than application data (handled here, as `open_record` does).
    #[allow(unsafe_code)]
    fn poll_read_direct(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<usize>> {
        // Nothing is copied until the socket has something to give.
        ready!(self.io.poll_read_ready(cx))?;
        let kept = self.rend - self.rstart;
        // At most what this stream's buffer could hold, for what is left after a key
        // update or a ticket.
        let mut region = buf.take(READ_BUFFER_MAX);
        region.put_slice(&self.rbuf[self.rstart..self.rend]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut region))?;
        let bytes = region.filled_mut();
        if bytes.len() == kept {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "tls: the peer closed the connection without close_notify",
            )));
        }
        // Every received byte is in `bytes` now; what is not opened goes back below.
        self.rstart = 0;
        self.rend = 0;
        let (mut src, mut dst) = (0, 0);
        let mut control = None;
        while let Some((header, len)) = parse_header(&bytes[src..])? {
            if bytes.len() - src < len {
                break;
            }
            // The plaintext lands right after the plaintext before it: ring opens the
            // record into `bytes[dst..]` from `bytes[src + HEADER..]`.
            let (content, n) = open_at(
                &mut self.rx,
                header,
                &mut bytes[dst..src + len],
                src + HEADER - dst,
            )?;
            src += len;
            if content == CONTENT_APPLICATION_DATA {
                dst += n;
            } else {
                self.rbuf[..n].copy_from_slice(&bytes[dst..dst + n]);
                control = Some((content, n));
                break;
            }
        }
        let filled = bytes.len();
        if let Some((content, n)) = control {
            self.take_content(content, 0..n)?;
        }
        let rest = &region.filled()[src..];
        if rest.len() > self.rbuf.len() {
            self.rbuf = vec![0u8; READ_BUFFER_MAX].into_boxed_slice();
        }
        self.rbuf[..rest.len()].copy_from_slice(rest);
        self.rend = rest.len();
        // SAFETY: `region` is the start of `buf`'s unfilled part, and its first `filled`
        // bytes were initialized through it (the kept bytes and the socket read).
        unsafe { buf.assume_init(filled) };
        buf.advance(dst);
        Poll::Ready(Ok(dst))
    }

    /// Handshake messages after the handshake: key updates and session tickets.
    fn post_handshake(&mut self, payload: std::ops::Range<usize>) -> io::Result<()> {
        let mut at = payload.start;
        while at < payload.end {
            if payload.end - at < 4 {
                return Err(invalid("tls: a truncated handshake message"));
            }
            let typ = self.rbuf[at];
            let len =
                u32::from_be_bytes([0, self.rbuf[at + 1], self.rbuf[at + 2], self.rbuf[at + 3]])
                    as usize;
            let body = at + 4..at + 4 + len;
            if body.end > payload.end {
                return Err(invalid("tls: a handshake message split across records"));
            }
            at = body.end;
            match typ {
                HANDSHAKE_KEY_UPDATE => {
                    let requested = match self.rbuf[body] {
                        [0] => false,
                        [1] => true,
                        _ => return Err(invalid("tls: a malformed key update")),
                    };
                    // RFC 8446 5.1: a key change ends its record.
                    if at != payload.end {
                        return Err(invalid("tls: data after a key update in its record"));
                    }
                    let (seq, secrets) = self.keys.update_rx().map_err(invalid)?;
                    self.rx = Direction::new(seq, secrets)?;
                    if requested && !self.write_closed {
                        self.update_tx_keys()?;
                    }
                }
                HANDSHAKE_NEW_SESSION_TICKET => match &mut self.keys {
                    Keys::Client(k) => {
                        let ticket = self.rbuf[body].to_vec();
                        k.handle_new_session_ticket(&ticket).map_err(invalid)?;
                    }
                    Keys::Server(_) => return Err(invalid("tls: a session ticket from a client")),
                },
                other => {
                    return Err(invalid(format!(
                        "tls: handshake message {other} after the handshake"
                    )));
                }
            }
        }
        Ok(())
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.rbuf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if this.read_failed {
                return Poll::Ready(Err(invalid("tls: a record was refused earlier")));
            }
            let opened = this.open_record();
            this.read_failed = opened.is_err();
            if opened? {
                this.answer_key_update(cx)?;
                continue;
            }
            if buf.remaining() >= DIRECT_READ_MIN {
                let direct = ready!(this.poll_read_direct(cx, buf));
                // A refused record (not a socket error or an early close) fails every
                // later read, as in `open_record`.
                this.read_failed =
                    matches!(&direct, Err(e) if e.kind() == io::ErrorKind::InvalidData);
                this.answer_key_update(cx)?;
                if direct? > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // Room for a whole record after what is kept.
            if this.rbuf.len() - this.rend < HEADER + MAX_CIPHERTEXT {
                this.rbuf.copy_within(this.rstart..this.rend, 0);
                this.rend -= this.rstart;
                this.rstart = 0;
            }
            let room = this.rbuf.len() - this.rend;
            let mut read = ReadBuf::new(&mut this.rbuf[this.rend..]);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == room && this.rbuf.len() < READ_BUFFER_MAX {
                let mut grown = vec![0u8; (this.rbuf.len() * 2).min(READ_BUFFER_MAX)];
                grown[..this.rend + n].copy_from_slice(&this.rbuf[..this.rend + n]);
                this.rbuf = grown.into_boxed_slice();
            }
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls: the peer closed the connection without close_notify",
                )));
            }
            this.rend += n;
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // What the socket took is dropped from the front once it is a good part of the
        // buffer (the rest moves down), so the buffer stays within twice its bound.
        if this.wstart >= crate::SEND_BUFFER / 2 {
            this.wbuf.drain(..this.wstart);
            this.wstart = 0;
        }
        // Sealed records wait for the socket up to the send buffer.
        if this.wbuf.len() - this.wstart >= crate::SEND_BUFFER {
            ready!(this.poll_write_out(cx))?;
        }
        let room = crate::SEND_BUFFER - (this.wbuf.len() - this.wstart);
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut taken = 0;
        // The record being filled: where it starts, and how much plaintext it holds.
        let mut open: Option<(usize, usize)> = None;
        for buf in bufs {
            let mut rest: &[u8] = buf;
            while !rest.is_empty() && taken < room {
                let (start, held) = match open {
                    Some(r) => r,
                    None => {
                        let expect = (total - taken).min(room - taken).min(MAX_FRAGMENT);
                        (this.begin_record(expect)?, 0)
                    }
                };
                let n = rest.len().min(MAX_FRAGMENT - held).min(room - taken);
                this.wbuf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                taken += n;
                if held + n == MAX_FRAGMENT {
                    this.finish_record(start, CONTENT_APPLICATION_DATA)?;
                    open = None;
                } else {
                    open = Some((start, held + n));
                }
            }
        }
        if let Some((start, _)) = open {
            this.finish_record(start, CONTENT_APPLICATION_DATA)?;
        }
        // Out now as far as the socket takes it; the rest on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_out(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.seal(CONTENT_ALERT, &[1, ALERT_CLOSE_NOTIFY])?;
        }
        ready!(self.poll_write_out(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::{ClientAuth, TlsConfig};
    use crate::identity::PeerIdentity;
    use crate::pki::{PkiDir, SERVER_NAME, SiteCa};

    /// Two members of one site: one dials, one serves.
    fn pair(dir: &std::path::Path) -> (TlsConfig, TlsConfig) {
        let ca = SiteCa::generate("site-r1").unwrap();
        let node = |name: &str, id: u64| {
            let pki = PkiDir::new(dir.join(name));
            ca.provision(&pki, &PeerIdentity::manager("site-r1", id).unwrap())
                .unwrap();
            TlsConfig::load(&pki).unwrap()
        };
        (node("client", 1), node("server", 2))
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from(SERVER_NAME).unwrap()
    }

    /// Bytes that differ at every position, so a misplaced record shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
            .collect()
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn both_ends_carry_data_both_ways_in_vectored_writes_and_close_cleanly() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, server) = pair(tmp.path());
        let (c, s) = tcp_pair().await;
        let (c, s) = tokio::join!(
            connect(client.client(), name(), c),
            accept(server.server_config(ClientAuth::Required), s)
        );
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        assert_eq!(
            PeerIdentity::from_cert(&s.peer_certificates()[0]).unwrap(),
            PeerIdentity::manager("site-r1", 1).unwrap()
        );
        let up = pattern(5 << 20, 1);
        let down = pattern(3 << 20, 2);
        let sent = up.clone();
        let writer = tokio::spawn(async move {
            // Frame headers and bodies of odd sizes, as HTTP/2 writes them.
            let mut at = 0;
            while at < sent.len() {
                let head = &sent[at..(at + 9).min(sent.len())];
                let body_end = (at + 9 + 70_001).min(sent.len());
                let body = &sent[(at + 9).min(sent.len())..body_end];
                let bufs = [io::IoSlice::new(head), io::IoSlice::new(body)];
                let n = c.write_vectored(&bufs).await.unwrap();
                at += n;
            }
            c.flush().await.unwrap();
            let mut back = Vec::new();
            c.read_to_end(&mut back).await.unwrap();
            c.shutdown().await.unwrap();
            back
        });
        let mut got = vec![0u8; up.len()];
        s.read_exact(&mut got).await.unwrap();
        assert!(got == up, "the server read what the client wrote");
        // Only the last records of the read, with less room left than DIRECT_READ_MIN, go
        // through this stream's buffer.
        assert!(
            s.rbuf.len() <= READ_BUFFER_MAX / 4,
            "large reads open the records in the reader's buffer, not this stream's ({} bytes)",
            s.rbuf.len()
        );
        s.write_all(&down).await.unwrap();
        s.shutdown().await.unwrap();
        let back = writer.await.unwrap();
        assert!(back == down, "the client read what the server wrote");
        let mut rest = Vec::new();
        assert_eq!(
            s.read_to_end(&mut rest).await.unwrap(),
            0,
            "close_notify ends the read"
        );
    }

    /// rustls's own connection on a blocking thread: the other end as a stock TLS 1.3
    /// implementation runs it, asking for a key update after `update_after` bytes.
    fn stock_echo<C, D>(mut conn: C, tcp: std::net::TcpStream, len: usize, update_after: usize)
    where
        C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
        D: rustls::SideData,
    {
        let mut tcp = tcp;
        let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
        let mut got = vec![0u8; len];
        stream.read_exact(&mut got[..update_after]).unwrap();
        stream.conn.refresh_traffic_keys().unwrap();
        stream.read_exact(&mut got[update_after..]).unwrap();
        stream.write_all(&got).unwrap();
        stream.flush().unwrap();
        let mut end = Vec::new();
        stream.read_to_end(&mut end).unwrap();
        stream.conn.send_close_notify();
        stream.flush().unwrap();
    }

    async fn blocking_peer() -> (TcpStream, std::net::TcpStream) {
        let (a, b) = tcp_pair().await;
        let b = b.into_std().unwrap();
        b.set_nonblocking(false).unwrap();
        (a, b)
    }

    /// Sends `data` over `s` and reads it echoed, with the sending keys updated every 100
    /// records on this side.
    async fn echo_through(s: &mut TlsStream, data: &[u8]) {
        s.set_tx_limit(s.tx.seq + 100);
        let (mut r, mut w) = tokio::io::split(s);
        let (_, back) = tokio::join!(
            async {
                for chunk in data.chunks(100_000) {
                    w.write_all(chunk).await.unwrap();
                }
                w.flush().await.unwrap();
            },
            async {
                let mut back = vec![0u8; data.len()];
                r.read_exact(&mut back).await.unwrap();
                back
            }
        );
        assert!(back == data, "the stock end echoed every byte in order");
        let s = r.unsplit(w);
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_stock_rustls_server_with_tickets_and_key_updates_is_understood() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, server) = pair(tmp.path());
        let mut stock = (*server.server_config(ClientAuth::Required)).clone();
        stock.send_tls13_tickets = 2;
        let (ours, theirs) = blocking_peer().await;
        let len = 6 << 20;
        let peer = std::thread::spawn(move || {
            let conn = rustls::ServerConnection::new(Arc::new(stock)).unwrap();
            stock_echo(conn, theirs, len, 2 << 20);
        });
        let mut s = connect(client.client(), name(), ours).await.unwrap();
        echo_through(&mut s, &pattern(len, 3)).await;
        peer.join().unwrap();
        assert!(s.tx.seq < 100, "the client updated its sending keys");
    }

    #[tokio::test]
    async fn a_stock_rustls_client_with_key_updates_is_understood() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, server) = pair(tmp.path());
        let (ours, theirs) = blocking_peer().await;
        let len = 6 << 20;
        let config = client.client();
        let peer = std::thread::spawn(move || {
            let conn = rustls::ClientConnection::new(config, name()).unwrap();
            stock_echo(conn, theirs, len, 1 << 20);
        });
        let mut s = accept(server.server_config(ClientAuth::Required), ours)
            .await
            .unwrap();
        echo_through(&mut s, &pattern(len, 4)).await;
        peer.join().unwrap();
    }

    #[tokio::test]
    async fn a_tampered_or_oversized_record_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let (client, server) = pair(tmp.path());
        // Read into a small buffer (records opened in the stream's own buffer) and into a
        // large one (opened in the reader's).
        for (what, garble, read_len) in [
            ("a flipped bit", 0usize, 16usize),
            ("a record longer than TLS allows", 1, 16),
            ("a record of another type", 2, 16),
            ("a flipped bit, read into a large buffer", 0, 256 << 10),
            (
                "a record longer than TLS allows, read into a large buffer",
                1,
                256 << 10,
            ),
            (
                "a record of another type, read into a large buffer",
                2,
                256 << 10,
            ),
        ] {
            let (c, s) = tcp_pair().await;
            let (c, s) = tokio::join!(
                connect(client.client(), name(), c),
                accept(server.server_config(ClientAuth::Required), s)
            );
            let (mut c, mut s) = (c.unwrap(), s.unwrap());
            c.write_all(b"a record to garble").await.unwrap();
            let at = c.wbuf.len();
            assert_eq!(at, 0, "written out");
            let mut first = [0u8; 18];
            s.read_exact(&mut first).await.unwrap();
            assert_eq!(&first, b"a record to garble");
            // Seal one more and garble it before it leaves.
            c.seal(CONTENT_APPLICATION_DATA, b"second").unwrap();
            match garble {
                0 => *c.wbuf.last_mut().unwrap() ^= 1,
                1 => {
                    c.wbuf[3] = 0x48;
                    c.wbuf[4] = 0x01;
                }
                _ => c.wbuf[0] = CONTENT_HANDSHAKE,
            }
            c.flush().await.unwrap();
            let mut into = vec![0u8; read_len];
            let e = s.read(&mut into).await.expect_err(what);
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
            let again = s.read(&mut into).await.expect_err(what);
            assert_eq!(
                again.kind(),
                io::ErrorKind::InvalidData,
                "{what}, read again"
            );
        }
    }
}
