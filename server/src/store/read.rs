//! The read path: a [`Snapshot`] (one redb read transaction) and what a
//! catch-up since a time sends, handed to a [`DeltaSink`] as runs, ranges
//! and multi-char atoms. Reads `meta`, `documents`, `sites`, `chunks` and
//! `chunk_times`; writes nothing. Encoding the result as wire frames is
//! the caller's job (`crate::reply`).

use std::collections::HashSet;
use std::ops::Range;

use notesync_protocol::{DocId, Pid, Time};
use redb::{Database, ReadOnlyTable, ReadTransaction, ReadableDatabase};

use super::error::{StoreError, corrupt};
use super::layout::{
    CHUNK_TIMES, CHUNKS, DOCUMENTS, DocAtoms, DocRecord, META, META_CLOCK, SITES, chunk_key,
    chunk_time_key, site_key, split_chunk_time_key,
};
use super::runs::{
    Body, Chunk, after, at_or_before, char_offset_in, pid_of, run_key, split_pid_key,
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

fn delta_of(insert: Time, delete: Time, since: Time, rule: Rule) -> Option<Delta> {
    if delete == 0 {
        (insert > since).then_some(Delta::Insert)
    } else if delete > since && (insert <= since || rule == Rule::Session) {
        Some(Delta::Delete)
    } else {
        None
    }
}

fn meet(a: Range<u32>, b: Range<u32>) -> Range<u32> {
    a.start.max(b.start)..a.end.min(b.end)
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
    /// PROTOCOL.md 1.5), one per char of `text`: one
    /// [`insert`](Self::insert) per char unless a sink overrides it.
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

    /// What one id holds, as a schema 3 atom record said it (data: the
    /// live text, empty once deleted).
    #[cfg(test)]
    pub fn atom(
        &self,
        doc: DocId,
        pid: &Pid,
    ) -> Result<Option<super::layout::AtomRecord>, StoreError> {
        let chunks = self.txn.open_table(CHUNKS)?;
        let mut last = None;
        Ok(
            state_in(&chunks, doc, pid.key(), &mut last)?.map(|s| super::layout::AtomRecord {
                insert: s.insert,
                delete: s.delete,
                deleter: s.deleter,
                data: s.text,
            }),
        )
    }

    /// Hands to `out` what a client that synced `doc` up to `since` lacks
    /// (PROTOCOL.md 3.1), leaving out what `exclude` says it sent itself.
    /// Since 0 it reads every chunk of the document; since a later time
    /// only the chunks changed after it (`chunk_times`), and sends of each
    /// exactly the chars whose own times say so.
    pub fn delta(
        &self,
        doc: DocId,
        since: Time,
        rule: Rule,
        exclude: Option<&SentIds>,
        out: &mut impl DeltaSink,
    ) -> Result<(), StoreError> {
        let chunks = self.txn.open_table(CHUNKS)?;
        let range = DocAtoms::new(doc);
        if since == 0 {
            // Every chunk: a pull since 0 leaves out the tombstones of
            // chars inserted and deleted (the client cannot hold them); a
            // session since 0 sends them too (PROTOCOL.md 3.2), so that the
            // replica knows every id taken, its own deleted ones included,
            // and never makes one again (1.1 rule 3: the version-3 rule of
            // 1.4 is deterministic, so it would).
            for entry in chunks.range::<&[u8]>(range.bounds())? {
                let (_, v) = entry?;
                emit_chunk(&Chunk::decode(v.value())?, 0, rule, exclude, out)?;
            }
            return Ok(());
        }
        let index = self.txn.open_table(CHUNK_TIMES)?;
        let from = chunk_time_key(doc, since.saturating_add(1), &[]);
        let mut keys = Vec::new();
        for entry in index.range::<&[u8]>(range.from(&from))? {
            let (k, _) = entry?;
            let (_, _, rk) =
                split_chunk_time_key(k.value()).ok_or(corrupt("chunk_times", "short key"))?;
            keys.push(chunk_key(doc, rk));
        }
        keys.sort();
        for k in keys {
            let v = chunks
                .get(k.as_slice())?
                .ok_or(corrupt("chunk_times", "entry for a missing chunk"))?;
            emit_chunk(&Chunk::decode(v.value())?, since, rule, exclude, out)?;
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
        let chunks = self.txn.open_table(CHUNKS)?;
        let mut last = None;
        for pid_key in &sent.insert_order {
            if sent.deletes.contains(pid_key) {
                continue;
            }
            let Some((group, ident)) = split_pid_key(pid_key) else {
                continue;
            };
            let Some((insert, delete)) = chunk_for(&chunks, doc, &group, ident, &mut last)?
                .and_then(|c| c.times(&group, ident))
            else {
                continue;
            };
            if delete != 0 && delta_of(insert, delete, since, Rule::Pull) != Some(Delta::Delete) {
                let pid = Pid::from_key(pid_key).ok_or(corrupt("chunks", "position id key"))?;
                out.delete(&pid)?;
            }
        }
        Ok(())
    }
}

/// What an id holds in a snapshot's chunks; `last` keeps the last chunk
/// decoded (consecutive ids are mostly in one chunk).
#[cfg(test)]
fn state_in(
    chunks: &ReadOnlyTable<&'static [u8], &'static [u8]>,
    doc: DocId,
    pid_key: &[u8],
    last: &mut Option<(Vec<u8>, Chunk)>,
) -> Result<Option<super::runs::CharState>, StoreError> {
    let Some((group, ident)) = split_pid_key(pid_key) else {
        return Ok(None);
    };
    Ok(chunk_for(chunks, doc, &group, ident, last)?.and_then(|c| c.state(&group, ident)))
}

/// The chunk that holds an id, if any: `last` when it covers the id (no
/// two chunks cover one id, so no lookup is needed: an upsert's ids are
/// mostly consecutive), else the last chunk keyed at or before it.
fn chunk_for<'a>(
    chunks: &ReadOnlyTable<&'static [u8], &'static [u8]>,
    doc: DocId,
    group: &[u8],
    ident: u32,
    last: &'a mut Option<(Vec<u8>, Chunk)>,
) -> Result<Option<&'a Chunk>, StoreError> {
    if last.as_ref().is_some_and(|(_, c)| c.covers(group, ident)) {
        return Ok(last.as_ref().map(|(_, c)| c));
    }
    let k = chunk_key(doc, &run_key(group, ident));
    let lo = chunk_key(doc, &[]);
    let Some(entry) = chunks
        .range::<&[u8]>(lo.as_slice()..=k.as_slice())?
        .next_back()
    else {
        return Ok(None);
    };
    let (key, v) = entry?;
    if last
        .as_ref()
        .is_none_or(|(lk, _)| lk.as_slice() != key.value())
    {
        *last = Some((key.value().to_vec(), Chunk::decode(v.value())?));
    }
    Ok(last.as_ref().map(|(_, c)| c))
}

