//! Connections (PROTOCOL.md 2.1, 3, 6): hello and welcome, versions,
//! credentials, modes, unknown headers, and replies in request order.

use notesync_protocol::{ClientFrame, ErrorCode, Frame, ServerFrame, header};

use super::util::{
    auth_prefix, cat, closing_case, create_doc, frame_bytes, hello_bytes, inserts_of, show,
};
use super::{Check, Ctx, Outcome, Skipped};
use crate::conn::{Event, describe, name_of, upsert_frame};

pub fn checks() -> Vec<Check<Ctx>> {
    let mut v = vec![
        Check::new(
            "hello-welcome",
            "3, 6",
            "hello is answered by 97 welcome with the hello's version (1, 2, 3 or 4) and the server's time",
            hello_welcome,
        ),
        Check::new(
            "hello-unsupported-version",
            "3, 6",
            "hello with a version the server does not speak (0, 5, 255): unsupported_version, closed",
            unsupported_version,
        ),
        Check::new(
            "auth-missing-hello",
            "3, 4",
            "a server that requires a token refuses a connection without hello: unauthorized, closed",
            auth_missing_hello,
        ),
        Check::new(
            "auth-wrong-token",
            "3, 4",
            "a server that requires a token refuses a hello with another token: unauthorized, closed",
            auth_wrong_token,
        ),
        Check::new(
            "unknown-frame-every-header",
            "2.1, 4",
            "every header a client may not send, as a first frame: unknown_frame, closed",
            unknown_every_header,
        ),
        Check::new(
            "unknown-frame-after-a-reply",
            "2.1, 4",
            "an unknown header after a valid synclist: the 32, then unknown_frame, closed",
            unknown_after_reply,
        ),
        Check::new(
            "unknown-frame-in-session",
            "2.1, 4",
            "an unknown header (3) or a server frame (33) in session mode: unknown_frame, not wrong_mode",
            unknown_in_session,
        ),
        Check::new(
            "order-pipelined-requests",
            "3",
            "pipelined upserts, pulls (one of an unknown document) and synclists are answered in order",
            pipelined_order,
        ),
    ];
    for &(name, about, first, then, reply) in WRONG_MODE {
        v.push(Check::new(
            format!("wrong-mode-{name}"),
            "3",
            format!("{about}: wrong_mode, closed"),
            move |ctx| wrong_mode(ctx, name, first, then, reply),
        ));
    }
    v
}

async fn hello_welcome(ctx: Ctx) -> Outcome {
    for hello_version in [1u8, 2, 3, 4] {
        hello_welcome_as(&ctx, hello_version).await;
    }
    Ok(())
}

async fn hello_welcome_as(ctx: &Ctx, hello_version: u8) {
    let mut c = ctx.raw_conn("hello").await;
    let replica = ctx.replica();
    c.send_raw(&hello_bytes(ctx, replica, hello_version)).await;
    match c.next_event().await {
        Event::Frame(ServerFrame::Welcome {
            version,
            server_time,
        }) => {
            assert_eq!(
                version, hello_version,
                "a hello with version {hello_version}: expected welcome with that version \
                 (the one the connection uses, 6), got version {version}"
            );
            assert!(
                server_time > 0,
                "the welcome carries the server's current time (1: 0 means never synced): got 0"
            );
        }
        other => panic!(
            "expected 97 welcome as the reply to hello, got {}",
            show(&other)
        ),
    }
}

async fn unsupported_version(ctx: Ctx) -> Outcome {
    for version in [0u8, 5, 255] {
        let bytes = hello_bytes(&ctx, ctx.replica(), version);
        closing_case(
            &ctx,
            bytes,
            false,
            &[],
            ErrorCode::UNSUPPORTED_VERSION,
            None,
            &format!("hello with version {version}"),
        )
        .await;
    }
    Ok(())
}

fn require_token(ctx: &Ctx) -> Result<Vec<u8>, Skipped> {
    ctx.target()
        .token
        .clone()
        .ok_or_else(|| Skipped("no --token given: the server is taken to require none".into()))
}

