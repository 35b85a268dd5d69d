//! L2: Redis through a bb8-redis pool, every operation bounded by
//! `cache.redis_timeout_ms` and run through a circuit breaker, so a dead or
//! slow Redis costs callers at most one timeout until the breaker opens and
//! then nothing at all.
//!
//! Layout under `cache.key_prefix` (P): entries `P e:<ns>:<key>` (encoded
//! [`Entry`] with PX TTL), tag sets `P t:<ns>:<tag>` (the entry keys written
//! with the tag, expiring with their longest-lived member), leases
//! `P l:<ns>:<key>` (token, PX lease timeout) and the invalidation channel
//! `P inval`. One Redis (or a primary with replicas); not Redis Cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentmesh_resilience::{Breaker, BreakerConfig, BreakerError, BreakerState, CircuitBreaker};
use agentmesh_settings::CacheServiceSettings;
use bb8_redis::RedisConnectionManager;
use bb8_redis::bb8::{self, ManageConnection};
use bb8_redis::redis::aio::MultiplexedConnection;
use bb8_redis::redis::{self, RedisError, Script};

use crate::entry::{Entry, Found};

/// Why an L2 operation did not complete. Callers treat every kind as "L2
/// unavailable": a read becomes a miss, a write stays in L1.
#[derive(Debug, thiserror::Error)]
pub enum L2Error {
    /// The breaker is open; Redis was not called.
    #[error("redis breaker is open")]
    BreakerOpen,
    /// No answer within `cache.redis_timeout_ms`.
    #[error("redis did not answer in time")]
    Timeout,
    /// No pooled connection could be made.
    #[error("cannot connect to redis: {0}")]
    Connect(String),
    /// Redis answered with an error or the connection failed.
    #[error("redis error: {0}")]
    Redis(#[from] RedisError),
}

/// A pooled multiplexed connection that remembers whether it failed, so
/// the pool drops it instead of handing it out again.
pub struct PooledRedis {
    connection: MultiplexedConnection,
    broken: bool,
}

/// bb8-redis's manager, with broken connections evicted on return (bb8-redis
/// alone never reports a connection as broken, and testing each one on
/// checkout would cost a PING per command).
pub struct Manager(RedisConnectionManager);

impl ManageConnection for Manager {
    type Connection = PooledRedis;
    type Error = RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        Ok(PooledRedis {
            connection: self.0.connect().await?,
            broken: false,
        })
    }

    async fn is_valid(&self, connection: &mut Self::Connection) -> Result<(), Self::Error> {
        self.0.is_valid(&mut connection.connection).await
    }

    fn has_broken(&self, connection: &mut Self::Connection) -> bool {
        connection.broken
    }
}

/// Writes an entry, its tag memberships and, with a lease token, completes
/// the lease only if it is still held with that token.
/// KEYS: entry, lease, tag sets…; ARGV: blob, ttl ms, lease token or "".
const SET_SCRIPT: &str = r"
if ARGV[3] ~= '' then
  if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
  redis.call('DEL', KEYS[2])
end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return 1
";

/// Deletes a lease only if it still holds the given token.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// The Redis level.
pub struct L2 {
    pool: bb8::Pool<Manager>,
    client: redis::Client,
    breaker: CircuitBreaker,
    timeout: Duration,
    prefix: String,
    batch: u32,
    set_script: Script,
    release_script: Script,
}

/// Numeric form of a breaker state for the metrics gauge.
pub fn breaker_gauge_value(state: BreakerState) -> f64 {
    match state {
        BreakerState::Closed => 0.0,
        BreakerState::Open => 1.0,
        BreakerState::HalfOpen => 2.0,
    }
}

/// Escapes glob metacharacters for SCAN MATCH.
fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn is_connection_failure(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
        || error.is_timeout()
}

impl L2 {
    /// A pool to `url` that connects on first use (start-up never waits for
    /// Redis). `on_breaker` hears every breaker transition.
    pub fn new(
        url: &str,
        settings: &CacheServiceSettings,
        on_breaker: impl Fn(BreakerState) + Send + Sync + 'static,
    ) -> Result<Self, RedisError> {
        let timeout = Duration::from_millis(settings.redis_timeout_ms);
        let manager = Manager(RedisConnectionManager::new(url)?);
        let pool = bb8::Pool::builder()
            .max_size(settings.pool_size)
            .connection_timeout(timeout)
            .test_on_check_out(false)
            .build_unchecked(manager);
        let breaker = CircuitBreaker::with_transition_hook(
            BreakerConfig {
                failure_threshold: settings.breaker_failure_threshold,
                reset_timeout: Duration::from_millis(settings.breaker_reset_ms),
                ..BreakerConfig::default()
            },
            on_breaker,
        );
        Ok(Self {
            pool,
            client: redis::Client::open(url)?,
            breaker,
            timeout,
            prefix: settings.key_prefix.clone(),
            batch: settings.invalidate_batch,
            set_script: Script::new(SET_SCRIPT),
            release_script: Script::new(RELEASE_SCRIPT),
        })
    }

