//! Session mode (PROTOCOL.md 3.2): one document, live ops in, acks and
//! broadcasts out.
//!
//! Touches the connection (`Conn`), the writer (the session's start, its
//! ops and its leave) and the read path (the session's first state). After
//! the 68 the connection's `direct` queue closes: from then on the writer
//! thread's pushes into the live outbox carry everything.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use notesync_protocol::{ClientFrame, DocId, ServerFrame, Time};

use super::frames::{shutting_down, wrong_mode};
use super::read::{self, Outcome};
use super::{Conn, Event};
use crate::rooms::{Sub, deleted_bytes, error_bytes};
use crate::writer::{Request, Session, SessionOp, WriteError};

impl Conn {
    /// Starts a session on `doc` (64) and runs it to its end.
    pub(super) async fn session_mode(&mut self, since: Time, doc: DocId) -> Option<Bytes> {
        let shared = self.shared.clone();
        let live = self.live.clone()?;
        let session_id = shared.next_session.fetch_add(1, Ordering::Relaxed);
        let sub = Sub {
            session_id,
            version: self.version,
            outbox: live,
            ack: self.ack.clone(),
            kill: self.kill.clone(),
        };
        let tenant = self.tenant.clone();
        // A read-only session gets no site: it never inserts.
        let replica = if self.read_only() { None } else { self.replica };
        let (req, rx) = Request::start(doc, replica, sub);
        if tenant.writer.send(req).await.is_err() {
            return Some(shutting_down());
        }
        let started = match rx.await {
            Ok(Ok(s)) => s,
            // Refused (a deleted document: 35 or unknown_document); the
            // connection closes.
            Ok(Err(e)) => {
                return Some(match e {
                    WriteError::Deleted { doc, at } => deleted_bytes(self.version, doc, at),
                    e => error_bytes(e.code(), e.to_string()),
                });
            }
            Err(_) => return Some(shutting_down()),
        };
        let session = Session {
            doc,
            session_id,
            site: started.site,
            hello: self.replica.is_some(),
            read_only: self.read_only(),
        };
        let _open = crate::metrics::session();
        let state =
            read::session_state(&shared.config, started.snapshot, doc, since, self.version).await;
        let close = match state {
            Err(close) | Ok(Outcome::Refused(close)) => Some(close),
            Ok(Outcome::Owed {
                frames, sync_time, ..
            }) => {
                let mut ok = true;
                for f in frames {
                    ok = ok && self.send_direct(f).await;
                }
                let started = ServerFrame::SessionStarted {
                    session_id,
                    site: session.site,
                    sync_time,
                };
                ok = ok && self.send_direct(started.to_bytes()).await;
                // From here on the live queue carries everything.
                self.direct = None;
                if ok {
                    self.session_ops(session).await
                } else {
                    None
                }
            }
        };
        // Wait until the writer has acked every op it took, then leave.
        let (leave, rx) = Request::leave(doc, session_id);
        if tenant.writer.send(leave).await.is_ok() {
            let _ = rx.await;
        }
        close
    }

    /// Hands the session's ops to the writer, numbered, until it ends.
    async fn session_ops(&mut self, session: Session) -> Option<Bytes> {
        let idle = self.shared.config.session_idle_timeout;
        let mut seq = 0u64;
        loop {
            let op = match self.next_frame(idle, "session_idle_timeout").await {
                Event::Frame(ClientFrame::Insert(i)) => SessionOp::Insert(i),
                Event::Frame(ClientFrame::Delete(d)) => SessionOp::Delete(d),
                Event::Frame(ClientFrame::Rename(n)) => SessionOp::Rename(n),
                Event::Frame(_) => {
                    return Some(wrong_mode(
                        "this connection is in session mode: only 65, 66 and 67 are accepted",
                    ));
                }
                Event::End(close) => return close,
            };
            seq += 1;
            let req = Request::Op { session, seq, op };
            if self.tenant.writer.send(req).await.is_err() {
                return Some(shutting_down());
            }
        }
    }
}
