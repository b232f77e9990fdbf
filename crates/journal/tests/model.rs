//! Model-based test: random writes, zeroes, checkpoints, promotions (by window and to a
//! checkpoint) and close/reopen; at every checkpoint still usable, the point-in-time
//! image equals an in-memory model of the volume at that checkpoint, before and after
//! promotion, and the replica equals the model at the replica's checkpoint.
//!
//! Size: `JOURNAL_MODEL_CASES` (default 64) cases; `PROPTEST_RNG_SEED` reruns a seed.

mod common;

use std::collections::BTreeMap;

use proptest::{
    prelude::*,
    test_runner::{Config, RngSeed, TestCaseError, TestRunner},
};
use tandem_journal::{
    CheckpointId, CheckpointState, Generation, ImageOptions, Journal, JournalConfig, RecordBody,
    Seq, UnixMillis, VolumeId,
};

const VOLS: u32 = 2;
const VOL_SIZE: u64 = 24 * 1024;
const SEGMENT: u64 = 12 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write { vol: u32, off: u64, len: usize },
    Zero { vol: u32, off: u64, len: u64 },
    Checkpoint,
    PromoteToCheckpoint(usize),
    PromoteOlderThan(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..VOLS, 0..VOL_SIZE, 1usize..4096).prop_map(|(vol, off, len)| Op::Write { vol, off, len }),
        1 => (0..VOLS, 0..VOL_SIZE, 1u64..8192).prop_map(|(vol, off, len)| Op::Zero { vol, off, len }),
        3 => Just(Op::Checkpoint),
        1 => any::<usize>().prop_map(Op::PromoteToCheckpoint),
        1 => (0u64..8).prop_map(Op::PromoteOlderThan),
        1 => Just(Op::Reopen),
    ]
}

struct Model {
    current: Vec<Vec<u8>>,
    /// checkpoint id -> (timestamp, volumes at that checkpoint)
    snapshots: BTreeMap<u64, (u64, Vec<Vec<u8>>)>,
    /// Checkpoint the replicas were last promoted to.
    replica_cp: Option<u64>,
}

fn config(dir: &std::path::Path) -> JournalConfig {
    common::small_config(dir, VOLS, VOL_SIZE, SEGMENT)
}

fn check_images(journal: &Journal, model: &Model, when: &str) -> Result<(), TestCaseError> {
    let floor = model.replica_cp.unwrap_or(0);
    let infos = journal.checkpoints();
    for info in &infos {
        let id = info.checkpoint.id.0;
        let expect_usable = id >= floor;
        prop_assert_eq!(
            info.state == CheckpointState::Usable,
            expect_usable,
            "{}: checkpoint {} state {:?}, replica at checkpoint {}",
            when,
            id,
            info.state,
            floor
        );
        if !expect_usable {
            continue;
        }
        let (_, vols) = &model.snapshots[&id];
        for v in 0..VOLS {
            let img = journal
                .open_image(CheckpointId(id), VolumeId(v), &ImageOptions::default())
                .map_err(|e| TestCaseError::fail(format!("{when}: open image {id}/{v}: {e}")))?;
            let got = common::read_image(&img);
            prop_assert!(
                got == vols[v as usize],
                "{}: image of volume {} at checkpoint {} differs from the model",
                when,
                v,
                id
            );
        }
    }
    // Every model checkpoint at or after the replica point must still be listed.
    for &id in model.snapshots.keys().filter(|&&id| id >= floor) {
        prop_assert!(
            infos.iter().any(|i| i.checkpoint.id.0 == id),
            "{}: checkpoint {} missing",
            when,
            id
        );
    }
    Ok(())
}

fn check_replicas(dir: &std::path::Path, model: &Model) -> Result<(), TestCaseError> {
    if let Some(cp) = model.replica_cp {
        let (_, vols) = &model.snapshots[&cp];
        for v in 0..VOLS {
            let got = std::fs::read(dir.join("replicas").join(format!("vol{v}.img")))
                .map_err(|e| TestCaseError::fail(format!("read replica: {e}")))?;
            prop_assert!(
                got == vols[v as usize],
                "replica {} differs from checkpoint {}",
                v,
                cp
            );
        }
    }
    Ok(())
}

