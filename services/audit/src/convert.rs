//! Conversions between wire messages and domain types; every rule on wire
//! input is checked here, once, and reported as field violations naming the
//! request field path (`event.action`, `events[3].context.a.b`).

use std::collections::HashSet;

use agentmesh_proto::audit as pb;
use agentmesh_resilience::FieldViolation;
use agentmesh_settings::bootstrap::AuditSettings;
use prost_types::value::Kind;

use crate::chain::{self, Timestamp};
use crate::model::{Checkpoint, Entry, Event, Order, Problem, QueryFilter, VerifyReport};

/// Largest protobuf Timestamp second (9999-12-31T23:59:59Z).
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;
/// Smallest protobuf Timestamp second (0001-01-01T00:00:00Z).
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;

/// Limits that wire input is checked against.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Events per batch.
    pub max_batch_events: usize,
    /// Canonical context bytes.
    pub max_context_bytes: usize,
    /// Context nesting depth.
    pub max_context_depth: usize,
}

impl From<&AuditSettings> for Limits {
    fn from(settings: &AuditSettings) -> Self {
        Self {
            max_batch_events: settings.max_batch_events,
            max_context_bytes: settings.max_context_bytes,
            max_context_depth: settings.max_context_depth,
        }
    }
}

fn quoted(text: &str) -> String {
    const SHOWN: usize = 64;
    if text.len() <= SHOWN {
        return format!("{text:?}");
    }
    let mut end = SHOWN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &text[..end], text.len())
}

/// Checks a timestamp's range.
pub fn timestamp_from_wire(
    timestamp: &prost_types::Timestamp,
    field: &str,
    violations: &mut Vec<FieldViolation>,
) -> Option<Timestamp> {
    let valid = (MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&timestamp.seconds)
        && (0..1_000_000_000).contains(&timestamp.nanos);
    if !valid {
        violations.push(FieldViolation::new(
            field,
            format!("{}s {}ns", timestamp.seconds, timestamp.nanos),
            "must be a valid timestamp between years 1 and 9999 with nanos 0 to 999999999",
        ));
        return None;
    }
    Some(Timestamp {
        seconds: timestamp.seconds,
        nanos: u32::try_from(timestamp.nanos).unwrap_or(0),
    })
}

/// The wire form of a timestamp.
pub fn timestamp_to_wire(timestamp: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: timestamp.seconds,
        nanos: i32::try_from(timestamp.nanos).unwrap_or(0),
    }
}

fn check_length(
    violations: &mut Vec<FieldViolation>,
    field: String,
    value: &str,
    min: usize,
    max: usize,
) {
    if value.contains('\0') {
        // PostgreSQL text cannot store NUL; refuse it on every backend.
        violations.push(FieldViolation::new(
            field,
            quoted(value),
            "must not contain NUL characters",
        ));
        return;
    }
    if value.len() < min || value.len() > max {
        let rule = if min == 0 {
            format!("must be at most {max} bytes")
        } else {
            format!("must be {min} to {max} bytes")
        };
        violations.push(FieldViolation::new(field, quoted(value), rule));
    }
}

/// Whether `trace_id` is 32 lowercase hex digits, not all zero.
pub fn is_trace_id(trace_id: &str) -> bool {
    trace_id.len() == 32
        && trace_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && trace_id.bytes().any(|b| b != b'0')
}

fn check_trace_id(violations: &mut Vec<FieldViolation>, field: String, trace_id: &str) {
    if !trace_id.is_empty() && !is_trace_id(trace_id) {
        violations.push(FieldViolation::new(
            field,
            quoted(trace_id),
            "must be empty or 32 lowercase hex digits, not all zero",
        ));
    }
}

