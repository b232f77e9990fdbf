//! Misbehaving clients: garbage, oversized and out-of-range requests, unknown exports,
//! disconnects in the middle of a request. The offending connection gets its error or is
//! closed, the data outside the request is untouched (hashes before and after), and other
//! clients carry on. Also read-only exports, export removal and shutdown.

mod common;

use std::{future::Future, io, sync::Arc, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use common::{TestServer, hash_file, random_image};
use tandem_nbd::{
    BlockDevice, ErrorCode, Exports, FileDevice, IoFuture, MemDevice, NbdClient, NbdError,
    ServerConfig,
    client::encode_request,
    proto::{
        self, InfoRequest, OPTION_REPLY_HEADER_LEN, OptionReplyHeader, client_flags, cmd, info,
        opt, rep,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Guards against hangs only; no test asserts on timing.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish"))
}

/// Reads until the server closes the connection; returns what was read.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    within("server closing the connection", async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    all
}

/// Reads the greeting and answers with fixed-newstyle client flags.
async fn raw_greet(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; proto::GREETING_LEN];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    assert_eq!(&greeting[8..16], b"IHAVEOPT");
    stream
        .write_all(&(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    stream
}

async fn send_option(stream: &mut TcpStream, option: u32, data: &[u8]) {
    let mut buf = BytesMut::new();
    proto::put_option(&mut buf, option, data);
    stream.write_all(&buf).await.unwrap();
}

async fn read_option_reply(stream: &mut TcpStream) -> (OptionReplyHeader, Vec<u8>) {
    let mut raw = [0u8; OPTION_REPLY_HEADER_LEN];
    within("option reply", stream.read_exact(&mut raw))
        .await
        .unwrap();
    let header = OptionReplyHeader::decode(&raw).unwrap();
    let mut data = vec![0u8; header.len as usize];
    stream.read_exact(&mut data).await.unwrap();
    (header, data)
}

fn go_data(name: &str) -> BytesMut {
    let mut data = BytesMut::new();
    InfoRequest {
        name: name.to_owned(),
        requests: vec![info::BLOCK_SIZE],
    }
    .encode(&mut data);
    data
}

/// A raw connection in transmission on `name`.
async fn raw_go(addr: std::net::SocketAddr, name: &str) -> TcpStream {
    let mut stream = raw_greet(addr).await;
    send_option(&mut stream, opt::GO, &go_data(name)).await;
    loop {
        let (header, _) = read_option_reply(&mut stream).await;
        match header.reply {
            rep::INFO => {}
            rep::ACK => return stream,
            other => panic!("go refused with {other:#x}"),
        }
    }
}

async fn read_simple_reply(stream: &mut TcpStream) -> proto::SimpleReply {
    let mut raw = [0u8; proto::SIMPLE_REPLY_LEN];
    within("simple reply", stream.read_exact(&mut raw))
        .await
        .unwrap();
    proto::SimpleReply::decode(&raw).unwrap()
}

async fn served_image(
    size: usize,
    seed: u64,
) -> (tempfile::TempDir, std::path::PathBuf, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let path = random_image(dir.path(), "disk.raw", size, seed);
    let server = TestServer::serve_files(&[&path]).await;
    (dir, path, server)
}

/// A well-behaved client writes a block, reads it back, and returns the expected image.
async fn good_client_round_trip(client: &NbdClient, mut image: Vec<u8>, offset: usize) -> Vec<u8> {
    let data = common::random_bytes(64 * KIB, offset as u64);
    client
        .write(offset as u64, Bytes::from(data.clone()), false)
        .await
        .unwrap();
    let back = client.read(offset as u64, data.len() as u32).await.unwrap();
    assert_eq!(&back[..], &data[..]);
    client.flush().await.unwrap();
    image[offset..offset + data.len()].copy_from_slice(&data);
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_that_connection() {
    let (_dir, path, server) = served_image(4 * MIB, 10).await;
    let image = std::fs::read(&path).unwrap();
    let good = NbdClient::connect(server.addr, "disk").await.unwrap();

    // Garbage instead of an option.
    let mut bad = raw_greet(server.addr).await;
    bad.write_all(b"this is not an nbd option header at all")
        .await
        .unwrap();
    read_until_closed(&mut bad).await;

    // Unknown client flags.
    let mut bad = TcpStream::connect(server.addr).await.unwrap();
    let mut greeting = [0u8; proto::GREETING_LEN];
    bad.read_exact(&mut greeting).await.unwrap();
    bad.write_all(&0xffff_0000u32.to_be_bytes()).await.unwrap();
    read_until_closed(&mut bad).await;

    // Garbage in transmission, after one valid request.
    let mut bad = raw_go(server.addr, "disk").await;
    bad.write_all(&encode_request(cmd::READ, 0, 1, 0, 512))
        .await
        .unwrap();
    let reply = read_simple_reply(&mut bad).await;
    assert_eq!(reply.error, ErrorCode::OK);
    let mut sector = [0u8; 512];
    bad.read_exact(&mut sector).await.unwrap();
    assert_eq!(&sector[..], &image[..512]);
    bad.write_all(&[0xde; 100]).await.unwrap();
    read_until_closed(&mut bad).await;

    let expected = good_client_round_trip(&good, image, MIB).await;
    good.disconnect().await.unwrap();
    server.stop().await;
    assert_eq!(std::fs::read(&path).unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_write_gets_einval_and_its_connection_closes() {
    let dir = tempfile::tempdir().unwrap();
    let path = random_image(dir.path(), "disk.raw", 4 * MIB, 11);
    let hash = hash_file(&path);
    let exports = Exports::new();
    exports
        .insert("disk", Arc::new(FileDevice::open(&path).unwrap()))
        .unwrap();
    let config = ServerConfig {
        max_payload: 64 * KIB as u32,
        ..ServerConfig::default()
    };
    let server = TestServer::start_with_config(exports, config).await;
    let other = NbdClient::connect(server.addr, "disk").await.unwrap();
    assert_eq!(other.info().max_block, 64 * KIB as u32);

    let client = NbdClient::connect(server.addr, "disk").await.unwrap();
    // A read over the maximum is refused and the connection goes on.
    let err = client.read(0, 128 * KIB as u32).await.unwrap_err();
    assert_eq!(err.remote_error(), Some(ErrorCode::EINVAL));
    client.read(0, 4096).await.unwrap();
    // A write over the maximum is refused, and the connection closed.
    let err = within(
        "oversized write",
        client.write(0, Bytes::from(vec![0x42; 128 * KIB]), false),
    )
    .await
    .unwrap_err();
    assert_eq!(err.remote_error(), Some(ErrorCode::EINVAL), "{err}");
    let next = within("request after close", client.read(0, 4096)).await;
    assert!(matches!(next, Err(NbdError::Disconnected)), "{next:?}");

    // The other client is unaffected, and the file is untouched.
    let data = other.read(0, 64 * KIB as u32).await.unwrap();
    assert_eq!(&data[..], &std::fs::read(&path).unwrap()[..64 * KIB]);
    other.disconnect().await.unwrap();
    server.stop().await;
    assert_eq!(hash_file(&path), hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_requests_get_einval_and_leave_data_untouched() {
    let (_dir, path, server) = served_image(MIB, 12).await;
    let image = std::fs::read(&path).unwrap();
    let client = NbdClient::connect(server.addr, "disk").await.unwrap();
    let size = client.size();
    assert_eq!(size, MIB as u64);

    let block = || Bytes::from(vec![0x99; 8 * KIB]);
    let cases: Vec<(&str, Result<(), NbdError>)> = vec![
        (
            "write across the end",
            client.write(size - 4096, block(), false).await,
        ),
        (
            "write past the end",
            client.write(size, block(), true).await,
        ),
        (
            "large write across the end",
            client
                .write(size - 64 * 1024, Bytes::from(vec![0x98; 256 * KIB]), false)
                .await,
        ),
        (
            "write at u64::MAX",
            client.write(u64::MAX - 10, block(), false).await,
        ),
        (
            "read across the end",
            client.read(size - 1, 2).await.map(drop),
        ),
        ("trim across the end", client.trim(size - 512, 1024).await),
        (
            "zeroes past the end",
            client.write_zeroes(size + 4096, 4096, false).await,
        ),
    ];
    for (what, result) in cases {
        let err = result.expect_err(what);
        assert_eq!(err.remote_error(), Some(ErrorCode::EINVAL), "{what}: {err}");
    }
    // Unknown commands and flags, too.
    let err = client
        .raw_request(cmd::CACHE, 0, 0, 4096, None, None)
        .await
        .unwrap_err();
    assert_eq!(err.remote_error(), Some(ErrorCode::EINVAL));
    let err = client
        .raw_request(cmd::READ, 1 << 2, 0, 4096, None, Some(4096))
        .await
        .unwrap_err();
    assert_eq!(err.remote_error(), Some(ErrorCode::EINVAL));
    let err = client
        .raw_request(99, 0, 0, 0, None, None)
        .await
        .unwrap_err();
    assert_eq!(err.remote_error(), Some(ErrorCode::EINVAL));

    // The connection still works, and only the valid write changed the file.
    let expected = good_client_round_trip(&client, image, 512 * KIB).await;
    let stats = server.exports.stats("disk").unwrap();
    assert_eq!(stats.errors, 10, "{stats:?}");
    client.disconnect().await.unwrap();
    server.stop().await;
    assert_eq!(std::fs::read(&path).unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_disconnecting_mid_request_leave_data_and_others_alone() {
    let (_dir, path, server) = served_image(2 * MIB, 13).await;
    let image = std::fs::read(&path).unwrap();
    let good = NbdClient::connect(server.addr, "disk").await.unwrap();

    // A write whose payload never fully arrives.
    let mut bad = raw_go(server.addr, "disk").await;
    bad.write_all(&encode_request(cmd::WRITE, 0, 1, 0, 64 * KIB as u32))
        .await
        .unwrap();
    bad.write_all(&[0x55; 1000]).await.unwrap();
    drop(bad);
    // A request header cut in the middle.
    let mut bad = raw_go(server.addr, "disk").await;
    bad.write_all(&encode_request(cmd::WRITE, 0, 2, 4096, 4096)[..10])
        .await
        .unwrap();
    drop(bad);
    // A client that leaves in the middle of the handshake.
    let mut bad = raw_greet(server.addr).await;
    bad.write_all(&proto::IHAVEOPT.to_be_bytes()).await.unwrap();
    drop(bad);

    let expected = good_client_round_trip(&good, image, MIB).await;
    good.disconnect().await.unwrap();
    let stats = server.exports.stats("disk").unwrap();
    assert_eq!(stats.writes, 1, "{stats:?}");
    server.stop().await;
    assert_eq!(std::fs::read(&path).unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let path = random_image(dir.path(), "ro.raw", MIB, 14);
    let hash = hash_file(&path);
    let exports = Exports::new();
    exports
        .insert("ro", Arc::new(FileDevice::open_read_only(&path).unwrap()))
        .unwrap();
    let server = TestServer::start(exports).await;
    let client = NbdClient::connect(server.addr, "ro").await.unwrap();
    assert!(client.info().read_only());

    let refusals = [
        client.write(0, Bytes::from_static(&[1; 512]), false).await,
        client.trim(0, 4096).await,
        client.write_zeroes(4096, 4096, true).await,
    ];
    for refusal in refusals {
        assert_eq!(refusal.unwrap_err().remote_error(), Some(ErrorCode::EPERM));
    }
    let data = client.read(0, 4096).await.unwrap();
    assert_eq!(&data[..], &std::fs::read(&path).unwrap()[..4096]);
    client.flush().await.unwrap();
    client.disconnect().await.unwrap();
    server.stop().await;
    assert_eq!(hash_file(&path), hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_is_refused_at_the_handshake() {
    let (_dir, _path, server) = served_image(MIB, 15).await;

    let err = NbdClient::connect(server.addr, "nope").await.unwrap_err();
    assert!(
        matches!(
            err,
            NbdError::OptionRefused {
                reply: rep::ERR_UNKNOWN,
                ..
            }
        ),
        "{err}"
    );

    // After an unknown GO or INFO, negotiation goes on.
    let mut stream = raw_greet(server.addr).await;
    send_option(&mut stream, opt::INFO, &go_data("nope")).await;
    assert_eq!(
        read_option_reply(&mut stream).await.0.reply,
        rep::ERR_UNKNOWN
    );
    send_option(&mut stream, opt::GO, &go_data("nope")).await;
    assert_eq!(
        read_option_reply(&mut stream).await.0.reply,
        rep::ERR_UNKNOWN
    );
    send_option(&mut stream, opt::INFO, &go_data("disk")).await;
    let mut saw_export = false;
    loop {
        let (header, data) = read_option_reply(&mut stream).await;
        match header.reply {
            rep::INFO if data[..2] == info::EXPORT.to_be_bytes() => {
                assert_eq!(&data[2..10], &(MIB as u64).to_be_bytes());
                saw_export = true;
            }
            rep::INFO => {}
            rep::ACK => break,
            other => panic!("unexpected reply {other:#x}"),
        }
    }
    assert!(saw_export);
    // EXPORT_NAME cannot be refused: the server closes the connection.
    send_option(&mut stream, opt::EXPORT_NAME, b"nope").await;
    assert!(read_until_closed(&mut stream).await.is_empty());

    // EXPORT_NAME with a known export enters transmission (without the zero padding).
    let mut stream = raw_greet(server.addr).await;
    send_option(&mut stream, opt::EXPORT_NAME, b"disk").await;
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[..8], &(MIB as u64).to_be_bytes());
    stream
        .write_all(&encode_request(cmd::FLUSH, 0, 5, 0, 0))
        .await
        .unwrap();
    let flushed = read_simple_reply(&mut stream).await;
    assert_eq!((flushed.error, flushed.cookie.0), (ErrorCode::OK, 5));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_and_malformed_options_get_error_replies() {
    let (_dir, _path, server) = served_image(MIB, 16).await;
    let mut stream = raw_greet(server.addr).await;
    for option in [opt::STRUCTURED_REPLY, opt::STARTTLS, 9, 10, 99] {
        send_option(&mut stream, option, &[]).await;
        let (header, _) = read_option_reply(&mut stream).await;
        assert_eq!((header.option, header.reply), (option, rep::ERR_UNSUP));
    }
    send_option(&mut stream, opt::LIST, b"junk").await;
    assert_eq!(
        read_option_reply(&mut stream).await.0.reply,
        rep::ERR_INVALID
    );
    send_option(&mut stream, opt::GO, &[0, 0, 0, 200, b'x']).await;
    assert_eq!(
        read_option_reply(&mut stream).await.0.reply,
        rep::ERR_INVALID
    );
    // A huge unknown option is skipped without being buffered.
    let mut header = BytesMut::new();
    header.put_u64(proto::IHAVEOPT);
    header.put_u32(1234);
    header.put_u32(4 * MIB as u32);
    stream.write_all(&header).await.unwrap();
    stream.write_all(&vec![0u8; 4 * MIB]).await.unwrap();
    assert_eq!(read_option_reply(&mut stream).await.0.reply, rep::ERR_UNSUP);
    send_option(&mut stream, opt::LIST, &[]).await;
    assert_eq!(read_option_reply(&mut stream).await.0.reply, rep::SERVER);
    assert_eq!(read_option_reply(&mut stream).await.0.reply, rep::ACK);
    send_option(&mut stream, opt::ABORT, &[]).await;
    assert_eq!(read_option_reply(&mut stream).await.0.reply, rep::ACK);
    read_until_closed(&mut stream).await;

    assert_eq!(
        NbdClient::list_exports(server.addr).await.unwrap(),
        vec!["disk".to_owned()]
    );
    server.stop().await;
}

/// A device whose reads at offset 0 wait for a permit, to hold a request in flight.
struct GatedDevice {
    inner: MemDevice,
    gate: Arc<Semaphore>,
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            if offset == 0 {
                let _permit = self.gate.acquire().await.map_err(io::Error::other)?;
            }
            self.inner.read(offset, len).await
        })
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        self.inner.write_zeroes(offset, len, fua)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_run_concurrently_and_complete_out_of_order() {
    let gate = Arc::new(Semaphore::new(0));
    let exports = Exports::new();
    exports
        .insert(
            "gated",
            Arc::new(GatedDevice {
                inner: MemDevice::from_vec(common::random_bytes(MIB, 17)),
                gate: Arc::clone(&gate),
            }),
        )
        .unwrap();
    let server = TestServer::start(exports).await;
    let client = NbdClient::connect(server.addr, "gated").await.unwrap();

    let blocked = client.read(0, 4096);
    let later = async {
        // Requests sent after the held read complete while it is held.
        client
            .write(8192, Bytes::from_static(&[7; 4096]), false)
            .await
            .unwrap();
        let data = client.read(8192, 4096).await.unwrap();
        assert!(data.iter().all(|&b| b == 7));
        gate.add_permits(1);
    };
    let (held, ()) = within("out-of-order requests", async {
        tokio::join!(blocked, later)
    })
    .await;
    assert_eq!(held.unwrap().len(), 4096);
    client.disconnect().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_export_closes_its_connections_only() {
    let exports = Exports::new();
    exports.insert("a", Arc::new(MemDevice::new(MIB))).unwrap();
    exports.insert("b", Arc::new(MemDevice::new(MIB))).unwrap();
    let server = TestServer::start(exports.clone()).await;
    let on_a = NbdClient::connect(server.addr, "a").await.unwrap();
    let on_b = NbdClient::connect(server.addr, "b").await.unwrap();
    on_a.read(0, 512).await.unwrap();

    assert!(exports.remove("a"));
    assert!(!exports.remove("a"));
    let after = within("request after removal", async {
        loop {
            match on_a.read(0, 512).await {
                Ok(_) => tokio::task::yield_now().await,
                Err(err) => break err,
            }
        }
    })
    .await;
    assert!(matches!(after, NbdError::Disconnected), "{after}");
    let err = NbdClient::connect(server.addr, "a").await.unwrap_err();
    assert!(matches!(
        err,
        NbdError::OptionRefused {
            reply: rep::ERR_UNKNOWN,
            ..
        }
    ));
    on_b.write(0, Bytes::from_static(b"still here"), true)
        .await
        .unwrap();

    // Exports can be added while serving.
    exports.insert("c", Arc::new(MemDevice::new(4096))).unwrap();
    assert!(matches!(
        exports.insert("c", Arc::new(MemDevice::new(1))),
        Err(NbdError::ExportExists(_))
    ));
    let on_c = NbdClient::connect(server.addr, "c").await.unwrap();
    assert_eq!(on_c.size(), 4096);
    assert_eq!(
        NbdClient::list_exports(server.addr).await.unwrap(),
        vec!["b".to_owned(), "c".to_owned()]
    );
    server.stop().await;
    assert!(matches!(on_b.read(0, 1).await, Err(NbdError::Disconnected)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_connection_and_returns() {
    let exports = Exports::new();
    exports
        .insert("disk", Arc::new(MemDevice::new(MIB)))
        .unwrap();
    let server = TestServer::start(exports).await;
    let client = NbdClient::connect(server.addr, "disk").await.unwrap();
    client
        .write(0, Bytes::from_static(&[1; 512]), false)
        .await
        .unwrap();
    // One client idles in transmission, another in the handshake.
    let mut in_handshake = raw_greet(server.addr).await;
    let addr = server.addr;
    within("server shutdown", server.stop()).await;
    assert!(matches!(
        client.read(0, 512).await,
        Err(NbdError::Disconnected)
    ));
    read_until_closed(&mut in_handshake).await;
    assert!(TcpStream::connect(addr).await.is_err());
}

/// A device whose every call fails, or panics.
struct BrokenDevice {
    panic: bool,
}

impl BrokenDevice {
    fn fail<T: Send + 'static>(&self) -> IoFuture<'_, T> {
        assert!(!self.panic, "broken device panics");
        Box::pin(std::future::ready(Err(io::Error::other("broken device"))))
    }
}

impl BlockDevice for BrokenDevice {
    fn size(&self) -> u64 {
        MIB as u64
    }
    fn read(&self, _: u64, _: u32) -> IoFuture<'_, Bytes> {
        self.fail()
    }
    fn write(&self, _: u64, _: Bytes, _: bool) -> IoFuture<'_, ()> {
        self.fail()
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.fail()
    }
    fn trim(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
        self.fail()
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> IoFuture<'_, ()> {
        self.fail()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_errors_and_panics_are_answered_with_eio() {
    let exports = Exports::new();
    exports
        .insert("failing", Arc::new(BrokenDevice { panic: false }))
        .unwrap();
    exports
        .insert("panicking", Arc::new(BrokenDevice { panic: true }))
        .unwrap();
    let server = TestServer::start(exports).await;
    for name in ["failing", "panicking"] {
        let client = NbdClient::connect(server.addr, name).await.unwrap();
        for _ in 0..2 {
            let err = client.read(0, 4096).await.unwrap_err();
            assert_eq!(err.remote_error(), Some(ErrorCode::EIO), "{name}: {err}");
            let err = client.flush().await.unwrap_err();
            assert_eq!(err.remote_error(), Some(ErrorCode::EIO), "{name}: {err}");
        }
        client.disconnect().await.unwrap();
    }
    assert_eq!(server.exports.stats("failing").unwrap().errors, 4);
    server.stop().await;
}

/// A server with room for 2 connections in their handshake and 1 served, handshakes of
/// 300 ms.
fn tight() -> ServerConfig {
    ServerConfig {
        admission: tandem_net::Limits {
            max_pending: 2,
            max_active: 1,
            handshake_timeout: Duration::from_millis(300),
        },
        ..ServerConfig::default()
    }
}

#[tokio::test]
async fn silent_connections_are_shed_or_time_out_and_the_served_ones_are_capped() {
    let exports = Exports::new();
    exports
        .insert("disk", Arc::new(MemDevice::new(MIB)))
        .unwrap();
    let server = TestServer::start_with_config(exports, tight()).await;
    // Three silent connections: the third sheds the first at once; the others are closed
    // when their handshake time is up.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    for s in &mut silent {
        let greeting = read_until_closed(s).await;
        assert_eq!(
            greeting.len(),
            proto::GREETING_LEN,
            "only the greeting, then closed"
        );
    }
    // A real client is served; a second one beyond the cap is refused after its
    // handshake, and served once the first has gone.
    let first = within("first client", NbdClient::connect(server.addr, "disk"))
        .await
        .unwrap();
    first.read(0, 4096).await.unwrap();
    let second = within("second client", NbdClient::connect(server.addr, "disk")).await;
    let refused = match second {
        Err(_) => true,
        Ok(c) => c.read(0, 4096).await.is_err(),
    };
    assert!(refused, "a connection over the cap was served");
    first.disconnect().await.unwrap();
    let third = within("client after the first left", async {
        loop {
            if let Ok(c) = NbdClient::connect(server.addr, "disk").await
                && c.read(0, 4096).await.is_ok()
            {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    third.disconnect().await.unwrap();
    server.stop().await;
}
