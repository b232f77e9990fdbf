//! Sparse sequences (`JournalConfig::sparse_seqs`): a journal that carries a replication
//! stream's own sequence numbers accepts increasing gaps, refuses going backwards, keeps
//! them across a reopen (and across segment boundaries), builds images from them, and a
//! contiguous journal still refuses gaps.

mod common;

use tandem_journal::{
    CheckpointId, Generation, ImageOptions, Journal, JournalError, RecordBody, Seq,
};

const VOL: u64 = 64 * 1024;

fn sparse_config(dir: &std::path::Path) -> tandem_journal::JournalConfig {
    let mut cfg = common::small_config(dir, 1, VOL, 8 * 1024);
    cfg.max_payload = 2048;
    cfg.sparse_seqs = true;
    cfg
}

#[test]
fn sparse_journal_takes_gaps_and_keeps_them_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = common::runtime();
    let mut expected = vec![0u8; VOL as usize];
    let mut seqs = Vec::new();
    {
        let j = Journal::open(common::jdir(dir.path()), sparse_config(dir.path())).expect("open");
        rt.block_on(async {
            let mut seq = 3u64;
            for i in 0..40u64 {
                let off = (i * 1500) % (VOL - 1024);
                let body = common::write(0, off, 1024, i);
                if let RecordBody::Write { data, .. } = &body {
                    expected[off as usize..off as usize + 1024].copy_from_slice(data);
                }
                j.append(Seq(seq), Generation(1), body)
                    .await
                    .expect("append");
                seqs.push(seq);
                seq += 1 + i % 3;
            }
            j.append(Seq(seq), Generation(1), common::checkpoint(1, 100))
                .await
                .expect("checkpoint");
            seqs.push(seq);
            // Going backwards or repeating is still refused.
            let err = j
                .submit(Seq(seq), Generation(1), common::write(0, 0, 10, 1))
                .expect_err("duplicate");
            assert!(
                matches!(err, JournalError::SequenceDuplicate { .. }),
                "{err}"
            );
            let err = j
                .submit(Seq(seq - 1), Generation(1), common::write(0, 0, 10, 1))
                .expect_err("backwards");
            assert!(
                matches!(err, JournalError::SequenceDuplicate { .. }),
                "{err}"
            );
        });
        assert!(j.stats().segments > 1, "the test must span segments");
        j.close().expect("close");
    }
    let j = Journal::open(common::jdir(dir.path()), sparse_config(dir.path())).expect("reopen");
    let read: Vec<u64> = j
        .read_records()
        .expect("records")
        .iter()
        .map(|r| r.seq.0)
        .collect();
    assert_eq!(read, seqs);
    assert_eq!(j.durable_seq(), Seq(*seqs.last().expect("last")));
    let img = j
        .open_image(
            CheckpointId(1),
            tandem_journal::VolumeId(0),
            &ImageOptions::default(),
        )
        .expect("image");
    assert_eq!(common::read_image(&img), expected);
    drop(img);
    // Appends continue above the last sequence, with a gap.
    let next = seqs.last().expect("last") + 10;
    rt.block_on(j.append(Seq(next), Generation(1), common::write(0, 0, 10, 99)))
        .expect("append after reopen");
}

#[test]
fn contiguous_journal_still_refuses_gaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = sparse_config(dir.path());
    cfg.sparse_seqs = false;
    let j = Journal::open(common::jdir(dir.path()), cfg).expect("open");
    j.submit(Seq(1), Generation(1), common::write(0, 0, 10, 1))
        .expect("first");
    let err = j
        .submit(Seq(3), Generation(1), common::write(0, 0, 10, 2))
        .expect_err("gap");
    assert!(matches!(err, JournalError::SequenceGap { .. }), "{err}");
}
