//! [`Limiter`]: a resizable bound on work in flight with a bounded, timed
//! wait queue. It guards the node's executions and each provider's
//! in-flight requests, so a burst waits (up to a limit, for a limited time)
//! instead of opening unbounded connections or growing memory.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Why a slot was not granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    /// The wait queue is full.
    #[error("{queued} requests already wait for {capacity} slots")]
    QueueFull {
        /// Slots.
        capacity: usize,
        /// Requests waiting.
        queued: usize,
    },
    /// No slot freed up within the wait limit.
    #[error("no slot of {capacity} freed up within {waited:?}")]
    Timeout {
        /// Slots.
        capacity: usize,
        /// How long it waited.
        waited: Duration,
    },
}

#[derive(Debug)]
struct State {
    capacity: usize,
    in_flight: usize,
    queued: usize,
    max_queued: usize,
}

/// A bound on concurrent work with a bounded wait queue.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    released: Notify,
}

/// A held slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.lock().in_flight -= 1;
        self.limiter.released.notify_one();
    }
}

/// Counts a waiter in `queued` until it gets a slot or gives up (including
/// by being cancelled).
struct Queued<'a> {
    limiter: &'a Limiter,
    counted: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.limiter.lock().queued -= 1;
        }
    }
}

/// Occupancy at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    /// Slots in use.
    pub in_flight: usize,
    /// Requests waiting for a slot.
    pub queued: usize,
    /// Slots.
    pub capacity: usize,
}

impl Limiter {
    /// A limiter with `capacity` slots (at least 1) and room for
    /// `max_queued` waiters.
    pub fn new(capacity: usize, max_queued: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                capacity: capacity.max(1),
                in_flight: 0,
                queued: 0,
                max_queued,
            }),
            released: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update
        // is a single field assignment.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes the number of slots (at least 1). Work already in flight
    /// keeps its slot; a smaller capacity takes effect as it finishes.
    pub fn set_capacity(&self, capacity: usize) {
        let grew = {
            let mut state = self.lock();
            let grew = capacity > state.capacity;
            state.capacity = capacity.max(1);
            grew
        };
        if grew {
            self.released.notify_waiters();
        }
    }

    /// Current occupancy.
    pub fn occupancy(&self) -> Occupancy {
        let state = self.lock();
        Occupancy {
            in_flight: state.in_flight,
            queued: state.queued,
            capacity: state.capacity,
        }
    }

    /// Waits for a slot at most `max_wait`.
    pub async fn acquire(self: &Arc<Self>, max_wait: Duration) -> Result<Permit, AcquireError> {
        let started = Instant::now();
        let deadline = started + max_wait;
        let mut queued = Queued {
            limiter: self,
            counted: false,
        };
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before looking at the state, so a release between
            // the check and the wait is not missed.
            released.as_mut().enable();
            {
                let mut state = self.lock();
                if state.in_flight < state.capacity {
                    state.in_flight += 1;
                    if queued.counted {
                        state.queued -= 1;
                        queued.counted = false;
                    }
                    return Ok(Permit {
                        limiter: Arc::clone(self),
                    });
                }
                if !queued.counted {
                    if state.queued >= state.max_queued {
                        return Err(AcquireError::QueueFull {
                            capacity: state.capacity,
                            queued: state.queued,
                        });
                    }
                    state.queued += 1;
                    queued.counted = true;
                }
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                let capacity = self.lock().capacity;
                return Err(AcquireError::Timeout {
                    capacity,
                    waited: started.elapsed(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounds_in_flight_and_queue() {
        let limiter = Limiter::new(2, 1);
        let first = limiter.acquire(Duration::from_secs(1)).await.unwrap();
        let _second = limiter.acquire(Duration::from_secs(1)).await.unwrap();
        let waiter = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move { limiter.acquire(Duration::from_secs(10)).await.is_ok() })
        };
        while limiter.occupancy().queued == 0 {
            tokio::task::yield_now().await;
        }
        // The queue (1) is full now.
        assert!(matches!(
            limiter.acquire(Duration::from_secs(1)).await,
            Err(AcquireError::QueueFull { .. })
        ));
        drop(first);
        assert!(waiter.await.unwrap());
        assert_eq!(limiter.occupancy().queued, 0);
    }

    #[tokio::test]
    async fn times_out_and_uncounts_the_waiter() {
        let limiter = Limiter::new(1, 5);
        let _held = limiter.acquire(Duration::from_secs(1)).await.unwrap();
        let outcome = limiter.acquire(Duration::from_millis(20)).await;
        assert!(matches!(outcome, Err(AcquireError::Timeout { .. })));
        assert_eq!(limiter.occupancy().queued, 0);
    }

    #[tokio::test]
    async fn growing_capacity_wakes_waiters() {
        let limiter = Limiter::new(1, 5);
        let _held = limiter.acquire(Duration::from_secs(1)).await.unwrap();
        let waiter = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move { limiter.acquire(Duration::from_secs(10)).await.is_ok() })
        };
        while limiter.occupancy().queued == 0 {
            tokio::task::yield_now().await;
        }
        limiter.set_capacity(2);
        assert!(waiter.await.unwrap());
        assert_eq!(limiter.occupancy().capacity, 2);
    }
}
