//! Rust clients for agentmesh services.
//!
//! - [`channel`]: a lazily connecting tonic channel with TCP_NODELAY and
//!   W3C trace-context injection, shared by every inter-service client;
//! - [`config_watcher`]: [`ConfigWatcher`], a live snapshot of the config
//!   service's settings that survives the config service going away.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod channel;
pub mod config_watcher;

pub use channel::{ClientError, TracedChannel, connect_lazy};
pub use config_watcher::{ConfigSnapshot, ConfigWatcher};
