//! A replica's copy of one document: its atoms in position order,
//! tombstones included, with the char arithmetic apps need.
//!
//! Every char is an entry of its own (PROTOCOL.md 1.2): a one-char atom is
//! one entry; an atom of two or more chars is a *header* entry (its id, its
//! data, no chars of its own) plus one *virtual* entry per char, at
//! `P ++ [(creator, j)]`. So an edit never splits an atom: deleting a char
//! deletes its (virtual) id, and new text goes between two adjacent entries.
//! Local text is always made as *runs* (PROTOCOL.md 1.4): one one-char atom
//! per char, at consecutive ids under one prefix (the version-3 rule), so
//! concurrent runs never interleave; multi-char atoms come only from older
//! clients and files.
//!
//! Invariants:
//! - Entries are sorted by position id across all chunks; ids are unique.
//! - Tombstones stay (except ids that never left this device, which the op
//!   log may `forget`), and the virtual entries of every known multi-char
//!   atom are present, live or not, so a new id (always made strictly
//!   between two adjacent entries) never repeats an id, nor takes a virtual
//!   one.
//! - Liveness only goes from live to dead; a virtual entry of a dead atom is
//!   dead.
//! - Each chunk caches its live char count: a char index is found in
//!   O(chunks + chunk size), an id in O(log n).
//!
//! Files: `entries.rs` (the chunked entries and their primitives),
//! `coalesce.rs` (rewriting never-sent runs), this one (the types, local
//! edits, remote ops and persisted parts).

mod coalesce;
mod entries;

use std::ops::Range;

use notesync_protocol::{
    AllocError, Allocator, Atom, DocId, DocName, Level, MAX_ATOM_BYTES, Pid, SmallText,
};

use entries::{Chunk, Entry, Kind, Loc};

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
    /// The first and last id of the last local insert: tells typing on
    /// after it, or backwards before it, from a jump (see `insert`). Not
    /// persisted: after a restart every insert is a jump.
    last_insert: Option<(Pid, Pid)>,
}

/// The virtual id of char `j` of the atom `pid`.
pub fn virtual_id(pid: &Pid, j: usize) -> Pid {
    let mut levels: Vec<Level> = pid.levels().collect();
    levels.push(Level::new(j as u32, pid.creator()));
    Pid::from_levels(&levels)
}

impl Doc {
    pub fn new(id: DocId, name: DocName) -> Self {
        Doc {
            id,
            name,
            chunks: vec![Chunk::default()],
            live_chars: 0,
            last_insert: None,
        }
    }

    /// Length of the text in chars.
    pub fn len_chars(&self) -> usize {
        self.live_chars
    }

    pub fn text(&self) -> String {
        let mut s = String::with_capacity(self.live_chars);
        for e in self.entries().filter(|e| e.live && e.chars() == 1) {
            s.push_str(&e.data);
        }
        s
    }

    /// Atoms (one-char atoms and headers), live or not.
    pub fn atom_count(&self) -> usize {
        self.entries()
            .filter(|e| matches!(e.kind, Kind::Atom | Kind::Header))
            .count()
    }

    /// The id of char `index` of the text (`None` past the end): what a
    /// test or an app needs to tell which run a char belongs to.
    pub fn char_id(&self, index: usize) -> Option<Pid> {
        self.locate_char(index).map(|l| self.entry(l).pid.clone())
    }

    pub fn contains(&self, pid: &Pid) -> bool {
        self.find(pid).is_ok()
    }

