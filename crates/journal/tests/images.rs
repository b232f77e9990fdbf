//! Point-in-time images with a scratch overlay (writes land in scratch only, replica
//! and journal untouched), pins against promotion, and crash safety of promotion (an
//! interrupted promotion is finished on open; a finished one only frees segments).

mod common;

use std::path::Path;

use tandem_journal::{
    CheckpointId, Generation, ImageOptions, Journal, JournalConfig, JournalError, RecordBody,
    ReplicaMarker, Seq, UnixMillis, VolumeId, replica::write_marker,
};

const VOL: u64 = 64 * 1024;

fn config(dir: &Path) -> JournalConfig {
    common::small_config(dir, 2, VOL, 16 * 1024)
}

/// Appends writes and checkpoints 1..=4 (checkpoint k after round k); returns the
/// volume contents at each checkpoint.
fn fill(j: &Journal) -> Vec<Vec<Vec<u8>>> {
    let rt = common::runtime();
    let mut vols = vec![vec![0u8; VOL as usize]; 2];
    let mut at = Vec::new();
    let mut seq = j.last_seq().0;
    rt.block_on(async {
        for round in 1..=4u64 {
            for i in 0..12u64 {
                seq += 1;
                let v = (i % 2) as u32;
                let off = (round * 7919 + i * 4099) % (VOL - 3000);
                let body = common::write(v, off, 3000, seq);
                if let RecordBody::Write { data, .. } = &body {
                    vols[v as usize][off as usize..off as usize + 3000].copy_from_slice(data);
                }
                j.append(Seq(seq), Generation(1), body)
                    .await
                    .expect("append");
            }
            seq += 1;
            j.append(
                Seq(seq),
                Generation(1),
                common::checkpoint(round, round * 1000),
            )
            .await
            .expect("checkpoint");
            at.push(vols.clone());
        }
    });
    at
}

#[test]
fn scratch_overlay_takes_writes_and_leaves_replica_and_journal_untouched() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch).expect("scratch");
    let j = Journal::open(common::jdir(dir), config(dir)).expect("open");
    let at = fill(&j);
    j.promote_to_checkpoint(CheckpointId(1)).expect("promote");
    let before = common::hash_tree(dir);
    {
        let ro = j
            .open_image(CheckpointId(3), VolumeId(1), &ImageOptions::default())
            .expect("read-only image");
        assert!(
            ro.write_at(0, b"x").is_err(),
            "read-only image took a write"
        );
        let img = j
            .open_image(
                CheckpointId(3),
                VolumeId(1),
                &ImageOptions {
                    scratch_dir: Some(scratch.clone()),
                    verify: true,
                },
            )
            .expect("image");
        let mut expect = at[2][1].clone();
        assert!(common::read_image(&img) == expect);
        img.write_at(100, &[0xAB; 5000]).expect("write");
        expect[100..5100].fill(0xAB);
        img.write_zeroes_at(4000, 200).expect("zero");
        expect[4000..4200].fill(0);
        img.write_at(VOL - 10, &[7; 10]).expect("write at end");
        expect[(VOL - 10) as usize..].fill(7);
        assert!(
            img.write_at(VOL - 5, &[1; 10]).is_err(),
            "write past the end"
        );
        assert!(common::read_image(&img) == expect, "overlay reads wrong");
        // Unaligned partial reads across overlay / journal / replica boundaries.
        for (off, len) in [(90u64, 20usize), (3990, 300), (5090, 4000), (VOL - 20, 20)] {
            let mut buf = vec![0u8; len];
            img.read_at(off, &mut buf).expect("read");
            assert!(buf == expect[off as usize..off as usize + len]);
        }
        // The other images and the replica are unaffected.
        assert!(common::read_image(&ro) == at[2][1]);
        // Promotion past an open image is refused.
        assert!(matches!(
            j.promote_to_checkpoint(CheckpointId(4)),
            Err(JournalError::Pinned { .. })
        ));
        // ...but up to it is allowed, and the image stays the same.
        j.promote_to_checkpoint(CheckpointId(2))
            .expect("promote under image");
        assert!(
            common::read_image(&img) == expect,
            "image changed by promotion"
        );
    }
    // Only the expected promotion changed files; drop the promotion effect by
    // comparing against a fresh state after the same promotion.
    let after = common::hash_tree(dir);
    let scratch_files: Vec<_> = std::fs::read_dir(&scratch).expect("scratch").collect();
    assert!(scratch_files.is_empty(), "scratch overlay left behind");
    assert_ne!(
        before, after,
        "promotion to 2 should have changed the replica"
    );
    // Now with no promotion in between: files hash as before.
    let before = common::hash_tree(dir);
    {
        let img = j
            .open_image(
                CheckpointId(4),
                VolumeId(0),
                &ImageOptions {
                    scratch_dir: Some(scratch.clone()),
                    verify: false,
                },
            )
            .expect("image");
        img.write_at(0, &vec![0x5A; VOL as usize])
            .expect("overwrite all");
        assert!(common::read_image(&img).iter().all(|&b| b == 0x5A));
    }
    assert_eq!(
        common::hash_tree(dir),
        before,
        "replica or journal touched by overlay"
    );
    j.close().expect("close");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).expect("copy");
        }
    }
}

