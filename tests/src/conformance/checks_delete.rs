//! Document deletion, the version 2 extension (PROTOCOL.md 3.5): 3
//! doc_delete answered by 35 doc_deleted; a deleted document is listed with
//! its deletion time, a pull of it is a 35, it is never resurrected, no
//! session starts on it, and live sessions on it are told and ended. A
//! version 1 connection never gets a 35: it gets `unknown_document`.

use notesync_protocol::{ClientFrame, DocId, ErrorCode, ServerFrame, Time};

use super::util::{atom1, create_doc, expect_still_open_sync, hello_bytes, show};
use super::{Check, Ctx, Outcome};
use crate::conn::{Conn, Event, upsert_frame};

pub fn checks() -> Vec<Check<Ctx>> {
    vec![
        Check::new(
            "delete-answers-doc-deleted",
            "3.5",
            "doc_delete is answered by 35 with the deletion time; deleting again answers the same time; the connection stays",
            delete_answers,
        ),
        Check::new(
            "delete-is-listed-with-its-time",
            "3.5, 3.1",
            "a deleted document is listed by synclist, with its deletion time as its time",
            delete_listed,
        ),
        Check::new(
            "delete-pull-answers-doc-deleted",
            "3.5",
            "a pull of a deleted document is a 35 (version 2) or unknown_document (version 1); the connection stays",
            delete_pull,
        ),
        Check::new(
            "delete-upsert-never-resurrects",
            "3.5",
            "an upsert to a deleted document is a 35 (version 2) or unknown_document (version 1) and changes nothing",
            delete_upsert,
        ),
        Check::new(
            "delete-session-start-refused",
            "3.5",
            "session_start on a deleted document is a 35 (version 2) or unknown_document (version 1), then the close",
            delete_session_start,
        ),
        Check::new(
            "delete-ends-live-sessions",
            "3.5",
            "live sessions on a document being deleted get a 35 (version 2) or unknown_document (version 1), then the close",
            delete_ends_sessions,
        ),
        Check::new(
            "delete-unknown-document",
            "3.5, 4",
            "doc_delete of an unknown document is unknown_document, the connection stays, nothing is created",
            delete_unknown,
        ),
        Check::new(
            "delete-needs-version-2",
            "3.5, 6",
            "doc_delete on a connection that announced version 1 (or sent no hello) is unknown_frame, closed",
            delete_needs_v2,
        ),
    ]
}

/// A connection after a hello with version 1 (and the target's token).
async fn client_v1(ctx: &Ctx, label: &str) -> Conn {
    let mut c = ctx.raw_conn(label).await;
    c.send_raw(&hello_bytes(ctx, ctx.replica(), 1)).await;
    match c.next_event().await {
        Event::Frame(ServerFrame::Welcome { version: 1, .. }) => c,
        other => panic!(
            "{label}: a hello with version 1: expected 97 welcome with version 1, got {}",
            show(&other)
        ),
    }
}

/// Sends 3 and expects the 35 for `doc`; returns its time.
async fn delete(c: &mut Conn, doc: DocId, what: &str) -> Time {
    c.send(ClientFrame::DeleteDoc { doc }).await;
    expect_deleted(c, doc, what).await
}

async fn expect_deleted(c: &mut Conn, doc: DocId, what: &str) -> Time {
    match c.next_event().await {
        Event::Frame(ServerFrame::DocDeleted {
            doc: d,
            deleted_time,
        }) if d == doc => {
            assert!(
                deleted_time > 0,
                "{}: {what}: a deletion time is a server time, never 0",
                c.label()
            );
            deleted_time
        }
        other => panic!(
            "{}: {what}: expected 35 doc_deleted for the document, got {}",
            c.label(),
            show(&other)
        ),
    }
}

async fn expect_error(c: &mut Conn, code: ErrorCode, what: &str) {
    match c.next_event().await {
        Event::Frame(ServerFrame::Error(e)) if e.code == code => {}
        other => panic!(
            "{}: {what}: expected error {code}, got {}",
            c.label(),
            show(&other)
        ),
    }
}

async fn expect_closed(c: &mut Conn, what: &str) {
    match c.next_event().await {
        Event::Closed => {}
        other => panic!(
            "{}: {what}: expected the connection closed, got {}",
            c.label(),
            show(&other)
        ),
    }
}

