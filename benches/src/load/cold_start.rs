//! Scenario 6, `cold-start`: a server restarted on 1,000,000 documents and
//! 10,000,000 atoms; time from exec until it accepts a connection (welcome
//! received and a synclist answered).

use std::time::{Duration, Instant};

use notesync_protocol::{ClientFrame, ServerFrame, Time};

use super::net::Conn;
use super::populate;
use super::server::{ServerUnderTest, server_binary};
use super::synclist::server_on;
use super::{Opts, Report, Result, median, proc, run_id};
use crate::bail;

pub async fn run(opts: &Opts) -> Result<Report> {
    if opts.server.is_some() {
        bail!("cold-start restarts the server, so it needs one it starts itself (no --server)");
    }
    let docs = opts.pick(1_000_000, 1_000) as u64;
    let atoms_per_doc = 10;
    let reps = opts.reps_or(5, 2);
    let bin = server_binary(opts)?;
    let server = server_on(opts, &[])?;
    let dir = server.data_dir.clone().ok_or("no data folder")?;
    let id = run_id();
    let reused = opts
        .data
        .as_ref()
        .and_then(|d| populate::read_marker(d, "cold-start"))
        .filter(|m| m.1 == docs && m.2 == atoms_per_doc);
    let populated = match reused {
        Some(_) => None,
        None => {
            let salt = (id >> 24) as u64;
            let p = populate::upserts(server.addr, id | 1, docs, 8, move |d| {
                populate::create(salt, d, atoms_per_doc)
            })
            .await?;
            if opts.data.is_some() {
                populate::write_marker(&dir, "cold-start", salt, docs, atoms_per_doc)?;
            }
            Some(p)
        }
    };
    // Restart on the same folder; a temporary one lives until the end.
    let (first, keep) = server.stop_keep()?;
    let mut listening_ms = Vec::new();
    let mut accepting_ms = Vec::new();
    let mut last = None;
    for _ in 0..reps {
        let t = Instant::now();
        let s = ServerUnderTest::spawn(&bin, &dir, &[])?;
        let listening = t.elapsed();
        let mut c = Conn::connect(s.addr, Some(id | 2)).await?;
        c.send(&ClientFrame::Synclist {
            since: Time::MAX - 1,
        })
        .await?;
        match c.recv().await? {
            ServerFrame::SynclistResponse(_) => {}
            other => bail!("synclist after restart: unexpected {other:?}"),
        }
        let accepting = t.elapsed();
        // The index must hold every document.
        c.send(&ClientFrame::Synclist { since: 0 }).await?;
        match c.recv().await? {
            ServerFrame::SynclistResponse(l) if l.len() as u64 == docs.min(10_000) => {}
            other => bail!("synclist since 0 after restart: unexpected {other:?}"),
        }
        drop(c);
        listening_ms.push(listening.as_secs_f64() * 1e3);
        accepting_ms.push(accepting.as_secs_f64() * 1e3);
        last = s.stop()?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let size = proc::dir_bytes(&dir);
    drop(keep);

    let mut r = Report::new(
        "cold-start",
        format!(
            "{docs} documents, {} atoms; {reps} restarts",
            docs * atoms_per_doc as u64
        ),
    );
    r.num("documents", "documents", docs as f64, "").num(
        "atoms",
        "atoms",
        (docs * atoms_per_doc as u64) as f64,
        "",
    );
    if let Some(p) = populated {
        r.num(
            "create_atoms_per_s",
            "created with pipelined upserts",
            (docs * atoms_per_doc as u64) as f64 / p.elapsed.as_secs_f64(),
            "atoms/s",
        );
    }
    r.num("data_bytes", "data folder size", size as f64, "bytes")
        .num(
            "cold_start_ms",
            "exec to first synclist answered (median)",
            median(&accepting_ms),
            "ms",
        )
        .num(
            "cold_start_max_ms",
            "exec to first synclist answered (max)",
            accepting_ms.iter().cloned().fold(0.0, f64::max),
            "ms",
        )
        .num(
            "listening_ms",
            "exec to listening line (median)",
            median(&listening_ms),
            "ms",
        );
    if let Some(f) = first {
        r.num(
            "populate_server_peak_rss_bytes",
            "server peak RSS while populating",
            f.hwm as f64,
            "bytes",
        );
    }
    r.server(last).client(proc::sample_self());
    Ok(r)
}
