//! Agent nodes as the gateway sees them: a lazily connecting traced
//! channel, a circuit breaker whose settings follow the live config, an
//! in-flight counter, and power-of-two-choices selection over it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use agentmesh_client::{ClientError, TracedChannel, connect_lazy};
use agentmesh_proto::agent::agent_service_client::AgentServiceClient;
use agentmesh_resilience::{Breaker, BreakerConfig, BreakerState, CircuitBreaker};
use agentmesh_settings::LiveSettings;
use rand::Rng;

/// The breaker of one node and the settings it was built with.
struct BreakerSlot {
    config: BreakerConfig,
    breaker: CircuitBreaker,
}

/// What the transition hook records.
#[derive(Clone, Copy, Debug)]
struct Transitions {
    changed_at: SystemTime,
    opened_at: Option<SystemTime>,
}

/// One agent node.
pub struct Node {
    endpoint: String,
    client: AgentServiceClient<TracedChannel>,
    node_id: Mutex<Option<String>>,
    breaker: Mutex<BreakerSlot>,
    transitions: Arc<Mutex<Transitions>>,
    in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
}

/// A snapshot of one node for `GetCircuitStates`.
#[derive(Clone, Debug)]
pub struct NodeState {
    /// Node id as the node reports it (its endpoint until it has answered).
    pub node_id: String,
    /// Endpoint.
    pub endpoint: String,
    /// Breaker state.
    pub state: BreakerState,
    /// Health failures since the last success.
    pub consecutive_failures: u32,
    /// Calls in flight.
    pub in_flight: u32,
    /// When the breaker last opened, while it is not closed.
    pub opened_at: Option<SystemTime>,
    /// When the breaker last changed state.
    pub state_changed_at: SystemTime,
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
    BreakerConfig {
        failure_threshold: u32::try_from(live.breaker.failure_threshold.max(1)).unwrap_or(u32::MAX),
        reset_timeout: Duration::from_secs(
            u64::try_from(live.breaker.reset_timeout_seconds.max(1)).unwrap_or(1),
        ),
    }
}

fn new_breaker(
    endpoint: &str,
    config: BreakerConfig,
    transitions: &Arc<Mutex<Transitions>>,
) -> CircuitBreaker {
    let endpoint = endpoint.to_owned();
    let transitions = Arc::clone(transitions);
    CircuitBreaker::with_transition_hook(config, move |state| {
        let now = SystemTime::now();
        {
            let mut seen = transitions.lock().unwrap_or_else(PoisonError::into_inner);
            seen.changed_at = now;
            match state {
                BreakerState::Open => seen.opened_at = Some(now),
                BreakerState::Closed => seen.opened_at = None,
                BreakerState::HalfOpen => {}
            }
        }
        tracing::warn!(
            endpoint,
            state = state.as_str(),
            "agent node circuit breaker changed state"
        );
        metrics::counter!(
            "agentmesh_gateway_breaker_transitions_total",
            "endpoint" => endpoint.clone(),
            "state" => state.as_str()
        )
        .increment(1);
        metrics::gauge!("agentmesh_gateway_breaker_state", "endpoint" => endpoint.clone())
            .set(state_number(state));
    })
}

fn state_number(state: BreakerState) -> f64 {
    match state {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 1.0,
        BreakerState::Open => 2.0,
    }
}

