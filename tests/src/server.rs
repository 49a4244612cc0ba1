//! Running a notesync server binary as a child process.
//!
//! The binary is found once per test process: `NOTESYNC_SERVER_BIN` if set
//! (to check another server), otherwise this workspace's `notesync-server`,
//! built with `cargo build -p notesync-server --bin notesync-server` and
//! located from cargo's own report of the executable it produced (so
//! `CARGO_TARGET_DIR` and `build.target-dir` are honoured).
//!
//! The contract with the binary: `BIN --listen 127.0.0.1:0 --data DIR`
//! prints one line `listening on ADDR` on stdout once it accepts
//! connections, and exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::conn::Conn;

/// How long a server may take to print `listening on ADDR`.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server may take to exit after SIGTERM (more than the
/// reference server's default grace of 10 s for open connections).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
static CLI_BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The server binary, built on first use. Panics with cargo's output if it
/// cannot be built.
pub fn server_binary() -> PathBuf {
    match BINARY.get_or_init(find_or_build_binary) {
        Ok(p) => p.clone(),
        Err(e) => panic!("cannot get the notesync-server binary: {e}"),
    }
}

/// This workspace's `notesync` CLI (client-sdk, default feature `cli`),
/// built on first use the same way as the server.
pub fn cli_binary() -> PathBuf {
    match CLI_BINARY.get_or_init(|| build_binary("notesync-client", "notesync")) {
        Ok(p) => p.clone(),
        Err(e) => panic!("cannot get the notesync binary: {e}"),
    }
}

fn find_or_build_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("NOTESYNC_SERVER_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("NOTESYNC_SERVER_BIN={} is not a file", p.display()))
        };
    }
    build_binary("notesync-server", "notesync-server")
}

