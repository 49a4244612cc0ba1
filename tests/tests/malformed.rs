//! Malformed, oversized and out-of-mode input is rejected with the code of
//! PROTOCOL.md section 4 and a close, while other clients of the same
//! server keep being served correctly.

use notesync_protocol::{
    ClientFrame, ErrorCode, Hello, Level, Pid, ServerFrame, SessionDelete, SessionInsert, header,
};
use notesync_tests::{
    Conn, DocModel, Event, RawFrame, ServerProcess, SessionClient, atom, describe, flood, model_of,
    name_of,
};

/// Clients that must keep working while others misbehave: a sync client
/// that appends and pulls, and two sessions where one inserts and the
/// other must receive it.
struct Bystanders {
    sync: Conn,
    model: DocModel,
    since: u64,
    s1: SessionClient,
    s2: SessionClient,
    checks: usize,
}

const DOC: u128 = 0xB757;
const SESSION_DOC: u128 = 0xB758;

impl Bystanders {
    async fn start(server: &ServerProcess) -> Bystanders {
        let mut sync = server.connect().await.with_label("bystander sync");
        sync.hello(0xB1).await;
        let (_, s) = sync.upsert(DOC, "bystander", 0, &[], &[]).await;
        let mut model = DocModel::new(DOC);
        model.set_site(s.site, 1);
        let s1 = SessionClient::start(server.addr(), "bystander s1", Some(0xB2), SESSION_DOC, 0, 2)
            .await;
        let s2 = SessionClient::start(server.addr(), "bystander s2", Some(0xB3), SESSION_DOC, 0, 3)
            .await;
        Bystanders {
            sync,
            model,
            since: s.sync_time,
            s1,
            s2,
            checks: 0,
        }
    }

    /// One more edit through each path, checked end to end.
    async fn check(&mut self, after: &str) {
        self.checks += 1;
        let a = self.model.local_append(&format!("{} ", self.checks));
        let (rs, s) = self
            .sync
            .upsert(DOC, "bystander", self.since, std::slice::from_ref(&a), &[])
            .await;
        self.model.apply_responses(&rs);
        self.since = s.sync_time;
        let (all, _) = self.sync.pull(DOC, 0).await;
        assert_eq!(
            model_of(DOC, &all).text(),
            self.model.text(),
            "bystander sync client after {after}"
        );

        let n = self.s1.model.live_len();
        let f = self.s1.insert_at(n, "x");
        self.s1.send_ops(vec![f]).await;
        self.s1.wait_acked().await;
        let want = self.s2.received_ops + 1;
        self.s2
            .pump_until(&format!("s1's insert after {after}"), |s| {
                s.received_ops == want
            })
            .await;
        assert_eq!(
            self.s1.model.live(),
            self.s2.model.live(),
            "bystander sessions after {after}"
        );
    }
}

struct Case {
    name: &'static str,
    /// Bytes sent in one write.
    bytes: Vec<u8>,
    /// Half-close after writing (the server sees end of stream).
    half_close: bool,
    /// The replies expected before the error, by their last frame: 97 for
    /// a hello, 32 for a synclist, 34 for a pull or upsert, 68 for a
    /// session start (33s before a 34 or 68 are skipped).
    replies: &'static [u8],
    code: ErrorCode,
    /// For limit_exceeded: the limit's name and value, which the message
    /// names (section 4).
    limit: Option<(&'static str, &'static str)>,
}

impl Case {
    /// Bytes written in one go, closed with `code` after `replies`.
    fn new(name: &'static str, bytes: Vec<u8>, replies: &'static [u8], code: ErrorCode) -> Case {
        Case {
            name,
            bytes,
            half_close: false,
            replies,
            code,
            limit: None,
        }
    }

    /// The client half-closes after writing.
    fn half_closed(self) -> Case {
        Case {
            half_close: true,
            ..self
        }
    }

    /// The error message names this limit and its value.
    fn naming(self, limit: &'static str, value: &'static str) -> Case {
        Case {
            limit: Some((limit, value)),
            ..self
        }
    }
}

fn frame(f: ClientFrame) -> Vec<u8> {
    f.to_bytes().to_vec()
}

