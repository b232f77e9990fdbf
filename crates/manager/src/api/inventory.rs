//! Host, datastore, resource pool and VM services.

use tandem_core::ids::{DatastoreId, HostId, PoolId, VmId};
use tandem_core::state::Command;
use tandem_proto::convert as cv;
use tandem_proto::v1::{
    self, datastore_service_server::DatastoreService, host_service_server::HostService,
    resource_pool_service_server::ResourcePoolService, vm_service_server::VmService,
};
use tonic::{Request, Response, Status};

use super::bad;
use crate::site::{SiteManager, mint};

#[derive(Debug, Clone)]
pub struct InventoryApi(pub SiteManager);

/// Mints an id for a create request that left it empty.
fn with_id(id: &mut String, prefix: &str) {
    if id.is_empty() {
        *id = mint(prefix);
    }
}

#[tonic::async_trait]
impl HostService for InventoryApi {
    async fn list_hosts(
        &self,
        _: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListHostsResponse>, Status> {
        let hosts = self
            .0
            .read(|s| s.hosts.values().map(cv::host_to_proto).collect())
            .await?;
        Ok(Response::new(v1::ListHostsResponse { hosts }))
    }

    async fn get_host(&self, r: Request<v1::GetRequest>) -> Result<Response<v1::Host>, Status> {
        let id = HostId::parse("id", &r.into_inner().id).map_err(bad)?;
        Ok(Response::new(cv::host_to_proto(&self.0.host(id).await?)))
    }

    async fn create_host(&self, r: Request<v1::Host>) -> Result<Response<v1::Host>, Status> {
        let mut p = r.into_inner();
        with_id(&mut p.id, "host");
        let host = cv::host_from_proto(p).map_err(bad)?;
        self.0
            .put(Command::PutHost {
                host: host.clone(),
                create: true,
            })
            .await?;
        Ok(Response::new(cv::host_to_proto(&host)))
    }

    async fn update_host(&self, r: Request<v1::Host>) -> Result<Response<v1::Host>, Status> {
        let host = cv::host_from_proto(r.into_inner()).map_err(bad)?;
        self.0
            .put(Command::PutHost {
                host: host.clone(),
                create: false,
            })
            .await?;
        Ok(Response::new(cv::host_to_proto(&host)))
    }

    async fn delete_host(
        &self,
        r: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let id = HostId::parse("id", &r.into_inner().id).map_err(bad)?;
        self.0.put(Command::DeleteHost { id }).await?;
        Ok(Response::new(v1::Empty {}))
    }
}

#[tonic::async_trait]
impl DatastoreService for InventoryApi {
    async fn list_datastores(
        &self,
        _: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListDatastoresResponse>, Status> {
        let datastores = self
            .0
            .read(|s| s.datastores.values().map(cv::datastore_to_proto).collect())
            .await?;
        Ok(Response::new(v1::ListDatastoresResponse { datastores }))
    }

    async fn get_datastore(
        &self,
        r: Request<v1::GetRequest>,
    ) -> Result<Response<v1::Datastore>, Status> {
        let id = DatastoreId::parse("id", &r.into_inner().id).map_err(bad)?;
        Ok(Response::new(cv::datastore_to_proto(
            &self.0.datastore(id).await?,
        )))
    }

    async fn create_datastore(
        &self,
        r: Request<v1::Datastore>,
    ) -> Result<Response<v1::Datastore>, Status> {
        let mut p = r.into_inner();
        with_id(&mut p.id, "ds");
        let datastore = cv::datastore_from_proto(p).map_err(bad)?;
        self.0
            .put(Command::PutDatastore {
                datastore: datastore.clone(),
                create: true,
            })
            .await?;
        Ok(Response::new(cv::datastore_to_proto(&datastore)))
    }

    async fn update_datastore(
        &self,
        r: Request<v1::Datastore>,
    ) -> Result<Response<v1::Datastore>, Status> {
        let datastore = cv::datastore_from_proto(r.into_inner()).map_err(bad)?;
        self.0
            .put(Command::PutDatastore {
                datastore: datastore.clone(),
                create: false,
            })
            .await?;
        Ok(Response::new(cv::datastore_to_proto(&datastore)))
    }

    async fn delete_datastore(
        &self,
        r: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let id = DatastoreId::parse("id", &r.into_inner().id).map_err(bad)?;
        self.0.put(Command::DeleteDatastore { id }).await?;
        Ok(Response::new(v1::Empty {}))
    }
}

#[tonic::async_trait]
impl ResourcePoolService for InventoryApi {
    async fn list_resource_pools(
        &self,
        _: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResourcePoolsResponse>, Status> {
        let pools = self
            .0
            .read(|s| s.pools.values().map(cv::pool_to_proto).collect())
            .await?;
        Ok(Response::new(v1::ListResourcePoolsResponse { pools }))
    }

    async fn get_resource_pool(
        &self,
        r: Request<v1::GetRequest>,
    ) -> Result<Response<v1::ResourcePool>, Status> {
        let id = PoolId::parse("id", &r.into_inner().id).map_err(bad)?;
        Ok(Response::new(cv::pool_to_proto(&self.0.pool(id).await?)))
    }

    async fn create_resource_pool(
        &self,
        r: Request<v1::ResourcePool>,
    ) -> Result<Response<v1::ResourcePool>, Status> {
        let mut p = r.into_inner();
        with_id(&mut p.id, "pool");
        let pool = cv::pool_from_proto(p).map_err(bad)?;
        self.0
            .put(Command::PutPool {
                pool: pool.clone(),
                create: true,
            })
            .await?;
        Ok(Response::new(cv::pool_to_proto(&pool)))
    }

    async fn update_resource_pool(
        &self,
        r: Request<v1::ResourcePool>,
    ) -> Result<Response<v1::ResourcePool>, Status> {
        let pool = cv::pool_from_proto(r.into_inner()).map_err(bad)?;
        self.0
            .put(Command::PutPool {
                pool: pool.clone(),
                create: false,
            })
            .await?;
        Ok(Response::new(cv::pool_to_proto(&pool)))
    }

    async fn delete_resource_pool(
        &self,
        r: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let id = PoolId::parse("id", &r.into_inner().id).map_err(bad)?;
        self.0.put(Command::DeletePool { id }).await?;
        Ok(Response::new(v1::Empty {}))
    }
}

#[tonic::async_trait]
impl VmService for InventoryApi {
    async fn list_vms(
        &self,
        _: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListVmsResponse>, Status> {
        let vms = self
            .0
            .read(|s| {
                s.vms
                    .values()
                    .map(|vm| cv::vm_to_proto(vm, s.vpg_of_vm(&vm.id).map(|g| g.id.as_str())))
                    .collect()
            })
            .await?;
        Ok(Response::new(v1::ListVmsResponse { vms }))
    }

    async fn get_vm(&self, r: Request<v1::GetRequest>) -> Result<Response<v1::Vm>, Status> {
        let id = VmId::parse("id", &r.into_inner().id).map_err(bad)?;
        let (vm, vpg) = self.0.vm(id).await?;
        Ok(Response::new(cv::vm_to_proto(
            &vm,
            vpg.as_ref().map(|g| g.as_str()),
        )))
    }

    async fn create_vm(&self, r: Request<v1::Vm>) -> Result<Response<v1::Vm>, Status> {
        let mut p = r.into_inner();
        with_id(&mut p.id, "vm");
        let vm = cv::vm_from_proto(p).map_err(bad)?;
        self.0
            .put(Command::PutVm {
                vm: vm.clone(),
                create: true,
            })
            .await?;
        Ok(Response::new(cv::vm_to_proto(&vm, None)))
    }

    async fn update_vm(&self, r: Request<v1::Vm>) -> Result<Response<v1::Vm>, Status> {
        let vm = cv::vm_from_proto(r.into_inner()).map_err(bad)?;
        self.0
            .put(Command::PutVm {
                vm: vm.clone(),
                create: false,
            })
            .await?;
        // The VPG a VM belongs to changes only through VPG edits, so this node's applied
        // state (possibly a little behind) is good enough to decorate the answer.
        let vpg = self
            .0
            .node()
            .read_local(|s| s.vpg_of_vm(&vm.id).map(|g| g.id.to_string()));
        Ok(Response::new(cv::vm_to_proto(&vm, vpg.as_deref())))
    }

    async fn delete_vm(
        &self,
        r: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let id = VmId::parse("id", &r.into_inner().id).map_err(bad)?;
        self.0.put(Command::DeleteVm { id }).await?;
        Ok(Response::new(v1::Empty {}))
    }
}
