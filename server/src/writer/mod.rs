//! The writer: one thread that owns every write and the session rooms.
//!
//! Connections send [`Request`]s through a bounded channel. The writer takes
//! what is queued (up to `max_batch`), applies it in one redb write
//! transaction with one commit (one fsync for the whole batch), and only then
//! acts on it: publishes to the synclist index, fans changes out to rooms,
//! acks session ops, answers upserts, and registers new sessions.
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

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use notesync_protocol::{
    DocId, DocName, ErrorCode, ServerFrame, SessionDelete, SessionInsert, Time, Upsert,
};
use redb::Database;
use tokio::sync::{mpsc, oneshot};

use crate::index::Index;
use crate::rooms::{Fanout, Rooms, Sub, error_bytes};
use crate::store::{
    Deleted, DocRecord, InsertCheck, Inserted, MAX_SITE, ServerClock, Snapshot, StoreError,
    WriteTables,
};

/// Why the writer did not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// Refused by a protocol rule; the connection stays open.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// The commit failed; nothing was stored.
    #[error("the server could not store the change: {0}")]
    Storage(String),
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

/// A session's start, answered after its batch commits.
pub struct Started {
    /// Opened right after registration; the 33 is built from it.
    pub snapshot: Snapshot,
    pub site: u8,
}

/// What connections ask of the writer.
pub enum Request {
    /// A sync-mode upsert; answered with this replica's site.
    Upsert {
        replica: Option<u128>,
        upsert: Arc<Upsert>,
        reply: oneshot::Sender<Result<u8, WriteError>>,
    },
    /// Allocates a site for a pull (the document exists).
    Alloc {
        doc: DocId,
        replica: u128,
        reply: oneshot::Sender<Result<u8, WriteError>>,
    },
    /// Deletes a document (3 doc_delete); answered with its deletion time
    /// (the first one, if it was deleted already).
    DeleteDoc {
        doc: DocId,
        reply: oneshot::Sender<Result<Time, WriteError>>,
    },
    /// Creates the document if needed, allocates the site, registers `sub`.
    Start {
        doc: DocId,
        replica: Option<u128>,
        sub: Sub,
        reply: oneshot::Sender<Result<Started, WriteError>>,
    },
    /// The `seq`-th op of a session (counted from 1). Acked through the
    /// session's outbox.
    Op {
        doc: DocId,
        session_id: u64,
        seq: u64,
        /// The session's site (0: none).
        site: u8,
        /// Whether the connection sent a hello.
        hello: bool,
        /// Whether its credentials allow reading only (every op refused).
        read_only: bool,
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

/// Tombstone compaction (PROTOCOL.md 3.6): atoms deleted longer than
/// `horizon` ago are dropped, in passes started every `interval`, each
/// pass in bounded steps (one short write transaction each) that run when
/// the writer has nothing else queued. A zero horizon never compacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    pub horizon: Duration,
    pub interval: Duration,
}

impl Compaction {
    #[cfg(test)]
    pub const OFF: Compaction = Compaction {
        horizon: Duration::ZERO,
        interval: Duration::ZERO,
    };

