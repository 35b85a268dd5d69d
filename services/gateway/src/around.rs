//! What the gateway does around every task, whatever node serves it:
//! admission against the audit buffer, the response cache, the audit event,
//! the trace id in every answer, and `agentmesh_gateway_overhead_seconds`
//! (the gateway's own time per task, with the waits on agent nodes, the
//! cache service and the fallback's generation left out).
//!
//! A task's life: [`Around::begin`] opens its [`TaskScope`] (or refuses it
//! when the audit buffer is full under `fail_closed`); the routing code
//! calls [`Around::cached`] once the task is checked, and wraps every
//! upstream wait in [`TaskScope::upstream`]; [`Around::finish`] (or
//! [`Around::finish_stream`]) stores the response, records the overhead
//! and buffers the audit event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use agentmesh_agent::service::ExecuteSpec;
use agentmesh_proto::audit as audit_pb;
use agentmesh_proto::gateway as pb;
use agentmesh_settings::LiveSettings;
use agentmesh_telemetry::metrics_registry::GATEWAY_OVERHEAD_METRIC;
use prost_types::value::Kind;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::audit_sink::{AuditSink, Reservation};
use crate::error::GatewayError;
use crate::metadata::{CallMeta, is_trace_id};
use crate::response_cache::{EffectiveParameters, Fill, Lookup, ResponseCache, decide};

/// Audit action of a gateway task.
pub const AUDIT_ACTION: &str = "task.execute";
/// Messages buffered between a node's stream and the caller's.
const STREAM_BUFFER: usize = 64;
/// Longest error message kept in an audit event.
const MAX_AUDIT_MESSAGE_BYTES: usize = 1024;

/// Which RPC a task came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    /// `ExecuteTask`.
    ExecuteTask,
    /// `ExecuteTaskStream`.
    ExecuteTaskStream,
    /// One task of `ExecuteBatch`.
    ExecuteBatch,
    /// One step of a workflow run.
    WorkflowStep,
}

impl Rpc {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Rpc::ExecuteTask => "ExecuteTask",
            Rpc::ExecuteTaskStream => "ExecuteTaskStream",
            Rpc::ExecuteBatch => "ExecuteBatch",
            Rpc::WorkflowStep => "WorkflowStep",
        }
    }
}

/// Logs at most once per period (the caller logs at a lower level
/// otherwise), so an outage fills no disk.
pub struct RateLimitedLog {
    every: Duration,
    last: Mutex<Option<std::time::Instant>>,
}

impl RateLimitedLog {
    /// At most one log line per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(None),
        }
    }

    /// Whether a line may be logged now (and, if so, counts it).
    pub fn allow(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let now = std::time::Instant::now();
        match *last {
            Some(previous) if now.duration_since(previous) < self.every => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }
}

/// One task from admission to its audit event.
pub struct TaskScope {
    call: CallMeta,
    rpc: Rpc,
    task_id: String,
    correlation_id: String,
    policy: i32,
    agent_type: String,
    project_id: String,
    workflow_id: String,
    started: Instant,
    occurred_at: SystemTime,
    upstream_nanos: AtomicU64,
    request_hash: OnceLock<String>,
    fill: Mutex<Option<Fill>>,
    reservation: Option<Reservation>,
}

impl TaskScope {
    /// The gateway-assigned task id (also the audit event id).
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// The caller's correlation id, else the request id (or the task id
    /// when the request id is not a valid identifier).
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }

    /// The call's trace id.
    pub fn trace_id(&self) -> &str {
        &self.call.trace_id
    }

    /// Awaits `future`, counting the wait as upstream time (not the
    /// gateway's own).
    pub async fn upstream<T>(&self, future: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let output = future.await;
        let waited = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.upstream_nanos.fetch_add(waited, Ordering::Relaxed);
        output
    }

    fn set_fill(&self, fill: Option<Fill>) {
        *self.fill.lock().unwrap_or_else(PoisonError::into_inner) = fill;
    }

    fn take_fill(&self) -> Option<Fill> {
        self.fill
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Records the gateway's own time so far.
    fn observe_overhead(&self) {
        let total = self.started.elapsed();
        let upstream = Duration::from_nanos(self.upstream_nanos.load(Ordering::Relaxed));
        metrics::histogram!(GATEWAY_OVERHEAD_METRIC)
            .record(total.saturating_sub(upstream).as_secs_f64());
    }
}

