//! Schema of the gateway, applied at start-up and by `agentmesh migrate`.
//! Its own migration table keeps it independent of the other services'
//! migrations in a shared database.

use sea_orm_migration::prelude::*;

mod m20261127_000001_api_keys;
mod m20261127_000002_workflows;

/// The gateway's migrations.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261127_000001_api_keys::Migration),
            Box::new(m20261127_000002_workflows::Migration),
        ]
    }

    fn migration_table_name() -> DynIden {
        Alias::new("agentmesh_gateway_migrations").into_iden()
    }
}
