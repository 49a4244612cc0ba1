//! The `notesync` CLI through TLS with a token: two folders sync a note
//! through a server that requires both; without the token, or without
//! trusting the certificate, or with TLS on the wrong port either way, the
//! CLI fails with a message saying why. A folder remembers its connection
//! (never the token) after its first successful sync.

use std::path::Path;
use std::process::{Command, Output};

use notesync_server::auth::{Access, add_token};
use notesync_server::{Config, TlsFiles};

const BIN: &str = env!("CARGO_BIN_EXE_notesync");

#[path = "support/blocking_server.rs"]
mod blocking_server;
use blocking_server::BlockingServer;

struct Setup {
    addr: String,
    dir: tempfile::TempDir,
    _server: BlockingServer,
}

fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("ca.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let data = dir.path().join("data");
    let (_, token) = add_token(&data, "cli", Access::ReadWrite).unwrap();
    std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
    let mut config = Config::new(&data).listen("127.0.0.1:0");
    config.tls = Some(TlsFiles {
        cert: dir.path().join("ca.pem"),
        key: dir.path().join("key.pem"),
    });
    let server = BlockingServer::start(config);
    Setup {
        addr: server.addr.clone(),
        dir,
        _server: server,
    }
}

impl Setup {
    /// The CA file to trust and the token file, as arguments.
    fn files(&self) -> (String, String) {
        let path = |name| self.dir.path().join(name).to_str().unwrap().to_owned();
        (path("ca.pem"), path("token"))
    }
}

fn notesync(args: &[&str], folder: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg(folder)
        .args(extra)
        .env_remove("NOTESYNC_TOKEN")
        .output()
        .unwrap()
}

/// Runs `notesync sync FOLDER EXTRA...`, which must fail; its stderr.
fn failed_sync(folder: &Path, extra: &[&str]) -> String {
    failed(&notesync(&["sync"], folder, extra))
}

/// The flags for TLS to `addr` trusting `ca` for the name `localhost`.
fn trusting<'a>(addr: &'a str, ca: &'a str) -> [&'a str; 6] {
    ["--server", addr, "--tls-ca", ca, "--tls-name", "localhost"]
}

