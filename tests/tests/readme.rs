//! The README's TLS walk-through, run as a newcomer would run it: the
//! shell blocks after a `<!-- readme-test: NAME -->` comment in README.md
//! are parsed at test time (never copied here) and run with `sh -c` in a
//! temp folder, so a README edit that breaks a command fails this test.
//!
//! What is set up around them, rather than substituted into them:
//! - `notesync-server` and `notesync` are this workspace's binaries, put
//!   first on `PATH` (as symlinks with those names);
//! - `HOME` is a temp folder, so `~/notes` and `~/.notesync-token` are
//!   temp paths; the working folder (for `cert.pem`, `./notesync-data`)
//!   is another.
//!
//! The one substitution: the README's port `7420` becomes a free port, so
//! that parallel tests and a real server do not collide.
//!
//! Needs `openssl`: without it the test is skipped, except under `CI=true`
//! (`.ci/run` installs it), where it fails.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use notesync_tests::server::{START_TIMEOUT, cli_binary, die_with_parent, server_binary};

/// The port the README's commands use.
const README_PORT: &str = "7420";

/// The shell block after `<!-- readme-test: NAME -->`: its indented lines,
/// unindented (continuation lines keep their backslashes for `sh`).
fn snippet(readme: &str, name: &str) -> String {
    let marker = format!("<!-- readme-test: {name} -->");
    let at = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README.md has no `{marker}`"));
    let lines: Vec<&str> = readme[at + marker.len()..]
        .lines()
        .skip(1)
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.starts_with("    "))
        .map(|l| &l[4..])
        .collect();
    assert!(!lines.is_empty(), "no indented block after `{marker}`");
    lines.join("\n")
}

fn have_openssl() -> bool {
    Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the environment the README's commands need: PATH, HOME, cwd.
struct Shell {
    path: String,
    home: std::path::PathBuf,
    cwd: std::path::PathBuf,
    port: String,
}

impl Shell {
    fn command(&self, name: &str, readme: &str) -> Command {
        let script = snippet(readme, name).replace(README_PORT, &self.port);
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(script)
            .current_dir(&self.cwd)
            .env("PATH", &self.path)
            .env("HOME", &self.home)
            .env_remove("NOTESYNC_TOKEN")
            .stdin(Stdio::null());
        c
    }

    /// Runs block `name` to completion; it must succeed. Its stdout.
    fn run(&self, name: &str, readme: &str) -> String {
        let out = self.command(name, readme).output().unwrap();
        assert!(
            out.status.success(),
            "README block {name} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The README's server, in its own process group, stopped when dropped.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        // The whole group: `sh` and the server it started.
        // SAFETY: kill(2) on the group this test created.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn free_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

#[test]
fn the_readme_tls_walk_through_works() {
    if !have_openssl() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "openssl is missing under CI=true (.ci/run installs it)"
        );
        eprintln!("skipped: no openssl on PATH");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(server_binary(), bin.join("notesync-server")).unwrap();
    std::os::unix::fs::symlink(cli_binary(), bin.join("notesync")).unwrap();
    let (home, other_home, cwd) = (
        tmp.path().join("home"),
        tmp.path().join("other-home"),
        tmp.path().join("work"),
    );
    for d in [&home, &other_home, &cwd] {
        fs::create_dir(d).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let sh = Shell {
        path,
        home: home.clone(),
        cwd,
        port: free_port(),
    };

    sh.run("tls-setup", &readme);
    let mut server = sh.command("tls-server", &readme);
    server.stdout(Stdio::null()).stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut server, 0);
    die_with_parent(&mut server);
    let _server = Background(server.spawn().unwrap());
    let deadline = Instant::now() + START_TIMEOUT;
    while TcpStream::connect(format!("127.0.0.1:{}", sh.port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the README's server never listened"
        );
        thread::sleep(Duration::from_millis(50));
    }

    // A note, synced out by the README's first sync ...
    fs::create_dir(home.join("notes")).unwrap();
    fs::write(home.join("notes/plans.md"), "# Plans\nthrough TLS\n").unwrap();
    let out = sh.run("tls-sync", &readme);
    assert!(out.contains("synced with"), "{out}");

    // ... arrives in a second device's folder (its own home, the same
    // token file) through the same command.
    fs::copy(
        home.join(".notesync-token"),
        other_home.join(".notesync-token"),
    )
    .unwrap();
    let other = Shell {
        home: other_home.clone(),
        ..sh
    };
    other.run("tls-sync", &readme);
    assert_eq!(
        fs::read_to_string(other_home.join("notes/plans.md")).unwrap(),
        "# Plans\nthrough TLS\n"
    );

    // The later syncs, without flags, use what the folders remember.
    fs::write(
        other_home.join("notes/plans.md"),
        "# Plans\nthrough TLS\nand back\n",
    )
    .unwrap();
    other.run("tls-later", &readme);
    let sh = Shell { home, ..other };
    sh.run("tls-later", &readme);
    assert_eq!(
        fs::read_to_string(sh.home.join("notes/plans.md")).unwrap(),
        "# Plans\nthrough TLS\nand back\n"
    );
}
