//! The `agentmesh.cache.v1.CacheService` implementation: validates wire
//! requests (every limit, each violation naming its field and rule), calls
//! [`CacheCore`], converts results back.

use std::sync::Arc;
use std::time::Duration;

use agentmesh_proto::cache as pb;
use agentmesh_proto::common::CircuitState;
use agentmesh_resilience::{BreakerState, FieldViolation};
use tonic::{Request, Response, Status};

use crate::entry::{Entry, Found};
use crate::error::CacheError;
use crate::service::{CacheCore, L2Mode, LeaseResult, Level, Selector, SetCommand};

/// Longest namespace.
const MAX_NAMESPACE_BYTES: usize = 64;
/// Longest content type.
const MAX_CONTENT_TYPE_BYTES: usize = 128;
/// Most tags per entry.
const MAX_TAGS: usize = 16;
/// Longest tag.
const MAX_TAG_BYTES: usize = 128;
/// Longest lease token.
const MAX_LEASE_TOKEN_BYTES: usize = 128;
/// TTL bounds.
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Lease timeout bounds.
const MIN_LEASE_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_LEASE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for another lease holder.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// Request limits that come from settings.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest key in bytes.
    pub max_key_bytes: usize,
    /// Largest value in bytes.
    pub max_value_bytes: usize,
}

/// The gRPC face of [`CacheCore`].
pub struct CacheGrpc {
    core: Arc<CacheCore>,
    limits: Limits,
}

impl CacheGrpc {
    /// Wraps the core.
    pub fn new(core: Arc<CacheCore>, limits: Limits) -> Self {
        Self { core, limits }
    }
}

/// Collects violations while a request is checked.
#[derive(Default)]
struct Checker {
    violations: Vec<FieldViolation>,
}

impl Checker {
    fn fail(&mut self, field: &str, value: String, rule: impl Into<String>) {
        self.violations
            .push(FieldViolation::new(field, value, rule.into()));
    }

    fn namespace(&mut self, namespace: &str) {
        let valid = !namespace.is_empty()
            && namespace.len() <= MAX_NAMESPACE_BYTES
            && namespace
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !valid {
            self.fail(
                "namespace",
                format!("{namespace:?}"),
                "must be 1 to 64 bytes of [a-z0-9._-]",
            );
        }
    }

    fn text(&mut self, field: &str, text: &str, min: usize, max: usize) {
        if text.len() < min || text.len() > max {
            let shown = if text.len() > 64 {
                format!("{} bytes", text.len())
            } else {
                format!("{text:?}")
            };
            self.fail(field, shown, format!("must be {min} to {max} bytes"));
        }
    }

    fn key(&mut self, field: &str, key: &str, limits: &Limits) {
        self.text(field, key, 1, limits.max_key_bytes);
    }

    fn duration(
        &mut self,
        field: &str,
        duration: Option<&prost_types::Duration>,
        min: Duration,
        max: Duration,
        rule: &str,
    ) -> Option<Duration> {
        let duration = duration?;
        let converted = (duration.seconds >= 0 && duration.nanos >= 0)
            .then(|| {
                Duration::new(
                    duration.seconds.unsigned_abs(),
                    duration.nanos.unsigned_abs(),
                )
            })
            .filter(|value| *value >= min && *value <= max);
        if converted.is_none() {
            self.fail(
                field,
                format!("{}.{:09}s", duration.seconds, duration.nanos),
                rule,
            );
        }
        converted
    }

    fn finish(self) -> Result<(), Status> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(CacheError::Invalid(self.violations).into())
        }
    }
}

fn to_proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: duration.subsec_nanos() as i32,
    }
}

fn to_proto_entry(found: Found) -> pb::Entry {
    pb::Entry {
        value: found.entry.value,
        content_type: found.entry.content_type,
        tags: found.entry.tags,
        remaining_ttl: Some(to_proto_duration(found.remaining_ttl)),
    }
}

fn to_proto_level(level: Level) -> pb::HitLevel {
    match level {
        Level::L1 => pb::HitLevel::L1,
        Level::L2 => pb::HitLevel::L2,
    }
}

