//! Every `notesync-bench` scenario in smoke mode (small sizes), against the
//! real server binary: the scenarios' own checks must pass. No timing is
//! asserted anywhere.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use notesync_benches::load::{self, Opts, SCENARIOS};

fn server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("NOTESYNC_SERVER_BIN") {
            return PathBuf::from(p);
        }
        let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        load::server::build_server(ws, false).expect("build notesync-server")
    })
    .clone()
}

fn cli_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("NOTESYNC_CLI_BIN") {
            return PathBuf::from(p);
        }
        let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        load::server::build_binary(ws, "notesync-client", "notesync", false)
            .expect("build notesync")
    })
    .clone()
}

fn opts() -> Option<Opts> {
    let trace = Opts::default_trace();
    if !trace.is_file() {
        assert!(
            std::env::var("CI").is_err(),
            "trace {} missing in CI",
            trace.display()
        );
        eprintln!("skipping: trace {} not found", trace.display());
        return None;
    }
    let mut o = Opts::new(trace);
    o.smoke = true;
    o.server_bin = Some(server_bin());
    o.deadline = std::time::Duration::from_secs(300);
    Some(o)
}

fn smoke(name: &str) {
    let Some(mut o) = opts() else { return };
    if name == "devices" || name == "folder" {
        o.cli_bin = Some(cli_bin());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = rt
        .block_on(load::run(name, &o))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    print!("{}", report.table());
    let json = report.json();
    assert_eq!(json["scenario"], name);
    assert!(
        json.get("server_peak_rss_bytes").is_some(),
        "{name}: no server memory reported"
    );
    assert!(
        json.get("server_cpu_s").is_some(),
        "{name}: no server CPU reported"
    );
}

#[test]
fn every_scenario_is_tested() {
    assert_eq!(SCENARIOS.len(), 10);
}

#[test]
fn live_trace() {
    smoke("live-trace");
}

#[test]
fn many_docs() {
    smoke("many-docs");
}

#[test]
fn catch_up() {
    smoke("catch-up");
}

#[test]
fn synclist_scale() {
    smoke("synclist-scale");
}

#[test]
fn connections() {
    smoke("connections");
}

#[test]
fn cold_start() {
    smoke("cold-start");
}

#[test]
fn offline() {
    smoke("offline");
}

#[test]
fn feed() {
    smoke("feed");
}

#[test]
fn devices() {
    smoke("devices");
}

#[test]
fn folder() {
    smoke("folder");
}