fn check_at(j: &Journal, at: &[Vec<Vec<u8>>], from_cp: u64) {
    for cp in from_cp..=4 {
        for v in 0..2u32 {
            let img = j
                .open_image(CheckpointId(cp), VolumeId(v), &ImageOptions::default())
                .expect("image");
            assert!(
                common::read_image(&img) == at[cp as usize - 1][v as usize],
                "image {cp}/{v} wrong"
            );
        }
    }
}

#[test]
fn interrupted_promotion_is_finished_on_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let before = tmp.path().join("before");
    let j = Journal::open(common::jdir(&before), config(&before)).expect("open");
    let at = fill(&j);
    let cp3 = j.checkpoint(CheckpointId(3)).expect("cp3").seq;
    j.close().expect("close");
    // The finished promotion, for its replicas.
    let done = tmp.path().join("done");
    copy_dir(&before, &done);
    let j = Journal::open(common::jdir(&done), config(&done)).expect("open");
    j.promote_to_checkpoint(CheckpointId(3)).expect("promote");
    j.close().expect("close");

    // Crash after the intent marker, with one replica fully written and one untouched
    // (the journal's segments all still there).
    let crash = tmp.path().join("crash");
    copy_dir(&before, &crash);
    std::fs::copy(
        done.join("replicas/vol0.img"),
        crash.join("replicas/vol0.img"),
    )
    .expect("copy replica");
    write_marker(
        &common::jdir(&crash),
        &ReplicaMarker {
            seq: Seq(0),
            promoting_to: cp3,
            generation: Generation(1),
            written: UnixMillis(1),
            history_short: false,
        },
    )
    .expect("intent");
    let j = Journal::open(common::jdir(&crash), config(&crash)).expect("open after crash");
    assert_eq!(j.open_report().resumed_promotion, Some(cp3));
    assert_eq!(j.replica_seq(), cp3);
    check_at(&j, &at, 3);
    assert!(
        j.open_image(CheckpointId(2), VolumeId(0), &ImageOptions::default())
            .is_err()
    );
    j.close().expect("close");

    // Crash after the final marker, before the segments were freed.
    let late = tmp.path().join("late");
    copy_dir(&before, &late);
    for v in 0..2 {
        std::fs::copy(
            done.join(format!("replicas/vol{v}.img")),
            late.join(format!("replicas/vol{v}.img")),
        )
        .expect("copy replica");
    }
    std::fs::copy(
        common::jdir(&done).join("replica.marker"),
        common::jdir(&late).join("replica.marker"),
    )
    .expect("copy marker");
    let j = Journal::open(common::jdir(&late), config(&late)).expect("open after late crash");
    assert!(!j.open_report().removed_segments.is_empty());
    assert_eq!(j.replica_seq(), cp3);
    check_at(&j, &at, 3);
    // Re-promoting is idempotent and the replicas match the finished run.
    j.promote_to_checkpoint(CheckpointId(3))
        .expect("re-promote");
    for (v, model) in at[2].iter().enumerate() {
        let a = std::fs::read(done.join(format!("replicas/vol{v}.img"))).expect("a");
        let b = std::fs::read(late.join(format!("replicas/vol{v}.img"))).expect("b");
        assert!(a == b && &a == model);
    }
    j.close().expect("close");
}

