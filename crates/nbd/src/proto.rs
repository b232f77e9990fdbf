//! The NBD wire protocol without IO: constants, frame encoders, and two pure decoders over
//! byte buffers, one for the server's side of the fixed newstyle handshake
//! ([`Negotiation`]) and one for transmission-phase requests ([`RequestDecoder`]).
//!
//! Both decoders consume bytes from a `BytesMut` the caller fills however it likes, never
//! panic on any input, and never ask for more than a bounded number of bytes: an option's
//! data is buffered only up to [`MAX_OPTION_DATA`] (longer ones are skipped as they
//! arrive), and a request's payload only up to the advertised maximum payload. The
//! connection code in [`crate::server`] is a thin loop around them, and the property tests
//! feed them arbitrary bytes in arbitrary chunks.
//!
//! The layout of every frame follows the NBD protocol document (`doc/proto.md` of the
//! reference implementation); all integers are big-endian.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after [`NBD_MAGIC`] and by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Bytes of the server greeting: magic, `IHAVEOPT`, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Bytes of an option request header: `IHAVEOPT`, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Zero padding after an `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_PADDING: usize = 124;
/// Longest export name (and error message) the protocol allows.
pub const MAX_NAME_LEN: usize = 4096;
/// Longest option data the server buffers; longer options are skipped and refused.
pub const MAX_OPTION_DATA: usize = 16 * 1024;
/// Default maximum payload of a read or write, advertised in `NBD_INFO_BLOCK_SIZE`.
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// Handshake flags (16 bits, sent by the server).
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, sent by the client after the greeting).
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (16 bits, sent with the export's size).
pub mod transmission_flags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export refuses writes.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export behaves like a rotational disk.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush and FUA are visible across all connections to the export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Option codes.
pub mod opt {
    /// Select an export and enter transmission; cannot report errors.
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS (served where the server requires TLS, see [`super::TlsPolicy`]).
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Ask for structured replies (not supported).
    pub const STRUCTURED_REPLY: u32 = 8;
}

/// Option reply types.
pub mod rep {
    /// The option succeeded, or a list is complete.
    pub const ACK: u32 = 1;
    /// One export in a list.
    pub const SERVER: u32 = 2;
    /// One piece of information about an export.
    pub const INFO: u32 = 3;
    /// Bit set on every error reply.
    pub const ERR_BIT: u32 = 1 << 31;
    /// The option is not supported.
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    /// The option is forbidden by policy.
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    /// The option's data is malformed.
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    /// The server requires TLS before this option.
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    /// The export does not exist.
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    /// The request is too large to process.
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
}

/// Information types of `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (carries a payload).
    pub const WRITE: u16 = 1;
    /// Soft disconnect.
    pub const DISC: u16 = 2;
    /// Make completed writes durable.
    pub const FLUSH: u16 = 3;
    /// Discard a range.
    pub const TRIM: u16 = 4;
    /// Prefetch (not supported).
    pub const CACHE: u16 = 5;
    /// Write zeroes to a range.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status (not supported: needs structured replies).
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cmd_flags {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES` must not punch a hole (accepted; a hole reads as zeroes anyway).
    pub const NO_HOLE: u16 = 1 << 1;
    /// Do not fragment a structured read reply (not supported).
    pub const DF: u16 = 1 << 2;
}

/// A request's cookie (the protocol's "handle"), echoed in its reply.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Cookie(pub u64);

impl fmt::Debug for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cookie({:#x})", self.0)
    }
}

impl fmt::Display for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// An NBD error value, as carried in the error field of a reply (0 is success).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// Success.
    pub const OK: Self = Self(0);
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: Self = Self(1);
    /// Input/output error.
    pub const EIO: Self = Self(5);
    /// Cannot allocate memory.
    pub const ENOMEM: Self = Self(12);
    /// Invalid argument (out of range, oversized, unknown command or flag).
    pub const EINVAL: Self = Self(22);
    /// No space left on device.
    pub const ENOSPC: Self = Self(28);
    /// Value too large.
    pub const EOVERFLOW: Self = Self(75);
    /// Operation not supported.
    pub const ENOTSUP: Self = Self(95);
    /// Server is shutting down.
    pub const ESHUTDOWN: Self = Self(108);

    /// Maps a device's IO error to the closest NBD error value.
    pub fn from_io(err: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        match err.kind() {
            ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => Self::EPERM,
            ErrorKind::InvalidInput => Self::EINVAL,
            ErrorKind::OutOfMemory => Self::ENOMEM,
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
                Self::ENOSPC
            }
            ErrorKind::Unsupported => Self::ENOTSUP,
            _ => Self::EIO,
        }
    }

    /// The error's conventional name.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "ok",
            1 => "EPERM",
            5 => "EIO",
            12 => "ENOMEM",
            22 => "EINVAL",
            28 => "ENOSPC",
            75 => "EOVERFLOW",
            95 => "ENOTSUP",
            108 => "ESHUTDOWN",
            _ => "unknown",
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// A protocol violation by the peer; the connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The client set client flags the server does not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (it cannot be refused).
    #[error("unknown export {0:?} requested with export_name")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` carried a name longer than the protocol allows.
    #[error("export name of {0} bytes is too long")]
    ExportNameTooLong(u64),
    /// A request did not start with the request magic.
    #[error("bad request magic {0:#x}")]
    BadRequestMagic(u32),
    /// A write's payload is larger than the advertised maximum; its bytes cannot be trusted.
    #[error("write payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// Payload length the client announced.
        len: u32,
        /// Advertised maximum.
        max: u32,
    },
    /// A server reply did not start with the expected magic (client side).
    #[error("bad reply magic {0:#x}")]
    BadReplyMagic(u64),
    /// A server reply was malformed (client side).
    #[error("malformed reply: {0}")]
    MalformedReply(&'static str),
    /// A payload was supplied that the decoder was not waiting for, or of the wrong size.
    #[error("payload supplied out of turn")]
    UnexpectedPayload,
    /// The decoder was used after it reported the end of the conversation.
    #[error("decoder used after the conversation ended")]
    Finished,
    /// `NBD_OPT_EXPORT_NAME` before TLS on a server that requires it (it cannot be
    /// refused with a reply, so the connection is closed).
    #[error("export_name before TLS on a server that requires TLS")]
    TlsRequired,
    /// The client sent bytes after `NBD_OPT_STARTTLS` before the TLS handshake: they
    /// would pass as if they had come over TLS.
    #[error("{0} plaintext bytes after starttls")]
    PlaintextAfterStartTls(usize),
}

/// Whether the negotiation takes clients over plain transport or only after TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS here (`NBD_OPT_STARTTLS` is refused as unsupported): a Unix socket, or a
    /// server run without certificates.
    Off,
    /// Every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused with
    /// `NBD_REP_ERR_TLS_REQD` until the connection upgraded: no export list, no export
    /// size, no transmission in plaintext.
    Required,
    /// The connection upgraded; a second `NBD_OPT_STARTTLS` is invalid.
    Established,
}

