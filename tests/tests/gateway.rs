//! End-to-end tests of the gateway over real gRPC, in front of real
//! in-process agent nodes (`local` provider, SQLite each).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use agentmesh_proto::common;
use agentmesh_proto::config as config_pb;
use agentmesh_proto::gateway as pb;
use agentmesh_proto::gateway::gateway_service_client::GatewayServiceClient;
use agentmesh_settings::{GatewayFallback, Settings};
use agentmesh_tests::gateway_node::{AgentFleet, GatewayNode};
use agentmesh_tests::{Backend, ConfigNode, TestDatabase};
use tonic::Code;
use tonic::transport::Channel;

/// Gateway settings in front of `endpoints`, with no config service (the
/// bootstrap defaults apply) and a breaker that opens after 2 failures.
fn gateway_settings(data_dir: &std::path::Path, endpoints: &[String]) -> Settings {
    let mut settings = Settings {
        data_dir: data_dir.to_path_buf(),
        ..Settings::default()
    };
    settings.endpoints.config = "http://127.0.0.1:1".to_owned();
    settings.gateway.agent_endpoints = endpoints.to_vec();
    settings.gateway.gateway_id = Some("gateway-test".to_owned());
    settings.defaults.breaker.failure_threshold = 2;
    settings.defaults.breaker.reset_timeout_seconds = 300;
    settings.server.shutdown_grace_seconds = 5;
    // Routing only here; tests/tests/gateway_around.rs covers the cache and
    // the audit trail.
    settings.gateway.response_cache.enabled = false;
    settings.gateway.audit.enabled = false;
    settings
}

