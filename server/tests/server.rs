//! In-process tests of the whole server over TCP: modes, sync requests,
//! sessions, limits, shutdown and restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use notesync_protocol::{
    Atom, AtomList, ClientCodec, ClientFrame, DocName, ErrorCode, Hello, Level, PROTOCOL_VERSION,
    Pid, PidListBuilder, ServerFrame, SessionDelete, SessionInsert, Time, Upsert,
};
use notesync_server::{Config, Server};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), notesync_server::Error>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("server stops in bounded time")
            .expect("server task");
        r.expect("clean shutdown");
    }
}

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::new(dir).listen("127.0.0.1:0");
    c.handshake_timeout = Duration::from_secs(5);
    c.shutdown_timeout = Duration::from_secs(5);
    c
}

async fn start(config: Config) -> Running {
    let server = Server::bind(config).await.expect("bind");
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    Running {
        addr,
        shutdown,
        task,
    }
}

struct Client {
    io: Framed<TcpStream, ClientCodec>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.expect("connect");
        Client {
            io: Framed::new(s, ClientCodec::default()),
        }
    }

    async fn hello(addr: SocketAddr, replica: u128) -> Self {
        let mut c = Self::connect(addr).await;
        c.send(ClientFrame::Hello(
            Hello::new(replica, Bytes::new()).expect("hello"),
        ))
        .await;
        match c.recv().await {
            // The version of the hello (PROTOCOL.md 6).
            ServerFrame::Welcome { version, .. } if version == PROTOCOL_VERSION => c,
            f => panic!("expected welcome, got {f:?}"),
        }
    }

    async fn send(&mut self, f: ClientFrame) {
        self.io.send(f).await.expect("send");
    }

    async fn recv(&mut self) -> ServerFrame {
        match tokio::time::timeout(WAIT, self.io.next()).await {
            Ok(Some(Ok(f))) => f,
            Ok(other) => panic!("connection ended: {other:?}"),
            Err(_) => panic!("no frame within {WAIT:?}"),
        }
    }

    /// Reads until the connection closes; returns what came.
    async fn recv_until_closed(&mut self) -> Vec<ServerFrame> {
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, self.io.next()).await {
                Ok(Some(Ok(f))) => out.push(f),
                Ok(_) => return out,
                Err(_) => panic!("connection not closed within {WAIT:?}; got {out:?}"),
            }
        }
    }

    async fn expect_error(&mut self, code: ErrorCode) -> String {
        match self.recv().await {
            ServerFrame::Error(e) if e.code == code => e.message,
            f => panic!("expected error {code:?}, got {f:?}"),
        }
    }

    /// Reads 33s up to the 34 (or 68); returns (inserts, deletes, name,
    /// last frame).
    async fn recv_doc(&mut self) -> (Vec<Atom>, Vec<Pid>, String, ServerFrame) {
        let mut ins = Vec::new();
        let mut del = Vec::new();
        let mut name = String::new();
        loop {
            match self.recv().await {
                ServerFrame::DocResponse(r) => {
                    ins.extend(r.inserts.iter().map(|a| a.to_atom()));
                    del.extend(r.deletes.iter().map(|p| p.to_pid()));
                    name = r.name.as_str().to_owned();
                }
                f @ (ServerFrame::DocSync { .. } | ServerFrame::SessionStarted { .. }) => {
                    return (ins, del, name, f);
                }
                f => panic!("expected 33 or 34/68, got {f:?}"),
            }
        }
    }
}

fn pid(ident: u32, site: u8) -> Pid {
    Pid::from_levels(&[Level::new(ident, site)])
}

fn atom(data: &str, ident: u32, site: u8) -> Atom {
    Atom::new(data, pid(ident, site)).expect("atom")
}

fn upsert(
    doc: u128,
    name: &str,
    since: Time,
    inserts: Vec<Atom>,
    deletes: Vec<Pid>,
) -> ClientFrame {
    let mut d = PidListBuilder::new();
    for p in &deletes {
        d.push(p).expect("pid");
    }
    ClientFrame::Upsert(Upsert {
        doc,
        name: DocName::new(name).expect("name"),
        since,
        inserts: inserts.into_iter().collect::<AtomList>(),
        deletes: d.finish(),
    })
}

