//! Sync mode (PROTOCOL.md 3.1): synclist, pull and upsert with cursors,
//! idempotence, refusals that keep the connection, names, and sites (1.2).

use std::collections::{BTreeMap, BTreeSet};

use notesync_protocol::{ClientFrame, DocResponse, ErrorCode, Pid, ServerFrame};
use notesync_tests::{
    DocModel, Rng, ServerProcess, SessionClient, atom, describe, model_of, upsert_frame,
};

const R1: u128 = 0x1111_1111_1111_1111_1111_1111_1111_1111;
const R2: u128 = 0x2222_2222_2222_2222_2222_2222_2222_2222;
const R3: u128 = 0x3333_3333_3333_3333_3333_3333_3333_3333;

/// The inserted atoms of some 33s, as (id, data).
fn inserts_of(rs: &[DocResponse]) -> BTreeMap<Pid, String> {
    rs.iter()
        .flat_map(|r| r.inserts.iter())
        .map(|a| (a.pid.to_pid(), a.data.to_owned()))
        .collect()
}

/// The deleted ids of some 33s.
fn deletes_of(rs: &[DocResponse]) -> BTreeSet<Pid> {
    rs.iter()
        .flat_map(|r| r.deletes.iter())
        .map(|p| p.to_pid())
        .collect()
}

