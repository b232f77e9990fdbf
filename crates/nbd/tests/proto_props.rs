//! Property tests of the pure protocol decoders: arbitrary bytes, in arbitrary chunks,
//! never panic and never make them buffer more than a bounded amount; structured input
//! is answered with well-formed replies; every request they let through is in range.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use tandem_nbd::proto::{
    self, Command, Cookie, Decoded, ExportCatalog, ExportDescription, InfoRequest, MAX_OPTION_DATA,
    Negotiation, NegotiationEvent, OPTION_HEADER_LEN, OPTION_REPLY_HEADER_LEN, OptionReplyHeader,
    REQUEST_HEADER_LEN, RequestDecoder, RequestHeader, cmd, opt, rep,
};

struct Catalog;

const SIZE: u64 = 1 << 20;

impl ExportCatalog for Catalog {
    type Handle = u8;
    fn names(&self) -> Vec<String> {
        vec!["disk".into(), "other".into()]
    }
    fn lookup(&self, name: &str) -> Option<(ExportDescription, u8)> {
        match name {
            "disk" => Some((
                ExportDescription {
                    size: SIZE,
                    read_only: false,
                },
                1,
            )),
            "other" => Some((
                ExportDescription {
                    size: 4096,
                    read_only: true,
                },
                2,
            )),
            _ => None,
        }
    }
}

/// Splits `data` into chunks at the given cut points.
fn chunks(data: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    points.push(0);
    points.push(data.len());
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| data[w[0]..w[1]].to_vec())
        .collect()
}

/// Checks that `out` is a sequence of well-formed option replies (plus, at the end, an
/// export-name reply when the negotiation ended with one).
fn check_option_replies(mut out: &[u8]) {
    while out.len() >= OPTION_REPLY_HEADER_LEN {
        let header = OptionReplyHeader::decode(out).expect("reply magic");
        assert!(
            matches!(header.reply, rep::ACK | rep::SERVER | rep::INFO)
                || header.reply & rep::ERR_BIT != 0
        );
        let total = OPTION_REPLY_HEADER_LEN + header.len as usize;
        assert!(out.len() >= total, "truncated option reply");
        out = &out[total..];
    }
}

fn feed_negotiation(
    input: &[u8],
    cuts: &[usize],
) -> (BytesMut, Result<bool, proto::ProtocolError>) {
    let mut negotiation = Negotiation::new(proto::DEFAULT_MAX_PAYLOAD);
    let mut buffer = BytesMut::new();
    let mut out = BytesMut::new();
    for chunk in chunks(input, cuts) {
        buffer.extend_from_slice(&chunk);
        match negotiation.advance(&mut buffer, &Catalog, &mut out) {
            Ok(NegotiationEvent::NeedMore(more)) => {
                assert!(more >= 1);
                assert!(more <= MAX_OPTION_DATA.max(OPTION_HEADER_LEN));
                // Whatever is left is less than one buffered frame.
                assert!(buffer.len() < MAX_OPTION_DATA + OPTION_HEADER_LEN);
            }
            Ok(NegotiationEvent::Transmission { handle, .. }) => {
                assert!(handle == 1 || handle == 2);
                return (out, Ok(true));
            }
            Ok(NegotiationEvent::Aborted) => return (out, Ok(false)),
            Ok(NegotiationEvent::StartTls) => panic!("STARTTLS taken without TLS"),
            Err(err) => return (out, Err(err)),
        }
    }
    (out, Ok(false))
}

#[derive(Debug, Clone)]
enum Opt {
    Raw {
        option: u32,
        data: Vec<u8>,
    },
    Go {
        option: u32,
        name: String,
        infos: Vec<u16>,
    },
    BadMagic,
}

