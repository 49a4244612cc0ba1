//! Network faults: 1,000 bad peers at once against one server with small
//! timeouts and queues, while honest clients edit the same document.
//!
//! - silent peers (connect, send nothing; half-open from the server's side)
//!   get `timeout` (handshake timeout, 5 s) and are closed;
//! - slowloris peers (a valid hello, 1 byte per 100 ms) get `timeout`: the
//!   whole frame must arrive within the timeout;
//! - peers that cut a frame in the middle get `malformed` when they close
//!   their sending side, or simply vanish (reset);
//! - session peers that never read while an honest session floods their
//!   document are disconnected within a bounded time (`slow_reader` when
//!   their queue overflows, `timeout` when a write makes no progress for
//!   the write timeout, or closed when even the error frame cannot be
//!   written);
//! - the server's peak resident memory (VmHWM) stays bounded; the figure is
//!   printed;
//! - the honest clients (a flooding session, a listening session and an
//!   upserter on the same document) see every op and converge.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use notesync_protocol::{ClientCodec, ClientFrame, DocId, ErrorCode, Hello, Limits, ServerFrame};
use notesync_tests::server::die_with_parent;
use notesync_tests::{Conn, Event, SessionClient, model_of, server_binary};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::FramedRead;

const DOC: DocId = 0xBAD_0001;
const SILENT: usize = 330;
const SLOWLORIS: usize = 330;
const CUTTERS: usize = 320;
const NON_READERS: usize = 20;
/// The flood: rounds of appends of 250 bytes. 8.6 MB in all, more than a
/// loopback socket's send buffer (it grows to 4 MB) and the server's queue
/// (1 MiB) can take, so the server must give up on each non-reader.
const ROUNDS: usize = 32;
const PER_ROUND: usize = 1000;

/// A server child with small limits; killed on drop.
struct SmallServer {
    child: Child,
    addr: std::net::SocketAddr,
    _tmp: tempfile::TempDir,
}

impl Drop for SmallServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> SmallServer {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(server_binary());
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data")
        .arg(tmp.path().join("data"))
        .args(["--handshake-timeout", "5"])
        .args(["--idle-timeout", "3"])
        .args(["--session-idle-timeout", "300"])
        .args(["--write-timeout", "2"])
        .args(["--max-outbound-bytes", "1048576"])
        .args(["--max-connections", "4000"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().expect("spawn the server");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(out);
        let mut line = String::new();
        let mut tx = Some(tx);
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            if let Some(a) = line.trim().strip_prefix("listening on ") {
                if let (Ok(addr), Some(tx)) = (a.parse(), tx.take()) {
                    let _ = tx.send(addr);
                }
            }
            line.clear();
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server prints its address");
    SmallServer {
        child,
        addr,
        _tmp: tmp,
    }
}

/// (VmRSS, VmHWM) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur >= 3000,
        "RLIMIT_NOFILE hard limit {} is too low for 1,000 peers",
        lim.rlim_cur
    );
}

fn encode(f: &ClientFrame) -> Vec<u8> {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    b.to_vec()
}

fn hello(replica: u128) -> Vec<u8> {
    encode(&ClientFrame::Hello(
        Hello::new(replica, Bytes::new()).expect("hello"),
    ))
}

