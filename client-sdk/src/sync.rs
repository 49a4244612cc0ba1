//! One two-way sync of a store with the server, in sync mode
//! (PROTOCOL.md 3.1).
//!
//! Order: hello; give provisional notes a site (an empty upsert creates the
//! document and allocates it); synclist from the store's cursor until it is
//! empty; then a doc_delete for every note deleted here, an upsert for every
//! note with pending ops and a pull for every other listed note. Requests
//! are pipelined, at most [`WINDOW`] awaiting their replies, which are read
//! in order. Ops leave a note's log only on the
//! 34 that answers the upsert that carried them. A 35 (the note was deleted
//! on the server) removes the note here, keeping its text in the trash if
//! it had edits the server never took (PROTOCOL.md 3.5). The global cursor
//! moves only once every listed note was pulled.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use notesync_protocol::{
    AtomListBuilder, ClientFrame, Coalesced, DocId, DocName, ErrorCode, IdRange, ItemListBuilder,
    Limits, Pid, PidListBuilder, RangeListBuilder, Run, RunCoalescer, ServerFrame, Time, Upsert,
    UpsertRuns,
};

use crate::doc::{Changes, TextChange};
use crate::net::{Conn, NetError, ServerConfig};
use crate::store::{Deferral, DeferredState, Outgoing, RemoteDeletion, Store, StoreError, lock};

/// An error of a sync or of a live session's connection: the network's,
/// or the local store's (each kept whole, as its source).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SyncError {
    /// Whether retrying later on a new connection may succeed (a store
    /// error is not the network's: retrying will not mend it).
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Net(e) => e.is_transient(),
            SyncError::Store(_) => false,
        }
    }
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Notes upserted (each with its pending ops).
    pub upserted: usize,
    /// Notes pulled.
    pub pulled: usize,
    /// Notes first seen on this device.
    pub new_notes: Vec<DocId>,
    /// Ops the server acknowledged.
    pub acknowledged_ops: usize,
    /// Text changes from other devices, per note.
    pub changes: Vec<(DocId, Vec<TextChange>)>,
    /// Notes the server refused, with why; their ops stay in the log.
    pub refused: Vec<(DocId, ErrorCode, String)>,
    /// Notes deleted on another device, removed here.
    pub deleted: Vec<RemoteDeletion>,
    /// Deletions made here that the server has now made.
    pub deletes_sent: Vec<DocId>,
    /// Notes the server resynced (PROTOCOL.md 3.6: this device's last sync
    /// was older than the tombstones it keeps): replaced by the server's
    /// full state, this device's unacknowledged edits kept and sent.
    pub resynced: Vec<DocId>,
}

/// Keeps upserts well inside the default frame and item limits.
const MAX_ATOMS_PER_UPSERT: usize = 100_000;
const MAX_UPSERT_BYTES: usize = Limits::DEFAULT_MAX_FRAME_BYTES / 4;

enum Request {
    /// A provisional note's empty upsert (its 34 gives the site).
    Site {
        doc: DocId,
    },
    /// An upsert and the ops it carries (acknowledged by its 34).
    Upsert {
        doc: DocId,
        inserts: Vec<Pid>,
        deletes: Vec<Pid>,
        rename: Option<DocName>,
    },
    Pull {
        doc: DocId,
    },
    /// 3 doc_delete of a note deleted here.
    Delete {
        doc: DocId,
    },
}

impl Request {
    fn doc(&self) -> DocId {
        match self {
            Request::Site { doc }
            | Request::Upsert { doc, .. }
            | Request::Pull { doc }
            | Request::Delete { doc } => *doc,
        }
    }
}

/// How the server answered a request about one document.
enum Reply {
    /// 34: synced up to this time; this replica's site.
    Synced(u8, Time),
    /// 35: the document is deleted (at this time).
    Deleted,
}

