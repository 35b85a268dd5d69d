//! The gateway's audit trail: one event per task, appended to a bounded
//! in-memory buffer (never waiting on the audit service), and delivered
//! in order by one background task in `AppendBatch` calls.
//!
//! - **Down or slow audit service.** A failed batch is retried with
//!   jittered exponential backoff (`gateway.audit.retry_*`) until it is
//!   accepted; events stay buffered meanwhile. The audit service
//!   deduplicates on `event_id` (the task id), so a batch that was stored
//!   although its answer was lost is not stored twice when retried.
//! - **Full buffer.** `gateway.audit.overflow = fail_closed` (the default)
//!   refuses new tasks with UNAVAILABLE until there is room: each admitted
//!   task reserves its slot up front, so the buffer never holds more than
//!   `gateway.audit.buffer_capacity` events. `drop_oldest` serves every
//!   task and drops the oldest buffered event for each new one.
//! - **Rejected events.** A batch the audit service refuses as invalid is
//!   resent event by event; an event refused on its own is dropped, counted
//!   and logged, so one bad event never blocks the trail.
//! - **Shutdown.** [`AuditSink::close`] keeps delivering for at most
//!   `gateway.audit.shutdown_flush_ms`, then reports what is left.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agentmesh_client::{ClientError, TracedChannel, connect_lazy};
use agentmesh_proto::audit as audit_pb;
use agentmesh_proto::audit::audit_service_client::AuditServiceClient;
use agentmesh_resilience::Backoff;
use agentmesh_settings::{AuditOverflow, ClientTlsSettings, GatewayAuditSettings};
use agentmesh_telemetry::CapturedContext;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::Instrument;

use crate::around::RateLimitedLog;
use crate::error::GatewayError;

/// Events of the buffer, each with its position in arrival order.
#[derive(Default)]
struct Buffer {
    /// Position, event, and the trace context of the task it audits.
    events: VecDeque<(u64, audit_pb::Event, CapturedContext)>,
    /// Slots reserved by admitted tasks that have not pushed yet
    /// (`fail_closed` only).
    reserved: usize,
    next_position: u64,
}

struct Shared {
    buffer: Mutex<Buffer>,
    wake: Notify,
    capacity: usize,
    overflow: AuditOverflow,
    overflow_log: RateLimitedLog,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish_depth(buffer: &Buffer) {
        metrics::gauge!("agentmesh_gateway_audit_buffer_depth").set(buffer.events.len() as f64);
    }
}

/// A slot in the buffer for one task's event; taken when the task is
/// admitted, filled by [`Reservation::push`], released when dropped unused.
pub struct Reservation {
    shared: Arc<Shared>,
    counted: bool,
}

impl Reservation {
    /// Appends the task's event to the buffer.
    pub fn push(mut self, event: audit_pb::Event) {
        let mut buffer = self.shared.lock();
        if self.counted {
            buffer.reserved = buffer.reserved.saturating_sub(1);
            self.counted = false;
        }
        if buffer.events.len() >= self.shared.capacity {
            // Only drop_oldest gets here: fail_closed reserved the room.
            buffer.events.pop_front();
            metrics::counter!("agentmesh_gateway_audit_dropped_total", "reason" => "overflow")
                .increment(1);
            if self.shared.overflow_log.allow() {
                tracing::warn!(
                    capacity = self.shared.capacity,
                    "audit buffer full, dropping the oldest event (gateway.audit.overflow = drop_oldest; logged once a minute)"
                );
            }
        }
        let position = buffer.next_position;
        buffer.next_position += 1;
        buffer
            .events
            .push_back((position, event, CapturedContext::current()));
        Shared::publish_depth(&buffer);
        drop(buffer);
        self.shared.wake.notify_one();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.counted {
            let mut buffer = self.shared.lock();
            buffer.reserved = buffer.reserved.saturating_sub(1);
        }
    }
}

