//! Runs and chunks (schema 4): a document's content as runs of chars
//! packed into chunk rows, their in-memory form, their encoding, and the
//! per-id edits the write path makes on a decoded chunk. No database
//! access: `write` loads and stores chunks, `read` decodes them.
//!
//! Ids are grouped by `(depth, prefix, site)` (the *group*: every level
//! but the last, and the last level's site); within a group ids are
//! ordered by their last ident. A *run key* is `group ++ ident` (u32
//! big-endian): byte order is (depth, prefix, site, ident) order, so the
//! run holding an id is the last item at or before its run key.
//!
//! An item covers the idents `first..first+n` of one group and is either
//! a run of one-char atoms (as segments: consecutive chars with one
//! insert time, delete time and deleter, each time possibly stepping by
//! one per char) or a live multi-char atom (PROTOCOL.md 1.2, one id). A
//! deleted multi-char atom becomes a deleted char of a run: its text is
//! dropped (a re-sent insert of a deleted id is answered with its delete,
//! never checked for `id_conflict`), and the wire cannot tell the two
//! apart (both are a delete of the id).

use std::ops::Range;

use notesync_protocol::pid::LEVEL_BYTES;
use notesync_protocol::{Pid, Time};

use super::error::{StoreError, corrupt};

/// A chunk is split once its encoding passes this many bytes (a redb
/// leaf page is 4 KiB: two chunks and their keys share one).
pub(super) const CHUNK_MAX: usize = 1800;

const TABLE: &str = "chunks";

/// One segment of a run: `len` consecutive chars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Seg {
    pub len: u32,
    /// Insert time of the first char (0: known only from a delete).
    pub ins: Time,
    /// 0 or 1: char `j`'s insert time is `ins + ins_step * j`.
    pub ins_step: i8,
    /// Delete time of the first char (0: live).
    pub del: Time,
    /// -1, 0 or 1, as `ins_step`.
    pub del_step: i8,
    /// Site of the first delete's sender (0 while live or none).
    pub deleter: u8,
    /// The chars' UTF-8 text; empty unless live (inserted, not deleted).
    pub text: Vec<u8>,
}

/// What an id holds, as a pull needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CharState {
    pub insert: Time,
    pub delete: Time,
    pub deleter: u8,
    /// Live text (one char for a run's char, the whole text for an atom);
    /// empty when deleted or never inserted.
    pub text: Vec<u8>,
    /// A live multi-char atom.
    pub atom: bool,
}

fn step_time(base: Time, step: i8, j: u32) -> Time {
    match step {
        0 => base,
        1 => base + u64::from(j),
        _ => base - u64::from(j),
    }
}

/// Byte offset of char `k` of `text` (its length if `k` is the count).
/// `chars`: how many chars `text` holds, when known: all-ASCII text (its
/// bytes are its chars) is then indexed at once, not walked (the writer
/// asks for every char of an upserted run in turn).
pub(super) fn char_offset_in(text: &[u8], chars: u32, k: u32) -> usize {
    if text.len() == chars as usize {
        return (k as usize).min(text.len());
    }
    char_offset(text, k)
}

/// Byte offset of char `k` of `text` (its length if `k` is the count).
pub(super) fn char_offset(text: &[u8], k: u32) -> usize {
    let mut seen = 0u32;
    for (i, &b) in text.iter().enumerate() {
        if b & 0xC0 != 0x80 {
            if seen == k {
                return i;
            }
            seen += 1;
        }
    }
    text.len()
}

impl Seg {
    pub fn live(&self) -> bool {
        self.ins != 0 && self.del == 0
    }

    pub fn ins_at(&self, j: u32) -> Time {
        if self.ins == 0 {
            0
        } else {
            step_time(self.ins, self.ins_step, j)
        }
    }

    pub fn del_at(&self, j: u32) -> Time {
        if self.del == 0 {
            0
        } else {
            step_time(self.del, self.del_step, j)
        }
    }

