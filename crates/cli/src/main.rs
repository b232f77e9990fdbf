//! `tandem`, the command-line client of a site's managers.

mod alert;
mod args;
mod checkpoint;
mod cluster;
mod event;
mod inventory;
mod output;
mod recovery;
mod site;
mod task;
mod token;
mod vm;
mod vpg;

use tandem_cli::spec;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use output::Format;
use tandem_proto::client::{ApiConnector, Credentials};

use alert::AlertCmd;
use args::Crud;
use checkpoint::CheckpointCmd;
use cluster::ClusterCmd;
use event::EventCmd;
use site::{PairCmd, SiteCmd};
use task::TaskCmd;
use token::TokenCmd;
use vm::VmCmd;
use vpg::VpgCmd;

#[derive(Parser, Debug)]
#[command(
    name = "tandem",
    version,
    about = "Command-line client of Tandem site managers"
)]
struct Cli {
    /// Manager API addresses (host:port), tried in order.
    #[arg(
        long = "endpoint",
        short = 'e',
        env = "TANDEM_ENDPOINT",
        value_delimiter = ',',
        global = true
    )]
    endpoints: Vec<String>,
    /// A file holding the API token to present (else the token in TANDEM_TOKEN).
    #[arg(long, env = "TANDEM_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// The sites' CA certificates (PEM): the managers' certificates are checked against
    /// them. Without it the CLI speaks plaintext, as to sites run with --insecure.
    #[arg(long, env = "TANDEM_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table", global = true)]
    output: Format,
    #[command(subcommand)]
    noun: Noun,
}

#[derive(Subcommand, Debug)]
enum Noun {
    /// This site's identity and pairing tokens.
    #[command(subcommand)]
    Site(SiteCmd),
    /// Pairs with other sites.
    #[command(subcommand)]
    Pair(PairCmd),
    /// Hypervisor hosts and their VRAs.
    #[command(subcommand)]
    Host(Crud),
    /// Datastores (directories with a quota on a host).
    #[command(subcommand)]
    Datastore(Crud),
    /// Resource pools.
    #[command(subcommand)]
    Pool(Crud),
    /// Virtual machines: `list` is the VMs view (every VM of the VPGs this site protects
    /// or recovers, with its VPG's status and its own figures); `list --inventory` the
    /// inventory records.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Virtual protection groups.
    #[command(subcommand)]
    Vpg(VpgCmd),
    /// Checkpoints: add named or application-consistent ones, list them.
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// The site's manager cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// The site's event log (operations and status transitions, with stable codes).
    #[command(subcommand)]
    Event(EventCmd),
    /// Active alerts, raised from the VPGs' status while a problem lasts.
    #[command(subcommand)]
    Alert(AlertCmd),
    /// Operations with their progress and outcome.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Failover tests (at the recovery site): test VMs on scratch images at a checkpoint
    /// while protection goes on.
    #[command(subcommand)]
    FailoverTest(recovery::FailoverTestCmd),
    /// Failovers (at the recovery site): the VMs come up at a checkpoint, then commit or
    /// roll back.
    #[command(subcommand)]
    Failover(recovery::FailoverCmd),
    /// Moves (at the recovery site, both sites up): the protected VMs are powered off and
    /// drained, the VPG comes up here at their last checkpoint, then commit or roll back.
    #[command(subcommand)]
    Move(recovery::FailoverCmd),
    /// Operator API tokens (admin): create (shown once), list, revoke.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = match Cli::from_arg_matches(&with_spec_help(Cli::command()).get_matches()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", render(&e));
            ExitCode::FAILURE
        }
    }
}

/// `tandem ... | head`: a reader that closes the pipe early is not an error. Rust ignores
/// SIGPIPE, so a print to a closed stdout panics; that panic ends the CLI quietly with
/// status 0 instead of a backtrace (any other panic is reported as before).
fn quiet_on_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        report(info);
    }));
}

/// `tandem <kind> create --help` (and `edit`) shows the spec file's fields: the example
/// of `deploy/examples/`, every field explained.
fn with_spec_help(cli: clap::Command) -> clap::Command {
    spec::EXAMPLES.iter().fold(cli, |cli, (kind, example)| {
        cli.mut_subcommand(*kind, |c| {
            let help = format!("Spec file fields (deploy/examples/{kind}.yaml):\n\n{example}");
            let c = c.mut_subcommand("create", |s| s.after_long_help(help.clone()));
            if c.find_subcommand("edit").is_some() {
                c.mut_subcommand("edit", |s| s.after_long_help(help))
            } else {
                c
            }
        })
    })
}

/// One line per error: a gRPC status as "code: message", anything else with its causes.
fn render(e: &anyhow::Error) -> String {
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        let code = format!("{:?}", s.code());
        return format!("{}: {}", snake(&code), s.message().replace('\n', " "));
    }
    format!("{e:#}").replace('\n', " ")
}

fn snake(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

async fn run(cli: Cli) -> Result<()> {
    let credentials = match &cli.token_file {
        Some(path) => Credentials::token_file(path)?,
        None => Credentials::token_from_env()?,
    };
    let credentials = match &cli.ca_file {
        Some(path) => credentials.with_ca_file(path)?,
        None => credentials,
    };
    let ch = ApiConnector::new(credentials)
        .connect(&cli.endpoints)
        .await?;
    let fmt = cli.output;
    match cli.noun {
        Noun::Site(c) => site::run(ch, fmt, c).await,
        Noun::Pair(c) => site::run_pair(ch, fmt, c).await,
        Noun::Host(c) => inventory::host(ch, fmt, c).await,
        Noun::Datastore(c) => inventory::datastore(ch, fmt, c).await,
        Noun::Pool(c) => inventory::pool(ch, fmt, c).await,
        Noun::Vm(c) => vm::run(ch, fmt, c).await,
        Noun::Vpg(c) => vpg::run(ch, fmt, c).await,
        Noun::Checkpoint(c) => checkpoint::run(ch, fmt, c).await,
        Noun::Cluster(c) => cluster::run(ch, fmt, c).await,
        Noun::Event(c) => event::run(ch, fmt, c).await,
        Noun::Alert(c) => alert::run(ch, fmt, c).await,
        Noun::Task(c) => task::run(ch, fmt, c).await,
        Noun::FailoverTest(c) => recovery::failover_test(ch, fmt, c).await,
        Noun::Failover(c) => recovery::failover(ch, fmt, recovery::Kind::Failover, c).await,
        Noun::Move(c) => recovery::failover(ch, fmt, recovery::Kind::Move, c).await,
        Noun::Token(c) => token::run(ch, fmt, c).await,
    }
}
