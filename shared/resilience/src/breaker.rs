//! Circuit breakers: the [`Breaker`] trait services program against, and
//! [`CircuitBreaker`], its implementation over `failsafe` (consecutive
//! failures open it; after the reset timeout one probe at a time decides
//! whether it closes again). Keeping failsafe behind this trait lets it be
//! replaced without touching services.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use failsafe::backoff::{self, Constant};
use failsafe::failure_policy::{self, ConsecutiveFailures};
use failsafe::futures::CircuitBreaker as _;
use failsafe::{Instrument, StateMachine};

/// Where a breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls pass through.
    Closed,
    /// Calls are rejected at once until the reset timeout passes.
    Open,
    /// The reset timeout passed: calls probe the dependency; a success
    /// closes the breaker, a failure opens it again.
    HalfOpen,
}

impl BreakerState {
    /// Lowercase name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Why a call through a breaker failed.
#[derive(Debug, thiserror::Error)]
pub enum BreakerError<E> {
    /// The breaker is open: the call was not attempted.
    #[error("circuit breaker is open")]
    Rejected,
    /// The call was attempted and failed.
    #[error(transparent)]
    Inner(E),
}

/// A circuit breaker around one dependency.
pub trait Breaker: Send + Sync {
    /// The current state.
    fn state(&self) -> BreakerState;

    /// Returns true when a call may be attempted now (moves an open breaker
    /// whose reset timeout passed to half-open).
    fn is_call_permitted(&self) -> bool;

    /// Runs `future` unless the breaker is open, recording its outcome.
    fn call<T, E, F>(&self, future: F) -> impl Future<Output = Result<T, BreakerError<E>>> + Send
    where
        F: Future<Output = Result<T, E>> + Send,
        T: Send,
        E: Send;
}

/// Settings of a [`CircuitBreaker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long an open breaker rejects calls before probing again.
    pub reset_timeout: Duration,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Records state transitions so the state can be read without a call, and
/// runs the owner's hook on each transition.
#[derive(Clone)]
struct StateInstrument {
    state: Arc<AtomicU8>,
    on_transition: Arc<dyn Fn(BreakerState) + Send + Sync>,
}

impl StateInstrument {
    fn transit(&self, code: u8, state: BreakerState) {
        if self.state.swap(code, Ordering::AcqRel) != code {
            (self.on_transition)(state);
        }
    }
}

impl Instrument for StateInstrument {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        self.transit(OPEN, BreakerState::Open);
    }

    fn on_half_open(&self) {
        self.transit(HALF_OPEN, BreakerState::HalfOpen);
    }

    fn on_closed(&self) {
        self.transit(CLOSED, BreakerState::Closed);
    }
}

/// A [`Breaker`] over failsafe's state machine with a consecutive-failures
/// policy and a constant reset timeout.
#[derive(Clone)]
pub struct CircuitBreaker {
    machine: StateMachine<ConsecutiveFailures<Constant>, StateInstrument>,
    state: Arc<AtomicU8>,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("state", &self.state())
            .finish()
    }
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self::with_transition_hook(config, |_| {})
    }

    /// A closed breaker that calls `on_transition` with each new state
    /// (for logs, metrics, or dropping state that may have gone stale).
    pub fn with_transition_hook(
        config: BreakerConfig,
        on_transition: impl Fn(BreakerState) + Send + Sync + 'static,
    ) -> Self {
        let state = Arc::new(AtomicU8::new(CLOSED));
        let instrument = StateInstrument {
            state: Arc::clone(&state),
            on_transition: Arc::new(on_transition),
        };
        let policy = failure_policy::consecutive_failures(
            config.failure_threshold.max(1),
            backoff::constant(config.reset_timeout),
        );
        let machine = failsafe::Config::new()
            .failure_policy(policy)
            .instrument(instrument)
            .build();
        Self { machine, state }
    }
}

impl Breaker for CircuitBreaker {
    fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    fn is_call_permitted(&self) -> bool {
        self.machine.is_call_permitted()
    }

    fn call<T, E, F>(&self, future: F) -> impl Future<Output = Result<T, BreakerError<E>>> + Send
    where
        F: Future<Output = Result<T, E>> + Send,
        T: Send,
        E: Send,
    {
        let guarded = self.machine.call(future);
        async move {
            guarded.await.map_err(|error| match error {
                failsafe::Error::Rejected => BreakerError::Rejected,
                failsafe::Error::Inner(inner) => BreakerError::Inner(inner),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn opens_after_consecutive_failures_and_closes_after_a_probe() {
        let transitions = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&transitions);
        let breaker = CircuitBreaker::with_transition_hook(
            BreakerConfig {
                failure_threshold: 2,
                reset_timeout: Duration::from_millis(50),
            },
            move |state| seen.lock().unwrap().push(state),
        );
        assert_eq!(breaker.state(), BreakerState::Closed);
        for _ in 0..2 {
            let outcome = breaker.call(async { Err::<(), _>("down") }).await;
            assert!(matches!(outcome, Err(BreakerError::Inner("down"))));
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        let rejected = breaker.call(async { Ok::<_, &str>(1) }).await;
        assert!(matches!(rejected, Err(BreakerError::Rejected)));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(breaker.is_call_permitted());
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        let probe = breaker.call(async { Ok::<_, &str>(7) }).await;
        assert!(matches!(probe, Ok(7)));
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(
            *transitions.lock().unwrap(),
            [
                BreakerState::Open,
                BreakerState::HalfOpen,
                BreakerState::Closed
            ]
        );
    }
}
