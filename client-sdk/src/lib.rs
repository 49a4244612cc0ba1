//! notesync-client: the SDK apps embed for offline-first notes that sync
//! through notesync-server.
//!
//! Layers, bottom up: [`doc`] (a replica's atoms and char arithmetic),
//! [`oplog`] (what is not yet acknowledged, and its durable log), [`store`]
//! (the folder of notes), [`net`] (a framed connection), [`sync`] (one
//! two-way sync), [`feed`] (the background sync that follows the server's
//! change feed) and [`client`] (the async API with live sessions). The local store, the
//! offline op log, sync and live sessions follow (issue 4).

pub mod client;
pub mod doc;
pub mod feed;
pub mod folder;
pub mod fsutil;
pub mod merge;
pub mod net;
pub mod oplog;
pub mod store;
pub mod sync;

pub use client::{Client, Session, SessionEvent};
pub use doc::{Doc, EditError, LocalOp, TextChange};
pub use feed::{SyncEvent, SyncLoop};
pub use net::{NetError, ServerConfig, TlsError, TlsSettings};
pub use store::{NoteInfo, Store, StoreError};
pub use sync::{SyncError, SyncProgress, SyncReport};
