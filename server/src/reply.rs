//! The reply builder: turns what the store reads for a document (a
//! [`DeltaSink`] fed by [`Snapshot`](crate::store::Snapshot)) into wire
//! frames, 33s (and a 36 before them for a resync), each bounded in size.
//! Touches no storage and no socket: `conn` sends what [`DocFrames::finish`]
//! returns.

use bytes::Bytes;
use notesync_protocol::{
    AtomListBuilder, Coalesced, DocId, DocName, DocResponse, DocResponseRuns, ItemListBuilder, Pid,
    PidListBuilder, RangeListBuilder, RunCoalescer, ServerFrame, VERSION_RUNS,
};

use crate::store::{DeltaSink, StoreError};

/// The lists of the frame being built, by version class.
enum Lists {
    /// Version 1/2: 33s of atoms and single deletes.
    Atoms {
        atoms: AtomListBuilder,
        deletes: PidListBuilder,
    },
    /// Version 3: 37s of items and ranges, coalesced as they come.
    Runs {
        items: ItemListBuilder,
        ranges: RangeListBuilder,
        coalescer: RunCoalescer,
        /// Atoms and run chars in `items` (they count toward the items
        /// limit), ids in `ranges`.
        item_units: usize,
        range_units: usize,
        /// Chars and ids held in the coalescer, not yet in the lists.
        held_chars: usize,
        held_ids: usize,
        held_bytes: usize,
    },
}

/// Builds one or more 33 frames (37 for a version-3 connection), each
/// under `chunk_bytes` of list data and `max_items` per list (atoms plus
/// run chars, or range ids), so a large document never needs one huge frame.
pub struct DocFrames {
    doc: DocId,
    name: DocName,
    lists: Lists,
    frames: Vec<Bytes>,
    chunk_bytes: usize,
    max_items: usize,
}

/// What the store hands over was read from it, so an atom or id the
/// list builders refuse is a corrupt record.
fn corrupt_atom<E>(_: E) -> StoreError {
    StoreError::Corrupt {
        table: "atoms",
        what: "atom is not a valid atom",
    }
}

fn corrupt_pid<E>(_: E) -> StoreError {
    StoreError::Corrupt {
        table: "atoms",
        what: "position id is not valid",
    }
}

impl DocFrames {
    /// Frames for a connection of protocol `version`.
    pub fn new(
        doc: DocId,
        name: DocName,
        chunk_bytes: usize,
        max_items: usize,
        version: u8,
    ) -> Self {
        let lists = if version >= VERSION_RUNS {
            Lists::Runs {
                items: ItemListBuilder::new(),
                ranges: RangeListBuilder::new(),
                coalescer: RunCoalescer::new(),
                item_units: 0,
                range_units: 0,
                held_chars: 0,
                held_ids: 0,
                held_bytes: 0,
            }
        } else {
            Lists::Atoms {
                atoms: AtomListBuilder::new(),
                deletes: PidListBuilder::new(),
            }
        };
        DocFrames {
            doc,
            name,
            lists,
            frames: Vec::new(),
            chunk_bytes: chunk_bytes.max(1),
            max_items: max_items.max(1),
        }
    }

    fn maybe_flush(&mut self) {
        let full = match &self.lists {
            Lists::Atoms { atoms, deletes } => {
                atoms.byte_len() + deletes.byte_len() >= self.chunk_bytes
                    || atoms.len() >= self.max_items
                    || deletes.len() >= self.max_items
            }
            Lists::Runs {
                items,
                ranges,
                item_units,
                range_units,
                held_chars,
                held_ids,
                held_bytes,
                ..
            } => {
                // What the coalescer holds goes into this frame too.
                items.byte_len() + ranges.byte_len() + held_bytes >= self.chunk_bytes
                    || item_units + held_chars >= self.max_items
                    || range_units + held_ids >= self.max_items
            }
        };
        if full {
            self.flush();
        }
    }

