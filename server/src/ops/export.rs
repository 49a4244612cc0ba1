//! `export`: one document's text, rendered from its stored atoms as
//! PROTOCOL.md 1.2 says. Reads `documents` and the document's `chunks`
//! through [`Inspect`]; writes nothing.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use notesync_protocol::{DocId, Level, Pid};
use redb::ReadTransaction;

use super::{OfflineFolder, OpsError, existing_namespace};
use crate::store::{Inspect, StoreError};

/// A document's text as PROTOCOL.md 1.2 renders it: its live atoms in
/// position order, each atom of two or more chars as its chars at their
/// virtual ids, less the virtual ids that were deleted.
pub fn export_document(
    namespace: &str,
    txn: &ReadTransaction,
    doc: DocId,
) -> Result<String, OpsError> {
    let db = Inspect::new(txn);
    let rec = db.doc(doc)?.ok_or_else(|| OpsError::NoDocument {
        namespace: namespace.to_owned(),
        doc,
    })?;
    if rec.deleted != 0 {
        return Err(OpsError::Deleted {
            namespace: namespace.to_owned(),
            doc,
            at: rec.deleted,
        });
    }
    let corrupt = |what| StoreError::Corrupt {
        table: "chunks",
        what,
    };
    let mut live: Vec<(Pid, String)> = Vec::new();
    let mut deleted: HashSet<Vec<u8>> = HashSet::new();
    for a in db.doc_ids(doc)? {
        if a.delete != 0 {
            deleted.insert(a.pid_key);
        } else if a.insert != 0 {
            let pid = Pid::from_key(&a.pid_key).ok_or(corrupt("position id key"))?;
            live.push((pid, a.text));
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
    use redb::ReadableDatabase;

    use super::*;
    use crate::ops::parse_doc_id;
    use crate::ops::tests::{DOC, healthy};

    #[test]
    fn export_renders_live_atoms_and_chars_at_virtual_ids() {
        let (_dir, db) = healthy();
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
}
