//! Persistence: `agent_executions` (one row per execution, content only
//! when recorded) and `agent_artifacts` (per-project named artifacts).

use std::collections::BTreeMap;
use std::time::Duration;

use agentmesh_db::Database;
use chrono::{DateTime, Utc};
use sea_orm::entity::prelude::*;
use sea_orm::{ActiveValue, Condition, QueryOrder, QuerySelect};
use sha2::{Digest, Sha256};

use crate::error::AgentError;
use crate::profiler::Timings;
use crate::provider::ChatMessage;

/// The `agent_executions` entity.
pub mod execution {
    use sea_orm::entity::prelude::*;

    /// One execution.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "agent_executions")]
    pub struct Model {
        /// Execution id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub execution_id: String,
        /// Node that ran it.
        pub node_id: String,
        /// Agent type.
        pub agent_type: String,
        /// Project.
        pub project_id: String,
        /// Workflow, or empty.
        pub workflow_id: String,
        /// Correlation id, or empty.
        pub correlation_id: String,
        /// W3C trace id, or empty.
        pub trace_id: String,
        /// Sanitised variables as a JSON object.
        #[sea_orm(column_type = "Text")]
        pub variables: String,
        /// Template override.
        #[sea_orm(column_type = "Text", nullable)]
        pub template_override: Option<String>,
        /// Model asked for.
        pub model: String,
        /// Temperature.
        pub temperature: f64,
        /// Max tokens.
        pub max_tokens: i64,
        /// Timeout in seconds.
        pub timeout_seconds: i64,
        /// Rendered messages as JSON, when content is recorded.
        #[sea_orm(column_type = "Text", nullable)]
        pub messages: Option<String>,
        /// Output, when content is recorded.
        #[sea_orm(column_type = "Text", nullable)]
        pub output: Option<String>,
        /// Prompt tokens.
        pub prompt_tokens: i64,
        /// Completion tokens.
        pub completion_tokens: i64,
        /// Provider name.
        pub provider: String,
        /// Model the provider reported.
        pub provider_model: String,
        /// Offline provider.
        pub offline: bool,
        /// Wire `ExecutionStatus`.
        pub status: i32,
        /// gRPC code of the error, 0 when none.
        pub error_code: i32,
        /// Error message, empty when none.
        #[sea_orm(column_type = "Text")]
        pub error_message: String,
        /// Wire `FinishReason`.
        pub finish_reason: i32,
        /// Start, microseconds since the epoch.
        pub started_at_micros: i64,
        /// Wall time in microseconds.
        pub latency_micros: i64,
        /// Stage timings as JSON.
        #[sea_orm(column_type = "Text")]
        pub timings: String,
        /// Content stored.
        pub recorded: bool,
        /// Streamed.
        pub streamed: bool,
        /// Replayed execution, or empty.
        pub replay_of: String,
        /// SHA-256 (hex) of the recorded content.
        #[sea_orm(column_type = "Text", nullable)]
        pub content_sha256: Option<String>,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The `agent_artifacts` entity.
pub mod artifact {
    use sea_orm::entity::prelude::*;

