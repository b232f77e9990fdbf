//! Shared harness of the end-to-end tests: channels to a lab's managers and small helpers.

use std::time::Duration;

use anyhow::{Result, bail};
use tonic::transport::Channel;

/// A channel to one manager's API.
pub async fn channel(api: &str) -> Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{api}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect()
            .await?,
    )
}

/// A channel to the first reachable of `apis`.
pub async fn any_channel(apis: &[String]) -> Result<Channel> {
    for a in apis {
        if let Ok(ch) = channel(a).await {
            return Ok(ch);
        }
    }
    bail!("none of {apis:?} reachable")
}
