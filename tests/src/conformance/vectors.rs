//! The golden vectors (`protocol/tests/vectors/frames.txt`) sent to a
//! server: every client-to-server `ok` vector where it makes sense (with
//! fresh document and replica ids written over the vector's own), checking
//! the kinds of the replies, and every client-to-server `err` vector,
//! checking its documented error code and the close.
//!
//! One check per vector, named `vector-` and the vector's name with `.` and
//! `_` as `-`.

use notesync_protocol::vectors::{Dir, Expect, FRAMES, Vector, parse_vectors};
use notesync_protocol::{ErrorCode, Limits, ServerFrame, header};

use super::util::{
    auth_prefix, cat, closing_case, create_doc, expect_closing, expect_still_open_sync,
    hello_bytes, raw_exchange, recv_ack, recv_error, reply_name, session_start_bytes,
};
use super::{Check, Ctx, Outcome, Skipped};
use crate::conn::{Event, describe};

/// The check name of a vector.
pub fn check_name(v: &Vector) -> String {
    format!("vector-{}", v.name.replace(['.', '_'], "-"))
}

fn error_code(name: &str) -> ErrorCode {
    *ErrorCode::ALL
        .iter()
        .find(|c| c.name() == name)
        .unwrap_or_else(|| panic!("frames.txt names an unknown error code {name:?}"))
}

/// A check per client-to-server vector.
pub fn checks() -> Vec<Check<Ctx>> {
    parse_vectors(FRAMES)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter(|v| v.dir == Dir::C2s)
        .map(|v| {
            let about = match &v.expect {
                Expect::Ok => format!(
                    "frames.txt line {}: accepted, with the replies of its kind",
                    v.line
                ),
                Expect::Err { code, .. } => {
                    format!("frames.txt line {}: refused with {code} and closed", v.line)
                }
            };
            let section = match v.expect {
                Expect::Ok => "2.3, 7",
                Expect::Err { .. } => "4, 7",
            };
            let name = check_name(&v);
            let timeout = if v.bytes.len() > 1 << 20 {
                std::time::Duration::from_secs(120)
            } else {
                super::CHECK_TIMEOUT
            };
            Check::new(name, section, about, move |ctx| {
                let v = v.clone();
                async move {
                    match v.expect.clone() {
                        Expect::Ok => ok_vector(ctx, v).await,
                        Expect::Err { kind, code } => {
                            err_vector(ctx, v, &kind, error_code(&code)).await
                        }
                    }
                }
            })
            .with_timeout(timeout)
        })
        .collect()
}

/// Why a vector does not apply to a server with the target's limits: the
/// vectors are written for the default limits (frames.txt's header).
fn not_applicable(v: &Vector, limits: &Limits) -> Option<Skipped> {
    let d = Limits::default();
    let differs = match &v.expect {
        // The ok vectors reach depth 64 at most; nothing else is near a limit.
        Expect::Ok => limits.max_pid_depth < d.max_pid_depth,
        Expect::Err { kind, .. } => match kind.as_str() {
            "depth_limit" => limits.max_pid_depth != d.max_pid_depth,
            "too_many_items" => limits.max_items_per_frame != d.max_items_per_frame,
            "frame_too_large" => limits.max_frame_bytes != d.max_frame_bytes,
            _ => false,
        },
    };
    differs.then(|| Skipped("the vector is written for the default limits (section 5)".into()))
}

fn write_u128(bytes: &mut [u8], at: usize, v: u128) {
    bytes[at..at + 16].copy_from_slice(&v.to_be_bytes());
}

