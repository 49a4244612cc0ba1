//! TLS on the wrong port, seen from the server (PROTOCOL.md 2.1): a TLS
//! ClientHello on the plain listener, and a plain hello on the TLS
//! listener, each get one warning that names the peer, and a closing
//! `unknown_frame` error in the clear that says what is wrong.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use notesync_protocol::{ClientFrame, ErrorCode, Hello};
use notesync_tests::{Conn, ServerProcess};

/// The start of a TLS ClientHello record: handshake (0x16), record version
/// 3.1, length, then the ClientHello's type and length and version 3.3.
const CLIENT_HELLO: [u8; 11] = [
    0x16, 0x03, 0x01, 0x00, 0xf8, 0x01, 0x00, 0x00, 0xf4, 0x03, 0x03,
];

/// `text` without its ANSI colour sequences (the server's log colours its
/// field names even on a pipe).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The server's stderr line that contains `what` and names `peer`, once
/// it is there (bounded wait).
fn warning_for(server: &ServerProcess, what: &str, peer: SocketAddr) -> String {
    let peer = format!("peer={peer}");
    let start = Instant::now();
    loop {
        let err = plain(&server.stderr());
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.contains(what) && l.contains(&peer))
            .collect();
        if let [line] = lines[..] {
            return line.to_owned();
        }
        assert!(lines.len() < 2, "one warning per connection: {lines:?}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no line with {what:?} and {peer} in the server's stderr:\n{err}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `c` gets a closing unknown_frame whose message says `told`, and the
/// server logs one warning with `warned` naming `c`; that line.
async fn told_and_warned(server: &ServerProcess, mut c: Conn, told: &str, warned: &str) -> String {
    let e = c.expect_closing_error(ErrorCode::UNKNOWN_FRAME).await;
    assert!(e.message.contains(told), "{}", e.message);
    let line = warning_for(server, warned, c.local_addr());
    assert!(line.contains("WARN"), "{line}");
    line
}

#[tokio::test]
async fn a_client_hello_on_the_plain_listener_is_told_and_logged() {
    let server = ServerProcess::start();
    let mut c = server.connect().await;
    c.send_raw(&CLIENT_HELLO).await;
    let line = told_and_warned(
        &server,
        c,
        "this port does not speak TLS",
        "a TLS client on the plain listener",
    )
    .await;
    assert!(line.contains("--tls-cert"), "{line}");
}

#[tokio::test]
async fn a_plain_hello_on_the_tls_listener_is_told_and_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let server = ServerProcess::try_start_with(
        &tmp.path().join("data"),
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut c = server.connect().await;
    let hello = Hello::new(0x7115, Vec::new()).unwrap();
    c.send(ClientFrame::Hello(hello)).await;
    let line = told_and_warned(
        &server,
        c,
        "this port speaks TLS",
        "a plain client on the TLS listener",
    )
    .await;
    assert!(line.contains("first_byte=96"), "{line}");
}
