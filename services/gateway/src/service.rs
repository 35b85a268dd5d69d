//! The gateway's logic: choose a node (power of two choices over each
//! node's load among nodes whose breaker allows a call), call it through
//! its breaker within the caller's deadline, retry on another node when a
//! try failed before any output (within `gateway.max_attempts` and the
//! retry budget), and fall back to the in-process `local` agent when no
//! node can serve.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agentmesh_agent::provider::Finish;
use agentmesh_agent::service::ExecuteSpec;
use agentmesh_client::ConfigWatcher;
use agentmesh_proto::agent as agent_pb;
use agentmesh_proto::common as common_pb;
use agentmesh_proto::gateway as pb;
use agentmesh_resilience::{Breaker, BreakerConfig, BreakerError, BreakerState, FieldViolation};
use agentmesh_settings::LiveSettings;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::retry::budget::{Budget, TpsBudget};
use tracing::Instrument;

use crate::around::{Around, Rpc, TaskScope};
use crate::budget::Budgets;
use crate::error::GatewayError;
use crate::fallback::Fallback;
use crate::fleet::Fleet;
use crate::metadata::CallMeta;
use crate::node::{InFlight, Node, NodeState, breaker_config, pick};
/// Most tasks in one batch.
pub const MAX_BATCH_TASKS: usize = 100;
/// Longest degraded reason returned.
const MAX_REASON_BYTES: usize = 1024;
/// Stream messages buffered towards the caller.
const STREAM_BUFFER: usize = 64;

/// What one attempt on a node gave.
enum Attempt<T> {
    /// The node served the task.
    Served(T),
    /// The node answered with an error that is the caller's (passed on).
    Refused(Status),
    /// The node failed in a way that says it is unhealthy, or its breaker
    /// is open: try another node.
    Unhealthy(String),
}

/// Where routing a task ended when no node refused it.
enum Routed<T> {
    /// A node served it after `attempts` calls.
    Served { value: T, attempts: u32 },
    /// No node could serve it: every try failed, every breaker was open,
    /// or the retry budget ran out.
    NoNode { reason: String, attempts: u32 },
}

/// How the gateway retries.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Agent calls per task at most.
    pub max_attempts: u32,
    /// Retries as a fraction of first tries (over 10 s).
    pub budget_ratio: f32,
    /// Retries per second allowed whatever the traffic.
    pub min_per_second: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 2,
            budget_ratio: 0.2,
            min_per_second: 10,
        }
    }
}

/// The gateway.
pub struct Gateway {
    gateway_id: String,
    fleet: Arc<Fleet>,
    watcher: ConfigWatcher,
    fallback: Option<Fallback>,
    max_attempts: usize,
    retry_budget: TpsBudget,
    around: Arc<Around>,
    budgets: Option<Arc<Budgets>>,
}

/// A task checked and converted for the agent service.
struct Task {
    task_id: String,
    wire: agent_pb::ExecutionSpec,
    spec: ExecuteSpec,
    field: String,
}

impl Gateway {
    /// A gateway over `nodes`, reading live settings from `watcher`;
    /// `fallback` answers when no node can; `around` caches and audits
    /// every task.
    pub fn new(
        gateway_id: String,
        fleet: Arc<Fleet>,
        watcher: ConfigWatcher,
        fallback: Option<Fallback>,
        retry: RetryPolicy,
        around: Around,
    ) -> Self {
        Self {
            gateway_id,
            fleet,
            watcher,
            fallback,
            max_attempts: usize::try_from(retry.max_attempts.max(1)).unwrap_or(1),
            retry_budget: TpsBudget::new(
                Duration::from_secs(10),
                retry.min_per_second,
                retry.budget_ratio.clamp(0.0, 1.0),
            ),
            around: Arc::new(around),
            budgets: None,
        }
    }

    /// Checks each task against its project's token budget before it runs
    /// and counts its tokens after.
    pub fn with_budgets(mut self, budgets: Arc<Budgets>) -> Self {
        self.budgets = Some(budgets);
        self
    }

    /// The response cache and audit trail around every task.
    pub fn around(&self) -> &Around {
        &self.around
    }