    /// Moves a complete run, atom or range into the lists.
    fn put(&mut self, c: Coalesced) -> Result<(), StoreError> {
        let Lists::Runs {
            items,
            ranges,
            item_units,
            range_units,
            held_chars,
            held_ids,
            held_bytes,
            ..
        } = &mut self.lists
        else {
            unreachable!("only version-3 lists coalesce");
        };
        match c {
            Coalesced::Run(first, text) => {
                let n = text.chars().count();
                items.push_run(&first, &text).map_err(corrupt_atom)?;
                *item_units += n;
                *held_chars -= n;
                *held_bytes -= text.len();
            }
            Coalesced::Atom(data, pid) => {
                items.push_atom(&data, &pid).map_err(corrupt_atom)?;
                *item_units += 1;
            }
            Coalesced::Range(first, n) => {
                ranges.push(&first, n).map_err(corrupt_pid)?;
                *range_units += usize::from(n);
                *held_ids -= usize::from(n);
            }
        }
        Ok(())
    }

    fn flush(&mut self) {
        let frame = match &mut self.lists {
            Lists::Atoms { atoms, deletes } => ServerFrame::DocResponse(DocResponse {
                doc: self.doc,
                name: self.name.clone(),
                inserts: std::mem::take(atoms).finish(),
                deletes: std::mem::take(deletes).finish(),
            }),
            Lists::Runs { coalescer, .. } => {
                let held = [coalescer.take_run(), coalescer.take_range()];
                for c in held.into_iter().flatten() {
                    // Validated when it entered the coalescer (its chars
                    // and ids were single valid atoms and ids).
                    self.put(c).expect("coalesced from valid atoms and ids");
                }
                let Lists::Runs {
                    items,
                    ranges,
                    item_units,
                    range_units,
                    ..
                } = &mut self.lists
                else {
                    unreachable!("matched above");
                };
                *item_units = 0;
                *range_units = 0;
                ServerFrame::DocResponseRuns(DocResponseRuns {
                    doc: self.doc,
                    name: self.name.clone(),
                    inserts: std::mem::take(items).finish(),
                    deletes: std::mem::take(ranges).finish(),
                })
            }
        };
        self.frames.push(frame.to_bytes());
    }

    /// Starts a resync (PROTOCOL.md 3.6): a 36 before the 33s, which then
    /// hold the full live state.
    pub fn resync(&mut self) {
        self.flush_if_any();
        self.frames
            .push(ServerFrame::Resync { doc: self.doc }.to_bytes());
    }

    fn is_empty(&self) -> bool {
        match &self.lists {
            Lists::Atoms { atoms, deletes } => atoms.is_empty() && deletes.is_empty(),
            Lists::Runs {
                items,
                ranges,
                held_chars,
                held_ids,
                ..
            } => items.is_empty() && ranges.is_empty() && *held_chars == 0 && *held_ids == 0,
        }
    }

    fn flush_if_any(&mut self) {
        if !self.is_empty() {
            self.flush();
        }
    }

    /// Whether a 36 was pushed.
    fn has_resync(&self) -> bool {
        self.frames
            .first()
            .is_some_and(|f| f.first() == Some(&notesync_protocol::header::RESYNC))
    }

    /// The frames; at least one 33 (or 37), even when nothing changed.
    pub fn finish(mut self) -> Vec<Bytes> {
        if self.has_resync() && self.frames.len() == 1 {
            self.flush();
            return self.frames;
        }
        if self.frames.is_empty() || !self.is_empty() {
            self.flush();
        }
        self.frames
    }
}

impl DeltaSink for DocFrames {
    fn insert(&mut self, data: &str, pid: &Pid) -> Result<(), StoreError> {
        match &mut self.lists {
            Lists::Atoms { atoms, .. } => atoms.push_parts(data, pid).map_err(corrupt_atom)?,
            Lists::Runs {
                coalescer,
                held_chars,
                held_bytes,
                ..
            } => {
                // Checked here, so what the coalescer hands out is valid.
                notesync_protocol::Atom::new(data, pid.clone()).map_err(corrupt_atom)?;
                let done = coalescer.insert(data, pid);
                if data.chars().nth(1).is_none() {
                    *held_chars += 1;
                    *held_bytes += data.len();
                }
                for c in done.into_iter().flatten() {
                    self.put(c)?;
                }
            }
        }
        self.maybe_flush();
        Ok(())
    }

