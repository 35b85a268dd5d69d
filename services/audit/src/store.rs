//! Persistence: the `audit_entries`, `audit_head` and `audit_checkpoints`
//! tables, in raw SQL that runs on SQLite and PostgreSQL alike (only the
//! placeholders and the head row lock differ).

use agentmesh_db::sea_orm::{ConnectionTrait, DbBackend, DbErr, QueryResult, Statement, Value};

use crate::chain::{self, Hash, Timestamp};
use crate::model::{Checkpoint, Entry, Event, Order, QueryFilter};

/// Most rows per multi-row INSERT: 17 parameters each stays far below both
/// databases' parameter limits.
const INSERT_CHUNK: usize = 512;
/// Most event ids per `IN (...)` lookup.
const LOOKUP_CHUNK: usize = 512;

/// Largest JSON parameter per PostgreSQL statement. sqlx does not set
/// TCP_NODELAY, and a message bigger than the socket's initial send buffer
/// (16 KiB on Linux) leaves its tail to Nagle's algorithm, which waits for
/// the server's delayed ACK: a 40 ms stall per statement. Measured: group
/// commits of 31 events took 45 ms, 1.3 ms of it in PostgreSQL. Keeping each
/// statement under this bound costs a round trip per 12 KiB instead.
const MAX_JSON_PARAM_BYTES: usize = 12 * 1024;

/// Joins JSON values into arrays of at most [`MAX_JSON_PARAM_BYTES`] (a
/// single larger value travels alone).
fn json_arrays_within_budget(values: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut arrays = Vec::new();
    let mut current = String::from("[");
    for value in values {
        if current.len() > 1 && current.len() + value.len() + 2 > MAX_JSON_PARAM_BYTES {
            current.push(']');
            arrays.push(std::mem::replace(&mut current, String::from("[")));
        }
        if current.len() > 1 {
            current.push(',');
        }
        current.push_str(&value);
    }
    if current.len() > 1 {
        current.push(']');
        arrays.push(current);
    }
    arrays
}

/// Splits `items` into chunks whose lengths are powers of two (at most
/// `max`, itself a power of two). The drivers prepare and cache each
/// distinct SQL text; with one text per row count, group commits of every
/// size would thrash PostgreSQL's statement cache and re-plan big
/// statements on every commit. Powers of two keep it to a dozen texts.
fn power_of_two_chunks<T>(mut items: &[T], max: usize) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    while !items.is_empty() {
        let mut size = max;
        while size > items.len() {
            size /= 2;
        }
        let (chunk, rest) = items.split_at(size);
        chunks.push(chunk);
        items = rest;
    }
    chunks
}

const ENTRY_COLUMNS: &str = "sequence, event_id, occurred_at_seconds, occurred_at_nanos, \
     recorded_at_seconds, recorded_at_nanos, agent_type, action, user_id, project_id, \
     workflow_id, trace_id, outcome, context, context_hash, prev_hash, entry_hash";

const CHECKPOINT_COLUMNS: &str =
    "sequence, entry_hash, signed_at_seconds, signed_at_nanos, signature, public_key, key_id";

/// Collects bind values and renders the backend's placeholders.
struct Params {
    backend: DbBackend,
    values: Vec<Value>,
}

impl Params {
    fn new(backend: DbBackend) -> Self {
        Self {
            backend,
            values: Vec::new(),
        }
    }

    fn bind(&mut self, value: impl Into<Value>) -> String {
        self.values.push(value.into());
        match self.backend {
            DbBackend::Postgres => format!("${}", self.values.len()),
            _ => "?".to_owned(),
        }
    }

