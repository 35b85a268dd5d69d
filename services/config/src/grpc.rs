//! The `agentmesh.config.v1.ConfigService` implementation: converts and
//! validates wire requests, calls [`ConfigCore`], converts results back.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use agentmesh_proto::config as pb;
use agentmesh_resilience::{FieldViolation, invalid_argument};
use agentmesh_settings::Scope;
use agentmesh_settings::live::{self, Values, is_valid_name};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::service::{
    ConfigCore, RollbackCommand, ScopeState, Snapshot, UpdateCommand, WatchEvent,
};
use crate::store::{ChangeKind, RevisionRecord};

/// Largest `History` page.
const MAX_PAGE_SIZE: u32 = 500;
/// `History` page size when none is given.
const DEFAULT_PAGE_SIZE: u32 = 50;
/// Longest author.
const MAX_AUTHOR_BYTES: usize = 128;
/// Longest reason.
const MAX_REASON_BYTES: usize = 1024;
/// Most `clear_fields` entries.
const MAX_CLEAR_FIELDS: usize = 64;

/// Distinct (agent type, project) responses remembered per revision.
const EFFECTIVE_CACHE_ENTRIES: usize = 4096;

/// `GetEffective` responses of the current head revision, by (agent type,
/// project): the hot read of every service, so merge and conversion run
/// once per revision instead of once per call.
#[derive(Default)]
struct EffectiveCache {
    revision: u64,
    responses: HashMap<(String, String), pb::GetEffectiveResponse>,
}

/// The gRPC face of [`ConfigCore`].
pub struct ConfigGrpc {
    core: Arc<ConfigCore>,
    effective_cache: Mutex<EffectiveCache>,
}

impl ConfigGrpc {
    /// Wraps the core.
    pub fn new(core: Arc<ConfigCore>) -> Self {
        Self {
            core,
            effective_cache: Mutex::new(EffectiveCache::default()),
        }
    }

    fn effective_response(
        &self,
        agent_type: Option<&str>,
        project_id: Option<&str>,
    ) -> pb::GetEffectiveResponse {
        let key = (
            agent_type.unwrap_or_default().to_owned(),
            project_id.unwrap_or_default().to_owned(),
        );
        let head = self.core.snapshot().revision;
        if let Ok(cache) = self.effective_cache.lock()
            && cache.revision == head
            && let Some(response) = cache.responses.get(&key)
        {
            return response.clone();
        }
        let (values, sources, revision) = self.core.effective(agent_type, project_id);
        let response = pb::GetEffectiveResponse {
            settings: Some(values.to_proto()),
            sources: sources
                .into_iter()
                .map(|source| pb::ValueSource {
                    field: source.field.to_owned(),
                    scope: source.scope,
                    revision: source.revision,
                })
                .collect(),
            head_revision: revision,
        };
        if let Ok(mut cache) = self.effective_cache.lock() {
            if cache.revision != revision {
                cache.revision = revision;
                cache.responses.clear();
            }
            if cache.responses.len() >= EFFECTIVE_CACHE_ENTRIES {
                cache.responses.clear();
            }
            cache.responses.insert(key, response.clone());
        }
        response
    }
}

fn parse_scope(field: &str, text: &str, violations: &mut Vec<FieldViolation>) -> Option<Scope> {
    match Scope::parse(text) {
        Ok(scope) => Some(scope),
        Err(error) => {
            violations.push(FieldViolation::new(
                field,
                format!("{text:?}"),
                error.to_string(),
            ));
            None
        }
    }
}

fn check_author_reason(author: &str, reason: &str, violations: &mut Vec<FieldViolation>) {
    if author.trim().is_empty() || author.len() > MAX_AUTHOR_BYTES {
        violations.push(FieldViolation::new(
            "author",
            format!("{author:?}"),
            format!("must be non-empty and at most {MAX_AUTHOR_BYTES} bytes"),
        ));
    }
    if reason.len() > MAX_REASON_BYTES {
        violations.push(FieldViolation::new(
            "reason",
            format!("{} bytes", reason.len()),
            format!("must be at most {MAX_REASON_BYTES} bytes"),
        ));
    }
}

