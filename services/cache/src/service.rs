//! The cache logic, free of tonic types: reads through L1 then L2, writes
//! to both, invalidations published to every replica, and leases that let
//! exactly one caller fill a missing key.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use agentmesh_resilience::BreakerState;
use tokio::sync::Notify;

use crate::coherence::Invalidation;
use crate::entry::{Entry, Found};
use crate::error::CacheError;
use crate::l1::{L1, l1_key};
use crate::l2::{L2, L2Error};

/// Which level answered a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// This replica's memory.
    L1,
    /// Redis.
    L2,
}

/// How this replica uses Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Mode {
    /// No Redis configured.
    Disabled,
    /// Redis reachable and invalidations subscribed.
    Connected,
    /// Redis configured but unavailable (breaker not closed, or the
    /// invalidation subscription is down).
    Degraded,
}

/// A `Set` to perform.
#[derive(Clone, Debug)]
pub struct SetCommand {
    /// Namespace.
    pub namespace: String,
    /// Key.
    pub key: String,
    /// What to store.
    pub entry: Entry,
    /// Time to live; the live default when `None`.
    pub ttl: Option<Duration>,
    /// Lease to complete.
    pub lease_token: Option<String>,
}

/// What a `Set` did.
#[derive(Clone, Copy, Debug)]
pub struct SetOutcome {
    /// TTL applied.
    pub ttl: Duration,
    /// Whether a lease was completed.
    pub lease_completed: bool,
}

/// Which entries an `Invalidate` removes.
#[derive(Clone, Debug)]
pub enum Selector {
    /// One key.
    Key(String),
    /// Keys starting with a prefix.
    Prefix(String),
    /// Entries carrying a tag.
    Tag(String),
}

/// The result of `GetOrLease`.
#[derive(Clone, Debug)]
pub enum LeaseResult {
    /// Present at once.
    Hit(Level, Found),
    /// The caller holds the lease.
    Granted {
        /// Token to pass to `Set`.
        token: String,
        /// Lease lifetime.
        timeout: Duration,
        /// Time spent waiting before the lease passed to this caller.
        waited: Duration,
    },
    /// Filled by another holder while waiting.
    Filled(Level, Found, Duration),
    /// Still leased after the wait.
    StillLeased(Duration),
}

/// Counters and state reported by `Stats`.
#[derive(Clone, Debug)]
pub struct StatsSnapshot {
    /// Replica id.
    pub node_id: String,
    /// Start time.
    pub started_at: SystemTime,
    /// L1 entries.
    pub l1_entries: u64,
    /// L1 weighted bytes.
    pub l1_bytes: u64,
    /// L1 hits.
    pub l1_hits: u64,
    /// L1 misses.
    pub l1_misses: u64,
    /// L2 hits.
    pub l2_hits: u64,
    /// L2 misses.
    pub l2_misses: u64,
    /// L2 failures.
    pub l2_errors: u64,
    /// Keys in Redis.
    pub l2_entries: Option<u64>,
    /// Bytes Redis uses.
    pub l2_bytes: Option<u64>,
    /// Use of L2.
    pub l2_mode: L2Mode,
    /// Breaker state (closed when L2 is disabled).
    pub breaker: BreakerState,
    /// Leases granted.
    pub leases_granted: u64,
    /// Calls that waited.
    pub lease_waits: u64,
    /// Waits that ended still leased.
    pub lease_wait_timeouts: u64,
}

