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

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use notesync_protocol::{
    ClientFrame, DecodeError, DocId, ErrorCode, PROTOCOL_VERSION, ServerCodec, ServerFrame, Time,
    Upsert,
};
use redb::Database;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::index::Index;
use crate::rooms::{AckCell, Kill, Outbox, OutboxRx, Sub, error_bytes, outbox};
use crate::store::{DocFrames, Rule, SentIds, Snapshot, StoreError};
use crate::writer::{Request, SessionOp, WriteError};

/// What every connection shares.
pub(crate) struct Shared {
    pub config: Config,
    pub db: Arc<Database>,
    pub index: Arc<Index>,
    pub writer: mpsc::Sender<Request>,
    pub next_session: AtomicU64,
    pub shutdown: CancellationToken,
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
    let frame = error_bytes(e.code(), e.to_string());
    if e.code().closes_connection() {
        Err(frame)
    } else {
        Ok(vec![frame])
    }
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve(socket: TcpStream, shared: Arc<Shared>) {
    let peer = socket.peer_addr().ok();
    let write_timeout = shared.config.write_timeout;
    let (rd, wr) = socket.into_split();
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
    let mut conn = Conn {
        frames: FramedRead::new(rd, ServerCodec::new(shared.config.limits)),
        shared,
        kill: kill.clone(),
        ack,
        last,
        direct: Some(direct_tx),
        live: Some(live),
        replica: None,
    };
    let close = conn.run().await;
    if let Some(frame) = &close {
        tracing::debug!(?peer, "closing with an error frame");
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
async fn linger(mut rd: OwnedReadHalf) {
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

/// Tells a client over the connection limit, then closes.
pub(crate) async fn reject_busy(socket: TcpStream, max_connections: usize) {
    let (rd, mut wr) = socket.into_split();
    let frame = error_bytes(
        ErrorCode::SERVER_BUSY,
        format!(
            "the server is at its connection limit (max_connections {max_connections}); try again later"
        ),
    );
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
    mut wr: OwnedWriteHalf,
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
async fn write_out(
    wr: &mut OwnedWriteHalf,
    buf: &[u8],
    kill: &Kill,
    write_timeout: Duration,
) -> bool {
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
    frames: FramedRead<OwnedReadHalf, ServerCodec>,
    shared: Arc<Shared>,
    kill: Arc<Kill>,
    ack: Arc<AckCell>,
    /// The closing frame, for the socket writer to send last.
    last: Arc<OnceLock<Bytes>>,
    /// Own responses; dropped when a session switches to `live`.
    direct: Option<mpsc::Sender<Bytes>>,
    live: Option<Outbox>,
    /// From hello; None: no hello, so no site (PROTOCOL.md 1.2).
    replica: Option<u128>,
}

impl Conn {
    fn into_frames(self) -> FramedRead<OwnedReadHalf, ServerCodec> {
        self.frames
    }

    /// Runs the connection until it should close; returns the closing error
    /// frame, if one is owed.
    async fn run(&mut self) -> Option<Bytes> {
        let handshake = self.shared.config.handshake_timeout;
        let first = match self.next_frame(handshake, "handshake_timeout").await {
            Event::Frame(f) => f,
            Event::End(close) => return close,
        };
        let first = match first {
            ClientFrame::Hello(h) => {
                if h.version != PROTOCOL_VERSION {
                    return Some(error_bytes(
                        ErrorCode::UNSUPPORTED_VERSION,
                        format!(
                            "protocol version {} is not spoken by this server (it speaks {PROTOCOL_VERSION})",
                            h.version
                        ),
                    ));
                }
                self.replica = Some(h.replica);
                let welcome = ServerFrame::Welcome {
                    version: PROTOCOL_VERSION,
                    // The server's current time: never before a time it
                    // has returned, and not 0 on a fresh server. Not a
                    // cursor (PROTOCOL.md 3): it may be ahead of changes
                    // still being committed.
                    server_time: self
                        .shared
                        .config
                        .wall_clock
                        .now_micros()
                        .max(self.shared.index.clock()),
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
            ClientFrame::Synclist { .. } | ClientFrame::Pull { .. } | ClientFrame::Upsert(_) => {
                self.sync_mode(first).await
            }
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
        let replica = self.replica;
        match frame {
            ClientFrame::Synclist { since } => Ok(Box::pin(async move {
                let cap = shared.config.max_synclist_entries;
                let list = shared.index.synclist(since, cap);
                Ok(vec![ServerFrame::SynclistResponse(list).to_bytes()])
            })),
            ClientFrame::Pull { doc, since } => {
                Ok(Box::pin(
                    async move { pull(shared, replica, doc, since).await },
                ))
            }
            ClientFrame::Upsert(u) => {
                let upsert = Arc::new(u);
                let (reply, rx) = oneshot::channel();
                let req = Request::Upsert {
                    replica,
                    upsert: upsert.clone(),
                    reply,
                };
                if shared.writer.send(req).await.is_err() {
                    return Err(Some(shutting_down()));
                }
                Ok(Box::pin(async move {
                    match rx.await {
                        Ok(Ok(site)) => upsert_reply(shared, upsert, site).await,
                        Ok(Err(e)) => write_error(e),
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

    // --------------------------------------------------------- session mode

    async fn session_mode(&mut self, since: Time, doc: DocId) -> Option<Bytes> {
        let shared = self.shared.clone();
        let live = self.live.clone()?;
        let session_id = shared.next_session.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let sub = Sub {
            session_id,
            outbox: live,
            ack: self.ack.clone(),
            kill: self.kill.clone(),
        };
        let req = Request::Start {
            doc,
            replica: self.replica,
            sub,
            reply,
        };
        if shared.writer.send(req).await.is_err() {
            return Some(shutting_down());
        }
        let started = match rx.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Some(error_bytes(e.code(), e.to_string())),
            Err(_) => return Some(shutting_down()),
        };
        let site = started.site;
        let (chunk, items) = chunk_limits(&shared.config);
        let built = tokio::task::spawn_blocking(move || -> Result<(Frames, Time), StoreError> {
            let snap = started.snapshot;
            let name = match snap.doc(doc)? {
                Some(rec) => rec.doc_name()?,
                None => {
                    return Err(StoreError::Corrupt {
                        table: "documents",
                        what: "a started session's document is missing",
                    });
                }
            };
            let mut out = DocFrames::new(doc, name, chunk, items);
            snap.delta(doc, since, Rule::Session, None, &mut out)?;
            Ok((out.finish(), snap.clock()?))
        })
        .await;
        let close = match built {
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
        let (reply, rx) = oneshot::channel();
        let leave = Request::Leave {
            doc,
            session_id,
            reply,
        };
        if shared.writer.send(leave).await.is_ok() {
            let _ = rx.await;
        }
        close
    }

    async fn session_ops(&mut self, doc: DocId, session_id: u64, site: u8) -> Option<Bytes> {
        let idle = self.shared.config.session_idle_timeout;
        let hello = self.replica.is_some();
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
            let req = Request::Op {
                doc,
                session_id,
                seq,
                site,
                hello,
                op,
            };
            if self.shared.writer.send(req).await.is_err() {
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

/// 33s then 34 for a pull, allocating the site if this replica has none.
async fn pull(
    shared: Arc<Shared>,
    replica: Option<u128>,
    doc: DocId,
    since: Time,
) -> Result<Frames, Bytes> {
    let db = shared.db.clone();
    let (chunk, items) = chunk_limits(&shared.config);
    type Read = Option<(Frames, Time, Option<u8>)>;
    let read = tokio::task::spawn_blocking(move || -> Result<Read, StoreError> {
        let snap = Snapshot::begin(&db)?;
        let Some(rec) = snap.doc(doc)? else {
            return Ok(None);
        };
        let site = match replica {
            Some(r) => snap.site(doc, r)?,
            None => Some(0),
        };
        let mut out = DocFrames::new(doc, rec.doc_name()?, chunk, items);
        snap.delta(doc, since, Rule::Pull, None, &mut out)?;
        Ok(Some((out.finish(), snap.clock()?, site)))
    })
    .await;
    let (mut frames, sync_time, site) = match read {
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
            let (reply, rx) = oneshot::channel();
            let req = Request::Alloc {
                doc,
                replica,
                reply,
            };
            if shared.writer.send(req).await.is_err() {
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
async fn upsert_reply(shared: Arc<Shared>, upsert: Arc<Upsert>, site: u8) -> Result<Frames, Bytes> {
    let db = shared.db.clone();
    let (chunk, items) = chunk_limits(&shared.config);
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
        snap.delta(doc, upsert.since, Rule::Pull, Some(&sent), &mut out)?;
        snap.deleted_sent_inserts(doc, upsert.since, &sent, &mut out)?;
        Ok((out.finish(), snap.clock()?))
    })
    .await;
    match read {
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
