//! The bridge between the API thread and the VMM thread: typed requests and their reply channel.
//!
//! The server turns each HTTP request into an [`ApiRequest`], wraps it in an [`ApiMessage`] with a
//! one-shot reply channel, sends it over a `std::sync::mpsc::Sender<ApiMessage>` and calls the
//! wake-up callback (the VMM's eventfd). The VMM thread drains the receiver when woken and answers
//! each message exactly once with [`ApiMessage::respond`]. Nothing here blocks the VMM thread:
//! answering never waits, and a client that has gone away is simply not told.

use std::fmt;

use tokio::sync::oneshot;

use crate::requests::{
    ActionType, BalloonConfig, BalloonStatsUpdate, BalloonUpdate, BootSourceConfig,
    HotplugMemoryConfig, HotplugMemoryUpdate, MachineConfig, MemoryQuery, ResizeRequest,
};
use crate::responses::{
    BalloonState, BalloonStats, HotplugMemoryState, InstanceInfo, MemoryMap, MetricsSnapshot,
    ResizeStatus,
};

/// A request for the VMM, already parsed and validated (ranges only: state rules are the VMM's).
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    /// `GET /` -> [`ApiResponse::InstanceInfo`].
    GetInstanceInfo,
    /// `PUT /boot-source` -> [`ApiResponse::Empty`]. Before start only.
    PutBootSource(BootSourceConfig),
    /// `PUT /machine-config` -> `Empty`. Before start only.
    PutMachineConfig(MachineConfig),
    /// `PUT /actions` -> `Empty`.
    Action(ActionType),
    /// `PUT /balloon` -> `Empty`. Before start only.
    PutBalloon(BalloonConfig),
    /// `PATCH /balloon` -> `Empty`. Needs a balloon.
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon` -> [`ApiResponse::Balloon`].
    GetBalloon,
    /// `GET /balloon/statistics` -> [`ApiResponse::BalloonStats`].
    GetBalloonStats,
    /// `PATCH /balloon/statistics` -> `Empty`.
    PatchBalloonStats(BalloonStatsUpdate),
    /// `PUT /hotplug/memory` -> `Empty`. Before start only.
    PutHotplugMemory(HotplugMemoryConfig),
    /// `PATCH /hotplug/memory` -> `Empty`.
    PatchHotplugMemory(HotplugMemoryUpdate),
    /// `GET /hotplug/memory` -> [`ApiResponse::HotplugMemory`].
    GetHotplugMemory,
    /// `PUT /vm/resize` -> `Empty`.
    PutResize(ResizeRequest),
    /// `GET /vm/resize` -> [`ApiResponse::Resize`].
    GetResize,
    /// `GET /vm/memory` -> [`ApiResponse::Memory`].
    GetMemory(MemoryQuery),
    /// `GET /metrics` -> [`ApiResponse::Metrics`].
    GetMetrics,
}

/// The shape of answer a request expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseKind {
    /// No body; HTTP 204.
    Empty,
    /// [`ApiResponse::InstanceInfo`].
    InstanceInfo,
    /// [`ApiResponse::Balloon`].
    Balloon,
    /// [`ApiResponse::BalloonStats`].
    BalloonStats,
    /// [`ApiResponse::HotplugMemory`].
    HotplugMemory,
    /// [`ApiResponse::Resize`].
    Resize,
    /// [`ApiResponse::Memory`].
    Memory,
    /// [`ApiResponse::Metrics`].
    Metrics,
}

impl ApiRequest {
    /// The [`ApiResponse`] variant the server expects for this request; any other is a VMM bug
    /// and answered with 500.
    pub fn expected_response(&self) -> ResponseKind {
        match self {
            Self::GetInstanceInfo => ResponseKind::InstanceInfo,
            Self::GetBalloon => ResponseKind::Balloon,
            Self::GetBalloonStats => ResponseKind::BalloonStats,
            Self::GetHotplugMemory => ResponseKind::HotplugMemory,
            Self::GetResize => ResponseKind::Resize,
            Self::GetMemory(_) => ResponseKind::Memory,
            Self::GetMetrics => ResponseKind::Metrics,
            Self::PutBootSource(_)
            | Self::PutMachineConfig(_)
            | Self::Action(_)
            | Self::PutBalloon(_)
            | Self::PatchBalloon(_)
            | Self::PatchBalloonStats(_)
            | Self::PutHotplugMemory(_)
            | Self::PatchHotplugMemory(_)
            | Self::PutResize(_) => ResponseKind::Empty,
        }
    }
}

/// The VMM's answer to a request that it accepted.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiResponse {
    /// Done; HTTP 204.
    Empty,
    /// `GET /`.
    InstanceInfo(InstanceInfo),
    /// `GET /balloon`.
    Balloon(BalloonState),
    /// `GET /balloon/statistics`.
    BalloonStats(BalloonStats),
    /// `GET /hotplug/memory`.
    HotplugMemory(HotplugMemoryState),
    /// `GET /vm/resize`.
    Resize(ResizeStatus),
    /// `GET /vm/memory`.
    Memory(MemoryMap),
    /// `GET /metrics`: the VMM's families; the server adds its own.
    Metrics(MetricsSnapshot),
}

impl ApiResponse {
    /// The shape of this answer, to check it against [`ApiRequest::expected_response`].
    pub fn kind(&self) -> ResponseKind {
        match self {
            Self::Empty => ResponseKind::Empty,
            Self::InstanceInfo(_) => ResponseKind::InstanceInfo,
            Self::Balloon(_) => ResponseKind::Balloon,
            Self::BalloonStats(_) => ResponseKind::BalloonStats,
            Self::HotplugMemory(_) => ResponseKind::HotplugMemory,
            Self::Resize(_) => ResponseKind::Resize,
            Self::Memory(_) => ResponseKind::Memory,
            Self::Metrics(_) => ResponseKind::Metrics,
        }
    }
}

/// How the VMM refuses a request; mapped to an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    /// 400: the values are wrong for this VM (e.g. a balloon larger than its memory).
    BadRequest,
    /// 404: the thing asked about does not exist (e.g. `GET /balloon` without a balloon).
    NotFound,
    /// 409: the VM's state forbids it now (e.g. `PUT /machine-config` after `InstanceStart`).
    Conflict,
    /// 500: the VMM failed (an ioctl, an allocation). Not the client's fault.
    Internal,
}

/// A refusal from the VMM, with a message for `fault_message` that says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// Which HTTP status the refusal maps to.
    pub kind: ApiErrorKind,
    /// What was wrong, for `fault_message`.
    pub message: String,
}

impl ApiError {
    /// A refusal of `kind` saying `message`.
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    /// 400: the values are wrong for this VM.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::BadRequest, message)
    }
    /// 404: the thing asked about does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::NotFound, message)
    }
    /// 409: the VM's state forbids it now.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Conflict, message)
    }
    /// 500: the VMM failed; not the client's fault.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Internal, message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

/// The VMM's answer.
pub type ApiResult = Result<ApiResponse, ApiError>;

/// Where the VMM sends its answer; one use.
#[derive(Debug)]
pub struct Responder(oneshot::Sender<ApiResult>);

impl Responder {
    /// Answers the request. Never blocks; if the client has gone (it timed out or hung up) the
    /// answer is dropped.
    pub fn respond(self, result: ApiResult) {
        let _ = self.0.send(result);
    }

    /// True when nobody waits for the answer any more: the server gave up on it (timeout) or
    /// shut down. A VMM may skip such a request; the client was told its outcome is unknown.
    pub fn is_abandoned(&self) -> bool {
        self.0.is_closed()
    }
}

/// The receiving end of a reply, for code that builds [`ApiMessage`]s itself (tests, tools).
#[derive(Debug)]
pub struct ReplyReceiver(oneshot::Receiver<ApiResult>);

impl ReplyReceiver {
    /// Waits for the answer, from a thread that is not inside a tokio runtime. `None` when the
    /// message was dropped unanswered.
    pub fn recv_blocking(self) -> Option<ApiResult> {
        self.0.blocking_recv().ok()
    }

    /// Waits for the answer from async code.
    pub async fn recv(self) -> Option<ApiResult> {
        self.0.await.ok()
    }
}

/// Answers read-only requests on the API thread, from state the VMM shares with it, without the
/// hop to the VMM thread and back.
///
/// Why: under many clients the hop (channel send, eventfd wake-up, a context switch each way) is
/// most of a GET's latency and tail, and every GET that takes it also takes a turn of the VMM
/// thread away from the devices. Reads of a few numbers the devices already keep behind their
/// own locks need neither.
///
/// Rules for an implementation: never block (take locks with `try_lock` and hold them only to
/// copy values out), and answer exactly what the VMM thread would answer for the same request.
/// Mutating requests always go to the VMM thread, which applies them before it answers, so a GET
/// after a successful PATCH sees the change.
pub trait DirectReads: Send + Sync {
    /// `Some(answer)` to answer `request` here and now; `None` to send it to the VMM thread as
    /// usual (a request this reader does not serve, or state that is busy this instant).
    fn read(&self, request: &ApiRequest) -> Option<ApiResult>;
}

/// One request on its way to the VMM thread, with its reply channel.
#[derive(Debug)]
pub struct ApiMessage {
    /// What the client asked for, validated.
    pub request: ApiRequest,
    /// Where the VMM thread sends its answer.
    pub responder: Responder,
}

impl ApiMessage {
    /// A message and the receiver of its answer.
    pub fn new(request: ApiRequest) -> (Self, ReplyReceiver) {
        let (tx, rx) = oneshot::channel();
        (
            Self {
                request,
                responder: Responder(tx),
            },
            ReplyReceiver(rx),
        )
    }

    /// Answers this message.
    pub fn respond(self, result: ApiResult) {
        self.responder.respond(result)
    }

    /// See [`Responder::is_abandoned`].
    pub fn is_abandoned(&self) -> bool {
        self.responder.is_abandoned()
    }

    /// Splits off the request, for a VMM that answers later (after a device event).
    pub fn into_parts(self) -> (ApiRequest, Responder) {
        (self.request, self.responder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_reaches_the_receiver() {
        let (msg, rx) = ApiMessage::new(ApiRequest::GetBalloon);
        assert!(!msg.is_abandoned());
        std::thread::spawn(move || msg.respond(Err(ApiError::not_found("no balloon"))));
        let got = rx.recv_blocking().unwrap();
        assert_eq!(got, Err(ApiError::not_found("no balloon")));
    }

    #[test]
    fn dropped_receiver_marks_abandoned() {
        let (msg, rx) = ApiMessage::new(ApiRequest::GetMetrics);
        drop(rx);
        assert!(msg.is_abandoned());
        msg.respond(Ok(ApiResponse::Empty)); // must not panic
    }

    #[test]
    fn unanswered_message_is_none() {
        let (msg, rx) = ApiMessage::new(ApiRequest::GetResize);
        drop(msg);
        assert!(rx.recv_blocking().is_none());
    }
}
