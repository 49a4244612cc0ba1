//! Error codes carried by the 127 error frame, and the decoder's errors.

use std::fmt;

/// The code in a 127 error frame. Unknown codes are kept as they are, so a
/// client can show a newer server's errors it has no name for.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u8);

macro_rules! codes {
    ($($(#[$m:meta])* $name:ident = $v:expr, $label:expr, $closes:expr;)*) => {
        impl ErrorCode {
            $($(#[$m])* pub const $name: ErrorCode = ErrorCode($v);)*

            /// Every code this version defines, in order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The code's name as PROTOCOL.md spells it.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $($v => $label,)*
                    _ => "unknown",
                }
            }

            /// Whether the server closes the connection after sending this
            /// code (PROTOCOL.md, "Errors"). Unknown codes are taken as closing.
            pub fn closes_connection(self) -> bool {
                match self.0 {
                    $($v => $closes,)*
                    _ => true,
                }
            }
        }
    };
}

codes! {
    /// The bytes do not form a valid frame (bad UTF-8, zero length or count,
    /// depth 0, reserved site, unterminated name, an unknown item kind, a
    /// run or range whose last ident overflows, or a connection closed
    /// mid-frame).
    MALFORMED = 1, "malformed", true;
    /// The header byte is not a frame this peer accepts.
    UNKNOWN_FRAME = 2, "unknown_frame", true;
    /// A frame exceeded a limit (frame bytes, items per frame, pid depth).
    LIMIT_EXCEEDED = 3, "limit_exceeded", true;
    /// A frame that the connection's mode does not allow.
    WRONG_MODE = 4, "wrong_mode", true;
    /// The hello asked for a protocol version this server does not speak.
    UNSUPPORTED_VERSION = 5, "unsupported_version", true;
    /// Missing, invalid or revoked credentials.
    UNAUTHORIZED = 6, "unauthorized", true;
    /// The document does not exist (pull).
    UNKNOWN_DOCUMENT = 7, "unknown_document", false;
    /// A new id's last-level site is not the sender's site for the document.
    SITE_MISMATCH = 8, "site_mismatch", false;
    /// An insert reuses an existing id with other data.
    ID_CONFLICT = 9, "id_conflict", false;
    /// The document already has 255 replicas with a site.
    SITES_EXHAUSTED = 10, "sites_exhausted", false;
    /// Inserting needs a site, and a site needs a replica id: send 96 hello.
    HELLO_REQUIRED = 11, "hello_required", false;
    /// The connection did not read its frames fast enough.
    SLOW_READER = 12, "slow_reader", true;
    /// Handshake or idle timeout.
    TIMEOUT = 13, "timeout", true;
    /// The server is at its connection limit.
    SERVER_BUSY = 14, "server_busy", true;
    /// The server could not store the change; nothing was acknowledged.
    /// The connection closes: the client re-sends on its next session.
    STORAGE = 15, "storage", true;
    /// The server is shutting down.
    SHUTTING_DOWN = 16, "shutting_down", true;
    /// The credentials allow reading only.
    READ_ONLY = 17, "read_only", false;
    /// A request that is well formed but not valid here. (A hello that is
    /// not the first frame is `WRONG_MODE`, PROTOCOL.md section 3.)
    INVALID_REQUEST = 18, "invalid_request", false;
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// Why bytes could not be decoded. Every variant names what was wrong and,
/// for limits, the limit's name and value.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown frame header {header}")]
    UnknownHeader { header: u8 },
    #[error("frame exceeds max_frame_bytes ({max})")]
    FrameTooLarge { max: usize },
    #[error("{field} count {count} exceeds max_items_per_frame ({max})")]
    TooManyItems {
        field: &'static str,
        count: u64,
        max: u64,
    },
    #[error("atom data length is 0; an atom holds 1 to 255 bytes")]
    EmptyAtom,
    #[error("position id depth is 0; an id has at least one level")]
    ZeroDepth,
    #[error("position id depth {depth} exceeds max_pid_depth ({max})")]
    DepthLimit { depth: u8, max: u8 },
    #[error("{field} uses site 0, which is reserved")]
    ReservedSite { field: &'static str },
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("document name has no 0x0A terminator within 256 bytes (names are at most 255 bytes)")]
    NameTooLong,
    #[error(
        "session_insert site {site} differs from the creator (last-level site) {creator} of its atom or run"
    )]
    InsertSiteMismatch { site: u8, creator: u8 },
    #[error("run text length is 0; a run holds 1 to 65,535 bytes")]
    EmptyRun,
    #[error("range count is 0; a range holds 1 to 65,535 ids")]
    EmptyRange,
    #[error("a run or range of {count} ids from last ident {first} overflows u32")]
    IdentOverflow { first: u32, count: u64 },
    #[error("item kind {kind} is neither 0 (atom) nor 1 (run)")]
    BadItemKind { kind: u8 },
    #[error("feed entry flags {flags:#04x} set bits other than bit 0 (deleted)")]
    BadFeedFlags { flags: u8 },
    #[error("connection closed in the middle of a frame ({pending} bytes pending)")]
    Truncated { pending: usize },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl DecodeError {
    /// The error code a server sends for this error. All decode errors
    /// close the connection: once framing is lost nothing after it can be
    /// trusted.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnknownHeader { .. } => ErrorCode::UNKNOWN_FRAME,
            DecodeError::FrameTooLarge { .. }
            | DecodeError::TooManyItems { .. }
            | DecodeError::DepthLimit { .. } => ErrorCode::LIMIT_EXCEEDED,
            _ => ErrorCode::MALFORMED,
        }
    }

    /// A short stable name for the variant, used by the golden vectors.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::UnknownHeader { .. } => "unknown_header",
            DecodeError::FrameTooLarge { .. } => "frame_too_large",
            DecodeError::TooManyItems { .. } => "too_many_items",
            DecodeError::EmptyAtom => "empty_atom",
            DecodeError::ZeroDepth => "zero_depth",
            DecodeError::DepthLimit { .. } => "depth_limit",
            DecodeError::ReservedSite { .. } => "reserved_site",
            DecodeError::InvalidUtf8 { .. } => "invalid_utf8",
            DecodeError::NameTooLong => "name_too_long",
            DecodeError::InsertSiteMismatch { .. } => "insert_site_mismatch",
            DecodeError::EmptyRun => "empty_run",
            DecodeError::EmptyRange => "empty_range",
            DecodeError::IdentOverflow { .. } => "ident_overflow",
            DecodeError::BadItemKind { .. } => "bad_item_kind",
            DecodeError::BadFeedFlags { .. } => "bad_feed_flags",
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::Io(_) => "io",
        }
    }
}
