//! The response cache: deterministic task responses kept in the cache
//! service (`endpoints.cache`, namespace [`NAMESPACE`]) under the SHA-256 of
//! the canonical request, filled through `GetOrLease` so that identical
//! concurrent requests reach a provider once.
//!
//! Which tasks are cached (`TaskSpec.cache_policy`):
//! - unspecified: only deterministic ones, that is effective temperature 0,
//!   or a fleet whose nodes all answer with the offline `local` provider;
//! - `USE`: also non-deterministic ones (the caller accepts a stored answer);
//! - `BYPASS`: never read nor written;
//! - `REFRESH`: not read; executed and the stored answer overwritten.
//!
//! The cache never fails a task: every call is bounded by
//! `gateway.response_cache.timeout_ms` (plus the wait for another caller's
//! fill), and an unreachable, slow or misbehaving cache service only means
//! that call runs uncached (counted in
//! `agentmesh_gateway_cache_errors_total`, logged at most once a minute at
//! WARN, else DEBUG).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use agentmesh_agent::service::ExecuteSpec;
use agentmesh_client::{ClientError, TracedChannel, connect_lazy};
use agentmesh_proto::cache as cache_pb;
use agentmesh_proto::cache::cache_service_client::CacheServiceClient;
use agentmesh_proto::common as common_pb;
use agentmesh_proto::gateway as pb;
use agentmesh_settings::{ClientTlsSettings, LiveSettings, ResponseCacheSettings};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::around::RateLimitedLog;

/// The cache service namespace of gateway responses.
pub const NAMESPACE: &str = "gateway.responses";
/// Media type of a stored response.
const CONTENT_TYPE: &str = "application/x-protobuf; proto=agentmesh.gateway.v1.ExecuteTaskResponse";
/// Version of the key derivation; bump when [`canonical_request`] changes.
const KEY_VERSION: &str = "v1";
/// Most nodes whose provider kind is remembered.
const MAX_KNOWN_NODES: usize = 1024;
/// Time kept back from the caller's deadline when waiting for a fill, so
/// that the task can still run uncached.
const FILL_WAIT_MARGIN: Duration = Duration::from_millis(50);

/// The model parameters an execution will use: the task's overrides over
/// the live settings of its agent type and project.
#[derive(Clone, Debug, PartialEq)]
pub struct EffectiveParameters {
    /// Model.
    pub model: String,
    /// Temperature.
    pub temperature: f64,
    /// Completion token bound.
    pub max_tokens: i64,
}

impl EffectiveParameters {
    /// The parameters `spec` runs with under `live`.
    pub fn of(spec: &ExecuteSpec, live: &LiveSettings) -> Self {
        Self {
            model: spec
                .overrides
                .model
                .clone()
                .unwrap_or_else(|| live.agent.default_model.clone()),
            temperature: spec.overrides.temperature.unwrap_or(live.agent.temperature),
            max_tokens: spec.overrides.max_tokens.unwrap_or(live.agent.max_tokens),
        }
    }
}

/// The bytes that decide a task's output: agent type, project, template
/// override, variables (sorted by name) and effective model parameters,
/// each length-prefixed so that no two requests share an encoding. The
/// workflow, correlation id, idempotency key and recording flag do not
/// change the output and are left out.
pub fn canonical_request(spec: &ExecuteSpec, parameters: &EffectiveParameters) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(256);
    field(&mut out, b"agentmesh.gateway.v1.request");
    field(&mut out, spec.agent_type.as_bytes());
    field(&mut out, spec.project_id.as_bytes());
    match &spec.template_override {
        Some(template) => {
            out.push(1);
            field(&mut out, template.as_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(spec.variables.len() as u64).to_be_bytes());
    // A BTreeMap iterates in name order.
    for (name, value) in &spec.variables {
        field(&mut out, name.as_bytes());
        field(&mut out, value.as_bytes());
    }
    field(&mut out, parameters.model.as_bytes());
    out.extend_from_slice(&parameters.temperature.to_bits().to_be_bytes());
    out.extend_from_slice(&parameters.max_tokens.to_be_bytes());
    out
}

/// SHA-256 of [`canonical_request`], as 64 lowercase hex digits.
pub fn request_hash(spec: &ExecuteSpec, parameters: &EffectiveParameters) -> String {
    hex::encode(Sha256::digest(canonical_request(spec, parameters)))
}

/// What the cache does for one task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The caller asked not to use the cache.
    Bypass,
    /// The task is not deterministic and did not ask to be cached.
    Uncacheable,
    /// Read the cache; on a miss execute and store.
    Read,
    /// Execute and overwrite the stored response.
    Refresh,
}