    /// Adds an atom (not yet present) and, for two or more chars, its
    /// virtual entries; a virtual id already present (a tombstone that came
    /// first) keeps its state. Returns the chars that became visible, if
    /// `report` (finding a char's index costs a walk of its chunk, which a
    /// document being loaded or re-made does not need).
    fn add_atom(&mut self, data: &str, pid: &Pid, live: bool, report: bool) -> Vec<TextChange> {
        let mut changes = Vec::new();
        let n = data.chars().count();
        let kind = if n == 1 { Kind::Atom } else { Kind::Header };
        let loc = self.find(pid).expect_err("add_atom takes a new id");
        self.insert_at(
            loc,
            Entry {
                pid: pid.clone(),
                data: SmallText::new(data),
                kind,
                live,
            },
        );
        if n == 1 {
            if live && report {
                changes.push(TextChange::Inserted {
                    at: self.char_index_of(pid),
                    text: data.to_owned(),
                });
            }
            return changes;
        }
        for (j, ch) in data.chars().enumerate() {
            let vid = virtual_id(pid, j);
            match self.find(&vid) {
                Ok(l) => {
                    let e = &mut self.chunks[l.0].entries[l.1];
                    if e.kind == Kind::Unknown {
                        // A delete of this char arrived before the atom.
                        e.kind = Kind::Virtual;
                        e.data = SmallText::from_char(ch);
                    }
                }
                Err(l) => {
                    self.insert_at(
                        l,
                        Entry {
                            pid: vid.clone(),
                            data: SmallText::from_char(ch),
                            kind: Kind::Virtual,
                            live,
                        },
                    );
                    if live && report {
                        push_insert(&mut changes, self.char_index_of(&vid), ch);
                    }
                }
            }
        }
        changes
    }

    /// The char index of the live char entry `pid`, which is present: O(1)
    /// for the last entry (a document received or loaded in order grows at
    /// its end).
    fn char_index_of(&self, pid: &Pid) -> usize {
        let loc = self.find(pid).expect("present");
        if self.loc_after(loc).is_none() {
            return self.live_chars - 1;
        }
        self.char_index(loc)
    }

