//! The store: the redb layout of a namespace database, the server clock,
//! and everything that reads or changes stored state. Only the store knows
//! the tables, keys and encodings; the writer writes through
//! [`WriteTables`], connections read through [`Snapshot`], the operations
//! commands through [`Inspect`].
//!
//! The tables, keys and values are documented once, in ARCHITECTURE.md,
//! "Storage (server)"; `layout`'s tests check that table against the code.
//!
//! Files, and what each may touch:
//! - `layout`: table definitions (one list), key forms, record encodings;
//!   no database access;
//! - `runs`: runs, segments and chunks: their in-memory form, encoding and
//!   per-id edits; no database access;
//! - `error`: [`OpenError`], [`StoreError`], the one redb error conversion;
//! - `clock`: wall clock and server clock; no storage;
//! - `schema`: [`open`]: version check, migration, boot count, index load;
//! - `read`: [`Snapshot`] and what a catch-up sends (to a [`DeltaSink`]);
//! - `write`: [`WriteTables`], the writer's record-level changes;
//! - `compact`: tombstone compaction steps, through [`WriteTables`];
//! - `inspect`: whole-table reads and snapshot copies for `ops`.
//!
//! Invariants:
//! - Every change carries its own time from [`ServerClock`], and the clock's
//!   last value is written in the same transaction as the changes, so a
//!   snapshot's `clock` is at least every time it contains.
//! - Every id the server knows is held by exactly one item of one chunk,
//!   which says what a pull needs of it: its insert time (0 when the server
//!   learnt of the id from a delete first: it stays a tombstone even if its
//!   data arrives later), its first delete time (0 while live), its live
//!   text. Live text never changes; deleted text is dropped.
//! - A chunk's `changed` is at least every time it holds, and `chunk_times`
//!   has exactly one entry per chunk, at its `changed`: a pull since `t`
//!   reads only the chunks changed after `t`.
//! - `doc_times` mirrors each document's `modified`, in time order, so the
//!   synclist index is rebuilt at start by one sequential scan.

mod clock;
mod compact;
mod error;
mod inspect;
mod layout;
mod read;
mod runs;
mod schema;
#[cfg(test)]
pub(crate) mod tests;
mod write;

pub use clock::{ServerClock, SystemClock, WallClock};
pub use error::{OpenError, StoreError};
pub use inspect::Inspect;
pub use layout::{DocRecord, MAX_SITE, SCHEMA_VERSION, table_names};
pub use read::{DeltaSink, Rule, SentIds, Snapshot};
#[cfg(test)]
pub(crate) use schema::open_database;
pub use schema::{DB_FILE, open};
pub use write::{Deleted, InsertCheck, Inserted, WriteTables};
