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
        Case {
            name: "unknown header 4 (sync range, not a frame)",
            bytes: vec![4, 0, 0, 0],
            half_close: false,
            replies: &[],
            code: ErrorCode::UNKNOWN_FRAME,
            limit: None,
        },
        Case {
            name: "server-only header 33 sent by a client",
            bytes: vec![header::SYNC_DOC_RESPONSE, 0, 0],
            half_close: false,
            replies: &[],
            code: ErrorCode::UNKNOWN_FRAME,
            limit: None,
        },
        Case {
            name: "server-only header 97 welcome sent by a client",
            bytes: vec![header::WELCOME, 1],
            half_close: false,
            replies: &[],
            code: ErrorCode::UNKNOWN_FRAME,
            limit: None,
        },
        Case {
            name: "error header 127 sent by a client",
            bytes: vec![header::ERROR, 1, 0, 0],
            half_close: false,
            replies: &[],
            code: ErrorCode::UNKNOWN_FRAME,
            limit: None,
        },
        Case {
            name: "reserved header 200",
            bytes: vec![200],
            half_close: false,
            replies: &[],
            code: ErrorCode::UNKNOWN_FRAME,
            limit: None,
        },
        Case {
            name: "unknown header after a valid synclist",
            bytes: cat(&[synclist(), vec![0x1F]]),
            half_close: false,
            replies: &[header::SYNCLIST_RESPONSE],
            code: ErrorCode::UNKNOWN_FRAME,
            limit: None,
        },
        Case {
            name: "invalid UTF-8 in a name",
            bytes: upsert_raw(&[b'o', 0xFF, 0xFE], list(0), list(0)),
            half_close: false,
            replies: &[],
            code: ErrorCode::MALFORMED,
            limit: None,
        },
        Case {
            name: "invalid UTF-8 in atom data (a split character)",
            bytes: upsert_raw(b"n", list(1).atom(&[b'a', 0xC3], &[(1, 1)]), list(0)),
            half_close: false,
            replies: &[],
            code: ErrorCode::MALFORMED,
            limit: None,
        },
        Case {
            name: "atom length 0",
            bytes: upsert_raw(b"n", list(1).atom(&[], &[(1, 1)]), list(0)),
            half_close: false,
            replies: &[],
            code: ErrorCode::MALFORMED,
            limit: None,
        },
        Case {
            name: "position id depth 0 in a delete",
            bytes: upsert_raw(b"n", list(0), list(1).u8(0)),
            half_close: false,
            replies: &[],
            code: ErrorCode::MALFORMED,
            limit: None,
        },
        Case {
            name: "position id depth 0 in an atom",
            bytes: upsert_raw(b"n", list(1).u8(1).bytes(b"a").u8(0), list(0)),
            half_close: false,
            replies: &[],
            code: ErrorCode::MALFORMED,
            limit: None,
        },
        Case {
            name: "last level with site 0",
            bytes: upsert_raw(b"n", list(0), list(1).pid(&[(3, 1), (0, 9)])),
            half_close: false,
            replies: &[],
            code: ErrorCode::MALFORMED,
            limit: None,
        },
        Case {
            name: "a name with no 0x0A within 256 bytes",
            bytes: RawFrame::new(header::SYNC_DOC_UPSERT)
                .u128(1)
                .bytes(&[b'a'; 300])
                .build(),
            half_close: false,
            replies: &[],
            code: ErrorCode::MALFORMED,
            limit: None,
        },
        Case {
            name: "session insert with site 0",
            bytes: cat(&[
                session_start(),
                RawFrame::new(header::SESSION_INSERT)
                    .u8(0)
                    .atom(b"a", &[(1, 1)])
                    .build(),
            ]),
            half_close: false,
            replies: &[header::SESSION_STARTED],
            code: ErrorCode::MALFORMED,
            limit: None,
        },
        Case {
            name: "session insert whose site differs from its atom's creator",
            bytes: cat(&[
                session_start(),
                RawFrame::new(header::SESSION_INSERT)
                    .u8(2)
                    .atom(b"a", &[(1, 1)])
                    .build(),
            ]),
            half_close: false,
            replies: &[header::SESSION_STARTED],
            code: ErrorCode::MALFORMED,
            limit: None,
        },
        Case {
            name: "connection closed in the middle of a frame",
            bytes: vec![header::SYNC_DOC_PULL, 0, 0, 0, 0],
            half_close: true,
            replies: &[],
            code: ErrorCode::MALFORMED,
            limit: None,
        },
        Case {
            name: "insert count u64::MAX",
            bytes: upsert_raw(b"n", list(u64::MAX), list(0)),
            half_close: false,
            replies: &[],
            code: ErrorCode::LIMIT_EXCEEDED,
            limit: Some(("max_items_per_frame", "1000000")),
        },
        Case {
            name: "delete count 1,000,001 (max_items_per_frame is 1,000,000)",
            bytes: upsert_raw(b"n", list(0), list(1_000_001)),
            half_close: false,
            replies: &[],
            code: ErrorCode::LIMIT_EXCEEDED,
            limit: Some(("max_items_per_frame", "1000000")),
        },
        Case {
            name: "position id depth 65 (max_pid_depth is 64)",
            bytes: upsert_raw(b"n", list(0), list(1).pid(&deep)),
            half_close: false,
            replies: &[],
            code: ErrorCode::LIMIT_EXCEEDED,
            limit: Some(("max_pid_depth", "64")),
        },
        Case {
            name: "position id depth 255 in a session delete",
            bytes: cat(&[session_start(), {
                let mut f = RawFrame::new(header::SESSION_DELETE).u8(0).u8(255);
                for i in 0..255u32 {
                    f = f.u8(1).bytes(&i.to_be_bytes());
                }
                f.build()
            }]),
            half_close: false,
            replies: &[header::SESSION_STARTED],
            code: ErrorCode::LIMIT_EXCEEDED,
            limit: Some(("max_pid_depth", "64")),
        },
        Case {
            name: "a 65 before any 64",
            bytes: frame(ok_insert.clone()),
            half_close: false,
            replies: &[],
            code: ErrorCode::WRONG_MODE,
            limit: None,
        },
        Case {
            name: "a 66 after hello, before any 64",
            bytes: cat(&[hello(1), frame(ok_delete.clone())]),
            half_close: false,
            replies: &[header::WELCOME],
            code: ErrorCode::WRONG_MODE,
            limit: None,
        },
        Case {
            name: "a 67 in sync mode",
            bytes: cat(&[synclist(), frame(ClientFrame::Rename(name_of("x")))]),
            half_close: false,
            replies: &[header::SYNCLIST_RESPONSE],
            code: ErrorCode::WRONG_MODE,
            limit: None,
        },
        Case {
            name: "a 64 in sync mode",
            bytes: cat(&[synclist(), session_start()]),
            half_close: false,
            replies: &[header::SYNCLIST_RESPONSE],
            code: ErrorCode::WRONG_MODE,
            limit: None,
        },
        Case {
            name: "a synclist in session mode",
            bytes: cat(&[session_start(), synclist()]),
            half_close: false,
            replies: &[header::SESSION_STARTED],
            code: ErrorCode::WRONG_MODE,
            limit: None,
        },
        Case {
            name: "a pull in session mode",
            bytes: cat(&[
                session_start(),
                frame(ClientFrame::Pull {
                    doc: 0x5E5,
                    since: 0,
                }),
            ]),
            half_close: false,
            replies: &[header::SESSION_STARTED],
            code: ErrorCode::WRONG_MODE,
            limit: None,
        },
        Case {
            name: "a second 64",
            bytes: cat(&[session_start(), session_start()]),
            half_close: false,
            replies: &[header::SESSION_STARTED],
            code: ErrorCode::WRONG_MODE,
            limit: None,
        },
        Case {
            name: "a second hello",
            bytes: cat(&[hello(1), hello(1)]),
            half_close: false,
            replies: &[header::WELCOME],
            code: ErrorCode::WRONG_MODE,
            limit: None,
        },
        Case {
            name: "a hello after a synclist",
            bytes: cat(&[synclist(), hello(1)]),
            half_close: false,
            replies: &[header::SYNCLIST_RESPONSE],
            code: ErrorCode::WRONG_MODE,
            limit: None,
        },
        Case {
            name: "a hello in session mode",
            bytes: cat(&[session_start(), hello(1)]),
            half_close: false,
            replies: &[header::SESSION_STARTED],
            code: ErrorCode::WRONG_MODE,
            limit: None,
        },
        Case {
            name: "hello with protocol version 3",
            bytes: hello(3),
            half_close: false,
            replies: &[],
            code: ErrorCode::UNSUPPORTED_VERSION,
            limit: None,
        },
        Case {
            name: "hello with protocol version 0",
            bytes: hello(0),
            half_close: false,
            replies: &[],
            code: ErrorCode::UNSUPPORTED_VERSION,
            limit: None,
        },
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
