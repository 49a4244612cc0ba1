//! Document deletion (PROTOCOL.md 3.5) through the SDK against a real
//! notesync-server (embedded, on an ephemeral port): a deletion reaches a
//! device that was offline when it was made, the note stays deleted, and a
//! device with edits that never reached the server keeps their text.

mod common;

use std::path::Path;

use common::server::{TestServer, connected_sessions, next_event_where, shared_note};
use notesync_client::SessionEvent;
use notesync_client::store::TRASH_DIR;

/// The note's three files in `dir`, by which exist.
fn files(dir: &Path, stem: &str) -> [bool; 3] {
    ["md", "md.structure", "md.latest_ops"].map(|ext| dir.join(format!("{stem}.{ext}")).exists())
}

fn trash_files(dir: &Path) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(dir.join(TRASH_DIR)) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test]
async fn deletion_reaches_a_device_that_was_offline_at_the_time() {
    let (server, [(da, a), (db, b)]) = TestServer::with_devices().await;
    let id = a.create("groceries").unwrap();
    a.insert(id, 0, "milk, eggs").unwrap();
    let keep = a.create("keep me").unwrap();
    a.insert(keep, 0, "stays").unwrap();
    a.sync_now().await.unwrap();
    let rb = b.sync_now().await.unwrap();
    assert_eq!(rb.new_notes.len(), 2);
    assert_eq!(files(db.path(), "groceries"), [true; 3]);

    // B goes offline (it does not sync); A deletes the note, offline first.
    a.delete_note(id).unwrap();
    assert_eq!(files(da.path(), "groceries"), [false; 3]);
    // The pending deletion survives a restart of A's app.
    drop(a);
    let a = server.client(da.path());
    assert!(a.list().iter().all(|n| n.id != id));
    let ra = a.sync_now().await.unwrap();
    assert_eq!(ra.deletes_sent, vec![id]);
    assert!(ra.refused.is_empty(), "{:?}", ra.refused);

    // B comes back: the note and its files are gone, nothing kept (B had no
    // edits of it), the other note untouched.
    let rb = b.sync_now().await.unwrap();
    assert_eq!(rb.deleted.len(), 1, "{rb:?}");
    assert_eq!(rb.deleted[0].id, id);
    assert_eq!(rb.deleted[0].name, "groceries");
    assert_eq!(rb.deleted[0].kept, None);
    assert_eq!(files(db.path(), "groceries"), [false; 3]);
    assert!(trash_files(db.path()).is_empty());
    assert_eq!(b.list().len(), 1);
    assert_eq!(b.text(keep).unwrap(), "stays");

    // It stays deleted: syncing again brings nothing back, anywhere, and a
    // new device never sees it.
    let ra = a.sync_now().await.unwrap();
    let rb = b.sync_now().await.unwrap();
    assert!(ra.new_notes.is_empty() && rb.new_notes.is_empty());
    assert!(rb.deleted.is_empty());
    let (_dc, c) = server.device();
    let rc = c.sync_now().await.unwrap();
    assert_eq!(rc.new_notes, vec![keep]);
    // B reopened: the deleted note is not adopted back from anything left.
    drop(b);
    let b = server.client(db.path());
    assert_eq!(b.list().len(), 1);
}

#[tokio::test]
async fn unsynced_edits_to_a_note_deleted_elsewhere_are_kept_in_the_trash() {
    let (server, [(_da, a), (db, b)]) = TestServer::with_devices().await;
    let id = shared_note(&a, &b, "plan", "step one").await;

    // B edits offline; meanwhile A deletes the note.
    b.insert(id, 8, ", step two (offline)").unwrap();
    b.rename(id, "plan v2").unwrap();
    a.delete_note(id).unwrap();
    a.sync_now().await.unwrap();

    // B syncs: its upsert is refused with 35 (nothing of it is applied),
    // the note is removed, and its text, B's edit included, is in the trash.
    let rb = b.sync_now().await.unwrap();
    assert_eq!(rb.deleted.len(), 1, "{rb:?}");
    let kept = rb.deleted[0].kept.clone().expect("B's edits are kept");
    assert!(kept.starts_with(db.path().join(TRASH_DIR)), "{kept:?}");
    assert_eq!(
        std::fs::read_to_string(&kept).unwrap(),
        "step one, step two (offline)"
    );
    assert_eq!(trash_files(db.path()), vec![kept]);
    assert_eq!(files(db.path(), "plan v2"), [false; 3]);
    assert!(b.list().is_empty());
    assert_eq!(rb.acknowledged_ops, 0);

    // The note stays deleted on the server and on A; B's edit did not
    // bring it back.
    let ra = a.sync_now().await.unwrap();
    assert!(ra.new_notes.is_empty() && a.list().is_empty(), "{ra:?}");
    let rb = b.sync_now().await.unwrap();
    assert!(rb.new_notes.is_empty() && b.list().is_empty(), "{rb:?}");
    let (_dc, c) = server.device();
    assert!(c.sync_now().await.unwrap().new_notes.is_empty());
}

#[tokio::test]
async fn a_live_session_is_told_and_ended() {
    let (server, [(_da, a), (db, b)]) = TestServer::with_devices().await;
    let id = shared_note(&a, &b, "live", "text").await;
    let [mut sb] = connected_sessions([&b], id).await;

    a.delete_note(id).unwrap();
    a.sync_now().await.unwrap();
    let ev = next_event_where(
        "B's session to hear of the deletion",
        &mut sb,
        |e| match e {
            SessionEvent::Deleted(d) => Some(d),
            _ => None,
        },
    )
    .await;
    let d = ev.expect("a Deleted event before the session ends");
    assert_eq!((d.id, d.kept), (id, None));
    // The session has ended.
    let end = next_event_where("the session to end", &mut sb, Some).await;
    assert_eq!(end, None);
    assert!(b.list().is_empty());
    assert_eq!(files(db.path(), "live"), [false; 3]);

    // A session started afterwards on a note deleted elsewhere (C still
    // has it) is refused the same way.
    let (_dc, c) = server.device();
    let id2 = c.create("second").unwrap();
    c.sync_now().await.unwrap();
    a.sync_now().await.unwrap();
    a.delete_note(id2).unwrap();
    a.sync_now().await.unwrap();
    let mut sc = c.session(id2).unwrap();
    // Its first event, whatever it is.
    let ev = next_event_where("C's session to hear of the deletion", &mut sc, Some).await;
    assert!(
        matches!(ev, Some(SessionEvent::Deleted(ref d)) if d.id == id2),
        "{ev:?}"
    );
    assert!(c.list().is_empty());
}
