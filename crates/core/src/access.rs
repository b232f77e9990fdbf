//! Operator access: API tokens with roles (viewer, operator, admin), kept in the replicated
//! state only as hashes, and the check of a presented bearer token against them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::error::{DomainError, Violations};
use crate::ids::check_name;

/// What a token may do. Ordered: each role may do everything the one before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Reads: sites, inventory, VPGs, checkpoints, events, alerts, tasks.
    Viewer,
    /// Day-to-day protection: checkpoints, failover tests, pause, resume, force sync.
    Operator,
    /// Everything, including failover, move, delete, pairing, inventory and tokens.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(field: &str, s: &str) -> Result<Self, DomainError> {
        Self::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| DomainError::invalid(field, "must be viewer, operator or admin"))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The public half of a token: names it in lists, events and revocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TokenId(String);

/// Characters of a token id (hex).
pub const TOKEN_ID_LEN: usize = 12;
/// Characters of a token's secret (hex of 32 random bytes).
pub const TOKEN_SECRET_LEN: usize = 64;
/// What every token starts with (the format's version, so a new one can be told apart).
pub const TOKEN_PREFIX: &str = "tdm1";
/// Tokens a site keeps at most (revoked and expired ones included until pruned).
pub const MAX_TOKENS: usize = 1000;
/// How long revoked and expired tokens stay listed before they are pruned.
pub const KEEP_ENDED_TOKENS_MS: u64 = 30 * 24 * 3600 * 1000;
/// The longest lifetime a token can be given (one year).
pub const MAX_TOKEN_TTL_MS: u64 = 366 * 24 * 3600 * 1000;

pub(crate) fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl TokenId {
    pub fn parse(field: &str, s: &str) -> Result<Self, DomainError> {
        if is_lower_hex(s, TOKEN_ID_LEN) {
            Ok(Self(s.to_string()))
        } else {
            Err(DomainError::invalid(
                field,
                format!("a token id is {TOKEN_ID_LEN} lowercase hex characters"),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A whole token as the operator holds it: `tdm1.<id>.<secret>`. Its Debug hides the secret;
/// the secret is zeroed when the token is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken {
    id: TokenId,
    secret: String,
}

impl Drop for BearerToken {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BearerToken({}.<secret>)", self.id)
    }
}

/// Why a presented token was not taken. Every variant means UNAUTHENTICATED.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejected {
    #[error("no API token was presented (send `authorization: Bearer <token>`)")]
    Missing,
    #[error("the API token is malformed")]
    Malformed,
    #[error("API token {0} is unknown")]
    Unknown(TokenId),
    #[error("API token {0} does not match")]
    Mismatch(TokenId),
    #[error("API token {0} has expired")]
    Expired(TokenId),
    #[error("API token {0} was revoked")]
    Revoked(TokenId),
}

impl BearerToken {
    /// A new token from 6 + 32 random bytes (the caller's randomness: this crate does no IO).
    pub fn from_random(id: [u8; TOKEN_ID_LEN / 2], secret: [u8; TOKEN_SECRET_LEN / 2]) -> Self {
        Self {
            id: TokenId(hex(&id)),
            secret: hex(&secret),
        }
    }

    /// Parses a token as presented; bounded (anything longer than a token is refused).
    pub fn parse(s: &str) -> Result<Self, TokenRejected> {
        let s = s.trim();
        if s.len() != TOKEN_PREFIX.len() + TOKEN_ID_LEN + TOKEN_SECRET_LEN + 2 {
            return Err(TokenRejected::Malformed);
        }
        let mut parts = s.split('.');
        let (Some(prefix), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenRejected::Malformed);
        };
        if prefix != TOKEN_PREFIX
            || !is_lower_hex(id, TOKEN_ID_LEN)
            || !is_lower_hex(secret, TOKEN_SECRET_LEN)
        {
            return Err(TokenRejected::Malformed);
        }
        Ok(Self {
            id: TokenId(id.to_string()),
            secret: secret.to_string(),
        })
    }

    /// Parses the value of an `authorization` header (`Bearer <token>`).
    pub fn from_header(value: &str) -> Result<Self, TokenRejected> {
        let Some((scheme, token)) = value.split_once(' ') else {
            return Err(TokenRejected::Malformed);
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(TokenRejected::Malformed);
        }
        Self::parse(token)
    }

    pub fn id(&self) -> &TokenId {
        &self.id
    }

    /// The whole token, to hand to the operator once (never stored or logged).
    pub fn reveal(&self) -> String {
        format!("{TOKEN_PREFIX}.{}.{}", self.id, self.secret)
    }

    /// What the state keeps of the secret.
    pub fn secret_hash(&self) -> String {
        blake3::hash(self.secret.as_bytes()).to_hex().to_string()
    }
}

/// A token as the site keeps it: its hash, never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub id: TokenId,
    pub name: String,
    pub role: Role,
    /// blake3 of the secret, hex.
    pub secret_hash: String,
    pub created_at_ms: u64,
    /// None: it does not expire.
    pub expires_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
    /// Who created it (a token's name and id, or "bootstrap").
    pub created_by: String,
}

