//! The async SDK: a store plus a server, sync and live sessions.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notesync_protocol::{
    Atom, ClientFrame, Coalesced, DocId, DocName, ErrorCode, IdRange, Run, RunCoalescer,
    ServerFrame, SessionDelete, SessionDeleteRange, SessionInsert, SessionInsertRun,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::doc::TextChange;
use crate::feed::{LiveNotes, SyncLoop};
use crate::net::{Conn, NetError, ServerConfig};
use crate::oplog::{OpKey, PendingOp};
use crate::store::{NoteInfo, RemoteDeletion, Store, StoreError, lock};
use crate::sync::{SyncError, SyncProgress, SyncReport, pull_full, sync_once};

/// The running background sync's wake-up and stop.
type LoopHandle = (mpsc::Sender<()>, CancellationToken);

/// An app's handle on its notes.
#[derive(Clone)]
pub struct Client {
    store: Arc<Mutex<Store>>,
    server: ServerConfig,
    /// Notes with a session open here (the background sync leaves them to it).
    live: LiveNotes,
    /// The background sync's wake-up and stop, once started: local edits
    /// ask it to send them; a new loop stops the old one.
    sync_wake: Arc<Mutex<Option<LoopHandle>>>,
}

impl Client {
    /// Opens (or creates) the store in `dir`. Works offline.
    pub fn open(
        dir: impl Into<std::path::PathBuf>,
        server: ServerConfig,
    ) -> Result<Client, StoreError> {
        Ok(Client {
            store: Arc::new(Mutex::new(Store::open(dir)?)),
            server,
            live: LiveNotes::default(),
            sync_wake: Arc::default(),
        })
    }

