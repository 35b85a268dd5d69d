//! Exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng;

/// Produces growing, jittered delays between attempts.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays start near `initial` and double up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    /// Returns the next delay: uniformly random in `[ceiling/2, ceiling]`,
    /// where the ceiling doubles each attempt up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        let half = ceiling / 2;
        let jitter_range = ceiling.saturating_sub(half).as_micros() as u64;
        let jitter = if jitter_range == 0 {
            0
        } else {
            rand::rng().random_range(0..=jitter_range)
        };
        half + Duration::from_micros(jitter)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_bounded() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = backoff.next_delay();
        assert!(
            first >= Duration::from_millis(50) && first <= Duration::from_millis(100),
            "{first:?}"
        );
        for _ in 0..30 {
            assert!(backoff.next_delay() <= Duration::from_secs(2));
        }
        let late = backoff.next_delay();
        assert!(late >= Duration::from_secs(1), "{late:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