/// What the server knows about an export when a client selects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportDescription {
    /// Size in bytes.
    pub size: u64,
    /// Whether writes are refused.
    pub read_only: bool,
}

impl ExportDescription {
    /// The transmission flags advertised for this export.
    pub fn transmission_flags(&self) -> u16 {
        use transmission_flags::*;
        let mut flags =
            HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN;
        if self.read_only {
            flags |= READ_ONLY;
        }
        flags
    }
}

/// The exports a negotiation can choose from.
pub trait ExportCatalog {
    /// What the connection gets along with a chosen export (a device handle, say).
    type Handle;

    /// Names of every export, for `NBD_OPT_LIST`.
    fn names(&self) -> Vec<String>;

    /// Looks an export up by name (the empty name is the default export, if any).
    fn lookup(&self, name: &str) -> Option<(ExportDescription, Self::Handle)>;
}

/// What a step of the negotiation ended with.
#[derive(Debug)]
pub enum NegotiationEvent<H> {
    /// More input is needed: at least this many more bytes.
    NeedMore(usize),
    /// The client chose an export; the connection enters transmission. Any bytes left in
    /// the input belong to the transmission phase.
    Transmission {
        /// Name the client asked for.
        name: String,
        /// Size and flags sent to the client.
        export: ExportDescription,
        /// The catalog's handle of the export.
        handle: H,
    },
    /// The client sent `NBD_OPT_ABORT`; close after writing the output.
    Aborted,
    /// The client sent `NBD_OPT_STARTTLS` and the output holds its acknowledgement: write
    /// it, check that the input is empty, run the server side of a TLS handshake on the
    /// connection, then go on calling [`Negotiation::advance`] with what comes over TLS.
    StartTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NegState {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32, len: usize },
    Discard { option: u32, remaining: u64 },
    Finished,
}

