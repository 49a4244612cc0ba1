//! In-process tests of the server library (`Server::bind` / `run`) over
//! TCP: what the conformance kit cannot see from outside. Configuration
//! limits (outbound queue, connection count, handshake timeout), shutdown
//! and restart on the same folder, and the reference server's own choices
//! (sites given in order from 1, upserts broadcast to live sessions,
//! pipelined requests committed in arrival order). The protocol's rules are
//! the kit's (`notesync_tests::conformance`, run by
//! tests/tests/conformance.rs); connections here use its harness.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use notesync_protocol::{ClientFrame, ErrorCode, ServerFrame, SessionInsert, VERSION_RUNS};
use notesync_server::{Config, Server};
use notesync_tests::{Conn, Event, atom, describe, name_of, upsert_frame};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

/// A server with the test config on a fresh folder (dropped with the
/// folder).
async fn fresh() -> (tempfile::TempDir, Running) {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = start(config(dir.path())).await;
    (dir, srv)
}

/// A connection after hello as `replica`.
async fn hello(addr: SocketAddr, replica: u128) -> Conn {
    let mut c = Conn::connect(addr)
        .await
        .with_label(format!("replica {replica:#x}"));
    let w = c.hello(replica).await;
    // The harness says version 2 (it reads 33s), see `Conn::hello`.
    assert_eq!(w.version, VERSION_RUNS - 1, "the version of the hello (6)");
    c
}

/// Reads until the server closes the connection; returns the last frame.
async fn last_before_close(c: &mut Conn) -> Option<ServerFrame> {
    let mut last = None;
    loop {
        match c.next_event().await {
            Event::Frame(f) => last = Some(f),
            Event::Closed => return last,
            other => panic!(
                "{}: expected frames then the close, got {other:?}",
                c.label()
            ),
        }
    }
}

#[tokio::test]
async fn sites_count_from_1_and_an_upsert_reaches_live_sessions() {
    let (_dir, srv) = fresh().await;
    let mut a = hello(srv.addr, 1).await;
    let (_, sa) = a.session_start(0, 42).await;
    assert_eq!(sa.site, 1, "the document's first replica gets site 1");
    let mut b = hello(srv.addr, 2).await;
    let (_, sb) = b.session_start(0, 42).await;
    assert_eq!(sb.site, 2, "the next replica gets the next site");
    a.rename("title").await;
    assert_eq!(
        a.recv().await,
        ServerFrame::SessionAck { count: 1 },
        "a's rename is acked"
    );
    assert_eq!(b.recv().await, ServerFrame::Rename(name_of("title")));

    // A sync-mode upsert reaches sessions too.
    let mut c = hello(srv.addr, 3).await;
    let up = atom("up", 1, 3);
    let (_, s) = c
        .upsert(42, "title", sb.sync_time, std::slice::from_ref(&up), &[])
        .await;
    assert_eq!(s.site, 3);
    for who in [&mut b, &mut a] {
        assert_eq!(
            who.recv().await,
            ServerFrame::Insert(SessionInsert::new(up.clone())),
            "{}: the upsert's insert is broadcast to the session",
            who.label()
        );
    }
    srv.stop().await;
}

/// The single writer commits requests in the order they arrive: pipelined
/// creations are listed in request order, each with a time of its own.
#[tokio::test]
async fn pipelined_creations_are_committed_in_arrival_order() {
    let (_dir, srv) = fresh().await;
    let mut c = hello(srv.addr, 1).await;
    let docs: Vec<u128> = (1..=20).collect();
    c.send_many(
        docs.iter()
            .map(|&d| upsert_frame(d, &format!("d{d}"), 0, &[], &[])),
    )
    .await;
    let mut created = Vec::new();
    for &d in &docs {
        let (rs, s) = c.recv_doc_reply(d, "pipelined upsert").await.expect("ok");
        assert_eq!(rs[0].name.as_str(), format!("d{d}"));
        created.push(s);
    }
    for w in created.windows(2) {
        // A 34 covers everything up to its time, so two replies may carry
        // the same time; they never go back.
        assert!(
            w[0].sync_time <= w[1].sync_time,
            "sync times never go back: {:?}",
            created.iter().map(|s| s.sync_time).collect::<Vec<_>>()
        );
    }
    let mut frames: Vec<ClientFrame> = docs
        .iter()
        .rev()
        .map(|&d| ClientFrame::Pull { doc: d, since: 0 })
        .collect();
    frames.push(ClientFrame::Synclist { since: 0 });
    c.send_many(frames).await;
    for &d in docs.iter().rev() {
        let (rs, _) = c.recv_doc_reply(d, "pipelined pull").await.expect("ok");
        assert_eq!(rs[0].name.as_str(), format!("d{d}"));
    }
    match c.recv().await {
        ServerFrame::SynclistResponse(e) => {
            let times: Vec<u64> = e.iter().map(|e| e.modified).collect();
            assert!(
                times.windows(2).all(|w| w[0] < w[1]),
                "each creation has its own time, strictly increasing: {times:?}"
            );
            let listed: Vec<u128> = e.iter().map(|e| e.doc).collect();
            assert_eq!(listed, docs, "ascending by time = creation order");
            for (e, s) in e.iter().zip(&created) {
                assert!(e.modified <= s.sync_time, "a 34 covers its upsert's change");
            }
        }
        other => panic!("expected 32, got {}", describe(&other)),
    }
    srv.stop().await;
}

