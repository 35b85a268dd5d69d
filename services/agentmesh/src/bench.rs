//! `agentmesh bench`: a closed-loop load generator for agentmesh RPCs.
//! `-c` workers each keep one call in flight over shared HTTP/2
//! connections; latencies go into HDR histograms (microsecond precision).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentmesh_proto::agent::agent_service_client::AgentServiceClient;
use agentmesh_proto::audit;
use agentmesh_proto::audit::audit_service_client::AuditServiceClient;
use agentmesh_proto::audit::{AppendBatchRequest, AppendRequest};
use agentmesh_proto::cache as cache_pb;
use agentmesh_proto::cache::cache_service_client::CacheServiceClient;
use agentmesh_proto::config::GetEffectiveRequest;
use agentmesh_proto::config::config_service_client::ConfigServiceClient;
use agentmesh_proto::gateway::gateway_service_client::GatewayServiceClient;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Bench flags.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {
    /// Server address: host:port or http://host:port.
    #[arg(long)]
    pub target: String,
    /// The RPC to call.
    #[arg(long, value_enum)]
    pub rpc: BenchRpc,
    /// Concurrent callers.
    #[arg(short = 'c', long, default_value_t = 32)]
    pub concurrency: u32,
    /// How long to run (e.g. 10s, 500ms, 1m).
    #[arg(short = 'd', long, value_parser = parse_duration, conflicts_with = "count")]
    pub duration: Option<Duration>,
    /// How many calls to make in all.
    #[arg(short = 'n', long)]
    pub count: Option<u64>,
    /// HTTP/2 connections shared by the callers.
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
    /// Agent type for config.get-effective, agent.execute and gateway.execute.
    #[arg(long, default_value = "")]
    pub agent_type: String,
    /// Project id for config.get-effective, agent.execute and gateway.execute.
    #[arg(long, default_value = "")]
    pub project_id: String,
    /// For cache.get: the level every read must hit (set up before the run;
    /// `l2` needs a cache server with cache.l1_max_bytes = 0). A read
    /// answered by another level counts as a WRONG_HIT_LEVEL error.
    #[arg(long, value_enum, default_value = "l1")]
    pub hit: HitArg,
    /// Value size for cache.get and cache.set, in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_bytes: usize,
    /// Events per call for audit.append: 1 calls Append, more call
    /// AppendBatch (appends/s = req/s × batch size).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub batch_size: u32,
    /// API key sent as `authorization: Bearer <key>` with gateway.execute
    /// and gateway.circuit-states (needed when the gateway requires keys).
    #[arg(long, env = "AGENTMESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// `Bearer <api_key>`, made once before the run.
    #[arg(skip)]
    pub authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
}

/// RPCs the bench can drive.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BenchRpc {
    /// grpc.health.v1.Health/Check: the gRPC floor.
    Health,
    /// agentmesh.config.v1.ConfigService/GetEffective.
    #[value(name = "config.get-effective")]
    ConfigGetEffective,
    /// agentmesh.cache.v1.CacheService/Get (see --hit).
    #[value(name = "cache.get")]
    CacheGet,
    /// agentmesh.cache.v1.CacheService/Set.
    #[value(name = "cache.set")]
    CacheSet,
    /// agentmesh.audit.v1.AuditService/Append (or AppendBatch with
    /// --batch-size > 1), each event with a fresh event id.
    #[value(name = "audit.append")]
    AuditAppend,
    /// agentmesh.agent.v1.AgentService/Execute (`--agent-type`, default
    /// coder; `--project-id`, default bench).
    #[value(name = "agent.execute")]
    AgentExecute,
    /// agentmesh.gateway.v1.GatewayService/ExecuteTask (same task as
    /// agent.execute; point --target at the gateway).
    #[value(name = "gateway.execute")]
    GatewayExecute,
    /// agentmesh.gateway.v1.GatewayService/GetCircuitStates: the gateway's
    /// floor with its auth interceptor but no agent call (needs an admin
    /// key when keys are required).
    #[value(name = "gateway.circuit-states")]
    GatewayCircuitStates,
}

/// Which level cache.get reads must hit.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum HitArg {
    /// The server's in-memory L1.
    L1,
    /// Redis (server with cache.l1_max_bytes = 0).
    L2,
    /// Neither: the key is never written.
    Miss,
}

/// Namespace the cache bench writes in.
const BENCH_NAMESPACE: &str = "bench";
/// Key cache.get reads for --hit l1|l2.
const BENCH_KEY: &str = "bench:get";
/// TTL of bench entries.
const BENCH_TTL_SECONDS: i64 = 3600;

