//! A connection to a notesync server: framing, hello, bounded waits.
//!
//! TLS on the wrong port is recognised from the first bytes (PROTOCOL.md
//! 2.1) and named, so the user learns which flag to change: a TLS record in
//! reply to a plain hello is `ServerSpeaksTls`, a ClientHello answered with
//! bytes that are no TLS record is `NotTls`.
//!
//! Once subscribed to the change feed (PROTOCOL.md 3.8), a connection
//! sets aside the feed's 38s and 39s that fall between replies, in its
//! [`FeedInbox`], so the sync code reading a reply never sees them and the
//! feed loses none.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{FutureExt, SinkExt, StreamExt};
use notesync_protocol::{
    ClientCodec, ClientFrame, DecodeError, DocId, ErrorCode, ErrorFrame, Hello, PROTOCOL_VERSION,
    ServerFrame, Time, VERSION_FEED, VERSION_RUNS, ValueError, is_tls_record_start,
};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_util::codec::Framed;

/// TLS settings of a connection.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// PEM file of the certificate authorities to trust (for a
    /// self-signed server); None: the public web roots (webpki-roots).
    pub ca_file: Option<PathBuf>,
    /// The name the server's certificate must carry; None: the host part
    /// of the address.
    pub server_name: Option<String>,
}

/// A byte stream to the server: TCP, or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// How to reach the server.
#[derive(Clone)]
pub struct ServerConfig {
    /// `host:port`.
    pub addr: String,
    /// Sent in hello; empty when the server needs none.
    pub token: Vec<u8>,
    /// Longest wait for any one reply before the connection is given up.
    pub reply_timeout: Duration,
    /// Connect with TLS; None: plain TCP.
    pub tls: Option<TlsSettings>,
}

impl ServerConfig {
    pub fn new(addr: impl Into<String>) -> Self {
        ServerConfig {
            addr: addr.into(),
            token: Vec::new(),
            reply_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

// By hand: the token is a secret and must never reach a log.
impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("addr", &self.addr)
            .field(
                "token",
                &if self.token.is_empty() {
                    "none"
                } else {
                    "<redacted>"
                },
            )
            .field("reply_timeout", &self.reply_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn tls_connector(tls: &TlsSettings) -> Result<TlsConnector, TlsError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| TlsError::CaFile {
                    path: path.clone(),
                    source,
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::NoCa(path.clone()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Why a TLS connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading CA file {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("no usable CA certificate in {}", .0.display())]
    NoCa(PathBuf),
    #[error("invalid server name {name:?}: {source}")]
    ServerName {
        name: String,
        source: rustls_pki_types::InvalidDnsNameError,
    },
    #[error("{0}")]
    Config(#[source] rustls::Error),
    /// The handshake failed: a certificate not trusted or not for this
    /// name (a server that does not speak TLS is `NetError::NotTls`).
    #[error("handshake with {addr}: {source}")]
    Handshake {
        addr: String,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot connect to {addr}: {source} (is notesync-server running there?)")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server sent bytes that are not a valid frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("the server closed the connection")]
    Closed,
    #[error("no reply from the server within {0:?}")]
    Timeout(Duration),
    /// A subscribed connection heard nothing, not even a heartbeat, for
    /// this long (PROTOCOL.md 3.8: heartbeats come at most 15 s apart).
    #[error("the change feed was silent for {0:?}: the connection is taken for dead")]
    FeedSilent(Duration),
    #[error("server error {code}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("unexpected reply from the server: {0}")]
    Unexpected(String),
    #[error("cannot send hello: {0}")]
    Hello(#[source] ValueError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// A plain connection got a TLS record where a frame was expected.
    #[error("{addr}: the server speaks TLS: use --tls (or --tls-ca FILE)")]
    ServerSpeaksTls {
        addr: String,
        #[source]
        source: DecodeError,
    },
    /// The TLS ClientHello was answered with bytes that are no TLS record
    /// (a notesync server without TLS answers with an error frame).
    #[error("{addr}: the server does not speak TLS on this port (connect without --tls)")]
    NotTls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

impl NetError {
    /// Whether retrying later on a new connection may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            NetError::Server { code, .. } => matches!(
                *code,
                ErrorCode::SLOW_READER
                    | ErrorCode::TIMEOUT
                    | ErrorCode::SERVER_BUSY
                    | ErrorCode::STORAGE
                    | ErrorCode::SHUTTING_DOWN
            ),
            NetError::Decode(_)
            | NetError::Unexpected(_)
            | NetError::Hello(_)
            | NetError::Tls(_)
            | NetError::ServerSpeaksTls { .. }
            | NetError::NotTls { .. } => false,
            _ => true,
        }
    }
}

impl From<ErrorFrame> for NetError {
    fn from(e: ErrorFrame) -> Self {
        NetError::Server {
            code: e.code,
            message: e.message,
        }
    }
}

/// A failed TLS handshake as the error that says why. rustls finds no
/// content type in the first byte of a reply that is no TLS record; every
/// other failure (an io::Error that wraps a rustls::Error shows it as its
/// own message, which names the certificate problem) is `Handshake`.
fn handshake_error(addr: &str, source: std::io::Error) -> NetError {
    let not_tls = source
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
            )
        });
    let addr = addr.to_owned();
    if not_tls {
        NetError::NotTls { addr, source }
    } else {
        TlsError::Handshake { addr, source }.into()
    }
}

/// `f`'s outcome, or a timeout error once `limit` has passed.
async fn within<T>(limit: Duration, f: impl Future<Output = T>) -> Result<T, NetError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| NetError::Timeout(limit))
}

/// An open connection, after hello and welcome.
pub struct Conn {
    framed: Framed<Box<dyn Stream>, ClientCodec>,
    timeout: Duration,
    pub server_time: Time,
    /// The protocol version the server answered in welcome.
    version: u8,
    /// Set by [`Conn::subscribe`]: the feed's frames read so far.
    feed: Option<FeedInbox>,
    /// When the server last sent anything (the feed's liveness).
    last_heard: Instant,
}

/// The change feed's entries a subscribed connection has read and not yet
/// handed out, coalesced per document as the server coalesces them
/// (PROTOCOL.md 3.8), so that what waits here is bounded by the number of
/// documents however long a sync keeps the feed from being read.
#[derive(Debug, Default)]
pub struct FeedInbox {
    changed: BTreeMap<DocId, FeedChange>,
    /// The greatest time the feed has covered: every change up to it has
    /// been listed (a 38's last time, or a 39's).
    covered: Time,
    /// Whether a frame came since the last take (a 39 alone moves the
    /// cursor, so it ends a wait too).
    fresh: bool,
}

/// A document's latest change as the feed listed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedChange {
    pub time: Time,
    pub deleted: bool,
}

