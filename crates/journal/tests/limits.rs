//! Size limits: a journal past its hard limit promotes its oldest history early in the
//! background, reports "History Not Meeting SLA", keeps taking appends, and still serves
//! correct images at the checkpoints it keeps; an open image limits early promotion.

mod common;

use std::{collections::BTreeMap, path::Path, time::Duration};

use tandem_journal::{
    CheckpointId, CheckpointState, Generation, ImageOptions, Journal, JournalConfig, RecordBody,
    Seq, SizeLevel, UnixMillis, VolumeId,
};

const VOL_SIZE: u64 = 16 * 1024;
const SEGMENT: u64 = 8 * 1024;
const HARD: u64 = 40 * 1024;
const WARN: u64 = 24 * 1024;

fn config(dir: &Path) -> JournalConfig {
    let mut cfg = common::small_config(dir, 1, VOL_SIZE, SEGMENT);
    cfg.max_payload = 2048;
    cfg.warning_bytes = Some(WARN);
    cfg.hard_limit_bytes = Some(HARD);
    cfg
}

/// Hang guard for background work; not a timing assertion.
const GUARD: Duration = Duration::from_secs(60);

#[test]
fn hard_limit_promotes_early_reports_and_appends_go_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let j = Journal::open(common::jdir(dir), config(dir)).expect("open");
    let mut status = j.subscribe_status();
    let mut vol = vec![0u8; VOL_SIZE as usize];
    let mut snapshots: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut seq = 0u64;
    let mut saw_warning = false;
    rt.block_on(async {
        for i in 0..400u64 {
            seq += 1;
            let body = if i % 10 == 9 {
                snapshots.insert(seq, vol.clone());
                common::checkpoint(seq, seq)
            } else {
                let off = (i * 1237) % (VOL_SIZE - 1500);
                let body = common::write(0, off, 1500, seq);
                if let RecordBody::Write { data, .. } = &body {
                    vol[off as usize..off as usize + 1500].copy_from_slice(data);
                }
                body
            };
            j.append(Seq(seq), Generation(1), body)
                .await
                .expect("appends go on");
            saw_warning |= j.status().level != SizeLevel::Normal;
        }
        tokio::time::timeout(GUARD, status.wait_for(|s| s.early_promotions > 0))
            .await
            .expect("early promotion within the guard")
            .expect("status channel");
    });
    assert!(saw_warning, "warning threshold never reported");
    // Let the background promoter finish its current round, then check the bound.
    j.enforce_limits().expect("enforce");
    let stats = j.stats();
    assert!(stats.history_not_meeting_sla, "condition not reported");
    assert!(stats.early_promotions >= 1);
    assert!(
        stats.size_bytes <= HARD,
        "journal {} above hard limit",
        stats.size_bytes
    );
    assert!(stats.replica_seq > Seq(0));
    assert_eq!(stats.durable_seq, Seq(seq));
    // Checkpoints older than the replica are unusable or gone; the rest are correct.
    let infos = j.checkpoints();
    assert!(!infos.is_empty());
    for info in &infos {
        if info.seq < stats.replica_seq {
            assert_eq!(info.state, CheckpointState::Promoted);
            assert!(
                j.open_image(info.checkpoint.id, VolumeId(0), &ImageOptions::default())
                    .is_err()
            );
            continue;
        }
        assert_eq!(info.state, CheckpointState::Usable);
        let img = j
            .open_image(info.checkpoint.id, VolumeId(0), &ImageOptions::default())
            .expect("image");
        assert!(
            common::read_image(&img) == snapshots[&info.seq.0],
            "image {} differs",
            info.seq
        );
    }
    // The condition survives a reopen (a VRA restart or a new assignment): the history
    // promoted early is gone all the same.
    j.close().expect("close");
    let j = Journal::open(common::jdir(dir), config(dir)).expect("reopen");
    assert!(
        j.status().history_not_meeting_sla,
        "history not meeting its SLA forgotten by a reopen"
    );
    // Promoting everything and running upkeep clears the SLA condition.
    let newest = infos.last().expect("checkpoint").checkpoint.id;
    j.promote_to_checkpoint(newest).expect("promote");
    j.maintain(UnixMillis::now()).expect("maintain");
    assert!(!j.status().history_not_meeting_sla);
    j.close().expect("close");
}

#[test]
fn an_open_image_limits_early_promotion_and_appends_still_go_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let rt = common::runtime();
    let j = Journal::open(common::jdir(dir), config(dir)).expect("open");
    let mut seq = 1;
    rt.block_on(j.append(Seq(1), Generation(1), common::checkpoint(1, 1)))
        .expect("checkpoint");
    let img = j
        .open_image(CheckpointId(1), VolumeId(0), &ImageOptions::default())
        .expect("image");
    let before = common::read_image(&img);
    rt.block_on(async {
        for _ in 0..100 {
            seq += 1;
            j.append(Seq(seq), Generation(1), common::write(0, 0, 1500, seq))
                .await
                .expect("append");
        }
    });
    j.enforce_limits().expect("enforce");
    let stats = j.stats();
    assert!(
        stats.size_bytes > HARD,
        "history behind the open image was freed"
    );
    assert!(stats.history_not_meeting_sla);
    assert!(stats.replica_seq <= Seq(1), "promoted past the open image");
    assert!(matches!(
        j.promote_to_checkpoint(CheckpointId(1)).map(|r| r.to),
        Ok(Seq(1))
    ));
    assert_eq!(common::read_image(&img), before, "pinned image changed");
    drop(img);
    j.enforce_limits().expect("enforce");
    assert!(j.stats().size_bytes <= HARD);
    j.close().expect("close");
}

/// "History Not Meeting SLA" with a history window: set by early promotion at the hard
/// limit, kept while no usable checkpoint is as old as the window, cleared by upkeep once
/// one is (the journal holds the whole window again). The clock is the caller's: an hour
/// of history passes in one call.
#[test]
fn history_short_clears_once_the_journal_again_holds_the_whole_window() {
    const HOUR_MS: u64 = 3600 * 1000;
    const T0: u64 = 1_700_000_000_000;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let rt = common::runtime();
    let mut cfg = config(dir);
    cfg.history_window = Some(Duration::from_millis(HOUR_MS));
    let j = Journal::open(common::jdir(dir), cfg).expect("open");
    let mut last_ts = T0;
    rt.block_on(async {
        for seq in 1..=200u64 {
            let body = if seq % 10 == 0 {
                last_ts = T0 + seq * 1000;
                common::checkpoint(seq, last_ts)
            } else {
                common::write(0, (seq * 1237) % (VOL_SIZE - 1500), 1500, seq)
            };
            j.append(Seq(seq), Generation(1), body)
                .await
                .expect("append");
        }
    });
    j.enforce_limits().expect("enforce");
    assert!(j.status().history_not_meeting_sla, "not set at the limit");
    // A minute after the last checkpoint: the oldest one kept is far younger than the
    // window.
    j.maintain(UnixMillis(last_ts + 60_000)).expect("maintain");
    assert!(j.status().history_not_meeting_sla, "cleared too early");
    // An hour later every checkpoint kept is older than the window: the newest of them is
    // the oldest point of a full window and stays usable.
    j.maintain(UnixMillis(last_ts + HOUR_MS)).expect("maintain");
    assert!(!j.status().history_not_meeting_sla, "not cleared");
    let usable = j
        .checkpoints()
        .into_iter()
        .filter(|c| c.state == CheckpointState::Usable)
        .count();
    assert!(usable >= 1, "no checkpoint left to recover to");
    j.close().expect("close");
}
