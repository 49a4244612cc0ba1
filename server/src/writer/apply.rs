//! The apply rules: what each request does to the store inside a batch's
//! write transaction, and what the batch owes once it commits.
//!
//! Touches the store's write tables (through `WriteTables` only), the
//! server clock (times assigned in commit order) and the rooms, read-only:
//! fan-out, acks and refusals are collected into the [`Batch`], which the
//! batching loop sends after the commit. Nothing here answers or
//! broadcasts anything.
//!
//! An upsert is validated in full against the transaction's state before
//! any of it is written, so a refused upsert writes nothing.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use bytes::Bytes;
use notesync_protocol::{
    DocId, ErrorCode, ServerFrame, SessionDelete, SessionInsert, Time, Upsert,
};

use super::{Request, Session, SessionOp, WriteError, Writer};
use crate::rooms::{Fanout, Rooms, error_bytes};
use crate::store::{Deleted, DocRecord, InsertCheck, Inserted, MAX_SITE, StoreError, WriteTables};

/// A document as this batch sees it.
pub(super) struct DocEntry {
    pub(super) rec: DocRecord,
    /// `modified` as stored before the batch (None: created in it).
    pub(super) stored_modified: Option<Time>,
    dirty: bool,
}

/// A session's acknowledgement for this batch: frames for it (refusals,
/// deletes it lacks), then the count.
pub(super) struct Ack {
    pub(super) doc: DocId,
    pub(super) session_id: u64,
    pub(super) refusals: Vec<Bytes>,
    pub(super) count: u64,
}

