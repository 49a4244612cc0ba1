//! Crash cycles: a real server binary under session and upsert load is
//! killed with SIGKILL at a random (seeded) moment, restarted on the same
//! folder, and checked, over and over.
//!
//! After every restart:
//! - the server opens clean (prints `listening on`, logs `namespace open`,
//!   no WARN or ERROR line) and its boot counter (the top bits of session
//!   ids, ARCHITECTURE.md "Storage") counts every start: the commit of each
//!   start survived the kill that followed it;
//! - every insert covered by an ack (a 69 count, or the 34 of its upsert)
//!   is live in a pull since 0 with its data, unless some client sent a
//!   delete of it (acknowledged or not: an unacknowledged delete may have
//!   been committed);
//! - every delete covered by an ack is not live;
//! - every live atom is one that some client sent, with that data.
//!
//! Writers keep their replica (ids, tombstones, allocator) across cycles,
//! as a real client does, so no id is ever made twice, and start each new
//! session from the sync time of their last 68 or 34.
//!
//! `NOTESYNC_LONG=1` runs 2,000 cycles instead of 100;
//! `NOTESYNC_CRASH_SEED=N` picks another seed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notesync_protocol::{Atom, ClientFrame, DocId, Pid, ServerFrame, Time};
use notesync_tests::{
    Conn, DocModel, Event, Rng, ServerProcess, SessionClient, describe, model_of, upsert_frame,
};
use tokio::sync::Barrier;

const DOC_A: DocId = 0xC4A5_0001;
const DOC_B: DocId = 0xC4A5_0002;
const DOC_C: DocId = 0xC4A5_0003;

/// One op a writer sent.
#[derive(Clone, Debug)]
enum Op {
    Insert(Atom),
    Delete(Pid),
}

/// What a writer reports after its connection died.
struct CycleLog {
    doc: DocId,
    sent: Vec<Op>,
    acked: usize,
    errors: Vec<String>,
}

/// A writer's replica, kept across cycles.
struct Replica {
    label: String,
    replica: u128,
    model: DocModel,
    since: Time,
    session: bool,
    seed: u64,
}

/// Per cycle, each writer sends at most this many ops.
const MAX_OPS_PER_CYCLE: usize = 120;

async fn session_cycle(
    addr: SocketAddr,
    mut r: Replica,
    cycle: u64,
    ready: Arc<Barrier>,
) -> (Replica, CycleLog) {
    let doc = r.model.id;
    let mut conn = Conn::connect(addr).await.with_label(&r.label);
    conn.hello(r.replica).await;
    let model = std::mem::replace(&mut r.model, DocModel::new(doc));
    let mut sc = SessionClient::start_on(conn, model, r.since, r.seed).await;
    sc.strict = false;
    r.since = sc.started.sync_time;
    let mut rng = Rng::new(r.seed ^ (cycle << 20));
    let mut sent = Vec::new();
    let mut errors = Vec::new();
    ready.wait().await;
    let mut dead = false;
    'outer: while sent.len() < MAX_OPS_PER_CYCLE {
        let mut frames = Vec::new();
        for _ in 0..1 + rng.below(8) {
            let n = sc.model.live_len();
            let f = if n > 0 && rng.percent(20) {
                sc.delete_at(rng.below(n))
            } else {
                sc.insert_at(rng.below(n + 1), &rng.word())
            };
            match &f {
                ClientFrame::Insert(i) => sent.push(Op::Insert(i.atom.clone())),
                ClientFrame::Delete(d) => sent.push(Op::Delete(d.pid.clone())),
                _ => unreachable!(),
            }
            frames.push(f);
        }
        sc.sent += frames.len() as u64;
        if sc.conn.try_send_many(frames).await.is_err() {
            dead = true;
            break;
        }
        // At most 40 ops unacknowledged.
        while sc.acked + 40 < sc.sent {
            match sc.conn.next_event().await {
                Event::Frame(ServerFrame::Error(e)) if e.code.closes_connection() => {
                    errors.push(format!("closing error {} {:?}", e.code, e.message));
                    dead = true;
                    break 'outer;
                }
                Event::Frame(f) => sc.handle(f),
                Event::Closed => {
                    dead = true;
                    break 'outer;
                }
                other => panic!("{}: {other:?}", r.label),
            }
        }
    }
    if !dead {
        // Wait for the kill (every ack the server sends before it counts).
        loop {
            match sc.conn.next_event().await {
                Event::Frame(ServerFrame::Error(e)) if e.code.closes_connection() => {
                    errors.push(format!("closing error {} {:?}", e.code, e.message));
                    break;
                }
                Event::Frame(f) => sc.handle(f),
                Event::Closed => break,
                other => panic!("{}: waiting for the kill: {other:?}", r.label),
            }
        }
    }
    for (_, e) in &sc.errors {
        errors.push(format!("error {} {:?}", e.code, e.message));
    }
    let acked = sc.acked as usize;
    r.model = sc.model;
    (
        r,
        CycleLog {
            doc,
            sent,
            acked,
            errors,
        },
    )
}

