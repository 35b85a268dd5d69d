//! Sandbox helpers for the audit service: a running node, and direct SQL
//! access to its tables for tampering tests.

use std::net::SocketAddr;
use std::time::Duration;

use agentmesh_proto::audit::audit_service_client::AuditServiceClient;
use agentmesh_runtime::Readiness;
use agentmesh_settings::Settings;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// One running audit service.
pub struct AuditNode {
    /// Where it listens.
    pub address: SocketAddr,
    /// Cancel to shut it down gracefully.
    pub shutdown: CancellationToken,
    task: JoinHandle<Result<(), agentmesh_audit::ServeError>>,
}

impl AuditNode {
    /// Starts an audit service on an ephemeral port and waits until it is
    /// ready.
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
                agentmesh_audit::serve(&settings, listener, readiness, shutdown).await
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !readiness.is_ready() {
            if task.is_finished() {
                let outcome = task.await?;
                anyhow::bail!("audit service exited during start-up: {outcome:?}");
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "audit service not ready after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self {
            address,
            shutdown,
            task,
        })
    }

    /// An audit client on its own connection.
    pub async fn client(&self) -> anyhow::Result<AuditServiceClient<Channel>> {
        let channel = Channel::from_shared(format!("http://{}", self.address))?
            .connect()
            .await?;
        Ok(AuditServiceClient::new(channel))
    }

    /// Shuts down gracefully and returns the serve result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }
}
