//! The shared runtime every agentmesh service starts through.
//!
//! [`GrpcServer`] registers services and gives each, for free: gRPC health
//! (NOT_SERVING until ready and again on shutdown), server reflection v1 and
//! v1alpha, the trace layer (W3C context, request ids), Prometheus metrics by
//! service/method/code, TCP_NODELAY, HTTP/2 limits and a bounded graceful
//! drain. [`admin`] serves `/metrics`, `/healthz` and `/readyz`;
//! [`shutdown`] turns SIGTERM/SIGINT into a cancellation token; [`tls`]
//! serves TLS or mTLS with certificates reloaded when their files change.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod layers;
pub mod server;
pub mod shutdown;
pub mod tls;

pub use admin::{Readiness, serve_admin};
pub use server::{GrpcServer, RuntimeError};
pub use shutdown::{ShutdownToken, shutdown_on_signals};
pub use tls::{ReloadingTlsConfig, TlsError};
