//! Sites (PROTOCOL.md 1.3, 3.1, 3.2): one per (document, replica), kept;
//! none without hello; refusals that keep the connection.

use std::collections::{BTreeMap, BTreeSet};

use notesync_protocol::{ClientFrame, ErrorCode, ServerFrame, SessionDelete, SessionInsert};

use super::util::{
    atom1, create_doc, deletes_of, expect_still_open_sync, inserts_of, other_site, recv_ack,
    recv_error, reply_name,
};
use super::{Check, Ctx, Outcome};
use crate::conn::{Conn, Event, describe, name_of};
use crate::model::model_of;

pub fn checks() -> Vec<Check<Ctx>> {
    vec![
        Check::new(
            "site-one-per-replica-and-kept",
            "1.3",
            "pull, upsert and session_start give each replica its own site, the same on every connection",
            site_per_replica,
        ),
        Check::new(
            "site-none-without-hello",
            "1.3",
            "without hello: 34 and 68 carry site 0; listing, pulling, sessions, deletes and renames work",
            site_none_without_hello,
        ),
        Check::new(
            "site-hello-required-upsert",
            "1.3, 3.1",
            "an upsert insert without hello is hello_required; nothing of the upsert applies; still open",
            hello_required_upsert,
        ),
        Check::new(
            "site-hello-required-session",
            "1.3, 3.2",
            "a 65 without hello is hello_required before the ack that counts it; not broadcast",
            hello_required_session,
        ),
        Check::new(
            "site-mismatch-upsert",
            "1.3, 3.1",
            "an upsert inserting another site's id is site_mismatch; nothing of it applies; still open",
            site_mismatch_upsert,
        ),
        Check::new(
            "site-mismatch-session",
            "1.3, 3.2",
            "65 of another site, 66 with another site field, 66 with site 0 from a replica with a site: site_mismatch",
            site_mismatch_session,
        ),
        Check::new(
            "sites-exhausted-256th-replica",
            "1.3",
            "255 replicas get sites 1-255; the 256th gets site 0 in 34/68, sites_exhausted on inserts, still deletes and renames",
            sites_exhausted,
        )
        .with_timeout(std::time::Duration::from_secs(120)),
    ]
}

async fn site_per_replica(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let replicas: Vec<u128> = (0..3).map(|_| ctx.replica()).collect();
    let mut sites = BTreeMap::new();
    for (i, &r) in replicas.iter().enumerate() {
        let (mut c, _) = ctx.client_as(&format!("replica {i}"), r).await;
        let site = match i {
            0 => c.upsert(doc, "sites", 0, &[], &[]).await.1.site,
            1 => c.pull(doc, 0).await.1.site,
            _ => c.session_start(0, doc).await.1.site,
        };
        assert_ne!(
            site, 0,
            "replica {i}: a replica that sent hello gets a site (1.3): got 0"
        );
        sites.insert(r, site);
    }
    let distinct: BTreeSet<u8> = sites.values().copied().collect();
    assert_eq!(
        distinct.len(),
        3,
        "three replicas, three sites: got {sites:?}"
    );
    for (i, &r) in replicas.iter().enumerate() {
        for how in 0..3 {
            let (mut c, _) = ctx.client_as(&format!("replica {i} again"), r).await;
            let site = match how {
                0 => c.pull(doc, 0).await.1.site,
                1 => c.upsert(doc, "sites", 0, &[], &[]).await.1.site,
                _ => c.session_start(0, doc).await.1.site,
            };
            assert_eq!(
                site,
                sites[&r],
                "replica {i} on a new connection ({}): a replica keeps its site (1.3)",
                ["pull", "upsert", "session_start"][how]
            );
        }
    }
    Ok(())
}