    /// Asks the background sync, if one runs, to send local edits soon.
    fn edited<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if r.is_ok()
            && let Some((wake, _)) = &*self.sync_wake.lock().unwrap_or_else(|e| e.into_inner())
        {
            let _ = wake.try_send(());
        }
        r
    }

    pub fn list(&self) -> Vec<NoteInfo> {
        lock(&self.store).list()
    }

    /// Whether a note's text is `text` (without reading a note that is
    /// not in memory, when its structure says its text's digest).
    pub fn text_is(&self, id: DocId, text: &str) -> Result<bool, StoreError> {
        lock(&self.store).text_is(id, text)
    }

    /// One note's summary.
    pub fn info(&self, id: DocId) -> Result<NoteInfo, StoreError> {
        lock(&self.store).info(id)
    }

    /// Creates a note (offline too); returns its id.
    pub fn create(&self, name: &str) -> Result<DocId, StoreError> {
        self.edited(lock(&self.store).create(name))
    }

    /// [`Store::create_for_file`].
    pub fn create_for_file(&self, name: &str) -> Result<DocId, StoreError> {
        self.edited(lock(&self.store).create_for_file(name))
    }

    pub fn rename(&self, id: DocId, name: &str) -> Result<(), StoreError> {
        self.edited(lock(&self.store).rename(id, name, false))
    }

    /// Deletes a note, here now and on the server (and so on every device)
    /// at the next sync. Works offline. Close its session first.
    pub fn delete_note(&self, id: DocId) -> Result<(), StoreError> {
        self.edited(lock(&self.store).delete_note(id))
    }

    /// Inserts text at a char index; durable when it returns (see
    /// [`Store::insert`] for the one exception, an import's first insert).
    pub fn insert(&self, id: DocId, index: usize, text: &str) -> Result<(), StoreError> {
        self.edited(lock(&self.store).insert(id, index, text, false).map(drop))
    }

    /// Deletes a char range; durable when it returns.
    pub fn delete(&self, id: DocId, range: Range<usize>) -> Result<(), StoreError> {
        self.edited(lock(&self.store).delete(id, range, false).map(drop))
    }

    pub fn text(&self, id: DocId) -> Result<String, StoreError> {
        lock(&self.store).text(id)
    }

    /// Whether a note has no text and no pending op.
    pub fn is_blank(&self, id: DocId) -> Result<bool, StoreError> {
        lock(&self.store).is_blank(id)
    }

    pub fn name(&self, id: DocId) -> Result<String, StoreError> {
        lock(&self.store).name(id)
    }

    /// Writes every note's files now (edits are already durable in the op
    /// logs; this refreshes the `.md` files and compacts the logs).
    pub fn flush(&self) -> Result<(), StoreError> {
        lock(&self.store).flush()
    }

    pub fn store(&self) -> &Arc<Mutex<Store>> {
        &self.store
    }

    /// One two-way sync of every note.
    pub async fn sync_now(&self) -> Result<SyncReport, SyncError> {
        sync_once(&self.store, &self.server, &mut |_| {}, &mut |_| None).await
    }

    /// [`Client::sync_now`], telling `progress` after each note it is done
    /// with.
    pub async fn sync_now_reporting(
        &self,
        mut progress: impl FnMut(SyncProgress) + Send,
    ) -> Result<SyncReport, SyncError> {
        sync_once(&self.store, &self.server, &mut progress, &mut |_| None).await
    }

    /// [`Client::sync_now_reporting`], asking `new_text` for the text of
    /// each new, still empty note once the server gave it its site: that
    /// text is then made with the ids it keeps (an import whose files hold
    /// the text until then; text inserted earlier would be made with
    /// provisional ids and re-made). Appended to the note's log unsynced:
    /// the fsync before its upsert leaves makes it durable, so the caller
    /// must keep the text where it found it until the note's log is
    /// synced ([`crate::Store::log_synced`]).
    pub async fn sync_now_filling(
        &self,
        mut progress: impl FnMut(SyncProgress) + Send,
        mut new_text: impl FnMut(DocId) -> Option<String> + Send,
    ) -> Result<SyncReport, SyncError> {
        sync_once(&self.store, &self.server, &mut progress, &mut new_text).await
    }

    /// Starts the background sync: it follows the server's change feed
    /// (PROTOCOL.md 3.8) and pulls each changed note as its entry arrives;
    /// on a server without the feed it syncs every `every` instead. Edits
    /// through this client are sent soon after they are made. Failures are
    /// retried with backoff (up to a minute). Its events must be read
    /// ([`SyncLoop::next_event`]): the loop waits for a reader that is
    /// behind. One per client: starting another stops this one, so that
    /// two never sync the store at once.
    pub fn sync_loop(&self, every: Duration) -> SyncLoop {
        let (tx, rx) = mpsc::channel(1);
        let l = SyncLoop::start(
            self.store.clone(),
            self.server.clone(),
            self.live.clone(),
            every,
            (tx.clone(), rx),
        );
        let before = self
            .sync_wake
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace((tx, l.stopper()));
        if let Some((_, stop)) = before {
            stop.cancel();
        }
        l
    }

    /// Starts a live session on a note (the note is created on the server
    /// if it is new). Edits made through the session are sent as they are
    /// made; remote edits arrive as [`SessionEvent`]s.
    pub fn session(&self, id: DocId) -> Result<Session, StoreError> {
        lock(&self.store).info(id)?;
        let (wake_tx, wake_rx) = mpsc::channel(1);
        let (event_tx, event_rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let cancel = CancellationToken::new();
        self.live.open(id);
        let task = tokio::spawn(run_session(SessionTask {
            resync: false,
            store: self.store.clone(),
            server: self.server.clone(),
            doc: id,
            wake: wake_rx,
            events: event_tx,
            connected: connected.clone(),
            cancel: cancel.clone(),
        }));
        Ok(Session {
            store: self.store.clone(),
            doc: id,
            wake: wake_tx,
            events: event_rx,
            connected,
            cancel,
            task: Some(task),
            live: self.live.clone(),
        })
    }
}

/// What happened in a live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The session is (again) live; the text includes everything up to now.
    Connected,
    /// A remote edit changed the text.
    Remote(TextChange),
    /// A remote rename.
    Renamed(String),
    /// The server acknowledged ops; `pending` are still unacknowledged.
    Acknowledged { pending: usize },
    /// The connection dropped; the session reconnects by itself.
    Disconnected(String),
    /// The server refused an op (it is dropped from the log: it would be
    /// refused again). Shows a bug or a permission problem.
    Refused { code: ErrorCode, message: String },
    /// The note was deleted on another device: it is removed here (its
    /// text kept in the trash if it had unsynced edits) and the session
    /// ends.
    Deleted(RemoteDeletion),
}

/// A live editing session on one note.
pub struct Session {
    store: Arc<Mutex<Store>>,
    doc: DocId,
    wake: mpsc::Sender<()>,
    events: mpsc::UnboundedReceiver<SessionEvent>,
    connected: Arc<AtomicBool>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    /// Tells the background sync this note is left to the session until
    /// the session is dropped.
    live: LiveNotes,
}

