//! Schema of the config service, applied at start-up and by
//! `agentmesh migrate`. Its own migration table keeps it independent of the
//! other services' migrations in a shared database.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_integer_null, big_pk_auto, integer, string, text,
};

/// The config service's migrations.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateRevisions)]
    }

    fn migration_table_name() -> DynIden {
        Alias::new("agentmesh_config_migrations").into_iden()
    }
}

#[derive(DeriveIden)]
enum ConfigRevisions {
    Table,
    Revision,
    Scope,
    Settings,
    ChangedFields,
    Kind,
    RollbackOf,
    Author,
    Reason,
    CreatedAtMicros,
}

struct CreateRevisions;

impl MigrationName for CreateRevisions {
    fn name(&self) -> &str {
        "m20261126_000001_create_config_revisions"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateRevisions {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ConfigRevisions::Table)
                    .if_not_exists()
                    .col(big_pk_auto(ConfigRevisions::Revision))
                    .col(string(ConfigRevisions::Scope))
                    .col(text(ConfigRevisions::Settings))
                    .col(text(ConfigRevisions::ChangedFields))
                    .col(integer(ConfigRevisions::Kind))
                    .col(big_integer_null(ConfigRevisions::RollbackOf))
                    .col(string(ConfigRevisions::Author))
                    .col(text(ConfigRevisions::Reason))
                    .col(big_integer(ConfigRevisions::CreatedAtMicros))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("config_revisions_scope_revision")
                    .table(ConfigRevisions::Table)
                    .col(ConfigRevisions::Scope)
                    .col(ConfigRevisions::Revision)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ConfigRevisions::Table).to_owned())
            .await
    }
}
