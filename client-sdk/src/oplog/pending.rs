//! [`Pending`]: the op log's in-memory state and its rules (sans-IO), for
//! one document. The rules are in the module docs of [`crate::oplog`]; what
//! this returns as [`Record`]s, the caller makes durable with
//! [`super::LogFile`] before reporting an edit done.

use std::collections::BTreeMap;
use std::ops::Bound;

use notesync_protocol::{Atom, DocName, Pid};

use super::Record;
use crate::doc::LocalOp;

/// Pending ops of one document, in memory.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    /// Inserts not yet acknowledged, as runs: the one-char inserts at
    /// consecutive idents of one stem that were queued together (one edit,
    /// or one stretch of the log replayed), so an imported note's 2,000
    /// chars are one entry, not 2,000. A multi-char atom is a run of one id.
    inserts: BTreeMap<RunKey, InsertRun>,
    /// Insert ids pending: the runs' lengths, summed.
    insert_ids: usize,
    /// Deletes not yet acknowledged, by id.
    deletes: BTreeMap<Pid, Queued<()>>,
    rename: Option<Queued<DocName>>,
    /// Cancels not yet reflected in the structure file.
    cancels: Vec<Pid>,
    /// Every pending op in the order it was made, so a live session sends
    /// only what is newer than what it already sent (not a full snapshot
    /// per keystroke). Keyed by (sequence number, first ident of an insert
    /// run, else 0): the pieces of a run taken apart by acknowledgements
    /// keep its number. Each op keeps its own number, so taking one out
    /// needs no second map.
    order: BTreeMap<(u64, u32), Slot>,
    next_seq: u64,
    /// The insert run queued last, while it is still the newest op: an
    /// insert of the same batch at the id after its end joins it.
    open: Option<RunKey>,
}

/// Where a run of pending inserts starts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RunKey {
    /// What the run's ids share: every level but the last, and the last
    /// level's site (the first id with its last ident 0). Runs of one stem
    /// never overlap, so the run holding an id is the last one at or
    /// before it.
    stem: Pid,
    first: u32,
}

impl RunKey {
    fn of(pid: &Pid) -> RunKey {
        RunKey {
            stem: pid.with_last_ident(0),
            first: pid.last().ident,
        }
    }

    /// The id `j` steps into the run.
    fn pid(&self, j: u32) -> Pid {
        self.stem.with_last_ident(self.first + j)
    }

    /// One past the run's last ident, for a run of `len` ids (may be 2^32).
    fn end(&self, len: u32) -> u64 {
        u64::from(self.first) + u64::from(len)
    }
}

/// Inserts at consecutive ids, queued together.
#[derive(Debug, Clone)]
struct InsertRun {
    /// One char per id; for a multi-char atom (`atom`), its whole data at
    /// the one id.
    text: String,
    len: u32,
    atom: bool,
    sent: bool,
    seq: u64,
}

impl InsertRun {
    /// Ids `a..b` of the run (`a < b <= len`), as a run of their own.
    fn slice(&self, a: u32, b: u32) -> InsertRun {
        let text = if self.atom {
            self.text.clone()
        } else {
            let mut at = self.text.char_indices().map(|(i, _)| i);
            let from = at.nth(a as usize).unwrap_or(self.text.len());
            let to = at.nth((b - a - 1) as usize).unwrap_or(self.text.len());
            self.text[from..to].to_owned()
        };
        InsertRun {
            text,
            len: b - a,
            ..*self
        }
    }

    fn atoms<'a>(&'a self, key: &'a RunKey) -> impl Iterator<Item = Atom> + 'a {
        let datas: Box<dyn Iterator<Item = &str>> = if self.atom {
            Box::new(std::iter::once(self.text.as_str()))
        } else {
            Box::new(
                self.text
                    .char_indices()
                    .map(|(i, c)| &self.text[i..i + c.len_utf8()]),
            )
        };
        (0u32..)
            .zip(datas)
            .map(|(j, d)| Atom::new(d, key.pid(j)).expect("a pending atom is valid"))
    }
}

