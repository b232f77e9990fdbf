//! Who may call what, in one place, on both of a manager's listeners: the tower layer that
//! checks each operator call's bearer token against the site's tokens and the role its
//! method needs, each member's or paired site's call against the certificate its caller
//! presented, hands the caller to the services, and records every call that changes the
//! site as an event (the audit trail). Also the site's first admin token, installed at
//! bootstrap from a file.

use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use anyhow::{Context as _, Result};
use tandem_core::access::{ApiToken, BearerToken, Caller, Role, TokenId, TokenRejected};
use tandem_core::events::{EventCode, NewEvent};
use tandem_core::ids::SiteId;
use tandem_core::state::Command;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::{Code, Status};

use crate::audit_digest::{AuditRecord, Digest};
use crate::error::{ApiError, ApiResult};
use crate::rate_limit::SourceLimits;
use crate::site::{SiteManager, now_ms};

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// The certificate of a manager of this site (Raft, forwarding to the leader).
    Member,
    /// Nothing: health probes (they say only whether the node can serve).
    Nothing,
    /// A paired site's call (`SitePeer`), not an operator's: authenticated by the calling
    /// manager's certificate, of the CA pinned when the two sites paired.
    Peer,
    /// The first call of a pairing (on the operator port): the pairing token in the
    /// request speaks for the caller, whose site is not trusted yet.
    Pairing,
    /// A token of at least this role.
    Token(Role),
}

/// The role each method of the operator port needs. Unknown methods need admin, so a
/// service added later is closed until it is classified here.
pub fn needs(path: &str) -> Needs {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Needs::Token(Role::Admin);
    };
    let service = service.strip_prefix("tandem.v1.").unwrap_or(service);
    match (service, method) {
        // A join token in the request speaks for the new node (it has no credentials yet).
        ("grpc.health.v1.Health", _) | ("Enrollment", "Join") => Needs::Nothing,
        ("Raft" | "ManagerInternal", _) => Needs::Member,
        ("Pairing", "AcceptPairing") => Needs::Pairing,
        ("SitePeer", _) => Needs::Peer,
        ("grpc.reflection.v1.ServerReflection", _)
        | ("grpc.reflection.v1alpha.ServerReflection", _) => Needs::Token(Role::Viewer),
        ("TokenService", _) => Needs::Token(Role::Admin),
        ("VpgService", "AddCheckpoint" | "PauseVpgs" | "ResumeVpgs" | "ForceSyncVpgs")
        | ("RecoveryService", "StartFailoverTest" | "StopFailoverTest") => {
            Needs::Token(Role::Operator)
        }
        (
            "SiteService"
            | "HostService"
            | "DatastoreService"
            | "ResourcePoolService"
            | "VmService"
            | "VpgService"
            | "RecoveryService"
            | "ClusterService"
            | "MonitoringService"
            | "TaskService",
            m,
        ) if is_read(m) => Needs::Token(Role::Viewer),
        _ => Needs::Token(Role::Admin),
    }
}

fn is_read(method: &str) -> bool {
    ["Get", "List", "Export"]
        .iter()
        .any(|p| method.starts_with(p))
}

/// Which of a manager's listeners a layer guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The operator port: operators' calls (tokens), health, and the calls a one-time
    /// token speaks for (a node's join, a site's pairing).
    Operator,
    /// The internal port: the site's members and its paired sites only, each with a
    /// certificate its handshake proved.
    Internal,
}

impl Listener {
    /// Whether this listener serves calls that need `needs` at all.
    fn serves(self, needs: Needs) -> bool {
        match needs {
            Needs::Nothing | Needs::Token(_) | Needs::Pairing => self == Listener::Operator,
            Needs::Member | Needs::Peer => self == Listener::Internal,
        }
    }
}

/// The layer over every service of one listener.
#[derive(Clone)]
pub struct AccessLayer {
    site: SiteManager,
    audit: AuditTrail,
    listener: Listener,
    limits: SourceLimits,
}

