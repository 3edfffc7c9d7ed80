//! The HTTP server: its own thread, a single-threaded tokio runtime, a Unix socket and optionally
//! a TCP listener.

use std::ffi::CString;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};

use crate::bridge::{ApiMessage, DirectReads};
use crate::conn::{self, ConnLimits, ConnService, Eviction, JsonHttpErrors, Registry};
use crate::metrics::ApiMetrics;
use crate::routes::{router, Shared, WakeFn};

/// Default largest request body. Our bodies are a few hundred bytes.
pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024;
/// Default time the server waits for the VMM's answer before replying 504.
pub const DEFAULT_VMM_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on requests waiting for the VMM; beyond it the server replies 503.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// Default bound on open connections. At the limit, the connection that has waited longest for
/// its client (idle, or slow to send its request) is closed to make room for a new one.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default time a client has to send a request's headers; also how long an idle keep-alive
/// connection stays open, and how long a client may leave our answer unread.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client has to send a whole request body once its headers arrived (408 after).
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers); larger ones get 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How long shutdown waits for requests in progress after the VMM timeout.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The Unix socket to create (mode 0600).
    pub socket_path: PathBuf,
    /// Also listen on TCP, only when the user names an address. No authentication: use loopback.
    pub tcp_addr: Option<SocketAddr>,
    /// Largest request body; larger ones get 413.
    pub body_limit: usize,
    /// How long a request waits for the VMM before the client gets 504.
    pub vmm_timeout: Duration,
    /// Most requests waiting for the VMM at once; more get 503.
    pub max_in_flight: usize,
    /// Most connections open at once; at the limit the one that waited longest for its client
    /// is closed for a new one.
    pub max_connections: usize,
    /// Time to receive a request's headers; also how long an idle connection stays open.
    pub header_read_timeout: Duration,
    /// Time to receive a request's body once its headers arrived.
    pub body_read_timeout: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    conn: ConnLimits,
    grace: Duration,
}

impl ServerConfig {
    /// A server on the Unix socket at `socket_path` with the default limits and no TCP listener.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket_path: socket_path.into(),
            tcp_addr: None,
            body_limit: DEFAULT_BODY_LIMIT,
            vmm_timeout: DEFAULT_VMM_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
        }
    }
}

/// Longest Unix socket path, in bytes: `sun_path` holds 108 bytes with the terminating NUL.
/// A longer path can be created as a file but no client can connect to it.
pub const MAX_SOCKET_PATH: usize = 107;

/// Refuses a socket path no client could connect to, saying what is allowed.
pub fn check_socket_path(path: &Path) -> Result<(), Error> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::PathTooLong {
            path: path.to_owned(),
            len,
        });
    }
    Ok(())
}

/// clap's parser for `--api-socket`: the length rule at parse time, so the VMM refuses the
/// command line before it starts anything.
fn parse_socket_path(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    match check_socket_path(&path) {
        Ok(()) => Ok(path),
        Err(Error::PathTooLong { len, .. }) => Err(format!(
            "the path is {len} bytes long; a Unix socket path is at most {MAX_SOCKET_PATH} bytes"
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// The VMM's command-line options for the API, to `#[command(flatten)]` into its own clap parser.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// Serve the REST API on this Unix socket (created with mode 0600; at most 107 bytes).
    #[arg(long, value_name = "PATH", value_parser = parse_socket_path)]
    pub api_socket: Option<PathBuf>,
    /// Also serve the API on this TCP address (no authentication: use loopback).
    #[arg(long, value_name = "ADDR", requires = "api_socket")]
    pub api_tcp: Option<SocketAddr>,
    /// Largest request body in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_BODY_LIMIT)]
    pub api_body_limit: usize,
    /// Milliseconds a request waits for the VMM before the client gets 504.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_VMM_TIMEOUT.as_millis() as u64)]
    pub api_timeout_ms: u64,
}

impl ApiArgs {
    /// The server configuration, or `None` when no `--api-socket` was given.
    pub fn server_config(&self) -> Option<ServerConfig> {
        let socket = self.api_socket.as_ref()?;
        let mut cfg = ServerConfig::new(socket);
        cfg.tcp_addr = self.api_tcp;
        cfg.body_limit = self.api_body_limit;
        cfg.vmm_timeout = Duration::from_millis(self.api_timeout_ms);
        Some(cfg)
    }
}

/// Why the server did not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another server answers on the socket path.
    #[error("API socket {0} is in use by a live server")]
    SocketInUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("API socket path {0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    #[error(
        "API socket path {path} is {len} bytes long; a Unix socket path is at most \
         {MAX_SOCKET_PATH} bytes (clients could not connect to it)"
    )]
    /// The path does not fit a Unix socket address.
    PathTooLong {
        /// The path given.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// Binding or linking the Unix socket failed.
    #[error("API socket {path}: {what}: {source}")]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        #[source]
        /// The system's error.
        source: io::Error,
    },
    /// The TCP listener could not bind.
    #[error("API TCP listener on {addr}: {source}")]
    Tcp {
        /// The address asked for.
        addr: SocketAddr,
        #[source]
        /// The system's error.
        source: io::Error,
    },
    /// The server's runtime or thread could not start.
    #[error("cannot start the API runtime or thread: {0}")]
    Runtime(#[source] io::Error),
    /// The server thread panicked; the API stopped.
    #[error("the API server thread panicked")]
    ThreadPanicked,
}

fn socket_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Socket { path, what, source }
}

/// Refuses a path held by a live server or by a non-socket file; removes a stale socket.
fn clear_socket_path(path: &Path) -> Result<(), Error> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(socket_err(path, "cannot inspect the path")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::SocketInUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(socket_err(path, "cannot remove the stale socket"))
        }
        Err(e) => Err(socket_err(path, "cannot probe the existing socket")(e)),
    }
}