/// How far a sync is, in notes: what an app shows while a first sync of
/// many notes runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncProgress {
    /// Notes new to the server (their sites and first upserts), or the
    /// rest (upserts, pulls, deletions).
    pub new_notes: bool,
    pub done: usize,
    pub total: usize,
}

/// Where a sync reports its progress (after each note it is done with).
pub type ProgressFn<'a> = &'a mut (dyn FnMut(SyncProgress) + Send);

/// Where a sync asks for the text of a new, still empty note once the
/// server gave it its site (PROTOCOL.md 1.3), so that the text is made
/// with the ids it keeps instead of provisional ones re-made: a folder's
/// import, whose files hold the text until then. `None`: it has none.
pub type NewTextFn<'a> = &'a mut (dyn FnMut(DocId) -> Option<String> + Send);

/// Syncs every note once, on a connection of its own.
pub async fn sync_once(
    store: &Arc<Mutex<Store>>,
    cfg: &ServerConfig,
    progress: ProgressFn<'_>,
    new_text: NewTextFn<'_>,
) -> Result<SyncReport, SyncError> {
    let replica = lock(store).replica_id();
    let mut conn = Conn::connect(cfg, replica).await?;
    Ok(
        sync_on_with(&mut conn, store, Listing::Synclist, progress, new_text)
            .await?
            .0,
    )
}

/// Which remote changes a sync pulls, beside sending every local one.
pub(crate) enum Listing {
    /// What synclist lists from the store's cursor; the cursor then moves
    /// to the last listed time if every listed note was pulled.
    Synclist,
    /// These documents at these times (the change feed listed them); the
    /// caller moves the cursor.
    Given(BTreeMap<DocId, Time>),
}

/// One two-way sync on an open connection. Returns what it did and
/// whether every listed note was pulled (a refusal leaves the cursor
/// where it was, so the note is listed again).
pub(crate) async fn sync_on(
    conn: &mut Conn,
    store: &Arc<Mutex<Store>>,
    listing: Listing,
) -> Result<(SyncReport, bool), SyncError> {
    sync_on_with(conn, store, listing, &mut |_| {}, &mut |_| None).await
}

/// [`sync_on`], reporting progress and asking for new notes' text.
async fn sync_on_with(
    conn: &mut Conn,
    store: &Arc<Mutex<Store>>,
    listing: Listing,
    progress: ProgressFn<'_>,
    new_text: NewTextFn<'_>,
) -> Result<(SyncReport, bool), SyncError> {
    // state.json is written once at the end, not once per new note or site
    // (see `Store::defer_state_saves`), whether or not the sync got there.
    let deferred = DeferredState::begin(store, Deferral::Sync);
    let done = sync_steps(conn, store, listing, progress, new_text).await;
    let saved = deferred.end();
    let done = done?;
    saved?;
    Ok(done)
}

async fn sync_steps(
    conn: &mut Conn,
    store: &Arc<Mutex<Store>>,
    listing: Listing,
    progress: ProgressFn<'_>,
    new_text: NewTextFn<'_>,
) -> Result<(SyncReport, bool), SyncError> {
    let mut report = SyncReport::default();

    // 1. Provisional notes get their site first (PROTOCOL.md 1.3).
    let provisional = lock(store).provisional_notes();
    let mut step = Step {
        report: &mut report,
        all_pulled: true,
        progress: SyncProgress {
            new_notes: true,
            done: 0,
            total: provisional.len(),
        },
        show: progress,
        new_text,
    };
    let jobs = provisional
        .into_iter()
        .map(|(doc, name)| Job::Site { doc, name });
    pipeline(conn, store, jobs, &mut step).await?;
    let mut all_pulled = step.all_pulled;

    // 2. What changed since the cursor.
    let mut cursor = lock(store).last_sync_time();
    let (mut listed, list) = match listing {
        Listing::Synclist => (BTreeMap::new(), true),
        Listing::Given(docs) => (docs, false),
    };
    if list {
        loop {
            conn.send(ClientFrame::Synclist { since: cursor }).await?;
            let entries = match conn.recv().await? {
                ServerFrame::SynclistResponse(e) => e,
                other => {
                    return Err(NetError::Unexpected(format!(
                        "expected synclist_response, got {other:?}"
                    ))
                    .into());
                }
            };
            if entries.is_empty() {
                break;
            }
            for e in &entries {
                listed.insert(e.doc, e.modified);
                cursor = cursor.max(e.modified);
            }
        }
    }

    // 3. Deletes, upserts and pulls, pipelined; replies read in order.
    let jobs = plan(store, &listed, &report)?;
    let mut step = Step {
        report: &mut report,
        all_pulled,
        progress: SyncProgress {
            new_notes: false,
            done: 0,
            total: jobs.len(),
        },
        show: progress,
        new_text,
    };
    pipeline(conn, store, jobs.into_iter(), &mut step).await?;
    all_pulled = step.all_pulled;
    let mut s = lock(store);
    s.flush()?;
    if all_pulled && list {
        s.set_last_sync_time(cursor)?;
    }
    Ok((report, all_pulled))
}

