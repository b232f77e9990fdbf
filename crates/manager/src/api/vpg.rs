//! `VpgService`: VPG definitions and their export.

use tandem_core::ids::VpgId;
use tandem_proto::convert as cv;
use tandem_proto::v1::{self, vpg_service_server::VpgService};
use tonic::{Request, Response, Status};

use tandem_core::error::Violations;
use tandem_core::ids::VmId;
use tandem_proto::vra_convert::sync_name;

use super::bad;
use crate::control::checkpoints::Kind;
use crate::site::{CheckpointQuery, SiteManager, VpgView, vpgs_csv};

#[derive(Debug, Clone)]
pub struct VpgApi(pub SiteManager);

/// The status message of a view: the live snapshot's figures when there is one.
pub(crate) fn status_to_proto(v: &VpgView) -> v1::VpgStatus {
    let mut status = v1::VpgStatus {
        status: v.state.status.as_str().into(),
        substatus: v.state.substatus.as_str().into(),
        alert: v.state.alert.as_str().into(),
        operation: v.operation(),
        history_configured_secs: v.vpg.settings.journal_history_secs,
        ..Default::default()
    };
    if let Some(l) = &v.live {
        let f = &l.figures;
        status.actual_rpo_secs = f.actual_rpo_secs;
        if let Some(sync) = &f.sync {
            status.sync = sync_name(sync.kind).into();
            status.sync_trigger = sync.trigger.map(|t| t.as_str().into()).unwrap_or_default();
            status.sync_percent = sync.percent;
            status.sync_eta_secs = sync.eta_secs;
        }
        status.write_iops = f.write_iops;
        status.write_bytes_per_sec = f.write_bytes_per_sec;
        status.wan_bytes_per_sec = f.wan_bytes_per_sec;
        status.provisioned_bytes = f.provisioned_bytes;
        status.used_bytes = f.used_bytes;
        status.history_held_secs = f.history_held_secs;
        status.last_checkpoint_id = f.last_checkpoint.map_or(0, |c| c.0);
        status.last_checkpoint_ms = f.last_checkpoint.map_or(0, |c| c.1);
        status.problems = f.problems.clone();
        status.observed_at_ms = f.observed_at_ms;
        status.vms = f
            .vms
            .iter()
            .map(|vm| v1::VpgVmFigures {
                vm_id: vm.vm.to_string(),
                write_iops: vm.write_iops,
                write_bytes_per_sec: vm.write_bytes_per_sec,
                wan_bytes_per_sec: vm.wan_bytes_per_sec,
                provisioned_bytes: vm.provisioned_bytes,
                used_bytes: vm.used_bytes,
            })
            .collect();
    }
    status
}

/// The wire form of a VPG as this site sees it.
pub(crate) fn view_to_proto(v: &VpgView) -> v1::Vpg {
    let mut g = cv::vpg_to_proto(&v.vpg, &v.own_site, &v.peer_name, status_to_proto(v));
    g.owner_site_id = v.owner.to_string();
    g.stood_down = v.stood_down.as_ref().map(cv::stand_down_to_proto);
    g
}

/// Checks a checkpoint listing query on receipt.
pub(crate) fn checkpoint_query(q: v1::ListCheckpointsQuery) -> Result<CheckpointQuery, Status> {
    let mut v = Violations::new();
    let vpg = v.absorb(VpgId::parse("vpg_id", &q.vpg_id));
    v.check(
        q.to_ms == 0 || q.from_ms <= q.to_ms,
        "to_ms",
        "must not be before from_ms",
    );
    v.check(q.page_size <= 1000, "page_size", "must be at most 1000");
    let kind = match v1::CheckpointKind::try_from(q.kind) {
        Ok(v1::CheckpointKind::Unspecified) => None,
        Ok(k) => Some(k),
        Err(_) => {
            v.add("kind", "unknown checkpoint kind");
            None
        }
    };
    let after = if q.page_token.is_empty() {
        None
    } else {
        match q.page_token.parse::<u64>() {
            Ok(a) => Some(a),
            Err(_) => {
                v.add(
                    "page_token",
                    "must come from a previous answer's next_page_token",
                );
                None
            }
        }
    };
    v.into_result().map_err(bad)?;
    Ok(CheckpointQuery {
        vpg: vpg.expect("checked above"),
        from_ms: q.from_ms,
        to_ms: q.to_ms,
        named_only: q.named_only,
        kind,
        page_size: if q.page_size == 0 {
            100
        } else {
            q.page_size as usize
        },
        after,
        wire: q,
    })
}

/// The VPGs an operation names: 1 to 64, each once.
pub(crate) fn vpg_ids(v: &mut Violations, ids: &[String]) -> Vec<VpgId> {
    v.check(
        (1..=64).contains(&ids.len()),
        "vpg_ids",
        "name 1 to 64 VPGs",
    );
    let mut vpgs = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        if let Some(id) = v.absorb(VpgId::parse(&format!("vpg_ids[{i}]"), id)) {
            v.check(
                !vpgs.contains(&id),
                format!("vpg_ids[{i}]"),
                "is listed twice",
            );
            vpgs.push(id);
        }
    }
    vpgs
}

