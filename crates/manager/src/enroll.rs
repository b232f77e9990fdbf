//! Certificates issued by the site's managers: the site CA kept in the replicated state
//! (imported once by the node that created it), join tokens, the exchange of a join
//! token for a new node's certificate, and renewal (each manager its own; the leader its
//! VRAs') when a third of a certificate's life is left.

use std::time::{Duration, SystemTime};

use tandem_core::DomainError;
use tandem_core::access::{Caller, TokenId};
use tandem_core::enroll::{
    DEFAULT_JOIN_TTL_MS, JoinCode, JoinToken, Joiner, MAX_JOIN_TTL_MS, Secret, SiteCaRecord,
};
use tandem_core::state::Command;
use tandem_tls::PeerIdentity;
use tandem_tls::pki::{PkiDir, SiteCa};

use crate::error::{ApiError, ApiResult};
use crate::site::{SiteManager, now_ms};

/// A join token as created: the code to hand over once, and what the site keeps.
#[derive(Debug)]
pub struct CreatedJoin {
    pub code: JoinCode,
    pub token: JoinToken,
    /// The identity the certificate will name.
    pub identity: PeerIdentity,
}

/// A new node's certificate, issued for its join token.
#[derive(Debug)]
pub struct Enrolled {
    pub cert_pem: String,
    pub ca_pem: String,
    pub identity: PeerIdentity,
}

/// A CA as the replicated state keeps it, key included.
pub(crate) fn ca_record(ca: &SiteCa) -> ApiResult<SiteCaRecord> {
    Ok(SiteCaRecord {
        cert_pem: ca.cert_pem().to_string(),
        key_pem: Secret::new(ca.key_pem().to_string()),
        fingerprint: tandem_tls::cert::check_ca_pem(ca.cert_pem()).map_err(ApiError::internal)?,
    })
}

/// The IP addresses a node asks its certificate to name (`field` of its request): at most
/// 4, each a specific unicast address (not unspecified, not multicast).
pub fn certificate_ips(field: &str, asked: &[String]) -> ApiResult<Vec<std::net::IpAddr>> {
    let invalid = |why: String| ApiError::Domain(DomainError::invalid(field, why));
    if asked.len() > MAX_CERTIFICATE_IPS {
        return Err(invalid(format!("at most {MAX_CERTIFICATE_IPS} addresses")));
    }
    asked
        .iter()
        .map(|a| {
            let ip: std::net::IpAddr = a
                .parse()
                .map_err(|_| invalid(format!("{a:?} is not an IP address")))?;
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(invalid(format!("{ip} does not name one host")));
            }
            Ok(ip)
        })
        .collect()
}

/// Most IP addresses a node's certificate names.
const MAX_CERTIFICATE_IPS: usize = 4;

fn identity_of(site: &str, joiner: &Joiner) -> ApiResult<PeerIdentity> {
    match joiner {
        Joiner::Manager { node_id } => PeerIdentity::manager(site, *node_id),
        Joiner::Vra { host } => PeerIdentity::vra(site, host.as_str()),
    }
    .map_err(|e| ApiError::Domain(DomainError::invalid("identity", e.to_string())))
}

impl SiteManager {
    /// Keeps the CA whose key is in `pki` in the replicated state, unless the state has
    /// one: the node that created the site's CA does this once the cluster has a leader.
    pub async fn ensure_ca(&self, pki: &PkiDir) -> ApiResult<()> {
        if !pki.ca_key().is_file() || self.node().read(|s| s.ca.is_some()).await? {
            return Ok(());
        }
        let site = self
            .tls_site_id()
            .ok_or_else(|| ApiError::internal("no certificate, so no site CA"))?;
        let ca = ca_record(&SiteCa::load(pki, site).map_err(ApiError::internal)?)?;
        let fingerprint = ca.fingerprint.clone();
        self.node().propose(Command::InstallCa { ca }).await?;
        tracing::info!(ca = %fingerprint, "the site's CA is in the replicated state: any leader issues certificates");
        Ok(())
    }