/// Converts a protobuf Struct into JSON, rejecting values JSON cannot hold
/// (NaN, infinities, unset values) and nesting deeper than `max_depth`.
fn struct_to_json(
    fields: &std::collections::BTreeMap<String, prost_types::Value>,
    path: &str,
    depth: usize,
    max_depth: usize,
    violations: &mut Vec<FieldViolation>,
) -> serde_json::Value {
    if depth > max_depth {
        violations.push(FieldViolation::new(
            path,
            "{…}",
            format!("must be nested at most {max_depth} levels deep"),
        ));
        return serde_json::Value::Null;
    }
    let mut object = serde_json::Map::new();
    for (key, value) in fields {
        let child = value_to_json(
            value,
            &format!("{path}.{key}"),
            depth,
            max_depth,
            violations,
        );
        object.insert(key.clone(), child);
    }
    serde_json::Value::Object(object)
}

fn value_to_json(
    value: &prost_types::Value,
    path: &str,
    depth: usize,
    max_depth: usize,
    violations: &mut Vec<FieldViolation>,
) -> serde_json::Value {
    match &value.kind {
        None => {
            violations.push(FieldViolation::new(
                path,
                "unset",
                "must be a JSON value (null, number, string, bool, object or list)",
            ));
            serde_json::Value::Null
        }
        Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(flag)) => serde_json::Value::Bool(*flag),
        Some(Kind::StringValue(text)) => serde_json::Value::String(text.clone()),
        Some(Kind::NumberValue(number)) => match serde_json::Number::from_f64(*number) {
            Some(number) => serde_json::Value::Number(number),
            None => {
                violations.push(FieldViolation::new(
                    path,
                    number.to_string(),
                    "must be a finite number (JSON has no NaN or Infinity)",
                ));
                serde_json::Value::Null
            }
        },
        Some(Kind::StructValue(inner)) => {
            struct_to_json(&inner.fields, path, depth + 1, max_depth, violations)
        }
        Some(Kind::ListValue(list)) => {
            if depth + 1 > max_depth {
                violations.push(FieldViolation::new(
                    path,
                    "[…]",
                    format!("must be nested at most {max_depth} levels deep"),
                ));
                return serde_json::Value::Null;
            }
            serde_json::Value::Array(
                list.values
                    .iter()
                    .enumerate()
                    .map(|(index, item)| {
                        value_to_json(
                            item,
                            &format!("{path}[{index}]"),
                            depth + 1,
                            max_depth,
                            violations,
                        )
                    })
                    .collect(),
            )
        }
    }
}

