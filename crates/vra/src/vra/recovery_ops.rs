//! The VRA's part of a recovery: start it (recovered VMs served from a checkpoint's image),
//! commit or roll it back, and restore recovered VPGs after a restart.

use super::*;

impl Vra {
    /// Fails over or moves a VPG to this VRA, before commit (see `StartRecovery`): the
    /// recovery role stops (its stream is refused from now on), its journals stay open
    /// under images at `checkpoint` with durable overlays, served as `"<vm>/<volume>"`.
    /// Nothing is copied: the time taken is building the images' maps.
    pub async fn start_recovery(
        &self,
        vpg: &VpgId,
        generation: Generation,
        checkpoint: CheckpointId,
        op_id: RecoveryOpId,
    ) -> VraResult<Arc<RecoveredVpg>> {
        let mut vpgs = self.inner.vpgs.lock().await;
        let role = vpgs
            .get(vpg)
            .cloned()
            .ok_or_else(|| VraError::VpgNotFound(vpg.clone()))?;
        let r = match role {
            Role::Recovered(done) if done.record().op_id == op_id => return Ok(done),
            Role::Recovered(other) => {
                return Err(DomainError::precondition(format!(
                    "vpg {vpg} is recovered here by operation {}",
                    other.record().op_id
                ))
                .into());
            }
            other @ (Role::Protected(_) | Role::StoodDown(_)) => {
                return Err(VraError::WrongRole {
                    vpg: vpg.clone(),
                    role: other.name(),
                });
            }
            Role::Recovery(r) => r,
        };
        if r.assignment().generation != generation {
            return Err(DomainError::precondition(format!(
                "vpg {vpg} is at generation {} on this vra, not {}",
                r.assignment().generation.0,
                generation.0
            ))
            .into());
        }
        let usable = r
            .checkpoints()
            .await?
            .into_iter()
            .find(|c| c.checkpoint.id == checkpoint)
            .is_some_and(|c| c.usable);
        if !usable {
            return Err(VraError::CheckpointUnusable {
                vpg: vpg.clone(),
                id: checkpoint.0,
                reason: "not durable and unpromoted in every journal".into(),
            });
        }
        // From here the stream is refused (the role is no longer Recovery) and the
        // journals are written by nobody: maintenance stops with the role.
        self.remove_pit_exports(vpg);
        r.stop().await;
        let journals = r.journals();
        let record = RecoveredRecord {
            op_id,
            checkpoint,
            phase: RecoveredPhase::BeforeCommit,
            new_generation: None,
            assignment: r.assignment().clone(),
        };
        drop(r);
        let state_dir = self.vpg_dir(vpg);
        let cancel = self.inner.cancel.clone();
        let opened = tokio::task::spawn_blocking(move || {
            RecoveredVpg::open(record, &state_dir, journals, &cancel)
        })
        .await
        .map_err(|_| VraError::ShuttingDown)?;
        let recovered = match opened {
            Ok(rec) => Arc::new(rec),
            Err(e) => {
                // The recovery role goes on as it was.
                let _ = recovered::remove_state(&self.vpg_dir(vpg));
                if let Role::Recovery(old) = vpgs.remove(vpg).expect("held under the lock") {
                    self.start_recovery_role(&mut vpgs, old.assignment().clone())
                        .await?;
                }
                return Err(e);
            }
        };
        if let Err(e) = self.insert_recovered_exports(&recovered) {
            recovered.stop().await;
            let _ = recovered::remove_state(&self.vpg_dir(vpg));
            let a = recovered.record().assignment;
            drop(recovered);
            vpgs.remove(vpg);
            self.start_recovery_role(&mut vpgs, a).await?;
            return Err(e);
        }
        vpgs.insert(vpg.clone(), Role::Recovered(recovered.clone()));
        self.persist(&vpgs).await?;
        info!(vpg = %vpg, checkpoint = checkpoint.0, "recovered before commit");
        Ok(recovered)
    }

    pub(super) fn insert_recovered_exports(&self, r: &RecoveredVpg) -> VraResult<()> {
        let mut added: Vec<&str> = Vec::new();
        for (name, vol) in r.volumes() {
            let device: Arc<dyn BlockDevice> = Arc::new(vol.clone());
            if let Err(e) = self.inner.exports.insert(name.clone(), device) {
                for n in &added {
                    self.inner.exports.remove(n);
                }
                return Err(e.into());
            }
            added.push(name);
        }
        Ok(())
    }

