//! Applying the site's CA: install, rotation, certificates issued to managers, and peers' CAs.

use super::*;

impl SiteState {
    /// [`Command::InstallCa`].
    pub(super) fn apply_install_ca(&mut self, ca: crate::enroll::SiteCaRecord) -> CommandOutcome {
        ca.validate()?;
        match &self.ca {
            Some(have) if have.fingerprint != ca.fingerprint => {
                Err(DomainError::precondition(format!(
                    "this site already has CA {}, not {}",
                    have.fingerprint, ca.fingerprint
                )))
            }
            Some(_) => Ok(Applied::Done),
            None => {
                self.ca = Some(ca);
                Ok(Applied::Done)
            }
        }
    }

    /// [`Command::StartCaRotation`].
    pub(super) fn apply_start_ca_rotation(
        &mut self,
        next: crate::enroll::SiteCaRecord,
        started_by: String,
        now_ms: u64,
    ) -> CommandOutcome {
        let event = self.site_cas().start(next, started_by, now_ms)?;
        self.events.push(event);
        Ok(Applied::Done)
    }

    /// [`Command::IssueFromNextCa`].
    pub(super) fn apply_issue_from_next_ca(
        &mut self,
        fingerprint: String,
        now_ms: u64,
    ) -> CommandOutcome {
        let event = self.site_cas().issue_from_next(&fingerprint, now_ms)?;
        self.events.push(event);
        Ok(Applied::Done)
    }

    /// [`Command::RetireOldCa`].
    pub(super) fn apply_retire_old_ca(
        &mut self,
        fingerprint: String,
        now_ms: u64,
    ) -> CommandOutcome {
        let event = self.site_cas().retire_old(&fingerprint, now_ms)?;
        self.events.push(event);
        Ok(Applied::Done)
    }

    /// [`Command::RecordNodeCert`].
    pub(super) fn apply_record_node_cert(
        &mut self,
        node: u64,
        cert: crate::ca_rotation::NodeCert,
    ) -> CommandOutcome {
        self.site_cas().record(node, cert)?;
        Ok(Applied::Done)
    }

    /// [`Command::SetPeerCa`].
    pub(super) fn apply_set_peer_ca(&mut self, id: SiteId, ca_pem: String) -> CommandOutcome {
        let peer = self
            .peers
            .get(&id)
            .ok_or_else(|| DomainError::not_found(SiteId::KIND, &id))?;
        if peer.ca_pem.is_empty() {
            return Err(DomainError::precondition(format!(
                "site {id} was paired without TLS: it has no CA to replace"
            )));
        }
        let updated = crate::pairing::PeerSite {
            ca_pem,
            ..peer.clone()
        };
        updated.validate()?;
        self.peers.insert(id, updated);
        Ok(Applied::Done)
    }
}
