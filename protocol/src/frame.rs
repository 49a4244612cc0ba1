//! Typed frames, one enum per direction, and their encoders.
//!
//! Lists (atoms, deletes, synclist entries) are kept in wire form inside the
//! decoded frame: the decoder validates every item once and then hands out a
//! view over the frame's bytes, so a 100,000-atom upsert costs one pass and
//! no allocation per atom. Builders write the same wire form, so a list
//! built from values and a list decoded from bytes compare equal when their
//! bytes are equal.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::ErrorCode;
use crate::pid::{LEVEL_BYTES, Pid};
use crate::small_text::SmallText;

pub type DocId = u128;
/// Microseconds since the Unix epoch, assigned by the server. 0: never synced.
pub type Time = u64;

/// Frame headers (PROTOCOL.md, "Frames").
pub mod header {
    pub const SYNCLIST: u8 = 0;
    pub const SYNC_DOC_PULL: u8 = 1;
    pub const SYNC_DOC_UPSERT: u8 = 2;
    /// Version 2.
    pub const DOC_DELETE: u8 = 3;
    /// Version 3.
    pub const SYNC_DOC_UPSERT_RUNS: u8 = 4;
    /// Version 4.
    pub const FEED_SUBSCRIBE: u8 = 5;
    pub const SYNCLIST_RESPONSE: u8 = 32;
    pub const SYNC_DOC_RESPONSE: u8 = 33;
    pub const DOC_SYNC: u8 = 34;
    /// Version 2.
    pub const DOC_DELETED: u8 = 35;
    /// Version 2.
    pub const RESYNC: u8 = 36;
    /// Version 3.
    pub const SYNC_DOC_RESPONSE_RUNS: u8 = 37;
    /// Version 4.
    pub const FEED_CHANGES: u8 = 38;
    /// Version 4.
    pub const FEED_HEARTBEAT: u8 = 39;
    pub const SESSION_START: u8 = 64;
    pub const SESSION_INSERT: u8 = 65;
    pub const SESSION_DELETE: u8 = 66;
    pub const NAME_CHANGE: u8 = 67;
    pub const SESSION_STARTED: u8 = 68;
    pub const SESSION_ACK: u8 = 69;
    /// Version 3.
    pub const SESSION_INSERT_RUN: u8 = 70;
    /// Version 3.
    pub const SESSION_DELETE_RANGE: u8 = 71;
    pub const HELLO: u8 = 96;
    pub const WELCOME: u8 = 97;
    pub const ERROR: u8 = 127;
    /// Reserved: never a frame header in either direction (PROTOCOL.md
    /// 2.1), because a TLS alert record starts with it.
    pub const TLS_ALERT: u8 = 0x15;
    /// Reserved likewise: a TLS handshake record (a ClientHello) starts with
    /// it, so a TLS client's first byte is never taken for a frame.
    pub const TLS_HANDSHAKE: u8 = 0x16;
}

/// Whether `bytes` begin like a TLS record where a frame was expected: an
/// alert or handshake record (the reserved headers above), then the
/// record's version, major 3 and minor 0 to 4 (SSL 3.0 to TLS 1.3's
/// legacy value). One reserved byte alone is not enough to say so.
pub fn is_tls_record_start(bytes: &[u8]) -> bool {
    matches!(
        bytes,
        [header::TLS_ALERT | header::TLS_HANDSHAKE, 3, 0..=4, ..]
    )
}

/// The newest protocol version this crate speaks (sent in hello; a server
/// answers the version the connection uses in welcome).
pub const PROTOCOL_VERSION: u8 = 4;
/// The oldest protocol version a server still speaks (PROTOCOL.md 6).
pub const MIN_PROTOCOL_VERSION: u8 = 1;
/// The first version with document deletion (frames 3 and 35).
pub const VERSION_DELETION: u8 = 2;
/// The first version with the resync signal (frame 36).
pub const VERSION_RESYNC: u8 = 2;
/// The first version with runs and ranges (frames 4, 37, 70, 71).
pub const VERSION_RUNS: u8 = 3;
/// The first version with the change feed (frames 5, 38, 39).
pub const VERSION_FEED: u8 = 4;
/// Longest run text in bytes (its length is a u16).
pub const MAX_RUN_BYTES: usize = u16::MAX as usize;
/// Longest document name in bytes, terminator excluded.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest atom data in bytes.
pub const MAX_ATOM_BYTES: usize = 255;
/// Longest hello token in bytes.
pub const MAX_TOKEN_BYTES: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("document name is {0} bytes; the limit is 255")]
    NameTooLong(usize),
    #[error("document name contains a newline (0x0A), which terminates names on the wire")]
    NameHasNewline,
    #[error("atom data is empty; an atom holds 1 to 255 bytes")]
    EmptyAtom,
    #[error("atom data is {0} bytes; the limit is 255")]
    AtomTooLong(usize),
    #[error("position id is {0} levels deep; the wire allows 1 to 255")]
    BadDepth(usize),
    #[error("position id ends in site 0, which is reserved")]
    ReservedSite,
    #[error("run text is empty; a run holds 1 to 65,535 bytes")]
    EmptyRun,
    #[error("run text is {0} bytes; the limit is 65,535")]
    RunTooLong(usize),
    #[error("a range holds 1 to 65,535 ids, not 0")]
    EmptyRange,
    #[error("the last ident of a run or range of {0} ids from this id overflows u32")]
    IdentOverflow(u64),
    #[error("token is {0} bytes; the limit is 255")]
    TokenTooLong(usize),
    #[error("error message is {0} bytes; the limit is 65535")]
    MessageTooLong(usize),
}

