//! Session mode (PROTOCOL.md 3.2, 3.3): the 33 and 68, fan-out without
//! echo, acks, refusals, idempotent re-sends, renames, joining and
//! reconnecting while others write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use notesync_protocol::{ClientFrame, DocId, ErrorCode, Pid, ServerFrame, SessionInsert, Time};
use tokio::sync::{Barrier, oneshot};

use super::util::{atom1, create_doc, deletes_of, inserts_of, model, recv_ack, reply_name, show};
use super::{Check, Ctx, Outcome};
use crate::conn::{Conn, Event, describe};
use crate::model::{DocModel, model_of};
use crate::rng::Rng;
use crate::session::SessionClient;

pub fn checks() -> Vec<Check<Ctx>> {
    vec![
        Check::new(
            "session-start-new-document",
            "3.2",
            "session_start on a new document: 33 (empty name, no atoms) then 68 with a site; the document now exists",
            start_new,
        ),
        Check::new(
            "session-start-33-is-a-pull-with-every-delete",
            "3.2",
            "session_start(t)'s 33: a pull since t's inserts, and every delete made after t (also of atoms inserted after t)",
            start_is_a_pull,
        ),
        Check::new(
            "session-fan-out-without-echo",
            "3.2",
            "concurrent sessions: every op reaches every other session once, never its sender; all acked; all converge",
            fan_out,
        ),
        Check::new(
            "session-acks-count-ops-in-order",
            "3.2",
            "69 counts the connection's 65/66/67 in order, never goes back, never passes what was sent",
            acks_count,
        ),
        Check::new(
            "session-id-conflict",
            "3.2, 4",
            "a 65 of an existing id with other data: id_conflict before its ack; not broadcast; still open",
            session_id_conflict,
        ),
        Check::new(
            "session-resend-acked-not-broadcast",
            "3.2",
            "a re-sent insert or delete that changes nothing is acknowledged but not broadcast",
            resend_not_broadcast,
        ),
        Check::new(
            "session-resent-insert-of-deleted-gets-66",
            "3.2",
            "a re-sent insert whose id is deleted: the sender gets the delete as a 66 (deleter's site) before the ack",
            resent_insert_gets_66,
        ),
        Check::new(
            "session-rename-broadcast-last-wins",
            "3.2, 3.3",
            "67 is broadcast to the others, not echoed; the last rename committed is the name",
            rename_last_wins,
        ),
        Check::new(
            "session-join-while-others-write",
            "3.2",
            "sessions started while others write get every op exactly once: in their 33 or as a broadcast",
            join_while_writing,
        ),
        Check::new(
            "session-reconnect-from-68-catches-up",
            "3.2",
            "a session restarted from its 68's sync_time gets what it missed in its 33, then live ops once",
            reconnect_catches_up,
        ),
        Check::new(
            "session-resend-after-lost-connection-broadcast-once",
            "3.2, 3.2.1",
            "inserts sent just before a connection is lost, re-sent from the last 68: accepted, \
             broadcast once; the replica converges although others deleted atoms it got live",
            resend_after_lost_connection,
        ),
    ]
}

/// A session on `conn` (which sent its hello, or not) for `model`.
async fn session(conn: Conn, m: DocModel, since: Time, seed: u64) -> SessionClient {
    SessionClient::start_on(conn, m, since, seed).await
}

/// A session of a fresh replica (with hello) on `doc` since 0.
async fn hello_session(ctx: &Ctx, label: &str, doc: DocId, seed: u64) -> SessionClient {
    let (c, _) = ctx.client(label).await;
    session(c, DocModel::new(doc), 0, seed).await
}

/// The document as a fresh pull since 0 by a new replica shows it.
async fn server_model(ctx: &Ctx, doc: DocId) -> DocModel {
    let (mut r, _) = ctx.client("reader").await;
    let (rs, _) = r.pull(doc, 0).await;
    model_of(doc, &rs)
}

/// Creates `doc` with `n` atoms through an upsert; returns their ids.
async fn seed_doc(ctx: &Ctx, doc: DocId, n: usize) -> Vec<Pid> {
    let (mut c, site, t) = create_doc(ctx, "seeder", doc, "shared").await;
    let mut m = model(doc, site, ctx.seed());
    let atoms: Vec<_> = (0..n).map(|i| m.local_append(&format!("w{i} "))).collect();
    c.upsert(doc, "shared", t, &atoms, &[]).await;
    atoms.iter().map(|a| a.pid().clone()).collect()
}

