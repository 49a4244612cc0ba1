//! The client half of the conformance kit against the reference SDK
//! (`notesync-client`): each check drives a `Client` against the scripted
//! fake server of `notesync_tests::conformance::fake_server`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use notesync_client::{Client, ServerConfig, Session};
use notesync_protocol::DocId;
use notesync_tests::conformance::client_checks::{ClientFactory, ClientUnderTest};
use notesync_tests::conformance::{
    Status, client_checks, quiet_check_panics, random_seed, run_client_checks, select,
};

/// The SDK as the checks drive it.
struct Sdk {
    client: Client,
    sessions: HashMap<DocId, Session>,
    /// Where the SDK kept the text of notes deleted elsewhere.
    kept: HashMap<DocId, std::path::PathBuf>,
    /// The task that runs the background sync and reads its events (the
    /// loop waits for a reader that is behind); aborting it drops the loop.
    feed: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Sdk {
    fn drop(&mut self) {
        if let Some(t) = self.feed.take() {
            t.abort();
        }
    }
}

impl ClientUnderTest for Sdk {
    fn create(&mut self, name: &str) -> DocId {
        self.client.create(name).expect("create a note")
    }
    fn insert(&mut self, doc: DocId, index: usize, text: &str) {
        self.client.insert(doc, index, text).expect("insert");
    }
    fn delete(&mut self, doc: DocId, range: Range<usize>) {
        self.client.delete(doc, range).expect("delete");
    }
    fn text(&self, doc: DocId) -> Option<String> {
        self.client.text(doc).ok()
    }
    fn pending(&self, doc: DocId) -> usize {
        self.client
            .list()
            .into_iter()
            .find(|n| n.id == doc)
            .map_or(0, |n| n.pending_ops)
    }
    fn sync(&mut self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let report = self.client.sync_now().await.map_err(|e| e.to_string())?;
            for d in report.deleted {
                if let Some(path) = d.kept {
                    self.kept.insert(d.id, path);
                }
            }
            Ok(())
        })
    }
    fn open_session(&mut self, doc: DocId) {
        let s = self.client.session(doc).expect("open a session");
        self.sessions.insert(doc, s);
    }
    fn session_insert(&mut self, doc: DocId, index: usize, text: &str) {
        self.sessions[&doc]
            .insert(index, text)
            .expect("session insert");
    }
    fn session_delete(&mut self, doc: DocId, range: Range<usize>) {
        self.sessions[&doc].delete(range).expect("session delete");
    }
    fn delete_note(&mut self, doc: DocId) {
        self.client.delete_note(doc).expect("delete a note");
    }
    fn kept_text(&self, doc: DocId) -> Option<String> {
        let path = self.kept.get(&doc)?;
        Some(std::fs::read_to_string(path).expect("read the kept text"))
    }
    fn follow_feed(&mut self) -> bool {
        // The interval is the poll of a server without the feed; the fake
        // server has one.
        let mut sync = self.client.sync_loop(Duration::from_secs(3600));
        self.feed = Some(tokio::spawn(async move {
            while sync.next_event().await.is_some() {}
        }));
        true
    }
    fn close_session(&mut self, doc: DocId) -> BoxFuture<'_, ()> {
        let s = self.sessions.remove(&doc);
        Box::pin(async move {
            if let Some(s) = s {
                s.close().await;
            }
        })
    }
}

struct SdkFactory;

impl ClientFactory for SdkFactory {
    fn open(&self, server: SocketAddr, dir: &Path) -> Box<dyn ClientUnderTest> {
        let mut cfg = ServerConfig::new(server.to_string());
        cfg.reply_timeout = Duration::from_secs(10);
        Box::new(Sdk {
            client: Client::open(dir, cfg).expect("open the SDK's store"),
            sessions: HashMap::new(),
            kept: HashMap::new(),
            feed: None,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_follows_every_client_rule() {
    quiet_check_panics();
    // NOTESYNC_CONFORMANCE_ONLY="a,b" runs a subset (names or prefixes).
    let only: Vec<String> = std::env::var("NOTESYNC_CONFORMANCE_ONLY")
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let checks = select(client_checks(), &only).expect("known check names");
    let seed = random_seed();
    eprintln!("client conformance: {} checks, seed {seed}", checks.len());
    let report = run_client_checks(Arc::new(SdkFactory), &checks, seed, 2, |_| {}).await;
    eprintln!("{}", report.table());
    let not_passed: Vec<&str> = report
        .results
        .iter()
        .filter(|r| !matches!(r.status, Status::Pass))
        .map(|r| r.name.as_str())
        .collect();
    assert!(
        not_passed.is_empty(),
        "{} of {} client checks did not pass: {not_passed:?}",
        not_passed.len(),
        report.results.len()
    );
}
