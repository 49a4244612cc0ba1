//! Limits (PROTOCOL.md 2.2, 4, 5): each limit just at its bound (accepted)
//! and just over it (limit_exceeded, a message naming the limit and its
//! value, and the close); large replies split over several 33s.

use std::time::Duration;

use notesync_protocol::{Atom, ClientFrame, ErrorCode, Level, Pid, header};

use super::util::{
    auth_prefix, cat, closing_case, create_doc, expect_still_open_sync, frame_bytes, hello_bytes,
    other_site, recv_ack, recv_error, reply_name,
};
use super::{Check, Ctx, Outcome, Skipped};
use crate::conn::{Conn, upsert_frame};
use crate::model::model_of;
use crate::raw::RawFrame;

pub fn checks() -> Vec<Check<Ctx>> {
    let long = Duration::from_secs(120);
    vec![
        Check::new(
            "limit-max-frame-bytes-at",
            "5",
            "an upsert of exactly max_frame_bytes is decoded (here refused with site_mismatch, which keeps the connection)",
            frame_bytes_at,
        )
        .with_timeout(long),
        Check::new(
            "limit-max-frame-bytes-over",
            "4, 5",
            "an upsert of max_frame_bytes + 1: limit_exceeded naming max_frame_bytes and its value, closed",
            frame_bytes_over,
        )
        .with_timeout(long),
        Check::new(
            "limit-max-items-per-frame-at",
            "5",
            "an upsert with exactly max_items_per_frame inserts is decoded (refused with site_mismatch, still open)",
            items_at,
        )
        .with_timeout(long),
        Check::new(
            "limit-max-items-per-frame-over",
            "4, 5",
            "an insert or delete count of max_items_per_frame + 1: limit_exceeded naming the limit, closed",
            items_over,
        ),
        Check::new(
            "limit-max-pid-depth-at",
            "5",
            "ids of max_pid_depth levels in upsert inserts and deletes, 65 and 66 are accepted and stored",
            depth_at,
        ),
        Check::new(
            "limit-max-pid-depth-over",
            "4, 5",
            "an id of max_pid_depth + 1 levels in an upsert insert or delete, a 65 or a 66: limit_exceeded, closed",
            depth_over,
        ),
        Check::new(
            "limit-name-and-atom-255-bytes",
            "2.2, 5",
            "a 255-byte name (upsert and 67) and a 255-byte atom ending in a 4-byte character round trip",
            name_atom_255,
        ),
        Check::new(
            "pull-reply-split-over-33s",
            "3.1, 5",
            "a document larger than max_frame_bytes is pulled in several 33s, each within the limit, adding up to it",
            split_33s,
        )
        .with_timeout(Duration::from_secs(180)),
    ]
}

/// Upsert bytes: header, doc, empty name, since 0, then the raw inserts
/// list body and an empty deletes list.
const UPSERT_FIXED: usize = 1 + 16 + 1 + 8 + 8 + 8;

fn upsert_with_atoms(doc: u128, count: u64, atoms: &[u8]) -> Vec<u8> {
    let mut b = RawFrame::new(header::SYNC_DOC_UPSERT)
        .u128(doc)
        .name(b"")
        .u64(0)
        .u64(count)
        .build();
    b.extend_from_slice(atoms);
    b.extend_from_slice(&0u64.to_be_bytes());
    b
}

/// Atom sizes (bytes on the wire, each 8..=262: data 1..=255 at a one-level
/// id) adding up to exactly `total`.
fn atom_sizes(total: usize) -> Vec<usize> {
    const FULL: usize = 262;
    assert!(total >= 8);
    let mut sizes = Vec::new();
    let mut rest = total;
    while rest >= 2 * FULL {
        sizes.push(FULL);
        rest -= FULL;
    }
    if rest > FULL {
        let a = rest / 2;
        sizes.extend([a, rest - a]);
    } else {
        sizes.push(rest);
    }
    sizes
}

/// The raw bytes of atoms of those sizes, at ids `(i, site)`.
fn atoms_of_sizes(sizes: &[usize], site: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(sizes.iter().sum());
    for (i, &s) in sizes.iter().enumerate() {
        let (len, depth) = if s <= 262 { (s - 7, 1) } else { (s - 12, 2) };
        assert!((1..=255).contains(&len), "atom size {s}");
        out.push(len as u8);
        out.extend(std::iter::repeat_n(b'a', len));
        out.push(depth as u8);
        if depth == 2 {
            out.extend([0, 0, 0, 0, 0]);
        }
        out.push(site);
        out.extend((i as u32).to_be_bytes());
    }
    out
}