async fn upsert_cycle(
    addr: SocketAddr,
    mut r: Replica,
    cycle: u64,
    ready: Arc<Barrier>,
) -> (Replica, CycleLog) {
    let doc = r.model.id;
    let mut c = Conn::connect(addr).await.with_label(&r.label);
    c.hello(r.replica).await;
    let (rs, s) = c.pull(doc, r.since).await;
    r.model.apply_responses(&rs);
    r.model.set_site(s.site, r.seed);
    r.since = s.sync_time;
    let mut rng = Rng::new(r.seed ^ (cycle << 20));
    let mut sent = Vec::new();
    let mut errors = Vec::new();
    let mut acked = 0usize;
    // Ends (exclusive) of the upserts in flight, in `sent`.
    let mut in_flight: Vec<usize> = Vec::new();
    ready.wait().await;
    loop {
        if sent.len() < MAX_OPS_PER_CYCLE && in_flight.len() < 2 {
            let mut ins = Vec::new();
            let mut dels = Vec::new();
            for _ in 0..1 + rng.below(6) {
                let n = r.model.live_len();
                if n > 0 && rng.percent(20) {
                    let p = r.model.local_delete(rng.below(n));
                    sent.push(Op::Delete(p.clone()));
                    dels.push(p);
                } else {
                    let a = r.model.local_insert(rng.below(n + 1), &rng.word());
                    sent.push(Op::Insert(a.clone()));
                    ins.push(a);
                }
            }
            // Inserts first, then deletes, as the frame carries them; the
            // order within `sent` does not matter (one 34 acks all).
            if c.try_send(upsert_frame(doc, "crash", r.since, &ins, &dels))
                .await
                .is_err()
            {
                break;
            }
            in_flight.push(sent.len());
            continue;
        }
        match c.next_event().await {
            Event::Frame(ServerFrame::DocResponse(resp)) => r.model.apply_response(&resp),
            Event::Frame(ServerFrame::DocSync { sync_time, .. }) => {
                assert!(!in_flight.is_empty(), "{}: a 34 for nothing", r.label);
                acked = in_flight.remove(0);
                r.since = sync_time;
            }
            Event::Frame(ServerFrame::Error(e)) => {
                errors.push(format!("error {} {:?}", e.code, e.message));
                if e.code.closes_connection() {
                    break;
                }
            }
            Event::Frame(f) => panic!("{}: unexpected {}", r.label, describe(&f)),
            Event::Closed => break,
            other => panic!("{}: {other:?}", r.label),
        }
    }
    (
        r,
        CycleLog {
            doc,
            sent,
            acked,
            errors,
        },
    )
}

#[derive(Default)]
struct Truth {
    /// Every insert sent, acknowledged or not.
    sent_inserts: BTreeMap<(DocId, Pid), String>,
    /// Inserts covered by an ack.
    acked_inserts: BTreeMap<(DocId, Pid), String>,
    /// Every id some client sent a delete of.
    targeted: BTreeSet<(DocId, Pid)>,
    /// Deletes covered by an ack.
    acked_deletes: BTreeSet<(DocId, Pid)>,
}

impl Truth {
    fn record(&mut self, log: &CycleLog) {
        for (i, op) in log.sent.iter().enumerate() {
            match op {
                Op::Insert(a) => {
                    let key = (log.doc, a.pid().clone());
                    let old = self.sent_inserts.insert(key.clone(), a.data().to_owned());
                    assert!(
                        old.is_none(),
                        "a writer made the id {:?} twice (the test's replica is wrong)",
                        a.pid()
                    );
                    if i < log.acked {
                        self.acked_inserts.insert(key, a.data().to_owned());
                    }
                }
                Op::Delete(p) => {
                    let key = (log.doc, p.clone());
                    self.targeted.insert(key.clone());
                    if i < log.acked {
                        self.acked_deletes.insert(key);
                    }
                }
            }
        }
    }

    /// Checks the documents as pulled since 0; returns the ops checked.
    fn check(&self, docs: &BTreeMap<DocId, DocModel>, cycle: u64) -> u64 {
        let mut checked = 0;
        for ((doc, pid), data) in &self.acked_inserts {
            if self.targeted.contains(&(*doc, pid.clone())) {
                continue;
            }
            let m = &docs[doc];
            assert!(
                m.is_live(pid) && m.get(pid).is_some_and(|e| &e.data == data),
                "cycle {cycle}: an acknowledged insert is missing from doc {doc:#x}: {pid:?} {data:?}"
            );
            checked += 1;
        }
        for (doc, pid) in &self.acked_deletes {
            assert!(
                !docs[doc].is_live(pid),
                "cycle {cycle}: an acknowledged delete is undone in doc {doc:#x}: {pid:?}"
            );
            checked += 1;
        }
        for (doc, m) in docs {
            for (pid, data) in m.live() {
                assert_eq!(
                    self.sent_inserts.get(&(*doc, pid.clone())),
                    Some(&data),
                    "cycle {cycle}: doc {doc:#x} holds an atom nobody sent: {pid:?}"
                );
            }
        }
        checked
    }
}

