//! A deterministic convergence simulation against the real server.
//!
//! The server is an in-process `notesync_server::Server` with its real
//! redb store in a temporary folder, spoken to over real TCP. The replicas
//! are built from the SDK's own parts (`notesync_client::Doc` for the text
//! and its ids, `notesync_protocol::Allocator`, the op log `oplog::Pending`
//! with its cancel, coalesce, mark-sent and acknowledge rules, the log
//! file's record encoding for client restarts, and the catch-up rule of
//! PROTOCOL.md 3.2.1 as `client.rs`/`store/remote.rs` apply it). Some replicas
//! sync offline-style (upserts, PROTOCOL.md 3.1), others edit through live
//! sessions (64/65/66, 68, 69 acks, broadcasts, 3.2), and replicas switch
//! between the two.
//!
//! Faults, all chosen by the seed: requests of different replicas reach
//! the server in a shuffled order; a request is processed twice (a re-send
//! whose first reply was lost); replies are lost (cut connections);
//! replicas go offline for a while; a session is cut before its ops are
//! sent, or after the server stored them but before the acks were read
//! (so they are re-sent on the next session); clients restart from their
//! persisted parts and encoded op log; the server restarts, gracefully
//! (shutdown, then bind again on the same folder; every open connection
//! must get its unread broadcasts, `shutting_down`, then the close) or
//! abruptly (its tokio runtime is dropped with connections open, no
//! shutdown, then bind again), sometimes right after a replica wrote ops to
//! its socket (stored or not, by the race; unacknowledged either way).
//!
//! Determinism: every network action is carried out to its end before the
//! next one starts (a request "in flight" is one not yet written to the
//! socket; a "lost" reply is read and thrown away), and a session reads its
//! socket only up to the ack of a probe (a 66 delete of an id that is
//! already a tombstone: acknowledged, never broadcast), which comes after
//! every broadcast of everything already acknowledged. So what each replica
//! sees, and so every decision, depends only on the seed (the server's
//! times differ from run to run; their order does not). The one race, ops
//! on the wire at an abrupt restart, is made harmless to that: the replica
//! re-sends them before anyone else acts, so everyone sees the same either
//! way (only the trace's counts may differ).
//!
//! Each seed runs random edits and faults, then heals the network and syncs
//! until quiet, and checks, against the server's own answers (independent
//! of the SDK's `Doc`):
//! - every replica has the same text, equal to the text of a fresh full
//!   pull rendered per PROTOCOL.md 1.2 (live atoms, chars at virtual ids),
//!   both with sessions still live and after every replica reconnects;
//! - every acknowledged insert is on the server with its data (live, or
//!   deleted by a delete some replica sent), every acknowledged delete is a
//!   tombstone there, and the server holds no insert or delete nobody sent;
//! - no id is ever sent with two different data, nor at a reserved virtual
//!   id of a multi-char atom; no request or session op is ever refused.
//!
//! The ack rule of 3.2.1 as `client.rs` applies it: a session's ack of an
//! insert puts it in the 3.2.1 set only if no catch-up showed it already
//! stored (a re-send after lost acks is stored before the new cursor, and
//! the next catch-up would delete it locally). The SDK put every
//! acknowledged insert there until this simulation found seeds 2 and 11;
//! `NOTESYNC_SIM_SDK_ACK_RULE=1` simulates that old rule (they diverge).
//!
//! A failing seed is printed; add it to `REGRESSION_SEEDS`.
//! `NOTESYNC_LONG=1` runs 100,000 seeds instead of 500;
//! `NOTESYNC_SIM_SEEDS=N` runs N seeds (from `NOTESYNC_SIM_FIRST`, default
//! 0); `NOTESYNC_SIM_SEED=N` runs one;
//! `NOTESYNC_SIM_TRACE=1` prints what sessions send and what catch-ups
//! delete.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use notesync_client::doc::virtual_id;
use notesync_client::oplog::{OpKey, Pending, PendingOp, decode_records, encode_records};
use notesync_client::{Doc, LocalOp};
use notesync_protocol::{
    Allocator, Atom, ClientFrame, DocId, DocName, DocResponse, ErrorCode, Level, Pid, ServerFrame,
    SessionDelete, SessionInsert,
};
use notesync_server::{Config, Server};
use notesync_tests::{Conn, Event, Rng, describe, upsert_frame};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// Seeds that failed once; each runs in every normal run.
/// - 2: with the SDK's session-ack rule (`NOTESYNC_SIM_SDK_ACK_RULE=1`),
///   replica 0 re-sends in a session seven inserts the server stored before
///   that session's cursor (their acks were never read), puts them in
///   `live_since` on the acks, and deletes them locally at its next
///   catch-up: its text diverges from the server's.
/// - 11: the same, shortest: replica 0's session sends two inserts and three
///   deletes, the acks are lost; the next session's 33 shows the inserts
///   stored, they are re-sent and acked; the session after deletes both
///   locally.
const REGRESSION_SEEDS: &[u64] = &[2, 11];

/// Seeds served by one server data folder before a fresh one is made.
const SEEDS_PER_FOLDER: u64 = 1000;

/// The document of the `nth` seed this process runs (distinct even when a
/// seed runs twice on one server).
fn doc_of(seed: u64, nth: u64) -> DocId {
    (0x51D0_u128 << 112) | ((nth as u128) << 64) | seed as u128
}

/// The probe id: made a tombstone when the document is created, so a
/// session's delete of it is acknowledged and never broadcast.
fn probe() -> Pid {
    Pid::from_levels(&[Level::new(u32::MAX, 255)])
}

// ---------------------------------------------------------------- server

/// The real server, in process, on its own runtime (so it can be dropped
/// without a shutdown).
struct LiveServer {
    dir: tempfile::TempDir,
    rt: Option<Runtime>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), notesync_server::Error>>>,
    addr: SocketAddr,
}