    /// Inserts `text` at char `index`. Returns the ops to send.
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
        let next = self.locate_char(index).unwrap_or_else(|| self.end());
        let at = self.insertion_point(alloc, next);
        let left = self.pid_before(at).cloned();
        let right = self.pid_at(at).cloned();
        let mut atoms = Vec::new();
        self.place_text(alloc, left, right.as_ref(), text, &mut atoms)?;
        if let (Some(f), Some(l)) = (atoms.first(), atoms.last()) {
            self.last_insert = Some((f.pid().clone(), l.pid().clone()));
        }
        Ok(atoms.into_iter().map(LocalOp::Insert).collect())
    }

    /// Where in the gap before the live entry at `next` (a gap of entries
    /// that show no char: tombstones, headers) new text goes. Every point
    /// of the gap gives the same text; the point decides which runs the
    /// new ids continue (PROTOCOL.md 1.4):
    /// - typing on after the last insert: right after the char just typed
    ///   (the allocator extends or nests there), never past a tombstone,
    ///   which may hold text another replica typed after it concurrently;
    /// - typing before the first char of the last insert (backwards):
    ///   right before it (the allocator extends or nests under it);
    /// - otherwise (a jump, or retyping after a backspace): the rightmost
    ///   point that allows a forward extension (after an own tombstone the
    ///   run goes on), else right before `next` (past the tombstones, the
    ///   widest gap, which keeps ids short: measured on the traces).
    fn insertion_point(&self, alloc: &Allocator, next: Loc) -> Loc {
        // The gap's points, right to left.
        let mut points = vec![next];
        let mut at = next;
        while let Some(p) = self.loc_before(at) {
            if self.entry(p).live_chars() != 0 {
                break;
            }
            at = p;
            points.push(at);
        }
        let left_char = self.loc_before(at).map(|l| &self.entry(l).pid);
        let right_char = self.pid_at(next);
        let extends = |l: &Loc| {
            alloc
                .forward_extension(self.pid_before(*l), self.pid_at(*l))
                .is_some()
        };
        match &self.last_insert {
            Some((_, last)) if left_char == Some(last) => at,
            Some((first, _)) if right_char == Some(first) => next,
            _ => points.iter().find(|l| extends(l)).copied().unwrap_or(next),
        }
    }

    /// Places `text` as a run of one-char atoms between two adjacent
    /// entries: consecutive ids under one prefix, allocated as a block
    /// (PROTOCOL.md 1.4), so a paste or a coalesced paragraph is one run;
    /// pushes them to `atoms`.
    fn place_text(
        &mut self,
        alloc: &mut Allocator,
        mut prev: Option<Pid>,
        right: Option<&Pid>,
        text: &str,
        atoms: &mut Vec<Atom>,
    ) -> Result<(), EditError> {
        let chars: Vec<char> = text.chars().collect();
        let mut buf = [0u8; 4];
        // Blocks far below the smallest region (2^21 idents): a huge paste
        // is a few runs, each allocated on its own, rather than an error.
        for block in chars.chunks(1 << 16) {
            let first = alloc.run_between(prev.as_ref(), right, block.len() as u32)?;
            for (j, &ch) in block.iter().enumerate() {
                let pid = first
                    .offset(j as u32)
                    .expect("run_between leaves room for the whole block");
                let piece: &str = ch.encode_utf8(&mut buf);
                let atom = Atom::new(piece, pid.clone()).expect("one char is 1..=4 bytes");
                self.add_atom(piece, &pid, true, false);
                prev = Some(pid);
                atoms.push(atom);
            }
        }
        Ok(())
    }

    /// Deletes the chars in `range`. Returns the ops to send.
    pub fn delete(
        &mut self,
        _alloc: &mut Allocator,
        range: Range<usize>,
    ) -> Result<Vec<LocalOp>, EditError> {
        if range.end > self.live_chars || range.start > range.end {
            return Err(EditError::OutOfRange {
                index: range.end,
                len: self.live_chars,
            });
        }
        let mut ops = Vec::new();
        let Some(mut loc) = self.locate_char(range.start) else {
            return Ok(ops);
        };
        // Collect the ids first; killing does not move entries.
        let mut victims = Vec::with_capacity(range.len());
        while victims.len() < range.len() {
            let e = self.entry(loc);
            if e.live && e.chars() == 1 {
                victims.push(e.pid.clone());
            }
            loc.1 += 1;
            if loc.1 == self.chunks[loc.0].entries.len() {
                loc = (loc.0 + 1, 0);
            }
        }
        let mut i = 0;
        while i < victims.len() {
            let pid = &victims[i];
            let l = self.find(pid).expect("collected above");
            if self.entry(l).kind == Kind::Virtual {
                // Every live char of this atom in the range: delete the atom.
                let atom = parent(pid);
                let live_of_atom = self.live_virtuals(&atom);
                let k = live_of_atom.len();
                if victims[i..].len() >= k
                    && live_of_atom.iter().zip(&victims[i..]).all(|(a, b)| a == b)
                {
                    self.kill_atom(&atom);
                    ops.push(LocalOp::Delete(atom));
                    i += k;
                    continue;
                }
            }
            self.kill(l);
            ops.push(LocalOp::Delete(pid.clone()));
            i += 1;
        }
        Ok(ops)
    }

    /// The live virtual entries of a multi-char atom, in order.
    fn live_virtuals(&self, atom: &Pid) -> Vec<Pid> {
        let Ok(l) = self.find(atom) else {
            return Vec::new();
        };
        let n = self.entry(l).data.chars().count();
        (0..n)
            .map(|j| virtual_id(atom, j))
            .filter(|v| self.find(v).is_ok_and(|l| self.entry(l).live))
            .collect()
    }

    /// Kills an atom and all its chars; returns the text changes.
    fn kill_atom(&mut self, pid: &Pid) -> Vec<TextChange> {
        let mut changes = Vec::new();
        let Ok(l) = self.find(pid) else {
            return changes;
        };
        let e = self.entry(l);
        let (kind, n) = (e.kind, e.data.chars().count());
        if kind == Kind::Header {
            self.kill(l);
            for j in 0..n {
                if let Ok(vl) = self.find(&virtual_id(pid, j)) {
                    let at = self.char_index(vl);
                    if let Some(ch) = self.kill(vl) {
                        push_delete(&mut changes, at, &ch);
                    }
                }
            }
        } else {
            let at = self.char_index(l);
            if let Some(ch) = self.kill(l) {
                push_delete(&mut changes, at, &ch);
            }
        }
        changes
    }

    /// Applies an insert from the server. Idempotent.
    pub fn apply_insert(&mut self, data: &str, pid: &Pid) -> Vec<TextChange> {
        match self.find(pid) {
            Ok(l) if self.entry(l).kind == Kind::Unknown => {
                // Deleted before its insert arrived: it stays deleted, but
                // its chars' ids must be known (they are reserved).
                self.remove(l);
                self.add_atom(data, pid, false, false);
                Vec::new()
            }
            Ok(_) => Vec::new(),
            Err(_) => self.add_atom(data, pid, true, true),
        }
    }

    /// Applies a delete from the server. Idempotent; an unknown id is kept
    /// as a tombstone so its insert, if it comes later, stays deleted.
    pub fn apply_delete(&mut self, pid: &Pid) -> Vec<TextChange> {
        match self.find(pid) {
            Ok(l) => match self.entry(l).kind {
                Kind::Header | Kind::Atom => self.kill_atom(pid),
                _ => {
                    let at = self.char_index(l);
                    self.kill(l)
                        .map(|ch| vec![TextChange::Deleted { at, text: ch }])
                        .unwrap_or_default()
                }
            },
            Err(l) => {
                self.insert_at(
                    l,
                    Entry {
                        pid: pid.clone(),
                        data: SmallText::default(),
                        kind: Kind::Unknown,
                        live: false,
                    },
                );
                Vec::new()
            }
        }
    }

    /// Removes an atom whose id never left this device (its insert was
    /// cancelled by a delete before it was sent), virtual entries included,
    /// as if it never existed. Returns whether it was there.
    pub fn forget(&mut self, pid: &Pid) -> bool {
        let Ok(l) = self.find(pid) else { return false };
        let e = self.remove(l);
        if e.kind == Kind::Header {
            for j in 0..e.data.chars().count() {
                if let Ok(vl) = self.find(&virtual_id(pid, j)) {
                    self.remove(vl);
                }
            }
        }
        true
    }

    /// The ids of the live atoms (not their chars).
    pub(crate) fn live_atoms(&self) -> Vec<Pid> {
        self.entries()
            .filter(|e| e.live && matches!(e.kind, Kind::Atom | Kind::Header))
            .map(|e| e.pid.clone())
            .collect()
    }

    /// What to persist: every atom with its data (live or not), and every
    /// deleted id (atoms, chars, and ids known only as deleted).
    pub fn to_parts(&self) -> (Vec<(Pid, SmallText)>, Vec<Pid>) {
        let mut atoms = Vec::new();
        let mut deleted = Vec::new();
        for e in self.entries() {
            if matches!(e.kind, Kind::Atom | Kind::Header) {
                atoms.push((e.pid.clone(), e.data.clone()));
            }
            let dead_by_itself = match e.kind {
                // A dead virtual entry of a dead atom follows from the atom.
                Kind::Virtual => {
                    !e.live && self.find(&parent(&e.pid)).is_ok_and(|l| self.entry(l).live)
                }
                _ => !e.live,
            };
            if dead_by_itself {
                deleted.push(e.pid.clone());
            }
        }
        (atoms, deleted)
    }

    /// Rebuilds a document from persisted parts.
    pub fn from_parts(
        id: DocId,
        name: DocName,
        atoms: Vec<(Pid, impl AsRef<str>)>,
        deleted: Vec<Pid>,
    ) -> Self {
        let mut doc = Doc::new(id, name);
        for (pid, data) in atoms {
            if !doc.contains(&pid) {
                doc.add_atom(data.as_ref(), &pid, true, false);
            }
        }
        for pid in deleted {
            doc.apply_delete(&pid);
        }
        doc
    }
}