/// What the feed listed since the last [`Conn::take_feed`].
#[derive(Debug, Default)]
pub struct FeedBatch {
    pub changed: BTreeMap<DocId, FeedChange>,
    /// Every change up to this time is in this batch or an earlier one: a
    /// cursor to resubscribe from once they are all pulled.
    pub covered: Time,
}

impl FeedInbox {
    /// Keeps a feed frame; any other frame is given back.
    fn put(&mut self, frame: ServerFrame) -> Option<ServerFrame> {
        match frame {
            ServerFrame::FeedChanges(entries) => {
                for e in entries.iter() {
                    self.covered = self.covered.max(e.time);
                    let change = FeedChange {
                        time: e.time,
                        deleted: e.deleted,
                    };
                    self.changed
                        .entry(e.doc)
                        .and_modify(|c| {
                            if c.time < e.time {
                                *c = change
                            }
                        })
                        .or_insert(change);
                }
                self.fresh = true;
                None
            }
            ServerFrame::FeedHeartbeat { time } => {
                self.covered = self.covered.max(time);
                self.fresh = true;
                None
            }
            other => Some(other),
        }
    }

    fn take(&mut self) -> FeedBatch {
        self.fresh = false;
        FeedBatch {
            changed: std::mem::take(&mut self.changed),
            covered: self.covered,
        }
    }
}

impl Conn {
    /// Connects with this crate's version (4); a server that answers
    /// `unsupported_version` is tried with each older version down to 2,
    /// and the connection then sends only that version's frames
    /// (PROTOCOL.md 6): a version-3 server still gets runs.
    pub async fn connect(cfg: &ServerConfig, replica: u128) -> Result<Conn, NetError> {
        let mut version = PROTOCOL_VERSION;
        loop {
            match Self::connect_version(cfg, replica, version).await {
                Err(NetError::Server { code, message })
                    if code == ErrorCode::UNSUPPORTED_VERSION && version > VERSION_RUNS - 1 =>
                {
                    tracing::info!(%message, "the server does not speak version {version}; trying {}", version - 1);
                    version -= 1;
                }
                r => return r,
            }
        }
    }

