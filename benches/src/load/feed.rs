//! Scenario `feed` (issue 17): subscribed connections on one namespace
//! while a few sync writers upsert at a paced rate; delivery latency from
//! commit to every subscriber, server CPU, and memory per subscriber.
//!
//! Shapes (default, both): A = 10,000 subscribers, 100 changes/s; B =
//! 1,000 subscribers, 1,000 changes/s; 1,000 documents. `--size N`
//! (subscribers), `--rate R` (changes/s), `--docs D` and `--secs S` run
//! one shape. Subscribers say hello version 4, go idle with a synclist (an
//! idle sync connection, measured), then send 5 from the cursor after the
//! documents were created and read until the 39.
//!
//! Latency of a (subscriber, change) pair: from the writer sending the
//! upsert (so it includes the commit's fsync) to the subscriber receiving
//! the first 38 entry for that document that arrives after the send. (A
//! 34's sync_time may be later than the change's own time, so entries are
//! matched by arrival, not by time; each document changes about once a
//! second, far apart from the latencies measured.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use notesync_protocol::{ClientFrame, DocName, PidList, ServerFrame, Time, Upsert, VERSION_FEED};
use tokio_util::sync::CancellationToken;

use super::net::{self, Conn, Reader, bounded};
use super::populate::{self, doc_id};
use super::proc::{self, Sample};
use super::server::ServerUnderTest;
use super::{Opts, Report, Result, histogram, run_id};
use crate::bail;

const CONCURRENCY: usize = 128;
const WRITERS: usize = 4;
const TICK: Duration = Duration::from_millis(5);
/// Longest wait after the paced phase for every subscriber to catch up.
const DRAIN: Duration = Duration::from_secs(20);

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_us() -> u64 {
    base().elapsed().as_micros() as u64
}

/// One received entry: document index, its time, arrival (µs).
type Got = (u32, Time, u64);

struct SubResult {
    got: Vec<Got>,
    /// Why the connection ended before the stop, if it did.
    dropped: Option<String>,
}

async fn subscriber(
    mut rd: Reader,
    wr: tokio::net::tcp::OwnedWriteHalf,
    salt: u64,
    docs: usize,
    seen: Arc<AtomicU64>,
    stop: CancellationToken,
) -> SubResult {
    let _wr = wr;
    let mut got = Vec::new();
    let mut last: Time = seen.load(Ordering::Relaxed);
    loop {
        let f = tokio::select! {
            _ = stop.cancelled() => return SubResult { got, dropped: None },
            f = net::recv(&mut rd, Duration::from_secs(3600)) => f,
        };
        let now = now_us();
        match f {
            Ok(ServerFrame::FeedChanges(e)) => {
                for e in e.iter() {
                    if e.time <= last {
                        let msg = format!("feed time {} after {last}", e.time);
                        return SubResult {
                            got,
                            dropped: Some(msg),
                        };
                    }
                    last = e.time;
                    let d = (e.doc ^ doc_id(salt, 0)) as u64;
                    if (d as usize) < docs {
                        got.push((d as u32, e.time, now));
                    }
                }
                seen.store(last, Ordering::Relaxed);
            }
            Ok(ServerFrame::FeedHeartbeat { time }) => {
                last = last.max(time);
                seen.store(last, Ordering::Relaxed);
            }
            Ok(other) => {
                return SubResult {
                    got,
                    dropped: Some(format!("unexpected {other:?}")),
                };
            }
            Err(e) => {
                return SubResult {
                    got,
                    dropped: Some(e.to_string()),
                };
            }
        }
    }
}

