//! The process-wide Prometheus registry. Every service records through the
//! `metrics` facade; the admin HTTP endpoint renders this registry.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds, from 100 µs to 60 s: fine at the low end,
/// where gRPC overhead lives, and wide enough for LLM calls.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Buckets of `agentmesh_gateway_overhead_seconds`, the gateway's own time
/// per task: 1 µs to 100 ms, because that time is microseconds, not
/// milliseconds.
const OVERHEAD_BUCKETS_SECONDS: &[f64] = &[
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_02,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.01,
    0.1,
];

/// The metric that gets [`OVERHEAD_BUCKETS_SECONDS`].
pub const GATEWAY_OVERHEAD_METRIC: &str = "agentmesh_gateway_overhead_seconds";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle;
/// `None` if another recorder was installed first (tests embedding us).
pub fn metrics_handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            // A full-name matcher wins over a suffix matcher.
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".to_owned()),
                    LATENCY_BUCKETS_SECONDS,
                )
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full(GATEWAY_OVERHEAD_METRIC.to_owned()),
                    OVERHEAD_BUCKETS_SECONDS,
                )
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            crate::metric_descriptions::describe_all();
            Some(handle)
        })
        .as_ref()
}

/// Renders every metric in the Prometheus text format.
pub fn render_metrics() -> String {
    metrics_handle()
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}
