//! notesync-server: the durable sync server (PROTOCOL.md is the spec).
//!
//! Module map:
//! - [`config`]: the configuration and its documented defaults;
//! - `store`: the redb schema, the server clock, reads and writes of stored
//!   state;
//! - `writer`: the one thread that commits, in batches, and owns the rooms
//!   (batching loop; `apply` rules; `compact`ion; `stats`);
//! - `index`: the in-memory synclist index;
//! - `reply`: a document's catch-up, read by the store, as 33/36 frames;
//! - `rooms`: session fan-out and bounded per-connection queues;
//! - `conn`: one connection: handshake and modes (`sync`, `session`), its
//!   socket writer (`socket`), the read path (`read`), and the token
//!   registry for revocation (`registry`);
//! - `server`: the accept loop (TLS, auth budget) and graceful shutdown;
//! - [`auth`]: tokens (hashed in the data folder), the failed-attempt
//!   budget;
//! - [`tenants`]: one database, index and writer per namespace;
//! - [`ops`]: backup, check and export over one read snapshot per
//!   namespace database;
//! - [`admin`]: the Unix socket through which those commands reach a
//!   running server (which holds the databases' locks), and their CLI side;
//! - `metrics`: Prometheus counters (a leaf: every layer may count);
//! - `metrics_http`: the `--metrics` listener (hyper): `/metrics`, with the
//!   tenants' gauges, and `/healthz`;
//! - [`notify`]: systemd's `Type=notify` readiness datagrams;
//! - [`config_file`]: `--config FILE` (TOML keys named as the flags).
//!
//! Embedding:
//!
//! ```no_run
//! # async fn demo() -> Result<(), notesync_server::Error> {
//! use notesync_server::{Config, Server};
//! let server = Server::bind(Config::new("/tmp/notes").listen("127.0.0.1:0")).await?;
//! println!("listening on {}", server.local_addr());
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! server.run(shutdown).await
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod config;
pub mod config_file;
mod conn;
mod feed;
mod index;
mod metrics;
mod metrics_http;
pub mod notify;
pub mod ops;
mod reply;
mod rooms;
mod server;
#[cfg(test)]
mod storage_faults;
mod store;
pub mod tenants;
mod writer;

pub use config::{Config, TlsFiles};
pub use server::{Error, Server, TlsError};
pub use store::{OpenError, StoreError, SystemClock, WallClock};
pub use writer::WriterStats;
