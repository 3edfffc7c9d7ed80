//! The test host: where VMMs run (this machine, or the nested test host), started once per
//! test binary and shared by its tests; guest image paths, commands, and starting VMMs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::agent::{agent_binary, agent_call, agent_spawn, boot_testhost, run_script, vmm_binary};
use crate::hostfiles::HostFiles;
use crate::proto::Request;
use crate::supervisor::Proc;
use crate::vm::{Backend, Shared, Vm};
use crate::{detect_mode, loud, repo_root, supervisor, Error, Exit, Mode};

/// Where the VMMs run.
pub struct TestHost {
    mode: Mode,
    /// The VMM where it runs, or why there is none (the harness itself still works).
    vmm: Result<String, String>,
    /// `E2E_VMM_BASELINE`'s VMM where it runs.
    baseline: Option<String>,
    guest_dir: String,
    scratch: String,
    agent: Option<SocketAddr>,
    /// Nested mode: the test host's console log and QEMU monitor, for [`HostFiles::report`].
    files: Option<Arc<HostFiles>>,
    next_vm: AtomicU64,
    /// Nested mode: seconds from starting QEMU until the agent reported /dev/kvm.
    boot_secs: f64,
}

/// Why there is no test host: nothing on this machine can run a VMM (tests skip), or starting
/// one failed (tests fail).
#[derive(Debug, Clone)]
enum NoHost {
    Unavailable(String),
    Failed(String),
}

static SHARED: OnceLock<Result<TestHost, NoHost>> = OnceLock::new();

/// The shared test host, or `None` after printing SKIPPED when this machine can run no VMM
/// (and `E2E_REQUIRE` is unset). Use as `let Some(host) = e2e::host() else { return };`.
pub fn host() -> Option<&'static TestHost> {
    match TestHost::get() {
        Ok(h) => Some(h),
        Err(Some(why)) if std::env::var_os("E2E_REQUIRE").is_none() => {
            loud(&format!("\n*** e2e: SKIPPED: {why} ***\n"));
            println!("e2e: SKIPPED: {why}");
            None
        }
        Err(Some(why)) => panic!("e2e: E2E_REQUIRE is set but no test host is possible: {why}"),
        Err(None) => panic!("e2e: the test host failed to start (see above)"),
    }
}