/// The decision for `policy` (a `CachePolicy` number) and a task that is
/// `deterministic` or not.
pub fn decide(policy: i32, deterministic: bool) -> Decision {
    match pb::CachePolicy::try_from(policy) {
        Ok(pb::CachePolicy::Bypass) => Decision::Bypass,
        Ok(pb::CachePolicy::Refresh) => Decision::Refresh,
        Ok(pb::CachePolicy::Use) => Decision::Read,
        // Unknown numbers are refused by the check; treat them as unset.
        Ok(pb::CachePolicy::Unspecified) | Err(_) if deterministic => Decision::Read,
        Ok(pb::CachePolicy::Unspecified) | Err(_) => Decision::Uncacheable,
    }
}

/// What to do with a task's response once it is served.
#[derive(Debug)]
pub enum Fill {
    /// Complete the lease this caller holds (wakes the identical callers
    /// waiting on it).
    Lease {
        /// Cache key.
        key: String,
        /// Token of the lease.
        token: String,
    },
    /// Write the response without a lease (refresh, or another caller's
    /// lease outlived our wait).
    Overwrite {
        /// Cache key.
        key: String,
    },
}

/// The outcome of a lookup.
#[derive(Debug)]
pub enum Lookup {
    /// A stored response (ids and timings still those of the original).
    Hit(Box<pb::ExecuteTaskResponse>),
    /// Execute the task; then store the response as `Fill` says, if any.
    Miss(Option<Fill>),
}

/// The gateway's client of the cache service.
pub struct ResponseCache {
    client: Option<CacheServiceClient<TracedChannel>>,
    settings: ResponseCacheSettings,
    /// Whether each node that answered used the offline `local` provider.
    offline_nodes: Mutex<HashMap<String, bool>>,
    errors: RateLimitedLog,
}

impl ResponseCache {
    /// A cache client of `endpoint` (connecting on first use); disabled
    /// when `settings.enabled` is false.
    pub fn new(
        endpoint: &str,
        tls: &ClientTlsSettings,
        settings: &ResponseCacheSettings,
    ) -> Result<Self, ClientError> {
        let client = if settings.enabled {
            Some(
                CacheServiceClient::new(connect_lazy(endpoint, tls)?)
                    .max_decoding_message_size(settings.max_value_bytes + 64 * 1024)
                    .max_encoding_message_size(settings.max_value_bytes + 64 * 1024),
            )
        } else {
            None
        };
        Ok(Self {
            client,
            settings: settings.clone(),
            offline_nodes: Mutex::new(HashMap::new()),
            errors: RateLimitedLog::new(Duration::from_secs(60)),
        })
    }

    /// Whether the cache is used at all.
    pub fn enabled(&self) -> bool {
        self.client.is_some()
    }

    /// Largest response stored, in bytes.
    pub fn max_value_bytes(&self) -> usize {
        self.settings.max_value_bytes
    }

    /// Whether a task with `parameters` has one possible output: temperature
    /// 0, or every node seen so far answers with the offline provider.
    pub fn deterministic(&self, parameters: &EffectiveParameters) -> bool {
        if parameters.temperature == 0.0 {
            return true;
        }
        let nodes = self
            .offline_nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        !nodes.is_empty() && nodes.values().all(|offline| *offline)
    }

    /// Remembers whether `node_id` answered with the offline provider.
    pub fn observe_node(&self, node_id: &str, offline: bool) {
        if node_id.is_empty() {
            return;
        }
        let mut nodes = self
            .offline_nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if nodes.get(node_id) == Some(&offline) {
            return;
        }
        if nodes.len() >= MAX_KNOWN_NODES && !nodes.contains_key(node_id) {
            nodes.clear();
        }
        nodes.insert(node_id.to_owned(), offline);
    }

