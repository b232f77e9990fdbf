//! Node configuration: a TOML file, overridden by `TANDEM_*` environment variables and
//! then by command-line flags.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The shortest certificate lifetime (renewal runs at a third of it left).
pub const MIN_CERT_TTL_SECS: u64 = 30;
/// The longest: five years (the site's CA lives ten).
pub const MAX_CERT_TTL_SECS: u64 = 5 * 366 * 24 * 3600;

/// One initial member of the site's manager cluster.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: u64,
    /// API address (`host:port`).
    pub api: String,
    /// Raft address (`host:port`).
    pub raft: String,
}

/// How a node joins its cluster on first start.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Bootstrap {
    /// The node with the lowest id among `members` initializes the cluster with all of them.
    #[default]
    Members,
    /// Initialize a one-node cluster of this node; others join through `AddNode`.
    Single,
    /// Wait to be added by an existing cluster.
    Join,
}

/// The configuration of one manager node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node_id: u64,
    /// The site's name, used when the cluster first starts.
    pub site_name: String,
    pub data_dir: PathBuf,
    #[serde(default = "default_api")]
    pub api_listen: String,
    #[serde(default = "default_raft")]
    pub raft_listen: String,
    /// Addresses other nodes use to reach this one; default: the bound listen addresses.
    #[serde(default)]
    pub api_advertise: Option<String>,
    #[serde(default)]
    pub raft_advertise: Option<String>,
    #[serde(default)]
    pub bootstrap: Bootstrap,
    #[serde(default)]
    pub members: Vec<Member>,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_election_min")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "default_election_max")]
    pub election_timeout_max_ms: u64,
    /// Where to write the bound addresses as JSON once listening (for port 0).
    #[serde(default)]
    pub addr_file: Option<PathBuf>,
    /// Log format: "text" or "json".
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// The site's first admin token: read by the node that bootstraps the cluster, or
    /// written there (mode 0600) if absent. Default: `admin.token` in the data directory.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// The node's certificate, key and site CA (`ca.crt`, `node.crt`, `node.key`; and
    /// `ca.key` where certificates are issued). Default: `pki` in the data directory.
    #[serde(default)]
    pub pki_dir: Option<PathBuf>,
    /// Plaintext, unauthenticated traffic between the site's members: for experiments
    /// only, and logged loudly.
    #[serde(default)]
    pub insecure: bool,
    /// A join token (`tandem token join --node-id N`): on first start, a node without a
    /// certificate obtains one with it from the managers at `join`.
    #[serde(default)]
    pub join_token: Option<tandem_core::enroll::Secret>,
    /// Operator (API) addresses of the site's managers, for `join_token`.
    #[serde(default)]
    pub join: Vec<String>,
    /// How long the certificates this node issues are valid (its own, joining nodes',
    /// renewed ones); each is renewed when a third of this is left.
    #[serde(default = "default_cert_ttl")]
    pub cert_ttl_secs: u64,
}

fn default_api() -> String {
    "127.0.0.1:7400".into()
}
fn default_raft() -> String {
    "127.0.0.1:7500".into()
}
fn default_heartbeat() -> u64 {
    100
}
fn default_election_min() -> u64 {
    400
}
fn default_election_max() -> u64 {
    800
}
fn default_cert_ttl() -> u64 {
    tandem_tls::pki::NODE_TTL.as_secs()
}
fn default_log_format() -> String {
    "text".into()
}

