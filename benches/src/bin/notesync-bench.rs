//! `notesync-bench SCENARIO [--server ADDR] [--trace FILE] [--json] [--smoke]`:
//! drives a live notesync server over TCP (127.0.0.1) and reports one table
//! (and with `--json`, one JSON object on stdout; the table then goes to
//! stderr). See BENCHMARKS.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use notesync_benches::load::{self, Opts, SCENARIOS};

#[derive(Parser, Debug)]
#[command(name = "notesync-bench", about, long_about = None)]
struct Args {
    /// live-trace, many-docs, catch-up, synclist-scale, connections,
    /// cold-start, offline, feed, devices, folder, or all.
    scenario: String,
    /// Drive this server instead of starting target/release/notesync-server.
    #[arg(long, value_name = "ADDR")]
    server: Option<SocketAddr>,
    /// With --server: its pid, to report its memory and CPU.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// The server binary to start (default: the workspace's release build).
    #[arg(long, value_name = "FILE")]
    server_bin: Option<PathBuf>,
    /// The editing trace (default ../shared/traces/automerge-paper.json.gz).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Small sizes; checks correctness only.
    #[arg(long)]
    smoke: bool,
    /// Override the scenario's main size (edits, documents, connections).
    #[arg(long, value_name = "N")]
    size: Option<usize>,
    /// Unacknowledged ops the live-trace writer keeps in flight.
    #[arg(long, value_name = "N", default_value_t = 16_384)]
    window: usize,
    /// live-trace's paced rate, ops/s (0: skip the paced phase).
    #[arg(long, value_name = "OPS", default_value_t = 10_000)]
    paced_rate: u64,
    /// Populated data folder to reuse and keep (synclist-scale, cold-start).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Repetitions of short measurements (pulls, synclists, restarts).
    #[arg(long, value_name = "N", default_value_t = 0)]
    reps: usize,
    /// Run each scenario this many times and report the medians.
    #[arg(long, value_name = "N", default_value_t = 1)]
    runs: usize,
    /// feed: changes per second (with --size: subscribers).
    #[arg(long, value_name = "N")]
    rate: Option<u64>,
    /// feed: documents the writers change (default 1,000).
    #[arg(long, value_name = "N")]
    docs: Option<usize>,
    /// feed: seconds of the paced phase (default 10).
    #[arg(long, value_name = "SECS")]
    secs: Option<u64>,
    /// devices, folder: the notesync CLI binary (default: the workspace's release build).
    #[arg(long, value_name = "FILE")]
    cli_bin: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    deadline: u64,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let mut opts = Opts::new(a.trace.unwrap_or_else(Opts::default_trace));
    opts.server = a.server;
    opts.server_pid = a.server_pid;
    opts.server_bin = a.server_bin;
    opts.smoke = a.smoke;
    opts.size = a.size;
    opts.window = a.window.max(1);
    opts.paced_rate = a.paced_rate;
    opts.data = a.data;
    opts.reps = a.reps;
    opts.deadline = Duration::from_secs(a.deadline);
    opts.rate = a.rate;
    opts.docs = a.docs;
    opts.secs = a.secs;
    opts.cli_bin = a.cli_bin;
    let names: Vec<&str> = if a.scenario == "all" {
        SCENARIOS.to_vec()
    } else {
        vec![a.scenario.as_str()]
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("notesync-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for name in names {
        let mut reports = Vec::new();
        let mut error = None;
        for run in 0..a.runs.max(1) {
            match rt.block_on(load::run(name, &opts)) {
                Ok(r) => {
                    if a.runs > 1 {
                        eprintln!(
                            "run {} of {}: load average {:.2}\n{}",
                            run + 1,
                            a.runs,
                            load::proc::loadavg(),
                            r.table()
                        );
                    }
                    reports.push(r);
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let result = match error {
            Some(e) => Err(e),
            None if reports.len() == 1 => Ok(reports.remove(0)),
            None => load::Report::median_of(&reports).ok_or_else(|| "no run".into()),
        };
        match result {
            Ok(report) => {
                if a.json {
                    eprint!("{}", report.table());
                    println!("{}", report.json());
                } else {
                    print!("{}", report.table());
                }
            }
            Err(e) => {
                eprintln!("notesync-bench {name}: FAILED: {e}");
                failed = true;
            }
        }
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