/// At most this many requests in flight on a sync's connection: what is
/// built and awaited at once (a pull's reply may be a whole note) grows
/// with the window, not with the folder, while round trips still overlap.
/// Below the server's default pipeline bound (64, `--max-pipeline`), so it
/// reads every request we have fed while we are not yet reading replies.
const WINDOW: usize = 32;

/// What a sync asks of the server about one note; its frames are built
/// only as the window lets it go out (an upsert's ops are marked sent then).
enum Job {
    /// An empty upsert that creates a provisional note's document and
    /// gives it its site.
    Site {
        doc: DocId,
        name: DocName,
    },
    Delete(DocId),
    Upsert(DocId),
    Pull {
        doc: DocId,
        since: Time,
    },
}

/// One pipelined step of a sync: what it found, and how far it is.
struct Step<'a, 'p> {
    report: &'a mut SyncReport,
    all_pulled: bool,
    progress: SyncProgress,
    show: ProgressFn<'p>,
    new_text: NewTextFn<'p>,
}

/// Sends the jobs' frames with at most [`WINDOW`] replies awaited, and
/// handles each reply in request order.
async fn pipeline(
    conn: &mut Conn,
    store: &Mutex<Store>,
    mut jobs: impl Iterator<Item = Job>,
    step: &mut Step<'_, '_>,
) -> Result<(), SyncError> {
    let runs = conn.speaks_runs();
    let mut ready = std::collections::VecDeque::new();
    let mut waiting = std::collections::VecDeque::new();
    // Jobs a reply calls for (a new note's upsert once it has its site),
    // before the next of `jobs`: the note is still in memory.
    let mut follow = std::collections::VecDeque::new();
    loop {
        // Refill at half: a write carries many frames, not one per reply.
        if waiting.len() <= WINDOW / 2 {
            let mut fed = false;
            while waiting.len() < WINDOW {
                if ready.is_empty() {
                    let Some(job) = follow.pop_front().or_else(|| jobs.next()) else {
                        break;
                    };
                    ready.extend(frames_for(store, job, runs)?);
                    continue;
                }
                let (req, frame) = ready.pop_front().expect("not empty");
                conn.feed(frame).await?;
                waiting.push_back(req);
                fed = true;
            }
            if fed {
                conn.flush().await?;
            }
        }
        let Some(req) = waiting.pop_front() else {
            return Ok(());
        };
        // A note is done with its last request: not a site whose upsert
        // follows, nor an upsert with more of its frames queued.
        let doc = req.doc();
        let more = |r: Option<&Request>| r.is_some_and(|r| r.doc() == doc);
        let split = matches!(req, Request::Upsert { .. })
            && more(waiting.front().or(ready.front().map(|(r, _)| r)));
        let next = answer(conn, store, req, step).await?;
        if next.is_none() && !split {
            step.progress.done += 1;
            (step.show)(step.progress);
        }
        follow.extend(next);
    }
}

