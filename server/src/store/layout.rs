//! The stored layout: the table definitions (one list, [`each_table`]),
//! the key forms and the record encodings. ARCHITECTURE.md, "Storage
//! (server)", is the layout's documentation; the test at the end of this
//! file keeps it true. Touches no database: the rest of the store opens
//! tables with these definitions and encodes rows with these functions.

use std::ops::Bound;

use notesync_protocol::{DocId, DocName, Time};
use redb::{Key, TableDefinition, TableHandle, Value};

use super::error::{StoreError, corrupt};

/// The layout version this build reads and writes. Versions 1 (no deletion
/// time in `documents`), 2 (no compaction times) and 3 (a row per atom in
/// `atoms`, a row per change in `changes`) are migrated at start.
pub const SCHEMA_VERSION: u64 = 4;

/// Sites a document can hand out: 1 to 255 (0 is reserved).
pub const MAX_SITE: u16 = 255;

pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(super) const DOCUMENTS: TableDefinition<u128, &[u8]> = TableDefinition::new("documents");
pub(super) const DOC_TIMES: TableDefinition<&[u8; 24], ()> = TableDefinition::new("doc_times");
pub(super) const SITES: TableDefinition<&[u8; 32], u8> = TableDefinition::new("sites");
pub(super) const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
pub(super) const CHUNK_TIMES: TableDefinition<&[u8], ()> = TableDefinition::new("chunk_times");
/// Schema 3's tables: read (and emptied) only by the migration to 4.
pub(super) const ATOMS_V3: TableDefinition<&[u8], &[u8]> = TableDefinition::new("atoms");
pub(super) const CHANGES_V3: TableDefinition<&[u8; 24], &[u8]> = TableDefinition::new("changes");

pub(super) const META_SCHEMA: &str = "schema_version";
pub(super) const META_CLOCK: &str = "clock";
pub(super) const META_BOOT: &str = "boot";
/// Present (1) while a migration from schema 3 is under way.
pub(super) const META_MIGRATING: &str = "migrating_from_3";

// ---------------------------------------------------------------- tables

/// Something done to every table in turn (see [`each_table`]).
pub(super) trait TableVisitor {
    type Error;
    fn visit<K: Key + 'static, V: Value + 'static>(
        &mut self,
        table: TableDefinition<'static, K, V>,
    ) -> Result<(), Self::Error>;
}

/// Visits every table of a namespace database, in this order: the one list
/// of the tables (schema creation, backup, check and the documentation
/// test all go through it).
pub(super) fn each_table<T: TableVisitor>(v: &mut T) -> Result<(), T::Error> {
    v.visit(META)?;
    v.visit(DOCUMENTS)?;
    v.visit(DOC_TIMES)?;
    v.visit(SITES)?;
    v.visit(CHUNKS)?;
    v.visit(CHUNK_TIMES)
}

/// The names of the tables a namespace database has, in [`each_table`]
/// order.
pub fn table_names() -> Vec<String> {
    struct Names(Vec<String>);
    impl TableVisitor for Names {
        type Error = std::convert::Infallible;
        fn visit<K: Key + 'static, V: Value + 'static>(
            &mut self,
            table: TableDefinition<'static, K, V>,
        ) -> Result<(), Self::Error> {
            self.0.push(table.name().to_owned());
            Ok(())
        }
    }
    let mut names = Names(Vec::new());
    match each_table(&mut names) {
        Ok(()) => names.0,
        Err(never) => match never {},
    }
}

// ---------------------------------------------------------------- keys

pub(super) fn atom_key(doc: DocId, pid_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + pid_key.len());
    k.extend_from_slice(&doc.to_be_bytes());
    k.extend_from_slice(pid_key);
    k
}

/// A `chunks` key: the document, then the run key of the first item the
/// chunk holds (empty for a document's first chunk, so that every id of
/// the document has a chunk at or before it).
pub(super) fn chunk_key(doc: DocId, run_key: &[u8]) -> Vec<u8> {
    atom_key(doc, run_key)
}

/// A key split into its document and the rest; `None` if shorter than a
/// document id.
pub(super) fn split_doc_key(k: &[u8]) -> Option<(DocId, &[u8])> {
    (k.len() >= 16).then(|| (be_u128(&k[..16]), &k[16..]))
}

/// A `chunk_times` key: document, the chunk's last change time, the
/// chunk key's run key part.
pub(super) fn chunk_time_key(doc: DocId, time: Time, run_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(24 + run_key.len());
    k.extend_from_slice(&doc.to_be_bytes());
    k.extend_from_slice(&time.to_be_bytes());
    k.extend_from_slice(run_key);
    k
}

/// A `chunk_times` key's (document, time, run key part).
pub(super) fn split_chunk_time_key(k: &[u8]) -> Option<(DocId, Time, &[u8])> {
    (k.len() >= 24).then(|| (be_u128(&k[..16]), be_u64(&k[16..24]), &k[24..]))
}

