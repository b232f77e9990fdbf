//! What the VRA reports (`GetStatus`) and the upkeep that keeps it serving: failed journals
//! healed, recovery journals reopened.

use super::*;

impl Vra {
    /// The status of the VRA and its VPGs.
    pub async fn status(&self) -> pb::VraStatus {
        let vpgs: Vec<Role> = self.inner.vpgs.lock().await.values().cloned().collect();
        let mut out = Vec::new();
        let mut used = 0;
        for role in vpgs {
            match role {
                Role::Protected(p) => {
                    let s = p.shared();
                    let crate::protected::Positions {
                        written,
                        sent,
                        acked,
                        bytes,
                        entries,
                        ..
                    } = s.positions();
                    let c = &s.counters;
                    let mut sync = s.sync.lock();
                    let rates = s.rates.rates([
                        c.writes.load(Ordering::Relaxed),
                        c.write_bytes.load(Ordering::Relaxed),
                        c.wan_sent.load(Ordering::Relaxed),
                    ]);
                    used += bytes;
                    let connected = s.connected.load(Ordering::Relaxed);
                    let state = if s.needs_sync.load(Ordering::Relaxed) {
                        pb::VpgStreamState::NeedsSync
                    } else if connected {
                        pb::VpgStreamState::Replicating
                    } else {
                        pb::VpgStreamState::Disconnected
                    };
                    out.push(pb::VpgReplicationStatus {
                        vpg_id: p.id().to_string(),
                        role: pb::VraRole::Protected as i32,
                        generation: p.assignment().generation.0,
                        state: state as i32,
                        written_seq: written.0,
                        sent_seq: sent.0,
                        acked_seq: acked.0,
                        buffer_bytes: bytes,
                        buffer_entries: entries as u64,
                        writes: c.writes.load(Ordering::Relaxed),
                        write_bytes: c.write_bytes.load(Ordering::Relaxed),
                        wan_bytes_raw: c.wan_raw.load(Ordering::Relaxed),
                        wan_bytes_sent: c.wan_sent.load(Ordering::Relaxed),
                        frozen_checkpoint_id: s.frozen_cp.load(Ordering::Relaxed),
                        connected,
                        last_error: {
                            let remote = s
                                .remote_storage_error
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .clone();
                            if remote.is_empty() {
                                s.last_error
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .clone()
                            } else {
                                remote
                            }
                        },
                        reconnects: c.reconnects.load(Ordering::Relaxed),
                        sync: sync.current_pb(acked.0, connected),
                        write_iops: rates[0],
                        write_bytes_per_sec: rates[1],
                        wan_bytes_per_sec: rates[2],
                        last_sync: sync.last.as_ref().map(|p| p.to_pb()),
                        dirty_bytes: sync.map.pending_bytes(),
                        tracking: sync.tracking,
                        paused: sync.paused,
                        vms: s.vms.iter().map(|(vm, c)| c.to_pb(vm)).collect(),
                        powered_off: self.powered_off().contains(p.id()),
                        ..Default::default()
                    });
                }
                Role::StoodDown(d) => out.push(d.status(self.powered_off().contains(d.id()))),
                Role::Recovered(r) => {
                    let record = r.record();
                    out.push(pb::VpgReplicationStatus {
                        vpg_id: r.id().to_string(),
                        role: pb::VraRole::Recovered as i32,
                        generation: record.assignment.generation.0,
                        state: pb::VpgStreamState::Disconnected as i32,
                        last_error: r.last_error(),
                        recovery_op_id: record.op_id.to_string(),
                        recovered_checkpoint_id: record.checkpoint.0,
                        recovered_phase: r.phase_pb() as i32,
                        recovered_generation: record.new_generation.map_or(0, |g| g.0),
                        recovered: r.volume_status(),
                        ..Default::default()
                    });
                }
                Role::Recovery(r) => {
                    let c = r.counters();
                    let last = r
                        .checkpoints()
                        .await
                        .unwrap_or_default()
                        .into_iter()
                        .rev()
                        .find(|cp| cp.durable);
                    let connected = c.connected.load(Ordering::Relaxed) == 1;
                    let rates = c.rates.rates([
                        c.writes.load(Ordering::Relaxed),
                        c.write_bytes.load(Ordering::Relaxed),
                    ]);
                    let fault = r.storage_fault();
                    let state = if fault.is_some() {
                        pb::VpgStreamState::Failed
                    } else if connected {
                        pb::VpgStreamState::Replicating
                    } else {
                        pb::VpgStreamState::Disconnected
                    };
                    out.push(pb::VpgReplicationStatus {
                        vpg_id: r.id().to_string(),
                        role: pb::VraRole::Recovery as i32,
                        generation: r.assignment().generation.0,
                        state: state as i32,
                        acked_seq: c.acked.load(Ordering::Relaxed),
                        durable_seq: c.durable.load(Ordering::Relaxed),
                        writes: c.writes.load(Ordering::Relaxed),
                        write_bytes: c.write_bytes.load(Ordering::Relaxed),
                        last_durable_checkpoint_id: last
                            .as_ref()
                            .map_or(0, |cp| cp.checkpoint.id.0),
                        last_durable_checkpoint_ms: last
                            .as_ref()
                            .map_or(0, |cp| cp.checkpoint.timestamp.0),
                        connected,
                        storage_fault: match fault.as_ref().map(|f| f.0) {
                            None => pb::VraStorageFault::None,
                            Some(StorageFault::RecoveryStorage) => {
                                pb::VraStorageFault::RecoveryStorage
                            }
                            Some(StorageFault::Journal) => pb::VraStorageFault::Journal,
                        } as i32,
                        last_error: fault.map_or_else(|| r.last_error(), |f| f.1),
                        journal_bytes: r.journal_bytes(),
                        journals: r.journal_status(),
                        write_iops: rates[0],
                        write_bytes_per_sec: rates[1],
                        ..Default::default()
                    });
                }
            }
        }
        let Addresses {
            control,
            nbd,
            nbd_socket,
        } = self
            .inner
            .addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let limiters: Vec<(String, Limiter)> = self
            .inner
            .limiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut bandwidth_limits = Vec::new();
        for (site, l) in limiters {
            let rate = l.rate().await;
            if rate > 0 {
                bandwidth_limits.push(pb::VraBandwidthLimit {
                    peer_site_id: site,
                    bytes_per_sec: rate,
                });
            }
        }
        pb::VraStatus {
            bandwidth_limits,
            host_id: self.inner.settings.host_id.clone(),
            control_address: control,
            nbd_address: nbd,
            nbd_socket,
            buffer_budget_bytes: self.inner.settings.buffer_bytes,
            buffer_used_bytes: used,
            vpgs: out,
            exports: self.inner.exports.names(),
            // The service adds what the VRA trusts and its certificate's validity (it
            // holds the TLS side).
            trusted: Vec::new(),
            cert_valid_until_ms: 0,
            cert_issuer_fingerprint: String::new(),
        }
    }

