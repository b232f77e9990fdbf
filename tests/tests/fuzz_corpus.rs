//! Replays the checked-in seed corpus of every fuzz target in `fuzz/` through the same
//! entry points the fuzzer calls (each crate's `fuzz` module, its `fuzzing` feature), so
//! every test run checks the seeds, and every crash kept there as a regression input,
//! without libFuzzer's instrumentation.

use std::path::{Path, PathBuf};

/// Feeds every file of `fuzz/corpus/<target>` to `entry`, naming the first that panics.
fn replay(target: &str, entry: Entry) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    for path in files {
        let bytes = std::fs::read(&path).expect("corpus file");
        let replayed = std::panic::catch_unwind(|| entry(&bytes));
        assert!(replayed.is_ok(), "{} fails", path.display());
    }
}

/// A fuzz target's entry point: the bytes of one input.
type Entry = fn(&[u8]);

/// Every target of `fuzz/fuzz_targets/`, with the entry point it calls.
const TARGETS: [(&str, Entry); 8] = [
    ("nbd_handshake", tandem_nbd::fuzz::handshake),
    ("nbd_transmission", tandem_nbd::fuzz::transmission),
    ("journal_segment", tandem_journal::fuzz::segment),
    ("journal_open", tandem_journal::fuzz::open),
    (
        "replication_receiver",
        tandem_vra::fuzz::replication_receiver,
    ),
    ("replication_sender", tandem_vra::fuzz::replication_sender),
    ("spec_file", tandem_cli::fuzz::spec),
    ("tokens", tandem_core::fuzz::tokens),
];

#[test]
fn every_seed_of_every_target_replays() {
    for (target, entry) in TARGETS {
        replay(target, entry);
    }
}

#[test]
fn every_target_in_fuzz_is_replayed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    let mut in_fuzz: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| {
            let name = entry.expect("target entry").file_name();
            name.to_str()?.strip_suffix(".rs").map(str::to_string)
        })
        .collect();
    in_fuzz.sort();
    let mut replayed: Vec<String> = TARGETS.iter().map(|(t, _)| t.to_string()).collect();
    replayed.sort();
    assert_eq!(in_fuzz, replayed);
}
