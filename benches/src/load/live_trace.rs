//! Scenario 1, `live-trace`: one writer replays a real editing trace in a
//! session, pipelined (65/66 frames with ids from the reference allocator
//! over the SDK's replica model), while observers watch in sessions of
//! their own. Measured: durable ops/s (acks received), ops/s until every
//! observer has every op, and the fan-out latency from the writer's send to
//! each observer's receipt; then the same at a paced rate. Every observer
//! must end with the trace's endContent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use notesync_client::{Doc, LocalOp};
use notesync_protocol::{
    Allocator, ClientFrame, DocId, DocName, ServerFrame, SessionDelete, SessionInsert,
};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::watch;

use super::net::{self, Conn, Reader};
use super::proc;
use super::server::ServerUnderTest;
use super::trace::Trace;
use super::{Opts, Report, Result, histogram, run_id};
use crate::bail;

/// Observers in the scenario.
pub const OBSERVERS: usize = 10;
/// Ops per write while flooding.
const CHUNK_OPS: usize = 512;
/// Longest a phase may wait for one ack or one broadcast.
const STALL: Duration = Duration::from_secs(120);

/// The writer's ops, encoded once, before anything is timed.
pub struct Replay {
    pub bytes: bytes::Bytes,
    /// End offset of op i in `bytes`.
    pub ends: Vec<usize>,
    /// The writer's text after the last edit.
    pub expected: String,
    pub edits: usize,
}

impl Replay {
    pub fn ops(&self) -> usize {
        self.ends.len()
    }

    fn range(&self, from: usize, to: usize) -> &[u8] {
        let a = if from == 0 { 0 } else { self.ends[from - 1] };
        &self.bytes[a..self.ends[to - 1]]
    }
}

/// Types the trace into the SDK's replica model with `site`'s allocator
/// and encodes every resulting op as a 65 or 66.
pub fn prepare(trace: &Trace, doc_id: DocId, site: u8) -> Result<Replay> {
    let mut doc = Doc::new(doc_id, DocName::default());
    let mut alloc = Allocator::new(site, doc_id, 0x5eed)?;
    let mut buf = BytesMut::new();
    let mut ends = Vec::with_capacity(trace.edits.len() + 16);
    let mut push = |ops: Vec<LocalOp>, buf: &mut BytesMut| {
        for op in ops {
            let f = match op {
                LocalOp::Insert(a) => ClientFrame::Insert(SessionInsert::new(a)),
                LocalOp::Delete(pid) => ClientFrame::Delete(SessionDelete { site, pid }),
            };
            f.encode(buf);
            ends.push(buf.len());
        }
    };
    if !trace.start.is_empty() {
        let ops = doc.insert(&mut alloc, 0, &trace.start)?;
        push(ops, &mut buf);
    }
    for e in &trace.edits {
        if e.del > 0 {
            let ops = doc.delete(&mut alloc, e.pos..e.pos + e.del)?;
            push(ops, &mut buf);
        }
        if !e.text.is_empty() {
            let ops = doc.insert(&mut alloc, e.pos, &e.text)?;
            push(ops, &mut buf);
        }
    }
    let expected = doc.text();
    if trace.complete && expected != trace.end {
        bail!("the replica model does not reproduce the trace's endContent");
    }
    Ok(Replay {
        bytes: buf.freeze(),
        ends,
        expected,
        edits: trace.edits.len(),
    })
}

/// What one replay phase measured.
pub struct Phase {
    pub ops: usize,
    pub edits: usize,
    /// From the first send to the last ack.
    pub acked_in: Duration,
    /// From the first send until every observer had every op.
    pub delivered_in: Duration,
    /// Send to ack, per op.
    pub ack: Histogram<u64>,
    /// Send to receipt, per op and observer.
    pub fanout: Histogram<u64>,
    pub server_cpu_s: Option<f64>,
    pub doc: DocId,
    /// The document's text (checked at every observer).
    pub text: String,
}

/// Stamps: nanoseconds since `base` at which op i was written (0: not yet).
struct Stamps {
    base: Instant,
    at: Vec<AtomicU64>,
}

impl Stamps {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Stamps {
            base: Instant::now(),
            at: (0..n).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn stamp(&self, from: usize, to: usize) {
        let now = self.base.elapsed().as_nanos() as u64;
        for a in &self.at[from..to] {
            a.store(now, Ordering::Release);
        }
    }

