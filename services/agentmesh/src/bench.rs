//! `agentmesh bench`: a closed-loop load generator for agentmesh RPCs.
//! `-c` workers each keep one call in flight over shared HTTP/2
//! connections; latencies go into HDR histograms (microsecond precision).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
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
    /// Concurrent callers (closed loop). With --rate: the most calls in
    /// flight at once; a scheduled call that finds them all busy counts as
    /// a CLIENT_SATURATED error instead of waiting.
    #[arg(short = 'c', long, default_value_t = 32)]
    pub concurrency: u32,
    /// Open loop: start this many calls per second on a fixed schedule,
    /// whatever the answers, and measure each call's latency from its
    /// scheduled start (queueing in the client or server is not hidden).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate: Option<u32>,
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
    /// For gateway.execute: the task's cache policy. The same task is sent
    /// every time, so with `unspecified` or `use` a deterministic task is
    /// answered from the response cache after the first call; `bypass`
    /// routes every call to an agent node.
    #[arg(long, value_enum, default_value = "unspecified")]
    pub cache_policy: CachePolicyArg,
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
    /// A Prometheus endpoint (e.g. http://127.0.0.1:9464/metrics) scraped
    /// before and after the run: the report adds p50/p90/p99 of
    /// `--histogram` over the run (from its bucket counts).
    #[arg(long, requires = "histogram")]
    pub metrics_url: Option<String>,
    /// Histogram read from --metrics-url, all label sets summed (e.g.
    /// agentmesh_gateway_overhead_seconds).
    #[arg(long, requires = "metrics_url")]
    pub histogram: Option<String>,
}

/// `--cache-policy` values.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum CachePolicyArg {
    /// Cache deterministic tasks (the default).
    Unspecified,
    /// Read and store even when not deterministic.
    Use,
    /// Neither read nor store.
    Bypass,
    /// Execute and overwrite.
    Refresh,
}

impl CachePolicyArg {
    fn number(self) -> i32 {
        use agentmesh_proto::gateway::CachePolicy;
        match self {
            CachePolicyArg::Unspecified => CachePolicy::Unspecified as i32,
            CachePolicyArg::Use => CachePolicy::Use as i32,
            CachePolicyArg::Bypass => CachePolicy::Bypass as i32,
            CachePolicyArg::Refresh => CachePolicy::Refresh as i32,
        }
    }
}

/// Cumulative bucket counts of one histogram: (upper bound, count).
type Buckets = Vec<(f64, f64)>;

/// Reads the cumulative buckets of `name` from a Prometheus text page,
/// summing every label set.
fn parse_buckets(page: &str, name: &str) -> Buckets {
    let prefix = format!("{name}_bucket{{");
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in page.lines().filter(|line| line.starts_with(&prefix)) {
        let Some(le_at) = line.find("le=\"") else {
            continue;
        };
        let rest = &line[le_at + 4..];
        let Some(end) = rest.find('"') else { continue };
        let le = &rest[..end];
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse::<f64>() {
                Ok(bound) => bound,
                Err(_) => continue,
            }
        };
        let Some(count) = line
            .rsplit(' ')
            .next()
            .and_then(|value| value.parse::<f64>().ok())
        else {
            continue;
        };
        sums.entry(le.to_owned()).or_insert((bound, 0.0)).1 += count;
    }
    let mut buckets: Buckets = sums.into_values().collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile of the observations between two scrapes, interpolated
/// linearly inside its bucket; `None` without observations.
fn bucket_quantile(before: &Buckets, after: &Buckets, q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(bound, count)| {
            let earlier = before
                .iter()
                .find(|(b, _)| b == bound)
                .map_or(0.0, |(_, c)| *c);
            (*bound, count - earlier)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (bound, count) in delta {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let share = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                0.0
            };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (bound, count);
    }
    None
}

async fn scrape(url: &str, name: &str) -> Result<Buckets, String> {
    let page = reqwest::get(url)
        .await
        .map_err(|error| format!("cannot scrape {url}: {error}"))?
        .text()
        .await
        .map_err(|error| format!("cannot read {url}: {error}"))?;
    Ok(parse_buckets(&page, name))
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

/// Parses a duration such as `10s`, `500ms`, `1m` or `2h`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
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
                cache_policy: args.cache_policy.number(),
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

/// The open loop: call number `i` is due at `started + i / rate`; each
/// runs in its own task and records its latency from when it was due.
/// A pacing thread sleeps until shortly before each due time and spins the
/// rest (Tokio's timer only has millisecond resolution, which would add up
/// to a millisecond of scheduling delay to every call), then hands the call
/// to the runtime.
async fn open_loop(
    rate: u32,
    channels: Vec<Channel>,
    args: Arc<BenchArgs>,
    limit: Limit,
    shared: Arc<Shared>,
) -> WorkerResult {
    let result = Arc::new(std::sync::Mutex::new(WorkerResult {
        histogram: new_histogram(),
        errors: BTreeMap::new(),
    }));
    let slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency as usize));
    let (ticks, mut due_calls) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    std::thread::spawn(move || pace(rate, limit, &ticks));
    let mut calls = tokio::task::JoinSet::new();
    while let Some((index, due)) = due_calls.recv().await {
        let worker_index = u32::try_from(index % u64::from(args.concurrency)).unwrap_or(0);
        shared.issued.fetch_add(1, Ordering::Relaxed);
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            shared.completed.fetch_add(1, Ordering::Relaxed);
            shared.failed.fetch_add(1, Ordering::Relaxed);
            let mut result = result.lock().unwrap_or_else(PoisonError::into_inner);
            *result.errors.entry("CLIENT_SATURATED").or_insert(0) += 1;
            continue;
        };
        let channel = channels[index as usize % channels.len()].clone();
        let args = Arc::clone(&args);
        let shared = Arc::clone(&shared);
        let result = Arc::clone(&result);
        calls.spawn(async move {
            let outcome = call(args.rpc, &channel, &args, worker_index).await;
            let micros = due.elapsed().as_micros().max(1) as u64;
            drop(slot);
            shared.completed.fetch_add(1, Ordering::Relaxed);
            let mut result = result.lock().unwrap_or_else(PoisonError::into_inner);
            result.histogram.saturating_record(micros);
            if let Err(code) = outcome {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                *result.errors.entry(code).or_insert(0) += 1;
            }
        });
        // Reap finished calls so the set stays small.
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
    let mut result = result.lock().unwrap_or_else(PoisonError::into_inner);
    WorkerResult {
        histogram: std::mem::replace(&mut result.histogram, new_histogram()),
        errors: std::mem::take(&mut result.errors),
    }
}