fn option_strategy() -> impl Strategy<Value = Opt> {
    prop_oneof![
        (
            prop_oneof![
                Just(opt::LIST),
                Just(opt::STRUCTURED_REPLY),
                Just(opt::STARTTLS),
                0u32..20,
                any::<u32>()
            ],
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(option, data)| Opt::Raw { option, data }),
        (
            prop_oneof![Just(opt::INFO), Just(opt::GO)],
            prop_oneof![
                Just("disk".to_owned()),
                Just("other".to_owned()),
                "[a-z]{0,8}"
            ],
            proptest::collection::vec(0u16..5, 0..4)
        )
            .prop_map(|(option, name, infos)| Opt::Go {
                option,
                name,
                infos
            }),
        Just(Opt::BadMagic),
    ]
}

fn encode_options(flags: u32, options: &[Opt]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    buf.put_u32(flags);
    for option in options {
        match option {
            Opt::Raw { option, data } => proto::put_option(&mut buf, *option, data),
            Opt::Go {
                option,
                name,
                infos,
            } => {
                let mut data = BytesMut::new();
                InfoRequest {
                    name: name.clone(),
                    requests: infos.clone(),
                }
                .encode(&mut data);
                proto::put_option(&mut buf, *option, &data);
            }
            Opt::BadMagic => buf.put_slice(&[0xee; OPTION_HEADER_LEN]),
        }
    }
    buf.to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn negotiation_survives_arbitrary_bytes(
        input in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let _ = feed_negotiation(&input, &cuts);
    }

    #[test]
    fn negotiation_survives_arbitrary_bytes_after_valid_flags(
        input in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut data = 1u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"IHAVEOPT");
        data.extend_from_slice(&input);
        let _ = feed_negotiation(&data, &cuts);
    }

    #[test]
    fn negotiation_answers_structured_options(
        no_zeroes in any::<bool>(),
        options in proptest::collection::vec(option_strategy(), 0..8),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let flags = 1 | if no_zeroes { 2 } else { 0 };
        let input = encode_options(flags, &options);
        let (out, result) = feed_negotiation(&input, &cuts);
        // Option replies up to the point where the negotiation ended.
        let first_end = options.iter().position(|o| match o {
            Opt::Raw { option, .. } => *option == opt::ABORT || *option == opt::EXPORT_NAME,
            Opt::Go { option, name, .. } => *option == opt::GO && (name == "disk" || name == "other"),
            Opt::BadMagic => true,
        });
        match first_end.map(|i| &options[i]) {
            None => {
                prop_assert!(matches!(result, Ok(false)));
                check_option_replies(&out);
            }
            Some(Opt::BadMagic) => prop_assert!(result.is_err()),
            Some(Opt::Raw { option, .. }) if *option == opt::ABORT => {
                prop_assert!(matches!(result, Ok(false)));
                check_option_replies(&out);
            }
            Some(Opt::Raw { .. }) => {
                // EXPORT_NAME with random bytes: unknown export, or a known one.
                prop_assert!(result.is_err() || matches!(result, Ok(true)));
            }
            Some(Opt::Go { .. }) => {
                prop_assert!(matches!(result, Ok(true)));
                check_option_replies(&out);
            }
        }
    }

    #[test]
    fn request_decoder_survives_arbitrary_bytes(
        input in proptest::collection::vec(any::<u8>(), 0..4096),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        max_payload in 0u32..8192,
        read_only in any::<bool>(),
    ) {
        let export = ExportDescription { size: 65536, read_only };
        check_request_stream(export, max_payload, &input, &cuts)?;
    }

    #[test]
    fn request_decoder_validates_structured_requests(
        requests in proptest::collection::vec(
            (
                prop_oneof![0u16..9, any::<u16>()],
                prop_oneof![Just(0u16), Just(1u16), 0u16..64, any::<u16>()],
                prop_oneof![0u64..80_000, Just(u64::MAX - 100), any::<u64>()],
                prop_oneof![0u32..10_000, any::<u32>()],
            ),
            0..16,
        ),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        read_only in any::<bool>(),
    ) {
        let export = ExportDescription { size: 65536, read_only };
        let max_payload = 8192;
        let mut input = BytesMut::new();
        for (i, (kind, flags, offset, length)) in requests.iter().enumerate() {
            RequestHeader { flags: *flags, kind: *kind, cookie: Cookie(i as u64), offset: *offset, length: *length }
                .encode(&mut input);
            if *kind == cmd::WRITE && *length <= max_payload {
                input.put_bytes(i as u8, *length as usize);
            }
        }
        let decoded = check_request_stream(export, max_payload, &input, &cuts)?;
        // Every request is answered (or the stream ended at a disconnect or an oversized
        // write), in order, and valid ones are exactly those `validate` accepts.
        let mut expected = requests.iter().enumerate();
        for message in decoded {
            let (i, (kind, flags, offset, length)) = expected.next().unwrap();
            let header = RequestHeader { flags: *flags, kind: *kind, cookie: Cookie(i as u64), offset: *offset, length: *length };
            match message {
                Decoded::Request { cookie, command } => {
                    prop_assert_eq!(cookie, Cookie(i as u64));
                    prop_assert!(proto::validate(&header, &export, max_payload).is_ok());
                    if let Command::Write { data, .. } = command {
                        prop_assert!(data.iter().all(|&b| b == i as u8));
                    }
                }
                Decoded::Reject { cookie, error, .. } => {
                    prop_assert_eq!(cookie, Cookie(i as u64));
                    prop_assert_eq!(proto::validate(&header, &export, max_payload), Err(error));
                }
                Decoded::RejectAndClose { cookie, .. } => {
                    prop_assert_eq!(cookie, Cookie(i as u64));
                    prop_assert!(*kind == cmd::WRITE && *length > max_payload);
                }
                Decoded::Disconnect => prop_assert_eq!(*kind, cmd::DISC),
            }
        }
    }
}

