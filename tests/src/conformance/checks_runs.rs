//! Runs and ranges, the version 3 extension (PROTOCOL.md 1.5): a run of n
//! chars is n one-char atoms and a range is its ids, whichever version
//! reads them; a version 1/2 connection sees atoms, single deletes and
//! 65s/66s, a version 3 one gets 37s; 4, 70 and 71 need version 3; a 70
//! or 71 is one op for session_ack; run chars and range ids count toward
//! max_items_per_frame; an overflowing run or range is malformed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use notesync_protocol::{
    Atom, ClientFrame, DocId, DocResponse, ErrorCode, IdRange, ItemListBuilder, Level, Pid,
    RangeListBuilder, Run, ServerFrame, SessionDeleteRange, SessionInsertRun, Time, UpsertRuns,
    header,
};

use super::util::{
    cat, closing_case, deletes_of, frame_bytes, hello_bytes, inserts_of, recv_ack, show,
};
use super::{Check, Ctx, Outcome, Skipped};
use crate::conn::{Conn, DocSync, Event, name_of};

pub fn checks() -> Vec<Check<Ctx>> {
    vec![
        Check::new(
            "runs-are-one-char-atoms",
            "1.5, 3.1",
            "a 4's run of n chars is n one-char atoms at consecutive ids: a version 1 pull gets them as atoms in 33s, a version 2 pull too",
            runs_are_atoms,
        ),
        Check::new(
            "runs-version-3-gets-37",
            "1.5, 3.1, 3.2",
            "a version-3 connection gets 37s (never 33s) for a pull, an upsert (2 or 4) and session_start, holding the same chars and deletes",
            version_3_gets_37,
        ),
        Check::new(
            "runs-range-deletes-each-id",
            "1.5, 3.1",
            "a range deletes each of its ids (one char of a run alone, unknown ids as tombstones): a version 1 pull gets single deletes",
            range_deletes_each_id,
        ),
        Check::new(
            "runs-session-fan-out-by-version",
            "1.5, 3.2",
            "a 70 reaches a version 1 session as one 65 per char and a 71 as one 66 per id; a version-3 session gets the same chars and ids",
            session_fan_out,
        ),
        Check::new(
            "runs-ack-counts-a-70-as-one-op",
            "3.2",
            "65, 70 (5 chars), 71 (3 ids), 67 are 4 ops: acks never pass 4 and reach it",
            ack_counts_one,
        ),
        Check::new(
            "runs-frames-need-version-3",
            "2.3, 6",
            "4 after a version 2 hello, 70 in a version 2 session, 71 in a version 1 session, 4 without hello: unknown_frame, closed",
            need_version_3,
        ),
        Check::new(
            "runs-items-limit-counts-chars-and-ids",
            "2.2, 4, 5",
            "a 4 whose runs hold max_items_per_frame + 1 chars (its list count far below), or whose ranges hold that many ids: limit_exceeded, closed",
            items_limit,
        )
        .with_timeout(Duration::from_secs(120)),
        Check::new(
            "runs-overflow-is-malformed",
            "1.5, 4",
            "a 70 whose last char's ident would pass u32::MAX, and a 71 likewise: malformed, closed",
            overflow_malformed,
        ),
    ]
}

fn pid(ident: u32, site: u8) -> Pid {
    Pid::from_levels(&[Level::new(ident, site)])
}

/// A connection after a hello with `version` (and the target's token).
async fn client_version(ctx: &Ctx, label: &str, version: u8) -> Conn {
    let mut c = ctx.raw_conn(label).await;
    let w = c
        .hello_version(ctx.replica(), ctx.target().token_bytes(), version)
        .await;
    assert_eq!(
        w.version, version,
        "{label}: a hello with version {version}: expected welcome with that version (6)"
    );
    c
}

/// A document of this check's own, created by a version-3 replica:
/// (its connection, its site, the 34's time).
async fn v3_doc(ctx: &Ctx, doc: DocId) -> (Conn, u8, Time) {
    let (mut c, _) = ctx.client_v3("v3 writer").await;
    let (_, s) = c.upsert(doc, "runs", 0, &[], &[]).await;
    assert_ne!(s.site, 0, "an upsert after hello allocates a site (1.3)");
    (c, s.site, s.sync_time)
}

