//! Persistence of API keys: the `gateway_api_keys` table (see
//! [`crate::migration`]) and the in-memory [`KeyRecord`] it loads into.

use std::collections::BTreeSet;

use agentmesh_db::Database;
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::Expr;
use sea_orm::{QueryOrder, QuerySelect};

use crate::auth::key::Digest;
use crate::auth::{Projects, Role};
use crate::error::GatewayError;

/// The `gateway_api_keys` entity.
pub mod api_key {
    use sea_orm::entity::prelude::*;

    /// One key.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "gateway_api_keys")]
    pub struct Model {
        /// Public id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub key_id: String,
        /// Name.
        pub name: String,
        /// `user` or `admin`.
        pub role: String,
        /// JSON array of project ids, `["*"]` for every project.
        #[sea_orm(column_type = "Text")]
        pub projects: String,
        /// Hex HMAC-SHA256 of the whole key.
        pub secret_hash: String,
        /// Key id of the creator.
        pub created_by: String,
        /// Creation time, microseconds since the epoch.
        pub created_at_micros: i64,
        /// Revocation time, microseconds since the epoch.
        pub revoked_at_micros: Option<i64>,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A key as the gateway holds it in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public id.
    pub key_id: String,
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Projects it may use.
    pub projects: Projects,
    /// HMAC-SHA256 of the whole key.
    pub secret_hash: Digest,
    /// Key id of the creator.
    pub created_by: String,
    /// Creation time, microseconds since the epoch.
    pub created_at_micros: i64,
    /// Revocation time, microseconds since the epoch.
    pub revoked_at_micros: Option<i64>,
}

impl KeyRecord {
    fn to_model(&self) -> api_key::Model {
        let projects = match &self.projects {
            Projects::All => vec!["*".to_owned()],
            Projects::Only(projects) => projects.iter().cloned().collect(),
        };
        api_key::Model {
            key_id: self.key_id.clone(),
            name: self.name.clone(),
            role: self.role.as_str().to_owned(),
            projects: serde_json::Value::from(projects).to_string(),
            secret_hash: hex::encode(self.secret_hash),
            created_by: self.created_by.clone(),
            created_at_micros: self.created_at_micros,
            revoked_at_micros: self.revoked_at_micros,
        }
    }

    /// Reads a row; `None` (with a warning) for a row this version cannot
    /// read, which then authenticates nobody.
    fn from_model(row: api_key::Model) -> Option<Self> {
        let role = match row.role.as_str() {
            "user" => Role::User,
            "admin" => Role::Admin,
            other => {
                tracing::warn!(
                    key_id = row.key_id,
                    role = other,
                    "api key row with an unknown role ignored"
                );
                return None;
            }
        };
        let projects: Vec<String> = match serde_json::from_str(&row.projects) {
            Ok(projects) => projects,
            Err(error) => {
                tracing::warn!(key_id = row.key_id, %error, "api key row with unreadable projects ignored");
                return None;
            }
        };
        let projects = if projects.iter().any(|project| project == "*") {
            Projects::All
        } else {
            Projects::Only(projects.into_iter().collect::<BTreeSet<_>>())
        };
        let mut secret_hash = [0_u8; 32];
        if hex::decode_to_slice(&row.secret_hash, &mut secret_hash).is_err() {
            tracing::warn!(
                key_id = row.key_id,
                "api key row with an unreadable hash ignored"
            );
            return None;
        }
        Some(Self {
            key_id: row.key_id,
            name: row.name,
            role,
            projects,
            secret_hash,
            created_by: row.created_by,
            created_at_micros: row.created_at_micros,
            revoked_at_micros: row.revoked_at_micros,
        })
    }
}

/// The keys table.
#[derive(Clone, Debug)]
pub struct KeyStore {
    database: Database,
}

impl KeyStore {
    /// The store over `database` (migrated).
    pub fn new(database: Database) -> Self {
        Self { database }
    }

    /// Every key (the keyring's reload; keys are few and rows small).
    pub async fn all(&self) -> Result<Vec<KeyRecord>, GatewayError> {
        let rows = api_key::Entity::find().all(self.database.writer()).await?;
        Ok(rows.into_iter().filter_map(KeyRecord::from_model).collect())
    }

    /// Stores a new key.
    pub async fn insert(&self, record: &KeyRecord) -> Result<(), GatewayError> {
        let active: api_key::ActiveModel = record.to_model().into();
        api_key::Entity::insert(active)
            .exec_without_returning(self.database.writer())
            .await?;
        Ok(())
    }

    /// Marks a key revoked at `at_micros` unless it already is, and returns
    /// it as stored; `None` when no key has this id.
    pub async fn revoke(
        &self,
        key_id: &str,
        at_micros: i64,
    ) -> Result<Option<KeyRecord>, GatewayError> {
        api_key::Entity::update_many()
            .col_expr(api_key::Column::RevokedAtMicros, Expr::value(at_micros))
            .filter(api_key::Column::KeyId.eq(key_id))
            .filter(api_key::Column::RevokedAtMicros.is_null())
            .exec(self.database.writer())
            .await?;
        Ok(api_key::Entity::find_by_id(key_id.to_owned())
            .one(self.database.writer())
            .await?
            .and_then(KeyRecord::from_model))
    }

    /// Up to `limit` keys with ids after `after`, by id.
    pub async fn page(
        &self,
        after: &str,
        include_revoked: bool,
        limit: u64,
    ) -> Result<Vec<KeyRecord>, GatewayError> {
        let mut query = api_key::Entity::find()
            .filter(api_key::Column::KeyId.gt(after))
            .order_by_asc(api_key::Column::KeyId)
            .limit(limit);
        if !include_revoked {
            query = query.filter(api_key::Column::RevokedAtMicros.is_null());
        }
        let rows = query.all(self.database.reader()).await?;
        Ok(rows.into_iter().filter_map(KeyRecord::from_model).collect())
    }
}
