//! Traced, lazily connecting channels.

use std::time::Duration;

use agentmesh_telemetry::TraceContextInterceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A channel that injects the caller's trace context into every request.
pub type TracedChannel = InterceptedService<Channel, TraceContextInterceptor>;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a valid URI.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Builds a channel to `endpoint` (`http://host:port`) that connects on
/// first use and reconnects by itself, with TCP_NODELAY, HTTP/2 keep-alive
/// and trace propagation.
pub fn connect_lazy(endpoint: &str) -> Result<TracedChannel, ClientError> {
    let channel = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|error| ClientError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason: error.to_string(),
        })?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(InterceptedService::new(channel, TraceContextInterceptor))
}
