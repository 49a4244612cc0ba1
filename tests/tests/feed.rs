//! The change feed (PROTOCOL.md 3.8) against the server binary: what a
//! device relies on across restarts, kills and a slow network, which the
//! conformance kit cannot arrange from outside (a kill -9, a small
//! `--feed-max-lag`, a subscriber that stops reading).

use std::collections::BTreeMap;
use std::time::Duration;

use notesync_protocol::{ClientFrame, DocId, ErrorCode, FeedEntry, ServerFrame, Time};
use notesync_tests::conn::Event;
use notesync_tests::{Conn, ServerProcess, upsert_frame};

/// A subscribed connection (hello version 4, then 5 from `since`).
async fn subscriber(server: &ServerProcess, since: Time) -> Conn {
    let mut c = server.connect().await.with_label("subscriber");
    c.hello_version(rand_id(), &[], 4).await;
    c.send(ClientFrame::Subscribe { since }).await;
    c
}

/// Ids unique across tests and runs (each test has its own server anyway).
fn rand_id() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    (nanos << 32) ^ u128::from(N.fetch_add(1, Ordering::Relaxed))
}

/// Reads feed frames until a 39 at or after `until` (the listing or the
/// feed caught up with it); returns the entries and the last cursor.
async fn read_until(c: &mut Conn, until: Time) -> (Vec<FeedEntry>, Time) {
    let mut got = Vec::new();
    let mut cursor = 0;
    loop {
        match c.recv().await {
            ServerFrame::FeedChanges(e) => {
                for x in &e {
                    assert!(
                        x.time > cursor,
                        "feed times only go up: {x:?} after {cursor}"
                    );
                    cursor = x.time;
                    got.push(x);
                }
            }
            ServerFrame::FeedHeartbeat { time } => {
                assert!(time >= cursor, "a heartbeat covers what was listed");
                cursor = time;
                if time >= until {
                    return (got, cursor);
                }
            }
            f => panic!("unexpected frame on a feed: {f:?}"),
        }
    }
}

/// Renames each doc (a change: the rename knows the name it replaces,
/// since it is sent since the doc's last 34, PROTOCOL.md 3.1); returns
/// each doc's last change time as synclist lists it.
async fn touch(w: &mut Conn, docs: &[DocId], round: usize) -> BTreeMap<DocId, Time> {
    let since = |d: &DocId| LAST.with(|m| m.borrow().get(d).copied().unwrap_or(0));
    w.send_many(
        docs.iter()
            .map(|d| upsert_frame(*d, &format!("note {round}"), since(d), &[], &[])),
    )
    .await;
    for &d in docs {
        let (_, s) = w.recv_doc_reply(d, "touch").await.expect("stored");
        LAST.with(|m| m.borrow_mut().insert(d, s.sync_time));
    }
    listed(w, docs).await
}

thread_local! {
    /// Each doc's last 34 time (tests run on their own threads; the
    /// runtime's workers only poll what the test's thread awaits).
    static LAST: std::cell::RefCell<BTreeMap<DocId, Time>> = Default::default();
}

