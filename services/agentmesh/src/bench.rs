//! `agentmesh bench`: a closed-loop load generator for agentmesh RPCs.
//! `-c` workers each keep one call in flight over shared HTTP/2
//! connections; latencies go into HDR histograms (microsecond precision).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentmesh_proto::agent::agent_service_client::AgentServiceClient;
use agentmesh_proto::config::GetEffectiveRequest;
use agentmesh_proto::config::config_service_client::ConfigServiceClient;
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
    /// Agent type for config.get-effective and agent.execute.
    #[arg(long, default_value = "")]
    pub agent_type: String,
    /// Project id for config.get-effective and agent.execute.
    #[arg(long, default_value = "")]
    pub project_id: String,
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
    /// agentmesh.agent.v1.AgentService/Execute (`--agent-type`, default
    /// coder; `--project-id`, default bench).
    #[value(name = "agent.execute")]
    AgentExecute,
}

impl BenchRpc {
    fn name(self) -> &'static str {
        match self {
            BenchRpc::Health => "health",
            BenchRpc::ConfigGetEffective => "config.get-effective",
            BenchRpc::AgentExecute => "agent.execute",
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

async fn call(rpc: BenchRpc, channel: &Channel, args: &BenchArgs) -> Result<(), Code> {
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
        BenchRpc::AgentExecute => {
            let spec = agentmesh_proto::agent::ExecutionSpec {
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
            };
            AgentServiceClient::new(channel.clone())
                .execute(agentmesh_proto::agent::ExecuteRequest { spec: Some(spec) })
                .await
                .map(|_| ())
                .map_err(|status| status.code())
        }
    }
}

async fn worker(
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
        let outcome = call(args.rpc, &channel, &args).await;
        let micros = started.elapsed().as_micros().max(1) as u64;
        histogram.saturating_record(micros);
        shared.completed.fetch_add(1, Ordering::Relaxed);
        if let Err(code) = outcome {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            *errors
                .entry(agentmesh_telemetry::code_name(code))
                .or_insert(0) += 1;
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
    let bench_args = Arc::new(args.clone());
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for index in 0..args.concurrency {
        let channel = channels[index as usize % channels.len()].clone();
        workers.spawn(worker(
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
