//! Session fan-out: per-document rooms, per-connection outbound queues.
//!
//! Touches only the metrics counters (error frames, slow readers): the
//! writer owns the rooms, connections own their queues' receiving ends.
//!
//! Invariants:
//! - Rooms belong to the writer thread alone (no lock): it registers a
//!   session between two commits and fans out each batch after its commit,
//!   so a session receives exactly the changes committed after the snapshot
//!   it was registered with.
//! - A room exists only while it has sessions; it holds no document
//!   content, so memory per document is bounded by its sessions.
//! - The writer never waits on a connection: pushes into an [`Outbox`] never
//!   block, and a connection whose queue passes its byte limit is killed
//!   with `slow_reader` instead of slowing everyone else down.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use notesync_protocol::{
    Atom, Coalesced, DocId, ErrorCode, ErrorFrame, IdRange, Run, RunCoalescer, ServerFrame,
    SessionDelete, SessionDeleteRange, SessionInsert, SessionInsertRun, Time, VERSION_DELETION,
    VERSION_RESYNC, VERSION_RUNS,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// Ends a connection from outside its task, with the error frame to send.
///
/// Two strengths: [`end`](Self::end) stops the reader and lets the socket
/// writer drain what is queued (acks included) before the frame;
/// [`kill`](Self::kill) also aborts the socket writer, dropping the queue
/// (for a slow reader, whose queue is the problem, or a dead socket).
#[derive(Default)]
pub struct Kill {
    stop: CancellationToken,
    abort: CancellationToken,
    frame: OnceLock<Bytes>,
}

/// A session's cumulative ack count. Acks are coalesced rather than queued:
/// the writer thread raises the count after pushing any refusal frames the
/// ack covers, and the socket writer loads the count *before* draining the
/// queue, so a refusal always goes out before the ack that counts it.
///
/// The writer counts the ops it was handed; a 70 or 71 is handed over as
/// one op per char or id but is one op on the wire (PROTOCOL.md 3.2), so
/// the connection records the span of writer ops each such frame became
/// ([`expanded`](Self::expanded)) and [`load`](Self::load) answers in wire
/// ops, counting a 70 or 71 only once all of it is done.
#[derive(Default)]
pub struct AckCell {
    count: AtomicU64,
    notify: Notify,
    spans: std::sync::Mutex<Spans>,
}

/// The writer-op spans of expanded wire ops not yet wholly acked.
#[derive(Default)]
struct Spans {
    /// `(first, last)` writer op numbers of each expanded wire op, in
    /// order, `last > first`.
    open: std::collections::VecDeque<(u64, u64)>,
    /// Writer ops beyond one per wire op, in the spans already acked.
    folded: u64,
}

impl AckCell {
    pub fn new() -> Arc<Self> {
        Arc::new(AckCell::default())
    }

    pub fn raise(&self, count: u64) {
        self.count.fetch_max(count, Ordering::Release);
        self.notify.notify_one();
    }

    /// Records that writer ops `first..=last` are one wire op. Called
    /// before the ops are handed to the writer, in order.
    pub fn expanded(&self, first: u64, last: u64) {
        if last > first {
            self.spans
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .open
                .push_back((first, last));
        }
    }

    /// The count in wire ops.
    pub fn load(&self) -> u64 {
        let done = self.count.load(Ordering::Acquire);
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(first, last)) = spans.open.front() {
            if last <= done {
                spans.folded += last - first;
                spans.open.pop_front();
            } else if first <= done {
                // Partly done: counts as not done, nor anything after it.
                return first - 1 - spans.folded;
            } else {
                break;
            }
        }
        done - spans.folded
    }

    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

impl Kill {
    pub fn new() -> Arc<Self> {
        Arc::new(Kill::default())
    }

    /// Stops the connection after what is queued; the first frame given is
    /// the one sent.
    pub fn end(&self, frame: Bytes) {
        let _ = self.frame.set(frame);
        self.stop.cancel();
    }

