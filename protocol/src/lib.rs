//! The notesync wire protocol, sans-IO: typed frames, an incremental codec
//! with limits, and position ids with their order and allocator.
//!
//! Nothing here touches a socket; `notesync-server` and `notesync-client`
//! move the bytes. PROTOCOL.md at the repository root is the specification
//! this crate implements.
#![forbid(unsafe_code)]

pub mod alloc;
pub mod codec;
pub mod error;
pub mod frame;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod pid;
pub mod small_text;
#[cfg(feature = "vectors")]
pub mod vectors;

pub use alloc::{AllocError, Allocator};
pub use codec::{ClientCodec, Codec, Field, Frame, FrameDecoder, Limits, ServerCodec};
pub use error::{DecodeError, ErrorCode};
pub use frame::*;
pub use pid::{Level, Pid};
pub use small_text::SmallText;