/// How a task ended, for its audit event.
struct Ending<'a> {
    code: Code,
    message: &'a str,
    node_id: &'a str,
    execution_id: &'a str,
    degraded: bool,
    degraded_reason: &'a str,
    fallback: &'a str,
    cache_hit: bool,
    attempts: u32,
}

/// The response cache, the audit sink and the gateway's identity.
pub struct Around {
    gateway_id: String,
    cache: Arc<ResponseCache>,
    audit: Option<AuditSink>,
}

impl Around {
    /// Around-task work with `cache` and, when given, an audit sink.
    pub fn new(gateway_id: String, cache: ResponseCache, audit: Option<AuditSink>) -> Self {
        Self {
            gateway_id,
            cache: Arc::new(cache),
            audit,
        }
    }

    /// The audit sink, if audit events are on.
    pub fn audit(&self) -> Option<&AuditSink> {
        self.audit.as_ref()
    }

    /// Admits one task and opens its scope; with `fail_closed` and a full
    /// audit buffer the task is refused (UNAVAILABLE) before any work.
    pub fn begin(
        &self,
        call: &CallMeta,
        rpc: Rpc,
        task: Option<&pb::TaskSpec>,
    ) -> Result<TaskScope, GatewayError> {
        let reservation = match &self.audit {
            Some(audit) => Some(audit.reserve()?),
            None => None,
        };
        let task_id = format!("task_{}", uuid::Uuid::new_v4().simple());
        let given = task.map(|task| task.correlation_id.as_str()).unwrap_or("");
        let correlation_id = if !given.is_empty() {
            given.to_owned()
        } else if agentmesh_agent::grpc::is_identifier(&call.request_id)
            && call.request_id.len() <= 128
        {
            call.request_id.clone()
        } else {
            task_id.clone()
        };
        Ok(TaskScope {
            call: call.clone(),
            rpc,
            task_id,
            correlation_id,
            policy: task.map_or(0, |task| task.cache_policy),
            agent_type: task.map(|t| t.agent_type.clone()).unwrap_or_default(),
            project_id: task.map(|t| t.project_id.clone()).unwrap_or_default(),
            workflow_id: task.map(|t| t.workflow_id.clone()).unwrap_or_default(),
            started: Instant::now(),
            occurred_at: SystemTime::now(),
            upstream_nanos: AtomicU64::new(0),
            request_hash: OnceLock::new(),
            fill: Mutex::new(None),
            reservation,
        })
    }

    /// The cached response of a checked task, when its cache policy and
    /// determinism allow one and the cache has it; otherwise remembers what
    /// to store once the task is served. Never fails: a cache problem only
    /// means no cache for this task.
    pub async fn cached(
        &self,
        scope: &TaskScope,
        spec: &ExecuteSpec,
        live: &LiveSettings,
        deadline: Option<Instant>,
    ) -> Option<pb::ExecuteTaskResponse> {
        let parameters = EffectiveParameters::of(spec, live);
        let hash = crate::response_cache::request_hash(spec, &parameters);
        let _ = scope.request_hash.set(hash.clone());
        if !self.cache.enabled() {
            return None;
        }
        let decision = decide(scope.policy, self.cache.deterministic(&parameters));
        match scope
            .upstream(self.cache.lookup(&hash, decision, deadline))
            .await
        {
            Lookup::Hit(stored) => {
                let mut response = *stored;
                response.task_id = scope.task_id.clone();
                response.execution_id = String::new();
                response.cache_hit = true;
                response.attempts = 0;
                response.degraded = false;
                response.degraded_reason = String::new();
                response.latency = Some(proto_duration(scope.started.elapsed()));
                response.trace_id = scope.call.trace_id.clone();
                Some(response)
            }
            Lookup::Miss(fill) => {
                scope.set_fill(fill);
                None
            }
        }
    }

