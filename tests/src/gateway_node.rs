//! One running gateway, and a small fleet of agent nodes behind it, for
//! end-to-end tests.

use std::net::SocketAddr;
use std::time::Duration;

use agentmesh_proto::gateway::gateway_service_client::GatewayServiceClient;
use agentmesh_runtime::Readiness;
use agentmesh_settings::Settings;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::agent_node::AgentNode;
use crate::{Backend, TestDatabase};

/// A running gateway.
pub struct GatewayNode {
    /// Where it listens.
    pub address: SocketAddr,
    /// Cancel to shut it down gracefully.
    pub shutdown: CancellationToken,
    task: JoinHandle<Result<(), agentmesh_gateway::ServeError>>,
}

impl GatewayNode {
    /// Starts a gateway on an ephemeral port and waits until ready.
    pub async fn start(settings: &Settings) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let readiness = Readiness::default();
        let task = {
            let settings = settings.clone();
            let readiness = readiness.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                agentmesh_gateway::serve(&settings, listener, readiness, shutdown).await
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !readiness.is_ready() {
            if task.is_finished() {
                let outcome = task.await?;
                anyhow::bail!("gateway exited during start-up: {outcome:?}");
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "gateway not ready after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self {
            address,
            shutdown,
            task,
        })
    }

    /// A gateway client.
    pub async fn client(&self) -> anyhow::Result<GatewayServiceClient<Channel>> {
        let channel = Channel::from_shared(format!("http://{}", self.address))?
            .connect()
            .await?;
        Ok(GatewayServiceClient::new(channel))
    }

    /// Shuts down gracefully and returns the serve result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }
}

/// Agent nodes, each with its own SQLite database, named `agent-<i>`.
pub struct AgentFleet {
    /// The running nodes (`None` once stopped).
    pub nodes: Vec<Option<AgentNode>>,
    /// Their endpoints, `http://127.0.0.1:<port>`.
    pub endpoints: Vec<String>,
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
            nodes.push(Some(node));
            databases.push(db);
        }
        Ok(Self {
            nodes,
            endpoints,
            databases,
        })
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