/// The server's side of the fixed newstyle handshake, as a pure state machine.
///
/// Write [`Negotiation::greeting`] first, then call [`Negotiation::advance`] with what the
/// client sent until it returns something other than [`NegotiationEvent::NeedMore`],
/// writing the output buffer to the client after every call.
#[derive(Debug, Clone)]
pub struct Negotiation {
    state: NegState,
    no_zeroes: bool,
    max_payload: u32,
    tls: TlsPolicy,
}

impl Negotiation {
    /// A negotiation without TLS that will advertise `max_payload` as the maximum block
    /// size.
    pub fn new(max_payload: u32) -> Self {
        Self::with_tls(max_payload, TlsPolicy::Off)
    }

    /// A negotiation under `tls` (see [`TlsPolicy`]).
    pub fn with_tls(max_payload: u32, tls: TlsPolicy) -> Self {
        Self {
            state: NegState::ClientFlags,
            no_zeroes: false,
            max_payload: max_payload.max(PREFERRED_BLOCK_SIZE),
            tls,
        }
    }

    /// Where the negotiation stands with TLS.
    pub fn tls(&self) -> TlsPolicy {
        self.tls
    }

    /// Writes the server greeting (magic, `IHAVEOPT`, handshake flags).
    pub fn greeting(out: &mut BytesMut) {
        out.put_u64(NBD_MAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
    }

    /// Whether the client asked to skip the zero padding.
    pub fn no_zeroes(&self) -> bool {
        self.no_zeroes
    }

    /// Consumes as much of `input` as it can, appending replies to `out`.
    pub fn advance<C: ExportCatalog>(
        &mut self,
        input: &mut BytesMut,
        catalog: &C,
        out: &mut BytesMut,
    ) -> Result<NegotiationEvent<C::Handle>, ProtocolError> {
        loop {
            match self.state {
                NegState::ClientFlags => {
                    if input.len() < 4 {
                        return Ok(NegotiationEvent::NeedMore(4 - input.len()));
                    }
                    let flags = input.get_u32();
                    let known = client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES;
                    if flags & !known != 0 {
                        self.state = NegState::Finished;
                        return Err(ProtocolError::UnknownClientFlags(flags));
                    }
                    self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
                    self.state = NegState::OptionHeader;
                }
                NegState::OptionHeader => {
                    if input.len() < OPTION_HEADER_LEN {
                        return Ok(NegotiationEvent::NeedMore(OPTION_HEADER_LEN - input.len()));
                    }
                    let magic = input.get_u64();
                    let option = input.get_u32();
                    let len = input.get_u32();
                    if magic != IHAVEOPT {
                        self.state = NegState::Finished;
                        return Err(ProtocolError::BadOptionMagic(magic));
                    }
                    let len_usize = len as usize;
                    self.state = if len_usize <= MAX_OPTION_DATA {
                        NegState::OptionData {
                            option,
                            len: len_usize,
                        }
                    } else if option == opt::EXPORT_NAME {
                        self.state = NegState::Finished;
                        return Err(ProtocolError::ExportNameTooLong(u64::from(len)));
                    } else {
                        NegState::Discard {
                            option,
                            remaining: u64::from(len),
                        }
                    };
                }
                NegState::Discard { option, remaining } => {
                    let take = remaining.min(input.len() as u64);
                    input.advance(take as usize);
                    let remaining = remaining - take;
                    if remaining > 0 {
                        self.state = NegState::Discard { option, remaining };
                        let hint = remaining.min(MAX_OPTION_DATA as u64) as usize;
                        return Ok(NegotiationEvent::NeedMore(hint));
                    }
                    let reply = if is_known_option(option) {
                        rep::ERR_TOO_BIG
                    } else {
                        rep::ERR_UNSUP
                    };
                    put_option_reply(out, option, reply, b"option data too long");
                    self.state = NegState::OptionHeader;
                }
                NegState::OptionData { option, len } => {
                    if input.len() < len {
                        return Ok(NegotiationEvent::NeedMore(len - input.len()));
                    }
                    let data = input.split_to(len);
                    self.state = NegState::OptionHeader;
                    match self.handle_option(option, &data, catalog, out) {
                        Ok(None) => {}
                        // Options go on over TLS.
                        Ok(Some(NegotiationEvent::StartTls)) => {
                            return Ok(NegotiationEvent::StartTls);
                        }
                        Ok(Some(event)) => {
                            self.state = NegState::Finished;
                            return Ok(event);
                        }
                        Err(err) => {
                            self.state = NegState::Finished;
                            return Err(err);
                        }
                    }
                }
                NegState::Finished => return Err(ProtocolError::Finished),
            }
        }
    }

    fn handle_option<C: ExportCatalog>(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &C,
        out: &mut BytesMut,
    ) -> Result<Option<NegotiationEvent<C::Handle>>, ProtocolError> {
        match (self.tls, option) {
            (_, opt::ABORT) => {}
            (TlsPolicy::Required, opt::STARTTLS) => {
                if !data.is_empty() {
                    put_option_reply(out, option, rep::ERR_INVALID, b"starttls takes no data");
                    return Ok(None);
                }
                put_option_reply(out, option, rep::ACK, &[]);
                self.tls = TlsPolicy::Established;
                return Ok(Some(NegotiationEvent::StartTls));
            }
            (TlsPolicy::Required, opt::EXPORT_NAME) => return Err(ProtocolError::TlsRequired),
            (TlsPolicy::Required, _) => {
                put_option_reply(out, option, rep::ERR_TLS_REQD, b"TLS is required");
                return Ok(None);
            }
            (TlsPolicy::Established, opt::STARTTLS) => {
                put_option_reply(out, option, rep::ERR_INVALID, b"TLS is already on");
                return Ok(None);
            }
            _ => {}
        }
        match option {
            opt::EXPORT_NAME => {
                if data.len() > MAX_NAME_LEN {
                    return Err(ProtocolError::ExportNameTooLong(data.len() as u64));
                }
                let name = String::from_utf8_lossy(data).into_owned();
                let looked_up = std::str::from_utf8(data)
                    .ok()
                    .and_then(|name| catalog.lookup(name));
                let Some((export, handle)) = looked_up else {
                    return Err(ProtocolError::UnknownExport(name));
                };
                out.put_u64(export.size);
                out.put_u16(export.transmission_flags());
                if !self.no_zeroes {
                    out.put_bytes(0, EXPORT_NAME_PADDING);
                }
                Ok(Some(NegotiationEvent::Transmission {
                    name,
                    export,
                    handle,
                }))
            }
            opt::ABORT => {
                put_option_reply(out, option, rep::ACK, &[]);
                Ok(Some(NegotiationEvent::Aborted))
            }
            opt::LIST => {
                if !data.is_empty() {
                    put_option_reply(out, option, rep::ERR_INVALID, b"list takes no data");
                    return Ok(None);
                }
                for name in catalog.names() {
                    let name = name.as_bytes();
                    put_option_reply_header(out, option, rep::SERVER, 4 + name.len());
                    out.put_u32(name.len() as u32);
                    out.put_slice(name);
                }
                put_option_reply(out, option, rep::ACK, &[]);
                Ok(None)
            }
            opt::INFO | opt::GO => {
                let request = match InfoRequest::decode(data) {
                    Ok(request) => request,
                    Err(message) => {
                        put_option_reply(out, option, rep::ERR_INVALID, message.as_bytes());
                        return Ok(None);
                    }
                };
                let Some((export, handle)) = catalog.lookup(&request.name) else {
                    put_option_reply(out, option, rep::ERR_UNKNOWN, b"unknown export");
                    return Ok(None);
                };
                put_option_reply_header(out, option, rep::INFO, 12);
                out.put_u16(info::EXPORT);
                out.put_u64(export.size);
                out.put_u16(export.transmission_flags());
                put_option_reply_header(out, option, rep::INFO, 14);
                out.put_u16(info::BLOCK_SIZE);
                out.put_u32(1);
                out.put_u32(PREFERRED_BLOCK_SIZE);
                out.put_u32(self.max_payload);
                if request.requests.contains(&info::NAME) {
                    let name = request.name.as_bytes();
                    put_option_reply_header(out, option, rep::INFO, 2 + name.len());
                    out.put_u16(info::NAME);
                    out.put_slice(name);
                }
                put_option_reply(out, option, rep::ACK, &[]);
                if option == opt::GO {
                    Ok(Some(NegotiationEvent::Transmission {
                        name: request.name,
                        export,
                        handle,
                    }))
                } else {
                    Ok(None)
                }
            }
            _ => {
                put_option_reply(out, option, rep::ERR_UNSUP, b"option not supported");
                Ok(None)
            }
        }
    }
}

fn is_known_option(option: u32) -> bool {
    matches!(
        option,
        opt::EXPORT_NAME | opt::ABORT | opt::LIST | opt::INFO | opt::GO
    )
}

/// The data of an `NBD_OPT_INFO` or `NBD_OPT_GO` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// Information types asked for.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Parses option data; the error is a message for `NBD_REP_ERR_INVALID`.
    pub fn decode(mut data: &[u8]) -> Result<Self, &'static str> {
        if data.len() < 6 {
            return Err("option data too short");
        }
        let name_len = data.get_u32() as usize;
        if name_len > data.len().saturating_sub(2) {
            return Err("export name length exceeds option data");
        }
        if name_len > MAX_NAME_LEN {
            return Err("export name too long");
        }
        let name = std::str::from_utf8(&data[..name_len])
            .map_err(|_| "export name is not utf-8")?
            .to_owned();
        data.advance(name_len);
        let count = data.get_u16() as usize;
        if data.len() != count * 2 {
            return Err("information request count does not match option length");
        }
        let requests = (0..count).map(|_| data.get_u16()).collect();
        Ok(Self { name, requests })
    }

    /// Encodes option data (client side).
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.name.len() as u32);
        out.put_slice(self.name.as_bytes());
        out.put_u16(self.requests.len() as u16);
        for request in &self.requests {
            out.put_u16(*request);
        }
    }
}

