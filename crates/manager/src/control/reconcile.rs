//! The reconciler: every tick, plans this site's VRAs from the committed definitions
//! (`tandem_core::protection`) and applies what differs from what they report. The
//! recovery side assigns its recovery VRAs first; the protected side assigns its protected
//! VRAs only once the peer's report shows the recovery VRAs at the same generation, with
//! their addresses. A VRA holding a VPG that no definition gives it is unassigned (its
//! journals and images stay on disk). A new VPG leaves "Creating" once it is level.

use std::collections::{HashMap, HashSet};

use tandem_core::events::EventCode;
use tandem_core::ids::{HostId, VpgId};
use tandem_core::inventory::Host;
use tandem_core::observe::{PlanError, PlanErrorKind, Role, VraVpgReport};
use tandem_core::protection::{self, ProtectedPlan, RecoveryPlan};
use tandem_core::state::{Command, SiteState};
use tandem_core::status::Operation;
use tandem_core::vpg::Vpg;
use tandem_proto::v1;
use tandem_proto::vra_convert;
use tokio_util::sync::CancellationToken;

use super::{TICK, call_vra, call_vra_status, every, live, vra_request};
use crate::site::{SiteManager, now_ms};

/// Reconciles every tick and soon after each committed change (an operator's pause
/// reaches the VRAs at once), until `cancel`.
pub async fn run(site: SiteManager, cancel: CancellationToken) {
    every(TICK, &cancel, Some(applied(&site, &cancel)), || async {
        // Acts only on what the poller has seen (a fresh leader waits for its first round).
        if site.control().live.observed_any() {
            reconcile_once(&site).await;
        } else if let Ok(state) = site.node().read(|s| s.clone()).await {
            // A site without VRAs still rotates its CA (a VRA not seen yet holds it).
            site.advance_ca_rotation(&state).await;
        }
    })
    .await;
}

/// The index of the last entry this node applied, as it changes (Raft's metrics also
/// change with every heartbeat: not a reason to reconcile), until `cancel`.
pub(crate) fn applied(
    site: &SiteManager,
    cancel: &CancellationToken,
) -> tokio::sync::watch::Receiver<u64> {
    let store = site.node().store().clone();
    let mut metrics = store.watch_metrics();
    let index = move || store.metrics().last_applied_index.unwrap_or(0);
    let (tx, rx) = tokio::sync::watch::channel(index());
    let cancel = cancel.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                r = metrics.changed() => if r.is_err() { return },
            }
            let now = index();
            tx.send_if_modified(|i| std::mem::replace(i, now) != now);
        }
    });
    rx
}

/// What a host's VRA last reported for each VPG, when it answered.
fn reported(site: &SiteManager, host: &HostId) -> Option<HashMap<VpgId, VraVpgReport>> {
    site.control().live.vra(host).and_then(|o| o.vpgs.ok())
}

fn generation_on(site: &SiteManager, host: &HostId, vpg: &VpgId) -> Option<u64> {
    reported(site, host).and_then(|m| m.get(vpg).map(|r| r.generation))
}

