//! The agent service's logic (no tonic types): executions through the
//! node's bounded slots with the profiler's stage timings, batches under
//! the live `batch.max_concurrency`, record and replay, artifacts and the
//! node's load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentmesh_client::ConfigWatcher;
use agentmesh_resilience::FieldViolation;
use agentmesh_settings::live::{self, FieldKind};
use agentmesh_settings::{AgentServiceSettings, LiveSettings, SanitizePolicy};
use chrono::Utc;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::catalogue::Catalogue;
use crate::error::AgentError;
use crate::limiter::{AcquireError, Limiter, Occupancy};
use crate::profiler::{Timings, micros};
use crate::provider::{
    ChatMessage, Completion, Finish, Provider, ProviderError, ProviderRequest, Usage,
};
use crate::recorder::Recorder;
use crate::store::{ExecutionRecord, ExecutionStatus, Store, content_digest};
use crate::{sanitize, template};

/// Longest diff returned by a live replay.
pub const MAX_DIFF_BYTES: usize = 256 * 1024;

/// Per-call overrides of the effective model settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    /// Model.
    pub model: Option<String>,
    /// Temperature.
    pub temperature: Option<f64>,
    /// Max tokens.
    pub max_tokens: Option<i64>,
    /// Timeout in seconds.
    pub timeout_seconds: Option<i64>,
}

/// One execution request (wire input already checked for shape).
#[derive(Clone, Debug, Default)]
pub struct ExecuteSpec {
    /// Agent type.
    pub agent_type: String,
    /// Template variables.
    pub variables: BTreeMap<String, String>,
    /// Template replacing the catalogue's.
    pub template_override: Option<String>,
    /// Model overrides.
    pub overrides: Overrides,
    /// Project.
    pub project_id: String,
    /// Workflow or empty.
    pub workflow_id: String,
    /// Correlation id or empty.
    pub correlation_id: String,
    /// Store content; `None` uses the node default.
    pub record: Option<bool>,
}

/// How a call runs.
#[derive(Clone, Debug)]
pub struct CallContext {
    /// The caller's deadline.
    pub deadline: Option<Instant>,
    /// When the call started waiting (batch start for batch tasks).
    pub queued_since: Instant,
    /// W3C trace id or empty.
    pub trace_id: String,
    /// Field path prefix of the spec in errors (`spec`, `tasks[3]`).
    pub field: String,
    /// Variables come from a record and were already sanitised.
    pub presanitised: bool,
    /// Execution this one replays.
    pub replay_of: String,
    /// Id to give the execution (streams announce it up front).
    pub execution_id: Option<String>,
}

impl CallContext {
    /// A context for a call that starts now.
    pub fn new(deadline: Option<Instant>, trace_id: String, field: &str) -> Self {
        Self {
            deadline,
            queued_since: Instant::now(),
            trace_id,
            field: field.to_owned(),
            presanitised: false,
            replay_of: String::new(),
            execution_id: None,
        }
    }
}

/// The effective parameters of an execution.
#[derive(Clone, Debug, PartialEq)]
pub struct Parameters {
    /// Model.
    pub model: String,
    /// Temperature.
    pub temperature: f64,
    /// Max tokens.
    pub max_tokens: i64,
    /// Timeout in seconds.
    pub timeout_seconds: i64,
}

/// A finished execution.
#[derive(Clone, Debug)]
pub struct ExecutionResult {
    /// Record id.
    pub execution_id: String,
    /// Agent type.
    pub agent_type: String,
    /// Output.
    pub output: String,
    /// Tokens.
    pub usage: Usage,
    /// Provider name.
    pub provider: String,
    /// Model reported.
    pub model: String,
    /// Offline provider.
    pub offline: bool,
    /// Wall time on the node.
    pub latency: Duration,
    /// Why generation stopped.
    pub finish: Finish,
    /// Content stored.
    pub recorded: bool,
    /// Stage timings.
    pub timings: Timings,
}

