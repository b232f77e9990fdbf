//! Applying the site's credentials: the first admin token, API tokens and join tokens.

use super::*;

impl SiteState {
    /// [`Command::BootstrapAdminToken`].
    pub(super) fn apply_bootstrap_admin_token(
        &mut self,
        token: crate::access::ApiToken,
        now_ms: u64,
    ) -> CommandOutcome {
        self.tokens.bootstrap(token, now_ms)?;
        Ok(Applied::Done)
    }

    /// [`Command::CreateJoinToken`].
    pub(super) fn apply_create_join_token(
        &mut self,
        token: crate::enroll::JoinToken,
        now_ms: u64,
    ) -> CommandOutcome {
        self.join_tokens.create(token, now_ms)?;
        Ok(Applied::Done)
    }

    /// [`Command::RevokeJoinToken`].
    pub(super) fn apply_revoke_join_token(&mut self, id: crate::access::TokenId) -> CommandOutcome {
        self.join_tokens.revoke(&id)?;
        Ok(Applied::Done)
    }

    /// [`Command::ConsumeJoinToken`].
    pub(super) fn apply_consume_join_token(
        &mut self,
        id: crate::access::TokenId,
        secret_hash: String,
        identity: String,
        now_ms: u64,
    ) -> CommandOutcome {
        let event = self
            .join_tokens
            .consume(&id, &secret_hash, &identity, now_ms)?;
        self.events.push(event);
        Ok(Applied::Done)
    }

    /// [`Command::CreateToken`].
    pub(super) fn apply_create_token(
        &mut self,
        token: crate::access::ApiToken,
        now_ms: u64,
    ) -> CommandOutcome {
        self.tokens.create(token, now_ms)?;
        Ok(Applied::Done)
    }

    /// [`Command::RevokeToken`].
    pub(super) fn apply_revoke_token(
        &mut self,
        id: crate::access::TokenId,
        now_ms: u64,
    ) -> CommandOutcome {
        self.tokens.revoke(&id, now_ms)?;
        Ok(Applied::Done)
    }
}
