//! The admin endpoint's HTTP server: hyper (HTTP/1.1 only) on a
//! single-threaded tokio runtime, one task per connection, each bounded in
//! time; the number of connections is bounded too.
use std::{convert::Infallible, io, net::TcpListener as StdListener, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Method, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::warn;

use super::{Health, Query, Request, ANSWER_TIMEOUT, CONNECTION_TIMEOUT, HEAD_TIMEOUT, MAX_CONNECTIONS, MAX_SCRAPES};

struct Shared {
    health: Arc<Health>,
    control: crossbeam_channel::Sender<Request>,
    scrapes: Semaphore,
    /// The file whose token `/metrics` asks for, read at each scrape (a
    /// rotated Secret is seen at once).
    token: Option<std::path::PathBuf>,
}

/// Whether `req` carries the token in `path` (compared in constant time).
fn authorized(req: &hyper::Request<hyper::body::Incoming>, path: &std::path::Path) -> Result<bool, String> {
    let want = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let want = want.trim().as_bytes();
    if want.is_empty() {
        return Err(format!("{}: empty", path.display()));
    }
    let given = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let given = given.strip_prefix("Bearer ").unwrap_or("").trim().as_bytes();
    let differ = want.iter().zip(given).fold(0u8, |d, (a, b)| d | (a ^ b));
    Ok(given.len() == want.len() && differ == 0)
}

/// Serves `listener` until the process ends.
pub(super) fn run(
    listener: StdListener,
    health: Arc<Health>,
    control: crossbeam_channel::Sender<Request>,
    token: Option<std::path::PathBuf>,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let shared = Arc::new(Shared { health, control, scrapes: Semaphore::new(MAX_SCRAPES), token });
        let mut failures = 0u32;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => {
                    failures = 0;
                    stream
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning,
                    // and say so once per burst.
                    if failures == 0 {
                        warn!(error = %e, "admin accept failed; backing off");
                    }
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(Duration::from_millis(10 << failures.min(6))).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                shared.health.closed.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let shared = shared.clone();
            shared.health.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let _slot = slot;
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service_fn(|req| answer(req, &shared)));
                match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) if e.is_timeout() => {
                        shared.health.closed.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(Err(_)) => {} // the client went away or spoke garbage
                    Err(_) => {
                        shared.health.closed.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                shared.health.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            });
        }
    })
}

fn reply(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    shared: &Shared,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET {
        return Ok(reply(405, "text/plain", "only GET\n"));
    }
    Ok(match req.uri().path() {
        "/live" => reply(200, "text/plain", "alive\n"),
        "/ready" => {
            let (status, body) = shared.health.ready();
            reply(status, "text/plain", body)
        }
        "/metrics" => {
            match shared.token.as_deref().map(|p| authorized(&req, p)) {
                None | Some(Ok(true)) => {}
                Some(Ok(false)) => {
                    let mut r = reply(401, "text/plain", "a bearer token is needed for /metrics\n");
                    r.headers_mut()
                        .insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer"));
                    return Ok(r);
                }
                Some(Err(e)) => {
                    warn!(error = %e, "--metrics-token-file unreadable: /metrics refused");
                    return Ok(reply(503, "text/plain", "the metrics token is unreadable\n"));
                }
            }
            let Ok(_turn) = tokio::time::timeout(ANSWER_TIMEOUT, shared.scrapes.acquire()).await else {
                return Ok(reply(503, "text/plain", "too many scrapes at once\n"));
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            if shared.control.send(Request { query: Query::Metrics, reply: tx }).is_err() {
                return Ok(reply(503, "text/plain", "control thread gone\n"));
            }
            match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
                Ok(Ok((200, body))) => reply(200, "text/plain; version=0.0.4; charset=utf-8", body),
                Ok(Ok((status, body))) => reply(status, "text/plain", body),
                _ => reply(503, "text/plain", "control thread did not answer in time\n"),
            }
        }
        _ => reply(404, "text/plain", "not found: try /metrics, /ready, /live\n"),
    })
}
