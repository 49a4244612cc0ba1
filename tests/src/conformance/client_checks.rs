//! Client checks: a client driven through the rules a client must follow,
//! against the scripted [`FakeServer`].
//!
//! The client is reached through [`ClientUnderTest`] (made by a
//! [`ClientFactory`] on a fresh folder for every check), so any client can
//! be checked by implementing it; `tests/client_conformance.rs` does so for
//! the reference SDK. Besides each check's own expectations, every frame
//! the client sends is held to the rules listed in [`super::fake_server`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use notesync_protocol::{
    Allocator, Atom, ClientFrame, DocId, ErrorCode, Level, Pid, ServerFrame, SessionDelete,
    SessionInsert, Time,
};

use super::fake_server::{
    Applied, FakeConn, FakeServer, World, serve_one_sync, serve_sync, show_client,
};
use super::{Check, Outcome};
use crate::rng::Rng;

#[path = "client_checks_runs.rs"]
mod runs;

#[path = "client_checks_feed.rs"]
mod feed;

/// A client, as the checks drive it. Text positions are char indexes.
pub trait ClientUnderTest: Send + Sync {
    /// Creates a note while offline; returns its document id.
    fn create(&mut self, name: &str) -> DocId;
    fn insert(&mut self, doc: DocId, index: usize, text: &str);
    fn delete(&mut self, doc: DocId, range: Range<usize>);
    /// The note's text, if the client has the note.
    fn text(&self, doc: DocId) -> Option<String>;
    /// The note's ops not yet acknowledged by the server (by a 34 or 69).
    fn pending(&self, doc: DocId) -> usize;
    /// One sync in sync mode (PROTOCOL.md 3.1): `Err` with the client's
    /// reason if it failed.
    fn sync(&mut self) -> BoxFuture<'_, Result<(), String>>;
    /// Opens a live session on a note the client has (it connects by
    /// itself, and reconnects by itself when the connection drops).
    fn open_session(&mut self, doc: DocId);
    /// Edits through the open session.
    fn session_insert(&mut self, doc: DocId, index: usize, text: &str);
    fn session_delete(&mut self, doc: DocId, range: Range<usize>);
    /// Ends the session (its connection closes).
    fn close_session(&mut self, doc: DocId) -> BoxFuture<'_, ()>;
    /// Deletes a note (PROTOCOL.md 3.5): here at once, on the server at the
    /// next sync.
    fn delete_note(&mut self, doc: DocId);
    /// The text the client kept of a note deleted elsewhere while it had
    /// edits of it the server never took (3.5), if it kept any.
    fn kept_text(&self, doc: DocId) -> Option<String>;
    /// Starts the client's background sync, which follows the server's
    /// change feed (PROTOCOL.md 3.8) and reconnects by itself when the
    /// connection drops; false if the client has none (the feed checks are
    /// then skipped).
    fn follow_feed(&mut self) -> bool {
        false
    }
}

/// Makes a client with its state in `dir`, talking to `server`.
pub trait ClientFactory: Send + Sync {
    fn open(&self, server: SocketAddr, dir: &Path) -> Box<dyn ClientUnderTest>;
}

/// What a client check runs on.
#[derive(Clone)]
pub struct ClientCtx {
    factory: Arc<dyn ClientFactory>,
    seed: u64,
}

impl ClientCtx {
    pub fn new(factory: Arc<dyn ClientFactory>, seed: u64) -> ClientCtx {
        ClientCtx { factory, seed }
    }
}

/// A fake server, its world and a fresh client.
struct Setup {
    server: FakeServer,
    world: Arc<Mutex<World>>,
    client: Box<dyn ClientUnderTest>,
    _dir: tempfile::TempDir,
    rng: Rng,
}

async fn setup(ctx: &ClientCtx) -> Setup {
    let server = FakeServer::start().await;
    let dir = tempfile::Builder::new()
        .prefix("notesync-client-conformance-")
        .tempdir()
        .expect("a temporary folder");
    let client = ctx.factory.open(server.addr(), dir.path());
    Setup {
        server,
        world: Arc::new(Mutex::new(World::default())),
        client,
        _dir: dir,
        rng: Rng::new(ctx.seed),
    }
}

