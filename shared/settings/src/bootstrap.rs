//! Bootstrap settings: defaults < TOML file (`--config` / `AGENTMESH_CONFIG`)
//! < `AGENTMESH_*` environment (nested keys joined with `__`).
//!
//! Unknown keys are rejected, and [`Settings::validate`] reports every bad key
//! at once with its value and rule.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::live::LiveSettings;

/// Environment variables read with the `AGENTMESH_` prefix that are not
/// settings keys: the config file path and the log filter.
const NON_SETTING_ENV_KEYS: &[&str] = &["config", "log"];

/// The effective bootstrap settings of one process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Folder for the embedded SQLite database and generated keys.
    pub data_dir: PathBuf,
    /// Writer database (`sqlite://…` or `postgres://…`); SQLite under
    /// `data_dir` when unset.
    pub database_url: Option<String>,
    /// Read replica; reads go to the writer when unset.
    pub read_database_url: Option<String>,
    /// Redis for the cache service's L2 (`redis://…` or `rediss://…`); the
    /// cache runs L1-only when unset.
    pub redis_url: Option<String>,
    /// Addresses and limits of the gRPC listeners.
    pub server: ServerSettings,
    /// Listening ports of each service and of the admin HTTP endpoint.
    pub ports: PortSettings,
    /// Connection pools.
    pub database: DatabaseSettings,
    /// Where services find each other.
    pub endpoints: EndpointSettings,
    /// The config service's own behaviour.
    pub config_service: ConfigServiceSettings,
    /// The cache service's own behaviour.
    pub cache: CacheServiceSettings,
    /// The audit service's own behaviour.
    pub audit: AuditSettings,
    /// The agent service: node identity, limits, providers, recording.
    pub agent_service: AgentServiceSettings,
    /// The gateway: agent nodes, routing and fallback.
    pub gateway: GatewaySettings,
    /// Log output.
    pub telemetry: TelemetrySettings,
    /// Values seeded into the `global` scope on the config service's first
    /// start, and used by services before they reach the config service.
    pub defaults: LiveSettings,
}

/// gRPC listener settings shared by every service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address to bind (containers set `0.0.0.0`).
    pub host: String,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// After SIGTERM, how long to keep accepting while health reports
    /// NOT_SERVING (lets load balancers notice), in milliseconds.
    pub shutdown_delay_ms: u64,
    /// How long in-flight calls may take to finish after shutdown starts.
    pub shutdown_grace_seconds: u64,
    /// TLS for every gRPC listener of this process (off by default).
    pub tls: ServerTlsSettings,
}

/// TLS (rustls) for the gRPC listeners. The files are PEM and are re-read
/// every `reload_interval_ms`; a changed certificate, key or CA is used for
/// new connections without a restart (cert-manager rotation).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTlsSettings {
    /// Certificate chain (leaf first); TLS is on when this is set.
    pub cert_file: Option<PathBuf>,
    /// Private key of the certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// CA bundle that client certificates must chain to; setting it turns
    /// on mTLS: a client without a valid certificate is refused.
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for changes, in milliseconds.
    pub reload_interval_ms: Option<u64>,
}

impl ServerTlsSettings {
    /// The reload period used when none is set.
    pub const DEFAULT_RELOAD_INTERVAL_MS: u64 = 10_000;

    /// Whether the listeners serve TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    /// The effective reload period.
    pub fn reload_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.reload_interval_ms
                .unwrap_or(Self::DEFAULT_RELOAD_INTERVAL_MS),
        )
    }

    fn validate(&self, check: &mut impl FnMut(bool, &str, String, &str)) {
        check(
            self.cert_file.is_some() == self.key_file.is_some(),
            if self.cert_file.is_some() {
                "server.tls.key_file"
            } else {
                "server.tls.cert_file"
            },
            "unset".to_owned(),
            "server.tls.cert_file and server.tls.key_file must be set together",
        );
        if let Some(ca) = &self.client_ca_file {
            check(
                self.cert_file.is_some(),
                "server.tls.client_ca_file",
                ca.display().to_string(),
                "needs server.tls.cert_file and server.tls.key_file (mTLS is TLS with client certificates)",
            );
        }
        if let Some(interval) = self.reload_interval_ms {
            check(
                (100..=3_600_000).contains(&interval),
                "server.tls.reload_interval_ms",
                interval.to_string(),
                "must be between 100 and 3600000",
            );
        }
    }
}

/// TLS for the clients one service uses to call another. It applies to
/// `https://` endpoints only; `http://` endpoints stay plaintext.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTlsSettings {
    /// CA bundle that servers' certificates must chain to; the system's
    /// trust store when unset.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain presented to servers that require mTLS.
    pub cert_file: Option<PathBuf>,
    /// Private key of the client certificate.
    pub key_file: Option<PathBuf>,
    /// Name expected in the servers' certificates, instead of the
    /// endpoint's host (for example when endpoints are IP addresses).
    pub server_name: Option<String>,
}

impl ClientTlsSettings {
    fn validate(&self, check: &mut impl FnMut(bool, &str, String, &str)) {
        check(
            self.cert_file.is_some() == self.key_file.is_some(),
            if self.cert_file.is_some() {
                "endpoints.tls.key_file"
            } else {
                "endpoints.tls.cert_file"
            },
            "unset".to_owned(),
            "endpoints.tls.cert_file and endpoints.tls.key_file must be set together",
        );
        if let Some(name) = &self.server_name {
            check(
                !name.trim().is_empty() && name.len() <= 253,
                "endpoints.tls.server_name",
                format!("{name:?}"),
                "must be 1 to 253 bytes",
            );
        }
    }
}

/// Listening ports.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PortSettings {
    /// Gateway gRPC port.
    pub gateway: u16,
    /// Agent gRPC port.
    pub agent: u16,
    /// Config gRPC port.
    pub config: u16,
    /// Audit gRPC port.
    pub audit: u16,
    /// Cache gRPC port.
    pub cache: u16,
    /// Admin HTTP port (`/metrics`, `/healthz`, `/readyz`), one per process.
    pub admin: u16,
}

/// Database pool settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// Connections in the writer pool.
    pub max_connections: u32,
    /// Connections in the read pool (used only with `read_database_url`).
    pub read_max_connections: u32,
    /// Seconds to wait for a connection.
    pub connect_timeout_seconds: u64,
    /// PostgreSQL schema to use (created if missing); `public` when unset.
    pub schema: Option<String>,
}

/// Endpoints of other services.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EndpointSettings {
    /// Config service endpoint that `ConfigWatcher` connects to.
    pub config: String,
    /// Cache service endpoint (the gateway's response cache).
    pub cache: String,
    /// Audit service endpoint (the gateway's audit events).
    pub audit: String,
    /// TLS for `https://` endpoints (these and the gateway's agent nodes).
    pub tls: ClientTlsSettings,
}

/// Behaviour of the config service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigServiceSettings {
    /// How often the service checks the database for revisions written by
    /// other replicas, in milliseconds.
    pub poll_interval_ms: u64,
    /// Changes buffered per watcher before it is resynchronised with a
    /// snapshot.
    pub watch_buffer: usize,
    /// Concurrent Watch streams the service accepts.
    pub max_watchers: usize,
}

