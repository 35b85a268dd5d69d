//! Tower layers of every gRPC server: the request span (W3C parent, request
//! id, trace id) and per-call Prometheus metrics by service, method and code.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use agentmesh_telemetry::code_name;
use agentmesh_telemetry::propagation::attach_remote_parent;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;
use tower::{Layer, Service};

/// Splits `/pkg.Service/Method` into service and method.
fn split_path(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// Makes the span of one gRPC call: a child of the caller's `traceparent`,
/// carrying the request id and trace id so every log line inside names them.
pub fn make_grpc_span<B>(request: &http::Request<B>) -> tracing::Span {
    let path = request.uri().path();
    let (service, method) = split_path(path);
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "grpc",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        request_id = %request_id,
        trace_id = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    attach_remote_parent(&span, request.headers());
    span
}

/// Records `grpc_server_started_total`, `grpc_server_handled_total`,
/// `grpc_server_handling_seconds` and `grpc_server_in_flight`.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
}

/// One call being measured; records a cancellation if dropped unfinished
/// (the client went away mid-call).
struct CallRecord {
    service: Arc<str>,
    method: Arc<str>,
    started: Instant,
    finished: bool,
}

impl CallRecord {
    fn start(path: &str) -> Self {
        let (service, method) = split_path(path);
        let record = Self {
            service: Arc::from(service),
            method: Arc::from(method),
            started: Instant::now(),
            finished: false,
        };
        metrics::counter!("grpc_server_started_total", "grpc_service" => record.service.to_string(), "grpc_method" => record.method.to_string()).increment(1);
        metrics::gauge!("grpc_server_in_flight", "grpc_service" => record.service.to_string())
            .increment(1.0);
        record
    }

    fn finish(&mut self, code: Code) {
        if self.finished {
            return;
        }
        self.finished = true;
        let elapsed = self.started.elapsed();
        let code_label = code_name(code);
        let service = self.service.to_string();
        let method = self.method.to_string();
        metrics::gauge!("grpc_server_in_flight", "grpc_service" => service.clone()).decrement(1.0);
        metrics::counter!("grpc_server_handled_total", "grpc_service" => service.clone(), "grpc_method" => method.clone(), "grpc_code" => code_label).increment(1);
        metrics::histogram!("grpc_server_handling_seconds", "grpc_service" => service, "grpc_method" => method, "grpc_code" => code_label).record(elapsed.as_secs_f64());
        let latency_us = elapsed.as_micros() as u64;
        let span = tracing::Span::current();
        span.record("rpc.grpc.status_code", code as i32);
        match code {
            Code::Unknown
            | Code::Internal
            | Code::DataLoss
            | Code::Unimplemented
            | Code::Unavailable => {
                // Server-side faults mark the span as an error in Jaeger;
                // a caller's mistake (INVALID_ARGUMENT…) does not.
                span.record("otel.status_code", "ERROR");
                tracing::warn!(grpc_code = code_label, latency_us, "grpc call failed")
            }
            _ => tracing::debug!(grpc_code = code_label, latency_us, "grpc call done"),
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

fn status_from_headers(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?;
    let number = value.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(number))
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for GrpcMetrics<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
{
    type Response = http::Response<MetricsBody<ResponseBody>>;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let record = CallRecord::start(request.uri().path());
        MetricsFuture {
            inner: self.inner.call(request),
            record: Some(record),
        }
    }
}

pin_project! {
    /// Future of [`GrpcMetrics`].
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        record: Option<CallRecord>,
    }
}

impl<F, ResponseBody, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<http::Response<ResponseBody>, E>>,
{
    type Output = Result<http::Response<MetricsBody<ResponseBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut record = this.record.take();
        Poll::Ready(match result {
            Ok(response) => {
                // Trailers-only responses (errors) carry the status in headers.
                if let (Some(code), Some(call)) =
                    (status_from_headers(response.headers()), record.as_mut())
                {
                    call.finish(code);
                }
                Ok(response.map(|inner| MetricsBody { inner, record }))
            }
            Err(error) => {
                if let Some(call) = record.as_mut() {
                    call.finish(Code::Unknown);
                }
                Err(error)
            }
        })
    }
}

pin_project! {
    /// Response body of [`GrpcMetrics`]: finishes the record at the trailers.
    pub struct MetricsBody<B> {
        #[pin]
        inner: B,
        record: Option<CallRecord>,
    }
}

impl<B: Body> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let result = ready!(this.inner.poll_frame(cx));
        match &result {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(mut call) = this.record.take()
                {
                    call.finish(status_from_headers(trailers).unwrap_or(Code::Unknown));
                }
            }
            Some(Err(_)) | None => {
                if let Some(mut call) = this.record.take() {
                    call.finish(if result.is_none() {
                        Code::Ok
                    } else {
                        Code::Unknown
                    });
                }
            }
        }
        Poll::Ready(result)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_grpc_paths() {
        assert_eq!(
            split_path("/agentmesh.config.v1.ConfigService/Get"),
            ("agentmesh.config.v1.ConfigService", "Get")
        );
        assert_eq!(split_path("/odd"), ("odd", ""));
    }
}
