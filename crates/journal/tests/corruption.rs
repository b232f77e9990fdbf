//! A flipped byte anywhere in a segment is caught by a checksum: in a sealed segment, or
//! before a later write batch of the last segment, the open fails with
//! `JournalError::Corrupt` naming the segment and the record; inside the last batch it is
//! indistinguishable from a torn write and is cut off and reported. Damage after open is
//! caught by verified image opens, record reads and promotion. Never served as data.
//!
//! Knobs: `JOURNAL_FLIP_SAMPLES` (default 600 flipped positions per segment kind),
//! `JOURNAL_FLIP_SEED`.

mod common;

use std::{fs, path::Path};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tandem_journal::{
    CheckpointId, Generation, ImageOptions, Journal, JournalConfig, JournalError, Record,
    SegmentId, Seq, VolumeId, format::RECORD_HEADER_LEN, format::payload_len,
    segment::segment_path,
};

const VOL_SIZE: u64 = 8 * 1024;

fn config(dir: &Path) -> JournalConfig {
    let mut cfg = common::small_config(dir, 1, VOL_SIZE, 4096);
    cfg.max_payload = 1024;
    cfg
}

/// Three-plus segments; every record its own batch; a checkpoint every 5 records.
fn build(dir: &Path) -> Vec<Record> {
    let rt = common::runtime();
    let j = Journal::open(common::jdir(dir), config(dir)).expect("open");
    let mut seq = 0;
    rt.block_on(async {
        while j.stats().segments < 3 || seq % 5 != 4 {
            seq += 1;
            let body = if seq % 5 == 0 {
                common::checkpoint(seq / 5, seq)
            } else {
                common::write(0, (seq * 331) % (VOL_SIZE - 600), 500, seq)
            };
            j.append(Seq(seq), Generation(1), body)
                .await
                .expect("append");
        }
        seq += 1;
        j.append(
            Seq(seq),
            Generation(1),
            common::checkpoint(seq / 5 + 100, seq),
        )
        .await
        .expect("append");
    });
    let records = j.read_records().expect("records");
    j.close().expect("close");
    records
}

fn frame_end(r: &Record) -> u64 {
    r.position.offset + RECORD_HEADER_LEN as u64 + payload_len(&r.body)
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            fs::copy(e.path(), dst).expect("copy");
        }
    }
}

fn flip(path: &Path, at: u64, mask: u8) {
    let mut b = fs::read(path).expect("read");
    b[at as usize] ^= mask;
    fs::write(path, b).expect("write");
}

/// Where a flip at `at` of `seg` must be reported: the frame holding it (0: the header).
fn frame_of(records: &[Record], seg: SegmentId, at: u64) -> u64 {
    records
        .iter()
        .find(|r| r.position.segment == seg && r.position.offset <= at && at < frame_end(r))
        .map_or(0, |r| r.position.offset)
}

#[test]
fn flipped_bytes_are_detected_reported_and_never_served() {
    let seed = common::seed("JOURNAL_FLIP_SEED");
    let samples = common::env_usize("JOURNAL_FLIP_SAMPLES", 600);
    let mut rng = StdRng::seed_from_u64(seed);
    let src = tempfile::tempdir().expect("tempdir");
    let records = build(src.path());
    let mut segs: Vec<SegmentId> = records.iter().map(|r| r.position.segment).collect();
    segs.dedup();
    let last_seg = *segs.last().expect("segments");
    let last = records.last().expect("records");
    let mut corrupt_seen = 0;
    let mut torn_seen = 0;
    for &seg in &segs {
        let path = segment_path(&common::jdir(src.path()), seg);
        let len = fs::metadata(&path).expect("stat").len();
        for _ in 0..samples {
            let at = rng.gen_range(0..len);
            let mask = 1u8 << rng.gen_range(0..8);
            let work = tempfile::tempdir().expect("tempdir");
            copy_dir(src.path(), work.path());
            flip(&segment_path(&common::jdir(work.path()), seg), at, mask);
            let what = format!("flip {mask:#x} at {seg}:{at} (seed {seed})");
            let frame = frame_of(&records, seg, at);
            let in_final_record = seg == last_seg && frame == last.position.offset;
            match Journal::open(common::jdir(work.path()), config(work.path())) {
                Err(JournalError::Corrupt {
                    segment, offset, ..
                }) => {
                    assert!(!in_final_record, "{what}: final record reported corrupt");
                    assert_eq!((segment, offset), (seg, frame), "{what}: wrong location");
                    corrupt_seen += 1;
                }
                Err(e) => panic!("{what}: unexpected error {e}"),
                Ok(j) => {
                    // Only the last batch (here: the final record) may be taken for torn.
                    assert!(in_final_record, "{what}: damage was not reported");
                    assert_eq!(
                        j.open_report().torn_tail.map(|t| (t.0, t.1)),
                        Some((seg, frame)),
                        "{what}"
                    );
                    let got = j.read_records().expect("records");
                    assert_eq!(
                        got.len(),
                        records.len() - 1,
                        "{what}: damaged record served"
                    );
                    assert!(
                        j.checkpoint(CheckpointId(records.len() as u64 / 5 + 100))
                            .is_err()
                    );
                    torn_seen += 1;
                }
            }
        }
    }
    assert!(corrupt_seen > samples, "{corrupt_seen} corruptions seen");
    eprintln!("corrupt: {corrupt_seen}, torn final record: {torn_seen}");
}

#[test]
fn damage_after_open_is_caught_on_read_and_promotion() {
    let src = tempfile::tempdir().expect("tempdir");
    let records = build(src.path());
    let j = Journal::open(common::jdir(src.path()), config(src.path())).expect("open");
    // Damage the data of the first write, which every checkpoint's image uses unless
    // it was overwritten; pick the first checkpoint, which certainly uses it.
    let first = &records[0];
    let path = segment_path(&common::jdir(src.path()), first.position.segment);
    flip(
        &path,
        first.position.offset + RECORD_HEADER_LEN as u64 + 100,
        0x40,
    );
    let verify = ImageOptions {
        verify: true,
        ..ImageOptions::default()
    };
    match j.open_image(CheckpointId(1), VolumeId(0), &verify) {
        Err(JournalError::Corrupt {
            segment, offset, ..
        }) => assert_eq!(
            (segment, offset),
            (first.position.segment, first.position.offset)
        ),
        other => panic!("verified image open did not report corruption: {other:?}"),
    }
    assert!(matches!(
        j.read_records(),
        Err(JournalError::Corrupt { .. })
    ));
    let replica = fs::read(src.path().join("replicas/vol0.img")).expect("replica");
    match j.promote_to_checkpoint(CheckpointId(2)) {
        Err(JournalError::Corrupt { .. }) => {}
        other => panic!("promotion over damaged data did not fail: {other:?}"),
    }
    assert_eq!(
        fs::read(src.path().join("replicas/vol0.img")).expect("replica"),
        replica,
        "replica changed by a failed promotion"
    );
    // The failed promotion left the checkpoints usable and the replica point unchanged.
    assert_eq!(j.replica_seq(), Seq(0));
    assert!(
        j.open_image(CheckpointId(1), VolumeId(0), &ImageOptions::default())
            .is_ok()
    );
    j.close().expect("close");
    // And the damage is reported on the next open.
    assert!(matches!(
        Journal::open(common::jdir(src.path()), config(src.path())),
        Err(JournalError::Corrupt { .. })
    ));
}
