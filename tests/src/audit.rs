//! Sandbox helpers for the audit service: a running node, and direct SQL
//! access to its tables for tampering tests.

crate::service_node!(
    /// One running audit service.
    AuditNode,
    "audit",
    agentmesh_audit::serve,
    agentmesh_proto::audit::audit_service_client::AuditServiceClient<tonic::transport::Channel>
);