    /// The latest time it holds.
    pub fn max_time(&self) -> Time {
        let last = self.len - 1;
        self.ins_at(0)
            .max(self.ins_at(last))
            .max(self.del_at(0))
            .max(self.del_at(last))
    }

    /// A step means nothing without two chars or without a time: 0, so
    /// that equal segments encode alike.
    fn canon(&mut self) {
        if self.len <= 1 || self.ins == 0 {
            self.ins_step = 0;
        }
        if self.len <= 1 || self.del == 0 {
            self.del_step = 0;
        }
    }

    /// Splits before char `k` (0 < k < len).
    pub fn split(&self, k: u32) -> (Seg, Seg) {
        let at = if self.live() {
            char_offset_in(&self.text, self.len, k)
        } else {
            0
        };
        // Field by field: `..self.clone()` would copy the whole text twice.
        let mut left = Seg {
            len: k,
            ins: self.ins,
            ins_step: self.ins_step,
            del: self.del,
            del_step: self.del_step,
            deleter: self.deleter,
            text: self.text[..at].to_vec(),
        };
        let mut right = Seg {
            len: self.len - k,
            ins: self.ins_at(k),
            ins_step: self.ins_step,
            del: self.del_at(k),
            del_step: self.del_step,
            deleter: self.deleter,
            text: self.text[at..].to_vec(),
        };
        left.canon();
        right.canon();
        (left, right)
    }

    /// Makes `self` say `self` then `b`, if one segment can say both
    /// (`false`, and `self` unchanged, if not). In place: a run grows by
    /// one char at a time as an upsert's chars are stored, and building
    /// a new segment each time would copy its text each time (quadratic
    /// in the run's length).
    pub fn append(&mut self, b: &Seg) -> bool {
        let a = &*self;
        if (a.ins == 0) != (b.ins == 0) || (a.del == 0) != (b.del == 0) || a.deleter != b.deleter {
            return false;
        }
        let fit =
            |abase: Time, astep: i8, alen: u32, bbase: Time, bstep: i8, blen: u32, steps: &[i8]| {
                if abase == 0 {
                    return Some(0);
                }
                steps.iter().copied().find(|&s| {
                    (alen == 1 || astep == s)
                        && (blen == 1 || bstep == s)
                        && match s {
                            0 => bbase == abase,
                            1 => abase.checked_add(u64::from(alen)) == Some(bbase),
                            _ => abase.checked_sub(u64::from(alen)) == Some(bbase),
                        }
                })
            };
        let Some(ins_step) = fit(a.ins, a.ins_step, a.len, b.ins, b.ins_step, b.len, &[0, 1])
        else {
            return false;
        };
        let Some(del_step) = fit(
            a.del,
            a.del_step,
            a.len,
            b.del,
            b.del_step,
            b.len,
            &[0, 1, -1],
        ) else {
            return false;
        };
        let Some(len) = a.len.checked_add(b.len) else {
            return false;
        };
        self.len = len;
        self.ins_step = ins_step;
        self.del_step = del_step;
        self.text.extend_from_slice(&b.text);
        self.canon();
        true
    }

    fn state(&self, j: u32) -> CharState {
        let text = if self.live() {
            let (s, e) = (
                char_offset_in(&self.text, self.len, j),
                char_offset_in(&self.text, self.len, j + 1),
            );
            self.text[s..e].to_vec()
        } else {
            Vec::new()
        };
        CharState {
            insert: self.ins_at(j),
            delete: self.del_at(j),
            deleter: self.deleter,
            text,
            atom: false,
        }
    }
}

