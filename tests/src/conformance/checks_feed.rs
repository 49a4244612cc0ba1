//! The change feed, the version 4 extension (PROTOCOL.md 3.8): 5
//! feed_subscribe only after a version 4 hello; the first listing goes on
//! by itself past a synclist page; 38s and 39s only between replies, and
//! the first after the replies to every earlier request; followers of the
//! feed's cursors, and a resubscription from one, miss nothing while
//! others write; pushes come unasked, at each change's time, deletions
//! flagged; one feed per connection; read-only tokens may subscribe.
//!
//! A feed lists the whole namespace, and other checks write to it at the
//! same time: every check here looks only at its own documents, but
//! applies the rules on order (times only go up) to every entry.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use notesync_protocol::{ClientFrame, DocId, ErrorCode, FeedEntry, ServerFrame, Time, header};

use super::checks_sync::list_all;
use super::util::{atom1, cat, closing_case, create_doc, frame_bytes, hello_bytes, show};
use super::{Check, Ctx, Outcome, Skipped};
use crate::conn::{Conn, Event, upsert_frame};

pub fn checks() -> Vec<Check<Ctx>> {
    vec![
        Check::new(
            "feed-needs-version-4",
            "2.3, 3.8, 6",
            "5 after a version 3 hello (as the first request, after a synclist, in a session) or \
             without hello: unknown_frame, closed, no feed frame",
            needs_version_4,
        ),
        Check::new(
            "feed-first-listing-goes-on-past-a-page",
            "3.8, 3.1",
            "with more changed documents than one 32 holds, a 5 from 0 lists each once, ascending, \
             at its synclist time, without further requests, then a 39 that covers them",
            first_listing,
        )
        .with_timeout(Duration::from_secs(300)),
        Check::new(
            "feed-only-between-replies",
            "3.8, 3",
            "pipelined upserts and pulls around a 5: no 38 or 39 inside a reply, none before the \
             replies to the requests sent before the 5; own upserts come back through the feed",
            only_between_replies,
        ),
        Check::new(
            "feed-cursors-never-miss-with-concurrent-writers",
            "3.8, 3.4",
            "a feed followed while two writers upsert lists every document at its final time, \
             times strictly ascending; a resubscription from a cursor taken mid-way misses nothing",
            cursors,
        )
        .with_timeout(Duration::from_secs(120)),
        Check::new(
            "feed-pushes-changes-and-deletions-one-feed-per-connection",
            "3.8, 3.5",
            "after its 39 a subscriber that sends nothing gets an entry for a later upsert (covered \
             by its 34) and one for a doc_delete (flagged deleted, at the 35's time); a second 5 \
             is invalid_request and the first feed goes on",
            pushes,
        ),
        Check::new(
            "auth-read-only-token-may-subscribe",
            "3.8, 3.7",
            "a read-only token's version 4 connection subscribes: it gets the listing and its 39, \
             a write on it is read_only, and its feed goes on with a later change",
            read_only_subscribes,
        ),
    ]
}

// ---- reading a feed ----

/// What a feed has sent so far, with the order rules of 3.8 applied to
/// every frame as it comes.
struct FeedLog {
    label: String,
    /// Every entry, in the order they came (of every document: the
    /// namespace is shared).
    entries: Vec<FeedEntry>,
    /// The largest time of a 38 entry or a 39 so far: the cursor a client
    /// keeps.
    cursor: Time,
    /// The 39s so far.
    heartbeats: Vec<Time>,
}

impl FeedLog {
    fn new(label: &str, since: Time) -> FeedLog {
        FeedLog {
            label: label.to_owned(),
            entries: Vec::new(),
            cursor: since,
            heartbeats: Vec::new(),
        }
    }

    /// Takes a 38 or a 39; false for any other frame.
    fn take(&mut self, f: &ServerFrame) -> bool {
        match f {
            ServerFrame::FeedChanges(e) => {
                for x in e {
                    // "Across a feed, times only go up", and after a 39 the
                    // feed goes on from it: a 39's time is a cursor like the
                    // largest listed time, so nothing at or below it is
                    // listed after it.
                    assert!(
                        x.time > self.cursor,
                        "{}: feed times only go up, after the cursor and every 39 (3.8): got an \
                         entry at {} for {:#x} after {}",
                        self.label,
                        x.time,
                        x.doc,
                        self.cursor
                    );
                    self.cursor = x.time;
                    self.entries.push(x);
                }
                true
            }
            ServerFrame::FeedHeartbeat { time } => {
                self.cursor = self.cursor.max(*time);
                self.heartbeats.push(*time);
                true
            }
            _ => false,
        }
    }

