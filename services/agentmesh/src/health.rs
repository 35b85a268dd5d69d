//! `agentmesh health`: a gRPC health check (grpc.health.v1) for container
//! health checks, so images need no extra probe tool. Exits 0 when the
//! checked service is SERVING, 1 otherwise.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use agentmesh_settings::{ClientTlsSettings, Settings};
use clap::Args;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// `agentmesh health` flags.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Server to check (`http://host:port`, or `https://…` using
    /// `endpoints.tls` from the settings). Without it, every gRPC port of
    /// this host's settings (`ports.*`, same `--config` and `AGENTMESH_*`
    /// environment as the server) is checked on loopback: ports nobody
    /// listens on are skipped, every listener must be SERVING, and at least
    /// one must answer.
    #[arg(long, value_name = "URL")]
    pub addr: Option<String>,
    /// Service name to check, e.g. `agentmesh.gateway.v1.GatewayService`;
    /// empty (the default) checks the server as a whole. Needs `--addr`.
    #[arg(long, default_value = "", requires = "addr")]
    pub service: String,
    /// Longest time for the whole check (e.g. 2s, 500ms).
    #[arg(long, default_value = "2s", value_parser = crate::bench::parse_duration)]
    pub timeout: Duration,
}

/// Why one check did not say SERVING.
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("invalid address {0:?}: {1}")]
    Address(String, String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Rpc(String),
}

/// Runs the check and prints one line per checked server.
pub async fn run(args: &HealthArgs, config: Option<&Path>) -> ExitCode {
    // The same settings as the server: `endpoints.tls` says how to reach an
    // `https://` listener (CA, client certificate for mTLS, server name).
    let settings = match Settings::load(config) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("agentmesh health: {error}");
            return ExitCode::from(2);
        }
    };
    match &args.addr {
        Some(addr) => {
            let target = if addr.contains("://") {
                addr.clone()
            } else {
                format!("http://{addr}")
            };
            let outcome = check(
                &target,
                &settings.endpoints.tls,
                &args.service,
                args.timeout,
            )
            .await;
            if report(&target, &args.service, outcome) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        None => check_local(&settings, args.timeout).await,
    }
}

/// Prints the outcome of one check; true when SERVING.
fn report(target: &str, service: &str, outcome: Result<ServingStatus, CheckError>) -> bool {
    let what = if service.is_empty() {
        target.to_owned()
    } else {
        format!("{service} at {target}")
    };
    match outcome {
        Ok(ServingStatus::Serving) => {
            println!("{what}: SERVING");
            true
        }
        Ok(status) => {
            println!("{what}: {}", status.as_str_name());
            false
        }
        Err(error) => {
            eprintln!("agentmesh health: {what}: {error}");
            false
        }
    }
}

/// Asks `target` for the status of `service`, within `timeout` in all
/// (connecting included).
async fn check(
    target: &str,
    tls: &ClientTlsSettings,
    service: &str,
    timeout: Duration,
) -> Result<ServingStatus, CheckError> {
    let channel = agentmesh_client::connect_lazy(target, tls)
        .map_err(|error| CheckError::Address(target.to_owned(), error.to_string()))?;
    let mut client = HealthClient::new(channel);
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    let response = tokio::time::timeout(timeout, client.check(request))
        .await
        .map_err(|_| CheckError::Timeout(timeout))?
        .map_err(|status| {
            CheckError::Rpc(format!(
                "{:?}: {}",
                status.code(),
                status.message().trim_end()
            ))
        })?;
    Ok(ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown))
}

/// Checks every gRPC listener that this host's settings configure.
async fn check_local(settings: &Settings, timeout: Duration) -> ExitCode {
    let scheme = if settings.server.tls.enabled() {
        "https"
    } else {
        "http"
    };
    let host: IpAddr = match settings.server.host.parse::<IpAddr>() {
        Ok(ip) if !ip.is_unspecified() => ip,
        // 0.0.0.0, :: or a host name: the listener is reachable on loopback.
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let ports = &settings.ports;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut answered = 0;
    let mut healthy = true;
    for port in [
        ports.gateway,
        ports.agent,
        ports.config,
        ports.audit,
        ports.cache,
    ] {
        let address = SocketAddr::new(host, port);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(_)) => {}
            // Nobody listens there: this process does not run that service.
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Ok(Err(error)) => {
                eprintln!("agentmesh health: {address}: {error}");
                healthy = false;
                continue;
            }
            Err(_) => {
                eprintln!("agentmesh health: {address}: no answer within {timeout:?}");
                healthy = false;
                continue;
            }
        }
        answered += 1;
        let target = format!("{scheme}://{address}");
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        healthy &= report(
            &target,
            "",
            check(&target, &settings.endpoints.tls, "", left).await,
        );
    }
    if answered == 0 {
        eprintln!(
            "agentmesh health: no gRPC listener on {host} at any of the ports in the settings ({}, {}, {}, {}, {})",
            ports.gateway, ports.agent, ports.config, ports.audit, ports.cache
        );
        return ExitCode::FAILURE;
    }
    if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
