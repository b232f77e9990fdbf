//! The seed's replication pause time, on the protected site's leader: a sync that would
//! leave a VPG's journal without ten minutes of checkpoints pauses its protection for the
//! VPG's replication pause time ("Site Manager paused protection"), so that the operator
//! can enlarge the journal first; then protection resumes by itself and the sync goes on.
//! The rule is `tandem_core::observe::sync_pause`; this applies it.

use tandem_core::events::EventCode;
use tandem_core::ids::VpgId;
use tandem_core::observe::{LiveStatus, SYNC_MIN_HISTORY_SECS, SyncPause, sync_pause};
use tandem_core::state::Command;
use tandem_core::vpg::Vpg;

use crate::site::SiteManager;

/// One look at every VPG this site protects (`protected`), from the monitor's status
/// snapshot.
pub async fn step(
    site: &SiteManager,
    protected: &[Vpg],
    statuses: &[(VpgId, String, LiveStatus)],
    now_ms: u64,
) {
    let live = &site.control().live;
    for (id, name, st) in statuses {
        let Some(vpg) = protected.iter().find(|g| &g.id == id) else {
            continue;
        };
        if st.observation.sync.is_none() {
            live.note_sync_pause(id, false);
        }
        match sync_pause(vpg, st, live.sync_paused_already(id), now_ms) {
            SyncPause::Nothing => {}
            SyncPause::Pause { until_ms } => {
                let cmd = Command::SetManagerPause {
                    id: id.clone(),
                    until_ms,
                };
                if let Err(e) = site.node().propose(cmd).await {
                    tracing::warn!(vpg = %id, error = %e, "replication pause not stored");
                    continue;
                }
                live.note_sync_pause(id, true);
                let secs = vpg.settings.replication_pause_secs;
                tracing::warn!(vpg = %id, secs, "sync paused: the journal is short of history");
                site.record_event(
                    EventCode::ProtectionPausedByManager,
                    Some(id),
                    format!(
                        "VPG {name:?}: protection paused by the site manager for {secs} s: the \
                         journal is at its hard limit with {} s of checkpoints, and the sync \
                         would leave fewer than {SYNC_MIN_HISTORY_SECS} s; enlarge the journal \
                         or resume to sync now",
                        st.figures.history_held_secs
                    ),
                )
                .await;
            }
            SyncPause::End => {
                let by_time = !vpg.paused;
                let cmd = Command::SetManagerPause {
                    id: id.clone(),
                    until_ms: 0,
                };
                if let Err(e) = site.node().propose(cmd).await {
                    tracing::warn!(vpg = %id, error = %e, "replication pause not ended");
                    continue;
                }
                if by_time {
                    site.record_event(
                        EventCode::ProtectionResumedByManager,
                        Some(id),
                        format!(
                            "VPG {name:?}: protection resumed by the site manager after the \
                             replication pause time ({} s); the sync goes on",
                            vpg.settings.replication_pause_secs
                        ),
                    )
                    .await;
                }
            }
        }
    }
}
