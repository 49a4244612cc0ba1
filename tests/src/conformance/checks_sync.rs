//! Sync mode (PROTOCOL.md 3.1, 3.3): synclist, pull and upsert deltas,
//! idempotent re-sends, id conflicts, names, unknown documents.

use std::collections::{BTreeMap, BTreeSet};

use notesync_protocol::{DocId, ErrorCode, SyncEntry, Time};

use super::util::{
    atom1, create_doc, deletes_of, expect_still_open_sync, inserts_of, model, reply_name,
};
use super::{Check, Ctx, Outcome};
use crate::conn::{Conn, upsert_frame};
use crate::model::model_of;

pub fn checks() -> Vec<Check<Ctx>> {
    vec![
        Check::new(
            "synclist-lists-changes-ascending",
            "3.1, 3.4",
            "synclist(t) lists each changed document once, ascending by a time after t, covered by its 34",
            synclist_ascending,
        ),
        Check::new(
            "synclist-since-excludes-older-changes",
            "3.1",
            "synclist(t) lists only documents changed after t; a new change lists a document again",
            synclist_since,
        ),
        Check::new(
            "pull-since-zero-is-the-text",
            "3.1",
            "pull(doc, 0) is the live text and the name, then a 34 with this replica's site",
            pull_since_zero,
        ),
        Check::new(
            "pull-since-cursor-is-the-delta",
            "3.1",
            "pull(doc, t) holds the atoms inserted after t and the deletes after t of older atoms",
            pull_delta,
        ),
        Check::new(
            "pull-nothing-new-still-has-a-33",
            "3.1",
            "a pull with nothing new is still one or more 33 (with the name), then the 34",
            pull_nothing_new,
        ),
        Check::new(
            "pull-inserted-and-deleted-after-t-is-neither",
            "3.1",
            "an atom inserted and deleted after t is sent as neither insert nor delete",
            pull_neither,
        ),
        Check::new(
            "pull-tombstone-delete-is-sent",
            "3.1",
            "a delete of an unknown id is kept as a tombstone, sent by pulls; its insert arriving later stays deleted",
            pull_tombstone,
        ),
        Check::new(
            "pull-unknown-document",
            "3.1, 4",
            "a pull of an unknown document is unknown_document, the connection stays, nothing is created",
            pull_unknown,
        ),
        Check::new(
            "upsert-creates-document",
            "3.1",
            "an empty upsert creates the document with its name, allocates a site; it is listed and pullable",
            upsert_creates,
        ),
        Check::new(
            "upsert-reply-excludes-own-ops",
            "3.1",
            "an upsert's reply is what the client lacks since t, without the inserts and deletes it sent",
            upsert_reply_excludes,
        ),
        Check::new(
            "upsert-insert-after-its-delete-gets-the-delete",
            "3.1",
            "an upsert inserting an id whose delete came first: the atom stays deleted and the reply sends the delete",
            upsert_insert_after_delete,
        ),
        Check::new(
            "upsert-resent-after-lost-reply-gets-the-delete",
            "3.1",
            "an upsert re-sent after a lost reply, its atom deleted meanwhile: the reply sends the delete",
            upsert_resent_gets_delete,
        ),
        Check::new(
            "upsert-resend-changes-nothing",
            "3.1",
            "the same upsert sent again is accepted and changes nothing (no new delta, no new listing)",
            upsert_resend,
        ),
        Check::new(
            "upsert-id-conflict",
            "3.1, 4",
            "an existing id with other data is id_conflict; the whole upsert is refused; the connection stays",
            upsert_id_conflict,
        ),
        Check::new(
            "upsert-name-rule",
            "3.1, 3.3",
            "a stale name never reverts a newer rename; a knowing rename applies and is a listed change",
            upsert_names,
        ),
    ]
}

