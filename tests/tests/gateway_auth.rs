//! End-to-end tests of the gateway's API keys, per-key rate limits and
//! per-project token budgets: real gateways (one or two replicas sharing a
//! database, and Redis when configured), a real config service and a real
//! agent node, all in-process over gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use agentmesh_proto::config as config_pb;
use agentmesh_proto::config::config_service_client::ConfigServiceClient;
use agentmesh_proto::gateway as pb;
use agentmesh_proto::gateway::gateway_service_client::GatewayServiceClient;
use agentmesh_proto::gateway::key_service_client::KeyServiceClient;
use agentmesh_settings::{AuthMode, Settings};
use agentmesh_tests::gateway_node::{AgentFleet, GatewayNode};
use agentmesh_tests::{ConfigNode, TestDatabase, on_every_backend};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

/// The bootstrap admin key of every test gateway.
const BOOTSTRAP: &str = "bootstrap-admin-key-for-the-tests-0123456789";
/// The hash secret every replica shares.
const HASH_SECRET: &str = "hash-secret-for-the-tests-0123456789abcdef";
/// Longest wait for something another replica or the config service does.
const POLL_LIMIT: Duration = Duration::from_secs(15);

/// A config service, one agent node and `replicas` gateways with API keys
/// required, all on one database.
struct Suite {
    fleet: AgentFleet,
    config: ConfigNode,
    gateways: Vec<GatewayNode>,
}

impl Suite {
    async fn start(
        db: &TestDatabase,
        replicas: usize,
        configure: impl Fn(&mut Settings),
    ) -> anyhow::Result<Self> {
        let fleet = AgentFleet::start(1, |_, _| {}).await?;
        let mut settings = db.settings.clone();
        configure(&mut settings);
        let config = ConfigNode::start(&settings).await?;
        settings.endpoints.config = config.endpoint();
        settings.gateway.agent_endpoints = fleet.endpoints.clone();
        settings.gateway.auth.mode = AuthMode::On;
        settings.gateway.auth.bootstrap_admin_key = Some(BOOTSTRAP.to_owned());
        settings.gateway.auth.hash_secret = Some(HASH_SECRET.to_owned());
        settings.gateway.auth.refresh_interval_ms = 200;
        settings.gateway.budget.flush_interval_ms = 50;
        settings.gateway.budget.usage_cache_ms = 100;
        let mut gateways = Vec::with_capacity(replicas);
        for index in 0..replicas {
            settings.gateway.gateway_id = Some(format!("gateway-{index}"));
            gateways.push(GatewayNode::start(&settings).await?);
        }
        Ok(Self {
            fleet,
            config,
            gateways,
        })
    }

    async fn gateway(&self, index: usize) -> anyhow::Result<GatewayServiceClient<Channel>> {
        self.gateways[index].client().await
    }

    async fn keys(&self, index: usize) -> anyhow::Result<KeyServiceClient<Channel>> {
        Ok(KeyServiceClient::new(self.gateways[index].channel().await?))
    }

    async fn config(&self) -> anyhow::Result<ConfigServiceClient<Channel>> {
        self.config.client().await
    }

    async fn stop(self) -> anyhow::Result<()> {
        for gateway in self.gateways {
            gateway.stop().await?;
        }
        self.config.stop().await?;
        self.fleet.shutdown().await
    }
}

fn with_key<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

fn task(project: &str) -> pb::TaskSpec {
    pb::TaskSpec {
        agent_type: "coder".to_owned(),
        variables: [("task".to_owned(), "add two numbers".to_owned())]
            .into_iter()
            .collect(),
        project_id: project.to_owned(),
        ..Default::default()
    }
}

