//! Tombstone compaction (PROTOCOL.md 3.6), one bounded step at a time:
//! drops old deleted atoms and their change entries through the writer's
//! [`WriteTables`]. Reads and writes `atoms` and `changes` of one document;
//! the writer records the step's `swept`/`compacted` in its `documents`
//! row.

use notesync_protocol::{DocId, Time};
use redb::ReadableTable;

use super::error::{StoreError, corrupt};
use super::layout::{ChangeEntry, ChangeKind, atom_key, change_key, split_change_key};
use super::write::WriteTables;

/// What one [`WriteTables::compact_doc`] step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Change entries looked at.
    pub visited: usize,
    /// Atoms dropped.
    pub dropped: usize,
    /// The change index was looked at up to this time.
    pub swept: Time,
    /// The latest delete time dropped (0: none).
    pub compacted: Time,
    /// Whether the step reached `cutoff`.
    pub done: bool,
}

impl WriteTables<'_> {
    /// One bounded step of tombstone compaction on `doc` (PROTOCOL.md 3.6):
    /// looks at up to `budget` entries of its change index after `from` and
    /// up to `cutoff`, and drops every atom deleted at or before `cutoff`
    /// (its record and both its change entries), except a bare tombstone
    /// whose parent id is a live atom (the delete of a char of a live atom,
    /// 1.2: the full state needs it). Deltas since a time at or after the
    /// latest dropped delete time stay exact.
    pub fn compact_doc(
        &mut self,
        doc: DocId,
        from: Time,
        cutoff: Time,
        budget: usize,
    ) -> Result<Compacted, StoreError> {
        let mut out = Compacted {
            swept: from,
            ..Compacted::default()
        };
        if cutoff <= from {
            out.done = true;
            return Ok(out);
        }
        let lo = change_key(doc, from.saturating_add(1));
        let hi = change_key(doc, cutoff);
        // (time, whether it is a delete entry, pid key form)
        let mut entries: Vec<(Time, bool, Vec<u8>)> = Vec::new();
        for entry in self.changes.range::<&[u8; 24]>(&lo..=&hi)? {
            if entries.len() >= budget.max(1) {
                break;
            }
            let (k, v) = entry?;
            let (_, t) = split_change_key(k.value());
            let change = ChangeEntry::decode(v.value()).ok_or(corrupt("changes", "empty entry"))?;
            let is_delete = change.kind() == Ok(ChangeKind::Delete);
            entries.push((t, is_delete, change.pid_key.to_vec()));
        }
        out.visited = entries.len();
        out.done = entries.len() < budget.max(1);
        for (t, is_delete, pid_key) in entries {
            out.swept = t;
            if !is_delete {
                continue;
            }
            let Some(rec) = self.atom(doc, &pid_key)? else {
                // Its insert entry was visited first and dropped it: never
                // (an atom is dropped at its delete entry), but harmless.
                continue;
            };
            if rec.delete != t {
                return Err(corrupt(
                    "changes",
                    "delete entry at another time than its atom's",
                ));
            }
            if rec.insert == 0 && self.parent_is_live(doc, &pid_key)? {
                continue;
            }
            self.atoms.remove(atom_key(doc, &pid_key).as_slice())?;
            self.changes.remove(&change_key(doc, t))?;
            if rec.insert != 0 {
                self.changes.remove(&change_key(doc, rec.insert))?;
            }
            out.dropped += 1;
            out.compacted = out.compacted.max(t);
        }
        if out.done {
            out.swept = cutoff;
        }
        Ok(out)
    }

    /// Whether the id one level up from `pid_key` is a live atom.
    fn parent_is_live(&self, doc: DocId, pid_key: &[u8]) -> Result<bool, StoreError> {
        const LEVEL_KEY: usize = 5;
        if pid_key.len() <= LEVEL_KEY {
            return Ok(false);
        }
        let parent = &pid_key[..pid_key.len() - LEVEL_KEY];
        Ok(self
            .atom(doc, parent)?
            .is_some_and(|p| p.delete == 0 && p.insert != 0))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use notesync_protocol::{Level, Pid};

    use super::*;
    use crate::store::layout::{CHANGES, DocRecord};
    use crate::store::tests::{DOC, FakeClock, create_doc, open_tmp, pid, pull, write};
    use crate::store::{ServerClock, Snapshot};

    #[test]
    fn compaction_drops_old_deleted_atoms_and_keeps_what_the_full_state_needs() {
        let (_d, o) = open_tmp();
        let wall = Arc::new(FakeClock(AtomicU64::new(1_000)));
        let mut clock = ServerClock::new(wall.clone(), o.clock);
        create_doc(&o.db, &mut clock);
        let live = pid(1, 1);
        let old_deleted = pid(2, 1);
        let char_of_live = Pid::from_levels(&[Level::new(1, 1), Level::new(0, 1)]);
        let bare = pid(9, 2);
        let recent = pid(3, 1);
        write(&o.db, |t| {
            for (p, d) in [(&live, "ab"), (&old_deleted, "x"), (&recent, "y")] {
                t.insert_atom(DOC, p.key(), d.as_bytes(), &mut clock)
                    .expect("ins");
            }
            for p in [&old_deleted, &char_of_live, &bare] {
                t.delete_atom(DOC, p.key(), 1, &mut clock).expect("del");
            }
            t.set_clock(clock.last()).expect("clock");
        });
        let before_recent = clock.last();
        wall.0.store(5_000, Ordering::SeqCst);
        write(&o.db, |t| {
            t.delete_atom(DOC, recent.key(), 1, &mut clock)
                .expect("del");
            t.set_clock(clock.last()).expect("clock");
        });
        let delta_before = pull(&o.db, before_recent);
        // Cutoff between the old deletes and the recent one, in small steps.
        let mut from = 0;
        let mut total = Compacted::default();
        loop {
            let step = write(&o.db, |t| {
                t.compact_doc(DOC, from, before_recent, 2).expect("compact")
            });
            total.dropped += step.dropped;
            total.compacted = total.compacted.max(step.compacted);
            from = step.swept;
            if step.done {
                break;
            }
        }
        assert_eq!(from, before_recent);
        // The old deleted atom and the bare tombstone are gone, with their
        // change entries; the deleted char of the live atom stays.
        assert_eq!(total.dropped, 2);
        let snap = Snapshot::begin(&o.db).expect("snap");
        assert_eq!(snap.atom(DOC, &old_deleted).expect("atom"), None);
        assert_eq!(snap.atom(DOC, &bare).expect("atom"), None);
        assert!(snap.atom(DOC, &char_of_live).expect("atom").is_some());
        assert!(snap.atom(DOC, &live).expect("atom").is_some());
        assert!(total.compacted > 0 && total.compacted <= before_recent);
        let changes = snap.txn.open_table(CHANGES).expect("changes");
        let n = changes
            .range::<&[u8; 24]>(&change_key(DOC, 0)..=&change_key(DOC, Time::MAX))
            .expect("range")
            .count();
        // live insert, recent insert and delete, the kept char delete.
        assert_eq!(n, 4);
        // A delta since a time at or after the compaction is unchanged; the
        // full state still has the live text with its deleted char.
        assert_eq!(pull(&o.db, before_recent), delta_before);
        assert_eq!(
            pull(&o.db, 0),
            (
                vec![("ab".into(), live.clone())],
                vec![char_of_live.clone()]
            )
        );
        let rec = DocRecord {
            compacted: total.compacted,
            ..DocRecord::decode_v1(&[0u8; 18]).expect("record")
        };
        assert!(rec.needs_resync(total.compacted - 1));
        assert!(!rec.needs_resync(total.compacted));
        assert!(!rec.needs_resync(0));
    }
}
