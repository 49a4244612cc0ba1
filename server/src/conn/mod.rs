//! One connection: handshake, then sync mode or session mode (PROTOCOL.md 3).
//!
//! Each connection is two tasks: this one reads and decides, a socket
//! writer (`socket`) drains two queues into the socket:
//! - `direct`: the connection's own responses, in request order (awaited
//!   sends: a client that does not read only stalls itself);
//! - `live` (session mode): acks, refusals and broadcasts pushed by the
//!   writer thread, which never waits (see `rooms`). The socket writer
//!   drains it only after `direct` closes, so the session's 33 and 68 always
//!   go out before the first live frame queued behind them.
//!
//! This file is the state machine's start: the handshake (hello, tokens,
//! namespace) and the choice of mode; `sync` and `session` run the two
//! modes, `read` answers reads from the index or a snapshot, `frames`
//! words the refusals and closing errors, `registry`
//! keeps authenticated connections by token for revocation. The
//! connection touches its tenant (index, database, writer queue), the
//! rooms' queue types and the auth tokens; it writes to the store only
//! through the writer.
//!
//! Invariants:
//! - Every read races against shutdown, the kill switch and a timeout.
//! - Sync requests are answered in arrival order. Upserts are handed to the
//!   writer as soon as they are read (so one connection's pipelined upserts
//!   share commits); reads run when they reach the head of the queue, after
//!   every earlier request is answered, so they see earlier upserts.
//! - A closing error is sent after the responses to every request before
//!   it, then the connection closes.

mod frames;
mod read;
mod registry;
mod session;
mod socket;
mod sync;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use notesync_protocol::header::TLS_HANDSHAKE;
use notesync_protocol::{
    ClientFrame, DecodeError, ErrorCode, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ServerCodec,
    ServerFrame, VERSION_DELETION, VERSION_FEED, VERSION_RUNS, is_tls_record_start,
};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::auth::{Access, FailBudget, Identity, Tokens};
use crate::config::Config;
use crate::rooms::{AckCell, Kill, Outbox, error_bytes, outbox};
use crate::tenants::{Tenant, Tenants};
use frames::{Frames, shutting_down, storage, unauthorized, wrong_mode};
pub(crate) use frames::{blocked_frame, busy_frame, plain_on_tls_port};
use registry::Registered;
pub(crate) use registry::TokenConns;
use socket::{FINAL_WRITE, WriteSide, linger, with_timeout, write_loop};
pub(crate) use socket::{Rd, Wr, reject};

/// What every connection shares.
pub(crate) struct Shared {
    pub config: Config,
    pub tenants: Arc<Tenants>,
    pub tokens: Tokens,
    /// Whether hello must carry a valid token (`--require-auth`, or the
    /// folder has tokens; re-evaluated when the tokens file changes).
    pub auth_required: AtomicBool,
    pub fails: FailBudget,
    /// Live authenticated connections by token id, to end them when their
    /// token is revoked.
    pub authed: Arc<TokenConns>,
    pub next_session: AtomicU64,
    pub shutdown: CancellationToken,
}

/// A response in progress: its frames, or a closing error frame.
type Job = Pin<Box<dyn Future<Output = Result<Frames, Bytes>> + Send>>;

enum Event {
    Frame(ClientFrame),
    /// Stop reading, sending this closing frame (if any) after what is owed.
    End(Option<Bytes>),
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve(rd: Rd, wr: Wr, peer: SocketAddr, shared: Arc<Shared>) {
    let write_timeout = shared.config.write_timeout;
    let kill = Kill::new();
    let ack = AckCell::new();
    let last = Arc::new(OnceLock::new());
    let (direct_tx, direct_rx) = mpsc::channel(16);
    let (live, live_rx) = outbox(shared.config.max_outbound_bytes);
    let side = WriteSide {
        kill: kill.clone(),
        ack: ack.clone(),
        last: last.clone(),
        write_timeout,
    };
    let write_task = tokio::spawn(write_loop(wr, direct_rx, live_rx, side));
    let tenant = shared.tenants.default_tenant().clone();
    let mut conn = Conn {
        frames: FramedRead::new(rd, ServerCodec::new(shared.config.limits)),
        shared,
        tenant,
        identity: Identity::anonymous(),
        registered: None,
        peer,
        kill: kill.clone(),
        ack,
        last,
        direct: Some(direct_tx),
        live: Some(live),
        replica: None,
        version: 1,
    };
    let close = conn.run().await;
    if let Some(frame) = &close {
        tracing::debug!(%peer, "closing with an error frame");
        conn.send_final(frame.clone()).await;
    }
    // Drops the queue senders now (not at the end of this function), so
    // the socket writer can finish.
    let frames = conn.into_frames();
    // The socket writer ends once both queues are closed and drained (the
    // writer thread dropped this session when it processed its Leave).
    let wait = write_timeout.max(FINAL_WRITE) + FINAL_WRITE;
    let mut write_task = write_task;
    if timeout(wait, &mut write_task).await.is_err() {
        write_task.abort();
    }
    if close.is_some() || kill.frame().is_some() {
        linger(frames.into_inner()).await;
    }
}

struct Conn {
    frames: FramedRead<Rd, ServerCodec>,
    shared: Arc<Shared>,
    /// The namespace's database, index and writer (`default` until a
    /// token says otherwise).
    tenant: Arc<Tenant>,
    identity: Identity,
    registered: Option<Registered>,
    peer: SocketAddr,
    kill: Arc<Kill>,
    ack: Arc<AckCell>,
    /// The closing frame, for the socket writer to send last.
    last: Arc<OnceLock<Bytes>>,
    /// Own responses; dropped when a session switches to `live`.
    direct: Option<mpsc::Sender<Bytes>>,
    live: Option<Outbox>,
    /// From hello; None: no hello, so no site (PROTOCOL.md 1.2).
    replica: Option<u128>,
    /// The protocol version from hello (1 without one): what it may be sent.
    version: u8,
}

impl Conn {
    fn into_frames(self) -> FramedRead<Rd, ServerCodec> {
        self.frames
    }

