//! The gateway: the suite's front door. Routes each task to one of the
//! configured agent nodes by power of two choices over the gateway's own
//! in-flight count per node, keeps one circuit breaker per node (settings
//! from the live config), retries a task that failed before any output
//! once on another node within the caller's deadline, and answers from the
//! in-process `local` fallback agent (degraded) when no node can serve.
//!
//! Around every task it serves deterministic responses from the cache
//! service, buffers one audit event per task for the audit service, and
//! returns the trace and request ids in response metadata.
//!
//! - [`node`]: nodes, their breakers and the p2c choice;
//! - [`service`]: the logic; [`grpc`]: the thin tonic face;
//! - [`around`]: admission, cache, audit and overhead around every task,
//!   over [`response_cache`] and [`audit_sink`]; [`metadata`]: the call's
//!   identity and response headers;
//! - [`fallback`]: the in-process fallback agent; [`error`]: errors → statuses.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod around;
pub mod audit_sink;
pub mod error;
pub mod fallback;
pub mod grpc;
pub mod metadata;
pub mod node;
pub mod response_cache;
pub mod service;

use std::sync::Arc;

use agentmesh_agent::catalogue::Catalogue;
use agentmesh_agent::provider::local::LocalProvider;
use agentmesh_client::ConfigWatcher;
use agentmesh_proto::gateway::gateway_service_server::GatewayServiceServer;
use agentmesh_runtime::{GrpcServer, Readiness};
use agentmesh_settings::{GatewayFallback, Settings};
use around::Around;
use audit_sink::AuditSink;
use response_cache::ResponseCache;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::GatewayError;
pub use service::Gateway;

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// An endpoint (config or agent node) is invalid.
    #[error("invalid endpoint: {0}")]
    Endpoint(#[from] agentmesh_client::ClientError),
    /// The agent catalogue file (for the fallback agent) is invalid.
    #[error(transparent)]
    Catalogue(#[from] agentmesh_agent::catalogue::CatalogueError),
    /// The gRPC server failed.
    #[error(transparent)]
    Runtime(#[from] agentmesh_runtime::RuntimeError),
    /// The listener has no local address.
    #[error("cannot read the listener address: {0}")]
    Listener(#[from] std::io::Error),
}

/// Builds the gateway from settings: one node per
/// `gateway.agent_endpoints` entry, the fallback agent when
/// `gateway.fallback = "local"`, the response cache (`endpoints.cache`)
/// and the audit sink (`endpoints.audit`) when enabled. Starts the audit
/// delivery task: call from a Tokio runtime.
pub fn build(
    settings: &Settings,
    gateway_id: String,
    watcher: ConfigWatcher,
) -> Result<Gateway, ServeError> {
    let config = node::breaker_config(&watcher.effective(None, None));
    let nodes = settings
        .gateway
        .agent_endpoints
        .iter()
        .map(|endpoint| {
            node::Node::new(endpoint, config, settings.server.max_message_bytes).map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let fallback = match settings.gateway.fallback {
        GatewayFallback::Local => Some(fallback::Fallback::new(
            Catalogue::load(
                settings.agent_service.catalogue_file.as_deref(),
                &settings.data_dir,
            )?,
            settings.agent_service.sanitize_policy,
            LocalProvider::new(&settings.agent_service.local),
        )),
        GatewayFallback::None => None,
    };
    let cache = ResponseCache::new(&settings.endpoints.cache, &settings.gateway.response_cache)?;
    let audit = if settings.gateway.audit.enabled {
        Some(AuditSink::start(
            &settings.endpoints.audit,
            &settings.gateway.audit,
        )?)
    } else {
        None
    };
    let around = Around::new(gateway_id.clone(), cache, audit);
    Ok(Gateway::new(gateway_id, nodes, watcher, fallback, around))
}

/// Serves `agentmesh.gateway.v1.GatewayService` on `listener` until
/// `shutdown`.
pub async fn serve(
    settings: &Settings,
    listener: TcpListener,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let address = listener.local_addr()?;
    let gateway_id = settings
        .gateway
        .gateway_id
        .clone()
        .unwrap_or_else(|| format!("gateway@{address}"));
    let watcher = ConfigWatcher::start(&settings.endpoints.config, &settings.defaults, &shutdown)?;
    let gateway = Arc::new(build(settings, gateway_id, watcher.clone())?);
    tracing::info!(
        gateway_id = gateway.gateway_id(),
        nodes = settings.gateway.agent_endpoints.len(),
        fallback = ?settings.gateway.fallback,
        response_cache = settings
            .gateway
            .response_cache
            .enabled
            .then_some(settings.endpoints.cache.as_str()),
        audit = settings
            .gateway
            .audit
            .enabled
            .then_some(settings.endpoints.audit.as_str()),
        "gateway starting"
    );
    let service = GatewayServiceServer::new(grpc::GatewayGrpc::new(Arc::clone(&gateway)))
        .max_decoding_message_size(settings.server.max_message_bytes)
        .max_encoding_message_size(settings.server.max_message_bytes);
    let result = GrpcServer::new(&settings.server, readiness)
        .add_service(service, agentmesh_proto::FILE_DESCRIPTOR_SET)
        .serve(listener, shutdown)
        .await;
    // The server has drained: every finished task's event is buffered.
    if let Some(audit) = gateway.around().audit() {
        audit.close().await;
    }
    watcher.stop();
    result.map_err(ServeError::from)
}
