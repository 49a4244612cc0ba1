//! Load tool for notesync-server.
//!
//! ```text
//! # durable ops/s: N sessions, each pipelining 65 inserts on its own document
//! cargo run --release -p notesync-server --example load -- sessions --sessions 10 --ops 200000
//! # the same, all sessions on one shared document (adds fan-out)
//! cargo run --release -p notesync-server --example load -- sessions --sessions 10 --ops 200000 --shared
//! # restart time with 100,000 documents (in-process bind, and the binary if given)
//! cargo run --release -p notesync-server --example load -- restart --docs 100000 \
//!     --binary target/release/notesync-server
//! ```
//!
//! Without `--addr` the server runs in this process (on a temporary data
//! folder), so the writer's batch sizes can be printed; with `--addr` it
//! drives an external server (whose log prints the same figures at exit).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use notesync_protocol::{
    Atom, AtomList, ClientCodec, ClientFrame, DocName, Hello, Level, Pid, PidList, ServerFrame,
    SessionInsert, Upsert,
};
use notesync_server::{Config, Server, WriterStats};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    cmd: String,
    sessions: usize,
    ops: u64,
    window: u64,
    shared: bool,
    docs: u64,
    addr: Option<SocketAddr>,
    binary: Option<PathBuf>,
    data: Option<PathBuf>,
}

fn parse() -> Result<Args, Error> {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().ok_or("usage: load sessions|restart [options]")?;
    let mut a = Args {
        cmd,
        sessions: 1,
        ops: 100_000,
        window: 2_000,
        shared: false,
        docs: 100_000,
        addr: None,
        binary: None,
        data: None,
    };
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--sessions" => a.sessions = val()?.parse()?,
            "--ops" => a.ops = val()?.parse()?,
            "--window" => a.window = val()?.parse()?,
            "--shared" => a.shared = true,
            "--docs" => a.docs = val()?.parse()?,
            "--addr" => a.addr = Some(val()?.parse()?),
            "--binary" => a.binary = Some(val()?.into()),
            "--data" => a.data = Some(val()?.into()),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(a)
}

struct Embedded {
    addr: SocketAddr,
    stats: Arc<WriterStats>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), notesync_server::Error>>,
}

async fn embed(dir: &std::path::Path) -> Result<Embedded, Error> {
    let server = Server::bind(Config::new(dir).listen("127.0.0.1:0")).await?;
    let addr = server.local_addr();
    let stats = server.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    Ok(Embedded {
        addr,
        stats,
        shutdown,
        task,
    })
}

impl Embedded {
    async fn stop(self) -> Result<(), Error> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }
}

async fn hello(addr: SocketAddr, replica: u128) -> Result<Framed<TcpStream, ClientCodec>, Error> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut io = Framed::new(s, ClientCodec::default());
    io.send(ClientFrame::Hello(Hello::new(replica, Bytes::new())?))
        .await?;
    match io.next().await {
        Some(Ok(ServerFrame::Welcome { .. })) => Ok(io),
        other => Err(format!("expected welcome, got {other:?}").into()),
    }
}

/// One session: pipelines `ops` inserts with at most `window` unacked;
/// records each op's time to its ack.
async fn session(
    addr: SocketAddr,
    replica: u128,
    doc: u128,
    ops: u64,
    window: u64,
    hist: Arc<Mutex<Histogram<u64>>>,
) -> Result<(), Error> {
    let mut io = hello(addr, replica).await?;
    io.send(ClientFrame::SessionStart { since: 0, doc }).await?;
    let site = loop {
        match io.next().await {
            Some(Ok(ServerFrame::DocResponse(_))) => {}
            Some(Ok(ServerFrame::SessionStarted { site, .. })) => break site,
            other => return Err(format!("session start: {other:?}").into()),
        }
    };
    if site == 0 {
        return Err("no site".into());
    }
    let (mut tx, mut rx) = io.split();
    let sent_at = Arc::new(std::sync::Mutex::new(Vec::<Instant>::with_capacity(
        ops as usize,
    )));
    let acked = Arc::new(tokio::sync::watch::channel(0u64).0);
    let reader = {
        let sent_at = sent_at.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut local =
                Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())?;
            let mut done = 0u64;
            while done < ops {
                match rx.next().await {
                    Some(Ok(ServerFrame::SessionAck { count })) => {
                        let now = Instant::now();
                        let times = sent_at.lock().map_err(|e| e.to_string())?;
                        for t in &times[done as usize..(count as usize).min(times.len())] {
                            local.saturating_record(now.duration_since(*t).as_micros() as u64);
                        }
                        done = count;
                        acked.send_replace(count);
                    }
                    // Broadcasts from other sessions (shared document).
                    Some(Ok(ServerFrame::Insert(_))) => {}
                    other => return Err(format!("while waiting for acks: {other:?}")),
                }
            }
            Ok::<_, String>(local)
        })
    };
    let mut ready = acked.subscribe();
    let mut pid_base = 0u32;
    for i in 0..ops {
        if i >= *ready.borrow() + window {
            // Waiting for acks: what is buffered must go out first.
            SinkExt::<ClientFrame>::flush(&mut tx).await?;
            while i >= *ready.borrow() + window {
                ready.changed().await?;
            }
        }
        pid_base += 1;
        let atom = Atom::new(
            "lorem ipsum ",
            Pid::from_levels(&[Level::new(pid_base, site)]),
        )?;
        sent_at
            .lock()
            .map_err(|e| e.to_string())?
            .push(Instant::now());
        tx.feed(ClientFrame::Insert(SessionInsert::new(atom)))
            .await?;
        if i % 64 == 63 || i + 1 == ops {
            SinkExt::<ClientFrame>::flush(&mut tx).await?;
        }
    }
    let local = reader.await??;
    hist.lock().await.add(&local)?;
    Ok(())
}