    /// Reopens, every `every`, the recovery VPGs whose journal failed hard (a write or
    /// fsync error) once their files can be written again: the reopened journals drop
    /// what was never made durable, and the protected VRA resends it or syncs. Runs until
    /// `cancel`.
    pub async fn heal_failed_journals(self, every: std::time::Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let failed: Vec<Arc<RecoveryVpg>> = self
                .inner
                .vpgs
                .lock()
                .await
                .values()
                .filter_map(|role| match role {
                    Role::Recovery(r)
                        if r.storage_fault()
                            .is_some_and(|f| f.0 == StorageFault::Journal) =>
                    {
                        Some(r.clone())
                    }
                    _ => None,
                })
                .collect();
            for r in failed {
                let probe = r.clone();
                let resolved =
                    tokio::task::spawn_blocking(move || probe.journal_failure_resolved())
                        .await
                        .unwrap_or(false);
                if resolved {
                    self.reopen_recovery(r).await;
                }
            }
        }
    }

    /// Stops a recovery VPG and starts it again from its assignment (its journals are
    /// reopened). If the start fails the VPG stays out of the registry but not out of the
    /// persisted assignments: the manager's next assignment, or a restart, brings it back.
    pub(super) async fn reopen_recovery(&self, r: Arc<RecoveryVpg>) {
        let mut vpgs = self.inner.vpgs.lock().await;
        let vpg = r.id().clone();
        match vpgs.get(&vpg) {
            Some(Role::Recovery(cur)) if Arc::ptr_eq(cur, &r) => {}
            _ => return,
        }
        self.remove_pit_exports(&vpg);
        r.stop().await;
        vpgs.remove(&vpg);
        let assignment = r.assignment().clone();
        // The old journals must be closed (their threads joined) before the files are
        // opened again: wait for the last handle (a replication session unwinding) to go.
        let old = Arc::downgrade(&r);
        drop(r);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while old.strong_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if old.strong_count() > 0 {
            warn!(vpg = %vpg, "a failed recovery vpg is still referenced; reopen left to the manager");
            return;
        }
        let state_dir = self.vpg_dir(&vpg);
        let cancel = self.inner.cancel.clone();
        match tokio::task::spawn_blocking(move || {
            RecoveryVpg::start(assignment, &state_dir, &cancel)
        })
        .await
        {
            Ok(Ok(new)) => {
                vpgs.insert(vpg.clone(), Role::Recovery(Arc::new(new)));
                info!(vpg = %vpg, "recovery vpg reopened after a journal failure");
            }
            Ok(Err(e)) => warn!(vpg = %vpg, error = %e, "reopening a failed journal failed"),
            Err(_) => {}
        }
    }
}