/// `docs`' last change times, from synclist(0).
async fn listed(w: &mut Conn, docs: &[DocId]) -> BTreeMap<DocId, Time> {
    w.synclist_all(0)
        .await
        .into_iter()
        .filter(|e| docs.contains(&e.doc))
        .map(|e| (e.doc, e.modified))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_resumed_from_its_cursor_after_kill_9_misses_nothing() {
    let mut server = ServerProcess::start();
    let docs: Vec<DocId> = (0..20).map(|_| rand_id()).collect();
    let mut w = server.connect().await.with_label("writer");
    w.hello(rand_id()).await;
    touch(&mut w, &docs, 0).await;
    let mut s = subscriber(&server, 0).await;
    let (_, cursor) = read_until(&mut s, 0).await;
    // Changes the subscriber never sees before the kill.
    let acked = touch(&mut w, &docs[..7], 1).await;
    server.kill9();
    server.restart();
    let mut w = server.connect().await.with_label("writer after");
    w.hello(rand_id()).await;
    let after = touch(&mut w, &docs[5..9], 2).await;
    let mut s = subscriber(&server, cursor).await;
    let (got, _) = read_until(&mut s, 0).await;
    let got: BTreeMap<DocId, Time> = got.iter().map(|e| (e.doc, e.time)).collect();
    let mut want = acked;
    want.extend(after);
    assert_eq!(
        got, want,
        "every change after the cursor, at its latest time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_is_coalesced_then_resumes_with_nothing_missed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = ServerProcess::try_start_with(
        &tmp.path().join("data"),
        &["--feed-max-lag", "2", "--feed-heartbeat", "1"],
    )
    .expect("server starts");
    let docs: Vec<DocId> = (0..50).map(|_| rand_id()).collect();
    let mut w = server.connect().await.with_label("writer");
    w.hello(rand_id()).await;
    touch(&mut w, &docs, 0).await;
    let mut s = subscriber(&server, 0).await;
    let (_, cursor) = read_until(&mut s, 0).await;

    // The subscriber stops reading while the docs change over and over:
    // more changes than its socket buffers could hold as 38s, one per
    // change.
    let mut last = BTreeMap::new();
    for round in 1..=400 {
        last = touch(&mut w, &docs, round).await;
    }
    // Coalesced: reading now, it gets fewer entries than there were
    // changes (one per document per page at most, whatever is buffered
    // before its socket filled), ending at each one's latest time, unless
    // the lag bound (2 s) dropped it first (the test below makes sure of
    // the drop). Heartbeats 1 s apart end the reading once it is complete.
    let mut seen: BTreeMap<DocId, Time> = BTreeMap::new();
    let mut entries = 0usize;
    let mut dropped = false;
    let mut feed_cursor = cursor;
    loop {
        match s.next_event_within(Duration::from_secs(10)).await {
            Event::Frame(ServerFrame::FeedChanges(e)) => {
                for x in &e {
                    entries += 1;
                    feed_cursor = x.time;
                    seen.insert(x.doc, x.time);
                }
            }
            Event::Frame(ServerFrame::FeedHeartbeat { time }) => {
                feed_cursor = time;
                if seen == last {
                    break;
                }
            }
            Event::Frame(ServerFrame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::SLOW_READER, "{}", e.message);
                dropped = true;
                break;
            }
            Event::Closed => {
                dropped = true;
                break;
            }
            e => panic!("unexpected {e:?}"),
        }
    }
    assert!(
        entries < 400 * docs.len(),
        "the feed is coalesced: {entries} entries for {} changes",
        400 * docs.len()
    );
    // Whether it was dropped or not, resuming from its cursor gives every
    // document's latest change.
    let mut s = subscriber(&server, feed_cursor).await;
    let (got, _) = read_until(&mut s, 0).await;
    seen.extend(got.iter().map(|e| (e.doc, e.time)));
    assert_eq!(seen, last, "nothing missed (dropped: {dropped})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_dropped_at_the_lag_bound_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let server = ServerProcess::try_start_with(&tmp.path().join("data"), &["--feed-max-lag", "1"])
        .expect("server starts");
    let docs: Vec<DocId> = (0..1000).map(|_| rand_id()).collect();
    let mut w = server.connect().await.with_label("writer");
    w.hello(rand_id()).await;
    touch(&mut w, &docs, 0).await;
    // A small receive window: once it stops reading, the server's socket
    // takes kilobytes, and the feed's pages (up to one entry per document)
    // fill its queue within a second or two of changes.
    let mut s = Conn::connect_small_window(server.addr(), 4096)
        .await
        .with_label("subscriber");
    s.hello_version(rand_id(), &[], 4).await;
    s.send(ClientFrame::Subscribe { since: 0 }).await;
    let (_, cursor) = read_until(&mut s, 0).await;

    // It stops reading during changes, at least ten seconds of them and
    // until the server drops it: far past the 1 s bound once its queue is
    // full. (How soon it fills depends on how much the kernel's socket
    // buffers take, and so on the machine's speed: the flood goes on
    // until the drop, within a bound.)
    const DROPPED: &str = "change feed subscriber dropped as a slow_reader";
    let mut last = BTreeMap::new();
    let flood = std::time::Instant::now();
    let mut round = 1;
    while flood.elapsed() < Duration::from_secs(10)
        || (!server.stderr().contains(DROPPED) && flood.elapsed() < Duration::from_secs(120))
    {
        last = touch(&mut w, &docs, round).await;
        round += 1;
    }
    // Reading again: what was queued, then the close; slow_reader comes
    // last, if it fit in the queue that was full (the server's log says
    // so either way, since the frame may not get through).
    let mut feed_cursor = cursor;
    let mut seen: BTreeMap<DocId, Time> = BTreeMap::new();
    let reading = std::time::Instant::now();
    loop {
        // Heartbeats would keep a connection that was never dropped alive.
        assert!(
            reading.elapsed() < Duration::from_secs(60),
            "not dropped after {round} rounds of changes:\n{}",
            server.stderr()
        );
        match s.next_event_within(Duration::from_secs(30)).await {
            Event::Frame(ServerFrame::FeedChanges(e)) => {
                for x in &e {
                    feed_cursor = x.time;
                    seen.insert(x.doc, x.time);
                }
            }
            Event::Frame(ServerFrame::FeedHeartbeat { time }) => feed_cursor = time,
            Event::Frame(ServerFrame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::SLOW_READER, "{}", e.message);
                assert!(e.message.contains("feed_max_lag"), "{}", e.message);
            }
            Event::Closed => break,
            e => panic!("expected the feed, then the close; got {e:?}"),
        }
    }
    let log = server.stderr();
    assert!(
        log.contains(DROPPED),
        "the connection was closed for another reason than the lag bound:\n{log}"
    );
    // Resuming from the last cursor it read gives every document's latest
    // change: nothing was lost with the connection.
    let mut s = subscriber(&server, feed_cursor).await;
    let (got, _) = read_until(&mut s, 0).await;
    seen.extend(got.iter().map(|e| (e.doc, e.time)));
    assert_eq!(seen, last, "nothing missed after {round} rounds");
}
