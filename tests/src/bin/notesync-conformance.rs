//! notesync-conformance: checks a notesync server against PROTOCOL.md.
//!
//!     notesync-conformance --server 127.0.0.1:7420
//!     notesync-conformance --server HOST:PORT --token SECRET --only session-
//!     notesync-conformance --server HOST:PORT --token SECRET --read-only-token RO
//!     notesync-conformance --list
//!
//! Every check makes its own random document and replica ids, so the
//! server may hold other data. Exits 0 when no check fails, 1 when one
//! does, 2 on a usage or connection error.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use notesync_protocol::Limits;
use notesync_tests::conformance::{
    self, Check, Ctx, Report, Target, random_seed, row, run_server_checks, select, server_checks,
};

#[derive(Parser, Debug)]
#[command(
    name = "notesync-conformance",
    about = "Checks a notesync server against every rule of PROTOCOL.md, over TCP",
    after_help = "Checks are named in kebab-case; `--only session-` runs every check whose name \
                  starts with `session-`. The limits default to PROTOCOL.md section 5; give the \
                  server's own if it is configured otherwise."
)]
struct Args {
    /// The server's address (host:port).
    #[arg(long, required_unless_present = "list")]
    server: Option<String>,
    /// Token to send in every hello; given, the server is taken to require
    /// it (checks of connections without hello are skipped).
    #[arg(long)]
    token: Option<String>,
    /// A read-only token of --token's namespace: the checks of what
    /// read-only credentials may do (auth-read-only-*) run with it.
    #[arg(long, requires = "token")]
    read_only_token: Option<String>,
    /// Run only the checks with this name or name prefix (repeatable).
    #[arg(long = "only", value_name = "NAME")]
    only: Vec<String>,
    /// List the checks (name, spec section, rule) and exit.
    #[arg(long)]
    list: bool,
    /// The server's max_frame_bytes.
    #[arg(long, default_value_t = Limits::DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: usize,
    /// The server's max_items_per_frame.
    #[arg(long, default_value_t = Limits::DEFAULT_MAX_ITEMS_PER_FRAME)]
    max_items_per_frame: u64,
    /// The server's max_pid_depth.
    #[arg(long, default_value_t = Limits::DEFAULT_MAX_PID_DEPTH, value_parser = clap::value_parser!(u8).range(1..))]
    max_pid_depth: u8,
    /// Longest wait for any one frame, in seconds.
    #[arg(long, default_value_t = 10)]
    wait_secs: u64,
    /// Checks run at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    jobs: u64,
    /// Seed for the random ids (printed; give it to replay a run's ids).
    #[arg(long)]
    seed: Option<u64>,
}

fn list(checks: &[Check<Ctx>]) {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        println!("{:<width$}  {:<9}  {}", c.name, c.section, c.about);
    }
    println!("{} checks", checks.len());
}

fn main() -> ExitCode {
    let args = Args::parse();
    let checks = match select(server_checks(), &args.only) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("notesync-conformance: {e}");
            return ExitCode::from(2);
        }
    };
    if args.list {
        list(&checks);
        return ExitCode::SUCCESS;
    }
    let server = args.server.expect("clap requires --server");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let addr: SocketAddr = match rt.block_on(tokio::net::lookup_host(server.as_str())) {
        Ok(mut addrs) => match addrs.next() {
            Some(a) => a,
            None => {
                eprintln!("notesync-conformance: {server} resolves to no address");
                return ExitCode::from(2);
            }
        },
        Err(e) => {
            eprintln!("notesync-conformance: cannot resolve {server}: {e}");
            return ExitCode::from(2);
        }
    };
    let probe = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(args.wait_secs),
            tokio::net::TcpStream::connect(addr),
        )
        .await
    });
    match probe {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            eprintln!("notesync-conformance: cannot connect to {addr}: {e}");
            return ExitCode::from(2);
        }
        Err(_) => {
            eprintln!(
                "notesync-conformance: connecting to {addr} took over {}s",
                args.wait_secs
            );
            return ExitCode::from(2);
        }
    }
    let target = Target {
        addr,
        token: args.token.map(String::into_bytes),
        read_only_token: args.read_only_token.map(String::into_bytes),
        limits: Limits {
            max_frame_bytes: args.max_frame_bytes,
            max_items_per_frame: args.max_items_per_frame,
            max_pid_depth: args.max_pid_depth,
        },
        wait: Duration::from_secs(args.wait_secs),
    };
    let seed = args.seed.unwrap_or_else(random_seed);
    // Failures are reported in the table.
    conformance::quiet_check_panics();
    println!(
        "notesync-conformance: {} checks against {addr} (seed {seed})",
        checks.len()
    );
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(5);
    println!("{:<width$}  {:<6}  {:>8}  SPEC", "CHECK", "RESULT", "TIME");
    let report: Report = rt.block_on(run_server_checks(
        target,
        &checks,
        seed,
        args.jobs as usize,
        |r| {
            print!("{}", row(r, width));
        },
    ));
    println!("{}", report.summary());
    let failed: Vec<&str> = report.failures().map(|r| r.name.as_str()).collect();
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failed: {}", failed.join(" "));
        ExitCode::from(1)
    }
}
