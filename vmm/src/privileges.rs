//! Dropping root: a VMM started as root with `--uid`/`--gid` opens what it needs first
//! (/dev/kvm, the kernel, initramfs and serial file, the API socket), then becomes that user
//! with no supplementary groups, no capabilities (effective, permitted, inheritable, ambient or
//! bounding) and `no_new_privs`, before any other thread exists and before any filter is
//! installed (`main.rs` narrates the order).

use std::io;

/// The user and group to run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// User id (not 0).
    pub uid: u32,
    /// Group id (not 0).
    pub gid: u32,
}

/// Why the drop failed. The process must not go on (it would run with more than asked).
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    /// Only root can become another user.
    #[error(
        "--uid {uid} --gid {gid}: the VMM runs as uid {euid}, and only root can change to \
         another user (start it as root, or leave out --uid/--gid)"
    )]
    NotRoot {
        /// Asked-for uid.
        uid: u32,
        /// Asked-for gid.
        gid: u32,
        /// The effective uid the VMM has.
        euid: u32,
    },
    /// The drop must happen while the process has one thread.
    #[error("cannot drop privileges: {0} threads run (a bug: the drop must come before any thread starts)")]
    Threads(u64),
    /// A system call of the drop failed.
    #[error("cannot drop privileges: {what} failed: {source}")]
    Call {
        /// The call.
        what: &'static str,
        /// The system's error.
        source: io::Error,
    },
    /// The jail could not be entered.
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// After the drop the process still holds something.
    #[error("privileges still held after the drop: {0}")]
    StillHeld(String),
}

fn check(what: &'static str, rc: libc::c_long) -> Result<(), DropError> {
    if rc < 0 {
        return Err(DropError::Call {
            what,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Linux capability ABI version 3 (two 32-bit words per set).
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Becomes `creds` for good; with `jail`, first moves into an empty root of its own
/// ([`crate::jail`]), which needs the root it is about to give up. Call with only the calling
/// thread running.
pub fn drop_to(creds: Credentials, jail: bool) -> Result<(), DropError> {
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(DropError::NotRoot {
            uid: creds.uid,
            gid: creds.gid,
            euid,
        });
    }
    // Opened now: after a jail no path reaches /proc, and the checks below read it again.
    let status = std::fs::File::open("/proc/self/status").map_err(|source| DropError::Call {
        what: "open(/proc/self/status)",
        source,
    })?;
    let threads = status_field(&status, "Threads").and_then(|t| t.parse::<u64>().ok());
    if let Some(n) = threads.filter(|&n| n != 1) {
        return Err(DropError::Threads(n));
    }
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes with the uid.
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(63);
    if jail {
        crate::jail::enter_empty_root()?;
    }
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        // EINVAL: a capability this kernel does not know; nothing to drop.
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            check("prctl(PR_CAPBSET_DROP)", rc as libc::c_long)?;
        }
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", rc as libc::c_long)?;
    // SAFETY: setgroups with a count of 0 reads no memory.
    let rc = unsafe { libc::setgroups(0, std::ptr::null()) };
    check("setgroups([])", rc as libc::c_long)?;
    // SAFETY: integer arguments only.
    let rc = unsafe { libc::setresgid(creds.gid, creds.gid, creds.gid) };
    check("setresgid", rc as libc::c_long)?;
    // SAFETY: integer arguments only. With every uid non-zero the kernel clears the effective
    // and permitted capability sets.
    let rc = unsafe { libc::setresuid(creds.uid, creds.uid, creds.uid) };
    check("setresuid", rc as libc::c_long)?;
    // The inheritable set survives setuid: empty it too.
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads the header and two data words we own, alive for the call.
    check("capset(0)", unsafe {
        libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr())
    })?;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check("prctl(PR_SET_NO_NEW_PRIVS)", rc as libc::c_long)?;
    verify(creds, &status)
}

/// Reads back what the kernel says the process holds now.
fn verify(creds: Credentials, status: &std::fs::File) -> Result<(), DropError> {
    let status_field = |name: &str| status_field(status, name);
    let mut held = Vec::new();
    for (field, want) in [
        ("CapEff", "0000000000000000"),
        ("CapPrm", "0000000000000000"),
        ("CapInh", "0000000000000000"),
        ("CapBnd", "0000000000000000"),
        ("CapAmb", "0000000000000000"),
        ("NoNewPrivs", "1"),
    ] {
        match status_field(field) {
            Some(v) if v == want => {}
            Some(v) => held.push(format!("{field} {v}")),
            None => {}
        }
    }
    let ids = |f: &str| status_field(f).map(|v| v.split_whitespace().map(String::from).collect());
    let all =
        |v: Option<Vec<String>>, id: u32| v.is_none_or(|v| v.iter().all(|x| *x == id.to_string()));
    if !all(ids("Uid"), creds.uid) {
        held.push(format!("Uid {}", status_field("Uid").unwrap_or_default()));
    }
    if !all(ids("Gid"), creds.gid) {
        held.push(format!("Gid {}", status_field("Gid").unwrap_or_default()));
    }
    if status_field("Groups").is_some_and(|g| !g.is_empty()) {
        held.push(format!(
            "Groups {}",
            status_field("Groups").unwrap_or_default()
        ));
    }
    if held.is_empty() {
        Ok(())
    } else {
        Err(DropError::StillHeld(held.join(", ")))
    }
}

/// A field of /proc/self/status (read afresh through `status`, an open descriptor), trimmed.
fn status_field(status: &std::fs::File, name: &str) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = status.read_at(&mut buf, text.len() as u64).ok()?;
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&text).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == name).then(|| v.trim().to_string())
    })
}
