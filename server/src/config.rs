//! Server configuration and its documented defaults.
//!
//! Every limit here is listed, with its default, in `notesync-server --help`
//! and in the README's server section; keep the three in step.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notesync_protocol::Limits;

use crate::store::{SystemClock, WallClock};

/// Everything a [`crate::Server`] needs to start.
#[derive(Clone)]
pub struct Config {
    /// Address to listen on (`host:port`; port 0 picks a free port).
    pub listen: String,
    /// Folder holding the database (`notesync.redb`); created if missing.
    pub data_dir: PathBuf,
    /// Most connections served at once; one more gets `server_busy`.
    pub max_connections: usize,
    /// Time a new connection has to send its first frame.
    pub handshake_timeout: Duration,
    /// A sync-mode connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// A session that sends nothing for this long is closed (sessions that
    /// only watch a document are legitimately quiet, so this is long).
    pub session_idle_timeout: Duration,
    /// A subscribed change feed that sent nothing for this long gets a
    /// heartbeat (PROTOCOL.md 3.8). Taken within 1 to 15 s (`feed_heartbeat()`):
    /// 0 would send heartbeats without pause, more breaks the protocol's
    /// promise.
    pub feed_heartbeat: Duration,
    /// A subscribed connection whose outbound queue stays full this long
    /// (it cannot take the feed's next frame) is closed as a `slow_reader`.
    /// At least 1 s (`feed_max_lag()`): 0 would drop a reader at its first
    /// full queue.
    pub feed_max_lag: Duration,
    /// A write to the socket that makes no progress for this long closes
    /// the connection.
    pub write_timeout: Duration,
    /// Decoder limits (frame bytes, items per list, pid depth).
    pub limits: Limits,
    /// Bytes of live frames (broadcasts, acks) queued for one connection
    /// before it is disconnected as a `slow_reader`.
    pub max_outbound_bytes: usize,
    /// Sync requests one connection may have queued (pipelined) at once;
    /// past this the server stops reading that connection until it catches
    /// up.
    pub max_pipeline: usize,
    /// Entries in one synclist response (PROTOCOL.md 3.1).
    pub max_synclist_entries: usize,
    /// Requests the writer commits in one redb transaction, at most.
    pub max_batch: usize,
    /// Requests waiting for the writer, at most; senders wait beyond it.
    pub writer_queue: usize,
    /// On shutdown, how long connections get to finish before the server
    /// stops waiting for them.
    pub shutdown_timeout: Duration,
    /// Atoms deleted longer ago than this are dropped (tombstone
    /// compaction, PROTOCOL.md 3.6); a client whose last sync is older
    /// gets a full resync. Zero: never compact.
    pub tombstone_horizon: Duration,
    /// How often a compaction pass starts (with a horizon).
    pub compaction_interval: Duration,
    /// Require a valid token in every connection's hello, even if the data
    /// folder has no tokens yet. Whenever it has tokens, authentication is
    /// required anyway; without tokens and without this, the server serves
    /// namespace `default` to anyone and listens on loopback only.
    pub require_auth: bool,
    /// With authentication required: time a new connection has to send its
    /// hello (shorter than `handshake_timeout`, as nothing is trusted yet).
    pub auth_timeout: Duration,
    /// With authentication required: the largest frame read before the
    /// hello is accepted (a hello is at most 274 bytes).
    pub pre_auth_max_frame_bytes: usize,
    /// Failed authentications from one IP address within
    /// `failed_auth_window`, at most; past it the address is refused until
    /// the window ends.
    pub max_failed_auth: u32,
    pub failed_auth_window: Duration,
    /// How often the server looks for changes to the tokens file (added or
    /// revoked tokens; a revoked token's connections are closed).
    pub tokens_poll: Duration,
    /// Serve TLS with this certificate chain and key (PEM files); None:
    /// plain TCP.
    pub tls: Option<TlsFiles>,
    /// Serve Prometheus metrics and health over HTTP (`GET /metrics`,
    /// `GET /healthz`) on this address; None: no metrics listener.
    pub metrics: Option<String>,
    /// The wall clock the server clock is built on (injectable for tests).
    pub wall_clock: Arc<dyn WallClock>,
}

