//! Token budgets per project: the live settings `budget.tokens_per_day` and
//! `budget.tokens_per_month` (usually set in the config scope
//! `project/<id>`; 0 is unlimited), enforced on every task before it runs,
//! and the usage they are checked against, counted after every execution
//! (prompt + completion tokens from its response) and shared by every
//! gateway replica through one store: Redis when `redis_url` is set
//! (`INCRBY` on keys named after the period, with `EXPIRE`), the gateway's
//! database otherwise (an atomic upsert per project and period).
//!
//! Counting stays off the request path: each gateway adds usage to an
//! in-memory pending count, written to the store every
//! `gateway.budget.flush_interval_ms`; a budget check adds this gateway's
//! pending count to the store's value, read at most every
//! `gateway.budget.usage_cache_ms`. Another replica's usage therefore
//! counts here within about flush interval + cache time (0.7 s by default).
//!
//! When the store is unreachable the gateway allows and logs: it keeps
//! counting locally (pending counts are retried, not lost, while the
//! process lives) and checks budgets against the last value it read plus
//! its own usage. A budget is a cost control, not a security boundary, so
//! an outage of the counter store must not become an outage of the
//! gateway; and counting into a second store (the database) while Redis is
//! down would leave two partial counts to add up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use agentmesh_client::ConfigWatcher;
use agentmesh_db::Database;
use agentmesh_proto::common::TokenUsage;
use agentmesh_settings::Settings;
use chrono::{DateTime, Datelike, NaiveDate, SecondsFormat, Utc};
use redis::aio::MultiplexedConnection;
use sea_orm::ActiveValue;
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::GatewayError;

/// How long usage rows of past periods are kept in the database.
const USAGE_ROW_RETENTION: Duration = Duration::from_secs(40 * 24 * 3600);
/// How often old usage rows are deleted.
const CLEANUP_EVERY: Duration = Duration::from_secs(3600);
/// How long a Redis key outlives its period (so a late flush still lands
/// in a key that expires).
const KEY_GRACE_SECONDS: u64 = 24 * 3600;

/// Which budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Period {
    /// The UTC day.
    Day,
    /// The UTC calendar month.
    Month,
}

impl Period {
    /// `day` or `month` (as in `budget.tokens_per_<period>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// `daily` or `monthly`.
    pub fn adjective(self) -> &'static str {
        match self {
            Period::Day => "daily",
            Period::Month => "monthly",
        }
    }
}

/// The current day and month and when each ends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Periods {
    /// `2026-11-27`.
    pub day: String,
    /// `2026-11`.
    pub month: String,
    /// The next UTC midnight.
    pub day_resets_at: SystemTime,
    /// The first instant of the next UTC month.
    pub month_resets_at: SystemTime,
}

