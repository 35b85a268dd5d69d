//! `agentmesh.gateway.v1.KeyService`: create, list and revoke API keys
//! (admin keys only), and read a project's token usage (admin keys, or
//! keys scoped to the project).

use std::collections::BTreeSet;
use std::sync::Arc;

use agentmesh_proto::gateway as pb;
use agentmesh_proto::gateway::key_service_server::KeyService;
use agentmesh_resilience::{FieldViolation, invalid_argument};
use tonic::{Request, Response, Status};

use crate::auth::key;
use crate::auth::store::KeyRecord;
use crate::auth::{Authenticator, Principal, Projects, Role};
use crate::budget::{Budgets, Periods};
use crate::error::GatewayError;

/// Longest key name.
const MAX_NAME_BYTES: usize = 128;
/// Most projects on one key.
const MAX_PROJECTS: usize = 100;
/// Longest project id (as the agent service accepts it).
const MAX_PROJECT_BYTES: usize = 128;
/// Keys per ListApiKeys page when the request says 0.
const DEFAULT_PAGE_SIZE: u32 = 100;
/// Most keys per ListApiKeys page.
const MAX_PAGE_SIZE: u32 = 1000;

/// The KeyService over the gateway's authenticator and budgets.
pub struct KeyGrpc {
    authenticator: Arc<Authenticator>,
    budgets: Arc<Budgets>,
}

impl KeyGrpc {
    /// The service.
    pub fn new(authenticator: Arc<Authenticator>, budgets: Arc<Budgets>) -> Self {
        Self {
            authenticator,
            budgets,
        }
    }
}

/// Returns true for a project id the agent service accepts: 1 to 128
/// bytes of ASCII letters, digits, '.', '_', '-', ':'.
pub fn is_project_id(project: &str) -> bool {
    (1..=MAX_PROJECT_BYTES).contains(&project.len())
        && project
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-' | b':'))
}

fn to_wire(record: &KeyRecord) -> pb::ApiKey {
    let timestamp = |micros: i64| prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    };
    pb::ApiKey {
        key_id: record.key_id.clone(),
        name: record.name.clone(),
        role: match record.role {
            Role::User => pb::ApiKeyRole::User,
            Role::Admin => pb::ApiKeyRole::Admin,
        } as i32,
        projects: match &record.projects {
            Projects::All => vec!["*".to_owned()],
            Projects::Only(projects) => projects.iter().cloned().collect(),
        },
        created_at: Some(timestamp(record.created_at_micros)),
        revoked_at: record.revoked_at_micros.map(timestamp),
        created_by: record.created_by.clone(),
    }
}

/// Checks a CreateApiKey request; returns the role and projects.
fn check_create(request: &pb::CreateApiKeyRequest) -> Result<(Role, Projects), Status> {
    let mut violations = Vec::new();
    if request.name.trim().is_empty() || request.name.len() > MAX_NAME_BYTES {
        violations.push(FieldViolation::new(
            "name",
            format!("{:?}", request.name.chars().take(64).collect::<String>()),
            format!("must be 1 to {MAX_NAME_BYTES} bytes, not only whitespace"),
        ));
    }
    let role = match pb::ApiKeyRole::try_from(request.role) {
        Ok(pb::ApiKeyRole::Unspecified | pb::ApiKeyRole::User) => Role::User,
        Ok(pb::ApiKeyRole::Admin) => Role::Admin,
        Err(_) => {
            violations.push(FieldViolation::new(
                "role",
                request.role.to_string(),
                "must be API_KEY_ROLE_USER or API_KEY_ROLE_ADMIN",
            ));
            Role::User
        }
    };
    let wildcard = request.projects.iter().any(|project| project == "*");
    let projects = if wildcard {
        if request.projects.len() > 1 {
            violations.push(FieldViolation::new(
                "projects",
                format!("{} entries", request.projects.len()),
                "\"*\" must be the only entry",
            ));
        }
        Projects::All
    } else if request.projects.is_empty() {
        if role == Role::User {
            violations.push(FieldViolation::new(
                "projects",
                "[]",
                "a user key needs 1 to 100 projects, or \"*\" for every project",
            ));
        }
        Projects::All
    } else {
        if request.projects.len() > MAX_PROJECTS {
            violations.push(FieldViolation::new(
                "projects",
                format!("{} entries", request.projects.len()),
                format!("must have at most {MAX_PROJECTS} entries"),
            ));
        }
        for (index, project) in request.projects.iter().enumerate() {
            if !is_project_id(project) {
                violations.push(FieldViolation::new(
                    format!("projects[{index}]"),
                    format!("{:?}", project.chars().take(64).collect::<String>()),
                    "must be 1 to 128 bytes of ASCII letters, digits, '.', '_', '-', ':', or \"*\"",
                ));
            }
        }
        Projects::Only(request.projects.iter().cloned().collect::<BTreeSet<_>>())
    };
    if violations.is_empty() {
        Ok((role, projects))
    } else {
        Err(invalid_argument(&violations))
    }
}

fn period_usage(
    period: String,
    used: u64,
    limit: u64,
    resets_at: std::time::SystemTime,
) -> pb::BudgetPeriodUsage {
    pb::BudgetPeriodUsage {
        period,
        tokens_used: used,
        tokens_limit: limit,
        resets_at: Some(prost_types::Timestamp::from(resets_at)),
    }
}

