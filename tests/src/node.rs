//! One running service of any kind, started in-process on an ephemeral
//! loopback port, and [`service_node!`](crate::service_node), which gives
//! each service its typed node (`ConfigNode`, `AgentNode`, …) over it.

use std::net::SocketAddr;
use std::time::Duration;

use agentmesh_runtime::Readiness;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A running service.
pub struct ServiceNode {
    /// Where it listens.
    pub address: SocketAddr,
    /// Cancel to shut it down gracefully.
    pub shutdown: CancellationToken,
    /// Readiness as `/readyz` reports it.
    pub readiness: Readiness,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ServiceNode {
    /// Binds 127.0.0.1:0, spawns `serve` on it and waits until the service
    /// reports ready; `what` names it in errors.
    pub async fn start<Serve, Fut, E>(what: &str, serve: Serve) -> anyhow::Result<Self>
    where
        Serve: FnOnce(TcpListener, Readiness, CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(what, listener, serve).await
    }

    /// Like [`ServiceNode::start`], on `address` (to bring a stopped
    /// service back where its clients expect it).
    pub async fn start_at<Serve, Fut, E>(
        what: &str,
        address: SocketAddr,
        serve: Serve,
    ) -> anyhow::Result<Self>
    where
        Serve: FnOnce(TcpListener, Readiness, CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(address).await?;
        Self::start_on(what, listener, serve).await
    }

    async fn start_on<Serve, Fut, E>(
        what: &str,
        listener: TcpListener,
        serve: Serve,
    ) -> anyhow::Result<Self>
    where
        Serve: FnOnce(TcpListener, Readiness, CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let address = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let readiness = Readiness::default();
        let serving = serve(listener, readiness.clone(), shutdown.clone());
        let task = tokio::spawn(async move { serving.await.map_err(anyhow::Error::from) });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !readiness.is_ready() {
            if task.is_finished() {
                let outcome = task.await?;
                anyhow::bail!("{what} service exited during start-up: {outcome:?}");
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{what} service not ready after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self {
            address,
            shutdown,
            readiness,
            task,
        })
    }

    /// `http://address`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A connected channel.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.endpoint())?.connect().await?)
    }

    /// Shuts down gracefully and returns the serve result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// Defines a typed node for one service: `$name::start(&settings)` runs
/// `$serve(&settings, listener, readiness, shutdown)`, `client()` returns a
/// connected `$client`, and the node derefs to [`ServiceNode`].
#[macro_export]
macro_rules! service_node {
    ($(#[$doc:meta])* $name:ident, $what:literal, $serve:path, $client:ty) => {
        $(#[$doc])*
        pub struct $name($crate::node::ServiceNode);

        impl std::ops::Deref for $name {
            type Target = $crate::node::ServiceNode;

            fn deref(&self) -> &Self::Target {
                &self.0
            }
        }

        impl $name {
            /// Starts the service on an ephemeral port and waits until ready.
            pub async fn start(settings: &agentmesh_settings::Settings) -> anyhow::Result<Self> {
                let settings = settings.clone();
                let node = $crate::node::ServiceNode::start($what, move |listener, readiness, shutdown| async move {
                    $serve(&settings, listener, readiness, shutdown).await
                })
                .await?;
                Ok(Self(node))
            }

            /// Starts the service on `address` (where a stopped one ran)
            /// and waits until ready.
            pub async fn start_at(
                settings: &agentmesh_settings::Settings,
                address: std::net::SocketAddr,
            ) -> anyhow::Result<Self> {
                let settings = settings.clone();
                let node = $crate::node::ServiceNode::start_at($what, address, move |listener, readiness, shutdown| async move {
                    $serve(&settings, listener, readiness, shutdown).await
                })
                .await?;
                Ok(Self(node))
            }

            /// A connected client.
            pub async fn client(&self) -> anyhow::Result<$client> {
                Ok(<$client>::new(self.channel().await?))
            }

            /// Shuts down gracefully and returns the serve result.
            pub async fn stop(self) -> anyhow::Result<()> {
                self.0.stop().await
            }
        }
    };
}