impl AccessLayer {
    pub fn new(site: SiteManager, audit: AuditTrail, listener: Listener) -> Self {
        Self {
            site,
            audit,
            listener,
            limits: SourceLimits::default(),
        }
    }
}

/// Events of the audit trail waiting for their proposal.
const AUDIT_QUEUE: usize = 4096;
/// The most events one proposal records.
const AUDIT_BATCH: usize = 512;

/// Records operator calls in the event log: a bounded queue, written by one task in
/// batches (one Raft proposal per batch, not one per call). When the queue is full,
/// callers wait: a call is never answered with its record dropped. The same refusal
/// repeated within a minute is counted and told once ([`crate::audit_digest`]).
#[derive(Clone)]
pub struct AuditTrail {
    tx: tokio::sync::mpsc::Sender<AuditRecord>,
}

impl AuditTrail {
    /// The trail and the task that writes it, until `shutdown` (then what is queued is
    /// written once more, best effort).
    pub fn start(
        site: SiteManager,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(AUDIT_QUEUE);
        let writer = async move {
            let mut batch = Vec::with_capacity(AUDIT_BATCH);
            let mut digest = Digest::default();
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let n = tokio::select! {
                    n = rx.recv_many(&mut batch, AUDIT_BATCH) => {
                        if n == 0 {
                            return;
                        }
                        n
                    }
                    _ = tick.tick() => 0,
                    () = shutdown.cancelled() => {
                        let n = rx.recv_many(&mut batch, AUDIT_BATCH).await;
                        if n == 0 {
                            return;
                        }
                        n
                    }
                };
                let now = std::time::Instant::now();
                let mut events: Vec<NewEvent> = batch
                    .drain(..n)
                    .filter_map(|r| digest.admit(r, now))
                    .collect();
                events.extend(digest.due(now));
                if events.is_empty() {
                    continue;
                }
                let mut backoff = std::time::Duration::from_millis(50);
                loop {
                    let cmd = Command::RecordEvents {
                        events: events.clone(),
                    };
                    match site.node().propose(cmd).await {
                        Ok(_) => break,
                        Err(e) if !shutdown.is_cancelled() => {
                            tracing::warn!(error = %e, events = events.len(), "audit trail not recorded yet; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, events = events.len(), "audit trail lost at shutdown");
                            break;
                        }
                    }
                }
            }
        };
        (Self { tx }, writer)
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Access {
            inner,
            site: self.site.clone(),
            audit: self.audit.clone(),
            listener: self.listener,
            limits: self.limits.clone(),
        }
    }
}

