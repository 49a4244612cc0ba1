//! Session mode (PROTOCOL.md 3.2): concurrent editors converge, nobody gets
//! their own ops back, acks count every op, late joiners miss nothing, and
//! refusals are reported before the ack that covers them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use notesync_protocol::{
    Atom, ClientFrame, DocId, ErrorCode, Pid, ServerFrame, SessionDelete, SessionInsert,
};
use notesync_tests::{
    Conn, DocModel, Rng, ServerProcess, SessionClient, atom, describe, model_of, name_of,
};
use tokio::sync::{Barrier, oneshot};

const ROUNDS: usize = 16;
const OPS_PER_ROUND: usize = 16;

/// Creates `doc` with `n` one-word atoms through an upsert by `replica`;
/// returns their ids in order.
async fn seed_doc(server: &ServerProcess, replica: u128, doc: DocId, n: usize) -> Vec<Pid> {
    let mut c = server.connect().await.with_label("seeder");
    c.hello(replica).await;
    let (_, s) = c.upsert(doc, "shared", 0, &[], &[]).await;
    let mut m = DocModel::new(doc);
    m.set_site(s.site, 99);
    let atoms: Vec<Atom> = (0..n).map(|i| m.local_append(&format!("w{i} "))).collect();
    c.upsert(doc, "shared", s.sync_time, &atoms, &[]).await;
    atoms.iter().map(|a| a.pid().clone()).collect()
}

/// `n` random ops on the client's replica: inserts anywhere, deletes of
/// atoms in `deletable` or made by this client (so no two clients ever
/// delete the same atom and every op changes something).
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