/// A document name: UTF-8, at most 255 bytes, no 0x0A.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocName(String);

impl DocName {
    pub fn new(name: impl Into<String>) -> Result<Self, ValueError> {
        let name = name.into();
        if name.len() > MAX_NAME_BYTES {
            return Err(ValueError::NameTooLong(name.len()));
        }
        if name.contains('\n') {
            return Err(ValueError::NameHasNewline);
        }
        Ok(DocName(name))
    }

    pub(crate) fn new_unchecked(name: String) -> Self {
        DocName(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn write(&self, out: &mut BytesMut) {
        out.put_slice(self.0.as_bytes());
        out.put_u8(b'\n');
    }
}

impl std::fmt::Display for DocName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_pid(pid: &Pid) -> Result<(), ValueError> {
    if pid.depth() > 255 {
        return Err(ValueError::BadDepth(pid.depth()));
    }
    if pid.creator() == 0 {
        return Err(ValueError::ReservedSite);
    }
    Ok(())
}

/// An owned atom: 1 to 255 bytes of UTF-8 at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Atom {
    data: SmallText,
    pid: Pid,
}

impl Atom {
    pub fn new(data: impl AsRef<str>, pid: Pid) -> Result<Self, ValueError> {
        let data = data.as_ref();
        check_atom(data, &pid)?;
        Ok(Atom {
            data: SmallText::new(data),
            pid,
        })
    }

    pub fn data(&self) -> &str {
        &self.data
    }

    pub fn pid(&self) -> &Pid {
        &self.pid
    }

    pub fn into_parts(self) -> (String, Pid) {
        (self.data.to_string(), self.pid)
    }

    pub fn wire_len(&self) -> usize {
        1 + self.data.len() + self.pid.wire_len()
    }

    fn write(&self, out: &mut BytesMut) {
        write_atom(out, &self.data, &self.pid);
    }
}

fn check_atom(data: &str, pid: &Pid) -> Result<(), ValueError> {
    if data.is_empty() {
        return Err(ValueError::EmptyAtom);
    }
    if data.len() > MAX_ATOM_BYTES {
        return Err(ValueError::AtomTooLong(data.len()));
    }
    check_pid(pid)
}

fn write_atom(out: &mut BytesMut, data: &str, pid: &Pid) {
    out.put_u8(data.len() as u8);
    out.put_slice(data.as_bytes());
    pid.write_wire(out);
}

/// A position id borrowed from a decoded frame, in wire form.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PidRef<'a> {
    /// Depth byte, then `site, ident` per level.
    wire: &'a [u8],
}

impl<'a> PidRef<'a> {
    pub(crate) fn new_unchecked(wire: &'a [u8]) -> Self {
        PidRef { wire }
    }

    pub fn depth(&self) -> usize {
        self.wire[0] as usize
    }

    /// The site of the last level: the replica that created this id.
    pub fn creator(&self) -> u8 {
        self.wire[self.wire.len() - LEVEL_BYTES]
    }

    pub fn to_pid(&self) -> Pid {
        Pid::from_wire_unchecked(self.wire)
    }

    /// Appends the key form (see [`crate::pid`]) without building a `Pid`.
    pub fn write_key(&self, out: &mut Vec<u8>) {
        for chunk in self.wire[1..].chunks_exact(LEVEL_BYTES) {
            out.extend_from_slice(&chunk[1..5]);
            out.push(chunk[0]);
        }
    }

    pub fn wire(&self) -> &'a [u8] {
        self.wire
    }
}

impl std::fmt::Debug for PidRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.to_pid().fmt(f)
    }
}

/// An atom borrowed from a decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtomRef<'a> {
    pub data: &'a str,
    pub pid: PidRef<'a>,
}

impl AtomRef<'_> {
    pub fn to_atom(&self) -> Atom {
        Atom {
            data: SmallText::new(self.data),
            pid: self.pid.to_pid(),
        }
    }
}

/// Reads one validated wire-form atom at the front of `b`; returns it and
/// its length.
fn read_atom(b: &[u8]) -> (AtomRef<'_>, usize) {
    let len = b[0] as usize;
    // The decoder validated this UTF-8 before the list was built, and
    // builders only write `&str` data, so this cannot fail; it is checked
    // again (cheaply) because the crate forbids unsafe code.
    let data = std::str::from_utf8(&b[1..1 + len]).expect("validated by the decoder");
    let depth = b[1 + len] as usize;
    let end = 2 + len + depth * LEVEL_BYTES;
    (
        AtomRef {
            data,
            pid: PidRef::new_unchecked(&b[1 + len..end]),
        },
        end,
    )
}

fn read_pid(b: &[u8]) -> (PidRef<'_>, usize) {
    let end = 1 + b[0] as usize * LEVEL_BYTES;
    (PidRef::new_unchecked(&b[..end]), end)
}