impl Session {
    pub fn doc(&self) -> DocId {
        self.doc
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Inserts text; durable on return, sent right away when connected.
    pub fn insert(&self, index: usize, text: &str) -> Result<(), StoreError> {
        let sent = self.is_connected();
        lock(&self.store).insert(self.doc, index, text, sent)?;
        let _ = self.wake.try_send(());
        Ok(())
    }

    pub fn delete(&self, range: Range<usize>) -> Result<(), StoreError> {
        let sent = self.is_connected();
        lock(&self.store).delete(self.doc, range, sent)?;
        let _ = self.wake.try_send(());
        Ok(())
    }

    pub fn rename(&self, name: &str) -> Result<(), StoreError> {
        let sent = self.is_connected();
        lock(&self.store).rename(self.doc, name, sent)?;
        let _ = self.wake.try_send(());
        Ok(())
    }

    pub fn text(&self) -> String {
        lock(&self.store).text(self.doc).unwrap_or_default()
    }

    /// Ops not yet acknowledged by the server.
    pub fn pending_ops(&self) -> usize {
        lock(&self.store).pending_ops(self.doc).unwrap_or(0)
    }

    /// The next event; `None` once the session is closed.
    pub async fn next_event(&mut self) -> Option<SessionEvent> {
        self.events.recv().await
    }

    /// Ends the session and saves the note.
    pub async fn close(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let _ = lock(&self.store).flush();
    }

    /// Runs `f` on the store, locked: nothing else (not even this
    /// session's remote edits) changes any note until it returns. `f` gets
    /// the `sent` to record this note's ops with, as [`Session::insert`]
    /// does; the session is woken afterwards so that they go out.
    pub fn with_store<R>(&self, f: impl FnOnce(&mut Store, bool) -> R) -> R {
        let sent = self.is_connected();
        let r = f(&mut lock(&self.store), sent);
        let _ = self.wake.try_send(());
        r
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.live.close(self.doc);
    }
}

struct SessionTask {
    /// Set when the server answered session_start with a 36.
    resync: bool,
    store: Arc<Mutex<Store>>,
    server: ServerConfig,
    doc: DocId,
    wake: mpsc::Receiver<()>,
    events: mpsc::UnboundedSender<SessionEvent>,
    connected: Arc<AtomicBool>,
    cancel: CancellationToken,
}

async fn run_session(mut t: SessionTask) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let cancel = t.cancel.clone();
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = live(&mut t) => r,
        };
        t.connected.store(false, Ordering::Release);
        let _ = lock(&t.store).flush();
        let result = match result {
            Ok(()) if std::mem::take(&mut t.resync) => {
                match pull_full(&t.store, &t.server, t.doc).await {
                    Ok(r) => {
                        for d in r.deleted {
                            let _ = t.events.send(SessionEvent::Deleted(d));
                        }
                        if !lock(&t.store).contains(t.doc) {
                            return;
                        }
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            r => r,
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                let _ = t.events.send(SessionEvent::Disconnected(e.to_string()));
                if !e.is_transient() {
                    tracing::warn!(error = %e, "session error; retrying");
                }
            }
        }
        tokio::select! {
            _ = t.cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// One connection's life: start, catch up, re-send what is unacknowledged,
/// then relay edits both ways until the connection fails.
async fn live(t: &mut SessionTask) -> Result<(), SyncError> {
    let store = t.store.clone();
    let (replica, since) = {
        let s = lock(&store);
        (s.replica_id(), s.note_sync_time(t.doc)?)
    };
    let mut conn = Conn::connect(&t.server, replica).await?;
    conn.send(ClientFrame::SessionStart { since, doc: t.doc })
        .await?;
    let mut inserted = std::collections::HashSet::new();
    let site = loop {
        let frame = match conn.recv().await? {
            // A 37 is the 33 it stands for (PROTOCOL.md 3.2).
            ServerFrame::DocResponseRuns(r) => ServerFrame::DocResponse(r.expand()),
            f => f,
        };
        match frame {
            ServerFrame::DocResponse(r) if r.doc == t.doc => {
                inserted.extend(r.inserts.iter().map(|a| a.pid.to_pid()));
                let mut s = lock(&store);
                for c in s.apply_response(t.doc, &r.inserts, &r.deletes)? {
                    let _ = t.events.send(SessionEvent::Remote(c));
                }
                if s.has_pending_rename(t.doc).is_ok_and(|pending| !pending) {
                    let _ = s.apply_remote_name(t.doc, &r.name);
                }
            }
            ServerFrame::SessionStarted {
                site, sync_time, ..
            } => {
                let mut s = lock(&store);
                for c in s.reconcile(t.doc, &inserted, false)? {
                    let _ = t.events.send(SessionEvent::Remote(c));
                }
                s.set_site(t.doc, site)?;
                s.set_note_sync(t.doc, sync_time)?;
                break site;
            }
            ServerFrame::DocDeleted { doc, .. } if doc == t.doc => {
                deleted(t);
                return Ok(());
            }
            // Our cursor is older than the server's tombstones (PROTOCOL.md
            // 3.6): resync in sync mode first, then start again.
            ServerFrame::Resync { doc } if doc == t.doc => {
                t.resync = true;
                return Ok(());
            }
            other => {
                return Err(
                    NetError::Unexpected(format!("expected 33 or 68, got {other:?}")).into(),
                );
            }
        }
    };
    t.connected.store(true, Ordering::Release);
    let _ = t.events.send(SessionEvent::Connected);
    // One entry per wire op (a 70 or 71 is one op with several keys).
    let mut inflight: VecDeque<Vec<(OpKey, Option<DocName>)>> = VecDeque::new();
    let mut sent_upto = 0u64;
    let mut acked = 0u64;
    let mut last_save = Instant::now();
    send_new(
        &store,
        t.doc,
        site,
        &mut conn,
        &mut inflight,
        &mut sent_upto,
    )
    .await?;
    loop {
        tokio::select! {
            w = t.wake.recv() => {
                if w.is_none() {
                    return Ok(());
                }
                send_new(&store, t.doc, site, &mut conn, &mut inflight, &mut sent_upto).await?;
            }
            f = conn.recv_idle() => {
                let f = f.ok_or(NetError::Closed)??;
                let mut s = lock(&store);
                match f {
                    ServerFrame::Insert(i) => {
                        let (data, pid) = i.atom.into_parts();
                        for c in s.apply_live_insert(t.doc, &data, pid)? {
                            let _ = t.events.send(SessionEvent::Remote(c));
                        }
                    }
                    ServerFrame::Delete(d) => {
                        for c in s.apply_remote_delete(t.doc, &d.pid)? {
                            let _ = t.events.send(SessionEvent::Remote(c));
                        }
                    }
                    // A run is its one-char atoms, a range its ids
                    // (PROTOCOL.md 1.5).
                    ServerFrame::InsertRun(r) => {
                        for (data, pid) in r.run.atoms() {
                            for c in s.apply_live_insert(t.doc, data, pid)? {
                                let _ = t.events.send(SessionEvent::Remote(c));
                            }
                        }
                    }
                    ServerFrame::DeleteRange(d) => {
                        for pid in d.range.ids() {
                            for c in s.apply_remote_delete(t.doc, &pid)? {
                                let _ = t.events.send(SessionEvent::Remote(c));
                            }
                        }
                    }
                    ServerFrame::Rename(name) => {
                        s.apply_remote_name(t.doc, &name)?;
                        let _ = t.events.send(SessionEvent::Renamed(name.as_str().to_owned()));
                    }
                    ServerFrame::SessionAck { count } => {
                        while acked < count {
                            let Some(keys) = inflight.pop_front() else {
                                return Err(NetError::Unexpected(format!("ack {count} covers more ops than were sent")).into());
                            };
                            acked += 1;
                            for (key, rename) in keys {
                                s.acknowledge_session_op(t.doc, &key, rename.as_ref(), &inserted)?;
                            }
                        }
                        let pending = s.pending_ops(t.doc)?;
                        let _ = t.events.send(SessionEvent::Acknowledged { pending });
                        // Compact the log now and then, not on every ack.
                        if pending == 0 || last_save.elapsed() > Duration::from_millis(500) {
                            s.save_note(t.doc)?;
                            last_save = Instant::now();
                        }
                    }
                    ServerFrame::Error(e) if !e.code.closes_connection() => {
                        // The op it refers to is the next unacknowledged one;
                        // the ack that follows covers it and drops it.
                        let _ = t.events.send(SessionEvent::Refused { code: e.code, message: e.message });
                    }
                    ServerFrame::Error(e) => return Err(NetError::from(e).into()),
                    ServerFrame::DocDeleted { doc, .. } if doc == t.doc => {
                        drop(s);
                        deleted(t);
                        return Ok(());
                    }
                    other => return Err(NetError::Unexpected(format!("unexpected frame in a session: {other:?}")).into()),
                }
            }
        }
    }
}

/// The session's note was deleted on the server (35): removed here, and
/// the app is told.
fn deleted(t: &SessionTask) {
    match lock(&t.store).apply_remote_deletion(t.doc) {
        Ok(Some(d)) => {
            let _ = t.events.send(SessionEvent::Deleted(d));
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "removing a deleted note"),
    }
}

/// Sends every pending op made after `sent_upto` (marking them sent
/// durably first). On a version-3 connection consecutive one-char inserts
/// at consecutive ids go as one 70 and consecutive deletes as one 71.
async fn send_new(
    store: &Mutex<Store>,
    doc: DocId,
    site: u8,
    conn: &mut Conn,
    inflight: &mut VecDeque<Vec<(OpKey, Option<DocName>)>>,
    sent_upto: &mut u64,
) -> Result<(), SyncError> {
    let runs = conn.speaks_runs();
    let frames = {
        let mut s = lock(store);
        if s.is_provisional(doc)? || site == 0 {
            // No site: inserts cannot be sent (PROTOCOL.md 1.3); they stay.
            return Ok(());
        }
        let ops = s.ops_since(doc, *sent_upto)?;
        let mut out = SessionFrames {
            site,
            runs,
            coalescer: RunCoalescer::new(),
            frames: Vec::with_capacity(ops.len()),
            inflight,
        };
        for (seq, op) in ops {
            *sent_upto = seq;
            out.push(op);
        }
        out.settle();
        let frames = out.frames;
        if !frames.is_empty() {
            s.mark_sent(doc)?;
        }
        frames
    };
    for f in frames {
        conn.feed(f).await?;
    }
    Ok(conn.flush().await?)
}

/// A session's outgoing frames, with the wire op each stands for.
struct SessionFrames<'a> {
    site: u8,
    /// Version 3: coalesce into 70s and 71s.
    runs: bool,
    coalescer: RunCoalescer,
    frames: Vec<ClientFrame>,
    inflight: &'a mut VecDeque<Vec<(OpKey, Option<DocName>)>>,
}

impl SessionFrames<'_> {
    fn push(&mut self, op: PendingOp) {
        match op {
            PendingOp::Insert(a) if self.runs => {
                if let Some(c) = self.coalescer.take_range() {
                    self.put(c);
                }
                for c in self
                    .coalescer
                    .insert(a.data(), a.pid())
                    .into_iter()
                    .flatten()
                {
                    self.put(c);
                }
            }
            PendingOp::Delete(p) if self.runs => {
                if let Some(c) = self.coalescer.take_run() {
                    self.put(c);
                }
                if let Some(c) = self.coalescer.delete(&p) {
                    self.put(c);
                }
            }
            PendingOp::Insert(a) => {
                self.inflight
                    .push_back(vec![(OpKey::Insert(a.pid().clone()), None)]);
                self.frames.push(ClientFrame::Insert(SessionInsert::new(a)));
            }
            PendingOp::Delete(p) => {
                self.inflight
                    .push_back(vec![(OpKey::Delete(p.clone()), None)]);
                self.frames.push(ClientFrame::Delete(SessionDelete {
                    site: self.site,
                    pid: p,
                }));
            }
            PendingOp::Rename(n) => {
                self.settle();
                self.inflight
                    .push_back(vec![(OpKey::Rename, Some(n.clone()))]);
                self.frames.push(ClientFrame::Rename(n));
            }
        }
    }

    /// Sends the run or range in progress.
    fn settle(&mut self) {
        let held = [self.coalescer.take_run(), self.coalescer.take_range()];
        for c in held.into_iter().flatten() {
            self.put(c);
        }
    }

    /// One complete run, atom or range as its frame: a one-char run is a
    /// 65, a one-id range a 66 (what a version 2 peer would send too).
    fn put(&mut self, c: Coalesced) {
        // Made of the log's valid atoms and ids.
        let (keys, frame) = match c {
            Coalesced::Run(first, text) => {
                let run = Run::new(first, text).expect("coalesced from valid atoms");
                let keys = run.atoms().map(|(_, p)| (OpKey::Insert(p), None)).collect();
                if run.char_count() == 1 {
                    let (pid, text) = run.into_parts();
                    let atom = Atom::new(text, pid).expect("a one-char atom");
                    (keys, ClientFrame::Insert(SessionInsert::new(atom)))
                } else {
                    (keys, ClientFrame::InsertRun(SessionInsertRun::new(run)))
                }
            }
            Coalesced::Atom(data, pid) => {
                let atom = Atom::new(data, pid).expect("a valid atom");
                (
                    vec![(OpKey::Insert(atom.pid().clone()), None)],
                    ClientFrame::Insert(SessionInsert::new(atom)),
                )
            }
            Coalesced::Range(first, n) => {
                let range = IdRange::new(first, n).expect("coalesced from valid ids");
                let keys = range.ids().map(|p| (OpKey::Delete(p), None)).collect();
                let frame = if n == 1 {
                    ClientFrame::Delete(SessionDelete {
                        site: self.site,
                        pid: range.first().clone(),
                    })
                } else {
                    ClientFrame::DeleteRange(SessionDeleteRange {
                        site: self.site,
                        range,
                    })
                };
                (keys, frame)
            }
        };
        self.inflight.push_back(keys);
        self.frames.push(frame);
    }
}