    /// The entries of `docs`.
    fn of<'a>(&'a self, docs: &'a BTreeSet<DocId>) -> impl Iterator<Item = &'a FeedEntry> + 'a {
        self.entries.iter().filter(|e| docs.contains(&e.doc))
    }

    /// Whether `doc` was listed at `time`.
    fn listed_at(&self, doc: DocId, time: Time) -> bool {
        self.entries.iter().any(|e| e.doc == doc && e.time == time)
    }
}

/// A version 4 connection that sent 5 feed_subscribe(since).
async fn subscriber(ctx: &Ctx, label: &str, since: Time) -> Conn {
    let (mut c, _) = ctx.client_v4(label).await;
    c.send(ClientFrame::Subscribe { since }).await;
    c
}

/// The next frame of a subscribed connection that sends nothing else: a
/// 38 or a 39. The wait is past 3.8's longest heartbeat interval (15 s), so
/// a feed that is merely quiet still sends something within it.
async fn next_feed_frame(c: &mut Conn, log: &mut FeedLog, what: &str) {
    match c.next_event_within(FEED_WAIT).await {
        Event::Frame(f) if log.take(&f) => {}
        other => panic!(
            "{}: {what}: expected a 38 or a 39, got {}",
            c.label(),
            show(&other)
        ),
    }
}

/// What synclist lists after `since` of `ours`: each one's last change.
async fn listed_times(c: &mut Conn, since: Time, ours: &BTreeSet<DocId>) -> BTreeMap<DocId, Time> {
    list_all(c, since, "synclist")
        .await
        .into_iter()
        .filter(|e| ours.contains(&e.doc))
        .map(|e| (e.doc, e.modified))
        .collect()
}

/// Longer than 3.8's heartbeat bound (15 s).
const FEED_WAIT: Duration = Duration::from_secs(20);

// ---- pushes, deletions, one feed per connection ----

/// Reads feed frames until an entry for `doc` comes; returns it.
async fn entry_for(c: &mut Conn, log: &mut FeedLog, doc: DocId, what: &str) -> FeedEntry {
    loop {
        let seen = log.entries.len();
        next_feed_frame(c, log, what).await;
        if let Some(e) = log.entries[seen..].iter().find(|e| e.doc == doc) {
            return *e;
        }
    }
}

async fn pushes(ctx: Ctx) -> Outcome {
    let (mut w, site, t0) = create_doc(&ctx, "writer", ctx.doc(), "pushed").await;
    let changed = ctx.doc();
    let (_, s) = w.upsert(changed, "changed", 0, &[], &[]).await;
    let doomed = ctx.doc();
    w.upsert(doomed, "doomed", 0, &[], &[]).await;
    let mut sub = subscriber(&ctx, "subscriber", s.sync_time.max(t0)).await;
    let mut log = FeedLog::new("subscriber", s.sync_time.max(t0));
    while log.heartbeats.is_empty() {
        next_feed_frame(&mut sub, &mut log, "the first listing's 39").await;
    }

    // A change after the listing is pushed without a request.
    let (_, after) = w
        .upsert(changed, "changed", s.sync_time, &[atom1("x", 1, site)], &[])
        .await;
    let e = entry_for(&mut sub, &mut log, changed, "the upsert's entry").await;
    assert!(
        !e.deleted && e.time > s.sync_time && e.time <= after.sync_time,
        "3.8: an upsert's entry is not flagged deleted and comes at a time its 34's sync_time \
         ({}) covers, after the cursor ({}): got {e:?}",
        after.sync_time,
        s.sync_time
    );

    // A deletion is an entry flagged deleted, at the 35's time.
    w.send(ClientFrame::DeleteDoc { doc: doomed }).await;
    let at = match w.next_event().await {
        Event::Frame(ServerFrame::DocDeleted { deleted_time, .. }) => deleted_time,
        other => panic!(
            "writer: expected a 35 for a doc_delete, got {}",
            show(&other)
        ),
    };
    let e = entry_for(&mut sub, &mut log, doomed, "the deletion's entry").await;
    assert!(
        e.deleted && e.time == at,
        "3.8: a deletion's entry is flagged deleted at the 35's deleted_time ({at}): got {e:?}"
    );

    // One feed per connection: a second 5 is refused, the first goes on.
    sub.send(ClientFrame::Subscribe { since: 0 }).await;
    loop {
        match sub.next_event_within(FEED_WAIT).await {
            Event::Frame(ServerFrame::Error(e)) => {
                assert_eq!(
                    e.code,
                    ErrorCode::INVALID_REQUEST,
                    "3.8: a second 5 on a subscribed connection is invalid_request: {}",
                    e.message
                );
                break;
            }
            Event::Frame(f) if log.take(&f) => {}
            other => panic!(
                "subscriber: after a second 5, expected feed frames then invalid_request, got {}",
                show(&other)
            ),
        }
    }
    let (_, last) = w
        .upsert(
            changed,
            "changed",
            after.sync_time,
            &[atom1("y", 2, site)],
            &[],
        )
        .await;
    let e = entry_for(&mut sub, &mut log, changed, "an entry after the second 5").await;
    assert!(
        e.time > after.sync_time && e.time <= last.sync_time,
        "3.8: after a refused second 5 the first feed goes on from where it was: expected an \
         entry after {} covered by {}, got {e:?}",
        after.sync_time,
        last.sync_time
    );
    Ok(())
}

