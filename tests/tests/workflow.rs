//! End-to-end tests of gateway workflows over real gRPC: a gateway on
//! SQLite or PostgreSQL in front of real in-process agent nodes (`local`
//! provider, or the OpenAI-compatible test server), with approvals,
//! amendments, cancels, restarts and project stops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use agentmesh_proto::agent as agent_pb;
use agentmesh_proto::audit as audit_pb;
use agentmesh_proto::gateway as pb;
use agentmesh_proto::gateway::gateway_service_client::GatewayServiceClient;
use agentmesh_settings::Settings;
use agentmesh_tests::audit::AuditNode;
use agentmesh_tests::gateway_node::{AgentFleet, GatewayNode};
use agentmesh_tests::llm_server::LlmServer;
use agentmesh_tests::{Backend, TestDatabase, install_tracing, on_every_backend};
use tonic::Code;
use tonic::transport::Channel;

type Client = GatewayServiceClient<Channel>;

/// Gateway settings on `db` in front of `endpoints`, with no config
/// service (bootstrap defaults apply) and fast workflow polling.
fn gateway_settings(db: &TestDatabase, endpoints: &[String]) -> Settings {
    let mut settings = db.settings.clone();
    settings.endpoints.config = "http://127.0.0.1:1".to_owned();
    settings.endpoints.audit = "http://127.0.0.1:1".to_owned();
    settings.gateway.agent_endpoints = endpoints.to_vec();
    settings.gateway.gateway_id = Some("gateway-wf".to_owned());
    settings.gateway.workflows.poll_interval_ms = 100;
    settings.gateway.workflows.lease_seconds = 5;
    settings
}

fn step(
    name: &str,
    agent_type: &str,
    depends_on: &[&str],
    variables: &[(&str, &str)],
) -> pb::WorkflowStep {
    pb::WorkflowStep {
        name: name.to_owned(),
        agent_type: agent_type.to_owned(),
        depends_on: depends_on.iter().map(|d| (*d).to_owned()).collect(),
        variables: variables
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

fn inline(project_id: &str, steps: Vec<pb::WorkflowStep>, detach: bool) -> pb::RunWorkflowRequest {
    pb::RunWorkflowRequest {
        project_id: project_id.to_owned(),
        steps,
        detach,
        ..Default::default()
    }
}

async fn run(
    client: &mut Client,
    request: pb::RunWorkflowRequest,
) -> Result<pb::WorkflowRun, tonic::Status> {
    client
        .run_workflow(request)
        .await
        .map(|response| response.into_inner().run.unwrap())
}

async fn get(client: &mut Client, run_id: &str) -> anyhow::Result<pb::WorkflowRun> {
    Ok(client
        .get_workflow_run(pb::GetWorkflowRunRequest {
            run_id: run_id.to_owned(),
        })
        .await?
        .into_inner()
        .run
        .unwrap())
}

/// Follows a run to its end: the snapshot and every event after it.
async fn watch_to_end(
    client: &mut Client,
    run_id: &str,
) -> anyhow::Result<(pb::WorkflowRun, Vec<pb::WorkflowEvent>)> {
    let mut stream = client
        .watch_workflow_run(pb::WatchWorkflowRunRequest {
            run_id: run_id.to_owned(),
            after_sequence: None,
        })
        .await?
        .into_inner();
    let first = stream.message().await?.expect("a snapshot");
    let Some(pb::watch_workflow_run_response::Update::Snapshot(snapshot)) = first.update else {
        anyhow::bail!("the first message is not a snapshot: {first:?}");
    };
    let mut events = Vec::new();
    let watched = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(message) = stream.message().await? {
            match message.update {
                Some(pb::watch_workflow_run_response::Update::Event(event)) => events.push(event),
                other => anyhow::bail!("not an event after the snapshot: {other:?}"),
            }
        }
        Ok(())
    })
    .await;
    watched.map_err(|_| anyhow::anyhow!("the run did not finish: {events:?}"))??;
    Ok((snapshot, events))
}

/// Polls the run until `done` holds (at most 30 s).
async fn wait_for(
    client: &mut Client,
    run_id: &str,
    what: &str,
    done: impl Fn(&pb::WorkflowRun) -> bool,
) -> anyhow::Result<pb::WorkflowRun> {
    for _ in 0..600 {
        let current = get(client, run_id).await?;
        if done(&current) {
            return Ok(current);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!(
        "timed out waiting for {what}: {:?}",
        get(client, run_id).await?
    )
}

fn step_of<'a>(run: &'a pb::WorkflowRun, name: &str) -> &'a pb::StepResult {
    run.steps
        .iter()
        .find(|step| step.name == name)
        .unwrap_or_else(|| panic!("no step {name} in {run:?}"))
}

fn artifact_of<'a>(run: &'a pb::WorkflowRun, name: &str) -> &'a pb::WorkflowArtifact {
    run.artifacts
        .iter()
        .find(|artifact| artifact.name == name)
        .unwrap_or_else(|| panic!("no artifact {name} in {:?}", run.artifacts))
}

