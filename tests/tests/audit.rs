//! The audit service end to end over gRPC, on SQLite and PostgreSQL:
//! appends and idempotency, all-or-nothing batches, queries, concurrent
//! appenders, two services on one database, and tampering by direct SQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use agentmesh_audit::chain::{self, Timestamp};
use agentmesh_db::Database;
use agentmesh_proto::audit as pb;
use agentmesh_proto::audit::audit_service_client::AuditServiceClient;
use agentmesh_tests::audit::AuditNode;
use agentmesh_tests::{TestDatabase, on_every_backend};
use prost_types::value::Kind;
use sea_orm::{ConnectionTrait, Statement};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

type Client = AuditServiceClient<Channel>;

fn event(id: &str, action: &str) -> pb::Event {
    pb::Event {
        event_id: id.to_owned(),
        occurred_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        agent_type: "coder".into(),
        action: action.into(),
        user_id: "alice".into(),
        project_id: "p1".into(),
        workflow_id: String::new(),
        trace_id: String::new(),
        outcome: pb::Outcome::Success as i32,
        context: Some(prost_types::Struct {
            fields: [(
                "note".to_owned(),
                prost_types::Value {
                    kind: Some(Kind::StringValue(format!("about {id}"))),
                },
            )]
            .into_iter()
            .collect(),
        }),
    }
}

async fn append(
    client: &mut Client,
    event: pb::Event,
) -> Result<pb::AppendResponse, tonic::Status> {
    client
        .append(pb::AppendRequest { event: Some(event) })
        .await
        .map(tonic::Response::into_inner)
}

async fn verify(client: &mut Client, from: u64, to: u64) -> pb::VerifyResponse {
    client
        .verify(pb::VerifyRequest {
            from_sequence: from,
            to_sequence: to,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn query_all(client: &mut Client, mut request: pb::QueryRequest) -> Vec<pb::Entry> {
    let mut entries = Vec::new();
    loop {
        let page = client.query(request.clone()).await.unwrap().into_inner();
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            return entries;
        }
        request.page_token = page.next_page_token;
    }
}

async fn execute(database: &Database, sql: &str) {
    database
        .writer()
        .execute_raw(Statement::from_string(database.backend(), sql.to_owned()))
        .await
        .unwrap();
}

async fn appends_are_idempotent_queryable_and_verified(db: &TestDatabase) -> anyhow::Result<()> {
    let node = AuditNode::start(&db.settings).await?;
    let mut client = node.client().await?;

    let empty = verify(&mut client, 0, 0).await;
    assert!(empty.ok && empty.entries_checked == 0, "{empty:?}");
    let missing = client
        .get_checkpoint(pb::GetCheckpointRequest { sequence: 0 })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let first = append(&mut client, event("e1", "task.execute")).await?;
    let entry = first.entry.unwrap();
    assert!(!first.duplicate);
    assert_eq!(entry.sequence, 1);
    assert_eq!(entry.prev_hash, vec![0; 32]);
    assert_eq!(
        entry.context_hash,
        chain::sha256(br#"{"note":"about e1"}"#).to_vec()
    );

    // A retry returns the original; different content is a conflict.
    let retry = append(&mut client, event("e1", "task.execute")).await?;
    assert!(retry.duplicate);
    assert_eq!(retry.entry.unwrap(), entry);
    let conflict = append(&mut client, event("e1", "other.action"))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists, "{conflict:?}");

    // The incoming trace fills an empty trace id.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut traced = tonic::Request::new(pb::AppendRequest {
        event: Some(event("e2", "config.write")),
    });
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-b7ad6b7169203331-01").parse()?,
    );
    let traced = client.append(traced).await?.into_inner().entry.unwrap();
    assert_eq!(traced.event.unwrap().trace_id, trace_id);

    let batch = client
        .append_batch(pb::AppendBatchRequest {
            events: (3..=12)
                .map(|i| {
                    let mut e = event(&format!("e{i}"), "task.execute");
                    e.user_id = if i % 2 == 0 { "bob" } else { "carol" }.into();
                    e
                })
                .chain([event("e1", "task.execute")])
                .collect(),
        })
        .await?
        .into_inner();
    let sequences: Vec<_> = batch
        .results
        .iter()
        .map(|r| (r.entry.as_ref().unwrap().sequence, r.duplicate))
        .collect();
    assert_eq!(sequences[0], (3, false));
    assert_eq!(sequences[9], (12, false));
    assert_eq!(sequences[10], (1, true));

    // Filters, order and paging.
    let bobs = query_all(
        &mut client,
        pb::QueryRequest {
            user_id: "bob".into(),
            order: pb::Order::OldestFirst as i32,
            page_size: 2,
            ..Default::default()
        },
    )
    .await;
    let bob_sequences: Vec<_> = bobs.iter().map(|e| e.sequence).collect();
    assert_eq!(bob_sequences, [4, 6, 8, 10, 12]);
    let newest = client
        .query(pb::QueryRequest {
            page_size: 3,
            ..Default::default()
        })
        .await?
        .into_inner();
    let newest_sequences: Vec<_> = newest.entries.iter().map(|e| e.sequence).collect();
    assert_eq!(newest_sequences, [12, 11, 10]);
    let by_trace = query_all(
        &mut client,
        pb::QueryRequest {
            trace_id: trace_id.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_trace.len(), 1);
    let none_in_window = query_all(
        &mut client,
        pb::QueryRequest {
            start_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_001,
                nanos: 0,
            }),
            ..Default::default()
        },
    )
    .await;
    assert!(none_in_window.is_empty());
    let wrong_token = client
        .query(pb::QueryRequest {
            user_id: "carol".into(),
            page_token: newest.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(wrong_token.code(), Code::InvalidArgument);

    let report = verify(&mut client, 0, 0).await;
    assert!(report.ok, "{report:?}");
    assert_eq!((report.entries_checked, report.to_sequence), (12, 12));
    let beyond = client
        .verify(pb::VerifyRequest {
            from_sequence: 1,
            to_sequence: 99,
        })
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), Code::InvalidArgument);

    // The latest checkpoint covers the head and its signature verifies.
    let checkpoint = client
        .get_checkpoint(pb::GetCheckpointRequest { sequence: 0 })
        .await?
        .into_inner()
        .checkpoint
        .unwrap();
    assert_eq!(checkpoint.sequence, 12);
    assert_eq!(checkpoint.entry_hash, report.last_entry_hash);
    node.stop().await
}
on_every_backend!(appends_are_idempotent_queryable_and_verified);

