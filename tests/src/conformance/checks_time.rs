//! Time and visibility (PROTOCOL.md 1, 3.1, 3.4): unique increasing
//! times, later changes get later times, welcome's time, and cursors that
//! never miss a change while others write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use notesync_protocol::{Atom, ClientFrame, DocId, Pid, Time};

use super::checks_sync::list_all;
use super::util::{atom1, create_doc};
use super::{Check, Ctx, Outcome};
use crate::conn::upsert_frame;
use crate::model::{DocModel, model_of};
use crate::rng::Rng;
use crate::session::SessionClient;

pub fn checks() -> Vec<Check<Ctx>> {
    vec![
        Check::new(
            "time-unique-per-change",
            "1, 3.4",
            "pipelined changes to ten documents get ten distinct times, each covered by its own 34",
            unique_times,
        ),
        Check::new(
            "time-change-after-returned-time-is-later",
            "3.4",
            "a change made after a 34, a 68 or a listed time is listed with a later time",
            later_times,
        ),
        Check::new(
            "time-welcome-not-before-returned-times",
            "1, 3",
            "welcome's time is at or after every time returned before it",
            welcome_time,
        ),
        Check::new(
            "cursors-never-miss-with-concurrent-writers",
            "3.1, 3.4",
            "listers following synclist and 34 cursors while upsert and session writers work end with every change",
            cursors,
        )
        .with_timeout(std::time::Duration::from_secs(120)),
    ]
}

async fn unique_times(ctx: Ctx) -> Outcome {
    let marker = ctx.doc();
    let (mut c, _, t0) = create_doc(&ctx, "writer", marker, "").await;
    let docs: Vec<DocId> = (0..10).map(|_| ctx.doc()).collect();
    let frames: Vec<_> = docs
        .iter()
        .map(|&d| upsert_frame(d, "t", 0, &[], &[]))
        .collect();
    c.send_many(frames).await;
    let mut covered = BTreeMap::new();
    for &d in &docs {
        let (_, s) = c
            .recv_doc_reply(d, "pipelined upsert")
            .await
            .expect("created");
        covered.insert(d, s.sync_time);
    }
    let list: Vec<_> = list_all(&mut c, t0, "synclist")
        .await
        .into_iter()
        .filter(|e| covered.contains_key(&e.doc))
        .collect();
    assert_eq!(
        list.len(),
        10,
        "every new document is listed once: got {list:?}"
    );
    let times: BTreeSet<Time> = list.iter().map(|e| e.modified).collect();
    assert_eq!(
        times.len(),
        10,
        "every assigned time is unique (1): ten changes, ten times, got {:?}",
        list.iter().map(|e| e.modified).collect::<Vec<_>>()
    );
    for e in &list {
        assert!(
            e.modified > t0,
            "a change after a returned 34 has a later time"
        );
        assert!(
            e.modified <= covered[&e.doc],
            "a 34's sync_time covers its upsert's change: expected <= {}, got {}",
            covered[&e.doc],
            e.modified
        );
    }
    Ok(())
}

async fn later_times(ctx: Ctx) -> Outcome {
    let (x, y) = (ctx.doc(), ctx.doc());
    let (mut c, site, t0) = create_doc(&ctx, "writer", x, "x").await;
    let (_, sy) = c.upsert(y, "y", 0, &[], &[]).await;
    // After a 34 of a pull.
    let (_, p) = c.pull(x, 0).await;
    let (_, s1) = c
        .upsert(y, "y", sy.sync_time, &[atom1("1", 1, sy.site)], &[])
        .await;
    let l1 = listed_time(&ctx, &mut c, y, t0).await;
    assert!(
        l1 > p.sync_time,
        "a change made after a 34 of {} was returned has a later time (3.4): got {l1}",
        p.sync_time
    );
    assert!(l1 <= s1.sync_time);
    // After a 68.
    let (mut s, _) = ctx.client("session").await;
    let (_, st) = s.session_start(0, x).await;
    let (_, s2) = c
        .upsert(y, "y", s1.sync_time, &[atom1("2", 2, sy.site)], &[])
        .await;
    let l2 = listed_time(&ctx, &mut c, y, t0).await;
    assert!(
        l2 > st.sync_time,
        "a change made after a 68 of {} was returned has a later time (3.4): got {l2}",
        st.sync_time
    );
    // After a listed time.
    c.upsert(x, "x", t0, &[atom1("3", 3, site)], &[]).await;
    let lx = listed_time(&ctx, &mut c, x, t0).await;
    c.upsert(y, "y", s2.sync_time, &[atom1("4", 4, sy.site)], &[])
        .await;
    let l3 = listed_time(&ctx, &mut c, y, t0).await;
    assert!(
        l3 > lx,
        "a change made after the time {lx} was listed has a later time (3.4): got {l3}"
    );
    Ok(())
}