async fn site_none_without_hello(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut owner, site, t) = create_doc(&ctx, "owner", doc, "start").await;
    let a = atom1("A", 10, site);
    let b = atom1("B", 20, site);
    owner
        .upsert(doc, "start", t, &[a.clone(), b.clone()], &[])
        .await;
    let mut anon = ctx.anon("no hello").await?;
    let list = super::checks_sync::list_all(&mut anon, t.saturating_sub(1), "synclist").await;
    assert!(
        list.iter().any(|e| e.doc == doc),
        "a connection without hello may list: expected the document listed"
    );
    let (rs, p) = anon.pull(doc, 0).await;
    assert_eq!(
        p.site, 0,
        "a pull without hello: the 34 carries site 0 (1.3), got {}",
        p.site
    );
    assert_eq!(model_of(doc, &rs).text(), "AB");
    let (_, d) = anon
        .upsert(doc, "renamed by anon", p.sync_time, &[], &[a.pid().clone()])
        .await;
    assert_eq!(
        d.site, 0,
        "an upsert without hello: the 34 carries site 0 (1.3)"
    );
    let (rs, _) = owner.pull(doc, 0).await;
    let m = model_of(doc, &rs);
    assert_eq!(
        (m.text().as_str(), m.name.as_str()),
        ("B", "renamed by anon"),
        "a connection without hello may delete and rename (1.3)"
    );
    // Its upsert creates an unknown document too; a delete there is kept
    // as a tombstone and sent by pulls since 0 (3.1).
    let fresh = ctx.doc();
    let ghost = super::util::pid1(9, other_site(site));
    let (_, f) = anon
        .upsert(fresh, "", 0, &[], std::slice::from_ref(&ghost))
        .await;
    assert_eq!(
        f.site, 0,
        "an upsert without hello that creates a document: the 34 carries site 0 (1.3)"
    );
    let (rs, _) = owner.pull(fresh, 0).await;
    assert_eq!(
        deletes_of(&rs),
        BTreeSet::from([ghost]),
        "the document created without hello holds the tombstone of its delete"
    );
    // A session without hello: site 0, receives, deletes with site 0, renames.
    let mut s = ctx.anon("no-hello session").await?;
    let (_, st) = s.session_start(0, doc).await;
    assert_eq!(
        st.site, 0,
        "a session without hello: the 68 carries site 0 (1.3)"
    );
    let (mut w, _) = ctx.client("writer session").await;
    let (_, wst) = w.session_start(0, doc).await;
    let c = atom1("C", 30, wst.site);
    w.insert(c.clone()).await;
    recv_ack(&mut w, 1, "writer's insert").await;
    match s.recv().await {
        ServerFrame::Insert(i) if i.atom == c => {}
        other => panic!(
            "a session without hello receives others' ops: expected the 65 of C, got {}",
            describe(&other)
        ),
    }
    s.send_many(vec![
        ClientFrame::Delete(SessionDelete {
            site: 0,
            pid: b.pid().clone(),
        }),
        ClientFrame::Rename(name_of("renamed in session")),
    ])
    .await;
    wait_ack(&mut s, 2).await;
    match w.recv().await {
        ServerFrame::Delete(d) => assert_eq!(
            (d.site, &d.pid),
            (0, b.pid()),
            "the broadcast 66 carries the deleter's site, 0"
        ),
        other => panic!(
            "expected the no-hello session's 66 broadcast, got {}",
            describe(&other)
        ),
    }
    Ok(())
}

async fn hello_required_upsert(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut owner, site, t) = create_doc(&ctx, "owner", doc, "n").await;
    let a = atom1("keep", 10, site);
    owner
        .upsert(doc, "n", t, std::slice::from_ref(&a), &[])
        .await;
    let mut anon = ctx.anon("no hello").await?;
    let (_, p) = anon.pull(doc, 0).await;
    for forged in [site, 200] {
        let err = anon
            .try_upsert(
                doc,
                "n2",
                p.sync_time,
                &[atom1("x", 20, forged)],
                &[a.pid().clone()],
            )
            .await
            .err()
            .unwrap_or_else(|| {
                panic!("an insert without hello: expected hello_required, got 33s and a 34")
            });
        assert_eq!(
            err.code,
            ErrorCode::HELLO_REQUIRED,
            "expected hello_required, got {} {:?}",
            err.code,
            err.message
        );
    }
    expect_still_open_sync(&mut anon, "hello_required").await;
    let (rs, _) = anon.pull(doc, 0).await;
    let m = model_of(doc, &rs);
    assert_eq!(
        (m.text().as_str(), m.name.as_str()),
        ("keep", "n"),
        "the refused upsert's delete and name were not applied either (atomic, 3.1)"
    );
    Ok(())
}

