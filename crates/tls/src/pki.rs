//! The site PKI on disk: a site's CA (ECDSA P-256), the certificates it issues to managers
//! and VRAs, and the directory each node keeps them in. Keys are written owner-only (0600)
//! and refused when anyone else may read them.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

use zeroize::Zeroizing;

use crate::TlsError;
use crate::identity::{PeerIdentity, PeerRole};

/// The DNS name every certificate also carries and every client asks for: peers are
/// told apart by their `tandem://` identity, not by host names (addresses change, and
/// the lab's link proxies stand in for them).
pub const SERVER_NAME: &str = "tandem.internal";
/// How long a CA is valid.
pub const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a node's certificate is valid by default.
pub const NODE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Clock skew tolerated between nodes: certificates are valid from this long ago.
const BACKDATE: Duration = Duration::from_secs(300);

/// The files of a node's PKI directory.
#[derive(Debug, Clone)]
pub struct PkiDir {
    pub dir: PathBuf,
}

impl PkiDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    /// The site CA's certificate: what peers are verified against.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    /// The site CA's key: only where certificates are issued.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn node_cert(&self) -> PathBuf {
        self.dir.join("node.crt")
    }
    pub fn node_key(&self) -> PathBuf {
        self.dir.join("node.key")
    }
    /// CAs of paired sites, one file per site: `trust/<site>.crt`.
    pub fn trust_dir(&self) -> PathBuf {
        self.dir.join("trust")
    }

    /// Trusts `site`'s CA (its nodes' certificates) from now on.
    pub fn trust(&self, site: &str, ca_cert_pem: &str) -> Result<(), TlsError> {
        PeerIdentity::manager(site, 1)?;
        write_file(
            &self.trust_dir().join(format!("{site}.crt")),
            ca_cert_pem,
            0o644,
        )
    }

    /// Whether this node has its certificate.
    pub fn is_provisioned(&self) -> bool {
        self.ca_cert().is_file() && self.node_cert().is_file() && self.node_key().is_file()
    }

    /// Writes a node's certificate, key and its site's CA certificate. The key and its
    /// certificate are replaced as a pair: both are written aside first, then renamed into
    /// place, the key first; a crash between the two renames is completed by
    /// [`PkiDir::finish_interrupted_install`] (renewal must never leave a node with a key
    /// and a certificate that do not match).
    /// Replaces the site's CAs this node trusts (`ca.crt`) with `bundle_pem`, atomically
    /// (a CA rotation adds the new CA, then retires the old).
    pub fn replace_ca(&self, bundle_pem: &str) -> Result<(), TlsError> {
        crate::cert::check_ca_bundle(bundle_pem)?;
        write_file(&self.ca_cert(), bundle_pem, 0o644)?;
        sync_dir(&self.dir)
    }

    pub fn install(&self, ca_cert_pem: &str, issued: &Issued) -> Result<(), TlsError> {
        write_file(&self.ca_cert(), ca_cert_pem, 0o644)?;
        let (key_next, cert_next) = (aside(&self.node_key()), aside(&self.node_cert()));
        write_file(&key_next, &issued.key_pem, 0o600)?;
        write_file(&cert_next, &issued.cert_pem, 0o644)?;
        std::fs::rename(&key_next, self.node_key()).map_err(io(&key_next))?;
        match std::fs::rename(&cert_next, self.node_cert()) {
            Ok(()) => {}
            // A loader met the pair half renamed and finished it.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && read_small(&self.node_cert())? == issued.cert_pem => {}
            Err(e) => return Err(io(&cert_next)(e)),
        }
        sync_dir(&self.dir)
    }

    /// Completes an [`PkiDir::install`] that a crash interrupted between its two renames
    /// (the new key in place, its certificate still aside). Answers whether there was one.
    pub fn finish_interrupted_install(&self) -> Result<bool, TlsError> {
        let cert_next = aside(&self.node_cert());
        if !cert_next.is_file() || aside(&self.node_key()).is_file() {
            return Ok(false);
        }
        std::fs::rename(&cert_next, self.node_cert()).map_err(io(&cert_next))?;
        sync_dir(&self.dir)?;
        Ok(true)
    }
}

/// Where [`PkiDir::install`] writes `path`'s next content before renaming it into place.
fn aside(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.next", path.display()))
}

/// Makes the renames in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `text` to `path` with `mode`, atomically (a temporary file, synced, renamed).
pub fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