/// What an entry of `order` stands for.
#[derive(Debug, Clone)]
enum Slot {
    Insert(RunKey),
    Delete(Pid),
    Rename,
}

/// One pending delete's or rename's state: what it carries, whether it
/// may have left the device, and where it is in `order`.
#[derive(Debug, Clone)]
struct Queued<T> {
    op: T,
    sent: bool,
    seq: u64,
}

/// Names one pending op.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OpKey {
    Insert(Pid),
    Delete(Pid),
    Rename,
}

/// One pending op, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingOp {
    Insert(Atom),
    Delete(Pid),
    Rename(DocName),
}

/// What recording local ops did.
#[derive(Debug, Default)]
pub struct Recorded {
    /// Append these to the log (then fsync) before reporting the edit done.
    pub records: Vec<Record>,
    /// Ids to remove from the document: never-sent inserts now cancelled.
    pub forget: Vec<Pid>,
    /// The ops that remain to be sent (cancelled pairs removed).
    pub to_send: Vec<LocalOp>,
}

/// Whether two ids differ at most in their last ident (could be in one run).
fn same_stem(a: &Pid, b: &Pid) -> bool {
    a.prefix_key() == b.prefix_key() && a.creator() == b.creator()
}

impl Pending {
    /// Queues `slot` as the newest op; returns its sequence number. The
    /// caller has taken out the op it replaces, if any.
    fn enqueue(&mut self, first: u32, slot: Slot) -> u64 {
        self.next_seq += 1;
        self.open = None;
        self.order.insert((self.next_seq, first), slot);
        self.next_seq
    }

    /// The run holding `pid`.
    fn find(&self, pid: &Pid) -> Option<&InsertRun> {
        let k = RunKey::of(pid);
        let ident = k.first;
        let (rk, run) = self.inserts.range(..=k).next_back()?;
        (same_stem(&rk.stem, pid) && u64::from(ident) < rk.end(run.len)).then_some(run)
    }

    /// Queues an insert (replacing one of the same id). `extend`: it may
    /// join the run queued just before it (same batch).
    fn put_insert(&mut self, atom: Atom, sent: bool, extend: bool) {
        let k = RunKey::of(atom.pid());
        self.remove_ids(&k.stem, k.first, 1);
        let one_char = atom.data().chars().nth(1).is_none();
        if extend
            && one_char
            && let Some(open) = &self.open
            && open.stem == k.stem
            && let Some(run) = self.inserts.get_mut(open)
            && !run.atom
            && run.sent == sent
            && open.end(run.len) == u64::from(k.first)
        {
            run.text.push_str(atom.data());
            run.len += 1;
            self.insert_ids += 1;
            return;
        }
        let seq = self.enqueue(k.first, Slot::Insert(k.clone()));
        self.inserts.insert(
            k.clone(),
            InsertRun {
                text: atom.data().to_owned(),
                len: 1,
                atom: !one_char,
                sent,
                seq,
            },
        );
        self.insert_ids += 1;
        self.open = Some(k);
    }

    /// Takes the ids `first..first + count` of `stem` out of the pending
    /// inserts, splitting the runs that hold them.
    fn remove_ids(&mut self, stem: &Pid, first: u32, count: u32) {
        let (lo, hi) = (u64::from(first), u64::from(first) + u64::from(count));
        let start = RunKey {
            stem: stem.clone(),
            first,
        };
        let mut hit = Vec::new();
        if let Some((k, run)) = self.inserts.range(..=start.clone()).next_back()
            && k.stem == *stem
            && k.end(run.len) > lo
        {
            hit.push(k.clone());
        }
        hit.extend(
            self.inserts
                .range((Bound::Excluded(start), Bound::Unbounded))
                .map(|(k, _)| k)
                .take_while(|k| k.stem == *stem && u64::from(k.first) < hi)
                .cloned(),
        );
        for k in hit {
            let run = self.inserts.remove(&k).expect("just found");
            self.order.remove(&(run.seq, k.first));
            if self.open.as_ref() == Some(&k) {
                self.open = None;
            }
            // The part of [lo, hi) in the run, as offsets into it.
            let a = lo.saturating_sub(u64::from(k.first)) as u32;
            let b = (hi - u64::from(k.first)).min(u64::from(run.len)) as u32;
            self.insert_ids -= (b - a) as usize;
            if a > 0 {
                self.put_piece(k.clone(), run.slice(0, a));
            }
            if b < run.len {
                let right = RunKey {
                    stem: k.stem.clone(),
                    first: k.first + b,
                };
                self.put_piece(right, run.slice(b, run.len));
            }
        }
    }

