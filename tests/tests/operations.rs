//! Operating the server (issues 7 and 16): metrics and `/healthz` (on
//! hyper), systemd's `Type=notify`, `export`, `check`, `backup`, the admin
//! socket and `--config`, against the real binary.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notesync_protocol::{DocId, ErrorCode, Level, Pid, ServerFrame};
use notesync_tests::{Conn, ServerProcess, atom, describe, model_of, server_binary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `notesync-server ARGS` to completion (off the async workers).
async fn cli(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(server_binary())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run notesync-server")
    })
    .await
    .expect("cli task")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn shown(o: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

fn pid(levels: &[(u32, u8)]) -> Pid {
    let l: Vec<Level> = levels.iter().map(|&(i, s)| Level::new(i, s)).collect();
    Pid::from_levels(&l)
}

// ---------------------------------------------------------------- metrics

/// Sends `request` on a fresh connection to the metrics listener and
/// reads until the server closes it: (head, body).
async fn http(addr: SocketAddr, request: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics listener");
    s.write_all(request.as_bytes())
        .await
        .expect("send the request");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut reply))
        .await
        .expect("the request finishes")
        .expect("read the reply");
    let reply = text(&reply);
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    (head.to_owned(), body.to_owned())
}

/// Like [`http`], for requests the server may refuse: a failed write or
/// a reset counts as what was read until then (often nothing).
async fn attempt(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics listener");
    let _ = s.write_all(request).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut reply))
        .await
        .expect("the server answers or closes the connection");
    text(&reply)
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";

/// `GET path`, asking the server to close the connection after it.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Scrapes `GET /metrics`; returns the body after checking the status.
async fn scrape(addr: SocketAddr) -> String {
    let (head, body) = get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    body
}

/// The address of the server's `--metrics` listener, from its
/// `metrics on ADDR` line.
async fn metrics_addr(server: &ServerProcess) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = server.output();
        if let Some(addr) = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("metrics on "))
        {
            return addr.trim().parse().expect("a socket address");
        }
        assert!(
            Instant::now() < deadline,
            "no `metrics on ADDR` line:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Parses Prometheus / OpenMetrics text strictly: every line is a
/// `# HELP`, `# TYPE` or `# UNIT` comment, the final `# EOF`, or a sample
/// `name{labels} value` of a family declared by a `# TYPE` line. Returns
/// the samples by `name{labels}`.
fn parse_exposition(body: &str) -> BTreeMap<String, f64> {
    let mut families: HashMap<String, String> = HashMap::new();
    let mut samples = BTreeMap::new();
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "no final # EOF:\n{body}");
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, what) = (parts.next(), parts.next(), parts.next());
            let name = name.unwrap_or_else(|| panic!("comment without a name: {line}"));
            assert!(valid_name(name), "bad metric name in {line}");
            match kind {
                Some("TYPE") => {
                    let t = what.unwrap_or_default();
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "unknown",
                            "info"
                        ]
                        .contains(&t),
                        "bad type in {line}"
                    );
                    families.insert(name.to_owned(), t.to_owned());
                }
                Some("HELP") | Some("UNIT") => {}
                _ => panic!("unexpected comment line {line:?}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample without a value: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value is not a number: {line:?}"));
        let name = match series.split_once('{') {
            None => series,
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unterminated labels: {line:?}"));
                for pair in labels.split(',') {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label in {line:?}"));
                    assert!(valid_name(k), "bad label name in {line:?}");
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "label value not quoted in {line:?}"
                    );
                }
                name
            }
        };
        assert!(valid_name(name), "bad metric name in {line:?}");
        let family = ["_total", "_bucket", "_count", "_sum", "_created", "_info"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| families.contains_key(*f)))
            .unwrap_or(name);
        assert!(
            families.contains_key(family),
            "sample {line:?} has no # TYPE line"
        );
        samples.insert(series.to_owned(), value);
    }
    samples
}