/// One pass over every definition.
pub async fn reconcile_once(site: &SiteManager) {
    // A linearizable read: a new leader acts on the committed state, never a stale one.
    let state = match site.node().read(|s| s.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "reconcile: no state");
            return;
        }
    };
    let Some(own) = state.site_id().cloned() else {
        return;
    };
    let now = now_ms();
    // For each host: the VPGs the definitions give it, and the VPGs whose plan failed
    // (left alone rather than unassigned).
    let mut wanted: HashMap<HostId, HashSet<VpgId>> = HashMap::new();
    let mut unplanned: HashSet<VpgId> = HashSet::new();
    for vpg in state.vpgs.values() {
        if state.recoveries.contains_key(&vpg.id)
            || vpg.operation.is_some_and(|op| {
                !matches!(
                    op,
                    Operation::Creating | Operation::Deleting | Operation::DeleteFailed
                )
            })
        {
            // Moved away from this (its protected) site: its protected VMs go, so the sweep
            // unassigns them (their disks stay on disk).
            if vpg.operation == Some(Operation::Recovered) && vpg.protected_site == own {
                continue;
            }
            // Recovered (or being recovered) here, or being moved away: its VRAs are the
            // operation's (their volumes are the VMs'), never unassigned by the sweep.
            unplanned.insert(vpg.id.clone());
            continue;
        }
        if matches!(
            vpg.operation,
            Some(Operation::Deleting | Operation::DeleteFailed)
        ) {
            // Its VRAs are the delete's to unassign (with or without the recovery disks).
            unplanned.insert(vpg.id.clone());
            if vpg.operation == Some(Operation::Deleting) {
                advance_delete(site, &state, vpg, now).await;
            }
            continue;
        }
        if vpg.protected_site == own && super::fence::reconcile(site, &state, vpg, now).await {
            // Another site runs its VMs: its VRAs here are the stand-down's.
            unplanned.insert(vpg.id.clone());
            continue;
        }
        let planned = if vpg.protected_site == own {
            super::definitions::reconcile(site, &state, vpg, now).await;
            let plans = protection::protected_plans(vpg, &state);
            for plan in plans.iter().flatten() {
                apply_protected(site, &state, vpg, plan).await;
            }
            plans.map(|p| p.into_iter().map(|p| p.host).collect::<Vec<_>>())
        } else {
            if super::fence::follow_delete(site, &state, vpg, now).await {
                unplanned.insert(vpg.id.clone());
                continue;
            }
            let plans = protection::recovery_plans(vpg, &state);
            for plan in plans.iter().flatten() {
                apply_recovery(site, &state, plan).await;
            }
            plans.map(|p| p.into_iter().map(|p| p.host).collect())
        };
        match planned {
            Ok(hosts) => {
                for host in hosts {
                    wanted.entry(host).or_default().insert(vpg.id.clone());
                }
            }
            Err(e) => {
                tracing::debug!(vpg = %vpg.id, error = %e, "cannot plan this site's role");
                unplanned.insert(vpg.id.clone());
            }
        }
        if vpg.operation == Some(Operation::Creating)
            && site.control().live.status(&state, vpg, now).level
        {
            let cmd = Command::SetVpgOperation {
                id: vpg.id.clone(),
                generation: vpg.generation,
                operation: None,
                event: None,
            };
            match site.node().propose(cmd).await {
                Ok(_) => tracing::info!(vpg = %vpg.id, "vpg created: initial sync done"),
                Err(e) => tracing::debug!(vpg = %vpg.id, error = %e, "could not end creation"),
            }
        }
    }
    site.advance_ca_rotation(&state).await;
    for host in state.hosts.values() {
        apply_limits(site, &state, host).await;
        apply_trust(site, &state, host).await;
        apply_renewal(site, &state, host).await;
        let Some(held) = reported(site, &host.id) else {
            continue;
        };
        for vpg in held.keys() {
            let keep =
                wanted.get(&host.id).is_some_and(|w| w.contains(vpg)) || unplanned.contains(vpg);
            if keep {
                continue;
            }
            let req = v1::UnassignRequest {
                vpg_id: vpg.to_string(),
                remove_recovery_data: false,
            };
            let r = call_vra(site, &host.vra_address, |mut c| async move {
                c.unassign(vra_request(req)).await
            })
            .await;
            match r {
                Ok(()) => {
                    tracing::info!(host = %host.id, vpg = %vpg, "unassigned a vpg no definition gives this host")
                }
                Err(e) => {
                    tracing::warn!(host = %host.id, vpg = %vpg, error = %e, "unassign failed")
                }
            }
        }
    }
}

