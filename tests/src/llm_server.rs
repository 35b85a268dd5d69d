//! A real HTTP server on loopback that speaks the OpenAI chat-completions
//! wire format (JSON and SSE streaming) and can be scripted to fail the
//! ways real providers do: 429 with Retry-After, 500, slow answers,
//! malformed bodies, dropped connections. It counts requests, connections
//! and the most requests it ever had in flight at once.

// A test fixture: a poisoned lock or a bad constant header is a test bug.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How the server answers one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Behaviour {
    /// A normal completion (after the server's default delay).
    Ok,
    /// 429 with `Retry-After` in seconds.
    RateLimited(f64),
    /// 500 with an OpenAI-style error body.
    ServerError,
    /// A normal completion after this delay.
    Slow(Duration),
    /// 200 with a body that is not JSON.
    Malformed,
    /// Closes the connection without answering.
    Drop,
}

#[derive(Default)]
struct State {
    script: Mutex<VecDeque<Behaviour>>,
    delay: Mutex<Duration>,
    bodies: Mutex<Vec<serde_json::Value>>,
    requests: AtomicUsize,
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// The running server.
pub struct LlmServer {
    address: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

struct InFlight<'a>(&'a State);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The deterministic answer to a request: the start of the last message.
pub fn answer_for(body: &serde_json::Value) -> String {
    let last = body["messages"]
        .as_array()
        .and_then(|messages| messages.last())
        .and_then(|message| message["content"].as_str())
        .unwrap_or_default();
    let words: Vec<&str> = last.split_whitespace().take(6).collect();
    format!("stub answer: {}", words.join(" "))
}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let bytes = request
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    state.requests.fetch_add(1, Ordering::SeqCst);
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _in_flight = InFlight(&state);
    state.bodies.lock().unwrap().push(body.clone());
    let behaviour = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Behaviour::Ok);
    let default_delay = *state.delay.lock().unwrap();
    let json = |status: StatusCode, text: String| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(text)))
            .unwrap()
    };
    match behaviour {
        Behaviour::RateLimited(seconds) => {
            let mut response = json(
                StatusCode::TOO_MANY_REQUESTS,
                r#"{"error":{"message":"rate limited","type":"rate_limit"}}"#.to_owned(),
            );
            response
                .headers_mut()
                .insert("retry-after", seconds.to_string().parse().unwrap());
            return Ok(response);
        }
        Behaviour::ServerError => {
            return Ok(json(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"error":{"message":"upstream exploded","type":"server_error"}}"#.to_owned(),
            ));
        }
        Behaviour::Malformed => {
            return Ok(json(StatusCode::OK, "{\"choices\": [oops".to_owned()));
        }
        Behaviour::Drop => {
            return Err(std::io::Error::other("dropping the connection"));
        }
        Behaviour::Slow(delay) => tokio::time::sleep(delay).await,
        Behaviour::Ok => {
            if !default_delay.is_zero() {
                tokio::time::sleep(default_delay).await;
            }
        }
    }
    let model = body["model"].as_str().unwrap_or("stub-model").to_owned();
    let answer = answer_for(&body);
    let prompt_tokens = 11;
    let completion_tokens = answer.split_whitespace().count();
    if body["stream"].as_bool() == Some(true) {
        let mut events = String::new();
        for piece in answer.split_inclusive(' ') {
            let chunk = serde_json::json!({
                "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]
            });
            events.push_str(&format!("data: {chunk}\n\n"));
        }
        let last = serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]
        });
        events.push_str(&format!("data: {last}\n\n"));
        let usage = serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
        });
        events.push_str(&format!("data: {usage}\n\ndata: [DONE]\n\n"));
        return Ok(Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/event-stream")
            .body(Full::new(Bytes::from(events)))
            .unwrap());
    }
    let response = serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
    });
    Ok(json(StatusCode::OK, response.to_string()))
}

impl LlmServer {
    /// Starts the server on an ephemeral loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let state = Arc::new(State::default());
        let stop = CancellationToken::new();
        {
            let state = Arc::clone(&state);
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        _ = stop.cancelled() => return,
                        accepted = listener.accept() => accepted,
                    };
                    let Ok((stream, _)) = accepted else { continue };
                    let _ = stream.set_nodelay(true);
                    state.connections.fetch_add(1, Ordering::SeqCst);
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        let service =
                            service_fn(move |request| handle(Arc::clone(&state), request));
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        }
        Ok(Self {
            address,
            state,
            stop,
        })
    }

    /// `http://address/v1`, the base URL a client is configured with.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.address)
    }

    /// Queues behaviours for the next requests (then `Ok` again).
    pub fn push(&self, behaviours: impl IntoIterator<Item = Behaviour>) {
        self.state.script.lock().unwrap().extend(behaviours);
    }

    /// Sets the delay of normal answers.
    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// Requests received.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Requests in flight now (a request whose client went away is no
    /// longer counted).
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Most requests in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// The JSON body of the newest request.
    pub fn last_body(&self) -> serde_json::Value {
        self.state
            .bodies
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for LlmServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
