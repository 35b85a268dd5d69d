//! The gateway's errors and their single mapping to gRPC statuses.

use std::time::Duration;

use agentmesh_resilience::FieldViolation;
use agentmesh_resilience::invalid_argument;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Why a gateway call failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed.
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    /// No agent node could serve and no fallback is configured.
    #[error("no agent node can serve the task: {0}")]
    Unavailable(String),
    /// The caller's deadline passed.
    #[error("the caller's deadline passed: {0}")]
    DeadlineExceeded(String),
    /// An agent node refused the task for a reason that is the caller's
    /// (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION…): passed through.
    #[error("{}", .0.message())]
    Upstream(Status),
    /// The fallback agent refused or failed the task.
    #[error(transparent)]
    Fallback(#[from] agentmesh_agent::AgentError),
}

impl From<GatewayError> for Status {
    fn from(error: GatewayError) -> Self {
        let message = error.to_string();
        match error {
            GatewayError::Invalid(violations) => invalid_argument(&violations),
            GatewayError::Unavailable(_) => Status::with_error_details(
                Code::Unavailable,
                message,
                ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
            ),
            GatewayError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            GatewayError::Upstream(status) => status,
            GatewayError::Fallback(error) => error.into(),
        }
    }
}
