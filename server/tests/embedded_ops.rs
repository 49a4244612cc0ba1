//! An embedded server's operations surface: `Config::metrics` with
//! `Server::metrics_addr`, and the admin socket `Server::admin_socket`
//! (its own test binary: the metrics are process-wide).

use std::time::Duration;

use notesync_server::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("reply in time")
        .expect("read");
    String::from_utf8(out).expect("UTF-8 reply")
}

fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
        .parse()
        .expect("a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_server_serves_metrics_and_the_admin_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new(dir.path()).listen("127.0.0.1:0");
    config.metrics = Some("127.0.0.1:0".into());
    config.shutdown_timeout = Duration::from_secs(5);
    let server = Server::bind(config).await.expect("bind");
    let metrics = server.metrics_addr().expect("a metrics address");
    assert_ne!(metrics.port(), 0);
    let socket = server.admin_socket().expect("an admin socket").to_owned();
    assert_eq!(socket, dir.path().join("admin.sock"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the admin socket is the server user's only"
        );
    }
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));

    let before = http_get(metrics, "/metrics").await;
    assert!(before.starts_with("HTTP/1.1 200 OK\r\n"), "{before}");
    let accepted = value(&before, "notesync_connections_accepted_total");
    // A connection that says nothing still counts as accepted.
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(&[0xff]).await.expect("write");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut sink)).await;
    let after = http_get(metrics, "/metrics").await;
    assert!(value(&after, "notesync_connections_accepted_total") > accepted);
    assert!(value(&after, "notesync_received_bytes_total") >= 1.0);
    assert!(
        value(
            &after,
            "notesync_error_frames_total{code=\"unknown_frame\"}"
        ) >= 1.0,
        "{after}"
    );
    let missing = http_get(metrics, "/other").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("stops in bounded time")
        .expect("task")
        .expect("clean shutdown");
    assert!(
        !socket.exists(),
        "a clean shutdown removes the admin socket"
    );
}