impl LiveServer {
    fn start() -> LiveServer {
        // tmpfs when there is one: fsyncs are real calls but cheap there.
        let mut b = tempfile::Builder::new();
        b.prefix("notesync-sim-");
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            b.tempdir_in("/dev/shm")
        } else {
            b.tempdir()
        }
        .expect("temp dir");
        let mut s = LiveServer {
            dir,
            rt: None,
            cancel: CancellationToken::new(),
            task: None,
            addr: "127.0.0.1:0".parse().expect("addr"),
        };
        s.boot();
        s
    }

    fn boot(&mut self) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("server runtime");
        // After an abrupt stop the writer thread lets go of the database a
        // moment later (when it sees its channel closed).
        let deadline = Instant::now() + Duration::from_secs(10);
        let server = loop {
            let config = Config::new(self.dir.path()).listen("127.0.0.1:0");
            match rt.block_on(Server::bind(config)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("the server does not start again: {e}"),
            }
        };
        self.addr = server.local_addr();
        self.cancel = CancellationToken::new();
        self.task = Some(rt.spawn(server.run(self.cancel.clone())));
        self.rt = Some(rt);
    }

    /// Graceful: shutdown (connections may still be open), then bind again.
    /// The caller may have cancelled already, to see the connections close.
    fn restart(&mut self) {
        self.cancel.cancel();
        let rt = self.rt.take().expect("running");
        let task = self.task.take().expect("running");
        match rt.block_on(task) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the server's shutdown failed: {e}"),
            Err(e) => panic!("the server's task failed: {e}"),
        }
        drop(rt);
        self.boot();
    }

    /// Abrupt: the runtime is dropped with every connection open and no
    /// shutdown; only what the writer committed survives.
    fn kill_and_restart(&mut self) {
        self.task = None;
        let rt = self.rt.take().expect("running");
        rt.shutdown_background();
        self.boot();
    }
}

impl Drop for LiveServer {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let (Some(rt), Some(task)) = (self.rt.take(), self.task.take()) {
            let _ = rt.block_on(task);
        }
    }
}

async fn connect(addr: SocketAddr, replica: u128, label: &str) -> Conn {
    let mut c = Conn::connect(addr).await.with_label(label);
    c.hello(replica).await;
    c
}

// ---------------------------------------------------------------- replica

struct Sess {
    conn: Conn,
    site: u8,
    /// Pending ops up to this sequence number were sent on this session.
    sent_upto: u64,
    /// Sent, not yet acknowledged: an op, or the probe (`None`).
    inflight: VecDeque<Option<OpKey>>,
    sent: u64,
    acked: u64,
}

struct Replica {
    id: u128,
    site: u8,
    doc: Doc,
    alloc: Allocator,
    pending: Pending,
    since: u64,
    /// Ids that entered after `since` (live, or own inserts acknowledged in
    /// a session): PROTOCOL.md 3.2.1.
    live_since: BTreeSet<Pid>,
    /// Pending inserts a catch-up showed stored (as an insert or a
    /// delete): stored before the cursor, so their ack must not put them
    /// in `live_since` (see `sdk_ack_rule`).
    stored_before: BTreeSet<Pid>,
    online: bool,
    offline_for: usize,
    /// Edits through a live session (else offline-style upserts).
    session_mode: bool,
    epoch: u64,
    /// The sync-mode connection of this epoch.
    conn: Option<Conn>,
    /// An upsert of this epoch not yet answered.
    in_flight: bool,
    replies: VecDeque<Reply>,
    sess: Option<Sess>,
}

#[derive(Clone, Debug)]
struct Request {
    replica: usize,
    epoch: u64,
    since: u64,
    inserts: Vec<Atom>,
    deletes: Vec<Pid>,
    /// The reply goes nowhere (a copy processed twice after a lost reply).
    reply_lost: bool,
}

#[derive(Debug)]
struct Reply {
    inserts: Vec<(Pid, String)>,
    deletes: Vec<Pid>,
    sync_time: u64,
    acked_inserts: Vec<Pid>,
    acked_deletes: Vec<Pid>,
}

fn parts_of(rs: &[DocResponse]) -> (Vec<(Pid, String)>, Vec<Pid>) {
    let mut ins = Vec::new();
    let mut del = Vec::new();
    for r in rs {
        ins.extend(
            r.inserts
                .iter()
                .map(|a| (a.pid.to_pid(), a.data.to_owned())),
        );
        del.extend(r.deletes.iter().map(|p| p.to_pid()));
    }
    (ins, del)
}

impl Replica {
    fn record(&mut self, ops: Vec<LocalOp>) {
        let live = self.sess.is_some();
        let rec = self.pending.record(ops, live);
        for p in &rec.forget {
            self.doc.forget(p);
        }
    }

    /// A catch-up (all 33s up to a 34 or 68): apply, then the 3.2.1 rule.
    /// Returns the ids the 3.2.1 rule deleted.
    fn catch_up(&mut self, inserts: &[(Pid, String)], deletes: &[Pid], sync_time: u64) -> Vec<Pid> {
        let mut inserted = HashSet::new();
        for (p, d) in inserts {
            self.doc.apply_insert(d, p);
            inserted.insert(p.clone());
            if self.pending.has_insert(p) {
                self.stored_before.insert(p.clone());
            }
        }
        for p in deletes {
            self.doc.apply_delete(p);
            if self.pending.has_insert(p) {
                self.stored_before.insert(p.clone());
            }
        }
        let mut gone = Vec::new();
        for p in std::mem::take(&mut self.live_since) {
            if !inserted.contains(&p) && !self.pending.has_insert(&p) {
                self.doc.apply_delete(&p);
                gone.push(p);
            }
        }
        self.since = self.since.max(sync_time);
        gone
    }