    /// The agent nodes.
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Routes one task: picks nodes and runs `attempt` on each until one
    /// serves it, one refuses it (the caller's error, passed on), the
    /// attempts or the retry budget run out, or the deadline passes.
    async fn route<T, F, Fut>(
        &self,
        task: &Task,
        deadline: Option<Instant>,
        config: BreakerConfig,
        started: Instant,
        mut attempt: F,
    ) -> Result<Routed<T>, GatewayError>
    where
        F: FnMut(Arc<Node>) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let nodes = self.fleet.nodes();
        let mut tried: Vec<Arc<Node>> = Vec::with_capacity(self.max_attempts);
        let mut reasons = Vec::new();
        let mut attempts = 0_u32;
        self.retry_budget.deposit();
        while tried.len() < self.max_attempts {
            ensure_time_left(deadline)?;
            let Some(node) = pick(&nodes, &tried, config) else {
                break;
            };
            if !tried.is_empty() && !self.retry_budget.withdraw() {
                metrics::counter!("agentmesh_gateway_retries_refused_total").increment(1);
                reasons.push("retry budget exhausted".to_owned());
                break;
            }
            tried.push(Arc::clone(&node));
            attempts += 1;
            match attempt(Arc::clone(&node)).await {
                Attempt::Served(value) => return Ok(Routed::Served { value, attempts }),
                Attempt::Refused(status) => {
                    observe(
                        agentmesh_telemetry::code_name(status.code()),
                        attempts,
                        started,
                    );
                    return Err(upstream(status, deadline, &task.field));
                }
                Attempt::Unhealthy(reason) => {
                    reasons.push(format!("{}: {reason}", node.endpoint()));
                }
            }
        }
        ensure_time_left(deadline)?;
        let reason = if nodes.is_empty() {
            "no agent nodes known (check gateway.agent_endpoints and DNS)".to_owned()
        } else {
            no_node_reason(&reasons)
        };
        Ok(Routed::NoNode { reason, attempts })
    }

    /// This gateway's id.
    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    fn live(&self, spec: &ExecuteSpec) -> LiveSettings {
        self.watcher
            .effective(Some(&spec.agent_type), Some(&spec.project_id))
    }

    fn check(
        &self,
        task: Option<pb::TaskSpec>,
        field: &str,
        scope: &TaskScope,
    ) -> Result<Task, GatewayError> {
        let Some(task) = task else {
            return Err(GatewayError::Invalid(vec![FieldViolation::new(
                field,
                "unset",
                "is required",
            )]));
        };
        let task_id = scope.task_id().to_owned();
        if pb::CachePolicy::try_from(task.cache_policy).is_err() {
            return Err(GatewayError::Invalid(vec![FieldViolation::new(
                format!("{field}.cache_policy"),
                task.cache_policy.to_string(),
                "must be a known CachePolicy",
            )]));
        }
        if task.idempotency_key.len() > 128 {
            return Err(GatewayError::Invalid(vec![FieldViolation::new(
                format!("{field}.idempotency_key"),
                format!("{} bytes", task.idempotency_key.len()),
                "must be at most 128 bytes",
            )]));
        }
        let correlation_id = scope.correlation_id().to_owned();
        let wire = agent_pb::ExecutionSpec {
            agent_type: task.agent_type,
            variables: task.variables,
            template_override: task.template_override,
            parameters: task.parameters,
            project_id: task.project_id,
            workflow_id: task.workflow_id,
            correlation_id,
            record: task.record,
        };
        let spec = agentmesh_agent::grpc::spec_from_wire(Some(wire.clone()), field)
            .map_err(GatewayError::Invalid)?;
        Ok(Task {
            task_id,
            wire,
            spec,
            field: field.to_owned(),
        })
    }

    /// Runs one task within its project's token budget; `field` names it
    /// in errors (`task`, `tasks[3]`).
    pub async fn execute(
        &self,
        task: Option<pb::TaskSpec>,
        field: &str,
        deadline: Option<Instant>,
        call: &CallMeta,
        rpc: Rpc,
    ) -> Result<pb::ExecuteTaskResponse, GatewayError> {
        let scope = self.around.begin(call, rpc, task.as_ref())?;
        let span = task_span(task.as_ref(), rpc, scope.correlation_id());
        let mut result = self
            .execute_routed(task, field, deadline, &scope)
            .instrument(span.clone())
            .await;
        record_task_outcome(&span, &result);
        self.around.finish(scope, &mut result);
        result
    }

    async fn execute_routed(
        &self,
        task: Option<pb::TaskSpec>,
        field: &str,
        deadline: Option<Instant>,
        scope: &TaskScope,
    ) -> Result<pb::ExecuteTaskResponse, GatewayError> {
        let Some(budgets) = &self.budgets else {
            return self.execute_on_nodes(task, field, deadline, scope).await;
        };
        let project = task
            .as_ref()
            .map(|task| task.project_id.clone())
            .unwrap_or_default();
        budgets.admit(&project).await?;
        let response = self.execute_on_nodes(task, field, deadline, scope).await?;
        budgets.record(&project, response.usage.as_ref());
        Ok(response)
    }

    async fn execute_on_nodes(
        &self,
        task: Option<pb::TaskSpec>,
        field: &str,
        deadline: Option<Instant>,
        scope: &TaskScope,
    ) -> Result<pb::ExecuteTaskResponse, GatewayError> {
        let started = Instant::now();
        let deadline = working_deadline(deadline);
        let task = self.check(task, field, scope)?;
        let live = self.live(&task.spec);
        if let Some(hit) = self.around.cached(scope, &task.spec, &live, deadline).await {
            observe("cache_hit", 0, started);
            return Ok(hit);
        }
        let config = breaker_config(&live);
        let routed = self
            .route(&task, deadline, config, started, |node| {
                scope.upstream(self.call_unary(node, &task, deadline, config))
            })
            .await?;
        let (reason, attempts) = match routed {
            Routed::Served {
                value: response,
                attempts,
            } => {
                let outcome = Ok(pb::ExecuteTaskResponse {
                    task_id: task.task_id,
                    execution_id: response.execution_id,
                    output: response.output,
                    usage: response.usage,
                    provider: response.provider,
                    node_id: response.node_id,
                    degraded: false,
                    degraded_reason: String::new(),
                    cache_hit: false,
                    attempts,
                    finish_reason: response.finish_reason,
                    latency: Some(duration(started.elapsed())),
                    trace_id: trace_id(),
                });
                observe("served", attempts, started);
                return outcome;
            }
            Routed::NoNode { reason, attempts } => (reason, attempts),
        };
        let Some(fallback) = &self.fallback else {
            observe("unavailable", attempts, started);
            return Err(GatewayError::Unavailable(reason));
        };
        let completion = scope
            .upstream(fallback.execute(&task.spec, &live, &task.field, deadline, None))
            .await?;
        observe("degraded", attempts, started);
        Ok(pb::ExecuteTaskResponse {
            task_id: task.task_id,
            execution_id: String::new(),
            usage: Some(usage(&completion.usage)),
            provider: Some(local_provider(&completion.model)),
            output: completion.output,
            node_id: self.gateway_id.clone(),
            degraded: true,
            degraded_reason: reason,
            cache_hit: false,
            attempts,
            finish_reason: finish_number(completion.finish),
            latency: Some(duration(started.elapsed())),
            trace_id: trace_id(),
        })
    }

    async fn call_unary(
        &self,
        node: Arc<Node>,
        task: &Task,
        deadline: Option<Instant>,
        config: BreakerConfig,
    ) -> Attempt<agent_pb::ExecuteResponse> {
        let breaker = node.breaker(config);
        let _in_flight = node.start_call();
        let mut request = tonic::Request::new(agent_pb::ExecuteRequest {
            spec: Some(task.wire.clone()),
        });
        let remaining = deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
        if let Some(remaining) = remaining {
            request.set_timeout(remaining);
        }
        let mut client = node.client();
        let call = async {
            let sent = Instant::now();
            let result = within(remaining, client.execute(request)).await;
            let outcome = classify(result.map(tonic::Response::into_inner), deadline);
            note(&node, &outcome, sent.elapsed(), |response| {
                &response.node_id
            });
            outcome
        };
        settle(&node, breaker.call(call).await)
    }

    /// Runs one task within its project's token budget and streams its
    /// output; retries happen only before the first message from a node.
    pub async fn execute_stream(
        self: &Arc<Self>,
        task: Option<pb::TaskSpec>,
        deadline: Option<Instant>,
        call: &CallMeta,
    ) -> Result<mpsc::Receiver<Result<pb::ExecuteTaskStreamResponse, Status>>, GatewayError> {
        let scope = self
            .around
            .begin(call, Rpc::ExecuteTaskStream, task.as_ref())?;
        let result = self.execute_stream_routed(task, deadline, &scope).await;
        self.around.finish_stream(scope, result)
    }

    async fn execute_stream_routed(
        self: &Arc<Self>,
        task: Option<pb::TaskSpec>,
        deadline: Option<Instant>,
        scope: &TaskScope,
    ) -> Result<mpsc::Receiver<Result<pb::ExecuteTaskStreamResponse, Status>>, GatewayError> {
        let Some(budgets) = self.budgets.clone() else {
            return self.stream_on_nodes(task, deadline, scope).await;
        };
        let project = task
            .as_ref()
            .map(|task| task.project_id.clone())
            .unwrap_or_default();
        budgets.admit(&project).await?;
        let mut routed = self.stream_on_nodes(task, deadline, scope).await?;
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    // The caller went away: dropping `routed` cancels the task.
                    () = sender.closed() => return,
                    message = routed.recv() => message,
                };
                let Some(message) = message else { return };
                if let Ok(pb::ExecuteTaskStreamResponse {
                    event: Some(pb::execute_task_stream_response::Event::Completion(done)),
                    ..
                }) = &message
                {
                    budgets.record(&project, done.usage.as_ref());
                }
                if sender.send(message).await.is_err() {
                    return;
                }
            }
        });
        Ok(receiver)
    }

    async fn stream_on_nodes(
        self: &Arc<Self>,
        task: Option<pb::TaskSpec>,
        deadline: Option<Instant>,
        scope: &TaskScope,
    ) -> Result<mpsc::Receiver<Result<pb::ExecuteTaskStreamResponse, Status>>, GatewayError> {
        let started = Instant::now();
        let deadline = working_deadline(deadline);
        let task = self.check(task, "task", scope)?;
        let live = self.live(&task.spec);
        if let Some(hit) = self.around.cached(scope, &task.spec, &live, deadline).await {
            observe("cache_hit", 0, started);
            return Ok(Around::hit_stream(hit));
        }
        let config = breaker_config(&live);
        let routed = self
            .route(&task, deadline, config, started, |node| {
                scope.upstream(self.open_stream(node, &task, deadline, config))
            })
            .await?;
        let (reason, attempts) = match routed {
            Routed::Served {
                value: (first, stream, in_flight),
                attempts,
            } => {
                let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
                tokio::spawn(forward(
                    first,
                    stream,
                    in_flight,
                    sender,
                    task.task_id,
                    attempts,
                    started,
                ));
                observe("served", attempts, started);
                return Ok(receiver);
            }
            Routed::NoNode { reason, attempts } => (reason, attempts),
        };
        if self.fallback.is_none() {
            observe("unavailable", attempts, started);
            return Err(GatewayError::Unavailable(reason));
        }
        observe("degraded", attempts, started);
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let gateway = Arc::clone(self);
        tokio::spawn(async move {
            gateway
                .stream_fallback(task, live, deadline, reason, attempts, started, sender)
                .await;
        });
        Ok(receiver)
    }

    async fn open_stream(
        &self,
        node: Arc<Node>,
        task: &Task,
        deadline: Option<Instant>,
        config: BreakerConfig,
    ) -> Attempt<(
        agent_pb::ExecuteStreamResponse,
        tonic::Streaming<agent_pb::ExecuteStreamResponse>,
        InFlight,
    )> {
        let breaker = node.breaker(config);
        let in_flight = node.start_call();
        let mut request = tonic::Request::new(agent_pb::ExecuteStreamRequest {
            spec: Some(task.wire.clone()),
        });
        let remaining = deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
        if let Some(remaining) = remaining {
            request.set_timeout(remaining);
        }
        let mut client = node.client();
        let call = async {
            let sent = Instant::now();
            let opened = within(remaining, async {
                let mut stream = client.execute_stream(request).await?.into_inner();
                match stream.message().await? {
                    Some(first) => Ok((first, stream)),
                    None => Err(Status::unavailable(
                        "the agent node closed the stream before any output",
                    )),
                }
            })
            .await;
            let outcome = classify(opened, deadline);
            note(&node, &outcome, sent.elapsed(), |(first, _)| &first.node_id);
            outcome
        };
        match settle(&node, breaker.call(call).await) {
            Attempt::Served((first, stream)) => Attempt::Served((first, stream, in_flight)),
            Attempt::Refused(status) => Attempt::Refused(status),
            Attempt::Unhealthy(reason) => Attempt::Unhealthy(reason),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn stream_fallback(
        &self,
        task: Task,
        live: LiveSettings,
        deadline: Option<Instant>,
        reason: String,
        attempts: u32,
        started: Instant,
        sender: mpsc::Sender<Result<pb::ExecuteTaskStreamResponse, Status>>,
    ) {
        let Some(fallback) = &self.fallback else {
            return;
        };
        let (deltas, mut pieces) = mpsc::channel::<String>(STREAM_BUFFER);
        let node_id = self.gateway_id.clone();
        let task_id = task.task_id.clone();
        let relay = {
            let sender = sender.clone();
            let node_id = node_id.clone();
            let task_id = task_id.clone();
            async move {
                while let Some(piece) = pieces.recv().await {
                    let message = pb::ExecuteTaskStreamResponse {
                        task_id: task_id.clone(),
                        node_id: node_id.clone(),
                        event: Some(pb::execute_task_stream_response::Event::TextDelta(piece)),
                    };
                    if sender.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
            }
        };
        let generate = async {
            let outcome = fallback
                .execute(&task.spec, &live, &task.field, deadline, Some(&deltas))
                .await;
            drop(deltas);
            outcome
        };
        let (outcome, ()) = tokio::join!(generate, relay);
        let message = match outcome {
            Ok(completion) => Ok(pb::ExecuteTaskStreamResponse {
                task_id,
                node_id,
                event: Some(pb::execute_task_stream_response::Event::Completion(
                    pb::TaskStreamCompletion {
                        execution_id: String::new(),
                        usage: Some(usage(&completion.usage)),
                        provider: Some(local_provider(&completion.model)),
                        degraded: true,
                        degraded_reason: reason,
                        cache_hit: false,
                        attempts,
                        finish_reason: finish_number(completion.finish),
                        latency: Some(duration(started.elapsed())),
                        trace_id: trace_id(),
                    },
                )),
            }),
            Err(error) => Err(Status::from(GatewayError::from(error))),
        };
        let _ = sender.send(message).await;
    }

    /// Runs a batch: at most `max_concurrency` tasks at once (capped by
    /// the live `batch.max_concurrency`), one result per task in order.
    pub async fn execute_batch(
        &self,
        tasks: Vec<pb::TaskSpec>,
        max_concurrency: Option<u32>,
        deadline: Option<Instant>,
        call: &CallMeta,
    ) -> Result<Vec<pb::TaskResult>, GatewayError> {
        let mut violations = Vec::new();
        if tasks.is_empty() || tasks.len() > MAX_BATCH_TASKS {
            violations.push(FieldViolation::new(
                "tasks",
                format!("{} entries", tasks.len()),
                format!("must have 1 to {MAX_BATCH_TASKS} entries"),
            ));
        }
        if max_concurrency == Some(0) {
            violations.push(FieldViolation::new(
                "max_concurrency",
                "0",
                "must be at least 1",
            ));
        }
        if !violations.is_empty() {
            return Err(GatewayError::Invalid(violations));
        }
        let configured = self
            .watcher
            .effective(None, None)
            .batch
            .max_concurrency
            .max(1);
        let configured = usize::try_from(configured).unwrap_or(1);
        let concurrency = max_concurrency
            .map_or(configured, |asked| (asked as usize).min(configured))
            .max(1);
        let results = futures::stream::iter(tasks.into_iter().enumerate())
            .map(|(index, task)| async move {
                let field = format!("tasks[{index}]");
                let result = match self
                    .execute(Some(task), &field, deadline, call, Rpc::ExecuteBatch)
                    .await
                {
                    Ok(response) => pb::task_result::Result::Response(response),
                    Err(error) => pb::task_result::Result::Error(
                        agentmesh_agent::grpc::error_status(&Status::from(error)),
                    ),
                };
                pb::TaskResult {
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    result: Some(result),
                }
            })
            .buffered(concurrency)
            .collect()
            .await;
        Ok(results)
    }

    /// Every node's breaker, sorted by node id.
    pub fn circuits(&self) -> Vec<NodeState> {
        let config = breaker_config(&self.watcher.effective(None, None));
        let mut states: Vec<NodeState> = self
            .fleet
            .nodes()
            .iter()
            .map(|node| node.state(config))
            .collect();
        states.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        states
    }

    /// Runs one task on the in-process fallback agent only (degraded,
    /// `degraded_reason = reason`), for callers that allow it after the
    /// nodes failed the task (workflow steps with `allow_fallback`).
    /// UNAVAILABLE when no fallback agent is configured.
    pub async fn execute_fallback(
        &self,
        task: Option<pb::TaskSpec>,
        field: &str,
        deadline: Option<Instant>,
        reason: String,
        call: &CallMeta,
        rpc: Rpc,
    ) -> Result<pb::ExecuteTaskResponse, GatewayError> {
        let scope = self.around.begin(call, rpc, task.as_ref())?;
        let mut result = self
            .execute_fallback_only(task, field, deadline, reason, &scope)
            .await;
        self.around.finish(scope, &mut result);
        result
    }

    async fn execute_fallback_only(
        &self,
        task: Option<pb::TaskSpec>,
        field: &str,
        deadline: Option<Instant>,
        reason: String,
        scope: &TaskScope,
    ) -> Result<pb::ExecuteTaskResponse, GatewayError> {
        let started = Instant::now();
        let deadline = working_deadline(deadline);
        let task = self.check(task, field, scope)?;
        let Some(fallback) = &self.fallback else {
            return Err(GatewayError::Unavailable(reason));
        };
        let live = self.live(&task.spec);
        let completion = scope
            .upstream(fallback.execute(&task.spec, &live, &task.field, deadline, None))
            .await?;
        observe("degraded", 0, started);
        Ok(pb::ExecuteTaskResponse {
            task_id: task.task_id,
            execution_id: String::new(),
            usage: Some(usage(&completion.usage)),
            provider: Some(local_provider(&completion.model)),
            output: completion.output,
            node_id: self.gateway_id.clone(),
            degraded: true,
            degraded_reason: reason,
            cache_hit: false,
            attempts: 0,
            finish_reason: finish_number(completion.finish),
            latency: Some(duration(started.elapsed())),
            trace_id: trace_id(),
        })
    }

    /// `GetCircuitStates` as the wire wants it.
    pub fn circuit_states(&self) -> pb::GetCircuitStatesResponse {
        pb::GetCircuitStatesResponse {
            gateway_id: self.gateway_id.clone(),
            nodes: self
                .circuits()
                .into_iter()
                .map(|node| pb::NodeCircuit {
                    node_id: node.node_id,
                    endpoint: node.endpoint,
                    state: circuit_state(node.state) as i32,
                    consecutive_failures: node.consecutive_failures,
                    opened_at: node.opened_at.map(timestamp),
                    in_flight: node.in_flight,
                    state_changed_at: Some(timestamp(node.state_changed_at)),
                    recent_successes: node.recent_successes,
                    recent_failures: node.recent_failures,
                    state_reason: node.reason,
                    next_probe_at: node.next_probe_at.map(timestamp),
                    latency_estimate: Some(duration(node.latency)),
                    reported_in_flight: node.reported.map(|load| load.in_flight),
                    reported_queued: node.reported.map(|load| load.queued),
                    reported_capacity: node.reported.map(|load| load.capacity),
                    draining: node.draining,
                    source: node.source,
                })
                .collect(),
        }
    }
}

/// Forwards a node's stream to the caller, rewriting ids and completing
/// the summary; dropping the caller's side cancels the node's stream.
async fn forward(
    first: agent_pb::ExecuteStreamResponse,
    mut stream: tonic::Streaming<agent_pb::ExecuteStreamResponse>,
    in_flight: InFlight,
    sender: mpsc::Sender<Result<pb::ExecuteTaskStreamResponse, Status>>,
    task_id: String,
    attempts: u32,
    started: Instant,
) {
    let _in_flight = in_flight;
    let mut next = Some(first);
    loop {
        let message = match next.take() {
            Some(message) => message,
            None => match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => return,
                Err(status) => {
                    let _ = sender.send(Err(status)).await;
                    return;
                }
            },
        };
        let event = message.event.map(|event| match event {
            agent_pb::execute_stream_response::Event::TextDelta(text) => {
                pb::execute_task_stream_response::Event::TextDelta(text)
            }
            agent_pb::execute_stream_response::Event::Completion(done) => {
                pb::execute_task_stream_response::Event::Completion(pb::TaskStreamCompletion {
                    execution_id: message.execution_id.clone(),
                    usage: done.usage,
                    provider: done.provider,
                    degraded: false,
                    degraded_reason: String::new(),
                    cache_hit: false,
                    attempts,
                    finish_reason: done.finish_reason,
                    latency: Some(duration(started.elapsed())),
                    trace_id: trace_id(),
                })
            }
        });
        let out = pb::ExecuteTaskStreamResponse {
            task_id: task_id.clone(),
            node_id: message.node_id,
            event,
        };
        if sender.send(Ok(out)).await.is_err() {
            return;
        }
    }
}

/// Awaits `future`, bounded by `remaining` when the caller has a deadline.
async fn within<T>(
    remaining: Option<Duration>,
    future: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match remaining {
        Some(remaining) => tokio::time::timeout(remaining, future)
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(
                    "the caller's deadline passed while waiting on the agent node",
                ))
            }),
        None => future.await,
    }
}

