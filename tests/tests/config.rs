//! End-to-end tests of the config service over real gRPC, on SQLite and
//! PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use agentmesh_client::ConfigWatcher;
use agentmesh_proto::config::{self as pb, watch_response::Event};
use agentmesh_settings::LiveSettings;
use agentmesh_tests::{ConfigNode, TestDatabase, on_every_backend};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

fn agent(temperature: Option<f64>, max_tokens: Option<i64>) -> pb::Settings {
    pb::Settings {
        agent: Some(pb::AgentSettings {
            temperature,
            max_tokens,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn update(scope: &str, settings: pb::Settings) -> pb::UpdateRequest {
    pb::UpdateRequest {
        scope: scope.to_owned(),
        settings: Some(settings),
        author: "tests".to_owned(),
        reason: "testing".to_owned(),
        ..Default::default()
    }
}

fn source<'a>(response: &'a pb::GetEffectiveResponse, field: &str) -> &'a pb::ValueSource {
    response
        .sources
        .iter()
        .find(|source| source.field == field)
        .unwrap_or_else(|| panic!("no source for {field}"))
}

async fn effective_settings_merge_global_agent_project(db: &TestDatabase) -> anyhow::Result<()> {
    let node = ConfigNode::start(&db.settings).await?;
    let mut client = node.client().await?;

    // First boot seeded global from the bootstrap defaults.
    let global = client
        .get(pb::GetRequest {
            scope: "global".into(),
        })
        .await?
        .into_inner();
    let global_scope = global.scope_settings.unwrap_or_default();
    assert_eq!(global_scope.revision, 1);
    let seeded = global_scope
        .settings
        .unwrap_or_default()
        .agent
        .unwrap_or_default();
    assert_eq!(seeded.default_model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(seeded.temperature, Some(0.7));

    let coder = client
        .update(update("agent/coder", agent(Some(0.2), Some(2048))))
        .await?
        .into_inner();
    let coder_revision = coder.revision.unwrap_or_default().revision;
    assert!(coder_revision > 1);
    let project = client
        .update(update("project/p1", agent(Some(1.5), None)))
        .await?
        .into_inner();
    let project_revision = project.revision.unwrap_or_default().revision;
    assert!(project_revision > coder_revision, "revisions are monotonic");

    let both = client
        .get_effective(pb::GetEffectiveRequest {
            agent_type: "coder".into(),
            project_id: "p1".into(),
        })
        .await?
        .into_inner();
    let merged = both
        .settings
        .clone()
        .unwrap_or_default()
        .agent
        .unwrap_or_default();
    assert_eq!(merged.temperature, Some(1.5), "project wins over agent");
    assert_eq!(merged.max_tokens, Some(2048), "agent wins over global");
    assert_eq!(
        merged.default_model.as_deref(),
        Some("gpt-4o-mini"),
        "global fills the rest"
    );
    assert_eq!(source(&both, "agent.temperature").scope, "project/p1");
    assert_eq!(
        source(&both, "agent.temperature").revision,
        project_revision
    );
    assert_eq!(source(&both, "agent.max_tokens").scope, "agent/coder");
    assert_eq!(source(&both, "llm.pool_size").scope, "global");
    assert_eq!(both.head_revision, project_revision);

    let other_agent = client
        .get_effective(pb::GetEffectiveRequest {
            agent_type: "tester".into(),
            project_id: String::new(),
        })
        .await?
        .into_inner();
    let other = other_agent
        .settings
        .unwrap_or_default()
        .agent
        .unwrap_or_default();
    assert_eq!(
        other.temperature,
        Some(0.7),
        "other agents keep the global value"
    );

    // Clearing a field makes it inherited again.
    let mut clear = update("agent/coder", pb::Settings::default());
    clear.clear_fields = vec!["agent.max_tokens".into()];
    client.update(clear).await?;
    let cleared = client
        .get_effective(pb::GetEffectiveRequest {
            agent_type: "coder".into(),
            project_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(source(&cleared, "agent.max_tokens").scope, "global");
    assert_eq!(source(&cleared, "agent.temperature").scope, "agent/coder");
    node.stop().await
}
on_every_backend!(effective_settings_merge_global_agent_project);

async fn compare_and_set_conflict_writes_nothing(db: &TestDatabase) -> anyhow::Result<()> {
    let node = ConfigNode::start(&db.settings).await?;
    let mut client = node.client().await?;
    let mut first = update("agent/coder", agent(Some(0.3), None));
    first.expected_revision = Some(0);
    let written = client
        .update(first)
        .await?
        .into_inner()
        .revision
        .unwrap_or_default()
        .revision;

    let mut stale = update("agent/coder", agent(Some(0.9), None));
    stale.expected_revision = Some(0);
    let status = client.update(stale).await.expect_err("stale CAS must fail");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains(&format!("revision {written}")),
        "{}",
        status.message()
    );

    let current = client
        .get(pb::GetRequest {
            scope: "agent/coder".into(),
        })
        .await?
        .into_inner();
    let scope = current.scope_settings.unwrap_or_default();
    assert_eq!(scope.revision, written, "nothing was written");
    assert_eq!(
        scope
            .settings
            .unwrap_or_default()
            .agent
            .unwrap_or_default()
            .temperature,
        Some(0.3)
    );
    assert_eq!(current.head_revision, written);

    let mut fresh = update("agent/coder", agent(Some(0.9), None));
    fresh.expected_revision = Some(written);
    let next = client
        .update(fresh)
        .await?
        .into_inner()
        .revision
        .unwrap_or_default();
    assert!(next.revision > written);
    node.stop().await
}
on_every_backend!(compare_and_set_conflict_writes_nothing);

async fn every_validation_rule_names_its_field(db: &TestDatabase) -> anyhow::Result<()> {
    let node = ConfigNode::start(&db.settings).await?;
    let mut client = node.client().await?;
    let bad = |settings: pb::Settings| update("global", settings);
    let cases: Vec<(pb::UpdateRequest, &str)> = vec![
        (
            bad(pb::Settings {
                agent: Some(pb::AgentSettings {
                    default_model: Some(String::new()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "settings.agent.default_model",
        ),
        (bad(agent(Some(2.01), None)), "settings.agent.temperature"),
        (bad(agent(Some(-0.1), None)), "settings.agent.temperature"),
        (
            bad(agent(Some(f64::NAN), None)),
            "settings.agent.temperature",
        ),
        (
            bad(pb::Settings {
                agent: Some(pb::AgentSettings {
                    timeout_seconds: Some(301),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "settings.agent.timeout_seconds",
        ),
        (
            bad(pb::Settings {
                agent: Some(pb::AgentSettings {
                    timeout_seconds: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "settings.agent.timeout_seconds",
        ),
        (bad(agent(None, Some(0))), "settings.agent.max_tokens"),
        (
            bad(agent(None, Some(1_000_001))),
            "settings.agent.max_tokens",
        ),
        (
            bad(pb::Settings {
                breaker: Some(pb::BreakerSettings {
                    failure_threshold: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "settings.breaker.failure_threshold",
        ),
        (
            bad(pb::Settings {
                breaker: Some(pb::BreakerSettings {
                    reset_timeout_seconds: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "settings.breaker.reset_timeout_seconds",
        ),
        (
            bad(pb::Settings {
                cache: Some(pb::CacheSettings {
                    default_ttl_seconds: Some(-5),
                }),
                ..Default::default()
            }),
            "settings.cache.default_ttl_seconds",
        ),
        (
            bad(pb::Settings {
                retention: Some(pb::RetentionSettings {
                    artifact_max_age_hours: Some(0),
                }),
                ..Default::default()
            }),
            "settings.retention.artifact_max_age_hours",
        ),
        (
            bad(pb::Settings {
                batch: Some(pb::BatchSettings {
                    max_concurrency: Some(0),
                }),
                ..Default::default()
            }),
            "settings.batch.max_concurrency",
        ),
        (
            bad(pb::Settings {
                llm: Some(pb::LlmSettings {
                    pool_size: Some(5000),
                }),
                ..Default::default()
            }),
            "settings.llm.pool_size",
        ),
        (update("team/x", agent(Some(0.5), None)), "scope"),
        (update("agent/", agent(Some(0.5), None)), "scope"),
        (
            pb::UpdateRequest {
                author: String::new(),
                ..update("global", agent(Some(0.5), None))
            },
            "author",
        ),
        (
            pb::UpdateRequest {
                reason: "x".repeat(1025),
                ..update("global", agent(Some(0.5), None))
            },
            "reason",
        ),
        (update("global", pb::Settings::default()), "settings"),
        (
            pb::UpdateRequest {
                clear_fields: vec!["agent.colour".into()],
                ..update("global", pb::Settings::default())
            },
            "clear_fields[0]",
        ),
        (
            pb::UpdateRequest {
                clear_fields: vec!["agent.temperature".into()],
                ..update("global", agent(Some(0.5), None))
            },
            "clear_fields[0]",
        ),
    ];
    for (request, field) in cases {
        let status = client.update(request).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
        let details = status.get_error_details();
        let violations = details
            .bad_request()
            .map(|bad| bad.field_violations.clone())
            .unwrap_or_default();
        assert!(
            violations
                .iter()
                .any(|violation| violation.field == field && !violation.description.is_empty()),
            "{field}: {violations:?}"
        );
    }
    // Several bad fields are all reported at once.
    let mut many = update("global", agent(Some(9.0), Some(0)));
    many.author = String::new();
    let status = client.update(many).await.expect_err("three violations");
    let details = status.get_error_details();
    assert_eq!(
        details.bad_request().map(|bad| bad.field_violations.len()),
        Some(3)
    );
    // Nothing was written by any of them.
    let history = client
        .history(pb::HistoryRequest::default())
        .await?
        .into_inner();
    assert_eq!(history.revisions.len(), 1, "only the seed revision exists");

    let status = client
        .get_effective(pb::GetEffectiveRequest {
            agent_type: "bad type!".into(),
            project_id: String::new(),
        })
        .await
        .expect_err("bad agent type");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("agent_type"));
    let status = client
        .history(pb::HistoryRequest {
            page_size: 501,
            ..Default::default()
        })
        .await
        .expect_err("page too big");
    assert!(status.message().contains("page_size"));
    let status = client
        .history(pb::HistoryRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert!(status.message().contains("page_token"));
    node.stop().await
}
on_every_backend!(every_validation_rule_names_its_field);

async fn rollback_restores_old_values_as_a_new_revision(db: &TestDatabase) -> anyhow::Result<()> {
    let node = ConfigNode::start(&db.settings).await?;
    let mut client = node.client().await?;
    let good = client
        .update(update("project/p1", agent(Some(0.4), Some(100))))
        .await?
        .into_inner();
    let good_revision = good.revision.unwrap_or_default().revision;
    client
        .update(update("project/p1", agent(Some(1.9), Some(9000))))
        .await?;

    let rolled = client
        .rollback(pb::RollbackRequest {
            revision: good_revision,
            author: "oncall".into(),
            reason: "bad deploy".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .revision
        .unwrap_or_default();
    assert_eq!(rolled.kind, pb::ChangeKind::Rollback as i32);
    assert_eq!(rolled.rollback_of, good_revision);
    assert_eq!(rolled.scope, "project/p1");
    assert_eq!(rolled.author, "oncall");
    let mut changed = rolled.changed_fields.clone();
    changed.sort();
    assert_eq!(changed, ["agent.max_tokens", "agent.temperature"]);

    let now = client
        .get(pb::GetRequest {
            scope: "project/p1".into(),
        })
        .await?
        .into_inner();
    let scope = now.scope_settings.unwrap_or_default();
    assert_eq!(scope.revision, rolled.revision);
    let values = scope.settings.unwrap_or_default().agent.unwrap_or_default();
    assert_eq!(
        (values.temperature, values.max_tokens),
        (Some(0.4), Some(100))
    );

    let missing = client
        .rollback(pb::RollbackRequest {
            revision: 999_999,
            author: "x".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown revision");
    assert_eq!(missing.code(), Code::NotFound);

    // History pages newest first, with the rollback on top.
    let first = client
        .history(pb::HistoryRequest {
            scope: "project/p1".into(),
            page_size: 2,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(first.revisions.len(), 2);
    assert_eq!(first.revisions[0].revision, rolled.revision);
    assert!(!first.next_page_token.is_empty());
    let second = client
        .history(pb::HistoryRequest {
            scope: "project/p1".into(),
            page_size: 2,
            page_token: first.next_page_token,
        })
        .await?
        .into_inner();
    assert_eq!(second.revisions.len(), 1);
    assert_eq!(second.revisions[0].revision, good_revision);
    assert_eq!(second.revisions[0].reason, "testing");
    assert!(second.next_page_token.is_empty());
    node.stop().await
}
on_every_backend!(rollback_restores_old_values_as_a_new_revision);

async fn next_event(stream: &mut tonic::Streaming<pb::WatchResponse>) -> anyhow::Result<Event> {
    let message = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("watch stream ended"))??;
    message
        .event
        .ok_or_else(|| anyhow::anyhow!("empty watch event"))
}

async fn watch_sends_snapshot_then_changes_and_resumes(db: &TestDatabase) -> anyhow::Result<()> {
    let node = ConfigNode::start(&db.settings).await?;
    let mut client = node.client().await?;
    let mut stream = client
        .watch(pb::WatchRequest { from_revision: 0 })
        .await?
        .into_inner();
    let Event::Snapshot(snapshot) = next_event(&mut stream).await? else {
        anyhow::bail!("first event must be a snapshot");
    };
    assert_eq!(snapshot.revision, 1);
    assert!(!snapshot.resync);
    assert_eq!(snapshot.scopes.len(), 1);

    let written = client
        .update(update("agent/coder", agent(Some(0.1), None)))
        .await?
        .into_inner();
    let written = written.revision.unwrap_or_default().revision;
    let Event::Change(change) = next_event(&mut stream).await? else {
        anyhow::bail!("expected a change");
    };
    assert_eq!(change.revision, written);
    assert_eq!(change.scope, "agent/coder");
    assert_eq!(change.changed_fields, ["agent.temperature"]);
    drop(stream);

    // Resuming from a known revision replays what was missed, in order.
    let second = client
        .update(update("agent/coder", agent(Some(0.2), None)))
        .await?
        .into_inner();
    let third = client
        .update(update("project/x", agent(Some(0.3), None)))
        .await?
        .into_inner();
    let mut resumed = client
        .watch(pb::WatchRequest {
            from_revision: written,
        })
        .await?
        .into_inner();
    for expected in [second.revision, third.revision] {
        let Event::Change(change) = next_event(&mut resumed).await? else {
            anyhow::bail!("resume must replay changes, not a snapshot");
        };
        assert_eq!(
            Some(change.revision),
            expected.map(|revision| revision.revision)
        );
    }
    node.stop().await
}
on_every_backend!(watch_sends_snapshot_then_changes_and_resumes);

async fn slow_watcher_is_resynchronised_not_blocking_writers(
    db: &TestDatabase,
) -> anyhow::Result<()> {
    let mut settings = db.settings.clone();
    settings.config_service.watch_buffer = 4;
    let node = ConfigNode::start(&settings).await?;
    let mut client = node.client().await?;
    // A tiny HTTP/2 window, so the unread stream backs up into the server
    // quickly instead of into client buffers.
    let slow_channel = tonic::transport::Channel::from_shared(node.endpoint())?
        .initial_stream_window_size(1024)
        .initial_connection_window_size(1024)
        .connect()
        .await?;
    let mut slow_client = pb::config_service_client::ConfigServiceClient::new(slow_channel);
    let mut stream = slow_client
        .watch(pb::WatchRequest::default())
        .await?
        .into_inner();
    // Writers go ahead while the watcher reads nothing.
    let mut last = 0;
    for index in 0..100 {
        let written = client
            .update(update("agent/coder", agent(None, Some(100 + index))))
            .await?
            .into_inner();
        last = written.revision.unwrap_or_default().revision;
    }
    let mut saw_resync = false;
    let mut newest = 0;
    while newest < last {
        match next_event(&mut stream).await? {
            Event::Snapshot(snapshot) => {
                saw_resync |= snapshot.resync;
                newest = snapshot.revision;
            }
            Event::Change(change) => {
                assert!(change.revision > newest, "changes arrive in order");
                newest = change.revision;
            }
        }
    }
    assert!(
        saw_resync,
        "a watcher that fell behind gets a resync snapshot"
    );
    node.stop().await
}
on_every_backend!(slow_watcher_is_resynchronised_not_blocking_writers);

async fn config_watcher_keeps_snapshot_while_service_is_down(
    db: &TestDatabase,
) -> anyhow::Result<()> {
    let node = ConfigNode::start(&db.settings).await?;
    let address = node.address;
    let mut client = node.client().await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let watcher = ConfigWatcher::start(
        &node.endpoint(),
        &Default::default(),
        &LiveSettings::default(),
        &shutdown,
    )?;
    let written = client
        .update(update("agent/coder", agent(Some(0.25), None)))
        .await?
        .into_inner();
    let written = written.revision.unwrap_or_default().revision;
    assert!(
        watcher
            .wait_for_revision(written, Duration::from_secs(5))
            .await
    );
    assert_eq!(
        watcher.effective(Some("coder"), None).agent.temperature,
        0.25
    );

    node.stop().await?;
    let mut state = watcher.subscribe();
    tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|snapshot| !snapshot.connected),
    )
    .await??;
    assert_eq!(
        watcher.effective(Some("coder"), None).agent.temperature,
        0.25,
        "last snapshot kept"
    );

    // Same address, same database: the watcher reconnects and resumes.
    let mut settings = db.settings.clone();
    settings.ports.config = address.port();
    let listener = loop {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => break listener,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let restarted_shutdown = tokio_util::sync::CancellationToken::new();
    let readiness = agentmesh_runtime::Readiness::default();
    let restarted = tokio::spawn({
        let settings = settings.clone();
        let shutdown = restarted_shutdown.clone();
        async move { agentmesh_config::serve(&settings, listener, readiness, shutdown).await }
    });
    let channel = loop {
        if let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{address}"))?
            .connect()
            .await
        {
            break channel;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut client = pb::config_service_client::ConfigServiceClient::new(channel);
    let newer = client
        .update(update("agent/coder", agent(Some(0.75), None)))
        .await?
        .into_inner();
    let newer = newer.revision.unwrap_or_default().revision;
    assert!(
        watcher
            .wait_for_revision(newer, Duration::from_secs(10))
            .await,
        "watcher resumed"
    );
    assert_eq!(
        watcher.effective(Some("coder"), None).agent.temperature,
        0.75
    );
    assert!(watcher.snapshot().connected);
    shutdown.cancel();
    restarted_shutdown.cancel();
    restarted.await??;
    Ok(())
}
on_every_backend!(config_watcher_keeps_snapshot_while_service_is_down);

/// Two config processes on one PostgreSQL see each other's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgres_see_each_others_writes() -> anyhow::Result<()> {
    let Some(db) = TestDatabase::new(agentmesh_tests::Backend::Postgres).await else {
        return Ok(());
    };
    let result = async {
        let mut settings = db.settings.clone();
        settings.config_service.poll_interval_ms = 250;
        let first = ConfigNode::start(&settings).await?;
        let second = ConfigNode::start(&settings).await?;
        let mut second_client = second.client().await?;
        let mut watch = second_client
            .watch(pb::WatchRequest::default())
            .await?
            .into_inner();
        let Event::Snapshot(snapshot) = next_event(&mut watch).await? else {
            anyhow::bail!("expected a snapshot");
        };
        assert_eq!(
            snapshot.revision, 1,
            "the second replica did not seed again"
        );

        let mut first_client = first.client().await?;
        let written = first_client
            .update(update("agent/analyst", agent(Some(1.1), None)))
            .await?
            .into_inner();
        let written = written.revision.unwrap_or_default().revision;
        let Event::Change(change) = next_event(&mut watch).await? else {
            anyhow::bail!("expected the other replica's change");
        };
        assert_eq!(change.revision, written);
        let effective = second_client
            .get_effective(pb::GetEffectiveRequest {
                agent_type: "analyst".into(),
                project_id: String::new(),
            })
            .await?
            .into_inner();
        assert_eq!(
            effective
                .settings
                .unwrap_or_default()
                .agent
                .unwrap_or_default()
                .temperature,
            Some(1.1)
        );

        // Concurrent CAS writes through both replicas: exactly one wins.
        let mut request = update("agent/analyst", agent(Some(0.5), None));
        request.expected_revision = Some(written);
        let (a, b) = tokio::join!(
            first_client.update(request.clone()),
            second_client.update(request)
        );
        assert_eq!(a.is_ok() as u8 + b.is_ok() as u8, 1, "{a:?} / {b:?}");
        first.stop().await?;
        second.stop().await
    }
    .await;
    db.cleanup().await;
    result
}