impl Node {
    /// A node at `endpoint` (nothing is connected until the first call).
    pub fn new(
        endpoint: &str,
        config: BreakerConfig,
        max_message_bytes: usize,
    ) -> Result<Self, ClientError> {
        let client = AgentServiceClient::new(connect_lazy(endpoint)?)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        let transitions = Arc::new(Mutex::new(Transitions {
            changed_at: SystemTime::now(),
            opened_at: None,
        }));
        let breaker = new_breaker(endpoint, config, &transitions);
        Ok(Self {
            endpoint: endpoint.to_owned(),
            client,
            node_id: Mutex::new(None),
            breaker: Mutex::new(BreakerSlot { config, breaker }),
            transitions,
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
        })
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A client for the node (cheap: the channel is shared).
    pub fn client(&self) -> AgentServiceClient<TracedChannel> {
        self.client.clone()
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
                "agent node circuit breaker rebuilt with new settings"
            );
            slot.breaker = new_breaker(&self.endpoint, config, &self.transitions);
            slot.config = config;
            self.consecutive_failures.store(0, Ordering::Release);
            let mut seen = self
                .transitions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            seen.changed_at = SystemTime::now();
            seen.opened_at = None;
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
    /// or a caller's error).
    pub fn record_healthy(&self, node_id: &str) {
        self.consecutive_failures.store(0, Ordering::Release);
        if !node_id.is_empty() {
            let mut known = self.node_id.lock().unwrap_or_else(PoisonError::into_inner);
            if known.as_deref() != Some(node_id) {
                *known = Some(node_id.to_owned());
            }
        }
    }

    /// Records a failure that says the node is unhealthy.
    pub fn record_unhealthy(&self) {
        self.consecutive_failures.fetch_add(1, Ordering::AcqRel);
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// A snapshot for `GetCircuitStates`.
    pub fn state(&self, config: BreakerConfig) -> NodeState {
        let breaker = self.breaker(config);
        let transitions = *self
            .transitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let state = breaker.state();
        NodeState {
            node_id: self
                .node_id
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .unwrap_or_else(|| self.endpoint.clone()),
            endpoint: self.endpoint.clone(),
            state,
            consecutive_failures: self.consecutive_failures.load(Ordering::Acquire),
            in_flight: self.in_flight(),
            opened_at: if state == BreakerState::Closed {
                None
            } else {
                transitions.opened_at
            },
            state_changed_at: transitions.changed_at,
        }
    }
}

/// Power of two choices: among the nodes not in `exclude` whose breaker
/// lets a call through, picks two at random and returns the one with fewer
/// calls in flight (ties broken at random).
pub fn pick<'a>(
    nodes: &'a [Arc<Node>],
    exclude: &[usize],
    config: BreakerConfig,
) -> Option<(usize, &'a Arc<Node>)> {
    let candidates: Vec<usize> = (0..nodes.len())
        .filter(|index| !exclude.contains(index))
        .filter(|&index| nodes[index].breaker(config).is_call_permitted())
        .collect();
    let mut rng = rand::rng();
    let chosen = match candidates.len() {
        0 => return None,
        1 => candidates[0],
        count => {
            let first = rng.random_range(0..count);
            let mut second = rng.random_range(0..count - 1);
            if second >= first {
                second += 1;
            }
            let (a, b) = (candidates[first], candidates[second]);
            let (load_a, load_b) = (nodes[a].in_flight(), nodes[b].in_flight());
            if load_a < load_b || (load_a == load_b && rng.random_bool(0.5)) {
                a
            } else {
                b
            }
        }
    };
    Some((chosen, &nodes[chosen]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 2,
            reset_timeout: Duration::from_secs(300),
        }
    }

    #[tokio::test]
    async fn picks_the_less_loaded_node_and_skips_open_breakers() {
        let nodes: Vec<Arc<Node>> = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
            .into_iter()
            .map(|endpoint| Arc::new(Node::new(endpoint, config(), 1 << 20).unwrap()))
            .collect();
        let busy: Vec<InFlight> = (0..3).map(|_| nodes[0].start_call()).collect();
        assert_eq!(nodes[0].in_flight(), 3);
        for _ in 0..20 {
            assert_eq!(pick(&nodes, &[], config()).unwrap().0, 1);
        }
        assert_eq!(pick(&nodes, &[1], config()).unwrap().0, 0);
        drop(busy);
        assert_eq!(nodes[0].in_flight(), 0);

        let breaker = nodes[1].breaker(config());
        for _ in 0..2 {
            let _ = breaker.call(async { Err::<(), _>("down") }).await;
        }
        assert_eq!(nodes[1].state(config()).state, BreakerState::Open);
        for _ in 0..20 {
            assert_eq!(pick(&nodes, &[], config()).unwrap().0, 0);
        }
        assert!(pick(&nodes, &[0], config()).is_none());

        // New live settings rebuild the breaker closed.
        let changed = BreakerConfig {
            failure_threshold: 3,
            ..config()
        };
        let state = nodes[1].state(changed);
        assert_eq!(state.state, BreakerState::Closed);
        assert!(state.opened_at.is_none());
        assert_eq!(pick(&nodes, &[0], changed).unwrap().0, 1);
    }
}