/// What an item holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Body {
    Run(Vec<Seg>),
    /// A live atom of two or more chars at one id.
    Atom {
        insert: Time,
        text: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Item {
    /// `depth (u8) ++ prefix key ++ site`.
    pub group: Vec<u8>,
    pub first: u32,
    pub body: Body,
}

impl Item {
    pub fn len(&self) -> u32 {
        match &self.body {
            Body::Run(segs) => segs.iter().map(|s| s.len).sum(),
            Body::Atom { .. } => 1,
        }
    }

    /// Run key of its first id.
    pub fn key(&self) -> Vec<u8> {
        run_key(&self.group, self.first)
    }

    fn covers(&self, group: &[u8], ident: u32) -> bool {
        self.group == group
            && ident >= self.first
            && u64::from(ident) < u64::from(self.first) + u64::from(self.len())
    }

    fn end(&self) -> u64 {
        u64::from(self.first) + u64::from(self.len())
    }

    pub fn max_time(&self) -> Time {
        match &self.body {
            Body::Run(segs) => segs.iter().map(Seg::max_time).max().unwrap_or(0),
            Body::Atom { insert, .. } => *insert,
        }
    }
}

/// The group of an id and its last ident; `None` for a key that is not a
/// position id.
pub(super) fn split_pid_key(pid_key: &[u8]) -> Option<(Vec<u8>, u32)> {
    if pid_key.is_empty() || pid_key.len() % LEVEL_BYTES != 0 {
        return None;
    }
    let depth = u8::try_from(pid_key.len() / LEVEL_BYTES).ok()?;
    let at = pid_key.len() - LEVEL_BYTES;
    let mut group = Vec::with_capacity(at + 2);
    group.push(depth);
    group.extend_from_slice(&pid_key[..at]);
    group.push(pid_key[pid_key.len() - 1]);
    let ident = u32::from_be_bytes([
        pid_key[at],
        pid_key[at + 1],
        pid_key[at + 2],
        pid_key[at + 3],
    ]);
    Some((group, ident))
}

pub(super) fn run_key(group: &[u8], ident: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + 4);
    k.extend_from_slice(group);
    k.extend_from_slice(&ident.to_be_bytes());
    k
}

/// The id `ident` of `group`.
pub(super) fn pid_of(group: &[u8], ident: u32) -> Result<Pid, StoreError> {
    let bad = || corrupt(TABLE, "a group is not a position id prefix");
    let (_, rest) = group.split_first().ok_or_else(bad)?;
    let (&site, prefix) = rest.split_last().ok_or_else(bad)?;
    let mut key = Vec::with_capacity(prefix.len() + LEVEL_BYTES);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&ident.to_be_bytes());
    key.push(site);
    Pid::from_key(&key).ok_or_else(bad)
}

/// The id one level up (the atom whose virtual chars this group's ids
/// may be): `None` for a one-level group.
pub(super) fn parent_key(group: &[u8]) -> Option<&[u8]> {
    (group.len() > 2).then(|| &group[1..group.len() - 1])
}

/// A decoded chunk row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Chunk {
    /// The latest change time it holds (its `chunk_times` entry).
    pub changed: Time,
    /// Items in run key order, never overlapping.
    pub items: Vec<Item>,
}

/// Where an id is in a chunk.
enum Spot {
    /// Item `i` covers it.
    In(usize),
    /// No item covers it; a new one would go at `i`.
    Gap(usize),
}

impl Chunk {
    fn spot(&self, group: &[u8], ident: u32) -> Spot {
        // The first item whose (group, first) is after (group, ident).
        let i = self
            .items
            .partition_point(|it| (it.group.as_slice(), it.first) <= (group, ident));
        if i > 0 && self.items[i - 1].covers(group, ident) {
            Spot::In(i - 1)
        } else {
            Spot::Gap(i)
        }
    }

    /// Whether an item of this chunk covers the id (live or a tombstone).
    pub fn covers(&self, group: &[u8], ident: u32) -> bool {
        matches!(self.spot(group, ident), Spot::In(_))
    }

    /// The id's insert and delete times (0: none), without its text:
    /// [`Chunk::state`] finds a run's char by walking its text, which per
    /// id of a long run is quadratic.
    pub fn times(&self, group: &[u8], ident: u32) -> Option<(Time, Time)> {
        let Spot::In(i) = self.spot(group, ident) else {
            return None;
        };
        let it = &self.items[i];
        match &it.body {
            Body::Atom { insert, .. } => Some((*insert, 0)),
            Body::Run(segs) => {
                let mut off = ident - it.first;
                for s in segs {
                    if off < s.len {
                        return Some((s.ins_at(off), s.del_at(off)));
                    }
                    off -= s.len;
                }
                None
            }
        }
    }

