//! Thin tonic services over [`Vra`]: `VraControl` (decode and validate, call the domain,
//! map the error) and `Replication` (the receiver side of the stream: one session task
//! per connected sender, which hands batches to the VPG's actor and sends its
//! acknowledgements back).

use std::{pin::Pin, time::Duration};

use futures::Stream;
use tandem_journal::{CheckpointId, Generation, Seq, VolumeId};
use tandem_proto::v1::{
    self as pb, replicate_request::Msg, replication_server::Replication,
    vra_control_server::VraControl,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::error::VraError;
use crate::{
    fence::SessionId,
    model::{
        self, ProtectedAssignment, RecoveryAssignment, batch_from_pb, checkpoint_from_thaw,
        parse_checkpoint_id, parse_peer_site, parse_vm, parse_vpg,
    },
    recovery::{ImageRange, RecoveryVpg},
    vra::Vra,
};

/// The longest a `WaitDurable` call may wait.
const MAX_WAIT_DURABLE_MS: u32 = 10_000;

fn status(e: VraError) -> Status {
    e.to_status()
}

/// The `VraControl` service.
#[derive(Debug, Clone)]
pub struct ControlService {
    vra: Vra,
    /// The paired sites' CAs (None: `--insecure`).
    trust: Option<crate::trust::PeerTrust>,
    /// Renewal of its certificate (None: `--insecure`).
    renewal: Option<crate::renewal::Renewal>,
}

impl ControlService {
    /// A service over `vra`.
    pub fn new(
        vra: Vra,
        trust: Option<crate::trust::PeerTrust>,
        renewal: Option<crate::renewal::Renewal>,
    ) -> Self {
        Self {
            vra,
            trust,
            renewal,
        }
    }

    fn renewal(&self) -> Result<&crate::renewal::Renewal, Status> {
        self.renewal.as_ref().ok_or_else(|| {
            VraError::Precondition("this VRA runs --insecure: it has no certificate".into()).into()
        })
    }
}

#[tonic::async_trait]
impl VraControl for ControlService {
    async fn assign_protected(
        &self,
        req: Request<pb::AssignProtectedRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let a = ProtectedAssignment::try_from(req.into_inner()).map_err(status)?;
        self.vra.assign_protected(a).await.map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn assign_recovery(
        &self,
        req: Request<pb::AssignRecoveryRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let r = req.into_inner();
        // Dropped VMs whose data goes: all but those kept (ids compared as given).
        let remove_dropped = r.remove_dropped_vm_data.then(|| r.keep_vm_ids.clone());
        let a = RecoveryAssignment::try_from(r).map_err(status)?;
        self.vra
            .assign_recovery(a, remove_dropped)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn unassign(
        &self,
        req: Request<pb::UnassignRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let r = req.into_inner();
        let vpg = parse_vpg(&r.vpg_id).map_err(status)?;
        self.vra
            .unassign(&vpg, r.remove_recovery_data)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn freeze(
        &self,
        req: Request<pb::FreezeRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let r = req.into_inner();
        let vpg = parse_vpg(&r.vpg_id).map_err(status)?;
        let id = parse_checkpoint_id(r.checkpoint_id).map_err(status)?;
        self.vra.freeze(&vpg, id).await.map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn thaw(
        &self,
        req: Request<pb::ThawRequest>,
    ) -> Result<Response<pb::ThawResponse>, Status> {
        let r = req.into_inner();
        let vpg = parse_vpg(&r.vpg_id).map_err(status)?;
        let cp = checkpoint_from_thaw(&r).map_err(status)?;
        let seq = self.vra.thaw(&vpg, cp).await.map_err(status)?;
        Ok(Response::new(pb::ThawResponse { marker_seq: seq.0 }))
    }

    async fn wait_durable(
        &self,
        req: Request<pb::WaitDurableRequest>,
    ) -> Result<Response<pb::WaitDurableResponse>, Status> {
        let r = req.into_inner();
        let vpg = parse_vpg(&r.vpg_id).map_err(status)?;
        let timeout_ms = match r.timeout_ms {
            0 => 5000,
            t if t <= MAX_WAIT_DURABLE_MS => t,
            t => {
                let e = tandem_core::DomainError::invalid(
                    "timeout_ms",
                    format!("{t} is above the limit of {MAX_WAIT_DURABLE_MS}"),
                );
                return Err(status(e.into()));
            }
        };
        let durable_seq = self
            .vra
            .wait_durable(&vpg, r.seq, Duration::from_millis(u64::from(timeout_ms)))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::WaitDurableResponse { durable_seq }))
    }

    async fn abort(
        &self,
        req: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let r = req.into_inner();
        let vpg = parse_vpg(&r.vpg_id).map_err(status)?;
        let id = parse_checkpoint_id(r.checkpoint_id).map_err(status)?;
        self.vra.abort(&vpg, id).await.map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn list_checkpoints(
        &self,
        req: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let vpg = parse_vpg(&req.into_inner().vpg_id).map_err(status)?;
        let cps = self.vra.checkpoints(&vpg).await.map_err(status)?;
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: cps
                .into_iter()
                .map(|c| pb::VraCheckpoint {
                    checkpoint_id: c.checkpoint.id.0,
                    timestamp_ms: c.checkpoint.timestamp.0,
                    kind: model::kind_to_pb(c.checkpoint.kind) as i32,
                    name: c.checkpoint.name.unwrap_or_default(),
                    seq: c.seq.0,
                    durable: c.durable,
                    usable: c.usable,
                })
                .collect(),
        }))
    }

    async fn open_export(
        &self,
        req: Request<pb::OpenExportRequest>,
    ) -> Result<Response<pb::OpenExportResponse>, Status> {
        let r = req.into_inner();
        let vpg = parse_vpg(&r.vpg_id).map_err(status)?;
        let vm = parse_vm(&r.vm_id).map_err(status)?;
        let cp: CheckpointId = parse_checkpoint_id(r.checkpoint_id).map_err(status)?;
        let e = self
            .vra
            .open_export(&vpg, &vm, VolumeId(r.volume_id), cp, r.writable)
            .await
            .map_err(status)?;
        let (nbd_address, nbd_socket) = self.vra.nbd_addresses();
        Ok(Response::new(pb::OpenExportResponse {
            export_name: e.name,
            size_bytes: e.size,
            writable: e.writable,
            nbd_address,
            nbd_socket,
        }))
    }

    async fn close_export(
        &self,
        req: Request<pb::CloseExportRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        self.vra
            .close_export(&req.into_inner().export_name)
            .map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn get_status(
        &self,
        _req: Request<pb::GetVraStatusRequest>,
    ) -> Result<Response<pb::VraStatus>, Status> {
        let mut status = self.vra.status().await;
        if let Some(t) = &self.trust {
            status.trusted = t
                .fingerprints()
                .into_iter()
                .map(|(site_id, ca_fingerprint)| pb::TrustedSite {
                    site_id,
                    ca_pem: String::new(),
                    ca_fingerprint,
                })
                .collect();
        }
        if let Some(r) = &self.renewal {
            status.cert_valid_until_ms = r.valid_until_ms();
        }
        if let Some(t) = &self.trust {
            status.cert_issuer_fingerprint = t.issuer();
        }
        Ok(Response::new(status))
    }

    async fn new_certificate_key(
        &self,
        _req: Request<pb::NewCertificateKeyRequest>,
    ) -> Result<Response<pb::NewCertificateKeyResponse>, Status> {
        let public_key = self.renewal()?.new_key().map_err(status)?;
        let (nbd, _) = self.vra.nbd_addresses();
        Ok(Response::new(pb::NewCertificateKeyResponse {
            public_key,
            ip_addresses: crate::nbd_access::certificate_ips(&nbd),
        }))
    }

    async fn install_certificate(
        &self,
        req: Request<pb::InstallCertificateRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let r = req.into_inner();
        self.renewal()?
            .install(&r.cert_pem, &r.ca_pem)
            .map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn pause(
        &self,
        req: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let vpg = parse_vpg(&req.into_inner().vpg_id).map_err(status)?;
        self.vra.pause(&vpg).await.map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn resume(
        &self,
        req: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let vpg = parse_vpg(&req.into_inner().vpg_id).map_err(status)?;
        self.vra.resume(&vpg).await.map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn force_sync(
        &self,
        req: Request<pb::ForceSyncRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let r = req.into_inner();
        let vpg = parse_vpg(&r.vpg_id).map_err(status)?;
        let volume = if r.vm_id.is_empty() {
            None
        } else {
            Some((parse_vm(&r.vm_id).map_err(status)?, VolumeId(r.volume_id)))
        };
        self.vra.force_sync(&vpg, volume).await.map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn set_bandwidth_limit(
        &self,
        req: Request<pb::SetBandwidthLimitRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let r = req.into_inner();
        let site = parse_peer_site(&r.peer_site_id).map_err(status)?;
        self.vra.set_bandwidth_limit(&site, r.bytes_per_sec).await;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn set_trust(
        &self,
        req: Request<pb::SetTrustRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let Some(trust) = &self.trust else {
            return Err(VraError::Precondition(
                "this VRA runs --insecure: it checks no certificates".into(),
            )
            .into());
        };
        let req = req.into_inner();
        let sites = req
            .sites
            .into_iter()
            .map(|s| crate::trust::TrustedSite {
                site_id: s.site_id,
                ca_pem: s.ca_pem,
            })
            .collect();
        trust.set(sites, &req.own_ca_pem).map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn start_recovery(
        &self,
        req: Request<pb::StartRecoveryRequest>,
    ) -> Result<Response<pb::RecoveryVolumes>, Status> {
        let r = req.into_inner();
        let vpg = parse_vpg(&r.vpg_id).map_err(status)?;
        let op = parse_op_id(&r.op_id).map_err(status)?;
        let cp = parse_checkpoint_id(r.checkpoint_id).map_err(status)?;
        let generation = model::parse_generation(r.generation).map_err(status)?;
        let recovered = self
            .vra
            .start_recovery(&vpg, generation, cp, op)
            .await
            .map_err(status)?;
        let (nbd_address, nbd_socket) = self.vra.nbd_addresses();
        Ok(Response::new(pb::RecoveryVolumes {
            volumes: recovered.volume_status(),
            nbd_address,
            nbd_socket,
        }))
    }

    async fn commit_recovery(
        &self,
        req: Request<pb::CommitRecoveryRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let r = req.into_inner();
        let vpg = parse_vpg(&r.vpg_id).map_err(status)?;
        let op = parse_op_id(&r.op_id).map_err(status)?;
        let generation = model::parse_generation(r.new_generation).map_err(status)?;
        self.vra
            .commit_recovery(&vpg, &op, generation)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn set_vm_power(
        &self,
        req: Request<pb::SetVmPowerRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let r = req.into_inner();
        let vpg = parse_vpg(&r.vpg_id).map_err(status)?;
        self.vra.set_vm_power(&vpg, r.on).await.map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn stand_down(
        &self,
        req: Request<pb::StandDownRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let r = req.into_inner();
        let vpg = parse_vpg(&r.vpg_id).map_err(status)?;
        if r.reason.len() > MAX_REASON_LEN {
            return Err(VraError::Invalid(format!(
                "reason: must be at most {MAX_REASON_LEN} bytes"
            ))
            .into());
        }
        let reason = r.reason;
        self.vra.stand_down(&vpg, reason).await.map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn stand_up(
        &self,
        req: Request<pb::StandUpRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let vpg = parse_vpg(&req.into_inner().vpg_id).map_err(status)?;
        self.vra.stand_up(&vpg).await.map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }

    async fn rollback_recovery(
        &self,
        req: Request<pb::RollbackRecoveryRequest>,
    ) -> Result<Response<pb::VraEmpty>, Status> {
        let r = req.into_inner();
        let vpg = parse_vpg(&r.vpg_id).map_err(status)?;
        let op = parse_op_id(&r.op_id).map_err(status)?;
        self.vra
            .rollback_recovery(&vpg, &op)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::VraEmpty {}))
    }
}

/// Who called, by the certificate the handshake proved (None: a plaintext listener).
fn caller<T>(req: &Request<T>) -> Option<std::sync::Arc<tandem_tls::PeerIdentity>> {
    req.extensions()
        .get::<tandem_proto::transport::PeerInfo>()
        .and_then(|i| i.peer.clone())
}

/// Streams into a VPG's journals and comparisons with its replicas come only from VRAs of
/// the site that protects it, each under its own host id.
fn check_sender(
    rvpg: &crate::recovery::RecoveryVpg,
    peer: Option<&tandem_tls::PeerIdentity>,
    claimed_host: Option<&str>,
) -> Result<(), Status> {
    let Some(peer) = peer else { return Ok(()) };
    let a = rvpg.assignment();
    if let Some(site) = &a.protected_site
        && peer.site != site.as_str()
    {
        return Err(VraError::Denied(format!(
            "{peer} is not a VRA of site {site}, which protects VPG {}",
            a.vpg
        ))
        .into());
    }
    if let Some(host) = claimed_host
        && host != peer.id
    {
        return Err(VraError::Denied(format!(
            "the stream claims host {host:?} but its certificate names {peer}"
        ))
        .into());
    }
    Ok(())
}

/// The longest reason a stand-down may give (it is logged and reported).
const MAX_REASON_LEN: usize = 1024;

fn parse_op_id(s: &str) -> crate::error::VraResult<tandem_core::ids::RecoveryOpId> {
    Ok(tandem_core::ids::RecoveryOpId::parse("op_id", s)?)
}

/// The `Replication` service (receiver side).
#[derive(Debug, Clone)]
pub struct ReplicationService {
    vra: Vra,
    sessions: TaskTracker,
}

impl ReplicationService {
    /// A service over `vra`; session tasks run on `sessions`.
    pub fn new(vra: Vra, sessions: TaskTracker) -> Self {
        Self { vra, sessions }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<pb::ReplicateAck, Status>> + Send>>;

#[tonic::async_trait]
impl Replication for ReplicationService {
    type ReplicateStream = AckStream;

    async fn replicate(
        &self,
        req: Request<Streaming<pb::ReplicateRequest>>,
    ) -> Result<Response<AckStream>, Status> {
        let peer = caller(&req);
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| VraError::Invalid("empty replication stream".into()))?;
        let Some(Msg::Hello(hello)) = first.msg else {
            return Err(VraError::Invalid("the first message must be a hello".into()).into());
        };
        let vpg = parse_vpg(&hello.vpg_id).map_err(status)?;
        check_sender(
            &*self.vra.recovery(&vpg).await.map_err(status)?,
            peer.as_deref(),
            Some(&hello.sender_id),
        )?;
        let (rvpg, session, resume, held, acked) = self
            .vra
            .replicate_hello(&vpg, Generation(hello.generation))
            .await
            .map_err(|e| {
                warn!(vpg = %vpg, sender = %hello.sender_id, generation = hello.generation, error = %e, "replication sender refused");
                status(e)
            })?;
        info!(vpg = %vpg, sender = %hello.sender_id, sender_from = hello.resume_from, resume = resume.0, held = held.0, "replication sender accepted");
        let (tx, rx) = mpsc::channel(16);
        tx.try_send(Ok(pb::ReplicateAck {
            durable_seq: resume.0,
            held_seq: held.0,
            storage_error: String::new(),
        }))
        .map_err(|_| VraError::Internal("ack channel".into()))?;
        let cancel = rvpg.cancel_token();
        self.sessions.spawn(run_session(
            rvpg, session, resume, inbound, acked, tx, cancel,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn block_hashes(
        &self,
        req: Request<pb::BlockHashesRequest>,
    ) -> Result<Response<pb::BlockHashesResponse>, Status> {
        let peer = caller(&req);
        let r = req.into_inner();
        let (vpg, range) = image_range(&r.vpg_id, &r.vm_id, r.volume_id, r.offset, r.length)?;
        let rvpg = self.vra.recovery(&vpg).await.map_err(status)?;
        check_sender(&rvpg, peer.as_deref(), None)?;
        let (hashes, seq) = rvpg
            .block_hashes(Generation(r.generation), &range, r.block_size)
            .await
            .map_err(|e| refused(&vpg, &range, "block hashes", e))?;
        Ok(Response::new(pb::BlockHashesResponse {
            hashes,
            durable_seq: seq.0,
        }))
    }

    async fn compare_blocks(
        &self,
        req: Request<pb::CompareBlocksRequest>,
    ) -> Result<Response<pb::CompareBlocksResponse>, Status> {
        let peer = caller(&req);
        let r = req.into_inner();
        let (vpg, range) = image_range(&r.vpg_id, &r.vm_id, r.volume_id, r.offset, r.length)?;
        let rvpg = self.vra.recovery(&vpg).await.map_err(status)?;
        check_sender(&rvpg, peer.as_deref(), None)?;
        let (d, seq) = rvpg
            .compare_blocks(
                Generation(r.generation),
                &range,
                r.coarse_block_size,
                r.fine_block_size,
                r.coarse_hashes,
            )
            .await
            .map_err(|e| refused(&vpg, &range, "compare", e))?;
        Ok(Response::new(pb::CompareBlocksResponse {
            differing: d.differing,
            fine_hashes: d.fine_hashes,
            durable_seq: seq.0,
        }))
    }
}

/// The VPG and image range of a hashes or compare request.
fn image_range(
    vpg_id: &str,
    vm_id: &str,
    volume: u32,
    offset: u64,
    length: u64,
) -> Result<(tandem_core::ids::VpgId, ImageRange), Status> {
    let vpg = parse_vpg(vpg_id).map_err(status)?;
    let vm = parse_vm(vm_id).map_err(status)?;
    let range = ImageRange {
        vm,
        volume: VolumeId(volume),
        offset,
        length,
    };
    Ok((vpg, range))
}

/// Logs a refused image request and maps its error.
fn refused(
    vpg: &tandem_core::ids::VpgId,
    range: &ImageRange,
    what: &str,
    e: crate::error::VraError,
) -> Status {
    debug!(vpg = %vpg, vm = %range.vm, volume = range.volume.0, error = %e, "{what} refused");
    status(e)
}

/// Serves one sender's session until it closes, fails, is superseded, or the VPG stops.
async fn run_session(
    vpg: std::sync::Arc<RecoveryVpg>,
    session: SessionId,
    resume: Seq,
    mut inbound: Streaming<pb::ReplicateRequest>,
    mut acked: watch::Receiver<Seq>,
    tx: mpsc::Sender<Result<pb::ReplicateAck, Status>>,
    cancel: CancellationToken,
) {
    // Acks never pass what this session sent (a resend may be skipped by journals that
    // already hold it, making the VPG's position run ahead of this sender's cursor).
    let mut received = resume;
    let mut last_acked = resume;
    let mut pending = false;
    let mut retry = tokio::time::interval(Duration::from_millis(20));
    let mut storage_check = tokio::time::interval(Duration::from_millis(250));
    let mut storage_error = String::new();
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            _ = storage_check.tick() => {
                // Tell the sender why acks stopped (and when they can resume).
                let now = vpg.storage_error().unwrap_or_default();
                if now != storage_error {
                    let ack = pb::ReplicateAck {
                        durable_seq: last_acked.0,
                        held_seq: 0,
                        storage_error: now.clone(),
                    };
                    if tx.send(Ok(ack)).await.is_err() {
                        break;
                    }
                    storage_error = now;
                }
            }
            r = acked.changed() => {
                if r.is_err() {
                    break;
                }
                pending = true;
            }
            _ = retry.tick(), if pending => {}
            msg = inbound.message() => match msg {
                Ok(Some(pb::ReplicateRequest { msg: Some(Msg::Batch(b)) })) => {
                    let entries = match batch_from_pb(b.entries) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = tx.send(Err(status(e))).await;
                            break;
                        }
                    };
                    let last = entries.last().map(|e| e.seq);
                    if let Err(e) = vpg.batch(session, entries).await {
                        warn!(vpg = %vpg.id(), error = %e, "replication batch refused");
                        let _ = tx.send(Err(status(e))).await;
                        break;
                    }
                    if let Some(last) = last {
                        received = received.max(last);
                    }
                    pending = true;
                }
                Ok(Some(_)) => {
                    let _ = tx.send(Err(VraError::Invalid("expected a batch".into()).into())).await;
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(vpg = %vpg.id(), error = %e, "replication stream ended");
                    break;
                }
            },
        }
        if pending {
            let ack = (*acked.borrow()).min(received);
            if ack > last_acked {
                match tx.try_send(Ok(pb::ReplicateAck {
                    durable_seq: ack.0,
                    held_seq: 0,
                    storage_error: storage_error.clone(),
                })) {
                    Ok(()) => {
                        last_acked = ack;
                        pending = ack < *acked.borrow();
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            } else {
                pending = false;
            }
        }
    }
    vpg.end(session).await;
    debug!(vpg = %vpg.id(), "replication session ended");
}
