//! [`ConfigWatcher`]: keeps a live copy of every settings scope from the
//! config service's `Watch` stream. It reconnects with backoff and resumes
//! from the last revision it saw; while the config service is unreachable it
//! keeps serving the last snapshot (or, on a cold start, the bootstrap
//! defaults) and says so in logs and metrics.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use agentmesh_proto::config as pb;
use agentmesh_proto::config::config_service_client::ConfigServiceClient;
use agentmesh_resilience::Backoff;
use agentmesh_settings::live::{self, Values};
use agentmesh_settings::{ClientTlsSettings, LiveSettings, Scope};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::channel::{ClientError, TracedChannel, connect_lazy};

/// The watcher's view of every scope.
#[derive(Clone, Debug, Default)]
pub struct ConfigSnapshot {
    /// The newest revision applied; 0 before the first contact.
    pub revision: u64,
    /// Every scope's own values and revision.
    pub scopes: BTreeMap<Scope, (u64, Values)>,
    /// True while the watch stream is up.
    pub connected: bool,
}

impl ConfigSnapshot {
    /// Merged settings global < agent < project, over built-in defaults.
    pub fn effective(&self, agent_type: Option<&str>, project_id: Option<&str>) -> LiveSettings {
        let (values, _) = live::merge_for(agent_type, project_id, |scope| {
            self.scopes
                .get(scope)
                .map(|(revision, values)| (*revision, values))
        });
        LiveSettings::from_values(&values)
    }

    /// Merged settings global < `key/<key_id>`: what applies to one
    /// gateway API key (its rate limits).
    pub fn effective_for_key(&self, key_id: &str) -> LiveSettings {
        let layers: Vec<live::Layer<'_>> = [Scope::Global, Scope::Key(key_id.to_owned())]
            .into_iter()
            .filter_map(|scope| {
                let (revision, values) = self.scopes.get(&scope)?;
                Some(live::Layer {
                    scope,
                    revision: *revision,
                    values,
                })
            })
            .collect();
        let (values, _) = live::merge(&layers);
        LiveSettings::from_values(&values)
    }
}

/// A live, reconnecting view of the config service's settings.
#[derive(Clone, Debug)]
pub struct ConfigWatcher {
    state: watch::Receiver<Arc<ConfigSnapshot>>,
    stop: CancellationToken,
    memo: Arc<RwLock<Memo>>,
}

/// Most (agent type, project) pairs whose effective settings are kept.
const MEMO_MAX_ENTRIES: usize = 4096;

/// Effective settings already merged from the current snapshot: services
/// ask on every call, and merging the scopes allocates.
#[derive(Debug, Default)]
struct Memo {
    /// The snapshot the entries were merged from.
    snapshot: Option<Arc<ConfigSnapshot>>,
    entries: HashMap<(Option<String>, Option<String>), Arc<LiveSettings>>,
}

impl ConfigWatcher {
    /// Starts watching `endpoint`. Until the first snapshot arrives, the
    /// global scope holds `defaults` (the process's bootstrap defaults).
    /// The watcher stops when `shutdown` is cancelled.
    pub fn start(
        endpoint: &str,
        tls: &ClientTlsSettings,
        defaults: &LiveSettings,
        shutdown: &CancellationToken,
    ) -> Result<Self, ClientError> {
        let channel = connect_lazy(endpoint, tls)?;
        let mut scopes = BTreeMap::new();
        scopes.insert(Scope::Global, (0, defaults.to_values()));
        let (sender, state) = watch::channel(Arc::new(ConfigSnapshot {
            revision: 0,
            scopes,
            connected: false,
        }));
        let stop = shutdown.child_token();
        tokio::spawn(run(channel, endpoint.to_owned(), sender, stop.clone()));
        Ok(Self {
            state,
            stop,
            memo: Arc::default(),
        })
    }

