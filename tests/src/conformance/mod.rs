//! The conformance kit: every rule of PROTOCOL.md as a named check.
//!
//! - Server checks ([`server_checks`]) talk to any server over TCP, knowing
//!   only its address (and, optionally, a token and non-default limits).
//!   Each check makes its own random document and replica ids, so it can
//!   run against a server that holds other data, and every wait is bounded
//!   (each frame by [`Target::wait`], each check by its own time limit).
//!   The `notesync-conformance` binary runs them; `tests/conformance.rs`
//!   runs them in-process against `notesync-server`.
//! - Client checks ([`client_checks`]) drive a client through the rules a
//!   client must follow, against a scripted fake server
//!   ([`fake_server::FakeServer`]). The client is reached through
//!   [`client_checks::ClientUnderTest`]; `tests/client_conformance.rs`
//!   implements it for the reference SDK.
//!
//! A check fails by panicking with a message that says what was expected
//! and what came back (the harness's [`Conn`] helpers do the same); the
//! runner turns the panic into a failed row of the report. A check that
//! cannot apply to the target (say, a check of connections without hello
//! against a server that requires a token) returns [`Skipped`].

pub mod client_checks;
pub mod fake_server;

mod checks_conn;
mod checks_delete;
mod checks_feed;
mod checks_limits;
mod checks_runs;
mod checks_session;
mod checks_sites;
mod checks_sync;
mod checks_time;
mod util;
mod vectors;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use notesync_protocol::{DocId, Limits};

use crate::conn::{Conn, WAIT, Welcome};
use crate::rng::Rng;

pub use util::{RawEnd, RawOutcome, raw_exchange};

/// Why a check did not run (it is neither passed nor failed).
#[derive(Debug, Clone)]
pub struct Skipped(pub String);

/// What a check returns; a failure is a panic.
pub type Outcome = Result<(), Skipped>;

/// The server under test.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Sent in every hello. Given: the server requires authentication, so
    /// checks of connections without hello are skipped.
    pub token: Option<Vec<u8>>,
    /// A read-only token of `token`'s namespace (3.7). Given, the checks
    /// of what read-only credentials may do run; otherwise they are
    /// skipped.
    pub read_only_token: Option<Vec<u8>>,
    /// The server's decoder limits (PROTOCOL.md section 5).
    pub limits: Limits,
    /// The bound on every wait for one frame.
    pub wait: Duration,
}

impl Target {
    /// A server at `addr` with the defaults of PROTOCOL.md.
    pub fn new(addr: SocketAddr) -> Target {
        Target {
            addr,
            token: None,
            read_only_token: None,
            limits: Limits::default(),
            wait: WAIT,
        }
    }

    pub fn token_bytes(&self) -> &[u8] {
        self.token.as_deref().unwrap_or(&[])
    }

    pub fn has_default_limits(&self) -> bool {
        self.limits == Limits::default()
    }
}

/// What one server check gets: the target and a source of fresh ids.
#[derive(Clone)]
pub struct Ctx {
    target: Arc<Target>,
    name: Arc<str>,
    rng: Arc<Mutex<Rng>>,
    seed: u64,
}