async fn ok_vector(ctx: Ctx, v: Vector) -> Outcome {
    if let Some(skip) = not_applicable(&v, &ctx.limits()) {
        return Err(skip);
    }
    let mut bytes = v.bytes.clone();
    let what = format!("vector {} (frames.txt line {})", v.name, v.line);
    let (prefix, prefix_replies) = auth_prefix(&ctx);
    match bytes[0] {
        header::SYNCLIST => {
            let since = u64::from_be_bytes(bytes[1..9].try_into().unwrap());
            let out = send_open(&ctx, cat(&[&prefix, &bytes])).await;
            let frames = after(&out, &prefix_replies, &what);
            match frames {
                [ServerFrame::SynclistResponse(e)] => {
                    for x in e.iter() {
                        assert!(
                            x.modified > since,
                            "{what}: a synclist lists changes after its time (3.1): expected \
                             times > {since}, got {}",
                            x.modified
                        );
                    }
                    if since == u64::MAX {
                        assert!(
                            e.is_empty(),
                            "{what}: nothing is after u64::MAX: expected an empty 32, got {} entries",
                            e.len()
                        );
                    }
                }
                other => panic!("{what}: expected one 32, got {}", shown(other)),
            }
        }
        header::SYNC_DOC_PULL => {
            let doc = ctx.doc();
            write_u128(&mut bytes, 1, doc);
            create_doc(&ctx, "creator", doc, "for a pull vector").await;
            let out = send_open(&ctx, cat(&[&prefix, &bytes])).await;
            let frames = after(&out, &prefix_replies, &what);
            expect_doc_reply(frames, doc, &what);
        }
        header::SYNC_DOC_UPSERT => {
            let doc = ctx.doc();
            write_u128(&mut bytes, 1, doc);
            let inserts_site_1 = v.name == "upsert.full";
            if inserts_site_1 {
                // Its inserts are of site 1: accepted if that is our site
                // for the document, site_mismatch otherwise.
                let (mut c, site, _) = create_doc(&ctx, "vector upsert", doc, "").await;
                c.send_raw(&bytes).await;
                if site == 1 {
                    let (rs, s) = c
                        .recv_doc_reply(doc, &what)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: our site is 1, so its inserts are ours: expected 33s and a 34, got error {} {:?}", e.code, e.message));
                    assert_eq!(s.site, 1, "{what}: a replica keeps its site");
                    reply_name(&rs, &what);
                } else {
                    recv_error(
                        &mut c,
                        ErrorCode::SITE_MISMATCH,
                        &format!("{what} (our site is {site}, its inserts are of site 1)"),
                    )
                    .await;
                    expect_still_open_sync(&mut c, "site_mismatch").await;
                }
                return Ok(());
            }
            let (mut c, _) = ctx.client("vector upsert").await;
            c.send_raw(&bytes).await;
            let (rs, s) = c.recv_doc_reply(doc, &what).await.unwrap_or_else(|e| {
                panic!(
                    "{what}: expected 33s and a 34, got error {} {:?}",
                    e.code, e.message
                )
            });
            assert_ne!(
                s.site, 0,
                "{what}: an upsert after hello allocates a site (1.3): expected a site in the 34, got 0"
            );
            let name = reply_name(&rs, &what);
            let sent = crate::conn::name_of(
                std::str::from_utf8(
                    &bytes[17..17 + bytes[17..].iter().position(|&b| b == b'\n').unwrap()],
                )
                .unwrap(),
            );
            assert_eq!(
                name,
                sent.as_str(),
                "{what}: the new document has the upsert's name"
            );
        }
        header::DOC_DELETE => {
            // A version 2 frame: after a version 2 hello, on a document of
            // this check's own.
            let doc = ctx.doc();
            write_u128(&mut bytes, 1, doc);
            let (mut c, _, _) = create_doc(&ctx, "vector doc_delete", doc, "to delete").await;
            c.send_raw(&bytes).await;
            match c.next_event().await {
                Event::Frame(ServerFrame::DocDeleted {
                    doc: d,
                    deleted_time,
                }) if d == doc && deleted_time > 0 => {}
                other => panic!(
                    "{what}: expected 35 doc_deleted for the document (3.5), got {}",
                    super::util::show(&other)
                ),
            }
        }
        header::SESSION_START => {
            let doc = ctx.doc();
            write_u128(&mut bytes, 9, doc);
            let (mut c, _) = ctx.client("vector session").await;
            c.send_raw(&bytes).await;
            let mut n33 = 0;
            loop {
                match c.next_event().await {
                    Event::Frame(ServerFrame::DocResponse(r)) if r.doc == doc => n33 += 1,
                    Event::Frame(ServerFrame::SessionStarted { site, .. }) => {
                        assert!(
                            n33 >= 1,
                            "{what}: expected one or more 33 before the 68 (3.2), got none"
                        );
                        assert_ne!(site, 0, "{what}: a session after hello gets a site (1.3)");
                        break;
                    }
                    other => panic!(
                        "{what}: expected 33s then a 68, got {}",
                        super::util::show(&other)
                    ),
                }
            }
        }
        header::SESSION_INSERT | header::SESSION_DELETE | header::NAME_CHANGE => {
            session_op_vector(&ctx, &v, &what).await?;
        }
        header::FEED_SUBSCRIBE => {
            // A version 4 frame: after a version 4 hello, the feed's first
            // listing (38s of times after `since`, ascending), then the 39
            // that ends it, at or after every listed time (3.8).
            let since = u64::from_be_bytes(bytes[1..9].try_into().unwrap());
            let (mut c, _) = ctx.client_v4("vector feed_subscribe").await;
            c.send_raw(&bytes).await;
            let mut last = since;
            loop {
                match c.next_event().await {
                    Event::Frame(ServerFrame::FeedChanges(e)) => {
                        for x in e.iter() {
                            assert!(
                                x.time > last,
                                "{what}: feed times go up and are after the cursor {since} \
                                 (3.8): got {} after {last}",
                                x.time
                            );
                            last = x.time;
                        }
                    }
                    Event::Frame(ServerFrame::FeedHeartbeat { time }) => {
                        assert!(
                            time >= last,
                            "{what}: the 39 that ends the first listing covers it (3.8): \
                             {time} < {last}"
                        );
                        break;
                    }
                    other => panic!("{what}: expected 38s then a 39, got {other:?}"),
                }
            }
        }
        header::SYNC_DOC_UPSERT_RUNS => {
            // A version 3 frame: after a version 3 hello. Its inserts (if
            // any) are of site 1: accepted if that is our site for the
            // document, site_mismatch otherwise.
            let doc = ctx.doc();
            write_u128(&mut bytes, 1, doc);
            let (mut c, _) = ctx.client_v3("vector upsert_runs").await;
            let (_, s0) = c.upsert(doc, "", 0, &[], &[]).await;
            c.send_raw(&bytes).await;
            if v.name == "upsert_runs.full" && s0.site != 1 {
                recv_error(
                    &mut c,
                    ErrorCode::SITE_MISMATCH,
                    &format!(
                        "{what} (our site is {}, its inserts are of site 1)",
                        s0.site
                    ),
                )
                .await;
                expect_still_open_sync(&mut c, "site_mismatch").await;
                return Ok(());
            }
            let mut n37 = 0;
            loop {
                match c.next_event().await {
                    Event::Frame(ServerFrame::DocResponseRuns(r)) if r.doc == doc => n37 += 1,
                    Event::Frame(ServerFrame::DocSync { doc: d, site, .. }) if d == doc => {
                        assert!(
                            n37 >= 1,
                            "{what}: a version-3 connection's upsert reply is 37s then the 34 (3.1), got no 37"
                        );
                        assert_eq!(site, s0.site, "{what}: a replica keeps its site");
                        break;
                    }
                    other => panic!(
                        "{what}: expected 37s then a 34 (3.1), got {}",
                        super::util::show(&other)
                    ),
                }
            }
        }
        header::SESSION_INSERT_RUN | header::SESSION_DELETE_RANGE => {
            let doc = ctx.doc();
            let site_byte = v.bytes[1];
            let (mut c, _) = ctx.client_v3("vector session v3").await;
            let (_, st) = c.session_start(0, doc).await;
            c.send_raw(&v.bytes).await;
            if site_byte != st.site {
                recv_error(
                    &mut c,
                    ErrorCode::SITE_MISMATCH,
                    &format!(
                        "{what} (our site is {}, the op's site is {site_byte}): one error for the whole frame",
                        st.site
                    ),
                )
                .await;
            }
            recv_ack(
                &mut c,
                1,
                &format!("{what}: a 70 or 71 is one op for session_ack (3.2)"),
            )
            .await;
        }
        header::HELLO => {
            let replica = ctx.replica();
            write_u128(&mut bytes, 2, replica);
            let version = bytes[1];
            let token = &bytes[19..];
            let refused = if !(1..=4).contains(&version) {
                Some((
                    ErrorCode::UNSUPPORTED_VERSION,
                    format!(
                        "{what}: a server of versions 1 to 4 cannot speak version {version} (3, 6)"
                    ),
                ))
            } else if ctx.target().token.as_ref().is_some_and(|t| t != token) {
                Some((
                    ErrorCode::UNAUTHORIZED,
                    format!("{what}: the server requires another token"),
                ))
            } else {
                None
            };
            match refused {
                Some((code, why)) => {
                    let out = raw_exchange(ctx.target(), bytes.clone(), false).await;
                    expect_closing(&out, &[], code, None, &why);
                }
                None => {
                    let mut c = ctx.raw_conn("vector hello").await;
                    c.send_raw(&bytes).await;
                    match c.next_event().await {
                        Event::Frame(ServerFrame::Welcome { version: v, .. }) if v == version => {}
                        // A token this server does not know, sent to a
                        // server the kit was given no token for: it may
                        // ignore it, or refuse it as invalid credentials
                        // (section 4, unauthorized).
                        Event::Frame(ServerFrame::Error(e))
                            if !token.is_empty()
                                && ctx.target().token.is_none()
                                && e.code == ErrorCode::UNAUTHORIZED => {}
                        other => panic!(
                            "{what}: expected 97 welcome with version {version} (the version the \
                             connection uses, 6), got {}",
                            super::util::show(&other)
                        ),
                    }
                }
            }
        }
        h => panic!("{what}: no rule for an ok vector with header {h}"),
    }
    Ok(())
}

