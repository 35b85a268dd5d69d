//! TLS for the gRPC listeners (rustls), with certificate reload.
//!
//! The certificate, key and client CA files are re-read every
//! `server.tls.reload_interval_ms`; when their bytes change, new connections
//! get the new configuration while established ones keep theirs. A file
//! that cannot be read or parsed during a reload is logged and counted, and
//! the last good configuration stays in use, so a half-written rotation
//! never takes a listener down. Handshakes run off the accept loop with a
//! timeout, so a slow or silent client cannot stall other connections.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use agentmesh_settings::ServerTlsSettings;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {key} {path}: {reason}")]
    Read {
        /// The setting that names the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// A file holds no usable PEM item of the expected kind.
    #[error("{key} {path} holds no valid {what}: {reason}")]
    Parse {
        /// The setting that names the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What was expected in it.
        what: &'static str,
        /// What the parser said.
        reason: String,
    },
    /// rustls refused the combination (e.g. the key does not match).
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// The raw bytes of every configured file, to notice rotations.
#[derive(PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        key,
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

impl Files {
    fn read(settings: &ServerTlsSettings) -> Result<Self, TlsError> {
        let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) else {
            return Err(TlsError::Config(
                "server.tls.cert_file and server.tls.key_file must both be set".to_owned(),
            ));
        };
        Ok(Self {
            cert: read("server.tls.cert_file", cert)?,
            key: read("server.tls.key_file", key)?,
            client_ca: settings
                .client_ca_file
                .as_deref()
                .map(|path| read("server.tls.client_ca_file", path))
                .transpose()?,
        })
    }

    fn build(&self, settings: &ServerTlsSettings) -> Result<ServerConfig, TlsError> {
        let path = |file: &Option<PathBuf>| file.clone().unwrap_or_default();
        let certs = parse_certs(
            "server.tls.cert_file",
            &path(&settings.cert_file),
            &self.cert,
        )?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|error| TlsError::Parse {
            key: "server.tls.key_file",
            path: path(&settings.key_file),
            what: "private key",
            reason: error.to_string(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Config(error.to_string()))?;
        let builder = match &self.client_ca {
            Some(bundle) => {
                let ca_path = path(&settings.client_ca_file);
                let mut roots = RootCertStore::empty();
                for cert in parse_certs("server.tls.client_ca_file", &ca_path, bundle)? {
                    roots.add(cert).map_err(|error| TlsError::Parse {
                        key: "server.tls.client_ca_file",
                        path: ca_path.clone(),
                        what: "CA certificate",
                        reason: error.to_string(),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|error| TlsError::Config(error.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|error| TlsError::Config(error.to_string()))?;
        // gRPC is HTTP/2 only; clients such as grpcurl insist on ALPN.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn parse_certs(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Parse {
            key,
            path: path.to_owned(),
            what: "PEM certificate",
            reason: error.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Parse {
            key,
            path: path.to_owned(),
            what: "PEM certificate",
            reason: "no CERTIFICATE block".to_owned(),
        });
    }
    Ok(certs)
}

/// The listener's current TLS configuration, swapped on reload.
#[derive(Clone)]
pub struct ReloadingTlsConfig {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ReloadingTlsConfig {
    /// Loads the files now (an error here stops the listener from
    /// starting) and re-reads them every `reload_interval` until `stop`.
    pub fn start(settings: &ServerTlsSettings, stop: CancellationToken) -> Result<Self, TlsError> {
        let files = Files::read(settings)?;
        let config = Arc::new(files.build(settings)?);
        let this = Self {
            current: Arc::new(RwLock::new(config)),
        };
        tokio::spawn(this.clone().reload(settings.clone(), files, stop));
        Ok(this)
    }

    /// The configuration new connections use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn reload(self, settings: ServerTlsSettings, mut last: Files, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(settings.reload_interval());
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let outcome = Files::read(&settings).and_then(|files| {
                if files == last {
                    return Ok(None);
                }
                let config = files.build(&settings)?;
                Ok(Some((files, config)))
            });
            match outcome {
                Ok(None) => {}
                Ok(Some((files, config))) => {
                    *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                        Arc::new(config);
                    last = files;
                    metrics::counter!("agentmesh_tls_reloads_total", "outcome" => "ok")
                        .increment(1);
                    tracing::info!(
                        cert_file = ?settings.cert_file,
                        "tls certificate files changed; new connections use them"
                    );
                }
                Err(error) => {
                    metrics::counter!("agentmesh_tls_reloads_total", "outcome" => "error")
                        .increment(1);
                    tracing::warn!(%error, "tls files changed but cannot be used; keeping the previous certificate");
                }
            }
        }
    }
}

/// Accepted, handshaken TLS connections for tonic's
/// `serve_with_incoming_shutdown`, until `stop` is cancelled.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: ReloadingTlsConfig,
    stop: CancellationToken,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (sender, receiver) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                _ = sender.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off a little.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, %peer, "cannot set TCP_NODELAY");
            }
            let acceptor = TlsAcceptor::from(tls.current());
            let sender = sender.clone();
            tokio::spawn(async move {
                if let Some(stream) = handshake(acceptor, stream, peer).await {
                    let _ = sender.send(Ok(stream)).await;
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}

async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    let reason = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => return Some(stream),
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no handshake within {}s", HANDSHAKE_TIMEOUT.as_secs()),
    };
    metrics::counter!("agentmesh_tls_handshake_failures_total").increment(1);
    tracing::debug!(%peer, %reason, "tls handshake failed");
    None
}
