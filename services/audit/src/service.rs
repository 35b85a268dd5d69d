//! The audit logic (no tonic types): appends through the writer queue,
//! paged queries on the read pool, streaming verification and checkpoints.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_db::Database;
use agentmesh_resilience::FieldViolation;
use agentmesh_settings::Settings;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::chain::{self, GENESIS_HASH, Hash};
use crate::convert::Limits;
use crate::error::AuditError;
use crate::model::{
    Appended, Checkpoint, Event, Order, Problem, QueryFilter, QueryPage, VerifyReport,
};
use crate::signing::{self, Signer};
use crate::store;
use crate::writer::{self, AppendJob, WriterSettings};

/// The running audit service.
pub struct AuditCore {
    database: Database,
    signer: Signer,
    queue: mpsc::Sender<AppendJob>,
    queue_capacity: usize,
    limits: Limits,
    verify_page_size: u32,
    max_verify_range: u64,
    stop: CancellationToken,
    writer: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl AuditCore {
    /// Starts the writer task.
    pub fn start(database: Database, signer: Signer, settings: &Settings) -> Arc<Self> {
        let audit = &settings.audit;
        let (queue, receiver) = mpsc::channel(audit.queue_capacity);
        let stop = CancellationToken::new();
        let writer = tokio::spawn(writer::run(
            database.clone(),
            signer.clone(),
            WriterSettings {
                group_max_events: audit.group_commit_max_events,
                group_wait: Duration::from_micros(audit.group_commit_wait_us),
                checkpoint_every_entries: audit.checkpoint_every_entries,
                checkpoint_every: Duration::from_secs(audit.checkpoint_every_seconds),
            },
            receiver,
            stop.clone(),
        ));
        Arc::new(Self {
            database,
            signer,
            queue,
            queue_capacity: audit.queue_capacity,
            limits: Limits::from(audit),
            verify_page_size: audit.verify_page_size,
            max_verify_range: audit.max_verify_range,
            stop,
            writer: std::sync::Mutex::new(Some(writer)),
        })
    }

    /// Wire-input limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The signer (its public key and id).
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// Appends validated events atomically; returns once committed.
    pub async fn append(
        &self,
        events: Vec<Event>,
        path_prefix: &'static str,
    ) -> Result<Vec<Appended>, AuditError> {
        let (reply, receiver) = oneshot::channel();
        let job = AppendJob {
            events,
            path_prefix,
            reply,
        };
        self.queue.try_send(job).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => AuditError::Overloaded(self.queue_capacity),
            mpsc::error::TrySendError::Closed(_) => AuditError::ShuttingDown,
        })?;
        receiver.await.map_err(|_| AuditError::ShuttingDown)?
    }

    /// One page of entries matching `filter`.
    pub async fn query(
        &self,
        filter: &QueryFilter,
        page_size: u32,
        page_token: &str,
    ) -> Result<QueryPage, AuditError> {
        let fingerprint = filter_fingerprint(filter);
        let after = if page_token.is_empty() {
            None
        } else {
            Some(parse_page_token(page_token, &fingerprint)?)
        };
        let mut entries =
            store::query(self.database.reader(), filter, after, page_size + 1).await?;
        let next_page_token = if entries.len() > page_size as usize {
            entries.truncate(page_size as usize);
            entries
                .last()
                .map(|entry| format!("{}.{fingerprint}", entry.sequence))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(QueryPage {
            entries,
            next_page_token,
        })
    }

    /// Recomputes hashes over `[from, to]` (0 = first / latest), reading
    /// `audit.verify_page_size` entries at a time, and checks every stored
    /// checkpoint in the range.
    pub async fn verify(&self, from: u64, to: u64) -> Result<VerifyReport, AuditError> {
        let result = self.verify_range(from, to).await;
        let label = match &result {
            Ok(report) if report.problem.is_none() => "ok",
            Ok(_) => "failed",
            Err(_) => "error",
        };
        metrics::counter!("agentmesh_audit_verify_runs_total", "result" => label).increment(1);
        result
    }

    async fn verify_range(&self, from: u64, to: u64) -> Result<VerifyReport, AuditError> {
        let reader = self.database.reader();
        // The head row is the authority on how long the chain is: deleting
        // the newest entries leaves it pointing past them.
        let (head_sequence, head_hash) = store::read_head(reader, false).await?;
        let latest = head_sequence.max(store::max_sequence(reader).await?);
        let from = from.max(1);
        let to = if to == 0 { latest } else { to };
        let mut violations = Vec::new();
        if to > latest {
            violations.push(FieldViolation::new(
                "to_sequence",
                to.to_string(),
                format!("must be at most the latest sequence {latest}"),
            ));
        }
        if latest > 0 && from > to {
            violations.push(FieldViolation::new(
                "from_sequence",
                from.to_string(),
                format!("must be at most to_sequence ({to})"),
            ));
        }
        if to >= from && to - from >= self.max_verify_range {
            violations.push(FieldViolation::new(
                "to_sequence",
                to.to_string(),
                format!(
                    "the range may cover at most {} entries (audit.max_verify_range)",
                    self.max_verify_range
                ),
            ));
        }
        if !violations.is_empty() {
            return Err(AuditError::Invalid(violations));
        }
        let mut report = VerifyReport {
            from_sequence: from,
            to_sequence: to,
            entries_checked: 0,
            problem: None,
            last_entry_hash: None,
        };
        if latest == 0 {
            report.from_sequence = 0;
            return Ok(report);
        }
        // The link into the range: the previous entry's stored hash.
        let mut expected_prev: Option<Hash> = if from == 1 {
            Some(GENESIS_HASH)
        } else {
            store::entry_hash_at(reader, from - 1)
                .await?
                .and_then(|text| chain::parse_hash(&text))
        };
        let mut next = from;
        let fail = |report: &mut VerifyReport, sequence, problem, detail: String| {
            report.problem = Some((sequence, problem, detail));
        };
        while next <= to {
            let page_end = next
                .saturating_add(u64::from(self.verify_page_size) - 1)
                .min(to);
            let rows =
                store::entries_in_range(reader, next, page_end, self.verify_page_size).await?;
            let checkpoints: BTreeMap<u64, Checkpoint> =
                store::checkpoints_in_range(reader, next, page_end, self.verify_page_size)
                    .await?
                    .into_iter()
                    .map(|checkpoint| (checkpoint.sequence, checkpoint))
                    .collect();
            for row in &rows {
                let entry = match store::decode_entry(row) {
                    Ok(entry) => entry,
                    Err(reason) => {
                        fail(
                            &mut report,
                            next,
                            Problem::Modified,
                            format!("entry {next} cannot be decoded: {reason}"),
                        );
                        return Ok(report);
                    }
                };
                if entry.sequence != next {
                    fail(
                        &mut report,
                        next,
                        Problem::Missing,
                        format!(
                            "no entry with sequence {next} (next stored is {})",
                            entry.sequence
                        ),
                    );
                    return Ok(report);
                }
                if let Some(problem) = check_entry(&entry, expected_prev.as_ref()) {
                    fail(&mut report, next, problem.0, problem.1);
                    return Ok(report);
                }
                if let Some(checkpoint) = checkpoints.get(&next) {
                    if let Err(reason) = signing::verify_checkpoint(checkpoint) {
                        fail(
                            &mut report,
                            next,
                            Problem::Modified,
                            format!("the stored checkpoint at {next} is invalid: {reason}"),
                        );
                        return Ok(report);
                    }
                    if checkpoint.entry_hash != entry.entry_hash {
                        fail(
                            &mut report,
                            next,
                            Problem::Modified,
                            format!(
                                "entry {next} does not match the checkpoint signed at {}s by key {}: history was rewritten",
                                checkpoint.signed_at.seconds, checkpoint.key_id
                            ),
                        );
                        return Ok(report);
                    }
                }
                expected_prev = Some(entry.entry_hash);
                report.entries_checked += 1;
                report.last_entry_hash = Some(entry.entry_hash);
                next += 1;
            }
            if next <= page_end {
                fail(
                    &mut report,
                    next,
                    Problem::Missing,
                    format!("no entry with sequence {next}"),
                );
                return Ok(report);
            }
        }
        if to == head_sequence && report.last_entry_hash != Some(head_hash) {
            fail(
                &mut report,
                to,
                Problem::Modified,
                format!("entry {to} does not match the chain head's hash"),
            );
        }
        if report.problem.is_some() {
            report.last_entry_hash = None;
        }
        Ok(report)
    }

    /// The checkpoint at `sequence`, or for 0 the newest one (signing the
    /// head now when the log has grown since).
    pub async fn checkpoint(&self, sequence: u64) -> Result<Checkpoint, AuditError> {
        let found = if sequence == 0 {
            writer::checkpoint_head(&self.database, &self.signer).await?
        } else {
            store::checkpoint(self.database.reader(), Some(sequence)).await?
        };
        found.ok_or_else(|| {
            AuditError::NotFound(if sequence == 0 {
                "the audit log is empty: no checkpoint yet".to_owned()
            } else {
                format!("no checkpoint stored at sequence {sequence}")
            })
        })
    }

    /// Stops the writer after it has committed everything queued.
    pub async fn stop(&self) {
        self.stop.cancel();
        let handle = self.writer.lock().ok().and_then(|mut slot| slot.take());
        if let Some(handle) = handle {
            let _ = handle.await;
        }
    }
}

