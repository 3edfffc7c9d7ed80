//! Serving the router on the daemon's Unix socket (HTTP/1.1, keep-alive, a bound on open
//! connections and on how long a client may take to send its headers).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::UnixListener;
use tokio::sync::{watch, Semaphore};

/// Most connections open at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// Time to send a request's headers; also closes idle keep-alive connections.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `path` (mode 0600). A stale socket (nothing listening) is replaced; a live one or a
/// file that is not a socket is refused.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a live server", path.display()),
                ))
            }
            Err(_) => std::fs::remove_file(path)?,
        }
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves until `stop` turns true, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    app: Router,
    stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut reported = false;
    loop {
        let mut stop_rx = stop.clone();
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
            _ = stop_rx.wait_for(|s| *s) => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => r,
            _ = stop_rx.wait_for(|s| *s) => break,
        };
        let stream = match stream {
            Ok((s, _)) => s,
            Err(e) => {
                if !reported {
                    log::warn!("API: accept failed (backing off): {e}");
                    reported = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let mut stop_conn = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop_conn.wait_for(|s| *s) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        });
    }
    let _ = std::fs::remove_file(&path);
}
