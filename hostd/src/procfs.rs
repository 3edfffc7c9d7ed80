//! What the daemon reads from /proc: a process's identity (PID plus start time, so a reused PID
//! is not mistaken for our VMM), its resident size, and the host's memory and pressure.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// A process as the kernel knows it: the PID alone is reused after the process dies, the start
/// time (clock ticks after boot) and the boot id together with it are not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    /// The process id.
    pub pid: i32,
    /// Field 22 of /proc/PID/stat.
    pub start_ticks: u64,
    /// /proc/sys/kernel/random/boot_id when the process was seen.
    pub boot_id: String,
}

/// Where a recorded process stands now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The same process, not yet exited.
    Alive,
    /// It exited and waits to be reaped by its parent.
    Zombie,
    /// No such process, or the PID now belongs to another process (reused), or the host rebooted.
    Gone,
}

impl ProcessId {
    /// The identity of the live process `pid`, if there is one.
    pub fn of(pid: i32) -> Option<Self> {
        let (_, start_ticks) = stat(pid)?;
        Some(Self {
            pid,
            start_ticks,
            boot_id: boot_id(),
        })
    }

    /// Whether the recorded process still runs, is a zombie, or is gone (PID reused, reboot).
    pub fn liveness(&self) -> Liveness {
        match stat(self.pid) {
            Some((state, start)) if start == self.start_ticks && self.boot_id == boot_id() => {
                if state == 'Z' || state == 'X' {
                    Liveness::Zombie
                } else {
                    Liveness::Alive
                }
            }
            _ => Liveness::Gone,
        }
    }

    /// Sends `sig` only if the PID is still this process (never to a process that reused it).
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        if self.liveness() != Liveness::Alive {
            return Ok(());
        }
        // SAFETY: kill(2) takes plain integers; the PID was checked to be our process just above
        // (a reuse in between would need the process to die and the PID to wrap meanwhile).
        if unsafe { libc::kill(self.pid, sig) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The current boot's id ("" if unreadable, which then matches only itself). Read once: it
/// cannot change while this process runs, and supervision asks for it several times a second.
pub fn boot_id() -> String {
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        })
        .clone()
}

/// (state, start time) of `pid` from /proc/PID/stat.
fn stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// The command name is in parentheses and may hold spaces or ')': fields start after the last
/// ')'. After it: state (field 3) ... starttime (field 22).
fn parse_stat(text: &str) -> Option<(char, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// VmRSS of `pid`, KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    meminfo_field(&status, "VmRSS:")
}

/// A `Name:   123 kB` field of /proc/meminfo or /proc/PID/status, in KiB.
fn meminfo_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The host's memory as the policy sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HostReading {
    /// MemTotal, MiB.
    pub mem_total_mib: Option<u64>,
    /// MemAvailable, MiB.
    pub mem_available_mib: Option<u64>,
    /// /proc/pressure/memory `some avg10`, percent.
    pub psi_some_avg10: Option<f64>,
    /// /proc/pressure/memory `full avg10`, percent.
    pub psi_full_avg10: Option<f64>,
}

impl HostReading {
    /// Reads /proc/meminfo and /proc/pressure/memory (absent without CONFIG_PSI: `None`).
    pub fn read() -> Self {
        Self::read_from(Path::new("/proc"))
    }

    fn read_from(proc: &Path) -> Self {
        let meminfo = std::fs::read_to_string(proc.join("meminfo")).unwrap_or_default();
        let psi = std::fs::read_to_string(proc.join("pressure/memory")).unwrap_or_default();
        Self {
            mem_total_mib: meminfo_field(&meminfo, "MemTotal:").map(|k| k / 1024),
            mem_available_mib: meminfo_field(&meminfo, "MemAvailable:").map(|k| k / 1024),
            psi_some_avg10: psi_avg10(&psi, "some"),
            psi_full_avg10: psi_avg10(&psi, "full"),
        }
    }
}

/// `avg10` of the `kind` line of a PSI file: `some avg10=0.00 avg60=0.00 avg300=0.00 total=0`.
fn psi_avg10(text: &str, kind: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(kind)?.strip_prefix(' '))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let line = "42 (a) b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 \
                    50 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(line), Some(('S', 123456)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not_it() {
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        assert_eq!(me.liveness(), Liveness::Alive);
        let reused = ProcessId {
            start_ticks: me.start_ticks + 1,
            ..me.clone()
        };
        assert_eq!(
            reused.liveness(),
            Liveness::Gone,
            "a reused PID is not ours"
        );
        let other_boot = ProcessId {
            boot_id: "another boot".into(),
            ..me.clone()
        };
        assert_eq!(other_boot.liveness(), Liveness::Gone);
        // Never signalled: signal 0 would succeed on a live process, so a Gone one must not
        // even try (checked by sending SIGKILL to "us" with the wrong start time).
        reused.signal(libc::SIGKILL).unwrap();
        assert!(rss_kib(me.pid).unwrap() > 0);
    }

    #[test]
    fn host_readings() {
        let psi = "some avg10=1.50 avg60=0.00 avg300=0.00 total=12\n\
                   full avg10=0.25 avg60=0.00 avg300=0.00 total=3\n";
        assert_eq!(psi_avg10(psi, "some"), Some(1.5));
        assert_eq!(psi_avg10(psi, "full"), Some(0.25));
        assert_eq!(psi_avg10("", "some"), None);
        let r = HostReading::read();
        assert!(r.mem_total_mib.unwrap() > 0);
        assert!(r.mem_available_mib.unwrap() <= r.mem_total_mib.unwrap());
    }
}
