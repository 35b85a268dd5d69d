//! The thin `agentmesh.agent.v1.AgentService` implementation: checks wire
//! input, calls [`AgentCore`], converts back. Deadlines come from the
//! `grpc-timeout` header; a cancelled call drops its future, which stops
//! the provider request.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_proto::agent as pb;
use agentmesh_proto::agent::agent_service_server::AgentService;
use agentmesh_proto::common;
use agentmesh_resilience::FieldViolation;
use chrono::{DateTime, Utc};
use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tonic_types::StatusExt;

use crate::error::AgentError;
use crate::provider::{Finish, Usage};
use crate::service::{AgentCore, CallContext, ExecuteSpec, ExecutionResult, Overrides};
use crate::store::{ExecutionFilter, ExecutionRecord, ExecutionStatus, NewArtifact, artifact};

/// Most tasks in one batch.
pub const MAX_BATCH_TASKS: usize = 100;

/// The gRPC face of the agent service.
#[derive(Debug, Clone)]
pub struct AgentGrpc {
    core: Arc<AgentCore>,
}

impl AgentGrpc {
    /// Wraps the core.
    pub fn new(core: Arc<AgentCore>) -> Self {
        Self { core }
    }
}

/// The caller's deadline from `grpc-timeout`.
pub fn deadline_of<T>(request: &Request<T>) -> Option<Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    let duration = match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    Instant::now().checked_add(duration)
}

fn trace_id() -> String {
    agentmesh_telemetry::propagation::current_trace_id().unwrap_or_default()
}

/// Whether `text` is made of ASCII letters, digits, `.`, `_`, `-`, `:` (the
/// shape of project, workflow and correlation ids).
pub fn is_identifier(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

fn check_id(
    violations: &mut Vec<FieldViolation>,
    field: &str,
    value: &str,
    required: bool,
    max: usize,
) {
    if value.is_empty() {
        if required {
            violations.push(FieldViolation::new(field, "\"\"", "must not be empty"));
        }
        return;
    }
    if value.len() > max || !is_identifier(value) {
        violations.push(FieldViolation::new(
            field,
            format!("{:?}", value.chars().take(64).collect::<String>()),
            format!("must be 1 to {max} bytes of ASCII letters, digits, '.', '_', '-', ':'"),
        ));
    }
}

/// Checks the shape of a wire spec and converts it (the gateway checks its
/// tasks with it too).
pub fn spec_from_wire(
    spec: Option<pb::ExecutionSpec>,
    field: &str,
) -> Result<ExecuteSpec, Vec<FieldViolation>> {
    let Some(spec) = spec else {
        return Err(vec![FieldViolation::new(field, "unset", "is required")]);
    };
    let mut violations = Vec::new();
    if spec.agent_type.is_empty() || spec.agent_type.len() > 64 {
        violations.push(FieldViolation::new(
            format!("{field}.agent_type"),
            format!("{:?}", spec.agent_type.chars().take(64).collect::<String>()),
            "must be 1 to 64 bytes",
        ));
    }
    check_id(
        &mut violations,
        &format!("{field}.project_id"),
        &spec.project_id,
        true,
        128,
    );
    check_id(
        &mut violations,
        &format!("{field}.workflow_id"),
        &spec.workflow_id,
        false,
        128,
    );
    check_id(
        &mut violations,
        &format!("{field}.correlation_id"),
        &spec.correlation_id,
        false,
        128,
    );
    if let Some(template) = &spec.template_override
        && template.len() > 64 * 1024
    {
        violations.push(FieldViolation::new(
            format!("{field}.template_override"),
            format!("{} bytes", template.len()),
            "must be at most 65536 bytes",
        ));
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    let parameters = spec.parameters.unwrap_or_default();
    Ok(ExecuteSpec {
        agent_type: spec.agent_type,
        variables: spec.variables.into_iter().collect::<BTreeMap<_, _>>(),
        template_override: spec.template_override,
        overrides: Overrides {
            model: parameters.model,
            temperature: parameters.temperature,
            max_tokens: parameters.max_tokens,
            timeout_seconds: parameters.timeout_seconds,
        },
        project_id: spec.project_id,
        workflow_id: spec.workflow_id,
        correlation_id: spec.correlation_id,
        record: spec.record,
    })
}

fn duration(value: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: value.as_secs() as i64,
        nanos: value.subsec_nanos() as i32,
    }
}

fn timestamp(value: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: value.timestamp(),
        nanos: value.timestamp_subsec_nanos() as i32,
    }
}