/// A PEM certificate chain and its private key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Config {
    /// `feed_heartbeat` within the bounds its doc names.
    pub fn feed_heartbeat(&self) -> Duration {
        self.feed_heartbeat
            .clamp(Duration::from_secs(1), Self::MAX_FEED_HEARTBEAT)
    }

    /// `feed_max_lag`, at least 1 s.
    pub fn feed_max_lag(&self) -> Duration {
        self.feed_max_lag.max(Duration::from_secs(1))
    }

    pub const DEFAULT_LISTEN: &'static str = "127.0.0.1:7420";
    pub const DEFAULT_DATA_DIR: &'static str = "./notesync-data";
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    pub const DEFAULT_SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    pub const DEFAULT_FEED_HEARTBEAT: Duration = Duration::from_secs(10);
    /// The protocol's bound on the heartbeat interval (PROTOCOL.md 3.8).
    pub const MAX_FEED_HEARTBEAT: Duration = Duration::from_secs(15);
    pub const DEFAULT_FEED_MAX_LAG: Duration = Duration::from_secs(30);
    pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_OUTBOUND_BYTES: usize = 16 * 1024 * 1024;
    pub const DEFAULT_MAX_PIPELINE: usize = 64;
    pub const DEFAULT_MAX_SYNCLIST_ENTRIES: usize = 10_000;
    pub const DEFAULT_MAX_BATCH: usize = 4096;
    pub const DEFAULT_WRITER_QUEUE: usize = 8192;
    pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
    /// 90 days: a device offline for longer does one full resync.
    pub const DEFAULT_TOMBSTONE_HORIZON: Duration = Duration::from_secs(90 * 24 * 3600);
    pub const DEFAULT_COMPACTION_INTERVAL: Duration = Duration::from_secs(3600);
    pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_PRE_AUTH_MAX_FRAME_BYTES: usize = 512;
    pub const DEFAULT_MAX_FAILED_AUTH: u32 = 10;
    pub const DEFAULT_FAILED_AUTH_WINDOW: Duration = Duration::from_secs(60);
    pub const DEFAULT_TOKENS_POLL: Duration = Duration::from_secs(1);

    /// The defaults, serving `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            listen: Self::DEFAULT_LISTEN.to_owned(),
            data_dir: data_dir.into(),
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            session_idle_timeout: Self::DEFAULT_SESSION_IDLE_TIMEOUT,
            feed_heartbeat: Self::DEFAULT_FEED_HEARTBEAT,
            feed_max_lag: Self::DEFAULT_FEED_MAX_LAG,
            write_timeout: Self::DEFAULT_WRITE_TIMEOUT,
            limits: Limits::default(),
            max_outbound_bytes: Self::DEFAULT_MAX_OUTBOUND_BYTES,
            max_pipeline: Self::DEFAULT_MAX_PIPELINE,
            max_synclist_entries: Self::DEFAULT_MAX_SYNCLIST_ENTRIES,
            max_batch: Self::DEFAULT_MAX_BATCH,
            writer_queue: Self::DEFAULT_WRITER_QUEUE,
            shutdown_timeout: Self::DEFAULT_SHUTDOWN_TIMEOUT,
            tombstone_horizon: Self::DEFAULT_TOMBSTONE_HORIZON,
            compaction_interval: Self::DEFAULT_COMPACTION_INTERVAL,
            require_auth: false,
            auth_timeout: Self::DEFAULT_AUTH_TIMEOUT,
            pre_auth_max_frame_bytes: Self::DEFAULT_PRE_AUTH_MAX_FRAME_BYTES,
            max_failed_auth: Self::DEFAULT_MAX_FAILED_AUTH,
            failed_auth_window: Self::DEFAULT_FAILED_AUTH_WINDOW,
            tokens_poll: Self::DEFAULT_TOKENS_POLL,
            tls: None,
            metrics: None,
            wall_clock: Arc::new(SystemClock),
        }
    }

    /// Same configuration, listening on `addr`.
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen = addr.into();
        self
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("max_connections", &self.max_connections)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("session_idle_timeout", &self.session_idle_timeout)
            .field("feed_heartbeat", &self.feed_heartbeat)
            .field("feed_max_lag", &self.feed_max_lag)
            .field("write_timeout", &self.write_timeout)
            .field("limits", &self.limits)
            .field("max_outbound_bytes", &self.max_outbound_bytes)
            .field("max_pipeline", &self.max_pipeline)
            .field("max_synclist_entries", &self.max_synclist_entries)
            .field("max_batch", &self.max_batch)
            .field("writer_queue", &self.writer_queue)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("tombstone_horizon", &self.tombstone_horizon)
            .field("compaction_interval", &self.compaction_interval)
            .field("require_auth", &self.require_auth)
            .field("auth_timeout", &self.auth_timeout)
            .field("pre_auth_max_frame_bytes", &self.pre_auth_max_frame_bytes)
            .field("max_failed_auth", &self.max_failed_auth)
            .field("failed_auth_window", &self.failed_auth_window)
            .field("tokens_poll", &self.tokens_poll)
            .field("tls", &self.tls)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}
