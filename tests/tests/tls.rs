//! TLS and mTLS on the shared runtime's listeners, checked on the config
//! service with throwaway certificates: a TLS call, mTLS accepted and
//! refused, a rotated certificate picked up without a restart, and the
//! inter-service client (`ConfigWatcher`) over `https://`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use agentmesh_client::ConfigWatcher;
use agentmesh_settings::{ClientTlsSettings, LiveSettings, Settings};
use agentmesh_tests::tls::TestCa;
use agentmesh_tests::{Backend, ConfigNode, TestDatabase};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// One health check on a fresh channel (so each call makes a new TLS
/// handshake), within 5 s.
async fn health(endpoint: &str, tls: &ClientTlsSettings) -> Result<i32, String> {
    let channel =
        agentmesh_client::connect_lazy(endpoint, tls).map_err(|error| error.to_string())?;
    let mut client = HealthClient::new(channel);
    let call = client.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(response)) => Ok(response.into_inner().status),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err("no answer within 5 s".to_owned()),
    }
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sqlite() -> anyhow::Result<TestDatabase> {
    TestDatabase::new(Backend::Sqlite)
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))
}

/// Settings serving TLS with a certificate of `ca` written under `dir`.
fn tls_settings(base: &Settings, ca: &TestCa, dir: &Path) -> anyhow::Result<Settings> {
    let (cert, key) = ca.server_cert()?.write(dir, "server")?;
    let mut settings = base.clone();
    settings.server.tls.cert_file = Some(cert);
    settings.server.tls.key_file = Some(key);
    settings.server.tls.reload_interval_ms = Some(100);
    Ok(settings)
}

fn trusting(ca: &TestCa, dir: &Path, file: &str) -> anyhow::Result<ClientTlsSettings> {
    Ok(ClientTlsSettings {
        ca_file: Some(ca.write(dir, file)?),
        ..ClientTlsSettings::default()
    })
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_ca_and_the_watcher_uses_https() -> anyhow::Result<()> {
    let db = sqlite().await?;
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("agentmesh test ca")?;
    let node = ConfigNode::start(&tls_settings(&db.settings, &ca, dir.path())?).await?;
    let port = node.address.port();
    let https = format!("https://localhost:{port}");
    let trusted = trusting(&ca, dir.path(), "ca.crt")?;

    assert_eq!(
        health(&https, &trusted).await,
        Ok(ServingStatus::Serving as i32)
    );
    // An IP endpoint with the name the certificate carries.
    let by_ip = ClientTlsSettings {
        server_name: Some("localhost".to_owned()),
        ..trusted.clone()
    };
    assert_eq!(
        health(&format!("https://127.0.0.1:{port}"), &by_ip).await,
        Ok(ServingStatus::Serving as i32)
    );
    // A client trusting another CA, and a plaintext client, get nothing.
    let stranger = trusting(&TestCa::new("another ca")?, dir.path(), "other.crt")?;
    let refused = health(&https, &stranger).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|error| error.starts_with("Unavailable")),
        "{refused:?}"
    );
    let plaintext = health(&format!("http://127.0.0.1:{port}"), &trusted).await;
    assert!(plaintext.is_err(), "{plaintext:?}");

    // Every service's config client works over https.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let watcher = ConfigWatcher::start(&https, &trusted, &LiveSettings::default(), &shutdown)?;
    eventually("the watcher is connected over TLS", async || {
        watcher.snapshot().connected
    })
    .await;
    shutdown.cancel();
    node.stop().await
}

#[tokio::test]
async fn mtls_accepts_certificates_from_the_client_ca_only() -> anyhow::Result<()> {
    let db = sqlite().await?;
    let dir = tempfile::tempdir()?;
    let server_ca = TestCa::new("server ca")?;
    let client_ca = TestCa::new("client ca")?;
    let mut settings = tls_settings(&db.settings, &server_ca, dir.path())?;
    settings.server.tls.client_ca_file = Some(client_ca.write(dir.path(), "client-ca.crt")?);
    let node = ConfigNode::start(&settings).await?;
    let https = format!("https://localhost:{}", node.address.port());
    let trusted = trusting(&server_ca, dir.path(), "server-ca.crt")?;

    let (cert, key) = client_ca
        .client_cert("gateway")?
        .write(dir.path(), "gateway")?;
    let with_cert = ClientTlsSettings {
        cert_file: Some(cert),
        key_file: Some(key),
        ..trusted.clone()
    };
    assert_eq!(
        health(&https, &with_cert).await,
        Ok(ServingStatus::Serving as i32)
    );

    // No client certificate: refused.
    let without = health(&https, &trusted).await;
    assert!(without.is_err(), "{without:?}");
    // A certificate the client CA did not sign: refused.
    let (cert, key) = server_ca
        .client_cert("intruder")?
        .write(dir.path(), "intruder")?;
    let foreign = ClientTlsSettings {
        cert_file: Some(cert),
        key_file: Some(key),
        ..trusted.clone()
    };
    let foreign = health(&https, &foreign).await;
    assert!(foreign.is_err(), "{foreign:?}");

    // The config client presents its certificate.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let watcher = ConfigWatcher::start(&https, &with_cert, &LiveSettings::default(), &shutdown)?;
    eventually("the watcher is connected over mTLS", async || {
        watcher.snapshot().connected
    })
    .await;
    shutdown.cancel();
    node.stop().await
}

