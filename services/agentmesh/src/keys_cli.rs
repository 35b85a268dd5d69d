//! `agentmesh keys` and `agentmesh usage`: manage the gateway's API keys
//! and read a project's token usage through the running gateway's
//! `KeyService`, with an admin key from `--api-key` or `AGENTMESH_API_KEY`.

use std::process::ExitCode;

use agentmesh_proto::gateway as pb;
use agentmesh_proto::gateway::key_service_client::KeyServiceClient;
use clap::{Args, Subcommand, ValueEnum};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

/// `agentmesh keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Creates a key and prints it once (it cannot be read again).
    Create(CreateArgs),
    /// Lists keys (never their secrets).
    List(ListArgs),
    /// Revokes a key for good, on every gateway within seconds.
    Revoke(RevokeArgs),
}

/// Where the gateway is and the key to call it with.
#[derive(Debug, Args)]
pub struct Connection {
    /// Gateway address: host:port or http://host:port.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub gateway: String,
    /// API key to call with (an admin key for `keys`); not needed while
    /// the gateway runs with authentication off.
    #[arg(long, env = "AGENTMESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Roles a key can have.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoleArg {
    /// Runs tasks and workflows in its projects.
    User,
    /// Also manages keys and reads routing state.
    Admin,
}

/// `agentmesh keys create` flags.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Connection.
    #[command(flatten)]
    pub connection: Connection,
    /// Name of the key (who or what uses it).
    #[arg(long)]
    pub name: String,
    /// Role of the key.
    #[arg(long, value_enum, default_value = "user")]
    pub role: RoleArg,
    /// A project the key may use; repeat for several, or `*` for every
    /// project (the default for admin keys).
    #[arg(long = "project", value_name = "PROJECT")]
    pub projects: Vec<String>,
}

/// `agentmesh keys list` flags.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Connection.
    #[command(flatten)]
    pub connection: Connection,
    /// Also list revoked keys.
    #[arg(long)]
    pub all: bool,
}

/// `agentmesh keys revoke` arguments.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Connection.
    #[command(flatten)]
    pub connection: Connection,
    /// Id of the key to revoke (as `keys list` shows it).
    pub key_id: String,
}

/// `agentmesh usage` arguments.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Connection.
    #[command(flatten)]
    pub connection: Connection,
    /// The project.
    pub project: String,
}

/// Adds `authorization: Bearer <key>` to every call, when a key is given.
#[derive(Clone)]
struct WithKey(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for WithKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A KeyService client that sends the API key with every call.
type Client = KeyServiceClient<tonic::service::interceptor::InterceptedService<Channel, WithKey>>;

async fn connect(connection: &Connection) -> anyhow::Result<Client> {
    let address = if connection.gateway.contains("://") {
        connection.gateway.clone()
    } else {
        format!("http://{}", connection.gateway)
    };
    let authorization = match &connection.api_key {
        Some(key) => Some(
            MetadataValue::try_from(format!("Bearer {}", key.trim())).map_err(|_| {
                anyhow::anyhow!("--api-key holds characters not allowed in metadata")
            })?,
        ),
        None => None,
    };
    // https:// uses the system's trust store.
    let channel = agentmesh_client::connect(&address, &Default::default()).await?;
    Ok(KeyServiceClient::with_interceptor(
        channel,
        WithKey(authorization),
    ))
}

fn time(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp
        .and_then(|timestamp| {
            let nanos = u32::try_from(timestamp.nanos).ok()?;
            chrono::DateTime::from_timestamp(timestamp.seconds, nanos)
        })
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn role_name(role: i32) -> &'static str {
    match pb::ApiKeyRole::try_from(role) {
        Ok(pb::ApiKeyRole::Admin) => "admin",
        Ok(pb::ApiKeyRole::User) => "user",
        _ => "unspecified",
    }
}

fn key_json(key: &pb::ApiKey) -> serde_json::Value {
    serde_json::json!({
        "key_id": key.key_id,
        "name": key.name,
        "role": role_name(key.role),
        "projects": key.projects,
        "created_at": time(key.created_at.as_ref()),
        "created_by": key.created_by,
        "revoked_at": key.revoked_at.as_ref().map(|at| time(Some(at))),
    })
}

fn failed(what: &str, error: &anyhow::Error) -> ExitCode {
    eprintln!("agentmesh {what}: {error:#}");
    ExitCode::FAILURE
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {}",
        agentmesh_telemetry::code_name(status.code()),
        status.message()
    )
}

