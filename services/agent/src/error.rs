//! The agent service's errors and their one mapping to gRPC statuses.

use std::time::Duration;

use agentmesh_resilience::{FieldViolation, invalid_argument};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::provider::ProviderError;

/// Everything that can go wrong in the agent service.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request broke validation rules; one entry per field and rule.
    #[error("invalid request ({} violations)", .0.len())]
    Invalid(Vec<FieldViolation>),
    /// No such agent type.
    #[error("agent type {0:?} is not in the catalogue")]
    UnknownAgent(String),
    /// No such execution record.
    #[error("execution {0:?} not found")]
    ExecutionNotFound(String),
    /// No such artifact.
    #[error("artifact {name:?} not found in project {project_id:?}")]
    ArtifactNotFound {
        /// The project.
        project_id: String,
        /// The artifact name.
        name: String,
    },
    /// The request is valid but cannot run in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The node's execution slots and queue are full.
    #[error("agent node is at capacity: {0}")]
    Overloaded(String),
    /// The provider failed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The caller's deadline passed.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The node is shutting down.
    #[error("agent node is shutting down")]
    ShuttingDown,
    /// The database failed or is unreachable.
    #[error("database unavailable: {0}")]
    Database(#[from] sea_orm::DbErr),
    /// A stored record does not match its digest or cannot be decoded.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

fn with_retry(code: Code, message: String, delay: Option<Duration>) -> Status {
    match delay {
        Some(delay) => {
            Status::with_error_details(code, message, ErrorDetails::with_retry_info(Some(delay)))
        }
        None => Status::new(code, message),
    }
}

impl From<AgentError> for Status {
    fn from(error: AgentError) -> Self {
        let message = error.to_string();
        match error {
            AgentError::Invalid(violations) => invalid_argument(&violations),
            AgentError::UnknownAgent(_)
            | AgentError::ExecutionNotFound(_)
            | AgentError::ArtifactNotFound { .. } => Status::not_found(message),
            AgentError::FailedPrecondition(_) => Status::failed_precondition(message),
            AgentError::Overloaded(_) => with_retry(
                Code::ResourceExhausted,
                message,
                Some(Duration::from_millis(100)),
            ),
            AgentError::Provider(provider) => match provider {
                ProviderError::Busy(_) => with_retry(
                    Code::ResourceExhausted,
                    message,
                    Some(Duration::from_millis(100)),
                ),
                ProviderError::RateLimited { retry_after, .. } => with_retry(
                    Code::ResourceExhausted,
                    message,
                    Some(retry_after.unwrap_or(Duration::from_secs(1))),
                ),
                ProviderError::Unavailable { retry_after, .. } => {
                    with_retry(Code::Unavailable, message, retry_after)
                }
                ProviderError::Rejected { .. } => Status::failed_precondition(message),
                ProviderError::Timeout(_) => Status::deadline_exceeded(message),
                ProviderError::Cancelled => Status::cancelled(message),
            },
            AgentError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            AgentError::ShuttingDown => Status::unavailable(message),
            AgentError::Database(_) => {
                tracing::warn!(error = %message, "agent storage failed");
                Status::unavailable(message)
            }
            AgentError::Corrupt(_) => {
                tracing::error!(error = %message, "agent storage holds a corrupt record");
                Status::data_loss(message)
            }
        }
    }
}
