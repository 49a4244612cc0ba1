//! The offline op log: what this replica changed and the server has not yet
//! acknowledged, for one document.
//!
//! Two halves: [`Pending`] is the in-memory state and its rules (sans-IO);
//! [`LogFile`] is its durable form, `<note>.md.latest_ops`.
//!
//! Rules (the seed's: bytes sent are proportional to the new text):
//! - An insert followed by a delete of that same atom, while the insert has
//!   never been sent, cancels out: neither is ever sent, and the atom is
//!   forgotten as if it never existed.
//! - Once an op may have left the device it is *sent*: it is re-sent exactly
//!   as it was until the server acknowledges it (the server applies re-sends
//!   idempotently). Sentness is made durable before the bytes leave, so a
//!   crash can never make a sent insert look cancellable.
//! - An op leaves the log only when acknowledged (34 after an upsert, 69 in
//!   a session).
//!
//! File format: a sequence of records `u32 len (BE) | payload | u32 crc32
//! (BE) of payload`. A record that is cut short or fails its checksum ends
//! the log: it and everything after it are dropped (a torn last write),
//! never misread; so does one that does not decode. Payload: `u8 kind` then
//! 1 insert: `u8 sent, u8 len, data, pid (wire form)`;
//! 2 delete: `u8 sent, pid`;
//! 3 cancel: `pid` (forget a never-sent insert);
//! 4 mark_sent: nothing (every op so far is sent);
//! 5 rename: `u8 sent, name ..0A`;
//! 6 insert run: `u8 flags, pid first, u16 len, len bytes of text`: one
//!   one-char insert per char, char j at `first` with its last ident +j
//!   (flag 2: -j, text typed backwards), in that order;
//! 7 delete range: `u8 flags, pid first, u16 count`: deletes of `first`,
//!   `first`+1, ... (flag 2: -1 each), in that order;
//! 8 cancel range: `u8 flags, pid first, u16 count`: cancels, likewise;
//! 9 more inserts: `u8 flags, text` (the rest of the payload): one-char
//!   inserts continuing the previous record (a one-char insert, or kind 6
//!   or 9): the first at its last id +1 (flag 2: -1), same sent flag;
//! 10 more ids: `u8 flags, u16 count`: deletes or cancels continuing the
//!   previous record (kind 2, 3, 7, 8 or 10) likewise.
//! Flags: bit 0 sent (kinds 6 and 7 only: a cancel is never sent, a
//! continuation has its predecessor's), bit 1 backwards; other bits must
//! be 0. Runs and ranges hold at most 65,535 bytes or ids. Kinds 6-10 are
//! only an encoding of records 1-3: reading expands them, so [`Record`]s
//! are unchanged and logs written before them (kinds 1-5 only) still read.
//! An append of one keystroke that continues the last record's run is a
//! kind 9 of 11 bytes, whatever the id's depth. Every append is fsynced
//! before it returns; a continuation only follows a record already in the
//! file, so a torn last record still takes nothing else with it.
//!
//! Files: `pending.rs` (the rules, in memory) and `log_file.rs` (the codec
//! and the file). Neither knows the store; the store pairs them per note.

mod log_file;
mod pending;

use notesync_protocol::{Atom, DocName, Pid};

pub use log_file::{LogFile, decode_records, encode_records};
#[cfg(test)]
pub(crate) use log_file::{appended_len, encode_records_v1};
pub use pending::{OpKey, Pending, PendingOp, Recorded};

/// One durable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Insert { atom: Atom, sent: bool },
    Delete { pid: Pid, sent: bool },
    Cancel { pid: Pid },
    MarkSent,
    Rename { name: DocName, sent: bool },
}