    /// Ends a unary task: stores a fresh response in the cache, records the
    /// gateway's overhead, buffers the audit event.
    pub fn finish(
        &self,
        scope: TaskScope,
        result: &mut Result<pb::ExecuteTaskResponse, GatewayError>,
    ) {
        scope.observe_overhead();
        match result {
            Ok(response) => {
                response.trace_id = scope.call.trace_id.clone();
                self.served(&scope, response);
                let fallback = fallback_of(response);
                let ending = Ending {
                    code: Code::Ok,
                    message: "",
                    node_id: &response.node_id,
                    execution_id: &response.execution_id,
                    degraded: response.degraded,
                    degraded_reason: &response.degraded_reason,
                    fallback,
                    cache_hit: response.cache_hit,
                    attempts: response.attempts,
                };
                self.audit_event(scope, &ending);
            }
            Err(error) => {
                let message = error.message();
                let ending = Ending {
                    code: error.code(),
                    message: &message,
                    ..Ending::failed()
                };
                self.audit_event(scope, &ending);
            }
        }
    }

    /// Ends a streamed task: on success, relays the stream to the caller,
    /// and when it ends stores the response and buffers the audit event.
    pub fn finish_stream(
        self: &Arc<Self>,
        scope: TaskScope,
        result: Result<mpsc::Receiver<Result<pb::ExecuteTaskStreamResponse, Status>>, GatewayError>,
    ) -> Result<mpsc::Receiver<Result<pb::ExecuteTaskStreamResponse, Status>>, GatewayError> {
        scope.observe_overhead();
        match result {
            Ok(upstream) => {
                let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
                tokio::spawn(Arc::clone(self).relay(scope, upstream, sender));
                Ok(receiver)
            }
            Err(error) => {
                let message = error.message();
                let ending = Ending {
                    code: error.code(),
                    message: &message,
                    ..Ending::failed()
                };
                self.audit_event(scope, &ending);
                Err(error)
            }
        }
    }

    /// A cache hit as a stream: the whole output as one delta, then the
    /// completion.
    pub fn hit_stream(
        response: pb::ExecuteTaskResponse,
    ) -> mpsc::Receiver<Result<pb::ExecuteTaskStreamResponse, Status>> {
        let (sender, receiver) = mpsc::channel(2);
        let delta = pb::ExecuteTaskStreamResponse {
            task_id: response.task_id.clone(),
            node_id: response.node_id.clone(),
            event: Some(pb::execute_task_stream_response::Event::TextDelta(
                response.output,
            )),
        };
        let completion = pb::ExecuteTaskStreamResponse {
            task_id: response.task_id,
            node_id: response.node_id,
            event: Some(pb::execute_task_stream_response::Event::Completion(
                pb::TaskStreamCompletion {
                    execution_id: response.execution_id,
                    usage: response.usage,
                    provider: response.provider,
                    degraded: response.degraded,
                    degraded_reason: response.degraded_reason,
                    cache_hit: response.cache_hit,
                    attempts: response.attempts,
                    finish_reason: response.finish_reason,
                    latency: response.latency,
                    trace_id: response.trace_id,
                },
            )),
        };
        // Room for both was made above; the receiver is not gone yet.
        let _ = sender.try_send(Ok(delta));
        let _ = sender.try_send(Ok(completion));
        receiver
    }

