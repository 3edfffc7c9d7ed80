//! The server's sockets, thread, timeouts and shutdown.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::client::Client;
use api::{spawn_server, ApiRequest, ApiResponse, Error, ServerConfig};
use common::{expect_fault, req, Harness, TempDir};
use vmm::testing::HeadlessOptions;

#[test]
fn socket_is_0600_and_removed_on_shutdown() {
    let h = Harness::start();
    let meta = std::fs::metadata(&h.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Nothing left beside it from the private bind.
    let names: Vec<_> = std::fs::read_dir(h.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("api.sock")]);
    let mut h = h;
    h.server.take().unwrap().shutdown().unwrap();
    assert!(!h.socket.exists());
}

#[test]
fn refuses_a_live_socket_and_replaces_a_stale_one() {
    let h = Harness::start();
    let (tx, _rx) = mpsc::channel();
    let err = spawn_server(ServerConfig::new(&h.socket), tx.clone(), Arc::new(|| {}))
        .err()
        .unwrap();
    assert!(matches!(err, Error::SocketInUse(_)), "{err}");
    assert!(err.to_string().contains("in use by a live server"));

    // Stale: a socket file nobody listens on.
    let dir = TempDir::new();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = spawn_server(ServerConfig::new(&stale), tx.clone(), Arc::new(|| {})).unwrap();
    assert!(std::os::unix::net::UnixStream::connect(&stale).is_ok());
    server.shutdown().unwrap();

    // Not a socket: left alone.
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let err = spawn_server(ServerConfig::new(&file), tx, Arc::new(|| {}))
        .err()
        .unwrap();
    assert!(matches!(err, Error::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[tokio::test]
async fn tcp_only_when_asked() {
    let h = Harness::start();
    assert!(h.server.as_ref().unwrap().tcp_addr().is_none());
    let h = Harness::start_with(
        |c| c.tcp_addr = Some("127.0.0.1:0".parse().unwrap()),
        Default::default(),
    );
    let addr = h.server.as_ref().unwrap().tcp_addr().unwrap();
    assert_ne!(addr.port(), 0);
    // A plain HTTP/1.1 request over TCP.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"state\":\"Not started\""), "{out}");
}

#[tokio::test]
async fn slow_vmm_gives_504_without_blocking_other_clients() {
    let h = Harness::start_with(
        |c| c.vmm_timeout = Duration::from_millis(300),
        HeadlessOptions {
            reply_delay: Duration::from_millis(1500),
            ..Default::default()
        },
    );
    let t0 = Instant::now();
    let path = h.socket.clone();
    let a = tokio::spawn(async move {
        let mut c = Client::new(path);
        req(&mut c, "GET", "/balloon", None).await
    });
    let path = h.socket.clone();
    let b = tokio::spawn(async move {
        let mut c = Client::new(path);
        req(&mut c, "GET", "/", None).await
    });
    // While the VMM is stuck, requests that need no VMM answer at once.
    let mut c = h.client();
    let t1 = Instant::now();
    expect_fault(&mut c, "GET", "/nope", None, 404, &[]).await;
    expect_fault(&mut c, "PUT", "/balloon", Some("{"), 400, &[]).await;
    assert!(
        t1.elapsed() < Duration::from_millis(250),
        "{:?}",
        t1.elapsed()
    );
    let (sa, va) = a.await.unwrap();
    let (sb, _) = b.await.unwrap();
    assert_eq!((sa, sb), (504, 504));
    assert!(va["fault_message"]
        .as_str()
        .unwrap()
        .contains("did not answer within 300 ms"));
    // Both timed out in parallel, not one after the other.
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn vmm_gone_is_503_and_wrong_answers_are_500() {
    let dir = TempDir::new();
    // A VMM that has exited: the receiver is dropped.
    let (tx, rx) = mpsc::channel();
    drop(rx);
    let sock = dir.path().join("gone.sock");
    let _server = spawn_server(ServerConfig::new(&sock), tx, Arc::new(|| {})).unwrap();
    let mut c = Client::new(&sock);
    expect_fault(
        &mut c,
        "GET",
        "/balloon",
        None,
        503,
        &["not taking requests"],
    )
    .await;

    // A buggy VMM: answers Empty to everything, or drops requests.
    let (tx, rx) = mpsc::channel::<api::ApiMessage>();
    std::thread::spawn(move || {
        for msg in rx {
            if msg.request == ApiRequest::GetResize {
                drop(msg);
            } else {
                msg.respond(Ok(ApiResponse::Empty));
            }
        }
    });
    let sock = dir.path().join("buggy.sock");
    let _server = spawn_server(ServerConfig::new(&sock), tx, Arc::new(|| {})).unwrap();
    let mut c = Client::new(&sock);
    expect_fault(&mut c, "GET", "/balloon", None, 500, &["expects Balloon"]).await;
    expect_fault(
        &mut c,
        "GET",
        "/vm/resize",
        None,
        500,
        &["without answering"],
    )
    .await;
    let (s, _) = req(&mut c, "PATCH", "/balloon", Some(r#"{"amount_mib": 1}"#)).await;
    assert_eq!(s, 204);
}

#[test]
fn shutdown_is_prompt_with_idle_clients_connected() {
    let h = Harness::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = h.client();
    rt.block_on(async {
        let (s, _) = req(&mut c, "GET", "/", None).await;
        assert_eq!(s, 200);
    });
    // `c` keeps its keep-alive connection open.
    let mut h = h;
    let t0 = Instant::now();
    h.server.take().unwrap().shutdown().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn stalled_clients_are_dropped_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start_with(
        |c| {
            c.max_connections = 2;
            c.header_read_timeout = Duration::from_millis(300);
        },
        Default::default(),
    );
    // Two clients take both slots and stall in the middle of their headers.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::UnixStream::connect(&h.socket).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A third client waits for a slot, and gets one when the stalled ones time out.
    let t0 = Instant::now();
    let mut c = h.client();
    let (s, _) = req(&mut c, "GET", "/", None).await;
    assert_eq!(s, 200);
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    // The stalled connections were closed by the server.
    for mut s in stalled {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
        assert!(n.is_ok(), "stalled connection still open");
    }
}

#[tokio::test]
async fn idle_connections_close_and_the_client_reconnects() {
    let h = Harness::start_with(
        |c| c.header_read_timeout = Duration::from_millis(200),
        Default::default(),
    );
    let mut c = h.client();
    for _ in 0..3 {
        let (s, _) = req(&mut c, "GET", "/", None).await;
        assert_eq!(s, 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let (s, _) = req(&mut c, "PATCH", "/balloon", Some(r#"{"amount_mib": 0}"#)).await;
    assert_eq!(s, 404); // answered (no balloon), not lost on a dead connection

    // The server does close an idle keep-alive connection.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::UnixStream::connect(&h.socket).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = raw.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let t0 = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(2), raw.read(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0))), "{n:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn two_servers_racing_for_one_path_never_both_win() {
    let dir = TempDir::new();
    let sock = dir.path().join("race.sock");
    for _ in 0..20 {
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (sock, barrier) = (sock.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let (tx, _rx) = mpsc::channel();
                    barrier.wait();
                    spawn_server(ServerConfig::new(&sock), tx, Arc::new(|| {}))
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let winners = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(winners, 1, "{results:?}");
        for r in results.into_iter().flatten() {
            r.shutdown().unwrap();
        }
        assert!(!sock.exists());
    }
}

#[tokio::test]
async fn malformed_http_is_a_client_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start();
    for input in [
        // Bad chunk size in the body.
        &b"PUT /balloon HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"[..],
        // Body shorter than Content-Length, then the client hangs up its write side.
        &b"PUT /balloon HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"amount_mib\""[..],
        // Not HTTP.
        &b"HELLO\r\n\r\n"[..],
    ] {
        let mut s = tokio::net::UnixStream::connect(&h.socket).await.unwrap();
        s.write_all(input).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out))
            .await
            .expect("the server answers or closes")
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 4"), "{input:?} -> {out}");
    }
    // Still serving.
    let mut c = h.client();
    let (s, _) = req(&mut c, "GET", "/", None).await;
    assert_eq!(s, 200);
    assert_eq!(h.vmm.wakes(), 1);
}

/// GETs the direct reader serves never reach the VMM thread; the rest, mutations included, still
/// do; a reader's wrong answer is a 500 like the VMM's, and its refusals keep their status.
#[tokio::test]
async fn direct_reads_answer_gets_on_the_api_thread() {
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Reader;
    impl api::DirectReads for Reader {
        fn read(&self, request: &ApiRequest) -> Option<api::ApiResult> {
            match request {
                ApiRequest::GetHotplugMemory => Some(Err(api::ApiError::not_found("no hot-add"))),
                ApiRequest::GetResize => Some(Ok(ApiResponse::Empty)),
                ApiRequest::GetBalloon => Some(Ok(ApiResponse::Balloon(api::BalloonState {
                    amount_mib: 7,
                    deflate_on_oom: false,
                    stats_polling_interval_s: 0,
                    free_page_reporting: false,
                    target_pages: 7 << 8,
                    actual_pages: 0,
                    actual_mib: 0,
                }))),
                _ => None,
            }
        }
    }

    let dir = TempDir::new();
    let (tx, rx) = mpsc::channel::<api::ApiMessage>();
    let reached = Arc::new(AtomicU64::new(0));
    let seen = reached.clone();
    std::thread::spawn(move || {
        for msg in rx {
            seen.fetch_add(1, Ordering::SeqCst);
            let answer = match msg.request {
                ApiRequest::GetBalloon => Err(api::ApiError::internal("hop taken")),
                _ => Ok(ApiResponse::Empty),
            };
            msg.respond(answer);
        }
    });
    let sock = dir.path().join("direct.sock");
    let server = spawn_server(ServerConfig::new(&sock), tx, Arc::new(|| {})).unwrap();
    let mut c = Client::new(&sock);

    // Before a reader is set, GETs take the hop.
    expect_fault(&mut c, "GET", "/balloon", None, 500, &["hop taken"]).await;
    assert_eq!(reached.load(Ordering::SeqCst), 1);

    assert!(server.set_direct_reads(Arc::new(Reader)));
    assert!(!server.set_direct_reads(Arc::new(Reader)), "set once");
    for _ in 0..100 {
        let (s, v) = req(&mut c, "GET", "/balloon", None).await;
        assert_eq!((s, v["amount_mib"].as_u64()), (200, Some(7)));
    }
    expect_fault(&mut c, "GET", "/hotplug/memory", None, 404, &["no hot-add"]).await;
    expect_fault(&mut c, "GET", "/vm/resize", None, 500, &["expects Resize"]).await;
    assert_eq!(
        reached.load(Ordering::SeqCst),
        1,
        "served GETs stay on the API thread"
    );

    // What the reader declines, and every mutation, still reaches the VMM thread.
    let (s, _) = req(&mut c, "PATCH", "/balloon", Some(r#"{"amount_mib": 1}"#)).await;
    assert_eq!(s, 204);
    let _ = req(&mut c, "GET", "/", None).await;
    assert_eq!(reached.load(Ordering::SeqCst), 3);
}
