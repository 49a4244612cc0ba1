//! A black-box harness for notesync servers, written against PROTOCOL.md.
//!
//! - [`ServerProcess`] runs a server binary on a temporary data folder and
//!   can SIGKILL, SIGTERM and restart it on the same folder.
//! - [`Conn`] is a protocol client over TCP to any address, with bounded
//!   waits and typed helpers for every request.
//! - [`DocModel`] is a replica of one document that applies 33/65/66/67
//!   idempotently and makes ids for its site.
//! - [`SessionClient`] is a session-mode client that checks acks, no echo
//!   and no repeats as frames arrive.
//! - [`Rng`] makes every test replay the same operations from a seed.
//! - [`conformance`] is the conformance kit: every rule of PROTOCOL.md as
//!   a named check, for any server (the `notesync-conformance` binary) and
//!   for clients (against a scripted fake server).

pub mod conformance;
pub mod conn;
pub mod model;
pub mod raw;
pub mod rng;
pub mod server;
pub mod session;

pub use conn::{Conn, DocSync, Event, Started, WAIT, Welcome, describe, name_of, upsert_frame};
pub use model::{Applied, DocModel, Entry, model_of};
pub use raw::{FloodOutcome, RawFrame, flood};
pub use rng::Rng;
pub use server::{ServerProcess, StartFailure, server_binary, token_command};
pub use session::SessionClient;

use notesync_protocol::{Atom, Level, Pid};

/// A one-level id `(ident, site)`.
pub fn pid1(ident: u32, site: u8) -> Pid {
    Pid::from_levels(&[Level::new(ident, site)])
}

/// An atom at a one-level id.
pub fn atom(data: &str, ident: u32, site: u8) -> Atom {
    Atom::new(data, pid1(ident, site)).expect("valid atom")
}
