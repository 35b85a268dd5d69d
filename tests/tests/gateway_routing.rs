//! End-to-end tests of the gateway's routing over real in-process agent
//! nodes: load-aware choice, breakers recovering through half-open, and the
//! retry budget.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use agentmesh_proto::common::CircuitState;
use agentmesh_proto::gateway as pb;
use agentmesh_proto::gateway::gateway_service_client::GatewayServiceClient;
use agentmesh_settings::{GatewayFallback, Settings};
use agentmesh_tests::gateway_node::{AgentFleet, GatewayNode};
use tonic::Code;
use tonic::transport::Channel;

fn gateway_settings(data_dir: &std::path::Path, endpoints: &[String]) -> Settings {
    let mut settings = Settings {
        data_dir: data_dir.to_path_buf(),
        ..Settings::default()
    };
    settings.endpoints.config = "http://127.0.0.1:1".to_owned();
    settings.gateway.agent_endpoints = endpoints.to_vec();
    settings.gateway.gateway_id = Some("gateway-routing".to_owned());
    settings.defaults.breaker.failure_threshold = 2;
    settings.defaults.breaker.reset_timeout_seconds = 300;
    settings.server.shutdown_grace_seconds = 5;
    settings
}

fn task(text: &str) -> pb::TaskSpec {
    pb::TaskSpec {
        agent_type: "coder".to_owned(),
        variables: [("task".to_owned(), text.to_owned())].into_iter().collect(),
        project_id: "p1".to_owned(),
        ..Default::default()
    }
}

