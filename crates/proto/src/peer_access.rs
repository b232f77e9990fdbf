//! Authorization of node-to-node calls by the caller's certificate: one tower layer that
//! asks a listener's policy whether the identity the handshake proved (see
//! [`crate::transport::PeerInfo`]) may call a method, before the call reaches a service.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tandem_tls::PeerIdentity;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};

use crate::transport::PeerInfo;

/// A listener's policy: may this caller (None: a plaintext listener, no identity) call
/// the method at this path?
pub type PeerPolicy = Arc<dyn Fn(&str, Option<&PeerIdentity>) -> Result<(), Status> + Send + Sync>;

/// The layer that applies a [`PeerPolicy`] to every call.
#[derive(Clone)]
pub struct PeerCheckLayer {
    policy: PeerPolicy,
}

impl PeerCheckLayer {
    pub fn new(policy: PeerPolicy) -> Self {
        Self { policy }
    }
}

impl<S> tower::Layer<S> for PeerCheckLayer {
    type Service = PeerCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerCheck {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// [`PeerCheckLayer`]'s service.
#[derive(Clone)]
pub struct PeerCheck<S> {
    inner: S,
    policy: PeerPolicy,
}

impl<S> tower::Service<Request<Body>> for PeerCheck<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|i| i.peer.clone());
        match (self.policy)(req.uri().path(), peer.as_deref()) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => {
                tracing::warn!(call = req.uri().path(), peer = ?peer.as_deref().map(|p| p.uri()), reason = status.message(), "call refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
