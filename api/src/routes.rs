//! The router: HTTP method and path -> [`ApiRequest`], and the VMM's answer -> HTTP response.
//!
//! Every route is registered through `RouteTable::add`, which records it; [`routes()`] returns that
//! record so a test can compare the router with `openapi.yaml` both ways.

use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::bridge::{
    ApiErrorKind, ApiMessage, ApiRequest, ApiResponse, ApiResult, DirectReads, ResponseKind,
};
use crate::metrics::{self, ApiMetrics};
use crate::requests::{
    ActionRequest, BalloonConfig, BalloonStatsUpdate, BalloonUpdate, BootSourceConfig,
    HotplugMemoryConfig, HotplugMemoryUpdate, MachineConfig, MemoryQuery, ResizeRequest, Validate,
};
use crate::rules::Field;

/// The wake-up callback the VMM passes: typically writes its eventfd.
pub type WakeFn = Arc<dyn Fn() + Send + Sync>;

/// What every handler shares.
pub(crate) struct Shared {
    pub tx: Sender<ApiMessage>,
    pub wake: WakeFn,
    pub vmm_timeout: Duration,
    pub body_limit: usize,
    pub in_flight: Semaphore,
    pub max_in_flight: usize,
    pub metrics: ApiMetrics,
    /// Set once the VM runs (`ServerHandle::set_direct_reads`): answers GETs on this thread.
    pub direct: OnceLock<Arc<dyn DirectReads>>,
}

type AppState = Arc<Shared>;

/// An error answer: `{"fault_message": "..."}` with a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The HTTP status to answer with.
    pub status: StatusCode,
    /// The `fault_message` text.
    pub message: String,
}

impl Fault {
    /// A fault with `status` saying `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

/// The JSON error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FaultBody {
    /// What was wrong, in words for the client.
    pub fault_message: String,
}

impl IntoResponse for Fault {
    fn into_response(self) -> Response {
        json_response(
            self.status,
            &FaultBody {
                fault_message: self.message,
            },
        )
    }
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        // Our response types are plain data; this cannot happen, but never panic on it.
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode response: {e}"),
        )
            .into_response(),
    }
}

/// Parses and validates a JSON body. Errors name the field (via its path), what was wrong, and
/// what the field takes ([`Field::expected`]), without serde's Rust type names or positions.
pub fn parse_body<T: DeserializeOwned + Validate>(bytes: &[u8]) -> Result<T, Fault> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Fault::bad_request(
            "the request body is empty; this route expects a JSON object",
        ));
    }
    // serde accepts a struct as a JSON array too (`[1]`); the API takes objects only.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Fault::bad_request(
            "invalid body: this route expects a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        Fault::bad_request(describe_json_error(&path, e.inner()))
    })?;
    de.end()
        .map_err(|e| Fault::bad_request(format!("invalid body: {}", without_position(&e))))?;
    value
        .validate()
        .map_err(|e| Fault::bad_request(e.for_api()))?;
    Ok(value)
}

/// serde_json's message without its ` at line L column C`.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// A deserialization error in the API's words: `field: what was sent; expected what the field
/// takes`. Serde's own `expected u8` (a Rust type) is replaced by the field's allowed values.
fn describe_json_error(path: &str, e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    if matches!(
        e.classify(),
        Category::Syntax | Category::Eof | Category::Io
    ) {
        // Not JSON: where it breaks is the useful part.
        return format!("invalid body: not valid JSON: {e}");
    }
    let text = without_position(e);
    if text.starts_with("unknown field") {
        // Serde names the field and lists the known ones.
        return format!("invalid body: {text}");
    }
    if path == "." {
        // Missing or unknown fields are reported at the top level and name the field.
        if let Some(name) = text
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
        {
            if let Some(field) = Field::from_api_name(name) {
                return format!("missing field `{name}`: {}", field.expected());
            }
        }
        return format!("invalid body: {text}");
    }
    let given = match text.split_once(", expected") {
        Some((given, _)) => given.to_string(),
        None => text,
    };
    match Field::from_api_name(path) {
        Some(field) => format!("{path}: {given}; expected {}", field.expected()),
        None => format!("{path}: {given}"),
    }
}

/// A JSON body, size-limited (413), parsed and validated (400).
pub(crate) struct JsonBody<T>(pub T);

impl<T> FromRequest<AppState> for JsonBody<T>
where
    T: DeserializeOwned + Validate,
{
    type Rejection = Fault;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Fault> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Fault::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request body is larger than the limit of {} bytes",
                        state.body_limit
                    ),
                )
            } else {
                // A body that could not be read (the client hung up, bad chunking) is the
                // client's fault whatever axum would call it.
                Fault::bad_request(format!("cannot read the request body: {}", rej.body_text()))
            }
        })?;
        parse_body(&bytes).map(JsonBody)
    }
}

