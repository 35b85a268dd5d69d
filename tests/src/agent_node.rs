//! One running agent service for end-to-end tests.

crate::service_node!(
    /// A running agent service.
    AgentNode,
    "agent",
    agentmesh_agent::serve,
    agentmesh_proto::agent::agent_service_client::AgentServiceClient<tonic::transport::Channel>
);