/// `n` random ops: inserts anywhere, deletes of atoms in `deletable` or
/// made by this client (so no two clients delete the same atom and every
/// op changes something).
fn random_ops(
    sc: &mut SessionClient,
    rng: &mut Rng,
    n: usize,
    deletable: &BTreeSet<Pid>,
) -> Vec<ClientFrame> {
    let mut frames = Vec::with_capacity(n);
    for _ in 0..n {
        let live = sc.model.live();
        let candidates: Vec<usize> = live
            .iter()
            .enumerate()
            .filter(|(_, (p, _))| sc.own_ids.contains(p) || deletable.contains(p))
            .map(|(i, _)| i)
            .collect();
        if !candidates.is_empty() && rng.percent(30) {
            let i = candidates[rng.below(candidates.len())];
            frames.push(sc.delete_at(i));
        } else {
            let i = rng.below(live.len() + 1);
            let w = rng.word();
            frames.push(sc.insert_at(i, &w));
        }
    }
    frames
}

async fn start_new(ctx: Ctx) -> Outcome {
    let marker = ctx.doc();
    let (_, _, t0) = create_doc(&ctx, "marker", marker, "").await;
    let doc = ctx.doc();
    let (mut c, _) = ctx.client("session").await;
    let (rs, st) = c.session_start(0, doc).await;
    let m = model_of(doc, &rs);
    assert_eq!(
        reply_name(&rs, "session_start"),
        "",
        "a document created by session_start has an empty name (3.2)"
    );
    assert_eq!(
        m.len_with_tombstones(),
        0,
        "a new document has no atoms: got {rs:?}"
    );
    assert_ne!(st.site, 0, "a session after hello gets a site (1.3)");
    assert!(st.sync_time > 0, "the 68 carries a time");
    let (mut o, _) = ctx.client("other").await;
    let listed: Vec<_> = super::checks_sync::list_all(&mut o, t0, "synclist")
        .await
        .into_iter()
        .filter(|e| e.doc == doc)
        .collect();
    assert_eq!(
        listed.len(),
        1,
        "the document exists once its session has started: expected it listed, got {listed:?}"
    );
    assert!(
        listed[0].modified <= st.sync_time,
        "its creation is covered by the 68's time"
    );
    let (rs, _) = o.pull(doc, 0).await;
    assert_eq!(reply_name(&rs, "pull"), "");
    Ok(())
}

async fn start_is_a_pull(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut w, site, t0) = create_doc(&ctx, "writer", doc, "n").await;
    let mut m = model(doc, site, ctx.seed());
    let old: Vec<_> = (0..4)
        .map(|i| m.local_append(&format!("old{i} ")))
        .collect();
    let (_, t1) = w.upsert(doc, "n", t0, &old, &[]).await;
    let new: Vec<_> = (0..3)
        .map(|i| m.local_append(&format!("new{i} ")))
        .collect();
    // After t1: two old atoms and one new one deleted, a rename.
    let deleted = vec![
        old[0].pid().clone(),
        old[2].pid().clone(),
        new[1].pid().clone(),
    ];
    let (_, t2) = w.upsert(doc, "n", t1.sync_time, &new, &[]).await;
    w.upsert(doc, "renamed", t2.sync_time, &[], &deleted).await;
    let (mut r, _) = ctx.client("reader").await;
    let (pulled, _) = r.pull(doc, t1.sync_time).await;
    let (mut s, _) = ctx.client("session").await;
    let (started, _) = s.session_start(t1.sync_time, doc).await;
    assert_eq!(
        reply_name(&started, "session_start"),
        "renamed",
        "the 33's name is the current name"
    );
    assert_eq!(
        inserts_of(&started),
        inserts_of(&pulled),
        "session_start(t)'s 33 holds the atoms inserted after t that are live, as a pull since t"
    );
    let (sd, pd) = (deletes_of(&started), deletes_of(&pulled));
    assert_eq!(
        pd,
        BTreeSet::from([old[0].pid().clone(), old[2].pid().clone()]),
        "a pull since t holds the deletes after t of atoms inserted at or before t (3.1)"
    );
    assert_eq!(
        sd,
        BTreeSet::from([
            old[0].pid().clone(),
            old[2].pid().clone(),
            new[1].pid().clone()
        ]),
        "session_start(t)'s 33 holds every delete made after t, also of atoms inserted after t \
         (3.2: a reconnecting client may hold such atoms, received live after its 68)"
    );
    Ok(())
}