    fn is_on(&self) -> bool {
        !self.horizon.is_zero()
    }
}

/// Change entries one compaction step looks at, at most.
const COMPACT_ENTRIES: usize = 4096;
/// Documents one compaction step looks at, at most.
const COMPACT_DOCS: usize = 1024;

/// Counters the load tool and the shutdown log read.
#[derive(Default)]
pub struct WriterStats {
    pub batches: AtomicU64,
    pub commits: AtomicU64,
    pub requests: AtomicU64,
    pub ops: AtomicU64,
    pub commit_micros: AtomicU64,
    pub max_batch: AtomicU64,
    /// Committed batches by request count: bucket i holds sizes in
    /// `[2^i, 2^(i+1))`.
    pub batch_log2: [AtomicU64; 24],
}

impl WriterStats {
    fn record(&self, requests: usize, ops: u64, commit_micros: Option<u64>) {
        crate::metrics::batch(requests, ops, commit_micros);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(requests as u64, Ordering::Relaxed);
        self.ops.fetch_add(ops, Ordering::Relaxed);
        self.max_batch.fetch_max(requests as u64, Ordering::Relaxed);
        if let Some(us) = commit_micros {
            self.commits.fetch_add(1, Ordering::Relaxed);
            self.commit_micros.fetch_add(us, Ordering::Relaxed);
            let bucket = (usize::BITS - 1 - requests.max(1).leading_zeros()) as usize;
            self.batch_log2[bucket.min(23)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One line for logs and the load tool.
    pub fn summary(&self) -> String {
        let commits = self.commits.load(Ordering::Relaxed);
        let requests = self.requests.load(Ordering::Relaxed);
        let ops = self.ops.load(Ordering::Relaxed);
        let us = self.commit_micros.load(Ordering::Relaxed);
        let mut hist = String::new();
        for (i, b) in self.batch_log2.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            if n > 0 {
                hist.push_str(&format!(" [{}..{}):{}", 1u64 << i, 1u64 << (i + 1), n));
            }
        }
        format!(
            "{} batches, {commits} commits, {requests} requests, {ops} changes; \
             mean {:.1} requests/commit, max batch {}, mean commit {:.0} us; \
             commits by batch size:{hist}",
            self.batches.load(Ordering::Relaxed),
            requests as f64 / commits.max(1) as f64,
            self.max_batch.load(Ordering::Relaxed),
            us as f64 / commits.max(1) as f64,
        )
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
        // Weak: the writer stops once every connection's sender is gone,
        // whatever the timer does.
        let weak = tx.downgrade();
        let every = compaction.interval.max(Duration::from_millis(1));
        std::thread::Builder::new()
            .name("notesync-compaction-timer".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    timer_rx.recv_timeout(every)
                {
                    let Some(tx) = weak.upgrade() else { break };
                    // A full queue skips a round; a closed one ends the timer.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Request::Compact)
                    {
                        break;
                    }
                }
            })?;
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

/// A request with the outcome the transaction decided for it.
enum Pending {
    Upsert {
        replica: Option<u128>,
        upsert: Arc<Upsert>,
        reply: oneshot::Sender<Result<u8, WriteError>>,
        outcome: Result<u8, WriteError>,
    },
    Alloc {
        doc: DocId,
        replica: u128,
        reply: oneshot::Sender<Result<u8, WriteError>>,
        site: u8,
    },
    DeleteDoc {
        doc: DocId,
        reply: oneshot::Sender<Result<Time, WriteError>>,
        outcome: Result<Time, WriteError>,
    },
    Start {
        doc: DocId,
        replica: Option<u128>,
        sub: Sub,
        reply: oneshot::Sender<Result<Started, WriteError>>,
        site: u8,
        /// Set when the document is deleted: the session is refused.
        refused: Option<WriteError>,
    },
    Op {
        doc: DocId,
        session_id: u64,
        seq: u64,
        site: u8,
        hello: bool,
        read_only: bool,
        op: SessionOp,
    },
    Leave {
        doc: DocId,
        session_id: u64,
        reply: oneshot::Sender<()>,
    },
    Stop,
}

impl From<Request> for Pending {
    fn from(r: Request) -> Self {
        match r {
            Request::Upsert {
                replica,
                upsert,
                reply,
            } => Pending::Upsert {
                replica,
                upsert,
                reply,
                outcome: Err(WriteError::Stopped),
            },
            Request::Alloc {
                doc,
                replica,
                reply,
            } => Pending::Alloc {
                doc,
                replica,
                reply,
                site: 0,
            },
            Request::DeleteDoc { doc, reply } => Pending::DeleteDoc {
                doc,
                reply,
                outcome: Err(WriteError::Stopped),
            },
            Request::Start {
                doc,
                replica,
                sub,
                reply,
            } => Pending::Start {
                doc,
                replica,
                sub,
                reply,
                site: 0,
                refused: None,
            },
            Request::Op {
                doc,
                session_id,
                seq,
                site,
                hello,
                read_only,
                op,
            } => Pending::Op {
                doc,
                session_id,
                seq,
                site,
                hello,
                read_only,
                op,
            },
            Request::Leave {
                doc,
                session_id,
                reply,
            } => Pending::Leave {
                doc,
                session_id,
                reply,
            },
            Request::Stop => Pending::Stop,
            Request::Compact => unreachable!("Writer::run takes Compact out of every batch"),
        }
    }
}

/// A document as this batch sees it.
struct DocEntry {
    rec: DocRecord,
    /// `modified` as stored before the batch (None: created in it).
    stored_modified: Option<Time>,
    dirty: bool,
}

/// A session's acknowledgement for this batch: frames for it (refusals,
/// deletes it lacks), then the count.
struct Ack {
    doc: DocId,
    session_id: u64,
    refusals: Vec<Bytes>,
    count: u64,
}

/// What one batch changed, applied after its commit.
#[derive(Default)]
struct Batch {
    docs: HashMap<DocId, DocEntry>,
    fanouts: HashMap<DocId, Fanout>,
    acks: Vec<Ack>,
    ack_index: HashMap<u64, usize>,
    /// Documents deleted in this batch, with their deletion time: their
    /// sessions are told and ended after the commit.
    deleted: Vec<(DocId, Time)>,
    changes: u64,
    wrote: bool,
}

impl Batch {
    /// The document, loaded into the batch on first use.
    fn doc<'a>(
        docs: &'a mut HashMap<DocId, DocEntry>,
        t: &WriteTables<'_>,
        doc: DocId,
    ) -> Result<Option<&'a mut DocEntry>, StoreError> {
        match docs.entry(doc) {
            Entry::Occupied(e) => Ok(Some(e.into_mut())),
            Entry::Vacant(v) => match t.doc(doc)? {
                Some(rec) => {
                    let stored_modified = Some(rec.modified);
                    Ok(Some(v.insert(DocEntry {
                        rec,
                        stored_modified,
                        dirty: false,
                    })))
                }
                None => Ok(None),
            },
        }
    }

    fn create(&mut self, doc: DocId, rec: DocRecord) -> &mut DocEntry {
        self.wrote = true;
        self.changes += 1;
        self.docs.entry(doc).or_insert(DocEntry {
            rec,
            stored_modified: None,
            dirty: true,
        })
    }

    fn broadcast(&mut self, rooms: &Rooms, doc: DocId, origin: Option<u64>, frame: ServerFrame) {
        if rooms.has_listeners(doc, origin) {
            self.fanouts.entry(doc).or_default().push(origin, &frame);
        }
    }

    fn ack(&mut self, doc: DocId, session_id: u64, seq: u64, refusal: Option<Bytes>) {
        let i = *self.ack_index.entry(session_id).or_insert_with(|| {
            self.acks.push(Ack {
                doc,
                session_id,
                refusals: Vec::new(),
                count: 0,
            });
            self.acks.len() - 1
        });
        let ack = &mut self.acks[i];
        ack.refusals.extend(refusal);
        ack.count = ack.count.max(seq);
    }
}

/// The site `replica` has in `doc`, allocating one if it has none and one
/// is left; 0 if none is left. The document must be in `docs`.
fn site_for(
    batch: &mut Batch,
    t: &mut WriteTables<'_>,
    doc: DocId,
    replica: u128,
) -> Result<u8, StoreError> {
    if let Some(site) = t.site(doc, replica)? {
        return Ok(site);
    }
    let Some(entry) = Batch::doc(&mut batch.docs, t, doc)? else {
        return Ok(0);
    };
    if entry.rec.deleted != 0 || entry.rec.next_site > MAX_SITE || entry.rec.next_site == 0 {
        return Ok(0);
    }
    let site = entry.rec.next_site as u8;
    entry.rec.next_site += 1;
    entry.dirty = true;
    batch.wrote = true;
    t.put_site(doc, replica, site)?;
    Ok(site)
}

fn exhausted_message(doc: DocId) -> String {
    format!(
        "document {doc:032x} already has {MAX_SITE} replicas with a site (sites per document: {MAX_SITE}); \
         this replica can read, delete and rename, but not insert"
    )
}

const HELLO_REQUIRED_MESSAGE: &str =
    "an insert needs a site, and a site needs a replica id: send 96 hello as the first frame";

impl Writer {
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

