//! `backup`: copies each namespace's snapshot into a fresh database with
//! the data folder's layout, plus the tokens file, and fsyncs it all. The
//! copy of a database is the store's ([`Inspect::copy_into`]); this file
//! owns the destination folder: its checks, layout, fsyncs and cleanup.

use std::fs::File;
use std::path::Path;

use redb::ReadTransaction;

use super::{OfflineFolder, OpsError, io};
use crate::auth::TOKENS_FILE;
use crate::store::{DB_FILE, Inspect, table_names};
use crate::tenants::namespace_dir;

/// What a backup copied.
#[derive(Debug, Default, Clone)]
pub struct BackupReport {
    /// (namespace, rows copied), in copy order.
    pub namespaces: Vec<(String, u64)>,
    pub tokens: bool,
}

impl std::fmt::Display for BackupReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, rows) in &self.namespaces {
            writeln!(f, "namespace {n}: {rows} rows")?;
        }
        writeln!(f, "tokens: {}", if self.tokens { "copied" } else { "none" })
    }
}

/// Makes `dest` an empty folder for a backup: creates it, or accepts an
/// existing empty one. Returns whether it was created.
pub fn prepare_backup_dest(dest: &Path) -> Result<bool, OpsError> {
    match std::fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(OpsError::DestNotEmpty(dest.to_owned()));
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dest).map_err(io("cannot create", dest))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            Err(OpsError::DestNotEmpty(dest.to_owned()))
        }
        Err(e) => Err(io("cannot read", dest)(e)),
    }
}

/// Removes what a failed backup left in `dest`.
pub fn discard_backup(dest: &Path, created: bool) {
    if created {
        let _ = std::fs::remove_dir_all(dest);
    } else if let Ok(entries) = std::fs::read_dir(dest) {
        for e in entries.flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Copies one namespace's snapshot into the backup folder `dest`, at the
/// namespace's place in the data folder layout. Returns the rows copied.
/// Refuses a database with a table this build does not know (it would not
/// be copied).
pub fn backup_namespace(
    namespace: &str,
    src: &ReadTransaction,
    dest: &Path,
) -> Result<u64, OpsError> {
    let src = Inspect::new(src);
    let known = table_names();
    let unknown = src.tables()?.into_iter().find(|t| !known.contains(t));
    if let Some(table) = unknown.or(src.multimap_tables()?.into_iter().next()) {
        return Err(OpsError::UnknownTable {
            namespace: namespace.to_owned(),
            table,
        });
    }
    let dir = namespace_dir(dest, namespace);
    std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
    let path = dir.join(DB_FILE);
    let rows = src.copy_into(&path)?;
    fsync(&path)?;
    fsync(&dir)?;
    Ok(rows)
}

/// Copies the tokens file, if the data folder has one.
pub fn backup_tokens(data: &Path, dest: &Path) -> Result<bool, OpsError> {
    let from = data.join(TOKENS_FILE);
    let to = dest.join(TOKENS_FILE);
    match std::fs::read(&from) {
        Ok(bytes) => {
            std::fs::write(&to, bytes).map_err(io("cannot write", &to))?;
            fsync(&to)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io("cannot read", &from)(e)),
    }
}

/// Makes the backup folder's entries durable (its namespace folders were
/// synced as they were written).
pub fn finish_backup(dest: &Path) -> Result<(), OpsError> {
    let ns = dest.join(crate::tenants::NAMESPACES_DIR);
    if ns.is_dir() {
        fsync(&ns)?;
    }
    fsync(dest)
}

fn fsync(path: &Path) -> Result<(), OpsError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("cannot fsync", path))
}

/// Backs up a data folder no server is serving.
pub fn backup_offline(data: &Path, dest: &Path) -> Result<BackupReport, OpsError> {
    let folder = OfflineFolder::open(data)?;
    let created = prepare_backup_dest(dest)?;
    let run = || -> Result<BackupReport, OpsError> {
        let mut report = BackupReport::default();
        for (name, snap) in folder.snapshots()? {
            let rows = backup_namespace(&name, &snap, dest)?;
            report.namespaces.push((name, rows));
        }
        report.tokens = backup_tokens(data, dest)?;
        finish_backup(dest)?;
        Ok(report)
    };
    run().inspect_err(|_| discard_backup(dest, created))
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase};

    use super::*;
    use crate::ops::export_document;
    use crate::ops::tests::{DOC, check, healthy};
    use crate::store;

    #[test]
    fn a_healthy_database_checks_clean_and_its_backup_too() {
        let (_dir, db) = healthy();
        let r = check(&db);
        assert!(r.ok(), "{r}");
        assert_eq!((r.documents, r.atoms, r.sites), (1, 6, 1), "{r}");
        let dest = tempfile::tempdir().expect("tempdir");
        let rows = backup_namespace("default", &db.begin_read().expect("read"), dest.path())
            .expect("backup");
        // meta (schema, clock, boot), one row each of documents, doc_times
        // and sites, and a chunk_times entry per chunk.
        assert_eq!(rows, 6 + 2 * r.changes, "{rows} rows");
        let copy = Database::open(dest.path().join(DB_FILE)).expect("open the copy");
        let r = check(&copy);
        assert!(r.ok(), "{r}");
        let txn = copy.begin_read().expect("read");
        assert_eq!(
            export_document("default", &txn, DOC).expect("export"),
            "hllo !"
        );
        drop((txn, copy));
        // A server opens the copy (schema, clock and boot as stored).
        let reopened = store::open(dest.path()).expect("a server can open the copy");
        assert_eq!(reopened.doc_times.len(), 1);
    }

    #[test]
    fn backup_refuses_a_destination_that_is_not_empty() {
        let dest = tempfile::tempdir().expect("tempdir");
        assert!(!prepare_backup_dest(dest.path()).expect("an empty folder is fine"));
        std::fs::write(dest.path().join("x"), b"x").expect("write");
        let e = prepare_backup_dest(dest.path()).unwrap_err();
        assert!(
            e.to_string().contains("exists and is not an empty folder"),
            "{e}"
        );
        let e = prepare_backup_dest(&dest.path().join("x")).unwrap_err();
        assert!(matches!(e, OpsError::DestNotEmpty(_)), "{e}");
        assert!(prepare_backup_dest(&dest.path().join("new/deeper")).expect("created"));
    }
}