#[derive(Default)]
struct Counters {
    l1_hits: AtomicU64,
    l1_misses: AtomicU64,
    l2_hits: AtomicU64,
    l2_misses: AtomicU64,
    l2_errors: AtomicU64,
    leases_granted: AtomicU64,
    lease_waits: AtomicU64,
    lease_wait_timeouts: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

const EPOCH_STRIPES: usize = 256;

/// Invalidation generations: an L2 read refills L1 only if no invalidation
/// of its key (or of everything) happened while it was in flight, so a
/// slow read cannot resurrect a value replaced meanwhile.
struct Epochs {
    all: AtomicU64,
    stripes: Vec<AtomicU64>,
}

impl Epochs {
    fn new() -> Self {
        Self {
            all: AtomicU64::new(0),
            stripes: (0..EPOCH_STRIPES).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn stripe(&self, namespace: &str, key: &str) -> &AtomicU64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        namespace.hash(&mut hasher);
        key.hash(&mut hasher);
        &self.stripes[(hasher.finish() as usize) % EPOCH_STRIPES]
    }

    fn snapshot(&self, namespace: &str, key: &str) -> (u64, u64) {
        (
            self.all.load(Ordering::Acquire),
            self.stripe(namespace, key).load(Ordering::Acquire),
        )
    }

    fn bump_key(&self, namespace: &str, key: &str) {
        self.stripe(namespace, key).fetch_add(1, Ordering::AcqRel);
    }

    fn bump_all(&self) {
        self.all.fetch_add(1, Ordering::AcqRel);
    }
}

/// Limits and defaults of the core.
#[derive(Clone, Copy, Debug)]
pub struct CoreLimits {
    /// Default lease lifetime.
    pub lease_timeout: Duration,
    /// Default wait for another holder.
    pub max_wait: Duration,
}

/// Interval at which waiting `GetOrLease` callers re-check Redis for a
/// fill by another replica or a lease that expired.
const LEASE_POLL: Duration = Duration::from_millis(100);

/// Source of the live default TTL.
pub type DefaultTtl = Arc<dyn Fn() -> Duration + Send + Sync>;

/// One cache replica.
pub struct CacheCore {
    node_id: String,
    started_at: SystemTime,
    l1: L1,
    l2: Option<Arc<L2>>,
    subscribed: AtomicBool,
    epochs: Epochs,
    fills: Notify,
    local_leases: Mutex<HashMap<String, (String, Instant)>>,
    counters: Counters,
    default_ttl: DefaultTtl,
    limits: CoreLimits,
}

impl CacheCore {
    /// A replica with `l1`, optional `l2`, and the live default TTL.
    pub fn new(l1: L1, l2: Option<Arc<L2>>, default_ttl: DefaultTtl, limits: CoreLimits) -> Self {
        Self {
            node_id: uuid::Uuid::new_v4().simple().to_string(),
            started_at: SystemTime::now(),
            l1,
            l2,
            subscribed: AtomicBool::new(false),
            epochs: Epochs::new(),
            fills: Notify::new(),
            local_leases: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            default_ttl,
            limits,
        }
    }

    /// This replica's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Default lease lifetime and wait.
    pub fn limits(&self) -> CoreLimits {
        self.limits
    }

    /// Current use of L2.
    pub fn l2_mode(&self) -> L2Mode {
        match &self.l2 {
            None => L2Mode::Disabled,
            Some(l2) => {
                if l2.breaker_state() == BreakerState::Closed
                    && self.subscribed.load(Ordering::Acquire)
                {
                    L2Mode::Connected
                } else {
                    L2Mode::Degraded
                }
            }
        }
    }

    /// L1 is trusted when there is no L2, when invalidations are
    /// subscribed, or when Redis is unreachable anyway (serve what we have).
    fn trust_l1(&self) -> bool {
        match &self.l2 {
            None => true,
            Some(l2) => {
                self.subscribed.load(Ordering::Acquire)
                    || l2.breaker_state() != BreakerState::Closed
            }
        }
    }

    fn record_l2_error(&self, error: &L2Error) {
        if !matches!(error, L2Error::BreakerOpen) {
            bump(&self.counters.l2_errors);
        }
    }

    /// Reads through L1 then L2, refilling L1 with the remaining L2 TTL.
    pub async fn get(&self, namespace: &str, key: &str) -> Option<(Level, Found)> {
        if self.trust_l1()
            && let Some(found) = self.l1.get(namespace, key).await
        {
            bump(&self.counters.l1_hits);
            metrics::counter!("agentmesh_cache_hits_total", "level" => "l1").increment(1);
            return Some((Level::L1, found));
        }
        bump(&self.counters.l1_misses);
        metrics::counter!("agentmesh_cache_misses_total", "level" => "l1").increment(1);
        let l2 = self.l2.as_ref()?;
        let epoch = self.epochs.snapshot(namespace, key);
        match l2.get(namespace, key).await {
            Ok(Some(found)) => {
                bump(&self.counters.l2_hits);
                metrics::counter!("agentmesh_cache_hits_total", "level" => "l2").increment(1);
                if self.epochs.snapshot(namespace, key) == epoch {
                    self.l1
                        .insert(namespace, key, found.entry.clone(), found.remaining_ttl)
                        .await;
                }
                Some((Level::L2, found))
            }
            Ok(None) => {
                bump(&self.counters.l2_misses);
                metrics::counter!("agentmesh_cache_misses_total", "level" => "l2").increment(1);
                None
            }
            Err(error) => {
                self.record_l2_error(&error);
                // Redis is failing: what L1 holds beats a miss.
                self.l1
                    .get(namespace, key)
                    .await
                    .map(|found| (Level::L1, found))
            }
        }
    }