fn vpg_ids_request(r: Request<v1::VpgIdsRequest>) -> Result<Vec<VpgId>, Status> {
    let mut v = Violations::new();
    let vpgs = vpg_ids(&mut v, &r.into_inner().vpg_ids);
    v.into_result().map_err(bad)?;
    Ok(vpgs)
}

#[tonic::async_trait]
impl VpgService for VpgApi {
    async fn list_vpgs(
        &self,
        _: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListVpgsResponse>, Status> {
        let vpgs = self.0.vpgs().await?.iter().map(view_to_proto).collect();
        Ok(Response::new(v1::ListVpgsResponse { vpgs }))
    }

    async fn get_vpg(&self, r: Request<v1::GetRequest>) -> Result<Response<v1::Vpg>, Status> {
        let id = VpgId::parse("id", &r.into_inner().id).map_err(bad)?;
        Ok(Response::new(view_to_proto(&self.0.vpg(id).await?)))
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
        Ok(Response::new(view_to_proto(
            &self.0.create_vpg(id, spec).await?,
        )))
    }

    async fn update_vpg(
        &self,
        r: Request<v1::UpdateVpgRequest>,
    ) -> Result<Response<v1::Vpg>, Status> {
        let r = r.into_inner();
        let id = VpgId::parse("id", &r.id).map_err(bad)?;
        let spec = cv::vpg_spec_from_proto(r.spec).map_err(bad)?;
        Ok(Response::new(view_to_proto(
            &self
                .0
                .update_vpg(id, r.generation, spec, r.keep_removed_recovery_disks)
                .await?,
        )))
    }

    async fn delete_vpg(
        &self,
        r: Request<v1::DeleteVpgRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        let id = VpgId::parse("id", &r.id).map_err(bad)?;
        self.0
            .delete_vpg(id, r.keep_recovery_disks, r.force)
            .await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn list_checkpoints(
        &self,
        r: Request<v1::ListCheckpointsQuery>,
    ) -> Result<Response<v1::CheckpointList>, Status> {
        let q = checkpoint_query(r.into_inner())?;
        Ok(Response::new(self.0.checkpoints(q, true).await?))
    }

    async fn add_checkpoint(
        &self,
        r: Request<v1::AddCheckpointRequest>,
    ) -> Result<Response<v1::AddCheckpointResponse>, Status> {
        let r = r.into_inner();
        let mut v = Violations::new();
        let vpgs = vpg_ids(&mut v, &r.vpg_ids);
        v.absorb(tandem_core::ids::check_name("name", &r.name));
        v.check(
            !r.name.contains(tandem_proto::vra_convert::APP_VM_SEPARATOR),
            "name",
            format!(
                "must not contain {:?}",
                tandem_proto::vra_convert::APP_VM_SEPARATOR
            ),
        );
        let kind = match v1::CheckpointKind::try_from(r.kind) {
            Ok(v1::CheckpointKind::Unspecified | v1::CheckpointKind::Manual) => Kind::Manual,
            Ok(v1::CheckpointKind::ApplicationConsistent) => Kind::ApplicationConsistent,
            Ok(v1::CheckpointKind::Automatic) => {
                v.add("kind", "automatic checkpoints are the coordinator's");
                Kind::Manual
            }
            Err(_) => {
                v.add("kind", "unknown checkpoint kind");
                Kind::Manual
            }
        };
        let vm = match (kind, r.vm_id.is_empty()) {
            (Kind::ApplicationConsistent, false) => v.absorb(VmId::parse("vm_id", &r.vm_id)),
            (Kind::ApplicationConsistent, true) => {
                v.add("vm_id", "an application-consistent checkpoint names its VM");
                None
            }
            (_, false) => {
                v.add("vm_id", "only application-consistent checkpoints name a VM");
                None
            }
            (_, true) => None,
        };
        v.check(
            kind != Kind::ApplicationConsistent || vpgs.len() == 1,
            "vpg_ids",
            "an application-consistent checkpoint is for the one VPG of its VM",
        );
        v.into_result().map_err(bad)?;
        let taken = self.0.add_checkpoint(vpgs, r.name, kind, vm).await?;
        let checkpoints = taken
            .into_iter()
            .map(|t| v1::Checkpoint {
                id: t.id,
                timestamp_ms: t.timestamp_ms,
                kind: match t.kind {
                    Kind::Automatic => v1::CheckpointKind::Automatic,
                    Kind::Manual => v1::CheckpointKind::Manual,
                    Kind::ApplicationConsistent => v1::CheckpointKind::ApplicationConsistent,
                } as i32,
                name: t.name,
                vm_id: t.vm.map(|v| v.to_string()).unwrap_or_default(),
                usable: false,
            })
            .collect();
        Ok(Response::new(v1::AddCheckpointResponse { checkpoints }))
    }

    async fn pause_vpgs(
        &self,
        r: Request<v1::VpgIdsRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        self.0.set_paused(vpg_ids_request(r)?, true).await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn resume_vpgs(
        &self,
        r: Request<v1::VpgIdsRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        self.0.set_paused(vpg_ids_request(r)?, false).await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn force_sync_vpgs(
        &self,
        r: Request<v1::VpgIdsRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        self.0.force_sync(vpg_ids_request(r)?).await?;
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
