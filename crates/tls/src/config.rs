//! The rustls configurations of a node, built from its PKI directory: as a server it
//! demands a client certificate issued by its site's CA; as a client it presents its own
//! and accepts only servers whose certificate that CA issued. TLS 1.3 only.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use crate::cert::{certs, check_ca_bundle, fingerprint};
use crate::identity::PeerIdentity;
use crate::pki::{PkiDir, read_key, read_small};
use crate::{TlsError, provider};

/// How much a server reads from its socket at once. rustls asks for about 4 KiB per read,
/// which for a stream of replicated writes meant a syscall per 4 KiB received.
const READ_AHEAD: usize = 32 * 1024;

/// A server's side of a TLS connection: stock rustls through tokio-rustls.
pub type ServerStream = tokio_rustls::server::TlsStream<tokio::io::BufReader<TcpStream>>;

/// Whether a server demands a client certificate: the internal and VRA ports do; the
/// operator port takes operators (tokens, no certificate) and paired sites' managers
/// (their certificates) on one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    Optional,
}

/// A node's TLS material: who it is, and its server and client configurations.
#[derive(Clone)]
pub struct TlsConfig {
    identity: PeerIdentity,
    /// This node's certificate, then its site's CA (so a client can pin the CA).
    chain: Arc<Vec<CertificateDer<'static>>>,
    /// The chain with this node's signing key, loaded once: the key's DER is zeroed as soon
    /// as the provider has parsed it, and every configuration shares this one.
    certified: Arc<CertifiedKey>,
    /// The site's CA certificates, as read from `ca.crt` (two while its CA is rotated).
    own_ca_pem: Arc<str>,
    /// The fingerprint of the CA among them that issued this node's certificate (None: none
    /// of them did, or the certificate is not valid now).
    issuer: Option<Arc<str>>,
    /// The sites trusted through files (`trust/<site>.crt`), besides this one.
    from_files: Arc<HashMap<String, Vec<CertificateDer<'static>>>>,
    server: Arc<ServerConfig>,
    server_optional: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// The CAs of each trusted site (this one's and its paired sites'), as trust anchors:
    /// a certificate naming a site is believed only if that site's CA issued it.
    anchors: Arc<HashMap<String, Vec<rustls::pki_types::TrustAnchor<'static>>>>,
    /// The directory it was loaded from (where renewed certificates appear).
    source: Option<PkiDir>,
    /// [`TlsConfig::valid_until`], once computed.
    valid_until: Arc<std::sync::OnceLock<Option<std::time::SystemTime>>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsConfig({})", self.identity)
    }
}

/// Whether `leaf` chains to one of `anchors` (directly: sites issue from their CA) and is
/// valid for `usage` at `at`.
pub(crate) fn issued_by(
    leaf: &webpki::EndEntityCert<'_>,
    anchors: &[rustls::pki_types::TrustAnchor<'_>],
    at: rustls::pki_types::UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), webpki::Error> {
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        anchors,
        &[],
        at,
        usage,
        None,
        None,
    )
    .map(|_| ())
}

/// Which of `cas` issued `leaf` (as valid now).
fn issuer_among(leaf: &CertificateDer<'_>, cas: &[CertificateDer<'static>]) -> Option<usize> {
    let leaf = webpki::EndEntityCert::try_from(leaf).ok()?;
    let now = rustls::pki_types::UnixTime::now();
    cas.iter().position(|ca| {
        webpki::anchor_from_trusted_cert(ca).is_ok_and(|anchor| {
            issued_by(&leaf, &[anchor], now, webpki::KeyUsage::client_auth()).is_ok()
        })
    })
}

fn roots_of<'a>(
    cas: impl IntoIterator<Item = &'a CertificateDer<'static>>,
) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in cas {
        roots.add(c.clone())?;
    }
    Ok(Arc::new(roots))
}

fn client_builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TlsError>
{
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?)
}

fn h2(mut client: ClientConfig) -> Arc<ClientConfig> {
    client.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(client)
}

/// A client that trusts the CAs in `ca_bundle_pem` and presents no certificate: an
/// operator's (the CLI, the lab's harness) on the operator port, which authenticates
/// itself with a token.
pub fn operator_client(ca_bundle_pem: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = roots_of(&certs(ca_bundle_pem, "CA bundle")?)?;
    Ok(h2(client_builder()?
        .with_root_certificates(roots)
        .with_no_client_auth()))
}

