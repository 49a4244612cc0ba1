//! Running the `notesync` binary in tests: bounded waits, no process left
//! behind. Included with `#[path]` by the CLI test files.

#![allow(dead_code)] // not every test that includes this file uses all of it

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_notesync");
/// Longest any one CLI command may take before the test fails.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// Kills a child process when dropped (a failing test leaves none behind).
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `notesync ARGS` with `env` set, its stdout and stderr piped.
pub fn start<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Guard {
    let child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Guard(child)
}

/// Runs `notesync ARGS` to completion, within [`COMMAND_LIMIT`].
pub fn notesync<S: AsRef<OsStr>>(args: &[S]) -> Output {
    notesync_env(args, &[])
}

/// [`notesync`] with these environment variables set.
pub fn notesync_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    let mut g = start(args, env);
    let mut out = g.0.stdout.take().unwrap();
    let mut err = g.0.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).map(|_| v)
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).map(|_| v)
    });
    let deadline = Instant::now() + COMMAND_LIMIT;
    let status = loop {
        if let Some(s) = g.0.try_wait().unwrap() {
            break s;
        }
        let args: Vec<_> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        assert!(
            Instant::now() < deadline,
            "notesync {args:?} did not finish"
        );
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap().unwrap(),
        stderr: t_err.join().unwrap().unwrap(),
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `notesync sync DIR --server ADDR`, which must succeed; its stdout and
/// stderr.
pub fn sync(dir: &Path, addr: &str) -> (String, String) {
    sync_env(dir, addr, &[])
}

/// [`sync`] with these environment variables set.
pub fn sync_env(dir: &Path, addr: &str, env: &[(&str, &str)]) -> (String, String) {
    let out = notesync_env(
        &[
            OsStr::new("sync"),
            dir.as_os_str(),
            OsStr::new("--server"),
            OsStr::new(addr),
        ],
        env,
    );
    assert!(
        out.status.success(),
        "sync {} failed: {}\n{}",
        dir.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    (text(&out.stdout), text(&out.stderr))
}

/// The note files of a folder: name -> contents.
pub fn md_files(dir: &Path) -> BTreeMap<String, String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter_map(|e| {
            let name = e.file_name().into_string().unwrap();
            (name.ends_with(".md") && !name.starts_with('.'))
                .then(|| (name, fs::read_to_string(e.path()).unwrap()))
        })
        .collect()
}
