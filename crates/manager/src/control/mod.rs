//! The control loop: controllers that run only on the site's leader and close the gap
//! between the replicated definitions (what should be) and what the VRAs report (what is).
//! Level-triggered and restartable from the replicated state alone: a new leader polls,
//! reconciles and resumes checkpoints within a few seconds.
//!
//! - [`poll`]: reads every VRA of this site and every peer site's report into [`Live`];
//! - [`reconcile`]: assigns this site's VRAs from the plans of `tandem_core::protection`;
//! - [`checkpoints`]: the checkpoint coordinator of the VPGs this site protects;
//! - [`fence`]: stands down a VPG this site protects once another site runs its VMs
//!   (recovered or deleted there), and follows where the other site's state leads;
//! - [`definitions`]: keeps both sites' copies of each definition in line, and each VPG
//!   in line with its VMs' inventory;
//! - [`sync_pause`]: the replication pause time of a sync that would empty a journal;
//! - [`recovery`]: recovery operations this site runs (the failover test).
//!
//! Leader-only requests (live status, barriers) reach the leader through
//! [`LeaderRequest`], forwarded by followers over `ManagerInternal.LeaderCall`.

pub mod checkpoints;
pub mod definitions;
pub mod fence;
pub mod live;
pub mod monitor;
pub mod poll;
pub mod reconcile;
pub mod recovery;
pub mod sync_pause;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_core::DomainError;
use tandem_core::alerts::AlertKind;
use tandem_core::ids::{HostId, SiteId, VmId, VpgId};
use tandem_core::observe::{LiveStatus, PeerReport};
use tandem_core::state::SiteState;
use tandem_proto::v1;
use tandem_proto::v1::vra_control_client::VraControlClient;
use tandem_store::Role;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

pub use live::Live;

use crate::error::ApiResult;
use crate::net::Connector;
use crate::site::SiteManager;

/// How often the leader polls its VRAs and peers, and reconciles.
pub const TICK: Duration = Duration::from_secs(1);
/// How often the poller reads the VRAs and the peers: the lag of every live figure.
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// A controller that also acts on committed changes waits this long after one, so that a
/// burst of commits (an operation on many VPGs) costs one pass.
pub const CHANGE_DEBOUNCE: Duration = Duration::from_millis(50);
/// The longest a VRA control call may take before the VRA counts as unreachable.
pub const VRA_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long before a paired site is given this site's CAs again.
pub const TRUST_RETRY: Duration = Duration::from_secs(10);

/// A request that only the leader can answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderRequest {
    /// Live status of these VPGs (all when empty).
    Live { vpgs: Vec<VpgId> },
    /// This site's report for a peer site.
    PeerReport { from: SiteId },
    /// A named checkpoint in each VPG.
    AddCheckpoint {
        vpgs: Vec<VpgId>,
        name: String,
        kind: checkpoints::Kind,
        vm: Option<VmId>,
    },
    /// A delta sync of every volume of each VPG.
    ForceSync { vpgs: Vec<VpgId> },
    /// The active alerts (of one VPG, or all).
    Alerts { vpg: Option<VpgId> },
    /// What a rotation of the site's CA waits for.
    CaRotationWait,
    /// Whether paired site `site` answers about VPG `vpg` (recent enough to count).
    PeerReachable { site: SiteId, vpg: VpgId },
}

/// The leader's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderResponse {
    Live(Vec<(VpgId, LiveStatus)>),
    PeerReport(PeerReport),
    Checkpoints(Vec<checkpoints::Taken>),
    Done,
    Alerts(Vec<ActiveAlert>),
    /// What the rotation waits for (None: nothing, or none under way).
    CaRotationWait(Option<String>),
    Reachable(bool),
}

/// One raised alert of one VPG.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActiveAlert {
    pub vpg: VpgId,
    pub vpg_name: String,
    pub kind: AlertKind,
    pub detail: Vec<String>,
    pub since_ms: u64,
}

