//! One client connection: what it waits for, its deadlines, how it gives way when the server is
//! at its connection limit, and the request body read before any route sees the request.
//!
//! Conventions in this file: a connection's *stage* says who it waits for. `Client`: the next
//! request's head, or for the client to take our response. `Body`: the rest of a request body.
//! `Server`: its request is with the router or the VMM. Only the first two can be stuck on a
//! client, so only they have deadlines and only they are *evicted* (closed to make room).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::routes::Fault;

/// A body over the limit is still read and dropped up to this many bytes, so a client that
/// writes its body after the headers gets the 413 rather than a broken pipe; a larger one is
/// refused at once.
pub(crate) const DRAIN_LIMIT: u64 = 256 * 1024;

/// The limits a connection lives by.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    /// Longest wait for a client in the `Client` stage.
    pub header_timeout: Duration,
    /// Longest time for a whole request body to arrive, from its head.
    pub body_timeout: Duration,
    pub body_limit: usize,
    pub max_connections: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Client,
    Body,
    Server,
}

/// Why a connection is being closed by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Eviction {
    /// Another client needs its slot.
    Limit,
    /// The server stops.
    Shutdown,
}

#[derive(Debug, Clone, Copy)]
struct Status {
    stage: Stage,
    since: Instant,
    evicted: Option<Eviction>,
}

/// A connection's status, shared by its task, its service and the registry.
pub(crate) struct ConnState {
    status: watch::Sender<Status>,
}

impl ConnState {
    fn status(&self) -> Status {
        *self.status.borrow()
    }

    fn set_stage(&self, stage: Stage) {
        self.status.send_modify(|s| {
            s.stage = stage;
            s.since = Instant::now();
        });
    }

    fn evict(&self, why: Eviction) {
        self.status.send_modify(|s| {
            s.evicted.get_or_insert(why);
        });
    }
}

/// Every open connection, to pick one to evict.
#[derive(Default)]
pub(crate) struct Registry {
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    /// Signalled when a connection's request leaves the server: it may be evicted now.
    pub freed: Notify,
    /// How many accept loops wait for room (`freed` is signalled only then).
    waiting: AtomicUsize,
}

/// Marks an accept loop as waiting for room until dropped.
pub(crate) struct WaitingForRoom<'a>(&'a Registry);

impl Drop for WaitingForRoom<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Removes a connection from the registry when its task ends.
pub(crate) struct Registered {
    registry: Arc<Registry>,
    id: u64,
    pub state: Arc<ConnState>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (status, _) = watch::channel(Status {
            stage: Stage::Client,
            since: Instant::now(),
            evicted: None,
        });
        let state = Arc::new(ConnState { status });
        self.lock().insert(id, state.clone());
        Registered {
            registry: self.clone(),
            id,
            state,
        }
    }

    /// Evicts the connection that has waited longest for its client (stage `Client` or
    /// `Body`); false when every connection's request is with the server.
    pub fn evict_longest_waiting(&self) -> bool {
        let conns = self.lock();
        let oldest = conns
            .values()
            .filter(|c| {
                let s = c.status();
                s.stage != Stage::Server && s.evicted.is_none()
            })
            .min_by_key(|c| c.status().since);
        match oldest {
            Some(c) => {
                c.evict(Eviction::Limit);
                true
            }
            None => false,
        }
    }

    pub fn waiting_for_room(&self) -> WaitingForRoom<'_> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        WaitingForRoom(self)
    }

    /// A connection's request left the server: wake the accept loops waiting for room.
    fn request_done(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }

    pub fn evict_all(&self, why: Eviction) {
        for c in self.lock().values() {
            c.evict(why);
        }
    }
}

