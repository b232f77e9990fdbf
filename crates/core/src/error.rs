//! Domain errors: what a rejected request or command tells the operator, field by field.

use serde::{Deserialize, Serialize};

/// One invalid field of a request, named by its path (`vms[2].volumes[0].size_bytes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldViolation {
    pub field: String,
    pub message: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a domain operation failed. Replicated through Raft as part of a command's outcome,
/// so it is plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum DomainError {
    #[error("invalid request: {}", render_violations(.0))]
    Invalid(Vec<FieldViolation>),
    #[error("{kind} {id:?} not found")]
    NotFound { kind: String, id: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: String, name: String },
    #[error("{kind} {id:?} was changed concurrently: read at generation {expected}, now {actual}")]
    Conflict {
        kind: String,
        id: String,
        expected: u64,
        actual: u64,
    },
    #[error("{0}")]
    FailedPrecondition(String),
}

fn render_violations(v: &[FieldViolation]) -> String {
    v.iter()
        .map(|f| format!("{}: {}", f.field, f.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl DomainError {
    pub fn not_found(kind: &str, id: impl ToString) -> Self {
        Self::NotFound {
            kind: kind.to_string(),
            id: id.to_string(),
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, message)])
    }

    pub fn precondition(message: impl Into<String>) -> Self {
        Self::FailedPrecondition(message.into())
    }
}

/// Collects field violations while a request is checked, so that the operator sees every
/// problem at once rather than one per round trip.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldViolation::new(field, message));
    }

    /// Records a violation when `ok` is false.
    pub fn check(&mut self, ok: bool, field: impl Into<String>, message: impl Into<String>) {
        if !ok {
            self.add(field, message);
        }
    }

    /// Folds a check's outcome into the list: its field violations, or any other error as
    /// one line. Yields the value when the check passed.
    pub fn absorb<T>(&mut self, r: Result<T, DomainError>) -> Option<T> {
        match r {
            Ok(t) => Some(t),
            Err(DomainError::Invalid(fields)) => {
                self.0.extend(fields);
                None
            }
            Err(other) => {
                self.add("request", other.to_string());
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_result(self) -> Result<(), DomainError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DomainError::Invalid(self.0))
        }
    }
}
