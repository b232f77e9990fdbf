//! What `tandem-lab bench-vra` is asked (its flags) and runs with (the defaults resolved), and one line of its summary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub(super) const MIB: u64 = 1 << 20;
pub(super) const VPG: &str = "vpg-bench";

/// The benchmarks `--only` can pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Write,
    Checkpoint,
    Initial,
    Delta,
    /// The checkpoint barrier through the managers (a lab of 2 sites x 3 managers, one VPG
    /// of a VM on each of 4 protected hosts, checkpoints taken by the protected site's
    /// leader).
    Managed,
    /// Failover RTO with a large unpromoted journal.
    Rto,
    /// A whole move through the managers with reverse protection, vs rsync.
    Move,
    /// The cost of mutual TLS on the data path: the write path and the initial sync of
    /// the same VRA pair, plaintext and with TLS, in one run.
    Tls,
    /// NBD over TCP with TLS (`nbds://`, a client certificate of the site) vs plain TCP
    /// NBD (an `--insecure` VRA pair), fio's nbd engine, in one run.
    NbdTls,
}

/// Flags of `tandem-lab bench-vra` (`scripts/bench-vra.sh` maps environment variables to
/// them). Durations and sizes left unset take the defaults, or the quick ones.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Work directory, on the disk under test (removed afterwards unless --keep).
    #[arg(long, default_value = "target/bench-vra")]
    pub dir: PathBuf,
    /// The `tandem-vra` binary (default: next to this executable).
    #[arg(long)]
    pub vra_bin: Option<PathBuf>,
    /// Smoke run: 5 s fio runs, a 256 MiB initial sync, a 128 MiB delta sync.
    #[arg(long)]
    pub quick: bool,
    /// Seconds of each write-path fio run [default: 60; quick 5].
    #[arg(long)]
    pub write_secs: Option<u64>,
    /// Seconds of each checkpoint-barrier fio run, without and with checkpoints
    /// [default: 60; quick 5].
    #[arg(long)]
    pub cp_secs: Option<u64>,
    /// Checkpoint interval in the barrier run.
    #[arg(long, default_value_t = 1000)]
    pub cp_interval_ms: u64,
    /// IOPS cap of each fio job in the barrier run through the managers (0: none). The
    /// seed takes no checkpoints while a VPG syncs, so the VRAs must keep up with the
    /// writes: an unthrottled QD32 fio on 4 VRAs of a 2-core machine outruns replication,
    /// fills the buffers and syncs instead.
    #[arg(long, default_value_t = 2500)]
    pub managed_iops: u64,
    /// Size of the initial-sync volume in MiB [default: 4096; quick 256].
    #[arg(long)]
    pub sync_mib: Option<u64>,
    /// Size of the delta-sync volume in MiB [default: 1024; quick 128].
    #[arg(long)]
    pub delta_mib: Option<u64>,
    /// Percentage of the 4 KiB blocks changed before the delta sync.
    #[arg(long, default_value_t = 1.0)]
    pub delta_percent: f64,
    /// Size of the write-path and checkpoint volumes in MiB.
    #[arg(long, default_value_t = 1024)]
    pub volume_mib: u64,
    /// Replication buffer of each VRA (`tandem-vra --ram-mb`).
    #[arg(long, default_value_t = 256)]
    pub ram_mb: u64,
    /// Hard limit of each journal in the write-path and checkpoint runs, in MiB (early
    /// promotion keeps the disk use bounded; 0: none).
    #[arg(long, default_value_t = 4096)]
    pub journal_limit_mib: u64,
    /// `GetStatus` sampling period for the replication lag.
    #[arg(long, default_value_t = 50)]
    pub lag_sample_ms: u64,
    /// Benchmarks to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "write,checkpoint,initial,delta"
    )]
    pub only: Vec<Which>,
    /// Rounds of the selected benchmarks (each runs its yardstick and Tandem side by side);
    /// with more than one, the medians are printed at the end.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Longest wait for a quiet machine (no rustc, CPUs at least --min-idle % idle over a
    /// second) before each measured run; after it the run goes ahead, marked not quiet.
    #[arg(long, default_value_t = 900)]
    pub quiet_wait_secs: u64,
    /// Idle CPU share (percent, over one second) that counts as quiet.
    #[arg(long, default_value_t = 85.0)]
    pub min_idle: f64,
    /// Unpromoted journal behind the RTO run, in MiB, spread over its 20 volumes
    /// [default: 1024; quick 128].
    #[arg(long)]
    pub rto_journal_mib: Option<u64>,
    /// Keep the work directory.
    #[arg(long)]
    pub keep: bool,
    /// Delta sync without the byte-counting link proxy between the VRAs (the bytes on the
    /// wire are then the sync's data and hash bytes only).
    #[arg(long)]
    pub no_link_proxy: bool,
}

