//! The link emulator over real sockets: an echo server behind a proxy, counted, cut (drop
//! and blackhole), delayed and throttled; and `tandem-lab link` (built by `cargo build --bins`) against a control server.
//! Timing is only ever bounded from below: speed is not asserted.

use std::path::Path;
use std::time::{Duration, Instant};

use tandem_testkit::lab::LabFile;
use tandem_testkit::link::{CutMode, Direction, Link, LinkEmulator, LinkState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// An echo server on port 0; returns its address.
async fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

struct Fixture {
    links: LinkEmulator,
    link: Link,
    /// The proxy site-a dials to reach the echo server in site-b.
    proxy: String,
    echo: String,
}

async fn fixture() -> Fixture {
    let echo = echo_server().await;
    let links = LinkEmulator::start(CancellationToken::new());
    let proxy = links
        .proxy("site-a", "site-b", &echo)
        .await
        .unwrap()
        .to_string();
    let link = links.get("site-a<->site-b").await.unwrap();
    Fixture {
        links,
        link,
        proxy,
        echo,
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

async fn roundtrip(c: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    c.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(WAIT, c.read_exact(&mut back))
        .await
        .expect("echo did not come back")
        .unwrap();
    back
}

/// Polls the link until `pred` holds; fails with the last state otherwise.
async fn eventually(link: &Link, what: &str, pred: impl Fn(&LinkState) -> bool) -> LinkState {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = link.state().await.unwrap();
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: never so; last {s:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a read of `c` ends the connection (EOF or an error, e.g. a reset).
async fn assert_closed(c: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(WAIT, c.read(&mut buf)).await {
        Err(_) => panic!("{what}: the connection stayed open"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: {n} bytes came through"),
    }
}

#[tokio::test]
async fn bytes_and_connections_are_counted_per_direction() {
    let f = fixture().await;
    let data = pattern(300_000, 1);
    let mut c = TcpStream::connect(&f.proxy).await.unwrap();
    assert_eq!(roundtrip(&mut c, &data).await, data);
    let s = eventually(&f.link, "echo counted", |s| {
        s.a_to_b.bytes == 300_000 && s.b_to_a.bytes == 300_000
    })
    .await;
    assert_eq!(s.a_to_b.connections_total, 1);
    assert_eq!(s.a_to_b.connections_open, 1);
    assert_eq!(s.b_to_a.connections_total, 0);
    assert_eq!(s.a_to_b.held_bytes, 0);
    assert_eq!(s.cut, None);
    assert_eq!(s.proxies.len(), 1);
    assert_eq!(s.proxies[0].listen, f.proxy);
    assert_eq!(s.proxies[0].upstream, f.echo);
    assert_eq!(
        (s.proxies[0].from.as_str(), s.proxies[0].to.as_str()),
        ("site-a", "site-b")
    );

    // The same upstream asked for again: the same proxy.
    let again = f.links.proxy("site-a", "site-b", &f.echo).await.unwrap();
    assert_eq!(again.to_string(), f.proxy);

    drop(c);
    eventually(&f.link, "connection closed", |s| {
        s.a_to_b.connections_open == 0
    })
    .await;

    // Dialed from site-b: what the dialer sends is b -> a.
    let reverse = f
        .links
        .proxy("site-b", "site-a", &f.echo)
        .await
        .unwrap()
        .to_string();
    assert_ne!(reverse, f.proxy);
    let mut c = TcpStream::connect(&reverse).await.unwrap();
    let small = pattern(1000, 2);
    assert_eq!(roundtrip(&mut c, &small).await, small);
    let s = eventually(&f.link, "reverse echo counted", |s| {
        s.a_to_b.bytes == 301_000 && s.b_to_a.bytes == 301_000
    })
    .await;
    assert_eq!(s.b_to_a.connections_total, 1);
    assert_eq!(s.a_to_b.connections_total, 1);
    assert_eq!(s.proxies.len(), 2);

    // A site that is not an end of the link is refused.
    assert!(f.link.add_proxy("site-c", &f.echo).await.is_err());
    f.links.shutdown().await;
}

#[tokio::test]
async fn a_drop_cut_resets_open_connections_and_refuses_new_ones_until_heal() {
    let f = fixture().await;
    let mut c = TcpStream::connect(&f.proxy).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"before").await, b"before");

    let s = f.link.cut(CutMode::Drop).await.unwrap();
    assert_eq!(s.cut, Some(CutMode::Drop));
    assert_closed(&mut c, "open connection under a drop cut").await;

    for _ in 0..2 {
        // The kernel may complete the handshake; the proxy closes it at once.
        if let Ok(mut c2) = TcpStream::connect(&f.proxy).await {
            let _ = c2.write_all(b"during").await;
            assert_closed(&mut c2, "new connection under a drop cut").await;
        }
    }
    let s = eventually(&f.link, "refusals counted, nothing open", |s| {
        s.a_to_b.connections_refused >= 1 && s.a_to_b.connections_open == 0
    })
    .await;
    assert_eq!(
        s.a_to_b.connections_total, 1,
        "refused connections are not accepted ones"
    );

    let s = f.link.heal().await.unwrap();
    assert_eq!(s.cut, None);
    let mut c3 = TcpStream::connect(&f.proxy).await.unwrap();
    assert_eq!(roundtrip(&mut c3, b"after heal").await, b"after heal");
    f.links.shutdown().await;
}

#[tokio::test]
async fn a_blackhole_stalls_then_delivers_everything_in_order_after_heal() {
    let f = fixture().await;
    let mut c = TcpStream::connect(&f.proxy).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"warm").await, b"warm");
    let before = f.link.state().await.unwrap();

    f.link.cut(CutMode::Blackhole).await.unwrap();
    let data = pattern(1 << 20, 3);
    let (mut rd, mut wr) = c.into_split();
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        for piece in to_send.chunks(10_000) {
            wr.write_all(piece).await.unwrap();
        }
        wr
    });
    let mut buf = [0u8; 4096];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rd.read(&mut buf))
            .await
            .is_err(),
        "bytes crossed a blackholed link"
    );
    // A connection opened during the blackhole waits too.
    let mut c2 = TcpStream::connect(&f.proxy).await.unwrap();
    c2.write_all(b"opened during the cut").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c2.read(&mut buf))
            .await
            .is_err(),
        "a new connection got through a blackholed link"
    );
    let s = eventually(&f.link, "data held", |s| s.a_to_b.held_bytes > 0).await;
    assert_eq!(s.cut, Some(CutMode::Blackhole));
    assert_eq!(
        s.a_to_b.bytes, before.a_to_b.bytes,
        "nothing delivered while cut"
    );
    assert_eq!(
        s.a_to_b.connections_open, 2,
        "a blackhole keeps connections open"
    );

    f.link.heal().await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(WAIT, rd.read_exact(&mut back))
        .await
        .expect("held data not delivered after heal")
        .unwrap();
    assert!(back == data, "held data came back changed or out of order");
    let mut back2 = vec![0u8; 21];
    tokio::time::timeout(WAIT, c2.read_exact(&mut back2))
        .await
        .expect("the connection opened during the cut stayed stalled")
        .unwrap();
    assert_eq!(&back2, b"opened during the cut");
    writer.await.unwrap();
    eventually(&f.link, "nothing held after heal", |s| {
        s.a_to_b.held_bytes == 0 && s.b_to_a.held_bytes == 0
    })
    .await;
    f.links.shutdown().await;
}

