//! `tandem site` and `tandem pair`: this site, its peers, and pairing.

use crate::output::{Format, print};
use anyhow::Result;
use clap::Subcommand;
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::site_service_client::SiteServiceClient;

#[derive(Subcommand, Debug)]
pub(crate) enum SiteCmd {
    /// Shows the site's id, name, peers and CAs (and a CA rotation under way).
    Get,
    /// Issues a one-time pairing token for another site to present.
    Token {
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Rotates the site's CA: every node and paired site trusts a new CA first, then it
    /// issues and every certificate is renewed, then the old CA is retired. `tandem site
    /// get` shows where it stands. Operators' clients need the new CA in their CA file
    /// (TANDEM_CA_FILE) before the old one is retired.
    RotateCa,
}

#[derive(Subcommand, Debug)]
pub(crate) enum PairCmd {
    /// Pairs with the site whose managers listen at --peer, using its token.
    Create {
        /// The peer's managers' operator addresses (where `tandem -e` reaches them): the
        /// pairing token is presented there.
        #[arg(long = "peer", required = true, value_delimiter = ',')]
        peers: Vec<String>,
        /// The peer's managers' internal addresses (their --raft-listen port, which
        /// serves paired sites with mutual TLS) as this site reaches them (default: the
        /// addresses the peer answers; name them when a link or NAT is in between).
        #[arg(long = "peer-internal", value_delimiter = ',')]
        peer_internal: Vec<String>,
        /// The peer's pairing token, ending in its CA's fingerprint.
        #[arg(long)]
        token: String,
        /// Internal addresses at which the peer reaches this site (default: this site's
        /// managers').
        #[arg(long = "advertise", value_delimiter = ',')]
        advertise: Vec<String>,
    },
    List,
    /// Removes the pairing with a site, on both sites (refused while a VPG replicates
    /// between them).
    Delete {
        site_id: String,
        /// Unpair this site alone when the peer cannot be reached.
        #[arg(long)]
        force: bool,
    },
    /// Limits what this site's VRAs send to a peer site (0: no limit); its VPGs share it
    /// by priority.
    Limit {
        site_id: String,
        #[arg(long)]
        bytes_per_sec: u64,
    },
}

pub(crate) fn peers_table(fmt: Format, value: &impl serde::Serialize, peers: &[v1::PeerSite]) {
    let rows = peers
        .iter()
        .map(|p| {
            let limit = match p.bandwidth_limit_bytes_per_sec {
                0 => "none".to_string(),
                b => format!("{b} B/s"),
            };
            vec![p.id.clone(), p.name.clone(), p.endpoints.join(","), limit]
        })
        .collect();
    print(
        fmt,
        value,
        &["ID", "NAME", "ENDPOINTS", "BANDWIDTH_LIMIT"],
        rows,
    );
}

pub(crate) fn site_table(fmt: Format, s: &v1::Site) {
    let short = |fp: &str| fp.get(..16).unwrap_or(fp).to_string();
    let rows = vec![vec![
        s.id.clone(),
        s.name.clone(),
        s.peers.len().to_string(),
        short(&s.issuing_ca_fingerprint),
        s.ca_fingerprints
            .iter()
            .map(|f| short(f))
            .collect::<Vec<_>>()
            .join(","),
        match (s.ca_rotation.as_str(), s.ca_rotation_waits_for.as_str()) {
            ("", _) => "-".into(),
            (phase, "") => phase.to_string(),
            (phase, what) => format!("{phase} (waits for {what})"),
        },
    ]];
    print(
        fmt,
        s,
        &[
            "ID",
            "NAME",
            "PEERS",
            "ISSUING_CA",
            "TRUSTED_CAS",
            "CA_ROTATION",
        ],
        rows,
    );
}

pub(crate) async fn run(ch: Channel, fmt: Format, c: SiteCmd) -> Result<()> {
    let mut cl = SiteServiceClient::new(ch);
    match c {
        SiteCmd::Get => {
            let s = cl.get_site(v1::GetSiteRequest {}).await?.into_inner();
            site_table(fmt, &s);
        }
        SiteCmd::RotateCa => {
            let s = cl.rotate_ca(v1::RotateCaRequest {}).await?.into_inner();
            site_table(fmt, &s);
        }
        SiteCmd::Token { ttl_secs } => {
            let t = cl
                .create_pairing_token(v1::CreatePairingTokenRequest { ttl_secs })
                .await?
                .into_inner();
            let rows = vec![vec![
                t.token.clone(),
                t.site_name.clone(),
                t.expires_at_ms.to_string(),
            ]];
            print(fmt, &t, &["TOKEN", "SITE", "EXPIRES_AT_MS"], rows);
        }
    }
    Ok(())
}

pub(crate) async fn run_pair(ch: Channel, fmt: Format, c: PairCmd) -> Result<()> {
    let mut cl = SiteServiceClient::new(ch);
    match c {
        PairCmd::Create {
            peers,
            peer_internal,
            token,
            advertise,
        } => {
            let p = cl
                .pair_site(v1::PairSiteRequest {
                    peer_api_endpoints: peers,
                    peer_endpoints: peer_internal,
                    token,
                    advertise_endpoints: advertise,
                })
                .await?
                .into_inner();
            peers_table(fmt, &p, std::slice::from_ref(&p));
        }
        PairCmd::List => {
            let r = cl.list_peers(v1::ListPeersRequest {}).await?.into_inner();
            peers_table(fmt, &r, &r.peers);
        }
        PairCmd::Delete { site_id, force } => {
            cl.unpair_site(v1::UnpairSiteRequest { site_id, force })
                .await?;
        }
        PairCmd::Limit {
            site_id,
            bytes_per_sec,
        } => {
            let p = cl
                .set_peer_bandwidth_limit(v1::SetPeerBandwidthLimitRequest {
                    site_id,
                    bytes_per_sec,
                })
                .await?
                .into_inner();
            peers_table(fmt, &p, std::slice::from_ref(&p));
        }
    }
    Ok(())
}
