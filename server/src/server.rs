//! The accept loop and graceful shutdown.
//!
//! Shutdown order (each step bounded): stop accepting; every connection
//! stops reading, finishes what it has in flight (commits included), sends
//! `shutting_down` and closes; the writer commits what is queued and stops;
//! the database is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use redb::Database;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::conn::{self, Shared};
use crate::index::Index;
use crate::store::{self, OpenError, ServerClock};
use crate::writer::{self, Request, WriterStats};

/// Connections answered `server_busy` at once, at most; past it, excess
/// connections are closed without a word.
const MAX_BUSY_REPLIES: usize = 64;
/// How long shutdown waits for the writer's last commit.
const WRITER_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the writer thread: {0}")]
    Writer(std::io::Error),
    #[error("the writer thread did not stop within {WRITER_STOP_TIMEOUT:?}")]
    WriterStuck,
    #[error("the writer thread panicked")]
    WriterPanicked,
    #[error("closing the database: {0}")]
    Close(redb::DatabaseError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A bound, not yet running, server.
pub struct Server {
    config: Config,
    listener: TcpListener,
    local_addr: SocketAddr,
    db: Arc<Database>,
    index: Arc<Index>,
    writer: mpsc::Sender<Request>,
    writer_thread: std::thread::JoinHandle<()>,
    stats: Arc<WriterStats>,
    boot: u64,
}

impl Server {
    /// Opens the data folder (a clear error if another server has it),
    /// rebuilds the index, starts the writer and binds the listener.
    pub async fn bind(config: Config) -> Result<Server, Error> {
        let started = Instant::now();
        let dir = config.data_dir.clone();
        let opened = tokio::task::spawn_blocking(move || store::open(&dir))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let opened_in = started.elapsed();
        let docs = opened.doc_times.len();
        let index = Arc::new(Index::rebuild(opened.doc_times, opened.clock));
        tracing::info!(
            path = %opened.path.display(),
            documents = docs,
            boot = opened.boot,
            open_ms = opened_in.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "database open, index rebuilt"
        );
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.listen.clone(),
            source,
        })?;
        let db = Arc::new(opened.db);
        let clock = ServerClock::new(config.wall_clock.clone(), opened.clock);
        let (writer, writer_thread, stats) = writer::spawn(
            db.clone(),
            clock,
            index.clone(),
            config.writer_queue,
            config.max_batch,
        )
        .map_err(Error::Writer)?;
        Ok(Server {
            config,
            listener,
            local_addr,
            db,
            index,
            writer,
            writer_thread,
            stats,
            boot: opened.boot,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The writer's counters (batches, commits, batch sizes).
    pub fn stats(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    /// Serves until `shutdown` is cancelled, then shuts down gracefully.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Server {
            config,
            listener,
            db,
            index,
            writer,
            writer_thread,
            boot,
            ..
        } = self;
        let max_connections = config.max_connections.max(1);
        let shutdown_timeout = config.shutdown_timeout;
        let shared = Arc::new(Shared {
            config,
            db: db.clone(),
            index,
            writer: writer.clone(),
            // Unique across restarts: the boot count is persisted.
            next_session: AtomicU64::new(boot << 40),
            shutdown: shutdown.clone(),
        });
        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(max_connections));
        let busy = Arc::new(Semaphore::new(MAX_BUSY_REPLIES));

        loop {
            // Take the permit before accepting (as mini-redis does); a
            // connection that arrives with none left is told `server_busy`.
            let permit = permits.clone().try_acquire_owned().ok();
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                r = listener.accept() => r,
            };
            let (socket, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually out of file descriptors: back off, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            };
            let _ = socket.set_nodelay(true);
            match permit.or_else(|| permits.clone().try_acquire_owned().ok()) {
                Some(permit) => {
                    tracing::debug!(%peer, "accepted");
                    let shared = shared.clone();
                    tracker.spawn(async move {
                        conn::serve(socket, shared).await;
                        drop(permit);
                    });
                }
                None => {
                    tracing::warn!(%peer, max_connections, "connection limit reached");
                    if let Ok(p) = busy.clone().try_acquire_owned() {
                        tracker.spawn(async move {
                            conn::reject_busy(socket, max_connections).await;
                            drop(p);
                        });
                    }
                }
            }
        }

        tracing::info!("shutting down: no longer accepting connections");
        drop(listener);
        tracker.close();
        if timeout(shutdown_timeout, tracker.wait()).await.is_err() {
            tracing::warn!(
                still_open = tracker.len(),
                ?shutdown_timeout,
                "connections still open after shutdown_timeout; stopping anyway"
            );
        }
        drop(shared);
        // Stop is queued behind everything already sent, so it is all
        // committed before the writer exits.
        let stopped = timeout(WRITER_STOP_TIMEOUT, writer.send(Request::Stop)).await;
        drop(writer);
        if !matches!(stopped, Ok(Ok(()))) {
            tracing::warn!("could not queue the writer's stop");
        }
        let joined = timeout(
            WRITER_STOP_TIMEOUT,
            tokio::task::spawn_blocking(move || writer_thread.join()),
        )
        .await;
        match joined {
            Err(_) => return Err(Error::WriterStuck),
            Ok(Err(e)) => return Err(Error::Internal(e.to_string())),
            Ok(Ok(Err(_))) => return Err(Error::WriterPanicked),
            Ok(Ok(Ok(()))) => {}
        }
        match Arc::try_unwrap(db) {
            Ok(db) => db.close().map_err(Error::Close)?,
            Err(_) => tracing::warn!(
                "database still referenced by unfinished connections; it closes when they end"
            ),
        }
        tracing::info!("database closed");
        Ok(())
    }
}
