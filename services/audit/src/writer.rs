//! The single writer with group commit. Append calls queue their validated
//! events with a reply channel; the writer takes everything queued (up to
//! `audit.group_commit_max_events`, optionally waiting
//! `audit.group_commit_wait_us` for more), and in ONE transaction locks the
//! chain head, skips event ids already stored (a retry gets the original
//! entry), assigns the next sequences, inserts, moves the head, signs a
//! checkpoint when one is due, and commits. Only then does each caller get
//! its reply, so an acknowledged append is durable.
//!
//! A request whose event id is stored with different content fails alone;
//! the rest of its group still commits. A database failure fails the whole
//! group and nothing of it is stored (callers may retry: event ids make
//! that safe).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentmesh_db::Database;
use sea_orm::TransactionTrait as _;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::chain::{self, Timestamp};
use crate::error::AuditError;
use crate::model::{Appended, Entry, Event};
use crate::signing::Signer;
use crate::store;

/// The reply to one append request.
pub type AppendReply = Result<Vec<Appended>, AuditError>;

/// One queued append request: a whole batch, committed together.
pub struct AppendJob {
    /// Validated events in request order.
    pub events: Vec<Event>,
    /// `event` for Append, `events[i]` for AppendBatch: names fields in
    /// errors.
    pub path_prefix: &'static str,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<AppendReply>,
}

/// Writer tuning.
#[derive(Clone, Debug)]
pub struct WriterSettings {
    /// Most events per transaction.
    pub group_max_events: usize,
    /// Wait for more appends before committing.
    pub group_wait: Duration,
    /// Checkpoint after this many appended entries.
    pub checkpoint_every_entries: u64,
    /// Checkpoint new entries at least this often.
    pub checkpoint_every: Duration,
}

/// Runs the writer until `stop` is cancelled and the queue is drained.
pub async fn run(
    database: Database,
    signer: Signer,
    settings: WriterSettings,
    mut queue: mpsc::Receiver<AppendJob>,
    stop: CancellationToken,
) {
    let mut since_checkpoint: u64 = 0;
    let mut checkpoint_tick = tokio::time::interval(settings.checkpoint_every);
    checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    checkpoint_tick.tick().await;
    loop {
        let first = tokio::select! {
            job = queue.recv() => match job {
                Some(job) => job,
                None => break,
            },
            () = stop.cancelled() => {
                // In-flight calls have finished by now (the server drained);
                // commit whatever is still queued, then stop.
                queue.close();
                match queue.recv().await {
                    Some(job) => job,
                    None => break,
                }
            }
            _ = checkpoint_tick.tick() => {
                if let Err(error) = checkpoint_head(&database, &signer).await {
                    tracing::warn!(%error, "periodic audit checkpoint failed");
                }
                since_checkpoint = 0;
                continue;
            }
        };
        let mut jobs = vec![first];
        let mut events: usize = jobs[0].events.len();
        let deadline = tokio::time::Instant::now() + settings.group_wait;
        while events < settings.group_max_events {
            let next = if settings.group_wait.is_zero() {
                queue.try_recv().ok()
            } else {
                tokio::time::timeout_at(deadline, queue.recv())
                    .await
                    .ok()
                    .flatten()
            };
            let Some(job) = next else { break };
            events += job.events.len();
            jobs.push(job);
        }
        let checkpoint_due = since_checkpoint + events as u64 >= settings.checkpoint_every_entries;
        metrics::histogram!("agentmesh_audit_group_commit_events").record(events as f64);
        let started = Instant::now();
        match commit_group(&database, &signer, &jobs, checkpoint_due).await {
            Ok((outcomes, appended, checkpointed)) => {
                metrics::histogram!("agentmesh_audit_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                since_checkpoint = if checkpointed {
                    0
                } else {
                    since_checkpoint + appended
                };
                metrics::counter!("agentmesh_audit_appends_total", "result" => "appended")
                    .increment(appended);
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    if let Ok(results) = &outcome {
                        let duplicates = results.iter().filter(|r| r.duplicate).count() as u64;
                        metrics::counter!("agentmesh_audit_appends_total", "result" => "duplicate")
                            .increment(duplicates);
                    }
                    let _ = job.reply.send(outcome);
                }
            }
            Err(error) => {
                metrics::counter!("agentmesh_audit_commit_failures_total").increment(1);
                tracing::warn!(%error, events, "audit group commit failed; nothing of it was stored");
                let message = error.to_string();
                for job in jobs {
                    let _ = job
                        .reply
                        .send(Err(AuditError::Database(sea_orm::DbErr::Custom(
                            message.clone(),
                        ))));
                }
            }
        }
    }
    tracing::debug!("audit writer stopped");
}

