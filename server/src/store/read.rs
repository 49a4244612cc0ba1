//! The read path: a [`Snapshot`] (one redb read transaction) and what a
//! catch-up since a time sends, handed to a [`DeltaSink`] atom by atom.
//! Reads `meta`, `documents`, `sites`, `atoms` and `changes`; writes
//! nothing. Encoding the result as wire frames is the caller's job
//! (`crate::reply`).

use std::collections::HashSet;

use notesync_protocol::{DocId, Pid, Time};
use redb::{Database, ReadTransaction, ReadableDatabase};

use super::error::{StoreError, corrupt};
use super::layout::{
    ATOMS, AtomRecord, CHANGES, ChangeEntry, ChangeKind, DOCUMENTS, DocAtoms, DocRecord, META,
    META_CLOCK, SITES, atom_key, change_key, site_key,
};

/// Which deletes a delta sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// A pull or an upsert's reply: an atom inserted and deleted after
    /// `since` is sent as neither (the client cannot have it).
    Pull,
    /// A session's 33: every delete after `since` is sent, since a session
    /// client may hold atoms it received live after its cursor.
    Session,
}

/// How an atom appears in a pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    Insert,
    Delete,
}

impl AtomRecord {
    /// What a pull (or a session's 33) since `since` sends for this atom
    /// (PROTOCOL.md 3.1, 3.2).
    pub fn delta(&self, since: Time, rule: Rule) -> Option<Delta> {
        if self.delete == 0 {
            (self.insert > since).then_some(Delta::Insert)
        } else if self.delete > since && (self.insert <= since || rule == Rule::Session) {
            Some(Delta::Delete)
        } else {
            None
        }
    }
}

/// Where a catch-up's atoms go, in the order they are read.
pub trait DeltaSink {
    /// A live atom the client lacks.
    fn insert(&mut self, data: &str, pid: &Pid) -> Result<(), StoreError>;
    /// A delete the client lacks.
    fn delete(&mut self, pid: &Pid) -> Result<(), StoreError>;
    /// What follows is the full live state (PROTOCOL.md 3.6).
    fn resync(&mut self);
    /// Live one-char atoms at consecutive ids from `first` (a run,
    /// PROTOCOL.md 1.4), one per char of `text`. By default one
    /// [`insert`](Self::insert) per char; a sink that frames runs
    /// overrides it.
    // Nothing reads runs until the store keeps them (issue 12, in progress).
    #[allow(dead_code)]
    fn run(&mut self, first: &Pid, text: &str) -> Result<(), StoreError> {
        for (j, c) in (0u32..).zip(text.chars()) {
            let pid = first.offset(j).ok_or(StoreError::Corrupt {
                table: "runs",
                what: "a run's ids overflow u32",
            })?;
            self.insert(c.encode_utf8(&mut [0; 4]), &pid)?;
        }
        Ok(())
    }
    /// Deletes of `count` consecutive ids from `first` (a range). By
    /// default one [`delete`](Self::delete) per id.
    #[allow(dead_code)]
    fn delete_range(&mut self, first: &Pid, count: u32) -> Result<(), StoreError> {
        for j in 0..count {
            let pid = first.offset(j).ok_or(StoreError::Corrupt {
                table: "runs",
                what: "a range's ids overflow u32",
            })?;
            self.delete(&pid)?;
        }
        Ok(())
    }
}

/// The clock value committed in `txn` (0 before the first commit).
pub(super) fn stored_clock(txn: &ReadTransaction) -> Result<Time, StoreError> {
    Ok(txn
        .open_table(META)?
        .get(META_CLOCK)?
        .map(|v| v.value())
        .unwrap_or(0))
}

/// A document's record as committed in `txn`.
pub(super) fn stored_doc(
    txn: &ReadTransaction,
    doc: DocId,
) -> Result<Option<DocRecord>, StoreError> {
    match txn.open_table(DOCUMENTS)?.get(doc)? {
        Some(v) => Ok(Some(DocRecord::decode(v.value())?)),
        None => Ok(None),
    }
}

/// A consistent read of the database: everything committed up to its
/// `clock`, nothing after.
pub struct Snapshot {
    pub(super) txn: ReadTransaction,
}

impl Snapshot {
    pub fn begin(db: &Database) -> Result<Self, StoreError> {
        Ok(Snapshot {
            txn: db.begin_read()?,
        })
    }