    fn put_piece(&mut self, k: RunKey, run: InsertRun) {
        self.order
            .insert((run.seq, k.first), Slot::Insert(k.clone()));
        self.inserts.insert(k, run);
    }

    /// Takes out the pending inserts of these ids (in any order; ids of a
    /// run given in order are taken out as one range).
    fn remove_inserts(&mut self, pids: &[Pid]) {
        let mut i = 0;
        while i < pids.len() {
            let k = RunKey::of(&pids[i]);
            let mut n = 1u32;
            while let Some(p) = pids.get(i + n as usize)
                && same_stem(p, &pids[i])
                && u64::from(p.last().ident) == k.end(n)
            {
                n += 1;
            }
            self.remove_ids(&k.stem, k.first, n);
            i += n as usize;
        }
    }

    /// Takes out one pending insert; whether it was there, and a
    /// multi-char atom.
    fn remove_insert(&mut self, pid: &Pid) -> Option<bool> {
        let atom = self.find(pid)?.atom;
        let k = RunKey::of(pid);
        self.remove_ids(&k.stem, k.first, 1);
        Some(atom)
    }

    /// Queues a delete as the newest op (replacing one of the same id).
    fn put_delete(&mut self, pid: Pid, sent: bool) {
        self.remove_delete(&pid);
        let seq = self.enqueue(0, Slot::Delete(pid.clone()));
        self.deletes.insert(pid, Queued { op: (), sent, seq });
    }

    fn remove_delete(&mut self, pid: &Pid) -> Option<Queued<()>> {
        let q = self.deletes.remove(pid)?;
        self.order.remove(&(q.seq, 0));
        Some(q)
    }

    fn put_rename(&mut self, name: DocName, sent: bool) {
        if let Some(old) = self.rename.take() {
            self.order.remove(&(old.seq, 0));
        }
        let seq = self.enqueue(0, Slot::Rename);
        self.rename = Some(Queued {
            op: name,
            sent,
            seq,
        });
    }

    /// Pending ops made after sequence number `after`, in order, with their
    /// sequence numbers (a live session's "not yet sent on this connection").
    /// The chars of one run share its number.
    pub fn ops_since(&self, after: u64) -> Vec<(u64, PendingOp)> {
        let mut out = Vec::new();
        for (&(seq, _), slot) in self.order.range((after + 1, 0)..) {
            match slot {
                Slot::Insert(k) => {
                    if let Some(run) = self.inserts.get(k) {
                        out.extend(run.atoms(k).map(|a| (seq, PendingOp::Insert(a))));
                    }
                }
                Slot::Delete(p) => out.push((seq, PendingOp::Delete(p.clone()))),
                Slot::Rename => {
                    if let Some(r) = &self.rename {
                        out.push((seq, PendingOp::Rename(r.op.clone())));
                    }
                }
            }
        }
        out
    }

