//! The load generator behind `notesync-bench` (issue 6).
//!
//! Every scenario drives a live server over TCP (127.0.0.1 only) from one
//! tokio runtime, bounded in count and in time, and returns a [`Report`]:
//! one summary table and one flat JSON object. Without `--server` the
//! scenario starts the real `notesync-server` binary on a fresh temporary
//! data folder, so the server's memory and CPU can be read from /proc.
//!
//! Module map: [`proc`] (/proc readings, fd limit), [`server`] (the server
//! under test), [`net`] (raw pipelined connections), [`trace`] (editing
//! traces), [`report`], and one module per scenario ([`devices`] and
//! [`folder`] drive the `notesync` CLI, not raw connections).

pub mod catch_up;
pub mod cold_start;
pub mod connections;
pub mod devices;
pub mod feed;
pub mod folder;
pub mod live_trace;
pub mod many_docs;
pub mod net;
pub mod offline;
pub mod populate;
pub mod proc;
pub mod report;
pub mod server;
pub mod synclist;
pub mod trace;

use std::path::PathBuf;
use std::time::Duration;

use hdrhistogram::Histogram;

pub use report::Report;

/// Errors are reported, never recovered from: a failed check fails the run.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// Returns early with a formatted error.
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => { return Err(format!($($t)*).into()) };
}

/// The scenarios, in the order.
pub const SCENARIOS: &[&str] = &[
    "live-trace",
    "many-docs",
    "catch-up",
    "synclist-scale",
    "connections",
    "cold-start",
    "offline",
    "feed",
    "devices",
    "folder",
];

/// Options shared by every scenario (the command line, or the smoke test).
#[derive(Debug, Clone)]
pub struct Opts {
    /// Drive this server instead of starting one.
    pub server: Option<std::net::SocketAddr>,
    /// With `server`: its process id, to read its memory and CPU.
    pub server_pid: Option<u32>,
    /// The binary to start (default: the workspace's release build).
    pub server_bin: Option<PathBuf>,
    /// The editing trace (gzipped JSON, the automerge-paper format).
    pub trace: PathBuf,
    /// Small sizes, correctness only.
    pub smoke: bool,
    /// Overrides of the scenario's main size (edits, documents, connections).
    pub size: Option<usize>,
    /// Unacknowledged session ops a writer keeps in flight (live-trace).
    pub window: usize,
    /// Paced rate for live-trace's second phase, ops/s.
    pub paced_rate: u64,
    /// Reuse (and keep) a populated data folder (synclist-scale, cold-start).
    pub data: Option<PathBuf>,
    /// Repetitions inside a scenario where it measures one short thing.
    pub reps: usize,
    /// Upper bound on the whole scenario.
    pub deadline: Duration,
    /// feed: changes per second (one shape with `size` subscribers).
    pub rate: Option<u64>,
    /// feed: documents changed.
    pub docs: Option<usize>,
    /// feed: seconds of the paced phase.
    pub secs: Option<u64>,
    /// devices, folder: the `notesync` binary (default: the workspace's release build).
    pub cli_bin: Option<PathBuf>,
}

impl Opts {
    pub fn new(trace: PathBuf) -> Self {
        Opts {
            server: None,
            server_pid: None,
            server_bin: None,
            trace,
            smoke: false,
            size: None,
            window: 16_384,
            paced_rate: 10_000,
            data: None,
            reps: 0,
            deadline: Duration::from_secs(1800),
            rate: None,
            docs: None,
            secs: None,
            cli_bin: None,
        }
    }

    /// The default trace: ../shared/traces next to the repository (never
    /// copied into it).
    pub fn default_trace() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/traces/automerge-paper.json.gz")
    }

    /// `full` normally, `smoke` in smoke mode, `--size` if given.
    pub fn pick(&self, full: usize, smoke: usize) -> usize {
        self.size
            .unwrap_or(if self.smoke { smoke } else { full })
            .max(1)
    }

    pub fn reps_or(&self, full: usize, smoke: usize) -> usize {
        if self.reps > 0 {
            self.reps
        } else if self.smoke {
            smoke
        } else {
            full
        }
    }
}

/// Runs one scenario by name.
pub async fn run(name: &str, opts: &Opts) -> Result<Report> {
    let fut = async {
        match name {
            "live-trace" => live_trace::run(opts).await,
            "many-docs" => many_docs::run(opts).await,
            "catch-up" => catch_up::run(opts).await,
            "synclist-scale" => synclist::run(opts).await,
            "connections" => connections::run(opts).await,
            "cold-start" => cold_start::run(opts).await,
            "offline" => offline::run(opts).await,
            "feed" => feed::run(opts).await,
            "devices" => devices::run(opts).await,
            "folder" => folder::run(opts).await,
            other => bail!(
                "unknown scenario {other:?}; one of: {}",
                SCENARIOS.join(", ")
            ),
        }
    };
    let cpu0 = proc::sample_self().map(|s| s.cpu_s);
    let mut report = match tokio::time::timeout(opts.deadline, fut).await {
        Ok(r) => r?,
        Err(_) => bail!("{name}: did not finish within {:?}", opts.deadline),
    };
    // This run's own CPU (several runs share the process).
    if let (Some(a), Some(b)) = (cpu0, proc::sample_self().map(|s| s.cpu_s)) {
        report.set_num("client_cpu_s", b - a);
    }
    Ok(report)
}

/// A latency histogram in microseconds (1 µs to 1 hour, 3 digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// Identifiers unique to this run, so runs against one long-lived server
/// never collide.
pub fn run_id() -> u128 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (t ^ ((std::process::id() as u128) << 64)) << 24
}

/// The median of a list (empty: 0).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}
