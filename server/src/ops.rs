//! Operations on stored data: backup, check and export.
//!
//! Everything here works on one redb read transaction per namespace
//! database, so it gives the same answers whether the data folder is
//! served (the running server reads its own open databases, see `admin`)
//! or not (the command opens the databases itself). A read transaction is a
//! consistent snapshot: a backup or a check never sees half a commit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use notesync_protocol::{DocId, Level, Pid, Time};
use redb::{
    Database, Durability, Key, MultimapTableHandle, ReadTransaction, ReadableDatabase,
    ReadableTable, TableDefinition, TableError, TableHandle, Value,
};

use crate::auth::{TOKENS_FILE, valid_namespace};
use crate::store::{self, DB_FILE, SCHEMA_VERSION, StoreError, raw};
use crate::tenants::{namespace_dir, namespaces_on_disk};

/// The tables a namespace database has; a backup refuses a database with
/// any other (it would not be copied).
pub const TABLES: [&str; 6] = [
    "meta",
    "documents",
    "doc_times",
    "sites",
    "atoms",
    "changes",
];

/// Rows copied per destination commit (the source is one snapshot
/// whatever this is; it only bounds the memory of a write transaction).
const COPY_CHUNK_ROWS: u64 = 100_000;

/// Problems a check lists in full; past this it only counts them.
const MAX_LISTED_PROBLEMS: usize = 200;

/// Why an operation failed (as opposed to a check finding problems).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("database error: {0}")]
    Redb(#[from] redb::Error),
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
    #[error(
        "namespace {namespace} has schema version {found:?}; this build reads version {SCHEMA_VERSION}"
    )]
    Schema {
        namespace: String,
        found: Option<u64>,
    },
}

macro_rules! redb_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for OpsError {
            fn from(e: $t) -> Self {
                OpsError::Redb(e.into())
            }
        }
    )*};
}
redb_errors!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError,
    redb::SetDurabilityError
);

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

