//! Raw connections: frames are encoded into one buffer and written in big
//! writes (pipelining); replies are decoded with the protocol's codec.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use notesync_protocol::{ClientCodec, ClientFrame, DocId, DocResponse, Hello, ServerFrame, Time};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::FramedRead;

use super::Result;
use crate::bail;

/// Longest wait for one reply outside the timed loops.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

pub type Reader = FramedRead<OwnedReadHalf, ClientCodec>;

/// A connection after hello/welcome (if a replica id was given).
pub struct Conn {
    pub rd: Reader,
    pub wr: OwnedWriteHalf,
    buf: BytesMut,
    /// Bytes written so far.
    pub sent: u64,
    /// The welcome's server time (0 without hello).
    pub server_time: Time,
}

/// What a session start returned.
pub struct Started {
    pub site: u8,
    pub sync_time: Time,
    pub session_id: u64,
    pub catch_up: Vec<DocResponse>,
}

impl Conn {
    /// A connection that says protocol version 2 in its hello, so every
    /// scenario reads the frames both the old and the new server send
    /// (A/B runs against binaries without version 3); `catch-up` measures
    /// version 3 pulls through [`Conn::connect_version`].
    pub async fn connect(addr: SocketAddr, replica: Option<u128>) -> Result<Conn> {
        Self::connect_version(addr, replica, 2).await
    }

    /// A connection whose hello says `version`.
    pub async fn connect_version(
        addr: SocketAddr,
        replica: Option<u128>,
        version: u8,
    ) -> Result<Conn> {
        let s = tokio::time::timeout(REPLY_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out")??;
        s.set_nodelay(true)?;
        let (rd, wr) = s.into_split();
        let mut c = Conn {
            rd: FramedRead::new(rd, ClientCodec::default()),
            wr,
            buf: BytesMut::new(),
            sent: 0,
            server_time: 0,
        };
        if let Some(r) = replica {
            let mut hello = Hello::new(r, Bytes::new())?;
            hello.version = version;
            c.send(&ClientFrame::Hello(hello)).await?;
            match c.recv().await? {
                ServerFrame::Welcome { server_time, .. } => c.server_time = server_time,
                other => bail!("expected welcome, got {other:?}"),
            }
        }
        Ok(c)
    }

    /// Queues a frame (written on the next flush).
    pub fn feed(&mut self, f: &ClientFrame) {
        f.encode(&mut self.buf);
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub async fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.wr.write_all(&self.buf).await?;
            self.sent += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    pub async fn send(&mut self, f: &ClientFrame) -> Result<()> {
        self.feed(f);
        self.flush().await
    }

    /// Writes pre-encoded bytes.
    pub async fn write_raw(&mut self, b: &[u8]) -> Result<()> {
        self.wr.write_all(b).await?;
        self.sent += b.len() as u64;
        Ok(())
    }

    /// The next frame; an error frame is an error.
    pub async fn recv(&mut self) -> Result<ServerFrame> {
        recv(&mut self.rd, REPLY_TIMEOUT).await
    }

    /// session_start, then the 33s and the 68.
    pub async fn start_session(&mut self, doc: DocId, since: Time) -> Result<Started> {
        self.send(&ClientFrame::SessionStart { since, doc }).await?;
        let mut catch_up = Vec::new();
        loop {
            match self.recv().await? {
                ServerFrame::DocResponse(r) => catch_up.push(r),
                ServerFrame::SessionStarted {
                    session_id,
                    site,
                    sync_time,
                } => {
                    return Ok(Started {
                        site,
                        sync_time,
                        session_id,
                        catch_up,
                    });
                }
                other => bail!("session start: unexpected {other:?}"),
            }
        }
    }
}

/// The next frame within `limit`; an error frame or the end is an error.
pub async fn recv(rd: &mut Reader, limit: Duration) -> Result<ServerFrame> {
    match tokio::time::timeout(limit, rd.next()).await {
        Err(_) => bail!("no frame from the server within {limit:?}"),
        Ok(None) => bail!("the server closed the connection"),
        Ok(Some(Err(e))) => bail!("reading from the server: {e}"),
        Ok(Some(Ok(ServerFrame::Error(e)))) => {
            bail!("server error {}: {}", e.code, e.message)
        }
        Ok(Some(Ok(f))) => Ok(f),
    }
}

/// Runs `f` over `items` with at most `limit` at once; the first error
/// stops the rest.
pub async fn bounded<T, F, Fut, R>(items: Vec<T>, limit: usize, f: F) -> Result<Vec<R>>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<R>>,
{
    let results: Vec<Result<R>> = futures::stream::iter(items.into_iter().map(f))
        .buffered(limit.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}
