//! Resilience building blocks shared by every service: exponential backoff
//! with jitter for reconnects and retries, and the helpers that turn domain
//! errors into precise gRPC statuses with machine-readable details.
//! (Circuit breakers join here, behind a small trait over failsafe, with the
//! first service that calls a dependency through one.)

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod backoff;
pub mod status;

pub use backoff::Backoff;
pub use status::{FieldViolation, invalid_argument};
