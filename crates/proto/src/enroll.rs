//! The joining side of enrollment: a new manager or VRA makes its key, reaches its
//! site's managers over TLS pinned to the CA its join token names, and keeps the
//! certificate they issue in its PKI directory.

use tandem_core::enroll::JoinCode;
use tandem_tls::pki::{Issued, NodeKey, PkiDir};
use tandem_tls::{PeerIdentity, PeerRole};

use crate::client::{ApiConnector, Credentials};
use crate::v1;
use crate::v1::enrollment_client::EnrollmentClient;

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the join token: {0}")]
    Token(String),
    #[error("no manager of the site reached at {endpoints:?}: {reason}")]
    Unreachable {
        endpoints: Vec<String>,
        reason: String,
    },
    #[error("the site refused the join: {0}")]
    Refused(String),
    #[error("the site answered a certificate that is not ours: {0}")]
    BadAnswer(String),
    #[error(transparent)]
    Tls(#[from] tandem_tls::TlsError),
}

/// [`join`] unless `pki` already holds a usable certificate of this node (a join token is
/// used once; restarts find the certificate it got). A certificate that expired (the node
/// was away longer than its managers could renew it) or cannot be loaded is replaced, so
/// a new join token brings such a node back. So is one from before a rotation of the
/// site's CA (the token pins a CA this node does not trust): if that join fails (an old
/// token, used already), the node keeps the certificate it has.
pub async fn join_unless_provisioned(
    endpoints: &[String],
    token: &str,
    pki: &PkiDir,
    role: PeerRole,
    id: &str,
    ips: &[String],
) -> Result<(), JoinError> {
    let mut fallback = false;
    if pki.is_provisioned() {
        match tandem_tls::TlsConfig::load(pki) {
            Ok(tls)
                if tls.valid_until().is_some()
                    && tls.identity().role == role
                    && tls.identity().id == id =>
            {
                let pinned = JoinCode::parse("join token", token)
                    .map(|c| c.ca_fingerprint().to_string())
                    .ok();
                match pinned {
                    Some(ca) if !tls.own_ca_fingerprints().contains(&ca) => {
                        tracing::warn!(%ca, "the join token pins a CA this node does not trust (the site rotated its CA while it was away): joining again");
                        fallback = true;
                    }
                    _ => return Ok(()),
                }
            }
            Ok(tls) => {
                tracing::warn!(identity = %tls.identity(), "this node's certificate is expired or not its own: joining again with the join token")
            }
            Err(e) => {
                tracing::warn!(error = %e, "this node's certificate cannot be used: joining again with the join token")
            }
        }
    }
    match join(endpoints, token, pki, role, id, ips).await {
        Ok(me) => {
            tracing::info!(identity = %me, dir = %pki.dir.display(), "joined the site: its managers issued this node's certificate");
            Ok(())
        }
        Err(e) if fallback => {
            tracing::warn!(error = %e, "could not join again: keeping the certificate this node has");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Joins with `token` through the managers at `endpoints` (their operator ports), as the
/// node `role` `id` of its site, and installs the certificate in `pki`. Answers the
/// identity it names. The certificate also names `ips` (for clients that check the address
/// they dial).
pub async fn join(
    endpoints: &[String],
    token: &str,
    pki: &PkiDir,
    role: PeerRole,
    id: &str,
    ips: &[String],
) -> Result<PeerIdentity, JoinError> {
    let code = JoinCode::parse("join token", token).map_err(|e| JoinError::Token(e.to_string()))?;
    let pinned = tandem_tls::config::pinned_client(code.ca_fingerprint())?;
    let channel = ApiConnector::new(Credentials::none().with_tls(pinned))
        .connect(endpoints)
        .await
        .map_err(|e| JoinError::Unreachable {
            endpoints: endpoints.to_vec(),
            reason: e.to_string(),
        })?;
    let join_role = match role {
        PeerRole::Manager => v1::JoinRole::Manager,
        PeerRole::Vra => v1::JoinRole::Vra,
        // Clients' certificates are issued by the site's CA holder, not by joining.
        PeerRole::Client => {
            return Err(JoinError::Token(
                "a client certificate is not obtained by joining".into(),
            ));
        }
    };
    let key = NodeKey::generate()?;
    let enrolled = EnrollmentClient::new(channel)
        .join(v1::JoinRequest {
            token: code.reveal(),
            public_key: key.public_key().to_vec(),
            proof: key.prove(code.id().as_str())?,
            role: join_role as i32,
            id: id.to_string(),
            ip_addresses: ips.to_vec(),
        })
        .await
        .map_err(|s| JoinError::Refused(format!("{:?}: {}", s.code(), s.message())))?
        .into_inner();
    let named = PeerIdentity::parse_uri(&enrolled.identity)
        .map_err(|e| JoinError::BadAnswer(e.to_string()))?;
    if named.role != role || named.id != id {
        return Err(JoinError::Refused(format!(
            "the join token is for {named}, and this node is {role:?} {id}: ask for a token \
             for this node"
        )));
    }
    // The site's CAs: the one the token pins, and during a rotation the other.
    let cas = tandem_tls::cert::check_ca_bundle(&enrolled.ca_pem)
        .map_err(|e| JoinError::BadAnswer(e.to_string()))?;
    if !cas.iter().any(|ca| ca == code.ca_fingerprint()) {
        return Err(JoinError::BadAnswer(format!(
            "its CAs are {}, without the {} the token pins",
            cas.join(", "),
            code.ca_fingerprint()
        )));
    }
    pki.install(
        &enrolled.ca_pem,
        &Issued {
            cert_pem: enrolled.cert_pem,
            key_pem: key.key_pem(),
        },
    )?;
    // Loading checks that the certificate chains to the CA, holds our key and names one
    // identity.
    let loaded = tandem_tls::TlsConfig::load(pki).map_err(|e| JoinError::BadAnswer(e.to_string()));
    match loaded.and_then(|tls| {
        if *tls.identity() == named {
            Ok(tls)
        } else {
            Err(JoinError::BadAnswer(format!(
                "the certificate names {}, the answer {named}",
                tls.identity()
            )))
        }
    }) {
        Ok(tls) => Ok(tls.identity().clone()),
        Err(e) => {
            for f in [pki.node_cert(), pki.node_key()] {
                let _ = std::fs::remove_file(f);
            }
            Err(e)
        }
    }
}
