//! The reply builder: turns what the store reads for a document (a
//! [`DeltaSink`] fed by [`Snapshot`](crate::store::Snapshot)) into wire
//! frames, 33s (and a 36 before them for a resync), each bounded in size.
//! Touches no storage and no socket: `conn` sends what [`DocFrames::finish`]
//! returns.

use bytes::Bytes;
use notesync_protocol::{
    AtomListBuilder, DocId, DocName, DocResponse, Pid, PidListBuilder, ServerFrame,
};

use crate::store::{DeltaSink, StoreError};

/// Builds one or more 33 frames, each under `chunk_bytes` of list data and
/// `max_items` per list, so a large document never needs one huge frame.
pub struct DocFrames {
    doc: DocId,
    name: DocName,
    atoms: AtomListBuilder,
    deletes: PidListBuilder,
    frames: Vec<Bytes>,
    chunk_bytes: usize,
    max_items: usize,
}

impl DocFrames {
    pub fn new(doc: DocId, name: DocName, chunk_bytes: usize, max_items: usize) -> Self {
        DocFrames {
            doc,
            name,
            atoms: AtomListBuilder::new(),
            deletes: PidListBuilder::new(),
            frames: Vec::new(),
            chunk_bytes: chunk_bytes.max(1),
            max_items: max_items.max(1),
        }
    }

    fn maybe_flush(&mut self) {
        if self.atoms.byte_len() + self.deletes.byte_len() >= self.chunk_bytes
            || self.atoms.len() >= self.max_items
            || self.deletes.len() >= self.max_items
        {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let frame = ServerFrame::DocResponse(DocResponse {
            doc: self.doc,
            name: self.name.clone(),
            inserts: std::mem::take(&mut self.atoms).finish(),
            deletes: std::mem::take(&mut self.deletes).finish(),
        });
        self.frames.push(frame.to_bytes());
    }

    /// Starts a resync (PROTOCOL.md 3.6): a 36 before the 33s, which then
    /// hold the full live state.
    pub fn resync(&mut self) {
        self.flush_if_any();
        self.frames
            .push(ServerFrame::Resync { doc: self.doc }.to_bytes());
    }

    fn flush_if_any(&mut self) {
        if !self.atoms.is_empty() || !self.deletes.is_empty() {
            self.flush();
        }
    }

    /// Whether a 36 was pushed.
    fn has_resync(&self) -> bool {
        self.frames
            .first()
            .is_some_and(|f| f.first() == Some(&notesync_protocol::header::RESYNC))
    }

    /// The frames; at least one 33, even when nothing changed.
    pub fn finish(mut self) -> Vec<Bytes> {
        if self.has_resync() && self.frames.len() == 1 {
            self.flush();
            return self.frames;
        }
        if self.frames.is_empty() || !self.atoms.is_empty() || !self.deletes.is_empty() {
            self.flush();
        }
        self.frames
    }
}

/// What the store hands over was read from it, so an atom or id the
/// list builders refuse is a corrupt record.
impl DeltaSink for DocFrames {
    fn insert(&mut self, data: &str, pid: &Pid) -> Result<(), StoreError> {
        self.atoms
            .push_parts(data, pid)
            .map_err(|_| StoreError::Corrupt {
                table: "atoms",
                what: "atom is not a valid atom",
            })?;
        self.maybe_flush();
        Ok(())
    }

    fn delete(&mut self, pid: &Pid) -> Result<(), StoreError> {
        self.deletes.push(pid).map_err(|_| StoreError::Corrupt {
            table: "atoms",
            what: "position id is not valid",
        })?;
        self.maybe_flush();
        Ok(())
    }

    fn resync(&mut self) {
        DocFrames::resync(self);
    }
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
        let snap = Snapshot::begin(db).expect("snapshot");
        let name = snap
            .doc(DOC)
            .expect("doc")
            .expect("exists")
            .doc_name()
            .expect("name");
        let mut out = DocFrames::new(DOC, name, chunk_bytes, 1 << 20);
        snap.delta(DOC, since, Rule::Pull, None, &mut out)
            .expect("delta");
        let frames = out.finish();
        let mut ins = Vec::new();
        let mut del = Vec::new();
        for f in &frames {
            let mut b = bytes::BytesMut::from(&f[..]);
            match ClientCodec::default().decode(&mut b) {
                Ok(Some(ServerFrame::DocResponse(r))) => {
                    ins.extend(
                        r.inserts
                            .iter()
                            .map(|a| (a.data.to_owned(), a.pid.to_pid())),
                    );
                    del.extend(r.deletes.iter().map(|p| p.to_pid()));
                }
                other => panic!("not a 33: {other:?}"),
            }
        }
        (frames.len(), ins, del)
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

    #[test]
    fn large_delta_is_split_over_frames() {
        let (_d, o, mut clock) = with_doc();
        insert_atoms(&o.db, &mut clock, 0..1000, b"xyz");
        let snap = Snapshot::begin(&o.db).expect("snap");
        let mut out = DocFrames::new(DOC, DocName::default(), 1000, 1 << 20);
        snap.delta(DOC, 0, Rule::Pull, None, &mut out)
            .expect("delta");
        let frames = out.finish();
        assert!(frames.len() > 5, "{} frames", frames.len());
        assert!(frames.iter().all(|f| f.len() < 1200));
    }
}