/// Binds `path` with mode 0600 and no window in which it is reachable with wider permissions:
/// bind inside a fresh 0700 directory beside it, chmod, then hard-link it into place. `link`
/// (unlike `rename`) fails if the path was taken meanwhile, so two servers started at once on
/// one path cannot silently steal it from each other.
fn bind_private(path: &Path) -> Result<(UnixListener, (u64, u64)), Error> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let parent = socket_dir(path);
    let tmp_dir = parent.join(format!(
        ".api-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp_dir)
        .map_err(socket_err(
            path,
            "cannot create a private directory beside it",
        ))?;
    let tmp_sock = tmp_dir.join("s");
    let result = (|| {
        // The temporary path is longer than `path` when its name is short: reach the directory
        // through /proc/self/fd then, so every path up to MAX_SOCKET_PATH binds.
        let dir = std::fs::File::open(&tmp_dir)
            .map_err(socket_err(path, "cannot open the private directory"))?;
        let bind_at = if tmp_sock.as_os_str().len() <= MAX_SOCKET_PATH {
            tmp_sock.clone()
        } else {
            PathBuf::from(format!("/proc/self/fd/{}/s", dir.as_raw_fd()))
        };
        let listener = UnixListener::bind(&bind_at).map_err(socket_err(path, "cannot bind"))?;
        std::fs::set_permissions(&tmp_sock, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_err(path, "cannot set mode 0600"))?;
        std::fs::hard_link(&tmp_sock, path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Error::SocketInUse(path.to_owned())
            } else {
                socket_err(path, "cannot move into place")(e)
            }
        })?;
        let meta = std::fs::symlink_metadata(path).map_err(socket_err(path, "cannot stat"))?;
        Ok((listener, (meta.dev(), meta.ino())))
    })();
    let _ = std::fs::remove_file(&tmp_sock);
    let _ = std::fs::remove_dir(&tmp_dir);
    result
}

/// The socket file a server created: [`SocketFile::remove`] removes it only while it is still
/// that file (not one another server bound at the same path since). For a process that exits
/// without [`ServerHandle::shutdown`] (a signal, a fatal error).
///
/// It holds its directory open (`O_PATH`), and removes the file relative to it: a process that
/// dropped its privileges after binding still removes its socket when it may write to the
/// socket's directory, even if it may no longer reach that directory by its path.
#[derive(Debug, Clone)]
pub struct SocketFile {
    path: PathBuf,
    /// (device, inode) of the file this server linked into place.
    id: (u64, u64),
    /// The socket's directory, when it could be opened.
    dir: Option<Arc<OwnedFd>>,
}

impl SocketFile {
    fn new(path: PathBuf, id: (u64, u64)) -> Self {
        let dir = open_dir_path(socket_dir(&path)).ok().map(Arc::new);
        Self { path, id, dir }
    }

    /// Where the socket file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still ours; true if it did.
    pub fn remove(&self) -> bool {
        let name = self
            .path
            .file_name()
            .and_then(|n| CString::new(n.as_bytes()).ok());
        let (Some(dir), Some(name)) = (&self.dir, name) else {
            return match std::fs::symlink_metadata(&self.path) {
                Ok(meta) if (meta.dev(), meta.ino()) == self.id => {
                    std::fs::remove_file(&self.path).is_ok()
                }
                _ => false,
            };
        };
        // SAFETY: `st` is plain data the kernel fills; `name` is a NUL-terminated string and
        // `dir` a descriptor we own, both alive for the calls.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            ) != 0
            {
                return false;
            }
            if (st.st_dev, st.st_ino) != self.id {
                return false;
            }
            libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) == 0
        }
    }
}

