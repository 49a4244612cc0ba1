//! Scenario `devices` (issue 17): two folders under `notesync watch` on
//! one server, as a person's laptop and phone. Measures edit-to-other-
//! device latency, from a file saved in A to the same text in B's file,
//! and what each watcher costs while nothing changes.
//!
//! The edits rotate over [`NOTES`] notes, [`GAP`] apart, so each note
//! changes every 2 s. That is past the watchers' `--live-window 1`, so
//! every edit travels by sync mode and the change feed, not by a live
//! session: the path of a device that edits now and then. Each edit
//! appends a line. B's file is read every [`POLL`] until it holds the new
//! text. The latency therefore includes A's 200 ms debounce (the CLI
//! waits for the folder to go quiet), its sync, the feed's window, B's
//! pull and B's file write. Both watchers keep the default `--interval
//! 30`, so a poll can bring no edit sooner than 30 s.
//!
//! `--size N`: edits (default 100). `--cli-bin FILE` (or
//! `NOTESYNC_CLI_BIN`): the `notesync` binary (default: the workspace's
//! release build). An older binary shows the time before the feed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::proc::{self, Sample};
use super::server::{ServerUnderTest, build_binary};
use super::{Opts, Report, Result, histogram};
use crate::bail;

/// Notes the edits rotate over.
const NOTES: usize = 10;
/// Between two edits (so a note changes every `NOTES * GAP`).
const GAP: Duration = Duration::from_millis(200);
/// How often B's file is read while an edit is awaited.
const POLL: Duration = Duration::from_millis(2);
/// One edit not across after this long fails the run.
const LIMIT: Duration = Duration::from_secs(60);

/// The `notesync` binary: `--cli-bin`, else `NOTESYNC_CLI_BIN`, else the
/// workspace's release build (built now if stale).
pub fn cli_binary(opts: &Opts) -> Result<PathBuf> {
    if let Some(b) = &opts.cli_bin {
        return Ok(b.clone());
    }
    if let Some(b) = std::env::var_os("NOTESYNC_CLI_BIN") {
        return Ok(PathBuf::from(b));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("benches/ has no parent")?;
    build_binary(workspace, "notesync-client", "notesync", true)
}

/// A `notesync watch` process; stopped with SIGINT when dropped.
struct Watch {
    child: Child,
    log: PathBuf,
}

impl Watch {
    fn start(cli: &Path, dir: &Path, addr: &str) -> Result<Watch> {
        let log = dir.with_extension("out");
        let child = Command::new(cli)
            .arg("watch")
            .arg(dir)
            .args(["--server", addr, "--interval", "30", "--live-window", "1"])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(dir.with_extension("err"))?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", cli.display()))?;
        let w = Watch { child, log };
        wait_for("watch to start", || {
            fs::read_to_string(&w.log).is_ok_and(|t| t.contains("watching"))
        })?;
        Ok(w)
    }

    fn sample(&self) -> Option<Sample> {
        proc::sample(self.child.id())
    }

    /// SIGINT, then waits (bounded) for a clean exit.
    fn stop(mut self) -> Result<()> {
        // SAFETY: signals our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + LIMIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("watch exited with {status}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("watch did not stop within {LIMIT:?} of SIGINT")
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + LIMIT;
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out after {LIMIT:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

fn note(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("note{i}.md"))
}

pub async fn run(opts: &Opts) -> Result<Report> {
    let opts = opts.clone();
    tokio::task::spawn_blocking(move || run_blocking(&opts)).await?
}

fn run_blocking(opts: &Opts) -> Result<Report> {
    let edits = opts.pick(100, 4);
    let idle = if opts.smoke {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    };
    let cli = cli_binary(opts)?;
    let server = ServerUnderTest::start(opts, &[])?;
    let addr = server.addr.to_string();
    let tmp = tempfile::Builder::new()
        .prefix("notesync-bench-devices-")
        .tempdir()?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    fs::create_dir(&a)?;
    fs::create_dir(&b)?;
    let mut texts: Vec<String> = (0..NOTES).map(|i| format!("note {i}\n")).collect();
    for (i, t) in texts.iter().enumerate() {
        fs::write(note(&a, i), t)?;
    }
    let synced = Command::new(&cli)
        .arg("sync")
        .arg(&a)
        .args(["--server", &addr])
        .stdin(Stdio::null())
        .output()?;
    if !synced.status.success() {
        bail!(
            "notesync sync failed: {}",
            String::from_utf8_lossy(&synced.stderr)
        );
    }
    let wa = Watch::start(&cli, &a, &addr)?;
    let wb = Watch::start(&cli, &b, &addr)?;
    wait_for("B to get the notes", || {
        texts
            .iter()
            .enumerate()
            .all(|(i, t)| fs::read_to_string(note(&b, i)).is_ok_and(|x| x == *t))
    })?;

    // Nothing changes: what each watcher costs then.
    let before = (wa.sample(), wb.sample());
    std::thread::sleep(idle);
    let after = (wa.sample(), wb.sample());
    let idle_cpu = |x: Option<Sample>, y: Option<Sample>| match (x, y) {
        (Some(x), Some(y)) => 100.0 * (y.cpu_s - x.cpu_s) / idle.as_secs_f64(),
        _ => f64::NAN,
    };
    let (idle_a, idle_b) = (idle_cpu(before.0, after.0), idle_cpu(before.1, after.1));

    let mut h = histogram();
    for k in 0..edits {
        let i = k % NOTES;
        texts[i].push_str(&format!("edit {k}\n"));
        let start = Instant::now();
        fs::write(note(&a, i), &texts[i])?;
        let path = note(&b, i);
        while !fs::read_to_string(&path).is_ok_and(|x| x == texts[i]) {
            if start.elapsed() > LIMIT {
                bail!("edit {k} of note{i}.md did not reach B within {LIMIT:?}");
            }
            std::thread::sleep(POLL);
        }
        h.record(start.elapsed().as_micros().max(1) as u64)?;
        if let Some(rest) = GAP.checked_sub(start.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let cli_rss = wb.sample().map(|s| s.hwm as f64).unwrap_or(f64::NAN);
    wa.stop()?;
    wb.stop()?;

    let mut r = Report::new(
        "devices",
        format!(
            "two folders under notesync watch: {edits} edits saved in A over {NOTES} notes, \
             {GAP:?} apart, each awaited in B's file"
        ),
    );
    r.num("edits", "edits", edits as f64, "");
    r.latency("edit_to_device_", "edit saved in A to B's file", &h);
    r.num(
        "idle_cpu_a_pct",
        "watch A's CPU while nothing changes",
        idle_a,
        "%",
    );
    r.num(
        "idle_cpu_b_pct",
        "watch B's CPU while nothing changes",
        idle_b,
        "%",
    );
    r.num("cli_peak_rss_bytes", "watch B's peak RSS", cli_rss, "B");
    r.server(server.stop()?).client(proc::sample_self());
    Ok(r)
}
