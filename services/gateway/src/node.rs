//! Agent nodes as the gateway sees them: a lazily connecting traced
//! channel, a circuit breaker whose settings follow the live config, the
//! node's health history (recent outcomes, why the breaker last changed),
//! and its load: calls in flight from this gateway, a peak-EWMA of their
//! latency, and what the node itself reports through `GetLoad`.
//!
//! [`pick`] is power of two choices over that load.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use agentmesh_client::{ClientError, TracedChannel, connect_lazy};
use agentmesh_proto::agent as agent_pb;
use agentmesh_proto::agent::agent_service_client::AgentServiceClient;
use agentmesh_resilience::{Breaker, BreakerConfig, BreakerState, CircuitBreaker, FailureRate};
use agentmesh_settings::{ClientTlsSettings, LiveSettings};
use rand::Rng;
use tokio::time::Instant;
use tonic::Status;

/// How fast the latency estimate forgets: the weight of an observation
/// halves every `DECAY * ln 2` (tower's peak-EWMA default).
const DECAY: Duration = Duration::from_secs(10);
/// Floor of a latency estimate, so that calls in flight still tell apart
/// nodes nobody has measured yet.
const MIN_RTT_NANOS: f64 = 1_000.0;
/// Longest error text kept for `GetCircuitStates`.
const MAX_ERROR_BYTES: usize = 256;

/// The breaker of one node and the settings it was built with.
struct BreakerSlot {
    config: BreakerConfig,
    breaker: CircuitBreaker,
}

/// Breaker history, written by the transition hook.
#[derive(Clone, Debug)]
struct Transitions {
    state: BreakerState,
    changed_at: SystemTime,
    opened_at: Option<SystemTime>,
    reason: String,
}

/// Successes and failures over the breaker's window, approximated with two
/// buckets (the current window and the one before, weighted by overlap).
#[derive(Clone, Copy, Debug)]
struct Window {
    length: Duration,
    started: Instant,
    current: (u32, u32),
    previous: (u32, u32),
}

impl Window {
    fn new(length: Duration) -> Self {
        Self {
            length: length.max(Duration::from_secs(1)),
            started: Instant::now(),
            current: (0, 0),
            previous: (0, 0),
        }
    }

    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed >= self.length * 2 {
            self.previous = (0, 0);
            self.current = (0, 0);
            self.started = now;
        } else if elapsed >= self.length {
            self.previous = self.current;
            self.current = (0, 0);
            self.started += self.length;
        }
    }

    fn record(&mut self, success: bool) {
        self.roll(Instant::now());
        if success {
            self.current.0 = self.current.0.saturating_add(1);
        } else {
            self.current.1 = self.current.1.saturating_add(1);
        }
    }

    /// (successes, failures) over the last window length.
    fn counts(&mut self) -> (u32, u32) {
        let now = Instant::now();
        self.roll(now);
        let into = now.saturating_duration_since(self.started).as_secs_f64();
        let weight = (1.0 - into / self.length.as_secs_f64()).clamp(0.0, 1.0);
        let blend = |current: u32, previous: u32| {
            // Rounded weighted count of the previous bucket.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let previous = (f64::from(previous) * weight).round() as u32;
            current.saturating_add(previous)
        };
        (
            blend(self.current.0, self.previous.0),
            blend(self.current.1, self.previous.1),
        )
    }
}

/// What the node's breaker hook needs to explain a transition.
struct Health {
    endpoint: String,
    transitions: Mutex<Transitions>,
    consecutive_failures: AtomicU32,
    last_error: Mutex<String>,
    window: Mutex<Window>,
}

