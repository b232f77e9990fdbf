//! `tandem event`: the site's event log.

use crate::output::{Format, print};
use anyhow::Result;
use clap::Subcommand;
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::monitoring_service_client::MonitoringServiceClient;

#[derive(Subcommand, Debug)]
pub(crate) enum EventCmd {
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

pub(crate) async fn run(ch: Channel, fmt: Format, c: EventCmd) -> Result<()> {
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