impl Periods {
    /// The periods containing `now`.
    pub fn at(now: DateTime<Utc>) -> Self {
        let today = now.date_naive();
        let tomorrow = today.succ_opt().unwrap_or(today);
        let (year, month) = if today.month() == 12 {
            (today.year() + 1, 1)
        } else {
            (today.year(), today.month() + 1)
        };
        let next_month = NaiveDate::from_ymd_opt(year, month, 1).unwrap_or(tomorrow);
        let midnight = |date: NaiveDate| -> SystemTime {
            date.and_hms_opt(0, 0, 0)
                .map(|time| SystemTime::from(time.and_utc()))
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        Self {
            day: today.format("%Y-%m-%d").to_string(),
            month: today.format("%Y-%m").to_string(),
            day_resets_at: midnight(tomorrow),
            month_resets_at: midnight(next_month),
        }
    }

    /// The periods containing this instant.
    pub fn now() -> Self {
        Self::at(Utc::now())
    }
}

/// A time as RFC 3339 (UTC, seconds).
pub fn rfc3339(time: SystemTime) -> String {
    DateTime::<Utc>::from(time).to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Microseconds since the epoch as RFC 3339 (UTC, seconds).
pub fn rfc3339_micros(micros: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(micros)
        .map(|time| time.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| micros.to_string())
}

/// A project's usage and budgets now.
#[derive(Clone, Debug)]
pub struct ProjectUsage {
    /// The periods.
    pub periods: Periods,
    /// Tokens counted today.
    pub day_used: u64,
    /// Tokens counted this month.
    pub month_used: u64,
    /// `budget.tokens_per_day`; 0 is unlimited.
    pub day_limit: u64,
    /// `budget.tokens_per_month`; 0 is unlimited.
    pub month_limit: u64,
}

/// The `gateway_token_usage` entity.
pub mod usage {
    use sea_orm::entity::prelude::*;

    /// Tokens of one project in one period.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "gateway_token_usage")]
    pub struct Model {
        /// Project.
        #[sea_orm(primary_key, auto_increment = false)]
        pub project_id: String,
        /// `d:<day>` or `m:<month>`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub period: String,
        /// Tokens counted.
        pub tokens: i64,
        /// Last change, microseconds since the epoch.
        pub updated_at_micros: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Where usage is counted.
enum UsageStore {
    Redis(Box<RedisUsage>),
    Database(Database),
}

/// Usage counters in Redis, one multiplexed connection re-opened after a
/// failure.
struct RedisUsage {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    prefix: String,
}

impl RedisUsage {
    async fn connection(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection = self.client.get_multiplexed_async_connection().await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    async fn forget_connection(&self) {
        *self.connection.lock().await = None;
    }

    fn keys(&self, project: &str, periods: &Periods) -> (String, String) {
        (
            format!("{}d:{}:{project}", self.prefix, periods.day),
            format!("{}m:{}:{project}", self.prefix, periods.month),
        )
    }

    async fn add(&self, project: &str, periods: &Periods, tokens: u64) -> Result<(), String> {
        let (day_key, month_key) = self.keys(project, periods);
        let ttl = |resets_at: SystemTime| {
            resets_at
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .as_secs()
                + KEY_GRACE_SECONDS
        };
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("INCRBY")
            .arg(&day_key)
            .arg(tokens)
            .ignore()
            .cmd("EXPIRE")
            .arg(&day_key)
            .arg(ttl(periods.day_resets_at))
            .ignore()
            .cmd("INCRBY")
            .arg(&month_key)
            .arg(tokens)
            .ignore()
            .cmd("EXPIRE")
            .arg(&month_key)
            .arg(ttl(periods.month_resets_at))
            .ignore();
        let result = async {
            let mut connection = self.connection().await?;
            pipe.query_async::<()>(&mut connection).await
        }
        .await;
        if let Err(error) = result {
            self.forget_connection().await;
            return Err(format!("redis: {error}"));
        }
        Ok(())
    }

    async fn read(&self, project: &str, periods: &Periods) -> Result<(u64, u64), String> {
        let (day_key, month_key) = self.keys(project, periods);
        let result = async {
            let mut connection = self.connection().await?;
            redis::cmd("MGET")
                .arg(&day_key)
                .arg(&month_key)
                .query_async::<(Option<u64>, Option<u64>)>(&mut connection)
                .await
        }
        .await;
        match result {
            Ok((day, month)) => Ok((day.unwrap_or(0), month.unwrap_or(0))),
            Err(error) => {
                self.forget_connection().await;
                Err(format!("redis: {error}"))
            }
        }
    }
}

impl UsageStore {
    fn name(&self) -> &'static str {
        match self {
            UsageStore::Redis(_) => "redis",
            UsageStore::Database(_) => "database",
        }
    }

    async fn add(&self, project: &str, periods: &Periods, tokens: u64) -> Result<(), String> {
        match self {
            UsageStore::Redis(redis) => redis.add(project, periods, tokens).await,
            UsageStore::Database(database) => db_add(database, project, periods, tokens)
                .await
                .map_err(|error| format!("database: {error}")),
        }
    }

    async fn read(&self, project: &str, periods: &Periods) -> Result<(u64, u64), String> {
        match self {
            UsageStore::Redis(redis) => redis.read(project, periods).await,
            UsageStore::Database(database) => db_read(database, project, periods)
                .await
                .map_err(|error| format!("database: {error}")),
        }
    }

    async fn cleanup(&self) -> Result<u64, String> {
        let UsageStore::Database(database) = self else {
            return Ok(0);
        };
        let cutoff = Utc::now().timestamp_micros()
            - i64::try_from(USAGE_ROW_RETENTION.as_micros()).unwrap_or(i64::MAX);
        usage::Entity::delete_many()
            .filter(usage::Column::UpdatedAtMicros.lt(cutoff))
            .exec(database.writer())
            .await
            .map(|result| result.rows_affected)
            .map_err(|error| format!("database: {error}"))
    }
}

async fn db_add(
    database: &Database,
    project: &str,
    periods: &Periods,
    tokens: u64,
) -> Result<(), sea_orm::DbErr> {
    let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
    let now = Utc::now().timestamp_micros();
    // Both rows or neither, so a retried flush never counts one twice.
    let transaction = database.begin_write().await?;
    for period in [format!("d:{}", periods.day), format!("m:{}", periods.month)] {
        let row = usage::ActiveModel {
            project_id: ActiveValue::Set(project.to_owned()),
            period: ActiveValue::Set(period),
            tokens: ActiveValue::Set(tokens),
            updated_at_micros: ActiveValue::Set(now),
        };
        usage::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([usage::Column::ProjectId, usage::Column::Period])
                    .value(
                        usage::Column::Tokens,
                        Expr::col((usage::Entity, usage::Column::Tokens)).add(tokens),
                    )
                    .update_column(usage::Column::UpdatedAtMicros)
                    .to_owned(),
            )
            .exec_without_returning(&transaction)
            .await?;
    }
    transaction.commit().await
}

async fn db_read(
    database: &Database,
    project: &str,
    periods: &Periods,
) -> Result<(u64, u64), sea_orm::DbErr> {
    let day = format!("d:{}", periods.day);
    let month = format!("m:{}", periods.month);
    let rows = usage::Entity::find()
        .filter(usage::Column::ProjectId.eq(project))
        .filter(usage::Column::Period.is_in([day.clone(), month.clone()]))
        .all(database.writer())
        .await?;
    let tokens_of = |period: &str| {
        rows.iter()
            .find(|row| row.period == period)
            .map_or(0, |row| u64::try_from(row.tokens).unwrap_or(0))
    };
    Ok((tokens_of(&day), tokens_of(&month)))
}

/// Usage not yet written, per project and periods.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PendingKey {
    project: String,
    periods: Periods,
}

/// The store's usage of a project as last read.
struct Cached {
    periods: Periods,
    day: u64,
    month: u64,
    read_at: Instant,
}

/// Budgets and usage counting.
pub struct Budgets {
    watcher: ConfigWatcher,
    store: UsageStore,
    timeout: Duration,
    cache_for: Duration,
    pending: Mutex<HashMap<PendingKey, u64>>,
    cache: Mutex<HashMap<String, Cached>>,
    store_failing: std::sync::atomic::AtomicBool,
    flusher: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
}

impl std::fmt::Debug for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgets")
            .field("store", &self.store.name())
            .finish_non_exhaustive()
    }
}