impl Shared {
    /// Answers a request: from the direct reader when it serves it, else by sending it to the
    /// VMM thread and waiting (asynchronously, bounded) for its answer.
    async fn call(&self, request: ApiRequest) -> Result<ApiResponse, Fault> {
        let expected = request.expected_response();
        if let Some(answer) = self.direct.get().and_then(|d| d.read(&request)) {
            return Self::check(expected, answer);
        }
        let _permit = self.in_flight.try_acquire().map_err(|_| {
            Fault::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the VMM has {} requests waiting already; retry later",
                    self.max_in_flight
                ),
            )
        })?;
        let (msg, rx) = ApiMessage::new(request);
        self.tx.send(msg).map_err(|_| {
            Fault::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the VMM is not taking requests (its request channel is closed)",
            )
        })?;
        (self.wake)();
        match tokio::time::timeout(self.vmm_timeout, rx.recv()).await {
            Err(_) => Err(Fault::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the VMM did not answer within {} ms; the request may still take \
                     effect: check with a GET",
                    self.vmm_timeout.as_millis()
                ),
            )),
            Ok(None) => Err(Fault::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the VMM dropped the request without answering",
            )),
            Ok(Some(answer)) => Self::check(expected, answer),
        }
    }

    /// An answer of the wrong shape is a VMM bug (500); a refusal maps to its status.
    fn check(expected: ResponseKind, answer: ApiResult) -> Result<ApiResponse, Fault> {
        match answer {
            Ok(resp) if resp.kind() == expected => Ok(resp),
            Ok(resp) => Err(Fault::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "the VMM answered {:?} to a request that expects {expected:?}",
                    resp.kind()
                ),
            )),
            Err(e) => {
                let status = match e.kind {
                    ApiErrorKind::BadRequest => StatusCode::BAD_REQUEST,
                    ApiErrorKind::NotFound => StatusCode::NOT_FOUND,
                    ApiErrorKind::Conflict => StatusCode::CONFLICT,
                    ApiErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
                };
                Err(Fault::new(status, e.message))
            }
        }
    }

    /// Calls the VMM and turns its answer into HTTP: 204 for `Empty`, 200 JSON for data.
    async fn answer(&self, request: ApiRequest) -> Response {
        match self.call(request).await {
            Ok(resp) => self.encode(resp),
            Err(fault) => fault.into_response(),
        }
    }

    fn encode(&self, resp: ApiResponse) -> Response {
        match resp {
            ApiResponse::Empty => StatusCode::NO_CONTENT.into_response(),
            ApiResponse::InstanceInfo(v) => json_response(StatusCode::OK, &v),
            ApiResponse::Balloon(v) => json_response(StatusCode::OK, &v),
            ApiResponse::BalloonStats(v) => json_response(StatusCode::OK, &v),
            ApiResponse::HotplugMemory(v) => json_response(StatusCode::OK, &v),
            ApiResponse::Resize(v) => json_response(StatusCode::OK, &v),
            ApiResponse::Memory(v) => json_response(StatusCode::OK, &v),
            ApiResponse::Metrics(snap) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, metrics::PROMETHEUS_CONTENT_TYPE)],
                metrics::render(&snap, &self.metrics.families()),
            )
                .into_response(),
        }
    }
}

