//! The shared gRPC server builder.

use std::convert::Infallible;
use std::time::Duration;

use agentmesh_settings::bootstrap::ServerSettings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::{Service, ServiceBuilder};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::admin::Readiness;
use crate::layers::{GrpcMetricsLayer, make_grpc_span};
use crate::tls::{ReloadingTlsConfig, TlsError};

/// Why a server could not run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Reflection descriptors could not be decoded.
    #[error("cannot build server reflection: {0}")]
    Reflection(String),
    /// The transport failed.
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A socket operation failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS files could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The running tonic server, plaintext or TLS.
type ServeFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// Builds one gRPC listener: register services, then [`GrpcServer::serve`].
pub struct GrpcServer {
    settings: ServerSettings,
    routes: RoutesBuilder,
    service_names: Vec<&'static str>,
    descriptor_sets: Vec<&'static [u8]>,
    health: HealthReporter,
    readiness: Readiness,
}

impl GrpcServer {
    /// Starts a builder with the process's shared readiness registry.
    pub fn new(settings: &ServerSettings, readiness: Readiness) -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        Self {
            settings: settings.clone(),
            routes,
            service_names: Vec::new(),
            descriptor_sets: vec![tonic_health::pb::FILE_DESCRIPTOR_SET],
            health,
            readiness,
        }
    }

    /// Registers a service; it is listed by reflection (from
    /// `descriptor_set`, an encoded `FileDescriptorSet` containing it) and
    /// reported by health under its fully qualified name.
    pub fn add_service<S>(mut self, service: S, descriptor_set: &'static [u8]) -> Self
    where
        S: Service<http::Request<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.routes.add_service(service);
        self.service_names.push(S::NAME);
        if !self
            .descriptor_sets
            .iter()
            .any(|known| std::ptr::eq(*known, descriptor_set))
        {
            self.descriptor_sets.push(descriptor_set);
        }
        self
    }

    /// The health reporter, for services that want to report their own
    /// status (e.g. a lost dependency).
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    async fn set_status(&self, status: ServingStatus) {
        self.health.set_service_status("", status).await;
        for name in &self.service_names {
            self.health.set_service_status(name, status).await;
            self.readiness.set(name, status == ServingStatus::Serving);
        }
    }

    /// Serves on `listener` until `shutdown` is cancelled, then: health goes
    /// NOT_SERVING, the listener keeps accepting for
    /// `server.shutdown_delay_ms` (so load balancers notice), stops
    /// accepting, and in-flight calls get `server.shutdown_grace_seconds` to
    /// finish before their connections are closed.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), RuntimeError> {
        self.set_status(ServingStatus::NotServing).await;

        // Each reflection version describes both, so clients of either see
        // the whole list.
        let mut reflection_v1 =
            tonic_reflection::server::Builder::configure().include_reflection_service(false);
        let mut reflection_v1alpha =
            tonic_reflection::server::Builder::configure().include_reflection_service(false);
        let reflection_sets = [
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        for descriptor_set in self.descriptor_sets.iter().chain(reflection_sets.iter()) {
            reflection_v1 = reflection_v1.register_encoded_file_descriptor_set(descriptor_set);
            reflection_v1alpha =
                reflection_v1alpha.register_encoded_file_descriptor_set(descriptor_set);
        }
        let advertised = self.service_names.iter().copied().chain([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]);
        for name in advertised {
            reflection_v1 = reflection_v1.with_service_name(name);
            reflection_v1alpha = reflection_v1alpha.with_service_name(name);
        }
        self.routes.add_service(
            reflection_v1
                .build_v1()
                .map_err(|error| RuntimeError::Reflection(error.to_string()))?,
        );
        self.routes.add_service(
            reflection_v1alpha
                .build_v1alpha()
                .map_err(|error| RuntimeError::Reflection(error.to_string()))?,
        );

        let layers = ServiceBuilder::new()
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
            .layer(
                TraceLayer::new_for_grpc()
                    .make_span_with(make_grpc_span)
                    .on_request(())
                    .on_response(())
                    .on_body_chunk(())
                    .on_eos(())
                    .on_failure(()),
            )
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(GrpcMetricsLayer)
            .into_inner();

        let local_addr = listener.local_addr()?;
        let routes = std::mem::take(&mut self.routes).routes();
        let stop_accepting = CancellationToken::new();
        let stop_signal = stop_accepting.clone();
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(self.settings.max_concurrent_streams)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(layers)
            .add_routes(routes);
        let stopped = async move { stop_signal.cancelled().await };
        let tls = &self.settings.tls;
        let server: ServeFuture = if tls.enabled() {
            // The reloader and the accept loop stop with the process's
            // shutdown token; the accept loop also when draining starts.
            let config = ReloadingTlsConfig::start(tls, shutdown.clone())?;
            let incoming = crate::tls::incoming(listener, config, stop_accepting.clone());
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        } else {
            if !local_addr.ip().is_loopback() {
                tracing::warn!(
                    host = %self.settings.host,
                    "serving plaintext gRPC on a non-loopback address: set server.tls.cert_file and server.tls.key_file (and server.tls.client_ca_file for mTLS), unless a service-mesh sidecar terminates mTLS in front of this listener"
                );
            }
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        };
        tokio::pin!(server);

        self.set_status(ServingStatus::Serving).await;
        tracing::info!(address = %local_addr, tls = tls.enabled(), mtls = tls.client_ca_file.is_some(), services = ?self.service_names, "grpc server listening");

        tokio::select! {
            result = &mut server => {
                self.set_status(ServingStatus::NotServing).await;
                return result.map_err(RuntimeError::from);
            }
            _ = shutdown.cancelled() => {}
        }

        self.set_status(ServingStatus::NotServing).await;
        let delay = Duration::from_millis(self.settings.shutdown_delay_ms);
        if !delay.is_zero() {
            tracing::info!(address = %local_addr, delay_ms = self.settings.shutdown_delay_ms, "not serving, still accepting before drain");
            tokio::select! {
                result = &mut server => return result.map_err(RuntimeError::from),
                _ = tokio::time::sleep(delay) => {}
            }
        }
        stop_accepting.cancel();
        let grace = Duration::from_secs(self.settings.shutdown_grace_seconds);
        match tokio::time::timeout(grace, &mut server).await {
            Ok(result) => {
                tracing::info!(address = %local_addr, "grpc server drained");
                result.map_err(RuntimeError::from)
            }
            Err(_) => {
                tracing::warn!(address = %local_addr, grace_seconds = grace.as_secs(), "grace period over, closing remaining calls");
                Ok(())
            }
        }
    }
}