    /// Writes to L2 (when reachable) and L1, completing a lease when a
    /// token is given, and tells the other replicas.
    pub async fn set(&self, command: SetCommand) -> Result<SetOutcome, CacheError> {
        let SetCommand {
            namespace,
            key,
            entry,
            ttl,
            lease_token,
        } = command;
        let ttl = ttl.unwrap_or_else(|| (self.default_ttl)());
        let rejected = || CacheError::LeaseRejected {
            namespace: namespace.clone(),
            key: key.clone(),
        };
        let mut lease_completed = false;
        let mut redis_token = None;
        if let Some(token) = lease_token.as_deref() {
            if token.starts_with('l') {
                if !self.complete_local_lease(&namespace, &key, token) {
                    return Err(rejected());
                }
                lease_completed = true;
            } else if token.starts_with('r') && self.l2.is_some() {
                redis_token = Some(token);
            } else {
                return Err(rejected());
            }
        }
        if let Some(l2) = &self.l2 {
            match l2.set(&namespace, &key, &entry, ttl, redis_token).await {
                Ok(true) => lease_completed |= redis_token.is_some(),
                Ok(false) => return Err(rejected()),
                Err(error) => {
                    self.record_l2_error(&error);
                    // The lease cannot be checked while Redis is away: the
                    // write is kept in L1 and the waiters are released.
                    lease_completed |= redis_token.is_some();
                }
            }
        }
        self.epochs.bump_key(&namespace, &key);
        self.l1.insert(&namespace, &key, entry, ttl).await;
        self.publish(Invalidation::Key { namespace, key }).await;
        self.fills.notify_waiters();
        Ok(SetOutcome {
            ttl,
            lease_completed,
        })
    }

    /// Removes a key from both levels; returns whether it existed.
    pub async fn delete(&self, namespace: &str, key: &str) -> bool {
        let mut deleted = false;
        if let Some(l2) = &self.l2 {
            match l2.delete(namespace, key).await {
                Ok(existed) => deleted = existed,
                Err(error) => self.record_l2_error(&error),
            }
        }
        self.epochs.bump_key(namespace, key);
        deleted |= self.l1.remove(namespace, key).await;
        self.publish(Invalidation::Key {
            namespace: namespace.to_owned(),
            key: key.to_owned(),
        })
        .await;
        deleted
    }

    /// Removes the selected entries from both levels on every replica;
    /// returns how many keys were removed (counted in L2 when reachable).
    pub async fn invalidate(&self, namespace: &str, selector: Selector) -> u64 {
        let l2_removed = match (&self.l2, &selector) {
            (None, _) => None,
            (Some(l2), Selector::Key(key)) => { l2.delete(namespace, key).await.map(u64::from) }
                .map_err(|error| self.record_l2_error(&error))
                .ok(),
            (Some(l2), Selector::Prefix(prefix)) => l2
                .invalidate_prefix(namespace, prefix)
                .await
                .map_err(|error| self.record_l2_error(&error))
                .ok(),
            (Some(l2), Selector::Tag(tag)) => l2
                .invalidate_tag(namespace, tag)
                .await
                .map_err(|error| self.record_l2_error(&error))
                .ok(),
        };
        let (l1_removed, invalidation) = match selector {
            Selector::Key(key) => {
                self.epochs.bump_key(namespace, &key);
                (
                    u64::from(self.l1.remove(namespace, &key).await),
                    Invalidation::Key {
                        namespace: namespace.to_owned(),
                        key,
                    },
                )
            }
            Selector::Prefix(prefix) => {
                self.epochs.bump_all();
                (
                    self.l1.remove_prefix(namespace, &prefix).await,
                    Invalidation::Prefix {
                        namespace: namespace.to_owned(),
                        prefix,
                    },
                )
            }
            Selector::Tag(tag) => {
                self.epochs.bump_all();
                (
                    self.l1.remove_tag(namespace, &tag).await,
                    Invalidation::Tag {
                        namespace: namespace.to_owned(),
                        tag,
                    },
                )
            }
        };
        self.publish(invalidation).await;
        l2_removed.unwrap_or(l1_removed)
    }