/// Splits an agent call's outcome for the breaker: `Err` are failures that
/// say the node is unhealthy (UNAVAILABLE, RESOURCE_EXHAUSTED,
/// DEADLINE_EXCEEDED, connection errors: they count); `Ok(Err)` are the
/// caller's own errors (INVALID_ARGUMENT, NOT_FOUND…) and anything after
/// the caller's deadline passed (they do not count).
fn classify<T>(
    result: Result<T, Status>,
    deadline: Option<Instant>,
) -> Result<Result<T, Status>, Status> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(status) => {
            let caller_deadline_passed = deadline
                .is_some_and(|deadline| Instant::now() + Duration::from_millis(1) >= deadline);
            // Once the caller's deadline passed, whatever the node says
            // (DEADLINE_EXCEEDED, or CANCELLED from its timeout layer) is
            // the caller's budget running out, not the node's health.
            let unhealthy = !caller_deadline_passed
                && matches!(
                    status.code(),
                    Code::Unavailable
                        | Code::ResourceExhausted
                        | Code::Unknown
                        | Code::Cancelled
                        | Code::DeadlineExceeded
                );
            if unhealthy {
                Err(status)
            } else {
                Ok(Err(status))
            }
        }
    }
}

/// Records a classified outcome on the node, inside the breaker call (so
/// that a transition it causes can be explained).
fn note<T>(
    node: &Node,
    outcome: &Result<Result<T, Status>, Status>,
    elapsed: Duration,
    node_id: impl Fn(&T) -> &String,
) {
    match outcome {
        Ok(Ok(value)) => node.note_answered(node_id(value), elapsed),
        Ok(Err(_)) => node.note_answered("", elapsed),
        Err(status) => node.note_failure(status),
    }
}

