//! Joining a node to its site: one-time join tokens, kept only as hashes, that a new
//! manager or VRA exchanges for its certificate; and the site CA kept in the replicated
//! state, so that whichever manager leads can issue certificates.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::access::{TOKEN_ID_LEN, TOKEN_SECRET_LEN, TokenId, hex, is_lower_hex};
use crate::error::DomainError;
use crate::events::{EventCode, NewEvent};
use crate::ids::HostId;

/// What every join token starts with (its format's version).
pub const JOIN_PREFIX: &str = "tdmj1";
/// Characters of the CA fingerprint a join token pins (SHA-256, hex).
pub const CA_FINGERPRINT_LEN: usize = 64;
/// The most CAs a site trusts at once (its CA and the one it rotates to or from, with room
/// to spare).
pub const MAX_SITE_CAS: usize = 4;
/// How long a join token lives unless its creator says otherwise.
pub const DEFAULT_JOIN_TTL_MS: u64 = 3600 * 1000;
/// The longest a join token may live: it is a bearer credential for a certificate.
pub const MAX_JOIN_TTL_MS: u64 = 24 * 3600 * 1000;
/// Join tokens a site keeps at most (expired ones are pruned first).
pub const MAX_JOIN_TOKENS: usize = 256;

/// Whom a join token lets in: the certificate it is exchanged for names this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Joiner {
    /// A manager node of the site, by its node id.
    Manager { node_id: u64 },
    /// The VRA of a host of the site.
    Vra { host: HostId },
}

impl fmt::Display for Joiner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Joiner::Manager { node_id } => write!(f, "manager node {node_id}"),
            Joiner::Vra { host } => write!(f, "the VRA of host {host}"),
        }
    }
}

/// A join token as the operator carries it to the new node:
/// `tdmj1.<id>.<secret>.<sha256 of the site CA>`. The fingerprint lets the node check, on
/// first contact, that it reached its site (as kubeadm's discovery hash does). Its Debug
/// hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinCode {
    id: TokenId,
    secret: String,
    ca_fingerprint: String,
}

impl Drop for JoinCode {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl fmt::Debug for JoinCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinCode({}.<secret>.{})", self.id, self.ca_fingerprint)
    }
}

impl JoinCode {
    /// A new code from 6 + 32 random bytes (the caller's randomness: no IO here).
    pub fn from_random(
        id: [u8; TOKEN_ID_LEN / 2],
        secret: [u8; TOKEN_SECRET_LEN / 2],
        ca_fingerprint: &str,
    ) -> Result<Self, DomainError> {
        if !is_lower_hex(ca_fingerprint, CA_FINGERPRINT_LEN) {
            return Err(DomainError::invalid(
                "ca_fingerprint",
                "must be a SHA-256 in lowercase hex",
            ));
        }
        Ok(Self {
            id: TokenId::parse("id", &hex(&id))?,
            secret: hex(&secret),
            ca_fingerprint: ca_fingerprint.to_string(),
        })
    }

    /// Parses a code as the operator gave it; bounded (anything longer is refused).
    pub fn parse(field: &str, s: &str) -> Result<Self, DomainError> {
        let s = s.trim();
        let malformed = || {
            DomainError::invalid(
                field,
                format!(
                    "a join token is {JOIN_PREFIX}.<id>.<secret>.<CA sha256>, as \
                     CreateJoinToken answers it"
                ),
            )
        };
        if s.len() != JOIN_PREFIX.len() + TOKEN_ID_LEN + TOKEN_SECRET_LEN + CA_FINGERPRINT_LEN + 3 {
            return Err(malformed());
        }
        let mut parts = s.split('.');
        let (Some(prefix), Some(id), Some(secret), Some(fp), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(malformed());
        };
        if prefix != JOIN_PREFIX
            || !is_lower_hex(id, TOKEN_ID_LEN)
            || !is_lower_hex(secret, TOKEN_SECRET_LEN)
            || !is_lower_hex(fp, CA_FINGERPRINT_LEN)
        {
            return Err(malformed());
        }
        Ok(Self {
            id: TokenId::parse(field, id)?,
            secret: secret.to_string(),
            ca_fingerprint: fp.to_string(),
        })
    }

