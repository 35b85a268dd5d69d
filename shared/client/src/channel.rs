//! Traced, lazily connecting channels, over TLS for `https://` endpoints.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agentmesh_settings::ClientTlsSettings;
use agentmesh_telemetry::TraceContextInterceptor;
use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
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
    /// A TLS file named in `endpoints.tls` could not be read or used.
    #[error("cannot use {key} {path}: {reason}")]
    TlsFile {
        /// The setting naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The endpoint could not be reached.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Why, with the transport error's causes.
        reason: String,
    },
    /// rustls refused the TLS configuration.
    #[error("invalid TLS configuration: {0}")]
    TlsConfig(String),
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|error| ClientError::TlsFile {
        key,
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

/// Where a channel connects: tonic's own connector for `http://`, a TLS
/// connector of ours for `https://` (the endpoint then names the plain
/// address; requests still carry the https origin).
struct Target {
    endpoint: Endpoint,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Target {
    fn new(endpoint: &str, tls: &ClientTlsSettings) -> Result<Self, ClientError> {
        let invalid = |reason: String| ClientError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let configure = |address: String| {
            Endpoint::from_shared(address)
                .map_err(|error| invalid(error.to_string()))
                .map(|builder| {
                    builder
                        .tcp_nodelay(true)
                        .connect_timeout(Duration::from_secs(5))
                        .http2_keep_alive_interval(Duration::from_secs(30))
                        .keep_alive_timeout(Duration::from_secs(10))
                        .keep_alive_while_idle(true)
                })
        };
        let Some(rest) = endpoint.strip_prefix("https://") else {
            return Ok(Self {
                endpoint: configure(endpoint.to_owned())?,
                tls: None,
            });
        };
        let origin: http::Uri = endpoint
            .parse()
            .map_err(|error: http::uri::InvalidUri| invalid(error.to_string()))?;
        let host = origin
            .host()
            .ok_or_else(|| invalid("has no host".to_owned()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = tls.server_name.clone().unwrap_or(host);
        let server_name = ServerName::try_from(server_name.clone())
            .map_err(|error| invalid(format!("server name {server_name:?}: {error}")))?;
        let connector = TlsConnector::from(Arc::new(rustls_client_config(tls)?));
        Ok(Self {
            endpoint: configure(format!("http://{rest}"))?.origin(origin),
            tls: Some((connector, server_name)),
        })
    }
}

/// TCP, then a TLS handshake presenting `server_name`.
fn tls_connect(
    connector: TlsConnector,
    server_name: ServerName<'static>,
) -> impl tower::Service<
    http::Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future: Send,
> + Send
+ 'static {
    tower::service_fn(move |uri: http::Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        async move {
            let host = uri.host().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let stream = connector.connect(server_name, tcp).await?;
            Ok(TokioIo::new(stream))
        }
    })
}

/// Builds a channel to `endpoint` (`http://host:port`, or `https://…` for
/// TLS with `tls`) that connects on first use and reconnects by itself,
/// with TCP_NODELAY, HTTP/2 keep-alive and trace propagation.
///
/// Over TLS the client certificate (`tls.cert_file`, `tls.key_file`) is
/// read at every handshake, so a rotated certificate reaches the new
/// connections of long-lived channels without a restart.
pub fn connect_lazy(endpoint: &str, tls: &ClientTlsSettings) -> Result<TracedChannel, ClientError> {
    let target = Target::new(endpoint, tls)?;
    let channel = match target.tls {
        None => target.endpoint.connect_lazy(),
        Some((connector, name)) => target
            .endpoint
            .connect_with_connector_lazy(tls_connect(connector, name)),
    };
    Ok(InterceptedService::new(channel, TraceContextInterceptor))
}

/// Like [`connect_lazy`], but connects now, so that an unreachable
/// endpoint is reported at once, and without trace propagation: for
/// command-line tools, which add their own interceptors.
pub async fn connect(endpoint: &str, tls: &ClientTlsSettings) -> Result<Channel, ClientError> {
    let target = Target::new(endpoint, tls)?;
    let connected = match target.tls {
        None => target.endpoint.connect().await,
        Some((connector, name)) => {
            target
                .endpoint
                .connect_with_connector(tls_connect(connector, name))
                .await
        }
    };
    connected.map_err(|error| ClientError::Connect {
        endpoint: endpoint.to_owned(),
        reason: error_chain(&error),
    })
}

/// `error` and its sources, joined by `: ` (tonic's transport error alone
/// says only "transport error").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The system's trust store, loaded once per process (it can take a few
/// hundred milliseconds).
fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for error in &loaded.errors {
            tracing::warn!(%error, "cannot read part of the system trust store");
        }
        loaded.certs
    })
}

fn parse_certs(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| ClientError::TlsFile {
            key,
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
    if certs.is_empty() {
        return Err(ClientError::TlsFile {
            key,
            path: path.to_owned(),
            reason: "no CERTIFICATE block".to_owned(),
        });
    }
    Ok(certs)
}

/// The rustls configuration of `endpoints.tls`: its CA or the system's
/// roots, its client certificate re-read at each handshake, ALPN h2.
fn rustls_client_config(tls: &ClientTlsSettings) -> Result<ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            let pem = read("endpoints.tls.ca_file", path)?;
            for cert in parse_certs("endpoints.tls.ca_file", path, &pem)? {
                roots.add(cert).map_err(|error| ClientError::TlsFile {
                    key: "endpoints.tls.ca_file",
                    path: path.clone(),
                    reason: error.to_string(),
                })?;
            }
        }
        None => {
            roots.add_parsable_certificates(native_roots().iter().cloned());
        }
    }
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| ClientError::TlsConfig(error.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let resolver = ReloadingClientCert {
                cert: cert.clone(),
                key: key.clone(),
                provider,
            };
            // Fail now on unusable files rather than at the first handshake.
            resolver.load()?;
            builder.with_client_cert_resolver(Arc::new(resolver))
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The client certificate and key, read from their files at each TLS
/// handshake (new connections only), so rotations need no restart.
#[derive(Debug)]
struct ReloadingClientCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
}

impl ReloadingClientCert {
    fn load(&self) -> Result<CertifiedKey, ClientError> {
        let pem = read("endpoints.tls.cert_file", &self.cert)?;
        let certs = parse_certs("endpoints.tls.cert_file", &self.cert, &pem)?;
        let key_pem = read("endpoints.tls.key_file", &self.key)?;
        let unusable = |reason: String| ClientError::TlsFile {
            key: "endpoints.tls.key_file",
            path: self.key.clone(),
            reason,
        };
        let key =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| unusable(error.to_string()))?;
        let key = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|error| unusable(error.to_string()))?;
        Ok(CertifiedKey::new(certs, key))
    }
}

impl ResolvesClientCert for ReloadingClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        match self.load() {
            Ok(key) => Some(Arc::new(key)),
            Err(error) => {
                // The handshake goes on without a certificate; a server
                // that requires one refuses it and the call says so.
                tracing::warn!(%error, "cannot load the client certificate for a TLS handshake");
                None
            }
        }
    }

    fn has_certs(&self) -> bool {
        true
    }
}