async fn hello_required_session(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut listener, _) = ctx.client("listener").await;
    let (_, lst) = listener.session_start(0, doc).await;
    let mut anon = ctx.anon("no hello").await?;
    anon.session_start(0, doc).await;
    anon.insert(atom1("anon", 90, 200)).await;
    recv_error(&mut anon, ErrorCode::HELLO_REQUIRED, "a 65 without hello").await;
    recv_ack(
        &mut anon,
        1,
        "the refused op is counted by the ack after its error (3.2)",
    )
    .await;
    // The listener gets nothing of it: the next frame is the ack of its own op.
    let marker = atom1("m", 1, lst.site);
    listener.insert(marker).await;
    match listener.recv().await {
        ServerFrame::SessionAck { count: 1 } => {}
        other => panic!(
            "a refused op is not broadcast: expected only the listener's own ack, got {}",
            describe(&other)
        ),
    }
    Ok(())
}

async fn site_mismatch_upsert(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut c1, s1, _) = create_doc(&ctx, "r1", doc, "n").await;
    let (mut c2, _) = ctx.client("r2").await;
    let (_, p2) = c2.pull(doc, 0).await;
    assert!(p2.site != 0 && p2.site != s1);
    let own = atom1("mine", 10, p2.site);
    let unallocated = (1..=255u8)
        .rev()
        .find(|&s| s != s1 && s != p2.site)
        .unwrap();
    for forged in [s1, unallocated] {
        let err = c2
            .try_upsert(doc, "n", p2.sync_time, &[own.clone(), atom1("forged", 20, forged)], &[])
            .await
            .err()
            .unwrap_or_else(|| panic!("an insert with site {forged}'s id from site {}: expected site_mismatch, got a 34", p2.site));
        assert_eq!(
            err.code,
            ErrorCode::SITE_MISMATCH,
            "site {forged}: expected site_mismatch, got {}",
            err.code
        );
    }
    expect_still_open_sync(&mut c2, "site_mismatch").await;
    let (rs, _) = c1.pull(doc, 0).await;
    assert_eq!(
        model_of(doc, &rs).text(),
        "",
        "nothing of the refused upserts applies (3.1)"
    );
    c2.upsert(doc, "n", p2.sync_time, std::slice::from_ref(&own), &[])
        .await;
    let (rs, _) = c1.pull(doc, 0).await;
    assert_eq!(model_of(doc, &rs).text(), "mine");
    Ok(())
}

async fn site_mismatch_session(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut owner, os, t) = create_doc(&ctx, "owner", doc, "n").await;
    let a = atom1("A", 50, os);
    owner
        .upsert(doc, "n", t, std::slice::from_ref(&a), &[])
        .await;
    let (mut x, _) = ctx.client("x").await;
    let (_, xs) = x.session_start(0, doc).await;
    let (mut l, _) = ctx.client("listener").await;
    l.session_start(0, doc).await;
    let good = atom1("good", 70, xs.site);
    let ops = vec![
        // 1: another site's id.
        ClientFrame::Insert(SessionInsert::new(atom1("forged", 80, os))),
        // 2: a delete whose site field is another replica's.
        ClientFrame::Delete(SessionDelete {
            site: os,
            pid: a.pid().clone(),
        }),
        // 3: a delete with site 0 from a replica that has a site.
        ClientFrame::Delete(SessionDelete {
            site: 0,
            pid: a.pid().clone(),
        }),
        // 4: fine.
        ClientFrame::Insert(SessionInsert::new(good.clone())),
    ];
    x.send_many(ops).await;
    for n in 1..=3u64 {
        let e = next_non_ack(&mut x, n - 1).await;
        assert_eq!(
            e,
            ErrorCode::SITE_MISMATCH,
            "op {n}: expected site_mismatch before the ack that covers it, got {e}"
        );
    }
    wait_ack(&mut x, 4).await;
    match l.recv().await {
        ServerFrame::Insert(i) => assert_eq!(
            i.atom, good,
            "refused ops are not broadcast: the first broadcast is op 4"
        ),
        other => panic!(
            "listener: expected op 4's 65 (refused ops are not broadcast), got {}",
            describe(&other)
        ),
    }
    // Without hello, a 66 must carry site 0.
    if let Ok(mut anon) = ctx.anon("no hello").await {
        anon.session_start(0, doc).await;
        anon.delete(other_site(xs.site), good.pid().clone()).await;
        recv_error(
            &mut anon,
            ErrorCode::SITE_MISMATCH,
            "a 66 with a site from a connection that has none",
        )
        .await;
        recv_ack(&mut anon, 1, "the refused 66 is counted").await;
    }
    let (rs, _) = owner.pull(doc, 0).await;
    assert_eq!(
        model_of(doc, &rs).text(),
        "Agood",
        "the refused deletes did not apply"
    );
    Ok(())
}

