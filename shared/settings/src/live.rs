//! The live settings model: every field the config service serves, its
//! validation rule, the scopes values are set in, and how scopes merge.
//!
//! Values move between the wire (`agentmesh.config.v1.Settings`), storage
//! (a JSON object keyed by field path) and services (the typed
//! [`LiveSettings`]) through [`Values`], a map keyed by field path, so each
//! rule and merge step is written once.

use std::collections::BTreeMap;
use std::fmt;

use agentmesh_proto::config as pb;
use serde::{Deserialize, Serialize};

/// The type and rule of one field.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FieldKind {
    /// Non-empty text of at most `max_len` bytes.
    Text {
        /// Longest accepted value in bytes.
        max_len: usize,
    },
    /// A finite number within `[min, max]`.
    Float {
        /// Smallest accepted value.
        min: f64,
        /// Largest accepted value.
        max: f64,
    },
    /// An integer within `[min, max]`.
    Int {
        /// Smallest accepted value.
        min: i64,
        /// Largest accepted value.
        max: i64,
    },
}

impl FieldKind {
    /// Describes the rule in words, as error messages show it.
    pub fn rule(&self) -> String {
        match self {
            FieldKind::Text { max_len } => format!("must be non-empty and at most {max_len} bytes"),
            FieldKind::Float { min, max } => format!("must be between {min} and {max}"),
            FieldKind::Int { min, max } => format!("must be between {min} and {max}"),
        }
    }
}

/// One settable field.
#[derive(Clone, Copy, Debug)]
pub struct FieldSpec {
    /// Dotted path, e.g. `agent.temperature`.
    pub path: &'static str,
    /// Type and rule.
    pub kind: FieldKind,
}

/// Every live setting, in the stable order used for sources and errors.
pub const FIELDS: &[FieldSpec] = &[
    FieldSpec {
        path: "agent.default_model",
        kind: FieldKind::Text { max_len: 256 },
    },
    FieldSpec {
        path: "agent.temperature",
        kind: FieldKind::Float { min: 0.0, max: 2.0 },
    },
    FieldSpec {
        path: "agent.timeout_seconds",
        kind: FieldKind::Int { min: 1, max: 300 },
    },
    FieldSpec {
        path: "agent.max_tokens",
        kind: FieldKind::Int {
            min: 1,
            max: 1_000_000,
        },
    },
    FieldSpec {
        path: "breaker.failure_threshold",
        kind: FieldKind::Int {
            min: 1,
            max: 10_000,
        },
    },
    FieldSpec {
        path: "breaker.reset_timeout_seconds",
        kind: FieldKind::Int {
            min: 1,
            max: 86_400,
        },
    },
    FieldSpec {
        path: "breaker.half_open_max_probes",
        kind: FieldKind::Int { min: 1, max: 1000 },
    },
    FieldSpec {
        path: "breaker.failure_rate_percent",
        kind: FieldKind::Int { min: 0, max: 100 },
    },
    FieldSpec {
        path: "breaker.window_seconds",
        kind: FieldKind::Int { min: 1, max: 3600 },
    },
    FieldSpec {
        path: "breaker.min_requests",
        kind: FieldKind::Int {
            min: 1,
            max: 1000000,
        },
    },
    FieldSpec {
        path: "cache.default_ttl_seconds",
        kind: FieldKind::Int {
            min: 1,
            max: 31_536_000,
        },
    },
    FieldSpec {
        path: "retention.artifact_max_age_hours",
        kind: FieldKind::Int {
            min: 1,
            max: 87_600,
        },
    },
    FieldSpec {
        path: "batch.max_concurrency",
        kind: FieldKind::Int { min: 1, max: 1024 },
    },
    FieldSpec {
        path: "llm.pool_size",
        kind: FieldKind::Int { min: 1, max: 1024 },
    },
    FieldSpec {
        path: "limits.user_rps",
        kind: FieldKind::Int {
            min: 0,
            max: 1_000_000,
        },
    },
    FieldSpec {
        path: "limits.user_burst",
        kind: FieldKind::Int {
            min: 1,
            max: 1_000_000,
        },
    },
    FieldSpec {
        path: "limits.admin_rps",
        kind: FieldKind::Int {
            min: 0,
            max: 1_000_000,
        },
    },
    FieldSpec {
        path: "limits.admin_burst",
        kind: FieldKind::Int {
            min: 1,
            max: 1_000_000,
        },
    },
    FieldSpec {
        path: "budget.tokens_per_day",
        kind: FieldKind::Int {
            min: 0,
            max: MAX_BUDGET_TOKENS,
        },
    },
    FieldSpec {
        path: "budget.tokens_per_month",
        kind: FieldKind::Int {
            min: 0,
            max: MAX_BUDGET_TOKENS,
        },
    },
];