/// One writer: upserts (a rename) to its share of the documents at
/// `rate` per second for `dur`; returns every (document, sync_time, 34
/// arrival).
async fn writer(
    c: Conn,
    k: usize,
    salt: u64,
    docs: usize,
    rate: f64,
    dur: Duration,
) -> Result<Vec<(u32, Time, u64)>> {
    let Conn { mut rd, mut wr, .. } = c;
    let mine: Vec<usize> = (k..docs).step_by(WRITERS).collect();
    // The writer's final count, once known; the reader stops at it.
    let (total_tx, mut total_rx) = tokio::sync::watch::channel(u64::MAX);
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        while (out.len() as u64) < *total_rx.borrow_and_update() {
            let f = tokio::select! {
                _ = total_rx.changed() => continue,
                f = net::recv(&mut rd, net::REPLY_TIMEOUT) => f,
            };
            match f {
                Ok(ServerFrame::DocSync { doc, sync_time, .. }) => {
                    let d = (doc ^ doc_id(salt, 0)) as u32;
                    out.push((d, sync_time, now_us()));
                }
                Ok(ServerFrame::DocResponse(_)) => {}
                Ok(other) => bail!("writer: unexpected {other:?}"),
                Err(e) => bail!("writer: {e}"),
            }
        }
        Ok::<_, super::Error>(out)
    });
    let start = Instant::now();
    let mut sent = 0u64;
    let mut buf = bytes::BytesMut::new();
    // When each upsert was written (replies come in request order).
    let mut sent_at: Vec<u64> = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let phase = (k as f64 * 0.618_033_988_7).fract();
    while start.elapsed() < dur {
        tick.tick().await;
        let due = (start.elapsed().min(dur).as_secs_f64() * rate + phase) as u64;
        while sent < due {
            let d = mine[(sent as usize * 7 + k) % mine.len()] as u64;
            ClientFrame::Upsert(Upsert {
                doc: doc_id(salt, d),
                name: DocName::new(format!("note {d} rev {sent}"))?,
                // A rename since a time after every change is applied
                // (PROTOCOL.md 3.1); since 0 it would lose to the name
                // set at creation and change nothing.
                since: Time::MAX - 1,
                inserts: Default::default(),
                deletes: PidList::default(),
            })
            .encode(&mut buf);
            sent += 1;
        }
        if !buf.is_empty() {
            let at = now_us();
            tokio::io::AsyncWriteExt::write_all(&mut wr, &buf).await?;
            sent_at.resize(sent as usize, at);
            buf.clear();
        }
    }
    total_tx.send_replace(sent);
    let mut out = reader.await??;
    drop(wr);
    if (out.len() as u64) < sent {
        bail!("writer {k}: {} of {sent} upserts answered", out.len());
    }
    // A 34's sync_time covers its change but may be later than the
    // change's own time (the reply's snapshot), so a feed entry is matched
    // to a change by arrival: the first entry for the document that
    // arrives after the upsert was sent. Latency counts from the send, so
    // it includes the commit's fsync.
    for (o, &at) in out.iter_mut().zip(&sent_at) {
        o.2 = at;
    }
    Ok(out)
}

struct Shape {
    subs: usize,
    rate: u64,
}

async fn settle(server: &ServerUnderTest) -> Option<Sample> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.sample()
}