#[tokio::test]
async fn delay_adds_at_least_the_set_latency_and_keeps_order() {
    let f = fixture().await;
    let s = f
        .link
        .delay(Some(Direction::AToB), Duration::from_millis(150))
        .await
        .unwrap();
    assert_eq!((s.a_to_b.delay_ms, s.b_to_a.delay_ms), (150, 0));
    let s = f
        .link
        .delay(Some(Direction::BToA), Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!((s.a_to_b.delay_ms, s.b_to_a.delay_ms), (150, 100));

    let mut c = TcpStream::connect(&f.proxy).await.unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        assert_eq!(roundtrip(&mut c, b"ping").await, b"ping");
        let rtt = t.elapsed();
        assert!(
            rtt >= Duration::from_millis(250),
            "round trip {rtt:?} < 250 ms"
        );
    }
    // Many small writes under delay come back whole and in order.
    let data = pattern(200_000, 4);
    let (mut rd, mut wr) = c.into_split();
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        for piece in to_send.chunks(777) {
            wr.write_all(piece).await.unwrap();
        }
    });
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(WAIT, rd.read_exact(&mut back))
        .await
        .expect("delayed data did not come back")
        .unwrap();
    assert!(
        back == data,
        "delayed data came back changed or out of order"
    );
    writer.await.unwrap();

    // Invalid: beyond the maximum.
    assert!(f.link.delay(None, Duration::from_secs(3600)).await.is_err());
    f.links.shutdown().await;
}