async fn apply_protected(site: &SiteManager, state: &SiteState, vpg: &Vpg, plan: &ProtectedPlan) {
    let held = reported(site, &plan.host).and_then(|mut m| m.remove(&vpg.id));
    if held.as_ref().is_some_and(|r| r.role == Role::StoodDown)
        && let Some(host) = state.hosts.get(&plan.host)
    {
        // The peer rolled back the recovery it stood down for: protection resumes.
        let req = v1::StandUpRequest {
            vpg_id: vpg.id.to_string(),
        };
        let r = call_vra(site, &host.vra_address, |mut c| async move {
            c.stand_up(vra_request(req)).await
        })
        .await
        .map_err(PlanError::not_protected);
        log_assign(site, r, &vpg.id, &plan.host, plan.generation, "stood up");
        return;
    }
    if let Some(r) = held.filter(|r| r.generation == plan.generation) {
        // Held as planned (also after a VRA restart restored it): no refusal stands.
        site.control()
            .live
            .record_assign(&plan.host, &vpg.id, &Ok(()));
        if r.paused != vpg.pause_wanted(now_ms())
            && let Some(host) = state.hosts.get(&plan.host)
        {
            apply_pause(site, &host.vra_address, vpg, &plan.host).await;
        }
        return;
    }
    let live = &site.control().live;
    // The recovery VRAs must hold the same generation first, else they refuse the stream.
    let Some(Some(peer)) = live.peer_vpg(&vpg.recovery_site, &vpg.id) else {
        return;
    };
    if peer.assigned_generation != vpg.generation {
        return;
    }
    let Some((_, target)) = peer.targets.iter().find(|(h, _)| h == &plan.recovery_host) else {
        return;
    };
    let Some(host) = state.hosts.get(&plan.host) else {
        return;
    };
    if live.vra_unreachable(&plan.host) {
        // As for a recovery VRA: assigned once the poller reaches it again.
        return;
    }
    let req = vra_convert::assign_protected(plan, target, false);
    let r = call_vra(site, &host.vra_address, |mut c| async move {
        c.assign_protected(vra_request(req)).await
    })
    .await
    .map_err(PlanError::not_protected);
    log_assign(site, r, &vpg.id, &plan.host, plan.generation, "protected");
}

/// Gives the VRA of `host` each peer's bandwidth limit where it applies another.
async fn apply_limits(site: &SiteManager, state: &SiteState, host: &Host) {
    let Some(seen) = site.control().live.vra(&host.id).filter(|o| o.vpgs.is_ok()) else {
        return;
    };
    for peer in state.peers.values() {
        let want = peer.bandwidth_limit_bytes_per_sec;
        let key = peer.id.to_string();
        if seen.limits.get(&key).copied().unwrap_or(0) == want {
            continue;
        }
        let req = v1::SetBandwidthLimitRequest {
            peer_site_id: key,
            bytes_per_sec: want,
        };
        match call_vra(site, &host.vra_address, |mut c| async move {
            c.set_bandwidth_limit(vra_request(req)).await
        })
        .await
        {
            Ok(()) => {
                tracing::info!(host = %host.id, peer = %peer.id, bytes_per_sec = want, "bandwidth limit applied")
            }
            Err(error) => {
                tracing::warn!(host = %host.id, peer = %peer.id, %error, "bandwidth limit not applied")
            }
        }
    }
}

/// Gives the VRA of `host` the CAs of exactly the sites this site is paired with, and its
/// own site's (two during a rotation), when it trusts others: their VRAs stream to it and
/// take its streams.
async fn apply_trust(site: &SiteManager, state: &SiteState, host: &Host) {
    use tandem_tls::cert::{bundle_key, check_ca_bundle};
    if site.site_tls().is_none() {
        return;
    }
    let Some(seen) = site.control().live.vra(&host.id).filter(|o| o.vpgs.is_ok()) else {
        return;
    };
    let mut want = std::collections::HashMap::new();
    let mut sites = Vec::new();
    for peer in state.peers.values().filter(|p| !p.ca_pem.is_empty()) {
        let Ok(fps) = check_ca_bundle(&peer.ca_pem) else {
            continue;
        };
        let key = bundle_key(&fps);
        want.insert(peer.id.to_string(), key.clone());
        sites.push(v1::TrustedSite {
            site_id: peer.id.to_string(),
            ca_pem: peer.ca_pem.clone(),
            ca_fingerprint: key,
        });
    }
    let own = state.site_id().map(|i| i.to_string()).unwrap_or_default();
    let own_ca_pem = match state.ca_bundle() {
        Some(bundle) => {
            want.insert(own, bundle_key(&state.ca_fingerprints()));
            bundle
        }
        // The managers hold no CA: the VRA keeps the one it has.
        None => {
            if let Some(theirs) = seen.trusted.get(&own) {
                want.insert(own, theirs.clone());
            }
            String::new()
        }
    };
    if seen.trusted == want {
        return;
    }
    let req = v1::SetTrustRequest { sites, own_ca_pem };
    match call_vra(site, &host.vra_address, |mut c| async move {
        c.set_trust(vra_request(req)).await
    })
    .await
    {
        Ok(()) => {
            tracing::info!(host = %host.id, sites = ?want.keys().collect::<Vec<_>>(), "paired sites' CAs given to the VRA")
        }
        Err(error) => tracing::warn!(host = %host.id, %error, "paired sites' CAs not given"),
    }
}

