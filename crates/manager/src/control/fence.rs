//! The fence controller, on the leader of a site, for every VPG the site protects: reads
//! what the peer reports of it (a recovery running or committed there, or a delete after
//! it ran the VMs) and applies [`tandem_core::fence::verdict`]. Standing down is durable
//! (a replicated command first), then level-triggered: every protected VRA of the VPG
//! is told to stand down (exports closed, stream stopped, unacknowledged regions kept),
//! and once all have, what they kept is recorded per volume with event EV0067. After
//! that the VPG goes where the other site's state says: taken up again when the peer
//! rolled back (EV0068), turned around by the peer's push (reverse protection), Recovered
//! when the operation had shut the VMs down here, removed when the peer deleted it, or
//! left stood down (Needs Configuration) until the operator chooses. A site that recovers
//! a VPG its protected site deleted while it was away deletes its copy too, keeping the
//! recovery disks ([`follow_delete`]).

use std::time::Duration;

use tandem_core::events::EventCode;
use tandem_core::fence::{
    PeerSays, StandDown, StandDownCause, Tombstone, Verdict, VolumeDivergence, verdict,
};
use tandem_core::ids::{HostId, SiteId, VmId};
use tandem_core::observe::{PeerVpgReport, Role, VraSeen};
use tandem_core::protection::{self, ProtectedPlan};
use tandem_core::state::{Command, SiteState};
use tandem_core::status::Operation;
use tandem_core::vpg::Vpg;
use tandem_proto::v1;

use super::{call_vra, vra_request};
use crate::failpoint;
use crate::site::{SiteManager, new_event, now_ms};

/// How long a stand-down waits for VRAs that cannot be reached before it records their
/// volumes' divergence as unknown (they take no writes while unreachable, and stand
/// down when they come back).
pub const COUNT_PATIENCE: Duration = Duration::from_secs(15);

/// One look at `vpg`, which this site protects. Answers whether the VPG is (or is now
/// being) stood down, in which case the caller leaves its protected role alone.
pub async fn reconcile(site: &SiteManager, state: &SiteState, vpg: &Vpg, now: u64) -> bool {
    let current = state.stood_down.get(&vpg.id);
    let (held, tombstone) = peer_view(site, &vpg.recovery_site, vpg);
    let says = match (&held, &tombstone) {
        (None, _) => PeerSays::Unreachable,
        (Some(Some(g)), _) => PeerSays::Holds {
            generation: g.generation,
            claim: g.recovery.as_ref(),
        },
        (Some(None), t) => PeerSays::Gone {
            tombstone: t.as_ref(),
        },
    };
    match verdict(vpg, current, says) {
        Verdict::Keep => {}
        Verdict::StandDown(cause) => {
            let d = StandDown {
                by: vpg.recovery_site.clone(),
                cause,
                since_ms: now,
                divergence: None,
            };
            tracing::warn!(vpg = %vpg.id, what = %d.describe(), "standing down: another site runs the VMs");
            let cmd = Command::StandDown {
                vpg: vpg.id.clone(),
                stand_down: d,
            };
            match site.node().propose(cmd).await {
                Ok(_) => failpoint::hit("stand-down:proposed"),
                Err(e) => tracing::warn!(vpg = %vpg.id, error = %e, "stand-down not recorded"),
            }
            // The VRAs are told on the next pass, from the committed record.
            return true;
        }
        Verdict::StandUp => {
            if let Some(op) = current.and_then(StandDown::claim).map(|c| c.op.clone()) {
                tracing::info!(vpg = %vpg.id, %op, "the peer rolled its recovery back: standing up");
                let cmd = Command::StandUp {
                    vpg: vpg.id.clone(),
                    op,
                    now_ms: now,
                };
                if let Err(e) = site.node().propose(cmd).await {
                    tracing::warn!(vpg = %vpg.id, error = %e, "stand-up not recorded");
                }
            }
            // The reconciler takes the protected role up again on the next pass.
            return true;
        }
    }
    let Some(d) = current else {
        return false;
    };
    apply(site, state, vpg, d, now).await;
    true
}