/// Feeds a byte stream to a request decoder; checks bounds on everything it yields and on
/// what it buffers; returns the decoded messages.
fn check_request_stream(
    export: ExportDescription,
    max_payload: u32,
    input: &[u8],
    cuts: &[usize],
) -> Result<Vec<Decoded>, TestCaseError> {
    let mut decoder = RequestDecoder::new(export, max_payload);
    let mut buffer = BytesMut::new();
    let mut decoded = Vec::new();
    'feed: for chunk in chunks(input, cuts) {
        buffer.extend_from_slice(&chunk);
        loop {
            match decoder.decode(&mut buffer) {
                Ok(None) => {
                    let frame = decoder.frame_len();
                    prop_assert!(frame <= (max_payload as usize).max(REQUEST_HEADER_LEN));
                    prop_assert!(buffer.len() < frame);
                    continue 'feed;
                }
                Ok(Some(message)) => {
                    if let Decoded::Request { command, .. } = &message {
                        let (offset, len) = match command {
                            Command::Read { offset, len } => (*offset, u64::from(*len)),
                            Command::Write { offset, data, .. } => (*offset, data.len() as u64),
                            Command::Trim { offset, len, .. }
                            | Command::WriteZeroes { offset, len, .. } => {
                                (*offset, u64::from(*len))
                            }
                            Command::Flush => (0, 0),
                        };
                        prop_assert!(
                            offset
                                .checked_add(len)
                                .is_some_and(|end| end <= export.size)
                        );
                        if matches!(command, Command::Read { .. } | Command::Write { .. }) {
                            prop_assert!(len <= u64::from(max_payload));
                        }
                        if export.read_only {
                            let harmless = matches!(command, Command::Read { .. } | Command::Flush);
                            prop_assert!(harmless, "write-like request to a read-only export");
                        }
                    }
                    let last = matches!(
                        message,
                        Decoded::Disconnect | Decoded::RejectAndClose { .. }
                    );
                    decoded.push(message);
                    if last {
                        break 'feed;
                    }
                }
                Err(_) => break 'feed,
            }
        }
    }
    Ok(decoded)
}
