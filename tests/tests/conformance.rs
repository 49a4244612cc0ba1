//! The conformance kit (`notesync_tests::conformance`) against this
//! workspace's server: every check must pass (skips are for targets that
//! require a token or have other limits, which this server does not).

use notesync_tests::ServerProcess;
use notesync_tests::conformance::{
    Status, Target, quiet_check_panics, random_seed, run_server_checks, select, server_checks,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notesync_server_passes_every_conformance_check() {
    let server = ServerProcess::start();
    quiet_check_panics();
    // NOTESYNC_CONFORMANCE_ONLY="a,b" runs a subset (names or prefixes).
    let only: Vec<String> = std::env::var("NOTESYNC_CONFORMANCE_ONLY")
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let checks = select(server_checks(), &only).expect("known check names");
    let seed = random_seed();
    eprintln!("conformance: {} checks, seed {seed}", checks.len());
    // hello-welcome first and alone: on a fresh server it sees the welcome
    // of a server that has assigned no time yet, whatever else runs.
    let (first, rest): (Vec<_>, Vec<_>) =
        checks.into_iter().partition(|c| c.name == "hello-welcome");
    let target = Target::new(server.addr());
    let mut report = run_server_checks(target.clone(), &first, seed, 1, |_| {}).await;
    let more = run_server_checks(target, &rest, seed, 2, |_| {}).await;
    report.results.extend(more.results);
    report.elapsed += more.elapsed;
    eprintln!("{}", report.table());
    let skipped: Vec<&str> = report
        .results
        .iter()
        .filter(|r| matches!(r.status, Status::Skip(_)))
        .map(|r| r.name.as_str())
        .collect();
    // Only the checks of servers that require a token are skipped here.
    assert!(
        skipped.iter().all(|n| n.starts_with("auth-")),
        "unexpected skips: {skipped:?}"
    );
    let failed: Vec<&str> = report.failures().map(|r| r.name.as_str()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} conformance checks failed: {failed:?}\n(server stderr:\n{})",
        failed.len(),
        report.results.len(),
        server.stderr()
    );
}

/// The whole kit again, with a token, against a server that requires one:
/// every rule holds inside a namespace too, and the `auth-` checks run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notesync_server_with_tokens_passes_every_conformance_check() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let token = notesync_tests::token_command(&data, &["add", "--namespace", "kit"])
        .trim()
        .as_bytes()
        .to_vec();
    let read_only =
        notesync_tests::token_command(&data, &["add", "--namespace", "kit", "--read-only"])
            .trim()
            .as_bytes()
            .to_vec();
    // The auth checks fail on purpose; keep the address's budget out of it.
    let server = ServerProcess::try_start_with(&data, &["--max-failed-auth", "1000"])
        .unwrap_or_else(|e| panic!("{e}"));
    quiet_check_panics();
    let seed = random_seed();
    let mut target = Target::new(server.addr());
    target.token = Some(token);
    target.read_only_token = Some(read_only);
    let report = run_server_checks(target, &server_checks(), seed, 2, |_| {}).await;
    eprintln!("{}", report.table());
    let ran_auth = report
        .results
        .iter()
        .filter(|r| r.name.starts_with("auth-") && matches!(r.status, Status::Pass))
        .count();
    assert_eq!(
        ran_auth, 3,
        "the auth checks run with a token (and a read-only one)"
    );
    let failed: Vec<&str> = report.failures().map(|r| r.name.as_str()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} conformance checks failed with a token: {failed:?}\n(server stderr:\n{})",
        failed.len(),
        report.results.len(),
        server.stderr()
    );
}
