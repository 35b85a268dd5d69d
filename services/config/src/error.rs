//! The config service's errors and their one mapping to gRPC statuses.

use agentmesh_resilience::{FieldViolation, invalid_argument};
use tonic::Status;

/// Everything that can go wrong in the config service.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The request broke validation rules; one entry per bad field.
    #[error("invalid request ({} violations)", .0.len())]
    Invalid(Vec<FieldViolation>),
    /// `expected_revision` did not match the scope's current revision.
    #[error("scope {scope} is at revision {current}, not the expected {expected}")]
    RevisionConflict {
        /// The scope.
        scope: String,
        /// What the caller expected.
        expected: u64,
        /// What it is.
        current: u64,
    },
    /// A revision does not exist.
    #[error("revision {0} does not exist")]
    RevisionNotFound(u64),
    /// The watcher limit is reached.
    #[error("too many watchers: the limit is {0} (config_service.max_watchers)")]
    TooManyWatchers(usize),
    /// The service is shutting down.
    #[error("config service is shutting down")]
    ShuttingDown,
    /// The database failed or is unreachable.
    #[error("database unavailable: {0}")]
    Database(#[from] sea_orm::DbErr),
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl From<ConfigError> for Status {
    fn from(error: ConfigError) -> Self {
        match error {
            ConfigError::Invalid(violations) => invalid_argument(&violations),
            ConfigError::RevisionConflict { .. } => Status::failed_precondition(error.to_string()),
            ConfigError::RevisionNotFound(_) => Status::not_found(error.to_string()),
            ConfigError::TooManyWatchers(_) => Status::resource_exhausted(error.to_string()),
            ConfigError::ShuttingDown => Status::unavailable(error.to_string()),
            ConfigError::Database(_) => {
                tracing::warn!(%error, "config storage failed");
                Status::unavailable(error.to_string())
            }
            ConfigError::Corrupt(_) => {
                tracing::error!(%error, "config storage holds undecodable data");
                Status::data_loss(error.to_string())
            }
        }
    }
}
