//! Hand-made bytes for malformed and oversized input, and a flood helper
//! for frames over `max_frame_bytes`.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use notesync_protocol::{ClientCodec, ErrorFrame, ServerFrame};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use crate::conn::{WAIT, describe};

/// Writes a frame byte by byte, valid or not.
#[derive(Debug, Clone, Default)]
pub struct RawFrame(Vec<u8>);

impl RawFrame {
    pub fn new(header: u8) -> Self {
        RawFrame(vec![header])
    }
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u128(mut self, v: u128) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A name: the bytes, then the 0x0A terminator.
    pub fn name(self, b: &[u8]) -> Self {
        self.bytes(b).u8(b'\n')
    }
    /// A pid in wire form from `(site, ident)` levels; the depth byte is
    /// the number of levels.
    pub fn pid(self, levels: &[(u8, u32)]) -> Self {
        let mut s = self.u8(levels.len() as u8);
        for &(site, ident) in levels {
            s = s.u8(site).bytes(&ident.to_be_bytes());
        }
        s
    }
    /// An atom: length byte, data, pid.
    pub fn atom(self, data: &[u8], levels: &[(u8, u32)]) -> Self {
        self.u8(data.len() as u8).bytes(data).pid(levels)
    }
    pub fn build(self) -> Vec<u8> {
        self.0
    }
}

/// What a flood of bytes produced.
#[derive(Debug)]
pub struct FloodOutcome {
    /// The first frame the server sent, if any.
    pub first: Option<ServerFrame>,
    /// Whether the server closed the connection after it (within the wait).
    pub closed_after: bool,
    /// Bytes written before the server stopped taking them.
    pub written: usize,
}

impl FloodOutcome {
    /// The error frame the server sent first; panics with what it sent
    /// otherwise.
    pub fn error(&self) -> &ErrorFrame {
        match &self.first {
            Some(ServerFrame::Error(e)) => e,
            Some(f) => panic!("expected an error frame, got {}", describe(f)),
            None => panic!(
                "expected an error frame, got nothing (written {} bytes)",
                self.written
            ),
        }
    }
}

/// Connects, writes `prefix` then `filler` repeatedly up to `total` bytes
/// while reading what the server sends back. The write side stops at the
/// first write error (the server closed). Every wait is bounded.
pub async fn flood(
    addr: SocketAddr,
    prefix: Vec<u8>,
    filler: Vec<u8>,
    total: usize,
) -> FloodOutcome {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut written = 0usize;
        if wr.write_all(&prefix).await.is_err() {
            return written;
        }
        written += prefix.len();
        let chunk: Vec<u8> = filler
            .iter()
            .copied()
            .cycle()
            .take(filler.len() * (65536 / filler.len().max(1)).max(1))
            .collect();
        while written < total {
            let n = chunk.len().min(total - written);
            match tokio::time::timeout(WAIT, wr.write_all(&chunk[..n])).await {
                Ok(Ok(())) => written += n,
                _ => break,
            }
        }
        written
    });
    let mut reader = FramedRead::new(rd, ClientCodec::default());
    // Sending up to `total` bytes may take a while on a slow machine; the
    // first frame has the writer's whole time plus the usual wait.
    let first = match tokio::time::timeout(WAIT * 3, reader.next()).await {
        Ok(Some(Ok(f))) => Some(f),
        _ => None,
    };
    let closed_after = if first.is_some() {
        matches!(
            tokio::time::timeout(WAIT, reader.next()).await,
            Ok(None) | Ok(Some(Err(_)))
        )
    } else {
        false
    };
    drop(reader);
    let written = match tokio::time::timeout(Duration::from_secs(30), writer).await {
        Ok(Ok(n)) => n,
        _ => 0,
    };
    FloodOutcome {
        first,
        closed_after,
        written,
    }
}