    pub fn id(&self) -> &TokenId {
        &self.id
    }

    /// The SHA-256 (hex) of the CA the site's managers must present.
    pub fn ca_fingerprint(&self) -> &str {
        &self.ca_fingerprint
    }

    /// What the state keeps of the secret.
    pub fn secret_hash(&self) -> String {
        blake3::hash(self.secret.as_bytes()).to_hex().to_string()
    }

    /// The whole code, to hand to the operator once (never stored or logged).
    pub fn reveal(&self) -> String {
        format!(
            "{JOIN_PREFIX}.{}.{}.{}",
            self.id, self.secret, self.ca_fingerprint
        )
    }
}

/// A join token as the site keeps it: the hash of its secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub id: TokenId,
    pub joiner: Joiner,
    /// blake3 of the secret, hex.
    pub secret_hash: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// Who created it (the operator's token name and id).
    pub created_by: String,
}

/// Why a presented join token was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRejected {
    #[error("join token {0} is unknown, used or expired")]
    Unknown(TokenId),
    #[error("join token {0} does not match")]
    Mismatch(TokenId),
}

impl From<JoinRejected> for DomainError {
    fn from(e: JoinRejected) -> Self {
        DomainError::precondition(e.to_string())
    }
}

/// The site's join tokens, by id. A token leaves when it is used or once it expired.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JoinTokens {
    tokens: BTreeMap<TokenId, JoinToken>,
}

impl JoinTokens {
    fn prune(&mut self, now_ms: u64) {
        self.tokens.retain(|_, t| t.expires_at_ms > now_ms);
    }

    /// Adds a token (expired ones are pruned first).
    pub fn create(&mut self, token: JoinToken, now_ms: u64) -> Result<(), DomainError> {
        if !is_lower_hex(&token.secret_hash, 64) {
            return Err(DomainError::invalid(
                "secret_hash",
                "must be a blake3 hash in hex",
            ));
        }
        if token.expires_at_ms <= token.created_at_ms
            || token.expires_at_ms - token.created_at_ms > MAX_JOIN_TTL_MS
        {
            return Err(DomainError::invalid(
                "ttl",
                "a join token lives more than 0 and at most 24 hours",
            ));
        }
        self.prune(now_ms);
        if self.tokens.contains_key(&token.id) {
            return Err(DomainError::AlreadyExists {
                kind: "join token".into(),
                name: token.id.to_string(),
            });
        }
        if self.tokens.len() >= MAX_JOIN_TOKENS {
            return Err(DomainError::precondition(format!(
                "a site keeps at most {MAX_JOIN_TOKENS} unused join tokens; let some expire"
            )));
        }
        self.tokens.insert(token.id.clone(), token);
        Ok(())
    }

    /// Whom the live token `id` with this secret lets in, without using it.
    pub fn check(
        &self,
        id: &TokenId,
        secret_hash: &str,
        now_ms: u64,
    ) -> Result<&JoinToken, JoinRejected> {
        let t = self
            .tokens
            .get(id)
            .filter(|t| t.expires_at_ms > now_ms)
            .ok_or_else(|| JoinRejected::Unknown(id.clone()))?;
        // blake3's Hash compares in constant time.
        let stored = blake3::Hash::from_hex(&t.secret_hash)
            .map_err(|_| JoinRejected::Mismatch(id.clone()))?;
        let presented =
            blake3::Hash::from_hex(secret_hash).map_err(|_| JoinRejected::Mismatch(id.clone()))?;
        if stored != presented {
            return Err(JoinRejected::Mismatch(id.clone()));
        }
        Ok(t)
    }