/// Lists from `cursor` until a response is empty, checking that every page
/// is strictly ascending and after its cursor; returns every entry.
pub async fn list_all(c: &mut Conn, since: Time, what: &str) -> Vec<SyncEntry> {
    let mut all = Vec::new();
    let mut cursor = since;
    for _ in 0..100_000 {
        let page = c.synclist(cursor).await;
        let Some(last) = page.last() else {
            return all;
        };
        let mut prev = cursor;
        let mut docs = BTreeSet::new();
        for e in &page {
            assert!(
                e.modified > prev,
                "{what}: synclist({cursor}) must list times after the cursor, ascending (3.1): \
                 got {} after {prev} in {:?}",
                e.modified,
                page.iter().map(|e| e.modified).collect::<Vec<_>>()
            );
            assert!(
                docs.insert(e.doc),
                "{what}: a document listed twice in one 32"
            );
            prev = e.modified;
        }
        cursor = last.modified;
        all.extend(page);
    }
    panic!("{what}: synclist did not reach an empty page");
}

/// The entries of `docs` in a listing.
fn ours(list: &[SyncEntry], docs: &[DocId]) -> Vec<SyncEntry> {
    list.iter()
        .filter(|e| docs.contains(&e.doc))
        .copied()
        .collect()
}

async fn synclist_ascending(ctx: Ctx) -> Outcome {
    let marker = ctx.doc();
    let (mut c, _, t0) = create_doc(&ctx, "writer", marker, "marker").await;
    let docs: Vec<DocId> = (0..3).map(|_| ctx.doc()).collect();
    let mut syncs = Vec::new();
    for (i, &d) in docs.iter().enumerate() {
        let (_, s) = c.upsert(d, &format!("doc {i}"), 0, &[], &[]).await;
        let (_, s2) = c
            .upsert(
                d,
                &format!("doc {i}"),
                s.sync_time,
                &[atom1("hello", 10, s.site)],
                &[],
            )
            .await;
        syncs.push(s2.sync_time);
    }
    let (mut l, _) = ctx.client("lister").await;
    let list = list_all(&mut l, t0, "synclist").await;
    let mine = ours(&list, &docs);
    assert_eq!(
        mine.iter().map(|e| e.doc).collect::<Vec<_>>(),
        docs,
        "synclist(t) lists every document changed after t once, ascending by its last change \
         (made in this order): got {mine:?}"
    );
    for (i, e) in mine.iter().enumerate() {
        assert!(
            e.modified <= syncs[i],
            "doc {i}: its last change is covered by its upsert's 34: expected a time <= {}, got {}",
            syncs[i],
            e.modified
        );
        if i > 0 {
            assert!(
                e.modified > syncs[i - 1],
                "doc {i} changed after the 34 of doc {} ({}) arrived, so its time is later (3.4: a \
                 client holding that 34 as a cursor must see it): got {}",
                i - 1,
                syncs[i - 1],
                e.modified
            );
        }
    }
    Ok(())
}

async fn synclist_since(ctx: Ctx) -> Outcome {
    let marker = ctx.doc();
    let (mut c, _, t0) = create_doc(&ctx, "writer", marker, "marker").await;
    let docs: Vec<DocId> = (0..3).map(|_| ctx.doc()).collect();
    let mut sites = Vec::new();
    for &d in &docs {
        let (_, s) = c.upsert(d, "n", 0, &[], &[]).await;
        sites.push(s);
    }
    let list = ours(&list_all(&mut c, t0, "synclist").await, &docs);
    assert_eq!(
        list.len(),
        3,
        "the three new documents are listed: got {list:?}"
    );
    let from_first = ours(&list_all(&mut c, list[0].modified, "synclist").await, &docs);
    assert_eq!(
        from_first.iter().map(|e| e.doc).collect::<Vec<_>>(),
        docs[1..],
        "synclist(time of the first) lists only the documents changed after it"
    );
    let last = list[2].modified;
    let none = ours(&list_all(&mut c, last, "synclist").await, &docs);
    assert!(
        none.is_empty(),
        "nothing of ours changed after the last listed time: got {none:?}"
    );
    let (_, s2) = c
        .upsert(
            docs[0],
            "n",
            sites[0].sync_time,
            &[atom1("more", 20, sites[0].site)],
            &[],
        )
        .await;
    let again = ours(&list_all(&mut c, last, "synclist").await, &docs);
    assert_eq!(
        again.iter().map(|e| e.doc).collect::<Vec<_>>(),
        vec![docs[0]],
        "a new change to the first document lists it again, alone: got {again:?}"
    );
    assert!(
        again[0].modified > last && again[0].modified <= s2.sync_time,
        "its time is after the cursor and covered by its 34: expected ({last}, {}], got {}",
        s2.sync_time,
        again[0].modified
    );
    Ok(())
}

