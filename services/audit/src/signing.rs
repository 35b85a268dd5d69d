//! The Ed25519 checkpoint key: loaded from `audit.signing_key_file`, or
//! generated on first start under the data dir (mode 0600), and the
//! signing and checking of checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand::TryRngCore;

use crate::chain::{self, Hash, Timestamp};
use crate::model::Checkpoint;

/// Why the signing key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the key file failed.
    #[error("signing key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file does not hold 64 hex digits.
    #[error("signing key file {0} must hold the 32-byte Ed25519 seed as 64 hex digits")]
    Format(PathBuf),
    /// The operating system's random source failed.
    #[error("cannot generate a signing key: {0}")]
    Random(String),
}

/// The service's checkpoint signer.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
    public_key: [u8; 32],
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(seed);
        let public_key = key.verifying_key().to_bytes();
        Self {
            key,
            public_key,
            key_id: key_id(&public_key),
        }
    }

    /// Loads the key from `path`, creating it (mode 0600) when absent.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let io_error = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut seed = [0; 32];
                hex::decode_to_slice(text.trim(), &mut seed)
                    .map_err(|_| KeyError::Format(path.to_path_buf()))?;
                Ok(Self::from_seed(&seed))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0; 32];
                rand::rngs::OsRng
                    .try_fill_bytes(&mut seed)
                    .map_err(|error| KeyError::Random(error.to_string()))?;
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io_error)?;
                }
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                match options.open(path) {
                    Ok(mut file) => {
                        file.write_all(format!("{}\n", hex::encode(seed)).as_bytes())
                            .and_then(|()| file.sync_all())
                            .map_err(io_error)?;
                        let signer = Self::from_seed(&seed);
                        tracing::info!(path = %path.display(), key_id = %signer.key_id, "generated the audit signing key");
                        Ok(signer)
                    }
                    // Another process created it first: use theirs.
                    Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_create(path)
                    }
                    Err(error) => Err(io_error(error)),
                }
            }
            Err(error) => Err(io_error(error)),
        }
    }

    /// The raw public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    /// The key id: the first 16 hex digits of SHA-256(public key).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs the chain head `(sequence, entry_hash)` now.
    pub fn sign(&self, sequence: u64, entry_hash: Hash) -> Checkpoint {
        let signed_at = Timestamp::now();
        let message = chain::checkpoint_message(sequence, &entry_hash, signed_at);
        Checkpoint {
            sequence,
            entry_hash,
            signed_at,
            signature: self.key.sign(&message).to_bytes(),
            public_key: self.public_key,
            key_id: self.key_id.clone(),
        }
    }
}

/// The key id of a public key.
pub fn key_id(public_key: &[u8; 32]) -> String {
    hex::encode(&chain::sha256(public_key)[..8])
}

/// Checks a checkpoint's signature against its own public key (the caller
/// decides whether it trusts that key).
pub fn verify_checkpoint(checkpoint: &Checkpoint) -> Result<(), String> {
    let key = VerifyingKey::from_bytes(&checkpoint.public_key)
        .map_err(|error| format!("invalid public key: {error}"))?;
    let message = chain::checkpoint_message(
        checkpoint.sequence,
        &checkpoint.entry_hash,
        checkpoint.signed_at,
    );
    key.verify_strict(&message, &Signature::from_bytes(&checkpoint.signature))
        .map_err(|_| "signature does not verify".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_generated_once_with_private_permissions_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/audit-signing-key");
        let first = Signer::load_or_create(&path).unwrap();
        let second = Signer::load_or_create(&path).unwrap();
        assert_eq!(first.public_key(), second.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let checkpoint = first.sign(7, [3; 32]);
        assert_eq!(verify_checkpoint(&checkpoint), Ok(()));
        let mut forged = checkpoint.clone();
        forged.entry_hash = [4; 32];
        assert!(verify_checkpoint(&forged).is_err());

        std::fs::write(dir.path().join("bad"), "nothex").unwrap();
        assert!(matches!(
            Signer::load_or_create(&dir.path().join("bad")),
            Err(KeyError::Format(_))
        ));
    }
}