    fn delete(&mut self, pid: &Pid) -> Result<(), StoreError> {
        match &mut self.lists {
            Lists::Atoms { deletes, .. } => deletes.push(pid).map_err(corrupt_pid)?,
            Lists::Runs {
                coalescer,
                held_ids,
                ..
            } => {
                if pid.depth() > 255 || pid.creator() == 0 {
                    return Err(corrupt_pid(()));
                }
                let done = coalescer.delete(pid);
                *held_ids += 1;
                if let Some(c) = done {
                    self.put(c)?;
                }
            }
        }
        self.maybe_flush();
        Ok(())
    }

    fn resync(&mut self) {
        DocFrames::resync(self);
    }
    // `run` and `delete_range` keep the trait's bodies (char by char, id
    // by id): through the coalescer for version 3, as atoms for 1 and 2,
    // so the frame bounds hold per char either way.
}

#[cfg(test)]
mod tests {
    use notesync_protocol::{ClientCodec, Time};
    use redb::Database;
    use tokio_util::codec::Decoder;

    use super::*;
    use crate::store::tests::{DOC, pid, pull, with_doc, write};
    use crate::store::{Rule, ServerClock, Snapshot};

    /// A pull since `since` through the frames: (frames, inserted data,
    /// deleted pids) decoded back from them.
    fn pull_frames(
        db: &Database,
        since: Time,
        chunk_bytes: usize,
    ) -> (usize, Vec<(String, Pid)>, Vec<Pid>) {
        let (frames, ins, del, _) = pull_frames_v(db, since, chunk_bytes, 1 << 20, 2);
        (frames, ins, del)
    }

    /// As `pull_frames`, for a connection of `version`; also the frames'
    /// total bytes.
    fn pull_frames_v(
        db: &Database,
        since: Time,
        chunk_bytes: usize,
        max_items: usize,
        version: u8,
    ) -> (usize, Vec<(String, Pid)>, Vec<Pid>, usize) {
        let snap = Snapshot::begin(db).expect("snapshot");
        let name = snap
            .doc(DOC)
            .expect("doc")
            .expect("exists")
            .doc_name()
            .expect("name");
        let mut out = DocFrames::new(DOC, name, chunk_bytes, max_items, version);
        snap.delta(DOC, since, Rule::Pull, None, &mut out)
            .expect("delta");
        let frames = out.finish();
        let mut ins = Vec::new();
        let mut del = Vec::new();
        let bytes = frames.iter().map(|f| f.len()).sum();
        for f in &frames {
            let mut b = bytes::BytesMut::from(&f[..]);
            match ClientCodec::default().decode(&mut b) {
                Ok(Some(ServerFrame::DocResponse(r))) if version < 3 => {
                    ins.extend(
                        r.inserts
                            .iter()
                            .map(|a| (a.data.to_owned(), a.pid.to_pid())),
                    );
                    del.extend(r.deletes.iter().map(|p| p.to_pid()));
                }
                Ok(Some(ServerFrame::DocResponseRuns(r))) if version >= 3 => {
                    assert!(r.inserts.units() as usize <= max_items);
                    assert!(r.deletes.units() as usize <= max_items);
                    ins.extend(r.inserts.atoms().map(|(d, p)| (d.to_owned(), p)));
                    del.extend(r.deletes.ids());
                }
                other => panic!("not a 33/37 for version {version}: {other:?}"),
            }
        }
        (frames.len(), ins, del, bytes)
    }

    /// Inserts atoms `ids` (of site 1), each holding `data`, in one commit.
    fn insert_atoms(
        db: &Database,
        clock: &mut ServerClock,
        ids: std::ops::Range<u32>,
        data: &[u8],
    ) {
        write(db, |t| {
            for i in ids {
                t.insert_atom(DOC, pid(i, 1).key(), data, clock)
                    .expect("ins");
            }
            t.set_clock(clock.last()).expect("clock");
        });
    }

