//! One connection: handshake, then sync mode or session mode (PROTOCOL.md 3).
//!
//! Each connection is two tasks: this one reads and decides, a socket
//! writer drains two queues into the socket:
//! - `direct`: the connection's own responses, in request order (awaited
//!   sends: a client that does not read only stalls itself);
//! - `live` (session mode): acks, refusals and broadcasts pushed by the
//!   writer thread, which never waits (see `rooms`). The socket writer
//!   drains it only after `direct` closes, so the session's 33 and 68 always
//!   go out before the first live frame queued behind them.
//!
//! Invariants:
//! - Every read races against shutdown, the kill switch and a timeout.
//! - Sync requests are answered in arrival order. Upserts are handed to the
//!   writer as soon as they are read (so one connection's pipelined upserts
//!   share commits); reads run when they reach the head of the queue, after
//!   every earlier request is answered, so they see earlier upserts.
//! - A closing error is sent after the responses to every request before
//!   it, then the connection closes.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use notesync_protocol::{
    ClientFrame, DecodeError, DocId, ErrorCode, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
    ServerCodec, ServerFrame, Time, Upsert, VERSION_DELETION, VERSION_RESYNC,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::auth::{Access, FailBudget, Identity, Tokens};
use crate::config::Config;
use crate::rooms::{
    AckCell, Kill, Outbox, OutboxRx, Sub, deleted_bytes, error_bytes, outbox, resync_bytes,
};
use crate::store::{DocFrames, Rule, SentIds, Snapshot, StoreError};
use crate::tenants::{Tenant, Tenants};
use crate::writer::{Request, Session, SessionOp, WriteError};

/// The read half of a connection (TCP or TLS).
pub(crate) type Rd = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection (TCP or TLS).
pub(crate) type Wr = Box<dyn AsyncWrite + Send + Unpin>;

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
    pub authed: Mutex<HashMap<String, HashMap<u64, Arc<Kill>>>>,
    pub next_conn: AtomicU64,
    pub next_session: AtomicU64,
    pub shutdown: CancellationToken,
}