fn sync_of(f: &ServerFrame) -> (Time, u8) {
    match f {
        ServerFrame::DocSync {
            sync_time, site, ..
        } => (*sync_time, *site),
        ServerFrame::SessionStarted {
            sync_time, site, ..
        } => (*sync_time, *site),
        f => panic!("not a 34/68: {f:?}"),
    }
}

#[tokio::test]
async fn upsert_pull_synclist_and_name_rule() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start(config(dir.path())).await;
    let mut a = Client::hello(srv.addr, 0xA).await;

    // Empty upsert: creates the document, allocates site 1.
    a.send(upsert(7, "notes", 0, vec![], vec![])).await;
    let (ins, del, name, last) = a.recv_doc().await;
    assert!(ins.is_empty() && del.is_empty());
    assert_eq!(name, "notes");
    let (t0, site) = sync_of(&last);
    assert_eq!(site, 1);
    assert!(t0 > 0);

    a.send(upsert(
        7,
        "notes",
        t0,
        vec![atom("hello", 1, 1), atom(" world", 2, 1)],
        vec![],
    ))
    .await;
    let (ins, del, _, last) = a.recv_doc().await;
    assert!(
        ins.is_empty() && del.is_empty(),
        "the reply leaves out what the upsert sent"
    );
    let (t1, _) = sync_of(&last);
    assert!(t1 > t0);

    // Another replica gets site 2 and sees both atoms.
    let mut b = Client::hello(srv.addr, 0xB).await;
    b.send(ClientFrame::Pull { doc: 7, since: 0 }).await;
    let (ins, _, _, last) = b.recv_doc().await;
    assert_eq!(
        ins.iter().map(|a| a.data()).collect::<String>(),
        "hello world"
    );
    assert_eq!(sync_of(&last).1, 2);

    // B renames knowing the current name; A, not knowing, cannot revert it.
    b.send(upsert(7, "renamed", t1, vec![], vec![])).await;
    let (_, _, name, _) = b.recv_doc().await;
    assert_eq!(name, "renamed");
    a.send(upsert(7, "notes", t1, vec![], vec![])).await;
    let (_, _, name, last) = a.recv_doc().await;
    assert_eq!(
        name, "renamed",
        "a client that did not know of a rename never reverts it"
    );
    let (t2, _) = sync_of(&last);

    // synclist: the document, with its latest time, paged.
    a.send(ClientFrame::Synclist { since: 0 }).await;
    match a.recv().await {
        ServerFrame::SynclistResponse(e) => {
            let e: Vec<_> = e.iter().collect();
            assert_eq!(e.len(), 1);
            assert_eq!(e[0].doc, 7);
            assert!(e[0].modified > t1 && e[0].modified <= t2);
        }
        f => panic!("{f:?}"),
    }
    a.send(ClientFrame::Synclist { since: t2 }).await;
    match a.recv().await {
        ServerFrame::SynclistResponse(e) => assert!(e.is_empty()),
        f => panic!("{f:?}"),
    }

    // Unknown document: error 7, the connection stays.
    a.send(ClientFrame::Pull { doc: 99, since: 0 }).await;
    a.expect_error(ErrorCode::UNKNOWN_DOCUMENT).await;
    a.send(ClientFrame::Pull { doc: 7, since: t2 }).await;
    let (ins, del, _, _) = a.recv_doc().await;
    assert!(ins.is_empty() && del.is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn upserts_are_atomic_and_checked() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start(config(dir.path())).await;

    // No hello: inserts refused, connection stays, deletes allowed.
    let mut anon = Client::connect(srv.addr).await;
    anon.send(upsert(1, "", 0, vec![atom("x", 1, 1)], vec![]))
        .await;
    anon.expect_error(ErrorCode::HELLO_REQUIRED).await;
    anon.send(upsert(1, "", 0, vec![], vec![pid(5, 9)])).await;
    let (_, _, _, last) = anon.recv_doc().await;
    assert_eq!(sync_of(&last).1, 0, "no hello, no site");

    let mut a = Client::hello(srv.addr, 1).await;
    a.send(upsert(1, "", 0, vec![atom("a", 1, 1)], vec![]))
        .await;
    let (_, del, _, last) = a.recv_doc().await;
    assert_eq!(del, vec![pid(5, 9)], "the tombstone recorded without hello");
    let (t, site) = sync_of(&last);
    assert_eq!(site, 1);

    // One bad insert rejects the whole upsert.
    a.send(upsert(
        1,
        "",
        t,
        vec![atom("b", 2, 1), atom("c", 3, 2)],
        vec![pid(1, 1)],
    ))
    .await;
    a.expect_error(ErrorCode::SITE_MISMATCH).await;
    a.send(upsert(
        1,
        "",
        t,
        vec![atom("b", 2, 1), atom("other", 1, 1)],
        vec![],
    ))
    .await;
    a.expect_error(ErrorCode::ID_CONFLICT).await;
    a.send(ClientFrame::Pull { doc: 1, since: t }).await;
    let (ins, del, _, _) = a.recv_doc().await;
    assert!(
        ins.is_empty() && del.is_empty(),
        "nothing of a refused upsert was applied"
    );

    // Idempotent re-send; tombstone before insert stays deleted.
    a.send(upsert(1, "", 0, vec![atom("a", 1, 1)], vec![]))
        .await;
    let (ins, _, _, _) = a.recv_doc().await;
    assert!(ins.is_empty());
    a.send(upsert(1, "", t, vec![], vec![pid(9, 1)])).await;
    a.recv_doc().await;
    a.send(upsert(1, "", t, vec![atom("late", 9, 1)], vec![]))
        .await;
    let (_, del, _, _) = a.recv_doc().await;
    assert_eq!(
        del,
        vec![pid(9, 1)],
        "the sender learns its insert is deleted"
    );
    let mut b = Client::hello(srv.addr, 2).await;
    b.send(ClientFrame::Pull { doc: 1, since: 0 }).await;
    let (ins, del, _, _) = b.recv_doc().await;
    assert_eq!(ins, vec![atom("a", 1, 1)]);
    assert_eq!(del, vec![pid(5, 9), pid(9, 1)]);
    srv.stop().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start(config(dir.path())).await;
    let mut a = Client::hello(srv.addr, 1).await;
    a.send(upsert(3, "p", 0, vec![], vec![])).await;
    a.recv_doc().await;
    for i in 0..200u32 {
        a.io.feed(upsert(3, "p", 0, vec![atom("x", i + 1, 1)], vec![]))
            .await
            .expect("feed");
        a.io.feed(ClientFrame::Synclist { since: 0 })
            .await
            .expect("feed");
    }
    a.io.feed(ClientFrame::Pull { doc: 3, since: 0 })
        .await
        .expect("feed");
    SinkExt::<ClientFrame>::flush(&mut a.io)
        .await
        .expect("flush");
    let mut last = 0;
    let mut listed = 0;
    for _ in 0..200 {
        let (_, _, _, f) = a.recv_doc().await;
        let (t, _) = sync_of(&f);
        assert!(t >= last);
        last = t;
        match a.recv().await {
            ServerFrame::SynclistResponse(e) => {
                // Later upserts may already be committed too: at least
                // this one is listed.
                let m = e.iter().next().expect("listed").modified;
                assert!(m >= listed, "listing times never go back");
                listed = m;
            }
            f => panic!("{f:?}"),
        }
    }
    let (ins, _, _, _) = a.recv_doc().await;
    assert_eq!(ins.len(), 200);
    srv.stop().await;
}

