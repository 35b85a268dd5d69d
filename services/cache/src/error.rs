//! The cache service's errors and their one mapping to gRPC statuses.
//!
//! Redis failures are not errors for callers: the service degrades to L1
//! (see [`crate::l2`]), so they never reach this enum.

use agentmesh_resilience::{FieldViolation, invalid_argument};
use tonic::Status;

/// Everything a cache call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The request broke validation rules; one entry per bad field.
    #[error("invalid request ({} violations)", .0.len())]
    Invalid(Vec<FieldViolation>),
    /// `Set` carried a lease token that is unknown, expired or for another
    /// key; nothing was written.
    #[error(
        "lease_token is not a live lease on {namespace}/{key}: it is unknown, expired or for another key; nothing was written"
    )]
    LeaseRejected {
        /// Namespace of the key.
        namespace: String,
        /// The key.
        key: String,
    },
}

impl From<CacheError> for Status {
    fn from(error: CacheError) -> Self {
        match error {
            CacheError::Invalid(violations) => invalid_argument(&violations),
            CacheError::LeaseRejected { .. } => Status::failed_precondition(error.to_string()),
        }
    }
}