    #[test]
    fn frames_carry_what_the_store_hands_over_in_order() {
        let (_d, o, mut clock) = with_doc();
        insert_atoms(&o.db, &mut clock, 0..40, b"ab");
        let since = clock.last();
        write(&o.db, |t| {
            for i in (0..40).step_by(3) {
                t.delete_atom(DOC, pid(i, 1).key(), 1, &mut clock)
                    .expect("del");
            }
            t.set_clock(clock.last()).expect("clock");
        });
        insert_atoms(&o.db, &mut clock, 40..50, b"cd");
        for since in [0, since] {
            let (frames, ins, del) = pull_frames(&o.db, since, 64);
            assert!(frames > 1, "{frames} frames");
            assert_eq!((ins, del), pull(&o.db, since), "since {since}");
        }
        // Nothing new: still one (empty) 33.
        let (frames, ins, del) = pull_frames(&o.db, clock.last(), 64);
        assert_eq!((frames, ins.len(), del.len()), (1, 0, 0));
    }

    /// A version-3 connection gets the same content as runs and ranges:
    /// consecutive one-char atoms at consecutive ids become one run,
    /// consecutive deleted ids one range, multi-char atoms stay atoms, and
    /// every frame stays within the byte and item bounds.
    #[test]
    fn version_3_frames_carry_runs_and_ranges() {
        let (_d, o, mut clock) = with_doc();
        insert_atoms(&o.db, &mut clock, 0..3000, b"a");
        insert_atoms(&o.db, &mut clock, 3000..3010, b"long");
        let since = clock.last();
        write(&o.db, |t| {
            for i in 100..200 {
                t.delete_atom(DOC, pid(i, 1).key(), 1, &mut clock)
                    .expect("del");
            }
            t.set_clock(clock.last()).expect("clock");
        });
        for since in [0, since] {
            let (_, ins2, del2, bytes2) = pull_frames_v(&o.db, since, 1 << 20, 1 << 20, 2);
            let (frames3, ins3, del3, bytes3) = pull_frames_v(&o.db, since, 1 << 20, 1 << 20, 3);
            assert_eq!((&ins3, &del3), (&ins2, &del2), "since {since}");
            assert_eq!(frames3, 1);
            assert!(
                bytes3 * 3 < bytes2,
                "{bytes3} bytes as runs vs {bytes2} as atoms"
            );
            // Small frames: split anywhere, same content, bounds kept.
            let (frames, ins, del, _) = pull_frames_v(&o.db, since, 64, 50, 3);
            // 2900 chars or 100 ids, 50 per frame at most.
            assert!(frames >= if since == 0 { 58 } else { 2 }, "{frames} frames");
            assert_eq!((ins, del), (ins2, del2), "since {since}, small frames");
        }
        // The 37 of the full pull: 2 runs (0..100 and 200..3000) and 10 atoms.
        let snap = Snapshot::begin(&o.db).expect("snap");
        let mut out = DocFrames::new(DOC, DocName::default(), 1 << 20, 1 << 20, 3);
        snap.delta(DOC, 0, Rule::Pull, None, &mut out)
            .expect("delta");
        let frames = out.finish();
        let mut b = bytes::BytesMut::from(&frames[0][..]);
        let Ok(Some(ServerFrame::DocResponseRuns(r))) = ClientCodec::default().decode(&mut b)
        else {
            panic!("not a 37");
        };
        assert_eq!(r.inserts.len(), 12);
        assert_eq!(r.inserts.units(), 2900 + 10);
        assert_eq!(r.deletes.len(), 0, "a pull since 0 sends no deletes");
    }

    #[test]
    fn large_delta_is_split_over_frames() {
        let (_d, o, mut clock) = with_doc();
        insert_atoms(&o.db, &mut clock, 0..1000, b"xyz");
        let snap = Snapshot::begin(&o.db).expect("snap");
        let mut out = DocFrames::new(DOC, DocName::default(), 1000, 1 << 20, 2);
        snap.delta(DOC, 0, Rule::Pull, None, &mut out)
            .expect("delta");
        let frames = out.finish();
        assert!(frames.len() > 5, "{} frames", frames.len());
        assert!(frames.iter().all(|f| f.len() < 1200));
    }
}