    /// Uses the token: it lets in one node, once. Answers the event that records it.
    pub fn consume(
        &mut self,
        id: &TokenId,
        secret_hash: &str,
        identity: &str,
        now_ms: u64,
    ) -> Result<NewEvent, JoinRejected> {
        let joiner = self.check(id, secret_hash, now_ms)?.joiner.clone();
        self.tokens.remove(id);
        self.prune(now_ms);
        Ok(NewEvent {
            at_ms: now_ms,
            code: EventCode::NodeEnrolled,
            vpg: None,
            description: format!(
                "{joiner} joined the site with join token {id}: certificate issued for {identity}"
            ),
        })
    }

    /// The tokens still usable at `now_ms`.
    pub fn live(&self, now_ms: u64) -> impl Iterator<Item = &JoinToken> {
        self.tokens
            .values()
            .filter(move |t| t.expires_at_ms > now_ms)
    }

    /// Withdraws an unused token; answers it.
    pub fn revoke(&mut self, id: &TokenId) -> Result<JoinToken, DomainError> {
        self.tokens.remove(id).ok_or_else(|| DomainError::NotFound {
            kind: "join token".into(),
            id: id.to_string(),
        })
    }

    pub fn list(&self) -> impl Iterator<Item = &JoinToken> {
        self.tokens.values()
    }
}

/// A secret kept as text (a private key in PEM, a join token in a node's configuration).
/// Its Debug never shows it; its bytes are zeroed when it is dropped.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(pem: String) -> Self {
        Self(pem)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}

/// The site's CA as the managers keep it, so that any leader can sign. It never leaves
/// the site's managers: no API answer, event or log line carries the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteCaRecord {
    pub cert_pem: String,
    pub key_pem: Secret,
    /// SHA-256 of the certificate's DER, hex: what join and pairing tokens pin.
    pub fingerprint: String,
}

