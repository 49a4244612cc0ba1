//! The token registry: live authenticated connections by token id, so that
//! revoking a token (the tokens file changed) ends its connections.
//!
//! Touches only the connections' `Kill` switches (from `rooms`). A
//! connection registers after its token checks out and stays registered
//! while its [`Registered`] guard lives.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use notesync_protocol::ErrorCode;

use crate::rooms::{Kill, error_bytes};

type ByToken = HashMap<String, HashMap<u64, Arc<Kill>>>;

/// Live authenticated connections by token id.
#[derive(Default)]
pub(crate) struct TokenConns {
    conns: Mutex<ByToken>,
    next_conn: AtomicU64,
}

impl TokenConns {
    fn lock(&self) -> MutexGuard<'_, ByToken> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection of `token_id`, ended through `kill` if the
    /// token is revoked; it stays registered while the guard lives.
    pub(super) fn register(self: &Arc<Self>, token_id: &str, kill: Arc<Kill>) -> Registered {
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .entry(token_id.to_owned())
            .or_default()
            .insert(conn_id, kill);
        Registered {
            conns: self.clone(),
            token_id: token_id.to_owned(),
            conn_id,
        }
    }

    /// Ends every connection of a revoked token (after what is queued for
    /// them), telling them why.
    pub(crate) fn revoke(&self, token_id: &str) {
        let conns = self.lock().remove(token_id).unwrap_or_default();
        if !conns.is_empty() {
            tracing::info!(
                token = token_id,
                connections = conns.len(),
                "token revoked: closing its connections"
            );
        }
        for kill in conns.into_values() {
            kill.end(error_bytes(
                ErrorCode::UNAUTHORIZED,
                "this connection's token was revoked",
            ));
        }
    }
}

/// Keeps a connection in its [`TokenConns`] while it lives.
pub(super) struct Registered {
    conns: Arc<TokenConns>,
    token_id: String,
    conn_id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut map = self.conns.lock();
        if let Some(conns) = map.get_mut(&self.token_id) {
            conns.remove(&self.conn_id);
            if conns.is_empty() {
                map.remove(&self.token_id);
            }
        }
    }
}