macro_rules! wire_list {
    ($(#[$m:meta])* $name:ident, $builder:ident, $iter:ident, $item:ty, $read:expr) => {
        $(#[$m])*
        #[derive(Clone, Default, PartialEq, Eq)]
        pub struct $name {
            count: u64,
            /// The items in wire form, count excluded.
            bytes: Bytes,
        }

        impl $name {
            pub(crate) fn from_validated(count: u64, bytes: Bytes) -> Self {
                $name { count, bytes }
            }

            pub fn len(&self) -> usize {
                self.count as usize
            }

            pub fn is_empty(&self) -> bool {
                self.count == 0
            }

            /// Encoded size of the items, count excluded.
            pub fn byte_len(&self) -> usize {
                self.bytes.len()
            }

            pub fn iter(&self) -> $iter<'_> {
                $iter { rest: &self.bytes, left: self.count }
            }

            fn write(&self, out: &mut BytesMut) {
                out.put_u64(self.count);
                out.put_slice(&self.bytes);
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_list().entries(self.iter()).finish()
            }
        }

        pub struct $iter<'a> {
            rest: &'a [u8],
            left: u64,
        }

        impl<'a> Iterator for $iter<'a> {
            type Item = $item;
            fn next(&mut self) -> Option<Self::Item> {
                if self.left == 0 {
                    return None;
                }
                self.left -= 1;
                let (item, used) = $read(self.rest);
                self.rest = &self.rest[used..];
                Some(item)
            }

            fn size_hint(&self) -> (usize, Option<usize>) {
                (self.left as usize, Some(self.left as usize))
            }
        }

        impl ExactSizeIterator for $iter<'_> {}

        impl<'a> IntoIterator for &'a $name {
            type Item = $item;
            type IntoIter = $iter<'a>;
            fn into_iter(self) -> $iter<'a> {
                self.iter()
            }
        }

        /// Builds a list in wire form.
        #[derive(Default)]
        pub struct $builder {
            count: u64,
            bytes: BytesMut,
        }

        impl $builder {
            pub fn new() -> Self {
                Self::default()
            }

            pub fn len(&self) -> usize {
                self.count as usize
            }

            pub fn is_empty(&self) -> bool {
                self.count == 0
            }

            /// Encoded size so far, count excluded.
            pub fn byte_len(&self) -> usize {
                self.bytes.len()
            }

            pub fn finish(self) -> $name {
                $name { count: self.count, bytes: self.bytes.freeze() }
            }
        }
    };
}

wire_list!(
    /// The inserted atoms of an upsert or a doc response.
    AtomList, AtomListBuilder, AtomIter, AtomRef<'a>, read_atom
);
wire_list!(
    /// The deleted ids of an upsert or a doc response.
    PidList, PidListBuilder, PidIter, PidRef<'a>, read_pid
);
wire_list!(
    /// The entries of a synclist response: (last modified, document).
    SyncEntries, SyncEntriesBuilder, SyncEntryIter, SyncEntry, read_entry
);

wire_list!(
    /// The entries of a feed_changes frame (version 4): (time, document,
    /// deleted).
    FeedEntries, FeedEntriesBuilder, FeedEntryIter, FeedEntry, read_feed_entry
);

/// One document in a synclist response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncEntry {
    pub modified: Time,
    pub doc: DocId,
}

pub(crate) const SYNC_ENTRY_BYTES: usize = 8 + 16;

fn read_entry(b: &[u8]) -> (SyncEntry, usize) {
    let modified = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
    let doc = u128::from_be_bytes(b[8..24].try_into().expect("16 bytes"));
    (SyncEntry { modified, doc }, SYNC_ENTRY_BYTES)
}

/// One entry of the change feed (PROTOCOL.md 3.8): `doc`'s last change
/// has time `time`; `deleted` if that change deleted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedEntry {
    pub time: Time,
    pub doc: DocId,
    pub deleted: bool,
}

pub(crate) const FEED_ENTRY_BYTES: usize = 8 + 16 + 1;
/// The one flag of a feed entry; every other bit must be 0.
pub(crate) const FEED_FLAG_DELETED: u8 = 1;

fn read_feed_entry(b: &[u8]) -> (FeedEntry, usize) {
    let time = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
    let doc = u128::from_be_bytes(b[8..24].try_into().expect("16 bytes"));
    let deleted = b[24] & FEED_FLAG_DELETED != 0;
    (FeedEntry { time, doc, deleted }, FEED_ENTRY_BYTES)
}

impl FeedEntriesBuilder {
    pub fn push(&mut self, entry: FeedEntry) {
        self.count += 1;
        self.bytes.put_u64(entry.time);
        self.bytes.put_u128(entry.doc);
        self.bytes
            .put_u8(if entry.deleted { FEED_FLAG_DELETED } else { 0 });
    }
}

impl FromIterator<FeedEntry> for FeedEntries {
    fn from_iter<I: IntoIterator<Item = FeedEntry>>(iter: I) -> Self {
        let mut b = FeedEntriesBuilder::new();
        for e in iter {
            b.push(e);
        }
        b.finish()
    }
}

impl AtomListBuilder {
    pub fn push(&mut self, atom: &Atom) {
        self.count += 1;
        atom.write(&mut self.bytes);
    }

    /// Adds an atom given as parts, checking them as [`Atom::new`] does.
    pub fn push_parts(&mut self, data: &str, pid: &Pid) -> Result<(), ValueError> {
        check_atom(data, pid)?;
        self.count += 1;
        write_atom(&mut self.bytes, data, pid);
        Ok(())
    }

    /// Adds an atom from validated parts (a run's char).
    fn push_unchecked(&mut self, data: &str, pid: &Pid) {
        self.count += 1;
        write_atom(&mut self.bytes, data, pid);
    }

    /// Adds an atom taken from another (validated) list.
    pub fn push_ref(&mut self, atom: AtomRef<'_>) {
        self.count += 1;
        self.bytes.put_u8(atom.data.len() as u8);
        self.bytes.put_slice(atom.data.as_bytes());
        self.bytes.put_slice(atom.pid.wire());
    }
}