/// The audit sink: the buffer and its delivery task.
pub struct AuditSink {
    shared: Arc<Shared>,
    stop: CancellationToken,
    delivery: Mutex<Option<JoinHandle<()>>>,
    flush_timeout: Duration,
}

impl AuditSink {
    /// A sink delivering to the audit service at `endpoint` (connecting on
    /// first use). Spawns the delivery task: call from a Tokio runtime.
    pub fn start(
        endpoint: &str,
        tls: &ClientTlsSettings,
        settings: &GatewayAuditSettings,
    ) -> Result<Self, ClientError> {
        let client = AuditServiceClient::new(connect_lazy(endpoint, tls)?);
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer::default()),
            wake: Notify::new(),
            capacity: settings.buffer_capacity.max(1),
            overflow: settings.overflow,
            overflow_log: RateLimitedLog::new(Duration::from_secs(60)),
        });
        metrics::gauge!("agentmesh_gateway_audit_buffer_depth").set(0.0);
        let stop = CancellationToken::new();
        let flush_timeout = Duration::from_millis(settings.shutdown_flush_ms);
        let delivery = tokio::spawn(deliver(
            Arc::clone(&shared),
            client,
            endpoint.to_owned(),
            settings.clone(),
            stop.clone(),
        ));
        Ok(Self {
            shared,
            stop,
            delivery: Mutex::new(Some(delivery)),
            flush_timeout,
        })
    }

    /// Admits one task: a reserved slot for its event, or, with
    /// `fail_closed` and a full buffer, UNAVAILABLE.
    pub fn reserve(&self) -> Result<Reservation, GatewayError> {
        let counted = self.shared.overflow == AuditOverflow::FailClosed;
        if counted {
            let mut buffer = self.shared.lock();
            if buffer.events.len() + buffer.reserved >= self.shared.capacity {
                drop(buffer);
                metrics::counter!("agentmesh_gateway_audit_refused_total").increment(1);
                return Err(GatewayError::AuditBufferFull {
                    capacity: self.shared.capacity,
                });
            }
            buffer.reserved += 1;
        }
        Ok(Reservation {
            shared: Arc::clone(&self.shared),
            counted,
        })
    }

    /// Events waiting for delivery.
    pub fn depth(&self) -> usize {
        self.shared.lock().events.len()
    }

    /// Delivers what is buffered, for at most `gateway.audit.shutdown_flush_ms`,
    /// then stops the delivery task. Call after the server stopped taking
    /// tasks.
    pub async fn close(&self) {
        self.stop.cancel();
        let delivery = self
            .delivery
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(delivery) = delivery {
            // The task bounds itself; this bound is against a stuck call.
            let bound = self.flush_timeout + Duration::from_secs(1);
            if tokio::time::timeout(bound, delivery).await.is_err() {
                tracing::warn!("audit delivery did not stop in time");
            }
        }
        let left = self.depth();
        if left > 0 {
            metrics::counter!("agentmesh_gateway_audit_dropped_total", "reason" => "shutdown")
                .increment(left as u64);
            tracing::warn!(
                events = left,
                "gateway stopped with undelivered audit events (the audit service did not take them in time)"
            );
        }
    }
}

/// Whether the audit service refused a batch for its content (retrying it
/// unchanged can never succeed).
fn is_permanent(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::AlreadyExists | Code::FailedPrecondition | Code::OutOfRange
    )
}

/// How one delivery attempt ended.
enum Sent {
    /// Every event up to this position is stored.
    Through(u64),
    /// The audit service could not be reached or failed; retry later.
    Failed(String),
}

