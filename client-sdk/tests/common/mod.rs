//! Shared by the client test files (each includes it with `mod common;`):
//! an embedded async test server and the devices and sessions on it
//! (`server.rs`), and the real editing traces (`trace.rs`).

// Each test file uses its own part of this.
#![allow(dead_code)]

pub mod server;
pub mod trace;