/// Renews the certificate of the VRA of `host` when a third of its life is left, or
/// another CA than the site's issuing one issued it, as its last status says (the VRA
/// makes the key; this node signs it).
async fn apply_renewal(site: &SiteManager, state: &SiteState, host: &Host) {
    if site.site_tls().is_none() {
        return;
    }
    let Some(seen) = site
        .control()
        .live
        .vra(&host.id)
        .filter(|o| o.vpgs.is_ok() && o.cert_valid_until_ms > 0)
    else {
        return;
    };
    let until = std::time::UNIX_EPOCH + std::time::Duration::from_millis(seen.cert_valid_until_ms);
    let old_issuer = state
        .ca
        .as_ref()
        .is_some_and(|ca| !seen.cert_issuer.is_empty() && seen.cert_issuer != ca.fingerprint);
    if !(old_issuer || crate::enroll::renewal_due(Some(until), site.cert_ttl()))
        || !site.control().start_renewal(&host.id, seen.at)
    {
        return;
    }
    if let Err(error) = site.renew_vra(&host.id, &host.vra_address).await {
        tracing::warn!(host = %host.id, %error, "could not renew the VRA's certificate");
    }
}

/// Pauses or resumes the protected VRA as the definition says (also after a VRA restart,
/// which forgets it).
async fn apply_pause(site: &SiteManager, addr: &str, vpg: &Vpg, host: &HostId) {
    let id = vpg.id.to_string();
    let paused = vpg.pause_wanted(now_ms());
    let r = if paused {
        call_vra(site, addr, |mut c| async move {
            c.pause(vra_request(v1::PauseRequest { vpg_id: id })).await
        })
        .await
    } else {
        call_vra(site, addr, |mut c| async move {
            c.resume(vra_request(v1::ResumeRequest { vpg_id: id }))
                .await
        })
        .await
    };
    match r {
        Ok(()) => {
            tracing::info!(vpg = %vpg.id, %host, paused, "protection paused or resumed")
        }
        Err(error) => tracing::warn!(vpg = %vpg.id, %host, %error, "pause or resume failed"),
    }
}

fn log_assign(
    site: &SiteManager,
    r: Result<(), PlanError>,
    vpg: &VpgId,
    host: &HostId,
    generation: u64,
    role: &str,
) {
    site.control().live.record_assign(host, vpg, &r);
    match r {
        Ok(()) => tracing::info!(%vpg, %host, generation, role, "assigned"),
        Err(error) => tracing::warn!(%vpg, %host, role, %error, "assign failed"),
    }
}

async fn apply_recovery(site: &SiteManager, state: &SiteState, plan: &RecoveryPlan) {
    if generation_on(site, &plan.host, &plan.vpg) == Some(plan.generation) {
        site.control()
            .live
            .record_assign(&plan.host, &plan.vpg, &Ok(()));
        return;
    }
    let Some(host) = state.hosts.get(&plan.host) else {
        return;
    };
    if site.control().live.vra_unreachable(&plan.host) {
        // Shown as unreachable already; assigned once the poller reaches it again. Calling
        // it on every pass (passes follow each commit) only floods the log and the CPU.
        return;
    }
    let req = vra_convert::assign_recovery(plan);
    // A VRA that does not find the recovery datastore on its host answers NOT_FOUND.
    let r = call_vra_status(site, &host.vra_address, |mut c| async move {
        c.assign_recovery(vra_request(req)).await
    })
    .await
    .map_err(|s| PlanError {
        kind: if s.code() == tonic::Code::NotFound {
            PlanErrorKind::StorageProfile
        } else {
            PlanErrorKind::NotProtected
        },
        message: s.message().to_string(),
    });
    log_assign(site, r, &plan.vpg, &plan.host, plan.generation, "recovery");
}

