//! The VMM's own machinery on real KVM, with tiny hand-made guests: an ELF "kernel" of a few
//! instructions that writes to the serial port and powers off or resets through the registers
//! a Linux guest would use. Runs on any host with /dev/kvm (including software KVMs that cannot
//! boot a stock kernel), in seconds.

mod common;
use common::{kvm_usable, scratch, tiny_elf};

use std::process::Command;

/// `mov dx, port; mov al, byte; out dx, al` for each byte.
fn outb(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba];
    c.extend_from_slice(&port.to_le_bytes());
    for b in bytes {
        c.extend_from_slice(&[0xb0, *b, 0xee]);
    }
    c
}

/// `hlt; jmp hlt`
const HALT: [u8; 3] = [0xf4, 0xeb, 0xfd];

struct Run {
    code: i32,
    console: String,
    stderr: String,
}

fn run_tiny(name: &str, code: &[u8], extra: &[&str]) -> Option<Run> {
    if !kvm_usable() {
        eprintln!("SKIPPED: {name}: /dev/kvm is not available on this host");
        return None;
    }
    let dir = scratch(name);
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, tiny_elf(code)).unwrap();
    let serial = dir.join("serial.out");
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--kernel", kernel.to_str().unwrap()])
        .args(["--serial", serial.to_str().unwrap()])
        .args(["--memory-mib", "16"])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("vmm runs");
    Some(Run {
        code: out.status.code().unwrap_or(-1),
        console: std::fs::read_to_string(&serial).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

#[test]
fn guest_writes_to_the_console_and_powers_off_with_exit_code_0() {
    let mut code = outb(0x3f8, b"OK\n");
    // ACPI sleep control register: SLP_TYP 5 (S5) | SLP_EN.
    code.extend(outb(0x3c0, &[(5 << 2) | (1 << 5)]));
    code.extend_from_slice(&HALT);
    let Some(r) = run_tiny("poweroff", &code, &[]) else {
        return;
    };
    assert_eq!(r.console, "OK\n", "stderr: {}", r.stderr);
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
}

#[test]
fn keyboard_controller_reset_exits_with_code_2() {
    let mut code = outb(0x3f8, b"R");
    code.extend(outb(0x64, &[0xfe]));
    code.extend_from_slice(&HALT);
    let Some(r) = run_tiny("reset", &code, &["--vcpus", "2"]) else {
        return;
    };
    assert_eq!(r.console, "R", "stderr: {}", r.stderr);
    assert_eq!(r.code, 2, "stderr: {}", r.stderr);
}

#[test]
fn unhandled_ports_do_not_stop_the_guest() {
    // Port 0x80 (POST codes) and 0x1234 have no device: writes are dropped, the guest goes on.
    let mut code = outb(0x80, &[0x55]);
    code.extend(outb(0x1234, &[1]));
    code.extend(outb(0x3f8, b"on"));
    code.extend(outb(0x3c0, &[(5 << 2) | (1 << 5)]));
    code.extend_from_slice(&HALT);
    let Some(r) = run_tiny("unhandled", &code, &[]) else {
        return;
    };
    assert_eq!(
        (r.code, r.console.as_str()),
        (0, "on"),
        "stderr: {}",
        r.stderr
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_exit_code_1() {
    let vmm = env!("CARGO_BIN_EXE_vmm");
    let dir = scratch("badinput");
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0x42u8; 4096]).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--kernel".into(), "/nonexistent/kernel".into()],
            "cannot read kernel image /nonexistent/kernel",
        ),
        (
            vec!["--kernel".into(), junk.display().to_string()],
            "is not a kernel this VMM can boot",
        ),
        (
            vec![
                "--kernel".into(),
                junk.display().to_string(),
                "--memory-mib".into(),
                "0".into(),
            ],
            "--memory-mib: 0 MiB is out of range: allowed 16 to 1048576 MiB",
        ),
        (
            vec![
                "--kernel".into(),
                junk.display().to_string(),
                "--vcpus".into(),
                "0".into(),
            ],
            "--vcpus: 0 vCPUs is out of range: allowed 1 to 254 vCPUs",
        ),
        (
            vec![
                "--kernel".into(),
                junk.display().to_string(),
                "--vcpus".into(),
                "999".into(),
            ],
            "999",
        ),
        (
            vec![
                "--kernel".into(),
                junk.display().to_string(),
                "--memory-mib".into(),
                "1048576".into(),
            ],
            "the host has only",
        ),
        (vec!["--frobnicate".into()], "--frobnicate"),
    ];
    for (args, needle) in cases {
        if !kvm_usable() && needle.contains("not a kernel") {
            continue;
        }
        let out = Command::new(vmm).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?} must fail");
        assert!(
            out.status.code().is_some(),
            "{args:?} died by a signal: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in {stderr:?}"
        );
    }
    // A malformed config file names the field.
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "/k", "memory": 12}"#).unwrap();
    let out = Command::new(vmm)
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(64),
        "a refused configuration: {stderr}"
    );
    assert!(stderr.contains("unknown field `memory`"), "{stderr}");
}

#[test]
fn virtio_mmio_window_answers_with_magic_and_device_id() {
    let mut code = vec![
        0xbb, 0x00, 0x00, 0x00, 0xd0, // mov ebx, 0xd0000000 (first virtio-mmio window)
        0x8b, 0x03, // mov eax, [rbx]: MagicValue
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
        0xc1, 0xe8, 0x08, 0xee, // shr eax, 8; out
        0xc1, 0xe8, 0x08, 0xee, 0xc1, 0xe8, 0x08, 0xee, 0x8b, 0x43,
        0x08, // mov eax, [rbx + 8]: DeviceID
        0x04, b'0', // add al, '0'
        0xee,
    ];
    code.extend(outb(0x3c0, &[(5 << 2) | (1 << 5)]));
    code.extend_from_slice(&HALT);
    let Some(r) = run_tiny("virtio-mmio", &code, &["--balloon", "amount_mib=0"]) else {
        return;
    };
    assert_eq!(r.console, "virt5", "stderr: {}", r.stderr);
    assert_eq!(r.code, 0);
}

/// `--thp` backs guest RAM with transparent huge pages: the guest runs as before, and the host
/// accepted the advice (the VMM warns when madvise(MADV_HUGEPAGE) fails or the mapping cannot
/// line up with guest huge pages).
#[test]
fn thp_backed_guest_ram_runs_the_guest() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.is_empty() || thp.contains("[never]") {
        eprintln!(
            "SKIPPED: thp_backed_guest_ram_runs_the_guest: THP is off on this host ({thp:?})"
        );
        return;
    }
    let mut code = outb(0x3f8, b"THP\n");
    code.extend(outb(0x3c0, &[(5 << 2) | (1 << 5)]));
    code.extend_from_slice(&HALT);
    let Some(r) = run_tiny("thp", &code, &["--thp", "--log-level", "warn"]) else {
        return;
    };
    assert_eq!(r.console, "THP\n", "stderr: {}", r.stderr);
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    assert!(!r.stderr.contains("MADV_HUGEPAGE"), "{}", r.stderr);
    assert!(!r.stderr.contains("not 2 MiB-aligned"), "{}", r.stderr);
}
