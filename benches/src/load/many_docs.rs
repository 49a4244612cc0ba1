//! Scenario 2, `many-docs`: 1,000 documents, each with 2 writers and 2
//! observers in sessions (4,000 connections). The writers type at a paced
//! total rate that steps up; each step reports the sustained durable ops/s
//! and the fan-out latency (send to receipt at the observers). The knee is
//! the last step the server sustains (achieved >= 95% of offered, p99
//! under 50 ms).
//!
//! Each atom's text carries its step and send time ("step,micros "), so
//! observers measure latency without a shared table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use notesync_protocol::{Allocator, Atom, ClientFrame, DocId, Pid, ServerFrame, SessionInsert};
use tokio::net::tcp::OwnedWriteHalf;
use tokio_util::sync::CancellationToken;

use super::net::{self, Conn, Reader, bounded};
use super::server::ServerUnderTest;
use super::{Opts, Report, Result, histogram, proc, run_id};
use crate::bail;

const WRITERS: usize = 2;
const OBSERVERS: usize = 2;
/// Pacer tasks; each owns a share of the writers.
const PACERS: usize = 16;
const TICK: Duration = Duration::from_millis(5);
/// At most this many ops per writer per tick (a stalled writer does not
/// burst).
const MAX_PER_TICK: u64 = 64;
/// Longest wait for a step's ops to be acked and delivered.
const DRAIN: Duration = Duration::from_secs(30);
/// The knee's latency bound.
const KNEE_P99_US: u64 = 50_000;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_us() -> u64 {
    base().elapsed().as_micros() as u64
}

struct Writer {
    doc: usize,
    wr: OwnedWriteHalf,
    alloc: Allocator,
    last: Option<Pid>,
    /// Ops sent in all steps.
    sent: u64,
    /// Ops sent in the current step.
    step_sent: u64,
    acked: Arc<AtomicU64>,
    /// Spreads writers' sends within a tick.
    phase: f64,
    buf: bytes::BytesMut,
}

impl Writer {
    fn op(&mut self, step: usize) -> Result<()> {
        let pid = self.alloc.between(self.last.as_ref(), None)?;
        let atom = Atom::new(format!("{step},{} ", now_us()), pid.clone())?;
        ClientFrame::Insert(SessionInsert::new(atom)).encode(&mut self.buf);
        self.last = Some(pid);
        self.sent += 1;
        self.step_sent += 1;
        Ok(())
    }
}

/// Reads a writer's acks (and the other writer's broadcasts, ignored).
async fn acks(mut rd: Reader, acked: Arc<AtomicU64>, stop: CancellationToken) -> Result<()> {
    loop {
        let f = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            f = net::recv(&mut rd, Duration::from_secs(3600)) => f?,
        };
        match f {
            ServerFrame::SessionAck { count } => acked.store(count, Ordering::Release),
            ServerFrame::Insert(_) => {}
            other => bail!("writer: unexpected {other:?}"),
        }
    }
}

/// Per step: the latencies every observer saw (one histogram per step,
/// shared: a histogram per observer and step would be gigabytes), and the
/// ops received.
struct Seen {
    hists: Vec<std::sync::Mutex<Histogram<u64>>>,
    received: Vec<AtomicU64>,
}

async fn observe(
    mut rd: Reader,
    _wr: OwnedWriteHalf,
    seen: Arc<Seen>,
    stop: CancellationToken,
) -> Result<u64> {
    let steps = seen.hists.len();
    let mut count = 0u64;
    loop {
        let f = tokio::select! {
            _ = stop.cancelled() => return Ok(count),
            f = net::recv(&mut rd, Duration::from_secs(3600)) => f?,
        };
        let ServerFrame::Insert(i) = f else {
            bail!("observer: unexpected {f:?}");
        };
        let now = now_us();
        let Some((step, sent)) = i.atom.data().trim_end().split_once(',') else {
            bail!("observer: foreign atom {:?}", i.atom.data());
        };
        let step: usize = step.parse()?;
        let sent: u64 = sent.parse()?;
        if step >= steps {
            bail!("observer: op of step {step}");
        }
        seen.hists[step]
            .lock()
            .map_err(|_| "poisoned")?
            .saturating_record(now.saturating_sub(sent).max(1));
        seen.received[step].fetch_add(1, Ordering::Relaxed);
        count += 1;
    }
}

