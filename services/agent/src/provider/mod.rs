//! LLM providers: [`openai`] (any OpenAI-compatible chat-completions
//! endpoint, through one pooled, bounded client) and [`local`] (a
//! deterministic offline provider, the embedded default).
//!
//! A provider takes rendered chat messages and model parameters and returns
//! the output with token usage; when given a delta channel it streams the
//! output into it as it arrives. Dropping the future stops the call.

pub mod local;
pub mod openai;

use std::time::Duration;

use agentmesh_settings::{AgentServiceSettings, ProviderKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::limiter::Occupancy;

/// One chat message sent to a provider.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system` or `user`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct ProviderRequest {
    /// Model name.
    pub model: String,
    /// Sampling temperature.
    pub temperature: f64,
    /// Most tokens to generate.
    pub max_tokens: i64,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// When the call must have finished, retries and queueing included.
    pub deadline: Instant,
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// Natural end or stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Content filter.
    ContentFilter,
    /// Not reported.
    Unknown,
}

impl Finish {
    /// Parses an OpenAI `finish_reason`.
    pub fn from_openai(reason: &str) -> Self {
        match reason {
            "stop" | "eos" | "tool_calls" | "function_call" => Finish::Stop,
            "length" => Finish::Length,
            "content_filter" => Finish::ContentFilter,
            _ => Finish::Unknown,
        }
    }
}

/// Token counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Generated tokens.
    pub completion_tokens: i64,
}

/// A finished generation.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The whole output.
    pub output: String,
    /// Tokens used, as the provider reported them.
    pub usage: Usage,
    /// Why it stopped.
    pub finish: Finish,
    /// The model the provider reported (or the requested one).
    pub model: String,
    /// Waiting for an in-flight slot of the provider.
    pub queue_wait: Duration,
    /// From the first request sent to the first output token.
    pub first_token: Duration,
    /// From the first request sent to the end of the response.
    pub total: Duration,
    /// Attempts made.
    pub attempts: u32,
}

/// Why a provider call failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider's in-flight slots and wait queue are full, or no slot
    /// freed up in time.
    #[error("provider pool is busy: {0}")]
    Busy(String),
    /// The provider answered 429 on every attempt the deadline allowed.
    #[error("provider rate-limited the request (HTTP 429) after {attempts} attempts")]
    RateLimited {
        /// Attempts made.
        attempts: u32,
        /// The provider's Retry-After.
        retry_after: Option<Duration>,
    },
    /// The provider could not be reached or failed (connect error, dropped
    /// connection, 5xx, malformed response).
    #[error("provider unavailable ({kind}): {message}")]
    Unavailable {
        /// `connect`, `connection`, `http_5xx` or `malformed`.
        kind: &'static str,
        /// What happened (never contains the API key).
        message: String,
        /// The provider's Retry-After, if any.
        retry_after: Option<Duration>,
    },
    /// The provider refused the request (4xx other than 429).
    #[error("provider rejected the request with HTTP {status}: {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The provider's error message (never contains the API key).
        message: String,
    },
    /// The call did not finish before its deadline.
    #[error("provider call did not finish within {0:?}")]
    Timeout(Duration),
    /// The caller went away while output was streaming.
    #[error("the caller cancelled the stream")]
    Cancelled,
}

impl ProviderError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::Busy(_) => "pool_busy",
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::Unavailable { kind, .. } => kind,
            ProviderError::Rejected { .. } => "rejected",
            ProviderError::Timeout(_) => "timeout",
            ProviderError::Cancelled => "cancelled",
        }
    }
}

/// The configured provider.
#[derive(Debug)]
pub enum Provider {
    /// Deterministic offline provider.
    Local(local::LocalProvider),
    /// OpenAI-compatible HTTP endpoint.
    OpenAi(Box<openai::OpenAiProvider>),
}

impl Provider {
    /// Builds the provider the settings select; `pool_size` is the live
    /// `llm.pool_size` at start.
    pub fn from_settings(
        settings: &AgentServiceSettings,
        pool_size: usize,
    ) -> Result<Self, reqwest::Error> {
        Ok(match settings.effective_provider() {
            ProviderKind::Local => Provider::Local(local::LocalProvider::new(&settings.local)),
            ProviderKind::Openai => Provider::OpenAi(Box::new(openai::OpenAiProvider::new(
                &settings.openai,
                pool_size,
            )?)),
        })
    }

    /// The provider's name as responses report it.
    pub fn name(&self) -> &str {
        match self {
            Provider::Local(_) => local::NAME,
            Provider::OpenAi(provider) => provider.label(),
        }
    }

    /// True for the offline provider.
    pub fn offline(&self) -> bool {
        matches!(self, Provider::Local(_))
    }

    /// Whether the provider serves `model`.
    pub fn serves_model(&self, model: &str) -> bool {
        match self {
            Provider::Local(_) => true,
            Provider::OpenAi(provider) => provider.serves_model(model),
        }
    }

    /// Applies a new live `llm.pool_size`.
    pub fn set_pool_size(&self, pool_size: usize) {
        if let Provider::OpenAi(provider) = self {
            provider.set_pool_size(pool_size);
        }
    }

    /// In-flight provider requests, if the provider bounds them.
    pub fn occupancy(&self) -> Option<Occupancy> {
        match self {
            Provider::Local(_) => None,
            Provider::OpenAi(provider) => Some(provider.occupancy()),
        }
    }

    /// Generates a completion; streams deltas into `deltas` when given.
    pub async fn generate(
        &self,
        request: &ProviderRequest,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<Completion, ProviderError> {
        match self {
            Provider::Local(provider) => provider.generate(request, deltas).await,
            Provider::OpenAi(provider) => provider.generate(request, deltas).await,
        }
    }
}