impl Health {
    fn on_transition(&self, state: BreakerState, config: BreakerConfig) {
        let now = SystemTime::now();
        let consecutive = self.consecutive_failures.load(Ordering::Acquire);
        let last_error = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (successes, failures) = self
            .window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counts();
        let mut seen = self
            .transitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let reason = match (seen.state, state) {
            (BreakerState::HalfOpen, BreakerState::Open) => {
                format!("a probe failed: {last_error}")
            }
            (_, BreakerState::Open) if consecutive >= config.failure_threshold => {
                format!("{consecutive} consecutive failures; last: {last_error}")
            }
            (_, BreakerState::Open) => {
                let total = successes + failures;
                let percent = (failures * 100).checked_div(total).unwrap_or(0);
                format!(
                    "failure rate {percent}% ({failures} of {total}) over the last {}s; last: {last_error}",
                    config.failure_rate.map_or(0, |rate| rate.window.as_secs())
                )
            }
            (_, BreakerState::HalfOpen) => format!(
                "reset timeout of {}s passed: letting up to {} probe calls through",
                config.reset_timeout.as_secs(),
                config.half_open_max_probes
            ),
            (_, BreakerState::Closed) => "a probe call succeeded".to_owned(),
        };
        seen.state = state;
        seen.changed_at = now;
        match state {
            BreakerState::Open => seen.opened_at = Some(now),
            BreakerState::Closed => seen.opened_at = None,
            BreakerState::HalfOpen => {}
        }
        seen.reason.clone_from(&reason);
        drop(seen);
        tracing::warn!(
            endpoint = self.endpoint,
            state = state.as_str(),
            reason,
            "agent node circuit breaker changed state"
        );
        metrics::counter!(
            "agentmesh_gateway_breaker_transitions_total",
            "endpoint" => self.endpoint.clone(),
            "state" => state.as_str()
        )
        .increment(1);
        metrics::gauge!("agentmesh_gateway_breaker_state", "endpoint" => self.endpoint.clone())
            .set(state_number(state));
    }
}

/// A peak-EWMA latency estimate: a slower observation replaces the
/// estimate at once, faster ones pull it down gradually, and it decays
/// towards zero while the node gets no traffic (so a node that was slow
/// is tried again).
#[derive(Clone, Copy, Debug)]
struct PeakEwma {
    nanos: f64,
    updated: Instant,
}

impl PeakEwma {
    fn decayed(&self, now: Instant) -> f64 {
        let idle = now.saturating_duration_since(self.updated).as_secs_f64();
        self.nanos * (-idle / DECAY.as_secs_f64()).exp()
    }

    fn observe(&mut self, rtt: Duration) {
        let now = Instant::now();
        let rtt = rtt.as_secs_f64() * 1e9;
        let estimate = self.decayed(now);
        self.nanos = if rtt > estimate {
            rtt
        } else {
            let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
            let weight = (-elapsed / DECAY.as_secs_f64()).exp();
            estimate * weight + rtt * (1.0 - weight)
        };
        self.updated = now;
    }
}

/// What the node last said about itself through `GetLoad`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reported {
    /// Executions running on the node (from every gateway).
    pub in_flight: u32,
    /// Executions waiting for a slot on the node.
    pub queued: u32,
    /// The node's concurrency limit.
    pub capacity: u32,
}

/// How the gateway connects to each agent node.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// TLS for `https://` nodes.
    pub tls: ClientTlsSettings,
    /// Largest message sent or received.
    pub max_message_bytes: usize,
    /// HTTP/2 connections per node, used in turn
    /// (`gateway.connections_per_node`).
    pub connections: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            tls: ClientTlsSettings::default(),
            max_message_bytes: 4 << 20,
            connections: 1,
        }
    }
}

/// One agent node.
pub struct Node {
    endpoint: String,
    source: String,
    /// One client per connection; calls take them in turn.
    clients: Vec<AgentServiceClient<TracedChannel>>,
    next_client: AtomicUsize,
    node_id: Mutex<Option<String>>,
    breaker: Mutex<BreakerSlot>,
    health: Arc<Health>,
    in_flight: AtomicU32,
    latency: Mutex<Option<PeakEwma>>,
    reported: Mutex<Option<Reported>>,
    draining: AtomicBool,
}