    /// Starts the recovery role from `a` and persists it (an assignment; a rollback, or a
    /// recovery that could not start, once the old journals are closed).
    pub(super) async fn start_recovery_role(
        &self,
        vpgs: &mut BTreeMap<VpgId, Role>,
        a: RecoveryAssignment,
    ) -> VraResult<()> {
        let state_dir = self.vpg_dir(&a.vpg);
        let cancel = self.inner.cancel.clone();
        let assignment = a.clone();
        // Opening journals is blocking IO (recovery scans, fsyncs).
        let r = tokio::task::spawn_blocking(move || {
            RecoveryVpg::start(assignment, &state_dir, &cancel)
        })
        .await
        .map_err(|_| VraError::ShuttingDown)??;
        vpgs.insert(a.vpg.clone(), Role::Recovery(Arc::new(r)));
        self.persist(vpgs).await
    }

    /// Commits a recovery (see `CommitRecovery`).
    pub async fn commit_recovery(
        &self,
        vpg: &VpgId,
        op_id: &RecoveryOpId,
        new_generation: Generation,
    ) -> VraResult<()> {
        let r = self.recovered(vpg, op_id).await?;
        r.commit(new_generation)
    }

    /// Rolls a recovery back before commit (see `RollbackRecovery`).
    pub async fn rollback_recovery(&self, vpg: &VpgId, op_id: &RecoveryOpId) -> VraResult<()> {
        let mut vpgs = self.inner.vpgs.lock().await;
        let r = match vpgs.get(vpg) {
            Some(Role::Recovered(r)) if r.record().op_id == *op_id => r.clone(),
            Some(Role::Recovered(r)) => {
                return Err(DomainError::precondition(format!(
                    "vpg {vpg} is recovered here by operation {}",
                    r.record().op_id
                ))
                .into());
            }
            // Not recovered here (any more): nothing to roll back.
            _ => return Ok(()),
        };
        let record = r.record();
        if record.phase != RecoveredPhase::BeforeCommit {
            return Err(DomainError::precondition(format!(
                "the recovery of vpg {vpg} is committed; it cannot be rolled back"
            ))
            .into());
        }
        self.remove_recovered_exports(&r);
        r.stop().await;
        r.drop_journals().await;
        drop(r);
        vpgs.remove(vpg);
        self.start_recovery_role(&mut vpgs, record.assignment)
            .await?;
        recovered::remove_state(&self.vpg_dir(vpg))?;
        info!(vpg = %vpg, "recovery rolled back");
        Ok(())
    }

    pub(super) async fn recovered(
        &self,
        vpg: &VpgId,
        op_id: &RecoveryOpId,
    ) -> VraResult<Arc<RecoveredVpg>> {
        match self.role(vpg).await? {
            Role::Recovered(r) if r.record().op_id == *op_id => Ok(r),
            Role::Recovered(r) => Err(DomainError::precondition(format!(
                "vpg {vpg} is recovered here by operation {}",
                r.record().op_id
            ))
            .into()),
            other => Err(VraError::WrongRole {
                vpg: vpg.clone(),
                role: other.name(),
            }),
        }
    }

    /// The VPGs with a recovered record in the data directory.
    pub(super) async fn recovered_on_disk(&self) -> VraResult<Vec<VpgId>> {
        let dir = self.inner.settings.data_dir.join("vpgs");
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(VraError::io("list vpg state", &dir)(e)),
            };
            for e in entries.flatten() {
                if recovered::record_path(&e.path()).exists()
                    && let Some(name) = e.file_name().to_str()
                    && let Ok(vpg) = VpgId::parse("vpg", name)
                {
                    out.push(vpg);
                }
            }
            Ok(out)
        })
        .await
        .map_err(|_| VraError::ShuttingDown)?
    }

    /// Brings a recovered VPG back after a restart, in its persisted phase.
    pub(super) async fn restore_recovered(&self, vpg: &VpgId) -> VraResult<()> {
        let state_dir = self.vpg_dir(vpg);
        let cancel = self.inner.cancel.clone();
        let r = tokio::task::spawn_blocking(move || {
            let Some(record) = recovered::load_record(&state_dir)? else {
                return Ok(None);
            };
            let journals = match record.phase {
                RecoveredPhase::BeforeCommit | RecoveredPhase::Promoting => {
                    crate::recovery::open_journals(&record.assignment)?
                }
                RecoveredPhase::Merging | RecoveredPhase::Live => Vec::new(),
            };
            RecoveredVpg::open(record, &state_dir, journals, &cancel).map(Some)
        })
        .await
        .map_err(|_| VraError::ShuttingDown)??;
        let Some(r) = r else { return Ok(()) };
        let r = Arc::new(r);
        self.insert_recovered_exports(&r)?;
        r.resume();
        let mut vpgs = self.inner.vpgs.lock().await;
        vpgs.insert(vpg.clone(), Role::Recovered(r.clone()));
        self.persist(&vpgs).await?;
        info!(vpg = %vpg, phase = ?r.record().phase, "recovered vpg restored");
        Ok(())
    }
}