async fn pull_since_zero(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut w, site, t) = create_doc(&ctx, "writer", doc, "greeting").await;
    let mut m = model(doc, site, ctx.seed());
    let atoms = vec![
        m.local_append("Hello"),
        m.local_append(" "),
        m.local_append("wörld"),
    ];
    let (_, s1) = w.upsert(doc, "greeting", t, &atoms, &[]).await;
    let (mut r, _) = ctx.client("reader").await;
    let (rs, p) = r.pull(doc, 0).await;
    assert_eq!(
        model_of(doc, &rs).text(),
        "Hello wörld",
        "pull(doc, 0) is the whole text"
    );
    assert!(
        deletes_of(&rs).is_empty(),
        "nothing was deleted: expected no deletes, got {:?}",
        deletes_of(&rs)
    );
    assert_eq!(
        reply_name(&rs, "pull"),
        "greeting",
        "the 33 carries the document's name"
    );
    assert!(
        p.sync_time >= s1.sync_time,
        "the 34 covers the upsert: expected >= {}, got {}",
        s1.sync_time,
        p.sync_time
    );
    assert_ne!(
        p.site, 0,
        "a pull after hello allocates the replica's site (1.3): got 0"
    );
    assert_ne!(
        p.site, site,
        "two replicas never share a site (1.3): both got {site}"
    );
    Ok(())
}

async fn pull_delta(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut w, site, t) = create_doc(&ctx, "writer", doc, "n").await;
    let mut m = model(doc, site, ctx.seed());
    let a = m.local_append("a");
    let b = m.local_append("b");
    let (_, t1) = w.upsert(doc, "n", t, &[a.clone(), b.clone()], &[]).await;
    let (mut r, _) = ctx.client("reader").await;
    let (rs, p1) = r.pull(doc, 0).await;
    let mut rm = model_of(doc, &rs);
    let c = m.local_append("c");
    m.apply_delete(a.pid());
    let (_, t2) = w
        .upsert(
            doc,
            "n",
            t1.sync_time,
            std::slice::from_ref(&c),
            &[a.pid().clone()],
        )
        .await;
    let (delta, p2) = r.pull(doc, p1.sync_time).await;
    assert_eq!(
        inserts_of(&delta),
        BTreeMap::from([(c.pid().clone(), "c".to_string())]),
        "pull since a cursor holds only the atoms inserted after it"
    );
    assert_eq!(
        deletes_of(&delta),
        BTreeSet::from([a.pid().clone()]),
        "pull since a cursor holds the deletes made after it of atoms inserted before it"
    );
    rm.apply_responses(&delta);
    assert_eq!(rm.text(), "bc");
    assert!(
        p2.sync_time >= t2.sync_time,
        "the 34 covers the change: expected >= {}, got {}",
        t2.sync_time,
        p2.sync_time
    );
    assert_eq!(p2.site, p1.site, "a replica keeps its site (1.3)");
    Ok(())
}

