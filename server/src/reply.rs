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
    use super::*;
    use crate::store::tests::{DOC, pid, with_doc, write};
    use crate::store::{Rule, Snapshot};

    #[test]
    fn large_delta_is_split_over_frames() {
        let (_d, o, mut clock) = with_doc();
        write(&o.db, |t| {
            for i in 0..1000 {
                t.insert_atom(DOC, pid(i, 1).key(), b"xyz", &mut clock)
                    .expect("ins");
            }
        });
        let snap = Snapshot::begin(&o.db).expect("snap");
        let mut out = DocFrames::new(DOC, DocName::default(), 1000, 1 << 20);
        snap.delta(DOC, 0, Rule::Pull, None, &mut out)
            .expect("delta");
        let frames = out.finish();
        assert!(frames.len() > 5, "{} frames", frames.len());
        assert!(frames.iter().all(|f| f.len() < 1200));
    }
}