/// Sends an ok 65/66/67 vector in a session on a fresh document.
async fn session_op_vector(ctx: &Ctx, v: &Vector, what: &str) -> Outcome {
    let doc = ctx.doc();
    let h = v.bytes[0];
    let site_byte = v.bytes[1];
    if v.name == "delete.site_0" {
        // A deleter without a site: a session without hello.
        let mut c = ctx.anon("vector session, no hello").await?;
        let (_, st) = c.session_start(0, doc).await;
        assert_eq!(
            st.site, 0,
            "{what}: a session without hello has site 0 (1.3)"
        );
        c.send_raw(&v.bytes).await;
        recv_ack(&mut c, 1, what).await;
        return Ok(());
    }
    let (mut c, _) = ctx.client("vector session").await;
    let (_, st) = c.session_start(0, doc).await;
    c.send_raw(&v.bytes).await;
    if h == header::NAME_CHANGE {
        recv_ack(&mut c, 1, what).await;
        let want = std::str::from_utf8(&v.bytes[1..v.bytes.len() - 1])
            .unwrap()
            .to_owned();
        let (mut r, _) = ctx.client("reader").await;
        let (rs, _) = r.pull(doc, 0).await;
        assert_eq!(
            reply_name(&rs, what),
            want,
            "{what}: the rename applies (3.3)"
        );
    } else if site_byte == st.site {
        recv_ack(&mut c, 1, &format!("{what} (our site is {site_byte})")).await;
    } else {
        recv_error(
            &mut c,
            ErrorCode::SITE_MISMATCH,
            &format!(
                "{what} (our site is {}, the op's site is {site_byte})",
                st.site
            ),
        )
        .await;
        recv_ack(
            &mut c,
            1,
            &format!("{what}: a refused op is counted by the ack after its error (3.2)"),
        )
        .await;
    }
    Ok(())
}

