//! Operator API tokens on a real manager: calls without a token, with a malformed, expired
//! or revoked one, or with a role too low, are refused with UNAUTHENTICATED or
//! PERMISSION_DENIED and change nothing; every call that changes the site is in the event
//! log with its caller; the site keeps only hashes of the tokens; a restart does not bring
//! a revoked bootstrap token back; the CLI reads its token from the environment.

use std::time::Duration;

use anyhow::{Context, Result};
use tandem_proto::client::{ApiChannel, ApiConnector, Credentials};
use tandem_proto::v1;
use tandem_proto::v1::{
    host_service_client::HostServiceClient, monitoring_service_client::MonitoringServiceClient,
    token_service_client::TokenServiceClient, vpg_service_client::VpgServiceClient,
};
use tandem_testkit::lab::Lab;
use tandem_testkit::operator::{TOKEN_FILE, cli_env};
use tonic::Code;

async fn as_token(api: &str, token: Option<&str>) -> Result<ApiChannel> {
    let credentials = match token {
        Some(t) => Credentials::token(t)?,
        None => Credentials::none(),
    };
    // The lab's sites serve the operator port over TLS: trust their CAs as the lab does.
    let ca = cli_env()
        .into_iter()
        .find(|(k, _)| *k == tandem_proto::client::CA_FILE_ENV)
        .map(|(_, p)| p)
        .context("the lab names its CA file")?;
    let credentials = credentials.with_ca_file(&ca)?;
    Ok(ApiConnector::new(credentials)
        .connect(&[api.to_string()])
        .await?)
}

fn host(id: &str) -> v1::Host {
    v1::Host {
        id: id.into(),
        name: id.into(),
        vra_address: "127.0.0.1:1".into(),
        peer_vra_address: String::new(),
    }
}

async fn create_token(
    admin: &ApiChannel,
    name: &str,
    role: v1::TokenRole,
    ttl_secs: u64,
) -> Result<String> {
    Ok(TokenServiceClient::new(admin.clone())
        .create_token(v1::CreateTokenRequest {
            name: name.into(),
            role: role as i32,
            ttl_secs,
        })
        .await?
        .into_inner()
        .token)
}

async fn host_ids(ch: &ApiChannel) -> Result<Vec<String>> {
    Ok(HostServiceClient::new(ch.clone())
        .list_hosts(v1::ListRequest {})
        .await?
        .into_inner()
        .hosts
        .into_iter()
        .map(|h| h.id)
        .collect())
}

