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

/// Buckets for the gateway's own time per task, from 5 µs to 50 ms: the
/// figure is tens of microseconds, below the latency buckets' floor.
const OVERHEAD_BUCKETS_SECONDS: &[f64] = &[
    0.000005, 0.00001, 0.00002, 0.00003, 0.00005, 0.000075, 0.0001, 0.00015, 0.0002, 0.0003,
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.05,
];

/// Name of the gateway overhead histogram (see the gateway crate).
pub const GATEWAY_OVERHEAD_SECONDS: &str = "agentmesh_gateway_overhead_seconds";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle;
/// `None` if another recorder was installed first (tests embedding us).
pub fn metrics_handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(GATEWAY_OVERHEAD_SECONDS.to_owned()),
                    OVERHEAD_BUCKETS_SECONDS,
                )
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".to_owned()),
                    LATENCY_BUCKETS_SECONDS,
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