    /// The issuing CA as the state keeps it, the site it belongs to, and every CA the
    /// site's nodes trust (PEM).
    async fn site_ca(&self) -> ApiResult<(SiteCaRecord, String, String)> {
        let (ca, site, bundle) = self
            .node()
            .read(|s| {
                (
                    s.ca.clone(),
                    s.site_id().map(|i| i.to_string()),
                    s.ca_bundle(),
                )
            })
            .await?;
        match (ca, site, bundle) {
            (Some(ca), Some(site), Some(bundle)) => Ok((ca, site, bundle)),
            _ => Err(ApiError::Domain(DomainError::precondition(
                "this site's managers do not hold its CA (the site runs --insecure, or its \
                 first manager was given certificates without the CA key): they cannot \
                 issue certificates",
            ))),
        }
    }

    /// Creates a one-time join token for `joiner`, valid for `ttl_ms` (None: an hour).
    pub async fn create_join_token(
        &self,
        caller: &Caller,
        joiner: Joiner,
        ttl_ms: Option<u64>,
    ) -> ApiResult<CreatedJoin> {
        let (ca, site, _) = self.site_ca().await?;
        let identity = identity_of(&site, &joiner)?;
        let code = JoinCode::from_random(rand::random(), rand::random(), &ca.fingerprint)?;
        let now = now_ms();
        let ttl = ttl_ms.unwrap_or(DEFAULT_JOIN_TTL_MS).min(MAX_JOIN_TTL_MS);
        let token = JoinToken {
            id: code.id().clone(),
            joiner,
            secret_hash: code.secret_hash(),
            created_at_ms: now,
            expires_at_ms: now + ttl,
            created_by: format!("{} (token {})", caller.name, caller.token),
        };
        self.node()
            .propose(Command::CreateJoinToken {
                token: token.clone(),
                now_ms: now,
            })
            .await?;
        Ok(CreatedJoin {
            code,
            token,
            identity,
        })
    }

    /// The unused join tokens, each with the identity it would be exchanged for.
    pub async fn list_join_tokens(&self) -> ApiResult<Vec<(JoinToken, String)>> {
        let now = now_ms();
        self.node()
            .read(move |s| {
                let site = s.site_id().map(|i| i.to_string()).unwrap_or_default();
                s.join_tokens
                    .live(now)
                    .map(|t| {
                        let identity = identity_of(&site, &t.joiner)
                            .map(|i| i.uri())
                            .unwrap_or_else(|_| t.joiner.to_string());
                        (t.clone(), identity)
                    })
                    .collect()
            })
            .await
    }

    /// Withdraws an unused join token; answers it as it was.
    pub async fn revoke_join_token(&self, id: TokenId) -> ApiResult<(JoinToken, String)> {
        let listed = self.list_join_tokens().await?;
        let found = listed
            .into_iter()
            .find(|(t, _)| t.id == id)
            .ok_or_else(|| DomainError::not_found("join token", &id))?;
        self.node().propose(Command::RevokeJoinToken { id }).await?;
        Ok(found)
    }

    /// Exchanges a join token for the certificate of the node it names (which must be the
    /// node `claimed` to be), for the key `public_key` whose holder signed `proof`. The token is used up before the
    /// certificate is answered, so one token yields one certificate.
    pub async fn join(
        &self,
        code: JoinCode,
        claimed: &Joiner,
        public_key: &[u8],
        proof: &[u8],
        ips: &[std::net::IpAddr],
    ) -> ApiResult<Enrolled> {
        tandem_tls::pki::verify_join_proof(public_key, code.id().as_str(), proof)
            .map_err(|e| ApiError::Denied(e.to_string()))?;
        let (ca, site, bundle) = self.site_ca().await?;
        if code.ca_fingerprint() != ca.fingerprint {
            return Err(ApiError::Denied(format!(
                "join token {} pins CA {}, and this site's is {}",
                code.id(),
                code.ca_fingerprint(),
                ca.fingerprint
            )));
        }
        let (id, secret_hash) = (code.id().clone(), code.secret_hash());
        let joiner = self
            .node()
            .read(move |s| {
                s.join_tokens
                    .check(&id, &secret_hash, now_ms())
                    .map(|t| t.joiner.clone())
            })
            .await?
            .map_err(|e| ApiError::Denied(e.to_string()))?;
        if joiner != *claimed {
            return Err(ApiError::Denied(format!(
                "join token {} is for {joiner}, not {claimed}; it stays unused",
                code.id()
            )));
        }
        let identity = identity_of(&site, &joiner)?;
        let issuer = SiteCa::from_pem(&site, &ca.cert_pem, ca.key_pem.expose())
            .map_err(ApiError::internal)?;
        let cert_pem = issuer
            .issue_to_naming(&identity, self.cert_ttl(), public_key, ips)
            .map_err(|e| ApiError::Domain(DomainError::invalid("public_key", e.to_string())))?;
        // Used up in the same command that records it; a second join with the same token
        // (even a concurrent one) finds it gone.
        self.node()
            .propose(Command::ConsumeJoinToken {
                id: code.id().clone(),
                secret_hash: code.secret_hash(),
                identity: identity.uri(),
                now_ms: now_ms(),
            })
            .await
            .map_err(|e| match e {
                ApiError::Domain(d) => ApiError::Denied(d.to_string()),
                other => other,
            })?;
        tracing::info!(%identity, token = %code.id(), "issued a certificate for a join token");
        Ok(Enrolled {
            cert_pem,
            ca_pem: bundle,
            identity,
        })
    }
}