// ---- 5 before version 4 ----

/// The frames before a 5, the replies they get, and what the case is.
type NeedsCase<'a> = (Vec<&'a [u8]>, &'static [u8], &'static str);

async fn needs_version_4(ctx: Ctx) -> Outcome {
    let five = frame_bytes(&ClientFrame::Subscribe { since: 0 });
    let v3 = hello_bytes(&ctx, ctx.replica(), 3);
    let synclist = frame_bytes(&ClientFrame::Synclist { since: u64::MAX });
    let start = frame_bytes(&ClientFrame::SessionStart {
        since: 0,
        doc: ctx.doc(),
    });
    let mut cases: Vec<NeedsCase> = vec![
        (
            vec![&v3],
            &[header::WELCOME],
            "a 5 as the first request after a version 3 hello",
        ),
        (
            vec![&v3, &synclist],
            &[header::WELCOME, header::SYNCLIST_RESPONSE],
            "a 5 after a version 3 hello and a synclist (in sync mode)",
        ),
        (
            vec![&v3, &start],
            &[header::WELCOME, header::SESSION_STARTED],
            "a 5 in a version 3 session",
        ),
    ];
    if ctx.target().token.is_none() {
        cases.push((vec![], &[], "a 5 without hello (version 1)"));
    }
    for (mut before, replies, case) in cases {
        before.push(&five);
        // `closing_case` wants exactly these replies, then the error, then
        // the close: a 38 or 39 anywhere (a feed started anyway) fails it.
        closing_case(
            &ctx,
            cat(&before),
            false,
            replies,
            ErrorCode::UNKNOWN_FRAME,
            None,
            case,
        )
        .await;
    }
    Ok(())
}

// ---- the first listing ----

/// Documents created per round while looking for a listing longer than
/// one 32.
const LISTING_BATCH: usize = 2_500;
/// Pipelined upserts in flight at once: small enough that neither side's
/// socket buffers fill while the other is not reading.
const PIPELINE: usize = 250;
/// Twice PROTOCOL.md's default synclist cap (section 5: 10,000): a server
/// whose one 32 still lists every document then is skipped, not failed.
const LISTING_MAX: usize = 20_000;

/// Creates `n` documents on `c`, pipelined; returns them.
async fn create_many(ctx: &Ctx, c: &mut Conn, n: usize) -> Vec<DocId> {
    let docs: Vec<DocId> = (0..n).map(|_| ctx.doc()).collect();
    for chunk in docs.chunks(PIPELINE) {
        let frames: Vec<ClientFrame> = chunk
            .iter()
            .map(|&d| upsert_frame(d, "", 0, &[], &[]))
            .collect();
        c.send_many(frames).await;
        for &d in chunk {
            c.recv_doc_reply(d, "pipelined upsert creating a document")
                .await
                .unwrap_or_else(|e| {
                    panic!("an upsert creating a document: {} {:?}", e.code, e.message)
                });
        }
    }
    docs
}

