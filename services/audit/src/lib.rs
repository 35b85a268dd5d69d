//! The audit service: an append-only, hash-chained, Ed25519-checkpointed
//! audit trail.
//!
//! - [`chain`]: the byte-exact hashing and signing rules (documented in
//!   `proto/agentmesh/audit/v1/audit.proto`);
//! - [`writer`]: the single writer with group commit (appends return only
//!   after commit);
//! - [`service`]: queries, streaming verification, checkpoints;
//! - [`store`]: the tables and their SQL; [`migration`]: their schema;
//! - [`signing`]: the checkpoint key; [`convert`]: wire ↔ domain with
//!   validation; [`grpc`]: the thin tonic impl; [`error`]: the error enum
//!   and its one mapping to gRPC statuses.
//!
//! Several processes may share one PostgreSQL database: every append
//! transaction locks the single `audit_head` row first, so they extend one
//! chain without forks or gaps.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod chain;
pub mod convert;
pub mod error;
pub mod grpc;
pub mod migration;
pub mod model;
pub mod service;
pub mod signing;
pub mod store;
pub mod writer;

use std::sync::Arc;

use agentmesh_db::Database;
use agentmesh_proto::audit::audit_service_server::AuditServiceServer;
use agentmesh_runtime::{GrpcServer, Readiness};
use agentmesh_settings::Settings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::AuditError;
pub use service::AuditCore;

/// Why the audit service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The database could not be reached or migrated.
    #[error(transparent)]
    Database(#[from] agentmesh_db::DbError),
    /// The signing key could not be loaded or created.
    #[error(transparent)]
    Key(#[from] signing::KeyError),
    /// The gRPC server failed.
    #[error(transparent)]
    Runtime(#[from] agentmesh_runtime::RuntimeError),
}

/// Applies the audit service's migrations (what `agentmesh migrate` runs).
pub async fn migrate(database: &Database) -> Result<(), agentmesh_db::DbError> {
    database.migrate::<migration::Migrator>().await
}

/// Connects, migrates, loads (or creates) the signing key and serves
/// `agentmesh.audit.v1.AuditService` on `listener` until `shutdown`; the
/// writer commits everything queued before this returns.
pub async fn serve(
    settings: &Settings,
    listener: TcpListener,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let signer = signing::Signer::load_or_create(
        &settings
            .audit
            .effective_signing_key_file(&settings.data_dir),
    )?;
    let database = Database::connect(settings).await?;
    migrate(&database).await?;
    tracing::info!(key_id = signer.key_id(), public_key = %hex::encode(signer.public_key()), "audit checkpoint key loaded");
    let core = AuditCore::start(database.clone(), signer, settings);
    let service = AuditServiceServer::new(grpc::AuditGrpc::new(Arc::clone(&core)))
        .max_decoding_message_size(settings.server.max_message_bytes)
        .max_encoding_message_size(settings.server.max_message_bytes);
    let result = GrpcServer::new(&settings.server, readiness)
        .add_service(service, agentmesh_proto::FILE_DESCRIPTOR_SET)
        .serve(listener, shutdown)
        .await;
    core.stop().await;
    database.close().await;
    result.map_err(ServeError::from)
}
