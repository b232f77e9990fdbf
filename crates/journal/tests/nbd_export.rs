//! A point-in-time image exported over NBD with a scratch overlay: real clients
//! (`qemu-img convert`, `qemu-io`) read the checkpoint's content and write into the
//! overlay; after the export and image are dropped, replica and journal files hash as
//! before and the scratch directory is empty.

mod common;

use std::{path::Path, process::Command, sync::Arc};

use tandem_journal::{CheckpointId, Generation, ImageOptions, Journal, RecordBody, Seq, VolumeId};
use tandem_nbd::{BlockDevice, Exports, NbdServer};
use tokio_util::sync::CancellationToken;

const VOL: u64 = 1 << 20;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?} (install qemu-utils: scripts/install-test-deps.sh): {e}")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn qemu_io(url: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", url]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(&mut c);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io reported a problem: {out}"
    );
    out
}

fn convert(url: &str, to: &Path) -> Vec<u8> {
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", url])
        .arg(to));
    std::fs::read(to).expect("read converted image")
}

#[test]
fn exported_image_takes_qemu_io_writes_and_leaves_files_untouched() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let data_dir = dir.join("data");
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch).expect("scratch");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let j = Journal::open(
        common::jdir(&data_dir),
        common::small_config(&data_dir, 1, VOL, 256 << 10),
    )
    .expect("open");
    // Writes, checkpoints 1 and 2, promotion to 1, so the image mixes replica and journal.
    let mut vol = vec![0u8; VOL as usize];
    let mut at2 = Vec::new();
    rt.block_on(async {
        let mut seq = 0;
        for cp in 1..=3u64 {
            for i in 0..20u64 {
                seq += 1;
                let off = (cp * 104_729 + i * 40_009) % (VOL - 20_000);
                let body = common::write(0, off, 20_000, seq);
                if let RecordBody::Write { data, .. } = &body {
                    vol[off as usize..off as usize + 20_000].copy_from_slice(data);
                }
                j.append(Seq(seq), Generation(1), body)
                    .await
                    .expect("append");
            }
            seq += 1;
            j.append(Seq(seq), Generation(1), common::checkpoint(cp, cp))
                .await
                .expect("checkpoint");
            if cp == 2 {
                at2 = vol.clone();
            }
        }
    });
    j.promote_to_checkpoint(CheckpointId(1)).expect("promote");
    let before = common::hash_tree(&data_dir);

    let img = j
        .open_image(
            CheckpointId(2),
            VolumeId(0),
            &ImageOptions {
                scratch_dir: Some(scratch.clone()),
                verify: true,
            },
        )
        .expect("image");
    let exports = Exports::new();
    exports
        .insert("pit", Arc::new(img.clone()) as Arc<dyn BlockDevice>)
        .expect("export");
    let shutdown = CancellationToken::new();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = rt.spawn(NbdServer::new(exports.clone()).serve(listener, shutdown.clone()));
    let url = format!("nbd://127.0.0.1:{port}/pit");

    // A real client reads the checkpoint's image.
    let got = convert(&url, &dir.join("before.raw"));
    assert!(got == at2, "image over nbd differs from checkpoint 2");

    // qemu-io writes into the overlay, and reads its writes back.
    qemu_io(
        &url,
        &[
            "write -P 0xab 4096 65536",
            "write -z 200000 8192",
            "discard 400000 4096",
            "write -P 0x11 1040384 8192",
            "flush",
            "read -P 0xab 4096 65536",
            "read -P 0 200000 8192",
            "read -P 0x11 1040384 8192",
        ],
    );
    let mut expect = at2.clone();
    expect[4096..4096 + 65536].fill(0xab);
    expect[200_000..208_192].fill(0);
    expect[400_000..404_096].fill(0);
    expect[1_040_384..1_048_576].fill(0x11);
    let got = convert(&url, &dir.join("after.raw"));
    assert!(got == expect, "overlay writes not served back over nbd");
    assert!(common::read_image(&img) == expect);

    shutdown.cancel();
    rt.block_on(server).expect("server task").expect("server");
    assert!(exports.remove("pit"));
    drop(exports);
    drop(img);
    assert_eq!(
        std::fs::read_dir(&scratch).expect("scratch").count(),
        0,
        "scratch overlay left behind"
    );
    assert_eq!(
        common::hash_tree(&data_dir),
        before,
        "replica or journal changed"
    );
    // The checkpoint's image is unchanged for the next user.
    let again = j
        .open_image(CheckpointId(2), VolumeId(0), &ImageOptions::default())
        .expect("image");
    assert!(common::read_image(&again) == at2);
    drop(again);
    j.close().expect("close");
}
