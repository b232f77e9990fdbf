//! `tandem-manager`: one node of a site's manager cluster.

/// The process's allocator (faster than glibc's under many tokio threads).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tandem_manager::config::{Bootstrap, Config, Member};

#[derive(Parser, Debug)]
#[command(
    name = "tandem-manager",
    version,
    about = "A Tandem site manager node",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file; flags override it.
    #[arg(long, short = 'c', env = "TANDEM_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    node_id: Option<u64>,
    #[arg(long)]
    site_name: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    api_listen: Option<String>,
    #[arg(long)]
    raft_listen: Option<String>,
    #[arg(long)]
    api_advertise: Option<String>,
    #[arg(long)]
    raft_advertise: Option<String>,
    #[arg(long, value_enum)]
    bootstrap: Option<Bootstrap>,
    /// Initial members as id@api@raft, comma separated.
    #[arg(long, value_delimiter = ',')]
    members: Vec<String>,
    /// Writes the bound addresses here as JSON once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// The site's first admin token (read at bootstrap, or written there if absent).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// The node's certificate, key and site CA (default: DATA_DIR/pki).
    #[arg(long)]
    pki_dir: Option<PathBuf>,
    /// Plaintext, unauthenticated traffic between the site's members (experiments only).
    #[arg(long)]
    insecure: bool,
    /// On first start, obtain this node's certificate with a join token (`tandem token
    /// join --node-id N`); prefer TANDEM_JOIN_TOKEN, which `ps` does not show.
    #[arg(long)]
    join_token: Option<String>,
    /// Operator addresses of the site's managers to join through, comma separated.
    #[arg(long, value_delimiter = ',')]
    join: Vec<String>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// The site's PKI, before its managers first start.
    #[command(subcommand)]
    Pki(PkiCmd),
}

#[derive(clap::Subcommand, Debug)]
enum PkiCmd {
    /// Creates the site's CA in OUT/ca (once; a second run reuses it) and a certificate for
    /// each member in OUT/manager-ID (that node's --pki-dir); prints the site's id.
    InitSite {
        #[arg(long)]
        out: PathBuf,
        /// Member node ids, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<u64>,
    },
}

fn member(s: &str) -> Result<Member> {
    let parts: Vec<&str> = s.split('@').collect();
    let [id, api, raft] = parts.as_slice() else {
        bail!("member {s:?} is not id@api@raft");
    };
    Ok(Member {
        id: id.parse().with_context(|| format!("member id in {s:?}"))?,
        api: api.to_string(),
        raft: raft.to_string(),
    })
}

fn config(a: Args) -> Result<Config> {
    let mut c = match &a.config {
        Some(p) => Config::load(p)?,
        None => {
            let mut c: Config = toml::from_str(&format!(
                "node_id = {}\nsite_name = \"site\"\ndata_dir = \"tandem-data\"\nbootstrap = \"single\"\n",
                a.node_id.unwrap_or(1)
            ))?;
            c.apply_env(|k| std::env::var(k).ok())?;
            c
        }
    };
    if let Some(v) = a.node_id {
        c.node_id = v;
    }
    if let Some(v) = a.site_name {
        c.site_name = v;
    }
    if let Some(v) = a.data_dir {
        c.data_dir = v;
    }
    if let Some(v) = a.api_listen {
        c.api_listen = v;
    }
    if let Some(v) = a.raft_listen {
        c.raft_listen = v;
    }
    if let Some(v) = a.api_advertise {
        c.api_advertise = Some(v);
    }
    if let Some(v) = a.raft_advertise {
        c.raft_advertise = Some(v);
    }
    if !a.members.is_empty() {
        c.members = a.members.iter().map(|m| member(m)).collect::<Result<_>>()?;
        c.bootstrap = Bootstrap::Members;
    }
    if let Some(v) = a.bootstrap {
        c.bootstrap = v;
    }
    if let Some(v) = a.addr_file {
        c.addr_file = Some(v);
    }
    if let Some(v) = a.log_format {
        c.log_format = v;
    }
    if let Some(v) = a.admin_token_file {
        c.admin_token_file = Some(v);
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
    let args = Args::parse();
    if let Some(Command::Pki(PkiCmd::InitSite { out, members })) = &args.command {
        let site = tandem_tls::pki::init_site(out, members, || tandem_manager::site::mint("site"))?;
        println!("{site}");
        return Ok(());
    }
    let config = config(args)?;
    tandem_runtime::init_logging(
        "info,openraft=warn,sled=warn,h2=warn,tower=warn",
        config.log_format == "json",
    );
    // As databases commonly advise: with transparent huge pages on "always", fresh 2 MiB
    // pages were zeroed on first touch over and over (sled's buffers, the allocator's
    // arenas), ~8% of a busy manager's CPU. A process-wide flag, kept across exec.
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!(error = %e, "could not turn transparent huge pages off");
    }
    let shutdown =
        tandem_runtime::shutdown_on_signals().context("installing the signal handlers")?;
    let api = tandem_manager::net::bind(&config.api_listen)
        .await
        .with_context(|| format!("binding api {}", config.api_listen))?;
    let raft = tandem_manager::net::bind(&config.raft_listen)
        .await
        .with_context(|| format!("binding raft {}", config.raft_listen))?;
    tandem_manager::run(config, api, raft, shutdown).await
}