impl ApiToken {
    pub fn new(
        bearer: &BearerToken,
        name: String,
        role: Role,
        now_ms: u64,
        ttl_ms: Option<u64>,
        created_by: String,
    ) -> Self {
        Self {
            id: bearer.id().clone(),
            name,
            role,
            secret_hash: bearer.secret_hash(),
            created_at_ms: now_ms,
            expires_at_ms: ttl_ms.map(|t| now_ms.saturating_add(t)),
            revoked_at_ms: None,
            created_by,
        }
    }

    pub fn validate(&self) -> Result<(), DomainError> {
        let mut v = Violations::new();
        v.absorb(check_name("name", &self.name));
        v.check(
            is_lower_hex(&self.secret_hash, 64),
            "secret_hash",
            "must be a blake3 hash in hex",
        );
        if let Some(exp) = self.expires_at_ms {
            v.check(
                exp > self.created_at_ms && exp - self.created_at_ms <= MAX_TOKEN_TTL_MS + 1000,
                "ttl",
                "must be more than 0 and at most 366 days",
            );
        }
        v.into_result()
    }

    /// Whether it still lets calls in at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|e| now_ms < e)
    }

    fn ended_before(&self, ms: u64) -> bool {
        self.revoked_at_ms.is_some_and(|r| r < ms) || self.expires_at_ms.is_some_and(|e| e < ms)
    }
}

/// Who made a call: what the audit trail names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token: TokenId,
    pub name: String,
    pub role: Role,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (token {}, {})", self.name, self.token, self.role)
    }
}

/// The site's tokens, by id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenTable {
    tokens: BTreeMap<TokenId, ApiToken>,
    /// Set once the first admin token was installed: a restart never installs it again,
    /// even after every token was revoked.
    bootstrapped: bool,
}

impl TokenTable {
    /// Checks a presented token at `now_ms`.
    pub fn authenticate(
        &self,
        presented: &BearerToken,
        now_ms: u64,
    ) -> Result<Caller, TokenRejected> {
        let id = presented.id();
        let t = self
            .tokens
            .get(id)
            .ok_or_else(|| TokenRejected::Unknown(id.clone()))?;
        // blake3's Hash compares in constant time.
        let stored = blake3::Hash::from_hex(&t.secret_hash)
            .map_err(|_| TokenRejected::Mismatch(id.clone()))?;
        if blake3::hash(presented.secret.as_bytes()) != stored {
            return Err(TokenRejected::Mismatch(id.clone()));
        }
        if t.revoked_at_ms.is_some() {
            return Err(TokenRejected::Revoked(id.clone()));
        }
        if !t.is_live(now_ms) {
            return Err(TokenRejected::Expired(id.clone()));
        }
        Ok(Caller {
            token: id.clone(),
            name: t.name.clone(),
            role: t.role,
        })
    }

    pub fn list(&self) -> impl Iterator<Item = &ApiToken> {
        self.tokens.values()
    }

    pub fn is_bootstrapped(&self) -> bool {
        self.bootstrapped
    }

    /// Adds a token (ended ones older than [`KEEP_ENDED_TOKENS_MS`] are pruned first).
    pub fn create(&mut self, token: ApiToken, now_ms: u64) -> Result<(), DomainError> {
        token.validate()?;
        let horizon = now_ms.saturating_sub(KEEP_ENDED_TOKENS_MS);
        self.tokens.retain(|_, t| !t.ended_before(horizon));
        if self.tokens.contains_key(&token.id) {
            return Err(DomainError::AlreadyExists {
                kind: "API token".into(),
                name: token.id.to_string(),
            });
        }
        if self.tokens.len() >= MAX_TOKENS {
            return Err(DomainError::precondition(format!(
                "a site keeps at most {MAX_TOKENS} tokens; revoke some first"
            )));
        }
        self.tokens.insert(token.id.clone(), token);
        Ok(())
    }

    /// Installs the first admin token, once in the life of the site.
    pub fn bootstrap(&mut self, token: ApiToken, now_ms: u64) -> Result<(), DomainError> {
        if self.bootstrapped {
            return Ok(());
        }
        if token.role != Role::Admin {
            return Err(DomainError::invalid(
                "role",
                "the first token must be admin",
            ));
        }
        self.create(token, now_ms)?;
        self.bootstrapped = true;
        Ok(())
    }

