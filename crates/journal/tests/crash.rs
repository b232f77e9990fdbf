//! Crash tests: a journal cut at every byte offset of its last two segments (and torn
//! tails of random garbage, zeroes, or a hole inside the last write batch, over random
//! seeds) opens, keeps every record that was complete before the cut, serves no torn
//! record, and takes appends again.
//!
//! Knobs: `JOURNAL_CRASH_STEP` (default 1: every offset of the last segment; the
//! segment before is swept with step 13 unless set), `JOURNAL_CRASH_SEEDS` (default 40),
//! `JOURNAL_CRASH_SEED` (reruns one seed).

mod common;

use std::{collections::BTreeMap, fs, path::Path};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tandem_journal::{
    CheckpointId, Generation, ImageOptions, Journal, JournalConfig, Record, RecordBody, SegmentId,
    Seq, VolumeId, format::RECORD_HEADER_LEN, format::payload_len,
};

const VOL_SIZE: u64 = 8 * 1024;
const SEGMENT: u64 = 4 * 1024;

fn config(dir: &Path) -> JournalConfig {
    let mut cfg = common::small_config(dir, 2, VOL_SIZE, SEGMENT);
    cfg.max_payload = 1024;
    cfg
}

/// Builds a journal of several segments, records appended in batches of 1 to 4.
fn build(dir: &Path, rng: &mut StdRng) -> Vec<Record> {
    let rt = common::runtime();
    let j = Journal::open(common::jdir(dir), config(dir)).expect("open");
    let mut seq = 0u64;
    let mut cp = 0u64;
    rt.block_on(async {
        while j.stats().segments < 4 {
            let n = rng.gen_range(1..=4);
            for _ in 0..n {
                seq += 1;
                let body = if rng.gen_bool(0.2) {
                    cp += 1;
                    common::checkpoint(cp, 1000 + cp)
                } else if rng.gen_bool(0.1) {
                    RecordBody::Zero {
                        volume: VolumeId(rng.gen_range(0..2)),
                        offset: rng.gen_range(0..VOL_SIZE - 600),
                        len: rng.gen_range(1..600),
                    }
                } else {
                    let len = rng.gen_range(1..700usize);
                    common::write(
                        rng.gen_range(0..2),
                        rng.gen_range(0..VOL_SIZE - len as u64),
                        len,
                        seq,
                    )
                };
                j.submit(Seq(seq), Generation(1), body).expect("submit");
            }
            j.wait_durable(Seq(seq)).await.expect("durable");
        }
    });
    let records = j.read_records().expect("records");
    assert_eq!(records.len() as u64, seq);
    j.close().expect("close");
    records
}

fn frame_end(r: &Record) -> u64 {
    r.position.offset + RECORD_HEADER_LEN as u64 + payload_len(&r.body)
}