/// A connection with a site on a new document, and a site that is not its.
async fn forger(ctx: &Ctx) -> (Conn, u128, u8) {
    let doc = ctx.doc();
    let (mut c, site, _) = create_doc(ctx, "forger", doc, "").await;
    c.set_wait(ctx.target().wait * 6);
    (c, doc, other_site(site))
}

async fn frame_bytes_at(ctx: Ctx) -> Outcome {
    let max = ctx.limits().max_frame_bytes;
    if max < UPSERT_FIXED + 8 {
        return Err(Skipped(format!(
            "max_frame_bytes {max} cannot hold an upsert with an atom"
        )));
    }
    let (mut c, doc, forged) = forger(&ctx).await;
    let sizes = atom_sizes(max - UPSERT_FIXED);
    let bytes = upsert_with_atoms(doc, sizes.len() as u64, &atoms_of_sizes(&sizes, forged));
    assert_eq!(bytes.len(), max);
    c.send_raw(&bytes).await;
    recv_error(
        &mut c,
        ErrorCode::SITE_MISMATCH,
        &format!(
            "an upsert of exactly max_frame_bytes ({max}) bytes whose inserts are of another site: \
             decoded whole (not limit_exceeded), then refused"
        ),
    )
    .await;
    expect_still_open_sync(&mut c, "site_mismatch").await;
    Ok(())
}

async fn frame_bytes_over(ctx: Ctx) -> Outcome {
    let max = ctx.limits().max_frame_bytes;
    if max < UPSERT_FIXED + 8 {
        return Err(Skipped(format!(
            "max_frame_bytes {max} cannot hold an upsert with an atom"
        )));
    }
    let (prefix, replies) = auth_prefix(&ctx);
    let mut sizes = atom_sizes(max - UPSERT_FIXED);
    *sizes.last_mut().unwrap() += 1;
    let bytes = upsert_with_atoms(ctx.doc(), sizes.len() as u64, &atoms_of_sizes(&sizes, 1));
    assert_eq!(bytes.len(), max + 1);
    closing_case(
        &ctx,
        cat(&[&prefix, &bytes]),
        false,
        &replies,
        ErrorCode::LIMIT_EXCEEDED,
        Some(("max_frame_bytes", max as u64)),
        &format!("an upsert of max_frame_bytes + 1 ({}) bytes", max + 1),
    )
    .await;
    Ok(())
}

async fn items_at(ctx: Ctx) -> Outcome {
    let limits = ctx.limits();
    let n = limits.max_items_per_frame;
    let size = UPSERT_FIXED as u64 + 8 * n;
    if size > limits.max_frame_bytes as u64 {
        return Err(Skipped(format!(
            "max_items_per_frame ({n}) atoms of 8 bytes do not fit max_frame_bytes ({})",
            limits.max_frame_bytes
        )));
    }
    let (mut c, doc, forged) = forger(&ctx).await;
    let sizes = vec![8; n as usize];
    c.send_raw(&upsert_with_atoms(doc, n, &atoms_of_sizes(&sizes, forged)))
        .await;
    recv_error(
        &mut c,
        ErrorCode::SITE_MISMATCH,
        &format!(
            "an upsert of exactly max_items_per_frame ({n}) inserts of another site: decoded whole \
             (not limit_exceeded), then refused"
        ),
    )
    .await;
    expect_still_open_sync(&mut c, "site_mismatch").await;
    Ok(())
}

async fn items_over(ctx: Ctx) -> Outcome {
    let n = ctx.limits().max_items_per_frame;
    if n == u64::MAX {
        return Err(Skipped("max_items_per_frame is u64::MAX".into()));
    }
    for deletes in [false, true] {
        let (prefix, replies) = auth_prefix(&ctx);
        let frame = RawFrame::new(header::SYNC_DOC_UPSERT)
            .u128(ctx.doc())
            .name(b"")
            .u64(0);
        let frame = if deletes {
            frame.u64(0).u64(n + 1)
        } else {
            frame.u64(n + 1)
        };
        // One item follows; the count alone is over the limit.
        let frame = frame.atom(b"a", &[(1, 1)]).build();
        closing_case(
            &ctx,
            cat(&[&prefix, &frame]),
            false,
            &replies,
            ErrorCode::LIMIT_EXCEEDED,
            Some(("max_items_per_frame", n)),
            &format!(
                "an upsert declaring {} {}",
                n + 1,
                if deletes { "deletes" } else { "inserts" }
            ),
        )
        .await;
    }
    Ok(())
}