    /// What the id holds in this chunk (None: nothing, not even a
    /// tombstone).
    pub fn state(&self, group: &[u8], ident: u32) -> Option<CharState> {
        let Spot::In(i) = self.spot(group, ident) else {
            return None;
        };
        let it = &self.items[i];
        match &it.body {
            Body::Atom { insert, text } => Some(CharState {
                insert: *insert,
                delete: 0,
                deleter: 0,
                text: text.clone(),
                atom: true,
            }),
            Body::Run(segs) => {
                let mut off = ident - it.first;
                for s in segs {
                    if off < s.len {
                        return Some(s.state(off));
                    }
                    off -= s.len;
                }
                None
            }
        }
    }

    /// Stores a live multi-char atom at an id nothing covers.
    pub fn put_atom(&mut self, group: &[u8], ident: u32, insert: Time, text: &[u8]) {
        if let Spot::Gap(i) = self.spot(group, ident) {
            self.items.insert(
                i,
                Item {
                    group: group.to_vec(),
                    first: ident,
                    body: Body::Atom {
                        insert,
                        text: text.to_vec(),
                    },
                },
            );
            self.changed = self.changed.max(insert);
        }
    }

    /// Makes the id's char `seg` (one char): replaces what covers it (a
    /// run's char, or an atom) or fills a gap, merging with neighbours.
    pub fn put_char(&mut self, group: &[u8], ident: u32, seg: Seg) {
        self.changed = self.changed.max(seg.max_time());
        match self.spot(group, ident) {
            Spot::In(i) => {
                let off = ident - self.items[i].first;
                if let Body::Run(segs) = &mut self.items[i].body {
                    replace_char(segs, off, seg);
                    return;
                }
                // An atom turns into a char (its delete): out, then in
                // again as a gap.
                self.items.remove(i);
                self.fill_gap(i, group, ident, seg);
            }
            Spot::Gap(i) => self.fill_gap(i, group, ident, seg),
        }
    }

    fn fill_gap(&mut self, i: usize, group: &[u8], ident: u32, seg: Seg) {
        let joins_left = i > 0 && {
            let l = &self.items[i - 1];
            l.group == group && matches!(l.body, Body::Run(_)) && l.end() == u64::from(ident)
        };
        let joins_right = i < self.items.len() && {
            let r = &self.items[i];
            r.group == group
                && matches!(r.body, Body::Run(_))
                && u64::from(r.first) == u64::from(ident) + 1
        };
        match (joins_left, joins_right) {
            (true, _) => {
                if let Body::Run(segs) = &mut self.items[i - 1].body {
                    push_seg(segs, seg);
                }
                if joins_right {
                    let right = self.items.remove(i);
                    if let (Body::Run(segs), Body::Run(more)) =
                        (&mut self.items[i - 1].body, right.body)
                    {
                        for s in more {
                            push_seg(segs, s);
                        }
                    }
                }
            }
            (false, true) => {
                let r = &mut self.items[i];
                r.first = ident;
                if let Body::Run(segs) = &mut r.body {
                    let mut new = vec![seg];
                    for s in segs.drain(..) {
                        push_seg(&mut new, s);
                    }
                    *segs = new;
                }
            }
            (false, false) => self.items.insert(
                i,
                Item {
                    group: group.to_vec(),
                    first: ident,
                    body: Body::Run(vec![seg]),
                },
            ),
        }
    }

