//! Persistence: the append-only `config_revisions` table. Each row holds a
//! scope's complete values after one change, so reading a scope is reading
//! its newest row, and a rollback copies an old row's values.

use agentmesh_db::Database;
use agentmesh_settings::Scope;
use agentmesh_settings::live::Values;
use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::*;
use sea_orm::{
    ActiveValue, ConnectionTrait, DatabaseTransaction, DbBackend, QueryOrder, QuerySelect,
    Statement,
};

use crate::error::ConfigError;

/// The `config_revisions` entity.
pub mod revision {
    use sea_orm::entity::prelude::*;

    /// One row: a scope's complete values after one change.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "config_revisions")]
    pub struct Model {
        /// Revision number (auto-increment, monotonic).
        #[sea_orm(primary_key)]
        pub revision: i64,
        /// Scope name.
        pub scope: String,
        /// The scope's values as a JSON object keyed by field path.
        #[sea_orm(column_type = "Text")]
        pub settings: String,
        /// JSON array of changed field paths.
        #[sea_orm(column_type = "Text")]
        pub changed_fields: String,
        /// [`super::ChangeKind`] as a number.
        pub kind: i32,
        /// Restored revision, for rollbacks.
        pub rollback_of: Option<i64>,
        /// Who wrote it.
        pub author: String,
        /// Why.
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        /// Commit time in microseconds since the Unix epoch.
        pub created_at_micros: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// How a revision came to be (stored as its wire number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// First-start seed.
    Seed = 1,
    /// An Update.
    Update = 2,
    /// A Rollback.
    Rollback = 3,
}

impl ChangeKind {
    fn from_stored(value: i32) -> Self {
        match value {
            1 => ChangeKind::Seed,
            3 => ChangeKind::Rollback,
            _ => ChangeKind::Update,
        }
    }
}

/// One revision, decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct RevisionRecord {
    /// Revision number.
    pub revision: u64,
    /// The scope changed.
    pub scope: Scope,
    /// The scope's complete values after the change.
    pub values: Values,
    /// Field paths changed.
    pub changed_fields: Vec<String>,
    /// How it was written.
    pub kind: ChangeKind,
    /// Restored revision, for rollbacks.
    pub rollback_of: Option<u64>,
    /// Who wrote it.
    pub author: String,
    /// Why.
    pub reason: String,
    /// Commit time.
    pub created_at: DateTime<Utc>,
}

/// A revision to insert.
pub struct NewRevision<'a> {
    /// The scope.
    pub scope: &'a Scope,
    /// The scope's complete values after the change.
    pub values: &'a Values,
    /// Field paths changed.
    pub changed_fields: &'a [String],
    /// How it is written.
    pub kind: ChangeKind,
    /// Restored revision, for rollbacks.
    pub rollback_of: Option<u64>,
    /// Who writes it.
    pub author: &'a str,
    /// Why.
    pub reason: &'a str,
}

fn decode(model: revision::Model) -> Result<RevisionRecord, ConfigError> {
    let scope = Scope::parse(&model.scope).map_err(|_| {
        ConfigError::Corrupt(format!(
            "revision {} has scope {:?}",
            model.revision, model.scope
        ))
    })?;
    let settings_json: serde_json::Value =
        serde_json::from_str(&model.settings).map_err(|error| {
            ConfigError::Corrupt(format!("revision {} settings: {error}", model.revision))
        })?;
    let changed_fields: Vec<String> =
        serde_json::from_str(&model.changed_fields).map_err(|error| {
            ConfigError::Corrupt(format!(
                "revision {} changed fields: {error}",
                model.revision
            ))
        })?;
    Ok(RevisionRecord {
        revision: model.revision as u64,
        scope,
        values: Values::from_json(&settings_json),
        changed_fields,
        kind: ChangeKind::from_stored(model.kind),
        rollback_of: model.rollback_of.map(|revision| revision as u64),
        author: model.author,
        reason: model.reason,
        created_at: DateTime::from_timestamp_micros(model.created_at_micros).unwrap_or_default(),
    })
}

/// Key of the PostgreSQL advisory lock that serialises config writes across
/// replicas, so revisions commit in number order and CAS checks are exact.
const WRITE_LOCK_KEY: i64 = 0x6167_6d63_6667; // "agmcfg"

/// Queries over `config_revisions`.
#[derive(Clone, Debug)]
pub struct Store {
    database: Database,
}