/// Recomputes one entry's hashes; the problem and why, if any.
fn check_entry(
    entry: &crate::model::Entry,
    expected_prev: Option<&Hash>,
) -> Option<(Problem, String)> {
    let sequence = entry.sequence;
    let context_hash = serde_json::from_str::<serde_json::Value>(&entry.event.context_json)
        .ok()
        .and_then(|json| chain::canonical_json(&json).ok())
        .map(|canonical| chain::sha256(canonical.as_bytes()));
    if context_hash != Some(entry.event.context_hash) {
        return Some((
            Problem::Modified,
            format!("entry {sequence}: the context does not match its context_hash"),
        ));
    }
    if let Some(expected) = expected_prev
        && *expected != entry.prev_hash
    {
        return Some((
            Problem::Reordered,
            format!(
                "entry {sequence}: prev_hash is not the entry_hash of entry {}",
                sequence - 1
            ),
        ));
    }
    let recomputed = chain::entry_hash(
        sequence,
        &entry.prev_hash,
        &entry.event.context_hash,
        &entry.event.hashed_fields(entry.recorded_at),
    );
    if recomputed != entry.entry_hash {
        return Some((
            Problem::Modified,
            format!("entry {sequence}: its fields do not match its entry_hash"),
        ));
    }
    None
}

fn filter_fingerprint(filter: &QueryFilter) -> String {
    let order = match filter.order {
        Order::NewestFirst => "n",
        Order::OldestFirst => "o",
    };
    let text = format!(
        "{:?}\u{0}{:?}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{order}",
        filter.start_time,
        filter.end_time,
        filter.agent_type,
        filter.action,
        filter.user_id,
        filter.project_id,
        filter.workflow_id,
        filter.trace_id,
        filter.outcome,
    );
    hex::encode(&chain::sha256(text.as_bytes())[..6])
}

fn parse_page_token(token: &str, fingerprint: &str) -> Result<u64, AuditError> {
    let invalid = |rule: &str| {
        AuditError::Invalid(vec![FieldViolation::new(
            "page_token",
            format!("{token:?}"),
            rule,
        )])
    };
    let (sequence, token_fingerprint) = token
        .split_once('.')
        .ok_or_else(|| invalid("must be a next_page_token returned by Query"))?;
    let sequence: u64 = sequence
        .parse()
        .map_err(|_| invalid("must be a next_page_token returned by Query"))?;
    if token_fingerprint != fingerprint {
        return Err(invalid(
            "belongs to a query with different filters or order",
        ));
    }
    Ok(sequence)
}