    /// Microseconds from op i's send to now.
    fn since(&self, i: usize, now: Instant) -> Option<u64> {
        let t = self.at.get(i)?.load(Ordering::Acquire);
        (t > 0).then(|| (now.duration_since(self.base).as_nanos() as u64).saturating_sub(t) / 1000)
    }
}

struct Observed {
    hist: Histogram<u64>,
    frames: Vec<ServerFrame>,
    done: Instant,
}

/// Receives `n` broadcast ops; keeps them to check the text afterwards.
async fn observe(
    mut rd: Reader,
    _wr: OwnedWriteHalf,
    n: usize,
    stamps: Arc<Stamps>,
) -> Result<Observed> {
    let mut hist = histogram();
    let mut frames = Vec::with_capacity(n);
    while frames.len() < n {
        let f = net::recv(&mut rd, STALL).await?;
        match f {
            ServerFrame::Insert(_) | ServerFrame::Delete(_) => {
                if let Some(us) = stamps.since(frames.len(), Instant::now()) {
                    hist.saturating_record(us.max(1));
                }
                frames.push(f);
            }
            ServerFrame::Rename(_) => {}
            other => bail!("observer: unexpected {other:?}"),
        }
    }
    Ok(Observed {
        hist,
        frames,
        done: Instant::now(),
    })
}

/// Reads acks until all `n` ops are acknowledged.
async fn acks(
    mut rd: Reader,
    n: usize,
    stamps: Arc<Stamps>,
    acked: watch::Sender<usize>,
) -> Result<(Histogram<u64>, Instant)> {
    let mut hist = histogram();
    let mut done = 0usize;
    while done < n {
        match net::recv(&mut rd, STALL).await? {
            ServerFrame::SessionAck { count } => {
                let count = count as usize;
                if count > n {
                    bail!("ack of {count} ops, but only {n} were sent");
                }
                let now = Instant::now();
                for i in done..count {
                    if let Some(us) = stamps.since(i, now) {
                        hist.saturating_record(us.max(1));
                    }
                }
                done = done.max(count);
                acked.send_replace(done);
            }
            other => bail!("writer: unexpected {other:?}"),
        }
    }
    Ok((hist, Instant::now()))
}

/// Applies what an observer received to a fresh replica; its text.
fn replay_observed(doc: DocId, frames: &[ServerFrame]) -> String {
    let mut d = Doc::new(doc, DocName::default());
    for f in frames {
        match f {
            ServerFrame::Insert(i) => {
                d.apply_insert(i.atom.data(), i.atom.pid());
            }
            ServerFrame::Delete(x) => {
                d.apply_delete(&x.pid);
            }
            _ => {}
        }
    }
    d.text()
}

/// One phase: a fresh document, `observers` sessions, the writer's replay
/// (flooding when `rate` is None, else paced at `rate` ops/s).
pub async fn phase(
    server: &ServerUnderTest,
    trace: &Trace,
    observers: usize,
    rate: Option<u64>,
    window: usize,
) -> Result<Phase> {
    let addr = server.addr;
    let id = run_id();
    let doc: DocId = id | 0xd0c;
    let mut writer = Conn::connect(addr, Some(id | 1)).await?;
    let started = writer.start_session(doc, 0).await?;
    if started.site == 0 {
        bail!("the writer got no site");
    }
    let site = started.site;
    let t = trace.clone();
    let replay = tokio::task::spawn_blocking(move || prepare(&t, doc, site)).await??;
    let n = replay.ops();
    if n == 0 {
        bail!("the trace has no ops");
    }
    let stamps = Stamps::new(n);

    let mut obs = Vec::new();
    for k in 0..observers {
        let mut c = Conn::connect(addr, Some(id | (0x100 + k as u128))).await?;
        let s = c.start_session(doc, 0).await?;
        if s.catch_up.iter().any(|r| !r.inserts.is_empty()) {
            bail!("observer {k}: the new document is not empty");
        }
        obs.push(tokio::spawn(observe(c.rd, c.wr, n, stamps.clone())));
    }

    let Conn { rd, mut wr, .. } = writer;
    let (acked_tx, mut acked_rx) = watch::channel(0usize);
    let ack_task = tokio::spawn(acks(rd, n, stamps.clone(), acked_tx));
    let cpu0 = server.sample().map(|s| s.cpu_s);
    let first_send = Instant::now();
    let mut next = 0usize;
    let pace_tick = Duration::from_millis(1);
    while next < n {
        let acked = *acked_rx.borrow();
        if next >= acked + window {
            if tokio::time::timeout(STALL, acked_rx.changed())
                .await
                .is_err()
            {
                bail!("no ack for {STALL:?} ({acked} of {n} acked)");
            }
            continue;
        }
        let mut end = (next + CHUNK_OPS).min(n).min(acked + window);
        if let Some(r) = rate {
            let due = (first_send.elapsed().as_secs_f64() * r as f64) as usize + 1;
            end = end.min(due);
            if end <= next {
                tokio::time::sleep(pace_tick).await;
                continue;
            }
        }
        stamps.stamp(next, end);
        tokio::io::AsyncWriteExt::write_all(&mut wr, replay.range(next, end)).await?;
        next = end;
    }
    let (ack, last_ack) = ack_task.await??;
    let mut fanout = histogram();
    let mut delivered = last_ack;
    let mut received = Vec::new();
    for o in obs {
        let o = o.await??;
        fanout.add(&o.hist)?;
        delivered = delivered.max(o.done);
        received.push(o.frames);
    }
    let cpu1 = server.sample().map(|s| s.cpu_s);
    drop(wr);
    // Every observer must hold exactly the writer's text.
    let expected = replay.expected.clone();
    let checks: Vec<_> = received
        .into_iter()
        .enumerate()
        .map(|(k, frames)| {
            let expected = expected.clone();
            tokio::task::spawn_blocking(move || {
                let text = replay_observed(doc, &frames);
                if text != expected {
                    return Err(format!(
                        "observer {k} diverged: {} chars, expected {}",
                        text.chars().count(),
                        expected.chars().count()
                    ));
                }
                Ok(())
            })
        })
        .collect();
    for c in checks {
        c.await??;
    }
    Ok(Phase {
        ops: n,
        edits: replay.edits,
        acked_in: last_ack - first_send,
        delivered_in: delivered - first_send,
        ack,
        fanout,
        server_cpu_s: cpu0.zip(cpu1).map(|(a, b)| b - a),
        doc,
        text: replay.expected,
    })
}

pub async fn run(opts: &Opts) -> Result<Report> {
    let limit = if opts.smoke || opts.size.is_some() {
        Some(opts.pick(usize::MAX, 2_000))
    } else {
        None
    };
    let trace = Trace::load(&opts.trace, limit)?;
    let name = opts
        .trace
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let server = ServerUnderTest::start(opts, &[])?;
    let probe_dir = server.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    let fsync = proc::fsync_probe(&probe_dir, if opts.smoke { 10 } else { 200 })?;
    // The data folder's bytes, when this run started the server: empty,
    // then holding the flood's document (issue 12's storage figure).
    let stored_before = server.data_dir.as_deref().map(proc::dir_bytes);
    let flood = phase(&server, &trace, OBSERVERS, None, opts.window).await?;
    let stored_after = server.data_dir.as_deref().map(proc::dir_bytes);
    let rate = if opts.smoke {
        opts.paced_rate.min(2_000)
    } else {
        opts.paced_rate
    };
    let paced = if rate > 0 {
        Some(phase(&server, &trace, OBSERVERS, Some(rate), opts.window).await?)
    } else {
        None
    };
    let last = server.stop()?;

    let mut r = Report::new(
        "live-trace",
        format!(
            "{name}, {} edits ({} ops), 1 writer + {OBSERVERS} observers, window {}",
            flood.edits, flood.ops, opts.window
        ),
    );
    r.num("edits", "trace edits", flood.edits as f64, "")
        .num("ops", "session ops (65/66 frames)", flood.ops as f64, "")
        .num("observers", "observers", OBSERVERS as f64, "")
        .num(
            "ops_per_s",
            "durable ops/s (acks received)",
            flood.ops as f64 / flood.acked_in.as_secs_f64(),
            "ops/s",
        )
        .num(
            "edits_per_s",
            "durable edits/s",
            flood.edits as f64 / flood.acked_in.as_secs_f64(),
            "edits/s",
        )
        .num(
            "delivered_ops_per_s",
            "ops/s until all observers had all",
            flood.ops as f64 / flood.delivered_in.as_secs_f64(),
            "ops/s",
        )
        .num(
            "elapsed_s",
            "replay time (first send to last ack)",
            flood.acked_in.as_secs_f64(),
            "s",
        )
        .latency("", "fan-out latency", &flood.fanout)
        .latency("ack_", "ack latency", &flood.ack);
    if let Some(c) = flood.server_cpu_s {
        r.num("flood_server_cpu_s", "server CPU during the replay", c, "s");
    }
    if let (Some(before), Some(after)) = (stored_before, stored_after) {
        r.num(
            "data_bytes_empty",
            "data folder before the flood",
            before as f64,
            "B",
        )
        .num(
            "data_bytes_after_flood",
            "data folder after the flood",
            after as f64,
            "B",
        )
        .num(
            "data_bytes_flood",
            "data folder growth by the flood",
            after.saturating_sub(before) as f64,
            "B",
        );
    }
    if let Some(paced) = &paced {
        r.num("paced_rate", "paced rate", rate as f64, "ops/s")
            .num(
                "paced_ops_per_s",
                "paced: durable ops/s",
                paced.ops as f64 / paced.acked_in.as_secs_f64(),
                "ops/s",
            )
            .latency("paced_", "paced: fan-out latency", &paced.fanout)
            .latency("paced_ack_", "paced: ack latency", &paced.ack);
        if let Some(c) = paced.server_cpu_s {
            r.num(
                "paced_server_cpu_s",
                "server CPU during the paced replay",
                c,
                "s",
            );
        }
    }
    r.text(
        "check",
        "check",
        &format!(
            "all {} observers hold the {} text ({} chars){}",
            OBSERVERS,
            if trace.complete {
                "endContent"
            } else {
                "writer's"
            },
            flood.text.chars().count(),
            if paced.is_some() { ", twice" } else { "" }
        ),
    );
    r.num(
        "fsync_p50_us",
        "disk fdatasync p50 (probe before the run)",
        fsync.0,
        "µs",
    )
    .num(
        "fsync_p99_us",
        "disk fdatasync p99 (probe before the run)",
        fsync.1,
        "µs",
    )
    .num(
        "load_average",
        "load average (1 min) at the end",
        proc::loadavg(),
        "",
    );
    r.server(last).client(proc::sample_self());
    Ok(r)
}
