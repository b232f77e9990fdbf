//! Generated gRPC code for `tandem.v1`, conversions between wire and domain types, and the
//! mapping of domain errors to gRPC codes.

pub mod client;
pub mod convert;
pub mod discovery;
pub mod enroll;
pub mod peer_access;
pub mod status;
pub mod transport;
pub mod vra_convert;

/// Generated messages and services of package `tandem.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("tandem.v1");
}

/// Encoded file descriptor set of every Tandem proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tandem_descriptor");

/// The largest request or response message accepted on any Tandem gRPC service.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