    /// The version this connection speaks (what the server answered).
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Whether runs and ranges (frames 4, 37, 70, 71) may be sent.
    pub fn speaks_runs(&self) -> bool {
        self.version >= VERSION_RUNS
    }

    /// Whether the change feed (frame 5) may be asked for.
    pub fn speaks_feed(&self) -> bool {
        self.version >= VERSION_FEED
    }

    /// Subscribes to the change feed from `since` (a 5). From now on the
    /// feed's frames are set aside as they arrive, between the replies to
    /// later requests as well, until [`Conn::take_feed`].
    pub async fn subscribe(&mut self, since: Time) -> Result<(), NetError> {
        if !self.speaks_feed() {
            return Err(NetError::Unexpected(format!(
                "the change feed needs protocol version {VERSION_FEED}; this server speaks {}",
                self.version
            )));
        }
        self.send(ClientFrame::Subscribe { since }).await?;
        self.feed.get_or_insert_with(FeedInbox::default);
        Ok(())
    }

    /// Waits for the feed's next frame (at once if frames are set aside
    /// already), then reads whatever else has already arrived, so that
    /// many entries arriving together are taken as one batch. A feed
    /// silent for `silence` (no frame at all since the last one) is an
    /// error, as is any frame that is not the feed's.
    pub async fn next_feed(&mut self, silence: Duration) -> Result<(), NetError> {
        let Some(inbox) = &self.feed else {
            return Err(NetError::Unexpected(
                "not subscribed to the change feed".into(),
            ));
        };
        if !inbox.fresh {
            let next = tokio::time::timeout_at(self.last_heard + silence, self.framed.next())
                .await
                .map_err(|_| NetError::FeedSilent(silence))?;
            self.feed_frame(next)?;
        }
        // What has already been received joins this batch.
        while let Some(next) = self.framed.next().now_or_never() {
            self.feed_frame(next)?;
        }
        Ok(())
    }

    /// One frame read while waiting for the feed: set aside, or an error.
    fn feed_frame(
        &mut self,
        next: Option<Result<ServerFrame, DecodeError>>,
    ) -> Result<(), NetError> {
        let frame = next.ok_or(NetError::Closed)??;
        self.last_heard = Instant::now();
        let inbox = self.feed.as_mut().expect("subscribed");
        match inbox.put(frame) {
            None => Ok(()),
            Some(ServerFrame::Error(e)) => Err(e.into()),
            Some(other) => Err(NetError::Unexpected(format!(
                "expected the change feed's 38 or 39 between replies, got {other:?}"
            ))),
        }
    }

    /// The feed's entries read so far (empty before a subscribe).
    pub fn take_feed(&mut self) -> FeedBatch {
        self.feed.as_mut().map(FeedInbox::take).unwrap_or_default()
    }

    /// Connects announcing `version` in hello.
    pub async fn connect_version(
        cfg: &ServerConfig,
        replica: u128,
        version: u8,
    ) -> Result<Conn, NetError> {
        let stream = within(cfg.reply_timeout, TcpStream::connect(&cfg.addr))
            .await?
            .map_err(|source| NetError::Connect {
                addr: cfg.addr.clone(),
                source,
            })?;
        stream.set_nodelay(true)?;
        let stream: Box<dyn Stream> = match &cfg.tls {
            None => Box::new(stream),
            Some(tls) => {
                let host = tls
                    .server_name
                    .clone()
                    .unwrap_or_else(|| host_of(&cfg.addr).to_owned());
                let name =
                    rustls_pki_types::ServerName::try_from(host.clone()).map_err(|source| {
                        TlsError::ServerName {
                            name: host.clone(),
                            source,
                        }
                    })?;
                let handshake = tls_connector(tls)?.connect(name, stream);
                let stream = within(cfg.reply_timeout, handshake)
                    .await?
                    .map_err(|source| handshake_error(&cfg.addr, source))?;
                Box::new(stream)
            }
        };
        let mut conn = Conn {
            framed: Framed::new(stream, ClientCodec::default()),
            timeout: cfg.reply_timeout,
            server_time: 0,
            version,
            feed: None,
            last_heard: Instant::now(),
        };
        let mut hello = Hello::new(replica, cfg.token.clone()).map_err(NetError::Hello)?;
        hello.version = version;
        conn.send(ClientFrame::Hello(hello)).await?;
        let reply = match conn.recv().await {
            Err(NetError::Decode(source)) if is_tls_record_start(conn.framed.read_buffer()) => {
                return Err(NetError::ServerSpeaksTls {
                    addr: cfg.addr.clone(),
                    source,
                });
            }
            reply => reply?,
        };
        match reply {
            ServerFrame::Welcome {
                version,
                server_time,
            } if version == conn.version => {
                conn.server_time = server_time;
                Ok(conn)
            }
            other => Err(NetError::Unexpected(format!(
                "expected welcome, got {other:?}"
            ))),
        }
    }

