//! Real traces typed offline: the upsert carries about the final text, not
//! the keystrokes (the seed's rule, PROTOCOL.md 3.1, the op log's rules).
//!
//! The traces live in ../shared/traces (never copied into the repo). Outside
//! CI a missing trace skips with a message; in CI (CI=true) it fails.

mod common;
use common::trace::load_trace as load;

use notesync_client::Doc;
use notesync_client::oplog::Pending;
use notesync_protocol::{
    Allocator, AtomListBuilder, ClientFrame, Coalesced, DocName, ItemListBuilder, PidListBuilder,
    RangeListBuilder, RunCoalescer, Upsert, UpsertRuns,
};

/// Frame 4 (`sync_doc_upsert_runs`, protocol version 3) carrying
/// `inserts` as the SDK sends them: one-char atoms at consecutive ids as
/// runs (PROTOCOL.md 1.5), other atoms as items of their own. Returns its
/// encoded bytes.
fn v3_upsert_bytes(doc: u128, name: &DocName, inserts: &[notesync_protocol::Atom]) -> usize {
    let mut items = ItemListBuilder::new();
    let mut push = |c: Coalesced| match c {
        Coalesced::Run(first, text) => items.push_run(&first, &text).expect("a valid run"),
        Coalesced::Atom(data, pid) => items.push_atom(&data, &pid).expect("a valid atom"),
        Coalesced::Range(..) => unreachable!("no deletes are coalesced here"),
    };
    let mut co = RunCoalescer::new();
    for a in inserts {
        co.insert(a.data(), a.pid())
            .into_iter()
            .flatten()
            .for_each(&mut push);
    }
    co.take_run().into_iter().for_each(&mut push);
    ClientFrame::UpsertRuns(UpsertRuns {
        doc,
        name: name.clone(),
        since: 0,
        inserts: items.finish(),
        deletes: RangeListBuilder::new().finish(),
    })
    .to_bytes()
    .len()
}

/// Types the trace offline, then builds the upsert the SDK would send.
/// Returns (version-3 upsert bytes, final text bytes, atoms sent).
fn offline_upsert(trace: &serde_json::Value) -> (usize, usize, usize) {
    let doc_id = 0x5eed;
    let mut doc = Doc::new(doc_id, DocName::new("paper").unwrap());
    let mut pending = Pending::default();
    // Offline and never synced: no site yet. Provisional ids (site 1 here)
    // never go on the wire: coalescing re-ids everything before the upsert.
    let mut provisional = Allocator::new(1, doc_id, 1).unwrap();
    let mut edit = |doc: &mut Doc, ops| {
        let rec = pending.record(ops, false);
        for p in &rec.forget {
            assert!(doc.forget(p));
        }
    };
    let start = trace["startContent"].as_str().unwrap();
    let ops = doc.insert(&mut provisional, 0, start).unwrap();
    edit(&mut doc, ops);
    for txn in trace["txns"].as_array().unwrap() {
        for patch in txn["patches"].as_array().unwrap() {
            let pos = patch[0].as_u64().unwrap() as usize;
            let del = patch[1].as_u64().unwrap() as usize;
            if del > 0 {
                let ops = doc.delete(&mut provisional, pos..pos + del).unwrap();
                edit(&mut doc, ops);
            }
            let text = patch[2].as_str().unwrap();
            if !text.is_empty() {
                let ops = doc.insert(&mut provisional, pos, text).unwrap();
                edit(&mut doc, ops);
            }
        }
    }
    let end = trace["endContent"].as_str().unwrap();
    assert_eq!(doc.text(), end);
    // Every delete of a whole unsent atom cancelled its insert; deletes of
    // chars inside pasted (multi-char) atoms remain until the rewrite below.
    assert!(pending.len() >= doc.atom_count());
    // The server gave this replica site 7: re-id and coalesce.
    let mut real = Allocator::new(7, doc_id, 2).unwrap();
    let (removed, added) = doc
        .coalesce(&mut real, |p| pending.is_unsent_insert(p), true)
        .unwrap();
    pending.swap_coalesced(&removed, &added);
    assert_eq!(doc.text(), end);
    let (inserts, deletes, _) = pending.snapshot();
    assert!(deletes.is_empty());
    let mut ib = AtomListBuilder::new();
    for a in &inserts {
        assert_eq!(a.pid().creator(), 7);
        ib.push(a);
    }
    let frame = ClientFrame::Upsert(Upsert {
        doc: doc_id,
        name: doc.name.clone(),
        since: 0,
        inserts: ib.finish(),
        deletes: PidListBuilder::new().finish(),
    });
    let mut sorted = inserts.clone();
    sorted.sort_by(|a, b| a.pid().cmp(b.pid()));
    let v2 = frame.to_bytes().len();
    println!("frame 2 (versions 1 and 2) would be {v2} bytes");
    (
        v3_upsert_bytes(doc_id, &doc.name, &sorted),
        end.len(),
        inserts.len(),
    )
}

fn check(name: &str) {
    let Some(trace) = load(name) else { return };
    let (sent, text, atoms) = offline_upsert(&trace);
    let ratio = sent as f64 / text as f64;
    println!(
        "{name}: version-3 upsert {sent} bytes for {text} bytes of text in {atoms} atoms: ratio {ratio:.4}"
    );
    assert!(
        ratio <= 1.05,
        "{name}: upsert/text ratio {ratio:.4} exceeds 1.05"
    );
}

#[test]
fn automerge_paper_offline_upsert_is_close_to_the_text() {
    check("automerge-paper.json.gz");
}

#[test]
fn seph_blog_offline_upsert_is_close_to_the_text() {
    check("seph-blog1.json.gz");
}
