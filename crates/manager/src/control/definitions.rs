//! Keeps the two sites' copies of each definition this site protects in line. An edit
//! that the recovery site committed and this site did not (its answer was lost, or this
//! node died between the two commits) leaves the peer a generation ahead, refusing later
//! edits: both copies are brought back to this site's definition, at a generation above
//! either. An update marker left by a node that died mid-edit is ended here too. A
//! protected VM whose volumes change in the inventory (added, grown, removed) takes its
//! VPG along: a new generation whose mirror has the inventory's volumes. A peer that
//! refuses a push is asked again with a backoff (2 s doubling to 60 s).

use std::time::Duration;

use tandem_core::state::SiteState;
use tandem_core::vpg::Vpg;

use crate::site::SiteManager;

/// How long a difference must stand before it is reconciled: longer than the poller
/// takes to see both commits of an ordinary edit.
pub const SETTLE: Duration = Duration::from_secs(2);
/// An update marker older than this was left behind by a node that died mid-edit.
pub const STALE_UPDATE_MS: u64 = 30_000;

/// One look at one VPG this site protects.
pub async fn reconcile(site: &SiteManager, state: &SiteState, vpg: &Vpg, now_ms: u64) {
    let live = &site.control().live;
    let Some(Some(peer)) = live.peer_vpg(&vpg.recovery_site, &vpg.id) else {
        return;
    };
    let update = state.updating.get(&vpg.id);
    let stale = update.is_some_and(|u| now_ms.saturating_sub(u.since_ms) > STALE_UPDATE_MS);
    if update.is_some() && !stale {
        // An edit is being stored: its own commits end the difference.
        return;
    }
    let mismatch = live.generation_mismatch(&vpg.id, vpg.generation, peer.generation);
    if stale && mismatch.is_none_or(|age| age >= SETTLE) {
        tracing::warn!(vpg = %vpg.id, "ending a definition update its node left behind");
        site.end_update(&vpg.id).await;
    }
    if mismatch.is_none() && update.is_none() {
        follow_inventory(site, state, vpg).await;
    }
    // A peer that refused is asked again after a wait that doubles with each refusal:
    // asking on every pass (passes follow each commit) floods it and its audit trail.
    if mismatch.is_some_and(|age| age >= SETTLE) && live.push_due(&vpg.id) {
        let r = site.reconcile_definition(&vpg.id, peer.generation).await;
        live.record_push(&vpg.id, r.is_ok());
        match r {
            Ok(g) => tracing::info!(
                vpg = %vpg.id, generation = g, was_here = vpg.generation, was_there = peer.generation,
                "definition reconciled with the recovery site"
            ),
            Err(e) => tracing::warn!(
                vpg = %vpg.id, here = vpg.generation, there = peer.generation, error = %e,
                "definition not reconciled yet; asking again later"
            ),
        }
    }
}

/// Edits `vpg` to its VMs' inventory when that changed, at most once per
/// [`super::live::FOLLOW_RETRY`] while it fails (the recovery site may lack room for a grown
/// volume; the VPG then shows the VM as not protected).
async fn follow_inventory(site: &SiteManager, state: &SiteState, vpg: &Vpg) {
    if vpg
        .operation
        .is_some_and(|op| op != tandem_core::status::Operation::Creating)
    {
        return;
    }
    let drift = vpg.inventory_drift(|id| state.vms.get(id));
    let live = &site.control().live;
    if drift.is_empty() || !live.follow_due(&vpg.id) {
        return;
    }
    let r = site.follow_inventory(vpg, &drift).await;
    match &r {
        Ok(v) => tracing::info!(
            vpg = %vpg.id, generation = v.vpg.generation, ?drift,
            "the VPG follows its VMs' inventory"
        ),
        Err(e) => tracing::warn!(
            vpg = %vpg.id, ?drift, error = %e, "the VPG cannot follow its VMs' inventory yet"
        ),
    }
    live.record_follow(&vpg.id, r.map(|_| ()).map_err(|e| e.to_string()));
}
