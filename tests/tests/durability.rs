//! Durability: a clean restart keeps everything, and `kill -9` never loses
//! an op the server acknowledged (PROTOCOL.md 3.1 "every upsert is
//! acknowledged by its 34", 3.2 "nothing is broadcast or acknowledged
//! before it is durably committed"), nor a site it gave out (1.2).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use notesync_protocol::{Atom, ClientFrame, DocId, ErrorCode, Pid, ServerFrame, SessionInsert};
use notesync_tests::{
    Conn, DocModel, Event, Rng, ServerProcess, SessionClient, describe, model_of, upsert_frame,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_sigterm_keeps_every_document_name_site_and_time() {
    let mut server = ServerProcess::start();
    let r1: u128 = 0xAB;
    let mut c = server.connect().await;
    c.hello(r1).await;
    let mut rng = Rng::new(5);
    let docs: Vec<DocId> = (0..4).map(|_| rng.next_u128()).collect();
    let mut sites = BTreeMap::new();
    for (i, &d) in docs.iter().enumerate() {
        let (_, s) = c.upsert(d, &format!("note {i}"), 0, &[], &[]).await;
        let mut m = DocModel::new(d);
        m.set_site(s.site, i as u64);
        let atoms: Vec<Atom> = (0..20).map(|_| m.local_append(&rng.word())).collect();
        let dels = vec![atoms[3].pid().clone(), atoms[7].pid().clone()];
        c.upsert(d, &format!("note {i}"), s.sync_time, &atoms, &dels)
            .await;
        sites.insert(d, s.site);
    }
    // Session edits too, including a rename.
    let mut sc = SessionClient::start(server.addr(), "session", Some(r1), docs[0], 0, 1).await;
    assert_eq!(sc.site(), sites[&docs[0]]);
    let mut ops = Vec::new();
    for i in 0..10 {
        let n = sc.model.live_len();
        ops.push(sc.insert_at((i * 7) % (n + 1), &format!("s{i}")));
    }
    ops.push(sc.delete_at(0));
    sc.send_ops(ops).await;
    sc.rename("renamed in session").await;
    sc.wait_acked().await;
    drop(sc);

    let listing = c.synclist_all(0).await;
    assert_eq!(listing.len(), docs.len());
    let mut before = BTreeMap::new();
    for &d in &docs {
        let (rs, _) = c.pull(d, 0).await;
        let m = model_of(d, &rs);
        before.insert(d, (m.name.clone(), m.live()));
    }
    let max_time = listing.iter().map(|e| e.modified).max().unwrap();
    drop(c);

    let status = server.terminate();
    assert!(
        status.success(),
        "SIGTERM shuts the server down cleanly (exit 0), got {status}"
    );
    server.restart();

    let mut c = server.connect().await;
    let welcome = c.hello(r1).await;
    assert!(
        welcome.server_time >= max_time,
        "time never goes back across a restart: welcome {} < {max_time}",
        welcome.server_time
    );
    assert_eq!(
        c.synclist_all(0).await,
        listing,
        "the listing, with its times, is the same after the restart"
    );
    for &d in &docs {
        let (rs, s) = c.pull(d, 0).await;
        let m = model_of(d, &rs);
        assert_eq!(
            (m.name.clone(), m.live()),
            before[&d],
            "doc {d:#x} after restart"
        );
        assert_eq!(s.site, sites[&d], "replica keeps its site across a restart");
    }
    let mut other = server.connect().await;
    other.hello(0xCD).await;
    let (_, os) = other.pull(docs[1], 0).await;
    assert!(
        os.site != 0 && os.site != sites[&docs[1]],
        "a new replica gets a new site"
    );

    // Writing goes on, with later times.
    let (_, s) = c.pull(docs[2], 0).await;
    let (_, s2) = c
        .upsert(
            docs[2],
            "note 2",
            s.sync_time,
            &[notesync_tests::atom("after", u32::MAX - 1, s.site)],
            &[],
        )
        .await;
    assert!(s2.sync_time > max_time);
    let list = c.synclist(max_time).await;
    assert_eq!(
        list.iter().map(|e| e.doc).collect::<Vec<_>>(),
        vec![docs[2]]
    );
}

/// What one writer knows at the end: every atom it sent, and how many of
/// them were acknowledged (a prefix, in send order).
struct WriterLog {
    label: String,
    doc: DocId,
    replica: u128,
    site: u8,
    sent: Vec<Atom>,
    acked: usize,
}

/// A session writer that pipelines inserts until its connection dies,
/// keeping at most `window` ops unacknowledged.
async fn session_writer(
    addr: SocketAddr,
    k: usize,
    doc: DocId,
    progress: Arc<AtomicU64>,
) -> WriterLog {
    const BATCH: usize = 20;
    const WINDOW: u64 = 60;
    let replica = 0x5000 + k as u128;
    let label = format!("session writer {k}");
    let mut sc = SessionClient::start(addr, &label, Some(replica), doc, 0, k as u64).await;
    // Others' broadcasts may repeat nothing, but this writer does not check
    // convergence: only what it sent.
    sc.strict = false;
    let mut rng = Rng::new(300 + k as u64);
    let mut sent: Vec<Atom> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    'outer: while Instant::now() < deadline && sent.len() < 200_000 {
        let mut frames = Vec::with_capacity(BATCH);
        for _ in 0..BATCH {
            let n = sc.model.live_len();
            let f = sc.insert_at(rng.below(n + 1), &rng.word());
            if let ClientFrame::Insert(i) = &f {
                sent.push(i.atom.clone());
            }
            frames.push(f);
        }
        sc.sent += frames.len() as u64;
        if sc.conn.try_send_many(frames).await.is_err() {
            break;
        }
        while sc.acked + WINDOW < sc.sent {
            match sc.conn.next_event().await {
                Event::Frame(ServerFrame::Error(e)) if e.code == ErrorCode::SHUTTING_DOWN => {
                    break 'outer;
                }
                Event::Frame(ServerFrame::Error(e)) => {
                    panic!("{label}: unexpected error {} {:?}", e.code, e.message)
                }
                Event::Frame(f) => {
                    let before = sc.acked;
                    sc.handle(f);
                    progress.fetch_add(sc.acked - before, Ordering::Relaxed);
                }
                Event::Closed => break 'outer,
                other => panic!("{label}: {other:?}"),
            }
        }
    }
    // Read what is left (acks already sent) until the connection dies.
    loop {
        match sc.conn.next_event().await {
            Event::Frame(ServerFrame::Error(e)) if e.code.closes_connection() => break,
            Event::Frame(f) => sc.handle(f),
            Event::Closed => break,
            other => panic!("{label}: after writing: {other:?}"),
        }
    }
    WriterLog {
        label,
        doc,
        replica,
        site: sc.site(),
        sent,
        acked: sc.acked as usize,
    }
}

