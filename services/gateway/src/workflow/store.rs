//! Persistence of workflow runs in the gateway's database: runs (with the
//! claim of the gateway driving each), steps, artifacts, the event log of
//! each run, and per-project emergency stops. Every change of a run is one
//! transaction that also appends its event with the next sequence number
//! (the run row's counter serialises them, so watchers never miss one).

use agentmesh_db::Database;
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ActiveValue, Condition, DatabaseTransaction, QueryOrder, QuerySelect};

/// Wire numbers of `WorkflowState` that are not final.
pub const UNFINISHED_RUN_STATES: [i32; 3] = [1, 2, 6];

/// The `gateway_workflow_runs` entity.
pub mod run {
    use sea_orm::entity::prelude::*;

    /// One run.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "gateway_workflow_runs")]
    pub struct Model {
        /// Run id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub run_id: String,
        /// Workflow id shared by the steps.
        pub workflow_id: String,
        /// Project.
        pub project_id: String,
        /// Definition name, or empty for inline steps.
        pub definition: String,
        /// The resolved steps as JSON.
        #[sea_orm(column_type = "Text")]
        pub spec: String,
        /// The inputs as a JSON object.
        #[sea_orm(column_type = "Text")]
        pub inputs: String,
        /// Wire `WorkflowState`.
        pub state: i32,
        /// Correlation id.
        pub correlation_id: String,
        /// W3C trace id of the run, or empty.
        pub trace_id: String,
        /// Span id of the run's root span, or empty.
        pub root_span_id: String,
        /// Idempotency key, when given.
        pub idempotency_key: Option<String>,
        /// SHA-256 of the request, to tell a repeat from a conflict.
        pub request_sha256: String,
        /// Wire `CachePolicy` of every step.
        pub cache_policy: i32,
        /// Who started it.
        pub started_by: String,
        /// Why it failed or was cancelled.
        #[sea_orm(column_type = "Text")]
        pub error: String,
        /// Creation, microseconds since the epoch.
        pub created_at_micros: i64,
        /// Last change.
        pub updated_at_micros: i64,
        /// Final state reached.
        pub completed_at_micros: Option<i64>,
        /// Gateway driving it.
        pub owner: String,
        /// Until when the owner's claim holds.
        pub lease_until_micros: i64,
        /// A cancel was asked for (by a gateway that does not drive it).
        pub cancel_requested: bool,
        /// Who asked to cancel.
        pub cancel_actor: String,
        /// Why.
        #[sea_orm(column_type = "Text")]
        pub cancel_reason: String,
        /// Sequence of the newest event.
        pub last_event: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The `gateway_workflow_steps` entity.
pub mod step {
    use sea_orm::entity::prelude::*;

    /// One step of a run.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "gateway_workflow_steps")]
    pub struct Model {
        /// Run id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub run_id: String,
        /// Step name.
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        /// Position in the workflow.
        pub position: i32,
        /// Agent type.
        pub agent_type: String,
        /// Wire `StepState`.
        pub state: i32,
        /// Wire `ApprovalGate` while awaiting approval.
        pub gate: i32,
        /// The before-start gate was passed.
        pub start_approved: bool,
        /// Executions started.
        pub runs: i32,
        /// Amendments received.
        pub revisions: i32,
        /// Output (awaiting approval or accepted).
        #[sea_orm(column_type = "Text", nullable)]
        pub output: Option<String>,
        /// Agent execution id.
        pub execution_id: String,
        /// Agent node.
        pub node_id: String,
        /// Prompt tokens.
        pub prompt_tokens: i64,
        /// Completion tokens.
        pub completion_tokens: i64,
        /// Provider.
        pub provider: String,
        /// Model.
        pub model: String,
        /// Offline provider.
        pub offline: bool,
        /// Answered by the fallback agent.
        pub degraded: bool,
        /// Why degraded.
        #[sea_orm(column_type = "Text")]
        pub degraded_reason: String,
        /// Served from the cache.
        pub cache_hit: bool,
        /// Agent calls of the last execution.
        pub agent_calls: i32,
        /// gRPC code of the error, 0 when none.
        pub error_code: i32,
        /// Error message.
        #[sea_orm(column_type = "Text")]
        pub error_message: String,
        /// Last start.
        pub started_at_micros: Option<i64>,
        /// Last finish.
        pub completed_at_micros: Option<i64>,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The `gateway_workflow_artifacts` entity.
pub mod artifact {
    use sea_orm::entity::prelude::*;

    /// One artifact of a run.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "gateway_workflow_artifacts")]
    pub struct Model {
        /// Run id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub run_id: String,
        /// Artifact name.
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        /// Wire `WorkflowArtifactKind`.
        pub kind: i32,
        /// Producing step.
        pub step: String,
        /// Content.
        #[sea_orm(column_type = "Text")]
        pub content: String,
        /// Version, 1 on creation.
        pub version: i64,
        /// Last write.
        pub updated_at_micros: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The `gateway_workflow_events` entity.
pub mod event {
    use sea_orm::entity::prelude::*;

