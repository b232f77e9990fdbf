//! On the leader: turns each VPG's status transitions into events (EV0030) and keeps when
//! each alert was raised, both from the one status snapshot.

use std::time::{Duration, Instant};

use tandem_core::events::EventCode;
use tokio_util::sync::CancellationToken;

use super::every_tick;
use crate::site::{SiteManager, now_ms};

/// A new leader's first statuses are a baseline, not transitions: until the poller has
/// seen every VRA and peer (their staleness bound), what it shows may still be filling in.
pub const BASELINE: Duration = Duration::from_secs(5);

/// Watches statuses until `cancel`.
pub async fn run(site: SiteManager, cancel: CancellationToken) {
    let started = Instant::now();
    every_tick(&cancel, || step(&site, started)).await;
}

async fn step(site: &SiteManager, started: Instant) {
    let now = now_ms();
    let live = &site.control().live;
    let statuses = site.node().read_local(|s| {
        s.vpgs
            .values()
            .map(|g| (g.id.clone(), g.name.clone(), live.status(s, g, now)))
            .collect::<Vec<_>>()
    });
    let changes = live.note_statuses(&statuses, now);
    if started.elapsed() < BASELINE {
        return;
    }
    for (vpg, name, from, to) in changes {
        site.record_event(
            EventCode::StatusChanged,
            Some(&vpg),
            format!(
                "VPG {name:?}: {} / {} -> {} / {} ({})",
                from.status, from.substatus, to.status, to.substatus, to.alert
            ),
        )
        .await;
    }
}