    /// Acknowledges one op (a session ack covers ops one by one).
    pub fn acknowledge_one(&mut self, key: &OpKey, rename: Option<&DocName>) {
        match key {
            OpKey::Insert(p) => self.acknowledge(std::slice::from_ref(p), &[], None),
            OpKey::Delete(p) => self.acknowledge(&[], std::slice::from_ref(p), None),
            OpKey::Rename => self.acknowledge(&[], &[], rename),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.deletes.is_empty() && self.rename.is_none()
    }

    pub fn len(&self) -> usize {
        self.insert_ids + self.deletes.len() + self.rename.is_some() as usize
    }

    pub fn has_insert(&self, pid: &Pid) -> bool {
        self.find(pid).is_some()
    }

    /// A rename not yet acknowledged.
    pub fn pending_rename(&self) -> Option<&DocName> {
        self.rename.as_ref().map(|r| &r.op)
    }

    pub fn is_unsent_insert(&self, pid: &Pid) -> bool {
        self.find(pid).is_some_and(|run| !run.sent)
    }

    /// Records local ops. `sent`: they are about to be sent right away (a
    /// live session), so they must never be cancelled.
    pub fn record(&mut self, ops: Vec<LocalOp>, sent: bool) -> Recorded {
        let mut out = Recorded::default();
        // A batch's inserts join each other's runs, never an older one's
        // (a live session has sent that one under its number).
        self.open = None;
        for op in ops {
            match op {
                LocalOp::Insert(atom) => {
                    self.put_insert(atom.clone(), sent, true);
                    out.records.push(Record::Insert {
                        atom: atom.clone(),
                        sent,
                    });
                    out.to_send.push(LocalOp::Insert(atom));
                }
                LocalOp::Delete(pid) => {
                    if self.is_unsent_insert(&pid) {
                        let multi = self.remove_insert(&pid).expect("checked");
                        // Deletes of its chars (PROTOCOL.md 1.2) go with it.
                        if multi {
                            self.drop_char_deletes(std::slice::from_ref(&pid));
                        }
                        self.cancels.push(pid.clone());
                        out.records.push(Record::Cancel { pid: pid.clone() });
                        // It may be in this very batch's to_send.
                        out.to_send
                            .retain(|op| !matches!(op, LocalOp::Insert(a) if *a.pid() == pid));
                        out.forget.push(pid);
                    } else {
                        self.put_delete(pid.clone(), sent);
                        out.records.push(Record::Delete {
                            pid: pid.clone(),
                            sent,
                        });
                        out.to_send.push(LocalOp::Delete(pid));
                    }
                }
            }
        }
        self.open = None;
        out
    }

    pub fn record_rename(&mut self, name: DocName, sent: bool) -> Record {
        self.put_rename(name.clone(), sent);
        Record::Rename { name, sent }
    }

    /// Replays a record read back from the log. Returns an id to forget.
    /// Consecutive inserts of a run join one run again.
    pub fn replay(&mut self, r: &Record) -> Option<Pid> {
        match r {
            Record::Insert { atom, sent } => {
                self.put_insert(atom.clone(), *sent, true);
                None
            }
            Record::Delete { pid, sent } => {
                // A delete logged again keeps its place and its sentness.
                match self.deletes.get_mut(pid) {
                    Some(q) => q.sent |= *sent,
                    None => self.put_delete(pid.clone(), *sent),
                }
                None
            }
            Record::Cancel { pid } => {
                self.remove_insert(pid);
                self.cancels.push(pid.clone());
                Some(pid.clone())
            }
            Record::MarkSent => {
                self.mark_sent();
                None
            }
            Record::Rename { name, sent } => {
                self.put_rename(name.clone(), *sent);
                None
            }
        }
    }

    /// Every pending op is now (about to be) sent.
    pub fn mark_sent(&mut self) {
        self.inserts.values_mut().for_each(|r| r.sent = true);
        self.deletes.values_mut().for_each(|q| q.sent = true);
        if let Some(r) = &mut self.rename {
            r.sent = true;
        }
    }

    /// The ops to send in an upsert: every pending insert and delete.
    pub fn snapshot(&self) -> (Vec<Atom>, Vec<Pid>, Option<DocName>) {
        let mut inserts = Vec::with_capacity(self.insert_ids);
        for (k, run) in &self.inserts {
            inserts.extend(run.atoms(k));
        }
        let deletes = self.deletes.keys().cloned().collect();
        (inserts, deletes, self.rename.as_ref().map(|r| r.op.clone()))
    }

    /// The server acknowledged these ops (an upsert's 34, or a session ack).
    pub fn acknowledge(&mut self, inserts: &[Pid], deletes: &[Pid], rename: Option<&DocName>) {
        self.remove_inserts(inserts);
        for p in deletes {
            self.remove_delete(p);
        }
        if let Some(name) = rename
            && self.rename.as_ref().is_some_and(|r| r.op == *name)
            && let Some(old) = self.rename.take()
        {
            self.order.remove(&(old.seq, 0));
        }
    }

    /// Drops pending deletes of the chars of these atoms (ids that never
    /// left the device, so neither do their chars).
    fn drop_char_deletes(&mut self, atoms: &[Pid]) {
        for atom in atoms {
            // An atom's char ids extend its id, so in key order they follow
            // it directly: a range, not a scan.
            let chars: Vec<Pid> = self
                .deletes
                .range(atom.clone()..)
                .map(|(d, _)| d)
                .take_while(|d| d.key().starts_with(atom.key()))
                .filter(|d| d.depth() == atom.depth() + 1)
                .cloned()
                .collect();
            for d in chars {
                self.remove_delete(&d);
            }
        }
    }

    /// Swaps coalesced inserts: `removed` (never sent) become `added`.
    pub fn swap_coalesced(&mut self, removed: &[Pid], added: &[Atom]) -> Vec<Record> {
        let mut records = Vec::with_capacity(removed.len() + added.len());
        // Every pending op swapped (a note made from a file, getting its
        // site): the maps are emptied, not taken apart id by id.
        let all = self.deletes.is_empty()
            && self.rename.is_none()
            && removed.len() == self.insert_ids
            && removed.iter().all(|p| self.is_unsent_insert(p));
        if all {
            self.inserts.clear();
            self.order.clear();
            self.insert_ids = 0;
        } else {
            self.remove_inserts(removed);
        }
        for p in removed {
            self.cancels.push(p.clone());
            records.push(Record::Cancel { pid: p.clone() });
        }
        // Deletes of chars of atoms that never left the device go with them.
        self.drop_char_deletes(removed);
        self.open = None;
        for a in added {
            self.put_insert(a.clone(), false, true);
            records.push(Record::Insert {
                atom: a.clone(),
                sent: false,
            });
        }
        self.open = None;
        records
    }

    /// The structure file now reflects every cancel: they can be dropped.
    pub fn structure_saved(&mut self) {
        self.cancels.clear();
    }

    /// The records that rebuild this state from the last saved structure
    /// (for compacting the log file).
    pub fn to_records(&self) -> Vec<Record> {
        let mut out: Vec<Record> = self
            .cancels
            .iter()
            .map(|p| Record::Cancel { pid: p.clone() })
            .collect();
        for (k, run) in &self.inserts {
            out.extend(run.atoms(k).map(|atom| Record::Insert {
                atom,
                sent: run.sent,
            }));
        }
        for (p, q) in &self.deletes {
            out.push(Record::Delete {
                pid: p.clone(),
                sent: q.sent,
            });
        }
        if let Some(q) = &self.rename {
            out.push(Record::Rename {
                name: q.op.clone(),
                sent: q.sent,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notesync_protocol::Level;

    fn pid(i: u32) -> Pid {
        Pid::from_levels(&[Level::new(i, 1)])
    }

    fn ins(i: u32, d: &str) -> LocalOp {
        LocalOp::Insert(Atom::new(d, pid(i)).unwrap())
    }

    #[test]
    fn unsent_insert_then_delete_cancels_out() {
        let mut p = Pending::default();
        p.record(vec![ins(1, "a"), ins(2, "b")], false);
        let r = p.record(vec![LocalOp::Delete(pid(1))], false);
        assert_eq!(r.forget, vec![pid(1)]);
        assert!(r.to_send.is_empty());
        let (inserts, deletes, _) = p.snapshot();
        assert_eq!(inserts.len(), 1);
        assert!(deletes.is_empty());
        // Within one batch too.
        let r = p.record(vec![ins(3, "c"), LocalOp::Delete(pid(3))], false);
        assert!(r.to_send.is_empty());
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn swapping_every_pending_insert_leaves_only_the_new_ones_in_order() {
        for keep_one in [false, true] {
            let mut p = Pending::default();
            p.record(vec![ins(1, "a"), ins(2, "b"), ins(3, "c")], false);
            let removed: Vec<Pid> = (1..=3 - keep_one as u32).map(pid).collect();
            let added = [
                Atom::new("x", pid(10)).unwrap(),
                Atom::new("y", pid(11)).unwrap(),
            ];
            let records = p.swap_coalesced(&removed, &added);
            assert_eq!(records.len(), removed.len() + 2);
            let mut want: Vec<Pid> = added.iter().map(|a| a.pid().clone()).collect();
            if keep_one {
                want.insert(0, pid(3));
            }
            let (inserts, _, _) = p.snapshot();
            let got: Vec<Pid> = inserts.iter().map(|a| a.pid().clone()).collect();
            assert_eq!(got, want);
            let order: Vec<Pid> = p
                .ops_since(0)
                .into_iter()
                .map(|(_, op)| match op {
                    PendingOp::Insert(a) => a.pid().clone(),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(order, want, "in the order they were made");
            let cancels = p
                .to_records()
                .into_iter()
                .filter(|r| matches!(r, Record::Cancel { .. }));
            assert_eq!(cancels.count(), removed.len());
        }
    }

    #[test]
    fn sent_insert_is_never_cancelled() {
        let mut p = Pending::default();
        p.record(vec![ins(1, "a")], false);
        p.mark_sent();
        let r = p.record(vec![LocalOp::Delete(pid(1))], false);
        assert!(r.forget.is_empty());
        assert_eq!(r.to_send, vec![LocalOp::Delete(pid(1))]);
        let (inserts, deletes, _) = p.snapshot();
        assert_eq!((inserts.len(), deletes.len()), (1, 1));
    }

    /// An id of one of three stems: two sites side by side, and one nested
    /// under an id of the first (its runs sort between the first's).
    fn stem_id(stem: u32, ident: u32) -> Pid {
        match stem {
            0 => Pid::from_levels(&[Level::new(ident, 1)]),
            1 => Pid::from_levels(&[Level::new(ident, 2)]),
            _ => Pid::from_levels(&[Level::new(5, 1), Level::new(ident, 1)]),
        }
    }

    /// The insert runs answer exactly as one entry per id would: a seeded
    /// random mix of batches (runs, multi-char atoms, cancels, deletes),
    /// acknowledgements of slices and of single ids, mark_sent, and a
    /// rebuild from `to_records`, checked against a map of ids after
    /// every step.
    #[test]
    fn insert_runs_behave_as_one_entry_per_id() {
        for seed in [1u64, 7, 42, 1234, 99_991] {
            let mut x = seed;
            let mut rnd = move |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let mut p = Pending::default();
            // id -> (data, sent, when queued)
            let mut model: BTreeMap<Pid, (String, bool, u64)> = BTreeMap::new();
            let mut deletes: BTreeMap<Pid, bool> = BTreeMap::new();
            let mut clock = 0u64;
            for step in 0..400 {
                match rnd(10) {
                    0..=4 => {
                        let sent = rnd(10) == 0;
                        let stem = rnd(3) as u32;
                        let first = rnd(60) as u32;
                        let mut ops = Vec::new();
                        if rnd(8) == 0 {
                            ops.push(LocalOp::Insert(
                                Atom::new("ab", stem_id(stem, first)).unwrap(),
                            ));
                        } else {
                            for j in 0..1 + rnd(8) as u32 {
                                let c = if rnd(5) == 0 { "é" } else { "x" };
                                ops.push(LocalOp::Insert(
                                    Atom::new(c, stem_id(stem, first + j)).unwrap(),
                                ));
                            }
                        }
                        if rnd(3) == 0 {
                            let victim = stem_id(rnd(3) as u32, rnd(70) as u32);
                            ops.push(LocalOp::Delete(victim));
                        }
                        for op in &ops {
                            match op {
                                LocalOp::Insert(a) => {
                                    clock += 1;
                                    model.insert(
                                        a.pid().clone(),
                                        (a.data().to_owned(), sent, clock),
                                    );
                                }
                                LocalOp::Delete(d) => match model.get(d) {
                                    Some((_, false, _)) => {
                                        model.remove(d);
                                    }
                                    _ => {
                                        let was = deletes.get(d).copied().unwrap_or(false);
                                        deletes.remove(d);
                                        deletes.insert(d.clone(), was || sent);
                                    }
                                },
                            }
                        }
                        p.record(ops, sent);
                    }
                    5 | 6 => {
                        let (ins, _, _) = p.snapshot();
                        if !ins.is_empty() {
                            let a = rnd(ins.len() as u64) as usize;
                            let b = a + 1 + rnd((ins.len() - a) as u64) as usize;
                            let pids: Vec<Pid> =
                                ins[a..b].iter().map(|x| x.pid().clone()).collect();
                            for q in &pids {
                                model.remove(q);
                            }
                            p.acknowledge(&pids, &[], None);
                        }
                    }
                    7 => {
                        let q = stem_id(rnd(3) as u32, rnd(70) as u32);
                        model.remove(&q);
                        p.acknowledge_one(&OpKey::Insert(q), None);
                    }
                    8 => {
                        p.mark_sent();
                        model.values_mut().for_each(|v| v.1 = true);
                        deletes.values_mut().for_each(|v| *v = true);
                    }
                    _ => {
                        let mut again = Pending::default();
                        for r in p.to_records() {
                            // A rebuild queues the runs in id order.
                            if let Record::Insert { atom, .. } = &r {
                                clock += 1;
                                model.get_mut(atom.pid()).expect("pending").2 = clock;
                            }
                            again.replay(&r);
                        }
                        p = again;
                    }
                }
                let (ins, dels, _) = p.snapshot();
                let mut got: Vec<(Pid, String)> = ins
                    .iter()
                    .map(|a| (a.pid().clone(), a.data().to_owned()))
                    .collect();
                got.sort();
                let want: Vec<(Pid, String)> = model
                    .iter()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect();
                assert_eq!(got, want, "seed {seed} step {step}");
                assert_eq!(dels, deletes.keys().cloned().collect::<Vec<_>>());
                assert_eq!(p.len(), model.len() + deletes.len());
                for stem in 0..3 {
                    for ident in 0..70 {
                        let q = stem_id(stem, ident);
                        let m = model.get(&q);
                        assert_eq!(p.has_insert(&q), m.is_some(), "seed {seed} {q:?}");
                        assert_eq!(p.is_unsent_insert(&q), m.is_some_and(|v| !v.1));
                    }
                }
                // In the order they were queued.
                let order: Vec<u64> = p
                    .ops_since(0)
                    .into_iter()
                    .filter_map(|(_, op)| match op {
                        PendingOp::Insert(a) => Some(model[a.pid()].2),
                        _ => None,
                    })
                    .collect();
                assert_eq!(order.len(), model.len());
                assert!(
                    order.windows(2).all(|w| w[0] < w[1]),
                    "seed {seed} step {step}"
                );
            }
        }
    }

    #[test]
    fn an_imported_text_is_one_run_until_acknowledged_in_parts() {
        let mut p = Pending::default();
        let ops: Vec<LocalOp> = (0..2000)
            .map(|j| LocalOp::Insert(Atom::new("a", stem_id(0, 10 + j)).unwrap()))
            .collect();
        p.record(ops, false);
        assert_eq!((p.inserts.len(), p.len()), (1, 2000));
        // Acknowledging the middle leaves two pieces, with the run's number.
        let mid: Vec<Pid> = (500..1500).map(|j| stem_id(0, 10 + j)).collect();
        p.acknowledge(&mid, &[], None);
        assert_eq!((p.inserts.len(), p.len()), (2, 1000));
        let seqs: Vec<u64> = p.ops_since(0).into_iter().map(|(s, _)| s).collect();
        assert!(seqs.iter().all(|&s| s == seqs[0]));
        assert!(p.ops_since(seqs[0]).is_empty());
        // A later batch never joins it, even at the id after its end.
        p.record(
            vec![LocalOp::Insert(Atom::new("b", stem_id(0, 2010)).unwrap())],
            false,
        );
        assert_eq!(p.inserts.len(), 3);
        assert_eq!(p.ops_since(seqs[0]).len(), 1);
    }
}
