//! Rotating the site's CA without a failed handshake, as the replicated state records it:
//! the new CA is first trusted everywhere (the site's managers and VRAs, the paired
//! sites), then it issues and every certificate of the old one is renewed, then the old
//! CA is retired from every trust store. Also what each manager reports of its own
//! certificate, which tells the leader when no node uses the old CA any more.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::enroll::SiteCaRecord;
use crate::error::{DomainError, Violations};
use crate::events::{EventCode, NewEvent};

/// The most managers whose certificates are recorded (a site has a handful).
pub const MAX_NODE_CERTS: usize = 64;

/// Where a rotation of the site's CA stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaRotation {
    /// The new CA is being added to every trust store; the current one still issues.
    Trusting {
        next: SiteCaRecord,
        since_ms: u64,
        started_by: String,
    },
    /// The new CA issues and the old one's certificates are being renewed; both are
    /// still trusted.
    Issuing {
        old_cert_pem: String,
        old_fingerprint: String,
        since_ms: u64,
    },
}

impl CaRotation {
    /// The phase's name, as the status shows it.
    pub fn phase(&self) -> &'static str {
        match self {
            Self::Trusting { .. } => "trusting the new CA",
            Self::Issuing { .. } => "renewing certificates of the old CA",
        }
    }

    /// The CA besides the issuing one that every node trusts during this phase:
    /// (certificate, fingerprint).
    pub fn other_ca(&self) -> (&str, &str) {
        match self {
            Self::Trusting { next, .. } => (&next.cert_pem, &next.fingerprint),
            Self::Issuing {
                old_cert_pem,
                old_fingerprint,
                ..
            } => (old_cert_pem, old_fingerprint),
        }
    }

    pub fn since_ms(&self) -> u64 {
        match self {
            Self::Trusting { since_ms, .. } | Self::Issuing { since_ms, .. } => *since_ms,
        }
    }
}

/// What a manager reports of its own certificate and trust.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCert {
    /// The fingerprint of the CA that issued its certificate.
    pub issuer: String,
    /// The fingerprints of the site's CAs it trusts, sorted.
    pub trusts: Vec<String>,
    pub valid_until_ms: u64,
}

fn is_fingerprint(s: &str) -> bool {
    crate::access::is_lower_hex(s, crate::enroll::CA_FINGERPRINT_LEN)
}

impl NodeCert {
    pub fn validate(&self) -> Result<(), DomainError> {
        let mut v = Violations::new();
        v.check(
            is_fingerprint(&self.issuer),
            "issuer",
            "must be a SHA-256 in lowercase hex",
        );
        v.check(
            (1..=crate::enroll::MAX_SITE_CAS).contains(&self.trusts.len())
                && self.trusts.iter().all(|t| is_fingerprint(t)),
            "trusts",
            format!(
                "1 to {} SHA-256 fingerprints in lowercase hex",
                crate::enroll::MAX_SITE_CAS
            ),
        );
        v.into_result()
    }
}

/// The CA state of a site: the issuing CA, a rotation under way, and the managers'
/// certificates.
pub struct SiteCas<'a> {
    pub ca: &'a mut Option<SiteCaRecord>,
    pub rotation: &'a mut Option<CaRotation>,
    pub node_certs: &'a mut BTreeMap<u64, NodeCert>,
}