/// One look at `vpg`, which this site recovers: when the protected site deleted it
/// meanwhile (this site was cut off), this site deletes its copy too, keeping the
/// recovery disks (nothing is removed on inference). Answers whether it started that.
pub async fn follow_delete(site: &SiteManager, state: &SiteState, vpg: &Vpg, now: u64) -> bool {
    // Only when the peer answers and holds no copy.
    let (Some(None), tombstone) = peer_view(site, &vpg.protected_site, vpg) else {
        return false;
    };
    let recovering = state.recoveries.contains_key(&vpg.id) || state.tests.contains_key(&vpg.id);
    if !tandem_core::fence::follows_delete(vpg, recovering, tombstone.as_ref()) {
        return false;
    }
    tracing::warn!(vpg = %vpg.id, "the protected site deleted the VPG while this site was away: deleting this copy, keeping the recovery disks");
    let cmd = Command::BeginVpgDelete {
        id: vpg.id.clone(),
        keep_recovery_disks: true,
        now_ms: now,
    };
    match site.node().propose(cmd).await {
        Ok(_) => {
            site.record_event(
                EventCode::VpgDeleteStarted,
                Some(&vpg.id),
                format!(
                    "VPG {:?} was deleted at its protected site {} while this site was away: \
                     deleting this copy, keeping its recovery disks",
                    vpg.name, vpg.protected_site
                ),
            )
            .await;
            true
        }
        Err(e) => {
            tracing::warn!(vpg = %vpg.id, error = %e, "could not follow the peer's delete");
            false
        }
    }
}

/// What peer `site`'s last report says of `vpg`: None when it cannot be reached, else
/// its copy (None: it holds none) and, without a copy, its tombstone of it.
fn peer_view(
    site: &SiteManager,
    peer: &SiteId,
    vpg: &Vpg,
) -> (Option<Option<PeerVpgReport>>, Option<Tombstone>) {
    let live = &site.control().live;
    let held = live.peer_vpg(peer, &vpg.id);
    let tombstone = match held {
        Some(None) => live.peer_tombstone(peer, &vpg.id),
        _ => None,
    };
    (held, tombstone)
}

/// The protected VRAs of a stood-down VPG: stood down, counted, then where the cause
/// leads.
async fn apply(site: &SiteManager, state: &SiteState, vpg: &Vpg, d: &StandDown, now: u64) {
    let plans = protection::protected_plans(vpg, state).unwrap_or_default();
    let reason = d.describe();
    let mut counted = Vec::new();
    let mut waiting: Vec<&ProtectedPlan> = Vec::new();
    for plan in &plans {
        let Some(host) = state.hosts.get(&plan.host) else {
            continue;
        };
        let seen = site
            .control()
            .live
            .seen(&vpg.id, std::slice::from_ref(&plan.host));
        match seen.into_iter().next().map(|h| h.seen) {
            Some(VraSeen::Reported(r)) if r.role == Role::StoodDown => {
                counted.extend(
                    r.divergent
                        .iter()
                        .map(|(vm, volume_id, bytes)| VolumeDivergence {
                            host: plan.host.clone(),
                            vm: vm.clone(),
                            volume_id: *volume_id,
                            bytes: *bytes,
                            known: r.divergence_known,
                        }),
                );
            }
            Some(VraSeen::Reported(r)) if r.role == Role::Protected => {
                let req = v1::StandDownRequest {
                    vpg_id: vpg.id.to_string(),
                    reason: reason.clone(),
                };
                match call_vra(site, &host.vra_address, |mut c| async move {
                    c.stand_down(vra_request(req)).await
                })
                .await
                {
                    Ok(()) => tracing::info!(vpg = %vpg.id, host = %plan.host, "VRA stood down"),
                    Err(error) => {
                        tracing::warn!(vpg = %vpg.id, host = %plan.host, %error, "VRA did not stand down yet")
                    }
                }
                waiting.push(plan);
            }
            // Holds nothing of it (or another role): takes no writes to it.
            Some(VraSeen::Reported(_)) | Some(VraSeen::NotAssigned) => {}
            Some(VraSeen::Unreachable(_)) | None => waiting.push(plan),
        }
    }
    if d.divergence.is_none() {
        let patience_over = now.saturating_sub(d.since_ms) > COUNT_PATIENCE.as_millis() as u64;
        if !waiting.is_empty() && !patience_over {
            return;
        }
        for plan in waiting {
            counted.extend(unknown(&plan.host, plan));
        }
        let cmd = Command::RecordDivergence {
            vpg: vpg.id.clone(),
            divergence: counted,
            now_ms: now,
        };
        match site.node().propose(cmd).await {
            Ok(_) => tracing::warn!(vpg = %vpg.id, "stood down: divergence counted"),
            Err(e) => tracing::warn!(vpg = %vpg.id, error = %e, "divergence not recorded"),
        }
        return;
    }
    match &d.cause {
        StandDownCause::Recovered(c)
            if c.committed()
                && !c.reverse
                && c.source_shut_down
                && vpg.operation != Some(Operation::Recovered) =>
        {
            // What the handover would have done had this site heard it: the operation
            // shut the VMs down here first, so nothing runs here to keep.
            let cmd = Command::SetVpgOperation {
                id: vpg.id.clone(),
                generation: vpg.generation,
                operation: Some(Operation::Recovered),
                event: Some(new_event(
                    EventCode::RecoveryCommitted,
                    &vpg.id,
                    format!(
                        "{}: the protected VMs are removed here (their disks stay)",
                        d.describe()
                    ),
                )),
            };
            if let Err(e) = site.node().propose(cmd).await {
                tracing::warn!(vpg = %vpg.id, error = %e, "recovered state not recorded");
            }
        }
        StandDownCause::Deleted(t) => {
            forget(site, state, vpg, d, t.generation).await;
        }
        // Reverse protection arrives as the peer's turned definition; otherwise the
        // operator chooses (Needs Configuration).
        StandDownCause::Recovered(_) => {}
    }
}