impl Budgets {
    /// Counts in Redis when `redis_url` is set, else in `database`, and
    /// starts the flusher (stopped by [`Budgets::close`]).
    pub fn start(
        settings: &Settings,
        database: Database,
        watcher: ConfigWatcher,
    ) -> Result<Arc<Self>, GatewayError> {
        let budget = &settings.gateway.budget;
        let store = match &settings.redis_url {
            Some(url) => UsageStore::Redis(Box::new(RedisUsage {
                client: redis::Client::open(url.as_str())
                    .map_err(|error| GatewayError::UsageStore(format!("redis: {error}")))?,
                connection: tokio::sync::Mutex::new(None),
                prefix: budget.redis_key_prefix.clone(),
            })),
            None => UsageStore::Database(database),
        };
        tracing::info!(
            store = store.name(),
            "token usage counted in the {}",
            store.name()
        );
        let budgets = Arc::new(Self {
            watcher,
            store,
            timeout: Duration::from_millis(budget.store_timeout_ms),
            cache_for: Duration::from_millis(budget.usage_cache_ms),
            pending: Mutex::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            store_failing: std::sync::atomic::AtomicBool::new(false),
            flusher: Mutex::new(None),
        });
        let stop = CancellationToken::new();
        let handle = tokio::spawn(flush_loop(
            Arc::clone(&budgets),
            Duration::from_millis(budget.flush_interval_ms),
            stop.clone(),
        ));
        *budgets
            .flusher
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((stop, handle));
        Ok(budgets)
    }

