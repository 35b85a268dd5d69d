//! Durable multi-agent workflows: runs of a DAG of agent steps (inline, or
//! a named definition: the built-in SDLC flow or a YAML file), each step
//! executed through [`Gateway::execute`] (so routing, breakers, fallback
//! and whatever wraps a task apply) with the run's workflow id,
//! correlation id and one trace; approval gates, rejections with
//! amendments, cancellation, per-project emergency stops, and runs that
//! survive a gateway restart.
//!
//! - [`definition`]: steps, validation, the SDLC flow, YAML files;
//! - [`engine`]: the driver of one run (scheduling, step execution);
//! - [`store`]: runs, steps, artifacts, events and stops in the database;
//! - [`audit`]: audit events of decisions, best-effort.
//!
//! One gateway drives a run at a time: it holds a lease on it in the
//! database, renews it every `gateway.workflows.poll_interval_ms`, gives it
//! up on a graceful stop, and any gateway sharing the database takes over
//! a run whose lease lapsed (or that it owned before a restart), re-running
//! the steps that were running and none that had finished.

pub mod audit;
pub mod definition;
pub mod engine;
pub mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use agentmesh_proto::gateway as pb;
use agentmesh_resilience::FieldViolation;
use agentmesh_settings::WorkflowSettings;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::WorkflowError;
use crate::service::Gateway;
use audit::{AuditRecord, AuditSink};
use definition::{Definitions, Limits, StepSpec};
use store::{Change, NewEvent, RunRecord, Store, project_stop, run, step};

/// Longest reason, comment or cancel message.
const MAX_NOTE_BYTES: usize = 4 * 1024;
/// Most input variables of a run.
const MAX_INPUTS: usize = 64;
/// Events read per round by a watcher.
const WATCH_PAGE: u64 = 256;
/// Messages buffered towards one watcher.
const WATCH_BUFFER: usize = 64;

/// What a local driver of a run listens to.
#[derive(Clone)]
pub(crate) struct Control {
    /// Cancelled to stop the run's executions at once (CancelWorkflowRun).
    pub cancel: CancellationToken,
    /// Notified when a decision changed the run in the database.
    pub wake: Arc<Notify>,
}

/// A run driven by this gateway.
struct Active {
    project_id: String,
    control: Control,
    done: watch::Receiver<bool>,
}

/// The workflow service of one gateway.
pub struct Workflows {
    gateway: Arc<Gateway>,
    store: Store,
    definitions: Definitions,
    settings: WorkflowSettings,
    owner: String,
    audit: AuditSink,
    active: Mutex<HashMap<String, Active>>,
    stops: RwLock<HashMap<String, project_stop::Model>>,
    changes: broadcast::Sender<String>,
    shutdown: CancellationToken,
}

/// Wire name of a `WorkflowState`.
fn run_state_name(state: i32) -> &'static str {
    match pb::WorkflowState::try_from(state) {
        Ok(pb::WorkflowState::Pending) => "PENDING",
        Ok(pb::WorkflowState::Running) => "RUNNING",
        Ok(pb::WorkflowState::Succeeded) => "SUCCEEDED",
        Ok(pb::WorkflowState::Failed) => "FAILED",
        Ok(pb::WorkflowState::Cancelled) => "CANCELLED",
        Ok(pb::WorkflowState::AwaitingApproval) => "AWAITING_APPROVAL",
        _ => "UNSPECIFIED",
    }
}

/// Wire name of a `StepState`.
fn step_state_name(state: i32) -> &'static str {
    match pb::StepState::try_from(state) {
        Ok(pb::StepState::Pending) => "PENDING",
        Ok(pb::StepState::Running) => "RUNNING",
        Ok(pb::StepState::Succeeded) => "SUCCEEDED",
        Ok(pb::StepState::Failed) => "FAILED",
        Ok(pb::StepState::Skipped) => "SKIPPED",
        Ok(pb::StepState::Cancelled) => "CANCELLED",
        Ok(pb::StepState::AwaitingApproval) => "AWAITING_APPROVAL",
        _ => "UNSPECIFIED",
    }
}

fn is_final(state: i32) -> bool {
    !store::UNFINISHED_RUN_STATES.contains(&state)
}

fn micros_timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

fn rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Checks an identifier field: `max` bytes at most, `[A-Za-z0-9._:-]`;
/// required ones must be non-empty.
fn check_id(violations: &mut Vec<FieldViolation>, field: &str, value: &str, required: bool) {
    if required && value.is_empty() {
        violations.push(FieldViolation::new(field, "\"\"", "is required"));
        return;
    }
    let fine = value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if !fine {
        violations.push(FieldViolation::new(
            field,
            format!("{value:?}"),
            "must be at most 128 bytes of [A-Za-z0-9._:-]",
        ));
    }
}

fn check_note(violations: &mut Vec<FieldViolation>, field: &str, value: &str, max: usize) {
    if value.len() > max {
        violations.push(FieldViolation::new(
            field,
            format!("{} bytes", value.len()),
            format!("must be at most {max} bytes"),
        ));
    }
}

fn invalid(violations: Vec<FieldViolation>) -> Result<(), WorkflowError> {
    if violations.is_empty() {
        Ok(())
    } else {
        Err(WorkflowError::Invalid(violations))
    }
}