    /// A client restart: the document from its persisted parts, the op
    /// log from its encoded records (as the SDK's store reloads them).
    fn restart(&mut self, seed: u64, doc_id: DocId, n: u64) {
        let (atoms, deleted) = self.doc.to_parts();
        self.pending.structure_saved();
        let records = self.pending.to_records();
        let bytes = encode_records(&records);
        let (decoded, used) = decode_records(&bytes);
        assert_eq!(used, bytes.len(), "seed {seed}: the whole log decodes");
        assert_eq!(decoded, records, "seed {seed}: log records round-trip");
        let text = self.doc.text();
        let mut doc = Doc::from_parts(doc_id, self.doc.name.clone(), atoms, deleted);
        let mut pending = Pending::default();
        for r in &decoded {
            if let Some(p) = pending.replay(r) {
                doc.forget(&p);
            }
        }
        assert_eq!(
            doc.text(),
            text,
            "seed {seed}: a client restart keeps the text"
        );
        assert_eq!(
            pending.snapshot(),
            self.pending.snapshot(),
            "seed {seed}: a client restart keeps the pending ops"
        );
        self.doc = doc;
        self.pending = pending;
        self.alloc = Allocator::new(self.site, doc_id, seed ^ n).expect("site");
    }
}

// ---------------------------------------------------------------- world

#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    edits: u64,
    requests: u64,
    duplicates: u64,
    lost_replies: u64,
    session_starts: u64,
    session_ops: u64,
    broadcasts: u64,
    acks_lost: u64,
    mode_switches: u64,
    server_restarts: u64,
    server_kills: u64,
    killed_mid_send: u64,
    client_restarts: u64,
}

impl Stats {
    fn add(&mut self, s: &Stats) {
        self.edits += s.edits;
        self.requests += s.requests;
        self.duplicates += s.duplicates;
        self.lost_replies += s.lost_replies;
        self.session_starts += s.session_starts;
        self.session_ops += s.session_ops;
        self.broadcasts += s.broadcasts;
        self.acks_lost += s.acks_lost;
        self.mode_switches += s.mode_switches;
        self.server_restarts += s.server_restarts;
        self.server_kills += s.server_kills;
        self.killed_mid_send += s.killed_mid_send;
        self.client_restarts += s.client_restarts;
    }
}

const PIECES: &[&str] = &["a", "b", "é", "日", "🙂", " ", "\n", "xy", "ß"];

struct World<'a> {
    seed: u64,
    doc_id: DocId,
    rng: Rng,
    io: &'a Runtime,
    server: &'a mut LiveServer,
    inbox: Vec<Request>,
    replicas: Vec<Replica>,
    /// Every id ever sent, with its data.
    sent_ids: BTreeMap<Pid, String>,
    /// Every id ever sent in a delete.
    sent_deletes: BTreeSet<Pid>,
    /// Acknowledged inserts, with how they were acknowledged.
    acked_inserts: BTreeMap<Pid, String>,
    acked_deletes: BTreeSet<Pid>,
    stats: Stats,
    /// The SDK's rule (`client.rs`): every insert acknowledged in a
    /// session goes into `live_since`, also a re-send of one stored before
    /// the session's cursor; the next catch-up then deletes it locally.
    sdk_ack_rule: bool,
    /// `NOTESYNC_SIM_TRACE=1`: print what happens to sessions and catch-ups.
    trace: bool,
    /// Run integrity (PROTOCOL.md 1.4): every insert is a run; the run of
    /// each id, and the runs whose chars were next to the cursor when a
    /// run was typed.
    run_of: BTreeMap<Pid, usize>,
    touched: Vec<HashSet<usize>>,
}