/// `cargo build -p PACKAGE --bin BIN`; the executable cargo reports.
fn build_binary(package: &str, bin: &str) -> Result<PathBuf, String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&workspace)
        .args([
            "build",
            "-p",
            package,
            "--bin",
            bin,
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`cargo build -p {package} --bin {bin}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == bin
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        {
            if let Some(exe) = msg["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    Err(format!(
        "cargo built {bin} but reported no executable:\n{}",
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Output a child wrote, collected by reader threads.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("capture lock")).into_owned()
    }
}

/// Why a server did not start.
#[derive(Debug)]
pub struct StartFailure {
    /// The exit status, if it exited (None: it hung and was killed).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub reason: String,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (status {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.reason, self.status, self.stdout, self.stderr
        )
    }
}

struct Running {
    child: Child,
    addr: SocketAddr,
    stdout: Captured,
    stderr: Captured,
    readers: Vec<thread::JoinHandle<()>>,
}

/// A server child process on a data folder. Killed on drop.
pub struct ServerProcess {
    bin: PathBuf,
    data: PathBuf,
    /// Extra command-line arguments for every start.
    args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
    running: Option<Running>,
    /// Output of earlier runs (before a restart), for diagnostics.
    history: String,
}

impl ServerProcess {
    /// Starts a server on a fresh temporary data folder. Panics if it does
    /// not start.
    pub fn start() -> ServerProcess {
        let tmp = tempfile::Builder::new()
            .prefix("notesync-test-")
            .tempdir()
            .expect("create a temporary data folder");
        let data = tmp.path().join("data");
        let mut s = ServerProcess {
            bin: server_binary(),
            data,
            args: Vec::new(),
            _tmp: Some(tmp),
            running: None,
            history: String::new(),
        };
        s.spawn()
            .unwrap_or_else(|e| panic!("server did not start: {e}"));
        s
    }

    /// Starts a server on an existing data folder that this value does not
    /// own (it is not deleted on drop).
    pub fn try_start_in(data: &Path) -> Result<ServerProcess, StartFailure> {
        Self::try_start_with(data, &[])
    }

    /// Like [`try_start_in`](Self::try_start_in), with extra arguments
    /// (kept for restarts).
    pub fn try_start_with(data: &Path, args: &[&str]) -> Result<ServerProcess, StartFailure> {
        let mut s = ServerProcess {
            bin: server_binary(),
            data: data.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            _tmp: None,
            running: None,
            history: String::new(),
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), StartFailure> {
        assert!(self.running.is_none(), "server is already running");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data")
            .arg(&self.data)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", self.bin.display()));
        let stdout = Captured::default();
        let stderr = Captured::default();
        let (tx, rx) = mpsc::channel::<SocketAddr>();
        let out_pipe = child.stdout.take().expect("piped stdout");
        let err_pipe = child.stderr.take().expect("piped stderr");
        let out_buf = stdout.clone();
        let err_buf = stderr.clone();
        let readers = vec![
            thread::spawn(move || {
                let mut r = BufReader::new(out_pipe);
                let mut line = String::new();
                let mut tx = Some(tx);
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    out_buf
                        .0
                        .lock()
                        .expect("capture lock")
                        .extend_from_slice(line.as_bytes());
                    if let Some(rest) = line.trim().strip_prefix("listening on ") {
                        if let (Ok(addr), Some(tx)) = (rest.trim().parse(), tx.take()) {
                            let _ = tx.send(addr);
                        }
                    }
                }
            }),
            thread::spawn(move || {
                let mut r = err_pipe;
                let mut buf = [0u8; 4096];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => err_buf
                            .0
                            .lock()
                            .expect("capture lock")
                            .extend_from_slice(&buf[..n]),
                    }
                }
            }),
        ];
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => {
                self.running = Some(Running {
                    child,
                    addr,
                    stdout,
                    stderr,
                    readers,
                });
                Ok(())
            }
            Err(e) => {
                let (status, reason) = match e {
                    mpsc::RecvTimeoutError::Timeout => {
                        let _ = child.kill();
                        let _ = child.wait();
                        (
                            None,
                            format!(
                                "no `listening on ADDR` line on stdout within {START_TIMEOUT:?}"
                            ),
                        )
                    }
                    mpsc::RecvTimeoutError::Disconnected => {
                        // stdout closed without the line: the process is
                        // exiting (or closed stdout, which is as bad).
                        let status = wait_timeout(&mut child, STOP_TIMEOUT);
                        if status.is_none() {
                            let _ = child.kill();
                            let _ = child.wait();
                        }
                        (
                            status,
                            "the server closed stdout without printing `listening on ADDR`"
                                .to_string(),
                        )
                    }
                };
                join_readers(readers);
                Err(StartFailure {
                    status,
                    stdout: stdout.text(),
                    stderr: stderr.text(),
                    reason,
                })
            }
        }
    }

    fn running(&self) -> &Running {
        self.running
            .as_ref()
            .expect("the server is not running (stopped by kill9/terminate)")
    }

    /// The address it listens on (changes on restart).
    pub fn addr(&self) -> SocketAddr {
        self.running().addr
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn pid(&self) -> u32 {
        self.running().child.id()
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Everything the current (or last) run wrote on stderr so far.
    pub fn stderr(&self) -> String {
        match &self.running {
            Some(r) => r.stderr.text(),
            None => String::new(),
        }
    }

    /// Output of all runs so far, for failure messages.
    pub fn output(&self) -> String {
        let mut s = self.history.clone();
        if let Some(r) = &self.running {
            s.push_str(&format!(
                "--- stdout (current run) ---\n{}\n--- stderr (current run) ---\n{}\n",
                r.stdout.text(),
                r.stderr.text()
            ));
        }
        s
    }

    /// Opens a connection to the server.
    pub async fn connect(&self) -> Conn {
        Conn::connect(self.addr()).await
    }

    /// SIGKILL, then waits for the process. Returns its status.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut r = self
            .running
            .take()
            .expect("kill9: the server is not running");
        r.child.kill().expect("send SIGKILL");
        let status = r.child.wait().expect("wait for the killed server");
        self.retire(r, "killed with SIGKILL");
        status
    }

    /// SIGTERM, then waits up to [`STOP_TIMEOUT`]. Panics (after a SIGKILL)
    /// if the server does not exit in time. Returns its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut r = self
            .running
            .take()
            .expect("terminate: the server is not running");
        let pid = r.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        match wait_timeout(&mut r.child, STOP_TIMEOUT) {
            Some(status) => {
                self.retire(r, &format!("stopped with SIGTERM: {status}"));
                status
            }
            None => {
                let _ = r.child.kill();
                let _ = r.child.wait();
                self.retire(r, "did not exit after SIGTERM; killed");
                panic!(
                    "the server did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                    self.history
                );
            }
        }
    }

    /// Starts the server again on the same data folder (stopping it with
    /// SIGTERM first if it is running). Panics if it does not start.
    pub fn restart(&mut self) {
        if self.running.is_some() {
            self.terminate();
        }
        if let Err(e) = self.spawn() {
            panic!(
                "server did not restart: {e}\n--- earlier runs ---\n{}",
                self.history
            );
        }
    }

    fn retire(&mut self, r: Running, how: &str) {
        join_readers(r.readers);
        self.history.push_str(&format!(
            "--- run on {} ({how}) ---\nstdout:\n{}\nstderr:\n{}\n",
            r.addr,
            r.stdout.text(),
            r.stderr.text()
        ));
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.take() {
            let _ = r.child.kill();
            let _ = r.child.wait();
            if thread::panicking() {
                eprintln!(
                    "server output before the failure:\n{}--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.history,
                    r.stdout.text(),
                    r.stderr.text()
                );
            }
        } else if thread::panicking() && !self.history.is_empty() {
            eprintln!("server output before the failure:\n{}", self.history);
        }
    }
}

/// Waits for a child to exit, at most `limit`.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// Joins output readers, giving up after a few seconds (a grandchild could
/// keep a pipe open).
fn join_readers(readers: Vec<thread::JoinHandle<()>>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    for r in readers {
        while !r.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if r.is_finished() {
            let _ = r.join();
        }
    }
}

/// Makes the child get SIGKILL if the thread that spawned it dies (a test
/// process killed by a timeout must not leave servers behind). Servers are
/// spawned from the test's own thread, which outlives them.
#[cfg(target_os = "linux")]
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub fn die_with_parent(_cmd: &mut Command) {}

/// Runs `notesync-server token ARGS --data DATA` (the real subcommand);
/// its stdout. Panics if it fails.
pub fn token_command(data: &Path, args: &[&str]) -> String {
    let out = Command::new(server_binary())
        .arg("token")
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .expect("run notesync-server token");
    assert!(
        out.status.success(),
        "notesync-server token {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}