async fn fan_out(ctx: Ctx) -> Outcome {
    const ROUNDS: usize = 4;
    const OPS: usize = 8;
    let doc = ctx.doc();
    let seeded = seed_doc(&ctx, doc, 9).await;
    let mut writers = Vec::new();
    for k in 0..3u64 {
        writers.push(hello_session(&ctx, &format!("session {k}"), doc, ctx.seed() + k).await);
    }
    let mut observer = match ctx.anon("observer without hello").await {
        Ok(c) => session(c, DocModel::new(doc), 0, 0).await,
        Err(_) => hello_session(&ctx, "observer", doc, 0).await,
    };
    let sites: BTreeSet<u8> = writers.iter().map(|w| w.site()).collect();
    assert_eq!(sites.len(), 3, "three replicas, three sites: got {sites:?}");
    let barrier = Arc::new(Barrier::new(3));
    let mut set = tokio::task::JoinSet::new();
    for (k, mut sc) in writers.into_iter().enumerate() {
        assert_eq!(
            sc.model.live_len(),
            9,
            "{}: the 33 holds the seeded text",
            sc.label()
        );
        let barrier = barrier.clone();
        let deletable: BTreeSet<Pid> = seeded
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == k)
            .map(|(_, p)| p.clone())
            .collect();
        let mut rng = Rng::new(ctx.seed() ^ (k as u64 + 1));
        set.spawn(async move {
            barrier.wait().await;
            for _ in 0..ROUNDS {
                let ops = random_ops(&mut sc, &mut rng, OPS, &deletable);
                sc.send_ops(ops).await;
                sc.wait_acked().await;
            }
            let from_others = (2 * ROUNDS * OPS) as u64;
            sc.pump_until("every op of the other two", |s| {
                s.received_ops >= from_others
            })
            .await;
            (k, sc)
        });
    }
    let mut done = Vec::new();
    while let Some(r) = set.join_next().await {
        done.push(r.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())));
    }
    done.sort_by_key(|(k, _)| *k);
    let total = (3 * ROUNDS * OPS) as u64;
    observer
        .pump_until("every op of the three", |s| s.received_ops >= total)
        .await;
    let truth = server_model(&ctx, doc).await;
    for (k, sc) in &done {
        assert!(
            sc.errors.is_empty(),
            "session {k} got errors: {:?}",
            sc.errors
        );
        assert_eq!(sc.acked, sc.sent, "session {k}: every op acknowledged");
        assert_eq!(
            sc.received_ops,
            (2 * ROUNDS * OPS) as u64,
            "session {k}: exactly the others' ops, each once"
        );
        assert_eq!(
            sc.model.live(),
            truth.live(),
            "session {k} converges to the server's text"
        );
    }
    assert_eq!(
        observer.received_ops, total,
        "the observer got every op once"
    );
    assert_eq!(
        observer.model.live(),
        truth.live(),
        "the observer converges to the server's text"
    );
    // The server holds every insert less every delete.
    let mut expected: BTreeMap<Pid, String> = BTreeMap::new();
    for (i, p) in seeded.iter().enumerate() {
        expected.insert(p.clone(), format!("w{i} "));
    }
    for (_, sc) in &done {
        for p in &sc.own_ids {
            expected.insert(p.clone(), sc.model.get(p).expect("own id").data.clone());
        }
    }
    for (_, sc) in &done {
        for p in &sc.own_deletes {
            expected.remove(p);
        }
    }
    assert_eq!(
        truth.live().into_iter().collect::<BTreeMap<_, _>>(),
        expected,
        "the server holds every insert less every delete"
    );
    Ok(())
}

