//! Who may call a VRA, by the certificate the caller proved in the handshake: its own
//! site's managers drive it (`VraControl`); VRAs stream to it and compare blocks with it
//! (`Replication`), from its site or a paired one (the handshake admits only CAs it
//! trusts); any of them may probe health and reflection.

use std::sync::Arc;

use tandem_proto::peer_access::PeerPolicy;
use tandem_tls::{PeerIdentity, PeerRole};
use tonic::Status;

/// The policy of a VRA of site `own_site`.
pub fn policy(own_site: String) -> PeerPolicy {
    Arc::new(move |path: &str, peer: Option<&PeerIdentity>| {
        // A plaintext listener (`--insecure`) has no identities to check.
        let Some(peer) = peer else { return Ok(()) };
        let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
        let allowed = match service {
            "tandem.v1.VraControl" => peer.role == PeerRole::Manager && peer.site == own_site,
            "tandem.v1.Replication" => peer.role == PeerRole::Vra,
            "grpc.health.v1.Health"
            | "grpc.reflection.v1.ServerReflection"
            | "grpc.reflection.v1alpha.ServerReflection" => true,
            _ => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{service} is not served to {peer} (VRA control: this site's managers; \
                 replication: VRAs)"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_is_for_own_managers_and_replication_for_vras() {
        let p = policy("site-a".into());
        let me = PeerIdentity::manager("site-a", 1).unwrap();
        let peer_manager = PeerIdentity::manager("site-b", 1).unwrap();
        let vra = PeerIdentity::vra("site-b", "h1").unwrap();
        let control = "/tandem.v1.VraControl/AssignProtected";
        let repl = "/tandem.v1.Replication/Replicate";
        assert!(p(control, Some(&me)).is_ok());
        assert!(p(control, Some(&peer_manager)).is_err());
        assert!(p(control, Some(&vra)).is_err());
        assert!(p(repl, Some(&vra)).is_ok());
        assert!(p(repl, Some(&me)).is_err());
        assert!(p("/grpc.health.v1.Health/Check", Some(&vra)).is_ok());
        assert!(p("/tandem.v1.Unknown/X", Some(&me)).is_err());
        assert!(
            p(control, None).is_ok(),
            "plaintext (--insecure) checks nothing"
        );
    }
}
