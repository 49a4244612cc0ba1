//! [`Pending`]: the op log's in-memory state and its rules (sans-IO), for
//! one document. The rules are in the module docs of [`crate::oplog`]; what
//! this returns as [`Record`]s, the caller makes durable with
//! [`super::LogFile`] before reporting an edit done.

use std::collections::BTreeMap;

use notesync_protocol::{Atom, DocName, Pid};

use super::Record;
use crate::doc::LocalOp;

/// Pending ops of one document, in memory.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    /// Inserts not yet acknowledged, by id. The atom is kept whole
    /// (validated once, when it was made or read back).
    inserts: BTreeMap<Pid, Queued<Atom>>,
    /// Deletes not yet acknowledged, by id.
    deletes: BTreeMap<Pid, Queued<()>>,
    rename: Option<Queued<DocName>>,
    /// Cancels not yet reflected in the structure file.
    cancels: Vec<Pid>,
    /// Every pending op in the order it was made, so a live session sends
    /// only what is newer than what it already sent (not a full snapshot
    /// per keystroke). Each op keeps its own sequence number, so taking
    /// one out needs no second map (an import queues 2,000 per note).
    order: BTreeMap<u64, OpKey>,
    next_seq: u64,
}

/// One pending op's state: what it carries, whether it may have left the
/// device, and where it is in `order`.
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

impl Pending {
    /// Queues `key` as the newest op; returns its sequence number. The
    /// caller has taken out the op it replaces, if any.
    fn enqueue(&mut self, key: OpKey) -> u64 {
        self.next_seq += 1;
        self.order.insert(self.next_seq, key);
        self.next_seq
    }

    /// Queues an insert (replacing one of the same id).
    fn put_insert(&mut self, atom: Atom, sent: bool) {
        if let Some(old) = self.inserts.remove(atom.pid()) {
            self.order.remove(&old.seq);
        }
        let seq = self.enqueue(OpKey::Insert(atom.pid().clone()));
        self.inserts.insert(
            atom.pid().clone(),
            Queued {
                op: atom,
                sent,
                seq,
            },
        );
    }

    fn remove_insert(&mut self, pid: &Pid) -> Option<Queued<Atom>> {
        let q = self.inserts.remove(pid)?;
        self.order.remove(&q.seq);
        Some(q)
    }

    /// Queues a delete as the newest op (replacing one of the same id).
    fn put_delete(&mut self, pid: Pid, sent: bool) {
        self.remove_delete(&pid);
        let seq = self.enqueue(OpKey::Delete(pid.clone()));
        self.deletes.insert(pid, Queued { op: (), sent, seq });
    }

    fn remove_delete(&mut self, pid: &Pid) -> Option<Queued<()>> {
        let q = self.deletes.remove(pid)?;
        self.order.remove(&q.seq);
        Some(q)
    }

    fn put_rename(&mut self, name: DocName, sent: bool) {
        if let Some(old) = self.rename.take() {
            self.order.remove(&old.seq);
        }
        let seq = self.enqueue(OpKey::Rename);
        self.rename = Some(Queued {
            op: name,
            sent,
            seq,
        });
    }

    /// Pending ops made after sequence number `after`, in order, with their
    /// sequence numbers (a live session's "not yet sent on this connection").
    pub fn ops_since(&self, after: u64) -> Vec<(u64, PendingOp)> {
        self.order
            .range(after + 1..)
            .filter_map(|(&seq, key)| {
                let op = match key {
                    OpKey::Insert(p) => PendingOp::Insert(self.inserts.get(p)?.op.clone()),
                    OpKey::Delete(p) => PendingOp::Delete(p.clone()),
                    OpKey::Rename => PendingOp::Rename(self.rename.as_ref()?.op.clone()),
                };
                Some((seq, op))
            })
            .collect()
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
        self.inserts.len() + self.deletes.len() + self.rename.is_some() as usize
    }

    pub fn has_insert(&self, pid: &Pid) -> bool {
        self.inserts.contains_key(pid)
    }

    /// A rename not yet acknowledged.
    pub fn pending_rename(&self) -> Option<&DocName> {
        self.rename.as_ref().map(|r| &r.op)
    }

    pub fn is_unsent_insert(&self, pid: &Pid) -> bool {
        self.inserts.get(pid).is_some_and(|q| !q.sent)
    }

    /// Records local ops. `sent`: they are about to be sent right away (a
    /// live session), so they must never be cancelled.
    pub fn record(&mut self, ops: Vec<LocalOp>, sent: bool) -> Recorded {
        let mut out = Recorded::default();
        for op in ops {
            match op {
                LocalOp::Insert(atom) => {
                    self.put_insert(atom.clone(), sent);
                    out.records.push(Record::Insert {
                        atom: atom.clone(),
                        sent,
                    });
                    out.to_send.push(LocalOp::Insert(atom));
                }
                LocalOp::Delete(pid) => {
                    if self.is_unsent_insert(&pid) {
                        let atom = self.remove_insert(&pid).expect("checked").op;
                        // Deletes of its chars (PROTOCOL.md 1.2) go with it.
                        if atom.data().chars().nth(1).is_some() {
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
        out
    }

    pub fn record_rename(&mut self, name: DocName, sent: bool) -> Record {
        self.put_rename(name.clone(), sent);
        Record::Rename { name, sent }
    }

    /// Replays a record read back from the log. Returns an id to forget.
    pub fn replay(&mut self, r: &Record) -> Option<Pid> {
        match r {
            Record::Insert { atom, sent } => {
                self.put_insert(atom.clone(), *sent);
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
        self.inserts.values_mut().for_each(|q| q.sent = true);
        self.deletes.values_mut().for_each(|q| q.sent = true);
        if let Some(r) = &mut self.rename {
            r.sent = true;
        }
    }

    /// The ops to send in an upsert: every pending insert and delete.
    pub fn snapshot(&self) -> (Vec<Atom>, Vec<Pid>, Option<DocName>) {
        let inserts = self.inserts.values().map(|q| q.op.clone()).collect();
        let deletes = self.deletes.keys().cloned().collect();
        (inserts, deletes, self.rename.as_ref().map(|r| r.op.clone()))
    }

    /// The server acknowledged these ops (an upsert's 34, or a session ack).
    pub fn acknowledge(&mut self, inserts: &[Pid], deletes: &[Pid], rename: Option<&DocName>) {
        for p in inserts {
            self.remove_insert(p);
        }
        for p in deletes {
            self.remove_delete(p);
        }
        if let Some(name) = rename
            && self.rename.as_ref().is_some_and(|r| r.op == *name)
            && let Some(old) = self.rename.take()
        {
            self.order.remove(&old.seq);
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
            && removed.len() == self.inserts.len()
            && removed.iter().all(|p| self.is_unsent_insert(p));
        if all {
            self.inserts.clear();
            self.order.clear();
        } else {
            for p in removed {
                self.remove_insert(p);
            }
        }
        for p in removed {
            self.cancels.push(p.clone());
            records.push(Record::Cancel { pid: p.clone() });
        }
        // Deletes of chars of atoms that never left the device go with them.
        self.drop_char_deletes(removed);
        for a in added {
            self.put_insert(a.clone(), false);
            records.push(Record::Insert {
                atom: a.clone(),
                sent: false,
            });
        }
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
        for q in self.inserts.values() {
            out.push(Record::Insert {
                atom: q.op.clone(),
                sent: q.sent,
            });
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
}
