//! A connection to a notesync server: framing, hello, bounded waits.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use notesync_protocol::{
    ClientCodec, ClientFrame, DecodeError, ErrorCode, ErrorFrame, Hello, PROTOCOL_VERSION,
    ServerFrame, Time,
};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `host:port`.
    pub addr: String,
    /// Sent in hello; empty when the server needs none.
    pub token: Vec<u8>,
    /// Longest wait for any one reply before the connection is given up.
    pub reply_timeout: Duration,
}

impl ServerConfig {
    pub fn new(addr: impl Into<String>) -> Self {
        ServerConfig {
            addr: addr.into(),
            token: Vec::new(),
            reply_timeout: Duration::from_secs(30),
        }
    }
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
    #[error("server error {code}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("unexpected reply from the server: {0}")]
    Unexpected(String),
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
            NetError::Decode(_) | NetError::Unexpected(_) => false,
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

/// An open connection, after hello and welcome.
pub struct Conn {
    framed: Framed<TcpStream, ClientCodec>,
    timeout: Duration,
    pub server_time: Time,
}

impl Conn {
    pub async fn connect(cfg: &ServerConfig, replica: u128) -> Result<Conn, NetError> {
        let connect = TcpStream::connect(&cfg.addr);
        let stream = tokio::time::timeout(cfg.reply_timeout, connect)
            .await
            .map_err(|_| NetError::Timeout(cfg.reply_timeout))?
            .map_err(|source| NetError::Connect {
                addr: cfg.addr.clone(),
                source,
            })?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            framed: Framed::new(stream, ClientCodec::default()),
            timeout: cfg.reply_timeout,
            server_time: 0,
        };
        let hello = Hello::new(replica, cfg.token.clone())
            .map_err(|e| NetError::Unexpected(format!("cannot send hello: {e}")))?;
        conn.send(ClientFrame::Hello(hello)).await?;
        match conn.recv().await? {
            ServerFrame::Welcome {
                version,
                server_time,
            } if version == PROTOCOL_VERSION => {
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

    /// The next frame, error frames included.
    pub async fn recv_raw(&mut self) -> Result<ServerFrame, NetError> {
        match tokio::time::timeout(self.timeout, self.framed.next()).await {
            Err(_) => Err(NetError::Timeout(self.timeout)),
            Ok(None) => Err(NetError::Closed),
            Ok(Some(r)) => Ok(r?),
        }
    }

    /// The next frame with no timeout (a live session waiting for edits).
    pub async fn recv_idle(&mut self) -> Option<Result<ServerFrame, NetError>> {
        self.framed.next().await.map(|r| r.map_err(NetError::from))
    }
}