// ---------------------------------------------------------------- offline access

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
                redb::DatabaseError::DatabaseAlreadyOpen => OpsError::Io {
                    what: "cannot open (a server started meanwhile? try again)",
                    path: path.clone(),
                    source: std::io::Error::other("already open in another process"),
                },
                e => e.into(),
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
            .map(|(n, db)| Ok((n.clone(), db.begin_read()?)))
            .collect()
    }

    /// A read transaction on one namespace's database.
    pub fn snapshot(&self, namespace: &str) -> Result<ReadTransaction, OpsError> {
        match self.dbs.iter().find(|(n, _)| n == namespace) {
            Some((_, db)) => Ok(db.begin_read()?),
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

// ---------------------------------------------------------------- backup

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
pub fn backup_namespace(
    namespace: &str,
    src: &ReadTransaction,
    dest: &Path,
) -> Result<u64, OpsError> {
    for t in src.list_tables()? {
        if !TABLES.contains(&t.name()) {
            return Err(OpsError::UnknownTable {
                namespace: namespace.to_owned(),
                table: t.name().to_owned(),
            });
        }
    }
    if let Some(t) = src.list_multimap_tables()?.next() {
        return Err(OpsError::UnknownTable {
            namespace: namespace.to_owned(),
            table: t.name().to_owned(),
        });
    }
    let dir = namespace_dir(dest, namespace);
    std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
    let path = dir.join(DB_FILE);
    let db = Database::create(&path)?;
    let mut rows = 0;
    rows += copy_table(src, &db, raw::META_TABLE)?;
    rows += copy_table(src, &db, raw::DOCUMENTS_TABLE)?;
    rows += copy_table(src, &db, raw::DOC_TIMES_TABLE)?;
    rows += copy_table(src, &db, raw::SITES_TABLE)?;
    rows += copy_table(src, &db, raw::ATOMS_TABLE)?;
    rows += copy_table(src, &db, raw::CHANGES_TABLE)?;
    // The chunks were committed without fsync; this commit makes them all
    // durable.
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.commit()?;
    db.close()?;
    fsync(&path)?;
    fsync(&dir)?;
    Ok(rows)
}

fn copy_table<K: Key + 'static, V: Value + 'static>(
    src: &ReadTransaction,
    dst: &Database,
    def: TableDefinition<K, V>,
) -> Result<u64, OpsError> {
    let from = match src.open_table(def) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut rows = from.iter()?;
    let mut copied = 0;
    loop {
        let mut txn = dst.begin_write()?;
        txn.set_durability(Durability::None)?;
        let mut n = 0;
        let mut done = false;
        {
            let mut to = txn.open_table(def)?;
            while n < COPY_CHUNK_ROWS {
                match rows.next() {
                    None => {
                        done = true;
                        break;
                    }
                    Some(row) => {
                        let (k, v) = row?;
                        to.insert(k.value(), v.value())?;
                        n += 1;
                    }
                }
            }
        }
        txn.commit()?;
        copied += n;
        if done {
            return Ok(copied);
        }
    }
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

// ---------------------------------------------------------------- check

/// What a check of one namespace found.
#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    pub namespace: String,
    pub documents: u64,
    pub atoms: u64,
    pub changes: u64,
    pub sites: u64,
    /// What is wrong (at most [`MAX_LISTED_PROBLEMS`] listed).
    pub problems: Vec<String>,
    /// Problems found, listed or not.
    pub problem_count: u64,
}

impl CheckReport {
    fn problem(&mut self, what: String) {
        self.problem_count += 1;
        if self.problems.len() < MAX_LISTED_PROBLEMS {
            self.problems.push(what);
        }
    }

    pub fn ok(&self) -> bool {
        self.problem_count == 0
    }
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "namespace {}: {} documents, {} atoms, {} changes, {} sites: {}",
            self.namespace,
            self.documents,
            self.atoms,
            self.changes,
            self.sites,
            if self.ok() {
                "ok".to_owned()
            } else {
                format!("{} problem(s)", self.problem_count)
            }
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        if self.problem_count > self.problems.len() as u64 {
            writeln!(
                f,
                "  ... and {} more",
                self.problem_count - self.problems.len() as u64
            )?;
        }
        Ok(())
    }
}

fn change_key(doc: DocId, time: Time) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&doc.to_be_bytes());
    k[16..].copy_from_slice(&time.to_be_bytes());
    k
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be_u128(b: &[u8]) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    u128::from_be_bytes(a)
}