/// Whether a certificate valid until `until` (None: not valid now) is due for renewal:
/// when less than a third of `ttl` is left.
pub fn renewal_due(until: Option<SystemTime>, ttl: Duration) -> bool {
    until.is_none_or(|u| u.duration_since(SystemTime::now()).unwrap_or_default() < ttl / 3)
}

impl SiteManager {
    /// The issuing CA from this node's copy of the state, with every CA the site's nodes
    /// trust (PEM) (None: the managers hold no CA).
    fn local_ca(&self) -> Option<(SiteCa, String)> {
        let (ca, site, bundle) = self.node().read_local(|s| {
            (
                s.ca.clone(),
                s.site_id().map(|i| i.to_string()),
                s.ca_bundle(),
            )
        });
        let (ca, site, bundle) = (ca?, site?, bundle?);
        SiteCa::from_pem(&site, &ca.cert_pem, ca.key_pem.expose())
            .inspect_err(|e| tracing::warn!(error = %e, "the site's CA in the state is unusable"))
            .ok()
            .map(|ca| (ca, bundle))
    }

    /// Whether this node's certificate `current` is due for renewal: a third of its life
    /// left, or another CA than the site's issuing one issued it (a CA rotation).
    fn own_renewal_due(&self, current: &tandem_tls::TlsConfig) -> bool {
        let issuing = self
            .node()
            .read_local(|s| s.ca.as_ref().map(|c| c.fingerprint.clone()));
        renewal_due(current.valid_until(), self.cert_ttl())
            || issuing.is_some_and(|fp| current.ca_fingerprint().ok() != Some(fp))
    }

    /// Renews this manager's own certificate when it is due, from the CA in the state:
    /// a new key and certificate in `pki`, where the certificate watch takes them up.
    /// Answers whether it renewed.
    pub fn renew_own(&self, live: &tandem_tls::LiveTls, pki: &PkiDir) -> ApiResult<bool> {
        let current = live.current();
        if !self.own_renewal_due(&current) {
            return Ok(false);
        }
        let Some((ca, bundle)) = self.local_ca() else {
            tracing::warn!(
                valid_until = ?current.valid_until(),
                "this manager's certificate is due for renewal, and the managers hold no CA \
                 to issue one: give it a new certificate before it expires"
            );
            return Ok(false);
        };
        let issued = ca
            .issue(current.identity(), self.cert_ttl())
            .map_err(ApiError::internal)?;
        pki.install(&bundle, &issued).map_err(ApiError::internal)?;
        // `tls_refresh::keep_tls` loads it (within two looks, a few seconds at most) into the
        // operator and the internal port alike.
        tracing::info!(identity = %current.identity(), "renewed this manager's certificate");
        Ok(true)
    }

