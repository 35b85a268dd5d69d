//! The config service's logic. Reads are served from an in-memory view of
//! every scope, kept current by [`ConfigCore::sync`] (after each local write,
//! and on a timer for writes by other replicas); writes go to the database
//! under a cross-replica lock, with compare-and-set on the scope revision.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use agentmesh_db::Database;
use agentmesh_resilience::FieldViolation;
use agentmesh_settings::live::{self, Source, Values};
use agentmesh_settings::{LiveSettings, Scope, Settings};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::error::ConfigError;
use crate::store::{ChangeKind, NewRevision, RevisionRecord, Store};

/// Revisions fetched per database round trip when catching up.
const SYNC_BATCH: u64 = 500;
/// Most revisions a resuming watcher is replayed; beyond, it gets a snapshot.
const REPLAY_LIMIT: u64 = 1000;
/// Events queued per watcher stream before it counts as slow.
const WATCHER_QUEUE: usize = 16;

/// A scope's values and the revision that last changed them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScopeState {
    /// The revision; 0 if never written.
    pub revision: u64,
    /// The values set at this scope.
    pub values: Values,
}

/// Every scope at one revision.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The head revision.
    pub revision: u64,
    /// Every scope ever written.
    pub scopes: BTreeMap<Scope, ScopeState>,
}

/// One event of a watch stream.
#[derive(Clone, Debug)]
pub enum WatchEvent {
    /// The complete state; `resync` when it replaces missed changes.
    Snapshot {
        /// The state.
        snapshot: Arc<Snapshot>,
        /// True after falling behind.
        resync: bool,
    },
    /// One change.
    Change(Arc<RevisionRecord>),
}

/// A validated Update.
#[derive(Clone, Debug)]
pub struct UpdateCommand {
    /// The scope to change.
    pub scope: Scope,
    /// Values to set.
    pub set: Values,
    /// Field paths to clear.
    pub clear: Vec<&'static str>,
    /// Compare-and-set on the scope revision.
    pub expected_revision: Option<u64>,
    /// Who.
    pub author: String,
    /// Why.
    pub reason: String,
}

/// A validated Rollback.
#[derive(Clone, Debug)]
pub struct RollbackCommand {
    /// The revision whose values are restored.
    pub revision: u64,
    /// Compare-and-set on the scope revision.
    pub expected_revision: Option<u64>,
    /// Who.
    pub author: String,
    /// Why.
    pub reason: String,
}

/// The config service's state and operations.
pub struct ConfigCore {
    store: Store,
    view: RwLock<Arc<Snapshot>>,
    sync_lock: Mutex<()>,
    write_lock: Mutex<()>,
    changes: broadcast::Sender<Arc<RevisionRecord>>,
    watchers: Arc<Semaphore>,
    max_watchers: usize,
    shutdown: CancellationToken,
    poller: CancellationToken,
}

