//! The agent service: runs catalogue agents against an LLM provider
//! through a bounded pool, sanitises template variables, renders them with
//! a strict template engine, runs batches under the live
//! `batch.max_concurrency`, records every execution (with the profiler's
//! stage timings) for replay, and keeps per-project context artifacts with
//! a retention job.
//!
//! - [`provider`]: `openai` (pooled, bounded, retrying, SSE) and `local`;
//! - [`limiter`]: the resizable in-flight bound with a bounded, timed queue;
//! - [`catalogue`], [`template`], [`sanitize`]: agents, rendering, checks;
//! - [`service`]: the logic; [`grpc`]: the thin tonic face;
//! - [`store`], [`recorder`], [`migration`]: persistence;
//! - [`profiler`]: per-stage timings; [`error`]: errors → gRPC statuses.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod catalogue;
pub mod error;
pub mod grpc;
pub mod limiter;
pub mod migration;
pub mod profiler;
pub mod provider;
pub mod recorder;
pub mod sanitize;
pub mod service;
pub mod store;
pub mod template;

use std::net::SocketAddr;
use std::sync::Arc;

use agentmesh_client::ConfigWatcher;
use agentmesh_db::Database;
use agentmesh_proto::agent::agent_service_server::AgentServiceServer;
use agentmesh_runtime::{GrpcServer, Readiness};
use agentmesh_settings::Settings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::AgentError;
pub use service::AgentCore;

/// Why the agent service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The database could not be reached or migrated.
    #[error(transparent)]
    Database(#[from] agentmesh_db::DbError),
    /// The agent catalogue file is invalid.
    #[error(transparent)]
    Catalogue(#[from] catalogue::CatalogueError),
    /// The config endpoint is invalid.
    #[error("cannot watch the config service: {0}")]
    Config(#[from] agentmesh_client::ClientError),
    /// The provider's HTTP client could not be built.
    #[error("cannot build the LLM provider client: {0}")]
    Provider(#[from] reqwest::Error),
    /// The gRPC server failed.
    #[error(transparent)]
    Runtime(#[from] agentmesh_runtime::RuntimeError),
    /// The listener has no local address.
    #[error("cannot read the listener address: {0}")]
    Listener(#[from] std::io::Error),
}

/// Applies the agent service's migrations (what `agentmesh migrate` runs).
pub async fn migrate(database: &Database) -> Result<(), agentmesh_db::DbError> {
    database.migrate::<migration::Migrator>().await
}

/// The node id: `agent_service.node_id`, else the listener's `host:port`
/// (the host name when bound to every interface).
pub fn node_id(settings: &Settings, address: SocketAddr) -> String {
    if let Some(node_id) = &settings.agent_service.node_id {
        return node_id.clone();
    }
    if address.ip().is_unspecified() {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".to_owned());
        return format!("{host}:{}", address.port());
    }
    address.to_string()
}

/// Connects, migrates, starts the recorder, the config watcher and the
/// retention job, and serves `agentmesh.agent.v1.AgentService` on
/// `listener` until `shutdown`.
pub async fn serve(
    settings: &Settings,
    listener: TcpListener,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    provider::openai::install_crypto_provider();
    let node_id = node_id(settings, listener.local_addr()?);
    let catalogue = catalogue::Catalogue::load(
        settings.agent_service.catalogue_file.as_deref(),
        &settings.data_dir,
    )?;
    let database = Database::connect(settings).await?;
    migrate(&database).await?;
    let watcher = ConfigWatcher::for_settings(settings, &shutdown)?;
    let pool_size = watcher.effective(None, None).llm.pool_size.max(1) as usize;
    let provider = provider::Provider::from_settings(&settings.agent_service, pool_size)?;
    let store = store::Store::new(database.clone());
    // The recorder outlives the server so in-flight records are written.
    let recorder_stop = CancellationToken::new();
    let (recorder, recorder_task) = recorder::Recorder::start(
        store.clone(),
        settings.agent_service.record_queue,
        recorder_stop.clone(),
    );
    tracing::info!(
        node_id,
        provider = provider.name(),
        offline = provider.offline(),
        "agent service starting"
    );
    let core = AgentCore::new(
        node_id,
        settings.agent_service.clone(),
        catalogue,
        watcher.clone(),
        provider,
        recorder,
        store,
        shutdown.clone(),
    );
    let background = core.spawn_background();
    let service = AgentServiceServer::new(grpc::AgentGrpc::new(Arc::clone(&core)))
        .max_decoding_message_size(settings.server.max_message_bytes)
        .max_encoding_message_size(settings.server.max_message_bytes);
    let result = GrpcServer::new(&settings.server, readiness)
        .add_service(service, agentmesh_proto::FILE_DESCRIPTOR_SET)
        .serve(listener, shutdown)
        .await;
    watcher.stop();
    for task in background {
        task.abort();
    }
    drop(core);
    recorder_stop.cancel();
    let _ = recorder_task.await;
    database.close().await;
    result.map_err(ServeError::from)
}