/// The open loop's schedule, on its own thread: sends `(index, due)` at
/// each due time, to within a few microseconds, until `limit`.
fn pace(rate: u32, limit: Limit, ticks: &tokio::sync::mpsc::UnboundedSender<(u64, Instant)>) {
    /// Sleeping overshoots by up to the kernel's timer slack (50 µs by
    /// default); the last stretch is spun.
    const SPIN: Duration = Duration::from_micros(150);
    let interval = Duration::from_secs(1) / rate;
    let started = Instant::now();
    for index in 0_u64.. {
        let due = started + interval * u32::try_from(index).unwrap_or(u32::MAX);
        match limit {
            Limit::Until(deadline) if due >= deadline => return,
            Limit::Count(total) if index >= total => return,
            _ => {}
        }
        let now = Instant::now();
        if due > now + SPIN {
            std::thread::sleep(due - now - SPIN);
        }
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        if ticks.send((index, due)).is_err() {
            return;
        }
    }
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
                eprintln!(
                    "agentmesh bench: cannot connect to {target}: {}",
                    agentmesh_client::error_chain(&error)
                );
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
    let scraped_before = match (&args.metrics_url, &args.histogram) {
        (Some(url), Some(name)) => match scrape(url, name).await {
            Ok(buckets) => Some(buckets),
            Err(message) => {
                eprintln!("agentmesh bench: {message}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
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
    if let Some(rate) = args.rate {
        workers.spawn(open_loop(
            rate,
            channels.clone(),
            Arc::clone(&bench_args),
            limit,
            Arc::clone(&shared),
        ));
    } else {
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
    let scraped = match (&scraped_before, &args.metrics_url, &args.histogram) {
        (Some(before), Some(url), Some(name)) => match scrape(url, name).await {
            Ok(after) => Some(
                [0.5, 0.9, 0.99]
                    .map(|q| bucket_quantile(before, &after, q).map(|seconds| seconds * 1e6)),
            ),
            Err(message) => {
                eprintln!("agentmesh bench: {message}");
                None
            }
        },
        _ => None,
    };
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
            "mode": if args.rate.is_some() { "open-loop" } else { "closed-loop" },
            "rate": args.rate,
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
            "histogram": scraped.map(|[p50, p90, p99]| serde_json::json!({
                "name": args.histogram,
                "p50_us": p50,
                "p90_us": p90,
                "p99_us": p99,
            })),
        });
        println!("{report}");
    } else {
        let ms = |micros: u64| micros as f64 / 1000.0;
        println!("rpc          {} against {target}", args.rpc.name());
        match args.rate {
            Some(rate) => println!(
                "open loop    {rate} req/s scheduled, at most {} in flight, over {} connection(s); latency from the scheduled start",
                args.concurrency, args.connections
            ),
            None => println!(
                "concurrency  {} over {} connection(s)",
                args.concurrency, args.connections
            ),
        }
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
        if let (Some([p50, p90, p99]), Some(name)) = (scraped, &args.histogram) {
            let us = |value: Option<f64>| value.map_or("-".to_owned(), |v| format!("{v:.1} µs"));
            println!(
                "{name}  p50 {}  p90 {}  p99 {} (server side, from buckets)",
                us(p50),
                us(p90),
                us(p99)
            );
        }
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
    fn quantiles_come_from_the_bucket_counts_added_during_the_run() {
        let page = |counts: [u32; 4]| {
            format!(
                "# TYPE x_seconds histogram\n\
                 x_seconds_bucket{{method=\"a\",le=\"0.00001\"}} {}\n\
                 x_seconds_bucket{{method=\"a\",le=\"0.00002\"}} {}\n\
                 x_seconds_bucket{{method=\"a\",le=\"0.00005\"}} {}\n\
                 x_seconds_bucket{{method=\"a\",le=\"+Inf\"}} {}\n\
                 x_seconds_sum{{method=\"a\"}} 1\n",
                counts[0], counts[1], counts[2], counts[3]
            )
        };
        let before = parse_buckets(&page([5, 5, 5, 5]), "x_seconds");
        assert_eq!(before.len(), 4);
        // 100 new observations: 50 under 10 µs, 40 in 10–20 µs, 10 in 20–50 µs.
        let after = parse_buckets(&page([55, 95, 105, 105]), "x_seconds");
        let p50 = bucket_quantile(&before, &after, 0.5).unwrap();
        assert!((p50 - 0.00001).abs() < 1e-9, "{p50}");
        let p90 = bucket_quantile(&before, &after, 0.9).unwrap();
        assert!((p90 - 0.00002).abs() < 1e-9, "{p90}");
        let p99 = bucket_quantile(&before, &after, 0.99).unwrap();
        assert!(p99 > 0.00002 && p99 < 0.00005, "{p99}");
        assert!(bucket_quantile(&after, &after, 0.5).is_none());
    }

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
