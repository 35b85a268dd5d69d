//! Command-line interface.

use std::path::PathBuf;

use agentmesh_settings::{LogFormat, Settings};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// agentmesh: gRPC microservices for running LLM agents in production.
#[derive(Debug, Parser)]
#[command(name = "agentmesh", version, about)]
pub struct Cli {
    /// TOML settings file (defaults < file < AGENTMESH_* environment).
    #[arg(long, global = true, env = "AGENTMESH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log format (overrides telemetry.log_format).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,

    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Log format flag values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs every service in one process until SIGTERM / Ctrl-C.
    Up(ServeArgs),
    /// Runs one service.
    Serve {
        /// The service to run.
        #[arg(value_enum)]
        service: ServiceName,
        /// Settings overrides.
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Applies database migrations of every service, then exits.
    Migrate(ServeArgs),
    /// Load-tests an RPC, like ghz: live progress, then throughput,
    /// latency percentiles and errors by gRPC code.
    Bench(crate::bench::BenchArgs),
    /// Checks a server with the gRPC health protocol: exit 0 when SERVING,
    /// 1 otherwise (for container health checks).
    Health(crate::health::HealthArgs),
    /// Audit log tools: verify the chain and signed checkpoints.
    Audit {
        /// What to do.
        #[command(subcommand)]
        command: crate::audit_cli::AuditCommand,
    },
    /// Gateway API keys: create, list, revoke (needs an admin key).
    Keys {
        /// What to do.
        #[command(subcommand)]
        command: crate::keys_cli::KeysCommand,
    },
    /// A project's token usage and budgets for the current day and month.
    Usage(crate::keys_cli::UsageArgs),
}

/// Services that `serve` can run.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ServiceName {
    /// The config service (port 50053).
    Config,
    /// The cache service (port 50055).
    Cache,
    /// The audit service (port 50054).
    Audit,
    /// The agent service (port 50052).
    Agent,
    /// The gateway (port 50051).
    Gateway,
}

/// Flags that override settings for `up`, `serve` and `migrate`.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// Folder for the embedded SQLite database (data_dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to bind (server.host).
    #[arg(long)]
    pub host: Option<String>,
    /// Admin HTTP port for /metrics, /healthz, /readyz (ports.admin).
    #[arg(long)]
    pub admin_port: Option<u16>,
    /// Config service port (ports.config).
    #[arg(long)]
    pub config_port: Option<u16>,
    /// Cache service port (ports.cache).
    #[arg(long)]
    pub cache_port: Option<u16>,
    /// Audit service port (ports.audit).
    #[arg(long)]
    pub audit_port: Option<u16>,
    /// Agent service port (ports.agent).
    #[arg(long)]
    pub agent_port: Option<u16>,
    /// Gateway port (ports.gateway).
    #[arg(long)]
    pub gateway_port: Option<u16>,
    /// Print the effective settings (secrets masked) and exit.
    #[arg(long)]
    pub dump_config: bool,
}

impl ServeArgs {
    /// Applies the flags on top of loaded settings.
    pub fn apply(&self, settings: &mut Settings, log_format: Option<LogFormatArg>) {
        if let Some(data_dir) = &self.data_dir {
            settings.data_dir = data_dir.clone();
        }
        if let Some(host) = &self.host {
            settings.server.host = host.clone();
        }
        if let Some(port) = self.admin_port {
            settings.ports.admin = port;
        }
        if let Some(port) = self.config_port {
            settings.ports.config = port;
        }
        if let Some(port) = self.cache_port {
            settings.ports.cache = port;
        }
        if let Some(port) = self.audit_port {
            settings.ports.audit = port;
        }
        if let Some(port) = self.agent_port {
            settings.ports.agent = port;
        }
        if let Some(port) = self.gateway_port {
            settings.ports.gateway = port;
        }
        if let Some(format) = log_format {
            settings.telemetry.log_format = match format {
                LogFormatArg::Pretty => LogFormat::Pretty,
                LogFormatArg::Json => LogFormat::Json,
            };
        }
    }
}
