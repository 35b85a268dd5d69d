//! The driver of one run: starts every step whose dependencies succeeded
//! (at most `gateway.workflows.max_parallel_steps` at once, none while the
//! project is stopped), holds steps at their approval gates, executes each
//! through [`Gateway::execute`](crate::service::Gateway::execute) inside a
//! child span of the run's root span, records every transition with its
//! event, and finishes the run: succeeded, failed (naming the step) or
//! cancelled (dropping the in-flight executions).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use agentmesh_proto::gateway as pb;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tonic::{Code, Status};
use tracing::Instrument;

use super::definition::{HITL_RESPONSE, StepSpec};
use super::store::{Change, NewEvent, RunRecord, artifact, now_micros, run, step};
use super::{Control, Workflows, is_final};
use crate::around::Rpc;
use crate::error::WorkflowError;
use crate::metadata::CallMeta;

/// What one step execution gave.
enum Outcome {
    /// An answer (possibly degraded).
    Answered(Box<pb::ExecuteTaskResponse>),
    /// An error, as the step records it.
    Failed(Status),
}

type StepFuture = Pin<Box<dyn Future<Output = (String, Outcome, StdInstant)> + Send>>;

/// The row of a new step.
pub fn new_step_row(run_id: &str, position: usize, spec: &StepSpec) -> step::Model {
    step::Model {
        run_id: run_id.to_owned(),
        name: spec.name.clone(),
        position: i32::try_from(position).unwrap_or(i32::MAX),
        agent_type: spec.agent_type.clone(),
        state: pb::StepState::Pending as i32,
        gate: 0,
        start_approved: false,
        runs: 0,
        revisions: 0,
        output: None,
        execution_id: String::new(),
        node_id: String::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
        provider: String::new(),
        model: String::new(),
        offline: false,
        degraded: false,
        degraded_reason: String::new(),
        cache_hit: false,
        agent_calls: 0,
        error_code: 0,
        error_message: String::new(),
        started_at_micros: None,
        completed_at_micros: None,
    }
}

/// The resolved steps stored with a run.
pub fn decode_spec(run: &run::Model) -> Result<Vec<StepSpec>, WorkflowError> {
    serde_json::from_str(&run.spec)
        .map_err(|error| WorkflowError::Corrupt(format!("run {}: steps: {error}", run.run_id)))
}

fn decode_inputs(run: &run::Model) -> Result<BTreeMap<String, String>, WorkflowError> {
    serde_json::from_str(&run.inputs)
        .map_err(|error| WorkflowError::Corrupt(format!("run {}: inputs: {error}", run.run_id)))
}

fn state(value: pb::StepState) -> i32 {
    value as i32
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the
/// cut.
fn bounded(mut text: String, max: usize) -> String {
    const MARK: &str = "\n[… truncated]";
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARK);
    text
}

/// Whether the fallback agent may answer after this error: not for the
/// caller's own mistakes, nor for a cancellation.
fn fallback_may_answer(code: Code) -> bool {
    !matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Cancelled
    )
}

impl Workflows {
    fn run_span(&self, run: &run::Model) -> tracing::Span {
        let span = tracing::info_span!(
            parent: None,
            "workflow.run",
            otel.name = "workflow run",
            workflow.id = %run.workflow_id,
            workflow.run_id = %run.run_id,
            project_id = %run.project_id,
            definition = %run.definition,
            resumed = true,
        );
        if !run.trace_id.is_empty() && !run.root_span_id.is_empty() {
            agentmesh_telemetry::propagation::continue_trace(
                &span,
                &run.trace_id,
                &run.root_span_id,
            );
        }
        span
    }

