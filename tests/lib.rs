//! Shared harness of the end-to-end tests: channels to a lab's managers and small helpers.

pub mod ops;

use anyhow::{Result, bail};
use tandem_proto::client::ApiChannel as Channel;

/// A channel to one manager's API (the lab's, so tests and lab dial the same way).
pub use tandem_testkit::operator::channel;

/// A channel to the first reachable of `apis`.
pub async fn any_channel(apis: &[String]) -> Result<Channel> {
    for a in apis {
        if let Ok(ch) = channel(a).await {
            return Ok(ch);
        }
    }
    bail!("none of {apis:?} reachable")
}