impl<'a> World<'a> {
    fn new(seed: u64, nth: u64, io: &'a Runtime, server: &'a mut LiveServer) -> World<'a> {
        let mut rng = Rng::new(seed);
        let doc_id = doc_of(seed, nth);
        let n = 2 + rng.below(4);
        let addr = server.addr;
        let mut replicas = Vec::new();
        for i in 0..n {
            let id = 0x1000 + i as u128;
            // The document is created, the probe made a tombstone and the
            // site allocated by each replica's first (empty) upsert.
            let (rs, ds) = io.block_on(async {
                let mut c = connect(addr, id, &format!("seed {seed} replica {i} setup")).await;
                c.upsert(doc_id, "", 0, &[], &[probe()]).await
            });
            assert_eq!(ds.site as usize, i + 1, "seed {seed}: sites in order");
            let mut r = Replica {
                id,
                site: ds.site,
                doc: Doc::new(doc_id, DocName::default()),
                alloc: Allocator::new(ds.site, doc_id, seed ^ i as u64).expect("site"),
                pending: Pending::default(),
                since: 0,
                live_since: BTreeSet::new(),
                stored_before: BTreeSet::new(),
                online: true,
                offline_for: 0,
                session_mode: rng.percent(50),
                epoch: 0,
                conn: None,
                in_flight: false,
                replies: VecDeque::new(),
                sess: None,
            };
            let (ins, del) = parts_of(&rs);
            r.catch_up(&ins, &del, ds.sync_time);
            replicas.push(r);
        }
        let mut sent_deletes = BTreeSet::new();
        sent_deletes.insert(probe());
        World {
            seed,
            doc_id,
            rng,
            io,
            server,
            inbox: Vec::new(),
            replicas,
            sent_ids: BTreeMap::new(),
            sent_deletes,
            acked_inserts: BTreeMap::new(),
            acked_deletes: BTreeSet::new(),
            stats: Stats::default(),
            sdk_ack_rule: std::env::var("NOTESYNC_SIM_SDK_ACK_RULE").is_ok_and(|v| v == "1"),
            trace: std::env::var("NOTESYNC_SIM_TRACE").is_ok_and(|v| v == "1"),
            run_of: BTreeMap::new(),
            touched: Vec::new(),
        }
    }

    fn text_of(&mut self) -> String {
        let mut s = String::new();
        let len = if self.rng.percent(12) {
            // A paste: sometimes over 255 bytes, so several atoms.
            3 + self.rng.below(140)
        } else {
            1 + self.rng.below(2)
        };
        for _ in 0..len {
            s.push_str(PIECES[self.rng.below(PIECES.len())]);
        }
        s
    }

    fn edit(&mut self, i: usize) {
        self.stats.edits += 1;
        let len = self.replicas[i].doc.len_chars();
        let ops = if len > 0 && self.rng.percent(35) {
            let start = self.rng.below(len);
            let most = if self.rng.percent(10) { 40 } else { 4 };
            let n = 1 + self.rng.below((len - start).min(most));
            let r = &mut self.replicas[i];
            r.doc
                .delete(&mut r.alloc, start..start + n)
                .expect("delete within the text")
        } else {
            let text = self.text_of();
            let at = self.rng.below(len + 1);
            let run = self.touched.len();
            let doc = &self.replicas[i].doc;
            let near: HashSet<usize> = [
                at.checked_sub(1).and_then(|k| doc.char_id(k)),
                doc.char_id(at),
            ]
            .into_iter()
            .flatten()
            .filter_map(|p| self.run_of.get(&p).copied())
            .collect();
            if self.trace {
                println!("run {run}: replica {i} inserts {text:?} at {at} (next to runs {near:?})");
            }
            self.touched.push(near);
            let r = &mut self.replicas[i];
            let ops = r.doc.insert(&mut r.alloc, at, &text).expect("insert");
            for op in &ops {
                if let LocalOp::Insert(a) = op {
                    self.run_of.insert(a.pid().clone(), run);
                }
            }
            ops
        };
        self.replicas[i].record(ops);
    }

    /// Checks ids about to leave replica `i` and remembers them.
    fn note_sent(&mut self, i: usize, inserts: &[Atom], deletes: &[Pid]) {
        let seed = self.seed;
        for a in inserts {
            assert_eq!(
                a.pid().creator(),
                self.replicas[i].site,
                "seed {seed}: replica {i} sends an id of another site: {:?}",
                a.pid()
            );
            if let Some(old) = self.sent_ids.insert(a.pid().clone(), a.data().to_owned()) {
                assert_eq!(
                    old,
                    a.data(),
                    "seed {seed}: replica {i} sent id {:?} with two data",
                    a.pid()
                );
            }
            // A reserved virtual id sent as an atom would shadow text.
            let levels: Vec<_> = a.pid().levels().collect();
            if levels.len() >= 2 {
                let parent = Pid::from_levels(&levels[..levels.len() - 1]);
                if let Some(pd) = self.sent_ids.get(&parent) {
                    let last = levels[levels.len() - 1];
                    let chars = pd.chars().count();
                    assert!(
                        !(chars >= 2
                            && last.site == parent.creator()
                            && (last.ident as usize) < chars),
                        "seed {seed}: an insert at a reserved virtual id {:?}",
                        a.pid()
                    );
                }
            }
        }
        self.sent_deletes.extend(deletes.iter().cloned());
    }

    // ---- offline-style sync (upserts) ----

    /// The replica sends its pending ops (coalesced first, as the SDK
    /// does) in one upsert; it goes on the wire when processed.
    fn send(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        let Replica {
            doc,
            alloc,
            pending,
            ..
        } = r;
        let (removed, added) = doc
            .coalesce(alloc, |p| pending.is_unsent_insert(p), false)
            .expect("coalesce");
        if !removed.is_empty() {
            pending.swap_coalesced(&removed, &added);
        }

        pending.mark_sent();
        let (inserts, deletes, _) = pending.snapshot();
        r.in_flight = true;
        let req = Request {
            replica: i,
            epoch: r.epoch,
            since: r.since,
            inserts,
            deletes,
            reply_lost: false,
        };
        self.note_sent(i, &req.inserts, &req.deletes);
        self.inbox.push(req);
        self.stats.requests += 1;
        // Coalescing re-makes never-sent chars in order, one char per atom
        // (the op log forgot the deleted ones): each new id takes the run
        // of the char it replaces.
        assert_eq!(
            removed.len(),
            added.len(),
            "seed {}: coalesced chars",
            self.seed
        );
        // (A new id may be one a removed char had: never sent, so free.)
        let runs: Vec<Option<usize>> = removed.iter().map(|p| self.run_of.remove(p)).collect();
        for (run, new) in runs.into_iter().zip(&added) {
            if let Some(run) = run {
                self.run_of.insert(new.pid().clone(), run);
            }
        }
    }

    /// Request `k` reaches the server; its reply is read to the end, and
    /// kept for the replica if its connection still stands.
    fn process(&mut self, k: usize) {
        let seed = self.seed;
        let doc_id = self.doc_id;
        let addr = self.server.addr;
        let req = self.inbox.swap_remove(k);
        let i = req.replica;
        let r = &mut self.replicas[i];
        let to_replica = !req.reply_lost && r.online && r.epoch == req.epoch && r.sess.is_none();
        let frame = upsert_frame(doc_id, "", req.since, &req.inserts, &req.deletes);
        let label = format!("seed {seed} replica {i} epoch {}", req.epoch);
        let reply = self.io.block_on(async {
            let mut own = None;
            let conn = if to_replica {
                if r.conn.is_none() {
                    r.conn = Some(connect(addr, r.id, &label).await);
                }
                r.conn.as_mut().expect("connected")
            } else {
                own.insert(connect(addr, r.id, &label).await)
            };
            conn.send(frame).await;
            conn.recv_doc_reply(doc_id, "upsert").await
        });
        let (rs, ds) = match reply {
            Ok(x) => x,
            Err(e) => panic!(
                "seed {seed}: replica {i}'s upsert refused: {} {}",
                e.code, e.message
            ),
        };
        assert_eq!(ds.site, r.site, "seed {seed}: replica {i}'s site changed");
        if to_replica {
            let (inserts, deletes) = parts_of(&rs);
            r.replies.push_back(Reply {
                inserts,
                deletes,
                sync_time: ds.sync_time,
                acked_inserts: req.inserts.iter().map(|a| a.pid().clone()).collect(),
                acked_deletes: req.deletes.clone(),
            });
        }
    }

    fn deliver(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        let Some(reply) = r.replies.pop_front() else {
            return;
        };
        let gone = r.catch_up(&reply.inserts, &reply.deletes, reply.sync_time);
        if self.trace {
            eprintln!(
                "[{}] replica {i}: upsert reply applied, 3.2.1 deleted {gone:?}",
                self.seed
            );
        }
        r.pending
            .acknowledge(&reply.acked_inserts, &reply.acked_deletes, None);
        for p in &reply.acked_inserts {
            r.stored_before.remove(p);
        }
        r.in_flight = false;
        self.acked_inserts.extend(
            reply
                .acked_inserts
                .iter()
                .map(|p| (p.clone(), format!("upsert of replica {i}"))),
        );
        self.acked_deletes
            .extend(reply.acked_deletes.iter().cloned());
    }

    // ---- live sessions ----

    /// 64 → 33s → 68: a catch-up, as the SDK's session does it.
    fn start_session(&mut self, i: usize) {
        let seed = self.seed;
        let doc_id = self.doc_id;
        let addr = self.server.addr;
        let r = &mut self.replicas[i];
        let label = format!("seed {seed} replica {i} session epoch {}", r.epoch);
        let since = r.since;
        let (conn, rs, started) = self.io.block_on(async {
            let mut c = connect(addr, r.id, &label).await;
            let (rs, started) = c.session_start(since, doc_id).await;
            (c, rs, started)
        });
        assert_eq!(
            started.site, r.site,
            "seed {seed}: replica {i}'s site changed"
        );
        let (ins, del) = parts_of(&rs);
        let gone = r.catch_up(&ins, &del, started.sync_time);
        if self.trace {
            eprintln!(
                "[{seed}] replica {i}: session started (33 with {} inserts, {} deletes), \
                 3.2.1 deleted {gone:?}",
                ins.len(),
                del.len()
            );
        }
        r.sess = Some(Sess {
            conn,
            site: started.site,
            sent_upto: 0,
            inflight: VecDeque::new(),
            sent: 0,
            acked: 0,
        });
        self.stats.session_starts += 1;
    }

    /// The session's ops not yet sent on it, as frames, counted as sent
    /// (marked sent in the op log first, as the SDK does).
    fn session_frames(&mut self, i: usize) -> (Vec<ClientFrame>, Vec<Atom>, Vec<Pid>) {
        let r = &mut self.replicas[i];
        let sess = r.sess.as_mut().expect("session");
        let mut frames = Vec::new();
        let mut ins = Vec::new();
        let mut dels = Vec::new();
        for (seq, op) in r.pending.ops_since(sess.sent_upto) {
            sess.sent_upto = seq;
            match op {
                PendingOp::Insert(a) => {
                    sess.inflight
                        .push_back(Some(OpKey::Insert(a.pid().clone())));
                    ins.push(a.clone());
                    frames.push(ClientFrame::Insert(SessionInsert::new(a)));
                }
                PendingOp::Delete(p) => {
                    sess.inflight.push_back(Some(OpKey::Delete(p.clone())));
                    dels.push(p.clone());
                    frames.push(ClientFrame::Delete(SessionDelete {
                        site: sess.site,
                        pid: p,
                    }));
                }
                PendingOp::Rename(_) => unreachable!("no renames here"),
            }
        }
        if !frames.is_empty() {
            r.pending.mark_sent();
        }
        sess.sent += frames.len() as u64;
        self.stats.session_ops += frames.len() as u64;
        self.note_sent(i, &ins, &dels);
        (frames, ins, dels)
    }

    /// Sends the session's new ops and a probe, then reads up to the
    /// probe's ack (so every broadcast of what is already acknowledged has
    /// arrived). With `ack_lost`, the session is cut after reading: the
    /// broadcasts and deletes are applied, no ack is.
    fn flush(&mut self, i: usize, ack_lost: bool) {
        if self.replicas[i].sess.is_none() {
            self.start_session(i);
        }
        let seed = self.seed;
        let (mut frames, ins, dels) = self.session_frames(i);
        let sess = self.replicas[i].sess.as_mut().expect("session");
        frames.push(ClientFrame::Delete(SessionDelete {
            site: sess.site,
            pid: probe(),
        }));
        sess.inflight.push_back(None);
        sess.sent += 1;

        let r = &mut self.replicas[i];
        let sess = r.sess.as_mut().expect("session");
        let want = sess.sent;
        let got = self.io.block_on(async {
            sess.conn.send_many(frames).await;
            let mut got = Vec::new();
            loop {
                let f = sess.conn.recv().await;
                let done = matches!(f, ServerFrame::SessionAck { count } if count >= want);
                got.push(f);
                if done {
                    return got;
                }
            }
        });
        let mut acked = Vec::new();
        for f in got {
            match f {
                ServerFrame::Insert(b) => {
                    let pid = b.atom.pid().clone();
                    assert_ne!(
                        b.site, sess.site,
                        "seed {seed}: replica {i} got its own insert back"
                    );
                    r.doc.apply_insert(b.atom.data(), &pid);
                    r.live_since.insert(pid);
                    self.stats.broadcasts += 1;
                }
                ServerFrame::Delete(d) => {
                    r.doc.apply_delete(&d.pid);
                    self.stats.broadcasts += 1;
                }
                ServerFrame::SessionAck { count } => {
                    assert!(
                        count >= sess.acked && count <= sess.sent,
                        "seed {seed}: replica {i}: ack {count} after {} with {} sent",
                        sess.acked,
                        sess.sent
                    );
                    while sess.acked < count {
                        sess.acked += 1;
                        acked.push(sess.inflight.pop_front().expect("in flight"));
                    }
                }
                other => panic!(
                    "seed {seed}: replica {i}: unexpected in a session: {}",
                    describe(&other)
                ),
            }
        }
        if self.trace {
            eprintln!(
                "[{seed}] replica {i}: session sent inserts {:?} deletes {:?}{}",
                ins.iter().map(|a| a.pid()).collect::<Vec<_>>(),
                dels,
                if ack_lost { ", acks lost, cut" } else { "" }
            );
        }
        if ack_lost {
            self.stats.acks_lost += 1;
            self.cut(i);
            return;
        }
        for key in acked.into_iter().flatten() {
            r.pending.acknowledge_one(&key, None);
            match key {
                OpKey::Insert(p) => {
                    // Stored after the cursor, unless a catch-up showed it
                    // stored already (a re-send after a lost ack).
                    let before = r.stored_before.remove(&p);
                    if !before || self.sdk_ack_rule {
                        r.live_since.insert(p.clone());
                    }
                    if before && self.trace {
                        eprintln!(
                            "[{seed}] replica {i}: ack of a re-sent insert stored before \
                             the cursor: {p:?} (into live_since: {})",
                            self.sdk_ack_rule
                        );
                    }
                    self.acked_inserts
                        .insert(p, format!("session of replica {i}"));
                }
                OpKey::Delete(p) => {
                    self.acked_deletes.insert(p);
                }
                OpKey::Rename => unreachable!("no renames here"),
            }
        }
    }

    // ---- faults ----

    /// Cuts the replica's connections: a reply not yet delivered is lost; a
    /// request not yet processed may still reach the server.
    fn cut(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        r.epoch += 1;
        r.in_flight = false;
        if !r.replies.is_empty() {
            self.stats.lost_replies += 1;
        }
        r.replies.clear();
        r.conn = None;
        r.sess = None;
    }

    fn step(&mut self) {
        let n = self.replicas.len();
        let i = self.rng.below(n);
        match self.rng.below(200) {
            0..=79 => self.edit(i),
            80..=109 => {
                let r = &self.replicas[i];
                if r.online && r.session_mode {
                    let lost = self.rng.percent(10);
                    self.flush(i, lost);
                } else if r.online && !r.in_flight {
                    self.send(i);
                }
            }
            110..=139 if !self.inbox.is_empty() => {
                let k = self.rng.below(self.inbox.len());
                if self.rng.percent(10) {
                    // The request is processed twice (a re-send after a
                    // lost reply): the first copy's reply is lost.
                    let mut dup = self.inbox[k].clone();
                    dup.reply_lost = true;
                    self.inbox.push(dup);
                    self.stats.duplicates += 1;
                }
                self.process(k);
            }
            140..=169 => {
                if self.replicas[i].session_mode {
                    if self.replicas[i].online && self.replicas[i].sess.is_some() {
                        self.flush(i, false);
                    }
                } else {
                    self.deliver(i);
                }
            }
            170..=179 => {
                self.cut(i);
                if self.rng.percent(50) {
                    self.replicas[i].online = false;
                    self.replicas[i].offline_for = 1 + self.rng.below(40);
                }
            }
            180..=184 => {
                self.cut(i);
                self.replicas[i].session_mode = !self.replicas[i].session_mode;
                self.stats.mode_switches += 1;
            }
            185..=186 => {
                let abrupt = self.rng.percent(50);
                if abrupt && self.replicas[i].online && self.rng.percent(50) {
                    self.kill_mid_send(i);
                } else {
                    self.restart_server(abrupt);
                }
            }
            187..=188 => {
                self.cut(i);
                let nth = self.stats.client_restarts;
                let (seed, doc_id) = (self.seed, self.doc_id);
                self.replicas[i].restart(seed, doc_id, nth);
                self.stats.client_restarts += 1;
            }
            _ => {}
        }
        for r in &mut self.replicas {
            if !r.online {
                r.offline_for = r.offline_for.saturating_sub(1);
                if r.offline_for == 0 {
                    r.online = true;
                }
            }
        }
    }

    /// An abrupt restart while replica `i`'s ops are on the wire: written
    /// to the socket, not answered. Whether the server stored them before
    /// its runtime went is up to the race; the replica re-sends them first
    /// thing after the restart (so what anyone else sees, and so every
    /// decision, is the same either way).
    fn kill_mid_send(&mut self, i: usize) {
        let seed = self.seed;
        let addr = self.server.addr;
        if self.replicas[i].session_mode {
            if self.replicas[i].sess.is_none() {
                self.start_session(i);
            }
            let (frames, _, _) = self.session_frames(i);
            let sess = self.replicas[i].sess.as_mut().expect("session");
            self.io.block_on(sess.conn.send_many(frames));
        } else {
            self.send(i);
            let req = self.inbox.pop().expect("just sent");
            let frame = upsert_frame(self.doc_id, "", req.since, &req.inserts, &req.deletes);
            let r = &mut self.replicas[i];
            let label = format!("seed {seed} replica {i} epoch {}", r.epoch);
            self.io.block_on(async {
                if r.conn.is_none() {
                    r.conn = Some(connect(addr, r.id, &label).await);
                }
                r.conn.as_mut().expect("connected").send(frame).await;
            });
        }
        self.restart_server(true);
        self.stats.killed_mid_send += 1;
        self.sync_one(i);
    }

    /// Requests not yet on the wire are lost, and so is every connection.
    fn restart_server(&mut self, abrupt: bool) {
        self.inbox.clear();
        if abrupt {
            // Connections still open when the runtime goes.
            self.server.kill_and_restart();
            self.stats.server_kills += 1;
        } else {
            // Every open connection is told `shutting_down` and closed;
            // a session gets the broadcasts it has not read first (applied,
            // as a client would).
            self.server.cancel.cancel();
            let seed = self.seed;
            for (i, r) in self.replicas.iter_mut().enumerate() {
                let conns: Vec<(Conn, bool)> = r
                    .conn
                    .take()
                    .map(|c| (c, false))
                    .into_iter()
                    .chain(r.sess.take().map(|s| (s.conn, true)))
                    .collect();
                for (mut c, session) in conns {
                    let got = self.io.block_on(async {
                        let mut got = Vec::new();
                        loop {
                            match c.next_event().await {
                                Event::Closed => return got,
                                Event::Frame(f) => got.push(f),
                                other => {
                                    panic!("seed {seed}: {}: at shutdown: {other:?}", c.label())
                                }
                            }
                        }
                    });
                    let n = got.len();
                    for (k, f) in got.into_iter().enumerate() {
                        match f {
                            ServerFrame::Error(e)
                                if e.code == ErrorCode::SHUTTING_DOWN && k + 1 == n => {}
                            ServerFrame::Insert(b) if session => {
                                let pid = b.atom.pid().clone();
                                r.doc.apply_insert(b.atom.data(), &pid);
                                r.live_since.insert(pid);
                                self.stats.broadcasts += 1;
                            }
                            ServerFrame::Delete(d) if session => {
                                r.doc.apply_delete(&d.pid);
                                self.stats.broadcasts += 1;
                            }
                            other => panic!(
                                "seed {seed}: replica {i}: at shutdown, expected broadcasts, \
                                 shutting_down, the close; got {}",
                                describe(&other)
                            ),
                        }
                    }
                }
            }
            self.server.restart();
            self.stats.server_restarts += 1;
        }
        for j in 0..self.replicas.len() {
            self.cut(j);
        }
    }

    /// One complete exchange for replica `j`: an upsert answered, or a
    /// session flushed to its probe's ack.
    fn sync_one(&mut self, j: usize) {
        if self.replicas[j].session_mode {
            self.flush(j, false);
        } else {
            self.send(j);
            let k = self.inbox.len() - 1;
            self.process(k);
            self.deliver(j);
        }
    }

    /// Heals the network and syncs until every replica has nothing pending,
    /// then checks twice: with sessions still live, and after every replica
    /// reconnects and catches up.
    fn settle_and_check(&mut self) {
        for r in &mut self.replicas {
            r.online = true;
        }
        for j in 0..self.replicas.len() {
            self.cut(j);
        }
        // Requests already on the wire still arrive.
        while !self.inbox.is_empty() {
            self.process(0);
        }
        for round in 0.. {
            assert!(round < 20, "seed {}: no quiet after 20 rounds", self.seed);
            for j in 0..self.replicas.len() {
                self.sync_one(j);
            }
            if self.replicas.iter().all(|r| r.pending.is_empty()) {
                break;
            }
        }
        // After the last change: sessions read their broadcasts, the others
        // pull.
        for j in 0..self.replicas.len() {
            self.sync_one(j);
        }
        self.check("with sessions live");
        for j in 0..self.replicas.len() {
            self.cut(j);
            self.sync_one(j);
        }
        self.check("after reconnecting");
    }

    fn check(&mut self, when: &str) {
        let seed = self.seed;
        let doc_id = self.doc_id;
        let addr = self.server.addr;
        // A fresh full pull, and a session's full catch-up (which also
        // holds the deletes of atoms inserted after its cursor), on
        // connections without hello.
        let label = format!("seed {seed} check");
        let (pulled, started) = self.io.block_on(async {
            let mut c = Conn::connect(addr).await.with_label(&label);
            let (rs, _) = c.pull(doc_id, 0).await;
            let mut c = Conn::connect(addr).await.with_label(&label);
            // Since 1, not 0: every time is later, and the server treats a
            // session since 0 as a pull (no client holds anything then).
            let (ss, _) = c.session_start(1, doc_id).await;
            (parts_of(&rs), parts_of(&ss))
        });
        let (live, pull_deletes) = pulled;
        let (live2, all_deletes) = started;
        let live: BTreeMap<Pid, String> = live.into_iter().collect();
        let live2: BTreeMap<Pid, String> = live2.into_iter().collect();
        assert_eq!(
            live, live2,
            "seed {seed}: a pull since 0 and a session start since 1 disagree on the live atoms"
        );
        let pull_deletes: BTreeSet<Pid> = pull_deletes.into_iter().collect();
        let all_deletes: BTreeSet<Pid> = all_deletes.into_iter().collect();
        assert!(
            pull_deletes.is_subset(&all_deletes),
            "seed {seed}: a pull since 0 has deletes a session start since 1 lacks"
        );
        // The text as PROTOCOL.md 1.2 defines it, from the pull alone.
        let mut chars: BTreeMap<Pid, char> = BTreeMap::new();
        for (p, d) in &live {
            let cs: Vec<char> = d.chars().collect();
            if cs.len() == 1 {
                chars.insert(p.clone(), cs[0]);
            } else {
                for (j, c) in cs.into_iter().enumerate() {
                    let v = virtual_id(p, j);
                    if !pull_deletes.contains(&v) {
                        chars.insert(v, c);
                    }
                }
            }
        }
        let want: String = chars.values().collect();
        for (i, r) in self.replicas.iter().enumerate() {
            assert!(
                r.pending.is_empty(),
                "seed {seed}: replica {i} still has pending ops ({when})"
            );
            assert_eq!(
                r.doc.text(),
                want,
                "seed {seed}: replica {i} (site {}, session mode {}) diverges from the \
                 server's text ({when})",
                r.site,
                r.session_mode
            );
        }
        // Every run's chars are contiguous in the merged text, unless a run
        // typed next to them (or next to such a run, ...) came between.
        let text_runs: Vec<Option<usize>> =
            chars.keys().map(|p| self.run_of.get(p).copied()).collect();
        if let Some((a, b)) = split_run(&text_runs, &self.touched) {
            let span: Vec<String> = chars
                .iter()
                .zip(&text_runs)
                .filter(|(_, r)| **r == Some(a) || **r == Some(b))
                .map(|((p, c), r)| format!("{r:?} {c:?} {p:?}"))
                .collect();
            panic!(
                "seed {seed}: run {a} is split by run {b}, which was typed elsewhere ({when}); \
                 runs typed next to them: {:?}, {:?}; their chars in order:\n{}",
                self.touched[a],
                self.touched[b],
                span.join("\n")
            );
        }
        for (p, d) in &live {
            assert_eq!(
                self.sent_ids.get(p),
                Some(d),
                "seed {seed}: the server has an atom nobody sent: {p:?} {d:?}"
            );
            assert!(
                !all_deletes.contains(p),
                "seed {seed}: an id both live and deleted: {p:?}"
            );
        }
        for p in &all_deletes {
            assert!(
                self.sent_deletes.contains(p),
                "seed {seed}: the server has a delete nobody sent: {p:?}"
            );
        }
        for (p, how) in &self.acked_inserts {
            assert!(
                live.contains_key(p) || all_deletes.contains(p),
                "seed {seed}: an acknowledged insert ({how}) is not on the server: {p:?} {:?} \
                 (a delete of it was sent: {}; it is in a pull's deletes: {})",
                self.sent_ids.get(p),
                self.sent_deletes.contains(p),
                pull_deletes.contains(p)
            );
        }
        for p in &self.acked_deletes {
            assert!(
                all_deletes.contains(p),
                "seed {seed}: an acknowledged delete is not on the server: {p:?}"
            );
        }
    }
}

