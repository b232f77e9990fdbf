//! `tandem-lab bench-vra`: the VRA's benchmarks, each side by side with its yardstick in
//! one run, with the ratios printed:
//!
//! 1. write path: fio (nbd engine) 4 KiB randwrite QD32 and 1 MiB sequential write QD8
//!    against a protected volume that replicates to a recovery VRA on the same machine
//!    (journal fsynced), vs the same fio against nbdkit's file plugin on a raw file; the
//!    replication lag (acknowledged at the protected side -> durable at the recovery side)
//!    comes from `GetStatus` samples of `written_seq` and `acked_seq`;
//! 2. checkpoint barrier: fio completion latency of one QD32 job on each of two protected
//!    VRAs of one VPG, without and with a checkpoint (freeze both, thaw both) every second;
//! 3. initial sync of a volume of random data vs `nbdcopy` between two nbdkit exports;
//! 4. delta sync of a preseeded volume with 1% of its 4 KiB blocks changed vs
//!    `rsync --inplace --no-whole-file`, with the bytes on the wire of each;
//! 5. RTO of a failover: 10 VMs x 2 volumes with 1 GiB of unpromoted journal, from
//!    `StartRecovery` to every recovered volume answering an NBD read, vs restoring the
//!    same volumes by copy (`nbdcopy` of each to a file) and vs promoting the journal
//!    before serving (the commit's promotion and merge, timed in the same run).
//!
//! It reports and never asserts: a missed floor is printed, the run still succeeds.
//! Before each measured run it waits for the machine to be quiet (no `rustc` running).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use tandem_proto::v1::{self as pb, vra_control_client::VraControlClient};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::link::LinkEmulator;
use crate::units::percentile;
use crate::workload::SplitMix64;

const MIB: u64 = 1 << 20;
const VPG: &str = "vpg-bench";

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
/// them). Durations and sizes left unset take the issue's defaults, or the quick ones.
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
struct Settings {
    dir: PathBuf,
    vra_bin: PathBuf,
    write_secs: u64,
    cp_secs: u64,
    cp_interval: Duration,
    managed_iops: u64,
    sync_bytes: u64,
    delta_bytes: u64,
    delta_percent: f64,
    volume_bytes: u64,
    ram_mb: u64,
    journal_limit: u64,
    lag_sample: Duration,
    quiet_wait: Duration,
    min_idle: f64,
    keep: bool,
    link_proxy: bool,
    rto_journal_bytes: u64,
}

impl Settings {
    fn from_args(a: &Args) -> Result<Self> {
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
    fn clean(&self, dir: &Path) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One line of the summary table.
#[derive(Debug)]
struct Row {
    bench: String,
    tandem: String,
    yardstick: String,
    ratio: String,
    floor: String,
    met: bool,
    machine: String,
    /// The figure the floor is about, for the medians over rounds.
    figure: f64,
    /// What `figure` is, e.g. "x nbdkit".
    unit: &'static str,
}

/// Runs the selected benchmarks and prints every result, the ratios and a summary table.
pub async fn run(args: Args) -> Result<()> {
    let s = Settings::from_args(&args)?;
    for tool in ["fio", "nbdkit", "nbdcopy", "rsync", "pgrep"] {
        if which(tool).is_none() {
            bail!("missing {tool}: run scripts/install-test-deps.sh");
        }
    }
    if s.dir.exists() {
        std::fs::remove_dir_all(&s.dir).with_context(|| format!("clearing {}", s.dir.display()))?;
    }
    std::fs::create_dir_all(&s.dir)?;
    println!(
        "vra benchmarks: {} cpus, load {}, dir {}, vra {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg(),
        s.dir.display(),
        s.vra_bin.display()
    );
    println!(
        "settings: write {} s, checkpoint {} s every {} ms, initial sync {} MiB, delta sync {} MiB \
         ({}% of 4 KiB blocks), volumes {} MiB, ram {} MiB, journal limit {} MiB",
        s.write_secs,
        s.cp_secs,
        s.cp_interval.as_millis(),
        s.sync_bytes / MIB,
        s.delta_bytes / MIB,
        s.delta_percent,
        s.volume_bytes / MIB,
        s.ram_mb,
        s.journal_limit / MIB
    );
    let mut rows = Vec::new();
    let rounds = args.rounds.max(1);
    for round in 1..=rounds {
        if rounds > 1 {
            println!("\n#### round {round} of {rounds}");
        }
        for which in [
            Which::Write,
            Which::Checkpoint,
            Which::Initial,
            Which::Delta,
            Which::Managed,
            Which::Rto,
            Which::Move,
            Which::Tls,
            Which::NbdTls,
        ] {
            if !args.only.contains(&which) {
                continue;
            }
            let r = match which {
                Which::Write => bench_write(&s, &mut rows).await,
                Which::Checkpoint => bench_checkpoint(&s, &mut rows).await,
                Which::Initial => bench_initial_sync(&s, &mut rows).await,
                Which::Delta => bench_delta_sync(&s, &mut rows).await,
                Which::Managed => bench_checkpoint_managed(&s, &mut rows).await,
                Which::Rto => bench_rto(&s, &mut rows).await,
                Which::Move => bench_move(&s, &mut rows).await,
                Which::Tls => bench_tls(&s, &mut rows, round).await,
                Which::NbdTls => bench_nbd_tls(&s, &mut rows, round).await,
            };
            if let Err(e) = r {
                println!("{which:?} benchmark failed: {e:#}");
            }
        }
    }
    println!();
    println!("| benchmark | tandem | yardstick | ratio | floor | met | machine |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.bench,
            r.tandem,
            r.yardstick,
            r.ratio,
            r.floor,
            if r.met { "yes" } else { "**no**" },
            r.machine
        );
    }
    if rounds > 1 {
        print_medians(&rows);
    }
    s.clean(&s.dir);
    Ok(())
}

/// Empties a benchmark's work directory (a round may follow one that was kept or failed).
fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    Ok(dir.to_path_buf())
}

/// Per benchmark, the median, least and greatest figure over the rounds, and in how many
/// rounds the floor was met.
fn print_medians(rows: &[Row]) {
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.bench.as_str()) {
            names.push(&r.bench);
        }
    }
    println!();
    println!("| benchmark | rounds | median | min | max | floor | met in |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for name in names {
        let of: Vec<&Row> = rows.iter().filter(|r| r.bench == name).collect();
        let mut figures: Vec<f64> = of.iter().map(|r| r.figure).collect();
        figures.sort_by(f64::total_cmp);
        let unit = of[0].unit;
        println!(
            "| {name} | {} | {:.2}{unit} | {:.2}{unit} | {:.2}{unit} | {} | {} of {} |",
            of.len(),
            figures[figures.len() / 2],
            figures[0],
            figures[figures.len() - 1],
            of[0].floor,
            of.iter().filter(|r| r.met).count(),
            of.len()
        );
    }
}

// ------------------------------------------------------------------ machine state

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

async fn rustc_count() -> usize {
    let out = Command::new("pgrep").args(["-c", "rustc"]).output().await;
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// Idle and total jiffies of all CPUs (`/proc/stat`; iowait counts as idle).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    // guest time is already counted in user time.
    let total = v.iter().take(8).sum();
    (idle, total)
}

/// Percentage of CPU time idle over the next second.
async fn idle_percent() -> f64 {
    let (i0, t0) = cpu_jiffies();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (i1, t1) = cpu_jiffies();
    if t1 <= t0 {
        return 100.0;
    }
    (i1 - i0) as f64 * 100.0 / (t1 - t0) as f64
}

