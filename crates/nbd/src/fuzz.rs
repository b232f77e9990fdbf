//! Entry points of the fuzz targets in `fuzz/` (built with the `fuzzing` feature), also
//! replayed over the checked-in corpus by `tests/tests/fuzz_corpus.rs`: bytes a client
//! sends, fed to the server's pure decoders ([`Negotiation`], [`RequestDecoder`]) in
//! chunks. Any panic, any request let through out of its export's range, any buffer request
//! above the protocol's bounds, and anything about an export before TLS where it is
//! required is a bug.

use bytes::{Bytes, BytesMut};

use crate::proto::{
    Command, Decoded, ExportCatalog, ExportDescription, MAX_OPTION_DATA, Negotiation,
    NegotiationEvent, OPTION_REPLY_HEADER_LEN, OptionReplyHeader, REQUEST_HEADER_LEN,
    RequestDecoder, TlsPolicy, rep,
};

/// Largest payload the fuzzed decoders accept: small, so that no input allocates much.
const MAX_PAYLOAD: u32 = 64 * 1024;

/// Two exports, one writable and one read-only.
struct Catalog;

impl ExportCatalog for Catalog {
    type Handle = ();

    fn names(&self) -> Vec<String> {
        vec!["disk".to_owned(), "ro".to_owned()]
    }

    fn lookup(&self, name: &str) -> Option<(ExportDescription, ())> {
        let (size, read_only) = match name {
            "disk" => (1 << 20, false),
            "ro" => (64 * 1024, true),
            _ => return None,
        };
        Some((ExportDescription { size, read_only }, ()))
    }
}

/// Bytes of the client's stream handed to a decoder at a time: the first input byte, 0
/// meaning everything at once.
fn chunking(data: &[u8]) -> (usize, &[u8]) {
    match data.split_first() {
        Some((0, rest)) => (usize::MAX, rest),
        Some((&n, rest)) => (usize::from(n), rest),
        None => (usize::MAX, data),
    }
}

/// Moves the next chunk of `rest` into `input`; false once `rest` is exhausted.
fn feed(input: &mut BytesMut, rest: &mut &[u8], chunk: usize) -> bool {
    if rest.is_empty() {
        return false;
    }
    let (next, after) = rest.split_at(chunk.min(rest.len()));
    input.extend_from_slice(next);
    *rest = after;
    true
}

/// The server's handshake, then the transmission phase on what follows a chosen export,
/// once on a server without TLS and once on one that requires it (where whatever follows
/// `NBD_OPT_STARTTLS` counts as arriving over TLS, unless it came with it in plaintext).
/// Input: one chunking byte, then the client's bytes.
pub fn handshake(data: &[u8]) {
    negotiate(data, TlsPolicy::Off);
    negotiate(data, TlsPolicy::Required);
}

fn negotiate(data: &[u8], policy: TlsPolicy) {
    let (chunk, mut rest) = chunking(data);
    let mut negotiation = Negotiation::with_tls(MAX_PAYLOAD, policy);
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    loop {
        out.clear();
        let tls = negotiation.tls();
        let event = negotiation.advance(&mut input, &Catalog, &mut out);
        // An export chosen with `NBD_OPT_EXPORT_NAME` is answered with a bare reply.
        if !matches!(event, Ok(NegotiationEvent::Transmission { .. })) {
            check_option_replies(&out, tls);
        }
        match event {
            Err(_) | Ok(NegotiationEvent::Aborted) => return,
            Ok(NegotiationEvent::StartTls) => {
                assert_eq!(policy, TlsPolicy::Required, "starttls taken without TLS");
                // The server refuses plaintext that came with the STARTTLS request.
                if !input.is_empty() || !feed(&mut input, &mut rest, chunk) {
                    return;
                }
            }
            Ok(NegotiationEvent::NeedMore(more)) => {
                assert!(
                    (1..=MAX_OPTION_DATA).contains(&more),
                    "asked for {more} bytes"
                );
                if !feed(&mut input, &mut rest, chunk) {
                    return;
                }
            }
            Ok(NegotiationEvent::Transmission { export, .. }) => {
                assert_ne!(
                    negotiation.tls(),
                    TlsPolicy::Required,
                    "transmission before TLS"
                );
                decode_requests(export, input, rest, chunk, false);
                return;
            }
        }
    }
}

