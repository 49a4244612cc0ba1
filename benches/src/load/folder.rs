//! Scenario `folder` (issue 15): a real notes folder through the `notesync`
//! CLI. The scenario builds the folder itself, so anyone can rerun it.
//! `--size N` notes of ~2 KB (default 10,000):
//!
//! 1. import: `notesync sync A` of the N new files to an empty server;
//! 2. second device: `notesync sync B` of an empty folder;
//! 3. no-op re-sync: `notesync sync A` again, nothing changed.
//!
//! Each step reports wall time and the CLI's peak RSS (from `wait4`).
//! Also reported: what the folder holds beside the `.md` files, in apparent
//! bytes against the notes' bytes. With `strace` on the machine (and not
//! in smoke mode), a separate import of up to 500 notes, to a server of
//! its own (with `--server`: the same one, which it then also downloads
//! from), is traced for its fsyncs and fdatasyncs per note.
//!
//! B's files must equal A's after step 2, and step 3 must pull and upsert
//! nothing; otherwise the run fails.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::Instant;

use super::devices::cli_binary;
use super::proc;
use super::server::ServerUnderTest;
use super::{Opts, Report, Result};
use crate::bail;

/// A note's size, about.
const NOTE_BYTES: usize = 2_000;
/// Notes in the traced import (strace slows every syscall).
const TRACED: usize = 500;

/// The words notes are made of (deterministic: the same folder each run).
const WORDS: &[&str] = &[
    "the", "note", "sync", "server", "device", "offline", "text", "edit", "folder", "markdown",
    "merge", "replica", "time", "order", "whole", "person", "laptop", "phone", "list", "idea",
    "meeting", "draft", "todo", "later", "today", "project", "read", "write", "plan", "done",
];

/// Writes `n` notes into `dir`; returns their total bytes.
fn make_folder(dir: &Path, n: usize, seed: u64) -> Result<u64> {
    fs::create_dir_all(dir)?;
    let mut x = seed | 1;
    let mut total = 0u64;
    for i in 0..n {
        let mut text = format!("# note {i}\n\n");
        while text.len() < NOTE_BYTES {
            // xorshift: cheap, and the same folder for the same seed.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            text.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
            text.push(if x % 11 == 0 { '\n' } else { ' ' });
        }
        text.push('\n');
        total += text.len() as u64;
        fs::write(dir.join(format!("note{i:05}.md")), text)?;
    }
    Ok(total)
}

/// One step's cost.
struct Step {
    secs: f64,
    peak_rss: u64,
    stdout: String,
}

/// Runs `cmd` to its end; its wall time and peak RSS (`wait4`'s rusage,
/// which covers the child alone).
fn measured(cmd: &mut Command) -> Result<Step> {
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    // Both pipes are read while it runs (a full pipe would block it).
    let (out, err) = (drain(child.stdout), drain(child.stderr));
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid, and wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, which nothing else reaps.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let secs = start.elapsed().as_secs_f64();
    let (stdout, stderr) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed (status {status}): {stderr}");
    }
    Ok(Step {
        secs,
        peak_rss: usage.ru_maxrss as u64 * 1024,
        stdout,
    })
}

/// Reads a child's pipe to its end, on a thread of its own.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut s);
        }
        s
    })
}

fn sync(cli: &Path, dir: &Path, addr: &str) -> Command {
    let mut c = Command::new(cli);
    c.arg("sync").arg(dir).args(["--server", addr]);
    c
}

/// Apparent bytes of every file under `dir`: (the top-level `.md` notes,
/// everything else).
fn sizes(dir: &Path) -> Result<(u64, u64)> {
    let (mut md, mut other) = (0u64, 0u64);
    let mut stack = vec![(dir.to_path_buf(), true)];
    while let Some((d, top)) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let meta = e.metadata()?;
            if meta.is_dir() {
                stack.push((e.path(), false));
            } else if top && e.file_name().to_string_lossy().ends_with(".md") {
                md += meta.len();
            } else {
                other += meta.len();
            }
        }
    }
    Ok((md, other))
}