/// The atom id a virtual id belongs to.
fn parent(vid: &Pid) -> Pid {
    let levels: Vec<Level> = vid.levels().collect();
    Pid::from_levels(&levels[..levels.len() - 1])
}

/// Text changes in the order they happened, an insert that continues the
/// one before it (at the char after its end) merged into it, and a delete
/// at the index of the delete before it: a note pulled whole is one change,
/// not one per char (each with its own `String`).
#[derive(Debug, Default)]
pub struct Changes {
    list: Vec<TextChange>,
    /// The char index after the last change, if it is an insert.
    insert_end: Option<usize>,
}

impl Changes {
    pub fn push(&mut self, c: TextChange) {
        if let (Some(end), TextChange::Inserted { at, text }) = (self.insert_end, &c)
            && *at == end
            && let Some(TextChange::Inserted { text: last, .. }) = self.list.last_mut()
        {
            last.push_str(text);
            self.insert_end = Some(end + text.chars().count());
            return;
        }
        if let TextChange::Deleted { at, text } = &c
            && let Some(TextChange::Deleted {
                at: last_at,
                text: last,
            }) = self.list.last_mut()
            && at == last_at
        {
            last.push_str(text);
            return;
        }
        self.insert_end = match &c {
            TextChange::Inserted { at, text } => Some(at + text.chars().count()),
            TextChange::Deleted { .. } => None,
        };
        self.list.push(c);
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn into_vec(self) -> Vec<TextChange> {
        self.list
    }
}

impl Extend<TextChange> for Changes {
    fn extend<I: IntoIterator<Item = TextChange>>(&mut self, iter: I) {
        for c in iter {
            self.push(c);
        }
    }
}

fn push_insert(changes: &mut Vec<TextChange>, at: usize, ch: char) {
    if let Some(TextChange::Inserted { at: a, text }) = changes.last_mut() {
        if *a + text.chars().count() == at {
            text.push(ch);
            return;
        }
    }
    changes.push(TextChange::Inserted {
        at,
        text: ch.to_string(),
    });
}

fn push_delete(changes: &mut Vec<TextChange>, at: usize, ch: &str) {
    if let Some(TextChange::Deleted { at: a, text }) = changes.last_mut() {
        if *a == at {
            text.push_str(ch);
            return;
        }
    }
    changes.push(TextChange::Deleted {
        at,
        text: ch.to_owned(),
    });
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

    /// Applies text changes to a string of chars, as an app does.
    fn replay(text: &str, changes: &[TextChange]) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        for c in changes {
            match c {
                TextChange::Inserted { at, text } => {
                    chars.splice(*at..*at, text.chars());
                }
                TextChange::Deleted { at, text } => {
                    let n = text.chars().count();
                    let gone: String = chars.drain(*at..*at + n).collect();
                    assert_eq!(&gone, text);
                }
            }
        }
        chars.into_iter().collect()
    }

