//! The frames a connection answers with when it refuses, fails or closes:
//! one place for their codes and wording.
//!
//! Touches only the rooms' frame builders (which count each error frame)
//! and the writer's error type.

use std::time::Duration;

use bytes::Bytes;
use notesync_protocol::ErrorCode;

use crate::rooms::{deleted_bytes, error_bytes};
use crate::writer::WriteError;

/// A response's frames, in order.
pub(super) type Frames = Vec<Bytes>;

pub(super) fn shutting_down() -> Bytes {
    error_bytes(
        ErrorCode::SHUTTING_DOWN,
        "the server is shutting down; reconnect later",
    )
}

pub(super) fn wrong_mode(what: &str) -> Bytes {
    error_bytes(ErrorCode::WRONG_MODE, what)
}

pub(super) fn storage(e: &dyn std::fmt::Display) -> Bytes {
    error_bytes(
        ErrorCode::STORAGE,
        format!("the server could not read or store the document: {e}"),
    )
}

/// A writer failure as the frame the client gets, and whether it closes.
pub(super) fn write_error(e: WriteError) -> Result<Frames, Bytes> {
    if let WriteError::Deleted { doc, at } = e {
        // Only a version 1 connection gets here (see `refusal`).
        return Ok(vec![deleted_bytes(1, doc, at)]);
    }
    let frame = error_bytes(e.code(), e.to_string());
    if e.code().closes_connection() {
        Err(frame)
    } else {
        Ok(vec![frame])
    }
}

/// A writer refusal for a connection of protocol `version`: a deleted
/// document is a 35 from version 2 on (PROTOCOL.md 3.5).
pub(super) fn refusal(version: u8, e: WriteError) -> Result<Frames, Bytes> {
    match e {
        WriteError::Deleted { doc, at } => Ok(vec![deleted_bytes(version, doc, at)]),
        e => write_error(e),
    }
}

pub(super) fn unauthorized(what: &str) -> Bytes {
    error_bytes(ErrorCode::UNAUTHORIZED, what)
}

pub(super) fn invalid_request_frame(what: &str) -> Bytes {
    error_bytes(ErrorCode::INVALID_REQUEST, what)
}

pub(super) fn read_only_frame(what: &str) -> Bytes {
    error_bytes(
        ErrorCode::READ_ONLY,
        format!("this token allows reading only: {what} refused"),
    )
}

/// The frame for a client over the connection limit.
pub(crate) fn busy_frame(max_connections: usize) -> Bytes {
    error_bytes(
        ErrorCode::SERVER_BUSY,
        format!(
            "the server is at its connection limit (max_connections {max_connections}); try again later"
        ),
    )
}

/// The frame for an address that used up its failed-authentication budget.
pub(crate) fn blocked_frame(retry_in: Duration, max: u32, window: Duration) -> Bytes {
    unauthorized(&format!(
        "too many failed authentication attempts from this address (max_failed_auth {max} per {}s); retry in {}s",
        window.as_secs(),
        retry_in.as_secs().max(1)
    ))
}

/// The answer to a TLS ClientHello on the plain listener (PROTOCOL.md
/// 2.1): a notesync frame, not a TLS alert, so a client can tell "no TLS
/// here" from a TLS server that refused its handshake.
pub(super) fn tls_on_plain_port() -> Bytes {
    error_bytes(
        ErrorCode::UNKNOWN_FRAME,
        "this port does not speak TLS: connect without TLS (notesync: leave out --tls and --tls-ca)",
    )
}

/// The answer to a plain notesync frame on the TLS listener, sent in the
/// clear before any handshake (PROTOCOL.md 2.1).
pub(crate) fn plain_on_tls_port() -> Bytes {
    error_bytes(
        ErrorCode::UNKNOWN_FRAME,
        "this port speaks TLS: connect with TLS (notesync: --tls, or --tls-ca FILE for a private CA)",
    )
}