impl PidListBuilder {
    pub fn push(&mut self, pid: &Pid) -> Result<(), ValueError> {
        check_pid(pid)?;
        self.count += 1;
        pid.write_wire(&mut self.bytes);
        Ok(())
    }

    pub fn push_ref(&mut self, pid: PidRef<'_>) {
        self.count += 1;
        self.bytes.put_slice(pid.wire());
    }

    /// Adds a validated id (a range's).
    fn push_unchecked(&mut self, pid: &Pid) {
        self.count += 1;
        pid.write_wire(&mut self.bytes);
    }
}

impl SyncEntriesBuilder {
    pub fn push(&mut self, entry: SyncEntry) {
        self.count += 1;
        self.bytes.put_u64(entry.modified);
        self.bytes.put_u128(entry.doc);
    }
}

impl FromIterator<Atom> for AtomList {
    fn from_iter<I: IntoIterator<Item = Atom>>(iter: I) -> Self {
        let mut b = AtomListBuilder::new();
        for a in iter {
            b.push(&a);
        }
        b.finish()
    }
}

impl FromIterator<SyncEntry> for SyncEntries {
    fn from_iter<I: IntoIterator<Item = SyncEntry>>(iter: I) -> Self {
        let mut b = SyncEntriesBuilder::new();
        for e in iter {
            b.push(e);
        }
        b.finish()
    }
}

// ---------------------------------------------------------------------------
// Version 3: runs, ranges and items (PROTOCOL.md 1.5, 2.2)
// ---------------------------------------------------------------------------

/// Whether `n` ids from `first` (last ident stepping) fit in `u32`.
fn check_span(first: &Pid, n: u64) -> Result<(), ValueError> {
    if n == 0 || u64::from(first.last().ident) + (n - 1) > u64::from(u32::MAX) {
        return Err(ValueError::IdentOverflow(n));
    }
    Ok(())
}

/// An owned run: one-char atoms at consecutive ids from `first`, one per
/// char of `text`. Only an encoding: a run of n chars *is* n one-char
/// atoms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    first: Pid,
    text: String,
}

impl Run {
    pub fn new(first: Pid, text: impl Into<String>) -> Result<Self, ValueError> {
        let text = text.into();
        check_run(&first, &text)?;
        Ok(Run { first, text })
    }

    pub fn first(&self) -> &Pid {
        &self.first
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Chars (Unicode scalar values) in the run: its number of ids.
    pub fn char_count(&self) -> usize {
        self.text.chars().count()
    }

    /// The run's one-char atoms, in order: (char, id).
    pub fn atoms(&self) -> RunAtoms<'_> {
        RunAtoms::new(&self.first, &self.text)
    }

    pub fn into_parts(self) -> (Pid, String) {
        (self.first, self.text)
    }

    fn write(&self, out: &mut BytesMut) {
        write_run(out, &self.first, &self.text);
    }
}

fn check_run(first: &Pid, text: &str) -> Result<(), ValueError> {
    if text.is_empty() {
        return Err(ValueError::EmptyRun);
    }
    if text.len() > MAX_RUN_BYTES {
        return Err(ValueError::RunTooLong(text.len()));
    }
    check_pid(first)?;
    check_span(first, text.chars().count() as u64)
}

fn write_run(out: &mut BytesMut, first: &Pid, text: &str) {
    first.write_wire(out);
    out.put_u16(text.len() as u16);
    out.put_slice(text.as_bytes());
}

/// The one-char atoms of a run: (the char as a `&str`, its id).
pub struct RunAtoms<'a> {
    prefix: Pid,
    next_ident: u32,
    chars: std::str::CharIndices<'a>,
    text: &'a str,
}

impl<'a> RunAtoms<'a> {
    fn new(first: &Pid, text: &'a str) -> Self {
        RunAtoms {
            prefix: first.clone(),
            next_ident: first.last().ident,
            chars: text.char_indices(),
            text,
        }
    }
}

impl<'a> Iterator for RunAtoms<'a> {
    type Item = (&'a str, Pid);
    fn next(&mut self) -> Option<Self::Item> {
        let (at, c) = self.chars.next()?;
        let pid = self.prefix.with_last_ident(self.next_ident);
        // Validated: the last ident of the run fits, so this only wraps
        // after the last char.
        self.next_ident = self.next_ident.wrapping_add(1);
        Some((&self.text[at..at + c.len_utf8()], pid))
    }
}

/// An owned range: `count` consecutive ids from `first` (last ident
/// stepping), as deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdRange {
    first: Pid,
    count: u16,
}

impl IdRange {
    pub fn new(first: Pid, count: u16) -> Result<Self, ValueError> {
        check_range(&first, count)?;
        Ok(IdRange { first, count })
    }

    pub fn first(&self) -> &Pid {
        &self.first
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    /// The range's ids, in order.
    pub fn ids(&self) -> impl ExactSizeIterator<Item = Pid> + '_ {
        let base = self.first.last().ident;
        (0..u32::from(self.count)).map(move |j| self.first.with_last_ident(base + j))
    }

    fn write(&self, out: &mut BytesMut) {
        self.first.write_wire(out);
        out.put_u16(self.count);
    }
}

fn check_range(first: &Pid, count: u16) -> Result<(), ValueError> {
    if count == 0 {
        return Err(ValueError::EmptyRange);
    }
    check_pid(first)?;
    check_span(first, u64::from(count))
}

/// A run borrowed from a decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunRef<'a> {
    pub first: PidRef<'a>,
    pub text: &'a str,
}

