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
    /// A workflow operation failed, or the task's project is stopped.
    #[error(transparent)]
    Workflow(#[from] WorkflowError),
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
            GatewayError::Workflow(error) => error.code(),
            GatewayError::Unauthenticated { .. } => Code::Unauthenticated,
            GatewayError::PermissionDenied(_) => Code::PermissionDenied,
            GatewayError::RateLimited { .. } | GatewayError::BudgetExhausted { .. } => {
                Code::ResourceExhausted
            }
            GatewayError::NotFound(_) => Code::NotFound,
            GatewayError::Database(_) | GatewayError::UsageStore(_) => Code::Unavailable,
        }
    }
}

/// Why a workflow operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// The request is malformed.
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    /// No run has this id.
    #[error("workflow run {0:?} not found")]
    RunNotFound(String),
    /// No definition has this name.
    #[error("workflow definition {0:?} not found (ListWorkflowDefinitions lists them)")]
    DefinitionNotFound(String),
    /// The run has no step of this name.
    #[error("workflow run {run_id:?} has no step {step:?}")]
    StepNotFound {
        /// The run.
        run_id: String,
        /// The step asked for.
        step: String,
    },
    /// The project is under an emergency stop.
    #[error(
        "project {project_id:?} is stopped (emergency stop by {stopped_by} at {stopped_at}: {reason}); ResumeProject lifts it"
    )]
    ProjectStopped {
        /// The project.
        project_id: String,
        /// Why it was stopped.
        reason: String,
        /// Who stopped it.
        stopped_by: String,
        /// When (RFC 3339).
        stopped_at: String,
    },
    /// The idempotency key was used for a different request.
    #[error(
        "idempotency_key {0:?} was already used for a different workflow request in this project"
    )]
    IdempotencyConflict(String),
    /// The step is not waiting for a decision.
    #[error("step {step:?} is {state}, not awaiting approval")]
    NotAwaitingApproval {
        /// The step.
        step: String,
        /// Its state.
        state: &'static str,
    },
    /// The run already reached a final state.
    #[error("workflow run {run_id:?} is already {state}")]
    RunFinished {
        /// The run.
        run_id: String,
        /// Its final state.
        state: &'static str,
    },
    /// This gateway drives as many runs as it may.
    #[error(
        "this gateway already drives {0} unfinished workflow runs (gateway.workflows.max_concurrent_runs)"
    )]
    TooManyRuns(usize),
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// The database failed.
    #[error("workflow store unavailable: {0}")]
    Store(#[from] sea_orm::DbErr),
    /// A stored run cannot be decoded.
    #[error("stored workflow run is unreadable: {0}")]
    Corrupt(String),
}

impl WorkflowError {
    /// The gRPC code this error maps to (as the `Status` conversion).
    pub fn code(&self) -> Code {
        match self {
            WorkflowError::Invalid(_) => Code::InvalidArgument,
            WorkflowError::RunNotFound(_)
            | WorkflowError::DefinitionNotFound(_)
            | WorkflowError::StepNotFound { .. } => Code::NotFound,
            WorkflowError::ProjectStopped { .. }
            | WorkflowError::IdempotencyConflict(_)
            | WorkflowError::NotAwaitingApproval { .. }
            | WorkflowError::RunFinished { .. } => Code::FailedPrecondition,
            WorkflowError::TooManyRuns(_) => Code::ResourceExhausted,
            WorkflowError::ShuttingDown | WorkflowError::Store(_) => Code::Unavailable,
            WorkflowError::Corrupt(_) => Code::Internal,
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
            GatewayError::Workflow(error) => error.into(),
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

impl From<WorkflowError> for Status {
    fn from(error: WorkflowError) -> Self {
        let message = error.to_string();
        match error {
            WorkflowError::Invalid(violations) => invalid_argument(&violations),
            WorkflowError::RunNotFound(_)
            | WorkflowError::DefinitionNotFound(_)
            | WorkflowError::StepNotFound { .. } => Status::not_found(message),
            WorkflowError::ProjectStopped { project_id, .. } => Status::with_error_details(
                Code::FailedPrecondition,
                message.clone(),
                ErrorDetails::with_precondition_failure_violation(
                    "PROJECT_STOPPED",
                    format!("project/{project_id}"),
                    message,
                ),
            ),
            WorkflowError::IdempotencyConflict(_)
            | WorkflowError::NotAwaitingApproval { .. }
            | WorkflowError::RunFinished { .. } => Status::failed_precondition(message),
            WorkflowError::TooManyRuns(_) => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(Duration::from_secs(5))),
            ),
            WorkflowError::ShuttingDown | WorkflowError::Store(_) => Status::with_error_details(
                Code::Unavailable,
                message,
                ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
            ),
            WorkflowError::Corrupt(_) => Status::internal(message),
        }
    }
}
