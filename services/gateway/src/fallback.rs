//! The fallback agent: when no agent node can serve a task, the gateway
//! answers in-process with the `local` provider. It renders through the
//! agent crate's own catalogue, sanitiser and template engine
//! ([`agentmesh_agent::service::render_messages`]), so a degraded answer
//! obeys the same rules as a node's; nothing is recorded (no execution id).

use std::time::Duration;

use agentmesh_agent::AgentError;
use agentmesh_agent::catalogue::Catalogue;
use agentmesh_agent::provider::local::LocalProvider;
use agentmesh_agent::provider::{Completion, ProviderError, ProviderRequest};
use agentmesh_agent::service::{ExecuteSpec, render_messages};
use agentmesh_settings::{LiveSettings, SanitizePolicy};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The in-process `local` agent.
pub struct Fallback {
    catalogue: Catalogue,
    policy: SanitizePolicy,
    provider: LocalProvider,
}

impl Fallback {
    /// A fallback over `catalogue`, with the node's sanitise policy and
    /// local provider settings.
    pub fn new(catalogue: Catalogue, policy: SanitizePolicy, provider: LocalProvider) -> Self {
        Self {
            catalogue,
            policy,
            provider,
        }
    }

    /// Runs `spec` with the local provider; `field` prefixes violation
    /// paths; deltas go to `deltas` when given.
    pub async fn execute(
        &self,
        spec: &ExecuteSpec,
        live: &LiveSettings,
        field: &str,
        deadline: Option<Instant>,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<Completion, AgentError> {
        let (_, messages) = render_messages(&self.catalogue, self.policy, spec, field, false)?;
        let timeout = Duration::from_secs(
            u64::try_from(
                spec.overrides
                    .timeout_seconds
                    .unwrap_or(live.agent.timeout_seconds)
                    .max(1),
            )
            .unwrap_or(1),
        );
        let mut until = Instant::now() + timeout;
        if let Some(deadline) = deadline {
            until = until.min(deadline);
        }
        let request = ProviderRequest {
            model: spec
                .overrides
                .model
                .clone()
                .unwrap_or_else(|| live.agent.default_model.clone()),
            temperature: spec.overrides.temperature.unwrap_or(live.agent.temperature),
            max_tokens: spec.overrides.max_tokens.unwrap_or(live.agent.max_tokens),
            messages,
            deadline: until,
        };
        self.provider
            .generate(&request, deltas)
            .await
            .map_err(|error| match error {
                ProviderError::Timeout(elapsed) => AgentError::DeadlineExceeded(format!(
                    "the fallback agent ran out of time after {elapsed:?}"
                )),
                other => AgentError::Provider(other),
            })
    }
}
