//! A replica's copy of one document: its atoms in position order,
//! tombstones included, with the char arithmetic apps need.
//!
//! Invariants:
//! - Entries are sorted by position id across all chunks, ids are unique.
//! - Tombstones are kept (except for ids that never left this device, which
//!   the op log may `forget`), so an id is never allocated twice: new ids are
//!   always made strictly between two adjacent entries.
//! - An atom's data never changes (the server refuses it): editing inside a
//!   multi-char atom deletes it and inserts the pieces that remain.
//! - Each chunk caches its live char count, so a char index is found in
//!   O(chunks + chunk size) and a position id in O(log n).

use std::ops::Range;

use notesync_protocol::{AllocError, Allocator, Atom, DocId, DocName, MAX_ATOM_BYTES, Pid};

const CHUNK: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub pid: Pid,
    /// Empty for a tombstone whose insert this replica never saw.
    pub data: String,
    pub chars: u32,
    pub live: bool,
}

#[derive(Debug, Clone, Default)]
struct Chunk {
    entries: Vec<Entry>,
    live_chars: usize,
}

/// An op made by a local edit, to be sent to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalOp {
    Insert(Atom),
    Delete(Pid),
}

/// What a remote op changed in the text, in chars, for the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextChange {
    Inserted { at: usize, text: String },
    Deleted { at: usize, text: String },
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("char index {index} is past the end of the text ({len} chars)")]
    OutOfRange { index: usize, len: usize },
    #[error("cannot make a position id: {0}")]
    Alloc(#[from] AllocError),
}

/// One document's replica state.
#[derive(Debug, Clone)]
pub struct Doc {
    pub id: DocId,
    pub name: DocName,
    chunks: Vec<Chunk>,
    live_chars: usize,
}

/// Where an entry is: chunk, index within it.
type Loc = (usize, usize);

impl Doc {
    pub fn new(id: DocId, name: DocName) -> Self {
        Doc {
            id,
            name,
            chunks: vec![Chunk::default()],
            live_chars: 0,
        }
    }

    /// Length of the text in chars.
    pub fn len_chars(&self) -> usize {
        self.live_chars
    }

    pub fn text(&self) -> String {
        let mut s = String::with_capacity(self.live_chars);
        for e in self.entries().filter(|e| e.live) {
            s.push_str(&e.data);
        }
        s
    }

    /// Every entry in position order, tombstones included.
    pub(crate) fn entries(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.chunks.iter().flat_map(|c| c.entries.iter())
    }

    pub fn atom_count(&self) -> usize {
        self.chunks.iter().map(|c| c.entries.len()).sum()
    }

    /// Whether an entry (live or not) has this id.
    pub fn contains(&self, pid: &Pid) -> bool {
        self.find(pid).is_ok()
    }

    /// Binary search: `Ok` where the id is, `Err` where it would go.
    fn find(&self, pid: &Pid) -> Result<Loc, Loc> {
        // The first chunk whose last entry is >= pid.
        let c = self
            .chunks
            .partition_point(|ch| ch.entries.last().is_some_and(|e| e.pid < *pid));
        if c == self.chunks.len() {
            let last = self.chunks.len() - 1;
            return Err((last, self.chunks[last].entries.len()));
        }
        match self.chunks[c].entries.binary_search_by(|e| e.pid.cmp(pid)) {
            Ok(i) => Ok((c, i)),
            Err(i) => Err((c, i)),
        }
    }

    fn entry(&self, (c, i): Loc) -> &Entry {
        &self.chunks[c].entries[i]
    }

    /// The id of the entry just before `loc` (an insertion point).
    fn pid_before(&self, (c, i): Loc) -> Option<&Pid> {
        if i > 0 {
            return Some(&self.chunks[c].entries[i - 1].pid);
        }
        self.chunks[..c]
            .iter()
            .rev()
            .find_map(|ch| ch.entries.last().map(|e| &e.pid))
    }