fn check_opened_clean(server: &ServerProcess, cycle: u64) {
    // The server logs before it prints `listening on`, but its stderr is
    // collected by a reader thread that may not have caught up yet: wait
    // (bounded) for the line rather than racing that thread.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut err = server.stderr();
    while !err.contains("namespace open") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        err = server.stderr();
    }
    assert!(
        err.contains("namespace open"),
        "cycle {cycle}: no `namespace open` line:\n{err}"
    );
    for bad in [" WARN", " ERROR"] {
        assert!(
            !err.contains(bad),
            "cycle {cycle}: the restarted server logged{bad}:\n{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_loses_an_acknowledged_op() {
    let long = std::env::var("NOTESYNC_LONG").is_ok_and(|v| v == "1");
    let cycles: u64 = if long { 2000 } else { 100 };
    let seed: u64 = std::env::var("NOTESYNC_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xC4A5);
    eprintln!("crash cycles: {cycles} cycles, seed {seed} (NOTESYNC_CRASH_SEED)");
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut server = ServerProcess::start();

    let mut setup = server.connect().await;
    setup.hello(0x1).await;
    for d in [DOC_A, DOC_B, DOC_C] {
        setup.upsert(d, "crash", 0, &[], &[]).await;
    }
    drop(setup);

    let mk = |label: &str, replica: u128, doc: DocId, session: bool, seed: u64| Replica {
        label: label.to_owned(),
        replica,
        model: DocModel::new(doc),
        since: 0,
        session,
        seed,
    };
    let mut replicas = vec![
        mk("session 0 on A", 0x100, DOC_A, true, 11),
        mk("session 1 on A", 0x101, DOC_A, true, 12),
        mk("session 2 on B", 0x102, DOC_B, true, 13),
        mk("upsert 0 on A", 0x200, DOC_A, false, 21),
        mk("upsert 1 on C", 0x201, DOC_C, false, 22),
    ];
    let mut truth = Truth::default();
    let mut ops_checked = 0u64;
    let mut kills_with_ops_in_flight = 0u64;
    let mut total_sent = 0usize;
    let mut total_acked = 0usize;

    for cycle in 0..cycles {
        let addr = server.addr();
        let ready = Arc::new(Barrier::new(replicas.len() + 1));
        let mut tasks = Vec::new();
        for r in replicas.drain(..) {
            let ready = ready.clone();
            tasks.push(if r.session {
                tokio::spawn(session_cycle(addr, r, cycle, ready))
            } else {
                tokio::spawn(upsert_cycle(addr, r, cycle, ready))
            });
        }
        ready.wait().await;
        // A random moment: right away, or after some of the load.
        let delay = match rng.below(4) {
            0 => 0,
            1 => rng.below(3),
            _ => rng.below(40),
        };
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
        server.kill9();

        let mut in_flight = 0;
        for t in tasks {
            let (r, log) = t.await.expect("writer task");
            assert!(
                log.errors.is_empty(),
                "cycle {cycle}: {} got errors: {:?}",
                r.label,
                log.errors
            );
            in_flight += log.sent.len() - log.acked;
            total_sent += log.sent.len();
            total_acked += log.acked;
            truth.record(&log);
            replicas.push(r);
        }
        if in_flight > 0 {
            kills_with_ops_in_flight += 1;
        }

        server.restart();
        check_opened_clean(&server, cycle);
        let mut reader = server.connect().await;
        let mut docs = BTreeMap::new();
        for d in [DOC_A, DOC_B, DOC_C] {
            let (rs, _) = reader.pull(d, 0).await;
            docs.insert(d, model_of(d, &rs));
        }
        // Boot counter: one start before the loop, one per restart.
        let st = session_id(&server).await;
        assert_eq!(
            st >> 40,
            cycle + 2,
            "cycle {cycle}: the boot counter does not count every start"
        );
        ops_checked += truth.check(&docs, cycle);
    }
    let elapsed = started.elapsed();
    eprintln!(
        "crash cycles: {cycles} kill -9/restart cycles in {elapsed:.1?} ({kills_with_ops_in_flight} \
         with ops in flight); {total_sent} ops sent, {total_acked} acknowledged; \
         {ops_checked} op checks after restarts ({} acknowledged inserts, {} acknowledged deletes \
         at the end)",
        truth.acked_inserts.len(),
        truth.acked_deletes.len()
    );
    assert!(
        truth.acked_inserts.len() > 100 && !truth.acked_deletes.is_empty(),
        "too little was acknowledged to check anything"
    );
    assert!(
        kills_with_ops_in_flight > cycles / 4,
        "too few kills came while ops were in flight: {kills_with_ops_in_flight}"
    );
}

/// Starts a session without hello on a throwaway document; returns its 68's
/// session id.
async fn session_id(server: &ServerProcess) -> u64 {
    let mut c = server.connect().await;
    let (_, started) = c.session_start(0, 0xB007).await;
    started.session_id
}