/// The volumes of `plan` as of unknown divergence (their VRA could not be reached).
fn unknown(host: &HostId, plan: &ProtectedPlan) -> Vec<VolumeDivergence> {
    plan.vms
        .iter()
        .flat_map(|vm| {
            vm.volumes.iter().map(move |v| VolumeDivergence {
                host: host.clone(),
                vm: VmId::clone(&vm.vm),
                volume_id: v.volume_id,
                bytes: 0,
                known: false,
            })
        })
        .collect()
}

/// The peer deleted the VPG after running its VMs: this site's VRAs let it go (their
/// disks stay, with what diverged) and the definition goes too.
async fn forget(site: &SiteManager, state: &SiteState, vpg: &Vpg, d: &StandDown, generation: u64) {
    let mut holding = 0;
    for host in state.hosts.values() {
        let held = site
            .control()
            .live
            .vra(&host.id)
            .and_then(|o| o.vpgs.ok())
            .is_some_and(|m| m.contains_key(&vpg.id));
        if !held {
            continue;
        }
        holding += 1;
        let req = v1::UnassignRequest {
            vpg_id: vpg.id.to_string(),
            remove_recovery_data: false,
        };
        if let Err(error) = call_vra(site, &host.vra_address, |mut c| async move {
            c.unassign(vra_request(req)).await
        })
        .await
        {
            tracing::warn!(vpg = %vpg.id, host = %host.id, %error, "stood-down VPG not unassigned yet");
        }
    }
    if holding > 0 {
        return;
    }
    let plans = protection::protected_plans(vpg, state).unwrap_or_default();
    let disks = protection::disk_labels(plans.iter().flat_map(|p| &p.vms));
    let cmd = Command::DeleteVpg {
        id: vpg.id.clone(),
        now_ms: now_ms(),
    };
    if let Err(e) = site.node().propose(cmd).await {
        tracing::warn!(vpg = %vpg.id, error = %e, "stood-down VPG not removed");
        return;
    }
    site.record_event(
        EventCode::VpgDeleted,
        Some(&vpg.id),
        format!(
            "VPG {:?} removed here: site {} deleted it (generation {generation}) after it ran \
             its VMs; this site's disks of them stay at {} (written here and not held there: \
             {})",
            vpg.name,
            d.by,
            disks.join("; "),
            d.describe_divergence()
        ),
    )
    .await;
}
