//! The background sync (`Client::sync_loop`) against a real server: it
//! follows the change feed, misses nothing across a restart with writers
//! busy, does not pull back its own edits, and polls a server that has no
//! feed. Every loop here polls once an hour, so only the feed can bring a
//! change within the tests' waits.

mod common;

use std::time::Duration;

use common::server::TestServer;
use futures::{SinkExt, StreamExt};
use notesync_client::{Client, SyncEvent, SyncLoop};
use notesync_protocol::{ClientFrame, ErrorCode, ErrorFrame, ServerCodec, ServerFrame};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

const HOUR: Duration = Duration::from_secs(3600);
const PATIENCE: Duration = Duration::from_secs(10);

/// The loop's next event (panics after 10 s or if it stopped).
async fn next(l: &mut SyncLoop) -> SyncEvent {
    tokio::time::timeout(PATIENCE, l.next_event())
        .await
        .expect("an event within 10 s")
        .expect("the loop runs")
}

/// Reads the loop's events until one `pick` takes; returns it.
async fn until<T>(
    l: &mut SyncLoop,
    what: &str,
    mut pick: impl FnMut(&SyncEvent) -> Option<T>,
) -> T {
    let wait = async {
        loop {
            let e = l.next_event().await.expect("the loop runs");
            if let Some(t) = pick(&e) {
                return t;
            }
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Reads the loop's events in the background (a loop waits for its
/// reader) until `stop`; gives the loop back.
fn drain(mut l: SyncLoop, stop: CancellationToken) -> tokio::task::JoinHandle<SyncLoop> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return l,
                e = l.next_event() => if e.is_none() { return l },
            }
        }
    })
}