/// Largest token budget accepted (10^15).
pub const MAX_BUDGET_TOKENS: i64 = 1_000_000_000_000_000;

/// Looks up a field by its dotted path.
pub fn field(path: &str) -> Option<&'static FieldSpec> {
    FIELDS.iter().find(|spec| spec.path == path)
}

/// One value of a live setting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// Text.
    Text(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(value) => write!(f, "{value}"),
            Value::Float(value) => write!(f, "{value}"),
            Value::Text(value) => write!(f, "{value:?}"),
        }
    }
}

/// A value that breaks its field's rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    /// Dotted field path.
    pub field: String,
    /// The rejected value as text.
    pub value: String,
    /// The rule broken.
    pub rule: String,
}

/// A set of live settings keyed by field path; a scope holds any subset.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Values(BTreeMap<&'static str, Value>);

impl Values {
    /// Returns the value at `path`, if set.
    pub fn get(&self, path: &str) -> Option<&Value> {
        self.0.get(path)
    }

    /// Sets a value; `path` must be one of [`FIELDS`].
    pub fn set(&mut self, spec: &'static FieldSpec, value: Value) {
        self.0.insert(spec.path, value);
    }

    /// Removes a value.
    pub fn remove(&mut self, path: &str) -> Option<Value> {
        self.0.remove(path)
    }