/// A document of this check's own with one atom, deleted: (doc, the
/// deleting connection's site, the time before the deletion, its time).
async fn deleted_doc(ctx: &Ctx) -> (DocId, u8, Time, Time) {
    let doc = ctx.doc();
    let (mut c, site, t0) = create_doc(ctx, "creator", doc, "to delete").await;
    let (_, s) = c
        .upsert(doc, "to delete", t0, &[atom1("gone", 1, site)], &[])
        .await;
    let at = delete(&mut c, doc, "doc_delete").await;
    assert!(
        at > s.sync_time,
        "the deletion is a change after the document's last one: expected a time above {}, got {at}",
        s.sync_time
    );
    (doc, site, s.sync_time, at)
}

async fn delete_answers(ctx: Ctx) -> Outcome {
    let (doc, _, _, at) = deleted_doc(&ctx).await;
    let (mut c, _) = ctx.client("again").await;
    let again = delete(&mut c, doc, "a second doc_delete").await;
    assert_eq!(
        again, at,
        "deleting a deleted document changes nothing: expected its first deletion time"
    );
    expect_still_open_sync(&mut c, "35").await;
    Ok(())
}

async fn delete_listed(ctx: Ctx) -> Outcome {
    let (doc, _, before, at) = deleted_doc(&ctx).await;
    let (mut c, _) = ctx.client("lister").await;
    let listed = c.synclist_all(before).await;
    let entry = listed.iter().find(|e| e.doc == doc).unwrap_or_else(|| {
        panic!(
            "synclist({before}) after the deletion: expected the document listed, got {listed:?}"
        )
    });
    assert_eq!(
        entry.modified, at,
        "a deleted document is listed with its deletion time"
    );
    let later: Vec<_> = c
        .synclist_all(at)
        .await
        .into_iter()
        .filter(|e| e.doc == doc)
        .collect();
    assert!(
        later.is_empty(),
        "synclist(deletion time) does not list it again: got {later:?}"
    );
    Ok(())
}

async fn delete_pull(ctx: Ctx) -> Outcome {
    let (doc, _, before, at) = deleted_doc(&ctx).await;
    let (mut c, _) = ctx.client("v2").await;
    for since in [0, before, at] {
        c.send(ClientFrame::Pull { doc, since }).await;
        let t = expect_deleted(&mut c, doc, &format!("pull since {since}")).await;
        assert_eq!(t, at, "the 35 carries the deletion time");
    }
    expect_still_open_sync(&mut c, "35").await;
    let mut c1 = client_v1(&ctx, "v1").await;
    c1.send(ClientFrame::Pull { doc, since: 0 }).await;
    expect_error(&mut c1, ErrorCode::UNKNOWN_DOCUMENT, "a version 1 pull").await;
    expect_still_open_sync(&mut c1, "unknown_document").await;
    Ok(())
}

async fn delete_upsert(ctx: Ctx) -> Outcome {
    let (doc, site, before, at) = deleted_doc(&ctx).await;
    // The deleting replica had a site; its sites went with the content, so
    // an insert of any site is as good as another here.
    let ins = [atom1("back?", 2, site)];
    let (mut c, _) = ctx.client("v2 upsert").await;
    c.send(upsert_frame(doc, "revived", before, &ins, &[]))
        .await;
    let t = expect_deleted(&mut c, doc, "an upsert to the deleted document").await;
    assert_eq!(t, at);
    c.send(upsert_frame(doc, "revived", 0, &[], &[])).await;
    expect_deleted(
        &mut c,
        doc,
        "an empty upsert since 0 to the deleted document",
    )
    .await;
    let mut c1 = client_v1(&ctx, "v1 upsert").await;
    c1.send(upsert_frame(doc, "revived", 0, &[], &[])).await;
    expect_error(&mut c1, ErrorCode::UNKNOWN_DOCUMENT, "a version 1 upsert").await;
    expect_still_open_sync(&mut c1, "unknown_document").await;
    // Nothing changed: still deleted, still listed at its deletion time.
    c.send(ClientFrame::Pull { doc, since: 0 }).await;
    expect_deleted(&mut c, doc, "a pull after the upserts").await;
    let entry: Vec<_> = c
        .synclist_all(before)
        .await
        .into_iter()
        .filter(|e| e.doc == doc)
        .collect();
    assert_eq!(
        entry.iter().map(|e| e.modified).collect::<Vec<_>>(),
        vec![at],
        "a refused upsert changes nothing: the document's time stays its deletion time"
    );
    Ok(())
}