/// The controllers' shared parts: observed state, VRA channels, the checkpoint id source.
#[derive(Clone, Default)]
pub struct Control {
    pub live: Live,
    connector: Connector,
    barriers: checkpoints::Barriers,
    /// When this node last renewed each VRA's certificate: a status read before then
    /// still shows the old one.
    renewed: Arc<Mutex<HashMap<HostId, Instant>>>,
    /// What a CA rotation last waited for (logged when it changes).
    rotation_waits_for: Arc<Mutex<Option<String>>>,
    /// When each paired site was last given this site's CAs, and which.
    trust_given: Arc<Mutex<HashMap<SiteId, (String, Instant)>>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

impl Control {
    pub fn new(connector: Connector) -> Self {
        Self {
            live: Live::default(),
            connector,
            barriers: checkpoints::Barriers::default(),
            renewed: Arc::default(),
            rotation_waits_for: Arc::default(),
            trust_given: Arc::default(),
        }
    }

    /// Notes that paired site `peer` is to be given the CAs `key` names now; answers false
    /// when it was given them less than [`TRUST_RETRY`] ago (its report may not show them
    /// yet, or it refused: asking every pass would only repeat the answer).
    pub fn start_giving_trust(&self, peer: &SiteId, key: &str) -> bool {
        let mut given = self.trust_given.lock().unwrap_or_else(|e| e.into_inner());
        if given
            .get(peer)
            .is_some_and(|(k, at)| k == key && at.elapsed() < TRUST_RETRY)
        {
            return false;
        }
        given.insert(peer.clone(), (key.to_string(), Instant::now()));
        true
    }

    /// Notes what a CA rotation waits for (None: nothing); answers whether that changed.
    pub fn rotation_waits_for(&self, what: Option<&str>) -> bool {
        let mut last = self
            .rotation_waits_for
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.as_deref() == what {
            return false;
        }
        *last = what.map(str::to_string);
        true
    }

    /// Notes a renewal of `host`'s VRA certificate now; answers false when one was made
    /// after `seen` (the status read at `seen` does not show it yet: not again).
    pub fn start_renewal(&self, host: &HostId, seen: Instant) -> bool {
        let mut renewed = self.renewed.lock().unwrap_or_else(|e| e.into_inner());
        if renewed.get(host).is_some_and(|at| *at >= seen) {
            return false;
        }
        renewed.insert(host.clone(), Instant::now());
        true
    }