fn from_timestamp(value: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(value.seconds, value.nanos.max(0) as u32)
}

fn usage(usage: Usage) -> common::TokenUsage {
    common::TokenUsage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        total_tokens: usage.prompt_tokens + usage.completion_tokens,
    }
}

fn finish(finish: Finish) -> i32 {
    match finish {
        Finish::Unknown => common::FinishReason::Unspecified as i32,
        Finish::Stop => common::FinishReason::Stop as i32,
        Finish::Length => common::FinishReason::Length as i32,
        Finish::ContentFilter => common::FinishReason::ContentFilter as i32,
    }
}

fn response_of(node_id: &str, result: ExecutionResult) -> pb::ExecuteResponse {
    pb::ExecuteResponse {
        execution_id: result.execution_id,
        node_id: node_id.to_owned(),
        agent_type: result.agent_type,
        output: result.output,
        usage: Some(usage(result.usage)),
        provider: Some(common::ProviderInfo {
            provider: result.provider,
            model: result.model,
            offline: result.offline,
        }),
        latency: Some(duration(result.latency)),
        finish_reason: finish(result.finish),
        recorded: result.recorded,
        timings: Some(result.timings.to_proto()),
    }
}

/// A status as a batch item's error.
pub fn error_status(status: &Status) -> common::ErrorStatus {
    let details = status.get_error_details();
    common::ErrorStatus {
        code: status.code() as i32,
        message: status.message().to_owned(),
        field_violations: details
            .bad_request()
            .map(|bad_request| {
                bad_request
                    .field_violations
                    .iter()
                    .map(|violation| common::FieldViolation {
                        field: violation.field.clone(),
                        description: violation.description.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        retry_delay: details
            .retry_info()
            .and_then(|info| info.retry_delay)
            .map(duration),
    }
}

fn execution_of(node_id: &str, record: ExecutionRecord, with_content: bool) -> pb::Execution {
    let rendered_prompt = record.messages.as_ref().map(|messages| {
        messages
            .iter()
            .map(|message| format!("[{}]\n{}", message.role, message.content))
            .collect::<Vec<_>>()
            .join("\n\n")
    });
    let _ = node_id;
    pb::Execution {
        execution_id: record.execution_id,
        node_id: record.node_id,
        agent_type: record.agent_type,
        metadata: Some(common::Metadata {
            correlation_id: record.correlation_id,
            workflow_id: record.workflow_id,
            project_id: record.project_id,
            trace_id: record.trace_id,
        }),
        variables: record.variables.into_iter().collect(),
        template_override: record.template_override,
        parameters: Some(common::ModelParameters {
            model: Some(record.model),
            temperature: Some(record.temperature),
            max_tokens: Some(record.max_tokens),
            timeout_seconds: Some(record.timeout_seconds),
        }),
        rendered_prompt: if with_content { rendered_prompt } else { None },
        output: if with_content { record.output } else { None },
        usage: Some(usage(Usage {
            prompt_tokens: record.prompt_tokens,
            completion_tokens: record.completion_tokens,
        })),
        provider: Some(common::ProviderInfo {
            provider: record.provider,
            model: record.provider_model,
            offline: record.offline,
        }),
        status: match record.status {
            ExecutionStatus::Succeeded => pb::ExecutionStatus::Succeeded as i32,
            ExecutionStatus::Failed => pb::ExecutionStatus::Failed as i32,
            ExecutionStatus::Cancelled => pb::ExecutionStatus::Cancelled as i32,
        },
        error: (record.error_code != 0).then(|| common::ErrorStatus {
            code: record.error_code,
            message: record.error_message,
            field_violations: Vec::new(),
            retry_delay: None,
        }),
        finish_reason: record.finish_reason,
        started_at: Some(timestamp(record.started_at)),
        latency: Some(duration(record.latency)),
        recorded: record.recorded,
        streamed: record.streamed,
        replay_of: record.replay_of,
        timings: Some(record.timings.to_proto()),
    }
}

fn artifact_of(row: &artifact::Model) -> pb::Artifact {
    let at = |micros: i64| {
        DateTime::from_timestamp_micros(micros)
            .map(timestamp)
            .unwrap_or_default()
    };
    pb::Artifact {
        project_id: row.project_id.clone(),
        name: row.name.clone(),
        content_type: row.content_type.clone(),
        workflow_id: row.workflow_id.clone(),
        size_bytes: row.size_bytes.max(0) as u64,
        sha256: hex::decode(&row.sha256).unwrap_or_default(),
        version: row.version.max(0) as u64,
        created_at: Some(at(row.created_at_micros)),
        updated_at: Some(at(row.updated_at_micros)),
        kind: row.kind,
        source_agent: row.source_agent.clone(),
        execution_id: row.execution_id.clone(),
    }
}

fn check_artifact_name(violations: &mut Vec<FieldViolation>, field: &str, name: &str) {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
    let valid = !name.is_empty()
        && name.len() <= 256
        && valid_chars
        && !name.starts_with('/')
        && !name
            .split('/')
            .any(|segment| segment == ".." || segment.is_empty());
    if !valid {
        violations.push(FieldViolation::new(
            field,
            format!("{:?}", name.chars().take(64).collect::<String>()),
            "must be 1 to 256 bytes of [A-Za-z0-9._/-], not starting with '/', without empty or '..' segments",
        ));
    }
}

fn invalid(violations: Vec<FieldViolation>) -> Status {
    AgentError::Invalid(violations).into()
}

fn page_size(value: i32, default: u64, max: u64, field: &str) -> Result<u64, Status> {
    match value {
        0 => Ok(default),
        size if size > 0 && (size as u64) <= max => Ok(size as u64),
        size => Err(invalid(vec![FieldViolation::new(
            field,
            size.to_string(),
            format!("must be between 0 and {max}"),
        )])),
    }
}

type ExecuteStreamBody =
    Pin<Box<dyn Stream<Item = Result<pb::ExecuteStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentGrpc {
    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        let deadline = deadline_of(&request);
        let spec = spec_from_wire(request.into_inner().spec, "spec").map_err(invalid)?;
        let result = self
            .core
            .execute(spec, CallContext::new(deadline, trace_id(), "spec"), None)
            .await?;
        Ok(Response::new(response_of(self.core.node_id(), result)))
    }

    type ExecuteStreamStream = ExecuteStreamBody;

    async fn execute_stream(
        &self,
        request: Request<pb::ExecuteStreamRequest>,
    ) -> Result<Response<Self::ExecuteStreamStream>, Status> {
        let deadline = deadline_of(&request);
        let spec = spec_from_wire(request.into_inner().spec, "spec").map_err(invalid)?;
        let (deltas_sender, mut deltas) = mpsc::channel::<String>(64);
        let (sender, receiver) = mpsc::channel::<Result<pb::ExecuteStreamResponse, Status>>(64);
        let core = Arc::clone(&self.core);
        let node_id = core.node_id().to_owned();
        let mut context = CallContext::new(deadline, trace_id(), "spec");
        let stream_id = crate::service::new_execution_id();
        context.execution_id = Some(stream_id.clone());
        tokio::spawn(async move {
            let execution = core.execute(spec, context, Some(deltas_sender));
            tokio::pin!(execution);
            let outcome = loop {
                tokio::select! {
                    biased;
                    delta = deltas.recv() => {
                        let Some(delta) = delta else { continue };
                        let message = pb::ExecuteStreamResponse {
                            execution_id: stream_id.clone(),
                            node_id: node_id.clone(),
                            event: Some(pb::execute_stream_response::Event::TextDelta(delta)),
                        };
                        if sender.send(Ok(message)).await.is_err() {
                            // The client went away: dropping the execution
                            // stops the provider call.
                            return;
                        }
                    }
                    outcome = &mut execution => break outcome,
                    _ = sender.closed() => return,
                }
            };
            // Deltas sent before the execution finished.
            while let Ok(delta) = deltas.try_recv() {
                let message = pb::ExecuteStreamResponse {
                    execution_id: stream_id.clone(),
                    node_id: node_id.clone(),
                    event: Some(pb::execute_stream_response::Event::TextDelta(delta)),
                };
                if sender.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            let message = match outcome {
                Ok(result) => Ok(pb::ExecuteStreamResponse {
                    execution_id: result.execution_id.clone(),
                    node_id: node_id.clone(),
                    event: Some(pb::execute_stream_response::Event::Completion(
                        pb::StreamCompletion {
                            usage: Some(usage(result.usage)),
                            provider: Some(common::ProviderInfo {
                                provider: result.provider,
                                model: result.model,
                                offline: result.offline,
                            }),
                            latency: Some(duration(result.latency)),
                            finish_reason: finish(result.finish),
                            recorded: result.recorded,
                            timings: Some(result.timings.to_proto()),
                        },
                    )),
                }),
                Err(error) => Err(Status::from(error)),
            };
            let _ = sender.send(message).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn execute_batch(
        &self,
        request: Request<pb::ExecuteBatchRequest>,
    ) -> Result<Response<pb::ExecuteBatchResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        if request.tasks.is_empty() || request.tasks.len() > MAX_BATCH_TASKS {
            return Err(invalid(vec![FieldViolation::new(
                "tasks",
                format!("{} tasks", request.tasks.len()),
                format!("must have 1 to {MAX_BATCH_TASKS} tasks"),
            )]));
        }
        if request.max_concurrency == Some(0) {
            return Err(invalid(vec![FieldViolation::new(
                "max_concurrency",
                "0",
                "must be at least 1",
            )]));
        }
        let mut specs = Vec::with_capacity(request.tasks.len());
        let mut early: BTreeMap<usize, Status> = BTreeMap::new();
        for (index, task) in request.tasks.into_iter().enumerate() {
            match spec_from_wire(Some(task), &format!("tasks[{index}]")) {
                Ok(spec) => specs.push((index, spec)),
                Err(violations) => {
                    early.insert(index, invalid(violations));
                }
            }
        }
        let indices: Vec<usize> = specs.iter().map(|(index, _)| *index).collect();
        let outcomes = self
            .core
            .execute_batch(
                specs.into_iter().map(|(_, spec)| spec).collect(),
                request.max_concurrency,
                deadline,
                trace_id(),
            )
            .await;
        let node_id = self.core.node_id().to_owned();
        let mut results: Vec<pb::BatchResult> = indices
            .into_iter()
            .zip(outcomes)
            .map(|(index, outcome)| pb::BatchResult {
                index: index as u32,
                result: Some(match outcome {
                    Ok(result) => pb::batch_result::Result::Response(response_of(&node_id, result)),
                    Err(error) => {
                        pb::batch_result::Result::Error(error_status(&Status::from(error)))
                    }
                }),
            })
            .collect();
        results.extend(early.into_iter().map(|(index, status)| pb::BatchResult {
            index: index as u32,
            result: Some(pb::batch_result::Result::Error(error_status(&status))),
        }));
        results.sort_by_key(|result| result.index);
        Ok(Response::new(pb::ExecuteBatchResponse { node_id, results }))
    }

    async fn list_agents(
        &self,
        _request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self
            .core
            .catalogue()
            .iter()
            .map(|agent| {
                let live = self.core.effective(Some(&agent.agent_type), None);
                pb::AgentDefinition {
                    agent_type: agent.agent_type.clone(),
                    description: agent.description.clone(),
                    system_prompt: agent.system_prompt.clone(),
                    prompt_template: agent.prompt_template.clone(),
                    variables: agent
                        .variables
                        .iter()
                        .map(|variable| pb::TemplateVariable {
                            name: variable.name.clone(),
                            description: variable.description.clone(),
                            required: variable.required,
                            default_value: variable.default_value.clone(),
                            max_bytes: variable.max_bytes as u32,
                        })
                        .collect(),
                    defaults: Some(common::ModelParameters {
                        model: Some(live.agent.default_model),
                        temperature: Some(live.agent.temperature),
                        max_tokens: Some(live.agent.max_tokens),
                        timeout_seconds: Some(live.agent.timeout_seconds),
                    }),
                }
            })
            .collect();
        Ok(Response::new(pb::ListAgentsResponse {
            node_id: self.core.node_id().to_owned(),
            agents,
        }))
    }

    async fn get_execution(
        &self,
        request: Request<pb::GetExecutionRequest>,
    ) -> Result<Response<pb::GetExecutionResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Vec::new();
        check_id(
            &mut violations,
            "execution_id",
            &request.execution_id,
            true,
            128,
        );
        if !violations.is_empty() {
            return Err(invalid(violations));
        }
        let record = self.core.execution(&request.execution_id).await?;
        Ok(Response::new(pb::GetExecutionResponse {
            node_id: self.core.node_id().to_owned(),
            execution: Some(execution_of(self.core.node_id(), record, true)),
        }))
    }

    async fn list_executions(
        &self,
        request: Request<pb::ListExecutionsRequest>,
    ) -> Result<Response<pb::ListExecutionsResponse>, Status> {
        let request = request.into_inner();
        let limit = page_size(request.page_size, 50, 500, "page_size")?;
        let mut violations = Vec::new();
        for (field, value, max) in [
            ("project_id", &request.project_id, 128),
            ("workflow_id", &request.workflow_id, 128),
            ("correlation_id", &request.correlation_id, 128),
            ("agent_type", &request.agent_type, 64),
        ] {
            check_id(&mut violations, field, value, false, max);
        }
        let after = if request.page_token.is_empty() {
            None
        } else {
            match request.page_token.split_once('/') {
                Some((micros, id)) if micros.parse::<i64>().is_ok() && !id.is_empty() => {
                    Some((micros.parse::<i64>().unwrap_or_default(), id.to_owned()))
                }
                _ => {
                    violations.push(FieldViolation::new(
                        "page_token",
                        format!("{:?}", request.page_token),
                        "must be a next_page_token of an earlier response",
                    ));
                    None
                }
            }
        };
        if !violations.is_empty() {
            return Err(invalid(violations));
        }
        let non_empty = |text: String| (!text.is_empty()).then_some(text);
        let status = match pb::ExecutionStatus::try_from(request.status) {
            Ok(pb::ExecutionStatus::Succeeded) => Some(ExecutionStatus::Succeeded),
            Ok(pb::ExecutionStatus::Failed) => Some(ExecutionStatus::Failed),
            Ok(pb::ExecutionStatus::Cancelled) => Some(ExecutionStatus::Cancelled),
            _ => None,
        };
        self.core.recorder_flush().await;
        let filter = ExecutionFilter {
            project_id: non_empty(request.project_id),
            workflow_id: non_empty(request.workflow_id),
            agent_type: non_empty(request.agent_type),
            correlation_id: non_empty(request.correlation_id),
            status,
            start_micros: request
                .start_time
                .as_ref()
                .and_then(from_timestamp)
                .map(|at| at.timestamp_micros()),
            end_micros: request
                .end_time
                .as_ref()
                .and_then(from_timestamp)
                .map(|at| at.timestamp_micros()),
            after,
        };
        let mut records = self
            .core
            .store()
            .executions(&filter, limit + 1)
            .await
            .map_err(Status::from)?;
        let next_page_token = if records.len() as u64 > limit {
            records.truncate(limit as usize);
            records
                .last()
                .map(|last| {
                    format!(
                        "{}/{}",
                        last.started_at.timestamp_micros(),
                        last.execution_id
                    )
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        let node_id = self.core.node_id().to_owned();
        Ok(Response::new(pb::ListExecutionsResponse {
            executions: records
                .into_iter()
                .map(|record| execution_of(&node_id, record, false))
                .collect(),
            node_id,
            next_page_token,
        }))
    }

    async fn replay(
        &self,
        request: Request<pb::ReplayRequest>,
    ) -> Result<Response<pb::ReplayResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let mut violations = Vec::new();
        check_id(
            &mut violations,
            "execution_id",
            &request.execution_id,
            true,
            128,
        );
        let mode = pb::ReplayMode::try_from(request.mode).unwrap_or(pb::ReplayMode::Unspecified);
        if mode == pb::ReplayMode::Unspecified {
            violations.push(FieldViolation::new(
                "mode",
                request.mode.to_string(),
                "must be REPLAY_MODE_EXACT or REPLAY_MODE_LIVE",
            ));
        }
        if !violations.is_empty() {
            return Err(invalid(violations));
        }
        let result = self
            .core
            .replay(
                &request.execution_id,
                mode == pb::ReplayMode::Live,
                deadline,
                trace_id(),
            )
            .await?;
        Ok(Response::new(pb::ReplayResponse {
            node_id: self.core.node_id().to_owned(),
            mode: mode as i32,
            original_output: result.original_output,
            replay_output: result.replay_output,
            identical: result.identical,
            diff: result.diff,
            replay_execution_id: result.replay_execution_id,
            usage: Some(usage(result.usage)),
            provider: Some(common::ProviderInfo {
                provider: result.provider,
                model: result.model,
                offline: result.offline,
            }),
        }))
    }

    async fn put_artifact(
        &self,
        request: Request<pb::PutArtifactRequest>,
    ) -> Result<Response<pb::PutArtifactResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Vec::new();
        check_id(
            &mut violations,
            "project_id",
            &request.project_id,
            true,
            128,
        );
        check_artifact_name(&mut violations, "name", &request.name);
        check_id(
            &mut violations,
            "workflow_id",
            &request.workflow_id,
            false,
            128,
        );
        check_id(
            &mut violations,
            "execution_id",
            &request.execution_id,
            false,
            128,
        );
        let max_bytes = self.core.settings().max_artifact_bytes;
        if request.content.len() > max_bytes {
            violations.push(FieldViolation::new(
                "content",
                format!("{} bytes", request.content.len()),
                format!("must be at most {max_bytes} bytes (agent_service.max_artifact_bytes)"),
            ));
        }
        if request.content_type.len() > 128 {
            violations.push(FieldViolation::new(
                "content_type",
                format!("{} bytes", request.content_type.len()),
                "must be at most 128 bytes",
            ));
        }
        if !request.source_agent.is_empty() && !crate::catalogue::is_name(&request.source_agent) {
            violations.push(FieldViolation::new(
                "source_agent",
                format!(
                    "{:?}",
                    request.source_agent.chars().take(64).collect::<String>()
                ),
                "must be empty or 1 to 64 bytes of [a-z0-9_], starting with a letter",
            ));
        }
        match pb::ArtifactKind::try_from(request.kind) {
            Ok(pb::ArtifactKind::Unspecified) | Err(_) => violations.push(FieldViolation::new(
                "kind",
                request.kind.to_string(),
                "must be one of the ARTIFACT_KIND_* values other than UNSPECIFIED",
            )),
            Ok(_) => {}
        }
        if !violations.is_empty() {
            return Err(invalid(violations));
        }
        let row = self
            .core
            .store()
            .put_artifact(NewArtifact {
                project_id: request.project_id,
                name: request.name,
                kind: request.kind,
                content_type: request.content_type,
                workflow_id: request.workflow_id,
                source_agent: request.source_agent,
                execution_id: request.execution_id,
                content: request.content,
                expected_version: request.expected_version,
            })
            .await?;
        Ok(Response::new(pb::PutArtifactResponse {
            node_id: self.core.node_id().to_owned(),
            artifact: Some(artifact_of(&row)),
        }))
    }

    async fn get_artifact(
        &self,
        request: Request<pb::GetArtifactRequest>,
    ) -> Result<Response<pb::GetArtifactResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Vec::new();
        check_id(
            &mut violations,
            "project_id",
            &request.project_id,
            true,
            128,
        );
        check_artifact_name(&mut violations, "name", &request.name);
        if !violations.is_empty() {
            return Err(invalid(violations));
        }
        let row = self
            .core
            .store()
            .artifact(&request.project_id, &request.name)
            .await?
            .ok_or_else(|| AgentError::ArtifactNotFound {
                project_id: request.project_id.clone(),
                name: request.name.clone(),
            })?;
        Ok(Response::new(pb::GetArtifactResponse {
            node_id: self.core.node_id().to_owned(),
            artifact: Some(artifact_of(&row)),
            content: row.content,
        }))
    }

    async fn list_artifacts(
        &self,
        request: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let request = request.into_inner();
        let limit = page_size(request.page_size, 100, 1000, "page_size")?;
        let mut violations = Vec::new();
        check_id(
            &mut violations,
            "project_id",
            &request.project_id,
            true,
            128,
        );
        check_id(
            &mut violations,
            "workflow_id",
            &request.workflow_id,
            false,
            128,
        );
        if request.name_prefix.len() > 256 {
            violations.push(FieldViolation::new(
                "name_prefix",
                format!("{} bytes", request.name_prefix.len()),
                "must be at most 256 bytes",
            ));
        }
        if !request.page_token.is_empty() {
            check_artifact_name(&mut violations, "page_token", &request.page_token);
        }
        if !violations.is_empty() {
            return Err(invalid(violations));
        }
        let kind = match pb::ArtifactKind::try_from(request.kind) {
            Ok(pb::ArtifactKind::Unspecified) | Err(_) => None,
            Ok(kind) => Some(kind as i32),
        };
        let mut rows = self
            .core
            .store()
            .artifacts(
                &request.project_id,
                &request.name_prefix,
                &request.workflow_id,
                kind,
                (!request.page_token.is_empty()).then_some(request.page_token.as_str()),
                limit + 1,
            )
            .await?;
        let next_page_token = if rows.len() as u64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|row| row.name.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListArtifactsResponse {
            node_id: self.core.node_id().to_owned(),
            artifacts: rows.iter().map(artifact_of).collect(),
            next_page_token,
        }))
    }

    async fn cleanup_artifacts(
        &self,
        request: Request<pb::CleanupArtifactsRequest>,
    ) -> Result<Response<pb::CleanupArtifactsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Vec::new();
        check_id(
            &mut violations,
            "project_id",
            &request.project_id,
            false,
            128,
        );
        let max_age = match &request.max_age {
            None => None,
            Some(age) if age.seconds >= 60 && age.nanos >= 0 => {
                Some(Duration::new(age.seconds as u64, age.nanos as u32))
            }
            Some(age) => {
                violations.push(FieldViolation::new(
                    "max_age",
                    format!("{}s", age.seconds),
                    "must be at least 1 minute",
                ));
                None
            }
        };
        if !violations.is_empty() {
            return Err(invalid(violations));
        }
        let project = (!request.project_id.is_empty()).then_some(request.project_id.as_str());
        let (removed, removed_bytes, cutoff) = self
            .core
            .cleanup_artifacts(max_age, project, request.dry_run)
            .await?;
        Ok(Response::new(pb::CleanupArtifactsResponse {
            node_id: self.core.node_id().to_owned(),
            removed,
            removed_bytes,
            cutoff: Some(timestamp(cutoff)),
            dry_run: request.dry_run,
        }))
    }

    async fn get_load(
        &self,
        _request: Request<pb::GetLoadRequest>,
    ) -> Result<Response<pb::GetLoadResponse>, Status> {
        let load = self.core.load();
        Ok(Response::new(pb::GetLoadResponse {
            node_id: self.core.node_id().to_owned(),
            in_flight: load.occupancy.in_flight as u32,
            queued: load.occupancy.queued as u32,
            capacity: load.occupancy.capacity as u32,
            ewma_latency: Some(duration(load.ewma_latency)),
            draining: load.draining,
        }))
    }
}
