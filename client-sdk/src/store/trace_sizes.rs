//! The bytes of a note's `.md.structure` and `.md.latest_ops` for a real
//! editing trace (issue 12's client-store figure), in both formats: with
//! today's ids (`Doc::insert` and the seed allocator) and with ids made as
//! the version-3 rule makes them for typing (a char typed after or before
//! an own char takes the next or previous ident, so a typed run is
//! consecutive idents). The version-3 allocator is not used (it is being
//! written beside this): extensions are made here, and the first id of a
//! new run comes from today's `Allocator::between`, so its depth is
//! today's.
//!
//! Run: `NOTESYNC_TRACES=/work/shared/traces cargo test -p
//! notesync-client --lib trace_sizes -- --ignored --nocapture` (without
//! the variable, the traces, automerge-paper and seph-blog1, are read from
//! ../shared/traces beside the repository).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use notesync_protocol::{Allocator, Atom, DocName, Pid};

use super::structure::tests::write_structure_v1;
use super::structure::{read_structure, write_structure};
use crate::doc::{Doc, LocalOp};
use crate::oplog::{Pending, Record, appended_len, encode_records, encode_records_v1};

const SITE: u8 = 7;
const CHUNK: usize = 512;

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

/// A replica's entries in position order (tombstones too), chunked, with
/// the version-3 rule's extensions.
struct Sim {
    chunks: Vec<Vec<(Pid, char, bool)>>,
    /// Live chars per chunk: a char index is found in O(chunks + chunk).
    live: Vec<usize>,
    alloc: Allocator,
}

impl Sim {
    /// The place of live char `index` (or the end), and the entries
    /// either side of it: the Doc's rule (before the next live char, after
    /// any tombstones before it).
    fn locate(&self, index: usize) -> (usize, usize) {
        let mut left = index;
        for (c, chunk) in self.chunks.iter().enumerate() {
            if left >= self.live[c] {
                left -= self.live[c];
                continue;
            }
            for (i, e) in chunk.iter().enumerate() {
                if e.2 {
                    if left == 0 {
                        return (c, i);
                    }
                    left -= 1;
                }
            }
        }
        let last = self.chunks.len() - 1;
        (last, self.chunks[last].len())
    }

    fn before(&self, (c, i): (usize, usize)) -> Option<&Pid> {
        if i > 0 {
            return Some(&self.chunks[c][i - 1].0);
        }
        self.chunks[..c]
            .iter()
            .rev()
            .find_map(|ch| ch.last())
            .map(|e| &e.0)
    }

    fn at(&self, (c, i): (usize, usize)) -> Option<&Pid> {
        if let Some(e) = self.chunks[c].get(i) {
            return Some(&e.0);
        }
        self.chunks[c + 1..]
            .iter()
            .find_map(|ch| ch.first())
            .map(|e| &e.0)
    }

    /// The version-3 id between two adjacent entries: forward extension,
    /// else backward, else a new run.
    fn new_id(&mut self, l: Option<&Pid>, r: Option<&Pid>) -> Pid {
        if let Some(next) = l.filter(|l| l.creator() == SITE).and_then(|l| l.offset(1))
            && r.is_none_or(|r| next < *r)
        {
            return next;
        }
        if let Some(prev) = r
            .filter(|r| r.creator() == SITE && r.last().ident > 0)
            .map(|r| r.with_last_ident(r.last().ident - 1))
            && l.is_none_or(|l| *l < prev)
        {
            return prev;
        }
        self.alloc.between(l, r).expect("room")
    }

    fn insert(&mut self, index: usize, text: &str) -> Vec<LocalOp> {
        let mut at = self.locate(index);
        let mut ops = Vec::new();
        for ch in text.chars() {
            let (l, r) = (self.before(at).cloned(), self.at(at).cloned());
            let pid = self.new_id(l.as_ref(), r.as_ref());
            self.chunks[at.0].insert(at.1, (pid.clone(), ch, true));
            self.live[at.0] += 1;
            ops.push(LocalOp::Insert(
                Atom::new(ch.to_string(), pid).expect("atom"),
            ));
            at.1 += 1;
            if self.chunks[at.0].len() > 2 * CHUNK {
                let tail = self.chunks[at.0].split_off(CHUNK);
                let moved = tail.iter().filter(|e| e.2).count();
                self.live[at.0] -= moved;
                self.live.insert(at.0 + 1, moved);
                self.chunks.insert(at.0 + 1, tail);
                if at.1 >= CHUNK {
                    at = (at.0 + 1, at.1 - CHUNK);
                }
            }
        }
        ops
    }