/// The keys of one document in a table keyed by document first (`chunks`,
/// `chunk_times`, schema 3's `atoms`): from its id up to the next id (to
/// the end for the last id).
pub(super) struct DocAtoms {
    lo: [u8; 16],
    hi: Option<[u8; 16]>,
}

impl DocAtoms {
    pub(super) fn new(doc: DocId) -> Self {
        DocAtoms {
            lo: doc.to_be_bytes(),
            hi: doc.checked_add(1).map(|d| d.to_be_bytes()),
        }
    }

    pub(super) fn bounds(&self) -> (Bound<&[u8]>, Bound<&[u8]>) {
        let hi = match &self.hi {
            Some(hi) => Bound::Excluded(hi.as_slice()),
            None => Bound::Unbounded,
        };
        (Bound::Included(self.lo.as_slice()), hi)
    }

    /// From `from` (a full key of this document) to the document's end.
    pub(super) fn from<'a>(&'a self, from: &'a [u8]) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
        (Bound::Included(from), self.bounds().1)
    }
}

/// A fixed-width key: `a` then `b` (big-endian integers, so byte order is
/// numeric order).
fn join<const N: usize>(a: &[u8], b: &[u8]) -> [u8; N] {
    let mut k = [0u8; N];
    k[..a.len()].copy_from_slice(a);
    k[a.len()..].copy_from_slice(b);
    k
}

/// A schema 3 `changes` key.
#[cfg(test)]
pub(super) fn change_key(doc: DocId, time: Time) -> [u8; 24] {
    join(&doc.to_be_bytes(), &time.to_be_bytes())
}

pub(super) fn time_key(time: Time, doc: DocId) -> [u8; 24] {
    join(&time.to_be_bytes(), &doc.to_be_bytes())
}

/// A `doc_times` key's (modified, document).
pub(super) fn split_time_key(k: &[u8; 24]) -> (Time, DocId) {
    (be_u64(&k[..8]), be_u128(&k[8..]))
}

pub(super) fn site_key(doc: DocId, replica: u128) -> [u8; 32] {
    join(&doc.to_be_bytes(), &replica.to_be_bytes())
}

/// A `sites` key's (document, replica).
pub(super) fn split_site_key(k: &[u8; 32]) -> (DocId, u128) {
    (be_u128(&k[..16]), be_u128(&k[16..]))
}

pub(super) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

