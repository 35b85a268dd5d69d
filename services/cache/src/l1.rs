//! L1: entries in this replica's memory (moka), bounded by bytes through a
//! weigher, each expiring exactly when its L2 copy does (the expiry of an
//! entry is its remaining TTL when it was inserted).

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;

use crate::entry::{Entry, Found};

/// One L1 entry: the value and the instant it expires.
#[derive(Debug)]
pub struct L1Entry {
    entry: Entry,
    namespace_len: usize,
    expires_at: Instant,
}

struct ExpireAtDeadline;

impl Expiry<String, Arc<L1Entry>> for ExpireAtDeadline {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<L1Entry>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Arc<L1Entry>,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(updated_at))
    }
}

/// The L1 key of a namespaced key (namespaces contain no `:`).
pub fn l1_key(namespace: &str, key: &str) -> String {
    let mut joined = String::with_capacity(namespace.len() + 1 + key.len());
    joined.push_str(namespace);
    joined.push(':');
    joined.push_str(key);
    joined
}

/// This replica's in-memory level; disabled when its byte budget is 0.
#[derive(Clone)]
pub struct L1 {
    cache: Option<Cache<String, Arc<L1Entry>>>,
    max_bytes: u64,
}

impl L1 {
    /// An L1 holding at most `max_bytes` (0 disables it).
    pub fn new(max_bytes: u64) -> Self {
        if max_bytes == 0 {
            return Self {
                cache: None,
                max_bytes,
            };
        }
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, value: &Arc<L1Entry>| value.entry.weight(key))
            .expire_after(ExpireAtDeadline)
            .eviction_listener(|_key, _value, cause| {
                if cause == RemovalCause::Size {
                    metrics::counter!("agentmesh_cache_l1_evictions_total").increment(1);
                }
            })
            .build();
        Self {
            cache: Some(cache),
            max_bytes,
        }
    }

    /// Whether L1 holds anything at all.
    pub fn is_enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// The entry under `key` if it has not expired.
    pub async fn get(&self, namespace: &str, key: &str) -> Option<Found> {
        let cache = self.cache.as_ref()?;
        let stored = cache.get(&l1_key(namespace, key)).await?;
        let remaining_ttl = stored.expires_at.checked_duration_since(Instant::now())?;
        if remaining_ttl.is_zero() {
            return None;
        }
        Some(Found {
            entry: stored.entry.clone(),
            remaining_ttl,
        })
    }

    /// Stores `entry` until `remaining_ttl` from now. Entries larger than
    /// the whole budget are not stored.
    pub async fn insert(&self, namespace: &str, key: &str, entry: Entry, remaining_ttl: Duration) {
        let Some(cache) = &self.cache else { return };
        let joined = l1_key(namespace, key);
        if u64::from(entry.weight(&joined)) > self.max_bytes || remaining_ttl.is_zero() {
            cache.invalidate(&joined).await;
            return;
        }
        let stored = Arc::new(L1Entry {
            entry,
            namespace_len: namespace.len(),
            expires_at: Instant::now() + remaining_ttl,
        });
        cache.insert(joined, stored).await;
    }

    /// Removes one key; returns whether it was present.
    pub async fn remove(&self, namespace: &str, key: &str) -> bool {
        let Some(cache) = &self.cache else {
            return false;
        };
        cache.remove(&l1_key(namespace, key)).await.is_some()
    }

    /// Removes every key of `namespace` starting with `prefix`; returns
    /// how many were removed.
    pub async fn remove_prefix(&self, namespace: &str, prefix: &str) -> u64 {
        let start = l1_key(namespace, prefix);
        self.remove_where(|key, _| key.starts_with(&start)).await
    }

    /// Removes every key of `namespace` carrying `tag`.
    pub async fn remove_tag(&self, namespace: &str, tag: &str) -> u64 {
        self.remove_where(|key, stored| {
            key.get(..stored.namespace_len) == Some(namespace)
                && stored.entry.tags.iter().any(|candidate| candidate == tag)
        })
        .await
    }

    async fn remove_where(&self, matches: impl Fn(&str, &L1Entry) -> bool) -> u64 {
        let Some(cache) = &self.cache else { return 0 };
        let doomed: Vec<Arc<String>> = cache
            .iter()
            .filter(|(key, stored)| matches(key, stored))
            .map(|(key, _)| key)
            .collect();
        let mut removed = 0;
        for key in doomed {
            if cache.remove(key.as_str()).await.is_some() {
                removed += 1;
            }
        }
        removed
    }

    /// Drops everything (after an outage during which invalidations may
    /// have been missed).
    pub fn clear(&self) {
        if let Some(cache) = &self.cache {
            cache.invalidate_all();
        }
    }

    /// Applies pending evictions and expirations, then returns (entries,
    /// weighted bytes).
    pub async fn usage(&self) -> (u64, u64) {
        let Some(cache) = &self.cache else {
            return (0, 0);
        };
        cache.run_pending_tasks().await;
        (cache.entry_count(), cache.weighted_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: &str, tags: &[&str]) -> Entry {
        Entry {
            value: value.as_bytes().to_vec(),
            content_type: String::new(),
            tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
        }
    }

    #[tokio::test]
    async fn expiry_prefix_tag_and_budget() {
        let l1 = L1::new(1 << 20);
        l1.insert("ns", "a1", entry("1", &["t"]), Duration::from_secs(60))
            .await;
        l1.insert("ns", "a2", entry("2", &[]), Duration::from_secs(60))
            .await;
        l1.insert("ns2", "a3", entry("3", &["t"]), Duration::from_secs(60))
            .await;
        l1.insert("ns", "b", entry("4", &[]), Duration::from_millis(30))
            .await;
        let found = l1.get("ns", "a1").await.unwrap();
        assert!(found.remaining_ttl <= Duration::from_secs(60));
        assert!(found.remaining_ttl > Duration::from_secs(50));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(l1.get("ns", "b").await.is_none());
        assert_eq!(l1.remove_tag("ns", "t").await, 1);
        assert!(l1.get("ns2", "a3").await.is_some());
        assert_eq!(l1.remove_prefix("ns", "a").await, 1);
        assert!(l1.get("ns", "a2").await.is_none());

        let tiny = L1::new(50);
        tiny.insert(
            "ns",
            "big",
            entry(&"x".repeat(100), &[]),
            Duration::from_secs(60),
        )
        .await;
        assert!(tiny.get("ns", "big").await.is_none());
        assert!(!L1::new(0).is_enabled());
    }
}
