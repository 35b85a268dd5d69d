//! The `openai` provider: any OpenAI-compatible chat-completions endpoint
//! (OpenAI, vLLM, Ollama, llama.cpp server, LiteLLM…).
//!
//! One pooled HTTP client per provider (keep-alive, `llm.pool_size` idle
//! connections per host, TCP_NODELAY) behind a [`Limiter`] of
//! `llm.pool_size` in-flight requests, so a burst queues (bounded, timed)
//! instead of opening unbounded connections. Connect errors, 429 and 5xx
//! are retried with exponential backoff and jitter, honouring
//! `Retry-After`, while the deadline allows. Streaming uses SSE with
//! `stream_options.include_usage`. The API key is read from the
//! environment once and never logged or echoed.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use agentmesh_resilience::Backoff;
use agentmesh_settings::bootstrap::OpenAiProviderSettings;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Completion, Finish, ProviderError, ProviderRequest, Usage};
use crate::limiter::{AcquireError, Limiter, Occupancy};

/// Default endpoint when no base URL is configured.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// Longest SSE line accepted before the stream counts as malformed.
const MAX_SSE_LINE: usize = 1024 * 1024;

/// Longest provider error text kept in messages.
const MAX_ERROR_TEXT: usize = 512;

/// The OpenAI-compatible provider.
pub struct OpenAiProvider {
    label: String,
    completions_url: String,
    api_key: Option<String>,
    models: Vec<String>,
    settings: OpenAiProviderSettings,
    /// The pooled client and the pool size it was built with; rebuilt when
    /// `llm.pool_size` changes.
    client: RwLock<(usize, reqwest::Client)>,
    limiter: Arc<Limiter>,
}

impl std::fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Deliberately without the API key.
        f.debug_struct("OpenAiProvider")
            .field("label", &self.label)
            .field("completions_url", &self.completions_url)
            .field("api_key_set", &self.api_key.is_some())
            .field("models", &self.models)
            .finish()
    }
}

/// Installs ring as rustls's process-wide crypto provider (reqwest is built
/// with `rustls-no-provider`); a second call leaves it in place.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn build_client(
    pool_size: usize,
    connect_timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    install_crypto_provider();
    reqwest::Client::builder()
        .pool_max_idle_per_host(pool_size)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .connect_timeout(connect_timeout)
        .build()
}

/// A failed attempt and whether another may follow.
struct AttemptError {
    error: ProviderError,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl AttemptError {
    fn fatal(error: ProviderError) -> Self {
        Self {
            error,
            retryable: false,
            retry_after: None,
        }
    }
}

#[derive(Deserialize)]
struct ChatResponse {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<ChatChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct ChatChoice {
    message: ChatChoiceMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChatChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: i64,
    #[serde(default)]
    completion_tokens: i64,
}

#[derive(Deserialize)]
struct ChatChunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<ChunkDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
}

impl OpenAiProvider {
    /// Builds the provider and its pooled client; reads the API key from
    /// the environment variable the settings name.
    pub fn new(
        settings: &OpenAiProviderSettings,
        pool_size: usize,
    ) -> Result<Self, reqwest::Error> {
        let base_url = settings
            .base_url
            .clone()
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_owned());
        let api_key = std::env::var(&settings.api_key_env)
            .ok()
            .filter(|key| !key.trim().is_empty());
        let pool_size = pool_size.max(1);
        let client = build_client(
            pool_size,
            Duration::from_millis(settings.connect_timeout_ms),
        )?;
        tracing::info!(
            provider = settings.label,
            base_url = agentmesh_settings::bootstrap::mask_url(&base_url),
            api_key_set = api_key.is_some(),
            pool_size,
            "openai-compatible provider configured"
        );
        Ok(Self {
            label: settings.label.clone(),
            completions_url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            api_key,
            models: settings.models.clone(),
            settings: settings.clone(),
            client: RwLock::new((pool_size, client)),
            limiter: Limiter::new(pool_size, settings.max_queued as usize),
        })
    }