/// A replay's outcome.
#[derive(Clone, Debug)]
pub struct ReplayResult {
    /// Original output.
    pub original_output: String,
    /// Replay output.
    pub replay_output: String,
    /// Byte-identical.
    pub identical: bool,
    /// Unified diff.
    pub diff: String,
    /// New execution id (live).
    pub replay_execution_id: String,
    /// Tokens of the replay.
    pub usage: Usage,
    /// Provider name.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Offline provider.
    pub offline: bool,
}

/// The node's load.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Executions slots.
    pub occupancy: Occupancy,
    /// EWMA of execution latency.
    pub ewma_latency: Duration,
    /// Shutting down.
    pub draining: bool,
}

/// A record queued if the call is dropped (client cancelled) before it
/// finishes.
struct CancelGuard<'a> {
    recorder: &'a Recorder,
    record: Option<ExecutionRecord>,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            metrics::counter!(
                "agentmesh_agent_executions_total",
                "agent_type" => record.agent_type.clone(),
                "outcome" => "cancelled"
            )
            .increment(1);
            self.recorder.try_record(record);
        }
    }
}

/// The agent service's state.
pub struct AgentCore {
    node_id: String,
    settings: AgentServiceSettings,
    catalogue: Catalogue,
    watcher: ConfigWatcher,
    provider: Arc<Provider>,
    slots: Arc<Limiter>,
    recorder: Recorder,
    store: Store,
    ewma_micros: AtomicU64,
    shutdown: CancellationToken,
    last_pool_size: Mutex<i64>,
}

impl std::fmt::Debug for AgentCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCore")
            .field("node_id", &self.node_id)
            .field("provider", &self.provider.name())
            .finish()
    }
}

/// Why a value is outside a live field's range, as the config service words it.
fn check_range(
    violations: &mut Vec<FieldViolation>,
    field: String,
    path: &str,
    value: f64,
    shown: String,
) {
    let Some(spec) = live::field(path) else {
        return;
    };
    let ok = match spec.kind {
        FieldKind::Float { min, max } => value.is_finite() && (min..=max).contains(&value),
        FieldKind::Int { min, max } => (min as f64..=max as f64).contains(&value),
        FieldKind::Text { .. } => true,
    };
    if !ok {
        violations.push(FieldViolation::new(field, shown, spec.kind.rule()));
    }
}

