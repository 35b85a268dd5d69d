//! Traced, lazily connecting channels, over TLS for `https://` endpoints.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentmesh_settings::ClientTlsSettings;
use agentmesh_telemetry::TraceContextInterceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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
    /// A TLS file named in `endpoints.tls` could not be read.
    #[error("cannot read {key} {path}: {reason}")]
    TlsFile {
        /// The setting naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|error| ClientError::TlsFile {
        key,
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

/// The TLS client configuration for `endpoints.tls`: its CA (else the
/// system's roots), its client certificate for mTLS, its server name.
/// The files are read on every call, so channels built after a rotation
/// use the new files.
pub fn client_tls_config(tls: &ClientTlsSettings) -> Result<ClientTlsConfig, ClientError> {
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca_file {
        Some(path) => {
            config.ca_certificate(Certificate::from_pem(read("endpoints.tls.ca_file", path)?))
        }
        None => config.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        config = config.identity(Identity::from_pem(
            read("endpoints.tls.cert_file", cert)?,
            read("endpoints.tls.key_file", key)?,
        ));
    }
    if let Some(name) = &tls.server_name {
        config = config.domain_name(name.clone());
    }
    Ok(config)
}

/// Builds a channel to `endpoint` (`http://host:port`, or `https://…` for
/// TLS with `tls`) that connects on first use and reconnects by itself,
/// with TCP_NODELAY, HTTP/2 keep-alive and trace propagation.
pub fn connect_lazy(endpoint: &str, tls: &ClientTlsSettings) -> Result<TracedChannel, ClientError> {
    let invalid = |reason: String| ClientError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let mut builder = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|error| invalid(error.to_string()))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if endpoint.starts_with("https://") {
        builder = builder
            .tls_config(client_tls_config(tls)?)
            .map_err(|error| invalid(error.to_string()))?;
    }
    Ok(InterceptedService::new(
        builder.connect_lazy(),
        TraceContextInterceptor,
    ))
}