async fn get_root(State(s): State<AppState>) -> Response {
    s.answer(ApiRequest::GetInstanceInfo).await
}
async fn put_boot_source(State(s): State<AppState>, b: JsonBody<BootSourceConfig>) -> Response {
    s.answer(ApiRequest::PutBootSource(b.0)).await
}
async fn put_machine_config(State(s): State<AppState>, b: JsonBody<MachineConfig>) -> Response {
    s.answer(ApiRequest::PutMachineConfig(b.0)).await
}
async fn put_actions(State(s): State<AppState>, b: JsonBody<ActionRequest>) -> Response {
    s.answer(ApiRequest::Action(b.0.action_type)).await
}
async fn put_balloon(State(s): State<AppState>, b: JsonBody<BalloonConfig>) -> Response {
    s.answer(ApiRequest::PutBalloon(b.0)).await
}
async fn patch_balloon(State(s): State<AppState>, b: JsonBody<BalloonUpdate>) -> Response {
    s.answer(ApiRequest::PatchBalloon(b.0)).await
}
async fn get_balloon(State(s): State<AppState>) -> Response {
    s.answer(ApiRequest::GetBalloon).await
}
async fn get_balloon_stats(State(s): State<AppState>) -> Response {
    s.answer(ApiRequest::GetBalloonStats).await
}
async fn patch_balloon_stats(
    State(s): State<AppState>,
    b: JsonBody<BalloonStatsUpdate>,
) -> Response {
    s.answer(ApiRequest::PatchBalloonStats(b.0)).await
}
async fn put_hotplug(State(s): State<AppState>, b: JsonBody<HotplugMemoryConfig>) -> Response {
    s.answer(ApiRequest::PutHotplugMemory(b.0)).await
}
async fn patch_hotplug(State(s): State<AppState>, b: JsonBody<HotplugMemoryUpdate>) -> Response {
    s.answer(ApiRequest::PatchHotplugMemory(b.0)).await
}
async fn get_hotplug(State(s): State<AppState>) -> Response {
    s.answer(ApiRequest::GetHotplugMemory).await
}
async fn put_resize(State(s): State<AppState>, b: JsonBody<ResizeRequest>) -> Response {
    s.answer(ApiRequest::PutResize(b.0)).await
}
async fn get_resize(State(s): State<AppState>) -> Response {
    s.answer(ApiRequest::GetResize).await
}
async fn get_memory(State(s): State<AppState>, uri: Uri) -> Response {
    let query = match parse_memory_query(&uri) {
        Ok(q) => q,
        Err(fault) => return fault.into_response(),
    };
    s.answer(ApiRequest::GetMemory(query)).await
}
async fn get_metrics(State(s): State<AppState>) -> Response {
    s.answer(ApiRequest::GetMetrics).await
}

/// Parses and validates the query of `GET /vm/memory` ([`MemoryQuery::parse`]).
pub fn parse_memory_query(uri: &Uri) -> Result<MemoryQuery, Fault> {
    MemoryQuery::parse(uri.query().unwrap_or("")).map_err(Fault::bad_request)
}

async fn not_found(uri: Uri) -> Fault {
    Fault::new(
        StatusCode::NOT_FOUND,
        format!("no such resource: {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Fault {
    Fault::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

/// Counts every answer by method, route and status, for `GET /metrics`.
async fn record(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let method = match *req.method() {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        _ => "other",
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .and_then(|m| routes().iter().find(|(_, p)| *p == m.as_str()))
        .map_or("unmatched", |(_, p)| *p);
    let log_path = log::log_enabled!(log::Level::Debug).then(|| req.uri().path().to_owned());
    let t0 = std::time::Instant::now();
    let resp = next.run(req).await;
    s.metrics.record(method, route, resp.status().as_u16());
    if let Some(path) = log_path {
        log::debug!(
            "API {method} {path} -> {} in {} us",
            resp.status().as_u16(),
            t0.elapsed().as_micros()
        );
    }
    resp
}

/// Builds a router while recording what it routes.
struct RouteTable {
    router: Router<AppState>,
    table: Vec<(Method, &'static str)>,
}

impl RouteTable {
    fn new() -> Self {
        Self {
            router: Router::new(),
            table: Vec::new(),
        }
    }

    fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
        self.router = self.router.route(path, on(filter, handler));
        self.table.push((method, path));
        self
    }
}

fn table() -> RouteTable {
    RouteTable::new()
        .add(Method::GET, "/", get_root)
        .add(Method::PUT, "/boot-source", put_boot_source)
        .add(Method::PUT, "/machine-config", put_machine_config)
        .add(Method::PUT, "/actions", put_actions)
        .add(Method::PUT, "/balloon", put_balloon)
        .add(Method::PATCH, "/balloon", patch_balloon)
        .add(Method::GET, "/balloon", get_balloon)
        .add(Method::GET, "/balloon/statistics", get_balloon_stats)
        .add(Method::PATCH, "/balloon/statistics", patch_balloon_stats)
        .add(Method::PUT, "/hotplug/memory", put_hotplug)
        .add(Method::PATCH, "/hotplug/memory", patch_hotplug)
        .add(Method::GET, "/hotplug/memory", get_hotplug)
        .add(Method::PUT, "/vm/resize", put_resize)
        .add(Method::GET, "/vm/resize", get_resize)
        .add(Method::GET, "/vm/memory", get_memory)
        .add(Method::GET, "/metrics", get_metrics)
}

/// Every (method, path) the router serves, in registration order.
pub fn routes() -> &'static [(Method, &'static str)] {
    static ROUTES: OnceLock<Vec<(Method, &'static str)>> = OnceLock::new();
    ROUTES.get_or_init(|| table().table)
}

pub(crate) fn router(shared: AppState) -> Router {
    let RouteTable { router, .. } = table();
    router
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), record))
        .layer(axum::extract::DefaultBodyLimit::max(shared.body_limit))
        .with_state(shared)
}
