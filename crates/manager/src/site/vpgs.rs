//! VPG definitions across both sites: create, edit, follow the inventory, reconcile, delete.

use super::*;

impl SiteManager {
    /// Calls the peer site through the first of its endpoints that answers.
    pub(crate) async fn peer_call<T, F, Fut>(&self, peer: &PeerSite, call: F) -> ApiResult<T>
    where
        F: Fn(SitePeerClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = None;
        for addr in &peer.endpoints {
            let client = SitePeerClient::new(self.connector.peer_site(peer, addr)?);
            match call(client).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if s.code() == tonic::Code::Unavailable => last = Some(s),
                Err(s) => return Err(ApiError::from_peer(s)),
            }
        }
        Err(ApiError::from_peer(last.unwrap_or_else(|| {
            tonic::Status::unavailable("peer site has no endpoints")
        })))
    }

    /// Asks the peer site to delete its copy of a VPG this site (`own`) protects.
    pub(super) async fn peer_delete_vpg(
        &self,
        peer: &PeerSite,
        id: &VpgId,
        own: String,
        keep_recovery_disks: bool,
    ) -> ApiResult<()> {
        self.peer_call(peer, |mut c| {
            let (id, own) = (id.to_string(), own.clone());
            async move {
                c.delete_vpg(v1::PeerDeleteVpgRequest {
                    vpg_id: id,
                    from_site_id: own,
                    keep_recovery_disks,
                })
                .await
            }
        })
        .await
        .map(|_| ())
    }

    /// Builds the full definition from a spec, using this (protected) site's inventory.
    /// With `edit_of`, the spec replaces the VPG's definition read at that generation; all is
    /// checked in one linearizable read.
    pub(super) async fn build_vpg(
        &self,
        id: VpgId,
        spec: VpgSpec,
        edit_of: Option<u64>,
    ) -> ApiResult<(Vpg, PeerSite)> {
        self.node
            .read(move |s| -> ApiResult<(Vpg, PeerSite)> {
                let own = s
                    .site_id()
                    .cloned()
                    .ok_or_else(|| DomainError::precondition("site is not initialized yet"))?;
                let previous = match edit_of {
                    None => None,
                    Some(generation) => Some(Self::editable(s, &id, &own, generation, &spec)?),
                };
                let peer = s.peers.get(&spec.recovery_site).cloned().ok_or_else(|| {
                    DomainError::invalid(
                        "spec.recovery_site_id",
                        format!("site {} is not paired with this site", spec.recovery_site),
                    )
                })?;
                let mut v = Violations::new();
                let mut vms = Vec::with_capacity(spec.vms.len());
                for (i, p) in spec.vms.iter().enumerate() {
                    let kept = previous
                        .as_ref()
                        .and_then(|g| g.vms.iter().find(|m| m.placement.vm_id == p.vm_id));
                    match s.vms.get(&p.vm_id) {
                        None => v.add(
                            format!("vms[{i}].vm_id"),
                            format!("VM {} does not exist", p.vm_id),
                        ),
                        Some(vm) => vms.push(VpgVm {
                            // Preseeding is for the edit a VM joins in; later a new volume
                            // of it has no copy at the recovery site. Recovery disks of
                            // their own (the original disks, after reverse protection)
                            // stay where they are.
                            placement: VmPlacement {
                                preseeded: p.preseeded && kept.is_none(),
                                disk_paths: kept
                                    .map(|k| k.placement.disk_paths.clone())
                                    .unwrap_or_default(),
                                ..p.clone()
                            },
                            footprint: VmFootprint::refreshed(
                                vm,
                                &spec.settings,
                                kept.map(|k| &k.footprint),
                            ),
                            source: Some(tandem_core::protection::vm_source(s, vm)?),
                        }),
                    }
                }
                v.into_result()?;
                let now = now_ms();
                let mut vpg = Vpg {
                    id,
                    name: spec.name,
                    generation: 0,
                    protected_site: own,
                    recovery_site: spec.recovery_site,
                    settings: spec.settings,
                    vms,
                    created_at_ms: now,
                    updated_at_ms: now,
                    operation: Some(Operation::Creating),
                    paused: false,
                    keep_recovery_disks: false,
                    delete_started_ms: 0,
                    keep_removed_recovery_disks: false,
                    kept_recovery_vms: Default::default(),
                    manager_paused_until_ms: 0,
                    reversed_at: previous.as_ref().map_or(0, |g| g.reversed_at),
                };
                let expected = previous.as_ref().map(|g| g.generation);
                s.prepare_vpg(&mut vpg, expected)?;
                Ok((vpg, peer))
            })
            .await?
    }

    /// The current definition of a VPG about to be edited, if the edit may go ahead.
    pub(super) fn editable(
        s: &SiteState,
        id: &VpgId,
        own: &SiteId,
        generation: u64,
        spec: &VpgSpec,
    ) -> ApiResult<Vpg> {
        let current = s
            .vpgs
            .get(id)
            .cloned()
            .ok_or_else(|| DomainError::not_found("vpg", id))?;
        if &current.protected_site != own {
            return Err(DomainError::precondition("a VPG is edited at its protected site").into());
        }
        s.check_operable(id)?;
        if current.generation != generation {
            return Err(DomainError::Conflict {
                kind: "vpg".into(),
                id: id.to_string(),
                expected: generation,
                actual: current.generation,
            }
            .into());
        }
        if spec.recovery_site != current.recovery_site {
            return Err(DomainError::invalid(
                "spec.recovery_site_id",
                "the recovery site of a VPG cannot change",
            )
            .into());
        }
        Ok(current)
    }

    /// Creates a VPG protected by this site: the recovery site checks placement and room
    /// and stores its copy first, then this site commits.
    pub async fn create_vpg(&self, id: Option<VpgId>, spec: VpgSpec) -> ApiResult<VpgView> {
        let id = id.unwrap_or_else(|| VpgId::minted(mint("vpg")));
        if spec.vms.is_empty() {
            return Err(DomainError::invalid("spec.vms", "a new VPG needs at least one VM").into());
        }
        let (vpg, peer) = self.build_vpg(id.clone(), spec, None).await?;
        let what = format!("VPG {:?} created with {} VMs", vpg.name, vpg.vms.len());
        let task = self
            .start_task(
                TaskKind::CreateVpg,
                Some(&id),
                None,
                "storing the definition on both sites".into(),
            )
            .await;
        let event = new_event(EventCode::VpgCreated, &id, what);
        let index = self
            .store_on_both(vpg, None, None, &peer, Some(event))
            .await;
        let index = self.fail_task_on_error(task, index).await?;
        self.vpg_after(index, id).await
    }

    /// Replaces the definition of a VPG this site protects, if `generation` is current.
    pub async fn update_vpg(
        &self,
        id: VpgId,
        generation: u64,
        spec: VpgSpec,
        keep_removed_recovery_disks: bool,
    ) -> ApiResult<VpgView> {
        self.edit_vpg(id, generation, spec, keep_removed_recovery_disks, None)
            .await
    }

    /// Brings a VPG this site protects up to date with its VMs' inventory (`changes`, as
    /// [`Vpg::inventory_drift`] names them): a new generation whose footprints, and so the
    /// mirror's volumes, are the inventory's.
    pub async fn follow_inventory(
        &self,
        vpg: &Vpg,
        changes: &[(tandem_core::ids::VmId, Vec<String>)],
    ) -> ApiResult<VpgView> {
        let what = changes
            .iter()
            .map(|(vm, c)| {
                let c = if c.is_empty() {
                    "memory or reservations changed".to_string()
                } else {
                    c.join(", ")
                };
                format!("VM {vm}: {c}")
            })
            .collect::<Vec<_>>()
            .join("; ");
        self.edit_vpg(
            vpg.id.clone(),
            vpg.generation,
            vpg.spec(),
            false,
            Some(what),
        )
        .await
    }

    /// An edit by the operator (`inventory` is `None`) or one that follows the inventory.
    pub(super) async fn edit_vpg(
        &self,
        id: VpgId,
        generation: u64,
        spec: VpgSpec,
        keep_removed_recovery_disks: bool,
        inventory: Option<String>,
    ) -> ApiResult<VpgView> {
        let (mut vpg, peer) = self.build_vpg(id.clone(), spec, Some(generation)).await?;
        vpg.updated_at_ms = now_ms();
        vpg.keep_removed_recovery_disks = keep_removed_recovery_disks;
        let (code, what) = match &inventory {
            None => (
                EventCode::VpgEdited,
                format!(
                    "VPG {:?} edited: generation {}, {} VMs",
                    vpg.name,
                    generation + 1,
                    vpg.vms.len()
                ),
            ),
            Some(changes) => (
                EventCode::VpgFollowedInventory,
                format!(
                    "VPG {:?} follows the inventory at generation {}: {changes}",
                    vpg.name,
                    generation + 1
                ),
            ),
        };
        // Until both sites hold the new definition, nothing else may change the VPG. The
        // edit's task starts in the same commit, and its event is stored with the
        // definition: an edit waits for two commits here, not four.
        let task = new_task(
            TaskKind::EditVpg,
            Some(&id),
            Some(generation + 1),
            "storing the definition on both sites".into(),
        );
        let task = match self
            .node
            .propose(Command::BeginVpgUpdate {
                id: id.clone(),
                reason: format!(
                    "an edit to generation {} is being stored on both sites",
                    generation + 1
                ),
                now_ms: now_ms(),
                task: Some(task),
            })
            .await?
        {
            Applied::Task(task) => Some(task),
            _ => None,
        };
        let event = new_event(code, &id, what);
        let index = self
            .store_on_both(vpg, Some(generation), None, &peer, Some(event))
            .await;
        if index.is_err() {
            // The peer may hold the edit all the same (its answer was lost): the protected
            // site's controller reconciles the two copies.
            self.end_update(&id).await;
        }
        let index = self.fail_task_on_error(task, index).await?;
        self.vpg_after(index, id).await
    }

    /// The view of a VPG on this node once it has applied `index` (its own write).
    pub(super) async fn vpg_after(&self, index: u64, id: VpgId) -> ApiResult<VpgView> {
        self.node
            .read_after(index, |s| s.vpgs.get(&id).map(|g| Self::view(s, g)))
            .await?
            .ok_or_else(|| DomainError::not_found("vpg", &id).into())
    }

    /// Ends a definition update that did not commit, or that a node which died mid-edit
    /// left behind; logged, not fatal.
    pub async fn end_update(&self, id: &VpgId) {
        let cmd = Command::EndVpgUpdate { id: id.clone() };
        if let Err(e) = self.node.propose(cmd).await {
            tracing::warn!(vpg = %id, error = %e, "definition update not ended");
        }
    }

    /// Stores a definition at the peer, then here: the recovery site checks placement and
    /// room first. With `floor` (reconciliation) the peer was read at
    /// `floor.peer_expected` and both sites store generation `floor.generation`.
    pub(super) async fn store_on_both(
        &self,
        vpg: Vpg,
        expected: Option<u64>,
        floor: Option<GenerationFloor>,
        peer: &PeerSite,
        event: Option<NewEvent>,
    ) -> ApiResult<u64> {
        let json = serde_json::to_vec(&vpg).map_err(ApiError::internal)?;
        let peer_expected = floor.map_or(expected, |f| Some(f.peer_expected));
        let generation_floor = floor.map(|f| f.generation);
        self.peer_call(peer, |mut c| {
            let json = json.clone();
            async move {
                c.put_vpg(v1::PeerVpgRequest {
                    vpg_json: json,
                    expected_generation: peer_expected,
                    generation_floor,
                })
                .await
            }
        })
        .await?;
        let id = vpg.id.clone();
        let committed = self
            .node
            .propose_indexed(Command::PutVpg {
                vpg,
                expected_generation: expected,
                generation_floor,
                event,
            })
            .await;
        match committed {
            Ok((index, _)) => Ok(index),
            Err(e) => {
                if expected.is_none() {
                    // Undo the peer's copy so that a failed create leaves nothing behind.
                    let own = self
                        .identity()
                        .await
                        .map(|i| i.id.to_string())
                        .unwrap_or_default();
                    let undo = self.peer_delete_vpg(peer, &id, own, false).await;
                    if let Err(u) = undo {
                        tracing::warn!(vpg = %id, error = %u, "could not undo peer copy of a failed vpg create");
                    }
                }
                Err(e)
            }
        }
    }

    /// Brings the recovery site's copy of a VPG this site protects back in line with this
    /// site's, when the two differ in generation (an edit the peer committed and this site
    /// did not): both then store this site's definition at a generation above either.
    pub async fn reconcile_definition(&self, id: &VpgId, peer_generation: u64) -> ApiResult<u64> {
        let (vpg, peer) = self
            .node
            .read({
                let id = id.clone();
                move |s| {
                    let g = s.vpgs.get(&id).cloned();
                    let peer = g
                        .as_ref()
                        .and_then(|g| s.peers.get(&g.recovery_site).cloned());
                    (g, peer)
                }
            })
            .await?;
        let vpg = vpg.ok_or_else(|| DomainError::not_found("vpg", id))?;
        let peer =
            peer.ok_or_else(|| DomainError::precondition("the recovery site is not paired"))?;
        let own_generation = vpg.generation;
        let generation = own_generation.max(peer_generation) + 1;
        self.node
            .propose(Command::BeginVpgUpdate {
                id: id.clone(),
                reason: format!(
                    "reconciling the definition with site {} (generation {own_generation} here, \
                     {peer_generation} there)",
                    peer.name
                ),
                now_ms: now_ms(),
                task: None,
            })
            .await?;
        let floor = GenerationFloor {
            peer_expected: peer_generation,
            generation,
        };
        let r = self
            .store_on_both(vpg, Some(own_generation), Some(floor), &peer, None)
            .await;
        if r.is_err() {
            self.end_update(id).await;
        }
        r?;
        self.record_event(
            EventCode::DefinitionReconciled,
            Some(id),
            format!(
                "definition reconciled with site {}: both sites hold this site's definition at \
                 generation {generation} (it was {own_generation} here, {peer_generation} there)",
                peer.name
            ),
        )
        .await;
        Ok(generation)
    }

    /// Stores a definition sent by the peer site (the recovery side of create/edit).
    pub async fn put_peer_vpg(
        &self,
        vpg: Vpg,
        expected: Option<u64>,
        generation_floor: Option<u64>,
    ) -> ApiResult<()> {
        // The recovery disks of VMs this edit removes, by VM, as this site placed them.
        let removed = self
            .node
            .read({
                let new = vpg.clone();
                move |s| {
                    let Some(old) = s.vpgs.get(&new.id) else {
                        return Vec::new();
                    };
                    let plans = tandem_core::protection::recovery_plans(old, s).unwrap_or_default();
                    plans
                        .into_iter()
                        .flat_map(|p| p.vms)
                        .filter(|vm| new.vms.iter().all(|n| n.placement.vm_id != vm.vm))
                        .map(|vm| {
                            let paths: Vec<String> =
                                vm.volumes.iter().map(|v| v.path.clone()).collect();
                            (vm.vm.to_string(), paths)
                        })
                        .collect::<Vec<_>>()
                }
            })
            .await?;
        let (id, keep) = (vpg.id.clone(), vpg.keep_removed_recovery_disks);
        self.node
            .propose(Command::PutVpg {
                vpg,
                expected_generation: expected,
                generation_floor,
                event: None,
            })
            .await?;
        for (vm, paths) in removed {
            if keep {
                self.record_event(
                    EventCode::RecoveryDisksKept,
                    Some(&id),
                    format!(
                        "VM {vm} removed from the VPG; its recovery disks were kept at: {}",
                        paths.join("; ")
                    ),
                )
                .await;
            } else {
                self.record_event(
                    EventCode::VpgEdited,
                    Some(&id),
                    format!("VM {vm} removed from the VPG; its recovery disks are removed"),
                )
                .await;
            }
        }
        Ok(())
    }

    /// The recovery side of a delete: starts deleting this site's copy.
    pub async fn delete_peer_vpg(
        &self,
        id: VpgId,
        from: SiteId,
        keep_recovery_disks: bool,
    ) -> ApiResult<()> {
        let owner = self
            .node
            .read({
                let id = id.clone();
                move |s| {
                    s.vpgs
                        .get(&id)
                        .map(|g| (g.protected_site.clone(), g.operation))
                }
            })
            .await?;
        match owner {
            None => Ok(()),
            Some((_, Some(Operation::Recovered))) => Err(DomainError::precondition(
                "this site recovered the VPG and runs its VMs: delete it here, not from the \
                 old protected site",
            )
            .into()),
            Some((site, _)) if site == from => self
                .node
                .propose(Command::BeginVpgDelete {
                    id,
                    keep_recovery_disks,
                    now_ms: now_ms(),
                })
                .await
                .map(|_| ()),
            Some(_) => {
                Err(DomainError::precondition("only the protected site may delete its VPG").into())
            }
        }
    }

    /// Deletes a VPG on both sites: the peer confirms, then both sites' controllers
    /// unassign their VRAs (the recovery site removes the recovery disks unless kept) and
    /// remove the definition. A delete that cannot finish leaves "VPG waiting to be
    /// removed": deleting again retries; `force` removes the definition here at once
    /// (also at the recovery site, or when the peer is gone) and leaves the VRAs' data.
    pub async fn delete_vpg(
        &self,
        id: VpgId,
        keep_recovery_disks: bool,
        force: bool,
    ) -> ApiResult<()> {
        let (vpg, peer, own, away) = self
            .node
            .read({
                let id = id.clone();
                move |s| {
                    let g = s.vpgs.get(&id).cloned();
                    // Its VMs run at the peer (stood down, or moved away): this site only
                    // lets go of its copy, the peer's stays.
                    let away = s.stood_down.contains_key(&id)
                        || g.as_ref().is_some_and(|g| {
                            g.operation == Some(Operation::Recovered)
                                && Some(&g.protected_site) == s.site_id()
                        });
                    let peer = g.as_ref().and_then(|g| {
                        let other = if Some(&g.protected_site) == s.site_id() {
                            &g.recovery_site
                        } else {
                            &g.protected_site
                        };
                        s.peers.get(other).cloned()
                    });
                    (g, peer, s.site_id().cloned(), away)
                }
            })
            .await?;
        let vpg = vpg.ok_or_else(|| DomainError::not_found("vpg", &id))?;
        let protected_here = Some(&vpg.protected_site) == own.as_ref();
        // The recovery site may retry a delete the protected site started (and may have
        // finished on its side).
        let retry = matches!(
            vpg.operation,
            Some(Operation::Deleting | Operation::DeleteFailed)
        );
        if !protected_here && !force && !retry {
            return Err(DomainError::precondition(
                "this site recovers the VPG; delete it at its protected site, or use force",
            )
            .into());
        }
        if let Some(op) = vpg.operation.filter(|op| !op.allows_delete()) {
            return Err(DomainError::precondition(format!(
                "VPG {id} is in operation {op:?}: it cannot be deleted now"
            ))
            .into());
        }
        if protected_here
            && !away
            && let Some(peer) = &peer
        {
            let own = own.map(|s| s.to_string()).unwrap_or_default();
            let r = self
                .peer_delete_vpg(peer, &id, own, keep_recovery_disks)
                .await;
            match r {
                Ok(_) => {}
                Err(e) if force => {
                    tracing::warn!(vpg = %id, error = %e, "force delete: peer copy left behind");
                }
                Err(e) => return Err(e),
            }
        }
        if force {
            let r = self
                .node
                .propose(Command::DeleteVpg {
                    id: id.clone(),
                    now_ms: now_ms(),
                })
                .await;
            self.instant_task(TaskKind::DeleteVpg, Some(&id), &r).await;
            r?;
            self.record_event(
                EventCode::VpgDeleted,
                Some(&id),
                format!(
                    "VPG {:?} force-deleted; its VRAs' data was left in place",
                    vpg.name
                ),
            )
            .await;
            return Ok(());
        }
        let r = self
            .node
            .propose(Command::BeginVpgDelete {
                id: id.clone(),
                keep_recovery_disks,
                now_ms: now_ms(),
            })
            .await;
        if r.is_ok() {
            // Running until the controllers have removed the definition.
            self.start_task(
                TaskKind::DeleteVpg,
                Some(&id),
                None,
                "unassigning the VRAs".into(),
            )
            .await;
        }
        r?;
        self.record_event(
            EventCode::VpgDeleteStarted,
            Some(&id),
            format!(
                "deleting VPG {:?}, {} its recovery disks",
                vpg.name,
                if keep_recovery_disks {
                    "keeping"
                } else {
                    "removing"
                }
            ),
        )
        .await;
        Ok(())
    }
}
