//! Database connections for agentmesh services: a writer pool and, when
//! `read_database_url` names a replica, a separate read pool; SQLite under
//! the data dir by default, PostgreSQL by URL. Each service brings its own
//! sea-orm-migration `Migrator` (with its own migration table) and applies it
//! through [`Database::migrate`].

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::time::Duration;

use agentmesh_settings::Settings;
use sea_orm::sqlx::sqlite::SqliteJournalMode;
use sea_orm::{
    ConnectOptions, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend,
    SqliteTransactionMode, Statement, TransactionOptions, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;

pub use sea_orm;
pub use sea_orm_migration;

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The data dir for SQLite could not be created.
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        /// The folder.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL, password masked.
        url: String,
        /// The cause.
        source: sea_orm::DbErr,
    },
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(sea_orm::DbErr),
    /// Another database error.
    #[error("database error: {0}")]
    Query(#[from] sea_orm::DbErr),
}

/// The writer and (optional) read pools of one service.
#[derive(Clone, Debug)]
pub struct Database {
    writer: DatabaseConnection,
    reader: Option<DatabaseConnection>,
}

impl Database {
    /// Connects the writer pool (and the read pool when configured),
    /// creating the SQLite data dir or the PostgreSQL schema if needed.
    pub async fn connect(settings: &Settings) -> Result<Self, DbError> {
        let writer_url = settings.effective_database_url();
        if settings.database_url.is_none() {
            std::fs::create_dir_all(&settings.data_dir).map_err(|source| DbError::DataDir {
                path: settings.data_dir.display().to_string(),
                source,
            })?;
        }
        let writer = connect_pool(&writer_url, settings.database.max_connections, settings).await?;
        let reader = match &settings.read_database_url {
            Some(url) => {
                Some(connect_pool(url, settings.database.read_max_connections, settings).await?)
            }
            None => None,
        };
        Ok(Self { writer, reader })
    }

    /// The writer pool: every write and every read that must see it.
    pub fn writer(&self) -> &DatabaseConnection {
        &self.writer
    }

    /// The read pool: the replica when configured, else the writer.
    pub fn reader(&self) -> &DatabaseConnection {
        self.reader.as_ref().unwrap_or(&self.writer)
    }

    /// Begins a transaction that will write. On SQLite it takes the write
    /// lock up front (`BEGIN IMMEDIATE`), so it waits for another writer
    /// (up to the busy timeout) instead of failing with "database is locked"
    /// when a read inside it later upgrades to a write.
    pub async fn begin_write(&self) -> Result<DatabaseTransaction, sea_orm::DbErr> {
        let sqlite_transaction_mode =
            (self.backend() == DbBackend::Sqlite).then_some(SqliteTransactionMode::Immediate);
        self.writer
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode,
                ..TransactionOptions::default()
            })
            .await
    }

    /// The SQL dialect of the writer.
    pub fn backend(&self) -> DbBackend {
        self.writer.get_database_backend()
    }

    /// Applies `M`'s pending migrations on the writer. Concurrent starts of
    /// several replicas may race on the first migration; a failed attempt is
    /// retried after the winner has finished.
    pub async fn migrate<M: MigratorTrait>(&self) -> Result<(), DbError> {
        let mut attempt = 0;
        loop {
            match M::up(&self.writer, None).await {
                Ok(()) => return Ok(()),
                Err(error) if attempt < 3 => {
                    attempt += 1;
                    tracing::debug!(%error, attempt, "migration attempt failed, retrying");
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
                Err(error) => return Err(DbError::Migrate(error)),
            }
        }
    }

    /// Closes both pools.
    pub async fn close(self) {
        let _ = self.writer.close().await;
        if let Some(reader) = self.reader {
            let _ = reader.close().await;
        }
    }
}

async fn connect_pool(
    url: &str,
    max_connections: u32,
    settings: &Settings,
) -> Result<DatabaseConnection, DbError> {
    let masked = agentmesh_settings::bootstrap::mask_url(url);
    let is_postgres = url.starts_with("postgres");
    if let (true, Some(schema)) = (is_postgres, &settings.database.schema) {
        // The schema must exist before a pool can use it as search path.
        let bootstrap = sea_orm::Database::connect(base_options(url, 1, settings))
            .await
            .map_err(|source| DbError::Connect {
                url: masked.clone(),
                source,
            })?;
        let created = bootstrap
            .execute_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
            ))
            .await;
        if let Err(error) = created {
            // Two replicas creating the same schema at once: one loses the
            // race with a unique violation, and the schema exists anyway.
            let text = error.to_string();
            if !text.contains("already exists") && !text.contains("duplicate key") {
                return Err(DbError::Connect {
                    url: masked,
                    source: error,
                });
            }
        }
        let _ = bootstrap.close().await;
    }
    let mut options = base_options(url, max_connections, settings);
    if let (true, Some(schema)) = (is_postgres, &settings.database.schema) {
        options.set_schema_search_path(schema.clone());
    }
    if is_postgres {
        return sea_orm::Database::connect(options)
            .await
            .map_err(|source| DbError::Connect {
                url: masked,
                source,
            });
    }
    options.map_sqlx_sqlite_opts(|sqlite| {
        sqlite
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10))
    });
    // Several services of one `agentmesh up` open the same fresh SQLite
    // file at once. Switching it to WAL needs an exclusive lock, and SQLite
    // answers SQLITE_BUSY at once (no busy wait) when another connection is
    // in the middle of the same switch or a migration: try again until the
    // connect timeout.
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(settings.database.connect_timeout_seconds);
    let mut pause = Duration::from_millis(20);
    loop {
        match sea_orm::Database::connect(options.clone()).await {
            Ok(connection) => return Ok(connection),
            Err(error) if is_sqlite_busy(&error) && tokio::time::Instant::now() < deadline => {
                tracing::debug!(%error, "sqlite busy while connecting, retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(source) => {
                return Err(DbError::Connect {
                    url: masked,
                    source,
                });
            }
        }
    }
}

/// Whether SQLite said "database is locked" (SQLITE_BUSY, code 5).
fn is_sqlite_busy(error: &sea_orm::DbErr) -> bool {
    let text = error.to_string();
    text.contains("database is locked") || text.contains("(code: 5)")
}

fn base_options(url: &str, max_connections: u32, settings: &Settings) -> ConnectOptions {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(max_connections)
        .min_connections(0)
        .connect_timeout(Duration::from_secs(
            settings.database.connect_timeout_seconds,
        ))
        .acquire_timeout(Duration::from_secs(
            settings.database.connect_timeout_seconds,
        ))
        .idle_timeout(Duration::from_secs(300))
        .sqlx_logging(false);
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `agentmesh up` opens one fresh SQLite file from several services at
    /// once; every one of them must get its pool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_connects_to_a_fresh_sqlite_file_all_succeed() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let settings = Settings {
                data_dir: dir.path().to_owned(),
                ..Settings::default()
            };
            let connects: Vec<_> = (0..16)
                .map(|index| {
                    let settings = settings.clone();
                    tokio::spawn(async move {
                        let database = Database::connect(&settings).await?;
                        database
                            .writer()
                            .execute_unprepared(&format!(
                                "CREATE TABLE IF NOT EXISTS t{index} (id INTEGER PRIMARY KEY)"
                            ))
                            .await?;
                        database.close().await;
                        Ok::<_, DbError>(())
                    })
                })
                .collect();
            for connect in connects {
                connect.await.unwrap().unwrap();
            }
        }
    }
}
