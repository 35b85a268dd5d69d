//! One running agent service for end-to-end tests.

use std::net::SocketAddr;
use std::time::Duration;

use agentmesh_proto::agent::agent_service_client::AgentServiceClient;
use agentmesh_runtime::Readiness;
use agentmesh_settings::Settings;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A running agent service.
pub struct AgentNode {
    /// Where it listens.
    pub address: SocketAddr,
    /// Cancel to shut it down gracefully.
    pub shutdown: CancellationToken,
    task: JoinHandle<Result<(), agentmesh_agent::ServeError>>,
}

impl AgentNode {
    /// Starts an agent service on an ephemeral port and waits until ready.
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
                agentmesh_agent::serve(&settings, listener, readiness, shutdown).await
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !readiness.is_ready() {
            if task.is_finished() {
                let outcome = task.await?;
                anyhow::bail!("agent service exited during start-up: {outcome:?}");
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "agent service not ready after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self {
            address,
            shutdown,
            task,
        })
    }

    /// An agent client.
    pub async fn client(&self) -> anyhow::Result<AgentServiceClient<Channel>> {
        let channel = Channel::from_shared(format!("http://{}", self.address))?
            .connect()
            .await?;
        Ok(AgentServiceClient::new(channel))
    }

    /// Shuts down gracefully and returns the serve result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }
}