pub(super) fn be_u128(b: &[u8]) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    u128::from_be_bytes(a)
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
    /// The stored fields in order, each as (its name in ARCHITECTURE.md's
    /// storage table, its bytes): the one definition of the encoding.
    /// (A field left out here fails `records_round_trip`; one named
    /// differently from the table fails the documentation test.)
    fn fields(&self, mut f: impl FnMut(&'static str, &[u8])) {
        f("modified", &self.modified.to_be_bytes());
        f("name_time", &self.name_time.to_be_bytes());
        f("next_site", &self.next_site.to_be_bytes());
        f("deleted", &self.deleted.to_be_bytes());
        f("swept", &self.swept.to_be_bytes());
        f("compacted", &self.compacted.to_be_bytes());
        f("name", self.name.as_bytes());
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(DOC_HEAD + self.name.len());
        self.fields(|_, b| v.extend_from_slice(b));
        v
    }

    pub(super) fn decode(b: &[u8]) -> Result<Self, StoreError> {
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
    pub(super) fn decode_v2(b: &[u8]) -> Result<Self, StoreError> {
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
    pub(super) fn decode_v1(b: &[u8]) -> Result<Self, StoreError> {
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

/// An atom's row in schema 3's `atoms` (read by the migration), and what
/// one id holds as tests and the storage-fault tests look at it.
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
    /// The stored fields in order (schema 3).
    #[cfg(test)]
    fn fields(&self, mut f: impl FnMut(&'static str, &[u8])) {
        f("insert", &self.insert.to_be_bytes());
        f("delete", &self.delete.to_be_bytes());
        f("deleter", &[self.deleter]);
        f("data", &self.data);
    }

    #[cfg(test)]
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(17 + self.data.len());
        self.fields(|_, b| v.extend_from_slice(b));
        v
    }

    pub(super) fn decode(b: &[u8]) -> Result<Self, StoreError> {
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
}

#[cfg(test)]
/// The stored fields of a `chunks` value, as (name in ARCHITECTURE.md,
/// bytes): the chunk's last change time, then its items (`runs`).
fn chunk_fields(encoded: &[u8], mut f: impl FnMut(&'static str, &[u8])) {
    f("changed", &encoded[..8]);
    f("items", &encoded[8..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::runs::{Chunk, Seg};

    /// ARCHITECTURE.md's storage table, as (table, key, value) cells.
    fn documented_tables() -> Vec<(String, String, String)> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../ARCHITECTURE.md");
        let text = std::fs::read_to_string(path).expect("read ARCHITECTURE.md");
        let section = text
            .split("\n## Storage (server)\n")
            .nth(1)
            .expect("ARCHITECTURE.md has a \"## Storage (server)\" section");
        let section = section.split("\n## ").next().unwrap_or(section);
        section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
                assert_eq!(cells.len(), 3, "a storage table row has 3 cells: {l}");
                (
                    cells[0].trim_matches('`').to_owned(),
                    cells[1].to_owned(),
                    cells[2].trim_matches('`').to_owned(),
                )
            })
            .collect()
    }

    fn value_of(table: &str) -> String {
        documented_tables()
            .into_iter()
            .find(|(t, _, _)| t == table)
            .map(|(_, _, v)| v)
            .unwrap_or_else(|| panic!("ARCHITECTURE.md documents no table {table}"))
    }

    /// Checks a documented value column ("name type, name type, ...")
    /// against a record's fields: the same names in the same order, each
    /// `u64`/`u16`/`u8` field of that width, `bytes` for the rest.
    fn check_fields(table: &str, fields: impl FnOnce(&mut dyn FnMut(&'static str, &[u8]))) {
        let doc = value_of(table);
        let documented: Vec<(&str, &str)> = doc
            .split(", ")
            .map(|f| {
                let words: Vec<&str> = f.split_whitespace().collect();
                (words[0], words[words.len() - 1])
            })
            .collect();
        let mut encoded = Vec::new();
        fields(&mut |name, bytes| encoded.push((name, bytes.len())));
        let names = |v: Vec<&str>| v.join(", ");
        assert_eq!(
            names(documented.iter().map(|f| f.0).collect()),
            names(encoded.iter().map(|f| f.0).collect()),
            "ARCHITECTURE.md's {table} value fields are not those the code stores"
        );
        for ((name, ty), (_, len)) in documented.iter().zip(&encoded) {
            let width = match *ty {
                "u64" => Some(8),
                "u16" => Some(2),
                "u8" => Some(1),
                "bytes" => None,
                other => panic!("{table}.{name}: unknown type {other} in ARCHITECTURE.md"),
            };
            if let Some(w) = width {
                assert_eq!(w, *len, "{table}.{name} is documented as {ty}");
            }
        }
    }

    /// Records with every field set, each to another value.
    fn sample_doc() -> DocRecord {
        DocRecord {
            modified: 1,
            name_time: 2,
            next_site: 3,
            deleted: 4,
            swept: 5,
            compacted: 6,
            name: "é".into(),
        }
    }

    fn sample_atom() -> AtomRecord {
        AtomRecord {
            insert: 1,
            delete: 2,
            deleter: 3,
            data: b"data".to_vec(),
        }
    }

    fn sample_chunk() -> Chunk {
        let mut c = Chunk::default();
        let seg = Seg {
            len: 1,
            ins: 5,
            ins_step: 0,
            del: 0,
            del_step: 0,
            deleter: 0,
            text: b"a".to_vec(),
        };
        c.put_char(&[1, 1], 3, seg);
        c.put_atom(&[1, 1], 9, 6, "ab".as_bytes());
        c
    }

    #[test]
    fn the_documented_tables_are_the_tables_the_code_defines() {
        let documented: Vec<String> = documented_tables().into_iter().map(|r| r.0).collect();
        assert_eq!(documented, table_names());
    }

    #[test]
    fn the_documented_records_are_the_records_the_code_stores() {
        let doc = sample_doc();
        check_fields("documents", |f| doc.fields(f));
        let chunk = sample_chunk().encode();
        check_fields("chunks", |f| chunk_fields(&chunk, f));
        // The meta keys.
        let (_, meta_key, _) = documented_tables()
            .into_iter()
            .find(|(t, _, _)| t == "meta")
            .expect("meta is documented");
        for key in [META_SCHEMA, META_CLOCK, META_BOOT, META_MIGRATING] {
            assert!(
                meta_key.contains(&format!("`{key}`")),
                "meta key {key} not in {meta_key:?}"
            );
        }
    }

    #[test]
    fn records_round_trip() {
        let doc = sample_doc();
        assert_eq!(DocRecord::decode(&doc.encode()).expect("decode"), doc);
        let atom = sample_atom();
        assert_eq!(AtomRecord::decode(&atom.encode()).expect("decode"), atom);
        let chunk = sample_chunk();
        assert_eq!(Chunk::decode(&chunk.encode()).expect("decode"), chunk);
        let k = chunk_time_key(7, 9, b"run");
        assert_eq!(split_chunk_time_key(&k), Some((7, 9, &b"run"[..])));
    }
}
