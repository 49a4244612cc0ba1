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
//! - An atom's record says what a pull needs: `insert` is the time it became
//!   live (0 when the server learnt of the id from a delete first: it stays
//!   a tombstone even if its data arrives later), `delete` the first delete
//!   time (0 while live). Data, once stored, never changes.
//! - `changes` holds one entry per insert and per delete, so a pull since `t`
//!   reads O(changes after t); each atom has at most one entry of each kind.
//! - `doc_times` mirrors each document's `modified`, in time order, so the
//!   synclist index is rebuilt at start by one sequential scan.

mod clock;
mod compact;
mod error;
mod inspect;
mod layout;
mod read;
mod schema;
#[cfg(test)]
pub(crate) mod tests;
mod write;

pub use clock::{ServerClock, SystemClock, WallClock};
pub use error::{OpenError, StoreError};
pub use inspect::{ChangeLookup, Inspect};
#[cfg(test)]
pub use layout::AtomRecord;
pub use layout::{ChangeEntry, ChangeKind, DocRecord, MAX_SITE, SCHEMA_VERSION, table_names};
pub use read::{DeltaSink, Rule, SentIds, Snapshot};
#[cfg(test)]
pub(crate) use schema::open_database;
pub use schema::{DB_FILE, open};
pub use write::{Deleted, InsertCheck, Inserted, WriteTables};
