//! Operations on stored data: backup, check and export.
//!
//! Everything here works on one redb read transaction per namespace
//! database, so it gives the same answers whether the data folder is
//! served (the running server reads its own open databases, see `admin`)
//! or not (the command opens the databases itself). A read transaction is a
//! consistent snapshot: a backup or a check never sees half a commit.
//!
//! The stored layout is the store's: each command reads through
//! [`store::Inspect`](crate::store::Inspect). This file holds what the
//! three share (the error type, the offline folder, argument checks);
//! `backup`, `check` and `export` one command each.

use std::path::{Path, PathBuf};

use notesync_protocol::{DocId, Time};
use redb::{Database, ReadTransaction, ReadableDatabase};

use crate::auth::valid_namespace;
use crate::store::{DB_FILE, StoreError};
use crate::tenants::{namespace_dir, namespaces_on_disk};

mod backup;
mod check;
mod export;
#[cfg(test)]
mod tests;

pub use backup::{
    BackupReport, backup_namespace, backup_offline, backup_tokens, discard_backup, finish_backup,
    prepare_backup_dest,
};
pub use check::{CheckReport, check_namespace, check_offline};
pub use export::{export_document, export_offline};

/// Why an operation failed (as opposed to a check finding problems).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "namespace {namespace}: table {table:?} is not one this build knows; refusing to make a \
         backup that would leave it out"
    )]
    UnknownTable { namespace: String, table: String },
    /// A server took the folder's lock between the check for a running
    /// server and this command's open.
    #[error(
        "cannot open (a server started meanwhile? try again) {0}: already open in another process"
    )]
    AlreadyOpen(PathBuf),
    #[error("{0} holds no notesync database (is it the data folder?)")]
    NoData(PathBuf),
    #[error("backup destination {0} exists and is not an empty folder")]
    DestNotEmpty(PathBuf),
    #[error("no namespace {namespace:?} in {data}")]
    NoNamespace { namespace: String, data: PathBuf },
    #[error("{0:?} is not a document id (up to 32 hex digits, as the synclist shows it)")]
    BadDocId(String),
    #[error("namespace {namespace}: no document {doc:032x}")]
    NoDocument { namespace: String, doc: DocId },
    #[error("namespace {namespace}: document {doc:032x} was deleted (at time {at})")]
    Deleted {
        namespace: String,
        doc: DocId,
        at: Time,
    },
}

/// A failed read transaction (the admin socket begins its own): a store
/// error like any other.
impl From<redb::Error> for OpsError {
    fn from(e: redb::Error) -> Self {
        OpsError::Store(StoreError::Redb(e))
    }
}

fn io<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> OpsError + 'p {
    move |source| OpsError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Parses a document id as the synclist shows it (`{:032x}`; leading
/// zeros and a `0x` prefix are optional).
pub fn parse_doc_id(s: &str) -> Result<DocId, OpsError> {
    let t = s.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    if t.is_empty() || t.len() > 32 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(OpsError::BadDocId(s.to_owned()));
    }
    u128::from_str_radix(t, 16).map_err(|_| OpsError::BadDocId(s.to_owned()))
}

/// The databases of a data folder no server is serving, opened by this
/// process (`default` first: its lock keeps a server from starting on the
/// folder meanwhile).
pub struct OfflineFolder {
    pub data: PathBuf,
    /// (namespace, database), `default` first.
    pub dbs: Vec<(String, Database)>,
}

impl OfflineFolder {
    pub fn open(data: &Path) -> Result<Self, OpsError> {
        let mut dbs = Vec::new();
        for name in namespaces_on_disk(data).map_err(io("cannot list the namespaces of", data))? {
            let path = namespace_dir(data, &name).join(DB_FILE);
            let db = Database::open(&path).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => OpsError::AlreadyOpen(path.clone()),
                e => StoreError::from(e).into(),
            })?;
            dbs.push((name, db));
        }
        if dbs.is_empty() {
            return Err(OpsError::NoData(data.to_owned()));
        }
        Ok(OfflineFolder {
            data: data.to_owned(),
            dbs,
        })
    }

    /// A read transaction on each namespace's database.
    pub fn snapshots(&self) -> Result<Vec<(String, ReadTransaction)>, OpsError> {
        self.dbs
            .iter()
            .map(|(n, db)| Ok((n.clone(), db.begin_read().map_err(StoreError::from)?)))
            .collect()
    }

    /// A read transaction on one namespace's database.
    pub fn snapshot(&self, namespace: &str) -> Result<ReadTransaction, OpsError> {
        match self.dbs.iter().find(|(n, _)| n == namespace) {
            Some((_, db)) => Ok(db.begin_read().map_err(StoreError::from)?),
            None => Err(OpsError::NoNamespace {
                namespace: namespace.to_owned(),
                data: self.data.clone(),
            }),
        }
    }
}

/// Checks that `namespace` is a name that may exist in `data`, and does.
pub fn existing_namespace(data: &Path, namespace: &str) -> Result<(), OpsError> {
    let on_disk = namespaces_on_disk(data).map_err(io("cannot list the namespaces of", data))?;
    if valid_namespace(namespace) && on_disk.iter().any(|n| n == namespace) {
        Ok(())
    } else {
        Err(OpsError::NoNamespace {
            namespace: namespace.to_owned(),
            data: data.to_owned(),
        })
    }
}