impl<'a> RunRef<'a> {
    pub fn to_run(&self) -> Run {
        Run {
            first: self.first.to_pid(),
            text: self.text.to_owned(),
        }
    }

    /// The run's one-char atoms, in order: (char, id).
    pub fn atoms(&self) -> RunAtoms<'a> {
        RunAtoms::new(&self.first.to_pid(), self.text)
    }
}

/// A range borrowed from a decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeRef<'a> {
    pub first: PidRef<'a>,
    pub count: u16,
}

impl RangeRef<'_> {
    pub fn to_range(&self) -> IdRange {
        IdRange {
            first: self.first.to_pid(),
            count: self.count,
        }
    }
}

/// An inserted item of a version-3 list: an atom (kind 0, so a multi-char
/// atom still travels) or a run (kind 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemRef<'a> {
    Atom(AtomRef<'a>),
    Run(RunRef<'a>),
}

/// Item kinds on the wire.
pub mod item_kind {
    pub const ATOM: u8 = 0;
    pub const RUN: u8 = 1;
}

fn read_run(b: &[u8]) -> (RunRef<'_>, usize) {
    let (first, at) = read_pid(b);
    let len = u16::from_be_bytes([b[at], b[at + 1]]) as usize;
    let end = at + 2 + len;
    // Validated by the decoder (or written from a `&str` by a builder).
    let text = std::str::from_utf8(&b[at + 2..end]).expect("validated by the decoder");
    (RunRef { first, text }, end)
}

fn read_item(b: &[u8]) -> (ItemRef<'_>, usize) {
    if b[0] == item_kind::ATOM {
        let (a, used) = read_atom(&b[1..]);
        (ItemRef::Atom(a), 1 + used)
    } else {
        let (r, used) = read_run(&b[1..]);
        (ItemRef::Run(r), 1 + used)
    }
}

fn read_range(b: &[u8]) -> (RangeRef<'_>, usize) {
    let (first, at) = read_pid(b);
    let count = u16::from_be_bytes([b[at], b[at + 1]]);
    (RangeRef { first, count }, at + 2)
}

wire_list!(
    /// The inserted items (atoms and runs) of a version-3 upsert or doc
    /// response.
    ItemList, ItemListBuilder, ItemIter, ItemRef<'a>, read_item
);
wire_list!(
    /// The deleted ranges of a version-3 upsert or doc response.
    RangeList, RangeListBuilder, RangeIter, RangeRef<'a>, read_range
);

impl ItemList {
    /// Every one-char atom of the runs and every atom, in list order, as
    /// (data, id): what a version 1/2 list of the same content holds.
    pub fn atoms(&self) -> impl Iterator<Item = (&str, Pid)> + '_ {
        self.iter()
            .flat_map(|item| -> Box<dyn Iterator<Item = (&str, Pid)> + '_> {
                match item {
                    ItemRef::Atom(a) => Box::new(std::iter::once((a.data, a.pid.to_pid()))),
                    ItemRef::Run(r) => Box::new(r.atoms()),
                }
            })
    }

    /// Atoms plus run chars: what the list counts toward
    /// `max_items_per_frame`.
    pub fn units(&self) -> u64 {
        self.iter()
            .map(|i| match i {
                ItemRef::Atom(_) => 1,
                ItemRef::Run(r) => r.text.chars().count() as u64,
            })
            .sum()
    }
}

impl RangeList {
    /// Every id of every range, in order.
    pub fn ids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.iter().flat_map(|r| {
            let first = r.first.to_pid();
            let base = first.last().ident;
            (0..u32::from(r.count)).map(move |j| first.with_last_ident(base + j))
        })
    }

    /// Ids in all ranges: what the list counts toward
    /// `max_items_per_frame`.
    pub fn units(&self) -> u64 {
        self.iter().map(|r| u64::from(r.count)).sum()
    }
}

impl ItemListBuilder {
    /// Adds an atom (kind 0), checked as [`Atom::new`] does.
    pub fn push_atom(&mut self, data: &str, pid: &Pid) -> Result<(), ValueError> {
        check_atom(data, pid)?;
        self.count += 1;
        self.bytes.put_u8(item_kind::ATOM);
        write_atom(&mut self.bytes, data, pid);
        Ok(())
    }

    /// Adds a run (kind 1), checked as [`Run::new`] does.
    pub fn push_run(&mut self, first: &Pid, text: &str) -> Result<(), ValueError> {
        check_run(first, text)?;
        self.count += 1;
        self.bytes.put_u8(item_kind::RUN);
        write_run(&mut self.bytes, first, text);
        Ok(())
    }
}

impl RangeListBuilder {
    /// Adds a range, checked as [`Range::new`] does.
    pub fn push(&mut self, first: &Pid, count: u16) -> Result<(), ValueError> {
        check_range(first, count)?;
        self.count += 1;
        first.write_wire(&mut self.bytes);
        self.bytes.put_u16(count);
        Ok(())
    }
}

/// Coalesces a sequence of one-char atoms and deletes into runs and ranges
/// (consecutive chars at consecutive ids, consecutive deleted ids): the one
/// place that decides what a run or range holds, for every encoder.
#[derive(Default)]
pub struct RunCoalescer {
    /// The run being built: first id, text, chars so far.
    run: Option<(Pid, String, u32)>,
    /// The range being built: first id, ids so far.
    range: Option<(Pid, u16)>,
}