/// Hands to `out` what one chunk holds that a client synced up to `since`
/// lacks.
fn emit_chunk(
    chunk: &Chunk,
    since: Time,
    rule: Rule,
    exclude: Option<&SentIds>,
    out: &mut impl DeltaSink,
) -> Result<(), StoreError> {
    for it in &chunk.items {
        match &it.body {
            Body::Atom { insert, text } => {
                if *insert > since {
                    let pid = pid_of(&it.group, it.first)?;
                    if !exclude.is_some_and(|x| x.contains(Delta::Insert, pid.key())) {
                        let text = std::str::from_utf8(text)
                            .map_err(|_| corrupt("chunks", "data is not UTF-8"))?;
                        out.insert(text, &pid)?;
                    }
                }
            }
            Body::Run(segs) => {
                let mut at = it.first;
                for s in segs {
                    if s.live() {
                        let r = after(s.ins, s.ins_step, s.len, since);
                        if !r.is_empty() {
                            let (a, b) = (
                                char_offset_in(&s.text, s.len, r.start),
                                char_offset_in(&s.text, s.len, r.end),
                            );
                            let text = &s.text[a..b];
                            let text = std::str::from_utf8(text)
                                .map_err(|_| corrupt("chunks", "text is not UTF-8"))?;
                            emit_run(&it.group, at + r.start, text, exclude, out)?;
                        }
                    } else {
                        let mut r = after(s.del, s.del_step, s.len, since);
                        if rule == Rule::Pull && s.ins != 0 {
                            r = meet(r, at_or_before(s.ins, s.ins_step, s.len, since));
                        }
                        if !r.is_empty() {
                            emit_range(&it.group, at + r.start, r.end - r.start, exclude, out)?;
                        }
                    }
                    // Wraps only past the last id (a run may end at ident u32::MAX).
                    at = at.wrapping_add(s.len);
                }
            }
        }
    }
    Ok(())
}

