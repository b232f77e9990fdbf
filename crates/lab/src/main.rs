//! `tandem-lab`: multi-site labs of real processes on loopback, the demo, and an NBD
//! server for raw files.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tandem_lab::{demo, lab};
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
    },
    /// Shows the lab described in DIR/lab.json and each cluster's state.
    Status {
        #[arg(long)]
        dir: PathBuf,
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
    },
    /// Runs the demo: a two-site lab, pairing, inventory and a VPG, leader failover.
    Demo {
        /// Lab directory; a fresh temporary one by default.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the lab running after the demo until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
}

fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        t.cancel();
    });
    token
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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
            println!("lab is up: {}", lab.dir.join("lab.json").display());
            for (i, name) in lab.site_names.iter().enumerate() {
                println!("  {name}: tandem -e {}", lab.endpoints(i).join(","));
                for v in &lab.vras[i] {
                    println!("    {}: vra control {} nbd {}", v.host, v.control, v.nbd);
                }
            }
            println!("Ctrl-C stops it.");
            shutdown.cancelled().await;
            lab.down().await;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { dir } => {
            let file = lab::LabFile::read(&dir)?;
            for site in &file.sites {
                println!("{}:", site.name);
                for m in &site.managers {
                    let state = match lab::cluster_client(&m.api).await {
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
            Ok(ExitCode::SUCCESS)
        }
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
        Cmd::Bench { dir, clients, secs } => {
            tandem_lab::bench::run(dir, clients, secs).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo { dir, keep } => demo::run(dir, keep, shutdown_token()).await,
    }
}