    /// Where usage is counted: `redis` or `database`.
    pub fn store_name(&self) -> &'static str {
        self.store.name()
    }

    /// Refuses a task of `project` whose daily or monthly budget is used
    /// up; projects without a budget are never read.
    pub async fn admit(&self, project: &str) -> Result<(), GatewayError> {
        if project.is_empty() {
            return Ok(());
        }
        let budget = self.watcher.effective(None, Some(project)).budget;
        let day_limit = u64::try_from(budget.tokens_per_day).unwrap_or(0);
        let month_limit = u64::try_from(budget.tokens_per_month).unwrap_or(0);
        if day_limit == 0 && month_limit == 0 {
            return Ok(());
        }
        let periods = Periods::now();
        let (day_used, month_used) = self.used(project, &periods, true).await;
        let refuse = |period: Period, limit: u64, used: u64, resets_at: SystemTime| {
            metrics::counter!("agentmesh_gateway_budget_refusals_total", "period" => period.as_str())
                .increment(1);
            Err(GatewayError::BudgetExhausted {
                project: project.to_owned(),
                period,
                limit,
                used,
                resets_at,
            })
        };
        if day_limit > 0 && day_used >= day_limit {
            return refuse(Period::Day, day_limit, day_used, periods.day_resets_at);
        }
        if month_limit > 0 && month_used >= month_limit {
            return refuse(
                Period::Month,
                month_limit,
                month_used,
                periods.month_resets_at,
            );
        }
        Ok(())
    }

    /// Counts the tokens of one finished execution of `project`.
    pub fn record(&self, project: &str, usage: Option<&TokenUsage>) {
        let Some(usage) = usage else { return };
        let count = |tokens: i64| u64::try_from(tokens).unwrap_or(0);
        let tokens = if usage.total_tokens > 0 {
            count(usage.total_tokens)
        } else {
            count(usage.prompt_tokens) + count(usage.completion_tokens)
        };
        if project.is_empty() || tokens == 0 {
            return;
        }
        metrics::counter!("agentmesh_gateway_tokens_total").increment(tokens);
        let key = PendingKey {
            project: project.to_owned(),
            periods: Periods::now(),
        };
        *self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert(0) += tokens;
    }

    /// A project's usage, read from the store now (plus this gateway's
    /// unwritten usage), and its budgets.
    pub async fn project_usage(&self, project: &str) -> Result<ProjectUsage, GatewayError> {
        let periods = Periods::now();
        let (day, month) = tokio::time::timeout(self.timeout, self.store.read(project, &periods))
            .await
            .unwrap_or_else(|_| Err(format!("{} did not answer in time", self.store.name())))
            .map_err(GatewayError::UsageStore)?;
        let (pending_day, pending_month) = self.pending_of(project, &periods);
        let budget = self.watcher.effective(None, Some(project)).budget;
        Ok(ProjectUsage {
            day_used: day + pending_day,
            month_used: month + pending_month,
            day_limit: u64::try_from(budget.tokens_per_day).unwrap_or(0),
            month_limit: u64::try_from(budget.tokens_per_month).unwrap_or(0),
            periods,
        })
    }

    /// Usage as budget checks see it: the store's (cached for
    /// `usage_cache_ms`, or the last value read while the store fails)
    /// plus this gateway's pending usage.
    async fn used(&self, project: &str, periods: &Periods, cached: bool) -> (u64, u64) {
        let fresh = |entry: &Cached| {
            entry.periods == *periods && (cached && entry.read_at.elapsed() < self.cache_for)
        };
        let hit = {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            cache
                .get(project)
                .filter(|entry| fresh(entry))
                .map(|entry| (entry.day, entry.month))
        };
        let (day, month) = match hit {
            Some(values) => values,
            None => {
                let read =
                    tokio::time::timeout(self.timeout, self.store.read(project, periods)).await;
                match read.unwrap_or_else(|_| {
                    Err(format!("{} did not answer in time", self.store.name()))
                }) {
                    Ok((day, month)) => {
                        self.store_recovered();
                        self.cache
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(
                                project.to_owned(),
                                Cached {
                                    periods: periods.clone(),
                                    day,
                                    month,
                                    read_at: Instant::now(),
                                },
                            );
                        (day, month)
                    }
                    Err(error) => {
                        self.store_failed(&error);
                        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
                        cache
                            .get(project)
                            .filter(|entry| entry.periods == *periods)
                            .map_or((0, 0), |entry| (entry.day, entry.month))
                    }
                }
            }
        };
        let (pending_day, pending_month) = self.pending_of(project, periods);
        (day + pending_day, month + pending_month)
    }

    fn pending_of(&self, project: &str, periods: &Periods) -> (u64, u64) {
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let mut day = 0;
        let mut month = 0;
        for (key, tokens) in pending.iter() {
            if key.project != project {
                continue;
            }
            if key.periods.day == periods.day {
                day += tokens;
            }
            if key.periods.month == periods.month {
                month += tokens;
            }
        }
        (day, month)
    }

    fn store_failed(&self, error: &str) {
        metrics::counter!("agentmesh_gateway_usage_store_failures_total").increment(1);
        if !self
            .store_failing
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            tracing::warn!(
                store = self.store.name(),
                error,
                "token usage store unreachable: budgets are checked against the last usage read plus this gateway's own, and counts are kept to write later"
            );
        }
    }

    fn store_recovered(&self) {
        if self
            .store_failing
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            tracing::info!(
                store = self.store.name(),
                "token usage store reachable again"
            );
        }
    }

    /// Writes pending usage to the store; what fails stays pending.
    pub async fn flush(&self) {
        let batch: Vec<(PendingKey, u64)> = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(key, tokens)| (key.clone(), *tokens))
            .collect();
        for (key, tokens) in batch {
            let written = tokio::time::timeout(
                self.timeout,
                self.store.add(&key.project, &key.periods, tokens),
            )
            .await
            .unwrap_or_else(|_| Err(format!("{} did not answer in time", self.store.name())));
            if let Err(error) = written {
                self.store_failed(&error);
                // The store is down: the rest would wait for it too.
                return;
            }
            self.store_recovered();
            {
                let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(left) = pending.get_mut(&key) {
                    *left = left.saturating_sub(tokens);
                    if *left == 0 {
                        pending.remove(&key);
                    }
                }
            }
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = cache.get_mut(&key.project)
                && entry.periods == key.periods
            {
                entry.day += tokens;
                entry.month += tokens;
            }
        }
    }

    /// Stops the flusher after a last flush.
    pub async fn close(&self) {
        let flusher = self
            .flusher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((stop, handle)) = flusher {
            stop.cancel();
            let _ = handle.await;
        }
    }
}