/// Sends bytes on a fresh connection and reads until the server goes quiet
/// (the replies of ok vectors never close the connection).
async fn send_open(ctx: &Ctx, bytes: Vec<u8>) -> Vec<ServerFrame> {
    let mut c = ctx.raw_conn("vector").await;
    c.send_raw(&bytes).await;
    let mut frames = Vec::new();
    // Read until a frame that ends a reply: the vectors here expect one
    // reply after the prefix's.
    loop {
        match c.next_event().await {
            Event::Frame(f) => {
                let end = matches!(
                    f,
                    ServerFrame::SynclistResponse(_)
                        | ServerFrame::DocSync { .. }
                        | ServerFrame::Error(_)
                        | ServerFrame::SessionStarted { .. }
                );
                let welcome = matches!(f, ServerFrame::Welcome { .. });
                frames.push(f);
                if end && !welcome {
                    return frames;
                }
            }
            other => panic!(
                "{}: expected a reply, got {} after {}",
                c.label(),
                super::util::show(&other),
                shown(&frames)
            ),
        }
    }
}

/// The frames after the prefix's replies.
fn after<'a>(frames: &'a [ServerFrame], prefix: &[u8], what: &str) -> &'a [ServerFrame] {
    let n = prefix.len();
    let got: Vec<u8> = frames.iter().take(n).map(|f| f.header()).collect();
    assert_eq!(
        got,
        prefix,
        "{what}: the hello's reply: expected {prefix:?}, got {}",
        shown(frames)
    );
    &frames[n..]
}