    /// The id of the entry at `loc` or the next one after it.
    fn pid_at(&self, (c, i): Loc) -> Option<&Pid> {
        if let Some(e) = self.chunks[c].entries.get(i) {
            return Some(&e.pid);
        }
        self.chunks[c + 1..]
            .iter()
            .find_map(|ch| ch.entries.first().map(|e| &e.pid))
    }

    /// The live entry holding char `index`, and the offset in it; `None` for
    /// the end of the text.
    fn locate_char(&self, mut index: usize) -> Option<(Loc, usize)> {
        for (c, ch) in self.chunks.iter().enumerate() {
            if index >= ch.live_chars {
                index -= ch.live_chars;
                continue;
            }
            for (i, e) in ch.entries.iter().enumerate() {
                if !e.live {
                    continue;
                }
                if index < e.chars as usize {
                    return Some(((c, i), index));
                }
                index -= e.chars as usize;
            }
        }
        None
    }

    /// Chars of live text before `loc`.
    fn char_index(&self, (c, i): Loc) -> usize {
        let before: usize = self.chunks[..c].iter().map(|ch| ch.live_chars).sum();
        before
            + self.chunks[c].entries[..i]
                .iter()
                .filter(|e| e.live)
                .map(|e| e.chars as usize)
                .sum::<usize>()
    }

    fn insert_at(&mut self, (c, i): Loc, entry: Entry) {
        let live = if entry.live { entry.chars as usize } else { 0 };
        let ch = &mut self.chunks[c];
        ch.live_chars += live;
        ch.entries.insert(i, entry);
        self.live_chars += live;
        if ch.entries.len() > 2 * CHUNK {
            let tail = ch.entries.split_off(CHUNK);
            let tail_live: usize = tail
                .iter()
                .filter(|e| e.live)
                .map(|e| e.chars as usize)
                .sum();
            ch.live_chars -= tail_live;
            self.chunks.insert(
                c + 1,
                Chunk {
                    entries: tail,
                    live_chars: tail_live,
                },
            );
        }
    }

    fn kill(&mut self, (c, i): Loc) {
        let ch = &mut self.chunks[c];
        let e = &mut ch.entries[i];
        if e.live {
            e.live = false;
            ch.live_chars -= e.chars as usize;
            self.live_chars -= e.chars as usize;
        }
    }

    fn remove(&mut self, (c, i): Loc) -> Entry {
        let ch = &mut self.chunks[c];
        let e = ch.entries.remove(i);
        if e.live {
            ch.live_chars -= e.chars as usize;
            self.live_chars -= e.chars as usize;
        }
        if ch.entries.is_empty() && self.chunks.len() > 1 {
            self.chunks.remove(c);
        }
        e
    }

    /// Inserts `text` at char `index`. Returns the ops to send, in order.
    pub fn insert(
        &mut self,
        alloc: &mut Allocator,
        index: usize,
        text: &str,
    ) -> Result<Vec<LocalOp>, EditError> {
        if index > self.live_chars {
            return Err(EditError::OutOfRange {
                index,
                len: self.live_chars,
            });
        }
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let mut ops = Vec::new();
        // Insert before the next live char (after any tombstones before it):
        // after a backspace the next keystroke then lands in the wide gap
        // past the tombstones, which keeps ids short (measured on traces).
        let (left, right, split_tail) = match self.locate_char(index) {
            None => {
                let end = self.end();
                (self.pid_before(end).cloned(), None, None)
            }
            Some((loc, 0)) => (
                self.pid_before(loc).cloned(),
                Some(self.entry(loc).pid.clone()),
                None,
            ),
            Some((loc, offset)) => {
                // Inside an atom: replace it by its head, the new text and
                // its tail, all placed right after it.
                let e = self.entry(loc).clone();
                let cut = byte_offset(&e.data, offset);
                let (c, i) = loc;
                let next = self.pid_at((c, i + 1)).cloned();
                self.kill(loc);
                ops.push(LocalOp::Delete(e.pid.clone()));
                let head =
                    self.place_text(alloc, Some(&e.pid), next.as_ref(), &e.data[..cut], &mut ops)?;
                (head, next, Some(e.data[cut..].to_owned()))
            }
        };
        let last = self.place_text(alloc, left.as_ref(), right.as_ref(), text, &mut ops)?;
        if let Some(tail) = split_tail {
            self.place_text(alloc, last.as_ref(), right.as_ref(), &tail, &mut ops)?;
        }
        Ok(ops)
    }

