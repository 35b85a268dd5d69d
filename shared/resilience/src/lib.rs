//! Resilience building blocks shared by every service: exponential backoff
//! with jitter for reconnects and retries, and the helpers that turn domain
//! errors into precise gRPC statuses with machine-readable details.
//! Circuit breakers are [`Breaker`], a small trait implemented over failsafe
//! by [`CircuitBreaker`].

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod backoff;
pub mod breaker;
pub mod status;

pub use backoff::Backoff;
pub use breaker::{
    Breaker, BreakerConfig, BreakerError, BreakerState, CircuitBreaker, FailureRate,
};
pub use status::{FieldViolation, invalid_argument};
