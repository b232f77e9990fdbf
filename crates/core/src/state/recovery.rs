//! Applying recovery operations (failover, move, failover test), standing down and standing up, protecting back.

use super::*;

impl SiteState {
    /// [`Command::BeginRecovery`].
    pub(super) fn apply_begin_recovery(
        &mut self,
        op: crate::recovery::RecoveryOp,
    ) -> CommandOutcome {
        self.check_recoverable_here(&op.vpg)?;
        let vpg = self
            .vpgs
            .get_mut(&op.vpg)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, &op.vpg))?;
        vpg.operation = Some(op.step.operation(op.kind));
        self.recoveries.insert(op.vpg.clone(), op);
        Ok(Applied::Done)
    }

    /// [`Command::AdvanceRecovery`].
    pub(super) fn apply_advance_recovery(
        &mut self,
        a: crate::recovery::RecoveryAdvance,
    ) -> CommandOutcome {
        use crate::recovery::RecoveryStep as Step;
        let Some(op) = self
            .recoveries
            .get_mut(&a.vpg)
            .filter(|op| op.id == a.op && op.step == a.from)
        else {
            return Ok(Applied::Done);
        };
        let vpg = self
            .vpgs
            .get_mut(&a.vpg)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, &a.vpg))?;
        let allowed = a.from == a.to
            || matches!(
                (a.from, a.to),
                (Step::PreparingSource, Step::Opening | Step::RollingBack)
                    | (Step::Opening, Step::BeforeCommit | Step::RollingBack)
                    | (Step::BeforeCommit, Step::Committing | Step::RollingBack)
                    | (Step::Committing, Step::Promoting)
                    | (Step::Promoting, Step::HandingOver)
            );
        if !allowed {
            return Err(DomainError::precondition(format!(
                "the {} of VPG {} cannot go from {} to {}",
                op.kind.name(),
                a.vpg,
                a.from.name(),
                a.to.name()
            )));
        }
        if a.to == Step::Promoting && a.from == Step::Committing {
            let g = a
                .new_generation
                .filter(|g| *g > vpg.generation)
                .ok_or_else(|| {
                    DomainError::invalid(
                        "new_generation",
                        format!("must be above {}", vpg.generation),
                    )
                })?;
            vpg.generation = g;
            op.new_generation = Some(g);
        }
        if a.to != a.from {
            op.step_since_ms = a.now_ms;
        }
        if let Some(point) = a.point {
            op.point = point;
        }
        op.step = a.to;
        if let Some(v) = a.volumes {
            op.volumes = v;
        }
        op.error = a.error;
        vpg.operation = Some(a.to.operation(op.kind));
        Ok(Applied::Done)
    }

    /// [`Command::RecoveryInput`].
    pub(super) fn apply_recovery_input(
        &mut self,
        vpg: VpgId,
        intent: crate::recovery::RecoveryIntent,
    ) -> CommandOutcome {
        let op = self.recoveries.get_mut(&vpg).ok_or_else(|| {
            DomainError::precondition(format!("VPG {vpg} has no failover or move running"))
        })?;
        if !op.step.takes_input() {
            if op.intent == Some(intent) {
                return Ok(Applied::Done);
            }
            return Err(DomainError::precondition(format!(
                "the {} of VPG {vpg} is {}: it can no longer be {}",
                op.kind.name(),
                op.step.name(),
                match intent {
                    crate::recovery::RecoveryIntent::Commit => "committed",
                    crate::recovery::RecoveryIntent::Rollback => "rolled back",
                }
            )));
        }
        op.intent.get_or_insert(intent);
        Ok(Applied::Done)
    }

    /// [`Command::EndRecovery`].
    pub(super) fn apply_end_recovery(
        &mut self,
        id: VpgId,
        op_id: crate::ids::RecoveryOpId,
        now_ms: u64,
    ) -> CommandOutcome {
        use crate::recovery::RecoveryStep as Step;
        let Some(op) = self
            .recoveries
            .get(&id)
            .filter(|op| {
                op.id == op_id
                    && matches!(
                        op.step,
                        Step::Promoting | Step::HandingOver | Step::RollingBack
                    )
            })
            .cloned()
        else {
            return Ok(Applied::Done);
        };
        let committed = op.step != Step::RollingBack;
        if let Some(vpg) = self.vpgs.get_mut(&id) {
            vpg.operation = committed.then_some(Operation::Recovered);
        }
        let reverse = if committed && op.reverse {
            Some(self.reverse_protection(&id, now_ms))
        } else {
            None
        };
        let description = if committed {
            format!(
                "{} to checkpoint {} committed: the VMs run at this site (generation \
                 {}){}",
                op.kind.name(),
                op.point.checkpoint_id,
                op.new_generation.unwrap_or_default(),
                match reverse {
                    None => String::new(),
                    Some(Ok(g)) => format!(
                        "; they are protected back to the other site (generation \
                         {g}), whose original disks take only a delta sync"
                    ),
                    Some(Err(e)) => format!("; reverse protection not started: {e}"),
                }
            )
        } else {
            format!(
                "{} to checkpoint {} rolled back: the VPG is as it was before it",
                op.kind.name(),
                op.point.checkpoint_id
            )
        };
        self.tasks.end(op.task, true, description.clone(), now_ms);
        self.events.push(crate::events::NewEvent {
            at_ms: now_ms,
            code: if committed {
                crate::events::EventCode::RecoveryCommitted
            } else {
                crate::events::EventCode::RecoveryRolledBack
            },
            vpg: Some(id.clone()),
            description,
        });
        self.recovery_outcomes.insert(
            id.clone(),
            crate::fence::RecoveryClaim::ended(&op, committed),
        );
        self.recoveries.remove(&id);
        Ok(Applied::Done)
    }

    /// [`Command::StandDown`].
    pub(super) fn apply_stand_down(
        &mut self,
        vpg: VpgId,
        stand_down: crate::fence::StandDown,
    ) -> CommandOutcome {
        self.stand_down(vpg, stand_down)
    }

    /// [`Command::ProtectBack`].
    pub(super) fn apply_protect_back(
        &mut self,
        vpg: VpgId,
        pool: Option<crate::ids::PoolId>,
        now_ms: u64,
    ) -> CommandOutcome {
        let g = self
            .vpgs
            .get(&vpg)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, &vpg))?;
        if Some(&g.recovery_site) != self.site_id()
            || g.operation != Some(Operation::Recovered)
            || self.recoveries.contains_key(&vpg)
        {
            return Err(DomainError::precondition(format!(
                "VPG {vpg} is not recovered here: only a VPG this site recovered \
                 (committed without reverse protection) is protected back"
            )));
        }
        let before = g.clone();
        // A pool of the old protected site's inventory (not this site's).
        if let Some(pool) = pool
            && let Some(g) = self.vpgs.get_mut(&vpg)
        {
            g.settings.reverse.pool = Some(pool);
        }
        match self.reverse_protection(&vpg, now_ms) {
            Ok(generation) => {
                self.events.push(crate::events::NewEvent {
                    at_ms: now_ms,
                    code: crate::events::EventCode::ReverseProtection,
                    vpg: Some(vpg.clone()),
                    description: format!(
                        "VPG {vpg} protected back to site {} (generation {generation}): \
                         its original disks there take a delta sync, which overwrites \
                         what its VMs there wrote after the recovery",
                        before.protected_site
                    ),
                });
                Ok(Applied::Generation(generation))
            }
            Err(e) => {
                self.vpgs.insert(vpg.clone(), before);
                Err(DomainError::precondition(format!(
                    "VPG {vpg} cannot be protected back: {e}"
                )))
            }
        }
    }

    /// [`Command::RecordDivergence`].
    pub(super) fn apply_record_divergence(
        &mut self,
        vpg: VpgId,
        divergence: Vec<crate::fence::VolumeDivergence>,
        now_ms: u64,
    ) -> CommandOutcome {
        let Some(d) = self
            .stood_down
            .get_mut(&vpg)
            .filter(|d| d.divergence.is_none())
        else {
            return Ok(Applied::Done);
        };
        d.divergence = Some(divergence);
        let description = format!(
            "VPG {vpg}: written here and not held by site {} (kept on this site's \
             disks until the operator chooses): {}",
            d.by,
            d.describe_divergence()
        );
        self.events.push(crate::events::NewEvent {
            at_ms: now_ms,
            code: crate::events::EventCode::Divergence,
            vpg: Some(vpg),
            description,
        });
        Ok(Applied::Done)
    }

    /// [`Command::StandUp`].
    pub(super) fn apply_stand_up(
        &mut self,
        vpg: VpgId,
        op: crate::ids::RecoveryOpId,
        now_ms: u64,
    ) -> CommandOutcome {
        let lifted = self
            .stood_down
            .get(&vpg)
            .is_some_and(|d| !d.final_() && d.claim().is_some_and(|c| c.op == op));
        if lifted {
            self.stood_down.remove(&vpg);
            self.events.push(crate::events::NewEvent {
                at_ms: now_ms,
                code: crate::events::EventCode::StoodUp,
                vpg: Some(vpg.clone()),
                description: format!(
                    "VPG {vpg}: the peer rolled back recovery {op}: this site protects \
                     the VMs again"
                ),
            });
        }
        Ok(Applied::Done)
    }

    /// [`Command::StartFailoverTest`].
    pub(super) fn apply_start_failover_test(
        &mut self,
        test: crate::recovery::FailoverTest,
    ) -> CommandOutcome {
        self.check_testable(&test.vpg)?;
        self.tests.insert(test.vpg.clone(), test);
        Ok(Applied::Done)
    }

    /// [`Command::ProgressFailoverTest`].
    pub(super) fn apply_progress_failover_test(
        &mut self,
        progress: crate::recovery::TestProgress,
    ) -> CommandOutcome {
        if let Some(t) = self
            .tests
            .get_mut(&progress.vpg)
            .filter(|t| t.task == progress.task)
        {
            if t.step != crate::recovery::TestStep::Stopping {
                t.step = progress.step;
            }
            t.volumes = progress.volumes;
            t.error = progress.error;
        }
        Ok(Applied::Done)
    }

    /// [`Command::StopFailoverTest`].
    pub(super) fn apply_stop_failover_test(
        &mut self,
        vpg: VpgId,
        verdict: crate::recovery::TestVerdict,
        now_ms: u64,
    ) -> CommandOutcome {
        verdict.validate()?;
        let t = self.tests.get_mut(&vpg).ok_or_else(|| {
            DomainError::precondition(format!("VPG {vpg} has no failover test running"))
        })?;
        if t.verdict.is_none() {
            t.stop_requested_ms = now_ms;
        }
        t.step = crate::recovery::TestStep::Stopping;
        t.verdict.get_or_insert(verdict);
        Ok(Applied::Done)
    }

    /// [`Command::EndFailoverTest`].
    pub(super) fn apply_end_failover_test(
        &mut self,
        vpg: VpgId,
        task: u64,
        stopped_ms: u64,
        left: Vec<String>,
    ) -> CommandOutcome {
        let Some(t) = self
            .tests
            .get(&vpg)
            .filter(|t| t.task == task && t.step == crate::recovery::TestStep::Stopping)
        else {
            return Ok(Applied::Done);
        };
        let result = crate::recovery::TestResult {
            task,
            point: t.point.clone(),
            started_ms: t.started_ms,
            stopped_ms,
            verdict: t.verdict.clone().unwrap_or(crate::recovery::TestVerdict {
                passed: true,
                note: String::new(),
            }),
        };
        let v = &result.verdict;
        let mut description = format!(
            "failover test at checkpoint {} stopped: {}{}",
            result.point.checkpoint_id,
            if v.passed { "passed" } else { "failed" },
            if v.note.is_empty() {
                String::new()
            } else {
                format!(" ({:?})", v.note)
            }
        );
        if !left.is_empty() {
            description.push_str(&format!(
                "; images not closed (their VRA could not be reached; they go when it \
                 restarts): {}",
                left.join(", ")
            ));
        }
        self.tasks
            .end(task, v.passed, description.clone(), stopped_ms);
        self.events.push(crate::events::NewEvent {
            at_ms: stopped_ms,
            code: crate::events::EventCode::FailoverTestStopped,
            vpg: Some(vpg.clone()),
            description,
        });
        self.tests.remove(&vpg);
        self.test_results.insert(vpg, result);
        Ok(Applied::Done)
    }

    /// [`Command::SetVpgOperation`].
    pub(super) fn apply_set_vpg_operation(
        &mut self,
        id: VpgId,
        generation: u64,
        operation: Option<crate::status::Operation>,
        event: Option<crate::events::NewEvent>,
    ) -> CommandOutcome {
        let vpg = self
            .vpgs
            .get_mut(&id)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, &id))?;
        if vpg.generation != generation {
            return Err(DomainError::Conflict {
                kind: "vpg".into(),
                id: id.to_string(),
                expected: generation,
                actual: vpg.generation,
            });
        }
        vpg.operation = operation;
        if let Some(event) = event {
            self.events.push(event);
        }
        Ok(Applied::Done)
    }

    pub(super) fn stand_down(
        &mut self,
        id: VpgId,
        mut d: crate::fence::StandDown,
    ) -> CommandOutcome {
        let vpg = self
            .vpgs
            .get(&id)
            .ok_or_else(|| DomainError::not_found(VpgId::KIND, &id))?;
        if Some(&vpg.protected_site) != self.site_id() {
            return Err(DomainError::precondition(format!(
                "VPG {id} is not protected by this site: nothing to stand down"
            )));
        }
        let first = match self.stood_down.get(&id) {
            Some(current) if current.cause == d.cause => return Ok(Applied::Done),
            Some(current) => {
                // The VRAs stood down already: what they counted stands.
                d.divergence = current.divergence.clone();
                d.since_ms = current.since_ms;
                false
            }
            None => true,
        };
        let description = format!(
            "VPG {:?} {} here: {}; this site's VRAs take no more writes to its volumes \
             and stop replicating",
            vpg.name,
            if first {
                "stood down"
            } else {
                "stays stood down"
            },
            d.describe()
        );
        self.events.push(crate::events::NewEvent {
            at_ms: d.since_ms,
            code: crate::events::EventCode::StoodDown,
            vpg: Some(id.clone()),
            description,
        });
        self.updating.remove(&id);
        self.stood_down.insert(id, d);
        Ok(Applied::Done)
    }

    /// A VPG that is being (or was) recovered keeps its definition: its VMs run on what
    /// the recovery made of it.
    /// Turns a VPG recovered here around (see [`crate::recovery::reversed`]): its
    /// recovered VMs join this site's inventory and the definition protects them towards
    /// the old protected site, one generation up. Answers that generation.
    pub(super) fn reverse_protection(&mut self, id: &VpgId, now_ms: u64) -> Result<u64, String> {
        let vpg = self
            .vpgs
            .get(id)
            .ok_or_else(|| format!("VPG {id} is gone"))?;
        let generation = vpg.generation + 1;
        let (turned, vms) = crate::recovery::reversed(vpg, self, generation, now_ms)?;
        for vm in &vms {
            vm.validate().map_err(|e| e.to_string())?;
        }
        if let Some(other) = vms.iter().find(|vm| self.vms.contains_key(&vm.id)) {
            return Err(format!(
                "VM {} is in this site's inventory already",
                other.id
            ));
        }
        for vm in vms {
            self.vms.insert(vm.id.clone(), vm);
        }
        self.vpgs.insert(id.clone(), turned);
        Ok(generation)
    }
}
