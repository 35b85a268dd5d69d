//! The cache service: an in-process L1 (moka, bounded by bytes) in front of
//! an optional Redis L2 (bb8-redis), with stampede-free fills through
//! leases, L1 coherence across replicas through Redis pub/sub, and a
//! circuit breaker that keeps the service answering from L1 while Redis is
//! away.
//!
//! - [`service`]: the logic (no tonic types): read-through, writes,
//!   invalidations, leases, stats;
//! - [`l1`] and [`l2`]: the two levels; [`entry`]: the stored value;
//! - [`coherence`]: the invalidation channel and the breaker prober;
//! - [`grpc`]: the thin `CacheService` implementation and its limits;
//! - [`error`]: the one error enum and its mapping to gRPC statuses.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod coherence;
pub mod entry;
pub mod error;
pub mod grpc;
pub mod l1;
pub mod l2;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use agentmesh_client::ConfigWatcher;
use agentmesh_proto::cache::cache_service_server::CacheServiceServer;
use agentmesh_resilience::BreakerState;
use agentmesh_runtime::{GrpcServer, Readiness};
use agentmesh_settings::{Settings, bootstrap::mask_url};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::CacheError;
pub use service::CacheCore;

/// Room for the key, tags and framing around a value of the largest
/// allowed size, so such a `Set` always fits the message limit.
const ENVELOPE_BYTES: usize = 64 * 1024;

/// Why the cache service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `redis_url` could not be parsed.
    #[error("invalid redis_url {url}: {reason}")]
    RedisUrl {
        /// The URL, password masked.
        url: String,
        /// Why.
        reason: String,
    },
    /// The config service endpoint is invalid.
    #[error(transparent)]
    Client(#[from] agentmesh_client::ClientError),
    /// The gRPC server failed.
    #[error(transparent)]
    Runtime(#[from] agentmesh_runtime::RuntimeError),
}

/// Builds the core and its background tasks (invalidation subscriber,
/// breaker prober, gauges) from settings; the default TTL is read live from
/// the config service through `watcher`.
pub fn start_core(
    settings: &Settings,
    watcher: Option<ConfigWatcher>,
    shutdown: &CancellationToken,
) -> Result<Arc<CacheCore>, ServeError> {
    let cache = &settings.cache;
    let l2 = match &settings.redis_url {
        Some(url) => {
            let l2 = l2::L2::new(url, cache, |state| {
                metrics::gauge!("agentmesh_cache_l2_breaker_state")
                    .set(l2::breaker_gauge_value(state));
                match state {
                    BreakerState::Open => {
                        tracing::warn!(
                            "redis breaker opened: serving from L1, L2 reads are misses"
                        );
                    }
                    BreakerState::HalfOpen => {
                        tracing::info!("redis breaker half-open: probing redis")
                    }
                    BreakerState::Closed => tracing::info!("redis breaker closed: L2 is back"),
                }
            })
            .map_err(|error| ServeError::RedisUrl {
                url: mask_url(url),
                reason: error.to_string(),
            })?;
            Some(Arc::new(l2))
        }
        None => None,
    };
    let fallback_ttl = settings.defaults.cache.default_ttl_seconds;
    let default_ttl: service::DefaultTtl = Arc::new(move || {
        let seconds = watcher
            .as_ref()
            .map_or(fallback_ttl, |watcher| {
                watcher.effective(None, None).cache.default_ttl_seconds
            })
            .max(1);
        Duration::from_secs(seconds.unsigned_abs())
    });
    let core = Arc::new(CacheCore::new(
        l1::L1::new(cache.l1_max_bytes),
        l2.clone(),
        default_ttl,
        service::CoreLimits {
            lease_timeout: Duration::from_millis(cache.lease_timeout_ms),
            max_wait: Duration::from_millis(cache.max_wait_ms),
        },
    ));
    metrics::gauge!("agentmesh_cache_l2_breaker_state").set(0.0);
    match &l2 {
        Some(l2) => {
            tracing::info!(
                node_id = core.node_id(),
                redis = %settings.redis_url.as_deref().map(mask_url).unwrap_or_default(),
                l1_max_bytes = cache.l1_max_bytes,
                "cache running with L1 + redis L2"
            );
            tokio::spawn(coherence::run_subscriber(
                Arc::clone(&core),
                Arc::clone(l2),
                shutdown.clone(),
            ));
            tokio::spawn(coherence::run_prober(
                Arc::clone(l2),
                Duration::from_millis((cache.breaker_reset_ms / 2).max(10)),
                shutdown.clone(),
            ));
        }
        None => tracing::info!(
            node_id = core.node_id(),
            l1_max_bytes = cache.l1_max_bytes,
            "cache running L1-only: no redis_url (AGENTMESH_REDIS_URL) configured"
        ),
    }
    let gauges_core = Arc::clone(&core);
    let gauges_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                () = gauges_shutdown.cancelled() => return,
                _ = tick.tick() => gauges_core.report_gauges().await,
            }
        }
    });
    Ok(core)
}

/// Serves `agentmesh.cache.v1.CacheService` on `listener` until `shutdown`.
pub async fn serve(
    settings: &Settings,
    listener: TcpListener,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let watcher = ConfigWatcher::for_settings(settings, &shutdown)?;
    let core = start_core(settings, Some(watcher), &shutdown)?;
    let message_limit = settings
        .server
        .max_message_bytes
        .max(settings.cache.max_value_bytes + ENVELOPE_BYTES);
    let limits = grpc::Limits {
        max_key_bytes: settings.cache.max_key_bytes,
        max_value_bytes: settings.cache.max_value_bytes,
    };
    let service = CacheServiceServer::new(grpc::CacheGrpc::new(core, limits))
        .max_decoding_message_size(message_limit)
        .max_encoding_message_size(message_limit);
    let result = GrpcServer::new(&settings.server, readiness)
        .add_service(service, agentmesh_proto::FILE_DESCRIPTOR_SET)
        .serve(listener, shutdown)
        .await;
    result.map_err(ServeError::from)
}
