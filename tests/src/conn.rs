//! A protocol client connection for tests: typed frames over TCP with
//! bounded waits and helpers for each request of PROTOCOL.md.
//!
//! Every wait is bounded by [`Conn::wait`] (10 s by default); a helper that
//! gets anything other than what the spec says fails with a message naming
//! the connection, what was expected and what arrived.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use notesync_protocol::{
    Atom, AtomListBuilder, ClientCodec, ClientFrame, DecodeError, DocId, DocName, DocResponse,
    ErrorCode, ErrorFrame, Hello, Limits, Pid, PidListBuilder, ServerFrame, SessionDelete,
    SessionInsert, SyncEntry, Time, Upsert, VERSION_RUNS,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// The default bound on every wait.
pub const WAIT: Duration = Duration::from_secs(10);

/// What the next read produced.
#[derive(Debug)]
pub enum Event {
    Frame(ServerFrame),
    /// The server closed the connection (EOF or reset).
    Closed,
    /// Nothing arrived within the wait.
    Timeout,
    /// The server sent bytes that do not decode as a server frame.
    Undecodable(String),
}

/// A 34 doc_sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocSync {
    pub doc: DocId,
    pub sync_time: Time,
    pub site: u8,
}

/// A 68 session_started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    pub session_id: u64,
    pub site: u8,
    pub sync_time: Time,
}

/// A 97 welcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    pub version: u8,
    pub server_time: Time,
}

/// One client connection.
pub struct Conn {
    framed: Framed<TcpStream, ClientCodec>,
    addr: SocketAddr,
    label: String,
    wait: Duration,
}

impl Conn {
    /// Connects to `addr`; panics if that fails within [`WAIT`].
    pub async fn connect(addr: SocketAddr) -> Conn {
        Self::connect_with(addr, Limits::default()).await
    }

    /// Connects to `addr`, decoding the server's frames with `limits` (for
    /// a server configured with other limits than the defaults).
    pub async fn connect_with(addr: SocketAddr, limits: Limits) -> Conn {
        Self::connected(addr, TcpStream::connect(addr), limits).await
    }