    /// Renews the certificate of the VRA at `addr` (of host `host`): it makes a key, this
    /// node signs it with the site's CA, the VRA checks and installs the certificate.
    pub async fn renew_vra(&self, host: &tandem_core::ids::HostId, addr: &str) -> ApiResult<()> {
        let (ca, bundle) = self.local_ca().ok_or_else(|| {
            ApiError::Domain(DomainError::precondition(
                "the managers hold no CA: they cannot renew certificates",
            ))
        })?;
        let identity = identity_of(ca.site(), &Joiner::Vra { host: host.clone() })?;
        let mut vra = self.control().vra(addr)?;
        let key = vra
            .new_certificate_key(tandem_proto::v1::NewCertificateKeyRequest {})
            .await
            .map_err(ApiError::from_peer)?
            .into_inner();
        let ips = certificate_ips("ip_addresses", &key.ip_addresses)?;
        let cert_pem = ca
            .issue_to_naming(&identity, self.cert_ttl(), &key.public_key, &ips)
            .map_err(|e| ApiError::Domain(DomainError::invalid("public_key", e.to_string())))?;
        vra.install_certificate(tandem_proto::v1::InstallCertificateRequest {
            cert_pem,
            ca_pem: bundle,
        })
        .await
        .map_err(ApiError::from_peer)?;
        tracing::info!(%identity, "renewed a VRA's certificate");
        Ok(())
    }
}

/// Keeps this manager's certificate renewed until `shutdown`, its `ca.crt` as the state
/// names the site's CAs, and its certificate reported in the state: looks every few
/// seconds (a cheap check) and renews when a third of the lifetime is left or the site's
/// CA changed.
pub async fn keep_renewed(
    site: SiteManager,
    live: tandem_tls::LiveTls,
    pki: PkiDir,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let every = (site.cert_ttl() / 10).clamp(Duration::from_secs(1), Duration::from_secs(2));
    // The certificate a renewal replaced, until the watch loads the new one (a few
    // seconds): renewing it again meanwhile would only make another.
    let mut replaced: Option<(Vec<u8>, std::time::Instant)> = None;
    let mut own_cas = live.current().ca_pem().to_string();
    loop {
        // The site's own CAs as the state names them (a rotation adds one, then retires
        // one): written to `ca.crt`, where `tls_refresh::keep_tls` loads them.
        crate::ca_rotation::keep_own_bundle(
            site.node().read_local(|s| s.ca_bundle()),
            &live.current(),
            &mut own_cas,
        );
        let leaf = live.current().chain_leaf().to_vec();
        let loading = replaced
            .as_ref()
            .is_some_and(|(old, at)| *old == leaf && at.elapsed() < Duration::from_secs(30));
        if !loading {
            match site.renew_own(&live, &pki) {
                Ok(true) => replaced = Some((leaf, std::time::Instant::now())),
                Ok(false) => replaced = None,
                Err(e) => tracing::warn!(error = %e, "could not renew this manager's certificate"),
            }
        }
        if let Err(e) = site.record_own_cert(&live.current()).await {
            tracing::debug!(error = %e, "could not report this manager's certificate");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_when_a_third_of_the_lifetime_is_left() {
        let ttl = Duration::from_secs(90);
        let now = SystemTime::now();
        assert!(!renewal_due(Some(now + Duration::from_secs(60)), ttl));
        assert!(renewal_due(Some(now + Duration::from_secs(29)), ttl));
        assert!(renewal_due(Some(now - Duration::from_secs(1)), ttl));
        assert!(renewal_due(None, ttl));
    }

    #[test]
    fn a_certificate_names_at_most_four_addresses_of_one_host_each() {
        let ips = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let taken = certificate_ips("ip_addresses", &ips(&["127.0.0.1", "::1", "10.0.0.7"]))
            .expect("three host addresses");
        assert_eq!(taken.len(), 3);
        assert_eq!(certificate_ips("ip_addresses", &[]).expect("none").len(), 0);
        for refused in [
            ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]),
            ips(&["0.0.0.0"]),
            ips(&["::"]),
            ips(&["224.0.0.1"]),
            ips(&["ff02::1"]),
            ips(&["vra-1.example"]),
            ips(&["10.0.0.1:10809"]),
        ] {
            let err = certificate_ips("ip_addresses", &refused).expect_err("refused");
            assert!(
                matches!(err, ApiError::Domain(_)),
                "{refused:?} gave {err:?}"
            );
        }
    }
}