async fn execute(
    client: &mut GatewayServiceClient<Channel>,
    text: &str,
) -> Result<pb::ExecuteTaskResponse, tonic::Status> {
    client
        .execute_task(pb::ExecuteTaskRequest {
            task: Some(task(text)),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn circuit(client: &mut GatewayServiceClient<Channel>, endpoint: &str) -> pb::NodeCircuit {
    client
        .get_circuit_states(pb::GetCircuitStatesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .find(|node| node.endpoint == endpoint)
        .unwrap_or_else(|| panic!("no circuit for {endpoint}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_node_gets_clearly_less_traffic() -> anyhow::Result<()> {
    let fleet = AgentFleet::start(3, |index, settings| {
        if index == 0 {
            settings.agent_service.local.latency_ms = 300;
        }
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let gateway = GatewayNode::start(&gateway_settings(dir.path(), &fleet.endpoints)).await?;
    let client = gateway.client().await?;

    // Four callers at once, 120 tasks in all.
    let mut callers = Vec::new();
    for caller in 0..4 {
        let mut client = client.clone();
        callers.push(tokio::spawn(async move {
            let mut served = Vec::new();
            for round in 0..30 {
                let response = execute(&mut client, &format!("c{caller} r{round}"))
                    .await
                    .unwrap();
                assert!(!response.degraded);
                served.push(response.node_id);
            }
            served
        }));
    }
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for caller in callers {
        for node in caller.await? {
            *served.entry(node).or_default() += 1;
        }
    }
    let slow = served.get("agent-0").copied().unwrap_or(0);
    let fast = [
        served.get("agent-1").copied().unwrap_or(0),
        served.get("agent-2").copied().unwrap_or(0),
    ];
    assert!(
        slow * 3 < fast[0] && slow * 3 < fast[1],
        "the slow node got {slow} of 120 tasks, the others {fast:?}"
    );
    // The gateway's latency estimate tells the slow node apart.
    let mut client = client;
    let slow_circuit = circuit(&mut client, &fleet.endpoints[0]).await;
    let fast_circuit = circuit(&mut client, &fleet.endpoints[1]).await;
    let estimate = |node: &pb::NodeCircuit| {
        let latency = node.latency_estimate.unwrap();
        Duration::new(latency.seconds as u64, latency.nanos as u32)
    };
    assert!(
        estimate(&slow_circuit) > estimate(&fast_circuit) * 2,
        "{slow_circuit:?} vs {fast_circuit:?}"
    );
    // The load poller has heard from every node.
    assert_eq!(fast_circuit.reported_capacity.map(|c| c > 0), Some(true));
    gateway.stop().await?;
    fleet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_comes_back_goes_half_open_then_closed() -> anyhow::Result<()> {
    let mut fleet = AgentFleet::start(3, |_, _| {}).await?;
    let dir = tempfile::tempdir()?;
    let mut settings = gateway_settings(dir.path(), &fleet.endpoints);
    settings.defaults.breaker.reset_timeout_seconds = 1;
    let gateway = GatewayNode::start(&settings).await?;
    let mut client = gateway.client().await?;
    let sick = fleet.endpoints[1].clone();

    fleet.stop(1).await?;
    let mut round = 0;
    loop {
        let response = execute(&mut client, &format!("down {round}")).await?;
        assert!(!response.degraded, "{response:?}");
        round += 1;
        let node = circuit(&mut client, &sick).await;
        if node.state == CircuitState::Open as i32 {
            assert!(
                node.state_reason
                    .starts_with("2 consecutive failures; last: UNAVAILABLE"),
                "{node:?}"
            );
            assert!(node.recent_failures >= 2, "{node:?}");
            let opened = node.opened_at.unwrap();
            let next = node.next_probe_at.unwrap();
            assert_eq!(next.seconds - opened.seconds, 1, "{node:?}");
            break;
        }
        assert!(round < 200, "the stopped node's breaker never opened");
    }

    // Still down when the reset timeout passes: the probe fails and the
    // breaker opens again, callers see no error.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut reopened = false;
    for round in 0..100 {
        let response = execute(&mut client, &format!("probe {round}")).await?;
        assert!(!response.degraded, "{response:?}");
        let node = circuit(&mut client, &sick).await;
        if node.state_reason.starts_with("a probe failed") {
            assert_eq!(node.state, CircuitState::Open as i32, "{node:?}");
            reopened = true;
            break;
        }
    }
    assert!(reopened, "the failed probe did not reopen the breaker");

    // Back: the next probe closes the breaker and the node serves again.
    fleet.restart(1).await?;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut seen = Vec::new();
    let mut served_by_it = 0;
    for round in 0..200 {
        let response = execute(&mut client, &format!("back {round}")).await?;
        assert!(!response.degraded, "{response:?}");
        if response.node_id == "agent-1" {
            served_by_it += 1;
        }
        let node = circuit(&mut client, &sick).await;
        if seen.last() != Some(&node.state) {
            seen.push(node.state);
        }
        if node.state == CircuitState::Closed as i32 && served_by_it >= 3 {
            assert_eq!(node.state_reason, "a probe call succeeded", "{node:?}");
            assert!(node.opened_at.is_none() && node.next_probe_at.is_none());
            break;
        }
    }
    assert_eq!(
        seen.last(),
        Some(&(CircuitState::Closed as i32)),
        "states seen: {seen:?}"
    );
    assert!(
        served_by_it >= 3,
        "the node that came back served {served_by_it} tasks"
    );
    gateway.stop().await?;
    fleet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_retry_budget_refuses_retries() -> anyhow::Result<()> {
    let mut fleet = AgentFleet::start(2, |_, _| {}).await?;
    let dir = tempfile::tempdir()?;
    let mut settings = gateway_settings(dir.path(), &fleet.endpoints);
    settings.gateway.fallback = GatewayFallback::None;
    settings.defaults.breaker.failure_threshold = 1_000;
    let with_budget = GatewayNode::start(&settings).await?;
    settings.gateway.retry_budget_percent = 0;
    settings.gateway.retry_min_per_second = 0;
    let without_budget = GatewayNode::start(&settings).await?;
    fleet.stop(0).await?;
    fleet.stop(1).await?;

    // Every first try fails; with a budget the task is retried on the
    // other node, without one it is refused after one try.
    let mut client = with_budget.client().await?;
    for round in 0..5 {
        let status = execute(&mut client, &format!("r{round}"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        for endpoint in &fleet.endpoints {
            assert!(status.message().contains(endpoint.as_str()), "{status:?}");
        }
        assert!(!status.message().contains("retry budget"), "{status:?}");
    }
    let mut client = without_budget.client().await?;
    for round in 0..5 {
        let status = execute(&mut client, &format!("r{round}"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("retry budget exhausted"),
            "{status:?}"
        );
        let tried = fleet
            .endpoints
            .iter()
            .filter(|endpoint| status.message().contains(endpoint.as_str()))
            .count();
        assert_eq!(tried, 1, "{status:?}");
    }
    with_budget.stop().await?;
    without_budget.stop().await?;
    fleet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_deadline_cancels_the_nodes_work() -> anyhow::Result<()> {
    let fleet = AgentFleet::start(1, |_, settings| {
        settings.agent_service.local.latency_ms = 5_000;
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let gateway = GatewayNode::start(&gateway_settings(dir.path(), &fleet.endpoints)).await?;
    let mut client = gateway.client().await?;
    let mut agent = fleet.nodes[0].as_ref().unwrap().client().await?;

    let mut request = tonic::Request::new(pb::ExecuteTaskRequest {
        task: Some(task("slow")),
    });
    request
        .metadata_mut()
        .insert("grpc-timeout", "400m".parse().unwrap());
    let call = tokio::spawn(async move { client.execute_task(request).await });
    // The node is working on it...
    let mut started = false;
    for _ in 0..100 {
        let load = agent
            .get_load(agentmesh_proto::agent::GetLoadRequest {})
            .await?
            .into_inner();
        if load.in_flight == 1 {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(started, "the node never started the task");
    let status = call.await?.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // The node stops working on it long before its 5 s generation ends.
    let mut cancelled = false;
    for _ in 0..100 {
        let load = agent
            .get_load(agentmesh_proto::agent::GetLoadRequest {})
            .await?
            .into_inner();
        if load.in_flight == 0 {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        cancelled,
        "the node still runs the task the caller gave up on"
    );
    gateway.stop().await?;
    fleet.shutdown().await
}