/// Turns a breaker-guarded call's outcome into an attempt.
fn settle<T>(node: &Node, outcome: Result<Result<T, Status>, BreakerError<Status>>) -> Attempt<T> {
    match outcome {
        Ok(Ok(value)) => Attempt::Served(value),
        Ok(Err(status)) => Attempt::Refused(status),
        Err(BreakerError::Rejected) => Attempt::Unhealthy("circuit breaker open".to_owned()),
        Err(BreakerError::Inner(status)) => {
            tracing::warn!(
                endpoint = node.endpoint(),
                code = agentmesh_telemetry::code_name(status.code()),
                message = status.message(),
                "agent node call failed"
            );
            Attempt::Unhealthy(format!(
                "{} ({})",
                agentmesh_telemetry::code_name(status.code()),
                status.message()
            ))
        }
    }
}

/// A node's refusal, or DEADLINE_EXCEEDED when the caller's deadline
/// passed. Field paths in INVALID_ARGUMENT name the gateway's request
/// (`task.…`, `tasks[3].…`), not the agent's (`spec.…`).
fn upstream(status: Status, deadline: Option<Instant>, field: &str) -> GatewayError {
    if status.code() == Code::DeadlineExceeded
        || deadline.is_some_and(|deadline| Instant::now() >= deadline)
    {
        return GatewayError::DeadlineExceeded(status.message().to_owned());
    }
    if status.code() == Code::InvalidArgument
        && let Some(bad) = status.get_error_details().bad_request()
        && !bad.field_violations.is_empty()
    {
        let mut details = ErrorDetails::new();
        let mut parts = Vec::with_capacity(bad.field_violations.len());
        for violation in &bad.field_violations {
            let renamed = match violation.field.strip_prefix("spec") {
                Some(rest) if rest.is_empty() || rest.starts_with('.') => format!("{field}{rest}"),
                _ => violation.field.clone(),
            };
            parts.push(format!("{renamed} = {}", violation.description));
            details.add_bad_request_violation(renamed, violation.description.clone());
        }
        return GatewayError::Upstream(Status::with_error_details(
            Code::InvalidArgument,
            format!("invalid request: {}", parts.join("; ")),
            details,
        ));
    }
    GatewayError::Upstream(status)
}