    /// Starts watching the config service a process's settings name
    /// (`endpoints.config`, over `endpoints.tls` for `https://`), with its
    /// bootstrap defaults until the first snapshot.
    pub fn for_settings(
        settings: &agentmesh_settings::Settings,
        shutdown: &CancellationToken,
    ) -> Result<Self, ClientError> {
        Self::start(
            &settings.endpoints.config,
            &settings.endpoints.tls,
            &settings.defaults,
            shutdown,
        )
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<ConfigSnapshot> {
        Arc::clone(&self.state.borrow())
    }

    /// Effective settings for an agent type and/or project (merged once
    /// per snapshot and pair, then served from memory).
    pub fn effective(&self, agent_type: Option<&str>, project_id: Option<&str>) -> LiveSettings {
        let snapshot = self.snapshot();
        let key = (agent_type.map(str::to_owned), project_id.map(str::to_owned));
        {
            let memo = self.memo.read().unwrap_or_else(PoisonError::into_inner);
            if memo
                .snapshot
                .as_ref()
                .is_some_and(|known| Arc::ptr_eq(known, &snapshot))
                && let Some(settings) = memo.entries.get(&key)
            {
                return LiveSettings::clone(settings);
            }
        }
        let settings = Arc::new(snapshot.effective(agent_type, project_id));
        let mut memo = self.memo.write().unwrap_or_else(PoisonError::into_inner);
        let current = memo
            .snapshot
            .as_ref()
            .is_some_and(|known| Arc::ptr_eq(known, &snapshot));
        if !current || memo.entries.len() >= MEMO_MAX_ENTRIES {
            memo.entries.clear();
            memo.snapshot = Some(snapshot);
        }
        memo.entries.insert(key, Arc::clone(&settings));
        LiveSettings::clone(&settings)
    }

    /// A receiver notified on every change (and connection change).
    pub fn subscribe(&self) -> watch::Receiver<Arc<ConfigSnapshot>> {
        self.state.clone()
    }

    /// Waits until the snapshot reaches `revision`, at most `timeout`;
    /// returns whether it did.
    pub async fn wait_for_revision(&self, revision: u64, timeout: Duration) -> bool {
        let mut receiver = self.state.clone();
        tokio::time::timeout(
            timeout,
            receiver.wait_for(|snapshot| snapshot.revision >= revision),
        )
        .await
        .is_ok_and(|result| result.is_ok())
    }

    /// Stops watching.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

async fn run(
    channel: TracedChannel,
    endpoint: String,
    sender: watch::Sender<Arc<ConfigSnapshot>>,
    stop: CancellationToken,
) {
    let mut client = ConfigServiceClient::new(channel);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut reported_down = false;
    let connected_gauge = metrics::gauge!("agentmesh_config_watcher_connected");
    connected_gauge.set(0.0);
    loop {
        let from_revision = sender.borrow().revision;
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = follow(&mut client, from_revision, &sender, &mut backoff) => outcome,
        };
        connected_gauge.set(0.0);
        if sender.borrow().connected {
            // This attempt had connected: a new outage starts now.
            reported_down = false;
        }
        sender.send_modify(|snapshot| Arc::make_mut(snapshot).connected = false);
        if !reported_down {
            reported_down = true;
            tracing::warn!(
                endpoint,
                revision = sender.borrow().revision,
                reason = %outcome,
                "config service unreachable, keeping the last snapshot"
            );
        } else {
            tracing::debug!(endpoint, reason = %outcome, "config watch retry failed");
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Follows one Watch stream until it ends; returns why it ended.
async fn follow(
    client: &mut ConfigServiceClient<TracedChannel>,
    from_revision: u64,
    sender: &watch::Sender<Arc<ConfigSnapshot>>,
    backoff: &mut Backoff,
) -> String {
    let mut stream = match client.watch(pb::WatchRequest { from_revision }).await {
        Ok(response) => response.into_inner(),
        Err(status) => return format!("{:?}: {}", status.code(), status.message()),
    };
    loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return "stream ended".to_owned(),
            Err(status) => return format!("{:?}: {}", status.code(), status.message()),
        };
        let Some(event) = message.event else { continue };
        let was_connected = sender.borrow().connected;
        sender.send_modify(|snapshot| {
            let snapshot = Arc::make_mut(snapshot);
            snapshot.connected = true;
            match event {
                pb::watch_response::Event::Snapshot(full) => {
                    snapshot.revision = full.revision;
                    snapshot.scopes = full
                        .scopes
                        .iter()
                        .filter_map(|scope| {
                            let parsed = Scope::parse(&scope.scope).ok()?;
                            let values =
                                Values::from_proto(&scope.settings.clone().unwrap_or_default());
                            Some((parsed, (scope.revision, values)))
                        })
                        .collect();
                }
                pb::watch_response::Event::Change(change) => {
                    if let Ok(scope) = Scope::parse(&change.scope) {
                        let values =
                            Values::from_proto(&change.settings.clone().unwrap_or_default());
                        snapshot.scopes.insert(scope, (change.revision, values));
                    }
                    snapshot.revision = snapshot.revision.max(change.revision);
                }
            }
        });
        if !was_connected {
            backoff.reset();
            metrics::gauge!("agentmesh_config_watcher_connected").set(1.0);
            tracing::info!(
                revision = sender.borrow().revision,
                "config watch connected"
            );
        }
        metrics::gauge!("agentmesh_config_watcher_revision").set(sender.borrow().revision as f64);
    }
}
