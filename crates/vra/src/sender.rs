//! The sender task of a protected VPG: keeps one `Replicate` stream to the recovery VRA,
//! sends the buffer's entries in batches (lz4-compressing write data when the VPG asks for
//! WAN compression), frees buffer space only on acknowledgement, and reconnects with
//! backoff, resuming after the receiver's durable position (see [`crate::window`]).

use std::{
    sync::{Arc, PoisonError, atomic::Ordering},
    time::Duration,
};

use tandem_core::ids::VmId;
use tandem_journal::Seq;
use tandem_proto::v1::{self as pb, replicate_request::Msg, replication_client::ReplicationClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    connector::Connector,
    model::{EntryBody, entry_to_pb},
    protected::ProtectedShared,
};

/// Largest batch, in buffer bytes.
const MAX_BATCH_BYTES: u64 = 1 << 20;
/// Most entries in a batch.
const MAX_BATCH_ENTRIES: usize = 1024;
/// A batch smaller than this (in buffer bytes and entries) first yields to the runtime up
/// to [`GATHER_YIELDS`] times for more entries: a stream of small writes then crosses in
/// fewer, larger messages, each one wakeup, frame and journal group commit on the
/// receiver instead of one per write. Yielding adds no timer wait (a 1 ms linger saved
/// more CPU but lengthened the checkpoint barrier under load).
const GATHER_BYTES: u64 = 256 << 10;
const GATHER_ENTRIES: usize = 64;
const GATHER_YIELDS: usize = 8;
/// Largest gRPC message on the replication stream.
pub const MAX_STREAM_MESSAGE: usize = 64 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A stream down this long counts as a link down: the VPG stops buffering and tracks
/// writes for a bitmap sync (a recovery VRA that restarts within it resumes the stream
/// without a sync).
pub const LINK_DOWN_AFTER: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("refused: {0}")]
    Status(#[from] tonic::Status),
    #[error("{0}")]
    Protocol(String),
}