    /// One bounded step of the compaction pass: its own short write
    /// transaction. A failure ends the pass (the next one retries).
    fn compact_step(&mut self) {
        let Some(from) = self.sweep else { return };
        let horizon = self.compaction.horizon.as_micros().min(u64::MAX as u128) as u64;
        let cutoff = self.clock.wall_now().saturating_sub(horizon);
        match self.compact_docs(from, cutoff) {
            Ok(next) => self.sweep = next,
            Err(e) => {
                tracing::error!(error = %e, "tombstone compaction step failed; retried at the next pass");
                self.sweep = None;
            }
        }
    }

    /// Compacts documents from `from` on (in id order) until a budget runs
    /// out; returns where the pass goes on (None: it is done).
    fn compact_docs(&mut self, from: DocId, cutoff: Time) -> Result<Option<DocId>, StoreError> {
        let txn = self.db.begin_write()?;
        let mut entries = COMPACT_ENTRIES;
        let mut wrote = false;
        let mut dropped = 0;
        let next = {
            let mut t = WriteTables::open(&txn)?;
            let mut cursor = from;
            let mut docs = 0;
            loop {
                let Some((doc, mut rec)) = t.doc_from(cursor)? else {
                    break None;
                };
                docs += 1;
                if rec.deleted == 0 && rec.swept < cutoff {
                    let step = t.compact_doc(doc, rec.swept, cutoff, entries)?;
                    entries = entries.saturating_sub(step.visited);
                    dropped += step.dropped;
                    // A document with no change since its last sweep is
                    // not rewritten: an idle pass over many documents
                    // writes nothing (its next sweep starts where this one
                    // would have, and finds the same nothing).
                    if step.visited > 0 {
                        rec.swept = step.swept;
                        rec.compacted = rec.compacted.max(step.compacted);
                        t.put_doc(doc, &rec, Some(rec.modified))?;
                        wrote = true;
                    }
                    if !step.done {
                        break Some(doc);
                    }
                }
                let Some(n) = doc.checked_add(1) else {
                    break None;
                };
                cursor = n;
                if entries == 0 || docs >= COMPACT_DOCS {
                    break Some(cursor);
                }
            }
        };
        if wrote {
            txn.commit()?;
            if dropped > 0 {
                tracing::debug!(dropped, cutoff, "tombstone compaction step");
            }
        } else {
            txn.abort()?;
        }
        Ok(next)
    }

