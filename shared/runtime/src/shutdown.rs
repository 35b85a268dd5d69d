//! One SIGINT/SIGTERM future for the whole process: the first signal starts
//! a graceful shutdown, a second one exits at once.

use tokio_util::sync::CancellationToken;

/// Cancelled when the process should shut down.
pub type ShutdownToken = CancellationToken;

/// Returns a token cancelled by the first SIGTERM or SIGINT; a second signal
/// exits the process immediately with status 130.
pub fn shutdown_on_signals() -> ShutdownToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received, draining (send again to exit at once)");
        cancel.cancel();
        wait_for_signal().await;
        tracing::warn!("second shutdown signal, exiting now");
        std::process::exit(130);
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut terminate), Ok(mut interrupt)) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, Ctrl-C is the only way in.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
