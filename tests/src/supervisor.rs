//! Local processes with line-streamed output: what the agent does inside the test host, and what
//! the harness does itself in direct mode.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::proto::{Event, Exit};

/// A running (or finished) child process.
pub struct Proc {
    pid: i32,
    stdin: Mutex<Option<ChildStdin>>,
    exited: Arc<AtomicBool>,
}

impl Proc {
    /// Starts `argv` with piped stdin/stdout/stderr; `on_event` receives every output line and,
    /// last, the exit. The child gets SIGKILL if the thread that owns it dies with this process
    /// (PR_SET_PDEATHSIG), so no VMM outlives a crashed test or agent.
    pub fn spawn<F>(argv: &[String], on_event: F) -> io::Result<Arc<Proc>>
    where
        F: Fn(Event) + Send + Sync + 'static,
    {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let on_event = Arc::new(on_event);
        let exited = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        // The owner thread spawns the child and lives exactly as long as it (PDEATHSIG is tied
        // to the spawning thread, not the process).
        let exited2 = exited.clone();
        thread::Builder::new()
            .name(format!("proc-{program}"))
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let stdout = child.stdout.take().expect("piped stdout");
                let stderr = child.stderr.take().expect("piped stderr");
                let _ = tx.send(Ok((child.id() as i32, child.stdin.take())));
                let ev = on_event.clone();
                let err_reader = thread::spawn(move || {
                    for_each_line(stderr, |line| ev(Event::Err { line }));
                });
                let ev = on_event.clone();
                for_each_line(stdout, |line| ev(Event::Out { line }));
                let _ = err_reader.join();
                let exit = match child.wait() {
                    Ok(st) => match (st.code(), st.signal()) {
                        (Some(c), _) => Exit::Code(c),
                        (None, Some(s)) => Exit::Signal(s),
                        _ => Exit::Code(-1),
                    },
                    Err(_) => Exit::Code(-1),
                };
                exited2.store(true, Ordering::SeqCst);
                on_event(Event::Exit { exit });
            })?;
        let (pid, stdin) = rx
            .recv()
            .map_err(|_| io::Error::other("process owner thread died"))??;
        Ok(Arc::new(Proc {
            pid,
            stdin: Mutex::new(stdin),
            exited,
        }))
    }

    /// The child's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the child has exited (its reaper thread saw it).
    pub fn has_exited(&self) -> bool {
        self.exited.load(Ordering::SeqCst)
    }

    /// Writes `data` to the child's stdin; an error once the child closed it.
    pub fn write_stdin(&self, data: &[u8]) -> io::Result<()> {
        let mut guard = self.stdin.lock().unwrap();
        let stdin = guard
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stdin closed"))?;
        stdin.write_all(data)?;
        stdin.flush()
    }

    /// Sends `sig`; a no-op once the process has been reaped (its PID may be reused).
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        if self.has_exited() {
            return Ok(());
        }
        // SAFETY: kill(2) with a PID we own and have not reaped.
        if unsafe { libc::kill(self.pid, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// VmRSS in KiB, from /proc/PID/status.
    pub fn rss_kib(&self) -> io::Result<u64> {
        rss_kib(self.pid)
    }
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: i32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("no VmRSS in /proc/{pid}/status")))
}

/// Calls `f` with each line of `r` (lossy UTF-8, line ending removed) until EOF.
fn for_each_line(r: impl Read, mut f: impl FnMut(String)) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                f(String::from_utf8_lossy(&buf).into_owned());
            }
        }
    }
}

/// Runs `argv` to completion (killed after `timeout`); returns its exit and stdout+stderr.
pub fn exec(argv: &[String], timeout: Duration) -> io::Result<(Exit, String)> {
    let out = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let out2 = out.clone();
    let proc = Proc::spawn(argv, move |ev| match ev {
        Event::Out { line } | Event::Err { line } => {
            let mut o = out2.lock().unwrap();
            o.push_str(&line);
            o.push('\n');
        }
        Event::Exit { exit } => {
            let _ = tx.send(exit);
        }
    })?;
    drop(proc.stdin.lock().unwrap().take());
    let deadline = Instant::now() + timeout;
    let exit = match rx.recv_timeout(timeout) {
        Ok(e) => e,
        Err(_) => {
            let _ = proc.signal(libc::SIGKILL);
            rx.recv_timeout(
                deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5),
            )
            .unwrap_or(Exit::Signal(libc::SIGKILL))
        }
    };
    let text = out.lock().unwrap().clone();
    Ok((exit, text))
}
