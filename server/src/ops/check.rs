//! `check`: reads one namespace's snapshot through
//! [`Inspect`] and lists what is inconsistent (a check finding problems
//! is a report, not an error). Reads every table; writes nothing.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use notesync_protocol::{DocId, Pid, Time};
use redb::ReadTransaction;

use super::{OfflineFolder, OpsError};
use crate::store::{DocRecord, Inspect, MAX_SITE, SCHEMA_VERSION, table_names};

/// Problems a check lists in full; past this it only counts them.
const MAX_LISTED_PROBLEMS: usize = 200;

/// What a check of one namespace found.
#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    pub namespace: String,
    pub documents: u64,
    /// Ids stored (run chars, multi-char atoms, tombstones).
    pub atoms: u64,
    /// Chunks (rows of `chunks`).
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
            "namespace {}: {} documents, {} ids in {} chunks, {} sites: {}",
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

/// Checks one namespace's snapshot: the schema version, that every chunk
/// and site belongs to a live document, that `doc_times` mirrors the
/// documents' `modified`, that each chunk decodes, holds only ids between
/// its key and the next chunk's, has its `chunk_times` entry at its
/// `changed` (at least every time it holds) and `chunk_times` nothing
/// else, that no time is past the stored clock, and that sites are in
/// range and unique per document.
pub fn check_namespace(namespace: &str, txn: &ReadTransaction) -> Result<CheckReport, OpsError> {
    let mut r = CheckReport {
        namespace: namespace.to_owned(),
        ..CheckReport::default()
    };
    let db = Inspect::new(txn);
    let known = table_names();
    let present = db.tables()?;
    for t in &present {
        if !known.contains(t) {
            r.problem(format!("unknown table {t:?}"));
        }
    }
    for t in &known {
        if !present.contains(t) {
            r.problem(format!("table {t} is missing"));
        }
    }
    if !r.ok() {
        return Ok(r);
    }
    let version = db.schema_version()?;
    if version != Some(SCHEMA_VERSION) {
        r.problem(match version {
            Some(v @ (1..=3)) => format!(
                "schema version {v}: start the server once to migrate it to version {SCHEMA_VERSION}"
            ),
            Some(v) => format!("schema version {v}; this build reads version {SCHEMA_VERSION}"),
            None => "no schema version in meta".into(),
        });
        return Ok(r);
    }
    let mut c = Checking {
        clock: db.clock()?,
        db,
        r,
        docs: HashMap::new(),
    };
    c.documents()?;
    c.doc_times()?;
    c.sites()?;
    c.chunks()?;
    c.chunk_times()?;
    Ok(c.r)
}

/// A check under way: the report so far, and what the later tables are
/// checked against.
struct Checking<'t> {
    r: CheckReport,
    db: Inspect<'t>,
    /// The stored clock: no time may be after it.
    clock: Time,
    /// The documents that decode.
    docs: HashMap<DocId, DocRecord>,
}

