//! Helpers shared by the server checks.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use notesync_protocol::{
    Atom, ClientFrame, DecodeError, DocId, DocResponse, ErrorCode, Hello, Level, Pid, ServerFrame,
    header,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use super::{Ctx, Target};
use crate::conn::{Conn, Event, describe};
use crate::model::DocModel;

// ---- replies ----

/// The inserted atoms of some 33s, as (id, data).
pub fn inserts_of(rs: &[DocResponse]) -> BTreeMap<Pid, String> {
    rs.iter()
        .flat_map(|r| r.inserts.iter())
        .map(|a| (a.pid.to_pid(), a.data.to_owned()))
        .collect()
}

/// The deleted ids of some 33s.
pub fn deletes_of(rs: &[DocResponse]) -> BTreeSet<Pid> {
    rs.iter()
        .flat_map(|r| r.deletes.iter())
        .map(|p| p.to_pid())
        .collect()
}

/// The name every 33 of a reply carries (a reply has at least one 33, and
/// they agree).
pub fn reply_name(rs: &[DocResponse], what: &str) -> String {
    let first = rs.first().unwrap_or_else(|| {
        panic!("{what}: expected one or more 33 before the 34/68 (3.1), got none")
    });
    for r in rs {
        assert_eq!(
            r.name, first.name,
            "{what}: the 33s of one reply disagree on the name"
        );
    }
    first.name.as_str().to_owned()
}

/// A one-level id `(ident, site)`.
pub fn pid1(ident: u32, site: u8) -> Pid {
    Pid::from_levels(&[Level::new(ident, site)])
}

/// An atom at a one-level id.
pub fn atom1(data: &str, ident: u32, site: u8) -> Atom {
    Atom::new(data, pid1(ident, site)).expect("valid atom")
}

/// A site that is not `site` (nor 0).
pub fn other_site(site: u8) -> u8 {
    if site == 255 { 254 } else { site + 1 }
}

pub fn frame_bytes(f: &ClientFrame) -> Vec<u8> {
    f.to_bytes().to_vec()
}

/// A hello frame's bytes, with the target's token.
pub fn hello_bytes(ctx: &Ctx, replica: u128, version: u8) -> Vec<u8> {
    let mut h = Hello::new(replica, ctx.target().token_bytes().to_vec()).expect("token fits");
    h.version = version;
    frame_bytes(&ClientFrame::Hello(h))
}

/// The hello a connection needs before anything else: one with the token
/// when the server requires it, none otherwise. Returns the bytes and the
/// replies they get (97, or nothing).
pub fn auth_prefix(ctx: &Ctx) -> (Vec<u8>, Vec<u8>) {
    match ctx.target().token {
        Some(_) => (hello_bytes(ctx, ctx.replica(), 1), vec![header::WELCOME]),
        None => (Vec::new(), Vec::new()),
    }
}

/// A connection with a replica and its own document's site: an empty
/// upsert creates the document. Returns the connection, the site and the
/// 34's sync time.
pub async fn create_doc(ctx: &Ctx, label: &str, doc: DocId, name: &str) -> (Conn, u8, u64) {
    let (mut c, _) = ctx.client(label).await;
    let (_, s) = c.upsert(doc, name, 0, &[], &[]).await;
    assert_ne!(
        s.site, 0,
        "{label}: an upsert after hello allocates a site (1.3): expected a 34 with a site, got site 0"
    );
    (c, s.site, s.sync_time)
}

/// A replica model of `doc` with `site`.
pub fn model(doc: DocId, site: u8, seed: u64) -> DocModel {
    let mut m = DocModel::new(doc);
    m.set_site(site, seed);
    m
}

/// Expects that the connection stays open after a non-closing error: a
/// synclist (sync mode) is still answered with a 32.
pub async fn expect_still_open_sync(c: &mut Conn, after: &str) {
    c.send(ClientFrame::Synclist { since: u64::MAX }).await;
    match c.next_event().await {
        Event::Frame(ServerFrame::SynclistResponse(_)) => {}
        other => panic!(
            "{}: after {after} the connection stays open (section 4: the code does not \
             close): expected a 32 for a synclist, got {}",
            c.label(),
            show(&other)
        ),
    }
}

/// An event for failure messages.
pub fn show(e: &Event) -> String {
    match e {
        Event::Frame(f) => describe(f),
        Event::Closed => "the connection closed".into(),
        Event::Timeout => "nothing (timed out)".into(),
        Event::Undecodable(s) => format!("undecodable bytes: {s}"),
    }
}

/// Reads frames (skipping none) until one that `want` accepts; panics on
/// anything else.
pub async fn recv_error(c: &mut Conn, code: ErrorCode, what: &str) -> String {
    match c.next_event().await {
        Event::Frame(ServerFrame::Error(e)) if e.code == code => e.message,
        other => panic!(
            "{}: {what}: expected error {code}, got {}",
            c.label(),
            show(&other)
        ),
    }
}

/// Expects a 69 with `count` as the next frame.
pub async fn recv_ack(c: &mut Conn, count: u64, what: &str) {
    match c.next_event().await {
        Event::Frame(ServerFrame::SessionAck { count: n }) if n == count => {}
        other => panic!(
            "{}: {what}: expected 69 session_ack({count}), got {}",
            c.label(),
            show(&other)
        ),
    }
}

// ---- raw bytes ----

/// How a raw exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEnd {
    Closed,
    /// Nothing more arrived within the wait, the connection still open.
    Timeout,
    Undecodable(String),
}

/// What the server sent back for some bytes.
#[derive(Debug)]
pub struct RawOutcome {
    pub frames: Vec<ServerFrame>,
    pub end: RawEnd,
    /// Bytes written before the server stopped taking them.
    pub written: usize,
}