fn upsert_runs(
    doc: DocId,
    since: Time,
    runs: &[(Pid, &str)],
    atoms: &[Atom],
    ranges: &[(Pid, u16)],
) -> ClientFrame {
    let mut items = ItemListBuilder::new();
    for (first, text) in runs {
        items.push_run(first, text).expect("a valid run");
    }
    for a in atoms {
        items.push_atom(a.data(), a.pid()).expect("a valid atom");
    }
    let mut rb = RangeListBuilder::new();
    for (first, n) in ranges {
        rb.push(first, *n).expect("a valid range");
    }
    ClientFrame::UpsertRuns(UpsertRuns {
        doc,
        name: name_of("runs"),
        since,
        inserts: items.finish(),
        deletes: rb.finish(),
    })
}

/// A reply's frame headers (before the 34) and its content as 33s.
struct Reply {
    headers: BTreeSet<u8>,
    parts: Vec<DocResponse>,
    sync: DocSync,
}

/// Reads 33s/37s up to the 34 for `doc`, keeping which kinds came.
async fn read_reply(c: &mut Conn, doc: DocId, what: &str) -> Reply {
    let mut headers = BTreeSet::new();
    let mut parts = Vec::new();
    loop {
        match c.next_event().await {
            Event::Frame(ServerFrame::DocResponse(r)) if r.doc == doc => {
                headers.insert(header::SYNC_DOC_RESPONSE);
                parts.push(r);
            }
            Event::Frame(ServerFrame::DocResponseRuns(r)) if r.doc == doc => {
                headers.insert(header::SYNC_DOC_RESPONSE_RUNS);
                parts.push(r.expand());
            }
            Event::Frame(ServerFrame::DocSync {
                doc: d,
                sync_time,
                site,
            }) if d == doc => {
                return Reply {
                    headers,
                    parts,
                    sync: DocSync {
                        doc: d,
                        sync_time,
                        site,
                    },
                };
            }
            other => panic!(
                "{}: {what}: expected 33s or 37s then the 34, got {}",
                c.label(),
                show(&other)
            ),
        }
    }
}

fn expect_kind(r: &Reply, version: u8, what: &str) {
    let want = if version >= 3 {
        header::SYNC_DOC_RESPONSE_RUNS
    } else {
        header::SYNC_DOC_RESPONSE
    };
    assert_eq!(
        r.headers,
        BTreeSet::from([want]),
        "{what}: a version {version} connection gets only {} (1.5, 3.1)",
        if version >= 3 { "37s" } else { "33s" }
    );
}

/// The one-char atoms of `text` from `first`.
fn chars_of(first: &Pid, text: &str) -> BTreeMap<Pid, String> {
    let run = Run::new(first.clone(), text).expect("a valid run");
    run.atoms().map(|(c, p)| (p, c.to_owned())).collect()
}

async fn runs_are_atoms(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut w, site, t0) = v3_doc(&ctx, doc).await;
    let first = pid(1000, site);
    let multi = Atom::new("xyz", pid(2000, site)).expect("atom");
    w.send(upsert_runs(
        doc,
        t0,
        &[(first.clone(), "héllo")],
        std::slice::from_ref(&multi),
        &[],
    ))
    .await;
    let r = read_reply(&mut w, doc, "the 4").await;
    expect_kind(&r, 3, "the 4's reply");
    let mut want = chars_of(&first, "héllo");
    want.insert(multi.pid().clone(), "xyz".into());
    for version in [1u8, 2] {
        let mut c = client_version(&ctx, &format!("v{version} reader"), version).await;
        c.send(ClientFrame::Pull { doc, since: 0 }).await;
        let r = read_reply(&mut c, doc, "a pull since 0").await;
        expect_kind(&r, version, &format!("a version {version} pull"));
        assert_eq!(
            inserts_of(&r.parts),
            want,
            "a version {version} pull: the run's chars as one-char atoms at consecutive ids (1.5), and the atom"
        );
    }
    Ok(())
}