/// A job's frames, each with the request its reply answers.
fn frames_for(
    store: &Mutex<Store>,
    job: Job,
    runs: bool,
) -> Result<Vec<(Request, ClientFrame)>, SyncError> {
    Ok(match job {
        Job::Site { doc, name } => {
            let empty = if runs {
                ClientFrame::UpsertRuns(UpsertRuns {
                    doc,
                    name,
                    since: 0,
                    inserts: ItemListBuilder::new().finish(),
                    deletes: RangeListBuilder::new().finish(),
                })
            } else {
                ClientFrame::Upsert(Upsert {
                    doc,
                    name,
                    since: 0,
                    inserts: AtomListBuilder::new().finish(),
                    deletes: PidListBuilder::new().finish(),
                })
            };
            vec![(Request::Site { doc }, empty)]
        }
        Job::Delete(doc) => vec![(Request::Delete { doc }, ClientFrame::DeleteDoc { doc })],
        Job::Pull { doc, since } => vec![(Request::Pull { doc }, ClientFrame::Pull { doc, since })],
        Job::Upsert(doc) => {
            let out = lock(store).outgoing(doc)?;
            if runs {
                upserts_with_runs(doc, out)
            } else {
                upserts_with_atoms(doc, out)
            }
        }
    })
}

/// Handles the reply to one request; returns the job it calls for, if any.
async fn answer(
    conn: &mut Conn,
    store: &Mutex<Store>,
    req: Request,
    step: &mut Step<'_, '_>,
) -> Result<Option<Job>, SyncError> {
    let (report, all_pulled) = (&mut *step.report, &mut step.all_pulled);
    match req {
        Request::Site { doc } => match read_reply(conn, store, doc, false, false, report).await? {
            Ok(Reply::Deleted) => deleted(store, doc, report)?,
            Ok(Reply::Synced(0, _)) => report.refused.push((
                doc,
                ErrorCode::SITES_EXHAUSTED,
                "the server gave no site".into(),
            )),
            Ok(Reply::Synced(site, sync_time)) => {
                let mut s = lock(store);
                s.set_site(doc, site)?;
                s.set_note_sync(doc, sync_time)?;
                if s.is_blank(doc)?
                    && let Some(text) = (step.new_text)(doc)
                {
                    s.fill_new_note(doc, &text)?;
                }
                // Its text goes now, while the note is loaded (an import's
                // notes would otherwise leave memory, saved, and be read
                // back for step 3).
                if s.pending_ops(doc)? > 0 {
                    return Ok(Some(Job::Upsert(doc)));
                }
            }
            Err((code, msg)) => report.refused.push((doc, code, msg)),
        },
        Request::Upsert {
            doc,
            inserts,
            deletes,
            rename,
        } => match read_reply(conn, store, doc, rename.is_some(), false, report).await? {
            // Deleted before these ops reached it: none was applied.
            Ok(Reply::Deleted) => deleted(store, doc, report)?,
            Ok(Reply::Synced(site, sync_time)) => {
                let mut s = lock(store);
                report.upserted += 1;
                report.acknowledged_ops +=
                    inserts.len() + deletes.len() + rename.is_some() as usize;
                s.acknowledge(doc, &inserts, &deletes, rename.as_ref())?;
                s.set_site(doc, site)?;
                s.set_note_sync(doc, sync_time)?;
            }
            Err((code, msg)) => report.refused.push((doc, code, msg)),
        },
        Request::Pull { doc } => match read_reply(conn, store, doc, false, false, report).await? {
            Ok(Reply::Deleted) => deleted(store, doc, report)?,
            Ok(Reply::Synced(site, sync_time)) => {
                let mut s = lock(store);
                report.pulled += 1;
                s.set_site(doc, site)?;
                s.set_note_sync(doc, sync_time)?;
            }
            // Listed, then gone: nothing to pull.
            Err((ErrorCode::UNKNOWN_DOCUMENT, _)) => {}
            Err((code, msg)) => {
                *all_pulled = false;
                report.refused.push((doc, code, msg));
            }
        },
        Request::Delete { doc } => match read_delete_reply(conn, doc).await? {
            // Deleted (by this request or before it), or never there.
            Ok(()) | Err((ErrorCode::UNKNOWN_DOCUMENT, _)) => {
                lock(store).delete_confirmed(doc)?;
                report.deletes_sent.push(doc);
            }
            Err((code, msg)) => report.refused.push((doc, code, msg)),
        },
    }
    Ok(None)
}