fn sample(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_as_prometheus_text_and_move_with_load() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (server, metrics) = start_with_metrics(tmp.path()).await;

    let before = parse_exposition(&scrape(metrics).await);

    let mut c = server.connect().await;
    c.hello(0x51).await;
    let docs: Vec<DocId> = (1..=3).map(|i| 0xd0c0 + i).collect();
    for (i, &d) in docs.iter().enumerate() {
        let atoms: Vec<_> = (0..5).map(|j| atom(&format!("w{j}"), j + 1, 1)).collect();
        c.upsert(d, &format!("note {i}"), 0, &atoms, &[]).await;
    }
    // An error frame (unknown_document does not close the connection).
    c.send(notesync_protocol::ClientFrame::Pull {
        doc: 0xdead,
        since: 0,
    })
    .await;
    c.expect_error(ErrorCode::UNKNOWN_DOCUMENT).await;
    // A session, open while the second scrape runs.
    let mut s = server.connect().await;
    s.hello(0x52).await;
    let (_, started) = s.session_start(0, docs[0]).await;
    s.insert(atom("live", 100, started.site)).await;
    match s.recv().await {
        ServerFrame::SessionAck { .. } => {}
        other => panic!("expected the insert's ack, got {}", describe(&other)),
    }

    let after = parse_exposition(&scrape(metrics).await);
    for series in [
        "notesync_connections_accepted_total",
        "notesync_ops_committed_total",
        "notesync_write_requests_total",
        "notesync_commits_total",
        "notesync_commit_seconds_count",
        "notesync_commit_batch_requests_count",
        "notesync_received_bytes_total",
        "notesync_sent_bytes_total",
        "notesync_error_frames_total{code=\"unknown_document\"}",
    ] {
        assert!(
            sample(&after, series) > sample(&before, series),
            "{series} did not grow: {} then {}",
            sample(&before, series),
            sample(&after, series)
        );
    }
    // 3 upserts of 5 atoms and one session insert, at least.
    assert!(
        sample(&after, "notesync_ops_committed_total")
            - sample(&before, "notesync_ops_committed_total")
            >= 16.0
    );
    assert_eq!(sample(&after, "notesync_documents"), 3.0);
    assert_eq!(sample(&after, "notesync_namespaces_open"), 1.0);
    assert!(sample(&after, "notesync_sessions_open") >= 1.0);
    assert!(sample(&after, "notesync_connections_open") >= 2.0);
    assert_eq!(
        sample(&after, "notesync_error_frames_total{code=\"slow_reader\"}"),
        0.0
    );
    assert_eq!(
        sample(&after, "notesync_slow_reader_disconnects_total"),
        0.0
    );
    drop((c, s));
}

/// A server on a fresh data folder under `tmp`, with `--metrics` on port 0,
/// and that listener's address.
async fn start_with_metrics(tmp: &Path) -> (ServerProcess, SocketAddr) {
    let server = ServerProcess::try_start_with(&tmp.join("data"), &["--metrics", "127.0.0.1:0"])
        .unwrap_or_else(|e| panic!("server did not start: {e}"));
    let metrics = metrics_addr(&server).await;
    (server, metrics)
}