/// A snapshot of one node for `GetCircuitStates`.
#[derive(Clone, Debug)]
pub struct NodeState {
    /// Node id as the node reports it (its endpoint until it has answered).
    pub node_id: String,
    /// Endpoint.
    pub endpoint: String,
    /// The configured endpoint this node came from (itself, or the host
    /// name it was resolved from).
    pub source: String,
    /// Breaker state.
    pub state: BreakerState,
    /// Health failures since the last success.
    pub consecutive_failures: u32,
    /// Successes over the breaker's window.
    pub recent_successes: u32,
    /// Health failures over the breaker's window.
    pub recent_failures: u32,
    /// Calls in flight.
    pub in_flight: u32,
    /// When the breaker last opened, while it is not closed.
    pub opened_at: Option<SystemTime>,
    /// When the breaker last changed state.
    pub state_changed_at: SystemTime,
    /// Why it last changed.
    pub reason: String,
    /// When an open breaker lets the next probe through.
    pub next_probe_at: Option<SystemTime>,
    /// The latency estimate.
    pub latency: Duration,
    /// What the node last reported.
    pub reported: Option<Reported>,
    /// True while the node says it is draining.
    pub draining: bool,
}

/// Decrements the node's in-flight count when dropped.
pub struct InFlight(Arc<Node>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("agentmesh_gateway_node_in_flight", "endpoint" => self.0.endpoint.clone())
            .decrement(1.0);
    }
}

/// The breaker settings in the live config.
pub fn breaker_config(live: &LiveSettings) -> BreakerConfig {
    let int = |value: i64| u32::try_from(value.max(1)).unwrap_or(u32::MAX);
    let failure_rate = (live.breaker.failure_rate_percent > 0).then(|| FailureRate {
        threshold: (live.breaker.failure_rate_percent.min(100) as f64) / 100.0,
        min_requests: int(live.breaker.min_requests),
        window: Duration::from_secs(u64::from(int(live.breaker.window_seconds))),
    });
    BreakerConfig {
        failure_threshold: int(live.breaker.failure_threshold),
        reset_timeout: Duration::from_secs(u64::from(int(live.breaker.reset_timeout_seconds))),
        half_open_max_probes: int(live.breaker.half_open_max_probes),
        failure_rate,
    }
}

fn window_of(config: BreakerConfig) -> Duration {
    config
        .failure_rate
        .map_or(Duration::from_secs(30), |rate| rate.window)
}

fn new_breaker(config: BreakerConfig, health: &Arc<Health>) -> CircuitBreaker {
    let health = Arc::clone(health);
    CircuitBreaker::with_transition_hook(config, move |state| health.on_transition(state, config))
}

fn state_number(state: BreakerState) -> f64 {
    match state {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 1.0,
        BreakerState::Open => 2.0,
    }
}