/// What the document must hold: the seeded atoms and every insert, less
/// every delete.
fn expected_live(
    seeded: &BTreeMap<Pid, String>,
    clients: &[&SessionClient],
) -> BTreeMap<Pid, String> {
    let mut all = seeded.clone();
    for c in clients {
        for p in &c.own_ids {
            let e = c.model.get(p).expect("own id in own model");
            all.insert(p.clone(), e.data.clone());
        }
    }
    for c in clients {
        for p in &c.own_deletes {
            all.remove(p);
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_concurrent_sessions_converge_without_echo_and_ack_every_op() {
    let server = ServerProcess::start();
    let doc: DocId = 0x5E55_1011;
    let seeded_ids = seed_doc(&server, 0xA0, doc, 9).await;
    let addr = server.addr();
    let barrier = Arc::new(Barrier::new(3));
    let mut tasks = Vec::new();
    for k in 0..3usize {
        let barrier = barrier.clone();
        let deletable: BTreeSet<Pid> = seeded_ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == k)
            .map(|(_, p)| p.clone())
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(1000 + k as u64);
            let mut sc = SessionClient::start(
                addr,
                &format!("client {k}"),
                Some(0xC0 + k as u128),
                doc,
                0,
                k as u64,
            )
            .await;
            assert_ne!(sc.site(), 0, "a session after hello has a site");
            assert_eq!(sc.model.live_len(), 9, "the 33 holds the seeded text");
            // Everyone is in the session before anyone edits, so every op
            // of the others must arrive as a broadcast.
            barrier.wait().await;
            for _ in 0..ROUNDS {
                let ops = random_ops(&mut sc, &mut rng, OPS_PER_ROUND, &deletable);
                sc.send_ops(ops).await;
                sc.wait_acked().await;
            }
            let from_others = (2 * ROUNDS * OPS_PER_ROUND) as u64;
            sc.pump_until("every op of the other two", |s| {
                s.received_ops >= from_others
            })
            .await;
            // A rename after everything: the others must see it next, with
            // no repeated op before it.
            sc.rename(&format!("by {k}")).await;
            sc.pump_until("own ack and the two other renames", |s| {
                s.acked == s.sent && s.renames.len() >= 2
            })
            .await;
            sc
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.expect("client task"));
    }

    let sites: BTreeSet<u8> = clients.iter().map(|c| c.site()).collect();
    assert_eq!(sites.len(), 3, "three replicas, three sites");
    for (k, c) in clients.iter().enumerate() {
        assert!(c.errors.is_empty(), "client {k} got errors: {:?}", c.errors);
        assert_eq!(c.sent, (ROUNDS * OPS_PER_ROUND + 1) as u64);
        assert_eq!(c.acked, c.sent, "client {k}: every op acknowledged");
        assert_eq!(
            c.received_ops,
            (2 * ROUNDS * OPS_PER_ROUND) as u64,
            "client {k}: exactly the others' ops, each once"
        );
        let mut renames = c.renames.clone();
        renames.sort();
        let others: Vec<String> = (0..3)
            .filter(|&j| j != k)
            .map(|j| format!("by {j}"))
            .collect();
        assert_eq!(
            renames, others,
            "client {k}: the others' renames, not its own"
        );
    }
    let texts: Vec<String> = clients.iter().map(|c| c.model.text()).collect();
    assert!(
        texts.iter().all(|t| *t == texts[0]),
        "all clients converge to one text: {texts:#?}"
    );
    let mut reader = server.connect().await;
    let (rs, _) = reader.pull(doc, 0).await;
    let truth = model_of(doc, &rs);
    for (k, c) in clients.iter().enumerate() {
        assert_eq!(
            c.model.live(),
            truth.live(),
            "client {k} matches a fresh pull"
        );
    }
    let seeded: BTreeMap<Pid, String> = seeded_ids
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), format!("w{i} ")))
        .collect();
    let refs: Vec<&SessionClient> = clients.iter().collect();
    let expected = expected_live(&seeded, &refs);
    assert_eq!(
        truth.live().into_iter().collect::<BTreeMap<_, _>>(),
        expected,
        "the server holds every insert less every delete"
    );
    assert!(
        ["by 0", "by 1", "by 2"].contains(&truth.name.as_str()),
        "the last rename committed wins: {:?}",
        truth.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiners_get_exactly_the_text_from_their_33_and_the_broadcasts() {
    let server = ServerProcess::start();
    let doc: DocId = 0x1A7E;
    let seeded_ids = seed_doc(&server, 0xA0, doc, 6).await;
    let addr = server.addr();
    let barrier = Arc::new(Barrier::new(2));
    let (joined_tx, joined_rx) = oneshot::channel::<()>();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let mut joined_tx = Some(joined_tx);
    let mut go_rx = Some(go_rx);
    let mut writers = Vec::new();
    for (k, name) in ["A", "B"].into_iter().enumerate() {
        let barrier = barrier.clone();
        let deletable: BTreeSet<Pid> = seeded_ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == k)
            .map(|(_, p)| p.clone())
            .collect();
        // Writer A tells the test when to let the late joiners in, and
        // waits until they are in before its next round.
        let signal = if k == 0 {
            Some((joined_tx.take().unwrap(), go_rx.take().unwrap()))
        } else {
            None
        };
        writers.push(tokio::spawn(async move {
            let mut signal = signal;
            let mut rng = Rng::new(2000 + k as u64);
            let mut sc = SessionClient::start(
                addr,
                &format!("writer {name}"),
                Some(0xB0 + k as u128),
                doc,
                0,
                k as u64,
            )
            .await;
            barrier.wait().await;
            for round in 0..ROUNDS {
                if round == 3 {
                    if let Some((tx, rx)) = signal.take() {
                        tx.send(()).expect("test is waiting");
                        rx.await.expect("late joiners started");
                    }
                }
                let ops = random_ops(&mut sc, &mut rng, OPS_PER_ROUND, &deletable);
                sc.send_ops(ops).await;
                sc.wait_acked().await;
            }
            let from_other = (ROUNDS * OPS_PER_ROUND) as u64;
            sc.pump_until("every op of the other writer", |s| {
                s.received_ops >= from_other
            })
            .await;
            sc.rename(&format!("done {name}")).await;
            sc.pump_until("own ack and the other rename", |s| {
                s.acked == s.sent && !s.renames.is_empty()
            })
            .await;
            sc
        }));
    }

    joined_rx.await.expect("writer A reached round 3");
    // One joiner with no history (since 0), one that pulled first and
    // starts its session from its 34 — while the writers keep going.
    let mut puller = Conn::connect(addr).await.with_label("late puller");
    puller.hello(0xE1).await;
    let (rs, ps) = puller.pull(doc, 0).await;
    let held = model_of(doc, &rs);
    drop(puller);
    let mut late0 = SessionClient::start(addr, "late since 0", Some(0xE0), doc, 0, 7).await;
    let mut late1 =
        SessionClient::start_with(addr, "late since cursor", Some(0xE1), held, ps.sync_time, 8)
            .await;
    assert_eq!(late1.site(), ps.site, "a replica keeps its site");
    go_tx.send(()).expect("writer A waits");
    let done = |s: &SessionClient| {
        s.renames.contains(&"done A".to_string()) && s.renames.contains(&"done B".to_string())
    };
    tokio::join!(
        late0.pump_until("both writers' final renames", done),
        late1.pump_until("both writers' final renames", done)
    );

    let mut finals = Vec::new();
    for w in writers {
        finals.push(w.await.expect("writer task"));
    }
    let (a, b) = (&finals[0], &finals[1]);
    for w in [a, b] {
        assert!(w.errors.is_empty(), "{}: {:?}", w.label(), w.errors);
        assert_eq!(w.acked, w.sent);
        assert_eq!(w.received_ops, (ROUNDS * OPS_PER_ROUND) as u64);
    }
    assert_eq!(a.model.live(), b.model.live(), "the writers converge");
    for late in [&late0, &late1] {
        assert_eq!(
            late.model.live(),
            a.model.live(),
            "{}: its 33 plus the broadcasts after its 68 give exactly the text",
            late.label()
        );
        assert_eq!(late.model.text(), a.model.text());
        assert!(late.sent == 0 && late.errors.is_empty());
    }
    let mut reader = server.connect().await;
    let (rs, _) = reader.pull(doc, 0).await;
    assert_eq!(model_of(doc, &rs).live(), a.model.live());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_session_ops_are_reported_before_their_ack_and_not_broadcast() {
    let server = ServerProcess::start();
    let doc: DocId = 0x4EF0;
    let mut owner = server.connect().await.with_label("owner");
    owner.hello(0x01).await;
    let (_, os) = owner.upsert(doc, "start", 0, &[], &[]).await;
    let a = atom("A", 50, os.site);
    owner
        .upsert(doc, "start", os.sync_time, std::slice::from_ref(&a), &[])
        .await;

    let addr = server.addr();
    let mut x = SessionClient::start(addr, "x", Some(0x02), doc, 0, 1).await;
    let mut listener = SessionClient::start(addr, "listener", Some(0x03), doc, 0, 2).await;
    let mut anon = SessionClient::start(addr, "no-hello", None, doc, 0, 3).await;
    assert_eq!(anon.site(), 0, "a session without hello has site 0 (1.2)");
    assert!(x.site() != 0 && x.site() != os.site);
    assert_eq!(x.model.text(), "A");

    let good = atom("good", 70, x.site());
    let ops = vec![
        // 1: fine.
        ClientFrame::Insert(SessionInsert::new(good.clone())),
        // 2: an id of the owner's site: site_mismatch.
        ClientFrame::Insert(SessionInsert::new(atom("forged", 80, os.site))),
        // 3: a delete whose site field is not x's: site_mismatch.
        ClientFrame::Delete(SessionDelete {
            site: os.site,
            pid: a.pid().clone(),
        }),
        // 4: op 1's id with other data: id_conflict.
        ClientFrame::Insert(SessionInsert::new(atom("bad", 70, x.site()))),
        // 5: op 1 again: acknowledged, changes nothing, not broadcast.
        ClientFrame::Insert(SessionInsert::new(good.clone())),
        // 6: delete A with x's site: fine.
        ClientFrame::Delete(SessionDelete {
            site: x.site(),
            pid: a.pid().clone(),
        }),
        // 7: rename.
        ClientFrame::Rename(name_of("renamed by x")),
        // 8: a delete with site 0 from a replica that has a site:
        // site_mismatch (a 66's site is the sender's, 0 only when it has none).
        ClientFrame::Delete(SessionDelete {
            site: 0,
            pid: good.pid().clone(),
        }),
    ];
    x.send_ops(ops).await;
    x.wait_acked().await;
    let codes: Vec<(u64, ErrorCode)> = x.errors.iter().map(|(n, e)| (*n, e.code)).collect();
    assert_eq!(
        codes.iter().map(|c| c.1).collect::<Vec<_>>(),
        vec![
            ErrorCode::SITE_MISMATCH,
            ErrorCode::SITE_MISMATCH,
            ErrorCode::ID_CONFLICT,
            ErrorCode::SITE_MISMATCH
        ],
        "ops 2, 3, 4 and 8 are refused, in order: {:?}",
        x.errors
    );
    for ((acked_before, code), op) in codes.iter().zip([2u64, 3, 4, 8]) {
        assert!(
            *acked_before < op,
            "the {code} for op {op} must come before the ack that covers it \
             (an ack of {acked_before} arrived first)"
        );
    }
    assert_eq!(x.acked, 8, "refused ops are counted by the ack too");

    // The listener gets exactly ops 1, 6 and 7, from x's site, in order.
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(listener.conn.recv().await);
    }
    match &got[..] {
        [
            ServerFrame::Insert(i),
            ServerFrame::Delete(d),
            ServerFrame::Rename(n),
        ] => {
            assert_eq!((i.site, &i.atom), (x.site(), &good));
            assert_eq!((d.site, &d.pid), (x.site(), a.pid()));
            assert_eq!(n.as_str(), "renamed by x");
        }
        other => panic!(
            "listener: expected 65, 66, 67 from x, got {:?}",
            other.iter().map(describe).collect::<Vec<_>>()
        ),
    }
    for f in got {
        listener.handle(f);
    }

    // Without hello: inserts are refused, deletes (site 0) go through.
    let anon_ops = vec![
        ClientFrame::Insert(SessionInsert::new(atom("anon", 90, 200))),
        ClientFrame::Delete(SessionDelete {
            site: x.site(),
            pid: good.pid().clone(),
        }),
        ClientFrame::Delete(SessionDelete {
            site: 0,
            pid: good.pid().clone(),
        }),
    ];
    anon.send_ops(anon_ops).await;
    anon.wait_acked().await;
    let codes: Vec<ErrorCode> = anon.errors.iter().map(|(_, e)| e.code).collect();
    assert_eq!(
        codes,
        vec![ErrorCode::HELLO_REQUIRED, ErrorCode::SITE_MISMATCH],
        "an insert without hello is hello_required; a 66 whose site is not 0 \
         from a connection without a site is site_mismatch: {:?}",
        anon.errors
    );
    assert!(anon.errors[0].0 < 1 && anon.errors[1].0 < 2);

    for who in [&mut listener, &mut x] {
        match who.conn.recv().await {
            ServerFrame::Delete(d) => {
                assert_eq!((d.site, &d.pid), (0, good.pid()), "{}", who.label());
            }
            other => panic!(
                "{}: expected the 66 of the no-hello session, got {}",
                who.label(),
                describe(&other)
            ),
        }
    }

    let (rs, _) = owner.pull(doc, 0).await;
    let m = model_of(doc, &rs);
    assert_eq!(m.text(), "", "A and good are deleted");
    assert_eq!(m.name, "renamed by x");
    assert!(m.get(&atom("forged", 80, os.site).pid().clone()).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_start_on_a_new_document_creates_it_with_an_empty_name() {
    let server = ServerProcess::start();
    let doc: DocId = 0x0E30;
    let mut c = server.connect().await;
    c.hello(0x77).await;
    let (rs, st) = c.session_start(0, doc).await;
    assert!(
        !rs.is_empty(),
        "session_start is answered by a 33 then a 68 (3.2)"
    );
    let m = model_of(doc, &rs);
    assert_eq!((m.name.as_str(), m.len_with_tombstones()), ("", 0));
    assert_ne!(st.site, 0);
    assert!(st.sync_time > 0);

    let mut other = server.connect().await;
    let list = other.synclist(0).await;
    assert_eq!(
        list.iter().map(|e| e.doc).collect::<Vec<_>>(),
        vec![doc],
        "the document exists once its session has started"
    );
    assert!(list[0].modified <= st.sync_time);
    let (rs, _) = other.pull(doc, 0).await;
    assert_eq!(model_of(doc, &rs).name, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_session_catches_up_and_its_resent_ops_are_not_repeated() {
    let server = ServerProcess::start();
    let doc: DocId = 0x2EC0;
    seed_doc(&server, 0xA0, doc, 4).await;
    let addr = server.addr();
    let mut rng = Rng::new(3000);
    let none = BTreeSet::new();
    let mut b = SessionClient::start(addr, "steady", Some(0xB0), doc, 0, 1).await;
    let mut c1 = SessionClient::start(addr, "flaky", Some(0xC0), doc, 0, 2).await;

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
    let (model, site, own_ids) = (c1.model.clone(), c1.site(), c1.own_ids.clone());
    drop(c1);

    // b goes on meanwhile.
    let ops = random_ops(&mut b, &mut rng, 10, &none);
    b.send_ops(ops).await;
    b.wait_acked().await;

    // c comes back from its last 68 and sends again what was not acked.
    let mut c2 = SessionClient::start_with(addr, "flaky again", Some(0xC0), model, cursor, 2).await;
    assert_eq!(c2.site(), site, "a replica keeps its site");
    c2.own_ids = own_ids;
    c2.send_ops(pending).await;
    c2.wait_acked().await;
    assert!(
        c2.errors.is_empty(),
        "re-sent inserts are accepted: {:?}",
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
        "c, back from its last 68 as 3.2 says, must hold the same text: b deleted atoms \
         that c had received live after its 68 (and so after its cursor); the 33 since that \
         cursor sends such an atom 'as neither' (3.1), so c never learns of the delete"
    );
    let mut r = server.connect().await;
    let (rs, _) = r.pull(doc, 0).await;
    assert_eq!(model_of(doc, &rs).live(), b.model.live());
}
