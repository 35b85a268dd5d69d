//! Runs the subcommands.

use std::process::ExitCode;

use agentmesh_db::Database;
use agentmesh_runtime::{Readiness, serve_admin, shutdown_on_signals};
use agentmesh_settings::{GatewaySettings, Settings};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command, ServeArgs, ServiceName};

/// Exit status for invalid settings or arguments.
const EXIT_USAGE: u8 = 2;

pub async fn dispatch(cli: Cli) -> ExitCode {
    let Cli {
        config,
        log_format,
        command,
    } = cli;
    let (args, services) = match &command {
        Command::Bench(args) => return crate::bench::run(args).await,
        Command::Audit { command } => return crate::audit_cli::run(command).await,
        Command::Health(args) => return crate::health::run(args, config.as_deref()).await,
        Command::Keys { command } => return crate::keys_cli::run_keys(command).await,
        Command::Usage(args) => return crate::keys_cli::run_usage(args).await,
        Command::Up(args) => (
            args,
            vec![
                ServiceName::Config,
                ServiceName::Agent,
                ServiceName::Audit,
                ServiceName::Cache,
                ServiceName::Gateway,
            ],
        ),
        Command::Serve { service, args } => (args, vec![*service]),
        Command::Migrate(args) => (args, Vec::new()),
    };
    let settings = match load_settings(config.as_deref(), args, log_format) {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("agentmesh: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if args.dump_config {
        print!("{}", settings.dump());
        return ExitCode::SUCCESS;
    }
    let service_name = match &command {
        Command::Serve { service, .. } => {
            format!("agentmesh-{}", format!("{service:?}").to_lowercase())
        }
        _ => "agentmesh".to_owned(),
    };
    let _telemetry = match agentmesh_telemetry::init(&service_name, settings.telemetry.log_format) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("agentmesh: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result = match command {
        Command::Migrate(_) => migrate(&settings).await,
        _ => serve(&settings, &services).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "agentmesh stopped with an error");
            eprintln!("agentmesh: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_settings(
    file: Option<&std::path::Path>,
    args: &ServeArgs,
    log_format: Option<crate::cli::LogFormatArg>,
) -> Result<Settings, String> {
    let mut settings = Settings::load(file).map_err(|error| error.to_string())?;
    args.apply(&mut settings, log_format);
    settings
        .validate()
        .map_err(|violations| agentmesh_settings::LoadError::Invalid(violations).to_string())?;
    Ok(settings)
}

async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let database = Database::connect(settings).await?;
    agentmesh_config::migrate(&database).await?;
    agentmesh_audit::migrate(&database).await?;
    agentmesh_agent::migrate(&database).await?;
    agentmesh_gateway::migrate(&database).await?;
    tracing::info!("migrations applied");
    database.close().await;
    Ok(())
}

async fn bind(host: &str, port: u16, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {host}:{port} for {what}: {error}"))
}

/// `http://address` of `service`'s listener in this process, if it runs
/// here (an unspecified bind address becomes loopback), or `https://…`
/// when the listeners serve TLS.
fn local_endpoint(
    listeners: &[(ServiceName, TcpListener)],
    service: ServiceName,
    tls: bool,
) -> anyhow::Result<Option<String>> {
    let Some((_, listener)) = listeners.iter().find(|(name, _)| *name == service) else {
        return Ok(None);
    };
    let mut address = listener.local_addr()?;
    if address.ip().is_unspecified() {
        address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let scheme = if tls { "https" } else { "http" };
    Ok(Some(format!("{scheme}://{address}")))
}

async fn serve(settings: &Settings, services: &[ServiceName]) -> anyhow::Result<()> {
    agentmesh_telemetry::metrics_handle();
    let shutdown = shutdown_on_signals();
    let readiness = Readiness::default();
    let host = settings.server.host.as_str();

    // Bind everything first, so a busy port fails fast before any work.
    let admin_listener = bind(host, settings.ports.admin, "the admin endpoint").await?;
    let mut listeners = Vec::new();
    for service in services {
        let port = match service {
            ServiceName::Config => settings.ports.config,
            ServiceName::Cache => settings.ports.cache,
            ServiceName::Audit => settings.ports.audit,
            ServiceName::Agent => settings.ports.agent,
            ServiceName::Gateway => settings.ports.gateway,
        };
        listeners.push((
            *service,
            bind(host, port, &format!("{service:?}").to_lowercase()).await?,
        ));
    }
    tracing::info!(address = %admin_listener.local_addr()?, "admin endpoint listening (/metrics, /healthz, /readyz)");
    // With the config, cache or audit service in this process, the other
    // services reach it (over gRPC, as in separate processes) at the address
    // it really got.
    // With TLS on, that is https:// (endpoints.tls must trust the
    // certificate, and it must name 127.0.0.1 or endpoints.tls.server_name).
    let mut settings = settings.clone();
    let tls = settings.server.tls.enabled();
    if let Some(endpoint) = local_endpoint(&listeners, ServiceName::Config, tls)? {
        settings.endpoints.config = endpoint;
    }
    if let Some(endpoint) = local_endpoint(&listeners, ServiceName::Cache, tls)? {
        settings.endpoints.cache = endpoint;
    }
    if let Some(endpoint) = local_endpoint(&listeners, ServiceName::Audit, tls)? {
        settings.endpoints.audit = endpoint;
    }
    // Likewise the gateway's default agent node is the agent listener of
    // this process when there is one (a configured list is kept).
    if settings.gateway.agent_endpoints == GatewaySettings::default().agent_endpoints
        && let Some(endpoint) = local_endpoint(&listeners, ServiceName::Agent, tls)?
    {
        settings.gateway.agent_endpoints = vec![endpoint];
    }
    let settings = &settings;

    // A gateway in this process stops first: the services behind it (agent,
    // cache, audit, config) keep serving until it has drained and flushed
    // its audit events.
    let gateway_here = listeners
        .iter()
        .any(|(service, _)| *service == ServiceName::Gateway);
    let gateway_stopped = CancellationToken::new();
    let backends_shutdown = if gateway_here {
        let backends = CancellationToken::new();
        let (process_stopping, gateway_gone, release_backends) =
            (shutdown.clone(), gateway_stopped.clone(), backends.clone());
        tokio::spawn(async move {
            process_stopping.cancelled().await;
            gateway_gone.cancelled().await;
            release_backends.cancel();
        });
        backends
    } else {
        shutdown.clone()
    };

    let mut tasks = JoinSet::new();
    let admin_shutdown = shutdown.clone();
    let admin_readiness = readiness.clone();
    tasks.spawn(async move {
        serve_admin(admin_listener, admin_readiness, admin_shutdown)
            .await
            .map_err(|error| anyhow::anyhow!("admin endpoint failed: {error}"))
    });
    for (service, listener) in listeners {
        let settings = settings.clone();
        let readiness = readiness.clone();
        let shutdown = match service {
            ServiceName::Gateway => shutdown.clone(),
            _ => backends_shutdown.clone(),
        };
        let gateway_stopped = gateway_stopped.clone();
        tasks.spawn(async move {
            match service {
                ServiceName::Config => {
                    agentmesh_config::serve(&settings, listener, readiness, shutdown)
                        .await
                        .map_err(|error| anyhow::anyhow!("config service: {error}"))
                }
                ServiceName::Cache => {
                    agentmesh_cache::serve(&settings, listener, readiness, shutdown)
                        .await
                        .map_err(|error| anyhow::anyhow!("cache service: {error}"))
                }
                ServiceName::Audit => {
                    agentmesh_audit::serve(&settings, listener, readiness, shutdown)
                        .await
                        .map_err(|error| anyhow::anyhow!("audit service: {error}"))
                }
                ServiceName::Agent => {
                    agentmesh_agent::serve(&settings, listener, readiness, shutdown)
                        .await
                        .map_err(|error| anyhow::anyhow!("agent service: {error}"))
                }
                ServiceName::Gateway => {
                    let _stopped = gateway_stopped.drop_guard();
                    agentmesh_gateway::serve(&settings, listener, readiness, shutdown)
                        .await
                        .map_err(|error| anyhow::anyhow!("gateway: {error}"))
                }
            }
        });
    }

    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.map_err(|error| anyhow::anyhow!("a service task panicked: {error}"));
        if let Err(error) = outcome.and_then(|result| result) {
            // One service failing takes the process down, cleanly.
            shutdown.cancel();
            first_error.get_or_insert(error);
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => {
            tracing::info!("agentmesh stopped");
            Ok(())
        }
    }
}