/// Checks one namespace's snapshot: the schema version, that every atom,
/// change and site belongs to a document, that `doc_times` mirrors the
/// documents' `modified`, that `changes` and the atoms' times agree both
/// ways, that no time is past the stored clock, and that sites are in
/// range and unique per document.
pub fn check_namespace(namespace: &str, txn: &ReadTransaction) -> Result<CheckReport, OpsError> {
    let mut r = CheckReport {
        namespace: namespace.to_owned(),
        ..CheckReport::default()
    };
    for t in txn.list_tables()? {
        if !TABLES.contains(&t.name()) {
            r.problem(format!("unknown table {:?}", t.name()));
        }
    }
    for t in TABLES {
        let present = txn.list_tables()?.any(|h| h.name() == t);
        if !present {
            r.problem(format!("table {t} is missing"));
        }
    }
    if !r.ok() {
        return Ok(r);
    }
    let meta = txn.open_table(raw::META_TABLE)?;
    let version = meta.get(raw::SCHEMA_KEY)?.map(|v| v.value());
    if version != Some(SCHEMA_VERSION) {
        r.problem(match version {
            Some(v @ (1 | 2)) => format!(
                "schema version {v}: start the server once to migrate it to version {SCHEMA_VERSION}"
            ),
            Some(v) => format!("schema version {v}; this build reads version {SCHEMA_VERSION}"),
            None => "no schema version in meta".into(),
        });
        return Ok(r);
    }
    let clock = meta.get(raw::CLOCK_KEY)?.map(|v| v.value()).unwrap_or(0);

    // documents
    let mut docs: HashMap<DocId, store::DocRecord> = HashMap::new();
    for row in txn.open_table(raw::DOCUMENTS_TABLE)?.iter()? {
        let (k, v) = row?;
        let doc = k.value();
        match raw::doc_record(v.value()) {
            Ok(rec) => {
                if rec.modified > clock {
                    r.problem(format!(
                        "document {doc:032x}: modified {} is after the clock {clock}",
                        rec.modified
                    ));
                }
                if rec.next_site == 0 || rec.next_site > store::MAX_SITE + 1 {
                    r.problem(format!(
                        "document {doc:032x}: next site {} is out of range",
                        rec.next_site
                    ));
                }
                docs.insert(doc, rec);
            }
            Err(e) => r.problem(format!("document {doc:032x}: {e}")),
        }
    }
    r.documents = docs.len() as u64;

    // doc_times mirrors (modified, doc), one entry per document
    let doc_times = txn.open_table(raw::DOC_TIMES_TABLE)?;
    let mut timed: HashSet<DocId> = HashSet::new();
    for row in doc_times.iter()? {
        let (k, _) = row?;
        let k = k.value();
        let (t, doc) = (be_u64(&k[..8]), be_u128(&k[8..]));
        match docs.get(&doc) {
            None => r.problem(format!(
                "doc_times has document {doc:032x} (time {t}), which is not in documents"
            )),
            Some(rec) if rec.modified != t => r.problem(format!(
                "doc_times has document {doc:032x} at time {t}, but its modified time is {}",
                rec.modified
            )),
            Some(_) => {
                timed.insert(doc);
            }
        }
    }
    for (doc, rec) in &docs {
        if !timed.contains(doc) {
            r.problem(format!(
                "document {doc:032x} (modified {}) has no doc_times entry",
                rec.modified
            ));
        }
    }

    // sites
    let mut taken: HashMap<(DocId, u8), u128> = HashMap::new();
    for row in txn.open_table(raw::SITES_TABLE)?.iter()? {
        let (k, v) = row?;
        r.sites += 1;
        let k = k.value();
        let (doc, replica, site) = (be_u128(&k[..16]), be_u128(&k[16..]), v.value());
        let Some(rec) = docs.get(&doc) else {
            r.problem(format!(
                "site {site} of replica {replica:032x} belongs to document {doc:032x}, which is not in documents"
            ));
            continue;
        };
        if rec.deleted != 0 {
            r.problem(format!(
                "deleted document {doc:032x} still has a site ({site}, replica {replica:032x})"
            ));
        }
        if site == 0 || u16::from(site) >= rec.next_site {
            r.problem(format!(
                "document {doc:032x}: replica {replica:032x} has site {site}, outside 1..{} (next site)",
                rec.next_site
            ));
        }
        if let Some(other) = taken.insert((doc, site), replica) {
            r.problem(format!(
                "document {doc:032x}: site {site} is held by replicas {other:032x} and {replica:032x}"
            ));
        }
    }

    // atoms, against documents and changes
    let changes = txn.open_table(raw::CHANGES_TABLE)?;
    let expect_change = |r: &mut CheckReport,
                         doc: DocId,
                         t: Time,
                         kind: u8,
                         pid_key: &[u8],
                         what: &str|
     -> Result<(), OpsError> {
        match changes.get(&change_key(doc, t))? {
            None => r.problem(format!(
                "document {doc:032x}: atom {} has {what} time {t} but no change at that time",
                hex::encode(pid_key)
            )),
            Some(v) => {
                let v = v.value();
                if v.first() != Some(&kind) || &v[1..] != pid_key {
                    r.problem(format!(
                        "document {doc:032x}: the change at time {t} is not the {what} of atom {}",
                        hex::encode(pid_key)
                    ));
                }
            }
        }
        Ok(())
    };
    let atoms = txn.open_table(raw::ATOMS_TABLE)?;
    for row in atoms.iter()? {
        let (k, v) = row?;
        r.atoms += 1;
        let k = k.value();
        if k.len() < 17 {
            r.problem(format!("atom key {} is too short", hex::encode(k)));
            continue;
        }
        let (doc, pid_key) = (be_u128(&k[..16]), &k[16..]);
        let id = hex::encode(pid_key);
        match docs.get(&doc) {
            None => r.problem(format!(
                "atom {id} belongs to document {doc:032x}, which is not in documents"
            )),
            Some(rec) if rec.deleted != 0 => {
                r.problem(format!("deleted document {doc:032x} still has atom {id}"))
            }
            Some(_) => {}
        }
        if Pid::from_key(pid_key).is_none() {
            r.problem(format!(
                "document {doc:032x}: atom key {id} is not a position id"
            ));
        }
        let rec = match raw::atom_record(v.value()) {
            Ok(rec) => rec,
            Err(e) => {
                r.problem(format!("document {doc:032x}: atom {id}: {e}"));
                continue;
            }
        };
        if std::str::from_utf8(&rec.data).is_err() {
            r.problem(format!("document {doc:032x}: atom {id}: data is not UTF-8"));
        }
        if rec.insert != 0 && rec.data.is_empty() {
            r.problem(format!(
                "document {doc:032x}: atom {id} is inserted (time {}) but has no data",
                rec.insert
            ));
        }
        if rec.insert > clock || rec.delete > clock {
            r.problem(format!(
                "document {doc:032x}: atom {id} has a time after the clock {clock}"
            ));
        }
        if rec.insert != 0 {
            expect_change(&mut r, doc, rec.insert, raw::KIND_INSERT, pid_key, "insert")?;
        }
        if rec.delete != 0 {
            expect_change(&mut r, doc, rec.delete, raw::KIND_DELETE, pid_key, "delete")?;
        }
    }

    // changes, against atoms
    let mut atom_key = Vec::new();
    for row in changes.iter()? {
        let (k, v) = row?;
        r.changes += 1;
        let k = k.value();
        let (doc, t) = (be_u128(&k[..16]), be_u64(&k[16..]));
        let v = v.value();
        let Some((&kind, pid_key)) = v.split_first() else {
            r.problem(format!(
                "document {doc:032x}: the change at time {t} is empty"
            ));
            continue;
        };
        if !docs.contains_key(&doc) {
            r.problem(format!(
                "the change at time {t} belongs to document {doc:032x}, which is not in documents"
            ));
        }
        if t > clock {
            r.problem(format!(
                "document {doc:032x}: change time {t} is after the clock {clock}"
            ));
        }
        atom_key.clear();
        atom_key.extend_from_slice(&doc.to_be_bytes());
        atom_key.extend_from_slice(pid_key);
        let id = hex::encode(pid_key);
        let rec = match atoms.get(atom_key.as_slice())? {
            None => {
                r.problem(format!(
                    "document {doc:032x}: the change at time {t} names atom {id}, which is not in atoms"
                ));
                continue;
            }
            Some(a) => match raw::atom_record(a.value()) {
                Ok(rec) => rec,
                // Reported with the atoms.
                Err(_) => continue,
            },
        };
        let (what, stored) = match kind {
            raw::KIND_INSERT => ("insert", rec.insert),
            raw::KIND_DELETE => ("delete", rec.delete),
            other => {
                r.problem(format!(
                    "document {doc:032x}: the change at time {t} has unknown kind {other}"
                ));
                continue;
            }
        };
        if stored != t {
            r.problem(format!(
                "document {doc:032x}: the change at time {t} is an {what} of atom {id}, whose {what} time is {stored}"
            ));
        }
    }
    Ok(r)
}