    fn read_only(&self) -> bool {
        self.identity.access == Access::ReadOnly
    }

    /// Checks a hello's credentials and binds the connection to its
    /// namespace; the closing frame if it may not go on.
    async fn authenticate(&mut self, token: &[u8], required: bool) -> Result<(), Bytes> {
        if token.is_empty() && !required {
            return Ok(());
        }
        let Some(identity) = self.shared.tokens.verify(token) else {
            self.shared.fails.fail(self.peer.ip());
            tracing::info!(peer = %self.peer, "authentication failed");
            return Err(unauthorized(if token.is_empty() {
                "this server requires a token in hello"
            } else {
                "invalid or revoked token"
            }));
        };
        if let Some(id) = &identity.token_id {
            self.registered = Some(self.shared.authed.register(id, self.kill.clone()));
            // Revoked between the check and the registration: the revoker
            // did not see this connection.
            if !self.shared.tokens.contains(id) {
                return Err(unauthorized("invalid or revoked token"));
            }
        }
        self.tenant = match self.shared.tenants.get(&identity.namespace).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, namespace = %identity.namespace, "cannot open namespace");
                return Err(storage(&e));
            }
        };
        tracing::debug!(peer = %self.peer, namespace = %identity.namespace, "authenticated");
        self.identity = identity;
        Ok(())
    }

    /// Runs the connection until it should close; returns the closing error
    /// frame, if one is owed.
    async fn run(&mut self) -> Option<Bytes> {
        let config = &self.shared.config;
        let handshake = config.handshake_timeout;
        let required = self.shared.auth_required.load(Ordering::Relaxed);
        let full_limits = config.limits;
        let (first_wait, first_limit) = if required {
            // Nothing is trusted before the hello: small frames, little time.
            let mut small = full_limits;
            small.max_frame_bytes = small.max_frame_bytes.min(config.pre_auth_max_frame_bytes);
            self.frames.decoder_mut().decoder_mut().set_limits(small);
            (config.auth_timeout, "auth_timeout")
        } else {
            (handshake, "handshake_timeout")
        };
        let first = match self.next_frame(first_wait, first_limit).await {
            Event::Frame(f) => f,
            Event::End(close) => {
                // A timeout or a bad frame before the hello is a failed
                // attempt; the server shutting down is not.
                if required && close.is_some() && !self.shared.shutdown.is_cancelled() {
                    self.shared.fails.fail(self.peer.ip());
                }
                return close;
            }
        };
        if required && !matches!(first, ClientFrame::Hello(_)) {
            self.shared.fails.fail(self.peer.ip());
            return Some(unauthorized(
                "this server requires authentication: the first frame must be 96 hello with a token",
            ));
        }
        let first = match first {
            ClientFrame::Hello(h) => {
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&h.version) {
                    return Some(error_bytes(
                        ErrorCode::UNSUPPORTED_VERSION,
                        format!(
                            "protocol version {} is not spoken by this server (it speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})",
                            h.version
                        ),
                    ));
                }
                self.version = h.version;
                if let Err(close) = self.authenticate(&h.token, required).await {
                    return Some(close);
                }
                self.frames
                    .decoder_mut()
                    .decoder_mut()
                    .set_limits(full_limits);
                self.replica = Some(h.replica);
                let welcome = ServerFrame::Welcome {
                    // The version this connection uses (PROTOCOL.md 6).
                    version: self.version,
                    // The server's current time: never before a time it
                    // has returned, and not 0 on a fresh server. Not a
                    // cursor (PROTOCOL.md 3): it may be ahead of changes
                    // still being committed.
                    server_time: self
                        .shared
                        .config
                        .wall_clock
                        .now_micros()
                        .max(self.tenant.index.clock()),
                };
                if !self.send_direct(welcome.to_bytes()).await {
                    return None;
                }
                match self.next_frame(handshake, "handshake_timeout").await {
                    Event::Frame(f) => f,
                    Event::End(close) => return close,
                }
            }
            f => f,
        };
        if let Some(close) = self.later_version_frame(&first) {
            return Some(close);
        }
        match first {
            ClientFrame::Synclist { .. }
            | ClientFrame::Pull { .. }
            | ClientFrame::Upsert(_)
            | ClientFrame::UpsertRuns(_)
            | ClientFrame::Subscribe { .. }
            | ClientFrame::DeleteDoc { .. } => self.sync_mode(first).await,
            ClientFrame::SessionStart { since, doc } => self.session_mode(since, doc).await,
            ClientFrame::Hello(_) => Some(wrong_mode(
                "hello is accepted only as the first frame of a connection",
            )),
            ClientFrame::Insert(_)
            | ClientFrame::Delete(_)
            | ClientFrame::Rename(_)
            | ClientFrame::InsertRun(_)
            | ClientFrame::DeleteRange(_) => Some(wrong_mode(
                "session frames (65, 66, 67, 70, 71) are accepted only after session_start (64)",
            )),
        }
    }

    /// The closing `unknown_frame` for a frame of a later protocol version
    /// than the connection's (PROTOCOL.md 2.3, 6): a peer that did not
    /// announce a version is never held to its frames.
    fn later_version_frame(&self, frame: &ClientFrame) -> Option<Bytes> {
        let (needs, what) = match frame {
            ClientFrame::DeleteDoc { .. } => (VERSION_DELETION, "doc_delete (3)"),
            ClientFrame::UpsertRuns(_) => (VERSION_RUNS, "sync_doc_upsert_runs (4)"),
            ClientFrame::InsertRun(_) => (VERSION_RUNS, "session_insert_run (70)"),
            ClientFrame::DeleteRange(_) => (VERSION_RUNS, "session_delete_range (71)"),
            ClientFrame::Subscribe { .. } => (VERSION_FEED, "feed_subscribe (5)"),
            _ => return None,
        };
        (self.version < needs).then(|| {
            error_bytes(
                ErrorCode::UNKNOWN_FRAME,
                format!(
                    "{what} is a protocol version {needs} frame; this connection uses version {} \
                     (send hello with version {needs})",
                    self.version
                ),
            )
        })
    }

    /// The next frame, raced against shutdown, the kill switch and `idle`.
    async fn next_frame(&mut self, idle: Duration, limit: &str) -> Event {
        tokio::select! {
            biased;
            _ = self.shared.shutdown.cancelled() => Event::End(Some(shutting_down())),
            // The socket writer sends the kill's frame itself.
            _ = self.kill.stopped().cancelled() => Event::End(None),
            r = with_timeout(idle, self.frames.next()) => match r {
                None => Event::End(Some(error_bytes(
                    ErrorCode::TIMEOUT,
                    format!("no frame within {limit} ({}s)", idle.as_secs_f64()),
                ))),
                Some(None) => Event::End(None),
                Some(Some(Ok(f))) => Event::Frame(f),
                Some(Some(Err(DecodeError::Io(e)))) => {
                    tracing::debug!(error = %e, "read failed");
                    Event::End(None)
                }
                Some(Some(Err(e))) => Event::End(Some(self.undecodable(e))),
            },
        }
    }

    /// The closing frame for bytes that are not a frame. A TLS handshake
    /// record (a ClientHello: this listener has no TLS) gets its own words
    /// and a warning, since the person behind it needs to change a flag.
    fn undecodable(&self, e: DecodeError) -> Bytes {
        let header = matches!(e, DecodeError::UnknownHeader { header } if header == TLS_HANDSHAKE);
        if header && is_tls_record_start(self.frames.read_buffer()) {
            tracing::warn!(
                peer = %self.peer,
                "a TLS client on the plain listener (its first bytes are a TLS ClientHello); \
                 answered unknown_frame: this server runs without --tls-cert"
            );
            return frames::tls_on_plain_port();
        }
        error_bytes(e.code(), e.to_string())
    }

    async fn send_direct(&mut self, frame: Bytes) -> bool {
        match &self.direct {
            Some(tx) => tx.send(frame).await.is_ok(),
            None => false,
        }
    }

    /// Sends the closing frame after everything queued before it.
    async fn send_final(&mut self, frame: Bytes) {
        if self.kill.is_killed() {
            return;
        }
        match self.direct.take() {
            Some(tx) => {
                let _ = timeout(FINAL_WRITE, tx.send(frame)).await;
            }
            // Session: after the queued frames and the last ack.
            None => {
                let _ = self.last.set(frame);
            }
        }
        self.live = None;
    }
}