async fn a_rejected_batch_leaves_nothing_behind(db: &TestDatabase) -> anyhow::Result<()> {
    let node = AuditNode::start(&db.settings).await?;
    let mut client = node.client().await?;
    let mut nan = event("b2", "x");
    nan.context = Some(prost_types::Struct {
        fields: [(
            "score".to_owned(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        )]
        .into_iter()
        .collect(),
    });
    let mut no_action = event("b3", "");
    no_action.occurred_at = None;
    let mut huge = event("b4", "x");
    huge.context = Some(prost_types::Struct {
        fields: [(
            "blob".to_owned(),
            prost_types::Value {
                kind: Some(Kind::StringValue("x".repeat(70_000))),
            },
        )]
        .into_iter()
        .collect(),
    });
    let status = client
        .append_batch(pb::AppendBatchRequest {
            events: vec![event("b1", "ok"), nan, no_action, huge],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    let fields: Vec<_> = details
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(
        fields,
        [
            "events[1].context.score",
            "events[2].action",
            "events[2].occurred_at",
            "events[3].context"
        ]
    );
    let too_many = client
        .append_batch(pb::AppendBatchRequest {
            events: (0..1001).map(|i| event(&format!("m{i}"), "x")).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert!(too_many.message().contains("events"), "{too_many:?}");
    let unset = client
        .append(pb::AppendRequest { event: None })
        .await
        .unwrap_err();
    assert_eq!(unset.code(), Code::InvalidArgument);

    // A conflicting event id fails its whole batch too.
    append(&mut client, event("c1", "first")).await?;
    let conflict = client
        .append_batch(pb::AppendBatchRequest {
            events: vec![event("c2", "x"), event("c1", "changed")],
        })
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert!(
        conflict.message().contains("events[1].event_id"),
        "{conflict:?}"
    );

    let stored = query_all(&mut client, pb::QueryRequest::default()).await;
    let ids: Vec<_> = stored
        .iter()
        .map(|e| e.event.as_ref().unwrap().event_id.clone())
        .collect();
    assert_eq!(ids, ["c1"]);
    assert!(verify(&mut client, 0, 0).await.ok);
    node.stop().await
}
on_every_backend!(a_rejected_batch_leaves_nothing_behind);

async fn fifty_concurrent_clients_make_one_gapless_chain(db: &TestDatabase) -> anyhow::Result<()> {
    let node = AuditNode::start(&db.settings).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for client_index in 0..50 {
        let mut client = node.client().await?;
        tasks.spawn(async move {
            let mut sequences = Vec::new();
            for i in 0..200 {
                let response = append(&mut client, event(&format!("c{client_index}-{i}"), "x"))
                    .await
                    .unwrap();
                sequences.push(response.entry.unwrap().sequence);
            }
            sequences
        });
    }
    let mut all = Vec::new();
    while let Some(sequences) = tasks.join_next().await {
        all.extend(sequences?);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=10_000).collect::<Vec<u64>>());
    let mut client = node.client().await?;
    let report = verify(&mut client, 0, 0).await;
    assert!(report.ok, "{report:?}");
    assert_eq!(report.entries_checked, 10_000);
    node.stop().await
}
on_every_backend!(fifty_concurrent_clients_make_one_gapless_chain);

async fn two_services_on_one_database_extend_one_chain(db: &TestDatabase) -> anyhow::Result<()> {
    let first = AuditNode::start(&db.settings).await?;
    let second = AuditNode::start(&db.settings).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for client_index in 0..16 {
        let node = if client_index % 2 == 0 {
            &first
        } else {
            &second
        };
        let mut client = node.client().await?;
        tasks.spawn(async move {
            for i in 0..100 {
                // Half the ids are appended through both services: still
                // one entry each.
                let id = format!("t{}-{i}", client_index / 2);
                let response = append(&mut client, event(&id, "x")).await.unwrap();
                assert_eq!(response.entry.unwrap().event.unwrap().event_id, id);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined?;
    }
    let mut client = first.client().await?;
    let report = verify(&mut client, 0, 0).await;
    assert!(report.ok, "{report:?}");
    assert_eq!(report.entries_checked, 800);
    second.stop().await?;
    first.stop().await
}
on_every_backend!(two_services_on_one_database_extend_one_chain);

async fn tampering_is_detected_at_the_right_sequence(db: &TestDatabase) -> anyhow::Result<()> {
    let mut settings = db.settings.clone();
    settings.audit.checkpoint_every_entries = 10;
    let node = AuditNode::start(&settings).await?;
    let mut client = node.client().await?;
    for i in 1..=20 {
        append(&mut client, event(&format!("x{i}"), "task.execute")).await?;
    }
    let saved = client
        .get_checkpoint(pb::GetCheckpointRequest { sequence: 0 })
        .await?
        .into_inner()
        .checkpoint
        .unwrap();
    assert_eq!(saved.sequence, 20);
    let tenth = client
        .get_checkpoint(pb::GetCheckpointRequest { sequence: 10 })
        .await?
        .into_inner()
        .checkpoint
        .unwrap();
    assert_eq!(tenth.sequence, 10);
    assert!(verify(&mut client, 0, 0).await.ok);
    let database = Database::connect(&settings).await?;

    // A modified field.
    execute(
        &database,
        "UPDATE audit_entries SET action = 'harmless' WHERE sequence = 5",
    )
    .await;
    let report = verify(&mut client, 0, 0).await;
    assert_eq!(
        (report.ok, report.first_bad_sequence, report.problem),
        (false, 5, pb::Problem::Modified as i32),
        "{report:?}"
    );
    execute(
        &database,
        "UPDATE audit_entries SET action = 'task.execute' WHERE sequence = 5",
    )
    .await;
    assert!(verify(&mut client, 0, 0).await.ok);

    // A modified context.
    execute(
        &database,
        r#"UPDATE audit_entries SET context = '{"note":"nothing to see"}' WHERE sequence = 6"#,
    )
    .await;
    let report = verify(&mut client, 0, 0).await;
    assert_eq!(
        (report.first_bad_sequence, report.problem),
        (6, pb::Problem::Modified as i32)
    );
    assert!(report.detail.contains("context"), "{report:?}");
    execute(
        &database,
        r#"UPDATE audit_entries SET context = '{"note":"about x6"}' WHERE sequence = 6"#,
    )
    .await;

    // Two rows swapped.
    execute(
        &database,
        "UPDATE audit_entries SET sequence = -3 WHERE sequence = 3",
    )
    .await;
    execute(
        &database,
        "UPDATE audit_entries SET sequence = 3 WHERE sequence = 4",
    )
    .await;
    execute(
        &database,
        "UPDATE audit_entries SET sequence = 4 WHERE sequence = -3",
    )
    .await;
    let report = verify(&mut client, 0, 0).await;
    assert_eq!(
        (report.first_bad_sequence, report.problem),
        (3, pb::Problem::Reordered as i32),
        "{report:?}"
    );
    execute(
        &database,
        "UPDATE audit_entries SET sequence = -3 WHERE sequence = 3",
    )
    .await;
    execute(
        &database,
        "UPDATE audit_entries SET sequence = 3 WHERE sequence = 4",
    )
    .await;
    execute(
        &database,
        "UPDATE audit_entries SET sequence = 4 WHERE sequence = -3",
    )
    .await;
    assert!(verify(&mut client, 0, 0).await.ok);

    // The whole chain rewritten consistently from sequence 2, without the
    // key: the chain recomputes, but not to the signed checkpoints.
    let entries = query_all(
        &mut client,
        pb::QueryRequest {
            order: pb::Order::OldestFirst as i32,
            ..Default::default()
        },
    )
    .await;
    let mut prev = entries[0].entry_hash.clone();
    for entry in &entries[1..] {
        let e = entry.event.as_ref().unwrap();
        let action = if entry.sequence == 2 {
            "nothing.happened"
        } else {
            e.action.as_str()
        };
        let occurred = e.occurred_at.unwrap();
        let recorded = entry.recorded_at.unwrap();
        let fields = chain::EntryFields {
            event_id: &e.event_id,
            agent_type: &e.agent_type,
            action,
            user_id: &e.user_id,
            project_id: &e.project_id,
            workflow_id: &e.workflow_id,
            trace_id: &e.trace_id,
            outcome: e.outcome as u32,
            occurred_at: Timestamp {
                seconds: occurred.seconds,
                nanos: occurred.nanos as u32,
            },
            recorded_at: Timestamp {
                seconds: recorded.seconds,
                nanos: recorded.nanos as u32,
            },
        };
        let hash = chain::entry_hash(
            entry.sequence,
            &prev.clone().try_into().unwrap(),
            &entry.context_hash.clone().try_into().unwrap(),
            &fields,
        );
        execute(
            &database,
            &format!(
                "UPDATE audit_entries SET action = '{action}', prev_hash = '{}', entry_hash = '{}' WHERE sequence = {}",
                hex::encode(&prev),
                hex::encode(hash),
                entry.sequence
            ),
        )
        .await;
        prev = hash.to_vec();
    }
    execute(
        &database,
        &format!(
            "UPDATE audit_head SET entry_hash = '{}' WHERE id = 1",
            hex::encode(&prev)
        ),
    )
    .await;
    // Verify catches it at the first signed checkpoint it contradicts.
    let report = verify(&mut client, 0, 0).await;
    assert_eq!(
        (report.ok, report.first_bad_sequence, report.problem),
        (false, 10, pb::Problem::Modified as i32),
        "{report:?}"
    );
    assert!(report.detail.contains("rewritten"), "{report:?}");
    // Even with the checkpoints deleted too, a checkpoint saved outside
    // the database no longer matches: its signature is fine, the chain
    // verifies, but it ends in a different hash.
    execute(&database, "DELETE FROM audit_checkpoints").await;
    let report = verify(&mut client, 1, saved.sequence).await;
    assert!(report.ok, "{report:?}");
    assert_ne!(report.last_entry_hash, saved.entry_hash);

    // A deleted entry.
    execute(&database, "DELETE FROM audit_entries WHERE sequence = 7").await;
    let report = verify(&mut client, 0, 0).await;
    assert_eq!(
        (report.first_bad_sequence, report.problem),
        (7, pb::Problem::Missing as i32),
        "{report:?}"
    );
    // And the newest one: the head still names it.
    execute(&database, "DELETE FROM audit_entries WHERE sequence = 20").await;
    let report = verify(&mut client, 8, 0).await;
    assert_eq!(
        (report.first_bad_sequence, report.problem),
        (20, pb::Problem::Missing as i32),
        "{report:?}"
    );
    database.close().await;
    node.stop().await
}
on_every_backend!(tampering_is_detected_at_the_right_sequence);
