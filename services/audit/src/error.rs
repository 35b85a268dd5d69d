//! The audit service's errors and their one mapping to gRPC statuses.

use agentmesh_resilience::{FieldViolation, invalid_argument};
use tonic::Status;

/// Everything that can go wrong in the audit service.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The request broke validation rules; one entry per bad field.
    #[error("invalid request ({} violations)", .0.len())]
    Invalid(Vec<FieldViolation>),
    /// An event id is already stored with different content.
    #[error("{field} {event_id:?} is already stored with different content")]
    Conflict {
        /// Request path of the event id (`event.event_id`, `events[2].event_id`).
        field: String,
        /// The event id.
        event_id: String,
    },
    /// Nothing at the requested position.
    #[error("{0}")]
    NotFound(String),
    /// The writer queue is full.
    #[error("audit writer queue is full ({0} requests, audit.queue_capacity); retry later")]
    Overloaded(usize),
    /// The service is shutting down.
    #[error("audit service is shutting down")]
    ShuttingDown,
    /// The database failed or is unreachable; nothing was committed.
    #[error("database unavailable: {0}")]
    Database(#[from] sea_orm::DbErr),
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl From<AuditError> for Status {
    fn from(error: AuditError) -> Self {
        match error {
            AuditError::Invalid(violations) => invalid_argument(&violations),
            AuditError::Conflict { .. } => Status::already_exists(error.to_string()),
            AuditError::NotFound(_) => Status::not_found(error.to_string()),
            AuditError::Overloaded(_) => Status::resource_exhausted(error.to_string()),
            AuditError::ShuttingDown => Status::unavailable(error.to_string()),
            AuditError::Database(_) => {
                tracing::warn!(%error, "audit storage failed");
                Status::unavailable(error.to_string())
            }
            AuditError::Corrupt(_) => {
                tracing::error!(%error, "audit storage holds undecodable data");
                Status::data_loss(error.to_string())
            }
        }
    }
}
