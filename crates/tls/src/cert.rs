//! Certificates as text: reading PEM (bounded), checking a site's CA bundle, and the
//! fingerprints a pairing token pins and statuses compare.

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::TlsError;

/// The certificates of `pem` (at least one).
pub(crate) fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("{what}: {e:?}")))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid(format!("{what}: no certificate")));
    }
    Ok(certs)
}

/// The longest CA certificate text a peer may hand over (a P-256 CA is under 1 KiB).
pub const MAX_CA_PEM: usize = 16 * 1024;

/// The fingerprint of a certificate: SHA-256 of its DER, in lowercase hex (what a pairing
/// token pins).
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The most CA certificates a site's bundle holds: its CA, and the one it rotates to or
/// from (room to spare for a rotation begun before the last ended).
pub const MAX_BUNDLE: usize = 4;

/// Checks that `pem` holds one CA certificate usable as a trust anchor (bounded); answers
/// its fingerprint.
pub fn check_ca_pem(pem: &str) -> Result<String, TlsError> {
    match check_ca_bundle(pem)?.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(TlsError::Invalid(
            "exactly one CA certificate is expected".into(),
        )),
    }
}

/// Checks that `pem` holds a site's CA bundle, 1 to [`MAX_BUNDLE`] CA certificates usable
/// as trust anchors (bounded, as received from a peer or a manager); answers their
/// fingerprints in the bundle's order.
pub fn check_ca_bundle(pem: &str) -> Result<Vec<String>, TlsError> {
    if pem.len() > MAX_CA_PEM {
        return Err(TlsError::Invalid(format!(
            "a CA bundle is at most {MAX_CA_PEM} bytes of PEM"
        )));
    }
    let certs = certs(pem, "CA certificate")?;
    if certs.len() > MAX_BUNDLE {
        return Err(TlsError::Invalid(format!(
            "a CA bundle holds at most {MAX_BUNDLE} certificates"
        )));
    }
    certs
        .iter()
        .map(|ca| {
            webpki::anchor_from_trusted_cert(ca)
                .map_err(|e| TlsError::Invalid(format!("CA certificate: {e:?}")))?;
            Ok(fingerprint(ca))
        })
        .collect()
}

/// One text for a set of CA fingerprints, whatever their order (what statuses compare).
pub fn bundle_key(fingerprints: &[String]) -> String {
    let mut sorted = fingerprints.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted.join(",")
}
