//! The test sandbox: starts agentmesh services in-process on ephemeral
//! loopback ports against SQLite (always) or PostgreSQL (when
//! `AGENTMESH_TEST_DATABASE_URL` is set; each sandbox in its own schema),
//! hands out generated tonic clients, and stops them at the end.
//!
//! With `AGENTMESH_TEST_REQUIRE_SERVICES=1` a missing or unreachable
//! PostgreSQL fails the test instead of skipping it.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod agent_node;
pub mod audit;
pub mod cache;
pub mod gateway_node;
pub mod llm_server;
pub mod node;
pub mod tls;

use agentmesh_settings::Settings;
use sea_orm::{ConnectionTrait, DbBackend, Statement};

/// Which database a sandbox uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in a temporary data dir.
    Sqlite,
    /// PostgreSQL from `AGENTMESH_TEST_DATABASE_URL`, in a fresh schema.
    Postgres,
}

/// Installs, once per test process, the telemetry the binary installs
/// (logs plus the OpenTelemetry layer, exporting nothing), so spans carry
/// W3C trace ids as in production: tests that check trace ids call it.
pub fn install_tracing() {
    static GUARD: std::sync::OnceLock<Option<agentmesh_telemetry::TelemetryGuard>> =
        std::sync::OnceLock::new();
    GUARD.get_or_init(|| {
        agentmesh_telemetry::init("agentmesh-tests", agentmesh_settings::LogFormat::Pretty).ok()
    });
}

pub(crate) fn require_services() -> bool {
    std::env::var("AGENTMESH_TEST_REQUIRE_SERVICES").is_ok_and(|value| value == "1")
}

/// The PostgreSQL URL for tests, or `None` (test skipped) when it is not
/// configured or not reachable and services are not required.
pub async fn postgres_url() -> Option<String> {
    let Ok(url) = std::env::var("AGENTMESH_TEST_DATABASE_URL") else {
        assert!(
            !require_services(),
            "AGENTMESH_TEST_REQUIRE_SERVICES=1 but AGENTMESH_TEST_DATABASE_URL is not set"
        );
        eprintln!("skipping: AGENTMESH_TEST_DATABASE_URL is not set");
        return None;
    };
    match sea_orm::Database::connect(url.as_str()).await {
        Ok(connection) => {
            let _ = connection.close().await;
            Some(url)
        }
        Err(error) => {
            assert!(
                !require_services(),
                "PostgreSQL at {url} is unreachable: {error}"
            );
            eprintln!("skipping: PostgreSQL at {url} is unreachable: {error}");
            None
        }
    }
}

/// The database of one sandbox: settings pointing at it, and cleanup.
pub struct TestDatabase {
    /// Settings with `data_dir` / `database_url` / `database.schema` set.
    pub settings: Settings,
    _data_dir: tempfile::TempDir,
    postgres: Option<(String, String)>,
}

impl TestDatabase {
    /// A fresh database for `backend`; `None` when PostgreSQL is skipped.
    pub async fn new(backend: Backend) -> Option<Self> {
        let data_dir = tempfile::tempdir().ok()?;
        let mut settings = Settings {
            data_dir: data_dir.path().to_path_buf(),
            ..Settings::default()
        };
        // PostgreSQL allows 100 connections for everything on the machine.
        settings.database.max_connections = 3;
        settings.database.read_max_connections = 2;
        settings.config_service.poll_interval_ms = 50;
        settings.server.shutdown_grace_seconds = 5;
        let postgres = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let url = postgres_url().await?;
                let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
                settings.database_url = Some(url.clone());
                // The same database as "replica", so the read-pool path runs.
                settings.read_database_url = Some(url.clone());
                settings.database.schema = Some(schema.clone());
                Some((url, schema))
            }
        };
        Some(Self {
            settings,
            _data_dir: data_dir,
            postgres,
        })
    }

    /// Drops the PostgreSQL schema (SQLite files go with the temp dir).
    pub async fn cleanup(self) {
        if let Some((url, schema)) = &self.postgres
            && let Ok(connection) = sea_orm::Database::connect(url.as_str()).await
        {
            let _ = connection
                .execute_raw(Statement::from_string(
                    DbBackend::Postgres,
                    format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"),
                ))
                .await;
            let _ = connection.close().await;
        }
    }
}

crate::service_node!(
    /// One running config service.
    ConfigNode,
    "config",
    agentmesh_config::serve,
    agentmesh_proto::config::config_service_client::ConfigServiceClient<tonic::transport::Channel>
);

/// Defines `<name>_sqlite` and `<name>_postgres` tests running
/// `async fn <name>(db: &TestDatabase) -> anyhow::Result<()>`, dropping the
/// PostgreSQL schema afterwards whatever the outcome.
#[macro_export]
macro_rules! on_every_backend {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() -> anyhow::Result<()> {
                let db = $crate::TestDatabase::new($crate::Backend::Sqlite)
                    .await
                    .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))?;
                let result = super::$name(&db).await;
                db.cleanup().await;
                result
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() -> anyhow::Result<()> {
                let Some(db) = $crate::TestDatabase::new($crate::Backend::Postgres).await else {
                    return Ok(());
                };
                let result = super::$name(&db).await;
                db.cleanup().await;
                result
            }
        }
    };
}