/// The deadline the gateway works to: the caller's, less a margin (a
/// tenth of the time left, at most 50 ms) so that DEADLINE_EXCEEDED
/// reaches the caller before its own timer fires.
fn working_deadline(deadline: Option<Instant>) -> Option<Instant> {
    deadline.map(|deadline| {
        let left = deadline.saturating_duration_since(Instant::now());
        deadline - (left / 10).min(Duration::from_millis(50))
    })
}

fn ensure_time_left(deadline: Option<Instant>) -> Result<(), GatewayError> {
    match deadline {
        Some(deadline) if Instant::now() >= deadline => Err(GatewayError::DeadlineExceeded(
            "no agent node answered in time".to_owned(),
        )),
        _ => Ok(()),
    }
}

fn no_node_reason(reasons: &[String]) -> String {
    let mut reason = if reasons.is_empty() {
        "all agent nodes unavailable: every circuit breaker is open".to_owned()
    } else {
        format!("all agent nodes unavailable: {}", reasons.join("; "))
    };
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

fn observe(outcome: &'static str, attempts: u32, started: Instant) {
    metrics::counter!("agentmesh_gateway_tasks_total", "outcome" => outcome).increment(1);
    metrics::histogram!("agentmesh_gateway_task_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    if attempts > 1 {
        metrics::counter!("agentmesh_gateway_retries_total").increment(u64::from(attempts - 1));
    }
}

fn circuit_state(state: BreakerState) -> common_pb::CircuitState {
    match state {
        BreakerState::Closed => common_pb::CircuitState::Closed,
        BreakerState::Open => common_pb::CircuitState::Open,
        BreakerState::HalfOpen => common_pb::CircuitState::HalfOpen,
    }
}

fn usage(usage: &agentmesh_agent::provider::Usage) -> common_pb::TokenUsage {
    common_pb::TokenUsage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        total_tokens: usage.prompt_tokens + usage.completion_tokens,
    }
}

