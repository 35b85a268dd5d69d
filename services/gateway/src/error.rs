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
    /// The audit buffer is full and `gateway.audit.overflow = fail_closed`:
    /// no task runs without its audit event.
    #[error(
        "audit buffer full ({capacity} events waiting for the audit service): task refused (gateway.audit.overflow = fail_closed)"
    )]
    AuditBufferFull {
        /// The buffer's capacity.
        capacity: usize,
    },
}

/// `ErrorInfo.reason` of a task refused because the audit buffer is full.
pub const AUDIT_BUFFER_FULL_REASON: &str = "AUDIT_BUFFER_FULL";
/// `ErrorInfo.domain` of the gateway's own reasons.
pub const ERROR_DOMAIN: &str = "gateway.agentmesh";

impl GatewayError {
    /// The message the caller gets with the status.
    pub fn message(&self) -> String {
        match self {
            GatewayError::Invalid(violations) => invalid_argument(violations).message().to_owned(),
            other => other.to_string(),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            GatewayError::Invalid(_) => Code::InvalidArgument,
            GatewayError::Unavailable(_) | GatewayError::AuditBufferFull { .. } => {
                Code::Unavailable
            }
            GatewayError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            GatewayError::Upstream(status) => status.code(),
            GatewayError::Fallback(error) => agentmesh_agent::service::status_code_of(error),
        }
    }
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
            GatewayError::AuditBufferFull { .. } => {
                let mut details = ErrorDetails::with_retry_info(Some(Duration::from_secs(1)));
                details.set_error_info(
                    AUDIT_BUFFER_FULL_REASON,
                    ERROR_DOMAIN,
                    std::collections::HashMap::new(),
                );
                Status::with_error_details(Code::Unavailable, message, details)
            }
        }
    }
}