/// How long a delete may wait for unreachable VRAs before it shows "VPG waiting to be
/// removed" (the operator then retries or forces it).
pub const DELETE_PATIENCE_MS: u64 = 15_000;

/// One step of a delete: unassign the VPG from this site's VRAs that still hold it; once
/// none does, remove the definition (naming the kept recovery disks, event EV0040).
async fn advance_delete(site: &SiteManager, state: &SiteState, vpg: &Vpg, now: u64) {
    let (protects, planned) = live::own_hosts(state, vpg);
    // The plan's hosts, or every host when the VPG cannot be planned any more.
    let hosts: Vec<&Host> = match &planned {
        Ok(ids) => ids.iter().filter_map(|h| state.hosts.get(h)).collect(),
        Err(_) => state.hosts.values().collect(),
    };
    let remove_recovery_data = !protects && !vpg.keep_recovery_disks;
    let mut waiting = Vec::new();
    for host in hosts {
        let fresh = site
            .control()
            .live
            .vra(&host.id)
            .filter(|o| o.at.elapsed() < live::VRA_STALE);
        match fresh.map(|o| o.vpgs) {
            Some(Ok(held)) if !held.contains_key(&vpg.id) => {}
            Some(Ok(_)) => {
                let req = v1::UnassignRequest {
                    vpg_id: vpg.id.to_string(),
                    remove_recovery_data,
                };
                let r = call_vra(site, &host.vra_address, |mut c| async move {
                    c.unassign(vra_request(req)).await
                })
                .await;
                match r {
                    Ok(()) => {
                        tracing::info!(vpg = %vpg.id, host = %host.id, remove_recovery_data, "delete: unassigned")
                    }
                    Err(error) => {
                        tracing::warn!(vpg = %vpg.id, host = %host.id, %error, "delete: unassign failed")
                    }
                }
                waiting.push(host.id.to_string());
            }
            Some(Err(_)) | None => waiting.push(host.id.to_string()),
        }
    }
    if waiting.is_empty() {
        finish_delete(site, state, vpg, protects).await;
    } else if now.saturating_sub(vpg.delete_started_ms) > DELETE_PATIENCE_MS {
        let cmd = Command::SetVpgOperation {
            id: vpg.id.clone(),
            generation: vpg.generation,
            operation: Some(Operation::DeleteFailed),
            event: Some(crate::site::new_event(
                EventCode::VpgDeleteFailed,
                &vpg.id,
                format!(
                    "VPG {:?} waiting to be removed: the VRAs of hosts {} did not confirm; retry the delete or force it",
                    vpg.name,
                    waiting.join(", ")
                ),
            )),
        };
        if let Err(e) = site.node().propose(cmd).await {
            tracing::warn!(vpg = %vpg.id, error = %e, "delete failure not recorded");
        }
    }
}

async fn finish_delete(site: &SiteManager, state: &SiteState, vpg: &Vpg, protects: bool) {
    let kept: Vec<String> = if !protects && vpg.keep_recovery_disks {
        protection::recovery_plans(vpg, state)
            .map(|plans| protection::disk_labels(plans.iter().flat_map(|p| &p.vms)))
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    if let Err(e) = site
        .node()
        .propose(Command::DeleteVpg {
            id: vpg.id.clone(),
            now_ms: now_ms(),
        })
        .await
    {
        tracing::warn!(vpg = %vpg.id, error = %e, "delete: definition not removed");
        return;
    }
    if !kept.is_empty() {
        site.record_event(
            EventCode::RecoveryDisksKept,
            Some(&vpg.id),
            format!(
                "VPG {:?} deleted; its recovery disks were kept at: {}",
                vpg.name,
                kept.join("; ")
            ),
        )
        .await;
    }
    site.record_event(
        EventCode::VpgDeleted,
        Some(&vpg.id),
        format!("VPG {:?} deleted", vpg.name),
    )
    .await;
}