/// The caller's deadline from the `grpc-timeout` header, if any.
fn call_deadline<T>(request: &Request<T>) -> Option<Duration> {
    let header = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (number, unit) = header.split_at(header.len().checked_sub(1)?);
    let number: u64 = number.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(number.saturating_mul(3600)),
        "M" => Duration::from_secs(number.saturating_mul(60)),
        "S" => Duration::from_secs(number),
        "m" => Duration::from_millis(number),
        "u" => Duration::from_micros(number),
        "n" => Duration::from_nanos(number),
        _ => return None,
    })
}

#[tonic::async_trait]
impl pb::cache_service_server::CacheService for CacheGrpc {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let request = request.into_inner();
        let mut checker = Checker::default();
        checker.namespace(&request.namespace);
        checker.key("key", &request.key, &self.limits);
        checker.finish()?;
        let response = match self.core.get(&request.namespace, &request.key).await {
            Some((level, found)) => pb::GetResponse {
                hit_level: to_proto_level(level).into(),
                entry: Some(to_proto_entry(found)),
            },
            None => pb::GetResponse {
                hit_level: pb::HitLevel::Miss.into(),
                entry: None,
            },
        };
        Ok(Response::new(response))
    }

    async fn set(
        &self,
        request: Request<pb::SetRequest>,
    ) -> Result<Response<pb::SetResponse>, Status> {
        let request = request.into_inner();
        let mut checker = Checker::default();
        checker.namespace(&request.namespace);
        checker.key("key", &request.key, &self.limits);
        if request.value.len() > self.limits.max_value_bytes {
            checker.fail(
                "value",
                format!("{} bytes", request.value.len()),
                format!(
                    "must be at most {} bytes (cache.max_value_bytes)",
                    self.limits.max_value_bytes
                ),
            );
        }
        checker.text(
            "content_type",
            &request.content_type,
            0,
            MAX_CONTENT_TYPE_BYTES,
        );
        let ttl = checker.duration(
            "ttl",
            request.ttl.as_ref(),
            MIN_TTL,
            MAX_TTL,
            "must be between 1 second and 365 days",
        );
        if request.tags.len() > MAX_TAGS {
            checker.fail(
                "tags",
                format!("{} tags", request.tags.len()),
                format!("must be at most {MAX_TAGS}"),
            );
        }
        for (index, tag) in request.tags.iter().enumerate() {
            checker.text(&format!("tags[{index}]"), tag, 1, MAX_TAG_BYTES);
        }
        if let Some(token) = &request.lease_token {
            checker.text("lease_token", token, 1, MAX_LEASE_TOKEN_BYTES);
        }
        checker.finish()?;
        let mut tags = request.tags;
        tags.sort();
        tags.dedup();
        let outcome = self
            .core
            .set(SetCommand {
                namespace: request.namespace,
                key: request.key,
                entry: Entry {
                    value: request.value,
                    content_type: request.content_type,
                    tags,
                },
                ttl,
                lease_token: request.lease_token,
            })
            .await?;
        Ok(Response::new(pb::SetResponse {
            ttl: Some(to_proto_duration(outcome.ttl)),
            lease_completed: outcome.lease_completed,
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let request = request.into_inner();
        let mut checker = Checker::default();
        checker.namespace(&request.namespace);
        checker.key("key", &request.key, &self.limits);
        checker.finish()?;
        let deleted = self.core.delete(&request.namespace, &request.key).await;
        Ok(Response::new(pb::DeleteResponse { deleted }))
    }

    async fn invalidate(
        &self,
        request: Request<pb::InvalidateRequest>,
    ) -> Result<Response<pb::InvalidateResponse>, Status> {
        use pb::invalidate_request::Selector as Wire;
        let request = request.into_inner();
        let mut checker = Checker::default();
        checker.namespace(&request.namespace);
        let selector = match request.selector {
            Some(Wire::Key(key)) => {
                checker.key("key", &key, &self.limits);
                Some(Selector::Key(key))
            }
            Some(Wire::KeyPrefix(prefix)) => {
                checker.text("key_prefix", &prefix, 0, self.limits.max_key_bytes);
                Some(Selector::Prefix(prefix))
            }
            Some(Wire::Tag(tag)) => {
                checker.text("tag", &tag, 1, MAX_TAG_BYTES);
                Some(Selector::Tag(tag))
            }
            None => {
                checker.fail(
                    "selector",
                    "unset".to_owned(),
                    "exactly one of key, key_prefix or tag must be set",
                );
                None
            }
        };
        checker.finish()?;
        let Some(selector) = selector else {
            return Err(Status::invalid_argument("selector must be set"));
        };
        let removed = self.core.invalidate(&request.namespace, selector).await;
        Ok(Response::new(pb::InvalidateResponse { removed }))
    }

    async fn get_or_lease(
        &self,
        request: Request<pb::GetOrLeaseRequest>,
    ) -> Result<Response<pb::GetOrLeaseResponse>, Status> {
        let deadline = call_deadline(&request);
        let request = request.into_inner();
        let mut checker = Checker::default();
        checker.namespace(&request.namespace);
        checker.key("key", &request.key, &self.limits);
        let lease_timeout = checker.duration(
            "lease_timeout",
            request.lease_timeout.as_ref(),
            MIN_LEASE_TIMEOUT,
            MAX_LEASE_TIMEOUT,
            "must be between 1 second and 5 minutes",
        );
        let max_wait = checker.duration(
            "max_wait",
            request.max_wait.as_ref(),
            Duration::ZERO,
            MAX_WAIT,
            "must be between 0 and 30 seconds",
        );
        checker.finish()?;
        let defaults = self.core.limits();
        let lease_timeout = lease_timeout.unwrap_or(defaults.lease_timeout);
        let mut max_wait = max_wait.unwrap_or(defaults.max_wait);
        if let Some(deadline) = deadline {
            // Leave the answer time to travel back before the deadline.
            max_wait = max_wait.min(deadline.saturating_sub(deadline / 10));
        }
        let result = self
            .core
            .get_or_lease(&request.namespace, &request.key, lease_timeout, max_wait)
            .await;
        let miss = pb::HitLevel::Miss as i32;
        let response = match result {
            LeaseResult::Hit(level, found) => pb::GetOrLeaseResponse {
                outcome: pb::LeaseOutcome::Hit.into(),
                hit_level: to_proto_level(level).into(),
                entry: Some(to_proto_entry(found)),
                waited: Some(to_proto_duration(Duration::ZERO)),
                ..Default::default()
            },
            LeaseResult::Granted {
                token,
                timeout,
                waited,
            } => pb::GetOrLeaseResponse {
                outcome: pb::LeaseOutcome::Granted.into(),
                hit_level: miss,
                lease_token: token,
                lease_timeout: Some(to_proto_duration(timeout)),
                waited: Some(to_proto_duration(waited)),
                ..Default::default()
            },
            LeaseResult::Filled(level, found, waited) => pb::GetOrLeaseResponse {
                outcome: pb::LeaseOutcome::Filled.into(),
                hit_level: to_proto_level(level).into(),
                entry: Some(to_proto_entry(found)),
                waited: Some(to_proto_duration(waited)),
                ..Default::default()
            },
            LeaseResult::StillLeased(waited) => pb::GetOrLeaseResponse {
                outcome: pb::LeaseOutcome::StillLeased.into(),
                hit_level: miss,
                waited: Some(to_proto_duration(waited)),
                ..Default::default()
            },
        };
        Ok(Response::new(response))
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let stats = self.core.stats().await;
        let started_at = stats
            .started_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Response::new(pb::StatsResponse {
            node_id: stats.node_id,
            started_at: Some(prost_types::Timestamp {
                seconds: i64::try_from(started_at.as_secs()).unwrap_or(i64::MAX),
                nanos: started_at.subsec_nanos() as i32,
            }),
            l1_entries: stats.l1_entries,
            l1_bytes: stats.l1_bytes,
            l1_hits: stats.l1_hits,
            l1_misses: stats.l1_misses,
            l2_hits: stats.l2_hits,
            l2_misses: stats.l2_misses,
            l2_errors: stats.l2_errors,
            l2_entries: stats.l2_entries,
            l2_bytes: stats.l2_bytes,
            l2_mode: match stats.l2_mode {
                L2Mode::Disabled => pb::L2Mode::Disabled,
                L2Mode::Connected => pb::L2Mode::Connected,
                L2Mode::Degraded => pb::L2Mode::Degraded,
            }
            .into(),
            l2_breaker_state: match stats.breaker {
                BreakerState::Closed => CircuitState::Closed,
                BreakerState::Open => CircuitState::Open,
                BreakerState::HalfOpen => CircuitState::HalfOpen,
            }
            .into(),
            leases_granted: stats.leases_granted,
            lease_waits: stats.lease_waits,
            lease_wait_timeouts: stats.lease_wait_timeouts,
        }))
    }
}