async fn delete_session_start(ctx: Ctx) -> Outcome {
    let (doc, _, before, _) = deleted_doc(&ctx).await;
    let (mut c, _) = ctx.client("v2 session").await;
    c.send(ClientFrame::SessionStart { since: before, doc })
        .await;
    expect_deleted(&mut c, doc, "session_start on the deleted document").await;
    expect_closed(&mut c, "after the 35 that refuses a session").await;
    let mut c1 = client_v1(&ctx, "v1 session").await;
    c1.send(ClientFrame::SessionStart { since: 0, doc }).await;
    expect_error(
        &mut c1,
        ErrorCode::UNKNOWN_DOCUMENT,
        "a version 1 session_start",
    )
    .await;
    expect_closed(&mut c1, "after the refused session_start").await;
    Ok(())
}

/// Starts a session on `doc` and reads its 33s up to the 68.
async fn start_session(c: &mut Conn, doc: DocId) {
    c.send(ClientFrame::SessionStart { since: 0, doc }).await;
    loop {
        match c.next_event().await {
            Event::Frame(ServerFrame::DocResponse(r)) if r.doc == doc => {}
            Event::Frame(ServerFrame::SessionStarted { .. }) => return,
            other => panic!(
                "{}: session_start: expected 33s then a 68, got {}",
                c.label(),
                show(&other)
            ),
        }
    }
}

async fn delete_ends_sessions(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut creator, _, _) = create_doc(&ctx, "creator", doc, "watched").await;
    let (mut s2, _) = ctx.client("v2 session").await;
    start_session(&mut s2, doc).await;
    let mut s1 = client_v1(&ctx, "v1 session").await;
    start_session(&mut s1, doc).await;
    delete(&mut creator, doc, "doc_delete").await;
    expect_deleted(
        &mut s2,
        doc,
        "a live version 2 session on the deleted document",
    )
    .await;
    expect_closed(&mut s2, "after the 35 that ends the session").await;
    expect_error(
        &mut s1,
        ErrorCode::UNKNOWN_DOCUMENT,
        "a live version 1 session on the deleted document",
    )
    .await;
    expect_closed(&mut s1, "after the error that ends the session").await;
    Ok(())
}

async fn delete_unknown(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut c, _) = ctx.client("deleter").await;
    c.send(ClientFrame::DeleteDoc { doc }).await;
    expect_error(
        &mut c,
        ErrorCode::UNKNOWN_DOCUMENT,
        "doc_delete of an unknown document",
    )
    .await;
    expect_still_open_sync(&mut c, "unknown_document").await;
    c.send(ClientFrame::Pull { doc, since: 0 }).await;
    expect_error(
        &mut c,
        ErrorCode::UNKNOWN_DOCUMENT,
        "a pull after doc_delete of an unknown document (nothing is created)",
    )
    .await;
    Ok(())
}

async fn delete_needs_v2(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    create_doc(&ctx, "creator", doc, "kept").await;
    let mut c1 = client_v1(&ctx, "v1").await;
    c1.send(ClientFrame::DeleteDoc { doc }).await;
    expect_error(
        &mut c1,
        ErrorCode::UNKNOWN_FRAME,
        "doc_delete after a version 1 hello",
    )
    .await;
    expect_closed(&mut c1, "after unknown_frame").await;
    if ctx.target().token.is_none() {
        let mut anon = ctx.raw_conn("no hello").await;
        anon.send(ClientFrame::DeleteDoc { doc }).await;
        expect_error(
            &mut anon,
            ErrorCode::UNKNOWN_FRAME,
            "doc_delete without hello",
        )
        .await;
        expect_closed(&mut anon, "after unknown_frame").await;
    }
    // Not deleted.
    let (mut c, _) = ctx.client("puller").await;
    let (_, s) = c.pull(doc, 0).await;
    assert_ne!(s.sync_time, 0, "the document is still there");
    Ok(())
}