impl ConfigCore {
    /// Seeds `global` on a fresh database, loads every scope and starts the
    /// poller that picks up other replicas' writes.
    pub async fn start(
        database: Database,
        settings: &Settings,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, ConfigError> {
        let (changes, _) = broadcast::channel(settings.config_service.watch_buffer);
        let core = Arc::new(Self {
            store: Store::new(database),
            view: RwLock::new(Arc::new(Snapshot::default())),
            sync_lock: Mutex::new(()),
            write_lock: Mutex::new(()),
            changes,
            watchers: Arc::new(Semaphore::new(settings.config_service.max_watchers)),
            max_watchers: settings.config_service.max_watchers,
            poller: shutdown.child_token(),
            shutdown,
        });
        core.seed(&settings.defaults).await?;
        core.sync().await?;
        let poll_interval = Duration::from_millis(settings.config_service.poll_interval_ms);
        tokio::spawn(Arc::clone(&core).poll(poll_interval));
        Ok(core)
    }

    /// Stops the poller.
    pub fn stop(&self) {
        self.poller.cancel();
    }

    async fn seed(&self, defaults: &LiveSettings) -> Result<(), ConfigError> {
        let _write = self.write_lock.lock().await;
        let transaction = self.store.begin_write().await?;
        if self.store.is_empty(&transaction).await? {
            let values = defaults.to_values();
            let changed: Vec<String> = values.iter().map(|(path, _)| path.to_owned()).collect();
            let revision = self
                .store
                .insert(
                    &transaction,
                    NewRevision {
                        scope: &Scope::Global,
                        values: &values,
                        changed_fields: &changed,
                        kind: ChangeKind::Seed,
                        rollback_of: None,
                        author: "agentmesh",
                        reason: "seeded from bootstrap settings on first start",
                    },
                )
                .await?;
            tracing::info!(revision, "seeded global settings");
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn poll(self: Arc<Self>, interval: Duration) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = self.poller.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            match self.sync().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("config storage reachable again");
                }
                Ok(()) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "cannot poll config revisions; serving the last known state");
                }
                Err(error) => tracing::debug!(%error, "config poll still failing"),
            }
        }
    }

    /// Applies every committed revision newer than the view, in order, and
    /// feeds each to the watchers.
    pub async fn sync(&self) -> Result<(), ConfigError> {
        let _sync = self.sync_lock.lock().await;
        loop {
            let head = self.snapshot().revision;
            let batch = self.store.revisions_after(head, SYNC_BATCH).await?;
            let fetched = batch.len() as u64;
            for record in batch {
                let record = Arc::new(record);
                {
                    let mut view = self.view.write().map_err(|_| poisoned())?;
                    let mut next = Snapshot::clone(&view);
                    next.revision = record.revision;
                    next.scopes.insert(
                        record.scope.clone(),
                        ScopeState {
                            revision: record.revision,
                            values: record.values.clone(),
                        },
                    );
                    *view = Arc::new(next);
                }
                metrics::gauge!("agentmesh_config_head_revision").set(record.revision as f64);
                // No receivers is fine: nobody is watching.
                let _ = self.changes.send(record);
            }
            if fetched < SYNC_BATCH {
                return Ok(());
            }
        }
    }

    /// The current view of every scope.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.view.read() {
            Ok(view) => Arc::clone(&view),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// One scope's own values (empty with revision 0 if never written) and
    /// the head revision.
    pub fn get(&self, scope: &Scope) -> (ScopeState, u64) {
        let view = self.snapshot();
        (
            view.scopes.get(scope).cloned().unwrap_or_default(),
            view.revision,
        )
    }

    /// Merged settings global < agent < project, each value's source, and
    /// the head revision.
    pub fn effective(
        &self,
        agent_type: Option<&str>,
        project_id: Option<&str>,
    ) -> (Values, Vec<Source>, u64) {
        let view = self.snapshot();
        let (values, sources) = live::merge_for(agent_type, project_id, |scope| {
            view.scopes
                .get(scope)
                .map(|state| (state.revision, &state.values))
        });
        (values, sources, view.revision)
    }

    /// Validates and writes an update; a change that alters nothing writes
    /// no revision and returns the scope's current one.
    pub async fn update(&self, command: UpdateCommand) -> Result<RevisionRecord, ConfigError> {
        let UpdateCommand {
            scope,
            set,
            clear,
            expected_revision,
            author,
            reason,
        } = command;
        self.write(
            &scope,
            expected_revision,
            ChangeKind::Update,
            None,
            &author,
            &reason,
            |current| {
                let mut next = current.clone();
                next.overlay(&set);
                for path in &clear {
                    next.remove(path);
                }
                next
            },
        )
        .await
    }

    /// Restores the values a scope had at `command.revision` as a new revision.
    pub async fn rollback(&self, command: RollbackCommand) -> Result<RevisionRecord, ConfigError> {
        let target = self
            .store
            .get(command.revision)
            .await?
            .ok_or(ConfigError::RevisionNotFound(command.revision))?;
        self.write(
            &target.scope,
            command.expected_revision,
            ChangeKind::Rollback,
            Some(target.revision),
            &command.author,
            &command.reason,
            |_| target.values.clone(),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        scope: &Scope,
        expected_revision: Option<u64>,
        kind: ChangeKind,
        rollback_of: Option<u64>,
        author: &str,
        reason: &str,
        change: impl FnOnce(&Values) -> Values,
    ) -> Result<RevisionRecord, ConfigError> {
        let _write = self.write_lock.lock().await;
        let transaction = self.store.begin_write().await?;
        let current = self.store.latest_of_scope(&transaction, scope).await?;
        let current_revision = current.as_ref().map_or(0, |record| record.revision);
        if let Some(expected) = expected_revision
            && expected != current_revision
        {
            return Err(ConfigError::RevisionConflict {
                scope: scope.to_string(),
                expected,
                current: current_revision,
            });
        }
        let current_values = current
            .as_ref()
            .map(|record| record.values.clone())
            .unwrap_or_default();
        let next_values = change(&current_values);
        let violations = next_values.validate();
        if !violations.is_empty() {
            // Only reachable through a rollback to values that today's rules
            // reject; updates are validated before they get here.
            return Err(ConfigError::Invalid(
                violations
                    .into_iter()
                    .map(|v| FieldViolation::new(format!("settings.{}", v.field), v.value, v.rule))
                    .collect(),
            ));
        }
        let changed_fields: Vec<String> = live::FIELDS
            .iter()
            .filter(|spec| current_values.get(spec.path) != next_values.get(spec.path))
            .map(|spec| spec.path.to_owned())
            .collect();
        if changed_fields.is_empty()
            && let Some(current) = current
        {
            transaction.commit().await?;
            return Ok(current);
        }
        let revision = self
            .store
            .insert(
                &transaction,
                NewRevision {
                    scope,
                    values: &next_values,
                    changed_fields: &changed_fields,
                    kind,
                    rollback_of,
                    author,
                    reason,
                },
            )
            .await?;
        transaction.commit().await?;
        metrics::counter!("agentmesh_config_revisions_total", "kind" => kind_label(kind))
            .increment(1);
        tracing::info!(revision, scope = %scope, author, changed = ?changed_fields, "config revision written");
        // Make the write visible to reads and watchers before answering.
        if let Err(error) = self.sync().await {
            tracing::warn!(%error, "revision written but view not refreshed; the poller will retry");
        }
        Ok(RevisionRecord {
            revision,
            scope: scope.clone(),
            values: next_values,
            changed_fields,
            kind,
            rollback_of,
            author: author.to_owned(),
            reason: reason.to_owned(),
            created_at: chrono::Utc::now(),
        })
    }

    /// A page of history, newest first: revisions before `before`
    /// (exclusive), at most `limit`.
    pub async fn history(
        &self,
        scope: Option<&Scope>,
        before: Option<u64>,
        limit: u64,
    ) -> Result<Vec<RevisionRecord>, ConfigError> {
        self.store.history(scope, before, limit).await
    }

    /// Starts a watch: a snapshot (or, when resuming from a recent
    /// `from_revision`, the revisions after it), then every change in order.
    /// A watcher that falls behind gets a fresh snapshot; writers never wait
    /// for watchers.
    pub async fn watch(
        self: &Arc<Self>,
        from_revision: u64,
    ) -> Result<mpsc::Receiver<Result<WatchEvent, ConfigError>>, ConfigError> {
        if self.shutdown.is_cancelled() {
            return Err(ConfigError::ShuttingDown);
        }
        let permit = Arc::clone(&self.watchers)
            .try_acquire_owned()
            .map_err(|_| ConfigError::TooManyWatchers(self.max_watchers))?;
        // Subscribe before reading the state, so nothing falls in between.
        let changes = self.changes.subscribe();
        let head = self.snapshot().revision;
        let replay = if from_revision > 0 && from_revision <= head {
            let records = self
                .store
                .revisions_after(from_revision, REPLAY_LIMIT + 1)
                .await?;
            (records.len() as u64 <= REPLAY_LIMIT).then_some(records)
        } else {
            None
        };
        let (sender, receiver) = mpsc::channel(WATCHER_QUEUE);
        tokio::spawn(Arc::clone(self).feed_watcher(sender, changes, from_revision, replay, permit));
        Ok(receiver)
    }

    async fn feed_watcher(
        self: Arc<Self>,
        sender: mpsc::Sender<Result<WatchEvent, ConfigError>>,
        mut changes: broadcast::Receiver<Arc<RevisionRecord>>,
        from_revision: u64,
        replay: Option<Vec<RevisionRecord>>,
        _permit: OwnedSemaphorePermit,
    ) {
        let watchers = metrics::gauge!("agentmesh_config_watchers");
        watchers.increment(1.0);
        let mut last_sent = match replay {
            Some(records) => {
                let mut last = from_revision;
                for record in records {
                    last = record.revision;
                    if !self
                        .send(&sender, Ok(WatchEvent::Change(Arc::new(record))))
                        .await
                    {
                        watchers.decrement(1.0);
                        return;
                    }
                }
                last
            }
            None => match self.send_snapshot(&sender, false).await {
                Some(revision) => revision,
                None => {
                    watchers.decrement(1.0);
                    return;
                }
            },
        };
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => {
                    let _ = sender.try_send(Err(ConfigError::ShuttingDown));
                    break;
                }
                _ = sender.closed() => break,
                event = changes.recv() => event,
            };
            match event {
                Ok(record) if record.revision > last_sent => {
                    last_sent = record.revision;
                    if !self.send(&sender, Ok(WatchEvent::Change(record))).await {
                        break;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!("agentmesh_config_watch_resyncs_total").increment(1);
                    tracing::debug!(missed, "watcher fell behind, resynchronising");
                    match self.send_snapshot(&sender, true).await {
                        Some(revision) => last_sent = revision,
                        None => break,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        watchers.decrement(1.0);
    }

    async fn send_snapshot(
        &self,
        sender: &mpsc::Sender<Result<WatchEvent, ConfigError>>,
        resync: bool,
    ) -> Option<u64> {
        let snapshot = self.snapshot();
        let revision = snapshot.revision;
        self.send(sender, Ok(WatchEvent::Snapshot { snapshot, resync }))
            .await
            .then_some(revision)
    }

    /// Sends one event; false when the watcher is gone or we are stopping.
    async fn send(
        &self,
        sender: &mpsc::Sender<Result<WatchEvent, ConfigError>>,
        event: Result<WatchEvent, ConfigError>,
    ) -> bool {
        tokio::select! {
            sent = sender.send(event) => sent.is_ok(),
            _ = self.shutdown.cancelled() => false,
        }
    }
}

fn kind_label(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Seed => "seed",
        ChangeKind::Update => "update",
        ChangeKind::Rollback => "rollback",
    }
}

fn poisoned() -> ConfigError {
    ConfigError::Corrupt("the in-memory view lock was poisoned by a panic".to_owned())
}
