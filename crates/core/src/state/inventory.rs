//! Applying the inventory: hosts, datastores, resource pools and VMs (create, replace, delete, each refused while in use).

use super::*;

impl SiteState {
    /// [`Command::PutHost`].
    pub(super) fn apply_put_host(&mut self, host: Host, create: bool) -> CommandOutcome {
        host.validate()?;
        self.unique_name(
            self.hosts.values().map(|h| (&h.id, &h.name)),
            &host.id,
            &host.name,
            "host",
        )?;
        put(&mut self.hosts, host.id.clone(), host, create, HostId::KIND)
    }

    /// [`Command::DeleteHost`].
    pub(super) fn apply_delete_host(&mut self, id: HostId) -> CommandOutcome {
        exists(&self.hosts, &id, HostId::KIND)?;
        if let Some(vm) = self.vms.values().find(|v| v.host_id == id) {
            return in_use("host", &id, "VM", &vm.name);
        }
        if let Some(ds) = self.datastores.values().find(|d| d.host_id == id) {
            return in_use("host", &id, "datastore", &ds.name);
        }
        if let Some(g) = self
            .vpgs
            .values()
            .find(|g| g.vms.iter().any(|v| v.placement.recovery_host == id))
        {
            return in_use("host", &id, "VPG", &g.name);
        }
        self.hosts.remove(&id);
        Ok(Applied::Done)
    }

    /// [`Command::PutDatastore`].
    pub(super) fn apply_put_datastore(
        &mut self,
        datastore: Datastore,
        create: bool,
    ) -> CommandOutcome {
        datastore.validate()?;
        if !self.hosts.contains_key(&datastore.host_id) {
            return Err(DomainError::invalid(
                "host_id",
                format!("host {} does not exist", datastore.host_id),
            ));
        }
        self.unique_name(
            self.datastores.values().map(|d| (&d.id, &d.name)),
            &datastore.id,
            &datastore.name,
            "datastore",
        )?;
        if !create {
            let committed = RecoveryCommitments::of(
                self.vpgs.values(),
                &self.own_id(),
                &VpgId::minted(String::new()),
            );
            let used = committed
                .datastore_bytes
                .get(&datastore.id)
                .copied()
                .unwrap_or(0)
                + self.local_volume_bytes(&datastore.id, None);
            if datastore.capacity_bytes < used {
                return Err(DomainError::invalid(
                    "capacity_bytes",
                    format!("{} bytes are already committed on this datastore", used),
                ));
            }
        }
        put(
            &mut self.datastores,
            datastore.id.clone(),
            datastore,
            create,
            DatastoreId::KIND,
        )
    }

    /// [`Command::DeleteDatastore`].
    pub(super) fn apply_delete_datastore(&mut self, id: DatastoreId) -> CommandOutcome {
        exists(&self.datastores, &id, DatastoreId::KIND)?;
        if let Some(vm) = self
            .vms
            .values()
            .find(|v| v.volumes.iter().any(|vol| vol.datastore_id == id))
        {
            return in_use("datastore", &id, "VM", &vm.name);
        }
        if let Some(g) = self
            .vpgs
            .values()
            .find(|g| g.vms.iter().any(|v| v.placement.recovery_datastore == id))
        {
            return in_use("datastore", &id, "VPG", &g.name);
        }
        self.datastores.remove(&id);
        Ok(Applied::Done)
    }

    /// [`Command::PutPool`].
    pub(super) fn apply_put_pool(&mut self, pool: ResourcePool, create: bool) -> CommandOutcome {
        pool.validate()?;
        self.unique_name(
            self.pools.values().map(|p| (&p.id, &p.name)),
            &pool.id,
            &pool.name,
            "resource pool",
        )?;
        put(&mut self.pools, pool.id.clone(), pool, create, PoolId::KIND)
    }

    /// [`Command::DeletePool`].
    pub(super) fn apply_delete_pool(&mut self, id: PoolId) -> CommandOutcome {
        exists(&self.pools, &id, PoolId::KIND)?;
        if let Some(g) = self
            .vpgs
            .values()
            .find(|g| g.vms.iter().any(|v| v.placement.recovery_pool == id))
        {
            return in_use("resource pool", &id, "VPG", &g.name);
        }
        self.pools.remove(&id);
        Ok(Applied::Done)
    }

    /// [`Command::PutVm`].
    pub(super) fn apply_put_vm(&mut self, vm: Vm, create: bool) -> CommandOutcome {
        vm.validate()?;
        let mut v = Violations::new();
        v.check(
            self.hosts.contains_key(&vm.host_id),
            "host_id",
            format!("host {} does not exist", vm.host_id),
        );
        for (i, vol) in vm.volumes.iter().enumerate() {
            v.check(
                self.datastores.contains_key(&vol.datastore_id),
                format!("volumes[{i}].datastore_id"),
                format!("datastore {} does not exist", vol.datastore_id),
            );
        }
        v.into_result()?;
        if let Some(m) = self
            .vpgs
            .values()
            .flat_map(|g| &g.vms)
            .find(|m| m.placement.vm_id == vm.id)
        {
            m.footprint.check_no_shrink(&vm)?;
        }
        // VM names need not be unique (hypervisors allow it); ids are.
        put(&mut self.vms, vm.id.clone(), vm, create, VmId::KIND)
    }

    /// [`Command::DeleteVm`].
    pub(super) fn apply_delete_vm(&mut self, id: VmId) -> CommandOutcome {
        exists(&self.vms, &id, VmId::KIND)?;
        if let Some(g) = self.vpg_of_vm(&id) {
            return in_use("VM", &id, "VPG", &g.name);
        }
        self.vms.remove(&id);
        Ok(Applied::Done)
    }
}
