//! One running gateway, and a small fleet of agent nodes behind it, for
//! end-to-end tests.

use agentmesh_settings::Settings;

use crate::agent_node::AgentNode;
use crate::{Backend, TestDatabase};

crate::service_node!(
    /// One running gateway.
    GatewayNode,
    "gateway",
    agentmesh_gateway::serve,
    agentmesh_proto::gateway::gateway_service_client::GatewayServiceClient<tonic::transport::Channel>
);

/// Agent nodes, each with its own SQLite database, named `agent-<i>`.
pub struct AgentFleet {
    /// The running nodes (`None` once stopped).
    pub nodes: Vec<Option<AgentNode>>,
    /// Their endpoints, `http://127.0.0.1:<port>`.
    pub endpoints: Vec<String>,
    settings: Vec<Settings>,
    addresses: Vec<std::net::SocketAddr>,
    databases: Vec<TestDatabase>,
}

impl AgentFleet {
    /// Starts `count` agent nodes; `configure` adjusts each node's settings
    /// (given its index).
    pub async fn start(
        count: usize,
        configure: impl Fn(usize, &mut Settings),
    ) -> anyhow::Result<Self> {
        let mut nodes = Vec::with_capacity(count);
        let mut endpoints = Vec::with_capacity(count);
        let mut databases = Vec::with_capacity(count);
        let mut all_settings = Vec::with_capacity(count);
        let mut addresses = Vec::with_capacity(count);
        for index in 0..count {
            let db = TestDatabase::new(Backend::Sqlite)
                .await
                .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))?;
            let mut settings = db.settings.clone();
            // Nothing listens here: the watcher keeps the bootstrap defaults.
            settings.endpoints.config = "http://127.0.0.1:1".to_owned();
            settings.agent_service.node_id = Some(format!("agent-{index}"));
            configure(index, &mut settings);
            let node = AgentNode::start(&settings).await?;
            endpoints.push(format!("http://{}", node.address));
            addresses.push(node.address);
            all_settings.push(settings);
            nodes.push(Some(node));
            databases.push(db);
        }
        Ok(Self {
            nodes,
            endpoints,
            settings: all_settings,
            addresses,
            databases,
        })
    }

    /// Starts stopped node `index` again, on its old address and database.
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        anyhow::ensure!(self.nodes[index].is_none(), "node {index} is running");
        let node = AgentNode::start_at(&self.settings[index], self.addresses[index]).await?;
        self.nodes[index] = Some(node);
        Ok(())
    }

    /// Stops node `index` (its port then refuses connections).
    pub async fn stop(&mut self, index: usize) -> anyhow::Result<()> {
        if let Some(node) = self.nodes.get_mut(index).and_then(Option::take) {
            node.stop().await?;
        }
        Ok(())
    }

    /// Stops every node and drops the databases.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for index in 0..self.nodes.len() {
            self.stop(index).await?;
        }
        for db in self.databases.drain(..) {
            db.cleanup().await;
        }
        Ok(())
    }
}
