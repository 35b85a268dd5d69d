//! The gateway: the suite's front door. Routes each task to one of the
//! agent nodes (configured endpoints, names re-resolved from DNS) by power
//! of two choices over each node's load (peak-EWMA latency times work in
//! flight, informed by the node's `GetLoad`), keeps one circuit breaker per
//! node (settings from the live config), retries a task that failed before
//! any output on another node within the caller's deadline and a retry
//! budget, and answers from the in-process `local` fallback agent
//! (degraded) when no node can serve.
//!
//! Around every task it serves deterministic responses from the cache
//! service, buffers one audit event per task for the audit service, and
//! returns the trace and request ids in response metadata. Every call
//! carries an API key unless authentication is off (only on a loopback
//! listener); keys are scoped to projects, rate-limited per key, and each
//! project's tokens are counted against its budgets.
//!
//! - [`fleet`]: the node set, DNS re-resolution and load polling;
//! - [`node`]: nodes, their breakers and the p2c choice;
//! - [`service`]: the logic; [`grpc`]: the thin tonic face;
//! - [`around`]: admission, cache, audit and overhead around every task,
//!   over [`response_cache`] and [`audit_sink`]; [`metadata`]: the call's
//!   identity and response headers;
//! - [`auth`]: API keys, the auth interceptor, rate limits, `KeyService`;
//! - [`budget`]: token budgets and usage counting;
//! - [`fallback`]: the in-process fallback agent; [`error`]: errors → statuses;
//! - [`workflow`]: durable multi-agent workflow runs, approvals, cancels
//!   and per-project emergency stops; [`migration`]: the gateway's schema.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod around;
pub mod audit_sink;
pub mod auth;
pub mod budget;
pub mod error;
pub mod fallback;
pub mod fleet;
pub mod grpc;
pub mod metadata;
pub mod migration;
pub mod node;
pub mod response_cache;
pub mod service;
pub mod workflow;

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
use around::Around;
use audit_sink::AuditSink;
use response_cache::ResponseCache;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::GatewayError;
pub use service::{Gateway, RetryPolicy};

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
    /// A workflow definition file is invalid.
    #[error(transparent)]
    Definitions(#[from] workflow::definition::DefinitionError),
    /// Runs could not be resumed at start-up.
    #[error("cannot resume workflow runs: {0}")]
    Workflows(GatewayError),
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
/// `gateway.fallback = "local"`, the response cache (`endpoints.cache`)
/// and the audit sink (`endpoints.audit`) when enabled. Starts the audit
/// delivery task: call from a Tokio runtime.
pub fn build(
    settings: &Settings,
    gateway_id: String,
    watcher: ConfigWatcher,
) -> Result<Gateway, ServeError> {
    let config = node::breaker_config(&watcher.effective(None, None));
    let fleet = Arc::new(fleet::Fleet::new(
        &settings.gateway,
        node::ConnectOptions {
            tls: settings.endpoints.tls.clone(),
            max_message_bytes: settings.server.max_message_bytes,
            connections: settings.gateway.connections_per_node as usize,
        },
        config,
    )?);
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
    let retry = RetryPolicy {
        max_attempts: settings.gateway.max_attempts,
        budget_ratio: settings.gateway.retry_budget_percent as f32 / 100.0,
        min_per_second: settings.gateway.retry_min_per_second,
    };
    let cache = ResponseCache::new(
        &settings.endpoints.cache,
        &settings.endpoints.tls,
        &settings.gateway.response_cache,
    )?;
    let audit = if settings.gateway.audit.enabled {
        Some(AuditSink::start(
            &settings.endpoints.audit,
            &settings.endpoints.tls,
            &settings.gateway.audit,
        )?)
    } else {
        None
    };
    let around = Around::new(gateway_id.clone(), cache, audit);
    Ok(Gateway::new(
        gateway_id, fleet, watcher, fallback, retry, around,
    ))
}

/// Connects and migrates the gateway's database, loads the API keys and
/// the workflow definitions, resumes the runs this gateway may drive, and
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
    let watcher = ConfigWatcher::for_settings(settings, &shutdown)?;
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
    let gateway = Arc::new(
        build(settings, gateway_id.clone(), watcher.clone())?.with_budgets(Arc::clone(&budgets)),
    );
    {
        // Resolve names before serving, then keep nodes and loads current.
        let watcher = watcher.clone();
        let config = move || node::breaker_config(&watcher.effective(None, None));
        gateway.fleet().refresh(config()).await;
        gateway.fleet().spawn(config, &shutdown);
    }
    let limits = workflow::definition::Limits {
        max_steps: settings.gateway.workflows.max_steps,
    };
    let definitions = workflow::definition::Definitions::load(
        &settings
            .gateway
            .workflows
            .definitions_dir(&settings.data_dir),
        limits,
    )?;
    let workflows = workflow::Workflows::new(
        Arc::clone(&gateway),
        workflow::store::Store::new(database.clone()),
        definitions,
        settings.gateway.workflows.clone(),
        gateway_id,
        workflow::audit::AuditSink::new(&settings.endpoints.audit, &settings.endpoints.tls),
        shutdown.child_token(),
    );
    if let Err(error) = workflows.start().await {
        watcher.stop();
        database.close().await;
        return Err(ServeError::Workflows(error.into()));
    }
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
        auth = auth_enabled,
        usage_store = budgets.store_name(),
        "gateway starting"
    );
    let interceptor = auth::AuthInterceptor::new(Arc::clone(&authenticator));
    let service = GatewayServiceServer::new(grpc::GatewayGrpc::new(
        Arc::clone(&gateway),
        Arc::clone(&workflows),
    ))
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
    workflows.stop().await;
    // The server has drained: every finished task's event is buffered.
    if let Some(audit) = gateway.around().audit() {
        audit.close().await;
    }
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
