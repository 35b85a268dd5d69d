//! Circuit breakers: the [`Breaker`] trait services program against, and
//! [`CircuitBreaker`], its implementation over `failsafe`: consecutive
//! failures, or (when configured) a failure rate over a time window, open
//! it; after the reset timeout a bounded number of probe calls decide
//! whether it closes again (the first probe success closes it, a probe
//! failure opens it for another reset timeout). Keeping failsafe behind
//! this trait lets it be replaced without touching services.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::Duration;

use failsafe::backoff::{self, Constant};
use failsafe::failure_policy::{
    self, ConsecutiveFailures, FailurePolicy, OrElse, SuccessRateOverTimeWindow,
};
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
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long an open breaker rejects calls before probing again.
    pub reset_timeout: Duration,
    /// Probe calls let through at once while half-open (at least 1).
    pub half_open_max_probes: u32,
    /// Opens the breaker when the failure rate over `window` reaches this
    /// fraction (0 < rate <= 1) with at least `min_requests` calls in the
    /// window; `None` uses consecutive failures only.
    pub failure_rate: Option<FailureRate>,
}

/// The failure-rate rule of a [`BreakerConfig`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FailureRate {
    /// Failure fraction that opens the breaker, in (0, 1].
    pub threshold: f64,
    /// Calls the window must hold before the rate counts.
    pub min_requests: u32,
    /// The window (whole seconds; at least 1 s).
    pub window: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            reset_timeout: Duration::from_secs(60),
            half_open_max_probes: 1,
            failure_rate: None,
        }
    }
}

type Policy = OrElse<ConsecutiveFailures<Constant>, OptionalRate>;

/// The failure-rate policy when one is configured; never trips otherwise.
struct OptionalRate(Option<SuccessRateOverTimeWindow<Constant>>);

impl FailurePolicy for OptionalRate {
    fn record_success(&mut self) {
        if let Some(rate) = &mut self.0 {
            rate.record_success();
        }
    }

    fn mark_dead_on_failure(&mut self) -> Option<Duration> {
        self.0
            .as_mut()
            .and_then(FailurePolicy::mark_dead_on_failure)
    }

    fn revived(&mut self) {
        if let Some(rate) = &mut self.0 {
            rate.revived();
        }
    }
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
/// policy (or else a failure-rate policy), a constant reset timeout, and a
/// cap on concurrent half-open probes.
#[derive(Clone)]
pub struct CircuitBreaker {
    machine: StateMachine<Policy, StateInstrument>,
    state: Arc<AtomicU8>,
    probes: Arc<AtomicU32>,
    max_probes: u32,
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
        let rate = config.failure_rate.map(|rate| {
            failure_policy::success_rate_over_time_window(
                (1.0 - rate.threshold).clamp(0.0, 1.0),
                rate.min_requests.max(1),
                rate.window.max(Duration::from_secs(1)),
                backoff::constant(config.reset_timeout),
            )
        });
        let policy = failure_policy::consecutive_failures(
            config.failure_threshold.max(1),
            backoff::constant(config.reset_timeout),
        )
        .or_else(OptionalRate(rate));
        let machine = failsafe::Config::new()
            .failure_policy(policy)
            .instrument(instrument)
            .build();
        Self {
            machine,
            state,
            probes: Arc::new(AtomicU32::new(0)),
            max_probes: config.half_open_max_probes.max(1),
        }
    }

    /// Takes a probe slot while half-open; `None` when all are taken.
    fn probe_slot(&self) -> Option<ProbeSlot> {
        let taken = self
            .probes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |probes| {
                (probes < self.max_probes).then_some(probes + 1)
            });
        taken.ok().map(|_| ProbeSlot(Arc::clone(&self.probes)))
    }
}

/// A half-open probe in progress; frees its slot when dropped.
struct ProbeSlot(Arc<AtomicU32>);

impl Drop for ProbeSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
            && (self.state() != BreakerState::HalfOpen
                || self.probes.load(Ordering::Acquire) < self.max_probes)
    }

    fn call<T, E, F>(&self, future: F) -> impl Future<Output = Result<T, BreakerError<E>>> + Send
    where
        F: Future<Output = Result<T, E>> + Send,
        T: Send,
        E: Send,
    {
        // While half-open only `half_open_max_probes` calls go through at
        // once; the others are rejected as if the breaker were open.
        let half_open = self.machine.is_call_permitted() && self.state() == BreakerState::HalfOpen;
        let probe = half_open.then(|| self.probe_slot());
        let guarded = self.machine.call(future);
        async move {
            let _probe = match probe {
                Some(None) => return Err(BreakerError::Rejected),
                Some(Some(slot)) => Some(slot),
                None => None,
            };
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
                ..BreakerConfig::default()
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

    #[tokio::test]
    async fn half_open_lets_only_the_configured_probes_through() {
        let breaker = CircuitBreaker::new(BreakerConfig {
            failure_threshold: 1,
            reset_timeout: Duration::from_millis(30),
            half_open_max_probes: 2,
            failure_rate: None,
        });
        let _ = breaker.call(async { Err::<(), _>("down") }).await;
        assert_eq!(breaker.state(), BreakerState::Open);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(breaker.is_call_permitted());
        let (release, wait) = tokio::sync::watch::channel(false);
        let probe = |mut wait: tokio::sync::watch::Receiver<bool>| {
            let breaker = breaker.clone();
            async move {
                breaker
                    .call(async move {
                        let _ = wait.wait_for(|go| *go).await;
                        Ok::<_, &str>(())
                    })
                    .await
            }
        };
        let first = tokio::spawn(probe(wait.clone()));
        let second = tokio::spawn(probe(wait.clone()));
        tokio::task::yield_now().await;
        while breaker.probes.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        assert!(!breaker.is_call_permitted());
        let third = breaker.call(async { Ok::<_, &str>(()) }).await;
        assert!(matches!(third, Err(BreakerError::Rejected)));
        release.send(true).unwrap();
        assert!(first.await.unwrap().is_ok());
        assert!(second.await.unwrap().is_ok());
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.probes.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_high_failure_rate_opens_the_breaker_without_consecutive_failures() {
        let breaker = CircuitBreaker::new(BreakerConfig {
            failure_threshold: 1_000,
            reset_timeout: Duration::from_secs(60),
            half_open_max_probes: 1,
            failure_rate: Some(FailureRate {
                threshold: 0.3,
                min_requests: 10,
                window: Duration::from_secs(1),
            }),
        });
        // Alternate failures and successes: never two failures in a row,
        // but a 50% failure rate (over the 30% threshold). The window must have been observed for a
        // whole window before the rate counts.
        let started = std::time::Instant::now();
        let mut opened = false;
        while started.elapsed() < Duration::from_secs(5) {
            // failsafe's rate is a time-weighted moving average: calls in
            // the same millisecond weigh nothing, so space them out.
            let _ = breaker.call(async { Ok::<_, &str>(()) }).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = breaker.call(async { Err::<(), _>("down") }).await;
            if breaker.state() == BreakerState::Open {
                opened = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(opened, "a 50% failure rate never opened the breaker");
    }
}