#[test]
fn the_cli_syncs_through_tls_with_a_token_file() {
    let s = start();
    let (ca, token) = s.files();
    let (ca, token) = (ca.as_str(), token.as_str());
    let (fa, fb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(fa.path().join("plans.md"), "# Plans\nover TLS\n").unwrap();
    let good = [
        "--server",
        &s.addr,
        "--token-file",
        token,
        "--tls-ca",
        ca,
        "--tls-name",
        "localhost",
    ];
    for folder in [fa.path(), fb.path()] {
        let out = notesync(&["sync"], folder, &good);
        assert!(
            out.status.success(),
            "sync failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        std::fs::read_to_string(fb.path().join("plans.md")).unwrap(),
        "# Plans\nover TLS\n"
    );

    // No token: refused, and the user is told why.
    let fc = tempfile::tempdir().unwrap();
    let err = failed_sync(fc.path(), &trusting(&s.addr, ca));
    assert!(err.contains("unauthorized"), "{err}");
    assert!(!fc.path().join("plans.md").exists());

    // The token but not the certificate (public roots only): refused.
    let out = notesync(
        &["sync"],
        fc.path(),
        &["--server", &s.addr, "--token-file", token, "--tls"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS") && err.contains("certificate"), "{err}");
}

/// TLS on the wrong port, both ways: the CLI says which flag to change
/// (PROTOCOL.md 2.1).
#[test]
fn the_cli_names_tls_on_the_wrong_port() {
    let s = start();
    let (ca, token) = s.files();
    let (ca, token) = (ca.as_str(), token.as_str());
    let folder = tempfile::tempdir().unwrap();

    // Plain TCP to the TLS server.
    let err = failed_sync(folder.path(), &["--server", &s.addr, "--token-file", token]);
    assert!(err.contains("this port speaks TLS"), "{err}");
    assert!(err.contains("--tls"), "{err}");

    // TLS to a server without it.
    let plain = BlockingServer::start_temp();
    let err = failed_sync(folder.path(), &trusting(&plain.addr, ca));
    assert!(
        err.contains(&format!(
            "{}: the server does not speak TLS on this port (connect without --tls)",
            plain.addr
        )),
        "{err}"
    );
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "notesync failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The stderr of a run that must have failed.
fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "notesync succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every file under `dir`, recursively.
fn all_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_folder_remembers_its_connection() {
    let s = start();
    let ca = s.dir.path().join("ca.pem");
    let token = s.dir.path().join("token");
    let fa = tempfile::tempdir().unwrap();

    // Nothing stored, no --server: the error names the flag.
    let err = failed(&notesync(&["sync"], fa.path(), &[]));
    assert!(err.contains("--server HOST:PORT"), "{err}");

    // The first sync stores the connection; paths are made absolute (the
    // CA is given relative to the folder's parent).
    std::fs::write(fa.path().join("plans.md"), "# Plans\n").unwrap();
    let out = Command::new(BIN)
        .current_dir(s.dir.path())
        .args(["sync"])
        .arg(fa.path())
        .args(["--server", &s.addr, "--tls-ca", "ca.pem", "--tls-name"])
        .arg("localhost")
        .arg("--token-file")
        .arg(&token)
        .env_remove("NOTESYNC_TOKEN")
        .output()
        .unwrap();
    ok(&out);
    let status = ok(&notesync(&["status"], fa.path(), &[]));
    assert!(
        status.contains(&format!(
            "server:     {} (TLS, CA {}, name localhost)",
            s.addr,
            ca.display()
        )),
        "{status}"
    );
    assert!(
        status.contains(&format!("token file: {}", token.display())),
        "{status}"
    );

    // A second sync needs no flags.
    std::fs::write(fa.path().join("plans.md"), "# Plans\nsecond\n").unwrap();
    let out = ok(&notesync(&["sync"], fa.path(), &[]));
    assert!(out.contains(&format!("synced with {}", s.addr)), "{out}");

    // A flag that fails is not stored: --no-tls against the TLS server.
    failed(&notesync(&["sync"], fa.path(), &["--no-tls"]));
    let status = ok(&notesync(&["status"], fa.path(), &[]));
    assert!(status.contains("(TLS, CA"), "{status}");

    // Flags given override, and a successful sync stores them: another
    // address of the same server, another token file.
    let port = s.addr.rsplit(':').next().unwrap();
    let other_addr = format!("localhost:{port}");
    let other_token = s.dir.path().join("token-copy");
    std::fs::copy(&token, &other_token).unwrap();
    let out = ok(&notesync(
        &["sync"],
        fa.path(),
        &[
            "--server",
            &other_addr,
            "--token-file",
            other_token.to_str().unwrap(),
        ],
    ));
    assert!(out.contains(&format!("synced with {other_addr}")), "{out}");
    let status = ok(&notesync(&["status"], fa.path(), &[]));
    assert!(
        status.contains(&format!("server:     {other_addr} (TLS, CA")),
        "{status}"
    );
    assert!(
        status.contains(&format!("token file: {}", other_token.display())),
        "{status}"
    );
    ok(&notesync(&["sync"], fa.path(), &[]));

    // The token itself is on no file of the folder, nor is a token taken
    // from NOTESYNC_TOKEN.
    let secret = std::fs::read_to_string(&token).unwrap();
    let fb = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["sync"])
        .arg(fb.path())
        .args(["--server", &s.addr, "--tls-ca"])
        .arg(&ca)
        .args(["--tls-name", "localhost"])
        .env("NOTESYNC_TOKEN", secret.trim())
        .output()
        .unwrap();
    ok(&out);
    let status = ok(&notesync(&["status"], fb.path(), &[]));
    assert!(status.contains("token file: none"), "{status}");
    assert_eq!(
        std::fs::read_to_string(fb.path().join("plans.md")).unwrap(),
        "# Plans\nsecond\n"
    );
    for f in all_files(fa.path()).into_iter().chain(all_files(fb.path())) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes
                .windows(secret.trim().len())
                .any(|w| w == secret.trim().as_bytes()),
            "{} holds the token",
            f.display()
        );
    }
}