/// The jobs of step 3: a doc_delete for every note deleted here, an
/// upsert for every note with pending ops (but one the server refused in
/// this sync already), and a pull for every listed note without, unless
/// this device's last sync of the note already covers the listed time (its
/// own upserts come back listed, PROTOCOL.md 3.8, and a 34's sync time
/// covers its 33s).
fn plan(
    store: &Mutex<Store>,
    listed: &BTreeMap<DocId, Time>,
    report: &SyncReport,
) -> Result<Vec<Job>, SyncError> {
    let s = lock(store);
    let mut out: Vec<Job> = s.pending_deletes().into_iter().map(Job::Delete).collect();
    let refused: std::collections::HashSet<DocId> =
        report.refused.iter().map(|(doc, ..)| *doc).collect();
    let with_ops = s.notes_to_upsert();
    out.extend(
        with_ops
            .iter()
            .filter(|doc| !refused.contains(doc))
            .map(|&id| Job::Upsert(id)),
    );
    for (&doc, &time) in listed {
        // A note deleted here or known deleted: nothing to pull (it would
        // come back as a new note).
        if with_ops.contains(&doc) || s.is_deleted(doc) {
            continue;
        }
        match s.note_sync_time(doc) {
            Ok(since) if since >= time => {}
            Ok(since) => out.push(Job::Pull { doc, since }),
            // A note new to this device: everything.
            Err(_) => out.push(Job::Pull { doc, since: 0 }),
        }
    }
    Ok(out)
}

/// A note's outgoing ops as 2s (before version 3), split so no frame
/// nears the limits (each upsert is idempotent).
fn upserts_with_atoms(doc: DocId, out: Outgoing) -> Vec<(Request, ClientFrame)> {
    let mut frames = Vec::new();
    let mut ins = out.inserts.into_iter().peekable();
    let mut dels = out.deletes.into_iter().peekable();
    loop {
        let (mut ib, mut db) = (AtomListBuilder::new(), PidListBuilder::new());
        let (mut ids_i, mut ids_d) = (Vec::new(), Vec::new());
        while let Some(a) =
            ins.next_if(|_| ib.len() < MAX_ATOMS_PER_UPSERT && ib.byte_len() < MAX_UPSERT_BYTES)
        {
            ib.push(&a);
            ids_i.push(a.pid().clone());
        }
        while let Some(p) =
            dels.next_if(|_| db.len() < MAX_ATOMS_PER_UPSERT && db.byte_len() < MAX_UPSERT_BYTES)
        {
            db.push(&p).expect("pending ids are valid");
            ids_d.push(p);
        }
        let last = ins.peek().is_none() && dels.peek().is_none();
        let frame = ClientFrame::Upsert(Upsert {
            doc,
            name: out.name.clone(),
            since: out.since,
            inserts: ib.finish(),
            deletes: db.finish(),
        });
        let req = Request::Upsert {
            doc,
            inserts: ids_i,
            deletes: ids_d,
            rename: if last { out.rename.clone() } else { None },
        };
        frames.push((req, frame));
        if last {
            return frames;
        }
    }
}

