//! The server check of a first contact (pairing): the site reached must present a manager
//! certificate issued by the CA whose fingerprint the operator was given, as kubeadm's
//! join pins its control plane's CA. Nothing else about the server is known yet.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::cert::fingerprint;
use crate::{PeerIdentity, PeerRole, TlsError, provider};

/// Accepts a server whose chain holds the pinned CA and whose certificate that CA issued
/// to a manager.
#[derive(Debug)]
pub struct PinnedCa {
    fingerprint: String,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl PinnedCa {
    pub fn new(fingerprint: &str) -> Result<Self, TlsError> {
        if fingerprint.len() != 64 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TlsError::Invalid(
                "a CA fingerprint is 64 hexadecimal digits (SHA-256)".into(),
            ));
        }
        Ok(Self {
            fingerprint: fingerprint.to_ascii_lowercase(),
            algorithms: provider().signature_verification_algorithms,
        })
    }
}

fn refuse(msg: String) -> rustls::Error {
    rustls::Error::General(msg)
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                refuse(format!(
                    "the site reached does not present the CA the pairing token names \
                     (fingerprint {}); check the token and the address",
                    self.fingerprint
                ))
            })?;
        let anchor = webpki::anchor_from_trusted_cert(ca)
            .map_err(|e| refuse(format!("the pinned CA: {e:?}")))?;
        webpki::EndEntityCert::try_from(end_entity)
            .and_then(|cert| {
                crate::config::issued_by(&cert, &[anchor], now, webpki::KeyUsage::server_auth())
            })
            .map_err(|e| refuse(format!("the server's certificate is not its CA's: {e:?}")))?;
        let who = PeerIdentity::from_cert(end_entity).map_err(|e| refuse(e.to_string()))?;
        if who.role != PeerRole::Manager {
            return Err(refuse(format!("{who} is not a manager")));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
