//! The thin `agentmesh.audit.v1.AuditService` implementation: convert,
//! call [`AuditCore`], convert back.

use std::sync::Arc;

use agentmesh_proto::audit as pb;
use agentmesh_proto::audit::audit_service_server::AuditService;
use agentmesh_resilience::FieldViolation;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::error::AuditError;
use crate::service::AuditCore;

/// The gRPC face of [`AuditCore`].
#[derive(Clone)]
pub struct AuditGrpc {
    core: Arc<AuditCore>,
}

impl AuditGrpc {
    /// Wraps a core.
    pub fn new(core: Arc<AuditCore>) -> Self {
        Self { core }
    }
}

/// The caller's trace id: the current span's, else the incoming
/// `traceparent`.
fn incoming_trace_id<T>(request: &Request<T>) -> Option<String> {
    agentmesh_telemetry::current_trace_id().or_else(|| traceparent_trace_id(request))
}

/// The trace id named by the request's `traceparent` header (used when no
/// OpenTelemetry layer gives the span a context).
fn traceparent_trace_id<T>(request: &Request<T>) -> Option<String> {
    let header = request.metadata().get("traceparent")?.to_str().ok()?;
    let trace_id = header.split('-').nth(1)?;
    convert::is_trace_id(trace_id).then(|| trace_id.to_owned())
}

#[tonic::async_trait]
impl AuditService for AuditGrpc {
    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let trace_id = incoming_trace_id(&request);
        let Some(event) = request.into_inner().event else {
            return Err(AuditError::Invalid(vec![FieldViolation::new(
                "event",
                "unset",
                "is required",
            )])
            .into());
        };
        let mut violations = Vec::new();
        let event = convert::event_from_wire(
            event,
            "event",
            self.core.limits(),
            trace_id.as_deref(),
            &mut violations,
        );
        let Some(event) = event.filter(|_| violations.is_empty()) else {
            return Err(AuditError::Invalid(violations).into());
        };
        let appended = self.core.append(vec![event], "event").await?;
        let result = appended
            .into_iter()
            .next()
            .ok_or_else(|| Status::internal("the writer returned no result"))?;
        Ok(Response::new(pb::AppendResponse {
            entry: Some(convert::entry_to_wire(&result.entry)),
            duplicate: result.duplicate,
        }))
    }

    async fn append_batch(
        &self,
        request: Request<pb::AppendBatchRequest>,
    ) -> Result<Response<pb::AppendBatchResponse>, Status> {
        let trace_id = incoming_trace_id(&request);
        let events = convert::batch_from_wire(
            request.into_inner().events,
            self.core.limits(),
            trace_id.as_deref(),
        )
        .map_err(AuditError::Invalid)?;
        let appended = self.core.append(events, "events").await?;
        Ok(Response::new(pb::AppendBatchResponse {
            results: appended
                .iter()
                .map(|result| pb::AppendResult {
                    entry: Some(convert::entry_to_wire(&result.entry)),
                    duplicate: result.duplicate,
                })
                .collect(),
        }))
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let request = request.into_inner();
        let (filter, page_size) =
            convert::query_from_wire(&request).map_err(AuditError::Invalid)?;
        let page = self
            .core
            .query(&filter, page_size, &request.page_token)
            .await?;
        Ok(Response::new(pb::QueryResponse {
            entries: page.entries.iter().map(convert::entry_to_wire).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let request = request.into_inner();
        let report = self
            .core
            .verify(request.from_sequence, request.to_sequence)
            .await?;
        if let Some((sequence, problem, detail)) = &report.problem {
            tracing::warn!(
                sequence,
                ?problem,
                detail,
                "audit verification found a problem"
            );
        }
        Ok(Response::new(convert::verify_to_wire(&report)))
    }

    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        let checkpoint = self.core.checkpoint(request.into_inner().sequence).await?;
        Ok(Response::new(pb::GetCheckpointResponse {
            checkpoint: Some(convert::checkpoint_to_wire(&checkpoint)),
        }))
    }
}
