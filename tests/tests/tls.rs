//! Mutual TLS on real processes: the internal (Raft) port takes only managers of its own
//! site (a plaintext client, a manager of a paired site and a VRA of the same site are
//! refused before any call, and the state is unchanged); VRAs take control only from their
//! managers and streams only from the protecting site's VRAs; calls between sites only
//! from a paired site's managers; pairing pins the other site's CA.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tandem_proto::v1;
use tandem_proto::v1::manager_internal_client::ManagerInternalClient;
use tandem_proto::v1::raft_client::RaftClient;
use tandem_proto::v1::site_service_client::SiteServiceClient;
use tandem_testkit::lab::Lab;
use tandem_tests::channel;
use tandem_tls::pki::PkiDir;
use tandem_tls::{PeerIdentity, TlsConfig};
use tonic::transport::{Channel, Endpoint};

fn endpoint(addr: &str) -> Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5)))
}

/// A channel to `addr` presenting the certificate the lab issued in `dir`.
fn tls_channel(addr: &str, dir: &Path) -> Result<Channel> {
    let tls = TlsConfig::load(&PkiDir::new(dir.join("pki")))?;
    Ok(endpoint(addr)?.connect_with_connector_lazy(tandem_tls::dial::TlsDial::new(tls.client())))
}

/// A PKI directory holding the certificate issued in `holder` but trusting the CA of the
/// node in `target`: a caller that trusts any server, so that only the server's check of
/// the caller's certificate stands between it and the port.
fn trusting(holder: &Path, target: &Path, out: &Path) -> Result<std::path::PathBuf> {
    let (from, to, dst) = (
        PkiDir::new(holder.join("pki")),
        PkiDir::new(target.join("pki")),
        PkiDir::new(out.join("pki")),
    );
    std::fs::create_dir_all(&dst.dir)?;
    std::fs::copy(to.ca_cert(), dst.ca_cert())?;
    std::fs::copy(from.node_cert(), dst.node_cert())?;
    std::fs::copy(from.node_key(), dst.node_key())?;
    Ok(out.to_path_buf())
}

