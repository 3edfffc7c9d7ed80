//! The daemon's REST API, with the VMM API's conventions (api/README.md): JSON bodies with
//! unknown fields refused, `{"fault_message": "..."}` errors naming the field and the allowed
//! range, 400/404/405/409, Prometheus text on `/metrics`. Every route is registered through one
//! table that [`routes()`] returns, so a test keeps `openapi.yaml` in step with it.

use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{MatchedPath, Path, Request, State};
use axum::handler::Handler;
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::daemon::{bad_request, conflict, internal, Daemon, Fault};
use crate::host::{HostUpdate, UpdateError};
use crate::registry::VmList;
use crate::spec::{MemoryPatch, VmSpec};

/// Largest request body: a VM spec is a few hundred bytes.
pub const BODY_LIMIT: usize = 64 * 1024;

type AppState = Arc<Daemon>;

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// The program's name.
    pub app_name: String,
    /// The daemon's version.
    pub version: String,
    /// The state directory in use.
    pub state_dir: String,
    /// The `vmm` binary the VMs run.
    pub vmm: String,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => internal(format!("cannot encode the answer: {e}")).into_response(),
    }
}

/// A JSON object body, decoded; errors name the field (by its path) and what was wrong.
pub fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Fault> {
    let bytes = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Fault::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than the limit of {BODY_LIMIT} bytes"),
            )
        } else {
            bad_request(format!("cannot read the request body: {}", rej.body_text()))
        }
    })?;
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => {
            return Err(bad_request(
                "the request body is empty; this route expects a JSON object",
            ))
        }
        Some(b'{') => {}
        Some(_) => {
            return Err(bad_request(
                "invalid body: this route expects a JSON object",
            ))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            bad_request(format!("invalid body: {inner}"))
        } else {
            bad_request(format!("{path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| bad_request(format!("invalid body: {e}")))?;
    Ok(value)
}

fn vm_id(p: Result<Path<String>, PathRejection>) -> Result<String, Fault> {
    p.map(|Path(id)| id)
        .map_err(|rej| bad_request(format!("bad VM id in the path: {}", rej.body_text())))
}

fn answer<T: Serialize>(status: StatusCode, r: Result<T, Fault>) -> Response {
    match r {
        Ok(v) => json(status, &v),
        Err(f) => f.into_response(),
    }
}

async fn get_root(State(d): State<AppState>) -> Response {
    json(
        StatusCode::OK,
        &DaemonInfo {
            app_name: "hostd".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            state_dir: d.config.state.root().display().to_string(),
            vmm: d.config.vmm.display().to_string(),
            uptime_s: d.started.elapsed().as_secs(),
        },
    )
}

async fn list_vms(State(d): State<AppState>) -> Response {
    let vms = d.registry().vms.values().map(|v| v.info()).collect();
    json(StatusCode::OK, &VmList { vms })
}

async fn create_vm(State(d): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let spec: VmSpec = match parse_json(body) {
        Ok(s) => s,
        Err(f) => return f.into_response(),
    };
    // Waits for the monitor to start the VMM: off the runtime's threads.
    let created = tokio::task::spawn_blocking(move || d.create_vm(spec))
        .await
        .unwrap_or_else(|e| Err(internal(format!("creating the VM failed: {e}"))));
    answer(StatusCode::CREATED, created)
}

async fn get_vm(State(d): State<AppState>, p: Result<Path<String>, PathRejection>) -> Response {
    answer(StatusCode::OK, vm_id(p).and_then(|id| d.vm_info(&id)))
}

async fn delete_vm(State(d): State<AppState>, p: Result<Path<String>, PathRejection>) -> Response {
    match vm_id(p).and_then(|id| d.delete_vm(&id)) {
        Ok((status, info)) => json(status, &info),
        Err(f) => f.into_response(),
    }
}

async fn patch_vm_memory(
    State(d): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = vm_id(p).and_then(|id| {
        let patch: MemoryPatch = parse_json(body)?;
        d.patch_memory(&id, patch)
    });
    answer(StatusCode::OK, r)
}

async fn get_host_memory(State(d): State<AppState>) -> Response {
    json(StatusCode::OK, &d.registry().host_view())
}

async fn put_host_memory(
    State(d): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = parse_json::<HostUpdate>(body).and_then(|u| {
        let mut reg = d.registry();
        let new = u
            .apply(&reg.host, reg.guaranteed_mib(None))
            .map_err(|e| match e {
                UpdateError::Invalid(m) => bad_request(m),
                UpdateError::Conflict(m) => conflict(m),
            })?;
        d.save_host_settings(new)?;
        if new != reg.host {
            log::info!(
                "host: budget {} MiB, tick {} ms, params {:?}",
                new.budget_mib,
                new.tick_ms,
                new.params
            );
        }
        reg.host = new;
        Ok(reg.host_view())
    });
    answer(StatusCode::OK, r)
}

async fn get_metrics(State(d): State<AppState>) -> Response {
    let snap = api::MetricsSnapshot {
        families: d.metric_families(),
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, api::metrics::PROMETHEUS_CONTENT_TYPE)],
        api::metrics::render(&snap, &[]),
    )
        .into_response()
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

/// Counts every answer by method, route and status, and logs it at debug level.
async fn record(State(d): State<AppState>, req: Request, next: Next) -> Response {
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "other",
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .and_then(|m| routes().iter().find(|(_, p)| *p == m.as_str()))
        .map_or("unmatched", |(_, p)| *p);
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    d.metrics.request(method, route, resp.status().as_u16());
    log::debug!("API {method} {path} -> {}", resp.status().as_u16());
    resp
}

/// A router and the record of what it routes.
struct RouteTable {
    router: Router<AppState>,
    table: Vec<(Method, &'static str)>,
}

impl RouteTable {
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
    RouteTable {
        router: Router::new(),
        table: Vec::new(),
    }
    .add(Method::GET, "/", get_root)
    .add(Method::GET, "/vms", list_vms)
    .add(Method::POST, "/vms", create_vm)
    .add(Method::GET, "/vms/{id}", get_vm)
    .add(Method::DELETE, "/vms/{id}", delete_vm)
    .add(Method::PATCH, "/vms/{id}/memory", patch_vm_memory)
    .add(Method::GET, "/host/memory", get_host_memory)
    .add(Method::PUT, "/host/memory", put_host_memory)
    .add(Method::GET, "/metrics", get_metrics)
}

/// Every (method, path) the router serves, in registration order.
pub fn routes() -> &'static [(Method, &'static str)] {
    static ROUTES: OnceLock<Vec<(Method, &'static str)>> = OnceLock::new();
    ROUTES.get_or_init(|| table().table)
}

/// The daemon's router.
pub fn router(d: Arc<Daemon>) -> Router {
    table()
        .router
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(d.clone(), record))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(d)
}
