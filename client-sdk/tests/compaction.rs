//! Tombstone compaction (PROTOCOL.md 3.6) through the SDK against a real
//! notesync-server whose wall clock the test moves: devices that were
//! offline longer than the horizon get a full resync, keep and send their
//! unsynced edits, and every replica converges.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

mod common;

use common::server::{TestServer, next_event_where, wait_for};
use futures::{SinkExt, StreamExt};
use notesync_client::{Client, SessionEvent};
use notesync_protocol::{ClientCodec, ClientFrame, DocId, ErrorCode, Hello, ServerFrame, Time};
use notesync_server::{Config, WallClock};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// A wall clock the test sets.
struct TestClock(AtomicU64);

impl WallClock for TestClock {
    fn now_micros(&self) -> Time {
        self.0.load(Ordering::SeqCst)
    }
}

const HORIZON: Duration = Duration::from_secs(1000);

/// A server whose wall clock is `clock`, with a short horizon and frequent
/// compaction.
async fn start(clock: &Arc<TestClock>) -> TestServer {
    TestServer::start_with(|dir| {
        let mut config = Config::new(dir);
        config.wall_clock = clock.clone();
        config.tombstone_horizon = HORIZON;
        config.compaction_interval = Duration::from_millis(20);
        config
    })
    .await
}

impl TestClock {
    fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_micros() as u64, Ordering::SeqCst);
    }
}

/// The first frame the server answers a pull of `doc` since `since`
/// with, on a connection whose hello announced `version`.
async fn first_reply(server: &TestServer, version: u8, doc: DocId, since: Time) -> ServerFrame {
    let addr: SocketAddr = server.addr.parse().unwrap();
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut c = Framed::new(stream, ClientCodec::default());
    let mut hello = Hello::new(0xabcd, Vec::new()).unwrap();
    hello.version = version;
    c.send(ClientFrame::Hello(hello)).await.unwrap();
    let next = async |c: &mut Framed<TcpStream, ClientCodec>| {
        tokio::time::timeout(Duration::from_secs(10), c.next())
            .await
            .expect("a reply within 10 s")
            .expect("a frame")
            .expect("a valid frame")
    };
    assert!(matches!(next(&mut c).await, ServerFrame::Welcome { .. }));
    c.send(ClientFrame::Pull { doc, since }).await.unwrap();
    next(&mut c).await
}

/// Waits (bounded) until compaction has dropped tombstones deleted
/// after `since`: a pull since it is then a resync.
async fn compacted_past(server: &TestServer, doc: DocId, since: Time) {
    for _ in 0..500 {
        if matches!(
            first_reply(server, 2, doc, since).await,
            ServerFrame::Resync { doc: d } if d == doc
        ) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("compaction did not drop the tombstones within 10 s");
}

fn last_sync(c: &Client, doc: DocId) -> Time {
    c.list().iter().find(|n| n.id == doc).unwrap().last_sync
}

fn pending(c: &Client, doc: DocId) -> usize {
    c.list().iter().find(|n| n.id == doc).unwrap().pending_ops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_past_the_horizon_resyncs_and_keeps_pending_edits() {
    let clock = Arc::new(TestClock(AtomicU64::new(1_700_000_000_000_000)));
    let server = start(&clock).await;
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let [a, b, c, d, e] = [0, 1, 2, 3, 4].map(|i| server.client(dirs[i].path()));
    let id = a.create("plan").unwrap();
    // Three atoms (one per sync), so that "beta " is deleted as a whole atom
    // (a deleted char of a live atom is never compacted: the full state
    // needs it).
    for (at, word) in [(0, "alpha "), (6, "beta "), (11, "gamma")] {
        a.insert(id, at, word).unwrap();
        a.sync_now().await.unwrap();
    }
    for x in [&b, &c, &e] {
        x.sync_now().await.unwrap();
        assert_eq!(x.text(id).unwrap(), "alpha beta gamma");
    }
    let b_since = last_sync(&b, id);

    // B, C and E go offline; B and E edit meanwhile, C does not. A deletes
    // "beta " and edits on.
    b.insert(id, 16, " (B offline)").unwrap();
    e.insert(id, 0, "E: ").unwrap();
    a.delete(id, 6..11).unwrap();
    a.sync_now().await.unwrap();
    assert_eq!(a.text(id).unwrap(), "alpha gamma");
    // Before the horizon: a delta, no resync.
    assert!(matches!(
        first_reply(&server, 2, id, b_since).await,
        ServerFrame::DocResponse(_)
    ));

    // Past the horizon the deletes' tombstones are dropped.
    clock.advance(HORIZON * 2);
    compacted_past(&server, id, b_since).await;
    // A version 1 client is told in an error it knows.
    match first_reply(&server, 1, id, b_since).await {
        ServerFrame::Error(e) => assert_eq!(e.code, ErrorCode::INVALID_REQUEST, "{e:?}"),
        other => panic!("expected invalid_request for version 1, got {other:?}"),
    }

    // B (pending edits: its upsert is answered with a resync): its edit
    // lands, nothing of A's delete comes back.
    let rb = b.sync_now().await.unwrap();
    assert_eq!(rb.resynced, vec![id], "{rb:?}");
    assert_eq!(pending(&b, id), 0);
    assert_eq!(b.text(id).unwrap(), "alpha gamma (B offline)");

    // C (no edits: its pull is answered with a resync).
    let rc = c.sync_now().await.unwrap();
    assert_eq!(rc.resynced, vec![id], "{rc:?}");
    assert_eq!(c.text(id).unwrap(), "alpha gamma (B offline)");

    // E opens a live session: refused with a resync, the SDK resyncs in
    // sync mode and starts again; its offline edit lands.
    let mut se = e.session(id).unwrap();
    let connected = next_event_where("E's session to connect", &mut se, |e| {
        (e == SessionEvent::Connected).then_some(())
    })
    .await;
    assert!(connected.is_some(), "E's session ended before it connected");
    wait_for("E's edit acknowledged", || se.pending_ops() == 0).await;
    assert_eq!(se.pending_ops(), 0);
    se.close().await;
    let want = "E: alpha gamma (B offline)";
    assert_eq!(e.text(id).unwrap(), want);

    // Every replica converges, a new one included.
    for x in [&a, &b, &c, &d] {
        x.sync_now().await.unwrap();
        assert_eq!(x.text(id).unwrap(), want);
    }
}
