//! The byte-exact hashing and signing rules of the audit log, as documented
//! at the top of `proto/agentmesh/audit/v1/audit.proto`:
//! canonical JSON (RFC 8785) of a context, its SHA-256, the chained
//! `entry_hash`, and the message an Ed25519 checkpoint signs.

use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The `prev_hash` of sequence 1.
pub const GENESIS_HASH: Hash = [0; 32];

const ENTRY_DOMAIN: &[u8] = b"agentmesh.audit.v1.entry";
const CHECKPOINT_DOMAIN: &[u8] = b"agentmesh.audit.v1.checkpoint";

/// A UTC instant as protobuf spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Nanoseconds within the second, 0 to 999,999,999.
    pub nanos: u32,
}

impl Timestamp {
    /// The current time by the server's clock.
    pub fn now() -> Self {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            seconds: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
            nanos: since_epoch.subsec_nanos(),
        }
    }

    fn write_to(&self, hasher: &mut Sha256) {
        hasher.update(self.seconds.to_be_bytes());
        hasher.update(self.nanos.to_be_bytes());
    }
}

/// The fields of an entry that its `entry_hash` covers, besides the chain
/// link and the sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryFields<'a> {
    /// Client-chosen event id.
    pub event_id: &'a str,
    /// Agent type.
    pub agent_type: &'a str,
    /// Action.
    pub action: &'a str,
    /// User id.
    pub user_id: &'a str,
    /// Project id.
    pub project_id: &'a str,
    /// Workflow id.
    pub workflow_id: &'a str,
    /// Trace id.
    pub trace_id: &'a str,
    /// Outcome enum number.
    pub outcome: u32,
    /// When it happened.
    pub occurred_at: Timestamp,
    /// When it was stored.
    pub recorded_at: Timestamp,
}

/// Canonical JSON (RFC 8785) of a context object.
pub fn canonical_json(context: &serde_json::Value) -> Result<String, serde_json::Error> {
    serde_json_canonicalizer::to_string(context)
}

/// SHA-256 of bytes.
pub fn sha256(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

/// `entry_hash` of an entry.
pub fn entry_hash(
    sequence: u64,
    prev_hash: &Hash,
    context_hash: &Hash,
    fields: &EntryFields<'_>,
) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(ENTRY_DOMAIN);
    hasher.update(sequence.to_be_bytes());
    hasher.update(prev_hash);
    hasher.update(context_hash);
    for text in [
        fields.event_id,
        fields.agent_type,
        fields.action,
        fields.user_id,
        fields.project_id,
        fields.workflow_id,
        fields.trace_id,
    ] {
        // Fields are bounded far below 4 GiB by validation.
        let length = u32::try_from(text.len()).unwrap_or(u32::MAX);
        hasher.update(length.to_be_bytes());
        hasher.update(text.as_bytes());
    }
    hasher.update(fields.outcome.to_be_bytes());
    fields.occurred_at.write_to(&mut hasher);
    fields.recorded_at.write_to(&mut hasher);
    hasher.finalize().into()
}

/// The exact bytes an Ed25519 checkpoint signature covers.
pub fn checkpoint_message(sequence: u64, entry_hash: &Hash, signed_at: Timestamp) -> Vec<u8> {
    let mut message = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 8 + 32 + 12);
    message.extend_from_slice(CHECKPOINT_DOMAIN);
    message.extend_from_slice(&sequence.to_be_bytes());
    message.extend_from_slice(entry_hash);
    message.extend_from_slice(&signed_at.seconds.to_be_bytes());
    message.extend_from_slice(&signed_at.nanos.to_be_bytes());
    message
}

/// Decodes a stored 64-hex-digit hash.
pub fn parse_hash(text: &str) -> Option<Hash> {
    let mut hash = [0; 32];
    hex::decode_to_slice(text, &mut hash).ok()?;
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_ignores_key_order_and_number_spelling() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b": 1.0, "a": [1e2, "x"], "c": {"z": 0, "y": -0.5}}"#)
                .unwrap();
        let b = json!({"c": {"y": -0.5, "z": 0}, "a": [100, "x"], "b": 1});
        assert_eq!(canonical_json(&a).unwrap(), canonical_json(&b).unwrap());
        assert_eq!(
            canonical_json(&a).unwrap(),
            r#"{"a":[100,"x"],"b":1,"c":{"y":-0.5,"z":0}}"#
        );
        assert_eq!(canonical_json(&json!({})).unwrap(), "{}");
    }

    #[test]
    fn entry_hash_covers_every_field() {
        let fields = EntryFields {
            event_id: "e",
            agent_type: "coder",
            action: "task.execute",
            user_id: "u",
            project_id: "p",
            workflow_id: "w",
            trace_id: "",
            outcome: 1,
            occurred_at: Timestamp {
                seconds: 1,
                nanos: 2,
            },
            recorded_at: Timestamp {
                seconds: 3,
                nanos: 4,
            },
        };
        let context = sha256(b"{}");
        let base = entry_hash(1, &GENESIS_HASH, &context, &fields);
        assert_ne!(base, entry_hash(2, &GENESIS_HASH, &context, &fields));
        assert_ne!(base, entry_hash(1, &[1; 32], &context, &fields));
        assert_ne!(base, entry_hash(1, &GENESIS_HASH, &[1; 32], &fields));
        // Length prefixes keep field boundaries: "ab"+"" differs from "a"+"b".
        let shifted = EntryFields {
            event_id: "ea",
            agent_type: "oder",
            ..fields.clone()
        };
        let unshifted = EntryFields {
            event_id: "e",
            agent_type: "aoder",
            ..fields.clone()
        };
        assert_ne!(
            entry_hash(1, &GENESIS_HASH, &context, &shifted),
            entry_hash(1, &GENESIS_HASH, &context, &unshifted)
        );
        let later = EntryFields {
            recorded_at: Timestamp {
                seconds: 3,
                nanos: 5,
            },
            ..fields.clone()
        };
        assert_ne!(base, entry_hash(1, &GENESIS_HASH, &context, &later));
    }

    #[test]
    fn checkpoint_message_layout() {
        let message = checkpoint_message(
            258,
            &[7; 32],
            Timestamp {
                seconds: 1,
                nanos: 2,
            },
        );
        assert_eq!(message.len(), 29 + 8 + 32 + 12);
        assert_eq!(&message[..29], b"agentmesh.audit.v1.checkpoint");
        assert_eq!(&message[29..37], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(&message[69..], &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2]);
    }
}