    /// Looks `key` up as `decision` says, waiting at most until `deadline`
    /// (and the configured bounds) for another caller's fill.
    pub async fn lookup(&self, key: &str, decision: Decision, deadline: Option<Instant>) -> Lookup {
        let Some(client) = &self.client else {
            return Lookup::Miss(None);
        };
        let key = format!("{KEY_VERSION}:{key}");
        match decision {
            Decision::Bypass => {
                count_lookup("bypass");
                return Lookup::Miss(None);
            }
            Decision::Uncacheable => {
                count_lookup("uncacheable");
                return Lookup::Miss(None);
            }
            Decision::Refresh => {
                count_lookup("refresh");
                return Lookup::Miss(Some(Fill::Overwrite { key }));
            }
            Decision::Read => {}
        }
        let call_timeout = Duration::from_millis(self.settings.timeout_ms);
        let mut max_wait = Duration::from_millis(self.settings.max_wait_ms);
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            max_wait = max_wait.min(left.saturating_sub(call_timeout + FILL_WAIT_MARGIN));
        }
        let request = cache_pb::GetOrLeaseRequest {
            namespace: NAMESPACE.to_owned(),
            key: key.clone(),
            lease_timeout: Some(proto_duration(Duration::from_millis(
                self.settings.lease_timeout_ms,
            ))),
            max_wait: Some(proto_duration(max_wait)),
        };
        let mut client = client.clone();
        let answer =
            tokio::time::timeout(call_timeout + max_wait, client.get_or_lease(request)).await;
        let response = match answer {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                self.failed(
                    "lookup",
                    &format!("{:?}: {}", status.code(), status.message()),
                );
                return Lookup::Miss(None);
            }
            Err(_) => {
                self.failed(
                    "lookup",
                    &format!(
                        "no answer within {} ms",
                        (call_timeout + max_wait).as_millis()
                    ),
                );
                return Lookup::Miss(None);
            }
        };
        match cache_pb::LeaseOutcome::try_from(response.outcome) {
            Ok(cache_pb::LeaseOutcome::Hit | cache_pb::LeaseOutcome::Filled) => {
                let stored = response
                    .entry
                    .and_then(|entry| pb::ExecuteTaskResponse::decode(entry.value.as_slice()).ok());
                match stored {
                    Some(stored) => {
                        count_lookup("hit");
                        Lookup::Hit(Box::new(stored))
                    }
                    None => {
                        // Not ours (or from an incompatible version): replace it.
                        self.failed("decode", "the stored value is not a gateway response");
                        Lookup::Miss(Some(Fill::Overwrite { key }))
                    }
                }
            }
            Ok(cache_pb::LeaseOutcome::Granted) => {
                count_lookup("miss");
                Lookup::Miss(Some(Fill::Lease {
                    key,
                    token: response.lease_token,
                }))
            }
            Ok(cache_pb::LeaseOutcome::StillLeased) => {
                // The identical request in flight elsewhere takes longer than
                // we may wait: run it here too, and store what we get.
                count_lookup("still_leased");
                Lookup::Miss(Some(Fill::Overwrite { key }))
            }
            Ok(cache_pb::LeaseOutcome::Unspecified) | Err(_) => {
                self.failed(
                    "lookup",
                    &format!("unknown lease outcome {}", response.outcome),
                );
                Lookup::Miss(None)
            }
        }
    }

    /// Stores `response` as `fill` says, in the background (never on the
    /// response path). Degraded responses, cut-off outputs and values over
    /// `max_value_bytes` are not stored.
    pub fn store(self: &std::sync::Arc<Self>, fill: Fill, response: &pb::ExecuteTaskResponse) {
        let Some(client) = &self.client else {
            return;
        };
        if response.degraded || response.finish_reason == common_pb::FinishReason::Cancelled as i32
        {
            return;
        }
        let stored = pb::ExecuteTaskResponse {
            task_id: String::new(),
            execution_id: String::new(),
            output: response.output.clone(),
            usage: response.usage,
            provider: response.provider.clone(),
            node_id: response.node_id.clone(),
            degraded: false,
            degraded_reason: String::new(),
            cache_hit: false,
            attempts: 0,
            finish_reason: response.finish_reason,
            latency: None,
            trace_id: String::new(),
        };
        let value = stored.encode_to_vec();
        if value.len() > self.settings.max_value_bytes {
            metrics::counter!("agentmesh_gateway_cache_stores_total", "result" => "too_large")
                .increment(1);
            return;
        }
        let (key, lease_token) = match fill {
            Fill::Lease { key, token } => (key, Some(token)),
            Fill::Overwrite { key } => (key, None),
        };
        let request = cache_pb::SetRequest {
            namespace: NAMESPACE.to_owned(),
            key,
            value,
            content_type: CONTENT_TYPE.to_owned(),
            ttl: Some(proto_duration(Duration::from_secs(
                self.settings.ttl_seconds,
            ))),
            tags: Vec::new(),
            lease_token,
        };
        let mut client = client.clone();
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        let cache = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            match tokio::time::timeout(timeout, client.set(request)).await {
                Ok(Ok(_)) => {
                    metrics::counter!("agentmesh_gateway_cache_stores_total", "result" => "stored")
                        .increment(1);
                }
                Ok(Err(status)) => {
                    cache.failed(
                        "store",
                        &format!("{:?}: {}", status.code(), status.message()),
                    );
                }
                Err(_) => {
                    cache.failed(
                        "store",
                        &format!("no answer within {} ms", timeout.as_millis()),
                    );
                }
            }
        });
    }

    fn failed(&self, operation: &'static str, reason: &str) {
        metrics::counter!("agentmesh_gateway_cache_errors_total", "op" => operation).increment(1);
        if self.errors.allow() {
            tracing::warn!(
                operation,
                reason,
                "response cache unavailable, serving uncached (logged once a minute)"
            );
        } else {
            tracing::debug!(operation, reason, "response cache unavailable");
        }
    }
}