async fn pull_nothing_new(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut w, site, t) = create_doc(&ctx, "writer", doc, "quiet").await;
    let (_, t1) = w.upsert(doc, "quiet", t, &[atom1("x", 5, site)], &[]).await;
    let (rs, p) = w.pull(doc, t1.sync_time).await;
    assert_eq!(reply_name(&rs, "pull with nothing new"), "quiet");
    assert!(
        inserts_of(&rs).is_empty() && deletes_of(&rs).is_empty(),
        "nothing changed after the cursor: expected no inserts or deletes, got {rs:?}"
    );
    assert!(
        p.sync_time >= t1.sync_time,
        "sync times never go back: expected >= {}, got {}",
        t1.sync_time,
        p.sync_time
    );
    Ok(())
}

async fn pull_neither(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut w, site, t0) = create_doc(&ctx, "writer", doc, "n").await;
    let a = atom1("A", 100, site);
    let b = atom1("B", 200, site);
    let (_, ta) = w.upsert(doc, "n", t0, std::slice::from_ref(&a), &[]).await;
    let (_, tb) = w
        .upsert(doc, "n", ta.sync_time, std::slice::from_ref(&b), &[])
        .await;
    w.upsert(doc, "n", tb.sync_time, &[], &[b.pid().clone()])
        .await;
    let (mut r, _) = ctx.client("reader").await;
    let (since_a, _) = r.pull(doc, ta.sync_time).await;
    assert!(
        inserts_of(&since_a).is_empty() && deletes_of(&since_a).is_empty(),
        "B was inserted and deleted after the cursor: expected it sent as neither, got {since_a:?}"
    );
    let (since_0, _) = r.pull(doc, 0).await;
    assert_eq!(
        inserts_of(&since_0),
        BTreeMap::from([(a.pid().clone(), "A".to_string())]),
        "since 0 only A is live"
    );
    assert!(
        deletes_of(&since_0).is_empty(),
        "since 0, B was inserted and deleted after the cursor: expected no delete, got {:?}",
        deletes_of(&since_0)
    );
    let (since_b, _) = r.pull(doc, tb.sync_time).await;
    assert!(
        inserts_of(&since_b).is_empty(),
        "nothing inserted after B's 34: got {since_b:?}"
    );
    assert_eq!(
        deletes_of(&since_b),
        BTreeSet::from([b.pid().clone()]),
        "B was inserted at or before this cursor: its delete is sent"
    );
    Ok(())
}

async fn pull_tombstone(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut a, _, ta0) = create_doc(&ctx, "deleter", doc, "n").await;
    let (mut b, _) = ctx.client("late inserter").await;
    let (_, sb) = b.pull(doc, 0).await;
    let (mut r, _) = ctx.client("reader").await;
    let (_, sr) = r.pull(doc, 0).await;
    let late = atom1("late", 40, sb.site);
    a.upsert(doc, "n", ta0, &[], &[late.pid().clone()]).await;
    let (delta, sr2) = r.pull(doc, sr.sync_time).await;
    assert_eq!(
        deletes_of(&delta),
        BTreeSet::from([late.pid().clone()]),
        "a delete of an id the server has only as a tombstone is sent by a pull (3.1)"
    );
    assert!(inserts_of(&delta).is_empty());
    let kept = atom1("kept", 50, sb.site);
    b.upsert(doc, "n", sb.sync_time, &[late.clone(), kept.clone()], &[])
        .await;
    let (all, _) = r.pull(doc, 0).await;
    assert_eq!(
        model_of(doc, &all).text(),
        "kept",
        "an insert that arrives after its delete stays deleted (3.1)"
    );
    let (delta, _) = r.pull(doc, sr2.sync_time).await;
    assert_eq!(
        inserts_of(&delta),
        BTreeMap::from([(kept.pid().clone(), "kept".to_string())]),
        "since the tombstone was sent, only the live insert is new"
    );
    Ok(())
}

async fn pull_unknown(ctx: Ctx) -> Outcome {
    let unknown = ctx.doc();
    let (mut c, _) = ctx.client("hello").await;
    expect_unknown(&mut c, unknown).await;
    if let Ok(mut anon) = ctx.anon("no hello").await {
        expect_unknown(&mut anon, unknown).await;
    }
    Ok(())
}

