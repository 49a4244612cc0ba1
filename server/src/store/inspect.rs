//! Whole-database reads for the operations commands (`crate::ops`: check,
//! export, backup): every table row by row, decoded, over a borrowed read
//! transaction, and the copy of a snapshot into a new database file. The
//! layout stays here: `ops` sees records and ids, never keys or encodings.
//! Reads every table; writes only the new file of a copy.

use std::path::Path;

use notesync_protocol::{DocId, Time};
use redb::{
    Database, Durability, Key, MultimapTableHandle, ReadOnlyTable, ReadTransaction, ReadableTable,
    TableDefinition, TableError, TableHandle, Value,
};

use super::error::StoreError;
use super::layout::{
    CHUNK_TIMES, CHUNKS, DOC_TIMES, DOCUMENTS, DocAtoms, DocRecord, META, META_SCHEMA, SITES,
    TableVisitor, chunk_time_key, each_table, split_chunk_time_key, split_doc_key, split_site_key,
    split_time_key,
};
use super::read::{stored_clock, stored_doc};
use super::runs::{Body, Chunk, pid_of};

/// Rows copied per destination commit (the source is one snapshot
/// whatever this is; it only bounds the memory of a write transaction).
const COPY_CHUNK_ROWS: u64 = 100_000;

/// A row's value decoded, or why it does not decode (a check reports that
/// row and goes on; a failed read of the database stops it).
pub type Decoded<T> = Result<T, StoreError>;

/// Rows of one table, in key order.
pub type Rows<T> = Box<dyn Iterator<Item = Result<T, StoreError>>>;

/// One id as stored: what its item and segment say of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdRow {
    /// Key form of the id.
    pub pid_key: Vec<u8>,
    /// Time it became live (0: known only from a delete).
    pub insert: Time,
    /// First delete time (0: live).
    pub delete: Time,
    pub deleter: u8,
    /// Live text (empty once deleted).
    pub text: String,
    /// A multi-char atom (else a run's char).
    pub atom: bool,
}

/// A row of `chunks`, decoded, with what is wrong with its layout.
pub struct ChunkRow {
    pub doc: DocId,
    /// The chunk's `changed`, if it decodes.
    pub changed: Option<Time>,
    /// The latest time it holds.
    pub max_time: Time,
    /// Its ids, in item order (a check or an export is offline: one chunk
    /// holds at most a few thousand ids, or one multi-char atom).
    pub ids: Vec<IdRow>,
    /// What does not hold in it (decoding, order, key, index entry).
    pub problems: Vec<String>,
}

/// Expands a decoded chunk into its ids.
fn expand(chunk: &Chunk) -> Result<Vec<IdRow>, StoreError> {
    let mut ids = Vec::new();
    for it in &chunk.items {
        match &it.body {
            Body::Atom { insert, text } => ids.push(IdRow {
                pid_key: pid_of(&it.group, it.first)?.key().to_vec(),
                insert: *insert,
                delete: 0,
                deleter: 0,
                text: String::from_utf8_lossy(text).into_owned(),
                atom: true,
            }),
            Body::Run(segs) => {
                let mut at = it.first;
                for s in segs {
                    let text = String::from_utf8_lossy(&s.text).into_owned();
                    let mut chars = text.chars();
                    for j in 0..s.len {
                        ids.push(IdRow {
                            pid_key: pid_of(&it.group, at + j)?.key().to_vec(),
                            insert: s.ins_at(j),
                            delete: s.del_at(j),
                            deleter: s.deleter,
                            text: chars.next().map(String::from).unwrap_or_default(),
                            atom: false,
                        });
                    }
                    // Wraps only past the last id (a run may end at ident u32::MAX).
                    at = at.wrapping_add(s.len);
                }
            }
        }
    }
    Ok(ids)
}

/// One read transaction of a namespace database, table by table.
pub struct Inspect<'t> {
    txn: &'t ReadTransaction,
}

impl<'t> Inspect<'t> {
    pub fn new(txn: &'t ReadTransaction) -> Self {
        Inspect { txn }
    }