    /// The connection `connecting` makes (bounded by the wait).
    async fn connected(
        addr: SocketAddr,
        connecting: impl Future<Output = std::io::Result<TcpStream>>,
        limits: Limits,
    ) -> Conn {
        let stream = match tokio::time::timeout(WAIT, connecting).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("cannot connect to {addr}: {e}"),
            Err(_) => panic!("connecting to {addr} took over {WAIT:?}"),
        };
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        let label = format!("conn {}", stream.local_addr().expect("local addr"));
        Conn {
            framed: Framed::new(stream, ClientCodec::new(limits)),
            addr,
            label,
            wait: WAIT,
        }
    }

    /// Connects with a receive buffer of about `bytes` (the kernel's
    /// autotuning off) and a small segment size, so that a reader that
    /// stops reading stops the server's writes after kilobytes, not
    /// megabytes: on loopback (MTU 64 KB) the server's send buffer is sized
    /// from the segment size the client announces.
    pub async fn connect_small_window(addr: SocketAddr, bytes: u32) -> Conn {
        use std::os::fd::AsRawFd;
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let mss: libc::c_int = 536;
        // SAFETY: a valid socket and a c_int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_MAXSEG,
                (&mss as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
        Self::connected(addr, socket.connect(addr), Limits::default()).await
    }

    /// Names this connection in failure messages.
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// This end's address: the peer the server's log lines name.
    pub fn local_addr(&self) -> SocketAddr {
        self.framed.get_ref().local_addr().expect("local addr")
    }

    /// The framed socket, for a test that must read and write at the same
    /// time (the helpers here take turns).
    pub fn into_framed(self) -> Framed<TcpStream, ClientCodec> {
        self.framed
    }

    /// Changes the bound on every wait of this connection.
    pub fn set_wait(&mut self, wait: Duration) {
        self.wait = wait;
    }

    // ---- sending ----

    /// Sends one frame; panics on error or if the server does not take it
    /// within the wait.
    pub async fn send(&mut self, frame: ClientFrame) {
        if let Err(e) = self.try_send(frame).await {
            panic!("{}: send failed: {e}", self.label);
        }
    }

    pub async fn try_send(&mut self, frame: ClientFrame) -> std::io::Result<()> {
        match tokio::time::timeout(self.wait, self.framed.send(frame)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the server did not read for {:?}", self.wait),
            )),
        }
    }

    /// Sends frames back to back (pipelined) with one flush.
    pub async fn send_many(&mut self, frames: impl IntoIterator<Item = ClientFrame>) {
        if let Err(e) = self.try_send_many(frames).await {
            panic!("{}: send failed: {e}", self.label);
        }
    }

    pub async fn try_send_many(
        &mut self,
        frames: impl IntoIterator<Item = ClientFrame>,
    ) -> std::io::Result<()> {
        let fut = async {
            for f in frames {
                self.framed.feed(f).await?;
            }
            SinkExt::<ClientFrame>::flush(&mut self.framed).await
        };
        match tokio::time::timeout(self.wait, fut).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the server did not read for {:?}", self.wait),
            )),
        }
    }

    /// Writes raw bytes (for malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.try_send_raw(bytes).await {
            panic!("{}: raw send failed: {e}", self.label);
        }
    }

    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let fut = async {
            SinkExt::<ClientFrame>::flush(&mut self.framed).await?;
            let s = self.framed.get_mut();
            s.write_all(bytes).await?;
            s.flush().await
        };
        match tokio::time::timeout(self.wait, fut).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the server did not read for {:?}", self.wait),
            )),
        }
    }

    /// Closes the sending half (the server sees end of stream).
    pub async fn shutdown_write(&mut self) {
        SinkExt::<ClientFrame>::flush(&mut self.framed)
            .await
            .expect("flush");
        self.framed
            .get_mut()
            .shutdown()
            .await
            .expect("shutdown(Write)");
    }

    // ---- receiving ----

    /// The next event, waiting at most `wait`.
    pub async fn next_event_within(&mut self, wait: Duration) -> Event {
        match tokio::time::timeout(wait, self.framed.next()).await {
            Err(_) => Event::Timeout,
            Ok(None) => Event::Closed,
            Ok(Some(Ok(f))) => Event::Frame(f),
            Ok(Some(Err(DecodeError::Io(e)))) => match e.kind() {
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => Event::Closed,
                _ => Event::Undecodable(format!("i/o error: {e}")),
            },
            Ok(Some(Err(e))) => Event::Undecodable(e.to_string()),
        }
    }

    /// The next event, waiting at most this connection's wait.
    pub async fn next_event(&mut self) -> Event {
        self.next_event_within(self.wait).await
    }

    /// The next frame; panics on timeout, close or undecodable bytes.
    pub async fn recv(&mut self) -> ServerFrame {
        match self.next_event().await {
            Event::Frame(f) => f,
            Event::Closed => panic!("{}: expected a frame, the server closed", self.label),
            Event::Timeout => panic!(
                "{}: expected a frame, none arrived within {:?}",
                self.label, self.wait
            ),
            Event::Undecodable(e) => {
                panic!("{}: the server sent an undecodable frame: {e}", self.label)
            }
        }
    }

    /// Expects a 127 error with `code` as the next frame.
    pub async fn expect_error(&mut self, code: ErrorCode) -> ErrorFrame {
        match self.recv().await {
            ServerFrame::Error(e) if e.code == code => e,
            other => panic!(
                "{}: expected error {code}, got {}",
                self.label,
                describe(&other)
            ),
        }
    }

    /// Expects a 127 error with `code`, then the connection closed (a
    /// closing code, PROTOCOL.md section 4).
    pub async fn expect_closing_error(&mut self, code: ErrorCode) -> ErrorFrame {
        let e = self.expect_error(code).await;
        self.expect_closed().await;
        e
    }

    /// Expects the server to close the connection with nothing more sent.
    pub async fn expect_closed(&mut self) {
        match self.next_event().await {
            Event::Closed => {}
            Event::Frame(f) => panic!(
                "{}: expected the server to close, got {}",
                self.label,
                describe(&f)
            ),
            Event::Timeout => panic!(
                "{}: expected the server to close, still open after {:?}",
                self.label, self.wait
            ),
            Event::Undecodable(e) => panic!(
                "{}: expected the server to close, got undecodable bytes: {e}",
                self.label
            ),
        }
    }

    // ---- typed requests ----

    /// 96 hello with an empty token; expects 97 welcome.
    pub async fn hello(&mut self, replica: u128) -> Welcome {
        self.hello_with_token(replica, &[]).await
    }

    /// 96 hello with `token` and version 2; expects 97 welcome. The
    /// harness speaks version 2 unless asked for another
    /// ([`hello_version`](Self::hello_version)): its helpers read 33s.
    pub async fn hello_with_token(&mut self, replica: u128, token: &[u8]) -> Welcome {
        self.hello_version(replica, token, VERSION_RUNS - 1).await
    }

    /// 96 hello with `token` and `version`; expects 97 welcome.
    pub async fn hello_version(&mut self, replica: u128, token: &[u8], version: u8) -> Welcome {
        let mut hello =
            Hello::new(replica, Bytes::copy_from_slice(token)).expect("token of 255 bytes at most");
        hello.version = version;
        self.send(ClientFrame::Hello(hello)).await;
        match self.recv().await {
            ServerFrame::Welcome {
                version,
                server_time,
            } => Welcome {
                version,
                server_time,
            },
            other => panic!(
                "{}: hello: expected 97 welcome, got {}",
                self.label,
                describe(&other)
            ),
        }
    }

    /// 0 synclist → the entries of one 32.
    pub async fn synclist(&mut self, since: Time) -> Vec<SyncEntry> {
        self.send(ClientFrame::Synclist { since }).await;
        self.recv_synclist().await
    }

    /// Reads one 32.
    pub async fn recv_synclist(&mut self) -> Vec<SyncEntry> {
        match self.recv().await {
            ServerFrame::SynclistResponse(e) => e.iter().collect(),
            other => panic!(
                "{}: synclist: expected 32, got {}",
                self.label,
                describe(&other)
            ),
        }
    }

    /// Repeats synclist from the largest time received until a response is
    /// empty (PROTOCOL.md 3.1); returns every entry in order.
    pub async fn synclist_all(&mut self, since: Time) -> Vec<SyncEntry> {
        let mut all = Vec::new();
        let mut cursor = since;
        for _ in 0..10_000 {
            let page = self.synclist(cursor).await;
            let Some(last) = page.last() else {
                return all;
            };
            assert!(
                last.modified > cursor,
                "{}: synclist({cursor}) listed a time not after the cursor: {page:?}",
                self.label
            );
            cursor = last.modified;
            all.extend(page);
        }
        panic!("{}: synclist did not reach an empty page", self.label);
    }

    /// 1 pull → its 33s and the 34. Panics on an error frame.
    pub async fn pull(&mut self, doc: DocId, since: Time) -> (Vec<DocResponse>, DocSync) {
        match self.try_pull(doc, since).await {
            Ok(r) => r,
            Err(e) => panic!(
                "{}: pull({doc:#x}, {since}) got error {}: {}",
                self.label, e.code, e.message
            ),
        }
    }

    pub async fn try_pull(
        &mut self,
        doc: DocId,
        since: Time,
    ) -> Result<(Vec<DocResponse>, DocSync), ErrorFrame> {
        self.send(ClientFrame::Pull { doc, since }).await;
        self.recv_doc_reply(doc, "pull").await
    }

    /// 2 upsert → its 33s and the 34. Panics on an error frame.
    pub async fn upsert(
        &mut self,
        doc: DocId,
        name: &str,
        since: Time,
        inserts: &[Atom],
        deletes: &[Pid],
    ) -> (Vec<DocResponse>, DocSync) {
        match self.try_upsert(doc, name, since, inserts, deletes).await {
            Ok(r) => r,
            Err(e) => panic!(
                "{}: upsert({doc:#x}, since {since}) got error {}: {}",
                self.label, e.code, e.message
            ),
        }
    }

    pub async fn try_upsert(
        &mut self,
        doc: DocId,
        name: &str,
        since: Time,
        inserts: &[Atom],
        deletes: &[Pid],
    ) -> Result<(Vec<DocResponse>, DocSync), ErrorFrame> {
        self.send(upsert_frame(doc, name, since, inserts, deletes))
            .await;
        self.recv_doc_reply(doc, "upsert").await
    }

    /// Reads 33s up to a 34 for `doc` (the reply to a pull or an upsert),
    /// or an error frame.
    pub async fn recv_doc_reply(
        &mut self,
        doc: DocId,
        what: &str,
    ) -> Result<(Vec<DocResponse>, DocSync), ErrorFrame> {
        let mut parts = Vec::new();
        loop {
            match self.recv().await {
                ServerFrame::DocResponse(r) => {
                    assert_eq!(
                        r.doc, doc,
                        "{}: {what}: a 33 for another document",
                        self.label
                    );
                    parts.push(r);
                }
                // A version-3 connection's reply: the 33 it stands for.
                ServerFrame::DocResponseRuns(r) => {
                    assert_eq!(
                        r.doc, doc,
                        "{}: {what}: a 37 for another document",
                        self.label
                    );
                    parts.push(r.expand());
                }
                ServerFrame::DocSync {
                    doc: d,
                    sync_time,
                    site,
                } => {
                    assert_eq!(d, doc, "{}: {what}: a 34 for another document", self.label);
                    return Ok((
                        parts,
                        DocSync {
                            doc: d,
                            sync_time,
                            site,
                        },
                    ));
                }
                ServerFrame::Error(e) if parts.is_empty() => return Err(e),
                other => panic!(
                    "{}: {what}: expected 33 or 34, got {}",
                    self.label,
                    describe(&other)
                ),
            }
        }
    }

    /// 64 session_start → its 33s and the 68.
    pub async fn session_start(&mut self, since: Time, doc: DocId) -> (Vec<DocResponse>, Started) {
        self.send(ClientFrame::SessionStart { since, doc }).await;
        let mut parts = Vec::new();
        loop {
            match self.recv().await {
                ServerFrame::DocResponse(r) => {
                    assert_eq!(
                        r.doc, doc,
                        "{}: session_start: a 33 for another document",
                        self.label
                    );
                    parts.push(r);
                }
                ServerFrame::DocResponseRuns(r) => {
                    assert_eq!(
                        r.doc, doc,
                        "{}: session_start: a 37 for another document",
                        self.label
                    );
                    parts.push(r.expand());
                }
                ServerFrame::SessionStarted {
                    session_id,
                    site,
                    sync_time,
                } => {
                    return (
                        parts,
                        Started {
                            session_id,
                            site,
                            sync_time,
                        },
                    );
                }
                other => panic!(
                    "{}: session_start: expected 33 or 68, got {}",
                    self.label,
                    describe(&other)
                ),
            }
        }
    }

    /// Sends a 65 (not waiting for its ack).
    pub async fn insert(&mut self, atom: Atom) {
        self.send(ClientFrame::Insert(SessionInsert::new(atom)))
            .await;
    }

    /// Sends a 66 (not waiting for its ack).
    pub async fn delete(&mut self, site: u8, pid: Pid) {
        self.send(ClientFrame::Delete(SessionDelete { site, pid }))
            .await;
    }

    /// Sends a 67 (not waiting for its ack).
    pub async fn rename(&mut self, name: &str) {
        self.send(ClientFrame::Rename(name_of(name))).await;
    }
}