async fn expect_unknown(c: &mut Conn, unknown: DocId) {
    // Twice: the first pull did not create it.
    for _ in 0..2 {
        match c.try_pull(unknown, 0).await {
            Err(e) => assert_eq!(
                e.code,
                ErrorCode::UNKNOWN_DOCUMENT,
                "{}: expected unknown_document, got {} {:?}",
                c.label(),
                e.code,
                e.message
            ),
            Ok(_) => panic!(
                "{}: a pull of a document nobody created: expected unknown_document, got 33s and \
                 a 34 (a pull never creates a document)",
                c.label()
            ),
        }
    }
    expect_still_open_sync(c, "unknown_document").await;
}

async fn upsert_creates(ctx: Ctx) -> Outcome {
    let marker = ctx.doc();
    let (mut c, _, t0) = create_doc(&ctx, "creator", marker, "").await;
    let doc = ctx.doc();
    let (rs, s) = c.upsert(doc, "Fresh ✓", 0, &[], &[]).await;
    assert_eq!(reply_name(&rs, "creating upsert"), "Fresh ✓");
    assert_ne!(s.site, 0, "an upsert allocates this replica's site (1.3)");
    assert!(inserts_of(&rs).is_empty() && deletes_of(&rs).is_empty());
    let (mut r, _) = ctx.client("reader").await;
    let listed = ours(&list_all(&mut r, t0, "synclist").await, &[doc]);
    assert_eq!(
        listed.len(),
        1,
        "the new document is listed after the cursor: got {listed:?}"
    );
    assert!(
        listed[0].modified <= s.sync_time,
        "its creation is covered by its 34"
    );
    let (rs, _) = r.pull(doc, 0).await;
    assert_eq!(reply_name(&rs, "pull"), "Fresh ✓");
    Ok(())
}

async fn upsert_reply_excludes(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut c1, site1, t) = create_doc(&ctx, "r1", doc, "shared").await;
    let a = atom1("A", 100, site1);
    let (_, t1) = c1
        .upsert(doc, "shared", t, std::slice::from_ref(&a), &[])
        .await;
    let (mut c2, _) = ctx.client("r2").await;
    let (rs, p2) = c2.pull(doc, 0).await;
    let mut m2 = model_of(doc, &rs);
    m2.set_site(p2.site, ctx.seed());
    let b = atom1("B", 300, site1);
    c1.upsert(doc, "shared", t1.sync_time, std::slice::from_ref(&b), &[])
        .await;
    let x = m2.local_append("X");
    m2.apply_delete(a.pid());
    let (reply, _) = c2
        .upsert(
            doc,
            "shared",
            p2.sync_time,
            std::slice::from_ref(&x),
            &[a.pid().clone()],
        )
        .await;
    assert_eq!(
        inserts_of(&reply),
        BTreeMap::from([(b.pid().clone(), "B".to_string())]),
        "the reply holds B (which r2 lacked), not X (which it sent)"
    );
    assert!(
        deletes_of(&reply).is_empty(),
        "the reply excludes the delete the upsert sent: expected no deletes, got {:?}",
        deletes_of(&reply)
    );
    m2.apply_responses(&reply);
    let (all, _) = c1.pull(doc, 0).await;
    assert_eq!(
        model_of(doc, &all).live(),
        m2.live(),
        "with the reply applied the client holds the server's text"
    );
    assert_eq!(
        m2.text().len(),
        2,
        "B and X are live, A is deleted: got {:?}",
        m2.text()
    );
    Ok(())
}