fn put_option_reply_header(out: &mut BytesMut, option: u32, reply: u32, len: usize) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(len as u32);
}

fn put_option_reply(out: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    put_option_reply_header(out, option, reply, data.len());
    out.put_slice(data);
}

/// Encodes an option request (client side).
pub fn put_option(out: &mut BytesMut, option: u32, data: &[u8]) {
    out.put_u64(IHAVEOPT);
    out.put_u32(option);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// The header of an option reply (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// Option being answered.
    pub option: u32,
    /// Reply type (`rep::*`).
    pub reply: u32,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Decodes the 20-byte header.
    pub fn decode(mut buf: &[u8]) -> Result<Self, ProtocolError> {
        if buf.len() < OPTION_REPLY_HEADER_LEN {
            return Err(ProtocolError::MalformedReply("short option reply"));
        }
        let magic = buf.get_u64();
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtocolError::BadReplyMagic(magic));
        }
        Ok(Self {
            option: buf.get_u32(),
            reply: buf.get_u32(),
            len: buf.get_u32(),
        })
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`cmd_flags::*`).
    pub flags: u16,
    /// Command type (`cmd::*`).
    pub kind: u16,
    /// Cookie echoed in the reply.
    pub cookie: Cookie,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (the payload length for writes).
    pub length: u32,
}

