//! A fuzz target for a whole server: one connection's byte stream, split
//! into writes at input-chosen points, sent to a running server at `addr`
//! (blocking std I/O, so any runtime or none can call it). Shared by the
//! cargo-fuzz target `server_frames` (fuzz/fuzz_targets/server_frames.rs,
//! which runs an in-process `notesync_server::Server`) and a stable test
//! that replays the checked-in corpus (`fuzz/corpus/server_frames/`)
//! against the real server binary (tests/tests/network_faults.rs). Both
//! include this file by path.
//!
//! # Input layout
//!
//! ```text
//! byte 0      bit 0: start with a valid hello (replica from byte 1),
//!                    announcing version 3 (4, 70, 71 accepted)
//!             bit 1: then a valid session_start on document byte 2
//!             bit 2: the hello announces version 2 instead (4, 70, 71
//!                    are unknown_frame)
//!             bit 3: the hello announces version 4 instead (also 5
//!                    feed_subscribe accepted, so 38 and 39 may come); bit 2
//!                    wins over it. Added after the corpus of bits 0-2: no
//!                    input of it has bit 3 without bit 2, so each still
//!                    means what it did (version 3 stays pinned: from
//!                    f8d2446 to this bit it was `Hello::new`'s version,
//!                    which had become 4).
//! byte 1, 2   as above (present whatever the flags)
//! byte 3      n = value % 8 piece sizes follow (each value + 1; n = 0: one
//!             write)
//! rest        the client's bytes
//! ```
//!
//! # What is checked
//!
//! - After the client's bytes and a half-close, the server answers and
//!   closes the connection within a bound (it never hangs on any input).
//! - Everything it sent decodes as whole, valid server frames; a closing
//!   error, if any, is the last frame.
//! - The server still serves: a fresh connection's hello gets a welcome.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use notesync_protocol::{ClientFrame, FrameDecoder, Hello, Limits, ServerFrame};

/// How long the server gets to answer and close.
const BOUND: Duration = Duration::from_secs(20);

pub fn server_frames_target(addr: SocketAddr, data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let (flags, replica, doc, n) = (data[0], data[1], data[2], data[3] as usize % 8);
    let Some(sizes) = data.get(4..4 + n) else {
        return;
    };
    let stream = &data[4 + n..];
    let mut bytes = BytesMut::new();
    if flags & 1 == 1 {
        let mut hello = Hello::new(replica as u128 + 1, bytes::Bytes::new()).expect("hello");
        // Pinned, not `Hello::new`'s current version: an input keeps the
        // version it was found with when the protocol's version goes up.
        hello.version = if flags & 4 == 4 {
            2
        } else if flags & 8 == 8 {
            4
        } else {
            3
        };
        ClientFrame::Hello(hello).encode(&mut bytes);
    }
    if flags & 2 == 2 {
        ClientFrame::SessionStart {
            since: 0,
            doc: 0xF0_0000 + doc as u128,
        }
        .encode(&mut bytes);
    }
    bytes.extend_from_slice(stream);

    let mut s = TcpStream::connect(addr).expect("connect to the server");
    s.set_write_timeout(Some(BOUND)).expect("timeout");
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let len = if sizes.is_empty() {
            bytes.len()
        } else {
            sizes[i % sizes.len()] as usize + 1
        };
        let end = (at + len).min(bytes.len());
        if s.write_all(&bytes[at..end]).is_err() {
            break; // the server closed (e.g. after an error): fine
        }
        at = end;
        i += 1;
    }
    let _ = s.shutdown(Shutdown::Write);

    let deadline = Instant::now() + BOUND;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the server neither answered nor closed within {BOUND:?}"
        );
        s.set_read_timeout(Some(left)).expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the server neither answered nor closed within {BOUND:?}")
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {} // a signal: retry
            Err(_) => break, // reset after the server closed
        }
    }

    let mut dec = FrameDecoder::<ServerFrame>::new(Limits::default());
    let mut rest = BytesMut::from(&got[..]);
    let mut frames = Vec::new();
    loop {
        match dec.decode(&mut rest) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break,
            Err(e) => panic!("the server sent bytes that do not decode: {e}"),
        }
    }
    assert!(
        rest.is_empty(),
        "the server's output ends in a partial frame ({} bytes)",
        rest.len()
    );
    if let Some(k) = frames
        .iter()
        .position(|f| matches!(f, ServerFrame::Error(e) if e.code.closes_connection()))
    {
        assert_eq!(
            k,
            frames.len() - 1,
            "frames after a closing error: {:?}",
            &frames[k..]
        );
    }

    // Still serving.
    let mut c = TcpStream::connect(addr).expect("connect again");
    c.set_read_timeout(Some(BOUND)).expect("timeout");
    let mut hello = BytesMut::new();
    ClientFrame::Hello(Hello::new(1, bytes::Bytes::new()).expect("hello")).encode(&mut hello);
    c.write_all(&hello).expect("send hello");
    let mut dec = FrameDecoder::<ServerFrame>::new(Limits::default());
    let mut got = BytesMut::new();
    loop {
        let k = match c.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue, // a signal
            r => r.expect("the server answers a hello"),
        };
        assert!(k > 0, "the server closed instead of answering a hello");
        got.extend_from_slice(&buf[..k]);
        match dec.decode(&mut got) {
            Ok(Some(ServerFrame::Welcome { .. })) => break,
            Ok(Some(f)) => panic!("hello answered with {f:?}"),
            Ok(None) => {}
            Err(e) => panic!("hello answered with bad bytes: {e}"),
        }
    }
}
