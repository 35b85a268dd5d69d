//! Schema of the audit service, applied at start-up and by
//! `agentmesh migrate`. Its own migration table keeps it independent of the
//! other services' migrations in a shared database.
//!
//! - `audit_entries`: one row per entry, keyed by its gapless `sequence`
//!   (assigned by the writer, never by the database), `event_id` unique so
//!   a retried append can never store a second copy; hashes as lowercase
//!   hex; indexes for each Query filter, each ending in `sequence` so a
//!   filtered page is an index range scan in either order.
//! - `audit_head`: a single row (`id = 1`) holding the last sequence and
//!   its entry hash. Every append transaction locks it first (`FOR UPDATE`
//!   on PostgreSQL; SQLite's `BEGIN IMMEDIATE` locks the whole database),
//!   so several processes sharing a database extend one chain.
//! - `audit_checkpoints`: signed statements of the chain head.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, integer, string, text};

/// The audit service's migrations.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateAuditTables)]
    }

    fn migration_table_name() -> DynIden {
        Alias::new("agentmesh_audit_migrations").into_iden()
    }
}

#[derive(DeriveIden)]
enum AuditEntries {
    Table,
    Sequence,
    EventId,
    OccurredAtSeconds,
    OccurredAtNanos,
    RecordedAtSeconds,
    RecordedAtNanos,
    AgentType,
    Action,
    UserId,
    ProjectId,
    WorkflowId,
    TraceId,
    Outcome,
    Context,
    ContextHash,
    PrevHash,
    EntryHash,
}

#[derive(DeriveIden)]
enum AuditHead {
    Table,
    Id,
    Sequence,
    EntryHash,
}

#[derive(DeriveIden)]
enum AuditCheckpoints {
    Table,
    Sequence,
    EntryHash,
    SignedAtSeconds,
    SignedAtNanos,
    Signature,
    PublicKey,
    KeyId,
}

struct CreateAuditTables;

impl MigrationName for CreateAuditTables {
    fn name(&self) -> &str {
        "m20261127_000001_create_audit_tables"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateAuditTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuditEntries::Table)
                    .if_not_exists()
                    .col(big_integer(AuditEntries::Sequence).primary_key())
                    .col(string(AuditEntries::EventId).unique_key())
                    .col(big_integer(AuditEntries::OccurredAtSeconds))
                    .col(integer(AuditEntries::OccurredAtNanos))
                    .col(big_integer(AuditEntries::RecordedAtSeconds))
                    .col(integer(AuditEntries::RecordedAtNanos))
                    .col(string(AuditEntries::AgentType))
                    .col(string(AuditEntries::Action))
                    .col(string(AuditEntries::UserId))
                    .col(string(AuditEntries::ProjectId))
                    .col(string(AuditEntries::WorkflowId))
                    .col(string(AuditEntries::TraceId))
                    .col(integer(AuditEntries::Outcome))
                    .col(text(AuditEntries::Context))
                    .col(string(AuditEntries::ContextHash))
                    .col(string(AuditEntries::PrevHash))
                    .col(string(AuditEntries::EntryHash))
                    .to_owned(),
            )
            .await?;
        let filtered_columns = [
            ("audit_entries_occurred_at", AuditEntries::OccurredAtSeconds),
            ("audit_entries_agent_type", AuditEntries::AgentType),
            ("audit_entries_action", AuditEntries::Action),
            ("audit_entries_user_id", AuditEntries::UserId),
            ("audit_entries_project_id", AuditEntries::ProjectId),
            ("audit_entries_workflow_id", AuditEntries::WorkflowId),
            ("audit_entries_trace_id", AuditEntries::TraceId),
        ];
        for (name, column) in filtered_columns {
            manager
                .create_index(
                    Index::create()
                        .if_not_exists()
                        .name(name)
                        .table(AuditEntries::Table)
                        .col(column)
                        .col(AuditEntries::Sequence)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(AuditHead::Table)
                    .if_not_exists()
                    .col(integer(AuditHead::Id).primary_key())
                    .col(big_integer(AuditHead::Sequence))
                    .col(string(AuditHead::EntryHash))
                    .to_owned(),
            )
            .await?;
        let mut genesis = Query::insert();
        genesis
            .into_table(AuditHead::Table)
            .columns([AuditHead::Id, AuditHead::Sequence, AuditHead::EntryHash])
            .values([1.into(), 0i64.into(), "0".repeat(64).into()])
            .map_err(|error| DbErr::Custom(error.to_string()))?
            .on_conflict(OnConflict::column(AuditHead::Id).do_nothing().to_owned());
        manager.exec_stmt(genesis).await?;
        manager
            .create_table(
                Table::create()
                    .table(AuditCheckpoints::Table)
                    .if_not_exists()
                    .col(big_integer(AuditCheckpoints::Sequence).primary_key())
                    .col(string(AuditCheckpoints::EntryHash))
                    .col(big_integer(AuditCheckpoints::SignedAtSeconds))
                    .col(integer(AuditCheckpoints::SignedAtNanos))
                    .col(string(AuditCheckpoints::Signature))
                    .col(string(AuditCheckpoints::PublicKey))
                    .col(string(AuditCheckpoints::KeyId))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            AuditCheckpoints::Table.into_iden(),
            AuditHead::Table.into_iden(),
            AuditEntries::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
