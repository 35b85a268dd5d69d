//! W3C trace-context propagation: servers extract `traceparent` from
//! incoming metadata, clients inject the current span's context into every
//! outgoing call, so one trace spans all services.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Extracts the remote parent context from request headers (`traceparent`,
/// `tracestate`); an empty context when absent or malformed.
pub fn extract_remote_context(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    })
}

/// Makes `span` a child of the caller's trace context found in `headers`
/// and records its trace id in the span's `trace_id` field (which the span
/// must declare), so log lines inside it name the trace.
pub fn attach_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = extract_remote_context(headers);
    let remote_trace_id = {
        let remote = parent.span().span_context().clone();
        remote.is_valid().then(|| remote.trace_id().to_string())
    };
    // Fails only when no OpenTelemetry layer is installed; the remote id
    // still names the trace in logs then.
    let _ = span.set_parent(parent);
    if let Some(trace_id) = span_trace_id(span).or(remote_trace_id) {
        span.record("trace_id", trace_id.as_str());
    }
}

/// Returns the trace id of the current span as 32 hex digits, if it has one.
pub fn current_trace_id() -> Option<String> {
    span_trace_id(&tracing::Span::current())
}

/// Returns the trace id of `span` as 32 hex digits, if it has one.
pub fn span_trace_id(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Returns the trace id and span id of `span` as hex (32 and 16 digits),
/// if it has a valid context: what a long-running job stores so that it
/// can continue its trace after a restart (see [`continue_trace`]).
pub fn span_ids(span: &tracing::Span) -> Option<(String, String)> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| {
        (
            span_context.trace_id().to_string(),
            span_context.span_id().to_string(),
        )
    })
}

/// Makes `span` a child of span `span_id` of trace `trace_id` (hex, as
/// [`span_ids`] returns them), so work resumed in another process joins
/// the trace it started in. Returns false when the ids are malformed or no
/// OpenTelemetry layer is installed.
pub fn continue_trace(span: &tracing::Span, trace_id: &str, span_id: &str) -> bool {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    let (Ok(trace_id), Ok(span_id)) = (TraceId::from_hex(trace_id), SpanId::from_hex(span_id))
    else {
        return false;
    };
    let remote = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    if !remote.is_valid() {
        return false;
    }
    let parent = opentelemetry::Context::new().with_remote_span_context(remote);
    span.set_parent(parent).is_ok()
}

/// The trace context of a span, kept to continue its trace from work done
/// later elsewhere, such as a background task that sends many callers'
/// events in one batch.
#[derive(Clone, Debug)]
pub struct CapturedContext(opentelemetry::trace::SpanContext);

impl Default for CapturedContext {
    fn default() -> Self {
        Self(opentelemetry::trace::SpanContext::empty_context())
    }
}

impl CapturedContext {
    /// The current span's context.
    pub fn current() -> Self {
        Self(
            tracing::Span::current()
                .context()
                .span()
                .span_context()
                .clone(),
        )
    }

    /// Makes `span` a child of the first valid context and links it to
    /// the others (at most `max_links`), so a batch shows up in the trace
    /// of its first caller and can be found from the others.
    pub fn adopt<'a>(
        span: &tracing::Span,
        contexts: impl IntoIterator<Item = &'a CapturedContext>,
        max_links: usize,
    ) {
        let mut valid = contexts.into_iter().filter(|context| context.0.is_valid());
        if let Some(first) = valid.next() {
            let parent = opentelemetry::Context::new().with_remote_span_context(first.0.clone());
            if let Err(error) = span.set_parent(parent) {
                tracing::debug!(%error, "cannot parent a batch span");
            }
        }
        for other in valid.take(max_links) {
            span.add_link(other.0.clone());
        }
    }
}

/// A tonic interceptor that injects the current span's trace context into
/// every outgoing request.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceContextInterceptor;

impl tonic::service::Interceptor for TraceContextInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let context = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&context, &mut MetadataInjector(request.metadata_mut()));
        });
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use tonic::service::Interceptor;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[test]
    fn client_interceptor_continues_the_incoming_trace() {
        crate::install_propagator();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                "traceparent",
                http::HeaderValue::from_static(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            );
            let span = tracing::info_span!("server", trace_id = tracing::field::Empty);
            attach_remote_parent(&span, &headers);
            let _entered = span.enter();
            assert_eq!(
                current_trace_id().as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );

            let outgoing = TraceContextInterceptor
                .call(tonic::Request::new(()))
                .unwrap();
            let traceparent = outgoing
                .metadata()
                .get("traceparent")
                .unwrap()
                .to_str()
                .unwrap();
            assert!(
                traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{traceparent}"
            );
            // A new span id: the outgoing call is a child, not the caller.
            assert!(!traceparent.contains("00f067aa0ba902b7"), "{traceparent}");
        });
    }

    #[test]
    fn a_resumed_span_continues_the_stored_trace() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let first = tracing::info_span!("run");
            let (trace_id, span_id) = span_ids(&first).unwrap();
            assert_eq!(trace_id.len(), 32);
            assert_eq!(span_id.len(), 16);
            let resumed = tracing::info_span!(parent: None, "resumed");
            assert!(continue_trace(&resumed, &trace_id, &span_id));
            assert_eq!(span_trace_id(&resumed).unwrap(), trace_id);
            let child = tracing::info_span!(parent: &resumed, "step");
            assert_eq!(span_trace_id(&child).unwrap(), trace_id);
            assert!(!continue_trace(&resumed, "nothex", &span_id));
        });
    }
}