/// The name every 33 of a reply carries (they must agree).
fn name_of_reply(rs: &[DocResponse]) -> &str {
    let first = rs.first().expect("a reply with at least one 33");
    for r in rs {
        assert_eq!(
            r.name, first.name,
            "the 33s of one reply disagree on the name"
        );
    }
    first.name.as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synclist_lists_changed_docs_ascending_and_the_cursor_lists_nothing_new() {
    let server = ServerProcess::start();
    let mut rng = Rng::new(1);
    let mut c = server.connect().await;
    c.hello(R1).await;
    let docs: Vec<u128> = (0..3).map(|_| rng.next_u128()).collect();
    let mut syncs = Vec::new();
    for (i, &d) in docs.iter().enumerate() {
        let name = format!("doc {i}");
        let (_, s) = c.upsert(d, &name, 0, &[], &[]).await;
        assert_ne!(s.site, 0, "an upsert after hello allocates a site (1.2)");
        let (_, s2) = c
            .upsert(d, &name, s.sync_time, &[atom("hello", 10, s.site)], &[])
            .await;
        assert!(s2.sync_time > s.sync_time, "times only increase");
        syncs.push(s2.sync_time);
    }

    let list = c.synclist(0).await;
    assert_eq!(
        list.iter().map(|e| e.doc).collect::<Vec<_>>(),
        docs,
        "synclist(0) lists every document, ascending by last change: {list:?}"
    );
    for (i, e) in list.iter().enumerate() {
        assert!(e.modified > 0);
        assert!(
            e.modified <= syncs[i],
            "doc {i}'s change is covered by its upsert's 34 ({} > {})",
            e.modified,
            syncs[i]
        );
        if i > 0 {
            // Doc i changed after doc i-1's 34 arrived: a client holding that
            // 34 as a cursor must still see doc i's change (3.4).
            assert!(
                e.modified > syncs[i - 1],
                "doc {i} changed after the 34 of doc {} ({}) but got time {}",
                i - 1,
                syncs[i - 1],
                e.modified
            );
        }
    }
    let last = list.last().unwrap().modified;
    let mut late = server.connect().await;
    let w = late.hello(R2).await;
    assert!(
        w.server_time >= *syncs.last().unwrap(),
        "the welcome's current time is not before a time already returned: {} < {}",
        w.server_time,
        syncs.last().unwrap()
    );
    assert_eq!(
        c.synclist(last).await,
        vec![],
        "nothing changed after the last listed time"
    );
    let from_first = c.synclist(list[0].modified).await;
    assert_eq!(
        from_first.iter().map(|e| e.doc).collect::<Vec<_>>(),
        docs[1..],
        "synclist(t) lists only documents changed after t"
    );

    // A new change to the first document lists it again, after `last`.
    let (_, s) = c.pull(docs[0], 0).await;
    let (_, s2) = c
        .upsert(
            docs[0],
            "doc 0",
            s.sync_time,
            &[atom("more", 20, s.site)],
            &[],
        )
        .await;
    let again = c.synclist(last).await;
    assert_eq!(again.len(), 1, "exactly the changed document: {again:?}");
    assert_eq!(again[0].doc, docs[0]);
    assert!(again[0].modified > last && again[0].modified <= s2.sync_time);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_since_zero_returns_the_text_and_since_a_cursor_only_the_delta() {
    let server = ServerProcess::start();
    let doc = 0xA11CE;
    let mut w = server.connect().await.with_label("writer");
    w.hello(R1).await;
    let (_, s) = w.upsert(doc, "greeting", 0, &[], &[]).await;
    let mut wm = DocModel::new(doc);
    wm.set_site(s.site, 1);
    let hello = wm.local_append("Hello");
    let space = wm.local_append(" ");
    let world = wm.local_append("world");
    let (_, s1) = w
        .upsert(
            doc,
            "greeting",
            s.sync_time,
            &[hello, space.clone(), world.clone()],
            &[],
        )
        .await;

    let mut r = server.connect().await.with_label("reader");
    r.hello(R2).await;
    let (rs, rsync) = r.pull(doc, 0).await;
    let mut rm = model_of(doc, &rs);
    assert_eq!(rm.text(), "Hello world");
    assert_eq!(name_of_reply(&rs), "greeting");
    assert!(rsync.sync_time >= s1.sync_time, "the 34 covers the upsert");
    assert_ne!(rsync.site, 0, "a pull after hello allocates a site");
    assert_ne!(rsync.site, s.site, "two replicas never share a site");

    // The writer adds "!" and deletes " world".
    let bang = wm.local_append("!");
    wm.apply_delete(space.pid());
    wm.apply_delete(world.pid());
    let (_, s2) = w
        .upsert(
            doc,
            "greeting",
            s1.sync_time,
            std::slice::from_ref(&bang),
            &[space.pid().clone(), world.pid().clone()],
        )
        .await;
    assert_eq!(wm.text(), "Hello!");

    let (delta, dsync) = r.pull(doc, rsync.sync_time).await;
    assert_eq!(
        inserts_of(&delta),
        BTreeMap::from([(bang.pid().clone(), "!".to_string())]),
        "a pull since a cursor returns only atoms inserted after it"
    );
    assert_eq!(
        deletes_of(&delta),
        BTreeSet::from([space.pid().clone(), world.pid().clone()]),
        "a pull since a cursor returns the deletes made after it"
    );
    rm.apply_responses(&delta);
    assert_eq!(rm.text(), "Hello!");
    assert!(dsync.sync_time >= s2.sync_time);
    assert_eq!(dsync.site, rsync.site, "a replica keeps its site");

    // Nothing changed since: still a 33 (with the name), nothing in it.
    let (empty, esync) = r.pull(doc, dsync.sync_time).await;
    assert!(
        !empty.is_empty(),
        "a pull is answered by one or more 33 then a 34 (3.1), even with nothing new"
    );
    assert_eq!(name_of_reply(&empty), "greeting");
    assert!(inserts_of(&empty).is_empty() && deletes_of(&empty).is_empty());
    assert!(
        esync.sync_time >= dsync.sync_time,
        "sync times never go back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_atom_inserted_and_deleted_after_the_cursor_is_sent_as_neither() {
    let server = ServerProcess::start();
    let doc = 0xB0B;
    let mut w = server.connect().await;
    w.hello(R1).await;
    let (_, s0) = w.upsert(doc, "n", 0, &[], &[]).await;
    let a = atom("A", 100, s0.site);
    let b = atom("B", 200, s0.site);
    let (_, ta) = w
        .upsert(doc, "n", s0.sync_time, std::slice::from_ref(&a), &[])
        .await;
    let (rb, tb) = w
        .upsert(doc, "n", ta.sync_time, std::slice::from_ref(&b), &[])
        .await;
    assert!(
        inserts_of(&rb).is_empty(),
        "an upsert's reply excludes its own inserts"
    );
    let (_, tc) = w
        .upsert(doc, "n", tb.sync_time, &[], &[b.pid().clone()])
        .await;
    assert!(ta.sync_time < tb.sync_time && tb.sync_time < tc.sync_time);

    let mut r = server.connect().await;
    let (since_a, _) = r.pull(doc, ta.sync_time).await;
    assert!(
        inserts_of(&since_a).is_empty() && deletes_of(&since_a).is_empty(),
        "B was inserted and deleted after the cursor: sent as neither, got {since_a:?}"
    );
    let (since_0, _) = r.pull(doc, 0).await;
    assert_eq!(
        inserts_of(&since_0),
        BTreeMap::from([(a.pid().clone(), "A".to_string())]),
        "since 0 only A is live"
    );
    assert!(
        deletes_of(&since_0).is_empty(),
        "B was inserted after 0: its delete is not sent"
    );
    let (since_b, _) = r.pull(doc, tb.sync_time).await;
    assert!(inserts_of(&since_b).is_empty());
    assert_eq!(
        deletes_of(&since_b),
        BTreeSet::from([b.pid().clone()]),
        "B was inserted at or before this cursor: its delete is sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upsert_reply_is_what_the_client_lacks_excluding_what_it_sent() {
    let server = ServerProcess::start();
    let doc = 0xC0FFEE;
    let mut c1 = server.connect().await.with_label("r1");
    c1.hello(R1).await;
    let (_, s) = c1.upsert(doc, "shared", 0, &[], &[]).await;
    let a = atom("A", 100, s.site);
    let (_, t1) = c1
        .upsert(doc, "shared", s.sync_time, std::slice::from_ref(&a), &[])
        .await;

    let mut c2 = server.connect().await.with_label("r2");
    c2.hello(R2).await;
    let (rs, p2) = c2.pull(doc, 0).await;
    let mut m2 = model_of(doc, &rs);
    m2.set_site(p2.site, 2);
    assert_eq!(m2.text(), "A");

    // r1 adds B; then r2, not knowing B, adds X and deletes A.
    let b = atom("B", 300, s.site);
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
        "the reply excludes the delete the upsert sent: {reply:?}"
    );
    m2.apply_responses(&reply);

    let (all, _) = c1.pull(doc, 0).await;
    assert_eq!(model_of(doc, &all).live(), m2.live());
    assert_eq!(m2.text().len(), 2, "B and X, in id order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resending_an_upsert_changes_nothing() {
    let server = ServerProcess::start();
    let doc = 0xD0D0;
    let mut c = server.connect().await;
    c.hello(R1).await;
    let (_, s) = c.upsert(doc, "idem", 0, &[], &[]).await;
    let a = atom("alpha ", 10, s.site);
    let b = atom("beta ", 20, s.site);
    let (_, t1) = c
        .upsert(doc, "idem", s.sync_time, &[a.clone(), b], &[])
        .await;

    let gamma = atom("gamma", 30, s.site);
    let frame = upsert_frame(
        doc,
        "idem",
        t1.sync_time,
        std::slice::from_ref(&gamma),
        &[a.pid().clone()],
    );
    c.send(frame.clone()).await;
    let (r1, first) = c.recv_doc_reply(doc, "upsert").await.expect("first send");
    assert!(inserts_of(&r1).is_empty() && deletes_of(&r1).is_empty());
    let (before, _) = c.pull(doc, 0).await;
    assert_eq!(model_of(doc, &before).text(), "beta gamma");

    // The reply was "lost": the client sends the very same upsert again.
    c.send(frame).await;
    let (r2, second) = c
        .recv_doc_reply(doc, "upsert")
        .await
        .unwrap_or_else(|e| panic!("a re-sent upsert is accepted (3.1), got {e:?}"));
    assert!(
        inserts_of(&r2).is_empty() && deletes_of(&r2).is_empty(),
        "the re-send's reply excludes its own ids and nothing else changed: {r2:?}"
    );
    assert!(second.sync_time >= first.sync_time);

    let (after, _) = c.pull(doc, 0).await;
    assert_eq!(model_of(doc, &after).live(), model_of(doc, &before).live());
    let mut other = server.connect().await;
    let (since_first, _) = other.pull(doc, first.sync_time).await;
    assert!(
        inserts_of(&since_first).is_empty() && deletes_of(&since_first).is_empty(),
        "the re-send changed nothing after the first send's 34 (the first delete \
         time stays, the insert exists with the same data): {since_first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_id_with_other_data_is_id_conflict_and_the_connection_stays() {
    let server = ServerProcess::start();
    let doc = 0xE0E0;
    let mut c = server.connect().await;
    c.hello(R1).await;
    let (_, s) = c.upsert(doc, "n", 0, &[], &[]).await;
    let a = atom("original", 10, s.site);
    let (_, t1) = c
        .upsert(doc, "n", s.sync_time, std::slice::from_ref(&a), &[])
        .await;

    let forged = atom("other", 10, s.site);
    let fresh = atom("fresh", 20, s.site);
    let err = c
        .try_upsert(doc, "n", t1.sync_time, &[fresh.clone(), forged], &[])
        .await
        .expect_err("an existing id with other data is refused");
    assert_eq!(err.code, ErrorCode::ID_CONFLICT, "{err:?}");

    // The connection stays, and nothing of the refused upsert was applied.
    let (rs, _) = c.pull(doc, 0).await;
    let m = model_of(doc, &rs);
    assert_eq!(m.text(), "original");
    assert!(
        m.get(fresh.pid()).is_none(),
        "one bad insert rejects the whole upsert"
    );
    // The same id with the same data is fine (idempotent).
    c.upsert(doc, "n", t1.sync_time, &[a, fresh], &[]).await;
    let (rs, _) = c.pull(doc, 0).await;
    assert_eq!(model_of(doc, &rs).text(), "originalfresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_without_hello_is_hello_required_and_the_connection_stays() {
    let server = ServerProcess::start();
    let doc = 0xF0F0;
    let mut owner = server.connect().await;
    owner.hello(R1).await;
    let (_, s) = owner.upsert(doc, "n", 0, &[], &[]).await;
    let a = atom("keep", 10, s.site);
    owner
        .upsert(doc, "n", s.sync_time, std::slice::from_ref(&a), &[])
        .await;

    let mut anon = server.connect().await.with_label("no-hello");
    let (rs, p) = anon.pull(doc, 0).await;
    assert_eq!(p.site, 0, "a connection without hello has no site (1.2)");
    assert_eq!(model_of(doc, &rs).text(), "keep");
    let err = anon
        .try_upsert(
            doc,
            "n",
            p.sync_time,
            &[atom("x", 20, s.site)],
            &[a.pid().clone()],
        )
        .await
        .expect_err("an insert without hello is refused");
    assert_eq!(err.code, ErrorCode::HELLO_REQUIRED, "{err:?}");
    let (rs, _) = anon.pull(doc, 0).await;
    assert_eq!(
        model_of(doc, &rs).text(),
        "keep",
        "the refused upsert's delete was not applied either (atomic)"
    );
    // Deletes need no site.
    let (_, d) = anon
        .upsert(doc, "n", p.sync_time, &[], &[a.pid().clone()])
        .await;
    assert_eq!(d.site, 0);
    let (rs, _) = owner.pull(doc, 0).await;
    assert_eq!(model_of(doc, &rs).text(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_with_another_sites_id_is_site_mismatch_and_the_connection_stays() {
    let server = ServerProcess::start();
    let doc = 0x5175;
    let mut c1 = server.connect().await.with_label("r1");
    c1.hello(R1).await;
    let (_, s1) = c1.upsert(doc, "n", 0, &[], &[]).await;
    let mut c2 = server.connect().await.with_label("r2");
    c2.hello(R2).await;
    let (_, s2) = c2.pull(doc, 0).await;
    assert!(s1.site != 0 && s2.site != 0 && s1.site != s2.site);

    let own = atom("mine", 10, s2.site);
    for forged_site in [s1.site, if s2.site == 255 { 254 } else { 255 }] {
        let err = c2
            .try_upsert(
                doc,
                "n",
                s2.sync_time,
                &[own.clone(), atom("forged", 20, forged_site)],
                &[],
            )
            .await
            .expect_err("an insert with another site's id is refused");
        assert_eq!(
            err.code,
            ErrorCode::SITE_MISMATCH,
            "site {forged_site}: {err:?}"
        );
    }
    let (rs, _) = c2.pull(doc, 0).await;
    assert_eq!(
        model_of(doc, &rs).text(),
        "",
        "nothing of the refused upserts"
    );
    c2.upsert(doc, "n", s2.sync_time, std::slice::from_ref(&own), &[])
        .await;
    let (rs, _) = c1.pull(doc, 0).await;
    assert_eq!(model_of(doc, &rs).text(), "mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_of_an_unknown_document_is_unknown_document_and_the_connection_stays() {
    let server = ServerProcess::start();
    let mut c = server.connect().await;
    c.hello(R1).await;
    let (_, s) = c.upsert(7, "seven", 0, &[], &[]).await;
    c.upsert(7, "seven", s.sync_time, &[atom("7", 1, s.site)], &[])
        .await;
    let err = c
        .try_pull(0xDEAD_BEEF, 0)
        .await
        .expect_err("an unknown document is an error");
    assert_eq!(err.code, ErrorCode::UNKNOWN_DOCUMENT, "{err:?}");
    let list = c.synclist(0).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].doc, 7);
    let (rs, _) = c.pull(7, 0).await;
    assert_eq!(name_of_reply(&rs), "seven");

    let mut anon = server.connect().await;
    let err = anon.try_pull(0xDEAD_BEEF, 0).await.expect_err("unknown");
    assert_eq!(err.code, ErrorCode::UNKNOWN_DOCUMENT);
    assert_eq!(anon.synclist(0).await.len(), 1);
    // A pull never creates the document.
    assert!(anon.try_pull(0xDEAD_BEEF, 0).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_name_never_reverts_a_newer_rename_and_a_deliberate_one_applies() {
    let server = ServerProcess::start();
    let doc = 0x4A4E;
    let mut c1 = server.connect().await.with_label("r1");
    c1.hello(R1).await;
    let (_, t1) = c1.upsert(doc, "Draft", 0, &[], &[]).await;
    let mut c2 = server.connect().await.with_label("r2");
    c2.hello(R2).await;
    let (rs, p2) = c2.pull(doc, 0).await;
    assert_eq!(name_of_reply(&rs), "Draft");

    // r1 renames knowingly (nothing changed since its cursor).
    let (reply, t2) = c1.upsert(doc, "Plan", t1.sync_time, &[], &[]).await;
    assert_eq!(
        name_of_reply(&reply),
        "Plan",
        "the 33 carries the current name"
    );

    // r2 did not know: it sends its old name with its old cursor.
    let (reply, p2b) = c2
        .upsert(doc, "Draft", p2.sync_time, &[atom("x", 1, p2.site)], &[])
        .await;
    assert_eq!(
        name_of_reply(&reply),
        "Plan",
        "a stale name never reverts a newer rename (3.1)"
    );
    let (rs, _) = c1.pull(doc, t2.sync_time).await;
    assert_eq!(name_of_reply(&rs), "Plan");

    // Now r2 knows "Plan" and renames deliberately.
    let (reply, _) = c2.upsert(doc, "Final", p2b.sync_time, &[], &[]).await;
    assert_eq!(name_of_reply(&reply), "Final");
    let (rs, _) = c1.pull(doc, 0).await;
    assert_eq!(name_of_reply(&rs), "Final", "a deliberate rename applies");
    let list = c1.synclist(t2.sync_time).await;
    assert_eq!(list.len(), 1, "a rename is a change listed by synclist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_replica_gets_its_own_site_and_keeps_it() {
    let server = ServerProcess::start();
    let doc = 0x517E;
    let mut sites = BTreeMap::new();
    for (i, r) in [R1, R2, R3].into_iter().enumerate() {
        let mut c = server.connect().await;
        c.hello(r).await;
        let site = if i == 0 {
            c.upsert(doc, "sites", 0, &[], &[]).await.1.site
        } else if i == 1 {
            c.pull(doc, 0).await.1.site
        } else {
            c.session_start(0, doc).await.1.site
        };
        assert_ne!(site, 0);
        sites.insert(r, site);
    }
    let distinct: BTreeSet<u8> = sites.values().copied().collect();
    assert_eq!(distinct.len(), 3, "three replicas, three sites: {sites:?}");
    for r in [R1, R2, R3] {
        let mut c = server.connect().await;
        c.hello(r).await;
        let (_, s) = c.pull(doc, 0).await;
        assert_eq!(
            s.site, sites[&r],
            "a replica keeps its site on a new connection"
        );
    }
    let mut anon = server.connect().await;
    assert_eq!(anon.pull(doc, 0).await.1.site, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_gives_255_sites_then_refuses_inserts_from_the_256th_replica() {
    let server = ServerProcess::start();
    let doc = 0xFFFF;
    let mut owner = server.connect().await;
    owner.hello(1).await;
    let (_, s) = owner.upsert(doc, "crowded", 0, &[], &[]).await;
    let a = atom("a", 5, s.site);
    owner
        .upsert(doc, "crowded", s.sync_time, std::slice::from_ref(&a), &[])
        .await;
    let mut sites = BTreeSet::from([s.site]);
    for replica in 2..=255u128 {
        let mut c = server.connect().await;
        c.hello(replica).await;
        let (_, p) = c.pull(doc, 0).await;
        assert_ne!(p.site, 0, "replica {replica} of 255 gets a site");
        assert!(sites.insert(p.site), "site {} given twice", p.site);
    }
    assert_eq!(sites.len(), 255);

    let mut late = server.connect().await.with_label("replica 256");
    late.hello(256).await;
    let (_, p) = late.pull(doc, 0).await;
    assert_eq!(p.site, 0, "the 256th replica gets no site (1.2)");
    let err = late
        .try_upsert(doc, "crowded", p.sync_time, &[atom("z", 9, 1)], &[])
        .await
        .expect_err("an insert without a site is refused");
    assert_eq!(err.code, ErrorCode::SITES_EXHAUSTED, "{err:?}");
    // It still reads, deletes and renames.
    let (_, d) = late
        .upsert(doc, "renamed", p.sync_time, &[], &[a.pid().clone()])
        .await;
    assert_eq!(d.site, 0);
    let (rs, _) = owner.pull(doc, 0).await;
    let m = model_of(doc, &rs);
    assert_eq!(m.text(), "");
    assert_eq!(m.name, "renamed");

    // In a session too: its 68 carries site 0 and its inserts are refused.
    let mut sc =
        SessionClient::start(server.addr(), "replica 256 session", Some(256), doc, 0, 1).await;
    assert_eq!(sc.site(), 0, "the 68 of a replica without a site carries 0");
    sc.send_ops(vec![ClientFrame::Insert(
        notesync_protocol::SessionInsert::new(atom("z", 9, 1)),
    )])
    .await;
    sc.wait_acked().await;
    let codes: Vec<ErrorCode> = sc.errors.iter().map(|(_, e)| e.code).collect();
    assert_eq!(codes, vec![ErrorCode::SITES_EXHAUSTED]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let server = ServerProcess::start();
    let mut c = server.connect().await;
    c.hello(R1).await;
    let docs: Vec<u128> = (1..=20).collect();
    // Create all documents in one pipelined burst, then pull them all and
    // list, again in one burst.
    c.send_many(
        docs.iter()
            .map(|&d| upsert_frame(d, &format!("d{d}"), 0, &[], &[])),
    )
    .await;
    let mut created = Vec::new();
    for &d in &docs {
        let (rs, s) = c.recv_doc_reply(d, "pipelined upsert").await.expect("ok");
        assert_eq!(name_of_reply(&rs), format!("d{d}"));
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
        assert_eq!(name_of_reply(&rs), format!("d{d}"));
    }
    match c.recv().await {
        ServerFrame::SynclistResponse(e) => {
            let times: Vec<u64> = e.iter().map(|e| e.modified).collect();
            assert!(
                times.windows(2).all(|w| w[0] < w[1]),
                "each document's creation is a change with its own time: times are \
                 strictly increasing and every assigned time is unique (1), got {times:?}"
            );
            let listed: Vec<u128> = e.iter().map(|e| e.doc).collect();
            assert_eq!(listed, docs, "ascending by time = creation order");
            for (e, s) in e.iter().zip(&created) {
                assert!(e.modified <= s.sync_time, "a 34 covers its upsert's change");
            }
        }
        other => panic!("expected 32, got {}", describe(&other)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_that_arrives_before_its_insert_keeps_the_atom_deleted() {
    let server = ServerProcess::start();
    let doc = 0x70B5;
    let mut a = server.connect().await.with_label("deleter");
    a.hello(R1).await;
    let (_, sa) = a.upsert(doc, "n", 0, &[], &[]).await;
    let mut b = server.connect().await.with_label("late inserter");
    b.hello(R2).await;
    let (_, sb) = b.pull(doc, 0).await;
    let mut reader = server.connect().await.with_label("reader");
    let (_, sr) = reader.pull(doc, 0).await;

    // b's insert reached a some other way (a session, say) and a deleted
    // it; a's delete reaches the server first.
    let late = atom("late", 40, sb.site);
    let (_, ta) = a
        .upsert(doc, "n", sa.sync_time, &[], &[late.pid().clone()])
        .await;
    let (delta, sr2) = reader.pull(doc, sr.sync_time).await;
    assert_eq!(
        deletes_of(&delta),
        BTreeSet::from([late.pid().clone()]),
        "a delete of an id the server has only as a tombstone is sent (3.1)"
    );
    assert!(inserts_of(&delta).is_empty());

    let (reply, _) = b
        .upsert(
            doc,
            "n",
            sb.sync_time,
            &[late.clone(), atom("kept", 50, sb.site)],
            &[],
        )
        .await;
    assert!(
        !inserts_of(&reply).contains_key(late.pid()),
        "the reply excludes the upsert's own ids"
    );
    let (all, _) = reader.pull(doc, 0).await;
    assert_eq!(
        model_of(doc, &all).text(),
        "kept",
        "an insert that arrives after its delete stays deleted (3.1)"
    );
    let (delta, _) = reader.pull(doc, sr2.sync_time).await;
    assert_eq!(
        inserts_of(&delta),
        BTreeMap::from([(atom("kept", 50, sb.site).pid().clone(), "kept".to_string())]),
        "since the tombstone was sent, only the live insert is new"
    );
    let (since_a, _) = a.pull(doc, ta.sync_time).await;
    let mut m = DocModel::new(doc);
    m.apply_delete(late.pid());
    m.apply_responses(&since_a);
    assert_eq!(m.text(), "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_atoms_and_ids_at_their_size_limits_round_trip() {
    let server = ServerProcess::start();
    let doc = 0x0001_1117;
    let mut c = server.connect().await;
    let welcome = c.hello(R1).await;
    assert_eq!(
        welcome.version,
        notesync_protocol::PROTOCOL_VERSION,
        "welcome carries the version of the hello (PROTOCOL.md 6)"
    );
    // 85 three-byte characters: exactly 255 bytes.
    let long_name = "語".repeat(85);
    assert_eq!(long_name.len(), 255);
    let (rs, s) = c.upsert(doc, &long_name, 0, &[], &[]).await;
    assert_eq!(name_of_reply(&rs), long_name);
    // 255 bytes of atom data ending in a 4-byte character.
    let data = format!("{}🙂", "a".repeat(251));
    assert_eq!(data.len(), 255);
    // Ids at the default max_pid_depth (64), the last level ours.
    let mut levels: Vec<notesync_protocol::Level> = (0..63)
        .map(|i| notesync_protocol::Level::new(i, 0))
        .collect();
    levels.push(notesync_protocol::Level::new(7, s.site));
    let deep = Pid::from_levels(&levels);
    let big = notesync_protocol::Atom::new(data.clone(), deep.clone()).unwrap();
    let mut ghost_levels = levels.clone();
    ghost_levels[62] = notesync_protocol::Level::new(99, 200);
    let ghost = Pid::from_levels(&ghost_levels);
    c.upsert(
        doc,
        &long_name,
        s.sync_time,
        &[big],
        std::slice::from_ref(&ghost),
    )
    .await;
    let mut r = server.connect().await;
    let (rs, _) = r.pull(doc, 0).await;
    let m = model_of(doc, &rs);
    assert_eq!(m.name, long_name);
    assert_eq!(m.live(), vec![(deep, data)]);
    assert!(
        m.get(&ghost).is_some_and(|e| !e.live),
        "the delete of an unknown 64-level id is kept as a tombstone and sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upsert_resent_after_a_lost_reply_still_learns_that_its_atom_was_deleted() {
    // PROTOCOL.md 3.1: "a re-send after a lost reply is safe", and "a
    // client may forget the ops it sent only after that 34 arrives". The
    // client below does exactly that; it must end with the server's text.
    let server = ServerProcess::start();
    let doc = 0x1057;
    let mut c1 = server.connect().await.with_label("r1");
    c1.hello(R1).await;
    let (_, s) = c1.upsert(doc, "n", 0, &[], &[]).await;
    let mut m1 = DocModel::new(doc);
    m1.set_site(s.site, 1);
    let keep = m1.local_append("keep ");
    let x = m1.local_append("x");
    let frame = upsert_frame(doc, "n", s.sync_time, &[keep, x.clone()], &[]);
    c1.send(frame.clone()).await;
    // The reply is lost (the client never sees it): its cursor stays.
    let _lost = c1.recv_doc_reply(doc, "upsert").await.expect("committed");

    let mut c2 = server.connect().await.with_label("r2");
    c2.hello(R2).await;
    let (rs, p) = c2.pull(doc, 0).await;
    assert_eq!(model_of(doc, &rs).text(), "keep x");
    c2.upsert(doc, "n", p.sync_time, &[], &[x.pid().clone()])
        .await;

    // r1 sends the same upsert again and applies the reply.
    c1.send(frame).await;
    let (reply, _) = c1.recv_doc_reply(doc, "re-sent upsert").await.expect("ok");
    m1.apply_responses(&reply);
    let (truth, _) = c2.pull(doc, 0).await;
    assert_eq!(
        m1.text(),
        model_of(doc, &truth).text(),
        "after the re-send's reply the client must hold the server's text: r2's delete of \
         x happened after r1's cursor and r1 holds x, but the reply left the delete out \
         (3.1's 'sent as neither' / 'excluding the ids this upsert sent' drop a delete the \
         client lacks; its next cursor is past it, so it never learns it)"
    );
}
