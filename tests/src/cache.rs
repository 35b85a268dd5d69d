//! Cache sandbox: cache replicas on ephemeral ports, the machine's Redis
//! (`AGENTMESH_TEST_REDIS_URL`, each test under its own key prefix), and
//! `redis-server` processes a test owns and may kill and restart.

use std::process::Stdio;
use std::time::Duration;

use agentmesh_settings::Settings;
use tokio::process::{Child, Command};

use crate::require_services;

/// The Redis URL for tests, or `None` (test skipped) when it is not
/// configured or not reachable and services are not required.
pub async fn redis_url() -> Option<String> {
    let Ok(url) = std::env::var("AGENTMESH_TEST_REDIS_URL") else {
        assert!(
            !require_services(),
            "AGENTMESH_TEST_REQUIRE_SERVICES=1 but AGENTMESH_TEST_REDIS_URL is not set"
        );
        eprintln!("skipping: AGENTMESH_TEST_REDIS_URL is not set");
        return None;
    };
    match ping(&url).await {
        Ok(()) => Some(url),
        Err(error) => {
            assert!(
                !require_services(),
                "Redis at {url} is unreachable: {error}"
            );
            eprintln!("skipping: Redis at {url} is unreachable: {error}");
            None
        }
    }
}

async fn ping(url: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut connection = tokio::time::timeout(
        Duration::from_secs(3),
        client.get_multiplexed_async_connection(),
    )
    .await??;
    let _: String = redis::cmd("PING").query_async(&mut connection).await?;
    Ok(())
}

/// Settings for a cache replica: `redis_url` (or none: L1-only), a fresh
/// key prefix, no reachable config service, short breaker timings.
pub fn cache_settings(redis_url: Option<&str>) -> Settings {
    let mut settings = Settings {
        redis_url: redis_url.map(str::to_owned),
        ..Settings::default()
    };
    settings.cache.key_prefix = format!("t{}:", uuid::Uuid::new_v4().simple());
    settings.cache.pool_size = 4;
    settings.cache.redis_timeout_ms = 1000;
    settings.cache.breaker_failure_threshold = 3;
    settings.cache.breaker_reset_ms = 200;
    settings.server.shutdown_grace_seconds = 2;
    // Nothing listens there: the default TTL comes from settings.defaults.
    settings.endpoints.config = "http://127.0.0.1:9".to_owned();
    settings
}

/// Removes every Redis key under `prefix` (test cleanup).
pub async fn remove_prefix(url: &str, prefix: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut connection)
            .await?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut connection)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

crate::service_node!(
    /// One running cache service.
    CacheNode,
    "cache",
    agentmesh_cache::serve,
    agentmesh_proto::cache::cache_service_client::CacheServiceClient<tonic::transport::Channel>
);

/// A `redis-server` owned by one test, on a free port, without persistence;
/// killed when dropped.
pub struct RedisProcess {
    /// Its port.
    pub port: u16,
    child: Option<Child>,
}

impl RedisProcess {
    /// Starts `redis-server` on a free port and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?.port()
        };
        let mut process = Self { port, child: None };
        process.restart().await?;
        Ok(process)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts the server again on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| anyhow::anyhow!("cannot start redis-server: {error}"))?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while ping(&self.url()).await.is_err() {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "redis-server on port {} did not answer within 10 s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}