/// The execution record of a step, from the agent node that ran it.
async fn execution_of(
    fleet: &AgentFleet,
    step: &pb::StepResult,
) -> anyhow::Result<agent_pb::Execution> {
    let index: usize = step
        .node_id
        .strip_prefix("agent-")
        .ok_or_else(|| anyhow::anyhow!("step {} ran on {:?}", step.name, step.node_id))?
        .parse()?;
    let node = fleet.nodes[index].as_ref().unwrap();
    let mut agent = node.client().await?;
    // Records are written in the background; wait for this one.
    for _ in 0..200 {
        match agent
            .get_execution(agent_pb::GetExecutionRequest {
                execution_id: step.execution_id.clone(),
            })
            .await
        {
            Ok(response) => return Ok(response.into_inner().execution.unwrap()),
            Err(status) if status.code() == Code::NotFound => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(status) => return Err(status.into()),
        }
    }
    anyhow::bail!("no execution record {}", step.execution_id)
}

async fn executions_of_workflow(
    fleet: &AgentFleet,
    workflow_id: &str,
) -> anyhow::Result<Vec<agent_pb::Execution>> {
    let mut all = Vec::new();
    for node in fleet.nodes.iter().flatten() {
        let mut agent = node.client().await?;
        let page = agent
            .list_executions(agent_pb::ListExecutionsRequest {
                workflow_id: workflow_id.to_owned(),
                page_size: 500,
                ..Default::default()
            })
            .await?
            .into_inner();
        all.extend(page.executions);
    }
    Ok(all)
}

fn micros(timestamp: &Option<prost_types::Timestamp>) -> i64 {
    let timestamp = timestamp.as_ref().expect("a timestamp");
    timestamp.seconds * 1_000_000 + i64::from(timestamp.nanos) / 1000
}

fn is_trace_id(text: &str) -> bool {
    text.len() == 32
        && text.bytes().all(|b| b.is_ascii_hexdigit())
        && text.bytes().any(|b| b != b'0')
}

async fn sdlc_workflow_runs_end_to_end(db: &TestDatabase) -> anyhow::Result<()> {
    install_tracing();
    let fleet = AgentFleet::start(2, |_, _| {}).await?;
    let gateway = GatewayNode::start(&gateway_settings(db, &fleet.endpoints)).await?;
    let mut client = gateway.client().await?;

    let definitions = client
        .list_workflow_definitions(pb::ListWorkflowDefinitionsRequest {})
        .await?
        .into_inner()
        .definitions;
    assert_eq!(definitions[0].name, "sdlc");
    assert_eq!(definitions[0].source, "builtin");

    let started = run(
        &mut client,
        pb::RunWorkflowRequest {
            project_id: "p1".to_owned(),
            definition: "sdlc".to_owned(),
            inputs: [
                ("task".to_owned(), "a URL shortener service".to_owned()),
                ("language".to_owned(), "Rust".to_owned()),
            ]
            .into(),
            correlation_id: "corr-sdlc".to_owned(),
            ..Default::default()
        },
    )
    .await?;
    // The call waited until the run could not go on alone: the deployment
    // waits for approval before it starts.
    assert_eq!(
        started.state,
        pb::WorkflowState::AwaitingApproval as i32,
        "{started:?}"
    );
    assert_eq!(started.definition, "sdlc");
    assert_eq!(started.inputs["environment"], "", "defaults are filled");
    let names: Vec<&str> = started.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["plan", "analyse", "design", "implement", "test", "deploy"]
    );
    for step in &started.steps[..5] {
        assert_eq!(step.state, pb::StepState::Succeeded as i32, "{step:?}");
        assert_eq!(step.runs, 1);
        assert!(!step.output.is_empty() && !step.artifact_name.is_empty());
        assert!(step.usage.unwrap().total_tokens > 0);
        assert!(step.started_at.is_some() && step.completed_at.is_some());
    }
    let deploy = step_of(&started, "deploy");
    assert_eq!(deploy.state, pb::StepState::AwaitingApproval as i32);
    assert_eq!(deploy.awaiting, pb::ApprovalGate::BeforeStart as i32);
    assert_eq!(deploy.runs, 0);

    let mut watcher = client.clone();
    let run_id = started.run_id.clone();
    let watching = tokio::spawn(async move { watch_to_end(&mut watcher, &run_id).await });
    let approved = client
        .approve_step(pb::ApproveStepRequest {
            run_id: started.run_id.clone(),
            step: "deploy".to_owned(),
            comment: "ship it".to_owned(),
        })
        .await?
        .into_inner()
        .run
        .unwrap();
    assert_ne!(approved.state, pb::WorkflowState::AwaitingApproval as i32);
    let (_, events) = watching.await??;
    let approval = events
        .iter()
        .find(|e| e.kind == pb::WorkflowEventKind::StepApproved as i32)
        .expect("an approval event");
    assert_eq!(approval.step, "deploy");
    assert_eq!(approval.message, "ship it");
    assert!(approval.actor.starts_with("127.0.0.1:"), "{approval:?}");
    let last = events.last().unwrap();
    assert_eq!(last.kind, pb::WorkflowEventKind::RunFinished as i32);
    assert_eq!(last.run_state, pb::WorkflowState::Succeeded as i32);
    assert!(
        events
            .windows(2)
            .all(|w| w[1].sequence == w[0].sequence + 1),
        "{events:?}"
    );

    let done = get(&mut client, &started.run_id).await?;
    assert_eq!(done.state, pb::WorkflowState::Succeeded as i32, "{done:?}");
    assert!(done.completed_at.is_some());
    let artifacts: Vec<&str> = done.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        artifacts,
        [
            "project_plan",
            "software_specification",
            "system_architecture",
            "source_code",
            "test_results",
            "deployment_log"
        ]
    );
    let total: i64 = done
        .steps
        .iter()
        .map(|s| s.usage.unwrap().total_tokens)
        .sum();
    assert_eq!(done.total_usage.unwrap().total_tokens, total);

    // One workflow id, one correlation id and one trace on every execution.
    assert!(is_trace_id(&done.trace_id), "{:?}", done.trace_id);
    let mut nodes = std::collections::BTreeSet::new();
    let mut records = BTreeMap::new();
    for step in &done.steps {
        let record = execution_of(&fleet, step).await?;
        let metadata = record.metadata.clone().unwrap();
        assert_eq!(metadata.workflow_id, done.workflow_id);
        assert_eq!(metadata.correlation_id, "corr-sdlc");
        assert_eq!(metadata.project_id, "p1");
        assert_eq!(metadata.trace_id, done.trace_id, "step {}", step.name);
        assert_eq!(record.agent_type, step.agent_type);
        assert_eq!(record.output.as_deref(), Some(step.output.as_str()));
        nodes.insert(step.node_id.clone());
        records.insert(step.name.clone(), record);
    }
    assert!(!nodes.is_empty());

    // Each step saw the artifacts of the steps before it.
    let content = |name: &str| artifact_of(&done, name).content.clone();
    let prompt = |step: &str| records[step].rendered_prompt.clone().unwrap_or_default();
    assert!(prompt("analyse").contains(&format!("## project_plan\n{}", content("project_plan"))));
    assert!(prompt("design").contains(&content("software_specification")));
    assert!(prompt("implement").contains(&content("system_architecture")));
    assert!(prompt("implement").contains("Rust"));
    assert_eq!(records["test"].variables["code"], content("source_code"));
    assert!(prompt("deploy").contains(&content("test_results")));
    assert_eq!(content("deployment_log"), step_of(&done, "deploy").output);

    gateway.stop().await?;
    fleet.shutdown().await
}

