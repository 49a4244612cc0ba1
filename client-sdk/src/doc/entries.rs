//! The storage under a [`Doc`]: its entries (atoms, headers, chars,
//! unknown tombstones) in position order, in chunks that cache their live
//! char count, and the primitives the edit rules in `mod.rs` build on: find
//! an id or a char index, insert an entry, kill one, remove one. Keeps the
//! first and last invariants of the module docs (sorted, unique ids; cached
//! counts); the others are the edit rules' to keep.

use notesync_protocol::{Pid, SmallText};

use super::Doc;

const CHUNK: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A one-char atom: its char is at its id.
    Atom,
    /// An atom of two or more chars: holds the data, renders nothing.
    Header,
    /// Char `j` of a multi-char atom.
    Virtual,
    /// A deleted id whose insert this replica has not seen.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub pid: Pid,
    /// The atom's data (Atom, Header), the char (Virtual), or empty.
    pub data: SmallText,
    pub kind: Kind,
    pub live: bool,
}

impl Entry {
    /// Chars this entry shows when live.
    pub(super) fn chars(&self) -> usize {
        matches!(self.kind, Kind::Atom | Kind::Virtual) as usize
    }

    pub(super) fn live_chars(&self) -> usize {
        if self.live { self.chars() } else { 0 }
    }
}

#[derive(Debug, Clone, Default)]
pub(super) struct Chunk {
    pub(super) entries: Vec<Entry>,
    pub(super) live_chars: usize,
}

/// Where an entry is: chunk, index within it.
pub(super) type Loc = (usize, usize);

impl Doc {
    pub(super) fn entries(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.chunks.iter().flat_map(|c| c.entries.iter())
    }

    /// Binary search: `Ok` where the id is, `Err` where it would go.
    pub(super) fn find(&self, pid: &Pid) -> Result<Loc, Loc> {
        // Loading, pulling or typing at the end adds after the last entry:
        // one comparison instead of two searches.
        let last = self.chunks.len() - 1;
        if let Some(e) = self.chunks[last].entries.last() {
            match e.pid.cmp(pid) {
                std::cmp::Ordering::Less => return Err((last, self.chunks[last].entries.len())),
                std::cmp::Ordering::Equal => {
                    return Ok((last, self.chunks[last].entries.len() - 1));
                }
                std::cmp::Ordering::Greater => {}
            }
        }
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

    pub(super) fn entry(&self, (c, i): Loc) -> &Entry {
        &self.chunks[c].entries[i]
    }

    pub(super) fn pid_before(&self, (c, i): Loc) -> Option<&Pid> {
        if i > 0 {
            return Some(&self.chunks[c].entries[i - 1].pid);
        }
        self.chunks[..c]
            .iter()
            .rev()
            .find_map(|ch| ch.entries.last().map(|e| &e.pid))
    }

    /// The entry before `loc`, if any.
    pub(super) fn loc_before(&self, (c, i): Loc) -> Option<Loc> {
        if i > 0 {
            return Some((c, i - 1));
        }
        (0..c)
            .rev()
            .find(|&k| !self.chunks[k].entries.is_empty())
            .map(|k| (k, self.chunks[k].entries.len() - 1))
    }

    /// The entry after `loc`, if any.
    pub(super) fn loc_after(&self, (c, i): Loc) -> Option<Loc> {
        if i + 1 < self.chunks[c].entries.len() {
            return Some((c, i + 1));
        }
        (c + 1..self.chunks.len())
            .find(|&k| !self.chunks[k].entries.is_empty())
            .map(|k| (k, 0))
    }

    /// The id of the entry at `loc` (an insertion point) or the next one.
    pub(super) fn pid_at(&self, (c, i): Loc) -> Option<&Pid> {
        if let Some(e) = self.chunks[c].entries.get(i) {
            return Some(&e.pid);
        }
        self.chunks[c + 1..]
            .iter()
            .find_map(|ch| ch.entries.first().map(|e| &e.pid))
    }

    /// The live char entry holding char `index`; `None` for the end.
    pub(super) fn locate_char(&self, mut index: usize) -> Option<Loc> {
        for (c, ch) in self.chunks.iter().enumerate() {
            if index >= ch.live_chars {
                index -= ch.live_chars;
                continue;
            }
            for (i, e) in ch.entries.iter().enumerate() {
                let n = e.live_chars();
                if index < n {
                    return Some((c, i));
                }
                index -= n;
            }
        }
        None
    }

    /// Live chars before `loc`.
    pub(super) fn char_index(&self, (c, i): Loc) -> usize {
        let before: usize = self.chunks[..c].iter().map(|ch| ch.live_chars).sum();
        before
            + self.chunks[c].entries[..i]
                .iter()
                .map(Entry::live_chars)
                .sum::<usize>()
    }

    pub(super) fn end(&self) -> Loc {
        let c = self.chunks.len() - 1;
        (c, self.chunks[c].entries.len())
    }

    pub(super) fn insert_at(&mut self, (c, i): Loc, entry: Entry) {
        let live = entry.live_chars();
        let ch = &mut self.chunks[c];
        ch.live_chars += live;
        ch.entries.insert(i, entry);
        self.live_chars += live;
        if ch.entries.len() > 2 * CHUNK {
            let tail = ch.entries.split_off(CHUNK);
            let tail_live: usize = tail.iter().map(Entry::live_chars).sum();
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

    /// Marks an entry dead; returns the char it showed, if any.
    pub(super) fn kill(&mut self, (c, i): Loc) -> Option<String> {
        let ch = &mut self.chunks[c];
        let e = &mut ch.entries[i];
        if !e.live {
            return None;
        }
        let n = e.live_chars();
        e.live = false;
        ch.live_chars -= n;
        self.live_chars -= n;
        (n == 1).then(|| e.data.to_string())
    }

    /// Removes every entry (a document re-made whole).
    pub(super) fn clear(&mut self) {
        self.chunks = vec![Chunk::default()];
        self.live_chars = 0;
    }

    pub(super) fn entry_count(&self) -> usize {
        self.chunks.iter().map(|c| c.entries.len()).sum()
    }

    pub(super) fn remove(&mut self, (c, i): Loc) -> Entry {
        let ch = &mut self.chunks[c];
        let e = ch.entries.remove(i);
        let n = e.live_chars();
        ch.live_chars -= n;
        self.live_chars -= n;
        if ch.entries.is_empty() && self.chunks.len() > 1 {
            self.chunks.remove(c);
        }
        e
    }
}
