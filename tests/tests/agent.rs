//! End-to-end tests of the agent service over real gRPC, against the
//! `local` provider and a real OpenAI-compatible HTTP server on loopback,
//! on SQLite and PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use agentmesh_proto::agent as pb;
use agentmesh_proto::agent::agent_service_client::AgentServiceClient;
use agentmesh_proto::common;
use agentmesh_proto::config as config_pb;
use agentmesh_settings::{ProviderKind, SanitizePolicy, Settings};
use agentmesh_tests::agent_node::AgentNode;
use agentmesh_tests::llm_server::{Behaviour, LlmServer};
use agentmesh_tests::{ConfigNode, TestDatabase, on_every_backend};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// Settings for an agent node without a config service (defaults apply).
fn agent_settings(db: &TestDatabase) -> Settings {
    let mut settings = db.settings.clone();
    // Nothing listens here: the watcher keeps the bootstrap defaults.
    settings.endpoints.config = "http://127.0.0.1:1".to_owned();
    settings.agent_service.node_id = Some("agent-test-1".to_owned());
    settings
}

fn with_stub(mut settings: Settings, stub: &LlmServer) -> Settings {
    settings.agent_service.provider = Some(ProviderKind::Openai);
    settings.agent_service.openai.base_url = Some(stub.base_url());
    settings.agent_service.openai.api_key_env = "AGENTMESH_TEST_NO_SUCH_KEY".to_owned();
    settings.agent_service.openai.retry_initial_ms = 10;
    settings.agent_service.openai.retry_max_ms = 50;
    settings
}

fn spec(agent_type: &str, task: &str) -> pb::ExecutionSpec {
    pb::ExecutionSpec {
        agent_type: agent_type.to_owned(),
        variables: [("task".to_owned(), task.to_owned())].into_iter().collect(),
        project_id: "p1".to_owned(),
        ..Default::default()
    }
}

async fn execute(
    client: &mut AgentServiceClient<Channel>,
    spec: pb::ExecutionSpec,
) -> Result<pb::ExecuteResponse, tonic::Status> {
    client
        .execute(pb::ExecuteRequest { spec: Some(spec) })
        .await
        .map(tonic::Response::into_inner)
}

fn violations(status: &tonic::Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|bad| {
            bad.field_violations
                .iter()
                .map(|v| v.field.clone())
                .collect()
        })
        .unwrap_or_default()
}