    /// Splits into chunks of at most [`CHUNK_MAX`] encoded bytes where it
    /// can (a single char bigger than that stays whole).
    pub fn split_to_fit(self) -> Vec<Chunk> {
        if self.encode().len() <= CHUNK_MAX {
            return vec![self];
        }
        let changed = self.changed;
        let mut items = self.items;
        if items.len() == 1 {
            // One big run: cut it in two runs at a segment (or char) middle.
            let it = items.pop().expect("one item");
            match it.body {
                Body::Run(mut segs) if it.len() > 1 => {
                    if segs.len() == 1 {
                        let s = segs.pop().expect("one segment");
                        let (a, b) = s.split(s.len / 2);
                        segs = vec![a, b];
                    }
                    let right: Vec<Seg> = segs.split_off(segs.len() / 2);
                    let left_len: u32 = segs.iter().map(|s| s.len).sum();
                    let l = Item {
                        group: it.group.clone(),
                        first: it.first,
                        body: Body::Run(segs),
                    };
                    let r = Item {
                        group: it.group,
                        first: it.first + left_len,
                        body: Body::Run(right),
                    };
                    items = vec![l, r];
                }
                body => {
                    return vec![Chunk {
                        changed,
                        items: vec![Item { body, ..it }],
                    }];
                }
            }
        }
        let right = items.split_off(items.len() / 2);
        let mut out = Chunk { changed, items }.split_to_fit();
        out.extend(
            Chunk {
                changed,
                items: right,
            }
            .split_to_fit(),
        );
        out
    }