async fn acks_count(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let mut sc = hello_session(&ctx, "session", doc, ctx.seed()).await;
    let mut total = 0;
    for round in 0..3 {
        let mut ops = Vec::new();
        for i in 0..10 {
            let n = sc.model.live_len();
            if n > 0 && i % 3 == 2 {
                ops.push(sc.delete_at(n - 1));
            } else {
                ops.push(sc.insert_at(n, &format!("r{round}i{i} ")));
            }
        }
        ops.push(ClientFrame::Rename(crate::conn::name_of(&format!(
            "round {round}"
        ))));
        total += ops.len() as u64;
        sc.send_ops(ops).await;
        // SessionClient checks every ack: never back, never past `sent`.
        sc.wait_acked().await;
        assert_eq!(
            sc.acked, total,
            "after round {round}: every op acknowledged, counted from the session_start"
        );
    }
    assert!(sc.errors.is_empty(), "no op was refused: {:?}", sc.errors);
    assert_eq!(
        server_model(&ctx, doc).await.live(),
        sc.model.live(),
        "acknowledged ops are stored"
    );
    Ok(())
}

async fn session_id_conflict(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut x, _) = ctx.client("x").await;
    let (_, st) = x.session_start(0, doc).await;
    let (mut l, _) = ctx.client("listener").await;
    l.session_start(0, doc).await;
    let good = atom1("good", 70, st.site);
    let next = atom1("next", 71, st.site);
    x.send_many(vec![
        ClientFrame::Insert(SessionInsert::new(good.clone())),
        ClientFrame::Insert(SessionInsert::new(atom1("bad", 70, st.site))),
        ClientFrame::Insert(SessionInsert::new(next.clone())),
    ])
    .await;
    let mut acked = 0;
    let mut error_at = None;
    while acked < 3 {
        match x.next_event().await {
            Event::Frame(ServerFrame::SessionAck { count }) => acked = count,
            Event::Frame(ServerFrame::Error(e)) => {
                assert_eq!(
                    e.code,
                    ErrorCode::ID_CONFLICT,
                    "op 2 reuses op 1's id with other data: expected id_conflict, got {}",
                    e.code
                );
                error_at = Some(acked);
            }
            other => panic!("expected acks and one id_conflict, got {}", show(&other)),
        }
    }
    let at = error_at.unwrap_or_else(|| {
        panic!("op 2 reuses op 1's id with other data: expected id_conflict, got only acks")
    });
    assert!(
        at < 2,
        "the id_conflict for op 2 comes before the ack that covers it (3.2): it came after an ack of {at}"
    );
    for want in [&good, &next] {
        match l.recv().await {
            ServerFrame::Insert(i) => assert_eq!(
                &i.atom, want,
                "the listener gets ops 1 and 3, not the refused op 2"
            ),
            other => panic!(
                "listener: expected the 65s of ops 1 and 3, got {}",
                describe(&other)
            ),
        }
    }
    assert_eq!(
        server_model(&ctx, doc).await.text(),
        "goodnext",
        "the refused op did not change the atom"
    );
    Ok(())
}

async fn resend_not_broadcast(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut x, _) = ctx.client("x").await;
    let (_, st) = x.session_start(0, doc).await;
    let (mut l, _) = ctx.client("listener").await;
    l.session_start(0, doc).await;
    let a = atom1("a", 10, st.site);
    let b = atom1("b", 20, st.site);
    x.send_many(vec![
        ClientFrame::Insert(SessionInsert::new(a.clone())),
        ClientFrame::Insert(SessionInsert::new(b.clone())),
        ClientFrame::Delete(notesync_protocol::SessionDelete {
            site: st.site,
            pid: b.pid().clone(),
        }),
    ])
    .await;
    wait_acks(&mut x, 3).await;
    // Again, on the same connection and on a new one.
    x.send_many(vec![
        ClientFrame::Insert(SessionInsert::new(a.clone())),
        ClientFrame::Delete(notesync_protocol::SessionDelete {
            site: st.site,
            pid: b.pid().clone(),
        }),
    ])
    .await;
    wait_acks(&mut x, 5).await;
    let c = atom1("c", 30, st.site);
    x.insert(c.clone()).await;
    wait_acks(&mut x, 6).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(l.recv().await);
    }
    match &got[..] {
        [
            ServerFrame::Insert(i1),
            ServerFrame::Insert(i2),
            ServerFrame::Delete(d),
            ServerFrame::Insert(i3),
        ] if i1.atom == a && i2.atom == b && d.pid == *b.pid() && i3.atom == c => {}
        other => panic!(
            "the listener gets a, b, the delete of b, then c: the re-sent insert of a and delete of b \
             change nothing and are not broadcast (3.2); got {:?}",
            other.iter().map(describe).collect::<Vec<_>>()
        ),
    }
    Ok(())
}