    /// Queues a frame without flushing (pipelining).
    pub async fn feed(&mut self, f: ClientFrame) -> Result<(), NetError> {
        self.framed.feed(f).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), NetError> {
        SinkExt::<ClientFrame>::flush(&mut self.framed).await?;
        Ok(())
    }

    pub async fn send(&mut self, f: ClientFrame) -> Result<(), NetError> {
        self.framed.send(f).await?;
        Ok(())
    }

    /// The next frame; an error frame becomes `NetError::Server`.
    pub async fn recv(&mut self) -> Result<ServerFrame, NetError> {
        match self.recv_raw().await? {
            ServerFrame::Error(e) => Err(e.into()),
            f => Ok(f),
        }
    }

    /// The next frame, error frames included (the feed's set aside).
    pub async fn recv_raw(&mut self) -> Result<ServerFrame, NetError> {
        loop {
            let frame = match tokio::time::timeout(self.timeout, self.framed.next()).await {
                Err(_) => return Err(NetError::Timeout(self.timeout)),
                Ok(None) => return Err(NetError::Closed),
                Ok(Some(r)) => r?,
            };
            self.last_heard = Instant::now();
            match &mut self.feed {
                Some(inbox) => {
                    if let Some(frame) = inbox.put(frame) {
                        return Ok(frame);
                    }
                }
                None => return Ok(frame),
            }
        }
    }

    /// The next frame with no timeout (a live session waiting for edits).
    pub async fn recv_idle(&mut self) -> Option<Result<ServerFrame, NetError>> {
        self.framed.next().await.map(|r| r.map_err(NetError::from))
    }
}

#[cfg(test)]
mod feed_inbox_tests {
    use super::*;
    use notesync_protocol::{FeedEntries, FeedEntry};

    fn changes(entries: &[(Time, DocId, bool)]) -> ServerFrame {
        ServerFrame::FeedChanges(
            entries
                .iter()
                .map(|&(time, doc, deleted)| FeedEntry { time, doc, deleted })
                .collect::<FeedEntries>(),
        )
    }

    #[test]
    fn the_inbox_keeps_each_documents_latest_change_and_the_cursor_it_covers() {
        let mut inbox = FeedInbox::default();
        assert!(
            inbox
                .put(changes(&[(5, 1, false), (6, 2, false)]))
                .is_none()
        );
        assert!(inbox.put(changes(&[(9, 1, true)])).is_none());
        assert!(inbox.put(ServerFrame::FeedHeartbeat { time: 12 }).is_none());
        // Any other frame is a reply's, given back.
        let reply = ServerFrame::DocDeleted {
            doc: 3,
            deleted_time: 4,
        };
        assert!(inbox.put(reply).is_some());
        assert!(inbox.fresh);
        let batch = inbox.take();
        let want = BTreeMap::from([
            (
                1,
                FeedChange {
                    time: 9,
                    deleted: true,
                },
            ),
            (
                2,
                FeedChange {
                    time: 6,
                    deleted: false,
                },
            ),
        ]);
        assert_eq!(batch.changed, want);
        assert_eq!(batch.covered, 12, "a 39 later than every entry covers them");
        // Taken: nothing waits, and the cursor stays.
        assert!(!inbox.fresh);
        let again = inbox.take();
        assert!(again.changed.is_empty());
        assert_eq!(again.covered, 12);
        // A 39 alone is news: it moves the cursor.
        inbox.put(ServerFrame::FeedHeartbeat { time: 20 });
        assert!(inbox.fresh);
        assert_eq!(inbox.take().covered, 20);
    }
}
