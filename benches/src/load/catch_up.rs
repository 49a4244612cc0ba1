//! Scenario 3, `catch-up`: the finished paper document (its whole history
//! replayed live, tombstones included) is pulled by a client that has
//! nothing (time, bytes); then 1-op deltas are pulled on it (time).

use std::time::Instant;

use notesync_client::{Doc, LocalOp};
use notesync_protocol::{Allocator, ClientFrame, DocId, DocName, ServerFrame, SessionInsert, Time};

use super::live_trace::phase;
use super::net::Conn;
use super::proc;
use super::server::ServerUnderTest;
use super::trace::Trace;
use super::{Opts, Report, Result, histogram, median, run_id};
use crate::bail;

/// A pull: its frames' bytes, the 33s' contents applied to `doc`, the 34's
/// sync time.
async fn pull(
    c: &mut Conn,
    doc_id: DocId,
    since: Time,
    doc: Option<&mut Doc>,
) -> Result<(f64, usize, Time, Vec<ServerFrame>)> {
    let t = Instant::now();
    c.send(&ClientFrame::Pull { doc: doc_id, since }).await?;
    let mut frames = Vec::new();
    let sync_time = loop {
        match c.recv().await? {
            f @ (ServerFrame::DocResponse(_) | ServerFrame::DocResponseRuns(_)) => frames.push(f),
            ServerFrame::DocSync { sync_time, .. } => break sync_time,
            other => bail!("pull: unexpected {other:?}"),
        }
    };
    let ms = t.elapsed().as_secs_f64() * 1e3;
    // Measured above; the bytes and the model come after the clock stops.
    let bytes = frames.iter().map(|f| f.to_bytes().len()).sum::<usize>() + 26;
    if let Some(d) = doc {
        for f in &frames {
            match f {
                ServerFrame::DocResponse(r) => {
                    for a in r.inserts.iter() {
                        d.apply_insert(a.data, &a.pid.to_pid());
                    }
                    for p in r.deletes.iter() {
                        d.apply_delete(&p.to_pid());
                    }
                }
                ServerFrame::DocResponseRuns(r) => {
                    for (data, pid) in r.inserts.atoms() {
                        d.apply_insert(data, &pid);
                    }
                    for pid in r.deletes.ids() {
                        d.apply_delete(&pid);
                    }
                }
                _ => {}
            }
        }
    }
    Ok((ms, bytes, sync_time, frames))
}