/// What a [`RunCoalescer`] hands out when a run or range is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coalesced {
    /// A run of one or more chars.
    Run(Pid, String),
    /// A multi-char atom, which no run can hold.
    Atom(String, Pid),
    Range(Pid, u16),
}

impl RunCoalescer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an inserted atom; returns the items this one completes (the
    /// run in progress if it does not extend it, then a multi-char atom,
    /// which no run holds), in order.
    pub fn insert(&mut self, data: &str, pid: &Pid) -> [Option<Coalesced>; 2] {
        let one_char = data.chars().nth(1).is_none();
        if one_char
            && let Some((first, text, n)) = &mut self.run
            && extends(first, *n, pid)
            && text.len() + data.len() <= MAX_RUN_BYTES
        {
            text.push_str(data);
            *n += 1;
            return [None, None];
        }
        let done = self.take_run();
        if one_char {
            self.run = Some((pid.clone(), data.to_owned(), 1));
            [done, None]
        } else {
            [done, Some(Coalesced::Atom(data.to_owned(), pid.clone()))]
        }
    }

    /// Adds a deleted id; returns a complete range if this one does not
    /// extend the range in progress.
    pub fn delete(&mut self, pid: &Pid) -> Option<Coalesced> {
        if let Some((first, n)) = &mut self.range
            && *n < u16::MAX
            && extends(first, u32::from(*n), pid)
        {
            *n += 1;
            return None;
        }
        let done = self.take_range();
        self.range = Some((pid.clone(), 1));
        done
    }

    /// The run in progress, ended.
    pub fn take_run(&mut self) -> Option<Coalesced> {
        self.run.take().map(|(p, t, _)| Coalesced::Run(p, t))
    }

    /// The range in progress, ended.
    pub fn take_range(&mut self) -> Option<Coalesced> {
        self.range.take().map(|(p, n)| Coalesced::Range(p, n))
    }
}

/// Whether `pid` is the id `n` steps after `first` (same prefix, same
/// site, last ident + n).
pub fn extends(first: &Pid, n: u32, pid: &Pid) -> bool {
    pid.prefix_key() == first.prefix_key()
        && pid.creator() == first.creator()
        && first.last().ident.checked_add(n) == Some(pid.last().ident)
}

/// 2 sync_doc_upsert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upsert {
    pub doc: DocId,
    pub name: DocName,
    pub since: Time,
    pub inserts: AtomList,
    pub deletes: PidList,
}

/// 33 sync_doc_response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocResponse {
    pub doc: DocId,
    pub name: DocName,
    pub inserts: AtomList,
    pub deletes: PidList,
}

/// 65 session_insert, either direction. `site` is the author's site and
/// equals the atom's last-level site (the decoder enforces it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInsert {
    pub site: u8,
    pub atom: Atom,
}

/// 66 session_delete, either direction. `site` is the deleter's site; 0
/// when the deleter has none (a connection without hello).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDelete {
    pub site: u8,
    pub pid: Pid,
}

/// 4 sync_doc_upsert_runs (version 3): an upsert whose inserts are items
/// and whose deletes are ranges. Same rules as 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpsertRuns {
    pub doc: DocId,
    pub name: DocName,
    pub since: Time,
    pub inserts: ItemList,
    pub deletes: RangeList,
}

/// 37 sync_doc_response_runs (version 3): a 33 with items and ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocResponseRuns {
    pub doc: DocId,
    pub name: DocName,
    pub inserts: ItemList,
    pub deletes: RangeList,
}

/// 70 session_insert_run (version 3), either direction. `site` is the
/// run's creator (the decoder enforces it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInsertRun {
    pub site: u8,
    pub run: Run,
}

/// 71 session_delete_range (version 3), either direction. `site` is the
/// deleter's site (0: it has none), as in a 66.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDeleteRange {
    pub site: u8,
    pub range: IdRange,
}

impl UpsertRuns {
    /// The same upsert as a 2: runs as one-char atoms, ranges as single
    /// deletes (what a server that stores atoms applies).
    pub fn expand(&self) -> Upsert {
        let (inserts, deletes) = expand_lists(&self.inserts, &self.deletes);
        Upsert {
            doc: self.doc,
            name: self.name.clone(),
            since: self.since,
            inserts,
            deletes,
        }
    }
}

/// Version-3 lists as their version-1 forms: each run's chars as
/// one-char atoms, each range's ids as single deletes.
fn expand_lists(items: &ItemList, ranges: &RangeList) -> (AtomList, PidList) {
    let mut inserts = AtomListBuilder::new();
    for (data, pid) in items.atoms() {
        inserts.push_unchecked(data, &pid);
    }
    let mut deletes = PidListBuilder::new();
    for pid in ranges.ids() {
        deletes.push_unchecked(&pid);
    }
    (inserts.finish(), deletes.finish())
}

impl DocResponseRuns {
    /// The same response as a 33: runs as one-char atoms, ranges as single
    /// deletes (what a client that stores atoms applies).
    pub fn expand(&self) -> DocResponse {
        let (inserts, deletes) = expand_lists(&self.inserts, &self.deletes);
        DocResponse {
            doc: self.doc,
            name: self.name.clone(),
            inserts,
            deletes,
        }
    }
}

impl SessionInsertRun {
    pub fn new(run: Run) -> Self {
        SessionInsertRun {
            site: run.first().creator(),
            run,
        }
    }

    /// The run as 65s, one per char.
    pub fn expand(&self) -> impl Iterator<Item = SessionInsert> + '_ {
        self.run.atoms().map(|(data, pid)| SessionInsert {
            site: self.site,
            atom: Atom {
                data: SmallText::new(data),
                pid,
            },
        })
    }
}