fn run_case(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let dir = tmp.path();
    let rt = common::runtime();
    let mut journal = Some(Journal::open(common::jdir(dir), config(dir)).expect("open"));
    let mut model = Model {
        current: vec![vec![0u8; VOL_SIZE as usize]; VOLS as usize],
        snapshots: BTreeMap::new(),
        replica_cp: None,
    };
    let mut seq = 0u64;
    let mut next_cp = 1u64;
    let mut clock = 100u64;
    for (step, op) in ops.into_iter().enumerate() {
        let j = journal.as_ref().expect("journal open");
        match op {
            Op::Write { vol, off, len } => {
                let len = len.min((VOL_SIZE - off) as usize);
                seq += 1;
                let body = common::write(vol, off, len, seq);
                if let RecordBody::Write { data, .. } = &body {
                    model.current[vol as usize][off as usize..off as usize + len]
                        .copy_from_slice(data);
                }
                rt.block_on(j.append(Seq(seq), Generation(1), body))
                    .map_err(|e| TestCaseError::fail(format!("step {step}: append: {e}")))?;
            }
            Op::Zero { vol, off, len } => {
                let len = len.min(VOL_SIZE - off);
                seq += 1;
                model.current[vol as usize][off as usize..(off + len) as usize].fill(0);
                let body = RecordBody::Zero {
                    volume: VolumeId(vol),
                    offset: off,
                    len,
                };
                rt.block_on(j.append(Seq(seq), Generation(1), body))
                    .map_err(|e| TestCaseError::fail(format!("step {step}: zero: {e}")))?;
            }
            Op::Checkpoint => {
                seq += 1;
                clock += 1;
                let id = next_cp;
                next_cp += 1;
                model.snapshots.insert(id, (clock, model.current.clone()));
                rt.block_on(j.append(Seq(seq), Generation(1), common::checkpoint(id, clock)))
                    .map_err(|e| TestCaseError::fail(format!("step {step}: checkpoint: {e}")))?;
            }
            Op::PromoteToCheckpoint(pick) => {
                let floor = model.replica_cp.unwrap_or(0);
                let usable: Vec<u64> = model
                    .snapshots
                    .keys()
                    .copied()
                    .filter(|&c| c >= floor)
                    .collect();
                if usable.is_empty() {
                    continue;
                }
                let target = usable[pick % usable.len()];
                let newest = *usable.last().expect("non-empty");
                // An image open across the promotion must stay correct.
                let held = j
                    .open_image(CheckpointId(newest), VolumeId(0), &ImageOptions::default())
                    .map_err(|e| TestCaseError::fail(format!("step {step}: hold image: {e}")))?;
                check_images(j, &model, "before promotion")?;
                j.promote_to_checkpoint(CheckpointId(target))
                    .map_err(|e| TestCaseError::fail(format!("step {step}: promote: {e}")))?;
                model.replica_cp = Some(target);
                prop_assert!(
                    common::read_image(&held) == model.snapshots[&newest].1[0],
                    "step {}: image held across promotion changed",
                    step
                );
                drop(held);
                check_images(j, &model, "after promotion to checkpoint")?;
                check_replicas(dir, &model)?;
            }
            Op::PromoteOlderThan(age) => {
                let cutoff = clock.saturating_sub(age);
                let floor = model.replica_cp.unwrap_or(0);
                let target = model
                    .snapshots
                    .iter()
                    .filter(|(id, (ts, _))| **id >= floor && *ts <= cutoff)
                    .map(|(id, _)| *id)
                    .next_back();
                check_images(j, &model, "before window promotion")?;
                let report = j
                    .promote_older_than(UnixMillis(cutoff))
                    .map_err(|e| TestCaseError::fail(format!("step {step}: promote: {e}")))?;
                if let Some(t) = target {
                    model.replica_cp = Some(t);
                    prop_assert_eq!(report.to, j.replica_seq());
                }
                check_images(j, &model, "after window promotion")?;
                check_replicas(dir, &model)?;
            }
            Op::Reopen => {
                let j = journal.take().expect("journal");
                j.close()
                    .map_err(|e| TestCaseError::fail(format!("close: {e}")))?;
                let j = Journal::open(common::jdir(dir), config(dir))
                    .map_err(|e| TestCaseError::fail(format!("step {step}: reopen: {e}")))?;
                prop_assert_eq!(j.open_report().torn_tail, None);
                prop_assert_eq!(j.durable_seq().0.max(j.replica_seq().0), seq);
                prop_assert_eq!(j.next_seq().unwrap_or(Seq(1)), Seq(seq + 1));
                check_images(&j, &model, "after reopen")?;
                journal = Some(j);
            }
        }
    }
    let j = journal.take().expect("journal");
    check_images(&j, &model, "at the end")?;
    check_replicas(dir, &model)?;
    j.close()
        .map_err(|e| TestCaseError::fail(format!("close: {e}")))?;
    Ok(())
}

#[test]
fn images_match_the_model_at_every_usable_checkpoint() {
    let seed = common::seed("PROPTEST_RNG_SEED");
    let cases = common::env_usize("JOURNAL_MODEL_CASES", 64);
    let config = Config {
        cases: u32::try_from(cases).expect("cases"),
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&proptest::collection::vec(op(), 1..80), run_case);
    if let Err(e) = result {
        panic!("model test failed (rerun with PROPTEST_RNG_SEED={seed}): {e}");
    }
}