#[tokio::test]
async fn bad_input_gets_an_error_and_a_close() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start(config(dir.path())).await;

    // Unknown header.
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    s.write_all(&[200, 1, 2, 3]).await.expect("write");
    let mut c = Client {
        io: Framed::new(s, ClientCodec::default()),
    };
    let frames = c.recv_until_closed().await;
    assert!(
        matches!(&frames[..], [ServerFrame::Error(e)] if e.code == ErrorCode::UNKNOWN_FRAME),
        "{frames:?}"
    );

    // A session frame in sync mode, after a valid request.
    let mut c = Client::connect(srv.addr).await;
    c.send(ClientFrame::Synclist { since: 0 }).await;
    c.send(ClientFrame::Rename(DocName::new("x").expect("name")))
        .await;
    let frames = c.recv_until_closed().await;
    assert!(
        matches!(&frames[..], [ServerFrame::SynclistResponse(_), ServerFrame::Error(e)] if e.code == ErrorCode::WRONG_MODE),
        "{frames:?}"
    );

    // A hello that is not first.
    let mut c = Client::hello(srv.addr, 1).await;
    c.send(ClientFrame::Hello(
        Hello::new(1, Bytes::new()).expect("hello"),
    ))
    .await;
    c.expect_error(ErrorCode::WRONG_MODE).await;

    // A 65 before a 64.
    let mut c = Client::hello(srv.addr, 1).await;
    c.send(ClientFrame::Insert(SessionInsert::new(atom("x", 1, 1))))
        .await;
    c.expect_error(ErrorCode::WRONG_MODE).await;

    // Unsupported version.
    let mut c = Client::connect(srv.addr).await;
    let mut h = Hello::new(1, Bytes::new()).expect("hello");
    h.version = 9;
    c.send(ClientFrame::Hello(h)).await;
    c.expect_error(ErrorCode::UNSUPPORTED_VERSION).await;

    // Malformed: an atom of length 0 in an upsert, mid-stream.
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    let mut raw = vec![2u8];
    raw.extend_from_slice(&5u128.to_be_bytes());
    raw.push(b'\n');
    raw.extend_from_slice(&0u64.to_be_bytes());
    raw.extend_from_slice(&1u64.to_be_bytes());
    raw.push(0);
    s.write_all(&raw).await.expect("write");
    let mut c = Client {
        io: Framed::new(s, ClientCodec::default()),
    };
    let frames = c.recv_until_closed().await;
    assert!(
        matches!(&frames[..], [ServerFrame::Error(e)] if e.code == ErrorCode::MALFORMED),
        "{frames:?}"
    );

    // A frame over max_frame_bytes is refused as soon as it is announced.
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    let mut raw = vec![2u8];
    raw.extend_from_slice(&5u128.to_be_bytes());
    raw.push(b'\n');
    raw.extend_from_slice(&0u64.to_be_bytes());
    raw.extend_from_slice(&1_000_000u64.to_be_bytes());
    raw.extend_from_slice(&[255; 300]);
    s.write_all(&raw).await.expect("write");
    let mut c = Client {
        io: Framed::new(s, ClientCodec::default()),
    };
    let frames = c.recv_until_closed().await;
    assert!(
        matches!(&frames[..], [ServerFrame::Error(e)] if e.code == ErrorCode::LIMIT_EXCEEDED || e.code == ErrorCode::MALFORMED),
        "{frames:?}"
    );

    // Closed mid-frame.
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    s.write_all(&[1, 0, 0]).await.expect("write");
    s.shutdown().await.expect("shutdown");
    let mut c = Client {
        io: Framed::new(s, ClientCodec::default()),
    };
    let frames = c.recv_until_closed().await;
    assert!(
        matches!(&frames[..], [ServerFrame::Error(e)] if e.code == ErrorCode::MALFORMED),
        "{frames:?}"
    );

    // The server is fine.
    let mut c = Client::connect(srv.addr).await;
    c.send(ClientFrame::Synclist { since: 0 }).await;
    assert!(matches!(c.recv().await, ServerFrame::SynclistResponse(_)));
    srv.stop().await;
}