/// Outcomes per job, entries appended, whether a checkpoint was stored.
type GroupOutcome = (Vec<AppendReply>, u64, bool);

async fn commit_group(
    database: &Database,
    signer: &Signer,
    jobs: &[AppendJob],
    checkpoint_due: bool,
) -> Result<GroupOutcome, sea_orm::DbErr> {
    let transaction = database.begin_write().await?;
    let (mut sequence, mut prev_hash) = store::read_head(&transaction, true).await?;
    let event_ids: Vec<&str> = jobs
        .iter()
        .flat_map(|job| job.events.iter().map(|event| event.event_id.as_str()))
        .collect();
    let mut known: HashMap<String, Entry> = store::find_by_event_ids(&transaction, &event_ids)
        .await?
        .into_iter()
        .map(|entry| (entry.event.event_id.clone(), entry))
        .collect();
    let recorded_at = Timestamp::now();
    let mut new_entries = Vec::new();
    let mut outcomes = Vec::with_capacity(jobs.len());
    for job in jobs {
        // A conflicting event fails its own request only, before any of the
        // request's events takes a sequence.
        let conflict = job.events.iter().enumerate().find(|(_, event)| {
            known
                .get(&event.event_id)
                .is_some_and(|stored| !stored.event.same_content(event))
        });
        if let Some((index, event)) = conflict {
            let field = if job.path_prefix == "event" {
                "event.event_id".to_owned()
            } else {
                format!("{}[{index}].event_id", job.path_prefix)
            };
            outcomes.push(Err(AuditError::Conflict {
                field,
                event_id: event.event_id.clone(),
            }));
            continue;
        }
        let mut results = Vec::with_capacity(job.events.len());
        for event in &job.events {
            if let Some(stored) = known.get(&event.event_id) {
                results.push(Appended {
                    entry: stored.clone(),
                    duplicate: true,
                });
                continue;
            }
            sequence += 1;
            let entry_hash = chain::entry_hash(
                sequence,
                &prev_hash,
                &event.context_hash,
                &event.hashed_fields(recorded_at),
            );
            let entry = Entry {
                event: event.clone(),
                sequence,
                recorded_at,
                prev_hash,
                entry_hash,
            };
            prev_hash = entry_hash;
            known.insert(event.event_id.clone(), entry.clone());
            new_entries.push(entry.clone());
            results.push(Appended {
                entry,
                duplicate: false,
            });
        }
        outcomes.push(Ok(results));
    }
    let appended = new_entries.len() as u64;
    let mut checkpointed = false;
    if appended > 0 {
        store::insert_entries(&transaction, &new_entries).await?;
        store::write_head(&transaction, sequence, &prev_hash).await?;
        if checkpoint_due {
            store::insert_checkpoint(&transaction, &signer.sign(sequence, prev_hash)).await?;
            metrics::counter!("agentmesh_audit_checkpoints_total").increment(1);
            checkpointed = true;
        }
    }
    transaction.commit().await?;
    Ok((outcomes, appended, checkpointed))
}

/// Signs the current chain head unless a checkpoint already covers it;
/// returns the newest checkpoint (`None` for an empty log).
pub async fn checkpoint_head(
    database: &Database,
    signer: &Signer,
) -> Result<Option<crate::model::Checkpoint>, sea_orm::DbErr> {
    let writer = database.writer();
    let (sequence, entry_hash) = store::read_head(writer, false).await?;
    if sequence == 0 {
        return Ok(None);
    }
    let latest = store::checkpoint(writer, None).await?;
    if latest
        .as_ref()
        .is_some_and(|latest| latest.sequence >= sequence)
    {
        return Ok(latest);
    }
    let transaction = writer.begin().await?;
    store::insert_checkpoint(&transaction, &signer.sign(sequence, entry_hash)).await?;
    transaction.commit().await?;
    metrics::counter!("agentmesh_audit_checkpoints_total").increment(1);
    store::checkpoint(writer, Some(sequence)).await
}
