//! The token service: operator API tokens, created (shown once), listed and revoked; and
//! join tokens, with which new nodes obtain their certificates.

use tandem_core::access::{ApiToken, MAX_TOKEN_TTL_MS, Role, TokenId};
use tandem_core::enroll::{JoinToken, Joiner, MAX_JOIN_TTL_MS};
use tandem_core::error::Violations;
use tandem_core::ids::HostId;
use tandem_core::ids::check_name;
use tandem_proto::v1::{self, token_service_server::TokenService};
use tonic::{Request, Response, Status};

use super::bad;
use crate::access::caller;
use crate::error::ApiError;
use crate::site::{SiteManager, now_ms};

pub struct TokenApi(pub SiteManager);

fn role_from_proto(r: i32) -> Option<Role> {
    match v1::TokenRole::try_from(r) {
        Ok(v1::TokenRole::Viewer) => Some(Role::Viewer),
        Ok(v1::TokenRole::Operator) => Some(Role::Operator),
        Ok(v1::TokenRole::Admin) => Some(Role::Admin),
        Ok(v1::TokenRole::Unspecified) | Err(_) => None,
    }
}

fn to_proto(t: ApiToken, now: u64) -> v1::ApiToken {
    let state = if t.revoked_at_ms.is_some() {
        "revoked"
    } else if t.is_live(now) {
        "live"
    } else {
        "expired"
    };
    v1::ApiToken {
        id: t.id.to_string(),
        name: t.name,
        role: match t.role {
            Role::Viewer => v1::TokenRole::Viewer,
            Role::Operator => v1::TokenRole::Operator,
            Role::Admin => v1::TokenRole::Admin,
        } as i32,
        created_ms: t.created_at_ms,
        expires_ms: t.expires_at_ms.unwrap_or(0),
        revoked_ms: t.revoked_at_ms.unwrap_or(0),
        created_by: t.created_by,
        state: state.to_string(),
    }
}

fn join_to_proto((t, identity): (JoinToken, String)) -> v1::JoinTokenInfo {
    v1::JoinTokenInfo {
        id: t.id.to_string(),
        identity,
        created_ms: t.created_at_ms,
        expires_ms: t.expires_at_ms,
        created_by: t.created_by,
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn create_token(
        &self,
        r: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreatedToken>, Status> {
        let caller = caller(&r)?.clone();
        let r = r.into_inner();
        let mut v = Violations::new();
        v.absorb(check_name("name", &r.name));
        let role = role_from_proto(r.role);
        v.check(role.is_some(), "role", "must be viewer, operator or admin");
        v.check(
            r.ttl_secs <= MAX_TOKEN_TTL_MS / 1000,
            "ttl_secs",
            "at most 366 days (0: never expires)",
        );
        v.into_result().map_err(bad)?;
        let role = role.ok_or_else(|| ApiError::invalid("role"))?;
        let ttl_ms = (r.ttl_secs > 0).then(|| r.ttl_secs * 1000);
        let (bearer, entry) = self.0.create_token(&caller, r.name, role, ttl_ms).await?;
        Ok(Response::new(v1::CreatedToken {
            token: bearer.reveal(),
            info: Some(to_proto(entry, now_ms())),
        }))
    }

    async fn list_tokens(
        &self,
        _r: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::TokenList>, Status> {
        let now = now_ms();
        let tokens = self
            .0
            .list_tokens()
            .await?
            .into_iter()
            .map(|t| to_proto(t, now))
            .collect();
        Ok(Response::new(v1::TokenList { tokens }))
    }

    async fn create_join_token(
        &self,
        r: Request<v1::CreateJoinTokenRequest>,
    ) -> Result<Response<v1::CreatedJoinToken>, Status> {
        let caller = caller(&r)?.clone();
        let r = r.into_inner();
        let joiner = match v1::JoinRole::try_from(r.role) {
            Ok(v1::JoinRole::Manager) if r.host_id.is_empty() => {
                Joiner::Manager { node_id: r.node_id }
            }
            Ok(v1::JoinRole::Vra) if r.node_id == 0 => Joiner::Vra {
                host: HostId::parse("host_id", &r.host_id).map_err(bad)?,
            },
            _ => {
                return Err(ApiError::invalid(
                    "role: MANAGER with a node_id, or VRA with a host_id (and no node_id)",
                )
                .into());
            }
        };
        if r.ttl_secs > MAX_JOIN_TTL_MS / 1000 {
            return Err(ApiError::invalid("ttl_secs: at most 24 hours (0: one hour)").into());
        }
        let ttl_ms = (r.ttl_secs > 0).then(|| r.ttl_secs * 1000);
        let created = self.0.create_join_token(&caller, joiner, ttl_ms).await?;
        Ok(Response::new(v1::CreatedJoinToken {
            token: created.code.reveal(),
            id: created.token.id.to_string(),
            identity: created.identity.uri(),
            expires_ms: created.token.expires_at_ms,
        }))
    }

    async fn list_join_tokens(
        &self,
        _r: Request<v1::ListJoinTokensRequest>,
    ) -> Result<Response<v1::JoinTokenList>, Status> {
        let tokens = self
            .0
            .list_join_tokens()
            .await?
            .into_iter()
            .map(join_to_proto)
            .collect();
        Ok(Response::new(v1::JoinTokenList { tokens }))
    }

    async fn revoke_join_token(
        &self,
        r: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::JoinTokenInfo>, Status> {
        let id = TokenId::parse("id", &r.into_inner().id).map_err(bad)?;
        Ok(Response::new(join_to_proto(
            self.0.revoke_join_token(id).await?,
        )))
    }

    async fn revoke_token(
        &self,
        r: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::ApiToken>, Status> {
        let id = TokenId::parse("id", &r.into_inner().id).map_err(bad)?;
        Ok(Response::new(to_proto(
            self.0.revoke_token(id).await?,
            now_ms(),
        )))
    }
}
