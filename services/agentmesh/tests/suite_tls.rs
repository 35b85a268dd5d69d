//! `agentmesh up` with mTLS on every listener: a client with a certificate
//! gets a task served by an agent node (not the fallback), a repeat from the
//! response cache, its audit event delivered, and `agentmesh health` passes,
//! so the services also reach each other over mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use agentmesh_proto::gateway as gw;
use agentmesh_tests::tls::TestCa;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const BINARY: &str = env!("CARGO_BIN_EXE_agentmesh");

struct Suite(Child);

impl Drop for Suite {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn metrics(admin: &str) -> anyhow::Result<String> {
    let mut stream = std::net::TcpStream::connect(admin)?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )?;
    let mut page = String::new();
    stream.read_to_string(&mut page)?;
    Ok(page)
}

fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_mtls_serves_tasks_and_its_services_reach_each_other() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("suite ca")?;
    let (server_cert, server_key) = ca.server_cert()?.write(dir.path(), "server")?;
    let (client_cert, client_key) = ca
        .client_cert("suite client")?
        .write(dir.path(), "client")?;
    let ca_file = ca.write(dir.path(), "ca.crt")?;
    let path = |path: &Path| path.to_string_lossy().into_owned();
    let env = [
        ("AGENTMESH_SERVER__TLS__CERT_FILE", path(&server_cert)),
        ("AGENTMESH_SERVER__TLS__KEY_FILE", path(&server_key)),
        ("AGENTMESH_SERVER__TLS__CLIENT_CA_FILE", path(&ca_file)),
        ("AGENTMESH_ENDPOINTS__TLS__CA_FILE", path(&ca_file)),
        ("AGENTMESH_ENDPOINTS__TLS__CERT_FILE", path(&client_cert)),
        ("AGENTMESH_ENDPOINTS__TLS__KEY_FILE", path(&client_key)),
    ];
    let data_dir = dir.path().join("data");
    let mut command = Command::new(BINARY);
    command
        .env_clear()
        .args(["up", "--data-dir"])
        .arg(&data_dir)
        .args(["--log-format", "json", "--admin-port", "0"])
        .args([
            "--gateway-port",
            "0",
            "--agent-port",
            "0",
            "--config-port",
            "0",
        ])
        .args(["--audit-port", "0", "--cache-port", "0"])
        .env("AGENTMESH_LOG", "info")
        .envs(env.iter().map(|(name, value)| (name, value)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn()?;
    let stderr = child.stderr.take().unwrap();
    let suite = Suite(child);
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let (mut gateway, mut admin, mut listening) = (None, None, 0);
    while listening < 5 || gateway.is_none() || admin.is_none() {
        let line = receiver.recv_timeout(Duration::from_secs(60))?;
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let fields = &json["fields"];
        let message = fields["message"].as_str().unwrap_or_default();
        let address = fields["address"].as_str().unwrap_or_default().to_owned();
        if message.starts_with("grpc server listening") {
            assert_eq!(fields["mtls"], true, "{line}");
            listening += 1;
            if fields["services"]
                .as_str()
                .is_some_and(|services| services.contains("GatewayService"))
            {
                gateway = Some(address);
            }
        } else if message.starts_with("admin endpoint listening") {
            admin = Some(address);
        }
    }
    let port = gateway.unwrap().rsplit(':').next().unwrap().to_owned();
    let admin = admin.unwrap();

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&ca_file)?))
        .identity(Identity::from_pem(
            std::fs::read(&client_cert)?,
            std::fs::read(&client_key)?,
        ));
    let channel = Endpoint::from_shared(format!("https://localhost:{port}"))?
        .tls_config(tls)?
        .connect()
        .await?;
    let mut client = gw::gateway_service_client::GatewayServiceClient::new(channel);
    let task = gw::ExecuteTaskRequest {
        task: Some(gw::TaskSpec {
            agent_type: "coder".to_owned(),
            variables: [("task".to_owned(), "add two numbers".to_owned())].into(),
            project_id: "tls".to_owned(),
            cache_policy: gw::CachePolicy::Use as i32,
            ..Default::default()
        }),
    };
    // Served by the agent node over mTLS, not by the fallback.
    let first = client.execute_task(task.clone()).await?.into_inner();
    assert!(!first.degraded, "{first:?}");
    assert!(!first.node_id.is_empty(), "{first:?}");
    // Stored in and read back from the cache service over mTLS.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let again = client.execute_task(task.clone()).await?.into_inner();
        if again.cache_hit {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never a cache hit: {again:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Audit events delivered to the audit service over mTLS.
    loop {
        let page = metrics(&admin)?;
        if counter(&page, "agentmesh_gateway_audit_delivered_total") >= 2.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline + Duration::from_secs(10),
            "audit events not delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The container health check works with the same settings.
    let health = Command::new(BINARY)
        .env_clear()
        .args(["health", "--addr", &format!("https://localhost:{port}")])
        .envs(env.iter().map(|(name, value)| (name, value)))
        .output()?;
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    drop(suite);
    Ok(())
}
