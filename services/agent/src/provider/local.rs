//! The `local` provider: deterministic and offline. It answers from the
//! rendered prompt (same input, same output), counts tokens the same way
//! every time (whitespace-separated words), and can add an artificial
//! latency for experiments. Every response names it as the provider with
//! `offline = true`, so nobody mistakes its output for a model's.

use std::time::Duration;

use agentmesh_settings::bootstrap::LocalProviderSettings;
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{ChatMessage, Completion, Finish, ProviderError, ProviderRequest, Usage};

/// The provider name in responses.
pub const NAME: &str = "local";

/// Words of the prompt echoed back at most (before `max_tokens`).
const ECHO_WORDS: usize = 48;

/// The deterministic offline provider.
#[derive(Clone, Debug)]
pub struct LocalProvider {
    latency: Duration,
    jitter: Duration,
}

/// Counts tokens as whitespace-separated words.
pub fn count_tokens(text: &str) -> i64 {
    text.split_whitespace().count() as i64
}

impl LocalProvider {
    /// A provider with the configured artificial latency.
    pub fn new(settings: &LocalProviderSettings) -> Self {
        Self {
            latency: Duration::from_millis(settings.latency_ms),
            jitter: Duration::from_millis(settings.jitter_ms),
        }
    }

    /// The output for a conversation: a digest of the whole input and an
    /// echo of the start of the last message, cut to `max_tokens` words.
    pub fn answer(request: &ProviderRequest) -> (String, Finish) {
        let mut hasher = Sha256::new();
        hasher.update(request.model.as_bytes());
        hasher.update(request.temperature.to_bits().to_be_bytes());
        for ChatMessage { role, content } in &request.messages {
            hasher.update((role.len() as u64).to_be_bytes());
            hasher.update(role.as_bytes());
            hasher.update((content.len() as u64).to_be_bytes());
            hasher.update(content.as_bytes());
        }
        let digest = hex::encode(&hasher.finalize()[..6]);
        let prompt = request
            .messages
            .last()
            .map(|message| message.content.as_str())
            .unwrap_or_default();
        let mut words: Vec<&str> = vec!["[local", "offline", "provider", digest.as_str()];
        words.push("echo:");
        words.extend(prompt.split_whitespace().take(ECHO_WORDS));
        let limit = usize::try_from(request.max_tokens.max(1)).unwrap_or(usize::MAX);
        let finish = if words.len() > limit {
            words.truncate(limit);
            Finish::Length
        } else {
            Finish::Stop
        };
        let mut output = words.join(" ");
        if let Some(rest) = output.strip_prefix("[local offline provider ") {
            output = format!("[local offline provider] {rest}");
        }
        (output, finish)
    }

    /// Generates the deterministic answer after the artificial latency.
    pub async fn generate(
        &self,
        request: &ProviderRequest,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<Completion, ProviderError> {
        let started = Instant::now();
        let mut delay = self.latency;
        if !self.jitter.is_zero() {
            let jitter_micros = rand::rng().random_range(0..=self.jitter.as_micros() as u64);
            delay += Duration::from_micros(jitter_micros);
        }
        if !delay.is_zero() {
            if started + delay > request.deadline {
                tokio::time::sleep_until(request.deadline).await;
                return Err(ProviderError::Timeout(started.elapsed()));
            }
            tokio::time::sleep(delay).await;
        }
        let (output, finish) = Self::answer(request);
        let first_token = started.elapsed();
        if let Some(deltas) = deltas {
            for piece in output.split_inclusive(' ') {
                deltas
                    .send(piece.to_owned())
                    .await
                    .map_err(|_| ProviderError::Cancelled)?;
            }
        }
        let usage = Usage {
            prompt_tokens: request
                .messages
                .iter()
                .map(|message| count_tokens(&message.content))
                .sum(),
            completion_tokens: count_tokens(&output),
        };
        Ok(Completion {
            output,
            usage,
            finish,
            model: request.model.clone(),
            queue_wait: Duration::ZERO,
            first_token,
            total: started.elapsed(),
            attempts: 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(prompt: &str, max_tokens: i64) -> ProviderRequest {
        ProviderRequest {
            model: "m".into(),
            temperature: 0.5,
            max_tokens,
            messages: vec![
                ChatMessage {
                    role: "system".into(),
                    content: "be brief".into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: prompt.into(),
                },
            ],
            deadline: Instant::now() + Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn same_input_same_output_and_usage() {
        let provider = LocalProvider::new(&LocalProviderSettings::default());
        let first = provider
            .generate(&request("write a parser", 100), None)
            .await
            .unwrap();
        let second = provider
            .generate(&request("write a parser", 100), None)
            .await
            .unwrap();
        assert_eq!(first.output, second.output);
        assert_eq!(first.usage, second.usage);
        assert_eq!(first.usage.prompt_tokens, 5);
        assert!(first.output.starts_with("[local offline provider]"));
        assert!(first.output.ends_with("echo: write a parser"));
        let other = provider
            .generate(&request("write a lexer", 100), None)
            .await
            .unwrap();
        assert_ne!(first.output, other.output);
    }

    #[tokio::test]
    async fn max_tokens_cuts_the_output() {
        let provider = LocalProvider::new(&LocalProviderSettings::default());
        let completion = provider
            .generate(&request("a b c d e f g", 3), None)
            .await
            .unwrap();
        assert_eq!(completion.usage.completion_tokens, 3);
        assert_eq!(completion.finish, Finish::Length);
    }

    #[tokio::test]
    async fn streams_pieces_that_add_up_to_the_output() {
        let provider = LocalProvider::new(&LocalProviderSettings::default());
        let (sender, mut receiver) = mpsc::channel(100);
        let completion = provider
            .generate(&request("one two three", 100), Some(&sender))
            .await
            .unwrap();
        drop(sender);
        let mut streamed = String::new();
        while let Some(piece) = receiver.recv().await {
            streamed.push_str(&piece);
        }
        assert_eq!(streamed, completion.output);
    }

    #[tokio::test]
    async fn latency_beyond_the_deadline_times_out() {
        let provider = LocalProvider::new(&LocalProviderSettings {
            latency_ms: 10_000,
            jitter_ms: 0,
        });
        let mut slow = request("x", 10);
        slow.deadline = Instant::now() + Duration::from_millis(20);
        assert!(matches!(
            provider.generate(&slow, None).await,
            Err(ProviderError::Timeout(_))
        ));
    }
}
