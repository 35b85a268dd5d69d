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
    /// No valid API key came with the call.
    #[error("{message}")]
    Unauthenticated {
        /// `missing`, `malformed`, `unknown` or `revoked`.
        reason: &'static str,
        /// What was wrong, for the caller.
        message: String,
    },
    /// The key may not do this (another project, an admin-only call).
    #[error("{0}")]
    PermissionDenied(String),
    /// The key's rate limit is exceeded.
    #[error(
        "rate limit of API key {key_id} exceeded ({rps} requests/s, burst {burst}); retry in {} ms",
        retry_after.as_millis().max(1)
    )]
    RateLimited {
        /// The key.
        key_id: String,
        /// Its sustained rate.
        rps: u32,
        /// Its bucket size.
        burst: u32,
        /// When one more call would conform.
        retry_after: Duration,
    },
    /// The project's token budget for the period is used up.
    #[error(
        "project {project:?} has used its {} token budget: {used} of {limit} tokens (budget.tokens_per_{}); it resets at {}",
        period.adjective(),
        period.as_str(),
        crate::budget::rfc3339(*resets_at)
    )]
    BudgetExhausted {
        /// The project.
        project: String,
        /// Which budget.
        period: crate::budget::Period,
        /// The budget in tokens.
        limit: u64,
        /// Tokens counted in the period.
        used: u64,
        /// When the period ends.
        resets_at: std::time::SystemTime,
    },
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The gateway's database failed.
    #[error("gateway database error: {0}")]
    Database(#[from] sea_orm::DbErr),
    /// The token usage store (Redis or the database) failed.
    #[error("token usage store unavailable: {0}")]
    UsageStore(String),
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
            GatewayError::Unauthenticated { .. } => Status::unauthenticated(message),
            GatewayError::PermissionDenied(_) => Status::permission_denied(message),
            GatewayError::RateLimited {
                key_id,
                retry_after,
                ..
            } => {
                let mut details = ErrorDetails::with_retry_info(Some(retry_after));
                details.add_quota_failure_violation(
                    format!("api_key:{key_id}"),
                    "requests per second of the key (limits.* live settings)",
                );
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            GatewayError::BudgetExhausted {
                project,
                period,
                resets_at,
                ..
            } => {
                let wait = resets_at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                let mut details = ErrorDetails::with_retry_info(Some(wait));
                details.add_quota_failure_violation(
                    format!("project:{project}"),
                    format!("budget.tokens_per_{}", period.as_str()),
                );
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            GatewayError::NotFound(_) => Status::not_found(message),
            GatewayError::Database(_) | GatewayError::UsageStore(_) => Status::with_error_details(
                Code::Unavailable,
                message,
                ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
            ),
        }
    }
}