impl Config {
    /// Reads a TOML file, then applies environment overrides.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut c: Config =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        c.apply_env(|k| std::env::var(k).ok())?;
        c.check()?;
        Ok(c)
    }

    /// Applies `TANDEM_*` overrides from `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(v) = get("TANDEM_NODE_ID") {
            self.node_id = v.parse().context("TANDEM_NODE_ID")?;
        }
        if let Some(v) = get("TANDEM_SITE_NAME") {
            self.site_name = v;
        }
        if let Some(v) = get("TANDEM_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = get("TANDEM_API_LISTEN") {
            self.api_listen = v;
        }
        if let Some(v) = get("TANDEM_RAFT_LISTEN") {
            self.raft_listen = v;
        }
        if let Some(v) = get("TANDEM_API_ADVERTISE") {
            self.api_advertise = Some(v);
        }
        if let Some(v) = get("TANDEM_RAFT_ADVERTISE") {
            self.raft_advertise = Some(v);
        }
        if let Some(v) = get("TANDEM_LOG_FORMAT") {
            self.log_format = v;
        }
        if let Some(v) = get("TANDEM_ADMIN_TOKEN_FILE") {
            self.admin_token_file = Some(v.into());
        }
        if let Some(v) = get("TANDEM_PKI_DIR") {
            self.pki_dir = Some(v.into());
        }
        if let Some(v) = get("TANDEM_JOIN_TOKEN").filter(|v| !v.trim().is_empty()) {
            self.join_token = Some(tandem_core::enroll::Secret::new(v));
        }
        if let Some(v) = get("TANDEM_JOIN") {
            self.join = v.split(',').map(|a| a.trim().to_string()).collect();
        }
        if let Some(v) = get("TANDEM_CERT_TTL_SECS") {
            self.cert_ttl_secs = v.parse().context("TANDEM_CERT_TTL_SECS")?;
        }
        if let Some(v) = get("TANDEM_INSECURE") {
            self.insecure = matches!(v.as_str(), "1" | "true" | "yes");
        }
        Ok(())
    }

    /// Where the bootstrap node finds (or leaves) the site's first admin token.
    pub fn admin_token_path(&self) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.token"))
    }

    /// Where the node's certificate and its site's CA are.
    pub fn pki_path(&self) -> PathBuf {
        self.pki_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("pki"))
    }

    /// Rejects settings that cannot work.
    pub fn check(&self) -> Result<()> {
        if self.site_name.trim().is_empty() {
            bail!("site_name must not be empty");
        }
        if self.heartbeat_ms == 0 || self.election_timeout_min_ms <= self.heartbeat_ms * 2 {
            bail!("election_timeout_min_ms must be more than twice heartbeat_ms");
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            bail!("election_timeout_max_ms must exceed election_timeout_min_ms");
        }
        if self.bootstrap == Bootstrap::Members {
            if self.members.is_empty() {
                bail!("bootstrap = \"members\" needs [[members]]");
            }
            if !self.members.iter().any(|m| m.id == self.node_id) {
                bail!("node_id {} is not among [[members]]", self.node_id);
            }
        }
        if !(MIN_CERT_TTL_SECS..=MAX_CERT_TTL_SECS).contains(&self.cert_ttl_secs) {
            bail!(
                "cert_ttl_secs must be {MIN_CERT_TTL_SECS}..={MAX_CERT_TTL_SECS} (30 s to 5 years)"
            );
        }
        if self.join_token.is_some() && self.join.is_empty() {
            bail!("join_token needs the managers to join through (join, --join)");
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            bail!("log_format must be text or json");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_overrides() {
        let mut c: Config = toml::from_str(
            r#"
node_id = 2
site_name = "a"
data_dir = "/tmp/x"
[[members]]
id = 1
api = "127.0.0.1:1"
raft = "127.0.0.1:2"
[[members]]
id = 2
api = "127.0.0.1:3"
raft = "127.0.0.1:4"
"#,
        )
        .unwrap();
        c.check().unwrap();
        c.apply_env(|k| (k == "TANDEM_SITE_NAME").then(|| "b".to_string()))
            .unwrap();
        assert_eq!(c.site_name, "b");
        c.node_id = 9;
        assert!(c.check().is_err());
        assert!(
            toml::from_str::<Config>(
                "node_id = 1\nsite_name = \"a\"\ndata_dir = \"/x\"\nbogus = 1\n"
            )
            .is_err()
        );
    }
}
