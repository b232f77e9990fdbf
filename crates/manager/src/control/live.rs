//! The leader's observed state: what each VRA of this site and each peer site last
//! reported, and what the checkpoint coordinator knows, held in memory (high-frequency
//! figures never go through Raft) and rebuilt after a leader change. [`Live::status`] turns
//! it, with a definition, into the one status snapshot of a VPG.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tandem_core::alerts::{self, AlertKind};
use tandem_core::ids::{HostId, SiteId, VmId, VpgId};
use tandem_core::observe::{
    self, HostSeen, LiveInputs, LiveStatus, PeerReport, PeerVpgReport, PlanError, VraSeen,
    VraVpgReport,
};
use tandem_core::protection;
use tandem_core::state::SiteState;
use tandem_core::vpg::Vpg;

/// A peer whose last report is older than this counts as unreachable.
pub const PEER_STALE: Duration = Duration::from_secs(4);
/// A peer whose calls failed this many times in a row counts as unreachable, however
/// recent its last report (a refused connection is known at once; a timeout takes
/// [`PEER_STALE`]).
pub const PEER_FAILURES: u32 = 2;
/// A VRA whose last status is older than this counts as unreachable.
pub const VRA_STALE: Duration = Duration::from_secs(4);

/// The last status read from one VRA.
#[derive(Debug, Clone)]
pub struct VraObservation {
    pub at: Instant,
    /// The VPGs it holds, or why it could not be read.
    pub vpgs: Result<HashMap<VpgId, VraVpgReport>, String>,
    /// The bandwidth limits it applies, by peer site id (none when it could not be read).
    pub limits: HashMap<String, u64>,
    /// The NBD exports it serves (none when it could not be read).
    pub exports: HashSet<String>,
    /// The sites whose CAs it trusts (its own too): site id to the CAs' fingerprints,
    /// sorted and joined by commas.
    pub trusted: HashMap<String, String>,
    /// Until when its certificate is valid (ms since the epoch; 0: unknown).
    pub cert_valid_until_ms: u64,
    /// The fingerprint of the CA that issued its certificate (empty: unknown).
    pub cert_issuer: String,
}

/// What one status read of a VRA yields.
#[derive(Debug, Clone, Default)]
pub struct VraPoll {
    pub vpgs: HashMap<VpgId, VraVpgReport>,
    pub limits: HashMap<String, u64>,
    pub exports: HashSet<String>,
    pub trusted: HashMap<String, String>,
    pub cert_valid_until_ms: u64,
    pub cert_issuer: String,
}

/// The last report of one peer site.
#[derive(Debug, Clone)]
struct PeerObservation {
    ok_at: Option<Instant>,
    report: PeerReport,
    error: Option<String>,
    /// Calls failed in a row since the last answer.
    failures: u32,
}

impl PeerObservation {
    /// Answered recently, and not failing since.
    fn reachable(&self) -> bool {
        self.ok_at.is_some_and(|t| t.elapsed() < PEER_STALE) && self.failures < PEER_FAILURES
    }
}

/// A checkpoint thawed on every VRA of its VPG, not yet seen durable everywhere.
#[derive(Debug, Clone)]
pub struct PendingCheckpoint {
    pub id: u64,
    pub timestamp_ms: u64,
    /// The marker's stream sequence on each protected VRA.
    pub markers: Vec<(HostId, u64)>,
    /// The VMs of the VPG when it was taken ([`vm_set`]).
    pub vms: Vec<VmId>,
}

/// The VMs of a VPG, sorted: a checkpoint is a recovery point of exactly these (the seed:
/// adding or removing VMs leaves the checkpoints before unusable).
pub fn vm_set(vpg: &Vpg) -> Vec<VmId> {
    let mut vms: Vec<VmId> = vpg.vm_ids().cloned().collect();
    vms.sort();
    vms
}

