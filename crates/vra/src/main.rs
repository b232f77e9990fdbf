//! `tandem-vra`: the replication appliance of one host.

/// The process's allocator (faster than glibc's under many tokio threads).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use tandem_vra::{RunConfig, config::Config};

#[derive(Parser, Debug)]
#[command(
    name = "tandem-vra",
    version,
    about = "The Tandem replication appliance of one host"
)]
struct Args {
    /// TOML configuration file; environment (TANDEM_VRA_*) and flags override it.
    #[arg(long, short = 'c', env = "TANDEM_VRA_CONFIG")]
    config: Option<PathBuf>,
    /// The host this VRA serves.
    #[arg(long)]
    host_id: Option<String>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC listener (VraControl, Replication), host:port (port 0: any).
    #[arg(long)]
    control_listen: Option<String>,
    /// NBD listener, host:port (port 0: any); TLS required unless --insecure.
    #[arg(long)]
    nbd_listen: Option<String>,
    /// NBD Unix socket for the local host (default: DATA_DIR/nbd.sock).
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    /// Replication buffer budget in MiB.
    #[arg(long)]
    ram_mb: Option<u64>,
    /// Writes {"control","nbd","nbd_socket","host_id","pid"} here as JSON once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// This VRA's certificate, key and site CA (default: DATA_DIR/pki).
    #[arg(long)]
    pki_dir: Option<PathBuf>,
    /// Plaintext, unauthenticated control and replication (experiments only).
    #[arg(long)]
    insecure: bool,
    /// On first start, obtain this VRA's certificate with a join token (`tandem token
    /// join --host H`); prefer TANDEM_VRA_JOIN_TOKEN, which `ps` does not show.
    #[arg(long)]
    join_token: Option<String>,
    /// Operator addresses of the site's managers to join through, comma separated.
    #[arg(long, value_delimiter = ',')]
    join: Vec<String>,
}

fn config(a: Args) -> Result<Config> {
    let mut c = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    c.apply_env(|k| std::env::var(k).ok())?;
    if let Some(v) = a.host_id {
        c.host_id = v;
    }
    if let Some(v) = a.data_dir {
        c.data_dir = v;
    }
    if let Some(v) = a.control_listen {
        c.control_listen = v;
    }
    if let Some(v) = a.nbd_listen {
        c.nbd_listen = v;
    }
    if let Some(v) = a.nbd_socket {
        c.nbd_socket = Some(v);
    }
    if let Some(v) = a.ram_mb {
        c.ram_mb = v;
    }
    if let Some(v) = a.addr_file {
        c.addr_file = Some(v);
    }
    if let Some(v) = a.log_format {
        c.log_format = v;
    }
    if let Some(v) = a.pki_dir {
        c.pki_dir = Some(v);
    }
    if a.insecure {
        c.insecure = true;
    }
    if let Some(v) = a.join_token {
        c.join_token = Some(tandem_core::enroll::Secret::new(v));
    }
    if !a.join.is_empty() {
        c.join = a.join;
    }
    c.check()?;
    Ok(c)
}

#[tokio::main]
async fn main() -> Result<()> {
    let c = config(Args::parse())?;
    tandem_runtime::init_logging("info,h2=warn,tower=warn", c.log_format == "json");
    // As in the manager: with transparent huge pages on "always", the allocator's fresh
    // arenas were faulted in and zeroed 2 MiB at a time (replication buffers, read
    // buffers). A process-wide flag, kept across exec.
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!(error = %e, "could not turn transparent huge pages off");
    }
    let shutdown =
        tandem_runtime::shutdown_on_signals().context("installing the signal handlers")?;
    let control = tokio::net::TcpListener::bind(&c.control_listen)
        .await
        .with_context(|| format!("binding control {}", c.control_listen))?;
    let nbd = tokio::net::TcpListener::bind(&c.nbd_listen)
        .await
        .with_context(|| format!("binding nbd {}", c.nbd_listen))?;
    let nbd_socket = c
        .nbd_socket
        .clone()
        .unwrap_or_else(|| c.data_dir.join("nbd.sock"));
    let nbd_local = tandem_vra::nbd_access::bind_socket(&nbd_socket)?;
    let run = tandem_vra::run(
        RunConfig {
            host_id: c.host_id.clone(),
            data_dir: c.data_dir.clone(),
            buffer_bytes: c.ram_mb << 20,
            addr_file: c.addr_file.clone(),
            tls: c.tls().await?,
        },
        control,
        nbd,
        nbd_local,
        shutdown,
    );
    run.await
}
