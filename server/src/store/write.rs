//! The write path: [`WriteTables`], every table of one write transaction,
//! and the record-level changes the writer makes through it (documents,
//! sites, atom inserts and deletes, dropping a deleted document's content).
//! Tombstone compaction, also a write, is in `compact`. The transaction
//! and its commit belong to the writer; nothing here commits.

use notesync_protocol::{DocId, Time};
use redb::{ReadableTable, Table, WriteTransaction};

use super::clock::ServerClock;
use super::error::{StoreError, corrupt};
use super::layout::{
    ATOMS, AtomRecord, CHANGES, ChangeEntry, ChangeKind, DOC_TIMES, DOCUMENTS, DocAtoms, DocRecord,
    META, META_CLOCK, SITES, atom_key, change_key, site_key, time_key,
};

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new live atom, at this time.
    New(Time),
    /// The id exists, live, with the same data: nothing changed.
    Unchanged,
    /// The id is deleted on the server (a tombstone that came first, or a
    /// delete since): nothing a client can see changed, but the sender
    /// holds the atom live and must be told of the delete. `stored`: its
    /// data was stored now (it was a bare tombstone).
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
    /// The id exists with other data.
    Conflict,
}

/// The tables of one write transaction.
pub struct WriteTables<'t> {
    pub(super) meta: Table<'t, &'static str, u64>,
    pub(super) docs: Table<'t, u128, &'static [u8]>,
    pub(super) doc_times: Table<'t, &'static [u8; 24], ()>,
    pub(super) sites: Table<'t, &'static [u8; 32], u8>,
    pub(super) atoms: Table<'t, &'static [u8], &'static [u8]>,
    pub(super) changes: Table<'t, &'static [u8; 24], &'static [u8]>,
}