/// The delivery task: sends the oldest buffered events, oldest first, until
/// stopped and (bounded) drained.
async fn deliver(
    shared: Arc<Shared>,
    mut client: AuditServiceClient<TracedChannel>,
    endpoint: String,
    settings: GatewayAuditSettings,
    stop: CancellationToken,
) {
    let timeout = Duration::from_millis(settings.timeout_ms);
    let mut backoff = Backoff::new(
        Duration::from_millis(settings.retry_initial_ms),
        Duration::from_millis(settings.retry_max_ms),
    );
    let mut failing_since: Option<Instant> = None;
    let mut flush_until: Option<Instant> = None;
    loop {
        if stop.is_cancelled() && flush_until.is_none() {
            flush_until = Some(Instant::now() + Duration::from_millis(settings.shutdown_flush_ms));
        }
        if flush_until.is_some_and(|until| Instant::now() >= until) {
            return;
        }
        let wake = shared.wake.notified();
        let (batch, contexts): (Vec<(u64, audit_pb::Event)>, Vec<CapturedContext>) = {
            let buffer = shared.lock();
            buffer
                .events
                .iter()
                .take(settings.batch_max_events.max(1))
                .map(|(position, event, context)| ((*position, event.clone()), context.clone()))
                .unzip()
        };
        if batch.is_empty() {
            if flush_until.is_some() {
                return;
            }
            tokio::select! {
                () = wake => {}
                () = stop.cancelled() => {}
            }
            continue;
        }
        // The delivery continues the trace of the batch's first task and
        // links the others.
        let span = tracing::info_span!(
            "audit_delivery",
            otel.name = "audit.deliver",
            otel.kind = "producer",
            agentmesh.events = batch.len(),
        );
        CapturedContext::adopt(&span, &contexts, 32);
        let attempt = send(&mut client, batch, timeout).instrument(span);
        let sent = match flush_until {
            Some(until) => tokio::time::timeout_at(until, attempt)
                .await
                .unwrap_or_else(|_| Sent::Failed("shutdown flush time ran out".to_owned())),
            None => attempt.await,
        };
        match sent {
            Sent::Through(position) => {
                let mut buffer = shared.lock();
                let mut delivered = 0_u64;
                while buffer
                    .events
                    .front()
                    .is_some_and(|(front, _, _)| *front <= position)
                {
                    buffer.events.pop_front();
                    delivered += 1;
                }
                Shared::publish_depth(&buffer);
                let depth = buffer.events.len();
                drop(buffer);
                metrics::counter!("agentmesh_gateway_audit_delivered_total").increment(delivered);
                backoff.reset();
                if let Some(since) = failing_since.take() {
                    tracing::info!(
                        endpoint,
                        outage_ms = since.elapsed().as_millis() as u64,
                        buffered = depth,
                        "audit service reachable again, delivering buffered events"
                    );
                }
            }
            Sent::Failed(reason) => {
                metrics::counter!("agentmesh_gateway_audit_delivery_failures_total").increment(1);
                let buffered = shared.lock().events.len();
                if failing_since.is_none() {
                    failing_since = Some(Instant::now());
                    tracing::warn!(
                        endpoint,
                        reason,
                        buffered,
                        "audit service unavailable, buffering audit events"
                    );
                } else {
                    tracing::debug!(endpoint, reason, buffered, "audit delivery retry failed");
                }
                let delay = backoff.next_delay();
                let resume = match flush_until {
                    Some(until) => (Instant::now() + delay).min(until),
                    None => Instant::now() + delay,
                };
                tokio::select! {
                    () = tokio::time::sleep_until(resume) => {}
                    // Shutdown starts the bounded flush at once.
                    () = stop.cancelled(), if flush_until.is_none() => {}
                }
            }
        }
    }
}