#[tokio::test]
async fn sessions_fan_out_ack_and_never_echo() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start(config(dir.path())).await;
    let mut a = Client::hello(srv.addr, 1).await;
    a.send(ClientFrame::SessionStart { since: 0, doc: 42 })
        .await;
    let (ins, _, name, started) = a.recv_doc().await;
    assert!(ins.is_empty());
    assert_eq!(name, "");
    let (_, site_a) = sync_of(&started);
    assert_eq!(site_a, 1);

    let mut b = Client::hello(srv.addr, 2).await;
    b.send(ClientFrame::SessionStart { since: 0, doc: 42 })
        .await;
    let (_, _, _, started_b) = b.recv_doc().await;
    let (tb, site_b) = sync_of(&started_b);
    assert_eq!(site_b, 2);

    a.send(ClientFrame::Insert(SessionInsert::new(atom("hi", 1, 1))))
        .await;
    a.send(ClientFrame::Rename(DocName::new("title").expect("name")))
        .await;
    // Wrong site: refused before the ack that counts it.
    a.send(ClientFrame::Insert(SessionInsert::new(atom("no", 2, 2))))
        .await;
    // Re-sent: acked, not broadcast.
    a.send(ClientFrame::Insert(SessionInsert::new(atom("hi", 1, 1))))
        .await;
    a.send(ClientFrame::Delete(SessionDelete {
        site: 1,
        pid: pid(1, 1),
    }))
    .await;

    let mut acked = 0;
    let mut refused = 0;
    while acked < 5 {
        match a.recv().await {
            ServerFrame::SessionAck { count } => {
                assert!(count >= acked);
                if count >= 3 {
                    assert_eq!(refused, 1, "the refusal comes before the ack covering it");
                }
                acked = count;
            }
            ServerFrame::Error(e) if e.code == ErrorCode::SITE_MISMATCH => refused += 1,
            f => panic!("unexpected on the sender: {f:?}"),
        }
    }
    assert_eq!(
        b.recv().await,
        ServerFrame::Insert(SessionInsert::new(atom("hi", 1, 1)))
    );
    assert_eq!(
        b.recv().await,
        ServerFrame::Rename(DocName::new("title").expect("name"))
    );
    assert_eq!(
        b.recv().await,
        ServerFrame::Delete(SessionDelete {
            site: 1,
            pid: pid(1, 1)
        })
    );

    // A sync-mode upsert reaches sessions too.
    let mut c = Client::hello(srv.addr, 3).await;
    c.send(upsert(42, "title", tb, vec![atom("up", 1, 3)], vec![]))
        .await;
    let (_, _, _, last) = c.recv_doc().await;
    assert_eq!(sync_of(&last).1, 3);
    assert_eq!(
        b.recv().await,
        ServerFrame::Insert(SessionInsert::new(atom("up", 1, 3)))
    );
    assert_eq!(
        a.recv().await,
        ServerFrame::Insert(SessionInsert::new(atom("up", 1, 3)))
    );

    // Reconnecting with the 68's sync_time gets what happened since.
    drop(b);
    let mut b = Client::hello(srv.addr, 2).await;
    b.send(ClientFrame::SessionStart { since: tb, doc: 42 })
        .await;
    let (ins, del, name, started) = b.recv_doc().await;
    assert_eq!(ins, vec![atom("up", 1, 3)]);
    assert_eq!(
        del,
        vec![pid(1, 1)],
        "a session's 33 sends every delete after t (the client may hold the atom live)"
    );
    assert_eq!(name, "title");
    assert_eq!(sync_of(&started).1, 2, "the same replica keeps its site");

    // A second 64 is wrong_mode.
    b.send(ClientFrame::SessionStart { since: 0, doc: 42 })
        .await;
    b.expect_error(ErrorCode::WRONG_MODE).await;
    srv.stop().await;
}