impl AgentCore {
    /// Builds the core; the caller starts the background tasks with
    /// [`AgentCore::spawn_background`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: String,
        settings: AgentServiceSettings,
        catalogue: Catalogue,
        watcher: ConfigWatcher,
        provider: Provider,
        recorder: Recorder,
        store: Store,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let pool_size = watcher.effective(None, None).llm.pool_size;
        Arc::new(Self {
            node_id,
            slots: Limiter::new(
                settings.max_concurrent_executions as usize,
                settings.max_queued_executions as usize,
            ),
            settings,
            catalogue,
            watcher,
            provider: Arc::new(provider),
            recorder,
            store,
            ewma_micros: AtomicU64::new(0),
            shutdown,
            last_pool_size: Mutex::new(pool_size),
        })
    }

    /// The node id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The catalogue.
    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The bootstrap settings.
    pub fn settings(&self) -> &AgentServiceSettings {
        &self.settings
    }

    /// Effective live settings for a scope.
    pub fn effective(&self, agent_type: Option<&str>, project_id: Option<&str>) -> LiveSettings {
        self.watcher.effective(agent_type, project_id)
    }

    /// The provider's name and whether it is offline.
    pub fn provider_info(&self) -> (&str, bool) {
        (self.provider.name(), self.provider.offline())
    }

    /// Applies a changed live `llm.pool_size` to the provider.
    pub fn apply_pool_size(&self) {
        let pool_size = self.watcher.effective(None, None).llm.pool_size;
        let mut last = self
            .last_pool_size
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *last != pool_size {
            *last = pool_size;
            self.provider.set_pool_size(pool_size.max(1) as usize);
        }
    }

    /// Starts the watcher follower (pool size) and the retention job.
    pub fn spawn_background(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        let core = Arc::clone(self);
        tasks.push(tokio::spawn(async move {
            let mut changes = core.watcher.subscribe();
            loop {
                tokio::select! {
                    _ = core.shutdown.cancelled() => return,
                    changed = changes.changed() => {
                        if changed.is_err() { return; }
                        core.apply_pool_size();
                    }
                }
            }
        }));
        let core = Arc::clone(self);
        tasks.push(tokio::spawn(async move {
            let interval = Duration::from_secs(core.settings.retention_interval_seconds);
            loop {
                tokio::select! {
                    _ = core.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                match core.cleanup_artifacts(None, None, false).await {
                    Ok((removed, bytes, _)) if removed > 0 => {
                        tracing::info!(removed, bytes, "retention removed expired artifacts");
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "artifact retention run failed"),
                }
            }
        }));
        tasks
    }

    /// The node's load.
    pub fn load(&self) -> Load {
        Load {
            occupancy: self.slots.occupancy(),
            ewma_latency: Duration::from_micros(self.ewma_micros.load(Ordering::Relaxed)),
            draining: self.shutdown.is_cancelled(),
        }
    }

    fn resolve_parameters(
        &self,
        live: &LiveSettings,
        overrides: &Overrides,
        field: &str,
    ) -> Result<Parameters, AgentError> {
        let mut violations = Vec::new();
        if let Some(model) = &overrides.model {
            if model.trim().is_empty() || model.len() > 256 {
                violations.push(FieldViolation::new(
                    format!("{field}.parameters.model"),
                    format!("{model:?}"),
                    "must be 1 to 256 bytes",
                ));
            } else if !self.provider.serves_model(model) {
                violations.push(FieldViolation::new(
                    format!("{field}.parameters.model"),
                    format!("{model:?}"),
                    format!(
                        "must be a model served by provider {:?}",
                        self.provider.name()
                    ),
                ));
            }
        }
        if let Some(value) = overrides.temperature {
            check_range(
                &mut violations,
                format!("{field}.parameters.temperature"),
                "agent.temperature",
                value,
                value.to_string(),
            );
        }
        if let Some(value) = overrides.max_tokens {
            check_range(
                &mut violations,
                format!("{field}.parameters.max_tokens"),
                "agent.max_tokens",
                value as f64,
                value.to_string(),
            );
        }
        if let Some(value) = overrides.timeout_seconds {
            check_range(
                &mut violations,
                format!("{field}.parameters.timeout_seconds"),
                "agent.timeout_seconds",
                value as f64,
                value.to_string(),
            );
        }
        if !violations.is_empty() {
            return Err(AgentError::Invalid(violations));
        }
        let parameters = Parameters {
            model: overrides
                .model
                .clone()
                .unwrap_or_else(|| live.agent.default_model.clone()),
            temperature: overrides.temperature.unwrap_or(live.agent.temperature),
            max_tokens: overrides.max_tokens.unwrap_or(live.agent.max_tokens),
            timeout_seconds: overrides
                .timeout_seconds
                .unwrap_or(live.agent.timeout_seconds),
        };
        if overrides.model.is_none() && !self.provider.serves_model(&parameters.model) {
            return Err(AgentError::FailedPrecondition(format!(
                "the configured model {:?} is not served by provider {:?} (agent_service.openai.models)",
                parameters.model,
                self.provider.name()
            )));
        }
        Ok(parameters)
    }

    fn render(
        &self,
        spec: &ExecuteSpec,
        context: &CallContext,
    ) -> Result<(BTreeMap<String, String>, Vec<ChatMessage>), AgentError> {
        render_messages(
            &self.catalogue,
            self.settings.sanitize_policy,
            spec,
            &context.field,
            context.presanitised,
        )
    }

    /// Runs one execution; streams deltas into `deltas` when given.
    pub async fn execute(
        &self,
        spec: ExecuteSpec,
        context: CallContext,
        deltas: Option<mpsc::Sender<String>>,
    ) -> Result<ExecutionResult, AgentError> {
        if self.shutdown.is_cancelled() {
            return Err(AgentError::ShuttingDown);
        }
        if self.catalogue.get(&spec.agent_type).is_none() {
            return Err(AgentError::UnknownAgent(spec.agent_type.clone()));
        }
        let started_at = Utc::now();
        let mut timings = Timings::default();

        // Stage: queue wait for a node slot.
        let now = Instant::now();
        let queue_limit = Duration::from_millis(self.settings.queue_timeout_ms);
        let queue_limit = match context.deadline {
            Some(deadline) => queue_limit.min(deadline.saturating_duration_since(now)),
            None => queue_limit,
        };
        self.publish_occupancy();
        let permit = self.slots.acquire(queue_limit).await;
        self.publish_occupancy();
        let _permit = match permit {
            Ok(permit) => permit,
            Err(AcquireError::Timeout { .. })
                if context
                    .deadline
                    .is_some_and(|deadline| Instant::now() >= deadline) =>
            {
                return Err(AgentError::DeadlineExceeded(
                    "no execution slot freed up before the deadline".to_owned(),
                ));
            }
            Err(error) => return Err(AgentError::Overloaded(error.to_string())),
        };
        let stage = Instant::now();
        timings.queue_wait_us = micros(stage - context.queued_since);

        // Stage: config lookup.
        let live = self
            .watcher
            .effective(Some(&spec.agent_type), Some(&spec.project_id));
        let parameters = self.resolve_parameters(&live, &spec.overrides, &context.field)?;
        let stage_render = Instant::now();
        timings.config_lookup_us = micros(stage_render - stage);

        // Stage: sanitise and render.
        let (values, messages) = self.render(&spec, &context)?;
        let stage_provider = Instant::now();
        timings.render_us = micros(stage_provider - stage_render);

        // Stage: provider.
        let timeout = Duration::from_secs(parameters.timeout_seconds.max(1) as u64);
        let mut deadline = stage_provider + timeout;
        let mut caller_deadline_binds = false;
        if let Some(caller) = context.deadline
            && caller < deadline
        {
            deadline = caller;
            caller_deadline_binds = true;
        }
        let record_content = spec.record.unwrap_or(self.settings.record_content);
        let execution_id = context
            .execution_id
            .clone()
            .unwrap_or_else(new_execution_id);
        let mut record = ExecutionRecord {
            execution_id: execution_id.clone(),
            node_id: self.node_id.clone(),
            agent_type: spec.agent_type.clone(),
            project_id: spec.project_id.clone(),
            workflow_id: spec.workflow_id.clone(),
            correlation_id: spec.correlation_id.clone(),
            trace_id: context.trace_id.clone(),
            variables: values,
            template_override: spec.template_override.clone(),
            model: parameters.model.clone(),
            temperature: parameters.temperature,
            max_tokens: parameters.max_tokens,
            timeout_seconds: parameters.timeout_seconds,
            messages: record_content.then(|| messages.clone()),
            output: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            provider: self.provider.name().to_owned(),
            provider_model: parameters.model.clone(),
            offline: self.provider.offline(),
            status: ExecutionStatus::Cancelled,
            error_code: tonic::Code::Cancelled as i32,
            error_message: "the caller cancelled the call".to_owned(),
            finish_reason: 4,
            started_at,
            latency: Duration::ZERO,
            timings,
            recorded: false,
            streamed: deltas.is_some(),
            replay_of: context.replay_of.clone(),
            content_sha256: None,
        };
        let mut guard = CancelGuard {
            recorder: &self.recorder,
            record: Some(record.clone()),
        };
        let request = ProviderRequest {
            model: parameters.model.clone(),
            temperature: parameters.temperature,
            max_tokens: parameters.max_tokens,
            messages: messages.clone(),
            deadline,
        };
        let span = provider_span(
            &spec,
            &parameters.model,
            self.provider.name(),
            &execution_id,
        );
        span.record("gen_ai.request.temperature", parameters.temperature);
        span.record("gen_ai.request.max_tokens", parameters.max_tokens);
        let outcome = self
            .provider
            .generate(&request, deltas.as_ref())
            .instrument(span.clone())
            .await;
        record_provider_outcome(&span, &outcome);
        guard.record = None;
        let latency_so_far = stage_provider.elapsed();
        let outcome = match outcome {
            Err(ProviderError::Timeout(elapsed)) if caller_deadline_binds => {
                Err(AgentError::DeadlineExceeded(format!(
                    "the caller's deadline passed after {elapsed:?}"
                )))
            }
            Err(error) => Err(AgentError::Provider(error)),
            Ok(completion) => Ok(completion),
        };
        match &outcome {
            Ok(completion) => {
                timings.provider_queue_wait_us = micros(completion.queue_wait);
                timings.provider_first_token_us = micros(completion.first_token);
                timings.provider_total_us = micros(completion.total);
                timings.provider_attempts = completion.attempts;
                record.status = ExecutionStatus::Succeeded;
                record.error_code = 0;
                record.error_message = String::new();
                record.finish_reason = finish_number(completion.finish);
                record.prompt_tokens = completion.usage.prompt_tokens;
                record.completion_tokens = completion.usage.completion_tokens;
                record.provider_model.clone_from(&completion.model);
                if record_content {
                    record.output = Some(completion.output.clone());
                    record.content_sha256 = Some(content_digest(&messages, &completion.output));
                    record.recorded = true;
                }
            }
            Err(error) => {
                timings.provider_total_us = micros(latency_so_far);
                let cancelled = matches!(
                    error,
                    AgentError::DeadlineExceeded(_)
                        | AgentError::Provider(ProviderError::Cancelled)
                );
                record.status = if cancelled {
                    ExecutionStatus::Cancelled
                } else {
                    ExecutionStatus::Failed
                };
                record.error_code = status_code_of(error) as i32;
                record.error_message = error.to_string();
                record.finish_reason = if cancelled { 4 } else { 0 };
            }
        }

        // Stage: record.
        let stage_record = Instant::now();
        record.latency = started_at_elapsed(&context, stage_record);
        record.timings = timings;
        let recorded = record.recorded;
        self.recorder.record(record).await;
        timings.record_us = micros(stage_record.elapsed());
        let latency = context.queued_since.elapsed();
        self.observe(&spec.agent_type, &parameters.model, &outcome, latency);
        self.publish_occupancy();
        let completion = outcome?;
        Ok(ExecutionResult {
            execution_id,
            agent_type: spec.agent_type,
            output: completion.output,
            usage: completion.usage,
            provider: self.provider.name().to_owned(),
            model: completion.model,
            offline: self.provider.offline(),
            latency,
            finish: completion.finish,
            recorded,
            timings,
        })
    }

    fn publish_occupancy(&self) {
        let occupancy = self.slots.occupancy();
        metrics::gauge!("agentmesh_agent_executions_in_flight").set(occupancy.in_flight as f64);
        metrics::gauge!("agentmesh_agent_executions_queued").set(occupancy.queued as f64);
        if let Some(provider) = self.provider.occupancy() {
            metrics::gauge!("agentmesh_agent_provider_in_flight", "provider" => self.provider.name().to_owned())
                .set(provider.in_flight as f64);
            metrics::gauge!("agentmesh_agent_provider_queued", "provider" => self.provider.name().to_owned())
                .set(provider.queued as f64);
        }
    }

    fn observe(
        &self,
        agent_type: &str,
        model: &str,
        outcome: &Result<crate::provider::Completion, AgentError>,
        latency: Duration,
    ) {
        let outcome_label = match outcome {
            Ok(_) => "success",
            Err(
                AgentError::DeadlineExceeded(_) | AgentError::Provider(ProviderError::Cancelled),
            ) => "cancelled",
            Err(_) => "error",
        };
        let provider = self.provider.name().to_owned();
        metrics::histogram!(
            "agentmesh_agent_execution_duration_seconds",
            "agent_type" => agent_type.to_owned(),
            "provider" => provider.clone(),
            "model" => model.to_owned(),
            "outcome" => outcome_label
        )
        .record(latency.as_secs_f64());
        metrics::counter!(
            "agentmesh_agent_executions_total",
            "agent_type" => agent_type.to_owned(),
            "outcome" => outcome_label
        )
        .increment(1);
        if let Ok(completion) = outcome {
            for (kind, count) in [
                ("prompt", completion.usage.prompt_tokens),
                ("completion", completion.usage.completion_tokens),
            ] {
                metrics::counter!(
                    "agentmesh_agent_tokens_total",
                    "agent_type" => agent_type.to_owned(),
                    "provider" => provider.clone(),
                    "model" => model.to_owned(),
                    "kind" => kind
                )
                .increment(count.max(0) as u64);
            }
            // EWMA with weight 0.2 for the newest sample.
            let sample = micros(latency);
            let previous = self.ewma_micros.load(Ordering::Relaxed);
            let next = if previous == 0 {
                sample
            } else {
                (previous * 4 + sample) / 5
            };
            self.ewma_micros.store(next, Ordering::Relaxed);
        }
    }

    /// Runs a batch: at most `max_concurrency` (capped by the live
    /// `batch.max_concurrency`) at once, results in request order.
    pub async fn execute_batch(
        self: &Arc<Self>,
        tasks: Vec<ExecuteSpec>,
        max_concurrency: Option<u32>,
        deadline: Option<Instant>,
        trace_id: String,
    ) -> Vec<Result<ExecutionResult, AgentError>> {
        let live_limit = self
            .watcher
            .effective(None, None)
            .batch
            .max_concurrency
            .max(1) as usize;
        let limit = max_concurrency.map_or(live_limit, |requested| {
            (requested.max(1) as usize).min(live_limit)
        });
        let started = Instant::now();
        let runs = tasks.into_iter().enumerate().map(|(index, spec)| {
            let core = Arc::clone(self);
            let trace_id = trace_id.clone();
            async move {
                let mut context = CallContext::new(deadline, trace_id, &format!("tasks[{index}]"));
                context.queued_since = started;
                core.execute(spec, context, None).await
            }
        });
        futures::stream::iter(runs).buffered(limit).collect().await
    }

    /// Waits until queued records are written.
    pub async fn recorder_flush(&self) {
        self.recorder.flush().await;
    }

    /// One execution record (after flushing queued records).
    pub async fn execution(&self, execution_id: &str) -> Result<ExecutionRecord, AgentError> {
        self.recorder.flush().await;
        self.store
            .execution(execution_id)
            .await?
            .ok_or_else(|| AgentError::ExecutionNotFound(execution_id.to_owned()))
    }

    /// Replays a recorded execution.
    pub async fn replay(
        &self,
        execution_id: &str,
        live_mode: bool,
        deadline: Option<Instant>,
        trace_id: String,
    ) -> Result<ReplayResult, AgentError> {
        let record = self.execution(execution_id).await?;
        let original = record.output.clone().unwrap_or_default();
        if !live_mode {
            let (Some(messages), Some(output), true) =
                (&record.messages, &record.output, record.recorded)
            else {
                return Err(AgentError::FailedPrecondition(format!(
                    "execution {execution_id:?} was recorded without content; exact replay needs record = true"
                )));
            };
            let digest = content_digest(messages, output);
            if record.content_sha256.as_deref() != Some(digest.as_str()) {
                return Err(AgentError::Corrupt(format!(
                    "execution {execution_id:?}: content does not match its SHA-256"
                )));
            }
            return Ok(ReplayResult {
                original_output: original.clone(),
                replay_output: original,
                identical: true,
                diff: String::new(),
                replay_execution_id: String::new(),
                usage: Usage::default(),
                provider: record.provider,
                model: record.provider_model,
                offline: record.offline,
            });
        }
        let spec = ExecuteSpec {
            agent_type: record.agent_type.clone(),
            variables: record.variables.clone(),
            template_override: record.template_override.clone(),
            overrides: Overrides {
                model: Some(record.model.clone()),
                temperature: Some(record.temperature),
                max_tokens: Some(record.max_tokens),
                timeout_seconds: Some(record.timeout_seconds),
            },
            project_id: record.project_id.clone(),
            workflow_id: record.workflow_id.clone(),
            correlation_id: record.correlation_id.clone(),
            record: Some(true),
        };
        let mut context = CallContext::new(deadline, trace_id, "replay");
        context.presanitised = true;
        context.replay_of = record.execution_id.clone();
        let result = self.execute(spec, context, None).await?;
        let identical = result.output == original;
        let diff = if identical {
            String::new()
        } else {
            unified_diff(&original, &result.output)
        };
        Ok(ReplayResult {
            original_output: original,
            replay_output: result.output,
            identical,
            diff,
            replay_execution_id: result.execution_id,
            usage: result.usage,
            provider: result.provider,
            model: result.model,
            offline: result.offline,
        })
    }

    /// Removes (or counts) artifacts older than `max_age` (default: the
    /// live `retention.artifact_max_age_hours`); returns (count, bytes,
    /// cutoff).
    pub async fn cleanup_artifacts(
        &self,
        max_age: Option<Duration>,
        project_id: Option<&str>,
        dry_run: bool,
    ) -> Result<(u64, u64, chrono::DateTime<Utc>), AgentError> {
        let max_age = max_age.unwrap_or_else(|| {
            let hours = self
                .watcher
                .effective(None, project_id)
                .retention
                .artifact_max_age_hours
                .max(1) as u64;
            Duration::from_secs(hours * 3600)
        });
        let cutoff =
            Utc::now() - chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        let (removed, bytes) = self
            .store
            .cleanup_artifacts(
                cutoff.timestamp_micros(),
                project_id,
                dry_run,
                self.settings.cleanup_batch_size,
            )
            .await?;
        if !dry_run {
            metrics::counter!("agentmesh_agent_artifacts_deleted_total").increment(removed);
        }
        Ok((removed, bytes, cutoff))
    }

    /// The sanitiser policy in force.
    pub fn sanitize_policy(&self) -> SanitizePolicy {
        self.settings.sanitize_policy
    }
}

