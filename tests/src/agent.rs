//! Nested mode: the client of `testhost-agent`, booting the test host, and finding the VMM and
//! agent binaries.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::hostfiles::{last_lines, HostFiles};
use crate::proto::{Event, Reply, Request};
use crate::vm::Shared;
use crate::{loud, rundir, Error, TAIL_LINES, TESTHOST_BOOT_TIMEOUT};

// ---- nested mode: the agent client and the test host ----

/// Connects to the agent. QEMU's user-mode network listens for the forwarded port with a
/// backlog of one, so concurrent connections are refused now and then: retry those briefly.
fn agent_connect(addr: SocketAddr) -> Result<TcpStream, Error> {
    let mut tries = 0;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(c) => return Ok(c),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 40 => {
                tries += 1;
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(Error::Agent(format!("connect {addr}: {e}"))),
        }
    }
}

pub(crate) fn agent_call(addr: SocketAddr, req: &Request) -> Result<Reply, Error> {
    let mut conn = agent_connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    conn.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(conn).read_line(&mut reply)?;
    let r: Reply = serde_json::from_str(&reply)
        .map_err(|e| Error::Agent(format!("bad reply {reply:?}: {e}")))?;
    if !r.ok {
        return Err(Error::Agent(r.error.unwrap_or_default()));
    }
    Ok(r)
}

/// Starts a process through the agent; a thread feeds its events to `sink`.
pub(crate) fn agent_spawn(
    addr: SocketAddr,
    argv: &[String],
    sink: Arc<Shared>,
) -> Result<(u64, TcpStream), Error> {
    let mut conn = agent_connect(addr)?;
    let mut line = serde_json::to_string(&Request::Spawn {
        argv: argv.to_vec(),
    })
    .expect("requests serialize");
    line.push('\n');
    conn.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut reply = String::new();
    reader.read_line(&mut reply)?;
    let r: Reply = serde_json::from_str(&reply)
        .map_err(|e| Error::Agent(format!("bad reply {reply:?}: {e}")))?;
    let id = match (r.ok, r.id) {
        (true, Some(id)) => id,
        _ => return Err(Error::Agent(r.error.unwrap_or_else(|| reply.clone()))),
    };
    thread::spawn(move || {
        let mut line = String::new();
        let mut exited = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => match serde_json::from_str::<Event>(&line) {
                    Ok(ev) => {
                        exited |= matches!(ev, Event::Exit { .. });
                        sink.push(ev);
                    }
                    Err(e) => eprintln!("e2e: bad event {line:?}: {e}"),
                },
            }
        }
        if !exited {
            sink.lost("the agent's event stream closed before the VMM exited".into());
        }
    });
    Ok((id, conn))
}

/// Saves the test host kernel's text symbols (about 2 MB, under 2 s) for [`HostFiles::report`].
fn save_kallsyms(addr: SocketAddr, path: &Path) {
    let req = Request::Exec {
        argv: vec![
            "grep".into(),
            "-E".into(),
            "^[0-9a-f]+ [tT] ".into(),
            "/proc/kallsyms".into(),
        ],
        timeout_ms: 30_000,
    };
    let saved = agent_call(addr, &req)
        .map_err(|e| e.to_string())
        .and_then(|r| {
            std::fs::write(path, r.stdout.unwrap_or_default()).map_err(|e| e.to_string())
        });
    if let Err(e) = saved {
        eprintln!("e2e: no test host symbols in {}: {e}", path.display());
    }
}

pub(crate) fn run_script(script: &Path, env: &[(&str, &str)]) -> Result<(), String> {
    let st = Command::new(script)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !st.success() {
        return Err(format!("{} failed ({st})", script.display()));
    }
    Ok(())
}

/// The VMM binary on this machine: $VMM_BIN, or target/release/vmm (built first unless
/// E2E_NO_BUILD is set, so the tests never run a stale VMM).
pub(crate) fn vmm_binary(root: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("VMM_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("VMM_BIN={} is not a file", p.display()))
        };
    }
    let p = root.join("target/release/vmm");
    if std::env::var_os("E2E_NO_BUILD").is_none() {
        loud("e2e: cargo build --release -p vmm");
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "-p", "vmm"])
            .current_dir(root)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !st.success() {
            return Err("cargo build --release -p vmm failed".into());
        }
    }
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "no VMM at {}: run `cargo build --release -p vmm`",
            p.display()
        ))
    }
}