fn code<T: std::fmt::Debug>(r: std::result::Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// Every file under `dir`, read raw.
fn raw_files(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(raw_files(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.push(b);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_calls_need_a_live_token_of_a_high_enough_role_and_are_audited() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(&dir.path().join("lab"), 1, 1).await?;
    let api = lab.sites[0][0].api.clone();
    let bootstrap = std::fs::read_to_string(lab.dir.join(TOKEN_FILE))?;
    let admin = as_token(&api, Some(&bootstrap)).await?;

    // No token, a malformed one, a well-formed unknown one: UNAUTHENTICATED, nothing done.
    let anonymous = as_token(&api, None).await?;
    assert_eq!(
        code(
            HostServiceClient::new(anonymous.clone())
                .create_host(host("h-anon"))
                .await
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            HostServiceClient::new(anonymous.clone())
                .list_hosts(v1::ListRequest {})
                .await
        ),
        Code::Unauthenticated
    );
    let mut malformed = tonic::Request::new(host("h-malformed"));
    malformed
        .metadata_mut()
        .insert("authorization", "Bearer tdm1.nothex.short".parse()?);
    assert_eq!(
        code(
            HostServiceClient::new(anonymous.clone())
                .create_host(malformed)
                .await
        ),
        Code::Unauthenticated
    );
    let unknown = format!("tdm1.{}.{}", "0".repeat(12), "1".repeat(64));
    let stranger = as_token(&api, Some(&unknown)).await?;
    assert_eq!(
        code(
            HostServiceClient::new(stranger)
                .create_host(host("h-unknown"))
                .await
        ),
        Code::Unauthenticated
    );
    // Health needs no token (orchestrators probe it).
    tonic_health::pb::health_client::HealthClient::new(anonymous)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?;

    // Roles: a viewer reads only; an operator also checkpoints but edits no inventory.
    let viewer_token = create_token(&admin, "dashboard", v1::TokenRole::Viewer, 0).await?;
    let operator_token = create_token(&admin, "night-shift", v1::TokenRole::Operator, 0).await?;
    let viewer = as_token(&api, Some(&viewer_token)).await?;
    let operator = as_token(&api, Some(&operator_token)).await?;
    assert!(host_ids(&viewer).await?.is_empty());
    assert_eq!(
        code(
            HostServiceClient::new(viewer.clone())
                .create_host(host("h-viewer"))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            VpgServiceClient::new(viewer.clone())
                .add_checkpoint(v1::AddCheckpointRequest {
                    vpg_ids: vec!["no-such-vpg".into()],
                    ..Default::default()
                })
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            TokenServiceClient::new(viewer.clone())
                .list_tokens(v1::ListTokensRequest {})
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            HostServiceClient::new(operator.clone())
                .create_host(host("h-operator"))
                .await
        ),
        Code::PermissionDenied
    );
    // Past the role check the operator's checkpoint meets the domain's own answer.
    assert_eq!(
        code(
            VpgServiceClient::new(operator.clone())
                .add_checkpoint(v1::AddCheckpointRequest {
                    vpg_ids: vec!["no-such-vpg".into()],
                    name: "nightly".into(),
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound
    );
    assert!(
        host_ids(&admin).await?.is_empty(),
        "a refused call changed the inventory"
    );
    HostServiceClient::new(admin.clone())
        .create_host(host("h-admin"))
        .await?;
    assert_eq!(host_ids(&viewer).await?, ["h-admin"]);

    // Expiry and revocation.
    let brief = create_token(&admin, "brief", v1::TokenRole::Admin, 1).await?;
    let brief_ch = as_token(&api, Some(&brief)).await?;
    host_ids(&brief_ch).await?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        code(
            HostServiceClient::new(brief_ch)
                .list_hosts(v1::ListRequest {})
                .await
        ),
        Code::Unauthenticated
    );
    let viewer_id = viewer_token
        .split('.')
        .nth(1)
        .context("token id")?
        .to_string();
    let revoked = TokenServiceClient::new(admin.clone())
        .revoke_token(v1::RevokeTokenRequest {
            id: viewer_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(revoked.state, "revoked");
    assert_eq!(
        code(
            HostServiceClient::new(viewer)
                .list_hosts(v1::ListRequest {})
                .await
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            TokenServiceClient::new(admin.clone())
                .revoke_token(v1::RevokeTokenRequest {
                    id: "../../etc".into()
                })
                .await
        ),
        Code::InvalidArgument
    );
    let listed = TokenServiceClient::new(admin.clone())
        .list_tokens(v1::ListTokensRequest {})
        .await?
        .into_inner()
        .tokens;
    let states: Vec<(&str, &str)> = listed
        .iter()
        .map(|t| (t.name.as_str(), t.state.as_str()))
        .collect();
    for expected in [
        ("bootstrap admin", "live"),
        ("dashboard", "revoked"),
        ("night-shift", "live"),
        ("brief", "expired"),
    ] {
        assert!(states.contains(&expected), "{expected:?} not in {states:?}");
    }

    // The audit trail: the calls that changed the site and the refused attempts of known
    // tokens, each with its caller; no anonymous noise.
    // The trail is written in batches behind the calls: wait for the last call's record.
    let mut audit: Vec<String> = Vec::new();
    for _ in 0..100 {
        audit = MonitoringServiceClient::new(admin.clone())
            .list_events(v1::ListEventsQuery {
                code: "EV0070".into(),
                limit: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .events
            .into_iter()
            .map(|e| e.description)
            .collect();
        if audit.iter().any(|d| d.ends_with("failed: InvalidArgument")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("audit trail:\n  {}", audit.join("\n  "));
    let has = |call: &str, who: &str, outcome: &str| {
        audit
            .iter()
            .any(|d| d.starts_with(call) && d.contains(who) && d.ends_with(outcome))
    };
    assert!(
        has("HostService.CreateHost", "bootstrap admin", ": ok"),
        "{audit:?}"
    );
    assert!(
        has("TokenService.CreateToken", "bootstrap admin", ": ok"),
        "{audit:?}"
    );
    assert!(
        has("TokenService.RevokeToken", "bootstrap admin", ": ok"),
        "{audit:?}"
    );
    assert!(
        has(
            "TokenService.RevokeToken",
            "bootstrap admin",
            "failed: InvalidArgument"
        ),
        "{audit:?}"
    );
    assert!(
        has(
            "HostService.CreateHost",
            "dashboard",
            "refused: permission denied"
        ),
        "{audit:?}"
    );
    assert!(
        has(
            "VpgService.AddCheckpoint",
            "night-shift",
            "failed: NotFound"
        ),
        "{audit:?}"
    );
    assert!(
        !audit
            .iter()
            .any(|d| d.contains("ListHosts") || (d.contains("ListTokens") && d.ends_with(": ok"))),
        "reads are not audited"
    );
    assert!(
        !audit
            .iter()
            .any(|d| d.contains("h-anon") || d.contains("unknown"))
    );

    // Only hashes are kept: no secret of a token is anywhere in the node's files, while
    // its id is (the search itself works).
    let secret = operator_token.rsplit('.').next().context("secret")?;
    let id = operator_token.split('.').nth(1).context("id")?;
    let files = raw_files(&lab.sites[0][0].dir.join("data"));
    assert!(files.iter().any(|f| contains(f, id.as_bytes())));
    assert!(!files.iter().any(|f| contains(f, secret.as_bytes())));

    // The CLI takes its token from the environment; the operator's refusal is one line.
    let cli = |envs: Vec<(&'static str, std::ffi::OsString)>, args: &[&str]| {
        tandem_testkit::operator::cli()
            .env_remove("TANDEM_TOKEN")
            .env_remove("TANDEM_TOKEN_FILE")
            .envs(envs)
            .args(["-e", &api])
            .args(args)
            .output()
    };
    let admin_env: Vec<_> = cli_env()
        .into_iter()
        .map(|(k, v)| (k, v.into_os_string()))
        .collect();
    let out = cli(
        admin_env.clone(),
        &["token", "create", "ci", "--role", "viewer", "--ttl", "1h"],
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ci_token = String::from_utf8(out.stdout)?.trim().to_string();
    let as_ci = vec![("TANDEM_TOKEN", ci_token.into())];
    assert!(cli(as_ci.clone(), &["host", "list"])?.status.success());
    let out = cli(as_ci, &["host", "delete", "h-admin"])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs the admin role"), "{err}");
    let out = cli(vec![], &["host", "list"])?;
    assert!(!out.status.success());
    let out = cli(admin_env, &["token", "list", "-o", "json"])?;
    let tokens: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(
        tokens
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == "ci" && t["role"] == "viewer")),
        "{tokens}"
    );

    // Revoking the bootstrap token (with another admin) survives a restart of the node that
    // bootstrapped the site: its token file does not bring it back.
    let second = create_token(&admin, "second admin", v1::TokenRole::Admin, 0).await?;
    let second_ch = as_token(&api, Some(&second)).await?;
    let bootstrap_id = bootstrap
        .trim()
        .split('.')
        .nth(1)
        .context("id")?
        .to_string();
    TokenServiceClient::new(second_ch)
        .revoke_token(v1::RevokeTokenRequest { id: bootstrap_id })
        .await?;
    lab.sites[0][0].stop(Duration::from_secs(5)).await?;
    lab.sites[0][0].start("single").await?;
    let api = lab.sites[0][0].api.clone();
    let mut again = None;
    for _ in 0..100 {
        let ch = as_token(&api, Some(&second)).await?;
        if host_ids(&ch).await.is_ok() {
            again = Some(as_token(&api, Some(&bootstrap)).await?);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = again.context("the restarted node never served the second admin")?;
    assert_eq!(
        code(
            HostServiceClient::new(again)
                .list_hosts(v1::ListRequest {})
                .await
        ),
        Code::Unauthenticated
    );
    lab.down().await;
    Ok(())
}

/// 10 000 wrong join tokens from one address within a minute: RESOURCE_EXHAUSTED (with
/// when to retry) once the source's attempts are spent; the Raft log grows by a few
/// entries (refusals are audited in aggregate, per source, and a wrong token costs a read,
/// not a proposal); operators' calls go on (their latency printed before and during).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessed_join_tokens_are_rate_limited_per_source_and_cost_the_log_a_few_entries()
-> Result<()> {
    use tandem_proto::v1::cluster_service_client::ClusterServiceClient;
    use tandem_proto::v1::enrollment_client::EnrollmentClient;
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(&dir.path().join("lab"), 1, 1).await?;
    let api = lab.sites[0][0].api.clone();
    let bootstrap = std::fs::read_to_string(lab.dir.join(TOKEN_FILE))?;
    let admin = as_token(&api, Some(&bootstrap)).await?;
    let anonymous = as_token(&api, None).await?;
    let log_index = || {
        let admin = admin.clone();
        async move {
            anyhow::Ok(
                ClusterServiceClient::new(admin)
                    .get_cluster_status(v1::GetClusterStatusRequest {})
                    .await?
                    .into_inner()
                    .last_log_index,
            )
        }
    };
    // An operator's call, timed.
    let operator_call = || {
        let admin = admin.clone();
        async move {
            let start = std::time::Instant::now();
            HostServiceClient::new(admin)
                .list_hosts(v1::ListRequest {})
                .await?;
            anyhow::Ok(start.elapsed())
        }
    };
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut quiet = Vec::new();
    for _ in 0..20 {
        quiet.push(operator_call().await?);
    }
    let before = log_index().await?;

    let flood = async {
        use futures::StreamExt;
        let codes: Vec<Code> = futures::stream::iter(0..10_000u32)
            .map(|i| {
                let mut c = EnrollmentClient::new(anonymous.clone());
                async move {
                    code(
                        c.join(v1::JoinRequest {
                            token: format!("tdmj1.{i:08x}.{}.{}", "ab".repeat(16), "cd".repeat(32)),
                            public_key: vec![4; 65],
                            proof: vec![0; 64],
                            role: v1::JoinRole::Vra as i32,
                            id: "h1".into(),
                            ip_addresses: Vec::new(),
                        })
                        .await,
                    )
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        codes
    };
    let during = async {
        let mut d = Vec::new();
        for _ in 0..20 {
            d.push(operator_call().await?);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(d)
    };
    let started = std::time::Instant::now();
    let (codes, during) = tokio::join!(flood, during);
    let took = started.elapsed();
    let during = during?;
    let exhausted = codes
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    let grew = log_index().await? - before;
    eprintln!(
        "10000 wrong join tokens in {took:?}: {exhausted} RESOURCE_EXHAUSTED, the rest {:?}; \
         Raft log +{grew} entries; operator call p50 {:?} quiet, {:?} during",
        codes
            .iter()
            .filter(|c| **c != Code::ResourceExhausted)
            .fold(
                std::collections::BTreeMap::<String, usize>::new(),
                |mut m, c| {
                    *m.entry(format!("{c:?}")).or_default() += 1;
                    m
                }
            ),
        median(quiet),
        median(during.clone()),
    );
    assert!(took < Duration::from_secs(60), "the flood took {took:?}");
    assert!(exhausted >= 10_000 - 200, "{exhausted} of 10000 limited");
    assert!(grew <= 6, "the Raft log grew by {grew} entries");
    // The refusals are in the event log once per kind and source, not once per call.
    let events = MonitoringServiceClient::new(admin.clone())
        .list_events(v1::ListEventsQuery {
            code: "EV0070".into(),
            limit: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    let joins = events
        .iter()
        .filter(|e| e.description.contains("Enrollment.Join"))
        .count();
    assert!((1..=4).contains(&joins), "{events:#?}");
    lab.down().await;
    Ok(())
}