impl SessionDeleteRange {
    /// The range as 66s, one per id.
    pub fn expand(&self) -> impl Iterator<Item = SessionDelete> + '_ {
        self.range.ids().map(|pid| SessionDelete {
            site: self.site,
            pid,
        })
    }
}

/// 96 hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u8,
    pub replica: u128,
    pub token: Bytes,
}

/// 127 error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// 0 synclist.
    Synclist { since: Time },
    /// 1 sync_doc_pull.
    Pull { doc: DocId, since: Time },
    /// 2 sync_doc_upsert.
    Upsert(Upsert),
    /// 3 doc_delete (version 2).
    DeleteDoc { doc: DocId },
    /// 4 sync_doc_upsert_runs (version 3).
    UpsertRuns(UpsertRuns),
    /// 5 feed_subscribe (version 4): the change feed from `since`.
    Subscribe { since: Time },
    /// 64 session_start.
    SessionStart { since: Time, doc: DocId },
    /// 65 session_insert.
    Insert(SessionInsert),
    /// 66 session_delete.
    Delete(SessionDelete),
    /// 67 name_change.
    Rename(DocName),
    /// 70 session_insert_run (version 3).
    InsertRun(SessionInsertRun),
    /// 71 session_delete_range (version 3).
    DeleteRange(SessionDeleteRange),
    /// 96 hello.
    Hello(Hello),
}

/// Frames a server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// 32 synclist_response.
    SynclistResponse(SyncEntries),
    /// 33 sync_doc_response.
    DocResponse(DocResponse),
    /// 34 doc_sync.
    DocSync {
        doc: DocId,
        sync_time: Time,
        site: u8,
    },
    /// 35 doc_deleted (version 2): the document was deleted at
    /// `deleted_time` and stays deleted.
    DocDeleted { doc: DocId, deleted_time: Time },
    /// 36 resync (version 2): the client's last sync time is older than
    /// the tombstones the server still keeps; the 33s that follow hold the
    /// document's full live state (as since 0), which replaces the
    /// client's copy.
    Resync { doc: DocId },
    /// 37 sync_doc_response_runs (version 3).
    DocResponseRuns(DocResponseRuns),
    /// 38 feed_changes (version 4): documents changed, ascending by time.
    FeedChanges(FeedEntries),
    /// 39 feed_heartbeat (version 4): every change at or below `time` has
    /// been sent on this feed (a valid cursor).
    FeedHeartbeat { time: Time },
    /// 65 session_insert, relayed from another session.
    Insert(SessionInsert),
    /// 66 session_delete, relayed.
    Delete(SessionDelete),
    /// 67 name_change, relayed.
    Rename(DocName),
    /// 68 session_started.
    SessionStarted {
        session_id: u64,
        site: u8,
        sync_time: Time,
    },
    /// 69 session_ack.
    SessionAck { count: u64 },
    /// 70 session_insert_run (version 3), relayed.
    InsertRun(SessionInsertRun),
    /// 71 session_delete_range (version 3), relayed.
    DeleteRange(SessionDeleteRange),
    /// 97 welcome.
    Welcome { version: u8, server_time: Time },
    /// 127 error.
    Error(ErrorFrame),
}

impl SessionInsert {
    pub fn new(atom: Atom) -> Self {
        SessionInsert {
            site: atom.pid().creator(),
            atom,
        }
    }
}

impl Hello {
    pub fn new(replica: u128, token: impl Into<Bytes>) -> Result<Self, ValueError> {
        let token = token.into();
        if token.len() > MAX_TOKEN_BYTES {
            return Err(ValueError::TokenTooLong(token.len()));
        }
        Ok(Hello {
            version: PROTOCOL_VERSION,
            replica,
            token,
        })
    }
}

impl ErrorFrame {
    /// An error frame; a message over 65,535 bytes is cut at a char boundary.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > u16::MAX as usize {
            let mut cut = u16::MAX as usize;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        ErrorFrame { code, message }
    }
}

impl ClientFrame {
    pub fn header(&self) -> u8 {
        use header::*;
        match self {
            ClientFrame::Synclist { .. } => SYNCLIST,
            ClientFrame::Pull { .. } => SYNC_DOC_PULL,
            ClientFrame::Upsert(_) => SYNC_DOC_UPSERT,
            ClientFrame::DeleteDoc { .. } => DOC_DELETE,
            ClientFrame::UpsertRuns(_) => SYNC_DOC_UPSERT_RUNS,
            ClientFrame::Subscribe { .. } => FEED_SUBSCRIBE,
            ClientFrame::SessionStart { .. } => SESSION_START,
            ClientFrame::Insert(_) => SESSION_INSERT,
            ClientFrame::Delete(_) => SESSION_DELETE,
            ClientFrame::Rename(_) => NAME_CHANGE,
            ClientFrame::InsertRun(_) => SESSION_INSERT_RUN,
            ClientFrame::DeleteRange(_) => SESSION_DELETE_RANGE,
            ClientFrame::Hello(_) => HELLO,
        }
    }