    /// Iterates over set values in field-path order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Value)> {
        self.0.iter().map(|(path, value)| (*path, value))
    }

    /// Returns true if no value is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Applies `other` on top of `self`: values set in `other` win.
    pub fn overlay(&mut self, other: &Values) {
        for (path, value) in &other.0 {
            self.0.insert(path, value.clone());
        }
    }

    /// Checks every set value against its rule.
    pub fn validate(&self) -> Vec<FieldViolation> {
        let mut violations = Vec::new();
        for spec in FIELDS {
            let Some(value) = self.0.get(spec.path) else {
                continue;
            };
            let ok = match (spec.kind, value) {
                (FieldKind::Text { max_len }, Value::Text(text)) => {
                    !text.trim().is_empty() && text.len() <= max_len
                }
                (FieldKind::Float { min, max }, Value::Float(number)) => {
                    number.is_finite() && (min..=max).contains(number)
                }
                (FieldKind::Float { min, max }, Value::Int(number)) => {
                    (min..=max).contains(&(*number as f64))
                }
                (FieldKind::Int { min, max }, Value::Int(number)) => (min..=max).contains(number),
                _ => false,
            };
            if !ok {
                violations.push(FieldViolation {
                    field: spec.path.to_owned(),
                    value: value.to_string(),
                    rule: spec.kind.rule(),
                });
            }
        }
        violations
    }

    /// Encodes the values as a JSON object keyed by field path (storage form).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.0
                .iter()
                .map(|(path, value)| {
                    let json = match value {
                        Value::Int(number) => serde_json::Value::from(*number),
                        Value::Float(number) => serde_json::Value::from(*number),
                        Value::Text(text) => serde_json::Value::from(text.clone()),
                    };
                    ((*path).to_owned(), json)
                })
                .collect(),
        )
    }

    /// Decodes the storage form; unknown paths and mistyped values are
    /// dropped (they can only come from a newer or hand-edited database).
    pub fn from_json(json: &serde_json::Value) -> Values {
        let mut values = Values::default();
        let Some(object) = json.as_object() else {
            return values;
        };
        for (path, raw) in object {
            let Some(spec) = field(path) else { continue };
            let value = match spec.kind {
                FieldKind::Text { .. } => raw.as_str().map(|text| Value::Text(text.to_owned())),
                FieldKind::Float { .. } => raw.as_f64().map(Value::Float),
                FieldKind::Int { .. } => raw.as_i64().map(Value::Int),
            };
            if let Some(value) = value {
                values.set(spec, value);
            }
        }
        values
    }

    /// Converts wire settings; leaves that are not present stay unset.
    pub fn from_proto(settings: &pb::Settings) -> Values {
        let mut values = Values::default();
        let mut put = |path: &str, value: Option<Value>| {
            if let (Some(spec), Some(value)) = (field(path), value) {
                values.set(spec, value);
            }
        };
        if let Some(agent) = &settings.agent {
            put(
                "agent.default_model",
                agent.default_model.clone().map(Value::Text),
            );
            put("agent.temperature", agent.temperature.map(Value::Float));
            put(
                "agent.timeout_seconds",
                agent.timeout_seconds.map(Value::Int),
            );
            put("agent.max_tokens", agent.max_tokens.map(Value::Int));
        }
        if let Some(breaker) = &settings.breaker {
            put(
                "breaker.failure_threshold",
                breaker.failure_threshold.map(Value::Int),
            );
            put(
                "breaker.reset_timeout_seconds",
                breaker.reset_timeout_seconds.map(Value::Int),
            );
            put(
                "breaker.half_open_max_probes",
                breaker.half_open_max_probes.map(Value::Int),
            );
            put(
                "breaker.failure_rate_percent",
                breaker.failure_rate_percent.map(Value::Int),
            );
            put(
                "breaker.window_seconds",
                breaker.window_seconds.map(Value::Int),
            );
            put("breaker.min_requests", breaker.min_requests.map(Value::Int));
        }
        if let Some(cache) = &settings.cache {
            put(
                "cache.default_ttl_seconds",
                cache.default_ttl_seconds.map(Value::Int),
            );
        }
        if let Some(retention) = &settings.retention {
            put(
                "retention.artifact_max_age_hours",
                retention.artifact_max_age_hours.map(Value::Int),
            );
        }
        if let Some(batch) = &settings.batch {
            put(
                "batch.max_concurrency",
                batch.max_concurrency.map(Value::Int),
            );
        }
        if let Some(llm) = &settings.llm {
            put("llm.pool_size", llm.pool_size.map(Value::Int));
        }
        if let Some(limits) = &settings.limits {
            put("limits.user_rps", limits.user_rps.map(Value::Int));
            put("limits.user_burst", limits.user_burst.map(Value::Int));
            put("limits.admin_rps", limits.admin_rps.map(Value::Int));
            put("limits.admin_burst", limits.admin_burst.map(Value::Int));
        }
        if let Some(budget) = &settings.budget {
            put(
                "budget.tokens_per_day",
                budget.tokens_per_day.map(Value::Int),
            );
            put(
                "budget.tokens_per_month",
                budget.tokens_per_month.map(Value::Int),
            );
        }
        values
    }

    /// Converts to wire settings; a section with no value set is left out.
    pub fn to_proto(&self) -> pb::Settings {
        let text = |path: &str| match self.0.get(path) {
            Some(Value::Text(text)) => Some(text.clone()),
            _ => None,
        };
        let float = |path: &str| match self.0.get(path) {
            Some(Value::Float(number)) => Some(*number),
            Some(Value::Int(number)) => Some(*number as f64),
            _ => None,
        };
        let int = |path: &str| match self.0.get(path) {
            Some(Value::Int(number)) => Some(*number),
            _ => None,
        };
        let agent = pb::AgentSettings {
            default_model: text("agent.default_model"),
            temperature: float("agent.temperature"),
            timeout_seconds: int("agent.timeout_seconds"),
            max_tokens: int("agent.max_tokens"),
        };
        let breaker = pb::BreakerSettings {
            failure_threshold: int("breaker.failure_threshold"),
            reset_timeout_seconds: int("breaker.reset_timeout_seconds"),
            half_open_max_probes: int("breaker.half_open_max_probes"),
            failure_rate_percent: int("breaker.failure_rate_percent"),
            window_seconds: int("breaker.window_seconds"),
            min_requests: int("breaker.min_requests"),
        };
        let cache = pb::CacheSettings {
            default_ttl_seconds: int("cache.default_ttl_seconds"),
        };
        let retention = pb::RetentionSettings {
            artifact_max_age_hours: int("retention.artifact_max_age_hours"),
        };
        let batch = pb::BatchSettings {
            max_concurrency: int("batch.max_concurrency"),
        };
        let llm = pb::LlmSettings {
            pool_size: int("llm.pool_size"),
        };
        let limits = pb::LimitsSettings {
            user_rps: int("limits.user_rps"),
            user_burst: int("limits.user_burst"),
            admin_rps: int("limits.admin_rps"),
            admin_burst: int("limits.admin_burst"),
        };
        let budget = pb::BudgetSettings {
            tokens_per_day: int("budget.tokens_per_day"),
            tokens_per_month: int("budget.tokens_per_month"),
        };
        let section = |present: bool| present;
        pb::Settings {
            agent: section(agent != pb::AgentSettings::default()).then_some(agent),
            breaker: section(breaker != pb::BreakerSettings::default()).then_some(breaker),
            cache: section(cache != pb::CacheSettings::default()).then_some(cache),
            retention: section(retention != pb::RetentionSettings::default()).then_some(retention),
            batch: section(batch != pb::BatchSettings::default()).then_some(batch),
            llm: section(llm != pb::LlmSettings::default()).then_some(llm),
            limits: section(limits != pb::LimitsSettings::default()).then_some(limits),
            budget: section(budget != pb::BudgetSettings::default()).then_some(budget),
        }
    }
}

