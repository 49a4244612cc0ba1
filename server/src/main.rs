//! `notesync-server`: serves a data folder until SIGINT or SIGTERM.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use notesync_protocol::Limits;
use notesync_server::admin;
use notesync_server::auth::{self, Access};
use notesync_server::config_file;
use notesync_server::notify;
use notesync_server::{Config, Server, TlsFiles};
use tokio_util::sync::CancellationToken;

/// The notesync sync server. Without a subcommand it serves the data
/// folder. Timeouts are in seconds; 0 disables the idle timeouts. Logs go
/// to stderr (filter with RUST_LOG, default "info").
#[derive(Parser, Debug)]
#[command(name = "notesync-server", version, about, long_about = None,
          args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Args,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Manage access tokens (stored hashed in the data folder; a running
    /// server picks changes up within a second and closes the connections
    /// of revoked tokens).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print a document's text: its live atoms in position order, rendered
    /// as PROTOCOL.md 1.2 says. Works with the server running or not.
    Export {
        /// The document's id, in hex as the synclist shows it.
        #[arg(long, value_name = "ID")]
        doc: String,
        #[arg(long, value_name = "NAME", default_value = auth::DEFAULT_NAMESPACE)]
        namespace: String,
        #[arg(long, value_name = "DIR", default_value = Config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// Verify every namespace database (schema, documents, doc_times,
    /// atoms, changes, sites); print what is wrong and exit non-zero if
    /// anything is. Works with the server running or not.
    Check {
        #[arg(long, value_name = "DIR", default_value = Config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// Copy the data folder to DEST, consistently even while the server
    /// runs (one snapshot per namespace). DEST must not exist or be empty;
    /// it becomes a data folder a server can start on.
    Backup {
        dest: PathBuf,
        #[arg(long, value_name = "DIR", default_value = Config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
}

#[derive(clap::Subcommand, Debug)]
enum TokenCommand {
    /// Create a token for a namespace and print it (it is shown only once).
    Add {
        /// Namespace the token opens (a-z, 0-9, '_', '-'; "default" holds
        /// the data written without tokens).
        #[arg(long, value_name = "NAME")]
        namespace: String,
        /// The token may list, pull and watch sessions, but not write.
        #[arg(long)]
        read_only: bool,
        #[arg(long, value_name = "DIR", default_value = Config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// List the tokens (ids, namespaces, access; never the secrets).
    List {
        #[arg(long, value_name = "DIR", default_value = Config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// Revoke a token by id; a running server closes its connections.
    Revoke {
        /// The token's id (as `token list` shows it).
        id: String,
        #[arg(long, value_name = "DIR", default_value = Config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
}

/// Serving options.
#[derive(clap::Args, Debug)]
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
    /// Seconds without a change-feed frame before a heartbeat (1 to 15,
    /// PROTOCOL.md 3.8).
    #[arg(long, value_name = "SECS", default_value_t = Config::DEFAULT_FEED_HEARTBEAT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=Config::MAX_FEED_HEARTBEAT.as_secs()))]
    feed_heartbeat: u64,
    /// Seconds a subscribed connection's outbound queue may stay full before
    /// it is closed as a slow reader (it then resumes from its cursor).
    #[arg(long, value_name = "SECS", default_value_t = Config::DEFAULT_FEED_MAX_LAG.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=u64::MAX))]
    feed_max_lag: u64,
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
    /// Atoms deleted longer ago than this are dropped; a device whose last
    /// sync is older gets one full resync (its unsynced edits are kept).
    /// Seconds, or days with a `d` suffix (`90d`); 0 never compacts
    #[arg(long, value_name = "SECS|DAYSd", default_value = "90d", value_parser = parse_horizon)]
    tombstone_horizon: Duration,
    /// Require a token in every hello even if the data folder has none yet
    /// (whenever it has tokens this is on anyway; without tokens the server
    /// listens on loopback only).
    #[arg(long)]
    require_auth: bool,
    /// Seconds a connection has to send its hello when authentication is
    /// required.
    #[arg(long, value_name = "SECS", default_value_t = Config::DEFAULT_AUTH_TIMEOUT.as_secs())]
    auth_timeout: u64,
    /// Largest frame read before authentication, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = Config::DEFAULT_PRE_AUTH_MAX_FRAME_BYTES)]
    pre_auth_max_frame_bytes: usize,
    /// Failed authentications per IP address per window before the address
    /// is refused until the window ends.
    #[arg(long, value_name = "N", default_value_t = Config::DEFAULT_MAX_FAILED_AUTH)]
    max_failed_auth: u32,
    /// The failed-authentication window, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = Config::DEFAULT_FAILED_AUTH_WINDOW.as_secs())]
    failed_auth_window: u64,
    /// Serve TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics and a health check
    /// on http://ADDR/healthz (200, or 503 while shutting down); port 0
    /// picks a free port, printed as "metrics on ADDR".
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Read serving options from this TOML file: each key is a flag's name
    /// in snake_case (max_connections = 100); flags on the command line win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl Args {
    fn config(self) -> Config {
        let mut c = Config::new(self.data).listen(self.listen);
        c.max_connections = self.max_connections;
        c.handshake_timeout = Duration::from_secs(self.handshake_timeout);
        c.idle_timeout = Duration::from_secs(self.idle_timeout);
        c.session_idle_timeout = Duration::from_secs(self.session_idle_timeout);
        c.feed_heartbeat = Duration::from_secs(self.feed_heartbeat);
        c.feed_max_lag = Duration::from_secs(self.feed_max_lag);
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
        c.tombstone_horizon = self.tombstone_horizon;
        c.require_auth = self.require_auth;
        c.auth_timeout = Duration::from_secs(self.auth_timeout);
        c.pre_auth_max_frame_bytes = self.pre_auth_max_frame_bytes;
        c.max_failed_auth = self.max_failed_auth;
        c.failed_auth_window = Duration::from_secs(self.failed_auth_window);
        c.metrics = self.metrics;
        c.tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        };
        c
    }
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Some(command) = cli.command {
        return run_command(command);
    }
    let args = cli.serve;
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
        if let Some(addr) = server.metrics_addr() {
            let _ = writeln!(out, "metrics on {addr}");
        }
        let _ = out.flush();
    }
    // After the listening line, so a supervisor and a reader of stdout
    // agree on when the server is up.
    tell_systemd(notify::State::Ready);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        let signal = signals.wait().await;
        tell_systemd(notify::State::Stopping);
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

/// Tells systemd (`Type=notify`) the server's state; a failure is logged,
/// never fatal: serving does not depend on the supervisor hearing it.
fn tell_systemd(state: notify::State) {
    match notify::notify(state) {
        Ok(sent) => tracing::debug!(?state, sent, "systemd notification"),
        Err(e) => tracing::warn!(error = %e, "cannot notify systemd"),
    }
}

/// Writes an error line to stderr; unlike `eprintln!`, never panics when
/// stderr has no reader.
fn report(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{args}");
}

/// Runs a subcommand (no server, no runtime).
fn run_command(command: Command) -> ExitCode {
    let result = match command {
        Command::Token(t) => token_command(t),
        Command::Export {
            doc,
            namespace,
            data,
        } => admin::export(&data, &namespace, &doc, &mut std::io::stdout().lock())
            .map_err(Into::into),
        Command::Check { data } => {
            admin::check(&data, &mut std::io::stdout().lock()).map_err(Into::into)
        }
        Command::Backup { dest, data } => {
            admin::backup(&data, &dest, &mut std::io::stdout().lock()).map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(format_args!("notesync-server: {e}"));
            ExitCode::FAILURE
        }
    }
}

fn token_command(command: TokenCommand) -> Result<(), Box<dyn std::error::Error>> {
    let mut out = std::io::stdout().lock();
    match command {
        TokenCommand::Add {
            namespace,
            read_only,
            data,
        } => {
            let access = if read_only {
                Access::ReadOnly
            } else {
                Access::ReadWrite
            };
            let (rec, token) = auth::add_token(&data, &namespace, access)?;
            writeln!(out, "{token}")?;
            report(format_args!(
                "token {} for namespace {} ({}) added; it is shown only this once",
                rec.id,
                rec.namespace,
                if read_only { "read-only" } else { "read-write" }
            ));
        }
        TokenCommand::List { data } => {
            writeln!(
                out,
                "{:<16}  {:<10}  {:<6}  created (unix)",
                "id", "namespace", "access"
            )?;
            for t in auth::read_tokens(&data)? {
                let access = match t.access {
                    Access::ReadWrite => "rw",
                    Access::ReadOnly => "ro",
                };
                writeln!(
                    out,
                    "{:<16}  {:<10}  {:<6}  {}",
                    t.id, t.namespace, access, t.created_unix
                )?;
            }
        }
        TokenCommand::Revoke { id, data } => {
            let rec = auth::revoke_token(&data, &id)?;
            writeln!(out, "revoked {} (namespace {})", rec.id, rec.namespace)?;
        }
    }
    Ok(())
}

/// The command line, with `--config FILE`'s settings under it: the file's
/// keys become the flags they name, except those given on the command line.
fn parse_cli() -> Result<Cli, ExitCode> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let Some(file) = cli.serve.config.as_ref().filter(|_| cli.command.is_none()) else {
        return Ok(cli);
    };
    let keys: Vec<config_file::Key> = Cli::command()
        .get_arguments()
        .filter(|a| a.get_long().is_some() && a.get_id() != "config")
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .map(|a| config_file::Key {
            name: a.get_id().to_string(),
            flag: format!("--{}", a.get_long().unwrap_or_default()),
            takes_value: a.get_action().takes_values(),
        })
        .collect();
    let given =
        |key: &str| matches.value_source(key) == Some(clap::parser::ValueSource::CommandLine);
    let from_file = match config_file::file_args(file, &keys, given) {
        Ok(a) => a,
        Err(e) => {
            report(format_args!("notesync-server: {e}"));
            return Err(ExitCode::from(2));
        }
    };
    let mut argv = std::env::args_os();
    let args = argv.next().into_iter().chain(from_file).chain(argv);
    Cli::try_parse_from(args).map_err(|e| {
        report(format_args!(
            "notesync-server: with the settings of {}: {}",
            file.display(),
            e.render().to_string().trim_end()
        ));
        ExitCode::from(2)
    })
}

/// `--tombstone-horizon`: seconds (`86400`, `86400s`) or days (`90d`).
fn parse_horizon(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    let (num, unit) = match v.strip_suffix('d') {
        Some(n) => (n, 86_400u64),
        None => (v.strip_suffix('s').unwrap_or(v), 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{v:?} is not a number of seconds or days (e.g. 7776000 or 90d)"))
}
