//! Tokens and namespaces (issue #7): the namespace matrix. Two tenants,
//! read-write and read-only tokens, no token, a wrong token and a revoked
//! one; every frame type tried across a boundary is refused or lands in
//! the sender's own namespace, never in another's.
//!
//! Tokens are made with the real `notesync-server token` subcommands, on
//! the data folder of a real server process.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use notesync_protocol::{ClientFrame, ErrorCode, ServerFrame};
use notesync_tests::{
    Conn, Event, ServerProcess, atom, describe, model_of, server_binary, token_command,
};

fn token_cmd(data: &Path, args: &[&str]) -> String {
    token_command(data, args)
}

/// A new token (the line `token add` prints) and its id.
fn add_token(data: &Path, namespace: &str, read_only: bool) -> (String, String) {
    let mut args = vec!["add", "--namespace", namespace];
    if read_only {
        args.push("--read-only");
    }
    let token = token_cmd(data, &args).trim().to_owned();
    let id = token
        .strip_prefix("nst_")
        .and_then(|r| r.split('_').next())
        .unwrap_or_else(|| panic!("unexpected token format: {token:?}"))
        .to_owned();
    (token, id)
}

async fn authed(server: &ServerProcess, token: &str, replica: u128, label: &str) -> Conn {
    let mut c = server.connect().await.with_label(label);
    c.hello_with_token(replica, token.as_bytes()).await;
    c
}

/// The next frame must be a closing error with `code`, then the close.
async fn refused(c: &mut Conn, code: ErrorCode) {
    c.expect_closing_error(code).await;
}

