//! The enrollment service: a new manager or VRA exchanges its join token for its
//! certificate.

use tandem_core::enroll::{JoinCode, Joiner};
use tandem_core::ids::HostId;
use tandem_proto::v1::{self, enrollment_server::Enrollment};
use tonic::{Request, Response, Status};

use super::bad;
use crate::error::ApiError;
use crate::site::SiteManager;

pub struct EnrollmentApi(pub SiteManager);

/// The largest proof of key possession (an ECDSA P-256 signature in DER is at most 72).
const MAX_PROOF_BYTES: usize = 128;

#[tonic::async_trait]
impl Enrollment for EnrollmentApi {
    async fn join(&self, r: Request<v1::JoinRequest>) -> Result<Response<v1::Enrolled>, Status> {
        let r = r.into_inner();
        let code = JoinCode::parse("token", &r.token).map_err(bad)?;
        if r.public_key.len() != 65 {
            return Err(
                ApiError::invalid("public_key: an uncompressed P-256 point (65 bytes)").into(),
            );
        }
        if r.proof.is_empty() || r.proof.len() > MAX_PROOF_BYTES {
            return Err(ApiError::invalid(format!("proof: 1..{MAX_PROOF_BYTES} bytes")).into());
        }
        let joiner = match v1::JoinRole::try_from(r.role) {
            Ok(v1::JoinRole::Manager) => Joiner::Manager {
                node_id: r
                    .id
                    .parse()
                    .map_err(|_| ApiError::invalid("id: a manager's node id (decimal)"))?,
            },
            Ok(v1::JoinRole::Vra) => Joiner::Vra {
                host: HostId::parse("id", &r.id).map_err(bad)?,
            },
            _ => return Err(ApiError::invalid("role: MANAGER or VRA").into()),
        };
        let ips = crate::enroll::certificate_ips("ip_addresses", &r.ip_addresses)?;
        let enrolled = self
            .0
            .join(code, &joiner, &r.public_key, &r.proof, &ips)
            .await?;
        Ok(Response::new(v1::Enrolled {
            cert_pem: enrolled.cert_pem,
            ca_pem: enrolled.ca_pem,
            site_id: enrolled.identity.site.clone(),
            identity: enrolled.identity.uri(),
        }))
    }
}
