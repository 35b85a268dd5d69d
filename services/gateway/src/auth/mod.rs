//! API keys at the gateway: who is calling ([`Principal`]), how a call's
//! `authorization: Bearer <key>` metadata is checked ([`Authenticator`],
//! run for every GatewayService and KeyService call by [`AuthInterceptor`],
//! never for health or reflection), and the per-key rate limit applied on
//! the way in.
//!
//! - [`key`]: the key format and its keyed hash;
//! - [`store`]: the `gateway_api_keys` table; [`keyring`]: the keys in
//!   memory, refreshed from it;
//! - [`limits`]: token buckets per key; [`grpc`]: `KeyService`.
//!
//! With authentication off (`gateway.auth.mode`, only on a loopback
//! listener) every call runs as [`Principal::anonymous`]: an unlimited
//! admin.

pub mod grpc;
pub mod key;
pub mod keyring;
pub mod limits;
pub mod store;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use agentmesh_settings::{AuthMode, GatewayAuthSettings};
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::auth::key::{Digest, KeyHasher};
use crate::auth::keyring::Keyring;
use crate::auth::limits::RateLimits;
use crate::error::GatewayError;

/// Key id of the bootstrap admin key from settings.
pub const BOOTSTRAP_KEY_ID: &str = "bootstrap";
/// Key id of calls made while authentication is off.
pub const ANONYMOUS_KEY_ID: &str = "anonymous";

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Tasks and workflows in the key's projects.
    User,
    /// Everything, including key management and routing state.
    Admin,
}

impl Role {
    /// `user` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

/// The projects a key may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Projects {
    /// Every project (`*`).
    All,
    /// These projects.
    Only(BTreeSet<String>),
}

impl Projects {
    /// Whether `project` is in scope.
    pub fn contains(&self, project: &str) -> bool {
        match self {
            Projects::All => true,
            Projects::Only(projects) => projects.contains(project),
        }
    }
}

/// Who is calling: the key a call was authenticated with. Handlers find it
/// in the request's extensions ([`Principal::of`]).
#[derive(Clone, Debug)]
pub struct Principal {
    key_id: Arc<str>,
    role: Role,
    projects: Arc<Projects>,
}

impl Principal {
    /// A principal for a key.
    pub fn new(key_id: &str, role: Role, projects: Projects) -> Self {
        Self {
            key_id: Arc::from(key_id),
            role,
            projects: Arc::new(projects),
        }
    }

    /// Calls made while authentication is off: an admin of every project.
    pub fn anonymous() -> Self {
        Self::new(ANONYMOUS_KEY_ID, Role::Admin, Projects::All)
    }

    /// The principal the auth interceptor put on `request`.
    pub fn of<T>(request: &Request<T>) -> Result<Principal, Status> {
        request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| {
                Status::internal("the call reached the gateway without passing authentication")
            })
    }

    /// The key's id (`bootstrap` for the bootstrap admin key, `anonymous`
    /// while authentication is off).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The key's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The key's projects.
    pub fn projects(&self) -> &Projects {
        &self.projects
    }

    /// PERMISSION_DENIED naming the project unless it is in the key's
    /// scope.
    pub fn require_project(&self, project: &str) -> Result<(), Status> {
        if self.projects.contains(project) {
            Ok(())
        } else {
            Err(GatewayError::PermissionDenied(format!(
                "API key {} may not use project {project:?}",
                self.key_id
            ))
            .into())
        }
    }

    /// PERMISSION_DENIED naming `what` unless the key is an admin key.
    pub fn require_admin(&self, what: &str) -> Result<(), Status> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(GatewayError::PermissionDenied(format!(
                "{what} needs an admin key; API key {} is a {} key",
                self.key_id,
                self.role.as_str()
            ))
            .into())
        }
    }
}

/// Whether authentication is on for a gateway listening on `address`:
/// `auto` is on unless the address is loopback; `off` on any other
/// address is refused.
pub fn is_enabled(settings: &GatewayAuthSettings, address: SocketAddr) -> Result<bool, String> {
    let loopback = address.ip().is_loopback();
    match settings.mode {
        AuthMode::On => Ok(true),
        AuthMode::Auto => Ok(!loopback),
        AuthMode::Off if loopback => Ok(false),
        AuthMode::Off => Err(format!(
            "gateway.auth.mode = off is refused: the gateway listens on {address}, which is not a loopback address (set gateway.auth.mode = on or auto)"
        )),
    }
}

/// Checks the key of every call.
pub struct Authenticator {
    enabled: bool,
    hasher: KeyHasher,
    bootstrap: Option<Digest>,
    keyring: Arc<Keyring>,
    limits: RateLimits,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator; `bootstrap_admin_key` is accepted as an admin key
    /// of every project.
    pub fn new(
        enabled: bool,
        hasher: KeyHasher,
        bootstrap_admin_key: Option<&str>,
        keyring: Arc<Keyring>,
        limits: RateLimits,
    ) -> Self {
        let bootstrap = bootstrap_admin_key.map(|key| hasher.digest(key));
        Self {
            enabled,
            hasher,
            bootstrap,
            keyring,
            limits,
        }
    }

