//! Schema of the agent service (execution records and artifacts), applied
//! at start-up and by `agentmesh migrate`, with its own migration table.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, blob, boolean, double, integer, string, string_len, text, text_null,
};

/// The agent service's migrations.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateTables)]
    }

    fn migration_table_name() -> DynIden {
        Alias::new("agentmesh_agent_migrations").into_iden()
    }
}

#[derive(DeriveIden)]
enum AgentExecutions {
    Table,
    ExecutionId,
    NodeId,
    AgentType,
    ProjectId,
    WorkflowId,
    CorrelationId,
    TraceId,
    Variables,
    TemplateOverride,
    Model,
    Temperature,
    MaxTokens,
    TimeoutSeconds,
    Messages,
    Output,
    PromptTokens,
    CompletionTokens,
    Provider,
    ProviderModel,
    Offline,
    Status,
    ErrorCode,
    ErrorMessage,
    FinishReason,
    StartedAtMicros,
    LatencyMicros,
    Timings,
    Recorded,
    Streamed,
    ReplayOf,
    ContentSha256,
}

#[derive(DeriveIden)]
enum AgentArtifacts {
    Table,
    ProjectId,
    Name,
    Kind,
    ContentType,
    WorkflowId,
    SourceAgent,
    ExecutionId,
    Content,
    SizeBytes,
    Sha256,
    Version,
    CreatedAtMicros,
    UpdatedAtMicros,
}

struct CreateTables;

impl MigrationName for CreateTables {
    fn name(&self) -> &str {
        "m20261127_000001_create_agent_tables"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AgentExecutions::Table)
                    .if_not_exists()
                    .col(string_len(AgentExecutions::ExecutionId, 128).primary_key())
                    .col(string(AgentExecutions::NodeId))
                    .col(string(AgentExecutions::AgentType))
                    .col(string(AgentExecutions::ProjectId))
                    .col(string(AgentExecutions::WorkflowId))
                    .col(string(AgentExecutions::CorrelationId))
                    .col(string(AgentExecutions::TraceId))
                    .col(text(AgentExecutions::Variables))
                    .col(text_null(AgentExecutions::TemplateOverride))
                    .col(string(AgentExecutions::Model))
                    .col(double(AgentExecutions::Temperature))
                    .col(big_integer(AgentExecutions::MaxTokens))
                    .col(big_integer(AgentExecutions::TimeoutSeconds))
                    .col(text_null(AgentExecutions::Messages))
                    .col(text_null(AgentExecutions::Output))
                    .col(big_integer(AgentExecutions::PromptTokens))
                    .col(big_integer(AgentExecutions::CompletionTokens))
                    .col(string(AgentExecutions::Provider))
                    .col(string(AgentExecutions::ProviderModel))
                    .col(boolean(AgentExecutions::Offline))
                    .col(integer(AgentExecutions::Status))
                    .col(integer(AgentExecutions::ErrorCode))
                    .col(text(AgentExecutions::ErrorMessage))
                    .col(integer(AgentExecutions::FinishReason))
                    .col(big_integer(AgentExecutions::StartedAtMicros))
                    .col(big_integer(AgentExecutions::LatencyMicros))
                    .col(text(AgentExecutions::Timings))
                    .col(boolean(AgentExecutions::Recorded))
                    .col(boolean(AgentExecutions::Streamed))
                    .col(string(AgentExecutions::ReplayOf))
                    .col(text_null(AgentExecutions::ContentSha256))
                    .to_owned(),
            )
            .await?;
        for (name, column) in [
            ("agent_executions_started", AgentExecutions::StartedAtMicros),
            ("agent_executions_project", AgentExecutions::ProjectId),
        ] {
            let mut index = Index::create();
            index
                .if_not_exists()
                .name(name)
                .table(AgentExecutions::Table);
            if !matches!(column, AgentExecutions::StartedAtMicros) {
                index.col(column);
            }
            index
                .col(AgentExecutions::StartedAtMicros)
                .col(AgentExecutions::ExecutionId);
            manager.create_index(index.to_owned()).await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(AgentArtifacts::Table)
                    .if_not_exists()
                    .col(string_len(AgentArtifacts::ProjectId, 128))
                    .col(string_len(AgentArtifacts::Name, 256))
                    .col(integer(AgentArtifacts::Kind))
                    .col(string(AgentArtifacts::ContentType))
                    .col(string(AgentArtifacts::WorkflowId))
                    .col(string(AgentArtifacts::SourceAgent))
                    .col(string(AgentArtifacts::ExecutionId))
                    .col(blob(AgentArtifacts::Content))
                    .col(big_integer(AgentArtifacts::SizeBytes))
                    .col(string(AgentArtifacts::Sha256))
                    .col(big_integer(AgentArtifacts::Version))
                    .col(big_integer(AgentArtifacts::CreatedAtMicros))
                    .col(big_integer(AgentArtifacts::UpdatedAtMicros))
                    .primary_key(
                        Index::create()
                            .col(AgentArtifacts::ProjectId)
                            .col(AgentArtifacts::Name),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("agent_artifacts_updated")
                    .table(AgentArtifacts::Table)
                    .col(AgentArtifacts::UpdatedAtMicros)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(AgentArtifacts::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(AgentExecutions::Table).to_owned())
            .await
    }
}