/// A note's outgoing ops as 4s: runs and ranges, split so no frame nears
/// the limits (atoms plus run chars, range ids, and bytes per frame).
fn upserts_with_runs(doc: DocId, out: Outgoing) -> Vec<(Request, ClientFrame)> {
    /// One frame's lists in progress.
    #[derive(Default)]
    struct Part {
        items: ItemListBuilder,
        ranges: RangeListBuilder,
        units_i: usize,
        units_d: usize,
        ids_i: Vec<Pid>,
        ids_d: Vec<Pid>,
    }
    impl Part {
        fn full(&self) -> bool {
            self.units_i >= MAX_ATOMS_PER_UPSERT
                || self.units_d >= MAX_ATOMS_PER_UPSERT
                || self.items.byte_len() + self.ranges.byte_len() >= MAX_UPSERT_BYTES
        }
        fn put(&mut self, c: Coalesced) {
            // Every part was a valid atom or id of the log.
            match c {
                Coalesced::Run(first, text) => {
                    let run = Run::new(first, text).expect("coalesced from valid atoms");
                    self.units_i += run.char_count();
                    self.ids_i.extend(run.atoms().map(|(_, p)| p));
                    self.items
                        .push_run(run.first(), run.text())
                        .expect("a valid run");
                }
                Coalesced::Atom(data, pid) => {
                    self.units_i += 1;
                    self.items.push_atom(&data, &pid).expect("a valid atom");
                    self.ids_i.push(pid);
                }
                Coalesced::Range(first, n) => {
                    let range = IdRange::new(first, n).expect("coalesced from valid ids");
                    self.units_d += usize::from(n);
                    self.ids_d.extend(range.ids());
                    self.ranges.push(range.first(), n).expect("a valid range");
                }
            }
        }
    }
    let mut parts = vec![Part::default()];
    let mut co = RunCoalescer::new();
    let put = |parts: &mut Vec<Part>, c: Coalesced| {
        if parts.last().is_some_and(Part::full) {
            parts.push(Part::default());
        }
        parts.last_mut().expect("one part at least").put(c);
    };
    for a in &out.inserts {
        for c in co.insert(a.data(), a.pid()).into_iter().flatten() {
            put(&mut parts, c);
        }
    }
    if let Some(c) = co.take_run() {
        put(&mut parts, c);
    }
    for p in &out.deletes {
        if let Some(c) = co.delete(p) {
            put(&mut parts, c);
        }
    }
    if let Some(c) = co.take_range() {
        put(&mut parts, c);
    }
    let last = parts.len() - 1;
    parts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let frame = ClientFrame::UpsertRuns(UpsertRuns {
                doc,
                name: out.name.clone(),
                since: out.since,
                inserts: p.items.finish(),
                deletes: p.ranges.finish(),
            });
            let req = Request::Upsert {
                doc,
                inserts: p.ids_i,
                deletes: p.ids_d,
                rename: if i == last { out.rename.clone() } else { None },
            };
            (req, frame)
        })
        .collect()
}

