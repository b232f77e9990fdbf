//! Appending: group commit under 32 concurrent writers, caller-provided sequences with
//! typed gap / duplicate errors, generation fencing (also across reopen), batches from
//! the replication receiver, and refusal of bad records.

mod common;

use std::sync::Arc;

use tandem_journal::{
    Checkpoint, CheckpointId, CheckpointKind, Generation, Journal, JournalError, RecordBody, Seq,
    UnixMillis, VolumeId,
};

#[test]
fn thirty_two_writers_each_wait_for_durability_and_share_fsyncs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let j = Arc::new(
        Journal::open(
            common::jdir(dir),
            common::small_config(dir, 2, 1 << 20, 256 << 10),
        )
        .expect("open"),
    );
    const WRITERS: u64 = 32;
    const EACH: u64 = 40;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..EACH {
                    let body =
                        common::write((w % 2) as u32, (w * EACH + i) * 512, 512, w * 1000 + i);
                    let seq = j.append_next(Generation(1), body).await.expect("append");
                    // acknowledged means durable
                    assert!(j.durable_seq() >= seq);
                    seqs.push(seq);
                }
                seqs
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        all.sort();
        let expect: Vec<Seq> = (1..=WRITERS * EACH).map(Seq).collect();
        assert_eq!(all, expect, "sequences not contiguous and unique");
    });
    let stats = j.stats();
    assert_eq!(stats.appends, WRITERS * EACH);
    assert_eq!(stats.durable_records, WRITERS * EACH);
    assert_eq!(stats.durable_seq, Seq(WRITERS * EACH));
    assert_eq!(stats.written_seq, stats.durable_seq);
    assert!(stats.fsyncs >= 1 && stats.fsyncs <= stats.appends);
    assert!(stats.records_per_fsync >= 1.0);
    eprintln!(
        "fsyncs: {} for {} records ({:.1} per fsync)",
        stats.fsyncs, stats.appends, stats.records_per_fsync
    );
    let j = Arc::try_unwrap(j).expect("sole owner");
    j.close().expect("close");
    let j = Journal::open(
        common::jdir(dir),
        common::small_config(dir, 2, 1 << 20, 256 << 10),
    )
    .expect("reopen");
    assert_eq!(j.durable_seq(), Seq(WRITERS * EACH));
    assert_eq!(
        j.read_records().expect("records").len() as u64,
        WRITERS * EACH
    );
}

#[test]
fn sequences_are_contiguous_and_generations_fence() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let cfg = || common::small_config(dir, 1, 1 << 16, 64 << 10);
    let rt = common::runtime();
    let j = Journal::open(common::jdir(dir), cfg()).expect("open");
    assert_eq!(j.next_seq(), None);
    assert!(matches!(
        j.submit(Seq(0), Generation(1), common::write(0, 0, 10, 1)),
        Err(JournalError::SequenceGap { .. })
    ));
    // A new journal starts wherever the stream is.
    rt.block_on(j.append(Seq(100), Generation(2), common::write(0, 0, 10, 1)))
        .expect("first");
    assert!(matches!(
        j.submit(Seq(102), Generation(2), common::write(0, 0, 10, 2)),
        Err(JournalError::SequenceGap {
            expected: Seq(101),
            got: Seq(102)
        })
    ));
    assert!(matches!(
        j.submit(Seq(100), Generation(2), common::write(0, 0, 10, 2)),
        Err(JournalError::SequenceDuplicate { got: Seq(100), .. })
    ));
    assert!(matches!(
        j.submit(Seq(101), Generation(1), common::write(0, 0, 10, 2)),
        Err(JournalError::Fenced {
            got: Generation(1),
            current: Generation(2)
        })
    ));
    // A batch as the replication receiver gets it; the durable seq comes back.
    let batch: Vec<(Seq, RecordBody)> = (101..111)
        .map(|s| (Seq(s), common::write(0, s * 10, 10, s)))
        .collect();
    let durable = rt
        .block_on(j.append_batch(Generation(3), batch))
        .expect("batch");
    assert_eq!(durable, Seq(110));
    assert_eq!(j.generation(), Generation(3));
    j.close().expect("close");
    let j = Journal::open(common::jdir(dir), cfg()).expect("reopen");
    assert_eq!(j.next_seq(), Some(Seq(111)));
    assert_eq!(j.generation(), Generation(3));
    assert!(matches!(
        j.submit(Seq(111), Generation(2), common::write(0, 0, 10, 2)),
        Err(JournalError::Fenced { .. })
    ));
    rt.block_on(j.append(Seq(111), Generation(3), common::write(0, 0, 10, 2)))
        .expect("append after reopen");
}

#[test]
fn bad_records_are_refused_with_typed_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut cfg = common::small_config(dir, 1, 4096, 64 << 10);
    cfg.max_payload = 1024;
    let rt = common::runtime();
    let j = Journal::open(common::jdir(dir), cfg).expect("open");
    assert!(matches!(
        j.submit_next(Generation(1), common::write(5, 0, 10, 1)),
        Err(JournalError::UnknownVolume(VolumeId(5)))
    ));
    assert!(matches!(
        j.submit_next(Generation(1), common::write(0, 4090, 10, 1)),
        Err(JournalError::OutOfRange { .. })
    ));
    assert!(matches!(
        j.submit_next(
            Generation(1),
            RecordBody::Zero {
                volume: VolumeId(0),
                offset: u64::MAX,
                len: 2
            }
        ),
        Err(JournalError::OutOfRange { .. })
    ));
    assert!(matches!(
        j.submit_next(Generation(1), common::write(0, 0, 2000, 1)),
        Err(JournalError::RecordTooLarge { .. })
    ));
    let cp = Checkpoint {
        id: CheckpointId(9),
        timestamp: UnixMillis(5),
        kind: CheckpointKind::ApplicationConsistent,
        name: Some("before upgrade".into()),
        vm: Some("vm-17".into()),
    };
    rt.block_on(j.append_next(Generation(1), RecordBody::Checkpoint(cp.clone())))
        .expect("checkpoint");
    assert!(matches!(
        j.submit_next(Generation(1), RecordBody::Checkpoint(cp.clone())),
        Err(JournalError::DuplicateCheckpoint(CheckpointId(9)))
    ));
    // Refused records consumed no sequence.
    assert_eq!(j.last_seq(), Seq(1));
    assert_eq!(
        j.checkpoint(CheckpointId(9)).expect("listed").checkpoint,
        cp
    );
}