    /// One artifact.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "agent_artifacts")]
    pub struct Model {
        /// Project.
        #[sea_orm(primary_key, auto_increment = false)]
        pub project_id: String,
        /// Name.
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        /// Wire `ArtifactKind`.
        pub kind: i32,
        /// Media type.
        pub content_type: String,
        /// Workflow, or empty.
        pub workflow_id: String,
        /// Producing agent, or empty.
        pub source_agent: String,
        /// Producing execution, or empty.
        pub execution_id: String,
        /// Content.
        #[sea_orm(column_type = "Blob")]
        pub content: Vec<u8>,
        /// Content length.
        pub size_bytes: i64,
        /// SHA-256 (hex) of the content.
        pub sha256: String,
        /// Version, 1 on creation.
        pub version: i64,
        /// Creation, microseconds since the epoch.
        pub created_at_micros: i64,
        /// Last write, microseconds since the epoch.
        pub updated_at_micros: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Result state of an execution (wire numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutionStatus {
    /// Output returned.
    Succeeded = 1,
    /// Failed.
    Failed = 2,
    /// Caller cancelled or its deadline passed.
    Cancelled = 3,
}

impl ExecutionStatus {
    fn from_stored(value: i32) -> Self {
        match value {
            1 => ExecutionStatus::Succeeded,
            3 => ExecutionStatus::Cancelled,
            _ => ExecutionStatus::Failed,
        }
    }
}

/// One execution, decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecutionRecord {
    /// Id.
    pub execution_id: String,
    /// Node.
    pub node_id: String,
    /// Agent type.
    pub agent_type: String,
    /// Project.
    pub project_id: String,
    /// Workflow or empty.
    pub workflow_id: String,
    /// Correlation id or empty.
    pub correlation_id: String,
    /// Trace id or empty.
    pub trace_id: String,
    /// Sanitised variables.
    pub variables: BTreeMap<String, String>,
    /// Template override.
    pub template_override: Option<String>,
    /// Model asked for.
    pub model: String,
    /// Temperature.
    pub temperature: f64,
    /// Max tokens.
    pub max_tokens: i64,
    /// Timeout in seconds.
    pub timeout_seconds: i64,
    /// Rendered messages (when recorded).
    pub messages: Option<Vec<ChatMessage>>,
    /// Output (when recorded).
    pub output: Option<String>,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Provider name.
    pub provider: String,
    /// Model the provider reported.
    pub provider_model: String,
    /// Offline provider.
    pub offline: bool,
    /// Result.
    pub status: ExecutionStatus,
    /// gRPC code of the error (0 = none).
    pub error_code: i32,
    /// Error message.
    pub error_message: String,
    /// Wire `FinishReason`.
    pub finish_reason: i32,
    /// Start.
    pub started_at: DateTime<Utc>,
    /// Wall time.
    pub latency: Duration,
    /// Stage timings.
    pub timings: Timings,
    /// Content stored.
    pub recorded: bool,
    /// Streamed.
    pub streamed: bool,
    /// Replayed execution or empty.
    pub replay_of: String,
    /// SHA-256 of the content when recorded.
    pub content_sha256: Option<String>,
}

/// SHA-256 (hex) of recorded content: messages and output.
pub fn content_digest(messages: &[ChatMessage], output: &str) -> String {
    let mut hasher = Sha256::new();
    for message in messages {
        hasher.update((message.role.len() as u64).to_be_bytes());
        hasher.update(message.role.as_bytes());
        hasher.update((message.content.len() as u64).to_be_bytes());
        hasher.update(message.content.as_bytes());
    }
    hasher.update((output.len() as u64).to_be_bytes());
    hasher.update(output.as_bytes());
    hex::encode(hasher.finalize())
}

fn encode(record: &ExecutionRecord) -> execution::ActiveModel {
    execution::ActiveModel {
        execution_id: ActiveValue::Set(record.execution_id.clone()),
        node_id: ActiveValue::Set(record.node_id.clone()),
        agent_type: ActiveValue::Set(record.agent_type.clone()),
        project_id: ActiveValue::Set(record.project_id.clone()),
        workflow_id: ActiveValue::Set(record.workflow_id.clone()),
        correlation_id: ActiveValue::Set(record.correlation_id.clone()),
        trace_id: ActiveValue::Set(record.trace_id.clone()),
        variables: ActiveValue::Set(
            serde_json::to_string(&record.variables).unwrap_or_else(|_| "{}".to_owned()),
        ),
        template_override: ActiveValue::Set(record.template_override.clone()),
        model: ActiveValue::Set(record.model.clone()),
        temperature: ActiveValue::Set(record.temperature),
        max_tokens: ActiveValue::Set(record.max_tokens),
        timeout_seconds: ActiveValue::Set(record.timeout_seconds),
        messages: ActiveValue::Set(
            record
                .messages
                .as_ref()
                .and_then(|messages| serde_json::to_string(messages).ok()),
        ),
        output: ActiveValue::Set(record.output.clone()),
        prompt_tokens: ActiveValue::Set(record.prompt_tokens),
        completion_tokens: ActiveValue::Set(record.completion_tokens),
        provider: ActiveValue::Set(record.provider.clone()),
        provider_model: ActiveValue::Set(record.provider_model.clone()),
        offline: ActiveValue::Set(record.offline),
        status: ActiveValue::Set(record.status as i32),
        error_code: ActiveValue::Set(record.error_code),
        error_message: ActiveValue::Set(record.error_message.clone()),
        finish_reason: ActiveValue::Set(record.finish_reason),
        started_at_micros: ActiveValue::Set(record.started_at.timestamp_micros()),
        latency_micros: ActiveValue::Set(record.latency.as_micros() as i64),
        timings: ActiveValue::Set(
            serde_json::to_string(&record.timings).unwrap_or_else(|_| "{}".to_owned()),
        ),
        recorded: ActiveValue::Set(record.recorded),
        streamed: ActiveValue::Set(record.streamed),
        replay_of: ActiveValue::Set(record.replay_of.clone()),
        content_sha256: ActiveValue::Set(record.content_sha256.clone()),
    }
}

fn decode(model: execution::Model) -> Result<ExecutionRecord, AgentError> {
    let corrupt = |what: &str, error: serde_json::Error| {
        AgentError::Corrupt(format!("execution {} {what}: {error}", model.execution_id))
    };
    let variables = serde_json::from_str(&model.variables).map_err(|e| corrupt("variables", e))?;
    let messages = model
        .messages
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|e| corrupt("messages", e))?;
    let timings = serde_json::from_str(&model.timings).map_err(|e| corrupt("timings", e))?;
    Ok(ExecutionRecord {
        execution_id: model.execution_id,
        node_id: model.node_id,
        agent_type: model.agent_type,
        project_id: model.project_id,
        workflow_id: model.workflow_id,
        correlation_id: model.correlation_id,
        trace_id: model.trace_id,
        variables,
        template_override: model.template_override,
        model: model.model,
        temperature: model.temperature,
        max_tokens: model.max_tokens,
        timeout_seconds: model.timeout_seconds,
        messages,
        output: model.output,
        prompt_tokens: model.prompt_tokens,
        completion_tokens: model.completion_tokens,
        provider: model.provider,
        provider_model: model.provider_model,
        offline: model.offline,
        status: ExecutionStatus::from_stored(model.status),
        error_code: model.error_code,
        error_message: model.error_message,
        finish_reason: model.finish_reason,
        started_at: DateTime::from_timestamp_micros(model.started_at_micros).unwrap_or_default(),
        latency: Duration::from_micros(model.latency_micros.max(0) as u64),
        timings,
        recorded: model.recorded,
        streamed: model.streamed,
        replay_of: model.replay_of,
        content_sha256: model.content_sha256,
    })
}

/// Filters of `ListExecutions`.
#[derive(Clone, Debug, Default)]
pub struct ExecutionFilter {
    /// Project.
    pub project_id: Option<String>,
    /// Workflow.
    pub workflow_id: Option<String>,
    /// Agent type.
    pub agent_type: Option<String>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Status.
    pub status: Option<ExecutionStatus>,
    /// Started at or after (micros).
    pub start_micros: Option<i64>,
    /// Started before (micros).
    pub end_micros: Option<i64>,
    /// Continue after this (started micros, id).
    pub after: Option<(i64, String)>,
}

/// A stored artifact with its content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactRecord {
    /// The row.
    pub row: artifact::Model,
}

/// An artifact write.
#[derive(Clone, Debug)]
pub struct NewArtifact {
    /// Project.
    pub project_id: String,
    /// Name.
    pub name: String,
    /// Wire kind.
    pub kind: i32,
    /// Media type.
    pub content_type: String,
    /// Workflow or empty.
    pub workflow_id: String,
    /// Producing agent or empty.
    pub source_agent: String,
    /// Producing execution or empty.
    pub execution_id: String,
    /// Content.
    pub content: Vec<u8>,
    /// Compare-and-set version (0 = must not exist).
    pub expected_version: Option<u64>,
}

/// Queries over the agent tables.
#[derive(Clone, Debug)]
pub struct Store {
    database: Database,
}

impl Store {
    /// Wraps a connected, migrated database.
    pub fn new(database: Database) -> Self {
        Self { database }
    }

