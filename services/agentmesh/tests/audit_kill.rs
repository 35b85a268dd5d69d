//! `agentmesh serve audit` killed with SIGKILL in the middle of concurrent
//! appends loses nothing it acknowledged: after a restart every
//! acknowledged entry is there, at its sequence, and the chain verifies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentmesh_proto::audit as pb;
use agentmesh_proto::audit::audit_service_client::AuditServiceClient;

const BINARY: &str = env!("CARGO_BIN_EXE_agentmesh");

/// Starts `agentmesh serve audit` and returns it with its gRPC address.
fn serve_audit(data_dir: &str) -> anyhow::Result<(Child, String)> {
    let mut command = Command::new(BINARY);
    command.args([
        "serve",
        "audit",
        "--data-dir",
        data_dir,
        "--audit-port",
        "0",
        "--admin-port",
        "0",
        "--log-format",
        "json",
    ]);
    for (name, _) in std::env::vars() {
        if name.starts_with("AGENTMESH_") || name.starts_with("OTEL_") {
            command.env_remove(name);
        }
    }
    command
        .env("AGENTMESH_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = command.spawn()?;
    let stderr = child.stderr.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    loop {
        let line = receiver.recv_timeout(Duration::from_secs(30))?;
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if json["fields"]["message"].as_str() == Some("grpc server listening") {
            let address = json["fields"]["address"].as_str().unwrap().to_owned();
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || while receiver.recv().is_ok() {});
            return Ok((child, format!("http://{address}")));
        }
    }
}

fn event(id: String) -> pb::Event {
    pb::Event {
        event_id: id,
        occurred_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        action: "task.execute".into(),
        outcome: pb::Outcome::Success as i32,
        ..pb::Event::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_appends_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let data_dir = tempfile::tempdir()?;
    let dir = data_dir.path().to_str().unwrap().to_owned();
    let (mut child, address) = serve_audit(&dir)?;

    // event id -> acknowledged sequence
    let acknowledged = Arc::new(Mutex::new(HashMap::new()));
    let mut appenders = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let acknowledged = Arc::clone(&acknowledged);
        let mut client = AuditServiceClient::connect(address.clone()).await?;
        appenders.spawn(async move {
            for i in 0.. {
                let id = format!("w{worker}-{i}");
                let request = if i % 3 == 0 {
                    client
                        .append_batch(pb::AppendBatchRequest {
                            events: vec![event(format!("{id}-a")), event(format!("{id}-b"))],
                        })
                        .await
                        .map(|r| {
                            r.into_inner()
                                .results
                                .into_iter()
                                .map(|r| r.entry.unwrap())
                                .collect::<Vec<_>>()
                        })
                } else {
                    client
                        .append(pb::AppendRequest {
                            event: Some(event(id)),
                        })
                        .await
                        .map(|r| vec![r.into_inner().entry.unwrap()])
                };
                // The process dies under us: stop at the first failure.
                let Ok(entries) = request else { return };
                let mut map = acknowledged.lock().unwrap();
                for entry in entries {
                    map.insert(entry.event.unwrap().event_id, entry.sequence);
                }
            }
        });
    }
    // Let some appends through, then kill without warning.
    while acknowledged.lock().unwrap().len() < 500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill()?; // SIGKILL
    child.wait()?;
    while appenders.join_next().await.is_some() {}
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 500);

    let (mut restarted, address) = serve_audit(&dir)?;
    let mut client = AuditServiceClient::connect(address).await?;
    let report = client
        .verify(pb::VerifyRequest::default())
        .await?
        .into_inner();
    assert!(report.ok, "{report:?}");
    assert!(report.entries_checked >= acknowledged.len() as u64);
    let mut stored = HashMap::new();
    let mut request = pb::QueryRequest {
        page_size: 1000,
        ..Default::default()
    };
    loop {
        let page = client.query(request.clone()).await?.into_inner();
        for entry in page.entries {
            stored.insert(entry.event.unwrap().event_id, entry.sequence);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    for (event_id, sequence) in &acknowledged {
        assert_eq!(
            stored.get(event_id),
            Some(sequence),
            "{event_id} was acknowledged"
        );
    }
    restarted.kill()?;
    restarted.wait()?;
    Ok(())
}