impl SiteCas<'_> {
    /// Starts a rotation to `next`; answers the event that records it.
    pub fn start(
        &mut self,
        next: SiteCaRecord,
        started_by: String,
        now_ms: u64,
    ) -> Result<NewEvent, DomainError> {
        next.validate()?;
        let Some(ca) = self.ca.as_ref() else {
            return Err(DomainError::precondition(
                "this site's managers hold no CA (it runs --insecure, or was given \
                 certificates without the CA key): there is none to rotate",
            ));
        };
        if let Some(r) = self.rotation.as_ref() {
            return Err(DomainError::precondition(format!(
                "a CA rotation is under way ({}); it must end first",
                r.phase()
            )));
        }
        if next.fingerprint == ca.fingerprint {
            return Err(DomainError::invalid("next", "is the CA that issues now"));
        }
        let event = NewEvent {
            at_ms: now_ms,
            code: EventCode::CaRotationStarted,
            vpg: None,
            description: format!(
                "{started_by} started rotating the site's CA: every node and paired site \
                 trusts the new CA {} before it issues; CA {} issues until then",
                next.fingerprint, ca.fingerprint
            ),
        };
        *self.rotation = Some(CaRotation::Trusting {
            next,
            since_ms: now_ms,
            started_by,
        });
        Ok(event)
    }

    /// The new CA `fingerprint` (trusted everywhere) issues from now on.
    pub fn issue_from_next(
        &mut self,
        fingerprint: &str,
        now_ms: u64,
    ) -> Result<NewEvent, DomainError> {
        let next = match self.rotation.as_ref() {
            Some(CaRotation::Trusting { next, .. }) if next.fingerprint == fingerprint => {
                next.clone()
            }
            _ => {
                return Err(DomainError::precondition(format!(
                    "CA {fingerprint} is not the one the site is rotating to"
                )));
            }
        };
        let old = self
            .ca
            .replace(next)
            .ok_or_else(|| DomainError::precondition("this site holds no CA"))?;
        *self.rotation = Some(CaRotation::Issuing {
            old_cert_pem: old.cert_pem,
            old_fingerprint: old.fingerprint.clone(),
            since_ms: now_ms,
        });
        Ok(NewEvent {
            at_ms: now_ms,
            code: EventCode::CaIssuing,
            vpg: None,
            description: format!(
                "every node and paired site trusts CA {fingerprint}: it issues now, and the \
                 certificates of CA {} are renewed",
                old.fingerprint
            ),
        })
    }

    /// Retires the old CA `fingerprint`: no node's certificate names it any more.
    pub fn retire_old(&mut self, fingerprint: &str, now_ms: u64) -> Result<NewEvent, DomainError> {
        match self.rotation.as_ref() {
            Some(CaRotation::Issuing {
                old_fingerprint, ..
            }) if old_fingerprint == fingerprint => {}
            _ => {
                return Err(DomainError::precondition(format!(
                    "CA {fingerprint} is not the one the site is rotating from"
                )));
            }
        }
        *self.rotation = None;
        Ok(NewEvent {
            at_ms: now_ms,
            code: EventCode::CaRetired,
            vpg: None,
            description: format!(
                "CA {fingerprint} is retired: no certificate in use names it, and no node or \
                 paired site trusts it any more"
            ),
        })
    }

    /// Records what manager `node` reports of its certificate.
    pub fn record(&mut self, node: u64, cert: NodeCert) -> Result<(), DomainError> {
        cert.validate()?;
        if !self.node_certs.contains_key(&node) && self.node_certs.len() >= MAX_NODE_CERTS {
            return Err(DomainError::precondition(format!(
                "at most {MAX_NODE_CERTS} managers' certificates are recorded"
            )));
        }
        self.node_certs.insert(node, cert);
        Ok(())
    }
}

/// The site's CA certificates every node trusts now, the issuing one first (PEM).
pub fn bundle(ca: Option<&SiteCaRecord>, rotation: Option<&CaRotation>) -> Option<String> {
    let ca = ca?;
    let mut pem = ca.cert_pem.trim_end().to_string();
    pem.push('\n');
    if let Some(r) = rotation {
        pem.push_str(r.other_ca().0.trim_end());
        pem.push('\n');
    }
    Some(pem)
}