/// The time `doc` is listed with after `since`.
async fn listed_time(_ctx: &Ctx, c: &mut crate::conn::Conn, doc: DocId, since: Time) -> Time {
    let l: Vec<_> = list_all(c, since, "synclist")
        .await
        .into_iter()
        .filter(|e| e.doc == doc)
        .collect();
    assert_eq!(l.len(), 1, "the document is listed once: got {l:?}");
    l[0].modified
}

async fn welcome_time(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut c, site, t0) = create_doc(&ctx, "writer", doc, "w").await;
    let (_, s1) = c.upsert(doc, "w", t0, &[atom1("a", 1, site)], &[]).await;
    let (mut s, _) = ctx.client("session").await;
    let (_, st) = s.session_start(0, doc).await;
    let listed = list_all(&mut c, t0, "synclist").await;
    let most = listed
        .iter()
        .map(|e| e.modified)
        .chain([s1.sync_time, st.sync_time])
        .max()
        .unwrap();
    let (_, w) = ctx.client_as("late", ctx.replica()).await;
    assert!(
        w.server_time >= most,
        "the welcome's current time is not before a time already returned: expected >= {most}, got {}",
        w.server_time
    );
    Ok(())
}

const DOCS: usize = 4;
const WRITERS: usize = 3;
const ROUNDS: usize = 12;
const PIPELINE: usize = 3;
const SESSION_ROUNDS: usize = 10;

#[derive(Default)]
struct WriterLog {
    inserted: BTreeMap<DocId, BTreeMap<Pid, String>>,
    deleted: BTreeMap<DocId, BTreeSet<Pid>>,
}

async fn upsert_writer(ctx: Ctx, w: usize, docs: Vec<DocId>) -> WriterLog {
    let (mut c, _) = ctx.client(&format!("upsert writer {w}")).await;
    let mut rng = Rng::new(ctx.seed() ^ (100 + w as u64));
    let mut state: BTreeMap<DocId, (DocModel, Time)> = BTreeMap::new();
    let mut log = WriterLog::default();
    for round in 0..ROUNDS {
        let mut batch: Vec<DocId> = Vec::new();
        for _ in 0..PIPELINE {
            let d = docs[rng.below(docs.len())];
            if !batch.contains(&d) {
                batch.push(d);
            }
        }
        for &d in &batch {
            if let std::collections::btree_map::Entry::Vacant(v) = state.entry(d) {
                let (rs, s) = c.upsert(d, "doc", 0, &[], &[]).await;
                let mut m = model_of(d, &rs);
                m.set_site(s.site, w as u64);
                v.insert((m, s.sync_time));
            }
        }
        let mut frames = Vec::new();
        for &d in &batch {
            let (m, since) = state.get_mut(&d).unwrap();
            let mut inserts: Vec<Atom> = Vec::new();
            for _ in 0..1 + rng.below(3) {
                let n = m.live_len();
                let a = m.local_insert(rng.below(n + 1), &rng.word());
                log.inserted
                    .entry(d)
                    .or_default()
                    .insert(a.pid().clone(), a.data().to_string());
                inserts.push(a);
            }
            let mut deletes = Vec::new();
            let n = m.live_len();
            if n > 0 && rng.percent(40) {
                let p = m.local_delete(rng.below(n));
                log.deleted.entry(d).or_default().insert(p.clone());
                deletes.push(p);
            }
            let name = if rng.percent(15) {
                format!("by {w} in round {round}")
            } else {
                m.name.clone()
            };
            frames.push(upsert_frame(d, &name, *since, &inserts, &deletes));
        }
        c.send_many(frames).await;
        for &d in &batch {
            let (rs, s) = c
                .recv_doc_reply(d, "pipelined upsert")
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "upsert writer {w}: upsert refused: {} {:?}",
                        e.code, e.message
                    )
                });
            let (m, since) = state.get_mut(&d).unwrap();
            m.apply_responses(&rs);
            *since = s.sync_time;
        }
    }
    log
}

