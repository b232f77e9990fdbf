//! The NBD negotiation and framing state machines: options before and after STARTTLS,
//! exports, bounded parsing.

use super::*;

struct OneExport;

impl ExportCatalog for OneExport {
    type Handle = ();
    fn names(&self) -> Vec<String> {
        vec!["disk".to_owned()]
    }
    fn lookup(&self, name: &str) -> Option<(ExportDescription, ())> {
        (name == "disk").then_some((
            ExportDescription {
                size: 1 << 20,
                read_only: false,
            },
            (),
        ))
    }
}

fn go(name: &str) -> BytesMut {
    let mut data = BytesMut::new();
    InfoRequest {
        name: name.to_owned(),
        requests: vec![info::BLOCK_SIZE],
    }
    .encode(&mut data);
    let mut buf = BytesMut::new();
    put_option(&mut buf, opt::GO, &data);
    buf
}

fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut all = Vec::new();
    while !out.is_empty() {
        let header = OptionReplyHeader::decode(out).unwrap();
        out.advance(OPTION_REPLY_HEADER_LEN);
        let data = out[..header.len as usize].to_vec();
        out.advance(header.len as usize);
        all.push((header.option, header.reply, data));
    }
    all
}

#[test]
fn go_with_known_export_enters_transmission() {
    let mut neg = Negotiation::new(DEFAULT_MAX_PAYLOAD);
    let mut input = BytesMut::new();
    input.put_u32(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
    input.extend_from_slice(&go("disk"));
    let mut out = BytesMut::new();
    let event = neg.advance(&mut input, &OneExport, &mut out).unwrap();
    assert!(matches!(event, NegotiationEvent::Transmission { ref name, .. } if name == "disk"));
    let replies = replies(&out);
    assert_eq!(replies.len(), 3);
    assert_eq!(replies[0].1, rep::INFO);
    assert_eq!(&replies[0].2[..2], &[0, 0]);
    assert_eq!(
        u64::from_be_bytes(replies[0].2[2..10].try_into().unwrap()),
        1 << 20
    );
    assert_eq!(replies[1].2.len(), 14);
    assert_eq!(replies[2].1, rep::ACK);
    assert!(input.is_empty());
}

#[test]
fn go_with_unknown_export_is_refused_and_negotiation_goes_on() {
    let mut neg = Negotiation::new(DEFAULT_MAX_PAYLOAD);
    let mut input = BytesMut::new();
    input.put_u32(client_flags::FIXED_NEWSTYLE);
    input.extend_from_slice(&go("nope"));
    let mut out = BytesMut::new();
    let event = neg.advance(&mut input, &OneExport, &mut out).unwrap();
    assert!(matches!(
        event,
        NegotiationEvent::NeedMore(OPTION_HEADER_LEN)
    ));
    assert_eq!(replies(&out)[0].1, rep::ERR_UNKNOWN);
}

#[test]
fn a_server_requiring_tls_refuses_every_option_but_starttls_until_it_upgraded() {
    let mut neg = Negotiation::with_tls(DEFAULT_MAX_PAYLOAD, TlsPolicy::Required);
    let mut input = BytesMut::new();
    input.put_u32(client_flags::FIXED_NEWSTYLE);
    put_option(&mut input, opt::LIST, &[]);
    input.extend_from_slice(&go("disk"));
    put_option(&mut input, opt::INFO, &go("disk")[OPTION_HEADER_LEN..]);
    put_option(&mut input, opt::STARTTLS, b"x");
    put_option(&mut input, opt::STARTTLS, &[]);
    let mut out = BytesMut::new();
    let event = neg.advance(&mut input, &OneExport, &mut out).unwrap();
    assert!(matches!(event, NegotiationEvent::StartTls), "{event:?}");
    let got: Vec<(u32, u32)> = replies(&out).iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(
        got,
        [
            (opt::LIST, rep::ERR_TLS_REQD),
            (opt::GO, rep::ERR_TLS_REQD),
            (opt::INFO, rep::ERR_TLS_REQD),
            (opt::STARTTLS, rep::ERR_INVALID),
            (opt::STARTTLS, rep::ACK),
        ]
    );
    // Nothing about the export went out before TLS.
    assert!(!out.windows(4).any(|w| w == b"disk"));
    assert_eq!(neg.tls(), TlsPolicy::Established);
    // Over TLS the options are served, and a second STARTTLS is invalid.
    let mut input = BytesMut::new();
    put_option(&mut input, opt::STARTTLS, &[]);
    input.extend_from_slice(&go("disk"));
    let mut out = BytesMut::new();
    let event = neg.advance(&mut input, &OneExport, &mut out).unwrap();
    assert!(matches!(event, NegotiationEvent::Transmission { .. }));
    assert_eq!(replies(&out)[0].1, rep::ERR_INVALID);
}

#[test]
fn export_name_before_tls_closes_and_abort_is_still_taken() {
    let mut neg = Negotiation::with_tls(DEFAULT_MAX_PAYLOAD, TlsPolicy::Required);
    let mut input = BytesMut::new();
    input.put_u32(client_flags::FIXED_NEWSTYLE);
    put_option(&mut input, opt::EXPORT_NAME, b"disk");
    let mut out = BytesMut::new();
    let err = neg.advance(&mut input, &OneExport, &mut out).unwrap_err();
    assert_eq!(err, ProtocolError::TlsRequired);
    assert!(out.is_empty());
    let mut neg = Negotiation::with_tls(DEFAULT_MAX_PAYLOAD, TlsPolicy::Required);
    let mut input = BytesMut::new();
    input.put_u32(client_flags::FIXED_NEWSTYLE);
    put_option(&mut input, opt::ABORT, &[]);
    let event = neg.advance(&mut input, &OneExport, &mut out).unwrap();
    assert!(matches!(event, NegotiationEvent::Aborted));
}

#[test]
fn starttls_is_unsupported_where_tls_is_off() {
    let mut neg = Negotiation::new(DEFAULT_MAX_PAYLOAD);
    let mut input = BytesMut::new();
    input.put_u32(client_flags::FIXED_NEWSTYLE);
    put_option(&mut input, opt::STARTTLS, &[]);
    let mut out = BytesMut::new();
    let event = neg.advance(&mut input, &OneExport, &mut out).unwrap();
    assert!(matches!(event, NegotiationEvent::NeedMore(_)));
    assert_eq!(replies(&out)[0].1, rep::ERR_UNSUP);
}

#[test]
fn export_name_pads_unless_no_zeroes() {
    for (flags, expected) in [(0, 10 + 124), (client_flags::NO_ZEROES, 10)] {
        let mut neg = Negotiation::new(DEFAULT_MAX_PAYLOAD);
        let mut input = BytesMut::new();
        input.put_u32(client_flags::FIXED_NEWSTYLE | flags);
        put_option(&mut input, opt::EXPORT_NAME, b"disk");
        let mut out = BytesMut::new();
        let event = neg.advance(&mut input, &OneExport, &mut out).unwrap();
        assert!(matches!(event, NegotiationEvent::Transmission { .. }));
        assert_eq!(out.len(), expected);
    }
}

#[test]
fn export_name_with_unknown_export_is_an_error() {
    let mut neg = Negotiation::new(DEFAULT_MAX_PAYLOAD);
    let mut input = BytesMut::new();
    input.put_u32(client_flags::FIXED_NEWSTYLE);
    put_option(&mut input, opt::EXPORT_NAME, b"nope");
    let mut out = BytesMut::new();
    let err = neg.advance(&mut input, &OneExport, &mut out).unwrap_err();
    assert_eq!(err, ProtocolError::UnknownExport("nope".into()));
    assert!(out.is_empty());
}

#[test]
fn oversized_unknown_option_is_skipped_without_buffering() {
    let mut neg = Negotiation::new(DEFAULT_MAX_PAYLOAD);
    let mut input = BytesMut::new();
    input.put_u32(client_flags::FIXED_NEWSTYLE);
    input.put_u64(IHAVEOPT);
    input.put_u32(99);
    input.put_u32(1 << 30);
    let mut out = BytesMut::new();
    let event = neg.advance(&mut input, &OneExport, &mut out).unwrap();
    assert!(matches!(event, NegotiationEvent::NeedMore(n) if n <= MAX_OPTION_DATA));
    let mut sent = 0u64;
    while sent < 1 << 30 {
        let chunk = (1u64 << 20).min((1 << 30) - sent);
        input.put_bytes(0xaa, chunk as usize);
        sent += chunk;
        neg.advance(&mut input, &OneExport, &mut out).unwrap();
        assert!(input.is_empty());
    }
    assert_eq!(replies(&out)[0].1, rep::ERR_UNSUP);
}

fn header(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        kind,
        cookie: Cookie(7),
        offset,
        length,
    }
}