/// Converts JSON back into a protobuf value.
pub fn json_to_value(json: serde_json::Value) -> prost_types::Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(flag) => Kind::BoolValue(flag),
        serde_json::Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(text) => Kind::StringValue(text),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map
                .into_iter()
                .map(|(key, value)| (key, json_to_value(value)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Validates one wire event; `prefix` is its request path (`event` or
/// `events[3]`). `incoming_trace_id` fills an empty trace id.
pub fn event_from_wire(
    event: pb::Event,
    prefix: &str,
    limits: &Limits,
    incoming_trace_id: Option<&str>,
    violations: &mut Vec<FieldViolation>,
) -> Option<Event> {
    let before = violations.len();
    let field = |name: &str| format!("{prefix}.{name}");
    check_length(violations, field("event_id"), &event.event_id, 1, 128);
    check_length(violations, field("agent_type"), &event.agent_type, 0, 64);
    check_length(violations, field("action"), &event.action, 1, 128);
    check_length(violations, field("user_id"), &event.user_id, 0, 128);
    check_length(violations, field("project_id"), &event.project_id, 0, 128);
    check_length(violations, field("workflow_id"), &event.workflow_id, 0, 128);
    check_trace_id(violations, field("trace_id"), &event.trace_id);
    let occurred_at = match &event.occurred_at {
        Some(timestamp) => timestamp_from_wire(timestamp, &field("occurred_at"), violations),
        None => {
            violations.push(FieldViolation::new(
                field("occurred_at"),
                "unset",
                "is required",
            ));
            None
        }
    };
    let outcome = match pb::Outcome::try_from(event.outcome) {
        Ok(pb::Outcome::Unspecified) | Err(_) => {
            violations.push(FieldViolation::new(
                field("outcome"),
                event.outcome.to_string(),
                "must be OUTCOME_SUCCESS, OUTCOME_FAILURE, OUTCOME_DENIED or OUTCOME_DEGRADED",
            ));
            0
        }
        Ok(outcome) => u32::try_from(outcome as i32).unwrap_or(0),
    };
    let context = match &event.context {
        Some(context) => struct_to_json(
            &context.fields,
            &field("context"),
            1,
            limits.max_context_depth,
            violations,
        ),
        None => serde_json::Value::Object(serde_json::Map::new()),
    };
    if violations.len() > before {
        return None;
    }
    let context_json = match chain::canonical_json(&context) {
        Ok(json) => json,
        Err(error) => {
            violations.push(FieldViolation::new(
                field("context"),
                "{…}",
                format!("must be representable as canonical JSON: {error}"),
            ));
            return None;
        }
    };
    if context_json.len() > limits.max_context_bytes {
        violations.push(FieldViolation::new(
            field("context"),
            format!("{} bytes", context_json.len()),
            format!(
                "must be at most {} bytes as canonical JSON",
                limits.max_context_bytes
            ),
        ));
        return None;
    }
    let trace_id = if event.trace_id.is_empty() {
        incoming_trace_id
            .filter(|id| is_trace_id(id))
            .unwrap_or_default()
            .to_owned()
    } else {
        event.trace_id
    };
    let context_hash = chain::sha256(context_json.as_bytes());
    Some(Event {
        event_id: event.event_id,
        occurred_at: occurred_at?,
        agent_type: event.agent_type,
        action: event.action,
        user_id: event.user_id,
        project_id: event.project_id,
        workflow_id: event.workflow_id,
        trace_id,
        outcome,
        context_json,
        context_hash,
    })
}

/// Validates a batch: its size, each event, and event ids unique within it.
pub fn batch_from_wire(
    events: Vec<pb::Event>,
    limits: &Limits,
    incoming_trace_id: Option<&str>,
) -> Result<Vec<Event>, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    if events.is_empty() || events.len() > limits.max_batch_events {
        violations.push(FieldViolation::new(
            "events",
            format!("{} events", events.len()),
            format!("must hold 1 to {} events", limits.max_batch_events),
        ));
        return Err(violations);
    }
    let mut seen = HashSet::new();
    let mut validated = Vec::with_capacity(events.len());
    for (index, event) in events.into_iter().enumerate() {
        let prefix = format!("events[{index}]");
        if !event.event_id.is_empty() && !seen.insert(event.event_id.clone()) {
            violations.push(FieldViolation::new(
                format!("{prefix}.event_id"),
                quoted(&event.event_id),
                "must be unique within the batch",
            ));
        }
        if let Some(event) =
            event_from_wire(event, &prefix, limits, incoming_trace_id, &mut violations)
        {
            validated.push(event);
        }
    }
    if violations.is_empty() {
        Ok(validated)
    } else {
        Err(violations)
    }
}

/// The wire form of an entry.
pub fn entry_to_wire(entry: &Entry) -> pb::Entry {
    let event = &entry.event;
    let context = match serde_json::from_str::<serde_json::Value>(&event.context_json) {
        Ok(serde_json::Value::Object(map)) => Some(prost_types::Struct {
            fields: map
                .into_iter()
                .map(|(key, value)| (key, json_to_value(value)))
                .collect(),
        }),
        // Stored data no longer parses: Verify reports it; the entry is
        // still listed, without its context.
        _ => None,
    };
    pb::Entry {
        event: Some(pb::Event {
            event_id: event.event_id.clone(),
            occurred_at: Some(timestamp_to_wire(event.occurred_at)),
            agent_type: event.agent_type.clone(),
            action: event.action.clone(),
            user_id: event.user_id.clone(),
            project_id: event.project_id.clone(),
            workflow_id: event.workflow_id.clone(),
            trace_id: event.trace_id.clone(),
            outcome: i32::try_from(event.outcome).unwrap_or(0),
            context,
        }),
        sequence: entry.sequence,
        recorded_at: Some(timestamp_to_wire(entry.recorded_at)),
        context_hash: event.context_hash.to_vec(),
        prev_hash: entry.prev_hash.to_vec(),
        entry_hash: entry.entry_hash.to_vec(),
    }
}

/// Validates query filters; returns the filter and the page size.
pub fn query_from_wire(
    request: &pb::QueryRequest,
) -> Result<(QueryFilter, u32), Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let start_time = request
        .start_time
        .as_ref()
        .and_then(|t| timestamp_from_wire(t, "start_time", &mut violations));
    let end_time = request
        .end_time
        .as_ref()
        .and_then(|t| timestamp_from_wire(t, "end_time", &mut violations));
    check_length(
        &mut violations,
        "agent_type".into(),
        &request.agent_type,
        0,
        64,
    );
    for (name, value) in [
        ("action", &request.action),
        ("user_id", &request.user_id),
        ("project_id", &request.project_id),
        ("workflow_id", &request.workflow_id),
    ] {
        check_length(&mut violations, name.into(), value, 0, 128);
    }
    check_trace_id(&mut violations, "trace_id".into(), &request.trace_id);
    let outcome = match pb::Outcome::try_from(request.outcome) {
        Ok(outcome) => u32::try_from(outcome as i32).unwrap_or(0),
        Err(_) => {
            violations.push(FieldViolation::new(
                "outcome",
                request.outcome.to_string(),
                "must be a known Outcome",
            ));
            0
        }
    };
    let order = match pb::Order::try_from(request.order) {
        Ok(pb::Order::OldestFirst) => Order::OldestFirst,
        Ok(_) => Order::NewestFirst,
        Err(_) => {
            violations.push(FieldViolation::new(
                "order",
                request.order.to_string(),
                "must be a known Order",
            ));
            Order::NewestFirst
        }
    };
    let page_size = match request.page_size {
        0 => 100,
        size @ 1..=1000 => size.unsigned_abs(),
        size => {
            violations.push(FieldViolation::new(
                "page_size",
                size.to_string(),
                "must be between 0 and 1000",
            ));
            0
        }
    };
    if !violations.is_empty() {
        return Err(violations);
    }
    Ok((
        QueryFilter {
            start_time,
            end_time,
            agent_type: request.agent_type.clone(),
            action: request.action.clone(),
            user_id: request.user_id.clone(),
            project_id: request.project_id.clone(),
            workflow_id: request.workflow_id.clone(),
            trace_id: request.trace_id.clone(),
            outcome,
            order,
        },
        page_size,
    ))
}

/// The wire form of a verify report.
pub fn verify_to_wire(report: &VerifyReport) -> pb::VerifyResponse {
    let (first_bad_sequence, problem, detail) = match &report.problem {
        None => (0, pb::Problem::Unspecified, String::new()),
        Some((sequence, problem, detail)) => (
            *sequence,
            match problem {
                Problem::Modified => pb::Problem::Modified,
                Problem::Missing => pb::Problem::Missing,
                Problem::Reordered => pb::Problem::Reordered,
            },
            detail.chars().take(1000).collect(),
        ),
    };
    pb::VerifyResponse {
        ok: report.problem.is_none(),
        entries_checked: report.entries_checked,
        first_bad_sequence,
        problem: problem as i32,
        detail,
        from_sequence: report.from_sequence,
        to_sequence: report.to_sequence,
        last_entry_hash: report
            .last_entry_hash
            .map(|hash| hash.to_vec())
            .unwrap_or_default(),
    }
}

/// The wire form of a checkpoint.
pub fn checkpoint_to_wire(checkpoint: &Checkpoint) -> pb::Checkpoint {
    pb::Checkpoint {
        sequence: checkpoint.sequence,
        entry_hash: checkpoint.entry_hash.to_vec(),
        signed_at: Some(timestamp_to_wire(checkpoint.signed_at)),
        signature: checkpoint.signature.to_vec(),
        public_key: checkpoint.public_key.to_vec(),
        key_id: checkpoint.key_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::from(&AuditSettings::default())
    }

    fn number(value: f64) -> prost_types::Value {
        prost_types::Value {
            kind: Some(Kind::NumberValue(value)),
        }
    }

    fn valid_event(id: &str) -> pb::Event {
        pb::Event {
            event_id: id.into(),
            occurred_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            action: "task.execute".into(),
            outcome: pb::Outcome::Success as i32,
            context: Some(prost_types::Struct {
                fields: [("b".to_owned(), number(1.0)), ("a".to_owned(), number(0.5))]
                    .into_iter()
                    .collect(),
            }),
            ..pb::Event::default()
        }
    }

    #[test]
    fn valid_event_is_canonicalised_and_takes_the_incoming_trace() {
        let mut violations = Vec::new();
        let trace = "0af7651916cd43dd8448eb211c80319c";
        let event = event_from_wire(
            valid_event("e1"),
            "event",
            &limits(),
            Some(trace),
            &mut violations,
        )
        .unwrap();
        assert!(violations.is_empty());
        assert_eq!(event.context_json, r#"{"a":0.5,"b":1}"#);
        assert_eq!(event.trace_id, trace);
        assert_eq!(event.context_hash, chain::sha256(br#"{"a":0.5,"b":1}"#));
    }

    #[test]
    fn batch_violations_name_the_event_index_and_field() {
        let mut missing = valid_event("");
        missing.occurred_at = None;
        missing.outcome = 0;
        let mut nan = valid_event("e3");
        nan.context = Some(prost_types::Struct {
            fields: [("x".to_owned(), number(f64::NAN))].into_iter().collect(),
        });
        let violations = batch_from_wire(
            vec![valid_event("e0"), missing, valid_event("e0"), nan],
            &limits(),
            None,
        )
        .unwrap_err();
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "events[1].event_id",
                "events[1].occurred_at",
                "events[1].outcome",
                "events[2].event_id",
                "events[3].context.x"
            ]
        );
    }

    #[test]
    fn oversized_deep_and_too_many() {
        let small = Limits {
            max_batch_events: 2,
            max_context_bytes: 16,
            max_context_depth: 2,
        };
        let mut big = valid_event("e");
        big.context = Some(prost_types::Struct {
            fields: [(
                "text".to_owned(),
                prost_types::Value {
                    kind: Some(Kind::StringValue("x".repeat(100))),
                },
            )]
            .into_iter()
            .collect(),
        });
        let violations = batch_from_wire(vec![big], &small, None).unwrap_err();
        assert_eq!(violations[0].field, "events[0].context");
        assert!(violations[0].rule.contains("at most 16 bytes"));

        let deep_value = json_to_value(serde_json::json!({"a": {"b": {"c": 1}}}));
        let Some(Kind::StructValue(deep)) = deep_value.kind else {
            panic!()
        };
        let mut deep_event = valid_event("e");
        deep_event.context = Some(deep);
        let violations = batch_from_wire(vec![deep_event], &small, None).unwrap_err();
        assert_eq!(violations[0].field, "events[0].context.a.b");

        let violations = batch_from_wire(
            vec![valid_event("1"), valid_event("2"), valid_event("3")],
            &small,
            None,
        )
        .unwrap_err();
        assert_eq!(violations[0].field, "events");
        assert!(batch_from_wire(Vec::new(), &small, None).is_err());

        let mut nul = valid_event("e");
        nul.action = "a\0b".into();
        let violations = batch_from_wire(vec![nul], &small, None).unwrap_err();
        assert_eq!(violations[0].field, "events[0].action");
        assert!(violations[0].rule.contains("NUL"));
    }
}
