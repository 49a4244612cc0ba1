//! Scenario 4, `synclist-scale`: 1,000,000 documents (created with
//! pipelined upserts); a synclist that returns the 100 changed last.

use std::time::Instant;

use notesync_protocol::{ClientFrame, DocName, PidList, ServerFrame, Time, Upsert};

use super::net::Conn;
use super::populate::{self, doc_id};
use super::server::{ServerUnderTest, server_binary};
use super::{Opts, Report, Result, histogram, median, proc, run_id};
use crate::bail;

/// The documents listed by the measured synclist.
const LISTED: u64 = 100;

async fn synclist(c: &mut Conn, since: Time) -> Result<(f64, usize)> {
    let t = Instant::now();
    c.send(&ClientFrame::Synclist { since }).await?;
    match c.recv().await? {
        ServerFrame::SynclistResponse(l) => Ok((t.elapsed().as_secs_f64() * 1e6, l.len())),
        other => bail!("synclist: unexpected {other:?}"),
    }
}

/// A server on `opts.data` if given (populated once, kept), else fresh.
pub fn server_on(opts: &Opts, extra: &[&str]) -> Result<ServerUnderTest> {
    match (&opts.data, opts.server) {
        (Some(dir), None) => {
            std::fs::create_dir_all(dir)?;
            ServerUnderTest::spawn(&server_binary(opts)?, dir, extra)
        }
        _ => ServerUnderTest::start(opts, extra),
    }
}

pub async fn run(opts: &Opts) -> Result<Report> {
    let docs = opts.pick(1_000_000, 1_000) as u64;
    let reps = opts.reps_or(1_000, 20);
    let server = server_on(opts, &[])?;
    let addr = server.addr;
    let id = run_id();
    let reused = server
        .data_dir
        .as_deref()
        .filter(|_| opts.data.is_some())
        .and_then(|d| populate::read_marker(d, "synclist"))
        .filter(|m| m.1 == docs);
    let (salt, populated) = match reused {
        Some((salt, ..)) => (salt, None),
        None => {
            let salt = (id >> 24) as u64;
            let p = populate::upserts(addr, id | 1, docs, 8, move |d| populate::create(salt, d, 0))
                .await?;
            if let (Some(dir), Some(_)) = (&server.data_dir, &opts.data) {
                populate::write_marker(dir, "synclist", salt, docs, 0)?;
            }
            (salt, Some(p))
        }
    };
    // The 100 documents changed last: renamed after t0.
    let mut c = Conn::connect(addr, Some(id | 2)).await?;
    let t0 = c.server_time;
    let step = (docs / LISTED).max(1);
    for k in 0..LISTED.min(docs) {
        let d = k * step;
        c.feed(&ClientFrame::Upsert(Upsert {
            doc: doc_id(salt, d),
            name: DocName::new(format!("note {d}, renamed at {t0}"))?,
            since: t0,
            inserts: Default::default(),
            deletes: PidList::default(),
        }));
    }
    c.flush().await?;
    let mut synced = 0;
    while synced < LISTED.min(docs) {
        match c.recv().await? {
            ServerFrame::DocSync { .. } => synced += 1,
            ServerFrame::DocResponse(_) => {}
            other => bail!("touch: unexpected {other:?}"),
        }
    }
    let mut reader = Conn::connect(addr, Some(id | 3)).await?;
    let mut us = Vec::new();
    let mut hist = histogram();
    for _ in 0..reps {
        let (t, n) = synclist(&mut reader, t0).await?;
        if n as u64 != LISTED.min(docs) {
            bail!("synclist since t0 listed {n} documents, expected {LISTED}");
        }
        us.push(t);
        hist.saturating_record(t as u64);
    }
    let mut page_us = Vec::new();
    let mut page_len = 0;
    for _ in 0..reps.min(20) {
        let (t, n) = synclist(&mut reader, 0).await?;
        page_us.push(t);
        page_len = n;
    }
    let last = server.stop()?;

    let mut r = Report::new(
        "synclist-scale",
        format!("{docs} documents; {reps} synclists listing the {LISTED} changed last"),
    );
    r.num("documents", "documents", docs as f64, "");
    match populated {
        Some(p) => r.num(
            "create_docs_per_s",
            "created with pipelined upserts",
            docs as f64 / p.elapsed.as_secs_f64(),
            "docs/s",
        ),
        None => r.text("create_docs_per_s", "created", "reused data folder"),
    };
    r.num(
        "synclist_us",
        "synclist returning 100 (median)",
        median(&us),
        "µs",
    )
    .num(
        "synclist_p99_us",
        "synclist returning 100 (p99)",
        hist.value_at_quantile(0.99) as f64,
        "µs",
    )
    .num(
        "first_page_us",
        &format!("synclist since 0 ({page_len} entries, median)"),
        median(&page_us),
        "µs",
    )
    .server(last)
    .client(proc::sample_self());
    Ok(r)
}
