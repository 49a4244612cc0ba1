//! An embedded notesync-server on the test's own runtime, on an ephemeral
//! port, and the devices and live sessions the tests run on it.

use std::path::Path;
use std::time::Duration;

use notesync_client::{Client, ServerConfig, Session, SessionEvent};
use notesync_protocol::DocId;
use notesync_server::{Config, Server};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Any free port on the loopback interface.
const LOCAL: &str = "127.0.0.1:0";

/// How long a test waits for anything (an event, a condition, a reply).
const PATIENCE: Duration = Duration::from_secs(10);

/// A server serving until it is stopped or dropped.
pub struct TestServer {
    /// `host:port` it listens on.
    pub addr: String,
    config: Config,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    /// Its data, and any file the test made for it; removed on drop.
    dir: Option<TempDir>,
}

impl TestServer {
    /// The default configuration on a fresh temporary data folder.
    pub async fn start() -> TestServer {
        Self::start_with(|dir| Config::new(dir)).await
    }

    /// `configure` gets a fresh temporary folder (for the data and any other
    /// file, such as a certificate) and returns the configuration to serve;
    /// its listen address is replaced by an ephemeral port.
    pub async fn start_with(configure: impl FnOnce(&Path) -> Config) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let config = configure(dir.path()).listen(LOCAL);
        Self::serve(dir, config).await
    }

    async fn serve(dir: TempDir, config: Config) -> TestServer {
        let server = Server::bind(config.clone()).await.unwrap();
        let addr = server.local_addr().to_string();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            server.run(s).await.unwrap();
        });
        TestServer {
            addr,
            config,
            stop,
            task: Some(task),
            dir: Some(dir),
        }
    }

    /// The folder `start_with` gave the configuration.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("kept until drop").path()
    }

    /// Stops the server gracefully and waits until it has; panics if it
    /// failed.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let task = self.task.take().expect("running");
        task.await.unwrap();
    }

    /// Stops the server (gracefully) and starts it again on the same port
    /// and data folder.
    pub async fn restart(mut self) -> TestServer {
        let dir = self.dir.take().expect("kept until drop");
        let config = self.config.clone().listen(self.addr.clone());
        self.stop.cancel();
        let task = self.task.take().expect("running");
        task.await.unwrap();
        Self::serve(dir, config).await
    }

    /// How a client reaches this server (waiting at most 10 s for a reply).
    pub fn config(&self) -> ServerConfig {
        let mut cfg = ServerConfig::new(self.addr.clone());
        cfg.reply_timeout = PATIENCE;
        cfg
    }

    /// A client of this server with its store in `dir`.
    pub fn client(&self, dir: &Path) -> Client {
        Client::open(dir, self.config()).unwrap()
    }

    /// A new device: a client of this server with its store in a fresh
    /// temporary folder (removed on drop).
    pub fn device(&self) -> (TempDir, Client) {
        let dir = tempfile::tempdir().unwrap();
        let client = self.client(dir.path());
        (dir, client)
    }

    /// A server as [`TestServer::start`] makes it, with `N` devices on it.
    pub async fn with_devices<const N: usize>() -> (TestServer, [(TempDir, Client); N]) {
        let server = Self::start().await;
        let devices = std::array::from_fn(|_| server.device());
        (server, devices)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Creates a note on `a` holding `text` (none if empty) and syncs it to `b`
/// (`a` first, then `b`), which must get it as a new note with that text.
pub async fn shared_note(a: &Client, b: &Client, name: &str, text: &str) -> DocId {
    let id = a.create(name).unwrap();
    if !text.is_empty() {
        a.insert(id, 0, text).unwrap();
    }
    a.sync_now().await.unwrap();
    let rb = b.sync_now().await.unwrap();
    assert_eq!(rb.new_notes, vec![id]);
    assert_eq!(b.text(id).unwrap(), text);
    id
}

/// Starts a live session on `id` on each client, then waits until each is
/// connected: its first event must be `Connected`.
pub async fn connected_sessions<const N: usize>(clients: [&Client; N], id: DocId) -> [Session; N] {
    let mut sessions = clients.map(|c| c.session(id).unwrap());
    for s in &mut sessions {
        assert_eq!(s.next_event().await, Some(SessionEvent::Connected));
    }
    sessions
}

/// The session's first event that `pick` takes (the others are skipped),
/// or `None` if the session ends first; panics after 10 s.
pub async fn next_event_where<T>(
    what: &str,
    s: &mut Session,
    mut pick: impl FnMut(SessionEvent) -> Option<T>,
) -> Option<T> {
    let wait = async {
        while let Some(e) = s.next_event().await {
            if let Some(t) = pick(e) {
                return Some(t);
            }
        }
        None
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Waits until `ok` holds, checking every 20 ms; panics after 10 s.
pub async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..500 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}
