//! What commands check of the state: which operations a VPG's state allows, and a VPG's
//! definition against the inventory on each side.

use super::*;

impl SiteState {
    /// Whether the protection of VPG `id` can be paused or resumed here: this site protects
    /// it and no operation that excludes it runs.
    pub fn check_pausable(&self, id: &VpgId) -> Result<(), DomainError> {
        let vpg = self
            .vpgs
            .get(id)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, id))?;
        if Some(&vpg.protected_site) != self.site_id() {
            return Err(DomainError::precondition(format!(
                "VPG {id} is protected by site {}: pause and resume it there",
                vpg.protected_site
            )));
        }
        if let Some(op) = vpg.operation.filter(|op| !op.allows_pause()) {
            return Err(DomainError::precondition(format!(
                "VPG {id} is in operation {op:?}: it cannot be paused or resumed now"
            )));
        }
        self.check_operable(id)
    }

    /// Whether a failover test of VPG `id` may start here: this site recovers it, no test
    /// of it runs, and no operation or definition update is under way.
    pub fn check_testable(&self, id: &VpgId) -> Result<(), DomainError> {
        let vpg = self
            .vpgs
            .get(id)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, id))?;
        if Some(&vpg.recovery_site) != self.site_id() {
            return Err(DomainError::precondition(format!(
                "VPG {id} is recovered at site {}: test its failover there",
                vpg.recovery_site
            )));
        }
        if self.tests.contains_key(id) {
            return Err(DomainError::precondition(format!(
                "a failover test of VPG {id} is already running"
            )));
        }
        if let Some(op) = vpg.operation {
            return Err(DomainError::precondition(format!(
                "VPG {id} is in operation {op:?}: its failover cannot be tested now"
            )));
        }
        if vpg.vms.is_empty() {
            return Err(DomainError::precondition(format!("VPG {id} has no VMs")));
        }
        self.check_operable(id)
    }

    /// Whether a failover of VPG `id` may start here: this site recovers it, it has VMs,
    /// and no test, operation or definition update is under way.
    pub fn check_recoverable_here(&self, id: &VpgId) -> Result<(), DomainError> {
        let vpg = self
            .vpgs
            .get(id)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, id))?;
        if Some(&vpg.recovery_site) != self.site_id() {
            return Err(DomainError::precondition(format!(
                "VPG {id} is recovered at site {}: fail it over there",
                vpg.recovery_site
            )));
        }
        self.check_not_testing(id, "failing it over")?;
        if let Some(op) = vpg.operation {
            return Err(DomainError::precondition(format!(
                "VPG {id} is in operation {op:?}: it cannot be failed over now"
            )));
        }
        if vpg.vms.is_empty() {
            return Err(DomainError::precondition(format!("VPG {id} has no VMs")));
        }
        self.check_operable(id)
    }

    pub(super) fn check_not_recovering(&self, vpg: &Vpg, what: &str) -> Result<(), DomainError> {
        let recovering = self.recoveries.contains_key(&vpg.id)
            || vpg.operation.is_some_and(|op| {
                !matches!(
                    op,
                    Operation::Creating | Operation::Deleting | Operation::DeleteFailed
                )
            });
        if recovering {
            return Err(DomainError::precondition(format!(
                "VPG {} is {}: {what} is not possible",
                vpg.id,
                match vpg.operation {
                    Some(Operation::Recovered) => "recovered".to_string(),
                    Some(op) => format!("in operation {op:?}"),
                    None => "being recovered".to_string(),
                }
            )));
        }
        Ok(())
    }

    /// A failover test of VPG `id` keeps its definition (and the recovery VRAs serving the
    /// test's images) as it is: edits and deletes wait until the test stops.
    pub(super) fn check_not_testing(&self, id: &VpgId, what: &str) -> Result<(), DomainError> {
        if self.tests.contains_key(id) {
            return Err(DomainError::precondition(format!(
                "a failover test of VPG {id} is running: stop it before {what}"
            )));
        }
        Ok(())
    }

    /// Whether this site may unpair from peer `id`: not while a VPG replicates with it.
    pub fn check_unpairable(&self, id: &SiteId) -> Result<(), DomainError> {
        if !self.peers.contains_key(id) {
            return Err(DomainError::not_found(SiteId::KIND, id));
        }
        if let Some(vpg) = self
            .vpgs
            .values()
            .find(|g| &g.protected_site == id || &g.recovery_site == id)
        {
            return Err(DomainError::precondition(format!(
                "VPG {:?} still replicates with site {id}; delete it first",
                vpg.name
            )));
        }
        Ok(())
    }

    /// FAILED_PRECONDITION, with the reason, while the definition of VPG `id` is being
    /// updated, or while this site stands the VPG down (another site runs its VMs).
    pub fn check_operable(&self, id: &VpgId) -> Result<(), DomainError> {
        if let Some(u) = self.updating.get(id) {
            return Err(being_updated(id, u));
        }
        if let Some(d) = self.stood_down.get(id) {
            return Err(DomainError::precondition(format!(
                "VPG {id} stood down at this site: {}; its VMs run there",
                d.describe()
            )));
        }
        Ok(())
    }

    /// The VPG that protects `vm`, if any.
    pub fn vpg_of_vm(&self, vm: &VmId) -> Option<&Vpg> {
        self.vpgs.values().find(|g| g.vm_ids().any(|v| v == vm))
    }

    pub(super) fn own_id(&self) -> SiteId {
        self.site_id()
            .cloned()
            .unwrap_or_else(|| SiteId::minted(String::new()))
    }

    /// The bytes this site's VMs keep on datastore `ds`, but for the VMs of `vpg`: a site
    /// taking a VPG turned around holds them still, and their disks are its recovery disks.
    pub(super) fn local_volume_bytes(&self, ds: &DatastoreId, vpg: Option<&Vpg>) -> u64 {
        self.vms
            .values()
            .filter(|vm| vpg.is_none_or(|g| g.vm_ids().all(|id| id != &vm.id)))
            .flat_map(|vm| vm.volumes.iter())
            .filter(|v| &v.datastore_id == ds)
            .map(|v| v.size_bytes)
            .sum()
    }

    pub(super) fn check_new_peer(&self, peer: &PeerSite) -> Result<(), DomainError> {
        if Some(&peer.id) == self.site_id() {
            return Err(DomainError::precondition("a site cannot pair with itself"));
        }
        if self
            .peers
            .values()
            .any(|p| p.name == peer.name && p.id != peer.id)
        {
            return Err(DomainError::AlreadyExists {
                kind: "peer site".into(),
                name: peer.name.clone(),
            });
        }
        Ok(())
    }

    pub(super) fn unique_name<'a, I: Ord + 'a>(
        &self,
        mut existing: impl Iterator<Item = (&'a I, &'a String)>,
        id: &I,
        name: &str,
        kind: &str,
    ) -> Result<(), DomainError> {
        if existing.any(|(other, n)| other != id && n == name) {
            return Err(DomainError::AlreadyExists {
                kind: kind.into(),
                name: name.into(),
            });
        }
        Ok(())
    }

    pub(super) fn put_vpg(
        &mut self,
        mut vpg: Vpg,
        expected: Option<u64>,
        floor: Option<u64>,
    ) -> CommandOutcome {
        self.prepare_vpg(&mut vpg, expected)?;
        let turned = self.site_id().is_some_and(|own| {
            self.vpgs
                .get(&vpg.id)
                .is_some_and(|current| turned_here(current, &vpg, own))
        });
        if turned {
            // Its VMs run at the other site now; their disks here are its recovery disks.
            for vm in vpg.vms.iter().map(|m| &m.placement.vm_id) {
                self.vms.remove(vm);
            }
            self.stood_down.remove(&vpg.id);
            self.events.push(crate::events::NewEvent {
                at_ms: vpg.updated_at_ms,
                code: crate::events::EventCode::ReverseProtection,
                vpg: Some(vpg.id.clone()),
                description: format!(
                    "VPG {:?} turned around by site {}: its VMs run there and are protected \
                     back to this site, whose disks of them are now their recovery disks \
                     (a delta sync)",
                    vpg.name, vpg.protected_site
                ),
            });
        }
        if let Some(floor) = floor {
            vpg.generation = vpg.generation.max(floor);
        }
        let generation = vpg.generation;
        self.updating.remove(&vpg.id);
        // A live VPG has no tombstone (one of the same id made again).
        self.tombstones.remove(&vpg.id);
        self.vpgs.insert(vpg.id.clone(), vpg);
        Ok(Applied::Generation(generation))
    }

    /// Checks a VPG put without changing the state, and fills in what the current
    /// definition carries over (generation, creation time, operation). `apply` runs the same
    /// check, so a manager can reject a request before involving the peer site.
    pub fn prepare_vpg(&self, vpg: &mut Vpg, expected: Option<u64>) -> Result<(), DomainError> {
        let own = self
            .site_id()
            .cloned()
            .ok_or_else(|| DomainError::precondition("site is not initialized"))?;
        match (self.vpgs.get(&vpg.id), expected) {
            (Some(_), None) => {
                return Err(DomainError::AlreadyExists {
                    kind: "vpg".into(),
                    name: vpg.id.to_string(),
                });
            }
            (None, Some(_)) => return Err(DomainError::not_found(VpgId::KIND, &vpg.id)),
            (Some(current), Some(read_at)) if current.generation != read_at => {
                return Err(DomainError::Conflict {
                    kind: "vpg".into(),
                    id: vpg.id.to_string(),
                    expected: read_at,
                    actual: current.generation,
                });
            }
            (Some(current), Some(_)) if turned_here(current, vpg, &own) => {
                // The recovery site protects the VPG back: this site takes the new
                // direction as it comes, whatever it held (its VMs run there now).
                self.check_not_testing(&vpg.id, "turning the VPG around")?;
                if self.recoveries.contains_key(&vpg.id) {
                    return Err(DomainError::precondition(format!(
                        "VPG {} is being recovered here: it cannot be turned around",
                        vpg.id
                    )));
                }
                // A site whose VMs ran until now first stands down and counts what they
                // wrote that the other site lacks (the delta sync then overwrites it).
                let counted = self
                    .stood_down
                    .get(&vpg.id)
                    .is_some_and(|d| d.divergence.is_some());
                if current.protected_site == own
                    && current.operation != Some(Operation::Recovered)
                    && !counted
                {
                    return Err(DomainError::precondition(format!(
                        "VPG {} is still standing down here (its VRAs are counting what its \
                         VMs wrote): retry",
                        vpg.id
                    )));
                }
                vpg.created_at_ms = current.created_at_ms;
            }
            (Some(current), Some(_)) => {
                self.check_not_testing(&vpg.id, "editing the VPG")?;
                self.check_not_recovering(current, "editing it")?;
                if current.protected_site != vpg.protected_site
                    || current.recovery_site != vpg.recovery_site
                {
                    return Err(DomainError::invalid(
                        "recovery_site",
                        "the sites of a VPG cannot change",
                    ));
                }
                vpg.created_at_ms = current.created_at_ms;
                vpg.operation = current.operation;
                vpg.paused = current.paused;
                vpg.manager_paused_until_ms = current.manager_paused_until_ms;
                let mut kept = current.kept_recovery_vms.clone();
                if vpg.keep_removed_recovery_disks {
                    kept.extend(
                        current
                            .vm_ids()
                            .filter(|vm| vpg.vm_ids().all(|n| n != *vm))
                            .cloned(),
                    );
                }
                kept.retain(|vm| vpg.vm_ids().all(|n| n != vm));
                vpg.kept_recovery_vms = kept;
            }
            (None, None) => {}
        }
        vpg.generation = expected.map_or(1, |g| g + 1);

        let mut v = Violations::new();
        let peer = if vpg.protected_site == own {
            &vpg.recovery_site
        } else {
            &vpg.protected_site
        };
        v.check(
            peer != &own,
            "recovery_site",
            "protected and recovery site must differ",
        );
        v.check(
            vpg.protected_site == own || vpg.recovery_site == own,
            "recovery_site",
            "the VPG does not involve this site",
        );
        v.check(
            self.peers.contains_key(peer),
            "recovery_site",
            format!("site {peer} is not paired with this site"),
        );
        if let Some(other) = self.vpgs.values().find(|g| {
            g.id != vpg.id && g.name == vpg.name && g.joins(&vpg.protected_site, &vpg.recovery_site)
        }) {
            v.add(
                "name",
                format!(
                    "VPG name {:?} is already used between these sites ({})",
                    other.name, other.id
                ),
            );
        }
        if vpg.protected_site == own {
            self.check_protected_side(vpg, &mut v);
        }
        if vpg.recovery_site == own {
            self.check_recovery_side(vpg, &mut v);
        }
        v.into_result()
    }

    pub(super) fn check_protected_side(&self, vpg: &Vpg, v: &mut Violations) {
        if let Some(pool) = &vpg.settings.reverse.pool {
            v.check(
                self.pools.contains_key(pool),
                "settings.reverse_pool_id",
                format!("resource pool {pool} does not exist at the protected site"),
            );
        }
        for (i, vm) in vpg.vms.iter().enumerate() {
            let id = &vm.placement.vm_id;
            match self.vms.get(id) {
                None => v.add(format!("vms[{i}].vm_id"), format!("VM {id} does not exist")),
                Some(_) => {
                    if let Some(other) = self
                        .vpgs
                        .values()
                        .find(|g| g.id != vpg.id && g.vm_ids().any(|x| x == id))
                    {
                        v.add(
                            format!("vms[{i}].vm_id"),
                            format!("VM {id} is already protected by VPG {:?}", other.name),
                        );
                    }
                }
            }
            let fp = &vm.footprint;
            let disks = fp.provisioned_bytes();
            if let (Some(w), Some(h)) = (
                fp.journal_warning.resolve(disks),
                fp.journal_hard_limit.resolve(disks),
            ) {
                v.check(
                    w < h,
                    format!("vms[{i}].journal_warning"),
                    "warning threshold must be below the hard limit",
                );
            }
        }
    }

    pub(super) fn check_recovery_side(&self, vpg: &Vpg, v: &mut Violations) {
        let mut committed =
            RecoveryCommitments::of(self.vpgs.values(), &vpg.recovery_site, &vpg.id);
        let mut placed: Vec<&VpgVm> = Vec::new();
        for (i, vm) in vpg.vms.iter().enumerate() {
            let p = &vm.placement;
            let f = |n: &str| format!("vms[{i}].{n}");
            let host = self.hosts.get(&p.recovery_host);
            v.check(
                host.is_some(),
                f("recovery_host"),
                format!(
                    "host {} does not exist at the recovery site",
                    p.recovery_host
                ),
            );
            match self.datastores.get(&p.recovery_datastore) {
                None => v.add(
                    f("recovery_datastore"),
                    format!(
                        "datastore {} does not exist at the recovery site",
                        p.recovery_datastore
                    ),
                ),
                Some(ds) => v.check(
                    ds.host_id == p.recovery_host,
                    f("recovery_datastore"),
                    format!("datastore {:?} is not on host {}", ds.name, p.recovery_host),
                ),
            }
            for (volume, path) in &p.disk_paths {
                v.absorb(crate::inventory::check_disk_path(
                    &f(&format!("disk_paths[{volume}]")),
                    path,
                ));
            }
            v.check(
                self.pools.contains_key(&p.recovery_pool),
                f("recovery_pool"),
                format!(
                    "resource pool {} does not exist at the recovery site",
                    p.recovery_pool
                ),
            );
            committed.add(vm);
            placed.push(vm);
        }
        for (ds_id, need) in &committed.datastore_bytes {
            let Some(ds) = self.datastores.get(ds_id) else {
                continue;
            };
            let total = need + self.local_volume_bytes(ds_id, Some(vpg));
            if total > ds.capacity_bytes
                && placed
                    .iter()
                    .any(|p| &p.placement.recovery_datastore == ds_id)
            {
                v.add(
                    "vms.recovery_datastore",
                    format!(
                        "datastore {:?} has no room: {} bytes needed (replicas and journals), capacity {}",
                        ds.name, total, ds.capacity_bytes
                    ),
                );
            }
        }
        for (pool_id, (cpu, mem, storage)) in &committed.pool {
            let Some(pool) = self.pools.get(pool_id) else {
                continue;
            };
            if !placed.iter().any(|p| &p.placement.recovery_pool == pool_id) {
                continue;
            }
            let mut over = Vec::new();
            if *cpu > pool.cpu_mhz {
                over.push(format!("CPU {cpu} MHz > {}", pool.cpu_mhz));
            }
            if *mem > pool.memory_mib {
                over.push(format!("memory {mem} MiB > {}", pool.memory_mib));
            }
            if *storage > pool.storage_bytes {
                over.push(format!("storage {storage} bytes > {}", pool.storage_bytes));
            }
            if !over.is_empty() {
                v.add(
                    "vms.recovery_pool",
                    format!(
                        "resource pool {:?} cannot hold the reservations of the VPG's VMs: {}",
                        pool.name,
                        over.join(", ")
                    ),
                );
            }
        }
    }
}