/// Sends `batch` (positions ascending) as one `AppendBatch`; when the audit
/// service refuses its content, sends it event by event and drops (counts,
/// logs) the events refused on their own.
async fn send(
    client: &mut AuditServiceClient<TracedChannel>,
    batch: Vec<(u64, audit_pb::Event)>,
    timeout: Duration,
) -> Sent {
    let Some(last) = batch.last().map(|(position, _)| *position) else {
        return Sent::Failed("empty batch".to_owned());
    };
    let events: Vec<audit_pb::Event> = batch.iter().map(|(_, event)| event.clone()).collect();
    let request = audit_pb::AppendBatchRequest { events };
    let status = match tokio::time::timeout(timeout, client.append_batch(request)).await {
        Ok(Ok(_)) => return Sent::Through(last),
        Ok(Err(status)) => status,
        Err(_) => {
            return Sent::Failed(format!("no answer within {} ms", timeout.as_millis()));
        }
    };
    if !is_permanent(status.code()) {
        return Sent::Failed(format!("{:?}: {}", status.code(), status.message()));
    }
    tracing::warn!(
        code = ?status.code(),
        message = status.message(),
        events = batch.len(),
        "audit service refused a batch, sending its events one by one"
    );
    let mut through = None;
    for (position, event) in batch {
        let event_id = event.event_id.clone();
        let request = audit_pb::AppendRequest { event: Some(event) };
        match tokio::time::timeout(timeout, client.append(request)).await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) if is_permanent(status.code()) => {
                metrics::counter!("agentmesh_gateway_audit_dropped_total", "reason" => "rejected")
                    .increment(1);
                tracing::error!(
                    event_id,
                    code = ?status.code(),
                    message = status.message(),
                    "audit service refused an audit event; dropped"
                );
            }
            Ok(Err(status)) => {
                return match through {
                    Some(position) => Sent::Through(position),
                    None => Sent::Failed(format!("{:?}: {}", status.code(), status.message())),
                };
            }
            Err(_) => {
                return match through {
                    Some(position) => Sent::Through(position),
                    None => Sent::Failed(format!("no answer within {} ms", timeout.as_millis())),
                };
            }
        }
        through = Some(position);
    }
    Sent::Through(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> audit_pb::Event {
        audit_pb::Event {
            event_id: id.to_owned(),
            ..Default::default()
        }
    }

    fn settings(capacity: usize, overflow: AuditOverflow) -> GatewayAuditSettings {
        GatewayAuditSettings {
            buffer_capacity: capacity,
            overflow,
            shutdown_flush_ms: 0,
            ..GatewayAuditSettings::default()
        }
    }

    fn ids(sink: &AuditSink) -> Vec<String> {
        sink.shared
            .lock()
            .events
            .iter()
            .map(|(_, event, _)| event.event_id.clone())
            .collect()
    }

    #[tokio::test]
    async fn fail_closed_reserves_room_and_refuses_when_full() {
        // Nothing listens there: events stay buffered.
        let sink = AuditSink::start(
            "http://127.0.0.1:1",
            &ClientTlsSettings::default(),
            &settings(2, AuditOverflow::FailClosed),
        )
        .unwrap();
        let first = sink.reserve().unwrap();
        let second = sink.reserve().unwrap();
        // Two tasks in flight hold the whole buffer.
        assert!(matches!(
            sink.reserve(),
            Err(GatewayError::AuditBufferFull { capacity: 2 })
        ));
        first.push(event("a"));
        drop(second);
        // A reservation dropped unused frees its slot.
        sink.reserve().unwrap().push(event("b"));
        assert!(sink.reserve().is_err());
        assert_eq!(ids(&sink), ["a", "b"]);
        sink.close().await;
    }

    #[tokio::test]
    async fn drop_oldest_keeps_the_newest_events() {
        let sink = AuditSink::start(
            "http://127.0.0.1:1",
            &ClientTlsSettings::default(),
            &settings(2, AuditOverflow::DropOldest),
        )
        .unwrap();
        for id in ["a", "b", "c", "d"] {
            sink.reserve().unwrap().push(event(id));
        }
        assert_eq!(ids(&sink), ["c", "d"]);
        sink.close().await;
    }

    #[test]
    fn only_content_refusals_are_permanent() {
        assert!(is_permanent(Code::InvalidArgument));
        assert!(is_permanent(Code::AlreadyExists));
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Unknown,
        ] {
            assert!(!is_permanent(code), "{code:?}");
        }
    }
}
