//! Cursors never miss a change (PROTOCOL.md 3.1, 3.4): listers that follow
//! their synclist cursor and each document's 34 while writers upsert end
//! with exactly what a fresh pull shows, and that is every change made.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notesync_protocol::{Atom, ClientFrame, DocId, Pid, Time};
use notesync_tests::{Conn, DocModel, Rng, ServerProcess, SessionClient, model_of, upsert_frame};

const DOCS: u128 = 10;
const WRITERS: usize = 3;
const ROUNDS_PER_WRITER: usize = 40;
const PIPELINE: usize = 4;
const SESSION_ROUNDS: usize = 30;

#[derive(Default)]
struct WriterLog {
    inserted: BTreeMap<DocId, BTreeMap<Pid, String>>,
    deleted: BTreeMap<DocId, BTreeSet<Pid>>,
}

async fn writer(addr: SocketAddr, w: usize) -> WriterLog {
    let mut c = Conn::connect(addr).await.with_label(format!("writer {w}"));
    c.hello(0x7000 + w as u128).await;
    let mut rng = Rng::new(4000 + w as u64);
    let mut state: BTreeMap<DocId, (DocModel, Time)> = BTreeMap::new();
    let mut log = WriterLog::default();
    for round in 0..ROUNDS_PER_WRITER {
        // Up to PIPELINE upserts to distinct documents, sent back to back.
        let mut batch: Vec<DocId> = Vec::new();
        for _ in 0..PIPELINE {
            let doc = 1 + rng.below(DOCS as usize) as u128;
            if !batch.contains(&doc) {
                batch.push(doc);
            }
        }
        for &doc in &batch {
            if let std::collections::btree_map::Entry::Vacant(v) = state.entry(doc) {
                // First contact: create or join the document, get a site.
                let (rs, s) = c.upsert(doc, &format!("doc {doc}"), 0, &[], &[]).await;
                let mut m = model_of(doc, &rs);
                m.set_site(s.site, w as u64);
                v.insert((m, s.sync_time));
            }
        }
        let mut frames = Vec::new();
        for &doc in &batch {
            let (m, since) = state.get_mut(&doc).unwrap();
            let mut inserts: Vec<Atom> = Vec::new();
            for _ in 0..1 + rng.below(3) {
                let n = m.live_len();
                let a = m.local_insert(rng.below(n + 1), &rng.word());
                log.inserted
                    .entry(doc)
                    .or_default()
                    .insert(a.pid().clone(), a.data().to_string());
                inserts.push(a);
            }
            let mut deletes = Vec::new();
            let live = m.live();
            if !live.is_empty() && rng.percent(40) {
                let i = rng.below(live.len());
                let p = m.local_delete(i);
                log.deleted.entry(doc).or_default().insert(p.clone());
                deletes.push(p);
            }
            let name = if rng.percent(15) {
                format!("doc {doc} by {w} in round {round}")
            } else {
                m.name.clone()
            };
            frames.push(upsert_frame(doc, &name, *since, &inserts, &deletes));
        }
        c.send_many(frames).await;
        for &doc in &batch {
            let (rs, s) = c
                .recv_doc_reply(doc, "pipelined upsert")
                .await
                .unwrap_or_else(|e| panic!("writer {w}: upsert refused: {e:?}"));
            let (m, since) = state.get_mut(&doc).unwrap();
            m.apply_responses(&rs);
            *since = s.sync_time;
        }
    }
    log
}