/// Checks a data folder no server is serving.
pub fn check_offline(data: &Path) -> Result<Vec<CheckReport>, OpsError> {
    let folder = OfflineFolder::open(data)?;
    folder
        .snapshots()?
        .iter()
        .map(|(name, snap)| check_namespace(name, snap))
        .collect()
}

// ---------------------------------------------------------------- export

/// A document's text as PROTOCOL.md 1.2 renders it: its live atoms in
/// position order, each atom of two or more chars as its chars at their
/// virtual ids, less the virtual ids that were deleted.
pub fn export_document(
    namespace: &str,
    txn: &ReadTransaction,
    doc: DocId,
) -> Result<String, OpsError> {
    let rec = match txn.open_table(raw::DOCUMENTS_TABLE)?.get(doc)? {
        Some(v) => raw::doc_record(v.value())?,
        None => {
            return Err(OpsError::NoDocument {
                namespace: namespace.to_owned(),
                doc,
            });
        }
    };
    if rec.deleted != 0 {
        return Err(OpsError::Deleted {
            namespace: namespace.to_owned(),
            doc,
            at: rec.deleted,
        });
    }
    let atoms = txn.open_table(raw::ATOMS_TABLE)?;
    let lo = doc.to_be_bytes();
    let hi = doc.checked_add(1).map(|d| d.to_be_bytes());
    let range = match &hi {
        Some(hi) => atoms.range::<&[u8]>(lo.as_slice()..hi.as_slice())?,
        None => atoms.range::<&[u8]>(lo.as_slice()..)?,
    };
    let corrupt = |what| StoreError::Corrupt {
        table: "atoms",
        what,
    };
    let mut live: Vec<(Pid, String)> = Vec::new();
    let mut deleted: HashSet<Vec<u8>> = HashSet::new();
    for row in range {
        let (k, v) = row?;
        let pid_key = &k.value()[16..];
        let a = raw::atom_record(v.value())?;
        if a.delete != 0 {
            deleted.insert(pid_key.to_vec());
        } else if a.insert != 0 {
            let pid = Pid::from_key(pid_key).ok_or(corrupt("position id key"))?;
            let data = String::from_utf8(a.data).map_err(|_| corrupt("data is not UTF-8"))?;
            live.push((pid, data));
        }
    }
    // Key form order is position order, so a map by key renders in order.
    let mut chars: BTreeMap<Vec<u8>, char> = BTreeMap::new();
    for (pid, data) in &live {
        let mut cs = data.chars();
        match (cs.next(), cs.next()) {
            (Some(c), None) => {
                chars.insert(pid.key().to_vec(), c);
            }
            _ => {
                let mut levels: Vec<Level> = pid.levels().collect();
                levels.push(Level::new(0, pid.creator()));
                for (j, c) in data.chars().enumerate() {
                    *levels.last_mut().expect("a level was pushed") =
                        Level::new(j as u32, pid.creator());
                    let v = Pid::from_levels(&levels);
                    if !deleted.contains(v.key()) {
                        chars.insert(v.key().to_vec(), c);
                    }
                }
            }
        }
    }
    Ok(chars.into_values().collect())
}