impl RequestHeader {
    /// Decodes the 28-byte header; only the magic can be wrong.
    pub fn decode(mut buf: &[u8]) -> Result<Self, ProtocolError> {
        if buf.len() < REQUEST_HEADER_LEN {
            return Err(ProtocolError::MalformedReply("short request header"));
        }
        let magic = buf.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(ProtocolError::BadRequestMagic(magic));
        }
        Ok(Self {
            flags: buf.get_u16(),
            kind: buf.get_u16(),
            cookie: Cookie(buf.get_u64()),
            offset: buf.get_u64(),
            length: buf.get_u32(),
        })
    }

    /// Encodes the header.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie.0);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }
}

/// Encodes a simple reply header.
pub fn put_simple_reply(out: &mut BytesMut, cookie: Cookie, error: ErrorCode) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error.0);
    out.put_u64(cookie.0);
}

/// A simple reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// Error value (0 on success).
    pub error: ErrorCode,
    /// Cookie of the request answered.
    pub cookie: Cookie,
}

impl SimpleReply {
    /// Decodes the 16-byte header.
    pub fn decode(mut buf: &[u8]) -> Result<Self, ProtocolError> {
        if buf.len() < SIMPLE_REPLY_LEN {
            return Err(ProtocolError::MalformedReply("short reply"));
        }
        let magic = buf.get_u32();
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtocolError::BadReplyMagic(u64::from(magic)));
        }
        Ok(Self {
            error: ErrorCode(buf.get_u32()),
            cookie: Cookie(buf.get_u64()),
        })
    }
}