async fn first_listing(ctx: Ctx) -> Outcome {
    let (mut c, _, t0) = create_doc(&ctx, "creator", ctx.doc(), "").await;
    // Thousands of upserts, each batch queued behind whatever the writer
    // has from other checks (pull-reply-split-over-33s writes more than
    // max_frame_bytes): a reply may take longer than one frame's wait.
    c.set_wait(ctx.target().wait * 6);
    // More documents after t0 than one synclist(t0) lists: the server's cap
    // is its own (3.1: "may cap a response"), so grow until a 32 is cut.
    let mut ours: BTreeSet<DocId> = BTreeSet::new();
    loop {
        ours.extend(create_many(&ctx, &mut c, LISTING_BATCH).await);
        let page = c.synclist(t0).await;
        // Every one of ours is visible (its 34 came) and changed after t0:
        // a 32 that leaves one out was cut by the cap.
        if page.iter().filter(|e| ours.contains(&e.doc)).count() < ours.len() {
            break;
        }
        if ours.len() >= LISTING_MAX {
            return Err(Skipped(format!(
                "synclist listed all of {} new documents in one 32: the server's cap is above \
                 what this check creates",
                ours.len()
            )));
        }
    }
    // What synclist(0) lists of ours: ours do not change from here on.
    let listed = listed_times(&mut c, t0, &ours).await;
    assert_eq!(
        listed.len(),
        ours.len(),
        "synclist lists every new document"
    );
    let mut s = subscriber(&ctx, "subscriber", 0).await;
    let mut log = FeedLog::new("subscriber", 0);
    // Nothing is sent on the subscribed connection: the listing must go on
    // by itself, page after page, until its 39.
    while log.heartbeats.is_empty() {
        next_feed_frame(&mut s, &mut log, "the first listing, with no request sent").await;
    }
    let mut got: BTreeMap<DocId, Time> = BTreeMap::new();
    for e in log.of(&ours) {
        assert!(
            got.insert(e.doc, e.time).is_none(),
            "the first listing lists each document once (3.8): {:#x} came twice",
            e.doc
        );
    }
    let missing = ours.iter().filter(|d| !got.contains_key(d)).count();
    assert_eq!(
        missing,
        0,
        "the first listing goes on by itself until every document is listed (3.8): {missing} of \
         {} documents were not listed before its 39 (after {} entries in all)",
        ours.len(),
        log.entries.len()
    );
    assert_eq!(
        got, listed,
        "the first 38s list what synclist(since) would, each document at its last change's time"
    );
    let last = *listed.values().max().expect("documents");
    assert!(
        log.heartbeats[0] >= last,
        "the 39 that ends the first listing covers it (3.8): {} < {last}",
        log.heartbeats[0]
    );
    Ok(())
}

// ---- 38s and 39s only between replies ----

/// Pipelined requests on each side of the 5.
const BEFORE: usize = 6;
const AFTER: usize = 6;

