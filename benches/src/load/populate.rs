//! Creates many documents fast: pipelined upserts over a few connections
//! (the writer commits many per batch).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use notesync_protocol::{
    AtomListBuilder, ClientFrame, DocId, DocName, Level, Pid, PidListBuilder, ServerFrame, Time,
    Upsert,
};
use tokio::sync::watch;

use super::Result;
use super::net::{self, Conn};
use crate::bail;

/// Upserts in flight per connection.
const IN_FLIGHT: usize = 512;
/// Frames per write.
const PER_WRITE: usize = 64;

/// The id of document `d` of a populated set.
pub fn doc_id(salt: u64, d: u64) -> DocId {
    ((salt as u128) << 64) | d as u128
}

/// An upsert creating document `d` with `atoms` one-word atoms of site 1
/// (a new document's first replica gets site 1).
pub fn create(salt: u64, d: u64, atoms: usize) -> Result<ClientFrame> {
    let mut ins = AtomListBuilder::new();
    for k in 0..atoms {
        let pid = Pid::from_levels(&[Level::new(k as u32 + 1, 1)]);
        ins.push_parts("note ", &pid)?;
    }
    Ok(ClientFrame::Upsert(Upsert {
        doc: doc_id(salt, d),
        name: DocName::new(format!("note {d}"))?,
        since: 0,
        inserts: ins.finish(),
        deletes: PidListBuilder::new().finish(),
    }))
}

pub struct Populated {
    pub elapsed: Duration,
    /// The largest sync time the server returned.
    pub last_time: Time,
}

/// Sends `frames(d)` for d in 0..docs over `conns` connections, pipelined,
/// and waits for every 34.
pub async fn upserts<F>(
    addr: SocketAddr,
    replica: u128,
    docs: u64,
    conns: u64,
    frames: F,
) -> Result<Populated>
where
    F: Fn(u64) -> Result<ClientFrame> + Send + Sync + Clone + 'static,
{
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let frames = frames.clone();
        tasks.push(tokio::spawn(async move {
            let conn = Conn::connect(addr, Some(replica)).await?;
            let Conn { mut rd, wr, .. } = conn;
            let mine: Vec<u64> = (c..docs).step_by(conns as usize).collect();
            let n = mine.len();
            let (done_tx, mut done_rx) = watch::channel(0usize);
            let reader = tokio::spawn(async move {
                let mut done = 0;
                let mut last: Time = 0;
                while done < n {
                    match net::recv(&mut rd, net::REPLY_TIMEOUT).await? {
                        ServerFrame::DocSync { sync_time, .. } => {
                            done += 1;
                            last = last.max(sync_time);
                            done_tx.send_replace(done);
                        }
                        ServerFrame::DocResponse(_) => {}
                        other => bail!("populate: unexpected {other:?}"),
                    }
                }
                Ok::<_, super::Error>(last)
            });
            let mut conn_w = WriteOnly {
                wr,
                buf: bytes::BytesMut::new(),
            };
            let mut sent = 0;
            for d in mine {
                while sent >= *done_rx.borrow() + IN_FLIGHT {
                    conn_w.flush().await?;
                    if tokio::time::timeout(net::REPLY_TIMEOUT, done_rx.changed())
                        .await
                        .is_err()
                    {
                        bail!("populate: no reply within {:?}", net::REPLY_TIMEOUT);
                    }
                }
                frames(d)?.encode(&mut conn_w.buf);
                sent += 1;
                if sent % PER_WRITE == 0 {
                    conn_w.flush().await?;
                }
            }
            conn_w.flush().await?;
            let last = reader.await??;
            drop(conn_w);
            Ok::<_, super::Error>(last)
        }));
    }
    let mut last_time = 0;
    for t in tasks {
        last_time = last_time.max(t.await??);
    }
    Ok(Populated {
        elapsed: t.elapsed(),
        last_time,
    })
}

struct WriteOnly {
    wr: tokio::net::tcp::OwnedWriteHalf,
    buf: bytes::BytesMut,
}

impl WriteOnly {
    async fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            tokio::io::AsyncWriteExt::write_all(&mut self.wr, &self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// A marker in a reused data folder: what was populated there.
pub fn read_marker(dir: &std::path::Path, kind: &str) -> Option<(u64, u64, usize)> {
    let s = std::fs::read_to_string(dir.join(format!("bench-{kind}.txt"))).ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next()?? as usize))
}

pub fn write_marker(
    dir: &std::path::Path,
    kind: &str,
    salt: u64,
    docs: u64,
    atoms: usize,
) -> Result<()> {
    std::fs::write(
        dir.join(format!("bench-{kind}.txt")),
        format!("{salt} {docs} {atoms}\n"),
    )?;
    Ok(())
}
