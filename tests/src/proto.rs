//! The wire protocol between the harness and `testhost-agent`.
//!
//! One TCP connection per request. The client writes one JSON [`Request`] line; the agent answers
//! with one JSON [`Reply`] line. After a successful [`Request::Spawn`] the connection stays open
//! and carries [`Event`] lines until the process exits; closing it from the client side kills the
//! process (so a crashed test never leaves a VMM running in the test host).

use serde::{Deserialize, Serialize};

/// The port the agent listens on inside the test host.
pub const AGENT_PORT: u16 = 7000;

/// One request from the harness to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent up, and is /dev/kvm there?
    Ping,
    /// Start a process; stream its output on this connection.
    Spawn {
        /// Program and arguments.
        argv: Vec<String>,
    },
    /// Write to a spawned process's stdin.
    Stdin {
        /// The process, as `Spawn` numbered it.
        id: u64,
        /// Bytes to write, as text.
        data: String,
    },
    /// Send a signal to a spawned process.
    Signal {
        /// The process.
        id: u64,
        /// The signal number.
        sig: i32,
    },
    /// VmRSS of a spawned process, from /proc/PID/status.
    Rss {
        /// The process.
        id: u64,
    },
    /// Run a command to completion (for dmesg, ls, ...).
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
        /// Kill it after this long.
        timeout_ms: u64,
    },
    /// One HTTP/1.1 request to a Unix socket in the test host.
    Http {
        /// The socket's path in the test host.
        socket: String,
        /// HTTP method.
        method: String,
        /// Path and query.
        path: String,
        /// Request body, if any.
        body: Option<String>,
    },
}

/// The agent's answer to one request; the fields the request kind fills are set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `Spawn`: the new process's id, for later requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// `Ping`: whether /dev/kvm opens in the test host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm: Option<bool>,
    /// `Rss`: VmRSS in KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kib: Option<u64>,
    /// `Exec`: how the command ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<Exit>,
    /// `Exec`: what it printed on stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// `Http`: the status code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// `Http`: the response body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

impl Reply {
    /// A success with no data.
    pub fn ok() -> Self {
        Reply {
            ok: true,
            ..Default::default()
        }
    }
    /// A failure saying `msg`.
    pub fn err(msg: impl Into<String>) -> Self {
        Reply {
            ok: false,
            error: Some(msg.into()),
            ..Default::default()
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exit {
    /// exit(code)
    Code(i32),
    /// killed by this signal
    Signal(i32),
}

impl Exit {
    /// The shell's convention: the code, or 128 + the signal number.
    pub fn as_status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// What a spawned process produced, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// A line on stdout (the guest's serial console), without the line ending.
    Out {
        /// The line.
        line: String,
    },
    /// A line on stderr (the VMM's own messages).
    Err {
        /// The line.
        line: String,
    },
    /// The process ended; no events follow.
    Exit {
        /// How it ended.
        exit: Exit,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_lines_round_trip() {
        let ev = Event::Exit {
            exit: Exit::Signal(15),
        };
        let line = serde_json::to_string(&ev).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), ev);
        let req = Request::Spawn {
            argv: vec!["vmm".into(), "--balloon".into(), String::new()],
        };
        let line = serde_json::to_string(&req).unwrap();
        assert!(line.starts_with(r#"{"op":"spawn""#), "{line}");
        match serde_json::from_str::<Request>(&line).unwrap() {
            Request::Spawn { argv } => assert_eq!(argv[2], ""),
            other => panic!("{other:?}"),
        }
        assert_eq!(Exit::Signal(15).as_status(), 143);
        assert_eq!(Exit::Code(0).as_status(), 0);
    }
}