    #[test]
    fn merged_changes_say_what_the_changes_one_by_one_say() {
        let ins = |at, t: &str| TextChange::Inserted { at, text: t.into() };
        let del = |at, t: &str| TextChange::Deleted { at, text: t.into() };
        let steps = vec![
            ins(0, "h"),
            ins(1, "é"),
            ins(2, "llo"),
            ins(5, " w"),
            ins(0, ">"),
            del(1, "h"),
            del(1, "é"),
            del(1, "l"),
            ins(3, "!"),
            del(0, ">"),
            ins(4, "x"),
        ];
        let mut merged = Changes::default();
        merged.extend(steps.clone());
        let merged = merged.into_vec();
        assert_eq!(merged.len(), 6, "{merged:?}");
        assert_eq!(merged[0], ins(0, "héllo w"));
        assert_eq!(merged[2], del(1, "hél"));
        assert_eq!(replay("", &steps), "lo! xw");
        assert_eq!(replay("", &merged), "lo! xw");
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
    fn edits_inside_a_multi_char_atom_use_its_virtual_ids() {
        let mut a = Doc::new(1, DocName::default());
        let mut b = Doc::new(1, DocName::default());
        let mut al = alloc(1);
        // A multi-char atom, as an old client or file makes it.
        let mut ops = vec![old_atom(&mut a, "hello world")];
        ops.extend(a.insert(&mut al, 5, ",").unwrap());
        let del = a.delete(&mut al, 1..3).unwrap();
        assert!(
            del.iter()
                .all(|op| matches!(op, LocalOp::Delete(p) if p.depth() == 2)),
            "{del:?}"
        );
        ops.extend(del);
        ops.extend(a.insert(&mut al, 10, "!").unwrap());
        assert_eq!(a.text(), "hlo, world!");
        apply_all(&mut b, &ops);
        assert_eq!(b.text(), a.text());
        apply_all(&mut b, &ops);
        assert_eq!(b.text(), a.text());
        // Deleting every char of the atom deletes the atom itself.
        let del = a.delete(&mut al, 0..11).unwrap();
        assert!(
            del.contains(&LocalOp::Delete(ops_first_pid(&ops))),
            "{del:?}"
        );
        assert_eq!(a.text(), "");
    }

    #[test]
    fn a_paste_is_one_run_and_retyping_after_a_backspace_extends_it() {
        let mut a = Doc::new(1, DocName::default());
        let mut al = alloc(1);
        let mut ops = a.insert(&mut al, 0, "héllo").unwrap();
        ops.extend(a.delete(&mut al, 4..5).unwrap());
        ops.extend(a.insert(&mut al, 4, "o!").unwrap());
        assert_eq!(a.text(), "héllo!");
        let pids: Vec<Pid> = ops
            .iter()
            .filter_map(|op| match op {
                LocalOp::Insert(x) => Some(x.pid().clone()),
                LocalOp::Delete(_) => None,
            })
            .collect();
        assert_eq!(pids.len(), 7);
        for w in pids.windows(2) {
            assert_eq!(w[0].offset(1).as_ref(), Some(&w[1]), "{pids:?}");
        }
    }

    /// Applies a multi-char atom of site 9 at the end of `doc`.
    fn old_atom(doc: &mut Doc, text: &str) -> LocalOp {
        let pid = Pid::from_levels(&[Level::new(1 << 30, 9)]);
        doc.apply_insert(text, &pid);
        LocalOp::Insert(Atom::new(text, pid).unwrap())
    }

    fn ops_first_pid(ops: &[LocalOp]) -> Pid {
        match &ops[0] {
            LocalOp::Insert(a) => a.pid().clone(),
            LocalOp::Delete(p) => p.clone(),
        }
    }

    #[test]
    fn concurrent_edits_inside_one_atom_do_not_duplicate_it() {
        let mut al = alloc(1);
        let mut bl = alloc(2);
        let mut a = Doc::new(1, DocName::default());
        let base = vec![old_atom(&mut a, "hello world")];
        let mut b = Doc::new(1, DocName::default());
        apply_all(&mut b, &base);
        let mut oa = a.insert(&mut al, 5, " AAA").unwrap();
        oa.extend(a.delete(&mut al, 0..1).unwrap());
        let mut ob = b.insert(&mut bl, 5, " BBB").unwrap();
        ob.extend(b.delete(&mut bl, 10..15).unwrap());
        apply_all(&mut a, &ob);
        apply_all(&mut b, &oa);
        assert_eq!(a.text(), b.text());
        assert_eq!(a.text().matches("ello").count(), 1, "{}", a.text());
    }

    #[test]
    fn split_atoms_respects_char_boundaries() {
        let s = "é".repeat(200);
        let pieces: Vec<&str> = split_atoms(&s).collect();
        assert_eq!(pieces.len(), 2);
        assert!(pieces.iter().all(|p| p.len() <= 255));
        assert_eq!(pieces.concat(), s);
    }

    #[test]
    fn delete_before_insert_stays_deleted_chars_too() {
        let mut a = Doc::new(1, DocName::default());
        let ops = [old_atom(&mut a, "xy")];
        let LocalOp::Insert(atom) = &ops[0] else {
            panic!()
        };
        let mut b = Doc::new(1, DocName::default());
        // The delete of char 1 arrives before the atom.
        assert!(b.apply_delete(&virtual_id(atom.pid(), 1)).is_empty());
        assert_eq!(b.apply_insert(atom.data(), atom.pid()).len(), 1);
        assert_eq!(b.text(), "x");
    }
}