    fn end(&self) -> Loc {
        let c = self.chunks.len() - 1;
        (c, self.chunks[c].entries.len())
    }

    /// Places `text` as atoms between two adjacent entries; returns the id
    /// of the last atom placed (or `left` if `text` is empty).
    fn place_text(
        &mut self,
        alloc: &mut Allocator,
        left: Option<&Pid>,
        right: Option<&Pid>,
        text: &str,
        ops: &mut Vec<LocalOp>,
    ) -> Result<Option<Pid>, EditError> {
        let mut prev = left.cloned();
        for piece in split_atoms(text) {
            let pid = alloc.between(prev.as_ref(), right)?;
            let atom =
                Atom::new(piece, pid.clone()).expect("split_atoms makes 1..=255-byte pieces");
            let loc = self.find(&pid).expect_err("a new id is unique");
            self.insert_at(loc, entry(piece, pid.clone(), true));
            ops.push(LocalOp::Insert(atom));
            prev = Some(pid);
        }
        Ok(prev)
    }

    /// Deletes the chars in `range`. Returns the ops to send, in order.
    pub fn delete(
        &mut self,
        alloc: &mut Allocator,
        range: Range<usize>,
    ) -> Result<Vec<LocalOp>, EditError> {
        if range.end > self.live_chars || range.start > range.end {
            return Err(EditError::OutOfRange {
                index: range.end,
                len: self.live_chars,
            });
        }
        let mut ops = Vec::new();
        if range.is_empty() {
            return Ok(ops);
        }
        // Collect the affected atoms first: (id, first char to delete, last+1).
        let mut affected: Vec<(Pid, usize, usize)> = Vec::new();
        let Some(((mut c, mut i), mut offset)) = self.locate_char(range.start) else {
            return Ok(ops);
        };
        let mut left = range.len();
        while left > 0 {
            let e = &self.chunks[c].entries[i];
            if e.live {
                let take = (e.chars as usize - offset).min(left);
                affected.push((e.pid.clone(), offset, offset + take));
                left -= take;
                offset = 0;
            }
            i += 1;
            if i == self.chunks[c].entries.len() {
                c += 1;
                i = 0;
            }
        }
        for (pid, from, to) in affected {
            let loc = self.find(&pid).expect("collected above");
            let e = self.entry(loc).clone();
            self.kill(loc);
            ops.push(LocalOp::Delete(pid.clone()));
            if from > 0 || to < e.chars as usize {
                let (a, b) = (byte_offset(&e.data, from), byte_offset(&e.data, to));
                let next = self.pid_at((loc.0, loc.1 + 1)).cloned();
                let head =
                    self.place_text(alloc, Some(&pid), next.as_ref(), &e.data[..a], &mut ops)?;
                self.place_text(alloc, head.as_ref(), next.as_ref(), &e.data[b..], &mut ops)?;
            }
        }
        Ok(ops)
    }

    /// Applies an insert from the server. Idempotent: a known id changes
    /// nothing (and an id known only as a tombstone gets its data but stays
    /// deleted).
    pub fn apply_insert(&mut self, data: &str, pid: &Pid) -> Option<TextChange> {
        match self.find(pid) {
            Ok(loc) => {
                let (c, i) = loc;
                let e = &mut self.chunks[c].entries[i];
                if e.data.is_empty() {
                    e.data = data.to_owned();
                    e.chars = data.chars().count() as u32;
                }
                None
            }
            Err(loc) => {
                self.insert_at(loc, entry(data, pid.clone(), true));
                Some(TextChange::Inserted {
                    at: self.char_index(self.find(pid).expect("just inserted")),
                    text: data.to_owned(),
                })
            }
        }
    }

