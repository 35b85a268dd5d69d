//! Keeping replicas' L1s coherent: every `Set`, `Delete` and `Invalidate`
//! is published on the Redis channel `<key_prefix>inval`; every replica
//! subscribes and drops the matching L1 entries. While a replica is not
//! subscribed it does not trust its L1 (reads go to Redis) unless Redis is
//! unreachable altogether, and each (re)subscription starts from an empty
//! L1, so invalidations missed during an outage cannot leave stale entries.

use std::sync::Arc;
use std::time::Duration;

use agentmesh_resilience::{Backoff, BreakerState};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::l2::L2;
use crate::service::CacheCore;

/// What to drop from every replica's L1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// One key.
    Key {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
    },
    /// Keys starting with a prefix.
    Prefix {
        /// Namespace.
        namespace: String,
        /// Prefix (may be empty: the whole namespace).
        prefix: String,
    },
    /// Entries carrying a tag.
    Tag {
        /// Namespace.
        namespace: String,
        /// Tag.
        tag: String,
    },
}

impl Invalidation {
    /// `<origin>\n<k|p|t>\n<namespace>\n<argument>`; the argument comes last
    /// so it may contain anything.
    pub fn encode(&self, origin: &str) -> Vec<u8> {
        let (kind, namespace, argument) = match self {
            Invalidation::Key { namespace, key } => ("k", namespace, key),
            Invalidation::Prefix { namespace, prefix } => ("p", namespace, prefix),
            Invalidation::Tag { namespace, tag } => ("t", namespace, tag),
        };
        format!("{origin}\n{kind}\n{namespace}\n{argument}").into_bytes()
    }

    /// Reverses [`Invalidation::encode`], returning the origin too.
    pub fn decode(payload: &[u8]) -> Option<(String, Invalidation)> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut parts = text.splitn(4, '\n');
        let origin = parts.next()?.to_owned();
        let kind = parts.next()?;
        let namespace = parts.next()?.to_owned();
        let argument = parts.next()?.to_owned();
        let invalidation = match kind {
            "k" => Invalidation::Key {
                namespace,
                key: argument,
            },
            "p" => Invalidation::Prefix {
                namespace,
                prefix: argument,
            },
            "t" => Invalidation::Tag {
                namespace,
                tag: argument,
            },
            _ => return None,
        };
        Some((origin, invalidation))
    }
}

/// Subscribes to the invalidation channel and applies what other replicas
/// publish, resubscribing with backoff after any loss, until `shutdown`.
pub async fn run_subscriber(core: Arc<CacheCore>, l2: Arc<L2>, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let channel = l2.channel();
    loop {
        let connect = async {
            let mut pubsub = l2.client().get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let connected = tokio::select! {
            () = shutdown.cancelled() => return,
            connected = tokio::time::timeout(Duration::from_secs(2), connect) => connected,
        };
        match connected {
            Ok(Ok(pubsub)) => {
                backoff.reset();
                core.on_subscribed();
                let mut messages = pubsub.into_on_message();
                let mut check = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        message = messages.next() => match message {
                            Some(message) => core.apply_remote(message.get_payload_bytes()).await,
                            None => break,
                        },
                        _ = check.tick() => {
                            // Commands fail while the subscription looks
                            // alive (a half-dead connection): start over.
                            if l2.breaker_state() == BreakerState::Open {
                                break;
                            }
                        }
                    }
                }
                core.on_unsubscribed();
            }
            Ok(Err(error)) => tracing::debug!(%error, "cannot subscribe to redis invalidations"),
            Err(_) => tracing::debug!("subscribing to redis invalidations timed out"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// While the breaker is not closed, pings Redis every half reset timeout so
/// the breaker closes by itself once Redis is back, even with no traffic.
pub async fn run_prober(l2: Arc<L2>, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if l2.breaker_state() != BreakerState::Closed && l2.is_call_permitted() {
                    let _ = l2.ping().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for invalidation in [
            Invalidation::Key {
                namespace: "ns".into(),
                key: "a\nb".into(),
            },
            Invalidation::Prefix {
                namespace: "ns".into(),
                prefix: String::new(),
            },
            Invalidation::Tag {
                namespace: "n.s".into(),
                tag: "t".into(),
            },
        ] {
            let (origin, decoded) = Invalidation::decode(&invalidation.encode("node")).unwrap();
            assert_eq!(origin, "node");
            assert_eq!(decoded, invalidation);
        }
        assert!(Invalidation::decode(b"node\nx\nns\nk").is_none());
        assert!(Invalidation::decode(b"garbage").is_none());
    }
}