impl Ctx {
    pub fn new(target: Arc<Target>, name: &str, seed: u64) -> Ctx {
        // Each check's ids come from the run's seed and its name.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        let seed = seed ^ h;
        Ctx {
            target,
            name: name.into(),
            rng: Arc::new(Mutex::new(Rng::new(seed))),
            seed,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn limits(&self) -> Limits {
        self.target.limits
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A seed for allocators and random edits.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A fresh random id (documents and replicas): never 0.
    pub fn id(&self) -> u128 {
        loop {
            let id = self.rng.lock().expect("rng lock").next_u128();
            if id != 0 {
                return id;
            }
        }
    }

    pub fn doc(&self) -> DocId {
        self.id()
    }

    pub fn replica(&self) -> u128 {
        self.id()
    }

    /// Runs `f` on this check's random generator.
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut Rng) -> T) -> T {
        f(&mut self.rng.lock().expect("rng lock"))
    }

    /// Skips the check when the server requires a token: connections
    /// without hello are refused there.
    pub fn require_no_auth(&self) -> Outcome {
        match self.target.token {
            Some(_) => Err(Skipped(
                "needs connections without hello; the server requires a token".into(),
            )),
            None => Ok(()),
        }
    }

    /// A connection that has sent nothing yet.
    pub async fn raw_conn(&self, label: &str) -> Conn {
        let mut c = Conn::connect_with(self.target.addr, self.target.limits)
            .await
            .with_label(label);
        c.set_wait(self.target.wait);
        c
    }

    /// A connection that will send no hello (no replica id, no site).
    /// Skips when the server requires a token.
    pub async fn anon(&self, label: &str) -> Result<Conn, Skipped> {
        self.require_no_auth()?;
        Ok(self.raw_conn(label).await)
    }

    /// A connection after hello (with the token) as a fresh replica.
    pub async fn client(&self, label: &str) -> (Conn, u128) {
        let replica = self.replica();
        let (c, _) = self.client_as(label, replica).await;
        (c, replica)
    }

    /// A connection after a version-3 hello (with the token) as a fresh
    /// replica.
    pub async fn client_v3(&self, label: &str) -> (Conn, u128) {
        self.client_version(label, 3).await
    }

    /// A connection after a version-4 hello (the change feed, 3.8).
    pub async fn client_v4(&self, label: &str) -> (Conn, u128) {
        self.client_version(label, 4).await
    }

    /// A connection after a hello announcing `version`; the server must
    /// answer that version (6).
    async fn client_version(&self, label: &str, version: u8) -> (Conn, u128) {
        let replica = self.replica();
        let mut c = self.raw_conn(label).await;
        let w = c
            .hello_version(replica, self.target.token_bytes(), version)
            .await;
        assert_eq!(
            w.version, version,
            "{label}: a hello with version {version}: expected welcome with version {version} (6), got {}",
            w.version
        );
        (c, replica)
    }

    /// A connection after hello as `replica`.
    pub async fn client_as(&self, label: &str, replica: u128) -> (Conn, Welcome) {
        let mut c = self.raw_conn(label).await;
        let w = c.hello_with_token(replica, self.target.token_bytes()).await;
        (c, w)
    }
}

type RunFn<A> = Arc<dyn Fn(A) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// One named check. `A` is what it runs on: a [`Ctx`] for server checks, a
/// [`client_checks::ClientCtx`] for client checks.
pub struct Check<A> {
    /// Stable, kebab-case.
    pub name: String,
    /// The PROTOCOL.md section it checks.
    pub section: &'static str,
    /// One line: the rule.
    pub about: String,
    /// The bound on the whole check.
    pub timeout: Duration,
    run: RunFn<A>,
}

impl<A> Clone for Check<A> {
    fn clone(&self) -> Self {
        Check {
            name: self.name.clone(),
            section: self.section,
            about: self.about.clone(),
            timeout: self.timeout,
            run: self.run.clone(),
        }
    }
}

/// The default bound on one check.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

impl<A: Send + 'static> Check<A> {
    pub fn new<F, Fut>(
        name: impl Into<String>,
        section: &'static str,
        about: impl Into<String>,
        f: F,
    ) -> Self
    where
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let name = name.into();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "check names are kebab-case: {name:?}"
        );
        Check {
            name,
            section,
            about: about.into(),
            timeout: CHECK_TIMEOUT,
            run: Arc::new(move |a| Box::pin(f(a))),
        }
    }

    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
}

/// Every server check, in the order they run.
pub fn server_checks() -> Vec<Check<Ctx>> {
    let mut v = Vec::new();
    v.extend(checks_conn::checks());
    v.extend(vectors::checks());
    v.extend(checks_sync::checks());
    v.extend(checks_sites::checks());
    v.extend(checks_session::checks());
    v.extend(checks_time::checks());
    // Before the limits checks, whose large frames keep the writer busy.
    v.extend(checks_delete::checks());
    v.extend(checks_runs::checks());
    v.extend(checks_feed::checks());
    v.extend(checks_limits::checks());
    assert_unique(&v);
    v
}

/// Every client check.
pub fn client_checks() -> Vec<Check<client_checks::ClientCtx>> {
    let v = client_checks::checks();
    assert_unique(&v);
    v
}

fn assert_unique<A>(checks: &[Check<A>]) {
    let mut seen = BTreeSet::new();
    for c in checks {
        assert!(
            seen.insert(c.name.as_str()),
            "check {} listed twice",
            c.name
        );
    }
}

/// The checks named by `only` (each an exact name or a prefix); all of
/// them if `only` is empty. A pattern that matches nothing is an error.
pub fn select<A>(checks: Vec<Check<A>>, only: &[String]) -> Result<Vec<Check<A>>, String> {
    if only.is_empty() {
        return Ok(checks);
    }
    for pat in only {
        if !checks.iter().any(|c| c.name.starts_with(pat.as_str())) {
            return Err(format!(
                "no check is named {pat:?} or starts with it (see --list)"
            ));
        }
    }
    Ok(checks
        .into_iter()
        .filter(|c| only.iter().any(|p| c.name.starts_with(p.as_str())))
        .collect())
}

/// How a check ended.
#[derive(Debug, Clone)]
pub enum Status {
    Pass,
    /// What was expected and what came back.
    Fail(String),
    Skip(String),
}

#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: String,
    pub section: &'static str,
    pub status: Status,
    pub elapsed: Duration,
}

