//! Telemetry for every agentmesh process: `tracing` logs (pretty or JSON,
//! each line carrying the trace id and request id of its call), OpenTelemetry
//! traces exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, W3C
//! trace-context propagation for servers and clients, and the process-wide
//! Prometheus registry.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod metric_descriptions;
pub mod metrics_registry;
pub mod propagation;

use std::sync::OnceLock;

use agentmesh_settings::LogFormat;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use metrics_registry::{metrics_handle, render_metrics};
/// Returns the canonical upper-case name of a gRPC code (`INVALID_ARGUMENT`),
/// as metrics labels and reports use it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

pub use propagation::{
    CapturedContext, TraceContextInterceptor, current_trace_id, extract_remote_context,
};

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `AGENTMESH_LOG` / `RUST_LOG` is not a valid filter.
    #[error("invalid log filter {filter:?}: {reason}")]
    Filter {
        /// The filter text.
        filter: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    /// A global subscriber was already installed.
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Flushes and shuts the trace exporter down when dropped.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        // Export what is buffered; errors here have nowhere useful to go.
        let _ = self.provider.shutdown();
    }
}

static PROPAGATOR_INSTALLED: OnceLock<()> = OnceLock::new();

/// Installs the W3C trace-context propagator globally (idempotent).
pub fn install_propagator() {
    PROPAGATOR_INSTALLED.get_or_init(|| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    });
}

/// Installs the global subscriber: an env filter from `AGENTMESH_LOG`, else
/// `RUST_LOG`, else `info`; a pretty or JSON formatter on stderr; and the
/// OpenTelemetry layer. Spans are exported over OTLP/gRPC only when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific variable) is set;
/// otherwise they still get trace ids for logs but nothing is sent.
pub fn init(service_name: &str, format: LogFormat) -> Result<TelemetryGuard, TelemetryError> {
    install_propagator();
    let filter_text = std::env::var("AGENTMESH_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&filter_text).map_err(|error| TelemetryError::Filter {
        filter: filter_text.clone(),
        reason: error.to_string(),
    })?;

    // OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over our default name.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name.to_owned());
    }
    let resource = resource.build();
    let mut provider_builder = SdkTracerProvider::builder().with_resource(resource);
    if otlp_endpoint_configured() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
        provider_builder = provider_builder.with_batch_exporter(exporter);
    }
    let provider = provider_builder.build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let otel_layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("agentmesh"));

    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let installed = match format {
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
    };
    installed.map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider })
}

/// Installs only the trace context: the W3C propagator and an
/// OpenTelemetry layer that gives every span a trace id (exported nowhere),
/// without any log output. For processes that embed agentmesh services and
/// keep their own logging, such as the end-to-end tests. Returns false when
/// a global subscriber was already installed.
pub fn init_trace_context_only() -> bool {
    install_propagator();
    let provider = SdkTracerProvider::builder().build();
    let otel_layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("agentmesh"));
    tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::INFO)
        .with(otel_layer)
        .try_init()
        .is_ok()
}

/// Returns true when the standard OTLP endpoint variables are set.
pub fn otlp_endpoint_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty()))
}
