//! Workflow runs, their steps, artifacts and events, and per-project
//! emergency stops.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_integer_null, boolean, integer, string, string_len, string_len_null, text,
    text_null,
};

/// Creates the workflow tables.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000002_workflows"
    }
}

#[derive(DeriveIden)]
enum GatewayWorkflowRuns {
    Table,
    RunId,
    WorkflowId,
    ProjectId,
    Definition,
    Spec,
    Inputs,
    State,
    CorrelationId,
    TraceId,
    RootSpanId,
    IdempotencyKey,
    RequestSha256,
    CachePolicy,
    StartedBy,
    Error,
    CreatedAtMicros,
    UpdatedAtMicros,
    CompletedAtMicros,
    Owner,
    LeaseUntilMicros,
    CancelRequested,
    CancelActor,
    CancelReason,
    LastEvent,
}

#[derive(DeriveIden)]
enum GatewayWorkflowSteps {
    Table,
    RunId,
    Name,
    Position,
    AgentType,
    State,
    Gate,
    StartApproved,
    Runs,
    Revisions,
    Output,
    ExecutionId,
    NodeId,
    PromptTokens,
    CompletionTokens,
    Provider,
    Model,
    Offline,
    Degraded,
    DegradedReason,
    CacheHit,
    AgentCalls,
    ErrorCode,
    ErrorMessage,
    StartedAtMicros,
    CompletedAtMicros,
}

#[derive(DeriveIden)]
enum GatewayWorkflowArtifacts {
    Table,
    RunId,
    Name,
    Kind,
    Step,
    Content,
    Version,
    UpdatedAtMicros,
}

#[derive(DeriveIden)]
enum GatewayWorkflowEvents {
    Table,
    RunId,
    Sequence,
    Kind,
    Step,
    StepState,
    RunState,
    Message,
    Actor,
    OccurredAtMicros,
}

