//! This site and its pairing: identity, pairing tokens, pairing and unpairing, peers' limits.

use super::*;

impl SiteManager {
    pub async fn site(&self) -> ApiResult<(SiteIdentity, Vec<PeerSite>)> {
        let identity = self.identity().await?;
        let peers = self
            .node
            .read(|s| s.peers.values().cloned().collect())
            .await?;
        Ok((identity, peers))
    }

    pub async fn create_pairing_token(
        &self,
        ttl_secs: u64,
    ) -> ApiResult<(PairingSecret, PairingToken, SiteIdentity)> {
        let identity = self.identity().await?;
        let ttl_ms = if ttl_secs == 0 {
            PAIRING_TOKEN_TTL_MS
        } else {
            ttl_secs.min(7 * 24 * 3600) * 1000
        };
        let now = now_ms();
        // The state and the Raft log keep its hash; the secret is shown once.
        let secret = PairingSecret::from_random(rand::random());
        let token = PairingToken::new(&secret, now, ttl_ms);
        self.node
            .propose(Command::IssuePairingToken {
                token: token.clone(),
                now_ms: now,
            })
            .await?;
        Ok((secret, token, identity))
    }

    /// Pairs with the site whose operator port is at `api` (its `Pairing` service takes
    /// the token there), records `endpoints` as its internal addresses (empty: those it
    /// answers), and tells it to reach this site at `advertise` (empty: this site's
    /// managers' internal addresses). `code` is the other site's pairing token with its
    /// CA's fingerprint: the site reached must present that CA before the token is sent,
    /// and the two sites exchange their CAs.
    pub async fn pair(
        &self,
        api: Vec<String>,
        endpoints: Vec<String>,
        advertise: Vec<String>,
        code: String,
    ) -> ApiResult<PeerSite> {
        let (token, pinned) = tandem_core::pairing::split_pairing_code(&code);
        let token = token.to_string();
        let mut v = Violations::new();
        v.check(
            !api.is_empty(),
            "peer_api_endpoints",
            "at least one address is needed (the peer's operator port, which takes the \
             pairing token)",
        );
        for (field, list) in [
            ("peer_api_endpoints", &api),
            ("peer_endpoints", &endpoints),
            ("advertise_endpoints", &advertise),
        ] {
            v.check(list.len() <= 16, field, "at most 16 addresses");
            for (i, e) in list.iter().enumerate() {
                v.absorb(tandem_core::ids::check_address(&format!("{field}[{i}]"), e));
            }
        }
        v.check(
            !token.is_empty() && token.len() <= 256,
            "token",
            "must be 1..256 characters",
        );
        let pinned = match (self.connector.site_tls(), pinned) {
            (None, _) => None,
            (Some(_), Some(fp)) => match tandem_tls::pin::PinnedCa::new(fp) {
                Ok(_) => Some(fp.to_ascii_lowercase()),
                Err(e) => {
                    v.check(false, "token", e.to_string());
                    None
                }
            },
            (Some(_), None) => {
                v.check(
                    false,
                    "token",
                    "names no CA fingerprint (`<token>.<sha256>`, as CreatePairingToken \
                     answers it): this site runs TLS and checks whom it pairs with",
                );
                None
            }
        };
        v.into_result()?;
        let mut me = self.self_as_peer().await?;
        if !advertise.is_empty() {
            me.endpoints = advertise;
        }
        let dial = match &pinned {
            Some(fp) => Some(
                tandem_tls::config::pinned_client(fp)
                    .map_err(|e| ApiError::Domain(DomainError::invalid("token", e.to_string())))?,
            ),
            None => None,
        };
        let ch = self.connector.first_reachable(&api, dial).await?;
        let reply = PairingClient::new(ch)
            .accept_pairing(v1::AcceptPairingRequest {
                token,
                requester: Some(tandem_proto::convert::peer_to_proto(&me)),
            })
            .await
            .map_err(ApiError::from_peer)?
            .into_inner();
        let mut peer = tandem_proto::convert::peer_from_proto(reply).map_err(|e| {
            ApiError::Peer(
                format!("bad identity from peer: {e}"),
                tonic::Code::Internal,
            )
        })?;
        if let Some(fp) = &pinned {
            let theirs = tandem_tls::cert::check_ca_bundle(&peer.ca_pem).map_err(|e| {
                ApiError::Peer(format!("the peer's CA: {e}"), tonic::Code::PermissionDenied)
            })?;
            if !theirs.contains(fp) {
                return Err(ApiError::Peer(
                    format!(
                        "the peer answered with CAs {}, not the pinned {fp}",
                        theirs.join(", ")
                    ),
                    tonic::Code::PermissionDenied,
                ));
            }
        }
        peer.paired_at_ms = now_ms();
        if !endpoints.is_empty() {
            peer.endpoints = endpoints;
        }
        if peer.endpoints.is_empty() {
            return Err(ApiError::Peer(
                "the peer answered no internal address; name them (peer_endpoints)".into(),
                tonic::Code::FailedPrecondition,
            ));
        }
        self.node
            .propose(Command::AddPeer { peer: peer.clone() })
            .await?;
        Ok(peer)
    }