fn check_optional_name(
    field: &str,
    name: &str,
    violations: &mut Vec<FieldViolation>,
) -> Option<String> {
    if name.is_empty() {
        return None;
    }
    if !is_valid_name(name) {
        violations.push(FieldViolation::new(
            field,
            format!("{name:?}"),
            "must be 1 to 64 characters of [A-Za-z0-9._-]",
        ));
        return None;
    }
    Some(name.to_owned())
}

fn reject_if_any(violations: Vec<FieldViolation>) -> Result<(), Status> {
    if violations.is_empty() {
        Ok(())
    } else {
        Err(invalid_argument(&violations))
    }
}

/// Validates an `UpdateRequest` into a command, reporting every bad field.
pub fn update_command(request: pb::UpdateRequest) -> Result<UpdateCommand, Status> {
    let mut violations = Vec::new();
    let scope = parse_scope("scope", &request.scope, &mut violations);
    let set = Values::from_proto(&request.settings.unwrap_or_default());
    for violation in set.validate() {
        violations.push(FieldViolation::new(
            format!("settings.{}", violation.field),
            violation.value,
            violation.rule,
        ));
    }
    if request.clear_fields.len() > MAX_CLEAR_FIELDS {
        violations.push(FieldViolation::new(
            "clear_fields",
            format!("{} entries", request.clear_fields.len()),
            format!("must have at most {MAX_CLEAR_FIELDS} entries"),
        ));
    }
    let mut clear = Vec::new();
    for (index, path) in request
        .clear_fields
        .iter()
        .enumerate()
        .take(MAX_CLEAR_FIELDS)
    {
        match live::field(path) {
            Some(spec) if set.get(spec.path).is_some() => violations.push(FieldViolation::new(
                format!("clear_fields[{index}]"),
                format!("{path:?}"),
                "must not also be set in settings",
            )),
            Some(spec) => clear.push(spec.path),
            None => violations.push(FieldViolation::new(
                format!("clear_fields[{index}]"),
                format!("{path:?}"),
                format!(
                    "must be one of {}",
                    live::FIELDS
                        .iter()
                        .map(|spec| spec.path)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
    if set.is_empty() && request.clear_fields.is_empty() {
        violations.push(FieldViolation::new(
            "settings",
            "{}",
            "must set or clear at least one field",
        ));
    }
    check_author_reason(&request.author, &request.reason, &mut violations);
    reject_if_any(violations)?;
    let scope = scope.ok_or_else(|| Status::internal("scope validated but missing"))?;
    Ok(UpdateCommand {
        scope,
        set,
        clear,
        expected_revision: request.expected_revision,
        author: request.author,
        reason: request.reason,
    })
}

fn timestamp(time: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

fn revision_to_proto(record: &RevisionRecord) -> pb::Revision {
    pb::Revision {
        revision: record.revision,
        scope: record.scope.to_string(),
        settings: Some(record.values.to_proto()),
        changed_fields: record.changed_fields.clone(),
        kind: match record.kind {
            ChangeKind::Seed => pb::ChangeKind::Seed,
            ChangeKind::Update => pb::ChangeKind::Update,
            ChangeKind::Rollback => pb::ChangeKind::Rollback,
        } as i32,
        rollback_of: record.rollback_of.unwrap_or_default(),
        author: record.author.clone(),
        reason: record.reason.clone(),
        created_at: Some(timestamp(record.created_at)),
    }
}

fn scope_to_proto(scope: &Scope, state: &ScopeState) -> pb::ScopeSettings {
    pb::ScopeSettings {
        scope: scope.to_string(),
        settings: Some(state.values.to_proto()),
        revision: state.revision,
    }
}

fn snapshot_to_proto(snapshot: &Snapshot, resync: bool) -> pb::Snapshot {
    pb::Snapshot {
        revision: snapshot.revision,
        scopes: snapshot
            .scopes
            .iter()
            .map(|(scope, state)| scope_to_proto(scope, state))
            .collect(),
        resync,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::config_service_server::ConfigService for ConfigGrpc {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Vec::new();
        let scope = parse_scope("scope", &request.scope, &mut violations);
        reject_if_any(violations)?;
        let scope = scope.ok_or_else(|| Status::internal("scope validated but missing"))?;
        let (state, head) = self.core.get(&scope);
        Ok(Response::new(pb::GetResponse {
            scope_settings: Some(scope_to_proto(&scope, &state)),
            head_revision: head,
        }))
    }

    async fn get_effective(
        &self,
        request: Request<pb::GetEffectiveRequest>,
    ) -> Result<Response<pb::GetEffectiveResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Vec::new();
        let agent_type = check_optional_name("agent_type", &request.agent_type, &mut violations);
        let project_id = check_optional_name("project_id", &request.project_id, &mut violations);
        reject_if_any(violations)?;
        Ok(Response::new(self.effective_response(
            agent_type.as_deref(),
            project_id.as_deref(),
        )))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        let command = update_command(request.into_inner())?;
        let record = self.core.update(command).await?;
        Ok(Response::new(pb::UpdateResponse {
            revision: Some(revision_to_proto(&record)),
        }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Vec::new();
        let scope = if request.scope.is_empty() {
            None
        } else {
            parse_scope("scope", &request.scope, &mut violations)
        };
        if request.page_size > MAX_PAGE_SIZE {
            violations.push(FieldViolation::new(
                "page_size",
                request.page_size.to_string(),
                format!("must be at most {MAX_PAGE_SIZE}"),
            ));
        }
        let before = if request.page_token.is_empty() {
            None
        } else {
            match request.page_token.parse::<u64>() {
                Ok(revision) if revision > 0 => Some(revision),
                _ => {
                    violations.push(FieldViolation::new(
                        "page_token",
                        format!("{:?}", request.page_token),
                        "must be a next_page_token returned by History",
                    ));
                    None
                }
            }
        };
        reject_if_any(violations)?;
        let page_size = if request.page_size == 0 {
            DEFAULT_PAGE_SIZE
        } else {
            request.page_size
        };
        let mut records = self
            .core
            .history(scope.as_ref(), before, u64::from(page_size) + 1)
            .await?;
        let next_page_token = if records.len() > page_size as usize {
            records.truncate(page_size as usize);
            records
                .last()
                .map(|record| record.revision.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::HistoryResponse {
            revisions: records.iter().map(revision_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Vec::new();
        if request.revision == 0 {
            violations.push(FieldViolation::new(
                "revision",
                "0",
                "must be a revision number (at least 1)",
            ));
        }
        check_author_reason(&request.author, &request.reason, &mut violations);
        reject_if_any(violations)?;
        let record = self
            .core
            .rollback(RollbackCommand {
                revision: request.revision,
                expected_revision: request.expected_revision,
                author: request.author,
                reason: request.reason,
            })
            .await?;
        Ok(Response::new(pb::RollbackResponse {
            revision: Some(revision_to_proto(&record)),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let receiver = self.core.watch(request.into_inner().from_revision).await?;
        let stream = ReceiverStream::new(receiver).map(|event| {
            event.map_err(Status::from).map(|event| pb::WatchResponse {
                event: Some(match event {
                    WatchEvent::Snapshot { snapshot, resync } => {
                        pb::watch_response::Event::Snapshot(snapshot_to_proto(&snapshot, resync))
                    }
                    WatchEvent::Change(record) => {
                        pb::watch_response::Event::Change(revision_to_proto(&record))
                    }
                }),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