async fn execute(
    client: &mut GatewayServiceClient<Channel>,
    key: &str,
    project: &str,
) -> Result<pb::ExecuteTaskResponse, Status> {
    client
        .execute_task(with_key(
            pb::ExecuteTaskRequest {
                task: Some(task(project)),
            },
            key,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// Creates a key with the bootstrap admin key; returns the key and its id.
async fn create_key(
    keys: &mut KeyServiceClient<Channel>,
    role: pb::ApiKeyRole,
    projects: &[&str],
) -> anyhow::Result<(String, String)> {
    let created = keys
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                name: format!("{role:?} key"),
                role: role as i32,
                projects: projects.iter().map(|p| (*p).to_owned()).collect(),
            },
            BOOTSTRAP,
        ))
        .await?
        .into_inner();
    let key = created.key.unwrap();
    Ok((created.secret, key.key_id))
}

async fn update_scope(
    config: &mut ConfigServiceClient<Channel>,
    scope: &str,
    settings: config_pb::Settings,
) -> anyhow::Result<()> {
    config
        .update(config_pb::UpdateRequest {
            scope: scope.to_owned(),
            settings: Some(settings),
            author: "gateway-auth-test".to_owned(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

fn day_budget(tokens: i64) -> config_pb::Settings {
    config_pb::Settings {
        budget: Some(config_pb::BudgetSettings {
            tokens_per_day: Some(tokens),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Calls `attempt` until it returns `Some`, at most [`POLL_LIMIT`].
async fn poll<T, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + POLL_LIMIT;
    loop {
        if let Some(value) = attempt().await? {
            return Ok(value);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {POLL_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_unauthenticated(status: &Status, words: &str) {
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains(words), "{words}: {status:?}");
}

async fn keys_and_projects_are_enforced(db: &TestDatabase) -> anyhow::Result<()> {
    let suite = Suite::start(db, 1, |_| {}).await?;
    let mut gateway = suite.gateway(0).await?;
    let mut keys = suite.keys(0).await?;

    // No key, a bad scheme, a bad shape, a well-formed unknown key.
    let status = gateway
        .execute_task(pb::ExecuteTaskRequest {
            task: Some(task("p1")),
        })
        .await
        .unwrap_err();
    assert_unauthenticated(&status, "missing API key");
    let mut basic = Request::new(pb::ExecuteTaskRequest {
        task: Some(task("p1")),
    });
    basic
        .metadata_mut()
        .insert("authorization", "Basic dXNlcjpwdw==".parse()?);
    let status = gateway.execute_task(basic).await.unwrap_err();
    assert_unauthenticated(&status, "malformed authorization");
    let status = execute(&mut gateway, "not-a-key", "p1").await.unwrap_err();
    assert_unauthenticated(&status, "malformed API key");
    let unknown = format!("amk_{}_{}", "0".repeat(16), "A".repeat(43));
    let status = execute(&mut gateway, &unknown, "p1").await.unwrap_err();
    assert_unauthenticated(&status, "unknown API key amk_0000000000000000");
    // The key service is behind the same check.
    let status = keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .unwrap_err();
    assert_unauthenticated(&status, "missing API key");
    // Health is not.
    let health =
        tonic_health::pb::health_client::HealthClient::new(suite.gateways[0].channel().await?)
            .check(tonic_health::pb::HealthCheckRequest {
                service: agentmesh_proto::gateway::KEY_SERVICE_NAME.to_owned(),
            })
            .await?
            .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // A user key of p1 and p2 runs their tasks, and no other project's.
    let (user, user_id) = create_key(&mut keys, pb::ApiKeyRole::User, &["p1", "p2"]).await?;
    assert!(user.starts_with(&format!("amk_{user_id}_")), "{user}");
    let response = execute(&mut gateway, &user, "p1").await?;
    assert!(response.output.starts_with("[local offline provider]"));
    execute(&mut gateway, &user, "p2").await?;
    let status = execute(&mut gateway, &user, "p3").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("\"p3\""), "{status:?}");
    assert!(status.message().contains(&user_id), "{status:?}");
    let status = gateway
        .execute_task_stream(with_key(
            pb::ExecuteTaskStreamRequest {
                task: Some(task("p3")),
            },
            &user,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = gateway
        .execute_batch(with_key(
            pb::ExecuteBatchRequest {
                tasks: vec![task("p1"), task("p3")],
                max_concurrency: None,
            },
            &user,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().starts_with("tasks[1]: "), "{status:?}");
    let batch = gateway
        .execute_batch(with_key(
            pb::ExecuteBatchRequest {
                tasks: vec![task("p1"), task("p2")],
                max_concurrency: None,
            },
            &user,
        ))
        .await?
        .into_inner();
    assert_eq!(batch.results.len(), 2);

    // Admin-only calls with a user key.
    let status = keys
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                name: "escalation".into(),
                role: pb::ApiKeyRole::Admin as i32,
                projects: vec![],
            },
            &user,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("CreateApiKey"), "{status:?}");
    for status in [
        keys.list_api_keys(with_key(pb::ListApiKeysRequest::default(), &user))
            .await
            .unwrap_err(),
        keys.revoke_api_key(with_key(
            pb::RevokeApiKeyRequest {
                key_id: user_id.clone(),
            },
            &user,
        ))
        .await
        .unwrap_err(),
        gateway
            .get_circuit_states(with_key(pb::GetCircuitStatesRequest {}, &user))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("needs an admin key"),
            "{status:?}"
        );
    }
    // Usage is readable for the key's own projects only.
    keys.get_project_usage(with_key(
        pb::GetProjectUsageRequest {
            project_id: "p1".into(),
        },
        &user,
    ))
    .await?;
    let status = keys
        .get_project_usage(with_key(
            pb::GetProjectUsageRequest {
                project_id: "p3".into(),
            },
            &user,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // An admin key made by the bootstrap key manages keys itself.
    let (admin, admin_id) = create_key(&mut keys, pb::ApiKeyRole::Admin, &[]).await?;
    let listed = keys
        .list_api_keys(with_key(pb::ListApiKeysRequest::default(), &admin))
        .await?
        .into_inner();
    let ids: Vec<_> = listed.keys.iter().map(|key| key.key_id.as_str()).collect();
    let mut expected = vec![user_id.as_str(), admin_id.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected);
    let listed_user = listed
        .keys
        .iter()
        .find(|key| key.key_id == user_id)
        .unwrap();
    assert_eq!(listed_user.projects, ["p1", "p2"]);
    assert_eq!(listed_user.role, pb::ApiKeyRole::User as i32);
    assert_eq!(listed_user.created_by, "bootstrap");
    assert!(listed_user.revoked_at.is_none());
    let admin_entry = listed
        .keys
        .iter()
        .find(|key| key.key_id == admin_id)
        .unwrap();
    assert_eq!(admin_entry.projects, ["*"]);
    // Pages of one.
    let first = keys
        .list_api_keys(with_key(
            pb::ListApiKeysRequest {
                page_size: 1,
                ..Default::default()
            },
            &admin,
        ))
        .await?
        .into_inner();
    assert_eq!(first.keys.len(), 1);
    assert!(!first.next_page_token.is_empty());
    let second = keys
        .list_api_keys(with_key(
            pb::ListApiKeysRequest {
                page_size: 1,
                page_token: first.next_page_token,
                ..Default::default()
            },
            &admin,
        ))
        .await?
        .into_inner();
    assert_eq!(second.keys.len(), 1);
    assert_ne!(second.keys[0].key_id, first.keys[0].key_id);
    assert!(second.next_page_token.is_empty());
    // Bad requests name the field.
    let status = keys
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                name: "no projects".into(),
                role: pb::ApiKeyRole::User as i32,
                projects: vec![],
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status
            .get_error_details()
            .bad_request()
            .unwrap()
            .field_violations[0]
            .field,
        "projects"
    );
    let status = keys
        .revoke_api_key(with_key(
            pb::RevokeApiKeyRequest {
                key_id: "f".repeat(16),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    // Revoked: refused at once on this replica, and listed as revoked.
    let revoked = keys
        .revoke_api_key(with_key(
            pb::RevokeApiKeyRequest {
                key_id: user_id.clone(),
            },
            &admin,
        ))
        .await?
        .into_inner()
        .key
        .unwrap();
    assert!(revoked.revoked_at.is_some());
    let status = execute(&mut gateway, &user, "p1").await.unwrap_err();
    assert_unauthenticated(&status, &format!("API key {user_id} was revoked at"));
    let active = keys
        .list_api_keys(with_key(pb::ListApiKeysRequest::default(), &admin))
        .await?
        .into_inner();
    assert_eq!(active.keys.len(), 1, "revoked keys are left out by default");
    let all = keys
        .list_api_keys(with_key(
            pb::ListApiKeysRequest {
                include_revoked: true,
                ..Default::default()
            },
            &admin,
        ))
        .await?
        .into_inner();
    assert_eq!(all.keys.len(), 2);
    suite.stop().await
}
on_every_backend!(keys_and_projects_are_enforced);

async fn a_key_revoked_on_one_replica_is_refused_by_the_other(
    db: &TestDatabase,
) -> anyhow::Result<()> {
    let suite = Suite::start(db, 2, |_| {}).await?;
    let mut on_a = suite.gateway(0).await?;
    let on_b = suite.gateway(1).await?;
    let mut keys_a = suite.keys(0).await?;
    let (key, key_id) = create_key(&mut keys_a, pb::ApiKeyRole::User, &["p1"]).await?;
    execute(&mut on_a, &key, "p1").await?;
    // B learns of the new key from the database.
    poll("the key created on A works on B", || {
        let mut on_b = on_b.clone();
        let key = key.clone();
        async move { Ok(execute(&mut on_b, &key, "p1").await.ok()) }
    })
    .await?;
    keys_a
        .revoke_api_key(with_key(
            pb::RevokeApiKeyRequest {
                key_id: format!("amk_{key_id}"),
            },
            BOOTSTRAP,
        ))
        .await?;
    let status = execute(&mut on_a, &key, "p1").await.unwrap_err();
    assert_unauthenticated(&status, "was revoked at");
    let status = poll("the key revoked on A is refused by B", || {
        let mut on_b = on_b.clone();
        let key = key.clone();
        async move { Ok(execute(&mut on_b, &key, "p1").await.err()) }
    })
    .await?;
    assert_unauthenticated(&status, &format!("API key {key_id} was revoked at"));
    drop(on_b);
    suite.stop().await
}
on_every_backend!(a_key_revoked_on_one_replica_is_refused_by_the_other);

async fn the_rate_limit_refuses_with_retry_info_and_follows_live_overrides(
    db: &TestDatabase,
) -> anyhow::Result<()> {
    // One call per second with a bucket of 3 for user keys, from the start.
    let suite = Suite::start(db, 1, |settings| {
        settings.defaults.limits.user_rps = 1;
        settings.defaults.limits.user_burst = 3;
    })
    .await?;
    let mut gateway = suite.gateway(0).await?;
    let mut keys = suite.keys(0).await?;
    let (key, key_id) = create_key(&mut keys, pb::ApiKeyRole::User, &["p1"]).await?;
    let mut served = 0;
    let refused = loop {
        match execute(&mut gateway, &key, "p1").await {
            Ok(_) => served += 1,
            Err(status) => break status,
        }
        assert!(served < 50, "never refused");
    };
    assert!(served >= 3, "the burst of 3 passes first: {served}");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains(&format!(
            "rate limit of API key {key_id} exceeded (1 requests/s, burst 3)"
        )),
        "{refused:?}"
    );
    let details = refused.get_error_details();
    let delay = details.retry_info().unwrap().retry_delay.unwrap();
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "{delay:?}"
    );
    let quota = details.quota_failure().unwrap();
    assert_eq!(quota.violations[0].subject, format!("api_key:{key_id}"));
    // The bootstrap admin key has its own (admin) bucket.
    execute(&mut gateway, BOOTSTRAP, "p1").await?;

    // A live override for this key in its config scope lifts the limit.
    let mut config = suite.config().await?;
    update_scope(
        &mut config,
        &format!("key/{key_id}"),
        config_pb::Settings {
            limits: Some(config_pb::LimitsSettings {
                user_rps: Some(1000),
                user_burst: Some(1000),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await?;
    poll("the override applies", || {
        let mut gateway = gateway.clone();
        let key = key.clone();
        async move {
            for _ in 0..10 {
                if execute(&mut gateway, &key, "p1").await.is_err() {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        }
    })
    .await?;
    suite.stop().await
}
on_every_backend!(the_rate_limit_refuses_with_retry_info_and_follows_live_overrides);

async fn a_project_over_its_budget_is_refused_with_the_details(
    db: &TestDatabase,
) -> anyhow::Result<()> {
    let suite = Suite::start(db, 1, |_| {}).await?;
    let mut gateway = suite.gateway(0).await?;
    let mut keys = suite.keys(0).await?;
    let mut config = suite.config().await?;
    update_scope(&mut config, "project/tight", day_budget(1)).await?;
    update_scope(
        &mut config,
        "project/monthly",
        config_pb::Settings {
            budget: Some(config_pb::BudgetSettings {
                tokens_per_month: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await?;
    // Once the gateway has the budget, the first task uses it up and the
    // next is refused.
    let refused = poll("the daily budget refuses", || {
        let mut gateway = gateway.clone();
        async move { Ok(execute(&mut gateway, BOOTSTRAP, "tight").await.err()) }
    })
    .await?;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let message = refused.message();
    assert!(
        message.starts_with("project \"tight\" has used its daily token budget: "),
        "{message}"
    );
    assert!(
        message.contains("of 1 tokens (budget.tokens_per_day)"),
        "{message}"
    );
    let tomorrow = (chrono::Utc::now().date_naive() + chrono::Days::new(1)).format("%Y-%m-%d");
    assert!(
        message.ends_with(&format!("it resets at {tomorrow}T00:00:00Z")),
        "{message}"
    );
    let details = refused.get_error_details();
    let quota = details.quota_failure().unwrap();
    assert_eq!(quota.violations[0].subject, "project:tight");
    assert_eq!(quota.violations[0].description, "budget.tokens_per_day");
    let delay = details.retry_info().unwrap().retry_delay.unwrap();
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(24 * 3600),
        "{delay:?}"
    );
    // Streams and batch tasks of the project are refused too; others run.
    let status = gateway
        .execute_task_stream(with_key(
            pb::ExecuteTaskStreamRequest {
                task: Some(task("tight")),
            },
            BOOTSTRAP,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let batch = gateway
        .execute_batch(with_key(
            pb::ExecuteBatchRequest {
                tasks: vec![task("tight"), task("roomy")],
                max_concurrency: None,
            },
            BOOTSTRAP,
        ))
        .await?
        .into_inner();
    match &batch.results[0].result {
        Some(pb::task_result::Result::Error(error)) => {
            assert_eq!(error.code, Code::ResourceExhausted as i32, "{error:?}");
        }
        other => panic!("the tight task ran: {other:?}"),
    }
    assert!(matches!(
        batch.results[1].result,
        Some(pb::task_result::Result::Response(_))
    ));
    let roomy = execute(&mut gateway, BOOTSTRAP, "roomy").await?;
    let roomy_tokens = roomy.usage.unwrap().total_tokens;
    assert!(roomy_tokens > 0);

    // The monthly budget names itself.
    let refused = poll("the monthly budget refuses", || {
        let mut gateway = gateway.clone();
        async move { Ok(execute(&mut gateway, BOOTSTRAP, "monthly").await.err()) }
    })
    .await?;
    assert!(
        refused.message().contains("monthly token budget")
            && refused.message().contains("budget.tokens_per_month"),
        "{refused:?}"
    );

    // Usage per project, with the budget and when it resets.
    let usage = poll("usage of roomy is counted", || {
        let mut keys = keys.clone();
        async move {
            let usage = keys
                .get_project_usage(with_key(
                    pb::GetProjectUsageRequest {
                        project_id: "roomy".into(),
                    },
                    BOOTSTRAP,
                ))
                .await?
                .into_inner();
            let day = usage.day.clone().unwrap();
            // Two tasks of roomy ran (one in the batch, one alone).
            Ok((day.tokens_used == 2 * roomy_tokens as u64).then_some(usage))
        }
    })
    .await?;
    let day = usage.day.unwrap();
    assert_eq!(day.tokens_limit, 0);
    assert_eq!(
        day.period,
        chrono::Utc::now().format("%Y-%m-%d").to_string()
    );
    let month = usage.month.unwrap();
    assert!(month.tokens_used >= day.tokens_used);
    let tight = keys
        .get_project_usage(with_key(
            pb::GetProjectUsageRequest {
                project_id: "tight".into(),
            },
            BOOTSTRAP,
        ))
        .await?
        .into_inner();
    let tight_day = tight.day.unwrap();
    assert_eq!(tight_day.tokens_limit, 1);
    assert!(tight_day.tokens_used >= 1);
    assert!(tight_day.resets_at.is_some());
    suite.stop().await
}
on_every_backend!(a_project_over_its_budget_is_refused_with_the_details);

/// Usage counted by gateway A counts against gateway B's budget checks.
async fn budget_shared_by_two_replicas(
    settings_redis: Option<String>,
    db: &TestDatabase,
) -> anyhow::Result<()> {
    let prefix = format!("t{}:budget:", uuid::Uuid::new_v4().simple());
    let suite = Suite::start(db, 2, |settings| {
        settings.redis_url = settings_redis.clone();
        settings.gateway.budget.redis_key_prefix = prefix.clone();
    })
    .await?;
    let mut on_a = suite.gateway(0).await?;
    let mut on_b = suite.gateway(1).await?;
    let keys_b = suite.keys(1).await?;
    let mut config = suite.config().await?;
    // Room for exactly one task: its tokens, counted on A, exhaust it.
    let probe = execute(&mut on_a, BOOTSTRAP, "probe").await?;
    let tokens = probe.usage.unwrap().total_tokens;
    assert!(tokens > 0);
    update_scope(&mut config, "project/shared", day_budget(tokens)).await?;
    // Wait until both gateways have the budget (each refuses a project at
    // the limit): use a second project with a zero-room budget for that.
    update_scope(&mut config, "project/marker", day_budget(1)).await?;
    for client in [&mut on_a, &mut on_b] {
        execute(client, BOOTSTRAP, "marker").await.ok();
        poll("the budgets reached the gateway", || {
            let mut client = client.clone();
            async move { Ok(execute(&mut client, BOOTSTRAP, "marker").await.err()) }
        })
        .await?;
    }
    execute(&mut on_a, BOOTSTRAP, "shared").await?;
    // B sees A's usage in the shared store...
    poll("B reads the usage counted by A", || {
        let mut keys_b = keys_b.clone();
        async move {
            let usage = keys_b
                .get_project_usage(with_key(
                    pb::GetProjectUsageRequest {
                        project_id: "shared".into(),
                    },
                    BOOTSTRAP,
                ))
                .await?
                .into_inner();
            Ok((usage.day.unwrap().tokens_used >= tokens as u64).then_some(()))
        }
    })
    .await?;
    // ...and refuses the project on it, having run none of its tasks.
    let refused = execute(&mut on_b, BOOTSTRAP, "shared").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains(&format!(": {tokens} of {tokens} tokens")),
        "{refused:?}"
    );
    let usage_on_a = suite
        .keys(0)
        .await?
        .get_project_usage(with_key(
            pb::GetProjectUsageRequest {
                project_id: "shared".into(),
            },
            BOOTSTRAP,
        ))
        .await?
        .into_inner();
    assert_eq!(usage_on_a.day.unwrap().tokens_used, tokens as u64);
    suite.stop().await?;
    if let Some(url) = &settings_redis {
        agentmesh_tests::cache::remove_prefix(url, &prefix).await?;
    }
    Ok(())
}

async fn budget_shared_by_two_replicas_in_the_database(db: &TestDatabase) -> anyhow::Result<()> {
    budget_shared_by_two_replicas(None, db).await
}
on_every_backend!(budget_shared_by_two_replicas_in_the_database);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_shared_by_two_replicas_in_redis() -> anyhow::Result<()> {
    let Some(url) = agentmesh_tests::cache::redis_url().await else {
        return Ok(());
    };
    let db = TestDatabase::new(agentmesh_tests::Backend::Sqlite)
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))?;
    let result = budget_shared_by_two_replicas(Some(url), &db).await;
    db.cleanup().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_off_on_a_loopback_gateway_runs_every_call_as_admin() -> anyhow::Result<()> {
    let db = TestDatabase::new(agentmesh_tests::Backend::Sqlite)
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))?;
    let fleet = AgentFleet::start(1, |_, _| {}).await?;
    let mut settings = db.settings.clone();
    settings.endpoints.config = "http://127.0.0.1:1".to_owned();
    settings.gateway.agent_endpoints = fleet.endpoints.clone();
    // The default: auto, which is off on loopback.
    let gateway = GatewayNode::start(&settings).await?;
    let mut client = gateway.client().await?;
    client
        .execute_task(pb::ExecuteTaskRequest {
            task: Some(task("any")),
        })
        .await?;
    client
        .get_circuit_states(pb::GetCircuitStatesRequest {})
        .await?;
    let mut keys = KeyServiceClient::new(gateway.channel().await?);
    let created = keys
        .create_api_key(pb::CreateApiKeyRequest {
            name: "prepared".into(),
            role: pb::ApiKeyRole::User as i32,
            projects: vec!["p1".into()],
        })
        .await?
        .into_inner();
    assert_eq!(created.key.unwrap().created_by, "anonymous");
    gateway.stop().await?;
    fleet.shutdown().await?;
    db.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_tasks_are_allowed_counted_locally_and_written_later() -> anyhow::Result<()>
{
    let mut redis = agentmesh_tests::cache::RedisProcess::start().await?;
    let db = TestDatabase::new(agentmesh_tests::Backend::Sqlite)
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot create a temp dir"))?;
    let url = redis.url();
    let suite = Suite::start(&db, 1, |settings| {
        settings.redis_url = Some(url.clone());
        settings.gateway.budget.store_timeout_ms = 300;
    })
    .await?;
    let mut gateway = suite.gateway(0).await?;
    let mut keys = suite.keys(0).await?;
    let mut config = suite.config().await?;
    update_scope(&mut config, "project/capped", day_budget(1)).await?;
    update_scope(&mut config, "project/marker", day_budget(1)).await?;
    execute(&mut gateway, BOOTSTRAP, "marker").await.ok();
    poll("the budgets reached the gateway", || {
        let mut gateway = gateway.clone();
        async move { Ok(execute(&mut gateway, BOOTSTRAP, "marker").await.err()) }
    })
    .await?;

    redis.kill().await?;
    // The counter store is gone: a project under its budget still runs...
    let served = execute(&mut gateway, BOOTSTRAP, "capped").await?;
    let tokens = served.usage.unwrap().total_tokens as u64;
    execute(&mut gateway, BOOTSTRAP, "free").await?;
    // ...its own usage still counts against the budget here...
    let status = execute(&mut gateway, BOOTSTRAP, "capped")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // ...and reading usage says the store is unavailable.
    let status = keys
        .get_project_usage(with_key(
            pb::GetProjectUsageRequest {
                project_id: "free".into(),
            },
            BOOTSTRAP,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("redis"), "{status:?}");

    // Redis is back (empty): the usage counted meanwhile is written.
    redis.restart().await?;
    let client = redis::Client::open(redis.url())?;
    let day_key = format!(
        "agentmesh:budget:d:{}:free",
        chrono::Utc::now().format("%Y-%m-%d")
    );
    let stored = poll("usage counted while Redis was down is written", || {
        let client = client.clone();
        let day_key = day_key.clone();
        async move {
            let mut connection = client.get_multiplexed_async_connection().await?;
            let stored: Option<u64> = redis::cmd("GET")
                .arg(&day_key)
                .query_async(&mut connection)
                .await?;
            Ok(stored)
        }
    })
    .await?;
    assert_eq!(stored, tokens);
    suite.stop().await?;
    db.cleanup().await;
    Ok(())
}