/// Behaviour of the cache service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheServiceSettings {
    /// Redis connections in the L2 pool.
    pub pool_size: u32,
    /// Bytes (keys + values + attributes) the in-process L1 may hold; 0
    /// disables L1, so every read goes to L2.
    pub l1_max_bytes: u64,
    /// Largest value accepted by `Set`, in bytes; at most
    /// `server.max_message_bytes`.
    pub max_value_bytes: usize,
    /// Longest key, in bytes.
    pub max_key_bytes: usize,
    /// Lease lifetime when `GetOrLease` gives none, in milliseconds.
    pub lease_timeout_ms: u64,
    /// How long `GetOrLease` waits for another holder when the call gives
    /// no `max_wait`, in milliseconds.
    pub max_wait_ms: u64,
    /// Prefix of every Redis key and of the pub/sub channel, so several
    /// deployments can share one Redis.
    pub key_prefix: String,
    /// Time limit of one Redis operation (including taking a pooled
    /// connection), in milliseconds; beyond it the read counts as a miss.
    pub redis_timeout_ms: u64,
    /// Consecutive Redis failures that open the breaker.
    pub breaker_failure_threshold: u32,
    /// How long the open breaker skips Redis before probing it again, in
    /// milliseconds.
    pub breaker_reset_ms: u64,
    /// Keys removed per SCAN/SSCAN + UNLINK round trip by `Invalidate`.
    pub invalidate_batch: u32,
}

/// Behaviour of the audit service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// Most events in one AppendBatch request.
    pub max_batch_events: usize,
    /// Largest event context, in bytes of canonical JSON.
    pub max_context_bytes: usize,
    /// Deepest nesting of objects and arrays in an event context.
    pub max_context_depth: usize,
    /// Most events the writer commits in one transaction (group commit).
    pub group_commit_max_events: usize,
    /// How long the writer waits for more appends before committing a
    /// group, in microseconds; 0 commits whatever is queued at once.
    pub group_commit_wait_us: u64,
    /// Append requests queued for the writer before new ones are refused
    /// with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Sign a checkpoint after this many entries appended by this process.
    pub checkpoint_every_entries: u64,
    /// Sign a checkpoint of new entries at least this often, in seconds.
    pub checkpoint_every_seconds: u64,
    /// File holding the Ed25519 signing key as 64 hex digits (its 32-byte
    /// seed); `<data_dir>/audit-signing-key` when unset, generated with mode
    /// 0600 on first start.
    pub signing_key_file: Option<PathBuf>,
    /// Entries Verify reads per database round trip.
    pub verify_page_size: u32,
    /// Most entries one Verify call may cover.
    pub max_verify_range: u64,
}

/// Which LLM provider the agent service calls.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// The deterministic offline provider (labelled offline in responses).
    Local,
    /// An OpenAI-compatible chat-completions endpoint.
    Openai,
}

/// What the agent service does with a template variable that looks like
/// markup injection.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SanitizePolicy {
    /// Reject the request with INVALID_ARGUMENT naming the variable and rule.
    #[default]
    Reject,
    /// HTML-escape the value and neutralise script URLs, then render it.
    Escape,
}

/// Behaviour of the agent service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentServiceSettings {
    /// Id reported in every response and in `GetLoad`; `host:port` of the
    /// agent listener when unset.
    pub node_id: Option<String>,
    /// `local` or `openai`; unset means `openai` when `openai.base_url` is
    /// set (or `OPENAI_BASE_URL`), else `local`.
    pub provider: Option<ProviderKind>,
    /// Executions the node runs at once (its capacity in `GetLoad`).
    pub max_concurrent_executions: u32,
    /// Executions that may wait for a slot; beyond this, RESOURCE_EXHAUSTED.
    pub max_queued_executions: u32,
    /// How long an execution may wait for a slot, in milliseconds.
    pub queue_timeout_ms: u64,
    /// Whether prompt and output are stored when a request does not say.
    pub record_content: bool,
    /// Execution records buffered for the background writer.
    pub record_queue: usize,
    /// `reject` or `escape` suspicious template variables.
    pub sanitize_policy: SanitizePolicy,
    /// TOML file adding or replacing agent types; `<data_dir>/agents.toml`
    /// is read when unset and present.
    pub catalogue_file: Option<PathBuf>,
    /// Seconds between runs of the artifact retention job.
    pub retention_interval_seconds: u64,
    /// Artifacts deleted per statement by the retention job.
    pub cleanup_batch_size: u64,
    /// Largest artifact content accepted, in bytes.
    pub max_artifact_bytes: usize,
    /// The `local` provider.
    pub local: LocalProviderSettings,
    /// The `openai` provider.
    pub openai: OpenAiProviderSettings,
}

/// The deterministic offline provider.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LocalProviderSettings {
    /// Artificial latency added to every call, in milliseconds.
    pub latency_ms: u64,
    /// Extra random latency, uniformly 0 to this many milliseconds.
    pub jitter_ms: u64,
}

/// An OpenAI-compatible chat-completions endpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiProviderSettings {
    /// Base URL up to `/v1` (e.g. `http://127.0.0.1:11434/v1` for Ollama);
    /// `https://api.openai.com/v1` when unset.
    pub base_url: Option<String>,
    /// Name of the environment variable holding the API key (never logged).
    pub api_key_env: String,
    /// Provider name reported in responses (`openai`, `vllm`, `ollama`…).
    pub label: String,
    /// Models the endpoint serves; empty accepts any model name.
    pub models: Vec<String>,
    /// Requests that may wait for an in-flight slot (the slots are
    /// `llm.pool_size`); beyond this, RESOURCE_EXHAUSTED.
    pub max_queued: u32,
    /// How long a request may wait for an in-flight slot, in milliseconds.
    pub queue_timeout_ms: u64,
    /// Retries after connect errors, 429 and 5xx (within the deadline).
    pub max_retries: u32,
    /// First retry delay in milliseconds (doubles, with jitter).
    pub retry_initial_ms: u64,
    /// Longest retry delay in milliseconds.
    pub retry_max_ms: u64,
    /// TCP connect timeout in milliseconds.
    pub connect_timeout_ms: u64,
}

impl Default for AgentServiceSettings {
    fn default() -> Self {
        Self {
            node_id: None,
            provider: None,
            max_concurrent_executions: 256,
            max_queued_executions: 1024,
            queue_timeout_ms: 5_000,
            record_content: true,
            record_queue: 4096,
            sanitize_policy: SanitizePolicy::Reject,
            catalogue_file: None,
            retention_interval_seconds: 300,
            cleanup_batch_size: 500,
            max_artifact_bytes: 4 * 1024 * 1024,
            local: LocalProviderSettings::default(),
            openai: OpenAiProviderSettings::default(),
        }
    }
}

impl Default for OpenAiProviderSettings {
    fn default() -> Self {
        Self {
            base_url: None,
            api_key_env: "OPENAI_API_KEY".to_owned(),
            label: "openai".to_owned(),
            models: Vec::new(),
            max_queued: 1024,
            queue_timeout_ms: 10_000,
            max_retries: 3,
            retry_initial_ms: 200,
            retry_max_ms: 5_000,
            connect_timeout_ms: 2_000,
        }
    }
}

impl AgentServiceSettings {
    /// The provider that runs: the configured one, else `openai` when a base
    /// URL is set, else `local`.
    pub fn effective_provider(&self) -> ProviderKind {
        match self.provider {
            Some(kind) => kind,
            None if self.openai.base_url.is_some() => ProviderKind::Openai,
            None => ProviderKind::Local,
        }
    }

