//! The profiler: where each execution spent its time on the node. Every
//! response and every record carries these stage timings.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Per-stage durations of one execution, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Timings {
    /// Waiting for a node (and batch) slot.
    pub queue_wait_us: u64,
    /// Reading effective settings.
    pub config_lookup_us: u64,
    /// Sanitising and rendering.
    pub render_us: u64,
    /// Waiting for a provider in-flight slot.
    pub provider_queue_wait_us: u64,
    /// Request sent to first token.
    pub provider_first_token_us: u64,
    /// Request sent to end of response, retries included.
    pub provider_total_us: u64,
    /// Handing the record to the writer.
    pub record_us: u64,
    /// Provider attempts.
    pub provider_attempts: u32,
}

/// Microseconds of a duration, saturating.
pub fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl Timings {
    /// As the wire message.
    pub fn to_proto(&self) -> agentmesh_proto::agent::StageTimings {
        let duration = |us: u64| {
            Some(prost_types::Duration {
                seconds: (us / 1_000_000) as i64,
                nanos: ((us % 1_000_000) * 1000) as i32,
            })
        };
        agentmesh_proto::agent::StageTimings {
            queue_wait: duration(self.queue_wait_us),
            config_lookup: duration(self.config_lookup_us),
            render: duration(self.render_us),
            provider_queue_wait: duration(self.provider_queue_wait_us),
            provider_first_token: duration(self.provider_first_token_us),
            provider_total: duration(self.provider_total_us),
            record: duration(self.record_us),
            provider_attempts: self.provider_attempts,
        }
    }
}