/// Waits (up to the configured time) until no rustc runs and the CPUs are idle enough,
/// flushes dirty pages, and describes the machine state for the result line.
async fn quiet(s: &Settings) -> String {
    let start = Instant::now();
    let mut told = false;
    let state = loop {
        let n = rustc_count().await;
        let idle = idle_percent().await;
        if n == 0 && idle >= s.min_idle {
            break format!("quiet (idle {idle:.0}%), load {}", loadavg());
        }
        if start.elapsed() >= s.quiet_wait {
            println!("  warning: {n} rustc running, {idle:.0}% idle; measuring anyway");
            break format!("NOT quiet ({n} rustc, idle {idle:.0}%), load {}", loadavg());
        }
        if !told {
            println!("  waiting for a quiet machine ({n} rustc running, {idle:.0}% idle)");
            told = true;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let _ = Command::new("sync").status().await;
    state
}

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clk_tck()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_port(addr: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("{what} does not listen on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

// ------------------------------------------------------------------ files

fn create_parent(path: &Path) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    Ok(())
}

/// A file of `size` bytes written with zeroes (allocated, unlike a sparse file).
fn zero_file(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    create_parent(path)?;
    let mut f = std::fs::File::create(path)?;
    let buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// A file of `size` bytes of pseudo-random data.
fn random_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    use std::io::Write;
    create_parent(path)?;
    let mut f = std::fs::File::create(path)?;
    let mut noise = SplitMix64(seed);
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        noise.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Overwrites `percent`% of the 4 KiB blocks of `path` (distinct blocks) with new random
/// data; returns how many.
fn scribble(path: &Path, percent: f64, seed: u64) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let blocks = f.metadata()?.len() / 4096;
    let n = ((blocks as f64) * percent / 100.0).ceil() as u64;
    let mut noise = SplitMix64(seed);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < n.min(blocks) {
        chosen.insert(noise.next() % blocks);
    }
    let mut buf = vec![0u8; 4096];
    for b in &chosen {
        noise.fill(&mut buf);
        f.write_all_at(&buf, b * 4096)?;
    }
    Ok(chosen.len() as u64)
}

// ------------------------------------------------------------------ processes

/// A running `tandem-vra`; killed when dropped.
struct Vra {
    child: Child,
    host: String,
    control: String,
    /// The NBD Unix socket (this host's clients).
    nbd: String,
    /// The NBD TCP listener (TLS required unless the VRA runs `--insecure`).
    nbd_tcp: String,
    log: PathBuf,
    /// The certificate the benchmark presents to a VRA that runs mutual TLS.
    harness: Option<tandem_tls::TlsConfig>,
}

impl Vra {
    /// A VRA without managers or a site CA: plaintext (`--insecure`).
    async fn start(s: &Settings, root: &Path, host: &str) -> Result<Self> {
        Self::start_with(s, root, host, None).await
    }

    /// A VRA, with mutual TLS when `ca` is given: its certificate from `ca`, and the
    /// benchmark's own (a manager of that site) to drive it.
    async fn start_with(
        s: &Settings,
        root: &Path,
        host: &str,
        ca: Option<&tandem_tls::pki::SiteCa>,
    ) -> Result<Self> {
        let data_dir = root.join(host);
        std::fs::create_dir_all(&data_dir)?;
        let addr_file = data_dir.join("addr.json");
        let log = root.join(format!("{host}.log"));
        let harness = match ca {
            Some(ca) => {
                use tandem_tls::{PeerIdentity, pki::PkiDir};
                // The certificate names 127.0.0.1, where the NBD listener is: libnbd's
                // nbds:// checks the address it dials.
                let issued = ca.issue_for(
                    &PeerIdentity::vra(ca.site(), host)?,
                    Duration::from_secs(24 * 3600),
                    &[std::net::Ipv4Addr::LOCALHOST.into()],
                )?;
                PkiDir::new(data_dir.join("pki")).install(ca.cert_pem(), &issued)?;
                let me = PkiDir::new(root.join("harness"));
                if !me.is_provisioned() {
                    ca.provision(&me, &PeerIdentity::manager(ca.site(), 0)?)?;
                }
                Some(tandem_tls::TlsConfig::load(&me)?)
            }
            None => None,
        };
        let mut cmd = Command::new(&s.vra_bin);
        if harness.is_none() {
            cmd.arg("--insecure");
        }
        let child = cmd
            .arg("--host-id")
            .arg(host)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--control-listen", "127.0.0.1:0"])
            .args(["--nbd-listen", "127.0.0.1:0"])
            .arg("--ram-mb")
            .arg(s.ram_mb.to_string())
            .arg("--addr-file")
            .arg(&addr_file)
            .env(
                "RUST_LOG",
                std::env::var("VRA_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", s.vra_bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let addrs: serde_json::Value = loop {
            if let Ok(bytes) = std::fs::read(&addr_file)
                && let Ok(v) = serde_json::from_slice(&bytes)
            {
                break v;
            }
            if Instant::now() > deadline {
                bail!("vra {host} did not start; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let field = |k: &str| {
            addrs[k]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("{} has no {k}", addr_file.display()))
        };
        Ok(Self {
            control: field("control")?,
            // The benchmark's clients are on this host: the Unix socket (the TCP port
            // requires TLS where the VRA has a certificate).
            // Absolute: a relative path would read as a host name in an NBD URI.
            nbd: std::path::absolute(field("nbd_socket")?)?
                .display()
                .to_string(),
            nbd_tcp: field("nbd")?,
            child,
            host: host.to_string(),
            log,
            harness,
        })
    }

    async fn client(&self) -> Result<VraControlClient<Channel>> {
        let ch = crate::lab::vra_control(&self.control, self.harness.as_ref())
            .with_context(|| format!("connecting to vra {}", self.host))?;
        Ok(VraControlClient::new(ch))
    }

    fn uri(&self, export: &str) -> String {
        tandem_nbd::endpoint_uri(&self.nbd, export)
    }

    /// The export over TCP: `nbds://` (a VRA with TLS) or plain `nbd://` (an `--insecure`
    /// VRA).
    fn tcp_uri(&self, export: &str, tls: bool) -> String {
        if tls {
            format!("nbds://{}/{export}", self.nbd_tcp)
        } else {
            tandem_nbd::endpoint_uri(&self.nbd_tcp, export)
        }
    }

    fn cpu(&self) -> f64 {
        cpu_secs(self.child.id())
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// nbdkit's file plugin serving one file.
struct Nbdkit {
    child: Child,
    addr: String,
}

impl Nbdkit {
    async fn start(file: &Path, readonly: bool) -> Result<Self> {
        let port = free_port()?;
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "-i", "127.0.0.1", "-p", &port.to_string()]);
        if readonly {
            cmd.arg("-r");
        }
        let child = cmd
            .arg("file")
            .arg(format!("file={}", file.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting nbdkit")?;
        let addr = format!("127.0.0.1:{port}");
        wait_port(&addr, "nbdkit").await?;
        Ok(Self { child, addr })
    }

    fn uri(&self) -> String {
        format!("nbd://{}/", self.addr)
    }

    fn cpu(&self) -> f64 {
        cpu_secs(self.child.id())
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

// ------------------------------------------------------------------ VRA control

/// One protected volume and where it is recovered.
struct Placement {
    vm: String,
    size: u64,
    image: PathBuf,
    replica: PathBuf,
    journal_dir: PathBuf,
}

impl Placement {
    fn new(root: &Path, vm: &str, size: u64) -> Self {
        Self {
            vm: vm.to_string(),
            size,
            image: root.join("ds-a").join(format!("{vm}-0.img")),
            replica: root.join("ds-b").join(format!("{vm}-0.replica")),
            journal_dir: root.join("ds-b").join("journals").join(vm),
        }
    }
}

async fn assign_recovery(b: &Vra, vms: &[&Placement], hard_limit: u64) -> Result<()> {
    let req = pb::AssignRecoveryRequest {
        vpg_id: VPG.into(),
        generation: 1,
        vms: vms
            .iter()
            .map(|p| pb::RecoveryVm {
                vm_id: p.vm.clone(),
                volumes: vec![pb::VraVolume {
                    volume_id: 0,
                    size_bytes: p.size,
                    path: p.replica.display().to_string(),
                    preseeded: false,
                }],
                journal_dir: p.journal_dir.display().to_string(),
                datastore_path: String::new(),
            })
            .collect(),
        // No window promotion within a run: only the hard limit promotes (early).
        journal_history_secs: 3600,
        journal_warning_bytes: 0,
        journal_hard_limit_bytes: hard_limit,
        remove_dropped_vm_data: false,
        keep_vm_ids: Vec::new(),
        protected_site_id: String::new(),
    };
    b.client()
        .await?
        .assign_recovery(req)
        .await
        .context("assign recovery")?;
    Ok(())
}

async fn assign_protected(
    a: &Vra,
    recovery_address: &str,
    vms: &[&Placement],
    preseeded: bool,
) -> Result<()> {
    let req = pb::AssignProtectedRequest {
        vpg_id: VPG.into(),
        generation: 1,
        vms: vms
            .iter()
            .map(|p| pb::ProtectedVm {
                vm_id: p.vm.clone(),
                volumes: vec![pb::VraVolume {
                    volume_id: 0,
                    size_bytes: p.size,
                    path: p.image.display().to_string(),
                    preseeded: false,
                }],
            })
            .collect(),
        recovery_vra_address: recovery_address.to_string(),
        wan_compression: false,
        priority: pb::VraPriority::Medium as i32,
        freeze_timeout_ms: 10_000,
        preseeded,
        recovery_site_id: String::new(),
    };
    a.client()
        .await?
        .assign_protected(req)
        .await
        .context("assign protected")?;
    Ok(())
}

async fn vpg_status(c: &mut VraControlClient<Channel>) -> Result<pb::VpgReplicationStatus> {
    c.get_status(pb::GetVraStatusRequest {})
        .await?
        .into_inner()
        .vpgs
        .into_iter()
        .find(|p| p.vpg_id == VPG)
        .ok_or_else(|| anyhow!("{VPG} not in the status"))
}

/// Connected, no sync running or owed, nothing tracked, and every entry durable at the
/// recovery side.
fn level(s: &pb::VpgReplicationStatus) -> bool {
    s.connected
        && s.sync.is_none()
        && s.dirty_bytes == 0
        && !s.tracking
        && s.state != pb::VpgStreamState::NeedsSync as i32
        && s.acked_seq >= s.written_seq
}

/// Polls until the protected VPG is level; returns its status then.
async fn wait_level(a: &Vra, patience: Duration) -> Result<pb::VpgReplicationStatus> {
    let mut c = a.client().await?;
    let deadline = Instant::now() + patience;
    loop {
        let s = vpg_status(&mut c).await?;
        if level(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!(
                "vra {} not level after {patience:?}: {s:?}; see {}",
                a.host,
                a.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------ fio

/// What one fio run achieved (writes only; merged over its jobs).
#[derive(Debug, Clone, Copy)]
struct Fio {
    iops: f64,
    bytes_per_sec: f64,
    clat_p50_us: f64,
    clat_p99_us: f64,
    clat_p999_us: f64,
    clat_max_us: f64,
}

impl Fio {
    fn line(&self) -> String {
        format!(
            "{:.0} IOPS {:.1} MB/s clat p50 {:.0} us p99 {:.0} us p99.9 {:.0} us max {:.1} ms",
            self.iops,
            self.bytes_per_sec / 1e6,
            self.clat_p50_us,
            self.clat_p99_us,
            self.clat_p999_us,
            self.clat_max_us / 1000.0
        )
    }
}

/// fio's nbd engine, one job per URI (each `qd` deep), reported as one group.
async fn fio(uris: &[String], rw: &str, bs: &str, qd: u32, size: u64, secs: u64) -> Result<Fio> {
    fio_rated(uris, rw, bs, qd, size, secs, 0).await
}

/// [`fio`] over `nbds://` with the NBD client certificates in `certs`. fio's engine does
/// not let libnbd read a `tls-certificates` directory named in the URI, so libnbd takes
/// its default one: `$HOME/.pki/libnbd`, which it reads only when not root (as root it
/// reads `/etc/pki/libnbd`, the machine's). So fio runs with a home of its own holding
/// the certificates there, as `nobody` when the benchmark runs as root.
async fn fio_tls(uri: &str, certs: &Path, secs: u64, size: u64) -> Result<Fio> {
    const NOBODY: u32 = 65534;
    let home = certs.join("home");
    let pki = home.join(".pki/libnbd");
    std::fs::create_dir_all(&pki)?;
    // /proc/self belongs to the effective user.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0;
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(certs.join(f), pki.join(f))?;
    }
    let fio_args = fio_command("randwrite", "4k", 32, size, secs, 0);
    let mut cmd = if root {
        for p in [&home, &home.join(".pki"), &pki] {
            std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY))?;
        }
        for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
            std::os::unix::fs::chown(pki.join(f), Some(NOBODY), Some(NOBODY))?;
        }
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(fio_args.as_std().get_program())
            .args(fio_args.as_std().get_args());
        c
    } else {
        fio_args
    };
    cmd.env("HOME", &home)
        .arg("--name=j0")
        .arg(format!("--uri={uri}"));
    run_fio(cmd).await
}

/// fio's command line for the nbd engine, without jobs.
fn fio_command(rw: &str, bs: &str, qd: u32, size: u64, secs: u64, rate_iops: u64) -> Command {
    let mut cmd = Command::new("fio");
    if rate_iops > 0 {
        cmd.arg(format!("--rate_iops={rate_iops}"));
    }
    cmd.args([
        "--ioengine=nbd",
        &format!("--rw={rw}"),
        &format!("--bs={bs}"),
        &format!("--iodepth={qd}"),
        &format!("--size={size}"),
        &format!("--runtime={secs}"),
        "--time_based",
        "--group_reporting",
        "--output-format=json",
    ]);
    cmd
}

/// [`fio`] with every job capped at `rate_iops` (0: no cap).
async fn fio_rated(
    uris: &[String],
    rw: &str,
    bs: &str,
    qd: u32,
    size: u64,
    secs: u64,
    rate_iops: u64,
) -> Result<Fio> {
    let mut cmd = fio_command(rw, bs, qd, size, secs, rate_iops);
    for (i, uri) in uris.iter().enumerate() {
        cmd.arg(format!("--name=j{i}")).arg(format!("--uri={uri}"));
    }
    run_fio(cmd).await
}

/// The disk's ceiling for durable sequential writes: fio writing 1 MiB blocks to a file
/// at `path` (on the journal's disk), with an fdatasync after every 8 of them.
async fn fio_disk_ceiling(path: &Path, size: u64, secs: u64) -> Result<Fio> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=disk",
        "--ioengine=psync",
        "--rw=write",
        "--bs=1M",
        "--fdatasync=8",
        &format!("--size={size}"),
        &format!("--runtime={secs}"),
        "--time_based",
        "--output-format=json",
    ])
    .arg(format!("--filename={}", path.display()));
    let r = run_fio(cmd).await;
    let _ = std::fs::remove_file(path);
    r
}

/// Runs fio (with JSON output) and reads the first job's write figures.
async fn run_fio(mut cmd: Command) -> Result<Fio> {
    let out = cmd
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running fio")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.find('{').map(|i| &text[i..]).ok_or_else(|| {
        anyhow!(
            "fio printed no json: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(json).context("parsing fio's json")?;
    let job = &v["jobs"][0];
    if !out.status.success() || job.is_null() || job["error"].as_i64().unwrap_or(0) != 0 {
        bail!(
            "fio job failed ({}): {}",
            job["error"],
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let w = &job["write"];
    let clat = &w["clat_ns"];
    let pct = |k: &str| clat["percentile"][k].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(Fio {
        iops: w["iops"].as_f64().unwrap_or(0.0),
        bytes_per_sec: w["bw_bytes"].as_f64().unwrap_or(0.0),
        clat_p50_us: pct("50.000000"),
        clat_p99_us: pct("99.000000"),
        clat_p999_us: pct("99.900000"),
        clat_max_us: clat["max"].as_f64().unwrap_or(0.0) / 1000.0,
    })
}

// ------------------------------------------------------------------ replication lag

/// One `GetStatus` sample of the protected VPG.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    written: u64,
    acked: u64,
    tracking: bool,
    syncing: bool,
    buffer_bytes: u64,
    dirty_bytes: u64,
}

/// Samples the protected VPG every `period` until `stop`.
fn spawn_sampler(
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
struct Lag {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    points: usize,
    /// Points never acknowledged before the sampling ended.
    unacked: usize,
    /// Seconds during which writes were tracked in the dirty map instead of buffered.
    tracking_secs: f64,
    syncing_secs: f64,
    max_buffer: u64,
    max_dirty: u64,
}

impl Lag {
    fn from_samples(samples: &[Sample], period: Duration) -> Self {
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

    fn line(&self) -> String {
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

// ------------------------------------------------------------------ 1. write path

async fn bench_write(s: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    println!("\n== write path: fio nbd engine, protected VRA -> recovery VRA vs nbdkit file");
    let root = fresh_dir(&s.dir.join("write"))?;
    let size = s.volume_bytes;
    let raw = root.join("nbdkit.raw");
    zero_file(&raw, size)?;
    let vm = Placement::new(&root, "vm-1", size);
    zero_file(&vm.image, size)?;
    let kit = Nbdkit::start(&raw, false).await?;
    let b = Vra::start(s, &root, "host-b").await?;
    let a = Vra::start(s, &root, "host-a").await?;
    assign_recovery(&b, &[&vm], s.journal_limit).await?;
    assign_protected(&a, &b.control, &[&vm], false).await?;
    wait_level(&a, Duration::from_secs(600)).await?;
    let uri = a.uri("vm-1/0");
    for (rw, bs, qd, label) in [
        ("randwrite", "4k", 32, "4 KiB randwrite QD32"),
        ("write", "1M", 8, "1 MiB seq write QD8"),
    ] {
        let machine = quiet(s).await;
        let kit_cpu = kit.cpu();
        let yard = fio(&[kit.uri()], rw, bs, qd, size, s.write_secs).await?;
        let kit_cpu = kit.cpu() - kit_cpu;
        println!(
            "{label} nbdkit: {} (nbdkit cpu {kit_cpu:.1} s)",
            yard.line()
        );

        let machine2 = quiet(s).await;
        let stop = CancellationToken::new();
        let sampler = spawn_sampler(a.client().await?, s.lag_sample, stop.clone());
        let (a_cpu, b_cpu) = (a.cpu(), b.cpu());
        let ours = fio(std::slice::from_ref(&uri), rw, bs, qd, size, s.write_secs).await?;
        let fio_end = Instant::now();
        let caught_up = wait_level(&a, Duration::from_secs(300)).await;
        let drain = fio_end.elapsed();
        // One more period so that the last acknowledgement is sampled.
        tokio::time::sleep(s.lag_sample * 2).await;
        stop.cancel();
        let samples = sampler.await?;
        let (a_cpu, b_cpu) = (a.cpu() - a_cpu, b.cpu() - b_cpu);
        let lag = Lag::from_samples(&samples, s.lag_sample);
        let ratio = ours.iops / yard.iops.max(1e-9);
        println!(
            "{label} tandem: {} (protected cpu {a_cpu:.1} s, recovery cpu {b_cpu:.1} s)",
            ours.line()
        );
        println!(
            "{label} tandem: {}; level {:.1} s after fio ended{}",
            lag.line(),
            drain.as_secs_f64(),
            if caught_up.is_err() {
                " (NOT caught up)"
            } else {
                ""
            }
        );
        let throughput_ok = ratio >= 0.9;
        let lag_ok = lag.p99_ms <= 1000.0 && lag.unacked == 0 && lag.tracking_secs == 0.0;
        println!(
            "ratio {label}: {ratio:.2}x nbdkit ({}), lag p99 {:.0} ms ({})",
            if throughput_ok {
                "ok"
            } else {
                "BELOW FLOOR 0.9x"
            },
            lag.p99_ms,
            if lag_ok {
                "ok"
            } else {
                "ABOVE 1 s OR FELL BACK TO TRACKING"
            }
        );
        if bs == "1M" {
            // Every byte acknowledged must become durable in the journal on this machine's
            // disk: its durable write rate bounds what can replicate without falling back.
            let disk = fio_disk_ceiling(&root.join("disk-ceiling.tmp"), size, s.write_secs.min(20))
                .await?;
            println!(
                "disk ceiling (fio psync 1 MiB sequential writes, fdatasync every 8 MiB, same \
                 disk as the journal): {:.1} MB/s = {:.2}x nbdkit's rate; the floor asks the \
                 journal to make {:.1} MB/s durable",
                disk.bytes_per_sec / 1e6,
                disk.bytes_per_sec / yard.bytes_per_sec.max(1.0),
                0.9 * yard.bytes_per_sec / 1e6
            );
        }
        rows.push(Row {
            bench: format!("write {label}"),
            tandem: format!(
                "{:.0} IOPS, {:.1} MB/s, lag p50 {:.0} ms p99 {:.0} ms{}",
                ours.iops,
                ours.bytes_per_sec / 1e6,
                lag.p50_ms,
                lag.p99_ms,
                if lag.tracking_secs > 0.0 {
                    format!(", tracked {:.1} s", lag.tracking_secs)
                } else {
                    String::new()
                }
            ),
            yardstick: format!(
                "nbdkit {:.0} IOPS, {:.1} MB/s",
                yard.iops,
                yard.bytes_per_sec / 1e6
            ),
            ratio: format!("{ratio:.2}x"),
            floor: ">= 0.9x, lag p99 <= 1 s".into(),
            met: throughput_ok && lag_ok,
            machine: format!("{machine} / {machine2}"),
            figure: ratio,
            unit: "x nbdkit",
        });
    }
    a.stop().await;
    b.stop().await;
    kit.stop().await;
    s.clean(&root);
    Ok(())
}

// ------------------------------------------------------------------ 2. checkpoint barrier

/// Barrier durations (freeze sent -> last thaw answered) of the checkpoints taken.
#[derive(Debug, Default)]
struct Barriers {
    taken: u64,
    refused: u64,
    millis: Vec<f64>,
}

/// Takes a checkpoint of the VPG on every protected VRA every `interval`: freeze all, then
/// thaw all (an unanswered or refused freeze aborts the others).
async fn checkpointer(
    clients: Vec<VraControlClient<Channel>>,
    interval: Duration,
    stop: CancellationToken,
) -> Barriers {
    let mut out = Barriers::default();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut id = 0u64;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        id += 1;
        let start = Instant::now();
        let mut freezes = tokio::task::JoinSet::new();
        for (i, c) in clients.iter().enumerate() {
            let mut c = c.clone();
            freezes.spawn(async move {
                let r = c
                    .freeze(pb::FreezeRequest {
                        vpg_id: VPG.into(),
                        checkpoint_id: id,
                    })
                    .await;
                (i, r.is_ok())
            });
        }
        let mut frozen = Vec::new();
        while let Some(r) = freezes.join_next().await {
            if let Ok((i, true)) = r {
                frozen.push(i);
            }
        }
        let all = frozen.len() == clients.len();
        let ts = unix_ms();
        let mut thaws = tokio::task::JoinSet::new();
        for i in frozen {
            let mut c = clients[i].clone();
            thaws.spawn(async move {
                if all {
                    c.thaw(pb::ThawRequest {
                        vpg_id: VPG.into(),
                        checkpoint_id: id,
                        timestamp_ms: ts,
                        kind: pb::VraCheckpointKind::Automatic as i32,
                        name: String::new(),
                    })
                    .await
                    .is_ok()
                } else {
                    let _ = c
                        .abort(pb::AbortRequest {
                            vpg_id: VPG.into(),
                            checkpoint_id: id,
                        })
                        .await;
                    false
                }
            });
        }
        let mut thawed = all;
        while let Some(r) = thaws.join_next().await {
            thawed &= r.unwrap_or(false);
        }
        if thawed {
            out.taken += 1;
            out.millis.push(start.elapsed().as_secs_f64() * 1000.0);
        } else {
            out.refused += 1;
        }
    }
    out.millis.sort_by(f64::total_cmp);
    out
}

async fn bench_checkpoint(s: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    println!(
        "\n== checkpoint barrier: QD32 4 KiB randwrite on each of 2 protected VRAs, checkpoint every {} ms",
        s.cp_interval.as_millis()
    );
    let root = fresh_dir(&s.dir.join("checkpoint"))?;
    let size = s.volume_bytes;
    let vms = [
        Placement::new(&root, "vm-1", size),
        Placement::new(&root, "vm-2", size),
    ];
    for vm in &vms {
        zero_file(&vm.image, size)?;
    }
    let mut protected = Vec::new();
    let mut recovery = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        let b = Vra::start(s, &root, &format!("host-b{}", i + 1)).await?;
        let a = Vra::start(s, &root, &format!("host-a{}", i + 1)).await?;
        assign_recovery(&b, &[vm], s.journal_limit).await?;
        assign_protected(&a, &b.control, &[vm], false).await?;
        protected.push(a);
        recovery.push(b);
    }
    for a in &protected {
        wait_level(a, Duration::from_secs(600)).await?;
    }
    let uris: Vec<String> = protected
        .iter()
        .zip(&vms)
        .map(|(a, vm)| a.uri(&format!("{}/0", vm.vm)))
        .collect();

    let machine = quiet(s).await;
    let base = fio(&uris, "randwrite", "4k", 32, size, s.cp_secs).await?;
    println!("without checkpoints: {}", base.line());
    for a in &protected {
        wait_level(a, Duration::from_secs(300)).await?;
    }

    let machine2 = quiet(s).await;
    let mut clients = Vec::new();
    for a in &protected {
        clients.push(a.client().await?);
    }
    let stop = CancellationToken::new();
    let cps = tokio::spawn(checkpointer(clients, s.cp_interval, stop.clone()));
    let with = fio(&uris, "randwrite", "4k", 32, size, s.cp_secs).await;
    stop.cancel();
    let barriers = cps.await?;
    let with = with?;
    println!("with checkpoints:    {}", with.line());
    let bp50 = percentile(&barriers.millis, 0.5);
    let bp99 = percentile(&barriers.millis, 0.99);
    let bmax = barriers.millis.last().copied().unwrap_or(0.0);
    println!(
        "barrier (freeze sent -> both thawed): p50 {bp50:.2} ms p99 {bp99:.2} ms max {bmax:.2} ms, \
         {} checkpoints, {} refused or aborted",
        barriers.taken, barriers.refused
    );
    let stall_p50 = (with.clat_p50_us - base.clat_p50_us) / 1000.0;
    let stall_p99 = (with.clat_p99_us - base.clat_p99_us) / 1000.0;
    let stall_p999 = (with.clat_p999_us - base.clat_p999_us) / 1000.0;
    let ok = stall_p99 <= 2.0 && barriers.refused == 0 && barriers.taken > 0;
    println!(
        "write stall (clat with - without): p50 {stall_p50:+.2} ms p99 {stall_p99:+.2} ms \
         p99.9 {stall_p999:+.2} ms; max {:.1} ms vs {:.1} ms; IOPS {:.2}x ({})",
        with.clat_max_us / 1000.0,
        base.clat_max_us / 1000.0,
        with.iops / base.iops.max(1e-9),
        if ok { "ok" } else { "ABOVE FLOOR 2 ms" }
    );
    let mut t = String::new();
    let _ = write!(
        t,
        "stall p50 {stall_p50:+.2} ms p99 {stall_p99:+.2} ms (clat p99 {:.2} ms, max {:.1} ms); \
         barrier p50 {bp50:.2} ms p99 {bp99:.2} ms; {} cps",
        with.clat_p99_us / 1000.0,
        with.clat_max_us / 1000.0,
        barriers.taken
    );
    rows.push(Row {
        bench: "checkpoint barrier, 2 VRAs, QD32".into(),
        tandem: t,
        yardstick: format!(
            "no checkpoints: clat p50 {:.2} ms p99 {:.2} ms max {:.1} ms",
            base.clat_p50_us / 1000.0,
            base.clat_p99_us / 1000.0,
            base.clat_max_us / 1000.0
        ),
        ratio: format!("{:.2}x IOPS", with.iops / base.iops.max(1e-9)),
        floor: "stall p99 <= 2 ms".into(),
        met: ok,
        machine: format!("{machine} / {machine2}"),
        figure: stall_p99,
        unit: " ms stall p99",
    });
    for v in protected.into_iter().chain(recovery) {
        v.stop().await;
    }
    s.clean(&root);
    Ok(())
}

// ------------------------------------------------------------------ 3. initial sync

/// Polls until the protected VPG is level after a sync of `kind`; returns the elapsed
/// time from `start` and that sync's status.
async fn wait_sync(
    a: &Vra,
    kind: pb::VraSyncKind,
    start: Instant,
) -> Result<(Duration, pb::VraSyncStatus)> {
    let mut c = a.client().await?;
    let deadline = start + Duration::from_secs(3600);
    loop {
        let s = vpg_status(&mut c).await?;
        if level(&s)
            && let Some(last) = s.last_sync.as_ref().filter(|l| l.kind == kind as i32)
        {
            return Ok((start.elapsed(), last.clone()));
        }
        if Instant::now() > deadline {
            bail!("the {kind:?} sync did not finish: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The checkpoint barrier as the managers run it: QD32 fio on each of 4 protected VRAs,
/// first with no checkpoints due (interval of an hour), then with the VPG edited to a
/// checkpoint every `cp_interval`; the write stall is the clat difference, and the
/// checkpoints listed by the recovery site in the second run are counted against the
/// intervals.
async fn bench_checkpoint_managed(s: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    use pb::vpg_service_client::VpgServiceClient;
    const HOSTS: usize = 4;
    let interval_secs = s.cp_interval.as_secs().max(1);
    println!(
        "\n== checkpoint barrier through the managers: QD32 4 KiB randwrite on each of {HOSTS} \
         protected VRAs (at most {} IOPS each), a checkpoint every {interval_secs} s by the \
         protected site's leader",
        s.managed_iops
    );
    let root = fresh_dir(&s.dir.join("managed"))?;
    let mut lab = crate::lab::Lab::up(&root, 2, 3).await?;
    let r = async {
        lab.start_vras_with(HOSTS, &["--ram-mb".into(), s.ram_mb.to_string()])
            .await?;
        let hard = s.journal_limit.max(1 << 30);
        let limit = pb::JournalLimit {
            limit: Some(pb::journal_limit::Limit::Bytes(hard)),
        };
        let warning = pb::JournalLimit {
            limit: Some(pb::journal_limit::Limit::Bytes(hard / 4 * 3)),
        };
        let settings = pb::VpgSettings {
            checkpoint_interval_secs: 3600,
            journal_history_secs: 3600,
            target_rpo_secs: 60,
            journal_hard_limit: Some(limit),
            journal_warning: Some(warning),
            ..Default::default()
        };
        let options = crate::protect::ProtectOptions {
            volumes_per_vm: 1,
            vpg: VPG.into(),
            vms: HOSTS,
            volume_bytes: s.volume_bytes,
            memory_mib: 1024,
            settings,
        };
        let p = crate::protect::protect(&lab, &options).await?;
        let apis_a = lab.endpoints(0);
        let mut seen = Vec::new();
        let meeting = |g: &pb::Vpg| g.status.as_ref().is_some_and(|s| s.status == "Meeting SLA");
        crate::protect::wait_vpg(&apis_a, VPG, Duration::from_secs(900), &mut seen, meeting)
            .await?;
        let uris: Vec<String> = p
            .vms
            .iter()
            .map(|(vm, h)| {
                tandem_nbd::endpoint_uri(&lab.vras[0][*h].nbd_socket, &format!("{vm}/0"))
            })
            .collect();

        let machine = quiet(s).await;
        let qd32 = || {
            fio_rated(
                &uris,
                "randwrite",
                "4k",
                32,
                s.volume_bytes,
                s.cp_secs,
                s.managed_iops,
            )
        };
        let base = qd32().await?;
        println!("without checkpoints: {}", base.line());
        // No checkpoint for a while: RPO Not Meeting SLA until the edit below brings them.

        // The same VPG, edited to checkpoint at the interval; its VRAs keep their streams.
        let a = crate::protect::channel(&lab.sites[0][0].api).await?;
        let g = VpgServiceClient::new(a.clone())
            .get_vpg(pb::GetRequest { id: VPG.into() })
            .await?
            .into_inner();
        let mut settings = g.settings.unwrap_or_default();
        settings.checkpoint_interval_secs = interval_secs;
        let edited = VpgServiceClient::new(a.clone())
            .update_vpg(pb::UpdateVpgRequest {
                id: VPG.into(),
                generation: g.generation,
                spec: Some(pb::VpgSpec {
                    name: g.name,
                    recovery_site_id: p.recovery_site_id.clone(),
                    settings: Some(settings),
                    vms: g.vms.into_iter().filter_map(|v| v.placement).collect(),
                }),
                keep_removed_recovery_disks: false,
            })
            .await?
            .into_inner();
        crate::protect::wait_vpg(&apis_a, VPG, Duration::from_secs(600), &mut seen, |g| {
            meeting(g) && g.generation == edited.generation
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(2 * interval_secs)).await;

        let machine2 = quiet(s).await;
        let from_ms = unix_ms();
        let with = qd32().await?;
        let to_ms = unix_ms();
        println!("with checkpoints:    {}", with.line());
        let b = crate::protect::channel(&lab.sites[1][0].api).await?;
        let listed = VpgServiceClient::new(b)
            .list_checkpoints(pb::ListCheckpointsQuery {
                vpg_id: VPG.into(),
                from_ms,
                to_ms,
                kind: pb::CheckpointKind::Automatic as i32,
                page_size: 1000,
                ..Default::default()
            })
            .await?
            .into_inner();
        let due = (to_ms - from_ms) / 1000 / interval_secs;
        let taken = u64::from(listed.total);
        if taken + 1 < due {
            // Why not: what the managers show and every checkpoint listed.
            let g = VpgServiceClient::new(a.clone())
                .get_vpg(pb::GetRequest { id: VPG.into() })
                .await?
                .into_inner();
            let all = VpgServiceClient::new(crate::protect::channel(&lab.sites[1][0].api).await?)
                .list_checkpoints(pb::ListCheckpointsQuery {
                    vpg_id: VPG.into(),
                    page_size: 5,
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!(
                "checkpoints missing: status {:?}; {} listed in all, newest {:?}",
                g.status, all.total, all.checkpoints
            );
        }
        let stall_p50 = (with.clat_p50_us - base.clat_p50_us) / 1000.0;
        let stall_p99 = (with.clat_p99_us - base.clat_p99_us) / 1000.0;
        let ok = stall_p99 <= 2.0 && taken + 1 >= due;
        println!(
            "write stall (clat with - without): p50 {stall_p50:+.2} ms p99 {stall_p99:+.2} ms; \
             {taken} checkpoints listed for {due} intervals; IOPS {:.2}x ({})",
            with.iops / base.iops.max(1e-9),
            if ok { "ok" } else { "BELOW FLOOR" }
        );
        rows.push(Row {
            bench: format!("checkpoint barrier through the managers, {HOSTS} VRAs, QD32"),
            tandem: format!(
                "stall p50 {stall_p50:+.2} ms p99 {stall_p99:+.2} ms (clat p99 {:.2} ms); \
                 {taken} checkpoints in {due} intervals",
                with.clat_p99_us / 1000.0
            ),
            yardstick: format!(
                "no checkpoints: clat p50 {:.2} ms p99 {:.2} ms",
                base.clat_p50_us / 1000.0,
                base.clat_p99_us / 1000.0
            ),
            ratio: format!("{:.2}x IOPS", with.iops / base.iops.max(1e-9)),
            floor: "stall p99 <= 2 ms; a checkpoint every interval".into(),
            met: ok,
            machine: format!("{machine}; {machine2}"),
            figure: stall_p99,
            unit: "ms stall p99",
        });
        Ok::<_, anyhow::Error>(())
    }
    .await;
    lab.down().await;
    if !s.keep {
        let _ = std::fs::remove_dir_all(&root);
    }
    r
}

async fn bench_initial_sync(s: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    let size = s.sync_bytes;
    println!(
        "\n== initial sync of {} MiB of random data vs nbdcopy between two nbdkit exports",
        size / MIB
    );
    let root = fresh_dir(&s.dir.join("initial"))?;
    let vm = Placement::new(&root, "vm-1", size);
    random_file(&vm.image, size, 7)?;

    // nbdcopy: nbdkit (read-only) on the source, nbdkit on a fresh sparse file.
    let dst = root.join("nbdcopy-dst.raw");
    std::fs::File::create(&dst)?.set_len(size)?;
    let src_kit = Nbdkit::start(&vm.image, true).await?;
    let dst_kit = Nbdkit::start(&dst, false).await?;
    let machine = quiet(s).await;
    let t = Instant::now();
    let out = Command::new("nbdcopy")
        .arg("--flush")
        .arg(src_kit.uri())
        .arg(dst_kit.uri())
        .output()
        .await
        .context("running nbdcopy")?;
    let copy = t.elapsed();
    if !out.status.success() {
        bail!("nbdcopy failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    src_kit.stop().await;
    dst_kit.stop().await;
    std::fs::remove_file(&dst)?;
    let copy_mbs = size as f64 / copy.as_secs_f64() / 1e6;
    println!(
        "nbdcopy --flush: {:.2} s, {copy_mbs:.0} MB/s",
        copy.as_secs_f64()
    );

    let b = Vra::start(s, &root, "host-b").await?;
    let a = Vra::start(s, &root, "host-a").await?;
    let machine2 = quiet(s).await;
    assign_recovery(&b, &[&vm], 0).await?;
    let (a_cpu, b_cpu) = (a.cpu(), b.cpu());
    let t = Instant::now();
    assign_protected(&a, &b.control, &[&vm], false).await?;
    let (took, sync) = wait_sync(&a, pb::VraSyncKind::Initial, t).await?;
    let (a_cpu, b_cpu) = (a.cpu() - a_cpu, b.cpu() - b_cpu);
    let mbs = size as f64 / took.as_secs_f64() / 1e6;
    let ratio = copy.as_secs_f64() / took.as_secs_f64();
    println!(
        "tandem initial sync: {:.2} s, {mbs:.0} MB/s, sent {} MiB (protected cpu {a_cpu:.1} s, \
         recovery cpu {b_cpu:.1} s)",
        took.as_secs_f64(),
        sync.sent_bytes / MIB
    );
    println!(
        "ratio initial sync: {ratio:.2}x nbdcopy's speed ({})",
        if ratio >= 1.0 {
            "ok"
        } else {
            "BELOW FLOOR 1.0x"
        }
    );
    rows.push(Row {
        bench: format!("initial sync {} MiB", size / MIB),
        tandem: format!("{:.2} s, {mbs:.0} MB/s", took.as_secs_f64()),
        yardstick: format!(
            "nbdcopy --flush {:.2} s, {copy_mbs:.0} MB/s",
            copy.as_secs_f64()
        ),
        ratio: format!("{ratio:.2}x"),
        figure: ratio,
        unit: "x nbdcopy",
        floor: ">= 1.0x".into(),
        met: ratio >= 1.0,
        machine: format!("{machine} / {machine2}"),
    });
    a.stop().await;
    b.stop().await;
    s.clean(&root);
    Ok(())
}

// ------------------------------------------------------------------ TLS cost

/// The same VRA pair plaintext and with mutual TLS, one after the other in one run: the
/// 4 KiB randwrite QD32 of the write path and the initial sync of `sync_bytes` of random
/// data (floor: TLS at least 0.9x of plaintext on both).
/// The runs of a two-mode comparison: `first` then the other, then mirrored, `per_mode`
/// runs of each in all (A B B A A B ...), so that neither mode always runs first or
/// meets what the other left behind (its files being freed, the page cache).
fn alternating(first: usize, per_mode: usize) -> Vec<usize> {
    let (a, b) = (first, 1 - first);
    (0..2 * per_mode)
        .map(|i| if matches!(i % 4, 0 | 3) { a } else { b })
        .collect()
}

/// One measured run of the TLS comparison: its figure (higher is better), what is
/// printed of it, and the machine's state before it.
#[derive(Clone, Debug)]
struct TlsRun {
    figure: f64,
    shown: String,
    machine: String,
}

/// The better run of a mode, and every run's figure as printed.
fn best_run(runs: &[TlsRun]) -> (TlsRun, String) {
    let best = runs
        .iter()
        .max_by(|a, b| a.figure.total_cmp(&b.figure))
        .cloned()
        .unwrap_or(TlsRun {
            figure: 0.0,
            shown: String::new(),
            machine: String::new(),
        });
    let all = runs
        .iter()
        .map(|r| r.shown.clone())
        .collect::<Vec<_>>()
        .join(", ");
    (best, all)
}

/// A fresh VRA pair in `dir` (with mutual TLS when `ca` is given): host-a protects VM
/// `vm-1`, one zeroed volume of the benchmark's size, to host-b; answered once level.
async fn protected_pair(
    s: &Settings,
    dir: &Path,
    ca: Option<&tandem_tls::pki::SiteCa>,
) -> Result<(Vra, Vra)> {
    let vm = Placement::new(dir, "vm-1", s.volume_bytes);
    zero_file(&vm.image, s.volume_bytes)?;
    let b = Vra::start_with(s, dir, "host-b", ca).await?;
    let a = Vra::start_with(s, dir, "host-a", ca).await?;
    assign_recovery(&b, &[&vm], s.journal_limit).await?;
    assign_protected(&a, &b.control, &[&vm], false).await?;
    wait_level(&a, Duration::from_secs(600)).await?;
    Ok((a, b))
}

/// AES-128-GCM's own cost on this CPU, in CPU seconds per GiB (seal, open) of 16 KiB
/// records, as `openssl speed` measures it on one core: what a TLS byte must cost at
/// least, to set the VRAs' CPU beside (OpenSSL's implementation, not ring's that the VRAs'
/// rustls uses; the workspace times no cipher code itself).
async fn aead_secs_per_gib() -> Result<(f64, f64)> {
    async fn bytes_per_sec(decrypt: bool) -> Result<f64> {
        let mut cmd = Command::new("openssl");
        cmd.arg("speed");
        if decrypt {
            cmd.arg("-decrypt");
        }
        let out = cmd
            .args([
                "-evp",
                "aes-128-gcm",
                "-bytes",
                "16384",
                "-seconds",
                "1",
                "-mr",
            ])
            .stdin(Stdio::null())
            .output()
            .await
            .context("running openssl speed")?;
        // Machine-readable: `+F:<n>:AES-128-GCM:<bytes per second>`.
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter_map(|l| l.strip_prefix("+F:"))
            .filter_map(|l| l.rsplit(':').next()?.trim().parse::<f64>().ok())
            .find(|rate| *rate > 0.0)
            .ok_or_else(|| anyhow!("openssl speed printed no rate: {text}"))
    }
    let gib = (1u64 << 30) as f64;
    Ok((
        gib / bytes_per_sec(false).await?,
        gib / bytes_per_sec(true).await?,
    ))
}

async fn bench_tls(s: &Settings, rows: &mut Vec<Row>, round: usize) -> Result<()> {
    // Each round after the first swaps which mode runs first.
    let first = if round.is_multiple_of(2) { 1 } else { 0 };
    let root = fresh_dir(&s.dir.join("tls"))?;
    let ca = tandem_tls::pki::SiteCa::generate("site-bench")?;
    let modes: [(&str, Option<&tandem_tls::pki::SiteCa>); 2] =
        [("plaintext", None), ("mutual TLS", Some(&ca))];
    // The runs of one mode swing more between runs than TLS costs here (the disk under
    // the journal above all): each mode runs several times, alternating, and the better
    // run of each is compared.
    println!(
        "\n== TLS cost on the data path: one VRA pair, plaintext and with mutual TLS, \
         alternating ({} first)",
        modes[first].0
    );

    let mut write: [Vec<TlsRun>; 2] = [Vec::new(), Vec::new()];
    for m in alternating(first, 2) {
        let (name, tls) = modes[m];
        let dir = root.join(format!("write-{m}-{}", write[m].len()));
        let (a, b) = protected_pair(s, &dir, tls).await?;
        let machine = quiet(s).await;
        let (a_cpu, b_cpu) = (a.cpu(), b.cpu());
        let r = fio(
            &[a.uri("vm-1/0")],
            "randwrite",
            "4k",
            32,
            s.volume_bytes,
            s.write_secs,
        )
        .await?;
        let caught_up = wait_level(&a, Duration::from_secs(300)).await.is_ok();
        let (a_cpu, b_cpu) = (a.cpu() - a_cpu, b.cpu() - b_cpu);
        println!(
            "4 KiB randwrite QD32, {name}: {} (protected cpu {a_cpu:.1} s, recovery cpu \
             {b_cpu:.1} s){}",
            r.line(),
            if caught_up { "" } else { " (NOT caught up)" }
        );
        write[m].push(TlsRun {
            figure: r.iops,
            shown: format!("{:.0}", r.iops),
            machine,
        });
        a.stop().await;
        b.stop().await;
        s.clean(&dir);
    }
    let ((plain, plain_all), (tls, tls_all)) = (best_run(&write[0]), best_run(&write[1]));
    let ratio = tls.figure / plain.figure.max(1e-9);
    println!(
        "ratio TLS 4 KiB randwrite QD32: {ratio:.2}x plaintext (the better run of each: \
         plaintext {plain_all} IOPS, TLS {tls_all} IOPS)"
    );
    rows.push(Row {
        bench: "TLS: 4 KiB randwrite QD32".into(),
        tandem: format!("{:.0} IOPS with mutual TLS (runs {tls_all})", tls.figure),
        yardstick: format!("{:.0} IOPS plaintext (runs {plain_all})", plain.figure),
        ratio: format!("{ratio:.2}x"),
        figure: ratio,
        unit: "x plaintext",
        floor: ">= 0.9x".into(),
        met: ratio >= 0.9,
        machine: format!("{} / {}", plain.machine, tls.machine),
    });

    let size = s.sync_bytes;
    let mut sync: [Vec<TlsRun>; 2] = [Vec::new(), Vec::new()];
    for m in alternating(first, 3) {
        let (name, tls) = modes[m];
        let dir = root.join(format!("sync-{m}-{}", sync[m].len()));
        let vm = Placement::new(&dir, "vm-1", size);
        random_file(&vm.image, size, 7)?;
        let b = Vra::start_with(s, &dir, "host-b", tls).await?;
        let a = Vra::start_with(s, &dir, "host-a", tls).await?;
        assign_recovery(&b, &[&vm], 0).await?;
        let machine = quiet(s).await;
        let (a_cpu, b_cpu) = (a.cpu(), b.cpu());
        let t = Instant::now();
        assign_protected(&a, &b.control, &[&vm], false).await?;
        let (took, _) = wait_sync(&a, pb::VraSyncKind::Initial, t).await?;
        let (a_cpu, b_cpu) = (a.cpu() - a_cpu, b.cpu() - b_cpu);
        let mbs = size as f64 / took.as_secs_f64() / 1e6;
        let gib = size as f64 / (1024.0 * MIB as f64);
        println!(
            "initial sync {} MiB, {name}: {:.2} s, {mbs:.0} MB/s (protected cpu {a_cpu:.1} s, \
             {:.2} s/GiB; recovery cpu {b_cpu:.1} s, {:.2} s/GiB)",
            size / MIB,
            took.as_secs_f64(),
            a_cpu / gib,
            b_cpu / gib
        );
        sync[m].push(TlsRun {
            figure: mbs,
            shown: format!("{:.2}", took.as_secs_f64()),
            machine,
        });
        a.stop().await;
        b.stop().await;
        s.clean(&dir);
    }
    let ((plain, plain_all), (tls, tls_all)) = (best_run(&sync[0]), best_run(&sync[1]));
    let ratio = tls.figure / plain.figure.max(1e-9);
    let secs = |r: &TlsRun| size as f64 / r.figure.max(1e-9) / 1e6;
    let (seal, open) = aead_secs_per_gib().await?;
    println!(
        "AES-128-GCM itself (openssl speed, 16 KiB records, one core, this run): seal \
         {seal:.3} s/GiB, open {open:.3} s/GiB: about the least TLS can add to the sending \
         and the receiving VRA"
    );
    println!(
        "ratio TLS initial sync: {ratio:.2}x plaintext's speed (the faster run of each: \
         plaintext {plain_all} s, TLS {tls_all} s)"
    );
    rows.push(Row {
        bench: format!("TLS: initial sync {} MiB", size / MIB),
        tandem: format!(
            "{:.2} s, {:.0} MB/s with mutual TLS (runs {tls_all} s)",
            secs(&tls),
            tls.figure
        ),
        yardstick: format!(
            "{:.2} s, {:.0} MB/s plaintext (runs {plain_all} s)",
            secs(&plain),
            plain.figure
        ),
        ratio: format!("{ratio:.2}x"),
        figure: ratio,
        unit: "x plaintext",
        floor: ">= 0.85x".into(),
        met: ratio >= 0.85,
        machine: format!("{} / {}", plain.machine, tls.machine),
    });
    s.clean(&root);
    Ok(())
}

// ------------------------------------------------------------------ 7b. NBD over TLS

/// 4 KiB randwrite QD32 from fio's nbd engine (libnbd) on a protected volume over TCP:
/// with TLS (`nbds://`, the site's NBD client certificate, VRAs with mutual TLS between
/// them) vs plain TCP NBD (an `--insecure` VRA pair). The TLS side carries TLS on the
/// replication link too, so the ratio bounds NBD's TLS cost from below. A third run per
/// round, the TLS pair through its Unix socket, shows the host-local path beside them.
async fn bench_nbd_tls(s: &Settings, rows: &mut Vec<Row>, round: usize) -> Result<()> {
    let root = fresh_dir(&s.dir.join("nbd-tls"))?;
    let ca = tandem_tls::pki::SiteCa::generate("site-bench")?;
    let certs = root.join("nbd-client");
    ca.provision_nbd_client(&certs, "bench")?;
    // (name, the VRAs' CA, the client's certificates, through the Unix socket)
    type Mode<'a> = (
        &'a str,
        Option<&'a tandem_tls::pki::SiteCa>,
        Option<&'a Path>,
        bool,
    );
    let modes: [Mode; 3] = [
        ("plain TCP NBD", None, None, false),
        ("NBD over TLS", Some(&ca), Some(&certs), false),
        ("TLS pair, Unix socket", Some(&ca), None, true),
    ];
    // Each mode twice per round, mirrored (A B C C B A), starting one further each round.
    let order: Vec<usize> = (0..3)
        .map(|i| (i + round) % 3)
        .chain((0..3).rev().map(|i| (i + round) % 3))
        .collect();
    println!(
        "\n== NBD over TLS vs plain TCP NBD: fio 4 KiB randwrite QD32, {} s a run",
        s.write_secs
    );
    let mut runs: [Vec<TlsRun>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for m in order {
        let (name, tls, client_certs, socket) = modes[m];
        let dir = root.join(format!("run-{m}-{}", runs[m].len()));
        let (a, b) = protected_pair(s, &dir, tls).await?;
        let uri = if socket {
            a.uri("vm-1/0")
        } else {
            a.tcp_uri("vm-1/0", client_certs.is_some())
        };
        let machine = quiet(s).await;
        let a_cpu = a.cpu();
        let r = match client_certs {
            Some(certs) => fio_tls(&uri, certs, s.write_secs, s.volume_bytes).await?,
            None => fio(&[uri], "randwrite", "4k", 32, s.volume_bytes, s.write_secs).await?,
        };
        let a_cpu = a.cpu() - a_cpu;
        println!("{name}: {} (protected VRA cpu {a_cpu:.1} s)", r.line());
        runs[m].push(TlsRun {
            figure: r.iops,
            shown: format!("{:.0}", r.iops),
            machine,
        });
        a.stop().await;
        b.stop().await;
        s.clean(&dir);
    }
    let [(plain, plain_all), (tls, tls_all), (local, local_all)] =
        [best_run(&runs[0]), best_run(&runs[1]), best_run(&runs[2])];
    let ratio = tls.figure / plain.figure.max(1e-9);
    println!(
        "ratio NBD over TLS: {ratio:.2}x plain TCP NBD (the better run of each: plain \
         {plain_all} IOPS, TLS {tls_all} IOPS; the TLS pair through its Unix socket \
         {local_all} IOPS, {:.2}x)",
        local.figure / plain.figure.max(1e-9)
    );
    rows.push(Row {
        bench: "NBD over TLS: 4 KiB randwrite QD32".into(),
        tandem: format!("{:.0} IOPS over nbds:// (runs {tls_all})", tls.figure),
        yardstick: format!(
            "{:.0} IOPS over plain nbd:// (runs {plain_all})",
            plain.figure
        ),
        ratio: format!("{ratio:.2}x"),
        figure: ratio,
        unit: "x plain TCP NBD",
        floor: ">= 0.85x".into(),
        met: ratio >= 0.85,
        machine: format!("{} / {}", plain.machine, tls.machine),
    });
    s.clean(&root);
    Ok(())
}

// ------------------------------------------------------------------ 4. delta sync

/// `rsync --stats` figures: total bytes sent and received.
/// Brings `dst` in line with `src` with rsync's delta algorithm (as between hosts);
/// answers its bytes on the wire.
async fn rsync_delta(src: &Path, dst: &Path) -> Result<u64> {
    let out = Command::new("rsync")
        // --ignore-times: the copies may share size and mtime (to the second), and rsync
        // would skip the file without comparing it.
        .args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
        .arg(src)
        .arg(dst)
        .output()
        .await
        .context("running rsync")?;
    if !out.status.success() {
        bail!("rsync failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(rsync_wire(&String::from_utf8_lossy(&out.stdout)))
}

fn rsync_wire(stats: &str) -> u64 {
    stats
        .lines()
        .filter(|l| l.starts_with("Total bytes sent:") || l.starts_with("Total bytes received:"))
        .filter_map(|l| {
            l.split(':')
                .nth(1)
                .map(|v| v.trim().replace(',', ""))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

async fn bench_delta_sync(s: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    let size = s.delta_bytes;
    println!(
        "\n== delta sync of {} MiB, {}% of 4 KiB blocks changed, vs rsync --inplace --no-whole-file",
        size / MIB,
        s.delta_percent
    );
    let root = fresh_dir(&s.dir.join("delta"))?;
    let vm = Placement::new(&root, "vm-1", size);
    random_file(&vm.image, size, 11)?;
    create_parent(&vm.replica)?;
    std::fs::copy(&vm.image, &vm.replica)?;
    let rsync_dst = root.join("rsync-dst.img");
    std::fs::copy(&vm.image, &rsync_dst)?;
    let changed = scribble(&vm.image, s.delta_percent, 13)?;
    println!(
        "changed {changed} blocks of 4 KiB ({} MiB)",
        changed * 4096 / MIB
    );

    let machine = quiet(s).await;
    let t = Instant::now();
    let rs_wire = rsync_delta(&vm.image, &rsync_dst).await?;
    let rs = t.elapsed();
    std::fs::remove_file(&rsync_dst)?;
    println!(
        "rsync: {:.2} s, {rs_wire} bytes on the wire ({:.2} MiB)",
        rs.as_secs_f64(),
        rs_wire as f64 / MIB as f64
    );

    // The protected VRA reaches the recovery VRA through a link proxy that counts bytes
    // (unless --no-link-proxy).
    let cancel = CancellationToken::new();
    let links = LinkEmulator::start(cancel.clone());
    let b = Vra::start(s, &root, "host-b").await?;
    let a = Vra::start(s, &root, "host-a").await?;
    let link = if s.link_proxy {
        let link = links.link("site-a", "site-b").await?;
        let proxy = link.add_proxy("site-a", &b.control).await?;
        Some((link, proxy.to_string()))
    } else {
        None
    };
    let recovery_address = link.as_ref().map_or(b.control.clone(), |(_, p)| p.clone());
    let machine2 = quiet(s).await;
    assign_recovery(&b, &[&vm], 0).await?;
    let (a_cpu, b_cpu) = (a.cpu(), b.cpu());
    let t = Instant::now();
    assign_protected(&a, &recovery_address, &[&vm], true).await?;
    let (took, sync) = wait_sync(&a, pb::VraSyncKind::Delta, t).await?;
    let (a_cpu, b_cpu) = (a.cpu() - a_cpu, b.cpu() - b_cpu);
    let wire = match &link {
        Some((link, _)) => {
            let state = link.state().await?;
            state.a_to_b.bytes + state.b_to_a.bytes
        }
        None => sync.sent_bytes + sync.hash_bytes,
    };
    let ratio = rs.as_secs_f64() / took.as_secs_f64();
    let wire_ratio = wire as f64 / rs_wire.max(1) as f64;
    let met = ratio >= 4.0 && wire_ratio <= 0.2;
    println!(
        "tandem delta sync: {:.2} s, {wire} bytes on the wire ({:.2} MiB; data {} bytes, hashes \
         {} bytes) (protected cpu {a_cpu:.1} s, recovery cpu {b_cpu:.1} s)",
        took.as_secs_f64(),
        wire as f64 / MIB as f64,
        sync.sent_bytes,
        sync.hash_bytes
    );
    println!(
        "ratio delta sync: {ratio:.2}x rsync's speed, wire {wire_ratio:.3}x rsync's bytes ({})",
        if met {
            "ok"
        } else {
            "BELOW FLOOR: 4x the speed, 0.2x the bytes"
        },
    );
    rows.push(Row {
        bench: format!(
            "delta sync {} MiB, {}% changed",
            size / MIB,
            s.delta_percent
        ),
        tandem: format!(
            "{:.2} s, {:.2} MiB on the wire",
            took.as_secs_f64(),
            wire as f64 / MIB as f64
        ),
        yardstick: format!(
            "rsync {:.2} s, {:.2} MiB on the wire",
            rs.as_secs_f64(),
            rs_wire as f64 / MIB as f64
        ),
        ratio: format!("{ratio:.2}x speed, {wire_ratio:.3}x bytes"),
        figure: ratio,
        unit: "x rsync's speed",
        floor: ">= 4x speed, <= 0.2x bytes".into(),
        met,
        machine: format!("{machine} / {machine2}"),
    });
    a.stop().await;
    b.stop().await;
    links.shutdown().await;
    s.clean(&root);
    Ok(())
}

// ------------------------------------------------------------------ 5. failover RTO

/// VMs and volumes of the RTO run.
const RTO_VMS: usize = 10;
const RTO_VOLUMES: u32 = 2;

/// The RTO run's volumes: (vm, volume id).
fn rto_volumes() -> Vec<(String, u32)> {
    (0..RTO_VMS)
        .flat_map(|v| (0..RTO_VOLUMES).map(move |n| (format!("vm-{v}"), n)))
        .collect()
}

async fn bench_rto(s: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    let vols = rto_volumes();
    let per_volume = (s.rto_journal_bytes / vols.len() as u64).div_ceil(MIB) * MIB;
    let size = (per_volume + per_volume / 4).div_ceil(MIB) * MIB;
    println!(
        "\n== failover RTO: {RTO_VMS} VMs x {RTO_VOLUMES} volumes of {} MiB, {} MiB of \
         unpromoted journal, vs restore by nbdcopy and vs promote-then-serve",
        size / MIB,
        per_volume * vols.len() as u64 / MIB
    );
    let root = fresh_dir(&s.dir.join("rto"))?;
    let ds_a = root.join("ds-a");
    let ds_b = root.join("ds-b");
    std::fs::create_dir_all(&ds_a)?;
    std::fs::create_dir_all(&ds_b)?;
    let b = Vra::start(s, &root, "host-b").await?;
    let a = Vra::start(s, &root, "host-a").await?;
    let volume = |dir: &Path, vm: &str, n: u32, ext: &str| pb::VraVolume {
        volume_id: n,
        size_bytes: size,
        path: dir.join(format!("{vm}-{n}.{ext}")).display().to_string(),
        preseeded: false,
    };
    let vms: Vec<String> = (0..RTO_VMS).map(|v| format!("vm-{v}")).collect();
    b.client()
        .await?
        .assign_recovery(pb::AssignRecoveryRequest {
            vpg_id: VPG.into(),
            generation: 1,
            vms: vms
                .iter()
                .map(|vm| pb::RecoveryVm {
                    vm_id: vm.clone(),
                    volumes: (0..RTO_VOLUMES)
                        .map(|n| volume(&ds_b, vm, n, "replica"))
                        .collect(),
                    journal_dir: ds_b.join("journals").join(vm).display().to_string(),
                    datastore_path: String::new(),
                })
                .collect(),
            // Nothing is promoted during the run: the whole journal stays unpromoted.
            journal_history_secs: 3600,
            journal_warning_bytes: 0,
            journal_hard_limit_bytes: 0,
            remove_dropped_vm_data: false,
            keep_vm_ids: Vec::new(),
            protected_site_id: String::new(),
        })
        .await
        .context("assign recovery")?;
    for vm in &vms {
        for n in 0..RTO_VOLUMES {
            zero_file(&ds_a.join(format!("{vm}-{n}.img")), size)?;
        }
    }
    a.client()
        .await?
        .assign_protected(pb::AssignProtectedRequest {
            vpg_id: VPG.into(),
            generation: 1,
            vms: vms
                .iter()
                .map(|vm| pb::ProtectedVm {
                    vm_id: vm.clone(),
                    volumes: (0..RTO_VOLUMES)
                        .map(|n| volume(&ds_a, vm, n, "img"))
                        .collect(),
                })
                .collect(),
            recovery_vra_address: b.control.clone(),
            wan_compression: false,
            priority: pb::VraPriority::Medium as i32,
            freeze_timeout_ms: 10_000,
            preseeded: false,
            recovery_site_id: String::new(),
        })
        .await
        .context("assign protected")?;
    wait_level(&a, Duration::from_secs(300)).await?;

    // The journal: random data over every volume, 1 MiB writes, all volumes at once.
    let t = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for (i, (vm, n)) in vols.iter().enumerate() {
        let (addr, export) = (a.nbd.clone(), format!("{vm}/{n}"));
        writers.spawn(async move {
            let c = tandem_nbd::NbdClient::connect_to(&addr, &export).await?;
            let mut rng = SplitMix64(0x5eed + i as u64);
            let mut buf = vec![0u8; MIB as usize];
            for off in (0..per_volume).step_by(MIB as usize) {
                rng.fill(&mut buf);
                c.write(off, bytes::Bytes::copy_from_slice(&buf), false)
                    .await?;
            }
            c.flush().await?;
            c.disconnect().await?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = writers.join_next().await {
        r??;
    }
    let status = wait_level(&a, Duration::from_secs(600)).await?;
    println!(
        "journal written: {} MiB in {:.1} s (through the protected VRA, replicated)",
        per_volume * vols.len() as u64 / MIB,
        t.elapsed().as_secs_f64()
    );
    let mut ca = a.client().await?;
    ca.freeze(pb::FreezeRequest {
        vpg_id: VPG.into(),
        checkpoint_id: 1,
    })
    .await?;
    let marker = ca
        .thaw(pb::ThawRequest {
            vpg_id: VPG.into(),
            checkpoint_id: 1,
            timestamp_ms: unix_ms(),
            kind: pb::VraCheckpointKind::Manual as i32,
            name: "before-disaster".into(),
        })
        .await?
        .into_inner()
        .marker_seq;
    ca.wait_durable(pb::WaitDurableRequest {
        vpg_id: VPG.into(),
        seq: marker.max(status.written_seq),
        timeout_ms: 10_000,
    })
    .await?;
    let mut cb = b.client().await?;
    let journal = vpg_status(&mut cb).await?.journal_bytes;
    println!("journal at the recovery VRA: {} MiB", journal / MIB);
    // The protected side is gone.
    a.stop().await;

    let machine = quiet(s).await;
    let t = Instant::now();
    let rec = cb
        .start_recovery(pb::StartRecoveryRequest {
            vpg_id: VPG.into(),
            generation: 1,
            checkpoint_id: 1,
            op_id: "bench-1".into(),
        })
        .await
        .context("start recovery")?
        .into_inner();
    let mut readers = tokio::task::JoinSet::new();
    for v in &rec.volumes {
        let (addr, export) = (rec.nbd_socket.clone(), v.export_name.clone());
        readers.spawn(async move {
            let c = tandem_nbd::NbdClient::connect_to(&addr, &export).await?;
            c.read(0, 4096).await?;
            c.disconnect().await?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = readers.join_next().await {
        r??;
    }
    let rto = t.elapsed();
    println!(
        "tandem RTO: {} ms to {} volumes answering reads (images over {} MiB of journal)",
        rto.as_millis(),
        rec.volumes.len(),
        journal / MIB
    );

    // Yardstick 1: restore by copy, every recovered volume copied to a file.
    let machine2 = quiet(s).await;
    let t = Instant::now();
    for v in &rec.volumes {
        let dst = root.join(format!("copy-{}.raw", v.export_name.replace('/', "-")));
        std::fs::File::create(&dst)?.set_len(v.size_bytes)?;
        let out = Command::new("nbdcopy")
            .arg(tandem_nbd::endpoint_uri(&rec.nbd_socket, &v.export_name))
            .arg(&dst)
            .output()
            .await
            .context("running nbdcopy")?;
        if !out.status.success() {
            bail!("nbdcopy failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let copy = t.elapsed();
    println!(
        "restore by nbdcopy of the {} volumes: {:.2} s",
        rec.volumes.len(),
        copy.as_secs_f64()
    );
    // Yardstick 2: promote before serving (the commit's work, timed here).
    let t = Instant::now();
    cb.commit_recovery(pb::CommitRecoveryRequest {
        vpg_id: VPG.into(),
        op_id: "bench-1".into(),
        new_generation: 2,
    })
    .await?;
    loop {
        let st = vpg_status(&mut cb).await?;
        if st.recovered_phase == pb::RecoveredPhase::Live as i32 {
            break;
        }
        if !st.last_error.is_empty() {
            bail!("commit failed: {}", st.last_error);
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("commit did not finish");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let promote = t.elapsed();
    println!(
        "promote-then-serve (the commit: promotion and merge): {:.2} s",
        promote.as_secs_f64()
    );
    let ratio = copy.as_secs_f64() / rto.as_secs_f64();
    let met = rto <= Duration::from_secs(2);
    println!(
        "ratio RTO: {ratio:.1}x faster than restore by copy, {:.1}x faster than promote-then-serve ({})",
        promote.as_secs_f64() / rto.as_secs_f64(),
        if met { "ok" } else { "ABOVE FLOOR 2 s" }
    );
    rows.push(Row {
        bench: format!(
            "failover RTO, {RTO_VMS} VMs x {RTO_VOLUMES} volumes, {} MiB written",
            per_volume * vols.len() as u64 / MIB
        ),
        tandem: format!("{} ms (journal {} MiB)", rto.as_millis(), journal / MIB),
        yardstick: format!(
            "nbdcopy restore {:.2} s; promote-then-serve {:.2} s",
            copy.as_secs_f64(),
            promote.as_secs_f64()
        ),
        ratio: format!("{ratio:.1}x"),
        figure: rto.as_secs_f64() * 1000.0,
        unit: " ms",
        floor: "<= 2 s".into(),
        met,
        machine: format!("{machine} / {machine2}"),
    });
    b.stop().await;
    s.clean(&root);
    Ok(())
}

// ------------------------------------------------------------------ 6. move and reverse protection

/// The size of each volume of the move run (10 VMs x 2 volumes, as the RTO run's).
const MOVE_VOLUME_BYTES: u64 = 64 * MIB;

/// Fills every byte of NBD export `export` at `addr` with pseudo-random data (1 MiB writes).
async fn fill_nbd(addr: &str, export: &str, size: u64, seed: u64) -> Result<()> {
    let c = tandem_nbd::NbdClient::connect_to(addr, export).await?;
    let mut noise = SplitMix64(seed);
    let mut buf = vec![0u8; MIB as usize];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(MIB) as usize;
        noise.fill(&mut buf[..n]);
        c.write(at, bytes::Bytes::copy_from_slice(&buf[..n]), false)
            .await?;
        at += n as u64;
    }
    c.flush().await?;
    c.disconnect().await?;
    Ok(())
}

/// Overwrites `percent`% of the 4 KiB blocks (distinct blocks) of the volume `uri` serves,
/// as a VM writing; returns how many.
async fn scribble_nbd(uri: &str, size: u64, percent: f64, seed: u64) -> Result<u64> {
    let c = tandem_nbd::NbdClient::connect_uri(uri).await?;
    let blocks = size / 4096;
    let n = ((blocks as f64) * percent / 100.0).ceil() as u64;
    let mut noise = SplitMix64(seed);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < n.min(blocks) {
        chosen.insert(noise.next() % blocks);
    }
    let mut buf = vec![0u8; 4096];
    for b in &chosen {
        noise.fill(&mut buf);
        c.write(b * 4096, bytes::Bytes::copy_from_slice(&buf), false)
            .await?;
    }
    c.flush().await?;
    c.disconnect().await?;
    Ok(chosen.len() as u64)
}

/// Waits until every protected VRA of `site` holds `VPG` with nothing unacknowledged.
async fn wait_replicated(lab: &crate::lab::Lab, site: usize) -> Result<()> {
    let t = Instant::now();
    loop {
        let mut level = true;
        for vra in &lab.vras[site] {
            let status =
                pb::vra_control_client::VraControlClient::new(vra.control_channel().await?)
                    .get_status(pb::GetVraStatusRequest {})
                    .await?
                    .into_inner();
            level &= status.vpgs.iter().filter(|g| g.vpg_id == VPG).all(|g| {
                g.acked_seq >= g.written_seq
                    && g.dirty_bytes == 0
                    && g.sync.as_ref().is_none_or(|s| s.kind == 0)
            });
        }
        if level {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(900) {
            bail!("the writes were not replicated within 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A whole move of a VPG of 10 VMs x 2 volumes through the managers (a lab of 2 sites x 3
/// managers, 2 hosts each), with reverse protection: from the request to the VMs up at
/// the recovery site, the commit, and the old site's disks brought in line by the delta
/// sync, whose time and bytes are set against rsync of the same files.
async fn bench_move(s: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    use pb::recovery_service_client::RecoveryServiceClient;
    let total = RTO_VMS as u64 * u64::from(RTO_VOLUMES) * MOVE_VOLUME_BYTES;
    println!(
        "\n== move of {RTO_VMS} VMs x {RTO_VOLUMES} volumes ({} MiB, all written) through the \
         managers, {}% of 4 KiB blocks written at the new site before commit, reverse \
         protection vs rsync --inplace --no-whole-file of the same files",
        total / MIB,
        s.delta_percent
    );
    let root = fresh_dir(&s.dir.join("move"))?;
    let mut lab = crate::lab::Lab::up(&root, 2, 3).await?;
    let r = async {
        lab.start_vras_with(2, &["--ram-mb".into(), s.ram_mb.to_string()])
            .await?;
        let settings = pb::VpgSettings {
            checkpoint_interval_secs: 5,
            journal_history_secs: 3600,
            target_rpo_secs: 60,
            ..Default::default()
        };
        let options = crate::protect::ProtectOptions {
            vpg: VPG.into(),
            vms: RTO_VMS,
            volume_bytes: MOVE_VOLUME_BYTES,
            volumes_per_vm: RTO_VOLUMES as u8,
            memory_mib: 1024,
            settings,
        };
        let p = crate::protect::protect(&lab, &options).await?;
        let (apis_a, apis_b) = (lab.endpoints(0), lab.endpoints(1));
        let mut seen = Vec::new();
        let meeting = |g: &pb::Vpg| g.status.as_ref().is_some_and(|s| s.status == "Meeting SLA");
        crate::protect::wait_vpg(&apis_a, VPG, Duration::from_secs(900), &mut seen, meeting)
            .await?;
        let t = Instant::now();
        let mut fills = tokio::task::JoinSet::new();
        for (i, (vm, h)) in p.vms.iter().enumerate() {
            for u in 0..RTO_VOLUMES {
                let (addr, export) = (lab.vras[0][*h].nbd_socket.clone(), format!("{vm}/{u}"));
                let seed = 31 + i as u64 * 7 + u64::from(u);
                fills.spawn(async move { fill_nbd(&addr, &export, MOVE_VOLUME_BYTES, seed).await });
            }
        }
        while let Some(r) = fills.join_next().await {
            r??;
        }
        wait_replicated(&lab, 0).await?;
        println!(
            "{} MiB written through the protected VRAs and replicated in {:.1} s",
            total / MIB,
            t.elapsed().as_secs_f64()
        );
        // The yardstick's destinations: copies of the VMs' disks at site a as the move
        // leaves them (nothing writes them from here).
        let site_dir =
            |site: usize, h: usize| lab.dir.join(&lab.site_names[site]).join(format!("ds-{h}"));
        let copies = root.join("rsync-dst");
        std::fs::create_dir_all(&copies)?;
        let mut files = Vec::new();
        for (vm, h) in &p.vms {
            for u in 0..RTO_VOLUMES {
                let disk = site_dir(0, *h).join(vm).join(format!("c0u{u}.img"));
                let copy = copies.join(format!("{vm}-{u}.img"));
                std::fs::copy(&disk, &copy)?;
                let replica = site_dir(1, *h)
                    .join(VPG)
                    .join(vm)
                    .join(format!("c0u{u}.replica"));
                files.push((replica, copy));
            }
        }

        let machine = quiet(s).await;
        let b = crate::protect::channel(&lab.sites[1][0].api).await?;
        let t = Instant::now();
        RecoveryServiceClient::new(b.clone())
            .start_move(pb::StartMoveRequest {
                vpg_id: VPG.into(),
                commit_policy: pb::CommitPolicyKind::Manual as i32,
                commit_after_secs: 0,
                reverse: pb::ReverseProtection::Yes as i32,
            })
            .await?;
        let op = loop {
            let ops = RecoveryServiceClient::new(b.clone())
                .list_recoveries(pb::ListRecoveriesRequest {
                    vpg_ids: vec![VPG.into()],
                })
                .await?
                .into_inner()
                .operations;
            if let Some(op) = ops.into_iter().find(|o| o.step == "before commit") {
                break op;
            }
            if t.elapsed() > Duration::from_secs(600) {
                bail!("the move did not reach before commit");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let up = t.elapsed();
        // The VMs run at site b and write before commit.
        let mut written = 0;
        for (i, v) in op.volumes.iter().enumerate() {
            written +=
                scribble_nbd(&v.nbd_uri, v.size_bytes, s.delta_percent, 101 + i as u64).await?;
        }
        let scribbled = t.elapsed();
        RecoveryServiceClient::new(b.clone())
            .commit_recovery(pb::RecoveryRef { vpg_id: VPG.into() })
            .await?;
        let commit_from = t.elapsed();
        loop {
            let ops = RecoveryServiceClient::new(b.clone())
                .list_recoveries(pb::ListRecoveriesRequest {
                    vpg_ids: vec![VPG.into()],
                })
                .await?
                .into_inner()
                .operations;
            if ops.is_empty() {
                break;
            }
            if t.elapsed() > Duration::from_secs(900) {
                bail!("the commit did not end");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let committed = t.elapsed();
        let (syncs, done_ms) =
            crate::protect::finished_syncs(&lab, 1, VPG, Duration::from_secs(900)).await?;
        if syncs.len() != lab.vras[1].len() {
            bail!("{} of {} VRAs synced", syncs.len(), lab.vras[1].len());
        }
        let protected = t.elapsed();
        crate::protect::wait_vpg(&apis_b, VPG, Duration::from_secs(120), &mut seen, |g| {
            meeting(g) && g.direction == "outgoing"
        })
        .await?;
        let started_ms = syncs.iter().map(|s| s.started_ms).min().unwrap_or(done_ms);
        let sync_time = Duration::from_millis(done_ms.saturating_sub(started_ms));
        let sent: u64 = syncs.iter().map(|s| s.sent_bytes).sum();
        let hashes: u64 = syncs.iter().map(|s| s.hash_bytes).sum();
        let wire = sent + hashes;
        println!(
            "move: VMs up at site b {:.2} s after the request; {written} blocks of 4 KiB written \
             there in {:.2} s; commit {:.2} s; protected back (the old site took the new \
             direction, delta syncs done) {:.2} s after the request",
            up.as_secs_f64(),
            (scribbled - up).as_secs_f64(),
            (committed - commit_from).as_secs_f64(),
            protected.as_secs_f64()
        );
        println!(
            "reverse protection: delta syncs {:.2} s, {:.2} MiB on the wire ({:.2} MiB of data, \
             {:.2} MiB of checksums) for {} MiB of volumes; kinds {:?}",
            sync_time.as_secs_f64(),
            wire as f64 / MIB as f64,
            sent as f64 / MIB as f64,
            hashes as f64 / MIB as f64,
            total / MIB,
            syncs.iter().map(|s| s.kind).collect::<Vec<_>>()
        );

        // The yardstick: rsync brings the same copies of site a's disks in line with site
        // b's volumes (the replicas the VMs now run on), file by file.
        let machine2 = quiet(s).await;
        let t = Instant::now();
        let mut rs_wire = 0;
        for (src, dst) in &files {
            rs_wire += rsync_delta(src, dst).await?;
        }
        let rs = t.elapsed();
        println!(
            "rsync of the same {} files: {:.2} s, {:.2} MiB on the wire",
            files.len(),
            rs.as_secs_f64(),
            rs_wire as f64 / MIB as f64
        );
        let ratio = rs.as_secs_f64() / sync_time.as_secs_f64().max(0.001);
        let wire_ratio = wire as f64 / rs_wire.max(1) as f64;
        // Issue 10 names no floor for the move: faster than rsync with fewer bytes is the
        // least an operator would take.
        let met = ratio >= 1.0 && wire_ratio <= 1.0;
        println!(
            "ratio reverse protection: {ratio:.2}x rsync's speed, {wire_ratio:.3}x rsync's bytes, \
             {:.4}x the volumes' size ({})",
            wire as f64 / total as f64,
            if met { "ok" } else { "BELOW rsync" }
        );
        rows.push(Row {
            bench: format!(
                "move {RTO_VMS} VMs x {RTO_VOLUMES} volumes ({} MiB), {}% written at the new \
                 site, with reverse protection",
                total / MIB,
                s.delta_percent
            ),
            tandem: format!(
                "up {:.2} s, committed {:.2} s, protected back {:.2} s after the request; \
                 delta syncs {:.2} s, {:.2} MiB on the wire",
                up.as_secs_f64(),
                committed.as_secs_f64(),
                protected.as_secs_f64(),
                sync_time.as_secs_f64(),
                wire as f64 / MIB as f64
            ),
            yardstick: format!(
                "rsync {:.2} s, {:.2} MiB on the wire",
                rs.as_secs_f64(),
                rs_wire as f64 / MIB as f64
            ),
            ratio: format!("{ratio:.2}x speed, {wire_ratio:.3}x bytes"),
            figure: ratio,
            unit: "x rsync's speed",
            floor: ">= 1x speed, <= 1x bytes (none named; rsync's)".into(),
            met,
            machine: format!("{machine} / {machine2}"),
        });
        Ok(())
    }
    .await;
    lab.down().await;
    s.clean(&root);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
