//! The writer: one thread that owns every write and the session rooms.
//!
//! Connections send [`Request`]s through a bounded channel. The writer takes
//! what is queued (up to `max_batch`), applies it in one redb write
//! transaction with one commit (one fsync for the whole batch), and only then
//! acts on it: publishes to the synclist index, fans changes out to rooms,
//! acks session ops, answers upserts, and registers new sessions.
//!
//! This file is the request type and the batching loop (take, apply,
//! commit, then answer); `apply` holds the rules each request follows
//! inside the transaction, `compact` the tombstone compaction steps run
//! between batches, `stats` the counters. The writer touches the store
//! (write tables, snapshots), the synclist index, the rooms and the metrics
//! counters; nothing else in the crate.
//!
//! Invariants:
//! - Times are assigned here, in commit order, one per change; the clock's
//!   value is persisted in the same transaction.
//! - Nothing leaves the writer (index entry, broadcast, ack, reply) before
//!   the commit that holds it returns. A failed commit sends nothing but
//!   `storage` errors, and nothing of the batch is counted.
//! - A session is registered after its batch's fan-out and before the next
//!   batch, with a snapshot opened at that moment: its 33 holds exactly the
//!   changes up to the snapshot and its live feed exactly those after.
//! - An upsert is validated in full against the transaction's state before
//!   any of it is written, so a refused upsert writes nothing.

mod apply;
mod compact;
mod stats;

use std::sync::Arc;
use std::time::Instant;

use notesync_protocol::{DocId, DocName, ErrorCode, SessionDelete, SessionInsert, Time, Upsert};
use redb::Database;
use tokio::sync::{mpsc, oneshot};

use crate::index::{Index, Update};
use crate::rooms::{Rooms, Sub, error_bytes};
use crate::store::{ServerClock, Snapshot, StoreError};

use apply::Batch;
pub use compact::Compaction;
pub use stats::WriterStats;

/// Why the writer did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Refused by a protocol rule; the connection stays open.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// The commit failed; nothing was stored. Shared: one failed commit
    /// answers every request of its batch.
    #[error("the server could not store the change: {0}")]
    Storage(#[source] Arc<StoreError>),
    /// The writer has stopped (the server is shutting down).
    #[error("the server is shutting down; reconnect later")]
    Stopped,
    /// The document was deleted at `at` (PROTOCOL.md 3.5): a version 2
    /// connection gets 35, a version 1 connection `unknown_document`.
    #[error("document {doc:032x} was deleted (at {at}) and stays deleted")]
    Deleted { doc: DocId, at: Time },
}

impl WriteError {
    pub fn code(&self) -> ErrorCode {
        match self {
            WriteError::Refused { code, .. } => *code,
            WriteError::Storage(_) => ErrorCode::STORAGE,
            WriteError::Stopped => ErrorCode::SHUTTING_DOWN,
            WriteError::Deleted { .. } => ErrorCode::UNKNOWN_DOCUMENT,
        }
    }

    fn refused(code: ErrorCode, message: String) -> Self {
        WriteError::Refused { code, message }
    }
}

/// A live op from a session (65, 66, 67).
#[derive(Debug, Clone)]
pub enum SessionOp {
    Insert(SessionInsert),
    Delete(SessionDelete),
    Rename(DocName),
}

/// The session an op comes from, as the writer needs it: fixed when the
/// session starts, built once by its connection.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub doc: DocId,
    pub session_id: u64,
    /// The session's site (0: none).
    pub site: u8,
    /// Whether the connection sent a hello.
    pub hello: bool,
    /// Whether its credentials allow reading only (every op refused).
    pub read_only: bool,
}

/// A session's start, answered after its batch commits.
pub struct Started {
    /// Opened right after registration; the 33 is built from it.
    pub snapshot: Snapshot,
    pub site: u8,
}

/// Where a request's answer arrives.
pub type Answer<T> = oneshot::Receiver<Result<T, WriteError>>;

/// A request's reply channel, with what its batch's transaction decided
/// (`D`): held until the commit, since nothing is answered before its
/// fsync.
pub struct Reply<T, D = Result<T, WriteError>> {
    tx: oneshot::Sender<Result<T, WriteError>>,
    decided: D,
}

impl<T, D> Reply<T, D> {
    /// A reply channel; `decided` stands until the transaction decides.
    fn new(decided: D) -> (Self, Answer<T>) {
        let (tx, rx) = oneshot::channel();
        (Reply { tx, decided }, rx)
    }

    /// Answers `r` (a connection that is gone no longer waits for it).
    fn send(self, r: Result<T, WriteError>) {
        let _ = self.tx.send(r);
    }
}

impl<T> Reply<T> {
    /// Answers what the transaction decided.
    fn answer(self) {
        let _ = self.tx.send(self.decided);
    }
}

