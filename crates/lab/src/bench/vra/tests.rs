//! Unit tests of the benchmarks' arithmetic: lag from samples, round orders, rsync's wire bytes, scribbling.

use std::time::Duration;

use super::delta_sync::rsync_wire;
use super::files::*;
use super::lag::*;
use super::tls::alternating;

fn sample(ms: u64, written: u64, acked: u64) -> Sample {
    Sample {
        at: Duration::from_millis(ms),
        written,
        acked,
        tracking: false,
        syncing: false,
        buffer_bytes: 0,
        dirty_bytes: 0,
    }
}

/// Each mode runs as often as the other, and the first run's mode alternates with
/// the other's in mirrored pairs.
#[test]
fn alternating_runs_mirror_each_other() {
    assert_eq!(alternating(0, 2), [0, 1, 1, 0]);
    assert_eq!(alternating(1, 3), [1, 0, 0, 1, 1, 0]);
}

#[test]
fn lag_is_time_from_written_to_acked() {
    let samples = [
        sample(0, 0, 0),
        sample(50, 10, 0),
        sample(100, 20, 5),
        sample(150, 20, 10),
        sample(200, 30, 20),
        sample(250, 30, 30),
    ];
    let lag = Lag::from_samples(&samples, Duration::from_millis(50));
    assert_eq!(lag.points, 3);
    assert_eq!(lag.unacked, 0);
    // 10 written at 50, acked at 150; 20 at 100 -> 200; 30 at 200 -> 250.
    assert_eq!(lag.p50_ms, 100.0);
    assert_eq!(lag.max_ms, 100.0);
}

#[test]
fn unacked_points_count_until_the_last_sample() {
    let samples = [sample(0, 0, 0), sample(50, 10, 0), sample(100, 10, 0)];
    let lag = Lag::from_samples(&samples, Duration::from_millis(50));
    assert_eq!(lag.unacked, 1);
    assert_eq!(lag.max_ms, 50.0);
}

#[test]
fn rsync_stats_are_summed() {
    let stats = "Number of files: 1\nTotal bytes sent: 1,234\nTotal bytes received: 56\n";
    assert_eq!(rsync_wire(stats), 1290);
}

#[test]
fn scribble_changes_distinct_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("f");
    zero_file(&p, 4096 * 1000).expect("file");
    assert_eq!(scribble(&p, 1.0, 3).expect("scribble"), 10);
    let data = std::fs::read(&p).expect("read");
    let changed = data
        .chunks(4096)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count();
    assert_eq!(changed, 10);
}