impl BenchRpc {
    fn name(self) -> &'static str {
        match self {
            BenchRpc::Health => "health",
            BenchRpc::ConfigGetEffective => "config.get-effective",
            BenchRpc::CacheGet => "cache.get",
            BenchRpc::CacheSet => "cache.set",
            BenchRpc::AuditAppend => "audit.append",
            BenchRpc::AgentExecute => "agent.execute",
            BenchRpc::GatewayExecute => "gateway.execute",
            BenchRpc::GatewayCircuitStates => "gateway.circuit-states",
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 10s, 500ms or 1m"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" | "" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("{text:?}: unit must be ms, s, m or h")),
    };
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("{text:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// What stops the run.
#[derive(Clone, Copy)]
enum Limit {
    Until(Instant),
    Count(u64),
}

struct Shared {
    issued: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
}

struct WorkerResult {
    histogram: Histogram<u64>,
    errors: BTreeMap<&'static str, u64>,
}

fn bench_value(args: &BenchArgs) -> Vec<u8> {
    vec![b'v'; args.value_bytes]
}

/// Writes the key cache.get reads (for --hit l1|l2) before the run.
async fn prepare(channel: &Channel, args: &BenchArgs) -> Result<(), String> {
    if !matches!(args.rpc, BenchRpc::CacheGet) || args.hit == HitArg::Miss {
        return Ok(());
    }
    CacheServiceClient::new(channel.clone())
        .set(cache_pb::SetRequest {
            namespace: BENCH_NAMESPACE.to_owned(),
            key: BENCH_KEY.to_owned(),
            value: bench_value(args),
            ttl: Some(prost_types::Duration {
                seconds: BENCH_TTL_SECONDS,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|status| format!("cannot write the bench key: {status}"))
}

async fn call(
    rpc: BenchRpc,
    channel: &Channel,
    args: &BenchArgs,
    worker_index: u32,
) -> Result<(), &'static str> {
    let code_name = |status: tonic::Status| agentmesh_telemetry::code_name(status.code());
    match rpc {
        BenchRpc::CacheGet => {
            let (key, expected) = match args.hit {
                HitArg::L1 => (BENCH_KEY.to_owned(), cache_pb::HitLevel::L1),
                HitArg::L2 => (BENCH_KEY.to_owned(), cache_pb::HitLevel::L2),
                HitArg::Miss => (
                    format!("bench:missing:{worker_index}"),
                    cache_pb::HitLevel::Miss,
                ),
            };
            let response = CacheServiceClient::new(channel.clone())
                .get(cache_pb::GetRequest {
                    namespace: BENCH_NAMESPACE.to_owned(),
                    key,
                })
                .await
                .map_err(code_name)?;
            if response.get_ref().hit_level == expected as i32 {
                Ok(())
            } else {
                Err("WRONG_HIT_LEVEL")
            }
        }
        BenchRpc::CacheSet => CacheServiceClient::new(channel.clone())
            .set(cache_pb::SetRequest {
                namespace: BENCH_NAMESPACE.to_owned(),
                key: format!("bench:set:{worker_index}"),
                value: bench_value(args),
                ttl: Some(prost_types::Duration {
                    seconds: BENCH_TTL_SECONDS,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(code_name),
        BenchRpc::Health
        | BenchRpc::ConfigGetEffective
        | BenchRpc::AuditAppend
        | BenchRpc::AgentExecute
        | BenchRpc::GatewayExecute
        | BenchRpc::GatewayCircuitStates => call_returning_code(rpc, channel, args)
            .await
            .map_err(agentmesh_telemetry::code_name),
    }
}

async fn call_returning_code(
    rpc: BenchRpc,
    channel: &Channel,
    args: &BenchArgs,
) -> Result<(), Code> {
    match rpc {
        BenchRpc::Health => HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ())
            .map_err(|status| status.code()),
        BenchRpc::ConfigGetEffective => ConfigServiceClient::new(channel.clone())
            .get_effective(GetEffectiveRequest {
                agent_type: args.agent_type.clone(),
                project_id: args.project_id.clone(),
            })
            .await
            .map(|_| ())
            .map_err(|status| status.code()),
        BenchRpc::CacheGet | BenchRpc::CacheSet => Ok(()),
        BenchRpc::AuditAppend => {
            let mut client = AuditServiceClient::new(channel.clone());
            let result = if args.batch_size <= 1 {
                client
                    .append(AppendRequest {
                        event: Some(bench_event()),
                    })
                    .await
                    .map(|_| ())
            } else {
                client
                    .append_batch(AppendBatchRequest {
                        events: (0..args.batch_size).map(|_| bench_event()).collect(),
                    })
                    .await
                    .map(|_| ())
            };
            result.map_err(|status| status.code())
        }
        BenchRpc::AgentExecute => AgentServiceClient::new(channel.clone())
            .execute(agentmesh_proto::agent::ExecuteRequest {
                spec: Some(bench_spec(args)),
            })
            .await
            .map(|_| ())
            .map_err(|status| status.code()),
        BenchRpc::GatewayExecute => {
            let spec = bench_spec(args);
            let task = agentmesh_proto::gateway::TaskSpec {
                agent_type: spec.agent_type,
                variables: spec.variables,
                project_id: spec.project_id,
                ..Default::default()
            };
            let request = tonic::Request::new(agentmesh_proto::gateway::ExecuteTaskRequest {
                task: Some(task),
            });
            GatewayServiceClient::new(channel.clone())
                .execute_task(authorized(request, args))
                .await
                .map(|_| ())
                .map_err(|status| status.code())
        }
        BenchRpc::GatewayCircuitStates => GatewayServiceClient::new(channel.clone())
            .get_circuit_states(authorized(
                tonic::Request::new(agentmesh_proto::gateway::GetCircuitStatesRequest {}),
                args,
            ))
            .await
            .map(|_| ())
            .map_err(|status| status.code()),
    }
}

/// `request` with the bench's API key, when one is given.
fn authorized<T>(mut request: tonic::Request<T>, args: &BenchArgs) -> tonic::Request<T> {
    if let Some(authorization) = &args.authorization {
        request
            .metadata_mut()
            .insert("authorization", authorization.clone());
    }
    request
}

/// The task agent.execute and gateway.execute run.
fn bench_spec(args: &BenchArgs) -> agentmesh_proto::agent::ExecutionSpec {
    agentmesh_proto::agent::ExecutionSpec {
        agent_type: if args.agent_type.is_empty() {
            "coder".to_owned()
        } else {
            args.agent_type.clone()
        },
        variables: [(
            "task".to_owned(),
            "write a function that adds two numbers".to_owned(),
        )]
        .into_iter()
        .collect(),
        project_id: if args.project_id.is_empty() {
            "bench".to_owned()
        } else {
            args.project_id.clone()
        },
        ..Default::default()
    }
}

/// A typical audit event with an event id unique across bench runs.
fn bench_event() -> audit::Event {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let run = RUN.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!("bench-{}-{nanos}", std::process::id())
    });
    let number = NEXT.fetch_add(1, Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let text = |value: &str| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(value.to_owned())),
    };
    audit::Event {
        event_id: format!("{run}-{number}"),
        occurred_at: Some(prost_types::Timestamp {
            seconds: i64::try_from(now.as_secs()).unwrap_or(0),
            nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
        }),
        agent_type: "coder".to_owned(),
        action: "task.execute".to_owned(),
        user_id: "bench-user".to_owned(),
        project_id: "bench-project".to_owned(),
        workflow_id: String::new(),
        trace_id: String::new(),
        outcome: audit::Outcome::Success as i32,
        context: Some(prost_types::Struct {
            fields: [
                ("model".to_owned(), text("local")),
                ("prompt_sha256".to_owned(), text(&"ab".repeat(32))),
                (
                    "tokens".to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::NumberValue(128.0)),
                    },
                ),
            ]
            .into_iter()
            .collect(),
        }),
    }
}

async fn worker(
    worker_index: u32,
    channel: Channel,
    args: Arc<BenchArgs>,
    limit: Limit,
    shared: Arc<Shared>,
) -> WorkerResult {
    let mut histogram = new_histogram();
    let mut errors = BTreeMap::new();
    loop {
        match limit {
            Limit::Until(deadline) if Instant::now() >= deadline => break,
            Limit::Count(total) if shared.issued.fetch_add(1, Ordering::Relaxed) >= total => break,
            _ => {}
        }
        let started = Instant::now();
        let outcome = call(args.rpc, &channel, &args, worker_index).await;
        let micros = started.elapsed().as_micros().max(1) as u64;
        histogram.saturating_record(micros);
        shared.completed.fetch_add(1, Ordering::Relaxed);
        if let Err(code) = outcome {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            *errors.entry(code).or_insert(0) += 1;
        }
    }
    WorkerResult { histogram, errors }
}

/// A histogram of 1 µs to 60 s at 3 significant digits.
#[allow(clippy::expect_used)] // constant bounds that hdrhistogram accepts
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

fn normalise_target(target: &str) -> String {
    if target.starts_with("http://") || target.starts_with("https://") {
        target.to_owned()
    } else {
        format!("http://{target}")
    }
}

/// Runs the bench and prints the report.
pub async fn run(args: &BenchArgs) -> ExitCode {
    if args.concurrency == 0 || args.connections == 0 {
        eprintln!("agentmesh bench: -c and --connections must be at least 1");
        return ExitCode::from(2);
    }
    let target = normalise_target(&args.target);
    let endpoint = match Endpoint::from_shared(target.clone()) {
        Ok(endpoint) => endpoint
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5)),
        Err(error) => {
            eprintln!(
                "agentmesh bench: invalid --target {:?}: {error}",
                args.target
            );
            return ExitCode::from(2);
        }
    };
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        match endpoint.connect().await {
            Ok(channel) => channels.push(channel),
            Err(error) => {
                eprintln!("agentmesh bench: cannot connect to {target}: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Err(message) = prepare(&channels[0], args).await {
        eprintln!("agentmesh bench: {message}");
        return ExitCode::FAILURE;
    }
    let limit = match (args.duration, args.count) {
        (_, Some(count)) => Limit::Count(count),
        (Some(duration), None) => Limit::Until(Instant::now() + duration),
        (None, None) => Limit::Until(Instant::now() + Duration::from_secs(10)),
    };
    let shared = Arc::new(Shared {
        issued: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let mut bench_args = args.clone();
    if let Some(key) = &args.api_key {
        match tonic::metadata::MetadataValue::try_from(format!("Bearer {}", key.trim())) {
            Ok(value) => bench_args.authorization = Some(value),
            Err(_) => {
                eprintln!("agentmesh bench: --api-key holds characters not allowed in metadata");
                return ExitCode::from(2);
            }
        }
    }
    let bench_args = Arc::new(bench_args);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for index in 0..args.concurrency {
        let channel = channels[index as usize % channels.len()].clone();
        workers.spawn(worker(
            index,
            channel,
            Arc::clone(&bench_args),
            limit,
            Arc::clone(&shared),
        ));
    }
    let progress_shared = Arc::clone(&shared);
    let progress = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut previous = 0;
        loop {
            tick.tick().await;
            let completed = progress_shared.completed.load(Ordering::Relaxed);
            eprintln!(
                "[{:>4.0}s] {completed} requests, {} req/s, {} errors",
                started.elapsed().as_secs_f64(),
                completed - previous,
                progress_shared.failed.load(Ordering::Relaxed)
            );
            previous = completed;
        }
    });
    let mut histogram = new_histogram();
    let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
    while let Some(joined) = workers.join_next().await {
        let Ok(result) = joined else { continue };
        let _ = histogram.add(&result.histogram);
        for (code, count) in result.errors {
            *errors.entry(code).or_insert(0) += count;
        }
    }
    progress.abort();
    let elapsed = started.elapsed().as_secs_f64();
    let requests = histogram.len();
    let rps = if elapsed > 0.0 {
        requests as f64 / elapsed
    } else {
        0.0
    };
    let percentile = |q: f64| {
        if requests == 0 {
            0
        } else {
            histogram.value_at_quantile(q)
        }
    };
    if args.json {
        let report = serde_json::json!({
            "rpc": args.rpc.name(),
            "target": target,
            "concurrency": args.concurrency,
            "connections": args.connections,
            "requests": requests,
            "duration_s": elapsed,
            "rps": rps,
            "latency_us": {
                "p50": percentile(0.50),
                "p90": percentile(0.90),
                "p99": percentile(0.99),
                "p999": percentile(0.999),
                "max": histogram.max(),
            },
            "errors": errors,
        });
        println!("{report}");
    } else {
        let ms = |micros: u64| micros as f64 / 1000.0;
        println!("rpc          {} against {target}", args.rpc.name());
        println!(
            "concurrency  {} over {} connection(s)",
            args.concurrency, args.connections
        );
        println!("requests     {requests} in {elapsed:.2}s");
        println!("throughput   {rps:.0} req/s");
        println!(
            "latency      p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
            ms(percentile(0.50)),
            ms(percentile(0.90)),
            ms(percentile(0.99)),
            ms(percentile(0.999)),
            ms(histogram.max())
        );
        if errors.is_empty() {
            println!("errors       none");
        } else {
            for (code, count) in &errors {
                println!("errors       {code}: {count}");
            }
        }
    }
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