/// A name value; panics if it is not a valid name.
pub fn name_of(name: &str) -> DocName {
    DocName::new(name).unwrap_or_else(|e| panic!("bad test name {name:?}: {e}"))
}

/// An upsert frame.
pub fn upsert_frame(
    doc: DocId,
    name: &str,
    since: Time,
    inserts: &[Atom],
    deletes: &[Pid],
) -> ClientFrame {
    let mut a = AtomListBuilder::new();
    for atom in inserts {
        a.push(atom);
    }
    let mut d = PidListBuilder::new();
    for p in deletes {
        d.push(p).expect("valid delete id");
    }
    ClientFrame::Upsert(Upsert {
        doc,
        name: name_of(name),
        since,
        inserts: a.finish(),
        deletes: d.finish(),
    })
}

/// A short description of a frame for failure messages (lists are
/// summarised, errors spelled out).
pub fn describe(f: &ServerFrame) -> String {
    match f {
        ServerFrame::Error(e) => format!("error {} {:?}", e.code, e.message),
        ServerFrame::DocResponse(r) => format!(
            "33 for {:#x} name {:?} with {} inserts, {} deletes",
            r.doc,
            r.name.as_str(),
            r.inserts.len(),
            r.deletes.len()
        ),
        ServerFrame::SynclistResponse(e) => format!("32 with {} entries", e.len()),
        other => format!("{other:?}"),
    }
}