    /// Drives `run_id` until it is final, cancelled, or the gateway stops.
    pub(crate) async fn drive(
        self: &Arc<Self>,
        run_id: &str,
        control: &Control,
        span: Option<tracing::Span>,
        resumed: bool,
    ) -> Result<(), WorkflowError> {
        let Some(mut record) = self.store.load(run_id).await? else {
            return Ok(());
        };
        if let Ok(mut active) = self.active.lock()
            && let Some(entry) = active.get_mut(run_id)
        {
            entry.project_id = record.run.project_id.clone();
        }
        let span = span.unwrap_or_else(|| self.run_span(&record.run));
        let specs = match decode_spec(&record.run)
            .and_then(|specs| decode_inputs(&record.run).map(|inputs| (specs, inputs)))
        {
            Ok(decoded) => decoded,
            Err(error) => {
                let message = error.to_string();
                self.commit(
                    &mut record,
                    Change {
                        run_state: Some(pb::WorkflowState::Failed as i32),
                        run_error: Some(message.clone()),
                        event: Some(NewEvent {
                            kind: pb::WorkflowEventKind::RunFinished as i32,
                            message,
                            ..NewEvent::default()
                        }),
                        ..Change::default()
                    },
                )
                .await?;
                return Ok(());
            }
        };
        let runner = Runner {
            workflows: Arc::clone(self),
            specs: specs.0,
            inputs: specs.1,
            span: span.clone(),
        };
        runner
            .drive(&mut record, control, resumed)
            .instrument(span)
            .await
    }

    /// Applies `change` to the run and, when it applied, to `record`
    /// (reloaded) and tells watchers. Returns whether it applied.
    async fn commit(&self, record: &mut RunRecord, change: Change) -> Result<bool, WorkflowError> {
        let run_id = record.run.run_id.clone();
        let applied = self.store.apply(&run_id, change.clone()).await?;
        if applied {
            patch(record, change);
        } else if let Some(fresh) = self.store.load(&run_id).await? {
            // Someone else changed the run (a decision, a cancel): re-read.
            *record = fresh;
        }
        let _ = self.changes.send(run_id);
        Ok(applied)
    }
}

/// Applies to the driver's copy of a run a change the database accepted,
/// as [`Store::apply`](super::store::Store::apply) did (saves re-reading
/// the run after every transition).
fn patch(record: &mut RunRecord, change: Change) {
    let now = now_micros();
    if let Some((row, _)) = change.step
        && let Some(current) = record.steps.iter_mut().find(|step| step.name == row.name)
    {
        *current = step::Model {
            position: current.position,
            agent_type: current.agent_type.clone(),
            ..row
        };
    }
    if let Some(written) = change.artifact {
        match record
            .artifacts
            .iter_mut()
            .find(|artifact| artifact.name == written.name)
        {
            Some(existing) => {
                existing.kind = written.kind;
                existing.step = written.step;
                existing.content = written.content;
                existing.version += 1;
                existing.updated_at_micros = now;
            }
            None => record.artifacts.push(artifact::Model {
                run_id: record.run.run_id.clone(),
                version: 1,
                updated_at_micros: now,
                ..written
            }),
        }
    }
    if let Some(run_state) = change.run_state {
        record.run.state = run_state;
        if is_final(run_state) {
            record.run.completed_at_micros = Some(now);
        }
    }
    if let Some(error) = change.run_error {
        record.run.error = error;
    }
    if change.event.is_some() {
        record.run.last_event += 1;
    }
    record.run.updated_at_micros = now;
}

/// One run's driver: its steps, inputs and span.
struct Runner {
    workflows: Arc<Workflows>,
    specs: Vec<StepSpec>,
    inputs: BTreeMap<String, String>,
    span: tracing::Span,
}

impl Runner {
    fn spec(&self, name: &str) -> Option<&StepSpec> {
        self.specs.iter().find(|spec| spec.name == name)
    }