/// Checks and renders a task into the chat messages sent to a provider:
/// sanitises its variables under `policy`, fills declared defaults, and
/// renders the catalogue template (or the override). `field` prefixes
/// violation paths; `presanitised` skips the variable checks (replays).
/// The gateway's fallback agent renders through this too.
pub fn render_messages(
    catalogue: &Catalogue,
    policy: SanitizePolicy,
    spec: &ExecuteSpec,
    field: &str,
    presanitised: bool,
) -> Result<(BTreeMap<String, String>, Vec<ChatMessage>), AgentError> {
    let agent = catalogue
        .get(&spec.agent_type)
        .ok_or_else(|| AgentError::UnknownAgent(spec.agent_type.clone()))?;
    let variables_field = format!("{field}.variables");
    let mut values = if presanitised {
        spec.variables.clone()
    } else {
        sanitize::check(
            &spec.variables,
            &agent.limits(),
            policy,
            &variables_field,
            &spec.agent_type,
        )
        .map_err(AgentError::Invalid)?
    };
    let mut missing = Vec::new();
    for variable in &agent.variables {
        if values.contains_key(&variable.name) {
            continue;
        }
        match &variable.default_value {
            Some(default) => {
                values.insert(variable.name.clone(), default.clone());
            }
            None if variable.required => missing.push(FieldViolation::new(
                format!("{variables_field}.{}", variable.name),
                "missing",
                "is required",
            )),
            None => {}
        }
    }
    if !missing.is_empty() {
        return Err(AgentError::Invalid(missing));
    }
    let rendered = match &spec.template_override {
        Some(source) => template::render(
            source,
            &values,
            &format!("{field}.template_override"),
            &variables_field,
        ),
        None => template::render_catalogue(
            &agent.prompt_template,
            &values,
            &format!("agent {:?} template", agent.agent_type),
            &variables_field,
        ),
    }
    .map_err(AgentError::Invalid)?;
    let mut messages = Vec::with_capacity(2);
    if !agent.system_prompt.is_empty() {
        messages.push(ChatMessage {
            role: "system".to_owned(),
            content: agent.system_prompt.clone(),
        });
    }
    messages.push(ChatMessage {
        role: "user".to_owned(),
        content: rendered,
    });
    Ok((values, messages))
}