fn emit_run(
    group: &[u8],
    first: u32,
    text: &str,
    exclude: Option<&SentIds>,
    out: &mut impl DeltaSink,
) -> Result<(), StoreError> {
    let Some(x) = exclude else {
        return out.run(&pid_of(group, first)?, text);
    };
    // Per char: the spans the upsert did not send, each as a run.
    let mut span: Option<(u32, usize)> = None;
    let mut byte = 0;
    for (j, c) in (0u32..).zip(text.chars()) {
        let pid = pid_of(group, first + j)?;
        if x.contains(Delta::Insert, pid.key()) {
            if let Some((f, b)) = span.take() {
                out.run(&pid_of(group, f)?, &text[b..byte])?;
            }
        } else if span.is_none() {
            span = Some((first + j, byte));
        }
        byte += c.len_utf8();
    }
    if let Some((f, b)) = span {
        out.run(&pid_of(group, f)?, &text[b..])?;
    }
    Ok(())
}

fn emit_range(
    group: &[u8],
    first: u32,
    count: u32,
    exclude: Option<&SentIds>,
    out: &mut impl DeltaSink,
) -> Result<(), StoreError> {
    let Some(x) = exclude else {
        return out.delete_range(&pid_of(group, first)?, count);
    };
    let mut span: Option<u32> = None;
    for j in 0..count {
        let pid = pid_of(group, first + j)?;
        if x.contains(Delta::Delete, pid.key()) {
            if let Some(f) = span.take() {
                out.delete_range(&pid_of(group, f)?, first + j - f)?;
            }
        } else if span.is_none() {
            span = Some(first + j);
        }
    }
    if let Some(f) = span {
        out.delete_range(&pid_of(group, f)?, first + count - f)?;
    }
    Ok(())
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
        // Since 0: the live atoms only, in run key order.
        assert_eq!(
            pull(&o.db, 0),
            (vec![("a".into(), old_live), ("c".into(), new_live)], vec![])
        );
        assert_eq!(pull(&o.db, clock.last()), (vec![], vec![]));
    }

    #[test]
    fn a_run_ending_at_the_last_ident_is_pulled_and_compacted() {
        let (_d, o, mut clock) = with_doc();
        let last = pid(u32::MAX, 1);
        let before = pid(u32::MAX - 1, 1);
        write(&o.db, |t| {
            t.insert_atom(DOC, before.key(), b"a", &mut clock)
                .expect("ins");
            t.delete_atom(DOC, last.key(), 1, &mut clock).expect("del");
            t.set_clock(clock.last()).expect("clock");
        });
        assert_eq!(
            pull(&o.db, 0),
            (vec![("a".into(), before.clone())], vec![last.clone()])
        );
        assert_eq!(pull(&o.db, 1), (vec![("a".into(), before)], vec![last]));
        let step = write(&o.db, |t| {
            t.compact_doc(DOC, 0, clock.last(), 10).expect("compact")
        });
        assert_eq!(step.dropped, 1);
        crate::store::tests::assert_layout_ok(&Snapshot::begin(&o.db).expect("snap").txn);
    }
}