async fn shape(
    opts: &Opts,
    s: &Shape,
    docs: usize,
    dur: Duration,
    r: &mut Report,
) -> Result<Option<Sample>> {
    let n = s.subs;
    let limit = proc::raise_fd_limit(n as u64 + 1_024);
    if limit < n as u64 + 64 {
        bail!("the open-files limit is {limit}; {n} connections need more");
    }
    let max = (n + 100).to_string();
    let server = ServerUnderTest::start(opts, &["--max-connections", &max])?;
    let addr = server.addr;
    let id = run_id();
    let salt = (id >> 24) as u64 ^ s.rate;
    base();
    let p = populate::upserts(addr, id | 1, docs as u64, 4, move |d| {
        populate::create(salt, d, 0)
    })
    .await?;
    let cursor = p.last_time;
    drop(super::connections::idle_sync(addr, id | 2, VERSION_FEED).await?);
    let rss0 = settle(&server).await;
    let conns: Vec<Conn> = bounded((0..n).collect(), CONCURRENCY, |k| async move {
        super::connections::idle_sync(addr, id | ((k as u128 + 16) << 4), VERSION_FEED).await
    })
    .await?;
    let rss1 = settle(&server).await;
    // Subscribe every connection from the cursor; read to the 39.
    let t_sub = Instant::now();
    let conns = bounded(conns, CONCURRENCY, |mut c| async move {
        c.send(&ClientFrame::Subscribe { since: cursor }).await?;
        let mut last = cursor;
        loop {
            match c.recv().await? {
                ServerFrame::FeedChanges(e) => {
                    if let Some(x) = e.iter().last() {
                        last = x.time;
                    }
                }
                ServerFrame::FeedHeartbeat { time } => return Ok((c, last.max(time))),
                other => bail!("subscribe: unexpected {other:?}"),
            }
        }
    })
    .await?;
    let subscribe_s = t_sub.elapsed().as_secs_f64();
    let rss2 = settle(&server).await;
    let stop = CancellationToken::new();
    let mut seen = Vec::new();
    let mut tasks = Vec::new();
    for (c, last) in conns {
        let a = Arc::new(AtomicU64::new(last));
        seen.push(a.clone());
        tasks.push(tokio::spawn(subscriber(
            c.rd,
            c.wr,
            salt,
            docs,
            a,
            stop.clone(),
        )));
    }
    let mut wconns = Vec::new();
    for k in 0..WRITERS {
        wconns.push(Conn::connect(addr, Some(id | (k as u128 + 3))).await?);
    }
    let cpu0 = server.sample();
    let t0 = Instant::now();
    let rate_each = s.rate as f64 / WRITERS as f64;
    let wtasks: Vec<_> = wconns
        .into_iter()
        .enumerate()
        .map(|(k, c)| tokio::spawn(writer(c, k, salt, docs, rate_each, dur)))
        .collect();
    let mut changes: Vec<(u32, Time, u64)> = Vec::new();
    for t in wtasks {
        changes.extend(t.await??);
    }
    let newest = changes.iter().map(|c| c.1).max().unwrap_or(cursor);
    let drain_t = Instant::now();
    while drain_t.elapsed() < DRAIN {
        let behind = seen
            .iter()
            .filter(|a| a.load(Ordering::Relaxed) < newest)
            .count();
        if behind == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let phase_s = t0.elapsed().as_secs_f64();
    let cpu1 = server.sample();
    stop.cancel();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await?);
    }
    let last = server.stop()?;

    // Per document, its changes by time.
    let mut by_doc: Vec<Vec<(Time, u64)>> = vec![Vec::new(); docs];
    for &(d, t, at) in &changes {
        if let Some(v) = by_doc.get_mut(d as usize) {
            v.push((t, at));
        }
    }
    for v in by_doc.iter_mut() {
        v.sort_unstable();
    }
    let mut hist = histogram();
    let mut delivered = 0u64;
    let mut entries = 0u64;
    let mut drops = 0usize;
    let mut drop_reason = None;
    for res in &results {
        if let Some(why) = &res.dropped {
            drops += 1;
            drop_reason.get_or_insert_with(|| why.clone());
        }
        entries += res.got.len() as u64;
        // Per document: how many of its changes this subscriber has had.
        let mut covered = vec![0usize; docs];
        for &(d, _, at) in &res.got {
            let v = &by_doc[d as usize];
            let c = &mut covered[d as usize];
            while *c < v.len() && v[*c].1 < at {
                let (_, sent) = v[*c];
                hist.saturating_record((at - sent).max(1));
                delivered += 1;
                *c += 1;
            }
        }
    }
    let pairs = changes.len() as u64 * n as u64;
    let p = format!("s{n}_r{}_", s.rate);
    let l = format!("{n} subs, {} ch/s:", s.rate);
    r.num(
        &format!("{p}changes"),
        &format!("{l} changes"),
        changes.len() as f64,
        "",
    )
    .num(
        &format!("{p}changes_per_s"),
        &format!("{l} achieved rate"),
        changes.len() as f64 / dur.as_secs_f64(),
        "ch/s",
    )
    .num(
        &format!("{p}delivery_p50_us"),
        &format!("{l} delivery p50"),
        hist.value_at_quantile(0.5) as f64,
        "µs",
    )
    .num(
        &format!("{p}delivery_p99_us"),
        &format!("{l} delivery p99"),
        hist.value_at_quantile(0.99) as f64,
        "µs",
    )
    .num(
        &format!("{p}delivery_max_us"),
        &format!("{l} delivery max"),
        hist.max() as f64,
        "µs",
    )
    .num(
        &format!("{p}delivered_fraction"),
        &format!("{l} (subscriber, change) pairs delivered"),
        if pairs == 0 {
            0.0
        } else {
            delivered as f64 / pairs as f64
        },
        "",
    )
    .num(
        &format!("{p}entries_per_change"),
        &format!("{l} entries received per (subscriber, change)"),
        if pairs == 0 {
            0.0
        } else {
            entries as f64 / pairs as f64
        },
        "",
    )
    .num(
        &format!("{p}drops"),
        &format!("{l} subscribers dropped"),
        drops as f64,
        "",
    )
    .num(
        &format!("{p}subscribe_s"),
        &format!("{l} time to subscribe all (to the 39s)"),
        subscribe_s,
        "s",
    );
    if let Some(why) = drop_reason {
        r.text(&format!("{p}drop_reason"), &format!("{l} first drop"), &why);
    }
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        let cpu = b.cpu_s - a.cpu_s;
        r.num(
            &format!("{p}server_cpu_per_s"),
            &format!("{l} server CPU per second (measured phase)"),
            cpu / phase_s,
            "s/s",
        )
        .num(
            &format!("{p}server_cpu_us_per_entry"),
            &format!("{l} server CPU per delivered pair"),
            if delivered == 0 {
                0.0
            } else {
                cpu * 1e6 / delivered as f64
            },
            "µs",
        );
    }
    if let (Some(a), Some(b), Some(c)) = (rss0, rss1, rss2) {
        r.num(
            &format!("{p}bytes_per_idle_sync_conn"),
            &format!("{l} server RSS per idle sync connection"),
            (b.rss as f64 - a.rss as f64) / n as f64,
            "bytes",
        )
        .num(
            &format!("{p}bytes_per_subscriber"),
            &format!("{l} server RSS per idle subscriber"),
            (c.rss as f64 - a.rss as f64) / n as f64,
            "bytes",
        );
    }
    if let Some(l2) = last {
        r.num(
            &format!("{p}server_peak_rss_bytes"),
            &format!("{l} server peak RSS"),
            l2.hwm as f64,
            "bytes",
        );
    }
    r.num(
        &format!("{p}load_average"),
        &format!("{l} load average (1 min) at the end"),
        proc::loadavg(),
        "",
    );
    Ok(last)
}