    /// Stops the connection now, dropping what is queued.
    pub fn kill(&self, frame: Option<Bytes>) {
        if let Some(f) = frame {
            let _ = self.frame.set(f);
        }
        self.stop.cancel();
        self.abort.cancel();
    }

    /// Cancelled when the reader must stop.
    pub fn stopped(&self) -> &CancellationToken {
        &self.stop
    }

    /// Cancelled when the socket writer must stop at once.
    pub fn aborted(&self) -> &CancellationToken {
        &self.abort
    }

    pub fn is_killed(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// The error frame to send before closing, if any.
    pub fn frame(&self) -> Option<Bytes> {
        self.frame.get().cloned()
    }
}

pub fn error_bytes(code: ErrorCode, message: impl Into<String>) -> Bytes {
    crate::metrics::error_frame(code);
    ServerFrame::Error(ErrorFrame::new(code, message)).to_bytes()
}

/// How a connection of protocol `version` is told that its last sync time
/// for `doc` is older than the server's tombstones (PROTOCOL.md 3.6): a 36
/// from version 2 on, `invalid_request` before (a version 1 client can only
/// pull since 0).
pub fn resync_bytes(version: u8, doc: DocId) -> Bytes {
    if version >= VERSION_RESYNC {
        ServerFrame::Resync { doc }.to_bytes()
    } else {
        error_bytes(
            ErrorCode::INVALID_REQUEST,
            format!(
                "document {doc:032x}: the last sync time is older than the tombstone horizon, \
                 so no delta can be sent: pull it since 0 (a full resync)"
            ),
        )
    }
}

/// How a connection of protocol `version` is told that `doc` was deleted
/// at `at` (PROTOCOL.md 3.5): 35 from version 2 on (frames are sent only to
/// peers that announced a version that has them), `unknown_document`
/// before.
pub fn deleted_bytes(version: u8, doc: DocId, at: Time) -> Bytes {
    if version >= VERSION_DELETION {
        ServerFrame::DocDeleted {
            doc,
            deleted_time: at,
        }
        .to_bytes()
    } else {
        error_bytes(
            ErrorCode::UNKNOWN_DOCUMENT,
            format!("document {doc:032x} was deleted (at {at}) and stays deleted"),
        )
    }
}

/// Creates a connection's live queue, bounded to `max_bytes` of frames.
pub fn outbox(max_bytes: usize) -> (Outbox, OutboxRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Outbox {
            tx,
            queued: queued.clone(),
            max: max_bytes,
        },
        OutboxRx { rx, queued },
    )
}

/// Why a push failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue holds `max_bytes` already: the reader is too slow.
    Full,
    /// The connection is gone.
    Closed,
}

/// The sending side of a live queue. Never blocks.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
    max: usize,
}

impl Outbox {
    pub fn try_push(&self, frame: Bytes) -> Result<(), PushError> {
        let len = frame.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        // An empty queue takes any one item, so an item larger than the
        // limit cannot wedge a connection that reads.
        if before > 0 && before + len > self.max {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(PushError::Full);
        }
        self.send(frame, len)
    }

    fn send(&self, frame: Bytes, len: usize) -> Result<(), PushError> {
        self.tx.send(frame).map_err(|_| {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            PushError::Closed
        })
    }

    pub fn max_bytes(&self) -> usize {
        self.max
    }
}

