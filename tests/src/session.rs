//! A session-mode client (PROTOCOL.md 3.2) that keeps a replica of its
//! document and checks, as frames arrive, what every session can rely on:
//! acks count its ops in order and never run ahead of what it sent, it
//! never gets its own ops back, and (in strict mode) every broadcast is new
//! relative to what it already has (nothing sent twice, nothing missing
//! before a delete).
//!
//! The echo check treats a 66 carrying this client's own site as its own
//! delete come back. PROTOCOL.md 3.2 also lets the server send a sender a
//! 66 for an insert it re-sent whose id is deleted, with the deleter's
//! site: a test that re-sends inserts of ids it deleted itself cannot use
//! this check.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use notesync_protocol::{
    ClientFrame, DocId, ErrorFrame, Pid, ServerFrame, SessionDelete, SessionInsert, Time,
};

use crate::conn::{Conn, Started, describe, name_of};
use crate::model::{Applied, DocModel};

pub struct SessionClient {
    pub conn: Conn,
    pub model: DocModel,
    pub started: Started,
    /// Session ops (65/66/67) sent.
    pub sent: u64,
    /// The last 69 count.
    pub acked: u64,
    /// Broadcast 65/66 received.
    pub received_ops: u64,
    /// Broadcast 67 names received, in order.
    pub renames: Vec<String>,
    /// Non-closing errors received, each with the ack count at that moment.
    pub errors: Vec<(u64, ErrorFrame)>,
    /// Ids this client made.
    pub own_ids: BTreeSet<Pid>,
    /// Ids this client deleted.
    pub own_deletes: BTreeSet<Pid>,
    /// Fail on a broadcast that changes nothing in the replica.
    pub strict: bool,
}

impl SessionClient {
    /// Connects, sends hello if `replica` is given, starts a session on
    /// `doc` since `since`, and applies the 33s.
    pub async fn start(
        addr: SocketAddr,
        label: &str,
        replica: Option<u128>,
        doc: DocId,
        since: Time,
        seed: u64,
    ) -> SessionClient {
        Self::start_with(addr, label, replica, DocModel::new(doc), since, seed).await
    }

    /// Starts a session on `conn`, which has sent its hello (or not, to
    /// have no replica id), for a replica that holds `model` (synced up to
    /// `since`).
    pub async fn start_on(
        mut conn: Conn,
        mut model: DocModel,
        since: Time,
        seed: u64,
    ) -> SessionClient {
        let (rs, started) = conn.session_start(since, model.id).await;
        model.apply_responses(&rs);
        if started.site != 0 {
            model.set_site(started.site, seed);
        }
        SessionClient {
            conn,
            model,
            started,
            sent: 0,
            acked: 0,
            received_ops: 0,
            renames: Vec::new(),
            errors: Vec::new(),
            own_ids: BTreeSet::new(),
            own_deletes: BTreeSet::new(),
            strict: true,
        }
    }

    /// As [`start`](Self::start), for a replica that already holds `model`
    /// (synced up to `since`).
    pub async fn start_with(
        addr: SocketAddr,
        label: &str,
        replica: Option<u128>,
        model: DocModel,
        since: Time,
        seed: u64,
    ) -> SessionClient {
        let mut conn = Conn::connect(addr).await.with_label(label);
        if let Some(r) = replica {
            conn.hello(r).await;
        }
        Self::start_on(conn, model, since, seed).await
    }

    pub fn site(&self) -> u8 {
        self.started.site
    }

    pub fn label(&self) -> String {
        self.conn.label().to_owned()
    }

    /// A local insert at live index `index`, as a frame to send.
    pub fn insert_at(&mut self, index: usize, data: &str) -> ClientFrame {
        let atom = self.model.local_insert(index, data);
        self.own_ids.insert(atom.pid().clone());
        ClientFrame::Insert(SessionInsert::new(atom))
    }

