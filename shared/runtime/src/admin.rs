//! The admin HTTP endpoint, one per process: `/metrics` (Prometheus text),
//! `/healthz` (the process is up) and `/readyz` (every registered gRPC
//! service is SERVING).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Readiness of every service in this process.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    services: Arc<Mutex<HashMap<String, bool>>>,
}

impl Readiness {
    /// Records whether `service` is ready.
    pub fn set(&self, service: &str, ready: bool) {
        if let Ok(mut services) = self.services.lock() {
            services.insert(service.to_owned(), ready);
        }
    }

    /// Returns true when at least one service is registered and all are ready.
    pub fn is_ready(&self) -> bool {
        self.services
            .lock()
            .map(|services| !services.is_empty() && services.values().all(|ready| *ready))
            .unwrap_or(false)
    }
}

/// Serves the admin endpoint on `listener` until `shutdown` is cancelled.
pub async fn serve_admin(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let handle = agentmesh_telemetry::metrics_handle();
    if let Some(handle) = handle {
        let upkeep_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => handle.run_upkeep(),
                    _ = upkeep_shutdown.cancelled() => break,
                }
            }
        });
    }
    let app = Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    agentmesh_telemetry::render_metrics(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move {
                    if readiness.is_ready() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