/// Reads one reply: 33s (applied as they come) then the 34. A refusal (an
/// error frame that keeps the connection) is returned as `Err`; an error
/// that ends the connection is a `SyncError`. `full`: the 33s are the full
/// state (asked since 0 to resync); a 36 makes them so too (PROTOCOL.md
/// 3.6).
async fn read_reply(
    conn: &mut Conn,
    store: &Mutex<Store>,
    doc: DocId,
    carried_rename: bool,
    mut full: bool,
    report: &mut SyncReport,
) -> Result<Result<Reply, (ErrorCode, String)>, SyncError> {
    let mut changes = Changes::default();
    let mut inserted = std::collections::HashSet::new();
    loop {
        // A 37 is the 33 it stands for (PROTOCOL.md 1.5, 3.1).
        let frame = match conn.recv_raw().await? {
            ServerFrame::DocResponseRuns(r) => ServerFrame::DocResponse(r.expand()),
            other => other,
        };
        match frame {
            ServerFrame::Resync { doc: d } if d == doc && !full && inserted.is_empty() => {
                full = true;
                report.resynced.push(doc);
            }
            ServerFrame::DocResponse(r) if r.doc == doc => {
                inserted.extend(r.inserts.iter().map(|a| a.pid.to_pid()));
                let mut s = lock(store);
                if !s.contains(doc) {
                    s.adopt_remote(doc, &r.name, 0)?;
                    report.new_notes.push(doc);
                }
                changes.extend(s.apply_response(doc, &r.inserts, &r.deletes)?);
                // The 33's name is the server's current one. After an upsert
                // it is the verdict on any rename the upsert carried; after a
                // pull it must not undo a local rename not yet sent.
                if carried_rename || !s.has_pending_rename(doc)? {
                    s.apply_remote_name(doc, &r.name)?;
                }
            }
            ServerFrame::DocSync {
                doc: d,
                sync_time,
                site,
            } if d == doc => {
                {
                    let mut s = lock(store);
                    if s.contains(doc) {
                        changes.extend(s.reconcile(doc, &inserted, full)?);
                    }
                }
                if !changes.is_empty() {
                    report.changes.push((doc, changes.into_vec()));
                }
                return Ok(Ok(Reply::Synced(site, sync_time)));
            }
            ServerFrame::DocDeleted { doc: d, .. } if d == doc => return Ok(Ok(Reply::Deleted)),
            ServerFrame::Error(e) if !e.code.closes_connection() => {
                return Ok(Err((e.code, e.message)));
            }
            ServerFrame::Error(e) => return Err(NetError::from(e).into()),
            other => {
                return Err(NetError::Unexpected(format!(
                    "expected 33 or 34 for {doc:032x}, got {other:?}"
                ))
                .into());
            }
        }
    }
}

/// A note the server says is deleted: removed here (its text kept in the
/// trash if it had edits the server never took).
fn deleted(store: &Mutex<Store>, doc: DocId, report: &mut SyncReport) -> Result<(), SyncError> {
    if let Some(d) = lock(store).apply_remote_deletion(doc)? {
        report.deleted.push(d);
    }
    Ok(())
}

/// Reads the answer to a doc_delete: 35, or a refusal.
async fn read_delete_reply(
    conn: &mut Conn,
    doc: DocId,
) -> Result<Result<(), (ErrorCode, String)>, SyncError> {
    match conn.recv_raw().await? {
        ServerFrame::DocDeleted { doc: d, .. } if d == doc => Ok(Ok(())),
        ServerFrame::Error(e) if !e.code.closes_connection() => Ok(Err((e.code, e.message))),
        ServerFrame::Error(e) => Err(NetError::from(e).into()),
        other => {
            Err(NetError::Unexpected(format!("expected 35 for {doc:032x}, got {other:?}")).into())
        }
    }
}

/// A full resync of one note in sync mode (PROTOCOL.md 3.6): a pull since
/// 0 whose 33s replace the note's copy (its unacknowledged edits kept),
/// e.g. before a live session the server refused with a 36.
pub async fn pull_full(
    store: &Arc<Mutex<Store>>,
    cfg: &ServerConfig,
    doc: DocId,
) -> Result<SyncReport, SyncError> {
    let replica = lock(store).replica_id();
    let mut conn = Conn::connect(cfg, replica).await?;
    let mut report = SyncReport::default();
    conn.send(ClientFrame::Pull { doc, since: 0 }).await?;
    match read_reply(&mut conn, store, doc, false, true, &mut report).await? {
        Ok(Reply::Deleted) => deleted(store, doc, &mut report)?,
        Ok(Reply::Synced(site, sync_time)) => {
            let mut s = lock(store);
            report.pulled += 1;
            report.resynced.push(doc);
            s.set_site(doc, site)?;
            s.set_note_sync(doc, sync_time)?;
            s.flush()?;
        }
        Err((code, msg)) => report.refused.push((doc, code, msg)),
    }
    Ok(report)
}