/// A scope that settings are set in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Applies everywhere.
    Global,
    /// Applies to one agent type.
    Agent(String),
    /// Applies to one project.
    Project(String),
    /// Applies to one gateway API key (by key id): only the per-key rate
    /// limits (`limits.*`) are read from it.
    Key(String),
}

/// Why a scope name is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "must be `global`, `agent/<name>`, `project/<name>` or `key/<name>` with a name of 1 to 64 characters of [A-Za-z0-9._-]"
)]
pub struct InvalidScope;

/// Returns true for a valid agent type or project id.
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Scope {
    /// Parses `global`, `agent/<name>`, `project/<name>` or `key/<name>`.
    pub fn parse(text: &str) -> Result<Scope, InvalidScope> {
        if text == "global" {
            return Ok(Scope::Global);
        }
        let (kind, name) = text.split_once('/').ok_or(InvalidScope)?;
        if !is_valid_name(name) {
            return Err(InvalidScope);
        }
        match kind {
            "agent" => Ok(Scope::Agent(name.to_owned())),
            "project" => Ok(Scope::Project(name.to_owned())),
            "key" => Ok(Scope::Key(name.to_owned())),
            _ => Err(InvalidScope),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            Scope::Agent(name) => write!(f, "agent/{name}"),
            Scope::Project(name) => write!(f, "project/{name}"),
            Scope::Key(name) => write!(f, "key/{name}"),
        }
    }
}

/// Where an effective value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// Dotted field path.
    pub field: &'static str,
    /// The scope (`global`, `agent/x`, `project/y`) or `default`.
    pub scope: String,
    /// The revision that set it; 0 for a built-in default.
    pub revision: u64,
}

/// One scope's values as input to [`merge`].
pub struct Layer<'a> {
    /// The scope.
    pub scope: Scope,
    /// The revision that last changed the scope.
    pub revision: u64,
    /// The scope's values.
    pub values: &'a Values,
}

