//! A scripted fake server, to check clients against PROTOCOL.md.
//!
//! [`FakeServer`] is a TCP listener; each accepted connection is a
//! [`FakeConn`] that a check's script drives step by step: expect this
//! request, send that reply, ack only so many ops, close now, send an
//! error code the client cannot know. The replies come from a [`World`], a
//! small in-memory model of documents with server times that answers
//! synclist, pull, upsert and session_start as PROTOCOL.md 3.1 and 3.2 say
//! (so a correct client converges with it), and that the script changes to
//! play other replicas (their inserts, deletes and renames).
//!
//! Every frame a client sends is checked as it arrives against the rules a
//! client must follow, and the first violation fails the check:
//! - each connection starts with hello, version 1, 2 or 3, and every
//!   connection of one client carries the same replica id (1, 3, 6); the
//!   fake server answers the hello's version (or refuses version 3 when
//!   told to, [`FakeServer::refuse_version_3`]) and sends version 2 frames
//!   (35) only after a version 2 or 3 hello, version 3 frames (37, 70, 71)
//!   only after a version 3 hello; a 3 (doc_delete) only after a version 2
//!   or 3 hello, a 4, 70 or 71 only after a version 3 one;
//! - a version-3 connection's 4 is handed to the script as the 2 it stands
//!   for (its chars as one-char atoms, its ranges as ids; [`Traffic::raw`]
//!   keeps the headers as sent), its 70s and 71s as they came, and its
//!   chars and ids are held to the same rules as atoms and deletes;
//! - an insert (upsert or 65) is made only with the site this server gave
//!   the replica for the document in a 34 or 68, never before it has one,
//!   never with another site (1.1 rule 3, 1.3); a 66 carries its site;
//! - an id is never sent with other data than it already has, from either
//!   side (1.1 rules 2, 3), and never at a reserved virtual id (1.2).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use notesync_protocol::{
    Atom, AtomListBuilder, ClientFrame, Coalesced, DecodeError, DocId, DocName, DocResponse,
    DocResponseRuns, ErrorCode, ErrorFrame, FeedEntry, Hello, IdRange, ItemListBuilder, Level, Pid,
    PidListBuilder, RangeListBuilder, Run, RunCoalescer, ServerCodec, ServerFrame, SessionDelete,
    SessionDeleteRange, SessionInsert, SessionInsertRun, SyncEntry, Time, Upsert, VERSION_FEED,
    VERSION_RUNS, extends, header,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

use crate::conn::WAIT;

/// What the client did next on a connection.
#[derive(Debug)]
pub enum ClientEvent {
    Frame(ClientFrame),
    /// The client closed the connection.
    Closed,
    /// Nothing arrived within the wait.
    Timeout,
    Undecodable(String),
}

/// A client frame, for messages.
pub fn show_client(f: &ClientFrame) -> String {
    match f {
        ClientFrame::Upsert(u) => format!(
            "upsert of {:#x} since {} with {} inserts, {} deletes, name {:?}",
            u.doc,
            u.since,
            u.inserts.len(),
            u.deletes.len(),
            u.name.as_str()
        ),
        ClientFrame::Insert(i) => format!("65 {:?} {:?}", i.atom.pid(), i.atom.data()),
        other => format!("{other:?}"),
    }
}

fn show_event(e: &ClientEvent) -> String {
    match e {
        ClientEvent::Frame(f) => show_client(f),
        ClientEvent::Closed => "the connection closed".into(),
        ClientEvent::Timeout => "nothing (timed out)".into(),
        ClientEvent::Undecodable(s) => format!("undecodable bytes: {s}"),
    }
}

/// Everything the client sent, and what it must stay consistent with.
#[derive(Debug, Default, Clone)]
pub struct Traffic {
    /// Every frame received: (connection number, frame).
    pub received: Vec<(usize, ClientFrame)>,
    /// The replica id of the first hello.
    pub replica: Option<u128>,
    /// The site this server gave the client for each document (34, 68).
    pub sites: BTreeMap<DocId, u8>,
    /// Every id seen with its data, from either side, per document.
    pub known: BTreeMap<DocId, BTreeMap<Pid, String>>,
    /// The header of every frame received, as sent (a 4 is in `received`
    /// as the 2 it stands for), by connection.
    pub raw: Vec<(usize, u8)>,
    /// The largest time of every 38 and 39 sent, by connection (the
    /// cursor a client following the feed keeps, 3.8).
    pub feed_times: Vec<(usize, Time)>,
}

