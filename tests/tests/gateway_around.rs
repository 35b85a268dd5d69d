//! End-to-end tests of what the gateway does around every task: the
//! response cache (through a real cache service), the audit event of every
//! task (through a real audit service, stopped and restarted on the same
//! database), and the trace and request ids in response metadata. The
//! provider is the loopback OpenAI-compatible [`LlmServer`], so provider
//! calls are counted where they happen.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Once;
use std::time::Duration;

use agentmesh_proto::agent::GetExecutionRequest;
use agentmesh_proto::audit as audit_pb;
use agentmesh_proto::audit::audit_service_client::AuditServiceClient;
use agentmesh_proto::common;
use agentmesh_proto::gateway as pb;
use agentmesh_proto::gateway::gateway_service_client::GatewayServiceClient;
use agentmesh_settings::{AuditOverflow, ProviderKind, Settings};
use agentmesh_tests::TestDatabase;
use agentmesh_tests::audit::AuditNode;
use agentmesh_tests::cache::{CacheNode, cache_settings};
use agentmesh_tests::gateway_node::{AgentFleet, GatewayNode};
use agentmesh_tests::llm_server::LlmServer;
use agentmesh_tests::on_every_backend;
use prost_types::value::Kind;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// Longest a test waits for something that happens in the background.
const WAIT: Duration = Duration::from_secs(30);

/// Spans get trace ids (as under `agentmesh up`) and metrics are recorded.
fn telemetry() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        agentmesh_telemetry::init_trace_context_only();
    });
    agentmesh_telemetry::metrics_handle();
}

/// Agent nodes whose provider is `stub`.
fn on_stub(stub: &LlmServer) -> impl Fn(usize, &mut Settings) + use<> {
    let base_url = stub.base_url();
    move |_, settings| {
        settings.agent_service.provider = Some(ProviderKind::Openai);
        settings.agent_service.openai.base_url = Some(base_url.clone());
        settings.agent_service.openai.api_key_env = "AGENTMESH_TEST_NO_SUCH_KEY".to_owned();
    }
}

/// A gateway in front of `endpoints` with no config service, the cache and
/// audit off (each test turns on what it uses) and short retry delays.
fn gateway_settings(dir: &std::path::Path, endpoints: &[String]) -> Settings {
    let mut settings = Settings {
        data_dir: dir.to_path_buf(),
        ..Settings::default()
    };
    settings.endpoints.config = "http://127.0.0.1:1".to_owned();
    settings.gateway.agent_endpoints = endpoints.to_vec();
    settings.gateway.gateway_id = Some("gateway-around".to_owned());
    settings.gateway.response_cache.enabled = false;
    settings.gateway.audit.enabled = false;
    settings.gateway.audit.retry_initial_ms = 20;
    settings.gateway.audit.retry_max_ms = 200;
    settings.gateway.audit.shutdown_flush_ms = 2000;
    settings.server.shutdown_grace_seconds = 5;
    settings
}

fn with_cache(mut settings: Settings, cache: &CacheNode) -> Settings {
    settings.gateway.response_cache.enabled = true;
    settings.endpoints.cache = cache.endpoint();
    settings
}

fn with_audit(mut settings: Settings, audit: &AuditNode, capacity: usize) -> Settings {
    settings.gateway.audit.enabled = true;
    settings.gateway.audit.buffer_capacity = capacity;
    settings.endpoints.audit = audit.endpoint();
    settings
}