fn sigterm(pid: u32) {
    // SAFETY: kill(2) on our own child's pid, which we have not reaped.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill(SIGTERM) failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_200_while_serving_and_503_once_shutdown_begins() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut server, metrics) = start_with_metrics(tmp.path()).await;
    let (head, body) = get(metrics, "/healthz").await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(body, "ok\n");

    // An admin connection that has not sent its request line holds the
    // shutdown open (the server waits up to 10 s for the line), so the
    // draining server can be asked how it is.
    let admin = tokio::net::UnixStream::connect(tmp.path().join("data/admin.sock"))
        .await
        .expect("connect to the admin socket");
    // Accepted by the admin listener before the signal stops it accepting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(server.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (head, body) = get(metrics, "/healthz").await;
        if head.starts_with("HTTP/1.1 503 Service Unavailable") {
            assert_eq!(body, "shutting down\n");
            break;
        }
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(
            Instant::now() < deadline,
            "/healthz never said 503 after SIGTERM\n{}",
            server.output()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Scrapes still answer while it drains.
    scrape(metrics).await;
    drop(admin);
    assert!(server.terminate().success());
    // The listener let go of the namespaces before they were closed.
    let out = server.output();
    assert!(out.contains("databases closed"), "{out}");
    assert!(!out.contains("namespaces still referenced"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_answers_404_405_and_keeps_connections_alive() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_server, metrics) = start_with_metrics(tmp.path()).await;
    let (head, _) = get(metrics, "/nope").await;
    assert!(head.starts_with("HTTP/1.1 404 Not Found"), "{head}");
    let (head, _) = http(
        metrics,
        "POST /metrics HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert!(
        head.starts_with("HTTP/1.1 405 Method Not Allowed"),
        "{head}"
    );
    assert!(head.to_ascii_lowercase().contains("allow: get"), "{head}");
    // Two requests on one connection, the second answered too.
    let (head, body) = http(
        metrics,
        "GET /healthz HTTP/1.1\r\nHost: test\r\n\r\nGET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(body.contains("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("# EOF"), "{body}");
    // A request head past the bound is refused, not read on.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: test\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    // The server may close before taking it all; what it answered counts.
    let reply = attempt(metrics, big.as_bytes()).await;
    assert!(
        reply.starts_with("HTTP/1.1 431"),
        "an oversized head got {reply:?}"
    );
}

/// A connection that has sent `start` of a request head, and no more.
async fn half_head(addr: SocketAddr, start: &[u8]) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics listener");
    s.write_all(start).await.expect("send part of a head");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_metrics_client_neither_blocks_a_scrape_nor_stays_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_server, metrics) = start_with_metrics(tmp.path()).await;
    let mut slow = half_head(metrics, b"GET /metrics HTTP/1.1\r\nHost: te").await;
    parse_exposition(&scrape(metrics).await);
    // The server closes it (its head timeout) without answering it.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut rest))
        .await
        .expect("the slow client is closed by the server");
    assert!(
        read.is_err() || !text(&rest).contains("200 OK"),
        "a half head was answered: {rest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_closes_connections_past_its_bound() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_server, metrics) = start_with_metrics(tmp.path()).await;
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(half_head(metrics, b"GET /metrics HTTP/1.1\r\n").await);
    }
    // The 65th is accepted after those 64 and closed unanswered.
    let reply = attempt(metrics, HEALTHZ).await;
    assert!(
        reply.is_empty(),
        "the 65th connection was answered: {reply:?}"
    );
    drop(held);
    // The permits come back: a scrape works again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if attempt(metrics, HEALTHZ)
            .await
            .starts_with("HTTP/1.1 200 OK")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no scrape after the held connections closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- systemd

#[test]
fn systemd_hears_ready_after_the_listening_line_and_stopping_on_sigterm() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;
    let tmp = tempfile::tempdir().expect("tempdir");
    let socket = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&socket).expect("bind the notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut child = Command::new(server_binary())
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data")
        .arg(tmp.path().join("data"))
        .env("NOTIFY_SOCKET", &socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the server");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 within 20 s");
    assert_eq!(text(&buf[..n]), "READY=1");
    // The listening line was written before READY=1, so it is in the pipe
    // now: read it without waiting.
    // SAFETY: fcntl(2) on a pipe this test owns.
    let rc = unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    assert_eq!(rc, 0, "fcntl(O_NONBLOCK) failed");
    let mut out = [0u8; 1024];
    let n = stdout
        .read(&mut out)
        .expect("the listening line is already written");
    assert!(
        text(&out[..n]).starts_with("listening on "),
        "{:?}",
        text(&out[..n])
    );
    sigterm(child.id());
    let n = notify.recv(&mut buf).expect("STOPPING=1 within 20 s");
    assert_eq!(text(&buf[..n]), "STOPPING=1");
    let status = notesync_tests::server::wait_timeout(&mut child, Duration::from_secs(20))
        .expect("the server exits after SIGTERM");
    assert!(status.success(), "{status}");
}