/// A fresh execution id.
pub fn new_execution_id() -> String {
    format!("exe_{}", uuid::Uuid::new_v4().simple())
}

fn started_at_elapsed(context: &CallContext, now: Instant) -> Duration {
    now - context.queued_since
}

fn finish_number(finish: Finish) -> i32 {
    match finish {
        Finish::Unknown => 0,
        Finish::Stop => 1,
        Finish::Length => 2,
        Finish::ContentFilter => 3,
    }
}

/// The gRPC code an error maps to.
pub fn status_code_of(error: &AgentError) -> tonic::Code {
    match error {
        AgentError::Invalid(_) => tonic::Code::InvalidArgument,
        AgentError::UnknownAgent(_)
        | AgentError::ExecutionNotFound(_)
        | AgentError::ArtifactNotFound { .. } => tonic::Code::NotFound,
        AgentError::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
        AgentError::Overloaded(_) => tonic::Code::ResourceExhausted,
        AgentError::Provider(provider) => match provider {
            ProviderError::Busy(_) | ProviderError::RateLimited { .. } => {
                tonic::Code::ResourceExhausted
            }
            ProviderError::Unavailable { .. } => tonic::Code::Unavailable,
            ProviderError::Rejected { .. } => tonic::Code::FailedPrecondition,
            ProviderError::Timeout(_) => tonic::Code::DeadlineExceeded,
            ProviderError::Cancelled => tonic::Code::Cancelled,
        },
        AgentError::DeadlineExceeded(_) => tonic::Code::DeadlineExceeded,
        AgentError::ShuttingDown | AgentError::Database(_) => tonic::Code::Unavailable,
        AgentError::Corrupt(_) => tonic::Code::DataLoss,
    }
}