    /// Relays a task's stream to the caller, collecting the output for the
    /// cache and the outcome for the audit event.
    async fn relay(
        self: Arc<Self>,
        scope: TaskScope,
        mut upstream: mpsc::Receiver<Result<pb::ExecuteTaskStreamResponse, Status>>,
        sender: mpsc::Sender<Result<pb::ExecuteTaskStreamResponse, Status>>,
    ) {
        let collect_limit = self.cache.max_value_bytes();
        let mut output = Some(String::new());
        // The final response, its code and message, and whether the whole
        // output was collected.
        let mut ending: Option<(pb::ExecuteTaskResponse, Code, String, bool)> = None;
        while let Some(message) = upstream.recv().await {
            let mut message = match message {
                Ok(message) => message,
                Err(status) => {
                    ending = Some((
                        pb::ExecuteTaskResponse::default(),
                        status.code(),
                        status.message().to_owned(),
                        false,
                    ));
                    let _ = sender.send(Err(status)).await;
                    break;
                }
            };
            match &mut message.event {
                Some(pb::execute_task_stream_response::Event::TextDelta(text)) => {
                    if let Some(collected) = &mut output {
                        if collected.len() + text.len() > collect_limit {
                            output = None;
                        } else {
                            collected.push_str(text);
                        }
                    }
                }
                Some(pb::execute_task_stream_response::Event::Completion(done)) => {
                    done.trace_id = scope.call.trace_id.clone();
                    let complete = output.is_some();
                    let response = pb::ExecuteTaskResponse {
                        task_id: scope.task_id.clone(),
                        execution_id: done.execution_id.clone(),
                        output: output.take().unwrap_or_default(),
                        usage: done.usage,
                        provider: done.provider.clone(),
                        node_id: message.node_id.clone(),
                        degraded: done.degraded,
                        degraded_reason: done.degraded_reason.clone(),
                        cache_hit: done.cache_hit,
                        attempts: done.attempts,
                        finish_reason: done.finish_reason,
                        latency: done.latency,
                        trace_id: done.trace_id.clone(),
                    };
                    ending = Some((response, Code::Ok, String::new(), complete));
                }
                None => {}
            }
            if sender.send(Ok(message)).await.is_err() {
                break;
            }
        }
        match ending {
            Some((response, Code::Ok, _, complete)) => {
                if complete {
                    self.served(&scope, &response);
                } else {
                    // Output over the collect limit: serve it, do not store it.
                    scope.take_fill();
                }
                let fallback = fallback_of(&response);
                let ending = Ending {
                    code: Code::Ok,
                    message: "",
                    node_id: &response.node_id,
                    execution_id: &response.execution_id,
                    degraded: response.degraded,
                    degraded_reason: &response.degraded_reason,
                    fallback,
                    cache_hit: response.cache_hit,
                    attempts: response.attempts,
                };
                self.audit_event(scope, &ending);
            }
            Some((_, code, message, _)) => {
                let ending = Ending {
                    code,
                    message: &message,
                    ..Ending::failed()
                };
                self.audit_event(scope, &ending);
            }
            None => {
                let ending = Ending {
                    code: Code::Cancelled,
                    message: "the stream ended before its completion (caller gone or node stream cut)",
                    ..Ending::failed()
                };
                self.audit_event(scope, &ending);
            }
        }
    }

    /// A response was served: remember the node's provider kind, store
    /// the response as the cache lookup said.
    fn served(&self, scope: &TaskScope, response: &pb::ExecuteTaskResponse) {
        if response.cache_hit {
            return;
        }
        if !response.degraded
            && let Some(provider) = &response.provider
        {
            self.cache.observe_node(&response.node_id, provider.offline);
        }
        if let Some(fill) = scope.take_fill() {
            self.cache.store(fill, response);
        }
    }