/// Waits until the connection ends with an `unauthorized` frame.
async fn ended_unauthorized(c: &mut Conn, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_event_within(left).await {
            Event::Frame(ServerFrame::Error(e)) => {
                assert_eq!(
                    e.code,
                    ErrorCode::UNAUTHORIZED,
                    "{}: {}",
                    c.label(),
                    e.message
                );
                c.expect_closed().await;
                return;
            }
            // A session may still get broadcasts or acks before the end.
            Event::Frame(_) => continue,
            other => panic!(
                "{}: expected an unauthorized error within {within:?}, got {other:?}",
                c.label()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_are_isolated_and_tokens_are_enforced() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (alice_rw, _) = add_token(&data, "alice", false);
    let (alice_ro, _) = add_token(&data, "alice", true);
    let (bob_rw, _) = add_token(&data, "bob", false);
    let (bob_doomed, bob_doomed_id) = add_token(&data, "bob", false);
    let listed = token_cmd(&data, &["list"]);
    for secret in [&alice_rw, &alice_ro, &bob_rw] {
        assert!(
            !listed.contains(&secret[21..]),
            "list shows a secret: {listed}"
        );
    }
    let stored = std::fs::read_to_string(data.join("tokens")).unwrap();
    assert!(
        !stored.contains(&alice_rw[21..]),
        "a secret stored in plain text"
    );
    // Many failures on purpose below: keep this test clear of the budget
    // (its own test checks it).
    let server = ServerProcess::try_start_with(&data, &["--max-failed-auth", "1000"])
        .unwrap_or_else(|e| panic!("{e}"));

    // Alice writes a document and keeps a session on it.
    let doc = 0xA11CE;
    let mut a = authed(&server, &alice_rw, 0xA, "alice-rw").await;
    let (_, s) = a.upsert(doc, "alice's", 0, &[], &[]).await;
    let (_, s) = a
        .upsert(
            doc,
            "alice's",
            s.sync_time,
            &[atom("secret plans", 1, s.site)],
            &[],
        )
        .await;
    let alice_site = s.site;
    let mut a_sess = authed(&server, &alice_rw, 0xA, "alice-session").await;
    let (_, started) = a_sess.session_start(0, doc).await;
    assert_eq!(started.site, alice_site);

    // Bob sees nothing of it: not in synclist, not by pull, even knowing
    // the id.
    let mut b = authed(&server, &bob_rw, 0xB, "bob-rw").await;
    assert!(
        b.synclist_all(0).await.is_empty(),
        "bob lists alice's document"
    );
    let e = b
        .try_pull(doc, 0)
        .await
        .expect_err("bob pulled alice's document");
    assert_eq!(e.code, ErrorCode::UNKNOWN_DOCUMENT);
    // A session on the id is bob's own (empty) document, not alice's.
    let mut b_sess = authed(&server, &bob_rw, 0xB, "bob-session").await;
    let (parts, _) = b_sess.session_start(0, doc).await;
    assert_eq!(
        model_of(doc, &parts).text(),
        "",
        "bob's session got alice's atoms"
    );
    // An upsert and deletes at alice's ids create bob's own document.
    let (_, bs) = b.upsert(doc, "bob's", 0, &[], &[]).await;
    let alice_atom = atom("secret plans", 1, alice_site);
    let (parts, _) = b
        .upsert(
            doc,
            "bob's",
            0,
            &[atom("bob text", 2, bs.site)],
            &[alice_atom.pid().clone()],
        )
        .await;
    let bob_view = model_of(doc, &parts);
    assert!(!bob_view.text().contains("secret"), "{}", bob_view.text());
    let (parts, _) = b.pull(doc, 0).await;
    assert_eq!(model_of(doc, &parts).text(), "bob text");
    // Alice's document is untouched; her session saw nothing of bob.
    let (parts, _) = a.pull(doc, 0).await;
    assert_eq!(model_of(doc, &parts).text(), "secret plans");
    assert_eq!(parts[0].name.as_str(), "alice's");
    match a_sess.next_event_within(Duration::from_millis(300)).await {
        Event::Timeout => {}
        other => panic!("alice's session got something from bob's namespace: {other:?}"),
    }
    // Alice's listing has only her own change.
    let list = a.synclist_all(0).await;
    assert_eq!(list.len(), 1);

    // Read-only: list, pull and watch; every write refused, the connection
    // stays open.
    let mut ro = authed(&server, &alice_ro, 0xC, "alice-ro").await;
    assert_eq!(ro.synclist_all(0).await.len(), 1);
    let (parts, sync) = ro.pull(doc, 0).await;
    assert_eq!(model_of(doc, &parts).text(), "secret plans");
    assert_eq!(sync.site, 0, "a read-only connection gets no site");
    let e = ro
        .try_upsert(doc, "renamed", sync.sync_time, &[atom("x", 9, 9)], &[])
        .await
        .expect_err("a read-only upsert was applied");
    assert_eq!(e.code, ErrorCode::READ_ONLY, "{}", e.message);
    let e = ro
        .try_upsert(0xFEED, "new", 0, &[], &[])
        .await
        .expect_err("a read-only token created a document");
    assert_eq!(e.code, ErrorCode::READ_ONLY);
    ro.send(ClientFrame::DeleteDoc { doc }).await;
    ro.expect_error(ErrorCode::READ_ONLY).await;
    ro.pull(doc, 0).await;
    let mut ro_sess = authed(&server, &alice_ro, 0xC, "alice-ro-session").await;
    let (_, ro_started) = ro_sess.session_start(0, doc).await;
    assert_eq!(ro_started.site, 0);
    a_sess
        .send(ClientFrame::Insert(notesync_protocol::SessionInsert::new(
            atom(" and more", 2, alice_site),
        )))
        .await;
    match ro_sess.recv().await {
        ServerFrame::Insert(i) => assert_eq!(i.atom.data(), " and more"),
        other => panic!(
            "the read-only watcher missed a broadcast: {}",
            describe(&other)
        ),
    }
    // Every session edit is refused (and acknowledged, so the client's
    // pending count drains), the session stays open.
    ro_sess
        .send(ClientFrame::Insert(notesync_protocol::SessionInsert::new(
            atom("nope", 1, 7),
        )))
        .await;
    ro_sess.rename("nope").await;
    // Each refusal comes before the (cumulative) ack that counts it.
    let mut refused_ops = 0;
    loop {
        match ro_sess.recv().await {
            ServerFrame::Error(e) => {
                assert_eq!(e.code, ErrorCode::READ_ONLY, "{}", e.message);
                refused_ops += 1;
            }
            ServerFrame::SessionAck { count } => {
                assert!(
                    refused_ops as u64 >= count,
                    "op {count} acked before its refusal"
                );
                if count == 2 {
                    break;
                }
            }
            other => panic!("read-only session: unexpected {}", describe(&other)),
        }
    }
    let (parts, _) = a.pull(doc, 0).await;
    assert_eq!(model_of(doc, &parts).text(), "secret plans and more");
    assert_eq!(parts[0].name.as_str(), "alice's");

    // No token, a wrong token, a malformed token, no hello: refused.
    let mut c = server.connect().await.with_label("no-hello");
    c.send(ClientFrame::Synclist { since: 0 }).await;
    refused(&mut c, ErrorCode::UNAUTHORIZED).await;
    for (label, token) in [
        ("empty-token", String::new()),
        (
            "wrong-token",
            format!("nst_{}_{}", "0".repeat(16), "1".repeat(64)),
        ),
        ("garbage-token", "hunter2".to_owned()),
        // Alice's id with another secret.
        (
            "forged-token",
            format!("{}{}", &alice_rw[..21], "f".repeat(64)),
        ),
    ] {
        let mut c = server.connect().await.with_label(label);
        c.send(ClientFrame::Hello(
            notesync_protocol::Hello::new(0xD, bytes::Bytes::from(token)).unwrap(),
        ))
        .await;
        refused(&mut c, ErrorCode::UNAUTHORIZED).await;
    }

    // Before authentication, frames are small: a big first frame is cut
    // off by the pre-auth limit, not read whole.
    let mut c = server.connect().await.with_label("big-first-frame");
    let big =
        notesync_tests::upsert_frame(0x1, "x", 0, &vec![atom(&"y".repeat(200), 1, 1); 20], &[]);
    let _ = c.try_send(big).await;
    let e = c.expect_closing_error(ErrorCode::LIMIT_EXCEEDED).await;
    assert!(
        e.message.contains("512"),
        "the message names the limit: {}",
        e.message
    );

    // Revoking a token closes its live connections, in sync and session
    // mode, and it no longer opens new ones.
    let mut doomed_sync = authed(&server, &bob_doomed, 0xE, "doomed-sync").await;
    doomed_sync.synclist_all(0).await;
    let mut doomed_sess = authed(&server, &bob_doomed, 0xE, "doomed-session").await;
    doomed_sess.session_start(0, doc).await;
    token_cmd(&data, &["revoke", &bob_doomed_id]);
    ended_unauthorized(&mut doomed_sync, Duration::from_secs(10)).await;
    ended_unauthorized(&mut doomed_sess, Duration::from_secs(10)).await;
    let mut c = server.connect().await.with_label("revoked");
    c.send(ClientFrame::Hello(
        notesync_protocol::Hello::new(0xE, bytes::Bytes::from(bob_doomed.clone())).unwrap(),
    ))
    .await;
    refused(&mut c, ErrorCode::UNAUTHORIZED).await;
    // The other tokens still work; bob's document is intact.
    let (parts, _) = b.pull(doc, 0).await;
    assert_eq!(model_of(doc, &parts).text(), "bob text");

    // Bob deleting "his" copy of the id deletes only his.
    let bob_doc2 = 0xB0B;
    b.upsert(bob_doc2, "bob's other", 0, &[], &[]).await;
    let (_, alice_other) = a.upsert(bob_doc2, "alice's other", 0, &[], &[]).await;
    b.send(ClientFrame::DeleteDoc { doc: bob_doc2 }).await;
    match b.recv().await {
        ServerFrame::DocDeleted { doc: d, .. } => assert_eq!(d, bob_doc2),
        other => panic!("bob's doc_delete: {}", describe(&other)),
    }
    let (parts, _) = a.pull(bob_doc2, 0).await;
    assert_eq!(parts[0].name.as_str(), "alice's other");
    assert!(
        a.synclist_all(alice_other.sync_time).await.is_empty(),
        "bob's deletion shows in alice's listing"
    );

    // Namespaces survive a restart, still apart.
    let mut server = server;
    server.restart();
    let mut a = authed(&server, &alice_rw, 0xA, "alice-after-restart").await;
    let (parts, _) = a.pull(doc, 0).await;
    assert_eq!(model_of(doc, &parts).text(), "secret plans and more");
    let mut b = authed(&server, &bob_rw, 0xB, "bob-after-restart").await;
    let (parts, _) = b.pull(doc, 0).await;
    assert_eq!(model_of(doc, &parts).text(), "bob text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_use_up_a_per_address_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (good, _) = add_token(&data, "carol", false);
    let server = ServerProcess::try_start_with(&data, &["--max-failed-auth", "3"])
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..3 {
        let mut c = server.connect().await.with_label(format!("bad-{i}"));
        c.send(ClientFrame::Hello(
            notesync_protocol::Hello::new(1, bytes::Bytes::from_static(b"wrong")).unwrap(),
        ))
        .await;
        refused(&mut c, ErrorCode::UNAUTHORIZED).await;
    }
    // Now even a good token from this address is refused, at once.
    let mut c = server.connect().await.with_label("after-budget");
    // The refusal may already be on its way: a failed send is fine.
    let _ = c
        .try_send(ClientFrame::Hello(
            notesync_protocol::Hello::new(1, bytes::Bytes::from(good.clone())).unwrap(),
        ))
        .await;
    let e = c.expect_closing_error(ErrorCode::UNAUTHORIZED).await;
    assert!(
        e.message.contains("too many failed") && e.message.contains("max_failed_auth 3"),
        "{}",
        e.message
    );
}

#[test]
fn without_tokens_the_server_refuses_a_non_loopback_address() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(server_binary())
        .args(["--listen", "0.0.0.0:0", "--data"])
        .arg(tmp.path())
        .output()
        .expect("run the server");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without authentication") && err.contains("token add"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_namespace_holds_what_was_written_without_tokens() {
    let mut server = ServerProcess::start();
    let doc = 0xDEF;
    let mut c = server.connect().await;
    c.hello(1).await;
    let (_, s) = c.upsert(doc, "before tokens", 0, &[], &[]).await;
    c.upsert(
        doc,
        "before tokens",
        s.sync_time,
        &[atom("old note", 1, s.site)],
        &[],
    )
    .await;
    drop(c);
    server.terminate();
    let data = server.data_dir().to_owned();
    let (token, _) = add_token(&data, "default", false);
    let (other, _) = add_token(&data, "zed", false);
    server.restart();
    // Tokens exist now: no hello, no entry.
    let mut c = server.connect().await;
    c.send(ClientFrame::Synclist { since: 0 }).await;
    c.expect_closing_error(ErrorCode::UNAUTHORIZED).await;
    let mut c = authed(&server, &token, 1, "default").await;
    let (parts, _) = c.pull(doc, 0).await;
    assert_eq!(model_of(doc, &parts).text(), "old note");
    let mut z = authed(&server, &other, 2, "zed").await;
    assert!(z.synclist_all(0).await.is_empty());
}