async fn flush_loop(budgets: Arc<Budgets>, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_cleanup: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                budgets.flush().await;
                return;
            }
            _ = tick.tick() => {}
        }
        budgets.flush().await;
        if last_cleanup.is_none_or(|at| at.elapsed() >= CLEANUP_EVERY) {
            last_cleanup = Some(Instant::now());
            match budgets.store.cleanup().await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "old token usage rows removed"),
                Err(error) => tracing::warn!(error, "cannot remove old token usage rows"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_roll_over_at_utc_midnight_and_month_ends() {
        let at = |text: &str| DateTime::parse_from_rfc3339(text).unwrap().to_utc();
        let periods = Periods::at(at("2026-12-31T23:59:59Z"));
        assert_eq!(periods.day, "2026-12-31");
        assert_eq!(periods.month, "2026-12");
        assert_eq!(rfc3339(periods.day_resets_at), "2027-01-01T00:00:00Z");
        assert_eq!(rfc3339(periods.month_resets_at), "2027-01-01T00:00:00Z");
        let periods = Periods::at(at("2028-02-28T10:00:00Z"));
        assert_eq!(rfc3339(periods.day_resets_at), "2028-02-29T00:00:00Z");
        assert_eq!(rfc3339(periods.month_resets_at), "2028-03-01T00:00:00Z");
        assert_eq!(rfc3339_micros(1_000_000), "1970-01-01T00:00:01Z");
    }
}
