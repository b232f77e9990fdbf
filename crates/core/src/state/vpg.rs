//! Applying VPG definitions: put (checked against the inventory, generations), updates under way, pause, delete.

use super::*;

impl SiteState {
    /// [`Command::PutVpg`].
    pub(super) fn apply_put_vpg(
        &mut self,
        vpg: Vpg,
        expected_generation: Option<u64>,
        generation_floor: Option<u64>,
        event: Option<crate::events::NewEvent>,
    ) -> CommandOutcome {
        let applied = self.put_vpg(vpg, expected_generation, generation_floor)?;
        if let Some(event) = event {
            self.events.push(event);
        }
        Ok(applied)
    }

    /// [`Command::BeginVpgUpdate`].
    pub(super) fn apply_begin_vpg_update(
        &mut self,
        id: VpgId,
        reason: String,
        now_ms: u64,
        task: Option<crate::tasks::NewTask>,
    ) -> CommandOutcome {
        exists(&self.vpgs, &id, VpgId::KIND)?;
        self.check_operable(&id)?;
        self.updating.insert(
            id,
            DefinitionUpdate {
                reason,
                since_ms: now_ms,
            },
        );
        Ok(task.map_or(Applied::Done, |t| Applied::Task(self.tasks.start(t))))
    }

    /// [`Command::EndVpgUpdate`].
    pub(super) fn apply_end_vpg_update(&mut self, id: VpgId) -> CommandOutcome {
        self.updating.remove(&id);
        Ok(Applied::Done)
    }

    /// [`Command::DeleteVpg`].
    pub(super) fn apply_delete_vpg(&mut self, id: VpgId, now_ms: u64) -> CommandOutcome {
        exists(&self.vpgs, &id, VpgId::KIND)?;
        if let (Some(vpg), Some(own)) = (self.vpgs.get(&id), self.site_id()) {
            let mut t = crate::fence::Tombstone::of(vpg, own, now_ms);
            t.owned_by_deleter &= !self.stood_down.contains_key(&id);
            self.tombstones.insert(id.clone(), t);
            if self.tombstones.len() > crate::fence::MAX_TOMBSTONES
                && let Some(oldest) = self
                    .tombstones
                    .values()
                    .min_by_key(|t| t.deleted_ms)
                    .map(|t| t.vpg.clone())
            {
                self.tombstones.remove(&oldest);
            }
        }
        self.vpgs.remove(&id);
        self.stood_down.remove(&id);
        self.recovery_outcomes.remove(&id);
        self.updating.remove(&id);
        self.test_results.remove(&id);
        self.recorded_status.remove(&id);
        Ok(Applied::Done)
    }

    /// [`Command::BeginVpgDelete`].
    pub(super) fn apply_begin_vpg_delete(
        &mut self,
        id: VpgId,
        keep_recovery_disks: bool,
        now_ms: u64,
    ) -> CommandOutcome {
        let vpg = self
            .vpgs
            .get_mut(&id)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, &id))?;
        if let Some(u) = self.updating.get(&id) {
            return Err(being_updated(&id, u));
        }
        if self.tests.contains_key(&id) {
            return Err(DomainError::precondition(format!(
                "a failover test of VPG {id} is running: stop it before deleting the VPG"
            )));
        }
        if let Some(op) = vpg.operation.filter(|op| !op.allows_delete()) {
            return Err(DomainError::precondition(format!(
                "VPG {id} is in operation {op:?}: it cannot be deleted now"
            )));
        }
        if vpg.operation != Some(Operation::Deleting) {
            vpg.delete_started_ms = now_ms;
        }
        vpg.operation = Some(Operation::Deleting);
        vpg.keep_recovery_disks = keep_recovery_disks;
        Ok(Applied::Done)
    }

    /// [`Command::SetVpgPaused`].
    pub(super) fn apply_set_vpg_paused(&mut self, id: VpgId, paused: bool) -> CommandOutcome {
        self.check_pausable(&id)?;
        let vpg = self
            .vpgs
            .get_mut(&id)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, &id))?;
        vpg.paused = paused;
        // The operator's word ends the manager's pause either way.
        vpg.manager_paused_until_ms = 0;
        Ok(Applied::Done)
    }

    /// [`Command::SetManagerPause`].
    pub(super) fn apply_set_manager_pause(&mut self, id: VpgId, until_ms: u64) -> CommandOutcome {
        if until_ms != 0 {
            self.check_pausable(&id)?;
        }
        let vpg = self
            .vpgs
            .get_mut(&id)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, &id))?;
        vpg.manager_paused_until_ms = until_ms;
        Ok(Applied::Done)
    }
}
