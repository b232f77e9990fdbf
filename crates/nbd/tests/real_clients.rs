//! Real NBD clients (qemu-io, qemu-img, nbdcopy, nbdinfo, fio) against the server running
//! in this process, serving raw files.

mod common;

use common::{TestServer, hash_file, random_image, run_any, run_ok, run_ok_in};
use tandem_nbd::create_sparse_file;

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_verifies_patterns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    create_sparse_file(&path, 8 * MIB as u64).unwrap();
    let server = TestServer::serve_files(&[&path]).await;
    let uri = server.uri("disk");

    let output = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xa5 0 1M",
            "-c",
            "write -f -P 0x5a 1M 64k",
            "-c",
            "write -P 0x77 2M 512k",
            "-c",
            "write -z 2M 256k",
            "-c",
            "write -P 0x33 4M 1M",
            "-c",
            "discard 4M 512k",
            "-c",
            "aio_write -P 0x11 6M 64k",
            "-c",
            "aio_write -P 0x22 6356992 64k",
            "-c",
            "aio_flush",
            "-c",
            "flush",
            "-c",
            "read -P 0xa5 0 1M",
            "-c",
            "read -P 0x5a 1M 64k",
            "-c",
            "read -P 0 2M 256k",
            "-c",
            "read -P 0x77 2359296 256k",
            "-c",
            "read -P 0 4M 512k",
            "-c",
            "read -P 0x33 4718592 512k",
            "-c",
            "read -P 0x11 6M 64k",
            "-c",
            "read -P 0x22 6356992 64k",
            &uri,
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("verification failed"), "{stdout}");
    assert!(!stdout.contains("failed"), "{stdout}");

    let data = std::fs::read(&path).unwrap();
    assert!(data[..MIB].iter().all(|&b| b == 0xa5));
    assert!(data[MIB..MIB + 64 * 1024].iter().all(|&b| b == 0x5a));
    assert!(data[2 * MIB..2 * MIB + 256 * 1024].iter().all(|&b| b == 0));
    assert!(
        data[2 * MIB + 256 * 1024..2 * MIB + 512 * 1024]
            .iter()
            .all(|&b| b == 0x77)
    );
    assert!(data[4 * MIB..4 * MIB + 512 * 1024].iter().all(|&b| b == 0));
    assert!(
        data[4 * MIB + 512 * 1024..5 * MIB]
            .iter()
            .all(|&b| b == 0x33)
    );
    assert!(data[7 * MIB..].iter().all(|&b| b == 0));

    let stats = server.exports.stats("disk").unwrap();
    assert!(stats.writes >= 5, "{stats:?}");
    assert!(stats.write_zeroes >= 1, "{stats:?}");
    assert!(stats.trims >= 1, "{stats:?}");
    assert!(stats.flushes >= 1, "{stats:?}");
    assert!(stats.fua >= 1, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_converts_into_and_out_of_the_export_and_compares() {
    let dir = tempfile::tempdir().unwrap();
    let source = random_image(dir.path(), "source.raw", 16 * MIB, 1);
    // Leave a zero hole in the source so that qemu-img uses write-zeroes too.
    {
        let mut data = std::fs::read(&source).unwrap();
        data[5 * MIB..7 * MIB].fill(0);
        std::fs::write(&source, data).unwrap();
    }
    let target = random_image(dir.path(), "disk.raw", 16 * MIB, 2);
    let server = TestServer::serve_files(&[&target]).await;
    let uri = server.uri("disk");

    let source_str = source.to_str().unwrap();
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", source_str, &uri],
    )
    .await;
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", source_str, &uri],
    )
    .await;
    assert_eq!(hash_file(&source), hash_file(&target));

    let copy = dir.path().join("copy.raw");
    let copy_str = copy.to_str().unwrap();
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, copy_str],
    )
    .await;
    assert_eq!(hash_file(&source), hash_file(&copy));

    // A difference is found.
    let mut data = std::fs::read(&target).unwrap();
    data[9 * MIB + 17] ^= 0xff;
    std::fs::write(&target, data).unwrap();
    let differs = run_any(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", source_str, &uri],
    )
    .await;
    assert_eq!(differs.status.code(), Some(1), "{differs:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_copies_into_and_out_of_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let source = random_image(dir.path(), "source.raw", 24 * MIB, 3);
    let target = dir.path().join("disk.raw");
    create_sparse_file(&target, 24 * MIB as u64).unwrap();
    let server = TestServer::serve_files(&[&target]).await;
    let uri = server.uri("disk");

    run_ok("nbdcopy", &["--flush", source.to_str().unwrap(), &uri]).await;
    assert_eq!(hash_file(&source), hash_file(&target));
    let copy = dir.path().join("copy.raw");
    std::fs::write(&copy, b"").unwrap();
    run_ok("nbdcopy", &[&uri, copy.to_str().unwrap()]).await;
    assert_eq!(hash_file(&source), hash_file(&copy));
    // nbdcopy uses several connections when the export allows multi-conn.
    let stats = server.exports.stats("disk").unwrap();
    assert!(stats.connections_total >= 2, "{stats:?}");
    assert_eq!(stats.bytes_written, 24 * MIB as u64);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_describes_an_export_and_lists_several() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, size) in [("alpha", 1), ("beta", 2), ("gamma", 3)] {
        let path = dir.path().join(format!("{name}.raw"));
        create_sparse_file(&path, size * MIB as u64).unwrap();
        paths.push(path);
    }
    let refs: Vec<_> = paths.iter().map(|p| p.as_path()).collect();
    let server = TestServer::serve_files(&refs).await;

    let info = run_ok("nbdinfo", &["--json", &server.uri("beta")]).await;
    let json: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let export = &json["exports"][0];
    assert_eq!(export["export-size"], 2 * MIB as u64, "{json}");
    assert_eq!(export["is_read_only"], false, "{json}");
    assert_eq!(export["can_flush"], true, "{json}");
    assert_eq!(export["can_fua"], true, "{json}");
    assert_eq!(export["can_trim"], true, "{json}");
    assert_eq!(export["can_zero"], true, "{json}");
    assert_eq!(export["can_multi_conn"], true, "{json}");
    assert_eq!(export["block_size_maximum"], 32 * MIB as u64, "{json}");

    let list = run_ok("nbdinfo", &["--list", &format!("nbd://{}", server.addr)]).await;
    let text = String::from_utf8_lossy(&list.stdout);
    for name in ["alpha", "beta", "gamma"] {
        assert!(text.contains(&format!("export=\"{name}\"")), "{text}");
    }

    let missing = run_any("nbdinfo", &[&server.uri("delta")]).await;
    assert!(!missing.status.success());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_nbd_engine_writes_and_verifies_crc32c() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    create_sparse_file(&path, 32 * MIB as u64).unwrap();
    let server = TestServer::serve_files(&[&path]).await;
    let uri = format!("--uri={}", server.uri("disk"));

    for (rw, bs, depth) in [("randwrite", "4k", "32"), ("write", "256k", "8")] {
        let output = run_ok_in(
            dir.path(),
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &uri,
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                &format!("--iodepth={depth}"),
                "--size=16M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=json",
            ],
        )
        .await;
        let text = String::from_utf8_lossy(&output.stdout);
        let json_start = text.find('{').expect("fio printed no json");
        let json: serde_json::Value = serde_json::from_str(&text[json_start..]).unwrap();
        let job = &json["jobs"][0];
        assert_eq!(job["error"], 0, "{text}");
        assert!(
            job["write"]["io_bytes"].as_u64().unwrap() >= 16 * MIB as u64,
            "{text}"
        );
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap() >= 16 * MIB as u64,
            "{text}"
        );
    }
    assert_eq!(server.exports.stats("disk").unwrap().errors, 0);
    server.stop().await;
}