fn local_provider(model: &str) -> common_pb::ProviderInfo {
    common_pb::ProviderInfo {
        provider: agentmesh_agent::provider::local::NAME.to_owned(),
        model: model.to_owned(),
        offline: true,
    }
}

fn finish_number(finish: Finish) -> i32 {
    match finish {
        Finish::Unknown => common_pb::FinishReason::Unspecified as i32,
        Finish::Stop => common_pb::FinishReason::Stop as i32,
        Finish::Length => common_pb::FinishReason::Length as i32,
        Finish::ContentFilter => common_pb::FinishReason::ContentFilter as i32,
    }
}

fn duration(value: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(value.subsec_nanos()).unwrap_or(0),
    }
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

fn trace_id() -> String {
    agentmesh_telemetry::propagation::current_trace_id().unwrap_or_default()
}

/// The span of one task at the gateway: its cache lookup, node calls and
/// fallback are children, so one trace shows the whole task. Attributes
/// follow the OpenTelemetry GenAI conventions where they apply
/// (`gen_ai.agent.name`, `gen_ai.usage.*`), `agentmesh.*` otherwise.
fn task_span(task: Option<&pb::TaskSpec>, rpc: Rpc, correlation_id: &str) -> tracing::Span {
    let (agent_type, project_id, workflow_id) = task
        .map(|task| {
            (
                task.agent_type.as_str(),
                task.project_id.as_str(),
                task.workflow_id.as_str(),
            )
        })
        .unwrap_or_default();
    tracing::info_span!(
        "gateway_task",
        otel.name = %format!("invoke_agent {agent_type}"),
        otel.kind = "internal",
        gen_ai.operation.name = "invoke_agent",
        gen_ai.agent.name = %agent_type,
        agentmesh.rpc = rpc.name(),
        agentmesh.project_id = %project_id,
        agentmesh.workflow_id = %workflow_id,
        agentmesh.correlation_id = %correlation_id,
        agentmesh.node_id = tracing::field::Empty,
        agentmesh.degraded = tracing::field::Empty,
        agentmesh.cache_hit = tracing::field::Empty,
        agentmesh.attempts = tracing::field::Empty,
        gen_ai.provider.name = tracing::field::Empty,
        gen_ai.response.model = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

fn record_task_outcome(
    span: &tracing::Span,
    result: &Result<pb::ExecuteTaskResponse, GatewayError>,
) {
    match result {
        Ok(response) => {
            span.record("agentmesh.node_id", response.node_id.as_str());
            span.record("agentmesh.degraded", response.degraded);
            span.record("agentmesh.cache_hit", response.cache_hit);
            span.record("agentmesh.attempts", response.attempts);
            if let Some(provider) = &response.provider {
                span.record("gen_ai.provider.name", provider.provider.as_str());
                span.record("gen_ai.response.model", provider.model.as_str());
            }
            if let Some(usage) = &response.usage {
                span.record("gen_ai.usage.input_tokens", usage.prompt_tokens);
                span.record("gen_ai.usage.output_tokens", usage.completion_tokens);
            }
        }
        Err(error) => {
            span.record("error.type", format!("{:?}", error.code()).as_str());
            span.record("otel.status_code", "ERROR");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_node_health_failures_count() {
        let counted = |code: Code, deadline: Option<Instant>| {
            classify::<()>(Err(Status::new(code, "x")), deadline).is_err()
        };
        let later = Some(Instant::now() + Duration::from_secs(60));
        let passed = Some(Instant::now());
        for code in [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
            Code::Unknown,
        ] {
            assert!(counted(code, None), "{code:?}");
            assert!(counted(code, later), "{code:?}");
            assert!(
                !counted(code, passed),
                "{code:?} after the caller's deadline"
            );
        }
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::PermissionDenied,
        ] {
            assert!(!counted(code, None), "{code:?}");
        }
        assert!(matches!(classify(Ok(1), None), Ok(Ok(1))));
    }

    #[test]
    fn node_field_paths_are_renamed_to_the_gateway_request() {
        let status = agentmesh_resilience::invalid_argument(&[FieldViolation::new(
            "spec.variables.x",
            "\"x\"",
            "is not a variable",
        )]);
        let GatewayError::Upstream(renamed) = upstream(status, None, "tasks[2]") else {
            panic!("not passed through");
        };
        assert_eq!(renamed.code(), Code::InvalidArgument);
        assert_eq!(
            renamed.message(),
            "invalid request: tasks[2].variables.x = \"x\": is not a variable"
        );
        let details = renamed.get_error_details();
        assert_eq!(
            details.bad_request().unwrap().field_violations[0].field,
            "tasks[2].variables.x"
        );
    }

    #[test]
    fn the_working_deadline_leaves_a_bounded_margin() {
        let now = Instant::now();
        let far = now + Duration::from_secs(10);
        let near = now + Duration::from_millis(100);
        assert!(working_deadline(Some(far)).unwrap() >= far - Duration::from_millis(50));
        assert!(working_deadline(Some(near)).unwrap() >= near - Duration::from_millis(10));
        assert!(working_deadline(Some(near)).unwrap() < near);
        assert!(working_deadline(None).is_none());
    }
}
