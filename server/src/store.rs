//! The redb schema, the server clock, and everything that reads or changes
//! stored state.
//!
//! Tables (ARCHITECTURE.md, "Storage (server)", is the long form):
//!
//! | table       | key                                   | value |
//! |-------------|---------------------------------------|-------|
//! | `meta`      | `&str`                                | `u64` (`schema_version`, `clock`, `boot`) |
//! | `documents` | `u128` document                       | modified, name time, next site, deleted time, name |
//! | `doc_times` | modified `u64` BE ++ document `u128` BE | `()` |
//! | `sites`     | document BE ++ replica BE             | `u8` site |
//! | `atoms`     | document BE ++ pid key form           | insert time, delete time, data |
//! | `changes`   | document BE ++ time BE                | kind ++ pid key form |
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

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use notesync_protocol::{
    AtomListBuilder, DocId, DocName, DocResponse, Pid, PidListBuilder, ServerFrame, Time,
};
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, WriteTransaction,
};

/// The layout version this build reads and writes. Versions 1 (no deletion
/// time in `documents`) and 2 (no compaction times) are migrated at start.
pub const SCHEMA_VERSION: u64 = 3;
/// File name of the database inside the data folder.
pub const DB_FILE: &str = "notesync.redb";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const DOCUMENTS: TableDefinition<u128, &[u8]> = TableDefinition::new("documents");
const DOC_TIMES: TableDefinition<&[u8; 24], ()> = TableDefinition::new("doc_times");
const SITES: TableDefinition<&[u8; 32], u8> = TableDefinition::new("sites");
const ATOMS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("atoms");
const CHANGES: TableDefinition<&[u8; 24], &[u8]> = TableDefinition::new("changes");

const META_SCHEMA: &str = "schema_version";
const META_CLOCK: &str = "clock";
const META_BOOT: &str = "boot";

const CHANGE_INSERT: u8 = 1;
const CHANGE_DELETE: u8 = 2;

/// Sites a document can hand out: 1 to 255 (0 is reserved).
pub const MAX_SITE: u16 = 255;

// ---------------------------------------------------------------- errors

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
    redb::DatabaseError
);

fn corrupt(table: &'static str, what: &'static str) -> StoreError {
    StoreError::Corrupt { table, what }
}

// ---------------------------------------------------------------- clock

/// A source of wall-clock time in microseconds since the Unix epoch.
pub trait WallClock: Send + Sync + 'static {
    fn now_micros(&self) -> Time;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_micros(&self) -> Time {
        // A clock before 1970 reads as 0; the server clock still advances.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as Time)
            .unwrap_or(0)
    }
}

/// The server clock: every time it hands out is `max(wall, last + 1)`, so
/// times are unique and never go back, whatever the wall clock does. Only
/// the writer owns one; `last` is persisted with every commit.
pub struct ServerClock {
    wall: std::sync::Arc<dyn WallClock>,
    last: Time,
}

impl ServerClock {
    pub fn new(wall: std::sync::Arc<dyn WallClock>, last: Time) -> Self {
        ServerClock { wall, last }
    }

    /// A new, unique time.
    pub fn next(&mut self) -> Time {
        let t = self.wall.now_micros().max(self.last.saturating_add(1));
        self.last = t;
        t
    }

    /// The last time handed out.
    pub fn last(&self) -> Time {
        self.last
    }

    /// The wall clock now (for compaction's horizon; not a change time).
    pub fn wall_now(&self) -> Time {
        self.wall.now_micros()
    }
}

// ---------------------------------------------------------------- records

/// A document's row in `documents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocRecord {
    /// Time of the document's last change (creation included).
    pub modified: Time,
    /// Time the name was last set; 0 if it never was (created by a
    /// session with an empty name).
    pub name_time: Time,
    /// Next site to hand out; `MAX_SITE + 1` once all are taken.
    pub next_site: u16,
    /// When the document was deleted (0: it is not). A deleted document
    /// keeps its record (so its id is never reused and every device learns
    /// of the deletion) and loses its atoms; `modified` equals this time.
    pub deleted: Time,
    /// Tombstone compaction has looked at the change index up to this time.
    pub swept: Time,
    /// The latest delete time of a tombstone compaction dropped (0: none).
    /// A catch-up since an earlier time cannot be a delta: it is a resync
    /// (PROTOCOL.md 3.6).
    pub compacted: Time,
    pub name: String,
}

/// Bytes before the name in a `documents` record (schema 3).
const DOC_HEAD: usize = 42;
/// The same in schema 2.
const DOC_HEAD_V2: usize = 26;

impl DocRecord {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(DOC_HEAD + self.name.len());
        v.extend_from_slice(&self.modified.to_be_bytes());
        v.extend_from_slice(&self.name_time.to_be_bytes());
        v.extend_from_slice(&self.next_site.to_be_bytes());
        v.extend_from_slice(&self.deleted.to_be_bytes());
        v.extend_from_slice(&self.swept.to_be_bytes());
        v.extend_from_slice(&self.compacted.to_be_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v
    }

    fn decode(b: &[u8]) -> Result<Self, StoreError> {
        if b.len() < DOC_HEAD {
            return Err(corrupt("documents", "record shorter than 42 bytes"));
        }
        let mut rec = Self::decode_v1(&[&b[..18], &b[DOC_HEAD..]].concat())?;
        rec.deleted = be_u64(&b[18..26]);
        rec.swept = be_u64(&b[26..34]);
        rec.compacted = be_u64(&b[34..42]);
        Ok(rec)
    }

    /// A schema 2 record: no compaction times.
    fn decode_v2(b: &[u8]) -> Result<Self, StoreError> {
        if b.len() < DOC_HEAD_V2 {
            return Err(corrupt("documents", "record shorter than 26 bytes"));
        }
        let mut rec = Self::decode_v1(&[&b[..18], &b[DOC_HEAD_V2..]].concat())?;
        rec.deleted = be_u64(&b[18..26]);
        Ok(rec)
    }

    /// Whether a catch-up since `since` must be a resync: tombstones
    /// deleted after `since` were dropped, so a delta would miss their
    /// deletes (PROTOCOL.md 3.6). Since 0 is always a full state.
    pub fn needs_resync(&self, since: Time) -> bool {
        since != 0 && since < self.compacted
    }

    /// A schema 1 record: no deletion time.
    fn decode_v1(b: &[u8]) -> Result<Self, StoreError> {
        let bad = || corrupt("documents", "record shorter than 18 bytes");
        let modified =
            u64::from_be_bytes(b.get(0..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
        let name_time = u64::from_be_bytes(
            b.get(8..16)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        );
        let next_site = u16::from_be_bytes(
            b.get(16..18)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        );
        let name = std::str::from_utf8(&b[18..])
            .map_err(|_| corrupt("documents", "name is not UTF-8"))?
            .to_owned();
        Ok(DocRecord {
            modified,
            name_time,
            next_site,
            deleted: 0,
            swept: 0,
            compacted: 0,
            name,
        })
    }

    pub fn doc_name(&self) -> Result<DocName, StoreError> {
        DocName::new(self.name.clone())
            .map_err(|_| corrupt("documents", "name is not a valid name"))
    }
}

/// An atom's row in `atoms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtomRecord {
    /// Time it became live; 0 if the id is known only from a delete.
    pub insert: Time,
    /// First delete time; 0 while live.
    pub delete: Time,
    /// Site of the first delete's sender (0: it had none).
    pub deleter: u8,
    /// Empty until an insert of the id has arrived.
    pub data: Vec<u8>,
}

impl AtomRecord {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(17 + self.data.len());
        v.extend_from_slice(&self.insert.to_be_bytes());
        v.extend_from_slice(&self.delete.to_be_bytes());
        v.push(self.deleter);
        v.extend_from_slice(&self.data);
        v
    }

