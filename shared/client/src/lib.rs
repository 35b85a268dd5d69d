//! Rust clients for agentmesh services.
//!
//! - [`channel`]: a lazily connecting tonic channel with TCP_NODELAY and
//!   W3C trace-context injection, shared by every inter-service client;
//! - [`cache`]: [`CacheClient`] and its `get_or_fetch`, the stampede-free
//!   read-through of the cache service;
//! - [`config_watcher`]: [`ConfigWatcher`], a live snapshot of the config
//!   service's settings that survives the config service going away.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod cache;
pub mod channel;
pub mod config_watcher;

pub use cache::CacheClient;
pub use channel::{ClientError, TracedChannel, connect, connect_lazy, error_chain};
pub use config_watcher::{ConfigSnapshot, ConfigWatcher};
