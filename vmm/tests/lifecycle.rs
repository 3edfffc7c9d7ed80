//! The `vmm` process as an operator runs it: signals in every phase (waiting for the API, a start
//! that hangs or fails, running, with clients connected), the API socket removed on every exit,
//! and command lines refused up front with their own exit status. Only the running-VM cases
//! need /dev/kvm (they say SKIPPED without it); the rest need no VM at all.

mod common;
use common::{kvm_usable, scratch, tiny_elf, Vmm, SLEEP};

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Exit status of a refused command line.
const EXIT_USAGE: i32 = 64;

impl Vmm {
    /// Starts `vmm --api-socket DIR/api.sock ARGS` and waits until the API answers.
    fn start(dir: &Path, args: &[&str]) -> Vmm {
        Self::start_at(&dir.join("api.sock"), args)
    }

    /// Starts `vmm --api-socket SOCKET ARGS` and waits until the API answers.
    fn start_at(socket: &Path, args: &[&str]) -> Vmm {
        let serial = socket.with_file_name("serial.out");
        let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["--api-socket", socket.to_str().unwrap()])
            .args(["--serial", serial.to_str().unwrap()])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut vmm = Vmm {
            child,
            socket: socket.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(socket).is_err() {
            if let Some(st) = vmm.child.try_wait().unwrap() {
                panic!(
                    "vmm exited {st:?} before its API answered: {}",
                    vmm.stderr()
                );
            }
            assert!(Instant::now() < deadline, "API socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        vmm
    }
}

/// The VMM exited on its own after signal `sig` (not killed by it): 128 + sig.
fn exits_with_signal_code(status: ExitStatus, sig: i32) {
    assert_eq!(status.code(), Some(128 + sig), "{status:?}");
}

#[test]
fn a_signal_while_waiting_for_the_api_exits_at_once_and_removes_the_socket() {
    for (sig, name) in [
        (libc::SIGTERM, "term"),
        (libc::SIGINT, "int"),
        (libc::SIGHUP, "hup"),
    ] {
        let dir = scratch(&format!("wait-{name}"));
        let mut vmm = Vmm::start(&dir, &[]);
        // A client holds an idle keep-alive connection meanwhile.
        let mut idle = UnixStream::connect(&vmm.socket).unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        assert!(idle.read(&mut buf).unwrap() > 0);
        vmm.signal(sig);
        let (status, took) = vmm.wait(Duration::from_secs(5), name);
        exits_with_signal_code(status, sig);
        assert!(took < Duration::from_secs(2), "{name}: took {took:?}");
        assert!(
            !vmm.socket.exists(),
            "{name}: the socket file was left behind"
        );
    }
}

#[test]
fn a_signal_while_a_start_hangs_exits_at_once() {
    if !kvm_usable() {
        eprintln!("SKIPPED: a_signal_while_a_start_hangs_exits_at_once: no /dev/kvm");
        return;
    }
    let dir = scratch("hung-start");
    // Opening a FIFO blocks until a writer comes: the start hangs reading the kernel.
    let fifo = dir.join("kernel.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut vmm = Vmm::start(&dir, &[]);
    let src = format!(r#"{{"kernel_image_path":"{}"}}"#, fifo.display());
    assert_eq!(vmm.call("PUT", "/boot-source", Some(&src)).0, 204);
    let mc = r#"{"vcpu_count":1,"mem_size_mib":32}"#;
    assert_eq!(vmm.call("PUT", "/machine-config", Some(mc)).0, 204);
    // InstanceStart from another thread: it never gets an answer.
    let socket = vmm.socket.clone();
    let starter = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&socket).unwrap();
        let body = r#"{"action_type":"InstanceStart"}"#;
        let _ = write!(
            s,
            "PUT /actions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
    });
    // Wait until the VMM is inside the start (the FIFO has a reader).
    let deadline = Instant::now() + Duration::from_secs(20);
    let writer = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
        {
            Ok(w) => break w,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("the start never opened the kernel: {e}"),
        }
    };
    vmm.signal(libc::SIGTERM);
    let (status, took) = vmm.wait(Duration::from_secs(5), "SIGTERM during a start");
    exits_with_signal_code(status, libc::SIGTERM);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(!vmm.socket.exists(), "the socket file was left behind");
    drop(writer);
    starter.join().unwrap();
}

#[test]
fn a_failed_start_is_answered_then_a_signal_still_exits_at_once() {
    let dir = scratch("failed-start");
    let junk = dir.join("junk");
    std::fs::write(&junk, b"not a kernel").unwrap();
    let mut vmm = Vmm::start(&dir, &[]);
    let src = format!(r#"{{"kernel_image_path":"{}"}}"#, junk.display());
    assert_eq!(vmm.call("PUT", "/boot-source", Some(&src)).0, 204);
    let mc = r#"{"vcpu_count":1,"mem_size_mib":32}"#;
    assert_eq!(vmm.call("PUT", "/machine-config", Some(mc)).0, 204);
    let (st, body) = vmm.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    );
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("cannot start"), "{body}");
    vmm.signal(libc::SIGINT);
    let (status, took) = vmm.wait(Duration::from_secs(5), "SIGINT after a failed start");
    exits_with_signal_code(status, libc::SIGINT);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(!vmm.socket.exists(), "the socket file was left behind");
}