/// Merges layers (lowest precedence first) over the built-in defaults and
/// returns complete values with the source of each.
pub fn merge(layers: &[Layer<'_>]) -> (Values, Vec<Source>) {
    let mut merged = LiveSettings::default().to_values();
    let mut sources: BTreeMap<&'static str, (String, u64)> = FIELDS
        .iter()
        .map(|spec| (spec.path, ("default".to_owned(), 0)))
        .collect();
    for layer in layers {
        for (path, value) in layer.values.iter() {
            merged.0.insert(path, value.clone());
            sources.insert(path, (layer.scope.to_string(), layer.revision));
        }
    }
    let sources = FIELDS
        .iter()
        .map(|spec| {
            let (scope, revision) = sources
                .remove(spec.path)
                .unwrap_or(("default".to_owned(), 0));
            Source {
                field: spec.path,
                scope,
                revision,
            }
        })
        .collect();
    (merged, sources)
}

/// Merges the scopes that apply to an agent type and/or project — global,
/// then `agent/<agent_type>`, then `project/<project_id>` — looking each up
/// with `lookup` (revision and values, or `None` if never written).
pub fn merge_for<'a>(
    agent_type: Option<&str>,
    project_id: Option<&str>,
    lookup: impl Fn(&Scope) -> Option<(u64, &'a Values)>,
) -> (Values, Vec<Source>) {
    let scopes = [
        Some(Scope::Global),
        agent_type.map(|name| Scope::Agent(name.to_owned())),
        project_id.map(|name| Scope::Project(name.to_owned())),
    ];
    let layers: Vec<Layer<'a>> = scopes
        .into_iter()
        .flatten()
        .filter_map(|scope| {
            let (revision, values) = lookup(&scope)?;
            Some(Layer {
                scope,
                revision,
                values,
            })
        })
        .collect();
    merge(&layers)
}

/// Typed, complete live settings, as services consume them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveSettings {
    /// Agent execution defaults.
    pub agent: AgentSettings,
    /// Per-node circuit breaker.
    pub breaker: BreakerSettings,
    /// Cache defaults.
    pub cache: CacheSettings,
    /// Retention.
    pub retention: RetentionSettings,
    /// Batch limits.
    pub batch: BatchSettings,
    /// LLM client limits.
    pub llm: LlmSettings,
    /// Per-API-key rate limits at the gateway.
    pub limits: LimitsSettings,
    /// Per-project token budgets at the gateway.
    pub budget: BudgetSettings,
}

/// Agent execution defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSettings {
    /// Model name (`DEFAULT_LLM_MODEL`).
    pub default_model: String,
    /// Temperature 0–2 (`DEFAULT_TEMPERATURE`).
    pub temperature: f64,
    /// Execution timeout, 1–300 s.
    pub timeout_seconds: i64,
    /// Completion token bound.
    pub max_tokens: i64,
}

/// Circuit breaker settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: i64,
    /// Seconds before an open breaker lets a probe through.
    pub reset_timeout_seconds: i64,
    /// Probe calls a half-open breaker lets through at once.
    pub half_open_max_probes: i64,
    /// Failure rate (percent) over the window that opens the breaker; 0 turns the rule off.
    pub failure_rate_percent: i64,
    /// Window of the failure-rate rule, in seconds.
    pub window_seconds: i64,
    /// Calls the window must hold before the failure rate counts.
    pub min_requests: i64,
}

/// Cache settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// TTL of entries written without one.
    pub default_ttl_seconds: i64,
}

/// Retention settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Age in hours after which artifacts are removed.
    pub artifact_max_age_hours: i64,
}

/// Batch settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSettings {
    /// Tasks of one batch running at once.
    pub max_concurrency: i64,
}

/// LLM client settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmSettings {
    /// Pooled connections and in-flight bound per provider.
    pub pool_size: i64,
}

/// Per-API-key rate limits (token buckets) at the gateway.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSettings {
    /// Sustained requests per second of a user key; 0 is unlimited.
    pub user_rps: i64,
    /// Bucket size of a user key.
    pub user_burst: i64,
    /// Sustained requests per second of an admin key; 0 is unlimited.
    pub admin_rps: i64,
    /// Bucket size of an admin key.
    pub admin_burst: i64,
}

/// Per-project token budgets at the gateway.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetSettings {
    /// Tokens per UTC day; 0 is unlimited.
    pub tokens_per_day: i64,
    /// Tokens per UTC calendar month; 0 is unlimited.
    pub tokens_per_month: i64,
}