/// The transmission phase alone. Input: one chunking byte, one byte choosing the export
/// (bit 0: read-only; bits 1-2: its size, 0 bytes to 1 MiB; bit 3: write payloads read
/// the way the server reads large ones, outside the decoder), then the client's requests.
pub fn transmission(data: &[u8]) {
    let (chunk, rest) = chunking(data);
    let Some((&shape, rest)) = rest.split_first() else {
        return;
    };
    let export = ExportDescription {
        read_only: shape & 1 != 0,
        size: [0, 4096, 65536 + 512, 1 << 20][usize::from(shape >> 1 & 3)],
    };
    decode_requests(export, BytesMut::new(), rest, chunk, shape & 8 != 0);
}

fn decode_requests(
    export: ExportDescription,
    mut input: BytesMut,
    mut rest: &[u8],
    chunk: usize,
    direct_payloads: bool,
) {
    let mut decoder = RequestDecoder::new(export, MAX_PAYLOAD);
    let max_frame = REQUEST_HEADER_LEN.max(MAX_PAYLOAD as usize);
    loop {
        assert!(
            decoder.frame_len() <= max_frame,
            "frame of {} bytes",
            decoder.frame_len()
        );
        let decoded = match decoder.pending_payload() {
            Some(len) if direct_payloads && input.len() + rest.len() >= len => {
                let have = input.len().min(len);
                let mut payload = input.split_to(have).to_vec();
                let (tail, after) = rest.split_at(len - have);
                payload.extend_from_slice(tail);
                rest = after;
                decoder.finish_payload(Bytes::from(payload)).map(Some)
            }
            _ => decoder.decode(&mut input),
        };
        match decoded {
            Err(_) | Ok(Some(Decoded::Disconnect | Decoded::RejectAndClose { .. })) => return,
            Ok(Some(Decoded::Request { command, .. })) => check_in_range(&export, &command),
            Ok(Some(Decoded::Reject { .. })) => {}
            Ok(None) => {
                if !feed(&mut input, &mut rest, chunk) {
                    return;
                }
            }
        }
    }
}

/// A request let through must fit its export and the payload bound.
fn check_in_range(export: &ExportDescription, command: &Command) {
    let (offset, len, writes) = match command {
        Command::Read { offset, len } => (*offset, u64::from(*len), false),
        Command::Write { offset, data, .. } => (*offset, data.len() as u64, true),
        Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. } => {
            (*offset, u64::from(*len), true)
        }
        Command::Flush => return,
    };
    assert!(
        offset
            .checked_add(len)
            .is_some_and(|end| end <= export.size),
        "{command:?} outside an export of {} bytes",
        export.size
    );
    assert!(
        !(writes && export.read_only),
        "{command:?} on a read-only export"
    );
    if matches!(command, Command::Read { .. } | Command::Write { .. }) {
        assert!(
            len <= u64::from(MAX_PAYLOAD),
            "{command:?} over the maximum"
        );
    }
}

/// `out` holds whole, well-formed option replies; before TLS where it is required, none
/// but errors and acknowledgements (no export list, no export's size).
fn check_option_replies(mut out: &[u8], tls: TlsPolicy) {
    while !out.is_empty() {
        let header = OptionReplyHeader::decode(out).expect("option reply header");
        assert!(
            matches!(header.reply, rep::ACK | rep::SERVER | rep::INFO)
                || header.reply & rep::ERR_BIT != 0,
            "reply type {:#x}",
            header.reply
        );
        if tls == TlsPolicy::Required {
            assert!(
                header.reply == rep::ACK || header.reply & rep::ERR_BIT != 0,
                "reply {:#x} to option {} before TLS",
                header.reply,
                header.option
            );
        }
        let total = OPTION_REPLY_HEADER_LEN + header.len as usize;
        assert!(out.len() >= total, "truncated option reply");
        out = &out[total..];
    }
}