/// Connects, writes `bytes` (in a task of its own, so a server that closes
/// early or reads slowly never blocks the reading), half-closes if asked,
/// and reads every frame until the server closes or the wait runs out.
pub async fn raw_exchange(target: &Target, bytes: Vec<u8>, half_close: bool) -> RawOutcome {
    let stream = match tokio::time::timeout(target.wait, TcpStream::connect(target.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!("cannot connect to {}: {e}", target.addr),
        Err(_) => panic!("connecting to {} took over {:?}", target.addr, target.wait),
    };
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let wait = target.wait;
    let writer = tokio::spawn(async move {
        let mut written = 0;
        for chunk in bytes.chunks(1 << 16) {
            match tokio::time::timeout(wait, wr.write_all(chunk)).await {
                Ok(Ok(())) => written += chunk.len(),
                _ => return written,
            }
        }
        if half_close {
            let _ = wr.shutdown().await;
        } else {
            // Keep the write half open until the reader is done.
            std::future::pending::<()>().await;
        }
        written
    });
    let mut reader = FramedRead::new(rd, notesync_protocol::ClientCodec::new(target.limits));
    let mut frames = Vec::new();
    // A large write may take a while before the server answers.
    let mut wait = target.wait * 3;
    let end = loop {
        match tokio::time::timeout(wait, reader.next()).await {
            Err(_) => break RawEnd::Timeout,
            Ok(None) => break RawEnd::Closed,
            Ok(Some(Ok(f))) => frames.push(f),
            Ok(Some(Err(DecodeError::Io(e)))) => match e.kind() {
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => break RawEnd::Closed,
                _ => break RawEnd::Undecodable(format!("i/o error: {e}")),
            },
            Ok(Some(Err(e))) => break RawEnd::Undecodable(e.to_string()),
        }
        wait = target.wait;
    };
    drop(reader);
    let written = if writer.is_finished() {
        writer.await.unwrap_or(0)
    } else {
        writer.abort();
        0
    };
    RawOutcome {
        frames,
        end,
        written,
    }
}

/// The frame headers of an outcome, 33s dropped (they come before a 34 or
/// 68 and any number may come).
fn kinds(frames: &[ServerFrame]) -> Vec<u8> {
    frames
        .iter()
        .map(|f| f.header())
        .filter(|&h| h != header::SYNC_DOC_RESPONSE && h != header::SYNC_DOC_RESPONSE_RUNS)
        .collect()
}

fn show_frames(frames: &[ServerFrame]) -> String {
    if frames.is_empty() {
        return "no frame".into();
    }
    frames.iter().map(describe).collect::<Vec<_>>().join(", ")
}

/// The replies expected before a closing error, by header (33s before a
/// 34 or 68 are not listed), then the error `code`, then the close. For
/// `limit_exceeded`, `limit` is the limit's name and value, which the
/// message names (section 4). Panics with what came instead.
pub fn expect_closing(
    out: &RawOutcome,
    replies: &[u8],
    code: ErrorCode,
    limit: Option<(&str, u64)>,
    what: &str,
) {
    if let Err(e) = check_closing(out, replies, code, limit, what) {
        panic!("{e}");
    }
}

/// As [`expect_closing`], returning what went wrong.
pub fn check_closing(
    out: &RawOutcome,
    replies: &[u8],
    code: ErrorCode,
    limit: Option<(&str, u64)>,
    what: &str,
) -> Result<(), String> {
    let mut want: Vec<u8> = replies.to_vec();
    want.push(header::ERROR);
    let got = kinds(&out.frames);
    let last_error = out.frames.iter().rev().find_map(|f| match f {
        ServerFrame::Error(e) => Some(e),
        _ => None,
    });
    let code_ok = last_error.is_some_and(|e| e.code == code);
    if got != want || !code_ok || out.end != RawEnd::Closed {
        return Err(format!(
            "{what}: expected {}error {code} and the connection closed; got {}, then {}",
            if replies.is_empty() {
                String::new()
            } else {
                format!("replies {replies:?}, then ")
            },
            show_frames(&out.frames),
            match &out.end {
                RawEnd::Closed => "the connection closed".to_string(),
                RawEnd::Timeout => "the connection stayed open".to_string(),
                RawEnd::Undecodable(e) => format!("undecodable bytes ({e})"),
            }
        ));
    }
    if let (Some((name, value)), Some(e)) = (limit, last_error) {
        if !message_names(&e.message, name, value) {
            return Err(format!(
                "{what}: the message names the limit and its value (section 4: \"it names the \
                 limit that was hit, with its value\"): expected {name} and {value} in it, got {:?}",
                e.message
            ));
        }
    }
    Ok(())
}

/// Whether an error message names `name` and `value` (digits may be
/// grouped with `,` or `_`).
pub fn message_names(message: &str, name: &str, value: u64) -> bool {
    let digits: String = message.chars().filter(|c| *c != ',' && *c != '_').collect();
    message.contains(name) && digits.contains(&value.to_string())
}

/// Sends `bytes` on a fresh connection and expects `replies`, then a
/// closing error `code`.
pub async fn closing_case(
    ctx: &Ctx,
    bytes: Vec<u8>,
    half_close: bool,
    replies: &[u8],
    code: ErrorCode,
    limit: Option<(&str, u64)>,
    what: &str,
) {
    let out = raw_exchange(ctx.target(), bytes, half_close).await;
    expect_closing(&out, replies, code, limit, what);
}

/// Bytes of a session_start on a new document.
pub fn session_start_bytes(doc: DocId) -> Vec<u8> {
    frame_bytes(&ClientFrame::SessionStart { since: 0, doc })
}

pub fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}