/// Starts sessions while another session writes continuously: each new
/// session's 33 plus its live feed must hold every atom exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_start_misses_nothing_and_duplicates_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start(config(dir.path())).await;
    let total = 600u32;
    let mut w = Client::hello(srv.addr, 1).await;
    w.send(ClientFrame::SessionStart { since: 0, doc: 5 }).await;
    w.recv_doc().await;
    let writer = tokio::spawn(async move {
        for i in 1..=total {
            w.send(ClientFrame::Insert(SessionInsert::new(atom("z", i, 1))))
                .await;
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        loop {
            if let ServerFrame::SessionAck { count } = w.recv().await
                && count == total as u64
            {
                break;
            }
        }
    });
    let mut readers = Vec::new();
    for r in 0..6u128 {
        let addr = srv.addr;
        readers.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(r as u64 * 7)).await;
            let mut c = Client::hello(addr, 100 + r).await;
            c.send(ClientFrame::SessionStart { since: 0, doc: 5 }).await;
            let (ins, _, _, _) = c.recv_doc().await;
            let mut seen: BTreeMap<Pid, u32> = BTreeMap::new();
            for a in ins {
                *seen.entry(a.pid().clone()).or_default() += 1;
            }
            while seen.len() < total as usize {
                match c.recv().await {
                    ServerFrame::Insert(i) => *seen.entry(i.atom.pid().clone()).or_default() += 1,
                    f => panic!("{f:?}"),
                }
            }
            assert!(seen.values().all(|&n| n == 1), "an atom arrived twice");
        }));
    }
    writer.await.expect("writer");
    for r in readers {
        r.await.expect("reader");
    }
    srv.stop().await;
}