    /// One event of a run.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "gateway_workflow_events")]
    pub struct Model {
        /// Run id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub run_id: String,
        /// 1, 2, 3… per run.
        #[sea_orm(primary_key, auto_increment = false)]
        pub sequence: i64,
        /// Wire `WorkflowEventKind`.
        pub kind: i32,
        /// Step, or empty.
        pub step: String,
        /// Wire `StepState` after the event.
        pub step_state: i32,
        /// Wire `WorkflowState` after the event.
        pub run_state: i32,
        /// Detail.
        #[sea_orm(column_type = "Text")]
        pub message: String,
        /// Who caused it.
        pub actor: String,
        /// When.
        pub occurred_at_micros: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The `gateway_project_stops` entity.
pub mod project_stop {
    use sea_orm::entity::prelude::*;

    /// A project's emergency stop.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "gateway_project_stops")]
    pub struct Model {
        /// Project.
        #[sea_orm(primary_key, auto_increment = false)]
        pub project_id: String,
        /// Why.
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        /// Who.
        pub stopped_by: String,
        /// When.
        pub stopped_at_micros: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// An event to append.
#[derive(Clone, Debug, Default)]
pub struct NewEvent {
    /// Wire `WorkflowEventKind`.
    pub kind: i32,
    /// Step, or empty.
    pub step: String,
    /// Wire `StepState` after the event.
    pub step_state: i32,
    /// Detail.
    pub message: String,
    /// Who caused it.
    pub actor: String,
}

/// The changes of one transition of a run.
#[derive(Clone, Debug, Default)]
pub struct Change {
    /// The step's new row, written only while its state is one of
    /// `expected` (otherwise nothing is written).
    pub step: Option<(step::Model, Vec<i32>)>,
    /// The run's new state (ignored once the run is final).
    pub run_state: Option<i32>,
    /// The run's error, with its new state.
    pub run_error: Option<String>,
    /// Artifact to create or rewrite (version + 1).
    pub artifact: Option<artifact::Model>,
    /// The event, appended when the change applies.
    pub event: Option<NewEvent>,
}

/// A run with its steps and artifacts.
#[derive(Clone, Debug)]
pub struct RunRecord {
    /// The run.
    pub run: run::Model,
    /// Steps in workflow order.
    pub steps: Vec<step::Model>,
    /// Artifacts by name.
    pub artifacts: Vec<artifact::Model>,
}

/// The microseconds since the epoch, now.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn is_final(state: i32) -> bool {
    !UNFINISHED_RUN_STATES.contains(&state)
}

/// Workflow persistence over the gateway's database.
#[derive(Clone, Debug)]
pub struct Store {
    database: Database,
}

impl Store {
    /// A store over `database` (migrated).
    pub fn new(database: Database) -> Self {
        Self { database }
    }

    /// Inserts a new run with its steps and its first event.
    pub async fn insert_run(
        &self,
        run: run::Model,
        steps: Vec<step::Model>,
        first: NewEvent,
    ) -> Result<(), DbErr> {
        let transaction = self.database.begin_write().await?;
        let run_id = run.run_id.clone();
        let run_state = run.state;
        let created = run.created_at_micros;
        run::Entity::insert(run::ActiveModel::from(run))
            .exec(&transaction)
            .await?;
        if !steps.is_empty() {
            step::Entity::insert_many(steps.into_iter().map(step::ActiveModel::from))
                .exec(&transaction)
                .await?;
        }
        append_event(&transaction, &run_id, run_state, first, created).await?;
        transaction.commit().await
    }

