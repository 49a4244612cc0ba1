//! The bytes of a note's `.md.structure` and `.md.latest_ops` for a real
//! editing trace (issue 12's client-store figure), in both formats, with
//! the ids `Doc::insert` makes (the version-3 rule, PROTOCOL.md 1.4).
//!
//! Run: `NOTESYNC_TRACES=/work/shared/traces cargo test -p
//! notesync-client --lib trace_sizes -- --ignored --nocapture` (without
//! the variable, the traces, automerge-paper and seph-blog1, are read from
//! ../shared/traces beside the repository).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use notesync_protocol::{Allocator, DocName, Pid};

use super::structure::tests::write_structure_v1;
use super::structure::{read_structure, write_structure};
use crate::doc::{Doc, LocalOp};
use crate::oplog::{Pending, Record, appended_len, encode_records, encode_records_v1};

const SITE: u8 = 7;

/// The trace from `$NOTESYNC_TRACES`, else ../shared/traces beside the
/// repository (as the trace tests find it).
fn load(name: &str) -> Option<serde_json::Value> {
    let dir = std::env::var_os("NOTESYNC_TRACES").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces"),
        PathBuf::from,
    );
    let path = dir.join(name);
    let file = std::fs::File::open(&path).ok()?;
    let mut json = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut json)
        .expect("gunzip trace");
    Some(serde_json::from_str(&json).expect("trace json"))
}

/// The figures for one way of making ids.
struct Sizes {
    /// Mean depth of the final text's ids.
    mean_depth: f64,
    structure_v1: usize,
    structure_v2: usize,
    appended_v1: usize,
    appended_v2: usize,
    compacted_v1: usize,
    compacted_v2: usize,
}

/// Replays `trace`: `sent` false is a note typed offline (a delete of a
/// never-sent char cancels it), true a note typed in a live session (every
/// op sent, none acknowledged yet).
fn replay(trace: &serde_json::Value, sent: bool) -> Sizes {
    let mut doc = Doc::new(1, DocName::new("paper").unwrap());
    let mut alloc = Allocator::new(SITE, 1, 1).unwrap();
    let mut pending = Pending::default();
    let mut batches: Vec<Vec<Record>> = Vec::new();
    let mut edit = |ops: Vec<LocalOp>, doc: &mut Doc| {
        let rec = pending.record(ops, sent);
        for p in &rec.forget {
            doc.forget(p);
        }
        batches.push(rec.records);
    };
    let start = trace["startContent"].as_str().unwrap();
    let mut patches = vec![(0usize, 0usize, start.to_owned())];
    for txn in trace["txns"].as_array().unwrap() {
        for p in txn["patches"].as_array().unwrap() {
            let pos = p[0].as_u64().unwrap() as usize;
            let del = p[1].as_u64().unwrap() as usize;
            patches.push((pos, del, p[2].as_str().unwrap().to_owned()));
        }
    }
    for (pos, del, text) in patches {
        if del > 0 {
            let ops = doc.delete(&mut alloc, pos..pos + del).unwrap();
            edit(ops, &mut doc);
        }
        if !text.is_empty() {
            let ops = doc.insert(&mut alloc, pos, &text).unwrap();
            edit(ops, &mut doc);
        }
    }
    assert_eq!(doc.text(), trace["endContent"].as_str().unwrap());
    let none = BTreeSet::new();
    let v2 = write_structure(&doc, 0, &none);
    // The new file reads back to the same text.
    let (back, _, _) = read_structure(Path::new("paper"), &v2, doc.name.clone()).unwrap();
    assert_eq!(back.text(), doc.text());
    pending.structure_saved();
    let compacted = pending.to_records();
    let appended_v1 = batches.iter().map(|b| encode_records_v1(b).len()).sum();
    let (atoms, deleted) = doc.to_parts();
    let dead: BTreeSet<&Pid> = deleted.iter().collect();
    let live: Vec<&Pid> = atoms
        .iter()
        .map(|a| &a.0)
        .filter(|p| !dead.contains(p))
        .collect();
    let depth = live.iter().map(|p| p.depth()).sum::<usize>() as f64 / live.len() as f64;
    Sizes {
        mean_depth: depth,
        structure_v1: write_structure_v1(&doc, 0, &none).len(),
        structure_v2: v2.len(),
        appended_v1,
        appended_v2: appended_len(&batches),
        compacted_v1: encode_records_v1(&compacted).len(),
        compacted_v2: encode_records(&compacted).len(),
    }
}

#[test]
#[ignore = "a measurement: run it with --ignored --nocapture"]
fn trace_store_sizes() {
    for name in ["automerge-paper.json.gz", "seph-blog1.json.gz"] {
        let Some(trace) = load(name) else {
            panic!("{name} not found (set NOTESYNC_TRACES)");
        };
        let text = trace["endContent"].as_str().unwrap().len();
        println!("{name}: {text} bytes of final text");
        println!(
            "{:<26} {:>6} {:>10} {:>10} {:>11} {:>11} {:>10} {:>10}",
            "typed",
            "depth",
            "struct v1",
            "struct v2",
            "appended v1",
            "appended v2",
            "compact v1",
            "compact v2"
        );
        for (sent, label) in [(false, "offline"), (true, "live (all sent)")] {
            let s = replay(&trace, sent);
            println!(
                "{label:<26} {:>6.2} {:>10} {:>10} {:>11} {:>11} {:>10} {:>10}",
                s.mean_depth,
                s.structure_v1,
                s.structure_v2,
                s.appended_v1,
                s.appended_v2,
                s.compacted_v1,
                s.compacted_v2
            );
            // Runs make the new formats several times smaller.
            assert!(s.structure_v2 * 3 < s.structure_v1);
            assert!(s.appended_v2 * 2 < s.appended_v1);
        }
    }
}