async fn local_execution_is_labelled_recorded_and_replayable(
    db: &TestDatabase,
) -> anyhow::Result<()> {
    let node = AgentNode::start(&agent_settings(db)).await?;
    let mut client = node.client().await?;

    let first = execute(&mut client, spec("coder", "write a parser for TOML")).await?;
    let second = execute(&mut client, spec("coder", "write a parser for TOML")).await?;
    assert_eq!(first.node_id, "agent-test-1");
    assert_eq!(
        first.output, second.output,
        "local provider is deterministic"
    );
    assert_ne!(first.execution_id, second.execution_id);
    let provider = first.provider.clone().unwrap();
    assert_eq!(provider.provider, "local");
    assert!(provider.offline);
    assert_eq!(
        provider.model, "gpt-4o-mini",
        "model from the settings defaults"
    );
    assert!(first.output.starts_with("[local offline provider]"));
    assert!(first.recorded);
    assert!(first.usage.unwrap().completion_tokens > 0);
    let timings = first.timings.unwrap();
    assert_eq!(timings.provider_attempts, 1);
    assert!(timings.render.is_some() && timings.provider_total.is_some());

    let record = client
        .get_execution(pb::GetExecutionRequest {
            execution_id: first.execution_id.clone(),
        })
        .await?
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(record.output.as_deref(), Some(first.output.as_str()));
    assert!(
        record
            .rendered_prompt
            .unwrap()
            .contains("write a parser for TOML")
    );
    assert_eq!(record.status, pb::ExecutionStatus::Succeeded as i32);
    assert_eq!(record.parameters.unwrap().temperature, Some(0.7));

    let replay = client
        .replay(pb::ReplayRequest {
            execution_id: first.execution_id.clone(),
            mode: pb::ReplayMode::Exact as i32,
        })
        .await?
        .into_inner();
    assert!(replay.identical);
    assert_eq!(replay.replay_output, first.output);
    assert!(replay.replay_execution_id.is_empty());

    // Unrecorded content cannot be replayed exactly.
    let mut unrecorded = spec("tester", "check the parser");
    unrecorded.record = Some(false);
    let unrecorded = execute(&mut client, unrecorded).await?;
    assert!(!unrecorded.recorded);
    let refused = client
        .replay(pb::ReplayRequest {
            execution_id: unrecorded.execution_id,
            mode: pb::ReplayMode::Exact as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    let listed = client
        .list_executions(pb::ListExecutionsRequest {
            project_id: "p1".into(),
            page_size: 2,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(listed.executions.len(), 2);
    assert!(
        listed.executions[0].output.is_none(),
        "lists carry no content"
    );
    assert!(!listed.next_page_token.is_empty());
    let rest = client
        .list_executions(pb::ListExecutionsRequest {
            project_id: "p1".into(),
            page_size: 2,
            page_token: listed.next_page_token,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(rest.executions.len(), 1);
    assert!(rest.next_page_token.is_empty());

    let load = client.get_load(pb::GetLoadRequest {}).await?.into_inner();
    assert_eq!(load.node_id, "agent-test-1");
    assert_eq!(load.in_flight, 0);
    assert_eq!(load.capacity, 256);
    node.stop().await
}
on_every_backend!(local_execution_is_labelled_recorded_and_replayable);

async fn openai_exact_replay_calls_no_provider_and_live_replay_diffs(
    db: &TestDatabase,
) -> anyhow::Result<()> {
    let stub = LlmServer::start().await?;
    let node = AgentNode::start(&with_stub(agent_settings(db), &stub)).await?;
    let mut client = node.client().await?;
    let executed = execute(&mut client, spec("analyst", "summarise the logs")).await?;
    assert_eq!(stub.requests(), 1);
    let provider = executed.provider.clone().unwrap();
    assert_eq!(provider.provider, "openai");
    assert!(!provider.offline);
    assert!(executed.output.starts_with("stub answer:"));
    assert_eq!(
        executed.usage.unwrap().prompt_tokens,
        11,
        "usage from the response"
    );
    let body = stub.last_body();
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["temperature"], 0.7);
    assert_eq!(body["messages"][0]["role"], "system");

    let exact = client
        .replay(pb::ReplayRequest {
            execution_id: executed.execution_id.clone(),
            mode: pb::ReplayMode::Exact as i32,
        })
        .await?
        .into_inner();
    assert!(exact.identical);
    assert_eq!(stub.requests(), 1, "exact replay calls no provider");

    let live = client
        .replay(pb::ReplayRequest {
            execution_id: executed.execution_id.clone(),
            mode: pb::ReplayMode::Live as i32,
        })
        .await?
        .into_inner();
    assert_eq!(stub.requests(), 2);
    assert!(
        live.identical,
        "the stub answers the same input the same way"
    );
    assert!(live.diff.is_empty());
    let replayed = client
        .get_execution(pb::GetExecutionRequest {
            execution_id: live.replay_execution_id,
        })
        .await?
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(replayed.replay_of, executed.execution_id);
    node.stop().await
}
on_every_backend!(openai_exact_replay_calls_no_provider_and_live_replay_diffs);

fn sqlite_db_test<F, Fut>(body: F) -> anyhow::Result<()>
where
    F: FnOnce(TestDatabase) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async move {
            let db = TestDatabase::new(agentmesh_tests::Backend::Sqlite)
                .await
                .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))?;
            body(db).await
        })
}

#[test]
fn provider_failures_map_to_precise_statuses() -> anyhow::Result<()> {
    sqlite_db_test(|db| async move {
        let stub = LlmServer::start().await?;
        let mut settings = with_stub(agent_settings(&db), &stub);
        settings.agent_service.openai.max_retries = 2;
        let node = AgentNode::start(&settings).await?;
        let mut client = node.client().await?;

        // 429 with Retry-After, then success: retried, attempts counted.
        stub.push([Behaviour::RateLimited(0.05), Behaviour::Ok]);
        let ok = execute(&mut client, spec("coder", "a")).await?;
        assert_eq!(ok.timings.unwrap().provider_attempts, 2);

        // 500 twice, then success.
        stub.push([
            Behaviour::ServerError,
            Behaviour::ServerError,
            Behaviour::Ok,
        ]);
        let ok = execute(&mut client, spec("coder", "b")).await?;
        assert_eq!(ok.timings.unwrap().provider_attempts, 3);

        // 429 on every attempt: RESOURCE_EXHAUSTED with the provider's delay.
        stub.push([
            Behaviour::RateLimited(0.02),
            Behaviour::RateLimited(0.02),
            Behaviour::RateLimited(0.02),
        ]);
        let limited = execute(&mut client, spec("coder", "c")).await.unwrap_err();
        assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
        assert!(limited.get_error_details().retry_info().is_some());

        // 500 on every attempt: UNAVAILABLE naming the HTTP status.
        stub.push(vec![Behaviour::ServerError; 3]);
        let failed = execute(&mut client, spec("coder", "d")).await.unwrap_err();
        assert_eq!(failed.code(), Code::Unavailable);
        assert!(
            failed.message().contains("HTTP 500"),
            "{}",
            failed.message()
        );

        // A Retry-After beyond the deadline is not waited for.
        stub.push([Behaviour::RateLimited(30.0)]);
        let mut short = spec("coder", "e");
        short.parameters = Some(common::ModelParameters {
            timeout_seconds: Some(2),
            ..Default::default()
        });
        let refused = execute(&mut client, short).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);

        // Malformed body: UNAVAILABLE, not retried.
        let before = stub.requests();
        stub.push([Behaviour::Malformed]);
        let malformed = execute(&mut client, spec("coder", "f")).await.unwrap_err();
        assert_eq!(malformed.code(), Code::Unavailable);
        assert!(
            malformed.message().contains("malformed"),
            "{}",
            malformed.message()
        );
        assert_eq!(stub.requests(), before + 1);

        // Dropped connection: UNAVAILABLE.
        stub.push([Behaviour::Drop]);
        let dropped = execute(&mut client, spec("coder", "g")).await.unwrap_err();
        assert_eq!(dropped.code(), Code::Unavailable, "{dropped:?}");

        // Slower than timeout_seconds: DEADLINE_EXCEEDED, recorded as failed.
        stub.push([Behaviour::Slow(Duration::from_secs(5))]);
        let mut slow = spec("coder", "h");
        slow.correlation_id = "slow-call".into();
        slow.parameters = Some(common::ModelParameters {
            timeout_seconds: Some(1),
            ..Default::default()
        });
        let timed_out = execute(&mut client, slow).await.unwrap_err();
        assert_eq!(timed_out.code(), Code::DeadlineExceeded);
        let failed_records = client
            .list_executions(pb::ListExecutionsRequest {
                correlation_id: "slow-call".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .executions;
        assert_eq!(failed_records.len(), 1);
        assert_eq!(failed_records[0].status, pb::ExecutionStatus::Failed as i32);
        assert_eq!(
            failed_records[0].error.as_ref().unwrap().code,
            Code::DeadlineExceeded as i32
        );

        // The caller's own deadline stops the provider call.
        stub.push([Behaviour::Slow(Duration::from_secs(5))]);
        let mut request = tonic::Request::new(pb::ExecuteRequest {
            spec: Some(spec("coder", "i")),
        });
        request.set_timeout(Duration::from_millis(300));
        let cut = client.execute(request).await.unwrap_err();
        assert!(
            matches!(cut.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{cut:?}"
        );
        node.stop().await?;
        db.cleanup().await;
        Ok(())
    })
}

#[test]
fn streaming_over_sse_adds_up_to_the_recorded_output() -> anyhow::Result<()> {
    sqlite_db_test(|db| async move {
        let stub = LlmServer::start().await?;
        let node = AgentNode::start(&with_stub(agent_settings(&db), &stub)).await?;
        let mut client = node.client().await?;
        let mut stream = client
            .execute_stream(pb::ExecuteStreamRequest {
                spec: Some(spec("architect", "design a queue with three workers")),
            })
            .await?
            .into_inner();
        let mut text = String::new();
        let mut completion = None;
        let mut ids = std::collections::BTreeSet::new();
        while let Some(message) = stream.message().await? {
            ids.insert(message.execution_id.clone());
            assert_eq!(message.node_id, "agent-test-1");
            match message.event.unwrap() {
                pb::execute_stream_response::Event::TextDelta(delta) => text.push_str(&delta),
                pb::execute_stream_response::Event::Completion(done) => completion = Some(done),
            }
        }
        assert_eq!(ids.len(), 1, "one execution id in every message");
        let completion = completion.unwrap();
        assert_eq!(completion.usage.unwrap().prompt_tokens, 11);
        assert_eq!(stub.last_body()["stream"], true);
        let record = client
            .get_execution(pb::GetExecutionRequest {
                execution_id: ids.into_iter().next().unwrap(),
            })
            .await?
            .into_inner()
            .execution
            .unwrap();
        assert_eq!(record.output.unwrap(), text);
        assert!(record.streamed);
        node.stop().await?;
        db.cleanup().await;
        Ok(())
    })
}

#[test]
fn batch_of_20_never_exceeds_5_in_flight_at_the_provider() -> anyhow::Result<()> {
    sqlite_db_test(|db| async move {
        let stub = LlmServer::start().await?;
        stub.set_delay(Duration::from_millis(40));
        let mut settings = with_stub(agent_settings(&db), &stub);
        settings.defaults.batch.max_concurrency = 5;
        let node = AgentNode::start(&settings).await?;
        let mut client = node.client().await?;
        let mut tasks: Vec<_> = (0..20)
            .map(|i| spec("coder", &format!("task {i}")))
            .collect();
        tasks[7].agent_type = "poet".into();
        tasks[9]
            .variables
            .insert("task".into(), "<script>alert(1)</script>".into());
        let response = client
            .execute_batch(pb::ExecuteBatchRequest {
                tasks,
                max_concurrency: Some(50),
            })
            .await?
            .into_inner();
        assert_eq!(response.results.len(), 20);
        for (index, result) in response.results.iter().enumerate() {
            assert_eq!(result.index as usize, index);
            match (index, result.result.as_ref().unwrap()) {
                (7, pb::batch_result::Result::Error(error)) => {
                    assert_eq!(error.code, Code::NotFound as i32);
                }
                (9, pb::batch_result::Result::Error(error)) => {
                    assert_eq!(error.code, Code::InvalidArgument as i32);
                    assert_eq!(error.field_violations[0].field, "tasks[9].variables.task");
                }
                (_, pb::batch_result::Result::Response(ok)) => {
                    assert!(
                        ok.output.contains(&format!("task {index}")),
                        "{}",
                        ok.output
                    );
                }
                (_, other) => panic!("task {index}: {other:?}"),
            }
        }
        assert!(
            stub.max_in_flight() <= 5,
            "{} in flight",
            stub.max_in_flight()
        );
        assert_eq!(stub.requests(), 18);
        node.stop().await?;
        db.cleanup().await;
        Ok(())
    })
}

#[test]
fn pool_bound_holds_under_a_burst_of_200() -> anyhow::Result<()> {
    sqlite_db_test(|db| async move {
        let stub = LlmServer::start().await?;
        stub.set_delay(Duration::from_millis(20));
        let mut settings = with_stub(agent_settings(&db), &stub);
        settings.defaults.llm.pool_size = 10;
        let node = AgentNode::start(&settings).await?;
        let client = node.client().await?;
        let calls = (0..200).map(|i| {
            let mut client = client.clone();
            async move { execute(&mut client, spec("coder", &format!("burst {i}"))).await }
        });
        let outcomes = futures::future::join_all(calls).await;
        let failures: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(stub.requests(), 200);
        assert!(
            stub.max_in_flight() <= 10,
            "{} in flight",
            stub.max_in_flight()
        );
        // Connections are reused, not opened per request. hyper's pool gets
        // a connection back asynchronously after its response body ends, so
        // a request that wins that race may open one more; in-flight
        // requests (above) are what the pool bound holds exactly.
        assert!(
            stub.connections() <= 15,
            "{} connections for 200 requests",
            stub.connections()
        );
        node.stop().await?;
        db.cleanup().await;
        Ok(())
    })
}

#[test]
fn a_full_provider_queue_is_resource_exhausted() -> anyhow::Result<()> {
    sqlite_db_test(|db| async move {
        let stub = LlmServer::start().await?;
        stub.set_delay(Duration::from_millis(500));
        let mut settings = with_stub(agent_settings(&db), &stub);
        settings.defaults.llm.pool_size = 1;
        settings.agent_service.openai.max_queued = 1;
        let node = AgentNode::start(&settings).await?;
        let client = node.client().await?;
        let calls = (0..4).map(|i| {
            let mut client = client.clone();
            async move { execute(&mut client, spec("coder", &format!("q {i}"))).await }
        });
        let outcomes = futures::future::join_all(calls).await;
        let exhausted = outcomes
            .iter()
            .filter(|o| matches!(o, Err(status) if status.code() == Code::ResourceExhausted))
            .count();
        assert_eq!(exhausted, 2, "{outcomes:?}");
        node.stop().await?;
        db.cleanup().await;
        Ok(())
    })
}

#[test]
fn bad_input_is_invalid_argument_naming_field_and_rule() -> anyhow::Result<()> {
    sqlite_db_test(|db| async move {
        let node = AgentNode::start(&agent_settings(&db)).await?;
        let mut client = node.client().await?;

        let mut xss = spec("coder", "<img src=x onerror=alert(1)>");
        xss.variables
            .insert("context".into(), "javascript:alert(document.cookie)".into());
        let status = execute(&mut client, xss).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            violations(&status),
            ["spec.variables.context", "spec.variables.task"]
        );

        let mut missing = spec("coder", "x");
        missing.variables.clear();
        let status = execute(&mut client, missing).await.unwrap_err();
        assert_eq!(violations(&status), ["spec.variables.task"]);

        let mut override_missing = spec("coder", "x");
        override_missing.template_override = Some("{{ task }} and {{ nothing }}".into());
        let status = execute(&mut client, override_missing).await.unwrap_err();
        assert_eq!(violations(&status), ["spec.variables.nothing"]);

        let mut bad_parameters = spec("coder", "x");
        bad_parameters.parameters = Some(common::ModelParameters {
            temperature: Some(3.0),
            max_tokens: Some(0),
            ..Default::default()
        });
        bad_parameters.project_id = String::new();
        let status = execute(&mut client, bad_parameters).await.unwrap_err();
        assert_eq!(violations(&status), ["spec.project_id"]);

        let mut bad_parameters = spec("coder", "x");
        bad_parameters.parameters = Some(common::ModelParameters {
            temperature: Some(3.0),
            max_tokens: Some(0),
            ..Default::default()
        });
        let status = execute(&mut client, bad_parameters).await.unwrap_err();
        assert_eq!(
            violations(&status),
            ["spec.parameters.temperature", "spec.parameters.max_tokens"]
        );
        assert!(
            status.message().contains("between 0 and 2"),
            "{}",
            status.message()
        );

        let unknown = execute(&mut client, spec("poet", "x")).await.unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound);

        let agents = client
            .list_agents(pb::ListAgentsRequest {})
            .await?
            .into_inner();
        let names: Vec<_> = agents
            .agents
            .iter()
            .map(|a| a.agent_type.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "analyst",
                "architect",
                "coder",
                "deployer",
                "orchestrator",
                "tester"
            ]
        );
        node.stop().await?;
        db.cleanup().await;
        Ok(())
    })
}