/// The first run split by another with no chain of "typed next to" to it
/// among the runs with no live char outside its span (those inside it, and
/// those deleted whole: a run typed inside `a` and since deleted still
/// explains text typed next to it; see client-sdk/tests/doc_runs.rs):
/// `None` if every run is whole.
fn split_run(runs: &[Option<usize>], touched: &[HashSet<usize>]) -> Option<(usize, usize)> {
    for a in 0..touched.len() {
        let pos: Vec<usize> = (0..runs.len()).filter(|&i| runs[i] == Some(a)).collect();
        let (Some(&lo), Some(&hi)) = (pos.first(), pos.last()) else {
            continue;
        };
        let inside: HashSet<usize> = runs[lo..=hi]
            .iter()
            .flatten()
            .copied()
            .filter(|&b| b != a)
            .collect();
        let outside: HashSet<usize> = runs[..lo]
            .iter()
            .chain(&runs[hi + 1..])
            .flatten()
            .copied()
            .collect();
        let links: Vec<usize> = (0..touched.len())
            .filter(|r| !outside.contains(r))
            .collect();
        let mut allowed: HashSet<usize> = HashSet::from([a]);
        loop {
            let more: Vec<usize> = links
                .iter()
                .copied()
                .filter(|b| !allowed.contains(b) && touched[*b].iter().any(|t| allowed.contains(t)))
                .collect();
            if more.is_empty() {
                break;
            }
            allowed.extend(more);
        }
        if let Some(&b) = inside.iter().find(|b| !allowed.contains(b)) {
            return Some((a, b));
        }
    }
    None
}