    /// The provider name responses report.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether the endpoint serves `model` (any model when none are listed).
    pub fn serves_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|served| served == model)
    }

    /// In-flight requests and waiters.
    pub fn occupancy(&self) -> Occupancy {
        self.limiter.occupancy()
    }

    /// Applies a new `llm.pool_size`: the in-flight bound changes at once,
    /// the idle pool with a rebuilt client (in-flight requests finish on the
    /// old one).
    pub fn set_pool_size(&self, pool_size: usize) {
        let pool_size = pool_size.max(1);
        self.limiter.set_capacity(pool_size);
        let mut guard = self
            .client
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.0 == pool_size {
            return;
        }
        match build_client(
            pool_size,
            Duration::from_millis(self.settings.connect_timeout_ms),
        ) {
            Ok(client) => {
                *guard = (pool_size, client);
                tracing::info!(provider = self.label, pool_size, "provider pool resized");
            }
            Err(error) => {
                tracing::warn!(provider = self.label, %error, "cannot rebuild the provider client");
            }
        }
    }

    fn client(&self) -> reqwest::Client {
        self.client
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .clone()
    }

    /// Removes the API key from text that may echo it.
    fn scrub(&self, text: &str) -> String {
        let mut cleaned: String = text.chars().take(MAX_ERROR_TEXT).collect();
        if let Some(key) = &self.api_key {
            cleaned = cleaned.replace(key.as_str(), "****");
        }
        cleaned
    }

    /// Runs the request through the in-flight bound, with retries.
    pub async fn generate(
        &self,
        request: &ProviderRequest,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<Completion, ProviderError> {
        let queue_started = Instant::now();
        let remaining = request.deadline.saturating_duration_since(queue_started);
        let queue_limit = Duration::from_millis(self.settings.queue_timeout_ms).min(remaining);
        let _permit = match self.limiter.acquire(queue_limit).await {
            Ok(permit) => permit,
            Err(AcquireError::Timeout { .. }) if Instant::now() >= request.deadline => {
                return Err(ProviderError::Timeout(queue_started.elapsed()));
            }
            Err(error) => return Err(ProviderError::Busy(error.to_string())),
        };
        let queue_wait = queue_started.elapsed();
        let body = self.body(request, deltas.is_some());
        let client = self.client();
        let mut backoff = Backoff::new(
            Duration::from_millis(self.settings.retry_initial_ms),
            Duration::from_millis(self.settings.retry_max_ms),
        );
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let now = Instant::now();
            if now >= request.deadline {
                return Err(ProviderError::Timeout(started.elapsed()));
            }
            let remaining = request.deadline - now;
            let failure = match self
                .attempt(&client, &body, remaining, deltas, started)
                .await
            {
                Ok(mut completion) => {
                    if completion.model.is_empty() {
                        completion.model.clone_from(&request.model);
                    }
                    completion.queue_wait = queue_wait;
                    completion.total = started.elapsed();
                    completion.attempts = attempts;
                    return Ok(completion);
                }
                Err(failure) => failure,
            };
            metrics::counter!(
                "agentmesh_agent_provider_errors_total",
                "provider" => self.label.clone(),
                "kind" => failure.error.kind()
            )
            .increment(1);
            let attempts_left = attempts <= self.settings.max_retries;
            if !failure.retryable || !attempts_left {
                return Err(final_error(failure.error, attempts));
            }
            let delay = failure.retry_after.unwrap_or_else(|| backoff.next_delay());
            if Instant::now() + delay >= request.deadline {
                tracing::debug!(
                    provider = self.label,
                    delay_ms = delay.as_millis() as u64,
                    "no retry: the wait would pass the deadline"
                );
                return Err(final_error(failure.error, attempts));
            }
            tracing::debug!(
                provider = self.label,
                attempt = attempts,
                delay_ms = delay.as_millis() as u64,
                error = %failure.error,
                "retrying provider call"
            );
            metrics::counter!("agentmesh_agent_provider_retries_total", "provider" => self.label.clone())
                .increment(1);
            tokio::time::sleep(delay).await;
        }
    }

    fn body(&self, request: &ProviderRequest, stream: bool) -> serde_json::Value {
        let mut body = serde_json::json!({
            "model": request.model,
            "messages": request.messages,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "stream": stream,
        });
        if stream {
            body["stream_options"] = serde_json::json!({ "include_usage": true });
        }
        body
    }

    async fn attempt(
        &self,
        client: &reqwest::Client,
        body: &serde_json::Value,
        remaining: Duration,
        deltas: Option<&mpsc::Sender<String>>,
        started: Instant,
    ) -> Result<Completion, AttemptError> {
        let mut builder = client
            .post(&self.completions_url)
            .json(body)
            .timeout(remaining);
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key);
        }
        let response = builder
            .send()
            .await
            .map_err(|error| self.transport_error(&error, started))?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers());
        if status.as_u16() == 429 {
            return Err(AttemptError {
                error: ProviderError::RateLimited {
                    attempts: 1,
                    retry_after,
                },
                retryable: true,
                retry_after,
            });
        }
        if status.is_server_error() {
            let text = response.text().await.unwrap_or_default();
            return Err(AttemptError {
                error: ProviderError::Unavailable {
                    kind: "http_5xx",
                    message: format!(
                        "HTTP {}: {}",
                        status.as_u16(),
                        self.scrub(&error_text(&text))
                    ),
                    retry_after,
                },
                retryable: true,
                retry_after,
            });
        }
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(AttemptError::fatal(ProviderError::Rejected {
                status: status.as_u16(),
                message: self.scrub(&error_text(&text)),
            }));
        }
        match deltas {
            None => self.read_whole(response, started).await,
            Some(deltas) => self.read_stream(response, deltas, started).await,
        }
    }

    fn transport_error(&self, error: &reqwest::Error, started: Instant) -> AttemptError {
        if error.is_timeout() {
            return AttemptError::fatal(ProviderError::Timeout(started.elapsed()));
        }
        // reqwest errors name the URL, never headers, so the key cannot leak;
        // scrub anyway in case a proxy echoes it.
        let message = self.scrub(&error_chain(error));
        if error.is_connect() {
            return AttemptError {
                error: ProviderError::Unavailable {
                    kind: "connect",
                    message,
                    retry_after: None,
                },
                retryable: true,
                retry_after: None,
            };
        }
        // The request may have reached the model: not retried, so a
        // completion is never paid for twice.
        AttemptError::fatal(ProviderError::Unavailable {
            kind: "connection",
            message,
            retry_after: None,
        })
    }

    async fn read_whole(
        &self,
        response: reqwest::Response,
        started: Instant,
    ) -> Result<Completion, AttemptError> {
        let bytes = response
            .bytes()
            .await
            .map_err(|error| self.transport_error(&error, started))?;
        let parsed: ChatResponse = serde_json::from_slice(&bytes).map_err(|error| {
            AttemptError::fatal(ProviderError::Unavailable {
                kind: "malformed",
                message: format!("response is not a chat completion: {error}"),
                retry_after: None,
            })
        })?;
        let Some(choice) = parsed.choices.into_iter().next() else {
            return Err(AttemptError::fatal(ProviderError::Unavailable {
                kind: "malformed",
                message: "response has no choices".to_owned(),
                retry_after: None,
            }));
        };
        let elapsed = started.elapsed();
        let usage = parsed.usage.unwrap_or(WireUsage {
            prompt_tokens: 0,
            completion_tokens: 0,
        });
        Ok(Completion {
            output: choice.message.content.unwrap_or_default(),
            usage: Usage {
                prompt_tokens: usage.prompt_tokens.max(0),
                completion_tokens: usage.completion_tokens.max(0),
            },
            finish: choice
                .finish_reason
                .as_deref()
                .map_or(Finish::Unknown, Finish::from_openai),
            model: parsed.model.unwrap_or_default(),
            queue_wait: Duration::ZERO,
            first_token: elapsed,
            total: elapsed,
            attempts: 1,
        })
    }

    async fn read_stream(
        &self,
        response: reqwest::Response,
        deltas: &mpsc::Sender<String>,
        started: Instant,
    ) -> Result<Completion, AttemptError> {
        let mut body = response.bytes_stream();
        let mut buffer: Vec<u8> = Vec::new();
        let mut output = String::new();
        let mut first_token = None;
        let mut usage = None;
        let mut finish = None;
        let mut model = String::new();
        let mut done = false;
        let mut sent_any = false;
        let malformed = |message: String| {
            AttemptError::fatal(ProviderError::Unavailable {
                kind: "malformed",
                message,
                retry_after: None,
            })
        };
        'read: while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|error| {
                let mut failure = self.transport_error(&error, started);
                if sent_any {
                    failure.retryable = false;
                }
                failure
            })?;
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.iter().position(|byte| *byte == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\r', '\n']);
                let Some(data) = line.strip_prefix("data:") else {
                    // Comments, `event:`, `id:` and blank separators.
                    continue;
                };
                let data = data.trim_start();
                if data == "[DONE]" {
                    done = true;
                    break 'read;
                }
                let event: ChatChunk = serde_json::from_str(data)
                    .map_err(|error| malformed(format!("stream event is not a chunk: {error}")))?;
                if let Some(reported) = event.model.filter(|name| !name.is_empty()) {
                    model = reported;
                }
                if let Some(reported) = event.usage {
                    usage = Some(reported);
                }
                for choice in event.choices {
                    if let Some(reason) = choice.finish_reason {
                        finish = Some(Finish::from_openai(&reason));
                    }
                    let Some(content) = choice.delta.and_then(|delta| delta.content) else {
                        continue;
                    };
                    if content.is_empty() {
                        continue;
                    }
                    first_token.get_or_insert_with(|| started.elapsed());
                    output.push_str(&content);
                    sent_any = true;
                    deltas
                        .send(content)
                        .await
                        .map_err(|_| AttemptError::fatal(ProviderError::Cancelled))?;
                }
            }
            if buffer.len() > MAX_SSE_LINE {
                return Err(malformed("stream line longer than 1 MiB".to_owned()));
            }
        }
        if !done && finish.is_none() {
            return Err(AttemptError {
                error: ProviderError::Unavailable {
                    kind: "connection",
                    message: "stream ended before the final event".to_owned(),
                    retry_after: None,
                },
                retryable: false,
                retry_after: None,
            });
        }
        let usage = usage.unwrap_or(WireUsage {
            prompt_tokens: 0,
            completion_tokens: 0,
        });
        let total = started.elapsed();
        Ok(Completion {
            output,
            usage: Usage {
                prompt_tokens: usage.prompt_tokens.max(0),
                completion_tokens: usage.completion_tokens.max(0),
            },
            finish: finish.unwrap_or(Finish::Unknown),
            model,
            queue_wait: Duration::ZERO,
            first_token: first_token.unwrap_or(total),
            total,
            attempts: 1,
        })
    }
}