/// [`AccessLayer`]'s service.
#[derive(Clone)]
pub struct Access<S> {
    inner: S,
    site: SiteManager,
    audit: AuditTrail,
    listener: Listener,
    limits: SourceLimits,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<Request<Body>> for Access<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // The clone that was made ready serves this call; a fresh clone is left behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let site = self.site.clone();
        let trail = self.audit.clone();
        let listener = self.listener;
        let limits = self.limits.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let needs = needs(&path);
            if !listener.serves(needs) {
                return Ok(Status::unimplemented(format!(
                    "{} is not served on the {} port",
                    call_name(&path),
                    match listener {
                        Listener::Operator => "operator",
                        Listener::Internal => "internal",
                    }
                ))
                .into_http());
            }
            let changes = changes_state(&path);
            let source = source_of(&req);
            let needed = match needs {
                Needs::Nothing | Needs::Pairing => {
                    if !changes {
                        return inner.call(req).await;
                    }
                    let who = format!(
                        "{} (from {})",
                        if needs == Needs::Pairing {
                            "a caller presenting a pairing token"
                        } else {
                            "a new node presenting a join token"
                        },
                        source.map_or_else(|| "an unknown address".into(), |ip| ip.to_string())
                    );
                    // A call no credential guards: a few attempts per source, then
                    // RESOURCE_EXHAUSTED (refusals audited in aggregate, per source).
                    if let Some(ip) = source
                        && let Err(wait) = limits.take(ip, std::time::Instant::now())
                    {
                        audit(&trail, &who, &call_name(&path), "refused: rate limited").await;
                        return Ok(rate_limited(ip, wait).into_http());
                    }
                    let response = inner.call(req).await?;
                    audit(&trail, &who, &call_name(&path), &outcome(&response)).await;
                    return Ok(response);
                }
                Needs::Member => {
                    return match check_member(&site, &req) {
                        Ok(()) => inner.call(req).await,
                        Err(status) => {
                            tracing::warn!(call = %path, reason = status.message(), "member call refused");
                            Ok(status.into_http())
                        }
                    };
                }
                Needs::Peer => {
                    let who = presented(&req).map_or_else(
                        || "an unauthenticated peer (--insecure)".to_string(),
                        |w| w.to_string(),
                    );
                    let response = match peer_site(&site, &req) {
                        Ok(from) => {
                            if let Some(from) = from {
                                req.extensions_mut().insert(PeerCaller(from));
                            }
                            inner.call(req).await?
                        }
                        Err(status) => {
                            tracing::warn!(call = %path, reason = status.message(), "peer call refused");
                            status.into_http()
                        }
                    };
                    if changes {
                        audit(&trail, &who, &call_name(&path), &outcome(&response)).await;
                    }
                    return Ok(response);
                }
                Needs::Token(role) => role,
            };
            let caller = match authenticate(&site, &req) {
                Ok(c) => c,
                Err(rejected) => {
                    // A source that keeps presenting bad tokens is told to slow down (a
                    // good token always passes: an operator behind the same address is
                    // not locked out).
                    if let Some(ip) = source
                        && let Err(wait) = limits.take(ip, std::time::Instant::now())
                    {
                        return Ok(rate_limited(ip, wait).into_http());
                    }
                    tracing::warn!(call = %path, reason = %rejected, "call refused: unauthenticated");
                    return Ok(Status::from(ApiError::unauthenticated(rejected)).into_http());
                }
            };
            let call = call_name(&path);
            if caller.role < needed {
                let msg = format!(
                    "{call} needs the {needed} role; token {} has {}",
                    caller.token, caller.role
                );
                tracing::warn!(call = %call, caller = %caller, "call refused: permission denied");
                if needed > Role::Viewer {
                    audit(
                        &trail,
                        &caller.to_string(),
                        &call,
                        "refused: permission denied",
                    )
                    .await;
                }
                return Ok(Status::from(ApiError::denied(msg)).into_http());
            }
            req.extensions_mut().insert(caller.clone());
            let response = inner.call(req).await?;
            if needed > Role::Viewer && !path.rsplit('/').next().is_some_and(is_read) {
                audit(&trail, &caller.to_string(), &call, &outcome(&response)).await;
            }
            Ok(response)
        })
    }
}

/// The address a call came from, if known.
fn source_of(req: &Request<Body>) -> Option<std::net::IpAddr> {
    req.extensions()
        .get::<tandem_proto::transport::PeerInfo>()
        .and_then(|i| i.remote)
        .map(|a| a.ip())
}

/// RESOURCE_EXHAUSTED for a source out of attempts, with when to retry (also as
/// `retry-after-ms` metadata).
fn rate_limited(ip: std::net::IpAddr, wait: std::time::Duration) -> Status {
    let mut status = Status::resource_exhausted(format!(
        "too many attempts from {ip}: retry in {} s",
        wait.as_secs().max(1)
    ));
    if let Ok(v) = wait.as_millis().to_string().parse() {
        status.metadata_mut().insert("retry-after-ms", v);
    }
    status
}

/// The certificate a client presented on this connection, if any.
fn presented(req: &Request<Body>) -> Option<std::sync::Arc<tandem_tls::PeerIdentity>> {
    req.extensions()
        .get::<tandem_proto::transport::PeerInfo>()
        .and_then(|i| i.peer.clone())
}

