//! `# HELP` text for every metric the services export, registered with the
//! recorder when it is installed. Prometheus linters (`promtool check
//! metrics`) reject metrics without help text, and an operator reading a
//! dashboard wants to know what a series counts. Add a line here with
//! every new metric.

/// What kind of metric a name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up; the name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, sum and count.
    Histogram,
}

/// Every exported metric: name, kind and help text.
pub const METRICS: &[(&str, MetricKind, &str)] = &[
    // Every gRPC server (shared/runtime layers).
    (
        "grpc_server_started_total",
        MetricKind::Counter,
        "gRPC calls started, by service and method",
    ),
    (
        "grpc_server_handled_total",
        MetricKind::Counter,
        "gRPC calls finished, by service, method and status code",
    ),
    (
        "grpc_server_handling_seconds",
        MetricKind::Histogram,
        "Time from the start of a gRPC call to its status, by service and method",
    ),
    (
        "grpc_server_in_flight",
        MetricKind::Gauge,
        "gRPC calls in progress, by service and method",
    ),
    (
        "agentmesh_tls_handshake_failures_total",
        MetricKind::Counter,
        "TLS handshakes that failed or timed out on a gRPC listener (mTLS without a valid client certificate included)",
    ),
    (
        "agentmesh_tls_reloads_total",
        MetricKind::Counter,
        "Changes of the TLS certificate files picked up (outcome ok) or rejected, keeping the previous certificate (outcome error)",
    ),
    // Config service and its clients.
    (
        "agentmesh_config_head_revision",
        MetricKind::Gauge,
        "Newest config revision this config service has seen",
    ),
    (
        "agentmesh_config_revisions_total",
        MetricKind::Counter,
        "Config revisions written by this process, by kind (seed, update, rollback)",
    ),
    (
        "agentmesh_config_watchers",
        MetricKind::Gauge,
        "Open Watch streams on this config service",
    ),
    (
        "agentmesh_config_watch_resyncs_total",
        MetricKind::Counter,
        "Watchers that fell behind and were sent a fresh snapshot",
    ),
    (
        "agentmesh_config_watcher_connected",
        MetricKind::Gauge,
        "1 while this process's ConfigWatcher is connected to the config service, else 0",
    ),
    (
        "agentmesh_config_watcher_revision",
        MetricKind::Gauge,
        "Config revision this process's ConfigWatcher has applied",
    ),
    // Cache service.
    (
        "agentmesh_cache_hits_total",
        MetricKind::Counter,
        "Cache reads answered, by level (l1, l2)",
    ),
    (
        "agentmesh_cache_misses_total",
        MetricKind::Counter,
        "Cache reads a level could not answer, by level (l1, l2)",
    ),
    (
        "agentmesh_cache_l1_evictions_total",
        MetricKind::Counter,
        "L1 entries evicted to stay within cache.l1_max_bytes",
    ),
    (
        "agentmesh_cache_l1_bytes",
        MetricKind::Gauge,
        "Bytes held by the in-process L1 (keys, values and attributes)",
    ),
    (
        "agentmesh_cache_l1_entries",
        MetricKind::Gauge,
        "Entries held by the in-process L1",
    ),
    (
        "agentmesh_cache_redis_seconds",
        MetricKind::Histogram,
        "Time of one Redis operation, by operation",
    ),
    (
        "agentmesh_cache_l2_errors_total",
        MetricKind::Counter,
        "Failed Redis operations, by operation",
    ),
    (
        "agentmesh_cache_l2_breaker_state",
        MetricKind::Gauge,
        "State of the breaker around Redis: 0 closed, 1 open, 2 half-open",
    ),
    (
        "agentmesh_cache_l2_connected",
        MetricKind::Gauge,
        "1 while the invalidation subscription to Redis is up, else 0",
    ),
    (
        "agentmesh_cache_leases_granted_total",
        MetricKind::Counter,
        "GetOrLease calls that were granted the lease to fill a key",
    ),
    (
        "agentmesh_cache_lease_waits_total",
        MetricKind::Counter,
        "GetOrLease calls that waited for another holder's value",
    ),
    (
        "agentmesh_cache_lease_wait_timeouts_total",
        MetricKind::Counter,
        "GetOrLease waits that ended without a value",
    ),
    // Audit service.
    (
        "agentmesh_audit_appends_total",
        MetricKind::Counter,
        "Audit events accepted, by result (appended, duplicate)",
    ),
    (
        "agentmesh_audit_group_commit_events",
        MetricKind::Histogram,
        "Audit events committed per writer transaction (group commit)",
    ),
    (
        "agentmesh_audit_commit_seconds",
        MetricKind::Histogram,
        "Time of one audit writer transaction",
    ),
    (
        "agentmesh_audit_commit_failures_total",
        MetricKind::Counter,
        "Audit writer transactions that failed",
    ),
    (
        "agentmesh_audit_checkpoints_total",
        MetricKind::Counter,
        "Signed audit checkpoints written",
    ),
    (
        "agentmesh_audit_verify_runs_total",
        MetricKind::Counter,
        "Verify runs, by result (ok, failed: the chain does not check out, error)",
    ),
    // Agent service.
    (
        "agentmesh_agent_execution_duration_seconds",
        MetricKind::Histogram,
        "Time of one agent execution, by agent type, provider, model and outcome",
    ),
    (
        "agentmesh_agent_executions_total",
        MetricKind::Counter,
        "Agent executions finished, by agent type and outcome",
    ),
    (
        "agentmesh_agent_tokens_total",
        MetricKind::Counter,
        "LLM tokens used, by agent type, provider, model and kind (prompt, completion)",
    ),
    (
        "agentmesh_agent_executions_in_flight",
        MetricKind::Gauge,
        "Agent executions running on this node",
    ),
    (
        "agentmesh_agent_executions_queued",
        MetricKind::Gauge,
        "Agent executions waiting for a slot on this node",
    ),
    (
        "agentmesh_agent_provider_in_flight",
        MetricKind::Gauge,
        "Provider requests in flight, by provider",
    ),
    (
        "agentmesh_agent_provider_queued",
        MetricKind::Gauge,
        "Provider requests waiting for a pool slot, by provider",
    ),
    (
        "agentmesh_agent_provider_errors_total",
        MetricKind::Counter,
        "Failed provider requests, by provider and kind",
    ),
    (
        "agentmesh_agent_provider_retries_total",
        MetricKind::Counter,
        "Provider requests retried, by provider",
    ),
    (
        "agentmesh_agent_records_written_total",
        MetricKind::Counter,
        "Execution records written to the database",
    ),
    (
        "agentmesh_agent_records_lost_total",
        MetricKind::Counter,
        "Execution records given up after the database failed",
    ),
    (
        "agentmesh_agent_record_queue_depth",
        MetricKind::Gauge,
        "Execution records waiting for the background writer",
    ),
    (
        "agentmesh_agent_artifacts_deleted_total",
        MetricKind::Counter,
        "Artifacts deleted by the retention job",
    ),
    // Gateway.
    (
        "agentmesh_gateway_tasks_total",
        MetricKind::Counter,
        "Gateway tasks finished, by outcome (served, degraded, unavailable or a gRPC code)",
    ),
    (
        "agentmesh_gateway_task_duration_seconds",
        MetricKind::Histogram,
        "Time of one gateway task, upstream included",
    ),
    (
        "agentmesh_gateway_overhead_seconds",
        MetricKind::Histogram,
        "The gateway's own time per task, upstream wait excluded",
    ),
    (
        "agentmesh_gateway_retries_total",
        MetricKind::Counter,
        "Gateway tasks retried on another agent node",
    ),
    (
        "agentmesh_gateway_retries_refused_total",
        MetricKind::Counter,
        "Retries the gateway's retry budget refused",
    ),
    (
        "agentmesh_gateway_api_keys",
        MetricKind::Gauge,
        "API keys the gateway knows (active ones)",
    ),
    (
        "agentmesh_gateway_auth_failures_total",
        MetricKind::Counter,
        "Calls refused for a missing, malformed, unknown or revoked API key, by reason",
    ),
    (
        "agentmesh_gateway_rate_limited_total",
        MetricKind::Counter,
        "Calls refused by a key's rate limit",
    ),
    (
        "agentmesh_gateway_budget_refusals_total",
        MetricKind::Counter,
        "Tasks refused because their project's token budget is used up, by period",
    ),
    (
        "agentmesh_gateway_tokens_total",
        MetricKind::Counter,
        "Tokens counted against project budgets",
    ),
    (
        "agentmesh_gateway_usage_store_failures_total",
        MetricKind::Counter,
        "Failed reads or writes of token usage (Redis or the database)",
    ),
    (
        "agentmesh_gateway_audit_buffer_depth",
        MetricKind::Gauge,
        "Gateway audit buffer depth",
    ),
    (
        "agentmesh_gateway_audit_delivered_total",
        MetricKind::Counter,
        "Gateway audit delivered",
    ),
    (
        "agentmesh_gateway_audit_delivery_failures_total",
        MetricKind::Counter,
        "Gateway audit delivery failures",
    ),
    (
        "agentmesh_gateway_audit_dropped_total",
        MetricKind::Counter,
        "Gateway audit dropped",
    ),
    (
        "agentmesh_gateway_audit_refused_total",
        MetricKind::Counter,
        "Gateway audit refused",
    ),
    (
        "agentmesh_gateway_cache_errors_total",
        MetricKind::Counter,
        "Gateway cache errors",
    ),
    (
        "agentmesh_gateway_cache_lookups_total",
        MetricKind::Counter,
        "Gateway cache lookups",
    ),
    (
        "agentmesh_gateway_cache_stores_total",
        MetricKind::Counter,
        "Gateway cache stores",
    ),
    (
        "agentmesh_gateway_workflow_audit_failures_total",
        MetricKind::Counter,
        "Gateway workflow audit failures",
    ),
    (
        "agentmesh_gateway_workflow_runs_active",
        MetricKind::Gauge,
        "Gateway workflow runs active",
    ),
    (
        "agentmesh_gateway_workflow_runs_finished_total",
        MetricKind::Counter,
        "Gateway workflow runs finished",
    ),
    (
        "agentmesh_gateway_workflow_runs_started_total",
        MetricKind::Counter,
        "Gateway workflow runs started",
    ),
    (
        "agentmesh_gateway_workflow_step_duration_seconds",
        MetricKind::Histogram,
        "Gateway workflow step duration (seconds)",
    ),
    (
        "agentmesh_gateway_workflow_steps_total",
        MetricKind::Counter,
        "Gateway workflow steps",
    ),
    (
        "agentmesh_gateway_nodes",
        MetricKind::Gauge,
        "Agent nodes the gateway routes over (configured addresses and resolved names)",
    ),
    (
        "agentmesh_gateway_discovery_errors_total",
        MetricKind::Counter,
        "Failed DNS resolutions of agent endpoint names",
    ),
    (
        "agentmesh_gateway_node_in_flight",
        MetricKind::Gauge,
        "Calls in flight from this gateway to an agent node, by endpoint",
    ),
    (
        "agentmesh_gateway_breaker_state",
        MetricKind::Gauge,
        "State of an agent node's breaker: 0 closed, 1 half-open, 2 open",
    ),
    (
        "agentmesh_gateway_breaker_transitions_total",
        MetricKind::Counter,
        "Breaker state changes, by endpoint and new state",
    ),
];

/// Registers the help text of every metric in [`METRICS`] with the
/// installed recorder.
pub fn describe_all() {
    for &(name, kind, help) in METRICS {
        match kind {
            MetricKind::Counter => metrics::describe_counter!(name, help),
            MetricKind::Gauge => metrics::describe_gauge!(name, help),
            MetricKind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_follow_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        for &(name, kind, help) in METRICS {
            assert!(seen.insert(name), "{name} is listed twice");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name} is not snake_case"
            );
            assert_eq!(
                kind == MetricKind::Counter,
                name.ends_with("_total"),
                "{name}: counters and only counters end in _total"
            );
            assert!(!help.is_empty() && !help.ends_with('.'), "{name}: {help:?}");
        }
    }
}