/// A request the server should carry out; every range is within the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Payload.
        data: Bytes,
        /// Durable before the reply.
        fua: bool,
    },
    /// Make completed writes durable.
    Flush,
    /// Discard `len` bytes at `offset`.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Write `len` zero bytes at `offset`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
}

impl Command {
    /// A short lowercase name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Write { .. } => "write",
            Self::Flush => "flush",
            Self::Trim { .. } => "trim",
            Self::WriteZeroes { .. } => "write_zeroes",
        }
    }
}

/// One decoded transmission-phase message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A valid request.
    Request {
        /// Cookie to answer with.
        cookie: Cookie,
        /// What to do.
        command: Command,
    },
    /// A request that must be answered with an error without touching the device (any
    /// payload has been consumed).
    Reject {
        /// Cookie to answer with.
        cookie: Cookie,
        /// Command type, for counters and logs.
        kind: u16,
        /// Error to answer with.
        error: ErrorCode,
    },
    /// A write whose payload is over the maximum: answer with `EINVAL`, then close the
    /// connection (the payload is not consumed and cannot be trusted).
    RejectAndClose {
        /// Cookie to answer with.
        cookie: Cookie,
        /// The violation, for the log.
        reason: ProtocolError,
    },
    /// `NBD_CMD_DISC`: finish in-flight requests and close.
    Disconnect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecState {
    Header,
    Payload {
        header: RequestHeader,
        error: Option<ErrorCode>,
    },
    Finished,
}

/// Decodes transmission-phase requests for one export, validating each against it.
#[derive(Debug, Clone)]
pub struct RequestDecoder {
    export: ExportDescription,
    max_payload: u32,
    state: DecState,
}

impl RequestDecoder {
    /// A decoder for requests to `export`, with `max_payload` as the largest read or write.
    pub fn new(export: ExportDescription, max_payload: u32) -> Self {
        Self {
            export,
            max_payload,
            state: DecState::Header,
        }
    }

    /// The maximum payload this decoder accepts.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// How many bytes the current frame needs in total (header or payload); never more
    /// than `max(REQUEST_HEADER_LEN, max_payload)`.
    pub fn frame_len(&self) -> usize {
        match self.state {
            DecState::Payload { header, .. } => header.length as usize,
            DecState::Header | DecState::Finished => REQUEST_HEADER_LEN,
        }
    }

    /// The length of the write payload the decoder is waiting for, if it is waiting for one.
    pub fn pending_payload(&self) -> Option<usize> {
        match self.state {
            DecState::Payload { header, .. } => Some(header.length as usize),
            DecState::Header | DecState::Finished => None,
        }
    }

    /// Completes the pending write with a payload the caller read itself rather than
    /// through [`RequestDecoder::decode`]'s buffer (straight into a reusable buffer, say).
    /// `data` must be the whole payload, including any part that was in the buffer.
    pub fn finish_payload(&mut self, data: Bytes) -> Result<Decoded, ProtocolError> {
        match self.state {
            DecState::Payload { header, error } if data.len() == header.length as usize => {
                self.state = DecState::Header;
                Ok(complete_write(header, error, data))
            }
            _ => {
                self.state = DecState::Finished;
                Err(ProtocolError::UnexpectedPayload)
            }
        }
    }

