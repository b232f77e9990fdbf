//! The checkpoint coordinator of the VPGs this site protects: at each VPG's interval, while
//! every protected VRA of the VPG replicates with no sync running, one barrier across them
//! (freeze all in parallel; thaw all with one id and one timestamp; a refused or failed
//! freeze aborts the others). Manual and application-consistent checkpoints take the same
//! barrier. Ids are `term << 32 | n`: a later leader's ids are always greater.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_core::DomainError;
use tandem_core::ids::{HostId, VmId, VpgId};
use tandem_core::observe::{StreamState, VraSeen};
use tandem_core::protection;
use tandem_proto::v1;
use tandem_proto::vra_convert::APP_VM_SEPARATOR;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::live::{self, PendingCheckpoint};
use super::vra_request;
use crate::error::{ApiError, ApiResult};
use crate::site::{SiteManager, now_ms};

/// How often the coordinator looks for VPGs that are due.
const SCAN: Duration = Duration::from_millis(100);
/// How long the coordinator waits for a checkpoint's markers to become durable before it
/// leaves them to the poller.
const DURABLE_WAIT_MS: u32 = 5000;

/// The kind of a checkpoint, as the journal records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Automatic,
    Manual,
    ApplicationConsistent,
}

impl Kind {
    fn to_vra(self) -> v1::VraCheckpointKind {
        match self {
            Kind::Automatic => v1::VraCheckpointKind::Automatic,
            Kind::Manual => v1::VraCheckpointKind::Manual,
            Kind::ApplicationConsistent => v1::VraCheckpointKind::ApplicationConsistent,
        }
    }
}

/// A checkpoint written to every protected VRA of its VPG.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Taken {
    pub vpg: VpgId,
    pub id: u64,
    pub timestamp_ms: u64,
    pub kind: Kind,
    pub name: String,
    pub vm: Option<VmId>,
}

/// One barrier at a time per VPG, and the id source.
#[derive(Debug, Clone, Default)]
pub struct Barriers {
    locks: Arc<Mutex<HashMap<VpgId, Arc<tokio::sync::Mutex<()>>>>>,
    counter: Arc<AtomicU64>,
}

impl Barriers {
    fn lock_of(&self, vpg: &VpgId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if locks.len() > 4096 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(vpg.clone()).or_default().clone()
    }

    fn next_id(&self, term: u64) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        (term << 32) | (n & 0xffff_ffff)
    }
}

/// Runs the automatic checkpoints of the VPGs this site protects until `cancel`.
pub async fn run(site: SiteManager, term: u64, cancel: CancellationToken) {
    // When each VPG's last automatic checkpoint started: the next is due one interval
    // later, at the interval of the definition as it is now (an edit applies at once).
    let mut last: HashMap<VpgId, Instant> = HashMap::new();
    let mut running: JoinSet<()> = JoinSet::new();
    let mut busy: HashMap<VpgId, tokio::task::AbortHandle> = HashMap::new();
    let mut scan = tokio::time::interval(SCAN);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = scan.tick() => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
        busy.retain(|_, h| !h.is_finished());
        let now = Instant::now();
        let candidates: Vec<(VpgId, Duration, Vec<HostId>)> = site.node().read_local(|s| {
            s.vpgs
                .values()
                .filter(|g| s.site_id() == Some(&g.protected_site) && g.operation.is_none())
                .filter_map(|g| {
                    let hosts = protection::protected_plans(g, s)
                        .ok()?
                        .into_iter()
                        .map(|p| p.host)
                        .collect();
                    Some((
                        g.id.clone(),
                        Duration::from_secs(g.settings.checkpoint_interval_secs.max(1)),
                        hosts,
                    ))
                })
                .collect()
        });
        last.retain(|id, _| candidates.iter().any(|(c, _, _)| c == id));
        for (vpg, interval, hosts) in candidates {
            if busy.contains_key(&vpg) {
                continue;
            }
            let due = last.get(&vpg).map_or(now, |started| *started + interval);
            if now < due || !ready(&site, &vpg, &hosts) {
                continue;
            }
            // Keep the cadence: the next is due an interval after this one was due, not
            // after the scan that noticed it (each scan's delay would stretch every
            // interval), unless this one is over an interval late (a sync held it back).
            let slot = if now.duration_since(due) < interval {
                due
            } else {
                now
            };
            last.insert(vpg.clone(), slot);
            let site = site.clone();
            let id = vpg.clone();
            let h = running.spawn(async move {
                if let Err(e) = take(&site, term, &id, Kind::Automatic, "", None).await {
                    tracing::debug!(vpg = %id, error = %e, "automatic checkpoint not taken");
                }
            });
            busy.insert(vpg, h);
        }
    }
    running.shutdown().await;
}

/// Whether every protected VRA of the VPG replicates with nothing to sync: checkpoints are
/// never taken while syncing.
fn ready(site: &SiteManager, vpg: &VpgId, hosts: &[HostId]) -> bool {
    let seen = site.control().live.seen(vpg, hosts);
    !seen.is_empty()
        && seen.iter().all(|h| {
            matches!(&h.seen, VraSeen::Reported(r)
                if r.state == StreamState::Replicating && r.sync.is_none() && !r.paused && !r.tracking)
        })
}

