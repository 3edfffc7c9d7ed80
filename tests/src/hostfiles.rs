//! A nested test host seen from outside when it stops answering: its console log, its QEMU
//! monitor (vCPU registers) and its kernel symbols.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{rundir, TAIL_LINES};

/// Where to look at a nested test host from outside when it stops answering.
#[derive(Debug)]
pub(crate) struct HostFiles {
    pub(crate) console: PathBuf,
    pub(crate) monitor: PathBuf,
    /// The test host kernel's text symbols, taken at boot (Debian ships no System.map, and
    /// KASLR moves the kernel at each boot), to name the functions the vCPUs' RIPs are in.
    pub(crate) kallsyms: PathBuf,
    /// The directory holding them, locked while this test host lives (see [`rundir`]).
    pub(crate) _dir: Option<rundir::HostDir>,
}

impl HostFiles {
    /// What the test host's kernel printed last (the console shows warnings and worse, e.g. soft
    /// lockups and RCU stalls with their stacks) and where QEMU's vCPUs are, from the monitor.
    pub(crate) fn report(&self) -> String {
        let console = std::fs::read_to_string(&self.console).unwrap_or_default();
        let since_ready = console
            .find("TESTHOST-READY")
            .map_or(console.as_str(), |i| &console[i..]);
        let tail = last_lines(since_ready, 3 * TAIL_LINES);
        let symbols = std::fs::read_to_string(&self.kallsyms).unwrap_or_default();
        let regs = monitor_command(&self.monitor, "info registers -a")
            .map(|out| {
                out.lines()
                    .map(|l| l.trim())
                    .filter(|l| {
                        ["CPU#", "RIP=", "CR0=", "EFER="]
                            .iter()
                            .any(|p| l.starts_with(p))
                    })
                    .map(|l| {
                        // A RIP in the nested guest (the VMM's) finds no symbol or a wrong one.
                        let sym = l
                            .strip_prefix("RIP=")
                            .and_then(|r| u64::from_str_radix(r.get(..16)?, 16).ok())
                            .and_then(|rip| kernel_symbol(&symbols, rip));
                        match sym {
                            Some(sym) => format!("{l}  [test host kernel: {sym}?]"),
                            None => l.to_string(),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|e| format!("(no answer from {}: {e})", self.monitor.display()));
        format!(
            "--- test host console ({}) since TESTHOST-READY, tail ---\n{tail}\n\
             --- test host vCPUs (QEMU monitor) ---\n{regs}",
            self.console.display()
        )
    }
}

/// The last `n` lines of `text`.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `addr` as `function+0xoffset [module]` from /proc/kallsyms lines ("ADDR t NAME [MODULE]"),
/// if a text symbol starts at most 64 KiB below it.
fn kernel_symbol(kallsyms: &str, addr: u64) -> Option<String> {
    let mut best: Option<(u64, &str)> = None;
    for line in kallsyms.lines() {
        let mut f = line.splitn(3, ' ');
        let (Some(a), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Ok(a) = u64::from_str_radix(a, 16) else {
            continue;
        };
        if matches!(kind, "t" | "T") && a <= addr && best.is_none_or(|(b, _)| a > b) {
            best = Some((a, name));
        }
    }
    let (start, name) = best.filter(|(start, _)| addr - start < 0x10000)?;
    let (func, module) = match name.split_once(char::is_whitespace) {
        Some((f, m)) => (f, format!(" {}", m.trim())),
        None => (name, String::new()),
    };
    Some(format!("{func}+{:#x}{module}", addr - start))
}

/// One command on QEMU's human monitor at `socket`; returns its output.
fn monitor_command(socket: &Path, command: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let read_prompt = |s: &mut std::os::unix::net::UnixStream| -> std::io::Result<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !out.ends_with(b"(qemu) ") {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    read_prompt(&mut s)?;
    s.write_all(format!("{command}\n").as_bytes())?;
    read_prompt(&mut s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn host_report_shows_the_console_since_ready_and_the_vcpus() {
        use std::io::Read;
        let dir = std::env::temp_dir().join(format!("e2e-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let console = dir.join("console.log");
        std::fs::write(
            &console,
            "boot noise\nTESTHOST-READY uptime=4\n[ 81.1] watchdog: BUG: soft lockup - CPU#1\n",
        )
        .unwrap();
        // A stand-in for QEMU's monitor: a banner and prompt, then one answer per command.
        let monitor = dir.join("monitor.sock");
        let _ = std::fs::remove_file(&monitor);
        let listener = std::os::unix::net::UnixListener::bind(&monitor).unwrap();
        let server = thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            c.write_all(b"QEMU 7.2 monitor\r\n(qemu) ").unwrap();
            let mut cmd = [0u8; 64];
            let n = c.read(&mut cmd).unwrap();
            assert_eq!(&cmd[..n], b"info registers -a\n");
            c.write_all(b"info registers -a\r\n\r\nCPU#0\r\nRAX=0 RBX=0\r\nRIP=ffffffff81000000 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\r\nCR0=80050033 CR2=0 CR3=1000 CR4=350ef0\r\n(qemu) ")
                .unwrap();
        });
        let kallsyms = dir.join("kallsyms.txt");
        std::fs::write(
            &kallsyms,
            "ffffffff80ff0000 T _text\nffffffff81000000 t native_safe_halt\n",
        )
        .unwrap();
        let files = HostFiles {
            console,
            monitor: monitor.clone(),
            kallsyms,
            _dir: None,
        };
        let r = files.report();
        server.join().unwrap();
        assert!(
            r.contains("soft lockup - CPU#1") && !r.contains("boot noise"),
            "{r}"
        );
        assert!(
            r.contains("CPU#0\nRIP=ffffffff81000000") && r.contains("CR0=80050033"),
            "{r}"
        );
        assert!(
            r.contains("[test host kernel: native_safe_halt+0x0?]"),
            "{r}"
        );
        assert!(!r.contains("RAX="), "{r}");
        // Without a monitor the report still has the console and says why the rest is missing.
        std::fs::remove_file(&monitor).unwrap();
        let r = files.report();
        assert!(
            r.contains("soft lockup") && r.contains("no answer from"),
            "{r}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kernel_symbols_name_the_function_and_module() {
        let k = "ffffffff81000000 T _text\n\
                 ffffffff81000100 t native_safe_halt\n\
                 ffffffff81000200 D some_data\n\
                 ffffffffc0400000 t svm_vcpu_run\t[kvm_amd]\n";
        assert_eq!(
            kernel_symbol(k, 0xffffffff8100010b).as_deref(),
            Some("native_safe_halt+0xb")
        );
        // Data symbols do not count; the text symbol below still does.
        assert_eq!(
            kernel_symbol(k, 0xffffffff81000210).as_deref(),
            Some("native_safe_halt+0x110")
        );
        assert_eq!(
            kernel_symbol(k, 0xffffffffc0400020).as_deref(),
            Some("svm_vcpu_run+0x20 [kvm_amd]")
        );
        assert_eq!(kernel_symbol(k, 0xffffffff80000000), None);
        assert_eq!(
            kernel_symbol(k, 0xffffffffc0500000),
            None,
            "too far from any symbol"
        );
    }
}
