//! The keys every call is checked against, in memory: loaded from the
//! database at start, reloaded every `gateway.auth.refresh_interval_ms`
//! (so a key created or revoked on another replica counts here within one
//! interval), and updated at once by this replica's own creates and
//! revokes.
//!
//! Keys are never deleted and a revocation is never undone, so merging a
//! reload into the map only adds keys and revocations: a reload that read
//! the table just before this replica's own revoke committed cannot bring
//! the key back.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::auth::Role;
use crate::auth::store::{KeyRecord, KeyStore};
use crate::error::GatewayError;

/// The in-memory keys.
#[derive(Debug)]
pub struct Keyring {
    store: KeyStore,
    keys: RwLock<HashMap<String, Arc<KeyRecord>>>,
}

impl Keyring {
    /// Loads every key from `store`.
    pub async fn load(store: KeyStore) -> Result<Arc<Self>, GatewayError> {
        let keyring = Arc::new(Self {
            store,
            keys: RwLock::new(HashMap::new()),
        });
        keyring.reload().await?;
        Ok(keyring)
    }

    /// The store behind the keyring.
    pub fn store(&self) -> &KeyStore {
        &self.store
    }

    /// The key with this id.
    pub fn get(&self, key_id: &str) -> Option<Arc<KeyRecord>> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key_id)
            .cloned()
    }

    /// Whether a valid admin key exists.
    pub fn has_admin(&self) -> bool {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .any(|key| key.role == Role::Admin && key.revoked_at_micros.is_none())
    }

    /// Adds or updates one key (this replica's create or revoke).
    pub fn put(&self, record: KeyRecord) {
        self.merge(std::iter::once(record));
    }

    fn merge(&self, records: impl IntoIterator<Item = KeyRecord>) {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        for record in records {
            match keys.get(&record.key_id) {
                Some(known) if known.revoked_at_micros.is_some() => {}
                Some(known) if **known == record => {}
                _ => {
                    keys.insert(record.key_id.clone(), Arc::new(record));
                }
            }
        }
        metrics::gauge!("agentmesh_gateway_api_keys").set(keys.len() as f64);
    }

    /// Reads every key from the database and merges them in.
    pub async fn reload(&self) -> Result<(), GatewayError> {
        let records = self.store.all().await?;
        self.merge(records);
        Ok(())
    }

    /// Reloads every `interval` until `shutdown`; a failed reload keeps the
    /// keys already known and is logged once per outage.
    pub fn spawn_refresh(self: &Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let keyring = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match keyring.reload().await {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("api keys reloaded again");
                    }
                    Ok(()) => {}
                    Err(error) if !failing => {
                        failing = true;
                        tracing::warn!(%error, "cannot reload api keys, keeping the ones known");
                    }
                    Err(_) => {}
                }
            }
        });
    }
}
