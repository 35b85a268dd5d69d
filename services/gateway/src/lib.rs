//! The gateway: the suite's front door. Routes each task to one of the
//! configured agent nodes by power of two choices over the gateway's own
//! in-flight count per node, keeps one circuit breaker per node (settings
//! from the live config), retries a task that failed before any output
//! once on another node within the caller's deadline, and answers from the
//! in-process `local` fallback agent (degraded) when no node can serve.
//!
//! Every call carries an API key unless authentication is off (only on a
//! loopback listener); keys are scoped to projects, rate-limited per key,
//! and each project's tokens are counted against its budgets.
//!
//! - [`node`]: nodes, their breakers and the p2c choice;
//! - [`service`]: the logic; [`grpc`]: the thin tonic face;
//! - [`fallback`]: the in-process fallback agent; [`error`]: errors → statuses;
//! - [`auth`]: API keys, the auth interceptor, rate limits, `KeyService`;
//! - [`budget`]: token budgets and usage counting;
//! - [`migration`]: the gateway's tables.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
pub mod budget;
pub mod error;
pub mod fallback;
pub mod grpc;
pub mod migration;
pub mod node;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use agentmesh_agent::catalogue::Catalogue;
use agentmesh_agent::provider::local::LocalProvider;
use agentmesh_client::ConfigWatcher;
use agentmesh_db::Database;
use agentmesh_proto::gateway::gateway_service_server::GatewayServiceServer;
use agentmesh_proto::gateway::key_service_server::KeyServiceServer;
use agentmesh_runtime::{GrpcServer, Readiness};
use agentmesh_settings::{GatewayFallback, Settings};
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
    /// The database could not be reached or migrated.
    #[error(transparent)]
    Database(#[from] agentmesh_db::DbError),
    /// The API keys could not be loaded.
    #[error("cannot load api keys: {0}")]
    Keys(#[from] GatewayError),
    /// The API key hash secret could not be read or created.
    #[error(transparent)]
    Secret(#[from] auth::key::SecretError),
    /// The auth settings do not fit the listen address.
    #[error("{0}")]
    Auth(String),
}

/// How often idle rate-limit buckets are dropped.
const RETAIN_RECENT_EVERY: Duration = Duration::from_secs(60);

/// Applies the gateway's migrations (what `agentmesh migrate` runs).
pub async fn migrate(database: &Database) -> Result<(), agentmesh_db::DbError> {
    database.migrate::<migration::Migrator>().await
}

/// Builds the gateway from settings: one node per
/// `gateway.agent_endpoints` entry, the fallback agent when
/// `gateway.fallback = "local"`.
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
    Ok(Gateway::new(gateway_id, nodes, watcher, fallback))
}

/// Connects and migrates the gateway's database, loads the API keys and
/// serves `agentmesh.gateway.v1.GatewayService` and `KeyService` on
/// `listener` until `shutdown`; counted token usage is written before this
/// returns.
pub async fn serve(
    settings: &Settings,
    listener: TcpListener,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let address = listener.local_addr()?;
    let auth_enabled =
        auth::is_enabled(&settings.gateway.auth, address).map_err(ServeError::Auth)?;
    let gateway_id = settings
        .gateway
        .gateway_id
        .clone()
        .unwrap_or_else(|| format!("gateway@{address}"));
    let hasher = auth::key::KeyHasher::load(
        settings.gateway.auth.hash_secret.as_deref(),
        &settings.gateway.auth.hash_secret_file(&settings.data_dir),
    )?;
    let database = Database::connect(settings).await?;
    migrate(&database).await?;
    let keyring =
        auth::keyring::Keyring::load(auth::store::KeyStore::new(database.clone())).await?;
    let watcher = ConfigWatcher::start(&settings.endpoints.config, &settings.defaults, &shutdown)?;
    let authenticator = Arc::new(auth::Authenticator::new(
        auth_enabled,
        hasher,
        settings.gateway.auth.bootstrap_admin_key.as_deref(),
        Arc::clone(&keyring),
        auth::limits::RateLimits::new(watcher.clone()),
    ));
    keyring.spawn_refresh(
        Duration::from_millis(settings.gateway.auth.refresh_interval_ms),
        shutdown.clone(),
    );
    spawn_bucket_cleanup(Arc::clone(&authenticator), shutdown.clone());
    log_auth_mode(settings, &authenticator, address);
    let budgets = budget::Budgets::start(settings, database.clone(), watcher.clone())?;
    let gateway =
        Arc::new(build(settings, gateway_id, watcher.clone())?.with_budgets(Arc::clone(&budgets)));
    tracing::info!(
        gateway_id = gateway.gateway_id(),
        nodes = settings.gateway.agent_endpoints.len(),
        fallback = ?settings.gateway.fallback,
        auth = auth_enabled,
        usage_store = budgets.store_name(),
        "gateway starting"
    );
    let interceptor = auth::AuthInterceptor::new(Arc::clone(&authenticator));
    let service = GatewayServiceServer::new(grpc::GatewayGrpc::new(gateway))
        .max_decoding_message_size(settings.server.max_message_bytes)
        .max_encoding_message_size(settings.server.max_message_bytes);
    let keys = KeyServiceServer::new(auth::grpc::KeyGrpc::new(
        authenticator,
        Arc::clone(&budgets),
    ));
    let result = GrpcServer::new(&settings.server, readiness)
        .add_service(
            tonic::service::interceptor::InterceptedService::new(service, interceptor.clone()),
            agentmesh_proto::FILE_DESCRIPTOR_SET,
        )
        .add_service(
            tonic::service::interceptor::InterceptedService::new(keys, interceptor),
            agentmesh_proto::FILE_DESCRIPTOR_SET,
        )
        .serve(listener, shutdown)
        .await;
    watcher.stop();
    budgets.close().await;
    database.close().await;
    result.map_err(ServeError::from)
}

/// Says whether keys are required, loudly when they are not.
fn log_auth_mode(
    settings: &Settings,
    authenticator: &auth::Authenticator,
    address: std::net::SocketAddr,
) {
    let mode = settings.gateway.auth.mode;
    if !authenticator.enabled() {
        tracing::warn!(
            %address,
            ?mode,
            "AUTHENTICATION IS OFF: the gateway accepts every call without an API key because it listens on a loopback address only; \
             to require keys set gateway.auth.mode = \"on\" (AGENTMESH_GATEWAY__AUTH__MODE=on) and a bootstrap admin key \
             (AGENTMESH_GATEWAY__AUTH__BOOTSTRAP_ADMIN_KEY=<32+ random characters>), then create keys with `agentmesh keys create`"
        );
        return;
    }
    if !authenticator.has_bootstrap_key() && !authenticator.keyring().has_admin() {
        tracing::warn!(
            %address,
            "API keys are required but no admin key exists yet: set gateway.auth.bootstrap_admin_key \
             (AGENTMESH_GATEWAY__AUTH__BOOTSTRAP_ADMIN_KEY=<32+ random characters>) and create keys with \
             `agentmesh keys create --api-key <that key> ...`"
        );
    } else {
        tracing::info!(%address, ?mode, "API keys required on every gateway call");
    }
}

/// Drops idle rate-limit buckets now and then, so keys that stopped
/// calling hold no memory.
fn spawn_bucket_cleanup(authenticator: Arc<auth::Authenticator>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RETAIN_RECENT_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => authenticator.limits().retain_recent(),
            }
        }
    });
}
