//! `VpgService`: VPG definitions and their export.

use tandem_core::ids::VpgId;
use tandem_proto::convert as cv;
use tandem_proto::v1::{self, vpg_service_server::VpgService};
use tonic::{Request, Response, Status};

use super::bad;
use crate::site::{SiteManager, VpgView, vpgs_csv};

#[derive(Debug, Clone)]
pub struct VpgApi(pub SiteManager);

fn to_proto(v: &VpgView) -> v1::Vpg {
    let status = v1::VpgStatus {
        status: v.state.status.as_str().into(),
        substatus: v.state.substatus.as_str().into(),
        alert: v.state.alert.as_str().into(),
        operation: v
            .vpg
            .operation
            .map(|o| format!("{o:?}"))
            .unwrap_or_default(),
        actual_rpo_secs: None,
    };
    cv::vpg_to_proto(&v.vpg, &v.own_site, &v.peer_name, status)
}

#[tonic::async_trait]
impl VpgService for VpgApi {
    async fn list_vpgs(
        &self,
        _: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListVpgsResponse>, Status> {
        let vpgs = self.0.vpgs().await?.iter().map(to_proto).collect();
        Ok(Response::new(v1::ListVpgsResponse { vpgs }))
    }

    async fn get_vpg(&self, r: Request<v1::GetRequest>) -> Result<Response<v1::Vpg>, Status> {
        let id = VpgId::parse("id", &r.into_inner().id).map_err(bad)?;
        Ok(Response::new(to_proto(&self.0.vpg(id).await?)))
    }

    async fn create_vpg(
        &self,
        r: Request<v1::CreateVpgRequest>,
    ) -> Result<Response<v1::Vpg>, Status> {
        let r = r.into_inner();
        let id = if r.id.is_empty() {
            None
        } else {
            Some(VpgId::parse("id", &r.id).map_err(bad)?)
        };
        let spec = cv::vpg_spec_from_proto(r.spec).map_err(bad)?;
        Ok(Response::new(to_proto(&self.0.create_vpg(id, spec).await?)))
    }

    async fn update_vpg(
        &self,
        r: Request<v1::UpdateVpgRequest>,
    ) -> Result<Response<v1::Vpg>, Status> {
        let r = r.into_inner();
        let id = VpgId::parse("id", &r.id).map_err(bad)?;
        let spec = cv::vpg_spec_from_proto(r.spec).map_err(bad)?;
        Ok(Response::new(to_proto(
            &self.0.update_vpg(id, r.generation, spec).await?,
        )))
    }

    async fn delete_vpg(
        &self,
        r: Request<v1::DeleteVpgRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        let id = VpgId::parse("id", &r.id).map_err(bad)?;
        // Recovery disks are the VRAs' business; until managers drive VRAs there are none
        // to keep or remove, so `keep_recovery_disks` only matters once they do.
        self.0.delete_vpg(id, r.force).await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn export_vpgs_csv(
        &self,
        _: Request<v1::ListRequest>,
    ) -> Result<Response<v1::CsvExport>, Status> {
        let views = self.0.vpgs().await?;
        Ok(Response::new(v1::CsvExport {
            csv: vpgs_csv(&views),
        }))
    }
}
