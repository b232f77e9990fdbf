//! How the harness acts as a lab's operator: channels to the managers' APIs and the
//! `tandem` CLI, both with the credentials of the lab this process started last.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use tandem_proto::client::{ApiChannel, ApiConnector, Credentials};
use tandem_proto::v1::cluster_service_client::ClusterServiceClient;

use crate::process::binary;

/// A channel to one manager API.
pub async fn channel(api: &str) -> Result<ApiChannel> {
    Ok(ApiConnector::default()
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(10))
        .connect(&[api.to_string()])
        .await?)
}

/// A connection to one manager's cluster service.
pub async fn cluster_client(api: &str) -> Result<ClusterServiceClient<ApiChannel>> {
    Ok(ClusterServiceClient::new(channel(api).await?))
}

/// The lab's admin token, in the lab directory: every site's first admin token.
pub const TOKEN_FILE: &str = "admin.token";

/// The lab's CA bundle, in the lab directory: every site's CA certificate.
pub const CA_FILE: &str = "ca.crt";

/// The credential files of the lab this process started last (for the CLI it runs).
static CURRENT_CLI_ENV: std::sync::RwLock<Vec<(&'static str, PathBuf)>> =
    std::sync::RwLock::new(Vec::new());

/// Makes the lab's admin token (and its CAs, when its sites run TLS) what this process's
/// API clients present, and what a CLI it starts is given.
pub(crate) fn use_lab_credentials(token_file: &Path, ca_file: Option<&Path>) -> Result<()> {
    let mut credentials = Credentials::token_file(token_file)?;
    let mut env = vec![(
        tandem_proto::client::TOKEN_FILE_ENV,
        token_file.to_path_buf(),
    )];
    if let Some(ca) = ca_file {
        credentials = credentials.with_ca_file(ca)?;
        env.push((tandem_proto::client::CA_FILE_ENV, ca.to_path_buf()));
    }
    tandem_proto::client::set_default_credentials(credentials);
    *CURRENT_CLI_ENV.write().unwrap_or_else(|e| e.into_inner()) = env;
    Ok(())
}

/// The environment a `tandem` CLI started by this process needs to act on its lab as
/// admin: `TANDEM_TOKEN_FILE` and `TANDEM_CA_FILE`.
pub fn cli_env() -> Vec<(&'static str, PathBuf)> {
    CURRENT_CLI_ENV
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// The `tandem` CLI, ready to act on this process's lab as admin ([`cli_env`]).
pub fn cli() -> std::process::Command {
    let mut cmd = std::process::Command::new(binary("tandem"));
    cmd.envs(cli_env());
    cmd
}