impl<'t> WriteTables<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(WriteTables {
            meta: txn.open_table(META)?,
            docs: txn.open_table(DOCUMENTS)?,
            doc_times: txn.open_table(DOC_TIMES)?,
            sites: txn.open_table(SITES)?,
            atoms: txn.open_table(ATOMS)?,
            changes: txn.open_table(CHANGES)?,
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

    pub fn atom(&self, doc: DocId, pid_key: &[u8]) -> Result<Option<AtomRecord>, StoreError> {
        self.atom_at(&atom_key(doc, pid_key))
    }

    /// Whether inserting `data` at this id would be accepted.
    pub fn check_insert(
        &self,
        doc: DocId,
        pid_key: &[u8],
        data: &[u8],
    ) -> Result<InsertCheck, StoreError> {
        Ok(match self.atom(doc, pid_key)? {
            Some(rec) if !rec.data.is_empty() && rec.data != data => InsertCheck::Conflict,
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
        let key = atom_key(doc, pid_key);
        let existing = self.atom_at(&key)?;
        self.insert_found(doc, &key, pid_key, data, existing, clock)
    }

    /// [`check_insert`](Self::check_insert) then
    /// [`insert_atom`](Self::insert_atom) with one lookup instead of two
    /// (a session insert's hot path): `None`, and nothing written, if the
    /// id exists with other data.
    pub fn insert_checked(
        &mut self,
        doc: DocId,
        pid_key: &[u8],
        data: &[u8],
        clock: &mut ServerClock,
    ) -> Result<Option<Inserted>, StoreError> {
        let key = atom_key(doc, pid_key);
        let existing = self.atom_at(&key)?;
        if existing
            .as_ref()
            .is_some_and(|rec| !rec.data.is_empty() && rec.data != data)
        {
            return Ok(None);
        }
        self.insert_found(doc, &key, pid_key, data, existing, clock)
            .map(Some)
    }

    /// The atom stored at an `atoms` key.
    fn atom_at(&self, key: &[u8]) -> Result<Option<AtomRecord>, StoreError> {
        match self.atoms.get(key)? {
            Some(v) => Ok(Some(AtomRecord::decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// The insert, given what the atoms table holds at `key`.
    fn insert_found(
        &mut self,
        doc: DocId,
        key: &[u8],
        pid_key: &[u8],
        data: &[u8],
        existing: Option<AtomRecord>,
        clock: &mut ServerClock,
    ) -> Result<Inserted, StoreError> {
        match existing {
            None => {
                let t = clock.next();
                let rec = AtomRecord {
                    insert: t,
                    delete: 0,
                    deleter: 0,
                    data: data.to_vec(),
                };
                self.atoms.insert(key, rec.encode().as_slice())?;
                self.put_change(doc, t, ChangeKind::Insert, pid_key)?;
                Ok(Inserted::New(t))
            }
            Some(rec) if rec.data.is_empty() => {
                // Deleted before it arrived: keep the data (so a different
                // re-use of the id is still a conflict), but it stays a
                // tombstone and gets no insert time.
                let deleter = rec.deleter;
                let rec = AtomRecord {
                    data: data.to_vec(),
                    ..rec
                };
                self.atoms.insert(key, rec.encode().as_slice())?;
                Ok(Inserted::Deleted {
                    deleter,
                    stored: true,
                })
            }
            Some(rec) if rec.data == data && rec.delete != 0 => Ok(Inserted::Deleted {
                deleter: rec.deleter,
                stored: false,
            }),
            Some(rec) if rec.data == data => Ok(Inserted::Unchanged),
            Some(_) => Err(corrupt(
                "atoms",
                "insert of a conflicting id was not checked",
            )),
        }
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
        let key = atom_key(doc, pid_key);
        let rec = match self.atom_at(&key)? {
            Some(rec) if rec.delete != 0 => return Ok(Deleted::Unchanged),
            Some(rec) => rec,
            None => AtomRecord {
                insert: 0,
                delete: 0,
                deleter: 0,
                data: Vec::new(),
            },
        };
        let t = clock.next();
        let rec = AtomRecord {
            delete: t,
            deleter,
            ..rec
        };
        self.atoms.insert(key.as_slice(), rec.encode().as_slice())?;
        self.put_change(doc, t, ChangeKind::Delete, pid_key)?;
        Ok(Deleted::New(t))
    }

    /// Drops a deleted document's atoms, change index and sites (its record
    /// stays). Cost: O(its atoms), in the deleting transaction.
    pub fn drop_content(&mut self, doc: DocId) -> Result<(), StoreError> {
        let range = DocAtoms::new(doc);
        self.atoms
            .retain_in::<&[u8], _>(range.bounds(), |_, _| false)?;
        let (clo, chi) = (change_key(doc, 0), change_key(doc, Time::MAX));
        self.changes
            .retain_in::<&[u8; 24], _>(&clo..=&chi, |_, _| false)?;
        let (slo, shi) = (site_key(doc, 0), site_key(doc, u128::MAX));
        self.sites
            .retain_in::<&[u8; 32], _>(&slo..=&shi, |_, _| false)?;
        Ok(())
    }

    fn put_change(
        &mut self,
        doc: DocId,
        t: Time,
        kind: ChangeKind,
        pid_key: &[u8],
    ) -> Result<(), StoreError> {
        let v = ChangeEntry::encode(kind, pid_key);
        self.changes.insert(&change_key(doc, t), v.as_slice())?;
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

    /// Stores an atom's record without its change entries.
    pub(crate) fn put_atom_record(
        &mut self,
        doc: DocId,
        pid_key: &[u8],
        rec: &AtomRecord,
    ) -> Result<(), StoreError> {
        self.atoms
            .insert(atom_key(doc, pid_key).as_slice(), rec.encode().as_slice())?;
        Ok(())
    }

    /// Removes the first `doc_times` entry.
    pub(crate) fn remove_first_doc_time(&mut self) -> Result<(), StoreError> {
        self.doc_times.pop_first()?;
        Ok(())
    }

    /// Removes the first `changes` entry.
    pub(crate) fn remove_first_change(&mut self) -> Result<(), StoreError> {
        self.changes.pop_first()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use notesync_protocol::Time;

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
        // A deleted atom still conflicts with other data.
        write(&o.db, |t| {
            assert_eq!(
                t.check_insert(DOC, p.key(), b"b").expect("check"),
                InsertCheck::Conflict
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
                stored: true
            }
        );
        // Same data again: nothing stored, still deleted; other data:
        // conflict.
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
                InsertCheck::Conflict
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
            let changes = snap.txn.open_table(CHANGES).expect("changes");
            let n = changes
                .range::<&[u8; 24]>(&change_key(d, 0)..=&change_key(d, Time::MAX))
                .expect("range")
                .count();
            assert_eq!(n, 2, "document {d:x} keeps its change index");
        }
        // The record stays (the writer keeps it, with its deletion time).
        assert!(snap.doc(DOC).expect("doc").is_some());
    }
}