/// Reads frames up to the next error; acks on the way must not pass
/// `max_ack` (the error comes before the ack that covers its op).
async fn next_non_ack(c: &mut Conn, max_ack: u64) -> ErrorCode {
    loop {
        match c.next_event().await {
            Event::Frame(ServerFrame::SessionAck { count }) => assert!(
                count <= max_ack,
                "{}: an ack of {count} came before the error for op {} (3.2: a refused op's error comes before the ack that covers it)",
                c.label(),
                max_ack + 1
            ),
            Event::Frame(ServerFrame::Error(e)) => return e.code,
            other => panic!(
                "{}: expected an error frame, got {}",
                c.label(),
                super::util::show(&other)
            ),
        }
    }
}

/// Reads acks until one of `count`.
async fn wait_ack(c: &mut Conn, count: u64) {
    loop {
        match c.next_event().await {
            Event::Frame(ServerFrame::SessionAck { count: n }) if n < count => {}
            Event::Frame(ServerFrame::SessionAck { count: n }) if n == count => return,
            other => panic!(
                "{}: expected acks up to {count}, got {}",
                c.label(),
                super::util::show(&other)
            ),
        }
    }
}

async fn sites_exhausted(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut owner, s, t) = create_doc(&ctx, "owner", doc, "crowded").await;
    let a = atom1("a", 5, s);
    owner
        .upsert(doc, "crowded", t, std::slice::from_ref(&a), &[])
        .await;
    let mut sites = BTreeSet::from([s]);
    let mut set = tokio::task::JoinSet::new();
    let replicas: Vec<u128> = (0..254).map(|_| ctx.replica()).collect();
    for chunk in replicas.chunks(16) {
        for &r in chunk {
            let ctx = ctx.clone();
            set.spawn(async move {
                let (mut c, _) = ctx.client_as("replica", r).await;
                c.pull(doc, 0).await.1.site
            });
        }
        while let Some(site) = set.join_next().await {
            let site = site.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            assert_ne!(
                site, 0,
                "each of the first 255 replicas gets a site (1.3): got 0"
            );
            assert!(
                sites.insert(site),
                "site {site} given to two replicas (1.3)"
            );
        }
    }
    assert_eq!(sites.len(), 255);
    let (mut late, _) = ctx.client("replica 256").await;
    let (_, p) = late.pull(doc, 0).await;
    assert_eq!(
        p.site, 0,
        "the 256th replica gets no site: its 34 carries site 0 (1.3), got {}",
        p.site
    );
    for forged in [1u8, 255] {
        let err = late
            .try_upsert(doc, "crowded", p.sync_time, &[atom1("z", 9, forged)], &[])
            .await
            .err()
            .unwrap_or_else(|| {
                panic!("an insert from the 256th replica: expected sites_exhausted, got a 34")
            });
        assert_eq!(
            err.code,
            ErrorCode::SITES_EXHAUSTED,
            "expected sites_exhausted, got {} {:?}",
            err.code,
            err.message
        );
    }
    let (reply, d) = late
        .upsert(doc, "renamed", p.sync_time, &[], &[a.pid().clone()])
        .await;
    assert_eq!(d.site, 0);
    assert_eq!(
        reply_name(&reply, "upsert"),
        "renamed",
        "the 256th replica still renames (1.3)"
    );
    let (rs, _) = owner.pull(doc, 0).await;
    assert_eq!(
        model_of(doc, &rs).text(),
        "",
        "the 256th replica still deletes (1.3)"
    );
    assert!(inserts_of(&rs).is_empty() && deletes_of(&rs).is_empty());
    let mut late2 = ctx.raw_conn("replica 256 session").await;
    late2
        .hello_with_token(ctx.replica(), ctx.target().token_bytes())
        .await;
    let (_, st) = late2.session_start(0, doc).await;
    assert_eq!(
        st.site, 0,
        "the 257th replica's 68 carries site 0 (1.3), got {}",
        st.site
    );
    late2.insert(atom1("z", 9, 1)).await;
    recv_error(
        &mut late2,
        ErrorCode::SITES_EXHAUSTED,
        "a 65 from a replica without a site",
    )
    .await;
    recv_ack(&mut late2, 1, "the refused op is counted after its error").await;
    Ok(())
}