    fn statement(self, sql: String) -> Statement {
        Statement::from_sql_and_values(self.backend, sql, self.values)
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn corrupt(what: impl std::fmt::Display) -> DbErr {
    DbErr::Custom(format!("corrupt audit data: {what}"))
}

/// Reads the chain head `(sequence, entry_hash)`; on PostgreSQL inside a
/// transaction with `lock` it is locked until commit, which serialises
/// appenders across processes. (SQLite's `BEGIN IMMEDIATE` already holds
/// the database's write lock.)
pub async fn read_head<C: ConnectionTrait>(
    connection: &C,
    lock: bool,
) -> Result<(u64, Hash), DbErr> {
    let backend = connection.get_database_backend();
    let suffix = if lock && backend == DbBackend::Postgres {
        " FOR UPDATE"
    } else {
        ""
    };
    let row = connection
        .query_one_raw(Statement::from_string(
            backend,
            format!("SELECT sequence, entry_hash FROM audit_head WHERE id = 1{suffix}"),
        ))
        .await?
        .ok_or_else(|| corrupt("the audit_head row is missing"))?;
    let sequence: i64 = row.try_get_by_index(0)?;
    let hash: String = row.try_get_by_index(1)?;
    let hash =
        chain::parse_hash(&hash).ok_or_else(|| corrupt("audit_head.entry_hash is not hex"))?;
    Ok((u64::try_from(sequence).map_err(corrupt)?, hash))
}

/// Moves the chain head.
pub async fn write_head<C: ConnectionTrait>(
    connection: &C,
    sequence: u64,
    hash: &Hash,
) -> Result<(), DbErr> {
    let mut params = Params::new(connection.get_database_backend());
    let sql = format!(
        "UPDATE audit_head SET sequence = {}, entry_hash = {} WHERE id = 1",
        params.bind(to_i64(sequence)),
        params.bind(hex::encode(hash))
    );
    connection.execute_raw(params.statement(sql)).await?;
    Ok(())
}

/// Decodes one `audit_entries` row selected with [`ENTRY_COLUMNS`].
pub fn decode_entry(row: &QueryResult) -> Result<Entry, String> {
    let get_i64 = |index: usize| -> Result<i64, String> {
        row.try_get_by_index::<i64>(index)
            .map_err(|e| e.to_string())
    };
    let get_i32 = |index: usize| -> Result<i32, String> {
        row.try_get_by_index::<i32>(index)
            .map_err(|e| e.to_string())
    };
    let get_text = |index: usize| -> Result<String, String> {
        row.try_get_by_index::<String>(index)
            .map_err(|e| e.to_string())
    };
    let get_hash = |index: usize, name: &str| -> Result<Hash, String> {
        chain::parse_hash(&get_text(index)?).ok_or_else(|| format!("{name} is not 64 hex digits"))
    };
    let get_nanos = |index: usize, name: &str| -> Result<u32, String> {
        u32::try_from(get_i32(index)?)
            .ok()
            .filter(|nanos| *nanos < 1_000_000_000)
            .ok_or_else(|| format!("{name} is out of range"))
    };
    let sequence = u64::try_from(get_i64(0)?).map_err(|_| "sequence is negative".to_owned())?;
    let event = Event {
        event_id: get_text(1)?,
        occurred_at: Timestamp {
            seconds: get_i64(2)?,
            nanos: get_nanos(3, "occurred_at_nanos")?,
        },
        agent_type: get_text(6)?,
        action: get_text(7)?,
        user_id: get_text(8)?,
        project_id: get_text(9)?,
        workflow_id: get_text(10)?,
        trace_id: get_text(11)?,
        outcome: u32::try_from(get_i32(12)?).map_err(|_| "outcome is negative".to_owned())?,
        context_json: get_text(13)?,
        context_hash: get_hash(14, "context_hash")?,
    };
    Ok(Entry {
        event,
        sequence,
        recorded_at: Timestamp {
            seconds: get_i64(4)?,
            nanos: get_nanos(5, "recorded_at_nanos")?,
        },
        prev_hash: get_hash(15, "prev_hash")?,
        entry_hash: get_hash(16, "entry_hash")?,
    })
}

fn decode_entries(rows: &[QueryResult]) -> Result<Vec<Entry>, DbErr> {
    rows.iter()
        .map(|row| decode_entry(row).map_err(corrupt))
        .collect()
}

/// Stored entries with any of `event_ids`.
pub async fn find_by_event_ids<C: ConnectionTrait>(
    connection: &C,
    event_ids: &[&str],
) -> Result<Vec<Entry>, DbErr> {
    if connection.get_database_backend() == DbBackend::Postgres {
        // One JSON parameter and one statement text whatever the group size:
        // PostgreSQL spends far more on binding and planning thousands of
        // parameters than on parsing one JSON array.
        let mut found = Vec::new();
        let ids = event_ids
            .iter()
            .map(|id| serde_json::Value::from(*id).to_string());
        for array in json_arrays_within_budget(ids) {
            let mut params = Params::new(DbBackend::Postgres);
            let ids = params.bind(array);
            let sql = format!(
                "SELECT {ENTRY_COLUMNS} FROM audit_entries \
                 WHERE event_id IN (SELECT json_array_elements_text({ids}::json))"
            );
            let rows = connection.query_all_raw(params.statement(sql)).await?;
            found.extend(decode_entries(&rows)?);
        }
        return Ok(found);
    }
    let mut found = Vec::new();
    for chunk in event_ids.chunks(LOOKUP_CHUNK) {
        let mut params = Params::new(connection.get_database_backend());
        // Padded with the last id to a power of two: few distinct texts.
        let padded = chunk.len().next_power_of_two();
        let last = chunk.last().copied().unwrap_or_default();
        let placeholders: Vec<String> = chunk
            .iter()
            .copied()
            .chain(std::iter::repeat_n(last, padded - chunk.len()))
            .map(|id| params.bind(id))
            .collect();
        let sql = format!(
            "SELECT {ENTRY_COLUMNS} FROM audit_entries WHERE event_id IN ({})",
            placeholders.join(", ")
        );
        let rows = connection.query_all_raw(params.statement(sql)).await?;
        found.extend(decode_entries(&rows)?);
    }
    Ok(found)
}

/// Inserts entries (multi-row INSERTs).
pub async fn insert_entries<C: ConnectionTrait>(
    connection: &C,
    entries: &[Entry],
) -> Result<(), DbErr> {
    if connection.get_database_backend() == DbBackend::Postgres {
        return insert_entries_postgres(connection, entries).await;
    }
    for chunk in power_of_two_chunks(entries, INSERT_CHUNK) {
        let mut params = Params::new(connection.get_database_backend());
        let mut rows = Vec::with_capacity(chunk.len());
        for entry in chunk {
            let event = &entry.event;
            let values = [
                params.bind(to_i64(entry.sequence)),
                params.bind(event.event_id.as_str()),
                params.bind(event.occurred_at.seconds),
                params.bind(i32::try_from(event.occurred_at.nanos).unwrap_or(0)),
                params.bind(entry.recorded_at.seconds),
                params.bind(i32::try_from(entry.recorded_at.nanos).unwrap_or(0)),
                params.bind(event.agent_type.as_str()),
                params.bind(event.action.as_str()),
                params.bind(event.user_id.as_str()),
                params.bind(event.project_id.as_str()),
                params.bind(event.workflow_id.as_str()),
                params.bind(event.trace_id.as_str()),
                params.bind(i32::try_from(event.outcome).unwrap_or(0)),
                params.bind(event.context_json.as_str()),
                params.bind(hex::encode(event.context_hash)),
                params.bind(hex::encode(entry.prev_hash)),
                params.bind(hex::encode(entry.entry_hash)),
            ];
            rows.push(format!("({})", values.join(", ")));
        }
        let sql = format!(
            "INSERT INTO audit_entries ({ENTRY_COLUMNS}) VALUES {}",
            rows.join(", ")
        );
        connection.execute_raw(params.statement(sql)).await?;
    }
    Ok(())
}

/// PostgreSQL: the group as JSON parameters of at most
/// [`MAX_JSON_PARAM_BYTES`], unpacked by `json_to_recordset` (one cached
/// statement text).
async fn insert_entries_postgres<C: ConnectionTrait>(
    connection: &C,
    entries: &[Entry],
) -> Result<(), DbErr> {
    let rows: Vec<serde_json::Value> = entries
        .iter()
        .map(|entry| {
            let event = &entry.event;
            serde_json::json!({
                "sequence": entry.sequence,
                "event_id": event.event_id,
                "occurred_at_seconds": event.occurred_at.seconds,
                "occurred_at_nanos": event.occurred_at.nanos,
                "recorded_at_seconds": entry.recorded_at.seconds,
                "recorded_at_nanos": entry.recorded_at.nanos,
                "agent_type": event.agent_type,
                "action": event.action,
                "user_id": event.user_id,
                "project_id": event.project_id,
                "workflow_id": event.workflow_id,
                "trace_id": event.trace_id,
                "outcome": event.outcome,
                "context": event.context_json,
                "context_hash": hex::encode(event.context_hash),
                "prev_hash": hex::encode(entry.prev_hash),
                "entry_hash": hex::encode(entry.entry_hash),
            })
        })
        .collect();
    for array in json_arrays_within_budget(rows.iter().map(ToString::to_string)) {
        let mut params = Params::new(DbBackend::Postgres);
        let json = params.bind(array);
        let sql = format!(
            "INSERT INTO audit_entries ({ENTRY_COLUMNS}) SELECT {ENTRY_COLUMNS} \
         FROM json_to_recordset({json}::json) AS r(sequence bigint, event_id text, \
         occurred_at_seconds bigint, occurred_at_nanos integer, recorded_at_seconds bigint, \
         recorded_at_nanos integer, agent_type text, action text, user_id text, project_id text, \
         workflow_id text, trace_id text, outcome integer, context text, context_hash text, \
         prev_hash text, entry_hash text)"
        );
        connection.execute_raw(params.statement(sql)).await?;
    }
    Ok(())
}

/// Entries with `from <= sequence <= to`, ascending, at most `limit`.
pub async fn entries_in_range<C: ConnectionTrait>(
    connection: &C,
    from: u64,
    to: u64,
    limit: u32,
) -> Result<Vec<QueryResult>, DbErr> {
    let mut params = Params::new(connection.get_database_backend());
    let sql = format!(
        "SELECT {ENTRY_COLUMNS} FROM audit_entries WHERE sequence >= {} AND sequence <= {} \
         ORDER BY sequence ASC LIMIT {limit}",
        params.bind(to_i64(from)),
        params.bind(to_i64(to)),
    );
    connection.query_all_raw(params.statement(sql)).await
}

/// The stored entry_hash text at `sequence`.
pub async fn entry_hash_at<C: ConnectionTrait>(
    connection: &C,
    sequence: u64,
) -> Result<Option<String>, DbErr> {
    let mut params = Params::new(connection.get_database_backend());
    let sql = format!(
        "SELECT entry_hash FROM audit_entries WHERE sequence = {}",
        params.bind(to_i64(sequence))
    );
    match connection.query_one_raw(params.statement(sql)).await? {
        Some(row) => Ok(Some(row.try_get_by_index::<String>(0)?)),
        None => Ok(None),
    }
}

/// The highest stored sequence (0 when empty).
pub async fn max_sequence<C: ConnectionTrait>(connection: &C) -> Result<u64, DbErr> {
    let row = connection
        .query_one_raw(Statement::from_string(
            connection.get_database_backend(),
            "SELECT COALESCE(MAX(sequence), 0) FROM audit_entries",
        ))
        .await?;
    let max: i64 = match row {
        Some(row) => row.try_get_by_index(0)?,
        None => 0,
    };
    Ok(u64::try_from(max).unwrap_or(0))
}

/// One page of a filtered query after the `after` sequence (exclusive, in
/// the direction of `filter.order`).
pub async fn query<C: ConnectionTrait>(
    connection: &C,
    filter: &QueryFilter,
    after: Option<u64>,
    limit: u32,
) -> Result<Vec<Entry>, DbErr> {
    let mut params = Params::new(connection.get_database_backend());
    let mut conditions = Vec::new();
    if let Some(start) = filter.start_time {
        let seconds = params.bind(start.seconds);
        let seconds_again = params.bind(start.seconds);
        let nanos = params.bind(i32::try_from(start.nanos).unwrap_or(0));
        conditions.push(format!(
            "(occurred_at_seconds > {seconds} OR (occurred_at_seconds = {seconds_again} AND occurred_at_nanos >= {nanos}))"
        ));
    }
    if let Some(end) = filter.end_time {
        let seconds = params.bind(end.seconds);
        let seconds_again = params.bind(end.seconds);
        let nanos = params.bind(i32::try_from(end.nanos).unwrap_or(0));
        conditions.push(format!(
            "(occurred_at_seconds < {seconds} OR (occurred_at_seconds = {seconds_again} AND occurred_at_nanos < {nanos}))"
        ));
    }
    for (column, value) in [
        ("agent_type", &filter.agent_type),
        ("action", &filter.action),
        ("user_id", &filter.user_id),
        ("project_id", &filter.project_id),
        ("workflow_id", &filter.workflow_id),
        ("trace_id", &filter.trace_id),
    ] {
        if !value.is_empty() {
            conditions.push(format!("{column} = {}", params.bind(value.as_str())));
        }
    }
    if filter.outcome != 0 {
        conditions.push(format!(
            "outcome = {}",
            params.bind(i32::try_from(filter.outcome).unwrap_or(0))
        ));
    }
    let (comparison, direction) = match filter.order {
        Order::NewestFirst => ("<", "DESC"),
        Order::OldestFirst => (">", "ASC"),
    };
    if let Some(after) = after {
        conditions.push(format!(
            "sequence {comparison} {}",
            params.bind(to_i64(after))
        ));
    }
    let where_clause = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT {ENTRY_COLUMNS} FROM audit_entries {where_clause} ORDER BY sequence {direction} LIMIT {limit}"
    );
    let rows = connection.query_all_raw(params.statement(sql)).await?;
    decode_entries(&rows)
}

/// Stores a checkpoint unless one exists at its sequence.
pub async fn insert_checkpoint<C: ConnectionTrait>(
    connection: &C,
    checkpoint: &Checkpoint,
) -> Result<(), DbErr> {
    let mut params = Params::new(connection.get_database_backend());
    let values = [
        params.bind(to_i64(checkpoint.sequence)),
        params.bind(hex::encode(checkpoint.entry_hash)),
        params.bind(checkpoint.signed_at.seconds),
        params.bind(i32::try_from(checkpoint.signed_at.nanos).unwrap_or(0)),
        params.bind(hex::encode(checkpoint.signature)),
        params.bind(hex::encode(checkpoint.public_key)),
        params.bind(checkpoint.key_id.as_str()),
    ];
    let sql = format!(
        "INSERT INTO audit_checkpoints ({CHECKPOINT_COLUMNS}) VALUES ({}) ON CONFLICT (sequence) DO NOTHING",
        values.join(", ")
    );
    connection.execute_raw(params.statement(sql)).await?;
    Ok(())
}

fn decode_checkpoint(row: &QueryResult) -> Result<Checkpoint, DbErr> {
    let sequence: i64 = row.try_get_by_index(0)?;
    let entry_hash: String = row.try_get_by_index(1)?;
    let seconds: i64 = row.try_get_by_index(2)?;
    let nanos: i32 = row.try_get_by_index(3)?;
    let signature: String = row.try_get_by_index(4)?;
    let public_key: String = row.try_get_by_index(5)?;
    let key_id: String = row.try_get_by_index(6)?;
    let mut signature_bytes = [0; 64];
    let mut public_key_bytes = [0; 32];
    hex::decode_to_slice(&signature, &mut signature_bytes)
        .map_err(|_| corrupt("checkpoint signature is not 128 hex digits"))?;
    hex::decode_to_slice(&public_key, &mut public_key_bytes)
        .map_err(|_| corrupt("checkpoint public key is not 64 hex digits"))?;
    Ok(Checkpoint {
        sequence: u64::try_from(sequence).map_err(corrupt)?,
        entry_hash: chain::parse_hash(&entry_hash)
            .ok_or_else(|| corrupt("checkpoint entry hash is not 64 hex digits"))?,
        signed_at: Timestamp {
            seconds,
            nanos: u32::try_from(nanos).map_err(corrupt)?,
        },
        signature: signature_bytes,
        public_key: public_key_bytes,
        key_id,
    })
}

/// The checkpoint at `sequence`, or the newest when `None`.
pub async fn checkpoint<C: ConnectionTrait>(
    connection: &C,
    sequence: Option<u64>,
) -> Result<Option<Checkpoint>, DbErr> {
    let mut params = Params::new(connection.get_database_backend());
    let sql = match sequence {
        Some(sequence) => format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE sequence = {}",
            params.bind(to_i64(sequence))
        ),
        None => format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY sequence DESC LIMIT 1"
        ),
    };
    match connection.query_one_raw(params.statement(sql)).await? {
        Some(row) => Ok(Some(decode_checkpoint(&row)?)),
        None => Ok(None),
    }
}

