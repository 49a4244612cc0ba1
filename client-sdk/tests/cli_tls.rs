//! The `notesync` CLI through TLS with a token: two folders sync a note
//! through a server that requires both; without the token, or without
//! trusting the certificate, or with TLS on the wrong port either way, the
//! CLI fails with a message saying why.

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
    let out = notesync(&["sync"], folder, extra);
    assert!(
        !out.status.success(),
        "sync succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
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
