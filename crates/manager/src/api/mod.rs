//! Thin tonic services: decode and check the request, call the site manager, map the error.

pub mod cluster;
pub mod enroll;
pub mod internal;
pub mod inventory;
pub mod monitoring;
pub mod recovery;
pub mod site;
pub mod tasks;
pub mod tokens;
pub mod vpg;

use tandem_core::DomainError;
use tonic::Status;

/// The largest forwarded command, leader request, peer VPG definition or peer report
/// accepted.
pub(crate) const MAX_JSON_BYTES: usize = 1 << 20;

/// Maps a domain error met while decoding a request.
pub(crate) fn bad(e: DomainError) -> Status {
    tandem_proto::status::to_status(&e)
}