    /// Inserts execution records in one transaction.
    pub async fn insert_executions(&self, records: &[ExecutionRecord]) -> Result<(), AgentError> {
        if records.is_empty() {
            return Ok(());
        }
        let transaction = self.database.begin_write().await?;
        execution::Entity::insert_many(records.iter().map(encode))
            .exec(&transaction)
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// One execution (writer: read-your-writes after a flush).
    pub async fn execution(
        &self,
        execution_id: &str,
    ) -> Result<Option<ExecutionRecord>, AgentError> {
        execution::Entity::find_by_id(execution_id.to_owned())
            .one(self.database.writer())
            .await?
            .map(decode)
            .transpose()
    }

    /// A page of executions, newest first.
    pub async fn executions(
        &self,
        filter: &ExecutionFilter,
        limit: u64,
    ) -> Result<Vec<ExecutionRecord>, AgentError> {
        let mut query = execution::Entity::find();
        let columns = [
            (execution::Column::ProjectId, &filter.project_id),
            (execution::Column::WorkflowId, &filter.workflow_id),
            (execution::Column::AgentType, &filter.agent_type),
            (execution::Column::CorrelationId, &filter.correlation_id),
        ];
        for (column, value) in columns {
            if let Some(value) = value {
                query = query.filter(column.eq(value.clone()));
            }
        }
        if let Some(status) = filter.status {
            query = query.filter(execution::Column::Status.eq(status as i32));
        }
        if let Some(start) = filter.start_micros {
            query = query.filter(execution::Column::StartedAtMicros.gte(start));
        }
        if let Some(end) = filter.end_micros {
            query = query.filter(execution::Column::StartedAtMicros.lt(end));
        }
        if let Some((micros, id)) = &filter.after {
            query = query.filter(
                Condition::any()
                    .add(execution::Column::StartedAtMicros.lt(*micros))
                    .add(
                        Condition::all()
                            .add(execution::Column::StartedAtMicros.eq(*micros))
                            .add(execution::Column::ExecutionId.lt(id.clone())),
                    ),
            );
        }
        query
            .order_by_desc(execution::Column::StartedAtMicros)
            .order_by_desc(execution::Column::ExecutionId)
            .limit(limit)
            .all(self.database.reader())
            .await?
            .into_iter()
            .map(decode)
            .collect()
    }

    /// Creates or replaces an artifact, honouring `expected_version`.
    pub async fn put_artifact(&self, new: NewArtifact) -> Result<artifact::Model, AgentError> {
        let transaction = self.database.begin_write().await?;
        let current = artifact::Entity::find_by_id((new.project_id.clone(), new.name.clone()))
            .one(&transaction)
            .await?;
        let current_version = current.as_ref().map_or(0, |row| row.version as u64);
        if let Some(expected) = new.expected_version
            && expected != current_version
        {
            return Err(AgentError::FailedPrecondition(format!(
                "artifact {:?} is at version {current_version}, not the expected {expected}",
                new.name
            )));
        }
        let now = Utc::now().timestamp_micros();
        let row = artifact::Model {
            project_id: new.project_id,
            name: new.name,
            kind: new.kind,
            content_type: new.content_type,
            workflow_id: new.workflow_id,
            source_agent: new.source_agent,
            execution_id: new.execution_id,
            size_bytes: new.content.len() as i64,
            sha256: hex::encode(Sha256::digest(&new.content)),
            content: new.content,
            version: current_version as i64 + 1,
            created_at_micros: current.as_ref().map_or(now, |row| row.created_at_micros),
            updated_at_micros: now,
        };
        let active: artifact::ActiveModel = row.clone().into();
        if current.is_some() {
            let mut active = active.reset_all();
            active.project_id = ActiveValue::Unchanged(row.project_id.clone());
            active.name = ActiveValue::Unchanged(row.name.clone());
            active.update(&transaction).await?;
        } else {
            artifact::Entity::insert(active).exec(&transaction).await?;
        }
        transaction.commit().await?;
        Ok(row)
    }

    /// One artifact with content.
    pub async fn artifact(
        &self,
        project_id: &str,
        name: &str,
    ) -> Result<Option<artifact::Model>, AgentError> {
        Ok(
            artifact::Entity::find_by_id((project_id.to_owned(), name.to_owned()))
                .one(self.database.writer())
                .await?,
        )
    }

    /// A page of artifact metadata (content emptied), by name.
    pub async fn artifacts(
        &self,
        project_id: &str,
        name_prefix: &str,
        workflow_id: &str,
        kind: Option<i32>,
        after_name: Option<&str>,
        limit: u64,
    ) -> Result<Vec<artifact::Model>, AgentError> {
        let mut query = artifact::Entity::find()
            .select_only()
            .columns([
                artifact::Column::ProjectId,
                artifact::Column::Name,
                artifact::Column::Kind,
                artifact::Column::ContentType,
                artifact::Column::WorkflowId,
                artifact::Column::SourceAgent,
                artifact::Column::ExecutionId,
                artifact::Column::SizeBytes,
                artifact::Column::Sha256,
                artifact::Column::Version,
                artifact::Column::CreatedAtMicros,
                artifact::Column::UpdatedAtMicros,
            ])
            .column_as(Expr::val(Vec::<u8>::new()), "content")
            .filter(artifact::Column::ProjectId.eq(project_id.to_owned()));
        if !name_prefix.is_empty() {
            query = query.filter(artifact::Column::Name.starts_with(name_prefix));
        }
        if !workflow_id.is_empty() {
            query = query.filter(artifact::Column::WorkflowId.eq(workflow_id.to_owned()));
        }
        if let Some(kind) = kind {
            query = query.filter(artifact::Column::Kind.eq(kind));
        }
        if let Some(after) = after_name {
            query = query.filter(artifact::Column::Name.gt(after.to_owned()));
        }
        Ok(query
            .order_by_asc(artifact::Column::Name)
            .limit(limit)
            .into_model::<artifact::Model>()
            .all(self.database.reader())
            .await?)
    }

    /// Deletes (or counts, when `dry_run`) artifacts last written before
    /// `cutoff_micros`, `batch` rows per statement; returns (count, bytes).
    pub async fn cleanup_artifacts(
        &self,
        cutoff_micros: i64,
        project_id: Option<&str>,
        dry_run: bool,
        batch: u64,
    ) -> Result<(u64, u64), AgentError> {
        let mut removed = 0u64;
        let mut removed_bytes = 0u64;
        let mut after: Option<(String, String)> = None;
        loop {
            let mut query = artifact::Entity::find()
                .select_only()
                .column(artifact::Column::ProjectId)
                .column(artifact::Column::Name)
                .column(artifact::Column::SizeBytes)
                .filter(artifact::Column::UpdatedAtMicros.lt(cutoff_micros));
            if let Some(project_id) = project_id {
                query = query.filter(artifact::Column::ProjectId.eq(project_id.to_owned()));
            }
            if dry_run && let Some((project, name)) = &after {
                query = query.filter(
                    Condition::any()
                        .add(artifact::Column::ProjectId.gt(project.clone()))
                        .add(
                            Condition::all()
                                .add(artifact::Column::ProjectId.eq(project.clone()))
                                .add(artifact::Column::Name.gt(name.clone())),
                        ),
                );
            }
            let rows: Vec<(String, String, i64)> = query
                .order_by_asc(artifact::Column::ProjectId)
                .order_by_asc(artifact::Column::Name)
                .limit(batch)
                .into_tuple()
                .all(self.database.writer())
                .await?;
            if rows.is_empty() {
                break;
            }
            let count = rows.len() as u64;
            let bytes: u64 = rows.iter().map(|(_, _, size)| *size.max(&0) as u64).sum();
            if !dry_run {
                let transaction = self.database.begin_write().await?;
                let mut condition = Condition::any();
                for (project, name, _) in &rows {
                    condition = condition.add(
                        Condition::all()
                            .add(artifact::Column::ProjectId.eq(project.clone()))
                            .add(artifact::Column::Name.eq(name.clone())),
                    );
                }
                // Re-check the age: a row rewritten since the select stays.
                artifact::Entity::delete_many()
                    .filter(condition)
                    .filter(artifact::Column::UpdatedAtMicros.lt(cutoff_micros))
                    .exec(&transaction)
                    .await?;
                transaction.commit().await?;
            }
            removed += count;
            removed_bytes += bytes;
            after = rows
                .last()
                .map(|(project, name, _)| (project.clone(), name.clone()));
            if count < batch {
                break;
            }
        }
        Ok((removed, removed_bytes))
    }

    /// Sets an artifact's last-write time (tests of retention).
    pub async fn touch_artifact(
        &self,
        project_id: &str,
        name: &str,
        updated_at_micros: i64,
    ) -> Result<(), AgentError> {
        artifact::Entity::update_many()
            .col_expr(
                artifact::Column::UpdatedAtMicros,
                Expr::value(updated_at_micros),
            )
            .filter(artifact::Column::ProjectId.eq(project_id.to_owned()))
            .filter(artifact::Column::Name.eq(name.to_owned()))
            .exec(self.database.writer())
            .await?;
        Ok(())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), AgentError> {
        self.database.writer().ping().await?;
        Ok(())
    }
}
