//! `tandem`, the command-line client of a site's managers.

mod output;
mod recovery;

use tandem_cli::spec;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use output::{Format, bytes, print};
use tandem_proto::client::{ApiChannel as Channel, ApiConnector, Credentials};
use tandem_proto::v1;
use tandem_proto::v1::token_service_client::TokenServiceClient;
use tandem_proto::v1::{
    cluster_service_client::ClusterServiceClient, datastore_service_client::DatastoreServiceClient,
    host_service_client::HostServiceClient, monitoring_service_client::MonitoringServiceClient,
    resource_pool_service_client::ResourcePoolServiceClient,
    site_service_client::SiteServiceClient, task_service_client::TaskServiceClient,
    vm_service_client::VmServiceClient, vpg_service_client::VpgServiceClient,
};

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

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Creates a token and prints it: the only time it is shown.
    Create {
        name: String,
        /// viewer (reads), operator (checkpoints, tests, pause, resume, force sync) or
        /// admin (everything).
        #[arg(long)]
        role: String,
        /// Lifetime in seconds, or with a unit: 90m, 12h, 30d (default: never expires).
        #[arg(long)]
        ttl: Option<String>,
    },
    List,
    Revoke {
        id: String,
    },
    /// Creates a one-time join token for a new manager node (--node-id) or the VRA of a
    /// host (--host) and prints it: the node obtains its certificate with it
    /// (TANDEM_JOIN_TOKEN or --join-token, and --join with these managers' addresses).
    Join {
        #[arg(long, conflicts_with = "host", required_unless_present = "host")]
        node_id: Option<u64>,
        #[arg(long)]
        host: Option<String>,
        /// Lifetime: seconds, or 90m, 12h (default 1h, at most 24h).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// The join tokens not used yet and not expired.
    JoinList,
    /// Withdraws an unused join token.
    JoinRevoke {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum TaskCmd {
    List {
        #[arg(long)]
        vpg: Option<String>,
        #[arg(long)]
        running: bool,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Follows one task until it ends; the exit status says whether it succeeded.
    Watch {
        id: u64,
        #[arg(long, default_value_t = 1)]
        interval: u64,
    },
    /// Gives a running task the operator's word: commit or rollback (a failover or move
    /// before commit), stop (a failover test, with --failed and --note).
    Input {
        id: u64,
        #[arg(value_parser = ["commit", "rollback", "stop"])]
        input: String,
        #[arg(long)]
        failed: bool,
        #[arg(long, default_value = "")]
        note: String,
    },
}

#[derive(Subcommand, Debug)]
enum EventCmd {
    /// Lists events oldest first: the newest --limit, or those after --after.
    List {
        #[arg(long)]
        vpg: Option<String>,
        /// An event code, e.g. EV0040.
        #[arg(long)]
        code: Option<String>,
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand, Debug)]
enum AlertCmd {
    List {
        #[arg(long)]
        vpg: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum SiteCmd {
    /// Shows the site's id, name, peers and CAs (and a CA rotation under way).
    Get,
    /// Issues a one-time pairing token for another site to present.
    Token {
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Rotates the site's CA: every node and paired site trusts a new CA first, then it
    /// issues and every certificate is renewed, then the old CA is retired. `tandem site
    /// get` shows where it stands. Operators' clients need the new CA in their CA file
    /// (TANDEM_CA_FILE) before the old one is retired.
    RotateCa,
}

#[derive(Subcommand, Debug)]
enum PairCmd {
    /// Pairs with the site whose managers listen at --peer, using its token.
    Create {
        /// The peer's managers' operator addresses (where `tandem -e` reaches them): the
        /// pairing token is presented there.
        #[arg(long = "peer", required = true, value_delimiter = ',')]
        peers: Vec<String>,
        /// The peer's managers' internal addresses (their --raft-listen port, which
        /// serves paired sites with mutual TLS) as this site reaches them (default: the
        /// addresses the peer answers; name them when a link or NAT is in between).
        #[arg(long = "peer-internal", value_delimiter = ',')]
        peer_internal: Vec<String>,
        /// The peer's pairing token, ending in its CA's fingerprint.
        #[arg(long)]
        token: String,
        /// Internal addresses at which the peer reaches this site (default: this site's
        /// managers').
        #[arg(long = "advertise", value_delimiter = ',')]
        advertise: Vec<String>,
    },
    List,
    /// Removes the pairing with a site, on both sites (refused while a VPG replicates
    /// between them).
    Delete {
        site_id: String,
        /// Unpair this site alone when the peer cannot be reached.
        #[arg(long)]
        force: bool,
    },
    /// Limits what this site's VRAs send to a peer site (0: no limit); its VPGs share it
    /// by priority.
    Limit {
        site_id: String,
        #[arg(long)]
        bytes_per_sec: u64,
    },
}

#[derive(Args, Debug)]
struct FileArg {
    /// Spec file (YAML, or TOML by extension).
    #[arg(long = "file", short = 'f')]
    file: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Crud {
    /// Creates from a spec file.
    Create(FileArg),
    Get {
        id: String,
    },
    List,
    /// Replaces the object with the spec file's content.
    Edit {
        id: String,
        #[command(flatten)]
        file: FileArg,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum VmCmd {
    /// Creates from a spec file.
    Create(FileArg),
    Get {
        id: String,
    },
    /// The VMs view: every protected VM of both sites with its VPG, direction, peer site,
    /// priority, status, state, actual RPO and operation (`--view performance`: its IO,
    /// throughput, WAN traffic, provisioned and used storage). `--inventory`: the
    /// inventory's VM records instead.
    List {
        #[arg(long, value_enum, default_value = "general")]
        view: VpgView,
        #[arg(long)]
        inventory: bool,
    },
    /// Replaces the object with the spec file's content.
    Edit {
        id: String,
        #[command(flatten)]
        file: FileArg,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum VpgCmd {
    Create(FileArg),
    Get {
        id: String,
    },
    List {
        /// Exports the list as CSV, with the columns of the VPGs view.
        #[arg(long)]
        csv: bool,
        /// Which columns: general (status, state, RPO) or performance (IO, throughput,
        /// network, provisioned and used storage).
        #[arg(long, value_enum, default_value = "general")]
        view: VpgView,
    },
    /// Refreshes the VPG list (or one VPG) every --interval seconds until interrupted.
    Watch {
        id: Option<String>,
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
    /// Replaces the definition; fails if someone else changed it since it was read.
    Edit {
        id: String,
        #[command(flatten)]
        file: FileArg,
        /// VMs the edit removes keep their recovery disks (event EV0040 names them).
        #[arg(long)]
        keep_removed_recovery_disks: bool,
    },
    Delete {
        id: String,
        /// Keep the recovery disks at the peer site for preseeding.
        #[arg(long)]
        keep_recovery_disks: bool,
        /// Force the removal of a VPG waiting to be removed.
        #[arg(long)]
        force: bool,
    },
    /// Pauses protection: writes are tracked, nothing crosses the WAN; the VPGs stay
    /// recoverable to their last checkpoint before the pause (add one first if needed).
    Pause {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Resumes paused VPGs: a bitmap sync sends what was written meanwhile.
    Resume {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Starts a delta sync of every volume of the VPGs.
    ForceSync {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum VpgView {
    General,
    Performance,
}

#[derive(Subcommand, Debug)]
enum CheckpointCmd {
    /// Takes a named checkpoint in one or several VPGs (crash consistency per VPG). With
    /// --vm and --quiesce, an application-consistent one: runs the quiesce command, takes
    /// the checkpoint, then runs --release (also when the checkpoint fails).
    Add {
        /// VPG ids (comma-separated); with --vm, the VM's VPG.
        #[arg(long = "vpg", value_delimiter = ',')]
        vpgs: Vec<String>,
        #[arg(long)]
        name: String,
        /// The VM the checkpoint is application-consistent for.
        #[arg(long)]
        vm: Option<String>,
        /// Shell command that quiesces the application (run before the checkpoint).
        #[arg(long, requires = "vm")]
        quiesce: Option<String>,
        /// Shell command that releases it (run after the checkpoint, whatever happened).
        #[arg(long, requires = "quiesce")]
        release: Option<String>,
    },
    /// The checkpoints of a VPG, newest first, from the recovery site's journals.
    List {
        vpg: String,
        /// Only named (manual and application-consistent) checkpoints.
        #[arg(long)]
        named: bool,
        /// Only this kind.
        #[arg(long, value_enum)]
        kind: Option<CheckpointKindArg>,
        /// Only checkpoints stamped at or after / before these Unix milliseconds.
        #[arg(long, default_value_t = 0)]
        from_ms: u64,
        #[arg(long, default_value_t = 0)]
        to_ms: u64,
        /// Page size (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// From a previous page's next_page_token.
        #[arg(long, default_value = "")]
        page_token: String,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum CheckpointKindArg {
    Automatic,
    Manual,
    ApplicationConsistent,
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Nodes, leader, term and applied index.
    Status,
    /// Adds a node (as learner, then voter with --voter).
    AddNode {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        api: String,
        #[arg(long)]
        raft: String,
        #[arg(long)]
        voter: bool,
    },
    /// Promotes a learner to voter.
    Promote { id: u64 },
    /// Removes a node from the cluster.
    Remove { id: u64 },
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
        Noun::Site(c) => site(ch, fmt, c).await,
        Noun::Pair(c) => pair(ch, fmt, c).await,
        Noun::Host(c) => host(ch, fmt, c).await,
        Noun::Datastore(c) => datastore(ch, fmt, c).await,
        Noun::Pool(c) => pool(ch, fmt, c).await,
        Noun::Vm(c) => vm(ch, fmt, c).await,
        Noun::Vpg(c) => vpg(ch, fmt, c).await,
        Noun::Checkpoint(c) => checkpoint(ch, fmt, c).await,
        Noun::Cluster(c) => cluster(ch, fmt, c).await,
        Noun::Event(c) => event(ch, fmt, c).await,
        Noun::Alert(c) => alert(ch, fmt, c).await,
        Noun::Task(c) => task(ch, fmt, c).await,
        Noun::FailoverTest(c) => recovery::failover_test(ch, fmt, c).await,
        Noun::Failover(c) => recovery::failover(ch, fmt, recovery::Kind::Failover, c).await,
        Noun::Move(c) => recovery::failover(ch, fmt, recovery::Kind::Move, c).await,
        Noun::Token(c) => token(ch, fmt, c).await,
    }
}

/// Seconds from `90`, `90s`, `90m`, `12h` or `30d`.
fn duration_secs(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a duration (like 90m, 12h or 30d)"))?;
    let per = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("{s:?}: the unit must be s, m, h or d"),
    };
    n.checked_mul(per)
        .ok_or_else(|| anyhow::anyhow!("{s:?} is too long"))
}

fn token_row(t: &v1::ApiToken) -> Vec<String> {
    let role = v1::TokenRole::try_from(t.role)
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("TOKEN_ROLE_")
                .to_lowercase()
        })
        .unwrap_or_default();
    vec![
        t.id.clone(),
        t.name.clone(),
        role,
        t.state.clone(),
        t.created_ms.to_string(),
        if t.expires_ms == 0 {
            "never".into()
        } else {
            t.expires_ms.to_string()
        },
        t.created_by.clone(),
    ]
}

fn token_json(t: &v1::ApiToken) -> serde_json::Value {
    let r = token_row(t);
    serde_json::json!({
        "id": t.id, "name": t.name, "role": r[2], "state": t.state,
        "created_ms": t.created_ms, "expires_ms": t.expires_ms,
        "revoked_ms": t.revoked_ms, "created_by": t.created_by,
    })
}

const TOKEN_HEADER: [&str; 7] = [
    "ID",
    "NAME",
    "ROLE",
    "STATE",
    "CREATED",
    "EXPIRES",
    "CREATED BY",
];

const JOIN_TOKEN_HEADER: [&str; 5] = ["ID", "IDENTITY", "CREATED", "EXPIRES", "CREATED BY"];

fn join_token_row(t: &v1::JoinTokenInfo) -> Vec<String> {
    vec![
        t.id.clone(),
        t.identity.clone(),
        t.created_ms.to_string(),
        t.expires_ms.to_string(),
        t.created_by.clone(),
    ]
}

async fn token(ch: Channel, fmt: Format, c: TokenCmd) -> Result<()> {
    let mut cl = TokenServiceClient::new(ch);
    match c {
        TokenCmd::Create { name, role, ttl } => {
            let role = match role.as_str() {
                "viewer" => v1::TokenRole::Viewer,
                "operator" => v1::TokenRole::Operator,
                "admin" => v1::TokenRole::Admin,
                other => bail!("--role {other:?}: must be viewer, operator or admin"),
            };
            let ttl_secs = ttl.as_deref().map(duration_secs).transpose()?.unwrap_or(0);
            let created = cl
                .create_token(v1::CreateTokenRequest {
                    name,
                    role: role as i32,
                    ttl_secs,
                })
                .await?
                .into_inner();
            let info = created.info.unwrap_or_default();
            if fmt == Format::Table {
                println!("{}", created.token);
                eprintln!(
                    "token {} ({}) created; it is shown only now: keep it in a file and \
                     point TANDEM_TOKEN_FILE at it",
                    info.id, info.name
                );
            } else {
                let mut json = token_json(&info);
                json["token"] = created.token.into();
                print(fmt, &json, &[], vec![]);
            }
        }
        TokenCmd::Join { node_id, host, ttl } => {
            let (role, node_id, host_id) = match (node_id, host) {
                (Some(id), _) => (v1::JoinRole::Manager, id, String::new()),
                (None, Some(h)) => (v1::JoinRole::Vra, 0, h),
                (None, None) => bail!("--node-id or --host"),
            };
            let ttl_secs = ttl.as_deref().map(duration_secs).transpose()?.unwrap_or(0);
            let created = cl
                .create_join_token(v1::CreateJoinTokenRequest {
                    role: role as i32,
                    node_id,
                    host_id,
                    ttl_secs,
                })
                .await?
                .into_inner();
            if fmt == Format::Table {
                println!("{}", created.token);
                eprintln!(
                    "join token {} for {} created; it is shown only now and lets one node \
                     join, once",
                    created.id, created.identity
                );
            } else {
                print(fmt, &serde_json::to_value(&created)?, &[], vec![]);
            }
        }
        TokenCmd::List => {
            let tokens = cl
                .list_tokens(v1::ListTokensRequest {})
                .await?
                .into_inner()
                .tokens;
            let json: Vec<_> = tokens.iter().map(token_json).collect();
            print(
                fmt,
                &json,
                &TOKEN_HEADER,
                tokens.iter().map(token_row).collect(),
            );
        }
        TokenCmd::JoinList => {
            let tokens = cl
                .list_join_tokens(v1::ListJoinTokensRequest {})
                .await?
                .into_inner()
                .tokens;
            print(
                fmt,
                &tokens,
                &JOIN_TOKEN_HEADER,
                tokens.iter().map(join_token_row).collect(),
            );
        }
        TokenCmd::JoinRevoke { id } => {
            let t = cl
                .revoke_join_token(v1::RevokeTokenRequest { id })
                .await?
                .into_inner();
            print(fmt, &t, &JOIN_TOKEN_HEADER, vec![join_token_row(&t)]);
        }
        TokenCmd::Revoke { id } => {
            let t = cl
                .revoke_token(v1::RevokeTokenRequest { id })
                .await?
                .into_inner();
            print(fmt, &token_json(&t), &TOKEN_HEADER, vec![token_row(&t)]);
        }
    }
    Ok(())
}

async fn event(ch: Channel, fmt: Format, c: EventCmd) -> Result<()> {
    let EventCmd::List {
        vpg,
        code,
        after,
        limit,
    } = c;
    let r = MonitoringServiceClient::new(ch)
        .list_events(v1::ListEventsQuery {
            vpg_id: vpg.unwrap_or_default(),
            code: code.unwrap_or_default(),
            after_id: after,
            limit,
        })
        .await?
        .into_inner();
    let rows = r
        .events
        .iter()
        .map(|e| {
            vec![
                e.id.to_string(),
                e.at_ms.to_string(),
                e.code.clone(),
                e.vpg_id.clone(),
                e.description.clone(),
            ]
        })
        .collect();
    print(
        fmt,
        &r,
        &["ID", "AT_MS", "CODE", "VPG", "DESCRIPTION"],
        rows,
    );
    Ok(())
}

fn task_rows(ts: &[v1::Task]) -> Vec<Vec<String>> {
    ts.iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.kind.clone(),
                t.vpg_id.clone(),
                t.state.clone(),
                format!("{}%", t.progress_percent),
                t.message.clone(),
            ]
        })
        .collect()
}

const TASK_HEADER: [&str; 6] = ["ID", "KIND", "VPG", "STATE", "PROGRESS", "MESSAGE"];

async fn task(ch: Channel, fmt: Format, c: TaskCmd) -> Result<()> {
    let mut cl = TaskServiceClient::new(ch);
    match c {
        TaskCmd::List {
            vpg,
            running,
            limit,
        } => {
            let r = cl
                .list_tasks(v1::ListTasksQuery {
                    vpg_id: vpg.unwrap_or_default(),
                    running_only: running,
                    limit,
                })
                .await?
                .into_inner();
            print(fmt, &r, &TASK_HEADER, task_rows(&r.tasks));
        }
        TaskCmd::Input {
            id,
            input,
            failed,
            note,
        } => {
            let input = match input.as_str() {
                "commit" => v1::TaskInputKind::Commit,
                "rollback" => v1::TaskInputKind::Rollback,
                _ => v1::TaskInputKind::StopTest,
            };
            let t = cl
                .task_input(v1::TaskInputRequest {
                    task_id: id,
                    input: input as i32,
                    failed,
                    note,
                })
                .await?
                .into_inner();
            print(fmt, &t, &TASK_HEADER, task_rows(std::slice::from_ref(&t)));
        }
        TaskCmd::Watch { id, interval } => loop {
            let t = cl.get_task(v1::GetTaskRequest { id }).await?.into_inner();
            print(fmt, &t, &TASK_HEADER, task_rows(std::slice::from_ref(&t)));
            match t.state.as_str() {
                "running" => {
                    tokio::time::sleep(std::time::Duration::from_secs(interval.max(1))).await
                }
                "succeeded" => break,
                _ => bail!("task {id} failed: {}", t.message),
            }
        },
    }
    Ok(())
}

async fn alert(ch: Channel, fmt: Format, c: AlertCmd) -> Result<()> {
    let AlertCmd::List { vpg } = c;
    let r = MonitoringServiceClient::new(ch)
        .list_alerts(v1::ListAlertsRequest {
            vpg_id: vpg.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let rows = r
        .alerts
        .iter()
        .map(|a| {
            vec![
                a.code.clone(),
                a.severity.clone(),
                a.vpg_name.clone(),
                a.summary.clone(),
                a.since_ms.to_string(),
                a.detail.join("; "),
            ]
        })
        .collect();
    print(
        fmt,
        &r,
        &["CODE", "SEVERITY", "VPG", "SUMMARY", "SINCE_MS", "DETAIL"],
        rows,
    );
    Ok(())
}

fn peers_table(fmt: Format, value: &impl serde::Serialize, peers: &[v1::PeerSite]) {
    let rows = peers
        .iter()
        .map(|p| {
            let limit = match p.bandwidth_limit_bytes_per_sec {
                0 => "none".to_string(),
                b => format!("{b} B/s"),
            };
            vec![p.id.clone(), p.name.clone(), p.endpoints.join(","), limit]
        })
        .collect();
    print(
        fmt,
        value,
        &["ID", "NAME", "ENDPOINTS", "BANDWIDTH_LIMIT"],
        rows,
    );
}

fn site_table(fmt: Format, s: &v1::Site) {
    let short = |fp: &str| fp.get(..16).unwrap_or(fp).to_string();
    let rows = vec![vec![
        s.id.clone(),
        s.name.clone(),
        s.peers.len().to_string(),
        short(&s.issuing_ca_fingerprint),
        s.ca_fingerprints
            .iter()
            .map(|f| short(f))
            .collect::<Vec<_>>()
            .join(","),
        match (s.ca_rotation.as_str(), s.ca_rotation_waits_for.as_str()) {
            ("", _) => "-".into(),
            (phase, "") => phase.to_string(),
            (phase, what) => format!("{phase} (waits for {what})"),
        },
    ]];
    print(
        fmt,
        s,
        &[
            "ID",
            "NAME",
            "PEERS",
            "ISSUING_CA",
            "TRUSTED_CAS",
            "CA_ROTATION",
        ],
        rows,
    );
}

async fn site(ch: Channel, fmt: Format, c: SiteCmd) -> Result<()> {
    let mut cl = SiteServiceClient::new(ch);
    match c {
        SiteCmd::Get => {
            let s = cl.get_site(v1::GetSiteRequest {}).await?.into_inner();
            site_table(fmt, &s);
        }
        SiteCmd::RotateCa => {
            let s = cl.rotate_ca(v1::RotateCaRequest {}).await?.into_inner();
            site_table(fmt, &s);
        }
        SiteCmd::Token { ttl_secs } => {
            let t = cl
                .create_pairing_token(v1::CreatePairingTokenRequest { ttl_secs })
                .await?
                .into_inner();
            let rows = vec![vec![
                t.token.clone(),
                t.site_name.clone(),
                t.expires_at_ms.to_string(),
            ]];
            print(fmt, &t, &["TOKEN", "SITE", "EXPIRES_AT_MS"], rows);
        }
    }
    Ok(())
}

async fn pair(ch: Channel, fmt: Format, c: PairCmd) -> Result<()> {
    let mut cl = SiteServiceClient::new(ch);
    match c {
        PairCmd::Create {
            peers,
            peer_internal,
            token,
            advertise,
        } => {
            let p = cl
                .pair_site(v1::PairSiteRequest {
                    peer_api_endpoints: peers,
                    peer_endpoints: peer_internal,
                    token,
                    advertise_endpoints: advertise,
                })
                .await?
                .into_inner();
            peers_table(fmt, &p, std::slice::from_ref(&p));
        }
        PairCmd::List => {
            let r = cl.list_peers(v1::ListPeersRequest {}).await?.into_inner();
            peers_table(fmt, &r, &r.peers);
        }
        PairCmd::Delete { site_id, force } => {
            cl.unpair_site(v1::UnpairSiteRequest { site_id, force })
                .await?;
        }
        PairCmd::Limit {
            site_id,
            bytes_per_sec,
        } => {
            let p = cl
                .set_peer_bandwidth_limit(v1::SetPeerBandwidthLimitRequest {
                    site_id,
                    bytes_per_sec,
                })
                .await?
                .into_inner();
            peers_table(fmt, &p, std::slice::from_ref(&p));
        }
    }
    Ok(())
}

fn host_rows(hs: &[v1::Host]) -> Vec<Vec<String>> {
    hs.iter()
        .map(|h| vec![h.id.clone(), h.name.clone(), h.vra_address.clone()])
        .collect()
}

async fn host(ch: Channel, fmt: Format, c: Crud) -> Result<()> {
    let mut cl = HostServiceClient::new(ch);
    let head = ["ID", "NAME", "VRA"];
    let one = |h: v1::Host| print(fmt, &h, &head, host_rows(std::slice::from_ref(&h)));
    match c {
        Crud::Create(f) => one(cl
            .create_host(spec::read::<spec::HostSpec>(&f.file)?.into_proto())
            .await?
            .into_inner()),
        Crud::Get { id } => one(cl.get_host(v1::GetRequest { id }).await?.into_inner()),
        Crud::List => {
            let r = cl.list_hosts(v1::ListRequest {}).await?.into_inner();
            print(fmt, &r, &head, host_rows(&r.hosts));
        }
        Crud::Edit { id, file } => {
            let mut h = spec::read::<spec::HostSpec>(&file.file)?.into_proto();
            h.id = id;
            one(cl.update_host(h).await?.into_inner());
        }
        Crud::Delete { id } => {
            cl.delete_host(v1::DeleteRequest { id }).await?;
        }
    }
    Ok(())
}

fn datastore_rows(ds: &[v1::Datastore]) -> Vec<Vec<String>> {
    ds.iter()
        .map(|d| {
            vec![
                d.id.clone(),
                d.name.clone(),
                d.host_id.clone(),
                d.path.clone(),
                bytes(d.capacity_bytes),
            ]
        })
        .collect()
}

async fn datastore(ch: Channel, fmt: Format, c: Crud) -> Result<()> {
    let mut cl = DatastoreServiceClient::new(ch);
    let head = ["ID", "NAME", "HOST", "PATH", "CAPACITY"];
    let one = |d: v1::Datastore| print(fmt, &d, &head, datastore_rows(std::slice::from_ref(&d)));
    match c {
        Crud::Create(f) => {
            let d = spec::read::<spec::DatastoreSpec>(&f.file)?.into_proto()?;
            one(cl.create_datastore(d).await?.into_inner());
        }
        Crud::Get { id } => one(cl.get_datastore(v1::GetRequest { id }).await?.into_inner()),
        Crud::List => {
            let r = cl.list_datastores(v1::ListRequest {}).await?.into_inner();
            print(fmt, &r, &head, datastore_rows(&r.datastores));
        }
        Crud::Edit { id, file } => {
            let mut d = spec::read::<spec::DatastoreSpec>(&file.file)?.into_proto()?;
            d.id = id;
            one(cl.update_datastore(d).await?.into_inner());
        }
        Crud::Delete { id } => {
            cl.delete_datastore(v1::DeleteRequest { id }).await?;
        }
    }
    Ok(())
}

fn pool_rows(ps: &[v1::ResourcePool]) -> Vec<Vec<String>> {
    ps.iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.name.clone(),
                p.cpu_mhz.to_string(),
                p.memory_mib.to_string(),
                bytes(p.storage_bytes),
            ]
        })
        .collect()
}

async fn pool(ch: Channel, fmt: Format, c: Crud) -> Result<()> {
    let mut cl = ResourcePoolServiceClient::new(ch);
    let head = ["ID", "NAME", "CPU_MHZ", "MEMORY_MIB", "STORAGE"];
    let one = |p: v1::ResourcePool| print(fmt, &p, &head, pool_rows(std::slice::from_ref(&p)));
    match c {
        Crud::Create(f) => {
            let p = spec::read::<spec::PoolSpec>(&f.file)?.into_proto()?;
            one(cl.create_resource_pool(p).await?.into_inner());
        }
        Crud::Get { id } => one(cl
            .get_resource_pool(v1::GetRequest { id })
            .await?
            .into_inner()),
        Crud::List => {
            let r = cl
                .list_resource_pools(v1::ListRequest {})
                .await?
                .into_inner();
            print(fmt, &r, &head, pool_rows(&r.pools));
        }
        Crud::Edit { id, file } => {
            let mut p = spec::read::<spec::PoolSpec>(&file.file)?.into_proto()?;
            p.id = id;
            one(cl.update_resource_pool(p).await?.into_inner());
        }
        Crud::Delete { id } => {
            cl.delete_resource_pool(v1::DeleteRequest { id }).await?;
        }
    }
    Ok(())
}

fn vm_rows(vms: &[v1::Vm]) -> Vec<Vec<String>> {
    vms.iter()
        .map(|m| {
            let power = if m.power == v1::PowerState::On as i32 {
                "on"
            } else {
                "off"
            };
            vec![
                m.id.clone(),
                m.name.clone(),
                m.host_id.clone(),
                power.to_string(),
                m.volumes.len().to_string(),
                bytes(m.volumes.iter().map(|v| v.size_bytes).sum()),
                m.vpg_id.clone(),
            ]
        })
        .collect()
}

async fn vm(ch: Channel, fmt: Format, c: VmCmd) -> Result<()> {
    let c = match c {
        VmCmd::List {
            view,
            inventory: false,
        } => {
            let r = VpgServiceClient::new(ch)
                .list_vpgs(v1::ListRequest {})
                .await?
                .into_inner();
            let rows = protected_vms(&r.vpgs);
            let table = rows.iter().map(|r| r.cells(view)).collect();
            print(fmt, &rows, protected_vm_head(view), table);
            return Ok(());
        }
        VmCmd::List {
            inventory: true, ..
        } => Crud::List,
        VmCmd::Create(f) => Crud::Create(f),
        VmCmd::Get { id } => Crud::Get { id },
        VmCmd::Edit { id, file } => Crud::Edit { id, file },
        VmCmd::Delete { id } => Crud::Delete { id },
    };
    let mut cl = VmServiceClient::new(ch);
    let head = [
        "ID",
        "NAME",
        "HOST",
        "POWER",
        "VOLUMES",
        "PROVISIONED",
        "VPG",
    ];
    let one = |m: v1::Vm| print(fmt, &m, &head, vm_rows(std::slice::from_ref(&m)));
    match c {
        Crud::Create(f) => {
            let m = spec::read::<spec::VmSpec>(&f.file)?.into_proto()?;
            one(cl.create_vm(m).await?.into_inner());
        }
        Crud::Get { id } => one(cl.get_vm(v1::GetRequest { id }).await?.into_inner()),
        Crud::List => {
            let r = cl.list_vms(v1::ListRequest {}).await?.into_inner();
            print(fmt, &r, &head, vm_rows(&r.vms));
        }
        Crud::Edit { id, file } => {
            let mut m = spec::read::<spec::VmSpec>(&file.file)?.into_proto()?;
            m.id = id;
            one(cl.update_vm(m).await?.into_inner());
        }
        Crud::Delete { id } => {
            cl.delete_vm(v1::DeleteRequest { id }).await?;
        }
    }
    Ok(())
}

/// One row of the VMs view: a VM of a VPG, its VPG's status and its own figures.
#[derive(Debug, serde::Serialize)]
struct ProtectedVmRow {
    vm_id: String,
    vm_name: String,
    vpg_id: String,
    vpg_name: String,
    direction: String,
    peer_site: String,
    priority: String,
    alert: String,
    status: String,
    state: String,
    sync_percent: Option<u32>,
    actual_rpo_secs: Option<u64>,
    operation: String,
    write_iops: u64,
    write_bytes_per_sec: u64,
    wan_bytes_per_sec: u64,
    provisioned_bytes: u64,
    used_bytes: u64,
}

impl ProtectedVmRow {
    fn cells(&self, view: VpgView) -> Vec<String> {
        match view {
            VpgView::General => vec![
                self.vm_name.clone(),
                self.vpg_name.clone(),
                self.direction.clone(),
                self.peer_site.clone(),
                self.priority.clone(),
                self.alert.clone(),
                match self.sync_percent {
                    Some(p) => format!("{} {p}%", self.status),
                    None => self.status.clone(),
                },
                self.state.clone(),
                self.actual_rpo_secs.map_or("-".into(), |r| format!("{r}s")),
                self.operation.clone(),
            ],
            VpgView::Performance => vec![
                self.vm_name.clone(),
                self.vpg_name.clone(),
                self.write_iops.to_string(),
                format!("{}/s", bytes(self.write_bytes_per_sec)),
                format!("{}/s", bytes(self.wan_bytes_per_sec)),
                bytes(self.provisioned_bytes),
                bytes(self.used_bytes),
            ],
        }
    }
}

/// The VMs view's rows: every VM of every VPG listed, with its figures.
fn protected_vms(vpgs: &[v1::Vpg]) -> Vec<ProtectedVmRow> {
    let mut rows = Vec::new();
    for g in vpgs {
        let st = g.status.clone().unwrap_or_default();
        for vm in &g.vms {
            let id = vm
                .placement
                .as_ref()
                .map(|p| p.vm_id.clone())
                .unwrap_or_default();
            let figures = st.vms.iter().find(|f| f.vm_id == id);
            rows.push(ProtectedVmRow {
                vm_name: vm.vm_name.clone(),
                vm_id: id,
                vpg_id: g.id.clone(),
                vpg_name: g.name.clone(),
                direction: g.direction.clone(),
                peer_site: g.peer_site_name.clone(),
                priority: priority_name(g.settings.as_ref().map_or(0, |s| s.priority)).into(),
                alert: st.alert.clone(),
                status: st.status.clone(),
                state: state_cell(&st),
                sync_percent: (!st.sync.is_empty()).then_some(st.sync_percent),
                actual_rpo_secs: st.actual_rpo_secs,
                operation: st.operation.clone(),
                write_iops: figures.map_or(0, |f| f.write_iops),
                write_bytes_per_sec: figures.map_or(0, |f| f.write_bytes_per_sec),
                wan_bytes_per_sec: figures.map_or(0, |f| f.wan_bytes_per_sec),
                provisioned_bytes: figures.map_or(vm.provisioned_bytes, |f| f.provisioned_bytes),
                used_bytes: figures.map_or(0, |f| f.used_bytes),
            });
        }
    }
    rows
}

fn protected_vm_head(view: VpgView) -> &'static [&'static str] {
    match view {
        VpgView::General => &[
            "VM",
            "VPG",
            "DIRECTION",
            "PEER SITE",
            "PRIORITY",
            "ALERT",
            "PROTECTION STATUS",
            "STATE",
            "ACTUAL RPO",
            "OPERATION",
        ],
        VpgView::Performance => &[
            "VM",
            "VPG",
            "IO",
            "THROUGHPUT",
            "NETWORK",
            "PROVISIONED",
            "USED",
        ],
    }
}

/// The state column: the substatus, with a sync's progress, time left and trigger.
fn state_cell(st: &v1::VpgStatus) -> String {
    let mut s = st.substatus.clone();
    if !st.sync.is_empty() {
        s.push_str(&format!(" {}%", st.sync_percent));
        if st.sync_eta_secs > 0 {
            s.push_str(&format!(" ({}s left)", st.sync_eta_secs));
        }
        if !st.sync_trigger.is_empty() {
            s.push_str(&format!(" [{}]", st.sync_trigger));
        }
    }
    s
}

fn priority_name(p: i32) -> &'static str {
    match v1::Priority::try_from(p) {
        Ok(v1::Priority::Low) => "Low",
        Ok(v1::Priority::High) => "High",
        _ => "Medium",
    }
}

fn vpg_rows(vpgs: &[v1::Vpg], view: VpgView) -> Vec<Vec<String>> {
    vpgs.iter()
        .map(|g| {
            let st = g.status.clone().unwrap_or_default();
            let name = format!("{} ({})", g.name, g.vms.len());
            match view {
                VpgView::General => vec![
                    g.id.clone(),
                    name,
                    g.direction.clone(),
                    g.peer_site_name.clone(),
                    priority_name(g.settings.as_ref().map_or(0, |s| s.priority)).into(),
                    st.alert.clone(),
                    st.status.clone(),
                    state_cell(&st),
                    st.actual_rpo_secs.map_or("-".into(), |r| format!("{r}s")),
                    st.operation.clone(),
                ],
                VpgView::Performance => vec![
                    g.id.clone(),
                    name,
                    st.write_iops.to_string(),
                    format!("{}/s", bytes(st.write_bytes_per_sec)),
                    format!("{}/s", bytes(st.wan_bytes_per_sec)),
                    bytes(st.provisioned_bytes),
                    bytes(st.used_bytes),
                ],
            }
        })
        .collect()
}

fn vpg_head(view: VpgView) -> &'static [&'static str] {
    match view {
        VpgView::General => &[
            "ID",
            "NAME (#VMS)",
            "DIRECTION",
            "PEER SITE",
            "PRIORITY",
            "ALERT",
            "STATUS",
            "STATE",
            "ACTUAL RPO",
            "OPERATION",
        ],
        VpgView::Performance => &[
            "ID",
            "NAME (#VMS)",
            "IO",
            "THROUGHPUT",
            "NETWORK",
            "PROVISIONED",
            "USED",
        ],
    }
}

/// One VPG in detail: the list row, then its figures and what is wrong.
pub(crate) fn vpg_detail(fmt: Format, g: &v1::Vpg) {
    print(
        fmt,
        g,
        vpg_head(VpgView::General),
        vpg_rows(std::slice::from_ref(g), VpgView::General),
    );
    if fmt != Format::Table {
        return;
    }
    let st = g.status.clone().unwrap_or_default();
    println!(
        "IO {}/s  throughput {}/s  network {}/s  provisioned {}  used {}",
        st.write_iops,
        bytes(st.write_bytes_per_sec),
        bytes(st.wan_bytes_per_sec),
        bytes(st.provisioned_bytes),
        bytes(st.used_bytes)
    );
    println!(
        "history {}s held of {}s configured; last checkpoint {}",
        st.history_held_secs,
        st.history_configured_secs,
        if st.last_checkpoint_id == 0 {
            "none".to_string()
        } else {
            format!("{} at {} ms", st.last_checkpoint_id, st.last_checkpoint_ms)
        }
    );
    if !st.sync.is_empty() {
        let width = 40;
        let done = (st.sync_percent.min(100) as usize) * width / 100;
        println!(
            "{} [{}{}] {}%",
            st.sync,
            "#".repeat(done),
            "-".repeat(width - done),
            st.sync_percent
        );
    }
    if !g.owner_site_id.is_empty() {
        println!("VMs run at site {}", g.owner_site_id);
    }
    if let Some(d) = &g.stood_down {
        println!("stood down here: {}", d.what);
        if !d.counted {
            println!("divergence: being counted");
        }
        for v in &d.divergence {
            println!(
                "divergent: host {} VM {} volume {}: {}",
                v.host_id,
                v.vm_id,
                v.volume_id,
                if v.known {
                    bytes(v.bytes)
                } else {
                    "unknown".to_string()
                }
            );
        }
    }
    for p in &st.problems {
        println!("problem: {p}");
    }
}

async fn vpg(ch: Channel, fmt: Format, c: VpgCmd) -> Result<()> {
    let mut cl = VpgServiceClient::new(ch);
    let one = |g: v1::Vpg| vpg_detail(fmt, &g);
    match c {
        VpgCmd::Create(f) => {
            let (id, spec) = spec::read::<spec::VpgSpecFile>(&f.file)?.into_proto()?;
            let req = v1::CreateVpgRequest {
                id,
                spec: Some(spec),
            };
            one(cl.create_vpg(req).await?.into_inner());
        }
        VpgCmd::Get { id } => one(cl.get_vpg(v1::GetRequest { id }).await?.into_inner()),
        VpgCmd::List { csv: true, .. } => {
            let r = cl.export_vpgs_csv(v1::ListRequest {}).await?.into_inner();
            print!("{}", r.csv);
        }
        VpgCmd::List { csv: false, view } => {
            let r = cl.list_vpgs(v1::ListRequest {}).await?.into_inner();
            print(fmt, &r, vpg_head(view), vpg_rows(&r.vpgs, view));
        }
        VpgCmd::Watch { id, interval } => loop {
            // Clear the screen and home the cursor, as watch(1) does.
            print!("\x1b[2J\x1b[H");
            match &id {
                Some(id) => one(cl
                    .get_vpg(v1::GetRequest { id: id.clone() })
                    .await?
                    .into_inner()),
                None => {
                    let r = cl.list_vpgs(v1::ListRequest {}).await?.into_inner();
                    print(
                        fmt,
                        &r,
                        vpg_head(VpgView::General),
                        vpg_rows(&r.vpgs, VpgView::General),
                    );
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(interval.max(1))).await;
        },
        VpgCmd::Edit {
            id,
            file,
            keep_removed_recovery_disks,
        } => {
            let current = cl
                .get_vpg(v1::GetRequest { id: id.clone() })
                .await?
                .into_inner();
            let (file_id, spec) = spec::read::<spec::VpgSpecFile>(&file.file)?.into_proto()?;
            if !file_id.is_empty() && file_id != id {
                bail!("the spec file is for VPG {file_id}, not {id}");
            }
            let req = v1::UpdateVpgRequest {
                id,
                generation: current.generation,
                spec: Some(spec),
                keep_removed_recovery_disks,
            };
            one(cl.update_vpg(req).await?.into_inner());
        }
        VpgCmd::Delete {
            id,
            keep_recovery_disks,
            force,
        } => {
            cl.delete_vpg(v1::DeleteVpgRequest {
                id,
                keep_recovery_disks,
                force,
            })
            .await?;
        }
        VpgCmd::Pause { ids } => {
            cl.pause_vpgs(v1::VpgIdsRequest { vpg_ids: ids }).await?;
        }
        VpgCmd::Resume { ids } => {
            cl.resume_vpgs(v1::VpgIdsRequest { vpg_ids: ids }).await?;
        }
        VpgCmd::ForceSync { ids } => {
            cl.force_sync_vpgs(v1::VpgIdsRequest { vpg_ids: ids })
                .await?;
        }
    }
    Ok(())
}

fn checkpoint_rows(cps: &[v1::Checkpoint]) -> Vec<Vec<String>> {
    cps.iter()
        .map(|c| {
            let kind = match v1::CheckpointKind::try_from(c.kind) {
                Ok(v1::CheckpointKind::Automatic) => "automatic",
                Ok(v1::CheckpointKind::Manual) => "manual",
                Ok(v1::CheckpointKind::ApplicationConsistent) => "application-consistent",
                _ => "-",
            };
            vec![
                c.id.to_string(),
                c.timestamp_ms.to_string(),
                kind.into(),
                c.name.clone(),
                c.vm_id.clone(),
                if c.usable { "yes" } else { "no" }.into(),
            ]
        })
        .collect()
}

const CHECKPOINT_HEAD: [&str; 6] = ["ID", "TIMESTAMP MS", "KIND", "NAME", "VM", "USABLE"];

/// Runs an operator's quiesce or release command through the shell.
async fn run_hook(what: &str, cmd: &str) -> Result<()> {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .await?;
    if !status.success() {
        bail!("{what} command {cmd:?} failed: {status}");
    }
    Ok(())
}

async fn checkpoint(ch: Channel, fmt: Format, c: CheckpointCmd) -> Result<()> {
    let mut cl = VpgServiceClient::new(ch.clone());
    match c {
        CheckpointCmd::Add {
            mut vpgs,
            name,
            vm,
            quiesce,
            release,
        } => {
            let kind = if vm.is_some() {
                v1::CheckpointKind::ApplicationConsistent
            } else {
                v1::CheckpointKind::Manual
            };
            if let Some(vm) = &vm
                && vpgs.is_empty()
            {
                let v = VmServiceClient::new(ch)
                    .get_vm(v1::GetRequest { id: vm.clone() })
                    .await?
                    .into_inner();
                if v.vpg_id.is_empty() {
                    bail!("VM {vm} is not protected by any VPG");
                }
                vpgs.push(v.vpg_id);
            }
            if let Some(q) = &quiesce {
                run_hook("quiesce", q).await?;
            }
            let taken = cl
                .add_checkpoint(v1::AddCheckpointRequest {
                    vpg_ids: vpgs,
                    name,
                    kind: kind as i32,
                    vm_id: vm.unwrap_or_default(),
                })
                .await;
            // The application is released whatever happened to the checkpoint.
            let released = match &release {
                Some(r) => run_hook("release", r).await,
                None => Ok(()),
            };
            let taken = taken?.into_inner();
            released?;
            print(
                fmt,
                &taken,
                &CHECKPOINT_HEAD,
                checkpoint_rows(&taken.checkpoints),
            );
        }
        CheckpointCmd::List {
            vpg,
            named,
            kind,
            from_ms,
            to_ms,
            limit,
            page_token,
        } => {
            let kind = match kind {
                None => v1::CheckpointKind::Unspecified,
                Some(CheckpointKindArg::Automatic) => v1::CheckpointKind::Automatic,
                Some(CheckpointKindArg::Manual) => v1::CheckpointKind::Manual,
                Some(CheckpointKindArg::ApplicationConsistent) => {
                    v1::CheckpointKind::ApplicationConsistent
                }
            };
            let r = cl
                .list_checkpoints(v1::ListCheckpointsQuery {
                    vpg_id: vpg,
                    from_ms,
                    to_ms,
                    named_only: named,
                    kind: kind as i32,
                    page_size: limit,
                    page_token,
                })
                .await?
                .into_inner();
            print(fmt, &r, &CHECKPOINT_HEAD, checkpoint_rows(&r.checkpoints));
            if fmt == Format::Table && !r.next_page_token.is_empty() {
                println!(
                    "{} in all; next page: --page-token {}",
                    r.total, r.next_page_token
                );
            }
        }
    }
    Ok(())
}

async fn cluster(ch: Channel, fmt: Format, c: ClusterCmd) -> Result<()> {
    let mut cl = ClusterServiceClient::new(ch);
    let status = match c {
        ClusterCmd::Status => {
            cl.get_cluster_status(v1::GetClusterStatusRequest {})
                .await?
        }
        ClusterCmd::AddNode {
            id,
            api,
            raft,
            voter,
        } => {
            cl.add_node(v1::AddNodeRequest {
                id,
                api_addr: api,
                raft_addr: raft,
                voter,
            })
            .await?
        }
        ClusterCmd::Promote { id } => cl.promote_node(v1::NodeRequest { id }).await?,
        ClusterCmd::Remove { id } => cl.remove_node(v1::NodeRequest { id }).await?,
    }
    .into_inner();
    let json = serde_json::json!({
        "leader": if status.leader_id == 0 { serde_json::Value::Null } else { status.leader_id.into() },
        "leader_api": status.leader_api_addr,
        "term": status.term,
        "last_log_index": status.last_log_index,
        "last_applied": status.last_applied,
        "answered_by": status.node_id,
        "state": status.state,
        "nodes": status.nodes.iter().map(|n| serde_json::json!({
            "id": n.id, "api": n.api_addr, "raft": n.raft_addr, "voter": n.voter,
        })).collect::<Vec<_>>(),
    });
    let rows = status
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.id.to_string(),
                n.api_addr.clone(),
                n.raft_addr.clone(),
                if n.voter { "voter" } else { "learner" }.to_string(),
                if n.id == status.leader_id {
                    "leader"
                } else {
                    ""
                }
                .to_string(),
            ]
        })
        .collect();
    if fmt == Format::Table {
        println!(
            "leader {} | term {} | last log {} | applied {} (answered by node {})",
            status.leader_id,
            status.term,
            status.last_log_index,
            status.last_applied,
            status.node_id
        );
    }
    print(fmt, &json, &["ID", "API", "RAFT", "ROLE", ""], rows);
    Ok(())
}