    /// The names of the (plain) tables the database holds.
    pub fn tables(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .txn
            .list_tables()?
            .map(|t| t.name().to_owned())
            .collect())
    }

    /// The names of the multimap tables it holds (this build makes none).
    pub fn multimap_tables(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .txn
            .list_multimap_tables()?
            .map(|t| t.name().to_owned())
            .collect())
    }

    pub fn schema_version(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .txn
            .open_table(META)?
            .get(META_SCHEMA)?
            .map(|v| v.value()))
    }

    /// The stored clock (0 if none was stored yet).
    pub fn clock(&self) -> Result<Time, StoreError> {
        stored_clock(self.txn)
    }

    pub fn doc(&self, doc: DocId) -> Result<Option<DocRecord>, StoreError> {
        stored_doc(self.txn, doc)
    }

    pub fn documents(&self) -> Result<Rows<(DocId, Decoded<DocRecord>)>, StoreError> {
        let rows = self.txn.open_table(DOCUMENTS)?.range::<u128>(..)?;
        Ok(Box::new(rows.map(|row| {
            let (k, v) = row?;
            Ok((k.value(), DocRecord::decode(v.value())))
        })))
    }

    /// `doc_times` as (modified, document).
    pub fn doc_times(&self) -> Result<Rows<(Time, DocId)>, StoreError> {
        let rows = self.txn.open_table(DOC_TIMES)?.range::<&[u8; 24]>(..)?;
        Ok(Box::new(rows.map(|row| Ok(split_time_key(row?.0.value())))))
    }

    /// `sites` as (document, replica, site).
    pub fn sites(&self) -> Result<Rows<(DocId, u128, u8)>, StoreError> {
        let rows = self.txn.open_table(SITES)?.range::<&[u8; 32]>(..)?;
        Ok(Box::new(rows.map(|row| {
            let (k, v) = row?;
            let (doc, replica) = split_site_key(k.value());
            Ok((doc, replica, v.value()))
        })))
    }

    /// Every chunk, in key order, each checked against its key, the next
    /// chunk's key and its `chunk_times` entry.
    pub fn chunks(&self) -> Result<Rows<ChunkRow>, StoreError> {
        let index = self.txn.open_table(CHUNK_TIMES)?;
        let mut rows = self.txn.open_table(CHUNKS)?.range::<&[u8]>(..)?.peekable();
        Ok(Box::new(std::iter::from_fn(move || {
            let row = rows.next()?;
            Some(chunk_row(row, rows.peek(), &index))
        })))
    }

    /// `chunk_times` as (document, time, whether the chunk it names exists
    /// with that `changed`).
    pub fn chunk_times(&self) -> Result<Rows<(DocId, Time, bool)>, StoreError> {
        let chunks = self.txn.open_table(CHUNKS)?;
        let rows = self.txn.open_table(CHUNK_TIMES)?.range::<&[u8]>(..)?;
        Ok(Box::new(rows.map(move |row| {
            let (k, _) = row?;
            let Some((doc, t, rk)) = split_chunk_time_key(k.value()) else {
                return Ok((0, 0, false));
            };
            let mut key = doc.to_be_bytes().to_vec();
            key.extend_from_slice(rk);
            Ok(match chunks.get(key.as_slice())? {
                Some(v) => (
                    doc,
                    t,
                    Chunk::decode(v.value()).is_ok_and(|c| c.changed == t),
                ),
                None => (doc, t, false),
            })
        })))
    }

    /// One document's ids, in position order.
    pub fn doc_ids(&self, doc: DocId) -> Result<Vec<IdRow>, StoreError> {
        let range = DocAtoms::new(doc);
        let mut ids = Vec::new();
        for row in self
            .txn
            .open_table(CHUNKS)?
            .range::<&[u8]>(range.bounds())?
        {
            let (_, v) = row?;
            ids.extend(expand(&Chunk::decode(v.value())?)?);
        }
        ids.sort_by(|a, b| a.pid_key.cmp(&b.pid_key));
        Ok(ids)
    }

    /// Copies every table of this snapshot (a missing one stays missing)
    /// into a new database at `path`, in chunks of committed rows, and
    /// makes it durable. Returns the rows copied.
    pub fn copy_into(&self, path: &Path) -> Result<u64, StoreError> {
        let db = Database::create(path)?;
        let mut copy = Copy {
            src: self.txn,
            dst: &db,
            rows: 0,
        };
        each_table(&mut copy)?;
        let rows = copy.rows;
        // The chunks were committed without fsync; this commit makes them all
        // durable.
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.commit()?;
        db.close()?;
        Ok(rows)
    }
}

type ChunkEntry = (
    redb::AccessGuard<'static, &'static [u8]>,
    redb::AccessGuard<'static, &'static [u8]>,
);