/// Exports a document from a data folder no server is serving.
pub fn export_offline(data: &Path, namespace: &str, doc: DocId) -> Result<String, OpsError> {
    existing_namespace(data, namespace)?;
    let folder = OfflineFolder::open(data)?;
    export_document(namespace, &folder.snapshot(namespace)?, doc)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use redb::ReadableDatabase;

    use super::*;
    use crate::store::{DocRecord, ServerClock, SystemClock, WriteTables};

    const DOC: DocId = 0xfeed_0000_0000_0000_0000_0000_0000_0001;

    fn pid(levels: &[(u32, u8)]) -> Pid {
        let l: Vec<Level> = levels.iter().map(|&(i, s)| Level::new(i, s)).collect();
        Pid::from_levels(&l)
    }

    /// A namespace database holding DOC: "hello" (deleted 'e' at its
    /// virtual id), " ", "world" (deleted whole), "!" and a bare tombstone.
    fn healthy(dir: &Path) -> Database {
        let opened = store::open(dir).expect("open");
        let db = opened.db;
        let mut clock = ServerClock::new(Arc::new(SystemClock), opened.clock);
        let txn = db.begin_write().expect("write");
        {
            let mut t = WriteTables::open(&txn).expect("tables");
            let rec = DocRecord {
                modified: clock.next(),
                name_time: 0,
                next_site: 2,
                deleted: 0,
                swept: 0,
                compacted: 0,
                name: "greeting".into(),
            };
            t.put_doc(DOC, &rec, None).expect("doc");
            t.put_site(DOC, 7, 1).expect("site");
            for (p, data) in [
                (pid(&[(10, 1)]), "hello"),
                (pid(&[(20, 1)]), " "),
                (pid(&[(30, 1)]), "world"),
                (pid(&[(40, 1)]), "!"),
            ] {
                t.insert_atom(DOC, p.key(), data.as_bytes(), &mut clock)
                    .expect("insert");
            }
            // 'e' of "hello": its virtual id; the whole of "world"; an id
            // never inserted.
            for p in [pid(&[(10, 1), (1, 1)]), pid(&[(30, 1)]), pid(&[(50, 1)])] {
                t.delete_atom(DOC, p.key(), 1, &mut clock).expect("delete");
            }
            let mut rec = t.doc(DOC).expect("doc").expect("exists");
            let old = rec.modified;
            rec.modified = clock.next();
            t.put_doc(DOC, &rec, Some(old)).expect("doc");
            t.set_clock(clock.last()).expect("clock");
        }
        txn.commit().expect("commit");
        db
    }

    fn check(db: &Database) -> CheckReport {
        check_namespace("default", &db.begin_read().expect("read")).expect("check runs")
    }

    #[test]
    fn export_renders_live_atoms_and_chars_at_virtual_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = healthy(dir.path());
        let txn = db.begin_read().expect("read");
        assert_eq!(
            export_document("default", &txn, DOC).expect("export"),
            "hllo !"
        );
        let e = export_document("default", &txn, DOC + 1).unwrap_err();
        assert!(e.to_string().contains("no document"), "{e}");
        assert_eq!(parse_doc_id(&format!("{DOC:032x}")).expect("id"), DOC);
        assert_eq!(parse_doc_id("0x1f").expect("id"), 0x1f);
        assert!(parse_doc_id("xyz").is_err() && parse_doc_id("").is_err());
    }

    #[test]
    fn a_healthy_database_checks_clean_and_its_backup_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = healthy(dir.path());
        let r = check(&db);
        assert!(r.ok(), "{r}");
        assert_eq!((r.documents, r.atoms, r.sites), (1, 6, 1), "{r}");
        let dest = tempfile::tempdir().expect("tempdir");
        let rows = backup_namespace("default", &db.begin_read().expect("read"), dest.path())
            .expect("backup");
        assert!(rows > 10, "{rows} rows");
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
    fn check_reports_each_kind_of_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = healthy(dir.path());
        let txn = db.begin_write().expect("write");
        {
            // An atom of a document that does not exist.
            let mut atoms = txn.open_table(raw::ATOMS_TABLE).expect("atoms");
            let mut k = (DOC + 5).to_be_bytes().to_vec();
            k.extend_from_slice(pid(&[(1, 1)]).key());
            let mut v = vec![0u8; 17];
            v.extend_from_slice(b"x");
            atoms.insert(k.as_slice(), v.as_slice()).expect("insert");
            // The document's doc_times entry goes.
            let mut times = txn.open_table(raw::DOC_TIMES_TABLE).expect("doc_times");
            let first = times
                .first()
                .expect("first")
                .expect("an entry")
                .0
                .value()
                .to_owned();
            times.remove(&first).expect("remove");
            // The change of the first insert goes.
            let mut changes = txn.open_table(raw::CHANGES_TABLE).expect("changes");
            let first = changes
                .first()
                .expect("first")
                .expect("an entry")
                .0
                .value()
                .to_owned();
            changes.remove(&first).expect("remove");
            // A second replica with the same site.
            let mut sites = txn.open_table(raw::SITES_TABLE).expect("sites");
            let mut k = [0u8; 32];
            k[..16].copy_from_slice(&DOC.to_be_bytes());
            k[16..].copy_from_slice(&8u128.to_be_bytes());
            sites.insert(&k, 1).expect("insert");
        }
        txn.commit().expect("commit");
        let r = check(&db);
        let text = r.to_string();
        assert_eq!(r.problem_count, 4, "{text}");
        for want in [
            "which is not in documents",
            "has no doc_times entry",
            "but no change at that time",
            "site 1 is held by replicas",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }

        // A wrong schema version stops the check there.
        let txn = db.begin_write().expect("write");
        txn.open_table(raw::META_TABLE)
            .expect("meta")
            .insert(raw::SCHEMA_KEY, 99)
            .expect("insert");
        txn.commit().expect("commit");
        let r = check(&db);
        assert!(r.to_string().contains("schema version 99"), "{r}");
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