/// Serves one connection until it ends, its client is too slow, or it is evicted.
///
/// `Client` stage: closed after `header_timeout` without a request (or with our response
/// unread), and at once when evicted (hyper has written our last answer by the time the stage
/// changed, unless the client does not read it). `Body` stage: the service answers 408 itself
/// (timeout or eviction), then the connection closes. `Server` stage: never cut; an evicted one
/// closes after its answer.
pub(crate) async fn drive<C>(conn: C, state: &ConnState, limits: ConnLimits)
where
    C: Future + GracefulShutdown,
{
    let mut conn = std::pin::pin!(conn);
    let mut rx = state.status.subscribe();
    let mut graceful = false;
    loop {
        let s = *rx.borrow_and_update();
        let deadline = match (s.stage, s.evicted) {
            (Stage::Client, Some(_)) => return,
            (Stage::Client, None) => Some(s.since + limits.header_timeout),
            (_, Some(_)) if !graceful => {
                // After the answer (which says `connection: close`), hyper closes.
                conn.as_mut().shutdown_gracefully();
                graceful = true;
                None
            }
            _ => None,
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            r = rx.changed() => if r.is_err() { return },
            _ = sleep_until_opt(deadline) => return,
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// hyper's connection types, behind one method.
pub(crate) trait GracefulShutdown {
    fn shutdown_gracefully(self: Pin<&mut Self>);
}

impl<I, S> GracefulShutdown for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S::ResBody: 'static + Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// The per-connection service: reads the whole body (bounded in size and time), then hands the
/// request to the router. Reading first means every answer, 404 and 405 included, comes after
/// the client has sent its body, so a client that writes headers and body separately reads
/// the answer instead of a broken pipe, and the connection stays usable.
#[derive(Clone)]
pub(crate) struct ConnService {
    pub app: TowerToHyperService<Router>,
    pub state: Arc<ConnState>,
    pub registry: Arc<Registry>,
    pub limits: ConnLimits,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.serve(req).await) })
    }
}

impl ConnService {
    async fn serve(self, req: Request<Incoming>) -> Response<Body> {
        self.state.set_stage(Stage::Body);
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let read = self.read_body(body, declared).await;
        let response = match read {
            Ok(bytes) => {
                self.state.set_stage(Stage::Server);
                let req = Request::from_parts(parts, Body::from(bytes));
                match hyper::service::Service::call(&self.app, req).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            }
            Err(fault) => {
                let mut resp = fault.into_response();
                // The rest of the body may still be on its way: this connection cannot carry
                // another request.
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                resp
            }
        };
        self.state.set_stage(Stage::Client);
        self.registry.request_done();
        response
    }

    /// The body, whole, or the fault to answer: 413 over the limit, 408 when it does not arrive
    /// in time or the connection is evicted meanwhile, 400 when it cannot be read.
    async fn read_body(&self, mut body: Incoming, declared: Option<u64>) -> Result<Bytes, Fault> {
        let limit = self.limits.body_limit;
        let too_large = || {
            Fault::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than the limit of {limit} bytes"),
            )
        };
        if declared.is_some_and(|n| n > DRAIN_LIMIT) {
            return Err(too_large());
        }
        let deadline = self.state.status().since + self.limits.body_timeout;
        let mut evicted = self.state.status.subscribe();
        let mut buf = Vec::new();
        let mut received: u64 = 0;
        loop {
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(self.too_slow(declared, received));
                }
                _ = evicted.wait_for(|s| s.evicted.is_some()) => {
                    return Err(self.evicted(declared, received));
                }
            };
            match frame {
                None => break,
                Some(Err(e)) => {
                    return Err(Fault::new(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the request body: {e}"),
                    ))
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers
                    };
                    received += data.len() as u64;
                    if received > DRAIN_LIMIT {
                        return Err(too_large());
                    }
                    if buf.len() + data.len() <= limit {
                        buf.extend_from_slice(&data);
                    }
                }
            }
        }
        if received > limit as u64 {
            return Err(too_large());
        }
        Ok(Bytes::from(buf))
    }

    fn too_slow(&self, declared: Option<u64>, received: u64) -> Fault {
        Fault::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} ms ({}): send the body with the \
                 headers",
                self.limits.body_timeout.as_millis(),
                progress(declared, received)
            ),
        )
    }

    fn evicted(&self, declared: Option<u64>, received: u64) -> Fault {
        let why = match self.state.status().evicted {
            Some(Eviction::Shutdown) => "the API server is shutting down".to_owned(),
            _ => format!(
                "all {} connections are in use and this request's body was the one waited \
                 for longest",
                self.limits.max_connections
            ),
        };
        Fault::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the connection was closed before the request body arrived ({}): {why}",
                progress(declared, received)
            ),
        )
    }
}