/// The directory a socket path is in ("." for a bare name).
fn socket_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC)`: a handle to name files relative to.
fn open_dir_path(dir: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a NUL-terminated path alive for the call; the descriptor returned is new
    // and owned by the OwnedFd alone.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A running server. Dropping it shuts it down too; [`ServerHandle::shutdown`] reports errors.
pub struct ServerHandle {
    socket: SocketFile,
    tcp_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("socket_path", &self.socket.path)
            .field("tcp_addr", &self.tcp_addr)
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl ServerHandle {
    /// The Unix socket the server listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket.path
    }

    /// The socket file, to remove on an exit that skips [`ServerHandle::shutdown`].
    pub fn socket_file(&self) -> SocketFile {
        self.socket.clone()
    }

    /// The bound TCP address (with the real port when the config asked for port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// From now on, GETs that `reads` serves are answered on the API thread without the hop
    /// to the VMM thread (see [`DirectReads`]). Set once, when the VM runs; false if a reader
    /// was set already (the first one stays).
    pub fn set_direct_reads(&self, reads: Arc<dyn DirectReads>) -> bool {
        self.shared.direct.set(reads).is_ok()
    }

    /// Removes the socket file if it is still ours (so no new client finds it), stops
    /// accepting, lets requests in progress finish (bounded by the VMM timeout) and joins the
    /// thread.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), Error> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.socket.remove();
        let _ = self.stop.send(true);
        thread.join().map_err(|_| Error::ThreadPanicked)
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Sockets bound and state built, ready to serve.
struct Bound {
    unix: UnixListener,
    tcp: Option<std::net::TcpListener>,
    socket: SocketFile,
    tcp_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    limits: Limits,
}

/// Binds the sockets (so errors come back to the caller) and builds the shared state.
fn bind(cfg: ServerConfig, tx: Sender<ApiMessage>, wake: WakeFn) -> Result<Bound, Error> {
    check_socket_path(&cfg.socket_path)?;
    clear_socket_path(&cfg.socket_path)?;
    let tcp = match cfg.tcp_addr {
        Some(addr) => {
            Some(std::net::TcpListener::bind(addr).map_err(|source| Error::Tcp { addr, source })?)
        }
        None => None,
    };
    let tcp_addr = match &tcp {
        Some(l) => Some(l.local_addr().map_err(|source| Error::Tcp {
            addr: cfg.tcp_addr.expect("tcp listener implies an address"),
            source,
        })?),
        None => None,
    };
    let (unix, socket_id) = bind_private(&cfg.socket_path)?;
    let socket = SocketFile::new(cfg.socket_path.clone(), socket_id);
    let nonblocking = unix.set_nonblocking(true).and_then(|()| match &tcp {
        Some(l) => l.set_nonblocking(true),
        None => Ok(()),
    });
    if let Err(e) = nonblocking {
        socket.remove();
        return Err(Error::Runtime(e));
    }
    let shared = Arc::new(Shared {
        tx,
        wake,
        vmm_timeout: cfg.vmm_timeout,
        body_limit: cfg.body_limit,
        in_flight: Semaphore::new(cfg.max_in_flight.max(1)),
        max_in_flight: cfg.max_in_flight.max(1),
        metrics: ApiMetrics::default(),
        direct: OnceLock::new(),
    });
    let limits = Limits {
        conn: ConnLimits {
            header_timeout: cfg.header_read_timeout,
            body_timeout: cfg.body_read_timeout,
            body_limit: cfg.body_limit,
            max_connections: cfg.max_connections.max(1),
        },
        grace: cfg.vmm_timeout + SHUTDOWN_GRACE,
    };
    if let Some(addr) = tcp_addr.filter(|a| !a.ip().is_loopback()) {
        log::warn!("API on TCP {addr}: not a loopback address, and the API has no authentication");
    }
    log::info!(
        "API listening on {}{}",
        cfg.socket_path.display(),
        tcp_addr
            .map(|a| format!(" and tcp {a}"))
            .unwrap_or_default()
    );
    Ok(Bound {
        unix,
        tcp,
        socket,
        tcp_addr,
        shared,
        limits,
    })
}

/// Starts the API server on its own thread.
///
/// Each request becomes an [`ApiMessage`] sent on `tx`, followed by a call to `wake` (the VMM
/// passes a closure that writes its eventfd). Sockets are bound before this returns, so errors
/// (socket in use, bad TCP address) come back here.
pub fn spawn_server(
    cfg: ServerConfig,
    tx: Sender<ApiMessage>,
    wake: WakeFn,
) -> Result<ServerHandle, Error> {
    bind_server(cfg, tx, wake)?.spawn(Box::new(|| ()))
}

/// A server whose sockets are bound but that serves no one yet: [`BoundServer::spawn`] starts
/// its thread. Between the two the process can drop privileges (the socket was bound by the
/// user that started it); clients that connect meanwhile wait in the listen backlog.
pub struct BoundServer {
    bound: Bound,
}

impl std::fmt::Debug for BoundServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundServer")
            .field("socket_path", &self.bound.socket.path)
            .field("tcp_addr", &self.bound.tcp_addr)
            .finish()
    }
}

/// Binds the server's sockets (errors come back here) without starting it; see
/// [`BoundServer`].
pub fn bind_server(
    cfg: ServerConfig,
    tx: Sender<ApiMessage>,
    wake: WakeFn,
) -> Result<BoundServer, Error> {
    Ok(BoundServer {
        bound: bind(cfg, tx, wake)?,
    })
}

impl BoundServer {
    /// The socket file, to remove on an exit that skips [`ServerHandle::shutdown`].
    pub fn socket_file(&self) -> SocketFile {
        self.bound.socket.clone()
    }

    /// Starts serving on a thread of its own (`vmm-api`). `on_thread_start` runs first on that
    /// thread, before any connection is accepted (the VMM installs its seccomp filter there).
    /// The runtime is built here, on the calling thread.
    pub fn spawn(self, on_thread_start: Box<dyn FnOnce() + Send>) -> Result<ServerHandle, Error> {
        let b = self.bound;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| {
                b.socket.remove();
                Error::Runtime(e)
            })?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (unix, tcp, shared, limits) = (b.unix, b.tcp, b.shared.clone(), b.limits);
        let thread = std::thread::Builder::new()
            .name("vmm-api".into())
            .spawn(move || {
                on_thread_start();
                runtime.block_on(serve(unix, tcp, shared, stop_rx, limits));
            })
            .map_err(|e| {
                b.socket.remove();
                Error::Runtime(e)
            })?;
        Ok(ServerHandle {
            socket: b.socket,
            tcp_addr: b.tcp_addr,
            stop: stop_tx,
            thread: Some(thread),
            shared: b.shared,
        })
    }
}

/// A server running as a task on the caller's tokio runtime (see [`spawn_server_task`]).
pub struct ServerTask {
    socket: SocketFile,
    tcp_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

impl ServerTask {
    /// The Unix socket the server listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket.path
    }

    /// The TCP address the server listens on, if it has one (the bound port, when 0 was asked).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// As [`ServerHandle::set_direct_reads`].
    pub fn set_direct_reads(&self, reads: Arc<dyn DirectReads>) -> bool {
        self.shared.direct.set(reads).is_ok()
    }

    /// As [`ServerHandle::shutdown`]: the socket file goes first, then requests in progress
    /// finish (bounded) and the task ends.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.socket.remove();
        let _ = self.stop.send(true);
        self.task.await.map_err(|_| Error::ThreadPanicked)
    }
}

/// Like [`spawn_server`], but serves as a task on the current tokio runtime instead of a thread
/// of its own: for tests that drive the server's timeouts with a paused clock, and for hosts
/// that run tokio already. Must be called from within a runtime with IO and time enabled.
pub fn spawn_server_task(
    cfg: ServerConfig,
    tx: Sender<ApiMessage>,
    wake: WakeFn,
) -> Result<ServerTask, Error> {
    let b = bind(cfg, tx, wake)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(serve(b.unix, b.tcp, b.shared.clone(), stop_rx, b.limits));
    Ok(ServerTask {
        socket: b.socket,
        tcp_addr: b.tcp_addr,
        stop: stop_tx,
        task,
        shared: b.shared,
    })
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // An error means the handle is gone: stop too.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Connection handling settings, shared by both listeners.
#[derive(Clone)]
struct ConnSettings {
    http: http1::Builder,
    app: TowerToHyperService<axum::Router>,
    /// One permit per open connection.
    slots: Arc<Semaphore>,
    registry: Arc<Registry>,
    limits: ConnLimits,
    stop: watch::Receiver<bool>,
}

async fn serve(
    unix: UnixListener,
    tcp: Option<std::net::TcpListener>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    limits: Limits,
) {
    let mut http = http1::Builder::new();
    // Our own deadlines (module `conn`) replace hyper's header timer.
    // (Not `max_headers`: setting it, even to its default of conn::MAX_HEADERS, moves hyper's
    // header parsing to the heap.)
    http.header_read_timeout(None)
        .max_header_size(MAX_HEADER_BYTES);
    let settings = ConnSettings {
        http,
        app: TowerToHyperService::new(router(shared)),
        slots: Arc::new(Semaphore::new(limits.conn.max_connections)),
        registry: Arc::new(Registry::default()),
        limits: limits.conn,
        stop: stop.clone(),
    };
    let unix = match tokio::net::UnixListener::from_std(unix) {
        Ok(l) => l,
        Err(e) => {
            log::error!("API: cannot register the Unix socket with the runtime: {e}");
            return;
        }
    };
    let tcp = match tcp.map(tokio::net::TcpListener::from_std).transpose() {
        Ok(l) => l,
        Err(e) => {
            log::error!("API: cannot register the TCP listener with the runtime: {e}");
            return;
        }
    };
    let unix_loop = accept_loop("Unix socket", settings.clone(), || async {
        unix.accept().await.map(|(s, _)| s)
    });
    let tcp_loop = async {
        if let Some(tcp) = &tcp {
            accept_loop("TCP", settings.clone(), || async {
                tcp.accept().await.map(|(s, _)| s)
            })
            .await
        }
    };
    tokio::join!(unix_loop, tcp_loop);
    // Stopped: idle connections close at once, bodies in progress get 408, requests with the
    // VMM finish (bounded by the VMM timeout) and close.
    settings.registry.evict_all(Eviction::Shutdown);
    let all = u32::try_from(limits.conn.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(limits.grace, settings.slots.acquire_many(all)).await;
}

/// A connection slot: free at once, or made free by evicting the connection that has waited
/// longest for its client. Waits only while every connection's request is with the server
/// (each bounded by the VMM timeout). `None` when the server stops meanwhile.
async fn take_slot(settings: &ConnSettings) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(slot) = settings.slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    let mut evicting = false;
    let _waiting = settings.registry.waiting_for_room();
    loop {
        let freed = settings.registry.freed.notified();
        let mut freed = std::pin::pin!(freed);
        freed.as_mut().enable();
        if !evicting {
            evicting = settings.registry.evict_longest_waiting();
        }
        tokio::select! {
            slot = settings.slots.clone().acquire_owned() => return slot.ok(),
            _ = freed => {}
            _ = stopped(settings.stop.clone()) => return None,
        }
    }
}

/// Accepts connections until stopped, at most `slots` at once; each is served on its own task.
async fn accept_loop<S, F, Fut>(what: &'static str, settings: ConnSettings, mut accept: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<S>>,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut reported = false;
    loop {
        let stream = tokio::select! {
            r = accept() => r,
            _ = stopped(settings.stop.clone()) => return,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: report once, back off, keep serving the others.
                if !reported {
                    log::warn!("API: accepting on the {what} failed (backing off): {e}");
                    reported = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // At the limit, the new client waits here (its socket accepted, unread) until a slot
        // is freed; further clients wait in the listen backlog.
        let Some(slot) = take_slot(&settings).await else {
            return;
        };
        let registered = settings.registry.register();
        let service = ConnService {
            app: settings.app.clone(),
            state: registered.state.clone(),
            registry: settings.registry.clone(),
            limits: settings.limits,
        };
        let io = TokioIo::new(JsonHttpErrors::new(stream, MAX_HEADER_BYTES));
        let conn = settings.http.serve_connection(io, service);
        let limits = settings.limits;
        tokio::spawn(async move {
            let _slot = slot;
            conn::drive(conn, &registered.state, limits).await;
            drop(registered);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Vmm {
        #[command(flatten)]
        api: ApiArgs,
    }

    #[test]
    fn api_args_flatten_into_a_vmm_parser() {
        let v = Vmm::parse_from(["vmm"]);
        assert!(v.api.server_config().is_none());
        let v = Vmm::parse_from([
            "vmm",
            "--api-socket",
            "/run/vmm.sock",
            "--api-tcp",
            "127.0.0.1:8080",
            "--api-timeout-ms",
            "2000",
        ]);
        let cfg = v.api.server_config().unwrap();
        assert_eq!(cfg.socket_path, PathBuf::from("/run/vmm.sock"));
        assert_eq!(cfg.tcp_addr, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(cfg.vmm_timeout, Duration::from_secs(2));
        assert_eq!(cfg.body_limit, DEFAULT_BODY_LIMIT);
        assert!(Vmm::try_parse_from(["vmm", "--api-tcp", "127.0.0.1:1"]).is_err());
    }
}