    /// Buffers the audit event of a finished task.
    fn audit_event(&self, scope: TaskScope, ending: &Ending<'_>) {
        let TaskScope {
            call,
            rpc,
            task_id,
            correlation_id,
            agent_type,
            project_id,
            workflow_id,
            occurred_at,
            request_hash,
            reservation,
            ..
        } = scope;
        let Some(reservation) = reservation else {
            return;
        };
        let outcome = match ending.code {
            Code::Ok if ending.degraded => audit_pb::Outcome::Degraded,
            Code::Ok => audit_pb::Outcome::Success,
            Code::Unauthenticated | Code::PermissionDenied => audit_pb::Outcome::Denied,
            _ => audit_pb::Outcome::Failure,
        };
        let mut context = Vec::with_capacity(16);
        let mut text = |key: &str, value: &str| {
            context.push((key.to_owned(), string_value(value, MAX_AUDIT_MESSAGE_BYTES)));
        };
        text("task_id", &task_id);
        text("request_id", &call.request_id);
        text("correlation_id", &correlation_id);
        text("rpc", rpc.name());
        text("gateway_id", &self.gateway_id);
        text("node_id", ending.node_id);
        text("execution_id", ending.execution_id);
        text("status", agentmesh_telemetry::code_name(ending.code));
        text("error", ending.message);
        text("fallback", ending.fallback);
        text("degraded_reason", ending.degraded_reason);
        text(
            "request_sha256",
            request_hash.get().map(String::as_str).unwrap_or(""),
        );
        context.push(("degraded".to_owned(), bool_value(ending.degraded)));
        context.push(("cache_hit".to_owned(), bool_value(ending.cache_hit)));
        context.push((
            "attempts".to_owned(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(f64::from(ending.attempts))),
            },
        ));
        let event = audit_pb::Event {
            event_id: task_id,
            occurred_at: Some(prost_types::Timestamp::from(occurred_at)),
            agent_type: clean(&agent_type, 64),
            action: AUDIT_ACTION.to_owned(),
            user_id: clean(&call.caller, 128),
            project_id: clean(&project_id, 128),
            workflow_id: clean(&workflow_id, 128),
            trace_id: if is_trace_id(&call.trace_id) {
                call.trace_id
            } else {
                String::new()
            },
            outcome: outcome as i32,
            context: Some(prost_types::Struct {
                fields: context.into_iter().collect(),
            }),
        };
        reservation.push(event);
    }
}

impl Ending<'_> {
    fn failed() -> Self {
        Ending {
            code: Code::Unknown,
            message: "",
            node_id: "",
            execution_id: "",
            degraded: false,
            degraded_reason: "",
            fallback: "",
            cache_hit: false,
            attempts: 0,
        }
    }
}

/// Which fallback served a degraded response (its provider), else "".
fn fallback_of(response: &pb::ExecuteTaskResponse) -> &str {
    match &response.provider {
        Some(provider) if response.degraded => &provider.provider,
        _ => "",
    }
}

/// `text` without NUL characters (the audit log refuses them), cut to at
/// most `max` bytes on a character boundary.
fn clean(text: &str, max: usize) -> String {
    if text.len() <= max && !text.contains('\0') {
        return text.to_owned();
    }
    let mut cleaned: String = text.chars().filter(|c| *c != '\0').collect();
    if cleaned.len() > max {
        let mut end = max;
        while !cleaned.is_char_boundary(end) {
            end -= 1;
        }
        cleaned.truncate(end);
    }
    cleaned
}

fn string_value(text: &str, max: usize) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::StringValue(clean(text, max))),
    }
}

fn bool_value(value: bool) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::BoolValue(value)),
    }
}

fn proto_duration(value: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(value.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_fields_are_cut_to_the_audit_limits() {
        assert_eq!(clean("a\0b", 10), "ab");
        assert_eq!(clean("ééé", 5), "éé");
        assert_eq!(clean("abc", 3), "abc");
    }

    #[test]
    fn a_rate_limited_log_allows_one_line_per_period() {
        let log = RateLimitedLog::new(Duration::from_secs(3600));
        assert!(log.allow());
        assert!(!log.allow());
        let always = RateLimitedLog::new(Duration::ZERO);
        assert!(always.allow());
        assert!(always.allow());
    }
}