/// Reads until an ack of `count`; any other frame fails.
async fn wait_acks(c: &mut Conn, count: u64) {
    loop {
        match c.next_event().await {
            Event::Frame(ServerFrame::SessionAck { count: n }) if n < count => {}
            Event::Frame(ServerFrame::SessionAck { count: n }) if n == count => return,
            other => panic!(
                "{}: expected acks up to {count}, got {}",
                c.label(),
                show(&other)
            ),
        }
    }
}

async fn resent_insert_gets_66(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let replica = ctx.replica();
    let (mut x, _) = ctx.client_as("x", replica).await;
    let (_, st) = x.session_start(0, doc).await;
    let a = atom1("a", 10, st.site);
    let keep = atom1("keep", 20, st.site);
    x.send_many(vec![
        ClientFrame::Insert(SessionInsert::new(a.clone())),
        ClientFrame::Insert(SessionInsert::new(keep.clone())),
    ])
    .await;
    wait_acks(&mut x, 2).await;
    drop(x);
    // Another replica deletes a.
    let (mut y, _) = ctx.client("y").await;
    let (_, yst) = y.session_start(0, doc).await;
    y.delete(yst.site, a.pid().clone()).await;
    recv_ack(&mut y, 1, "y's delete").await;
    // x comes back (as if its acks were lost) and re-sends both inserts.
    let (mut x2, _) = ctx.client_as("x again", replica).await;
    let (_, st2) = x2.session_start(st.sync_time, doc).await;
    assert_eq!(st2.site, st.site, "a replica keeps its site");
    x2.send_many(vec![
        ClientFrame::Insert(SessionInsert::new(a.clone())),
        ClientFrame::Insert(SessionInsert::new(keep.clone())),
    ])
    .await;
    let mut got_delete_at = None;
    let mut acked = 0;
    while acked < 2 {
        match x2.next_event().await {
            Event::Frame(ServerFrame::SessionAck { count }) => acked = count,
            Event::Frame(ServerFrame::Delete(d)) => {
                assert_eq!(&d.pid, a.pid(), "the 66 is of the re-sent insert's id");
                assert_eq!(d.site, yst.site, "the 66 carries the deleter's site (3.2)");
                got_delete_at = Some(acked);
            }
            other => panic!("x again: expected a 66 and acks, got {}", show(&other)),
        }
    }
    let at = got_delete_at.unwrap_or_else(|| {
        panic!(
            "a re-sent insert whose id is deleted on the server: expected its delete as a 66 before the \
             ack that covers the insert (3.2), got only acks"
        )
    });
    assert!(
        at < 1,
        "the 66 comes before the ack that covers the insert (3.2): it came after an ack of {at}"
    );
    Ok(())
}

async fn rename_last_wins(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let mut a = hello_session(&ctx, "a", doc, 1).await;
    let mut b = hello_session(&ctx, "b", doc, 2).await;
    a.rename("first").await;
    a.wait_acked().await;
    b.pump_until("a's rename", |s| s.renames.len() == 1).await;
    b.rename("second").await;
    b.wait_acked().await;
    a.pump_until("b's rename", |s| s.renames.len() == 1).await;
    assert_eq!(
        a.renames,
        vec!["second".to_string()],
        "a gets b's rename, never its own back"
    );
    assert_eq!(
        b.renames,
        vec!["first".to_string()],
        "b gets a's rename, never its own back"
    );
    let (mut r, _) = ctx.client("reader").await;
    let (rs, _) = r.pull(doc, 0).await;
    assert_eq!(
        reply_name(&rs, "pull"),
        "second",
        "the last rename committed wins (3.3)"
    );
    Ok(())
}

