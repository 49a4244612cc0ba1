//! The server process as an operator runs it: SIGTERM stops it cleanly
//! even when nobody reads its output any more (a log collector that died).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use notesync_tests::server::{STOP_TIMEOUT, die_with_parent, wait_timeout};
use notesync_tests::{Conn, server_binary};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_server_even_when_nobody_reads_its_output() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(server_binary());
    cmd.args(["--listen", "127.0.0.1:0", "--data"])
        .arg(tmp.path().join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().expect("spawn the server");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    // The line comes at once, or the process exits (EOF): never a hang.
    out.read_line(&mut line).expect("read stdout");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first stdout line: {line:?}"))
        .parse()
        .expect("an address");
    // The output's reader goes away.
    drop(out);
    drop(child.stderr.take());

    // A client is served (and leaves) before the stop.
    let mut c = Conn::connect(addr).await;
    c.hello(1).await;
    assert_eq!(c.synclist(0).await, vec![]);
    c.shutdown_write().await;
    c.expect_closed().await;

    // SAFETY: kill(2) on our own unreaped child.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let status = wait_timeout(&mut child, STOP_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status = status.unwrap_or_else(|| {
        panic!(
            "the server did not exit within {STOP_TIMEOUT:?} of SIGTERM once its \
             stdout/stderr had no reader"
        )
    });
    assert!(status.success(), "clean exit after SIGTERM, got {status}");
}