    /// Whether keys are required.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether a bootstrap admin key is configured.
    pub fn has_bootstrap_key(&self) -> bool {
        self.bootstrap.is_some()
    }

    /// The hasher keys are stored under.
    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    /// The in-memory keys.
    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    /// The rate limits.
    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// The principal of a call with this metadata, after its rate limit.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Principal, GatewayError> {
        if !self.enabled {
            return Ok(Principal::anonymous());
        }
        let principal = self.identify(metadata).inspect_err(|error| {
            let reason = match error {
                GatewayError::Unauthenticated { reason, .. } => *reason,
                _ => "other",
            };
            metrics::counter!("agentmesh_gateway_auth_failures_total", "reason" => reason)
                .increment(1);
        })?;
        if let Err(refusal) = self.limits.check(principal.key_id(), principal.role()) {
            metrics::counter!("agentmesh_gateway_rate_limited_total").increment(1);
            return Err(GatewayError::RateLimited {
                key_id: principal.key_id().to_owned(),
                rps: refusal.quota.rps,
                burst: refusal.quota.burst,
                retry_after: refusal.retry_after,
            });
        }
        Ok(principal)
    }

    fn identify(&self, metadata: &MetadataMap) -> Result<Principal, GatewayError> {
        let unauthenticated =
            |reason: AuthFailure, message: String| GatewayError::Unauthenticated {
                reason: reason.as_str(),
                message,
            };
        let Some(value) = metadata.get("authorization") else {
            return Err(unauthenticated(
                AuthFailure::Missing,
                "missing API key: send `authorization: Bearer <key>` metadata".to_owned(),
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|text| {
                let (scheme, token) = text.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(|| {
                unauthenticated(
                    AuthFailure::Malformed,
                    "malformed authorization metadata: expected `Bearer <key>`".to_owned(),
                )
            })?;
        let digest = self.hasher.digest(token);
        if let Some(bootstrap) = &self.bootstrap
            && key::digests_match(bootstrap, &digest)
        {
            return Ok(Principal::new(BOOTSTRAP_KEY_ID, Role::Admin, Projects::All));
        }
        let key_id = key::key_id_of(token).map_err(|_| {
            unauthenticated(
                AuthFailure::Malformed,
                "malformed API key: expected amk_<16 hex digits>_<43 base64url characters>"
                    .to_owned(),
            )
        })?;
        let record = self
            .keyring
            .get(key_id)
            .filter(|record| key::digests_match(&record.secret_hash, &digest))
            .ok_or_else(|| {
                unauthenticated(
                    AuthFailure::Unknown,
                    format!("unknown API key amk_{key_id}: no key has this id and secret"),
                )
            })?;
        if let Some(revoked_at) = record.revoked_at_micros {
            return Err(unauthenticated(
                AuthFailure::Revoked,
                format!(
                    "API key {key_id} was revoked at {}",
                    crate::budget::rfc3339_micros(revoked_at)
                ),
            ));
        }
        Ok(Principal {
            key_id: Arc::from(record.key_id.as_str()),
            role: record.role,
            projects: Arc::new(record.projects.clone()),
        })
    }
}

/// Why a call was not authenticated (the metric label).
#[derive(Clone, Copy, Debug)]
enum AuthFailure {
    Missing,
    Malformed,
    Unknown,
    Revoked,
}

impl AuthFailure {
    fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::Unknown => "unknown",
            AuthFailure::Revoked => "revoked",
        }
    }
}

/// The tonic interceptor that authenticates every call of the services it
/// wraps and puts the [`Principal`] in the request's extensions.
#[derive(Clone, Debug)]
pub struct AuthInterceptor {
    authenticator: Arc<Authenticator>,
}

impl AuthInterceptor {
    /// An interceptor over `authenticator`.
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self { authenticator }
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let principal = self.authenticator.authenticate(request.metadata())?;
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_mode_follows_the_listen_address_and_off_is_refused_off_loopback() {
        let mut settings = GatewayAuthSettings::default();
        let loopback: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let public: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        assert_eq!(is_enabled(&settings, loopback), Ok(false));
        assert_eq!(is_enabled(&settings, public), Ok(true));
        settings.mode = AuthMode::On;
        assert_eq!(is_enabled(&settings, loopback), Ok(true));
        settings.mode = AuthMode::Off;
        assert_eq!(is_enabled(&settings, loopback), Ok(false));
        let error = is_enabled(&settings, public).unwrap_err();
        assert!(error.contains("gateway.auth.mode"), "{error}");
    }

    #[test]
    fn principals_check_projects_and_roles() {
        let user = Principal::new(
            "0123456789abcdef",
            Role::User,
            Projects::Only(["p1".to_owned()].into_iter().collect()),
        );
        assert!(user.require_project("p1").is_ok());
        let denied = user.require_project("p2").unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("\"p2\""), "{}", denied.message());
        let denied = user.require_admin("CreateApiKey").unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("CreateApiKey"));
        let admin = Principal::anonymous();
        assert!(admin.require_project("anything").is_ok());
        assert!(admin.require_admin("CreateApiKey").is_ok());
    }
}