/// A unified diff of two outputs, cut at [`MAX_DIFF_BYTES`].
pub fn unified_diff(original: &str, replay: &str) -> String {
    let diff = similar::TextDiff::from_lines(original, replay)
        .unified_diff()
        .header("a", "b")
        .to_string();
    if diff.len() <= MAX_DIFF_BYTES {
        return diff;
    }
    let mut cut = MAX_DIFF_BYTES - 32;
    while !diff.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}\n... diff truncated\n", &diff[..cut])
}

/// The span of one provider call, named and attributed after the
/// OpenTelemetry GenAI semantic conventions (`chat {model}`, kind client),
/// with the project, workflow and correlation ids as `agentmesh.*`.
fn provider_span(
    spec: &ExecuteSpec,
    model: &str,
    provider: &str,
    execution_id: &str,
) -> tracing::Span {
    tracing::info_span!(
        "gen_ai_chat",
        otel.name = %format!("chat {model}"),
        otel.kind = "client",
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = %provider,
        gen_ai.request.model = %model,
        gen_ai.request.temperature = tracing::field::Empty,
        gen_ai.request.max_tokens = tracing::field::Empty,
        gen_ai.agent.name = %spec.agent_type,
        agentmesh.project_id = %spec.project_id,
        agentmesh.workflow_id = %spec.workflow_id,
        agentmesh.correlation_id = %spec.correlation_id,
        agentmesh.execution_id = %execution_id,
        gen_ai.response.model = tracing::field::Empty,
        gen_ai.response.finish_reasons = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

fn record_provider_outcome(span: &tracing::Span, outcome: &Result<Completion, ProviderError>) {
    match outcome {
        Ok(completion) => {
            span.record("gen_ai.response.model", completion.model.as_str());
            let finish = match completion.finish {
                Finish::Stop => "stop",
                Finish::Length => "length",
                Finish::ContentFilter => "content_filter",
                Finish::Unknown => "unknown",
            };
            span.record("gen_ai.response.finish_reasons", finish);
            span.record("gen_ai.usage.input_tokens", completion.usage.prompt_tokens);
            span.record(
                "gen_ai.usage.output_tokens",
                completion.usage.completion_tokens,
            );
        }
        Err(error) => {
            span.record("error.type", error.kind());
            span.record("otel.status_code", "ERROR");
        }
    }
}