/// Waits until the VRA `vra` trusts (`want`) the CA of `site`, as its managers give it
/// the paired sites' CAs.
async fn wait_vra_trusts(
    vra: &tandem_testkit::process::VraProcess,
    site: &str,
    want: bool,
) -> Result<()> {
    use tandem_proto::v1::vra_control_client::VraControlClient;
    for _ in 0..100 {
        let st = VraControlClient::new(vra.control_channel().await?)
            .get_status(v1::GetVraStatusRequest {})
            .await?
            .into_inner();
        if st.trusted.iter().any(|t| t.site_id == site) == want {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("VRA {} trusting site {site}: never {want}", vra.host)
}

/// What a rogue member would propose: a peer site no operator paired.
fn rogue_propose() -> Result<v1::ProposeRequest> {
    let rogue = serde_json::json!({ "AddPeer": { "peer": {
        "id": "site-rogue", "name": "rogue", "endpoints": ["127.0.0.1:9"], "paired_at_ms": 0
    }}});
    Ok(v1::ProposeRequest {
        command_json: serde_json::to_vec(&rogue)?,
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_sites_own_managers_reach_its_internal_port() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(&dir.path().join("lab"), 2, 1).await?;
    let raft = lab.sites[0][0].raft.clone();
    let site_a = lab.site_id(0).context("site a")?.to_string();
    let site_b = lab.site_id(1).context("site b")?.to_string();

    // Certificates a tester could hold: a paired site's manager, this site's VRA, and (the
    // control) another manager of this site.
    let certs = dir.path().join("certs");
    let b_manager = certs.join("b-manager");
    lab.provision(1, &PeerIdentity::manager(&site_b, 1)?, &b_manager)?;
    let a_vra = certs.join("a-vra");
    lab.provision(0, &PeerIdentity::vra(&site_a, "host-9")?, &a_vra)?;
    let a_manager = certs.join("a-manager");
    lab.provision(0, &PeerIdentity::manager(&site_a, 9)?, &a_manager)?;
    // A certificate naming site a, from a CA that is not site a's.
    let forged = certs.join("forged");
    tandem_tls::pki::SiteCa::generate(&site_a)?.provision(
        &PkiDir::new(forged.join("pki")),
        &PeerIdentity::manager(&site_a, 2)?,
    )?;

    let node_a = lab.sites[0][0].dir.join("data");
    let plain = endpoint(&raft)?.connect_lazy();
    let refused: Vec<(&str, Channel)> = vec![
        ("no certificate (plaintext)", plain),
        (
            "a paired site's manager",
            tls_channel(&raft, &trusting(&b_manager, &node_a, &certs.join("t1"))?)?,
        ),
        ("this site's VRA", tls_channel(&raft, &a_vra)?),
        (
            "site a's name from another CA",
            tls_channel(&raft, &trusting(&forged, &node_a, &certs.join("t2"))?)?,
        ),
    ];
    for (who, ch) in refused {
        let propose = ManagerInternalClient::new(ch.clone())
            .propose(rogue_propose()?)
            .await;
        let err = propose
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(propose.is_err(), "{who}: Propose was served");
        // Refused by the server, not by a client that distrusted it.
        assert!(!err.contains("invalid peer certificate"), "{who}: {err}");
        let vote = RaftClient::new(ch)
            .vote(v1::RaftRpcRequest::default())
            .await;
        assert!(vote.is_err(), "{who}: Raft was served");
        println!("{who}: refused ({err})");
    }
    let peers = SiteServiceClient::new(channel(&lab.sites[0][0].api).await?)
        .list_peers(v1::ListPeersRequest {})
        .await?
        .into_inner()
        .peers;
    assert!(
        peers.is_empty(),
        "a refused caller changed the state: {peers:?}"
    );

    // The site's own manager certificate gets through (the refusals above are about the
    // certificate, not the way the test dials).
    let index = ManagerInternalClient::new(tls_channel(&raft, &a_manager)?)
        .read_index(v1::ReadIndexRequest {})
        .await?
        .into_inner()
        .index;
    assert!(index > 0);
    lab.down().await;
    Ok(())
}

/// `openssl s_client` against a port; answers whether the handshake held (the server
/// took the client: a refusal of a TLS 1.3 client certificate comes as an alert after the
/// client's Finished, so the client stays a moment to read it) and what it printed.
fn s_client(addr: &str, ca: &Path, cert: Option<(&Path, &Path)>) -> Result<(bool, String)> {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        addr,
        "-brief",
        "-verify_return_error",
    ])
    .args(["-alpn", "h2", "-servername", tandem_tls::pki::SERVER_NAME])
    .arg("-CAfile")
    .arg(ca);
    if let Some((c, k)) = cert {
        cmd.arg("-cert").arg(c).arg("-key").arg(k);
    }
    // stdin held open 1 s, then closed: s_client reads what the server says meanwhile.
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("openssl s_client (install openssl)")?;
    let stdin = child.stdin.take();
    std::thread::sleep(Duration::from_secs(1));
    drop(stdin);
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let held = text.contains("CONNECTION ESTABLISHED") && !text.contains("alert");
    Ok((held, text))
}

/// Stock TLS clients interoperate with a manager's ports: `openssl s_client` completes a
/// handshake with the operator port without a certificate, and with the internal port
/// only with a certificate of the site's CA (none, or one of a CA the site does not
/// trust: the server ends the handshake with an alert); Python's grpcio calls the
/// operator port with the site's CA and a token, and is refused without the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_and_grpcio_interoperate_and_the_internal_port_wants_a_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(&dir.path().join("lab"), 1, 1).await?;
    let (api, internal) = (lab.sites[0][0].api.clone(), lab.sites[0][0].raft.clone());
    let ca = PkiDir::new(lab.sites[0][0].dir.join("data").join("pki")).ca_cert();
    let site = lab.site_id(0).context("site")?.to_string();
    let member = dir.path().join("member");
    lab.provision(0, &PeerIdentity::manager(&site, 5)?, &member)?;
    let member = PkiDir::new(member.join("pki"));
    let stranger = dir.path().join("stranger");
    tandem_tls::pki::SiteCa::generate(&site)?.provision(
        &PkiDir::new(stranger.join("pki")),
        &PeerIdentity::manager(&site, 6)?,
    )?;
    let stranger = PkiDir::new(stranger.join("pki"));

    let (held, text) = s_client(&api, &ca, None)?;
    assert!(held, "operator port, no certificate: {text}");
    assert!(text.contains("Verification: OK"), "{text}");
    let (held, text) = s_client(&internal, &ca, None)?;
    assert!(
        !held,
        "internal port took a client without a certificate: {text}"
    );
    println!("internal port, no certificate: {}", text.trim());
    let (held, text) = s_client(
        &internal,
        &ca,
        Some((&stranger.node_cert(), &stranger.node_key())),
    )?;
    assert!(!held, "internal port took a stranger's certificate: {text}");
    let (held, text) = s_client(
        &internal,
        &ca,
        Some((&member.node_cert(), &member.node_key())),
    )?;
    assert!(held, "internal port, a member's certificate: {text}");

    let token = std::fs::read_to_string(lab.dir.join(tandem_testkit::operator::TOKEN_FILE))?;
    let script = dir.path().join("grpcio_call.py");
    std::fs::write(&script, GRPCIO_CALL)?;
    let out = tokio::process::Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(&api)
        .arg(&ca)
        .arg(token.trim())
        .arg(tandem_tls::pki::SERVER_NAME)
        .arg(&site)
        .output()
        .await
        .context("/usr/bin/python3 (Debian's, with python3-grpcio)")?;
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "grpcio: {printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("grpcio: {}", printed.trim());
    assert!(printed.contains("names the site"), "{printed}");
    assert!(printed.contains("UNAUTHENTICATED"), "{printed}");
    lab.down().await;
    Ok(())
}

/// Python's grpcio, with no generated code: `SiteService/GetSite` as raw bytes (an empty
/// request; the reply must name the site), with and without the bearer token.
const GRPCIO_CALL: &str = r#"
import sys
import grpc
addr, ca, token, name, site = sys.argv[1:6]
creds = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
channel = grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", name)])
get_site = channel.unary_unary("/tandem.v1.SiteService/GetSite")
reply = get_site(b"", metadata=[("authorization", "Bearer " + token)], timeout=20)
if site.encode() not in reply:
    sys.exit("the reply does not name site " + site)
print("site reply:", len(reply), "bytes, names the site")
try:
    get_site(b"", timeout=20)
    sys.exit("served without a token")
except grpc.RpcError as e:
    print("without a token:", e.code().name)
"#;

/// A node that bootstraps a site alone, with no certificate given, creates the site's CA
/// and its own certificate, keys owner-only, and names the site after the CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_bootstrap_node_creates_its_sites_ca() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    use tandem_testkit::process::ManagerProcess;
    let dir = tempfile::tempdir()?;
    let mut node = ManagerProcess {
        id: 1,
        site: "solo".into(),
        api: String::new(),
        raft: String::new(),
        dir: dir.path().join("m1"),
        child: None,
        env: Vec::new(),
        admin_token_file: Some(dir.path().join("admin.token")),
    };
    node.start("single").await?;
    let pki = PkiDir::new(node.dir.join("data/pki"));
    for key in [pki.ca_key(), pki.node_key()] {
        let mode = std::fs::metadata(&key)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    let me = TlsConfig::load(&pki)?.identity().clone();
    assert_eq!(
        (me.role, me.id.as_str()),
        (tandem_tls::PeerRole::Manager, "1")
    );
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    let ch = tandem_proto::client::ApiConnector::new(
        tandem_proto::client::Credentials::token(&token)?.with_ca_file(&pki.ca_cert())?,
    )
    .connect(std::slice::from_ref(&node.api))
    .await?;
    let mut site = None;
    for _ in 0..100 {
        if let Ok(s) = SiteServiceClient::new(ch.clone())
            .get_site(v1::GetSiteRequest {})
            .await
        {
            site = Some(s.into_inner());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let site = site.context("the site was never named")?;
    assert_eq!(site.id, me.site, "{site:?}");
    node.stop(Duration::from_secs(5)).await?;
    Ok(())
}

/// A VRA's listener by certificate: its site's managers drive it, VRAs (of its site or a
/// paired one) replicate to it, and nothing else gets in: no plaintext client, no VRA
/// certificate on VRA control, no paired site's manager on either service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vra_takes_control_from_its_managers_and_streams_from_vras_only() -> Result<()> {
    use tandem_proto::v1::replication_client::ReplicationClient;
    use tandem_proto::v1::vra_control_client::VraControlClient;
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(&dir.path().join("lab"), 2, 1).await?;
    lab.start_vras(1).await?;
    tandem_testkit::protect::pair(&lab, 1, 0).await?;
    let vra = &lab.vras[0][0];
    let site_a = lab.site_id(0).context("site a")?.to_string();
    let site_b = lab.site_id(1).context("site b")?.to_string();
    wait_vra_trusts(vra, &site_b, true).await?;
    let certs = dir.path().join("certs");
    let a_vra = certs.join("a-vra");
    lab.provision(0, &PeerIdentity::vra(&site_a, "host-9")?, &a_vra)?;
    let b_manager = certs.join("b-manager");
    lab.provision(1, &PeerIdentity::manager(&site_b, 1)?, &b_manager)?;
    let b_manager = trusting(&b_manager, &vra.dir.join("data"), &certs.join("t"))?;
    let b_vra = certs.join("b-vra");
    lab.provision(1, &PeerIdentity::vra(&site_b, "host-8")?, &b_vra)?;
    let b_vra = trusting(&b_vra, &vra.dir.join("data"), &certs.join("t2"))?;

    let status = |ch: Channel| async move {
        VraControlClient::new(ch)
            .get_status(v1::GetVraStatusRequest {})
            .await
    };
    let hashes = |ch: Channel| async move {
        ReplicationClient::new(ch)
            .block_hashes(v1::BlockHashesRequest::default())
            .await
    };
    // The harness holds a manager certificate of site a: served.
    status(vra.control_channel().await?).await?;
    let plain = endpoint(&vra.control)?.connect_lazy();
    assert!(status(plain.clone()).await.is_err(), "plaintext was served");
    assert!(hashes(plain).await.is_err(), "plaintext was served");
    for (who, path, service_control, service_repl) in [
        ("site a's VRA", &a_vra, tonic::Code::PermissionDenied, None),
        (
            "site b's manager",
            &b_manager,
            tonic::Code::PermissionDenied,
            Some(tonic::Code::PermissionDenied),
        ),
        ("site b's VRA", &b_vra, tonic::Code::PermissionDenied, None),
    ] {
        let ch = tls_channel(&vra.control, path)?;
        let err = status(ch.clone()).await.expect_err(who);
        assert_eq!(err.code(), service_control, "{who}: {err}");
        let r = hashes(ch).await;
        match service_repl {
            Some(code) => assert_eq!(r.expect_err(who).code(), code, "{who}"),
            // Past the check, the (empty) request meets the service's own validation.
            None => assert_ne!(
                r.map(|_| ()).err().map(|e| e.code()),
                Some(tonic::Code::PermissionDenied),
                "{who}: refused replication"
            ),
        }
        println!("{who}: VRA control refused ({})", err.message());
    }
    lab.down().await;
    Ok(())
}

/// A stream into a VPG's journals, or a block comparison with its replicas, comes only
/// from a VRA of the site that protects the VPG, under its own host id: a paired site's
/// VRA that does not protect it, and a VRA of the right site claiming another host's
/// stream, are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_protecting_sites_vras_stream_into_a_vpgs_journals() -> Result<()> {
    use tandem_proto::v1::replication_client::ReplicationClient;
    use tandem_proto::v1::vra_control_client::VraControlClient;
    use tandem_testkit::protect::{ProtectOptions, protect};
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(&dir.path().join("lab"), 3, 1).await?;
    lab.start_vras(1).await?;
    let options = ProtectOptions {
        vpg: "vpg-t".into(),
        vms: 1,
        volume_bytes: 4 << 20,
        volumes_per_vm: 1,
        memory_mib: 1024,
        settings: v1::VpgSettings {
            checkpoint_interval_secs: 1,
            journal_history_secs: 3600,
            target_rpo_secs: 60,
            ..Default::default()
        },
    };
    let created = protect(&lab, &options).await?.created;
    let generation = created.generation;
    let recovery = &lab.vras[1][0];
    // Wait for the recovery role at site b's VRA.
    let mut assigned = false;
    for _ in 0..200 {
        let st = VraControlClient::new(recovery.control_channel().await?)
            .get_status(v1::GetVraStatusRequest {})
            .await?
            .into_inner();
        if st
            .vpgs
            .iter()
            .any(|g| g.vpg_id == "vpg-t" && g.role == v1::VraRole::Recovery as i32)
        {
            assigned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(assigned, "site b's VRA never took the recovery role");

    let (site_a, site_c) = (
        lab.site_id(0).context("a")?.to_string(),
        lab.site_id(2).context("c")?.to_string(),
    );
    let certs = dir.path().join("certs");
    let rec_data = recovery.dir.join("data");
    let c_vra = certs.join("c-vra");
    lab.provision(2, &PeerIdentity::vra(&site_c, "site-c-host-1")?, &c_vra)?;
    let c_vra = trusting(&c_vra, &rec_data, &certs.join("t1"))?;
    let a_other = certs.join("a-other");
    lab.provision(0, &PeerIdentity::vra(&site_a, "site-a-host-9")?, &a_other)?;
    let a_other = trusting(&a_other, &rec_data, &certs.join("t2"))?;

    let hashes = |ch: Channel| async move {
        ReplicationClient::new(ch)
            .block_hashes(v1::BlockHashesRequest {
                vpg_id: "vpg-t".into(),
                generation,
                vm_id: "vm-0".into(),
                volume_id: 0,
                offset: 0,
                length: 64 * 1024,
                block_size: 4096,
            })
            .await
    };
    // The managers gave their VRA the CA of the site they are paired with, and only it.
    wait_vra_trusts(recovery, &site_a, true).await?;
    wait_vra_trusts(recovery, &site_c, false).await?;
    // A VRA of a site not paired with b: refused at the handshake.
    let err = hashes(tls_channel(&recovery.control, &c_vra)?)
        .await
        .expect_err("a VRA of a site that is not paired was served");
    assert_ne!(err.code(), tonic::Code::PermissionDenied, "{err}");
    println!("site c's VRA before pairing: {err}");
    // Once c pairs with b, its VRAs are believed, but still cannot touch a VPG that c
    // does not protect.
    tandem_testkit::protect::pair(&lab, 2, 1).await?;
    wait_vra_trusts(recovery, &site_c, true).await?;
    let err = hashes(tls_channel(&recovery.control, &c_vra)?)
        .await
        .expect_err("a VRA of a site that does not protect the VPG compared its blocks");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    println!("site c's VRA: {}", err.message());
    // Unpairing withdraws the trust.
    let site_b = lab.site_id(1).context("b")?.to_string();
    SiteServiceClient::new(channel(&lab.sites[2][0].api).await?)
        .unpair_site(v1::UnpairSiteRequest {
            site_id: site_b,
            force: false,
        })
        .await?;
    wait_vra_trusts(recovery, &site_c, false).await?;
    let err = hashes(tls_channel(&recovery.control, &c_vra)?)
        .await
        .expect_err("a VRA of an unpaired site was served");
    assert_ne!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // The protecting site's VRAs pass that check.
    let r = hashes(tls_channel(&recovery.control, &a_other)?).await;
    assert_ne!(
        r.err().map(|e| e.code()),
        Some(tonic::Code::PermissionDenied),
        "a VRA of the protecting site was refused"
    );
    // A stream whose hello claims another host of the protecting site.
    let hello = v1::ReplicateRequest {
        msg: Some(v1::replicate_request::Msg::Hello(v1::ReplicateHello {
            vpg_id: "vpg-t".into(),
            generation,
            sender_id: lab.vras[0][0].host.clone(),
            resume_from: 0,
        })),
    };
    let err = ReplicationClient::new(tls_channel(&recovery.control, &a_other)?)
        .replicate(tokio_stream::iter(vec![hello]))
        .await
        .expect_err("a stream claiming another host was taken");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    println!("site a's other VRA claiming host 1: {}", err.message());
    lab.down().await;
    Ok(())
}

/// Whether a call failed at the transport, as when the server ends the TLS handshake
/// (the client reads its `certificate_required` alert, or finds the connection closed or
/// reset, depending on when it wrote its request): never a gRPC status the server sent.
fn refused_in_handshake(err: &tonic::Status) -> bool {
    std::error::Error::source(err)
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some())
}

/// Calls between sites (`SitePeer`, on the internal listener; the operator port does not
/// serve them) are taken only from a manager of a paired site, by its certificate: not
/// without one (no handshake completes), not from a VRA, not from this
/// site's own managers, not from a site that is not paired; and a request speaks only for
/// the site its certificate names. Nothing a refused caller sent changes the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_calls_take_only_a_paired_sites_managers() -> Result<()> {
    use tandem_proto::v1::site_peer_client::SitePeerClient;
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(&dir.path().join("lab"), 2, 1).await?;
    tandem_testkit::protect::pair(&lab, 0, 1).await?;
    // Paired sites call a manager's internal listener.
    let internal = lab.sites[0][0].raft.clone();
    let (site_a, site_b) = (
        lab.site_id(0).context("a")?.to_string(),
        lab.site_id(1).context("b")?.to_string(),
    );
    let node_a = lab.sites[0][0].dir.join("data");
    let certs = dir.path().join("certs");
    let holder = |name: &str| certs.join(name);
    lab.provision(1, &PeerIdentity::manager(&site_b, 7)?, &holder("b-manager"))?;
    lab.provision(1, &PeerIdentity::vra(&site_b, "h1")?, &holder("b-vra"))?;
    lab.provision(0, &PeerIdentity::manager(&site_a, 9)?, &holder("a-manager"))?;
    tandem_tls::pki::SiteCa::generate("site-z-1")?.provision(
        &PkiDir::new(holder("z-manager").join("pki")),
        &PeerIdentity::manager("site-z-1", 1)?,
    )?;
    let as_holder = |name: &str| {
        tls_channel(
            &internal,
            &trusting(&holder(name), &node_a, &holder(&format!("t-{name}")))?,
        )
    };
    let report = |ch: Channel, from: &str| {
        let from = from.to_string();
        async move {
            SitePeerClient::new(ch)
                .report(v1::PeerReportRequest { from_site_id: from })
                .await
        }
    };

    // A TLS connection without a certificate (as an operator's).
    let ca_a = PkiDir::new(node_a.join("pki")).ca_cert();
    let operator_tls = tandem_tls::config::operator_client(&std::fs::read_to_string(&ca_a)?)?;
    let dial = |addr: &str| -> Result<Channel> {
        Ok(endpoint(addr)?
            .connect_with_connector_lazy(tandem_tls::dial::TlsDial::new(operator_tls.clone())))
    };
    // The operator port does not serve calls between sites at all.
    let err = report(dial(&lab.sites[0][0].api)?, &site_b)
        .await
        .expect_err("the operator port served SitePeer");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
    // The internal port completes no handshake without a client certificate.
    let err = report(dial(&internal)?, &site_b)
        .await
        .expect_err("served without a certificate");
    assert!(refused_in_handshake(&err), "{err:?}");
    for (who, code) in [
        ("b-vra", tonic::Code::PermissionDenied),
        ("a-manager", tonic::Code::PermissionDenied),
    ] {
        let err = report(as_holder(who)?, &site_b)
            .await
            .expect_err("a peer call was served");
        assert_eq!(err.code(), code, "{who}: {err}");
        println!("{who}: {}", err.message());
    }
    // A site no one paired: its CA is not trusted, the handshake fails.
    assert!(report(as_holder("z-manager")?, "site-z-1").await.is_err());
    // A manager of site b speaks for site b only.
    let b = as_holder("b-manager")?;
    report(b.clone(), &site_b).await?;
    let err = SitePeerClient::new(b.clone())
        .unpair(v1::PeerUnpairRequest {
            from_site_id: "site-z-1".into(),
        })
        .await
        .expect_err("an unpair for another site was taken");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // Site b may say which CAs its nodes' certificates come from (it rotates its CA), but
    // only keeping one site a trusts for it now: not a CA of its choosing alone, not
    // garbage, not without a certificate, not from a VRA.
    let stranger = tandem_tls::pki::SiteCa::generate(&site_b)?;
    let update = |ch: Channel, ca_pem: String| async move {
        SitePeerClient::new(ch)
            .update_trust(v1::PeerUpdateTrustRequest { ca_pem })
            .await
    };
    for (ch, pem, code) in [
        (
            b.clone(),
            stranger.cert_pem().to_string(),
            tonic::Code::PermissionDenied,
        ),
        (
            b.clone(),
            "not a certificate".into(),
            tonic::Code::InvalidArgument,
        ),
        (
            b.clone(),
            stranger.cert_pem().repeat(5),
            tonic::Code::InvalidArgument,
        ),
        (
            as_holder("b-vra")?,
            stranger.cert_pem().into(),
            tonic::Code::PermissionDenied,
        ),
    ] {
        let err = update(ch, pem).await.expect_err("a CA update was taken");
        assert_eq!(err.code(), code, "{err}");
    }
    let err = update(dial(&internal)?, stranger.cert_pem().into())
        .await
        .expect_err("a CA update was taken without a certificate");
    assert!(refused_in_handshake(&err), "{err:?}");
    let peers = SiteServiceClient::new(channel(&lab.sites[0][0].api).await?)
        .list_peers(v1::ListPeersRequest {})
        .await?
        .into_inner()
        .peers;
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].id, site_b);
    let b_ca = std::fs::read_to_string(
        PkiDir::new(lab.sites[1][0].dir.join("data").join("pki")).ca_cert(),
    )?;
    assert_eq!(
        peers[0].ca_pem, b_ca,
        "site a's record of site b's CA changed"
    );
    // Its CA and another: taken (a rotation's first step), and the record shows both.
    let both = format!("{b_ca}{}", stranger.cert_pem());
    update(b.clone(), both.clone()).await?;
    let peers = SiteServiceClient::new(channel(&lab.sites[0][0].api).await?)
        .list_peers(v1::ListPeersRequest {})
        .await?
        .into_inner()
        .peers;
    assert_eq!(peers[0].ca_pem, both);
    // The audit trail names who made each call that would change a site: the refused
    // unpair at site a by site b's manager, the pairing accepted at site b.
    let audited = |site: usize| {
        let api = lab.sites[site][0].api.clone();
        async move {
            let events = tandem_proto::v1::monitoring_service_client::MonitoringServiceClient::new(
                channel(&api).await?,
            )
            .list_events(v1::ListEventsQuery {
                code: "EV0070".into(),
                limit: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .events;
            Ok::<_, anyhow::Error>(
                events
                    .into_iter()
                    .map(|e| e.description)
                    .collect::<Vec<_>>(),
            )
        }
    };
    let manager_b = PeerIdentity::manager(&site_b, 7)?.uri();
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen = audited(0).await?;
        if seen.iter().any(|d| {
            d.contains("SitePeer.Unpair")
                && d.contains(&manager_b)
                && d.contains("failed: PermissionDenied")
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.iter()
            .any(|d| d.contains("SitePeer.Unpair") && d.contains(&manager_b)),
        "{seen:?}"
    );
    assert!(
        audited(1)
            .await?
            .iter()
            .any(|d| d.contains("Pairing.AcceptPairing")
                && d.contains("pairing token (from ")
                && d.ends_with(": ok")),
        "site b recorded no accepted pairing"
    );
    lab.down().await;
    Ok(())
}

/// Pairing pins the other site's CA: the requesting site checks that the site it reaches
/// presents the CA whose fingerprint the pairing token carries before it sends the token,
/// so a wrong fingerprint (or a wrong address) pairs nothing and spends no token. The
/// sites then hold each other's CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_is_refused_when_the_ca_fingerprint_does_not_match() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(&dir.path().join("lab"), 2, 1).await?;
    let (ca, cb) = (
        channel(&lab.sites[0][0].api).await?,
        channel(&lab.sites[1][0].api).await?,
    );
    let issued = SiteServiceClient::new(cb.clone())
        .create_pairing_token(v1::CreatePairingTokenRequest { ttl_secs: 60 })
        .await?
        .into_inner();
    let (token, fp) = issued.token.split_once('.').context("the code pins a CA")?;
    assert_eq!(fp, issued.ca_fingerprint);
    let stranger = tandem_tls::pki::SiteCa::generate("site-z-1")?;
    let wrong = tandem_tls::cert::check_ca_pem(stranger.cert_pem())?;
    let pair = |code: String| {
        let (ca, api, endpoints, advertise) = (
            ca.clone(),
            lab.peer_api_endpoints(0, 1),
            lab.peer_endpoints(0, 1),
            lab.peer_endpoints(1, 0),
        );
        async move {
            SiteServiceClient::new(ca)
                .pair_site(v1::PairSiteRequest {
                    peer_api_endpoints: api,
                    peer_endpoints: endpoints,
                    token: code,
                    advertise_endpoints: advertise,
                })
                .await
        }
    };
    let err = pair(format!("{token}.{wrong}"))
        .await
        .expect_err("paired with a site presenting another CA");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("does not present the CA"), "{err}");
    println!("wrong fingerprint: {}", err.message());
    let err = pair(token.to_string())
        .await
        .expect_err("paired without a fingerprint");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    for ch in [&ca, &cb] {
        let peers = SiteServiceClient::new(ch.clone())
            .list_peers(v1::ListPeersRequest {})
            .await?
            .into_inner()
            .peers;
        assert!(peers.is_empty(), "a refused pairing left {peers:?}");
    }
    // The token was never sent, so it still pairs; each site then holds the other's CA.
    let paired = pair(issued.token.clone()).await?.into_inner();
    assert_eq!(tandem_tls::cert::check_ca_pem(&paired.ca_pem)?, fp);
    let at_b = SiteServiceClient::new(cb)
        .list_peers(v1::ListPeersRequest {})
        .await?
        .into_inner()
        .peers;
    let a_ca =
        std::fs::read_to_string(PkiDir::new(lab.sites[0][0].dir.join("data/pki")).ca_cert())?;
    assert_eq!(at_b.len(), 1);
    assert_eq!(at_b[0].ca_pem, a_ca);
    lab.down().await;
    Ok(())
}

