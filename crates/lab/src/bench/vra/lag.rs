//! Replication lag from `GetStatus` samples of `written_seq` and `acked_seq`.

use std::time::{Duration, Instant};

use tandem_proto::v1::vra_control_client::VraControlClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::units::percentile;

use super::harness::*;
use super::settings::*;

/// One `GetStatus` sample of the protected VPG.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    pub(super) at: Duration,
    pub(super) written: u64,
    pub(super) acked: u64,
    pub(super) tracking: bool,
    pub(super) syncing: bool,
    pub(super) buffer_bytes: u64,
    pub(super) dirty_bytes: u64,
}

/// Samples the protected VPG every `period` until `stop`.
pub(super) fn spawn_sampler(
    mut c: VraControlClient<Channel>,
    period: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut out = Vec::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let asked = start.elapsed();
            if let Ok(s) = vpg_status(&mut c).await {
                // The middle of the call is the best guess of when the figures held.
                let at = (asked + start.elapsed()) / 2;
                out.push(Sample {
                    at,
                    written: s.written_seq,
                    acked: s.acked_seq,
                    tracking: s.tracking,
                    syncing: s.sync.is_some(),
                    buffer_bytes: s.buffer_bytes,
                    dirty_bytes: s.dirty_bytes,
                });
            }
        }
        out
    })
}

/// Replication lag over a run: for each sample where `written_seq` moved, the time until
/// a sample saw `acked_seq` reach it.
#[derive(Debug, Default)]
pub(super) struct Lag {
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
    pub(super) points: usize,
    /// Points never acknowledged before the sampling ended.
    pub(super) unacked: usize,
    /// Seconds during which writes were tracked in the dirty map instead of buffered.
    pub(super) tracking_secs: f64,
    pub(super) syncing_secs: f64,
    pub(super) max_buffer: u64,
    pub(super) max_dirty: u64,
}

impl Lag {
    pub(super) fn from_samples(samples: &[Sample], period: Duration) -> Self {
        let mut lags = Vec::new();
        let mut unacked = 0;
        let mut prev_written = samples.first().map_or(0, |s| s.written);
        let mut j = 0;
        for (i, s) in samples.iter().enumerate() {
            if s.written <= prev_written {
                continue;
            }
            prev_written = s.written;
            j = j.max(i);
            while j < samples.len() && samples[j].acked < s.written {
                j += 1;
            }
            match samples.get(j) {
                Some(done) => lags.push((done.at - s.at).as_secs_f64() * 1000.0),
                None => {
                    unacked += 1;
                    let last = samples.last().map_or(s.at, |l| l.at);
                    lags.push((last - s.at).as_secs_f64() * 1000.0);
                }
            }
        }
        lags.sort_by(f64::total_cmp);
        let per = period.as_secs_f64();
        Self {
            p50_ms: percentile(&lags, 0.50),
            p99_ms: percentile(&lags, 0.99),
            max_ms: lags.last().copied().unwrap_or(0.0),
            points: lags.len(),
            unacked,
            tracking_secs: samples.iter().filter(|s| s.tracking).count() as f64 * per,
            syncing_secs: samples.iter().filter(|s| s.syncing).count() as f64 * per,
            max_buffer: samples.iter().map(|s| s.buffer_bytes).max().unwrap_or(0),
            max_dirty: samples.iter().map(|s| s.dirty_bytes).max().unwrap_or(0),
        }
    }

    pub(super) fn line(&self) -> String {
        format!(
            "replication lag p50 {:.0} ms p99 {:.0} ms max {:.0} ms ({} points, {} unacked), \
             tracking {:.1} s, syncing {:.1} s, max buffer {} MiB, max dirty {} MiB",
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.points,
            self.unacked,
            self.tracking_secs,
            self.syncing_secs,
            self.max_buffer / MIB,
            self.max_dirty / MIB
        )
    }
}