impl Store {
    /// Wraps a connected, migrated database.
    pub fn new(database: Database) -> Self {
        Self { database }
    }

    /// Begins a write transaction holding the cross-replica write lock.
    pub async fn begin_write(&self) -> Result<DatabaseTransaction, ConfigError> {
        let transaction = self.database.begin_write().await?;
        if self.database.backend() == DbBackend::Postgres {
            transaction
                .execute_raw(Statement::from_string(
                    DbBackend::Postgres,
                    format!("SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})"),
                ))
                .await?;
        }
        Ok(transaction)
    }

    /// The newest revision of `scope`, read inside a write transaction.
    pub async fn latest_of_scope(
        &self,
        transaction: &DatabaseTransaction,
        scope: &Scope,
    ) -> Result<Option<RevisionRecord>, ConfigError> {
        revision::Entity::find()
            .filter(revision::Column::Scope.eq(scope.to_string()))
            .order_by_desc(revision::Column::Revision)
            .one(transaction)
            .await?
            .map(decode)
            .transpose()
    }

    /// Returns true if no revision exists yet.
    pub async fn is_empty(&self, transaction: &DatabaseTransaction) -> Result<bool, ConfigError> {
        Ok(revision::Entity::find().one(transaction).await?.is_none())
    }

    /// Inserts a revision and returns its number.
    pub async fn insert(
        &self,
        transaction: &DatabaseTransaction,
        new: NewRevision<'_>,
    ) -> Result<u64, ConfigError> {
        let changed = serde_json::to_string(new.changed_fields).map_err(|error| {
            ConfigError::Corrupt(format!("cannot encode changed fields: {error}"))
        })?;
        let model = revision::ActiveModel {
            revision: ActiveValue::NotSet,
            scope: ActiveValue::Set(new.scope.to_string()),
            settings: ActiveValue::Set(new.values.to_json().to_string()),
            changed_fields: ActiveValue::Set(changed),
            kind: ActiveValue::Set(new.kind as i32),
            rollback_of: ActiveValue::Set(new.rollback_of.map(|revision| revision as i64)),
            author: ActiveValue::Set(new.author.to_owned()),
            reason: ActiveValue::Set(new.reason.to_owned()),
            created_at_micros: ActiveValue::Set(Utc::now().timestamp_micros()),
        };
        let inserted = revision::Entity::insert(model).exec(transaction).await?;
        Ok(inserted.last_insert_id as u64)
    }

    /// Revisions after `after`, oldest first, at most `limit` (writer pool:
    /// the change feed must see the newest commits).
    pub async fn revisions_after(
        &self,
        after: u64,
        limit: u64,
    ) -> Result<Vec<RevisionRecord>, ConfigError> {
        revision::Entity::find()
            .filter(revision::Column::Revision.gt(after as i64))
            .order_by_asc(revision::Column::Revision)
            .limit(limit)
            .all(self.database.writer())
            .await?
            .into_iter()
            .map(decode)
            .collect()
    }

    /// The newest revision number (0 when empty), a primary-key probe.
    pub async fn head(&self) -> Result<u64, ConfigError> {
        let newest = revision::Entity::find()
            .order_by_desc(revision::Column::Revision)
            .limit(1)
            .one(self.database.writer())
            .await?;
        Ok(newest.map_or(0, |model| model.revision as u64))
    }

    /// One revision by number.
    pub async fn get(&self, revision_number: u64) -> Result<Option<RevisionRecord>, ConfigError> {
        revision::Entity::find_by_id(revision_number as i64)
            .one(self.database.writer())
            .await?
            .map(decode)
            .transpose()
    }

    /// A page of history, newest first, before revision `before` (exclusive),
    /// optionally for one scope; served by the read pool.
    pub async fn history(
        &self,
        scope: Option<&Scope>,
        before: Option<u64>,
        limit: u64,
    ) -> Result<Vec<RevisionRecord>, ConfigError> {
        let mut query = revision::Entity::find();
        if let Some(scope) = scope {
            query = query.filter(revision::Column::Scope.eq(scope.to_string()));
        }
        if let Some(before) = before {
            query = query.filter(revision::Column::Revision.lt(before as i64));
        }
        query
            .order_by_desc(revision::Column::Revision)
            .limit(limit)
            .all(self.database.reader())
            .await?
            .into_iter()
            .map(decode)
            .collect()
    }
}
