//! `tandem cluster`: the site's manager nodes and their membership.

use crate::output::{Format, print};
use anyhow::Result;
use clap::Subcommand;
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::cluster_service_client::ClusterServiceClient;

#[derive(Subcommand, Debug)]
pub(crate) enum ClusterCmd {
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

pub(crate) async fn run(ch: Channel, fmt: Format, c: ClusterCmd) -> Result<()> {
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