fn task(agent_type: &str, text: &str) -> pb::TaskSpec {
    pb::TaskSpec {
        agent_type: agent_type.to_owned(),
        variables: [("task".to_owned(), text.to_owned())].into_iter().collect(),
        project_id: "p1".to_owned(),
        ..Default::default()
    }
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

async fn circuits(client: &mut GatewayServiceClient<Channel>) -> Vec<pb::NodeCircuit> {
    client
        .get_circuit_states(pb::GetCircuitStatesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
}

fn circuit_of<'a>(nodes: &'a [pb::NodeCircuit], endpoint: &str) -> &'a pb::NodeCircuit {
    nodes
        .iter()
        .find(|node| node.endpoint == endpoint)
        .unwrap_or_else(|| panic!("no circuit for {endpoint}: {nodes:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_spread_over_three_nodes_and_a_stopped_node_opens_its_breaker() -> anyhow::Result<()>
{
    let mut fleet = AgentFleet::start(3, |_, _| {}).await?;
    let dir = tempfile::tempdir()?;
    let gateway = GatewayNode::start(&gateway_settings(dir.path(), &fleet.endpoints)).await?;
    let mut client = gateway.client().await?;

    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..30 {
        let response = execute(&mut client, task("coder", &format!("task {round}"))).await?;
        assert!(!response.degraded, "{response:?}");
        assert_eq!(response.attempts, 1);
        assert!(response.task_id.starts_with("task_"));
        assert!(response.output.starts_with("[local offline provider]"));
        *served.entry(response.node_id).or_default() += 1;
    }
    assert_eq!(
        served.keys().cloned().collect::<Vec<_>>(),
        ["agent-0", "agent-1", "agent-2"],
        "every node serves: {served:?}"
    );
    // Each node saw the calls the gateway says it sent.
    for (index, node) in fleet.nodes.iter().enumerate() {
        let mut agent = node.as_ref().unwrap().client().await?;
        let load = agent
            .get_load(agentmesh_proto::agent::GetLoadRequest {})
            .await?
            .into_inner();
        assert_eq!(load.node_id, format!("agent-{index}"));
    }
    let nodes = circuits(&mut client).await;
    assert_eq!(nodes.len(), 3);
    assert_eq!(
        nodes.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(),
        ["agent-0", "agent-1", "agent-2"]
    );
    assert!(
        nodes
            .iter()
            .all(|n| n.state == common::CircuitState::Closed as i32
                && n.opened_at.is_none()
                && n.state_changed_at.is_some())
    );

    // One node stops: callers see no error, its breaker opens.
    fleet.stop(1).await?;
    let stopped = fleet.endpoints[1].clone();
    // The node may first be skipped as draining (its load poll said so),
    // then tried and failed until its breaker opens.
    let mut retried = 0;
    let mut rounds = 0;
    loop {
        let response = execute(&mut client, task("tester", &format!("after {rounds}"))).await?;
        assert!(!response.degraded, "{response:?}");
        assert_ne!(response.node_id, "agent-1");
        if response.attempts > 1 {
            retried += 1;
        }
        rounds += 1;
        let nodes = circuits(&mut client).await;
        if circuit_of(&nodes, &stopped).state == common::CircuitState::Open as i32 {
            break;
        }
        assert!(rounds < 2_000, "the stopped node's breaker never opened");
    }
    assert!(
        retried >= 2,
        "the stopped node was tried and the task retried"
    );
    let nodes = circuits(&mut client).await;
    let sick = circuit_of(&nodes, &stopped);
    assert_eq!(sick.state, common::CircuitState::Open as i32, "{sick:?}");
    assert!(sick.consecutive_failures >= 2, "{sick:?}");
    assert!(sick.opened_at.is_some());
    for endpoint in [&fleet.endpoints[0], &fleet.endpoints[2]] {
        assert_eq!(
            circuit_of(&nodes, endpoint).state,
            common::CircuitState::Closed as i32
        );
    }

    gateway.stop().await?;
    fleet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nodes_down_falls_back_to_the_local_agent_or_refuses() -> anyhow::Result<()> {
    let mut fleet = AgentFleet::start(2, |_, _| {}).await?;
    let dir = tempfile::tempdir()?;
    let settings = gateway_settings(dir.path(), &fleet.endpoints);
    let gateway = GatewayNode::start(&settings).await?;
    let mut client = gateway.client().await?;
    let healthy = execute(&mut client, task("analyst", "the same question")).await?;
    assert!(!healthy.degraded);
    fleet.stop(0).await?;
    fleet.stop(1).await?;

    for round in 0..6 {
        let response = execute(&mut client, task("analyst", "the same question")).await?;
        assert!(response.degraded, "round {round}: {response:?}");
        assert!(
            response
                .degraded_reason
                .starts_with("all agent nodes unavailable"),
            "{}",
            response.degraded_reason
        );
        assert_eq!(response.node_id, "gateway-test");
        assert!(response.execution_id.is_empty());
        let provider = response.provider.unwrap();
        assert_eq!(provider.provider, "local");
        assert!(provider.offline);
        // The fallback renders the task the way a node does.
        assert_eq!(response.output, healthy.output);
    }
    let nodes = circuits(&mut client).await;
    assert!(
        nodes
            .iter()
            .all(|n| n.state == common::CircuitState::Open as i32),
        "{nodes:?}"
    );
    // With every breaker open the fallback still answers (no node call).
    let response = execute(&mut client, task("analyst", "more")).await?;
    assert!(response.degraded);
    assert_eq!(response.attempts, 0);
    assert!(
        response
            .degraded_reason
            .contains("every circuit breaker is open")
    );
    // A bad task is still the caller's error under fallback.
    let mut bad = task("analyst", "x");
    bad.variables.insert("nope".to_owned(), "1".to_owned());
    let status = execute(&mut client, bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    gateway.stop().await?;

    // Without a fallback: UNAVAILABLE.
    let mut settings = settings;
    settings.gateway.fallback = GatewayFallback::None;
    let gateway = GatewayNode::start(&settings).await?;
    let mut client = gateway.client().await?;
    for _ in 0..3 {
        let status = execute(&mut client, task("analyst", "q"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("no agent node can serve"));
    }
    gateway.stop().await?;
    fleet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_errors_pass_through_without_opening_the_breaker() -> anyhow::Result<()> {
    let fleet = AgentFleet::start(1, |_, _| {}).await?;
    let dir = tempfile::tempdir()?;
    let gateway = GatewayNode::start(&gateway_settings(dir.path(), &fleet.endpoints)).await?;
    let mut client = gateway.client().await?;
    for _ in 0..5 {
        let mut bad = task("coder", "x");
        bad.variables
            .insert("undeclared".to_owned(), "1".to_owned());
        let status = execute(&mut client, bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("task.variables.undeclared"),
            "{status:?}"
        );
        let status = execute(&mut client, task("no-such-agent", "x"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    // Shape errors are the gateway's own.
    let status = client
        .execute_task(pb::ExecuteTaskRequest { task: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("task"), "{status:?}");
    let nodes = circuits(&mut client).await;
    assert_eq!(nodes[0].state, common::CircuitState::Closed as i32);
    assert_eq!(nodes[0].consecutive_failures, 0);
    let fine = execute(&mut client, task("coder", "fine")).await?;
    assert!(!fine.degraded);
    assert_eq!(circuits(&mut client).await[0].node_id, "agent-0");
    gateway.stop().await?;
    fleet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_deadline_shorter_than_a_slow_node_is_deadline_exceeded() -> anyhow::Result<()> {
    let fleet = AgentFleet::start(1, |_, settings| {
        settings.agent_service.local.latency_ms = 3_000;
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let gateway = GatewayNode::start(&gateway_settings(dir.path(), &fleet.endpoints)).await?;
    let mut client = gateway.client().await?;
    for _ in 0..3 {
        let mut request = tonic::Request::new(pb::ExecuteTaskRequest {
            task: Some(task("coder", "slow")),
        });
        // The deadline travels as `grpc-timeout`; the client does not race
        // its own timer, so the code seen is the gateway's.
        request
            .metadata_mut()
            .insert("grpc-timeout", "300m".parse().unwrap());
        let status = client.execute_task(request).await.unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    // The caller's own deadline is not the node's fault.
    let nodes = circuits(&mut client).await;
    assert_eq!(
        nodes[0].state,
        common::CircuitState::Closed as i32,
        "{nodes:?}"
    );
    gateway.stop().await?;
    fleet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_batches_run_through_the_nodes_and_the_fallback() -> anyhow::Result<()> {
    let mut fleet = AgentFleet::start(2, |_, _| {}).await?;
    let dir = tempfile::tempdir()?;
    let mut settings = gateway_settings(dir.path(), &fleet.endpoints);
    settings.defaults.batch.max_concurrency = 2;
    let gateway = GatewayNode::start(&settings).await?;
    let mut client = gateway.client().await?;

    let whole = execute(&mut client, task("coder", "stream me")).await?;
    let (text, completion, node_id) = stream(&mut client, task("coder", "stream me")).await?;
    assert_eq!(text, whole.output);
    assert!(!completion.degraded);
    assert!(!completion.execution_id.is_empty());
    assert!(node_id.starts_with("agent-"));

    let mut tasks: Vec<pb::TaskSpec> = (0..7)
        .map(|index| task("tester", &format!("batch {index}")))
        .collect();
    tasks[3]
        .variables
        .insert("undeclared".to_owned(), "1".to_owned());
    let results = client
        .execute_batch(pb::ExecuteBatchRequest {
            tasks: tasks.clone(),
            max_concurrency: Some(16),
        })
        .await?
        .into_inner()
        .results;
    assert_eq!(results.len(), 7);
    for (index, result) in results.iter().enumerate() {
        assert_eq!(result.index as usize, index);
        match (&result.result, index) {
            (Some(pb::task_result::Result::Error(error)), 3) => {
                assert_eq!(error.code, Code::InvalidArgument as i32);
                assert_eq!(
                    error.field_violations[0].field,
                    "tasks[3].variables.undeclared"
                );
            }
            (Some(pb::task_result::Result::Response(response)), _) => {
                assert!(response.output.contains(&format!("batch {index}")));
            }
            other => panic!("unexpected result {other:?}"),
        }
    }
    let status = client
        .execute_batch(pb::ExecuteBatchRequest {
            tasks: Vec::new(),
            max_concurrency: Some(0),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("tasks"), "{status:?}");
    assert!(status.message().contains("max_concurrency"), "{status:?}");

    fleet.stop(0).await?;
    fleet.stop(1).await?;
    let (fallback_text, completion, node_id) =
        stream(&mut client, task("coder", "stream me")).await?;
    assert_eq!(fallback_text, whole.output);
    assert!(completion.degraded);
    assert!(completion.execution_id.is_empty());
    assert_eq!(node_id, "gateway-test");

    gateway.stop().await?;
    fleet.shutdown().await
}

async fn stream(
    client: &mut GatewayServiceClient<Channel>,
    task: pb::TaskSpec,
) -> anyhow::Result<(String, pb::TaskStreamCompletion, String)> {
    let mut stream = client
        .execute_task_stream(pb::ExecuteTaskStreamRequest { task: Some(task) })
        .await?
        .into_inner();
    let mut text = String::new();
    let mut completion = None;
    let mut node_id = String::new();
    while let Some(message) = stream.message().await? {
        anyhow::ensure!(completion.is_none(), "a message after the completion");
        node_id = message.node_id;
        match message.event {
            Some(pb::execute_task_stream_response::Event::TextDelta(delta)) => {
                text.push_str(&delta)
            }
            Some(pb::execute_task_stream_response::Event::Completion(done)) => {
                completion = Some(done);
            }
            None => anyhow::bail!("a message without an event"),
        }
    }
    Ok((
        text,
        completion.ok_or_else(|| anyhow::anyhow!("no completion"))?,
        node_id,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_thresholds_changed_in_the_config_service_apply_without_restart()
-> anyhow::Result<()> {
    let db = TestDatabase::new(Backend::Sqlite)
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))?;
    let config = ConfigNode::start(&db.settings).await?;
    let fleet = AgentFleet::start(1, |_, _| {}).await?;
    // A second endpoint where nothing listens.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("http://{}", listener.local_addr()?)
    };
    let dir = tempfile::tempdir()?;
    let mut settings = gateway_settings(dir.path(), &[fleet.endpoints[0].clone(), dead.clone()]);
    settings.endpoints.config = config.endpoint();
    let gateway = GatewayNode::start(&settings).await?;
    let mut client = gateway.client().await?;

    // The config service's global scope says 5 failures (its default).
    let mut seen_failure = false;
    for round in 0..200 {
        let response = execute(&mut client, task("coder", &format!("a{round}"))).await?;
        assert!(!response.degraded);
        let dead_node = circuit_of(&circuits(&mut client).await, &dead).clone();
        if dead_node.consecutive_failures >= 1 {
            assert_eq!(dead_node.state, common::CircuitState::Closed as i32);
            seen_failure = true;
            break;
        }
    }
    assert!(seen_failure, "the dead node was never tried");

    config
        .client()
        .await?
        .update(config_pb::UpdateRequest {
            scope: "global".into(),
            settings: Some(config_pb::Settings {
                breaker: Some(config_pb::BreakerSettings {
                    failure_threshold: Some(1),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            author: "tests".into(),
            reason: "open faster".into(),
            ..Default::default()
        })
        .await?;
    // With a threshold of 1, one failure opens the breaker (under 5 an
    // open breaker would show 5).
    let mut opened = None;
    for round in 0..400 {
        let response = execute(&mut client, task("coder", &format!("b{round}"))).await?;
        assert!(!response.degraded);
        let dead_node = circuit_of(&circuits(&mut client).await, &dead).clone();
        if dead_node.state == common::CircuitState::Open as i32 {
            opened = Some(dead_node);
            break;
        }
    }
    let opened = opened.expect("the dead node's breaker never opened");
    assert_eq!(opened.consecutive_failures, 1, "{opened:?}");

    gateway.stop().await?;
    fleet.shutdown().await?;
    config.stop().await?;
    db.cleanup().await;
    Ok(())
}