async fn upsert_insert_after_delete(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut a, _, ta) = create_doc(&ctx, "deleter", doc, "n").await;
    let (mut b, _) = ctx.client("late inserter").await;
    let (_, sb) = b.pull(doc, 0).await;
    let late = atom1("late", 40, sb.site);
    let kept = atom1("kept", 50, sb.site);
    a.upsert(doc, "n", ta, &[], &[late.pid().clone()]).await;
    let (reply, _) = b
        .upsert(doc, "n", sb.sync_time, &[late.clone(), kept.clone()], &[])
        .await;
    assert!(
        !inserts_of(&reply).contains_key(late.pid())
            && !inserts_of(&reply).contains_key(kept.pid()),
        "the reply excludes the upsert's own inserts: got {:?}",
        inserts_of(&reply)
    );
    assert_eq!(
        deletes_of(&reply),
        BTreeSet::from([late.pid().clone()]),
        "an id this upsert inserts that is deleted on the server (its delete came first) is sent \
         as a delete (3.1), so the client does not keep it live"
    );
    let (all, _) = a.pull(doc, 0).await;
    assert_eq!(
        model_of(doc, &all).text(),
        "kept",
        "the late insert stays deleted"
    );
    Ok(())
}

async fn upsert_resent_gets_delete(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut c1, site, t) = create_doc(&ctx, "r1", doc, "n").await;
    let mut m1 = model(doc, site, ctx.seed());
    let keep = m1.local_append("keep ");
    let x = m1.local_append("x");
    let frame = upsert_frame(doc, "n", t, &[keep, x.clone()], &[]);
    c1.send(frame.clone()).await;
    // The reply is "lost": the client does not apply it.
    c1.recv_doc_reply(doc, "first send")
        .await
        .expect("the upsert is accepted");
    let (mut c2, _) = ctx.client("r2").await;
    let (_, p) = c2.pull(doc, 0).await;
    c2.upsert(doc, "n", p.sync_time, &[], &[x.pid().clone()])
        .await;
    c1.send(frame).await;
    let (reply, _) = c1
        .recv_doc_reply(doc, "re-sent upsert")
        .await
        .unwrap_or_else(|e| panic!("a re-sent upsert is accepted (3.1): got error {}", e.code));
    assert!(
        deletes_of(&reply).contains(x.pid()),
        "an id this upsert inserts that was deleted after an earlier, lost-reply copy of it is \
         sent as a delete (3.1): expected {:?} among the deletes, got {:?}",
        x.pid(),
        deletes_of(&reply)
    );
    m1.apply_responses(&reply);
    let (truth, _) = c2.pull(doc, 0).await;
    assert_eq!(
        m1.text(),
        model_of(doc, &truth).text(),
        "after the reply the client holds the server's text"
    );
    Ok(())
}

async fn upsert_resend(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut c, site, t) = create_doc(&ctx, "writer", doc, "idem").await;
    let a = atom1("alpha ", 10, site);
    let b = atom1("beta ", 20, site);
    let (_, t1) = c.upsert(doc, "idem", t, &[a.clone(), b], &[]).await;
    let gamma = atom1("gamma", 30, site);
    let frame = upsert_frame(
        doc,
        "idem",
        t1.sync_time,
        std::slice::from_ref(&gamma),
        &[a.pid().clone()],
    );
    c.send(frame.clone()).await;
    let (r1, first) = c.recv_doc_reply(doc, "upsert").await.expect("first send");
    assert!(
        inserts_of(&r1).is_empty() && deletes_of(&r1).is_empty(),
        "the first send's reply excludes its own ids and nothing else changed: got {r1:?}"
    );
    let (before, _) = c.pull(doc, 0).await;
    c.send(frame).await;
    let (r2, second) = c
        .recv_doc_reply(doc, "re-sent upsert")
        .await
        .unwrap_or_else(|e| panic!("a re-sent upsert is accepted (3.1), got error {}", e.code));
    assert!(
        inserts_of(&r2).is_empty() && deletes_of(&r2).is_empty(),
        "the re-send's reply excludes its own ids and nothing else changed: got {r2:?}"
    );
    assert!(
        second.sync_time >= first.sync_time,
        "sync times never go back"
    );
    let (mut o, _) = ctx.client("other").await;
    let (since_first, _) = o.pull(doc, first.sync_time).await;
    assert!(
        inserts_of(&since_first).is_empty() && deletes_of(&since_first).is_empty(),
        "the re-send changed nothing after the first send's 34 (the insert exists with the same \
         data; the first delete time stays): got {since_first:?}"
    );
    let listed = ours(&list_all(&mut o, first.sync_time, "synclist").await, &[doc]);
    assert!(
        listed.is_empty(),
        "the re-send changed nothing, so the document's last change is still at or before the \
         first send's 34: expected it not listed by synclist({}), got {listed:?}",
        first.sync_time
    );
    let (all, _) = o.pull(doc, 0).await;
    assert_eq!(model_of(doc, &all).text(), "beta gamma");
    assert_eq!(
        model_of(doc, &all).live(),
        model_of(doc, &before).live(),
        "the re-send changed no atom"
    );
    Ok(())
}

