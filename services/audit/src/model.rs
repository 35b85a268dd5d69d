//! Domain types of the audit log (no tonic types): a validated event, a
//! stored entry, a checkpoint, query filters and verify reports.

use crate::chain::{EntryFields, Hash, Timestamp};

/// A validated event, with its context already in canonical JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Client-chosen unique id.
    pub event_id: String,
    /// When it happened, by the client's clock.
    pub occurred_at: Timestamp,
    /// Agent type, may be empty.
    pub agent_type: String,
    /// What was done.
    pub action: String,
    /// Who did it, may be empty.
    pub user_id: String,
    /// Project, may be empty.
    pub project_id: String,
    /// Workflow run, may be empty.
    pub workflow_id: String,
    /// W3C trace id (32 lowercase hex digits), may be empty.
    pub trace_id: String,
    /// Outcome enum number (1 to 4).
    pub outcome: u32,
    /// RFC 8785 canonical JSON of the context object.
    pub context_json: String,
    /// SHA-256 of `context_json`.
    pub context_hash: Hash,
}

impl Event {
    /// Whether `other` describes the same event: every field but the trace
    /// id, which a retry may fill from a different incoming trace.
    pub fn same_content(&self, other: &Event) -> bool {
        self.event_id == other.event_id
            && self.occurred_at == other.occurred_at
            && self.agent_type == other.agent_type
            && self.action == other.action
            && self.user_id == other.user_id
            && self.project_id == other.project_id
            && self.workflow_id == other.workflow_id
            && self.outcome == other.outcome
            && self.context_hash == other.context_hash
    }

    /// The fields `entry_hash` covers.
    pub fn hashed_fields(&self, recorded_at: Timestamp) -> EntryFields<'_> {
        EntryFields {
            event_id: &self.event_id,
            agent_type: &self.agent_type,
            action: &self.action,
            user_id: &self.user_id,
            project_id: &self.project_id,
            workflow_id: &self.workflow_id,
            trace_id: &self.trace_id,
            outcome: self.outcome,
            occurred_at: self.occurred_at,
            recorded_at,
        }
    }
}

/// A stored entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The event.
    pub event: Event,
    /// Position in the log, from 1.
    pub sequence: u64,
    /// When the server stored it.
    pub recorded_at: Timestamp,
    /// Hash of the previous entry.
    pub prev_hash: Hash,
    /// This entry's chain hash.
    pub entry_hash: Hash,
}

/// The outcome of appending one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The stored entry (the original one for a duplicate).
    pub entry: Entry,
    /// True when the event id was already stored.
    pub duplicate: bool,
}

/// A signed statement of the chain head at a sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The covered sequence.
    pub sequence: u64,
    /// Its entry hash.
    pub entry_hash: Hash,
    /// When it was signed.
    pub signed_at: Timestamp,
    /// Ed25519 signature of [`crate::chain::checkpoint_message`].
    pub signature: [u8; 64],
    /// The verifying key.
    pub public_key: [u8; 32],
    /// Identifier of the key.
    pub key_id: String,
}

/// Sort order of a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Highest sequence first.
    NewestFirst,
    /// Lowest sequence first.
    OldestFirst,
}

/// Query filters; empty strings and `None` match everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryFilter {
    /// Inclusive lower bound on occurred_at.
    pub start_time: Option<Timestamp>,
    /// Exclusive upper bound on occurred_at.
    pub end_time: Option<Timestamp>,
    /// Exact agent type.
    pub agent_type: String,
    /// Exact action.
    pub action: String,
    /// Exact user id.
    pub user_id: String,
    /// Exact project id.
    pub project_id: String,
    /// Exact workflow id.
    pub workflow_id: String,
    /// Exact trace id.
    pub trace_id: String,
    /// Exact outcome number; 0 matches all.
    pub outcome: u32,
    /// Sort order.
    pub order: Order,
}

/// One page of a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryPage {
    /// Entries in order.
    pub entries: Vec<Entry>,
    /// Token of the next page, empty at the end.
    pub next_page_token: String,
}

/// Kind of integrity problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Content or hash changed.
    Modified,
    /// A sequence has no entry.
    Missing,
    /// The chain link is broken.
    Reordered,
}

/// The result of verifying a range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// First sequence checked.
    pub from_sequence: u64,
    /// Last sequence checked.
    pub to_sequence: u64,
    /// Entries checked before stopping.
    pub entries_checked: u64,
    /// The first problem, if any.
    pub problem: Option<(u64, Problem, String)>,
    /// entry_hash of `to_sequence` when the range verified.
    pub last_entry_hash: Option<Hash>,
}