/// The wire form of a stored run.
pub fn run_to_wire(record: &RunRecord) -> pb::WorkflowRun {
    let run = &record.run;
    let mut total = agentmesh_proto::common::TokenUsage::default();
    let steps = record
        .steps
        .iter()
        .map(|step| {
            total.prompt_tokens += step.prompt_tokens;
            total.completion_tokens += step.completion_tokens;
            let accepted = step.state == pb::StepState::Succeeded as i32
                || step.state == pb::StepState::AwaitingApproval as i32;
            let executed = step.runs > 0 && !step.provider.is_empty();
            pb::StepResult {
                name: step.name.clone(),
                agent_type: step.agent_type.clone(),
                state: step.state,
                output: if accepted {
                    step.output.clone().unwrap_or_default()
                } else {
                    String::new()
                },
                artifact_name: record
                    .artifacts
                    .iter()
                    .find(|artifact| {
                        artifact.step == step.name
                            && artifact.kind == pb::WorkflowArtifactKind::StepOutput as i32
                    })
                    .filter(|_| step.state == pb::StepState::Succeeded as i32)
                    .map(|artifact| artifact.name.clone())
                    .unwrap_or_default(),
                execution_id: step.execution_id.clone(),
                node_id: step.node_id.clone(),
                usage: executed.then(|| agentmesh_proto::common::TokenUsage {
                    prompt_tokens: step.prompt_tokens,
                    completion_tokens: step.completion_tokens,
                    total_tokens: step.prompt_tokens + step.completion_tokens,
                }),
                provider: executed.then(|| agentmesh_proto::common::ProviderInfo {
                    provider: step.provider.clone(),
                    model: step.model.clone(),
                    offline: step.offline,
                }),
                degraded: step.degraded,
                degraded_reason: step.degraded_reason.clone(),
                cache_hit: step.cache_hit,
                attempts: u32::try_from(step.agent_calls).unwrap_or(0),
                error: (step.error_code != 0).then(|| agentmesh_proto::common::ErrorStatus {
                    code: step.error_code,
                    message: step.error_message.clone(),
                    ..Default::default()
                }),
                started_at: step.started_at_micros.map(micros_timestamp),
                completed_at: step.completed_at_micros.map(micros_timestamp),
                awaiting: step.gate,
                revisions: u32::try_from(step.revisions).unwrap_or(0),
                runs: u32::try_from(step.runs).unwrap_or(0),
            }
        })
        .collect();
    total.total_tokens = total.prompt_tokens + total.completion_tokens;
    pb::WorkflowRun {
        run_id: run.run_id.clone(),
        workflow_id: run.workflow_id.clone(),
        project_id: run.project_id.clone(),
        state: run.state,
        steps,
        correlation_id: run.correlation_id.clone(),
        trace_id: run.trace_id.clone(),
        total_usage: Some(total),
        created_at: Some(micros_timestamp(run.created_at_micros)),
        completed_at: run.completed_at_micros.map(micros_timestamp),
        definition: run.definition.clone(),
        inputs: serde_json::from_str(&run.inputs).unwrap_or_default(),
        artifacts: record
            .artifacts
            .iter()
            .map(|artifact| pb::WorkflowArtifact {
                name: artifact.name.clone(),
                kind: artifact.kind,
                step: artifact.step.clone(),
                content: artifact.content.clone(),
                version: u32::try_from(artifact.version).unwrap_or(u32::MAX),
                updated_at: Some(micros_timestamp(artifact.updated_at_micros)),
            })
            .collect(),
        error: run.error.clone(),
        started_by: run.started_by.clone(),
    }
}

fn event_to_wire(event: store::event::Model) -> pb::WorkflowEvent {
    pb::WorkflowEvent {
        sequence: u64::try_from(event.sequence).unwrap_or(0),
        run_id: event.run_id,
        kind: event.kind,
        step: event.step,
        step_state: event.step_state,
        run_state: event.run_state,
        message: event.message,
        actor: event.actor,
        occurred_at: Some(micros_timestamp(event.occurred_at_micros)),
    }
}

/// What a run request resolved to.
struct Plan {
    definition: String,
    steps: Vec<StepSpec>,
    inputs: BTreeMap<String, String>,
}

