//! Settings for agentmesh.
//!
//! Two kinds live here:
//! - [`bootstrap`]: what a process needs to start (ports, URLs, pools), read
//!   once from defaults < TOML file < `AGENTMESH_*` environment and validated
//!   as a whole;
//! - [`live`]: the runtime settings the config service serves and every
//!   service reads live (model, temperature, breaker, TTLs…), with their
//!   validation rules, scopes and merge order.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod bootstrap;
pub mod live;

pub use bootstrap::{
    AgentServiceSettings, AuditOverflow, AuthMode, CacheServiceSettings, ClientTlsSettings,
    GatewayAuditSettings, GatewayAuthSettings, GatewayBudgetSettings, GatewayFallback,
    GatewaySettings, LoadError, LogFormat, ProviderKind, ResponseCacheSettings, SanitizePolicy,
    ServerTlsSettings, Settings, Violation, WorkflowSettings,
};
pub use live::{LiveSettings, Scope};