    fn validate(&self, check: &mut impl FnMut(bool, &str, String, &str)) {
        if let Some(node_id) = &self.node_id {
            check(
                !node_id.trim().is_empty() && node_id.len() <= 128,
                "agent_service.node_id",
                format!("{node_id:?}"),
                "must be 1 to 128 bytes",
            );
        }
        for (key, value, min, max) in [
            (
                "agent_service.max_concurrent_executions",
                u64::from(self.max_concurrent_executions),
                1,
                100_000,
            ),
            (
                "agent_service.max_queued_executions",
                u64::from(self.max_queued_executions),
                0,
                1_000_000,
            ),
            (
                "agent_service.queue_timeout_ms",
                self.queue_timeout_ms,
                1,
                600_000,
            ),
            (
                "agent_service.record_queue",
                self.record_queue as u64,
                1,
                1_000_000,
            ),
            (
                "agent_service.retention_interval_seconds",
                self.retention_interval_seconds,
                1,
                86_400,
            ),
            (
                "agent_service.cleanup_batch_size",
                self.cleanup_batch_size,
                1,
                100_000,
            ),
            (
                "agent_service.max_artifact_bytes",
                self.max_artifact_bytes as u64,
                1,
                256 * 1024 * 1024,
            ),
            (
                "agent_service.local.latency_ms",
                self.local.latency_ms,
                0,
                600_000,
            ),
            (
                "agent_service.local.jitter_ms",
                self.local.jitter_ms,
                0,
                600_000,
            ),
            (
                "agent_service.openai.max_queued",
                u64::from(self.openai.max_queued),
                0,
                1_000_000,
            ),
            (
                "agent_service.openai.queue_timeout_ms",
                self.openai.queue_timeout_ms,
                1,
                600_000,
            ),
            (
                "agent_service.openai.max_retries",
                u64::from(self.openai.max_retries),
                0,
                20,
            ),
            (
                "agent_service.openai.retry_initial_ms",
                self.openai.retry_initial_ms,
                1,
                60_000,
            ),
            (
                "agent_service.openai.retry_max_ms",
                self.openai.retry_max_ms,
                1,
                600_000,
            ),
            (
                "agent_service.openai.connect_timeout_ms",
                self.openai.connect_timeout_ms,
                1,
                600_000,
            ),
        ] {
            check(
                (min..=max).contains(&value),
                key,
                value.to_string(),
                &format!("must be between {min} and {max}"),
            );
        }
        if let Some(base_url) = &self.openai.base_url {
            check(
                base_url.starts_with("http://") || base_url.starts_with("https://"),
                "agent_service.openai.base_url",
                format!("{:?}", mask_url(base_url)),
                "must start with http:// or https://",
            );
        }
        check(
            !self.openai.api_key_env.trim().is_empty(),
            "agent_service.openai.api_key_env",
            format!("{:?}", self.openai.api_key_env),
            "must not be empty",
        );
        check(
            !self.openai.label.trim().is_empty() && self.openai.label.len() <= 64,
            "agent_service.openai.label",
            format!("{:?}", self.openai.label),
            "must be 1 to 64 bytes",
        );
        for model in &self.openai.models {
            check(
                !model.trim().is_empty() && model.len() <= 256,
                "agent_service.openai.models",
                format!("{model:?}"),
                "each model must be 1 to 256 bytes",
            );
        }
    }
}

/// What the gateway does when no agent node can serve a task.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GatewayFallback {
    /// Answer in-process with the `local` provider, marked degraded.
    #[default]
    Local,
    /// Refuse with UNAVAILABLE.
    None,
}

/// Behaviour of the gateway.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Agent node endpoints (`http://host:port`), 1 to 256 of them.
    pub agent_endpoints: Vec<String>,
    /// `local` or `none`.
    pub fallback: GatewayFallback,
    /// Id of this gateway in responses and `GetCircuitStates`; `host:port`
    /// of the gateway listener when unset.
    pub gateway_id: Option<String>,
    /// Agent calls per task at most (the first try and retries on other
    /// nodes), 1 to 5.
    pub max_attempts: u32,
    /// Retries allowed as a percentage of first tries over the last 10 s
    /// (the retry budget: a sick fleet sees no retry storm), 0 to 100.
    pub retry_budget_percent: u32,
    /// Retries per second allowed whatever the traffic (so that a quiet
    /// gateway can still retry), 0 to 10,000.
    pub retry_min_per_second: u32,
    /// How often host names in `agent_endpoints` are resolved again, in
    /// milliseconds (100 to 3,600,000). Each address a name resolves to is
    /// one node (a Kubernetes headless service lists every pod); nodes come
    /// and go without a restart.
    pub discovery_interval_ms: u64,
    /// How often each node's `GetLoad` is polled, in milliseconds (100 to
    /// 60,000): the node's own queue and draining flag inform the choice.
    pub load_poll_interval_ms: u64,
    /// HTTP/2 connections to each agent node (1 to 16), used in turn: one
    /// connection's I/O task limits a busy gateway.
    pub connections_per_node: u32,
    /// Workflow runs: definitions and limits.
    pub workflows: WorkflowSettings,
    /// The response cache (through the cache service).
    pub response_cache: ResponseCacheSettings,
    /// The audit event of every task (through the audit service).
    pub audit: GatewayAuditSettings,
    /// API keys: whether they are required, the bootstrap admin key, the
    /// hashing secret.
    pub auth: GatewayAuthSettings,
    /// Where per-project token usage is counted.
    pub budget: GatewayBudgetSettings,
}

/// The gateway's response cache: deterministic task responses stored in the
/// cache service (`endpoints.cache`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResponseCacheSettings {
    /// Whether the gateway uses the cache service at all.
    pub enabled: bool,
    /// How long a cached response lives, in seconds.
    pub ttl_seconds: u64,
    /// Longest wait for one cache call (not counting the wait for another
    /// caller's fill), in milliseconds; past it the call runs uncached.
    pub timeout_ms: u64,
    /// Longest wait for an identical request in flight elsewhere to fill
    /// the cache, in milliseconds (also capped by the caller's deadline).
    pub max_wait_ms: u64,
    /// How long the caller that executes a cacheable task holds the lease
    /// before another identical caller may take over, in milliseconds.
    pub lease_timeout_ms: u64,
    /// Largest response stored, in bytes (encoded); larger ones are served
    /// but not cached.
    pub max_value_bytes: usize,
}

impl Default for ResponseCacheSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_seconds: 3600,
            timeout_ms: 250,
            max_wait_ms: 10_000,
            lease_timeout_ms: 60_000,
            max_value_bytes: 1024 * 1024,
        }
    }
}

/// What the gateway does when its audit buffer is full.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuditOverflow {
    /// Refuse new tasks with UNAVAILABLE until the buffer drains.
    #[default]
    FailClosed,
    /// Drop the oldest buffered event for each new one (counted and logged).
    DropOldest,
}

/// The gateway's audit trail: one event per task, buffered in memory and
/// sent in batches to the audit service (`endpoints.audit`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayAuditSettings {
    /// Whether the gateway emits audit events.
    pub enabled: bool,
    /// Events buffered while the audit service is slow or down.
    pub buffer_capacity: usize,
    /// `fail_closed` or `drop_oldest`.
    pub overflow: AuditOverflow,
    /// Events per `AppendBatch` call.
    pub batch_max_events: usize,
    /// Longest wait for one `AppendBatch` call, in milliseconds.
    pub timeout_ms: u64,
    /// First retry delay after a failed delivery, in milliseconds (doubles,
    /// jittered, up to `retry_max_ms`).
    pub retry_initial_ms: u64,
    /// Longest retry delay, in milliseconds.
    pub retry_max_ms: u64,
    /// On shutdown, how long the gateway keeps delivering buffered events,
    /// in milliseconds.
    pub shutdown_flush_ms: u64,
}

impl Default for GatewayAuditSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            buffer_capacity: 10_000,
            overflow: AuditOverflow::FailClosed,
            batch_max_events: 500,
            timeout_ms: 5_000,
            retry_initial_ms: 100,
            retry_max_ms: 5_000,
            shutdown_flush_ms: 5_000,
        }
    }
}

/// Whether the gateway requires API keys.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// On, unless the gateway listens on a loopback address only.
    #[default]
    Auto,
    /// Always on.
    On,
    /// Off; refused unless the gateway listens on a loopback address.
    Off,
}