    /// A local delete of live atom `index`, as a frame to send.
    pub fn delete_at(&mut self, index: usize) -> ClientFrame {
        let pid = self.model.local_delete(index);
        self.own_deletes.insert(pid.clone());
        ClientFrame::Delete(SessionDelete {
            site: self.site(),
            pid,
        })
    }

    /// Sends session ops pipelined and counts them.
    pub async fn send_ops(&mut self, frames: Vec<ClientFrame>) {
        for f in &frames {
            assert!(
                matches!(
                    f,
                    ClientFrame::Insert(_) | ClientFrame::Delete(_) | ClientFrame::Rename(_)
                ),
                "send_ops takes 65/66/67 only"
            );
            if let ClientFrame::Rename(n) = f {
                self.model.name = n.as_str().to_owned();
            }
        }
        self.sent += frames.len() as u64;
        self.conn.send_many(frames).await;
    }

    pub async fn rename(&mut self, name: &str) {
        self.send_ops(vec![ClientFrame::Rename(name_of(name))])
            .await;
    }

    /// Handles one frame from the server, checking it.
    pub fn handle(&mut self, f: ServerFrame) {
        let me = self.label();
        match f {
            ServerFrame::SessionAck { count } => {
                assert!(
                    count >= self.acked,
                    "{me}: ack count went back from {} to {count}",
                    self.acked
                );
                assert!(
                    count <= self.sent,
                    "{me}: ack count {count} is more than the {} ops sent",
                    self.sent
                );
                self.acked = count;
            }
            ServerFrame::Insert(i) => {
                let pid = i.atom.pid().clone();
                let echo =
                    (self.site() != 0 && i.site == self.site()) || self.own_ids.contains(&pid);
                assert!(
                    !echo,
                    "{me}: got its own insert back (no echo, 3.2): {pid:?}"
                );
                assert_eq!(i.site, pid.creator(), "{me}: a 65's site is its author's");
                let applied = self.model.apply_insert(i.atom.data(), &pid);
                assert!(
                    !self.strict || applied == Applied::Changed,
                    "{me}: a broadcast insert of an id it already had: {pid:?} \
                     (sent twice, or a repeat of the 33)"
                );
                self.received_ops += 1;
            }
            ServerFrame::Delete(d) => {
                assert!(
                    self.site() == 0 || d.site != self.site(),
                    "{me}: got its own delete back (no echo, 3.2): {:?}",
                    d.pid
                );
                if self.strict {
                    assert!(
                        self.model.is_live(&d.pid),
                        "{me}: a broadcast delete of an id that is not live here: {:?} \
                         (its insert was missed, or the delete was sent twice)",
                        d.pid
                    );
                }
                self.model.apply_delete(&d.pid);
                self.received_ops += 1;
            }
            ServerFrame::Rename(n) => {
                self.model.name = n.as_str().to_owned();
                self.renames.push(n.as_str().to_owned());
            }
            ServerFrame::Error(e) if !e.code.closes_connection() => {
                self.errors.push((self.acked, e));
            }
            other => panic!("{me}: unexpected in a session: {}", describe(&other)),
        }
    }

    /// Reads and handles frames until `done` holds. Each read is bounded by
    /// the connection's wait; a closed connection fails.
    pub async fn pump_until(&mut self, what: &str, done: impl Fn(&SessionClient) -> bool) {
        while !done(self) {
            match self.conn.next_event().await {
                crate::conn::Event::Frame(f) => self.handle(f),
                other => panic!(
                    "{}: waiting for {what} (sent {}, acked {}, received {} ops, renames {:?}): {other:?}",
                    self.label(),
                    self.sent,
                    self.acked,
                    self.received_ops,
                    self.renames
                ),
            }
        }
    }

    /// Waits until every op sent is acknowledged.
    pub async fn wait_acked(&mut self) {
        self.pump_until("all acks", |s| s.acked == s.sent).await;
    }
}
