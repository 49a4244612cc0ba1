//! Runs on the wire (PROTOCOL.md 1.5): the bytes of a full pull of a
//! document typed forward, one char per op through a session, as version 3
//! (37s with runs) against version 2 (33s with one atom per char), from the
//! real server binary.
//!
//! The ids are the ones the version-3 allocation rule makes for a forward
//! run (PROTOCOL.md section 1: `[(s, f)]`, `[(s, f + 1)]`, ...), written
//! here directly so the figure depends on the wire format alone. Prints the
//! figures; run with `--nocapture` to see them:
//! `cargo test -p notesync-tests --test runs_wire -- --nocapture`.

use notesync_protocol::{Atom, ClientFrame, Level, Pid, ServerFrame, SessionInsert};
use notesync_tests::{Conn, ServerProcess};

/// 100,000 chars (100 KB of ASCII), one 65 each.
const CHARS: u32 = 100_000;

/// The bytes of every 33/37 of a full pull on a connection of `version`,
/// and the text they hold.
async fn full_pull(addr: std::net::SocketAddr, doc: u128, version: u8) -> (usize, String) {
    let mut c = Conn::connect(addr).await;
    c.hello_version(7_000 + u128::from(version), &[], version)
        .await;
    c.send(ClientFrame::Pull { doc, since: 0 }).await;
    let mut bytes = 0;
    let mut atoms: Vec<(Pid, String)> = Vec::new();
    loop {
        let f = c.recv().await;
        match &f {
            ServerFrame::DocResponse(r) => {
                assert!(version < 3, "a version-3 connection gets 37s");
                atoms.extend(
                    r.inserts
                        .iter()
                        .map(|a| (a.pid.to_pid(), a.data.to_owned())),
                );
            }
            ServerFrame::DocResponseRuns(r) => {
                assert!(version >= 3, "a version {version} connection gets 33s");
                atoms.extend(r.inserts.atoms().map(|(d, p)| (p, d.to_owned())));
            }
            ServerFrame::DocSync { .. } => break,
            other => panic!("expected 33/37 then 34, got {other:?}"),
        }
        // Decoded frames re-encode to exactly their bytes.
        bytes += f.to_bytes().len();
    }
    atoms.sort();
    (bytes, atoms.into_iter().map(|(_, d)| d).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_typed_document_pulls_as_runs() {
    let server = ServerProcess::start();
    let doc = 0x5eed_0000_0000_0000_0000_0000_0000_0001;
    let mut w = Conn::connect(server.addr()).await;
    w.hello_version(1, &[], 2).await;
    let (_, started) = w.session_start(0, doc).await;
    let site = started.site;
    assert_ne!(site, 0);
    // Site 1's region starts at 255 (PROTOCOL.md section 1); a new run
    // starts in the middle of its room.
    let first = 1u32 << 28;
    let text: String = (0..CHARS)
        .map(|j| (b'a' + (j % 26) as u8) as char)
        .collect();
    let frames: Vec<ClientFrame> = text
        .chars()
        .zip(0..)
        .map(|(c, j)| {
            let pid = Pid::from_levels(&[Level::new(first + j, site)]);
            ClientFrame::Insert(SessionInsert::new(
                Atom::new(c.to_string(), pid).expect("atom"),
            ))
        })
        .collect();
    for chunk in frames.chunks(1000) {
        w.send_many(chunk.iter().cloned()).await;
    }
    // Every op acked: all of it is stored.
    loop {
        match w.recv().await {
            ServerFrame::SessionAck { count } if count == u64::from(CHARS) => break,
            ServerFrame::SessionAck { .. } => {}
            other => panic!("expected acks, got {other:?}"),
        }
    }
    let (v2, text2) = full_pull(server.addr(), doc, 2).await;
    let (v3, text3) = full_pull(server.addr(), doc, 3).await;
    assert_eq!(text2, text);
    assert_eq!(text3, text);
    let ratio = v2 as f64 / v3 as f64;
    println!(
        "full pull of {CHARS} chars typed forward: version 2 {v2} bytes ({:.2} per char), \
         version 3 {v3} bytes ({:.3} per char): {ratio:.1}x smaller",
        v2 as f64 / f64::from(CHARS),
        v3 as f64 / f64::from(CHARS)
    );
    // One run per 65,535 bytes of text: its text plus a few dozen bytes.
    assert!(
        v3 < text.len() + 1_000,
        "a forward run costs about its text on the wire: {v3} bytes for {} bytes of text",
        text.len()
    );
    // Version 2: 8 bytes per char (length, char, a one-level id).
    assert!(v2 > 7 * v3, "version 2: {v2} bytes, version 3: {v3}");
}
