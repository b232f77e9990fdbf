//! What the demo is asked (its options), its constants, and its report: a line per step with PASS or FAIL and its figures.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
pub(crate) use tandem_testkit::eventually::until_some;

use anyhow::Result;

pub(crate) const MIB: u64 = 1 << 20;
/// Protected VMs of the demo's VPG: VM `i` runs on protected host `i % 2`.
pub(crate) const VMS: usize = 4;
/// Hosts (VRAs) per site.
pub(crate) const HOSTS: usize = 2;
/// How long the demo waits for a sync, a resume or a durable checkpoint before failing.
pub(crate) const PATIENCE: Duration = Duration::from_secs(60);
/// How often the monitor samples the VRAs' status.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// The RPO above which steady replication fails the demo.
pub(crate) const TARGET_RPO: Duration = Duration::from_secs(10);

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Lab directory; a fresh temporary one (removed after a passing run) by default.
    pub dir: Option<PathBuf>,
    /// Keep the lab running after the demo until Ctrl-C.
    pub keep: bool,
    /// Size of each VM's volume.
    pub volume_mib: u64,
    /// Replication buffer of each VRA (its RAM setting).
    pub vra_ram_mib: u64,
    /// The VPG's checkpoint interval, in seconds (at least 1).
    pub checkpoint_interval_secs: u64,
    /// How long steady replication runs before its images are checked.
    pub steady: Duration,
    /// How long the link is cut.
    pub cut: Duration,
    /// Writers of the verifying workload (each writes every volume).
    pub writers: u32,
    /// Pause of each writer between two writes (zero: back to back, as fast as the VRAs
    /// take them).
    pub pace: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            dir: None,
            keep: false,
            volume_mib: 64,
            vra_ram_mib: 16,
            checkpoint_interval_secs: 2,
            steady: Duration::from_secs(12),
            cut: Duration::from_secs(10),
            writers: 8,
            pace: Duration::from_millis(2),
        }
    }
}

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) failures: usize,
    pub(crate) passes: usize,
    pub(crate) summary: Vec<(String, String)>,
    pub(crate) images: Vec<(String, bool)>,
}

impl Report {
    pub(crate) fn step(&mut self, name: &str, started: Instant, r: Result<String>) {
        let ms = started.elapsed().as_millis();
        match r {
            Ok(figures) => {
                self.passes += 1;
                println!("PASS  {name:<44} {ms:>6} ms  {figures}");
            }
            Err(e) => {
                self.failures += 1;
                println!("FAIL  {name:<44} {ms:>6} ms  {e:#}");
            }
        }
    }

    pub(crate) fn note(&mut self, what: &str, figures: impl Into<String>) {
        self.summary.push((what.to_string(), figures.into()));
    }

    /// Records whether a checked image equals the source.
    pub(crate) fn image(&mut self, what: &str, equal: bool) {
        self.images.push((what.to_string(), equal));
    }
}

/// `n thing` or `n things`.
pub(crate) fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