    /// Revokes a token (revoking it again is harmless).
    pub fn revoke(&mut self, id: &TokenId, now_ms: u64) -> Result<(), DomainError> {
        let t = self
            .tokens
            .get_mut(id)
            .ok_or_else(|| DomainError::NotFound {
                kind: "API token".into(),
                id: id.to_string(),
            })?;
        t.revoked_at_ms.get_or_insert(now_ms);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(n: u8) -> BearerToken {
        BearerToken::from_random([n; 6], [n.wrapping_add(1); 32])
    }

    fn token(b: &BearerToken, role: Role, ttl: Option<u64>) -> ApiToken {
        ApiToken::new(b, "ops".into(), role, 1_000, ttl, "test".into())
    }

    #[test]
    fn a_token_round_trips_and_its_debug_hides_the_secret() {
        let b = bearer(7);
        let shown = b.reveal();
        assert_eq!(BearerToken::parse(&shown).unwrap(), b);
        assert_eq!(
            BearerToken::from_header(&format!("Bearer {shown}")).unwrap(),
            b
        );
        assert!(!format!("{b:?}").contains(&b.secret));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = bearer(1).reveal();
        for bad in [
            String::new(),
            "Bearer".into(),
            good.replace("tdm1", "tdm2"),
            good.to_uppercase(),
            format!("{good}0"),
            good[..good.len() - 1].to_string(),
            good.replacen('.', ":", 1),
            "x".repeat(100_000),
        ] {
            assert_eq!(
                BearerToken::parse(&bad),
                Err(TokenRejected::Malformed),
                "{bad:.40}"
            );
        }
        assert_eq!(
            BearerToken::from_header(&format!("Basic {good}")),
            Err(TokenRejected::Malformed)
        );
    }

    #[test]
    fn authentication_checks_secret_expiry_and_revocation() {
        let mut table = TokenTable::default();
        let admin = bearer(1);
        let short = bearer(2);
        table
            .bootstrap(token(&admin, Role::Admin, None), 1_000)
            .unwrap();
        table
            .create(token(&short, Role::Viewer, Some(5_000)), 1_000)
            .unwrap();
        assert_eq!(table.authenticate(&admin, 2_000).unwrap().role, Role::Admin);
        assert_eq!(
            table.authenticate(&short, 5_999).unwrap().role,
            Role::Viewer
        );
        assert!(matches!(
            table.authenticate(&short, 6_000),
            Err(TokenRejected::Expired(_))
        ));
        // Right id, wrong secret.
        let forged = BearerToken::from_random([2; 6], [9; 32]);
        assert!(matches!(
            table.authenticate(&forged, 2_000),
            Err(TokenRejected::Mismatch(_))
        ));
        assert!(matches!(
            table.authenticate(&bearer(3), 2_000),
            Err(TokenRejected::Unknown(_))
        ));
        table.revoke(admin.id(), 3_000).unwrap();
        assert!(matches!(
            table.authenticate(&admin, 3_001),
            Err(TokenRejected::Revoked(_))
        ));
    }

    #[test]
    fn the_first_admin_token_is_installed_once_in_the_life_of_the_site() {
        let mut table = TokenTable::default();
        let first = bearer(1);
        table
            .bootstrap(token(&first, Role::Admin, None), 1_000)
            .unwrap();
        table.revoke(first.id(), 2_000).unwrap();
        // A restarted bootstrap node proposes its file's token again: nothing changes.
        table
            .bootstrap(token(&bearer(4), Role::Admin, None), 3_000)
            .unwrap();
        assert_eq!(table.list().count(), 1);
        assert!(table.authenticate(&bearer(4), 3_000).is_err());
    }

    #[test]
    fn tokens_are_bounded_and_ended_ones_are_pruned() {
        let mut table = TokenTable::default();
        for i in 0..MAX_TOKENS {
            let b = BearerToken::from_random([(i >> 8) as u8, i as u8, 0, 0, 0, 1], [1; 32]);
            table
                .create(token(&b, Role::Viewer, Some(10)), 1_000)
                .unwrap();
        }
        let one_more = bearer(200);
        assert!(
            table
                .create(token(&one_more, Role::Viewer, None), 1_000)
                .is_err()
        );
        // A month later the expired ones are pruned to make room.
        table
            .create(
                token(&one_more, Role::Viewer, None),
                1_000 + KEEP_ENDED_TOKENS_MS + 100,
            )
            .unwrap();
        assert_eq!(table.list().count(), 1);
    }

    #[test]
    fn bad_definitions_are_refused() {
        let b = bearer(1);
        let mut t = token(&b, Role::Viewer, Some(0));
        assert!(t.validate().is_err());
        t.expires_at_ms = Some(t.created_at_ms + MAX_TOKEN_TTL_MS * 2);
        assert!(t.validate().is_err());
        t.expires_at_ms = None;
        t.name = " ".into();
        assert!(t.validate().is_err());
    }
}