/// Reads a file of at most 64 KiB (certificates and keys are small).
pub fn read_small(path: &Path) -> Result<String, TlsError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if meta.len() > 64 * 1024 {
        return Err(TlsError::Invalid(format!(
            "{}: too large for a certificate or key",
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(io(path))
}

/// Reads a private key, refusing one that others may read (as ssh does).
pub fn read_key(path: &Path) -> Result<Zeroizing<String>, TlsError> {
    let mode = std::fs::metadata(path)
        .map_err(io(path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::Invalid(format!(
            "{}: a private key must be readable by its owner only (mode {:o}; chmod 600)",
            path.display(),
            mode & 0o777
        )));
    }
    read_small(path).map(Zeroizing::new)
}

fn at(t: SystemTime) -> Result<time::OffsetDateTime, TlsError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| TlsError::Invalid("the clock is before 1970".into()))?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map_err(|e| TlsError::Invalid(e.to_string()))
}

/// Creates a site's CA in `out/ca` (once: a second run reuses it) and a certificate for
/// each of `members` in `out/manager-<id>`, where that node's `--pki-dir` points; the
/// lowest member also gets the CA's key, which it keeps in the site's state. Answers
/// the site's id (`new_site_id` names a new site). For deployments that start several
/// managers at once (docker-compose), before any of them runs.
pub fn init_site(
    out: &Path,
    members: &[u64],
    new_site_id: impl FnOnce() -> String,
) -> Result<String, TlsError> {
    let ca_dir = PkiDir::new(out.join("ca"));
    let id_file = ca_dir.dir.join("site.id");
    let ca = if ca_dir.ca_key().is_file() {
        let site = read_small(&id_file)?.trim().to_string();
        SiteCa::load(&ca_dir, &site)?
    } else {
        let ca = SiteCa::generate(&new_site_id())?;
        ca.save(&ca_dir)?;
        write_file(&id_file, ca.site(), 0o644)?;
        ca
    };
    for &id in members {
        let node = PkiDir::new(out.join(format!("manager-{id}")));
        if !node.is_provisioned() {
            ca.provision(&node, &PeerIdentity::manager(ca.site(), id)?)?;
        }
    }
    // The member that bootstraps the cluster (the lowest id) imports the CA's key into
    // the site's replicated state, so that the managers issue certificates (join tokens).
    if let Some(first) = members.iter().min() {
        let node = PkiDir::new(out.join(format!("manager-{first}")));
        if !node.ca_key().is_file() {
            write_file(&node.ca_key(), &ca.key.serialize_pem(), 0o600)?;
        }
    }
    Ok(ca.site().to_string())
}

/// A site's certificate authority.
pub struct SiteCa {
    site: String,
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for SiteCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SiteCa({})", self.site)
    }
}

/// The parameters of a site's CA. Rebuilt the same way to sign, so the issuer name and
/// key identifier of what it signs match its certificate.
fn ca_params(site: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, format!("tandem site {site} CA"));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// A node's certificate and key, as PEM (the key zeroed when dropped).
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issued(<certificate and key>)")
    }
}

