//! Configuration of the `tandem-vra` process: a TOML file, environment overrides
//! (`TANDEM_VRA_<FIELD>`), then command-line flags.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The process configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The host this VRA serves.
    pub host_id: String,
    /// Data directory (assignments, per-VPG stream state, scratch overlays).
    pub data_dir: PathBuf,
    /// gRPC listener (`VraControl` and `Replication`).
    pub control_listen: String,
    /// NBD listener (protected volumes and point-in-time images): TLS required (NBD's
    /// STARTTLS with a certificate of the site's CA) unless `insecure`.
    pub nbd_listen: String,
    /// NBD on a Unix socket, for the local host's hypervisor (no TLS; the socket is
    /// owner- and group-only). Default: `nbd.sock` in the data directory.
    pub nbd_socket: Option<PathBuf>,
    /// Replication buffer budget over all protected VPGs, in MiB.
    pub ram_mb: u64,
    /// Where to write the bound addresses as JSON once listening.
    pub addr_file: Option<PathBuf>,
    /// Log format: `text` or `json`.
    pub log_format: String,
    /// This VRA's certificate, key and site CA (and `trust/` for paired sites' CAs).
    /// Default: `pki` in the data directory.
    pub pki_dir: Option<PathBuf>,
    /// Plaintext, unauthenticated gRPC (control and replication): experiments only.
    pub insecure: bool,
    /// A join token (`tandem token join --host H`): on first start, a VRA without a
    /// certificate obtains one with it from the managers at `join`.
    pub join_token: Option<tandem_core::enroll::Secret>,
    /// Operator (API) addresses of the site's managers, for `join_token`.
    pub join: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host_id: "host-1".into(),
            data_dir: PathBuf::from("tandem-vra-data"),
            control_listen: "127.0.0.1:7410".into(),
            nbd_listen: "127.0.0.1:10809".into(),
            nbd_socket: None,
            ram_mb: 256,
            addr_file: None,
            log_format: "text".into(),
            pki_dir: None,
            insecure: false,
            join_token: None,
            join: Vec::new(),
        }
    }
}

impl Config {
    /// Loads a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Applies `TANDEM_VRA_*` overrides from `env`.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(v) = env("TANDEM_VRA_HOST_ID") {
            self.host_id = v;
        }
        if let Some(v) = env("TANDEM_VRA_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = env("TANDEM_VRA_CONTROL_LISTEN") {
            self.control_listen = v;
        }
        if let Some(v) = env("TANDEM_VRA_NBD_LISTEN") {
            self.nbd_listen = v;
        }
        if let Some(v) = env("TANDEM_VRA_NBD_SOCKET") {
            self.nbd_socket = Some(v.into());
        }
        if let Some(v) = env("TANDEM_VRA_RAM_MB") {
            self.ram_mb = v.parse().context("TANDEM_VRA_RAM_MB")?;
        }
        if let Some(v) = env("TANDEM_VRA_ADDR_FILE") {
            self.addr_file = Some(v.into());
        }
        if let Some(v) = env("TANDEM_VRA_LOG_FORMAT") {
            self.log_format = v;
        }
        if let Some(v) = env("TANDEM_VRA_PKI_DIR") {
            self.pki_dir = Some(v.into());
        }
        if let Some(v) = env("TANDEM_VRA_JOIN_TOKEN").filter(|v| !v.trim().is_empty()) {
            self.join_token = Some(tandem_core::enroll::Secret::new(v));
        }
        if let Some(v) = env("TANDEM_VRA_JOIN") {
            self.join = v.split(',').map(|a| a.trim().to_string()).collect();
        }
        if let Some(v) = env("TANDEM_VRA_INSECURE") {
            self.insecure = matches!(v.as_str(), "1" | "true" | "yes");
        }
        Ok(())
    }

    /// The PKI directory.
    pub fn pki_path(&self) -> PathBuf {
        self.pki_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("pki"))
    }

    /// This VRA's certificate: required unless `insecure` (then a loud warning). On first
    /// start with a join token, obtained from the site's managers.
    pub async fn tls(&self) -> Result<Option<tandem_tls::TlsConfig>> {
        if self.insecure {
            tracing::warn!(
                "INSECURE: --insecure is set: this VRA's control and replication are \
                 plaintext and unauthenticated; anyone who reaches its port can drive it. \
                 Do not run a host like this."
            );
            return Ok(None);
        }
        let dir = tandem_tls::pki::PkiDir::new(self.pki_path());
        if let Some(token) = &self.join_token {
            tandem_proto::enroll::join_unless_provisioned(
                &self.join,
                token.expose(),
                &dir,
                tandem_tls::PeerRole::Vra,
                &self.host_id,
                &crate::nbd_access::certificate_ips(&self.nbd_listen),
            )
            .await
            .context("joining the site")?;
        }
        let tls = tandem_tls::TlsConfig::load(&dir).with_context(|| {
            format!(
                "no usable certificate in {} (ca.crt, node.crt, node.key issued by the \
                 site's CA): give this VRA a join token (--join-token, from `tandem token \
                 join --host H`) and --join; or run with --insecure",
                dir.dir.display()
            )
        })?;
        let me = tls.identity();
        if me.role != tandem_tls::PeerRole::Vra || me.id != self.host_id {
            bail!(
                "the certificate in {} names {me}, not the VRA of host {}",
                dir.dir.display(),
                self.host_id
            );
        }
        Ok(Some(tls))
    }

    /// Checks the values.
    pub fn check(&self) -> Result<()> {
        tandem_core::ids::HostId::parse("host_id", &self.host_id)?;
        if self.join_token.is_some() && self.join.is_empty() {
            bail!("join_token needs the managers to join through (join, --join)");
        }
        if self.ram_mb == 0 {
            bail!("ram_mb must be at least 1");
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
    fn toml_then_env_overrides() {
        let mut c: Config = toml::from_str("host_id = \"h1\"\nram_mb = 64\n").expect("toml");
        assert_eq!(c.ram_mb, 64);
        c.apply_env(|k| (k == "TANDEM_VRA_RAM_MB").then(|| "128".to_string()))
            .expect("env");
        assert_eq!(c.ram_mb, 128);
        assert_eq!(c.host_id, "h1");
        c.check().expect("valid");
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
        c.ram_mb = 0;
        assert!(c.check().is_err());
    }
}
