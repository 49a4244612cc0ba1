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
    pub const SYNCLIST_RESPONSE: u8 = 32;
    pub const SYNC_DOC_RESPONSE: u8 = 33;
    pub const DOC_SYNC: u8 = 34;
    /// Version 2.
    pub const DOC_DELETED: u8 = 35;
    /// Version 2.
    pub const RESYNC: u8 = 36;
    pub const SESSION_START: u8 = 64;
    pub const SESSION_INSERT: u8 = 65;
    pub const SESSION_DELETE: u8 = 66;
    pub const NAME_CHANGE: u8 = 67;
    pub const SESSION_STARTED: u8 = 68;
    pub const SESSION_ACK: u8 = 69;
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
pub const PROTOCOL_VERSION: u8 = 2;
/// The oldest protocol version a server still speaks (PROTOCOL.md 6).
pub const MIN_PROTOCOL_VERSION: u8 = 1;
/// The first version with document deletion (frames 3 and 35).
pub const VERSION_DELETION: u8 = 2;
/// The first version with the resync signal (frame 36).
pub const VERSION_RESYNC: u8 = 2;
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
    data: String,
    pid: Pid,
}

impl Atom {
    pub fn new(data: impl Into<String>, pid: Pid) -> Result<Self, ValueError> {
        let data = data.into();
        check_atom(&data, &pid)?;
        Ok(Atom { data, pid })
    }

    pub fn data(&self) -> &str {
        &self.data
    }

    pub fn pid(&self) -> &Pid {
        &self.pid
    }

    pub fn into_parts(self) -> (String, Pid) {
        (self.data, self.pid)
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
            data: self.data.to_owned(),
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
    /// 64 session_start.
    SessionStart { since: Time, doc: DocId },
    /// 65 session_insert.
    Insert(SessionInsert),
    /// 66 session_delete.
    Delete(SessionDelete),
    /// 67 name_change.
    Rename(DocName),
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
            ClientFrame::SessionStart { .. } => SESSION_START,
            ClientFrame::Insert(_) => SESSION_INSERT,
            ClientFrame::Delete(_) => SESSION_DELETE,
            ClientFrame::Rename(_) => NAME_CHANGE,
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
            ClientFrame::SessionStart { since, doc } => {
                out.put_u64(*since);
                out.put_u128(*doc);
            }
            ClientFrame::Insert(i) => encode_insert(i, out),
            ClientFrame::Delete(d) => encode_delete(d, out),
            ClientFrame::Rename(n) => n.write(out),
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

impl ServerFrame {
    pub fn header(&self) -> u8 {
        use header::*;
        match self {
            ServerFrame::SynclistResponse(_) => SYNCLIST_RESPONSE,
            ServerFrame::DocResponse(_) => SYNC_DOC_RESPONSE,
            ServerFrame::DocSync { .. } => DOC_SYNC,
            ServerFrame::DocDeleted { .. } => DOC_DELETED,
            ServerFrame::Resync { .. } => RESYNC,
            ServerFrame::Insert(_) => SESSION_INSERT,
            ServerFrame::Delete(_) => SESSION_DELETE,
            ServerFrame::Rename(_) => NAME_CHANGE,
            ServerFrame::SessionStarted { .. } => SESSION_STARTED,
            ServerFrame::SessionAck { .. } => SESSION_ACK,
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