    /// Applies a delete from the server. Idempotent; an unknown id is kept
    /// as a tombstone so its insert, if it comes later, stays deleted.
    pub fn apply_delete(&mut self, pid: &Pid) -> Option<TextChange> {
        match self.find(pid) {
            Ok(loc) if self.entry(loc).live => {
                let at = self.char_index(loc);
                let text = self.entry(loc).data.clone();
                self.kill(loc);
                Some(TextChange::Deleted { at, text })
            }
            Ok(_) => None,
            Err(loc) => {
                self.insert_at(loc, entry("", pid.clone(), false));
                None
            }
        }
    }

    /// Removes an entry whose id never left this device (its insert was
    /// cancelled by a delete before it was sent), so it is as if it never
    /// existed. Returns whether it was there.
    pub fn forget(&mut self, pid: &Pid) -> bool {
        match self.find(pid) {
            Ok(loc) => {
                self.remove(loc);
                true
            }
            Err(_) => false,
        }
    }

    /// Replaces runs of adjacent atoms whose ids satisfy `unsent` by as few
    /// atoms as possible (up to 255 bytes each, never splitting a char),
    /// with fresh ids in the same gap. Returns (old ids removed, new atoms),
    /// so the op log can swap them. Only for ids that never left the device.
    /// `force`: rewrite every run, even one that cannot shrink (to re-make
    /// provisional ids with a real site).
    pub fn coalesce(
        &mut self,
        alloc: &mut Allocator,
        unsent: impl Fn(&Pid) -> bool,
        force: bool,
    ) -> Result<(Vec<Pid>, Vec<Atom>), EditError> {
        // Find runs first (as id ranges), then rewrite each.
        let mut runs: Vec<Vec<Pid>> = Vec::new();
        let mut cur: Vec<Pid> = Vec::new();
        let mut cur_bytes = 0usize;
        for e in self.entries() {
            if e.live && unsent(&e.pid) {
                cur.push(e.pid.clone());
                cur_bytes += e.data.len();
                continue;
            }
            if worth(&cur, cur_bytes, force) {
                runs.push(std::mem::take(&mut cur));
            }
            cur.clear();
            cur_bytes = 0;
        }
        if worth(&cur, cur_bytes, force) {
            runs.push(cur);
        }
        let mut removed = Vec::new();
        let mut added = Vec::new();
        for run in runs {
            let first = self.find(&run[0]).expect("run ids exist");
            let left = self.pid_before(first).cloned();
            let mut text = String::new();
            for pid in &run {
                let loc = self.find(pid).expect("run ids exist");
                text.push_str(&self.remove(loc).data);
            }
            let right = self
                .pid_at(self.find(&run[0]).expect_err("removed"))
                .cloned();
            let mut ops = Vec::new();
            self.place_text(alloc, left.as_ref(), right.as_ref(), &text, &mut ops)?;
            removed.extend(run);
            added.extend(ops.into_iter().map(|op| match op {
                LocalOp::Insert(a) => a,
                LocalOp::Delete(_) => unreachable!("place_text only inserts"),
            }));
        }
        Ok((removed, added))
    }

    /// All entries, for persistence: (id, data, live).
    pub fn atoms(&self) -> impl Iterator<Item = (&Pid, &str, bool)> + '_ {
        self.entries().map(|e| (&e.pid, e.data.as_str(), e.live))
    }

    /// Rebuilds a document from persisted entries (must be in id order).
    pub fn from_atoms(
        id: DocId,
        name: DocName,
        atoms: impl IntoIterator<Item = (Pid, String, bool)>,
    ) -> Result<Self, &'static str> {
        let mut doc = Doc::new(id, name);
        let mut last: Option<Pid> = None;
        for (pid, data, live) in atoms {
            if last.as_ref().is_some_and(|l| *l >= pid) {
                return Err("atoms are not in strictly increasing position order");
            }
            last = Some(pid.clone());
            let end = doc.end();
            doc.insert_at(end, entry(&data, pid, live));
        }
        Ok(doc)
    }
}