#[tokio::test]
async fn slow_readers_are_disconnected() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(dir.path());
    cfg.max_outbound_bytes = 4096;
    let srv = start(cfg).await;
    let mut slow = Client::hello(srv.addr, 2).await;
    slow.send(ClientFrame::SessionStart { since: 0, doc: 8 })
        .await;
    slow.recv_doc().await;
    let mut w = Client::hello(srv.addr, 1).await;
    w.send(ClientFrame::SessionStart { since: 0, doc: 8 }).await;
    let (_, _, _, started) = w.recv_doc().await;
    let site = sync_of(&started).1;
    // ~20 MB of broadcasts: far past the socket buffers and the queue.
    let data = "x".repeat(250);
    let n = 80_000u32;
    let (mut tx, mut rx) = w.io.split();
    let sender = tokio::spawn(async move {
        for i in 1..=n {
            tx.feed(ClientFrame::Insert(SessionInsert::new(atom(
                &data, i, site,
            ))))
            .await
            .expect("feed");
        }
        SinkExt::<ClientFrame>::flush(&mut tx).await.expect("flush");
        tx
    });
    let acks = tokio::spawn(async move {
        let mut last = None;
        while let Some(r) = rx.next().await {
            let f = r.expect("frame");
            if let ServerFrame::SessionAck { count } = f
                && count == n as u64
            {
                return;
            }
            last = Some(f);
        }
        panic!("the writer's connection ended before its last ack: {last:?}");
    });
    let _tx = tokio::time::timeout(Duration::from_secs(60), sender)
        .await
        .expect("the writer is not stalled by a slow reader")
        .expect("sender");
    tokio::time::timeout(Duration::from_secs(60), acks)
        .await
        .expect("all acked")
        .expect("acks");
    // The slow reader finds the slow_reader error at the end of its stream.
    let mut last = None;
    loop {
        match tokio::time::timeout(WAIT, slow.io.next()).await {
            Ok(Some(Ok(f))) => last = Some(f),
            Ok(_) => break,
            Err(_) => panic!("slow reader not disconnected"),
        }
    }
    assert!(
        matches!(&last, Some(ServerFrame::Error(e)) if e.code == ErrorCode::SLOW_READER),
        "{last:?}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn connection_limit_and_handshake_timeout() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(dir.path());
    cfg.max_connections = 1;
    cfg.handshake_timeout = Duration::from_millis(300);
    let srv = start(cfg).await;
    let mut first = Client::connect(srv.addr).await;
    let mut second = Client::connect(srv.addr).await;
    second.expect_error(ErrorCode::SERVER_BUSY).await;
    // The first one never speaks: timeout.
    let msg = first.expect_error(ErrorCode::TIMEOUT).await;
    assert!(msg.contains("handshake_timeout"), "{msg}");
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_tells_clients_and_data_survives_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start(config(dir.path())).await;
    let mut a = Client::hello(srv.addr, 1).await;
    a.send(upsert(11, "keep", 0, vec![atom("durable", 1, 1)], vec![]))
        .await;
    let (_, _, _, last) = a.recv_doc().await;
    let (t, _) = sync_of(&last);
    let mut s = Client::hello(srv.addr, 2).await;
    s.send(ClientFrame::SessionStart { since: 0, doc: 11 })
        .await;
    s.recv_doc().await;

    // A second server on the same folder: a clear error.
    match Server::bind(config(dir.path())).await {
        Err(e) => assert!(e.to_string().contains("already open"), "{e}"),
        Ok(_) => panic!("a second server opened the same data folder"),
    }

    srv.shutdown.cancel();
    let frames = a.recv_until_closed().await;
    assert!(
        matches!(frames.last(), Some(ServerFrame::Error(e)) if e.code == ErrorCode::SHUTTING_DOWN),
        "{frames:?}"
    );
    let frames = s.recv_until_closed().await;
    assert!(
        matches!(frames.last(), Some(ServerFrame::Error(e)) if e.code == ErrorCode::SHUTTING_DOWN),
        "{frames:?}"
    );
    tokio::time::timeout(Duration::from_secs(20), srv.task)
        .await
        .expect("bounded shutdown")
        .expect("task")
        .expect("clean");

    let srv = start(config(dir.path())).await;
    let mut b = Client::hello(srv.addr, 1).await;
    b.send(ClientFrame::Pull { doc: 11, since: 0 }).await;
    let (ins, _, name, last) = b.recv_doc().await;
    assert_eq!(ins, vec![atom("durable", 1, 1)]);
    assert_eq!(name, "keep");
    let (t2, site) = sync_of(&last);
    assert_eq!(site, 1, "sites survive restarts");
    assert!(t2 >= t);
    b.send(upsert(11, "keep", t2, vec![atom("more", 2, 1)], vec![]))
        .await;
    let (_, _, _, last) = b.recv_doc().await;
    assert!(sync_of(&last).0 > t2, "the clock continues after a restart");
    b.send(ClientFrame::Synclist { since: 0 }).await;
    match b.recv().await {
        ServerFrame::SynclistResponse(e) => assert_eq!(e.len(), 1),
        f => panic!("{f:?}"),
    }
    srv.stop().await;
}