/// Sets the attempt count on the error the caller sees.
fn final_error(error: ProviderError, attempts: u32) -> ProviderError {
    match error {
        ProviderError::RateLimited { retry_after, .. } => ProviderError::RateLimited {
            attempts,
            retry_after,
        },
        other => other,
    }
}

/// The provider's error message from an OpenAI-style error body, else the
/// start of the body.
fn error_text(body: &str) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: ErrorDetail,
    }
    #[derive(Deserialize)]
    struct ErrorDetail {
        message: String,
    }
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(parsed) => parsed.error.message,
        Err(_) => body.trim().chars().take(MAX_ERROR_TEXT).collect(),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0)
            .then(|| Duration::from_secs_f64(seconds.min(3600.0)));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(reqwest::header::RETRY_AFTER, "0.25".parse().unwrap());
        assert_eq!(
            parse_retry_after(&headers),
            Some(Duration::from_millis(250))
        );
        let past = httpdate::fmt_http_date(std::time::SystemTime::UNIX_EPOCH);
        headers.insert(reqwest::header::RETRY_AFTER, past.parse().unwrap());
        assert_eq!(parse_retry_after(&headers), Some(Duration::ZERO));
        headers.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), None);
    }

    #[test]
    fn error_text_prefers_the_openai_message() {
        assert_eq!(
            error_text(r#"{"error":{"message":"model not found","type":"x"}}"#),
            "model not found"
        );
        assert_eq!(error_text("  plain failure "), "plain failure");
    }

    #[test]
    fn debug_never_shows_the_key() {
        let provider = OpenAiProvider {
            label: "openai".into(),
            completions_url: "http://x/v1/chat/completions".into(),
            api_key: Some("sk-secret-123".into()),
            models: vec![],
            settings: OpenAiProviderSettings::default(),
            client: RwLock::new((1, build_client(1, Duration::from_secs(1)).unwrap())),
            limiter: Limiter::new(1, 1),
        };
        let shown = format!("{provider:?}");
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert_eq!(provider.scrub("bad key sk-secret-123"), "bad key ****");
    }
}
