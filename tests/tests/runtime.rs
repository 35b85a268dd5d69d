//! What every service gets from the shared runtime, checked on the config
//! service: health, reflection (v1 and v1alpha), request ids, metrics and
//! the graceful shutdown sequence.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use agentmesh_proto::config as pb;
use agentmesh_tests::{Backend, ConfigNode, TestDatabase};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

async fn health_of(channel: Channel, service: &str) -> anyhow::Result<i32> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status)
}

async fn sqlite() -> anyhow::Result<TestDatabase> {
    TestDatabase::new(Backend::Sqlite)
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))
}

#[tokio::test]
async fn health_reports_serving_for_server_and_service() -> anyhow::Result<()> {
    let db = sqlite().await?;
    let node = ConfigNode::start(&db.settings).await?;
    let channel = node.channel().await?;
    assert_eq!(
        health_of(channel.clone(), "").await?,
        ServingStatus::Serving as i32
    );
    assert_eq!(
        health_of(channel.clone(), pb::SERVICE_NAME).await?,
        ServingStatus::Serving as i32
    );
    let unknown = health_of(channel, "agentmesh.cache.v1.CacheService").await;
    let status = unknown
        .expect_err("unregistered service")
        .downcast::<tonic::Status>()?;
    assert_eq!(status.code(), tonic::Code::NotFound);
    node.stop().await
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_only_served_services() -> anyhow::Result<()> {
    use tonic_reflection::pb::{v1, v1alpha};
    let db = sqlite().await?;
    let node = ConfigNode::start(&db.settings).await?;
    let channel = node.channel().await?;

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = v1::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        responses
            .next()
            .await
            .transpose()?
            .and_then(|response| response.message_response)
    else {
        anyhow::bail!("v1 reflection did not list services");
    };
    let mut names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "agentmesh.config.v1.ConfigService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
    );

    // Older grpcurl speaks v1alpha only; it must be able to describe the
    // config service's methods.
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "agentmesh.config.v1.ConfigService".into(),
            ),
        ),
    };
    let mut responses = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        responses
            .next()
            .await
            .transpose()?
            .and_then(|response| response.message_response)
    else {
        anyhow::bail!("v1alpha reflection did not return the file");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    node.stop().await
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() -> anyhow::Result<()> {
    let db = sqlite().await?;
    let node = ConfigNode::start(&db.settings).await?;
    let mut client = node.client().await?;
    let mut request = tonic::Request::new(pb::GetRequest {
        scope: "global".into(),
    });
    request
        .metadata_mut()
        .insert("x-request-id", "req-42".parse()?);
    let response = client.get(request).await?;
    assert_eq!(
        response
            .metadata()
            .get("x-request-id")
            .map(|v| v.to_str())
            .transpose()?,
        Some("req-42")
    );

    let response = client
        .get(pb::GetRequest {
            scope: "global".into(),
        })
        .await?;
    let generated = response
        .metadata()
        .get("x-request-id")
        .map(|v| v.to_str())
        .transpose()?;
    assert!(generated.is_some_and(|id| id.len() >= 32), "{generated:?}");

    // Errors carry it too.
    let mut bad = tonic::Request::new(pb::GetRequest {
        scope: "nope".into(),
    });
    bad.metadata_mut().insert("x-request-id", "req-43".parse()?);
    let status = client.get(bad).await.expect_err("bad scope");
    assert_eq!(
        status
            .metadata()
            .get("x-request-id")
            .map(|v| v.to_str())
            .transpose()?,
        Some("req-43")
    );
    node.stop().await
}

#[tokio::test]
async fn metrics_count_calls_by_service_method_and_code() -> anyhow::Result<()> {
    agentmesh_telemetry::metrics_handle().ok_or_else(|| anyhow::anyhow!("no recorder"))?;
    let db = sqlite().await?;
    let node = ConfigNode::start(&db.settings).await?;
    let mut client = node.client().await?;
    client
        .get_effective(pb::GetEffectiveRequest::default())
        .await?;
    let _ = client
        .get(pb::GetRequest {
            scope: "bad scope".into(),
        })
        .await;
    let text = agentmesh_telemetry::render_metrics();
    let has = |needle: &[&str]| {
        text.lines()
            .any(|line| needle.iter().all(|part| line.contains(part)))
    };
    assert!(
        has(&[
            "grpc_server_handled_total{",
            "grpc_method=\"GetEffective\"",
            "grpc_code=\"OK\""
        ]),
        "{text}"
    );
    assert!(
        has(&[
            "grpc_server_handled_total{",
            "grpc_method=\"Get\"",
            "grpc_code=\"INVALID_ARGUMENT\""
        ]),
        "{text}"
    );
    assert!(
        has(&[
            "grpc_server_handling_seconds_bucket{",
            "grpc_service=\"agentmesh.config.v1.ConfigService\""
        ]),
        "{text}"
    );
    node.stop().await
}

#[tokio::test]
async fn shutdown_reports_not_serving_then_ends_watches() -> anyhow::Result<()> {
    let db = sqlite().await?;
    let mut settings = db.settings.clone();
    settings.server.shutdown_delay_ms = 1500;
    let node = ConfigNode::start(&settings).await?;
    let mut client = node.client().await?;
    let mut watch = client
        .watch(pb::WatchRequest::default())
        .await?
        .into_inner();
    watch.next().await.transpose()?;

    node.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A new connection, as a Kubernetes probe makes, sees NOT_SERVING.
    let probe = node.channel().await?;
    assert_eq!(
        health_of(probe.clone(), "").await?,
        ServingStatus::NotServing as i32
    );
    assert_eq!(
        health_of(probe, pb::SERVICE_NAME).await?,
        ServingStatus::NotServing as i32
    );
    assert!(!node.readiness.is_ready());
    // Watchers are told to go elsewhere instead of holding the drain.
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.next()).await?;
    match ended {
        Some(Err(status)) => assert_eq!(status.code(), tonic::Code::Unavailable),
        other => anyhow::bail!("expected UNAVAILABLE, got {other:?}"),
    }
    node.stop().await
}
