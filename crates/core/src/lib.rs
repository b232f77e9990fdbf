//! Tandem's domain: ids, inventory, VPG definitions, validation, the seed's statuses and the
//! replicated site state machine. Pure logic, no IO. `fuzz` (feature `fuzzing`) holds the
//! entry point of a fuzz target in `fuzz/`.

pub mod access;
pub mod alerts;
pub mod ca_rotation;
pub mod enroll;
pub mod error;
pub mod events;
pub mod fence;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod ids;
pub mod inventory;
pub mod observe;
pub mod pairing;
pub mod protection;
pub mod recovery;
pub mod state;
pub mod status;
pub mod tasks;
pub mod vpg;

pub use error::{DomainError, FieldViolation, Violations};