#[tokio::test]
async fn throttle_makes_a_transfer_last_at_least_its_size_over_the_rate() {
    let f = fixture().await;
    const RATE: u64 = 256 << 10;
    const N: usize = 512 << 10;
    let s = f.link.throttle(Some(Direction::AToB), RATE).await.unwrap();
    assert_eq!((s.a_to_b.throttle_bps, s.b_to_a.throttle_bps), (RATE, 0));

    let c = TcpStream::connect(&f.proxy).await.unwrap();
    let (mut rd, mut wr) = c.into_split();
    let data = pattern(N, 5);
    let to_send = data.clone();
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        wr.write_all(&to_send).await.unwrap();
    });
    let mut back = vec![0u8; N];
    tokio::time::timeout(Duration::from_secs(60), rd.read_exact(&mut back))
        .await
        .expect("throttled transfer did not finish")
        .unwrap();
    let took = t.elapsed();
    assert!(back == data);
    writer.await.unwrap();
    // N / RATE = 2 s; the bucket's burst and one piece may go early.
    let floor = Duration::from_secs_f64(0.8 * N as f64 / RATE as f64);
    assert!(
        took >= floor,
        "{N} B at {RATE} B/s took {took:?} < {floor:?}"
    );

    // 0 lifts the limit.
    let s = f.link.throttle(None, 0).await.unwrap();
    assert_eq!((s.a_to_b.throttle_bps, s.b_to_a.throttle_bps), (0, 0));
    f.links.shutdown().await;
}

async fn tandem_lab(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(tandem_testkit::process::binary("tandem-lab"))
        .arg("link")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_state(stdout: &str) -> LinkState {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tandem_lab_link_drives_a_running_control_server() {
    let f = fixture().await;
    let cancel = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(tandem_testkit::link_control::serve(
        listener,
        f.links.clone(),
        cancel.clone(),
    ));
    let dir = tempfile::tempdir().unwrap();
    LabFile {
        sites: Vec::new(),
        link_control: Some(control),
        links: Vec::new(),
        vms: Vec::new(),
        token_file: None,
        ca_file: None,
        usage: None,
    }
    .write(dir.path())
    .unwrap();
    let d = dir.path();
    let name = "site-a<->site-b";

    let (ok, out, err) = tandem_lab(d, &["list", "-o", "json"]).await;
    assert!(ok, "{err}");
    let links: Vec<LinkState> = serde_json::from_str(&out).unwrap();
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].name, name);
    assert_eq!(links[0].proxies[0].listen, f.proxy);

    let (ok, out, err) = tandem_lab(d, &["list"]).await;
    assert!(ok && out.contains(name) && out.contains("up"), "{out}{err}");

    let (ok, out, err) = tandem_lab(d, &["cut", name, "--mode", "blackhole", "-o", "json"]).await;
    assert!(ok, "{err}");
    assert_eq!(json_state(&out).cut, Some(CutMode::Blackhole));
    assert_eq!(f.link.state().await.unwrap().cut, Some(CutMode::Blackhole));

    let (ok, out, err) = tandem_lab(
        d,
        &["delay", name, "40", "--direction", "a-to-b", "-o", "json"],
    )
    .await;
    assert!(ok, "{err}");
    let s = json_state(&out);
    assert_eq!((s.a_to_b.delay_ms, s.b_to_a.delay_ms), (40, 0));

    let (ok, out, err) = tandem_lab(d, &["throttle", name, "512k", "-o", "json"]).await;
    assert!(ok, "{err}");
    let s = json_state(&out);
    assert_eq!(
        (s.a_to_b.throttle_bps, s.b_to_a.throttle_bps),
        (512 << 10, 512 << 10)
    );

    let (ok, out, err) = tandem_lab(d, &["heal", name, "-o", "json"]).await;
    assert!(ok, "{err}");
    assert_eq!(json_state(&out).cut, None);
    let s = f.link.state().await.unwrap();
    assert_eq!(s.cut, None);
    assert_eq!(s.a_to_b.delay_ms, 40, "heal leaves the delay alone");

    let (ok, out, err) = tandem_lab(d, &["cut", name]).await;
    assert!(ok && out.contains("cut (drop)"), "{out}{err}");
    assert_eq!(f.link.state().await.unwrap().cut, Some(CutMode::Drop));

    let (ok, out, err) = tandem_lab(d, &["stats", name]).await;
    assert!(
        ok && out.contains("a->b") && out.contains(&f.proxy),
        "{out}{err}"
    );

    // Errors: one line on stderr, a failing exit status.
    let (ok, _, err) = tandem_lab(d, &["throttle", name, "fast"]).await;
    assert!(!ok && err.contains("not a byte rate"), "{err}");
    for args in [
        &["stats", "site-x<->site-y"][..],
        &["delay", name, "999999999"],
    ] {
        let (ok, _, err) = tandem_lab(d, args).await;
        assert!(!ok, "{args:?} succeeded");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    let (_, _, err) = tandem_lab(d, &["stats", "site-x<->site-y"]).await;
    assert!(err.contains("no link named"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let (ok, _, err) = tandem_lab(empty.path(), &["list"]).await;
    assert!(!ok && err.trim().lines().count() == 1, "{err}");

    cancel.cancel();
    server.await.unwrap().unwrap();
    // With the server gone: a one-line error too.
    let (ok, _, err) = tandem_lab(d, &["list"]).await;
    assert!(!ok && err.trim().lines().count() == 1, "{err}");
    f.links.shutdown().await;
}