/// A join token lets in the one node it names, once, and only from the site whose CA it
/// pins: a wrong pin fails at the handshake, another node, a proof made with another key
/// and a second use are refused; the certificate holds the node's own key and names it;
/// only an admin creates join tokens; the join is recorded and the CA key shows nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_enrolls_the_node_it_names_once() -> Result<()> {
    use tandem_core::enroll::JoinCode;
    use tandem_proto::client::{ApiConnector, Credentials};
    use tandem_proto::enroll::{JoinError, join};
    use tandem_proto::v1::enrollment_client::EnrollmentClient;
    use tandem_proto::v1::monitoring_service_client::MonitoringServiceClient;
    use tandem_proto::v1::token_service_client::TokenServiceClient;
    use tandem_tls::PeerRole;
    use tandem_tls::pki::NodeKey;

    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(dir.path(), 1, 1).await?;
    let api = lab.endpoints(0);
    let site_id = lab.site_id(0).context("site id")?.to_string();
    let pki = |n: &str| PkiDir::new(dir.path().join(n).join("pki"));

    // The CLI creates it and prints it once.
    let out = tandem_testkit::operator::cli()
        .args([
            "-e", &api[0], "token", "join", "--host", "h9", "--ttl", "10m",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    let code = JoinCode::parse("token", &token)?;

    // Pinned to another CA: the handshake fails before the token is sent.
    let wrong_pin = format!("{}{}", &token[..token.len() - 64], "0".repeat(64));
    let err = join(
        &api,
        &wrong_pin,
        &pki("wrong-pin"),
        PeerRole::Vra,
        "h9",
        &[],
    )
    .await
    .expect_err("a wrong pin must fail");
    assert!(matches!(err, JoinError::Unreachable { .. }), "{err}");
    // Another node than the token names: refused, and the token stays unused.
    let err = join(&api, &token, &pki("h8"), PeerRole::Vra, "h8", &[])
        .await
        .expect_err("another node must be refused");
    assert!(err.to_string().contains("PermissionDenied"), "{err}");
    assert!(!pki("h8").node_cert().exists());
    // A proof made with another key than the one the certificate would be for.
    let pinned = ApiConnector::new(
        Credentials::none().with_tls(tandem_tls::config::pinned_client(code.ca_fingerprint())?),
    )
    .connect(&api)
    .await?;
    let (asked, signer) = (NodeKey::generate()?, NodeKey::generate()?);
    let request = |public_key: Vec<u8>, proof: Vec<u8>| v1::JoinRequest {
        token: token.clone(),
        public_key,
        proof,
        role: v1::JoinRole::Vra as i32,
        id: "h9".into(),
        ip_addresses: Vec::new(),
    };
    let refused = EnrollmentClient::new(pinned.clone())
        .join(request(
            asked.public_key().to_vec(),
            signer.prove(code.id().as_str())?,
        ))
        .await
        .expect_err("a proof by another key must be refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = EnrollmentClient::new(pinned.clone())
        .join(request(vec![4; 10], vec![1; 500]))
        .await
        .expect_err("garbage must be refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // The node it names joins.
    let me = join(&api, &token, &pki("h9"), PeerRole::Vra, "h9", &[]).await?;
    assert_eq!(me, PeerIdentity::vra(&site_id, "h9")?);
    let tls = TlsConfig::load(&pki("h9"))?;
    assert_eq!(tls.identity(), &me);
    assert!(!pki("h9").ca_key().exists(), "the CA key left the managers");
    // A node that holds a usable certificate keeps it (its join token stays unused); one
    // whose certificate cannot be used joins again with a new token.
    let again = tandem_testkit::operator::cli()
        .args(["-e", &api[0], "token", "join", "--host", "h9"])
        .output()?;
    let again = String::from_utf8(again.stdout)?.trim().to_string();
    let h9 = pki("h9");
    let rejoin = || {
        tandem_proto::enroll::join_unless_provisioned(&api, &again, &h9, PeerRole::Vra, "h9", &[])
    };
    rejoin().await?;
    assert_eq!(TlsConfig::load(&pki("h9"))?.chain_leaf(), tls.chain_leaf());
    std::fs::write(pki("h9").node_cert(), "not a certificate")?;
    rejoin().await?;
    let rejoined = TlsConfig::load(&pki("h9"))?;
    assert_eq!(rejoined.identity(), &me);
    assert_ne!(rejoined.chain_leaf(), tls.chain_leaf());
    // Once.
    let err = join(&api, &token, &pki("again"), PeerRole::Vra, "h9", &[])
        .await
        .expect_err("a used token must be refused");
    assert!(err.to_string().contains("PermissionDenied"), "{err}");

    // Listed while unused, withdrawn on request: it then lets no one in.
    let out = tandem_testkit::operator::cli()
        .args(["-e", &api[0], "token", "join", "--node-id", "7"])
        .output()?;
    assert!(out.status.success());
    let spare = String::from_utf8(out.stdout)?.trim().to_string();
    let spare_id = JoinCode::parse("token", &spare)?.id().to_string();
    let listed = |out: std::process::Output| -> Result<Vec<String>> {
        let tokens: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        Ok(tokens
            .iter()
            .map(|t| t["id"].as_str().unwrap_or_default().to_string())
            .collect())
    };
    let ids = listed(
        tandem_testkit::operator::cli()
            .args(["-e", &api[0], "-o", "json", "token", "join-list"])
            .output()?,
    )?;
    assert_eq!(ids, vec![spare_id.clone()], "the used token is not listed");
    let out = tandem_testkit::operator::cli()
        .args(["-e", &api[0], "token", "join-revoke", &spare_id])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = join(&api, &spare, &pki("m7"), PeerRole::Manager, "7", &[])
        .await
        .expect_err("a revoked token must be refused");
    assert!(err.to_string().contains("PermissionDenied"), "{err}");
    assert!(
        listed(
            tandem_testkit::operator::cli()
                .args(["-e", &api[0], "-o", "json", "token", "join-list"])
                .output()?,
        )?
        .is_empty()
    );

    // Only an admin creates join tokens.
    let viewer = TokenServiceClient::new(channel(&api[0]).await?)
        .create_token(v1::CreateTokenRequest {
            name: "watcher".into(),
            role: v1::TokenRole::Viewer as i32,
            ttl_secs: 0,
        })
        .await?
        .into_inner()
        .token;
    let as_viewer = ApiConnector::new(
        Credentials::token(&viewer)?
            .with_ca_file(&lab.dir.join(tandem_testkit::operator::CA_FILE))?,
    )
    .connect(&api)
    .await?;
    let refused = TokenServiceClient::new(as_viewer)
        .create_join_token(v1::CreateJoinTokenRequest {
            role: v1::JoinRole::Manager as i32,
            node_id: 7,
            host_id: String::new(),
            ttl_secs: 0,
        })
        .await
        .expect_err("a viewer must not create join tokens");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // Recorded, and no private key anywhere in the log. Every join, refused ones too, is
    // in the audit trail (written in batches: it may lag a little).
    let audited = |events: &[v1::Event]| {
        let joins: Vec<&v1::Event> = events
            .iter()
            .filter(|e| e.code == "EV0070" && e.description.contains("Enrollment.Join"))
            .collect();
        joins
            .iter()
            .any(|e| e.description.contains("failed: PermissionDenied"))
            && joins.iter().any(|e| e.description.ends_with(": ok"))
    };
    let mut events = Vec::new();
    for _ in 0..50 {
        events = MonitoringServiceClient::new(channel(&api[0]).await?)
            .list_events(v1::ListEventsQuery {
                limit: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .events;
        if audited(&events) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(audited(&events), "{events:?}");
    let joined: Vec<_> = events.iter().filter(|e| e.code == "EV0071").collect();
    assert!(
        joined.iter().any(|e| e.description.contains(&me.uri())),
        "{joined:?}"
    );
    assert!(
        events
            .iter()
            .all(|e| !e.description.contains("PRIVATE KEY") && !e.description.contains(&token)),
        "a secret in the event log"
    );
    lab.down().await;
    Ok(())
}

/// A node restarted after its site rotated its CA comes back on the certificate the
/// rotation renewed: the join token it was started with pins the old CA and is spent, so
/// joining again fails, and the node keeps what it has rather than failing to start. A
/// node that missed the rotation comes back with a new join token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_after_a_ca_rotation_keeps_its_renewed_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(&dir.path().join("lab"), 1, 3).await?;
    let api = lab.sites[0][0].api.clone();
    let before = SiteServiceClient::new(channel(&api).await?)
        .get_site(v1::GetSiteRequest {})
        .await?
        .into_inner();
    let rotating = SiteServiceClient::new(channel(&api).await?)
        .rotate_ca(v1::RotateCaRequest {})
        .await?
        .into_inner();
    lab.trust_operator_cas(&rotating.ca_bundle_pem)?;
    let new_ca = rotating
        .ca_fingerprints
        .iter()
        .find(|f| **f != before.issuing_ca_fingerprint)
        .cloned()
        .context("no new CA")?;
    let mut waited = 0;
    loop {
        let s = SiteServiceClient::new(channel(&api).await?)
            .get_site(v1::GetSiteRequest {})
            .await?
            .into_inner();
        if s.ca_rotation.is_empty() {
            assert_eq!(s.issuing_ca_fingerprint, new_ca);
            break;
        }
        waited += 1;
        if waited > 300 {
            bail!(
                "the rotation is still {:?}, waiting for {:?}",
                s.ca_rotation,
                s.ca_rotation_waits_for
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m2 = &mut lab.sites[0][1];
    let pki = PkiDir::new(m2.dir.join("data").join("pki"));
    // The rotation renewed its certificate and dropped the old CA from its `ca.crt` (each
    // within a few seconds).
    for _ in 0..100 {
        let tls = TlsConfig::load(&pki)?;
        if tls.ca_fingerprint()? == new_ca && tls.own_ca_fingerprints() == vec![new_ca.clone()] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    m2.stop(Duration::from_secs(5)).await?;
    // As an operator's unit file would: the join token it was first started with (a token
    // pinning the old CA; its secret does not matter, the pin fails first).
    let spent = format!(
        "tdmj1.{}.{}.{}",
        "ab".repeat(6),
        "cd".repeat(32),
        before.issuing_ca_fingerprint
    );
    m2.env.push(("TANDEM_JOIN_TOKEN".into(), spent));
    m2.env.push(("TANDEM_JOIN".into(), api.clone()));
    m2.start("join").await?;
    tandem_testkit::lab::wait_leader(&m2.api, 3, Duration::from_secs(20)).await?;
    assert_eq!(TlsConfig::load(&pki)?.ca_fingerprint()?, new_ca);
    let log = std::fs::read_to_string(m2.dir.join("manager.log"))?;
    assert!(
        log.contains("keeping the certificate this node has"),
        "manager 2 did not try its spent token and keep its certificate"
    );

    // A node that missed the rotation (here: given a certificate of the retired CA, and
    // only that CA to trust) comes back with a new join token, which pins the new CA.
    lab.sites[0][1].stop(Duration::from_secs(5)).await?;
    let site_id = lab.site_id(0).context("site")?.to_string();
    let data = lab.sites[0][1].dir.join("data");
    lab.provision(0, &PeerIdentity::manager(&site_id, 2)?, &data)?;
    assert_ne!(TlsConfig::load(&pki)?.ca_fingerprint()?, new_ca);
    let token = lab
        .join_token(0, tandem_testkit::lab::JoinAs::Manager(2))
        .await?;
    let m2 = &mut lab.sites[0][1];
    m2.env.retain(|(k, _)| k != "TANDEM_JOIN_TOKEN");
    m2.env.push(("TANDEM_JOIN_TOKEN".into(), token));
    m2.start("join").await?;
    tandem_testkit::lab::wait_leader(&m2.api, 3, Duration::from_secs(20)).await?;
    let rejoined = TlsConfig::load(&pki)?;
    assert_eq!(rejoined.ca_fingerprint()?, new_ca);
    assert_eq!(rejoined.own_ca_fingerprints(), vec![new_ca.clone()]);
    lab.down().await;
    Ok(())
}

/// Runs `tool` with `args`; answers whether it succeeded and what it printed.
fn run(tool: &str, args: &[&str]) -> Result<(bool, String)> {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .with_context(|| format!("running {tool}"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    ))
}

/// A VRA's NBD exports are reached over TCP only after NBD's STARTTLS with a certificate
/// of the site's CA: plaintext clients (nbdinfo, qemu-io, our own) can neither list nor
/// open an export and learn nothing of them, nor can a client with another site's
/// certificate; qemu-io, qemu-img, nbdinfo and nbdcopy with the site's client certificate
/// can (the VRA's certificate names its NBD address, which libnbd checks), and the Unix
/// socket serves this host's clients (nbdinfo, nbdcopy, qemu-io) without TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_over_tcp_takes_only_tls_clients_of_the_site_and_the_socket_serves_the_host()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(&dir.path().join("lab"), 2, 1).await?;
    lab.start_vras(1).await?;
    let mut options = tandem_tests::ops::recovery_options("vpg-nbd");
    options.vms = 1;
    tandem_testkit::protect::protect(&lab, &options).await?;
    let vra = &lab.vras[0][0];
    let (tcp, socket, export) = (vra.nbd.clone(), vra.nbd_socket.clone(), "vm-0/0");
    let (host, port) = tcp.rsplit_once(':').context("host:port")?;
    // The VRA serves the volume once the managers assigned it.
    let start = std::time::Instant::now();
    while !tandem_nbd::NbdClient::list_exports_at(&socket)
        .await
        .unwrap_or_default()
        .iter()
        .any(|e| e == export)
    {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the VRA never served {export}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Plaintext over TCP: no list, no export, not even its name or size.
    let (ok, text) = run("nbdinfo", &["--list", &format!("nbd://{tcp}")])?;
    assert!(!ok && !text.contains("vm-0"), "nbdinfo --list: {text}");
    println!("nbdinfo --list in plaintext: {}", text.trim());
    let (ok, text) = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read 0 4k",
            &format!("nbd://{tcp}/{export}"),
        ],
    )?;
    assert!(!ok, "qemu-io in plaintext: {text}");
    let err = tandem_nbd::NbdClient::connect(tcp.as_str(), export)
        .await
        .expect_err("a plaintext client opened an export");
    assert!(err.to_string().contains("TLS"), "{err}");

    // With the site's client certificate, over TLS.
    let certs = lab.nbd_client_certs(0).display().to_string();
    let object = format!("tls-creds-x509,id=tls0,dir={certs},endpoint=client");
    let image = format!(
        "driver=nbd,server.type=inet,server.host={host},server.port={port},export={export},\
         tls-creds=tls0,tls-hostname={}",
        tandem_tls::pki::SERVER_NAME
    );
    let tls_io = |command: &str| {
        run(
            "qemu-io",
            &["--object", &object, "--image-opts", &image, "-c", command],
        )
    };
    let (ok, text) = tls_io("write -P 0x3c 1M 64k")?;
    assert!(ok && !text.contains("failed"), "qemu-io over TLS: {text}");
    let (ok, text) = tls_io("read -P 0x3c 1M 64k")?;
    assert!(ok && !text.contains("failed"), "qemu-io over TLS: {text}");
    let (ok, text) = run(
        "qemu-img",
        &["info", "--object", &object, "--image-opts", &image],
    )?;
    assert!(
        ok && text.contains("16 MiB"),
        "qemu-img info over TLS: {text}"
    );

    // Another site's client certificate is refused.
    let other = lab.nbd_client_certs(1).display().to_string();
    let (ok, text) = run(
        "qemu-io",
        &[
            "--object",
            &format!("tls-creds-x509,id=tls0,dir={other},endpoint=client"),
            "--image-opts",
            &image,
            "-c",
            "read 0 4k",
        ],
    )?;
    assert!(!ok, "qemu-io with site b's certificate: {text}");

    // The local socket: what the TLS client wrote is there.
    let local = tandem_nbd::endpoint_uri(&socket, export);
    let (ok, text) = run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x3c 1M 64k", &local],
    )?;
    assert!(
        ok && !text.contains("failed"),
        "qemu-io on the socket: {text}"
    );

    // libnbd over TLS (nbds:// checks the address it dials: the VRA's certificate names
    // it) and on the socket.
    let nbds = format!("nbds://{tcp}/{export}?tls-certificates={certs}");
    let (ok, text) = run("nbdinfo", &[&nbds])?;
    assert!(ok && text.contains("16777216"), "nbdinfo over TLS: {text}");
    let mut copies = Vec::new();
    for (how, list, uri) in [
        (
            "over TLS",
            format!("nbds://{tcp}?tls-certificates={certs}"),
            nbds,
        ),
        (
            "on the socket",
            format!("nbd+unix://?socket={socket}"),
            local,
        ),
    ] {
        let (ok, text) = run("nbdinfo", &["--list", &list])?;
        assert!(ok && text.contains(export), "nbdinfo --list {how}: {text}");
        let copy = dir.path().join(format!("copy-{}.raw", copies.len()));
        let (ok, text) = run("nbdcopy", &[&uri, &copy.display().to_string()])?;
        assert!(ok, "nbdcopy {how}: {text}");
        copies.push(copy);
    }
    for copy in &copies {
        let copied = std::fs::read(copy)?;
        assert_eq!(copied.len() as u64, 16 << 20);
        assert!(
            copied[1 << 20..(1 << 20) + (64 << 10)]
                .iter()
                .all(|b| *b == 0x3c)
        );
    }
    lab.down().await;
    Ok(())
}