    async fn drive(
        &self,
        record: &mut RunRecord,
        control: &Control,
        resumed: bool,
    ) -> Result<(), WorkflowError> {
        let workflows = &self.workflows;
        if is_final(record.run.state) {
            return Ok(());
        }
        if resumed {
            // Steps that were running when the last driver stopped run again;
            // finished ones keep their results.
            let again: Vec<step::Model> = record
                .steps
                .iter()
                .filter(|step| step.state == state(pb::StepState::Running))
                .cloned()
                .collect();
            for mut row in again {
                row.state = state(pb::StepState::Pending);
                workflows
                    .commit(
                        record,
                        Change {
                            step: Some((row, vec![state(pb::StepState::Running)])),
                            ..Change::default()
                        },
                    )
                    .await?;
            }
            let done: Vec<&str> = record
                .steps
                .iter()
                .filter(|step| step.state == state(pb::StepState::Succeeded))
                .map(|step| step.name.as_str())
                .collect();
            let message = format!(
                "resumed by {}; kept the results of {} finished step(s): {}",
                workflows.owner,
                done.len(),
                done.join(", ")
            );
            workflows
                .commit(
                    record,
                    Change {
                        event: Some(NewEvent {
                            kind: pb::WorkflowEventKind::RunResumed as i32,
                            message,
                            ..NewEvent::default()
                        }),
                        ..Change::default()
                    },
                )
                .await?;
        }
        let mut in_flight: FuturesUnordered<StepFuture> = FuturesUnordered::new();
        let mut held_reported = false;
        loop {
            if control.cancel.is_cancelled() || record.run.cancel_requested {
                drop(in_flight);
                return self.finish_cancelled(record).await;
            }
            if workflows.shutdown.is_cancelled() {
                return Ok(());
            }
            if let Some(failed) = record
                .steps
                .iter()
                .find(|step| step.state == state(pb::StepState::Failed))
                .cloned()
            {
                drop(in_flight);
                return self.finish_failed(record, &failed).await;
            }
            if record
                .steps
                .iter()
                .all(|step| step.state == state(pb::StepState::Succeeded))
            {
                return self.finish_succeeded(record).await;
            }

            // Start what is ready.
            let held = workflows.is_stopped(&record.run.project_id);
            let ready: Vec<step::Model> = record
                .steps
                .iter()
                .filter(|step| step.state == state(pb::StepState::Pending))
                .filter(|step| self.dependencies_succeeded(record, &step.name))
                .cloned()
                .collect();
            if held {
                if !ready.is_empty() && !held_reported {
                    held_reported = true;
                    workflows
                        .commit(
                            record,
                            Change {
                                event: Some(NewEvent {
                                    kind: pb::WorkflowEventKind::RunHeld as i32,
                                    message: format!(
                                        "project {} is stopped; no step starts until ResumeProject",
                                        record.run.project_id
                                    ),
                                    ..NewEvent::default()
                                }),
                                ..Change::default()
                            },
                        )
                        .await?;
                }
            } else {
                held_reported = false;
                for row in ready {
                    if in_flight.len() >= workflows.settings.max_parallel_steps {
                        break;
                    }
                    let Some(spec) = self.spec(&row.name).cloned() else {
                        continue;
                    };
                    if spec.approve_before_start && !row.start_approved {
                        self.hold_for_approval(record, row, pb::ApprovalGate::BeforeStart, None)
                            .await?;
                        continue;
                    }
                    if let Some(future) = self.start(record, row, spec).await? {
                        in_flight.push(future);
                    }
                }
            }

            // The run's own state.
            let awaiting = record
                .steps
                .iter()
                .any(|step| step.state == state(pb::StepState::AwaitingApproval));
            let desired = if in_flight.is_empty() && awaiting {
                pb::WorkflowState::AwaitingApproval
            } else {
                pb::WorkflowState::Running
            };
            if record.run.state != desired as i32 {
                workflows
                    .commit(
                        record,
                        Change {
                            run_state: Some(desired as i32),
                            ..Change::default()
                        },
                    )
                    .await?;
            }

            // Wait for a step, a decision, a cancel, or the next poll.
            tokio::select! {
                biased;
                () = control.cancel.cancelled() => {}
                () = workflows.shutdown.cancelled() => {}
                Some((name, outcome, started)) = in_flight.next(), if !in_flight.is_empty() => {
                    self.settle(record, &name, outcome, started).await?;
                }
                () = control.wake.notified() => self.reload(record).await?,
                () = tokio::time::sleep(workflows.poll_interval()) => self.reload(record).await?,
            }
        }
    }

    async fn reload(&self, record: &mut RunRecord) -> Result<(), WorkflowError> {
        if let Some(fresh) = self.workflows.store.load(&record.run.run_id).await? {
            *record = fresh;
        }
        Ok(())
    }

