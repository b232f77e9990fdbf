//! Process tests of syncs between two `tandem-vra` processes: a link cut through the lab's
//! link emulator (writes tracked, no checkpoints, the last checkpoint before the cut still
//! recoverable, bitmap sync after the heal, then checkpoint images equal the source), a
//! protected VRA killed with SIGKILL (delta sync after restart), a clean restart (bitmap
//! sync from the saved map), pause and resume, initial sync of images that already hold
//! data, and delta sync of preseeded replicas that sends only what differs.

mod common;

use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tandem_proto::v1 as pb;
use tandem_testkit::fault::Tmpfs;
use tandem_testkit::link::{CutMode, LinkEmulator};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

fn two_vms(size: u64) -> Vec<TestVm> {
    vec![
        TestVm {
            id: "vm-1".into(),
            sizes: vec![size],
        },
        TestVm {
            id: "vm-2".into(),
            sizes: vec![size],
        },
    ]
}

async fn last_sync_kind(a: &VraProcess, vpg: &str) -> Option<i32> {
    vpg_status(a, vpg).await.last_sync.map(|s| s.kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_tracks_writes_then_bitmap_sync_converges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    let cancel = CancellationToken::new();
    let links = LinkEmulator::start(cancel.clone());
    let link = links.link("site-a", "site-b").await.expect("link");
    let proxy = link.add_proxy("site-a", &b.control).await.expect("proxy");
    let size = 32 * MIB;
    let vms = ["vm-1", "vm-2"];
    let vpg_vms = two_vms(size);
    let proxy = proxy.to_string();
    let mut x = Assignment::new(root, "vpg-c", &vpg_vms);
    x.compression = true;
    x.recovery_address = Some(&proxy);
    assign_with(&a, &b, &x).await;
    wait_connected(&a, "vpg-c").await;

    // Checkpoint 1 with quiet writers: the last checkpoint before the cut.
    let stop = CancellationToken::new();
    let writers = spawn_writers(&a.nbd, &[("vm-1", size), ("vm-2", size)], 11, stop.clone());
    // Rates come from two status reads at least a second apart.
    vpg_status(&a, "vpg-c").await;
    vpg_status(&b, "vpg-c").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for s in [vpg_status(&a, "vpg-c").await, vpg_status(&b, "vpg-c").await] {
        assert!(s.write_iops > 0 && s.write_bytes_per_sec > 0, "{s:?}");
    }
    assert!(stop_writers(&stop, writers).await > 0);
    let cp1 = copies(root, &vms, "cp1");
    checkpoint_with_copies(&a, "vpg-c", 1, &cp1).await;
    wait_durable_checkpoint(&b, "vpg-c", 1).await;

    // Cut the link for 10 s under writes: the buffer (64 MiB) fills, writes are tracked.
    let stop = CancellationToken::new();
    let writers = spawn_writers(&a.nbd, &[("vm-1", size), ("vm-2", size)], 12, stop.clone());
    link.cut(CutMode::Drop).await.expect("cut");
    let cut_at = std::time::Instant::now();
    wait_for("writes to be tracked during the cut", || async {
        vpg_status(&a, "vpg-c").await.tracking.then_some(())
    })
    .await;
    // No checkpoint while the VPG cannot be level.
    let refused = a
        .client()
        .await
        .expect("control client")
        .freeze(pb::FreezeRequest {
            vpg_id: "vpg-c".into(),
            checkpoint_id: 2,
        })
        .await;
    assert!(refused.is_err(), "a freeze during the cut was accepted");
    // The last checkpoint before the cut stays recoverable at the recovery site.
    assert_checkpoint_equals(&b, "vpg-c", 1, &cp1, &vms).await;
    let left = Duration::from_secs(10).saturating_sub(cut_at.elapsed());
    tokio::time::sleep(left).await;
    let state = link.heal().await.expect("heal");
    assert!(state.a_to_b.connections_refused > 0, "{state:?}");

    // After the heal: a bitmap sync, reported with the seed's trigger.
    let sync = wait_for("a bitmap sync to run or finish", || async {
        let s = vpg_status(&a, "vpg-c").await;
        s.sync
            .or(s.last_sync)
            .filter(|s| s.kind == pb::VraSyncKind::Bitmap as i32)
    })
    .await;
    assert_eq!(sync.kind, pb::VraSyncKind::Bitmap as i32, "{sync:?}");
    assert!(!sync.trigger.is_empty(), "{sync:?}");
    assert!(stop_writers(&stop, writers).await > 0);
    wait_connected(&a, "vpg-c").await;
    assert_eq!(
        last_sync_kind(&a, "vpg-c").await,
        Some(pb::VraSyncKind::Bitmap as i32)
    );

    // Replica + journal equal the source again.
    let cp2 = copies(root, &vms, "cp2");
    checkpoint_with_copies(&a, "vpg-c", 2, &cp2).await;
    assert_checkpoint_equals(&b, "vpg-c", 2, &cp2, &vms).await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_vra_killed_resyncs_with_a_delta_sync_and_converges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mut a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    let size = 16 * MIB;
    let vms = ["vm-1", "vm-2"];
    assign(root, &a, &b, "vpg-p", 1, &two_vms(size), false).await;
    wait_connected(&a, "vpg-p").await;

    // Stall the receiver so that acknowledged writes sit unreplicated in the buffer, then
    // kill the protected VRA: those writes exist only in its images.
    let stop = CancellationToken::new();
    let writers = spawn_writers(&a.nbd, &[("vm-1", size), ("vm-2", size)], 21, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b_pid = nix::unistd::Pid::from_raw(i32::try_from(b.pid().expect("b")).expect("pid"));
    nix::sys::signal::kill(b_pid, nix::sys::signal::Signal::SIGSTOP).expect("sigstop");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = vpg_status(&a, "vpg-p").await;
    a.kill9().await.expect("kill -9");
    let _ = stop_writers(&stop, writers).await;
    nix::sys::signal::kill(b_pid, nix::sys::signal::Signal::SIGCONT).expect("sigcont");
    // Unreplicated writes were in the buffer, or (once it filled) in the dirty map.
    assert!(
        before.buffer_bytes > 0 || before.tracking,
        "nothing was waiting at the kill: {before:?}"
    );

    let a = start(root, "host-a").await;
    wait_connected(&a, "vpg-p").await;
    assert_eq!(
        last_sync_kind(&a, "vpg-p").await,
        Some(pb::VraSyncKind::Delta as i32),
        "{}",
        a.log_tail()
    );
    let cp = copies(root, &vms, "cp1");
    checkpoint_with_copies(&a, "vpg-p", 1, &cp).await;
    assert_checkpoint_equals(&b, "vpg-p", 1, &cp, &vms).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_tracks_writes_resume_bitmap_syncs_and_a_clean_restart_keeps_the_map() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mut a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    let size = 8 * MIB;
    let vms = ["vm-1", "vm-2"];
    assign(root, &a, &b, "vpg-z", 1, &two_vms(size), true).await;
    wait_connected(&a, "vpg-z").await;

    a.client()
        .await
        .expect("control client")
        .pause(pb::PauseRequest {
            vpg_id: "vpg-z".into(),
        })
        .await
        .expect("pause");
    qemu_io(&a.uri("vm-1/0"), &["write -P 0x5a 1M 256k"]);
    let s = vpg_status(&a, "vpg-z").await;
    assert!(s.paused && s.tracking, "{s:?}");
    assert!(s.dirty_bytes >= 256 << 10, "{s:?}");

    // A clean restart while paused keeps the map: the restart does a bitmap sync, not a
    // delta sync.
    assert!(
        a.terminate().await.expect("terminate").success(),
        "{}",
        a.log_tail()
    );
    let a = start(root, "host-a").await;
    qemu_io(&a.uri("vm-2/0"), &["write -P 0x6b 2M 64k"]);
    wait_connected(&a, "vpg-z").await;
    assert_eq!(
        last_sync_kind(&a, "vpg-z").await,
        Some(pb::VraSyncKind::Bitmap as i32),
        "{}",
        a.log_tail()
    );
    let cp = copies(root, &vms, "cp1");
    checkpoint_with_copies(&a, "vpg-z", 1, &cp).await;
    assert_checkpoint_equals(&b, "vpg-z", 1, &cp, &vms).await;

    // Pause and resume on a running VRA.
    let mut c = a.client().await.expect("control client");
    c.pause(pb::PauseRequest {
        vpg_id: "vpg-z".into(),
    })
    .await
    .expect("pause");
    qemu_io(&a.uri("vm-1/0"), &["write -P 0x7c 0 128k"]);
    c.resume(pb::ResumeRequest {
        vpg_id: "vpg-z".into(),
    })
    .await
    .expect("resume");
    wait_connected(&a, "vpg-z").await;
    let cp = copies(root, &vms, "cp2");
    checkpoint_with_copies(&a, "vpg-z", 2, &cp).await;
    assert_checkpoint_equals(&b, "vpg-z", 2, &cp, &vms).await;
    // Unknown VPGs are refused.
    let err = c
        .pause(pb::PauseRequest {
            vpg_id: "nope".into(),
        })
        .await
        .expect_err("unknown vpg");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
}

/// Writes `fraction` of the 4 KiB blocks of `path` with random bytes; returns how many.
fn scribble(path: &std::path::Path, fraction: f64, seed: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    let blocks = f.metadata().expect("meta").len() / 4096;
    let mut rng = StdRng::seed_from_u64(seed);
    let n = ((blocks as f64) * fraction).ceil() as u64;
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < n {
        chosen.insert(rng.gen_range(0..blocks));
    }
    let mut buf = vec![0u8; 4096];
    for b in &chosen {
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, b * 4096).expect("write");
    }
    f.sync_all().expect("sync");
    n
}

fn random_file(path: &std::path::Path, size: u64, seed: u64) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; size as usize];
    rng.fill(&mut data[..]);
    std::fs::write(path, data).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_sync_of_preseeded_replicas_sends_only_what_differs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let size = 64 * MIB;
    let vms = ["vm-1", "vm-2"];
    for (i, vm) in vms.iter().enumerate() {
        random_file(&image_path(root, vm, 0), size, 40 + i as u64);
        std::fs::create_dir_all(root.join("ds-b")).expect("ds-b");
        std::fs::copy(image_path(root, vm, 0), replica_path(root, vm, 0)).expect("preseed");
        scribble(&image_path(root, vm, 0), 0.01, 50 + i as u64);
    }
    let a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    let vpg_vms = two_vms(size);
    let mut x = Assignment::new(root, "vpg-d", &vpg_vms);
    x.preseeded = true;
    assign_with(&a, &b, &x).await;
    wait_connected(&a, "vpg-d").await;
    let s = vpg_status(&a, "vpg-d").await;
    let sync = s.last_sync.expect("a sync ran");
    assert_eq!(sync.kind, pb::VraSyncKind::Delta as i32, "{sync:?}");
    let total = 2 * size;
    let wire = sync.sent_bytes + sync.hash_bytes;
    println!(
        "delta sync: {} of {} bytes sent, {} hash bytes ({:.2}% of the volumes)",
        sync.sent_bytes,
        total,
        sync.hash_bytes,
        wire as f64 * 100.0 / total as f64
    );
    assert!(
        wire * 50 <= total,
        "delta sync moved {wire} bytes for {total} bytes of volumes: {sync:?}"
    );
    assert!(sync.sent_bytes >= (total / 4096 / 100) * 4096, "{sync:?}");
    let cp = copies(root, &vms, "cp1");
    checkpoint_with_copies(&a, "vpg-d", 1, &cp).await;
    assert_checkpoint_equals(&b, "vpg-d", 1, &cp, &vms).await;

    // Force sync of one volume finds nothing left to send.
    a.client()
        .await
        .expect("control client")
        .force_sync(pb::ForceSyncRequest {
            vpg_id: "vpg-d".into(),
            vm_id: "vm-2".into(),
            volume_id: 0,
        })
        .await
        .expect("force sync");
    let last = wait_for("the volume delta sync", || async {
        let s = vpg_status(&a, "vpg-d").await;
        s.last_sync
            .filter(|l| l.kind == pb::VraSyncKind::VolumeDelta as i32 && s.sync.is_none())
    })
    .await;
    assert_eq!(last.sent_bytes, 0, "{last:?}");
    assert_eq!(last.trigger, "Force Sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_sends_existing_data_and_skips_zero_regions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let size = 32 * MIB;
    let vms = ["vm-1", "vm-2"];
    for (i, vm) in vms.iter().enumerate() {
        let path = image_path(root, vm, 0);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(size).expect("size");
        drop(f);
        // 1 MiB of data every 8 MiB: the rest is zero and need not cross the wire.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        let mut rng = StdRng::seed_from_u64(60 + i as u64);
        let mut data = vec![0u8; MIB as usize];
        for k in 0..size / (8 * MIB) {
            rng.fill(&mut data[..]);
            f.write_all_at(&data, k * 8 * MIB).expect("write");
        }
    }
    let a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    assign(root, &a, &b, "vpg-i", 1, &two_vms(size), true).await;
    wait_connected(&a, "vpg-i").await;
    let sync = vpg_status(&a, "vpg-i").await.last_sync.expect("sync");
    assert_eq!(sync.kind, pb::VraSyncKind::Initial as i32, "{sync:?}");
    assert_eq!(sync.done_bytes, 2 * size, "{sync:?}");
    assert_eq!(sync.sent_bytes, 2 * (size / 8), "{sync:?}");
    let cp = copies(root, &vms, "cp1");
    checkpoint_with_copies(&a, "vpg-i", 1, &cp).await;
    assert_checkpoint_equals(&b, "vpg-i", 1, &cp, &vms).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_recovery_datastore_reports_a_storage_error_and_recovers_once_space_is_freed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    // The recovery datastore (replicas and journals) is a tmpfs larger than what can be in
    // flight (the 64 MiB buffer), so that freeing the filler makes room for all of it.
    let _fs = Tmpfs::mount(&root.join("ds-b"), 256).expect("tmpfs");
    let mut a = start(root, "host-a").await;
    let mut b = start(root, "host-b").await;
    let size = 8 * MIB;
    let vms = ["vm-1", "vm-2"];
    assign(root, &a, &b, "vpg-f", 1, &two_vms(size), false).await;
    wait_connected(&a, "vpg-f").await;

    // Leave about 4 MiB free, then write much more than that.
    let filler = root.join("ds-b").join("filler");
    let (code, out) = run("fallocate", &["-l", "252m", filler.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");
    let stop = CancellationToken::new();
    let writers = spawn_writers(&a.nbd, &[("vm-1", size), ("vm-2", size)], 71, stop.clone());
    let err = wait_for("the recovery storage error", || async {
        let s = vpg_status(&b, "vpg-f").await;
        (s.state == pb::VpgStreamState::Failed as i32).then_some(s.last_error)
    })
    .await;
    assert!(err.contains("recovery storage error"), "{err}");
    // The protected side hears why and tracks writes for a sync.
    let s = wait_for("the protected side to track writes", || async {
        let s = vpg_status(&a, "vpg-f").await;
        (s.tracking && s.last_error.contains("recovery storage error")).then_some(s)
    })
    .await;
    assert_eq!(
        s.sync.expect("a sync is due").trigger,
        "Recovery or Journal Storage Error"
    );
    assert!(stop_writers(&stop, writers).await > 0);
    // Nothing crashed.
    for v in [&mut a, &mut b] {
        let child = v.child.as_mut().expect("running");
        assert!(
            child.try_wait().expect("wait").is_none(),
            "{} exited",
            v.host
        );
    }

    // Space is freed: the journals write what waited, the sync runs, the VPG is level.
    std::fs::remove_file(&filler).expect("free space");
    wait_connected(&a, "vpg-f").await;
    let s = vpg_status(&b, "vpg-f").await;
    assert_ne!(s.state, pb::VpgStreamState::Failed as i32, "{s:?}");
    let cp = copies(root, &vms, "cp1");
    checkpoint_with_copies(&a, "vpg-f", 1, &cp).await;
    assert_checkpoint_equals(&b, "vpg-f", 1, &cp, &vms).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_stops_the_lowest_priority_vpg_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    let cancel = CancellationToken::new();
    let links = LinkEmulator::start(cancel.clone());
    // The low-priority VPG's path stalls; the high-priority one's is slow.
    let stalled = links.link("site-a", "site-b").await.expect("link");
    let slow = links.link("site-a", "site-c").await.expect("link");
    let to_low = stalled
        .add_proxy("site-a", &b.control)
        .await
        .expect("proxy");
    let to_high = slow.add_proxy("site-a", &b.control).await.expect("proxy");
    let vm = |id: &'static str| TestVm {
        id: id.into(),
        sizes: vec![48 * MIB],
    };
    for (vpg, vms, addr, priority) in [
        ("vpg-low", vec![vm("vm-l")], to_low, pb::VraPriority::Low),
        ("vpg-high", vec![vm("vm-h")], to_high, pb::VraPriority::High),
    ] {
        let addr = addr.to_string();
        let mut x = Assignment::new(root, vpg, &vms);
        x.recovery_address = Some(&addr);
        x.priority = priority;
        assign_with(&a, &b, &x).await;
        wait_connected(&a, vpg).await;
    }
    stalled
        .cut(tandem_testkit::link::CutMode::Blackhole)
        .await
        .expect("cut");
    // 40 of the 64 MiB of buffer go to the low-priority VPG and stay there.
    qemu_io(&a.uri("vm-l/0"), &["write -P 0x11 0 40M"]);
    let low = vpg_status(&a, "vpg-low").await;
    assert!(low.buffer_bytes >= 40 * MIB && !low.tracking, "{low:?}");
    // The high-priority VPG needs more than is left: the low one gives its buffer up.
    slow.throttle(None, 4 * MIB).await.expect("throttle");
    qemu_io(&a.uri("vm-h/0"), &["write -P 0x22 0 40M"]);
    let low = vpg_status(&a, "vpg-low").await;
    assert!(low.tracking, "{low:?}");
    assert_eq!(
        low.sync.expect("a sync is due").trigger,
        "Protected VRA Congestion"
    );
    let high = vpg_status(&a, "vpg-high").await;
    assert!(!high.tracking, "{high:?}");

    // Once the paths are back both converge.
    slow.throttle(None, 0).await.expect("unthrottle");
    stalled.heal().await.expect("heal");
    wait_connected(&a, "vpg-low").await;
    wait_connected(&a, "vpg-high").await;
    for (vpg, vm) in [("vpg-low", "vm-l"), ("vpg-high", "vm-h")] {
        let cp = copies(root, &[vm], vpg);
        checkpoint_with_copies(&a, vpg, 1, &cp).await;
        assert_checkpoint_equals(&b, vpg, 1, &cp, &[vm]).await;
    }
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_limit_throttles_the_stream_to_its_site() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    let vms = ["vm-1"];
    assign(
        root,
        &a,
        &b,
        "vpg-bw",
        1,
        &[TestVm {
            id: "vm-1".into(),
            sizes: vec![32 * MIB],
        }],
        false,
    )
    .await;
    wait_connected(&a, "vpg-bw").await;
    let mut c = a.client().await.expect("control client");
    let err = c
        .set_bandwidth_limit(pb::SetBandwidthLimitRequest {
            peer_site_id: "no spaces allowed".into(),
            bytes_per_sec: 1,
        })
        .await
        .expect_err("bad site id");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    c.set_bandwidth_limit(pb::SetBandwidthLimitRequest {
        peer_site_id: String::new(),
        bytes_per_sec: 4 * MIB,
    })
    .await
    .expect("limit");
    let limits = c
        .get_status(pb::GetVraStatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .bandwidth_limits;
    assert_eq!(limits.len(), 1, "{limits:?}");
    assert_eq!(limits[0].bytes_per_sec, 4 * MIB);

    // 24 MiB of incompressible writes at 4 MiB/s (after a 4 MiB burst) take at least ~5 s.
    let path = root.join("random");
    random_file(&path, 24 * MIB, 99);
    let started = std::time::Instant::now();
    let (code, out) = run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            path.to_str().expect("utf8"),
            &a.uri("vm-1/0"),
        ],
    );
    assert_eq!(code, 0, "{out}");
    let written = vpg_status(&a, "vpg-bw").await.written_seq;
    wait_for("the throttled stream to catch up", || async {
        (vpg_status(&a, "vpg-bw").await.acked_seq >= written).then_some(())
    })
    .await;
    let took = started.elapsed();
    println!("24 MiB at a 4 MiB/s limit took {took:?}");
    assert!(took >= Duration::from_secs(4), "not throttled: {took:?}");
    assert!(!vpg_status(&a, "vpg-bw").await.tracking);

    c.set_bandwidth_limit(pb::SetBandwidthLimitRequest {
        peer_site_id: String::new(),
        bytes_per_sec: 0,
    })
    .await
    .expect("unlimit");
    let cp = copies(root, &vms, "cp1");
    checkpoint_with_copies(&a, "vpg-bw", 1, &cp).await;
    assert_checkpoint_equals(&b, "vpg-bw", 1, &cp, &vms).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_added_grown_and_removed_by_reassignment_sync_and_converge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    let one = |sizes: Vec<u64>| {
        vec![TestVm {
            id: "vm-1".into(),
            sizes,
        }]
    };
    assign(root, &a, &b, "vpg-v", 1, &one(vec![8 * MIB]), true).await;
    wait_connected(&a, "vpg-v").await;
    qemu_io(&a.uri("vm-1/0"), &["write -P 0x31 0 1M"]);

    // Generation 2: volume 0 grows to 12 MiB, volume 1 (4 MiB, with data) is added.
    std::fs::OpenOptions::new()
        .write(true)
        .open(image_path(root, "vm-1", 0))
        .expect("open")
        .set_len(12 * MIB)
        .expect("grow");
    random_file(&image_path(root, "vm-1", 1), 4 * MIB, 5);
    assign(
        root,
        &a,
        &b,
        "vpg-v",
        2,
        &one(vec![12 * MIB, 4 * MIB]),
        true,
    )
    .await;
    qemu_io(&a.uri("vm-1/0"), &["write -P 0x32 11M 512k"]);
    wait_connected(&a, "vpg-v").await;
    let sync = vpg_status(&a, "vpg-v").await.last_sync.expect("a sync ran");
    assert_eq!(sync.kind, pb::VraSyncKind::VolumeInitial as i32, "{sync:?}");
    let copies2: Vec<_> = [0u32, 1]
        .iter()
        .map(|v| {
            (
                image_path(root, "vm-1", *v),
                root.join(format!("vm-1-{v}.cp1")),
            )
        })
        .collect();
    checkpoint_with_copies(&a, "vpg-v", 1, &copies2).await;
    wait_durable_checkpoint(&b, "vpg-v", 1).await;
    for (v, (_, copy)) in copies2.iter().enumerate() {
        let name = open_pit(&b, "vpg-v", "vm-1", v as u32, 1).await;
        let (code, out) = qemu_img_compare(copy, &b.uri(&name));
        assert_eq!(code, 0, "volume {v}: {out}\n{}", b.log_tail());
    }

    // Generation 3: volume 1 is removed; the VPG keeps replicating volume 0.
    assign(root, &a, &b, "vpg-v", 3, &one(vec![12 * MIB]), true).await;
    qemu_io(&a.uri("vm-1/0"), &["write -P 0x33 2M 64k"]);
    wait_connected(&a, "vpg-v").await;
    let cp = copies(root, &["vm-1"], "cp2");
    checkpoint_with_copies(&a, "vpg-v", 2, &cp).await;
    assert_checkpoint_equals(&b, "vpg-v", 2, &cp, &["vm-1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_down_for_long_tracks_writes_even_with_room_in_the_buffer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = start(root, "host-a").await;
    let b = start(root, "host-b").await;
    let cancel = CancellationToken::new();
    let links = LinkEmulator::start(cancel.clone());
    let link = links.link("site-a", "site-b").await.expect("link");
    let proxy = link.add_proxy("site-a", &b.control).await.expect("proxy");
    let vms = ["vm-1"];
    let one = [TestVm {
        id: "vm-1".into(),
        sizes: vec![8 * MIB],
    }];
    let proxy = proxy.to_string();
    let mut x = Assignment::new(root, "vpg-l", &one);
    x.compression = true;
    x.recovery_address = Some(&proxy);
    assign_with(&a, &b, &x).await;
    wait_connected(&a, "vpg-l").await;
    link.cut(CutMode::Drop).await.expect("cut");
    qemu_io(&a.uri("vm-1/0"), &["write -P 0x41 0 1M"]);
    let cut = std::time::Instant::now();
    let s = wait_for("the link-down tracking", || async {
        let s = vpg_status(&a, "vpg-l").await;
        s.tracking.then_some(s)
    })
    .await;
    assert!(
        cut.elapsed() >= Duration::from_secs(3),
        "{:?}",
        cut.elapsed()
    );
    assert_eq!(s.buffer_bytes, 0, "the buffer was given up: {s:?}");
    assert_eq!(
        s.sync.expect("a sync is due").trigger,
        "Recovery VRA Communication Problem"
    );
    link.heal().await.expect("heal");
    wait_connected(&a, "vpg-l").await;
    let cp = copies(root, &vms, "cp1");
    checkpoint_with_copies(&a, "vpg-l", 1, &cp).await;
    assert_checkpoint_equals(&b, "vpg-l", 1, &cp, &vms).await;
    cancel.cancel();
}