    /// Applies, commits and answers one batch. Returns whether a `Stop` was
    /// in it.
    fn process(&mut self, batch: Vec<Request>) -> bool {
        let n = batch.len();
        let mut pending: Vec<Pending> = batch.into_iter().map(Pending::from).collect();
        let needs_txn = pending
            .iter()
            .any(|p| !matches!(p, Pending::Leave { .. } | Pending::Stop));
        let started = Instant::now();
        let result = if needs_txn {
            self.apply(&mut pending)
        } else {
            Ok((Batch::default(), false))
        };
        match result {
            Ok((batch, committed)) => {
                let micros = committed.then(|| started.elapsed().as_micros() as u64);
                self.stats.record(n, batch.changes, micros);
                self.publish(pending, batch)
            }
            Err(e) => {
                tracing::error!(error = %e, requests = n, "batch failed; nothing of it was stored");
                self.fail(pending, &e)
            }
        }
    }

    /// Runs the batch in one write transaction. Returns what it changed and
    /// whether it committed (a batch that changed nothing is not committed).
    fn apply(&mut self, pending: &mut [Pending]) -> Result<(Batch, bool), StoreError> {
        let txn = self.db.begin_write()?;
        let mut batch = Batch::default();
        {
            let mut t = WriteTables::open(&txn)?;
            for p in pending.iter_mut() {
                match p {
                    Pending::Upsert {
                        replica,
                        upsert,
                        outcome,
                        ..
                    } => {
                        *outcome = self.apply_upsert(&mut batch, &mut t, *replica, upsert)?;
                    }
                    Pending::Alloc {
                        doc, replica, site, ..
                    } => {
                        *site = site_for(&mut batch, &mut t, *doc, *replica)?;
                    }
                    Pending::DeleteDoc { doc, outcome, .. } => {
                        *outcome = self.apply_delete_doc(&mut batch, &mut t, *doc)?;
                    }
                    Pending::Start {
                        doc,
                        replica,
                        site,
                        refused,
                        ..
                    } => {
                        if let Some(e) = Batch::doc(&mut batch.docs, &t, *doc)?
                            && e.rec.deleted != 0
                        {
                            *refused = Some(WriteError::Deleted {
                                doc: *doc,
                                at: e.rec.deleted,
                            });
                            continue;
                        }
                        if Batch::doc(&mut batch.docs, &t, *doc)?.is_none() {
                            // A session creates its document with an empty
                            // name that was never set: any upsert's name wins.
                            let rec = DocRecord {
                                modified: self.clock.next(),
                                name_time: 0,
                                next_site: 1,
                                deleted: 0,
                                swept: 0,
                                compacted: 0,
                                name: String::new(),
                            };
                            batch.create(*doc, rec);
                        }
                        if let Some(r) = replica {
                            *site = site_for(&mut batch, &mut t, *doc, *r)?;
                        }
                    }
                    Pending::Op {
                        doc,
                        session_id,
                        seq,
                        site,
                        hello,
                        read_only,
                        op,
                    } => {
                        if !self.rooms.contains(*doc, *session_id) {
                            // Killed (slow reader, storage) or gone: it will
                            // re-send on its next session.
                            continue;
                        }
                        if batch.deleted.iter().any(|(d, _)| d == doc) {
                            // Deleted earlier in this batch: the op is not
                            // stored or acked; the session is ended with
                            // the deletion after the commit.
                            continue;
                        }
                        let refusal = if *read_only {
                            Some(error_bytes(
                                ErrorCode::READ_ONLY,
                                "this token allows reading only: session edits are refused",
                            ))
                        } else {
                            self.apply_op(&mut batch, &mut t, *doc, *session_id, *site, *hello, op)?
                        };
                        batch.ack(*doc, *session_id, *seq, refusal);
                    }
                    Pending::Leave { .. } | Pending::Stop => {}
                }
            }
            for (&doc, entry) in batch.docs.iter() {
                if entry.dirty {
                    t.put_doc(doc, &entry.rec, entry.stored_modified)?;
                }
            }
            if batch.wrote {
                t.set_clock(self.clock.last())?;
            }
        }
        let wrote = batch.wrote;
        if wrote {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok((batch, wrote))
    }

    fn apply_upsert(
        &mut self,
        batch: &mut Batch,
        t: &mut WriteTables<'_>,
        replica: Option<u128>,
        u: &Upsert,
    ) -> Result<Result<u8, WriteError>, StoreError> {
        let exists = match Batch::doc(&mut batch.docs, t, u.doc)? {
            // Never resurrected: ids are never reused (PROTOCOL.md 3.5).
            Some(e) if e.rec.deleted != 0 => {
                return Ok(Err(WriteError::Deleted {
                    doc: u.doc,
                    at: e.rec.deleted,
                }));
            }
            Some(_) => true,
            None => false,
        };
        // The site this upsert would have, without allocating yet: a refused
        // upsert must write nothing.
        let (site, allocate) = match replica {
            None => (0, false),
            Some(r) => match t.site(u.doc, r)? {
                Some(s) => (s, false),
                None => {
                    let next = match batch.docs.get(&u.doc) {
                        Some(e) => e.rec.next_site,
                        None => 1,
                    };
                    if (1..=MAX_SITE).contains(&next) {
                        (next as u8, true)
                    } else {
                        (0, false)
                    }
                }
            },
        };
        if !u.inserts.is_empty() {
            if replica.is_none() {
                return Ok(Err(WriteError::refused(
                    ErrorCode::HELLO_REQUIRED,
                    HELLO_REQUIRED_MESSAGE.into(),
                )));
            }
            if site == 0 {
                return Ok(Err(WriteError::refused(
                    ErrorCode::SITES_EXHAUSTED,
                    exhausted_message(u.doc),
                )));
            }
            let mut seen: HashMap<Vec<u8>, &str> = HashMap::with_capacity(u.inserts.len());
            for (i, a) in u.inserts.iter().enumerate() {
                if a.pid.creator() != site {
                    return Ok(Err(WriteError::refused(
                        ErrorCode::SITE_MISMATCH,
                        format!(
                            "insert {i}: the id's last-level site is {}, but this replica's site for the document is {site}",
                            a.pid.creator()
                        ),
                    )));
                }
                let mut key = Vec::with_capacity(a.pid.wire().len());
                a.pid.write_key(&mut key);
                let conflict = match seen.get(&key) {
                    Some(&prev) => prev != a.data,
                    None => {
                        exists
                            && t.check_insert(u.doc, &key, a.data.as_bytes())?
                                == InsertCheck::Conflict
                    }
                };
                if conflict {
                    return Ok(Err(WriteError::refused(
                        ErrorCode::ID_CONFLICT,
                        format!("insert {i}: id {:?} already exists with other data", a.pid),
                    )));
                }
                seen.insert(key, a.data);
            }
        }

        // Valid: apply all of it.
        if !exists {
            let now = self.clock.next();
            batch.create(
                u.doc,
                DocRecord {
                    modified: now,
                    name_time: now,
                    next_site: 1,
                    deleted: 0,
                    swept: 0,
                    compacted: 0,
                    name: u.name.as_str().to_owned(),
                },
            );
        }
        if let (Some(r), true) = (replica, allocate) {
            // Same computation as above, now written.
            site_for(batch, t, u.doc, r)?;
        }
        let mut modified = None;
        let mut key = Vec::new();
        for a in u.inserts.iter() {
            key.clear();
            a.pid.write_key(&mut key);
            match t.insert_atom(u.doc, &key, a.data.as_bytes(), &mut self.clock)? {
                Inserted::New(at) => {
                    modified = Some(at);
                    batch.changes += 1;
                    batch.broadcast(
                        &self.rooms,
                        u.doc,
                        None,
                        ServerFrame::Insert(SessionInsert::new(a.to_atom())),
                    );
                }
                // The reply tells the client (Snapshot::deleted_sent_inserts).
                Inserted::Deleted { stored, .. } => batch.wrote |= stored,
                Inserted::Unchanged => {}
            }
        }
        for p in u.deletes.iter() {
            key.clear();
            p.write_key(&mut key);
            if let Deleted::New(at) = t.delete_atom(u.doc, &key, site, &mut self.clock)? {
                modified = Some(at);
                batch.changes += 1;
                batch.broadcast(
                    &self.rooms,
                    u.doc,
                    None,
                    ServerFrame::Delete(SessionDelete {
                        site,
                        pid: p.to_pid(),
                    }),
                );
            }
        }
        let Some(entry) = Batch::doc(&mut batch.docs, t, u.doc)? else {
            return Err(StoreError::Corrupt {
                table: "documents",
                what: "document vanished inside a batch",
            });
        };
        // The name rule (PROTOCOL.md 3.1): applied unless the name changed
        // after what the client had seen.
        if exists && entry.rec.name_time <= u.since && entry.rec.name != u.name.as_str() {
            let now = self.clock.next();
            entry.rec.name = u.name.as_str().to_owned();
            entry.rec.name_time = now;
            modified = Some(now);
            batch.changes += 1;
            batch.broadcast(
                &self.rooms,
                u.doc,
                None,
                ServerFrame::Rename(u.name.clone()),
            );
        }
        if let Some(m) = modified {
            let Some(entry) = Batch::doc(&mut batch.docs, t, u.doc)? else {
                return Ok(Ok(site));
            };
            entry.rec.modified = m;
            entry.dirty = true;
            batch.wrote = true;
        }
        Ok(Ok(site))
    }

    /// Deletes a document (3 doc_delete): its record stays with its
    /// deletion time (which is also its `modified`, so synclist lists it),
    /// its atoms, change index and sites are dropped. Idempotent: a deleted
    /// document answers its first deletion time.
    fn apply_delete_doc(
        &mut self,
        batch: &mut Batch,
        t: &mut WriteTables<'_>,
        doc: DocId,
    ) -> Result<Result<Time, WriteError>, StoreError> {
        let Some(entry) = Batch::doc(&mut batch.docs, t, doc)? else {
            return Ok(Err(WriteError::refused(
                ErrorCode::UNKNOWN_DOCUMENT,
                format!("document {doc:032x} does not exist on this server"),
            )));
        };
        if entry.rec.deleted != 0 {
            return Ok(Ok(entry.rec.deleted));
        }
        let now = self.clock.next();
        entry.rec.deleted = now;
        entry.rec.modified = now;
        entry.dirty = true;
        batch.wrote = true;
        batch.changes += 1;
        batch.deleted.push((doc, now));
        t.drop_content(doc)?;
        Ok(Ok(now))
    }

    /// Applies one session op. `Ok(Some(frame))`: a frame for the sender,
    /// sent before the ack that covers the op: a refusal, or the delete of
    /// an atom it re-sent that is deleted here.
    #[allow(clippy::too_many_arguments)]
    fn apply_op(
        &mut self,
        batch: &mut Batch,
        t: &mut WriteTables<'_>,
        doc: DocId,
        session_id: u64,
        site: u8,
        hello: bool,
        op: &SessionOp,
    ) -> Result<Option<Bytes>, StoreError> {
        if Batch::doc(&mut batch.docs, t, doc)?.is_none() {
            return Ok(Some(error_bytes(
                ErrorCode::INVALID_REQUEST,
                format!("document {doc:032x} does not exist"),
            )));
        }
        let origin = Some(session_id);
        let mut tell = None;
        let modified = match op {
            SessionOp::Insert(ins) => {
                if !hello {
                    return Ok(Some(error_bytes(
                        ErrorCode::HELLO_REQUIRED,
                        HELLO_REQUIRED_MESSAGE,
                    )));
                }
                if site == 0 {
                    return Ok(Some(error_bytes(
                        ErrorCode::SITES_EXHAUSTED,
                        exhausted_message(doc),
                    )));
                }
                if ins.site != site {
                    return Ok(Some(error_bytes(
                        ErrorCode::SITE_MISMATCH,
                        format!(
                            "session_insert site {} is not this replica's site for the document ({site})",
                            ins.site
                        ),
                    )));
                }
                let key = ins.atom.pid().key();
                let data = ins.atom.data().as_bytes();
                let Some(inserted) = t.insert_checked(doc, key, data, &mut self.clock)? else {
                    return Ok(Some(error_bytes(
                        ErrorCode::ID_CONFLICT,
                        format!("id {:?} already exists with other data", ins.atom.pid()),
                    )));
                };
                match inserted {
                    Inserted::New(at) => {
                        batch.broadcast(&self.rooms, doc, origin, ServerFrame::Insert(ins.clone()));
                        Some(at)
                    }
                    Inserted::Deleted { deleter, stored } => {
                        batch.wrote |= stored;
                        // The sender holds it live (a re-send after a lost
                        // ack, or a delete that came first): tell it.
                        tell = Some(
                            ServerFrame::Delete(SessionDelete {
                                site: deleter,
                                pid: ins.atom.pid().clone(),
                            })
                            .to_bytes(),
                        );
                        None
                    }
                    Inserted::Unchanged => None,
                }
            }
            SessionOp::Delete(del) => {
                if del.site != site {
                    return Ok(Some(error_bytes(
                        ErrorCode::SITE_MISMATCH,
                        format!(
                            "session_delete site {} is not this connection's site for the document ({site}; 0 means none)",
                            del.site
                        ),
                    )));
                }
                match t.delete_atom(doc, del.pid.key(), site, &mut self.clock)? {
                    Deleted::New(at) => {
                        batch.broadcast(&self.rooms, doc, origin, ServerFrame::Delete(del.clone()));
                        Some(at)
                    }
                    Deleted::Unchanged => None,
                }
            }
            SessionOp::Rename(name) => {
                let unchanged = Batch::doc(&mut batch.docs, t, doc)?
                    .is_some_and(|e| e.rec.name == name.as_str());
                if unchanged {
                    None
                } else {
                    let now = self.clock.next();
                    if let Some(e) = Batch::doc(&mut batch.docs, t, doc)? {
                        e.rec.name = name.as_str().to_owned();
                        e.rec.name_time = now;
                    }
                    batch.broadcast(&self.rooms, doc, origin, ServerFrame::Rename(name.clone()));
                    Some(now)
                }
            }
        };
        if let Some(m) = modified
            && let Some(e) = Batch::doc(&mut batch.docs, t, doc)?
        {
            e.rec.modified = m;
            e.dirty = true;
            batch.wrote = true;
            batch.changes += 1;
        }
        Ok(tell)
    }

    /// After a successful commit: index, fan-out, acks, replies, sessions.
    fn publish(&mut self, pending: Vec<Pending>, mut batch: Batch) -> bool {
        let updates: Vec<(DocId, Option<Time>, Time)> = batch
            .docs
            .iter()
            .filter(|(_, e)| e.stored_modified != Some(e.rec.modified))
            .map(|(&d, e)| (d, e.stored_modified, e.rec.modified))
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
        for p in pending {
            match p {
                Pending::Upsert { reply, outcome, .. } => {
                    let _ = reply.send(outcome);
                }
                Pending::DeleteDoc { reply, outcome, .. } => {
                    let _ = reply.send(outcome);
                }
                Pending::Start {
                    reply,
                    refused: Some(e),
                    ..
                } => {
                    let _ = reply.send(Err(e));
                }
                Pending::Alloc { reply, site, .. } => {
                    let _ = reply.send(Ok(site));
                }
                Pending::Start {
                    doc,
                    sub,
                    reply,
                    site,
                    refused: None,
                    ..
                } => {
                    let session_id = sub.session_id;
                    self.rooms.join(doc, sub);
                    match Snapshot::begin(&self.db) {
                        Ok(snapshot) => {
                            if reply.send(Ok(Started { snapshot, site })).is_err() {
                                self.rooms.leave(doc, session_id);
                            }
                        }
                        Err(e) => {
                            self.rooms.leave(doc, session_id);
                            let _ = reply.send(Err(WriteError::Storage(e.to_string())));
                        }
                    }
                }
                Pending::Leave {
                    doc,
                    session_id,
                    reply,
                } => {
                    self.rooms.leave(doc, session_id);
                    let _ = reply.send(());
                }
                Pending::Op { .. } => {}
                Pending::Stop => stop = true,
            }
        }
        // After the joins: a session registered in this batch on a
        // document deleted in it is ended too.
        for (doc, at) in batch.deleted.drain(..) {
            self.rooms.end_deleted(doc, at);
        }
        stop
    }

    /// After a failed transaction: nothing was stored, nothing is counted.
    fn fail(&mut self, pending: Vec<Pending>, e: &StoreError) -> bool {
        let msg = e.to_string();
        let mut stop = false;
        for p in pending {
            match p {
                Pending::Upsert { reply, .. } | Pending::Alloc { reply, .. } => {
                    let _ = reply.send(Err(WriteError::Storage(msg.clone())));
                }
                Pending::DeleteDoc { reply, .. } => {
                    let _ = reply.send(Err(WriteError::Storage(msg.clone())));
                }
                Pending::Start { reply, .. } => {
                    let _ = reply.send(Err(WriteError::Storage(msg.clone())));
                }
                Pending::Op {
                    doc, session_id, ..
                } => {
                    let frame = error_bytes(
                        ErrorCode::STORAGE,
                        format!(
                            "the server could not store an op (not acknowledged; send it again): {msg}"
                        ),
                    );
                    self.rooms.end(doc, session_id, frame);
                }
                Pending::Leave {
                    doc,
                    session_id,
                    reply,
                } => {
                    self.rooms.leave(doc, session_id);
                    let _ = reply.send(());
                }
                Pending::Stop => stop = true,
            }
        }
        stop
    }
}