    fn dependencies_succeeded(&self, record: &RunRecord, name: &str) -> bool {
        let Some(spec) = self.spec(name) else {
            return false;
        };
        spec.depends_on.iter().all(|dependency| {
            record.steps.iter().any(|step| {
                &step.name == dependency && step.state == state(pb::StepState::Succeeded)
            })
        })
    }

    async fn hold_for_approval(
        &self,
        record: &mut RunRecord,
        mut row: step::Model,
        gate: pb::ApprovalGate,
        from: Option<i32>,
    ) -> Result<(), WorkflowError> {
        let expected = from.unwrap_or(state(pb::StepState::Pending));
        row.state = state(pb::StepState::AwaitingApproval);
        row.gate = gate as i32;
        let message = match gate {
            pb::ApprovalGate::BeforeStart => "waits for approval before it starts",
            _ => "waits for approval of its output",
        };
        let name = row.name.clone();
        self.workflows
            .commit(
                record,
                Change {
                    step: Some((row, vec![expected])),
                    event: Some(NewEvent {
                        kind: pb::WorkflowEventKind::StepAwaitingApproval as i32,
                        step: name,
                        step_state: state(pb::StepState::AwaitingApproval),
                        message: message.to_owned(),
                        ..NewEvent::default()
                    }),
                    ..Change::default()
                },
            )
            .await?;
        Ok(())
    }

    /// Marks the step running and returns its execution.
    async fn start(
        &self,
        record: &mut RunRecord,
        mut row: step::Model,
        spec: StepSpec,
    ) -> Result<Option<StepFuture>, WorkflowError> {
        let task = self.task(record, &spec);
        row.state = state(pb::StepState::Running);
        row.runs += 1;
        row.started_at_micros = Some(now_micros());
        row.completed_at_micros = None;
        row.error_code = 0;
        row.error_message.clear();
        let name = row.name.clone();
        let applied = self
            .workflows
            .commit(
                record,
                Change {
                    step: Some((row, vec![state(pb::StepState::Pending)])),
                    event: Some(NewEvent {
                        kind: pb::WorkflowEventKind::StepStarted as i32,
                        step: name.clone(),
                        step_state: state(pb::StepState::Running),
                        ..NewEvent::default()
                    }),
                    ..Change::default()
                },
            )
            .await?;
        if !applied {
            return Ok(None);
        }
        let position = record
            .steps
            .iter()
            .position(|step| step.name == name)
            .unwrap_or(0);
        let field = format!("steps[{position}]");
        let step_span = tracing::info_span!(
            parent: &self.span,
            "workflow.step",
            otel.name = %format!("workflow step {name}"),
            workflow.step = %name,
            agent_type = %spec.agent_type,
        );
        let workflows = Arc::clone(&self.workflows);
        let run_id = record.run.run_id.clone();
        let allow_fallback = spec.allow_fallback;
        let future = async move {
            // Inside the step's span: the tasks' trace is the run's.
            let call = CallMeta::internal(&format!("workflow-run:{run_id}"));
            let started = StdInstant::now();
            let outcome = match task {
                Err(status) => Outcome::Failed(status),
                Ok(task) => {
                    match workflows
                        .gateway
                        .execute(Some(task.clone()), &field, None, &call, Rpc::WorkflowStep)
                        .await
                    {
                        Ok(response) => Outcome::Answered(Box::new(response)),
                        Err(error) => {
                            let status = Status::from(error);
                            if allow_fallback && fallback_may_answer(status.code()) {
                                let reason = format!(
                                    "step {name} failed ({}: {}); the fallback agent answered",
                                    agentmesh_telemetry::code_name(status.code()),
                                    status.message()
                                );
                                workflows.fallback_event(&run_id, &name, &reason).await;
                                match workflows
                                    .gateway
                                    .execute_fallback(
                                        Some(task),
                                        &field,
                                        None,
                                        reason,
                                        &call,
                                        Rpc::WorkflowStep,
                                    )
                                    .await
                                {
                                    Ok(response) => Outcome::Answered(Box::new(response)),
                                    Err(error) => Outcome::Failed(Status::from(error)),
                                }
                            } else {
                                Outcome::Failed(status)
                            }
                        }
                    }
                }
            };
            (name, outcome, started)
        }
        .instrument(step_span);
        Ok(Some(Box::pin(future)))
    }