    // ------------------------------------------------------------ encoding
    //
    // changed u64, then items until the end. An item: a flags byte (bit 0:
    // same group as the previous item, bit 1: an atom), the group (depth
    // u8, prefix, site) unless the same, `first` as a varint (the gap
    // after the previous item's end in the same group, else absolute),
    // then an atom's insert time and text (varint length, bytes), or a
    // run's segment count (varint) and segments. A segment: a flags byte
    // (bits 0-1 insert: 0 none, 1 equal, 2 stepping by one; bits 2-3
    // delete: 0 live, 1 equal, 2 +1, 3 -1; bit 4: same deleter as the
    // chunk's previous deleted segment; bit 5: the text is one byte per
    // char), `len` (varint), the insert time and the delete time if
    // present, the deleter (u8) if deleted and not the same, the text
    // (varint byte length unless bit 5, bytes) if live. Times are zigzag
    // varints against the chunk's previous insert time (for inserts) or
    // delete time (for deletes): typed text costs a byte or two per time.

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&self.changed.to_be_bytes());
        let (mut prev_ins, mut prev_del) = (0u64, 0u64);
        let mut prev_deleter: Option<u8> = None;
        let mut prev: Option<(&[u8], u64)> = None;
        for it in &self.items {
            let same = prev.is_some_and(|(g, _)| g == it.group.as_slice());
            let atom = matches!(it.body, Body::Atom { .. });
            v.push(u8::from(same) | (u8::from(atom) << 1));
            if same {
                let end = prev.map_or(0, |(_, e)| e);
                put_varint(&mut v, u64::from(it.first) - end);
            } else {
                v.extend_from_slice(&it.group);
                put_varint(&mut v, u64::from(it.first));
            }
            match &it.body {
                Body::Atom { insert, text } => {
                    put_time(&mut v, &mut prev_ins, *insert);
                    put_varint(&mut v, text.len() as u64);
                    v.extend_from_slice(text);
                }
                Body::Run(segs) => {
                    put_varint(&mut v, segs.len() as u64);
                    for s in segs {
                        let ik = match (s.ins, s.ins_step) {
                            (0, _) => 0,
                            (_, 0) => 1,
                            _ => 2,
                        };
                        let dk = match (s.del, s.del_step) {
                            (0, _) => 0,
                            (_, 0) => 1,
                            (_, 1) => 2,
                            _ => 3,
                        };
                        let same_deleter = s.del != 0 && prev_deleter == Some(s.deleter);
                        let ascii = s.live() && s.text.len() == s.len as usize;
                        v.push(
                            ik | (dk << 2) | (u8::from(same_deleter) << 4) | (u8::from(ascii) << 5),
                        );
                        put_varint(&mut v, u64::from(s.len));
                        if s.ins != 0 {
                            put_time(&mut v, &mut prev_ins, s.ins);
                        }
                        if s.del != 0 {
                            put_time(&mut v, &mut prev_del, s.del);
                            if !same_deleter {
                                v.push(s.deleter);
                            }
                            prev_deleter = Some(s.deleter);
                        }
                        if s.live() {
                            if !ascii {
                                put_varint(&mut v, s.text.len() as u64);
                            }
                            v.extend_from_slice(&s.text);
                        }
                    }
                }
            }
            prev = Some((&it.group, it.end()));
        }
        v
    }

    pub fn decode(b: &[u8]) -> Result<Chunk, StoreError> {
        let mut r = Reader { b, at: 0 };
        let changed = u64::from_be_bytes(r.take(8)?.try_into().map_err(|_| bad("short"))?);
        let mut items: Vec<Item> = Vec::new();
        let (mut prev_ins, mut prev_del) = (0u64, 0u64);
        let mut prev_deleter: Option<u8> = None;
        while r.at < b.len() {
            let flags = r.byte()?;
            if flags > 3 {
                return Err(bad("unknown item flags"));
            }
            let (group, first) = if flags & 1 != 0 {
                let p = items.last().ok_or_else(|| bad("first item refers back"))?;
                let first = p
                    .end()
                    .checked_add(r.varint()?)
                    .ok_or_else(|| bad("ident past u32"))?;
                (p.group.clone(), first)
            } else {
                let depth = r.byte()?;
                if depth == 0 {
                    return Err(bad("group of depth 0"));
                }
                let rest = r.take((usize::from(depth) - 1) * LEVEL_BYTES + 1)?;
                let mut full = Vec::with_capacity(rest.len() + 1);
                full.push(depth);
                full.extend_from_slice(rest);
                (full, r.varint()?)
            };
            let first = u32::try_from(first).map_err(|_| bad("ident past u32"))?;
            let body = if flags & 2 != 0 {
                let insert = r.time(&mut prev_ins)?;
                let n = r.len()?;
                let text = r.take(n)?.to_vec();
                Body::Atom { insert, text }
            } else {
                let n = r.len()?;
                let mut segs = Vec::new();
                let mut total = 0u64;
                for _ in 0..n {
                    let f = r.byte()?;
                    let (ik, dk) = (f & 3, (f >> 2) & 3);
                    let (same_deleter, ascii) = (f & 16 != 0, f & 32 != 0);
                    if f > 63 || ik == 3 {
                        return Err(bad("unknown segment flags"));
                    }
                    let len = u32::try_from(r.varint()?).map_err(|_| bad("segment length"))?;
                    if len == 0 {
                        return Err(bad("empty segment"));
                    }
                    total += u64::from(len);
                    let ins = if ik != 0 { r.time(&mut prev_ins)? } else { 0 };
                    let (del, deleter) = match (dk, same_deleter) {
                        (0, false) => (0, 0),
                        (0, true) => return Err(bad("a live segment names a deleter")),
                        (_, true) => (
                            r.time(&mut prev_del)?,
                            prev_deleter.ok_or_else(|| bad("no earlier deleter"))?,
                        ),
                        (_, false) => (r.time(&mut prev_del)?, r.byte()?),
                    };
                    if del != 0 {
                        prev_deleter = Some(deleter);
                    }
                    if ins == 0 && del == 0 {
                        return Err(bad("segment neither inserted nor deleted"));
                    }
                    let mut s = Seg {
                        len,
                        ins,
                        ins_step: i8::from(ik == 2),
                        del,
                        del_step: match dk {
                            2 => 1,
                            3 => -1,
                            _ => 0,
                        },
                        deleter,
                        text: Vec::new(),
                    };
                    if ascii && !s.live() {
                        return Err(bad("text flag on a deleted segment"));
                    }
                    if s.live() {
                        let n = if ascii { len as usize } else { r.len()? };
                        s.text = r.take(n)?.to_vec();
                        let text =
                            std::str::from_utf8(&s.text).map_err(|_| bad("text is not UTF-8"))?;
                        if text.chars().count() != len as usize {
                            return Err(bad("text is not one char per id"));
                        }
                    }
                    segs.push(s);
                }
                if segs.is_empty() || u64::from(first) + total > u64::from(u32::MAX) + 1 {
                    return Err(bad("run empty or past u32"));
                }
                Body::Run(segs)
            };
            let it = Item { group, first, body };
            if let Some(p) = items.last()
                && ((p.group.as_slice(), p.first) >= (it.group.as_slice(), it.first)
                    || (p.group == it.group && p.end() > u64::from(it.first)))
            {
                return Err(bad("items out of order or overlapping"));
            }
            items.push(it);
        }
        Ok(Chunk { changed, items })
    }
}

