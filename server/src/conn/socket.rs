//! The socket writer: one task per connection that drains its queues into
//! the socket, gathering frames into few writes.
//!
//! Touches the socket's write half, the connection's two queues (`direct`,
//! then the session's `live` outbox) and its `Kill` switch and `AckCell`
//! (from `rooms`). It decides nothing about the protocol: it writes what it
//! is given, in order, within `write_timeout`, and kills the connection
//! when a write fails or makes no progress. A slow reader is dropped by the
//! writer thread when its outbox passes `max_outbound_bytes` (`rooms`);
//! this task then stops at once, dropping the queue.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use notesync_protocol::ServerFrame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::rooms::{AckCell, Kill, OutboxRx};

/// The read half of a connection (TCP or TLS).
pub(crate) type Rd = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection (TCP or TLS).
pub(crate) type Wr = Box<dyn AsyncWrite + Send + Unpin>;

/// Most bytes the socket writer gathers into one write.
const GATHER_BYTES: usize = 64 * 1024;
/// Time allowed for the last frame and the close after a kill.
pub(super) const FINAL_WRITE: Duration = Duration::from_secs(2);
/// After sending a closing error, how long unread input is drained so the
/// peer gets the frame instead of a reset.
const LINGER: Duration = Duration::from_millis(500);

/// Reads and discards input for a moment, so closing does not reset the
/// connection before the peer has read the error frame.
pub(super) async fn linger(mut rd: Rd) {
    let mut buf = vec![0u8; 16 * 1024];
    let _ = timeout(LINGER, async {
        let mut total = 0usize;
        while total < (1 << 20) {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// Sends one closing frame, then closes.
pub(crate) async fn reject(rd: Rd, mut wr: Wr, frame: Bytes) {
    let _ = timeout(FINAL_WRITE, wr.write_all(&frame)).await;
    let _ = timeout(FINAL_WRITE, wr.shutdown()).await;
    linger(rd).await;
}

/// What the socket writer needs besides the queues.
pub(super) struct WriteSide {
    pub kill: Arc<Kill>,
    /// Session acks (coalesced, see `rooms::AckCell`).
    pub ack: Arc<AckCell>,
    /// A closing frame to send once both queues are drained.
    pub last: Arc<OnceLock<Bytes>>,
    pub write_timeout: Duration,
}

/// Drains `direct`, then (once it closes) `live` and the acks, into the
/// socket; then the closing frame, if any.
pub(super) async fn write_loop(
    mut wr: Wr,
    mut direct: mpsc::Receiver<Bytes>,
    mut live: OutboxRx,
    side: WriteSide,
) {
    let WriteSide {
        kill,
        ack,
        last,
        write_timeout,
    } = side;
    let mut direct_open = true;
    let mut live_open = true;
    let mut acked = 0u64;
    let mut buf = BytesMut::new();
    while direct_open || live_open {
        let first = tokio::select! {
            biased;
            _ = kill.aborted().cancelled() => break,
            m = direct.recv(), if direct_open => match m {
                Some(b) => Some(b),
                None => {
                    direct_open = false;
                    continue;
                }
            },
            m = live.recv(), if !direct_open => match m {
                Some(b) => Some(b),
                None => {
                    live_open = false;
                    None
                }
            },
            _ = ack.changed(), if !direct_open => None,
        };
        // Loaded before draining: every refusal this count covers is
        // already queued (rooms::AckCell).
        let ack_now = ack.load();
        let mut live_bytes = 0;
        buf.clear();
        if let Some(b) = first {
            if !direct_open {
                live_bytes += b.len();
            }
            buf.extend_from_slice(&b);
        }
        loop {
            let more = if direct_open {
                direct.try_recv().ok()
            } else {
                live.try_recv().inspect(|b| live_bytes += b.len())
            };
            let Some(b) = more else { break };
            buf.extend_from_slice(&b);
            if buf.len() >= GATHER_BYTES {
                if !write_out(&mut wr, &buf, &kill, write_timeout).await {
                    return;
                }
                live.release(live_bytes);
                live_bytes = 0;
                buf.clear();
            }
        }
        if !direct_open && ack_now > acked {
            ServerFrame::SessionAck { count: ack_now }.encode(&mut buf);
            acked = ack_now;
        }
        if !buf.is_empty() && !write_out(&mut wr, &buf, &kill, write_timeout).await {
            return;
        }
        live.release(live_bytes);
    }
    // A kill's frame wins over the connection's own closing frame.
    let closing = kill.frame().or_else(|| last.get().cloned());
    if let Some(frame) = closing {
        let _ = timeout(FINAL_WRITE, wr.write_all(&frame)).await;
    }
    let _ = timeout(FINAL_WRITE, wr.shutdown()).await;
}

/// Writes `buf`; false (and the connection killed) if it failed, timed out
/// or the connection was killed meanwhile.
async fn write_out(wr: &mut Wr, buf: &[u8], kill: &Kill, write_timeout: Duration) -> bool {
    let written = tokio::select! {
        biased;
        _ = kill.aborted().cancelled() => return false,
        r = with_timeout(write_timeout, wr.write_all(buf)) => r,
    };
    match written {
        Some(Ok(())) => true,
        Some(Err(e)) => {
            tracing::debug!(error = %e, "write failed");
            kill.kill(None);
            false
        }
        None => {
            tracing::debug!("write made no progress within write_timeout");
            kill.kill(None);
            false
        }
    }
}

/// `f` with a time limit; a zero limit means none.
pub(super) async fn with_timeout<F: Future>(limit: Duration, f: F) -> Option<F::Output> {
    if limit.is_zero() {
        Some(f.await)
    } else {
        timeout(limit, f).await.ok()
    }
}