fn hello(version: u8) -> Vec<u8> {
    let mut h = Hello::new(0xABC, bytes::Bytes::new()).unwrap();
    h.version = version;
    frame(ClientFrame::Hello(h))
}

fn session_start() -> Vec<u8> {
    frame(ClientFrame::SessionStart {
        since: 0,
        doc: 0x5E5,
    })
}

/// A session start, then a 65 of an atom of site 1 whose seed says `site`.
fn seeded_insert(site: u8) -> Vec<u8> {
    cat(&[
        session_start(),
        RawFrame::new(header::SESSION_INSERT)
            .u8(site)
            .atom(b"a", &[(1, 1)])
            .build(),
    ])
}

fn synclist() -> Vec<u8> {
    frame(ClientFrame::Synclist { since: 0 })
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// An upsert with the given raw name, and raw lists.
fn upsert_raw(name: &[u8], inserts: RawFrame, deletes: RawFrame) -> Vec<u8> {
    RawFrame::new(header::SYNC_DOC_UPSERT)
        .u128(0xBAD)
        .name(name)
        .u64(0)
        .bytes(&inserts.build()[1..])
        .bytes(&deletes.build()[1..])
        .build()
}

/// A list as raw bytes (the leading header byte of RawFrame is a dummy,
/// dropped by `upsert_raw`).
fn list(count: u64) -> RawFrame {
    RawFrame::new(0).u64(count)
}

fn cases() -> Vec<Case> {
    let ok_insert = ClientFrame::Insert(SessionInsert::new(atom("a", 1, 1)));
    let ok_delete = ClientFrame::Delete(SessionDelete {
        site: 0,
        pid: Pid::from_levels(&[Level::new(1, 1)]),
    });
    let deep: Vec<(u8, u32)> = (0..65).map(|i| (1, i)).collect();
    vec![
        Case::new(
            "unknown header 6 (sync range, not a frame)",
            vec![6, 0, 0, 0],
            &[],
            ErrorCode::UNKNOWN_FRAME,
        ),
        Case::new(
            "server-only header 33 sent by a client",
            vec![header::SYNC_DOC_RESPONSE, 0, 0],
            &[],
            ErrorCode::UNKNOWN_FRAME,
        ),
        Case::new(
            "server-only header 97 welcome sent by a client",
            vec![header::WELCOME, 1],
            &[],
            ErrorCode::UNKNOWN_FRAME,
        ),
        Case::new(
            "error header 127 sent by a client",
            vec![header::ERROR, 1, 0, 0],
            &[],
            ErrorCode::UNKNOWN_FRAME,
        ),
        Case::new(
            "reserved header 200",
            vec![200],
            &[],
            ErrorCode::UNKNOWN_FRAME,
        ),
        Case::new(
            "unknown header after a valid synclist",
            cat(&[synclist(), vec![0x1F]]),
            &[header::SYNCLIST_RESPONSE],
            ErrorCode::UNKNOWN_FRAME,
        ),
        Case::new(
            "invalid UTF-8 in a name",
            upsert_raw(&[b'o', 0xFF, 0xFE], list(0), list(0)),
            &[],
            ErrorCode::MALFORMED,
        ),
        Case::new(
            "invalid UTF-8 in atom data (a split character)",
            upsert_raw(b"n", list(1).atom(&[b'a', 0xC3], &[(1, 1)]), list(0)),
            &[],
            ErrorCode::MALFORMED,
        ),
        Case::new(
            "atom length 0",
            upsert_raw(b"n", list(1).atom(&[], &[(1, 1)]), list(0)),
            &[],
            ErrorCode::MALFORMED,
        ),
        Case::new(
            "position id depth 0 in a delete",
            upsert_raw(b"n", list(0), list(1).u8(0)),
            &[],
            ErrorCode::MALFORMED,
        ),
        Case::new(
            "position id depth 0 in an atom",
            upsert_raw(b"n", list(1).u8(1).bytes(b"a").u8(0), list(0)),
            &[],
            ErrorCode::MALFORMED,
        ),
        Case::new(
            "last level with site 0",
            upsert_raw(b"n", list(0), list(1).pid(&[(3, 1), (0, 9)])),
            &[],
            ErrorCode::MALFORMED,
        ),
        Case::new(
            "a name with no 0x0A within 256 bytes",
            RawFrame::new(header::SYNC_DOC_UPSERT)
                .u128(1)
                .bytes(&[b'a'; 300])
                .build(),
            &[],
            ErrorCode::MALFORMED,
        ),
        Case::new(
            "session insert with site 0",
            seeded_insert(0),
            &[header::SESSION_STARTED],
            ErrorCode::MALFORMED,
        ),
        Case::new(
            "session insert whose site differs from its atom's creator",
            seeded_insert(2),
            &[header::SESSION_STARTED],
            ErrorCode::MALFORMED,
        ),
        Case::new(
            "connection closed in the middle of a frame",
            vec![header::SYNC_DOC_PULL, 0, 0, 0, 0],
            &[],
            ErrorCode::MALFORMED,
        )
        .half_closed(),
        Case::new(
            "insert count u64::MAX",
            upsert_raw(b"n", list(u64::MAX), list(0)),
            &[],
            ErrorCode::LIMIT_EXCEEDED,
        )
        .naming("max_items_per_frame", "1000000"),
        Case::new(
            "delete count 1,000,001 (max_items_per_frame is 1,000,000)",
            upsert_raw(b"n", list(0), list(1_000_001)),
            &[],
            ErrorCode::LIMIT_EXCEEDED,
        )
        .naming("max_items_per_frame", "1000000"),
        Case::new(
            "position id depth 65 (max_pid_depth is 64)",
            upsert_raw(b"n", list(0), list(1).pid(&deep)),
            &[],
            ErrorCode::LIMIT_EXCEEDED,
        )
        .naming("max_pid_depth", "64"),
        Case::new(
            "position id depth 255 in a session delete",
            cat(&[session_start(), {
                let mut f = RawFrame::new(header::SESSION_DELETE).u8(0).u8(255);
                for i in 0..255u32 {
                    f = f.u8(1).bytes(&i.to_be_bytes());
                }
                f.build()
            }]),
            &[header::SESSION_STARTED],
            ErrorCode::LIMIT_EXCEEDED,
        )
        .naming("max_pid_depth", "64"),
        Case::new(
            "a 65 before any 64",
            frame(ok_insert.clone()),
            &[],
            ErrorCode::WRONG_MODE,
        ),
        Case::new(
            "a 66 after hello, before any 64",
            cat(&[hello(1), frame(ok_delete.clone())]),
            &[header::WELCOME],
            ErrorCode::WRONG_MODE,
        ),
        Case::new(
            "a 67 in sync mode",
            cat(&[synclist(), frame(ClientFrame::Rename(name_of("x")))]),
            &[header::SYNCLIST_RESPONSE],
            ErrorCode::WRONG_MODE,
        ),
        Case::new(
            "a 64 in sync mode",
            cat(&[synclist(), session_start()]),
            &[header::SYNCLIST_RESPONSE],
            ErrorCode::WRONG_MODE,
        ),
        Case::new(
            "a synclist in session mode",
            cat(&[session_start(), synclist()]),
            &[header::SESSION_STARTED],
            ErrorCode::WRONG_MODE,
        ),
        Case::new(
            "a pull in session mode",
            cat(&[
                session_start(),
                frame(ClientFrame::Pull {
                    doc: 0x5E5,
                    since: 0,
                }),
            ]),
            &[header::SESSION_STARTED],
            ErrorCode::WRONG_MODE,
        ),
        Case::new(
            "a second 64",
            cat(&[session_start(), session_start()]),
            &[header::SESSION_STARTED],
            ErrorCode::WRONG_MODE,
        ),
        Case::new(
            "a second hello",
            cat(&[hello(1), hello(1)]),
            &[header::WELCOME],
            ErrorCode::WRONG_MODE,
        ),
        Case::new(
            "a hello after a synclist",
            cat(&[synclist(), hello(1)]),
            &[header::SYNCLIST_RESPONSE],
            ErrorCode::WRONG_MODE,
        ),
        Case::new(
            "a hello in session mode",
            cat(&[session_start(), hello(1)]),
            &[header::SESSION_STARTED],
            ErrorCode::WRONG_MODE,
        ),
        Case::new(
            "hello with protocol version 5",
            hello(5),
            &[],
            ErrorCode::UNSUPPORTED_VERSION,
        ),
        Case::new(
            "hello with protocol version 0",
            hello(0),
            &[],
            ErrorCode::UNSUPPORTED_VERSION,
        ),
    ]
}

/// Runs one case on a fresh connection; `Err` says what went wrong.
async fn run_case(server: &ServerProcess, case: &Case) -> Result<(), String> {
    let mut c = server.connect().await;
    if c.try_send_raw(&case.bytes).await.is_err() {
        // The server may close while we write; what it sent is still read.
    }
    if case.half_close {
        c.shutdown_write().await;
    }
    let mut replies = Vec::new();
    loop {
        match c.next_event().await {
            Event::Frame(ServerFrame::Error(e)) => {
                if replies != case.replies {
                    return Err(format!(
                        "replies before the error were {replies:?}, expected {:?}",
                        case.replies
                    ));
                }
                if e.code != case.code {
                    return Err(format!(
                        "expected error {}, got {} {:?}",
                        case.code, e.code, e.message
                    ));
                }
                if let Some((name, value)) = case.limit {
                    let digits: String = e
                        .message
                        .chars()
                        .filter(|c| *c != ',' && *c != '_')
                        .collect();
                    if !e.message.contains(name) || !digits.contains(value) {
                        return Err(format!(
                            "the message names the limit and its value ({name} = {value}), got {:?}",
                            e.message
                        ));
                    }
                }
                break;
            }
            Event::Frame(ServerFrame::DocResponse(_)) if !case.replies.is_empty() => {}
            Event::Frame(f) => {
                let h = f.header();
                if case.replies.contains(&h) {
                    replies.push(h);
                } else {
                    return Err(format!(
                        "expected error {}, got {}",
                        case.code,
                        describe(&f)
                    ));
                }
            }
            other => return Err(format!("expected error {}, got {other:?}", case.code)),
        }
    }
    match c.next_event().await {
        Event::Closed => Ok(()),
        other => Err(format!(
            "error {} closes the connection (section 4), but then: {other:?}",
            case.code
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_out_of_mode_input_is_rejected_and_closed_while_others_keep_working() {
    let server = ServerProcess::start();
    let mut by = Bystanders::start(&server).await;
    by.check("start").await;
    let mut failures = Vec::new();
    let all = cases();
    for case in &all {
        if let Err(e) = run_case(&server, case).await {
            failures.push(format!("{}: {e}", case.name));
        }
        by.check(case.name).await;
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_max_frame_bytes_is_limit_exceeded_and_closed() {
    let server = ServerProcess::start();
    let mut by = Bystanders::start(&server).await;
    // An upsert declaring 1,000,000 deletes of 64-level ids (a valid count)
    // whose bytes run past 32 MiB after about 104,500 ids.
    let prefix = RawFrame::new(header::SYNC_DOC_UPSERT)
        .u128(0xB16)
        .name(b"big")
        .u64(0)
        .u64(0)
        .u64(1_000_000)
        .build();
    let levels: Vec<(u8, u32)> = (0..64).map(|i| (1, i)).collect();
    let one_pid = RawFrame::new(0).pid(&levels).build()[1..].to_vec();
    let out = flood(server.addr(), prefix, one_pid, 40 << 20).await;
    let e = out.error();
    assert_eq!(e.code, ErrorCode::LIMIT_EXCEEDED, "{e:?}");
    assert!(
        e.message.contains("max_frame_bytes")
            && e.message.replace([',', '_'], "").contains("33554432"),
        "the message names the limit and its value (section 4): {:?}",
        e.message
    );
    assert!(out.closed_after, "limit_exceeded closes the connection");
    by.check("a 40 MiB frame").await;
    // Nothing of it was applied.
    let mut c = server.connect().await;
    let err = c.try_pull(0xB16, 0).await.expect_err("no such document");
    assert_eq!(err.code, ErrorCode::UNKNOWN_DOCUMENT);
}