#[test]
fn window_promotion_and_stats() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut cfg = config(dir);
    cfg.history_window = Some(std::time::Duration::from_millis(1500));
    let j = Journal::open(common::jdir(dir), cfg).expect("open");
    let at = fill(&j);
    // checkpoints are stamped 1000..4000; "now" 4000 keeps 2500.. => promote to cp 2
    j.maintain(UnixMillis(4000)).expect("maintain");
    let cp2 = j.checkpoint(CheckpointId(2)).expect("cp2").seq;
    assert_eq!(j.replica_seq(), cp2);
    check_at(&j, &at, 2);
    let stats = j.stats();
    assert_eq!(
        stats.oldest_usable_checkpoint.map(|c| c.0),
        Some(CheckpointId(2))
    );
    assert_eq!(
        stats.newest_usable_checkpoint.map(|c| c.0),
        Some(CheckpointId(4))
    );
    assert_eq!(stats.promotions, 1);
    assert!(stats.freed_segments >= 1);
    assert!(stats.size_bytes > 0);
    j.close().expect("close");
}

/// The newest durable image holds every durable record, checkpoint or not; a checkpoint
/// image stops at its checkpoint; an open latest image pins its position against
/// promotion and keeps its contents while promotion frees the segments under it.
#[test]
fn latest_image_has_every_durable_record_and_is_pinned() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let rt = common::runtime();
    let j = Journal::open(common::jdir(dir), config(dir)).expect("open");
    let at = fill(&j);
    let mut vols = at[3].clone();
    let mut seq = j.last_seq().0;
    // Writes after the last checkpoint (and a zeroed range), all durable.
    let mut more = |j: &Journal, vols: &mut Vec<Vec<u8>>, n: u64| {
        rt.block_on(async {
            for i in 0..n {
                seq += 1;
                let v = (i % 2) as u32;
                let off = (seq * 6151) % (VOL - 5000);
                let body = if i == 3 {
                    vols[v as usize][off as usize..off as usize + 5000].fill(0);
                    RecordBody::Zero {
                        volume: VolumeId(v),
                        offset: off,
                        len: 5000,
                    }
                } else {
                    let body = common::write(v, off, 5000, seq);
                    if let RecordBody::Write { data, .. } = &body {
                        vols[v as usize][off as usize..off as usize + 5000].copy_from_slice(data);
                    }
                    body
                };
                j.append(Seq(seq), Generation(1), body)
                    .await
                    .expect("append");
            }
        });
        Seq(seq)
    };
    let last = more(&j, &mut vols, 8);
    for v in 0..2u32 {
        let latest = j
            .open_latest_image(VolumeId(v), &ImageOptions::default())
            .expect("latest image");
        assert_eq!(latest.checkpoint(), None);
        assert_eq!(latest.seq(), last);
        assert!(
            common::read_image(&latest) == vols[v as usize],
            "latest image {v} misses durable records"
        );
        let cp = j
            .open_image(CheckpointId(4), VolumeId(v), &ImageOptions::default())
            .expect("checkpoint image");
        assert_eq!(cp.checkpoint(), Some(CheckpointId(4)));
        assert!(
            common::read_image(&cp) == at[3][v as usize],
            "checkpoint image {v} shows records after its checkpoint"
        );
    }

    // Open a latest image, then keep appending: the image stays at its position.
    let pinned = j
        .open_latest_image(
            VolumeId(0),
            &ImageOptions {
                scratch_dir: None,
                verify: true,
            },
        )
        .expect("latest image");
    let pinned_vol = vols[0].clone();
    more(&j, &mut vols, 8);
    seq += 1;
    rt.block_on(j.append(Seq(seq), Generation(1), common::checkpoint(5, 5000)))
        .expect("checkpoint 5");
    assert!(
        common::read_image(&pinned) == pinned_vol,
        "latest image shows records that became durable after it was opened"
    );
    // Promotion up to it works and frees segments it reads; past it is refused.
    let r = j.promote_to_checkpoint(CheckpointId(4)).expect("promote");
    assert!(r.segments_freed > 0, "nothing freed: {r:?}");
    assert!(matches!(
        j.promote_to_checkpoint(CheckpointId(5)),
        Err(JournalError::Pinned { pinned, .. }) if pinned == last
    ));
    j.promote_older_than(UnixMillis(u64::MAX / 2))
        .expect("promote by age");
    assert!(
        j.replica_seq() <= last,
        "promoted past an open latest image"
    );
    assert!(
        common::read_image(&pinned) == pinned_vol,
        "latest image changed by promotion"
    );
    drop(pinned);
    j.promote_to_checkpoint(CheckpointId(5))
        .expect("promote once the image is gone");
    let latest = j
        .open_latest_image(VolumeId(0), &ImageOptions::default())
        .expect("latest image");
    assert!(common::read_image(&latest) == vols[0]);
    assert_eq!(latest.seq(), Seq(seq));
    drop(latest);
    j.close().expect("close");
}
