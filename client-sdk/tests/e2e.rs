//! The SDK against a real notesync-server (embedded, on an ephemeral port).

mod common;

use common::server::{TestServer, connected_sessions, shared_note, wait_for};
use notesync_client::SessionEvent;

#[tokio::test]
async fn offline_edits_at_the_same_place_are_all_kept() {
    let (_server, [(_da, a), (_db, b)]) = TestServer::with_devices().await;
    // b gets it as a new note with its text (checked by shared_note).
    let id = shared_note(&a, &b, "shared", "hello world").await;
    assert_eq!(b.name(id).unwrap(), "shared");

    // Both offline, editing at the same places.
    a.insert(id, 5, " AAA").unwrap();
    a.delete(id, 0..1).unwrap();
    b.insert(id, 5, " BBB").unwrap();
    b.delete(id, 10..15).unwrap(); // "world"
    assert_eq!(a.text(id).unwrap(), "ello AAA world");
    assert_eq!(b.text(id).unwrap(), "hello BBB ");
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();
    a.sync_now().await.unwrap();
    let (ta, tb) = (a.text(id).unwrap(), b.text(id).unwrap());
    assert_eq!(ta, tb);
    assert!(ta.contains("AAA") && ta.contains("BBB"), "{ta:?}");
    assert!(ta == "ello AAA BBB " || ta == "ello BBB AAA ", "{ta:?}");
    // The files on disk say the same.
    let file = a.list()[0].file.clone();
    assert_eq!(std::fs::read_to_string(file).unwrap(), ta);
    for c in [&a, &b] {
        assert!(c.list().iter().all(|n| n.pending_ops == 0));
    }
}

#[tokio::test]
async fn an_offline_insert_then_delete_sends_nothing() {
    let (server, [(_da, a)]) = TestServer::with_devices().await;
    let id = a.create("scratch").unwrap();
    a.insert(id, 0, "kept ").unwrap();
    a.sync_now().await.unwrap();
    a.insert(id, 5, "typo").unwrap();
    a.delete(id, 5..9).unwrap();
    assert_eq!(a.list()[0].pending_ops, 0, "the pair cancelled out");
    let r = a.sync_now().await.unwrap();
    assert_eq!(r.upserted, 0);
    assert_eq!(r.acknowledged_ops, 0);
    let (_db, b) = server.device();
    b.sync_now().await.unwrap();
    assert_eq!(b.text(id).unwrap(), "kept ");
}

#[tokio::test]
async fn a_rename_travels_and_moves_the_files() {
    let (_server, [(_da, a), (db, b)]) = TestServer::with_devices().await;
    let id = shared_note(&a, &b, "draft", "x").await;
    a.rename(id, "final").unwrap();
    a.sync_now().await.unwrap();
    b.sync_now().await.unwrap();
    assert_eq!(b.name(id).unwrap(), "final");
    assert!(db.path().join("final.md").exists());
    assert!(!db.path().join("draft.md").exists());
}

#[tokio::test]
async fn live_sessions_converge_and_survive_a_server_restart() {
    let (server, [(_da, a), (_db, b)]) = TestServer::with_devices().await;
    let id = shared_note(&a, &b, "live", "").await;
    let [sa, sb] = connected_sessions([&a, &b], id).await;
    sa.insert(0, "one ").unwrap();
    sa.insert(4, "two ").unwrap();
    wait_for("B to see A's words", || sb.text() == "one two ").await;
    sb.insert(0, ">> ").unwrap();
    sa.insert(sa.text().chars().count(), "three ").unwrap();
    wait_for("both texts to converge", || {
        sa.text() == sb.text() && sa.text().len() == 17
    })
    .await;
    assert_eq!(sa.text(), ">> one two three ");

    // The server goes away; edits made meanwhile are kept and sent later.
    let server = server.restart().await;
    sa.insert(0, "[a] ").unwrap();
    sb.insert(sb.text().chars().count(), "[b]").unwrap();
    wait_for("convergence after the restart", || {
        sa.text() == sb.text() && sa.text().contains("[a]") && sa.text().contains("[b]")
    })
    .await;
    wait_for("every op acknowledged", || {
        sa.pending_ops() == 0 && sb.pending_ops() == 0
    })
    .await;
    assert_eq!(sa.text(), "[a] >> one two three [b]");
    sa.close().await;
    sb.close().await;
    // A fresh device sees the same.
    let (_dc, c) = server.device();
    c.sync_now().await.unwrap();
    assert_eq!(c.text(id).unwrap(), "[a] >> one two three [b]");
}

