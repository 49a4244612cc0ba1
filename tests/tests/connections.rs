//! Connection lifecycle: a client that closes its connection frees it.
//!
//! PROTOCOL.md 4 (`server_busy`: "the server is at its connection limit")
//! and 5 (the limit is the server's, documented in its --help: 1,024 by
//! default for the reference server). Connections the clients have closed
//! do not count: a server that keeps them until an idle timeout turns
//! away new clients after enough short syncs.

use notesync_protocol::ServerFrame;
use notesync_tests::{ServerProcess, describe};

/// More than the reference server's default `--max-connections` (1,024).
const SHORT_SYNCS: u128 = 1_100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_clients_free_their_slots() {
    let server = ServerProcess::start();
    for replica in 1..=SHORT_SYNCS {
        // A typical short sync: hello, list, close.
        let mut c = server.connect().await;
        c.send(notesync_protocol::ClientFrame::Hello(
            notesync_protocol::Hello::new(replica, bytes::Bytes::new()).unwrap(),
        ))
        .await;
        match c.recv().await {
            ServerFrame::Welcome { .. } => {}
            other => panic!(
                "short sync {replica}: expected a welcome, got {} (earlier connections, \
                 all closed by the client, still hold their slots)",
                describe(&other)
            ),
        }
        c.synclist(0).await;
    }
    let mut c = server.connect().await;
    c.hello(0).await;
    assert_eq!(c.synclist(0).await, vec![]);
}
