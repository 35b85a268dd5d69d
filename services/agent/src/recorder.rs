//! The recorder: execution records go through a bounded queue to one
//! background writer that inserts them in batches, off the response path.
//! When the queue is full, executions wait for room (back-pressure, seen in
//! the `record` stage timing) rather than drop records. `flush` gives
//! read-your-writes for `GetExecution` and `Replay` on this node.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::store::{ExecutionRecord, Store};

/// Records written per transaction at most.
const BATCH: usize = 128;

enum Command {
    Record(Box<ExecutionRecord>),
    Flush(oneshot::Sender<()>),
}

/// Handle to the background writer.
#[derive(Clone, Debug)]
pub struct Recorder {
    sender: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Record(record) => write!(f, "Record({})", record.execution_id),
            Command::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl Recorder {
    /// Starts the writer; it drains the queue and stops after `shutdown`.
    pub fn start(
        store: Store,
        capacity: usize,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let task = tokio::spawn(write_loop(store, receiver, shutdown));
        (Self { sender }, task)
    }

    /// Queues a record, waiting for room when the queue is full.
    pub async fn record(&self, record: ExecutionRecord) {
        let gauge = metrics::gauge!("agentmesh_agent_record_queue_depth");
        if let Err(error) = self.sender.send(Command::Record(Box::new(record))).await {
            tracing::error!(?error, "execution recorder stopped; record lost");
            metrics::counter!("agentmesh_agent_records_lost_total").increment(1);
        }
        gauge.set((self.sender.max_capacity() - self.sender.capacity()) as f64);
    }

    /// Queues a record without waiting (used when a call is cancelled);
    /// returns false when the queue is full.
    pub fn try_record(&self, record: ExecutionRecord) -> bool {
        let sent = self
            .sender
            .try_send(Command::Record(Box::new(record)))
            .is_ok();
        if !sent {
            metrics::counter!("agentmesh_agent_records_lost_total").increment(1);
        }
        sent
    }

    /// Waits until every record queued before this call is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.sender.send(Command::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

async fn write_loop(
    store: Store,
    mut receiver: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) {
    let mut batch: Vec<ExecutionRecord> = Vec::with_capacity(BATCH);
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            command = receiver.recv() => command,
            _ = shutdown.cancelled() => {
                // Drain what is queued, then stop.
                receiver.close();
                receiver.recv().await
            }
        };
        let Some(first) = first else { break };
        let mut next = Some(first);
        while let Some(command) = next.take() {
            match command {
                Command::Record(record) => batch.push(*record),
                Command::Flush(done) => waiters.push(done),
            }
            if batch.len() >= BATCH {
                break;
            }
            next = receiver.try_recv().ok();
        }
        write(&store, &mut batch).await;
        for waiter in waiters.drain(..) {
            let _ = waiter.send(());
        }
    }
    write(&store, &mut batch).await;
}

async fn write(store: &Store, batch: &mut Vec<ExecutionRecord>) {
    if batch.is_empty() {
        return;
    }
    let mut attempt = 0;
    loop {
        match store.insert_executions(batch).await {
            Ok(()) => {
                metrics::counter!("agentmesh_agent_records_written_total")
                    .increment(batch.len() as u64);
                batch.clear();
                return;
            }
            Err(error) if attempt < 3 => {
                attempt += 1;
                tracing::warn!(%error, attempt, records = batch.len(), "writing execution records failed, retrying");
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(error) => {
                tracing::error!(%error, records = batch.len(), "execution records lost");
                metrics::counter!("agentmesh_agent_records_lost_total")
                    .increment(batch.len() as u64);
                batch.clear();
                return;
            }
        }
    }
}
