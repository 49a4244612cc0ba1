//! The `notesync-server` binary: the listening line, one server per data
//! folder, and a clean exit on SIGTERM/SIGINT.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use notesync_protocol::{ClientCodec, ClientFrame, ErrorCode, ServerFrame};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

fn spawn(dir: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_notesync-server"))
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn notesync-server")
}

/// Reads the `listening on ADDR` line.
fn listening(child: &mut Child) -> SocketAddr {
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("read stdout");
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .parse()
        .expect("address")
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} failed");
}

#[test]
fn second_server_on_the_same_folder_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut first = spawn(dir.path());
    let _addr = listening(&mut first);

    let mut second = spawn(dir.path());
    let status = wait_exit(&mut second, Duration::from_secs(20));
    assert!(!status.success(), "the second server must fail");
    let mut err = String::new();
    second
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(
        err.contains("already open") && err.contains("notesync.redb"),
        "unclear error: {err}"
    );

    signal(&first, "-INT");
    let status = wait_exit(&mut first, Duration::from_secs(20));
    assert!(status.success(), "SIGINT exits 0: {status:?}");
    // The database was closed cleanly: it opens again.
    let mut third = spawn(dir.path());
    let _ = listening(&mut third);
    signal(&third, "-TERM");
    assert!(wait_exit(&mut third, Duration::from_secs(20)).success());
}

#[tokio::test]
async fn sigterm_closes_connections_with_shutting_down_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut child = spawn(dir.path());
    let addr = listening(&mut child);
    let s = TcpStream::connect(addr).await.expect("connect");
    let mut c = Framed::new(s, ClientCodec::default());
    c.send(ClientFrame::Synclist { since: 0 })
        .await
        .expect("send");
    assert!(matches!(
        c.next().await,
        Some(Ok(ServerFrame::SynclistResponse(_)))
    ));
    signal(&child, "-TERM");
    match tokio::time::timeout(Duration::from_secs(10), c.next()).await {
        Ok(Some(Ok(ServerFrame::Error(e)))) => assert_eq!(e.code, ErrorCode::SHUTTING_DOWN),
        other => panic!("expected shutting_down, got {other:?}"),
    }
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(20)))
            .await
            .expect("join");
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
}