/// A session writer on one document: rounds of pipelined inserts and
/// deletes, each round acknowledged before the next.
async fn session_writer(addr: SocketAddr, k: usize, doc: DocId) -> WriterLog {
    let mut sc = SessionClient::start(
        addr,
        &format!("session writer {k}"),
        Some(0x7100 + k as u128),
        doc,
        0,
        k as u64,
    )
    .await;
    // Whether sessions hear upserts is not what this test checks.
    sc.strict = false;
    let mut rng = Rng::new(5000 + k as u64);
    for _ in 0..SESSION_ROUNDS {
        let mut ops = Vec::new();
        for _ in 0..8 {
            let n = sc.model.live_len();
            if n > 0 && rng.percent(30) {
                ops.push(sc.delete_at(rng.below(n)));
            } else {
                ops.push(sc.insert_at(rng.below(n + 1), &rng.word()));
            }
        }
        sc.send_ops(ops).await;
        sc.wait_acked().await;
    }
    assert!(sc.errors.is_empty(), "{}: {:?}", sc.label(), sc.errors);
    let mut log = WriterLog::default();
    for p in &sc.own_ids {
        let e = sc.model.get(p).expect("own id");
        log.inserted
            .entry(doc)
            .or_default()
            .insert(p.clone(), e.data.clone());
    }
    log.deleted.insert(doc, sc.own_deletes.clone());
    log
}

struct ListerView {
    docs: BTreeMap<DocId, (DocModel, Time)>,
    rounds: usize,
}