impl Traffic {
    /// The 65s and upsert inserts received for `doc`, in order.
    pub fn inserts(&self, doc: DocId) -> Vec<(usize, Atom)> {
        self.received
            .iter()
            .flat_map(|(c, f)| match f {
                ClientFrame::Upsert(u) if u.doc == doc => u
                    .inserts
                    .iter()
                    .map(|a| (*c, a.to_atom()))
                    .collect::<Vec<_>>(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// The upserts received for `doc`, in order.
    pub fn upserts(&self, doc: DocId) -> Vec<Upsert> {
        self.received
            .iter()
            .filter_map(|(_, f)| match f {
                ClientFrame::Upsert(u) if u.doc == doc => Some(u.clone()),
                _ => None,
            })
            .collect()
    }

    /// Checks one client frame against the client rules; `Err` says which.
    fn admit(&mut self, session_doc: Option<DocId>, f: &ClientFrame) -> Result<(), String> {
        let mut inserts: Vec<(DocId, Pid, String, &str)> = Vec::new();
        match f {
            ClientFrame::Upsert(u) => {
                for a in u.inserts.iter() {
                    inserts.push((u.doc, a.pid.to_pid(), a.data.to_owned(), "an upsert"));
                }
            }
            ClientFrame::Insert(i) => {
                let doc = session_doc.ok_or("a 65 outside a session")?;
                inserts.push((doc, i.atom.pid().clone(), i.atom.data().to_owned(), "a 65"));
            }
            ClientFrame::InsertRun(r) => {
                let doc = session_doc.ok_or("a 70 outside a session")?;
                for (data, pid) in r.run.atoms() {
                    inserts.push((doc, pid, data.to_owned(), "a 70"));
                }
            }
            ClientFrame::Delete(SessionDelete { site: by, .. })
            | ClientFrame::DeleteRange(SessionDeleteRange { site: by, .. }) => {
                let doc = session_doc.ok_or("a 66 or 71 outside a session")?;
                let site = self.sites.get(&doc).copied().unwrap_or(0);
                if *by != site {
                    return Err(format!(
                        "a 66 or 71 carries the deleter's site (3.2): this replica's site for the \
                         document is {site}, the frame carries {by}"
                    ));
                }
            }
            _ => {}
        }
        for (doc, pid, data, what) in inserts {
            let site = self.sites.get(&doc).copied();
            match site {
                None => {
                    return Err(format!(
                        "{what} inserts {pid:?} into a document for which no 34 or 68 gave this replica \
                         a site yet (1.3: provisional ids never go on the wire)"
                    ));
                }
                Some(0) => {
                    return Err(format!(
                        "{what} inserts {pid:?} although this replica has no site for the document \
                         (its 34/68 carried site 0, 1.3)"
                    ));
                }
                Some(s) if pid.creator() != s => {
                    return Err(format!(
                        "{what} inserts {pid:?}, an id of site {}: this replica's site for the \
                         document is {s} (1.1 rule 3, 1.3)",
                        pid.creator()
                    ));
                }
                Some(_) => {}
            }
            let known = self.known.entry(doc).or_default();
            if let Some(old) = known.get(&pid) {
                if *old != data {
                    return Err(format!(
                        "{what} sends {pid:?} with data {data:?}; that id already has data {old:?} \
                         (1.1: ids are unique forever; the same id with other data is id_conflict)"
                    ));
                }
            }
            if let Some(parent) = virtual_parent(&pid, known) {
                return Err(format!(
                    "{what} inserts at {pid:?}, a virtual id of the atom at {parent:?} (1.2: reserved)"
                ));
            }
            known.insert(pid, data);
        }
        Ok(())
    }

    /// Records atoms this server sent.
    fn sent_atoms(&mut self, doc: DocId, atoms: impl IntoIterator<Item = (Pid, String)>) {
        let known = self.known.entry(doc).or_default();
        for (p, d) in atoms {
            known.insert(p, d);
        }
    }
}

/// The atom `pid` is a reserved virtual id of, if any (1.2).
fn virtual_parent(pid: &Pid, known: &BTreeMap<Pid, String>) -> Option<Pid> {
    if pid.depth() < 2 {
        return None;
    }
    let levels: Vec<Level> = pid.levels().collect();
    let (last, parent) = levels.split_last().unwrap();
    let parent = Pid::from_levels(parent);
    let data = known.get(&parent)?;
    (last.site == parent.creator() && last.ident < 255 && data.chars().count() >= 2)
        .then_some(parent)
}

/// A 33 as the 37 a version-3 connection gets: consecutive one-char atoms
/// at consecutive ids as runs, consecutive deletes as ranges.
fn to_runs(r: &DocResponse) -> DocResponseRuns {
    let mut items = ItemListBuilder::new();
    let mut ranges = RangeListBuilder::new();
    let mut co = RunCoalescer::new();
    let put = |c: Coalesced, items: &mut ItemListBuilder, ranges: &mut RangeListBuilder| {
        // Coalesced from a valid 33's atoms and ids.
        match c {
            Coalesced::Run(first, text) => items.push_run(&first, &text).expect("a valid run"),
            Coalesced::Atom(data, pid) => items.push_atom(&data, &pid).expect("a valid atom"),
            Coalesced::Range(first, n) => ranges.push(&first, n).expect("a valid range"),
        }
    };
    for a in r.inserts.iter() {
        for c in co.insert(a.data, &a.pid.to_pid()).into_iter().flatten() {
            put(c, &mut items, &mut ranges);
        }
    }
    if let Some(c) = co.take_run() {
        put(c, &mut items, &mut ranges);
    }
    for p in r.deletes.iter() {
        if let Some(c) = co.delete(&p.to_pid()) {
            put(c, &mut items, &mut ranges);
        }
    }
    if let Some(c) = co.take_range() {
        put(c, &mut items, &mut ranges);
    }
    DocResponseRuns {
        doc: r.doc,
        name: r.name.clone(),
        inserts: items.finish(),
        deletes: ranges.finish(),
    }
}

/// Live frames for a version-3 connection: consecutive 65s of one-char
/// atoms at consecutive ids become one 70, consecutive 66s of one site at
/// consecutive ids one 71 (what a version-3 server may send, 3.2).
fn live_runs(frames: Vec<ServerFrame>) -> Vec<ServerFrame> {
    let mut out: Vec<ServerFrame> = Vec::with_capacity(frames.len());
    for f in frames {
        let merged = match (out.last_mut(), &f) {
            (Some(ServerFrame::Insert(prev)), ServerFrame::Insert(i))
                if prev.atom.data().chars().nth(1).is_none() =>
            {
                let run = Run::new(prev.atom.pid().clone(), prev.atom.data()).ok();
                run.and_then(|r| extend_run(&r, i))
                    .map(|r| ServerFrame::InsertRun(SessionInsertRun::new(r)))
            }
            (Some(ServerFrame::InsertRun(prev)), ServerFrame::Insert(i)) => {
                extend_run(&prev.run, i).map(|r| ServerFrame::InsertRun(SessionInsertRun::new(r)))
            }
            (Some(ServerFrame::Delete(prev)), ServerFrame::Delete(d)) if prev.site == d.site => {
                extends(&prev.pid, 1, &d.pid).then(|| {
                    ServerFrame::DeleteRange(SessionDeleteRange {
                        site: d.site,
                        range: IdRange::new(prev.pid.clone(), 2).expect("two consecutive ids"),
                    })
                })
            }
            (Some(ServerFrame::DeleteRange(prev)), ServerFrame::Delete(d))
                if prev.site == d.site && prev.range.count() < u16::MAX =>
            {
                extends(prev.range.first(), u32::from(prev.range.count()), &d.pid).then(|| {
                    ServerFrame::DeleteRange(SessionDeleteRange {
                        site: d.site,
                        range: IdRange::new(prev.range.first().clone(), prev.range.count() + 1)
                            .expect("consecutive ids"),
                    })
                })
            }
            _ => None,
        };
        match merged {
            Some(m) => *out.last_mut().expect("merged into the last") = m,
            None => out.push(f),
        }
    }
    out
}

/// `run` with the one-char atom of `i` after it, if `i` is its next char.
fn extend_run(run: &Run, i: &SessionInsert) -> Option<Run> {
    let one_char = i.atom.data().chars().nth(1).is_none();
    (one_char && extends(run.first(), run.char_count() as u32, i.atom.pid()))
        .then(|| {
            Run::new(
                run.first().clone(),
                format!("{}{}", run.text(), i.atom.data()),
            )
            .ok()
        })
        .flatten()
}

/// The listener.
pub struct FakeServer {
    listener: TcpListener,
    addr: SocketAddr,
    traffic: Arc<Mutex<Traffic>>,
    conns: std::sync::atomic::AtomicUsize,
    pub wait: Duration,
    /// Answer a version-3 hello with `unsupported_version` (a server of
    /// versions 1 and 2), so a client's fallback is checked.
    refuse_v3: std::sync::atomic::AtomicBool,
}

impl FakeServer {
    /// From now on, a hello with version 3 is refused with
    /// `unsupported_version` and the connection closed (in
    /// [`FakeConn::handshake`]).
    pub fn refuse_version_3(&self) {
        self.refuse_v3
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Listens on a free loopback port.
    pub async fn start() -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local addr");
        FakeServer {
            listener,
            addr,
            traffic: Arc::default(),
            conns: Default::default(),
            wait: WAIT,
            refuse_v3: Default::default(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next connection the client opens; panics if none comes within
    /// the wait.
    pub async fn accept(&self, what: &str) -> FakeConn {
        let (stream, _) = match tokio::time::timeout(self.wait, self.listener.accept()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("fake server: accept failed: {e}"),
            Err(_) => panic!(
                "expected the client to connect ({what}) within {:?}; it did not",
                self.wait
            ),
        };
        let _ = stream.set_nodelay(true);
        let id = self.conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        FakeConn {
            framed: Framed::new(stream, ServerCodec::default()),
            id,
            traffic: self.traffic.clone(),
            wait: self.wait,
            session_doc: None,
            got_first: false,
            label: format!("connection {id} ({what})"),
            version: 1,
            refuse_v3: self.refuse_v3.load(std::sync::atomic::Ordering::SeqCst),
        }
    }

    /// A copy of the traffic so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic.lock().expect("traffic lock").clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.conns.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// One client connection.
pub struct FakeConn {
    framed: Framed<TcpStream, ServerCodec>,
    pub id: usize,
    traffic: Arc<Mutex<Traffic>>,
    wait: Duration,
    /// The document of this connection's session.
    pub session_doc: Option<DocId>,
    got_first: bool,
    pub label: String,
    /// The version of the client's hello (1 until one arrives).
    pub version: u8,
    /// Refuse a version-3 hello (see [`FakeServer::refuse_version_3`]).
    refuse_v3: bool,
}

impl FakeConn {
    /// The next thing the client did, each frame checked against the
    /// client rules (a violation panics).
    pub async fn next_event(&mut self) -> ClientEvent {
        self.next_event_within(self.wait).await
    }

    /// [`next_event`](Self::next_event), waiting at most `wait`.
    pub async fn next_event_within(&mut self, wait: Duration) -> ClientEvent {
        let e = match tokio::time::timeout(wait, self.framed.next()).await {
            Err(_) => ClientEvent::Timeout,
            Ok(None) => ClientEvent::Closed,
            Ok(Some(Ok(f))) => ClientEvent::Frame(f),
            Ok(Some(Err(DecodeError::Io(e)))) => match e.kind() {
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => ClientEvent::Closed,
                _ => ClientEvent::Undecodable(format!("i/o error: {e}")),
            },
            Ok(Some(Err(e))) => ClientEvent::Undecodable(e.to_string()),
        };
        if let ClientEvent::Frame(f) = &e {
            let mut t = self.traffic.lock().expect("traffic lock");
            if !self.got_first {
                self.got_first = true;
                match f {
                    ClientFrame::Hello(h) => {
                        assert!(
                            (1..=VERSION_FEED).contains(&h.version),
                            "{}: the client's hello carries version 1 to 4 (6), got {}",
                            self.label,
                            h.version
                        );
                        self.version = h.version;
                        let first = *t.replica.get_or_insert(h.replica);
                        assert_eq!(
                            h.replica, first,
                            "{}: a replica makes its id once and keeps it (1): this connection's hello \
                             carries another replica id than the first connection's",
                            self.label
                        );
                    }
                    other => panic!(
                        "{}: a client sends hello first (3; and inserts need it, 1.3): got {}",
                        self.label,
                        show_client(other)
                    ),
                }
            }
            if let ClientFrame::SessionStart { doc, .. } = f {
                self.session_doc = Some(*doc);
            }
            let h = f.header();
            if matches!(
                h,
                header::SYNC_DOC_UPSERT_RUNS
                    | header::SESSION_INSERT_RUN
                    | header::SESSION_DELETE_RANGE
            ) {
                assert!(
                    self.version >= VERSION_RUNS,
                    "{}: a client sends {h} (a version 3 frame) only after a version 3 hello \
                     that was welcomed (2.3, 6); this connection uses version {}",
                    self.label,
                    self.version
                );
            }
            if h == header::FEED_SUBSCRIBE {
                assert!(
                    self.version >= VERSION_FEED,
                    "{}: a client sends 5 (a version 4 frame) only after a version 4 hello \
                     that was welcomed (2.3, 6); this connection uses version {}",
                    self.label,
                    self.version
                );
            }
            t.raw.push((self.id, h));
            // A 4 is the 2 it stands for (3.1): the scripts read 2s.
            let f = match f {
                ClientFrame::UpsertRuns(u) => ClientFrame::Upsert(u.expand()),
                f => f.clone(),
            };
            if let Err(why) = t.admit(self.session_doc, &f) {
                panic!("{}: client rule broken: {why}", self.label);
            }
            t.received.push((self.id, f.clone()));
            drop(t);
            return ClientEvent::Frame(f);
        }
        e
    }

    /// The next frame; panics on a close, a timeout or undecodable bytes.
    pub async fn recv(&mut self, what: &str) -> ClientFrame {
        match self.next_event().await {
            ClientEvent::Frame(f) => f,
            other => panic!(
                "{}: expected {what}, got {}",
                self.label,
                show_event(&other)
            ),
        }
    }

    /// Expects the client's hello and answers welcome at `time`.
    pub async fn handshake(&mut self, time: Time) -> Hello {
        let h = match self.recv("hello").await {
            ClientFrame::Hello(h) => h,
            other => panic!(
                "{}: expected hello, got {}",
                self.label,
                show_client(&other)
            ),
        };
        if self.refuse_v3 && h.version >= VERSION_RUNS {
            self.send(ServerFrame::Error(ErrorFrame::new(
                ErrorCode::UNSUPPORTED_VERSION,
                "this server speaks versions 1 and 2",
            )))
            .await;
            self.version = 1;
            return h;
        }
        // The version the connection uses (6): the hello's (this server
        // speaks 1 to 4).
        self.version = h.version.min(VERSION_FEED);
        self.send(ServerFrame::Welcome {
            version: self.version,
            server_time: time,
        })
        .await;
        h
    }

    pub async fn expect_session_start(&mut self) -> (Time, DocId) {
        match self.recv("session_start").await {
            ClientFrame::SessionStart { since, doc } => (since, doc),
            other => panic!(
                "{}: expected session_start, got {}",
                self.label,
                show_client(&other)
            ),
        }
    }

    /// What a frame becomes for this connection's version: a 33 is a 37
    /// for a version-3 connection (runs and ranges coalesced, 1.5).
    fn for_version(&self, f: ServerFrame) -> ServerFrame {
        match f {
            ServerFrame::DocResponse(r) if self.version >= VERSION_RUNS => {
                ServerFrame::DocResponseRuns(to_runs(&r))
            }
            f => f,
        }
    }

    /// Sends one frame; records sites and atoms it gives the client.
    pub async fn send(&mut self, f: ServerFrame) {
        let f = self.for_version(f);
        self.note_sent(&f);
        match tokio::time::timeout(self.wait, self.framed.send(f)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{}: cannot send to the client: {e}", self.label),
            Err(_) => panic!(
                "{}: the client did not read for {:?}",
                self.label, self.wait
            ),
        }
    }

    /// Sends frames in one write; a client that closed is not an error
    /// here (the script checks what it expects next).
    pub async fn send_many(&mut self, frames: Vec<ServerFrame>) {
        let mut frames: Vec<ServerFrame> =
            frames.into_iter().map(|f| self.for_version(f)).collect();
        if self.version >= VERSION_RUNS {
            frames = live_runs(frames);
        }
        for f in &frames {
            self.note_sent(f);
        }
        let fut = async {
            for f in frames {
                self.framed.feed(f).await?;
            }
            SinkExt::<ServerFrame>::flush(&mut self.framed).await
        };
        let _ = tokio::time::timeout(self.wait, fut).await;
    }

    fn note_sent(&self, f: &ServerFrame) {
        let mut t = self.traffic.lock().expect("traffic lock");
        match f {
            ServerFrame::FeedChanges(e) => {
                if let Some(last) = e.iter().map(|e| e.time).max() {
                    t.feed_times.push((self.id, last));
                }
            }
            ServerFrame::FeedHeartbeat { time } => t.feed_times.push((self.id, *time)),
            ServerFrame::DocSync { doc, site, .. } => {
                t.sites.insert(*doc, *site);
            }
            ServerFrame::SessionStarted { site, .. } => {
                if let Some(doc) = self.session_doc {
                    t.sites.insert(doc, *site);
                }
            }
            ServerFrame::DocResponse(r) => {
                t.sent_atoms(
                    r.doc,
                    r.inserts
                        .iter()
                        .map(|a| (a.pid.to_pid(), a.data.to_owned())),
                );
            }
            ServerFrame::DocResponseRuns(r) => {
                t.sent_atoms(r.doc, r.inserts.atoms().map(|(d, p)| (p, d.to_owned())));
            }
            ServerFrame::Insert(i) => {
                if let Some(doc) = self.session_doc {
                    t.sent_atoms(doc, [(i.atom.pid().clone(), i.atom.data().to_owned())]);
                }
            }
            ServerFrame::InsertRun(r) => {
                if let Some(doc) = self.session_doc {
                    t.sent_atoms(doc, r.run.atoms().map(|(d, p)| (p, d.to_owned())));
                }
            }
            _ => {}
        }
    }

    /// Sends an error frame.
    pub async fn error(&mut self, code: ErrorCode, message: &str) {
        self.send(ServerFrame::Error(ErrorFrame::new(code, message)))
            .await;
    }

    /// Expects the client to close this connection, sending nothing more.
    pub async fn expect_closed(&mut self, why: &str) {
        match self.next_event().await {
            ClientEvent::Closed => {}
            other => panic!(
                "{}: {why}: expected the client to close the connection, got {}",
                self.label,
                show_event(&other)
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// The world: documents as a server keeps them
// ---------------------------------------------------------------------------

/// One id of a document.
#[derive(Debug, Clone, Default)]
pub struct AtomState {
    /// None: known only from a delete (a tombstone).
    pub data: Option<String>,
    pub inserted: Option<Time>,
    pub deleted: Option<Time>,
    pub deleter: u8,
}

#[derive(Debug, Clone, Default)]
pub struct FakeDoc {
    pub name: String,
    pub name_time: Time,
    pub atoms: BTreeMap<Pid, AtomState>,
    pub modified: Time,
    /// Deleted at this time (3.5).
    pub deleted: Option<Time>,
    /// The latest delete time of an atom compaction dropped (3.6).
    pub compacted: Time,
}

/// What a session op did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Changed,
    Unchanged,
    /// A re-sent insert of an id deleted here: the sender gets a 66 with
    /// this deleter's site before the ack (3.2).
    ResentDeleted(u8),
    Refused(ErrorCode),
}

/// Documents with server times, answering as PROTOCOL.md 3.1 and 3.2 say,
/// for one client replica (whose site per document is `sites`).
#[derive(Debug, Clone)]
pub struct World {
    pub now: Time,
    pub docs: BTreeMap<DocId, FakeDoc>,
    /// The client replica's site per document.
    pub sites: BTreeMap<DocId, u8>,
    /// The site a new document gives the client.
    pub default_site: u8,
    /// Entries per 32 (3.1: a server may cap a response).
    pub synclist_cap: usize,
    /// Atoms plus deletes per 33 (3.1: a reply may be split).
    pub per_33: usize,
    /// Upserts of these documents are refused with this code (one that
    /// keeps the connection), as a server with read-only credentials would.
    pub refuse_upserts: BTreeMap<DocId, ErrorCode>,
}

impl Default for World {
    fn default() -> Self {
        World {
            now: 1_700_000_000_000_000,
            docs: BTreeMap::new(),
            sites: BTreeMap::new(),
            default_site: 42,
            synclist_cap: 10_000,
            per_33: usize::MAX,
            refuse_upserts: BTreeMap::new(),
        }
    }
}

fn atoms_of(list: &[(Pid, String)]) -> Vec<Atom> {
    list.iter()
        .map(|(p, d)| Atom::new(d.clone(), p.clone()).expect("valid atom"))
        .collect()
}

impl World {
    pub fn tick(&mut self) -> Time {
        self.now += 1 + self.now % 7;
        self.now
    }

    /// The client's site for `doc` (given on first contact).
    pub fn site(&mut self, doc: DocId) -> u8 {
        let d = self.default_site;
        *self.sites.entry(doc).or_insert(d)
    }

    /// Creates a document (as another replica would).
    pub fn create(&mut self, doc: DocId, name: &str) -> Time {
        let t = self.tick();
        self.docs.insert(
            doc,
            FakeDoc {
                name: name.into(),
                name_time: t,
                atoms: BTreeMap::new(),
                modified: t,
                deleted: None,
                compacted: 0,
            },
        );
        t
    }

    /// Tombstone compaction (3.6): drops the deleted atoms (with data) of
    /// `doc`; a catch-up since an earlier time is then a resync.
    pub fn compact(&mut self, doc: DocId) {
        let d = self.doc_mut(doc);
        let mut latest = d.compacted;
        d.atoms.retain(|_, a| match (a.data.is_some(), a.deleted) {
            (true, Some(t)) => {
                latest = latest.max(t);
                false
            }
            _ => true,
        });
        d.compacted = latest;
    }

    fn needs_resync(&self, doc: DocId, since: Time) -> bool {
        since != 0 && since < self.docs[&doc].compacted
    }

    /// Another replica deletes the document (3.5).
    pub fn remote_delete_doc(&mut self, doc: DocId) -> Time {
        let t = self.tick();
        let d = self.doc_mut(doc);
        d.deleted = Some(t);
        d.modified = t;
        d.atoms.clear();
        t
    }

    /// The 35 for a deleted document, if it is one.
    fn deleted_reply(&self, doc: DocId) -> Option<Vec<ServerFrame>> {
        let t = self.docs.get(&doc)?.deleted?;
        Some(vec![ServerFrame::DocDeleted {
            doc,
            deleted_time: t,
        }])
    }

    /// The reply to a 3 doc_delete from the client.
    pub fn delete_doc(&mut self, doc: DocId) -> Vec<ServerFrame> {
        if !self.docs.contains_key(&doc) {
            return vec![ServerFrame::Error(ErrorFrame::new(
                ErrorCode::UNKNOWN_DOCUMENT,
                "unknown document",
            ))];
        }
        if self.docs[&doc].deleted.is_none() {
            self.remote_delete_doc(doc);
        }
        self.deleted_reply(doc).expect("deleted")
    }

    fn doc_mut(&mut self, doc: DocId) -> &mut FakeDoc {
        self.docs.get_mut(&doc).expect("a document of the world")
    }

    /// Another replica inserts atoms (one change).
    pub fn remote_insert(&mut self, doc: DocId, atoms: &[Atom]) -> Time {
        let t = self.tick();
        let d = self.doc_mut(doc);
        for a in atoms {
            let e = d.atoms.entry(a.pid().clone()).or_default();
            if e.data.is_none() {
                e.data = Some(a.data().to_owned());
                e.inserted = Some(t);
            }
        }
        d.modified = t;
        t
    }

    /// Another replica (of site `by`) deletes ids (one change).
    pub fn remote_delete(&mut self, doc: DocId, pids: &[Pid], by: u8) -> Time {
        let t = self.tick();
        let d = self.doc_mut(doc);
        for p in pids {
            let e = d.atoms.entry(p.clone()).or_default();
            if e.deleted.is_none() {
                e.deleted = Some(t);
                e.deleter = by;
            }
        }
        d.modified = t;
        t
    }

    pub fn remote_rename(&mut self, doc: DocId, name: &str) -> Time {
        let t = self.tick();
        let d = self.doc_mut(doc);
        d.name = name.into();
        d.name_time = t;
        d.modified = t;
        t
    }

    /// 3.1's pull since `t`: live atoms inserted after `t`; deletes after
    /// `t` of atoms inserted at or before `t` (and of tombstones). With
    /// `every_delete`, every delete after `t` (a session's 33, 3.2).
    pub fn delta(&self, doc: DocId, t: Time, every_delete: bool) -> (Vec<(Pid, String)>, Vec<Pid>) {
        let d = &self.docs[&doc];
        let mut ins = Vec::new();
        let mut del = Vec::new();
        for (p, a) in &d.atoms {
            match (a.inserted, a.deleted) {
                (Some(i), None) if i > t => ins.push((p.clone(), a.data.clone().unwrap())),
                (i, Some(x)) if x > t && (every_delete || i.is_none_or(|i| i <= t)) => {
                    del.push(p.clone())
                }
                _ => {}
            }
        }
        (ins, del)
    }

    /// The 32 for `since`.
    pub fn listing(&self, since: Time) -> Vec<SyncEntry> {
        let mut v: Vec<SyncEntry> = self
            .docs
            .iter()
            .filter(|(_, d)| d.modified > since)
            .map(|(&doc, d)| SyncEntry {
                modified: d.modified,
                doc,
            })
            .collect();
        v.sort_by_key(|e| e.modified);
        v.truncate(self.synclist_cap);
        v
    }

    /// What a feed since `since` lists (3.8): every document whose last
    /// change is after `since`, at that change's time, in time order, each
    /// with whether that change deleted it; the 38s of it, `synclist_cap`
    /// entries each.
    pub fn feed_frames(&self, since: Time) -> Vec<ServerFrame> {
        let mut v: Vec<FeedEntry> = self
            .docs
            .iter()
            .filter(|(_, d)| d.modified > since)
            .map(|(&doc, d)| FeedEntry {
                time: d.modified,
                doc,
                deleted: d.deleted == Some(d.modified),
            })
            .collect();
        v.sort_by_key(|e| e.time);
        v.chunks(self.synclist_cap.max(1))
            .map(|c| ServerFrame::FeedChanges(c.iter().copied().collect()))
            .collect()
    }

    /// The 33s of a reply, split by `per_33`.
    pub fn responses(&self, doc: DocId, ins: &[(Pid, String)], del: &[Pid]) -> Vec<ServerFrame> {
        let name = DocName::new(self.docs[&doc].name.clone()).expect("valid name");
        let atoms = atoms_of(ins);
        let mut items: Vec<Result<&Atom, &Pid>> = atoms.iter().map(Ok).collect();
        items.extend(del.iter().map(Err));
        let per = self.per_33.max(1);
        let mut out = Vec::new();
        for chunk in items.chunks(per).chain(if items.is_empty() {
            Some(&[][..])
        } else {
            None
        }) {
            let (mut a, mut p) = (AtomListBuilder::new(), PidListBuilder::new());
            for it in chunk {
                match it {
                    Ok(x) => a.push(x),
                    Err(x) => p.push(x).expect("valid id"),
                }
            }
            out.push(ServerFrame::DocResponse(DocResponse {
                doc,
                name: name.clone(),
                inserts: a.finish(),
                deletes: p.finish(),
            }));
        }
        out
    }

    /// The reply to a pull: 33s then the 34, or unknown_document.
    pub fn pull(&mut self, doc: DocId, since: Time) -> Vec<ServerFrame> {
        if !self.docs.contains_key(&doc) {
            return vec![ServerFrame::Error(ErrorFrame::new(
                ErrorCode::UNKNOWN_DOCUMENT,
                "unknown document",
            ))];
        }
        if let Some(r) = self.deleted_reply(doc) {
            return r;
        }
        let resync = self.needs_resync(doc, since);
        let (ins, del) = self.delta(doc, if resync { 0 } else { since }, false);
        let mut out = self.responses(doc, &ins, &del);
        if resync {
            out.insert(0, ServerFrame::Resync { doc });
        }
        let site = self.site(doc);
        out.push(ServerFrame::DocSync {
            doc,
            sync_time: self.now,
            site,
        });
        out
    }

    /// Applies an upsert from the client as 3.1 says; the reply.
    pub fn upsert(&mut self, u: &Upsert) -> Vec<ServerFrame> {
        // Never resurrected (3.5).
        if let Some(r) = self.deleted_reply(u.doc) {
            return r;
        }
        let site = self.site(u.doc);
        if !self.docs.contains_key(&u.doc) {
            self.create(u.doc, u.name.as_str());
        }
        let refuse = |code: ErrorCode| vec![ServerFrame::Error(ErrorFrame::new(code, code.name()))];
        if let Some(&code) = self.refuse_upserts.get(&u.doc) {
            return refuse(code);
        }
        for a in u.inserts.iter() {
            if site == 0 {
                return refuse(ErrorCode::SITES_EXHAUSTED);
            }
            if a.pid.creator() != site {
                return refuse(ErrorCode::SITE_MISMATCH);
            }
            let d = &self.docs[&u.doc];
            if let Some(e) = d.atoms.get(&a.pid.to_pid()) {
                if e.data.as_deref().is_some_and(|x| x != a.data) {
                    return refuse(ErrorCode::ID_CONFLICT);
                }
            }
        }
        let t = self.tick();
        let since = u.since;
        let d = self.doc_mut(u.doc);
        let mut changed = false;
        let mut sent: BTreeSet<Pid> = BTreeSet::new();
        let mut resent_deleted = Vec::new();
        for a in u.inserts.iter() {
            let p = a.pid.to_pid();
            let e = d.atoms.entry(p.clone()).or_default();
            if e.data.is_none() {
                e.data = Some(a.data.to_owned());
                e.inserted = Some(t);
                changed = true;
            }
            if e.deleted.is_some() {
                resent_deleted.push(p.clone());
            }
            sent.insert(p);
        }
        for p in u.deletes.iter() {
            let p = p.to_pid();
            let e = d.atoms.entry(p.clone()).or_default();
            if e.deleted.is_none() {
                e.deleted = Some(t);
                e.deleter = site;
                changed = true;
            }
            sent.insert(p);
        }
        if d.name_time <= since && d.name != u.name.as_str() {
            d.name = u.name.as_str().to_owned();
            d.name_time = t;
            changed = true;
        }
        if changed {
            d.modified = t;
        }
        let resync = self.needs_resync(u.doc, since);
        let (mut ins, mut del) = self.delta(u.doc, if resync { 0 } else { since }, false);
        if !resync {
            ins.retain(|(p, _)| !sent.contains(p));
            del.retain(|p| !sent.contains(p));
        }
        del.extend(resent_deleted);
        del.sort();
        del.dedup();
        let mut out = self.responses(u.doc, &ins, &del);
        if resync {
            out.insert(0, ServerFrame::Resync { doc: u.doc });
        }
        out.push(ServerFrame::DocSync {
            doc: u.doc,
            sync_time: self.now,
            site,
        });
        out
    }

    /// The reply to session_start(since, doc): 33s (with every delete
    /// after `since`) then the 68. Creates the document if new.
    pub fn session_start(&mut self, doc: DocId, since: Time) -> Vec<ServerFrame> {
        if !self.docs.contains_key(&doc) {
            self.create(doc, "");
        }
        let site = self.site(doc);
        let (ins, del) = self.delta(doc, since, true);
        let mut out = self.responses(doc, &ins, &del);
        out.push(ServerFrame::SessionStarted {
            session_id: 1,
            site,
            sync_time: self.now,
        });
        out
    }

    /// Applies a client's 65, 66 or 67.
    pub fn session_op(&mut self, doc: DocId, f: &ClientFrame) -> Applied {
        let site = self.site(doc);
        let t = self.now + 1;
        let d = self.doc_mut(doc);
        let applied = match f {
            ClientFrame::Insert(SessionInsert { atom, .. }) => {
                if site == 0 {
                    return Applied::Refused(ErrorCode::SITES_EXHAUSTED);
                }
                if atom.pid().creator() != site {
                    return Applied::Refused(ErrorCode::SITE_MISMATCH);
                }
                let e = d.atoms.entry(atom.pid().clone()).or_default();
                match &e.data {
                    Some(x) if x != atom.data() => return Applied::Refused(ErrorCode::ID_CONFLICT),
                    Some(_) if e.deleted.is_some() => Applied::ResentDeleted(e.deleter),
                    Some(_) => Applied::Unchanged,
                    None => {
                        e.data = Some(atom.data().to_owned());
                        e.inserted = Some(t);
                        match e.deleted {
                            Some(_) => Applied::ResentDeleted(e.deleter),
                            None => Applied::Changed,
                        }
                    }
                }
            }
            ClientFrame::Delete(SessionDelete { site: s, pid }) => {
                if *s != site {
                    return Applied::Refused(ErrorCode::SITE_MISMATCH);
                }
                let e = d.atoms.entry(pid.clone()).or_default();
                if e.deleted.is_none() {
                    e.deleted = Some(t);
                    e.deleter = site;
                    Applied::Changed
                } else {
                    Applied::Unchanged
                }
            }
            ClientFrame::Rename(n) => {
                d.name = n.as_str().to_owned();
                d.name_time = t;
                Applied::Changed
            }
            other => panic!("not a session op: {}", show_client(other)),
        };
        if applied != Applied::Unchanged {
            self.now = t;
            self.doc_mut(doc).modified = t;
        }
        applied
    }

    /// The text of a document (PROTOCOL.md 1.2: an atom of two or more
    /// chars is its chars at virtual ids, each live unless deleted).
    pub fn text(&self, doc: DocId) -> String {
        let d = &self.docs[&doc];
        let mut chars: Vec<(Pid, String)> = Vec::new();
        for (p, a) in &d.atoms {
            let (Some(data), None) = (&a.data, a.deleted) else {
                continue;
            };
            let n = data.chars().count();
            if n < 2 {
                chars.push((p.clone(), data.clone()));
                continue;
            }
            let mut levels: Vec<Level> = p.levels().collect();
            for (j, c) in data.chars().enumerate() {
                levels.push(Level::new(j as u32, p.creator()));
                let v = Pid::from_levels(&levels);
                levels.pop();
                if d.atoms.get(&v).is_none_or(|x| x.deleted.is_none()) {
                    chars.push((v, c.to_string()));
                }
            }
        }
        chars.sort();
        chars.into_iter().map(|(_, c)| c).collect()
    }
}

/// Answers sync-mode requests from the world until the client closes the
/// connection (a sync ends by closing it), or until a request for which
/// `lose` holds: that one is applied to the world but its reply is never
/// sent (as if the connection broke first), and the serving stops.
/// Returns the requests read.
pub async fn serve_sync(
    conn: &mut FakeConn,
    world: &Arc<Mutex<World>>,
    mut lose: impl FnMut(&ClientFrame) -> bool,
) -> Vec<ClientFrame> {
    let mut answered = Vec::new();
    // The feed of this connection once it sent a 5 (3.8): its cursor and
    // when it last sent a feed frame.
    let mut feed: Option<(Time, std::time::Instant)> = None;
    let mut idle_since = std::time::Instant::now();
    loop {
        let e = match feed {
            Some(_) => conn.next_event_within(FEED_POLL).await,
            None => conn.next_event().await,
        };
        let f = match e {
            ClientEvent::Frame(f) => f,
            ClientEvent::Closed => return answered,
            // Subscribed: a quiet client is fine; push what changed (other
            // clients' changes, the script's) or a heartbeat.
            ClientEvent::Timeout if feed.is_some() && idle_since.elapsed() < conn.wait * 6 => {
                push_feed(conn, world, &mut feed).await;
                continue;
            }
            other => panic!(
                "{}: expected a sync request or the close, got {}",
                conn.label,
                show_event(&other)
            ),
        };
        let reply = {
            let mut w = world.lock().expect("world lock");
            match &f {
                ClientFrame::Synclist { since } => vec![ServerFrame::SynclistResponse(
                    w.listing(*since).into_iter().collect(),
                )],
                ClientFrame::Pull { doc, since } => w.pull(*doc, *since),
                ClientFrame::Upsert(u) => w.upsert(u),
                ClientFrame::Subscribe { since } => match feed {
                    Some(_) => vec![ServerFrame::Error(ErrorFrame::new(
                        ErrorCode::INVALID_REQUEST,
                        "this connection is already subscribed to the feed",
                    ))],
                    None => {
                        // The first listing, then a 39 once caught up.
                        let mut out = w.feed_frames(*since);
                        out.push(ServerFrame::FeedHeartbeat { time: w.now });
                        feed = Some((w.now.max(*since), std::time::Instant::now()));
                        out
                    }
                },
                ClientFrame::DeleteDoc { doc } => {
                    assert!(
                        conn.version >= 2,
                        "{}: doc_delete (3) is a version 2 frame: sent after a version {} hello (6)",
                        conn.label,
                        conn.version
                    );
                    w.delete_doc(*doc)
                }
                other => panic!(
                    "{}: a sync-mode connection sent {} (3: wrong_mode)",
                    conn.label,
                    show_client(other)
                ),
            }
        };
        // A version 1 connection never gets a 35 (6): unknown_document;
        // nor a 36 (3.6): invalid_request, alone.
        let reply: Vec<ServerFrame> = match reply.first() {
            Some(ServerFrame::Resync { .. }) if conn.version < 2 => {
                vec![ServerFrame::Error(ErrorFrame::new(
                    ErrorCode::INVALID_REQUEST,
                    "older than the tombstone horizon: pull since 0",
                ))]
            }
            _ => reply
                .into_iter()
                .map(|r| match r {
                    ServerFrame::DocDeleted { .. } if conn.version < 2 => {
                        ServerFrame::Error(ErrorFrame::new(ErrorCode::UNKNOWN_DOCUMENT, "deleted"))
                    }
                    r => r,
                })
                .collect(),
        };
        let lost = lose(&f);
        answered.push(f);
        if lost {
            return answered;
        }
        idle_since = std::time::Instant::now();
        conn.send_many(reply).await;
        // Between replies: what changed since (the connection's own
        // changes come back through its feed too, 3.8).
        push_feed(conn, world, &mut feed).await;
    }
}

/// How often a subscribed connection's feed looks for changes.
const FEED_POLL: Duration = Duration::from_millis(20);
/// The fake server's heartbeat interval (3.8: at most 15 s).
const FEED_HEARTBEAT: Duration = Duration::from_secs(1);

/// Pushes the 38s of what changed after the feed's cursor, or a 39 when
/// nothing was sent for the heartbeat interval.
async fn push_feed(
    conn: &mut FakeConn,
    world: &Arc<Mutex<World>>,
    feed: &mut Option<(Time, std::time::Instant)>,
) {
    let Some((cursor, last)) = feed else {
        return;
    };
    let (frames, now) = {
        let w = world.lock().expect("world lock");
        (w.feed_frames(*cursor), w.now)
    };
    if frames.is_empty() {
        if last.elapsed() >= FEED_HEARTBEAT {
            *cursor = now.max(*cursor);
            *last = std::time::Instant::now();
            let t = *cursor;
            conn.send_many(vec![ServerFrame::FeedHeartbeat { time: t }])
                .await;
        }
        return;
    }
    for f in &frames {
        if let ServerFrame::FeedChanges(e) = f {
            if let Some(t) = e.iter().map(|e| e.time).max() {
                *cursor = t;
            }
        }
    }
    *last = std::time::Instant::now();
    conn.send_many(frames).await;
}

/// Accepts one sync connection (hello, welcome) and serves it until the
/// client closes it.
pub async fn serve_one_sync(
    server: &FakeServer,
    world: &Arc<Mutex<World>>,
    what: &str,
) -> Vec<ClientFrame> {
    let mut c = server.accept(what).await;
    let now = world.lock().expect("world lock").now;
    c.handshake(now).await;
    serve_sync(&mut c, world, |_| false).await
}