/// What one batch changed, applied after its commit.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) docs: HashMap<DocId, DocEntry>,
    pub(super) fanouts: HashMap<DocId, Fanout>,
    pub(super) acks: Vec<Ack>,
    ack_index: HashMap<u64, usize>,
    /// Documents deleted in this batch, with their deletion time: their
    /// sessions are told and ended after the commit.
    pub(super) deleted: Vec<(DocId, Time)>,
    pub(super) changes: u64,
    pub(super) wrote: bool,
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

    /// A change an upsert made: counted, and sent to every session on
    /// the document (an upsert has no session of its own).
    /// The frame is built only if someone listens: an import's upserts
    /// change thousands of chars that no session is open on.
    fn upserted(&mut self, rooms: &Rooms, doc: DocId, frame: impl FnOnce() -> ServerFrame) {
        self.changes += 1;
        if rooms.has_listeners(doc, None) {
            self.broadcast(rooms, doc, None, frame());
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

/// A new document's record: no site allocated, never deleted or swept.
fn new_record(modified: Time, name_time: Time, name: String) -> DocRecord {
    DocRecord {
        modified,
        name_time,
        next_site: 1,
        deleted: 0,
        swept: 0,
        compacted: 0,
        name,
    }
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
    /// Runs the batch in one write transaction, recording in each request's
    /// reply what was decided for it. Returns what the batch changed and
    /// whether it committed (a batch that changed nothing is not committed).
    pub(super) fn apply(&mut self, requests: &mut [Request]) -> Result<(Batch, bool), StoreError> {
        self.clock.begin_batch();
        let r = self.apply_batch(requests);
        self.clock.end_batch();
        r
    }

    fn apply_batch(&mut self, requests: &mut [Request]) -> Result<(Batch, bool), StoreError> {
        let txn = self.db.begin_write()?;
        let mut batch = Batch::default();
        {
            let mut t = WriteTables::open(&txn)?;
            for r in requests.iter_mut() {
                match r {
                    Request::Upsert {
                        replica,
                        upsert,
                        reply,
                    } => {
                        reply.decided = self.apply_upsert(&mut batch, &mut t, *replica, upsert)?;
                    }
                    Request::Alloc {
                        doc,
                        replica,
                        reply,
                    } => {
                        reply.decided = site_for(&mut batch, &mut t, *doc, *replica)?;
                    }
                    Request::DeleteDoc { doc, reply } => {
                        reply.decided = self.apply_delete_doc(&mut batch, &mut t, *doc)?;
                    }
                    Request::Start {
                        doc,
                        replica,
                        reply,
                        ..
                    } => {
                        reply.decided = self.apply_start(&mut batch, &mut t, *doc, *replica)?;
                    }
                    Request::Op { session, seq, op } => {
                        if !self.rooms.contains(session.doc, session.session_id) {
                            // Killed (slow reader, storage) or gone: it will
                            // re-send on its next session.
                            continue;
                        }
                        if batch.deleted.iter().any(|(d, _)| *d == session.doc) {
                            // Deleted earlier in this batch: the op is not
                            // stored or acked; the session is ended with
                            // the deletion after the commit.
                            continue;
                        }
                        let refusal = if session.read_only {
                            Some(error_bytes(
                                ErrorCode::READ_ONLY,
                                "this token allows reading only: session edits are refused",
                            ))
                        } else {
                            self.apply_op(&mut batch, &mut t, session, op)?
                        };
                        batch.ack(session.doc, session.session_id, *seq, refusal);
                    }
                    // Nothing to store: answered after the commit (`Compact`
                    // never reaches a batch, the loop takes it out).
                    Request::Leave { .. } | Request::Stop | Request::Compact => {}
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
            // Every chunk the batch touched, encoded once.
            t.flush()?;
        }
        let wrote = batch.wrote;
        if wrote {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok((batch, wrote))
    }

    /// A session's start: creates its document if needed and allocates the
    /// replica's site (0: none). A deleted document refuses the session.
    fn apply_start(
        &mut self,
        batch: &mut Batch,
        t: &mut WriteTables<'_>,
        doc: DocId,
        replica: Option<u128>,
    ) -> Result<Result<u8, WriteError>, StoreError> {
        if let Some(e) = Batch::doc(&mut batch.docs, t, doc)?
            && e.rec.deleted != 0
        {
            return Ok(Err(WriteError::Deleted {
                doc,
                at: e.rec.deleted,
            }));
        }
        if Batch::doc(&mut batch.docs, t, doc)?.is_none() {
            // A session creates its document with an empty
            // name that was never set: any upsert's name wins.
            batch.create(doc, new_record(self.clock.next(), 0, String::new()));
        }
        match replica {
            Some(r) => Ok(Ok(site_for(batch, t, doc, r)?)),
            None => Ok(Ok(0)),
        }
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
            // By wire form (one per id: fixed-size levels), borrowed from
            // the frame: no key is built for an id of a new document.
            let mut seen: HashMap<&[u8], &str> = HashMap::with_capacity(u.inserts.len());
            let mut key = Vec::new();
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
                let conflict = match seen.get(a.pid.wire()) {
                    Some(&prev) => prev != a.data,
                    None if exists => {
                        key.clear();
                        a.pid.write_key(&mut key);
                        t.check_insert(u.doc, &key, a.data.as_bytes())? == InsertCheck::Conflict
                    }
                    None => false,
                };
                if conflict {
                    return Ok(Err(WriteError::refused(
                        ErrorCode::ID_CONFLICT,
                        format!("insert {i}: id {:?} already exists with other data", a.pid),
                    )));
                }
                seen.insert(a.pid.wire(), a.data);
            }
        }

        // Valid: apply all of it.
        if !exists {
            let now = self.clock.next();
            batch.create(u.doc, new_record(now, now, u.name.as_str().to_owned()));
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
                    let frame = || ServerFrame::Insert(SessionInsert::new(a.to_atom()));
                    batch.upserted(&self.rooms, u.doc, frame);
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
                batch.upserted(&self.rooms, u.doc, || {
                    ServerFrame::Delete(SessionDelete {
                        site,
                        pid: p.to_pid(),
                    })
                });
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
            batch.upserted(&self.rooms, u.doc, || ServerFrame::Rename(u.name.clone()));
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
    fn apply_op(
        &mut self,
        batch: &mut Batch,
        t: &mut WriteTables<'_>,
        session: &Session,
        op: &SessionOp,
    ) -> Result<Option<Bytes>, StoreError> {
        let Session {
            doc,
            session_id,
            site,
            hello,
            ..
        } = *session;
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
}