/// A client for a first contact with a site whose CA is known only by its fingerprint
/// (pairing): it accepts a manager certificate issued by the CA in the server's chain
/// whose fingerprint is `ca_fingerprint`, and presents no certificate (the pairing token
/// speaks for the caller).
pub fn pinned_client(ca_fingerprint: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = crate::pin::PinnedCa::new(ca_fingerprint)?;
    Ok(h2(client_builder()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth()))
}

impl TlsConfig {
    /// Loads the node's certificate, key and site CA from `dir`.
    pub fn load(dir: &PkiDir) -> Result<Self, TlsError> {
        match Self::load_files(dir) {
            // A renewal cut short by a crash between replacing the key and the certificate:
            // finish it, then load what it installed.
            Err(e) if dir.finish_interrupted_install().unwrap_or(false) => {
                tracing::warn!(dir = %dir.dir.display(), error = %e, "finished a certificate install a crash interrupted");
                Self::load_files(dir)
            }
            loaded => loaded,
        }
    }

    fn load_files(dir: &PkiDir) -> Result<Self, TlsError> {
        let own_ca_pem = read_small(&dir.ca_cert())?;
        let ca = certs(&own_ca_pem, "ca.crt")?;
        let mut chain = certs(&read_small(&dir.node_cert())?, "node.crt")?;
        let issuer = issuer_among(&chain[0], &ca);
        if chain.len() == 1 {
            // The issuer alone: a pinning client looks for it in the chain.
            match issuer {
                Some(i) => chain.push(ca[i].clone()),
                None => chain.extend(ca.iter().cloned()),
            }
        }
        let key = Zeroizing::new(
            PrivateKeyDer::from_pem_slice(read_key(&dir.node_key())?.as_bytes())
                .map_err(|e| TlsError::Invalid(format!("node.key: {e:?}")))?,
        );
        // Parsed from a borrow: a key handed to the provider by value is dropped unzeroed.
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| TlsError::Invalid(format!("node.key: {e}")))?;
        let certified = CertifiedKey::new(chain.clone(), signing_key);
        match certified.keys_match() {
            // As rustls's own loading does: a key that cannot tell its public half is taken.
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(e) => {
                return Err(TlsError::Invalid(format!(
                    "node.key does not match node.crt: {e}"
                )));
            }
        }
        let identity = PeerIdentity::from_cert(&chain[0])?;
        let mut from_files = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(dir.trust_dir()) {
            for e in entries.flatten() {
                let path = e.path();
                let Some(site) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".crt"))
                else {
                    continue;
                };
                if site != identity.site {
                    let pem = read_small(&path)?;
                    from_files.insert(site.to_string(), certs(&pem, &path.display().to_string())?);
                }
            }
        }
        let mut loaded = Self::build(
            identity,
            Arc::new(chain),
            Arc::new(certified),
            own_ca_pem.into(),
            Arc::new(from_files),
            &[],
        )?;
        loaded.source = Some(dir.clone());
        loaded.issuer = issuer.map(|i| fingerprint(&ca[i]).into());
        Ok(loaded)
    }

    /// The directory this configuration was loaded from.
    pub fn source(&self) -> Option<&PkiDir> {
        self.source.as_ref()
    }

    /// This node's certificate (DER), as it presents it.
    pub fn chain_leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    fn build(
        identity: PeerIdentity,
        chain: Arc<Vec<CertificateDer<'static>>>,
        certified: Arc<CertifiedKey>,
        own_ca_pem: Arc<str>,
        from_files: Arc<HashMap<String, Vec<CertificateDer<'static>>>>,
        peers: &[(String, Vec<CertificateDer<'static>>)],
    ) -> Result<Self, TlsError> {
        let mut anchors = (*from_files).clone();
        for (site, cas) in peers {
            anchors.insert(site.clone(), cas.clone());
        }
        anchors.insert(identity.site.clone(), certs(&own_ca_pem, "ca.crt")?);
        let roots = roots_of(anchors.values().flatten())?;
        let mut trust_anchors = HashMap::with_capacity(anchors.len());
        for (site, cas) in &anchors {
            let parsed = cas
                .iter()
                .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Invalid(format!("a CA of site {site}: {e:?}")))?;
            trust_anchors.insert(site.clone(), parsed);
        }
        let verifier = |optional: bool| {
            let b = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider(),
            );
            let b = if optional {
                b.allow_unauthenticated()
            } else {
                b
            };
            b.build()
                .map_err(|e| TlsError::Invalid(format!("client verifier: {e}")))
        };
        let server = |optional: bool| -> Result<Arc<ServerConfig>, TlsError> {
            let mut server = ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(verifier(optional)?)
                .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified.clone())));
            server.alpn_protocols = vec![b"h2".to_vec()];
            // Nothing resumes a session: tickets would only be work on both sides.
            server.send_tls13_tickets = 0;
            Ok(Arc::new(server))
        };
        let client = h2(client_builder()?
            .with_root_certificates(roots.clone())
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified.clone()))));
        Ok(Self {
            server: server(false)?,
            server_optional: server(true)?,
            client,
            identity,
            chain,
            certified,
            own_ca_pem,
            from_files,
            anchors: Arc::new(trust_anchors),
            source: None,
            issuer: None,
            valid_until: Arc::default(),
        })
    }

    /// This node's configuration trusting also `peers` (site id, its CA as PEM): the
    /// paired sites, whose managers then may call this node (as peers, never as members).
    pub fn with_peer_sites(&self, peers: &[(String, String)]) -> Result<Self, TlsError> {
        let mut parsed = Vec::with_capacity(peers.len());
        for (site, pem) in peers {
            if *site == self.identity.site {
                continue;
            }
            check_ca_bundle(pem).map_err(|e| TlsError::Invalid(format!("site {site}: {e}")))?;
            parsed.push((site.clone(), certs(pem, site)?));
        }
        let mut built = Self::build(
            self.identity.clone(),
            self.chain.clone(),
            self.certified.clone(),
            self.own_ca_pem.clone(),
            self.from_files.clone(),
            &parsed,
        )?;
        built.source = self.source.clone();
        built.issuer = self.issuer.clone();
        Ok(built)
    }

    /// A client for one paired site's managers: it trusts only that site's CAs
    /// (`peer_ca_pem`) and presents this node's certificate.
    pub fn peer_client(&self, peer_ca_pem: &str) -> Result<Arc<ClientConfig>, TlsError> {
        check_ca_bundle(peer_ca_pem)?;
        let roots = roots_of(&certs(peer_ca_pem, "peer CA")?)?;
        Ok(h2(client_builder()?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(
                SingleCertAndKey::from(self.certified.clone()),
            ))))
    }

    /// The site's CA certificates as PEM (what pairing hands to a peer): one, or two while
    /// the site's CA is rotated.
    pub fn ca_pem(&self) -> &str {
        &self.own_ca_pem
    }

    /// The fingerprint of the CA that issued this node's certificate (what its pairing
    /// tokens pin, and a pinning client finds in its chain).
    pub fn ca_fingerprint(&self) -> Result<String, TlsError> {
        self.issuer.as_deref().map(str::to_string).ok_or_else(|| {
            TlsError::Invalid(format!(
                "{}: no CA in ca.crt issued this node's certificate, or it is not valid now",
                self.identity
            ))
        })
    }

    /// The fingerprints of the site's CAs this node trusts (its `ca.crt`).
    pub fn own_ca_fingerprints(&self) -> Vec<String> {
        certs(&self.own_ca_pem, "ca.crt")
            .map(|c| c.iter().map(|c| fingerprint(c)).collect())
            .unwrap_or_default()
    }

    /// Checks that the site a verified certificate names is the site whose CA issued it
    /// (the handshake accepted any trusted CA; a paired site's CA must not speak for us).
    fn check_issuer(&self, peer: &PeerIdentity, leaf: &CertificateDer<'_>) -> Result<(), TlsError> {
        let anchors = self
            .anchors
            .get(&peer.site)
            .ok_or_else(|| TlsError::Invalid(format!("{peer}: its site is not trusted here")))?;
        webpki::EndEntityCert::try_from(leaf)
            .and_then(|cert| {
                issued_by(
                    &cert,
                    anchors,
                    rustls::pki_types::UnixTime::now(),
                    webpki::KeyUsage::client_auth(),
                )
            })
            .map_err(|e| {
                TlsError::Invalid(format!("{peer} was not issued by its site's CA: {e:?}"))
            })
    }

    /// Until when this node's certificate is valid (to the second): the end of its own
    /// validity or of its CA's, whichever comes first. None: it is not valid now.
    pub fn valid_until(&self) -> Option<std::time::SystemTime> {
        *self.valid_until.get_or_init(|| self.compute_valid_until())
    }

    fn compute_valid_until(&self) -> Option<std::time::SystemTime> {
        use std::time::{Duration, SystemTime, UNIX_EPOCH};
        let anchors = self.anchors.get(&self.identity.site)?;
        let leaf = webpki::EndEntityCert::try_from(&self.chain[0]).ok()?;
        // webpki does not show a certificate's validity; it checks it at a given time, so
        // the end is found by bisection (about 30 checks, once per certificate loaded).
        let valid_at = |secs: u64| {
            issued_by(
                &leaf,
                anchors,
                rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(secs)),
                webpki::KeyUsage::server_auth(),
            )
            .is_ok()
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        if !valid_at(now) {
            return None;
        }
        let (mut good, mut bad) = (now, now + crate::pki::CA_TTL.as_secs() + 86_400);
        while bad - good > 1 {
            let mid = good + (bad - good) / 2;
            if valid_at(mid) {
                good = mid;
            } else {
                bad = mid;
            }
        }
        Some(UNIX_EPOCH + Duration::from_secs(good))
    }

    /// Who this node is.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    pub fn client(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// The rustls server configuration for clients of `auth`.
    pub(crate) fn server_config(&self, auth: ClientAuth) -> Arc<ServerConfig> {
        match auth {
            ClientAuth::Required => self.server.clone(),
            ClientAuth::Optional => self.server_optional.clone(),
        }
    }

    /// Runs the server side of a handshake; answers the stream and who the client is (its
    /// certificate verified against its site's CA), or None where a certificate is
    /// optional and none was sent.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        auth: ClientAuth,
    ) -> Result<(ServerStream, Option<PeerIdentity>), TlsError> {
        let tcp = tokio::io::BufReader::with_capacity(READ_AHEAD, tcp);
        let mut stream = tokio_rustls::TlsAcceptor::from(self.server_config(auth))
            .accept(tcp)
            .await
            .map_err(|e| TlsError::Invalid(format!("handshake: {e}")))?;
        stream
            .get_mut()
            .1
            .set_buffer_limit(Some(crate::SEND_BUFFER));
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first());
        let peer = match leaf {
            Some(leaf) => {
                let peer = PeerIdentity::from_cert(leaf)?;
                self.check_issuer(&peer, leaf)?;
                Some(peer)
            }
            None if auth == ClientAuth::Optional => None,
            None => {
                return Err(TlsError::Invalid("the client sent no certificate".into()));
            }
        };
        Ok((stream, peer))
    }
}

