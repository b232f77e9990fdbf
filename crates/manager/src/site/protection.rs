//! Operations on running protection: checkpoints (listed and added), pause and resume,
//! force sync, and the report a peer site reads.

use super::*;

/// A checked checkpoint listing query.
#[derive(Debug, Clone)]
pub struct CheckpointQuery {
    pub vpg: VpgId,
    pub from_ms: u64,
    pub to_ms: u64,
    pub named_only: bool,
    pub kind: Option<v1::CheckpointKind>,
    pub page_size: usize,
    /// Continue after this checkpoint id (the list is newest first, ids descend).
    pub after: Option<u64>,
    /// The query as received, to pass on to the recovery site.
    pub wire: v1::ListCheckpointsQuery,
}

/// Filters and pages the checkpoints of one VPG (the VRA's list, oldest first).
pub fn page_checkpoints(list: Vec<v1::VraCheckpoint>, q: &CheckpointQuery) -> v1::CheckpointList {
    use tandem_proto::vra_convert::{checkpoint_kind, split_marker_name};
    let matching: Vec<v1::Checkpoint> = list
        .into_iter()
        .rev()
        .filter(|c| c.timestamp_ms >= q.from_ms && (q.to_ms == 0 || c.timestamp_ms <= q.to_ms))
        .filter(|c| !q.named_only || !c.name.is_empty())
        .filter(|c| q.kind.is_none_or(|k| checkpoint_kind(c.kind) == k))
        .map(|c| {
            let (name, vm_id) = split_marker_name(&c.name);
            v1::Checkpoint {
                id: c.checkpoint_id,
                timestamp_ms: c.timestamp_ms,
                kind: checkpoint_kind(c.kind) as i32,
                name,
                vm_id,
                usable: c.durable && c.usable,
            }
        })
        .collect();
    let total = matching.len() as u32;
    let mut rest = matching
        .into_iter()
        .skip_while(|c| q.after.is_some_and(|a| c.id >= a))
        .peekable();
    let mut checkpoints = Vec::with_capacity(q.page_size.min(1000));
    while checkpoints.len() < q.page_size {
        match rest.next() {
            Some(c) => checkpoints.push(c),
            None => break,
        }
    }
    let next_page_token = match (rest.peek(), checkpoints.last()) {
        (Some(_), Some(last)) => last.id.to_string(),
        _ => String::new(),
    };
    v1::CheckpointList {
        checkpoints,
        next_page_token,
        total,
    }
}

impl SiteManager {
    /// This site's report for the peer `from` (from the leader's memory).
    pub async fn peer_report(&self, from: SiteId) -> ApiResult<tandem_core::observe::PeerReport> {
        let known = self.node.read_local(|s| s.peers.contains_key(&from));
        if !known {
            return Err(DomainError::precondition(format!(
                "site {from} is not paired with this site"
            ))
            .into());
        }
        match self.leader_call(LeaderRequest::PeerReport { from }).await? {
            LeaderResponse::PeerReport(r) => Ok(r),
            _ => Err(ApiError::internal("unexpected leader answer")),
        }
    }

    /// The checkpoints of a VPG, from the recovery site's journals: read here when this
    /// site recovers it, else asked of the recovery site (`forward`).
    pub async fn checkpoints(
        &self,
        q: CheckpointQuery,
        forward: bool,
    ) -> ApiResult<v1::CheckpointList> {
        let (protects, peer) = self
            .node
            .read({
                let id = q.vpg.clone();
                move |s| -> ApiResult<(bool, Option<PeerSite>)> {
                    let g = s
                        .vpgs
                        .get(&id)
                        .ok_or_else(|| DomainError::not_found("vpg", &id))?;
                    Ok((
                        s.site_id() == Some(&g.protected_site),
                        s.peers.get(&g.recovery_site).cloned(),
                    ))
                }
            })
            .await??;
        if !protects {
            let list = control::recovery_checkpoints(self, &q.vpg).await?;
            return Ok(page_checkpoints(list, &q));
        }
        if !forward {
            return Err(DomainError::precondition(format!(
                "this site protects VPG {}: its checkpoints are listed at the recovery site",
                q.vpg
            ))
            .into());
        }
        let peer =
            peer.ok_or_else(|| DomainError::precondition("the recovery site is not paired"))?;
        self.peer_call(&peer, |mut c| {
            let wire = q.wire.clone();
            async move { c.list_checkpoints(wire).await }
        })
        .await
    }

    /// Takes a named checkpoint in each VPG (one barrier each), on the leader.
    /// Pauses (or resumes) the protection of VPGs this site protects. Every VPG is checked
    /// before any changes; the reconciler then pauses or resumes their protected VRAs.
    pub async fn set_paused(&self, vpgs: Vec<VpgId>, paused: bool) -> ApiResult<()> {
        let check = vpgs.clone();
        self.node
            .read(move |s| check.iter().try_for_each(|id| s.check_pausable(id)))
            .await??;
        for id in vpgs {
            let r = self
                .node
                .propose(Command::SetVpgPaused {
                    id: id.clone(),
                    paused,
                })
                .await;
            let kind = if paused {
                TaskKind::PauseVpg
            } else {
                TaskKind::ResumeVpg
            };
            self.instant_task(kind, Some(&id), &r).await;
            r?;
            let (code, what) = if paused {
                (
                    EventCode::ProtectionPaused,
                    "protection paused by the operator",
                )
            } else {
                (
                    EventCode::ProtectionResumed,
                    "protection resumed by the operator",
                )
            };
            self.record_event(code, Some(&id), what.into()).await;
        }
        Ok(())
    }

    /// Starts a delta sync of every volume of these VPGs (the leader asks their VRAs).
    pub async fn force_sync(&self, vpgs: Vec<VpgId>) -> ApiResult<()> {
        match self
            .leader_call(LeaderRequest::ForceSync { vpgs: vpgs.clone() })
            .await?
        {
            LeaderResponse::Done => {
                for id in &vpgs {
                    // Running until the delta sync has run and the VPG is level again.
                    self.start_task(
                        TaskKind::ForceSync,
                        Some(id),
                        None,
                        "delta sync of every volume".into(),
                    )
                    .await;
                    self.record_event(
                        EventCode::ForceSyncStarted,
                        Some(id),
                        "force sync started: a delta sync of every volume".into(),
                    )
                    .await;
                }
                Ok(())
            }
            _ => Err(ApiError::internal("unexpected leader answer")),
        }
    }

    pub async fn add_checkpoint(
        &self,
        vpgs: Vec<VpgId>,
        name: String,
        kind: control::checkpoints::Kind,
        vm: Option<tandem_core::ids::VmId>,
    ) -> ApiResult<Vec<control::checkpoints::Taken>> {
        match self
            .leader_call(LeaderRequest::AddCheckpoint {
                vpgs,
                name,
                kind,
                vm,
            })
            .await?
        {
            LeaderResponse::Checkpoints(t) => {
                for c in &t {
                    self.instant_task(TaskKind::AddCheckpoint, Some(&c.vpg), &Ok(()))
                        .await;
                    self.record_event(
                        EventCode::CheckpointAdded,
                        Some(&c.vpg),
                        format!("checkpoint {:?} added ({:?}, id {})", c.name, c.kind, c.id),
                    )
                    .await;
                }
                Ok(t)
            }
            _ => Err(ApiError::internal("unexpected leader answer")),
        }
    }
}