/// A sync writer: upserts batches, each acknowledged by its 34.
async fn upsert_writer(addr: SocketAddr, doc: DocId, progress: Arc<AtomicU64>) -> WriterLog {
    let replica = 0x6000;
    let label = "upsert writer".to_string();
    let mut c = Conn::connect(addr).await.with_label(&label);
    c.hello(replica).await;
    let (_, s) = c.pull(doc, 0).await;
    let mut m = DocModel::new(doc);
    m.set_site(s.site, 9);
    let mut rng = Rng::new(77);
    let mut sent = Vec::new();
    let mut acked = 0usize;
    let mut since = s.sync_time;
    let deadline = Instant::now() + Duration::from_secs(40);
    // Two upserts in flight at a time.
    let mut in_flight: Vec<usize> = Vec::new();
    while Instant::now() < deadline {
        let atoms: Vec<Atom> = (0..10).map(|_| m.local_append(&rng.word())).collect();
        sent.extend(atoms.iter().cloned());
        if c.try_send(upsert_frame(doc, "upserted", since, &atoms, &[]))
            .await
            .is_err()
        {
            break;
        }
        in_flight.push(sent.len());
        if in_flight.len() < 2 {
            continue;
        }
        let mut dead = false;
        loop {
            match c.next_event().await {
                Event::Frame(ServerFrame::DocResponse(r)) => m.apply_response(&r),
                Event::Frame(ServerFrame::DocSync { sync_time, .. }) => {
                    since = sync_time;
                    let upto = in_flight.remove(0);
                    progress.fetch_add((upto - acked) as u64, Ordering::Relaxed);
                    acked = upto;
                    break;
                }
                Event::Closed => {
                    dead = true;
                    break;
                }
                Event::Frame(ServerFrame::Error(e)) if e.code == ErrorCode::SHUTTING_DOWN => {
                    dead = true;
                    break;
                }
                Event::Frame(f) => panic!("{label}: unexpected {}", describe(&f)),
                other => panic!("{label}: {other:?}"),
            }
        }
        if dead {
            break;
        }
    }
    WriterLog {
        label,
        doc,
        replica,
        site: s.site,
        sent,
        acked,
    }
}

