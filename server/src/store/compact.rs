//! Tombstone compaction (PROTOCOL.md 3.6), one bounded step at a time:
//! drops old deleted chars from chunks through the writer's
//! [`WriteTables`]. Reads `chunk_times` and rewrites `chunks` of one
//! document (their `changed` stays: compaction is no change a pull sees);
//! the writer records the step's `swept`/`compacted` in its `documents`
//! row.

use notesync_protocol::{DocId, Time};
use redb::ReadableTable;

use super::error::{StoreError, corrupt};
use super::layout::{DocAtoms, chunk_key, chunk_time_key, split_chunk_time_key};
use super::runs::{Body, Chunk, Item, Seg, at_or_before, parent_key};
use super::write::WriteTables;

/// What one [`WriteTables::compact_doc`] step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Chunk index entries looked at.
    pub visited: usize,
    /// Chars (ids) dropped.
    pub dropped: usize,
    /// The chunk index was looked at up to this time.
    pub swept: Time,
    /// The latest delete time dropped (0: none).
    pub compacted: Time,
    /// Whether the step reached `cutoff`.
    pub done: bool,
}

impl WriteTables<'_> {
    /// One bounded step of tombstone compaction on `doc` (PROTOCOL.md 3.6):
    /// looks at up to `budget` chunks whose last change is after `from`
    /// (more if several share the last time), in change order, and drops
    /// from each every char deleted at or before `cutoff`, except a bare
    /// tombstone whose parent id is live (the delete of a char of a live
    /// atom, 1.2: the full state needs it). `swept` is then a time such
    /// that every chunk changed at or before it was looked at with a
    /// cutoff at or after its change, so it holds nothing more to drop;
    /// a chunk changed after `from` is looked at again by the next pass.
    /// Deltas since a time at or after the latest dropped delete time stay
    /// exact.
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
        let range = DocAtoms::new(doc);
        let lo = chunk_time_key(doc, from.saturating_add(1), &[]);
        // (time, chunk key)
        let mut entries: Vec<(Time, Vec<u8>)> = Vec::new();
        // Done once the index is exhausted or passes `cutoff`: every chunk
        // changed at or before `cutoff` was then looked at.
        out.done = true;
        for entry in self.chunk_times.range::<&[u8]>(range.from(&lo))? {
            let (k, _) = entry?;
            let (_, t, rk) =
                split_chunk_time_key(k.value()).ok_or(corrupt("chunk_times", "short key"))?;
            if entries.len() >= budget.max(1) {
                // Never between two chunks of one time: `swept` says all
                // chunks changed at or before it were looked at.
                let last = entries.last().map_or(0, |(lt, _)| *lt);
                if last != t {
                    out.done = last >= cutoff;
                    break;
                }
            }
            entries.push((t, chunk_key(doc, rk)));
        }
        out.visited = entries.len();
        for (t, key) in entries {
            out.swept = t.min(cutoff);
            let chunk = match self.chunks.get(key.as_slice())? {
                Some(v) => Chunk::decode(v.value())?,
                None => return Err(corrupt("chunk_times", "entry for a missing chunk")),
            };
            // Which groups' bare tombstones must stay: those of live ids'
            // chars.
            let mut keep_bare = Vec::new();
            for it in &chunk.items {
                let keep = match parent_key(&it.group) {
                    Some(parent) => self
                        .state(doc, parent)?
                        .is_some_and(|p| p.insert != 0 && p.delete == 0),
                    None => false,
                };
                keep_bare.push(keep);
            }
            let mut items = Vec::with_capacity(chunk.items.len());
            let mut dropped_any = false;
            for (it, keep) in chunk.items.into_iter().zip(keep_bare) {
                let Body::Run(segs) = it.body else {
                    items.push(it);
                    continue;
                };
                // Rebuild the run as the pieces that stay.
                let mut at = it.first;
                let mut piece: Option<Item> = None;
                for s in segs {
                    let drop = if s.del != 0 && !(s.ins == 0 && keep) {
                        at_or_before(s.del, s.del_step, s.len, cutoff)
                    } else {
                        0..0
                    };
                    let mut stay = |sub: Seg, first: u32, piece: &mut Option<Item>| match piece {
                        Some(p) if p.first as u64 + p.len() as u64 == first as u64 => {
                            if let Body::Run(v) = &mut p.body {
                                v.push(sub);
                            }
                        }
                        _ => {
                            items.extend(piece.take());
                            *piece = Some(Item {
                                group: it.group.clone(),
                                first,
                                body: Body::Run(vec![sub]),
                            });
                        }
                    };
                    if drop.is_empty() {
                        stay(s.clone(), at, &mut piece);
                    } else {
                        dropped_any = true;
                        out.dropped += drop.len();
                        out.compacted = out
                            .compacted
                            .max(s.del_at(drop.start).max(s.del_at(drop.end - 1)));
                        if drop.start > 0 {
                            stay(s.split(drop.start).0, at, &mut piece);
                        }
                        if drop.end < s.len {
                            stay(s.split(drop.end).1, at + drop.end, &mut piece);
                        }
                    }
                    // Wraps only past the last id (a run may end at ident u32::MAX).
                    at = at.wrapping_add(s.len);
                }
                items.extend(piece);
            }
            if dropped_any {
                self.rewrite_chunk(
                    &key,
                    Chunk {
                        changed: chunk.changed,
                        items,
                    },
                )?;
            }
        }
        if out.done {
            out.swept = cutoff;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use notesync_protocol::{Level, Pid};

    use super::*;
    use crate::store::layout::DocRecord;
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
        // The recent delete stays (its chunk is looked at again by the
        // next pass, with a later cutoff).
        assert!(snap.atom(DOC, &recent).expect("atom").is_some());
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
