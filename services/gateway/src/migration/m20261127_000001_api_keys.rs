//! API keys and per-project token usage.
//!
//! - `gateway_api_keys`: one row per key, keyed by its public id; the
//!   secret only as `secret_hash` (hex HMAC-SHA256 of the whole key under
//!   the gateway's hash secret); `projects` a JSON array (`["*"]` for every
//!   project); times in microseconds since the epoch, `revoked_at_micros`
//!   NULL while the key is valid. Keys are never deleted, so replicas
//!   reloading them only ever see keys appear and get revoked.
//! - `gateway_token_usage`: tokens per project and period (`d:2026-11-27`,
//!   `m:2026-11`), incremented by an atomic upsert from every gateway when
//!   no Redis is configured.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, big_integer_null, string, text};

#[derive(DeriveIden)]
enum GatewayApiKeys {
    Table,
    KeyId,
    Name,
    Role,
    Projects,
    SecretHash,
    CreatedBy,
    CreatedAtMicros,
    RevokedAtMicros,
}

#[derive(DeriveIden)]
enum GatewayTokenUsage {
    Table,
    ProjectId,
    Period,
    Tokens,
    UpdatedAtMicros,
}

/// Creates `gateway_api_keys` and `gateway_token_usage`.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000001_api_keys"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(GatewayApiKeys::Table)
                    .if_not_exists()
                    .col(string(GatewayApiKeys::KeyId).primary_key())
                    .col(string(GatewayApiKeys::Name))
                    .col(string(GatewayApiKeys::Role))
                    .col(text(GatewayApiKeys::Projects))
                    .col(string(GatewayApiKeys::SecretHash))
                    .col(string(GatewayApiKeys::CreatedBy))
                    .col(big_integer(GatewayApiKeys::CreatedAtMicros))
                    .col(big_integer_null(GatewayApiKeys::RevokedAtMicros))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(GatewayTokenUsage::Table)
                    .if_not_exists()
                    .col(string(GatewayTokenUsage::ProjectId))
                    .col(string(GatewayTokenUsage::Period))
                    .col(big_integer(GatewayTokenUsage::Tokens))
                    .col(big_integer(GatewayTokenUsage::UpdatedAtMicros))
                    .primary_key(
                        Index::create()
                            .col(GatewayTokenUsage::ProjectId)
                            .col(GatewayTokenUsage::Period),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("gateway_token_usage_updated_at")
                    .table(GatewayTokenUsage::Table)
                    .col(GatewayTokenUsage::UpdatedAtMicros)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            GatewayTokenUsage::Table.into_iden(),
            GatewayApiKeys::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