impl TestHost {
    /// The test host of this test binary, started on first use. Panics when it cannot start.
    pub fn shared() -> &'static TestHost {
        match Self::get() {
            Ok(h) => h,
            Err(Some(why)) => panic!("e2e: no test host possible: {why}"),
            Err(None) => panic!("e2e: the test host failed to start (see above)"),
        }
    }

    /// The shared host; `Err(Some(why))` when none is possible here, `Err(None)` when starting
    /// it failed (the reason is printed once, when it happened).
    fn get() -> Result<&'static TestHost, Option<String>> {
        let r = SHARED.get_or_init(|| {
            let r = Self::start();
            match &r {
                Ok(h) => {
                    let line = match h.mode {
                        Mode::Direct => "e2e: mode=direct (this machine's KVM)".to_string(),
                        Mode::Nested => format!(
                            "e2e: mode=nested (QEMU TCG + kvm_amd), test host up with /dev/kvm \
                             {:.1} s after QEMU started",
                            h.boot_secs
                        ),
                    };
                    loud(&format!("\n*** {line} ***\n"));
                }
                Err(NoHost::Failed(e)) => {
                    loud(&format!("\n*** e2e: the test host failed: {e} ***\n"))
                }
                Err(NoHost::Unavailable(_)) => {}
            }
            r
        });
        match r {
            Ok(h) => {
                println!("e2e: mode={}", h.mode);
                Ok(h)
            }
            Err(NoHost::Unavailable(why)) => Err(Some(why.clone())),
            Err(NoHost::Failed(_)) => Err(None),
        }
    }

    fn start() -> Result<TestHost, NoHost> {
        let (mode, why) = detect_mode().map_err(NoHost::Unavailable)?;
        Self::start_in(mode, &why).map_err(NoHost::Failed)
    }

    fn start_in(mode: Mode, why: &str) -> Result<TestHost, String> {
        loud(&format!("e2e: mode {mode}: {why}"));
        let root = repo_root();
        run_script(&root.join("resources/build-guest.sh"), &[])?;
        let vmm = vmm_binary(&root);
        if let Err(e) = &vmm {
            loud(&format!(
                "e2e: WARNING: no VMM binary, VMs cannot start: {e}"
            ));
        }
        let baseline = match std::env::var_os("E2E_VMM_BASELINE").map(PathBuf::from) {
            Some(p) if !p.is_file() => {
                return Err(format!("E2E_VMM_BASELINE={} is not a file", p.display()))
            }
            p => p,
        };
        let build = root.join("build");
        match mode {
            Mode::Direct => {
                let scratch = build.join(format!("e2e-{}", std::process::id()));
                std::fs::create_dir_all(&scratch).map_err(|e| format!("{scratch:?}: {e}"))?;
                Ok(TestHost {
                    mode,
                    vmm: vmm.map(|p| p.display().to_string()),
                    baseline: baseline.map(|p| p.display().to_string()),
                    guest_dir: build.join("guest").display().to_string(),
                    scratch: scratch.display().to_string(),
                    agent: None,
                    files: None,
                    next_vm: AtomicU64::new(0),
                    boot_secs: 0.0,
                })
            }
            Mode::Nested => {
                let agent_bin = agent_binary()?;
                let t = Instant::now();
                let (addr, files) =
                    boot_testhost(&root, vmm.as_deref().ok(), baseline.as_deref(), &agent_bin)?;
                let boot_secs = t.elapsed().as_secs_f64();
                Ok(TestHost {
                    mode,
                    vmm: vmm.map(|_| "/bin/vmm".to_string()),
                    baseline: baseline.map(|_| "/bin/vmm-baseline".to_string()),
                    guest_dir: "/guest".into(),
                    scratch: "/tmp".into(),
                    agent: Some(addr),
                    files: Some(Arc::new(files)),
                    next_vm: AtomicU64::new(0),
                    boot_secs,
                })
            }
        }
    }

    /// Whether this host runs VMMs directly or in the nested test host.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The `E2E_VMM_BASELINE` VMM as a path where the VMMs run, to start with
    /// [`TestHost::start_process`] beside the VMM under test.
    pub fn baseline_vmm(&self) -> Option<&str> {
        self.baseline.as_deref()
    }

    /// The guest bzImage, as a path where the VMM runs.
    pub fn guest_kernel(&self) -> String {
        format!("{}/bzImage", self.guest_dir)
    }

    /// The guest's ELF vmlinux (extracted from the same bzImage), as a path where the VMM runs.
    pub fn guest_vmlinux(&self) -> String {
        format!("{}/vmlinux", self.guest_dir)
    }

    /// The guest initramfs, as a path where the VMM runs.
    pub fn guest_initramfs(&self) -> String {
        format!("{}/initramfs.cpio.gz", self.guest_dir)
    }

    /// A fresh path for a Unix socket (the VMM's API) where the VMM runs.
    pub fn socket_path(&self, name: &str) -> String {
        let n = self.next_vm.fetch_add(1, Ordering::SeqCst);
        format!("{}/{name}-{}-{n}.sock", self.scratch, std::process::id())
    }

    /// Runs a command where the VMM runs (e.g. `dmesg`); returns its exit and output.
    pub fn exec(&self, argv: &[&str], timeout: Duration) -> Result<(Exit, String), Error> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        match self.agent {
            None => Ok(supervisor::exec(&argv, timeout)?),
            Some(addr) => {
                let r = agent_call(
                    addr,
                    &Request::Exec {
                        argv,
                        timeout_ms: timeout.as_millis() as u64,
                    },
                )?;
                Ok((
                    r.exit.unwrap_or(Exit::Code(-1)),
                    r.stdout.unwrap_or_default(),
                ))
            }
        }
    }

    /// Starts `vmm VMM_ARGS...`. The VMM's API socket, if any, is taken from `--api-sock PATH`
    /// (or `--api-socket PATH`) in the arguments.
    ///
    /// `E2E_SECCOMP=on|log|off` adds `--seccomp=MODE` (default: the VMM's own default, on). With
    /// `log` a missing system call does not end the VMM: it is logged, and the test fails when
    /// its [`Vm`] is dropped (see [`Vm::seccomp_lines`]), so one run lists every missing call.
    pub fn start_vm(&self, vmm_args: &[&str]) -> Result<Vm, Error> {
        let vmm = self.vmm.clone().map_err(Error::Unavailable)?;
        let mut argv = vec![vmm.as_str()];
        let mode = std::env::var("E2E_SECCOMP")
            .ok()
            .map(|m| format!("--seccomp={m}"));
        if let Some(m) = &mode {
            argv.push(m);
        }
        argv.extend(vmm_args);
        self.start_process(&argv)
    }

    /// Starts any program where the VMM runs, as a [`Vm`] (stdout is its "console"). The
    /// harness's own tests use it with a shell.
    pub fn start_process(&self, argv: &[&str]) -> Result<Vm, Error> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let api_socket = argv
            .windows(2)
            .find(|w| w[0] == "--api-sock" || w[0] == "--api-socket")
            .map(|w| w[1].to_string());
        let shared = Arc::new(Shared::default());
        let backend = match self.agent {
            None => {
                let sink = shared.clone();
                Backend::Local(Proc::spawn(&argv, move |ev| sink.push(ev))?)
            }
            Some(addr) => {
                let (id, conn) = agent_spawn(addr, &argv, shared.clone()).inspect_err(|e| {
                    // A test host that stops answering is gone for the rest of the binary: say
                    // what its kernel and QEMU show where the failure is reported.
                    if let Some(f) = &self.files {
                        eprintln!(
                            "e2e: the test host's agent failed ({e}); its state:\n{}",
                            f.report()
                        );
                    }
                })?;
                Backend::Remote { addr, id, conn }
            }
        };
        eprintln!("e2e: started {}", argv.join(" "));
        Ok(Vm {
            shared,
            backend,
            api_socket: Mutex::new(api_socket),
            cursor: Mutex::new(0),
            run_seq: AtomicU64::new(0),
            argv,
            host: self.files.clone(),
        })
    }
}
