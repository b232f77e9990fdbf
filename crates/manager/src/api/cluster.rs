//! `ClusterService`: the manager cluster's state and membership.

use tandem_proto::v1::{self, cluster_service_server::ClusterService};
use tonic::{Request, Response, Status};

use crate::node::ClusterView;
use crate::site::SiteManager;

#[derive(Debug, Clone)]
pub struct ClusterApi(pub SiteManager);

fn to_proto(v: ClusterView) -> v1::ClusterStatus {
    v1::ClusterStatus {
        node_id: v.node_id,
        leader_id: v.leader_id.unwrap_or(0),
        term: v.term,
        last_log_index: v.last_log_index,
        last_applied: v.last_applied,
        state: v.state,
        leader_api_addr: v.leader_api.unwrap_or_default(),
        nodes: v
            .nodes
            .into_iter()
            .map(|n| v1::ClusterNode {
                id: n.id,
                api_addr: n.api,
                raft_addr: n.raft,
                voter: n.voter,
            })
            .collect(),
    }
}

fn check_addr(field: &str, a: &str) -> Result<(), Status> {
    tandem_core::ids::check_address(field, a).map_err(super::bad)
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn get_cluster_status(
        &self,
        _: Request<v1::GetClusterStatusRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        Ok(Response::new(to_proto(self.0.node().cluster_view())))
    }

    async fn add_node(
        &self,
        r: Request<v1::AddNodeRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        let r = r.into_inner();
        check_addr("api_addr", &r.api_addr)?;
        check_addr("raft_addr", &r.raft_addr)?;
        self.0
            .node()
            .add_node(r.id, r.api_addr, r.raft_addr, r.voter)
            .await?;
        Ok(Response::new(to_proto(self.0.node().cluster_view())))
    }

    async fn promote_node(
        &self,
        r: Request<v1::NodeRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        self.0.node().promote(r.into_inner().id).await?;
        Ok(Response::new(to_proto(self.0.node().cluster_view())))
    }

    async fn remove_node(
        &self,
        r: Request<v1::NodeRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        self.0.node().remove(r.into_inner().id).await?;
        Ok(Response::new(to_proto(self.0.node().cluster_view())))
    }
}