#[tokio::test]
async fn closed_clients_do_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start(config(dir.path())).await;
    let mut a = Client::hello(srv.addr, 1).await;
    a.send(upsert(1, "x", 0, vec![], vec![])).await;
    a.recv_doc().await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = std::time::Instant::now();
    srv.stop().await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

/// A client that re-sends an insert (lost reply or lost ack) whose atom was
/// deleted meanwhile still learns of the delete, in both modes.
#[tokio::test]
async fn a_resent_insert_of_a_deleted_atom_learns_the_delete() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start(config(dir.path())).await;
    let mut a = Client::hello(srv.addr, 1).await;
    a.send(upsert(4, "n", 0, vec![], vec![])).await;
    let (_, _, _, last) = a.recv_doc().await;
    let (t, site_a) = sync_of(&last);
    let x = atom("x", 1, site_a);
    a.send(upsert(4, "n", t, vec![x.clone()], vec![])).await;
    a.recv_doc().await; // the "lost" reply
    let mut b = Client::hello(srv.addr, 2).await;
    b.send(upsert(4, "n", 0, vec![], vec![x.pid().clone()]))
        .await;
    let (_, _, _, last) = b.recv_doc().await;
    let site_b = sync_of(&last).1;
    a.send(upsert(4, "n", t, vec![x.clone()], vec![])).await;
    let (ins, del, _, _) = a.recv_doc().await;
    assert!(ins.is_empty());
    assert_eq!(
        del,
        vec![x.pid().clone()],
        "the re-send's reply carries the delete"
    );

    // Session: the same through a re-sent 65.
    let mut s = Client::hello(srv.addr, 1).await;
    s.send(ClientFrame::SessionStart { since: t, doc: 4 }).await;
    s.recv_doc().await;
    s.send(ClientFrame::Insert(SessionInsert::new(x.clone())))
        .await;
    assert_eq!(
        s.recv().await,
        ServerFrame::Delete(SessionDelete {
            site: site_b,
            pid: x.pid().clone()
        }),
        "the sender is told, with the deleter's site, before the ack"
    );
    assert_eq!(s.recv().await, ServerFrame::SessionAck { count: 1 });
    srv.stop().await;
}