impl SiteCaRecord {
    /// Bounded and shaped like a CA (the certificate itself was parsed by whoever
    /// proposed it).
    pub fn validate(&self) -> Result<(), DomainError> {
        let bounded = |field: &str, s: &str, begin: &str| {
            if s.len() <= 16 * 1024 && s.contains(begin) {
                Ok(())
            } else {
                Err(DomainError::invalid(
                    field,
                    format!("must be PEM ({begin}) of at most 16 KiB"),
                ))
            }
        };
        bounded("cert_pem", &self.cert_pem, "-----BEGIN CERTIFICATE-----")?;
        bounded("key_pem", self.key_pem.expose(), "PRIVATE KEY-----")?;
        if !is_lower_hex(&self.fingerprint, CA_FINGERPRINT_LEN) {
            return Err(DomainError::invalid(
                "fingerprint",
                "must be a SHA-256 in lowercase hex",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn code(n: u8) -> JoinCode {
        JoinCode::from_random([n; 6], [n.wrapping_add(1); 32], FP).unwrap()
    }

    fn token(c: &JoinCode, joiner: Joiner, now: u64, ttl: u64) -> JoinToken {
        JoinToken {
            id: c.id().clone(),
            joiner,
            secret_hash: c.secret_hash(),
            created_at_ms: now,
            expires_at_ms: now + ttl,
            created_by: "test".into(),
        }
    }

    #[test]
    fn a_code_round_trips_and_its_debug_hides_the_secret() {
        let c = code(7);
        let shown = c.reveal();
        assert_eq!(JoinCode::parse("t", &shown).unwrap(), c);
        assert_eq!(c.ca_fingerprint(), FP);
        assert!(!format!("{c:?}").contains(&c.secret));
        for bad in [
            String::new(),
            shown.replace("tdmj1", "tdmj2"),
            shown.to_uppercase(),
            format!("{shown}0"),
            shown[..shown.len() - 1].to_string(),
            shown.replacen('.', ":", 1),
            "x".repeat(100_000),
        ] {
            assert!(JoinCode::parse("t", &bad).is_err(), "{bad:.40}");
        }
        assert!(JoinCode::from_random([1; 6], [1; 32], "nothex").is_err());
    }

    #[test]
    fn a_token_lets_in_one_node_once_and_only_before_it_expires() {
        let mut tokens = JoinTokens::default();
        let c = code(1);
        let vra = Joiner::Vra {
            host: HostId::parse("host", "h1").unwrap(),
        };
        tokens
            .create(token(&c, vra.clone(), 1_000, 10_000), 1_000)
            .unwrap();
        let forged = JoinCode::from_random([1; 6], [9; 32], FP).unwrap();
        assert!(matches!(
            tokens.check(c.id(), &forged.secret_hash(), 2_000),
            Err(JoinRejected::Mismatch(_))
        ));
        assert_eq!(
            tokens
                .check(c.id(), &c.secret_hash(), 2_000)
                .unwrap()
                .joiner,
            vra
        );
        let event = tokens
            .consume(c.id(), &c.secret_hash(), "tandem://s/vra/h1", 2_000)
            .unwrap();
        assert_eq!(event.code, EventCode::NodeEnrolled);
        assert!(!event.description.contains(&c.secret));
        // Used: a second join with the same token is refused.
        assert!(matches!(
            tokens.consume(c.id(), &c.secret_hash(), "x", 2_001),
            Err(JoinRejected::Unknown(_))
        ));
        let late = code(2);
        tokens
            .create(
                token(&late, Joiner::Manager { node_id: 4 }, 1_000, 5_000),
                1_000,
            )
            .unwrap();
        assert!(matches!(
            tokens.consume(late.id(), &late.secret_hash(), "x", 6_000),
            Err(JoinRejected::Unknown(_))
        ));
        // Revoked: gone, and no second time.
        let revoked = code(3);
        tokens
            .create(
                token(&revoked, Joiner::Manager { node_id: 5 }, 7_000, 5_000),
                7_000,
            )
            .unwrap();
        assert_eq!(tokens.live(7_001).count(), 1);
        tokens.revoke(revoked.id()).unwrap();
        assert!(tokens.revoke(revoked.id()).is_err());
        assert!(matches!(
            tokens.consume(revoked.id(), &revoked.secret_hash(), "x", 7_002),
            Err(JoinRejected::Unknown(_))
        ));
    }

    #[test]
    fn tokens_are_bounded_and_their_lifetime_too() {
        let mut tokens = JoinTokens::default();
        let m = Joiner::Manager { node_id: 2 };
        assert!(
            tokens
                .create(
                    token(&code(1), m.clone(), 1_000, MAX_JOIN_TTL_MS + 1),
                    1_000
                )
                .is_err()
        );
        assert!(
            tokens
                .create(token(&code(1), m.clone(), 1_000, 0), 1_000)
                .is_err()
        );
        for i in 0..MAX_JOIN_TOKENS {
            let c =
                JoinCode::from_random([(i >> 8) as u8, i as u8, 0, 0, 0, 1], [1; 32], FP).unwrap();
            tokens
                .create(token(&c, m.clone(), 1_000, 10), 1_000)
                .unwrap();
        }
        assert!(
            tokens
                .create(token(&code(200), m.clone(), 1_000, 10), 1_000)
                .is_err()
        );
        // Once they expired, they make room.
        tokens
            .create(token(&code(200), m, 2_000, 10), 2_000)
            .unwrap();
        assert_eq!(tokens.list().count(), 1);
    }

    #[test]
    fn the_ca_key_never_shows_in_debug() {
        let ca = SiteCaRecord {
            cert_pem: "-----BEGIN CERTIFICATE-----".into(),
            key_pem: Secret::new("-----BEGIN PRIVATE KEY-----\nsecretbytes".into()),
            fingerprint: FP.into(),
        };
        ca.validate().unwrap();
        assert!(!format!("{ca:?}").contains("secretbytes"));
    }
}
