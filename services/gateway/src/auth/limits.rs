//! Rate limits per API key: a token bucket per key (governor's keyed GCRA
//! limiter), with the rate and burst of the key's role from the live
//! `limits.*` settings, overridden per key in the config scope
//! `key/<key_id>`.
//!
//! Keys that share a quota share one keyed limiter. The table of quotas is
//! rebuilt whenever the config revision changes; a limiter whose quota is
//! unchanged keeps its buckets, one whose quota changed starts afresh.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use agentmesh_client::ConfigWatcher;
use agentmesh_settings::Scope;
use agentmesh_settings::live::LimitsSettings;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota as GovernorQuota, RateLimiter};

use crate::auth::Role;

/// Rate and burst of one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quota {
    /// Sustained requests per second; 0 is unlimited.
    pub rps: u32,
    /// Bucket size.
    pub burst: u32,
}

impl Quota {
    fn of(limits: &LimitsSettings, role: Role) -> Self {
        let (rps, burst) = match role {
            Role::User => (limits.user_rps, limits.user_burst),
            Role::Admin => (limits.admin_rps, limits.admin_burst),
        };
        Self {
            rps: u32::try_from(rps.max(0)).unwrap_or(u32::MAX),
            burst: u32::try_from(burst.max(1)).unwrap_or(u32::MAX),
        }
    }
}

/// A refused call: the quota and how long until one more call conforms.
#[derive(Clone, Copy, Debug)]
pub struct Refusal {
    /// The quota that refused.
    pub quota: Quota,
    /// Time until the next call would be allowed.
    pub retry_after: Duration,
}

type Limiter = DefaultKeyedRateLimiter<String>;

/// The quota table at one config revision.
#[derive(Default)]
struct Table {
    revision: Option<u64>,
    user: Option<Quota>,
    admin: Option<Quota>,
    /// Keys whose `key/<id>` scope sets limits: their merged limits.
    per_key: HashMap<String, LimitsSettings>,
    limiters: HashMap<Quota, Arc<Limiter>>,
}

/// The per-key rate limits.
pub struct RateLimits {
    watcher: ConfigWatcher,
    clock: DefaultClock,
    table: RwLock<Table>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").finish_non_exhaustive()
    }
}

impl RateLimits {
    /// Limits following `watcher`'s live settings.
    pub fn new(watcher: ConfigWatcher) -> Self {
        Self {
            watcher,
            clock: DefaultClock::default(),
            table: RwLock::new(Table::default()),
        }
    }

    /// Takes one call from the bucket of `key_id` (of `role`).
    pub fn check(&self, key_id: &str, role: Role) -> Result<(), Refusal> {
        let revision = self.watcher.snapshot().revision;
        let current = self
            .table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .revision;
        if current != Some(revision) {
            self.rebuild();
        }
        let limiter = {
            let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
            let quota = match table.per_key.get(key_id) {
                Some(limits) => Quota::of(limits, role),
                None => match role {
                    Role::User => table
                        .user
                        .unwrap_or(Quota::of(&LimitsSettings::default(), role)),
                    Role::Admin => table
                        .admin
                        .unwrap_or(Quota::of(&LimitsSettings::default(), role)),
                },
            };
            if quota.rps == 0 {
                return Ok(());
            }
            match table.limiters.get(&quota) {
                Some(limiter) => (Arc::clone(limiter), quota),
                None => {
                    drop(table);
                    (self.limiter_for(quota), quota)
                }
            }
        };
        let (limiter, quota) = limiter;
        match limiter.check_key(&key_id.to_owned()) {
            Ok(()) => Ok(()),
            Err(not_until) => Err(Refusal {
                quota,
                retry_after: not_until.wait_time_from(self.clock.now()),
            }),
        }
    }

    fn limiter_for(&self, quota: Quota) -> Arc<Limiter> {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let clock = self.clock.clone();
        Arc::clone(
            table
                .limiters
                .entry(quota)
                .or_insert_with(|| Arc::new(new_limiter(quota, clock))),
        )
    }

    /// Rebuilds the quota table from the current snapshot, keeping the
    /// limiters of quotas still in use.
    fn rebuild(&self) {
        let snapshot = self.watcher.snapshot();
        let global = snapshot.effective(None, None).limits;
        let per_key: HashMap<String, LimitsSettings> = snapshot
            .scopes
            .iter()
            .filter_map(|(scope, (_, values))| match scope {
                Scope::Key(key_id)
                    if values.iter().any(|(path, _)| path.starts_with("limits.")) =>
                {
                    Some((key_id.clone(), snapshot.effective_for_key(key_id).limits))
                }
                _ => None,
            })
            .collect();
        let user = Quota::of(&global, Role::User);
        let admin = Quota::of(&global, Role::Admin);
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let mut in_use: Vec<Quota> = vec![user, admin];
        for limits in per_key.values() {
            in_use.push(Quota::of(limits, Role::User));
            in_use.push(Quota::of(limits, Role::Admin));
        }
        table.limiters.retain(|quota, _| in_use.contains(quota));
        if table.user != Some(user) || table.admin != Some(admin) || table.per_key != per_key {
            tracing::info!(
                revision = snapshot.revision,
                user_rps = user.rps,
                user_burst = user.burst,
                admin_rps = admin.rps,
                admin_burst = admin.burst,
                key_overrides = per_key.len(),
                "api key rate limits applied"
            );
        }
        table.user = Some(user);
        table.admin = Some(admin);
        table.per_key = per_key;
        table.revision = Some(snapshot.revision);
    }

    /// Drops the buckets of keys idle long enough to be full again.
    pub fn retain_recent(&self) {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        for limiter in table.limiters.values() {
            limiter.retain_recent();
        }
    }
}

fn new_limiter(quota: Quota, clock: DefaultClock) -> Limiter {
    let rps = NonZeroU32::new(quota.rps).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(quota.burst).unwrap_or(NonZeroU32::MIN);
    RateLimiter::dashmap_with_clock(GovernorQuota::per_second(rps).allow_burst(burst), clock)
}