impl SiteCa {
    /// A new CA for `site`.
    pub fn generate(site: &str) -> Result<Self, TlsError> {
        PeerIdentity::manager(site, 1)?; // the site id must be usable in identities
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params(site);
        let now = SystemTime::now();
        params.not_before = at(now - BACKDATE)?;
        params.not_after = at(now + CA_TTL)?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            site: site.to_string(),
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA kept in `dir` (its certificate and key).
    pub fn load(dir: &PkiDir, site: &str) -> Result<Self, TlsError> {
        let cert_pem = read_small(&dir.ca_cert())?;
        let key = KeyPair::from_pem(&read_key(&dir.ca_key())?)?;
        Ok(Self {
            site: site.to_string(),
            cert_pem,
            key,
        })
    }

    /// Keeps the CA's certificate and key in `dir`.
    pub fn save(&self, dir: &PkiDir) -> Result<(), TlsError> {
        write_file(&dir.ca_key(), &self.key_pem(), 0o600)?;
        write_file(&dir.ca_cert(), &self.cert_pem, 0o644)
    }

    /// The CA from its certificate and key (as the site's replicated state keeps them).
    pub fn from_pem(site: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        crate::cert::check_ca_pem(cert_pem)?;
        Ok(Self {
            site: site.to_string(),
            cert_pem: cert_pem.to_string(),
            key: KeyPair::from_pem(key_pem)?,
        })
    }

    /// The CA's key, as PEM: only for the site's replicated state.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key.serialize_pem())
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `who`, valid for `ttl`, with a new key.
    pub fn issue(&self, who: &PeerIdentity, ttl: Duration) -> Result<Issued, TlsError> {
        self.issue_for(who, ttl, &[])
    }

    /// [`Self::issue`], also naming `ips`: for servers that are not Tandem's and whose
    /// clients check the address they dial (etcd's members, in the benchmark).
    pub fn issue_for(
        &self,
        who: &PeerIdentity,
        ttl: Duration,
        ips: &[std::net::IpAddr],
    ) -> Result<Issued, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = self
            .leaf_params(who, ttl, ips)?
            .signed_by(&key, &self.issuer())?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// A certificate for `who`, valid for `ttl`, for the key a joining node holds (its
    /// public point, 65 bytes): the key never leaves that node.
    pub fn issue_to(
        &self,
        who: &PeerIdentity,
        ttl: Duration,
        public_key: &[u8],
    ) -> Result<String, TlsError> {
        self.issue_to_naming(who, ttl, public_key, &[])
    }

    /// [`Self::issue_to`], also naming `ips` (a VRA's NBD listener, for clients that
    /// check the address they dial).
    pub fn issue_to_naming(
        &self,
        who: &PeerIdentity,
        ttl: Duration,
        public_key: &[u8],
        ips: &[std::net::IpAddr],
    ) -> Result<String, TlsError> {
        let key = RequestedKey::new(public_key)?;
        Ok(self
            .leaf_params(who, ttl, ips)?
            .signed_by(&key, &self.issuer())?
            .pem())
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::new(ca_params(&self.site), &self.key)
    }

    fn leaf_params(
        &self,
        who: &PeerIdentity,
        ttl: Duration,
        ips: &[std::net::IpAddr],
    ) -> Result<CertificateParams, TlsError> {
        if who.site != self.site {
            return Err(TlsError::Invalid(format!(
                "the CA of site {} cannot issue for {who}",
                self.site
            )));
        }
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, who.uri());
        p.subject_alt_names = vec![
            SanType::URI(
                who.uri()
                    .try_into()
                    .map_err(|e| TlsError::Invalid(format!("{e:?}")))?,
            ),
            SanType::DnsName(
                SERVER_NAME
                    .try_into()
                    .map_err(|e| TlsError::Invalid(format!("{e:?}")))?,
            ),
        ];
        p.subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if who.role == PeerRole::Client {
            // qemu refuses a client certificate whose (critical) key usage lacks key
            // encipherment, whatever its key type.
            p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        p.not_before = at(now - BACKDATE)?;
        p.not_after = at(now + ttl)?;
        Ok(p)
    }

    /// Gives `who` its certificate in `dir`, with this CA's certificate beside it.
    pub fn provision(&self, dir: &PkiDir, who: &PeerIdentity) -> Result<(), TlsError> {
        dir.install(&self.cert_pem, &self.issue(who, NODE_TTL)?)
    }

    /// Writes a client certificate for NBD (`tandem://SITE/client/NAME`) into `dir`, in
    /// the layout qemu's `tls-creds-x509` (endpoint=client) and libnbd's
    /// `tls-certificates` read: `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
    pub fn provision_nbd_client(&self, dir: &Path, name: &str) -> Result<(), TlsError> {
        let issued = self.issue(&PeerIdentity::client(&self.site, name)?, NODE_TTL)?;
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_file(&dir.join("ca-cert.pem"), &self.cert_pem, 0o644)?;
        write_file(&dir.join("client-cert.pem"), &issued.cert_pem, 0o644)?;
        write_file(&dir.join("client-key.pem"), &issued.key_pem, 0o600)
    }
}

/// What a joining node signs with its new key: binds the key to the join token it is
/// presented with.
fn join_proof_message(token_id: &str, public_key: &[u8]) -> Vec<u8> {
    let mut m = b"tandem-join-v1\0".to_vec();
    m.extend_from_slice(token_id.as_bytes());
    m.push(0);
    m.extend_from_slice(public_key);
    m
}

/// A node's new key, made where it will be used: only its public half travels.
pub struct NodeKey(KeyPair);

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKey(<private key>)")
    }
}

impl NodeKey {
    pub fn generate() -> Result<Self, TlsError> {
        Ok(Self(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?))
    }

    /// The public point (65 bytes, uncompressed P-256).
    pub fn public_key(&self) -> &[u8] {
        self.0.public_key_raw()
    }

