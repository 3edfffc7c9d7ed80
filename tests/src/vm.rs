//! One VMM process and its guest: console and stderr lines, typing into the console, commands
//! in the guest, signals, exit status, RSS and the REST API.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::agent::agent_call;
use crate::hostfiles::HostFiles;
use crate::proto::{Event, Request};
use crate::supervisor::Proc;
use crate::{http, Error, Exit, MAX_LINES, TAIL_LINES};

/// One VMM process and its guest. Dropping it kills the VMM.
pub struct Vm {
    pub(crate) shared: Arc<Shared>,
    pub(crate) backend: Backend,
    pub(crate) api_socket: Mutex<Option<String>>,
    /// Index (in all console lines ever seen) after the last line `wait_for` matched.
    pub(crate) cursor: Mutex<u64>,
    pub(crate) run_seq: AtomicU64,
    pub(crate) argv: Vec<String>,
    /// Nested mode: the test host, to report on when the VMM does not die.
    pub(crate) host: Option<Arc<HostFiles>>,
}

pub(crate) enum Backend {
    Local(Arc<Proc>),
    Remote {
        addr: SocketAddr,
        id: u64,
        /// The event stream; closing it makes the agent kill the VMM.
        conn: TcpStream,
    },
}

#[derive(Default)]
pub(crate) struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    console: VecDeque<String>,
    /// Console lines dropped from the front of `console`.
    dropped: u64,
    stderr: VecDeque<String>,
    exit: Option<Exit>,
    /// Why events stopped without an exit (the test host went away).
    lost: Option<String>,
}

impl Shared {
    pub(crate) fn push(&self, ev: Event) {
        let mut s = self.state.lock().unwrap();
        match ev {
            Event::Out { line } => {
                if s.console.len() >= MAX_LINES {
                    s.console.pop_front();
                    s.dropped += 1;
                }
                s.console.push_back(clean_line(&line));
            }
            Event::Err { line } => {
                if s.stderr.len() >= MAX_LINES {
                    s.stderr.pop_front();
                }
                s.stderr.push_back(clean_line(&line));
            }
            Event::Exit { exit } => s.exit = Some(exit),
        }
        drop(s);
        self.changed.notify_all();
    }

    pub(crate) fn lost(&self, why: String) {
        let mut s = self.state.lock().unwrap();
        if s.exit.is_none() {
            s.lost = Some(why);
        }
        drop(s);
        self.changed.notify_all();
    }
}

impl State {
    fn tail(&self) -> String {
        let mut t = String::from("--- console tail ---\n");
        let skip = self.console.len().saturating_sub(TAIL_LINES);
        for l in self.console.iter().skip(skip) {
            t.push_str(l);
            t.push('\n');
        }
        t.push_str("--- VMM stderr tail ---\n");
        let skip = self.stderr.len().saturating_sub(TAIL_LINES);
        for l in self.stderr.iter().skip(skip) {
            t.push_str(l);
            t.push('\n');
        }
        if let Some(why) = &self.lost {
            t.push_str(&format!(
                "--- connection to the test host lost: {why} ---\n"
            ));
        }
        t
    }
}

/// Removes terminal escape sequences (busybox's shell asks for the cursor position) and CRs.
fn clean_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // Parameters and intermediates, then one final byte in '@'..='~'.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

