//! The config service: validated, revisioned runtime settings in scopes
//! (`global`, `agent/<type>`, `project/<id>`), merged on read, watched live.
//!
//! - [`service`]: the logic (no tonic types): writes with compare-and-set,
//!   the in-memory view every read is served from, and the change feed;
//! - [`store`]: the `config_revisions` table and its queries;
//! - [`grpc`]: the thin `ConfigService` implementation;
//! - [`error`]: the one error enum and its mapping to gRPC statuses.
//!
//! Replicas sharing one database see each other's writes: each polls the
//! revision head (an indexed primary-key probe, every
//! `config_service.poll_interval_ms`) and feeds what it finds to its
//! watchers in revision order.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod error;
pub mod grpc;
pub mod migration;
pub mod service;
pub mod store;

use std::sync::Arc;

use agentmesh_db::Database;
use agentmesh_proto::config::config_service_server::ConfigServiceServer;
use agentmesh_runtime::{GrpcServer, Readiness};
use agentmesh_settings::Settings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::ConfigError;
pub use service::ConfigCore;

/// Why the config service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The database could not be reached or migrated.
    #[error(transparent)]
    Database(#[from] agentmesh_db::DbError),
    /// Seeding or loading the settings failed.
    #[error("cannot load settings from the database: {0}")]
    Load(#[from] ConfigError),
    /// The gRPC server failed.
    #[error(transparent)]
    Runtime(#[from] agentmesh_runtime::RuntimeError),
}

/// Applies the config service's migrations (what `agentmesh migrate` runs).
pub async fn migrate(database: &Database) -> Result<(), agentmesh_db::DbError> {
    database.migrate::<migration::Migrator>().await
}

/// Connects, migrates, seeds `global` on first start, and serves
/// `agentmesh.config.v1.ConfigService` on `listener` until `shutdown`.
pub async fn serve(
    settings: &Settings,
    listener: TcpListener,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let database = Database::connect(settings).await?;
    migrate(&database).await?;
    let core = ConfigCore::start(database.clone(), settings, shutdown.clone()).await?;
    let service = ConfigServiceServer::new(grpc::ConfigGrpc::new(Arc::clone(&core)))
        .max_decoding_message_size(settings.server.max_message_bytes)
        .max_encoding_message_size(settings.server.max_message_bytes);
    let result = GrpcServer::new(&settings.server, readiness)
        .add_service(service, agentmesh_proto::FILE_DESCRIPTOR_SET)
        .serve(listener, shutdown)
        .await;
    core.stop();
    database.close().await;
    result.map_err(ServeError::from)
}