fn count_lookup(result: &'static str) {
    metrics::counter!("agentmesh_gateway_cache_lookups_total", "result" => result).increment(1);
}

fn proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ExecuteSpec {
        ExecuteSpec {
            agent_type: "coder".to_owned(),
            variables: [("task", "add"), ("language", "rust")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            project_id: "p1".to_owned(),
            ..ExecuteSpec::default()
        }
    }

    fn parameters() -> EffectiveParameters {
        EffectiveParameters {
            model: "gpt-4o-mini".to_owned(),
            temperature: 0.0,
            max_tokens: 1024,
        }
    }

    #[test]
    fn the_key_covers_what_decides_the_output_and_nothing_else() {
        let base = request_hash(&spec(), &parameters());
        assert_eq!(base.len(), 64);
        // Not what does not change the output.
        let mut other = spec();
        other.workflow_id = "w1".to_owned();
        other.correlation_id = "c1".to_owned();
        other.record = Some(false);
        other.overrides.timeout_seconds = Some(5);
        assert_eq!(request_hash(&other, &parameters()), base);
        // Everything that does.
        let mut changed = Vec::new();
        let mut s = spec();
        s.agent_type = "tester".to_owned();
        changed.push(request_hash(&s, &parameters()));
        let mut s = spec();
        s.project_id = "p2".to_owned();
        changed.push(request_hash(&s, &parameters()));
        let mut s = spec();
        s.template_override = Some(String::new());
        changed.push(request_hash(&s, &parameters()));
        let mut s = spec();
        s.variables.insert("task".to_owned(), "add!".to_owned());
        changed.push(request_hash(&s, &parameters()));
        let mut s = spec();
        s.variables.insert("extra".to_owned(), String::new());
        changed.push(request_hash(&s, &parameters()));
        for (index, changed_parameters) in [
            EffectiveParameters {
                model: "other".to_owned(),
                ..parameters()
            },
            EffectiveParameters {
                temperature: 0.5,
                ..parameters()
            },
            EffectiveParameters {
                max_tokens: 7,
                ..parameters()
            },
        ]
        .iter()
        .enumerate()
        {
            let hash = request_hash(&spec(), changed_parameters);
            assert_ne!(hash, base, "parameter change {index}");
            changed.push(hash);
        }
        let distinct: std::collections::BTreeSet<_> = changed.iter().collect();
        assert_eq!(distinct.len(), changed.len());
        assert!(!changed.contains(&base));
        // Length prefixes: moving bytes between fields changes the key.
        let mut a = spec();
        a.variables = [("ab".to_owned(), "c".to_owned())].into_iter().collect();
        let mut b = spec();
        b.variables = [("a".to_owned(), "bc".to_owned())].into_iter().collect();
        assert_ne!(
            request_hash(&a, &parameters()),
            request_hash(&b, &parameters())
        );
    }

    #[test]
    fn effective_parameters_prefer_the_task_overrides() {
        let live = LiveSettings::default();
        let mut s = spec();
        let inherited = EffectiveParameters::of(&s, &live);
        assert_eq!(inherited.model, live.agent.default_model);
        assert_eq!(inherited.temperature, live.agent.temperature);
        s.overrides.temperature = Some(0.0);
        s.overrides.model = Some("m".to_owned());
        let overridden = EffectiveParameters::of(&s, &live);
        assert_eq!(overridden.temperature, 0.0);
        assert_eq!(overridden.model, "m");
    }

    #[test]
    fn policies_decide_what_is_cached() {
        let unset = pb::CachePolicy::Unspecified as i32;
        assert_eq!(decide(unset, true), Decision::Read);
        assert_eq!(decide(unset, false), Decision::Uncacheable);
        assert_eq!(decide(pb::CachePolicy::Use as i32, false), Decision::Read);
        assert_eq!(
            decide(pb::CachePolicy::Bypass as i32, true),
            Decision::Bypass
        );
        assert_eq!(
            decide(pb::CachePolicy::Refresh as i32, false),
            Decision::Refresh
        );
    }

    #[tokio::test]
    async fn an_offline_fleet_makes_every_task_deterministic() {
        let cache = ResponseCache::new(
            "http://127.0.0.1:1",
            &ClientTlsSettings::default(),
            &ResponseCacheSettings::default(),
        )
        .unwrap();
        let warm = EffectiveParameters {
            temperature: 0.7,
            ..parameters()
        };
        assert!(cache.deterministic(&parameters()));
        assert!(!cache.deterministic(&warm), "nothing known yet");
        cache.observe_node("agent-0", true);
        assert!(cache.deterministic(&warm));
        cache.observe_node("agent-1", false);
        assert!(!cache.deterministic(&warm));
    }
}