fn run_seed(seed: u64, nth: u64, io: &Runtime, server: &mut LiveServer) -> Stats {
    let mut w = World::new(seed, nth, io, server);
    let steps = 40 + w.rng.below(120);
    for _ in 0..steps {
        w.step();
    }
    w.settle_and_check();
    w.stats
}

fn run_seeds(seeds: impl Iterator<Item = u64>) {
    let started = Instant::now();
    let io = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let mut server: Option<LiveServer> = None;
    let mut total = Stats::default();
    let mut count = 0u64;
    for seed in seeds {
        if count % SEEDS_PER_FOLDER == 0 {
            drop(server.take());
            server = Some(LiveServer::start());
        }
        let srv = server.as_mut().expect("server");
        let s = match std::panic::catch_unwind(AssertUnwindSafe(|| run_seed(seed, count, &io, srv)))
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "simulation: seed {seed} FAILED; rerun it with NOTESYNC_SIM_SEED={seed} and pin it in REGRESSION_SEEDS"
                );
                std::panic::resume_unwind(e);
            }
        };
        count += 1;
        if count % 1000 == 0 {
            eprintln!(
                "simulation: {count} seeds passed ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
        total.add(&s);
    }
    eprintln!(
        "simulation: {count} seeds in {:.1} s, {total:?}",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn replicas_converge_and_keep_every_acknowledged_edit() {
    let var = |k: &str| std::env::var(k).ok().and_then(|s| s.parse::<u64>().ok());
    if let Some(seed) = var("NOTESYNC_SIM_SEED") {
        run_seeds(std::iter::once(seed));
        return;
    }
    let long = std::env::var("NOTESYNC_LONG").is_ok_and(|v| v == "1");
    let n = var("NOTESYNC_SIM_SEEDS").unwrap_or(if long { 100_000 } else { 500 });
    let first = var("NOTESYNC_SIM_FIRST").unwrap_or(0);
    run_seeds(REGRESSION_SEEDS.iter().copied().chain(first..first + n));
}

// ---------------------------------------------------------------- op log fuzz corpus

#[path = "../src/oplog_fuzz.rs"]
mod oplog_fuzz;

/// Replays the op-log fuzz corpus (`fuzz/corpus/oplog/`, target `oplog`)
/// through the same function the fuzz target calls.
#[test]
fn oplog_fuzz_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/oplog");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "only {} corpus files", files.len());
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).expect("read");
        if std::panic::catch_unwind(|| oplog_fuzz::oplog_target(&data)).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(failed.is_empty(), "oplog_target failed on {failed:#?}");
}