/// An id of `depth` levels ending in `(ident, site)`.
fn deep_pid(depth: usize, ident: u32, site: u8) -> Pid {
    let mut levels = vec![Level::new(7, 0); depth - 1];
    levels.push(Level::new(ident, site));
    Pid::from_levels(&levels)
}

async fn depth_at(ctx: Ctx) -> Outcome {
    let d = ctx.limits().max_pid_depth as usize;
    let doc = ctx.doc();
    let (mut c, site, t) = create_doc(&ctx, "upsert", doc, "deep").await;
    let a = Atom::new("deep", deep_pid(d, 1, site)).unwrap();
    let ghost = deep_pid(d, 9, 200);
    c.upsert(
        doc,
        "deep",
        t,
        std::slice::from_ref(&a),
        std::slice::from_ref(&ghost),
    )
    .await;
    let (mut s, _) = ctx.client("session").await;
    let (_, st) = s.session_start(0, doc).await;
    let b = Atom::new("er", deep_pid(d, 2, st.site)).unwrap();
    let ghost2 = deep_pid(d, 10, 201);
    s.insert(b.clone()).await;
    s.delete(st.site, ghost2.clone()).await;
    let mut acked = 0;
    while acked < 2 {
        match s.recv().await {
            notesync_protocol::ServerFrame::SessionAck { count } => acked = count,
            other => panic!(
                "a 65 and a 66 with ids of max_pid_depth ({d}) levels: expected acks, got {}",
                crate::conn::describe(&other)
            ),
        }
    }
    let (rs, _) = c.pull(doc, 0).await;
    let m = model_of(doc, &rs);
    assert_eq!(
        m.text(),
        "deeper",
        "atoms at ids of max_pid_depth ({d}) levels are stored and pulled"
    );
    for g in [&ghost, &ghost2] {
        assert!(
            m.get(g).is_some_and(|e| !e.live),
            "a delete of an unknown id of max_pid_depth ({d}) levels is kept as a tombstone and sent"
        );
    }
    Ok(())
}

async fn depth_over(ctx: Ctx) -> Outcome {
    let d = ctx.limits().max_pid_depth as usize;
    if d >= 255 {
        return Err(Skipped("max_pid_depth is 255, the wire's maximum".into()));
    }
    let deep: Vec<(u8, u32)> = (0..=d as u32).map(|i| (1, i)).collect();
    let limit = Some(("max_pid_depth", d as u64));
    let (prefix, replies) = auth_prefix(&ctx);
    let ins = RawFrame::new(0).u64(1).atom(b"a", &deep).build();
    let del = RawFrame::new(0).u64(1).pid(&deep).build();
    let empty = RawFrame::new(0).u64(0).build();
    let upsert = |inserts: &[u8], deletes: &[u8]| {
        RawFrame::new(header::SYNC_DOC_UPSERT)
            .u128(ctx.doc())
            .name(b"")
            .u64(0)
            .bytes(&inserts[1..])
            .bytes(&deletes[1..])
            .build()
    };
    for (what, frame) in [
        ("upsert insert", upsert(&ins, &empty)),
        ("upsert delete", upsert(&empty, &del)),
    ] {
        closing_case(
            &ctx,
            cat(&[&prefix, &frame]),
            false,
            &replies,
            ErrorCode::LIMIT_EXCEEDED,
            limit,
            &format!("an {what} at an id of {} levels", d + 1),
        )
        .await;
    }
    let hello = match ctx.target().token {
        Some(_) => hello_bytes(&ctx, ctx.replica(), 1),
        None => vec![],
    };
    let mut session_replies = replies.clone();
    session_replies.push(header::SESSION_STARTED);
    let start = frame_bytes(&ClientFrame::SessionStart {
        since: 0,
        doc: ctx.doc(),
    });
    let f65 = RawFrame::new(header::SESSION_INSERT)
        .u8(1)
        .atom(b"a", &deep)
        .build();
    let f66 = RawFrame::new(header::SESSION_DELETE)
        .u8(0)
        .pid(&deep)
        .build();
    for (what, frame) in [("65", f65), ("66", f66)] {
        closing_case(
            &ctx,
            cat(&[&hello, &start, &frame]),
            false,
            &session_replies,
            ErrorCode::LIMIT_EXCEEDED,
            limit,
            &format!("a {what} at an id of {} levels", d + 1),
        )
        .await;
    }
    Ok(())
}