/// What connections ask of the writer. Built with the constructors below,
/// which return where the answer arrives.
pub enum Request {
    /// A sync-mode upsert; answered with this replica's site.
    Upsert {
        replica: Option<u128>,
        upsert: Arc<Upsert>,
        reply: Reply<u8>,
    },
    /// Allocates a site for a pull (the document exists); answered with
    /// it (0: none left).
    Alloc {
        doc: DocId,
        replica: u128,
        reply: Reply<u8, u8>,
    },
    /// Deletes a document (3 doc_delete); answered with its deletion time
    /// (the first one, if it was deleted already).
    DeleteDoc { doc: DocId, reply: Reply<Time> },
    /// Creates the document if needed, allocates the site, registers `sub`.
    /// The transaction decides the site, or refuses a deleted document.
    Start {
        doc: DocId,
        replica: Option<u128>,
        sub: Sub,
        reply: Reply<Started, Result<u8, WriteError>>,
    },
    /// The `seq`-th op of `session` (counted from 1). Acked through the
    /// session's outbox.
    Op {
        session: Session,
        seq: u64,
        op: SessionOp,
    },
    /// Removes a session; answered once every earlier op of it is acked.
    Leave {
        doc: DocId,
        session_id: u64,
        reply: oneshot::Sender<()>,
    },
    /// Commits what is queued before it, then stops the thread.
    Stop,
    /// Starts a tombstone compaction pass (sent by the compaction timer;
    /// ignored without a horizon, or while a pass runs).
    Compact,
}

impl Request {
    pub fn upsert(replica: Option<u128>, upsert: Arc<Upsert>) -> (Request, Answer<u8>) {
        let (reply, rx) = Reply::new(Err(WriteError::Stopped));
        let req = Request::Upsert {
            replica,
            upsert,
            reply,
        };
        (req, rx)
    }

    pub fn alloc(doc: DocId, replica: u128) -> (Request, Answer<u8>) {
        let (reply, rx) = Reply::new(0);
        let req = Request::Alloc {
            doc,
            replica,
            reply,
        };
        (req, rx)
    }

    pub fn delete_doc(doc: DocId) -> (Request, Answer<Time>) {
        let (reply, rx) = Reply::new(Err(WriteError::Stopped));
        (Request::DeleteDoc { doc, reply }, rx)
    }

    pub fn start(doc: DocId, replica: Option<u128>, sub: Sub) -> (Request, Answer<Started>) {
        let (reply, rx) = Reply::new(Ok(0));
        let req = Request::Start {
            doc,
            replica,
            sub,
            reply,
        };
        (req, rx)
    }

    pub fn leave(doc: DocId, session_id: u64) -> (Request, oneshot::Receiver<()>) {
        let (reply, rx) = oneshot::channel();
        let req = Request::Leave {
            doc,
            session_id,
            reply,
        };
        (req, rx)
    }
}

type Spawned = (
    mpsc::Sender<Request>,
    std::thread::JoinHandle<()>,
    Arc<WriterStats>,
);

/// Starts the writer thread, without tombstone compaction (tests).
#[cfg(test)]
pub fn spawn(
    db: Arc<Database>,
    clock: ServerClock,
    index: Arc<Index>,
    queue: usize,
    max_batch: usize,
) -> std::io::Result<Spawned> {
    spawn_with(db, clock, index, queue, max_batch, Compaction::OFF)
}

/// Starts the writer thread and, with a horizon, its compaction timer.
pub fn spawn_with(
    db: Arc<Database>,
    clock: ServerClock,
    index: Arc<Index>,
    queue: usize,
    max_batch: usize,
    compaction: Compaction,
) -> std::io::Result<Spawned> {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let stats = Arc::new(WriterStats::default());
    // The timer stops when the writer drops `timer_stop` (it has ended).
    let (timer_stop, timer_rx) = std::sync::mpsc::channel::<()>();
    let writer = Writer {
        db,
        clock,
        index,
        rooms: Rooms::default(),
        rx,
        max_batch: max_batch.max(1),
        stats: stats.clone(),
        compaction,
        sweep: None,
        _timer_stop: timer_stop,
    };
    let handle = std::thread::Builder::new()
        .name("notesync-writer".into())
        .spawn(move || writer.run())?;
    if compaction.is_on() {
        compact::start_timer(compaction, &tx, timer_rx)?;
    }
    Ok((tx, handle, stats))
}

struct Writer {
    db: Arc<Database>,
    clock: ServerClock,
    index: Arc<Index>,
    rooms: Rooms,
    rx: mpsc::Receiver<Request>,
    max_batch: usize,
    stats: Arc<WriterStats>,
    compaction: Compaction,
    /// The compaction pass in progress: the document it goes on from.
    sweep: Option<DocId>,
    /// Dropped with the writer: stops the compaction timer.
    _timer_stop: std::sync::mpsc::Sender<()>,
}