/// A member's call (Raft, forwarding) needs the certificate of a manager of this site
/// (nothing under `--insecure`).
fn check_member(site: &SiteManager, req: &Request<Body>) -> Result<(), Status> {
    let Some(own) = site.tls_site_id() else {
        return Ok(());
    };
    let who = presented(req).ok_or_else(|| {
        ApiError::unauthenticated("members' calls need the certificate of a manager of this site")
    })?;
    if who.role != tandem_tls::PeerRole::Manager || who.site != own {
        return Err(ApiError::denied(format!("{who} is not a manager of this site")).into());
    }
    Ok(())
}

/// The paired site a peer call comes from, by the certificate its manager presented
/// (None: this node runs `--insecure`, and peers are not authenticated).
fn peer_site(site: &SiteManager, req: &Request<Body>) -> Result<Option<SiteId>, Status> {
    let Some(own) = site.tls_site_id() else {
        return Ok(None);
    };
    let who = presented(req).ok_or_else(|| {
        ApiError::unauthenticated("peer calls need the certificate of a paired site's manager")
    })?;
    if who.role != tandem_tls::PeerRole::Manager {
        return Err(ApiError::denied(format!(
            "{who} is not a manager: only a paired site's managers call this service"
        ))
        .into());
    }
    if who.site == own {
        return Err(
            ApiError::denied(format!("{who} is a member of this site, not a paired site")).into(),
        );
    }
    let from = SiteId::parse("certificate site", &who.site)
        .map_err(|e| ApiError::denied(e.to_string()))?;
    let paired = site
        .node()
        .read_local(|s| s.peers.get(&from).is_some_and(|p| !p.ca_pem.is_empty()));
    if !paired {
        return Err(ApiError::denied(format!("site {from} is not paired with this site")).into());
    }
    Ok(Some(from))
}

/// The paired site a peer call comes from, as its certificate names it (in the request's
/// extensions once [`AccessLayer`] let the call through).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCaller(pub SiteId);

/// The site a peer call speaks for: `claimed` (a request field), which must be the site
/// of the caller's certificate when there is one.
pub fn calling_site<T>(r: &tonic::Request<T>, claimed: &str) -> Result<SiteId, Status> {
    let claimed =
        SiteId::parse("from_site_id", claimed).map_err(|e| ApiError::invalid(e.to_string()))?;
    match r.extensions().get::<PeerCaller>() {
        Some(PeerCaller(site)) if *site != claimed => Err(ApiError::denied(format!(
            "from_site_id {claimed} is not the calling site {site}"
        ))
        .into()),
        _ => Ok(claimed),
    }
}

fn authenticate(site: &SiteManager, req: &Request<Body>) -> Result<Caller, TokenRejected> {
    let header = req
        .headers()
        .get("authorization")
        .ok_or(TokenRejected::Missing)?;
    let bearer = BearerToken::from_header(header.to_str().map_err(|_| TokenRejected::Malformed)?)?;
    let now = now_ms();
    site.node()
        .read_local(|s| s.tokens.authenticate(&bearer, now))
}

/// `/tandem.v1.VpgService/CreateVpg` as `VpgService.CreateVpg`.
fn call_name(path: &str) -> String {
    let p = path.trim_start_matches('/');
    let p = p.strip_prefix("tandem.v1.").unwrap_or(p);
    p.replacen('/', ".", 1)
}

/// A call's outcome from its response head: tonic answers a failed unary call with its
/// status in the headers, a successful one in the trailers.
fn outcome(response: &Response<Body>) -> String {
    match response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
    {
        None | Some(Code::Ok) => "ok".to_string(),
        Some(code) => format!("failed: {code:?}"),
    }
}

/// Calls from other sites and from nodes without credentials yet that change this site's
/// state: the audit trail records them as it does operators' (who: the certificate, or
/// the one-time token the call presented).
fn changes_state(path: &str) -> bool {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return false;
    };
    let service = service.strip_prefix("tandem.v1.").unwrap_or(service);
    matches!(
        (service, method),
        (
            "SitePeer",
            "PutVpg" | "DeleteVpg" | "Unpair" | "PrepareMove" | "FinishMove" | "UpdateTrust"
        ) | ("Enrollment", "Join")
            | ("Pairing", "AcceptPairing")
    )
}

