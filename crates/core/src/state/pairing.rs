//! Applying the site's identity and its peers: bootstrap, pairing tokens, pairing, peers' limits.

use super::*;

impl SiteState {
    /// [`Command::InitSite`].
    pub(super) fn apply_init_site(&mut self, identity: SiteIdentity) -> CommandOutcome {
        match &self.identity {
            Some(existing) if existing.id != identity.id || existing.name != identity.name => {
                Err(DomainError::precondition(format!(
                    "site is already initialized as {:?} ({})",
                    existing.name, existing.id
                )))
            }
            Some(_) => Ok(Applied::Done),
            None => {
                self.identity = Some(identity);
                Ok(Applied::Done)
            }
        }
    }

    /// [`Command::IssuePairingToken`].
    pub(super) fn apply_issue_pairing_token(
        &mut self,
        token: PairingToken,
        now_ms: u64,
    ) -> CommandOutcome {
        self.pairing_tokens.retain(|t| t.expires_at_ms > now_ms);
        self.pairing_tokens.push(token);
        Ok(Applied::Done)
    }

    /// [`Command::AcceptPairing`].
    pub(super) fn apply_accept_pairing(
        &mut self,
        token_hash: String,
        legacy_token: crate::pairing::LegacySecret,
        peer: PeerSite,
        now_ms: u64,
    ) -> CommandOutcome {
        self.pairing_tokens.retain(|t| t.expires_at_ms > now_ms);
        let presented = if token_hash.is_empty() {
            legacy_token.hash()
        } else {
            token_hash
        };
        let Some(pos) = self
            .pairing_tokens
            .iter()
            .position(|t| t.matches(&presented))
        else {
            return Err(DomainError::precondition(
                "pairing token is unknown, used or expired",
            ));
        };
        self.check_new_peer(&peer)?;
        self.pairing_tokens.remove(pos);
        self.peers.insert(peer.id.clone(), peer);
        Ok(Applied::Done)
    }

    /// [`Command::SetPeerBandwidthLimit`].
    pub(super) fn apply_set_peer_bandwidth_limit(
        &mut self,
        id: SiteId,
        bytes_per_sec: u64,
    ) -> CommandOutcome {
        crate::pairing::check_bandwidth_limit(bytes_per_sec)?;
        let peer = self
            .peers
            .get_mut(&id)
            .ok_or_else(|| DomainError::not_found(SiteId::KIND, &id))?;
        peer.bandwidth_limit_bytes_per_sec = bytes_per_sec;
        Ok(Applied::Done)
    }

    /// [`Command::AddPeer`].
    pub(super) fn apply_add_peer(&mut self, peer: PeerSite) -> CommandOutcome {
        self.check_new_peer(&peer)?;
        self.peers.insert(peer.id.clone(), peer);
        Ok(Applied::Done)
    }

    /// [`Command::RemovePeer`].
    pub(super) fn apply_remove_peer(&mut self, id: SiteId) -> CommandOutcome {
        self.check_unpairable(&id)?;
        self.peers.remove(&id);
        Ok(Applied::Done)
    }
}