impl Vm {
    /// Waits for a console line containing `needle`, looking only at lines after the previous
    /// match (like `expect`), and returns it. The error shows the console and VMM stderr tails.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, Error> {
        let mut cursor = self.cursor.lock().unwrap();
        let (line, at) = self.wait_line(*cursor, timeout, needle, |l| l.contains(needle))?;
        *cursor = at + 1;
        Ok(line)
    }

    /// Waits for a line after index `from` satisfying `pred`; returns it and its index.
    fn wait_line(
        &self,
        from: u64,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(String, u64), Error> {
        let mut next = from;
        self.wait_state(
            timeout,
            || format!("{what:?} on the console of `{}`", self.argv.join(" ")),
            |s| {
                let first = s.dropped;
                next = next.max(first);
                while next < first + s.console.len() as u64 {
                    let l = &s.console[(next - first) as usize];
                    if pred(l) {
                        return Some(Ok((l.clone(), next)));
                    }
                    next += 1;
                }
                s.exit.map(|exit| {
                    Err(Error::Exited {
                        what: format!("{what:?}"),
                        exit,
                        tail: s.tail(),
                    })
                })
            },
        )
    }

    /// Waits on the shared state until `step` gives a result; past `timeout`, or when the agent's
    /// connection was lost, a timeout error naming `what()`.
    fn wait_state<R>(
        &self,
        timeout: Duration,
        what: impl Fn() -> String,
        mut step: impl FnMut(&State) -> Option<Result<R, Error>>,
    ) -> Result<R, Error> {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.state.lock().unwrap();
        loop {
            if let Some(result) = step(&s) {
                return result;
            }
            let now = Instant::now();
            if now >= deadline || s.lost.is_some() {
                return Err(Error::Timeout {
                    what: what(),
                    waited: timeout,
                    tail: s.tail(),
                });
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// The whole console so far (oldest lines may have been dropped past 100 000).
    pub fn console(&self) -> String {
        let s = self.shared.state.lock().unwrap();
        let mut out = String::new();
        for l in &s.console {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// The VMM's seccomp messages so far (`vmm: seccomp...`): a thread made a system call its
    /// filter does not allow. Empty in a passing run.
    pub fn seccomp_lines(&self) -> Vec<String> {
        self.stderr()
            .lines()
            .filter(|l| l.contains("vmm: seccomp"))
            .map(String::from)
            .collect()
    }

    /// The VMM's own stderr so far.
    pub fn stderr(&self) -> String {
        let s = self.shared.state.lock().unwrap();
        s.stderr.iter().map(|l| format!("{l}\n")).collect()
    }

    /// The first console line starting with `prefix`, anywhere in the console so far.
    pub fn find_line(&self, prefix: &str) -> Option<String> {
        let s = self.shared.state.lock().unwrap();
        s.console.iter().find(|l| l.starts_with(prefix)).cloned()
    }

    /// The value of the first `KEY=value` console line (the guest prints GUEST-NPROC=2 etc.).
    pub fn console_value(&self, key: &str) -> Option<String> {
        self.find_line(&format!("{key}="))
            .map(|l| l[key.len() + 1..].trim().to_string())
    }

    /// Types `text` on the guest's serial console (the VMM's stdin).
    pub fn send_console(&self, text: &str) {
        let r = match &self.backend {
            Backend::Local(p) => p.write_stdin(text.as_bytes()).map_err(Error::from),
            Backend::Remote { addr, id, .. } => agent_call(
                *addr,
                &Request::Stdin {
                    id: *id,
                    data: text.to_string(),
                },
            )
            .map(|_| ()),
        };
        if let Err(e) = r {
            eprintln!("e2e: cannot write to the console: {e}");
        }
    }

    /// Runs `cmd` in the guest's shell and returns its output (the lines between two markers
    /// the shell echoes; the typed command itself is not part of it). Fails when the command's
    /// status is not 0. Needs the guest at its shell (after VMM-GUEST-READY).
    pub fn run(&self, cmd: &str, timeout: Duration) -> Result<String, Error> {
        let (status, output) = self.run_status(cmd, timeout)?;
        if status != 0 {
            return Err(Error::Command {
                cmd: cmd.to_string(),
                status,
                output,
            });
        }
        Ok(output)
    }

    /// Like [`Vm::run`], but returns the status with the output instead of failing.
    pub fn run_status(&self, cmd: &str, timeout: Duration) -> Result<(i32, String), Error> {
        let n = self.run_seq.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id());
        let begin = format!("E2E-BEGIN-{tag}");
        let end = format!("E2E-END-{tag} ");
        // The empty quotes keep the echoed command line from matching the markers.
        let start = {
            let s = self.shared.state.lock().unwrap();
            s.dropped + s.console.len() as u64
        };
        self.send_console(&format!(
            "echo E2E-BEG''IN-{tag}; {cmd}\necho E2E-EN''D-{tag} $?\n"
        ));
        let (_, b) = self.wait_line(start, timeout, &begin, |l| l.ends_with(&begin))?;
        let (end_line, e) = self.wait_line(b + 1, timeout, &end, |l| l.starts_with(&end))?;
        let status = end_line[end.len()..].trim().parse().unwrap_or(-1);
        let s = self.shared.state.lock().unwrap();
        let first = s.dropped;
        let mut out = String::new();
        for i in (b + 1).max(first)..e {
            let l = &s.console[(i - first) as usize];
            // The echo of the second typed line, when the terminal shows it.
            if l.contains(&format!("E2E-EN''D-{tag}")) {
                continue;
            }
            out.push_str(l);
            out.push('\n');
        }
        drop(s);
        let mut cursor = self.cursor.lock().unwrap();
        *cursor = (*cursor).max(e + 1);
        Ok((status, out))
    }

    /// The VMM process's resident set size (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Result<u64, Error> {
        match &self.backend {
            Backend::Local(p) => Ok(p.rss_kib()?),
            Backend::Remote { addr, id, .. } => agent_call(*addr, &Request::Rss { id: *id })?
                .kib
                .ok_or_else(|| Error::Agent("no kib in reply".into())),
        }
    }

    /// Sends signal `sig` (e.g. `libc::SIGTERM`) to the VMM.
    pub fn signal(&self, sig: i32) {
        let r = match &self.backend {
            Backend::Local(p) => p.signal(sig).map_err(Error::from),
            Backend::Remote { addr, id, .. } => {
                agent_call(*addr, &Request::Signal { id: *id, sig }).map(|_| ())
            }
        };
        if let Err(e) = r {
            eprintln!("e2e: cannot send signal {sig}: {e}");
        }
    }

    /// Waits for the VMM to end; returns its exit code, or 128 + the signal that killed it.
    pub fn wait_exit(&self, timeout: Duration) -> Result<i32, Error> {
        self.wait_exit_status(timeout).map(Exit::as_status)
    }

    /// Waits for the VMM to end; returns how it ended.
    pub fn wait_exit_status(&self, timeout: Duration) -> Result<Exit, Error> {
        self.wait_state(
            timeout,
            || format!("`{}` to exit", self.argv.join(" ")),
            |s| s.exit.map(Ok),
        )
    }

    /// Has the VMM ended?
    pub fn exit_status(&self) -> Option<Exit> {
        self.shared.state.lock().unwrap().exit
    }

    /// Uses `path` (where the VMM runs) as the API socket for [`Vm::api`].
    pub fn set_api_socket(&self, path: &str) {
        *self.api_socket.lock().unwrap() = Some(path.to_string());
    }

    /// One HTTP request to the VMM's REST API; returns the status code and body.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), Error> {
        let socket = self.api_socket.lock().unwrap().clone().ok_or_else(|| {
            Error::Agent("no API socket: pass --api-sock PATH or call set_api_socket".into())
        })?;
        match &self.backend {
            Backend::Local(_) => Ok(http::request(
                &socket,
                method,
                path,
                body,
                Duration::from_secs(60),
            )?),
            Backend::Remote { addr, .. } => {
                let r = agent_call(
                    *addr,
                    &Request::Http {
                        socket,
                        method: method.into(),
                        path: path.into(),
                        body: body.map(str::to_string),
                    },
                )?;
                Ok((r.status.unwrap_or(0), r.body.unwrap_or_default()))
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            self.signal(libc::SIGKILL);
            if self.wait_exit_status(Duration::from_secs(10)).is_err() {
                // The next test's VMM would fail to start on a wedged test host; this is where
                // the wedge began.
                if let Some(h) = &self.host {
                    eprintln!(
                        "e2e: the VMM had not ended 10 s after SIGKILL; the test host's state:\n{}",
                        h.report()
                    );
                }
            }
        }
        if let Backend::Remote { conn, .. } = &self.backend {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        // A system call missing from a seccomp filter fails the test that hit it, in every
        // mode: `on` ended the VMM (exit 70), `log` let it go on but said so.
        let lines = self.seccomp_lines();
        if !lines.is_empty() && !std::thread::panicking() {
            panic!(
                "the VMM made system calls outside its seccomp filters:\n{}",
                lines.join("\n")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_line_drops_escapes_and_carriage_returns() {
        assert_eq!(
            clean_line("guest# \u{1b}[6nGUEST-NPROC=2\r"),
            "guest# GUEST-NPROC=2"
        );
        assert_eq!(clean_line("\u{1b}[1m\u{1b}[31mERROR\u{1b}[0m x"), "ERROR x");
        assert_eq!(clean_line("plain"), "plain");
    }

    #[test]
    fn wait_for_consumes_and_reports_the_tail() {
        let vm_shared = Arc::new(Shared::default());
        for l in ["a", "MARK 1", "b", "MARK 2"] {
            vm_shared.push(Event::Out { line: l.into() });
        }
        let vm = Vm {
            shared: vm_shared.clone(),
            backend: Backend::Local(Proc::spawn(&["true".to_string()], |_| {}).unwrap()),
            api_socket: Mutex::new(None),
            cursor: Mutex::new(0),
            run_seq: AtomicU64::new(0),
            argv: vec!["fake".into()],
            host: None,
        };
        let t = Duration::from_millis(50);
        assert_eq!(vm.wait_for("MARK", t).unwrap(), "MARK 1");
        assert_eq!(vm.wait_for("MARK", t).unwrap(), "MARK 2");
        let err = vm.wait_for("MARK", t).unwrap_err().to_string();
        assert!(err.contains("timed out") && err.contains("MARK 2"), "{err}");
        assert_eq!(vm.console_value("MARK 1"), None);
        vm_shared.push(Event::Out {
            line: "GUEST-NPROC=2".into(),
        });
        assert_eq!(vm.console_value("GUEST-NPROC").as_deref(), Some("2"));
        vm_shared.push(Event::Exit {
            exit: Exit::Code(0),
        });
        assert!(matches!(vm.wait_for("x", t), Err(Error::Exited { .. })));
    }
}