    /// The peer side of pairing: checks and consumes the token, records the requester.
    pub async fn accept_pairing(
        &self,
        token: PairingSecret,
        requester: PeerSite,
    ) -> ApiResult<PeerSite> {
        if self.connector.site_tls().is_some() {
            tandem_tls::cert::check_ca_bundle(&requester.ca_pem).map_err(|e| {
                ApiError::Domain(DomainError::invalid(
                    "requester.ca_pem",
                    format!("{e} (this site runs TLS and pins its peers' CAs)"),
                ))
            })?;
        }
        // A token that is not live here is refused without a proposal (a guessing caller
        // costs reads, not Raft entries).
        let hash = token.hash();
        let live = self
            .node
            .read({
                let hash = hash.clone();
                move |s| {
                    let now = now_ms();
                    s.pairing_tokens
                        .iter()
                        .any(|t| t.expires_at_ms > now && t.matches(&hash))
                }
            })
            .await?;
        if !live {
            return Err(
                DomainError::precondition("pairing token is unknown, used or expired").into(),
            );
        }
        let me = self.self_as_peer().await?;
        let mut peer = requester;
        peer.paired_at_ms = now_ms();
        self.node
            .propose(Command::AcceptPairing {
                token_hash: hash,
                legacy_token: Default::default(),
                peer,
                now_ms: now_ms(),
            })
            .await?;
        Ok(me)
    }

    /// Limits what this site's VRAs send to peer `id`; the reconciler applies it to them.
    pub async fn set_peer_bandwidth_limit(
        &self,
        id: SiteId,
        bytes_per_sec: u64,
    ) -> ApiResult<PeerSite> {
        self.node
            .propose(Command::SetPeerBandwidthLimit {
                id: id.clone(),
                bytes_per_sec,
            })
            .await?;
        self.record_event(
            EventCode::PeerBandwidthLimitSet,
            None,
            match bytes_per_sec {
                0 => format!("bandwidth limit to site {id} removed"),
                b => format!("bandwidth limit to site {id} set to {b} bytes per second"),
            },
        )
        .await;
        self.node
            .read(move |s| s.peers.get(&id).cloned())
            .await?
            .ok_or_else(|| ApiError::internal("the peer went away after its limit was set"))
    }

    /// Unpairs from site `id` on both sites: refused while a VPG replicates between them.
    /// The peer forgets this site first; with `force`, a peer that cannot be reached is left
    /// to unpair on its own.
    pub async fn unpair(&self, id: SiteId, force: bool) -> ApiResult<()> {
        let (peer, own) =
            self.node
                .read({
                    let id = id.clone();
                    move |s| -> ApiResult<(PeerSite, SiteId)> {
                        s.check_unpairable(&id)?;
                        let own = s.site_id().cloned().ok_or_else(|| {
                            DomainError::precondition("site is not initialized yet")
                        })?;
                        Ok((s.peers[&id].clone(), own))
                    }
                })
                .await??;
        let told = self
            .peer_call(&peer, |mut c| {
                let from = own.to_string();
                async move { c.unpair(v1::PeerUnpairRequest { from_site_id: from }).await }
            })
            .await;
        let peer_side = match told {
            Ok(_) => "on both sites".to_string(),
            Err(ApiError::Peer(m, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded))
                if force =>
            {
                tracing::warn!(peer = %id, error = %m, "force unpair: the peer keeps its side");
                format!("here only (site {} could not be reached: {m})", peer.name)
            }
            Err(ApiError::Peer(m, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded)) => {
                return Err(ApiError::Peer(
                    format!(
                        "site {} cannot be reached to unpair it ({m}); unpair with force to \
                         forget it here only",
                        peer.name
                    ),
                    tonic::Code::Unavailable,
                ));
            }
            Err(e) => return Err(e),
        };
        self.node
            .propose(Command::RemovePeer { id: id.clone() })
            .await?;
        self.record_event(
            EventCode::SiteUnpaired,
            None,
            format!("unpaired from site {} ({id}) {peer_side}", peer.name),
        )
        .await;
        Ok(())
    }

    /// The peer side of unpairing: forgets the caller unless a VPG still replicates
    /// between the two sites; a caller already forgotten is not an error.
    pub async fn accept_unpair(&self, from: SiteId) -> ApiResult<()> {
        let known = self
            .node
            .read({
                let from = from.clone();
                move |s| -> ApiResult<Option<String>> {
                    let Some(peer) = s.peers.get(&from) else {
                        return Ok(None);
                    };
                    s.check_unpairable(&from)?;
                    Ok(Some(peer.name.clone()))
                }
            })
            .await??;
        if let Some(name) = known {
            self.node
                .propose(Command::RemovePeer { id: from.clone() })
                .await?;
            self.record_event(
                EventCode::SiteUnpaired,
                None,
                format!("site {name} ({from}) unpaired from this site"),
            )
            .await;
        }
        Ok(())
    }

    pub async fn peers(&self) -> ApiResult<Vec<PeerSite>> {
        self.node
            .read(|s| s.peers.values().cloned().collect())
            .await
    }
}
