//! The `--metrics` listener (when `Config::metrics` names an address), on
//! hyper's HTTP/1.1 server: `GET /metrics` for Prometheus scrapers and
//! `GET /healthz` for load balancers (200 while the server serves, 503 once
//! its shutdown has begun). Other paths are 404, other methods 405.
//!
//! Bounded: at most `MAX_CONNECTIONS` at once (one more is closed at
//! accept), request heads of at most `MAX_REQUEST_HEAD` bytes (431 past
//! it), `HEADER_TIMEOUT` to send a head (a slow client is closed); bodies
//! are never read. hyper handles keep-alive and malformed requests.
//!
//! Touches the metrics counters (their text) and the open tenants (read for
//! the namespace and document gauges at each scrape); nothing else.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tenants::Tenants;

/// Connections served at once; one more is closed as soon as it is accepted.
const MAX_CONNECTIONS: usize = 64;
/// Longest HTTP request head read (hyper's smallest buffer bound).
const MAX_REQUEST_HEAD: usize = 8192;
/// Time a client has to send a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection has, once `stop` is cancelled, to finish its request.
const STOP_GRACE: Duration = Duration::from_secs(1);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics, as Prometheus (OpenMetrics) text, with `tenants`' gauges.
fn render(tenants: &Tenants) -> String {
    let open = tenants.open_tenants();
    crate::metrics::render(
        open.len() as i64,
        open.iter().map(|t| t.index.len() as i64).sum::<i64>(),
    )
}

/// Binds the metrics listener.
pub(crate) async fn bind(addr: &str) -> io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves `listener` until `stop`. `draining` is the server's shutdown
/// token: once it is cancelled `/healthz` answers 503, while `/metrics`
/// still answers (the last scrapes of a stopping server), so the caller
/// cancels `stop` when its connections have drained. Returns when every
/// metrics connection has ended (within `STOP_GRACE`), so none still holds
/// `tenants`.
pub(crate) async fn serve(
    listener: TcpListener,
    tenants: Arc<Tenants>,
    draining: CancellationToken,
    stop: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(MAX_CONNECTIONS, "metrics connection limit reached");
            continue;
        };
        let (tenants, draining, stop) = (tenants.clone(), draining.clone(), stop.clone());
        let conn = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |req| {
                let reply = answer(&req, &tenants, &draining);
                async move { Ok::<_, Infallible>(reply) }
            }),
        );
        tracker.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let served = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    // Dropped past the grace (a head still arriving).
                    tokio::time::timeout(STOP_GRACE, conn).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics connection");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// The reply to one request; its body, if any, is never read.
fn answer(
    req: &Request<Incoming>,
    tenants: &Tenants,
    draining: &CancellationToken,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        let mut reply = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        reply
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return reply;
    }
    match req.uri().path() {
        "/metrics" => {
            let mut reply = Response::new(Full::new(Bytes::from(render(tenants))));
            reply
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            reply
        }
        "/healthz" if draining.is_cancelled() => {
            plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
        }
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        _ => plain(StatusCode::NOT_FOUND, "try /metrics or /healthz\n"),
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut reply = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    reply
}