fn shorten(mut text: String) -> String {
    if text.len() > MAX_ERROR_BYTES {
        let mut end = MAX_ERROR_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

impl Node {
    /// A node at `endpoint` (nothing is connected until the first call);
    /// `source` is the configured endpoint it came from.
    pub fn new(
        endpoint: &str,
        source: &str,
        options: &ConnectOptions,
        config: BreakerConfig,
    ) -> Result<Self, ClientError> {
        let clients = (0..options.connections.max(1))
            .map(|_| {
                connect_lazy(endpoint, &options.tls).map(|channel| {
                    AgentServiceClient::new(channel)
                        .max_decoding_message_size(options.max_message_bytes)
                        .max_encoding_message_size(options.max_message_bytes)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let health = Arc::new(Health {
            endpoint: endpoint.to_owned(),
            transitions: Mutex::new(Transitions {
                state: BreakerState::Closed,
                changed_at: SystemTime::now(),
                opened_at: None,
                reason: "node added".to_owned(),
            }),
            consecutive_failures: AtomicU32::new(0),
            last_error: Mutex::new(String::new()),
            window: Mutex::new(Window::new(window_of(config))),
        });
        let breaker = new_breaker(config, &health);
        metrics::gauge!("agentmesh_gateway_breaker_state", "endpoint" => endpoint.to_owned())
            .set(0.0);
        Ok(Self {
            endpoint: endpoint.to_owned(),
            source: source.to_owned(),
            clients,
            next_client: AtomicUsize::new(0),
            node_id: Mutex::new(None),
            breaker: Mutex::new(BreakerSlot { config, breaker }),
            health,
            in_flight: AtomicU32::new(0),
            latency: Mutex::new(None),
            reported: Mutex::new(None),
            draining: AtomicBool::new(false),
        })
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The configured endpoint this node came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// A client for the node (cheap: the channels are shared), on the
    /// next of its connections: one HTTP/2 connection's single I/O task
    /// would serialise a busy gateway's calls.
    pub fn client(&self) -> AgentServiceClient<TracedChannel> {
        let index = self.next_client.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[index].clone()
    }

    /// The node's breaker under `config`; a breaker built with other
    /// settings is replaced by a fresh closed one (live reconfiguration).
    pub fn breaker(&self, config: BreakerConfig) -> CircuitBreaker {
        let mut slot = self.breaker.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.config != config {
            tracing::info!(
                endpoint = self.endpoint,
                failure_threshold = config.failure_threshold,
                reset_timeout_s = config.reset_timeout.as_secs(),
                half_open_max_probes = config.half_open_max_probes,
                "agent node circuit breaker rebuilt with new settings"
            );
            slot.breaker = new_breaker(config, &self.health);
            slot.config = config;
            self.health.consecutive_failures.store(0, Ordering::Release);
            *self
                .health
                .window
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Window::new(window_of(config));
            let mut seen = self
                .health
                .transitions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            seen.state = BreakerState::Closed;
            seen.changed_at = SystemTime::now();
            seen.opened_at = None;
            seen.reason = "breaker settings changed in the live config".to_owned();
            metrics::gauge!("agentmesh_gateway_breaker_state", "endpoint" => self.endpoint.clone())
                .set(0.0);
        }
        slot.breaker.clone()
    }

    /// Counts a call in flight until the guard drops.
    pub fn start_call(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        metrics::gauge!("agentmesh_gateway_node_in_flight", "endpoint" => self.endpoint.clone())
            .increment(1.0);
        InFlight(Arc::clone(self))
    }

    /// Records a call that reached the node and got an answer (success
    /// or a caller's error) after `elapsed`. Called inside the breaker
    /// call, before the breaker sees the outcome.
    pub fn note_answered(&self, node_id: &str, elapsed: Duration) {
        self.health.consecutive_failures.store(0, Ordering::Release);
        self.health
            .window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(true);
        self.latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(PeakEwma {
                nanos: 0.0,
                updated: Instant::now(),
            })
            .observe(elapsed);
        if !node_id.is_empty() {
            self.remember_id(node_id);
        }
    }

    /// Records a failure that says the node is unhealthy (inside the
    /// breaker call, so that the transition hook can explain it).
    pub fn note_failure(&self, status: &Status) {
        self.health
            .consecutive_failures
            .fetch_add(1, Ordering::AcqRel);
        self.health
            .window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(false);
        *self
            .health
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = shorten(format!(
            "{} ({})",
            agentmesh_telemetry::code_name(status.code()),
            status.message()
        ));
    }

    fn remember_id(&self, node_id: &str) {
        let mut known = self.node_id.lock().unwrap_or_else(PoisonError::into_inner);
        if known.as_deref() != Some(node_id) {
            *known = Some(node_id.to_owned());
        }
    }

    /// Records what the node said through `GetLoad`.
    pub fn note_load(&self, load: &agent_pb::GetLoadResponse) {
        if !load.node_id.is_empty() {
            self.remember_id(&load.node_id);
        }
        let was_draining = self.draining.swap(load.draining, Ordering::AcqRel);
        if load.draining && !was_draining {
            tracing::info!(
                endpoint = self.endpoint,
                "agent node is draining: no new tasks"
            );
        }
        *self.reported.lock().unwrap_or_else(PoisonError::into_inner) = Some(Reported {
            in_flight: load.in_flight,
            queued: load.queued,
            capacity: load.capacity.max(1),
        });
    }

    /// Forgets what the node reported (it did not answer `GetLoad`).
    pub fn forget_load(&self) {
        self.draining.store(false, Ordering::Release);
        *self.reported.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// True while the node says it is shutting down.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn latency_nanos(&self) -> f64 {
        self.latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map_or(0.0, |estimate| estimate.decayed(Instant::now()))
    }

    /// The load p2c compares: the latency estimate times the work ahead
    /// of a new call (this gateway's calls in flight plus one, plus the
    /// node's own queue, which counts other gateways' work).
    pub fn cost(&self) -> f64 {
        let queued = self
            .reported
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map_or(0, |reported| reported.queued);
        let work = f64::from(self.in_flight()) + 1.0 + f64::from(queued);
        self.latency_nanos().max(MIN_RTT_NANOS) * work
    }

    /// A snapshot for `GetCircuitStates`.
    pub fn state(&self, config: BreakerConfig) -> NodeState {
        let breaker = self.breaker(config);
        let transitions = self
            .health
            .transitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (recent_successes, recent_failures) = self
            .health
            .window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counts();
        let state = breaker.state();
        let opened_at = if state == BreakerState::Closed {
            None
        } else {
            transitions.opened_at
        };
        NodeState {
            node_id: self
                .node_id
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .unwrap_or_else(|| self.endpoint.clone()),
            endpoint: self.endpoint.clone(),
            source: self.source.clone(),
            state,
            consecutive_failures: self.health.consecutive_failures.load(Ordering::Acquire),
            recent_successes,
            recent_failures,
            in_flight: self.in_flight(),
            opened_at,
            state_changed_at: transitions.changed_at,
            reason: transitions.reason,
            next_probe_at: (state == BreakerState::Open)
                .then(|| opened_at.map(|opened| opened + config.reset_timeout))
                .flatten(),
            latency: Duration::from_nanos(self.latency_nanos() as u64),
            reported: *self.reported.lock().unwrap_or_else(PoisonError::into_inner),
            draining: self.draining(),
        }
    }
}

/// Power of two choices: among the nodes not in `exclude` that are not
/// draining and whose breaker lets a call through, picks two at random and
/// returns the one with the lower [`Node::cost`] (ties broken at random).
/// A half-open node wins its pair, so that its probe happens and decides
/// whether it returns.
pub fn pick(
    nodes: &[Arc<Node>],
    exclude: &[Arc<Node>],
    config: BreakerConfig,
) -> Option<Arc<Node>> {
    let candidates: Vec<(&Arc<Node>, bool)> = nodes
        .iter()
        .filter(|node| !exclude.iter().any(|tried| Arc::ptr_eq(tried, node)))
        .filter(|node| !node.draining())
        .filter_map(|node| {
            let breaker = node.breaker(config);
            breaker
                .is_call_permitted()
                .then(|| (node, breaker.state() == BreakerState::HalfOpen))
        })
        .collect();
    let mut rng = rand::rng();
    let chosen = match candidates.len() {
        0 => return None,
        1 => candidates[0].0,
        count => {
            let first = rng.random_range(0..count);
            let mut second = rng.random_range(0..count - 1);
            if second >= first {
                second += 1;
            }
            match (candidates[first], candidates[second]) {
                ((probe, true), (_, false)) | ((_, false), (probe, true)) => probe,
                ((a, _), (b, _)) => {
                    let (cost_a, cost_b) = (a.cost(), b.cost());
                    if cost_a < cost_b || (cost_a == cost_b && rng.random_bool(0.5)) {
                        a
                    } else {
                        b
                    }
                }
            }
        }
    };
    Some(Arc::clone(chosen))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 2,
            reset_timeout: Duration::from_secs(300),
            ..BreakerConfig::default()
        }
    }

    fn nodes(count: u16) -> Vec<Arc<Node>> {
        (1..=count)
            .map(|port| {
                let endpoint = format!("http://127.0.0.1:{port}");
                Arc::new(
                    Node::new(&endpoint, &endpoint, &ConnectOptions::default(), config()).unwrap(),
                )
            })
            .collect()
    }

    fn index_of(nodes: &[Arc<Node>], node: &Arc<Node>) -> usize {
        nodes.iter().position(|n| Arc::ptr_eq(n, node)).unwrap()
    }

    #[tokio::test]
    async fn picks_the_less_loaded_node_and_skips_open_breakers() {
        let nodes = nodes(2);
        let busy: Vec<InFlight> = (0..3).map(|_| nodes[0].start_call()).collect();
        assert_eq!(nodes[0].in_flight(), 3);
        for _ in 0..20 {
            assert_eq!(index_of(&nodes, &pick(&nodes, &[], config()).unwrap()), 1);
        }
        let only = pick(&nodes, &nodes[1..], config()).unwrap();
        assert_eq!(index_of(&nodes, &only), 0);
        drop(busy);
        assert_eq!(nodes[0].in_flight(), 0);

        let breaker = nodes[1].breaker(config());
        for _ in 0..2 {
            let _ = breaker
                .call(async {
                    nodes[1].note_failure(&Status::unavailable("connection refused"));
                    Err::<(), _>("down")
                })
                .await;
        }
        let state = nodes[1].state(config());
        assert_eq!(state.state, BreakerState::Open);
        assert_eq!(state.recent_failures, 2);
        assert!(
            state
                .reason
                .starts_with("2 consecutive failures; last: UNAVAILABLE"),
            "{}",
            state.reason
        );
        let next = state.next_probe_at.unwrap();
        assert_eq!(next, state.opened_at.unwrap() + Duration::from_secs(300));
        for _ in 0..20 {
            assert_eq!(index_of(&nodes, &pick(&nodes, &[], config()).unwrap()), 0);
        }
        assert!(pick(&nodes, &nodes[..1], config()).is_none());

        // New live settings rebuild the breaker closed.
        let changed = BreakerConfig {
            failure_threshold: 3,
            ..config()
        };
        let state = nodes[1].state(changed);
        assert_eq!(state.state, BreakerState::Closed);
        assert!(state.opened_at.is_none());
        assert!(
            state.reason.contains("settings changed"),
            "{}",
            state.reason
        );
        let picked = pick(&nodes, &nodes[..1], changed).unwrap();
        assert_eq!(index_of(&nodes, &picked), 1);
    }

    #[tokio::test]
    async fn a_slow_node_costs_more_and_draining_nodes_are_skipped() {
        let nodes = nodes(2);
        nodes[0].note_answered("a", Duration::from_millis(50));
        nodes[1].note_answered("b", Duration::from_micros(500));
        assert!(nodes[0].cost() > 50.0 * nodes[1].cost());
        // The slow node wins only once the fast one has far more in flight.
        let busy: Vec<InFlight> = (0..200).map(|_| nodes[1].start_call()).collect();
        assert_eq!(index_of(&nodes, &pick(&nodes, &[], config()).unwrap()), 0);
        drop(busy);
        // A faster observation pulls the peak down only gradually.
        nodes[0].note_answered("a", Duration::from_micros(500));
        assert!(nodes[0].cost() > 10.0 * nodes[1].cost());

        nodes[1].note_load(&agent_pb::GetLoadResponse {
            node_id: "b".to_owned(),
            draining: true,
            capacity: 4,
            ..Default::default()
        });
        for _ in 0..10 {
            assert_eq!(index_of(&nodes, &pick(&nodes, &[], config()).unwrap()), 0);
        }
        nodes[1].forget_load();
        assert!(!nodes[1].draining());
    }
}
