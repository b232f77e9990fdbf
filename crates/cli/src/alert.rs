//! `tandem alert`: the alerts the site's leader derives from its status.

use crate::output::{Format, print};
use anyhow::Result;
use clap::Subcommand;
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::monitoring_service_client::MonitoringServiceClient;

#[derive(Subcommand, Debug)]
pub(crate) enum AlertCmd {
    List {
        #[arg(long)]
        vpg: Option<String>,
    },
}

pub(crate) async fn run(ch: Channel, fmt: Format, c: AlertCmd) -> Result<()> {
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