fn shown(frames: &[ServerFrame]) -> String {
    frames.iter().map(describe).collect::<Vec<_>>().join(", ")
}

fn expect_doc_reply(frames: &[ServerFrame], doc: u128, what: &str) {
    let (last, rest) = frames
        .split_last()
        .unwrap_or_else(|| panic!("{what}: no reply"));
    assert!(
        !rest.is_empty()
            && rest
                .iter()
                .all(|f| matches!(f, ServerFrame::DocResponse(r) if r.doc == doc)),
        "{what}: expected one or more 33 for the document, then a 34 (3.1), got {}",
        shown(frames)
    );
    assert!(
        matches!(last, ServerFrame::DocSync { doc: d, .. } if *d == doc),
        "{what}: expected the 34 last, got {}",
        shown(frames)
    );
}

async fn err_vector(ctx: Ctx, v: Vector, kind: &str, code: ErrorCode) -> Outcome {
    if let Some(skip) = not_applicable(&v, &ctx.limits()) {
        return Err(skip);
    }
    let what = format!("vector {} (frames.txt line {})", v.name, v.line);
    let limit = match kind {
        "frame_too_large" => Some(("max_frame_bytes", ctx.limits().max_frame_bytes as u64)),
        "too_many_items" => Some(("max_items_per_frame", ctx.limits().max_items_per_frame)),
        "depth_limit" => Some(("max_pid_depth", u64::from(ctx.limits().max_pid_depth))),
        _ => None,
    };
    let half_close = kind == "truncated";
    let h = v.bytes[0];
    let (bytes, replies) = if h == header::HELLO {
        (v.bytes.clone(), vec![])
    } else if matches!(
        h,
        header::SESSION_INSERT | header::SESSION_DELETE | header::NAME_CHANGE
    ) && kind != "unknown_header"
    {
        // Session frames are sent in session mode, so that only the bytes
        // can be wrong.
        let (hello, mut replies) = match ctx.target().token {
            Some(_) => (hello_bytes(&ctx, ctx.replica(), 1), vec![header::WELCOME]),
            None => (vec![], vec![]),
        };
        replies.push(header::SESSION_STARTED);
        (
            cat(&[&hello, &session_start_bytes(ctx.doc()), &v.bytes]),
            replies,
        )
    } else {
        let (prefix, replies) = auth_prefix(&ctx);
        (cat(&[&prefix, &v.bytes]), replies)
    };
    closing_case(&ctx, bytes, half_close, &replies, code, limit, &what).await;
    Ok(())
}
