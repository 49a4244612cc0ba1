//! notesync-client: the SDK apps embed for offline-first notes that sync
//! through notesync-server.
//!
//! Built so far: the replica document model ([`doc`]) and the offline op log
//! ([`oplog`]). The local store, the
//! offline op log, sync and live sessions follow (issue 4).

pub mod doc;
pub mod fsutil;
pub mod oplog;
pub mod store;

pub use doc::{Doc, EditError, LocalOp, TextChange};
pub use store::{NoteInfo, Store, StoreError};
