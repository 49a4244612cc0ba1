//! An embedded notesync-server on its own runtime, for tests that block on
//! child processes (the CLI tests). Included with `#[path]` by each.

use std::time::Duration;

use notesync_server::{Config, Server};
use tokio_util::sync::CancellationToken;

pub struct BlockingServer {
    pub addr: String,
    rt: Option<tokio::runtime::Runtime>,
    stop: CancellationToken,
    /// The data folder, when the server made its own.
    _data: Option<tempfile::TempDir>,
}

impl BlockingServer {
    /// A server with the default configuration on a fresh temporary data
    /// folder, removed on drop.
    #[allow(dead_code)] // not every test that includes this file uses it
    pub fn start_temp() -> BlockingServer {
        let data = tempfile::tempdir().unwrap();
        let mut s = Self::start(Config::new(data.path()).listen("127.0.0.1:0"));
        s._data = Some(data);
        s
    }

    /// Binds `config` (its data folder is the caller's to keep) and serves
    /// it until dropped.
    pub fn start(config: Config) -> BlockingServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = rt.block_on(Server::bind(config)).unwrap();
        let addr = server.local_addr().to_string();
        let stop = CancellationToken::new();
        let s = stop.clone();
        rt.spawn(async move { server.run(s).await.unwrap() });
        BlockingServer {
            addr,
            rt: Some(rt),
            stop,
            _data: None,
        }
    }
}

impl Drop for BlockingServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}
