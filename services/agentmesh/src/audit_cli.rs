//! `agentmesh audit`: fetch a signed checkpoint, and verify the chain and
//! checkpoints the way a third party would (signature checked here, not
//! trusted from the server).

use std::path::PathBuf;
use std::process::ExitCode;

use agentmesh_audit::chain::{Hash, Timestamp};
use agentmesh_audit::model::Checkpoint;
use agentmesh_audit::signing;
use agentmesh_proto::audit as pb;
use agentmesh_proto::audit::audit_service_client::AuditServiceClient;
use clap::{Args, Subcommand};
use tonic::transport::Channel;

/// `agentmesh audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Prints a signed checkpoint as JSON (save it somewhere the database's
    /// operators cannot write, to check later with `verify --checkpoint`).
    Checkpoint {
        /// Connection.
        #[command(flatten)]
        target: Target,
        /// Sequence of a stored checkpoint; 0 = the latest entry.
        #[arg(long, default_value_t = 0)]
        sequence: u64,
    },
    /// Verifies the hash chain over a range and a signed checkpoint: the
    /// signature (checked locally), the key (against --public-key), and
    /// that the stored chain still ends in the signed hash at its sequence.
    Verify(VerifyArgs),
}

/// Where the audit service listens.
#[derive(Debug, Args)]
pub struct Target {
    /// Audit service address: host:port or http://host:port.
    #[arg(long, default_value = "http://127.0.0.1:50054")]
    pub target: String,
}

/// `agentmesh audit verify` flags.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Connection.
    #[command(flatten)]
    pub target: Target,
    /// First sequence of the chain check (0 = 1).
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Last sequence of the chain check (0 = latest).
    #[arg(long, default_value_t = 0)]
    pub to: u64,
    /// A checkpoint saved earlier by `agentmesh audit checkpoint` (JSON);
    /// without it the service's latest checkpoint is fetched.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// The trusted public key (64 hex digits); without it the key the
    /// checkpoint names is reported but not trusted.
    #[arg(long, value_name = "HEX")]
    pub public_key: Option<String>,
}

async fn connect(target: &Target) -> anyhow::Result<AuditServiceClient<Channel>> {
    let address = if target.target.contains("://") {
        target.target.clone()
    } else {
        format!("http://{}", target.target)
    };
    // https:// uses the system's trust store.
    let channel = agentmesh_client::connect(&address, &Default::default()).await?;
    Ok(AuditServiceClient::new(channel))
}

fn to_array<const N: usize>(bytes: &[u8], what: &str) -> anyhow::Result<[u8; N]> {
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{what} must be {N} bytes, got {}", bytes.len()))
}

fn from_wire(checkpoint: &pb::Checkpoint) -> anyhow::Result<Checkpoint> {
    let signed_at = checkpoint.signed_at.unwrap_or_default();
    Ok(Checkpoint {
        sequence: checkpoint.sequence,
        entry_hash: to_array(&checkpoint.entry_hash, "entry_hash")?,
        signed_at: Timestamp {
            seconds: signed_at.seconds,
            nanos: u32::try_from(signed_at.nanos)?,
        },
        signature: to_array(&checkpoint.signature, "signature")?,
        public_key: to_array(&checkpoint.public_key, "public_key")?,
        key_id: checkpoint.key_id.clone(),
    })
}

fn to_json(checkpoint: &Checkpoint) -> serde_json::Value {
    serde_json::json!({
        "sequence": checkpoint.sequence,
        "entry_hash": hex::encode(checkpoint.entry_hash),
        "signed_at": {"seconds": checkpoint.signed_at.seconds, "nanos": checkpoint.signed_at.nanos},
        "signature": hex::encode(checkpoint.signature),
        "public_key": hex::encode(checkpoint.public_key),
        "key_id": checkpoint.key_id,
    })
}

fn from_json(json: &serde_json::Value) -> anyhow::Result<Checkpoint> {
    let text = |key: &str| -> anyhow::Result<Vec<u8>> {
        let value = json[key]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("checkpoint field {key} must be a hex string"))?;
        Ok(hex::decode(value)?)
    };
    let number = |value: &serde_json::Value, key: &str| -> anyhow::Result<i64> {
        value
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("checkpoint field {key} must be an integer"))
    };
    Ok(Checkpoint {
        sequence: u64::try_from(number(&json["sequence"], "sequence")?)?,
        entry_hash: to_array(&text("entry_hash")?, "entry_hash")?,
        signed_at: Timestamp {
            seconds: number(&json["signed_at"]["seconds"], "signed_at.seconds")?,
            nanos: u32::try_from(number(&json["signed_at"]["nanos"], "signed_at.nanos")?)?,
        },
        signature: to_array(&text("signature")?, "signature")?,
        public_key: to_array(&text("public_key")?, "public_key")?,
        key_id: json["key_id"].as_str().unwrap_or_default().to_owned(),
    })
}