/// Writes seed inputs for the `oplog` fuzz target from real logs:
/// `cargo test -p notesync-tests --test simulation -- --ignored write_oplog_seeds`.
#[test]
#[ignore]
fn write_oplog_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/oplog");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let io = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let mut server = LiveServer::start();
    for seed in 0..12u64 {
        let mut w = World::new(seed, seed, &io, &mut server);
        for _ in 0..60 {
            w.step();
        }
        let r = &mut w.replicas[0];
        let mut records = r.pending.to_records();
        records.push(notesync_client::oplog::Record::MarkSent);
        let log = encode_records(&records);
        // As is (flags bit 0), cut at a seed-chosen point.
        let mut data = vec![1, (seed * 37) as u8];
        data.extend_from_slice(&log);
        std::fs::write(dir.join(format!("seed-log-{seed}")), &data).expect("write");
        // As payloads (flags bit 0 clear), for inputs past the checksum.
        let mut data = vec![(seed % 2) as u8 * 2, seed as u8];
        let mut rest = &log[..];
        while rest.len() >= 8 {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            if len > 255 {
                break;
            }
            data.push(len as u8);
            data.extend_from_slice(&rest[4..4 + len]);
            rest = &rest[8 + len..];
        }
        std::fs::write(dir.join(format!("seed-payloads-{seed}")), &data).expect("write");
    }
}