    /// Proof that this node holds the key it asks a certificate for, under `token_id`.
    pub fn prove(&self, token_id: &str) -> Result<Vec<u8>, TlsError> {
        use rcgen::SigningKey;
        Ok(self
            .0
            .sign(&join_proof_message(token_id, self.public_key()))?)
    }

    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.0.serialize_pem())
    }
}

/// Checks that whoever asks a certificate for `public_key` under `token_id` holds its
/// private half.
pub fn verify_join_proof(public_key: &[u8], token_id: &str, proof: &[u8]) -> Result<(), TlsError> {
    RequestedKey::new(public_key)?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public_key)
        .verify(&join_proof_message(token_id, public_key), proof)
        .map_err(|_| TlsError::Invalid("the proof of key possession does not verify".into()))
}

/// A public key a node asked a certificate for: an uncompressed P-256 point.
struct RequestedKey<'a>(&'a [u8]);

impl<'a> RequestedKey<'a> {
    fn new(point: &'a [u8]) -> Result<Self, TlsError> {
        if point.len() != 65 || point[0] != 4 {
            return Err(TlsError::Invalid(
                "a public key is an uncompressed P-256 point (65 bytes)".into(),
            ));
        }
        Ok(Self(point))
    }
}

impl rcgen::PublicKeyData for RequestedKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_issued_to_a_key_that_stays_with_its_node() {
        let dir = tempfile::tempdir().unwrap();
        let ca = SiteCa::generate("site-a1").unwrap();
        let again = SiteCa::from_pem("site-a1", ca.cert_pem(), &ca.key_pem()).unwrap();
        let key = NodeKey::generate().unwrap();
        let proof = key.prove("0123456789ab").unwrap();
        verify_join_proof(key.public_key(), "0123456789ab", &proof).unwrap();
        // The proof is bound to the token and to the key.
        assert!(verify_join_proof(key.public_key(), "0123456789ac", &proof).is_err());
        let other = NodeKey::generate().unwrap();
        assert!(verify_join_proof(other.public_key(), "0123456789ab", &proof).is_err());
        assert!(verify_join_proof(&[4; 64], "0123456789ab", &proof).is_err());

        let who = PeerIdentity::vra("site-a1", "h1").unwrap();
        let cert_pem = again.issue_to(&who, NODE_TTL, key.public_key()).unwrap();
        let pki = PkiDir::new(dir.path());
        pki.install(
            ca.cert_pem(),
            &Issued {
                cert_pem,
                key_pem: key.key_pem(),
            },
        )
        .unwrap();
        let tls = crate::TlsConfig::load(&pki).unwrap();
        assert_eq!(tls.identity(), &who);
        assert!(
            again
                .issue_to(
                    &PeerIdentity::vra("site-b2", "h1").unwrap(),
                    NODE_TTL,
                    key.public_key()
                )
                .is_err()
        );
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_renewal_cut_between_its_key_and_its_certificate_is_finished_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca = SiteCa::generate("site-a1").unwrap();
        let me = PeerIdentity::manager("site-a1", 2).unwrap();
        let pki = PkiDir::new(dir.path());
        pki.install(ca.cert_pem(), &ca.issue(&me, NODE_TTL).unwrap())
            .unwrap();
        let old = crate::TlsConfig::load(&pki).unwrap();
        // The crash: the new key renamed into place, its certificate still aside.
        let renewed = ca.issue(&me, NODE_TTL).unwrap();
        write_file(&pki.node_key(), &renewed.key_pem, 0o600).unwrap();
        write_file(&aside(&pki.node_cert()), &renewed.cert_pem, 0o644).unwrap();
        let loaded = crate::TlsConfig::load(&pki).unwrap();
        assert_ne!(loaded.chain_leaf(), old.chain_leaf());
        assert!(!aside(&pki.node_cert()).exists());
        // Cut before either rename: the old pair stays in use, the next install proceeds.
        write_file(&aside(&pki.node_key()), &renewed.key_pem, 0o600).unwrap();
        assert!(!pki.finish_interrupted_install().unwrap());
        assert_eq!(
            crate::TlsConfig::load(&pki).unwrap().chain_leaf(),
            loaded.chain_leaf()
        );
        pki.install(ca.cert_pem(), &ca.issue(&me, NODE_TTL).unwrap())
            .unwrap();
        assert!(crate::TlsConfig::load(&pki).is_ok());
    }
}