/// The `j` in `0..len` whose time `base + step * j` is after `t` (a
/// prefix, a suffix, all or none: an interval).
pub(super) fn after(base: Time, step: i8, len: u32, t: Time) -> Range<u32> {
    let len64 = u64::from(len);
    match (step, base > t) {
        (_, true) if step >= 0 => 0..len,
        (1, false) => (t - base + 1).min(len64) as u32..len,
        (-1, true) => 0..(base - t).min(len64) as u32,
        _ => 0..0,
    }
}

/// The complement of [`after`] in `0..len` (also an interval).
pub(super) fn at_or_before(base: Time, step: i8, len: u32, t: Time) -> Range<u32> {
    let a = after(base, step, len, t);
    if a.is_empty() {
        0..len
    } else if a.start == 0 {
        a.end..len
    } else {
        0..a.start
    }
}

/// Replaces char `off` of a run's segments by `seg`, merging around it.
fn replace_char(segs: &mut Vec<Seg>, mut off: u32, seg: Seg) {
    let mut i = 0;
    while i < segs.len() && off >= segs[i].len {
        off -= segs[i].len;
        i += 1;
    }
    if i == segs.len() {
        return;
    }
    let s = segs.remove(i);
    let mut parts = Vec::with_capacity(3);
    let rest = if off > 0 {
        let (a, b) = s.split(off);
        parts.push(a);
        b
    } else {
        s
    };
    let after = if rest.len > 1 {
        Some(rest.split(1).1)
    } else {
        None
    };
    parts.push(seg);
    parts.extend(after);
    // Merge with the neighbours on both sides.
    let tail: Vec<Seg> = segs.split_off(i);
    for p in parts {
        push_seg(segs, p);
    }
    for t in tail {
        push_seg(segs, t);
    }
}

fn push_seg(segs: &mut Vec<Seg>, s: Seg) {
    if let Some(last) = segs.last_mut()
        && last.append(&s)
    {
        return;
    }
    segs.push(s);
}

fn bad(what: &'static str) -> StoreError {
    corrupt(TABLE, what)
}

fn put_varint(v: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        v.push((x as u8) | 0x80);
        x >>= 7;
    }
    v.push(x as u8);
}