async fn sessions(a: &Args) -> Result<(), Error> {
    let tmp = tempfile::tempdir()?;
    let embedded = match a.addr {
        Some(_) => None,
        None => Some(embed(a.data.as_deref().unwrap_or(tmp.path())).await?),
    };
    let addr = a
        .addr
        .or(embedded.as_ref().map(|e| e.addr))
        .ok_or("no address")?;
    let per = a.ops / a.sessions as u64;
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        3,
    )?));
    // Fresh document and replica ids per run, so runs against one external
    // server do not collide.
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos()
        << 32;
    let before = embedded.as_ref().map(|e| snapshot(&e.stats));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..a.sessions {
        let doc = if a.shared {
            run_id
        } else {
            run_id + 1 + s as u128
        };
        tasks.push(tokio::spawn(session(
            addr,
            run_id + 1000 + s as u128,
            doc,
            per,
            a.window,
            hist.clone(),
        )));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed();
    let total = per * a.sessions as u64;
    let h = hist.lock().await;
    println!(
        "sessions={} shared_doc={} ops={} elapsed={:.2}s durable_ops_per_s={:.0} ack_latency_us p50={} p99={} max={}",
        a.sessions,
        a.shared,
        total,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    );
    if let (Some(e), Some(b)) = (&embedded, before) {
        let after = snapshot(&e.stats);
        let commits = after.0 - b.0;
        let requests = after.1 - b.1;
        println!(
            "writer: {commits} commits for {requests} requests: mean batch {:.1}, {:.0} commits/s",
            requests as f64 / commits.max(1) as f64,
            commits as f64 / elapsed.as_secs_f64()
        );
        println!("writer (whole run): {}", e.stats.summary());
    }
    if let Some(e) = embedded {
        e.stop().await?;
    }
    Ok(())
}

fn snapshot(s: &WriterStats) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (s.commits.load(Relaxed), s.requests.load(Relaxed))
}

/// Creates `docs` documents with pipelined upserts over a few connections.
async fn populate(addr: SocketAddr, docs: u64) -> Result<(), Error> {
    let conns = 8u64;
    let mut tasks = Vec::new();
    for c in 0..conns {
        tasks.push(tokio::spawn(async move {
            let io = hello(addr, 7_000 + c as u128).await?;
            let (mut tx, mut rx) = io.split();
            let mine: Vec<u64> = (0..docs).filter(|d| d % conns == c).collect();
            let n = mine.len();
            let reader = tokio::spawn(async move {
                let mut syncs = 0;
                while syncs < n {
                    match rx.next().await {
                        Some(Ok(ServerFrame::DocSync { .. })) => syncs += 1,
                        Some(Ok(ServerFrame::DocResponse(_))) => {}
                        other => return Err(format!("populate: {other:?}")),
                    }
                }
                Ok(())
            });
            for d in mine {
                let up = Upsert {
                    doc: (d as u128) << 32 | 0xd0c,
                    name: DocName::new(format!("document {d}"))?,
                    since: 0,
                    inserts: AtomList::default(),
                    deletes: PidList::default(),
                };
                tx.feed(ClientFrame::Upsert(up)).await?;
            }
            SinkExt::<ClientFrame>::flush(&mut tx).await?;
            reader.await??;
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn restart(a: &Args) -> Result<(), Error> {
    let tmp = tempfile::tempdir()?;
    let dir = a.data.clone().unwrap_or_else(|| tmp.path().to_owned());
    let e = embed(&dir).await?;
    let start = Instant::now();
    populate(e.addr, a.docs).await?;
    println!(
        "populated {} documents in {:.2}s; writer: {}",
        a.docs,
        start.elapsed().as_secs_f64(),
        e.stats.summary()
    );
    e.stop().await?;
    for run in 1..=3 {
        let t = Instant::now();
        let server = Server::bind(Config::new(&dir).listen("127.0.0.1:0")).await?;
        let bind = t.elapsed();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        shutdown.cancel();
        task.await??;
        println!(
            "restart {run} (in-process Server::bind: open + index rebuild): {:.1} ms",
            bind.as_secs_f64() * 1e3
        );
    }
    if let Some(bin) = &a.binary {
        for run in 1..=3 {
            let t = Instant::now();
            let mut child = std::process::Command::new(bin)
                .args(["--listen", "127.0.0.1:0", "--data"])
                .arg(&dir)
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::piped())
                .spawn()?;
            let out = child.stdout.take().ok_or("no stdout")?;
            let line = tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
                    .map(|_| line)
            })
            .await??;
            let ready = t.elapsed();
            std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            let status = tokio::task::spawn_blocking(move || child.wait()).await??;
            println!(
                "restart {run} (binary, exec to `{}`): {:.1} ms; exit {status}",
                line.trim(),
                ready.as_secs_f64() * 1e3
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .init();
    let a = parse()?;
    match a.cmd.as_str() {
        "sessions" => sessions(&a).await,
        "restart" => restart(&a).await,
        other => Err(format!("unknown command {other}; use sessions or restart").into()),
    }
}