/// API keys at the gateway.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayAuthSettings {
    /// `auto` (on unless listening on loopback only), `on` or `off` (refused
    /// on a non-loopback address).
    pub mode: AuthMode,
    /// An admin key accepted in addition to the stored keys (32 to 256
    /// bytes, no whitespace), to create the first keys; never stored.
    pub bootstrap_admin_key: Option<String>,
    /// Secret of the keyed hash (HMAC-SHA256) API keys are stored under, at
    /// least 32 bytes; every gateway sharing a database needs the same one.
    /// Unset: read from `<data_dir>/gateway-api-key-secret`, generated
    /// (mode 0600) on first start.
    pub hash_secret: Option<String>,
    /// How often each gateway reloads the keys from the database (so a key
    /// revoked on another replica is refused here), in milliseconds.
    pub refresh_interval_ms: u64,
}

/// Token usage counting at the gateway.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayBudgetSettings {
    /// How often counted usage is written to Redis or the database, in
    /// milliseconds.
    pub flush_interval_ms: u64,
    /// How long a project's usage read from Redis or the database is reused
    /// for budget checks (this gateway's own new usage is always added), in
    /// milliseconds.
    pub usage_cache_ms: u64,
    /// Prefix of the usage counters in Redis (with `redis_url`).
    pub redis_key_prefix: String,
    /// Time limit of one Redis or database operation on usage, in
    /// milliseconds.
    pub store_timeout_ms: u64,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            agent_endpoints: vec!["http://127.0.0.1:50052".to_owned()],
            fallback: GatewayFallback::Local,
            gateway_id: None,
            max_attempts: 2,
            retry_budget_percent: 20,
            retry_min_per_second: 10,
            discovery_interval_ms: 5_000,
            load_poll_interval_ms: 1_000,
            connections_per_node: 4,
            workflows: WorkflowSettings::default(),
            response_cache: ResponseCacheSettings::default(),
            audit: GatewayAuditSettings::default(),
            auth: GatewayAuthSettings::default(),
            budget: GatewayBudgetSettings::default(),
        }
    }
}

/// Limits and sources of the gateway's workflow runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkflowSettings {
    /// Folder of YAML workflow definitions (`*.yaml`, `*.yml`);
    /// `<data_dir>/workflows` when unset (a missing folder means none).
    pub definitions_dir: Option<PathBuf>,
    /// Most steps in one workflow.
    pub max_steps: usize,
    /// Most steps of one run executing at once.
    pub max_parallel_steps: usize,
    /// Most unfinished runs one gateway drives at once; beyond,
    /// `RunWorkflow` is refused with RESOURCE_EXHAUSTED.
    pub max_concurrent_runs: usize,
    /// How long a gateway's claim on a run lasts without renewal; another
    /// gateway (or this one restarted) takes over a run whose claim lapsed.
    pub lease_seconds: u64,
    /// How often the gateway renews its claims, looks for runs to take over,
    /// re-reads project stops and decisions made on other replicas, and
    /// how often watchers poll for events written elsewhere.
    pub poll_interval_ms: u64,
}

impl Default for WorkflowSettings {
    fn default() -> Self {
        Self {
            definitions_dir: None,
            max_steps: 32,
            max_parallel_steps: 4,
            max_concurrent_runs: 256,
            lease_seconds: 30,
            poll_interval_ms: 1000,
        }
    }
}

impl Default for GatewayAuthSettings {
    fn default() -> Self {
        Self {
            mode: AuthMode::Auto,
            bootstrap_admin_key: None,
            hash_secret: None,
            refresh_interval_ms: 2_000,
        }
    }
}

impl WorkflowSettings {
    /// The definitions folder: the setting, else `<data_dir>/workflows`.
    pub fn definitions_dir(&self, data_dir: &Path) -> PathBuf {
        self.definitions_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("workflows"))
    }

    fn validate(&self, check: &mut impl FnMut(bool, &str, String, &str)) {
        for (key, value, min, max) in [
            ("gateway.workflows.max_steps", self.max_steps as u64, 1, 256),
            (
                "gateway.workflows.max_parallel_steps",
                self.max_parallel_steps as u64,
                1,
                256,
            ),
            (
                "gateway.workflows.max_concurrent_runs",
                self.max_concurrent_runs as u64,
                1,
                100_000,
            ),
            (
                "gateway.workflows.lease_seconds",
                self.lease_seconds,
                1,
                3_600,
            ),
            (
                "gateway.workflows.poll_interval_ms",
                self.poll_interval_ms,
                10,
                60_000,
            ),
        ] {
            check(
                (min..=max).contains(&value),
                key,
                value.to_string(),
                &format!("must be between {min} and {max}"),
            );
        }
        check(
            self.poll_interval_ms < self.lease_seconds * 1000,
            "gateway.workflows.poll_interval_ms",
            self.poll_interval_ms.to_string(),
            "must be shorter than gateway.workflows.lease_seconds (claims are renewed every poll)",
        );
    }
}

impl Default for GatewayBudgetSettings {
    fn default() -> Self {
        Self {
            flush_interval_ms: 200,
            usage_cache_ms: 500,
            redis_key_prefix: "agentmesh:budget:".to_owned(),
            store_timeout_ms: 1_000,
        }
    }
}

impl GatewayAuthSettings {
    /// The file holding the hash secret when `hash_secret` is unset.
    pub fn hash_secret_file(&self, data_dir: &Path) -> PathBuf {
        data_dir.join("gateway-api-key-secret")
    }
}

