//! The server under test: the real `notesync-server` binary started on a
//! data folder (fresh and temporary unless given), or an external address.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::proc::{self, Sample};
use super::{Opts, Result};
use crate::bail;

/// How long a server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a server may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running server.
pub struct ServerUnderTest {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    child: Option<Child>,
    /// Kept alive (and removed at the end) when the folder is temporary.
    _tmp: Option<tempfile::TempDir>,
    pub data_dir: Option<PathBuf>,
    /// From spawn to the listening line.
    pub started_in: Duration,
}

/// The binary to start: `--server-bin`, else `NOTESYNC_SERVER_BIN`, else the
/// workspace's release build (built now if missing or stale; cargo makes
/// that a no-op when it is fresh).
pub fn server_binary(opts: &Opts) -> Result<PathBuf> {
    if let Some(b) = &opts.server_bin {
        return Ok(b.clone());
    }
    if let Some(b) = std::env::var_os("NOTESYNC_SERVER_BIN") {
        return Ok(PathBuf::from(b));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("benches/ has no parent")?
        .to_path_buf();
    build_server(&workspace, true)
}

/// `cargo build [--release] -p notesync-server --bin notesync-server`;
/// returns the executable cargo reports.
pub fn build_server(workspace: &Path, release: bool) -> Result<PathBuf> {
    build_binary(workspace, "notesync-server", "notesync-server", release)
}

/// `cargo build [--release] -p PACKAGE --bin BIN`; returns the executable
/// cargo reports.
pub fn build_binary(workspace: &Path, package: &str, bin: &str, release: bool) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "-p", package, "--bin", bin])
        .arg("--message-format=json-render-diagnostics");
    if release {
        cmd.arg("--release");
    }
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        bail!("building {bin} failed ({})", out.status);
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["target"]["name"] == bin
            && let Some(exe) = v["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo built {bin} but did not report its executable")
}

impl ServerUnderTest {
    /// The server for a scenario: `--server` if given, else a fresh one
    /// (`extra` are added to its command line).
    pub fn start(opts: &Opts, extra: &[&str]) -> Result<Self> {
        if let Some(addr) = opts.server {
            return Ok(ServerUnderTest {
                addr,
                pid: opts.server_pid,
                child: None,
                _tmp: None,
                data_dir: None,
                started_in: Duration::ZERO,
            });
        }
        let tmp = tempfile::Builder::new()
            .prefix("notesync-bench-")
            .tempdir()?;
        let dir = tmp.path().to_owned();
        let mut s = Self::spawn(&server_binary(opts)?, &dir, extra)?;
        s._tmp = Some(tmp);
        Ok(s)
    }

    /// Starts `bin` on `dir` and waits for its listening line.
    pub fn spawn(bin: &Path, dir: &Path, extra: &[&str]) -> Result<Self> {
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(dir)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("NOTESYNC_BENCH_SERVER_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(l))) => l,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the server did not print its listening line: {other:?}");
            }
        };
        let started_in = started.elapsed();
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| format!("unexpected first line {line:?}"))?
            .parse()?;
        Ok(ServerUnderTest {
            addr,
            pid: Some(child.id()),
            child: Some(child),
            _tmp: None,
            data_dir: Some(dir.to_owned()),
            started_in,
        })
    }

    /// The server's memory and CPU now (None for an external server
    /// without `--server-pid`).
    pub fn sample(&self) -> Option<Sample> {
        self.pid.and_then(proc::sample)
    }

    /// Stops a server this run started (SIGTERM, bounded wait, then KILL);
    /// its last reading first.
    pub fn stop(mut self) -> Result<Option<Sample>> {
        let last = self.sample();
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let t = Instant::now();
            loop {
                if let Some(status) = child.try_wait()? {
                    if !status.success() {
                        bail!("the server exited with {status}");
                    }
                    break;
                }
                if t.elapsed() > STOP_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("the server did not stop within {STOP_TIMEOUT:?} of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(last)
    }
}

impl ServerUnderTest {
    /// Stops the server but keeps its temporary data folder (returned: it
    /// is removed when dropped).
    pub fn stop_keep(mut self) -> Result<(Option<Sample>, Option<tempfile::TempDir>)> {
        let tmp = self._tmp.take();
        Ok((self.stop()?, tmp))
    }
}

impl Drop for ServerUnderTest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