async fn session_writer(ctx: Ctx, k: usize, doc: DocId) -> WriterLog {
    let (c, _) = ctx.client(&format!("session writer {k}")).await;
    let mut sc = SessionClient::start_on(c, DocModel::new(doc), 0, k as u64).await;
    // Whether sessions hear upserts is not what this check is about.
    sc.strict = false;
    let mut rng = Rng::new(ctx.seed() ^ (200 + k as u64));
    for _ in 0..SESSION_ROUNDS {
        let mut ops = Vec::new();
        for _ in 0..6 {
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
}

async fn lister(
    ctx: Ctx,
    l: usize,
    start: Time,
    ours: BTreeSet<DocId>,
    done: Arc<AtomicBool>,
) -> ListerView {
    let label = format!("lister {l}");
    let mut c = if l % 2 == 0 {
        ctx.client(&label).await.0
    } else {
        match ctx.anon(&label).await {
            Ok(c) => c,
            Err(_) => ctx.client(&label).await.0,
        }
    };
    let mut cursor = start;
    let mut docs: BTreeMap<DocId, (DocModel, Time)> = BTreeMap::new();
    let mut last_pass = false;
    for _ in 0..100_000 {
        if done.load(Ordering::SeqCst) {
            last_pass = true;
        }
        let page = c.synclist(cursor).await;
        let mut prev = cursor;
        let mut seen = BTreeSet::new();
        for e in &page {
            assert!(
                e.modified > prev,
                "{label}: synclist({cursor}) lists times after the cursor, strictly ascending (3.1): got \
                 {} after {prev}",
                e.modified
            );
            assert!(
                seen.insert(e.doc),
                "{label}: a document listed twice in one 32"
            );
            prev = e.modified;
        }
        let Some(last) = page.last() else {
            if last_pass {
                return ListerView { docs };
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            continue;
        };
        let mine: Vec<_> = page
            .iter()
            .filter(|e| ours.contains(&e.doc))
            .copied()
            .collect();
        let pulls: Vec<ClientFrame> = mine
            .iter()
            .map(|e| ClientFrame::Pull {
                doc: e.doc,
                since: docs.get(&e.doc).map_or(0, |d| d.1),
            })
            .collect();
        c.send_many(pulls).await;
        for e in &mine {
            let (rs, s) = c.recv_doc_reply(e.doc, "pull").await.unwrap_or_else(|err| {
                panic!(
                    "{label}: pull of a listed document: {} {:?}",
                    err.code, err.message
                )
            });
            assert!(
                s.sync_time >= e.modified,
                "{label}: a pull after a listing covers the listed change: expected a 34 >= {}, got {}",
                e.modified,
                s.sync_time
            );
            let entry = docs
                .entry(e.doc)
                .or_insert_with(|| (DocModel::new(e.doc), 0));
            entry.0.apply_responses(&rs);
            entry.1 = s.sync_time;
        }
        cursor = last.modified;
    }
    panic!("{label}: too many rounds");
}

async fn cursors(ctx: Ctx) -> Outcome {
    let marker = ctx.doc();
    let (_, _, t0) = create_doc(&ctx, "marker", marker, "").await;
    let docs: Vec<DocId> = (0..DOCS).map(|_| ctx.doc()).collect();
    let session_only = ctx.doc();
    let ours: BTreeSet<DocId> = docs.iter().copied().chain([session_only]).collect();
    let done = Arc::new(AtomicBool::new(false));
    let listers: Vec<_> = (0..2)
        .map(|l| tokio::spawn(lister(ctx.clone(), l, t0, ours.clone(), done.clone())))
        .collect();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        writers.spawn(upsert_writer(ctx.clone(), w, docs.clone()));
    }
    for (k, d) in [docs[0], docs[1], session_only].into_iter().enumerate() {
        writers.spawn(session_writer(ctx.clone(), k, d));
    }
    let mut logs = Vec::new();
    while let Some(r) = writers.join_next().await {
        logs.push(r.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())));
    }
    done.store(true, Ordering::SeqCst);
    let mut views = Vec::new();
    for l in listers {
        views.push(
            l.await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
        );
    }
    let (mut fresh, _) = ctx.client("fresh").await;
    for &doc in &ours {
        let (rs, _) = fresh.pull(doc, 0).await;
        let truth = model_of(doc, &rs);
        let mut expected: BTreeMap<Pid, String> = BTreeMap::new();
        for l in &logs {
            expected.extend(l.inserted.get(&doc).cloned().unwrap_or_default());
        }
        for l in &logs {
            for p in l.deleted.get(&doc).into_iter().flatten() {
                expected.remove(p);
            }
        }
        assert_eq!(
            truth.live().into_iter().collect::<BTreeMap<_, _>>(),
            expected,
            "the server holds every insert less every delete"
        );
        for (l, v) in views.iter().enumerate() {
            let (m, _) = v
                .docs
                .get(&doc)
                .unwrap_or_else(|| panic!("lister {l} never saw a written document listed"));
            assert_eq!(
                m.live(),
                truth.live(),
                "lister {l}: following its cursors it missed a change (3.4): its text differs from a fresh pull"
            );
            assert_eq!(m.name, truth.name, "lister {l}: the document's name");
        }
    }
    Ok(())
}