impl Shared {
    fn authed(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u64, Arc<Kill>>>> {
        self.authed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends every connection of a revoked token (after what is queued for
    /// them), telling them why.
    pub fn revoke(&self, token_id: &str) {
        let conns = self.authed().remove(token_id).unwrap_or_default();
        if !conns.is_empty() {
            tracing::info!(
                token = token_id,
                connections = conns.len(),
                "token revoked: closing its connections"
            );
        }
        for kill in conns.into_values() {
            kill.end(error_bytes(
                ErrorCode::UNAUTHORIZED,
                "this connection's token was revoked",
            ));
        }
    }
}

/// Keeps a connection in `Shared::authed` while it lives.
struct Registered {
    shared: Arc<Shared>,
    token_id: String,
    conn_id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut map = self.shared.authed();
        if let Some(conns) = map.get_mut(&self.token_id) {
            conns.remove(&self.conn_id);
            if conns.is_empty() {
                map.remove(&self.token_id);
            }
        }
    }
}

/// Bytes of list data per 33 frame.
const DOC_CHUNK_BYTES: usize = 1 << 20;
/// Most bytes the socket writer gathers into one write.
const GATHER_BYTES: usize = 64 * 1024;
/// Time allowed for the last frame and the close after a kill.
const FINAL_WRITE: Duration = Duration::from_secs(2);
/// After sending a closing error, how long unread input is drained so the
/// peer gets the frame instead of a reset.
const LINGER: Duration = Duration::from_millis(500);

type Frames = Vec<Bytes>;
/// A response in progress: its frames, or a closing error frame.
type Job = Pin<Box<dyn Future<Output = Result<Frames, Bytes>> + Send>>;

enum Event {
    Frame(ClientFrame),
    /// Stop reading, sending this closing frame (if any) after what is owed.
    End(Option<Bytes>),
}

fn shutting_down() -> Bytes {
    error_bytes(
        ErrorCode::SHUTTING_DOWN,
        "the server is shutting down; reconnect later",
    )
}

fn wrong_mode(what: &str) -> Bytes {
    error_bytes(ErrorCode::WRONG_MODE, what)
}

fn storage(e: &dyn std::fmt::Display) -> Bytes {
    error_bytes(
        ErrorCode::STORAGE,
        format!("the server could not read or store the document: {e}"),
    )
}

/// A writer failure as the frame the client gets, and whether it closes.
fn write_error(e: WriteError) -> Result<Frames, Bytes> {
    if let WriteError::Deleted { doc, at } = e {
        // Only a version 1 connection gets here (see `refusal`).
        return Ok(vec![deleted_bytes(1, doc, at)]);
    }
    let frame = error_bytes(e.code(), e.to_string());
    if e.code().closes_connection() {
        Err(frame)
    } else {
        Ok(vec![frame])
    }
}

/// A writer refusal for a connection of protocol `version`: a deleted
/// document is a 35 from version 2 on (PROTOCOL.md 3.5).
fn refusal(version: u8, e: WriteError) -> Result<Frames, Bytes> {
    match e {
        WriteError::Deleted { doc, at } => Ok(vec![deleted_bytes(version, doc, at)]),
        e => write_error(e),
    }
}

fn unauthorized(what: &str) -> Bytes {
    error_bytes(ErrorCode::UNAUTHORIZED, what)
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

/// Reads and discards input for a moment, so closing does not reset the
/// connection before the peer has read the error frame.
async fn linger(mut rd: Rd) {
    let mut buf = vec![0u8; 16 * 1024];
    let _ = timeout(LINGER, async {
        let mut total = 0usize;
        while total < (1 << 20) {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// The frame for a client over the connection limit.
pub(crate) fn busy_frame(max_connections: usize) -> Bytes {
    error_bytes(
        ErrorCode::SERVER_BUSY,
        format!(
            "the server is at its connection limit (max_connections {max_connections}); try again later"
        ),
    )
}

/// The frame for an address that used up its failed-authentication budget.
pub(crate) fn blocked_frame(retry_in: Duration, max: u32, window: Duration) -> Bytes {
    unauthorized(&format!(
        "too many failed authentication attempts from this address (max_failed_auth {max} per {}s); retry in {}s",
        window.as_secs(),
        retry_in.as_secs().max(1)
    ))
}

/// Sends one closing frame, then closes.
pub(crate) async fn reject(rd: Rd, mut wr: Wr, frame: Bytes) {
    let _ = timeout(FINAL_WRITE, wr.write_all(&frame)).await;
    let _ = timeout(FINAL_WRITE, wr.shutdown()).await;
    linger(rd).await;
}

/// What the socket writer needs besides the queues.
struct WriteSide {
    kill: Arc<Kill>,
    /// Session acks (coalesced, see `rooms::AckCell`).
    ack: Arc<AckCell>,
    /// A closing frame to send once both queues are drained.
    last: Arc<OnceLock<Bytes>>,
    write_timeout: Duration,
}

/// Drains `direct`, then (once it closes) `live` and the acks, into the
/// socket; then the closing frame, if any.
async fn write_loop(
    mut wr: Wr,
    mut direct: mpsc::Receiver<Bytes>,
    mut live: OutboxRx,
    side: WriteSide,
) {
    let WriteSide {
        kill,
        ack,
        last,
        write_timeout,
    } = side;
    let mut direct_open = true;
    let mut live_open = true;
    let mut acked = 0u64;
    let mut buf = BytesMut::new();
    while direct_open || live_open {
        let first = tokio::select! {
            biased;
            _ = kill.aborted().cancelled() => break,
            m = direct.recv(), if direct_open => match m {
                Some(b) => Some(b),
                None => {
                    direct_open = false;
                    continue;
                }
            },
            m = live.recv(), if !direct_open => match m {
                Some(b) => Some(b),
                None => {
                    live_open = false;
                    None
                }
            },
            _ = ack.changed(), if !direct_open => None,
        };
        // Loaded before draining: every refusal this count covers is
        // already queued (rooms::AckCell).
        let ack_now = ack.load();
        let mut live_bytes = 0;
        buf.clear();
        if let Some(b) = first {
            if !direct_open {
                live_bytes += b.len();
            }
            buf.extend_from_slice(&b);
        }
        loop {
            let more = if direct_open {
                direct.try_recv().ok()
            } else {
                live.try_recv().inspect(|b| live_bytes += b.len())
            };
            let Some(b) = more else { break };
            buf.extend_from_slice(&b);
            if buf.len() >= GATHER_BYTES {
                if !write_out(&mut wr, &buf, &kill, write_timeout).await {
                    return;
                }
                live.release(live_bytes);
                live_bytes = 0;
                buf.clear();
            }
        }
        if !direct_open && ack_now > acked {
            ServerFrame::SessionAck { count: ack_now }.encode(&mut buf);
            acked = ack_now;
        }
        if !buf.is_empty() && !write_out(&mut wr, &buf, &kill, write_timeout).await {
            return;
        }
        live.release(live_bytes);
    }
    // A kill's frame wins over the connection's own closing frame.
    let closing = kill.frame().or_else(|| last.get().cloned());
    if let Some(frame) = closing {
        let _ = timeout(FINAL_WRITE, wr.write_all(&frame)).await;
    }
    let _ = timeout(FINAL_WRITE, wr.shutdown()).await;
}

/// Writes `buf`; false (and the connection killed) if it failed, timed out
/// or the connection was killed meanwhile.
async fn write_out(wr: &mut Wr, buf: &[u8], kill: &Kill, write_timeout: Duration) -> bool {
    let written = tokio::select! {
        biased;
        _ = kill.aborted().cancelled() => return false,
        r = with_timeout(write_timeout, wr.write_all(buf)) => r,
    };
    match written {
        Some(Ok(())) => true,
        Some(Err(e)) => {
            tracing::debug!(error = %e, "write failed");
            kill.kill(None);
            false
        }
        None => {
            tracing::debug!("write made no progress within write_timeout");
            kill.kill(None);
            false
        }
    }
}

/// `f` with a time limit; a zero limit means none.
async fn with_timeout<F: Future>(limit: Duration, f: F) -> Option<F::Output> {
    if limit.is_zero() {
        Some(f.await)
    } else {
        timeout(limit, f).await.ok()
    }
}

/// Polls the job if there is one; never completes otherwise.
async fn poll_job(job: &mut Option<Job>) -> Result<Frames, Bytes> {
    match job.as_mut() {
        Some(j) => j.await,
        None => std::future::pending().await,
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
            let conn_id = self.shared.next_conn.fetch_add(1, Ordering::Relaxed);
            self.shared
                .authed()
                .entry(id.clone())
                .or_default()
                .insert(conn_id, self.kill.clone());
            self.registered = Some(Registered {
                shared: self.shared.clone(),
                token_id: id.clone(),
                conn_id,
            });
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
        match first {
            ClientFrame::Synclist { .. }
            | ClientFrame::Pull { .. }
            | ClientFrame::Upsert(_)
            | ClientFrame::DeleteDoc { .. } => self.sync_mode(first).await,
            ClientFrame::SessionStart { since, doc } => self.session_mode(since, doc).await,
            ClientFrame::Hello(_) => Some(wrong_mode(
                "hello is accepted only as the first frame of a connection",
            )),
            ClientFrame::Insert(_) | ClientFrame::Delete(_) | ClientFrame::Rename(_) => {
                Some(wrong_mode(
                    "session frames (65, 66, 67) are accepted only after session_start (64)",
                ))
            }
        }
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
                Some(Some(Err(e))) => Event::End(Some(error_bytes(e.code(), e.to_string()))),
            },
        }
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

    // ------------------------------------------------------------ sync mode

    async fn sync_mode(&mut self, first: ClientFrame) -> Option<Bytes> {
        // Sync mode never uses the live queue.
        self.live = None;
        let max_pipeline = self.shared.config.max_pipeline.max(1);
        let idle = self.shared.config.idle_timeout;
        let mut queue: VecDeque<Job> = VecDeque::new();
        let mut head: Option<Job> = None;
        let mut next = Some(first);
        let mut end: Option<Option<Bytes>> = None;
        loop {
            if let Some(frame) = next.take() {
                match self.sync_job(frame).await {
                    Ok(job) => queue.push_back(job),
                    Err(close) => end = Some(close),
                }
            }
            if head.is_none() {
                head = queue.pop_front();
            }
            if head.is_none()
                && let Some(close) = end.take()
            {
                return close;
            }
            let reading = end.is_none() && queue.len() < max_pipeline;
            tokio::select! {
                biased;
                r = poll_job(&mut head) => {
                    head = None;
                    match r {
                        Ok(frames) => {
                            for f in frames {
                                if !self.send_direct(f).await {
                                    return None;
                                }
                            }
                        }
                        // Requests after a closing error get no answer.
                        Err(close) => return Some(close),
                    }
                }
                ev = self.next_frame(idle, "idle_timeout"), if reading => match ev {
                    Event::Frame(f) => next = Some(f),
                    Event::End(close) => end = Some(close),
                },
            }
        }
    }

    /// Turns a request into its response job. Upserts go to the writer now.
    async fn sync_job(&mut self, frame: ClientFrame) -> Result<Job, Option<Bytes>> {
        let shared = self.shared.clone();
        let tenant = self.tenant.clone();
        // A read-only connection gets no site: it never inserts.
        let replica = if self.read_only() { None } else { self.replica };
        match frame {
            ClientFrame::Synclist { since } => Ok(Box::pin(async move {
                let cap = shared.config.max_synclist_entries;
                let list = tenant.index.synclist(since, cap);
                Ok(vec![ServerFrame::SynclistResponse(list).to_bytes()])
            })),
            ClientFrame::Pull { doc, since } => {
                let version = self.version;
                Ok(Box::pin(async move {
                    pull(&shared.config, tenant, replica, doc, since, version).await
                }))
            }
            // A write (PROTOCOL.md 3.5): every check goes in `delete_doc`.
            ClientFrame::DeleteDoc { doc } => self.delete_doc(doc).await,
            ClientFrame::Upsert(_) if self.read_only() => Ok(Box::pin(async move {
                Ok(vec![read_only_frame("sync_doc_upsert")])
            })),
            ClientFrame::Upsert(u) => {
                let upsert = Arc::new(u);
                let (req, rx) = Request::upsert(replica, upsert.clone());
                if tenant.writer.send(req).await.is_err() {
                    return Err(Some(shutting_down()));
                }
                let version = self.version;
                Ok(Box::pin(async move {
                    match rx.await {
                        Ok(Ok(site)) => {
                            upsert_reply(&shared.config, tenant, upsert, site, version).await
                        }
                        Ok(Err(e)) => refusal(version, e),
                        Err(_) => Err(shutting_down()),
                    }
                }))
            }
            ClientFrame::SessionStart { .. }
            | ClientFrame::Insert(_)
            | ClientFrame::Delete(_)
            | ClientFrame::Rename(_) => Err(Some(wrong_mode(
                "this connection is in sync mode (its first request was below 64): only 0, 1 and 2 are accepted",
            ))),
            ClientFrame::Hello(_) => Err(Some(wrong_mode(
                "hello is accepted only as the first frame of a connection",
            ))),
        }
    }

    /// 3 doc_delete (PROTOCOL.md 3.5): answered with 35. A version 2
    /// frame: a connection that did not announce version 2 gets
    /// `unknown_frame`.
    async fn delete_doc(&mut self, doc: DocId) -> Result<Job, Option<Bytes>> {
        if self.version < VERSION_DELETION {
            return Err(Some(error_bytes(
                ErrorCode::UNKNOWN_FRAME,
                format!(
                    "doc_delete (3) is a protocol version {VERSION_DELETION} frame; \
                     this connection uses version {} (send hello with version {VERSION_DELETION})",
                    self.version
                ),
            )));
        }
        if self.read_only() {
            return Ok(Box::pin(
                async move { Ok(vec![read_only_frame("doc_delete")]) },
            ));
        }
        let tenant = self.tenant.clone();
        let (req, rx) = Request::delete_doc(doc);
        if tenant.writer.send(req).await.is_err() {
            return Err(Some(shutting_down()));
        }
        Ok(Box::pin(async move {
            match rx.await {
                Ok(Ok(at)) => Ok(vec![
                    ServerFrame::DocDeleted {
                        doc,
                        deleted_time: at,
                    }
                    .to_bytes(),
                ]),
                Ok(Err(e)) => write_error(e),
                Err(_) => Err(shutting_down()),
            }
        }))
    }

    // --------------------------------------------------------- session mode

    async fn session_mode(&mut self, since: Time, doc: DocId) -> Option<Bytes> {
        let shared = self.shared.clone();
        let live = self.live.clone()?;
        let session_id = shared.next_session.fetch_add(1, Ordering::Relaxed);
        let sub = Sub {
            session_id,
            version: self.version,
            outbox: live,
            ack: self.ack.clone(),
            kill: self.kill.clone(),
        };
        let tenant = self.tenant.clone();
        // A read-only session gets no site: it never inserts.
        let replica = if self.read_only() { None } else { self.replica };
        let (req, rx) = Request::start(doc, replica, sub);
        if tenant.writer.send(req).await.is_err() {
            return Some(shutting_down());
        }
        let started = match rx.await {
            Ok(Ok(s)) => s,
            // Refused (a deleted document: 35 or unknown_document); the
            // connection closes.
            Ok(Err(e)) => {
                return Some(match e {
                    WriteError::Deleted { doc, at } => deleted_bytes(self.version, doc, at),
                    e => error_bytes(e.code(), e.to_string()),
                });
            }
            Err(_) => return Some(shutting_down()),
        };
        let site = started.site;
        let _open = crate::metrics::session();
        let (chunk, items) = chunk_limits(&shared.config);
        let version = self.version;
        let built = tokio::task::spawn_blocking(move || -> Result<(Frames, Time), StoreError> {
            let snap = started.snapshot;
            let rec = match snap.doc(doc)? {
                Some(rec) => rec,
                None => {
                    return Err(StoreError::Corrupt {
                        table: "documents",
                        what: "a started session's document is missing",
                    });
                }
            };
            if rec.needs_resync(since) {
                // Refused with a 36 (PROTOCOL.md 3.6): the client catches
                // up in sync mode, then starts again.
                return Ok((vec![resync_bytes(version, doc)], 0));
            }
            let mut out = DocFrames::new(doc, rec.doc_name()?, chunk, items);
            snap.delta(doc, since, Rule::Session, None, &mut out)?;
            Ok((out.finish(), snap.clock()?))
        })
        .await;
        let close = match built {
            Ok(Ok((mut refusal, 0))) => refusal.pop(),
            Ok(Ok((frames, sync_time))) => {
                let mut ok = true;
                for f in frames {
                    ok = ok && self.send_direct(f).await;
                }
                let started = ServerFrame::SessionStarted {
                    session_id,
                    site,
                    sync_time,
                };
                ok = ok && self.send_direct(started.to_bytes()).await;
                // From here on the live queue carries everything.
                self.direct = None;
                if ok {
                    self.session_ops(doc, session_id, site).await
                } else {
                    None
                }
            }
            Ok(Err(e)) => Some(storage(&e)),
            Err(e) => Some(storage(&e)),
        };
        // Wait until the writer has acked every op it took, then leave.
        let (leave, rx) = Request::leave(doc, session_id);
        if tenant.writer.send(leave).await.is_ok() {
            let _ = rx.await;
        }
        close
    }

    async fn session_ops(&mut self, doc: DocId, session_id: u64, site: u8) -> Option<Bytes> {
        let idle = self.shared.config.session_idle_timeout;
        let session = Session {
            doc,
            session_id,
            site,
            hello: self.replica.is_some(),
            read_only: self.read_only(),
        };
        let mut seq = 0u64;
        loop {
            let op = match self.next_frame(idle, "session_idle_timeout").await {
                Event::Frame(ClientFrame::Insert(i)) => SessionOp::Insert(i),
                Event::Frame(ClientFrame::Delete(d)) => SessionOp::Delete(d),
                Event::Frame(ClientFrame::Rename(n)) => SessionOp::Rename(n),
                Event::Frame(_) => {
                    return Some(wrong_mode(
                        "this connection is in session mode: only 65, 66 and 67 are accepted",
                    ));
                }
                Event::End(close) => return close,
            };
            seq += 1;
            let req = Request::Op { session, seq, op };
            if self.tenant.writer.send(req).await.is_err() {
                return Some(shutting_down());
            }
        }
    }
}

fn chunk_limits(config: &Config) -> (usize, usize) {
    let frame = config.limits.max_frame_bytes;
    (
        DOC_CHUNK_BYTES.min(frame.saturating_sub(1024) / 2).max(1),
        usize::try_from(config.limits.max_items_per_frame).unwrap_or(usize::MAX),
    )
}

fn read_only_frame(what: &str) -> Bytes {
    error_bytes(
        ErrorCode::READ_ONLY,
        format!("this token allows reading only: {what} refused"),
    )
}

/// 33s then 34 for a pull, allocating the site if this replica has none.
async fn pull(
    config: &Config,
    tenant: Arc<Tenant>,
    replica: Option<u128>,
    doc: DocId,
    since: Time,
    version: u8,
) -> Result<Frames, Bytes> {
    let db = tenant.db.clone();
    let (chunk, items) = chunk_limits(config);
    type Read = Option<(Frames, Time, Option<u8>)>;
    let read = tokio::task::spawn_blocking(move || -> Result<Read, StoreError> {
        let snap = Snapshot::begin(&db)?;
        let Some(rec) = snap.doc(doc)? else {
            return Ok(None);
        };
        if rec.deleted != 0 {
            // 35, or unknown_document for version 1 (PROTOCOL.md 3.5).
            return Ok(Some((
                vec![deleted_bytes(version, doc, rec.deleted)],
                0,
                None,
            )));
        }
        if rec.needs_resync(since) && version < VERSION_RESYNC {
            return Ok(Some((vec![resync_bytes(version, doc)], 0, None)));
        }
        let site = match replica {
            Some(r) => snap.site(doc, r)?,
            None => Some(0),
        };
        let mut out = DocFrames::new(doc, rec.doc_name()?, chunk, items);
        // A delta, or a 36 and the full state (PROTOCOL.md 3.6).
        snap.catch_up(doc, &rec, since, Rule::Pull, None, &mut out)?;
        Ok(Some((out.finish(), snap.clock()?, site)))
    })
    .await;
    let (mut frames, sync_time, site) = match read {
        Ok(Ok(Some((frames, 0, None)))) => return Ok(frames),
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => {
            return Ok(vec![error_bytes(
                ErrorCode::UNKNOWN_DOCUMENT,
                format!("document {doc:032x} does not exist on this server"),
            )]);
        }
        Ok(Err(e)) => return Err(storage(&e)),
        Err(e) => return Err(storage(&e)),
    };
    let site = match (site, replica) {
        (Some(s), _) => s,
        (None, Some(replica)) => {
            let (req, rx) = Request::alloc(doc, replica);
            if tenant.writer.send(req).await.is_err() {
                return Err(shutting_down());
            }
            match rx.await {
                Ok(Ok(site)) => site,
                Ok(Err(e)) => return write_error(e),
                Err(_) => return Err(shutting_down()),
            }
        }
        (None, None) => 0,
    };
    frames.push(
        ServerFrame::DocSync {
            doc,
            sync_time,
            site,
        }
        .to_bytes(),
    );
    Ok(frames)
}

/// 33s then 34 for a committed upsert: what the client lacks since its `t`,
/// less what it sent.
async fn upsert_reply(
    config: &Config,
    tenant: Arc<Tenant>,
    upsert: Arc<Upsert>,
    site: u8,
    version: u8,
) -> Result<Frames, Bytes> {
    let db = tenant.db.clone();
    let (chunk, items) = chunk_limits(config);
    let doc = upsert.doc;
    let read = tokio::task::spawn_blocking(move || -> Result<(Frames, Time), StoreError> {
        // Any snapshot after the commit will do: its clock covers the upsert
        // and is exactly consistent with what it returns.
        let snap = Snapshot::begin(&db)?;
        let Some(rec) = snap.doc(doc)? else {
            return Err(StoreError::Corrupt {
                table: "documents",
                what: "an upserted document is missing",
            });
        };
        let sent = SentIds::from_upsert(&upsert);
        let mut out = DocFrames::new(doc, rec.doc_name()?, chunk, items);
        if rec.needs_resync(upsert.since) {
            // Applied, but no delta since its time exists (PROTOCOL.md
            // 3.6): a 36 and the full state, with the deletes of its own
            // inserts deleted here; version 1: invalid_request.
            if version < VERSION_RESYNC {
                return Ok((vec![resync_bytes(version, doc)], 0));
            }
            out.resync();
            snap.delta(doc, 0, Rule::Pull, None, &mut out)?;
            snap.deleted_sent_inserts(doc, 0, &sent, &mut out)?;
        } else {
            snap.delta(doc, upsert.since, Rule::Pull, Some(&sent), &mut out)?;
            snap.deleted_sent_inserts(doc, upsert.since, &sent, &mut out)?;
        }
        Ok((out.finish(), snap.clock()?))
    })
    .await;
    match read {
        // Version 1 and too old: the refusal alone (no 34).
        Ok(Ok((frames, 0))) => Ok(frames),
        Ok(Ok((mut frames, sync_time))) => {
            frames.push(
                ServerFrame::DocSync {
                    doc,
                    sync_time,
                    site,
                }
                .to_bytes(),
            );
            Ok(frames)
        }
        Ok(Err(e)) => Err(storage(&e)),
        Err(e) => Err(storage(&e)),
    }
}