/// Runs an `agentmesh audit` subcommand; exit 0 when everything verified.
pub async fn run(command: &AuditCommand) -> ExitCode {
    match execute(command).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("agentmesh audit: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn execute(command: &AuditCommand) -> anyhow::Result<bool> {
    match command {
        AuditCommand::Checkpoint { target, sequence } => {
            let mut client = connect(target).await?;
            let response = client
                .get_checkpoint(pb::GetCheckpointRequest {
                    sequence: *sequence,
                })
                .await?
                .into_inner();
            let checkpoint = from_wire(&response.checkpoint.unwrap_or_default())?;
            println!("{}", to_json(&checkpoint));
            Ok(true)
        }
        AuditCommand::Verify(args) => verify(args).await,
    }
}

async fn verify(args: &VerifyArgs) -> anyhow::Result<bool> {
    let mut client = connect(&args.target).await?;
    let mut all_ok = true;

    let chain = client
        .verify(pb::VerifyRequest {
            from_sequence: args.from,
            to_sequence: args.to,
        })
        .await?
        .into_inner();
    if chain.ok {
        println!(
            "chain        ok: {} entries, sequences {}..{}",
            chain.entries_checked, chain.from_sequence, chain.to_sequence
        );
    } else {
        all_ok = false;
        let problem = pb::Problem::try_from(chain.problem)
            .map(|p| p.as_str_name())
            .unwrap_or("UNKNOWN");
        println!(
            "chain        FAILED at sequence {}: {problem}: {}",
            chain.first_bad_sequence, chain.detail
        );
    }

    let checkpoint = match &args.checkpoint {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))?;
            from_json(&serde_json::from_str(&text)?)?
        }
        None => {
            let response = client
                .get_checkpoint(pb::GetCheckpointRequest { sequence: 0 })
                .await;
            match response {
                Ok(response) => from_wire(&response.into_inner().checkpoint.unwrap_or_default())?,
                Err(status) if status.code() == tonic::Code::NotFound => {
                    println!("checkpoint   none (the log is empty)");
                    return Ok(all_ok);
                }
                Err(status) => return Err(status.into()),
            }
        }
    };
    match signing::verify_checkpoint(&checkpoint) {
        Ok(()) => println!(
            "signature    ok: sequence {} hash {} signed at {}s by key {}",
            checkpoint.sequence,
            hex::encode(checkpoint.entry_hash),
            checkpoint.signed_at.seconds,
            checkpoint.key_id
        ),
        Err(reason) => {
            all_ok = false;
            println!("signature    FAILED: {reason}");
        }
    }
    match &args.public_key {
        Some(trusted) if trusted.eq_ignore_ascii_case(&hex::encode(checkpoint.public_key)) => {
            println!("key          trusted (matches --public-key)");
        }
        Some(_) => {
            all_ok = false;
            println!(
                "key          FAILED: signed by {}, not the trusted --public-key",
                hex::encode(checkpoint.public_key)
            );
        }
        None => println!(
            "key          not checked: pass --public-key {} once you trust it",
            hex::encode(checkpoint.public_key)
        ),
    }
    let history = client
        .verify(pb::VerifyRequest {
            from_sequence: 1,
            to_sequence: checkpoint.sequence,
        })
        .await;
    let stored: Option<Hash> = match history {
        Ok(response) => {
            let response = response.into_inner();
            if response.ok {
                to_array(&response.last_entry_hash, "last_entry_hash").ok()
            } else {
                println!(
                    "history      FAILED: the chain up to {} is broken at {}: {}",
                    checkpoint.sequence, response.first_bad_sequence, response.detail
                );
                all_ok = false;
                None
            }
        }
        Err(status) => {
            all_ok = false;
            println!("history      FAILED: {}", status.message());
            None
        }
    };
    match stored {
        Some(hash) if hash == checkpoint.entry_hash => println!(
            "history      ok: the stored chain up to {} is the signed one",
            checkpoint.sequence
        ),
        Some(hash) => {
            all_ok = false;
            println!(
                "history      FAILED: entry {} now hashes to {}, the checkpoint signed {}: history was rewritten",
                checkpoint.sequence,
                hex::encode(hash),
                hex::encode(checkpoint.entry_hash)
            );
        }
        None => {}
    }
    println!("result       {}", if all_ok { "OK" } else { "FAILED" });
    Ok(all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_json_round_trips_and_verifies() {
        let signer = signing::Signer::from_seed(&[9; 32]);
        let checkpoint = signer.sign(42, [1; 32]);
        let parsed = from_json(&to_json(&checkpoint)).unwrap();
        assert_eq!(parsed, checkpoint);
        assert_eq!(signing::verify_checkpoint(&parsed), Ok(()));
    }
}