/// The receiving side of a live queue, drained by the socket writer.
pub struct OutboxRx {
    rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl OutboxRx {
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Option<Bytes> {
        self.rx.try_recv().ok()
    }

    /// Frees `n` bytes of the queue's budget once they are written.
    pub fn release(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One session in a room.
pub struct Sub {
    pub session_id: u64,
    /// The connection's protocol version (what it may be sent).
    pub version: u8,
    pub outbox: Outbox,
    pub ack: Arc<AckCell>,
    pub kill: Arc<Kill>,
}

impl Sub {
    /// Pushes a frame; a full queue kills the connection as a slow reader.
    /// Returns whether the session is still alive.
    fn push(&self, frame: Bytes) -> bool {
        match self.outbox.try_push(frame) {
            Ok(()) => true,
            Err(PushError::Full) => {
                crate::metrics::slow_reader();
                self.kill.kill(Some(error_bytes(
                    ErrorCode::SLOW_READER,
                    format!(
                        "outbound queue exceeded max_outbound_bytes ({}): the connection did not read fast enough",
                        self.outbox.max_bytes()
                    ),
                )));
                false
            }
            Err(PushError::Closed) => false,
        }
    }
}

/// Frames for one document's sessions from one batch, grouped in chunks of
/// consecutive frames from the same origin, so each frame is encoded once
/// per version class and the whole batch costs a few queue pushes per
/// session. Version 1/2 sessions get every insert as a 65 and every delete
/// as a 66; version-3 sessions get consecutive one-char inserts at
/// consecutive ids (a 70 that came in, expanded by the writer, or 65s)
/// as 70s and consecutive deletes by one site as 71s (PROTOCOL.md 3.2).
#[derive(Default)]
pub struct Fanout {
    chunks: Vec<Chunk>,
}

struct Chunk {
    origin: Option<u64>,
    /// Version 1/2 frames.
    atoms: BytesMut,
    /// Version-3 frames, the run or range in progress excluded.
    runs: BytesMut,
    coalescer: RunCoalescer,
    /// The site of the range in progress (a 71 carries one deleter).
    range_site: u8,
}

const CHUNK_BYTES: usize = 64 * 1024;

impl Chunk {
    fn new(origin: Option<u64>) -> Self {
        Chunk {
            origin,
            atoms: BytesMut::new(),
            runs: BytesMut::new(),
            coalescer: RunCoalescer::new(),
            range_site: 0,
        }
    }

    fn put(&mut self, c: Coalesced) {
        let frame = match c {
            Coalesced::Run(first, text) => match Run::new(first, text) {
                Ok(run) if run.char_count() > 1 => {
                    ServerFrame::InsertRun(SessionInsertRun::new(run))
                }
                Ok(run) => {
                    let (pid, text) = run.into_parts();
                    match Atom::new(text, pid) {
                        Ok(atom) => ServerFrame::Insert(SessionInsert::new(atom)),
                        Err(_) => return,
                    }
                }
                // Made of valid one-char atoms: cannot fail.
                Err(_) => return,
            },
            Coalesced::Atom(data, pid) => match Atom::new(data, pid) {
                Ok(atom) => ServerFrame::Insert(SessionInsert::new(atom)),
                Err(_) => return,
            },
            Coalesced::Range(first, n) => {
                let site = self.range_site;
                match IdRange::new(first, n) {
                    Ok(range) if n > 1 => {
                        ServerFrame::DeleteRange(SessionDeleteRange { site, range })
                    }
                    Ok(range) => ServerFrame::Delete(SessionDelete {
                        site,
                        pid: range.first().clone(),
                    }),
                    Err(_) => return,
                }
            }
        };
        frame.encode(&mut self.runs);
    }

    /// Ends the run and range in progress (before a frame that is neither,
    /// or at the end of the batch), keeping frame order.
    fn settle(&mut self) {
        let held = [self.coalescer.take_run(), self.coalescer.take_range()];
        for c in held.into_iter().flatten() {
            self.put(c);
        }
    }

    /// Adds a frame to the version-3 bytes.
    fn push_v3(&mut self, frame: &ServerFrame) {
        match frame {
            ServerFrame::Insert(i) => {
                // A delete in progress goes first: order is kept.
                if let Some(c) = self.coalescer.take_range() {
                    self.put(c);
                }
                for c in self
                    .coalescer
                    .insert(i.atom.data(), i.atom.pid())
                    .into_iter()
                    .flatten()
                {
                    self.put(c);
                }
            }
            ServerFrame::InsertRun(r) => {
                if let Some(c) = self.coalescer.take_range() {
                    self.put(c);
                }
                for (data, pid) in r.run.atoms() {
                    for c in self.coalescer.insert(data, &pid).into_iter().flatten() {
                        self.put(c);
                    }
                }
            }
            ServerFrame::Delete(d) => {
                if let Some(c) = self.coalescer.take_run() {
                    self.put(c);
                }
                if self.range_site != d.site
                    && let Some(c) = self.coalescer.take_range()
                {
                    self.put(c);
                }
                self.range_site = d.site;
                if let Some(c) = self.coalescer.delete(&d.pid) {
                    self.put(c);
                }
            }
            other => {
                self.settle();
                other.encode(&mut self.runs);
            }
        }
    }

    fn len(&self) -> usize {
        self.atoms.len()
    }
}

impl Fanout {
    /// Adds a frame made by session `origin` (None: a sync-mode upsert).
    /// `frame` is a version 1/2 frame (65, 66, 67) or a 70/71, which
    /// version 1/2 sessions get expanded.
    pub fn push(&mut self, origin: Option<u64>, frame: &ServerFrame) {
        let chunk = match self.chunks.last_mut() {
            Some(c) if c.origin == origin && c.len() < CHUNK_BYTES => c,
            _ => {
                if let Some(c) = self.chunks.last_mut() {
                    c.settle();
                }
                self.chunks.push(Chunk::new(origin));
                self.chunks.last_mut().expect("just pushed")
            }
        };
        match frame {
            ServerFrame::InsertRun(r) => {
                for i in r.expand() {
                    ServerFrame::Insert(i).encode(&mut chunk.atoms);
                }
                chunk.push_v3(frame);
            }
            ServerFrame::DeleteRange(r) => {
                for d in r.expand() {
                    let d = ServerFrame::Delete(d);
                    d.encode(&mut chunk.atoms);
                    chunk.push_v3(&d);
                }
            }
            other => {
                other.encode(&mut chunk.atoms);
                chunk.push_v3(other);
            }
        }
    }
}

/// Every document's sessions. Owned by the writer thread.
#[derive(Default)]
pub struct Rooms {
    rooms: HashMap<DocId, Vec<Sub>>,
}

impl Rooms {
    pub fn join(&mut self, doc: DocId, sub: Sub) {
        self.rooms.entry(doc).or_default().push(sub);
    }

    pub fn leave(&mut self, doc: DocId, session_id: u64) {
        if let Entry::Occupied(mut room) = self.rooms.entry(doc) {
            room.get_mut().retain(|s| s.session_id != session_id);
            if room.get().is_empty() {
                room.remove();
            }
        }
    }

    /// Whether a change to `doc` made by `origin` has anyone to go to.
    pub fn has_listeners(&self, doc: DocId, origin: Option<u64>) -> bool {
        self.rooms
            .get(&doc)
            .is_some_and(|r| r.iter().any(|s| Some(s.session_id) != origin))
    }

    pub fn contains(&self, doc: DocId, session_id: u64) -> bool {
        self.rooms
            .get(&doc)
            .is_some_and(|r| r.iter().any(|s| s.session_id == session_id))
    }

    /// Sends one batch's frames for `doc` to every session but their origin.
    pub fn fan_out(&mut self, doc: DocId, fanout: Fanout) {
        let mut any_v3 = false;
        if let Some(r) = self.rooms.get(&doc) {
            any_v3 = r.iter().any(|s| s.version >= VERSION_RUNS);
        }
        let chunks: Vec<(Option<u64>, Bytes, Bytes)> = fanout
            .chunks
            .into_iter()
            .map(|mut c| {
                if any_v3 {
                    c.settle();
                }
                (c.origin, c.atoms.freeze(), c.runs.freeze())
            })
            .collect();
        self.retain(doc, |sub| {
            let v3 = sub.version >= VERSION_RUNS;
            chunks
                .iter()
                .filter(|(origin, _, _)| *origin != Some(sub.session_id))
                .all(|(_, atoms, runs)| sub.push(if v3 { runs.clone() } else { atoms.clone() }))
        });
    }

    /// Acknowledges a session's ops up to `count`, after the refusals among
    /// them.
    pub fn ack(&mut self, doc: DocId, session_id: u64, refusals: Vec<Bytes>, count: u64) {
        let mut refusals = Some(refusals);
        self.retain(doc, |sub| {
            if sub.session_id != session_id {
                return true;
            }
            let alive = refusals.take().into_iter().flatten().all(|f| sub.push(f));
            if alive {
                sub.ack.raise(count);
            }
            alive
        });
    }

    /// Ends one session with an error frame, after what is queued for it.
    pub fn end(&mut self, doc: DocId, session_id: u64, frame: Bytes) {
        self.retain(doc, |sub| {
            if sub.session_id == session_id {
                sub.kill.end(frame.clone());
                false
            } else {
                true
            }
        });
    }

    /// Tells every session on `doc` that it was deleted at `at` and ends
    /// it, after what is queued for it.
    pub fn end_deleted(&mut self, doc: DocId, at: Time) {
        if let Some(subs) = self.rooms.remove(&doc) {
            for sub in subs {
                sub.kill.end(deleted_bytes(sub.version, doc, at));
            }
        }
    }

    /// Ends every session (the writer is stopping).
    pub fn end_all(&mut self, frame: Bytes) {
        for (_, subs) in self.rooms.drain() {
            for sub in subs {
                sub.kill.end(frame.clone());
            }
        }
    }

    fn retain(&mut self, doc: DocId, mut keep: impl FnMut(&Sub) -> bool) {
        if let Entry::Occupied(mut room) = self.rooms.entry(doc) {
            room.get_mut().retain(|s| !s.kill.is_killed() && keep(s));
            if room.get().is_empty() {
                room.remove();
            }
        }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notesync_protocol::DocName;

    fn sub(id: u64, max: usize) -> (Sub, OutboxRx) {
        sub_v(id, max, 2)
    }

    fn sub_v(id: u64, max: usize, version: u8) -> (Sub, OutboxRx) {
        let (outbox, rx) = outbox(max);
        (
            Sub {
                session_id: id,
                version,
                outbox,
                ack: AckCell::new(),
                kill: Kill::new(),
            },
            rx,
        )
    }

    #[test]
    fn fan_out_skips_the_origin_and_kills_slow_readers() {
        let mut rooms = Rooms::default();
        let (a, mut ra) = sub(1, 1 << 20);
        let (b, mut rb) = sub(2, 8);
        let b_kill = b.kill.clone();
        rooms.join(5, a);
        rooms.join(5, b);
        let mut f = Fanout::default();
        let frame = ServerFrame::Rename(DocName::new("x").expect("name"));
        f.push(Some(1), &frame);
        rooms.fan_out(5, f);
        assert!(ra.try_recv().is_none(), "echoed to the sender");
        assert_eq!(rb.try_recv().as_deref(), Some(&frame.to_bytes()[..]));
        // b never releases what it read: the queue fills and b is killed.
        let mut f = Fanout::default();
        f.push(Some(1), &frame);
        f.push(None, &frame);
        f.push(Some(1), &frame);
        rooms.fan_out(5, f);
        assert!(b_kill.is_killed());
        assert!(b_kill.frame().is_some());
        assert!(!rooms.contains(5, 2));
        assert!(rooms.contains(5, 1));
        rooms.leave(5, 1);
        assert!(rooms.is_empty(), "an empty room is dropped");
    }

    fn drain(rx: &mut OutboxRx) -> Vec<ServerFrame> {
        use tokio_util::codec::Decoder;
        let mut buf = BytesMut::new();
        while let Some(b) = rx.try_recv() {
            buf.extend_from_slice(&b);
        }
        let mut dec = notesync_protocol::ClientCodec::default();
        let mut out = Vec::new();
        while let Some(f) = dec.decode(&mut buf).expect("valid frames") {
            out.push(f);
        }
        out
    }

    /// One batch, encoded once per version class: a version-3 session gets
    /// consecutive one-char inserts as a 70 and consecutive deletes as a
    /// 71; a version-2 session gets a 65 per char and a 66 per id, in the
    /// same order, for 65s and for 70s alike.
    #[test]
    fn fan_out_sends_runs_to_version_3_and_atoms_to_older_sessions() {
        use notesync_protocol::{Level, Pid};
        let p = |i: u32| Pid::from_levels(&[Level::new(i, 4)]);
        let ins = |i: u32, c: &str| {
            ServerFrame::Insert(SessionInsert::new(Atom::new(c, p(i)).expect("atom")))
        };
        let del = |i: u32| ServerFrame::Delete(SessionDelete { site: 2, pid: p(i) });
        let mut rooms = Rooms::default();
        let (old, mut r_old) = sub_v(1, 1 << 20, 2);
        let (new, mut r_new) = sub_v(2, 1 << 20, 3);
        rooms.join(5, old);
        rooms.join(5, new);
        let mut f = Fanout::default();
        for (i, c) in (10..).zip(["h", "é", "y"]) {
            f.push(Some(9), &ins(i, c));
        }
        f.push(Some(9), &ins(13, "multi"));
        let run = Run::new(p(20), "ab").expect("run");
        f.push(Some(9), &ServerFrame::InsertRun(SessionInsertRun::new(run)));
        f.push(
            Some(9),
            &ServerFrame::Rename(notesync_protocol::DocName::default()),
        );
        for i in 30..34 {
            f.push(None, &del(i));
        }
        f.push(
            None,
            &ServerFrame::DeleteRange(SessionDeleteRange {
                site: 2,
                range: IdRange::new(p(34), 3).expect("range"),
            }),
        );
        rooms.fan_out(5, f);
        let old = drain(&mut r_old);
        let mut expect_old = vec![ins(10, "h"), ins(11, "é"), ins(12, "y"), ins(13, "multi")];
        expect_old.extend([ins(20, "a"), ins(21, "b")]);
        expect_old.push(ServerFrame::Rename(notesync_protocol::DocName::default()));
        expect_old.extend((30..37).map(del));
        assert_eq!(old, expect_old);
        let new = drain(&mut r_new);
        let run = |i: u32, t: &str| {
            ServerFrame::InsertRun(SessionInsertRun::new(Run::new(p(i), t).expect("run")))
        };
        assert_eq!(
            new,
            vec![
                run(10, "héy"),
                ins(13, "multi"),
                run(20, "ab"),
                ServerFrame::Rename(notesync_protocol::DocName::default()),
                ServerFrame::DeleteRange(SessionDeleteRange {
                    site: 2,
                    range: IdRange::new(p(30), 7).expect("range"),
                }),
            ]
        );
    }

    /// A 70 or 71 expanded into several writer ops is one op on the wire,
    /// counted once all of it is done.
    #[test]
    fn ack_counts_an_expanded_op_once_when_whole() {
        let ack = AckCell::new();
        // Wire ops: 1 (writer 1), 2 (writer 2..=5), 3 (writer 6), 4 (7..=8).
        ack.expanded(2, 5);
        ack.expanded(7, 8);
        let counts: Vec<u64> = (0..=8)
            .map(|w| {
                ack.raise(w);
                ack.load()
            })
            .collect();
        assert_eq!(counts, [0, 1, 1, 1, 1, 2, 3, 3, 4]);
    }
}