#[tonic::async_trait]
impl KeyService for KeyGrpc {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let principal = Principal::of(&request)?;
        principal.require_admin("CreateApiKey")?;
        let request = request.into_inner();
        let (role, projects) = check_create(&request)?;
        let new_key = key::generate();
        let record = KeyRecord {
            key_id: new_key.key_id,
            name: request.name.trim().to_owned(),
            role,
            projects,
            secret_hash: self.authenticator.hasher().digest(&new_key.secret),
            created_by: principal.key_id().to_owned(),
            created_at_micros: chrono::Utc::now().timestamp_micros(),
            revoked_at_micros: None,
        };
        let keyring = self.authenticator.keyring();
        keyring
            .store()
            .insert(&record)
            .await
            .map_err(Status::from)?;
        keyring.put(record.clone());
        tracing::info!(
            key_id = record.key_id,
            role = record.role.as_str(),
            created_by = principal.key_id(),
            "api key created"
        );
        Ok(Response::new(pb::CreateApiKeyResponse {
            key: Some(to_wire(&record)),
            secret: new_key.secret,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        Principal::of(&request)?.require_admin("ListApiKeys")?;
        let request = request.into_inner();
        let mut violations = Vec::new();
        if request.page_size > MAX_PAGE_SIZE {
            violations.push(FieldViolation::new(
                "page_size",
                request.page_size.to_string(),
                format!("must be at most {MAX_PAGE_SIZE}"),
            ));
        }
        if !request.page_token.is_empty() && !key::is_key_id(&request.page_token) {
            violations.push(FieldViolation::new(
                "page_token",
                format!(
                    "{:?}",
                    request.page_token.chars().take(64).collect::<String>()
                ),
                "must be a next_page_token returned by ListApiKeys",
            ));
        }
        if !violations.is_empty() {
            return Err(invalid_argument(&violations));
        }
        let page_size = if request.page_size == 0 {
            DEFAULT_PAGE_SIZE
        } else {
            request.page_size
        };
        let mut records = self
            .authenticator
            .keyring()
            .store()
            .page(
                &request.page_token,
                request.include_revoked,
                u64::from(page_size) + 1,
            )
            .await
            .map_err(Status::from)?;
        let next_page_token = if records.len() > page_size as usize {
            records.truncate(page_size as usize);
            records
                .last()
                .map(|record| record.key_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: records.iter().map(to_wire).collect(),
            next_page_token,
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let principal = Principal::of(&request)?;
        principal.require_admin("RevokeApiKey")?;
        let asked = request.into_inner().key_id;
        let key_id = asked.strip_prefix(key::KEY_PREFIX).unwrap_or(&asked);
        if !key::is_key_id(key_id) {
            return Err(invalid_argument(&[FieldViolation::new(
                "key_id",
                format!("{:?}", asked.chars().take(64).collect::<String>()),
                "must be a key id: 16 lowercase hex digits (optionally after amk_)",
            )]));
        }
        let keyring = self.authenticator.keyring();
        let record = keyring
            .store()
            .revoke(key_id, chrono::Utc::now().timestamp_micros())
            .await
            .map_err(Status::from)?
            .ok_or_else(|| {
                Status::from(GatewayError::NotFound(format!(
                    "no API key has id {key_id}"
                )))
            })?;
        keyring.put(record.clone());
        tracing::info!(key_id, revoked_by = principal.key_id(), "api key revoked");
        Ok(Response::new(pb::RevokeApiKeyResponse {
            key: Some(to_wire(&record)),
        }))
    }

    async fn get_project_usage(
        &self,
        request: Request<pb::GetProjectUsageRequest>,
    ) -> Result<Response<pb::GetProjectUsageResponse>, Status> {
        let principal = Principal::of(&request)?;
        let project = request.into_inner().project_id;
        if !is_project_id(&project) {
            return Err(invalid_argument(&[FieldViolation::new(
                "project_id",
                format!("{:?}", project.chars().take(64).collect::<String>()),
                "must be 1 to 128 bytes of ASCII letters, digits, '.', '_', '-', ':'",
            )]));
        }
        principal.require_project(&project)?;
        let usage = self
            .budgets
            .project_usage(&project)
            .await
            .map_err(Status::from)?;
        let Periods {
            day,
            month,
            day_resets_at,
            month_resets_at,
        } = usage.periods;
        Ok(Response::new(pb::GetProjectUsageResponse {
            project_id: project,
            day: Some(period_usage(
                day,
                usage.day_used,
                usage.day_limit,
                day_resets_at,
            )),
            month: Some(period_usage(
                month,
                usage.month_used,
                usage.month_limit,
                month_resets_at,
            )),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(role: pb::ApiKeyRole, projects: &[&str]) -> pb::CreateApiKeyRequest {
        pb::CreateApiKeyRequest {
            name: "ci".into(),
            role: role as i32,
            projects: projects.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    #[test]
    fn create_requests_are_checked_field_by_field() {
        let (role, projects) = check_create(&create(pb::ApiKeyRole::User, &["p1", "p2"])).unwrap();
        assert_eq!(role, Role::User);
        assert!(projects.contains("p2") && !projects.contains("p3"));
        let (role, projects) = check_create(&create(pb::ApiKeyRole::Admin, &[])).unwrap();
        assert_eq!((role, projects), (Role::Admin, Projects::All));
        let error = check_create(&create(pb::ApiKeyRole::User, &[])).unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert!(error.message().contains("projects"), "{}", error.message());
        let mut bad = create(pb::ApiKeyRole::User, &["ok", "no spaces"]);
        bad.name = String::new();
        bad.role = 9;
        let error = check_create(&bad).unwrap_err();
        for field in ["name", "role", "projects[1]"] {
            assert!(
                error.message().contains(field),
                "{field}: {}",
                error.message()
            );
        }
        let error = check_create(&create(pb::ApiKeyRole::User, &["*", "p1"])).unwrap_err();
        assert!(
            error.message().contains("only entry"),
            "{}",
            error.message()
        );
    }
}
