//! `tandem host|datastore|pool`: the inventory kinds with plain create/get/list/edit/delete.

use tandem_cli::spec;

use crate::output::{Format, bytes, print};
use anyhow::Result;
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::{
    datastore_service_client::DatastoreServiceClient, host_service_client::HostServiceClient,
    resource_pool_service_client::ResourcePoolServiceClient,
};

use crate::args::*;

pub(crate) fn host_rows(hs: &[v1::Host]) -> Vec<Vec<String>> {
    hs.iter()
        .map(|h| vec![h.id.clone(), h.name.clone(), h.vra_address.clone()])
        .collect()
}

pub(crate) async fn host(ch: Channel, fmt: Format, c: Crud) -> Result<()> {
    let mut cl = HostServiceClient::new(ch);
    let head = ["ID", "NAME", "VRA"];
    let one = |h: v1::Host| print(fmt, &h, &head, host_rows(std::slice::from_ref(&h)));
    match c {
        Crud::Create(f) => one(cl
            .create_host(spec::read::<spec::HostSpec>(&f.file)?.into_proto())
            .await?
            .into_inner()),
        Crud::Get { id } => one(cl.get_host(v1::GetRequest { id }).await?.into_inner()),
        Crud::List => {
            let r = cl.list_hosts(v1::ListRequest {}).await?.into_inner();
            print(fmt, &r, &head, host_rows(&r.hosts));
        }
        Crud::Edit { id, file } => {
            let mut h = spec::read::<spec::HostSpec>(&file.file)?.into_proto();
            h.id = id;
            one(cl.update_host(h).await?.into_inner());
        }
        Crud::Delete { id } => {
            cl.delete_host(v1::DeleteRequest { id }).await?;
        }
    }
    Ok(())
}

pub(crate) fn datastore_rows(ds: &[v1::Datastore]) -> Vec<Vec<String>> {
    ds.iter()
        .map(|d| {
            vec![
                d.id.clone(),
                d.name.clone(),
                d.host_id.clone(),
                d.path.clone(),
                bytes(d.capacity_bytes),
            ]
        })
        .collect()
}

pub(crate) async fn datastore(ch: Channel, fmt: Format, c: Crud) -> Result<()> {
    let mut cl = DatastoreServiceClient::new(ch);
    let head = ["ID", "NAME", "HOST", "PATH", "CAPACITY"];
    let one = |d: v1::Datastore| print(fmt, &d, &head, datastore_rows(std::slice::from_ref(&d)));
    match c {
        Crud::Create(f) => {
            let d = spec::read::<spec::DatastoreSpec>(&f.file)?.into_proto()?;
            one(cl.create_datastore(d).await?.into_inner());
        }
        Crud::Get { id } => one(cl.get_datastore(v1::GetRequest { id }).await?.into_inner()),
        Crud::List => {
            let r = cl.list_datastores(v1::ListRequest {}).await?.into_inner();
            print(fmt, &r, &head, datastore_rows(&r.datastores));
        }
        Crud::Edit { id, file } => {
            let mut d = spec::read::<spec::DatastoreSpec>(&file.file)?.into_proto()?;
            d.id = id;
            one(cl.update_datastore(d).await?.into_inner());
        }
        Crud::Delete { id } => {
            cl.delete_datastore(v1::DeleteRequest { id }).await?;
        }
    }
    Ok(())
}

pub(crate) fn pool_rows(ps: &[v1::ResourcePool]) -> Vec<Vec<String>> {
    ps.iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.name.clone(),
                p.cpu_mhz.to_string(),
                p.memory_mib.to_string(),
                bytes(p.storage_bytes),
            ]
        })
        .collect()
}

pub(crate) async fn pool(ch: Channel, fmt: Format, c: Crud) -> Result<()> {
    let mut cl = ResourcePoolServiceClient::new(ch);
    let head = ["ID", "NAME", "CPU_MHZ", "MEMORY_MIB", "STORAGE"];
    let one = |p: v1::ResourcePool| print(fmt, &p, &head, pool_rows(std::slice::from_ref(&p)));
    match c {
        Crud::Create(f) => {
            let p = spec::read::<spec::PoolSpec>(&f.file)?.into_proto()?;
            one(cl.create_resource_pool(p).await?.into_inner());
        }
        Crud::Get { id } => one(cl
            .get_resource_pool(v1::GetRequest { id })
            .await?
            .into_inner()),
        Crud::List => {
            let r = cl
                .list_resource_pools(v1::ListRequest {})
                .await?
                .into_inner();
            print(fmt, &r, &head, pool_rows(&r.pools));
        }
        Crud::Edit { id, file } => {
            let mut p = spec::read::<spec::PoolSpec>(&file.file)?.into_proto()?;
            p.id = id;
            one(cl.update_resource_pool(p).await?.into_inner());
        }
        Crud::Delete { id } => {
            cl.delete_resource_pool(v1::DeleteRequest { id }).await?;
        }
    }
    Ok(())
}