#[tokio::test]
async fn a_rotated_certificate_is_used_without_a_restart() -> anyhow::Result<()> {
    let db = sqlite().await?;
    let dir = tempfile::tempdir()?;
    let old_ca = TestCa::new("old ca")?;
    let new_ca = TestCa::new("new ca")?;
    let node = ConfigNode::start(&tls_settings(&db.settings, &old_ca, dir.path())?).await?;
    let https = format!("https://localhost:{}", node.address.port());
    let trusts_old = trusting(&old_ca, dir.path(), "old-ca.crt")?;
    let trusts_new = trusting(&new_ca, dir.path(), "new-ca.crt")?;
    assert_eq!(
        health(&https, &trusts_old).await,
        Ok(ServingStatus::Serving as i32)
    );
    assert!(health(&https, &trusts_new).await.is_err());

    // A half-written rotation (garbage key) keeps the old certificate.
    std::fs::write(dir.path().join("server.key"), "not a key")?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        health(&https, &trusts_old).await,
        Ok(ServingStatus::Serving as i32)
    );

    // cert-manager writes the new pair: new connections get it.
    new_ca.server_cert()?.write(dir.path(), "server")?;
    eventually("the new certificate is served", async || {
        health(&https, &trusts_new).await == Ok(ServingStatus::Serving as i32)
    })
    .await;
    assert!(health(&https, &trusts_old).await.is_err());
    node.stop().await
}

#[tokio::test]
async fn unusable_tls_files_stop_the_start_with_the_setting_named() -> anyhow::Result<()> {
    let db = sqlite().await?;
    let dir = tempfile::tempdir()?;
    let mut settings = tls_settings(&db.settings, &TestCa::new("ca")?, dir.path())?;
    settings.server.tls.key_file = Some(dir.path().join("missing.key"));
    let error = match ConfigNode::start(&settings).await {
        Ok(node) => {
            node.stop().await?;
            panic!("started without its key file");
        }
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("server.tls.key_file"), "{error}");
    assert!(error.contains("missing.key"), "{error}");
    Ok(())
}

#[tokio::test]
async fn a_rotated_client_certificate_reaches_new_connections_of_a_running_channel()
-> anyhow::Result<()> {
    let db = sqlite().await?;
    let dir = tempfile::tempdir()?;
    let server_ca = TestCa::new("server ca")?;
    let old_clients = TestCa::new("old client ca")?;
    let new_clients = TestCa::new("new client ca")?;
    let mut settings = tls_settings(&db.settings, &server_ca, dir.path())?;
    // The server only trusts the new client CA.
    settings.server.tls.client_ca_file = Some(new_clients.write(dir.path(), "client-ca.crt")?);
    let node = ConfigNode::start(&settings).await?;
    let https = format!("https://localhost:{}", node.address.port());
    let (cert, key) = old_clients
        .client_cert("gateway")?
        .write(dir.path(), "gateway")?;
    let tls = ClientTlsSettings {
        cert_file: Some(cert),
        key_file: Some(key),
        ..trusting(&server_ca, dir.path(), "server-ca.crt")?
    };
    // One channel for the whole test, as a service keeps it.
    let channel = agentmesh_client::connect_lazy(&https, &tls)?;
    let check = |channel: agentmesh_client::TracedChannel| async move {
        let mut client = HealthClient::new(channel);
        let call = client.check(HealthCheckRequest {
            service: String::new(),
        });
        matches!(
            tokio::time::timeout(Duration::from_secs(5), call).await,
            Ok(Ok(response)) if response.get_ref().status == ServingStatus::Serving as i32
        )
    };
    assert!(
        !check(channel.clone()).await,
        "an old-CA certificate was let in"
    );
    // cert-manager renews the client certificate in place.
    new_clients
        .client_cert("gateway")?
        .write(dir.path(), "gateway")?;
    eventually("the channel presents the renewed certificate", async || {
        check(channel.clone()).await
    })
    .await;
    node.stop().await
}