/// Runs until `cancel`: connect, stream, and on any failure back off and reconnect.
pub async fn run(
    shared: Arc<ProtectedShared>,
    connector: Connector,
    host_id: String,
    cancel: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut down_since: Option<std::time::Instant> = None;
    loop {
        let mut established = false;
        let result = session(&shared, &connector, &host_id, &cancel, &mut established).await;
        shared.connected.store(false, Ordering::Relaxed);
        if established || down_since.is_none() {
            down_since = Some(std::time::Instant::now());
        }
        if down_since.is_some_and(|t| t.elapsed() >= LINK_DOWN_AFTER) && !shared.sync.tracking() {
            shared
                .start_tracking(tandem_core::status::SyncTrigger::RecoveryVraCommunicationProblem);
        }
        shared
            .window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .on_disconnected();
        if established {
            backoff = BACKOFF_MIN;
        }
        match result {
            Ok(()) => return,
            Err(e) => {
                if established {
                    warn!(vpg = %shared.assignment.vpg, error = %e, "replication stream lost");
                } else {
                    debug!(vpg = %shared.assignment.vpg, error = %e, "replication stream not established");
                }
                shared.set_error(&e);
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn session(
    shared: &ProtectedShared,
    connector: &Connector,
    host_id: &str,
    cancel: &CancellationToken,
    established: &mut bool,
) -> Result<(), SessionError> {
    let a = &shared.assignment;
    let channel = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        c = connector.connect(&a.recovery_vra) => c?,
    };
    let mut client = ReplicationClient::new(channel)
        .max_decoding_message_size(MAX_STREAM_MESSAGE)
        .max_encoding_message_size(MAX_STREAM_MESSAGE);
    let (tx, rx) = mpsc::channel::<pb::ReplicateRequest>(4);
    shared.restart_stream.store(false, Ordering::Relaxed);
    let resume_from = shared
        .window
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .resume_from();
    let hello = pb::ReplicateRequest {
        msg: Some(Msg::Hello(pb::ReplicateHello {
            vpg_id: a.vpg.to_string(),
            generation: a.generation.0,
            sender_id: host_id.to_string(),
            resume_from: resume_from.0,
        })),
    };
    tx.send(hello)
        .await
        .map_err(|_| SessionError::Protocol("request stream closed".into()))?;
    let mut acks = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        r = client.replicate(ReceiverStream::new(rx)) => r?.into_inner(),
    };
    let first = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        m = acks.message() => m?.ok_or_else(|| SessionError::Protocol("closed before the first ack".into()))?,
    };
    let (resume, acked) = {
        let mut w = shared.window.lock().unwrap_or_else(PoisonError::into_inner);
        let resume = w
            .on_connected(Seq(first.durable_seq), Seq(first.held_seq))
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        (resume, w.acked_seq().0)
    };
    shared.release(resume.freed);
    shared.publish_durable(acked);
    if resume.lost {
        shared.needs_sync.store(true, Ordering::Relaxed);
        warn!(vpg = %a.vpg, receiver_durable = first.durable_seq, "stream cannot resume without loss; the vpg needs a sync");
    }
    *established = true;
    if shared.counters.sessions.fetch_add(1, Ordering::Relaxed) > 0 {
        shared.counters.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    shared.connected.store(true, Ordering::Relaxed);
    // A sync may be waiting for the stream.
    shared.sync.wake.notify_one();
    shared.set_error("");
    info!(vpg = %a.vpg, from = resume.from.0, rebased = resume.rebased, "replication stream established");

    loop {
        if shared.restart_stream.load(Ordering::Relaxed) {
            return Err(SessionError::Protocol(
                "restarting the stream after giving up buffered entries".into(),
            ));
        }
        let has_unsent = shared
            .window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .has_unsent();
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(()),
            msg = acks.message() => {
                let Some(ack) = msg? else {
                    return Err(SessionError::Protocol("receiver closed the stream".into()));
                };
                {
                    let mut remote = shared
                        .remote_storage_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    if *remote != ack.storage_error {
                        if ack.storage_error.is_empty() {
                            info!(vpg = %a.vpg, "recovery vra can make entries durable again");
                        } else {
                            warn!(vpg = %a.vpg, error = %ack.storage_error, "recovery vra cannot make entries durable");
                        }
                        remote.clone_from(&ack.storage_error);
                    }
                }
                let (freed, acked) = {
                    let mut w = shared.window.lock().unwrap_or_else(PoisonError::into_inner);
                    let freed = w
                        .on_ack(Seq(ack.durable_seq))
                        .map_err(|e| SessionError::Protocol(e.to_string()))?;
                    (freed, w.acked_seq().0)
                };
                shared.release(freed);
                shared.publish_durable(acked);
            }
            permit = tx.reserve(), if has_unsent => {
                let permit = permit.map_err(|_| SessionError::Protocol("request stream closed".into()))?;
                // A small batch first lets the tasks that are ready run (the NBD
                // connections with writes in hand), so that it takes their entries too.
                for _ in 0..GATHER_YIELDS {
                    if shared
                        .window
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .unsent_at_least(GATHER_BYTES, GATHER_ENTRIES)
                    {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                let batch = shared
                    .window
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .next_batch(MAX_BATCH_BYTES, MAX_BATCH_ENTRIES);
                let msg = encode(shared, &batch);
                // The site pair's bandwidth limit, shared with other VPGs by priority.
                let bytes = prost::Message::encoded_len(&msg) as u64;
                tokio::select! {
                    () = cancel.cancelled() => return Ok(()),
                    () = shared.limiter.acquire(a.priority, bytes) => {}
                }
                permit.send(msg);
            }
            () = shared.wake.notified(), if !has_unsent => {}
        }
    }
}

fn encode(shared: &ProtectedShared, batch: &[(Seq, EntryBody)]) -> pb::ReplicateRequest {
    let compress = shared.assignment.wan_compression;
    let mut raw = 0;
    let mut sent = 0;
    // Bytes sent per VM, summed over the batch (a batch holds few VMs): one counter
    // update per VM, not per entry.
    let mut per_vm: Vec<(&VmId, u64)> = Vec::new();
    let entries = batch
        .iter()
        .map(|(seq, body)| {
            let (e, r, s) = entry_to_pb(
                &crate::model::Entry {
                    seq: *seq,
                    body: body.clone(),
                },
                compress,
            );
            raw += r;
            sent += s;
            if let Some(vm) = body.vm() {
                match per_vm.iter_mut().find(|(v, _)| *v == vm) {
                    Some((_, n)) => *n += s,
                    None => per_vm.push((vm, s)),
                }
            }
            e
        })
        .collect();
    shared.counters.wan_raw.fetch_add(raw, Ordering::Relaxed);
    shared.counters.wan_sent.fetch_add(sent, Ordering::Relaxed);
    for (vm, n) in per_vm {
        if let Some(c) = shared.vms.get(vm) {
            c.wan_sent.fetch_add(n, Ordering::Relaxed);
        }
    }
    pb::ReplicateRequest {
        msg: Some(Msg::Batch(pb::ReplicateBatch { entries })),
    }
}