async fn version_3_gets_37(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut w, site, t0) = v3_doc(&ctx, doc).await;
    // A 2 on a version-3 connection is answered with 37s too.
    let atoms: Vec<Atom> = (0..4)
        .map(|i| {
            Atom::new(
                "ab".get(i % 2..i % 2 + 1).expect("a char"),
                pid(10 + i as u32, site),
            )
            .expect("atom")
        })
        .collect();
    w.send(crate::conn::upsert_frame(
        doc,
        "runs",
        t0,
        &atoms,
        &[pid(11, site)],
    ))
    .await;
    let r = read_reply(&mut w, doc, "a 2 on a version-3 connection").await;
    expect_kind(&r, 3, "the reply to a 2 on a version-3 connection");
    let (_, s) = w.upsert(doc, "runs", 0, &[], &[]).await;
    let mut v2 = client_version(&ctx, "v2 reader", 2).await;
    v2.send(ClientFrame::Pull { doc, since: 0 }).await;
    let r2 = read_reply(&mut v2, doc, "a version 2 pull").await;
    expect_kind(&r2, 2, "a version 2 pull");
    let (mut r3, _) = ctx.client_v3("v3 reader").await;
    r3.send(ClientFrame::Pull { doc, since: 0 }).await;
    let r = read_reply(&mut r3, doc, "a version-3 pull").await;
    expect_kind(&r, 3, "a version-3 pull");
    assert_eq!(
        (inserts_of(&r.parts), deletes_of(&r.parts)),
        (inserts_of(&r2.parts), deletes_of(&r2.parts)),
        "a 37 holds what the 33 holds (1.5)"
    );
    assert!(r.sync.sync_time >= s.sync_time);
    // session_start's catch-up.
    let (mut sess, _) = ctx.client_v3("v3 session").await;
    sess.send(ClientFrame::SessionStart { since: 0, doc }).await;
    let mut n37 = 0;
    loop {
        match sess.next_event().await {
            Event::Frame(ServerFrame::DocResponseRuns(x)) if x.doc == doc => n37 += 1,
            Event::Frame(ServerFrame::SessionStarted { .. }) => break,
            other => panic!(
                "a version-3 session_start: expected 37s then the 68 (3.2), got {}",
                show(&other)
            ),
        }
    }
    assert!(
        n37 >= 1,
        "a version-3 session_start: expected 37s before the 68"
    );
    Ok(())
}

async fn range_deletes_each_id(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut w, site, t0) = v3_doc(&ctx, doc).await;
    let first = pid(1000, site);
    w.send(upsert_runs(doc, t0, &[(first.clone(), "hello")], &[], &[]))
        .await;
    let t1 = read_reply(&mut w, doc, "the insert").await.sync.sync_time;
    // Chars 1..=3 of the run, and two ids nobody inserted.
    let unknown = pid(5000, site);
    w.send(upsert_runs(
        doc,
        t1,
        &[],
        &[],
        &[(pid(1001, site), 3), (unknown.clone(), 2)],
    ))
    .await;
    read_reply(&mut w, doc, "the range delete").await;
    let mut v1 = client_version(&ctx, "v1 reader", 1).await;
    v1.send(ClientFrame::Pull { doc, since: t1 }).await;
    let r = read_reply(&mut v1, doc, "a version 1 pull since the insert").await;
    expect_kind(&r, 1, "a version 1 pull");
    let want: BTreeSet<Pid> = [1001, 1002, 1003, 5000, 5001]
        .into_iter()
        .map(|i| pid(i, site))
        .collect();
    assert_eq!(
        deletes_of(&r.parts),
        want,
        "a range is its ids, each a single delete (1.5): three chars of the run and two tombstones"
    );
    v1.send(ClientFrame::Pull { doc, since: 0 }).await;
    let r = read_reply(&mut v1, doc, "a version 1 pull since 0").await;
    let live: BTreeMap<Pid, String> = [(pid(1000, site), "h"), (pid(1004, site), "o")]
        .into_iter()
        .map(|(p, c)| (p, c.to_owned()))
        .collect();
    assert_eq!(
        inserts_of(&r.parts),
        live,
        "deleting ids of a run deletes those chars only (1.5)"
    );
    Ok(())
}

/// Reads `n` session frames, as the (inserts, deletes) they stand for.
async fn relayed(
    c: &mut Conn,
    n_units: usize,
    what: &str,
) -> (Vec<(Pid, String, u8)>, Vec<(Pid, u8)>, Vec<u8>) {
    let mut ins = Vec::new();
    let mut del = Vec::new();
    let mut headers = Vec::new();
    while ins.len() + del.len() < n_units {
        match c.next_event().await {
            Event::Frame(ServerFrame::Insert(i)) => {
                headers.push(header::SESSION_INSERT);
                ins.push((i.atom.pid().clone(), i.atom.data().to_owned(), i.site));
            }
            Event::Frame(ServerFrame::InsertRun(r)) => {
                headers.push(header::SESSION_INSERT_RUN);
                ins.extend(r.run.atoms().map(|(d, p)| (p, d.to_owned(), r.site)));
            }
            Event::Frame(ServerFrame::Delete(d)) => {
                headers.push(header::SESSION_DELETE);
                del.push((d.pid, d.site));
            }
            Event::Frame(ServerFrame::DeleteRange(d)) => {
                headers.push(header::SESSION_DELETE_RANGE);
                del.extend(d.range.ids().map(|p| (p, d.site)));
            }
            other => panic!(
                "{}: {what}: expected relayed inserts and deletes, got {}",
                c.label(),
                show(&other)
            ),
        }
    }
    (ins, del, headers)
}

