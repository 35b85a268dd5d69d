//! Runs the loopback OpenAI-compatible test server standalone, for
//! benchmarks: `cargo run --release -p agentmesh-tests --example llm_stub`.
//! Prints `listening <base_url>` and serves until killed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = agentmesh_tests::llm_server::LlmServer::start().await?;
    println!("listening {}", server.base_url());
    std::future::pending::<()>().await;
    Ok(())
}
