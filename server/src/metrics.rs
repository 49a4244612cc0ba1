//! Prometheus metrics: counters kept as the server runs, and their text
//! encoding. Served on `GET /metrics` by `metrics_http`.
//!
//! A leaf: depends on nothing else in the crate, so every layer may count
//! (rooms, writer, connections) without a cycle. The counters are
//! process-wide (one server per process in production; servers embedded in
//! one test process add up). Every update on a hot path is one relaxed
//! atomic add, nothing allocates or locks per frame: the histograms (one
//! lock each) are observed once per commit, not per op. Gauges that
//! describe a server's state (namespaces open, documents in the synclist
//! indexes) are given by the exposition when it is scraped.

use std::io;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

use notesync_protocol::ErrorCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

type CodeLabel = [(&'static str, &'static str); 1];

pub(crate) struct Metrics {
    connections_open: Gauge,
    connections_accepted: Counter,
    sessions_open: Gauge,
    namespaces_open: Gauge,
    documents: Gauge,
    ops: Counter,
    requests: Counter,
    commits: Counter,
    batch_requests: Histogram,
    commit_seconds: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
    /// The `error_frames` family's counter of each code, by code byte.
    errors: Vec<Counter>,
    slow_readers: Counter,
    registry: Registry,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("notesync");
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections open",
            connections_open.clone(),
        );
        let connections_accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "Client connections accepted and served",
            connections_accepted.clone(),
        );
        let sessions_open = Gauge::default();
        registry.register(
            "sessions_open",
            "Live editing sessions open",
            sessions_open.clone(),
        );
        let namespaces_open = Gauge::default();
        registry.register(
            "namespaces_open",
            "Namespaces open (a database, index and writer each)",
            namespaces_open.clone(),
        );
        let documents = Gauge::default();
        registry.register(
            "documents",
            "Documents in the synclist indexes of the open namespaces",
            documents.clone(),
        );
        let ops = Counter::default();
        registry.register(
            "ops_committed",
            "Ops (atom inserts, deletes, renames) in committed batches",
            ops.clone(),
        );
        let requests = Counter::default();
        registry.register(
            "write_requests",
            "Requests handled by the writers",
            requests.clone(),
        );
        let commits = Counter::default();
        registry.register(
            "commits",
            "Write transactions committed (one fsync each)",
            commits.clone(),
        );
        let batch_requests = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "commit_batch_requests",
            "Requests per committed batch",
            batch_requests.clone(),
        );
        let commit_seconds = Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        registry.register(
            "commit_seconds",
            "Time to commit a batch (write transaction and fsync), in seconds",
            commit_seconds.clone(),
        );
        let bytes_in = Counter::default();
        registry.register(
            "received_bytes",
            "Bytes read from client connections",
            bytes_in.clone(),
        );
        let bytes_out = Counter::default();
        registry.register(
            "sent_bytes",
            "Bytes written to client connections",
            bytes_out.clone(),
        );
        let family = Family::<CodeLabel, Counter>::default();
        registry.register(
            "error_frames",
            "Error frames sent, by code name (PROTOCOL.md section 4)",
            family.clone(),
        );
        let unknown = family.get_or_create(&[("code", "unknown")]).clone();
        let mut errors = vec![unknown; 256];
        for &code in ErrorCode::ALL {
            errors[usize::from(code.0)] = family.get_or_create(&[("code", code.name())]).clone();
        }
        let slow_readers = Counter::default();
        registry.register(
            "slow_reader_disconnects",
            "Connections dropped because their outbound queue was full",
            slow_readers.clone(),
        );
        Metrics {
            connections_open,
            connections_accepted,
            sessions_open,
            namespaces_open,
            documents,
            ops,
            requests,
            commits,
            batch_requests,
            commit_seconds,
            bytes_in,
            bytes_out,
            errors,
            slow_readers,
            registry,
        }
    }
}

// ---------------------------------------------------------------- hot-path hooks

/// Counts an accepted connection; the guard keeps it counted as open.
pub(crate) fn connection() -> OpenGuard {
    let m = &*METRICS;
    m.connections_accepted.inc();
    m.connections_open.inc();
    OpenGuard(&m.connections_open)
}

/// Counts an open session for the guard's lifetime.
pub(crate) fn session() -> OpenGuard {
    let m = &*METRICS;
    m.sessions_open.inc();
    OpenGuard(&m.sessions_open)
}

/// Decrements its gauge when dropped.
pub(crate) struct OpenGuard(&'static Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An error frame with this code was made to be sent.
pub(crate) fn error_frame(code: ErrorCode) {
    METRICS.errors[usize::from(code.0)].inc();
}

/// A connection was dropped as a slow reader.
pub(crate) fn slow_reader() {
    METRICS.slow_readers.inc();
}

/// A writer batch: `requests` handled, `ops` applied, and the commit's
/// duration if it committed.
pub(crate) fn batch(requests: usize, ops: u64, commit_micros: Option<u64>) {
    let m = &*METRICS;
    m.requests.inc_by(requests as u64);
    if let Some(us) = commit_micros {
        m.ops.inc_by(ops);
        m.commits.inc();
        m.batch_requests.observe(requests as f64);
        m.commit_seconds.observe(us as f64 / 1e6);
    }
}

/// A connection's stream, counting the bytes read and written.
pub(crate) struct Counted<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            METRICS.bytes_in.inc_by(n as u64);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.0).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            METRICS.bytes_out.inc_by(n as u64);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.0).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            METRICS.bytes_out.inc_by(n as u64);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The metrics, as Prometheus (OpenMetrics) text, with the server-state
/// gauges set to `namespaces` open and `documents` in their indexes.
pub(crate) fn render(namespaces: i64, documents: i64) -> String {
    let m = &*METRICS;
    m.namespaces_open.set(namespaces);
    m.documents.set(documents);
    let mut out = String::with_capacity(8192);
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
    out
}
