//! The accept loop and graceful shutdown.
//!
//! Shutdown order (each step bounded): stop accepting; every connection
//! stops reading, finishes what it has in flight (commits included), sends
//! `shutting_down` and closes; the writer commits what is queued and stops;
//! the database is closed.
//!
//! TLS on the wrong port (PROTOCOL.md 2.1): the TLS listener peeks at a
//! connection's first byte and answers a plain client (no 0x16) in the
//! clear; a ClientHello on the plain listener is `conn`'s to answer.
//!
//! Touches the tenants (opened at bind, stopped last), the tokens file
//! (reloaded on change; revocations end connections through `conn`), the
//! connections, the metrics listener (kept while the connections drain,
//! so its `/healthz` reports the shutdown) and the admin socket.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use notesync_protocol::header::TLS_HANDSHAKE;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{timeout, timeout_at};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{FailBudget, TokenError, Tokens};
use crate::config::{Config, TlsFiles};
use crate::conn::{self, Rd, Shared, Wr};
use crate::metrics::Counted;
use crate::store::OpenError;
use crate::tenants::{StopError, TenantError, Tenants};
use crate::writer::WriterStats;

/// Connections answered `server_busy` at once, at most; past it, excess
/// connections are closed without a word.
const MAX_BUSY_REPLIES: usize = 64;

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Tenant(#[from] TenantError),
    #[error(transparent)]
    Tokens(#[from] TokenError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "refusing to listen on {addr} without authentication: the data folder has no tokens. \
         Add one (notesync-server token add --namespace NAME --data DIR), or listen on a loopback address"
    )]
    Unprotected { addr: SocketAddr },
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Stop(#[from] StopError),
}

/// Why the TLS certificate and key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} from {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("no certificate in {}", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{what}{source}")]
    Config {
        what: &'static str,
        #[source]
        source: tokio_rustls::rustls::Error,
    },
}

/// A bound, not yet running, server.
pub struct Server {
    config: Config,
    listener: TcpListener,
    local_addr: SocketAddr,
    tenants: Arc<Tenants>,
    tokens: Tokens,
    tls: Option<TlsAcceptor>,
    /// The metrics listener and its address (`Config::metrics`).
    metrics: Option<(TcpListener, SocketAddr)>,
    /// `DATA/admin.sock`, for export, check and backup.
    admin: Option<crate::admin::AdminSocket>,
}