#[test]
fn a_running_vm_stops_on_sigterm_with_clients_connected_and_removes_the_socket() {
    if !kvm_usable() {
        eprintln!("SKIPPED: a_running_vm_stops_on_sigterm...: no /dev/kvm");
        return;
    }
    let dir = scratch("running-sigterm");
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, tiny_elf(&SLEEP)).unwrap();
    let mut vmm = Vmm::start(
        &dir,
        &["--kernel", kernel.to_str().unwrap(), "--memory-mib", "32"],
    );
    assert_eq!(vmm.call("GET", "/", None).0, 200);
    // One client idle on a keep-alive connection, one stuck in the middle of a body.
    let mut idle = UnixStream::connect(&vmm.socket).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(idle.read(&mut buf).unwrap() > 0);
    let mut stuck = UnixStream::connect(&vmm.socket).unwrap();
    stuck
        .write_all(b"PATCH /balloon HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n{\"amo")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    vmm.signal(libc::SIGTERM);
    let (status, took) = vmm.wait(Duration::from_secs(10), "SIGTERM while running");
    exits_with_signal_code(status, libc::SIGTERM);
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(!vmm.socket.exists(), "the socket file was left behind");
}

#[test]
fn guest_power_off_and_a_failing_command_line_both_remove_the_socket() {
    if !kvm_usable() {
        eprintln!("SKIPPED: guest_power_off_and_a_failing...: no /dev/kvm");
        return;
    }
    let dir = scratch("exit-paths");
    let socket = dir.join("api.sock");
    // Power off at once through the ACPI sleep register (SLP_TYP 5 | SLP_EN at port 0x3c0).
    let poweroff = [
        0x66,
        0xba,
        0xc0,
        0x03,
        0xb0,
        (5 << 2) | (1 << 5),
        0xee,
        0xf4,
    ];
    let kernel = dir.join("off.elf");
    std::fs::write(&kernel, tiny_elf(&poweroff)).unwrap();
    let junk = dir.join("junk");
    std::fs::write(&junk, b"not a kernel").unwrap();
    for (kernel, code) in [(&kernel, 0), (&junk, 1)] {
        let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["--api-socket", socket.to_str().unwrap()])
            .args(["--kernel", kernel.to_str().unwrap(), "--memory-mib", "16"])
            .args(["--serial", dir.join("serial.out").to_str().unwrap()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{}: {stderr}",
            kernel.display()
        );
        assert!(!socket.exists(), "{}: socket left behind", kernel.display());
    }
}

/// A directory whose path makes `dir/NAME` exactly `len` bytes long.
fn path_of_len(base: &Path, name: &str, len: usize) -> PathBuf {
    let mut dir = base.to_path_buf();
    let fixed = |d: &Path| d.as_os_str().len() + 1 + name.len();
    // Each 10-byte component adds 11 bytes; stop while at least 2 remain, so that the last
    // component ("/" and 1..=11 bytes) lands exactly on `len` whatever the base's length.
    while fixed(&dir) + 13 <= len {
        dir.push("dddddddddd");
    }
    assert!(fixed(&dir) + 2 <= len, "base directory too long for {len}");
    dir.push("e".repeat(len - fixed(&dir) - 1));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    assert_eq!(p.as_os_str().len(), len);
    p
}

#[test]
fn socket_paths_of_108_bytes_are_refused_up_front_and_107_work() {
    let base = scratch("long-path");
    let long = path_of_len(&base, "api.sock", 108);
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--api-socket", long.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_USAGE), "{stderr}");
    assert!(stderr.contains("--api-socket"), "{stderr}");
    assert!(stderr.contains("108 bytes"), "{stderr}");
    assert!(stderr.contains("at most 107 bytes"), "{stderr}");
    assert!(!long.exists(), "nothing is created");

    // The longest legal path works, whatever the name's length.
    for name in ["api.sock", "s"] {
        let ok = path_of_len(&base.join(name.len().to_string()), name, 107);
        let mut vmm = Vmm::start_at(&ok, &[]);
        assert_eq!(vmm.call("GET", "/", None).0, 200);
        vmm.signal(libc::SIGTERM);
        let (status, _) = vmm.wait(Duration::from_secs(5), "SIGTERM");
        exits_with_signal_code(status, libc::SIGTERM);
        assert!(!ok.exists(), "{name}: socket left behind");
    }
}

#[test]
fn refused_command_lines_exit_64_and_help_exits_0() {
    let vmm = env!("CARGO_BIN_EXE_vmm");
    let dir = scratch("usage");
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "/k", "memory": 12}"#).unwrap();
    for (args, needle) in [
        (vec!["--frobnicate"], "--frobnicate"),
        (vec!["--vcpus", "many"], "--vcpus"),
        (vec!["--memory-mib"], "--memory-mib"),
        (vec!["--balloon", "nonsense=1"], "--balloon"),
        (
            vec!["--config", cfg.to_str().unwrap()],
            "unknown field `memory`",
        ),
    ] {
        let out = Command::new(vmm).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_USAGE), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    for flag in ["--help", "--version"] {
        let out = Command::new(vmm).arg(flag).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert!(!out.stdout.is_empty(), "{flag}");
    }
}