#[derive(DeriveIden)]
enum GatewayProjectStops {
    Table,
    ProjectId,
    Reason,
    StoppedBy,
    StoppedAtMicros,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(GatewayWorkflowRuns::Table)
                    .if_not_exists()
                    .col(string_len(GatewayWorkflowRuns::RunId, 128).primary_key())
                    .col(string_len(GatewayWorkflowRuns::WorkflowId, 128))
                    .col(string_len(GatewayWorkflowRuns::ProjectId, 128))
                    .col(string(GatewayWorkflowRuns::Definition))
                    .col(text(GatewayWorkflowRuns::Spec))
                    .col(text(GatewayWorkflowRuns::Inputs))
                    .col(integer(GatewayWorkflowRuns::State))
                    .col(string(GatewayWorkflowRuns::CorrelationId))
                    .col(string(GatewayWorkflowRuns::TraceId))
                    .col(string(GatewayWorkflowRuns::RootSpanId))
                    .col(string_len_null(GatewayWorkflowRuns::IdempotencyKey, 128))
                    .col(string(GatewayWorkflowRuns::RequestSha256))
                    .col(integer(GatewayWorkflowRuns::CachePolicy))
                    .col(string(GatewayWorkflowRuns::StartedBy))
                    .col(text(GatewayWorkflowRuns::Error))
                    .col(big_integer(GatewayWorkflowRuns::CreatedAtMicros))
                    .col(big_integer(GatewayWorkflowRuns::UpdatedAtMicros))
                    .col(big_integer_null(GatewayWorkflowRuns::CompletedAtMicros))
                    .col(string(GatewayWorkflowRuns::Owner))
                    .col(big_integer(GatewayWorkflowRuns::LeaseUntilMicros))
                    .col(boolean(GatewayWorkflowRuns::CancelRequested))
                    .col(string(GatewayWorkflowRuns::CancelActor))
                    .col(text(GatewayWorkflowRuns::CancelReason))
                    .col(big_integer(GatewayWorkflowRuns::LastEvent))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("gateway_workflow_runs_state")
                    .table(GatewayWorkflowRuns::Table)
                    .col(GatewayWorkflowRuns::State)
                    .col(GatewayWorkflowRuns::LeaseUntilMicros)
                    .to_owned(),
            )
            .await?;
        // Repeats of RunWorkflow with one idempotency key find the first run
        // (NULL keys never collide).
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .unique()
                    .name("gateway_workflow_runs_idempotency")
                    .table(GatewayWorkflowRuns::Table)
                    .col(GatewayWorkflowRuns::ProjectId)
                    .col(GatewayWorkflowRuns::IdempotencyKey)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(GatewayWorkflowSteps::Table)
                    .if_not_exists()
                    .col(string_len(GatewayWorkflowSteps::RunId, 128))
                    .col(string_len(GatewayWorkflowSteps::Name, 64))
                    .col(integer(GatewayWorkflowSteps::Position))
                    .col(string(GatewayWorkflowSteps::AgentType))
                    .col(integer(GatewayWorkflowSteps::State))
                    .col(integer(GatewayWorkflowSteps::Gate))
                    .col(boolean(GatewayWorkflowSteps::StartApproved))
                    .col(integer(GatewayWorkflowSteps::Runs))
                    .col(integer(GatewayWorkflowSteps::Revisions))
                    .col(text_null(GatewayWorkflowSteps::Output))
                    .col(string(GatewayWorkflowSteps::ExecutionId))
                    .col(string(GatewayWorkflowSteps::NodeId))
                    .col(big_integer(GatewayWorkflowSteps::PromptTokens))
                    .col(big_integer(GatewayWorkflowSteps::CompletionTokens))
                    .col(string(GatewayWorkflowSteps::Provider))
                    .col(string(GatewayWorkflowSteps::Model))
                    .col(boolean(GatewayWorkflowSteps::Offline))
                    .col(boolean(GatewayWorkflowSteps::Degraded))
                    .col(text(GatewayWorkflowSteps::DegradedReason))
                    .col(boolean(GatewayWorkflowSteps::CacheHit))
                    .col(integer(GatewayWorkflowSteps::AgentCalls))
                    .col(integer(GatewayWorkflowSteps::ErrorCode))
                    .col(text(GatewayWorkflowSteps::ErrorMessage))
                    .col(big_integer_null(GatewayWorkflowSteps::StartedAtMicros))
                    .col(big_integer_null(GatewayWorkflowSteps::CompletedAtMicros))
                    .primary_key(
                        Index::create()
                            .col(GatewayWorkflowSteps::RunId)
                            .col(GatewayWorkflowSteps::Name),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(GatewayWorkflowArtifacts::Table)
                    .if_not_exists()
                    .col(string_len(GatewayWorkflowArtifacts::RunId, 128))
                    .col(string_len(GatewayWorkflowArtifacts::Name, 128))
                    .col(integer(GatewayWorkflowArtifacts::Kind))
                    .col(string(GatewayWorkflowArtifacts::Step))
                    .col(text(GatewayWorkflowArtifacts::Content))
                    .col(big_integer(GatewayWorkflowArtifacts::Version))
                    .col(big_integer(GatewayWorkflowArtifacts::UpdatedAtMicros))
                    .primary_key(
                        Index::create()
                            .col(GatewayWorkflowArtifacts::RunId)
                            .col(GatewayWorkflowArtifacts::Name),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(GatewayWorkflowEvents::Table)
                    .if_not_exists()
                    .col(string_len(GatewayWorkflowEvents::RunId, 128))
                    .col(big_integer(GatewayWorkflowEvents::Sequence))
                    .col(integer(GatewayWorkflowEvents::Kind))
                    .col(string(GatewayWorkflowEvents::Step))
                    .col(integer(GatewayWorkflowEvents::StepState))
                    .col(integer(GatewayWorkflowEvents::RunState))
                    .col(text(GatewayWorkflowEvents::Message))
                    .col(string(GatewayWorkflowEvents::Actor))
                    .col(big_integer(GatewayWorkflowEvents::OccurredAtMicros))
                    .primary_key(
                        Index::create()
                            .col(GatewayWorkflowEvents::RunId)
                            .col(GatewayWorkflowEvents::Sequence),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(GatewayProjectStops::Table)
                    .if_not_exists()
                    .col(string_len(GatewayProjectStops::ProjectId, 128).primary_key())
                    .col(text(GatewayProjectStops::Reason))
                    .col(string(GatewayProjectStops::StoppedBy))
                    .col(big_integer(GatewayProjectStops::StoppedAtMicros))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            GatewayProjectStops::Table.into_iden(),
            GatewayWorkflowEvents::Table.into_iden(),
            GatewayWorkflowArtifacts::Table.into_iden(),
            GatewayWorkflowSteps::Table.into_iden(),
            GatewayWorkflowRuns::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