/// The results of a run, in the order of the checks.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub results: Vec<CheckResult>,
    pub elapsed: Duration,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.count(|s| matches!(s, Status::Pass))
    }
    pub fn failed(&self) -> usize {
        self.count(|s| matches!(s, Status::Fail(_)))
    }
    pub fn skipped(&self) -> usize {
        self.count(|s| matches!(s, Status::Skip(_)))
    }
    fn count(&self, f: impl Fn(&Status) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.status)).count()
    }

    pub fn failures(&self) -> impl Iterator<Item = &CheckResult> {
        self.results
            .iter()
            .filter(|r| matches!(r.status, Status::Fail(_)))
    }

    /// The table: one row per check, failures and skips with their reason
    /// indented below, then the summary line.
    pub fn table(&self) -> String {
        let width = self.results.iter().map(|r| r.name.len()).max().unwrap_or(5);
        let mut out = format!(
            "{:<width$}  {:<6}  {:>8}  {}\n",
            "CHECK", "RESULT", "TIME", "SPEC"
        );
        for r in &self.results {
            out.push_str(&row(r, width));
        }
        out.push_str(&self.summary());
        out.push('\n');
        out
    }

    pub fn summary(&self) -> String {
        format!(
            "{} checks: {} passed, {} failed, {} skipped ({:.1} s)",
            self.results.len(),
            self.passed(),
            self.failed(),
            self.skipped(),
            self.elapsed.as_secs_f64()
        )
    }
}

/// One row of the table (with its detail lines).
pub fn row(r: &CheckResult, width: usize) -> String {
    let (word, detail) = match &r.status {
        Status::Pass => ("pass", None),
        Status::Fail(d) => ("FAIL", Some(d)),
        Status::Skip(d) => ("skip", Some(d)),
    };
    let ms = r.elapsed.as_millis();
    let time = if ms < 10_000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", r.elapsed.as_secs_f64())
    };
    let mut out = format!(
        "{:<width$}  {:<6}  {:>8}  {}\n",
        r.name, word, time, r.section
    );
    if let Some(d) = detail {
        for line in d.lines() {
            let _ = writeln!(out, "      {line}");
        }
    }
    out
}

/// The message of a panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "panicked (no message)".to_owned()
    }
}

/// Runs one check in its own task, bounded by its timeout.
pub async fn run_one<A: Send + 'static>(check: &Check<A>, arg: A) -> CheckResult {
    let start = Instant::now();
    let mut task = tokio::spawn((check.run)(arg));
    let status = match tokio::time::timeout(check.timeout, &mut task).await {
        Ok(Ok(Ok(()))) => Status::Pass,
        Ok(Ok(Err(Skipped(why)))) => Status::Skip(why),
        Ok(Err(e)) if e.is_panic() => Status::Fail(panic_message(&*e.into_panic())),
        Ok(Err(e)) => Status::Fail(format!("the check's task failed: {e}")),
        Err(_) => {
            task.abort();
            Status::Fail(format!(
                "did not finish within {:?} (a reply never came, or came too slowly)",
                check.timeout
            ))
        }
    };
    CheckResult {
        name: check.name.clone(),
        section: check.section,
        status,
        elapsed: start.elapsed(),
    }
}

/// Runs `checks`, `jobs` at a time, calling `on_done` as each finishes;
/// the report lists them in the order given.
pub async fn run_all<A: Send + 'static>(
    checks: &[Check<A>],
    make_arg: impl Fn(&Check<A>) -> A,
    jobs: usize,
    mut on_done: impl FnMut(&CheckResult),
) -> Report {
    let start = Instant::now();
    let futs = checks.iter().enumerate().map(|(i, c)| {
        let arg = make_arg(c);
        async move { (i, run_one(c, arg).await) }
    });
    let mut stream = futures::stream::iter(futs).buffer_unordered(jobs.max(1));
    let mut results: Vec<Option<CheckResult>> = vec![None; checks.len()];
    while let Some((i, r)) = stream.next().await {
        on_done(&r);
        results[i] = Some(r);
    }
    Report {
        results: results
            .into_iter()
            .map(|r| r.expect("every check ran"))
            .collect(),
        elapsed: start.elapsed(),
    }
}

/// Runs client checks on clients made by `factory`.
pub async fn run_client_checks(
    factory: Arc<dyn client_checks::ClientFactory>,
    checks: &[Check<client_checks::ClientCtx>],
    seed: u64,
    jobs: usize,
    on_done: impl FnMut(&CheckResult),
) -> Report {
    run_all(
        checks,
        |c| {
            let mut h: u64 = seed;
            for b in c.name.bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
            client_checks::ClientCtx::new(factory.clone(), h)
        },
        jobs,
        on_done,
    )
    .await
}

/// Runs server checks against `target`; ids come from `seed`.
pub async fn run_server_checks(
    target: Target,
    checks: &[Check<Ctx>],
    seed: u64,
    jobs: usize,
    on_done: impl FnMut(&CheckResult),
) -> Report {
    let target = Arc::new(target);
    run_all(
        checks,
        |c| Ctx::new(target.clone(), &c.name, seed),
        jobs,
        on_done,
    )
    .await
}

/// Keeps the panics of checks (which run on tokio's worker threads) off
/// stderr: the report carries their messages. Panics on other threads
/// still print.
pub fn quiet_check_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let worker = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("tokio-r"));
        if !worker {
            default(info);
        }
    }));
}

/// A random seed from the OS.
pub fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source is available");
    u64::from_be_bytes(b)
}
