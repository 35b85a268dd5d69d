//! Audit events of workflow decisions (run started, approvals, rejections,
//! cancels, project stops), sent best-effort to the audit service: a
//! failed send is logged and counted, never fails the caller. Every event
//! goes through [`AuditSink::emit`], the one call site to switch when the
//! gateway gets its buffered audit pipeline.

use std::collections::BTreeMap;
use std::time::Duration;

use agentmesh_client::TracedChannel;
use agentmesh_proto::audit as audit_pb;
use agentmesh_proto::audit::audit_service_client::AuditServiceClient;

/// Longest wait for the audit service per event.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// One workflow audit event.
#[derive(Clone, Debug, Default)]
pub struct AuditRecord {
    /// What was done: `workflow.run`, `workflow.step.approve`…
    pub action: &'static str,
    /// Who did it (the caller's identity).
    pub actor: String,
    /// Project.
    pub project_id: String,
    /// Workflow id.
    pub workflow_id: String,
    /// Agent type concerned, or empty.
    pub agent_type: String,
    /// W3C trace id of the run, or empty.
    pub trace_id: String,
    /// Whether the action succeeded (`false`: refused or failed).
    pub success: bool,
    /// Details (run id, step, reason…).
    pub context: BTreeMap<String, String>,
}

/// Sends audit events to the audit service.
#[derive(Clone, Debug)]
pub struct AuditSink {
    client: Option<AuditServiceClient<TracedChannel>>,
}

impl AuditSink {
    /// A sink towards `endpoint`; events are only logged when the endpoint
    /// is unusable.
    pub fn new(endpoint: &str, tls: &agentmesh_settings::ClientTlsSettings) -> Self {
        let client = match agentmesh_client::connect_lazy(endpoint, tls) {
            Ok(channel) => Some(AuditServiceClient::new(channel)),
            Err(error) => {
                tracing::warn!(endpoint, %error, "audit endpoint unusable, workflow audit events are only logged");
                None
            }
        };
        Self { client }
    }

    /// Sends `record` in the background (best-effort).
    pub fn emit(&self, record: AuditRecord) {
        tracing::info!(
            action = record.action,
            actor = record.actor,
            project_id = record.project_id,
            workflow_id = record.workflow_id,
            "workflow audit event"
        );
        let Some(mut client) = self.client.clone() else {
            return;
        };
        let event = audit_pb::Event {
            event_id: format!("wfa_{}", uuid::Uuid::new_v4().simple()),
            occurred_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            agent_type: record.agent_type,
            action: record.action.to_owned(),
            user_id: record.actor,
            project_id: record.project_id,
            workflow_id: record.workflow_id,
            trace_id: record.trace_id,
            outcome: if record.success {
                audit_pb::Outcome::Success as i32
            } else {
                audit_pb::Outcome::Failure as i32
            },
            context: Some(prost_types::Struct {
                fields: record
                    .context
                    .into_iter()
                    .map(|(key, value)| {
                        (
                            key,
                            prost_types::Value {
                                kind: Some(prost_types::value::Kind::StringValue(value)),
                            },
                        )
                    })
                    .collect(),
            }),
        };
        let action = event.action.clone();
        tokio::spawn(async move {
            let mut request = tonic::Request::new(audit_pb::AppendRequest { event: Some(event) });
            request.set_timeout(SEND_TIMEOUT);
            if let Err(status) = client.append(request).await {
                metrics::counter!("agentmesh_gateway_workflow_audit_failures_total").increment(1);
                tracing::warn!(
                    action,
                    code = agentmesh_telemetry::code_name(status.code()),
                    message = status.message(),
                    "workflow audit event not delivered"
                );
            }
        });
    }
}
