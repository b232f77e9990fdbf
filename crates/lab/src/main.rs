//! `tandem-lab`: multi-site labs of real processes on loopback, the control of their link
//! emulator, the demo, and an NBD server for raw files.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand, ValueEnum};
use tandem_lab::demo;
use tandem_lab::units::fmt_bytes;
use tandem_testkit::lab;
use tandem_testkit::link::{CutMode, Direction, LinkState};
use tandem_testkit::link_control::{self, pb};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "tandem-lab", version, about = "Tandem labs on loopback")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Starts the sites' manager clusters and stays in the foreground until Ctrl-C.
    Up {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 2)]
        sites: usize,
        #[arg(long, default_value_t = 3)]
        managers: usize,
        /// Hosts per site, each with its VRA.
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// Also create, through the CLI from deploy/examples' spec files, the inventory
        /// and one VPG of 4 VMs on 2 hosts, and wait until it meets its SLA; lab.json then
        /// lists every VM's volumes with their NBD addresses.
        #[arg(long)]
        example: bool,
    },
    /// Shows the lab described in DIR/lab.json and each cluster's state.
    Status {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Drives the link emulator of the lab in DIR (its `tandem-lab up` must be running).
    Link {
        /// The lab directory (holding lab.json).
        #[arg(long, global = true)]
        dir: Option<PathBuf>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
        output: Output,
        #[command(subcommand)]
        cmd: LinkCmd,
    },
    /// Serves raw image files over NBD, each as an export named after its file stem.
    Serve {
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Config-store benchmark: a 3-node site vs a 3-node etcd, side by side.
    Bench {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 20)]
        secs: u64,
        /// Rounds of etcd then tandem (the medians are printed when more than one).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// VRA benchmarks: write path vs nbdkit, checkpoint barrier, initial sync vs nbdcopy,
    /// delta sync vs rsync (scripts/bench-vra.sh).
    BenchVra(tandem_lab::bench::vra::Args),
    /// The managers at scale: 1 VPG, then many, of 4 VMs each on one site pair; managers'
    /// CPU and memory, `vpg list` latency, lag from a pause or a link cut to every VPG's
    /// status (floors: lag <= 2 s, list < 200 ms).
    BenchScale {
        #[arg(long, default_value_t = 100)]
        vpgs: usize,
        #[arg(long, default_value_t = 4)]
        vms_per_vpg: usize,
        /// Size of each VM's volume, in MiB.
        #[arg(long, default_value_t = 4)]
        volume_mib: u64,
        /// Seconds of steady protection over which CPU is measured, at each size.
        #[arg(long, default_value_t = 60)]
        steady_secs: u64,
        #[arg(long, default_value = "target/bench-scale")]
        dir: PathBuf,
        /// Keep the directory (logs) after the run.
        #[arg(long)]
        keep: bool,
    },
    /// The RPO benchmark: the demo's lab, VPG and verifying workload protected by the
    /// managers; the actual RPO site-a shows, p50/p99 over the run (floor: p99 <= 1.5 s).
    BenchRpo {
        /// Seconds of the measured run.
        #[arg(long, default_value_t = 300)]
        secs: u64,
        /// The VPG's checkpoint interval, in seconds.
        #[arg(long, default_value_t = 1)]
        checkpoint_secs: u64,
        /// Lab directory; a fresh temporary one (removed after the run) by default.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Runs the demo: a two-site lab with managers and VRAs, driven through the managers'
    /// API: pairing, inventory, a VPG of 4 VMs protected by the managers; under a verifying
    /// workload, checkpoints' images checked against the source, a kill -9 of the protected
    /// site's leader, a link cut and its sync, a kill -9 of a recovery VRA; a failover test,
    /// a move with reverse protection and back, and a failover after kill -9 of the whole
    /// protected site. Exits non-zero on any FAIL.
    Demo {
        /// Lab directory; a fresh temporary one (removed after a passing run) by default.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the lab running after the demo until Ctrl-C.
        #[arg(long)]
        keep: bool,
        /// Size of each VM's volume, in MiB.
        #[arg(long, default_value_t = 64)]
        volume_mib: u64,
        /// Replication buffer (RAM setting) of each VRA, in MiB; a small one fills during
        /// the link cut, so that writes are tracked and a bitmap sync follows.
        #[arg(long, default_value_t = 16)]
        vra_ram_mib: u64,
        /// The VPG's checkpoint interval, in seconds.
        #[arg(long, default_value_t = 2)]
        checkpoint_secs: u64,
        /// Seconds of steady replication before the first image check.
        #[arg(long, default_value_t = 12)]
        steady_secs: u64,
        /// Seconds the link is cut.
        #[arg(long, default_value_t = 10)]
        cut_secs: u64,
        /// Writers of the verifying workload (each writes every volume).
        #[arg(long, default_value_t = 8)]
        writers: u32,
        /// Pause of each writer between two writes, in ms (0: back to back).
        #[arg(long, default_value_t = 2)]
        pace_ms: u64,
    },
}

#[derive(Subcommand, Debug)]
enum LinkCmd {
    /// Lists every link with its conditions and counters.
    List,
    /// Cuts a link: `drop` resets connections, `blackhole` stalls them until heal.
    Cut {
        name: String,
        #[arg(long, value_enum, default_value_t = CutArg::Drop)]
        mode: CutArg,
    },
    /// Ends a cut; held data is delivered.
    Heal { name: String },
    /// Sets the added one-way latency in ms (0 removes it).
    Delay {
        name: String,
        ms: u64,
        #[arg(long, value_enum, default_value_t = DirectionArg::Both)]
        direction: DirectionArg,
    },
    /// Sets the bandwidth in bytes per second, with an optional k, m or g (KiB, MiB, GiB)
    /// suffix; 0 removes the limit.
    Throttle {
        name: String,
        #[arg(value_parser = parse_rate)]
        bytes_per_sec: u64,
        #[arg(long, value_enum, default_value_t = DirectionArg::Both)]
        direction: DirectionArg,
    },
    /// Shows one link's conditions, counters and proxies.
    Stats { name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CutArg {
    Drop,
    Blackhole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DirectionArg {
    Both,
    AToB,
    BToA,
}

impl DirectionArg {
    fn to_proto(self) -> pb::Direction {
        match self {
            DirectionArg::Both => pb::Direction::Both,
            DirectionArg::AToB => pb::Direction::AToB,
            DirectionArg::BToA => pb::Direction::BToA,
        }
    }
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        _ => return Err(format!("{s:?} is not a byte rate (e.g. 65536, 512k, 10m)")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a byte rate (e.g. 65536, 512k, 10m)"))
}

fn fmt_rate(bps: u64) -> String {
    if bps == 0 {
        "-".into()
    } else {
        format!("{}/s", fmt_bytes(bps))
    }
}

fn fmt_cut(s: &LinkState) -> &'static str {
    match s.cut {
        None => "up",
        Some(CutMode::Drop) => "cut (drop)",
        Some(CutMode::Blackhole) => "cut (blackhole)",
    }
}

fn print_links(states: &[LinkState]) {
    println!(
        "{:<24} {:<16} {:>11} {:>11} {:>10} {:>15} {:>23}",
        "NAME", "STATE", "A->B", "B->A", "OPEN/ALL", "DELAY A>B/B>A", "THROTTLE A>B/B>A"
    );
    for s in states {
        let open = s.a_to_b.connections_open + s.b_to_a.connections_open;
        let all = s.a_to_b.connections_total + s.b_to_a.connections_total;
        println!(
            "{:<24} {:<16} {:>11} {:>11} {:>10} {:>15} {:>23}",
            s.name,
            fmt_cut(s),
            fmt_bytes(s.a_to_b.bytes),
            fmt_bytes(s.b_to_a.bytes),
            format!("{open}/{all}"),
            format!("{}/{} ms", s.a_to_b.delay_ms, s.b_to_a.delay_ms),
            format!(
                "{}/{}",
                fmt_rate(s.a_to_b.throttle_bps),
                fmt_rate(s.b_to_a.throttle_bps)
            ),
        );
    }
}

fn print_stats(s: &LinkState) {
    println!("link {} ({} <-> {}): {}", s.name, s.a, s.b, fmt_cut(s));
    println!(
        "  {:<6} {:>8} {:>12} {:>12} {:>10} {:>6} {:>6} {:>8}",
        "DIR", "DELAY", "THROTTLE", "BYTES", "HELD", "OPEN", "ALL", "REFUSED"
    );
    for (label, d) in [("a->b", Direction::AToB), ("b->a", Direction::BToA)] {
        let st = s.direction(d);
        println!(
            "  {:<6} {:>8} {:>12} {:>12} {:>10} {:>6} {:>6} {:>8}",
            label,
            format!("{} ms", st.delay_ms),
            fmt_rate(st.throttle_bps),
            st.bytes,
            st.held_bytes,
            st.connections_open,
            st.connections_total,
            st.connections_refused
        );
    }
    println!("  proxies (what the dialing site sends counts in its direction):");
    for p in &s.proxies {
        println!("    {} -> {}: {} -> {}", p.from, p.to, p.listen, p.upstream);
    }
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument => anyhow!("{}", s.message()),
        code => anyhow!("link control: {code:?}: {}", s.message()),
    }
}

async fn run_link(dir: Option<PathBuf>, output: Output, cmd: LinkCmd) -> Result<ExitCode> {
    let dir = dir.context("--dir DIR (the lab directory) is required")?;
    let file = lab::LabFile::read(&dir)?;
    let addr = file.link_control.with_context(|| {
        format!(
            "{} names no link_control (the lab predates the link emulator?)",
            dir.join("lab.json").display()
        )
    })?;
    let mut client = link_control::connect(&addr).await?;
    let decode = |s: pb::LinkState| link_control::state_from_proto(s).map_err(|e| anyhow!(e));
    let set = |name: String, change: pb::set_link_request::Change| pb::SetLinkRequest {
        name,
        change: Some(change),
    };
    use pb::set_link_request::Change;
    let one = match cmd {
        LinkCmd::List => {
            let links = client
                .list_links(pb::ListLinksRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .links
                .into_iter()
                .map(decode)
                .collect::<Result<Vec<_>>>()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&links)?),
                Output::Table => print_links(&links),
            }
            return Ok(ExitCode::SUCCESS);
        }
        LinkCmd::Stats { name } => {
            let s = client
                .get_link(pb::GetLinkRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            let s = decode(s)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
                Output::Table => print_stats(&s),
            }
            return Ok(ExitCode::SUCCESS);
        }
        LinkCmd::Cut { name, mode } => set(
            name,
            Change::Cut(match mode {
                CutArg::Drop => pb::CutMode::Drop,
                CutArg::Blackhole => pb::CutMode::Blackhole,
            } as i32),
        ),
        LinkCmd::Heal { name } => set(name, Change::Heal(pb::Heal {})),
        LinkCmd::Delay {
            name,
            ms,
            direction,
        } => set(
            name,
            Change::Delay(pb::Delay {
                direction: direction.to_proto() as i32,
                ms,
            }),
        ),
        LinkCmd::Throttle {
            name,
            bytes_per_sec,
            direction,
        } => set(
            name,
            Change::Throttle(pb::Throttle {
                direction: direction.to_proto() as i32,
                bytes_per_sec,
            }),
        ),
    };
    let s = client
        .set_link(one)
        .await
        .map_err(status_error)?
        .into_inner();
    let s = decode(s)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Output::Table => print_links(std::slice::from_ref(&s)),
    }
    Ok(ExitCode::SUCCESS)
}