impl Workflows {
    /// The workflow service of `gateway`, over `store`, driving runs as
    /// `owner` (the gateway id) until `shutdown`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gateway: Arc<Gateway>,
        store: Store,
        definitions: Definitions,
        settings: WorkflowSettings,
        owner: String,
        audit: AuditSink,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (changes, _) = broadcast::channel(1024);
        Arc::new(Self {
            gateway,
            store,
            definitions,
            settings,
            owner,
            audit,
            active: Mutex::new(HashMap::new()),
            stops: RwLock::new(HashMap::new()),
            changes,
            shutdown,
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            max_steps: self.settings.max_steps,
        }
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.settings.poll_interval_ms)
    }

    fn lease_until(&self) -> i64 {
        store::now_micros()
            + i64::try_from(self.settings.lease_seconds.saturating_mul(1_000_000))
                .unwrap_or(i64::MAX / 2)
    }

    fn active_count(&self) -> usize {
        self.active.lock().map(|active| active.len()).unwrap_or(0)
    }

    fn local_control(&self, run_id: &str) -> Option<(Control, watch::Receiver<bool>)> {
        let active = self.active.lock().ok()?;
        active
            .get(run_id)
            .map(|active| (active.control.clone(), active.done.clone()))
    }

    fn notify_change(&self, run_id: &str) {
        let _ = self.changes.send(run_id.to_owned());
        if let Some((control, _)) = self.local_control(run_id) {
            control.wake.notify_one();
        }
    }

    /// Refuses work for a project under an emergency stop.
    pub fn check_project(&self, project_id: &str) -> Result<(), WorkflowError> {
        let Ok(stops) = self.stops.read() else {
            return Ok(());
        };
        match stops.get(project_id) {
            None => Ok(()),
            Some(stop) => Err(WorkflowError::ProjectStopped {
                project_id: stop.project_id.clone(),
                reason: stop.reason.clone(),
                stopped_by: stop.stopped_by.clone(),
                stopped_at: rfc3339(stop.stopped_at_micros),
            }),
        }
    }

    pub(crate) fn is_stopped(&self, project_id: &str) -> bool {
        self.check_project(project_id).is_err()
    }

    async fn refresh_stops(&self) -> Result<(), WorkflowError> {
        let stops = self.store.project_stops().await?;
        let lifted: Vec<String>;
        {
            let Ok(mut current) = self.stops.write() else {
                return Ok(());
            };
            let fresh: HashMap<String, project_stop::Model> = stops
                .into_iter()
                .map(|stop| (stop.project_id.clone(), stop))
                .collect();
            lifted = current
                .keys()
                .filter(|project| !fresh.contains_key(*project))
                .cloned()
                .collect();
            *current = fresh;
        }
        for project in lifted {
            self.wake_project(&project);
        }
        Ok(())
    }

    fn wake_project(&self, project_id: &str) {
        if let Ok(active) = self.active.lock() {
            for entry in active.values().filter(|a| a.project_id == project_id) {
                entry.control.wake.notify_one();
            }
        }
    }

    /// Loads the stops, resumes the runs this gateway may drive, and keeps
    /// doing so (and renewing its leases) every poll interval until
    /// shutdown.
    pub async fn start(self: &Arc<Self>) -> Result<(), WorkflowError> {
        self.refresh_stops().await?;
        self.take_over().await?;
        let workflows = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(workflows.poll_interval());
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = workflows.shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                if let Err(error) = workflows.housekeeping().await {
                    tracing::warn!(%error, "workflow housekeeping failed");
                }
            }
        });
        Ok(())
    }

    async fn housekeeping(self: &Arc<Self>) -> Result<(), WorkflowError> {
        self.refresh_stops().await?;
        let mine: Vec<String> = self
            .active
            .lock()
            .map(|active| active.keys().cloned().collect())
            .unwrap_or_default();
        self.store
            .renew(&self.owner, &mine, self.lease_until())
            .await?;
        self.take_over().await
    }

    /// Claims and drives unfinished runs that are this gateway's (from
    /// before a restart) or whose lease lapsed.
    async fn take_over(self: &Arc<Self>) -> Result<(), WorkflowError> {
        let room = self
            .settings
            .max_concurrent_runs
            .saturating_sub(self.active_count());
        if room == 0 || self.shutdown.is_cancelled() {
            return Ok(());
        }
        let candidates = self
            .store
            .claimable(&self.owner, u64::try_from(room * 2).unwrap_or(u64::MAX))
            .await?;
        for run_id in candidates {
            if self.active_count() >= self.settings.max_concurrent_runs {
                break;
            }
            let Some((control, done)) = self.register(&run_id, String::new()) else {
                continue;
            };
            match self
                .store
                .claim(&run_id, &self.owner, self.lease_until())
                .await
            {
                Ok(true) => {
                    tracing::info!(run_id, owner = self.owner, "resuming workflow run");
                    self.spawn_driver(run_id, control, done, None, true);
                }
                Ok(false) => self.unregister(&run_id),
                Err(error) => {
                    self.unregister(&run_id);
                    return Err(error.into());
                }
            }
        }
        Ok(())
    }

    /// Reserves a local driver slot for `run_id`; `None` when one exists.
    fn register(&self, run_id: &str, project_id: String) -> Option<(Control, watch::Sender<bool>)> {
        let mut active = self.active.lock().ok()?;
        if active.contains_key(run_id) {
            return None;
        }
        let control = Control {
            cancel: CancellationToken::new(),
            wake: Arc::new(Notify::new()),
        };
        let (done_sender, done) = watch::channel(false);
        active.insert(
            run_id.to_owned(),
            Active {
                project_id,
                control: control.clone(),
                done,
            },
        );
        Some((control, done_sender))
    }

    fn unregister(&self, run_id: &str) {
        if let Ok(mut active) = self.active.lock() {
            active.remove(run_id);
        }
        metrics::gauge!("agentmesh_gateway_workflow_runs_active").set(self.active_count() as f64);
    }

    fn spawn_driver(
        self: &Arc<Self>,
        run_id: String,
        control: Control,
        done: watch::Sender<bool>,
        span: Option<tracing::Span>,
        resumed: bool,
    ) {
        metrics::gauge!("agentmesh_gateway_workflow_runs_active").set(self.active_count() as f64);
        let workflows = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(error) = workflows.drive(&run_id, &control, span, resumed).await {
                tracing::warn!(run_id, %error, "workflow driver stopped; the run is retried at the next poll");
            }
            workflows.unregister(&run_id);
            let _ = done.send(true);
            let _ = workflows.changes.send(run_id);
        });
    }

    /// Stops every local driver (their in-flight executions are dropped,
    /// their steps re-run where the run resumes) and gives up their leases
    /// so that another gateway, or this one restarted, takes over at once.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        let runs: Vec<(String, watch::Receiver<bool>)> = self
            .active
            .lock()
            .map(|active| {
                active
                    .iter()
                    .map(|(run_id, active)| (run_id.clone(), active.done.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let run_ids: Vec<String> = runs.iter().map(|(run_id, _)| run_id.clone()).collect();
        let stopped = futures::future::join_all(runs.into_iter().map(|(_, mut done)| async move {
            let _ = done.wait_for(|done| *done).await;
        }));
        let _ = tokio::time::timeout(Duration::from_secs(5), stopped).await;
        if let Err(error) = self.store.release(&self.owner, &run_ids).await {
            tracing::warn!(%error, "could not release workflow leases; they lapse by themselves");
        }
    }

    fn resolve(&self, request: &pb::RunWorkflowRequest) -> Result<Plan, WorkflowError> {
        let mut violations = Vec::new();
        if request.inputs.len() > MAX_INPUTS {
            violations.push(FieldViolation::new(
                "inputs",
                format!("{} entries", request.inputs.len()),
                format!("must have at most {MAX_INPUTS} entries"),
            ));
        }
        for (name, value) in &request.inputs {
            if !agentmesh_agent::catalogue::is_name(name) || name == definition::HITL_RESPONSE {
                violations.push(FieldViolation::new(
                    format!("inputs.{name}"),
                    format!("{name:?}"),
                    "must be 1 to 64 bytes of [a-z0-9_] starting with a letter, and not hitl_response",
                ));
            }
            check_note(
                &mut violations,
                &format!("inputs.{name}"),
                value,
                agentmesh_agent::sanitize::MAX_VALUE_BYTES,
            );
        }
        let given_definition = !request.definition.is_empty();
        if given_definition != request.steps.is_empty() {
            violations.push(FieldViolation::new(
                "steps",
                format!("{} entries", request.steps.len()),
                "exactly one of steps and definition must be given",
            ));
        }
        invalid(violations)?;
        let mut inputs: BTreeMap<String, String> = request.inputs.clone().into_iter().collect();
        if given_definition {
            let Some(loaded) = self.definitions.get(&request.definition) else {
                return Err(WorkflowError::DefinitionNotFound(
                    request.definition.clone(),
                ));
            };
            let declared: BTreeSet<&str> = loaded
                .definition
                .inputs
                .iter()
                .map(|input| input.name.as_str())
                .collect();
            let mut violations = Vec::new();
            for name in inputs.keys() {
                if !declared.contains(name.as_str()) {
                    violations.push(FieldViolation::new(
                        format!("inputs.{name}"),
                        format!("{name:?}"),
                        format!("is not an input of workflow {:?}", request.definition),
                    ));
                }
            }
            for input in &loaded.definition.inputs {
                if inputs.contains_key(&input.name) {
                    continue;
                }
                match &input.default {
                    Some(default) => {
                        inputs.insert(input.name.clone(), default.clone());
                    }
                    None => violations.push(FieldViolation::new(
                        format!("inputs.{}", input.name),
                        "missing",
                        format!("is required by workflow {:?}", request.definition),
                    )),
                }
            }
            invalid(violations)?;
            return Ok(Plan {
                definition: request.definition.clone(),
                steps: loaded.definition.steps.clone(),
                inputs,
            });
        }
        let mut steps: Vec<StepSpec> = request
            .steps
            .iter()
            .cloned()
            .map(StepSpec::from_wire)
            .collect();
        let names: BTreeSet<String> = inputs.keys().cloned().collect();
        definition::validate_steps(&mut steps, &names, self.limits(), "steps")
            .map_err(WorkflowError::Invalid)?;
        Ok(Plan {
            definition: String::new(),
            steps,
            inputs,
        })
    }

    /// Starts a run (or finds the one started with the same idempotency
    /// key) and, unless `detach`, waits until it is final, awaits
    /// approval, or `deadline` nears.
    pub async fn run(
        self: &Arc<Self>,
        request: pb::RunWorkflowRequest,
        actor: &str,
        deadline: Option<Instant>,
    ) -> Result<pb::WorkflowRun, WorkflowError> {
        let mut violations = Vec::new();
        check_id(&mut violations, "project_id", &request.project_id, true);
        check_id(&mut violations, "workflow_id", &request.workflow_id, false);
        check_id(
            &mut violations,
            "correlation_id",
            &request.correlation_id,
            false,
        );
        check_note(
            &mut violations,
            "idempotency_key",
            &request.idempotency_key,
            128,
        );
        invalid(violations)?;
        self.check_project(&request.project_id)?;
        if self.shutdown.is_cancelled() {
            return Err(WorkflowError::ShuttingDown);
        }
        let plan = self.resolve(&request)?;
        let request_sha256 = {
            let mut hasher = Sha256::new();
            hasher.update(plan.definition.as_bytes());
            hasher.update(serde_json::to_vec(&plan.steps).unwrap_or_default());
            hasher.update(serde_json::to_vec(&plan.inputs).unwrap_or_default());
            hasher.update(request.workflow_id.as_bytes());
            hasher.update(request.cache_policy.to_be_bytes());
            hex::encode(hasher.finalize())
        };
        if !request.idempotency_key.is_empty()
            && let Some(existing) = self
                .store
                .find_by_idempotency_key(&request.project_id, &request.idempotency_key)
                .await?
        {
            if existing.request_sha256 != request_sha256 {
                return Err(WorkflowError::IdempotencyConflict(request.idempotency_key));
            }
            return self
                .finish_call(existing.run_id, request.detach, deadline)
                .await;
        }
        if self.active_count() >= self.settings.max_concurrent_runs {
            return Err(WorkflowError::TooManyRuns(
                self.settings.max_concurrent_runs,
            ));
        }

        let run_id = format!("run_{}", uuid::Uuid::new_v4().simple());
        let workflow_id = if request.workflow_id.is_empty() {
            format!("wf_{}", uuid::Uuid::new_v4().simple())
        } else {
            request.workflow_id.clone()
        };
        let correlation_id = if request.correlation_id.is_empty() {
            run_id.clone()
        } else {
            request.correlation_id.clone()
        };
        // The run's root span: every step's span is its child, so the whole
        // run is one trace (continued by a gateway that resumes it).
        let span = tracing::info_span!(
            parent: None,
            "workflow.run",
            otel.name = "workflow run",
            workflow.id = %workflow_id,
            workflow.run_id = %run_id,
            project_id = %request.project_id,
            definition = %plan.definition,
            resumed = false,
        );
        let (trace_id, root_span_id) =
            agentmesh_telemetry::propagation::span_ids(&span).unwrap_or_default();
        let now = store::now_micros();
        let spec = serde_json::to_string(&plan.steps)
            .map_err(|error| WorkflowError::Corrupt(error.to_string()))?;
        let inputs = serde_json::to_string(&plan.inputs)
            .map_err(|error| WorkflowError::Corrupt(error.to_string()))?;
        let run = run::Model {
            run_id: run_id.clone(),
            workflow_id: workflow_id.clone(),
            project_id: request.project_id.clone(),
            definition: plan.definition.clone(),
            spec,
            inputs,
            state: pb::WorkflowState::Pending as i32,
            correlation_id,
            trace_id: trace_id.clone(),
            root_span_id,
            idempotency_key: (!request.idempotency_key.is_empty())
                .then(|| request.idempotency_key.clone()),
            request_sha256,
            cache_policy: request.cache_policy,
            started_by: actor.to_owned(),
            error: String::new(),
            created_at_micros: now,
            updated_at_micros: now,
            completed_at_micros: None,
            owner: self.owner.clone(),
            lease_until_micros: self.lease_until(),
            cancel_requested: false,
            cancel_actor: String::new(),
            cancel_reason: String::new(),
            last_event: 0,
        };
        let steps = plan
            .steps
            .iter()
            .enumerate()
            .map(|(position, step)| engine::new_step_row(&run_id, position, step))
            .collect();
        // Registered before it exists in the database, so the take-over
        // loop never starts a second driver for it.
        let Some((control, done)) = self.register(&run_id, request.project_id.clone()) else {
            return Err(WorkflowError::Corrupt(format!("run id {run_id} reused")));
        };
        let first = NewEvent {
            kind: pb::WorkflowEventKind::RunStarted as i32,
            actor: actor.to_owned(),
            message: if plan.definition.is_empty() {
                format!("{} inline steps", plan.steps.len())
            } else {
                format!("definition {:?}", plan.definition)
            },
            ..NewEvent::default()
        };
        if let Err(error) = self.store.insert_run(run, steps, first).await {
            self.unregister(&run_id);
            // Two identical requests raced on one idempotency key: the
            // other one's run is the answer.
            if !request.idempotency_key.is_empty()
                && let Ok(Some(existing)) = self
                    .store
                    .find_by_idempotency_key(&request.project_id, &request.idempotency_key)
                    .await
            {
                return self
                    .finish_call(existing.run_id, request.detach, deadline)
                    .await;
            }
            return Err(error.into());
        }
        metrics::counter!("agentmesh_gateway_workflow_runs_started_total").increment(1);
        self.audit.emit(AuditRecord {
            action: "workflow.run",
            actor: actor.to_owned(),
            project_id: request.project_id.clone(),
            workflow_id,
            trace_id,
            success: true,
            context: [
                ("run_id".to_owned(), run_id.clone()),
                ("definition".to_owned(), plan.definition.clone()),
                ("steps".to_owned(), plan.steps.len().to_string()),
            ]
            .into(),
            ..AuditRecord::default()
        });
        self.spawn_driver(run_id.clone(), control, done, Some(span), false);
        self.finish_call(run_id, request.detach, deadline).await
    }

    /// The run now (detached), or once it is final or awaits approval, or
    /// just before `deadline`.
    async fn finish_call(
        &self,
        run_id: String,
        detach: bool,
        deadline: Option<Instant>,
    ) -> Result<pb::WorkflowRun, WorkflowError> {
        let mut changes = self.changes.subscribe();
        let until = deadline.map(|deadline| {
            let left = deadline.saturating_duration_since(Instant::now());
            deadline - (left / 20).min(Duration::from_millis(50))
        });
        loop {
            let record = self.load(&run_id).await?;
            let state = record.run.state;
            if detach
                || is_final(state)
                || state == pb::WorkflowState::AwaitingApproval as i32
                || self.shutdown.is_cancelled()
            {
                return Ok(run_to_wire(&record));
            }
            let wait = async {
                loop {
                    match changes.recv().await {
                        Ok(changed) if changed == run_id => return,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await;
                        }
                    }
                }
            };
            let tick = tokio::time::sleep(self.poll_interval());
            tokio::select! {
                () = wait => {}
                () = tick => {}
                () = self.shutdown.cancelled() => {}
                () = async {
                    match until {
                        Some(until) => tokio::time::sleep_until(until).await,
                        None => std::future::pending().await,
                    }
                } => {
                    return Ok(run_to_wire(&self.load(&run_id).await?));
                }
            }
        }
    }

    async fn load(&self, run_id: &str) -> Result<RunRecord, WorkflowError> {
        self.store
            .load(run_id)
            .await?
            .ok_or_else(|| WorkflowError::RunNotFound(run_id.to_owned()))
    }

    fn check_run_id(run_id: &str) -> Result<(), WorkflowError> {
        let mut violations = Vec::new();
        check_id(&mut violations, "run_id", run_id, true);
        invalid(violations)
    }

    /// The run as it is now.
    pub async fn get(&self, run_id: &str) -> Result<pb::WorkflowRun, WorkflowError> {
        Self::check_run_id(run_id)?;
        Ok(run_to_wire(&self.load(run_id).await?))
    }

    /// A stream of the run: a snapshot (or, from `after_sequence`, the
    /// events since), then its events as they are written (by this gateway
    /// or another), ending after the event that finishes the run.
    pub async fn watch(
        self: &Arc<Self>,
        run_id: &str,
        after_sequence: Option<u64>,
    ) -> Result<mpsc::Receiver<Result<pb::WatchWorkflowRunResponse, tonic::Status>>, WorkflowError>
    {
        Self::check_run_id(run_id)?;
        let mut changes = self.changes.subscribe();
        let record = self.load(run_id).await?;
        let (sender, receiver) = mpsc::channel(WATCH_BUFFER);
        let workflows = Arc::clone(self);
        let run_id = run_id.to_owned();
        tokio::spawn(async move {
            let (mut last, mut finished) = match after_sequence {
                Some(sequence) => {
                    let after = i64::try_from(sequence).unwrap_or(i64::MAX);
                    // Nothing more will come after the end of a finished run.
                    (
                        after,
                        is_final(record.run.state) && after >= record.run.last_event,
                    )
                }
                None => {
                    let snapshot = pb::WatchWorkflowRunResponse {
                        update: Some(pb::watch_workflow_run_response::Update::Snapshot(
                            run_to_wire(&record),
                        )),
                    };
                    if sender.send(Ok(snapshot)).await.is_err() {
                        return;
                    }
                    (record.run.last_event, is_final(record.run.state))
                }
            };
            while !finished {
                let events = match workflows
                    .store
                    .events_after(&run_id, last, WATCH_PAGE)
                    .await
                {
                    Ok(events) => events,
                    Err(error) => {
                        let _ = sender.send(Err(WorkflowError::Store(error).into())).await;
                        return;
                    }
                };
                let full_page = events.len() as u64 == WATCH_PAGE;
                for event in events {
                    last = event.sequence;
                    finished |= event.kind == pb::WorkflowEventKind::RunFinished as i32;
                    let message = pb::WatchWorkflowRunResponse {
                        update: Some(pb::watch_workflow_run_response::Update::Event(
                            event_to_wire(event),
                        )),
                    };
                    if sender.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
                if finished || full_page {
                    continue;
                }
                let wait = async {
                    loop {
                        match changes.recv().await {
                            Ok(changed) if changed == run_id => return,
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => return,
                            Err(broadcast::error::RecvError::Closed) => {
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                };
                tokio::select! {
                    () = wait => {}
                    () = tokio::time::sleep(workflows.poll_interval()) => {}
                    () = sender.closed() => return,
                    () = workflows.shutdown.cancelled() => {
                        let _ = sender
                            .send(Err(tonic::Status::unavailable(
                                "the gateway is shutting down; watch again to resume",
                            )))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(receiver)
    }

    fn decision_target<'a>(
        record: &'a RunRecord,
        step_name: &str,
    ) -> Result<&'a step::Model, WorkflowError> {
        if is_final(record.run.state) {
            return Err(WorkflowError::RunFinished {
                run_id: record.run.run_id.clone(),
                state: run_state_name(record.run.state),
            });
        }
        let step = record
            .steps
            .iter()
            .find(|step| step.name == step_name)
            .ok_or_else(|| WorkflowError::StepNotFound {
                run_id: record.run.run_id.clone(),
                step: step_name.to_owned(),
            })?;
        if step.state != pb::StepState::AwaitingApproval as i32 {
            return Err(WorkflowError::NotAwaitingApproval {
                step: step_name.to_owned(),
                state: step_state_name(step.state),
            });
        }
        Ok(step)
    }

    fn audit_decision(
        &self,
        action: &'static str,
        record: &RunRecord,
        step: &step::Model,
        actor: &str,
        mut context: BTreeMap<String, String>,
    ) {
        context.insert("run_id".to_owned(), record.run.run_id.clone());
        context.insert("step".to_owned(), step.name.clone());
        context.insert(
            "gate".to_owned(),
            match pb::ApprovalGate::try_from(step.gate) {
                Ok(pb::ApprovalGate::BeforeStart) => "before_start",
                Ok(pb::ApprovalGate::Output) => "output",
                _ => "none",
            }
            .to_owned(),
        );
        self.audit.emit(AuditRecord {
            action,
            actor: actor.to_owned(),
            project_id: record.run.project_id.clone(),
            workflow_id: record.run.workflow_id.clone(),
            agent_type: step.agent_type.clone(),
            trace_id: record.run.trace_id.clone(),
            success: true,
            context,
        });
    }

    /// Approves the step awaiting approval: it starts, or its output is
    /// accepted.
    pub async fn approve(
        &self,
        run_id: &str,
        step_name: &str,
        comment: &str,
        actor: &str,
    ) -> Result<pb::WorkflowRun, WorkflowError> {
        let mut violations = Vec::new();
        check_id(&mut violations, "run_id", run_id, true);
        check_note(&mut violations, "comment", comment, MAX_NOTE_BYTES);
        invalid(violations)?;
        let record = self.load(run_id).await?;
        let step = Self::decision_target(&record, step_name)?;
        let specs = engine::decode_spec(&record.run)?;
        let spec = specs
            .iter()
            .find(|spec| spec.name == step.name)
            .ok_or_else(|| WorkflowError::Corrupt(format!("step {} has no spec", step.name)))?;
        let mut row = step.clone();
        let mut change = Change::default();
        if step.gate == pb::ApprovalGate::Output as i32 {
            row.state = pb::StepState::Succeeded as i32;
            row.gate = 0;
            change.artifact = Some(store::artifact::Model {
                run_id: run_id.to_owned(),
                name: spec.creates.clone(),
                kind: pb::WorkflowArtifactKind::StepOutput as i32,
                step: step.name.clone(),
                content: row.output.clone().unwrap_or_default(),
                version: 1,
                updated_at_micros: 0,
            });
        } else {
            row.state = pb::StepState::Pending as i32;
            row.gate = 0;
            row.start_approved = true;
        }
        change.step = Some((row.clone(), vec![pb::StepState::AwaitingApproval as i32]));
        if record.run.state == pb::WorkflowState::AwaitingApproval as i32 {
            change.run_state = Some(pb::WorkflowState::Running as i32);
        }
        change.event = Some(NewEvent {
            kind: pb::WorkflowEventKind::StepApproved as i32,
            step: step.name.clone(),
            step_state: row.state,
            message: comment.to_owned(),
            actor: actor.to_owned(),
        });
        if !self.store.apply(run_id, change).await? {
            return Err(self.decision_conflict(run_id, step_name).await);
        }
        self.audit_decision(
            "workflow.step.approve",
            &record,
            step,
            actor,
            [("comment".to_owned(), comment.to_owned())].into(),
        );
        self.notify_change(run_id);
        Ok(run_to_wire(&self.load(run_id).await?))
    }

    async fn decision_conflict(&self, run_id: &str, step_name: &str) -> WorkflowError {
        match self.load(run_id).await {
            Ok(record) => match Self::decision_target(&record, step_name) {
                Err(error) => error,
                Ok(_) => WorkflowError::NotAwaitingApproval {
                    step: step_name.to_owned(),
                    state: "changing",
                },
            },
            Err(error) => error,
        }
    }

    /// Rejects the step awaiting approval: fails it, or with an amendment
    /// sends it back to run again with the amendment as its
    /// `hitl_response`.
    pub async fn reject(
        &self,
        run_id: &str,
        step_name: &str,
        reason: &str,
        amendment: &str,
        actor: &str,
    ) -> Result<pb::WorkflowRun, WorkflowError> {
        let mut violations = Vec::new();
        check_id(&mut violations, "run_id", run_id, true);
        check_note(&mut violations, "reason", reason, MAX_NOTE_BYTES);
        check_note(
            &mut violations,
            "amendment",
            amendment,
            agentmesh_agent::sanitize::MAX_VALUE_BYTES,
        );
        invalid(violations)?;
        let record = self.load(run_id).await?;
        let step = Self::decision_target(&record, step_name)?;
        let mut row = step.clone();
        let mut change = Change::default();
        let now = store::now_micros();
        if amendment.is_empty() {
            row.state = pb::StepState::Failed as i32;
            row.gate = 0;
            row.error_code = tonic::Code::Aborted as i32;
            row.error_message = format!("rejected by {actor}: {reason}");
            row.completed_at_micros = Some(now);
        } else {
            row.state = pb::StepState::Pending as i32;
            row.gate = 0;
            row.start_approved = true;
            row.revisions += 1;
            row.output = None;
            change.artifact = Some(store::artifact::Model {
                run_id: run_id.to_owned(),
                name: format!("{}/{}", definition::HITL_RESPONSE, step.name),
                kind: pb::WorkflowArtifactKind::HitlResponse as i32,
                step: step.name.clone(),
                content: amendment.to_owned(),
                version: 1,
                updated_at_micros: 0,
            });
        }
        change.step = Some((row.clone(), vec![pb::StepState::AwaitingApproval as i32]));
        if record.run.state == pb::WorkflowState::AwaitingApproval as i32 {
            change.run_state = Some(pb::WorkflowState::Running as i32);
        }
        change.event = Some(NewEvent {
            kind: pb::WorkflowEventKind::StepRejected as i32,
            step: step.name.clone(),
            step_state: row.state,
            message: if amendment.is_empty() {
                reason.to_owned()
            } else {
                format!("sent back with an amendment: {reason}")
            },
            actor: actor.to_owned(),
        });
        if !self.store.apply(run_id, change).await? {
            return Err(self.decision_conflict(run_id, step_name).await);
        }
        self.audit_decision(
            "workflow.step.reject",
            &record,
            step,
            actor,
            [
                ("reason".to_owned(), reason.to_owned()),
                (
                    "decision".to_owned(),
                    if amendment.is_empty() {
                        "fail"
                    } else {
                        "revise"
                    }
                    .to_owned(),
                ),
                ("amendment_bytes".to_owned(), amendment.len().to_string()),
            ]
            .into(),
        );
        self.notify_change(run_id);
        Ok(run_to_wire(&self.load(run_id).await?))
    }

    /// Cancels a run: a local driver drops its in-flight executions at
    /// once and marks everything cancelled; a run driven by another gateway
    /// is cancelled by it at its next poll; an orphaned run is finalised
    /// here.
    pub async fn cancel(
        self: &Arc<Self>,
        run_id: &str,
        reason: &str,
        actor: &str,
    ) -> Result<pb::WorkflowRun, WorkflowError> {
        let mut violations = Vec::new();
        check_id(&mut violations, "run_id", run_id, true);
        check_note(&mut violations, "reason", reason, MAX_NOTE_BYTES);
        invalid(violations)?;
        let record = self.load(run_id).await?;
        if is_final(record.run.state) {
            return Ok(run_to_wire(&record));
        }
        self.store.request_cancel(run_id, actor, reason).await?;
        self.audit.emit(AuditRecord {
            action: "workflow.cancel",
            actor: actor.to_owned(),
            project_id: record.run.project_id.clone(),
            workflow_id: record.run.workflow_id.clone(),
            trace_id: record.run.trace_id.clone(),
            success: true,
            context: [
                ("run_id".to_owned(), run_id.to_owned()),
                ("reason".to_owned(), reason.to_owned()),
            ]
            .into(),
            ..AuditRecord::default()
        });
        if let Some((control, mut done)) = self.local_control(run_id) {
            control.cancel.cancel();
            let _ =
                tokio::time::timeout(Duration::from_secs(10), done.wait_for(|done| *done)).await;
            return Ok(run_to_wire(&self.load(run_id).await?));
        }
        // Not driven here: take it over if nobody holds it, and finish it.
        if let Some((control, done)) = self.register(run_id, record.run.project_id.clone()) {
            let claimed = self
                .store
                .claim(run_id, &self.owner, self.lease_until())
                .await;
            match claimed {
                Ok(true) => {
                    control.cancel.cancel();
                    self.spawn_driver(run_id.to_owned(), control, done, None, true);
                    if let Some((_, mut done)) = self.local_control(run_id) {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(10),
                            done.wait_for(|done| *done),
                        )
                        .await;
                    }
                }
                Ok(false) => self.unregister(run_id),
                Err(error) => {
                    self.unregister(run_id);
                    return Err(error.into());
                }
            }
        }
        // Driven by another gateway: it sees the request at its next poll.
        let until = Instant::now() + 2 * self.poll_interval();
        loop {
            let record = self.load(run_id).await?;
            if is_final(record.run.state) || Instant::now() >= until {
                return Ok(run_to_wire(&record));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every definition, sorted by name.
    pub fn definitions(&self) -> pb::ListWorkflowDefinitionsResponse {
        pb::ListWorkflowDefinitionsResponse {
            definitions: self
                .definitions
                .iter()
                .map(definition::Loaded::to_wire)
                .collect(),
        }
    }

    fn stop_to_wire(stop: &project_stop::Model) -> pb::ProjectStop {
        pb::ProjectStop {
            project_id: stop.project_id.clone(),
            reason: stop.reason.clone(),
            stopped_by: stop.stopped_by.clone(),
            stopped_at: Some(micros_timestamp(stop.stopped_at_micros)),
        }
    }

    /// Puts a project under an emergency stop (and cancels its runs when
    /// asked).
    pub async fn stop_project(
        self: &Arc<Self>,
        project_id: &str,
        reason: &str,
        cancel_runs: bool,
        actor: &str,
    ) -> Result<pb::StopProjectResponse, WorkflowError> {
        let mut violations = Vec::new();
        check_id(&mut violations, "project_id", project_id, true);
        check_note(&mut violations, "reason", reason, MAX_NOTE_BYTES);
        invalid(violations)?;
        let stop = self
            .store
            .stop_project(project_stop::Model {
                project_id: project_id.to_owned(),
                reason: reason.to_owned(),
                stopped_by: actor.to_owned(),
                stopped_at_micros: store::now_micros(),
            })
            .await?;
        if let Ok(mut stops) = self.stops.write() {
            stops.insert(project_id.to_owned(), stop.clone());
        }
        self.audit.emit(AuditRecord {
            action: "project.stop",
            actor: actor.to_owned(),
            project_id: project_id.to_owned(),
            success: true,
            context: [
                ("reason".to_owned(), reason.to_owned()),
                ("cancel_runs".to_owned(), cancel_runs.to_string()),
            ]
            .into(),
            ..AuditRecord::default()
        });
        let mut cancelled_runs = 0;
        if cancel_runs {
            for run_id in self.store.unfinished_runs_of(project_id).await? {
                let reason = format!("project {project_id} stopped: {reason}");
                let run = self.cancel(&run_id, &reason, actor).await?;
                if run.state == pb::WorkflowState::Cancelled as i32 {
                    cancelled_runs += 1;
                }
            }
        }
        Ok(pb::StopProjectResponse {
            stop: Some(Self::stop_to_wire(&stop)),
            cancelled_runs,
        })
    }

    /// Lifts a project's emergency stop; its held runs continue.
    pub async fn resume_project(
        &self,
        project_id: &str,
        actor: &str,
    ) -> Result<pb::ResumeProjectResponse, WorkflowError> {
        let mut violations = Vec::new();
        check_id(&mut violations, "project_id", project_id, true);
        invalid(violations)?;
        let lifted = self.store.resume_project(project_id).await?;
        if let Ok(mut stops) = self.stops.write() {
            stops.remove(project_id);
        }
        self.audit.emit(AuditRecord {
            action: "project.resume",
            actor: actor.to_owned(),
            project_id: project_id.to_owned(),
            success: lifted.is_some(),
            ..AuditRecord::default()
        });
        self.wake_project(project_id);
        Ok(pb::ResumeProjectResponse {
            lifted: lifted.as_ref().map(Self::stop_to_wire),
        })
    }
}