/// Sends one step's ops from `writers` at `rate_each` ops/s each.
async fn pace(
    mut writers: Vec<Writer>,
    step: usize,
    rate_each: f64,
    dur: Duration,
) -> Result<Vec<Writer>> {
    for w in writers.iter_mut() {
        w.step_sent = 0;
    }
    let start = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let el = start.elapsed().min(dur).as_secs_f64();
        for w in writers.iter_mut() {
            let due = (el * rate_each + w.phase) as u64;
            let n = due.saturating_sub(w.step_sent).min(MAX_PER_TICK);
            for _ in 0..n {
                w.op(step)?;
            }
            if !w.buf.is_empty() {
                tokio::io::AsyncWriteExt::write_all(&mut w.wr, &w.buf).await?;
                w.buf.clear();
            }
        }
        if start.elapsed() >= dur {
            return Ok(writers);
        }
    }
}

struct StepResult {
    offered: u64,
    sent: u64,
    achieved: f64,
    hist: Histogram<u64>,
    drain_ms: f64,
    ok: bool,
}

pub async fn run(opts: &Opts) -> Result<Report> {
    let docs = opts.pick(1_000, 50);
    let rates: Vec<u64> = if opts.smoke {
        vec![500, 1_000]
    } else {
        vec![1_000, 2_000, 5_000, 10_000, 20_000, 40_000, 80_000]
    };
    let step_dur = if opts.smoke {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(5)
    };
    let conns = docs * (WRITERS + OBSERVERS);
    let limit = proc::raise_fd_limit(conns as u64 + 1_024);
    if limit < conns as u64 + 64 {
        bail!("the open-files limit is {limit}; {conns} connections need more");
    }
    let max = (conns + 100).to_string();
    let server = ServerUnderTest::start(opts, &["--max-connections", &max])?;
    let addr = server.addr;
    let id = run_id();
    let doc_of = |d: usize| -> DocId { id | 0xd0c0_0000 | d as u128 };
    base();

    let stop = CancellationToken::new();
    let seen = Arc::new(Seen {
        hists: (0..rates.len())
            .map(|_| std::sync::Mutex::new(histogram()))
            .collect(),
        received: (0..rates.len()).map(|_| AtomicU64::new(0)).collect(),
    });
    // Writers first (so each gets a site), then observers.
    let wlist: Vec<(usize, usize)> = (0..docs)
        .flat_map(|d| (0..WRITERS).map(move |w| (d, w)))
        .collect();
    let writers: Vec<(Conn, u8, usize)> = bounded(wlist, 128, |(d, w)| async move {
        let mut c = Conn::connect(addr, Some(id | ((d * 8 + w) as u128 + 1) << 8)).await?;
        let s = c.start_session(doc_of(d), 0).await?;
        if s.site == 0 {
            bail!("writer without a site");
        }
        Ok((c, s.site, d))
    })
    .await?;
    let olist: Vec<(usize, usize)> = (0..docs)
        .flat_map(|d| (0..OBSERVERS).map(move |o| (d, o)))
        .collect();
    let observers: Vec<Conn> = bounded(olist, 128, |(d, o)| async move {
        let mut c = Conn::connect(addr, Some(id | ((d * 8 + 4 + o) as u128 + 1) << 8)).await?;
        c.start_session(doc_of(d), 0).await?;
        Ok(c)
    })
    .await?;
    let mut obs_tasks = Vec::new();
    for c in observers {
        obs_tasks.push(tokio::spawn(observe(
            c.rd,
            c.wr,
            seen.clone(),
            stop.clone(),
        )));
    }
    let mut all: Vec<Writer> = Vec::new();
    let mut ack_tasks = Vec::new();
    for (k, (c, site, d)) in writers.into_iter().enumerate() {
        let acked = Arc::new(AtomicU64::new(0));
        ack_tasks.push(tokio::spawn(acks(c.rd, acked.clone(), stop.clone())));
        all.push(Writer {
            doc: d,
            wr: c.wr,
            alloc: Allocator::new(site, doc_of(d), k as u64)?,
            last: None,
            sent: 0,
            step_sent: 0,
            acked,
            phase: (k as f64 * 0.618_033_988_7).fract(),
            buf: bytes::BytesMut::new(),
        });
    }

    let cpu0 = server.sample().map(|s| s.cpu_s);
    let mut results = Vec::new();
    for (step, &rate) in rates.iter().enumerate() {
        let rate_each = rate as f64 / all.len() as f64;
        let t = Instant::now();
        let mut groups: Vec<Vec<Writer>> = (0..PACERS).map(|_| Vec::new()).collect();
        for (k, w) in all.drain(..).enumerate() {
            groups[k % PACERS].push(w);
        }
        let tasks: Vec<_> = groups
            .into_iter()
            .map(|g| tokio::spawn(pace(g, step, rate_each, step_dur)))
            .collect();
        for task in tasks {
            all.extend(task.await??);
        }
        let sent: u64 = all.iter().map(|w| w.step_sent).sum();
        let expected_seen = sent * OBSERVERS as u64;
        let drain_start = Instant::now();
        loop {
            let acked_all = all
                .iter()
                .all(|w| w.acked.load(Ordering::Acquire) >= w.sent);
            let got = seen.received[step].load(Ordering::Relaxed);
            if acked_all && got >= expected_seen {
                break;
            }
            if drain_start.elapsed() > DRAIN {
                bail!(
                    "step {rate} ops/s: not drained within {DRAIN:?} ({got} of {expected_seen} seen)"
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let total = t.elapsed();
        let drain_ms = drain_start.elapsed().as_secs_f64() * 1e3;
        let achieved = sent as f64 / total.as_secs_f64();
        results.push(StepResult {
            offered: rate,
            sent,
            achieved,
            hist: histogram(),
            drain_ms,
            ok: true,
        });
        // A step far below its offered rate ends the ramp.
        if achieved < 0.8 * rate as f64 {
            break;
        }
    }
    let cpu1 = server.sample().map(|s| s.cpu_s);
    stop.cancel();
    for t in ack_tasks {
        t.await??;
    }
    // Every observer received every op of its document, once.
    let mut per_doc = vec![0u64; docs];
    for w in &all {
        per_doc[w.doc] += w.sent;
    }
    for (k, t) in obs_tasks.into_iter().enumerate() {
        let got = t.await??;
        let want = per_doc[k / OBSERVERS];
        if got != want {
            bail!("observer {k} received {got} ops of its document's {want}");
        }
    }
    for (r, h) in results.iter_mut().zip(&seen.hists) {
        r.hist.add(&*h.lock().map_err(|_| "poisoned")?)?;
    }
    for r in results.iter_mut() {
        r.ok =
            r.achieved >= 0.95 * r.offered as f64 && r.hist.value_at_quantile(0.99) < KNEE_P99_US;
    }
    // Every observer saw every op of its document: counts matched above.
    drop(all);
    let last = server.stop()?;

    let mut rep = Report::new(
        "many-docs",
        format!(
            "{docs} documents x ({WRITERS} writers + {OBSERVERS} observers) = {conns} sessions; \
             paced steps of {:?}",
            step_dur
        ),
    );
    rep.num("documents", "documents", docs as f64, "").num(
        "sessions",
        "sessions",
        conns as f64,
        "",
    );
    for r in &results {
        let p = format!("step_{}_", r.offered);
        let l = format!("{} ops/s offered:", r.offered);
        rep.num(
            &format!("{p}ops_per_s"),
            &format!("{l} durable ops/s"),
            r.achieved,
            "ops/s",
        )
        .num(
            &format!("{p}p50_us"),
            &format!("{l} fan-out p50"),
            r.hist.value_at_quantile(0.5) as f64,
            "µs",
        )
        .num(
            &format!("{p}p99_us"),
            &format!("{l} fan-out p99"),
            r.hist.value_at_quantile(0.99) as f64,
            "µs",
        )
        .num(
            &format!("{p}drain_ms"),
            &format!("{l} drain after the step"),
            r.drain_ms,
            "ms",
        );
        let _ = r.sent;
    }
    match results.iter().rev().find(|r| r.ok) {
        Some(k) => {
            rep.num(
                "knee_offered",
                "knee: offered rate",
                k.offered as f64,
                "ops/s",
            )
            .num(
                "ops_per_s",
                "knee: sustained durable ops/s",
                k.achieved,
                "ops/s",
            )
            .num(
                "p50_us",
                "knee: fan-out p50",
                k.hist.value_at_quantile(0.5) as f64,
                "µs",
            )
            .num(
                "p99_us",
                "knee: fan-out p99",
                k.hist.value_at_quantile(0.99) as f64,
                "µs",
            )
            .num(
                "p999_us",
                "knee: fan-out p99.9",
                k.hist.value_at_quantile(0.999) as f64,
                "µs",
            );
        }
        None => {
            rep.text(
                "knee_offered",
                "knee",
                "none: the first step was not sustained",
            );
        }
    }
    if let Some(c) = cpu0.zip(cpu1).map(|(a, b)| b - a) {
        rep.num("steps_server_cpu_s", "server CPU during the steps", c, "s");
    }
    rep.text(
        "check",
        "check",
        "every op acked; every observer received every op of its document",
    );
    rep.num(
        "load_average",
        "load average (1 min) at the end",
        proc::loadavg(),
        "",
    );
    rep.server(last).client(proc::sample_self());
    Ok(rep)
}
