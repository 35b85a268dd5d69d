//! The cached entry and its compact binary encoding in Redis.

use std::time::Duration;

/// A value with its attributes, as stored at both levels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The stored bytes.
    pub value: Vec<u8>,
    /// Media type; may be empty.
    pub content_type: String,
    /// Tags for invalidation by tag.
    pub tags: Vec<String>,
}

/// An entry read from a level, with its remaining time to live.
#[derive(Clone, Debug)]
pub struct Found {
    /// The entry.
    pub entry: Entry,
    /// Time left before it expires.
    pub remaining_ttl: Duration,
}

const FORMAT_VERSION: u8 = 1;

/// Why bytes read from Redis are not an entry.
#[derive(Debug, thiserror::Error)]
#[error("undecodable cache entry: {0}")]
pub struct DecodeError(&'static str);

impl Entry {
    /// Approximate memory held in L1 for this entry under `key`.
    pub fn weight(&self, key: &str) -> u32 {
        let bytes = key.len()
            + self.value.len()
            + self.content_type.len()
            + self.tags.iter().map(|tag| tag.len() + 24).sum::<usize>()
            + 96;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    /// `[version][u16 content type length][content type][u8 tag count]
    /// ([u16 tag length][tag])*[value]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            4 + self.content_type.len()
                + self.tags.iter().map(|tag| tag.len() + 2).sum::<usize>()
                + self.value.len(),
        );
        out.push(FORMAT_VERSION);
        // Lengths are bounded by request validation (128 bytes, 16 tags).
        let content_type =
            &self.content_type.as_bytes()[..self.content_type.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(content_type.len() as u16).to_be_bytes());
        out.extend_from_slice(content_type);
        let tags = &self.tags[..self.tags.len().min(u8::MAX as usize)];
        out.push(tags.len() as u8);
        for tag in tags {
            let tag = &tag.as_bytes()[..tag.len().min(u16::MAX as usize)];
            out.extend_from_slice(&(tag.len() as u16).to_be_bytes());
            out.extend_from_slice(tag);
        }
        out.extend_from_slice(&self.value);
        out
    }

    /// Reverses [`Entry::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut rest = bytes;
        let mut take = |count: usize| -> Result<&[u8], DecodeError> {
            if rest.len() < count {
                return Err(DecodeError("truncated"));
            }
            let (head, tail) = rest.split_at(count);
            rest = tail;
            Ok(head)
        };
        if take(1)?[0] != FORMAT_VERSION {
            return Err(DecodeError("unknown format version"));
        }
        let length = u16::from_be_bytes([take(1)?[0], take(1)?[0]]) as usize;
        let content_type = String::from_utf8(take(length)?.to_vec())
            .map_err(|_| DecodeError("content type is not UTF-8"))?;
        let tag_count = take(1)?[0] as usize;
        let mut tags = Vec::with_capacity(tag_count);
        for _ in 0..tag_count {
            let length = u16::from_be_bytes([take(1)?[0], take(1)?[0]]) as usize;
            tags.push(
                String::from_utf8(take(length)?.to_vec())
                    .map_err(|_| DecodeError("tag is not UTF-8"))?,
            );
        }
        Ok(Self {
            value: rest.to_vec(),
            content_type,
            tags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let entry = Entry {
            value: b"\x00\x01hello".to_vec(),
            content_type: "application/json".into(),
            tags: vec!["a".into(), "user:7".into()],
        };
        assert_eq!(Entry::decode(&entry.encode()).unwrap(), entry);
        let empty = Entry {
            value: Vec::new(),
            content_type: String::new(),
            tags: Vec::new(),
        };
        assert_eq!(Entry::decode(&empty.encode()).unwrap(), empty);
        assert!(Entry::decode(b"").is_err());
        assert!(Entry::decode(b"\x09abc").is_err());
        assert!(Entry::decode(b"\x01\x00\x09ab").is_err());
    }
}