#[derive(Debug, Default)]
struct CoordinatorView {
    pending: Vec<PendingCheckpoint>,
    /// The newest checkpoint durable everywhere (id, stamped ms) and its VMs.
    durable: Option<((u64, u64), Vec<VmId>)>,
}

impl CoordinatorView {
    /// `host`'s stream is durable up to `acked_seq`: its markers at or below are durable
    /// there, and the newest checkpoint durable on every host becomes the VPG's.
    fn acked(&mut self, host: &HostId, acked_seq: u64) {
        for p in &mut self.pending {
            p.markers
                .retain(|(h, seq)| !(h == host && acked_seq >= *seq));
        }
        if let Some(newest) = self
            .pending
            .iter()
            .filter(|p| p.markers.is_empty())
            .max_by_key(|p| p.timestamp_ms)
            .map(|p| ((p.id, p.timestamp_ms), p.vms.clone()))
        {
            self.pending.retain(|p| p.timestamp_ms > newest.0.1);
            self.durable = Some(newest);
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    vras: HashMap<HostId, VraObservation>,
    peers: HashMap<SiteId, PeerObservation>,
    checkpoints: HashMap<VpgId, CoordinatorView>,
    /// The last assignment a VRA refused, per host and VPG (cleared when one succeeds).
    assign_errors: HashMap<(HostId, VpgId), PlanError>,
    /// When each active alert was first seen raised.
    alerts_since: HashMap<(VpgId, AlertKind), u64>,
    /// A VPG whose two sites' generations differ: (here, there) and since when.
    generation_mismatch: HashMap<VpgId, ((u64, u64), Instant)>,
    /// A VPG that could not follow its VMs' inventory: when it was tried, and why not.
    follow_failed: HashMap<VpgId, (Instant, String)>,
    /// VPGs whose running sync the site manager paused once already.
    sync_paused: HashSet<VpgId>,
    /// A VPG whose definition the peer refused: when to push it again, and the wait after
    /// that (doubling, up to [`PUSH_RETRY_MAX`]).
    push_refused: HashMap<VpgId, (Instant, Duration)>,
}

/// How long after a failed attempt the definitions controller tries again to bring a VPG
/// up to date with its inventory (each attempt is an edit on both sites, with a task).
pub const FOLLOW_RETRY: Duration = Duration::from_secs(10);

/// The first wait before a definition the peer refused is pushed again.
pub const PUSH_RETRY_MIN: Duration = Duration::from_secs(2);
/// The longest wait between two pushes of a definition the peer keeps refusing.
pub const PUSH_RETRY_MAX: Duration = Duration::from_secs(60);

/// Shared by the controllers and the API of one node; filled only while it leads.
#[derive(Debug, Clone, Default)]
pub struct Live {
    inner: Arc<Mutex<Inner>>,
}

/// Which side of a VPG this site is, and the hosts of its own side.
pub fn own_hosts(s: &SiteState, vpg: &Vpg) -> (bool, Result<Vec<HostId>, PlanError>) {
    let protects = s.site_id() == Some(&vpg.protected_site);
    let hosts = if protects {
        protection::protected_plans(vpg, s).map(|p| p.into_iter().map(|p| p.host).collect())
    } else {
        protection::recovery_plans(vpg, s).map(|p| p.into_iter().map(|p| p.host).collect())
    };
    (protects, hosts.map_err(|e| PlanError::of_plan(&e)))
}

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets everything (this node stopped leading: its figures would go stale).
    pub fn clear(&self) {
        *self.lock() = Inner::default();
    }

    pub fn record_vra(&self, host: HostId, poll: Result<VraPoll, String>) {
        let (vpgs, p) = match poll {
            Ok(mut p) => (Ok(std::mem::take(&mut p.vpgs)), p),
            Err(e) => (Err(e), VraPoll::default()),
        };
        let mut inner = self.lock();
        if let Ok(reports) = &vpgs {
            for (vpg, view) in inner.checkpoints.iter_mut() {
                if let Some(r) = reports.get(vpg) {
                    view.acked(&host, r.acked_seq);
                }
            }
        }
        inner.vras.insert(
            host,
            VraObservation {
                at: Instant::now(),
                vpgs,
                limits: p.limits,
                exports: p.exports,
                trusted: p.trusted,
                cert_valid_until_ms: p.cert_valid_until_ms,
                cert_issuer: p.cert_issuer,
            },
        );
    }

    /// Notes the statuses the monitor computed: keeps when each alert was raised (the
    /// status changes themselves are recorded in the replicated state).
    pub fn note_statuses(&self, statuses: &[(VpgId, String, LiveStatus)], now_ms: u64) {
        let mut inner = self.lock();
        let mut raised = HashSet::new();
        for (vpg, _, st) in statuses {
            for kind in alerts::alerts(&st.observation) {
                raised.insert((vpg.clone(), kind));
            }
        }
        inner.alerts_since.retain(|k, _| raised.contains(k));
        for k in raised {
            inner.alerts_since.entry(k).or_insert(now_ms);
        }
    }

    /// When the alert was first seen raised (now, if the monitor has not seen it yet).
    pub fn alert_since(&self, vpg: &VpgId, kind: AlertKind, now_ms: u64) -> u64 {
        self.lock()
            .alerts_since
            .get(&(vpg.clone(), kind))
            .copied()
            .unwrap_or(now_ms)
    }

    /// Records the outcome of assigning `vpg` to the VRA of `host`.
    pub fn record_assign(&self, host: &HostId, vpg: &VpgId, r: &Result<(), PlanError>) {
        let key = (host.clone(), vpg.clone());
        let mut inner = self.lock();
        match r {
            Ok(()) => inner.assign_errors.remove(&key),
            Err(e) => inner.assign_errors.insert(key, e.clone()),
        };
    }

    /// Why a VRA of this site refused `vpg`'s assignment, if one did (the first by host).
    /// A VRA that cannot be reached refused nothing: it shows as unreachable (Error).
    fn assign_error(&self, vpg: &VpgId) -> Option<PlanError> {
        let inner = self.lock();
        inner
            .assign_errors
            .iter()
            .filter(|((_, g), _)| g == vpg)
            .filter(|((h, _), _)| inner.vras.get(h).is_none_or(|o| o.vpgs.is_ok()))
            .min_by(|a, b| a.0.0.as_str().cmp(b.0.0.as_str()))
            .map(|((h, _), e)| PlanError {
                kind: e.kind,
                message: format!("the VRA of host {h} refused the assignment: {e}"),
            })
    }

    pub fn record_peer(&self, site: SiteId, report: Result<PeerReport, String>) {
        let mut inner = self.lock();
        let entry = inner.peers.entry(site).or_insert(PeerObservation {
            ok_at: None,
            report: PeerReport::default(),
            error: None,
            failures: 0,
        });
        match report {
            Ok(r) => {
                entry.ok_at = Some(Instant::now());
                entry.report = r;
                entry.error = None;
                entry.failures = 0;
            }
            Err(e) => {
                entry.error = Some(e);
                entry.failures += 1;
            }
        }
    }

    /// A checkpoint was thawed everywhere: wait for its markers to become durable.
    pub fn record_checkpoint(&self, vpg: &VpgId, cp: PendingCheckpoint) {
        let mut inner = self.lock();
        let view = inner.checkpoints.entry(vpg.clone()).or_default();
        // Bounded: markers that never become durable (a lost stream) age out.
        if view.pending.len() >= 64 {
            view.pending.remove(0);
        }
        view.pending.push(cp);
    }

    /// A protected VRA said its stream of `vpg` is durable up to `acked_seq` (answering
    /// the coordinator's wait for a checkpoint's marker, ahead of the next poll).
    pub fn record_acked(&self, vpg: &VpgId, host: &HostId, acked_seq: u64) {
        if let Some(view) = self.lock().checkpoints.get_mut(vpg) {
            view.acked(host, acked_seq);
        }
    }

    /// Whether paired site `site` reported trusting exactly the CAs `key` names for this
    /// site, in its state and on every VRA.
    pub fn peer_trusts(&self, site: &SiteId, key: &str) -> bool {
        let inner = self.lock();
        inner.peers.get(site).is_some_and(|p| {
            p.reachable() && p.report.your_cas.as_deref() == Some(key) && p.report.your_cas_applied
        })
    }

    /// Whether paired site `site` reported trusting other CAs for this site than `key`
    /// names (it has to be given them).
    pub fn peer_holds_other(&self, site: &SiteId, key: &str) -> bool {
        let inner = self.lock();
        inner.peers.get(site).is_some_and(|p| {
            p.reachable() && p.report.your_cas.as_deref().is_some_and(|k| k != key)
        })
    }

    /// The last report of a peer, if it is recent enough to count as reachable.
    pub fn peer_vpg(&self, site: &SiteId, vpg: &VpgId) -> Option<Option<PeerVpgReport>> {
        let inner = self.lock();
        let p = inner.peers.get(site)?;
        if !p.reachable() {
            return None;
        }
        Some(p.report.vpgs.iter().find(|g| &g.vpg == vpg).cloned())
    }

    /// The tombstone a reachable peer reported of `vpg` (it deleted it), if any.
    pub fn peer_tombstone(
        &self,
        site: &SiteId,
        vpg: &VpgId,
    ) -> Option<tandem_core::fence::Tombstone> {
        let inner = self.lock();
        let p = inner.peers.get(site).filter(|p| p.reachable())?;
        p.report.deleted.iter().find(|t| &t.vpg == vpg).cloned()
    }

    /// How long VPG `vpg` has shown these generations (here, at the peer) without a
    /// change; `None` when they agree (which forgets the mismatch).
    pub fn generation_mismatch(&self, vpg: &VpgId, here: u64, there: u64) -> Option<Duration> {
        let mut inner = self.lock();
        if here == there {
            inner.generation_mismatch.remove(vpg);
            return None;
        }
        let now = Instant::now();
        let entry = inner
            .generation_mismatch
            .entry(vpg.clone())
            .or_insert(((here, there), now));
        if entry.0 != (here, there) {
            *entry = ((here, there), now);
        }
        Some(now - entry.1)
    }

    /// Whether the definition of `vpg` may be pushed to the peer now: not while the wait
    /// after its last refusal runs.
    pub fn push_due(&self, vpg: &VpgId) -> bool {
        self.lock()
            .push_refused
            .get(vpg)
            .is_none_or(|(next, _)| Instant::now() >= *next)
    }

    /// The outcome of a push: a refusal doubles the wait before the next one.
    pub fn record_push(&self, vpg: &VpgId, ok: bool) {
        let mut inner = self.lock();
        if ok {
            inner.push_refused.remove(vpg);
            return;
        }
        let wait = inner
            .push_refused
            .get(vpg)
            .map_or(PUSH_RETRY_MIN, |(_, w)| (*w * 2).min(PUSH_RETRY_MAX));
        inner
            .push_refused
            .insert(vpg.clone(), (Instant::now() + wait, wait));
    }

    /// Whether a VPG may try to follow its inventory now: it has not failed to lately.
    pub fn follow_due(&self, vpg: &VpgId) -> bool {
        self.lock()
            .follow_failed
            .get(vpg)
            .is_none_or(|(at, _)| at.elapsed() >= FOLLOW_RETRY)
    }

    /// The outcome of an attempt to follow the inventory.
    pub fn record_follow(&self, vpg: &VpgId, r: Result<(), String>) {
        let mut inner = self.lock();
        match r {
            Ok(()) => inner.follow_failed.remove(vpg),
            Err(e) => inner.follow_failed.insert(vpg.clone(), (Instant::now(), e)),
        };
    }

    /// Whether the running sync of `vpg` was paused for its replication pause time already.
    pub fn sync_paused_already(&self, vpg: &VpgId) -> bool {
        self.lock().sync_paused.contains(vpg)
    }

    /// Notes that the running sync of `vpg` was paused (`true`), or that none runs.
    pub fn note_sync_pause(&self, vpg: &VpgId, paused: bool) {
        let mut inner = self.lock();
        if paused {
            inner.sync_paused.insert(vpg.clone());
        } else {
            inner.sync_paused.remove(vpg);
        }
    }

    /// Whether the peer answered recently.
    pub fn peer_reachable(&self, site: &SiteId) -> bool {
        self.lock()
            .peers
            .get(site)
            .is_some_and(PeerObservation::reachable)
    }

    /// Whether anything was observed yet (a node that just started leading has not).
    pub fn observed_any(&self) -> bool {
        !self.lock().vras.is_empty()
    }

    /// What each of `hosts` shows for `vpg`.
    pub fn seen(&self, vpg: &VpgId, hosts: &[HostId]) -> Vec<HostSeen> {
        let inner = self.lock();
        hosts
            .iter()
            .map(|h| HostSeen {
                host: h.clone(),
                seen: match inner.vras.get(h) {
                    None => VraSeen::Unreachable("not polled yet".into()),
                    Some(o) if o.at.elapsed() > VRA_STALE => {
                        VraSeen::Unreachable("no status for a while".into())
                    }
                    Some(VraObservation { vpgs: Err(e), .. }) => VraSeen::Unreachable(e.clone()),
                    Some(VraObservation { vpgs: Ok(m), .. }) => match m.get(vpg) {
                        Some(r) => VraSeen::Reported(Box::new(r.clone())),
                        None => VraSeen::NotAssigned,
                    },
                },
            })
            .collect()
    }

    /// What a VRA reported last, for the reconciler.
    pub fn vra(&self, host: &HostId) -> Option<VraObservation> {
        self.lock().vras.get(host).cloned()
    }

    /// The VRA of `host` did not answer its last poll (one never polled yet did not fail).
    pub fn vra_unreachable(&self, host: &HostId) -> bool {
        self.lock().vras.get(host).is_some_and(|o| o.vpgs.is_err())
    }

    /// The one status snapshot of `vpg` as this site sees it.
    pub fn status(&self, s: &SiteState, vpg: &Vpg, now_ms: u64) -> LiveStatus {
        let (protects, hosts) = own_hosts(s, vpg);
        let (hosts, plan_error) = match hosts {
            Ok(h) => (h, self.assign_error(&vpg.id)),
            Err(e) => (Vec::new(), Some(e)),
        };
        // An inventory change the VPG could not follow leaves that VM's new or grown
        // volumes unprotected.
        let plan_error = plan_error.or_else(|| {
            let failed = self
                .lock()
                .follow_failed
                .get(&vpg.id)
                .map(|f| f.1.clone())?;
            let drift = vpg.inventory_drift(|id| s.vms.get(id));
            (!drift.is_empty()).then(|| {
                let vms: Vec<String> = drift.iter().map(|(vm, _)| vm.to_string()).collect();
                PlanError::not_protected(format!(
                    "the inventory of VM {} changed and the VPG cannot follow it: {failed}",
                    vms.join(", ")
                ))
            })
        });
        let own = self.seen(&vpg.id, &hosts);
        let peer_site = if protects {
            &vpg.recovery_site
        } else {
            &vpg.protected_site
        };
        let peer = self.peer_vpg(peer_site, &vpg.id);
        // A reachable peer that has no copy of the VPG reports it with no VRAs.
        let missing;
        let peer = match &peer {
            None => None,
            Some(Some(p)) => Some(p),
            Some(None) => {
                missing = PeerVpgReport {
                    vpg: vpg.id.clone(),
                    generation: 0,
                    assigned_generation: 0,
                    vras: Vec::new(),
                    targets: Vec::new(),
                    plan_error: Some(PlanError::not_protected(
                        "the peer site holds no copy of the VPG",
                    )),
                    manager_paused: false,
                    recovery: None,
                };
                Some(&missing)
            }
        };
        // Taken with other VMs, it is no recovery point of the VPG as it is now.
        let vms = vm_set(vpg);
        let coordinated = self
            .lock()
            .checkpoints
            .get(&vpg.id)
            .and_then(|c| c.durable.as_ref())
            .filter(|(_, taken_with)| *taken_with == vms)
            .map(|(cp, _)| *cp);
        observe::evaluate(&LiveInputs {
            vpg,
            protects,
            now_ms,
            own: &own,
            peer,
            plan_error: plan_error.as_ref(),
            coordinated_checkpoint: coordinated,
            stood_down: s.stood_down.get(&vpg.id),
            test_overdue: !protects
                && tandem_core::recovery::test_overdue(
                    vpg.settings.test_reminder_months,
                    vpg.created_at_ms,
                    s.test_results.get(&vpg.id),
                    now_ms,
                ),
        })
    }

    /// This site's report to `peer`: the VPGs they share, as seen here.
    pub fn report_for(&self, s: &SiteState, peer: &SiteId) -> PeerReport {
        let mut vpgs = Vec::new();
        for vpg in s.vpgs.values().filter(|g| {
            (&g.protected_site == peer || &g.recovery_site == peer)
                && s.site_id().is_some_and(|own| g.joins(own, peer))
        }) {
            let (protects, hosts) = own_hosts(s, vpg);
            let (hosts, plan_error) = match hosts {
                Ok(h) => (h, self.assign_error(&vpg.id)),
                Err(e) => (Vec::new(), Some(e)),
            };
            let vras = self.seen(&vpg.id, &hosts);
            let assigned_generation = if !vras.is_empty()
                && vras.iter().all(
                    |h| matches!(&h.seen, VraSeen::Reported(r) if r.generation == vpg.generation),
                ) {
                vpg.generation
            } else {
                0
            };
            let targets = if protects {
                Vec::new()
            } else {
                hosts
                    .iter()
                    .filter_map(|h| {
                        s.hosts
                            .get(h)
                            .map(|host| (h.clone(), host.peer_address().to_string()))
                    })
                    .collect()
            };
            vpgs.push(PeerVpgReport {
                vpg: vpg.id.clone(),
                generation: vpg.generation,
                assigned_generation,
                vras,
                targets,
                plan_error,
                manager_paused: protects && vpg.paused_by_manager(),
                recovery: s
                    .recoveries
                    .get(&vpg.id)
                    .map(tandem_core::fence::RecoveryClaim::of_op)
                    .unwrap_or_else(|| s.recovery_outcomes.get(&vpg.id).cloned()),
            });
        }
        let deleted = s
            .tombstones
            .values()
            .filter(|t| {
                s.site_id().is_some_and(|own| {
                    (&t.protected_site == own && &t.recovery_site == peer)
                        || (&t.protected_site == peer && &t.recovery_site == own)
                })
            })
            .cloned()
            .collect();
        let your_cas = s
            .peers
            .get(peer)
            .filter(|p| !p.ca_pem.is_empty())
            .and_then(|p| tandem_tls::cert::check_ca_bundle(&p.ca_pem).ok())
            .map(|fps| tandem_tls::cert::bundle_key(&fps));
        let your_cas_applied = your_cas.as_ref().is_some_and(|key| {
            s.hosts.values().all(|h| {
                self.vra(&h.id)
                    .is_some_and(|o| o.vpgs.is_ok() && o.trusted.get(peer.as_str()) == Some(key))
            })
        });
        PeerReport {
            site: s.site_id().cloned(),
            vpgs,
            your_cas,
            your_cas_applied,
            deleted,
        }
    }
}