pub async fn run(opts: &Opts) -> Result<Report> {
    let limit = (opts.smoke || opts.size.is_some()).then(|| opts.pick(usize::MAX, 2_000));
    let trace = Trace::load(&opts.trace, limit)?;
    let reps = opts.reps_or(20, 3);
    let server = ServerUnderTest::start(opts, &[])?;
    let addr = server.addr;
    // The document: the whole trace replayed live (no observers).
    let made = phase(&server, &trace, 0, None, opts.window).await?;
    let doc_id = made.doc;
    let id = run_id();

    // A client with nothing pulls everything: a new replica each time
    // (so each pull also allocates its site, as a real first pull does).
    let mut full_ms = Vec::new();
    let mut bytes = 0;
    let mut model = None;
    let mut reader = None;
    let mut since = 0;
    for rep in 0..reps {
        let mut c = Conn::connect(addr, Some(id | (rep as u128 + 1))).await?;
        let mut d = Doc::new(doc_id, DocName::default());
        let (ms, b, t, _) = pull(&mut c, doc_id, 0, Some(&mut d)).await?;
        if d.text() != made.text {
            bail!(
                "the pulled text differs from the document's ({} vs {} chars)",
                d.text().chars().count(),
                made.text.chars().count()
            );
        }
        full_ms.push(ms);
        bytes = b;
        since = t;
        model = Some(d);
        reader = Some(c);
    }
    let (Some(mut doc), Some(mut reader)) = (model, reader) else {
        bail!("no pull ran");
    };
    // The same pulls on protocol version 3 (runs and ranges, PROTOCOL.md
    // 1.5), where the server speaks it: a new replica each time.
    let mut v3_ms = Vec::new();
    let mut v3_bytes = None;
    for rep in 0..reps {
        let replica = Some(id | (rep as u128 + 0x1_0000));
        let Ok(mut c) = Conn::connect_version(addr, replica, 3).await else {
            break; // a server without version 3 refuses the hello
        };
        let mut d = Doc::new(doc_id, DocName::default());
        let (ms, b, _, _) = pull(&mut c, doc_id, 0, Some(&mut d)).await?;
        if d.text() != made.text {
            bail!("the version 3 pull's text differs from the document's");
        }
        v3_ms.push(ms);
        v3_bytes = Some(b);
    }
    // The same replica again since 0: no site to allocate.
    let mut known_ms = Vec::new();
    for _ in 0..reps {
        let (ms, ..) = pull(&mut reader, doc_id, 0, None).await?;
        known_ms.push(ms);
    }

    // 1-op deltas: another replica types one char at the end, the reader
    // pulls since its last sync time and must get exactly that op.
    let mut typist = Conn::connect(addr, Some(id | 0xffff)).await?;
    let s = typist.start_session(doc_id, 0).await?;
    let mut tdoc = doc.clone();
    let mut alloc = Allocator::new(s.site, doc_id, 7)?;
    let mut delta_ms = Vec::new();
    let mut delta_hist = histogram();
    for k in 0..reps.max(1) * 10 {
        let at = tdoc.len_chars();
        let ops = tdoc.insert(&mut alloc, at, "x")?;
        for op in ops {
            let LocalOp::Insert(a) = op else {
                bail!("typing made a delete")
            };
            typist
                .send(&ClientFrame::Insert(SessionInsert::new(a)))
                .await?;
        }
        match typist.recv().await? {
            ServerFrame::SessionAck { count } if count == k as u64 + 1 => {}
            other => bail!("typist: expected the ack of op {}, got {other:?}", k + 1),
        }
        let (ms, _, t, frames) = pull(&mut reader, doc_id, since, Some(&mut doc)).await?;
        let ops: usize = frames
            .iter()
            .map(|f| match f {
                ServerFrame::DocResponse(r) => r.inserts.len() + r.deletes.len(),
                _ => 0,
            })
            .sum();
        if ops != 1 {
            bail!("a 1-op delta pull returned {ops} ops");
        }
        since = t;
        delta_ms.push(ms);
        delta_hist.saturating_record((ms * 1e3) as u64);
    }
    if doc.text() != tdoc.text() {
        bail!("after the deltas the reader's text differs from the typist's");
    }
    let last = server.stop()?;

    let text_bytes = made.text.len();
    let mut r = Report::new(
        "catch-up",
        format!(
            "the document after {} edits ({} chars); {reps} full pulls, {} delta pulls",
            made.edits,
            made.text.chars().count(),
            delta_ms.len()
        ),
    );
    r.num(
        "full_pull_ms",
        "full pull, new replica (median)",
        median(&full_ms),
        "ms",
    )
    .num(
        "full_pull_max_ms",
        "full pull, new replica (max)",
        full_ms.iter().cloned().fold(0.0, f64::max),
        "ms",
    )
    .num(
        "full_pull_known_ms",
        "full pull, known replica (median)",
        median(&known_ms),
        "ms",
    )
    .num(
        "full_pull_bytes",
        "full pull, bytes received",
        bytes as f64,
        "bytes",
    )
    .num("text_bytes", "final text", text_bytes as f64, "bytes");
    if let Some(b) = v3_bytes {
        r.num(
            "full_pull_v3_ms",
            "full pull on version 3, new replica (median)",
            median(&v3_ms),
            "ms",
        )
        .num(
            "full_pull_v3_bytes",
            "full pull on version 3, bytes received",
            b as f64,
            "bytes",
        )
        .num(
            "full_pull_v3_bytes_per_text_byte",
            "version 3 bytes received / text bytes",
            b as f64 / text_bytes.max(1) as f64,
            "",
        );
    }
    r.num(
        "full_pull_bytes_per_text_byte",
        "bytes received / text bytes",
        bytes as f64 / text_bytes.max(1) as f64,
        "",
    )
    .num(
        "delta_pull_ms",
        "1-op delta pull (median)",
        median(&delta_ms),
        "ms",
    )
    .num(
        "delta_pull_p99_ms",
        "1-op delta pull (p99)",
        delta_hist.value_at_quantile(0.99) as f64 / 1e3,
        "ms",
    )
    .text(
        "check",
        "check",
        "every full pull rebuilds the text; every delta pull returns exactly 1 op",
    );
    r.server(last).client(proc::sample_self());
    Ok(r)
}