async fn only_between_replies(ctx: Ctx) -> Outcome {
    let (mut c, _) = ctx.client_v4("subscriber").await;
    let (_, m) = c.upsert(ctx.doc(), "", 0, &[], &[]).await;
    let t0 = m.sync_time;
    let before: Vec<DocId> = (0..BEFORE).map(|_| ctx.doc()).collect();
    let after: Vec<DocId> = (0..AFTER).map(|_| ctx.doc()).collect();
    // Each request but the 5, with the document its reply is for, and
    // whether it creates that document.
    let mut requests: Vec<(ClientFrame, DocId, bool)> = Vec::new();
    for &d in &before {
        requests.push((upsert_frame(d, "before", 0, &[], &[]), d, true));
        requests.push((ClientFrame::Pull { doc: d, since: 0 }, d, false));
    }
    let n_before = requests.len();
    for &d in &after {
        requests.push((upsert_frame(d, "after", 0, &[], &[]), d, true));
    }
    for &d in before.iter().chain(&after) {
        requests.push((ClientFrame::Pull { doc: d, since: t0 }, d, false));
    }
    // From t0, the feed has entries to send as soon as the first upserts
    // commit: a server that started it at once would send them too early.
    let mut frames: Vec<ClientFrame> = requests.iter().map(|r| r.0.clone()).collect();
    frames.insert(n_before, ClientFrame::Subscribe { since: t0 });
    c.send_many(frames).await;

    let ours: BTreeSet<DocId> = before.iter().chain(&after).copied().collect();
    let mut log = FeedLog::new("subscriber", t0);
    // The 34's sync_time of each creating upsert.
    let mut created: BTreeMap<DocId, Time> = BTreeMap::new();
    let mut answered = 0;
    let mut in_reply = false;
    let unlisted = |log: &FeedLog| -> Vec<DocId> {
        ours.iter()
            .filter(|d| !log.of(&ours).any(|e| e.doc == **d))
            .copied()
            .collect()
    };
    while answered < requests.len() || !unlisted(&log).is_empty() {
        // Replies come at once; our changes are pushed at once too (3.8:
        // "a 38 is pushed whenever documents change").
        let f = match c.next_event_within(FEED_WAIT).await {
            Event::Frame(f) => f,
            other => panic!(
                "expected every reply and a feed entry for each of our documents; after \
                 {answered} of {} replies, with {} not listed, got {}",
                requests.len(),
                unlisted(&log)
                    .iter()
                    .map(|d| format!("{d:#x}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                show(&other)
            ),
        };
        let header = f.header();
        if log.take(&f) {
            assert!(
                !in_reply,
                "a 38 or 39 is never sent inside a reply (3.8): got a {header} between a 33 and its 34"
            );
            assert!(
                answered >= n_before,
                "the subscription's first 38 comes after the replies to every request sent \
                 before the 5 (3.8): got a {header} after {answered} of the {n_before} replies"
            );
            continue;
        }
        let Some((_, doc, creates)) = requests.get(answered) else {
            panic!(
                "every request is answered; then only 38s and 39s: got {}",
                crate::conn::describe(&f)
            );
        };
        match f {
            ServerFrame::DocResponse(r) if r.doc == *doc => in_reply = true,
            ServerFrame::DocResponseRuns(r) if r.doc == *doc => in_reply = true,
            ServerFrame::DocSync {
                doc: d, sync_time, ..
            } if d == *doc && in_reply => {
                in_reply = false;
                answered += 1;
                if *creates {
                    created.insert(d, sync_time);
                }
            }
            other => panic!(
                "replies come in the order of the requests (3): reply {answered} is 33s (or 37s) \
                 then a 34 for {doc:#x}; got {}",
                crate::conn::describe(&other)
            ),
        }
    }
    // Own upserts come back through the feed like anyone's: at the time of
    // the change, which the 34 covers (3.1: its sync_time "covers this
    // upsert's changes"); `FeedLog` held them after the cursor.
    for e in log.of(&ours) {
        assert!(
            e.time <= created[&e.doc],
            "a connection's own upsert comes back through its feed at its time (3.8): {:#x} \
             listed at {}, its 34 said {}, the feed is from {t0}",
            e.doc,
            e.time,
            created[&e.doc]
        );
    }
    Ok(())
}

// ---- cursors with concurrent writers ----

const FEED_DOCS: usize = 5;
const FEED_WRITERS: usize = 2;
const FEED_ROUNDS: usize = 12;
/// Documents touched per round, pipelined.
const FEED_BATCH: usize = 3;

/// Upserts one atom to a few of `docs` per round. Half-way it tells
/// `half` and waits for `go`, so that a cursor taken then comes before
/// every change of the second half.
async fn feed_writer(
    ctx: Ctx,
    w: usize,
    docs: Vec<DocId>,
    half: tokio::sync::oneshot::Sender<()>,
    mut go: tokio::sync::watch::Receiver<bool>,
) {
    let (mut c, _) = ctx.client(&format!("writer {w}")).await;
    let mut rng = crate::rng::Rng::new(ctx.seed() ^ (300 + w as u64));
    // This writer's site and last sync time per document (the writers
    // create them together: whichever comes first creates).
    let mut state: BTreeMap<DocId, (u8, Time)> = BTreeMap::new();
    for &d in &docs {
        let (_, s) = c.upsert(d, "feed", 0, &[], &[]).await;
        state.insert(d, (s.site, s.sync_time));
    }
    let mut half = Some(half);
    let mut ident = 0u32;
    for round in 0..FEED_ROUNDS {
        if round == FEED_ROUNDS / 2
            && let Some(h) = half.take()
        {
            let _ = h.send(());
            go.wait_for(|g| *g).await.expect("the check waits for us");
        }
        let mut batch: Vec<DocId> = Vec::new();
        while batch.len() < FEED_BATCH {
            let d = docs[rng.below(docs.len())];
            if !batch.contains(&d) {
                batch.push(d);
            }
        }
        let frames: Vec<ClientFrame> = batch
            .iter()
            .map(|d| {
                ident += 1;
                let (site, since) = state[d];
                upsert_frame(*d, "feed", since, &[atom1(&rng.word(), ident, site)], &[])
            })
            .collect();
        c.send_many(frames).await;
        for &d in &batch {
            let (_, s) = c
                .recv_doc_reply(d, "pipelined upsert")
                .await
                .unwrap_or_else(|e| {
                    panic!("writer {w}: upsert refused: {} {:?}", e.code, e.message)
                });
            state.get_mut(&d).expect("ours").1 = s.sync_time;
        }
    }
}

/// Follows a feed from `since` until `finals` holds every document's
/// final time and the feed has listed each at it (those changed after
/// `since`: a feed lists what comes after its cursor). Publishes its cursor
/// in `cursor`.
async fn follow(
    mut c: Conn,
    since: Time,
    cursor: Arc<AtomicU64>,
    finals: tokio::sync::watch::Receiver<Option<BTreeMap<DocId, Time>>>,
) -> FeedLog {
    let label = c.label().to_owned();
    let mut log = FeedLog::new(&label, since);
    let mut deadline: Option<Instant> = None;
    loop {
        if let Some(f) = finals.borrow().as_ref() {
            let missing: Vec<String> = f
                .iter()
                .filter(|&(d, t)| *t > since && !log.listed_at(*d, *t))
                .map(|(d, t)| format!("{d:#x} at {t}"))
                .collect();
            if missing.is_empty() {
                return log;
            }
            // The final changes are committed (their 34s came): the feed
            // pushes them now, not at the next heartbeat.
            let d = *deadline.get_or_insert_with(|| Instant::now() + FEED_WAIT);
            assert!(
                Instant::now() < d,
                "{label}: following its cursor, a feed lists every change (3.8): {:?} after the \
                 writers finished it had not listed {} of the documents at their final time \
                 ({missing:?}); its cursor is {}",
                FEED_WAIT,
                missing.len(),
                log.cursor
            );
        }
        match c.next_event_within(Duration::from_millis(100)).await {
            Event::Frame(f) => {
                assert!(
                    log.take(&f),
                    "{label}: a subscribed connection that sends nothing gets only 38s and 39s: \
                     got {}",
                    crate::conn::describe(&f)
                );
                cursor.store(log.cursor, Ordering::SeqCst);
            }
            Event::Timeout => {}
            other => panic!("{label}: expected 38s and 39s, got {}", show(&other)),
        }
    }
}

async fn cursors(ctx: Ctx) -> Outcome {
    let (mut marker, _, t0) = create_doc(&ctx, "marker", ctx.doc(), "").await;
    let docs: Vec<DocId> = (0..FEED_DOCS).map(|_| ctx.doc()).collect();
    let ours: BTreeSet<DocId> = docs.iter().copied().collect();
    let (finals_tx, finals_rx) = tokio::sync::watch::channel(None);
    let first_cursor = Arc::new(AtomicU64::new(t0));
    let first = tokio::spawn(follow(
        subscriber(&ctx, "follower from t0", t0).await,
        t0,
        first_cursor.clone(),
        finals_rx.clone(),
    ));
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let mut writers = tokio::task::JoinSet::new();
    let mut halves = Vec::new();
    for w in 0..FEED_WRITERS {
        let (tx, rx) = tokio::sync::oneshot::channel();
        halves.push(rx);
        writers.spawn(feed_writer(ctx.clone(), w, docs.clone(), tx, go_rx.clone()));
    }
    for h in halves {
        if h.await.is_err() {
            // A writer ended early: its panic says why.
            while let Some(r) = writers.join_next().await {
                r.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            }
        }
    }
    // Mid-way, the writers paused: the first follower's cursor once it has
    // heard of their first half.
    let wait = Instant::now() + FEED_WAIT;
    let mid = loop {
        let m = first_cursor.load(Ordering::SeqCst);
        if m > t0 {
            break m;
        }
        assert!(
            Instant::now() < wait,
            "a feed pushes changes (3.8): the feed from {t0} listed nothing within {FEED_WAIT:?} \
             of two writers' changes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let second = tokio::spawn(follow(
        subscriber(&ctx, "follower from a mid-way cursor", mid).await,
        mid,
        Arc::new(AtomicU64::new(mid)),
        finals_rx,
    ));
    go_tx.send_replace(true);
    while let Some(r) = writers.join_next().await {
        r.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }
    // The truth: each document's last change time, from a synclist on a
    // connection that took no part in the writing (from t0: ours are all
    // after it).
    let finals = listed_times(&mut marker, t0, &ours).await;
    assert_eq!(
        finals.len(),
        FEED_DOCS,
        "synclist lists every written document"
    );
    // The second half's changes were made after `mid` was returned, so
    // they have later times (3.4): the second feed has those to list.
    assert!(
        finals.values().any(|&t| t > mid),
        "changes made after the time {mid} was listed have later times (3.4): got final times \
         {finals:?}"
    );
    finals_tx.send_replace(Some(finals));
    // Each follower returns once it listed every final time after its
    // cursor; its `FeedLog` held each entry after its cursor and every
    // earlier entry.
    for f in [first, second] {
        f.await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }
    Ok(())
}

// ---- read-only tokens ----

async fn read_only_subscribes(ctx: Ctx) -> Outcome {
    let Some(ro) = ctx.target().read_only_token.clone() else {
        return Err(Skipped(
            "no read-only token given (--read-only-token): nothing to subscribe with".into(),
        ));
    };
    let (mut w, _, t0) = create_doc(&ctx, "writer", ctx.doc(), "").await;
    let doc = ctx.doc();
    let (_, s) = w.upsert(doc, "read by a feed", 0, &[], &[]).await;
    let listed = list_all(&mut w, t0, "synclist")
        .await
        .into_iter()
        .find(|e| e.doc == doc)
        .expect("synclist lists the new document")
        .modified;
    let label = "read-only subscriber";
    let mut c = ctx.raw_conn(label).await;
    let welcome = c.hello_version(ctx.replica(), &ro, 4).await;
    assert_eq!(
        welcome.version, 4,
        "a hello with version 4: expected welcome with version 4 (6)"
    );
    c.send(ClientFrame::Subscribe { since: t0 }).await;
    let mut log = FeedLog::new(label, t0);
    while log.heartbeats.is_empty() {
        next_feed_frame(
            &mut c,
            &mut log,
            "a read-only token's feed (a feed is a read)",
        )
        .await;
    }
    assert!(
        log.listed_at(doc, listed),
        "a read-only token's first listing lists the namespace's documents (3.8): {doc:#x} at \
         {listed} is not among {} entries",
        log.entries.len()
    );
    // The token really is read-only (or this check would say nothing of
    // read-only tokens): a write on the subscribed connection is refused,
    // and the connection stays (3.7).
    c.send(upsert_frame(ctx.doc(), "", 0, &[], &[])).await;
    loop {
        match c.next_event_within(FEED_WAIT).await {
            Event::Frame(f) if log.take(&f) => {}
            Event::Frame(ServerFrame::Error(e)) if e.code == ErrorCode::READ_ONLY => break,
            other => panic!(
                "{label}: an upsert with a read-only token: expected error read_only (3.7), got {}",
                show(&other)
            ),
        }
    }
    // And its feed goes on: a later change is pushed.
    let (_, s2) = w
        .upsert(
            doc,
            "read by a feed",
            s.sync_time,
            &[atom1("x", 1, s.site)],
            &[],
        )
        .await;
    let deadline = Instant::now() + FEED_WAIT;
    while !log.entries.iter().any(|e| e.doc == doc && e.time > listed) {
        assert!(
            Instant::now() < deadline,
            "{label}: a 38 is pushed whenever documents change (3.8): no entry for {doc:#x} \
             within {FEED_WAIT:?} of its change at {}",
            s2.sync_time
        );
        next_feed_frame(&mut c, &mut log, "a change after the read_only refusal").await;
    }
    let e = log
        .entries
        .iter()
        .rfind(|e| e.doc == doc)
        .expect("just listed");
    assert!(
        e.time <= s2.sync_time && !e.deleted,
        "the change is listed at its time, which its 34 ({}) covers, not deleted: got {e:?}",
        s2.sync_time
    );
    Ok(())
}
