//! End-to-end tests of the cache service over real gRPC against real Redis:
//! the machine's (`AGENTMESH_TEST_REDIS_URL`, own key prefix per test) and
//! `redis-server` processes the tests kill and restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use agentmesh_client::CacheClient;
use agentmesh_proto::cache::{self as pb, cache_service_client::CacheServiceClient};
use agentmesh_proto::common::CircuitState;
use agentmesh_settings::Settings;
use agentmesh_tests::cache::{CacheNode, RedisProcess, cache_settings, redis_url, remove_prefix};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

type Client = CacheServiceClient<Channel>;

const NS: &str = "tests";

fn secs(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

fn millis_of(duration: &Option<prost_types::Duration>) -> i64 {
    let duration = duration.unwrap_or_default();
    duration.seconds * 1000 + i64::from(duration.nanos) / 1_000_000
}

async fn set(client: &mut Client, key: &str, value: &str, ttl: i64, tags: &[&str]) {
    client
        .set(pb::SetRequest {
            namespace: NS.into(),
            key: key.into(),
            value: value.as_bytes().to_vec(),
            content_type: "text/plain".into(),
            ttl: secs(ttl),
            tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
            lease_token: None,
        })
        .await
        .unwrap();
}

async fn get(client: &mut Client, key: &str) -> pb::GetResponse {
    client
        .get(pb::GetRequest {
            namespace: NS.into(),
            key: key.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn level(response: &pb::GetResponse) -> pb::HitLevel {
    pb::HitLevel::try_from(response.hit_level).unwrap()
}

fn value(response: &pb::GetResponse) -> String {
    String::from_utf8(response.entry.clone().unwrap_or_default().value).unwrap()
}

async fn stats(client: &mut Client) -> pb::StatsResponse {
    client
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Polls `check` every 20 ms for up to 10 s (a liveness bound, not a timing
/// assertion).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_connected(client: &Client) {
    eventually("L2 connected", || {
        let mut client = client.clone();
        async move { stats(&mut client).await.l2_mode == pb::L2Mode::Connected as i32 }
    })
    .await;
}

/// Two replicas on the machine's Redis under one fresh key prefix.
async fn two_replicas(
    tweak: impl Fn(&mut Settings),
) -> Option<(String, Settings, CacheNode, CacheNode)> {
    let url = redis_url().await?;
    let mut settings = cache_settings(Some(&url));
    tweak(&mut settings);
    let a = CacheNode::start(&settings).await.unwrap();
    let b = CacheNode::start(&settings).await.unwrap();
    wait_connected(&a.client().await.unwrap()).await;
    wait_connected(&b.client().await.unwrap()).await;
    Some((url, settings, a, b))
}

async fn finish(url: &str, settings: &Settings, nodes: Vec<CacheNode>) {
    for node in nodes {
        node.stop().await.unwrap();
    }
    remove_prefix(url, &settings.cache.key_prefix)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_only_without_redis() {
    let settings = cache_settings(None);
    let node = CacheNode::start(&settings).await.unwrap();
    let mut client = node.client().await.unwrap();
    let stats_before = stats(&mut client).await;
    assert_eq!(stats_before.l2_mode, pb::L2Mode::Disabled as i32);
    assert_eq!(stats_before.l2_breaker_state, CircuitState::Closed as i32);
    assert_eq!(level(&get(&mut client, "k").await), pb::HitLevel::Miss);
    set(&mut client, "k", "v", 60, &[]).await;
    let hit = get(&mut client, "k").await;
    assert_eq!(level(&hit), pb::HitLevel::L1);
    assert_eq!(value(&hit), "v");
    assert_eq!(hit.entry.unwrap().content_type, "text/plain");
    // No TTL: the configured default applies.
    let applied = client
        .set(pb::SetRequest {
            namespace: NS.into(),
            key: "default-ttl".into(),
            value: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        applied.ttl.unwrap().seconds,
        settings.defaults.cache.default_ttl_seconds
    );
    let deleted = client
        .delete(pb::DeleteRequest {
            namespace: NS.into(),
            key: "k".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    assert_eq!(level(&get(&mut client, "k").await), pb::HitLevel::Miss);

    // Leases work in-process too.
    let lease = client
        .get_or_lease(pb::GetOrLeaseRequest {
            namespace: NS.into(),
            key: "lazy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.outcome, pb::LeaseOutcome::Granted as i32);
    assert!(lease.lease_token.starts_with('l'));
    let busy = client
        .get_or_lease(pb::GetOrLeaseRequest {
            namespace: NS.into(),
            key: "lazy".into(),
            max_wait: secs(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(busy.outcome, pb::LeaseOutcome::StillLeased as i32);
    let completed = client
        .set(pb::SetRequest {
            namespace: NS.into(),
            key: "lazy".into(),
            value: b"filled".to_vec(),
            ttl: secs(60),
            lease_token: Some(lease.lease_token.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(completed.lease_completed);
    assert_eq!(value(&get(&mut client, "lazy").await), "filled");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_hit_then_l2_hit_after_eviction() {
    let Some(url) = redis_url().await else { return };
    let mut settings = cache_settings(Some(&url));
    settings.cache.l1_max_bytes = 4000;
    let node = CacheNode::start(&settings).await.unwrap();
    let mut client = node.client().await.unwrap();
    wait_connected(&client).await;
    set(&mut client, "first", &"f".repeat(1000), 60, &[]).await;
    assert_eq!(level(&get(&mut client, "first").await), pb::HitLevel::L1);
    for index in 0..10 {
        set(
            &mut client,
            &format!("k{index}"),
            &"x".repeat(1000),
            60,
            &[],
        )
        .await;
    }
    // Stats applies pending evictions: L1 holds at most 4000 bytes.
    let after = stats(&mut client).await;
    assert!(after.l1_bytes <= 4000, "{after:?}");
    let mut l2_hits = 0;
    for key in std::iter::once("first".to_owned()).chain((0..10).map(|i| format!("k{i}"))) {
        let response = get(&mut client, &key).await;
        assert_ne!(level(&response), pb::HitLevel::Miss, "{key}");
        assert_eq!(response.entry.as_ref().unwrap().value.len(), 1000);
        if level(&response) == pb::HitLevel::L2 {
            l2_hits += 1;
        }
    }
    assert!(l2_hits >= 7, "only {l2_hits} of 11 reads came from L2");
    assert!(stats(&mut client).await.l2_hits >= 7);
    node.stop().await.unwrap();
    remove_prefix(&url, &settings.cache.key_prefix)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expires_at_both_levels_without_skew() {
    let Some((url, settings, a, b)) = two_replicas(|_| {}).await else {
        return;
    };
    let mut client_a = a.client().await.unwrap();
    let mut client_b = b.client().await.unwrap();
    set(&mut client_a, "short", "s", 2, &[]).await;
    let on_a = get(&mut client_a, "short").await;
    assert_eq!(level(&on_a), pb::HitLevel::L1);
    assert!(millis_of(&on_a.entry.unwrap().remaining_ttl) <= 2000);
    // B reads L2 and fills its L1 with what is left, not a fresh TTL.
    let from_l2 = get(&mut client_b, "short").await;
    assert_eq!(level(&from_l2), pb::HitLevel::L2);
    let l2_left = millis_of(&from_l2.entry.unwrap().remaining_ttl);
    assert!(l2_left <= 2000 && l2_left > 0, "{l2_left}");
    let from_l1 = get(&mut client_b, "short").await;
    assert_eq!(level(&from_l1), pb::HitLevel::L1);
    assert!(millis_of(&from_l1.entry.unwrap().remaining_ttl) <= l2_left);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        level(&get(&mut client_b, "short").await),
        pb::HitLevel::Miss
    );
    assert_eq!(
        level(&get(&mut client_a, "short").await),
        pb::HitLevel::Miss
    );
    finish(&url, &settings, vec![a, b]).await;
}

async fn invalidate(client: &mut Client, selector: pb::invalidate_request::Selector) -> u64 {
    client
        .invalidate(pb::InvalidateRequest {
            namespace: NS.into(),
            selector: Some(selector),
        })
        .await
        .unwrap()
        .into_inner()
        .removed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_by_key_prefix_and_tag_on_every_replica() {
    use pb::invalidate_request::Selector;
    let Some((url, settings, a, b)) = two_replicas(|settings| {
        settings.cache.invalidate_batch = 3; // several SCAN rounds
    })
    .await
    else {
        return;
    };
    let mut client_a = a.client().await.unwrap();
    let mut client_b = b.client().await.unwrap();
    for index in 0..10 {
        set(&mut client_a, &format!("user:{index}"), "u", 60, &["users"]).await;
    }
    set(&mut client_a, "order:1", "o", 60, &["orders", "user-1"]).await;
    set(&mut client_a, "order:2", "o", 60, &["orders"]).await;
    set(&mut client_a, "plain", "p", 60, &[]).await;
    set(&mut client_a, "odd*[key]", "g", 60, &[]).await;
    // Warm B's L1 so invalidations must reach it.
    for key in ["user:3", "order:1", "order:2", "plain", "odd*[key]"] {
        get(&mut client_b, key).await;
        assert_eq!(level(&get(&mut client_b, key).await), pb::HitLevel::L1);
    }
    assert_eq!(
        invalidate(&mut client_a, Selector::Key("plain".into())).await,
        1
    );
    assert_eq!(
        invalidate(&mut client_a, Selector::KeyPrefix("user:".into())).await,
        10
    );
    assert_eq!(
        invalidate(&mut client_a, Selector::Tag("user-1".into())).await,
        1
    );
    // Glob characters in a prefix are literal.
    assert_eq!(
        invalidate(&mut client_a, Selector::KeyPrefix("odd*[".into())).await,
        1
    );
    for key in ["plain", "user:3", "order:1", "odd*[key]"] {
        eventually(&format!("{key} gone from B"), || {
            let mut client = client_b.clone();
            async move { level(&get(&mut client, key).await) == pb::HitLevel::Miss }
        })
        .await;
        assert_eq!(level(&get(&mut client_a, key).await), pb::HitLevel::Miss);
    }
    assert_eq!(value(&get(&mut client_b, "order:2").await), "o");
    assert_eq!(
        invalidate(&mut client_b, Selector::Tag("orders".into())).await,
        1
    );
    eventually("order:2 gone from A", || {
        let mut client = client_a.clone();
        async move { level(&get(&mut client, "order:2").await) == pb::HitLevel::Miss }
    })
    .await;
    finish(&url, &settings, vec![a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_keep_each_others_l1_coherent() {
    let Some((url, settings, a, b)) = two_replicas(|_| {}).await else {
        return;
    };
    let mut client_a = a.client().await.unwrap();
    let mut client_b = b.client().await.unwrap();
    set(&mut client_a, "k", "v1", 60, &[]).await;
    assert_eq!(level(&get(&mut client_b, "k").await), pb::HitLevel::L2);
    // The L2 read refills B's L1. A's invalidation for its own set may
    // reach B after that read and drop the entry once (conservative, never
    // stale), so B serves v1 from L1 within a few reads, never anything else.
    eventually("B serves v1 from L1", || {
        let mut client = client_b.clone();
        async move {
            let cached = get(&mut client, "k").await;
            assert_eq!(value(&cached), "v1");
            level(&cached) == pb::HitLevel::L1
        }
    })
    .await;
    set(&mut client_a, "k", "v2", 60, &[]).await;
    eventually("B serves v2", || {
        let mut client = client_b.clone();
        async move { value(&get(&mut client, "k").await) == "v2" }
    })
    .await;
    // Once B has v2 it never goes back to v1.
    for _ in 0..20 {
        assert_eq!(value(&get(&mut client_b, "k").await), "v2");
    }
    client_b
        .delete(pb::DeleteRequest {
            namespace: NS.into(),
            key: "k".into(),
        })
        .await
        .unwrap();
    eventually("A drops k", || {
        let mut client = client_a.clone();
        async move { level(&get(&mut client, "k").await) == pb::HitLevel::Miss }
    })
    .await;
    finish(&url, &settings, vec![a, b]).await;
}

async fn lease(
    client: &mut Client,
    key: &str,
    lease_timeout: i64,
    max_wait: i64,
) -> pb::GetOrLeaseResponse {
    client
        .get_or_lease(pb::GetOrLeaseRequest {
            namespace: NS.into(),
            key: key.into(),
            lease_timeout: secs(lease_timeout),
            max_wait: secs(max_wait),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_callers_get_one_lease_and_one_value() {
    let Some((url, settings, a, b)) = two_replicas(|_| {}).await else {
        return;
    };
    let clients = [a.client().await.unwrap(), b.client().await.unwrap()];
    let granted = Arc::new(AtomicU32::new(0));
    let mut callers = tokio::task::JoinSet::new();
    for index in 0..100 {
        let mut client = clients[index % 2].clone();
        let granted = Arc::clone(&granted);
        callers.spawn(async move {
            let response = lease(&mut client, "cold", 10, 15).await;
            match pb::LeaseOutcome::try_from(response.outcome).unwrap() {
                pb::LeaseOutcome::Granted => {
                    granted.fetch_add(1, Ordering::SeqCst);
                    // The holder takes a while to compute the value.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let set = client
                        .set(pb::SetRequest {
                            namespace: NS.into(),
                            key: "cold".into(),
                            value: b"computed".to_vec(),
                            ttl: secs(60),
                            lease_token: Some(response.lease_token),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(set.lease_completed);
                    b"computed".to_vec()
                }
                pb::LeaseOutcome::Filled | pb::LeaseOutcome::Hit => response.entry.unwrap().value,
                other => panic!("caller {index} got {other:?}"),
            }
        });
    }
    let mut values = 0;
    while let Some(result) = callers.join_next().await {
        assert_eq!(result.unwrap(), b"computed");
        values += 1;
    }
    assert_eq!(values, 100);
    assert_eq!(granted.load(Ordering::SeqCst), 1);
    let mut totals = 0;
    for mut client in clients {
        totals += stats(&mut client).await.leases_granted;
    }
    assert_eq!(totals, 1);
    finish(&url, &settings, vec![a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_lease_passes_on() {
    let Some((url, settings, a, b)) = two_replicas(|_| {}).await else {
        return;
    };
    let mut client_a = a.client().await.unwrap();
    let mut client_b = b.client().await.unwrap();
    let first = lease(&mut client_a, "orphan", 1, 0).await;
    assert_eq!(first.outcome, pb::LeaseOutcome::Granted as i32);
    // The holder "dies": it never sets. Another replica's caller waits and
    // takes the lease over once it expires.
    let second = lease(&mut client_b, "orphan", 5, 10).await;
    assert_eq!(second.outcome, pb::LeaseOutcome::Granted as i32);
    assert!(millis_of(&second.waited) > 0);
    // The dead holder's token no longer writes anything.
    let late = client_a
        .set(pb::SetRequest {
            namespace: NS.into(),
            key: "orphan".into(),
            value: b"late".to_vec(),
            ttl: secs(60),
            lease_token: Some(first.lease_token),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert_eq!(
        level(&get(&mut client_a, "orphan").await),
        pb::HitLevel::Miss
    );
    let stats_b = stats(&mut client_b).await;
    assert_eq!(stats_b.lease_waits, 1);
    finish(&url, &settings, vec![a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_fetch_computes_once_for_concurrent_callers() {
    let Some((url, settings, a, b)) = two_replicas(|_| {}).await else {
        return;
    };
    let fetches = Arc::new(AtomicU32::new(0));
    let mut callers = tokio::task::JoinSet::new();
    for index in 0..20 {
        let endpoint = if index % 2 == 0 {
            a.endpoint()
        } else {
            b.endpoint()
        };
        let fetches = Arc::clone(&fetches);
        callers.spawn(async move {
            let cache = CacheClient::connect_lazy(&endpoint, &Default::default(), NS).unwrap();
            cache
                .get_or_fetch("report", Duration::from_secs(60), || async {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, std::convert::Infallible>(b"expensive".to_vec())
                })
                .await
                .unwrap()
        });
    }
    while let Some(result) = callers.join_next().await {
        assert_eq!(result.unwrap(), b"expensive");
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    finish(&url, &settings, vec![a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_then_recovers() {
    // Needs no external Redis: the test owns this one.
    let mut redis = match RedisProcess::start().await {
        Ok(redis) => redis,
        Err(error) => {
            assert!(
                std::env::var("AGENTMESH_TEST_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "{error}"
            );
            eprintln!("skipping: {error}");
            return;
        }
    };
    let mut settings = cache_settings(Some(&redis.url()));
    settings.cache.redis_timeout_ms = 200;
    let node = CacheNode::start(&settings).await.unwrap();
    let mut client = node.client().await.unwrap();
    wait_connected(&client).await;
    set(&mut client, "warm", "w", 300, &[]).await;

    // Load: reads of a warm key, reads of cold keys and writes, all the
    // time; any error (not a miss) fails the test.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let mut client = client.clone();
        let stop = stop.clone();
        load.spawn(async move {
            let mut calls = 0u64;
            while !stop.is_cancelled() {
                let key = format!("w{worker}:{}", calls % 50);
                client
                    .set(pb::SetRequest {
                        namespace: NS.into(),
                        key: key.clone(),
                        value: b"x".to_vec(),
                        ttl: secs(60),
                        ..Default::default()
                    })
                    .await?;
                client
                    .get(pb::GetRequest {
                        namespace: NS.into(),
                        key: format!("cold:{worker}:{calls}"),
                    })
                    .await?;
                client
                    .get(pb::GetRequest {
                        namespace: NS.into(),
                        key: "warm".into(),
                    })
                    .await?;
                calls += 1;
            }
            Ok::<u64, tonic::Status>(calls)
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill().await.unwrap();
    eventually("breaker opens", || {
        let mut client = client.clone();
        async move {
            let stats = stats(&mut client).await;
            stats.l2_mode == pb::L2Mode::Degraded as i32
                && stats.l2_breaker_state != CircuitState::Closed as i32
        }
    })
    .await;
    // Still answering from L1, health still SERVING.
    let warm = get(&mut client, "warm").await;
    assert_eq!(
        (level(&warm), value(&warm).as_str()),
        (pb::HitLevel::L1, "w")
    );
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(node.channel().await.unwrap());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: pb::SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert!(stats(&mut client).await.l2_errors > 0);
    tokio::time::sleep(Duration::from_millis(500)).await;

    redis.restart().await.unwrap();
    wait_connected(&client).await;
    // Entries that could have gone stale during the outage are gone (the
    // restarted Redis is empty and L1 was dropped on recovery).
    assert_eq!(level(&get(&mut client, "warm").await), pb::HitLevel::Miss);
    set(&mut client, "after", "a", 60, &[]).await;
    let second = CacheNode::start(&settings).await.unwrap();
    let mut client_second = second.client().await.unwrap();
    assert_eq!(
        level(&get(&mut client_second, "after").await),
        pb::HitLevel::L2
    );

    stop.cancel();
    while let Some(result) = load.join_next().await {
        let calls = result
            .unwrap()
            .expect("no call may fail while Redis restarts");
        assert!(calls > 0);
    }
    second.stop().await.unwrap();
    node.stop().await.unwrap();
}

fn violations(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|violation| violation.field.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_is_rejected_with_its_field() {
    let mut settings = cache_settings(None);
    settings.cache.max_value_bytes = 1024;
    settings.cache.max_key_bytes = 32;
    let node = CacheNode::start(&settings).await.unwrap();
    let mut client = node.client().await.unwrap();
    let good = pb::SetRequest {
        namespace: NS.into(),
        key: "k".into(),
        value: b"v".to_vec(),
        ttl: secs(60),
        ..Default::default()
    };
    let cases: Vec<(pb::SetRequest, &str)> = vec![
        (
            pb::SetRequest {
                namespace: "Bad NS".into(),
                ..good.clone()
            },
            "namespace",
        ),
        (
            pb::SetRequest {
                namespace: String::new(),
                ..good.clone()
            },
            "namespace",
        ),
        (
            pb::SetRequest {
                namespace: "n".repeat(65),
                ..good.clone()
            },
            "namespace",
        ),
        (
            pb::SetRequest {
                key: String::new(),
                ..good.clone()
            },
            "key",
        ),
        (
            pb::SetRequest {
                key: "k".repeat(33),
                ..good.clone()
            },
            "key",
        ),
        (
            pb::SetRequest {
                value: vec![0; 1025],
                ..good.clone()
            },
            "value",
        ),
        (
            pb::SetRequest {
                content_type: "c".repeat(129),
                ..good.clone()
            },
            "content_type",
        ),
        (
            pb::SetRequest {
                ttl: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 500,
                }),
                ..good.clone()
            },
            "ttl",
        ),
        (
            pb::SetRequest {
                ttl: secs(366 * 24 * 3600),
                ..good.clone()
            },
            "ttl",
        ),
        (
            pb::SetRequest {
                ttl: secs(-1),
                ..good.clone()
            },
            "ttl",
        ),
        (
            pb::SetRequest {
                tags: (0..17).map(|i| format!("t{i}")).collect(),
                ..good.clone()
            },
            "tags",
        ),
        (
            pb::SetRequest {
                tags: vec!["ok".into(), String::new()],
                ..good.clone()
            },
            "tags[1]",
        ),
        (
            pb::SetRequest {
                lease_token: Some("x".repeat(129)),
                ..good.clone()
            },
            "lease_token",
        ),
    ];
    for (request, field) in cases {
        let status = client.set(request).await.unwrap_err();
        assert_eq!(violations(&status), [field], "{status:?}");
    }
    // Every bad field at once.
    let status = client
        .set(pb::SetRequest {
            namespace: "UPPER".into(),
            key: String::new(),
            value: vec![0; 2000],
            ..good.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&status), ["namespace", "key", "value"]);
    // A value at the limit is fine.
    client
        .set(pb::SetRequest {
            value: vec![0; 1024],
            ..good.clone()
        })
        .await
        .unwrap();

    let status = client
        .get(pb::GetRequest {
            namespace: "ns".into(),
            key: "k".repeat(33),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&status), ["key"]);
    let status = client
        .invalidate(pb::InvalidateRequest {
            namespace: "ns".into(),
            selector: None,
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&status), ["selector"]);
    let status = client
        .invalidate(pb::InvalidateRequest {
            namespace: "ns".into(),
            selector: Some(pb::invalidate_request::Selector::Tag(String::new())),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&status), ["tag"]);
    let status = client
        .get_or_lease(pb::GetOrLeaseRequest {
            namespace: "ns".into(),
            key: "k".into(),
            lease_timeout: secs(301),
            max_wait: secs(31),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&status), ["lease_timeout", "max_wait"]);
    // A forged lease token is a precondition failure, not a write.
    let status = client
        .set(pb::SetRequest {
            lease_token: Some("lforged".into()),
            ..good.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    node.stop().await.unwrap();

    // The largest value the server accepts fits the message limit.
    let mut defaults = cache_settings(None);
    defaults.cache.max_value_bytes = defaults.server.max_message_bytes;
    let node = CacheNode::start(&defaults).await.unwrap();
    let mut client = node.client().await.unwrap();
    client
        .set(pb::SetRequest {
            value: vec![7; defaults.cache.max_value_bytes],
            ..good.clone()
        })
        .await
        .unwrap();
    let status = client
        .set(pb::SetRequest {
            value: vec![7; defaults.cache.max_value_bytes + 1],
            ..good
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&status), ["value"]);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_ttl_follows_the_config_service_live() {
    use agentmesh_proto::config as config_pb;
    let db = agentmesh_tests::TestDatabase::new(agentmesh_tests::Backend::Sqlite)
        .await
        .unwrap();
    let config = agentmesh_tests::ConfigNode::start(&db.settings)
        .await
        .unwrap();
    let mut settings = cache_settings(None);
    settings.endpoints.config = config.endpoint();
    let node = CacheNode::start(&settings).await.unwrap();
    let client = node.client().await.unwrap();
    config
        .client()
        .await
        .unwrap()
        .update(config_pb::UpdateRequest {
            scope: "global".into(),
            settings: Some(config_pb::Settings {
                cache: Some(config_pb::CacheSettings {
                    default_ttl_seconds: Some(77),
                }),
                ..Default::default()
            }),
            author: "tests".into(),
            reason: "shorter cache".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    eventually("Set without a TTL applies the new default", || {
        let mut client = client.clone();
        async move {
            let applied = client
                .set(pb::SetRequest {
                    namespace: NS.into(),
                    key: "k".into(),
                    value: b"v".to_vec(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            applied.ttl.unwrap().seconds == 77
        }
    })
    .await;
    node.stop().await.unwrap();
    config.stop().await.unwrap();
    db.cleanup().await;
}
