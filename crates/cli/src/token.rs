//! `tandem token`: API tokens and join tokens.

use crate::output::{Format, print};
use anyhow::{Result, bail};
use clap::Subcommand;
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::token_service_client::TokenServiceClient;

use crate::args::*;

#[derive(Subcommand, Debug)]
pub(crate) enum TokenCmd {
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

pub(crate) fn token_row(t: &v1::ApiToken) -> Vec<String> {
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

pub(crate) fn token_json(t: &v1::ApiToken) -> serde_json::Value {
    let r = token_row(t);
    serde_json::json!({
        "id": t.id, "name": t.name, "role": r[2], "state": t.state,
        "created_ms": t.created_ms, "expires_ms": t.expires_ms,
        "revoked_ms": t.revoked_ms, "created_by": t.created_by,
    })
}

pub(crate) const TOKEN_HEADER: [&str; 7] = [
    "ID",
    "NAME",
    "ROLE",
    "STATE",
    "CREATED",
    "EXPIRES",
    "CREATED BY",
];

pub(crate) const JOIN_TOKEN_HEADER: [&str; 5] =
    ["ID", "IDENTITY", "CREATED", "EXPIRES", "CREATED BY"];

pub(crate) fn join_token_row(t: &v1::JoinTokenInfo) -> Vec<String> {
    vec![
        t.id.clone(),
        t.identity.clone(),
        t.created_ms.to_string(),
        t.expires_ms.to_string(),
        t.created_by.clone(),
    ]
}

pub(crate) async fn run(ch: Channel, fmt: Format, c: TokenCmd) -> Result<()> {
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