/// Queues one call for the event log (waits while the queue is full); a refusal is
/// folded with the same caller's same refusals of the minute.
async fn audit(trail: &AuditTrail, caller: &str, call: &str, outcome: &str) {
    let description = format!("{call} by {caller}: {outcome}");
    let event = NewEvent {
        at_ms: now_ms(),
        code: EventCode::OperatorCall,
        vpg: None,
        description: description.clone(),
    };
    let refusal = (outcome != "ok").then_some(description);
    if trail.tx.send(AuditRecord { event, refusal }).await.is_err() {
        tracing::warn!(call, caller = %caller, outcome, "the audit trail has stopped: call not recorded");
    }
}

/// The caller of a request that passed [`AccessLayer`].
pub fn caller<T>(r: &tonic::Request<T>) -> Result<&Caller, Status> {
    r.extensions()
        .get::<Caller>()
        .ok_or_else(|| ApiError::unauthenticated("no caller on this request").into())
}

/// Reads the first admin token from `path`, or writes a new one there (mode 0600) when
/// the file does not exist: the bootstrap node's operator finds it there.
pub fn bootstrap_token(path: &Path) -> Result<BearerToken> {
    let existed = path.exists();
    let token = tandem_proto::client::read_or_create_token_file(path, || {
        BearerToken::from_random(rand::random(), rand::random())
    })
    .with_context(|| format!("the admin token file {}", path.display()))?;
    if !existed {
        tracing::info!(file = %path.display(), token = %token.id(), "wrote the site's first admin token");
    }
    Ok(token)
}

/// The token as the site keeps it after bootstrap.
pub fn bootstrap_entry(token: &BearerToken) -> ApiToken {
    ApiToken::new(
        token,
        "bootstrap admin".into(),
        Role::Admin,
        now_ms(),
        None,
        "bootstrap".into(),
    )
}

impl SiteManager {
    /// Installs the site's first admin token (once in its life; see [`bootstrap_token`]).
    pub async fn ensure_admin_token(&self, token: &BearerToken) -> ApiResult<()> {
        if self.node().read(|s| s.tokens.is_bootstrapped()).await? {
            return Ok(());
        }
        self.node()
            .propose(Command::BootstrapAdminToken {
                token: bootstrap_entry(token),
                now_ms: now_ms(),
            })
            .await?;
        Ok(())
    }

    /// Creates a token for `caller`; answers it whole (the only time it is seen).
    pub async fn create_token(
        &self,
        caller: &Caller,
        name: String,
        role: Role,
        ttl_ms: Option<u64>,
    ) -> ApiResult<(BearerToken, ApiToken)> {
        let bearer = BearerToken::from_random(rand::random(), rand::random());
        let now = now_ms();
        let entry = ApiToken::new(
            &bearer,
            name,
            role,
            now,
            ttl_ms,
            format!("{} (token {})", caller.name, caller.token),
        );
        entry.validate().map_err(ApiError::Domain)?;
        self.node()
            .propose(Command::CreateToken {
                token: entry.clone(),
                now_ms: now,
            })
            .await?;
        Ok((bearer, entry))
    }

    pub async fn list_tokens(&self) -> ApiResult<Vec<ApiToken>> {
        self.node()
            .read(|s| s.tokens.list().cloned().collect())
            .await
    }

