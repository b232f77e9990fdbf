//! The inventory: commands proposed as given, and reads of one host, datastore, pool or VM.

use super::*;

impl SiteManager {
    /// Proposes an inventory command and maps its outcome.
    pub async fn put(&self, cmd: Command) -> ApiResult<()> {
        self.node.propose(cmd).await.map(|_| ())
    }

    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SiteState) -> T + Send + 'static,
    ) -> ApiResult<T> {
        self.node.read(f).await
    }

    /// Reads one object by id, or NOT_FOUND naming its kind.
    pub(super) async fn get_one<K, V>(
        &self,
        kind: &'static str,
        id: K,
        pick: fn(&SiteState, &K) -> Option<V>,
    ) -> ApiResult<V>
    where
        K: std::fmt::Display + Clone + Send + 'static,
        V: Send + 'static,
    {
        let key = id.clone();
        self.node
            .read(move |s| pick(s, &key))
            .await?
            .ok_or_else(|| DomainError::not_found(kind, &id).into())
    }

    pub async fn host(&self, id: tandem_core::ids::HostId) -> ApiResult<Host> {
        self.get_one("host", id, |s, id| s.hosts.get(id).cloned())
            .await
    }

    pub async fn datastore(&self, id: tandem_core::ids::DatastoreId) -> ApiResult<Datastore> {
        self.get_one("datastore", id, |s, id| s.datastores.get(id).cloned())
            .await
    }

    pub async fn pool(&self, id: tandem_core::ids::PoolId) -> ApiResult<ResourcePool> {
        self.get_one("resource pool", id, |s, id| s.pools.get(id).cloned())
            .await
    }

    pub async fn vm(&self, id: tandem_core::ids::VmId) -> ApiResult<(Vm, Option<VpgId>)> {
        self.get_one("vm", id, |s, id| {
            let vpg = s.vpg_of_vm(id).map(|g| g.id.clone());
            s.vms.get(id).cloned().map(|vm| (vm, vpg))
        })
        .await
    }
}
