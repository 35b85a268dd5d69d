//! One task through the gateway, seen in a real OTLP receiver: the suite
//! runs as five `agentmesh serve` processes (as in compose and Kubernetes),
//! each exporting spans over OTLP/gRPC to a trace sink in this test, and
//! the task must come out as one trace whose spans come from the gateway,
//! the agent, the cache and the audit service, correctly parented, with the
//! GenAI attributes an operator filters on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use agentmesh_proto::gateway as gw;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

const BINARY: &str = env!("CARGO_BIN_EXE_agentmesh");

/// A span as received, with the service that sent it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: BTreeMap<String, String>,
}

fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(text)) => text.clone(),
        Some(Value::IntValue(number)) => number.to_string(),
        Some(Value::DoubleValue(number)) => number.to_string(),
        Some(Value::BoolValue(flag)) => flag.to_string(),
        _ => String::new(),
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter()
        .map(|pair| {
            (
                pair.key.clone(),
                text(pair.value.as_ref().and_then(|value| value.value.as_ref())),
            )
        })
        .collect()
}

/// The OTLP trace receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|resource| attributes(&resource.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: span.name,
                        kind: span.kind,
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent: hex::encode(&span.parent_span_id),
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The suite's processes, killed when dropped.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `agentmesh serve <service>` on an ephemeral port with `env` and
/// the OTLP exporter pointed at `otlp`; returns its gRPC address.
fn serve(
    processes: &mut Processes,
    service: &str,
    otlp: &str,
    env: &[(&str, String)],
) -> anyhow::Result<String> {
    let data_dir = tempfile::tempdir()?.keep();
    let mut command = Command::new(BINARY);
    command
        .env_clear()
        .args(["serve", service, "--data-dir"])
        .arg(&data_dir)
        .args(["--log-format", "json", "--admin-port", "0"])
        .arg(format!("--{service}-port"))
        .arg("0")
        .env("AGENTMESH_LOG", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    processes.0.push(child);
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Keep draining after the address is known, so the child never
            // blocks on a full pipe.
            let _ = sender.send(line);
        }
    });
    loop {
        let line = receiver
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| anyhow::anyhow!("agentmesh serve {service} did not start"))?;
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let fields = &json["fields"];
        if fields["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("grpc server listening"))
        {
            let address = fields["address"].as_str().unwrap_or_default();
            return Ok(format!("http://{address}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_is_one_trace_across_gateway_agent_cache_and_audit() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let otlp = format!("http://{}", listener.local_addr()?);
    let sink = Sink::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let mut processes = Processes(Vec::new());
    let config = serve(&mut processes, "config", &otlp, &[])?;
    let with_config = [("AGENTMESH_ENDPOINTS__CONFIG", config.clone())];
    let cache = serve(&mut processes, "cache", &otlp, &with_config)?;
    let audit = serve(&mut processes, "audit", &otlp, &with_config)?;
    let agent = serve(&mut processes, "agent", &otlp, &with_config)?;
    let gateway = serve(
        &mut processes,
        "gateway",
        &otlp,
        &[
            ("AGENTMESH_ENDPOINTS__CONFIG", config),
            ("AGENTMESH_ENDPOINTS__CACHE", cache),
            ("AGENTMESH_ENDPOINTS__AUDIT", audit),
            (
                "AGENTMESH_GATEWAY__AGENT_ENDPOINTS",
                format!("[\"{agent}\"]"),
            ),
        ],
    )?;

    let mut client = gw::gateway_service_client::GatewayServiceClient::connect(gateway).await?;
    let response = client
        .execute_task(gw::ExecuteTaskRequest {
            task: Some(gw::TaskSpec {
                agent_type: "coder".to_owned(),
                variables: [("task".to_owned(), "add two numbers".to_owned())].into(),
                project_id: "shop".to_owned(),
                workflow_id: "wf-trace-1".to_owned(),
                correlation_id: "corr-trace-1".to_owned(),
                // A cacheable task: the gateway asks the cache service first.
                cache_policy: gw::CachePolicy::Use as i32,
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    let trace_id = response.trace_id.clone();
    assert_eq!(trace_id.len(), 32, "{response:?}");
    let usage = response.usage.unwrap_or_default();
    assert!(usage.prompt_tokens > 0 && usage.completion_tokens > 0);

    let span_named = |spans: &[Received], service: &str, name: &str| {
        spans
            .iter()
            .find(|span| span.service == service && span.name == name)
            .cloned()
    };
    let expected = [
        (
            "agentmesh-gateway",
            "agentmesh.gateway.v1.GatewayService/ExecuteTask",
        ),
        ("agentmesh-gateway", "invoke_agent coder"),
        ("agentmesh-gateway", "audit.deliver"),
        (
            "agentmesh-cache",
            "agentmesh.cache.v1.CacheService/GetOrLease",
        ),
        ("agentmesh-agent", "agentmesh.agent.v1.AgentService/Execute"),
        (
            "agentmesh-audit",
            "agentmesh.audit.v1.AuditService/AppendBatch",
        ),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans: Vec<Received> = sink
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|span| span.trace_id == trace_id)
            .cloned()
            .collect();
        let complete = expected
            .iter()
            .all(|(service, name)| span_named(&spans, service, name).is_some())
            && spans.iter().any(|span| span.name.starts_with("chat "));
        if complete {
            break spans;
        }
        let names: Vec<_> = spans
            .iter()
            .map(|span| format!("{} {}", span.service, span.name))
            .collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "trace {trace_id} incomplete after 30 s: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Parenting: the gateway's server span is the root; every other span
    // has its parent in the same trace, and each hop's parent is on the
    // calling side.
    let by_id: BTreeMap<&str, &Received> = spans
        .iter()
        .map(|span| (span.span_id.as_str(), span))
        .collect();
    let parent_of = |span: &Received| by_id.get(span.parent.as_str()).copied();
    let root = span_named(&spans, expected[0].0, expected[0].1).unwrap();
    assert!(root.parent.is_empty(), "{root:?}");
    assert_eq!(root.kind, SpanKind::Server as i32);
    for span in &spans {
        if span.span_id != root.span_id {
            assert!(
                parent_of(span).is_some(),
                "{} {} has no parent in the trace",
                span.service,
                span.name
            );
        }
    }
    let task = span_named(&spans, "agentmesh-gateway", "invoke_agent coder").unwrap();
    assert_eq!(task.parent, root.span_id);
    let descends_from = |span: &Received, ancestor: &Received| {
        let mut current = parent_of(span);
        while let Some(parent) = current {
            if parent.span_id == ancestor.span_id {
                return true;
            }
            current = parent_of(parent);
        }
        false
    };
    for (service, name) in [
        (
            "agentmesh-cache",
            "agentmesh.cache.v1.CacheService/GetOrLease",
        ),
        ("agentmesh-agent", "agentmesh.agent.v1.AgentService/Execute"),
    ] {
        let span = span_named(&spans, service, name).unwrap();
        assert_eq!(span.kind, SpanKind::Server as i32, "{name}");
        assert_eq!(
            parent_of(&span).map(|parent| parent.service.as_str()),
            Some("agentmesh-gateway"),
            "{name}"
        );
        assert!(
            descends_from(&span, &task),
            "{name} is not under the task span"
        );
    }
    let delivery = span_named(&spans, "agentmesh-gateway", "audit.deliver").unwrap();
    let append = span_named(
        &spans,
        "agentmesh-audit",
        "agentmesh.audit.v1.AuditService/AppendBatch",
    )
    .unwrap();
    assert_eq!(append.parent, delivery.span_id);
    assert!(descends_from(&delivery, &root));

    // GenAI attributes on the provider call, inside the agent's span.
    let chat = spans
        .iter()
        .find(|span| span.name.starts_with("chat "))
        .unwrap();
    let execute = span_named(
        &spans,
        "agentmesh-agent",
        "agentmesh.agent.v1.AgentService/Execute",
    )
    .unwrap();
    assert_eq!(chat.service, "agentmesh-agent");
    assert_eq!(chat.kind, SpanKind::Client as i32);
    assert!(descends_from(chat, &execute));
    let model = response
        .provider
        .as_ref()
        .map(|p| p.model.clone())
        .unwrap_or_default();
    assert!(!model.is_empty());
    for (key, value) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.provider.name", "local"),
        ("gen_ai.request.model", model.as_str()),
        ("gen_ai.agent.name", "coder"),
        ("agentmesh.project_id", "shop"),
        ("agentmesh.workflow_id", "wf-trace-1"),
        ("agentmesh.correlation_id", "corr-trace-1"),
        (
            "gen_ai.usage.input_tokens",
            &usage.prompt_tokens.to_string(),
        ),
        (
            "gen_ai.usage.output_tokens",
            &usage.completion_tokens.to_string(),
        ),
    ] {
        assert_eq!(
            chat.attributes.get(key).map(String::as_str),
            Some(value),
            "chat span {key}: {:?}",
            chat.attributes
        );
    }
    for (key, value) in [
        ("gen_ai.agent.name", "coder"),
        ("agentmesh.project_id", "shop"),
        ("agentmesh.workflow_id", "wf-trace-1"),
        ("agentmesh.correlation_id", "corr-trace-1"),
        ("agentmesh.degraded", "false"),
        (
            "gen_ai.usage.output_tokens",
            &usage.completion_tokens.to_string(),
        ),
    ] {
        assert_eq!(
            task.attributes.get(key).map(String::as_str),
            Some(value),
            "task span {key}: {:?}",
            task.attributes
        );
    }
    drop(processes);
    Ok(())
}