async fn join_while_writing(ctx: Ctx) -> Outcome {
    const ROUNDS: usize = 8;
    const OPS: usize = 8;
    let doc = ctx.doc();
    let seeded = seed_doc(&ctx, doc, 6).await;
    let (joined_tx, joined_rx) = oneshot::channel::<()>();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let mut signal = Some((joined_tx, go_rx));
    let barrier = Arc::new(Barrier::new(2));
    let mut set = tokio::task::JoinSet::new();
    for k in 0..2usize {
        let sc = hello_session(&ctx, &format!("writer {k}"), doc, k as u64).await;
        let barrier = barrier.clone();
        let deletable: BTreeSet<Pid> = seeded
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == k)
            .map(|(_, p)| p.clone())
            .collect();
        let mut signal = if k == 0 { signal.take() } else { None };
        let mut rng = Rng::new(ctx.seed() ^ (k as u64 + 7));
        set.spawn(async move {
            let mut sc = sc;
            barrier.wait().await;
            for round in 0..ROUNDS {
                if round == ROUNDS / 2 {
                    if let Some((tx, rx)) = signal.take() {
                        tx.send(()).expect("the check waits");
                        rx.await.expect("the joiners started");
                    }
                }
                let ops = random_ops(&mut sc, &mut rng, OPS, &deletable);
                sc.send_ops(ops).await;
                sc.wait_acked().await;
            }
            sc.pump_until("every op of the other writer", |s| {
                s.received_ops >= (ROUNDS * OPS) as u64
            })
            .await;
            sc.rename(&format!("done {k}")).await;
            sc.pump_until("own ack and the other rename", |s| {
                s.acked == s.sent && !s.renames.is_empty()
            })
            .await;
            (k, sc)
        });
    }
    joined_rx.await.expect("writer 0 reached the middle");
    // One joiner from nothing, one that pulled first and starts from its
    // 34, while writer 1 keeps going.
    let (mut puller, replica) = ctx.client("late puller").await;
    let (rs, ps) = puller.pull(doc, 0).await;
    drop(puller);
    let mut late0 = hello_session(&ctx, "late since 0", doc, 7).await;
    let (c, _) = ctx.client_as("late since its 34", replica).await;
    let mut late1 = session(c, model_of(doc, &rs), ps.sync_time, 8).await;
    assert_eq!(late1.site(), ps.site, "a replica keeps its site");
    go_tx.send(()).expect("writer 0 waits");
    let done = |s: &SessionClient| s.renames.len() == 2;
    tokio::join!(
        late0.pump_until("both writers' final renames", done),
        late1.pump_until("both writers' final renames", done)
    );
    let mut writers = Vec::new();
    while let Some(r) = set.join_next().await {
        writers.push(
            r.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
                .1,
        );
    }
    for w in &writers {
        assert!(w.errors.is_empty(), "{}: {:?}", w.label(), w.errors);
        assert_eq!(w.acked, w.sent, "{}: every op acknowledged", w.label());
        assert_eq!(
            w.received_ops,
            (ROUNDS * OPS) as u64,
            "{}: exactly the other writer's ops, each once",
            w.label()
        );
    }
    assert_eq!(
        writers[0].model.live(),
        writers[1].model.live(),
        "the writers converge"
    );
    for late in [&late0, &late1] {
        assert_eq!(
            late.model.live(),
            writers[0].model.live(),
            "{}: its 33 plus the broadcasts after its 68 give exactly the text (none missed; a \
             repeat would have failed already)",
            late.label()
        );
        assert!(
            late.sent == 0 && late.errors.is_empty(),
            "{}: sent nothing, got no error: {:?}",
            late.label(),
            late.errors
        );
    }
    assert_eq!(
        server_model(&ctx, doc).await.live(),
        writers[0].model.live(),
        "the server holds the writers' text"
    );
    Ok(())
}