/// Runs `agentmesh keys …`.
pub async fn run_keys(command: &KeysCommand) -> ExitCode {
    let (what, result) = match command {
        KeysCommand::Create(args) => ("keys create", create(args).await),
        KeysCommand::List(args) => ("keys list", list(args).await),
        KeysCommand::Revoke(args) => ("keys revoke", revoke(args).await),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => failed(what, &error),
    }
}

async fn create(args: &CreateArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.connection).await?;
    let role = match args.role {
        RoleArg::User => pb::ApiKeyRole::User,
        RoleArg::Admin => pb::ApiKeyRole::Admin,
    };
    let response = client
        .create_api_key(pb::CreateApiKeyRequest {
            name: args.name.clone(),
            role: role as i32,
            projects: args.projects.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let key = response.key.unwrap_or_default();
    if args.connection.json {
        let mut json = key_json(&key);
        json["secret"] = serde_json::Value::from(response.secret);
        println!("{json}");
    } else {
        println!("key_id    {}", key.key_id);
        println!("name      {}", key.name);
        println!("role      {}", role_name(key.role));
        println!("projects  {}", key.projects.join(", "));
        println!("secret    {}", response.secret);
        eprintln!(
            "store the secret now: it is not shown again. Send it as `authorization: Bearer <secret>`."
        );
    }
    Ok(())
}

async fn list(args: &ListArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.connection).await?;
    let mut keys = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_api_keys(pb::ListApiKeysRequest {
                include_revoked: args.all,
                page_size: 1000,
                page_token: page_token.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        keys.extend(page.keys);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    if args.connection.json {
        let list: Vec<_> = keys.iter().map(key_json).collect();
        println!("{}", serde_json::Value::from(list));
        return Ok(());
    }
    println!(
        "{:<16}  {:<5}  {:<20}  {:<20}  {:<20}  NAME",
        "KEY_ID", "ROLE", "PROJECTS", "CREATED", "REVOKED"
    );
    for key in &keys {
        println!(
            "{:<16}  {:<5}  {:<20}  {:<20}  {:<20}  {}",
            key.key_id,
            role_name(key.role),
            key.projects.join(","),
            time(key.created_at.as_ref()),
            time(key.revoked_at.as_ref()),
            key.name
        );
    }
    Ok(())
}

async fn revoke(args: &RevokeArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.connection).await?;
    let key = client
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: args.key_id.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .key
        .unwrap_or_default();
    if args.connection.json {
        println!("{}", key_json(&key));
    } else {
        println!(
            "revoked {} ({}) at {}",
            key.key_id,
            key.name,
            time(key.revoked_at.as_ref())
        );
    }
    Ok(())
}

/// Runs `agentmesh usage <project>`.
pub async fn run_usage(args: &UsageArgs) -> ExitCode {
    match usage(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => failed("usage", &error),
    }
}

async fn usage(args: &UsageArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.connection).await?;
    let usage = client
        .get_project_usage(pb::GetProjectUsageRequest {
            project_id: args.project.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let period_json = |period: Option<&pb::BudgetPeriodUsage>| {
        period.map(|period| {
            serde_json::json!({
                "period": period.period,
                "tokens_used": period.tokens_used,
                "tokens_limit": period.tokens_limit,
                "resets_at": time(period.resets_at.as_ref()),
            })
        })
    };
    if args.connection.json {
        println!(
            "{}",
            serde_json::json!({
                "project_id": usage.project_id,
                "day": period_json(usage.day.as_ref()),
                "month": period_json(usage.month.as_ref()),
            })
        );
        return Ok(());
    }
    println!("project  {}", usage.project_id);
    for (label, period) in [("day", usage.day.as_ref()), ("month", usage.month.as_ref())] {
        let Some(period) = period else { continue };
        let limit = if period.tokens_limit == 0 {
            "unlimited".to_owned()
        } else {
            period.tokens_limit.to_string()
        };
        println!(
            "{label:<7}  {}: {} tokens used of {limit}, resets at {}",
            period.period,
            period.tokens_used,
            time(period.resets_at.as_ref())
        );
    }
    Ok(())
}
