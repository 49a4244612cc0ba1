//! Scenario 7, `offline`: the trace typed offline into the SDK's client
//! (`notesync_client::Client`, its store on tmpfs when there is one: this
//! scenario measures bytes, not the disk), then one sync upserts it. A
//! counting proxy between the client and the server measures the bytes
//! sent. The server's copy must then be the trace's endContent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use notesync_client::{Client, Doc, ServerConfig};
use notesync_protocol::{ClientFrame, DocName, ServerFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::net::Conn;
use super::server::ServerUnderTest;
use super::trace::Trace;
use super::{Opts, Report, Result, proc, run_id};
use crate::bail;

/// Bytes each way through the proxy.
#[derive(Default)]
struct Counted {
    up: AtomicU64,
    down: AtomicU64,
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: Arc<Counted>,
    up: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if up {
            count.up.fetch_add(n as u64, Ordering::Relaxed);
        } else {
            count.down.fetch_add(n as u64, Ordering::Relaxed);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A counting TCP proxy to `server` on 127.0.0.1; serves until dropped.
async fn proxy(
    server: SocketAddr,
    count: Arc<Counted>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            let Ok(s) = TcpStream::connect(server).await else {
                continue;
            };
            let _ = c.set_nodelay(true);
            let _ = s.set_nodelay(true);
            let (cr, cw) = c.into_split();
            let (sr, sw) = s.into_split();
            tokio::spawn(pipe(cr, sw, count.clone(), true));
            tokio::spawn(pipe(sr, cw, count.clone(), false));
        }
    });
    Ok((addr, task))
}

pub async fn run(opts: &Opts) -> Result<Report> {
    let limit = (opts.smoke || opts.size.is_some()).then(|| opts.pick(usize::MAX, 2_000));
    let trace = Trace::load(&opts.trace, limit)?;
    let server = ServerUnderTest::start(opts, &[])?;
    let count = Arc::new(Counted::default());
    let (paddr, ptask) = proxy(server.addr, count.clone()).await?;
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("notesync-bench-")
            .tempdir_in(shm)?
    } else {
        tempfile::Builder::new()
            .prefix("notesync-bench-")
            .tempdir()?
    };
    let client = Client::open(dir.path(), ServerConfig::new(paddr.to_string()))?;
    let t = Instant::now();
    let (id, text) = {
        let client = client.clone();
        let trace = trace.clone();
        tokio::task::spawn_blocking(move || -> Result<_> {
            let id = client.create("automerge-paper")?;
            if !trace.start.is_empty() {
                client.insert(id, 0, &trace.start)?;
            }
            for e in &trace.edits {
                if e.del > 0 {
                    client.delete(id, e.pos..e.pos + e.del)?;
                }
                if !e.text.is_empty() {
                    client.insert(id, e.pos, &e.text)?;
                }
            }
            let text = client.text(id)?;
            Ok((id, text))
        })
        .await??
    };
    let typed_s = t.elapsed().as_secs_f64();
    if trace.complete && text != trace.end {
        bail!("the client's text is not the trace's endContent");
    }
    let t = Instant::now();
    let report = client.sync_now().await?;
    let sync_ms = t.elapsed().as_secs_f64() * 1e3;
    if !report.refused.is_empty() {
        bail!("the server refused: {:?}", report.refused);
    }
    let up = count.up.load(Ordering::Relaxed);
    let down = count.down.load(Ordering::Relaxed);
    ptask.abort();

    // The server's copy, pulled by a replica that has nothing.
    let mut c = Conn::connect(server.addr, Some(run_id() | 9)).await?;
    c.send(&ClientFrame::Pull { doc: id, since: 0 }).await?;
    let mut d = Doc::new(id, DocName::default());
    loop {
        match c.recv().await? {
            ServerFrame::DocResponse(r) => {
                for a in r.inserts.iter() {
                    d.apply_insert(a.data, &a.pid.to_pid());
                }
                for p in r.deletes.iter() {
                    d.apply_delete(&p.to_pid());
                }
            }
            ServerFrame::DocSync { .. } => break,
            other => bail!("pull: unexpected {other:?}"),
        }
    }
    if d.text() != text {
        bail!("the server's copy differs from the client's text");
    }
    drop(c);
    let last = server.stop()?;

    let mut r = Report::new(
        "offline",
        format!(
            "{} edits typed offline into notesync_client::Client, then one sync",
            trace.edits.len()
        ),
    );
    r.num("edits", "edits typed offline", trace.edits.len() as f64, "")
        .num("text_bytes", "final text", text.len() as f64, "bytes")
        .num(
            "bytes_sent",
            "bytes sent by the sync (all frames)",
            up as f64,
            "bytes",
        )
        .num(
            "bytes_received",
            "bytes received by the sync",
            down as f64,
            "bytes",
        )
        .num(
            "sent_per_text_byte",
            "bytes sent / final text bytes",
            up as f64 / text.len().max(1) as f64,
            "",
        )
        .num(
            "acknowledged_ops",
            "ops acknowledged",
            report.acknowledged_ops as f64,
            "",
        )
        .num(
            "typing_s",
            "typing time (each edit fsynced to the op log)",
            typed_s,
            "s",
        )
        .num("sync_ms", "sync time", sync_ms, "ms")
        .text(
            "check",
            "check",
            "a replica with nothing pulls the client's exact text from the server",
        );
    r.server(last).client(proc::sample_self());
    Ok(r)
}