    fn decode(b: &[u8]) -> Result<Self, StoreError> {
        if b.len() < 17 {
            return Err(corrupt("atoms", "record shorter than 17 bytes"));
        }
        Ok(AtomRecord {
            insert: be_u64(&b[0..8]),
            delete: be_u64(&b[8..16]),
            deleter: b[16],
            data: b[17..].to_vec(),
        })
    }

    /// What a pull (or a session's 33) since `since` sends for this atom
    /// (PROTOCOL.md 3.1, 3.2).
    pub fn delta(&self, since: Time, rule: Rule) -> Option<Delta> {
        if self.delete == 0 {
            (self.insert > since).then_some(Delta::Insert)
        } else if self.delete > since && (self.insert <= since || rule == Rule::Session) {
            Some(Delta::Delete)
        } else {
            None
        }
    }
}

/// Which deletes a delta sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// A pull or an upsert's reply: an atom inserted and deleted after
    /// `since` is sent as neither (the client cannot have it).
    Pull,
    /// A session's 33: every delete after `since` is sent, since a session
    /// client may hold atoms it received live after its cursor.
    Session,
}

/// How an atom appears in a pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    Insert,
    Delete,
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

// ---------------------------------------------------------------- keys

fn atom_key(doc: DocId, pid_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + pid_key.len());
    k.extend_from_slice(&doc.to_be_bytes());
    k.extend_from_slice(pid_key);
    k
}

fn change_key(doc: DocId, time: Time) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&doc.to_be_bytes());
    k[16..].copy_from_slice(&time.to_be_bytes());
    k
}

fn time_key(time: Time, doc: DocId) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&time.to_be_bytes());
    k[8..].copy_from_slice(&doc.to_be_bytes());
    k
}

fn site_key(doc: DocId, replica: u128) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(&doc.to_be_bytes());
    k[16..].copy_from_slice(&replica.to_be_bytes());
    k
}

// ---------------------------------------------------------------- open

/// What [`open`] found.
pub struct Opened {
    pub db: Database,
    pub path: PathBuf,
    /// The clock's last persisted value.
    pub clock: Time,
    /// How many times this database has been opened, this time included
    /// (session ids are made unique across restarts with it).
    pub boot: u64,
    /// Every document's last-modified time, ascending.
    pub doc_times: Vec<(Time, DocId)>,
}

/// Opens (or creates) the database in `dir`, checks its schema version,
/// and loads what the index needs.
pub fn open(dir: &Path) -> Result<Opened, OpenError> {
    std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join(DB_FILE);
    let db = match Database::create(&path) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(OpenError::AlreadyOpen { path });
        }
        Err(e) => {
            return Err(OpenError::Redb {
                path,
                source: e.into(),
            });
        }
    };
    open_database(db, path)
}

/// The part of [`open`] after the file is open: checks the schema, counts
/// the boot, loads the index. Separate so that tests can open a database
/// over a fault-injecting redb storage backend (`storage_faults`).
pub(crate) fn open_database(db: Database, path: PathBuf) -> Result<Opened, OpenError> {
    let store_err = |source: StoreError| OpenError::Store {
        path: path.clone(),
        source,
    };
    let boot = init_schema(&db, &path)?;
    let (clock, doc_times) = load(&db).map_err(store_err)?;
    Ok(Opened {
        db,
        path,
        clock,
        boot,
        doc_times,
    })
}

/// Checks or writes the schema version and counts the boot, in one commit.
fn init_schema(db: &Database, path: &Path) -> Result<u64, OpenError> {
    let wrap = |e: StoreError| OpenError::Store {
        path: path.to_owned(),
        source: e,
    };
    let txn = db.begin_write().map_err(|e| wrap(e.into()))?;
    let had_tables = txn
        .list_tables()
        .map_err(|e| wrap(e.into()))?
        .next()
        .is_some();
    let boot = {
        let mut meta = txn.open_table(META).map_err(|e| wrap(e.into()))?;
        let version = meta
            .get(META_SCHEMA)
            .map_err(|e| wrap(e.into()))?
            .map(|v| v.value());
        match version {
            Some(SCHEMA_VERSION) => {}
            Some(old @ (1 | 2)) => {
                migrate(&txn, old).map_err(wrap)?;
                meta.insert(META_SCHEMA, SCHEMA_VERSION)
                    .map_err(|e| wrap(e.into()))?;
            }
            Some(found) => {
                return Err(OpenError::UnknownSchema {
                    path: path.to_owned(),
                    found,
                });
            }
            None if had_tables => {
                return Err(OpenError::NotNotesync {
                    path: path.to_owned(),
                });
            }
            None => {
                meta.insert(META_SCHEMA, SCHEMA_VERSION)
                    .map_err(|e| wrap(e.into()))?;
            }
        }
        let boot = meta
            .get(META_BOOT)
            .map_err(|e| wrap(e.into()))?
            .map(|v| v.value())
            .unwrap_or(0)
            .saturating_add(1);
        meta.insert(META_BOOT, boot).map_err(|e| wrap(e.into()))?;
        boot
    };
    // Create every table now, so readers never meet a missing one.
    txn.open_table(DOCUMENTS).map_err(|e| wrap(e.into()))?;
    txn.open_table(DOC_TIMES).map_err(|e| wrap(e.into()))?;
    txn.open_table(SITES).map_err(|e| wrap(e.into()))?;
    txn.open_table(ATOMS).map_err(|e| wrap(e.into()))?;
    txn.open_table(CHANGES).map_err(|e| wrap(e.into()))?;
    txn.commit().map_err(|e| wrap(e.into()))?;
    Ok(boot)
}

/// Schema 1 or 2 to 3: every `documents` record gets the fields it lacks
/// (deletion time, compaction times), as 0. One pass over the documents,
/// in the transaction that writes the new version.
fn migrate(txn: &WriteTransaction, from: u64) -> Result<(), StoreError> {
    let mut docs = txn.open_table(DOCUMENTS)?;
    let mut all = Vec::new();
    for entry in docs.range::<u128>(..)? {
        let (k, v) = entry?;
        let rec = match from {
            1 => DocRecord::decode_v1(v.value())?,
            _ => DocRecord::decode_v2(v.value())?,
        };
        all.push((k.value(), rec));
    }
    for (doc, rec) in all {
        docs.insert(doc, rec.encode().as_slice())?;
    }
    Ok(())
}

fn load(db: &Database) -> Result<(Time, Vec<(Time, DocId)>), StoreError> {
    let txn = db.begin_read()?;
    let clock = txn
        .open_table(META)?
        .get(META_CLOCK)?
        .map(|v| v.value())
        .unwrap_or(0);
    let table = txn.open_table(DOC_TIMES)?;
    let mut out = Vec::with_capacity(table.len()? as usize);
    for entry in table.range::<&[u8; 24]>(..)? {
        let (k, _) = entry?;
        let k = k.value();
        out.push((
            be_u64(&k[..8]),
            u128::from_be_bytes(k[8..].try_into().unwrap_or([0; 16])),
        ));
    }
    Ok((clock, out))
}