fn progress(declared: Option<u64>, received: u64) -> String {
    match declared {
        Some(n) => format!("{received} of {n} bytes received"),
        None => format!("{received} bytes received"),
    }
}

/// The socket as hyper sees it, with one change: hyper's own answers to requests it cannot parse
/// (400, 414, 431 with an empty body, then the connection closes) become JSON
/// `{"fault_message": ...}` answers like every other error of the API.
///
/// They are told apart by shape: hyper writes such an answer alone, as the last thing on the
/// connection, a status of 400 or more with `content-length: 0`; every error this API answers
/// itself has a JSON body. Vectored writes are turned off so each write starts at a message
/// boundary (hyper then copies head and body into one buffer: our answers are small).
pub(crate) struct JsonHttpErrors<S> {
    inner: S,
    /// A replacement being written: the bytes, how many went out, and how many of hyper's
    /// bytes it stands for.
    pending: Option<(Vec<u8>, usize, usize)>,
    header_limit: usize,
}

impl<S> JsonHttpErrors<S> {
    pub fn new(inner: S, header_limit: usize) -> Self {
        Self {
            inner,
            pending: None,
            header_limit,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for JsonHttpErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for JsonHttpErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        if self.pending.is_none() {
            if let Some(json) = rewrite_parse_error(buf, self.header_limit) {
                self.pending = Some((json, 0, buf.len()));
            }
        }
        let this = &mut *self;
        let Some((bytes, sent, stands_for)) = this.pending.as_mut() else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        while *sent < bytes.len() {
            match Pin::new(&mut this.inner).poll_write(cx, &bytes[*sent..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => *sent += n,
                other => return other,
            }
        }
        let n = *stands_for;
        this.pending = None;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// If `buf` is exactly one of hyper's empty-bodied error answers, the JSON answer to send
/// instead.
fn rewrite_parse_error(buf: &[u8], header_limit: usize) -> Option<Vec<u8>> {
    let head = buf.strip_suffix(b"\r\n\r\n")?;
    let rest = head
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| head.strip_prefix(b"HTTP/1.0 "))?;
    let code: u16 = std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok()?;
    if code < 400 || head.windows(4).any(|w| w == b"\r\n\r\n") {
        return None;
    }
    let empty = head
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .any(|line| line.eq_ignore_ascii_case(b"content-length: 0"));
    if !empty {
        return None;
    }
    let status = StatusCode::from_u16(code).ok()?;
    let message = match status {
        StatusCode::BAD_REQUEST => "the request is not valid HTTP/1.1: it must start with \
            `METHOD /path HTTP/1.1` (HTTP/1.0 and 1.1 only), then `Name: value` header lines, \
            with at most one Content-Length, a decimal number of bytes, and not together with \
            Transfer-Encoding"
            .to_owned(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => format!(
            "the request headers are too large: at most {MAX_HEADERS} header lines and \
             {header_limit} bytes with the request line"
        ),
        StatusCode::URI_TOO_LONG => "the request path is too long".to_owned(),
        _ => format!("the request could not be read as HTTP/1.1 ({status})"),
    };
    let body = serde_json::to_vec(&crate::routes::FaultBody {
        fault_message: message,
    })
    .ok()?;
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Some(out)
}

/// Most header lines in a request: hyper's default, stated here for the error message.
pub(crate) const MAX_HEADERS: usize = 100;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hyper_empty_error_answers_are_rewritten() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\
                          date: Sun, 06 Dec 2026 03:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite_parse_error(hyper_431, 16384).unwrap()).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{out}"
        );
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{out}"
        );
        assert!(head.contains("connection: close"), "{out}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(
            v["fault_message"].as_str().unwrap().contains("16384 bytes"),
            "{v}"
        );

        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert!(rewrite_parse_error(hyper_400, 1).is_some());
        // Not rewritten: our own answers (a JSON body follows the head, or no error at all),
        // two messages in one write, a body that happens to look like a head.
        for buf in [
            &b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"[..],
            &b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\nHTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"[..],
            &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 10\r\n\r\n"[..],
            &b"{\"x\": 1}"[..],
        ] {
            assert!(
                rewrite_parse_error(buf, 1).is_none(),
                "{}",
                String::from_utf8_lossy(buf)
            );
        }
    }
}