    /// The run started with `idempotency_key` in `project_id`, if any.
    pub async fn find_by_idempotency_key(
        &self,
        project_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<run::Model>, DbErr> {
        run::Entity::find()
            .filter(run::Column::ProjectId.eq(project_id))
            .filter(run::Column::IdempotencyKey.eq(idempotency_key))
            .one(self.database.writer())
            .await
    }

    /// A run with its steps and artifacts.
    pub async fn load(&self, run_id: &str) -> Result<Option<RunRecord>, DbErr> {
        let connection = self.database.writer();
        let Some(run) = run::Entity::find_by_id(run_id).one(connection).await? else {
            return Ok(None);
        };
        let steps = step::Entity::find()
            .filter(step::Column::RunId.eq(run_id))
            .order_by_asc(step::Column::Position)
            .all(connection)
            .await?;
        let artifacts = artifact::Entity::find()
            .filter(artifact::Column::RunId.eq(run_id))
            .order_by_asc(artifact::Column::UpdatedAtMicros)
            .order_by_asc(artifact::Column::Name)
            .all(connection)
            .await?;
        Ok(Some(RunRecord {
            run,
            steps,
            artifacts,
        }))
    }

    /// Applies one transition: returns `false` (and writes nothing) when
    /// the step was no longer in an expected state or the run is final.
    pub async fn apply(&self, run_id: &str, change: Change) -> Result<bool, DbErr> {
        let transaction = self.database.begin_write().await?;
        let Some(current) = run::Entity::find_by_id(run_id).one(&transaction).await? else {
            return Ok(false);
        };
        if is_final(current.state) {
            return Ok(false);
        }
        let now = now_micros();
        if let Some((row, expected)) = change.step {
            let name = row.name.clone();
            // Every column is written (`reset_all` marks them set), except
            // the key and the columns a step never changes.
            let mut active = step::ActiveModel::from(row).reset_all();
            active.run_id = ActiveValue::NotSet;
            active.name = ActiveValue::NotSet;
            active.position = ActiveValue::NotSet;
            active.agent_type = ActiveValue::NotSet;
            let updated = step::Entity::update_many()
                .set(active)
                .filter(step::Column::RunId.eq(run_id))
                .filter(step::Column::Name.eq(name))
                .filter(step::Column::State.is_in(expected))
                .exec(&transaction)
                .await?;
            if updated.rows_affected == 0 {
                return Ok(false);
            }
        }
        if let Some(artifact) = change.artifact {
            let existing = artifact::Entity::find_by_id((run_id.to_owned(), artifact.name.clone()))
                .one(&transaction)
                .await?;
            match existing {
                Some(old) => {
                    let mut active = artifact::ActiveModel::from(old.clone());
                    active.kind = ActiveValue::Set(artifact.kind);
                    active.step = ActiveValue::Set(artifact.step);
                    active.content = ActiveValue::Set(artifact.content);
                    active.version = ActiveValue::Set(old.version + 1);
                    active.updated_at_micros = ActiveValue::Set(now);
                    active.update(&transaction).await?;
                }
                None => {
                    artifact::Entity::insert(artifact::ActiveModel::from(artifact::Model {
                        run_id: run_id.to_owned(),
                        version: 1,
                        updated_at_micros: now,
                        ..artifact
                    }))
                    .exec(&transaction)
                    .await?;
                }
            }
        }
        let run_state = change.run_state.unwrap_or(current.state);
        let mut update = run::Entity::update_many()
            .col_expr(run::Column::State, Expr::value(run_state))
            .col_expr(run::Column::UpdatedAtMicros, Expr::value(now));
        if let Some(error) = change.run_error {
            update = update.col_expr(run::Column::Error, Expr::value(error));
        }
        if is_final(run_state) {
            update = update.col_expr(run::Column::CompletedAtMicros, Expr::value(Some(now)));
        }
        update
            .filter(run::Column::RunId.eq(run_id))
            .exec(&transaction)
            .await?;
        if let Some(event) = change.event {
            append_event(&transaction, run_id, run_state, event, now).await?;
        }
        transaction.commit().await?;
        Ok(true)
    }

    /// Events of a run after `sequence`, oldest first, at most `limit`.
    pub async fn events_after(
        &self,
        run_id: &str,
        sequence: i64,
        limit: u64,
    ) -> Result<Vec<event::Model>, DbErr> {
        event::Entity::find()
            .filter(event::Column::RunId.eq(run_id))
            .filter(event::Column::Sequence.gt(sequence))
            .order_by_asc(event::Column::Sequence)
            .limit(limit)
            .all(self.database.writer())
            .await
    }

    /// Claims `run_id` for `owner` until `lease_until` when it is not final
    /// and unclaimed (its lease lapsed) or already `owner`'s.
    pub async fn claim(&self, run_id: &str, owner: &str, lease_until: i64) -> Result<bool, DbErr> {
        let updated = run::Entity::update_many()
            .col_expr(run::Column::Owner, Expr::value(owner))
            .col_expr(run::Column::LeaseUntilMicros, Expr::value(lease_until))
            .filter(run::Column::RunId.eq(run_id))
            .filter(run::Column::State.is_in(UNFINISHED_RUN_STATES))
            .filter(
                Condition::any()
                    .add(run::Column::Owner.eq(owner))
                    .add(run::Column::LeaseUntilMicros.lt(now_micros())),
            )
            .exec(self.database.writer())
            .await?;
        Ok(updated.rows_affected == 1)
    }

    /// Unfinished runs `owner` may take over (its own, or with a lapsed
    /// lease), oldest first, at most `limit`.
    pub async fn claimable(&self, owner: &str, limit: u64) -> Result<Vec<String>, DbErr> {
        run::Entity::find()
            .select_only()
            .column(run::Column::RunId)
            .filter(run::Column::State.is_in(UNFINISHED_RUN_STATES))
            .filter(
                Condition::any()
                    .add(run::Column::Owner.eq(owner))
                    .add(run::Column::LeaseUntilMicros.lt(now_micros())),
            )
            .order_by_asc(run::Column::CreatedAtMicros)
            .limit(limit)
            .into_tuple()
            .all(self.database.writer())
            .await
    }

    /// Extends the leases of `run_ids` held by `owner`.
    pub async fn renew(&self, owner: &str, run_ids: &[String], until: i64) -> Result<(), DbErr> {
        if run_ids.is_empty() {
            return Ok(());
        }
        run::Entity::update_many()
            .col_expr(run::Column::LeaseUntilMicros, Expr::value(until))
            .filter(run::Column::Owner.eq(owner))
            .filter(run::Column::RunId.is_in(run_ids.iter().cloned()))
            .exec(self.database.writer())
            .await
            .map(|_| ())
    }

    /// Gives up `owner`'s claims on `run_ids` at once (graceful stop).
    pub async fn release(&self, owner: &str, run_ids: &[String]) -> Result<(), DbErr> {
        self.renew(owner, run_ids, 0).await
    }

    /// Records a cancel request on a run.
    pub async fn request_cancel(
        &self,
        run_id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<(), DbErr> {
        run::Entity::update_many()
            .col_expr(run::Column::CancelRequested, Expr::value(true))
            .col_expr(run::Column::CancelActor, Expr::value(actor))
            .col_expr(run::Column::CancelReason, Expr::value(reason))
            .filter(run::Column::RunId.eq(run_id))
            .filter(run::Column::State.is_in(UNFINISHED_RUN_STATES))
            .exec(self.database.writer())
            .await
            .map(|_| ())
    }

    /// Unfinished runs of a project.
    pub async fn unfinished_runs_of(&self, project_id: &str) -> Result<Vec<String>, DbErr> {
        run::Entity::find()
            .select_only()
            .column(run::Column::RunId)
            .filter(run::Column::ProjectId.eq(project_id))
            .filter(run::Column::State.is_in(UNFINISHED_RUN_STATES))
            .into_tuple()
            .all(self.database.writer())
            .await
    }

    /// Every project stop.
    pub async fn project_stops(&self) -> Result<Vec<project_stop::Model>, DbErr> {
        project_stop::Entity::find()
            .all(self.database.writer())
            .await
    }

    /// Stops a project; returns the stop in force (an earlier one wins).
    pub async fn stop_project(
        &self,
        stop: project_stop::Model,
    ) -> Result<project_stop::Model, DbErr> {
        let transaction = self.database.begin_write().await?;
        if let Some(existing) = project_stop::Entity::find_by_id(stop.project_id.clone())
            .one(&transaction)
            .await?
        {
            return Ok(existing);
        }
        project_stop::Entity::insert(project_stop::ActiveModel::from(stop.clone()))
            .exec(&transaction)
            .await?;
        transaction.commit().await?;
        Ok(stop)
    }

    /// Lifts a project's stop; returns the one lifted.
    pub async fn resume_project(
        &self,
        project_id: &str,
    ) -> Result<Option<project_stop::Model>, DbErr> {
        let transaction = self.database.begin_write().await?;
        let existing = project_stop::Entity::find_by_id(project_id.to_owned())
            .one(&transaction)
            .await?;
        if existing.is_some() {
            project_stop::Entity::delete_by_id(project_id.to_owned())
                .exec(&transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(existing)
    }
}

async fn append_event(
    transaction: &DatabaseTransaction,
    run_id: &str,
    run_state: i32,
    event: NewEvent,
    occurred_at_micros: i64,
) -> Result<(), DbErr> {
    // The counter update locks the run row until commit, so sequences
    // commit in order.
    run::Entity::update_many()
        .col_expr(
            run::Column::LastEvent,
            Expr::col(run::Column::LastEvent).add(1),
        )
        .filter(run::Column::RunId.eq(run_id))
        .exec(transaction)
        .await?;
    let sequence: Option<i64> = run::Entity::find_by_id(run_id)
        .select_only()
        .column(run::Column::LastEvent)
        .into_tuple()
        .one(transaction)
        .await?;
    let Some(sequence) = sequence else {
        return Err(DbErr::RecordNotFound(format!("workflow run {run_id}")));
    };
    event::Entity::insert(event::ActiveModel::from(event::Model {
        run_id: run_id.to_owned(),
        sequence,
        kind: event.kind,
        step: event.step,
        step_state: event.step_state,
        run_state,
        message: event.message,
        actor: event.actor,
        occurred_at_micros,
    }))
    .exec(transaction)
    .await?;
    Ok(())
}