/// One `chunks` row checked (see [`Inspect::chunks`]).
fn chunk_row(
    row: Result<ChunkEntry, redb::StorageError>,
    next: Option<&Result<ChunkEntry, redb::StorageError>>,
    index: &ReadOnlyTable<&'static [u8], ()>,
) -> Result<ChunkRow, StoreError> {
    let (k, v) = row?;
    let next_key = match next {
        Some(Ok((nk, _))) => Some(nk.value().to_vec()),
        _ => None,
    };
    let key = k.value().to_vec();
    let Some((doc, rk)) = split_doc_key(&key) else {
        return Ok(ChunkRow {
            doc: 0,
            changed: None,
            max_time: 0,
            ids: Vec::new(),
            problems: vec![format!("chunk key {} is too short", hex::encode(&key))],
        });
    };
    let mut row = ChunkRow {
        doc,
        changed: None,
        max_time: 0,
        ids: Vec::new(),
        problems: Vec::new(),
    };
    match Chunk::decode(v.value()) {
        Err(e) => row.problems.push(format!("chunk {}: {e}", hex::encode(rk))),
        Ok(chunk) => {
            row.changed = Some(chunk.changed);
            row.max_time = chunk.items.iter().map(|i| i.max_time()).max().unwrap_or(0);
            if chunk.items.is_empty() {
                row.problems
                    .push(format!("chunk {} is empty", hex::encode(rk)));
            }
            if let Some(first) = chunk.items.first()
                && first.key().as_slice() < rk
            {
                row.problems.push(format!(
                    "chunk {} holds an item before its key",
                    hex::encode(rk)
                ));
            }
            if let (Some(last), Some(nk)) = (chunk.items.last(), &next_key)
                && let Some((ndoc, nrk)) = split_doc_key(nk)
                && ndoc == doc
            {
                let end = u64::from(last.first) + u64::from(last.len()) - 1;
                let last_key = super::runs::run_key(&last.group, end as u32);
                if last_key.as_slice() >= nrk {
                    row.problems.push(format!(
                        "chunk {} holds ids at or after the next chunk's key",
                        hex::encode(rk)
                    ));
                }
            }
            if index
                .get(chunk_time_key(doc, chunk.changed, rk).as_slice())?
                .is_none()
            {
                row.problems.push(format!(
                    "chunk {} (changed {}) has no chunk_times entry",
                    hex::encode(rk),
                    chunk.changed
                ));
            }
            match expand(&chunk) {
                Ok(ids) => row.ids = ids,
                Err(e) => row.problems.push(format!("chunk {}: {e}", hex::encode(rk))),
            }
        }
    }
    Ok(row)
}

/// Copies each table it visits from `src` to `dst`, counting the rows.
struct Copy<'a> {
    src: &'a ReadTransaction,
    dst: &'a Database,
    rows: u64,
}

impl TableVisitor for Copy<'_> {
    type Error = StoreError;

    fn visit<K: Key + 'static, V: Value + 'static>(
        &mut self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<(), StoreError> {
        let from = match self.src.open_table(def) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut rows = from.iter()?;
        loop {
            let mut txn = self.dst.begin_write()?;
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
            self.rows += n;
            if done {
                return Ok(());
            }
        }
    }
}

/// Run by hand on a data folder (`NOTESYNC_LAYOUT_STATS=DIR cargo test -p
/// notesync-server --lib layout_stats -- --ignored --nocapture`): what its
/// chunks hold, to see where the bytes go.
#[cfg(test)]
mod stats {
    use redb::{ReadableDatabase, ReadableTable};

    use super::*;

    #[test]
    #[ignore = "a measurement, run by hand on a data folder"]
    fn layout_stats() {
        let Ok(dir) = std::env::var("NOTESYNC_LAYOUT_STATS") else {
            return;
        };
        let db = Database::open(std::path::Path::new(&dir).join("notesync.redb")).expect("open");
        let txn = db.begin_read().expect("read");
        let chunks = txn.open_table(CHUNKS).expect("chunks");
        let (mut rows, mut bytes, mut keys, mut items, mut segs, mut chars, mut text) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        for row in chunks.iter().expect("iter") {
            let (k, v) = row.expect("row");
            rows += 1;
            bytes += v.value().len() as u64;
            keys += k.value().len() as u64;
            let c = Chunk::decode(v.value()).expect("decode");
            items += c.items.len() as u64;
            for it in &c.items {
                chars += u64::from(it.len());
                match &it.body {
                    Body::Run(s) => {
                        segs += s.len() as u64;
                        text += s.iter().map(|s| s.text.len() as u64).sum::<u64>();
                    }
                    Body::Atom { text: t, .. } => text += t.len() as u64,
                }
            }
        }
        println!(
            "chunks {rows}, value bytes {bytes}, key bytes {keys}, items {items}, segments {segs}, ids {chars}, live text bytes {text}"
        );
    }
}