    /// The breaker's current state.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Whether a call may be attempted now (moves an open breaker whose
    /// reset timeout passed to half-open).
    pub fn is_call_permitted(&self) -> bool {
        self.breaker.is_call_permitted()
    }

    /// A client for dedicated (pub/sub) connections.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The pub/sub channel for invalidations.
    pub fn channel(&self) -> String {
        format!("{}inval", self.prefix)
    }

    fn entry_key(&self, namespace: &str, key: &str) -> String {
        format!("{}e:{namespace}:{key}", self.prefix)
    }

    fn tag_key(&self, namespace: &str, tag: &str) -> String {
        format!("{}t:{namespace}:{tag}", self.prefix)
    }

    fn lease_key(&self, namespace: &str, key: &str) -> String {
        format!("{}l:{namespace}:{key}", self.prefix)
    }

    /// Runs one Redis operation on a pooled connection, bounded by the
    /// timeout and guarded by the breaker; records latency and failures.
    async fn run<T, F, Fut>(&self, op: &'static str, operation: F) -> Result<T, L2Error>
    where
        F: FnOnce(MultiplexedConnection) -> Fut + Send,
        Fut: Future<Output = Result<T, RedisError>> + Send,
        T: Send,
    {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let attempt = async {
            let mut pooled = match tokio::time::timeout_at(deadline, self.pool.get()).await {
                Ok(Ok(pooled)) => pooled,
                Ok(Err(error)) => return Err(L2Error::Connect(error.to_string())),
                Err(_) => return Err(L2Error::Timeout),
            };
            let connection = pooled.connection.clone();
            match tokio::time::timeout_at(deadline, operation(connection)).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(error)) => {
                    if is_connection_failure(&error) {
                        pooled.broken = true;
                    }
                    Err(L2Error::Redis(error))
                }
                Err(_) => {
                    // The connection may be stuck behind a dead peer.
                    pooled.broken = true;
                    Err(L2Error::Timeout)
                }
            }
        };
        let outcome = self.breaker.call(attempt).await;
        metrics::histogram!("agentmesh_cache_redis_seconds", "op" => op)
            .record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(value) => Ok(value),
            Err(BreakerError::Rejected) => Err(L2Error::BreakerOpen),
            Err(BreakerError::Inner(error)) => {
                metrics::counter!("agentmesh_cache_l2_errors_total", "op" => op).increment(1);
                tracing::debug!(op, %error, "redis operation failed");
                Err(error)
            }
        }
    }

    /// Reads an entry with its remaining TTL.
    pub async fn get(&self, namespace: &str, key: &str) -> Result<Option<Found>, L2Error> {
        let entry_key = self.entry_key(namespace, key);
        let (blob, pttl): (Option<Vec<u8>>, i64) = self
            .run("get", |mut connection| async move {
                redis::pipe()
                    .get(&entry_key)
                    .pttl(&entry_key)
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        let Some(blob) = blob else { return Ok(None) };
        if pttl <= 0 {
            return Ok(None);
        }
        match Entry::decode(&blob) {
            Ok(entry) => Ok(Some(Found {
                entry,
                remaining_ttl: Duration::from_millis(pttl.unsigned_abs()),
            })),
            Err(error) => {
                tracing::warn!(namespace, key, %error, "ignoring an undecodable redis entry");
                Ok(None)
            }
        }
    }

    /// Writes an entry for `ttl`; with `lease_token`, only if that lease is
    /// still held (returns false, writing nothing, otherwise).
    pub async fn set(
        &self,
        namespace: &str,
        key: &str,
        entry: &Entry,
        ttl: Duration,
        lease_token: Option<&str>,
    ) -> Result<bool, L2Error> {
        let mut invocation = self.set_script.prepare_invoke();
        invocation
            .key(self.entry_key(namespace, key))
            .key(self.lease_key(namespace, key));
        for tag in &entry.tags {
            invocation.key(self.tag_key(namespace, tag));
        }
        invocation
            .arg(entry.encode())
            .arg(ttl.as_millis().max(1) as u64)
            .arg(lease_token.unwrap_or_default());
        let written: i64 = self
            .run("set", |mut connection| async move {
                invocation.invoke_async(&mut connection).await
            })
            .await?;
        Ok(written == 1)
    }

    /// Removes one entry; returns whether it existed.
    pub async fn delete(&self, namespace: &str, key: &str) -> Result<bool, L2Error> {
        let entry_key = self.entry_key(namespace, key);
        let removed: i64 = self
            .run("delete", |mut connection| async move {
                redis::cmd("UNLINK")
                    .arg(&entry_key)
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        Ok(removed > 0)
    }

    async fn unlink(&self, keys: Vec<String>) -> Result<u64, L2Error> {
        if keys.is_empty() {
            return Ok(0);
        }
        let removed: u64 = self
            .run("unlink", |mut connection| async move {
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        Ok(removed)
    }

    /// Removes every entry of `namespace` whose key starts with `prefix`,
    /// `invalidate_batch` keys per SCAN + UNLINK round trip.
    pub async fn invalidate_prefix(&self, namespace: &str, prefix: &str) -> Result<u64, L2Error> {
        let pattern = format!("{}*", escape_glob(&self.entry_key(namespace, prefix)));
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let pattern = pattern.clone();
            let batch = self.batch;
            let (next, keys): (u64, Vec<String>) = self
                .run("scan", |mut connection| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(batch)
                        .query_async(&mut connection)
                        .await
                })
                .await?;
            removed += self.unlink(keys).await?;
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// Removes every entry of `namespace` written with `tag`, in batches of
    /// SSCAN + UNLINK, then the tag set itself.
    pub async fn invalidate_tag(&self, namespace: &str, tag: &str) -> Result<u64, L2Error> {
        let tag_key = self.tag_key(namespace, tag);
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let tag_key = tag_key.clone();
            let batch = self.batch;
            let (next, keys): (u64, Vec<String>) = self
                .run("sscan", |mut connection| async move {
                    redis::cmd("SSCAN")
                        .arg(&tag_key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(batch)
                        .query_async(&mut connection)
                        .await
                })
                .await?;
            removed += self.unlink(keys).await?;
            if next == 0 {
                break;
            }
            cursor = next;
        }
        self.unlink(vec![tag_key]).await?;
        Ok(removed)
    }

    /// Takes the lease on a key for `timeout` if nobody holds it.
    pub async fn try_lease(
        &self,
        namespace: &str,
        key: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<bool, L2Error> {
        let lease_key = self.lease_key(namespace, key);
        let token = token.to_owned();
        let reply: Option<String> = self
            .run("lease", |mut connection| async move {
                redis::cmd("SET")
                    .arg(&lease_key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(timeout.as_millis().max(1) as u64)
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        Ok(reply.is_some())
    }

    /// Gives a lease back if it is still held with `token`.
    pub async fn release_lease(
        &self,
        namespace: &str,
        key: &str,
        token: &str,
    ) -> Result<(), L2Error> {
        let mut invocation = self.release_script.prepare_invoke();
        invocation.key(self.lease_key(namespace, key)).arg(token);
        let _: i64 = self
            .run("release", |mut connection| async move {
                invocation.invoke_async(&mut connection).await
            })
            .await?;
        Ok(())
    }

    /// Publishes an invalidation message to every replica.
    pub async fn publish(&self, message: Vec<u8>) -> Result<(), L2Error> {
        let channel = self.channel();
        let _: i64 = self
            .run("publish", |mut connection| async move {
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(message)
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        Ok(())
    }

    /// A cheap round trip that lets the breaker close again after an outage.
    pub async fn ping(&self) -> Result<(), L2Error> {
        let _: String = self
            .run("ping", |mut connection| async move {
                redis::cmd("PING").query_async(&mut connection).await
            })
            .await?;
        Ok(())
    }

    /// Keys in the Redis database and bytes Redis uses, as it reports them.
    pub async fn usage(&self) -> Result<(u64, u64), L2Error> {
        let (keys, info): (u64, String) = self
            .run("info", |mut connection| async move {
                redis::pipe()
                    .cmd("DBSIZE")
                    .cmd("INFO")
                    .arg("memory")
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        let used_memory = info
            .lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
        Ok((keys, used_memory))
    }
}

/// Shared handle.
pub type SharedL2 = Arc<L2>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(escape_glob(r"a*b?[c]\d"), r"a\*b\?\[c\]\\d");
    }
}