on_every_backend!(sdlc_workflow_runs_end_to_end);

async fn approval_gates_approve_and_reject_with_an_amendment(
    db: &TestDatabase,
) -> anyhow::Result<()> {
    let audit = AuditNode::start(&db.settings).await?;
    let fleet = AgentFleet::start(1, |_, _| {}).await?;
    let mut settings = gateway_settings(db, &fleet.endpoints);
    settings.endpoints.audit = audit.endpoint();
    let gateway = GatewayNode::start(&settings).await?;
    let mut client = gateway.client().await?;
    let steps = || {
        let mut draft = step("draft", "coder", &[], &[("task", "{{ goal }}")]);
        draft.approve_output = true;
        let review = step(
            "review",
            "tester",
            &["draft"],
            &[("task", "review the draft"), ("code", "{{ draft }}")],
        );
        vec![draft, review]
    };
    let request = || pb::RunWorkflowRequest {
        inputs: [("goal".to_owned(), "write fizzbuzz".to_owned())].into(),
        ..inline("p1", steps(), false)
    };

    let paused = run(&mut client, request()).await?;
    assert_eq!(
        paused.state,
        pb::WorkflowState::AwaitingApproval as i32,
        "{paused:?}"
    );
    let draft = step_of(&paused, "draft");
    assert_eq!(draft.state, pb::StepState::AwaitingApproval as i32);
    assert_eq!(draft.awaiting, pb::ApprovalGate::Output as i32);
    assert!(draft.output.contains("write fizzbuzz"), "{draft:?}");
    assert!(draft.artifact_name.is_empty(), "not accepted yet");
    assert_eq!(
        step_of(&paused, "review").state,
        pb::StepState::Pending as i32
    );

    // Only a step that waits can be decided on.
    let status = client
        .approve_step(pb::ApproveStepRequest {
            run_id: paused.run_id.clone(),
            step: "review".to_owned(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("PENDING"), "{status:?}");

    // Sent back with an amendment: stored as hitl_response, fed to the re-run.
    let amendment = "use iterators, not loops";
    let sent_back = client
        .reject_step(pb::RejectStepRequest {
            run_id: paused.run_id.clone(),
            step: "draft".to_owned(),
            reason: "too imperative".to_owned(),
            amendment: amendment.to_owned(),
        })
        .await?
        .into_inner()
        .run
        .unwrap();
    let hitl = artifact_of(&sent_back, "hitl_response/draft");
    assert_eq!(hitl.kind, pb::WorkflowArtifactKind::HitlResponse as i32);
    assert_eq!(hitl.content, amendment);
    let again = wait_for(&mut client, &paused.run_id, "the amended draft", |run| {
        let draft = step_of(run, "draft");
        draft.state == pb::StepState::AwaitingApproval as i32 && draft.runs == 2
    })
    .await?;
    let draft = step_of(&again, "draft");
    assert_eq!(draft.revisions, 1);
    let rerun = execution_of(&fleet, draft).await?;
    let rendered = rerun.rendered_prompt.unwrap_or_default();
    assert!(
        rendered.contains(&format!("## hitl_response\n{amendment}")),
        "{rendered}"
    );

    let approved = client
        .approve_step(pb::ApproveStepRequest {
            run_id: paused.run_id.clone(),
            step: "draft".to_owned(),
            comment: "better".to_owned(),
        })
        .await?
        .into_inner()
        .run
        .unwrap();
    assert_eq!(
        step_of(&approved, "draft").state,
        pb::StepState::Succeeded as i32
    );
    let (_, _) = watch_to_end(&mut client, &paused.run_id).await?;
    let done = get(&mut client, &paused.run_id).await?;
    assert_eq!(done.state, pb::WorkflowState::Succeeded as i32, "{done:?}");
    let review = execution_of(&fleet, step_of(&done, "review")).await?;
    assert_eq!(
        review.variables["code"],
        artifact_of(&done, "draft").content
    );
    assert_eq!(
        artifact_of(&done, "draft").content,
        step_of(&again, "draft").output
    );

    // Rejected without an amendment: the step and the run fail.
    let second = run(&mut client, request()).await?;
    client
        .reject_step(pb::RejectStepRequest {
            run_id: second.run_id.clone(),
            step: "draft".to_owned(),
            reason: "wrong approach".to_owned(),
            amendment: String::new(),
        })
        .await?;
    let failed = wait_for(&mut client, &second.run_id, "the failed run", |run| {
        run.state == pb::WorkflowState::Failed as i32
    })
    .await?;
    assert!(failed.error.contains("\"draft\""), "{}", failed.error);
    assert!(
        failed.error.contains("rejected by 127.0.0.1:"),
        "{}",
        failed.error
    );
    assert!(failed.error.contains("wrong approach"), "{}", failed.error);
    assert_eq!(
        step_of(&failed, "review").state,
        pb::StepState::Skipped as i32
    );
    let status = client
        .approve_step(pb::ApproveStepRequest {
            run_id: second.run_id.clone(),
            step: "draft".to_owned(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    // Every decision is in the audit trail with who made it.
    let mut auditor = audit.client().await?;
    let mut found = Vec::new();
    for _ in 0..200 {
        found = auditor
            .query(audit_pb::QueryRequest {
                project_id: "p1".to_owned(),
                order: audit_pb::Order::OldestFirst as i32,
                page_size: 100,
                ..Default::default()
            })
            .await?
            .into_inner()
            .entries
            .into_iter()
            .filter_map(|entry| entry.event)
            .filter(|event| event.action.starts_with("workflow.step."))
            .collect();
        if found.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let actions: Vec<&str> = found.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "workflow.step.reject",
            "workflow.step.approve",
            "workflow.step.reject"
        ],
        "{found:?}"
    );
    assert_eq!(found.len(), 3, "{found:?}");
    for event in &found {
        assert!(event.user_id.starts_with("127.0.0.1:"), "{event:?}");
        assert_eq!(event.agent_type, "coder");
    }
    assert_eq!(found[0].workflow_id, paused.workflow_id);
    assert_eq!(found[2].workflow_id, second.workflow_id);

    gateway.stop().await?;
    fleet.shutdown().await?;
    audit.stop().await
}

on_every_backend!(approval_gates_approve_and_reject_with_an_amendment);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_drops_its_in_flight_executions() -> anyhow::Result<()> {
    install_tracing();
    let db = TestDatabase::new(Backend::Sqlite)
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))?;
    let llm = LlmServer::start().await?;
    llm.set_delay(Duration::from_secs(120));
    let fleet = AgentFleet::start(1, |_, settings| {
        settings.agent_service.openai.base_url = Some(llm.base_url());
        settings.agent_service.openai.api_key_env = "AGENTMESH_TEST_NO_SUCH_KEY".to_owned();
        settings.agent_service.openai.max_retries = 0;
        settings.defaults.agent.timeout_seconds = 300;
    })
    .await?;
    let gateway = GatewayNode::start(&gateway_settings(&db, &fleet.endpoints)).await?;
    let mut client = gateway.client().await?;
    let started = run(
        &mut client,
        inline(
            "p1",
            vec![
                step("slow", "coder", &[], &[("task", "think for a long time")]),
                step("after", "tester", &["slow"], &[("task", "never runs")]),
            ],
            true,
        ),
    )
    .await?;
    assert!(
        [
            pb::WorkflowState::Pending as i32,
            pb::WorkflowState::Running as i32
        ]
        .contains(&started.state),
        "{started:?}"
    );
    for _ in 0..400 {
        if llm.in_flight() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        llm.in_flight(),
        1,
        "the provider never got the step's request"
    );
    let running = get(&mut client, &started.run_id).await?;
    assert_eq!(
        step_of(&running, "slow").state,
        pb::StepState::Running as i32
    );

    let cancelled = client
        .cancel_workflow_run(pb::CancelWorkflowRunRequest {
            run_id: started.run_id.clone(),
            reason: "emergency".to_owned(),
        })
        .await?
        .into_inner()
        .run
        .unwrap();
    // The answer is final: the provider's 120 s answer was not waited for.
    assert_eq!(
        cancelled.state,
        pb::WorkflowState::Cancelled as i32,
        "{cancelled:?}"
    );
    assert!(cancelled.error.contains("emergency"), "{}", cancelled.error);
    assert!(
        cancelled.error.contains("cancelled by 127.0.0.1:"),
        "{}",
        cancelled.error
    );
    for step in &cancelled.steps {
        assert_eq!(step.state, pb::StepState::Cancelled as i32, "{step:?}");
    }
    // The provider request was dropped, and the agent recorded the
    // execution as cancelled.
    for _ in 0..400 {
        if llm.in_flight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(llm.in_flight(), 0, "the provider request is still open");
    let mut records = Vec::new();
    for _ in 0..200 {
        records = executions_of_workflow(&fleet, &cancelled.workflow_id).await?;
        if !records.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        records[0].status,
        agent_pb::ExecutionStatus::Cancelled as i32
    );
    assert_eq!(llm.requests(), 1);
    // Cancelling again changes nothing.
    let again = client
        .cancel_workflow_run(pb::CancelWorkflowRunRequest {
            run_id: started.run_id.clone(),
            reason: "twice".to_owned(),
        })
        .await?
        .into_inner()
        .run
        .unwrap();
    assert!(again.error.contains("emergency"));

    gateway.stop().await?;
    fleet.shutdown().await?;
    db.cleanup().await;
    Ok(())
}

async fn a_restarted_gateway_resumes_runs_without_repeating_steps(
    db: &TestDatabase,
) -> anyhow::Result<()> {
    install_tracing();
    let fleet = AgentFleet::start(1, |_, settings| {
        settings.agent_service.local.latency_ms = 400;
    })
    .await?;
    let settings = gateway_settings(db, &fleet.endpoints);
    let gateway = GatewayNode::start(&settings).await?;
    let mut client = gateway.client().await?;
    let started = run(
        &mut client,
        inline(
            "p1",
            vec![
                step("one", "orchestrator", &[], &[("task", "one")]),
                step("two", "analyst", &["one"], &[("task", "two")]),
                step("three", "architect", &["two"], &[("task", "three")]),
                step("four", "coder", &["three"], &[("task", "four")]),
            ],
            true,
        ),
    )
    .await?;
    let before = wait_for(&mut client, &started.run_id, "two finished steps", |run| {
        step_of(run, "two").state == pb::StepState::Succeeded as i32
    })
    .await?;
    gateway.stop().await?;

    // Another gateway on the same database takes the run over.
    let mut settings = settings;
    settings.gateway.gateway_id = Some("gateway-wf-2".to_owned());
    let gateway = GatewayNode::start(&settings).await?;
    let mut client = gateway.client().await?;
    // Replayed from the first event: the whole history of the run.
    let mut stream = client
        .watch_workflow_run(pb::WatchWorkflowRunRequest {
            run_id: started.run_id.clone(),
            after_sequence: Some(0),
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(message) =
        tokio::time::timeout(Duration::from_secs(60), stream.message()).await??
    {
        match message.update {
            Some(pb::watch_workflow_run_response::Update::Event(event)) => events.push(event),
            other => anyhow::bail!("a replay sends events only: {other:?}"),
        }
    }
    assert_eq!(events[0].sequence, 1);
    assert_eq!(events[0].kind, pb::WorkflowEventKind::RunStarted as i32);
    assert!(
        events
            .windows(2)
            .all(|w| w[1].sequence == w[0].sequence + 1)
    );
    let succeeded_steps: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == pb::WorkflowEventKind::StepSucceeded as i32)
        .map(|e| e.step.as_str())
        .collect();
    assert_eq!(succeeded_steps, ["one", "two", "three", "four"]);
    let resumed = events
        .iter()
        .find(|e| e.kind == pb::WorkflowEventKind::RunResumed as i32)
        .expect("a resume event");
    assert!(resumed.message.contains("gateway-wf-2"), "{resumed:?}");
    let done = get(&mut client, &started.run_id).await?;
    assert_eq!(done.state, pb::WorkflowState::Succeeded as i32, "{done:?}");
    assert_eq!(done.trace_id, started.trace_id);
    for name in ["one", "two"] {
        let (then, now) = (step_of(&before, name), step_of(&done, name));
        assert_eq!(now.runs, 1, "{now:?}");
        assert_eq!(now.started_at, then.started_at);
        assert_eq!(now.execution_id, then.execution_id);
    }

    // Each step succeeded exactly once on the agent; the one in flight at
    // the stop may have left a cancelled record.
    let mut succeeded = Vec::new();
    for _ in 0..200 {
        succeeded = executions_of_workflow(&fleet, &done.workflow_id)
            .await?
            .into_iter()
            .filter(|e| e.status == agent_pb::ExecutionStatus::Succeeded as i32)
            .collect();
        if succeeded.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut agents: Vec<&str> = succeeded.iter().map(|e| e.agent_type.as_str()).collect();
    agents.sort_unstable();
    assert_eq!(agents, ["analyst", "architect", "coder", "orchestrator"]);
    for record in &succeeded {
        assert_eq!(record.metadata.as_ref().unwrap().trace_id, done.trace_id);
    }

    gateway.stop().await?;
    fleet.shutdown().await
}

on_every_backend!(a_restarted_gateway_resumes_runs_without_repeating_steps);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_workflows_are_refused_with_the_field_and_rule() -> anyhow::Result<()> {
    let db = TestDatabase::new(Backend::Sqlite)
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))?;
    let fleet = AgentFleet::start(1, |_, _| {}).await?;
    let gateway = GatewayNode::start(&gateway_settings(&db, &fleet.endpoints)).await?;
    let mut client = gateway.client().await?;
    let refused = |status: tonic::Status, code: Code, text: &str| {
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(text),
            "{text:?} not in {status:?}"
        );
    };

    let cycle = vec![
        step("plan", "orchestrator", &[], &[("task", "x")]),
        step("build", "coder", &["plan", "check"], &[("task", "x")]),
        step("check", "tester", &["build"], &[("task", "x")]),
    ];
    let status = run(&mut client, inline("p1", cycle, true))
        .await
        .unwrap_err();
    refused(
        status,
        Code::InvalidArgument,
        "steps[1].depends_on = build -> check -> build: must not form a cycle",
    );

    let unknown = vec![step("build", "coder", &["nope"], &[("task", "x")])];
    let status = run(&mut client, inline("p1", unknown, true))
        .await
        .unwrap_err();
    refused(
        status.clone(),
        Code::InvalidArgument,
        "steps[0].depends_on[0]",
    );
    refused(
        status,
        Code::InvalidArgument,
        "names no step of the workflow",
    );

    let reads_later = vec![
        step("a", "coder", &[], &[("task", "{{ b }}")]),
        step("b", "coder", &[], &[("task", "x")]),
    ];
    let status = run(&mut client, inline("p1", reads_later, true))
        .await
        .unwrap_err();
    refused(status, Code::InvalidArgument, "steps[0].variables.task");

    let mut settings_limit = inline("p1", Vec::new(), true);
    settings_limit.steps = (0..33)
        .map(|i| step(&format!("s{i}"), "coder", &[], &[("task", "x")]))
        .collect();
    let status = run(&mut client, settings_limit).await.unwrap_err();
    refused(status, Code::InvalidArgument, "must have 1 to 32 entries");

    let status = run(
        &mut client,
        inline("", vec![step("a", "coder", &[], &[])], true),
    )
    .await
    .unwrap_err();
    refused(status, Code::InvalidArgument, "project_id");

    let mut both = inline("p1", vec![step("a", "coder", &[], &[])], true);
    both.definition = "sdlc".to_owned();
    let status = run(&mut client, both).await.unwrap_err();
    refused(
        status,
        Code::InvalidArgument,
        "exactly one of steps and definition",
    );

    let mut missing_input = inline("p1", Vec::new(), true);
    missing_input.definition = "sdlc".to_owned();
    let status = run(&mut client, missing_input.clone()).await.unwrap_err();
    refused(status, Code::InvalidArgument, "inputs.task");
    missing_input.inputs = [
        ("task".to_owned(), "x".to_owned()),
        ("colour".to_owned(), "red".to_owned()),
    ]
    .into();
    let status = run(&mut client, missing_input).await.unwrap_err();
    refused(status, Code::InvalidArgument, "inputs.colour");

    let mut unknown_definition = inline("p1", Vec::new(), true);
    unknown_definition.definition = "nope".to_owned();
    let status = run(&mut client, unknown_definition).await.unwrap_err();
    refused(status, Code::NotFound, "\"nope\"");

    let status = get(&mut client, "run_nope").await.unwrap_err();
    let status = status.downcast::<tonic::Status>().unwrap();
    refused(status, Code::NotFound, "run_nope");

    // An unknown agent is the node's verdict: the run fails naming the step.
    let failed = run(
        &mut client,
        inline(
            "p1",
            vec![step("ghost", "no_such_agent", &[], &[("task", "x")])],
            false,
        ),
    )
    .await?;
    assert_eq!(failed.state, pb::WorkflowState::Failed as i32, "{failed:?}");
    assert!(failed.error.contains("step \"ghost\""), "{}", failed.error);
    assert!(failed.error.contains("NOT_FOUND"), "{}", failed.error);

    // Idempotency: a repeat returns the first run; another request with the
    // same key is refused.
    let mut once = inline("p1", vec![step("a", "coder", &[], &[("task", "x")])], false);
    once.idempotency_key = "key-1".to_owned();
    let first = run(&mut client, once.clone()).await?;
    let repeat = run(&mut client, once.clone()).await?;
    assert_eq!(first.run_id, repeat.run_id);
    once.steps[0]
        .variables
        .insert("task".to_owned(), "y".to_owned());
    let status = run(&mut client, once).await.unwrap_err();
    refused(status, Code::FailedPrecondition, "key-1");

    gateway.stop().await?;
    fleet.shutdown().await?;
    db.cleanup().await;
    Ok(())
}

async fn a_project_stop_refuses_new_work_until_resumed(db: &TestDatabase) -> anyhow::Result<()> {
    let fleet = AgentFleet::start(1, |_, settings| {
        settings.agent_service.local.latency_ms = 300;
    })
    .await?;
    let settings = gateway_settings(db, &fleet.endpoints);
    let gateway = GatewayNode::start(&settings).await?;
    let mut client = gateway.client().await?;
    let task = |project: &str| pb::TaskSpec {
        agent_type: "coder".to_owned(),
        variables: [("task".to_owned(), "x".to_owned())].into(),
        project_id: project.to_owned(),
        ..Default::default()
    };
    let held = run(
        &mut client,
        inline(
            "p1",
            vec![
                step("first", "coder", &[], &[("task", "x")]),
                step("second", "tester", &["first"], &[("task", "y")]),
            ],
            true,
        ),
    )
    .await?;
    // Stopped while its first step runs: that execution finishes, nothing
    // new starts.
    wait_for(
        &mut client,
        &held.run_id,
        "the first step to start",
        |run| step_of(run, "first").state == pb::StepState::Running as i32,
    )
    .await?;
    let stopped = client
        .stop_project(pb::StopProjectRequest {
            project_id: "p1".to_owned(),
            reason: "runaway costs".to_owned(),
            cancel_runs: false,
        })
        .await?
        .into_inner();
    assert_eq!(stopped.stop.as_ref().unwrap().reason, "runaway costs");
    assert!(stopped.stop.unwrap().stopped_by.starts_with("127.0.0.1:"));

    let refused = |status: tonic::Status| {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains("project \"p1\" is stopped"),
            "{status:?}"
        );
        assert!(status.message().contains("runaway costs"), "{status:?}");
    };
    refused(
        client
            .execute_task(pb::ExecuteTaskRequest {
                task: Some(task("p1")),
            })
            .await
            .unwrap_err(),
    );
    refused(
        client
            .execute_task_stream(pb::ExecuteTaskStreamRequest {
                task: Some(task("p1")),
            })
            .await
            .unwrap_err(),
    );
    refused(
        client
            .execute_batch(pb::ExecuteBatchRequest {
                tasks: vec![task("p2"), task("p1")],
                max_concurrency: None,
            })
            .await
            .unwrap_err(),
    );
    refused(
        run(
            &mut client,
            inline("p1", vec![step("a", "coder", &[], &[("task", "x")])], true),
        )
        .await
        .unwrap_err(),
    );
    // Other projects are not affected.
    client
        .execute_task(pb::ExecuteTaskRequest {
            task: Some(task("p2")),
        })
        .await?;

    // The running run starts no new step while stopped.
    let paused = wait_for(&mut client, &held.run_id, "the first step", |run| {
        step_of(run, "first").state == pb::StepState::Succeeded as i32
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused = get(&mut client, &paused.run_id).await?;
    assert_eq!(
        step_of(&paused, "second").state,
        pb::StepState::Pending as i32,
        "{paused:?}"
    );

    // The stop survives a restart.
    gateway.stop().await?;
    let gateway = GatewayNode::start(&settings).await?;
    let mut client = gateway.client().await?;
    refused(
        client
            .execute_task(pb::ExecuteTaskRequest {
                task: Some(task("p1")),
            })
            .await
            .unwrap_err(),
    );
    let resumed = client
        .resume_project(pb::ResumeProjectRequest {
            project_id: "p1".to_owned(),
        })
        .await?
        .into_inner();
    assert_eq!(resumed.lifted.unwrap().reason, "runaway costs");
    client
        .execute_task(pb::ExecuteTaskRequest {
            task: Some(task("p1")),
        })
        .await?;
    watch_to_end(&mut client, &held.run_id).await?;
    let mut watch = client
        .watch_workflow_run(pb::WatchWorkflowRunRequest {
            run_id: held.run_id.clone(),
            after_sequence: None,
        })
        .await?
        .into_inner();
    // A finished run's watch is its snapshot alone.
    assert!(watch.message().await?.is_some());
    assert!(watch.message().await?.is_none());
    let done = get(&mut client, &held.run_id).await?;
    assert_eq!(done.state, pb::WorkflowState::Succeeded as i32, "{done:?}");
    let nothing = client
        .resume_project(pb::ResumeProjectRequest {
            project_id: "p1".to_owned(),
        })
        .await?
        .into_inner();
    assert!(nothing.lifted.is_none());

    // Stopping with cancel_runs cancels the project's unfinished runs.
    let long = run(
        &mut client,
        inline(
            "p3",
            vec![
                step("a", "coder", &[], &[("task", "x")]),
                step("b", "coder", &["a"], &[("task", "x")]),
            ],
            true,
        ),
    )
    .await?;
    let stopped = client
        .stop_project(pb::StopProjectRequest {
            project_id: "p3".to_owned(),
            reason: "incident".to_owned(),
            cancel_runs: true,
        })
        .await?
        .into_inner();
    assert_eq!(stopped.cancelled_runs, 1);
    assert_eq!(
        get(&mut client, &long.run_id).await?.state,
        pb::WorkflowState::Cancelled as i32
    );

    gateway.stop().await?;
    fleet.shutdown().await
}

on_every_backend!(a_project_stop_refuses_new_work_until_resumed);

/// Not a check of speed (no timed assertion): prints, for the closing
/// note, a 6-step workflow's wall time against the sum of its step times,
/// as a chain and as a fan-out, with 100 ms of provider latency per step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_step_workflow_wall_time_against_the_sum_of_its_steps() -> anyhow::Result<()> {
    let db = TestDatabase::new(Backend::Sqlite)
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))?;
    let fleet = AgentFleet::start(2, |_, settings| {
        settings.agent_service.local.latency_ms = 100;
    })
    .await?;
    let gateway = GatewayNode::start(&gateway_settings(&db, &fleet.endpoints)).await?;
    let mut client = gateway.client().await?;
    let chain: Vec<pb::WorkflowStep> = [
        "orchestrator",
        "analyst",
        "architect",
        "coder",
        "tester",
        "deployer",
    ]
    .iter()
    .enumerate()
    .map(|(index, agent)| {
        let previous = format!("s{}", index.saturating_sub(1));
        let depends: Vec<&str> = if index == 0 {
            vec![]
        } else {
            vec![previous.as_str()]
        };
        step(
            &format!("s{index}"),
            agent,
            &depends,
            &[("task", "measure")],
        )
    })
    .collect();
    let fan_out = vec![
        step("s0", "orchestrator", &[], &[("task", "measure")]),
        step("s1", "analyst", &["s0"], &[("task", "measure")]),
        step("s2", "architect", &["s0"], &[("task", "measure")]),
        step("s3", "coder", &["s0"], &[("task", "measure")]),
        step("s4", "tester", &["s0"], &[("task", "measure")]),
        step(
            "s5",
            "deployer",
            &["s1", "s2", "s3", "s4"],
            &[("task", "measure")],
        ),
    ];
    for (shape, steps) in [("chain", chain), ("fan-out 1-4-1", fan_out)] {
        let mut walls = Vec::new();
        let mut sums = Vec::new();
        for _ in 0..5 {
            let done = run(&mut client, inline("bench", steps.clone(), false)).await?;
            assert_eq!(done.state, pb::WorkflowState::Succeeded as i32, "{done:?}");
            let wall = micros(&done.completed_at) - micros(&done.created_at);
            let sum: i64 = done
                .steps
                .iter()
                .map(|s| micros(&s.completed_at) - micros(&s.started_at))
                .sum();
            walls.push(wall);
            sums.push(sum);
        }
        walls.sort_unstable();
        sums.sort_unstable();
        let (wall, sum) = (walls[2] as f64 / 1000.0, sums[2] as f64 / 1000.0);
        println!(
            "workflow {shape}: 6 steps, median of 5 runs: wall {wall:.1} ms, sum of step times {sum:.1} ms, wall/sum {:.2}",
            wall / sum
        );
    }
    gateway.stop().await?;
    fleet.shutdown().await?;
    db.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_uses_the_fallback_agent_only_when_allowed() -> anyhow::Result<()> {
    let db = TestDatabase::new(Backend::Sqlite)
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))?;
    // The node refuses every task: its provider does not serve the model.
    let llm = LlmServer::start().await?;
    let mut fleet = AgentFleet::start(1, |_, settings| {
        settings.agent_service.openai.base_url = Some(llm.base_url());
        settings.agent_service.openai.api_key_env = "AGENTMESH_TEST_NO_SUCH_KEY".to_owned();
        settings.agent_service.openai.models = vec!["served-model".to_owned()];
    })
    .await?;
    let gateway = GatewayNode::start(&gateway_settings(&db, &fleet.endpoints)).await?;
    let mut client = gateway.client().await?;
    let one_step = |allow_fallback: bool| {
        let mut only = step("only", "coder", &[], &[("task", "x")]);
        only.allow_fallback = allow_fallback;
        inline("p1", vec![only], false)
    };

    let rescued = run(&mut client, one_step(true)).await?;
    assert_eq!(
        rescued.state,
        pb::WorkflowState::Succeeded as i32,
        "{rescued:?}"
    );
    let only = step_of(&rescued, "only");
    assert!(only.degraded, "{only:?}");
    assert!(
        only.degraded_reason.contains("FAILED_PRECONDITION"),
        "{only:?}"
    );
    assert_eq!(only.node_id, "gateway-wf");
    assert_eq!(only.provider.as_ref().unwrap().provider, "local");

    let failed = run(&mut client, one_step(false)).await?;
    assert_eq!(failed.state, pb::WorkflowState::Failed as i32, "{failed:?}");
    assert!(
        failed
            .error
            .starts_with("step \"only\" (coder) failed: FAILED_PRECONDITION"),
        "{}",
        failed.error
    );
    assert_eq!(
        step_of(&failed, "only").error.as_ref().unwrap().code,
        Code::FailedPrecondition as i32
    );

    // No node at all: the gateway's own fallback answers, which a step
    // without allow_fallback does not accept.
    fleet.stop(0).await?;
    let degraded = run(&mut client, one_step(false)).await?;
    assert_eq!(
        degraded.state,
        pb::WorkflowState::Failed as i32,
        "{degraded:?}"
    );
    assert!(
        degraded.error.contains("does not allow fallback"),
        "{}",
        degraded.error
    );
    let accepted = run(&mut client, one_step(true)).await?;
    assert_eq!(
        accepted.state,
        pb::WorkflowState::Succeeded as i32,
        "{accepted:?}"
    );
    assert_eq!(llm.requests(), 0);

    gateway.stop().await?;
    fleet.shutdown().await?;
    db.cleanup().await;
    Ok(())
}