pub async fn run(opts: &Opts) -> Result<Report> {
    let docs = opts.docs.unwrap_or(if opts.smoke { 50 } else { 1_000 });
    let dur = Duration::from_secs(opts.secs.unwrap_or(if opts.smoke { 2 } else { 10 }));
    let shapes: Vec<Shape> = match (opts.size, opts.rate) {
        (None, None) if opts.smoke => vec![Shape { subs: 20, rate: 50 }],
        (None, None) => vec![
            Shape {
                subs: 10_000,
                rate: 100,
            },
            Shape {
                subs: 1_000,
                rate: 1_000,
            },
        ],
        (n, rate) => vec![Shape {
            subs: n.unwrap_or(1_000).max(1),
            rate: rate.unwrap_or(100).max(1),
        }],
    };
    let mut r = Report::new(
        "feed",
        format!(
            "change feed: {} over {docs} documents, {WRITERS} writers, {dur:?} paced",
            shapes
                .iter()
                .map(|s| format!("{} subscribers at {} changes/s", s.subs, s.rate))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    );
    // The server rows every scenario has: the peak over the shapes, CPU
    // summed (one fresh server per shape).
    let mut total: Option<Sample> = None;
    for s in &shapes {
        if let Some(x) = shape(opts, s, docs, dur, &mut r).await? {
            let t = total.get_or_insert_with(Sample::default);
            t.rss = t.rss.max(x.rss);
            t.hwm = t.hwm.max(x.hwm);
            t.cpu_s += x.cpu_s;
        }
    }
    r.server(total).client(proc::sample_self());
    Ok(r)
}