#[test]
fn validate_checks_range_flags_and_permissions() {
    let rw = ExportDescription {
        size: 4096,
        read_only: false,
    };
    let ro = ExportDescription {
        size: 4096,
        read_only: true,
    };
    let max = 1024;
    assert_eq!(validate(&header(cmd::READ, 0, 0, 1024), &rw, max), Ok(()));
    assert_eq!(
        validate(&header(cmd::READ, 0, 0, 1025), &rw, max),
        Err(ErrorCode::EINVAL)
    );
    assert_eq!(
        validate(&header(cmd::READ, 0, 3500, 1000), &rw, max),
        Err(ErrorCode::EINVAL)
    );
    assert_eq!(
        validate(&header(cmd::TRIM, 0, u64::MAX, 2), &rw, max),
        Err(ErrorCode::EINVAL)
    );
    assert_eq!(
        validate(&header(cmd::WRITE, 0, 0, 512), &ro, max),
        Err(ErrorCode::EPERM)
    );
    assert_eq!(
        validate(
            &header(cmd::WRITE_ZEROES, cmd_flags::NO_HOLE, 0, 4096),
            &rw,
            max
        ),
        Ok(())
    );
    assert_eq!(
        validate(&header(cmd::READ, cmd_flags::DF, 0, 512), &rw, max),
        Err(ErrorCode::EINVAL)
    );
    assert_eq!(
        validate(&header(cmd::CACHE, 0, 0, 512), &rw, max),
        Err(ErrorCode::EINVAL)
    );
    assert_eq!(validate(&header(cmd::FLUSH, 0, 0, 0), &ro, max), Ok(()));
}

#[test]
fn decoder_consumes_rejected_write_payload_and_closes_on_oversized() {
    let export = ExportDescription {
        size: 4096,
        read_only: false,
    };
    let mut dec = RequestDecoder::new(export, 1024);
    let mut buf = BytesMut::new();
    header(cmd::WRITE, 0, 4000, 512).encode(&mut buf);
    buf.put_bytes(1, 512);
    header(cmd::WRITE, 0, 0, 512).encode(&mut buf);
    buf.put_bytes(2, 512);
    header(cmd::WRITE, 0, 0, 2048).encode(&mut buf);
    let first = dec.decode(&mut buf).unwrap().unwrap();
    assert!(matches!(
        first,
        Decoded::Reject {
            error: ErrorCode::EINVAL,
            ..
        }
    ));
    let second = dec.decode(&mut buf).unwrap().unwrap();
    assert!(
        matches!(second, Decoded::Request { command: Command::Write { offset: 0, ref data, fua: false }, .. } if data.len() == 512 && data[0] == 2)
    );
    let third = dec.decode(&mut buf).unwrap().unwrap();
    assert!(matches!(third, Decoded::RejectAndClose { .. }));
    assert_eq!(dec.decode(&mut buf), Err(ProtocolError::Finished));
}