impl Default for LimitsSettings {
    fn default() -> Self {
        Self {
            user_rps: 50,
            user_burst: 100,
            admin_rps: 200,
            admin_burst: 400,
        }
    }
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            default_model: "gpt-4o-mini".to_owned(),
            temperature: 0.7,
            timeout_seconds: 30,
            max_tokens: 1024,
        }
    }
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            reset_timeout_seconds: 60,
            half_open_max_probes: 1,
            failure_rate_percent: 50,
            window_seconds: 30,
            min_requests: 20,
        }
    }
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            default_ttl_seconds: 300,
        }
    }
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            artifact_max_age_hours: 24,
        }
    }
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self { max_concurrency: 5 }
    }
}

impl Default for LlmSettings {
    fn default() -> Self {
        Self { pool_size: 10 }
    }
}

impl LiveSettings {
    /// Every field as [`Values`].
    pub fn to_values(&self) -> Values {
        let mut values = Values::default();
        let mut put = |path: &str, value: Value| {
            if let Some(spec) = field(path) {
                values.set(spec, value);
            }
        };
        put(
            "agent.default_model",
            Value::Text(self.agent.default_model.clone()),
        );
        put("agent.temperature", Value::Float(self.agent.temperature));
        put(
            "agent.timeout_seconds",
            Value::Int(self.agent.timeout_seconds),
        );
        put("agent.max_tokens", Value::Int(self.agent.max_tokens));
        put(
            "breaker.failure_threshold",
            Value::Int(self.breaker.failure_threshold),
        );
        put(
            "breaker.reset_timeout_seconds",
            Value::Int(self.breaker.reset_timeout_seconds),
        );
        put(
            "breaker.half_open_max_probes",
            Value::Int(self.breaker.half_open_max_probes),
        );
        put(
            "breaker.failure_rate_percent",
            Value::Int(self.breaker.failure_rate_percent),
        );
        put(
            "breaker.window_seconds",
            Value::Int(self.breaker.window_seconds),
        );
        put(
            "breaker.min_requests",
            Value::Int(self.breaker.min_requests),
        );
        put(
            "cache.default_ttl_seconds",
            Value::Int(self.cache.default_ttl_seconds),
        );
        put(
            "retention.artifact_max_age_hours",
            Value::Int(self.retention.artifact_max_age_hours),
        );
        put(
            "batch.max_concurrency",
            Value::Int(self.batch.max_concurrency),
        );
        put("llm.pool_size", Value::Int(self.llm.pool_size));
        put("limits.user_rps", Value::Int(self.limits.user_rps));
        put("limits.user_burst", Value::Int(self.limits.user_burst));
        put("limits.admin_rps", Value::Int(self.limits.admin_rps));
        put("limits.admin_burst", Value::Int(self.limits.admin_burst));
        put(
            "budget.tokens_per_day",
            Value::Int(self.budget.tokens_per_day),
        );
        put(
            "budget.tokens_per_month",
            Value::Int(self.budget.tokens_per_month),
        );
        values
    }