/// Upserts and listings pipelined in turn: a listing answered after an
/// upsert sees it, and times never go back.
#[tokio::test]
async fn interleaved_upserts_and_listings_are_answered_in_order() {
    let (_dir, srv) = fresh().await;
    let mut c = hello(srv.addr, 1).await;
    c.upsert(3, "p", 0, &[], &[]).await;
    let mut frames = Vec::new();
    for i in 0..200u32 {
        frames.push(upsert_frame(3, "p", 0, &[atom("x", i + 1, 1)], &[]));
        frames.push(ClientFrame::Synclist { since: 0 });
    }
    frames.push(ClientFrame::Pull { doc: 3, since: 0 });
    c.send_many(frames).await;
    let (mut last, mut listed) = (0, 0);
    for _ in 0..200 {
        let (_, s) = c.recv_doc_reply(3, "interleaved upsert").await.expect("ok");
        assert!(s.sync_time >= last);
        last = s.sync_time;
        let e = c.recv_synclist().await;
        // Later upserts may already be committed too: at least this one is
        // listed.
        let m = e.first().expect("listed").modified;
        assert!(m >= listed, "listing times never go back");
        listed = m;
    }
    let (rs, _) = c.recv_doc_reply(3, "pull").await.expect("ok");
    assert_eq!(rs.iter().map(|r| r.inserts.len()).sum::<usize>(), 200);
    srv.stop().await;
}

#[tokio::test]
async fn slow_readers_are_disconnected() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(dir.path());
    cfg.max_outbound_bytes = 4096;
    let srv = start(cfg).await;
    let mut slow = hello(srv.addr, 2).await.with_label("slow reader");
    slow.session_start(0, 8).await;
    let mut w = hello(srv.addr, 1).await;
    let (_, started) = w.session_start(0, 8).await;
    let site = started.site;
    // ~20 MB of broadcasts: far past the socket buffers and the queue.
    let data = "x".repeat(250);
    let n = 80_000u32;
    // The writer reads its acks while it sends, or it would be a slow
    // reader itself.
    let (mut tx, mut rx) = w.into_framed().split();
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
    let last = last_before_close(&mut slow).await;
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
    let mut first = Conn::connect(srv.addr).await;
    let mut second = Conn::connect(srv.addr).await;
    second.expect_error(ErrorCode::SERVER_BUSY).await;
    // The first one never speaks: timeout.
    let e = first.expect_error(ErrorCode::TIMEOUT).await;
    assert!(e.message.contains("handshake_timeout"), "{}", e.message);
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_tells_clients_and_data_survives_restart() {
    let (dir, srv) = fresh().await;
    let mut a = hello(srv.addr, 1).await;
    let (_, t) = a.upsert(11, "keep", 0, &[atom("durable", 1, 1)], &[]).await;
    let mut s = hello(srv.addr, 2).await;
    s.session_start(0, 11).await;

    // A second server on the same folder: a clear error.
    match Server::bind(config(dir.path())).await {
        Err(e) => assert!(e.to_string().contains("already open"), "{e}"),
        Ok(_) => panic!("a second server opened the same data folder"),
    }

    srv.shutdown.cancel();
    for c in [&mut a, &mut s] {
        let last = last_before_close(c).await;
        assert!(
            matches!(&last, Some(ServerFrame::Error(e)) if e.code == ErrorCode::SHUTTING_DOWN),
            "{}: {last:?}",
            c.label()
        );
    }
    tokio::time::timeout(Duration::from_secs(20), srv.task)
        .await
        .expect("bounded shutdown")
        .expect("task")
        .expect("clean");

    let srv = start(config(dir.path())).await;
    let mut b = hello(srv.addr, 1).await;
    let (rs, s2) = b.pull(11, 0).await;
    let ins: Vec<_> = rs
        .iter()
        .flat_map(|r| r.inserts.iter())
        .map(|a| a.to_atom())
        .collect();
    assert_eq!(ins, vec![atom("durable", 1, 1)]);
    assert_eq!(rs[0].name.as_str(), "keep");
    assert_eq!(s2.site, 1, "sites survive restarts");
    assert!(s2.sync_time >= t.sync_time);
    let (_, s3) = b
        .upsert(11, "keep", s2.sync_time, &[atom("more", 2, 1)], &[])
        .await;
    assert!(
        s3.sync_time > s2.sync_time,
        "the clock continues after a restart"
    );
    assert_eq!(b.synclist(0).await.len(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn closed_clients_do_not_hold_up_shutdown() {
    let (_dir, srv) = fresh().await;
    let mut a = hello(srv.addr, 1).await;
    a.upsert(1, "x", 0, &[], &[]).await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = std::time::Instant::now();
    srv.stop().await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}
