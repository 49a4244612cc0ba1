//! Scenario 5, `connections`: 10,000 idle connections; the server's memory
//! per connection (VmRSS growth / connections). Measured twice, on fresh
//! servers: idle sync-mode connections (hello, one synclist, then quiet)
//! and idle sessions (hello, session_start on one of 100 documents, quiet).
//! Kernel socket buffers are not in the process's RSS and not counted.

use std::time::Duration;

use notesync_protocol::{ClientFrame, ServerFrame, Time};

use super::net::{Conn, bounded};
use super::proc::{self, Sample};
use super::server::ServerUnderTest;
use super::{Opts, Report, Result, run_id};
use crate::bail;

/// Connections opened at once.
const CONCURRENCY: usize = 128;
/// Documents the sessions are spread over.
const SESSION_DOCS: usize = 100;

/// A connection that said hello `version` and did one synclist (answered
/// with nothing): an idle sync-mode connection.
pub(super) async fn idle_sync(
    addr: std::net::SocketAddr,
    replica: u128,
    version: u8,
) -> Result<Conn> {
    let mut c = Conn::connect_version(addr, Some(replica), version).await?;
    c.send(&ClientFrame::Synclist {
        since: Time::MAX - 1,
    })
    .await?;
    match c.recv().await? {
        ServerFrame::SynclistResponse(_) => Ok(c),
        other => bail!("synclist: unexpected {other:?}"),
    }
}

async fn settle(server: &ServerUnderTest) -> Option<Sample> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.sample()
}

struct Measured {
    per_conn: Option<f64>,
    open_s: f64,
    last: Option<Sample>,
}

async fn measure(opts: &Opts, n: usize, sessions: bool) -> Result<Measured> {
    let max = (n + 100).to_string();
    let server = ServerUnderTest::start(opts, &["--max-connections", &max])?;
    let addr = server.addr;
    let id = run_id();
    // Warm up (runtime threads, first allocations), then the baseline.
    drop(idle_sync(addr, id, 2).await?);
    let base = settle(&server).await;
    let t = std::time::Instant::now();
    let conns: Vec<Conn> = bounded((0..n).collect(), CONCURRENCY, |k| async move {
        let replica = id | (k as u128 + 1);
        if sessions {
            let mut c = Conn::connect(addr, Some(replica)).await?;
            let doc = id | 0xd0c0_0000 | (k % SESSION_DOCS) as u128;
            c.start_session(doc, 0).await?;
            Ok(c)
        } else {
            idle_sync(addr, replica, 2).await
        }
    })
    .await?;
    let open_s = t.elapsed().as_secs_f64();
    let after = settle(&server).await;
    // Still served: each sync connection answers once more.
    let n_open = conns.len();
    if !sessions {
        let conns = bounded(conns, CONCURRENCY, |mut c| async move {
            c.send(&ClientFrame::Synclist {
                since: Time::MAX - 1,
            })
            .await?;
            match c.recv().await? {
                ServerFrame::SynclistResponse(_) => Ok(c),
                other => bail!("synclist: unexpected {other:?}"),
            }
        })
        .await?;
        drop(conns);
    } else {
        drop(conns);
    }
    if n_open != n {
        bail!("opened {n_open} of {n} connections");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last = server.stop()?;
    let per_conn = base
        .zip(after)
        .map(|(b, a)| (a.rss as f64 - b.rss as f64) / n as f64);
    Ok(Measured {
        per_conn,
        open_s,
        last,
    })
}

pub async fn run(opts: &Opts) -> Result<Report> {
    let n = opts.pick(10_000, 200);
    // Our connections and, inherited, the server's.
    let limit = proc::raise_fd_limit(n as u64 + 1_024);
    if limit < n as u64 + 64 {
        bail!("the open-files limit is {limit}; {n} connections need more (raise the hard limit)");
    }
    let sync = measure(opts, n, false).await?;
    let sess = measure(opts, n, true).await?;
    let mut r = Report::new(
        "connections",
        format!(
            "{n} idle connections (sync mode), then {n} idle sessions on {SESSION_DOCS} documents"
        ),
    );
    r.num("connections", "connections", n as f64, "");
    match (sync.per_conn, sess.per_conn) {
        (Some(a), Some(b)) => {
            r.num(
                "bytes_per_connection",
                "server RSS per idle sync connection",
                a,
                "bytes",
            )
            .num(
                "bytes_per_session",
                "server RSS per idle session",
                b,
                "bytes",
            );
        }
        _ => {
            r.text(
                "bytes_per_connection",
                "server RSS per connection",
                "n/a (external server without --server-pid)",
            );
        }
    }
    r.num(
        "open_conns_per_s",
        "connections opened (hello + synclist)",
        n as f64 / sync.open_s,
        "conns/s",
    )
    .num(
        "open_sessions_per_s",
        "sessions opened (hello + session_start)",
        n as f64 / sess.open_s,
        "sessions/s",
    );
    let peak = match (sync.last, sess.last) {
        (Some(a), Some(b)) => Some(Sample {
            rss: a.rss.max(b.rss),
            hwm: a.hwm.max(b.hwm),
            cpu_s: a.cpu_s + b.cpu_s,
        }),
        (a, b) => a.or(b),
    };
    r.server(peak).client(proc::sample_self());
    Ok(r)
}