    /// The task of a step: its variable templates rendered over the run's
    /// inputs and the artifacts so far, its context assembled, the
    /// reviewer's amendment added.
    fn task(&self, record: &RunRecord, spec: &StepSpec) -> Result<pb::TaskSpec, Status> {
        let max = agentmesh_agent::sanitize::MAX_VALUE_BYTES;
        let outputs: BTreeMap<&str, &artifact::Model> = record
            .artifacts
            .iter()
            .filter(|artifact| artifact.kind == pb::WorkflowArtifactKind::StepOutput as i32)
            .map(|artifact| (artifact.name.as_str(), artifact))
            .collect();
        let amendment = record
            .artifacts
            .iter()
            .find(|artifact| artifact.name == format!("{HITL_RESPONSE}/{}", spec.name))
            .map(|artifact| artifact.content.clone())
            .unwrap_or_default();
        let mut values = self.inputs.clone();
        for (name, artifact) in &outputs {
            values.insert((*name).to_owned(), artifact.content.clone());
        }
        values.insert(HITL_RESPONSE.to_owned(), amendment.clone());
        let mut variables = BTreeMap::new();
        for (name, template) in &spec.variables {
            let rendered = agentmesh_agent::template::render(
                template,
                &values,
                &format!("steps.{}.variables.{name}", spec.name),
                &format!("steps.{}.variables", spec.name),
            )
            .map_err(|violations| agentmesh_resilience::invalid_argument(&violations))?;
            variables.insert(name.clone(), rendered);
        }
        let context = match variables.remove(&spec.context_variable) {
            Some(given) => given,
            None => {
                let sources: Vec<String> = if spec.requires.is_empty() {
                    spec.depends_on
                        .iter()
                        .filter_map(|dependency| self.spec(dependency))
                        .map(|upstream| upstream.creates.clone())
                        .collect()
                } else {
                    spec.requires.clone()
                };
                let mut context = String::new();
                for source in sources {
                    let content = outputs
                        .get(source.as_str())
                        .map(|artifact| artifact.content.as_str())
                        .or_else(|| self.inputs.get(&source).map(String::as_str))
                        .unwrap_or_default();
                    context.push_str(&format!("## {source}\n{content}\n\n"));
                }
                context
            }
        };
        let context = if amendment.is_empty() {
            context
        } else {
            format!("{context}## {HITL_RESPONSE}\n{amendment}\n")
        };
        if !context.is_empty() {
            variables.insert(spec.context_variable.clone(), bounded(context, max));
        }
        Ok(pb::TaskSpec {
            agent_type: spec.agent_type.clone(),
            variables: variables.into_iter().collect(),
            template_override: spec.prompt_template.clone(),
            parameters: spec.parameters.to_wire(),
            project_id: record.run.project_id.clone(),
            workflow_id: record.run.workflow_id.clone(),
            correlation_id: record.run.correlation_id.clone(),
            cache_policy: record.run.cache_policy,
            idempotency_key: String::new(),
            record: None,
        })
    }

