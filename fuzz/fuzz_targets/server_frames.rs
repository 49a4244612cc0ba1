//! A whole server under arbitrary client bytes: one in-process
//! `notesync_server::Server` (data on /dev/shm when there is one) serves
//! every input; each input is one connection whose bytes are written in
//! input-chosen pieces (optionally after a valid hello and session_start).
//! The checks live in tests/src/server_fuzz.rs so that a stable test
//! replays the corpus against the real binary
//! (tests/tests/network_faults.rs, `server_frames_fuzz_corpus_replays`).
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/src/server_fuzz.rs"]
mod server_fuzz;

fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("notesync-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut cfg = notesync_server::Config::new(dir).listen("127.0.0.1:0");
                cfg.handshake_timeout = Duration::from_secs(3);
                cfg.idle_timeout = Duration::from_secs(3);
                cfg.session_idle_timeout = Duration::from_secs(3);
                cfg.write_timeout = Duration::from_secs(3);
                let server = notesync_server::Server::bind(cfg).await.expect("bind");
                tx.send(server.local_addr()).expect("send addr");
                server
                    .run(tokio_util::sync::CancellationToken::new())
                    .await
                    .expect("server runs");
            });
        });
        rx.recv().expect("the server starts")
    })
}

fuzz_target!(|data: &[u8]| {
    server_fuzz::server_frames_target(server(), data);
});