// ---------------------------------------------------------------- export

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_prints_a_documents_text_with_the_server_running_and_stopped() {
    let mut server = ServerProcess::start();
    let data = server.data_dir().to_owned();
    let mut c = server.connect().await;
    c.hello(0x61).await;
    let doc: DocId = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
    let atoms = [
        atom("hello", 10, 1),
        atom(" ", 20, 1),
        atom("wörld", 30, 1),
        atom("!", 40, 1),
    ];
    // The 'e' of "hello" (its virtual id, PROTOCOL.md 1.2) and all of
    // "wörld" are deleted.
    let deletes = [pid(&[(10, 1), (1, 1)]), pid(&[(30, 1)])];
    c.upsert(doc, "greeting", 0, &atoms, &deletes).await;
    let (rs, _) = c.pull(doc, 0).await;
    assert_eq!(model_of(doc, &rs).live().len(), 3);
    drop(c);

    let id = format!("{doc:032x}");
    let running = cli(&["export", "--doc", &id, "--data", path_str(&data)]).await;
    assert!(running.status.success(), "{}", shown(&running));
    assert_eq!(text(&running.stdout), "hllo !");

    let missing = cli(&["export", "--doc", "abc", "--data", path_str(&data)]).await;
    assert!(!missing.status.success(), "{}", shown(&missing));
    assert!(
        text(&missing.stderr).contains("no document 00000000000000000000000000000abc"),
        "{}",
        shown(&missing)
    );

    server.terminate();
    assert!(
        !data.join("admin.sock").exists(),
        "a clean shutdown removes the admin socket"
    );
    let stopped = cli(&["export", "--doc", &id, "--data", path_str(&data)]).await;
    assert!(stopped.status.success(), "{}", shown(&stopped));
    assert_eq!(text(&stopped.stdout), "hllo !");
    let ns = cli(&[
        "export",
        "--doc",
        &id,
        "--namespace",
        "nope",
        "--data",
        path_str(&data),
    ])
    .await;
    assert!(!ns.status.success(), "{}", shown(&ns));
    assert!(
        text(&ns.stderr).contains("no namespace \"nope\""),
        "{}",
        shown(&ns)
    );
}

// ---------------------------------------------------------------- check