async fn reconnect_catches_up(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    seed_doc(&ctx, doc, 3).await;
    let replica = ctx.replica();
    let (c, _) = ctx.client_as("flaky", replica).await;
    let x = session(c, DocModel::new(doc), 0, 1).await;
    let cursor = x.started.sync_time;
    let held = x.model.clone();
    drop(x);
    let mut w = hello_session(&ctx, "writer", doc, 2).await;
    let n = w.model.live_len();
    let ops = vec![
        w.insert_at(0, "while "),
        w.insert_at(n + 1, "away"),
        w.delete_at(1),
    ];
    w.send_ops(ops).await;
    w.wait_acked().await;
    let (c, _) = ctx.client_as("flaky again", replica).await;
    let mut x2 = session(c, held, cursor, 1).await;
    assert_eq!(
        x2.model.live(),
        w.model.live(),
        "the 33 since the 68's sync_time holds what happened meanwhile"
    );
    let n = w.model.live_len();
    let f = w.insert_at(n, "!");
    w.send_ops(vec![f]).await;
    w.wait_acked().await;
    x2.pump_until("the live insert", |s| s.received_ops == 1)
        .await;
    assert_eq!(
        x2.model.live(),
        w.model.live(),
        "then live ops arrive, each once"
    );
    Ok(())
}

/// PROTOCOL.md 3.2 and 3.2.1: a replica in a session sends inserts and
/// loses its connection before any ack; meanwhile another deletes atoms the
/// first received live (after its 68, so after its cursor). Back from its
/// last 68, it re-sends what was not acked: each insert reaches the others
/// once, and the replica ends with the server's text (the 33 since its
/// cursor holds those deletes).
async fn resend_after_lost_connection(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    seed_doc(&ctx, doc, 4).await;
    let mut rng = Rng::new(ctx.seed());
    let none = BTreeSet::new();
    let mut b = hello_session(&ctx, "steady", doc, 1).await;
    let replica = ctx.replica();
    let (c, _) = ctx.client_as("flaky", replica).await;
    let mut c1 = session(c, DocModel::new(doc), 0, 2).await;

    let ops = random_ops(&mut b, &mut rng, 10, &none);
    b.send_ops(ops).await;
    b.wait_acked().await;
    c1.pump_until("b's first ops", |s| s.received_ops == 10)
        .await;
    let ops = random_ops(&mut c1, &mut rng, 10, &none);
    c1.send_ops(ops).await;
    c1.wait_acked().await;
    b.pump_until("c's first ops", |s| s.received_ops == 10)
        .await;

    // c sends 20 inserts and loses its connection before any ack.
    let mut pending = Vec::new();
    for i in 0..20 {
        let n = c1.model.live_len();
        pending.push(c1.insert_at(rng.below(n + 1), &format!("p{i} ")));
    }
    c1.conn.send_many(pending.clone()).await;
    let cursor = c1.started.sync_time;
    let (held, site, own_ids) = (c1.model.clone(), c1.site(), c1.own_ids.clone());
    drop(c1);

    // b goes on meanwhile (deleting atoms c received live, too).
    let ops = random_ops(&mut b, &mut rng, 10, &none);
    b.send_ops(ops).await;
    b.wait_acked().await;

    // c comes back from its last 68 and sends again what was not acked.
    let (c, _) = ctx.client_as("flaky again", replica).await;
    let mut c2 = session(c, held, cursor, 2).await;
    assert_eq!(c2.site(), site, "a replica keeps its site (1.3)");
    c2.own_ids = own_ids;
    c2.send_ops(pending).await;
    c2.wait_acked().await;
    assert!(
        c2.errors.is_empty(),
        "re-sent inserts are accepted: got {:?}",
        c2.errors
    );
    b.pump_until("c's 20 inserts, once each", |s| s.received_ops == 30)
        .await;
    c2.rename("back").await;
    c2.wait_acked().await;
    b.pump_until("c's rename", |s| !s.renames.is_empty()).await;
    assert_eq!(
        b.received_ops, 30,
        "a re-send that changes nothing is not broadcast (3.2)"
    );
    assert_eq!(
        c2.model.live(),
        b.model.live(),
        "c, back from its last 68 as 3.2 says, must hold the same text: b deleted atoms that c \
         had received live after its 68 (and so after its cursor); the 33 since that cursor \
         must send those deletes (3.2), or c never learns of them"
    );
    assert_eq!(
        server_model(&ctx, doc).await.live(),
        b.model.live(),
        "the server holds the steady session's text"
    );
    Ok(())
}