/// Checkpoints with `from <= sequence <= to`, ascending, at most `limit`.
pub async fn checkpoints_in_range<C: ConnectionTrait>(
    connection: &C,
    from: u64,
    to: u64,
    limit: u32,
) -> Result<Vec<Checkpoint>, DbErr> {
    let mut params = Params::new(connection.get_database_backend());
    let sql = format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE sequence >= {} AND sequence <= {} \
         ORDER BY sequence ASC LIMIT {limit}",
        params.bind(to_i64(from)),
        params.bind(to_i64(to)),
    );
    let rows = connection.query_all_raw(params.statement(sql)).await?;
    rows.iter().map(decode_checkpoint).collect()
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn json_arrays_stay_within_budget_and_keep_every_value() {
        let values: Vec<String> = (0..100)
            .map(|i| format!("\"{}\"", "x".repeat(300 + i)))
            .collect();
        let arrays = json_arrays_within_budget(values.clone());
        assert!(arrays.len() > 1);
        let mut seen = Vec::new();
        for array in &arrays {
            assert!(array.len() <= MAX_JSON_PARAM_BYTES, "{}", array.len());
            let parsed: Vec<String> = serde_json::from_str(array).unwrap();
            seen.extend(parsed.into_iter().map(|v| format!("\"{v}\"")));
        }
        assert_eq!(seen, values);
        let big = "y".repeat(MAX_JSON_PARAM_BYTES * 2);
        assert_eq!(json_arrays_within_budget([format!("\"{big}\"")]).len(), 1);
        assert!(json_arrays_within_budget(Vec::<String>::new()).is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_powers_of_two_covering_everything() {
        let items: Vec<u32> = (0..1300).collect();
        let sizes: Vec<usize> = power_of_two_chunks(&items, 512)
            .iter()
            .map(|chunk| chunk.len())
            .collect();
        assert_eq!(sizes, [512, 512, 256, 16, 4]);
        assert!(power_of_two_chunks::<u32>(&[], 512).is_empty());
        assert_eq!(power_of_two_chunks(&items[..3], 512).len(), 2);
    }
}