/// The agent built with this test binary (cargo builds the package's binaries for its
/// integration tests): target/<profile>/testhost-agent next to target/<profile>/deps/.
pub(crate) fn agent_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("E2E_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join("testhost-agent");
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    Err(format!(
        "no testhost-agent near {}: run `cargo build -p e2e --bin testhost-agent`",
        exe.display()
    ))
}

/// Boots the test host (resources/testhost.sh) and waits until its agent reports /dev/kvm.
/// QEMU dies with this process: it is started from a thread that lives as long as it does,
/// with PR_SET_PDEATHSIG.
pub(crate) fn boot_testhost(
    root: &Path,
    vmm: Option<&Path>,
    baseline: Option<&Path>,
    agent: &Path,
) -> Result<(SocketAddr, HostFiles), String> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // This run's files, in a directory of their own; earlier runs' files go (see [`rundir`]).
    let dir = rundir::HostDir::create(
        &root.join("build/testhost/runs"),
        &rundir::run_id(),
        &rundir::host_name(),
    )
    .map_err(|e| format!("no directory for the test host's files: {e}"))?;
    let log = dir.path().join("console.log");
    let monitor = dir.path().join("monitor.sock");
    let kallsyms = dir.path().join("kallsyms.txt");
    let mut cmd = Command::new(root.join("resources/testhost.sh"));
    cmd.arg("--port")
        .arg(port.to_string())
        .arg("--log")
        .arg(&log);
    // A Unix socket path has room for 107 bytes; QEMU refuses to start with a longer one.
    if monitor.as_os_str().len() < 108 {
        cmd.arg("--monitor").arg(&monitor);
    } else {
        loud(&format!(
            "e2e: no QEMU monitor for the test host: {} is too long for a socket",
            monitor.display()
        ));
    }
    if let Some(b) = baseline {
        cmd.arg("--vmm-baseline").arg(b);
    }
    cmd.arg("--vmm")
        .arg(vmm.unwrap_or(Path::new("none")))
        .arg("--agent")
        .arg(agent)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    loud(&format!(
        "e2e: booting the nested test host (agent on {addr}, console in {})",
        log.display()
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    thread::Builder::new()
        .name("testhost-qemu".into())
        .spawn(move || match cmd.spawn() {
            Ok(mut child) => {
                let st = child.wait();
                let _ = tx.send(format!("the test host exited ({st:?})"));
            }
            Err(e) => {
                let _ = tx.send(format!("cannot start resources/testhost.sh: {e}"));
            }
        })
        .map_err(|e| e.to_string())?;
    wait_for_agent(addr, &rx, &log)?;
    save_kallsyms(addr, &kallsyms);
    Ok((
        addr,
        HostFiles {
            console: log,
            monitor,
            kallsyms,
            _dir: Some(dir),
        },
    ))
}

/// Waits until the agent at `addr` reports /dev/kvm; `exited` tells when QEMU ended first.
/// Errors carry the end of the console `log`.
fn wait_for_agent(
    addr: SocketAddr,
    exited: &std::sync::mpsc::Receiver<String>,
    log: &Path,
) -> Result<(), String> {
    let started = Instant::now();
    let tail = |log: &Path| {
        last_lines(
            &std::fs::read_to_string(log).unwrap_or_default(),
            TAIL_LINES,
        )
    };
    loop {
        if let Ok(why) = exited.try_recv() {
            return Err(format!("{why}; console tail:\n{}", tail(log)));
        }
        if started.elapsed() > TESTHOST_BOOT_TIMEOUT {
            return Err(format!(
                "the test host's agent did not answer within {TESTHOST_BOOT_TIMEOUT:?}; console tail:\n{}",
                tail(log)
            ));
        }
        match agent_call(addr, &Request::Ping) {
            Ok(r) if r.kvm == Some(true) => return Ok(()),
            Ok(_) => {
                return Err(format!(
                    "the test host has no /dev/kvm (kvm_amd did not load); console tail:\n{}",
                    tail(log)
                ))
            }
            Err(_) => thread::sleep(Duration::from_millis(500)),
        }
    }
}