/// Volume contents at every checkpoint of a record prefix.
fn model(records: &[Record]) -> BTreeMap<u64, Vec<Vec<u8>>> {
    let mut vols = vec![vec![0u8; VOL_SIZE as usize]; 2];
    let mut out = BTreeMap::new();
    for r in records {
        match &r.body {
            RecordBody::Write {
                volume,
                offset,
                data,
            } => {
                let o = *offset as usize;
                vols[volume.0 as usize][o..o + data.len()].copy_from_slice(data);
            }
            RecordBody::Zero {
                volume,
                offset,
                len,
            }
            | RecordBody::Trim {
                volume,
                offset,
                len,
            } => vols[volume.0 as usize][*offset as usize..(*offset + *len) as usize].fill(0),
            RecordBody::Checkpoint(cp) => {
                out.insert(cp.id.0, vols.clone());
            }
        }
    }
    out
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

fn segment_file(dir: &Path, id: SegmentId) -> std::path::PathBuf {
    tandem_journal::segment::segment_path(&common::jdir(dir), id)
}

/// Opens a damaged copy and checks it holds exactly `expected` and serves correct images.
fn check_recovered(
    dir: &Path,
    expected: &[Record],
    models: &BTreeMap<u64, Vec<Vec<u8>>>,
    what: &str,
    append_after: bool,
) -> tandem_journal::OpenReport {
    let j = Journal::open(common::jdir(dir), config(dir))
        .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
    let got = j
        .read_records()
        .unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert_eq!(got.len(), expected.len(), "{what}: record count");
    assert!(got == expected, "{what}: records differ");
    let last = expected.last().map_or(Seq(0), |r| r.seq);
    assert_eq!(j.durable_seq(), last, "{what}: durable seq");
    let report = j.open_report().clone();
    // The newest surviving checkpoint serves the model's image; a cut one is gone.
    let kept = model(expected);
    for (id, vols) in kept.iter().rev().take(1) {
        assert_eq!(vols, &models[id]);
        for v in 0..2u32 {
            let img = j
                .open_image(
                    CheckpointId(*id),
                    VolumeId(v),
                    &ImageOptions {
                        verify: true,
                        ..Default::default()
                    },
                )
                .unwrap_or_else(|e| panic!("{what}: image {id}: {e}"));
            assert!(
                common::read_image(&img) == vols[v as usize],
                "{what}: image {id}/{v} differs"
            );
        }
    }
    for id in models.keys().filter(|id| !kept.contains_key(id)) {
        assert!(
            j.checkpoint(CheckpointId(*id)).is_err(),
            "{what}: torn checkpoint {id} served"
        );
    }
    if append_after {
        let rt = common::runtime();
        let next = Seq(last.0 + 1);
        rt.block_on(j.append(next, Generation(1), common::write(0, 0, 100, 7777)))
            .unwrap_or_else(|e| panic!("{what}: append after recovery: {e}"));
        j.close().expect("close");
        let j = Journal::open(common::jdir(dir), config(dir))
            .unwrap_or_else(|e| panic!("{what}: reopen after append: {e}"));
        assert_eq!(j.durable_seq(), next, "{what}: durable after append");
        assert_eq!(
            j.open_report().torn_tail,
            None,
            "{what}: second open found a torn tail"
        );
    }
    report
}

/// Records kept when segment `seg` is cut at `cut` (later segments removed).
fn kept_by_cut(records: &[Record], seg: SegmentId, cut: u64) -> Vec<Record> {
    records
        .iter()
        .filter(|r| r.position.segment < seg || (r.position.segment == seg && frame_end(r) <= cut))
        .cloned()
        .collect()
}

#[test]
fn cut_at_every_offset_of_the_last_segments() {
    let seed = common::seed("JOURNAL_CRASH_SEED");
    let mut rng = StdRng::seed_from_u64(seed);
    let src = tempfile::tempdir().expect("tempdir");
    let records = build(src.path(), &mut rng);
    let models = model(&records);
    let segs: Vec<SegmentId> = {
        let mut s: Vec<_> = records.iter().map(|r| r.position.segment).collect();
        s.dedup();
        s
    };
    let step_last = common::env_usize("JOURNAL_CRASH_STEP", 1);
    let step_prev = std::env::var("JOURNAL_CRASH_STEP").map_or(13, |_| step_last);
    let mut torn_seen = 0;
    let mut cuts = 0;
    for (k, step) in [(1usize, step_last), (2, step_prev)] {
        let seg = segs[segs.len() - k];
        let len = fs::metadata(segment_file(src.path(), seg))
            .expect("stat")
            .len();
        let mut cut = 0;
        while cut <= len {
            let work = tempfile::tempdir().expect("tempdir");
            copy_dir(src.path(), work.path());
            for later in &segs[segs.len() - k + 1..] {
                fs::remove_file(segment_file(work.path(), *later)).expect("remove later");
            }
            let f = fs::OpenOptions::new()
                .write(true)
                .open(segment_file(work.path(), seg))
                .expect("open seg");
            f.set_len(cut).expect("truncate");
            drop(f);
            let expected = kept_by_cut(&records, seg, cut);
            let what = format!("segment {seg} cut at {cut} (seed {seed})");
            let report = check_recovered(work.path(), &expected, &models, &what, cut % 97 == 0);
            // A cut inside a frame is reported as a torn tail at the last complete frame.
            let boundary = cut <= 64
                || records
                    .iter()
                    .any(|r| r.position.segment == seg && frame_end(r) == cut);
            if !boundary {
                let at = expected
                    .iter()
                    .rev()
                    .find(|r| r.position.segment == seg)
                    .map_or(64, frame_end);
                assert!(
                    matches!(report.torn_tail, Some((s, o, _, _)) if s == seg && o == at),
                    "{what}: torn tail not reported: {:?}",
                    report.torn_tail
                );
                torn_seen += 1;
            }
            cut += step as u64;
            cuts += 1;
        }
    }
    // Most cuts land inside a frame; make sure the sweep really exercised torn tails.
    assert!(
        torn_seen * 2 > cuts,
        "only {torn_seen} of {cuts} cuts were torn tails"
    );
}

#[test]
fn torn_tails_of_garbage_zeroes_and_holes() {
    let seeds = common::env_usize("JOURNAL_CRASH_SEEDS", 40);
    let base = common::seed("JOURNAL_CRASH_SEED");
    for i in 0..seeds as u64 {
        let seed = base.wrapping_add(i);
        let mut rng = StdRng::seed_from_u64(seed);
        let src = tempfile::tempdir().expect("tempdir");
        let records = build(src.path(), &mut rng);
        let models = model(&records);
        let last_seg = records.last().expect("records").position.segment;
        let path = segment_file(src.path(), last_seg);
        let bytes = fs::read(&path).expect("read");
        let len = bytes.len() as u64;
        // The records of the last write batch are those sharing the last commit base;
        // recompute it from the frames: the batch starts at the first record whose
        // commit base equals the last record's.
        let last_base = {
            let r = records.last().expect("records");
            let o = r.position.offset as usize;
            u64::from_le_bytes(bytes[o + 32..o + 40].try_into().expect("base"))
        };
        let in_last_seg: Vec<&Record> = records
            .iter()
            .filter(|r| r.position.segment == last_seg)
            .collect();
        for kind in 0..3 {
            let work = tempfile::tempdir().expect("tempdir");
            copy_dir(src.path(), work.path());
            let wpath = segment_file(work.path(), last_seg);
            let mut b = bytes.clone();
            // Damage starts inside the last batch (only unsynced bytes can be torn).
            let from = rng.gen_range(last_base.max(64)..len);
            let what;
            match kind {
                0 => {
                    // garbage from `from` to beyond the old end
                    let extra = rng.gen_range(0..512);
                    b.truncate(from as usize);
                    b.extend((0..(len - from + extra)).map(|_| rng.r#gen::<u8>()));
                    what = format!("garbage from {from} (seed {seed})");
                }
                1 => {
                    for x in &mut b[from as usize..] {
                        *x = 0;
                    }
                    what = format!("zeroes from {from} (seed {seed})");
                }
                _ => {
                    // a hole of lost pages inside the batch, later bytes persisted
                    let hole_end = rng.gen_range(from..=len);
                    for x in &mut b[from as usize..hole_end as usize] {
                        *x = 0;
                    }
                    what = format!("hole {from}..{hole_end} (seed {seed})");
                }
            }
            fs::write(&wpath, &b).expect("write damaged");
            // Records wholly before the damage survive; everything from the first
            // damaged record on is cut (a hole stops the log even if later frames are intact).
            let first_bad = in_last_seg
                .iter()
                .find(|r| {
                    let (o, e) = (r.position.offset as usize, frame_end(r) as usize);
                    e > b.len() || b[o..e] != bytes[o..e]
                })
                .map(|r| r.seq);
            let expected: Vec<Record> = records
                .iter()
                .filter(|r| first_bad.is_none_or(|b| r.seq < b))
                .cloned()
                .collect();
            let report = check_recovered(work.path(), &expected, &models, &what, true);
            assert_eq!(
                report.torn_tail.is_some(),
                first_bad.is_some() || b.len() > bytes.len(),
                "{what}: torn tail report {:?}",
                report.torn_tail
            );
        }
    }
}