    /// Builds typed settings from values; fields missing in `values` keep
    /// their built-in default.
    pub fn from_values(values: &Values) -> LiveSettings {
        let mut settings = LiveSettings::default();
        for (path, value) in values.iter() {
            match (path, value) {
                ("agent.default_model", Value::Text(text)) => {
                    settings.agent.default_model = text.clone()
                }
                ("agent.temperature", Value::Float(number)) => settings.agent.temperature = *number,
                ("agent.temperature", Value::Int(number)) => {
                    settings.agent.temperature = *number as f64
                }
                ("agent.timeout_seconds", Value::Int(number)) => {
                    settings.agent.timeout_seconds = *number
                }
                ("agent.max_tokens", Value::Int(number)) => settings.agent.max_tokens = *number,
                ("breaker.failure_threshold", Value::Int(number)) => {
                    settings.breaker.failure_threshold = *number
                }
                ("breaker.reset_timeout_seconds", Value::Int(number)) => {
                    settings.breaker.reset_timeout_seconds = *number
                }
                ("cache.default_ttl_seconds", Value::Int(number)) => {
                    settings.cache.default_ttl_seconds = *number
                }
                ("retention.artifact_max_age_hours", Value::Int(number)) => {
                    settings.retention.artifact_max_age_hours = *number
                }
                ("batch.max_concurrency", Value::Int(number)) => {
                    settings.batch.max_concurrency = *number
                }
                ("llm.pool_size", Value::Int(number)) => settings.llm.pool_size = *number,
                ("limits.user_rps", Value::Int(number)) => settings.limits.user_rps = *number,
                ("limits.user_burst", Value::Int(number)) => settings.limits.user_burst = *number,
                ("limits.admin_rps", Value::Int(number)) => settings.limits.admin_rps = *number,
                ("limits.admin_burst", Value::Int(number)) => settings.limits.admin_burst = *number,
                ("budget.tokens_per_day", Value::Int(number)) => {
                    settings.budget.tokens_per_day = *number
                }
                ("budget.tokens_per_month", Value::Int(number)) => {
                    settings.budget.tokens_per_month = *number
                }
                _ => {}
            }
        }
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_round_trips_through_proto_json_and_typed_settings() {
        let mut settings = LiveSettings::default();
        settings.agent.default_model = "m".into();
        settings.agent.temperature = 1.25;
        settings.llm.pool_size = 3;
        settings.limits.user_rps = 7;
        settings.budget.tokens_per_month = 9;
        let values = settings.to_values();
        assert_eq!(values.iter().count(), FIELDS.len());
        assert_eq!(Values::from_proto(&values.to_proto()), values);
        assert_eq!(Values::from_json(&values.to_json()), values);
        assert_eq!(LiveSettings::from_values(&values), settings);
    }

    #[test]
    fn validation_names_field_value_and_rule() {
        let mut values = Values::default();
        values.set(field("agent.temperature").unwrap(), Value::Float(f64::NAN));
        values.set(
            field("agent.default_model").unwrap(),
            Value::Text("  ".into()),
        );
        values.set(field("breaker.failure_threshold").unwrap(), Value::Int(0));
        let fields: Vec<_> = values
            .validate()
            .into_iter()
            .map(|v| (v.field, v.rule))
            .collect();
        assert_eq!(fields.len(), 3);
        assert_eq!(fields[0].0, "agent.default_model");
        assert_eq!(fields[1].0, "agent.temperature");
        assert_eq!(
            fields[2],
            (
                "breaker.failure_threshold".into(),
                "must be between 1 and 10000".into()
            )
        );
    }

    #[test]
    fn merge_prefers_project_over_agent_over_global() {
        let global = LiveSettings::default().to_values();
        let mut agent = Values::default();
        agent.set(field("agent.temperature").unwrap(), Value::Float(0.1));
        agent.set(field("agent.max_tokens").unwrap(), Value::Int(10));
        let mut project = Values::default();
        project.set(field("agent.temperature").unwrap(), Value::Float(0.2));
        let (merged, sources) = merge(&[
            Layer {
                scope: Scope::Global,
                revision: 1,
                values: &global,
            },
            Layer {
                scope: Scope::Agent("coder".into()),
                revision: 2,
                values: &agent,
            },
            Layer {
                scope: Scope::Project("p".into()),
                revision: 3,
                values: &project,
            },
        ]);
        let typed = LiveSettings::from_values(&merged);
        assert_eq!(typed.agent.temperature, 0.2);
        assert_eq!(typed.agent.max_tokens, 10);
        let source = |path: &str| sources.iter().find(|s| s.field == path).unwrap().clone();
        assert_eq!(source("agent.temperature").scope, "project/p");
        assert_eq!(source("agent.max_tokens").revision, 2);
        assert_eq!(source("llm.pool_size").scope, "global");
    }

    #[test]
    fn scopes_parse_strictly() {
        assert_eq!(Scope::parse("global"), Ok(Scope::Global));
        assert_eq!(
            Scope::parse("agent/coder"),
            Ok(Scope::Agent("coder".into()))
        );
        assert_eq!(
            Scope::parse("project/p-1.x").unwrap().to_string(),
            "project/p-1.x"
        );
        assert_eq!(Scope::parse("key/0a1b"), Ok(Scope::Key("0a1b".into())));
        for bad in [
            "",
            "Global",
            "agent/",
            "agent/a/b",
            "team/x",
            "project/has space",
        ] {
            assert_eq!(Scope::parse(bad), Err(InvalidScope), "{bad}");
        }
    }
}