    /// Records what a step's execution gave.
    async fn settle(
        &self,
        record: &mut RunRecord,
        name: &str,
        outcome: Outcome,
        started: StdInstant,
    ) -> Result<(), WorkflowError> {
        let Some(spec) = self.spec(name).cloned() else {
            return Ok(());
        };
        let Some(mut row) = record.steps.iter().find(|step| step.name == name).cloned() else {
            return Ok(());
        };
        metrics::histogram!("agentmesh_gateway_workflow_step_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        row.completed_at_micros = Some(now_micros());
        let outcome = match outcome {
            Outcome::Answered(response) if response.degraded && !spec.allow_fallback => {
                Outcome::Failed(Status::unavailable(format!(
                    "only the fallback agent answered ({}) and the step does not allow fallback",
                    response.degraded_reason
                )))
            }
            other => other,
        };
        let running = vec![state(pb::StepState::Running)];
        match outcome {
            Outcome::Answered(response) => {
                let response = *response;
                let usage = response.usage.unwrap_or_default();
                let provider = response.provider.unwrap_or_default();
                row.output = Some(response.output.clone());
                row.execution_id = response.execution_id;
                row.node_id = response.node_id;
                row.prompt_tokens = usage.prompt_tokens;
                row.completion_tokens = usage.completion_tokens;
                row.provider = provider.provider;
                row.model = provider.model;
                row.offline = provider.offline;
                row.degraded = response.degraded;
                row.degraded_reason = response.degraded_reason;
                row.cache_hit = response.cache_hit;
                row.agent_calls = i32::try_from(response.attempts).unwrap_or(i32::MAX);
                if spec.approve_output {
                    metrics::counter!("agentmesh_gateway_workflow_steps_total", "outcome" => "awaiting_approval").increment(1);
                    return self
                        .hold_for_approval(
                            record,
                            row,
                            pb::ApprovalGate::Output,
                            Some(state(pb::StepState::Running)),
                        )
                        .await;
                }
                metrics::counter!("agentmesh_gateway_workflow_steps_total", "outcome" => "succeeded").increment(1);
                row.state = state(pb::StepState::Succeeded);
                self.workflows
                    .commit(
                        record,
                        Change {
                            step: Some((row, running)),
                            artifact: Some(artifact::Model {
                                run_id: record.run.run_id.clone(),
                                name: spec.creates.clone(),
                                kind: pb::WorkflowArtifactKind::StepOutput as i32,
                                step: name.to_owned(),
                                content: response.output,
                                version: 1,
                                updated_at_micros: 0,
                            }),
                            event: Some(NewEvent {
                                kind: pb::WorkflowEventKind::StepSucceeded as i32,
                                step: name.to_owned(),
                                step_state: state(pb::StepState::Succeeded),
                                ..NewEvent::default()
                            }),
                            ..Change::default()
                        },
                    )
                    .await?;
            }
            Outcome::Failed(status) => {
                metrics::counter!("agentmesh_gateway_workflow_steps_total", "outcome" => "failed")
                    .increment(1);
                row.state = state(pb::StepState::Failed);
                row.error_code = status.code() as i32;
                row.error_message = status.message().to_owned();
                let message = format!(
                    "{}: {}",
                    agentmesh_telemetry::code_name(status.code()),
                    status.message()
                );
                self.workflows
                    .commit(
                        record,
                        Change {
                            step: Some((row, running)),
                            event: Some(NewEvent {
                                kind: pb::WorkflowEventKind::StepFailed as i32,
                                step: name.to_owned(),
                                step_state: state(pb::StepState::Failed),
                                message,
                                ..NewEvent::default()
                            }),
                            ..Change::default()
                        },
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Marks every unfinished step `to` (with an event each).
    async fn close_steps(
        &self,
        record: &mut RunRecord,
        running_to: pb::StepState,
        waiting_to: pb::StepState,
        why: &str,
    ) -> Result<(), WorkflowError> {
        let open: Vec<step::Model> = record
            .steps
            .iter()
            .filter(|step| {
                [
                    state(pb::StepState::Running),
                    state(pb::StepState::Pending),
                    state(pb::StepState::AwaitingApproval),
                ]
                .contains(&step.state)
            })
            .cloned()
            .collect();
        for mut row in open {
            let previous = row.state;
            let to = if previous == state(pb::StepState::Running) {
                running_to
            } else {
                waiting_to
            };
            row.state = to as i32;
            row.gate = 0;
            if previous == state(pb::StepState::Running) {
                row.completed_at_micros = Some(now_micros());
            }
            let name = row.name.clone();
            let kind = if to == pb::StepState::Skipped {
                pb::WorkflowEventKind::StepSkipped
            } else {
                pb::WorkflowEventKind::StepCancelled
            };
            self.workflows
                .commit(
                    record,
                    Change {
                        step: Some((row, vec![previous])),
                        event: Some(NewEvent {
                            kind: kind as i32,
                            step: name,
                            step_state: to as i32,
                            message: why.to_owned(),
                            ..NewEvent::default()
                        }),
                        ..Change::default()
                    },
                )
                .await?;
        }
        Ok(())
    }

    async fn finish(
        &self,
        record: &mut RunRecord,
        final_state: pb::WorkflowState,
        error: String,
        actor: String,
    ) -> Result<(), WorkflowError> {
        let label = match final_state {
            pb::WorkflowState::Succeeded => "succeeded",
            pb::WorkflowState::Failed => "failed",
            _ => "cancelled",
        };
        metrics::counter!("agentmesh_gateway_workflow_runs_finished_total", "state" => label)
            .increment(1);
        tracing::info!(
            run_id = record.run.run_id,
            state = label,
            error,
            "workflow run finished"
        );
        self.workflows
            .commit(
                record,
                Change {
                    run_state: Some(final_state as i32),
                    run_error: Some(error.clone()),
                    event: Some(NewEvent {
                        kind: pb::WorkflowEventKind::RunFinished as i32,
                        message: error,
                        actor,
                        ..NewEvent::default()
                    }),
                    ..Change::default()
                },
            )
            .await?;
        Ok(())
    }

    async fn finish_succeeded(&self, record: &mut RunRecord) -> Result<(), WorkflowError> {
        self.finish(
            record,
            pb::WorkflowState::Succeeded,
            String::new(),
            String::new(),
        )
        .await
    }

    async fn finish_failed(
        &self,
        record: &mut RunRecord,
        failed: &step::Model,
    ) -> Result<(), WorkflowError> {
        let error = format!(
            "step {:?} ({}) failed: {}: {}",
            failed.name,
            failed.agent_type,
            agentmesh_telemetry::code_name(Code::from(failed.error_code)),
            failed.error_message
        );
        let why = format!("step {:?} failed", failed.name);
        self.close_steps(
            record,
            pb::StepState::Cancelled,
            pb::StepState::Skipped,
            &why,
        )
        .await?;
        self.finish(record, pb::WorkflowState::Failed, error, String::new())
            .await
    }

    async fn finish_cancelled(&self, record: &mut RunRecord) -> Result<(), WorkflowError> {
        self.reload(record).await?;
        let actor = record.run.cancel_actor.clone();
        let error = if record.run.cancel_reason.is_empty() {
            format!("cancelled by {actor}")
        } else {
            format!("cancelled by {actor}: {}", record.run.cancel_reason)
        };
        self.close_steps(
            record,
            pb::StepState::Cancelled,
            pb::StepState::Cancelled,
            &error,
        )
        .await?;
        self.finish(record, pb::WorkflowState::Cancelled, error, actor)
            .await
    }
}

impl Workflows {
    /// Records that the fallback agent answers a step (best-effort: the
    /// step's own result is what counts).
    async fn fallback_event(&self, run_id: &str, step: &str, reason: &str) {
        let applied = self
            .store
            .apply(
                run_id,
                Change {
                    event: Some(NewEvent {
                        kind: pb::WorkflowEventKind::StepFallback as i32,
                        step: step.to_owned(),
                        step_state: state(pb::StepState::Running),
                        message: reason.to_owned(),
                        ..NewEvent::default()
                    }),
                    ..Change::default()
                },
            )
            .await;
        if let Err(error) = applied {
            tracing::warn!(run_id, step, %error, "could not record the fallback event");
        }
        let _ = self.changes.send(run_id.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_context_is_cut_on_a_character_boundary_and_marked() {
        let text = "é".repeat(100);
        let cut = bounded(text.clone(), 51);
        assert!(cut.len() <= 51, "{}", cut.len());
        assert!(cut.ends_with("[… truncated]"));
        assert_eq!(bounded("short".to_owned(), 51), "short");
    }

    #[test]
    fn the_fallback_never_answers_the_callers_own_mistakes() {
        for code in [
            Code::Unavailable,
            Code::FailedPrecondition,
            Code::DeadlineExceeded,
        ] {
            assert!(fallback_may_answer(code), "{code:?}");
        }
        for code in [Code::InvalidArgument, Code::NotFound, Code::Cancelled] {
            assert!(!fallback_may_answer(code), "{code:?}");
        }
    }
}