fn texts(c: &Client) -> Vec<(String, String)> {
    let mut v: Vec<_> = c
        .list()
        .iter()
        .map(|n| (c.name(n.id).unwrap(), c.text(n.id).unwrap()))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_brings_every_change_across_a_restart_with_writers_busy() {
    let server = TestServer::start().await;
    let (da, a) = server.device();
    let (_db, b) = server.device();
    let mut la = a.sync_loop(HOUR);
    assert!(matches!(
        next(&mut la).await,
        SyncEvent::Connected { feed: true }
    ));
    assert!(matches!(next(&mut la).await, SyncEvent::Synced(_)));

    // B writes to five notes, syncing after each edit, while A follows;
    // half way through the server restarts (B retries until it is back).
    let ids: Vec<_> = (0..5)
        .map(|i| b.create(&format!("n{i}")).unwrap())
        .collect();
    b.sync_now().await.unwrap();
    let write = |round: usize| {
        for (i, &id) in ids.iter().enumerate() {
            let at = b.text(id).unwrap().chars().count();
            b.insert(id, at, &format!("{round}.{i} ")).unwrap();
        }
    };
    let stop = CancellationToken::new();
    let la_handle = drain(la, stop.clone());
    for round in 0..10 {
        write(round);
        b.sync_now().await.unwrap();
    }
    let server = server.restart().await;
    for round in 10..20 {
        write(round);
        let mut tries = 0;
        while let Err(e) = b.sync_now().await {
            tries += 1;
            assert!(tries < 100, "B cannot sync after the restart: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop.cancel();
    let mut la = la_handle.await.unwrap();
    let want = texts(&b);
    let wait = async {
        while texts(&a) != want {
            let _ = tokio::time::timeout(Duration::from_millis(50), la.next_event()).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("A has {:?}\nB has {want:?}", texts(&a)));

    // The cursor A followed is in its store: a new client on A's folder
    // resumes from it, and B's next edit still comes.
    let cursor = a.store().lock().unwrap().last_sync_time();
    assert!(cursor > 0);
    la.stop().await;
    drop(a);
    let a = server.client(da.path());
    assert_eq!(a.store().lock().unwrap().last_sync_time(), cursor);
    let mut la = a.sync_loop(HOUR);
    until(&mut la, "the first sync", |e| {
        matches!(e, SyncEvent::Synced(_)).then_some(())
    })
    .await;
    let at = b.text(ids[0]).unwrap().chars().count();
    b.insert(ids[0], at, "after").unwrap();
    b.sync_now().await.unwrap();
    let want = b.text(ids[0]).unwrap();
    until(&mut la, "B's last edit", |e| match e {
        SyncEvent::Synced(r) if r.pulled > 0 => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(a.text(ids[0]).unwrap(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_edits_go_out_by_themselves_and_are_not_pulled_back() {
    let (_server, [(_da, a), (_db, b)]) = TestServer::with_devices().await;
    let mut la = a.sync_loop(HOUR);
    until(&mut la, "the first sync", |e| {
        matches!(e, SyncEvent::Synced(_)).then_some(())
    })
    .await;

    // B's note, empty, reaches A first.
    let theirs = b.create("theirs").unwrap();
    b.sync_now().await.unwrap();
    until(&mut la, "B's note", |e| match e {
        SyncEvent::Synced(r) => r.new_notes.contains(&theirs).then_some(()),
        _ => None,
    })
    .await;

    // An edit through the client goes out with no call to sync.
    let mine = a.create("mine").unwrap();
    a.insert(mine, 0, "typed on A").unwrap();
    let mut pulled = 0;
    until(&mut la, "A's edit to go out", |e| match e {
        SyncEvent::Synced(r) => {
            pulled += r.pulled;
            a.list().iter().all(|n| n.pending_ops == 0).then_some(())
        }
        _ => None,
    })
    .await;
    b.sync_now().await.unwrap();
    assert_eq!(b.text(mine).unwrap(), "typed on A");

    // B's edit (one change) comes after A's in the feed's order: by the
    // time A has pulled it, the feed has listed A's own upserts, which the
    // loop must not have pulled back.
    b.insert(theirs, 0, "typed on B").unwrap();
    b.sync_now().await.unwrap();
    until(&mut la, "B's edit", |e| match e {
        SyncEvent::Synced(r) => {
            pulled += r.pulled;
            r.changes.iter().any(|(d, _)| *d == theirs).then_some(())
        }
        _ => None,
    })
    .await;
    assert_eq!(a.text(theirs).unwrap(), "typed on B");
    assert_eq!(pulled, 1, "A pulled B's edit only, not its own back");
}

/// A proxy to `upstream` that refuses hello version 4 and later as a
/// version 3 server would (`unsupported_version`), and passes everything
/// else through.
async fn version_3_proxy(upstream: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let mut framed = Framed::new(client, ServerCodec::default());
                let Some(Ok(ClientFrame::Hello(hello))) = framed.next().await else {
                    return;
                };
                if hello.version >= 4 {
                    let refusal = ErrorFrame::new(
                        ErrorCode::UNSUPPORTED_VERSION,
                        "this server speaks versions 1 to 3",
                    );
                    let _ = framed.send(ServerFrame::Error(refusal)).await;
                    return;
                }
                let mut server = TcpStream::connect(upstream).await.unwrap();
                let mut first = bytes::BytesMut::new();
                ClientFrame::Hello(hello).encode(&mut first);
                let parts = framed.into_parts();
                first.extend_from_slice(&parts.read_buf);
                let mut client = parts.io;
                use tokio::io::AsyncWriteExt;
                if server.write_all(&first).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_feed_is_polled_every_interval() {
    let server = TestServer::start().await;
    let (_db, b) = server.device();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = server.config();
    cfg.addr = version_3_proxy(server.addr.clone()).await;
    let a = Client::open(dir.path(), cfg).unwrap();
    let mut la = a.sync_loop(Duration::from_secs(1));
    assert!(matches!(
        next(&mut la).await,
        SyncEvent::Connected { feed: false }
    ));

    let id = b.create("polled").unwrap();
    b.insert(id, 0, "found by a poll").unwrap();
    b.sync_now().await.unwrap();
    until(&mut la, "the poll to bring B's note", |e| match e {
        SyncEvent::Synced(r) => r.new_notes.contains(&id).then_some(()),
        _ => None,
    })
    .await;
    assert_eq!(a.text(id).unwrap(), "found by a poll");
    // A's own edits still go out when made (version 3: as runs).
    a.insert(id, 0, "A: ").unwrap();
    until(&mut la, "A's edit to go out", |e| match e {
        SyncEvent::Synced(r) => (r.upserted > 0).then_some(()),
        _ => None,
    })
    .await;
    b.sync_now().await.unwrap();
    assert_eq!(b.text(id).unwrap(), "A: found by a poll");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_loop_stops_the_first() {
    let (_server, [(_da, a)]) = TestServer::with_devices().await;
    let mut first = a.sync_loop(HOUR);
    assert!(matches!(
        next(&mut first).await,
        SyncEvent::Connected { feed: true }
    ));
    // Two loops would sync one store at once.
    let mut second = a.sync_loop(HOUR);
    let ended = tokio::time::timeout(PATIENCE, async {
        while first.next_event().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the first loop goes on beside the second");
    assert!(matches!(
        next(&mut second).await,
        SyncEvent::Connected { feed: true }
    ));
    // Edits now wake the second.
    let id = a.create("after").unwrap();
    a.insert(id, 0, "x").unwrap();
    until(&mut second, "the edit to go out", |e| match e {
        SyncEvent::Synced(r) => (r.upserted > 0).then_some(()),
        _ => None,
    })
    .await;
}