impl Setup {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().expect("world lock")
    }

    /// One sync of the client, answered from the world; the client's
    /// result and the requests it made.
    async fn sync(&mut self, what: &str) -> (Result<(), String>, Vec<ClientFrame>) {
        let (r, reqs) = tokio::join!(
            self.client.sync(),
            serve_one_sync(&self.server, &self.world, what)
        );
        (r, reqs)
    }

    /// A sync that must succeed.
    async fn sync_ok(&mut self, what: &str) -> Vec<ClientFrame> {
        let (r, reqs) = self.sync(what).await;
        if let Err(e) = r {
            panic!("{what}: the client's sync failed against a correct server: {e}");
        }
        reqs
    }

    fn text(&self, doc: DocId) -> String {
        self.client
            .text(doc)
            .unwrap_or_else(|| panic!("the client does not have document {doc:#x}"))
    }

    /// The client's text equals the world's.
    fn assert_converged(&self, doc: DocId, what: &str) {
        let want = self.world().text(doc);
        assert_eq!(
            self.text(doc),
            want,
            "{what}: the client's text equals the server's"
        );
    }

    /// Waits (bounded) until the client's text is `want`.
    async fn eventually_text(&self, doc: DocId, want: &str, what: &str) {
        let deadline = tokio::time::Instant::now() + self.server.wait;
        loop {
            let got = self.client.text(doc);
            if got.as_deref() == Some(want) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{what}: expected the client's text to become {want:?}, it is {got:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits (bounded) until the client has taken every ack sent.
    async fn settled(&self, doc: DocId, what: &str) {
        let deadline = tokio::time::Instant::now() + self.server.wait;
        while self.client.pending(doc) > 0 {
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{what}: every op was acknowledged, but the client still counts {} pending",
                    self.client.pending(doc)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A remote document of `atoms` (data, ident) by `site`.
    fn remote_doc(&mut self, name: &str, site: u8, atoms: &[(&str, u32)]) -> (DocId, Time) {
        let doc = self.rng.next_u128() | 1;
        let mut w = self.world();
        w.create(doc, name);
        let atoms: Vec<Atom> = atoms
            .iter()
            .map(|&(d, i)| Atom::new(d, Pid::from_levels(&[Level::new(i, site)])).unwrap())
            .collect();
        let t = w.remote_insert(doc, &atoms);
        (doc, t)
    }
}

/// Every client check.
pub fn checks() -> Vec<Check<ClientCtx>> {
    vec![
        Check::new("client-hello-first-same-replica", "1, 3", "every connection (sync, session) starts with hello version 1 to 4, with one replica id", hello_first),
        Check::new("client-v3-upserts-runs", "1.5, 3.1", "on a version-3 connection text typed forward goes as 4s whose runs hold its chars (fewer items than chars), converging through 37 replies", v3_upserts_runs),
        Check::new("client-v3-session-runs", "1.5, 3.2", "a version-3 session: typed text goes as 70s (a 70 acked as one op), deletes of consecutive chars as 71s; relayed 70s and 71s apply", v3_session_runs),
        Check::new("client-falls-back-to-version-2", "6", "a server that refuses version 3 (unsupported_version) gets a version 2 hello next, and then no 4, 70 or 71", falls_back_to_v2),
        Check::new("client-synclist-pages-then-pulls", "3.1", "synclist is repeated from the largest time received until empty; each listed document is pulled", synclist_pages),
        Check::new("client-pull-since-last-34", "3.1", "a document's next pull and upsert use the sync_time of its last 34", since_last_34),
        Check::new("client-applies-split-33s", "3.1, 5", "a reply split over several 33s is applied whole before its 34", split_33s),
        Check::new("client-replies-in-request-order", "3", "replies to pipelined or successive requests are applied to the right documents", replies_in_order),
        Check::new("client-new-note-empty-upsert-then-site", "1.3", "a note made offline: an upsert with no inserts first, then inserts with the site from its 34", new_note_site),
        Check::new("client-session-site-from-68", "1.3, 3.2", "a session's inserts carry the site from its 68, also for a note made offline", session_site_from_68),
        Check::new("client-site-0-sends-no-inserts", "1.3", "with site 0 in the 34 (no site), the client sends no insert and keeps its text", site_zero),
        Check::new("client-ids-unique-and-converging", "1.1, 1.2", "across edits, syncs and concurrent remote edits: no id sent twice with other data, no virtual id taken, texts converge", ids_unique),
        Check::new("client-session-resends-unacked", "3.2", "after a reconnect (from its last 68) the client sends again the session ops not acknowledged", resends_unacked),
        Check::new("client-session-66-for-resent-insert", "3.2", "a 66 for the client's own re-sent insert (deleted meanwhile) deletes it; the session goes on", session_66_for_resent),
        Check::new("client-session-drops-refused-op", "3.2", "a session op refused with an error before its ack is not sent again", drops_refused),
        Check::new("client-catch-up-rule", "3.2.1", "atoms received live or acked in a session and absent from the next catch-up's inserts are deleted", catch_up_rule),
        Check::new("client-upsert-resent-after-lost-34", "3.1", "ops of an upsert whose 34 never came are sent again, with the same ids and data", upsert_resent),
        Check::new("client-upsert-resent-learns-delete", "3.1", "the reply to a re-sent upsert deleting one of its inserts deletes it on the client", upsert_resent_delete),
        Check::new("client-unknown-error-code-closes", "4", "an error code the client does not know closes the connection (sync and session)", unknown_error_closes),
        Check::new("client-deletes-a-note", "3.5", "a note deleted on the client goes at once there, is deleted on the server by a 3 at the next sync (after a version 2 hello), once", deletes_a_note),
        Check::new("client-removes-a-note-deleted-elsewhere", "3.5", "a document the server answers with 35 is removed from the client and never pulled or upserted again", removes_deleted_elsewhere),
        Check::new("client-keeps-edits-of-a-deleted-note", "3.5", "edits the server never took of a note deleted elsewhere are kept (not silently lost) and do not bring it back", keeps_edits_of_deleted),
        Check::new("client-feed-resubscribes-from-its-cursor", "3.8", "a client that followed the feed and lost its connection subscribes again from the last cursor it was given (or the last whose entries it had pulled), and misses nothing", feed::resubscribes_from_cursor),
        Check::new("client-runs-stay-whole", "1.4", "a run the client types where another site typed one concurrently (forwards, backwards) stays whole, and so does the other", runs::runs_stay_whole),
        Check::new("client-resync-replaces-and-keeps-pending", "3.6", "after a 36 the 33s replace the client's copy (atoms deleted meanwhile go, though no delete was sent), and its unacknowledged edits are kept and sent", resync_keeps_pending),
    ]
    .into_iter()
    .map(|c| c.with_timeout(Duration::from_secs(60)))
    .collect()
}

/// Accepts a session connection: hello, welcome, session_start (since
/// checked against `since` if given), the world's 33s and 68.
async fn accept_session(
    s: &Setup,
    doc: DocId,
    since: Option<Time>,
    what: &str,
) -> (FakeConn, Time) {
    let mut c = s.server.accept(what).await;
    let now = s.world().now;
    c.handshake(now).await;
    let (got_since, got_doc) = c.expect_session_start().await;
    assert_eq!(
        got_doc, doc,
        "{what}: session_start for the note's document"
    );
    if let Some(want) = since {
        assert_eq!(
            got_since, want,
            "{what}: a client restarting a session sends the sync_time of its last 68 or 34 for the \
             document (3.2)"
        );
    }
    let reply = s.world().session_start(doc, got_since);
    let t68 = s.world().now;
    c.send_many(reply).await;
    (c, t68)
}

/// Reads session ops, applying each to the world and answering as a
/// server would (a 66 for a re-sent insert of a deleted id, an error for a
/// refused op), acking each unless `ack` says no; stops when `done`
/// holds after an op. Returns the ops read.
async fn session_ops(
    s: &Setup,
    c: &mut FakeConn,
    doc: DocId,
    ack: impl FnMut(usize, &ClientFrame) -> bool,
    done: impl Fn(&World, &[ClientFrame]) -> bool,
) -> Vec<ClientFrame> {
    session_ops_after(s, c, doc, 0, ack, done).await
}

/// [`session_ops`] on a connection that already sent `before` ops (the
/// count a 69 carries goes on from there).
async fn session_ops_after(
    s: &Setup,
    c: &mut FakeConn,
    doc: DocId,
    before: u64,
    mut ack: impl FnMut(usize, &ClientFrame) -> bool,
    done: impl Fn(&World, &[ClientFrame]) -> bool,
) -> Vec<ClientFrame> {
    let mut ops = Vec::new();
    let mut count = before;
    while !done(&s.world(), &ops) {
        let f = c.recv("a session op").await;
        // A 70 or 71 is its chars or ids, and one op (1.5, 3.2).
        let parts: Vec<ClientFrame> = match &f {
            ClientFrame::Insert(_) | ClientFrame::Delete(_) | ClientFrame::Rename(_) => {
                vec![f.clone()]
            }
            ClientFrame::InsertRun(r) => r.expand().map(ClientFrame::Insert).collect(),
            ClientFrame::DeleteRange(r) => r.expand().map(ClientFrame::Delete).collect(),
            _ => panic!(
                "{}: in session mode a client sends only 65, 66, 67 (and 70, 71 on version 3) (3): got {}",
                c.label,
                show_client(&f)
            ),
        };
        count += 1;
        let mut out = Vec::new();
        let mut refused = false;
        for part in &parts {
            match s.world().session_op(doc, part) {
                Applied::ResentDeleted(by) => {
                    if let ClientFrame::Insert(i) = part {
                        out.push(ServerFrame::Delete(SessionDelete {
                            site: by,
                            pid: i.atom.pid().clone(),
                        }));
                    }
                }
                // A frame refused as a whole gets one error (3.2).
                Applied::Refused(code) if !refused || code == ErrorCode::ID_CONFLICT => {
                    refused = true;
                    out.push(ServerFrame::Error(notesync_protocol::ErrorFrame::new(
                        code,
                        code.name(),
                    )))
                }
                _ => {}
            }
        }
        if ack(ops.len(), &f) {
            out.push(ServerFrame::SessionAck { count });
        }
        c.send_many(out).await;
        ops.push(f);
    }
    ops
}

fn ins_of(ops: &[ClientFrame]) -> Vec<Atom> {
    ops.iter()
        .flat_map(|f| match f {
            ClientFrame::Insert(i) => vec![i.atom.clone()],
            ClientFrame::InsertRun(r) => r.expand().map(|i| i.atom).collect(),
            _ => Vec::new(),
        })
        .collect()
}

async fn hello_first(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let doc = s.client.create("first");
    s.client.insert(doc, 0, "hi");
    s.sync_ok("sync 1").await;
    s.sync_ok("sync 2").await;
    s.client.open_session(doc);
    let (mut c, _) = accept_session(&s, doc, None, "session").await;
    s.client.close_session(doc).await;
    c.expect_closed("the session was closed").await;
    assert_eq!(
        s.server.connections(),
        3,
        "two syncs and a session: three connections"
    );
    // Each connection's first frame was checked to be hello v1, with the
    // replica id of the first.
    Ok(())
}

async fn synclist_pages(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let docs: Vec<DocId> = (0..5u32)
        .map(|i| {
            s.remote_doc(&format!("doc {i}"), 5, &[(&format!("text {i}"), 10 + i)])
                .0
        })
        .collect();
    s.world().synclist_cap = 2;
    let world_before = s.world().clone();
    let reqs = s.sync_ok("sync").await;
    let lists: Vec<Time> = reqs
        .iter()
        .filter_map(|f| match f {
            ClientFrame::Synclist { since } => Some(*since),
            _ => None,
        })
        .collect();
    assert!(
        !lists.is_empty(),
        "a sync lists what changed (3.1): no synclist was sent"
    );
    for (i, since) in lists.iter().enumerate() {
        let page = world_before.listing(*since);
        match (page.last(), lists.get(i + 1)) {
            (Some(last), Some(next)) => assert_eq!(
                *next, last.modified,
                "after a 32 (capped at 2 entries), the client repeats synclist with the largest time it \
                 received (3.1): expected since {}, got {next}",
                last.modified
            ),
            (Some(last), None) => panic!(
                "the client stopped listing after a non-empty 32 (last time {}); it must repeat synclist \
                 until a response is empty (3.1)",
                last.modified
            ),
            (None, Some(next)) => {
                panic!("the client listed again (since {next}) after an empty 32")
            }
            (None, None) => {}
        }
    }
    let pulls: Vec<(DocId, Time)> = reqs
        .iter()
        .filter_map(|f| match f {
            ClientFrame::Pull { doc, since } => Some((*doc, *since)),
            _ => None,
        })
        .collect();
    for &d in &docs {
        let n = pulls.iter().filter(|(x, _)| *x == d).count();
        assert_eq!(
            n, 1,
            "each listed document is pulled once (3.1): {d:#x} was pulled {n} times"
        );
        s.assert_converged(d, "after the sync");
    }
    for (d, since) in pulls {
        assert_eq!(
            since, 0,
            "a document new to the client is pulled since 0: {d:#x} since {since}"
        );
    }
    Ok(())
}

async fn since_last_34(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let (doc, _) = s.remote_doc("d", 5, &[("ab", 10), ("c", 20)]);
    s.sync_ok("sync 1").await;
    let t1 = s.world().now;
    s.world().remote_insert(
        doc,
        &[Atom::new("z", Pid::from_levels(&[Level::new(30, 5)])).unwrap()],
    );
    let reqs = s.sync_ok("sync 2").await;
    let pulls: Vec<Time> = reqs
        .iter()
        .filter_map(|f| match f {
            ClientFrame::Pull { doc: d, since } if *d == doc => Some(*since),
            _ => None,
        })
        .collect();
    assert_eq!(
        pulls,
        vec![t1],
        "the next pull of a document is since the sync_time of its last 34 (3.1: the client stores it \
         as the document's last sync time)"
    );
    s.assert_converged(doc, "after sync 2");
    let t2 = s.world().now;
    let n = s.text(doc).chars().count();
    s.client.insert(doc, n, "!");
    let reqs = s.sync_ok("sync 3").await;
    let ups: Vec<Time> = reqs
        .iter()
        .filter_map(|f| match f {
            ClientFrame::Upsert(u) if u.doc == doc => Some(u.since),
            _ => None,
        })
        .collect();
    assert!(!ups.is_empty(), "a local edit is sent by an upsert");
    assert!(
        ups.iter().all(|&t| t == t2),
        "an upsert is since the sync_time of the document's last 34 ({t2}): got {ups:?}"
    );
    s.assert_converged(doc, "after sync 3");
    Ok(())
}

async fn split_33s(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let atoms: Vec<(String, u32)> = (0..7u32).map(|i| (format!("p{i}"), 10 * (i + 1))).collect();
    let refs: Vec<(&str, u32)> = atoms.iter().map(|(d, i)| (d.as_str(), *i)).collect();
    let (doc, _) = s.remote_doc("split", 5, &refs);
    s.world().per_33 = 2;
    s.sync_ok("sync 1").await;
    s.assert_converged(doc, "a pull answered by four 33s");
    {
        let mut w = s.world();
        let more: Vec<Atom> = (0..3u32)
            .map(|i| {
                Atom::new(
                    format!("n{i}"),
                    Pid::from_levels(&[Level::new(15 + 10 * i, 6)]),
                )
                .unwrap()
            })
            .collect();
        w.remote_insert(doc, &more);
        w.remote_delete(
            doc,
            &[
                Pid::from_levels(&[Level::new(10, 5)]),
                Pid::from_levels(&[Level::new(40, 5)]),
            ],
            6,
        );
    }
    s.sync_ok("sync 2").await;
    s.assert_converged(doc, "a delta of inserts and deletes answered by three 33s");
    Ok(())
}

async fn replies_in_order(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let own = s.client.create("own");
    s.client.insert(own, 0, "mine");
    let refused = s.client.create("refused");
    s.client.insert(refused, 0, "kept");
    s.sync_ok("sync 1").await;
    let docs: Vec<DocId> = ["alpha", "beta", "gamma"]
        .iter()
        .enumerate()
        .map(|(i, t)| s.remote_doc(t, 5, &[(t, 10 + i as u32)]).0)
        .collect();
    // Among the replies, a refusal that keeps the connection (read_only):
    // the replies after it still belong to the requests after it.
    let n = s.text(refused).chars().count();
    s.client.insert(refused, n, " more");
    s.world()
        .refuse_upserts
        .insert(refused, ErrorCode::READ_ONLY);
    let n = s.text(own).chars().count();
    s.client.insert(own, n, " and more");
    s.world().remote_insert(
        own,
        &[Atom::new("+", Pid::from_levels(&[Level::new(1, 5)])).unwrap()],
    );
    let reqs = s.sync("sync 2").await.1;
    assert!(
        reqs.iter()
            .any(|f| matches!(f, ClientFrame::Upsert(u) if u.doc == refused)),
        "the note with new text is upserted"
    );
    for d in docs.into_iter().chain([own]) {
        s.assert_converged(d, "replies in request order, one of them a refusal");
    }
    assert_eq!(
        s.text(refused),
        "kept more",
        "a refused upsert's text stays on the client"
    );
    Ok(())
}

async fn new_note_site(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    s.world().default_site = 42;
    let doc = s.client.create("offline");
    s.client.insert(doc, 0, "hello world");
    s.client.insert(doc, 5, ",");
    s.client.delete(doc, 0..1);
    s.client.insert(doc, 0, "H");
    s.sync_ok("first sync").await;
    let t = s.server.traffic();
    let ups = t.upserts(doc);
    assert!(
        ups.first().is_some_and(|u| u.inserts.is_empty()),
        "a note made offline first goes out as an upsert with no inserts (1.3), got {:?}",
        ups.first().map(|u| u.inserts.len())
    );
    assert!(
        !t.inserts(doc).is_empty(),
        "then its inserts go out, with the site from the 34"
    );
    s.assert_converged(doc, "after the first sync");
    assert_eq!(s.text(doc), "Hello, world");
    Ok(())
}

async fn session_site_from_68(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    s.world().default_site = 77;
    let doc = s.client.create("live");
    s.client.insert(doc, 0, "typed offline ");
    s.client.open_session(doc);
    let (mut c, _) = accept_session(&s, doc, Some(0), "session").await;
    let want = "typed offline live";
    s.client.session_insert(doc, 14, "live");
    session_ops(&s, &mut c, doc, |_, _| true, |w, _| w.text(doc) == want).await;
    s.eventually_text(doc, want, "session").await;
    s.client.close_session(doc).await;
    c.expect_closed("the session was closed").await;
    assert!(
        s.server.traffic().sites.get(&doc) == Some(&77),
        "the session's inserts were checked against site 77 from the 68"
    );
    Ok(())
}

async fn site_zero(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    s.world().default_site = 0;
    let doc = s.client.create("crowded");
    s.client.insert(doc, 0, "kept locally");
    // A client may report the missing site as a failed sync; either way it
    // sends no insert (checked as frames arrive).
    let _ = s.sync("sync 1").await;
    let _ = s.sync("sync 2").await;
    assert!(
        s.server.traffic().inserts(doc).is_empty(),
        "no insert without a site"
    );
    assert_eq!(
        s.text(doc),
        "kept locally",
        "the client keeps the text it could not send (1.3)"
    );
    Ok(())
}

/// The world's full sequence of a document (atoms, tombstones and the
/// virtual ids of atoms of two or more chars), in order.
fn full_sequence(w: &World, doc: DocId) -> Vec<Pid> {
    let mut keys: BTreeSet<Pid> = BTreeSet::new();
    for (p, a) in &w.docs[&doc].atoms {
        keys.insert(p.clone());
        if let Some(d) = &a.data {
            let n = d.chars().count();
            if n >= 2 {
                let mut levels: Vec<Level> = p.levels().collect();
                for j in 0..n {
                    levels.push(Level::new(j as u32, p.creator()));
                    keys.insert(Pid::from_levels(&levels));
                    levels.pop();
                }
            }
        }
    }
    keys.into_iter().collect()
}

async fn ids_unique(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let (doc, _) = s.remote_doc(
        "busy",
        5,
        &[("hello world", 100), ("é🙂z", 200), ("x", 300)],
    );
    s.sync_ok("first sync").await;
    let mut rng = Rng::new(ctx.seed ^ 0x1d5);
    let mut remote = Allocator::new(6, doc, ctx.seed).expect("site 6");
    for round in 0..6 {
        for _ in 0..4 {
            let n = s.text(doc).chars().count();
            if n > 2 && rng.percent(40) {
                let a = rng.below(n - 1);
                let b = (a + 1 + rng.below(3)).min(n);
                s.client.delete(doc, a..b);
            } else {
                let w = rng.word();
                s.client.insert(doc, rng.below(n + 1), &w);
            }
        }
        {
            // Another replica (site 6) inserts between adjacent entries and
            // deletes chars, including chars inside atoms (virtual ids).
            let mut w = s.world();
            let seq = full_sequence(&w, doc);
            let i = rng.below(seq.len() + 1);
            let left = if i == 0 { None } else { Some(&seq[i - 1]) };
            let pid = remote
                .between(left, seq.get(i))
                .expect("an id between adjacent entries");
            w.remote_insert(doc, &[Atom::new(format!("r{round}"), pid).unwrap()]);
            let live: Vec<Pid> = full_sequence(&w, doc)
                .into_iter()
                .filter(|p| {
                    let a = w.docs[&doc].atoms.get(p);
                    let multi = a
                        .and_then(|a| a.data.as_ref())
                        .is_some_and(|d| d.chars().count() >= 2);
                    !multi && a.is_none_or(|a| a.deleted.is_none())
                })
                .collect();
            if !live.is_empty() {
                let p = live[rng.below(live.len())].clone();
                w.remote_delete(doc, &[p], 6);
            }
        }
        s.sync_ok(&format!("sync {round}")).await;
        s.assert_converged(doc, &format!("after round {round}"));
    }
    // Live edits too.
    s.client.open_session(doc);
    let since = s.world().now;
    let (mut c, _) = accept_session(&s, doc, Some(since), "session").await;
    let n = s.text(doc).chars().count();
    s.client.session_insert(doc, n / 2, "live");
    s.client.session_delete(doc, 0..2);
    let want = s.text(doc);
    session_ops(&s, &mut c, doc, |_, _| true, |w, _| w.text(doc) == want).await;
    s.client.close_session(doc).await;
    c.expect_closed("the session was closed").await;
    s.assert_converged(doc, "after the session");
    Ok(())
}

/// A note the client has synced (site 42), with `text` by site 5.
async fn synced_note(s: &mut Setup, text: &str) -> (DocId, Time) {
    let (doc, _) = s.remote_doc("shared", 5, &[(text, 1000)]);
    s.sync_ok("first sync").await;
    let t = s.world().now;
    s.assert_converged(doc, "after the first sync");
    (doc, t)
}

/// The client types `chars` one at a time at the end, in its session;
/// the fake stores them all, acks the first `acked`, and drops the
/// connection. Returns the 68's time and the inserts sent.
async fn type_then_drop(
    s: &mut Setup,
    doc: DocId,
    since: Time,
    chars: &str,
    acked: usize,
) -> (Time, Vec<Atom>) {
    s.client.open_session(doc);
    let (mut c, t68) = accept_session(s, doc, Some(since), "session").await;
    let base = s.text(doc);
    let mut want = base.clone();
    // One char at a time, each typed once the previous one's op arrived,
    // so each is an op of its own even for a client that sends the chars
    // it has queued as one run (a 70, 1.5): the first `acked` ops are the
    // first `acked` chars.
    let mut ops = Vec::new();
    for ch in chars.chars() {
        let n = want.chars().count();
        s.client.session_insert(doc, n, &ch.to_string());
        want.push(ch);
        let before = ops.len();
        let more = session_ops_after(
            s,
            &mut c,
            doc,
            before as u64,
            |i, _| before + i < acked,
            |w, _| w.text(doc) == want,
        )
        .await;
        ops.extend(more);
    }
    drop(c);
    (t68, ins_of(&ops))
}

async fn resends_unacked(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let (doc, t1) = synced_note(&mut s, "base ").await;
    let (t68, sent) = type_then_drop(&mut s, doc, t1, "wxyz", 2).await;
    assert!(
        sent.len() >= 2,
        "typed four chars: expected inserts, got {sent:?}"
    );
    let unacked: BTreeMap<Pid, String> = sent[2.min(sent.len())..]
        .iter()
        .map(|a| (a.pid().clone(), a.data().to_owned()))
        .collect();
    let (mut c, _) = accept_session(&s, doc, Some(t68), "session after the drop").await;
    let resent = session_ops(
        &s,
        &mut c,
        doc,
        |_, _| true,
        |_, ops| {
            let have: BTreeSet<Pid> = ins_of(ops).iter().map(|a| a.pid().clone()).collect();
            unacked.keys().all(|p| have.contains(p))
        },
    )
    .await;
    for a in ins_of(&resent) {
        if let Some(d) = unacked.get(a.pid()) {
            assert_eq!(d, a.data(), "a re-sent op carries the same data");
        }
    }
    s.eventually_text(doc, "base wxyz", "after the re-send")
        .await;
    s.client.close_session(doc).await;
    c.expect_closed("the session was closed").await;
    Ok(())
}

async fn session_66_for_resent(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let (doc, t1) = synced_note(&mut s, "base ").await;
    let (t68, sent) = type_then_drop(&mut s, doc, t1, "wxyz", 2).await;
    let victim = sent.get(2).cloned().unwrap_or_else(|| {
        panic!("typed four chars one at a time: expected four inserts, got {sent:?}")
    });
    // Another replica deleted the third char, which the client still
    // holds as unacknowledged.
    s.world().remote_delete(doc, &[victim.pid().clone()], 9);
    let conns = s.server.connections();
    let (mut c, _) = accept_session(&s, doc, Some(t68), "session after the drop").await;
    let want = s.world().text(doc);
    session_ops(
        &s,
        &mut c,
        doc,
        |_, _| true,
        |_, ops| ins_of(ops).iter().any(|a| a.pid() == victim.pid()),
    )
    .await;
    s.eventually_text(doc, &want, "the 66 for its re-sent insert deletes it")
        .await;
    // The session goes on: a new edit comes on the same connection.
    let n = s.text(doc).chars().count();
    s.client.session_insert(doc, n, "!");
    let want2 = format!("{want}!");
    session_ops(&s, &mut c, doc, |_, _| true, |w, _| w.text(doc) == want2).await;
    assert_eq!(
        s.server.connections(),
        conns + 1,
        "the client kept its connection after the 66"
    );
    s.client.close_session(doc).await;
    c.expect_closed("the session was closed").await;
    Ok(())
}

async fn drops_refused(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let (doc, t1) = synced_note(&mut s, "base ").await;
    s.client.open_session(doc);
    let (mut c, t68) = accept_session(&s, doc, Some(t1), "session").await;
    let mut want = s.text(doc);
    // Op 1 acked, op 2 refused (read_only) before the ack that covers it,
    // op 3 never acked; then the connection drops. Each char is typed once
    // the previous one's op arrived, so each is an op of its own.
    let mut ops = Vec::new();
    let mut refused = None;
    for ch in ['a', 'b', 'c'] {
        let n = want.chars().count();
        s.client.session_insert(doc, n, &ch.to_string());
        want.push(ch);
        let f = c.recv("a session op").await;
        let n = ops.len() as u64 + 1;
        match n {
            1 => {
                s.world().session_op(doc, &f);
                c.send(ServerFrame::SessionAck { count: 1 }).await;
            }
            2 => {
                refused = Some(f.clone());
                c.send_many(vec![
                    ServerFrame::Error(notesync_protocol::ErrorFrame::new(
                        ErrorCode::READ_ONLY,
                        "read only",
                    )),
                    ServerFrame::SessionAck { count: 2 },
                ])
                .await;
            }
            _ => {}
        }
        ops.push(f);
    }
    drop(c);
    let refused = refused.unwrap();
    let (mut c, _) = accept_session(&s, doc, Some(t68), "session after the drop").await;
    // Op 3 is sent again; then a new edit, after which everything older
    // has been sent.
    let third = ins_of(&ops[2..]);
    let n = s.text(doc).chars().count();
    s.client.session_insert(doc, n, "!");
    let again = session_ops(
        &s,
        &mut c,
        doc,
        |_, _| true,
        |_, got| ins_of(got).iter().any(|a| a.data() == "!"),
    )
    .await;
    assert!(
        !again.contains(&refused),
        "an op refused with an error before its ack is dropped, not sent again (3.2): got {} again",
        show_client(&refused)
    );
    for a in third {
        assert!(
            ins_of(&again).contains(&a),
            "the unacknowledged op 3 is sent again: {:?}",
            a.pid()
        );
    }
    s.client.close_session(doc).await;
    c.expect_closed("the session was closed").await;
    Ok(())
}

async fn catch_up_rule(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let (doc, t1) = synced_note(&mut s, "base ").await;
    s.client.open_session(doc);
    let (mut c, t68) = accept_session(&s, doc, Some(t1), "session").await;
    // Two atoms from another session, live.
    let y = Atom::new("Y", Pid::from_levels(&[Level::new(2000, 5)])).unwrap();
    let w_ = Atom::new("W", Pid::from_levels(&[Level::new(3000, 5)])).unwrap();
    s.world().remote_insert(doc, std::slice::from_ref(&y));
    s.world().remote_insert(doc, std::slice::from_ref(&w_));
    c.send_many(vec![
        ServerFrame::Insert(SessionInsert::new(y.clone())),
        ServerFrame::Insert(SessionInsert::new(w_.clone())),
    ])
    .await;
    s.eventually_text(doc, "base YW", "live inserts from another session")
        .await;
    // The client's own insert, acknowledged.
    s.client.session_insert(doc, 5, "Z");
    let ops = session_ops(
        &s,
        &mut c,
        doc,
        |_, _| true,
        |w, _| w.text(doc) == "base ZYW",
    )
    .await;
    let z = ins_of(&ops);
    s.settled(doc, "Z acknowledged").await;
    s.client.close_session(doc).await;
    c.expect_closed("the session was closed").await;
    // While the client is away, Y and Z are deleted.
    let mut gone = vec![y.pid().clone()];
    gone.extend(z.iter().map(|a| a.pid().clone()));
    s.world().remote_delete(doc, &gone, 5);
    let reqs = s.sync_ok("sync after the session").await;
    let catch_ups: Vec<Time> = reqs
        .iter()
        .filter_map(|f| match f {
            ClientFrame::Pull { doc: d, since } if *d == doc => Some(*since),
            ClientFrame::Upsert(u) if u.doc == doc => Some(u.since),
            _ => None,
        })
        .collect();
    assert_eq!(
        catch_ups,
        vec![t68],
        "the client catches up (a pull) since its last 68's sync_time (3.2); requests: {:?}",
        reqs.iter().map(show_client).collect::<Vec<_>>()
    );
    // The pull since t68 sends Y and Z as neither (3.1); only W is in it.
    assert_eq!(
        s.text(doc),
        "base W",
        "3.2.1: the atoms received live (Y) or acked in the session (Z) that the catch-up does not \
         insert were deleted meanwhile; the client must delete them"
    );
    s.assert_converged(doc, "after the catch-up");
    Ok(())
}

/// Serves one sync whose upsert of `doc` is applied but never answered:
/// the connection drops instead of the 34. Returns that upsert.
async fn lose_the_34(s: &mut Setup, doc: DocId) -> notesync_protocol::Upsert {
    let world = s.world.clone();
    let server = &s.server;
    let serve = async {
        let mut c = server.accept("sync whose 34 is lost").await;
        let now = world.lock().expect("world lock").now;
        c.handshake(now).await;
        let reqs = serve_sync(
            &mut c,
            &world,
            |f| matches!(f, ClientFrame::Upsert(u) if u.doc == doc),
        )
        .await;
        drop(c);
        reqs.into_iter().find_map(|f| match f {
            ClientFrame::Upsert(u) if u.doc == doc => Some(u),
            _ => None,
        })
    };
    let (r, lost) = tokio::join!(s.client.sync(), serve);
    assert!(
        r.is_err(),
        "a sync whose connection broke before the 34 does not succeed"
    );
    lost.unwrap_or_else(|| panic!("the client had ops for the note: expected an upsert of it"))
}

async fn upsert_resent(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let (doc, _) = synced_note(&mut s, "base text").await;
    s.client.insert(doc, 4, " more");
    s.client.delete(doc, 0..1);
    let first = lose_the_34(&mut s, doc).await;
    s.sync_ok("sync after the lost 34").await;
    let later: Vec<_> = s
        .server
        .traffic()
        .upserts(doc)
        .into_iter()
        .skip(1)
        .collect();
    let resent_ins: BTreeMap<Pid, String> = later
        .iter()
        .flat_map(|u| {
            u.inserts
                .iter()
                .map(|a| (a.pid.to_pid(), a.data.to_owned()))
        })
        .collect();
    let resent_del: BTreeSet<Pid> = later
        .iter()
        .flat_map(|u| u.deletes.iter().map(|p| p.to_pid()))
        .collect();
    for a in first.inserts.iter() {
        assert_eq!(
            resent_ins.get(&a.pid.to_pid()).map(String::as_str),
            Some(a.data),
            "an insert whose 34 never came is sent again with the same id and data (3.1: ops are forgotten \
             only after their 34): {:?}",
            a.pid
        );
    }
    for p in first.deletes.iter() {
        assert!(
            resent_del.contains(&p.to_pid()),
            "a delete whose 34 never came is sent again: {p:?}"
        );
    }
    s.assert_converged(doc, "after the re-send");
    Ok(())
}

async fn upsert_resent_delete(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let (doc, _) = synced_note(&mut s, "base").await;
    s.client.insert(doc, 4, " more");
    let first = lose_the_34(&mut s, doc).await;
    // Every insert of it (one atom, or a run of one-char atoms, 1.4).
    let victims: Vec<Pid> = first.inserts.iter().map(|a| a.pid.to_pid()).collect();
    assert!(!victims.is_empty(), "an insert");
    s.world().remote_delete(doc, &victims, 6);
    s.sync_ok("sync after the lost 34").await;
    s.assert_converged(
        doc,
        "the reply to the re-sent upsert deletes the atom deleted meanwhile (3.1)",
    );
    assert_eq!(s.text(doc), "base");
    Ok(())
}

async fn unknown_error_closes(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let (doc, _) = synced_note(&mut s, "base").await;
    // Sync mode: the first request gets an error code v1 does not define.
    let serve = async {
        let mut c = s.server.accept("sync").await;
        c.handshake(1).await;
        let f = c.recv("a request").await;
        c.error(ErrorCode(200), "a code from the future").await;
        c.expect_closed(&format!(
            "after error code 200 in reply to {}, a client treats an unknown code as closing (4)",
            show_client(&f)
        ))
        .await;
    };
    let (r, ()) = tokio::join!(s.client.sync(), serve);
    assert!(
        r.is_err(),
        "a sync whose connection got a closing error does not succeed"
    );
    // Session mode.
    s.client.open_session(doc);
    let since = s.world().now;
    let (mut c, _) = accept_session(&s, doc, Some(since), "session").await;
    c.error(ErrorCode(201), "another code from the future")
        .await;
    c.expect_closed(
        "after error code 201 in a session, a client treats an unknown code as closing (4)",
    )
    .await;
    s.client.close_session(doc).await;
    Ok(())
}

/// Requests about `doc` among `reqs` (pulls, upserts, deletes).
fn requests_about(reqs: &[ClientFrame], doc: DocId) -> Vec<&ClientFrame> {
    reqs.iter()
        .filter(|f| match f {
            ClientFrame::Pull { doc: d, .. } | ClientFrame::DeleteDoc { doc: d } => *d == doc,
            ClientFrame::Upsert(u) => u.doc == doc,
            _ => false,
        })
        .collect()
}

async fn deletes_a_note(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let doc = s.client.create("to delete");
    s.client.insert(doc, 0, "soon gone");
    s.sync_ok("sync 1").await;
    s.sync_ok("sync 2").await;
    assert_eq!(s.world().text(doc), "soon gone");
    s.client.delete_note(doc);
    assert_eq!(
        s.client.text(doc),
        None,
        "a deleted note is gone from the client at once"
    );
    let reqs = s.sync_ok("sync after the deletion").await;
    let about = requests_about(&reqs, doc);
    assert!(
        matches!(about.as_slice(), [ClientFrame::DeleteDoc { .. }]),
        "the sync after a deletion sends one 3 doc_delete for the note and nothing else about it, got {}",
        about
            .iter()
            .map(|f| show_client(f))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(
        s.world().docs[&doc].deleted.is_some(),
        "the server deleted it"
    );
    let reqs = s.sync_ok("a later sync").await;
    let about = requests_about(&reqs, doc);
    assert!(
        about.is_empty(),
        "a deletion the server confirmed is not sent again, and the note is not pulled back: got {}",
        about
            .iter()
            .map(|f| show_client(f))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(s.client.text(doc), None);
    Ok(())
}

async fn removes_deleted_elsewhere(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let (doc, _) = s.remote_doc("shared", 3, &[("from elsewhere", 1)]);
    s.sync_ok("sync 1").await;
    assert_eq!(s.text(doc), "from elsewhere");
    s.world().remote_delete_doc(doc);
    s.sync_ok("sync after the deletion elsewhere").await;
    assert_eq!(
        s.client.text(doc),
        None,
        "a note the server answers with 35 is removed from the client"
    );
    assert_eq!(
        s.client.kept_text(doc),
        None,
        "nothing to keep: the client had no edits of it"
    );
    let reqs = s.sync_ok("a later sync").await;
    let about = requests_about(&reqs, doc);
    assert!(
        about.is_empty(),
        "a deleted note is neither pulled nor upserted again: got {}",
        about
            .iter()
            .map(|f| show_client(f))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn keeps_edits_of_deleted(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let (doc, _) = s.remote_doc("shared", 3, &[("base", 1)]);
    s.sync_ok("sync 1").await;
    s.client.insert(doc, 4, " and my offline edit");
    s.world().remote_delete_doc(doc);
    s.sync_ok("sync after the deletion elsewhere").await;
    assert_eq!(
        s.client.text(doc),
        None,
        "the note is removed from the client"
    );
    assert_eq!(
        s.client.kept_text(doc).as_deref(),
        Some("base and my offline edit"),
        "the text with the edits the server never took is kept, not silently lost (3.5)"
    );
    assert!(
        s.world().docs[&doc].deleted.is_some() && s.world().text(doc).is_empty(),
        "the edit did not bring the document back"
    );
    let reqs = s.sync_ok("a later sync").await;
    let about = requests_about(&reqs, doc);
    assert!(
        about.is_empty(),
        "the kept text is not upserted to the deleted note: got {}",
        about
            .iter()
            .map(|f| show_client(f))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn resync_keeps_pending(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let words = [("one ", 1), ("two ", 2), ("three", 3)];
    let (edited, _) = s.remote_doc("edited offline", 3, &words);
    let (quiet, _) = s.remote_doc("not edited", 3, &words);
    s.sync_ok("sync 1").await;
    assert_eq!(s.text(edited), "one two three");
    // Offline: an edit of one note; elsewhere "two " is deleted in both,
    // and the server compacts their tombstones away.
    s.client.insert(edited, 0, "mine: ");
    {
        let mut w = s.world();
        let two = Pid::from_levels(&[Level::new(2, 3)]);
        for doc in [edited, quiet] {
            w.remote_delete(doc, std::slice::from_ref(&two), 3);
            w.compact(doc);
        }
    }
    s.sync_ok("sync after the compaction").await;
    // The edited note's upsert and the other's pull were both answered with
    // a resync: both texts now equal the server's, the edit included.
    // One atom or a run of one-char atoms (1.4): each id once, the edit's text.
    let mut sent: Vec<Atom> = s
        .server
        .traffic()
        .inserts(edited)
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    sent.sort_by(|a, b| a.pid().cmp(b.pid()));
    assert!(
        sent.windows(2).all(|w| w[0].pid() != w[1].pid())
            && sent.iter().map(|a| a.data()).collect::<String>() == "mine: ",
        "the unacknowledged insert is sent (once)"
    );
    assert_eq!(s.client.pending(edited), 0, "its 34 acknowledged the edit");
    for doc in [edited, quiet] {
        s.assert_converged(doc, "after a resync");
    }
    assert_eq!(s.text(edited), "mine: one three");
    assert_eq!(s.text(quiet), "one three");
    // The next sync is an ordinary delta again.
    s.sync_ok("sync 3").await;
    assert_eq!(s.text(edited), "mine: one three");
    Ok(())
}

/// The headers the client sent on the fake server, as sent.
fn raw_headers(s: &Setup) -> Vec<u8> {
    s.server.traffic().raw.iter().map(|(_, h)| *h).collect()
}

async fn v3_upserts_runs(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let doc = s.client.create("runs");
    s.sync_ok("first sync (the site)").await;
    // Typed forward, a char at a time, then two chars deleted.
    let text = "typed forward, one char at a time";
    for (i, c) in text.chars().enumerate() {
        s.client.insert(doc, i, &c.to_string());
    }
    s.client.delete(doc, 5..7);
    s.sync_ok("sync of the typed text").await;
    let raw = raw_headers(&s);
    assert!(
        raw.contains(&notesync_protocol::header::SYNC_DOC_UPSERT_RUNS),
        "a version-3 client upserts with 4 (1.5), got headers {raw:?}"
    );
    assert!(
        !raw.contains(&notesync_protocol::header::SYNC_DOC_UPSERT),
        "on a version-3 connection the client's upserts are 4s, got headers {raw:?}"
    );
    s.assert_converged(doc, "after the sync");
    assert_eq!(s.text(doc), "typedorward, one char at a time");
    // A remote edit comes back in a 37.
    let site = 200;
    let first = Pid::from_levels(&[notesync_protocol::Level::new(u32::MAX / 2, site)]);
    let atoms: Vec<Atom> = ["!", "!"]
        .iter()
        .zip(0u32..)
        .map(|(c, j)| Atom::new(*c, first.offset(j).expect("fits")).expect("atom"))
        .collect();
    s.world().remote_insert(doc, &atoms);
    s.sync_ok("sync of a remote run").await;
    s.assert_converged(doc, "after a 37 with a remote run");
    Ok(())
}

async fn v3_session_runs(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    let doc = s.client.create("live runs");
    s.sync_ok("first sync (the site)").await;
    s.client.open_session(doc);
    let (mut c, _) = accept_session(&s, doc, None, "session").await;
    assert_eq!(
        c.version,
        notesync_protocol::PROTOCOL_VERSION,
        "the reference client speaks its newest version (4)"
    );
    s.client.session_insert(doc, 0, "a");
    s.client.session_insert(doc, 1, "b");
    s.client.session_insert(doc, 2, "c");
    s.client.session_insert(doc, 3, "d");
    let ops = session_ops(&s, &mut c, doc, |_, _| true, |w, _| w.text(doc) == "abcd").await;
    s.eventually_text(doc, "abcd", "session").await;
    assert!(
        ins_of(&ops).len() == 4,
        "four chars typed: four one-char inserts, as 65s or in 70s (1.5)"
    );
    s.client.session_delete(doc, 1..3);
    session_ops(&s, &mut c, doc, |_, _| true, |w, _| w.text(doc) == "ad").await;
    s.eventually_text(doc, "ad", "after the delete").await;
    // Relayed runs and ranges apply.
    let site = 201;
    let first = Pid::from_levels(&[notesync_protocol::Level::new(u32::MAX - 10, site)]);
    let run = notesync_protocol::Run::new(first.clone(), "xyz").expect("run");
    let atoms: Vec<Atom> = run
        .atoms()
        .map(|(d, p)| Atom::new(d, p).expect("atom"))
        .collect();
    s.world().remote_insert(doc, &atoms);
    c.send(ServerFrame::InsertRun(
        notesync_protocol::SessionInsertRun::new(run),
    ))
    .await;
    let want = s.world().text(doc);
    s.eventually_text(doc, &want, "a relayed 70").await;
    // "xyz" is after "ad": the client deletes "xy", two consecutive ids,
    // in one edit: one 71, acked as one op.
    let at = want.find("xyz").expect("the relayed run is in the text");
    s.client.session_delete(doc, at..at + 2);
    let want = format!("{}z{}", &want[..at], &want[at + 3..]);
    let ops = session_ops(&s, &mut c, doc, |_, _| true, |w, _| w.text(doc) == want).await;
    assert!(
        matches!(ops.as_slice(), [ClientFrame::DeleteRange(r)] if r.range.count() == 2),
        "deleting two chars at consecutive ids in one edit: one 71 of two ids (1.5), got {:?}",
        ops.iter().map(show_client).collect::<Vec<_>>()
    );
    s.eventually_text(doc, &want, "after the 71").await;
    // A relayed 71 applies.
    s.world()
        .remote_delete(doc, &[first.offset(2).expect("fits")], site);
    c.send(ServerFrame::DeleteRange(
        notesync_protocol::SessionDeleteRange {
            site,
            range: notesync_protocol::IdRange::new(first.offset(2).expect("fits"), 1)
                .expect("range"),
        },
    ))
    .await;
    let want = s.world().text(doc);
    s.eventually_text(doc, &want, "a relayed 71").await;
    s.client.close_session(doc).await;
    c.expect_closed("the session was closed").await;
    Ok(())
}

/// One sync against a server that speaks only versions 1 and 2: the
/// client's hellos with 3 or later are refused, each retry asks for an
/// older version, and the one with 2 is served.
async fn sync_v2_only(s: &mut Setup, what: &str) {
    let (server, world) = (&s.server, &s.world);
    let (r, ()) = tokio::join!(s.client.sync(), async {
        let mut asked = Vec::new();
        loop {
            let mut conn = server.accept("a hello").await;
            let now = world.lock().expect("world lock").now;
            let h = conn.handshake(now).await;
            asked.push(h.version);
            if h.version < 3 {
                assert_eq!(
                    h.version, 2,
                    "{what}: after unsupported_version the client retries with the next older \
                     version, down to 2 (6); it asked {asked:?}"
                );
                serve_sync(&mut conn, world, |_| false).await;
                break;
            }
            assert!(
                asked.windows(2).all(|w| w[1] < w[0]) && asked.len() <= 3,
                "{what}: each retry after unsupported_version asks for an older version (6); \
                 it asked {asked:?}"
            );
            conn.expect_closed("after unsupported_version").await;
        }
        assert_eq!(
            asked.first().copied(),
            Some(notesync_protocol::PROTOCOL_VERSION),
            "{what}: the reference client says its newest version first"
        );
    });
    r.unwrap_or_else(|e| panic!("{what}: the sync against a version 2 server failed: {e}"));
}

async fn falls_back_to_v2(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    s.server.refuse_version_3();
    let doc = s.client.create("old server");
    sync_v2_only(&mut s, "the first sync").await;
    for (i, c) in "abc".chars().enumerate() {
        s.client.insert(doc, i, &c.to_string());
    }
    s.client.delete(doc, 0..2);
    sync_v2_only(&mut s, "a sync of typed text").await;
    let raw = raw_headers(&s);
    for h in [
        notesync_protocol::header::SYNC_DOC_UPSERT_RUNS,
        notesync_protocol::header::SESSION_INSERT_RUN,
        notesync_protocol::header::SESSION_DELETE_RANGE,
    ] {
        assert!(
            !raw.contains(&h),
            "a version 2 connection gets no {h}: got {raw:?}"
        );
    }
    s.assert_converged(doc, "after syncing with a version 2 server");
    assert_eq!(s.text(doc), "c");
    Ok(())
}
