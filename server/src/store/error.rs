//! The store's errors: [`OpenError`] for opening a database at start,
//! [`StoreError`] for every read or write of stored state after that. The
//! one conversion from redb's error types lives here; callers above the
//! store (writer, conn, ops) wrap a [`StoreError`], never a redb error.

use std::path::PathBuf;

use super::layout::SCHEMA_VERSION;

/// Why the database could not be opened at start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create data folder {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is already open in another process (is another notesync-server serving this data folder?); \
         a data folder can be served by one server at a time"
    )]
    AlreadyOpen { path: PathBuf },
    #[error(
        "{path} has schema version {found}, but this server reads versions 1 to {SCHEMA_VERSION} only; \
         use a matching notesync-server build"
    )]
    UnknownSchema { path: PathBuf, found: u64 },
    #[error("{path} has tables but no schema version: it is not a notesync database")]
    NotNotesync { path: PathBuf },
    #[error("cannot open {path}: {source}")]
    Redb { path: PathBuf, source: redb::Error },
    #[error("cannot open {path}: {source}")]
    Store { path: PathBuf, source: StoreError },
}

/// A failure to read or write stored state.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Redb(#[from] redb::Error),
    #[error("corrupt record in table {table}: {what}")]
    Corrupt {
        table: &'static str,
        what: &'static str,
    },
}

/// Each of redb's per-operation error types, through `redb::Error` (the
/// one place they are converted).
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError,
    redb::SetDurabilityError
);

pub(super) fn corrupt(table: &'static str, what: &'static str) -> StoreError {
    StoreError::Corrupt { table, what }
}