impl Writer {
    /// The batching loop: takes what is queued (up to `max_batch`), runs it
    /// as one batch, until a `Stop` or every sender is gone.
    fn run(mut self) {
        let mut stop = false;
        while !stop {
            // A compaction pass runs its steps only while nothing is queued.
            let first = if self.sweep.is_some() {
                match self.rx.try_recv() {
                    Ok(r) => r,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        self.compact_step();
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            } else {
                let Some(first) = self.rx.blocking_recv() else {
                    break;
                };
                first
            };
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let before = batch.len();
            batch.retain(|r| !matches!(r, Request::Compact));
            if batch.len() < before && self.compaction.is_on() && self.sweep.is_none() {
                self.sweep = Some(0);
            }
            if !batch.is_empty() {
                stop = self.process(batch);
            }
        }
        self.rooms.end_all(error_bytes(
            ErrorCode::SHUTTING_DOWN,
            "the server is shutting down; reconnect later",
        ));
        tracing::info!(stats = %self.stats.summary(), "writer stopped");
    }

    /// Applies, commits and answers one batch. Returns whether a `Stop` was
    /// in it.
    fn process(&mut self, mut requests: Vec<Request>) -> bool {
        let n = requests.len();
        let needs_txn = requests
            .iter()
            .any(|r| !matches!(r, Request::Leave { .. } | Request::Stop));
        let started = Instant::now();
        let result = if needs_txn {
            self.apply(&mut requests)
        } else {
            Ok((Batch::default(), false))
        };
        match result {
            Ok((batch, committed)) => {
                let micros = committed.then(|| started.elapsed().as_micros() as u64);
                self.stats.record(n, batch.changes, micros);
                self.publish(requests, batch)
            }
            Err(e) => {
                tracing::error!(error = %e, requests = n, "batch failed; nothing of it was stored");
                self.fail(requests, Arc::new(e))
            }
        }
    }

    /// After a successful commit: index, fan-out, acks, replies, sessions.
    fn publish(&mut self, requests: Vec<Request>, mut batch: Batch) -> bool {
        let updates: Vec<Update> = batch
            .docs
            .iter()
            .filter(|(_, e)| e.stored_modified != Some(e.rec.modified))
            .map(|(&doc, e)| Update {
                doc,
                old: e.stored_modified,
                modified: e.rec.modified,
                deleted: e.rec.deleted != 0,
            })
            .collect();
        if !updates.is_empty() || batch.wrote {
            self.index.publish(updates, self.clock.last());
        }
        for (doc, fanout) in batch.fanouts.drain() {
            self.rooms.fan_out(doc, fanout);
        }
        for ack in batch.acks.drain(..) {
            self.rooms
                .ack(ack.doc, ack.session_id, ack.refusals, ack.count);
        }
        let mut stop = false;
        for r in requests {
            match r {
                Request::Upsert { reply, .. } => reply.answer(),
                Request::DeleteDoc { reply, .. } => reply.answer(),
                Request::Alloc { reply, .. } => {
                    let site = reply.decided;
                    reply.send(Ok(site));
                }
                Request::Start {
                    doc, sub, reply, ..
                } => self.register(doc, sub, reply),
                Request::Leave {
                    doc,
                    session_id,
                    reply,
                } => self.leave(doc, session_id, reply),
                Request::Op { .. } | Request::Compact => {}
                Request::Stop => stop = true,
            }
        }
        // After the joins: a session registered in this batch on a
        // document deleted in it is ended too.
        for (doc, at) in batch.deleted.drain(..) {
            self.rooms.end_deleted(doc, at);
        }
        stop
    }

    /// Registers a started session and answers it with a snapshot opened
    /// now (or its refusal).
    fn register(&mut self, doc: DocId, sub: Sub, reply: Reply<Started, Result<u8, WriteError>>) {
        let Reply { tx, decided } = reply;
        let site = match decided {
            Ok(site) => site,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let session_id = sub.session_id;
        self.rooms.join(doc, sub);
        match Snapshot::begin(&self.db) {
            Ok(snapshot) => {
                if tx.send(Ok(Started { snapshot, site })).is_err() {
                    self.rooms.leave(doc, session_id);
                }
            }
            Err(e) => {
                self.rooms.leave(doc, session_id);
                let _ = tx.send(Err(WriteError::Storage(Arc::new(e))));
            }
        }
    }

    /// Removes a session, then tells its connection, which waits for this
    /// to know every op it sent is acked.
    fn leave(&mut self, doc: DocId, session_id: u64, reply: oneshot::Sender<()>) {
        self.rooms.leave(doc, session_id);
        let _ = reply.send(());
    }

    /// After a failed transaction: nothing was stored, nothing is counted.
    fn fail(&mut self, requests: Vec<Request>, e: Arc<StoreError>) -> bool {
        let storage = || WriteError::Storage(e.clone());
        let mut stop = false;
        for r in requests {
            match r {
                Request::Upsert { reply, .. } => reply.send(Err(storage())),
                Request::Alloc { reply, .. } => reply.send(Err(storage())),
                Request::DeleteDoc { reply, .. } => reply.send(Err(storage())),
                Request::Start { reply, .. } => reply.send(Err(storage())),
                Request::Op { session, .. } => {
                    let frame = error_bytes(
                        ErrorCode::STORAGE,
                        format!(
                            "the server could not store an op (not acknowledged; send it again): {e}"
                        ),
                    );
                    self.rooms.end(session.doc, session.session_id, frame);
                }
                Request::Leave {
                    doc,
                    session_id,
                    reply,
                } => self.leave(doc, session_id, reply),
                Request::Compact => {}
                Request::Stop => stop = true,
            }
        }
        stop
    }
}