    /// Appends the frame's wire form to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(self.header());
        match self {
            ClientFrame::Synclist { since } => out.put_u64(*since),
            ClientFrame::Pull { doc, since } => {
                out.put_u128(*doc);
                out.put_u64(*since);
            }
            ClientFrame::Upsert(u) => {
                out.reserve(16 + 256 + 24 + u.inserts.byte_len() + u.deletes.byte_len());
                out.put_u128(u.doc);
                u.name.write(out);
                out.put_u64(u.since);
                u.inserts.write(out);
                u.deletes.write(out);
            }
            ClientFrame::DeleteDoc { doc } => out.put_u128(*doc),
            ClientFrame::UpsertRuns(u) => {
                out.reserve(16 + 256 + 24 + u.inserts.byte_len() + u.deletes.byte_len());
                out.put_u128(u.doc);
                u.name.write(out);
                out.put_u64(u.since);
                u.inserts.write(out);
                u.deletes.write(out);
            }
            ClientFrame::Subscribe { since } => out.put_u64(*since),
            ClientFrame::SessionStart { since, doc } => {
                out.put_u64(*since);
                out.put_u128(*doc);
            }
            ClientFrame::Insert(i) => encode_insert(i, out),
            ClientFrame::Delete(d) => encode_delete(d, out),
            ClientFrame::Rename(n) => n.write(out),
            ClientFrame::InsertRun(i) => encode_insert_run(i, out),
            ClientFrame::DeleteRange(d) => encode_delete_range(d, out),
            ClientFrame::Hello(h) => {
                out.put_u8(h.version);
                out.put_u128(h.replica);
                out.put_u8(h.token.len() as u8);
                out.put_slice(&h.token);
            }
        }
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

fn encode_insert(i: &SessionInsert, out: &mut BytesMut) {
    out.put_u8(i.site);
    i.atom.write(out);
}

fn encode_delete(d: &SessionDelete, out: &mut BytesMut) {
    out.put_u8(d.site);
    d.pid.write_wire(out);
}

fn encode_insert_run(i: &SessionInsertRun, out: &mut BytesMut) {
    out.put_u8(i.site);
    i.run.write(out);
}

fn encode_delete_range(d: &SessionDeleteRange, out: &mut BytesMut) {
    out.put_u8(d.site);
    d.range.write(out);
}

impl ServerFrame {
    pub fn header(&self) -> u8 {
        use header::*;
        match self {
            ServerFrame::SynclistResponse(_) => SYNCLIST_RESPONSE,
            ServerFrame::DocResponse(_) => SYNC_DOC_RESPONSE,
            ServerFrame::DocSync { .. } => DOC_SYNC,
            ServerFrame::DocDeleted { .. } => DOC_DELETED,
            ServerFrame::Resync { .. } => RESYNC,
            ServerFrame::DocResponseRuns(_) => SYNC_DOC_RESPONSE_RUNS,
            ServerFrame::FeedChanges(_) => FEED_CHANGES,
            ServerFrame::FeedHeartbeat { .. } => FEED_HEARTBEAT,
            ServerFrame::Insert(_) => SESSION_INSERT,
            ServerFrame::Delete(_) => SESSION_DELETE,
            ServerFrame::Rename(_) => NAME_CHANGE,
            ServerFrame::SessionStarted { .. } => SESSION_STARTED,
            ServerFrame::SessionAck { .. } => SESSION_ACK,
            ServerFrame::InsertRun(_) => SESSION_INSERT_RUN,
            ServerFrame::DeleteRange(_) => SESSION_DELETE_RANGE,
            ServerFrame::Welcome { .. } => WELCOME,
            ServerFrame::Error(_) => ERROR,
        }
    }

    /// Appends the frame's wire form to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(self.header());
        match self {
            ServerFrame::SynclistResponse(e) => e.write(out),
            ServerFrame::DocResponse(r) => {
                out.reserve(16 + 256 + 16 + r.inserts.byte_len() + r.deletes.byte_len());
                out.put_u128(r.doc);
                r.name.write(out);
                r.inserts.write(out);
                r.deletes.write(out);
            }
            ServerFrame::DocSync {
                doc,
                sync_time,
                site,
            } => {
                out.put_u128(*doc);
                out.put_u64(*sync_time);
                out.put_u8(*site);
            }
            ServerFrame::DocDeleted { doc, deleted_time } => {
                out.put_u128(*doc);
                out.put_u64(*deleted_time);
            }
            ServerFrame::Resync { doc } => out.put_u128(*doc),
            ServerFrame::DocResponseRuns(r) => {
                out.reserve(16 + 256 + 16 + r.inserts.byte_len() + r.deletes.byte_len());
                out.put_u128(r.doc);
                r.name.write(out);
                r.inserts.write(out);
                r.deletes.write(out);
            }
            ServerFrame::FeedChanges(e) => e.write(out),
            ServerFrame::FeedHeartbeat { time } => out.put_u64(*time),
            ServerFrame::Insert(i) => encode_insert(i, out),
            ServerFrame::Delete(d) => encode_delete(d, out),
            ServerFrame::Rename(n) => n.write(out),
            ServerFrame::SessionStarted {
                session_id,
                site,
                sync_time,
            } => {
                out.put_u64(*session_id);
                out.put_u8(*site);
                out.put_u64(*sync_time);
            }
            ServerFrame::SessionAck { count } => out.put_u64(*count),
            ServerFrame::InsertRun(i) => encode_insert_run(i, out),
            ServerFrame::DeleteRange(d) => encode_delete_range(d, out),
            ServerFrame::Welcome {
                version,
                server_time,
            } => {
                out.put_u8(*version);
                out.put_u64(*server_time);
            }
            ServerFrame::Error(e) => {
                out.put_u8(e.code.0);
                out.put_u16(e.message.len() as u16);
                out.put_slice(e.message.as_bytes());
            }
        }
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}
