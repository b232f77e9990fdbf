//! `tandem.lab.v1.LinkControl`: the gRPC service the lab process serves over its link
//! emulator, the conversions between its messages and [`crate::link`] types, and the client
//! side `tandem-lab link` uses.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::link::{
    CutMode, Direction, DirectionState, LinkChange, LinkEmulator, LinkError, LinkState, MAX_DELAY,
    ProxyInfo,
};

/// Generated code of `proto/lab_link.proto`.
pub mod pb {
    tonic::include_proto!("tandem.lab.v1");
}

use pb::link_control_client::LinkControlClient;
use pb::link_control_server::{LinkControl, LinkControlServer};

/// The one place link errors become gRPC statuses.
fn status(e: LinkError) -> Status {
    match e {
        LinkError::NotFound(_) => Status::not_found(e.to_string()),
        LinkError::Invalid(_) => Status::invalid_argument(e.to_string()),
        LinkError::Io(_) => Status::internal(e.to_string()),
        LinkError::Stopped => Status::unavailable(e.to_string()),
    }
}

fn cut_to_proto(c: Option<CutMode>) -> pb::CutMode {
    match c {
        None => pb::CutMode::Unspecified,
        Some(CutMode::Drop) => pb::CutMode::Drop,
        Some(CutMode::Blackhole) => pb::CutMode::Blackhole,
    }
}

fn direction_to_proto(d: &DirectionState) -> pb::DirectionState {
    pb::DirectionState {
        delay_ms: d.delay_ms,
        throttle_bps: d.throttle_bps,
        bytes: d.bytes,
        held_bytes: d.held_bytes,
        connections_total: d.connections_total,
        connections_open: d.connections_open,
        connections_refused: d.connections_refused,
    }
}

fn direction_from_proto(d: pb::DirectionState) -> DirectionState {
    DirectionState {
        delay_ms: d.delay_ms,
        throttle_bps: d.throttle_bps,
        bytes: d.bytes,
        held_bytes: d.held_bytes,
        connections_total: d.connections_total,
        connections_open: d.connections_open,
        connections_refused: d.connections_refused,
    }
}

pub fn state_to_proto(s: &LinkState) -> pb::LinkState {
    pb::LinkState {
        name: s.name.clone(),
        a: s.a.clone(),
        b: s.b.clone(),
        cut: cut_to_proto(s.cut) as i32,
        a_to_b: Some(direction_to_proto(&s.a_to_b)),
        b_to_a: Some(direction_to_proto(&s.b_to_a)),
        proxies: s
            .proxies
            .iter()
            .map(|p| pb::Proxy {
                listen: p.listen.clone(),
                upstream: p.upstream.clone(),
                from: p.from.clone(),
                to: p.to.clone(),
            })
            .collect(),
    }
}

/// Decodes a state the server sent; an unknown cut mode is an error.
pub fn state_from_proto(s: pb::LinkState) -> Result<LinkState, String> {
    let cut = match pb::CutMode::try_from(s.cut) {
        Ok(pb::CutMode::Unspecified) => None,
        Ok(pb::CutMode::Drop) => Some(CutMode::Drop),
        Ok(pb::CutMode::Blackhole) => Some(CutMode::Blackhole),
        Err(_) => return Err(format!("link {}: unknown cut mode {}", s.name, s.cut)),
    };
    Ok(LinkState {
        name: s.name,
        a: s.a,
        b: s.b,
        cut,
        a_to_b: direction_from_proto(s.a_to_b.unwrap_or_default()),
        b_to_a: direction_from_proto(s.b_to_a.unwrap_or_default()),
        proxies: s
            .proxies
            .into_iter()
            .map(|p| ProxyInfo {
                listen: p.listen,
                upstream: p.upstream,
                from: p.from,
                to: p.to,
            })
            .collect(),
    })
}

fn direction_from(d: i32) -> Result<Option<Direction>, Status> {
    match pb::Direction::try_from(d) {
        Ok(pb::Direction::Both) => Ok(None),
        Ok(pb::Direction::AToB) => Ok(Some(Direction::AToB)),
        Ok(pb::Direction::BToA) => Ok(Some(Direction::BToA)),
        Err(_) => Err(Status::invalid_argument(format!("unknown direction {d}"))),
    }
}

/// Validates a `SetLinkRequest` into the link's name and the change.
pub fn change_from_proto(r: pb::SetLinkRequest) -> Result<(String, LinkChange), Status> {
    use pb::set_link_request::Change;
    if r.name.is_empty() {
        return Err(Status::invalid_argument("name: a link name is needed"));
    }
    let change = match r.change {
        None => return Err(Status::invalid_argument("change: one change is needed")),
        Some(Change::Cut(c)) => match pb::CutMode::try_from(c) {
            Ok(pb::CutMode::Drop) => LinkChange::Cut(CutMode::Drop),
            Ok(pb::CutMode::Blackhole) => LinkChange::Cut(CutMode::Blackhole),
            _ => return Err(Status::invalid_argument("cut: drop or blackhole")),
        },
        Some(Change::Heal(_)) => LinkChange::Heal,
        Some(Change::Delay(d)) => {
            if d.ms > MAX_DELAY.as_millis() as u64 {
                return Err(Status::invalid_argument(format!(
                    "delay.ms: at most {}",
                    MAX_DELAY.as_millis()
                )));
            }
            LinkChange::Delay {
                direction: direction_from(d.direction)?,
                delay: Duration::from_millis(d.ms),
            }
        }
        Some(Change::Throttle(t)) => LinkChange::Throttle {
            direction: direction_from(t.direction)?,
            bytes_per_sec: t.bytes_per_sec,
        },
    };
    Ok((r.name, change))
}

/// The `LinkControl` service over a link emulator.
#[derive(Debug, Clone)]
pub struct LinkControlService {
    links: LinkEmulator,
}

impl LinkControlService {
    pub fn new(links: LinkEmulator) -> Self {
        LinkControlService { links }
    }
}

#[tonic::async_trait]
impl LinkControl for LinkControlService {
    async fn list_links(
        &self,
        _: Request<pb::ListLinksRequest>,
    ) -> Result<Response<pb::ListLinksResponse>, Status> {
        let states = self.links.states().await.map_err(status)?;
        Ok(Response::new(pb::ListLinksResponse {
            links: states.iter().map(state_to_proto).collect(),
        }))
    }

    async fn get_link(
        &self,
        r: Request<pb::GetLinkRequest>,
    ) -> Result<Response<pb::LinkState>, Status> {
        let link = self.links.get(&r.into_inner().name).await.map_err(status)?;
        let s = link.state().await.map_err(status)?;
        Ok(Response::new(state_to_proto(&s)))
    }

    async fn set_link(
        &self,
        r: Request<pb::SetLinkRequest>,
    ) -> Result<Response<pb::LinkState>, Status> {
        let (name, change) = change_from_proto(r.into_inner())?;
        let link = self.links.get(&name).await.map_err(status)?;
        let s = link.set(change).await.map_err(status)?;
        Ok(Response::new(state_to_proto(&s)))
    }
}

/// Serves `LinkControl` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    links: LinkEmulator,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(LinkControlServer::new(LinkControlService::new(links)))
        .serve_with_incoming_shutdown(
            tandem_proto::transport::incoming(listener),
            shutdown.cancelled_owned(),
        )
        .await
}

/// A client of the link control at `addr` (`host:port`).
pub async fn connect(addr: &str) -> anyhow::Result<LinkControlClient<Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the lab's link control at {addr} (is `tandem-lab up` running?): {e}"
            )
        })?;
    Ok(LinkControlClient::new(ch))
}