    async fn publish(&self, invalidation: Invalidation) {
        if let Some(l2) = &self.l2
            && let Err(error) = l2.publish(invalidation.encode(&self.node_id)).await
        {
            self.record_l2_error(&error);
        }
    }

    /// Applies an invalidation another replica published.
    pub async fn apply_remote(&self, payload: &[u8]) {
        let Some((origin, invalidation)) = Invalidation::decode(payload) else {
            tracing::warn!("ignoring an undecodable invalidation message");
            return;
        };
        if origin == self.node_id {
            return;
        }
        match invalidation {
            Invalidation::Key { namespace, key } => {
                self.epochs.bump_key(&namespace, &key);
                self.l1.remove(&namespace, &key).await;
            }
            Invalidation::Prefix { namespace, prefix } => {
                self.epochs.bump_all();
                self.l1.remove_prefix(&namespace, &prefix).await;
            }
            Invalidation::Tag { namespace, tag } => {
                self.epochs.bump_all();
                self.l1.remove_tag(&namespace, &tag).await;
            }
        }
        // A remote fill may be what local lease waiters wait for.
        self.fills.notify_waiters();
    }

    /// Called when the invalidation subscription is (re)established: L1
    /// may have missed invalidations, so it starts empty.
    pub fn on_subscribed(&self) {
        self.epochs.bump_all();
        self.l1.clear();
        self.subscribed.store(true, Ordering::Release);
        tracing::info!(node_id = %self.node_id, "subscribed to redis invalidations; L1 cleared");
    }

    /// Called when the subscription is lost.
    pub fn on_unsubscribed(&self) {
        self.subscribed.store(false, Ordering::Release);
        tracing::warn!(node_id = %self.node_id, "lost the redis invalidation subscription; L1 is used only while redis is unreachable");
    }

    fn try_local_lease(&self, namespace: &str, key: &str, timeout: Duration) -> Option<String> {
        let mut leases = self.local_leases.lock().ok()?;
        let now = Instant::now();
        if leases.len() > 10_000 {
            leases.retain(|_, (_, expires_at)| *expires_at > now);
        }
        let slot = l1_key(namespace, key);
        if let Some((_, expires_at)) = leases.get(&slot)
            && *expires_at > now
        {
            return None;
        }
        let token = format!("l{}", uuid::Uuid::new_v4().simple());
        leases.insert(slot, (token.clone(), now + timeout));
        Some(token)
    }

    fn complete_local_lease(&self, namespace: &str, key: &str, token: &str) -> bool {
        let Ok(mut leases) = self.local_leases.lock() else {
            return false;
        };
        let slot = l1_key(namespace, key);
        match leases.get(&slot) {
            Some((held, expires_at)) if held == token && *expires_at > Instant::now() => {
                leases.remove(&slot);
                true
            }
            _ => false,
        }
    }

    async fn try_lease(&self, namespace: &str, key: &str, timeout: Duration) -> Option<String> {
        if let Some(l2) = &self.l2 {
            let token = format!("r{}", uuid::Uuid::new_v4().simple());
            match l2.try_lease(namespace, key, &token, timeout).await {
                Ok(true) => return Some(token),
                Ok(false) => return None,
                // Redis is known to be away: leases hold within this replica.
                Err(L2Error::BreakerOpen) => {}
                // A failed or timed-out SET NX may still have taken the
                // lease: granting a local one could make two holders, so
                // the caller waits and asks again.
                Err(error) => {
                    self.record_l2_error(&error);
                    return None;
                }
            }
        }
        self.try_local_lease(namespace, key, timeout)
    }

    async fn release_lease(&self, namespace: &str, key: &str, token: &str) {
        if token.starts_with('l') {
            self.complete_local_lease(namespace, key, token);
        } else if let Some(l2) = &self.l2
            && let Err(error) = l2.release_lease(namespace, key, token).await
        {
            self.record_l2_error(&error);
        }
    }