async fn session_fan_out(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut a, _) = ctx.client_v3("v3 author").await;
    let (_, sa) = a.session_start(0, doc).await;
    let mut b = client_version(&ctx, "v1 session", 1).await;
    b.session_start(0, doc).await;
    let (mut c, _) = ctx.client_v3("v3 session").await;
    c.session_start(0, doc).await;
    let first = pid(3000, sa.site);
    a.send(ClientFrame::InsertRun(SessionInsertRun::new(
        Run::new(first.clone(), "abc").expect("run"),
    )))
    .await;
    recv_ack(&mut a, 1, "a 70 is one op (3.2)").await;
    let want: Vec<(Pid, String, u8)> = chars_of(&first, "abc")
        .into_iter()
        .map(|(p, d)| (p, d, sa.site))
        .collect();
    let (ins, _, headers) = relayed(&mut b, 3, "the 70 at a version 1 session").await;
    assert_eq!(
        ins, want,
        "a version 1 session gets a 70's chars as 65s, in order (1.5)"
    );
    assert_eq!(
        headers,
        vec![header::SESSION_INSERT; 3],
        "a version 1 session gets 65s only"
    );
    let (ins, _, _) = relayed(&mut c, 3, "the 70 at a version-3 session").await;
    assert_eq!(ins, want, "a version-3 session gets the 70's chars");
    a.send(ClientFrame::DeleteRange(SessionDeleteRange {
        site: sa.site,
        range: IdRange::new(first.clone(), 2).expect("range"),
    }))
    .await;
    recv_ack(&mut a, 2, "a 71 is one op (3.2)").await;
    let want: Vec<(Pid, u8)> = vec![(first.clone(), sa.site), (pid(3001, sa.site), sa.site)];
    let (_, del, headers) = relayed(&mut b, 2, "the 71 at a version 1 session").await;
    assert_eq!(
        del, want,
        "a version 1 session gets a 71's ids as 66s (1.5)"
    );
    assert_eq!(
        headers,
        vec![header::SESSION_DELETE; 2],
        "a version 1 session gets 66s only"
    );
    let (_, del, _) = relayed(&mut c, 2, "the 71 at a version-3 session").await;
    assert_eq!(del, want, "a version-3 session gets the 71's ids");
    Ok(())
}

async fn ack_counts_one(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let (mut a, _) = ctx.client_v3("v3 author").await;
    let (_, st) = a.session_start(0, doc).await;
    let s = st.site;
    a.send_many([
        ClientFrame::Insert(notesync_protocol::SessionInsert::new(
            Atom::new("x", pid(10, s)).expect("atom"),
        )),
        ClientFrame::InsertRun(SessionInsertRun::new(
            Run::new(pid(20, s), "hello").expect("run"),
        )),
        ClientFrame::DeleteRange(SessionDeleteRange {
            site: s,
            range: IdRange::new(pid(21, s), 3).expect("range"),
        }),
        ClientFrame::Rename(name_of("four ops")),
    ])
    .await;
    let mut last = 0;
    while last < 4 {
        match a.next_event().await {
            Event::Frame(ServerFrame::SessionAck { count }) => {
                assert!(
                    count > last && count <= 4,
                    "acks count wire ops (a 70 or 71 is one, 3.2): expected counts rising to 4, got {count} after {last}"
                );
                last = count;
            }
            other => panic!("expected acks up to 4, got {}", show(&other)),
        }
    }
    // Nothing more: no ack counts the chars or ids.
    match a.next_event_within(Duration::from_millis(300)).await {
        Event::Timeout => {}
        other => panic!(
            "after the ack of 4 ops, expected nothing, got {}",
            show(&other)
        ),
    }
    Ok(())
}

