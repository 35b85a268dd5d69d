//! The `agentmesh` binary: `up` (the whole suite in one process), `serve
//! <service>`, `migrate`, `bench`, `audit`, `health`, `keys` and `usage`.
//! Thin: it parses arguments, loads settings, starts telemetry and calls
//! the service libraries.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod audit_cli;
mod bench;
mod cli;
mod health;
mod keys_cli;
mod run;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // reqwest is built with rustls-no-provider: install ring once, first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("agentmesh: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run::dispatch(cli))
}
