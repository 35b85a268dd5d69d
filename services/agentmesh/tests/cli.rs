//! The `agentmesh` binary as an operator runs it: settings errors, the
//! admin endpoint, signals, and bench.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use agentmesh_proto::config as pb;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const BINARY: &str = env!("CARGO_BIN_EXE_agentmesh");

fn agentmesh(args: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    command.args(args);
    for (name, _) in std::env::vars() {
        // The test run's own settings must not leak into the binary.
        if name.starts_with("AGENTMESH_")
            || name.starts_with("DEFAULT_")
            || name.starts_with("OTEL_")
        {
            command.env_remove(name);
        }
    }
    command
}

#[test]
fn bad_env_value_exits_non_zero_with_one_line_naming_the_key() -> anyhow::Result<()> {
    let data_dir = tempfile::tempdir()?;
    let dir = data_dir.path().to_str().unwrap_or_default();
    let cases = [
        ("AGENTMESH_PORTS__CONFIG", "abc", "ports.config"),
        (
            "AGENTMESH_DEFAULTS__AGENT__TEMPERATURE",
            "5",
            "defaults.agent.temperature = 5: must be between 0 and 2",
        ),
        ("DEFAULT_TEMPERATURE", "-1", "defaults.agent.temperature"),
        ("AGENTMESH_SERVER__HOSTX", "x", "server.hostx"),
        ("AGENTMESH_DATABASE_URL", "mysql://db", "database_url"),
    ];
    for (name, value, expected) in cases {
        let output = agentmesh(&["up", "--data-dir", dir])
            .env(name, value)
            .output()?;
        assert_eq!(output.status.code(), Some(2), "{name}={value}");
        let stderr = String::from_utf8(output.stderr)?;
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
    }
    Ok(())
}