/// PROTOCOL.md 3.2.1: text received live after the cursor and deleted while
/// this replica was away is deleted here too when it catches up, although
/// the catch-up sends it as neither insert nor delete.
#[tokio::test]
async fn text_received_live_then_deleted_while_away_disappears_on_catch_up() {
    let (server, [(_da, a), (db, b)]) = TestServer::with_devices().await;
    let id = shared_note(&a, &b, "away", "base ").await;
    let [sa, sb] = connected_sessions([&a, &b], id).await;
    sa.insert(5, "live").unwrap();
    wait_for("B to receive the live text", || sb.text() == "base live").await;
    wait_for("A's op acknowledged", || sa.pending_ops() == 0).await;
    sb.close().await;
    // While B is away, A deletes what B received live.
    sa.delete(5..9).unwrap();
    wait_for("A's delete acknowledged", || sa.pending_ops() == 0).await;
    sa.close().await;
    // B catches up by sync (a pull since its session's cursor)...
    b.sync_now().await.unwrap();
    assert_eq!(b.text(id).unwrap(), "base ");
    // ...and the same holds after a restart of B's store (the set of ids
    // to reconcile is durable) and a catch-up by session.
    let (_dc, c) = server.device();
    c.sync_now().await.unwrap();
    let [sc, sb] = connected_sessions([&c, &b], id).await;
    sc.insert(0, "x").unwrap();
    wait_for("B to receive x", || sb.text() == "xbase ").await;
    sb.close().await;
    drop(b);
    sc.delete(0..1).unwrap();
    wait_for("C's delete acknowledged", || sc.pending_ops() == 0).await;
    let b = server.client(db.path());
    let mut sb = b.session(id).unwrap();
    assert_eq!(
        sb.next_event()
            .await
            .map(|e| matches!(e, SessionEvent::Remote(_) | SessionEvent::Connected)),
        Some(true)
    );
    wait_for("B to drop x after catching up", || sb.text() == "base ").await;
    sb.close().await;
    sc.close().await;
}

#[tokio::test]
async fn a_sync_of_more_notes_than_its_window_holds_sends_and_pulls_each_once() {
    // More notes than a sync keeps in flight (32), against a server that
    // reads no further ahead than that: site allocations, upserts and
    // pulls each go out in several windows.
    let server = TestServer::start_with(|dir| {
        let mut c = notesync_server::Config::new(dir);
        c.max_pipeline = 32;
        c
    })
    .await;
    let ((_da, a), (_db, b)) = (server.device(), server.device());
    let mut want = std::collections::BTreeMap::new();
    for i in 0..100 {
        let name = format!("note {i}");
        let text = format!("text of note {i}: {}", "x".repeat(i));
        let id = a.create(&name).unwrap();
        a.insert(id, 0, &text).unwrap();
        want.insert(name, text);
    }
    // Progress goes note by note, to every note, once each.
    let seen = |events: Vec<notesync_client::SyncProgress>, new_notes: bool| {
        let done: Vec<usize> = events.iter().map(|p| p.done).collect();
        assert_eq!(done, (1..=100).collect::<Vec<_>>(), "{events:?}");
        assert!(
            events
                .iter()
                .all(|p| p.total == 100 && p.new_notes == new_notes)
        );
    };
    let mut events = Vec::new();
    let report = a.sync_now_reporting(|p| events.push(p)).await.unwrap();
    assert_eq!((report.upserted, report.pulled), (100, 0));
    assert!(a.list().iter().all(|n| n.pending_ops == 0 && n.site != 0));
    seen(events, true);
    let mut events = Vec::new();
    let report = b.sync_now_reporting(|p| events.push(p)).await.unwrap();
    assert_eq!(report.new_notes.len(), 100);
    seen(events, false);
    let got: std::collections::BTreeMap<_, _> = b
        .list()
        .into_iter()
        .map(|n| (n.name, b.text(n.id).unwrap()))
        .collect();
    assert_eq!(got, want);
    // Its own upserts come back listed: not pulled again.
    let report = a.sync_now().await.unwrap();
    assert_eq!((report.upserted, report.pulled), (0, 0));
}

#[tokio::test]
async fn a_folder_synced_again_with_nothing_changed_reads_no_note() {
    use std::collections::HashMap;

    use notesync_client::folder::Folder;

    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    for i in 0..100 {
        let text = format!("# note {i}\n\n{}\n", "words ".repeat(i));
        std::fs::write(dir.path().join(format!("n{i:03}.md")), text).unwrap();
    }
    let none = HashMap::new();
    {
        let mut f = Folder::open(dir.path(), server.config()).unwrap();
        f.pick_up(None, &none).unwrap();
        f.client().sync_now().await.unwrap();
        f.client().flush().unwrap();
        f.write_back(None, &none).unwrap();
    }
    let store = |f: &Folder| {
        let s = f.client().store().lock().unwrap();
        (s.notes_in_memory(), s.notes_read())
    };
    let mut f = Folder::open(dir.path(), server.config()).unwrap();
    assert_eq!(store(&f), (0, 0), "opening reads headers only");
    let picked = f.pick_up(None, &none).unwrap();
    assert!(
        picked.created.is_empty() && picked.edited.is_empty(),
        "{picked:?}"
    );
    let r = f.client().sync_now().await.unwrap();
    assert_eq!((r.upserted, r.pulled), (0, 0));
    f.client().flush().unwrap();
    let wrote = f.write_back(None, &none).unwrap();
    assert!(wrote.written.is_empty(), "{wrote:?}");
    assert_eq!(store(&f), (0, 0), "nothing changed, no note was read");

    // One file edited: that note alone is read, and its edit goes out.
    std::fs::write(dir.path().join("n007.md"), "# note 7\n\nedited\n").unwrap();
    let picked = f.pick_up(None, &none).unwrap();
    assert_eq!(picked.edited.len(), 1, "{picked:?}");
    // (Compared, taken, then edited: read three times, the others never.)
    let (loaded, read) = store(&f);
    assert!(loaded == 1 && read <= 3, "{loaded} in memory, {read} reads");
    let r = f.client().sync_now().await.unwrap();
    assert_eq!(r.upserted, 1);
}