fn shutdown_token() -> CancellationToken {
    tandem_runtime::shutdown_on_signals().expect("installing the signal handlers")
}

#[tokio::main]
async fn main() -> ExitCode {
    tandem_runtime::init_logging("warn", false);
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Up {
            dir,
            sites,
            managers,
            hosts,
            example,
        } => {
            let shutdown = shutdown_token();
            let mut lab = tokio::select! {
                lab = async {
                    let mut lab = lab::Lab::up(&dir, sites, managers).await?;
                    if let Err(e) = lab.start_vras(hosts).await {
                        lab.down().await;
                        return Err(e);
                    }
                    anyhow::Ok(lab)
                } => lab?,
                _ = shutdown.cancelled() => return Ok(ExitCode::FAILURE),
            };
            let mut created = None;
            if example {
                let r = tokio::select! {
                    r = tandem_lab::example::create_in(&mut lab) => r,
                    _ = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted")),
                };
                match r.and_then(|e| lab.write_file().map(|()| e)) {
                    Ok(e) => created = Some(e),
                    Err(e) => {
                        lab.down().await;
                        return Err(e.context("creating the example VPG"));
                    }
                }
            }
            println!("lab is up: {}", lab.dir.join("lab.json").display());
            println!(
                "  link control {}: tandem-lab link --dir {} list",
                lab.link_control,
                dir.display()
            );
            for (i, name) in lab.site_names.iter().enumerate() {
                println!(
                    "  {name}: TANDEM_TOKEN_FILE={} TANDEM_CA_FILE={} tandem -e {}",
                    lab.dir.join(tandem_testkit::operator::TOKEN_FILE).display(),
                    lab.dir.join(tandem_testkit::operator::CA_FILE).display(),
                    lab.endpoints(i).join(",")
                );
                for v in &lab.vras[i] {
                    println!("    {}: vra control {} nbd {}", v.host, v.control, v.nbd);
                }
            }
            if let Some(e) = &created {
                println!(
                    "  VPG {} ({}) from the spec files in {}:",
                    e.vpg,
                    e.status,
                    e.specs.display()
                );
                for vm in &lab.vms {
                    for v in &vm.volumes {
                        println!("    {} c{}u{}: {}", vm.vm, v.controller, v.unit, v.uri);
                    }
                }
            }
            println!("Ctrl-C stops it.");
            shutdown.cancelled().await;
            lab.down().await;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { dir } => {
            let file = lab::LabFile::read(&dir)?;
            file.use_credentials()?;
            for site in &file.sites {
                println!("{}:", site.name);
                for m in &site.managers {
                    let state = match tandem_testkit::operator::cluster_client(&m.api).await {
                        Ok(mut c) => match c
                            .get_cluster_status(tandem_proto::v1::GetClusterStatusRequest {})
                            .await
                        {
                            Ok(s) => {
                                let s = s.into_inner();
                                format!(
                                    "{} (leader {}, term {}, applied {})",
                                    s.state, s.leader_id, s.term, s.last_applied
                                )
                            }
                            Err(e) => format!("error: {}", e.message()),
                        },
                        Err(e) => format!("unreachable: {e}"),
                    };
                    println!(
                        "  manager {} pid {} api {} raft {}: {state}",
                        m.id, m.pid, m.api, m.raft
                    );
                }
                for v in &site.vras {
                    println!(
                        "  vra {} pid {} control {} nbd {}",
                        v.host, v.pid, v.control, v.nbd
                    );
                }
            }
            if let Some(addr) = &file.link_control {
                println!("link control {addr}:");
                for l in &file.links {
                    println!("  {}:", l.name);
                    for p in &l.proxies {
                        println!("    {} -> {}: {} -> {}", p.from, p.to, p.listen, p.upstream);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Link { dir, output, cmd } => run_link(dir, output, cmd).await,
        Cmd::Serve { listen, files } => {
            let shutdown = shutdown_token();
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            println!(
                "serving {} file(s) over NBD on {}",
                files.len(),
                listener.local_addr()?
            );
            tandem_nbd::serve_files(listener, files, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            dir,
            clients,
            secs,
            rounds,
        } => {
            tandem_lab::bench::store::run(dir, clients, secs, rounds).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::BenchVra(args) => {
            tandem_lab::bench::vra::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::BenchScale {
            vpgs,
            vms_per_vpg,
            volume_mib,
            steady_secs,
            dir,
            keep,
        } => {
            if vpgs < 2 || vms_per_vpg == 0 || volume_mib == 0 {
                anyhow::bail!("--vpgs must be at least 2, --vms-per-vpg and --volume-mib positive");
            }
            tandem_lab::bench::scale::run(tandem_lab::bench::scale::ScaleOptions {
                dir,
                vpgs,
                vms_per_vpg,
                volume_mib,
                steady: std::time::Duration::from_secs(steady_secs),
                keep,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::BenchRpo {
            secs,
            checkpoint_secs,
            dir,
        } => {
            if secs == 0 || checkpoint_secs == 0 {
                anyhow::bail!("--secs and --checkpoint-secs must be positive");
            }
            let opts = demo::DemoOptions {
                dir,
                checkpoint_interval_secs: checkpoint_secs,
                ..demo::DemoOptions::default()
            };
            demo::bench_rpo(opts, std::time::Duration::from_secs(secs), shutdown_token()).await
        }
        Cmd::Demo {
            dir,
            keep,
            volume_mib,
            vra_ram_mib,
            checkpoint_secs,
            steady_secs,
            cut_secs,
            writers,
            pace_ms,
        } => {
            if volume_mib == 0 || vra_ram_mib == 0 || checkpoint_secs == 0 || writers == 0 {
                anyhow::bail!(
                    "--volume-mib, --vra-ram-mib, --checkpoint-secs and --writers must be positive"
                );
            }
            let opts = demo::DemoOptions {
                dir,
                keep,
                volume_mib,
                vra_ram_mib,
                checkpoint_interval_secs: checkpoint_secs,
                steady: std::time::Duration::from_secs(steady_secs),
                cut: std::time::Duration::from_secs(cut_secs),
                writers,
                pace: std::time::Duration::from_millis(pace_ms),
            };
            demo::run(opts, shutdown_token()).await
        }
    }
}