async fn upsert_id_conflict(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut c, site, t) = create_doc(&ctx, "writer", doc, "n").await;
    let a = atom1("original", 10, site);
    let (_, t1) = c.upsert(doc, "n", t, std::slice::from_ref(&a), &[]).await;
    let forged = atom1("other", 10, site);
    let fresh = atom1("fresh", 20, site);
    let err = c
        .try_upsert(
            doc,
            "renamed?",
            t1.sync_time,
            &[fresh.clone(), forged],
            &[a.pid().clone()],
        )
        .await
        .err()
        .unwrap_or_else(|| {
            panic!("an existing id with other data: expected id_conflict, got 33s and a 34")
        });
    assert_eq!(
        err.code,
        ErrorCode::ID_CONFLICT,
        "expected id_conflict, got {} {:?}",
        err.code,
        err.message
    );
    let (rs, _) = c.pull(doc, 0).await;
    let m = model_of(doc, &rs);
    assert_eq!(
        (m.text().as_str(), m.name.as_str()),
        ("original", "n"),
        "one bad insert rejects the whole upsert: its other insert, its delete and its name are not applied"
    );
    c.upsert(doc, "n", t1.sync_time, &[a, fresh], &[]).await;
    let (rs, _) = c.pull(doc, 0).await;
    assert_eq!(
        model_of(doc, &rs).text(),
        "originalfresh",
        "the same id with the same data is fine"
    );
    Ok(())
}

async fn upsert_names(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut c1, _, t1) = create_doc(&ctx, "r1", doc, "Draft").await;
    let (mut c2, _) = ctx.client("r2").await;
    let (rs, p2) = c2.pull(doc, 0).await;
    assert_eq!(reply_name(&rs, "pull"), "Draft");
    let (reply, t2) = c1.upsert(doc, "Plan", t1, &[], &[]).await;
    assert_eq!(
        reply_name(&reply, "knowing rename"),
        "Plan",
        "a knowing rename applies; the 33 carries the current name"
    );
    let (reply, p2b) = c2
        .upsert(doc, "Draft", p2.sync_time, &[atom1("x", 1, p2.site)], &[])
        .await;
    assert_eq!(
        reply_name(&reply, "stale upsert"),
        "Plan",
        "a client that did not know of a rename never reverts it (3.1): the server's newer name stands"
    );
    let (rs, _) = c1.pull(doc, 0).await;
    assert_eq!(reply_name(&rs, "pull"), "Plan");
    let (reply, _) = c2.upsert(doc, "Final", p2b.sync_time, &[], &[]).await;
    assert_eq!(reply_name(&reply, "knowing rename"), "Final");
    let (rs, _) = c1.pull(doc, 0).await;
    assert_eq!(
        reply_name(&rs, "pull"),
        "Final",
        "a rename made knowing the current name applies"
    );
    let listed = ours(&list_all(&mut c1, t2.sync_time, "synclist").await, &[doc]);
    assert_eq!(
        listed.len(),
        1,
        "a rename is a change listed by synclist: got {listed:?}"
    );
    Ok(())
}