impl GatewaySettings {
    fn validate(&self, check: &mut impl FnMut(bool, &str, String, &str)) {
        check(
            (1..=256).contains(&self.agent_endpoints.len()),
            "gateway.agent_endpoints",
            format!("{} entries", self.agent_endpoints.len()),
            "must have 1 to 256 entries",
        );
        for (index, endpoint) in self.agent_endpoints.iter().enumerate() {
            check(
                (endpoint.starts_with("http://") || endpoint.starts_with("https://"))
                    && endpoint.len() <= 512,
                &format!("gateway.agent_endpoints[{index}]"),
                format!("{endpoint:?}"),
                "must start with http:// or https:// and be at most 512 bytes",
            );
            check(
                !self.agent_endpoints[..index].contains(endpoint),
                &format!("gateway.agent_endpoints[{index}]"),
                format!("{endpoint:?}"),
                "must not repeat an earlier endpoint",
            );
        }
        if let Some(gateway_id) = &self.gateway_id {
            check(
                !gateway_id.trim().is_empty() && gateway_id.len() <= 128,
                "gateway.gateway_id",
                format!("{gateway_id:?}"),
                "must be 1 to 128 bytes",
            );
        }
        check(
            (1..=5).contains(&self.max_attempts),
            "gateway.max_attempts",
            self.max_attempts.to_string(),
            "must be 1 to 5",
        );
        check(
            self.retry_budget_percent <= 100,
            "gateway.retry_budget_percent",
            self.retry_budget_percent.to_string(),
            "must be 0 to 100",
        );
        check(
            self.retry_min_per_second <= 10_000,
            "gateway.retry_min_per_second",
            self.retry_min_per_second.to_string(),
            "must be 0 to 10000",
        );
        check(
            (100..=3_600_000).contains(&self.discovery_interval_ms),
            "gateway.discovery_interval_ms",
            self.discovery_interval_ms.to_string(),
            "must be 100 to 3600000",
        );
        check(
            (100..=60_000).contains(&self.load_poll_interval_ms),
            "gateway.load_poll_interval_ms",
            self.load_poll_interval_ms.to_string(),
            "must be 100 to 60000",
        );
        check(
            (1..=16).contains(&self.connections_per_node),
            "gateway.connections_per_node",
            self.connections_per_node.to_string(),
            "must be 1 to 16",
        );
        self.workflows.validate(check);
        let cache = &self.response_cache;
        let audit = &self.audit;
        for (key, value, range) in [
            (
                "gateway.response_cache.ttl_seconds",
                cache.ttl_seconds,
                1..=31_536_000,
            ),
            (
                "gateway.response_cache.timeout_ms",
                cache.timeout_ms,
                1..=60_000,
            ),
            (
                "gateway.response_cache.max_wait_ms",
                cache.max_wait_ms,
                0..=30_000,
            ),
            (
                "gateway.response_cache.lease_timeout_ms",
                cache.lease_timeout_ms,
                1_000..=300_000,
            ),
            (
                "gateway.response_cache.max_value_bytes",
                cache.max_value_bytes as u64,
                1..=256 * 1024 * 1024,
            ),
            (
                "gateway.audit.buffer_capacity",
                audit.buffer_capacity as u64,
                1..=10_000_000,
            ),
            (
                "gateway.audit.batch_max_events",
                audit.batch_max_events as u64,
                1..=1_000,
            ),
            ("gateway.audit.timeout_ms", audit.timeout_ms, 1..=600_000),
            (
                "gateway.audit.retry_initial_ms",
                audit.retry_initial_ms,
                1..=60_000,
            ),
            (
                "gateway.audit.retry_max_ms",
                audit.retry_max_ms,
                1..=600_000,
            ),
            (
                "gateway.audit.shutdown_flush_ms",
                audit.shutdown_flush_ms,
                0..=600_000,
            ),
        ] {
            check(
                range.contains(&value),
                key,
                value.to_string(),
                &format!("must be between {} and {}", range.start(), range.end()),
            );
        }
        check(
            audit.retry_max_ms >= audit.retry_initial_ms,
            "gateway.audit.retry_max_ms",
            audit.retry_max_ms.to_string(),
            "must be at least gateway.audit.retry_initial_ms",
        );
        if let Some(key) = &self.auth.bootstrap_admin_key {
            check(
                (32..=256).contains(&key.len()) && !key.chars().any(char::is_whitespace),
                "gateway.auth.bootstrap_admin_key",
                format!("({} bytes, not shown)", key.len()),
                "must be 32 to 256 bytes with no whitespace",
            );
        }
        if let Some(secret) = &self.auth.hash_secret {
            check(
                (32..=1024).contains(&secret.len()),
                "gateway.auth.hash_secret",
                format!("({} bytes, not shown)", secret.len()),
                "must be 32 to 1024 bytes",
            );
        }
        check(
            (100..=600_000).contains(&self.auth.refresh_interval_ms),
            "gateway.auth.refresh_interval_ms",
            self.auth.refresh_interval_ms.to_string(),
            "must be between 100 and 600000",
        );
        check(
            (10..=60_000).contains(&self.budget.flush_interval_ms),
            "gateway.budget.flush_interval_ms",
            self.budget.flush_interval_ms.to_string(),
            "must be between 10 and 60000",
        );
        check(
            self.budget.usage_cache_ms <= 60_000,
            "gateway.budget.usage_cache_ms",
            self.budget.usage_cache_ms.to_string(),
            "must be at most 60000",
        );
        check(
            (1..=60_000).contains(&self.budget.store_timeout_ms),
            "gateway.budget.store_timeout_ms",
            self.budget.store_timeout_ms.to_string(),
            "must be between 1 and 60000",
        );
        check(
            self.budget.redis_key_prefix.len() <= 64
                && !self
                    .budget
                    .redis_key_prefix
                    .chars()
                    .any(|c| c.is_whitespace() || "*?[]\\".contains(c)),
            "gateway.budget.redis_key_prefix",
            format!("{:?}", self.budget.redis_key_prefix),
            "must be at most 64 bytes with no whitespace or glob characters (*?[]\\)",
        );
    }
}

/// Log format.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, coloured when on a terminal.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Telemetry settings. The log filter comes from `RUST_LOG` / `AGENTMESH_LOG`
/// and OTLP export from the standard `OTEL_*` variables.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// `pretty` or `json`.
    pub log_format: LogFormat,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./.agentmesh"),
            database_url: None,
            read_database_url: None,
            redis_url: None,
            server: ServerSettings::default(),
            ports: PortSettings::default(),
            database: DatabaseSettings::default(),
            endpoints: EndpointSettings::default(),
            config_service: ConfigServiceSettings::default(),
            cache: CacheServiceSettings::default(),
            audit: AuditSettings::default(),
            agent_service: AgentServiceSettings::default(),
            gateway: GatewaySettings::default(),
            telemetry: TelemetrySettings::default(),
            defaults: LiveSettings::default(),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_streams: 1024,
            shutdown_delay_ms: 0,
            shutdown_grace_seconds: 10,
            tls: ServerTlsSettings::default(),
        }
    }
}

impl Default for PortSettings {
    fn default() -> Self {
        Self {
            gateway: 50051,
            agent: 50052,
            config: 50053,
            audit: 50054,
            cache: 50055,
            admin: 9464,
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            max_connections: 20,
            read_max_connections: 30,
            connect_timeout_seconds: 10,
            schema: None,
        }
    }
}

impl Default for EndpointSettings {
    fn default() -> Self {
        Self {
            config: "http://127.0.0.1:50053".to_owned(),
            cache: "http://127.0.0.1:50055".to_owned(),
            audit: "http://127.0.0.1:50054".to_owned(),
            tls: ClientTlsSettings::default(),
        }
    }
}

impl Default for ConfigServiceSettings {
    fn default() -> Self {
        Self {
            poll_interval_ms: 250,
            watch_buffer: 256,
            max_watchers: 10_000,
        }
    }
}

impl Default for CacheServiceSettings {
    fn default() -> Self {
        Self {
            pool_size: 16,
            l1_max_bytes: 256 * 1024 * 1024,
            max_value_bytes: 4 * 1024 * 1024,
            max_key_bytes: 512,
            lease_timeout_ms: 30_000,
            max_wait_ms: 5_000,
            key_prefix: "agentmesh:cache:".to_owned(),
            redis_timeout_ms: 250,
            breaker_failure_threshold: 5,
            breaker_reset_ms: 1_000,
            invalidate_batch: 500,
        }
    }
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            max_batch_events: 1000,
            max_context_bytes: 64 * 1024,
            max_context_depth: 32,
            group_commit_max_events: 2000,
            group_commit_wait_us: 0,
            queue_capacity: 10_000,
            checkpoint_every_entries: 1000,
            checkpoint_every_seconds: 60,
            signing_key_file: None,
            verify_page_size: 1000,
            max_verify_range: 1_000_000,
        }
    }
}

impl AuditSettings {
    /// The signing key file: `signing_key_file`, else under `data_dir`.
    pub fn effective_signing_key_file(&self, data_dir: &Path) -> PathBuf {
        self.signing_key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("audit-signing-key"))
    }
}

/// One bad setting: the key, the value given and the rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Dotted key, e.g. `ports.config`.
    pub key: String,
    /// The value as given.
    pub value: String,
    /// The rule, e.g. `must be between 1 and 300`.
    pub rule: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.key, self.value, self.rule)
    }
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file or environment could not be parsed into settings (unknown
    /// key, wrong type).
    #[error("invalid settings: {0}")]
    Parse(String),
    /// Values parsed but broke rules.
    #[error("invalid settings: {}", join_violations(.0))]
    Invalid(Vec<Violation>),
}

