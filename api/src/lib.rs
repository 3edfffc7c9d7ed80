//! REST API of the VMM: typed requests and responses, the HTTP server on a Unix socket,
//! and the bridge that carries requests to the VMM thread. No KVM in here.
//!
//! How the VMM uses it:
//!
//! ```no_run
//! use std::sync::{mpsc, Arc};
//! use api::{spawn_server, ApiError, ApiRequest, ApiResponse, ServerConfig};
//!
//! let (tx, rx) = mpsc::channel();
//! let wake = Arc::new(|| { /* write the VMM's eventfd */ });
//! let server = spawn_server(ServerConfig::new("/run/vmm.sock"), tx, wake).unwrap();
//! // On the VMM thread, when the eventfd fires:
//! while let Ok(msg) = rx.try_recv() {
//!     let answer = match &msg.request {
//!         ApiRequest::GetBalloon => Err(ApiError::not_found("no balloon configured")),
//!         _ => Ok(ApiResponse::Empty),
//!     };
//!     msg.respond(answer);
//! }
//! server.shutdown().unwrap();
//! ```
//!
//! Layout: [`requests`] (what clients send, with validation), [`responses`] (what the VMM fills),
//! [`bridge`] (the channel messages), [`server`] (sockets, thread, shutdown), [`mod@routes`] (HTTP <->
//! bridge), [`metrics`] (Prometheus text), [`client`] (a small client over the Unix socket, used by
//! `vmmctl` and `api-bench`), [`rules`] (every limit and its message, shared with the VMM's
//! command line).

pub mod bridge;
pub mod client;
mod conn;
pub mod metrics;
pub mod requests;
pub mod responses;
pub mod routes;
pub mod rules;
pub mod server;

pub use bridge::{
    ApiError, ApiErrorKind, ApiMessage, ApiRequest, ApiResponse, ApiResult, DirectReads,
    ReplyReceiver, Responder, ResponseKind,
};
pub use requests::*;
pub use responses::*;
pub use routes::{routes, Fault, FaultBody, WakeFn};
pub use server::{
    bind_server, spawn_server, spawn_server_task, ApiArgs, BoundServer, Error, ServerConfig,
    ServerHandle, ServerTask, SocketFile,
};

/// The OpenAPI document, the contract of this API.
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");