impl Checking<'_> {
    /// The documents, each checked on its own.
    fn documents(&mut self) -> Result<(), OpsError> {
        let clock = self.clock;
        for row in self.db.documents()? {
            let (doc, rec) = row?;
            match rec {
                Ok(rec) => {
                    if rec.modified > clock {
                        self.r.problem(format!(
                            "document {doc:032x}: modified {} is after the clock {clock}",
                            rec.modified
                        ));
                    }
                    if rec.next_site == 0 || rec.next_site > MAX_SITE + 1 {
                        self.r.problem(format!(
                            "document {doc:032x}: next site {} is out of range",
                            rec.next_site
                        ));
                    }
                    self.docs.insert(doc, rec);
                }
                Err(e) => self.r.problem(format!("document {doc:032x}: {e}")),
            }
        }
        self.r.documents = self.docs.len() as u64;
        Ok(())
    }

    /// `doc_times` mirrors (modified, doc), one entry per document.
    fn doc_times(&mut self) -> Result<(), OpsError> {
        let mut timed: HashSet<DocId> = HashSet::new();
        for row in self.db.doc_times()? {
            let (t, doc) = row?;
            match self.docs.get(&doc) {
                None => self.r.problem(format!(
                    "doc_times has document {doc:032x} (time {t}), which is not in documents"
                )),
                Some(rec) if rec.modified != t => self.r.problem(format!(
                    "doc_times has document {doc:032x} at time {t}, but its modified time is {}",
                    rec.modified
                )),
                Some(_) => {
                    timed.insert(doc);
                }
            }
        }
        for (doc, rec) in &self.docs {
            if !timed.contains(doc) {
                self.r.problem(format!(
                    "document {doc:032x} (modified {}) has no doc_times entry",
                    rec.modified
                ));
            }
        }
        Ok(())
    }

    fn sites(&mut self) -> Result<(), OpsError> {
        let mut taken: HashMap<(DocId, u8), u128> = HashMap::new();
        for row in self.db.sites()? {
            let (doc, replica, site) = row?;
            self.r.sites += 1;
            let Some(rec) = self.docs.get(&doc) else {
                self.r.problem(format!(
                    "site {site} of replica {replica:032x} belongs to document {doc:032x}, which is not in documents"
                ));
                continue;
            };
            if rec.deleted != 0 {
                self.r.problem(format!(
                    "deleted document {doc:032x} still has a site ({site}, replica {replica:032x})"
                ));
            }
            if site == 0 || u16::from(site) >= rec.next_site {
                self.r.problem(format!(
                    "document {doc:032x}: replica {replica:032x} has site {site}, outside 1..{} (next site)",
                    rec.next_site
                ));
            }
            if let Some(other) = taken.insert((doc, site), replica) {
                self.r.problem(format!(
                    "document {doc:032x}: site {site} is held by replicas {other:032x} and {replica:032x}"
                ));
            }
        }
        Ok(())
    }

    /// The chunks, against documents, the clock and `chunk_times`.
    fn chunks(&mut self) -> Result<(), OpsError> {
        let clock = self.clock;
        for row in self.db.chunks()? {
            let row = row?;
            self.r.changes += 1;
            self.r.atoms += row.ids.len() as u64;
            let doc = row.doc;
            for p in row.problems {
                self.r.problem(format!("document {doc:032x}: {p}"));
            }
            match self.docs.get(&doc) {
                None => self.r.problem(format!(
                    "a chunk belongs to document {doc:032x}, which is not in documents"
                )),
                Some(rec) if rec.deleted != 0 => self
                    .r
                    .problem(format!("deleted document {doc:032x} still has content")),
                Some(_) => {}
            }
            let Some(changed) = row.changed else { continue };
            if changed > clock {
                self.r.problem(format!(
                    "document {doc:032x}: a chunk changed at {changed}, after the clock {clock}"
                ));
            }
            if row.max_time > changed {
                self.r.problem(format!(
                    "document {doc:032x}: a chunk holds time {} after its changed time {changed}",
                    row.max_time
                ));
            }
            for id in &row.ids {
                let hex_id = || hex::encode(&id.pid_key);
                if Pid::from_key(&id.pid_key).is_none() {
                    self.r.problem(format!(
                        "document {doc:032x}: id {} is not a position id",
                        hex_id()
                    ));
                }
                if id.insert != 0 && id.delete == 0 && id.text.is_empty() {
                    self.r.problem(format!(
                        "document {doc:032x}: id {} is live but has no text",
                        hex_id()
                    ));
                }
            }
        }
        Ok(())
    }

    /// `chunk_times`: each entry names a chunk changed at its time.
    fn chunk_times(&mut self) -> Result<(), OpsError> {
        for row in self.db.chunk_times()? {
            let (doc, t, ok) = row?;
            if !ok {
                self.r.problem(format!(
                    "document {doc:032x}: chunk_times has an entry at {t} for no chunk changed then"
                ));
            }
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use crate::ops::tests::{DOC, check, healthy};
    use crate::store::WriteTables;

    #[test]
    fn check_reports_each_kind_of_damage() {
        let (_dir, db) = healthy();
        let txn = db.begin_write().expect("write");
        {
            let mut t = WriteTables::open(&txn).expect("tables");
            // A chunk of a document that does not exist (and so with no
            // chunk_times entry either): one char 'x' at [(1, 1)], live
            // since time 5.
            let mut chunk = 5u64.to_be_bytes().to_vec();
            chunk.extend_from_slice(&[0, 1, 1, 1, 1, 1, 1, 10, 1, b'x']);
            t.put_raw_chunk(DOC + 5, &[], &chunk).expect("insert");
            // The document's doc_times entry goes.
            t.remove_first_doc_time().expect("remove");
            // The chunk index entry of the document goes.
            t.remove_first_chunk_time().expect("remove");
            // A second replica with the same site.
            t.put_site(DOC, 8, 1).expect("insert");
        }
        txn.commit().expect("commit");
        let r = check(&db);
        let text = r.to_string();
        assert_eq!(r.problem_count, 5, "{text}");
        for want in [
            "which is not in documents",
            "has no doc_times entry",
            "has no chunk_times entry",
            "site 1 is held by replicas",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }

        // A wrong schema version stops the check there.
        let txn = db.begin_write().expect("write");
        WriteTables::open(&txn)
            .expect("tables")
            .set_schema_version(99)
            .expect("insert");
        txn.commit().expect("commit");
        let r = check(&db);
        assert!(r.to_string().contains("schema version 99"), "{r}");
    }
}