    /// Revokes a token; answers it as it is then.
    pub async fn revoke_token(&self, id: TokenId) -> ApiResult<ApiToken> {
        let (index, _) = self
            .node()
            .propose_indexed(Command::RevokeToken {
                id: id.clone(),
                now_ms: now_ms(),
            })
            .await?;
        self.node()
            .read_after(index, move |s| {
                s.tokens.list().find(|t| t.id == id).cloned()
            })
            .await?
            .ok_or_else(|| ApiError::internal("a revoked token is gone"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_listener_serves_its_audience_only() {
        for (needs, operator, internal) in [
            (Needs::Nothing, true, false),
            (Needs::Token(Role::Viewer), true, false),
            (Needs::Token(Role::Admin), true, false),
            (Needs::Member, false, true),
            (Needs::Peer, false, true),
            (Needs::Pairing, true, false),
        ] {
            assert_eq!(Listener::Operator.serves(needs), operator, "{needs:?}");
            assert_eq!(Listener::Internal.serves(needs), internal, "{needs:?}");
        }
    }

    #[test]
    fn calls_from_other_sites_and_new_nodes_that_change_the_state_are_audited() {
        for path in [
            "/tandem.v1.SitePeer/PutVpg",
            "/tandem.v1.SitePeer/DeleteVpg",
            "/tandem.v1.SitePeer/Unpair",
            "/tandem.v1.Pairing/AcceptPairing",
            "/tandem.v1.SitePeer/UpdateTrust",
            "/tandem.v1.Enrollment/Join",
        ] {
            assert!(changes_state(path), "{path}");
        }
        for path in [
            "/tandem.v1.SitePeer/Report",
            "/tandem.v1.SitePeer/GetIdentity",
            "/tandem.v1.SitePeer/ListCheckpoints",
            "/grpc.health.v1.Health/Check",
            "/tandem.v1.Raft/AppendEntries",
            "nonsense",
        ] {
            assert!(!changes_state(path), "{path}");
        }
    }

    #[test]
    fn every_method_is_classified_and_unknown_ones_need_admin() {
        let t = |p: &str| needs(p);
        assert_eq!(t("/grpc.health.v1.Health/Check"), Needs::Nothing);
        assert_eq!(t("/tandem.v1.SitePeer/PutVpg"), Needs::Peer);
        assert_eq!(t("/tandem.v1.Pairing/AcceptPairing"), Needs::Pairing);
        // Pairing acceptance moved to the operator port: the internal one needs a
        // certificate in the handshake.
        assert_eq!(t("/tandem.v1.SitePeer/AcceptPairing"), Needs::Peer);
        // The join token in the body speaks for a node that has no credentials yet; any
        // other Enrollment method would need an admin.
        assert_eq!(t("/tandem.v1.Enrollment/Join"), Needs::Nothing);
        assert_eq!(t("/tandem.v1.Enrollment/Renew"), Needs::Token(Role::Admin));
        assert_eq!(
            t("/tandem.v1.TokenService/CreateJoinToken"),
            Needs::Token(Role::Admin)
        );
        assert_eq!(t("/tandem.v1.Raft/AppendEntries"), Needs::Member);
        assert_eq!(t("/tandem.v1.ManagerInternal/Propose"), Needs::Member);
        assert_eq!(
            t("/tandem.v1.VpgService/ListVpgs"),
            Needs::Token(Role::Viewer)
        );
        assert_eq!(
            t("/tandem.v1.VpgService/GetVpg"),
            Needs::Token(Role::Viewer)
        );
        assert_eq!(
            t("/tandem.v1.VpgService/AddCheckpoint"),
            Needs::Token(Role::Operator)
        );
        assert_eq!(
            t("/tandem.v1.RecoveryService/StartFailoverTest"),
            Needs::Token(Role::Operator)
        );
        for admin in [
            "/tandem.v1.VpgService/CreateVpg",
            "/tandem.v1.VpgService/DeleteVpg",
            "/tandem.v1.RecoveryService/StartFailover",
            "/tandem.v1.RecoveryService/StartMove",
            "/tandem.v1.RecoveryService/CommitRecovery",
            "/tandem.v1.SiteService/PairSite",
            "/tandem.v1.SiteService/CreatePairingToken",
            "/tandem.v1.HostService/CreateHost",
            "/tandem.v1.TokenService/ListTokens",
            "/tandem.v1.TaskService/TaskInput",
            "/tandem.v1.NewService/GetAnything",
            "/nonsense",
            "",
        ] {
            assert_eq!(t(admin), Needs::Token(Role::Admin), "{admin}");
        }
        assert_eq!(
            t("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Needs::Token(Role::Viewer)
        );
        assert_eq!(
            call_name("/tandem.v1.VpgService/CreateVpg"),
            "VpgService.CreateVpg"
        );
    }
}