/// [`Args`] with the defaults resolved.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) dir: PathBuf,
    pub(super) vra_bin: PathBuf,
    pub(super) write_secs: u64,
    pub(super) cp_secs: u64,
    pub(super) cp_interval: Duration,
    pub(super) managed_iops: u64,
    pub(super) sync_bytes: u64,
    pub(super) delta_bytes: u64,
    pub(super) delta_percent: f64,
    pub(super) volume_bytes: u64,
    pub(super) ram_mb: u64,
    pub(super) journal_limit: u64,
    pub(super) lag_sample: Duration,
    pub(super) quiet_wait: Duration,
    pub(super) min_idle: f64,
    pub(super) keep: bool,
    pub(super) link_proxy: bool,
    pub(super) rto_journal_bytes: u64,
}

impl Settings {
    pub(super) fn from_args(a: &Args) -> Result<Self> {
        let pick =
            |v: Option<u64>, full: u64, quick: u64| v.unwrap_or(if a.quick { quick } else { full });
        let vra_bin = match &a.vra_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("executable without a directory")?
                .join("tandem-vra"),
        };
        if !vra_bin.exists() {
            bail!(
                "{} not found: build it (cargo build --release --bins) or pass --vra-bin",
                vra_bin.display()
            );
        }
        Ok(Self {
            dir: a.dir.clone(),
            vra_bin,
            write_secs: pick(a.write_secs, 60, 5),
            cp_secs: pick(a.cp_secs, 60, 5),
            cp_interval: Duration::from_millis(a.cp_interval_ms.max(1)),
            managed_iops: a.managed_iops,
            sync_bytes: pick(a.sync_mib, 4096, 256) * MIB,
            delta_bytes: pick(a.delta_mib, 1024, 128) * MIB,
            delta_percent: a.delta_percent,
            volume_bytes: a.volume_mib * MIB,
            ram_mb: a.ram_mb,
            journal_limit: a.journal_limit_mib * MIB,
            lag_sample: Duration::from_millis(a.lag_sample_ms.max(1)),
            quiet_wait: Duration::from_secs(a.quiet_wait_secs),
            min_idle: a.min_idle,
            keep: a.keep,
            link_proxy: !a.no_link_proxy,
            rto_journal_bytes: pick(a.rto_journal_mib, 1024, 128) * MIB,
        })
    }

    /// Removes a benchmark's directory unless --keep.
    pub(super) fn clean(&self, dir: &Path) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One line of the summary table.
#[derive(Debug)]
pub(super) struct Row {
    pub(super) bench: String,
    pub(super) tandem: String,
    pub(super) yardstick: String,
    pub(super) ratio: String,
    pub(super) floor: String,
    pub(super) met: bool,
    pub(super) machine: String,
    /// The figure the floor is about, for the medians over rounds.
    pub(super) figure: f64,
    /// What `figure` is, e.g. "x nbdkit".
    pub(super) unit: &'static str,
}
