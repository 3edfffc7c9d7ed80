//! testhost-agent: runs inside the nested test host and lets the harness outside start VMM
//! processes, stream their console, type into it, signal them, read their RSS and reach their
//! REST API socket. The protocol is in `e2e::proto`; one TCP connection per request.
//!
//! Usage: testhost-agent [--listen ADDR:PORT]     (default 0.0.0.0:7000)

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use e2e::proto::{Event, Reply, Request, AGENT_PORT};
use e2e::supervisor::{self, Proc};

#[derive(Default)]
struct Agent {
    next_id: AtomicU64,
    procs: Mutex<HashMap<u64, Arc<Proc>>>,
}

fn main() {
    let mut listen = format!("0.0.0.0:{AGENT_PORT}");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().expect("--listen needs ADDR:PORT"),
            _ => {
                eprintln!("usage: testhost-agent [--listen ADDR:PORT]");
                std::process::exit(2);
            }
        }
    }
    let listener = TcpListener::bind(&listen).unwrap_or_else(|e| {
        eprintln!("testhost-agent: cannot listen on {listen}: {e}");
        std::process::exit(1);
    });
    eprintln!("testhost-agent: listening on {listen}");
    let agent = Arc::new(Agent::default());
    for conn in listener.incoming().flatten() {
        let agent = agent.clone();
        thread::spawn(move || {
            if let Err(e) = agent.serve(conn) {
                eprintln!("testhost-agent: connection: {e}");
            }
        });
    }
}

impl Agent {
    fn serve(self: Arc<Self>, conn: TcpStream) -> std::io::Result<()> {
        conn.set_nodelay(true)?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => return send(&conn, &Reply::err(format!("bad request {line:?}: {e}"))),
        };
        match req {
            Request::Spawn { argv } => self.spawn(argv, conn, reader),
            other => send(&conn, &self.handle(other)),
        }
    }

    fn proc(&self, id: u64) -> Result<Arc<Proc>, Reply> {
        self.procs
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .ok_or_else(|| Reply::err(format!("no process with id {id}")))
    }

    fn handle(&self, req: Request) -> Reply {
        let result = match req {
            Request::Ping => Ok(Reply {
                kvm: Some(std::path::Path::new("/dev/kvm").exists()),
                ..Reply::ok()
            }),
            Request::Stdin { id, data } => self
                .proc(id)
                .and_then(|p| {
                    p.write_stdin(data.as_bytes())
                        .map_err(|e| Reply::err(e.to_string()))
                })
                .map(|_| Reply::ok()),
            Request::Signal { id, sig } => self
                .proc(id)
                .and_then(|p| p.signal(sig).map_err(|e| Reply::err(e.to_string())))
                .map(|_| Reply::ok()),
            Request::Rss { id } => self.proc(id).and_then(|p| {
                p.rss_kib()
                    .map(|kib| Reply {
                        kib: Some(kib),
                        ..Reply::ok()
                    })
                    .map_err(|e| Reply::err(e.to_string()))
            }),
            Request::Exec { argv, timeout_ms } => {
                supervisor::exec(&argv, Duration::from_millis(timeout_ms))
                    .map(|(exit, out)| Reply {
                        exit: Some(exit),
                        stdout: Some(out),
                        ..Reply::ok()
                    })
                    .map_err(|e| Reply::err(format!("{argv:?}: {e}")))
            }
            Request::Http {
                socket,
                method,
                path,
                body,
            } => e2e::http::request(
                &socket,
                &method,
                &path,
                body.as_deref(),
                Duration::from_secs(60),
            )
            .map(|(status, body)| Reply {
                status: Some(status),
                body: Some(body),
                ..Reply::ok()
            })
            .map_err(|e| Reply::err(format!("{method} {path} on {socket}: {e}"))),
            Request::Spawn { .. } => unreachable!("handled by serve"),
        };
        result.unwrap_or_else(|r| r)
    }

    /// Starts the process and streams its events on `conn` until it exits. If the client goes
    /// away first, the process is killed.
    fn spawn(
        self: Arc<Self>,
        argv: Vec<String>,
        conn: TcpStream,
        mut reader: BufReader<TcpStream>,
    ) -> std::io::Result<()> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst) + 1;
        let out = Arc::new(Mutex::new(conn.try_clone()?));
        let out2 = out.clone();
        let agent = self.clone();
        // Held until the reply is written, so no event can overtake it.
        let mut w = out.lock().unwrap();
        let proc = Proc::spawn(&argv, move |ev| {
            let done = matches!(ev, Event::Exit { .. });
            let mut line = serde_json::to_string(&ev).expect("events serialize");
            line.push('\n');
            let _ = out2.lock().unwrap().write_all(line.as_bytes());
            if done {
                agent.procs.lock().unwrap().remove(&id);
                let _ = out2.lock().unwrap().shutdown(std::net::Shutdown::Write);
            }
        });
        let proc = match proc {
            Ok(p) => p,
            Err(e) => {
                drop(w);
                return send(&conn, &Reply::err(format!("cannot start {argv:?}: {e}")));
            }
        };
        eprintln!(
            "testhost-agent: started {id} (pid {}): {argv:?}",
            proc.pid()
        );
        self.procs.lock().unwrap().insert(id, proc.clone());
        let mut line = serde_json::to_string(&Reply {
            id: Some(id),
            ..Reply::ok()
        })?;
        line.push('\n');
        w.write_all(line.as_bytes())?;
        drop(w);
        // The client never writes more on this connection; EOF means it is gone.
        let mut sink = [0u8; 64];
        while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
        if !proc.has_exited() {
            eprintln!("testhost-agent: client of {id} went away; killing it");
            let _ = proc.signal(libc::SIGKILL);
        }
        Ok(())
    }
}

fn send(mut conn: &TcpStream, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_string(reply)?;
    line.push('\n');
    conn.write_all(line.as_bytes())
}