/// Takes one checkpoint of `vpg` through the barrier on every protected VRA.
pub async fn take(
    site: &SiteManager,
    term: u64,
    vpg: &VpgId,
    kind: Kind,
    name: &str,
    vm: Option<&VmId>,
) -> ApiResult<Taken> {
    let (targets, vms): (Vec<(HostId, String)>, _) =
        site.node().read_local(|s| -> ApiResult<_> {
            let g = s
                .vpgs
                .get(vpg)
                .ok_or_else(|| DomainError::not_found("vpg", vpg))?;
            if s.site_id() != Some(&g.protected_site) {
                return Err(DomainError::precondition(format!(
                    "VPG {vpg} is protected by the peer site: checkpoints are taken there"
                ))
                .into());
            }
            if let Some(op) = g.operation {
                return Err(DomainError::precondition(format!(
                    "VPG {vpg} is in operation {op:?}: no checkpoints until it ends"
                ))
                .into());
            }
            if let Some(d) = s.stood_down.get(vpg) {
                return Err(DomainError::precondition(format!(
                    "VPG {vpg} stood down here: {}; no checkpoints",
                    d.describe()
                ))
                .into());
            }
            if kind != Kind::Automatic {
                // An operator's checkpoint is an operation; the automatic ones go on.
                s.check_operable(vpg)?;
            }
            if let Some(vm) = vm
                && !g.vm_ids().any(|v| v == vm)
            {
                return Err(
                    DomainError::invalid("vm_id", format!("VM {vm} is not in VPG {vpg}")).into(),
                );
            }
            let plans = protection::protected_plans(g, s)?;
            let targets = plans
                .into_iter()
                .filter_map(|p| {
                    s.hosts
                        .get(&p.host)
                        .map(|h| (p.host, h.vra_address.clone()))
                })
                .collect();
            Ok((targets, live::vm_set(g)))
        })?;
    let control = site.control();
    let lock = control.barriers.lock_of(vpg);
    let _one_at_a_time = lock.lock().await;
    let id = control.barriers.next_id(term);
    let clients = targets
        .iter()
        .map(|(h, a)| control.vra(a).map(|c| (h.clone(), c)))
        .collect::<ApiResult<Vec<_>>>()?;

    let freezes = clients.iter().map(|(h, c)| {
        let mut c = c.clone();
        let req = v1::FreezeRequest {
            vpg_id: vpg.to_string(),
            checkpoint_id: id,
        };
        async move { (h, c.freeze(vra_request(req)).await) }
    });
    let frozen = futures::future::join_all(freezes).await;
    if let Some((h, Err(e))) = frozen.iter().find(|(_, r)| r.is_err()) {
        let reason = format!("host {h}: {}", e.message());
        let aborts = clients.iter().map(|(_, c)| {
            let mut c = c.clone();
            let req = v1::AbortRequest {
                vpg_id: vpg.to_string(),
                checkpoint_id: id,
            };
            async move { c.abort(vra_request(req)).await }
        });
        futures::future::join_all(aborts).await;
        return Err(DomainError::precondition(format!("checkpoint refused: {reason}")).into());
    }

    let timestamp_ms = now_ms();
    let marker_name = match vm {
        Some(vm) => format!("{name}{APP_VM_SEPARATOR}{vm}"),
        None => name.to_string(),
    };
    let thaws = clients.iter().map(|(h, c)| {
        let mut c = c.clone();
        let req = v1::ThawRequest {
            vpg_id: vpg.to_string(),
            checkpoint_id: id,
            timestamp_ms,
            kind: kind.to_vra() as i32,
            name: marker_name.clone(),
        };
        async move { (h.clone(), c.thaw(vra_request(req)).await) }
    });
    let thawed = futures::future::join_all(thaws).await;
    let mut markers = Vec::with_capacity(thawed.len());
    let mut failed = Vec::new();
    for (h, r) in thawed {
        match r {
            Ok(r) => markers.push((h, r.into_inner().marker_seq)),
            Err(e) => failed.push(format!("host {h}: {}", e.message())),
        }
    }
    if !failed.is_empty() {
        return Err(ApiError::unavailable(format!(
            "checkpoint {id} written on {} of {} VRAs: {}",
            markers.len(),
            clients.len(),
            failed.join("; ")
        )));
    }
    control.live.record_checkpoint(
        vpg,
        PendingCheckpoint {
            id,
            timestamp_ms,
            markers: markers.clone(),
            vms,
        },
    );
    // Known durable as soon as every VRA says so, not at the next poll: the actual RPO
    // shown is the checkpoint's age, not that plus the poll's period.
    let waits = clients.into_iter().filter_map(|(h, c)| {
        let seq = markers.iter().find(|(m, _)| m == &h)?.1;
        let (site, vpg) = (site.clone(), vpg.clone());
        Some(async move {
            let mut c = c;
            let req = v1::WaitDurableRequest {
                vpg_id: vpg.to_string(),
                seq,
                timeout_ms: DURABLE_WAIT_MS,
            };
            let mut r = tonic::Request::new(req);
            r.set_timeout(Duration::from_millis(u64::from(DURABLE_WAIT_MS) + 1000));
            if let Ok(d) = c.wait_durable(r).await {
                site.control()
                    .live
                    .record_acked(&vpg, &h, d.into_inner().durable_seq);
            }
        })
    });
    tokio::spawn(futures::future::join_all(waits.collect::<Vec<_>>()));
    Ok(Taken {
        vpg: vpg.clone(),
        id,
        timestamp_ms,
        kind,
        name: name.to_string(),
        vm: vm.cloned(),
    })
}
