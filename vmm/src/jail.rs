//! `--jail`: the VMM moves into a mount namespace of its own whose root is an empty, read-only
//! tmpfs. It does so after it has opened every file the VM needs (/dev/kvm, kernel, initramfs,
//! serial file, API socket, /proc/self files) and before it gives up root, so from then on no
//! path the process could name reaches a host file: a guest that took over the VMM would find
//! nothing to open, with or without a seccomp hole. The host's mounts are unaffected (the new
//! namespace is private), and descriptors opened before keep working.
//!
//! How: a fresh tmpfs made with the mount API (`fsopen`/`fsmount`, Linux 5.2) is attached over
//! `/` and the process's working directory set to it; `pivot_root(".", ".")` makes it the root
//! and stacks the old root beneath it, which `umount2(MNT_DETACH)` then takes away. No
//! directory of the host is needed for this. A host that runs from its initial ramfs (as the
//! nested test host does) cannot pivot away from it: there the process `chroot`s into the new
//! root, and the old root stays mounted beneath it, unreachable by any path.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Why the process could not enter its empty root. It must not go on (it would see the host).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A system call failed.
    #[error("--jail: {what} failed: {source} (entering a mount namespace needs root and Linux 5.2 or later)")]
    Call {
        /// The call.
        what: &'static str,
        /// The system's error.
        source: io::Error,
    },
    /// After the switch, the root still shows something.
    #[error("--jail: the new root is not empty: {0}")]
    NotEmpty(String),
}

fn check(what: &'static str, rc: libc::c_long) -> Result<libc::c_long, JailError> {
    if rc < 0 {
        return Err(JailError::Call {
            what,
            source: io::Error::last_os_error(),
        });
    }
    Ok(rc)
}

// The mount API's constants (linux/mount.h), which the libc crate does not carry.
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Moves the calling process into a new mount namespace whose only mount is an empty,
/// read-only tmpfs at `/`. Call while the process has one thread (a process with several
/// cannot unshare its mount namespace) and still holds CAP_SYS_ADMIN.
pub fn enter_empty_root() -> Result<(), JailError> {
    // SAFETY: integer argument only.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    check("unshare(CLONE_NEWNS)", rc.into())?;
    // Nothing done in here may propagate back to the host's mounts.
    // SAFETY: NUL-terminated string literal and null pointers the call accepts.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    check("mount(/, MS_REC | MS_PRIVATE)", rc.into())?;

    // SAFETY: a NUL-terminated string literal and an integer; the result is a new descriptor.
    let fs = check("fsopen(tmpfs)", unsafe {
        libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), FSOPEN_CLOEXEC)
    })?;
    // SAFETY: `fs` is a descriptor fsopen just returned, owned by nothing else.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as i32) };
    let set = |key: &CStr, value: &CStr| -> Result<(), JailError> {
        // SAFETY: the descriptor is live and both strings are NUL-terminated and alive.
        check("fsconfig", unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        })
        .map(|_| ())
    };
    set(c"mode", c"0555")?;
    set(c"size", c"4k")?;
    set(c"nr_inodes", c"1")?;
    // SAFETY: the descriptor is live; the command takes no pointers.
    check("fsconfig(FSCONFIG_CMD_CREATE)", unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    })?;
    // SAFETY: the descriptor is live; integer flags only.
    let mnt = check("fsmount", unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        )
    })?;
    // SAFETY: `mnt` is a descriptor fsmount just returned, owned by nothing else.
    let mnt = unsafe { OwnedFd::from_raw_fd(mnt as i32) };
    // SAFETY: a live descriptor.
    let rc = unsafe { libc::fchdir(mnt.as_raw_fd()) };
    check("fchdir(new root)", rc.into())?;
    // SAFETY: a live descriptor and NUL-terminated string literals.
    check("move_mount(new root, /)", unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c"/".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    // SAFETY: NUL-terminated string literals.
    let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    if pivoted == 0 {
        // The old root now lies beneath the new one at the same place: detach it.
        // SAFETY: a NUL-terminated string literal and an integer flag.
        let rc = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
        check("umount2(old root, MNT_DETACH)", rc.into())?;
    } else if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // The host runs from its initial ramfs, which cannot be pivoted away from: make the
        // new root this process's root instead. The old one stays mounted beneath it, in this
        // namespace only, where no path leads (`..` of a root is itself) and nothing can be
        // mounted or chrooted again (no capabilities after the drop; the filters allow neither).
        // SAFETY: a NUL-terminated string literal.
        let rc = unsafe { libc::chroot(c".".as_ptr()) };
        check("chroot(.)", rc.into())?;
        log::info!("--jail: the host's root is its initial ramfs: chroot into the empty root");
    } else {
        check("pivot_root(., .)", pivoted)?;
    }
    // SAFETY: a NUL-terminated string literal.
    let rc = unsafe { libc::chdir(c"/".as_ptr()) };
    check("chdir(/)", rc.into())?;

    for dir in ["/", "/.."] {
        let left: Vec<String> = std::fs::read_dir(dir)
            .map_err(|source| JailError::Call {
                what: "reading the new root",
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        if !left.is_empty() {
            return Err(JailError::NotEmpty(format!("{dir}: {}", left.join(", "))));
        }
    }
    Ok(())
}