async fn auth_missing_hello(ctx: Ctx) -> Outcome {
    require_token(&ctx)?;
    let bytes = frame_bytes(&ClientFrame::Synclist { since: u64::MAX });
    closing_case(
        &ctx,
        bytes,
        false,
        &[],
        ErrorCode::UNAUTHORIZED,
        None,
        "a synclist without hello on a server that requires a token (missing credentials)",
    )
    .await;
    Ok(())
}

async fn auth_wrong_token(ctx: Ctx) -> Outcome {
    let mut token = require_token(&ctx)?;
    match token.last_mut() {
        Some(b) => *b ^= 0x01,
        None => token.push(b'x'),
    }
    let mut h = notesync_protocol::Hello::new(ctx.replica(), token).expect("token fits");
    h.version = 1;
    closing_case(
        &ctx,
        frame_bytes(&ClientFrame::Hello(h)),
        false,
        &[],
        ErrorCode::UNAUTHORIZED,
        None,
        "hello with the token's last byte changed (invalid credentials)",
    )
    .await;
    Ok(())
}

/// Headers a server accepts from a client, in some mode.
fn accepted(h: u8) -> bool {
    <ClientFrame as Frame>::layout(h).is_some()
}

async fn unknown_every_header(ctx: Ctx) -> Outcome {
    let headers: Vec<u8> = (0..=255u8).filter(|&h| !accepted(h)).collect();
    assert_eq!(
        headers.len(),
        256 - 13,
        "a client sends 13 kinds of frame (2.3; 3 doc_delete from version 2; 4, 70, 71 from version 3; \
         5 feed_subscribe from version 4)"
    );
    // A few at a time: each on its own connection.
    let mut set = tokio::task::JoinSet::new();
    let mut failures = Vec::new();
    for chunk in headers.chunks(8) {
        for &h in chunk {
            let ctx = ctx.clone();
            set.spawn(async move {
                let (prefix, replies) = auth_prefix(&ctx);
                let out =
                    super::util::raw_exchange(ctx.target(), cat(&[&prefix, &[h]]), false).await;
                super::util::check_closing(
                    &out,
                    &replies,
                    ErrorCode::UNKNOWN_FRAME,
                    None,
                    &format!("header {h} as a first frame"),
                )
                .err()
            });
        }
        while let Some(r) = set.join_next().await {
            if let Some(f) = r.expect("header task") {
                failures.push(f);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} headers:\n{}",
        failures.len(),
        headers.len(),
        failures.join("\n")
    );
    Ok(())
}

async fn unknown_after_reply(ctx: Ctx) -> Outcome {
    let (prefix, mut replies) = auth_prefix(&ctx);
    replies.push(header::SYNCLIST_RESPONSE);
    let synclist = frame_bytes(&ClientFrame::Synclist { since: u64::MAX });
    closing_case(
        &ctx,
        cat(&[&prefix, &synclist, &[0x1F]]),
        false,
        &replies,
        ErrorCode::UNKNOWN_FRAME,
        None,
        "a synclist, then header 31",
    )
    .await;
    Ok(())
}

async fn unknown_in_session(ctx: Ctx) -> Outcome {
    for h in [6u8, header::SYNC_DOC_RESPONSE, header::SESSION_ACK] {
        let (prefix, mut replies) = auth_prefix(&ctx);
        replies.push(header::SESSION_STARTED);
        let start = frame_bytes(&ClientFrame::SessionStart {
            since: 0,
            doc: ctx.doc(),
        });
        closing_case(
            &ctx,
            cat(&[&prefix, &start, &[h]]),
            false,
            &replies,
            ErrorCode::UNKNOWN_FRAME,
            None,
            &format!("header {h} in session mode (a header no client frame has is unknown_frame in any mode)"),
        )
        .await;
    }
    Ok(())
}

/// (name, what, first frames, then the offending frame, the replies to the
/// first frames). Frames are built per run: see `frames_of`.
type WrongMode = (&'static str, &'static str, &'static [F], F, &'static [u8]);

#[derive(Clone, Copy, Debug)]
enum F {
    Hello,
    Synclist,
    Pull,
    Upsert,
    Start,
    Insert,
    Delete,
    Rename,
}

const WRONG_MODE: &[WrongMode] = &[
    (
        "insert-before-session",
        "a 65 as the first request",
        &[],
        F::Insert,
        &[],
    ),
    (
        "delete-before-session",
        "a 66 as the first request",
        &[],
        F::Delete,
        &[],
    ),
    (
        "rename-before-session",
        "a 67 as the first request",
        &[],
        F::Rename,
        &[],
    ),
    (
        "rename-in-sync-mode",
        "a 67 after a synclist",
        &[F::Synclist],
        F::Rename,
        &[header::SYNCLIST_RESPONSE],
    ),
    (
        "insert-in-sync-mode",
        "a 65 after a pull",
        &[F::Pull],
        F::Insert,
        &[header::ERROR],
    ),
    (
        "session-start-in-sync-mode",
        "a 64 after a synclist",
        &[F::Synclist],
        F::Start,
        &[header::SYNCLIST_RESPONSE],
    ),
    (
        "synclist-in-session",
        "a synclist after a 64",
        &[F::Start],
        F::Synclist,
        &[header::SESSION_STARTED],
    ),
    (
        "pull-in-session",
        "a pull after a 64",
        &[F::Start],
        F::Pull,
        &[header::SESSION_STARTED],
    ),
    (
        "upsert-in-session",
        "an upsert after a 64",
        &[F::Start],
        F::Upsert,
        &[header::SESSION_STARTED],
    ),
    (
        "second-session-start",
        "a second 64",
        &[F::Start],
        F::Start,
        &[header::SESSION_STARTED],
    ),
    (
        "second-hello",
        "a second hello",
        &[F::Hello],
        F::Hello,
        &[header::WELCOME],
    ),
    (
        "hello-after-synclist",
        "a hello after a synclist",
        &[F::Synclist],
        F::Hello,
        &[header::SYNCLIST_RESPONSE],
    ),
    (
        "hello-in-session",
        "a hello after a 64",
        &[F::Start],
        F::Hello,
        &[header::SESSION_STARTED],
    ),
];

fn frame_of(ctx: &Ctx, f: F, doc: u128) -> Vec<u8> {
    let ok_atom = super::util::atom1("a", 1, 1);
    match f {
        F::Hello => hello_bytes(ctx, ctx.replica(), 1),
        F::Synclist => frame_bytes(&ClientFrame::Synclist { since: u64::MAX }),
        // A pull of a document that does not exist: error 7, still open.
        F::Pull => frame_bytes(&ClientFrame::Pull {
            doc: ctx.doc(),
            since: 0,
        }),
        F::Upsert => frame_bytes(&upsert_frame(doc, "x", 0, &[], &[])),
        F::Start => frame_bytes(&ClientFrame::SessionStart { since: 0, doc }),
        F::Insert => frame_bytes(&ClientFrame::Insert(notesync_protocol::SessionInsert::new(
            ok_atom,
        ))),
        F::Delete => frame_bytes(&ClientFrame::Delete(notesync_protocol::SessionDelete {
            site: 0,
            pid: super::util::pid1(1, 1),
        })),
        F::Rename => frame_bytes(&ClientFrame::Rename(name_of("x"))),
    }
}

async fn wrong_mode(
    ctx: Ctx,
    name: &'static str,
    first: &'static [F],
    then: F,
    first_replies: &'static [u8],
) -> Outcome {
    let doc = ctx.doc();
    // With a token every connection starts with hello; the cases that are
    // about a hello already have one.
    let starts_with_hello = matches!(first.first(), Some(F::Hello));
    let (prefix, mut replies) = if starts_with_hello {
        (vec![], vec![])
    } else {
        auth_prefix(&ctx)
    };
    let mut bytes = prefix;
    for &f in first {
        bytes.extend(frame_of(&ctx, f, doc));
    }
    bytes.extend(frame_of(&ctx, then, doc));
    replies.extend_from_slice(first_replies);
    closing_case(
        &ctx,
        bytes,
        false,
        &replies,
        ErrorCode::WRONG_MODE,
        None,
        &format!("{name}: {first:?} then {then:?}"),
    )
    .await;
    Ok(())
}

async fn pipelined_order(ctx: Ctx) -> Outcome {
    let d0 = ctx.doc();
    let (mut c, site, t0) = create_doc(&ctx, "pipeliner", d0, "first").await;
    let a0 = super::util::atom1("zero", 10, site);
    c.upsert(d0, "first", t0, std::slice::from_ref(&a0), &[])
        .await;
    let (a, b, unknown) = (ctx.doc(), ctx.doc(), ctx.doc());
    let frames = vec![
        upsert_frame(a, "A", 0, &[], &[]),
        ClientFrame::Pull {
            doc: unknown,
            since: 0,
        },
        ClientFrame::Synclist { since: u64::MAX },
        ClientFrame::Pull { doc: d0, since: 0 },
        upsert_frame(b, "B", 0, &[], &[]),
        ClientFrame::Pull {
            doc: unknown,
            since: 0,
        },
        ClientFrame::Pull { doc: d0, since: t0 },
    ];
    c.send_many(frames).await;
    let what = "pipelined requests";
    let (rs, _) = c
        .recv_doc_reply(a, "reply 1 (upsert A)")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{what}: reply 1 (upsert A): expected 33s and a 34, got error {}",
                e.code
            )
        });
    assert_eq!(super::util::reply_name(&rs, "reply 1"), "A");
    let e = c
        .recv_doc_reply(unknown, "reply 2 (pull of an unknown document)")
        .await
        .err()
        .unwrap_or_else(|| panic!("{what}: reply 2: expected unknown_document, got a 34"));
    assert_eq!(
        e.code,
        ErrorCode::UNKNOWN_DOCUMENT,
        "{what}: reply 2: expected unknown_document, got {}",
        e.code
    );
    match c.recv().await {
        ServerFrame::SynclistResponse(e) => assert!(
            e.is_empty(),
            "{what}: reply 3: synclist(u64::MAX) lists nothing, got {} entries",
            e.len()
        ),
        other => panic!("{what}: reply 3: expected the 32, got {}", describe(&other)),
    }
    let (rs, _) = c
        .recv_doc_reply(d0, "reply 4 (pull of the first document)")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{what}: reply 4: expected 33s and a 34, got error {}",
                e.code
            )
        });
    assert_eq!(
        inserts_of(&rs).into_values().collect::<Vec<_>>(),
        vec!["zero".to_string()],
        "{what}: reply 4 is the pull of the first document"
    );
    let (rs, s) = c
        .recv_doc_reply(b, "reply 5 (upsert B)")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{what}: reply 5: expected 33s and a 34, got error {}",
                e.code
            )
        });
    assert_eq!(super::util::reply_name(&rs, "reply 5"), "B");
    assert_ne!(s.site, 0);
    let e = c
        .recv_doc_reply(unknown, "reply 6")
        .await
        .err()
        .unwrap_or_else(|| panic!("{what}: reply 6: expected unknown_document (a pull never creates a document), got a 34"));
    assert_eq!(e.code, ErrorCode::UNKNOWN_DOCUMENT);
    let (rs, _) = c
        .recv_doc_reply(d0, "reply 7 (pull since the first 34)")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{what}: reply 7: expected 33s and a 34, got error {}",
                e.code
            )
        });
    assert_eq!(
        inserts_of(&rs).into_values().collect::<Vec<_>>(),
        vec!["zero".to_string()],
        "{what}: reply 7: the atom inserted after t0"
    );
    Ok(())
}