async fn need_version_3(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let run = || {
        ClientFrame::InsertRun(SessionInsertRun::new(
            Run::new(pid(1, 1), "ab").expect("run"),
        ))
    };
    let range = ClientFrame::DeleteRange(SessionDeleteRange {
        site: 0,
        range: IdRange::new(pid(1, 1), 2).expect("range"),
    });
    let four = upsert_runs(doc, 0, &[(pid(1, 1), "ab")], &[], &[]);
    let v2 = hello_bytes(&ctx, ctx.replica(), 2);
    closing_case(
        &ctx,
        cat(&[&v2, &frame_bytes(&four)]),
        false,
        &[header::WELCOME],
        ErrorCode::UNKNOWN_FRAME,
        None,
        "a 4 after a version 2 hello",
    )
    .await;
    let start = frame_bytes(&ClientFrame::SessionStart { since: 0, doc });
    closing_case(
        &ctx,
        cat(&[&v2, &start, &frame_bytes(&run())]),
        false,
        &[header::WELCOME, header::SESSION_STARTED],
        ErrorCode::UNKNOWN_FRAME,
        None,
        "a 70 in a version 2 session",
    )
    .await;
    let v1 = hello_bytes(&ctx, ctx.replica(), 1);
    closing_case(
        &ctx,
        cat(&[&v1, &start, &frame_bytes(&range)]),
        false,
        &[header::WELCOME, header::SESSION_STARTED],
        ErrorCode::UNKNOWN_FRAME,
        None,
        "a 71 in a version 1 session",
    )
    .await;
    if ctx.target().token.is_none() {
        closing_case(
            &ctx,
            frame_bytes(&four),
            false,
            &[],
            ErrorCode::UNKNOWN_FRAME,
            None,
            "a 4 without hello (version 1)",
        )
        .await;
    }
    Ok(())
}

async fn items_limit(ctx: Ctx) -> Outcome {
    let max = ctx.limits().max_items_per_frame;
    let full = u64::from(u16::MAX);
    let n_runs = (max + 1).div_ceil(full);
    // Runs of 'a' holding max + 1 chars in all.
    let mut runs = Vec::new();
    let mut left = max + 1;
    let text = "a".repeat(u16::MAX as usize);
    for k in 0..n_runs {
        let n = left.min(full) as usize;
        left -= n as u64;
        runs.push((pid((k as u32) << 16, 1), &text[..n]));
    }
    let doc = ctx.doc();
    let four = frame_bytes(&upsert_runs(doc, 0, &runs, &[], &[]));
    if four.len() + 64 > ctx.limits().max_frame_bytes {
        return Err(Skipped(
            "max_items_per_frame + 1 run chars do not fit in max_frame_bytes".into(),
        ));
    }
    let v3 = hello_bytes(&ctx, ctx.replica(), 3);
    let limit = Some(("max_items_per_frame", max));
    closing_case(
        &ctx,
        cat(&[&v3, &four]),
        false,
        &[header::WELCOME],
        ErrorCode::LIMIT_EXCEEDED,
        limit,
        &format!("a 4 of {n_runs} runs holding {} chars", max + 1),
    )
    .await;
    let mut ranges = Vec::new();
    let mut left = max + 1;
    for k in 0..n_runs {
        let n = left.min(full);
        left -= n;
        ranges.push((pid((k as u32) << 16, 1), n as u16));
    }
    let four = frame_bytes(&upsert_runs(doc, 0, &[], &[], &ranges));
    closing_case(
        &ctx,
        cat(&[&v3, &four]),
        false,
        &[header::WELCOME],
        ErrorCode::LIMIT_EXCEEDED,
        limit,
        &format!("a 4 of {n_runs} ranges holding {} ids", max + 1),
    )
    .await;
    Ok(())
}

async fn overflow_malformed(ctx: Ctx) -> Outcome {
    let v3 = hello_bytes(&ctx, ctx.replica(), 3);
    let start = frame_bytes(&ClientFrame::SessionStart {
        since: 0,
        doc: ctx.doc(),
    });
    // Built by hand: the encoders refuse to make them.
    let mut run = vec![header::SESSION_INSERT_RUN, 1, 1, 1];
    run.extend_from_slice(&u32::MAX.to_be_bytes());
    run.extend_from_slice(&[0, 2, b'a', b'b']);
    let mut range = vec![header::SESSION_DELETE_RANGE, 1, 1, 1];
    range.extend_from_slice(&(u32::MAX - 1).to_be_bytes());
    range.extend_from_slice(&[0, 3]);
    for (bytes, what) in [
        (run, "a 70 \"ab\" from ident u32::MAX"),
        (range, "a 71 of 3 ids from ident u32::MAX - 1"),
    ] {
        closing_case(
            &ctx,
            cat(&[&v3, &start, &bytes]),
            false,
            &[header::WELCOME, header::SESSION_STARTED],
            ErrorCode::MALFORMED,
            None,
            what,
        )
        .await;
    }
    Ok(())
}
