//! What standard gRPC clients use to find their way, for every Tandem server (managers and
//! VRAs): server reflection in v1 and v1alpha (grpcurl before 1.8.8 speaks only v1alpha),
//! advertising the services the port serves rather than every service of the protos, and
//! the health service.

use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};
use tonic_reflection::server::v1alpha::{
    ServerReflection as ServerReflectionAlpha,
    ServerReflectionServer as ServerReflectionServerAlpha,
};

/// The name under which the health service is served.
pub const HEALTH: &str = "grpc.health.v1.Health";

fn builder(served: &[&str]) -> tonic_reflection::server::Builder<'static> {
    served.iter().fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
        |b, name| b.with_service_name(*name),
    )
}

/// Reflection services (v1, v1alpha) advertising `served`.
pub fn reflection(
    served: &[&str],
) -> Result<
    (
        ServerReflectionServer<impl ServerReflection>,
        ServerReflectionServerAlpha<impl ServerReflectionAlpha>,
    ),
    tonic_reflection::server::Error,
> {
    Ok((
        builder(served).build_v1()?,
        builder(served).build_v1alpha()?,
    ))
}