    fn delete(&mut self, index: usize, n: usize) -> Vec<LocalOp> {
        let (mut c, mut i) = self.locate(index);
        let mut ops = Vec::new();
        while ops.len() < n {
            if i == self.chunks[c].len() {
                (c, i) = (c + 1, 0);
                continue;
            }
            let e = &mut self.chunks[c][i];
            if e.2 {
                e.2 = false;
                self.live[c] -= 1;
                ops.push(LocalOp::Delete(e.0.clone()));
            }
            i += 1;
        }
        ops
    }

    /// Removes cancelled ids (entries are in position order: a chunk by
    /// its last id, then a binary search).
    fn forget(&mut self, pids: &[Pid]) {
        for pid in pids {
            let c = self
                .chunks
                .iter()
                .position(|ch| ch.last().is_some_and(|e| e.0 >= *pid))
                .expect("a known id");
            let i = self.chunks[c]
                .binary_search_by(|e| e.0.cmp(pid))
                .expect("a known id");
            if self.chunks[c].remove(i).2 {
                self.live[c] -= 1;
            }
        }
    }

    fn doc(&self) -> Doc {
        let entries = self.chunks.iter().flatten();
        let atoms = entries
            .clone()
            .map(|e| (e.0.clone(), e.1.to_string()))
            .collect();
        let deleted = entries.filter(|e| !e.2).map(|e| e.0.clone()).collect();
        Doc::from_parts(1, DocName::new("paper").unwrap(), atoms, deleted)
    }
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
/// op sent, none acknowledged yet). `v3`: the version-3 rule's ids, else
/// today's `Doc::insert`.
fn replay(trace: &serde_json::Value, sent: bool, v3: bool) -> Sizes {
    let mut doc = Doc::new(1, DocName::new("paper").unwrap());
    let mut alloc = Allocator::new(SITE, 1, 1).unwrap();
    let mut sim = Sim {
        chunks: vec![Vec::new()],
        live: vec![0],
        alloc: Allocator::new(SITE, 1, 1).unwrap(),
    };
    let mut pending = Pending::default();
    let mut batches: Vec<Vec<Record>> = Vec::new();
    let mut edit = |ops: Vec<LocalOp>, doc: &mut Doc, sim: &mut Sim| {
        let rec = pending.record(ops, sent);
        if v3 {
            sim.forget(&rec.forget);
        } else {
            for p in &rec.forget {
                doc.forget(p);
            }
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
            let ops = if v3 {
                sim.delete(pos, del)
            } else {
                doc.delete(&mut alloc, pos..pos + del).unwrap()
            };
            edit(ops, &mut doc, &mut sim);
        }
        if !text.is_empty() {
            let ops = if v3 {
                sim.insert(pos, &text)
            } else {
                doc.insert(&mut alloc, pos, &text).unwrap()
            };
            edit(ops, &mut doc, &mut sim);
        }
    }
    if v3 {
        doc = sim.doc();
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
            "ids, how typed",
            "depth",
            "struct v1",
            "struct v2",
            "appended v1",
            "appended v2",
            "compact v1",
            "compact v2"
        );
        for (v3, sent, label) in [
            (false, false, "today's, offline"),
            (false, true, "today's, live (all sent)"),
            (true, false, "v3 rule, offline"),
            (true, true, "v3 rule, live (all sent)"),
        ] {
            let s = replay(&trace, sent, v3);
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
            if v3 {
                // Runs make the new formats several times smaller.
                assert!(s.structure_v2 * 3 < s.structure_v1);
                assert!(s.appended_v2 * 2 < s.appended_v1);
            }
        }
    }
}
