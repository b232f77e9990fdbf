//! Entry point of the `tokens` fuzz target in `fuzz/` (built with the `fuzzing` feature),
//! also replayed over the checked-in corpus by `tests/tests/fuzz_corpus.rs`: one presented
//! string through every parser of API, join and pairing tokens. Any panic, and any token
//! taken that does not print back as it was presented, is a bug.

use crate::{
    access::{BearerToken, Role, TokenId},
    enroll::{CA_FINGERPRINT_LEN, JoinCode},
    pairing::{PairingSecret, PairingToken, pairing_code, split_pairing_code},
};

/// Input: the presented text (bytes that are not UTF-8 are replaced, as a gRPC string
/// or a header value would never carry them).
pub fn tokens(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();
    if let Ok(token) = BearerToken::parse(text) {
        assert_eq!(
            token.reveal(),
            text.trim(),
            "api token prints back otherwise"
        );
        assert_eq!(BearerToken::parse(&token.reveal()).as_ref(), Ok(&token));
    }
    if let Ok(token) = BearerToken::from_header(text) {
        let header = format!("Bearer {}", token.reveal());
        assert_eq!(BearerToken::from_header(&header).as_ref(), Ok(&token));
    }
    if let Ok(id) = TokenId::parse("id", text) {
        assert_eq!(id.as_str(), text);
    }
    if let Ok(role) = Role::parse("role", text) {
        assert_eq!(role.name(), text);
    }
    if let Ok(code) = JoinCode::parse("token", text) {
        assert_eq!(
            code.reveal(),
            text.trim(),
            "join token prints back otherwise"
        );
        assert_eq!(code.ca_fingerprint().len(), CA_FINGERPRINT_LEN);
        assert_eq!(JoinCode::parse("token", &code.reveal()).as_ref(), Ok(&code));
    }
    let (token, pinned) = split_pairing_code(text);
    assert_eq!(
        split_pairing_code(&pairing_code(token, pinned)),
        (token, pinned)
    );
    let secret = PairingSecret::presented(token.to_owned());
    let presented = secret.hash();
    assert!(PairingToken::new(&secret, 0, 1).matches(&presented));
    // A stored hash matches only a well-formed hash equal to it.
    let stored = PairingToken {
        token_hash: text.to_owned(),
        issued_at_ms: 0,
        expires_at_ms: 1,
    };
    assert_eq!(
        stored.matches(text),
        blake3::Hash::from_hex(text).is_ok(),
        "hash {text:?} against itself"
    );
}