/// Writes a chunk (with its index entry) for a document that does not
/// exist, straight into the (stopped) server's database.
fn corrupt(data: &Path) {
    const CHUNKS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("chunks");
    const CHUNK_TIMES: redb::TableDefinition<&[u8], ()> = redb::TableDefinition::new("chunk_times");
    let db = redb::Database::open(data.join("notesync.redb")).expect("open the database");
    let txn = db.begin_write().expect("write");
    {
        let doc = 0xbad_u128.to_be_bytes();
        // The document's first chunk (key: the document alone), changed at
        // time 5: one run of one live char 'x' at [(1, 1)] inserted at 5
        // (ARCHITECTURE.md, "Chunks"). Nothing else for the check to find.
        let mut value = 5u64.to_be_bytes().to_vec();
        value.extend_from_slice(&[0, 1, 1, 1, 1, 1, 1, 10, 1, b'x']);
        let mut chunks = txn.open_table(CHUNKS).expect("chunks");
        chunks
            .insert(doc.as_slice(), value.as_slice())
            .expect("insert");
        let mut index = txn.open_table(CHUNK_TIMES).expect("chunk_times");
        let mut key = doc.to_vec();
        key.extend_from_slice(&5u64.to_be_bytes());
        index.insert(key.as_slice(), ()).expect("insert");
    }
    txn.commit().expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_healthy_folder_and_reports_a_broken_one() {
    let mut server = ServerProcess::start();
    let data = server.data_dir().to_owned();
    let mut c = server.connect().await;
    c.hello(0x71).await;
    for d in 1..=4u128 {
        let atoms: Vec<_> = (0..10).map(|j| atom(&format!("t{j}"), j + 1, 1)).collect();
        let (_, s) = c.upsert(d, "n", 0, &atoms, &[]).await;
        c.upsert(d, "n", s.sync_time, &[], &[pid(&[(3, 1)])]).await;
    }
    drop(c);
    let running = cli(&["check", "--data", path_str(&data)]).await;
    assert!(running.status.success(), "{}", shown(&running));
    assert!(
        text(&running.stdout).contains("namespace default: 4 documents, 40 ids"),
        "{}",
        shown(&running)
    );

    server.terminate();
    let stopped = cli(&["check", "--data", path_str(&data)]).await;
    assert!(stopped.status.success(), "{}", shown(&stopped));
    assert_eq!(text(&stopped.stdout), text(&running.stdout));

    corrupt(&data);
    let broken = cli(&["check", "--data", path_str(&data)]).await;
    assert!(!broken.status.success(), "{}", shown(&broken));
    let out = text(&broken.stdout);
    assert!(out.contains("1 problem(s)"), "{}", shown(&broken));
    assert!(
        out.contains(
            "belongs to document 00000000000000000000000000000bad, which is not in documents"
        ),
        "{}",
        shown(&broken)
    );
    assert!(
        text(&broken.stderr).contains("1 problem"),
        "{}",
        shown(&broken)
    );

    // The same through a running server (the folder still serves).
    server.restart();
    let via_server = cli(&["check", "--data", path_str(&data)]).await;
    assert!(!via_server.status.success(), "{}", shown(&via_server));
    assert_eq!(text(&via_server.stdout), out);
}

// ---------------------------------------------------------------- backup

/// Creates a token for `namespace` in `data`; returns it.
async fn add_token(data: &Path, namespace: &str) -> String {
    let o = cli(&[
        "token",
        "add",
        "--namespace",
        namespace,
        "--data",
        path_str(data),
    ])
    .await;
    assert!(o.status.success(), "{}", shown(&o));
    text(&o.stdout).trim().to_owned()
}

/// Acknowledged upserts: (namespace, doc) → ids and data.
type Acked = Arc<Mutex<Vec<(String, DocId, Pid, String)>>>;

/// Upserts one atom at a time to three documents until `stop`, recording
/// each acknowledged one.
async fn write_load(
    addr: SocketAddr,
    namespace: &'static str,
    token: String,
    acked: Acked,
    stop: Arc<AtomicBool>,
) {
    let mut c = Conn::connect(addr).await.with_label(namespace);
    c.hello_with_token(0xab, token.as_bytes()).await;
    let mut since: HashMap<DocId, u64> = HashMap::new();
    let mut i: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let doc = 0x100 + DocId::from(i % 3);
        let a = atom(&format!("{namespace}-{i}"), i + 1, 1);
        let (_, s) = c
            .upsert(
                doc,
                "load",
                *since.get(&doc).unwrap_or(&0),
                std::slice::from_ref(&a),
                &[],
            )
            .await;
        since.insert(doc, s.sync_time);
        acked.lock().expect("acked").push((
            namespace.to_owned(),
            doc,
            a.pid().clone(),
            a.data().to_owned(),
        ));
        i += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_of_a_running_server_under_load_holds_every_acknowledged_op() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("data folder");
    let default_token = add_token(&data, "default").await;
    let team_token = add_token(&data, "team").await;
    let mut server =
        ServerProcess::try_start_in(&data).unwrap_or_else(|e| panic!("server did not start: {e}"));

    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = [
        tokio::spawn(write_load(
            server.addr(),
            "default",
            default_token.clone(),
            acked.clone(),
            stop.clone(),
        )),
        tokio::spawn(write_load(
            server.addr(),
            "team",
            team_token.clone(),
            acked.clone(),
            stop.clone(),
        )),
    ];
    // Some load first, in both namespaces.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (d, t) = {
            let a = acked.lock().expect("acked");
            (
                a.iter().filter(|x| x.0 == "default").count(),
                a.iter().filter(|x| x.0 == "team").count(),
            )
        };
        if d >= 50 && t >= 50 {
            break;
        }
        assert!(Instant::now() < deadline, "the load did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let dest = tmp.path().join("backup");
    let before: Vec<_> = acked.lock().expect("acked").clone();
    let started = Instant::now();
    let out = cli(&["backup", path_str(&dest), "--data", path_str(&data)]).await;
    let took = started.elapsed();
    let during = acked.lock().expect("acked").len() - before.len();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    assert!(out.status.success(), "{}", shown(&out));
    let report = text(&out.stdout);
    assert!(report.contains("namespace default:"), "{report}");
    assert!(report.contains("namespace team:"), "{report}");
    assert!(report.contains("tokens: copied"), "{report}");
    eprintln!(
        "backup of {} acknowledged atoms took {took:?}; {during} more were acknowledged meanwhile",
        before.len()
    );

    // A second backup into the same (now full) folder is refused.
    let again = cli(&["backup", path_str(&dest), "--data", path_str(&data)]).await;
    assert!(!again.status.success(), "{}", shown(&again));
    assert!(
        text(&again.stderr).contains("exists and is not an empty folder"),
        "{}",
        shown(&again)
    );

    // The copy is a data folder: a fresh server starts on it, with the
    // same tokens, and holds everything acknowledged before the backup.
    let mut restored = ServerProcess::try_start_in(&dest)
        .unwrap_or_else(|e| panic!("a server does not start on the backup: {e}"));
    for (namespace, token) in [("default", &default_token), ("team", &team_token)] {
        let mut c = restored.connect().await;
        c.hello_with_token(0xcd, token.as_bytes()).await;
        let mut live: HashMap<(DocId, Pid), String> = HashMap::new();
        for d in 0x100..0x103u128 {
            let (rs, _) = c.pull(d, 0).await;
            for (p, data) in model_of(d, &rs).live() {
                live.insert((d, p), data);
            }
        }
        let mut checked = 0;
        for (ns, d, p, data) in before.iter().filter(|x| x.0 == namespace) {
            assert_eq!(
                live.get(&(*d, p.clone())),
                Some(data),
                "namespace {ns}: the backup lacks acknowledged atom {p:?} of {d:#x}"
            );
            checked += 1;
        }
        assert!(checked >= 50);
    }
    let check = cli(&["check", "--data", path_str(&dest)]).await;
    assert!(check.status.success(), "{}", shown(&check));
    restored.terminate();
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_admin_socket_is_handled_by_the_commands_and_the_next_server() {
    let mut server = ServerProcess::start();
    let data = server.data_dir().to_owned();
    let mut c = server.connect().await;
    c.hello(0x81).await;
    c.upsert(7, "n", 0, &[atom("x", 1, 1)], &[]).await;
    drop(c);
    server.kill9();
    assert!(
        data.join("admin.sock").exists(),
        "SIGKILL leaves the socket"
    );
    // Nobody listens: the commands open the databases themselves.
    let dest = data.parent().expect("parent").join("offline-backup");
    let b = cli(&["backup", path_str(&dest), "--data", path_str(&data)]).await;
    assert!(b.status.success(), "{}", shown(&b));
    let e = cli(&["export", "--doc", "7", "--data", path_str(&dest)]).await;
    assert_eq!(text(&e.stdout), "x", "{}", shown(&e));
    // A folder that is not a data folder is an error, not an empty report.
    let none = cli(&["check", "--data", path_str(&dest.join("namespaces"))]).await;
    assert!(!none.status.success(), "{}", shown(&none));
    assert!(
        text(&none.stderr).contains("holds no notesync database"),
        "{}",
        shown(&none)
    );
    // A destination inside the data folder is refused.
    let inside = data.join("backups");
    let b = cli(&["backup", path_str(&inside), "--data", path_str(&data)]).await;
    assert!(!b.status.success(), "{}", shown(&b));
    assert!(
        text(&b.stderr).contains("inside the data folder"),
        "{}",
        shown(&b)
    );
    assert!(!inside.exists());
    // The next server replaces the stale socket and answers on it.
    server.restart();
    let e = cli(&["export", "--doc", "7", "--data", path_str(&data)]).await;
    assert!(e.status.success(), "{}", shown(&e));
    assert_eq!(text(&e.stdout), "x");
}

// ---------------------------------------------------------------- --config

fn start_with_config(config: &Path, extra: &[&str]) -> (std::process::Child, SocketAddr) {
    use std::io::BufRead;
    let mut child = Command::new(server_binary())
        .arg("--config")
        .arg(config)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the server");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read stdout");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("expected `listening on ADDR`, got {line:?}")
        })
        .parse()
        .expect("an address");
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_sets_serving_options_and_flags_override_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data: PathBuf = tmp.path().join("from-file");
    let config = tmp.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "# notesync-server settings\nlisten = \"127.0.0.1:1\"\ndata = {:?}\nmax_connections = 1\nidle_timeout = 60\n",
            path_str(&data)
        ),
    )
    .expect("write the config");
    // The flag wins over the file's listen (port 1 could not be bound).
    let (mut child, addr) = start_with_config(&config, &["--listen", "127.0.0.1:0"]);
    assert!(
        data.join("notesync.redb").exists(),
        "the file's data folder is used"
    );
    // The file's max_connections = 1: a second connection is busy.
    let mut first = Conn::connect(addr).await;
    first.hello(1).await;
    let mut second = Conn::connect(addr).await;
    second.expect_error(ErrorCode::SERVER_BUSY).await;
    drop((first, second));
    let _ = child.kill();
    let _ = child.wait();

    // An unknown key is an error that names it.
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nmax_conections = 5\n").expect("write");
    let o = cli(&["--config", path_str(&config)]).await;
    assert!(!o.status.success(), "{}", shown(&o));
    assert!(
        text(&o.stderr).contains("unknown key \"max_conections\""),
        "{}",
        shown(&o)
    );
    // A value of the wrong kind names its key too.
    std::fs::write(&config, "max_connections = \"many\"\n").expect("write");
    let o = cli(&["--config", path_str(&config)]).await;
    assert!(!o.status.success(), "{}", shown(&o));
    assert!(
        text(&o.stderr).contains("--max-connections"),
        "{}",
        shown(&o)
    );
}
