//! The shape of API keys and their keyed hash.
//!
//! A key is `amk_<key_id>_<secret>`: `key_id` is 16 lowercase hex digits
//! (8 random bytes; public, shown in lists and logs, the config scope
//! `key/<key_id>`), `secret` is 32 random bytes in unpadded base64url (43
//! characters). Keys are random and long, so a fast keyed hash is enough
//! to store them (a slow password hash would put milliseconds on every
//! call): the gateway stores HMAC-SHA256 of the whole key under its hash
//! secret, and compares digests in constant time.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Prefix of every key.
pub const KEY_PREFIX: &str = "amk_";
/// Length of a key id in hex digits.
pub const KEY_ID_LEN: usize = 16;
/// Random bytes in a key's secret.
const SECRET_BYTES: usize = 32;
/// Length of the encoded secret (unpadded base64url of 32 bytes).
const SECRET_LEN: usize = 43;

/// A SHA-256-sized digest of a key.
pub type Digest = [u8; 32];

/// Why a presented key is not a key at all.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// A newly generated key.
pub struct NewKey {
    /// The public id.
    pub key_id: String,
    /// The whole key, `amk_<key_id>_<secret>`: shown once.
    pub secret: String,
}

/// Generates a key from the thread's CSPRNG (ChaCha, seeded from the
/// operating system).
pub fn generate() -> NewKey {
    let mut rng = rand::rng();
    let mut id = [0_u8; KEY_ID_LEN / 2];
    rng.fill_bytes(&mut id);
    let mut secret = [0_u8; SECRET_BYTES];
    rng.fill_bytes(&mut secret);
    let key_id = hex::encode(id);
    let secret = format!("{KEY_PREFIX}{key_id}_{}", URL_SAFE_NO_PAD.encode(secret));
    NewKey { key_id, secret }
}

/// The key id of a presented key, if it has the shape of one.
pub fn key_id_of(key: &str) -> Result<&str, Malformed> {
    let rest = key.strip_prefix(KEY_PREFIX).ok_or(Malformed)?;
    let (key_id, secret) = rest.split_at_checked(KEY_ID_LEN).ok_or(Malformed)?;
    let secret = secret.strip_prefix('_').ok_or(Malformed)?;
    let id_ok = key_id
        .bytes()
        .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
    let secret_ok = secret.len() == SECRET_LEN
        && secret
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
    if id_ok && secret_ok {
        Ok(key_id)
    } else {
        Err(Malformed)
    }
}

/// Returns true for a key id (16 lowercase hex digits).
pub fn is_key_id(text: &str) -> bool {
    text.len() == KEY_ID_LEN
        && text
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

/// HMAC-SHA256 under the gateway's hash secret.
#[derive(Clone)]
pub struct KeyHasher {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHasher(..)")
    }
}

/// Why the hash secret could not be read or created.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Reading or writing the file failed.
    #[error("gateway hash secret file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The MAC refused the secret.
    #[error("the gateway hash secret is not a valid HMAC key")]
    Invalid,
    /// The file holds too short a secret.
    #[error(
        "gateway hash secret file {0} must hold at least 32 bytes (gateway.auth.hash_secret sets it instead)"
    )]
    TooShort(String),
}

impl KeyHasher {
    /// A hasher under `secret`.
    pub fn new(secret: &[u8]) -> Result<Self, SecretError> {
        // HMAC accepts keys of any length: this never fails in practice.
        let mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| SecretError::Invalid)?;
        Ok(Self { mac })
    }

    /// The hasher of `gateway.auth.hash_secret`, or of the secret in
    /// `file` (created with 32 random bytes, mode 0600, when absent).
    pub fn load(configured: Option<&str>, file: &Path) -> Result<Self, SecretError> {
        if let Some(secret) = configured {
            return Self::new(secret.as_bytes());
        }
        let io_error = |source| SecretError::Io {
            path: file.display().to_string(),
            source,
        };
        match std::fs::read_to_string(file) {
            Ok(text) => {
                let secret = text.trim();
                if secret.len() < 32 {
                    return Err(SecretError::TooShort(file.display().to_string()));
                }
                Self::new(secret.as_bytes())
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent).map_err(io_error)?;
                }
                let mut bytes = [0_u8; 32];
                rand::rng().fill_bytes(&mut bytes);
                let secret = hex::encode(bytes);
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                match options.open(file) {
                    Ok(mut handle) => {
                        handle
                            .write_all(format!("{secret}\n").as_bytes())
                            .and_then(|()| handle.sync_all())
                            .map_err(io_error)?;
                        tracing::info!(path = %file.display(), "generated the gateway's API key hash secret");
                        Self::new(secret.as_bytes())
                    }
                    // Another process created it first: use theirs.
                    Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load(None, file)
                    }
                    Err(error) => Err(io_error(error)),
                }
            }
            Err(error) => Err(io_error(error)),
        }
    }

    /// The digest of a whole presented key.
    pub fn digest(&self, key: &str) -> Digest {
        let mut mac = self.mac.clone();
        mac.update(key.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// Compares two digests in constant time.
pub fn digests_match(a: &Digest, b: &Digest) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_differ() {
        let first = generate();
        let second = generate();
        assert_ne!(first.secret, second.secret);
        assert_eq!(key_id_of(&first.secret), Ok(first.key_id.as_str()));
        assert!(is_key_id(&first.key_id));
        assert_eq!(first.secret.len(), 4 + 16 + 1 + 43);
    }

    #[test]
    fn malformed_keys_are_refused() {
        let good = generate().secret;
        for bad in [
            "",
            "amk_",
            "token",
            &good[..good.len() - 1],
            &format!("{good}x"),
            &good.replace("amk_", "xyz_"),
            &format!("amk_{}_{}", "G".repeat(16), "a".repeat(43)),
            &format!("amk_{}-{}", "a".repeat(16), "a".repeat(43)),
            &format!("amk_{}_{}", "a".repeat(16), "a!".repeat(21) + "a"),
        ] {
            assert_eq!(key_id_of(bad), Err(Malformed), "{bad:?}");
        }
    }

    #[test]
    fn digests_depend_on_the_secret_and_the_key() {
        let one = KeyHasher::new(b"0123456789abcdef0123456789abcdef").unwrap();
        let other = KeyHasher::new(b"fedcba9876543210fedcba9876543210").unwrap();
        let key = generate().secret;
        assert!(digests_match(&one.digest(&key), &one.digest(&key)));
        assert!(!digests_match(&one.digest(&key), &other.digest(&key)));
        assert!(!digests_match(
            &one.digest(&key),
            &one.digest(&generate().secret)
        ));
    }

    #[test]
    fn the_secret_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub").join("secret");
        let key = generate().secret;
        let first = KeyHasher::load(None, &file).unwrap();
        let again = KeyHasher::load(None, &file).unwrap();
        assert!(digests_match(&first.digest(&key), &again.digest(&key)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&file, "short").unwrap();
        assert!(matches!(
            KeyHasher::load(None, &file),
            Err(SecretError::TooShort(_))
        ));
        let configured = KeyHasher::load(Some("c".repeat(32).as_str()), &file).unwrap();
        assert!(!digests_match(
            &configured.digest(&key),
            &first.digest(&key)
        ));
    }
}