    /// The control client of the VRA at `addr`.
    pub fn vra(&self, addr: &str) -> ApiResult<VraControlClient<Channel>> {
        Ok(VraControlClient::new(self.connector.own_site(addr)?)
            .max_decoding_message_size(tandem_proto::MAX_MESSAGE_BYTES))
    }
}

/// Calls `step` once per [`TICK`] until `cancel`; a slow step delays the next tick.
pub async fn every_tick<F, Fut>(cancel: &CancellationToken, step: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    every(TICK, cancel, None, step).await;
}

/// Calls `step` once per `period` until `cancel`, and also soon after each change
/// `changes` signals (at most one extra step per [`CHANGE_DEBOUNCE`]); a slow step delays
/// the next one.
pub async fn every<F, Fut>(
    period: Duration,
    cancel: &CancellationToken,
    mut changes: Option<tokio::sync::watch::Receiver<u64>>,
    mut step: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = async {
            match changes.as_mut() {
                Some(c) => {
                    if c.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(CHANGE_DEBOUNCE).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            () = changed => tick.reset(),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = step() => {}
        }
    }
}

/// Calls the control service of the VRA at `addr`; the failure as text.
pub async fn call_vra<F, Fut, T>(site: &SiteManager, addr: &str, call: F) -> Result<(), String>
where
    F: FnOnce(VraControlClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    call_vra_status(site, addr, call)
        .await
        .map_err(|s| s.message().to_string())
}

/// Calls the control service of the VRA at `addr`; the failure as the VRA's status (a
/// channel that cannot be made is UNAVAILABLE).
pub async fn call_vra_status<F, Fut, T>(
    site: &SiteManager,
    addr: &str,
    call: F,
) -> Result<(), tonic::Status>
where
    F: FnOnce(VraControlClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match site.control().vra(addr) {
        Ok(c) => call(c).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    }
}

/// A VRA call bounded by [`VRA_CALL_TIMEOUT`].
pub fn vra_request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(VRA_CALL_TIMEOUT);
    r
}

/// Runs the controllers whenever this node leads, until `shutdown`.
pub async fn run(site: SiteManager, shutdown: CancellationToken) {
    let store = site.node().store();
    let mut changes = store.watch_metrics();
    loop {
        let m = store.metrics();
        if m.role == Role::Leader {
            let term = m.term;
            let leading = shutdown.child_token();
            let tasks = TaskTracker::new();
            tracing::info!(term, "leading: starting controllers");
            tasks.spawn(poll::run(site.clone(), leading.clone()));
            tasks.spawn(reconcile::run(site.clone(), leading.clone()));
            tasks.spawn(checkpoints::run(site.clone(), term, leading.clone()));
            tasks.spawn(monitor::run(site.clone(), leading.clone()));
            tasks.spawn(recovery::run(site.clone(), leading.clone()));
            tasks.close();
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    r = changes.changed() => if r.is_err() { break },
                }
                let now = store.metrics();
                if now.role != Role::Leader || now.term != term {
                    break;
                }
            }
            leading.cancel();
            tasks.wait().await;
            site.control().live.clear();
            tracing::info!(term, "stopped leading: controllers stopped");
        }
        if shutdown.is_cancelled() {
            return;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

/// Answers a leader request on this node (the leader).
pub async fn answer(site: &SiteManager, req: LeaderRequest) -> ApiResult<LeaderResponse> {
    let control = site.control();
    match req {
        LeaderRequest::Live { vpgs } => {
            let now = crate::site::now_ms();
            let statuses = site.node().read_local(|s| {
                s.vpgs
                    .values()
                    .filter(|g| vpgs.is_empty() || vpgs.contains(&g.id))
                    .map(|g| (g.id.clone(), control.live.status(s, g, now)))
                    .collect()
            });
            Ok(LeaderResponse::Live(statuses))
        }
        LeaderRequest::PeerReport { from } => Ok(LeaderResponse::PeerReport(
            site.node()
                .read_local(|s| control.live.report_for(s, &from)),
        )),
        LeaderRequest::AddCheckpoint {
            vpgs,
            name,
            kind,
            vm,
        } => {
            let term = site.node().store().metrics().term;
            let mut taken = Vec::with_capacity(vpgs.len());
            for vpg in vpgs {
                taken.push(checkpoints::take(site, term, &vpg, kind, &name, vm.as_ref()).await?);
            }
            Ok(LeaderResponse::Checkpoints(taken))
        }
        LeaderRequest::PeerReachable { site: peer, vpg } => Ok(LeaderResponse::Reachable(
            control.live.peer_vpg(&peer, &vpg).is_some(),
        )),
        LeaderRequest::CaRotationWait => Ok(LeaderResponse::CaRotationWait(
            control
                .rotation_waits_for
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )),
        LeaderRequest::Alerts { vpg } => {
            let now = crate::site::now_ms();
            let alerts = site.node().read_local(|s| {
                s.vpgs
                    .values()
                    .filter(|g| vpg.as_ref().is_none_or(|v| v == &g.id))
                    .flat_map(|g| {
                        let st = control.live.status(s, g, now);
                        tandem_core::alerts::alerts(&st.observation)
                            .into_iter()
                            .map(|kind| ActiveAlert {
                                vpg: g.id.clone(),
                                vpg_name: g.name.clone(),
                                kind,
                                detail: st.figures.problems.clone(),
                                since_ms: control.live.alert_since(&g.id, kind, now),
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect()
            });
            Ok(LeaderResponse::Alerts(alerts))
        }
        LeaderRequest::ForceSync { vpgs } => {
            let targets = site.node().read_local(|s| {
                vpgs.iter()
                    .map(|id| force_sync_targets(s, id))
                    .collect::<ApiResult<Vec<_>>>()
            })?;
            for (vpg, addrs) in targets {
                let calls = addrs.iter().map(|addr| {
                    let req = v1::ForceSyncRequest {
                        vpg_id: vpg.to_string(),
                        ..Default::default()
                    };
                    call_vra(site, addr, |mut c| async move {
                        c.force_sync(vra_request(req)).await
                    })
                });
                for (addr, r) in addrs.iter().zip(futures::future::join_all(calls).await) {
                    r.map_err(|e| {
                        crate::error::ApiError::unavailable(format!(
                            "force sync of VPG {vpg}: protected VRA at {addr}: {e}"
                        ))
                    })?;
                }
                tracing::info!(%vpg, "force sync started");
            }
            Ok(LeaderResponse::Done)
        }
    }
}

/// The protected VRAs to ask for a force sync of `id`, or why it cannot run now.
fn force_sync_targets(s: &SiteState, id: &VpgId) -> ApiResult<(VpgId, Vec<String>)> {
    let g = s
        .vpgs
        .get(id)
        .ok_or_else(|| DomainError::not_found("vpg", id))?;
    if Some(&g.protected_site) != s.site_id() {
        return Err(DomainError::precondition(format!(
            "VPG {id} is protected by site {}: force sync it there",
            g.protected_site
        ))
        .into());
    }
    if g.paused {
        return Err(
            DomainError::precondition(format!("VPG {id} is paused: resume it first")).into(),
        );
    }
    s.check_operable(id)?;
    if let Some(op) = g.operation {
        return Err(DomainError::precondition(format!(
            "VPG {id} is in operation {op:?}: a force sync must wait for it"
        ))
        .into());
    }
    let plans = tandem_core::protection::protected_plans(g, s)
        .map_err(|e| DomainError::precondition(format!("VPG {id}: {e}")))?;
    let addrs = plans
        .iter()
        .filter_map(|p| s.hosts.get(&p.host).map(|h| h.vra_address.clone()))
        .collect();
    Ok((id.clone(), addrs))
}

/// The live status of `vpgs` (all when empty) from the leader; an empty map when no leader
/// answers (the caller then shows definitions alone).
pub async fn live_statuses(site: &SiteManager, vpgs: Vec<VpgId>) -> HashMap<VpgId, LiveStatus> {
    match site.leader_call(LeaderRequest::Live { vpgs }).await {
        Ok(LeaderResponse::Live(v)) => v.into_iter().collect(),
        Ok(_) => HashMap::new(),
        Err(e) => {
            tracing::debug!(error = %e, "no live status from the leader");
            HashMap::new()
        }
    }
}

/// Lists the checkpoints of a VPG this site recovers, from its recovery VRAs' journals: a
/// checkpoint is in every journal of the VPG or it is not listed; usable only when usable
/// in every journal.
pub async fn recovery_checkpoints(
    site: &SiteManager,
    vpg: &VpgId,
) -> ApiResult<Vec<v1::VraCheckpoint>> {
    let addrs = site.node().read_local(|s| {
        let g = s.vpgs.get(vpg)?;
        let plans = tandem_core::protection::recovery_plans(g, s).ok()?;
        Some(
            plans
                .iter()
                .filter_map(|p| s.hosts.get(&p.host).map(|h| h.vra_address.clone()))
                .collect::<Vec<_>>(),
        )
    });
    let Some(addrs) = addrs else {
        return Err(tandem_core::DomainError::not_found("vpg", vpg).into());
    };
    let control = site.control();
    let calls = addrs.iter().map(|a| {
        let client = control.vra(a);
        let id = vpg.to_string();
        async move {
            let mut c = client?;
            c.list_checkpoints(vra_request(v1::ListCheckpointsRequest { vpg_id: id }))
                .await
                .map(|r| r.into_inner().checkpoints)
                .map_err(|s| {
                    crate::error::ApiError::unavailable(format!(
                        "recovery VRA at {a}: {}",
                        s.message()
                    ))
                })
        }
    });
    let lists = futures::future::try_join_all(calls).await?;
    let mut lists = lists.into_iter();
    let Some(first) = lists.next() else {
        return Ok(Vec::new());
    };
    let mut merged: Vec<v1::VraCheckpoint> = first;
    for other in lists {
        let by_id: HashMap<u64, &v1::VraCheckpoint> =
            other.iter().map(|c| (c.checkpoint_id, c)).collect();
        merged.retain_mut(|c| match by_id.get(&c.checkpoint_id) {
            Some(o) => {
                c.durable &= o.durable;
                c.usable &= o.usable;
                true
            }
            None => false,
        });
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paired_site_is_given_the_same_cas_once_per_retry_period_and_new_ones_at_once() {
        let control = Control::new(Connector::default());
        let (b, c) = (
            SiteId::minted("site-b".into()),
            SiteId::minted("site-c".into()),
        );
        assert!(control.start_giving_trust(&b, "old,new"));
        assert!(
            !control.start_giving_trust(&b, "old,new"),
            "asked again at once"
        );
        assert!(control.start_giving_trust(&c, "old,new"), "another site");
        assert!(control.start_giving_trust(&b, "new"), "other CAs");
        assert!(!control.start_giving_trust(&b, "new"));
    }
}
