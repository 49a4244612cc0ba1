//! The write path: [`WriteTables`], every table of one write transaction,
//! and the record-level changes the writer makes through it (documents,
//! sites, inserts and deletes of ids, dropping a deleted document's
//! content). Content lives in chunks of runs (`runs`): each chunk a batch
//! touches is decoded once, kept in a cache, and encoded (and split if it
//! grew too big) once, by [`WriteTables::flush`], which the writer calls
//! before it commits. Tombstone compaction, also a write, is in `compact`.
//! The transaction and its commit belong to the writer; nothing here
//! commits.

use std::collections::BTreeMap;

use notesync_protocol::{DocId, Pid, Time};
use redb::{ReadableTable, Table, WriteTransaction};

use super::clock::ServerClock;
use super::error::{StoreError, corrupt};
use super::layout::{
    CHUNK_TIMES, CHUNKS, DOC_TIMES, DOCUMENTS, DocAtoms, DocRecord, META, META_CLOCK, SITES,
    chunk_key, chunk_time_key, site_key, time_key,
};
use super::runs::{CharState, Chunk, Seg, split_pid_key};

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new live atom, at this time.
    New(Time),
    /// The id exists, live, with the same data: nothing changed.
    Unchanged,
    /// The id is deleted on the server (a tombstone that came first, or a
    /// delete since): nothing a client can see changed, but the sender
    /// holds the atom live and must be told of the delete. `stored`:
    /// something was written (never, since schema 4 drops deleted text;
    /// kept so callers need not change).
    Deleted { deleter: u8, stored: bool },
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// A live atom was deleted, or an unknown id recorded as a tombstone.
    New(Time),
    /// Already deleted: the first delete time stays.
    Unchanged,
}

/// Whether an insert could be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertCheck {
    Ok,
    /// The id is live with other data (a deleted id is never a conflict:
    /// its text is gone, PROTOCOL.md 3.1).
    Conflict,
}

/// A chunk decoded in this transaction.
struct Cached {
    chunk: Chunk,
    /// Its `changed` as stored (None: not stored yet).
    stored_changed: Option<Time>,
    dirty: bool,
}

/// An id and the chunk that holds it or would (`None`: the document has
/// no chunk at or before it), as [`WriteTables::locate`] found them.
struct Located {
    doc: DocId,
    group: Vec<u8>,
    ident: u32,
    chunk: Option<Vec<u8>>,
}

/// The tables of one write transaction, and the chunks decoded in it.
pub struct WriteTables<'t> {
    pub(super) meta: Table<'t, &'static str, u64>,
    pub(super) docs: Table<'t, u128, &'static [u8]>,
    pub(super) doc_times: Table<'t, &'static [u8; 24], ()>,
    pub(super) sites: Table<'t, &'static [u8; 32], u8>,
    pub(super) chunks: Table<'t, &'static [u8], &'static [u8]>,
    pub(super) chunk_times: Table<'t, &'static [u8], ()>,
    /// By chunk key. Chunks are never removed from the tables before the
    /// flush (but by `drop_content`, which drops its entries here too),
    /// so the chunk at or before a key is the later of the table's and
    /// the cache's.
    cache: BTreeMap<Vec<u8>, Cached>,
    /// The last lookup of the stored chunk at or before a key, and the
    /// span of keys it answers for: an upsert's run of 2,000 chars asks
    /// 4,000 times for one chunk, and each ask would otherwise be two
    /// B-tree seeks in the table. Valid while the table's chunks do not
    /// change, so everything that writes them clears it.
    span: Option<StoredSpan>,
}

/// Every chunk key of `doc` in [`lo` (or the document's first key), `hi`
/// (or its last)) has `lo` as the stored chunk at or before it (`None`:
/// none stored). `lo` is in the cache.
struct StoredSpan {
    doc: DocId,
    lo: Option<Vec<u8>>,
    hi: Option<Vec<u8>>,
}

impl StoredSpan {
    fn covers(&self, doc: DocId, k: &[u8]) -> bool {
        self.doc == doc
            && self.lo.as_deref().is_none_or(|lo| lo <= k)
            && self.hi.as_deref().is_none_or(|hi| k < hi)
    }
}