/// Reads until the server closes; returns the first error code seen, if
/// any. Panics if the connection stays open past `limit`.
async fn error_then_close(stream: TcpStream, limit: Duration, what: &str) -> Option<ErrorCode> {
    let mut frames = FramedRead::new(stream, ClientCodec::new(Limits::default()));
    let deadline = Instant::now() + limit;
    let mut code = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, frames.next()).await {
            Err(_) => panic!("{what}: still open after {limit:?}"),
            Ok(None) | Ok(Some(Err(_))) => return code,
            Ok(Some(Ok(ServerFrame::Error(e)))) => {
                code.get_or_insert(e.code);
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

async fn silent(addr: std::net::SocketAddr) -> Option<ErrorCode> {
    let s = TcpStream::connect(addr).await.expect("connect");
    error_then_close(s, Duration::from_secs(20), "silent peer").await
}

async fn slowloris(addr: std::net::SocketAddr, k: usize) -> Option<ErrorCode> {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (rd, mut wr) = s.into_split();
    let bytes = hello(0x5000 + k as u128);
    let reader = tokio::spawn(async move {
        let mut frames = FramedRead::new(rd, ClientCodec::new(Limits::default()));
        let mut code = None;
        loop {
            match tokio::time::timeout(Duration::from_secs(20), frames.next()).await {
                Err(_) => panic!("slowloris {k}: still open after 20 s"),
                Ok(None) | Ok(Some(Err(_))) => return code,
                Ok(Some(Ok(ServerFrame::Error(e)))) => {
                    code.get_or_insert(e.code);
                }
                Ok(Some(Ok(f))) => panic!("slowloris {k}: a reply to a partial hello: {f:?}"),
            }
        }
    });
    for b in bytes.iter().cycle().take(bytes.len() - 1) {
        if reader.is_finished() || wr.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reader.await.expect("slowloris reader")
}

async fn cutter(addr: std::net::SocketAddr, k: usize) -> Option<ErrorCode> {
    let mut c = Conn::connect(addr).await.with_label(format!("cutter {k}"));
    c.hello(0x6000 + k as u128).await;
    let mut m = notesync_tests::DocModel::new(DOC + 1 + k as u128);
    m.set_site(1, k as u64);
    let atoms: Vec<_> = (0..5).map(|i| m.local_append(&format!("cut{i}"))).collect();
    let full = encode(&notesync_tests::upsert_frame(
        DOC + 1 + k as u128,
        "cut",
        0,
        &atoms,
        &[],
    ));
    let cut = 1 + k % (full.len() - 1);
    c.send_raw(&full[..cut]).await;
    if k % 2 == 0 {
        c.shutdown_write().await;
        match c.next_event().await {
            Event::Frame(ServerFrame::Error(e)) => Some(e.code),
            other => panic!("cutter {k}: expected malformed, got {other:?}"),
        }
    } else {
        // Vanish without a word.
        drop(c);
        None
    }
}

/// A session on DOC that never reads. Returns how it ended.
async fn non_reader(
    addr: std::net::SocketAddr,
    k: usize,
    flood_done: Arc<tokio::sync::Notify>,
) -> Option<ErrorCode> {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut s = sock.connect(addr).await.expect("connect");
    let mut out = hello(0x7000 + k as u128);
    out.extend(encode(&ClientFrame::SessionStart { since: 0, doc: DOC }));
    s.write_all(&out).await.expect("write");
    flood_done.notified().await;
    // Now read what is left: the server must have given up on it.
    error_then_close(s, Duration::from_secs(30), &format!("non-reader {k}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_get_their_error_memory_stays_bounded_and_honest_clients_converge() {
    raise_nofile();
    let server = start_server();
    let addr = server.addr;
    let pid = server.child.id();
    let (rss0, _) = memory_kib(pid);

    let mut setup = Conn::connect(addr).await;
    setup.hello(1).await;
    setup.upsert(DOC, "honest", 0, &[], &[]).await;
    drop(setup);

    // Honest: a listening session, then the non-readers, then the flood.
    let mut listener = SessionClient::start(addr, "listener", Some(2), DOC, 0, 2).await;
    let flood_done = Arc::new(tokio::sync::Notify::new());
    let mut non_readers = Vec::new();
    for k in 0..NON_READERS {
        non_readers.push(tokio::spawn(non_reader(addr, k, flood_done.clone())));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Staggered (2 ms apart), so the listen backlog never overflows: a
    // connection the kernel drops from a full backlog never reaches the
    // server, and a silent peer on it would wait for nothing.
    let mut bad = Vec::new();
    for k in 0..SILENT.max(SLOWLORIS).max(CUTTERS) {
        if k < SILENT {
            bad.push(("silent", tokio::spawn(silent(addr))));
        }
        if k < SLOWLORIS {
            bad.push(("slowloris", tokio::spawn(slowloris(addr, k))));
        }
        if k < CUTTERS {
            bad.push(("cutter", tokio::spawn(cutter(addr, k))));
        }
        tokio::time::sleep(Duration::from_millis(6)).await;
    }

    // The flood: a session writing on DOC, while an upserter also writes.
    let mut writer = SessionClient::start(addr, "flooder", Some(3), DOC, 0, 3).await;
    writer.strict = false;
    listener.strict = false;
    // The honest listener reads all the time, in its own task.
    let heard = Arc::new(AtomicUsize::new(0));
    let h = heard.clone();
    let listening = tokio::spawn(async move {
        // (received_ops, not live_len: counting the model is O(n).)
        while (listener.received_ops as usize) < ROUNDS * PER_ROUND + 50 {
            match listener.conn.next_event().await {
                Event::Frame(f) => listener.handle(f),
                other => panic!("listener: {other:?}"),
            }
            h.store(listener.received_ops as usize, Ordering::Relaxed);
        }
        listener
    });
    let upserts = Arc::new(AtomicUsize::new(0));
    let up = upserts.clone();
    let upserter = tokio::spawn(async move {
        let mut c = Conn::connect(addr).await.with_label("upserter");
        c.hello(4).await;
        let (_, s) = c.pull(DOC, 0).await;
        let mut m = notesync_tests::DocModel::new(DOC);
        m.set_site(s.site, 4);
        let mut since = s.sync_time;
        for i in 0..50 {
            let a = m.local_append(&format!("[u{i}]"));
            let (rs, s) = c.upsert(DOC, "honest", since, &[a], &[]).await;
            m.apply_responses(&rs);
            since = s.sync_time;
            up.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let payload = "x".repeat(250);
    for _ in 0..ROUNDS {
        let mut frames = Vec::new();
        for _ in 0..PER_ROUND {
            let atom = writer.model.local_append(&payload);
            writer.own_ids.insert(atom.pid().clone());
            frames.push(ClientFrame::Insert(notesync_protocol::SessionInsert::new(
                atom,
            )));
        }
        writer.send_ops(frames).await;
        // Keep reading (acks and the upserter's ops) as we go.
        writer.pump_until("acks", |s| s.acked + 200 >= s.sent).await;
        // An honest reader reads as fast as it can; a debug-build one is
        // slower than the server, so the flood waits for it (bounded).
        let deadline = Instant::now() + Duration::from_secs(60);
        while heard.load(Ordering::Relaxed) + 2 * PER_ROUND < writer.sent as usize {
            assert!(
                Instant::now() < deadline,
                "the listener fell behind for 60 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    writer.wait_acked().await;
    upserter.await.expect("upserter");
    let (_, hwm_loaded) = memory_kib(pid);
    flood_done.notify_waiters();

    let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
    for (kind, t) in bad {
        let code = t.await.expect("bad peer task");
        let expected = match kind {
            "silent" | "slowloris" => matches!(code, Some(ErrorCode::TIMEOUT)),
            _ => matches!(code, Some(ErrorCode::MALFORMED) | None),
        };
        assert!(expected, "a {kind} peer ended with {code:?}");
        *outcomes
            .entry(format!("{kind}: {}", code.map_or("closed", |c| c.name())))
            .or_default() += 1;
    }
    for t in non_readers {
        let code = t.await.expect("non-reader task");
        assert!(
            matches!(
                code,
                Some(ErrorCode::SLOW_READER) | Some(ErrorCode::TIMEOUT) | None
            ),
            "a non-reader ended with {code:?}"
        );
        *outcomes
            .entry(format!(
                "non-reader: {}",
                code.map_or("closed", |c| c.name())
            ))
            .or_default() += 1;
    }

    // The honest clients converge on one text with every op.
    let mut reader = Conn::connect(addr).await;
    let (rs, _) = reader.pull(DOC, 0).await;
    let want = model_of(DOC, &rs);
    assert_eq!(
        want.live_len(),
        ROUNDS * PER_ROUND + 50,
        "every honest op is stored (the session's inserts and 50 upserts)"
    );
    let text = want.text();
    writer
        .pump_until("the upserter's ops", |s| s.model.text() == text)
        .await;
    let listener = listening.await.expect("listener");
    assert_eq!(listener.model.text(), text, "the listener has every op");
    let (rss_end, hwm) = memory_kib(pid);
    eprintln!(
        "network faults: {} bad peers ({outcomes:?}); server VmRSS {rss0} KiB at start, \
         peak (VmHWM) {hwm_loaded} KiB with the peers and the flood, {hwm} KiB peak at end, \
         {rss_end} KiB now",
        SILENT + SLOWLORIS + CUTTERS + NON_READERS
    );
    assert!(
        hwm < 512 * 1024,
        "the server's peak RSS {hwm} KiB is not bounded by its limits"
    );
    assert_eq!(upserts.load(Ordering::Relaxed), 50);
}

// ---------------------------------------------------------------- server fuzz corpus

#[path = "../src/server_fuzz.rs"]
mod server_fuzz;

fn server_corpus() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/server_frames")
}

/// Replays the `server_frames` fuzz corpus against the real server binary,
/// through the same function the fuzz target calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_frames_fuzz_corpus_replays() {
    let server = notesync_tests::ServerProcess::start();
    let addr = server.addr();
    let mut files: Vec<_> = std::fs::read_dir(server_corpus())
        .expect("fuzz/corpus/server_frames")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "only {} corpus files", files.len());
    let n = files.len();
    tokio::task::spawn_blocking(move || {
        for f in &files {
            let data = std::fs::read(f).expect("read");
            if let Err(e) =
                std::panic::catch_unwind(|| server_fuzz::server_frames_target(addr, &data))
            {
                panic!("{}: {:?}", f.display(), e.downcast_ref::<String>());
            }
        }
    })
    .await
    .expect("replay");
    eprintln!("server_frames corpus: {n} inputs replayed");
}

/// A 4 of site 1 on document 0xF0_0004: a run, an atom, a range.
fn runs_upsert() -> ClientFrame {
    use notesync_protocol::{ItemListBuilder, Level, Pid, RangeListBuilder, UpsertRuns};
    let p = |i| Pid::from_levels(&[Level::new(i, 1)]);
    let mut items = ItemListBuilder::new();
    items.push_run(&p(100), "runs é").expect("run");
    items.push_atom("atom", &p(200)).expect("atom");
    let mut ranges = RangeListBuilder::new();
    ranges.push(&p(101), 2).expect("range");
    ClientFrame::UpsertRuns(UpsertRuns {
        doc: 0xF0_0004,
        name: notesync_tests::name_of("runs"),
        since: 0,
        inserts: items.finish(),
        deletes: ranges.finish(),
    })
}

/// A session's 70 and 71 (site 1).
fn session_runs() -> Vec<ClientFrame> {
    use notesync_protocol::{IdRange, Level, Pid, Run, SessionDeleteRange, SessionInsertRun};
    let first = Pid::from_levels(&[Level::new(1000, 1)]);
    vec![
        ClientFrame::InsertRun(SessionInsertRun::new(
            Run::new(first.clone(), "typed").expect("run"),
        )),
        ClientFrame::DeleteRange(SessionDeleteRange {
            site: 1,
            range: IdRange::new(first, 3).expect("range"),
        }),
    ]
}

/// Writes seeds for the `server_frames` fuzz target:
/// `cargo test -p notesync-tests --test network_faults -- --ignored write_server_frames_seeds`.
#[test]
#[ignore]
fn write_server_frames_seeds() {
    use notesync_tests::{DocModel, name_of, upsert_frame};
    let dir = server_corpus();
    std::fs::create_dir_all(&dir).expect("mkdir");
    let enc = |frames: &[ClientFrame]| {
        let mut b = Vec::new();
        for f in frames {
            b.extend(encode(f));
        }
        b
    };
    let mut m = DocModel::new(0xF0_0001);
    m.set_site(1, 1);
    let atoms: Vec<_> = (0..4).map(|i| m.local_append(&format!("é{i}"))).collect();
    let seeds: Vec<(&str, u8, Vec<u8>)> = vec![
        ("empty", 0, vec![]),
        ("hello-only", 1, vec![]),
        ("synclist", 1, enc(&[ClientFrame::Synclist { since: 0 }])),
        (
            "pull",
            1,
            enc(&[ClientFrame::Pull {
                doc: 0xF0_0001,
                since: 0,
            }]),
        ),
        (
            "upsert",
            1,
            enc(&[upsert_frame(
                0xF0_0001,
                "n",
                0,
                &atoms,
                &[atoms[1].pid().clone()],
            )]),
        ),
        (
            "upsert-pipelined",
            1,
            enc(&[
                upsert_frame(0xF0_0002, "a", 0, &atoms[..2], &[]),
                ClientFrame::Synclist { since: 0 },
                ClientFrame::Pull {
                    doc: 0xF0_0002,
                    since: 0,
                },
            ]),
        ),
        (
            "session-ops",
            3,
            enc(&[
                ClientFrame::Insert(notesync_protocol::SessionInsert::new(atoms[0].clone())),
                ClientFrame::Delete(notesync_protocol::SessionDelete {
                    site: 1,
                    pid: atoms[0].pid().clone(),
                }),
                ClientFrame::Rename(name_of("renamed")),
            ]),
        ),
        (
            "session-no-hello",
            2,
            enc(&[ClientFrame::Rename(name_of("x"))]),
        ),
        ("wrong-mode", 3, enc(&[ClientFrame::Synclist { since: 0 }])),
        ("garbage", 0, vec![0xFF, 0x00, 0x41]),
        ("partial-upsert", 1, {
            let b = enc(&[upsert_frame(0xF0_0003, "p", 0, &atoms, &[])]);
            b[..b.len() / 2].to_vec()
        }),
        ("second-hello", 1, hello(9)),
        // Version 3: a 4 with a run and a range, a session's 70 and 71,
        // and the same frames after a version 2 hello (unknown_frame).
        ("upsert-runs", 1, enc(&[runs_upsert()])),
        ("session-runs", 3, enc(&session_runs())),
        ("upsert-runs-v2", 5, enc(&[runs_upsert()])),
        ("session-runs-v2", 7, enc(&session_runs())),
        // Version 4 (bit 3): a 5 alone; a 5 then pulls and an upsert (their
        // replies between the feed's frames); a second 5 (invalid_request,
        // the feed goes on); a 5 from u64::MAX (nothing is after it); and
        // a 5 after a version 3 hello (unknown_frame), and in a version 4
        // session (wrong_mode).
        (
            "feed-subscribe",
            9,
            enc(&[ClientFrame::Subscribe { since: 0 }]),
        ),
        (
            "feed-then-pulls",
            9,
            enc(&[
                ClientFrame::Subscribe { since: 0 },
                upsert_frame(0xF0_0005, "fed", 0, &atoms[..2], &[]),
                ClientFrame::Pull {
                    doc: 0xF0_0005,
                    since: 0,
                },
                ClientFrame::Pull {
                    doc: 0xF0_0001,
                    since: 0,
                },
                ClientFrame::Synclist { since: 0 },
            ]),
        ),
        (
            "feed-second-subscribe",
            9,
            enc(&[
                ClientFrame::Subscribe { since: 0 },
                ClientFrame::Synclist { since: 0 },
                ClientFrame::Subscribe { since: 1 },
            ]),
        ),
        (
            "feed-huge-since",
            9,
            enc(&[ClientFrame::Subscribe { since: u64::MAX }]),
        ),
        ("feed-v3", 1, enc(&[ClientFrame::Subscribe { since: 0 }])),
        (
            "feed-in-session",
            11,
            enc(&[ClientFrame::Subscribe { since: 0 }]),
        ),
    ];
    for (i, (name, flags, body)) in seeds.into_iter().enumerate() {
        // Pieces: one write, or 1..7-byte writes.
        let mut data = vec![flags, 1, 1, if i % 2 == 0 { 0 } else { 3 }];
        if i % 2 == 1 {
            data.extend_from_slice(&[0, 2, 6]);
        }
        data.extend(body);
        std::fs::write(dir.join(format!("seed-{name}")), data).expect("write");
    }
}