async fn name_atom_255(ctx: Ctx) -> Outcome {
    let doc = ctx.doc();
    let name = format!("{}a", "é".repeat(127));
    assert_eq!(name.len(), 255);
    let (mut c, site, t) = create_doc(&ctx, "writer", doc, &name).await;
    let data = format!("{}🙂", "a".repeat(251));
    assert_eq!(data.len(), 255);
    let a = super::util::atom1(&data, 1, site);
    c.upsert(doc, &name, t, std::slice::from_ref(&a), &[]).await;
    let (mut r, _) = ctx.client("reader").await;
    let (rs, _) = r.pull(doc, 0).await;
    assert_eq!(reply_name(&rs, "pull"), name, "a 255-byte name round trips");
    assert_eq!(
        model_of(doc, &rs).text(),
        data,
        "a 255-byte atom round trips"
    );
    let (mut s, _) = ctx.client("session").await;
    s.session_start(0, doc).await;
    let name2 = "語".repeat(85);
    s.rename(&name2).await;
    recv_ack(&mut s, 1, "a 67 with a 255-byte name").await;
    let (rs, _) = r.pull(doc, 0).await;
    assert_eq!(
        reply_name(&rs, "pull"),
        name2,
        "a 255-byte name set by a 67 round trips"
    );
    Ok(())
}

async fn split_33s(ctx: Ctx) -> Outcome {
    let limits = ctx.limits();
    let max = limits.max_frame_bytes;
    let depth = (limits.max_pid_depth as usize).min(64);
    let doc = ctx.doc();
    let (mut c, site, t) = create_doc(&ctx, "writer", doc, "big").await;
    c.set_wait(ctx.target().wait * 6);
    let atom_size = 2 + 255 + 5 * depth;
    let per_upsert =
        ((max.saturating_sub(1024)) / atom_size).min(limits.max_items_per_frame as usize);
    if per_upsert == 0 {
        return Err(Skipped(
            "max_frame_bytes cannot hold an upsert of one large atom".into(),
        ));
    }
    let need = max + max / 16;
    let total = need.div_ceil(atom_size);
    let mut expected = Vec::with_capacity(total);
    let mut since = t;
    let mut i = 0u32;
    while (i as usize) < total {
        let n = per_upsert.min(total - i as usize) as u32;
        let atoms: Vec<Atom> = (i..i + n)
            .map(|k| {
                let mut levels = vec![Level::new(k, site)];
                levels.extend((1..depth).map(|l| Level::new(l as u32, site)));
                let head = format!("{k}:");
                Atom::new(
                    format!("{head}{}", "x".repeat(255 - head.len())),
                    Pid::from_levels(&levels),
                )
                .unwrap()
            })
            .collect();
        c.send(upsert_frame(doc, "big", since, &atoms, &[])).await;
        let (_, s) = c
            .recv_doc_reply(doc, "a large upsert")
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "a large upsert within the limits: got error {} {:?}",
                    e.code, e.message
                )
            });
        since = s.sync_time;
        expected.extend(atoms.into_iter().map(|a| {
            let (d, p) = a.into_parts();
            (p, d)
        }));
        i += n;
    }
    let (mut r, _) = ctx.client("reader").await;
    r.set_wait(ctx.target().wait * 6);
    // The reader's decoder enforces max_frame_bytes on every 33.
    let (rs, _) = r.pull(doc, 0).await;
    assert!(
        rs.len() >= 2,
        "{} atoms ({} bytes) cannot fit one frame of max_frame_bytes ({max}): expected several 33s, got {}",
        expected.len(),
        expected.len() * atom_size,
        rs.len()
    );
    expected.sort();
    assert!(
        model_of(doc, &rs).live() == expected,
        "the 33s add up to the whole document"
    );
    Ok(())
}
