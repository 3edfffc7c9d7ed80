//! What the tiny-guest tests share: a minimal ELF "kernel" of hand-written instructions, and
//! where to put scratch files.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

/// Load address and entry of the tiny kernel (the loader wants it above 1 MiB).
pub const LOAD: u64 = 0x10_0000;

/// A minimal ELF64 executable with one PT_LOAD segment holding `code` at `LOAD`.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let phoff = 64u64;
    let code_off = phoff + 56;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    f.extend_from_slice(&phoff.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // flags
    f.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // phnum
    f.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    assert_eq!(f.len(), 64);
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    f.extend_from_slice(&code_off.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // vaddr
    f.extend_from_slice(&LOAD.to_le_bytes()); // paddr
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(code);
    f
}

/// Whether this host has a usable /dev/kvm (tests print SKIPPED when not).
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tiny-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `cli; hlt; jmp hlt`: the vCPU sleeps in KVM for good.
pub const SLEEP: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];

/// A `vmm` child process and its API socket; killed and reaped when dropped. Each test binary
/// adds its own ways to start one.
pub struct Vmm {
    pub child: std::process::Child,
    pub socket: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vmm {
    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the process to exit, failing after `limit`; its status and how long it took.
    pub fn wait(
        &mut self,
        limit: std::time::Duration,
        what: &str,
    ) -> (std::process::ExitStatus, std::time::Duration) {
        let t0 = std::time::Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s, t0.elapsed());
            }
            assert!(
                t0.elapsed() < limit,
                "vmm did not exit within {limit:?}: {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Everything the process wrote on stderr (read once: it waits for the pipe to close).
    pub fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// One HTTP/1.1 request on the API socket; returns (status, body).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp[9..12].parse().unwrap();
        let body = resp.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
        (status, body)
    }
}