#[test]
fn escape_policy_renders_escaped_values() -> anyhow::Result<()> {
    sqlite_db_test(|db| async move {
        let mut settings = agent_settings(&db);
        settings.agent_service.sanitize_policy = SanitizePolicy::Escape;
        let node = AgentNode::start(&settings).await?;
        let mut client = node.client().await?;
        let executed = execute(&mut client, spec("coder", "<script>alert(1)</script>")).await?;
        let record = client
            .get_execution(pb::GetExecutionRequest {
                execution_id: executed.execution_id,
            })
            .await?
            .into_inner()
            .execution
            .unwrap();
        assert_eq!(
            record.variables["task"],
            "&lt;script&gt;alert(1)&lt;/script&gt;"
        );
        assert!(!record.rendered_prompt.unwrap().contains("<script>"));
        node.stop().await?;
        db.cleanup().await;
        Ok(())
    })
}

#[test]
fn a_config_change_reaches_the_next_execution_without_restart() -> anyhow::Result<()> {
    sqlite_db_test(|db| async move {
        let stub = LlmServer::start().await?;
        let config = ConfigNode::start(&db.settings).await?;
        let mut settings = with_stub(agent_settings(&db), &stub);
        settings.endpoints.config = config.endpoint();
        let node = AgentNode::start(&settings).await?;
        let mut client = node.client().await?;
        execute(&mut client, spec("coder", "before")).await?;
        assert_eq!(stub.last_body()["model"], "gpt-4o-mini");

        let mut config_client = config.client().await?;
        config_client
            .update(config_pb::UpdateRequest {
                scope: "agent/coder".into(),
                settings: Some(config_pb::Settings {
                    agent: Some(config_pb::AgentSettings {
                        default_model: Some("llama3.1:8b".into()),
                        temperature: Some(0.1),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                author: "tests".into(),
                reason: "switch model".into(),
                ..Default::default()
            })
            .await?;
        // The watch stream delivers the change within moments; poll the
        // next executions until it shows (bounded, not a timing assertion).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let response = execute(&mut client, spec("coder", "after")).await?;
            if response.provider.unwrap().model == "llama3.1:8b" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "change never arrived"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(stub.last_body()["temperature"], 0.1);
        // Other agent types keep the global settings.
        execute(&mut client, spec("tester", "other")).await?;
        assert_eq!(stub.last_body()["model"], "gpt-4o-mini");
        node.stop().await?;
        config.stop().await?;
        db.cleanup().await;
        Ok(())
    })
}

async fn artifacts_with_cas_and_retention(db: &TestDatabase) -> anyhow::Result<()> {
    let settings = agent_settings(db);
    let node = AgentNode::start(&settings).await?;
    let mut client = node.client().await?;
    let put = |name: &str, expected: Option<u64>| pb::PutArtifactRequest {
        project_id: "p1".into(),
        name: name.into(),
        content: format!("content of {name}").into_bytes(),
        content_type: "text/markdown".into(),
        kind: pb::ArtifactKind::ProjectPlan as i32,
        source_agent: "orchestrator".into(),
        expected_version: expected,
        ..Default::default()
    };
    let created = client
        .put_artifact(put("plans/old.md", Some(0)))
        .await?
        .into_inner();
    assert_eq!(created.artifact.unwrap().version, 1);
    let conflict = client
        .put_artifact(put("plans/old.md", Some(0)))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::FailedPrecondition);
    let replaced = client
        .put_artifact(put("plans/old.md", Some(1)))
        .await?
        .into_inner();
    assert_eq!(replaced.artifact.unwrap().version, 2);
    client.put_artifact(put("plans/new.md", None)).await?;
    let bad = client
        .put_artifact(put("../escape", None))
        .await
        .unwrap_err();
    assert_eq!(violations(&bad), ["name"]);

    let fetched = client
        .get_artifact(pb::GetArtifactRequest {
            project_id: "p1".into(),
            name: "plans/new.md".into(),
        })
        .await?
        .into_inner();
    assert_eq!(fetched.content, b"content of plans/new.md");
    let meta = fetched.artifact.unwrap();
    assert_eq!(meta.kind, pb::ArtifactKind::ProjectPlan as i32);
    assert_eq!(meta.source_agent, "orchestrator");
    assert_eq!(meta.sha256.len(), 32);

    let listed = client
        .list_artifacts(pb::ListArtifactsRequest {
            project_id: "p1".into(),
            name_prefix: "plans/".into(),
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(listed.artifacts[0].name, "plans/new.md");
    assert!(!listed.next_page_token.is_empty());

    // Age one artifact past the 24 h retention.
    let database = agentmesh_db::Database::connect(&settings).await?;
    let store = agentmesh_agent::store::Store::new(database.clone());
    let two_days_ago = (chrono::Utc::now() - chrono::Duration::hours(48)).timestamp_micros();
    store
        .touch_artifact("p1", "plans/old.md", two_days_ago)
        .await?;
    database.close().await;

    let dry = client
        .cleanup_artifacts(pb::CleanupArtifactsRequest {
            dry_run: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(dry.removed, 1);
    let cleaned = client
        .cleanup_artifacts(pb::CleanupArtifactsRequest::default())
        .await?
        .into_inner();
    assert_eq!(cleaned.removed, 1);
    assert_eq!(
        cleaned.removed_bytes,
        "content of plans/old.md".len() as u64
    );
    let gone = client
        .get_artifact(pb::GetArtifactRequest {
            project_id: "p1".into(),
            name: "plans/old.md".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    client
        .get_artifact(pb::GetArtifactRequest {
            project_id: "p1".into(),
            name: "plans/new.md".into(),
        })
        .await?;
    node.stop().await
}
on_every_backend!(artifacts_with_cas_and_retention);
