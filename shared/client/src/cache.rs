//! [`CacheClient`]: the cache service from Rust, with
//! [`CacheClient::get_or_fetch`], the whole stampede-free
//! `get_with_fallback` dance in one call.

use std::future::Future;
use std::time::Duration;

use agentmesh_proto::cache as pb;
use agentmesh_proto::cache::cache_service_client::CacheServiceClient;

use agentmesh_settings::ClientTlsSettings;

use crate::channel::{ClientError, TracedChannel, connect_lazy};

/// How many times `get_or_fetch` asks again while another caller holds the
/// lease, before it computes the value itself without caching it.
const STILL_LEASED_RETRIES: u32 = 2;

/// A client of one namespace of the cache service.
#[derive(Clone, Debug)]
pub struct CacheClient {
    client: CacheServiceClient<TracedChannel>,
    namespace: String,
    lease_timeout: Duration,
    max_wait: Duration,
}

fn proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: duration.subsec_nanos() as i32,
    }
}

impl CacheClient {
    /// A client of `namespace` on the cache service at `endpoint`, with a
    /// 30 s lease timeout and a 5 s wait for other fillers.
    pub fn connect_lazy(
        endpoint: &str,
        tls: &ClientTlsSettings,
        namespace: &str,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            client: CacheServiceClient::new(connect_lazy(endpoint, tls)?),
            namespace: namespace.to_owned(),
            lease_timeout: Duration::from_secs(30),
            max_wait: Duration::from_secs(5),
        })
    }

    /// Sets how long a granted lease lasts (how long `fetch` may take
    /// before another caller takes over) and how long to wait for another
    /// caller's fill.
    pub fn with_lease(mut self, lease_timeout: Duration, max_wait: Duration) -> Self {
        self.lease_timeout = lease_timeout;
        self.max_wait = max_wait;
        self
    }

    /// The generated client, for the other RPCs.
    pub fn raw(&self) -> CacheServiceClient<TracedChannel> {
        self.client.clone()
    }

    /// Returns the cached value of `key`, or computes it with `fetch` and
    /// caches it for `ttl`, such that concurrent callers anywhere compute it
    /// once: on a miss exactly one caller gets the lease and runs `fetch`,
    /// the others wait for its value. If the cache service is unreachable
    /// or misbehaves, `fetch` runs and its value is returned uncached: the
    /// cache never makes a call fail that the source would have answered.
    /// Errors of `fetch` are returned as they are and nothing is cached.
    pub async fn get_or_fetch<F, Fut, E>(
        &self,
        key: &str,
        ttl: Duration,
        fetch: F,
    ) -> Result<Vec<u8>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, E>>,
    {
        let mut client = self.client.clone();
        let mut retries = 0;
        loop {
            let request = pb::GetOrLeaseRequest {
                namespace: self.namespace.clone(),
                key: key.to_owned(),
                lease_timeout: Some(proto_duration(self.lease_timeout)),
                max_wait: Some(proto_duration(self.max_wait)),
            };
            let response = match client.get_or_lease(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    tracing::warn!(namespace = %self.namespace, key, %status, "cache unavailable; fetching from the source");
                    return fetch().await;
                }
            };
            match pb::LeaseOutcome::try_from(response.outcome) {
                Ok(pb::LeaseOutcome::Hit | pb::LeaseOutcome::Filled) => {
                    if let Some(entry) = response.entry {
                        return Ok(entry.value);
                    }
                    return fetch().await;
                }
                Ok(pb::LeaseOutcome::Granted) => {
                    let value = fetch().await?;
                    let set = pb::SetRequest {
                        namespace: self.namespace.clone(),
                        key: key.to_owned(),
                        value: value.clone(),
                        ttl: Some(proto_duration(ttl)),
                        lease_token: Some(response.lease_token),
                        ..Default::default()
                    };
                    if let Err(status) = client.set(set).await {
                        tracing::warn!(namespace = %self.namespace, key, %status, "cannot cache the fetched value");
                    }
                    return Ok(value);
                }
                Ok(pb::LeaseOutcome::StillLeased) if retries < STILL_LEASED_RETRIES => {
                    retries += 1;
                }
                _ => return fetch().await,
            }
        }
    }
}