    /// The clock value committed in this snapshot: every change it holds has
    /// a time at or below it, so it is a safe `sync_time` (PROTOCOL.md 3.4).
    pub fn clock(&self) -> Result<Time, StoreError> {
        stored_clock(&self.txn)
    }

    pub fn doc(&self, doc: DocId) -> Result<Option<DocRecord>, StoreError> {
        stored_doc(&self.txn, doc)
    }

    pub fn site(&self, doc: DocId, replica: u128) -> Result<Option<u8>, StoreError> {
        Ok(self
            .txn
            .open_table(SITES)?
            .get(&site_key(doc, replica))?
            .map(|v| v.value()))
    }

    #[cfg(test)]
    pub fn atom(&self, doc: DocId, pid: &Pid) -> Result<Option<AtomRecord>, StoreError> {
        match self
            .txn
            .open_table(ATOMS)?
            .get(atom_key(doc, pid.key()).as_slice())?
        {
            Some(v) => Ok(Some(AtomRecord::decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Hands to `out` what a client that synced `doc` up to `since` lacks
    /// (PROTOCOL.md 3.1), leaving out what `exclude` says it sent itself.
    pub fn delta(
        &self,
        doc: DocId,
        since: Time,
        rule: Rule,
        exclude: Option<&SentIds>,
        out: &mut impl DeltaSink,
    ) -> Result<(), StoreError> {
        let atoms = self.txn.open_table(ATOMS)?;
        let mut emit = |kind: Delta, pid_key: &[u8], data: &[u8]| -> Result<(), StoreError> {
            if exclude.is_some_and(|x| x.contains(kind, pid_key)) {
                return Ok(());
            }
            let pid = Pid::from_key(pid_key).ok_or(corrupt("atoms", "position id key"))?;
            match kind {
                Delta::Insert => {
                    let data = std::str::from_utf8(data)
                        .map_err(|_| corrupt("atoms", "data is not UTF-8"))?;
                    out.insert(data, &pid)
                }
                Delta::Delete => out.delete(&pid),
            }
        };
        if since == 0 {
            // Everything is new: one sequential scan in position order.
            let range = DocAtoms::new(doc);
            for entry in atoms.range::<&[u8]>(range.bounds())? {
                let (k, v) = entry?;
                let rec = AtomRecord::decode(v.value())?;
                // Since 0 the client holds nothing (a session's cursor is
                // never 0), so tombstones of atoms it never saw are left out.
                if let Some(kind) = rec.delta(0, Rule::Pull) {
                    emit(kind, &k.value()[16..], &rec.data)?;
                }
            }
        } else {
            let changes = self.txn.open_table(CHANGES)?;
            let lo = change_key(doc, since.saturating_add(1));
            let hi = change_key(doc, Time::MAX);
            for entry in changes.range::<&[u8; 24]>(&lo..=&hi)? {
                let (_, v) = entry?;
                let change =
                    ChangeEntry::decode(v.value()).ok_or(corrupt("changes", "empty entry"))?;
                let pid_key = change.pid_key;
                let rec = match atoms.get(atom_key(doc, pid_key).as_slice())? {
                    Some(a) => AtomRecord::decode(a.value())?,
                    None => return Err(corrupt("changes", "entry for a missing atom")),
                };
                // Each atom has at most one entry per kind: emitting only at
                // the entry of the kind it is sent as never sends it twice.
                match (change.kind(), rec.delta(since, rule)) {
                    (Ok(ChangeKind::Insert), Some(Delta::Insert)) => {
                        emit(Delta::Insert, pid_key, &rec.data)?
                    }
                    (Ok(ChangeKind::Delete), Some(Delta::Delete)) => {
                        emit(Delta::Delete, pid_key, &[])?
                    }
                    (Ok(_), _) => {}
                    (Err(_), _) => return Err(corrupt("changes", "unknown change kind")),
                }
            }
        }
        Ok(())
    }

    /// What a client that synced `doc` up to `since` gets (PROTOCOL.md 3.1,
    /// 3.2, 3.6): the delta since then, or, when tombstones deleted after
    /// `since` were compacted away, a resync (a 36, then the full live
    /// state, as since 0). Returns whether it is a resync.
    pub fn catch_up(
        &self,
        doc: DocId,
        rec: &DocRecord,
        since: Time,
        rule: Rule,
        exclude: Option<&SentIds>,
        out: &mut impl DeltaSink,
    ) -> Result<bool, StoreError> {
        if rec.needs_resync(since) {
            out.resync();
            self.delta(doc, 0, Rule::Pull, None, out)?;
            Ok(true)
        } else {
            self.delta(doc, since, rule, exclude, out)?;
            Ok(false)
        }
    }

    /// For an upsert's reply: the deletes of ids the upsert inserted that
    /// are deleted here but that [`delta`](Self::delta) did not send (the
    /// delete came first, or the atom was inserted and deleted after
    /// `since`, e.g. by a re-send after a lost reply). The client holds
    /// those atoms live; without this it would never learn of the delete.
    pub fn deleted_sent_inserts(
        &self,
        doc: DocId,
        since: Time,
        sent: &SentIds,
        out: &mut impl DeltaSink,
    ) -> Result<(), StoreError> {
        let atoms = self.txn.open_table(ATOMS)?;
        for pid_key in &sent.insert_order {
            if sent.deletes.contains(pid_key) {
                continue;
            }
            let Some(v) = atoms.get(atom_key(doc, pid_key).as_slice())? else {
                continue;
            };
            let rec = AtomRecord::decode(v.value())?;
            if rec.delete != 0 && rec.delta(since, Rule::Pull) != Some(Delta::Delete) {
                let pid = Pid::from_key(pid_key).ok_or(corrupt("atoms", "position id key"))?;
                out.delete(&pid)?;
            }
        }
        Ok(())
    }
}

/// The ids an upsert sent: its reply leaves them out (the client has them).
#[derive(Debug, Default)]
pub struct SentIds {
    inserts: HashSet<Vec<u8>>,
    /// The inserted ids once each, in the upsert's order.
    insert_order: Vec<Vec<u8>>,
    deletes: HashSet<Vec<u8>>,
}

impl SentIds {
    pub fn from_upsert(u: &notesync_protocol::Upsert) -> Self {
        let key = |p: notesync_protocol::PidRef<'_>| {
            let mut k = Vec::with_capacity(p.wire().len());
            p.write_key(&mut k);
            k
        };
        let mut inserts = HashSet::with_capacity(u.inserts.len());
        let mut insert_order = Vec::with_capacity(u.inserts.len());
        for a in u.inserts.iter() {
            let k = key(a.pid);
            if inserts.insert(k.clone()) {
                insert_order.push(k);
            }
        }
        SentIds {
            inserts,
            insert_order,
            deletes: u.deletes.iter().map(key).collect(),
        }
    }

    /// Whether the client already has this change.
    fn contains(&self, kind: Delta, pid_key: &[u8]) -> bool {
        match kind {
            Delta::Insert => self.inserts.contains(pid_key),
            Delta::Delete => self.deletes.contains(pid_key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{DOC, delta, pid, pull, with_doc, write};

    #[test]
    fn pull_delta_classification() {
        let (_d, o, mut clock) = with_doc();
        let old_live = pid(1, 1);
        let old_deleted = pid(2, 1);
        write(&o.db, |t| {
            t.insert_atom(DOC, old_live.key(), b"a", &mut clock)
                .expect("ins");
            t.insert_atom(DOC, old_deleted.key(), b"b", &mut clock)
                .expect("ins");
            t.set_clock(clock.last()).expect("clock");
        });
        let t = clock.last();
        let new_live = pid(3, 1);
        let new_deleted = pid(4, 1);
        write(&o.db, |w| {
            w.delete_atom(DOC, old_deleted.key(), 1, &mut clock)
                .expect("del");
            w.insert_atom(DOC, new_live.key(), b"c", &mut clock)
                .expect("ins");
            w.insert_atom(DOC, new_deleted.key(), b"d", &mut clock)
                .expect("ins");
            w.delete_atom(DOC, new_deleted.key(), 1, &mut clock)
                .expect("del");
            w.set_clock(clock.last()).expect("clock");
        });
        // A session's 33 since t also sends the delete of the atom
        // inserted and deleted after t (the client may have had it live).
        assert_eq!(
            delta(&o.db, t, Rule::Session),
            (
                vec![("c".into(), new_live.clone())],
                vec![old_deleted.clone(), new_deleted.clone()]
            )
        );
        // Since t: the new live atom; the delete of the old atom; the atom
        // inserted and deleted after t is sent as neither.
        assert_eq!(
            pull(&o.db, t),
            (vec![("c".into(), new_live.clone())], vec![old_deleted])
        );
        // Since 0: the live atoms only, in position order.
        assert_eq!(
            pull(&o.db, 0),
            (vec![("a".into(), old_live), ("c".into(), new_live)], vec![])
        );
        assert_eq!(pull(&o.db, clock.last()), (vec![], vec![]));
    }
}