#[test]
fn dump_config_masks_secrets_and_honours_design_note_names() -> anyhow::Result<()> {
    let output = agentmesh(&["up", "--dump-config"])
        .env(
            "AGENTMESH_DATABASE_URL",
            "postgres://app:hunter2@db:5432/agentmesh",
        )
        .env("DEFAULT_LLM_MODEL", "llama3.1")
        .env("DEFAULT_TEMPERATURE", "0.3")
        .output()?;
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout)?;
    assert!(
        stdout.contains("postgres://app:****@db:5432/agentmesh"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"));
    assert!(stdout.contains("default_model = \"llama3.1\""), "{stdout}");
    assert!(stdout.contains("temperature = 0.3"), "{stdout}");
    Ok(())
}

/// A running `agentmesh up` with its addresses read from its JSON logs.
struct Running {
    child: Child,
    grpc: String,
    cache: String,
    gateway: String,
    admin: String,
    logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Running {
    /// Log lines (JSON) seen so far.
    fn log_lines(&self) -> Vec<serde_json::Value> {
        let lines = self
            .logs
            .lock()
            .map(|lines| lines.clone())
            .unwrap_or_default();
        lines
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

fn start_up(data_dir: &str, extra_env: &[(&str, &str)]) -> anyhow::Result<Running> {
    let mut command = agentmesh(&[
        "up",
        "--data-dir",
        data_dir,
        "--config-port",
        "0",
        "--cache-port",
        "0",
        "--audit-port",
        "0",
        "--agent-port",
        "0",
        "--gateway-port",
        "0",
        "--admin-port",
        "0",
        "--log-format",
        "json",
    ]);
    command
        .env("AGENTMESH_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    for (name, value) in extra_env {
        command.env(name, value);
    }
    let mut child = command.spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let (mut grpc, mut cache, mut gateway, mut admin) = (None, None, None, None);
    let mut early = Vec::new();
    while grpc.is_none() || cache.is_none() || gateway.is_none() || admin.is_none() {
        let line = receiver.recv_timeout(Duration::from_secs(30))?;
        let json: serde_json::Value = serde_json::from_str(&line)?;
        let message = json["fields"]["message"].as_str().unwrap_or_default();
        let address = json["fields"]["address"].as_str().map(str::to_owned);
        let services = json["fields"]["services"].as_str().unwrap_or_default();
        early.push(line.clone());
        if message.starts_with("grpc server listening") && services.contains("CacheService") {
            cache = address;
        } else if message.starts_with("grpc server listening")
            && services.contains("GatewayService")
        {
            gateway = address;
        } else if message.starts_with("grpc server listening") && services.contains("ConfigService")
        {
            grpc = address;
        } else if message.starts_with("admin endpoint listening") {
            admin = address;
        }
    }
    // Keep draining logs so the child never blocks on a full pipe.
    let logs = std::sync::Arc::new(std::sync::Mutex::new(early));
    let sink = std::sync::Arc::clone(&logs);
    std::thread::spawn(move || {
        while let Ok(line) = receiver.recv() {
            if let Ok(mut lines) = sink.lock() {
                lines.push(line);
            }
        }
    });
    Ok(Running {
        child,
        grpc: format!("http://{}", grpc.unwrap_or_default()),
        cache: format!("http://{}", cache.unwrap_or_default()),
        gateway: format!("http://{}", gateway.unwrap_or_default()),
        admin: admin.unwrap_or_default(),
        logs,
    })
}

fn http_get(address: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn wait_for_exit(child: &mut Child, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_calls_finish_then_exits_zero() -> anyhow::Result<()> {
    let data_dir = tempfile::tempdir()?;
    let dir = data_dir.path().to_str().unwrap_or_default().to_owned();
    let mut running = start_up(&dir, &[("AGENTMESH_SERVER__SHUTDOWN_DELAY_MS", "1500")])?;
    let channel = tonic::transport::Channel::from_shared(running.grpc.clone())?
        .connect()
        .await?;
    let mut client = pb::config_service_client::ConfigServiceClient::new(channel.clone());
    let update = |temperature: f64| pb::UpdateRequest {
        scope: "global".into(),
        settings: Some(pb::Settings {
            agent: Some(pb::AgentSettings {
                temperature: Some(temperature),
                ..Default::default()
            }),
            ..Default::default()
        }),
        author: "cli-test".into(),
        ..Default::default()
    };
    client.update(update(0.5)).await?;

    let admin = running.admin.clone();
    let metrics = tokio::task::spawn_blocking(move || http_get(&admin, "/metrics")).await??;
    assert!(metrics.contains("grpc_server_handled_total{"), "{metrics}");
    assert!(metrics.contains("grpc_method=\"Update\""), "{metrics}");
    // The config service answers before every other service of `up` is
    // ready: wait (bounded) for /readyz to say so.
    let mut ready = String::new();
    for _ in 0..100 {
        let admin = running.admin.clone();
        ready = tokio::task::spawn_blocking(move || http_get(&admin, "/readyz")).await??;
        if ready.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    // Hold SQLite's write lock so the next Update stays in flight.
    let database = sea_orm::Database::connect(format!("sqlite://{dir}/agentmesh.db")).await?;
    database
        .execute_raw(Statement::from_string(DbBackend::Sqlite, "BEGIN IMMEDIATE"))
        .await?;
    let in_flight = tokio::spawn({
        let mut client = client.clone();
        async move { client.update(update(0.6)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    if in_flight.is_finished() {
        anyhow::bail!(
            "the update should be waiting for the lock: {:?}",
            in_flight.await?
        );
    }

    let pid = running.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()?
            .success()
    );
    // `up` stops the gateway first (drained, audit buffer flushed), then
    // the services behind it: wait (bounded) for this one to go NOT_SERVING.
    let probe = tonic::transport::Channel::from_shared(running.grpc.clone())?
        .connect()
        .await?;
    let mut status = ServingStatus::Serving as i32;
    for _ in 0..150 {
        status = HealthClient::new(probe.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner()
            .status;
        if status == ServingStatus::NotServing as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, ServingStatus::NotServing as i32);
    assert!(!in_flight.is_finished(), "the update waits for the lock");

    database
        .execute_raw(Statement::from_string(DbBackend::Sqlite, "ROLLBACK"))
        .await?;
    let finished = tokio::time::timeout(Duration::from_secs(15), in_flight).await???;
    assert_eq!(
        finished
            .into_inner()
            .revision
            .map(|revision| revision.changed_fields),
        Some(vec!["agent.temperature".to_owned()])
    );
    let status = tokio::task::spawn_blocking(move || {
        wait_for_exit(&mut running.child, Duration::from_secs(20))
    })
    .await??;
    assert_eq!(status.code(), Some(0));
    Ok(())
}

#[test]
fn bench_drives_the_l1_only_cache_of_up() -> anyhow::Result<()> {
    let data_dir = tempfile::tempdir()?;
    let mut running = start_up(data_dir.path().to_str().unwrap_or_default(), &[])?;
    for (rpc, hit) in [
        ("cache.set", "l1"),
        ("cache.get", "l1"),
        ("cache.get", "miss"),
    ] {
        let output = agentmesh(&[
            "bench",
            "--target",
            &running.cache,
            "--rpc",
            rpc,
            "--hit",
            hit,
            "-c",
            "4",
            "-n",
            "200",
            "--json",
        ])
        .output()?;
        assert!(
            output.status.success(),
            "{rpc} {hit}: {}\nsuite exited: {:?}\nlast suite logs: {:#?}",
            String::from_utf8_lossy(&output.stderr),
            running.child.try_wait(),
            running
                .log_lines()
                .iter()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
        );
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        assert_eq!(report["rpc"], rpc);
        assert_eq!(report["requests"], 200);
        assert_eq!(report["errors"], serde_json::json!({}));
    }
    // Without Redis no read can come from L2: each one is a wrong level.
    let output = agentmesh(&[
        "bench",
        "--target",
        &running.cache,
        "--rpc",
        "cache.get",
        "--hit",
        "l2",
        "-c",
        "2",
        "-n",
        "10",
        "--json",
    ])
    .output()?;
    assert!(!output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(report["errors"]["WRONG_HIT_LEVEL"], 10);
    let _ = running.child.kill();
    let _ = running.child.wait();
    Ok(())
}

#[test]
fn bench_reports_json_for_health_and_get_effective() -> anyhow::Result<()> {
    let data_dir = tempfile::tempdir()?;
    let mut running = start_up(data_dir.path().to_str().unwrap_or_default(), &[])?;
    for rpc in ["health", "config.get-effective"] {
        let output = agentmesh(&[
            "bench",
            "--target",
            &running.grpc,
            "--rpc",
            rpc,
            "-c",
            "4",
            "-n",
            "200",
            "--json",
        ])
        .output()?;
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        assert_eq!(report["rpc"], rpc);
        assert_eq!(report["requests"], 200);
        assert_eq!(report["concurrency"], 4);
        assert!(report["rps"].as_f64().unwrap_or_default() > 0.0);
        let latency = &report["latency_us"];
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(
                latency[key].as_u64().unwrap_or_default() > 0,
                "{key}: {report}"
            );
        }
        assert!(latency["p50"].as_u64() <= latency["max"].as_u64());
        assert_eq!(report["errors"], serde_json::json!({}));
    }
    // Errors are counted by code, and make the exit status non-zero.
    let output = agentmesh(&[
        "bench",
        "--target",
        &running.grpc,
        "--rpc",
        "config.get-effective",
        "--agent-type",
        "bad type!",
        "-c",
        "2",
        "-n",
        "10",
        "--json",
    ])
    .output()?;
    assert!(!output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(report["errors"]["INVALID_ARGUMENT"], 10);
    let _ = running.child.kill();
    let _ = running.child.wait();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_traceparent_and_request_id_name_every_log_line_of_the_call() -> anyhow::Result<()>
{
    let data_dir = tempfile::tempdir()?;
    let mut running = start_up(data_dir.path().to_str().unwrap_or_default(), &[])?;
    let channel = tonic::transport::Channel::from_shared(running.grpc.clone())?
        .connect()
        .await?;
    let mut client = pb::config_service_client::ConfigServiceClient::new(channel);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(pb::UpdateRequest {
        scope: "agent/coder".into(),
        settings: Some(pb::Settings {
            agent: Some(pb::AgentSettings {
                max_tokens: Some(77),
                ..Default::default()
            }),
            ..Default::default()
        }),
        author: "trace-test".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").parse()?,
    );
    request
        .metadata_mut()
        .insert("x-request-id", "trace-req-1".parse()?);
    client.update(request).await?;

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        let found = running.log_lines().into_iter().find(|line| {
            line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("config revision written"))
        });
        if let Some(line) = found {
            break line;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no log line for the update"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line["span"]["trace_id"], trace_id, "{line}");
    assert_eq!(line["span"]["request_id"], "trace-req-1", "{line}");
    assert_eq!(line["span"]["rpc.method"], "Update", "{line}");
    let _ = running.child.kill();
    let _ = running.child.wait();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_schema_and_exits() -> anyhow::Result<()> {
    let data_dir = tempfile::tempdir()?;
    let dir = data_dir.path().to_str().unwrap_or_default();
    let output = agentmesh(&["migrate", "--data-dir", dir]).output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let database = sea_orm::Database::connect(format!("sqlite://{dir}/agentmesh.db")).await?;
    let row = database
        .query_one_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT count(*) AS n FROM config_revisions",
        ))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no row"))?;
    assert_eq!(
        row.try_get::<i64>("", "n")?,
        0,
        "migrate creates tables but seeds nothing"
    );
    // Running it again is a no-op.
    assert!(
        agentmesh(&["migrate", "--data-dir", dir])
            .output()?
            .status
            .success()
    );
    Ok(())
}

/// Runs the binary and returns its stdout, failing with its stderr.
fn run_ok(args: &[&str]) -> anyhow::Result<String> {
    let output = agentmesh(args).output()?;
    anyhow::ensure!(
        output.status.success(),
        "agentmesh {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

#[test]
fn keys_cli_creates_lists_and_revokes_keys_of_a_running_suite() -> anyhow::Result<()> {
    let data_dir = tempfile::tempdir()?;
    let bootstrap = "cli-test-bootstrap-admin-key-0123456789abcdef";
    let mut running = start_up(
        data_dir.path().to_str().unwrap_or_default(),
        &[
            ("AGENTMESH_GATEWAY__AUTH__MODE", "on"),
            ("AGENTMESH_GATEWAY__AUTH__BOOTSTRAP_ADMIN_KEY", bootstrap),
        ],
    )?;
    let gateway = running.gateway.clone();
    let created = run_ok(&[
        "keys",
        "create",
        "--gateway",
        &gateway,
        "--api-key",
        bootstrap,
        "--name",
        "ci",
        "--role",
        "user",
        "--project",
        "p1",
        "--project",
        "p2",
        "--json",
    ])?;
    let created: serde_json::Value = serde_json::from_str(&created)?;
    let key_id = created["key_id"].as_str().unwrap_or_default().to_owned();
    let secret = created["secret"].as_str().unwrap_or_default().to_owned();
    assert!(secret.starts_with(&format!("amk_{key_id}_")), "{created}");
    assert_eq!(created["projects"], serde_json::json!(["p1", "p2"]));
    assert_eq!(created["role"], "user");

    // The text listing shows the key, never a secret.
    let listed = run_ok(&[
        "keys",
        "list",
        "--gateway",
        &gateway,
        "--api-key",
        bootstrap,
    ])?;
    assert!(
        listed.lines().any(|line| line.starts_with(&key_id)
            && line.contains("p1,p2")
            && line.ends_with("ci")),
        "{listed}"
    );
    assert!(!listed.contains(&secret[21..]), "{listed}");

    // The new key runs tasks through bench, and reads its project's usage.
    let bench = run_ok(&[
        "bench",
        "--target",
        &gateway,
        "--rpc",
        "gateway.execute",
        "--project-id",
        "p1",
        "--api-key",
        &secret,
        "-c",
        "2",
        "-n",
        "10",
        "--json",
    ])?;
    let report: serde_json::Value = serde_json::from_str(&bench)?;
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    let usage = run_ok(&["usage", "p1", "--gateway", &gateway, "--api-key", &secret])?;
    assert!(usage.starts_with("project  p1\nday"), "{usage}");
    assert!(usage.contains("of unlimited"), "{usage}");

    // A user key may not manage keys; a call without a key is refused.
    let output =
        agentmesh(&["keys", "list", "--gateway", &gateway, "--api-key", &secret]).output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr)?;
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
    let output = agentmesh(&["keys", "list", "--gateway", &gateway]).output()?;
    assert!(String::from_utf8(output.stderr)?.contains("UNAUTHENTICATED: missing API key"));

    let revoked = run_ok(&[
        "keys",
        "revoke",
        &key_id,
        "--gateway",
        &gateway,
        "--api-key",
        bootstrap,
    ])?;
    assert!(
        revoked.starts_with(&format!("revoked {key_id} (ci) at ")),
        "{revoked}"
    );
    let all = run_ok(&[
        "keys",
        "list",
        "--all",
        "--json",
        "--gateway",
        &gateway,
        "--api-key",
        bootstrap,
    ])?;
    let all: serde_json::Value = serde_json::from_str(&all)?;
    assert!(all[0]["revoked_at"].is_string(), "{all}");
    let active = run_ok(&[
        "keys",
        "list",
        "--json",
        "--gateway",
        &gateway,
        "--api-key",
        bootstrap,
    ])?;
    assert_eq!(active.trim(), "[]");

    // Bench with the revoked key: every call UNAUTHENTICATED.
    let output = agentmesh(&[
        "bench",
        "--target",
        &gateway,
        "--rpc",
        "gateway.execute",
        "--project-id",
        "p1",
        "--api-key",
        &secret,
        "-c",
        "1",
        "-n",
        "5",
        "--json",
    ])
    .output()?;
    assert!(!output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(report["errors"]["UNAUTHENTICATED"], 5, "{report}");
    let _ = running.child.kill();
    let _ = running.child.wait();
    Ok(())
}

#[test]
fn up_on_loopback_defaults_runs_the_gateway_without_keys_and_warns() -> anyhow::Result<()> {
    let data_dir = tempfile::tempdir()?;
    let mut running = start_up(data_dir.path().to_str().unwrap_or_default(), &[])?;
    let warned = running.log_lines().into_iter().any(|line| {
        line["level"] == "WARN"
            && line["fields"]["message"].as_str().is_some_and(|message| {
                message.starts_with("AUTHENTICATION IS OFF")
                    && message.contains("AGENTMESH_GATEWAY__AUTH__MODE=on")
            })
    });
    assert!(warned, "{:?}", running.log_lines());
    let output = run_ok(&[
        "bench",
        "--target",
        &running.gateway,
        "--rpc",
        "gateway.execute",
        "-c",
        "2",
        "-n",
        "10",
        "--json",
    ])?;
    let report: serde_json::Value = serde_json::from_str(&output)?;
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    let _ = running.child.kill();
    let _ = running.child.wait();

    // Off is refused on an address other machines reach.
    let output = agentmesh(&[
        "up",
        "--data-dir",
        data_dir.path().to_str().unwrap_or_default(),
        "--host",
        "0.0.0.0",
    ])
    .env("AGENTMESH_GATEWAY__AUTH__MODE", "off")
    .output()?;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr)?;
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("gateway.auth.mode = \"off\": must not be off while server.host (0.0.0.0)"),
        "{stderr}"
    );
    Ok(())
}