fn join_violations(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Settings {
    /// Loads settings from defaults, an optional TOML file and the process
    /// environment, then validates them.
    pub fn load(file: Option<&Path>) -> Result<Self, LoadError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(LoadError::Parse(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        // The design note's names, accepted as aliases below AGENTMESH_*.
        figment = figment
            .merge(
                Env::raw()
                    .only(&["DEFAULT_LLM_MODEL"])
                    .map(|_| "defaults.agent.default_model".into()),
            )
            .merge(
                Env::raw()
                    .only(&["DEFAULT_TEMPERATURE"])
                    .map(|_| "defaults.agent.temperature".into()),
            )
            .merge(
                Env::raw()
                    .only(&["OPENAI_BASE_URL"])
                    .map(|_| "agent_service.openai.base_url".into()),
            )
            .merge(
                Env::prefixed("AGENTMESH_")
                    .ignore(NON_SETTING_ENV_KEYS)
                    .filter(|key| !key.as_str().to_ascii_lowercase().starts_with("test_"))
                    .split("__"),
            );
        let settings: Settings = figment.extract().map_err(|error| {
            LoadError::Parse(
                error
                    .into_iter()
                    .map(|e| describe_figment_error(&e))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        settings.validate().map_err(LoadError::Invalid)?;
        Ok(settings)
    }

    /// Checks every rule and returns all violations, not only the first.
    pub fn validate(&self) -> Result<(), Vec<Violation>> {
        let mut violations = Vec::new();
        let mut check = |ok: bool, key: &str, value: String, rule: &str| {
            if !ok {
                violations.push(Violation {
                    key: key.to_owned(),
                    value,
                    rule: rule.to_owned(),
                });
            }
        };
        for (key, url) in [
            ("database_url", &self.database_url),
            ("read_database_url", &self.read_database_url),
        ] {
            if let Some(url) = url {
                check(
                    url.starts_with("sqlite:")
                        || url.starts_with("postgres://")
                        || url.starts_with("postgresql://"),
                    key,
                    mask_url(url),
                    "must start with sqlite:, postgres:// or postgresql://",
                );
            }
        }
        check(
            self.read_database_url.is_none() || self.database_url.is_some(),
            "read_database_url",
            self.read_database_url
                .as_deref()
                .map(mask_url)
                .unwrap_or_default(),
            "needs database_url to be set too",
        );
        check(
            !self.server.host.trim().is_empty(),
            "server.host",
            format!("{:?}", self.server.host),
            "must not be empty",
        );
        check(
            (1024..=256 * 1024 * 1024).contains(&self.server.max_message_bytes),
            "server.max_message_bytes",
            self.server.max_message_bytes.to_string(),
            "must be between 1024 and 268435456",
        );
        check(
            (1..=1_000_000).contains(&self.server.max_concurrent_streams),
            "server.max_concurrent_streams",
            self.server.max_concurrent_streams.to_string(),
            "must be between 1 and 1000000",
        );
        check(
            self.server.shutdown_delay_ms <= 600_000,
            "server.shutdown_delay_ms",
            self.server.shutdown_delay_ms.to_string(),
            "must be at most 600000",
        );
        check(
            self.server.shutdown_grace_seconds <= 3600,
            "server.shutdown_grace_seconds",
            self.server.shutdown_grace_seconds.to_string(),
            "must be at most 3600",
        );
        for (key, size) in [
            ("database.max_connections", self.database.max_connections),
            (
                "database.read_max_connections",
                self.database.read_max_connections,
            ),
        ] {
            check(
                (1..=1000).contains(&size),
                key,
                size.to_string(),
                "must be between 1 and 1000",
            );
        }
        check(
            (1..=600).contains(&self.database.connect_timeout_seconds),
            "database.connect_timeout_seconds",
            self.database.connect_timeout_seconds.to_string(),
            "must be between 1 and 600",
        );
        if let Some(schema) = &self.database.schema {
            check(
                is_identifier(schema),
                "database.schema",
                format!("{schema:?}"),
                "must be 1 to 63 characters of [a-z0-9_], starting with a letter or _",
            );
        }
        self.server.tls.validate(&mut check);
        self.endpoints.tls.validate(&mut check);
        for (key, endpoint) in [
            ("endpoints.config", &self.endpoints.config),
            ("endpoints.cache", &self.endpoints.cache),
            ("endpoints.audit", &self.endpoints.audit),
        ] {
            check(
                endpoint.starts_with("http://") || endpoint.starts_with("https://"),
                key,
                format!("{endpoint:?}"),
                "must start with http:// or https://",
            );
        }
        check(
            (10..=60_000).contains(&self.config_service.poll_interval_ms),
            "config_service.poll_interval_ms",
            self.config_service.poll_interval_ms.to_string(),
            "must be between 10 and 60000",
        );
        check(
            (1..=1_000_000).contains(&self.config_service.watch_buffer),
            "config_service.watch_buffer",
            self.config_service.watch_buffer.to_string(),
            "must be between 1 and 1000000",
        );
        check(
            (1..=1_000_000).contains(&self.config_service.max_watchers),
            "config_service.max_watchers",
            self.config_service.max_watchers.to_string(),
            "must be between 1 and 1000000",
        );
        if let Some(url) = &self.redis_url {
            check(
                url.starts_with("redis://") || url.starts_with("rediss://"),
                "redis_url",
                mask_url(url),
                "must start with redis:// or rediss://",
            );
        }
        let cache = &self.cache;
        check(
            (1..=1024).contains(&cache.pool_size),
            "cache.pool_size",
            cache.pool_size.to_string(),
            "must be between 1 and 1024",
        );
        check(
            cache.l1_max_bytes <= 1 << 40,
            "cache.l1_max_bytes",
            cache.l1_max_bytes.to_string(),
            "must be at most 1099511627776",
        );
        check(
            (1..=self.server.max_message_bytes).contains(&cache.max_value_bytes),
            "cache.max_value_bytes",
            cache.max_value_bytes.to_string(),
            &format!(
                "must be between 1 and server.max_message_bytes ({})",
                self.server.max_message_bytes
            ),
        );
        check(
            (1..=8192).contains(&cache.max_key_bytes),
            "cache.max_key_bytes",
            cache.max_key_bytes.to_string(),
            "must be between 1 and 8192",
        );
        check(
            (1_000..=300_000).contains(&cache.lease_timeout_ms),
            "cache.lease_timeout_ms",
            cache.lease_timeout_ms.to_string(),
            "must be between 1000 and 300000",
        );
        check(
            cache.max_wait_ms <= 30_000,
            "cache.max_wait_ms",
            cache.max_wait_ms.to_string(),
            "must be at most 30000",
        );
        check(
            cache.key_prefix.len() <= 64
                && !cache
                    .key_prefix
                    .chars()
                    .any(|c| c.is_whitespace() || "*?[]\\".contains(c)),
            "cache.key_prefix",
            format!("{:?}", cache.key_prefix),
            "must be at most 64 bytes with no whitespace or glob characters (*?[]\\)",
        );
        check(
            (1..=60_000).contains(&cache.redis_timeout_ms),
            "cache.redis_timeout_ms",
            cache.redis_timeout_ms.to_string(),
            "must be between 1 and 60000",
        );
        check(
            (1..=10_000).contains(&cache.breaker_failure_threshold),
            "cache.breaker_failure_threshold",
            cache.breaker_failure_threshold.to_string(),
            "must be between 1 and 10000",
        );
        check(
            (10..=600_000).contains(&cache.breaker_reset_ms),
            "cache.breaker_reset_ms",
            cache.breaker_reset_ms.to_string(),
            "must be between 10 and 600000",
        );
        check(
            (1..=100_000).contains(&cache.invalidate_batch),
            "cache.invalidate_batch",
            cache.invalidate_batch.to_string(),
            "must be between 1 and 100000",
        );
        for (key, value, range) in [
            (
                "audit.max_batch_events",
                self.audit.max_batch_events as u64,
                1..=10_000u64,
            ),
            (
                "audit.max_context_bytes",
                self.audit.max_context_bytes as u64,
                2..=16 * 1024 * 1024,
            ),
            (
                "audit.max_context_depth",
                self.audit.max_context_depth as u64,
                1..=128,
            ),
            (
                "audit.group_commit_max_events",
                self.audit.group_commit_max_events as u64,
                1..=100_000,
            ),
            (
                "audit.group_commit_wait_us",
                self.audit.group_commit_wait_us,
                0..=1_000_000,
            ),
            (
                "audit.queue_capacity",
                self.audit.queue_capacity as u64,
                1..=1_000_000,
            ),
            (
                "audit.checkpoint_every_entries",
                self.audit.checkpoint_every_entries,
                1..=100_000_000,
            ),
            (
                "audit.checkpoint_every_seconds",
                self.audit.checkpoint_every_seconds,
                1..=86_400,
            ),
            (
                "audit.verify_page_size",
                u64::from(self.audit.verify_page_size),
                1..=100_000,
            ),
            (
                "audit.max_verify_range",
                self.audit.max_verify_range,
                1..=1_000_000_000,
            ),
        ] {
            check(
                range.contains(&value),
                key,
                value.to_string(),
                &format!("must be between {} and {}", range.start(), range.end()),
            );
        }
        check(
            self.audit.group_commit_max_events >= self.audit.max_batch_events,
            "audit.group_commit_max_events",
            self.audit.group_commit_max_events.to_string(),
            "must be at least audit.max_batch_events (a batch is committed whole)",
        );
        self.agent_service.validate(&mut check);
        self.gateway.validate(&mut check);
        if self.gateway.auth.mode == AuthMode::Off
            && let Ok(address) = self.server.host.parse::<std::net::IpAddr>()
        {
            check(
                address.is_loopback(),
                "gateway.auth.mode",
                "\"off\"".to_owned(),
                &format!(
                    "must not be off while server.host ({address}) is not a loopback address: API keys are required off this machine"
                ),
            );
        }
        for violation in self.defaults.to_values().validate() {
            violations.push(Violation {
                key: format!("defaults.{}", violation.field),
                value: violation.value,
                rule: violation.rule,
            });
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }

    /// The writer database URL: `database_url`, else SQLite under `data_dir`.
    pub fn effective_database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("agentmesh.db").display()
            ),
        }
    }

    /// Renders the settings as TOML with secrets (URL passwords) masked.
    pub fn dump(&self) -> String {
        let mut masked = self.clone();
        masked.database_url = masked.database_url.as_deref().map(mask_url);
        masked.read_database_url = masked.read_database_url.as_deref().map(mask_url);
        masked.redis_url = masked.redis_url.as_deref().map(mask_url);
        for secret in [
            &mut masked.gateway.auth.bootstrap_admin_key,
            &mut masked.gateway.auth.hash_secret,
        ] {
            if secret.is_some() {
                *secret = Some("****".to_owned());
            }
        }
        toml::to_string_pretty(&masked)
            .unwrap_or_else(|error| format!("# cannot render settings: {error}\n"))
    }
}

/// One line naming the key (dotted, lower case), what is wrong and where
/// the value came from.
fn describe_figment_error(error: &figment::Error) -> String {
    let key = error.path.join(".").to_lowercase();
    let origin = error
        .metadata
        .as_ref()
        .map(|metadata| match &metadata.source {
            Some(figment::Source::File(path)) => format!(" (from {})", path.display()),
            _ if metadata.name.contains("AGENTMESH_") && !key.is_empty() => {
                format!(" (from AGENTMESH_{})", error.path.join("__").to_uppercase())
            }
            _ => format!(" (from {})", metadata.name),
        })
        .unwrap_or_default();
    let kind = error.kind.to_string().replace('\n', " ");
    if key.is_empty() {
        format!("{kind}{origin}")
    } else {
        format!("{key}: {kind}{origin}")
    }
}

/// Replaces the password of a URL (`scheme://user:password@host`) with `****`.
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let user_info = &authority[..at];
    match user_info.find(':') {
        Some(colon) => format!(
            "{}{}:****{}",
            &url[..scheme_end + 3],
            &user_info[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    name.len() <= 63
        && (first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Settings::default().validate(), Ok(()));
    }

    #[test]
    fn validate_reports_every_bad_key() {
        let mut settings = Settings::default();
        settings.server.max_message_bytes = 1;
        settings.database.max_connections = 0;
        settings.defaults.agent.temperature = 3.5;
        let violations = settings.validate().unwrap_err();
        let keys: Vec<_> = violations.iter().map(|v| v.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "server.max_message_bytes",
                "database.max_connections",
                "cache.max_value_bytes",
                "defaults.agent.temperature"
            ]
        );
        assert_eq!(violations[3].value, "3.5");
        assert!(
            violations[3].rule.contains("between 0 and 2"),
            "{}",
            violations[3].rule
        );
    }

    #[test]
    fn gateway_section_is_validated_and_loaded_from_files() {
        let mut settings = Settings::default();
        settings.gateway.agent_endpoints = vec![
            "http://a:1".to_owned(),
            "tcp://b:2".to_owned(),
            "http://a:1".to_owned(),
        ];
        let violations = settings.validate().unwrap_err();
        let keys: Vec<_> = violations.iter().map(|v| v.key.as_str()).collect();
        assert_eq!(
            keys,
            ["gateway.agent_endpoints[1]", "gateway.agent_endpoints[2]"]
        );
        assert!(
            violations[1].rule.contains("repeat"),
            "{}",
            violations[1].rule
        );
        settings.gateway.agent_endpoints.clear();
        let violations = settings.validate().unwrap_err();
        assert_eq!(violations[0].key, "gateway.agent_endpoints");
        settings.gateway.agent_endpoints = vec!["http://a:1".to_owned()];
        settings.gateway.connections_per_node = 0;
        let violations = settings.validate().unwrap_err();
        assert_eq!(violations[0].key, "gateway.connections_per_node");
        assert_eq!(violations[0].rule, "must be 1 to 16");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(
            &file,
            "[gateway]\nagent_endpoints = [\"http://10.0.0.1:7003\", \"http://10.0.0.2:7003\"]\nfallback = \"none\"\n",
        )
        .unwrap();
        let loaded = Settings::load(Some(&file)).unwrap();
        assert_eq!(loaded.gateway.agent_endpoints.len(), 2);
        assert_eq!(loaded.gateway.fallback, GatewayFallback::None);
        assert_eq!(
            Settings::default().gateway.agent_endpoints,
            ["http://127.0.0.1:50052"]
        );
    }

    #[test]
    fn gateway_cache_and_audit_sections_are_validated_and_loaded_from_files() {
        let defaults = Settings::default();
        assert!(defaults.gateway.response_cache.enabled);
        assert!(defaults.gateway.audit.enabled);
        assert_eq!(defaults.gateway.audit.overflow, AuditOverflow::FailClosed);
        assert_eq!(defaults.endpoints.cache, "http://127.0.0.1:50055");
        assert_eq!(defaults.endpoints.audit, "http://127.0.0.1:50054");

        let mut settings = Settings::default();
        settings.endpoints.audit = "audit:50054".to_owned();
        settings.gateway.response_cache.ttl_seconds = 0;
        settings.gateway.audit.buffer_capacity = 0;
        settings.gateway.audit.batch_max_events = 1001;
        settings.gateway.audit.retry_initial_ms = 500;
        settings.gateway.audit.retry_max_ms = 100;
        let violations = settings.validate().unwrap_err();
        let keys: Vec<_> = violations.iter().map(|v| v.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "endpoints.audit",
                "gateway.response_cache.ttl_seconds",
                "gateway.audit.buffer_capacity",
                "gateway.audit.batch_max_events",
                "gateway.audit.retry_max_ms",
            ]
        );
        assert!(violations[3].rule.contains("between 1 and 1000"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(
            &file,
            "[gateway.response_cache]\nttl_seconds = 60\nenabled = false\n\n[gateway.audit]\noverflow = \"drop_oldest\"\nbuffer_capacity = 7\n",
        )
        .unwrap();
        let loaded = Settings::load(Some(&file)).unwrap();
        assert_eq!(loaded.gateway.response_cache.ttl_seconds, 60);
        assert!(!loaded.gateway.response_cache.enabled);
        assert_eq!(loaded.gateway.audit.overflow, AuditOverflow::DropOldest);
        assert_eq!(loaded.gateway.audit.buffer_capacity, 7);

        std::fs::write(&file, "[gateway.audit]\noverflow = \"block\"\n").unwrap();
        assert!(Settings::load(Some(&file)).is_err());
    }

    #[test]
    fn workflow_limits_are_validated_and_loaded_from_files() {
        let mut settings = Settings::default();
        settings.gateway.workflows.max_steps = 0;
        settings.gateway.workflows.poll_interval_ms = 40_000;
        settings.gateway.workflows.lease_seconds = 30;
        settings.endpoints.audit = "audit:50054".to_owned();
        let violations = settings.validate().unwrap_err();
        let keys: Vec<_> = violations.iter().map(|v| v.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "endpoints.audit",
                "gateway.workflows.max_steps",
                "gateway.workflows.poll_interval_ms"
            ]
        );
        assert!(violations[2].rule.contains("lease_seconds"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(
            &file,
            "[gateway.workflows]\nmax_parallel_steps = 8\ndefinitions_dir = \"/etc/agentmesh/workflows\"\n",
        )
        .unwrap();
        let loaded = Settings::load(Some(&file)).unwrap();
        assert_eq!(loaded.gateway.workflows.max_parallel_steps, 8);
        assert_eq!(
            loaded.gateway.workflows.definitions_dir(&loaded.data_dir),
            std::path::Path::new("/etc/agentmesh/workflows")
        );
        assert_eq!(
            Settings::default()
                .gateway
                .workflows
                .definitions_dir(Path::new("/data")),
            Path::new("/data/workflows")
        );
    }

    #[test]
    fn audit_section_is_validated_and_loaded_from_files() {
        let mut settings = Settings::default();
        settings.audit.max_batch_events = 0;
        settings.audit.checkpoint_every_seconds = 0;
        let violations = settings.validate().unwrap_err();
        let keys: Vec<_> = violations.iter().map(|v| v.key.as_str()).collect();
        assert_eq!(
            keys,
            ["audit.max_batch_events", "audit.checkpoint_every_seconds"]
        );
        assert_eq!(violations[0].rule, "must be between 1 and 10000");

        let mut small_groups = Settings::default();
        small_groups.audit.group_commit_max_events = 10;
        let violations = small_groups.validate().unwrap_err();
        assert_eq!(violations[0].key, "audit.group_commit_max_events");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.toml");
        std::fs::write(
            &file,
            "[audit]\ncheckpoint_every_entries = 50\nsigning_key_file = \"/k\"\n",
        )
        .unwrap();
        let loaded = Settings::load(Some(&file)).unwrap();
        assert_eq!(loaded.audit.checkpoint_every_entries, 50);
        assert_eq!(
            loaded.audit.effective_signing_key_file(&loaded.data_dir),
            PathBuf::from("/k")
        );
        assert_eq!(
            Settings::default()
                .audit
                .effective_signing_key_file(Path::new("/d")),
            PathBuf::from("/d/audit-signing-key")
        );
    }

    #[test]
    fn agent_service_section_validates_and_picks_provider() {
        let mut settings = Settings::default();
        assert_eq!(
            settings.agent_service.effective_provider(),
            ProviderKind::Local
        );
        settings.agent_service.openai.base_url = Some("http://127.0.0.1:8000/v1".into());
        assert_eq!(
            settings.agent_service.effective_provider(),
            ProviderKind::Openai
        );
        settings.agent_service.provider = Some(ProviderKind::Local);
        assert_eq!(
            settings.agent_service.effective_provider(),
            ProviderKind::Local
        );
        settings.agent_service.openai.base_url = Some("ftp://x".into());
        settings.agent_service.max_concurrent_executions = 0;
        settings.agent_service.node_id = Some(String::new());
        let keys: Vec<_> = settings
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|v| v.key)
            .collect();
        assert_eq!(
            keys,
            [
                "agent_service.node_id",
                "agent_service.max_concurrent_executions",
                "agent_service.openai.base_url"
            ]
        );
    }

    #[test]
    fn gateway_auth_rules_and_secrets_are_masked() {
        let mut settings = Settings::default();
        settings.gateway.auth.mode = AuthMode::Off;
        assert_eq!(settings.validate(), Ok(()), "off is fine on loopback");
        settings.server.host = "0.0.0.0".into();
        settings.gateway.auth.bootstrap_admin_key = Some("short".into());
        settings.gateway.auth.hash_secret = Some("s".repeat(40));
        settings.gateway.budget.redis_key_prefix = "a b".into();
        let violations = settings.validate().unwrap_err();
        let keys: Vec<_> = violations.iter().map(|v| v.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "gateway.auth.bootstrap_admin_key",
                "gateway.budget.redis_key_prefix",
                "gateway.auth.mode"
            ]
        );
        assert!(!violations[0].value.contains("short"));
        assert!(
            violations[2].rule.contains("0.0.0.0"),
            "{}",
            violations[2].rule
        );
        settings.gateway.auth.bootstrap_admin_key = Some("k".repeat(40));
        let dumped = settings.dump();
        assert!(!dumped.contains(&"k".repeat(40)), "{dumped}");
        assert!(!dumped.contains(&"s".repeat(40)), "{dumped}");
        assert!(
            dumped.contains("bootstrap_admin_key = \"****\""),
            "{dumped}"
        );
    }

    #[test]
    fn masks_url_passwords() {
        assert_eq!(
            mask_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:****@db:5432/x"
        );
        assert_eq!(mask_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(mask_url("sqlite://./a.db"), "sqlite://./a.db");
    }

    #[test]
    fn file_layer_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(
            &good,
            "[ports]\nconfig = 6000\n[defaults.agent]\ndefault_model = \"m\"\n",
        )
        .unwrap();
        let settings = Settings::load(Some(&good)).unwrap();
        assert_eq!(settings.ports.config, 6000);
        assert_eq!(settings.defaults.agent.default_model, "m");

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[ports]\nconfgi = 6000\n").unwrap();
        let error = Settings::load(Some(&bad)).unwrap_err().to_string();
        assert!(error.contains("confgi"), "{error}");
    }

    #[test]
    fn dump_masks_secrets() {
        let settings = Settings {
            database_url: Some("postgres://u:pw@h/db".into()),
            redis_url: Some("redis://default:redispw@r:6379/0".into()),
            ..Settings::default()
        };
        let dumped = settings.dump();
        assert!(dumped.contains("u:****@h"), "{dumped}");
        assert!(dumped.contains("default:****@r:6379"), "{dumped}");
        assert!(!dumped.contains("pw"), "{dumped}");
    }

    #[test]
    fn cache_section_rules() {
        let mut settings = Settings {
            redis_url: Some("http://r".into()),
            ..Settings::default()
        };
        settings.cache.pool_size = 0;
        settings.cache.max_value_bytes = settings.server.max_message_bytes + 1;
        settings.cache.key_prefix = "a*b".into();
        settings.cache.lease_timeout_ms = 10;
        let violations = settings.validate().unwrap_err();
        let keys: Vec<_> = violations.iter().map(|v| v.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "redis_url",
                "cache.pool_size",
                "cache.max_value_bytes",
                "cache.lease_timeout_ms",
                "cache.key_prefix"
            ]
        );
        assert!(violations[2].rule.contains("server.max_message_bytes"));
    }
}