// ---------------------------------------------------------------- reads

/// A consistent read of the database: everything committed up to its
/// `clock`, nothing after.
pub struct Snapshot {
    txn: ReadTransaction,
}

impl Snapshot {
    pub fn begin(db: &Database) -> Result<Self, StoreError> {
        Ok(Snapshot {
            txn: db.begin_read()?,
        })
    }

    /// The clock value committed in this snapshot: every change it holds has
    /// a time at or below it, so it is a safe `sync_time` (PROTOCOL.md 3.4).
    pub fn clock(&self) -> Result<Time, StoreError> {
        Ok(self
            .txn
            .open_table(META)?
            .get(META_CLOCK)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    pub fn doc(&self, doc: DocId) -> Result<Option<DocRecord>, StoreError> {
        match self.txn.open_table(DOCUMENTS)?.get(doc)? {
            Some(v) => Ok(Some(DocRecord::decode(v.value())?)),
            None => Ok(None),
        }
    }

    pub fn site(&self, doc: DocId, replica: u128) -> Result<Option<u8>, StoreError> {
        Ok(self
            .txn
            .open_table(SITES)?
            .get(&site_key(doc, replica))?
            .map(|v| v.value()))
    }

    #[cfg(test)]
    pub fn atom(&self, doc: DocId, pid: &Pid) -> Result<Option<AtomRecord>, StoreError> {
        match self
            .txn
            .open_table(ATOMS)?
            .get(atom_key(doc, pid.key()).as_slice())?
        {
            Some(v) => Ok(Some(AtomRecord::decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Appends to `out` what a client that synced `doc` up to `since` lacks
    /// (PROTOCOL.md 3.1), leaving out what `exclude` says it sent itself.
    pub fn delta(
        &self,
        doc: DocId,
        since: Time,
        rule: Rule,
        exclude: Option<&SentIds>,
        out: &mut DocFrames,
    ) -> Result<(), StoreError> {
        let atoms = self.txn.open_table(ATOMS)?;
        let mut emit = |kind: Delta, pid_key: &[u8], data: &[u8]| -> Result<(), StoreError> {
            if exclude.is_some_and(|x| x.contains(kind, pid_key)) {
                return Ok(());
            }
            let pid = Pid::from_key(pid_key).ok_or(corrupt("atoms", "position id key"))?;
            match kind {
                Delta::Insert => {
                    let data = std::str::from_utf8(data)
                        .map_err(|_| corrupt("atoms", "data is not UTF-8"))?;
                    out.push_insert(data, &pid)
                }
                Delta::Delete => out.push_delete(&pid),
            }
        };
        if since == 0 {
            // Everything is new: one sequential scan in position order.
            let lo = doc.to_be_bytes();
            let hi = doc.checked_add(1).map(|d| d.to_be_bytes());
            let range = match &hi {
                Some(hi) => atoms.range::<&[u8]>(lo.as_slice()..hi.as_slice())?,
                None => atoms.range::<&[u8]>(lo.as_slice()..)?,
            };
            for entry in range {
                let (k, v) = entry?;
                let rec = AtomRecord::decode(v.value())?;
                // Since 0 the client holds nothing (a session's cursor is
                // never 0), so tombstones of atoms it never saw are left out.
                if let Some(kind) = rec.delta(0, Rule::Pull) {
                    emit(kind, &k.value()[16..], &rec.data)?;
                }
            }
        } else {
            let changes = self.txn.open_table(CHANGES)?;
            let lo = change_key(doc, since.saturating_add(1));
            let hi = change_key(doc, Time::MAX);
            for entry in changes.range::<&[u8; 24]>(&lo..=&hi)? {
                let (_, v) = entry?;
                let v = v.value();
                let (&kind, pid_key) = v.split_first().ok_or(corrupt("changes", "empty entry"))?;
                let rec = match atoms.get(atom_key(doc, pid_key).as_slice())? {
                    Some(a) => AtomRecord::decode(a.value())?,
                    None => return Err(corrupt("changes", "entry for a missing atom")),
                };
                // Each atom has at most one entry per kind: emitting only at
                // the entry of the kind it is sent as never sends it twice.
                match (kind, rec.delta(since, rule)) {
                    (CHANGE_INSERT, Some(Delta::Insert)) => {
                        emit(Delta::Insert, pid_key, &rec.data)?
                    }
                    (CHANGE_DELETE, Some(Delta::Delete)) => emit(Delta::Delete, pid_key, &[])?,
                    (CHANGE_INSERT | CHANGE_DELETE, _) => {}
                    _ => return Err(corrupt("changes", "unknown change kind")),
                }
            }
        }
        Ok(())
    }
}

impl Snapshot {
    /// What a client that synced `doc` up to `since` gets (PROTOCOL.md 3.1,
    /// 3.2, 3.6): the delta since then, or, when tombstones deleted after
    /// `since` were compacted away, a resync (a 36, then the full live
    /// state, as since 0). Returns whether it is a resync.
    pub fn catch_up(
        &self,
        doc: DocId,
        rec: &DocRecord,
        since: Time,
        rule: Rule,
        exclude: Option<&SentIds>,
        out: &mut DocFrames,
    ) -> Result<bool, StoreError> {
        if rec.needs_resync(since) {
            out.resync();
            self.delta(doc, 0, Rule::Pull, None, out)?;
            Ok(true)
        } else {
            self.delta(doc, since, rule, exclude, out)?;
            Ok(false)
        }
    }

    /// For an upsert's reply: the deletes of ids the upsert inserted that
    /// are deleted here but that [`delta`](Self::delta) did not send (the
    /// delete came first, or the atom was inserted and deleted after
    /// `since`, e.g. by a re-send after a lost reply). The client holds
    /// those atoms live; without this it would never learn of the delete.
    pub fn deleted_sent_inserts(
        &self,
        doc: DocId,
        since: Time,
        sent: &SentIds,
        out: &mut DocFrames,
    ) -> Result<(), StoreError> {
        let atoms = self.txn.open_table(ATOMS)?;
        for pid_key in &sent.insert_order {
            if sent.deletes.contains(pid_key) {
                continue;
            }
            let Some(v) = atoms.get(atom_key(doc, pid_key).as_slice())? else {
                continue;
            };
            let rec = AtomRecord::decode(v.value())?;
            if rec.delete != 0 && rec.delta(since, Rule::Pull) != Some(Delta::Delete) {
                let pid = Pid::from_key(pid_key).ok_or(corrupt("atoms", "position id key"))?;
                out.push_delete(&pid)?;
            }
        }
        Ok(())
    }
}

/// The ids an upsert sent: its reply leaves them out (the client has them).
#[derive(Debug, Default)]
pub struct SentIds {
    inserts: HashSet<Vec<u8>>,
    /// The inserted ids once each, in the upsert's order.
    insert_order: Vec<Vec<u8>>,
    deletes: HashSet<Vec<u8>>,
}

impl SentIds {
    pub fn from_upsert(u: &notesync_protocol::Upsert) -> Self {
        let key = |p: notesync_protocol::PidRef<'_>| {
            let mut k = Vec::with_capacity(p.wire().len());
            p.write_key(&mut k);
            k
        };
        let mut inserts = HashSet::with_capacity(u.inserts.len());
        let mut insert_order = Vec::with_capacity(u.inserts.len());
        for a in u.inserts.iter() {
            let k = key(a.pid);
            if inserts.insert(k.clone()) {
                insert_order.push(k);
            }
        }
        SentIds {
            inserts,
            insert_order,
            deletes: u.deletes.iter().map(key).collect(),
        }
    }

    /// Whether the client already has this change.
    fn contains(&self, kind: Delta, pid_key: &[u8]) -> bool {
        match kind {
            Delta::Insert => self.inserts.contains(pid_key),
            Delta::Delete => self.deletes.contains(pid_key),
        }
    }
}

/// Builds one or more 33 frames, each under `chunk_bytes` of list data and
/// `max_items` per list, so a large document never needs one huge frame.
pub struct DocFrames {
    doc: DocId,
    name: DocName,
    atoms: AtomListBuilder,
    deletes: PidListBuilder,
    frames: Vec<Bytes>,
    chunk_bytes: usize,
    max_items: usize,
}

impl DocFrames {
    pub fn new(doc: DocId, name: DocName, chunk_bytes: usize, max_items: usize) -> Self {
        DocFrames {
            doc,
            name,
            atoms: AtomListBuilder::new(),
            deletes: PidListBuilder::new(),
            frames: Vec::new(),
            chunk_bytes: chunk_bytes.max(1),
            max_items: max_items.max(1),
        }
    }

    fn push_insert(&mut self, data: &str, pid: &Pid) -> Result<(), StoreError> {
        self.atoms
            .push_parts(data, pid)
            .map_err(|_| corrupt("atoms", "atom is not a valid atom"))?;
        self.maybe_flush();
        Ok(())
    }

    fn push_delete(&mut self, pid: &Pid) -> Result<(), StoreError> {
        self.deletes
            .push(pid)
            .map_err(|_| corrupt("atoms", "position id is not valid"))?;
        self.maybe_flush();
        Ok(())
    }

    fn maybe_flush(&mut self) {
        if self.atoms.byte_len() + self.deletes.byte_len() >= self.chunk_bytes
            || self.atoms.len() >= self.max_items
            || self.deletes.len() >= self.max_items
        {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let frame = ServerFrame::DocResponse(DocResponse {
            doc: self.doc,
            name: self.name.clone(),
            inserts: std::mem::take(&mut self.atoms).finish(),
            deletes: std::mem::take(&mut self.deletes).finish(),
        });
        self.frames.push(frame.to_bytes());
    }

    /// Starts a resync (PROTOCOL.md 3.6): a 36 before the 33s, which then
    /// hold the full live state.
    pub fn resync(&mut self) {
        self.flush_if_any();
        self.frames
            .push(ServerFrame::Resync { doc: self.doc }.to_bytes());
    }

    fn flush_if_any(&mut self) {
        if !self.atoms.is_empty() || !self.deletes.is_empty() {
            self.flush();
        }
    }

    /// Whether a 36 was pushed.
    fn has_resync(&self) -> bool {
        self.frames
            .first()
            .is_some_and(|f| f.first() == Some(&notesync_protocol::header::RESYNC))
    }

    /// The frames; at least one 33, even when nothing changed.
    pub fn finish(mut self) -> Vec<Bytes> {
        if self.has_resync() && self.frames.len() == 1 {
            self.flush();
            return self.frames;
        }
        if self.frames.is_empty() || !self.atoms.is_empty() || !self.deletes.is_empty() {
            self.flush();
        }
        self.frames
    }
}

// ---------------------------------------------------------------- writes

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new live atom, at this time.
    New(Time),
    /// The id exists, live, with the same data: nothing changed.
    Unchanged,
    /// The id is deleted on the server (a tombstone that came first, or a
    /// delete since): nothing a client can see changed, but the sender
    /// holds the atom live and must be told of the delete. `stored`: its
    /// data was stored now (it was a bare tombstone).
    Deleted { deleter: u8, stored: bool },
}

/// What one [`WriteTables::compact_doc`] step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Change entries looked at.
    pub visited: usize,
    /// Atoms dropped.
    pub dropped: usize,
    /// The change index was looked at up to this time.
    pub swept: Time,
    /// The latest delete time dropped (0: none).
    pub compacted: Time,
    /// Whether the step reached `cutoff`.
    pub done: bool,
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// A live atom was deleted, or an unknown id recorded as a tombstone.
    New(Time),
    /// Already deleted: the first delete time stays.
    Unchanged,
}

/// Whether an insert could be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertCheck {
    Ok,
    /// The id exists with other data.
    Conflict,
}

/// The tables of one write transaction.
pub struct WriteTables<'t> {
    meta: Table<'t, &'static str, u64>,
    docs: Table<'t, u128, &'static [u8]>,
    doc_times: Table<'t, &'static [u8; 24], ()>,
    sites: Table<'t, &'static [u8; 32], u8>,
    atoms: Table<'t, &'static [u8], &'static [u8]>,
    changes: Table<'t, &'static [u8; 24], &'static [u8]>,
}

impl<'t> WriteTables<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(WriteTables {
            meta: txn.open_table(META)?,
            docs: txn.open_table(DOCUMENTS)?,
            doc_times: txn.open_table(DOC_TIMES)?,
            sites: txn.open_table(SITES)?,
            atoms: txn.open_table(ATOMS)?,
            changes: txn.open_table(CHANGES)?,
        })
    }

    pub fn set_clock(&mut self, t: Time) -> Result<(), StoreError> {
        self.meta.insert(META_CLOCK, t)?;
        Ok(())
    }

    pub fn doc(&self, doc: DocId) -> Result<Option<DocRecord>, StoreError> {
        match self.docs.get(doc)? {
            Some(v) => Ok(Some(DocRecord::decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Writes a document's row; `old_modified` is its stored `modified`
    /// (None if new), whose `doc_times` entry is replaced.
    pub fn put_doc(
        &mut self,
        doc: DocId,
        rec: &DocRecord,
        old_modified: Option<Time>,
    ) -> Result<(), StoreError> {
        self.docs.insert(doc, rec.encode().as_slice())?;
        if old_modified != Some(rec.modified) {
            if let Some(old) = old_modified {
                self.doc_times.remove(&time_key(old, doc))?;
            }
            self.doc_times.insert(&time_key(rec.modified, doc), ())?;
        }
        Ok(())
    }

    pub fn site(&self, doc: DocId, replica: u128) -> Result<Option<u8>, StoreError> {
        Ok(self.sites.get(&site_key(doc, replica))?.map(|v| v.value()))
    }

    /// The first document whose id is `from` or after, in id order.
    pub fn doc_from(&self, from: DocId) -> Result<Option<(DocId, DocRecord)>, StoreError> {
        match self.docs.range(from..)?.next() {
            Some(entry) => {
                let (k, v) = entry?;
                Ok(Some((k.value(), DocRecord::decode(v.value())?)))
            }
            None => Ok(None),
        }
    }

    pub fn put_site(&mut self, doc: DocId, replica: u128, site: u8) -> Result<(), StoreError> {
        self.sites.insert(&site_key(doc, replica), site)?;
        Ok(())
    }

    pub fn atom(&self, doc: DocId, pid_key: &[u8]) -> Result<Option<AtomRecord>, StoreError> {
        match self.atoms.get(atom_key(doc, pid_key).as_slice())? {
            Some(v) => Ok(Some(AtomRecord::decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Whether inserting `data` at this id would be accepted.
    pub fn check_insert(
        &self,
        doc: DocId,
        pid_key: &[u8],
        data: &[u8],
    ) -> Result<InsertCheck, StoreError> {
        Ok(match self.atom(doc, pid_key)? {
            Some(rec) if !rec.data.is_empty() && rec.data != data => InsertCheck::Conflict,
            _ => InsertCheck::Ok,
        })
    }

    /// Inserts an atom (the caller checked it with
    /// [`check_insert`](Self::check_insert)). Takes a time from `clock`
    /// only if something changes.
    pub fn insert_atom(
        &mut self,
        doc: DocId,
        pid_key: &[u8],
        data: &[u8],
        clock: &mut ServerClock,
    ) -> Result<Inserted, StoreError> {
        let key = atom_key(doc, pid_key);
        let existing = match self.atoms.get(key.as_slice())? {
            Some(v) => Some(AtomRecord::decode(v.value())?),
            None => None,
        };
        self.insert_found(doc, &key, pid_key, data, existing, clock)
    }

    /// [`check_insert`](Self::check_insert) then
    /// [`insert_atom`](Self::insert_atom) with one lookup instead of two
    /// (a session insert's hot path): `None`, and nothing written, if the
    /// id exists with other data.
    pub fn insert_checked(
        &mut self,
        doc: DocId,
        pid_key: &[u8],
        data: &[u8],
        clock: &mut ServerClock,
    ) -> Result<Option<Inserted>, StoreError> {
        let key = atom_key(doc, pid_key);
        let existing = match self.atoms.get(key.as_slice())? {
            Some(v) => Some(AtomRecord::decode(v.value())?),
            None => None,
        };
        if existing
            .as_ref()
            .is_some_and(|rec| !rec.data.is_empty() && rec.data != data)
        {
            return Ok(None);
        }
        self.insert_found(doc, &key, pid_key, data, existing, clock)
            .map(Some)
    }

    /// The insert, given what the atoms table holds at `key`.
    fn insert_found(
        &mut self,
        doc: DocId,
        key: &[u8],
        pid_key: &[u8],
        data: &[u8],
        existing: Option<AtomRecord>,
        clock: &mut ServerClock,
    ) -> Result<Inserted, StoreError> {
        match existing {
            None => {
                let t = clock.next();
                let rec = AtomRecord {
                    insert: t,
                    delete: 0,
                    deleter: 0,
                    data: data.to_vec(),
                };
                self.atoms.insert(key, rec.encode().as_slice())?;
                self.put_change(doc, t, CHANGE_INSERT, pid_key)?;
                Ok(Inserted::New(t))
            }
            Some(rec) if rec.data.is_empty() => {
                // Deleted before it arrived: keep the data (so a different
                // re-use of the id is still a conflict), but it stays a
                // tombstone and gets no insert time.
                let deleter = rec.deleter;
                let rec = AtomRecord {
                    data: data.to_vec(),
                    ..rec
                };
                self.atoms.insert(key, rec.encode().as_slice())?;
                Ok(Inserted::Deleted {
                    deleter,
                    stored: true,
                })
            }
            Some(rec) if rec.data == data && rec.delete != 0 => Ok(Inserted::Deleted {
                deleter: rec.deleter,
                stored: false,
            }),
            Some(rec) if rec.data == data => Ok(Inserted::Unchanged),
            Some(_) => Err(corrupt(
                "atoms",
                "insert of a conflicting id was not checked",
            )),
        }
    }

    /// Deletes an atom, or records a tombstone for an unknown id.
    /// `deleter` is the sender's site (0: none).
    pub fn delete_atom(
        &mut self,
        doc: DocId,
        pid_key: &[u8],
        deleter: u8,
        clock: &mut ServerClock,
    ) -> Result<Deleted, StoreError> {
        let key = atom_key(doc, pid_key);
        let existing = match self.atoms.get(key.as_slice())? {
            Some(v) => Some(AtomRecord::decode(v.value())?),
            None => None,
        };
        let rec = match existing {
            Some(rec) if rec.delete != 0 => return Ok(Deleted::Unchanged),
            Some(rec) => rec,
            None => AtomRecord {
                insert: 0,
                delete: 0,
                deleter: 0,
                data: Vec::new(),
            },
        };
        let t = clock.next();
        let rec = AtomRecord {
            delete: t,
            deleter,
            ..rec
        };
        self.atoms.insert(key.as_slice(), rec.encode().as_slice())?;
        self.put_change(doc, t, CHANGE_DELETE, pid_key)?;
        Ok(Deleted::New(t))
    }

    /// One bounded step of tombstone compaction on `doc` (PROTOCOL.md 3.6):
    /// looks at up to `budget` entries of its change index after `from` and
    /// up to `cutoff`, and drops every atom deleted at or before `cutoff`
    /// (its record and both its change entries), except a bare tombstone
    /// whose parent id is a live atom (the delete of a char of a live atom,
    /// 1.2: the full state needs it). Deltas since a time at or after the
    /// latest dropped delete time stay exact.
    pub fn compact_doc(
        &mut self,
        doc: DocId,
        from: Time,
        cutoff: Time,
        budget: usize,
    ) -> Result<Compacted, StoreError> {
        let mut out = Compacted {
            swept: from,
            ..Compacted::default()
        };
        if cutoff <= from {
            out.done = true;
            return Ok(out);
        }
        let lo = change_key(doc, from.saturating_add(1));
        let hi = change_key(doc, cutoff);
        let mut entries: Vec<(Time, u8, Vec<u8>)> = Vec::new();
        for entry in self.changes.range::<&[u8; 24]>(&lo..=&hi)? {
            if entries.len() >= budget.max(1) {
                break;
            }
            let (k, v) = entry?;
            let t = be_u64(&k.value()[16..24]);
            let (&kind, pid_key) = v
                .value()
                .split_first()
                .ok_or(corrupt("changes", "empty entry"))?;
            entries.push((t, kind, pid_key.to_vec()));
        }
        out.visited = entries.len();
        out.done = entries.len() < budget.max(1);
        for (t, kind, pid_key) in entries {
            out.swept = t;
            if kind != CHANGE_DELETE {
                continue;
            }
            let Some(rec) = self.atom(doc, &pid_key)? else {
                // Its insert entry was visited first and dropped it: never
                // (an atom is dropped at its delete entry), but harmless.
                continue;
            };
            if rec.delete != t {
                return Err(corrupt(
                    "changes",
                    "delete entry at another time than its atom's",
                ));
            }
            if rec.insert == 0 && self.parent_is_live(doc, &pid_key)? {
                continue;
            }
            self.atoms.remove(atom_key(doc, &pid_key).as_slice())?;
            self.changes.remove(&change_key(doc, t))?;
            if rec.insert != 0 {
                self.changes.remove(&change_key(doc, rec.insert))?;
            }
            out.dropped += 1;
            out.compacted = out.compacted.max(t);
        }
        if out.done {
            out.swept = cutoff;
        }
        Ok(out)
    }

    /// Whether the id one level up from `pid_key` is a live atom.
    fn parent_is_live(&self, doc: DocId, pid_key: &[u8]) -> Result<bool, StoreError> {
        const LEVEL_KEY: usize = 5;
        if pid_key.len() <= LEVEL_KEY {
            return Ok(false);
        }
        let parent = &pid_key[..pid_key.len() - LEVEL_KEY];
        Ok(self
            .atom(doc, parent)?
            .is_some_and(|p| p.delete == 0 && p.insert != 0))
    }

    /// Drops a deleted document's atoms, change index and sites (its record
    /// stays). Cost: O(its atoms), in the deleting transaction.
    pub fn drop_content(&mut self, doc: DocId) -> Result<(), StoreError> {
        let lo = doc.to_be_bytes();
        match doc.checked_add(1).map(|d| d.to_be_bytes()) {
            Some(hi) => self
                .atoms
                .retain_in::<&[u8], _>(lo.as_slice()..hi.as_slice(), |_, _| false)?,
            None => self
                .atoms
                .retain_in::<&[u8], _>(lo.as_slice().., |_, _| false)?,
        }
        let (clo, chi) = (change_key(doc, 0), change_key(doc, Time::MAX));
        self.changes
            .retain_in::<&[u8; 24], _>(&clo..=&chi, |_, _| false)?;
        let (slo, shi) = (site_key(doc, 0), site_key(doc, u128::MAX));
        self.sites
            .retain_in::<&[u8; 32], _>(&slo..=&shi, |_, _| false)?;
        Ok(())
    }

    fn put_change(
        &mut self,
        doc: DocId,
        t: Time,
        kind: u8,
        pid_key: &[u8],
    ) -> Result<(), StoreError> {
        let mut v = Vec::with_capacity(1 + pid_key.len());
        v.push(kind);
        v.extend_from_slice(pid_key);
        self.changes.insert(&change_key(doc, t), v.as_slice())?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use notesync_protocol::{ClientCodec, Level, ServerFrame};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio_util::codec::Decoder;

    /// A wall clock the test sets by hand.
    pub struct FakeClock(pub AtomicU64);

    impl WallClock for FakeClock {
        fn now_micros(&self) -> Time {
            self.0.load(Ordering::SeqCst)
        }
    }

    pub fn pid(ident: u32, site: u8) -> Pid {
        Pid::from_levels(&[Level::new(ident, site)])
    }

    const DOC: DocId = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10;

    fn open_tmp() -> (tempfile::TempDir, Opened) {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = open(dir.path()).expect("open");
        (dir, opened)
    }

    /// Runs `f` in one committed write transaction.
    fn write<R>(db: &Database, f: impl FnOnce(&mut WriteTables<'_>) -> R) -> R {
        let txn = db.begin_write().expect("begin");
        let r = {
            let mut t = WriteTables::open(&txn).expect("tables");
            f(&mut t)
        };
        txn.commit().expect("commit");
        r
    }

    fn create_doc(db: &Database, clock: &mut ServerClock) {
        write(db, |t| {
            let rec = DocRecord {
                modified: clock.next(),
                name_time: 0,
                next_site: 1,
                deleted: 0,
                swept: 0,
                compacted: 0,
                name: "n".into(),
            };
            t.put_doc(DOC, &rec, None).expect("put");
            t.set_clock(clock.last()).expect("clock");
        });
    }

    /// (inserted data, deleted pids) a pull since `since` sends.
    fn pull(db: &Database, since: Time) -> (Vec<(String, Pid)>, Vec<Pid>) {
        delta(db, since, Rule::Pull)
    }

    fn delta(db: &Database, since: Time, rule: Rule) -> (Vec<(String, Pid)>, Vec<Pid>) {
        let snap = Snapshot::begin(db).expect("snapshot");
        let name = snap
            .doc(DOC)
            .expect("doc")
            .expect("exists")
            .doc_name()
            .expect("name");
        let mut out = DocFrames::new(DOC, name, 1 << 20, 1 << 20);
        snap.delta(DOC, since, rule, None, &mut out).expect("delta");
        let mut ins = Vec::new();
        let mut del = Vec::new();
        for f in out.finish() {
            let mut b = bytes::BytesMut::from(&f[..]);
            match ClientCodec::default().decode(&mut b) {
                Ok(Some(ServerFrame::DocResponse(r))) => {
                    ins.extend(
                        r.inserts
                            .iter()
                            .map(|a| (a.data.to_owned(), a.pid.to_pid())),
                    );
                    del.extend(r.deletes.iter().map(|p| p.to_pid()));
                }
                other => panic!("not a 33: {other:?}"),
            }
        }
        (ins, del)
    }

    #[test]
    fn inserts_are_idempotent_and_conflicts_detected() {
        let (_d, o) = open_tmp();
        let mut clock = ServerClock::new(Arc::new(SystemClock), o.clock);
        create_doc(&o.db, &mut clock);
        let p = pid(1, 1);
        let first = write(&o.db, |t| {
            t.insert_atom(DOC, p.key(), b"a", &mut clock).expect("ins")
        });
        assert!(matches!(first, Inserted::New(_)));
        write(&o.db, |t| {
            assert_eq!(
                t.check_insert(DOC, p.key(), b"a").expect("check"),
                InsertCheck::Ok
            );
            assert_eq!(
                t.insert_atom(DOC, p.key(), b"a", &mut clock).expect("ins"),
                Inserted::Unchanged
            );
            assert_eq!(
                t.check_insert(DOC, p.key(), b"b").expect("check"),
                InsertCheck::Conflict
            );
        });
        // Deletes are idempotent: the first delete time stays.
        let d1 = write(&o.db, |t| {
            t.delete_atom(DOC, p.key(), 2, &mut clock).expect("del")
        });
        let d2 = write(&o.db, |t| {
            t.delete_atom(DOC, p.key(), 2, &mut clock).expect("del")
        });
        let Deleted::New(t1) = d1 else {
            panic!("first delete changed nothing")
        };
        assert_eq!(d2, Deleted::Unchanged);
        let snap = Snapshot::begin(&o.db).expect("snap");
        assert_eq!(snap.atom(DOC, &p).expect("atom").expect("some").delete, t1);
        // A deleted atom still conflicts with other data.
        write(&o.db, |t| {
            assert_eq!(
                t.check_insert(DOC, p.key(), b"b").expect("check"),
                InsertCheck::Conflict
            );
        });
    }

    #[test]
    fn tombstone_before_insert_stays_deleted() {
        let (_d, o) = open_tmp();
        let mut clock = ServerClock::new(Arc::new(SystemClock), o.clock);
        create_doc(&o.db, &mut clock);
        let p = pid(7, 3);
        let before = clock.last();
        let d = write(&o.db, |t| {
            t.delete_atom(DOC, p.key(), 2, &mut clock).expect("del")
        });
        assert!(matches!(d, Deleted::New(_)));
        let i = write(&o.db, |t| {
            t.insert_atom(DOC, p.key(), b"late", &mut clock)
                .expect("ins")
        });
        assert_eq!(
            i,
            Inserted::Deleted {
                deleter: 2,
                stored: true
            }
        );
        // Same data again: nothing stored, still deleted; other data:
        // conflict.
        write(&o.db, |t| {
            assert_eq!(
                t.insert_atom(DOC, p.key(), b"late", &mut clock)
                    .expect("ins"),
                Inserted::Deleted {
                    deleter: 2,
                    stored: false
                }
            );
            assert_eq!(
                t.check_insert(DOC, p.key(), b"other").expect("check"),
                InsertCheck::Conflict
            );
        });
        // Never sent as live; sent as a delete to anyone who synced before
        // the tombstone, from the change index and from the full scan.
        assert_eq!(pull(&o.db, before), (vec![], vec![p.clone()]));
        assert_eq!(pull(&o.db, 0), (vec![], vec![p.clone()]));
        assert_eq!(pull(&o.db, clock.last()), (vec![], vec![]));
    }

    #[test]
    fn pull_delta_classification() {
        let (_d, o) = open_tmp();
        let mut clock = ServerClock::new(Arc::new(SystemClock), o.clock);
        create_doc(&o.db, &mut clock);
        let old_live = pid(1, 1);
        let old_deleted = pid(2, 1);
        write(&o.db, |t| {
            t.insert_atom(DOC, old_live.key(), b"a", &mut clock)
                .expect("ins");
            t.insert_atom(DOC, old_deleted.key(), b"b", &mut clock)
                .expect("ins");
            t.set_clock(clock.last()).expect("clock");
        });
        let t = clock.last();
        let new_live = pid(3, 1);
        let new_deleted = pid(4, 1);
        write(&o.db, |w| {
            w.delete_atom(DOC, old_deleted.key(), 1, &mut clock)
                .expect("del");
            w.insert_atom(DOC, new_live.key(), b"c", &mut clock)
                .expect("ins");
            w.insert_atom(DOC, new_deleted.key(), b"d", &mut clock)
                .expect("ins");
            w.delete_atom(DOC, new_deleted.key(), 1, &mut clock)
                .expect("del");
            w.set_clock(clock.last()).expect("clock");
        });
        // A session's 33 since t also sends the delete of the atom
        // inserted and deleted after t (the client may have had it live).
        assert_eq!(
            delta(&o.db, t, Rule::Session),
            (
                vec![("c".into(), new_live.clone())],
                vec![old_deleted.clone(), new_deleted.clone()]
            )
        );
        // Since t: the new live atom; the delete of the old atom; the atom
        // inserted and deleted after t is sent as neither.
        assert_eq!(
            pull(&o.db, t),
            (vec![("c".into(), new_live.clone())], vec![old_deleted])
        );
        // Since 0: the live atoms only, in position order.
        assert_eq!(
            pull(&o.db, 0),
            (vec![("a".into(), old_live), ("c".into(), new_live)], vec![])
        );
        assert_eq!(pull(&o.db, clock.last()), (vec![], vec![]));
    }

    #[test]
    fn large_delta_is_split_over_frames() {
        let (_d, o) = open_tmp();
        let mut clock = ServerClock::new(Arc::new(SystemClock), o.clock);
        create_doc(&o.db, &mut clock);
        write(&o.db, |t| {
            for i in 0..1000 {
                t.insert_atom(DOC, pid(i, 1).key(), b"xyz", &mut clock)
                    .expect("ins");
            }
        });
        let snap = Snapshot::begin(&o.db).expect("snap");
        let mut out = DocFrames::new(DOC, DocName::default(), 1000, 1 << 20);
        snap.delta(DOC, 0, Rule::Pull, None, &mut out)
            .expect("delta");
        let frames = out.finish();
        assert!(frames.len() > 5, "{} frames", frames.len());
        assert!(frames.iter().all(|f| f.len() < 1200));
    }

    #[test]
    fn clock_is_monotonic_with_a_wall_clock_going_back_and_across_reopen() {
        let wall = Arc::new(FakeClock(AtomicU64::new(1_000_000)));
        let mut clock = ServerClock::new(wall.clone(), 0);
        let a = clock.next();
        assert_eq!(a, 1_000_000);
        // Same wall time: still unique.
        let b = clock.next();
        assert_eq!(b, 1_000_001);
        // Wall clock jumps back an hour: times keep increasing.
        wall.0.store(1, Ordering::SeqCst);
        let c = clock.next();
        assert_eq!(c, 1_000_002);
        // Wall clock ahead again: it is used.
        wall.0.store(5_000_000, Ordering::SeqCst);
        assert_eq!(clock.next(), 5_000_000);

        // Across a reopen: the persisted last value wins over a clock that
        // went back.
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let o = open(dir.path()).expect("open");
            write(&o.db, |t| t.set_clock(clock.last()).expect("clock"));
        }
        wall.0.store(10, Ordering::SeqCst);
        let o = open(dir.path()).expect("reopen");
        assert_eq!(o.clock, 5_000_000);
        let mut clock = ServerClock::new(wall, o.clock);
        assert_eq!(clock.next(), 5_000_001);
    }

    #[test]
    fn reopen_counts_boots_and_rejects_unknown_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(open(dir.path()).expect("open").boot, 1);
        let o = open(dir.path()).expect("open");
        assert_eq!(o.boot, 2);
        write(&o.db, |t| {
            t.meta.insert(META_SCHEMA, 99).map(|_| ()).expect("meta")
        });
        drop(o);
        match open(dir.path()) {
            Err(e @ OpenError::UnknownSchema { found: 99, .. }) => {
                assert!(e.to_string().contains("schema version 99"), "{e}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened a database with an unknown schema"),
        }
    }

    #[test]
    fn a_second_open_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = open(dir.path()).expect("open");
        match open(dir.path()) {
            Err(e @ OpenError::AlreadyOpen { .. }) => {
                assert!(e.to_string().contains("already open"), "{e}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened the same database twice"),
        }
    }

    #[test]
    fn schema_1_is_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let o = open(dir.path()).expect("open");
            // A schema 1 database: its documents records have no deletion
            // time (modified, name_time, next_site, name).
            write(&o.db, |t| {
                t.meta.insert(META_SCHEMA, 1).expect("meta");
                let mut v1 = Vec::new();
                v1.extend_from_slice(&7u64.to_be_bytes());
                v1.extend_from_slice(&5u64.to_be_bytes());
                v1.extend_from_slice(&3u16.to_be_bytes());
                v1.extend_from_slice("old é".as_bytes());
                t.docs.insert(DOC, v1.as_slice()).expect("doc");
            });
        }
        let o = open(dir.path()).expect("a schema 1 database opens");
        let snap = Snapshot::begin(&o.db).expect("snap");
        assert_eq!(
            snap.doc(DOC).expect("doc"),
            Some(DocRecord {
                modified: 7,
                name_time: 5,
                next_site: 3,
                deleted: 0,
                swept: 0,
                compacted: 0,
                name: "old é".into(),
            })
        );
        let version = snap
            .txn
            .open_table(META)
            .expect("meta")
            .get(META_SCHEMA)
            .expect("get")
            .map(|v| v.value());
        assert_eq!(version, Some(SCHEMA_VERSION));
    }

    #[test]
    fn dropping_a_deleted_documents_content_leaves_other_documents() {
        let (_d, o) = open_tmp();
        let mut clock = ServerClock::new(Arc::new(SystemClock), o.clock);
        create_doc(&o.db, &mut clock);
        const OTHER: DocId = DOC + 1;
        const BEFORE: DocId = DOC - 1;
        write(&o.db, |t| {
            for d in [BEFORE, DOC, OTHER] {
                t.insert_atom(d, pid(1, 1).key(), b"a", &mut clock)
                    .expect("ins");
                t.delete_atom(d, pid(2, 1).key(), 1, &mut clock)
                    .expect("del");
                t.put_site(d, 9, 1).expect("site");
            }
            t.set_clock(clock.last()).expect("clock");
        });
        write(&o.db, |t| t.drop_content(DOC).expect("drop"));
        let snap = Snapshot::begin(&o.db).expect("snap");
        assert_eq!(snap.atom(DOC, &pid(1, 1)).expect("atom"), None);
        assert_eq!(snap.atom(DOC, &pid(2, 1)).expect("atom"), None);
        assert_eq!(snap.site(DOC, 9).expect("site"), None);
        assert_eq!(pull(&o.db, 1), (vec![], vec![]));
        for d in [BEFORE, OTHER] {
            assert!(snap.atom(d, &pid(1, 1)).expect("atom").is_some());
            assert_eq!(snap.site(d, 9).expect("site"), Some(1));
            let changes = snap.txn.open_table(CHANGES).expect("changes");
            let n = changes
                .range::<&[u8; 24]>(&change_key(d, 0)..=&change_key(d, Time::MAX))
                .expect("range")
                .count();
            assert_eq!(n, 2, "document {d:x} keeps its change index");
        }
        // The record stays (the writer keeps it, with its deletion time).
        assert!(snap.doc(DOC).expect("doc").is_some());
    }

    #[test]
    fn compaction_drops_old_deleted_atoms_and_keeps_what_the_full_state_needs() {
        let (_d, o) = open_tmp();
        let wall = Arc::new(FakeClock(AtomicU64::new(1_000)));
        let mut clock = ServerClock::new(wall.clone(), o.clock);
        create_doc(&o.db, &mut clock);
        let live = pid(1, 1);
        let old_deleted = pid(2, 1);
        let char_of_live = Pid::from_levels(&[Level::new(1, 1), Level::new(0, 1)]);
        let bare = pid(9, 2);
        let recent = pid(3, 1);
        write(&o.db, |t| {
            for (p, d) in [(&live, "ab"), (&old_deleted, "x"), (&recent, "y")] {
                t.insert_atom(DOC, p.key(), d.as_bytes(), &mut clock)
                    .expect("ins");
            }
            for p in [&old_deleted, &char_of_live, &bare] {
                t.delete_atom(DOC, p.key(), 1, &mut clock).expect("del");
            }
            t.set_clock(clock.last()).expect("clock");
        });
        let before_recent = clock.last();
        wall.0.store(5_000, Ordering::SeqCst);
        write(&o.db, |t| {
            t.delete_atom(DOC, recent.key(), 1, &mut clock)
                .expect("del");
            t.set_clock(clock.last()).expect("clock");
        });
        let delta_before = pull(&o.db, before_recent);
        // Cutoff between the old deletes and the recent one, in small steps.
        let mut from = 0;
        let mut total = Compacted::default();
        loop {
            let step = write(&o.db, |t| {
                t.compact_doc(DOC, from, before_recent, 2).expect("compact")
            });
            total.dropped += step.dropped;
            total.compacted = total.compacted.max(step.compacted);
            from = step.swept;
            if step.done {
                break;
            }
        }
        assert_eq!(from, before_recent);
        // The old deleted atom and the bare tombstone are gone, with their
        // change entries; the deleted char of the live atom stays.
        assert_eq!(total.dropped, 2);
        let snap = Snapshot::begin(&o.db).expect("snap");
        assert_eq!(snap.atom(DOC, &old_deleted).expect("atom"), None);
        assert_eq!(snap.atom(DOC, &bare).expect("atom"), None);
        assert!(snap.atom(DOC, &char_of_live).expect("atom").is_some());
        assert!(snap.atom(DOC, &live).expect("atom").is_some());
        assert!(total.compacted > 0 && total.compacted <= before_recent);
        let changes = snap.txn.open_table(CHANGES).expect("changes");
        let n = changes
            .range::<&[u8; 24]>(&change_key(DOC, 0)..=&change_key(DOC, Time::MAX))
            .expect("range")
            .count();
        // live insert, recent insert and delete, the kept char delete.
        assert_eq!(n, 4);
        // A delta since a time at or after the compaction is unchanged; the
        // full state still has the live text with its deleted char.
        assert_eq!(pull(&o.db, before_recent), delta_before);
        assert_eq!(
            pull(&o.db, 0),
            (
                vec![("ab".into(), live.clone())],
                vec![char_of_live.clone()]
            )
        );
        let rec = DocRecord {
            compacted: total.compacted,
            ..DocRecord::decode_v1(&[0u8; 18]).expect("record")
        };
        assert!(rec.needs_resync(total.compacted - 1));
        assert!(!rec.needs_resync(total.compacted));
        assert!(!rec.needs_resync(0));
    }

    #[test]
    fn doc_times_rebuild_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let o = open(dir.path()).expect("open");
            write(&o.db, |t| {
                for (i, m) in [(3u128, 30u64), (1, 10), (2, 20)] {
                    let rec = DocRecord {
                        modified: m,
                        name_time: 0,
                        next_site: 1,
                        deleted: 0,
                        swept: 0,
                        compacted: 0,
                        name: String::new(),
                    };
                    t.put_doc(i, &rec, None).expect("put");
                }
                // Doc 1 changes again: its old entry goes.
                let rec = DocRecord {
                    modified: 40,
                    name_time: 0,
                    next_site: 1,
                    deleted: 0,
                    swept: 0,
                    compacted: 0,
                    name: String::new(),
                };
                t.put_doc(1, &rec, Some(10)).expect("put");
            });
        }
        let o = open(dir.path()).expect("reopen");
        assert_eq!(o.doc_times, vec![(20, 2), (30, 3), (40, 1)]);
    }
}

// ---------------------------------------------------------------- raw layout, for `ops`

/// The stored layout as it is, for the operations commands (`ops`: backup,
/// check, export), which read every table of a snapshot directly.
pub(crate) mod raw {
    use super::*;

    pub(crate) const META_TABLE: TableDefinition<&str, u64> = META;
    pub(crate) const DOCUMENTS_TABLE: TableDefinition<u128, &[u8]> = DOCUMENTS;
    pub(crate) const DOC_TIMES_TABLE: TableDefinition<&[u8; 24], ()> = DOC_TIMES;
    pub(crate) const SITES_TABLE: TableDefinition<&[u8; 32], u8> = SITES;
    pub(crate) const ATOMS_TABLE: TableDefinition<&[u8], &[u8]> = ATOMS;
    pub(crate) const CHANGES_TABLE: TableDefinition<&[u8; 24], &[u8]> = CHANGES;
    pub(crate) const SCHEMA_KEY: &str = META_SCHEMA;
    pub(crate) const CLOCK_KEY: &str = META_CLOCK;
    pub(crate) const KIND_INSERT: u8 = CHANGE_INSERT;
    pub(crate) const KIND_DELETE: u8 = CHANGE_DELETE;

    pub(crate) fn doc_record(b: &[u8]) -> Result<DocRecord, StoreError> {
        DocRecord::decode(b)
    }

    pub(crate) fn atom_record(b: &[u8]) -> Result<AtomRecord, StoreError> {
        AtomRecord::decode(b)
    }
}