impl<'t> WriteTables<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(WriteTables {
            meta: txn.open_table(META)?,
            docs: txn.open_table(DOCUMENTS)?,
            doc_times: txn.open_table(DOC_TIMES)?,
            sites: txn.open_table(SITES)?,
            chunks: txn.open_table(CHUNKS)?,
            chunk_times: txn.open_table(CHUNK_TIMES)?,
            cache: BTreeMap::new(),
            span: None,
        })
    }

    pub fn set_clock(&mut self, t: Time) -> Result<(), StoreError> {
        self.meta.insert(META_CLOCK, t)?;
        Ok(())
    }

    pub fn doc(&self, doc: DocId) -> Result<Option<DocRecord>, StoreError> {
        match self.docs.get(doc)? {
            Some(v) => Ok(Some(DocRecord::decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Writes a document's row; `old_modified` is its stored `modified`
    /// (None if new), whose `doc_times` entry is replaced.
    pub fn put_doc(
        &mut self,
        doc: DocId,
        rec: &DocRecord,
        old_modified: Option<Time>,
    ) -> Result<(), StoreError> {
        self.docs.insert(doc, rec.encode().as_slice())?;
        if old_modified != Some(rec.modified) {
            if let Some(old) = old_modified {
                self.doc_times.remove(&time_key(old, doc))?;
            }
            self.doc_times.insert(&time_key(rec.modified, doc), ())?;
        }
        Ok(())
    }

    pub fn site(&self, doc: DocId, replica: u128) -> Result<Option<u8>, StoreError> {
        Ok(self.sites.get(&site_key(doc, replica))?.map(|v| v.value()))
    }

    /// The first document whose id is `from` or after, in id order.
    pub fn doc_from(&self, from: DocId) -> Result<Option<(DocId, DocRecord)>, StoreError> {
        match self.docs.range(from..)?.next() {
            Some(entry) => {
                let (k, v) = entry?;
                Ok(Some((k.value(), DocRecord::decode(v.value())?)))
            }
            None => Ok(None),
        }
    }

    pub fn put_site(&mut self, doc: DocId, replica: u128, site: u8) -> Result<(), StoreError> {
        self.sites.insert(&site_key(doc, replica), site)?;
        Ok(())
    }

    // ------------------------------------------------------------ chunks

    /// The key of the chunk that holds (or would hold) run key `rk` of
    /// `doc`, loaded into the cache; `None` if the document has no chunk.
    fn chunk_for(&mut self, doc: DocId, rk: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let k = chunk_key(doc, rk);
        let lo = chunk_key(doc, &[]);
        let cached = self
            .cache
            .range::<[u8], _>((
                std::ops::Bound::Included(lo.as_slice()),
                std::ops::Bound::Included(k.as_slice()),
            ))
            .next_back()
            .map(|(k, _)| k.clone());
        let stored = match &self.span {
            Some(span) if span.covers(doc, &k) => span.lo.clone(),
            _ => self.stored_at_or_before(doc, &lo, &k)?,
        };
        Ok(match (cached, stored) {
            (Some(c), Some(s)) if c >= s => Some(c),
            (_, Some(s)) => Some(s),
            (c, None) => c,
        })
    }

    /// The stored chunk at or before `k` (loaded into the cache), with
    /// the span it answers for remembered.
    fn stored_at_or_before(
        &mut self,
        doc: DocId,
        lo: &[u8],
        k: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let stored = match self.chunks.range::<&[u8]>(lo..=k)?.next_back() {
            Some(e) => {
                let (key, v) = e?;
                let key = key.value().to_vec();
                if !self.cache.contains_key(&key) {
                    let chunk = Chunk::decode(v.value())?;
                    let stored_changed = Some(chunk.changed);
                    self.cache.insert(
                        key.clone(),
                        Cached {
                            chunk,
                            stored_changed,
                            dirty: false,
                        },
                    );
                }
                Some(key)
            }
            None => None,
        };
        let hi = match self
            .chunks
            .range::<&[u8]>((std::ops::Bound::Excluded(k), std::ops::Bound::Unbounded))?
            .next()
        {
            Some(e) => {
                let key = e?.0.value().to_vec();
                (super::layout::split_doc_key(&key).map(|(d, _)| d) == Some(doc)).then_some(key)
            }
            None => None,
        };
        self.span = Some(StoredSpan {
            doc,
            lo: stored.clone(),
            hi,
        });
        Ok(stored)
    }

    /// Finds the chunk that holds (or would hold) an id: done once per id
    /// and used for both its lookup and its write.
    fn locate(&mut self, doc: DocId, pid_key: &[u8]) -> Result<Located, StoreError> {
        let (group, ident) =
            split_pid_key(pid_key).ok_or(corrupt("chunks", "not a position id"))?;
        let rk = super::runs::run_key(&group, ident);
        let chunk = self.chunk_for(doc, &rk)?;
        Ok(Located {
            doc,
            group,
            ident,
            chunk,
        })
    }

    /// What a located id holds (None: nothing, not even a tombstone).
    fn state_at(&self, at: &Located) -> Option<CharState> {
        let ck = at.chunk.as_ref()?;
        self.cache
            .get(ck)
            .and_then(|c| c.chunk.state(&at.group, at.ident))
    }

    /// What the id holds (None: nothing, not even a tombstone).
    pub(super) fn state(
        &mut self,
        doc: DocId,
        pid_key: &[u8],
    ) -> Result<Option<CharState>, StoreError> {
        let at = self.locate(doc, pid_key)?;
        Ok(self.state_at(&at))
    }

    /// The chunk a located id goes into, marked dirty; created (as the
    /// document's first) if the document had none when it was located --
    /// unless an earlier write created it since.
    fn chunk_at(&mut self, at: &Located) -> Result<&mut Chunk, StoreError> {
        let ck = match &at.chunk {
            Some(ck) => ck.clone(),
            None => chunk_key(at.doc, &[]),
        };
        let c = self.cache.entry(ck).or_insert_with(|| Cached {
            chunk: Chunk::default(),
            stored_changed: None,
            dirty: true,
        });
        c.dirty = true;
        Ok(&mut c.chunk)
    }

    pub(super) fn put_char(
        &mut self,
        doc: DocId,
        pid_key: &[u8],
        seg: Seg,
    ) -> Result<(), StoreError> {
        let at = self.locate(doc, pid_key)?;
        self.put_char_at(&at, seg)
    }

    fn put_char_at(&mut self, at: &Located, seg: Seg) -> Result<(), StoreError> {
        self.chunk_at(at)?.put_char(&at.group, at.ident, seg);
        Ok(())
    }

    /// Writes every chunk changed in this transaction (split where it grew
    /// too big) and its `chunk_times` entry. The writer calls it before
    /// it commits; changes made without it are lost.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.span = None;
        let cache = std::mem::take(&mut self.cache);
        for (key, c) in cache {
            if !c.dirty {
                continue;
            }
            let (doc, _) =
                super::layout::split_doc_key(&key).ok_or(corrupt("chunks", "short key"))?;
            let rk = &key[16..];
            if let Some(old) = c.stored_changed {
                self.chunk_times
                    .remove(chunk_time_key(doc, old, rk).as_slice())?;
            }
            if c.chunk.items.is_empty() {
                self.chunks.remove(key.as_slice())?;
                continue;
            }
            for (i, part) in c.chunk.split_to_fit().into_iter().enumerate() {
                let part_rk = if i == 0 {
                    rk.to_vec()
                } else {
                    part.items[0].key()
                };
                self.chunks.insert(
                    chunk_key(doc, &part_rk).as_slice(),
                    part.encode().as_slice(),
                )?;
                self.chunk_times
                    .insert(chunk_time_key(doc, part.changed, &part_rk).as_slice(), ())?;
            }
        }
        Ok(())
    }

    /// Stores a chunk as compaction left it: same key, same `changed`.
    pub(super) fn rewrite_chunk(&mut self, key: &[u8], chunk: Chunk) -> Result<(), StoreError> {
        self.cache.insert(
            key.to_vec(),
            Cached {
                stored_changed: Some(chunk.changed),
                chunk,
                dirty: true,
            },
        );
        Ok(())
    }

    // ------------------------------------------------------------ ids

    /// Whether inserting `data` at this id would be accepted.
    pub fn check_insert(
        &mut self,
        doc: DocId,
        pid_key: &[u8],
        data: &[u8],
    ) -> Result<InsertCheck, StoreError> {
        Ok(match self.state(doc, pid_key)? {
            Some(s) if s.delete == 0 && s.insert != 0 && s.text != data => InsertCheck::Conflict,
            _ => InsertCheck::Ok,
        })
    }

    /// Inserts an atom (the caller checked it with
    /// [`check_insert`](Self::check_insert)). Takes a time from `clock`
    /// only if something changes.
    pub fn insert_atom(
        &mut self,
        doc: DocId,
        pid_key: &[u8],
        data: &[u8],
        clock: &mut ServerClock,
    ) -> Result<Inserted, StoreError> {
        match self.insert_checked(doc, pid_key, data, clock)? {
            Some(i) => Ok(i),
            None => Err(corrupt(
                "chunks",
                "insert of a conflicting id was not checked",
            )),
        }
    }

    /// [`check_insert`](Self::check_insert) then
    /// [`insert_atom`](Self::insert_atom) with one lookup instead of two
    /// (a session insert's hot path): `None`, and nothing written, if the
    /// id is live with other data.
    pub fn insert_checked(
        &mut self,
        doc: DocId,
        pid_key: &[u8],
        data: &[u8],
        clock: &mut ServerClock,
    ) -> Result<Option<Inserted>, StoreError> {
        let at = self.locate(doc, pid_key)?;
        let existing = self.state_at(&at);
        self.insert_at(&at, data, existing, || clock.next())
    }

    /// The insert, given what the id holds; `time` is called only if
    /// something changes.
    fn insert_at(
        &mut self,
        at: &Located,
        data: &[u8],
        existing: Option<CharState>,
        time: impl FnOnce() -> Time,
    ) -> Result<Option<Inserted>, StoreError> {
        match existing {
            None => {
                let t = time();
                self.put_new(at, data, t)?;
                Ok(Some(Inserted::New(t)))
            }
            Some(s) if s.delete != 0 || s.insert == 0 => Ok(Some(Inserted::Deleted {
                deleter: s.deleter,
                stored: false,
            })),
            Some(s) if s.text == data => Ok(Some(Inserted::Unchanged)),
            Some(_) => Ok(None),
        }
    }

    /// Stores a new live atom at an id nothing covers: a run's char if it
    /// is one char, an atom record otherwise.
    fn put_new(&mut self, at: &Located, data: &[u8], t: Time) -> Result<(), StoreError> {
        let one_char = std::str::from_utf8(data)
            .map_err(|_| corrupt("chunks", "inserted data is not UTF-8"))?
            .chars()
            .nth(1)
            .is_none();
        if one_char {
            self.put_char_at(
                at,
                Seg {
                    len: 1,
                    ins: t,
                    ins_step: 0,
                    del: 0,
                    del_step: 0,
                    deleter: 0,
                    text: data.to_vec(),
                },
            )
        } else {
            self.chunk_at(at)?.put_atom(&at.group, at.ident, t, data);
            Ok(())
        }
    }

    /// Stores a live multi-char atom at an id nothing covers.
    pub(super) fn put_atom_item(
        &mut self,
        doc: DocId,
        pid_key: &[u8],
        t: Time,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let at = self.locate(doc, pid_key)?;
        self.chunk_at(&at)?.put_atom(&at.group, at.ident, t, data);
        Ok(())
    }

    /// Inserts a run: the one-char atoms of `text` at `first`, `first`+1,
    /// ... (PROTOCOL.md, version 3 runs), all new ones at one time taken
    /// from `clock`. Returns, per char in order, what its insert did;
    /// `None` (and nothing written) if one of its ids is live with other
    /// data. Costs one lookup per char in decoded chunks; what it stores
    /// is one segment where the ids were free.
    // Called by the version 3 apply rules (session_insert_run, upserts
    // with runs) once the wire carries runs (issue 12, WIRE).
    #[allow(dead_code)]
    pub fn insert_run(
        &mut self,
        doc: DocId,
        first: &Pid,
        text: &str,
        clock: &mut ServerClock,
    ) -> Result<Option<Vec<Inserted>>, StoreError> {
        let mut ids = Vec::new();
        for (j, c) in (0u32..).zip(text.chars()) {
            let pid = first
                .offset(j)
                .ok_or(corrupt("chunks", "a run's ids overflow u32"))?;
            let mut b = [0u8; 4];
            let data = c.encode_utf8(&mut b).as_bytes().to_vec();
            let loc = self.locate(doc, pid.key())?;
            let state = self.state_at(&loc);
            if state
                .as_ref()
                .is_some_and(|s| s.delete == 0 && s.insert != 0 && s.text != data)
            {
                return Ok(None);
            }
            ids.push((loc, data, state));
        }
        let mut at = None;
        let mut out = Vec::with_capacity(ids.len());
        for (loc, data, state) in ids {
            let r = self.insert_at(&loc, &data, state, || {
                *at.get_or_insert_with(|| clock.next())
            })?;
            out.push(r.ok_or(corrupt("chunks", "a run's id changed while inserting it"))?);
        }
        Ok(Some(out))
    }

    /// Deletes an atom, or records a tombstone for an unknown id.
    /// `deleter` is the sender's site (0: none).
    pub fn delete_atom(
        &mut self,
        doc: DocId,
        pid_key: &[u8],
        deleter: u8,
        clock: &mut ServerClock,
    ) -> Result<Deleted, StoreError> {
        let at = self.locate(doc, pid_key)?;
        let state = self.state_at(&at);
        self.delete_at(&at, deleter, state, || clock.next())
    }

    fn delete_at(
        &mut self,
        at: &Located,
        deleter: u8,
        state: Option<CharState>,
        time: impl FnOnce() -> Time,
    ) -> Result<Deleted, StoreError> {
        let ins = match state {
            Some(s) if s.delete != 0 => return Ok(Deleted::Unchanged),
            Some(s) => s.insert,
            None => 0,
        };
        let t = time();
        self.put_char_at(
            at,
            Seg {
                len: 1,
                ins,
                ins_step: 0,
                del: t,
                del_step: 0,
                deleter,
                text: Vec::new(),
            },
        )?;
        Ok(Deleted::New(t))
    }

    /// Deletes the `count` ids from `first` (a range), all new deletes at
    /// one time. Returns, per id in order, what its delete did.
    #[allow(dead_code)]
    pub fn delete_range(
        &mut self,
        doc: DocId,
        first: &Pid,
        count: u32,
        deleter: u8,
        clock: &mut ServerClock,
    ) -> Result<Vec<Deleted>, StoreError> {
        let mut at = None;
        let mut out = Vec::new();
        for j in 0..count {
            let pid = first
                .offset(j)
                .ok_or(corrupt("chunks", "a range's ids overflow u32"))?;
            let loc = self.locate(doc, pid.key())?;
            let state = self.state_at(&loc);
            out.push(self.delete_at(&loc, deleter, state, || {
                *at.get_or_insert_with(|| clock.next())
            })?);
        }
        Ok(out)
    }

    /// Drops a deleted document's chunks, their index and its sites (its
    /// record stays). Cost: O(its chunks), in the deleting transaction.
    pub fn drop_content(&mut self, doc: DocId) -> Result<(), StoreError> {
        let range = DocAtoms::new(doc);
        self.span = None;
        self.cache
            .retain(|k, _| super::layout::split_doc_key(k).is_none_or(|(d, _)| d != doc));
        self.chunks
            .retain_in::<&[u8], _>(range.bounds(), |_, _| false)?;
        self.chunk_times
            .retain_in::<&[u8], _>(range.bounds(), |_, _| false)?;
        let (slo, shi) = (site_key(doc, 0), site_key(doc, u128::MAX));
        self.sites
            .retain_in::<&[u8; 32], _>(&slo..=&shi, |_, _| false)?;
        Ok(())
    }
}

/// Writes no correct writer makes, for tests that damage a database on
/// purpose (a check must find it; an open must refuse it).
#[cfg(test)]
impl WriteTables<'_> {
    pub(crate) fn set_schema_version(&mut self, version: u64) -> Result<(), StoreError> {
        self.meta.insert(super::layout::META_SCHEMA, version)?;
        Ok(())
    }

    /// Stores a chunk row as given, without its `chunk_times` entry.
    pub(crate) fn put_raw_chunk(
        &mut self,
        doc: DocId,
        run_key: &[u8],
        value: &[u8],
    ) -> Result<(), StoreError> {
        self.span = None;
        self.chunks
            .insert(chunk_key(doc, run_key).as_slice(), value)?;
        Ok(())
    }

    /// Removes the first `doc_times` entry.
    pub(crate) fn remove_first_doc_time(&mut self) -> Result<(), StoreError> {
        self.doc_times.pop_first()?;
        Ok(())
    }

    /// Removes the first `chunk_times` entry.
    pub(crate) fn remove_first_chunk_time(&mut self) -> Result<(), StoreError> {
        self.chunk_times.pop_first()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Snapshot;
    use crate::store::tests::{DOC, pid, pull, with_doc, write};

    #[test]
    fn inserts_are_idempotent_and_conflicts_detected() {
        let (_d, o, mut clock) = with_doc();
        let p = pid(1, 1);
        let first = write(&o.db, |t| {
            t.insert_atom(DOC, p.key(), b"a", &mut clock).expect("ins")
        });
        assert!(matches!(first, Inserted::New(_)));
        write(&o.db, |t| {
            assert_eq!(
                t.check_insert(DOC, p.key(), b"a").expect("check"),
                InsertCheck::Ok
            );
            assert_eq!(
                t.insert_atom(DOC, p.key(), b"a", &mut clock).expect("ins"),
                Inserted::Unchanged
            );
            assert_eq!(
                t.check_insert(DOC, p.key(), b"b").expect("check"),
                InsertCheck::Conflict
            );
        });
        // Deletes are idempotent: the first delete time stays.
        let d1 = write(&o.db, |t| {
            t.delete_atom(DOC, p.key(), 2, &mut clock).expect("del")
        });
        let d2 = write(&o.db, |t| {
            t.delete_atom(DOC, p.key(), 2, &mut clock).expect("del")
        });
        let Deleted::New(t1) = d1 else {
            panic!("first delete changed nothing")
        };
        assert_eq!(d2, Deleted::Unchanged);
        let snap = Snapshot::begin(&o.db).expect("snap");
        assert_eq!(snap.atom(DOC, &p).expect("atom").expect("some").delete, t1);
        // A deleted id's text is gone: other data is no conflict, it is
        // answered with the delete (PROTOCOL.md 3.1).
        write(&o.db, |t| {
            assert_eq!(
                t.check_insert(DOC, p.key(), b"b").expect("check"),
                InsertCheck::Ok
            );
            assert_eq!(
                t.insert_atom(DOC, p.key(), b"b", &mut clock).expect("ins"),
                Inserted::Deleted {
                    deleter: 2,
                    stored: false
                }
            );
        });
    }

    #[test]
    fn tombstone_before_insert_stays_deleted() {
        let (_d, o, mut clock) = with_doc();
        let p = pid(7, 3);
        let before = clock.last();
        let d = write(&o.db, |t| {
            t.delete_atom(DOC, p.key(), 2, &mut clock).expect("del")
        });
        assert!(matches!(d, Deleted::New(_)));
        let i = write(&o.db, |t| {
            t.insert_atom(DOC, p.key(), b"late", &mut clock)
                .expect("ins")
        });
        assert_eq!(
            i,
            Inserted::Deleted {
                deleter: 2,
                stored: false
            }
        );
        // Same data again: still deleted; other data: no conflict (a
        // tombstone keeps no text).
        write(&o.db, |t| {
            assert_eq!(
                t.insert_atom(DOC, p.key(), b"late", &mut clock)
                    .expect("ins"),
                Inserted::Deleted {
                    deleter: 2,
                    stored: false
                }
            );
            assert_eq!(
                t.check_insert(DOC, p.key(), b"other").expect("check"),
                InsertCheck::Ok
            );
        });
        // Never sent as live; sent as a delete to anyone who synced before
        // the tombstone, from the change index and from the full scan.
        assert_eq!(pull(&o.db, before), (vec![], vec![p.clone()]));
        assert_eq!(pull(&o.db, 0), (vec![], vec![p.clone()]));
        assert_eq!(pull(&o.db, clock.last()), (vec![], vec![]));
    }

    #[test]
    fn dropping_a_deleted_documents_content_leaves_other_documents() {
        let (_d, o, mut clock) = with_doc();
        const OTHER: DocId = DOC + 1;
        const BEFORE: DocId = DOC - 1;
        write(&o.db, |t| {
            for d in [BEFORE, DOC, OTHER] {
                t.insert_atom(d, pid(1, 1).key(), b"a", &mut clock)
                    .expect("ins");
                t.delete_atom(d, pid(2, 1).key(), 1, &mut clock)
                    .expect("del");
                t.put_site(d, 9, 1).expect("site");
            }
            t.set_clock(clock.last()).expect("clock");
        });
        write(&o.db, |t| t.drop_content(DOC).expect("drop"));
        let snap = Snapshot::begin(&o.db).expect("snap");
        assert_eq!(snap.atom(DOC, &pid(1, 1)).expect("atom"), None);
        assert_eq!(snap.atom(DOC, &pid(2, 1)).expect("atom"), None);
        assert_eq!(snap.site(DOC, 9).expect("site"), None);
        assert_eq!(pull(&o.db, 1), (vec![], vec![]));
        for d in [BEFORE, OTHER] {
            assert!(snap.atom(d, &pid(1, 1)).expect("atom").is_some());
            assert_eq!(snap.site(d, 9).expect("site"), Some(1));
            let index = snap.txn.open_table(CHUNK_TIMES).expect("chunk_times");
            let range = DocAtoms::new(d);
            let n = index.range::<&[u8]>(range.bounds()).expect("range").count();
            assert_eq!(n, 1, "document {d:x} keeps its chunk index");
        }
        // The record stays (the writer keeps it, with its deletion time).
        assert!(snap.doc(DOC).expect("doc").is_some());
    }
}

/// Random batches of every kind of write against a model that keeps a
/// record per id (schema 3's semantics less deleted text): every pull since
/// every time, under both rules, is the model's. Chunks split (many ids),
/// runs merge and split, multi-char atoms turn into deleted chars.
#[cfg(test)]
mod model_tests {
    use std::collections::BTreeMap;

    use notesync_protocol::{Level, Pid, Time};

    use super::*;
    use crate::store::Rule;
    use crate::store::tests::{Collected, DOC, with_doc, write};

    #[derive(Clone, Copy)]
    struct Rec {
        insert: Time,
        delete: Time,
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn pid_for(r: &mut Rng) -> Pid {
        let ident = r.below(700) as u32;
        match r.below(4) {
            0 => Pid::from_levels(&[Level::new(5, 1), Level::new(ident, 2)]),
            1 => Pid::from_levels(&[Level::new(ident, 3)]),
            _ => Pid::from_levels(&[Level::new(ident, 1)]),
        }
    }

    fn model_pull(
        m: &BTreeMap<Vec<u8>, (Rec, String)>,
        since: Time,
        rule: Rule,
    ) -> (Vec<(String, Pid)>, Vec<Pid>) {
        let (mut ins, mut del) = (Vec::new(), Vec::new());
        for (k, (r, text)) in m {
            let pid = Pid::from_key(k).expect("pid");
            if r.delete == 0 {
                if r.insert > since {
                    ins.push((text.clone(), pid));
                }
            } else if r.delete > since && (r.insert <= since || rule == Rule::Session) {
                del.push(pid);
            }
        }
        ins.sort();
        del.sort();
        (ins, del)
    }

    #[test]
    fn every_pull_is_the_models_after_random_batches() {
        for seed in 1..=4u64 {
            let (_d, o, mut clock) = with_doc();
            let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut m: BTreeMap<Vec<u8>, (Rec, String)> = BTreeMap::new();
            let mut times = vec![0, clock.last()];
            for _batch in 0..40 {
                let n = 1 + r.below(60);
                write(&o.db, |t| {
                    for _ in 0..n {
                        let p = pid_for(&mut r);
                        match r.below(10) {
                            0..=3 => {
                                let data = ["a", "é", "€", "𝄞"][r.below(4) as usize];
                                let data = if r.below(8) == 0 { "multi" } else { data };
                                let check = t
                                    .check_insert(DOC, p.key(), data.as_bytes())
                                    .expect("check");
                                let live_other = m.get(p.key()).is_some_and(|(rec, txt)| {
                                    rec.delete == 0 && rec.insert != 0 && txt != data
                                });
                                assert_eq!(check == InsertCheck::Conflict, live_other);
                                if live_other {
                                    continue;
                                }
                                let got = t
                                    .insert_atom(DOC, p.key(), data.as_bytes(), &mut clock)
                                    .expect("ins");
                                match m.get(p.key()) {
                                    None => {
                                        let Inserted::New(at) = got else {
                                            panic!("{got:?}")
                                        };
                                        m.insert(
                                            p.key().to_vec(),
                                            (
                                                Rec {
                                                    insert: at,
                                                    delete: 0,
                                                },
                                                data.into(),
                                            ),
                                        );
                                    }
                                    Some((rec, _)) if rec.delete != 0 => {
                                        assert!(
                                            matches!(got, Inserted::Deleted { stored: false, .. }),
                                            "{got:?}"
                                        );
                                    }
                                    Some(_) => assert_eq!(got, Inserted::Unchanged),
                                }
                            }
                            4..=6 => {
                                let got = t.delete_atom(DOC, p.key(), 1, &mut clock).expect("del");
                                match m.get_mut(p.key()) {
                                    Some((rec, _)) if rec.delete != 0 => {
                                        assert_eq!(got, Deleted::Unchanged)
                                    }
                                    Some((rec, txt)) => {
                                        let Deleted::New(at) = got else {
                                            panic!("{got:?}")
                                        };
                                        rec.delete = at;
                                        txt.clear();
                                    }
                                    None => {
                                        let Deleted::New(at) = got else {
                                            panic!("{got:?}")
                                        };
                                        m.insert(
                                            p.key().to_vec(),
                                            (
                                                Rec {
                                                    insert: 0,
                                                    delete: at,
                                                },
                                                String::new(),
                                            ),
                                        );
                                    }
                                }
                            }
                            7 | 8 => {
                                let len = 1 + r.below(12) as usize;
                                let text: String =
                                    "xyzé€abcdefgh".chars().cycle().take(len).collect();
                                let before = m.clone();
                                let got = t.insert_run(DOC, &p, &text, &mut clock).expect("run");
                                let chars: Vec<char> = text.chars().collect();
                                let conflict = (0..len).any(|j| {
                                    let q = p.offset(j as u32).expect("id");
                                    before.get(q.key()).is_some_and(|(rec, txt)| {
                                        rec.delete == 0
                                            && rec.insert != 0
                                            && *txt != chars[j].to_string()
                                    })
                                });
                                let Some(got) = got else {
                                    assert!(conflict);
                                    continue;
                                };
                                assert!(!conflict);
                                for (j, g) in got.into_iter().enumerate() {
                                    let q = p.offset(j as u32).expect("id");
                                    if let Inserted::New(at) = g {
                                        assert!(!before.contains_key(q.key()));
                                        m.insert(
                                            q.key().to_vec(),
                                            (
                                                Rec {
                                                    insert: at,
                                                    delete: 0,
                                                },
                                                chars[j].to_string(),
                                            ),
                                        );
                                    } else {
                                        assert!(before.contains_key(q.key()), "{g:?}");
                                    }
                                }
                            }
                            _ => {
                                let count = 1 + r.below(30) as u32;
                                let got = t
                                    .delete_range(DOC, &p, count, 2, &mut clock)
                                    .expect("range");
                                for (j, g) in got.into_iter().enumerate() {
                                    let q = p.offset(j as u32).expect("id");
                                    match (m.get_mut(q.key()), g) {
                                        (Some((rec, _)), Deleted::Unchanged) => {
                                            assert!(rec.delete != 0)
                                        }
                                        (Some((rec, txt)), Deleted::New(at)) => {
                                            assert_eq!(rec.delete, 0);
                                            rec.delete = at;
                                            txt.clear();
                                        }
                                        (None, Deleted::New(at)) => {
                                            m.insert(
                                                q.key().to_vec(),
                                                (
                                                    Rec {
                                                        insert: 0,
                                                        delete: at,
                                                    },
                                                    String::new(),
                                                ),
                                            );
                                        }
                                        (None, Deleted::Unchanged) => {
                                            panic!("an unknown id was already deleted")
                                        }
                                    }
                                }
                            }
                        }
                    }
                    t.set_clock(clock.last()).expect("clock");
                });
                times.push(clock.last());
            }
            // Every batch's end, and a sample of the times at which something
            // happened with one each side (all of them make the test slow).
            let mut sinces: Vec<Time> = m
                .values()
                .flat_map(|(rec, _)| [rec.insert, rec.delete])
                .filter(|t| *t % 11 == seed % 11)
                .flat_map(|t| [t.saturating_sub(1), t, t + 1])
                .chain(times.iter().copied())
                .collect();
            sinces.sort();
            sinces.dedup();
            let snap = crate::store::Snapshot::begin(&o.db).expect("snap");
            let chunks = snap.txn.open_table(super::CHUNKS).expect("chunks");
            use redb::ReadableTableMetadata;
            assert!(
                chunks.len().expect("len") > 1,
                "seed {seed}: the chunks split"
            );
            for since in sinces {
                // Since 0 is a full state under either rule (a session's
                // cursor is never 0).
                let rules: &[Rule] = if since == 0 {
                    &[Rule::Pull]
                } else {
                    &[Rule::Pull, Rule::Session]
                };
                for &rule in rules {
                    let mut out = Collected::default();
                    snap.delta(DOC, since, rule, None, &mut out).expect("delta");
                    out.inserts.sort();
                    out.deletes.sort();
                    let (ins, del) = model_pull(&m, since, rule);
                    if out.inserts == ins && out.deletes == del {
                        continue;
                    }
                    let extra: Vec<_> = out.inserts.iter().filter(|x| !ins.contains(x)).collect();
                    let missing: Vec<_> = ins.iter().filter(|x| !out.inserts.contains(x)).collect();
                    let dextra: Vec<_> = out.deletes.iter().filter(|x| !del.contains(x)).collect();
                    let dmissing: Vec<_> =
                        del.iter().filter(|x| !out.deletes.contains(x)).collect();
                    panic!(
                        "seed {seed}, since {since}, {rule:?}: inserts extra {extra:?} missing {missing:?}; \
                         deletes extra {dextra:?} missing {dmissing:?}"
                    );
                }
            }
            crate::store::tests::assert_layout_ok(&snap.txn);
            drop((chunks, snap));

            // Compaction with a cutoff in the middle, in small steps: the
            // full state loses exactly the old deletes (but bare tombstones
            // under a live parent), deltas since `compacted` are unchanged.
            let cutoff = times[times.len() / 2];
            let later: Vec<Time> = times.iter().copied().filter(|t| *t >= cutoff).collect();
            let before: Vec<_> = later
                .iter()
                .map(|&t| crate::store::tests::pull(&o.db, t))
                .collect();
            let (mut from, mut compacted) = (0, 0);
            loop {
                let step = write(&o.db, |t| {
                    t.compact_doc(DOC, from, cutoff, 3).expect("compact")
                });
                compacted = compacted.max(step.compacted);
                from = step.swept;
                if step.done {
                    break;
                }
            }
            assert!(
                compacted > 0 && compacted <= cutoff,
                "seed {seed}: something was dropped"
            );
            let live_parent = |k: &[u8]| {
                k.len() > 5
                    && m.get(&k[..k.len() - 5])
                        .is_some_and(|(r, _)| r.insert != 0 && r.delete == 0)
            };
            let kept: BTreeMap<Vec<u8>, (Rec, String)> = m
                .iter()
                .filter(|(k, (r, _))| {
                    r.delete == 0 || r.delete > cutoff || (r.insert == 0 && live_parent(k))
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let mut full = crate::store::tests::pull(&o.db, 0);
            full.0.sort();
            full.1.sort();
            // The live text is whole; every tombstone the full state needs
            // stays; the others may stay too (a chunk changed after the
            // cutoff is looked at again by a later pass).
            let want = model_pull(&kept, 0, Rule::Pull);
            let all = model_pull(&m, 0, Rule::Pull);
            assert_eq!(full.0, want.0, "seed {seed}: live text after compaction");
            let lost: Vec<_> = want.1.iter().filter(|x| !full.1.contains(x)).collect();
            assert!(
                lost.is_empty(),
                "seed {seed}: needed tombstones dropped: {lost:?}"
            );
            let made: Vec<_> = full.1.iter().filter(|x| !all.1.contains(x)).collect();
            assert!(
                made.is_empty(),
                "seed {seed}: tombstones from nowhere: {made:?}"
            );
            assert!(
                full.1.len() < all.1.len(),
                "seed {seed}: no tombstone of the full state was dropped"
            );
            for (t, b) in later.iter().zip(before) {
                if *t >= compacted {
                    let mut a = crate::store::tests::pull(&o.db, *t);
                    let mut b = b;
                    a.0.sort();
                    a.1.sort();
                    b.0.sort();
                    b.1.sort();
                    assert_eq!(a, b, "seed {seed}: delta since {t} after compaction");
                }
            }
            let snap = crate::store::Snapshot::begin(&o.db).expect("snap");
            crate::store::tests::assert_layout_ok(&snap.txn);
        }
    }
}
