//! Session mode (PROTOCOL.md 3.2): one document, live ops in, acks and
//! broadcasts out.
//!
//! Touches the connection (`Conn`), the writer (the session's start, its
//! ops and its leave) and the read path (the session's first state). After
//! the 68 the connection's `direct` queue closes: from then on the writer
//! thread's pushes into the live outbox carry everything.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use notesync_protocol::{
    ClientFrame, DocId, ServerFrame, SessionDeleteRange, SessionInsertRun, Time,
};

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
            let frame = match self.next_frame(idle, "session_idle_timeout").await {
                Event::Frame(f) => f,
                Event::End(close) => return close,
            };
            if let Some(close) = self.later_version_frame(&frame) {
                return Some(close);
            }
            let ops = match frame {
                ClientFrame::Insert(i) => vec![SessionOp::Insert(i)],
                ClientFrame::Delete(d) => vec![SessionOp::Delete(d)],
                ClientFrame::Rename(n) => vec![SessionOp::Rename(n)],
                ClientFrame::InsertRun(r) => expand_run(&session, &r),
                ClientFrame::DeleteRange(r) => expand_range(&session, &r),
                _ => {
                    return Some(wrong_mode(
                        "this connection is in session mode: only 65, 66 and 67 are accepted \
                         (and 70, 71 on a version 3 connection)",
                    ));
                }
            };
            // One wire op, however many writer ops (rooms::AckCell).
            self.ack.expanded(seq + 1, seq + ops.len() as u64);
            for op in ops {
                seq += 1;
                let req = Request::Op { session, seq, op };
                if self.tenant.writer.send(req).await.is_err() {
                    return Some(shutting_down());
                }
            }
        }
    }
}

/// Whether the writer refuses every op of this session's inserts (no
/// hello, no site, another site, read-only) or deletes: a refused 70 or
/// 71 is then handed over as its first char or id alone, so the client
/// gets one error frame for it, not one per char.
fn refuses_all(session: &Session, site: u8, insert: bool) -> bool {
    session.read_only || site != session.site || (insert && (!session.hello || session.site == 0))
}

/// A 70 as the writer's per-char inserts (the store keeps atoms).
fn expand_run(session: &Session, r: &SessionInsertRun) -> Vec<SessionOp> {
    let ops = r.expand().map(SessionOp::Insert);
    if refuses_all(session, r.site, true) {
        ops.take(1).collect()
    } else {
        ops.collect()
    }
}

/// A 71 as the writer's per-id deletes.
fn expand_range(session: &Session, r: &SessionDeleteRange) -> Vec<SessionOp> {
    let ops = r.expand().map(SessionOp::Delete);
    if refuses_all(session, r.site, false) {
        ops.take(1).collect()
    } else {
        ops.collect()
    }
}

#[cfg(test)]
mod tests {
    use notesync_protocol::{IdRange, Level, Pid, Run};

    use super::*;

    fn session(site: u8) -> Session {
        Session {
            doc: 1,
            session_id: 1,
            site,
            hello: true,
            read_only: false,
        }
    }

    #[test]
    fn a_run_is_its_chars_unless_refused_as_a_whole() {
        let first = Pid::from_levels(&[Level::new(10, 2)]);
        let run = SessionInsertRun::new(Run::new(first.clone(), "héllo").expect("run"));
        let ops = expand_run(&session(2), &run);
        assert_eq!(ops.len(), 5);
        let SessionOp::Insert(last) = &ops[4] else {
            panic!("not an insert")
        };
        assert_eq!(last.atom.data(), "o");
        assert_eq!(last.atom.pid(), &first.offset(4).expect("fits"));
        // Another site's session: one op, one refusal.
        assert_eq!(expand_run(&session(3), &run).len(), 1);
        let range = SessionDeleteRange {
            site: 2,
            range: IdRange::new(first, 7).expect("range"),
        };
        assert_eq!(expand_range(&session(2), &range).len(), 7);
        assert_eq!(expand_range(&session(0), &range).len(), 1);
    }
}