/// A node's configuration that can be replaced while it serves (pairing and unpairing
/// change whom it trusts): each handshake takes the one current when it starts, so open
/// connections keep theirs.
#[derive(Clone, Debug)]
pub struct LiveTls(Arc<std::sync::RwLock<TlsConfig>>);

impl LiveTls {
    pub fn new(config: TlsConfig) -> Self {
        Self(Arc::new(std::sync::RwLock::new(config)))
    }

    pub fn current(&self) -> TlsConfig {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, config: TlsConfig) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = config;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{bundle_key, check_ca_pem};
    use crate::dial::TlsDial;
    use crate::pki::{NODE_TTL, SiteCa};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn node(ca: &SiteCa, dir: &std::path::Path, who: &PeerIdentity) -> TlsConfig {
        node_trusting(ca, dir, who, &[])
    }

    /// A node of `ca`'s site that also trusts `peers` (site, CA).
    fn node_trusting(
        ca: &SiteCa,
        dir: &std::path::Path,
        who: &PeerIdentity,
        peers: &[&SiteCa],
    ) -> TlsConfig {
        let pki = PkiDir::new(dir);
        ca.provision(&pki, who).unwrap();
        for p in peers {
            pki.trust(p.site(), p.cert_pem()).unwrap();
        }
        TlsConfig::load(&pki).unwrap()
    }