/// The fingerprints of [`bundle`], sorted.
pub fn bundle_fingerprints(
    ca: Option<&SiteCaRecord>,
    rotation: Option<&CaRotation>,
) -> Vec<String> {
    let mut fps: Vec<String> = ca
        .map(|c| c.fingerprint.clone())
        .into_iter()
        .chain(rotation.map(|r| r.other_ca().1.to_string()))
        .collect();
    fps.sort();
    fps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enroll::Secret;

    fn ca(n: u8) -> SiteCaRecord {
        SiteCaRecord {
            cert_pem: format!("-----BEGIN CERTIFICATE-----\nCA{n}\n-----END CERTIFICATE-----\n"),
            key_pem: Secret::new(format!("-----BEGIN PRIVATE KEY-----\nK{n}\n")),
            fingerprint: format!("{n:x}").repeat(64),
        }
    }

    #[test]
    fn a_rotation_trusts_then_issues_then_retires_and_each_step_only_once() {
        let (mut issuing, mut rotation, mut certs) = (Some(ca(1)), None, BTreeMap::new());
        let mut cas = SiteCas {
            ca: &mut issuing,
            rotation: &mut rotation,
            node_certs: &mut certs,
        };
        assert!(cas.start(ca(1), "admin".into(), 1).is_err(), "the same CA");
        assert!(cas.issue_from_next(&ca(2).fingerprint, 1).is_err());
        cas.start(ca(2), "admin".into(), 1).unwrap();
        assert!(
            cas.start(ca(3), "admin".into(), 2).is_err(),
            "one at a time"
        );
        assert_eq!(
            bundle_fingerprints(cas.ca.as_ref(), cas.rotation.as_ref()),
            vec![ca(1).fingerprint, ca(2).fingerprint]
        );
        let both = bundle(cas.ca.as_ref(), cas.rotation.as_ref()).unwrap();
        assert!(both.starts_with(&ca(1).cert_pem) && both.ends_with(&ca(2).cert_pem));
        assert!(
            cas.retire_old(&ca(1).fingerprint, 3).is_err(),
            "not issuing yet"
        );
        assert!(cas.issue_from_next(&ca(3).fingerprint, 3).is_err());
        cas.issue_from_next(&ca(2).fingerprint, 3).unwrap();
        assert_eq!(cas.ca.as_ref().unwrap().fingerprint, ca(2).fingerprint);
        let both = bundle(cas.ca.as_ref(), cas.rotation.as_ref()).unwrap();
        assert!(both.starts_with(&ca(2).cert_pem) && both.ends_with(&ca(1).cert_pem));
        assert!(cas.retire_old(&ca(2).fingerprint, 4).is_err());
        let retired = cas.retire_old(&ca(1).fingerprint, 4).unwrap();
        assert_eq!(retired.code, EventCode::CaRetired);
        assert_eq!(
            bundle(cas.ca.as_ref(), cas.rotation.as_ref()).unwrap(),
            ca(2).cert_pem
        );
        assert!(cas.retire_old(&ca(1).fingerprint, 5).is_err());
    }

    #[test]
    fn a_node_report_is_bounded() {
        let (mut issuing, mut rotation, mut certs) = (Some(ca(1)), None, BTreeMap::new());
        let mut cas = SiteCas {
            ca: &mut issuing,
            rotation: &mut rotation,
            node_certs: &mut certs,
        };
        let good = NodeCert {
            issuer: ca(1).fingerprint,
            trusts: vec![ca(1).fingerprint],
            valid_until_ms: 9,
        };
        cas.record(1, good.clone()).unwrap();
        for bad in [
            NodeCert {
                issuer: "XY".into(),
                ..good.clone()
            },
            NodeCert {
                trusts: vec![],
                ..good.clone()
            },
            NodeCert {
                trusts: vec![ca(1).fingerprint; 9],
                ..good.clone()
            },
        ] {
            assert!(cas.record(2, bad).is_err());
        }
        for n in 2..=MAX_NODE_CERTS as u64 {
            cas.record(n, good.clone()).unwrap();
        }
        assert!(cas.record(1000, good.clone()).is_err());
        cas.record(1, good).unwrap();
    }
}
