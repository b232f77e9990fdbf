//! Connects to a site's managers: tries each endpoint in turn until one answers. Any node
//! forwards writes to its leader, so the first reachable node is enough.

use std::time::Duration;

use anyhow::{Result, anyhow};
use tonic::transport::{Channel, Endpoint};

/// Opens a channel to the first endpoint that accepts a connection.
pub async fn connect(endpoints: &[String]) -> Result<Channel> {
    let mut errors = Vec::new();
    for e in endpoints {
        let uri = if e.contains("://") {
            e.clone()
        } else {
            format!("http://{e}")
        };
        let endpoint = match Endpoint::from_shared(uri) {
            Ok(ep) => ep
                .connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(30)),
            Err(err) => {
                errors.push(format!("{e}: {err}"));
                continue;
            }
        };
        match endpoint.connect().await {
            Ok(ch) => return Ok(ch),
            Err(err) => errors.push(format!("{e}: {err}")),
        }
    }
    Err(anyhow!(
        "no manager reachable ({})",
        if errors.is_empty() {
            "no endpoint given; use --endpoint or TANDEM_ENDPOINT".to_string()
        } else {
            errors.join("; ")
        }
    ))
}
