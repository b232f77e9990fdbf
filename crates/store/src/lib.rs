//! Site configuration store: openraft type config, sled and in-memory log and state machine,
//! and Raft RPCs over gRPC.

pub mod codec;
pub mod storage;
pub mod types;