/// Whether rewriting a run of atoms pays: it has fewer atoms after.
fn worth(run: &[Pid], bytes: usize, force: bool) -> bool {
    !run.is_empty() && (force || run.len() > bytes.div_ceil(MAX_ATOM_BYTES))
}

fn entry(data: &str, pid: Pid, live: bool) -> Entry {
    Entry {
        chars: data.chars().count() as u32,
        data: data.to_owned(),
        pid,
        live,
    }
}

fn byte_offset(s: &str, chars: usize) -> usize {
    s.char_indices().nth(chars).map_or(s.len(), |(b, _)| b)
}

/// Splits text into pieces of at most 255 bytes at char boundaries.
pub fn split_atoms(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut cut = rest.len().min(MAX_ATOM_BYTES);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(site: u8) -> Allocator {
        Allocator::new(site, 1, site as u64).unwrap()
    }

    fn apply_all(doc: &mut Doc, ops: &[LocalOp]) {
        for op in ops {
            match op {
                LocalOp::Insert(a) => {
                    doc.apply_insert(a.data(), a.pid());
                }
                LocalOp::Delete(p) => {
                    doc.apply_delete(p);
                }
            }
        }
    }

    #[test]
    fn edits_inside_atoms_split_them_and_replicas_converge() {
        let mut a = Doc::new(1, DocName::default());
        let mut b = Doc::new(1, DocName::default());
        let mut al = alloc(1);
        let mut ops = a.insert(&mut al, 0, "hello world").unwrap();
        ops.extend(a.insert(&mut al, 5, ",").unwrap());
        ops.extend(a.delete(&mut al, 1..3).unwrap());
        ops.extend(a.insert(&mut al, 12 - 2, "!").unwrap());
        assert_eq!(a.text(), "hlo, world!");
        apply_all(&mut b, &ops);
        assert_eq!(b.text(), a.text());
        // Re-applying everything is a no-op.
        apply_all(&mut b, &ops);
        assert_eq!(b.text(), a.text());
    }

    #[test]
    fn split_atoms_respects_char_boundaries() {
        let s = "é".repeat(200); // 400 bytes
        let pieces: Vec<&str> = split_atoms(&s).collect();
        assert_eq!(pieces.len(), 2);
        assert!(pieces.iter().all(|p| p.len() <= 255));
        assert_eq!(pieces.concat(), s);
    }

    #[test]
    fn delete_before_insert_stays_deleted() {
        let mut a = Doc::new(1, DocName::default());
        let mut al = alloc(1);
        let ops = a.insert(&mut al, 0, "x").unwrap();
        let LocalOp::Insert(atom) = &ops[0] else {
            panic!()
        };
        let mut b = Doc::new(1, DocName::default());
        assert_eq!(b.apply_delete(atom.pid()), None);
        assert_eq!(b.apply_insert(atom.data(), atom.pid()), None);
        assert_eq!(b.text(), "");
    }

    #[test]
    fn coalesce_merges_unsent_runs() {
        let mut a = Doc::new(1, DocName::default());
        let mut al = alloc(1);
        for (i, ch) in "abcdef".chars().enumerate() {
            a.insert(&mut al, i, &ch.to_string()).unwrap();
        }
        assert_eq!(a.atom_count(), 6);
        let (removed, added) = a.coalesce(&mut al, |_| true, false).unwrap();
        assert_eq!(removed.len(), 6);
        assert_eq!(added.len(), 1);
        assert_eq!(added[0].data(), "abcdef");
        assert_eq!(a.text(), "abcdef");
        assert_eq!(a.atom_count(), 1);
    }
}