/// A session that only listens, recording every insert broadcast to it,
/// until the connection ends.
async fn listener(addr: SocketAddr, k: usize, doc: DocId) -> (DocId, Vec<Atom>) {
    let label = format!("listener {k}");
    let mut sc = SessionClient::start(addr, &label, Some(0x9000 + k as u128), doc, 0, 0).await;
    sc.strict = false;
    let mut got = Vec::new();
    loop {
        match sc.conn.next_event().await {
            Event::Frame(ServerFrame::Insert(i)) => got.push(i.atom),
            Event::Frame(ServerFrame::Error(e)) if e.code.closes_connection() => break,
            Event::Frame(ServerFrame::Delete(_) | ServerFrame::Rename(_)) => {}
            Event::Closed => break,
            other => panic!("{label}: {other:?}"),
        }
    }
    (doc, got)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stop {
    Kill9,
    Sigterm,
}

/// Several sessions and an upserter write as fast as they can; the server
/// is stopped mid-flight, restarted, and must hold every acknowledged op
/// and every op it broadcast, and give every replica its site back.
async fn heavy_writes_then(stop: Stop) {
    let mut server = ServerProcess::start();
    let docs: [DocId; 3] = [0xD1, 0xD2, 0xD3];
    let mut setup = server.connect().await;
    setup.hello(0x1).await;
    for &d in &docs {
        setup.upsert(d, "heavy", 0, &[], &[]).await;
    }
    drop(setup);

    let addr = server.addr();
    let listeners: Vec<_> = (0..2)
        .map(|k| tokio::spawn(listener(addr, k, docs[k])))
        .collect();
    let progress = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for k in 0..4 {
        let p = progress.clone();
        tasks.push(tokio::spawn(session_writer(addr, k, docs[k % 2], p)));
    }
    let p = progress.clone();
    let upserter = tokio::spawn(upsert_writer(addr, docs[2], p));

    // Stop once plenty is acknowledged, while the writers are still going.
    let deadline = Instant::now() + Duration::from_secs(15);
    while progress.load(Ordering::Relaxed) < 6000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked_at_stop = progress.load(Ordering::Relaxed);
    assert!(
        acked_at_stop > 0,
        "no op was acknowledged within 15 s: nothing to check"
    );
    match stop {
        Stop::Kill9 => {
            server.kill9();
        }
        Stop::Sigterm => {
            let status = server.terminate();
            assert!(
                status.success(),
                "SIGTERM during writes still shuts down cleanly (exit 0), got {status}"
            );
        }
    }

    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.expect("session writer"));
    }
    logs.push(upserter.await.expect("upsert writer"));
    let mut heard = Vec::new();
    for l in listeners {
        heard.push(l.await.expect("listener"));
    }
    let unacked: usize = logs.iter().map(|l| l.sent.len() - l.acked).sum();
    for l in &logs {
        eprintln!("{}: sent {}, acked {}", l.label, l.sent.len(), l.acked);
    }
    if stop == Stop::Kill9 {
        assert!(
            unacked > 0,
            "the kill came while ops were in flight (else this test checks too little)"
        );
    }

    server.restart();
    let mut reader = server.connect().await;
    let mut docs_now = BTreeMap::new();
    for &d in &docs {
        let (rs, _) = reader.pull(d, 0).await;
        docs_now.insert(d, model_of(d, &rs));
    }
    let mut all_sent: BTreeMap<DocId, BTreeMap<Pid, String>> = BTreeMap::new();
    for log in &logs {
        let m = &docs_now[&log.doc];
        assert!(log.acked > 0, "{}: nothing acknowledged", log.label);
        for (i, a) in log.sent[..log.acked].iter().enumerate() {
            assert!(
                m.is_live(a.pid()) && m.get(a.pid()).unwrap().data == a.data(),
                "{}: op {i} of {} acknowledged ops is missing after {stop:?} and restart: {:?}",
                log.label,
                log.acked,
                a
            );
        }
        all_sent.entry(log.doc).or_default().extend(
            log.sent
                .iter()
                .map(|a| (a.pid().clone(), a.data().to_string())),
        );
    }
    for (doc, got) in &heard {
        eprintln!("listener on {doc:#x} heard {} inserts", got.len());
        assert!(
            !got.is_empty(),
            "a listener heard nothing: nothing to check"
        );
        let m = &docs_now[doc];
        for a in got {
            assert!(
                m.is_live(a.pid()),
                "an insert broadcast to a listener is missing after {stop:?} and restart \
                 (nothing is broadcast before it is durable, 3.2): {a:?}"
            );
        }
    }
    for (d, m) in &docs_now {
        for (p, data) in m.live() {
            assert_eq!(
                all_sent.get(d).and_then(|s| s.get(&p)),
                Some(&data),
                "doc {d:#x} holds an atom nobody sent: {p:?}"
            );
        }
    }
    // Sites survive too: each replica gets its site back, so its next
    // inserts cannot collide with another replica's.
    for log in &logs {
        let mut c = server.connect().await;
        c.hello(log.replica).await;
        let (_, s) = c.pull(log.doc, 0).await;
        assert_eq!(s.site, log.site, "{}: site after {stop:?}", log.label);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_heavy_writes_loses_no_acknowledged_or_broadcast_op() {
    heavy_writes_then(Stop::Kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_heavy_writes_exits_cleanly_and_loses_no_acknowledged_op() {
    heavy_writes_then(Stop::Sigterm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_with_kill_9_restarts_and_takes_writes() {
    let mut server = ServerProcess::start();
    let doc = 0x99;
    let mut c = server.connect().await;
    c.hello(0x42).await;
    let (_, s) = c.upsert(doc, "k9", 0, &[], &[]).await;
    let first = notesync_tests::atom("before", 10, s.site);
    c.upsert(doc, "k9", s.sync_time, std::slice::from_ref(&first), &[])
        .await;
    drop(c);
    server.kill9();
    server.restart();
    let mut sc = SessionClient::start(server.addr(), "after", Some(0x42), doc, 0, 1).await;
    assert_eq!(sc.site(), s.site);
    assert_eq!(sc.model.text(), "before");
    let second = notesync_tests::atom("after", 20, s.site);
    sc.send_ops(vec![ClientFrame::Insert(SessionInsert::new(second))])
        .await;
    sc.wait_acked().await;
    let mut r = server.connect().await;
    let (rs, _) = r.pull(doc, 0).await;
    assert_eq!(model_of(doc, &rs).text(), "beforeafter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_given_out_survive_kill_9_even_before_any_insert() {
    // 1.2: "The pairing is stored durably with the document." A replica
    // that got its site in a 34 or a 68 makes ids with it (offline too);
    // the site must not change, nor go to another replica, after a crash.
    let mut server = ServerProcess::start();
    let doc = 0x5173;
    let mut c = server.connect().await;
    c.hello(0x10).await;
    let (_, s10) = c.upsert(doc, "sites", 0, &[], &[]).await;
    let mut sites = vec![(0x10u128, s10.site)];
    for r in [0x11u128, 0x12] {
        let mut c = server.connect().await;
        c.hello(r).await;
        sites.push((r, c.pull(doc, 0).await.1.site));
    }
    let sc = SessionClient::start(server.addr(), "session", Some(0x13), doc, 0, 1).await;
    sites.push((0x13, sc.site()));
    drop(sc);
    drop(c);
    server.kill9();
    server.restart();

    let mut after = Vec::new();
    for &(r, _) in &sites {
        let mut c = server.connect().await;
        c.hello(r).await;
        after.push((r, c.pull(doc, 0).await.1.site));
    }
    assert_eq!(after, sites, "every replica keeps the site it was given");
    let mut c = server.connect().await;
    c.hello(0x14).await;
    let fresh = c.pull(doc, 0).await.1.site;
    assert!(
        fresh != 0 && sites.iter().all(|&(_, s)| s != fresh),
        "a new replica gets a site nobody has: {fresh} vs {sites:?}"
    );
}