    /// Returns the value, or grants the lease to fill it, or waits up to
    /// `max_wait` for the holder to fill it.
    pub async fn get_or_lease(
        &self,
        namespace: &str,
        key: &str,
        lease_timeout: Duration,
        max_wait: Duration,
    ) -> LeaseResult {
        if let Some((level, found)) = self.get(namespace, key).await {
            return LeaseResult::Hit(level, found);
        }
        let started = Instant::now();
        let deadline = started + max_wait;
        let mut waiting = false;
        loop {
            if let Some(token) = self.try_lease(namespace, key, lease_timeout).await {
                // A fill may have landed between the read and the lease.
                if let Some((level, found)) = self.get(namespace, key).await {
                    self.release_lease(namespace, key, &token).await;
                    return if waiting {
                        LeaseResult::Filled(level, found, started.elapsed())
                    } else {
                        LeaseResult::Hit(level, found)
                    };
                }
                bump(&self.counters.leases_granted);
                metrics::counter!("agentmesh_cache_leases_granted_total").increment(1);
                return LeaseResult::Granted {
                    token,
                    timeout: lease_timeout,
                    waited: if waiting {
                        started.elapsed()
                    } else {
                        Duration::ZERO
                    },
                };
            }
            let now = Instant::now();
            if now >= deadline {
                bump(&self.counters.lease_wait_timeouts);
                metrics::counter!("agentmesh_cache_lease_wait_timeouts_total").increment(1);
                return LeaseResult::StillLeased(started.elapsed());
            }
            if !waiting {
                waiting = true;
                bump(&self.counters.lease_waits);
                metrics::counter!("agentmesh_cache_lease_waits_total").increment(1);
            }
            let notified = self.fills.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some((level, found)) = self.get(namespace, key).await {
                return LeaseResult::Filled(level, found, started.elapsed());
            }
            let pause = LEASE_POLL.min(deadline.saturating_duration_since(Instant::now()));
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(pause) => {}
            }
            if let Some((level, found)) = self.get(namespace, key).await {
                return LeaseResult::Filled(level, found, started.elapsed());
            }
        }
    }

    /// Counters, usage of both levels and the state of L2.
    pub async fn stats(&self) -> StatsSnapshot {
        let (l1_entries, l1_bytes) = self.l1.usage().await;
        metrics::gauge!("agentmesh_cache_l1_entries").set(l1_entries as f64);
        metrics::gauge!("agentmesh_cache_l1_bytes").set(l1_bytes as f64);
        let l2_mode = self.l2_mode();
        let (l2_entries, l2_bytes) = match (&self.l2, l2_mode) {
            (Some(l2), L2Mode::Connected) => match l2.usage().await {
                Ok((entries, bytes)) => (Some(entries), Some(bytes)),
                Err(error) => {
                    self.record_l2_error(&error);
                    (None, None)
                }
            },
            _ => (None, None),
        };
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            node_id: self.node_id.clone(),
            started_at: self.started_at,
            l1_entries,
            l1_bytes,
            l1_hits: load(&self.counters.l1_hits),
            l1_misses: load(&self.counters.l1_misses),
            l2_hits: load(&self.counters.l2_hits),
            l2_misses: load(&self.counters.l2_misses),
            l2_errors: load(&self.counters.l2_errors),
            l2_entries,
            l2_bytes,
            l2_mode,
            breaker: self
                .l2
                .as_ref()
                .map_or(BreakerState::Closed, |l2| l2.breaker_state()),
            leases_granted: load(&self.counters.leases_granted),
            lease_waits: load(&self.counters.lease_waits),
            lease_wait_timeouts: load(&self.counters.lease_wait_timeouts),
        }
    }

    /// Refreshes the L1 gauges (called periodically).
    pub async fn report_gauges(&self) {
        let (entries, bytes) = self.l1.usage().await;
        metrics::gauge!("agentmesh_cache_l1_entries").set(entries as f64);
        metrics::gauge!("agentmesh_cache_l1_bytes").set(bytes as f64);
        metrics::gauge!("agentmesh_cache_l2_connected").set(
            if self.l2_mode() == L2Mode::Connected {
                1.0
            } else {
                0.0
            },
        );
    }

    /// Drops all of L1 (breaker closed again after an outage).
    pub fn clear_l1(&self) {
        self.epochs.bump_all();
        self.l1.clear();
    }
}
