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
    ATOMS, AtomRecord, CHANGES, ChangeEntry, DOC_TIMES, DOCUMENTS, DocAtoms, DocRecord, META,
    META_SCHEMA, SITES, TableVisitor, atom_key, change_key, each_table, split_atom_key,
    split_change_key, split_site_key, split_time_key,
};
use super::read::{stored_clock, stored_doc};

/// Rows copied per destination commit (the source is one snapshot
/// whatever this is; it only bounds the memory of a write transaction).
const COPY_CHUNK_ROWS: u64 = 100_000;

/// A row's value decoded, or why it does not decode (a check reports that
/// row and goes on; a failed read of the database stops it).
pub type Decoded<T> = Result<T, StoreError>;

/// Rows of one table, in key order.
pub type Rows<T> = Box<dyn Iterator<Item = Result<T, StoreError>>>;

/// A row of `atoms`.
pub struct AtomRow {
    key: Vec<u8>,
    pub record: Decoded<AtomRecord>,
}

impl AtomRow {
    /// The key as stored (for a report on a key that does not split).
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The atom's document and pid key form; `None` if the key is too
    /// short to hold both.
    pub fn id(&self) -> Option<(DocId, &[u8])> {
        split_atom_key(&self.key)
    }
}

/// A row of `changes`.
pub struct ChangeRow {
    pub doc: DocId,
    pub time: Time,
    value: Vec<u8>,
}

impl ChangeRow {
    /// `None` if the stored value is empty.
    pub fn entry(&self) -> Option<ChangeEntry<'_>> {
        ChangeEntry::decode(&self.value)
    }
}

/// Point lookups in `atoms`.
pub struct AtomLookup(ReadOnlyTable<&'static [u8], &'static [u8]>);

impl AtomLookup {
    pub fn get(
        &self,
        doc: DocId,
        pid_key: &[u8],
    ) -> Result<Option<Decoded<AtomRecord>>, StoreError> {
        Ok(self
            .0
            .get(atom_key(doc, pid_key).as_slice())?
            .map(|v| AtomRecord::decode(v.value())))
    }
}

/// Point lookups in `changes`.
pub struct ChangeLookup(ReadOnlyTable<&'static [u8; 24], &'static [u8]>);

impl ChangeLookup {
    /// Whether the change at `(doc, time)` is `want`; `None` if there is
    /// no change at that time.
    pub fn is(
        &self,
        doc: DocId,
        time: Time,
        want: ChangeEntry<'_>,
    ) -> Result<Option<bool>, StoreError> {
        Ok(self
            .0
            .get(&change_key(doc, time))?
            .map(|v| ChangeEntry::decode(v.value()) == Some(want)))
    }
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

    pub fn atoms(&self) -> Result<Rows<AtomRow>, StoreError> {
        let rows = self.txn.open_table(ATOMS)?.range::<&[u8]>(..)?;
        Ok(Box::new(rows.map(|row| {
            let (k, v) = row?;
            Ok(AtomRow {
                key: k.value().to_vec(),
                record: AtomRecord::decode(v.value()),
            })
        })))
    }

    /// One document's atoms, in position order, as (pid key form, record).
    pub fn doc_atoms(&self, doc: DocId) -> Result<Rows<(Vec<u8>, AtomRecord)>, StoreError> {
        let range = DocAtoms::new(doc);
        let rows = self.txn.open_table(ATOMS)?.range::<&[u8]>(range.bounds())?;
        Ok(Box::new(rows.map(|row| {
            let (k, v) = row?;
            Ok((k.value()[16..].to_vec(), AtomRecord::decode(v.value())?))
        })))
    }

    pub fn changes(&self) -> Result<Rows<ChangeRow>, StoreError> {
        let rows = self.txn.open_table(CHANGES)?.range::<&[u8; 24]>(..)?;
        Ok(Box::new(rows.map(|row| {
            let (k, v) = row?;
            let (doc, time) = split_change_key(k.value());
            Ok(ChangeRow {
                doc,
                time,
                value: v.value().to_vec(),
            })
        })))
    }

    pub fn atom_lookup(&self) -> Result<AtomLookup, StoreError> {
        Ok(AtomLookup(self.txn.open_table(ATOMS)?))
    }

    pub fn change_lookup(&self) -> Result<ChangeLookup, StoreError> {
        Ok(ChangeLookup(self.txn.open_table(CHANGES)?))
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
