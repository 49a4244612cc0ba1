//! A real trace typed live: one client replays automerge-paper in a session
//! while a second client observes; both must end with the trace's text.

mod common;
use common::trace::load_trace as load;

use std::time::Duration;

use common::server::{TestServer, connected_sessions};
use notesync_client::{Client, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automerge_paper_replayed_live_reaches_the_observer() {
    let Some(trace) = load("automerge-paper.json.gz") else {
        return;
    };
    let server = TestServer::start().await;
    // Clients with the SDK's default configuration (a 30 s reply timeout).
    let (dw, dobs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let writer = Client::open(dw.path(), ServerConfig::new(server.addr.clone())).unwrap();
    let observer = Client::open(dobs.path(), ServerConfig::new(server.addr.clone())).unwrap();
    let id = writer.create("automerge-paper").unwrap();
    writer.sync_now().await.unwrap();
    observer.sync_now().await.unwrap();
    let [obs, live] = connected_sessions([&observer, &writer], id).await;

    let start = trace["startContent"].as_str().unwrap();
    if !start.is_empty() {
        live.insert(0, start).unwrap();
    }
    let mut edits = 0usize;
    for txn in trace["txns"].as_array().unwrap() {
        for patch in txn["patches"].as_array().unwrap() {
            let pos = patch[0].as_u64().unwrap() as usize;
            let del = patch[1].as_u64().unwrap() as usize;
            if del > 0 {
                live.delete(pos..pos + del).unwrap();
            }
            let text = patch[2].as_str().unwrap();
            if !text.is_empty() {
                live.insert(pos, text).unwrap();
            }
            edits += 1;
            if edits % 2048 == 0 {
                // Let the session tasks run (the replay itself never awaits).
                tokio::task::yield_now().await;
            }
        }
    }
    let end = trace["endContent"].as_str().unwrap();
    assert_eq!(live.text(), end);
    let mut waited = Duration::ZERO;
    while (obs.text() != end || live.pending_ops() > 0) && waited < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    assert_eq!(live.pending_ops(), 0, "every op acknowledged");
    assert!(
        obs.text() == end,
        "the observer diverged ({} of {} chars)",
        obs.text().len(),
        end.len()
    );
    live.close().await;
    obs.close().await;
    server.stop().await;
}