fn put_time(v: &mut Vec<u8>, prev: &mut u64, t: Time) {
    let d = t.wrapping_sub(*prev) as i64;
    put_varint(v, ((d << 1) ^ (d >> 63)) as u64);
    *prev = t;
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| bad("record ends early"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, StoreError> {
        let mut x = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            x |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(x);
            }
        }
        Err(bad("varint too long"))
    }

    fn len(&mut self) -> Result<usize, StoreError> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.b.len() - self.at)
            .ok_or_else(|| bad("length past the record"))
    }

    fn time(&mut self, prev: &mut u64) -> Result<Time, StoreError> {
        let z = self.varint()?;
        let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
        let t = prev.wrapping_add(d as u64);
        *prev = t;
        if t == 0 {
            return Err(bad("a stored time is 0"));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(t: Time, c: &str) -> Seg {
        Seg {
            len: 1,
            ins: t,
            ins_step: 0,
            del: 0,
            del_step: 0,
            deleter: 0,
            text: c.as_bytes().to_vec(),
        }
    }

    #[test]
    fn typed_chars_merge_into_one_segment_and_split_on_delete() {
        let g = vec![1u8, 7];
        let mut c = Chunk::default();
        for (j, ch) in "héllo".chars().enumerate() {
            c.put_char(&g, 10 + j as u32, live(100 + j as u64, &ch.to_string()));
        }
        assert_eq!(c.items.len(), 1);
        let Body::Run(segs) = &c.items[0].body else {
            panic!("a run")
        };
        assert_eq!(segs.len(), 1, "{segs:?}");
        // Delete the middle char: three segments; the text loses it.
        let st = c.state(&g, 12).expect("covered");
        assert_eq!((st.insert, st.text.as_slice()), (102, "l".as_bytes()));
        c.put_char(
            &g,
            12,
            Seg {
                del: 200,
                deleter: 3,
                text: Vec::new(),
                ..live(102, "")
            },
        );
        let st = c.state(&g, 12).expect("covered");
        assert_eq!((st.insert, st.delete, st.deleter), (102, 200, 3));
        assert_eq!(c.state(&g, 13).expect("covered").text, b"l");
        assert_eq!(c.state(&g, 11).expect("covered").text, "é".as_bytes());
        // A tombstone before the run and a char after join it.
        let mut bare = live(0, "");
        bare.del = 300;
        bare.deleter = 1;
        bare.text.clear();
        c.put_char(&g, 9, bare);
        c.put_char(&g, 15, live(400, "!"));
        assert_eq!(c.items.len(), 1);
        assert_eq!(c.items[0].first, 9);
        assert_eq!(c.items[0].len(), 7);
        // Round trip, and a split keeps every state.
        let back = Chunk::decode(&c.encode()).expect("decode");
        assert_eq!(back, c);
        assert_eq!(back.changed, 400);
        // `times` and `covers` (the upsert reply's shortcuts) agree with
        // `state` on every id, inside the run and around it.
        for ident in 7..18 {
            let st = c.state(&g, ident);
            assert_eq!(c.covers(&g, ident), st.is_some(), "id {ident}");
            assert_eq!(
                c.times(&g, ident),
                st.map(|s| (s.insert, s.delete)),
                "id {ident}"
            );
        }
    }

    #[test]
    fn char_offsets_of_ascii_and_of_multibyte_text_agree_with_the_walk() {
        for text in ["hello", "héllo", "", "日本語x"] {
            let chars = text.chars().count() as u32;
            for k in 0..=chars + 1 {
                assert_eq!(
                    char_offset_in(text.as_bytes(), chars, k),
                    char_offset(text.as_bytes(), k),
                    "{text:?} char {k}"
                );
            }
        }
    }

    #[test]
    fn big_chunks_split_and_keep_their_chars() {
        let g = vec![1u8, 1];
        let mut c = Chunk::default();
        for j in 0..3000u32 {
            // Times jump: one segment per char.
            c.put_char(&g, j, live(1000 + u64::from(j) * 7, "x"));
        }
        let parts = c.clone().split_to_fit();
        assert!(parts.len() > 1);
        for p in &parts {
            assert!(p.encode().len() <= CHUNK_MAX);
        }
        for j in 0..3000u32 {
            let st = parts.iter().find_map(|p| p.state(&g, j)).expect("kept");
            assert_eq!(st.insert, 1000 + u64::from(j) * 7);
        }
    }

    #[test]
    fn bad_records_are_errors() {
        assert!(Chunk::decode(&[0; 3]).is_err());
        let mut v = 5u64.to_be_bytes().to_vec();
        v.push(9);
        assert!(Chunk::decode(&v).is_err());
        let mut v = 5u64.to_be_bytes().to_vec();
        v.extend_from_slice(&[0, 1, 7, 0, 1, 1, 1, 200]); // text length past the end
        assert!(Chunk::decode(&v).is_err());
    }
}
