//! TLS end to end: the SDK syncs and runs a live session through a server
//! serving TLS with a generated (self-signed) certificate and requiring a
//! token; clients that do not trust the certificate, or speak plain TCP to
//! it, get a clear error and nothing else. TLS on the wrong port is named
//! both ways (PROTOCOL.md 2.1).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::server::{TestServer, shared_note};
use notesync_client::{Client, NetError, ServerConfig, SyncError, TlsError, TlsSettings};
use notesync_protocol::ErrorCode;
use notesync_server::auth::{Access, add_token};
use notesync_server::{Config, TlsFiles};

/// A TLS server that requires a token, and what a client needs to trust it.
struct TlsServer {
    server: TestServer,
    ca: PathBuf,
    token: String,
}

async fn start() -> TlsServer {
    let mut token = String::new();
    let server = TestServer::start_with(|dir| {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
        let data = dir.join("data");
        token = add_token(&data, "tls-team", Access::ReadWrite).unwrap().1;
        let mut config = Config::new(&data);
        config.tls = Some(TlsFiles {
            cert: cert_path,
            key: key_path,
        });
        config
    })
    .await;
    TlsServer {
        ca: server.dir().join("cert.pem"),
        server,
        token,
    }
}

impl TlsServer {
    fn config(&self) -> ServerConfig {
        let mut cfg = self.server.config();
        cfg.token = self.token.clone().into_bytes();
        cfg.tls = Some(TlsSettings {
            ca_file: Some(self.ca.clone()),
            server_name: Some("localhost".to_owned()),
        });
        cfg
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_syncs_and_edits_live_over_tls() {
    let server = start().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Client::open(da.path(), server.config()).unwrap();
    let b = Client::open(db.path(), server.config()).unwrap();
    // b gets it as a new note with its text (checked by shared_note).
    let id = shared_note(&a, &b, "over tls", "encrypted hello").await;

    // A live session through TLS: b sees a's edit.
    let sa = a.session(id).unwrap();
    let mut sb = b.session(id).unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !sb.is_connected() || !sa.is_connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both sessions connect over TLS");
    sa.insert(0, "live, ").unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while sb.text() != "live, encrypted hello" {
            if sb.next_event().await.is_none() {
                panic!("b's session ended");
            }
        }
    })
    .await
    .expect("b sees a's live edit");
    sa.close().await;
    sb.close().await;
    server.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificates_and_plain_tcp_are_refused_clearly() {
    let server = start().await;
    // Trusting only the public roots: the self-signed certificate fails.
    let mut cfg = server.config();
    cfg.tls = Some(TlsSettings {
        ca_file: None,
        server_name: Some("localhost".to_owned()),
    });
    let dir = tempfile::tempdir().unwrap();
    let c = Client::open(dir.path(), cfg).unwrap();
    match c.sync_now().await {
        Err(SyncError::Net(NetError::Tls(e @ TlsError::Handshake { .. }))) => {
            let msg = e.to_string();
            assert!(msg.contains("certificate"), "{msg}");
        }
        other => panic!("expected a TLS certificate error, got {other:?}"),
    }
    // The right CA but another name: refused too.
    let mut cfg = server.config();
    cfg.tls = Some(TlsSettings {
        ca_file: Some(server.ca.clone()),
        server_name: Some("notesync.example".to_owned()),
    });
    let dir = tempfile::tempdir().unwrap();
    let c = Client::open(dir.path(), cfg).unwrap();
    assert!(matches!(
        c.sync_now().await,
        Err(SyncError::Net(NetError::Tls(_)))
    ));
    // Plain TCP to a TLS server: an error, not a hang or a panic; this
    // server answers the hello in the clear (PROTOCOL.md 2.1).
    let mut cfg = server.config();
    cfg.tls = None;
    cfg.reply_timeout = Duration::from_secs(3);
    let dir = tempfile::tempdir().unwrap();
    let c = Client::open(dir.path(), cfg).unwrap();
    let r = c.sync_now().await;
    assert!(r.is_err());
    match r {
        Err(SyncError::Net(NetError::Server { code, message })) => {
            assert_eq!(code, ErrorCode::UNKNOWN_FRAME);
            assert!(message.contains("this port speaks TLS"), "{message}");
            assert!(message.contains("--tls"), "{message}");
        }
        other => panic!("expected the server's unknown_frame, got {other:?}"),
    }
    server.server.stop().await;
}

/// The network error a sync through `cfg` from a fresh folder fails with.
async fn net_error(cfg: ServerConfig) -> NetError {
    let dir = tempfile::tempdir().unwrap();
    let c = Client::open(dir.path(), cfg).unwrap();
    match c.sync_now().await {
        Err(SyncError::Net(e)) => e,
        other => panic!("expected a network error, got {other:?}"),
    }
}

/// `e` says `expected`, and retrying would not help.
fn assert_says(e: &NetError, expected: &str) {
    assert_eq!(e.to_string(), expected);
    assert!(!e.is_transient(), "{e}");
}

/// A TLS server that is not notesync's (a TLS proxy, an older server):
/// it answers a plain hello with a TLS alert record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_names_a_tls_record_in_reply_to_its_hello() {
    use tokio_rustls::rustls;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let tls_server = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        // The hello is no ClientHello: the handshake fails (after the alert).
        acceptor.accept(socket).await.is_err()
    });
    let mut cfg = ServerConfig::new(&addr);
    cfg.reply_timeout = Duration::from_secs(10);
    let e = net_error(cfg).await;
    assert!(matches!(e, NetError::ServerSpeaksTls { .. }), "{e:?}");
    assert_says(
        &e,
        &format!("{addr}: the server speaks TLS: use --tls (or --tls-ca FILE)"),
    );
    assert!(tls_server.await.unwrap(), "the TLS handshake failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_names_a_server_without_tls() {
    let server = TestServer::start().await;
    let mut cfg = server.config();
    cfg.tls = Some(TlsSettings {
        ca_file: None,
        server_name: Some("localhost".to_owned()),
    });
    let addr = cfg.addr.clone();
    let e = net_error(cfg).await;
    assert!(matches!(e, NetError::NotTls { .. }), "{e:?}");
    assert_says(
        &e,
        &format!("{addr}: the server does not speak TLS on this port (connect without --tls)"),
    );
    server.stop().await;
}