/// The `.md` files of `dir`, by name.
fn notes(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            v.push((name, fs::read(e.path())?));
        }
    }
    v.sort();
    Ok(v)
}

/// fsync + fdatasync calls of a traced command, from `strace -c`'s table;
/// None without strace.
fn traced_syncs(cmd: &Command, out: &Path) -> Result<Option<u64>> {
    let Ok(probe) = Command::new("strace").arg("-V").output() else {
        return Ok(None);
    };
    if !probe.status.success() {
        return Ok(None);
    }
    let mut traced = Command::new("strace");
    traced
        .args(["-f", "-c", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(out)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    measured(&mut traced)?;
    let table = fs::read_to_string(out)?;
    let mut n = 0;
    for line in table.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if let Some(&name) = cols.last()
            && (name == "fsync" || name == "fdatasync")
            && cols.len() >= 5
        {
            n += cols[3].parse::<u64>().unwrap_or(0);
        }
    }
    Ok(Some(n))
}

pub async fn run(opts: &Opts) -> Result<Report> {
    let opts = opts.clone();
    tokio::task::spawn_blocking(move || run_blocking(&opts)).await?
}

fn run_blocking(opts: &Opts) -> Result<Report> {
    let n = opts.pick(10_000, 20);
    let cli = cli_binary(opts)?;
    let server = ServerUnderTest::start(opts, &[])?;
    let addr = server.addr.to_string();
    let tmp = tempfile::Builder::new()
        .prefix("notesync-bench-folder-")
        .tempdir()?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let text_bytes = make_folder(&a, n, 0x5eed)?;
    fs::create_dir(&b)?;

    let import = measured(&mut sync(&cli, &a, &addr))?;
    let second = measured(&mut sync(&cli, &b, &addr))?;
    if notes(&a)? != notes(&b)? {
        bail!("the second device's notes differ from the first's");
    }
    let resync = measured(&mut sync(&cli, &a, &addr))?;
    if !resync.stdout.contains("0 upserted, 0 pulled") {
        bail!("a no-op re-sync moved notes: {}", resync.stdout.trim());
    }
    let (md, other) = sizes(&a)?;

    // fsyncs per imported note, on a fresh folder of its own and a fresh
    // server of its own: on the first one, this sync would also download
    // the N notes above, and count their writes as the import's.
    let syncs = if opts.smoke {
        None
    } else {
        let t = tmp.path().join("traced");
        let k = n.min(TRACED);
        make_folder(&t, k, 0x7ace)?;
        let fresh = ServerUnderTest::start(opts, &[])?;
        let traced = sync(&cli, &t, &fresh.addr.to_string());
        let syncs = traced_syncs(&traced, &tmp.path().join("strace.txt"))?;
        fresh.stop()?;
        syncs.map(|s| s as f64 / k as f64)
    };

    let mut r = Report::new(
        "folder",
        format!(
            "a folder of {n} notes (~{NOTE_BYTES} B each) through notesync sync: import, \
             second device, no-op re-sync"
        ),
    );
    r.num("notes", "notes", n as f64, "");
    for (key, label, s) in [
        ("import", "import", &import),
        ("second_device", "second device", &second),
        ("resync", "no-op re-sync", &resync),
    ] {
        r.num(&format!("{key}_s"), &format!("{label}: time"), s.secs, "s");
        r.num(
            &format!("{key}_peak_rss_bytes"),
            &format!("{label}: CLI peak RSS"),
            s.peak_rss as f64,
            "B",
        );
    }
    r.num("text_bytes", "the notes' bytes", text_bytes as f64, "B");
    r.num(
        "overhead_ratio",
        "everything but the .md files / the notes' bytes",
        other as f64 / md.max(1) as f64,
        "",
    );
    if let Some(s) = syncs {
        r.num(
            "fsyncs_per_note",
            "fsync + fdatasync per imported note (strace)",
            s,
            "",
        );
    }
    r.server(server.stop()?).client(proc::sample_self());
    Ok(r)
}