async fn lister(addr: SocketAddr, l: usize, writers_done: Arc<AtomicBool>) -> ListerView {
    let label = format!("lister {l}");
    let mut c = Conn::connect(addr).await.with_label(&label);
    let with_hello = l % 2 == 0;
    if with_hello {
        c.hello(0x8000 + l as u128).await;
    }
    let mut cursor: Time = 0;
    let mut docs: BTreeMap<DocId, (DocModel, Time)> = BTreeMap::new();
    let mut last_pass = false;
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 100_000, "{label}: too many rounds");
        // Once the writers are done (every 34 received), list until empty.
        if writers_done.load(Ordering::SeqCst) {
            last_pass = true;
        }
        let page = c.synclist(cursor).await;
        let mut seen = BTreeSet::new();
        let mut prev = cursor;
        for e in &page {
            assert!(
                e.modified > prev,
                "{label}: synclist({cursor}) is not strictly ascending after the cursor: {page:?}"
            );
            prev = e.modified;
            assert!(
                seen.insert(e.doc),
                "{label}: a document listed twice in one 32"
            );
        }
        if page.is_empty() {
            if last_pass {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        // Pull every listed document, pipelined, each from its own cursor.
        let pulls: Vec<ClientFrame> = page
            .iter()
            .map(|e| ClientFrame::Pull {
                doc: e.doc,
                since: docs.get(&e.doc).map_or(0, |d| d.1),
            })
            .collect();
        c.send_many(pulls).await;
        for e in &page {
            let (rs, s) = c
                .recv_doc_reply(e.doc, "pull")
                .await
                .unwrap_or_else(|err| panic!("{label}: pull of a listed doc: {err:?}"));
            assert!(
                s.sync_time >= e.modified,
                "{label}: a pull after the listing covers the listed change ({} < {})",
                s.sync_time,
                e.modified
            );
            if !with_hello {
                assert_eq!(s.site, 0, "{label}: no hello, no site");
            }
            let entry = docs
                .entry(e.doc)
                .or_insert_with(|| (DocModel::new(e.doc), 0));
            entry.0.apply_responses(&rs);
            entry.1 = s.sync_time;
        }
        cursor = page.last().unwrap().modified;
    }
    ListerView { docs, rounds }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_following_listers_never_miss_a_change_made_by_concurrent_writers() {
    let server = ServerProcess::start();
    let addr = server.addr();
    let done = Arc::new(AtomicBool::new(false));
    let listers: Vec<_> = (0..2)
        .map(|l| tokio::spawn(lister(addr, l, done.clone())))
        .collect();
    let mut writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(addr, w)))
        .collect();
    // Session ops are changes too: on two of the same documents, and on one
    // that only sessions write.
    for (k, doc) in [1u128, 2, DOCS + 1].into_iter().enumerate() {
        writers.push(tokio::spawn(session_writer(addr, k, doc)));
    }
    let mut logs = Vec::new();
    for w in writers {
        logs.push(w.await.expect("writer"));
    }
    done.store(true, Ordering::SeqCst);
    let mut views = Vec::new();
    for l in listers {
        views.push(l.await.expect("lister"));
    }
    for (l, v) in views.iter().enumerate() {
        eprintln!("lister {l}: {} rounds", v.rounds);
    }

    // The truth: a fresh pull of every document that exists.
    let mut fresh = server.connect().await;
    let listed: Vec<DocId> = fresh.synclist_all(0).await.iter().map(|e| e.doc).collect();
    let touched: BTreeSet<DocId> = logs
        .iter()
        .flat_map(|l| l.inserted.keys().copied())
        .collect();
    assert_eq!(
        listed.iter().copied().collect::<BTreeSet<_>>(),
        touched,
        "synclist(0) lists every document written"
    );
    for &doc in &listed {
        let (rs, _) = fresh.pull(doc, 0).await;
        let truth = model_of(doc, &rs);

        let mut expected: BTreeMap<Pid, String> = BTreeMap::new();
        for l in &logs {
            if let Some(ins) = l.inserted.get(&doc) {
                expected.extend(ins.clone());
            }
        }
        for l in &logs {
            for p in l.deleted.get(&doc).into_iter().flatten() {
                expected.remove(p);
            }
        }
        assert_eq!(
            truth.live().into_iter().collect::<BTreeMap<_, _>>(),
            expected,
            "doc {doc}: the server holds every insert less every delete"
        );
        for (l, v) in views.iter().enumerate() {
            let (m, _) = v
                .docs
                .get(&doc)
                .unwrap_or_else(|| panic!("lister {l} never saw doc {doc} listed"));
            assert_eq!(
                m.live(),
                truth.live(),
                "lister {l} (after {} rounds) missed a change to doc {doc}",
                v.rounds
            );
            assert_eq!(m.name, truth.name, "lister {l}: name of doc {doc}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeating_synclist_from_the_largest_time_lists_every_document_once() {
    // More documents than the default cap of one synclist response (10,000),
    // so a capped server must page, and the pages must join exactly.
    const N: u128 = 10_050;
    let server = ServerProcess::start();
    let mut w = server.connect().await.with_label("creator");
    let mut created_at = Vec::new();
    for chunk in (1..=N).collect::<Vec<_>>().chunks(500) {
        w.send_many(chunk.iter().map(|&d| upsert_frame(d, "", 0, &[], &[])))
            .await;
        for &d in chunk {
            let (_, s) = w.recv_doc_reply(d, "create").await.expect("created");
            created_at.push((d, s.sync_time));
        }
    }
    let mut r = server.connect().await.with_label("lister");
    let all = r.synclist_all(0).await;
    assert_eq!(all.len(), N as usize, "every document listed once");
    assert!(
        all.windows(2).all(|w| w[0].modified < w[1].modified),
        "pages join in strictly ascending time"
    );
    assert_eq!(
        all.iter().map(|e| e.doc).collect::<Vec<_>>(),
        (1..=N).collect::<Vec<_>>(),
        "in creation order"
    );
    // From the middle: exactly the documents created later.
    let (mid_doc, mid_time) = created_at[4_999];
    let rest = r.synclist_all(mid_time).await;
    let first_listed = rest.first().map(|e| e.doc);
    assert!(
        rest.iter().all(|e| e.doc > mid_doc) || first_listed.is_none(),
        "nothing at or before the cursor's document"
    );
    let listed: BTreeSet<u128> = rest.iter().map(|e| e.doc).collect();
    let later: BTreeSet<u128> = created_at
        .iter()
        .filter(|(_, t)| *t > mid_time)
        .map(|(d, _)| *d)
        .collect();
    assert!(
        later.is_subset(&listed),
        "every document created after the cursor's 34 is listed"
    );
}