    /// Decodes the next message from `buf`, or `Ok(None)` when more bytes are needed.
    /// After `Disconnect`, `RejectAndClose` or an error, the decoder is finished.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, ProtocolError> {
        loop {
            match self.state {
                DecState::Finished => return Err(ProtocolError::Finished),
                DecState::Header => {
                    if buf.len() < REQUEST_HEADER_LEN {
                        return Ok(None);
                    }
                    let header = match RequestHeader::decode(&buf[..REQUEST_HEADER_LEN]) {
                        Ok(header) => header,
                        Err(err) => {
                            self.state = DecState::Finished;
                            return Err(err);
                        }
                    };
                    buf.advance(REQUEST_HEADER_LEN);
                    if header.kind == cmd::WRITE {
                        if header.length > self.max_payload {
                            self.state = DecState::Finished;
                            return Ok(Some(Decoded::RejectAndClose {
                                cookie: header.cookie,
                                reason: ProtocolError::PayloadTooLarge {
                                    len: header.length,
                                    max: self.max_payload,
                                },
                            }));
                        }
                        let error = validate(&header, &self.export, self.max_payload).err();
                        self.state = DecState::Payload { header, error };
                        continue;
                    }
                    if header.kind == cmd::DISC {
                        self.state = DecState::Finished;
                        return Ok(Some(Decoded::Disconnect));
                    }
                    let decoded = match validate(&header, &self.export, self.max_payload) {
                        Ok(()) => Decoded::Request {
                            cookie: header.cookie,
                            command: command_without_payload(&header),
                        },
                        Err(error) => Decoded::Reject {
                            cookie: header.cookie,
                            kind: header.kind,
                            error,
                        },
                    };
                    return Ok(Some(decoded));
                }
                DecState::Payload { header, error } => {
                    let len = header.length as usize;
                    if buf.len() < len {
                        return Ok(None);
                    }
                    let data = buf.split_to(len).freeze();
                    self.state = DecState::Header;
                    return Ok(Some(complete_write(header, error, data)));
                }
            }
        }
    }
}

fn complete_write(header: RequestHeader, error: Option<ErrorCode>, data: Bytes) -> Decoded {
    match error {
        None => Decoded::Request {
            cookie: header.cookie,
            command: Command::Write {
                offset: header.offset,
                data,
                fua: header.flags & cmd_flags::FUA != 0,
            },
        },
        Some(error) => Decoded::Reject {
            cookie: header.cookie,
            kind: header.kind,
            error,
        },
    }
}

fn command_without_payload(header: &RequestHeader) -> Command {
    let fua = header.flags & cmd_flags::FUA != 0;
    match header.kind {
        cmd::READ => Command::Read {
            offset: header.offset,
            len: header.length,
        },
        cmd::TRIM => Command::Trim {
            offset: header.offset,
            len: header.length,
            fua,
        },
        cmd::WRITE_ZEROES => Command::WriteZeroes {
            offset: header.offset,
            len: header.length,
            fua,
        },
        // `validate` admits no other kind without a payload.
        _ => Command::Flush,
    }
}

/// Checks a request against its export: known command and flags, permission, range and
/// payload size. Pure; the error is the value to reply with.
pub fn validate(
    header: &RequestHeader,
    export: &ExportDescription,
    max_payload: u32,
) -> Result<(), ErrorCode> {
    let (allowed_flags, writes, ranged) = match header.kind {
        cmd::READ => (cmd_flags::FUA, false, true),
        cmd::WRITE => (cmd_flags::FUA, true, true),
        cmd::FLUSH => (cmd_flags::FUA, false, false),
        cmd::TRIM => (cmd_flags::FUA, true, true),
        cmd::WRITE_ZEROES => (cmd_flags::FUA | cmd_flags::NO_HOLE, true, true),
        cmd::DISC => (u16::MAX, false, false),
        _ => return Err(ErrorCode::EINVAL),
    };
    if header.flags & !allowed_flags != 0 {
        return Err(ErrorCode::EINVAL);
    }
    if writes && export.read_only {
        return Err(ErrorCode::EPERM);
    }
    if matches!(header.kind, cmd::READ | cmd::WRITE) && header.length > max_payload {
        return Err(ErrorCode::EINVAL);
    }
    if ranged {
        let in_range = header
            .offset
            .checked_add(u64::from(header.length))
            .is_some_and(|end| end <= export.size);
        if !in_range {
            return Err(ErrorCode::EINVAL);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
