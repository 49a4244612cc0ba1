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
//! never misread. Payload: `u8 kind` then
//! 1 insert: `u8 sent, u8 len, data, pid (wire form)`;
//! 2 delete: `u8 sent, pid`;
//! 3 cancel: `pid` (forget a never-sent insert);
//! 4 mark_sent: nothing (every op so far is sent);
//! 5 rename: `u8 sent, name ..0A`.
//!
//! Files: `pending.rs` (the rules, in memory) and `log_file.rs` (the codec
//! and the file). Neither knows the store; the store pairs them per note.

mod log_file;
mod pending;

use notesync_protocol::{Atom, DocName, Pid};

pub use log_file::{LogFile, decode_records, encode_records};
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
