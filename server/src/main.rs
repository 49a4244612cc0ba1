//! `notesync-server`: serves a data folder until SIGINT or SIGTERM.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use notesync_protocol::Limits;
use notesync_server::{Config, Server};
use tokio_util::sync::CancellationToken;

/// The notesync sync server. Timeouts are in seconds; 0 disables the idle
/// timeouts. Logs go to stderr (filter with RUST_LOG, default "info").
#[derive(Parser, Debug)]
#[command(name = "notesync-server", version, about, long_about = None)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed as
    /// "listening on ADDR" on stdout).
    #[arg(long, value_name = "ADDR", default_value = Config::DEFAULT_LISTEN)]
    listen: String,
    /// Data folder (created if missing); one server per folder.
    #[arg(long, value_name = "DIR", default_value = Config::DEFAULT_DATA_DIR)]
    data: PathBuf,
    /// Most connections at once; one more is answered server_busy and closed.
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Seconds a new connection has to send its first frame.
    #[arg(long, value_name = "SECS", default_value_t = Config::DEFAULT_HANDSHAKE_TIMEOUT.as_secs())]
    handshake_timeout: u64,
    /// Seconds a sync-mode connection may stay silent (0: no limit).
    #[arg(long, value_name = "SECS", default_value_t = Config::DEFAULT_IDLE_TIMEOUT.as_secs())]
    idle_timeout: u64,
    /// Seconds a session may stay silent (0: no limit).
    #[arg(long, value_name = "SECS", default_value_t = Config::DEFAULT_SESSION_IDLE_TIMEOUT.as_secs())]
    session_idle_timeout: u64,
    /// Seconds a socket write may make no progress before the connection is closed.
    #[arg(long, value_name = "SECS", default_value_t = Config::DEFAULT_WRITE_TIMEOUT.as_secs())]
    write_timeout: u64,
    /// Largest frame accepted, in bytes (max_frame_bytes).
    #[arg(long, value_name = "BYTES", default_value_t = Limits::DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: usize,
    /// Most items in one list of a frame (max_items_per_frame).
    #[arg(long, value_name = "N", default_value_t = Limits::DEFAULT_MAX_ITEMS_PER_FRAME)]
    max_items_per_frame: u64,
    /// Deepest position id accepted (max_pid_depth, 1..255).
    #[arg(long, value_name = "N", default_value_t = Limits::DEFAULT_MAX_PID_DEPTH,
          value_parser = clap::value_parser!(u8).range(1..))]
    max_pid_depth: u8,
    /// Bytes of live frames queued for one connection before it is
    /// disconnected as slow_reader.
    #[arg(long, value_name = "BYTES", default_value_t = Config::DEFAULT_MAX_OUTBOUND_BYTES)]
    max_outbound_bytes: usize,
    /// Pipelined sync requests queued per connection before reading pauses.
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_MAX_PIPELINE)]
    max_pipeline: usize,
    /// Entries in one synclist response.
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_MAX_SYNCLIST_ENTRIES)]
    max_synclist_entries: usize,
    /// Requests committed in one transaction, at most.
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_MAX_BATCH)]
    max_batch: usize,
    /// Requests waiting for the writer, at most.
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_WRITER_QUEUE)]
    writer_queue: usize,
    /// Seconds connections get to finish on shutdown.
    #[arg(long, value_name = "SECS", default_value_t = Config::DEFAULT_SHUTDOWN_TIMEOUT.as_secs())]
    shutdown_timeout: u64,
}

impl Args {
    fn config(self) -> Config {
        let mut c = Config::new(self.data).listen(self.listen);
        c.max_connections = self.max_connections;
        c.handshake_timeout = Duration::from_secs(self.handshake_timeout);
        c.idle_timeout = Duration::from_secs(self.idle_timeout);
        c.session_idle_timeout = Duration::from_secs(self.session_idle_timeout);
        c.write_timeout = Duration::from_secs(self.write_timeout);
        c.limits = Limits {
            max_frame_bytes: self.max_frame_bytes,
            max_items_per_frame: self.max_items_per_frame,
            max_pid_depth: self.max_pid_depth,
        };
        c.max_outbound_bytes = self.max_outbound_bytes;
        c.max_pipeline = self.max_pipeline;
        c.max_synclist_entries = self.max_synclist_entries;
        c.max_batch = self.max_batch;
        c.writer_queue = self.writer_queue;
        c.shutdown_timeout = Duration::from_secs(self.shutdown_timeout);
        c
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Its default reports a failed log write with eprintln!, which
        // panics once stderr has no reader (a dead log collector): logs are
        // best effort, shutting down must not depend on them.
        .log_internal_errors(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report(format_args!(
                "notesync-server: cannot start the runtime: {e}"
            ));
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(serve(args.config()));
    // Bounded: nothing left should be running, but never hang on exit.
    runtime.shutdown_timeout(Duration::from_secs(2));
    code
}

async fn serve(config: Config) -> ExitCode {
    // Installed before anything else, so a signal that arrives right after
    // the listening line still shuts down cleanly instead of killing.
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            report(format_args!(
                "notesync-server: cannot install signal handlers: {e}"
            ));
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::bind(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            report(format_args!("notesync-server: {e}"));
            return ExitCode::FAILURE;
        }
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {}", server.local_addr());
        let _ = out.flush();
    }
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        let signal = signals.wait().await;
        token.cancel();
        tracing::info!(signal, "shutting down");
    });
    match server.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "shutdown was not clean");
            report(format_args!("notesync-server: {e}"));
            ExitCode::FAILURE
        }
    }
}

#[cfg(unix)]
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Signals)
    }

    async fn wait(self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Writes an error line to stderr; unlike `eprintln!`, never panics when
/// stderr has no reader.
fn report(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{args}");
}