fn load_tls(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            what: "certificates",
            path: files.cert.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Read {
        what: "the private key",
        path: files.key.clone(),
        source,
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config { what: "", source })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Config {
            what: "certificate and key do not form a usable pair: ",
            source,
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl Server {
    /// Opens the data folder (a clear error if another server has it),
    /// rebuilds the `default` namespace's index, starts its writer, loads
    /// the tokens and binds the listener.
    pub async fn bind(config: Config) -> Result<Server, Error> {
        let started = Instant::now();
        let tenants = Arc::new(Tenants::open(config.clone()).await?);
        let tokens = Tokens::load(&config.data_dir)?;
        let tls = config.tls.as_ref().map(load_tls).transpose()?;
        let metrics = match &config.metrics {
            Some(addr) => {
                Some(
                    crate::metrics_http::bind(addr)
                        .await
                        .map_err(|source| Error::Bind {
                            addr: addr.clone(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        // Without it the operations commands cannot reach this server (they
        // say so); serving goes on.
        let admin = crate::admin::AdminSocket::bind(&config.data_dir)
            .inspect_err(|e| tracing::warn!(error = %e, "cannot listen on the admin socket"))
            .ok();
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
        let auth = auth_required(&config, &tokens);
        if !auth && !local_addr.ip().is_loopback() {
            return Err(Error::Unprotected { addr: local_addr });
        }
        if auth {
            tracing::info!(
                tokens = tokens.len(),
                "authentication required: every connection must send a token"
            );
        } else {
            tracing::info!(
                "authentication off: no tokens in the data folder, so anyone who can reach {local_addr} \
                 reads and writes namespace default; listening on loopback only"
            );
        }
        tracing::info!(
            tls = tls.is_some(),
            startup_ms = started.elapsed().as_secs_f64() * 1e3,
            "ready"
        );
        Ok(Server {
            config,
            listener,
            local_addr,
            tenants,
            tokens,
            tls,
            metrics,
            admin,
        })
    }

    /// The address the metrics listener bound (with `Config::metrics`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(_, a)| *a)
    }

    /// The admin socket the operations commands use, if it could be bound.
    pub fn admin_socket(&self) -> Option<&std::path::Path> {
        self.admin.as_ref().map(|a| a.path())
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The `default` namespace's writer counters (batches, commits, batch
    /// sizes).
    pub fn stats(&self) -> Arc<WriterStats> {
        self.tenants.default_tenant().stats.clone()
    }

    /// Serves until `shutdown` is cancelled, then shuts down gracefully.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Server {
            config,
            listener,
            tenants,
            tokens,
            tls,
            metrics,
            admin,
            ..
        } = self;
        let data_dir = config.data_dir.clone();
        let max_connections = config.max_connections.max(1);
        let shutdown_timeout = config.shutdown_timeout;
        let handshake_timeout = config.handshake_timeout;
        let boot = tenants.default_tenant().boot;
        let shared = Arc::new(Shared {
            auth_required: AtomicBool::new(auth_required(&config, &tokens)),
            fails: FailBudget::new(config.max_failed_auth.max(1), config.failed_auth_window),
            tokens,
            tenants: tenants.clone(),
            authed: Default::default(),
            // Unique across restarts: the boot count is persisted.
            next_session: AtomicU64::new(boot << 40),
            shutdown: shutdown.clone(),
            config,
        });
        let tracker = TaskTracker::new();
        tracker.spawn(watch_tokens(shared.clone()));
        // Outside `tracker`: it answers while the connections drain (its
        // `/healthz` says 503 then) and stops before the databases close,
        // which need every reference to `tenants` gone.
        let metrics_stop = CancellationToken::new();
        let metrics = metrics.map(|(listener, _)| {
            tokio::spawn(crate::metrics_http::serve(
                listener,
                tenants.clone(),
                shutdown.clone(),
                metrics_stop.clone(),
            ))
        });
        if let Some(admin) = admin {
            tracker.spawn(crate::admin::serve(
                admin,
                tenants.clone(),
                data_dir,
                tracker.clone(),
                shutdown.clone(),
            ));
        }
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
            let refusal = if shared.auth_required.load(Ordering::Relaxed)
                && let Some(retry_in) = shared.fails.blocked(peer.ip())
            {
                tracing::debug!(%peer, "refused: failed-authentication budget used up");
                Some(conn::blocked_frame(
                    retry_in,
                    shared.config.max_failed_auth,
                    shared.config.failed_auth_window,
                ))
            } else {
                None
            };
            match permit.or_else(|| permits.clone().try_acquire_owned().ok()) {
                Some(permit) if refusal.is_none() => {
                    tracing::debug!(%peer, "accepted");
                    let shared = shared.clone();
                    let tls = tls.clone();
                    tracker.spawn(async move {
                        let _open = crate::metrics::connection();
                        if let Some((rd, wr)) =
                            open_stream(socket, peer, tls, handshake_timeout).await
                        {
                            conn::serve(rd, wr, peer, shared).await;
                        }
                        drop(permit);
                    });
                }
                permit => {
                    drop(permit);
                    let frame = refusal.unwrap_or_else(|| {
                        tracing::warn!(%peer, max_connections, "connection limit reached");
                        conn::busy_frame(max_connections)
                    });
                    if let Ok(p) = busy.clone().try_acquire_owned() {
                        let tls = tls.clone();
                        tracker.spawn(async move {
                            refuse(socket, peer, tls, handshake_timeout, frame).await;
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
        metrics_stop.cancel();
        if let Some(metrics) = metrics
            && let Err(e) = metrics.await
        {
            tracing::warn!(error = %e, "the metrics listener task failed");
        }
        tenants.stop().await?;
        tracing::info!("databases closed");
        Ok(())
    }
}

/// The connection's byte stream: plain, or TLS after its handshake (which
/// must finish within `handshake_timeout`).
async fn open_stream(
    socket: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
) -> Option<(Rd, Wr)> {
    match tls {
        None => {
            let (rd, wr) = socket.into_split();
            Some((Box::new(Counted(rd)), Box::new(Counted(wr))))
        }
        Some(acceptor) => {
            let deadline = tokio::time::Instant::now() + handshake_timeout;
            if !opens_with_tls(&socket, peer, deadline).await {
                let (rd, wr) = socket.into_split();
                conn::reject(
                    Box::new(Counted(rd)),
                    Box::new(Counted(wr)),
                    conn::plain_on_tls_port(),
                )
                .await;
                return None;
            }
            match timeout_at(deadline, acceptor.accept(Counted(socket))).await {
                Ok(Ok(stream)) => {
                    let (rd, wr) = tokio::io::split(stream);
                    Some((Box::new(rd), Box::new(wr)))
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    None
                }
            }
        }
    }
}

/// Whether a connection to the TLS listener may go on to the handshake:
/// false for a plain notesync client, whose first byte is a frame header,
/// not 0x16 (PROTOCOL.md 2.1). The byte is peeked, not read: the TLS
/// acceptor reads the record itself, and fails on its own (logged at
/// debug) for a peer that closes or says nothing.
async fn opens_with_tls(
    socket: &TcpStream,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> bool {
    let mut first = [0u8; 1];
    match timeout_at(deadline, socket.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] != TLS_HANDSHAKE => {
            tracing::warn!(
                %peer,
                first_byte = first[0],
                "a plain client on the TLS listener (its first byte is not a TLS handshake); \
                 answered unknown_frame: this port speaks TLS"
            );
            false
        }
        _ => true,
    }
}

async fn refuse(
    socket: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    frame: Bytes,
) {
    if let Some((rd, wr)) = open_stream(socket, peer, tls, handshake_timeout).await {
        conn::reject(rd, wr, frame).await;
    }
}

/// Whether hellos must carry a valid token: `--require-auth`, or the data
/// folder has tokens (re-evaluated whenever the tokens file changes).
fn auth_required(config: &Config, tokens: &Tokens) -> bool {
    config.require_auth || !tokens.is_empty()
}

/// Re-reads the tokens file when it changes; ends the connections of
/// revoked tokens.
async fn watch_tokens(shared: Arc<Shared>) {
    let period = shared.config.tokens_poll.max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let s = shared.clone();
        let reloaded = tokio::task::spawn_blocking(move || s.tokens.reload_if_changed()).await;
        match reloaded {
            Ok(Ok(gone)) => {
                reported.clear();
                let required = auth_required(&shared.config, &shared.tokens);
                if required != shared.auth_required.swap(required, Ordering::Relaxed) {
                    tracing::info!(
                        required,
                        "authentication requirement changed with the tokens file"
                    );
                }
                for id in gone {
                    shared.authed.revoke(&id);
                }
            }
            Ok(Err(e)) => {
                // Reported once per distinct problem; the old tokens stay.
                if reported.insert(e.to_string()) {
                    tracing::error!(error = %e, "cannot reload the tokens file; keeping the tokens as they were");
                }
            }
            Err(e) => tracing::error!(error = %e, "token reload task failed"),
        }
    }
}