fn task(text: &str, temperature: Option<f64>) -> pb::TaskSpec {
    pb::TaskSpec {
        agent_type: "coder".to_owned(),
        variables: [("task".to_owned(), text.to_owned())].into_iter().collect(),
        project_id: "p-around".to_owned(),
        parameters: Some(common::ModelParameters {
            temperature,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn with_policy(mut task: pb::TaskSpec, policy: pb::CachePolicy) -> pb::TaskSpec {
    task.cache_policy = policy as i32;
    task
}

async fn execute(
    client: &mut GatewayServiceClient<Channel>,
    task: pb::TaskSpec,
) -> Result<pb::ExecuteTaskResponse, tonic::Status> {
    client
        .execute_task(pb::ExecuteTaskRequest { task: Some(task) })
        .await
        .map(tonic::Response::into_inner)
}

/// A streamed task: its deltas, completion and the initial metadata.
struct Streamed {
    deltas: Vec<String>,
    completion: pb::TaskStreamCompletion,
    metadata: tonic::metadata::MetadataMap,
}

async fn stream(
    client: &mut GatewayServiceClient<Channel>,
    task: pb::TaskSpec,
) -> Result<Streamed, tonic::Status> {
    let response = client
        .execute_task_stream(pb::ExecuteTaskStreamRequest { task: Some(task) })
        .await?;
    let metadata = response.metadata().clone();
    let mut stream = response.into_inner();
    let mut deltas = Vec::new();
    let mut completion = None;
    while let Some(message) = stream.message().await? {
        assert!(completion.is_none(), "a message after the completion");
        match message.event {
            Some(pb::execute_task_stream_response::Event::TextDelta(delta)) => deltas.push(delta),
            Some(pb::execute_task_stream_response::Event::Completion(done)) => {
                completion = Some(done);
            }
            None => panic!("a message without an event"),
        }
    }
    Ok(Streamed {
        deltas,
        completion: completion.expect("no completion"),
        metadata,
    })
}

/// Every audit entry of `task.execute`, oldest first.
async fn audit_entries(
    client: &mut AuditServiceClient<Channel>,
) -> anyhow::Result<Vec<audit_pb::Entry>> {
    let response = client
        .query(audit_pb::QueryRequest {
            action: agentmesh_gateway::around::AUDIT_ACTION.to_owned(),
            order: audit_pb::Order::OldestFirst as i32,
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(response.entries)
}

/// Waits until the audit log holds at least `count` task events.
async fn wait_for_entries(audit: &AuditNode, count: usize) -> anyhow::Result<Vec<audit_pb::Entry>> {
    let mut client = audit.client().await?;
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let entries = audit_entries(&mut client).await?;
        if entries.len() >= count {
            return Ok(entries);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "{} audit events after {WAIT:?}, expected {count}",
            entries.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn event_ids(entries: &[audit_pb::Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|entry| entry.event.as_ref().unwrap().event_id.clone())
        .collect()
}

fn context_text(entry: &audit_pb::Entry, key: &str) -> String {
    match entry
        .event
        .as_ref()
        .and_then(|event| event.context.as_ref())
        .and_then(|context| context.fields.get(key))
        .and_then(|value| value.kind.clone())
    {
        Some(Kind::StringValue(text)) => text,
        other => panic!("context.{key} is {other:?}"),
    }
}

fn context_bool(entry: &audit_pb::Entry, key: &str) -> bool {
    match entry
        .event
        .as_ref()
        .and_then(|event| event.context.as_ref())
        .and_then(|context| context.fields.get(key))
        .and_then(|value| value.kind.clone())
    {
        Some(Kind::BoolValue(value)) => value,
        other => panic!("context.{key} is {other:?}"),
    }
}

/// Events arrived in order (sequences increase) and none twice.
fn assert_unique_and_ordered(entries: &[audit_pb::Entry]) {
    let ids = event_ids(entries);
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "duplicate events: {ids:?}");
    assert!(
        entries
            .windows(2)
            .all(|pair| pair[0].sequence < pair[1].sequence)
    );
}

fn header(metadata: &tonic::metadata::MetadataMap, name: &str) -> String {
    metadata
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {metadata:?}"))
        .to_str()
        .unwrap()
        .to_owned()
}

fn is_trace_id(id: &str) -> bool {
    agentmesh_gateway::metadata::is_trace_id(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_cacheable_requests_reach_the_provider_once() -> anyhow::Result<()> {
    telemetry();
    let stub = LlmServer::start().await?;
    // Slow enough that the callers overlap while the first one executes.
    stub.set_delay(Duration::from_millis(300));
    let fleet = AgentFleet::start(2, on_stub(&stub)).await?;
    let cache = CacheNode::start(&cache_settings(None)).await?;
    let dir = tempfile::tempdir()?;
    let gateway = GatewayNode::start(&with_cache(
        gateway_settings(dir.path(), &fleet.endpoints),
        &cache,
    ))
    .await?;
    let client = gateway.client().await?;

    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut client = client.clone();
        callers.spawn(async move { execute(&mut client, task("sort a list", Some(0.0))).await });
    }
    let mut responses = Vec::new();
    while let Some(joined) = callers.join_next().await {
        responses.push(joined??);
    }
    assert_eq!(stub.requests(), 1, "one provider call for eight callers");
    let (fresh, hits): (Vec<_>, Vec<_>) = responses.iter().partition(|r| !r.cache_hit);
    assert_eq!(fresh.len(), 1, "{responses:?}");
    assert_eq!(hits.len(), 7);
    let fresh = fresh[0];
    assert!(fresh.attempts >= 1 && !fresh.execution_id.is_empty());
    assert!(fresh.output.starts_with("stub answer:"), "{}", fresh.output);
    for hit in &hits {
        assert_eq!(hit.output, fresh.output);
        assert_eq!(hit.attempts, 0);
        assert!(hit.execution_id.is_empty());
        assert!(!hit.degraded);
        assert_eq!(hit.node_id, fresh.node_id, "the node that produced it");
        assert_eq!(hit.usage, fresh.usage, "the original execution's usage");
        assert_ne!(hit.task_id, fresh.task_id);
    }
    let task_ids: BTreeSet<_> = responses.iter().map(|r| r.task_id.clone()).collect();
    assert_eq!(task_ids.len(), 8);

    let mut client = client.clone();
    // Later callers, unary or streamed, are hits too.
    let again = execute(&mut client, task("sort a list", Some(0.0))).await?;
    assert!(again.cache_hit && again.output == fresh.output);
    let streamed = stream(&mut client, task("sort a list", Some(0.0))).await?;
    assert_eq!(
        streamed.deltas,
        std::slice::from_ref(&fresh.output),
        "one delta"
    );
    assert!(streamed.completion.cache_hit);
    assert_eq!(streamed.completion.attempts, 0);
    assert!(streamed.completion.execution_id.is_empty());
    assert_eq!(stub.requests(), 1);

    // BYPASS executes and leaves the cache alone; REFRESH executes and
    // replaces the stored answer.
    let bypass = execute(
        &mut client,
        with_policy(task("sort a list", Some(0.0)), pb::CachePolicy::Bypass),
    )
    .await?;
    assert!(!bypass.cache_hit);
    assert_eq!(stub.requests(), 2);
    let refresh = execute(
        &mut client,
        with_policy(task("sort a list", Some(0.0)), pb::CachePolicy::Refresh),
    )
    .await?;
    assert!(!refresh.cache_hit);
    assert_eq!(stub.requests(), 3);
    let after_refresh = execute(&mut client, task("sort a list", Some(0.0))).await?;
    assert!(after_refresh.cache_hit);
    assert_eq!(stub.requests(), 3);

    // A streamed miss fills the cache for unary callers.
    let first = stream(&mut client, task("reverse a list", Some(0.0))).await?;
    assert!(!first.completion.cache_hit);
    assert!(
        first.deltas.len() > 1,
        "streamed from the node: {:?}",
        first.deltas
    );
    assert_eq!(stub.requests(), 4);
    let unary = execute(&mut client, task("reverse a list", Some(0.0))).await?;
    assert!(unary.cache_hit);
    assert_eq!(unary.output, first.deltas.concat());
    assert_eq!(stub.requests(), 4);

    // A different variable, model parameter or project is another entry.
    execute(&mut client, task("sort a list!", Some(0.0))).await?;
    let mut other_project = task("sort a list", Some(0.0));
    other_project.project_id = "p-other".to_owned();
    execute(&mut client, other_project).await?;
    let mut other_tokens = task("sort a list", Some(0.0));
    other_tokens.parameters.as_mut().unwrap().max_tokens = Some(17);
    execute(&mut client, other_tokens).await?;
    assert_eq!(stub.requests(), 7);

    // An unknown policy number is the caller's mistake.
    let mut unknown = task("sort a list", Some(0.0));
    unknown.cache_policy = 9;
    let status = execute(&mut client, unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("task.cache_policy"), "{status:?}");

    gateway.stop().await?;
    cache.stop().await?;
    fleet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_deterministic_requests_are_not_cached_unless_asked() -> anyhow::Result<()> {
    telemetry();
    let stub = LlmServer::start().await?;
    let fleet = AgentFleet::start(1, on_stub(&stub)).await?;
    let cache = CacheNode::start(&cache_settings(None)).await?;
    let dir = tempfile::tempdir()?;
    let gateway = GatewayNode::start(&with_cache(
        gateway_settings(dir.path(), &fleet.endpoints),
        &cache,
    ))
    .await?;
    let mut client = gateway.client().await?;

    // The configured temperature (0.7) applies: not deterministic.
    for round in 1..=2 {
        let response = execute(&mut client, task("write a poem", None)).await?;
        assert!(!response.cache_hit);
        assert_eq!(stub.requests(), round);
    }
    let explicit = execute(&mut client, task("write a poem", Some(0.9))).await?;
    assert!(!explicit.cache_hit);
    assert_eq!(stub.requests(), 3);

    // USE opts a non-deterministic task in.
    let first = execute(
        &mut client,
        with_policy(task("write a poem", None), pb::CachePolicy::Use),
    )
    .await?;
    assert!(!first.cache_hit);
    assert_eq!(stub.requests(), 4);
    let second = execute(
        &mut client,
        with_policy(task("write a poem", None), pb::CachePolicy::Use),
    )
    .await?;
    assert!(second.cache_hit);
    assert_eq!(second.output, first.output);
    assert_eq!(stub.requests(), 4);

    gateway.stop().await?;
    cache.stop().await?;
    fleet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_silent_cache_service_only_disables_caching() -> anyhow::Result<()> {
    telemetry();
    let stub = LlmServer::start().await?;
    let fleet = AgentFleet::start(1, on_stub(&stub)).await?;
    let cache = CacheNode::start(&cache_settings(None)).await?;
    let dir = tempfile::tempdir()?;
    let gateway = GatewayNode::start(&with_cache(
        gateway_settings(dir.path(), &fleet.endpoints),
        &cache,
    ))
    .await?;
    let mut client = gateway.client().await?;

    execute(&mut client, task("count words", Some(0.0))).await?;
    assert!(
        execute(&mut client, task("count words", Some(0.0)))
            .await?
            .cache_hit
    );
    assert_eq!(stub.requests(), 1);

    // The cache service goes away: every task is still served.
    cache.stop().await?;
    for round in 0..3 {
        let response = execute(&mut client, task("count words", Some(0.0))).await?;
        assert!(!response.cache_hit);
        assert!(response.output.starts_with("stub answer:"));
        assert_eq!(stub.requests(), 2 + round);
    }
    let streamed = stream(&mut client, task("count words", Some(0.0))).await?;
    assert!(!streamed.completion.cache_hit);
    assert_eq!(stub.requests(), 5);
    gateway.stop().await?;

    // A cache endpoint that accepts connections and never answers: each
    // call gives up after gateway.response_cache.timeout_ms.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let silent_address = silent.local_addr()?;
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let mut settings = gateway_settings(dir.path(), &fleet.endpoints);
    settings.gateway.response_cache.enabled = true;
    settings.gateway.response_cache.timeout_ms = 200;
    settings.gateway.response_cache.max_wait_ms = 0;
    settings.endpoints.cache = format!("http://{silent_address}");
    let gateway = GatewayNode::start(&settings).await?;
    let mut client = gateway.client().await?;
    for round in 0..2 {
        let response = execute(&mut client, task("count words", Some(0.0))).await?;
        assert!(!response.cache_hit);
        assert_eq!(stub.requests(), 6 + round);
    }
    gateway.stop().await?;
    holder.abort();
    fleet.shutdown().await
}

async fn audit_events_wait_out_an_audit_outage(db: &TestDatabase) -> anyhow::Result<()> {
    telemetry();
    let fleet = AgentFleet::start(1, |_, _| {}).await?;
    let audit = AuditNode::start(&db.settings).await?;
    let address = audit.address;
    let dir = tempfile::tempdir()?;
    let gateway = GatewayNode::start(&with_audit(
        gateway_settings(dir.path(), &fleet.endpoints),
        &audit,
        100,
    ))
    .await?;
    let mut client = gateway.client().await?;

    let mut first_task = task("audit me", None);
    first_task.correlation_id = "corr-1".to_owned();
    first_task.workflow_id = "wf-1".to_owned();
    let first = execute(&mut client, first_task).await?;
    let entries = wait_for_entries(&audit, 1).await?;
    let entry = &entries[0];
    let event = entry.event.as_ref().unwrap();
    assert_eq!(event.event_id, first.task_id);
    assert_eq!(event.agent_type, "coder");
    assert_eq!(event.project_id, "p-around");
    assert_eq!(event.workflow_id, "wf-1");
    assert!(event.user_id.starts_with("127.0.0.1:"), "{}", event.user_id);
    assert_eq!(event.trace_id, first.trace_id);
    assert!(is_trace_id(&event.trace_id));
    assert_eq!(event.outcome, audit_pb::Outcome::Success as i32);
    assert_eq!(context_text(entry, "correlation_id"), "corr-1");
    assert_eq!(context_text(entry, "node_id"), first.node_id);
    assert_eq!(context_text(entry, "execution_id"), first.execution_id);
    assert_eq!(context_text(entry, "status"), "OK");
    assert_eq!(context_text(entry, "rpc"), "ExecuteTask");
    assert_eq!(context_text(entry, "gateway_id"), "gateway-around");
    assert_eq!(context_text(entry, "request_sha256").len(), 64);
    assert!(!context_bool(entry, "cache_hit"));
    assert!(!context_bool(entry, "degraded"));

    // The audit service goes away: tasks are served, events wait.
    audit.stop().await?;
    let second = execute(&mut client, task("while down 1", None)).await?;
    let mut invalid = task("while down 2", None);
    invalid.project_id = String::new();
    let refused = execute(&mut client, invalid).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let streamed = stream(&mut client, task("while down 3", None)).await?;
    let fourth = execute(&mut client, task("while down 4", None)).await?;

    // Back on the same database: everything arrives, in order, once.
    let audit = AuditNode::start_at(&db.settings, address).await?;
    let entries = wait_for_entries(&audit, 5).await?;
    assert_unique_and_ordered(&entries);
    let ids = event_ids(&entries);
    assert_eq!(ids.len(), 5, "{ids:?}");
    assert_eq!(ids[0], first.task_id);
    assert_eq!(ids[1], second.task_id);
    let failed = entries[2].event.as_ref().unwrap();
    assert_eq!(failed.outcome, audit_pb::Outcome::Failure as i32);
    assert_eq!(context_text(&entries[2], "status"), "INVALID_ARGUMENT");
    assert!(context_text(&entries[2], "error").contains("project_id"));
    assert_eq!(context_text(&entries[3], "rpc"), "ExecuteTaskStream");
    assert_eq!(
        entries[3].event.as_ref().unwrap().trace_id,
        streamed.completion.trace_id
    );
    assert_eq!(ids[4], fourth.task_id);

    // Later events follow, still without duplicates; the chain verifies.
    let fifth = execute(&mut client, task("after", None)).await?;
    let entries = wait_for_entries(&audit, 6).await?;
    assert_unique_and_ordered(&entries);
    assert_eq!(event_ids(&entries).last(), Some(&fifth.task_id));
    let verified = audit
        .client()
        .await?
        .verify(audit_pb::VerifyRequest::default())
        .await?
        .into_inner();
    assert!(verified.ok && verified.entries_checked == 6, "{verified:?}");

    gateway.stop().await?;
    audit.stop().await?;
    fleet.shutdown().await
}
on_every_backend!(audit_events_wait_out_an_audit_outage);

async fn a_full_audit_buffer_refuses_tasks_when_fail_closed(
    db: &TestDatabase,
) -> anyhow::Result<()> {
    telemetry();
    let fleet = AgentFleet::start(1, |_, _| {}).await?;
    let audit = AuditNode::start(&db.settings).await?;
    let address = audit.address;
    let dir = tempfile::tempdir()?;
    let gateway = GatewayNode::start(&with_audit(
        gateway_settings(dir.path(), &fleet.endpoints),
        &audit,
        3,
    ))
    .await?;
    let mut client = gateway.client().await?;
    audit.stop().await?;

    let mut served = Vec::new();
    for index in 0..3 {
        served.push(execute(&mut client, task(&format!("fill {index}"), None)).await?);
    }
    // The buffer holds three events: no fourth task runs unaudited.
    let refused = execute(&mut client, task("one too many", None))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        refused.message().contains("audit buffer full"),
        "{refused:?}"
    );
    let details = refused.get_error_details();
    assert!(details.retry_info().is_some(), "RetryInfo: {refused:?}");
    assert_eq!(
        details.error_info().map(|info| info.reason.as_str()),
        Some("AUDIT_BUFFER_FULL")
    );
    assert!(is_trace_id(&header(refused.metadata(), "x-trace-id")));
    let refused_stream = stream(&mut client, task("stream too many", None))
        .await
        .err()
        .expect("refused");
    assert_eq!(refused_stream.code(), Code::Unavailable);
    let batch = client
        .execute_batch(pb::ExecuteBatchRequest {
            tasks: vec![task("batch a", None), task("batch b", None)],
            max_concurrency: None,
        })
        .await?
        .into_inner();
    for result in &batch.results {
        let Some(pb::task_result::Result::Error(error)) = &result.result else {
            panic!("not refused: {result:?}");
        };
        assert_eq!(error.code, Code::Unavailable as i32);
        assert!(error.retry_delay.is_some());
    }

    // The audit service returns: the buffer drains and tasks run again.
    let audit = AuditNode::start_at(&db.settings, address).await?;
    let entries = wait_for_entries(&audit, 3).await?;
    assert_eq!(
        event_ids(&entries),
        served.iter().map(|r| r.task_id.clone()).collect::<Vec<_>>()
    );
    let until = tokio::time::Instant::now() + WAIT;
    let accepted = loop {
        match execute(&mut client, task("after the outage", None)).await {
            Ok(response) => break response,
            Err(status) if status.code() == Code::Unavailable => {
                anyhow::ensure!(tokio::time::Instant::now() < until, "still refused");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => return Err(status.into()),
        }
    };
    let entries = wait_for_entries(&audit, 4).await?;
    assert_unique_and_ordered(&entries);
    assert_eq!(event_ids(&entries)[3], accepted.task_id);

    gateway.stop().await?;
    audit.stop().await?;
    fleet.shutdown().await
}
on_every_backend!(a_full_audit_buffer_refuses_tasks_when_fail_closed);

async fn drop_oldest_serves_every_task_and_counts_the_drops(
    db: &TestDatabase,
) -> anyhow::Result<()> {
    telemetry();
    let fleet = AgentFleet::start(1, |_, _| {}).await?;
    let audit = AuditNode::start(&db.settings).await?;
    let address = audit.address;
    let dir = tempfile::tempdir()?;
    let mut settings = with_audit(gateway_settings(dir.path(), &fleet.endpoints), &audit, 2);
    settings.gateway.audit.overflow = AuditOverflow::DropOldest;
    let gateway = GatewayNode::start(&settings).await?;
    let mut client = gateway.client().await?;
    audit.stop().await?;

    let mut served = Vec::new();
    for index in 0..5 {
        served.push(execute(&mut client, task(&format!("drop {index}"), None)).await?);
    }
    let dropped = dropped_total();
    assert!(dropped >= 3.0, "3 drops counted, saw {dropped}");

    // The two newest events arrive; one more after them proves nothing
    // older was still waiting.
    let audit = AuditNode::start_at(&db.settings, address).await?;
    let entries = wait_for_entries(&audit, 2).await?;
    assert_eq!(
        event_ids(&entries),
        [served[3].task_id.clone(), served[4].task_id.clone()]
    );
    let last = execute(&mut client, task("drop last", None)).await?;
    let entries = wait_for_entries(&audit, 3).await?;
    assert_eq!(
        event_ids(&entries),
        [
            served[3].task_id.clone(),
            served[4].task_id.clone(),
            last.task_id.clone()
        ]
    );

    gateway.stop().await?;
    audit.stop().await?;
    fleet.shutdown().await
}
on_every_backend!(drop_oldest_serves_every_task_and_counts_the_drops);

/// `agentmesh_gateway_audit_dropped_total{reason="overflow"}` as rendered.
fn dropped_total() -> f64 {
    agentmesh_telemetry::render_metrics()
        .lines()
        .find(|line| {
            line.starts_with("agentmesh_gateway_audit_dropped_total")
                && line.contains("reason=\"overflow\"")
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

async fn one_trace_and_correlation_id_per_task_through_agent_and_audit(
    db: &TestDatabase,
) -> anyhow::Result<()> {
    telemetry();
    let fleet = AgentFleet::start(2, |_, _| {}).await?;
    let audit = AuditNode::start(&db.settings).await?;
    let dir = tempfile::tempdir()?;
    let gateway = GatewayNode::start(&with_audit(
        gateway_settings(dir.path(), &fleet.endpoints),
        &audit,
        100,
    ))
    .await?;
    let mut client = gateway.client().await?;

    // The caller's trace and request id come back and reach the node.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(pb::ExecuteTaskRequest {
        task: Some(task("trace me", None)),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").parse()?,
    );
    request
        .metadata_mut()
        .insert("x-request-id", "req-trace-1".parse()?);
    let response = client.execute_task(request).await?;
    assert_eq!(header(response.metadata(), "x-trace-id"), trace);
    assert_eq!(header(response.metadata(), "x-request-id"), "req-trace-1");
    let response = response.into_inner();
    assert_eq!(response.trace_id, trace);
    let execution = execution_of(&fleet, &response).await?;
    let metadata = execution.metadata.unwrap();
    assert_eq!(metadata.trace_id, trace, "one trace gateway → agent");
    assert_eq!(
        metadata.correlation_id, "req-trace-1",
        "the request id is the default correlation id"
    );

    // A supplied correlation id goes to the node and the audit event.
    let mut correlated = task("correlate me", None);
    correlated.correlation_id = "corr-xyz".to_owned();
    let correlated = execute(&mut client, correlated).await?;
    let execution = execution_of(&fleet, &correlated).await?;
    assert_eq!(execution.metadata.unwrap().correlation_id, "corr-xyz");

    // Streams carry the headers in their initial metadata.
    let streamed = stream(&mut client, task("stream me", None)).await?;
    let stream_trace = header(&streamed.metadata, "x-trace-id");
    assert!(is_trace_id(&stream_trace));
    assert_ne!(stream_trace, trace);
    assert_eq!(streamed.completion.trace_id, stream_trace);
    assert!(!header(&streamed.metadata, "x-request-id").is_empty());

    // A batch is one call: one trace for its tasks.
    let batch = client
        .execute_batch(pb::ExecuteBatchRequest {
            tasks: vec![task("batch 1", None), task("batch 2", None)],
            max_concurrency: None,
        })
        .await?;
    let batch_trace = header(batch.metadata(), "x-trace-id");
    let batch_request = header(batch.metadata(), "x-request-id");
    for result in batch.into_inner().results {
        let Some(pb::task_result::Result::Response(response)) = result.result else {
            panic!("failed: {result:?}");
        };
        assert_eq!(response.trace_id, batch_trace);
    }

    // Errors carry them too.
    let mut invalid = task("x", None);
    invalid.agent_type = String::new();
    let status = execute(&mut client, invalid).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(is_trace_id(&header(status.metadata(), "x-trace-id")));
    assert!(!header(status.metadata(), "x-request-id").is_empty());

    // The audit trail ties it together.
    let entries = wait_for_entries(&audit, 6).await?;
    assert_unique_and_ordered(&entries);
    let first = &entries[0];
    assert_eq!(first.event.as_ref().unwrap().trace_id, trace);
    assert_eq!(context_text(first, "correlation_id"), "req-trace-1");
    assert_eq!(context_text(first, "request_id"), "req-trace-1");
    assert_eq!(context_text(&entries[1], "correlation_id"), "corr-xyz");
    let batch_entries: Vec<_> = entries
        .iter()
        .filter(|entry| entry.event.as_ref().unwrap().trace_id == batch_trace)
        .collect();
    assert_eq!(batch_entries.len(), 2);
    for entry in batch_entries {
        assert_eq!(context_text(entry, "rpc"), "ExecuteBatch");
        assert_eq!(context_text(entry, "correlation_id"), batch_request);
    }

    // The gateway's own time per task is measured.
    let metrics = agentmesh_telemetry::render_metrics();
    assert!(
        metrics.contains("agentmesh_gateway_overhead_seconds_bucket{le=\"0.000001\"}"),
        "fine buckets"
    );
    let count: f64 = metrics
        .lines()
        .find(|line| line.starts_with("agentmesh_gateway_overhead_seconds_count"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0);
    assert!(count >= 6.0, "overhead observed per task: {count}");

    gateway.stop().await?;
    audit.stop().await?;
    fleet.shutdown().await
}
on_every_backend!(one_trace_and_correlation_id_per_task_through_agent_and_audit);

/// The node's record of a served task (written in the background).
async fn execution_of(
    fleet: &AgentFleet,
    response: &pb::ExecuteTaskResponse,
) -> anyhow::Result<agentmesh_proto::agent::Execution> {
    let index: usize = response
        .node_id
        .strip_prefix("agent-")
        .and_then(|index| index.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unknown node {}", response.node_id))?;
    let node = fleet.nodes[index].as_ref().unwrap();
    let mut agent = node.client().await?;
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        match agent
            .get_execution(GetExecutionRequest {
                execution_id: response.execution_id.clone(),
            })
            .await
        {
            Ok(found) => return Ok(found.into_inner().execution.unwrap()),
            Err(status) if status.code() == Code::NotFound => {
                anyhow::ensure!(tokio::time::Instant::now() < until, "no record");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => return Err(status.into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_stay_bounded_and_ordered_with_cache_and_audit() -> anyhow::Result<()> {
    telemetry();
    let db = TestDatabase::new(agentmesh_tests::Backend::Sqlite)
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))?;
    let stub = LlmServer::start().await?;
    stub.set_delay(Duration::from_millis(50));
    let fleet = AgentFleet::start(2, on_stub(&stub)).await?;
    let cache = CacheNode::start(&cache_settings(None)).await?;
    let audit = AuditNode::start(&db.settings).await?;
    let dir = tempfile::tempdir()?;
    let settings = with_audit(
        with_cache(gateway_settings(dir.path(), &fleet.endpoints), &cache),
        &audit,
        100,
    );
    let gateway = GatewayNode::start(&settings).await?;
    let client = gateway.client().await?;

    let mut tasks: Vec<pb::TaskSpec> = (0..6)
        .map(|index| task(&format!("batch item {index}"), Some(0.0)))
        .collect();
    tasks[2].project_id = String::new();
    let run = |tasks: Vec<pb::TaskSpec>| {
        let mut client = client.clone();
        async move {
            client
                .execute_batch(pb::ExecuteBatchRequest {
                    tasks,
                    max_concurrency: Some(2),
                })
                .await
                .map(|response| response.into_inner().results)
        }
    };
    let results = run(tasks.clone()).await?;
    assert!(
        stub.max_in_flight() <= 2,
        "bounded: {}",
        stub.max_in_flight()
    );
    assert_eq!(stub.requests(), 5);
    let check = |results: &[pb::TaskResult], hits: bool| {
        assert_eq!(results.len(), 6);
        for (index, result) in results.iter().enumerate() {
            assert_eq!(result.index as usize, index);
            match (&result.result, index) {
                (Some(pb::task_result::Result::Error(error)), 2) => {
                    assert_eq!(error.code, Code::InvalidArgument as i32);
                }
                (Some(pb::task_result::Result::Response(response)), _) => {
                    assert_eq!(response.cache_hit, hits, "{response:?}");
                }
                other => panic!("unexpected result {other:?}"),
            }
        }
    };
    check(&results, false);
    // The same batch again is served from the cache, in order.
    let again = run(tasks).await?;
    check(&again, true);
    assert_eq!(stub.requests(), 5);
    let mut response_outputs =
        results
            .iter()
            .zip(&again)
            .filter_map(|(a, b)| match (&a.result, &b.result) {
                (
                    Some(pb::task_result::Result::Response(a)),
                    Some(pb::task_result::Result::Response(b)),
                ) => Some((a.output.clone(), b.output.clone())),
                _ => None,
            });
    assert!(response_outputs.all(|(a, b)| a == b));

    // One audit event per task, the refused one included.
    let entries = wait_for_entries(&audit, 12).await?;
    assert_unique_and_ordered(&entries);
    assert_eq!(entries.len(), 12);
    let hits = entries
        .iter()
        .filter(|entry| context_bool(entry, "cache_hit"))
        .count();
    assert_eq!(hits, 5);
    let failures = entries
        .iter()
        .filter(|entry| entry.event.as_ref().unwrap().outcome == audit_pb::Outcome::Failure as i32)
        .count();
    assert_eq!(failures, 2);

    gateway.stop().await?;
    audit.stop().await?;
    cache.stop().await?;
    fleet.shutdown().await?;
    db.cleanup().await;
    Ok(())
}