    /// One handshake from `client` to `server` over loopback; the server's view of the
    /// client, or why it failed.
    async fn handshake(server: &TlsConfig, client: &TlsConfig) -> Result<PeerIdentity, String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = server.clone();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let (mut s, peer) = server
                .accept(tcp, ClientAuth::Required)
                .await
                .map_err(|e| e.to_string())?;
            let peer = peer.expect("a certificate is required");
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            s.write_all(&b).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(peer)
        });
        let mut dial = TlsDial::new(client.client());
        let dialed =
            tower::Service::call(&mut dial, format!("http://{addr}").parse().unwrap()).await;
        if let Ok(io) = dialed {
            let mut s = io.into_inner();
            let _ = s.write_all(b"ping").await;
            let mut b = [0u8; 4];
            let _ = s.read_exact(&mut b).await;
        }
        served.await.unwrap()
    }

    #[tokio::test]
    async fn members_of_a_site_handshake_and_strangers_do_not() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = SiteCa::generate("site-a1").unwrap();
        let other = SiteCa::generate("site-b2").unwrap();
        let m1 = node(
            &ca,
            &tmp.path().join("m1"),
            &PeerIdentity::manager("site-a1", 1).unwrap(),
        );
        let m2 = node(
            &ca,
            &tmp.path().join("m2"),
            &PeerIdentity::manager("site-a1", 2).unwrap(),
        );
        let vra = node(
            &ca,
            &tmp.path().join("v"),
            &PeerIdentity::vra("site-a1", "h1").unwrap(),
        );
        let stranger = node(
            &other,
            &tmp.path().join("x"),
            &PeerIdentity::manager("site-b2", 1).unwrap(),
        );

        assert_eq!(handshake(&m1, &m2).await.unwrap(), *m2.identity());
        // Trusting a paired site's CA admits its nodes, but never as ours: a certificate
        // its CA made naming our site is refused.
        let m1_dir = tmp.path().join("m1");
        PkiDir::new(&m1_dir)
            .trust("site-b2", other.cert_pem())
            .unwrap();
        let m1_trusting = TlsConfig::load(&PkiDir::new(&m1_dir)).unwrap();
        let peer_vra = node_trusting(
            &other,
            &tmp.path().join("pv"),
            &PeerIdentity::vra("site-b2", "h7").unwrap(),
            &[&ca],
        );
        assert_eq!(
            handshake(&m1_trusting, &peer_vra).await.unwrap().site,
            "site-b2"
        );
        // A trusted paired site's CA (here trusted as site-c3) that signs a certificate
        // naming site a1.
        let rogue = SiteCa::generate("site-a1").unwrap();
        PkiDir::new(&m1_dir)
            .trust("site-c3", rogue.cert_pem())
            .unwrap();
        let m1_trusting = TlsConfig::load(&PkiDir::new(&m1_dir)).unwrap();
        let imp_dir = tmp.path().join("imp");
        rogue
            .provision(
                &PkiDir::new(&imp_dir),
                &PeerIdentity::manager("site-a1", 3).unwrap(),
            )
            .unwrap();
        // It trusts the real site a1 CA for servers (so the handshake gets to the server's
        // check), while its own certificate is the rogue CA's.
        std::fs::write(PkiDir::new(&imp_dir).ca_cert(), ca.cert_pem()).unwrap();
        let impostor = TlsConfig::load(&PkiDir::new(&imp_dir)).unwrap();
        let err = handshake(&m1_trusting, &impostor).await.unwrap_err();
        assert!(err.contains("not issued by its site's CA"), "{err}");
        assert_eq!(
            handshake(&m1, &vra).await.unwrap().role,
            crate::PeerRole::Vra
        );
        // Another site's certificate is not ours, either way round.
        assert!(handshake(&m1, &stranger).await.is_err());
        assert!(handshake(&stranger, &m1).await.is_err());
    }

    #[tokio::test]
    async fn during_a_ca_rotation_nodes_of_either_ca_handshake_once_both_are_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let (old, new) = (
            SiteCa::generate("site-a1").unwrap(),
            SiteCa::generate("site-a1").unwrap(),
        );
        let both = format!("{}{}", old.cert_pem(), new.cert_pem());
        let node_of = |ca: &SiteCa, name: &str, id: u64, cas: &str| {
            let pki = PkiDir::new(tmp.path().join(name));
            let who = PeerIdentity::manager("site-a1", id).unwrap();
            pki.install(cas, &ca.issue(&who, NODE_TTL).unwrap())
                .unwrap();
            TlsConfig::load(&pki).unwrap()
        };
        let on_old = node_of(&old, "m1", 1, &both);
        let on_new = node_of(&new, "m2", 2, &both);
        let old_only = node_of(&old, "m3", 3, old.cert_pem());
        let fp = |ca: &SiteCa| check_ca_pem(ca.cert_pem()).unwrap();
        assert_eq!(on_old.ca_fingerprint().unwrap(), fp(&old));
        assert_eq!(on_new.ca_fingerprint().unwrap(), fp(&new));
        let mut trusted = on_new.own_ca_fingerprints();
        trusted.sort();
        assert_eq!(bundle_key(&trusted), bundle_key(&[fp(&new), fp(&old)]));
        // The chain a node presents holds its issuer only (a pinning client finds it).
        assert_eq!(on_new.chain.len(), 2);
        assert_eq!(fingerprint(&on_new.chain[1]), fp(&new));
        handshake(&on_old, &on_new).await.unwrap();
        handshake(&on_new, &on_old).await.unwrap();
        handshake(&on_old, &old_only).await.unwrap();
        // A node that does not trust the new CA yet refuses its certificates, as a server
        // and as a client: why the new CA is trusted everywhere before it issues.
        assert!(handshake(&old_only, &on_new).await.is_err());
        assert!(handshake(&on_new, &old_only).await.is_err());
        assert!(check_ca_bundle(&both.repeat(3)).is_err(), "at most four");
        assert!(check_ca_pem(&both).is_err());
        // Moving to the new CA alone: a node whose certificate the old one issued keeps
        // no issuer among its CAs.
        PkiDir::new(tmp.path().join("m1"))
            .replace_ca(new.cert_pem())
            .unwrap();
        let stranded = TlsConfig::load(&PkiDir::new(tmp.path().join("m1"))).unwrap();
        assert!(stranded.ca_fingerprint().is_err());
        assert!(stranded.valid_until().is_none());
    }

    #[test]
    fn init_site_creates_the_ca_once_and_a_certificate_per_member() {
        let tmp = tempfile::tempdir().unwrap();
        let id = crate::pki::init_site(tmp.path(), &[1, 2], || "site-x1".into()).unwrap();
        assert_eq!(id, "site-x1");
        let again = crate::pki::init_site(tmp.path(), &[1, 2, 3], || unreachable!()).unwrap();
        assert_eq!(again, id);
        let m3 = TlsConfig::load(&PkiDir::new(tmp.path().join("manager-3"))).unwrap();
        assert_eq!(m3.identity(), &PeerIdentity::manager("site-x1", 3).unwrap());
        // Only the bootstrapping member holds the CA's key (to import it).
        assert!(PkiDir::new(tmp.path().join("manager-1")).ca_key().is_file());
        assert!(!PkiDir::new(tmp.path().join("manager-2")).ca_key().is_file());
    }

    #[test]
    fn a_certificate_is_valid_until_its_end_or_its_cas() {
        use std::time::{Duration, SystemTime};
        let tmp = tempfile::tempdir().unwrap();
        let ca = SiteCa::generate("site-a1").unwrap();
        let pki = PkiDir::new(tmp.path());
        let me = PeerIdentity::vra("site-a1", "h1").unwrap();
        pki.install(
            ca.cert_pem(),
            &ca.issue(&me, Duration::from_secs(3600)).unwrap(),
        )
        .unwrap();
        let until = TlsConfig::load(&pki).unwrap().valid_until().unwrap();
        let left = until.duration_since(SystemTime::now()).unwrap();
        assert!(
            left > Duration::from_secs(3590) && left <= Duration::from_secs(3600),
            "{left:?}"
        );
    }

    #[test]
    fn keys_are_owner_only_and_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let ca = SiteCa::generate("site-a1").unwrap();
        let pki = PkiDir::new(tmp.path());
        ca.save(&pki).unwrap();
        ca.provision(&pki, &PeerIdentity::manager("site-a1", 1).unwrap())
            .unwrap();
        for key in [pki.ca_key(), pki.node_key()] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        let again = SiteCa::load(&pki, "site-a1").unwrap();
        let issued = again
            .issue(&PeerIdentity::manager("site-a1", 2).unwrap(), NODE_TTL)
            .unwrap();
        assert!(issued.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(!format!("{issued:?}").contains("BEGIN"));
        assert!(
            again
                .issue(&PeerIdentity::manager("site-b2", 2).unwrap(), NODE_TTL)
                .is_err()
        );
        std::fs::set_permissions(pki.node_key(), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(TlsConfig::load(&pki).is_err());
    }
}
