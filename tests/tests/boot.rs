//! Booting end to end: Debian's stock kernel and our busybox initramfs (resources/build-guest.sh)
//! boot under the VMM, see their memory and vCPUs, find a virtio-mmio device through ACPI, and
//! the VMM ends the way the user asked (guest power off: 0; SIGTERM: 128 + 15, by itself).
//!
//! Runs directly on a host whose KVM boots stock kernels, in the nested test host otherwise
//! (see e2e's crate docs). The first test to run boots the test host (~10-30 s).

use std::time::Duration;

use e2e::{Exit, Mode, TestHost, Vm, GUEST_CMDLINE, READY};

/// Boot to the ready marker: a few seconds on hardware KVM; 20-60 s in the nested host under
/// load (the guest runs on KVM inside QEMU TCG).
fn boot_timeout(host: &TestHost) -> Duration {
    match host.mode() {
        Mode::Direct => Duration::from_secs(60),
        Mode::Nested => Duration::from_secs(300),
    }
}

const CMD: Duration = Duration::from_secs(60);

/// Starts the default guest (bzImage) with a virtio-balloon and the given scenario.
fn boot(host: &TestHost, vcpus: u32, memory_mib: u32, scenario: &str) -> Vm {
    boot_kernel(host, &host.guest_kernel(), vcpus, memory_mib, scenario)
}

fn boot_kernel(host: &TestHost, kernel: &str, vcpus: u32, memory_mib: u32, scenario: &str) -> Vm {
    let cmdline = format!("{GUEST_CMDLINE} scenario={scenario}");
    let (vcpus, memory) = (vcpus.to_string(), memory_mib.to_string());
    host.start_vm(&[
        "--kernel",
        kernel,
        "--initramfs",
        &host.guest_initramfs(),
        "--cmdline",
        &cmdline,
        "--vcpus",
        &vcpus,
        "--memory-mib",
        &memory,
        "--balloon",
        "",
    ])
    .expect("start the VMM")
}

/// MemTotal is RAM minus what the kernel keeps: its own image (~45 MiB for Debian's 6.1),
/// the page structs (1.6 %) and early allocations. Allow 64 MiB + 3 %.
fn assert_memtotal(vm: &Vm, memory_mib: u64) {
    let kib: u64 = vm
        .console_value("GUEST-MEMTOTAL-KIB")
        .expect("the guest prints GUEST-MEMTOTAL-KIB")
        .parse()
        .expect("a number");
    let ram = memory_mib * 1024;
    let slack = 64 * 1024 + ram * 3 / 100;
    assert!(
        kib <= ram && kib + slack >= ram,
        "guest MemTotal {kib} KiB for --memory-mib {memory_mib} ({ram} KiB): expected {}..={ram}\n{}",
        ram - slack,
        vm.console()
    );
}

fn assert_balloon_bound(vm: &Vm) {
    let line = vm
        .find_line("GUEST-VIRTIO-DRIVER virtio_balloon ")
        .unwrap_or_else(|| {
            panic!(
            "virtio_balloon bound no device: the virtio-mmio window was not found through ACPI \
             (DSDT LNRO0005) or the transport failed\n{}\n--- VMM stderr ---\n{}",
            vm.console(),
            vm.stderr()
        )
        });
    assert!(line.contains("virtio"), "{line}");
}

/// The guest's kernel log has no warning splat (e.g. Linux's "XSAVE consistency problem" when
/// CPUID leaf 0xD disagrees with XCR0) and no CMOS RTC driver: the machine has no RTC, and
/// probing the empty ports stalled every boot for seconds. Only matching lines
/// cross the (slow) serial console.
fn assert_clean_kernel_log(vm: &Vm) {
    let found = vm
        .run(
            "dmesg | grep -E 'cut here|XSAVE consistency|rtc_cmos|Call Trace' || true",
            CMD,
        )
        .unwrap();
    assert!(
        found.trim().is_empty(),
        "the guest's kernel log has warnings or an RTC probe:\n{found}"
    );
}

fn boots_and_sees_its_machine(vcpus: u32, memory_mib: u32) {
    let host = TestHost::shared();
    let vm = boot(host, vcpus, memory_mib, "stay");
    vm.wait_for(READY, boot_timeout(host)).unwrap();
    println!(
        "guest up: MemTotal {} KiB, nproc {}, uptime {} s",
        vm.console_value("GUEST-MEMTOTAL-KIB").unwrap_or_default(),
        vm.console_value("GUEST-NPROC").unwrap_or_default(),
        vm.console_value("GUEST-UPTIME").unwrap_or_default()
    );
    assert_eq!(
        vm.console_value("GUEST-NPROC").as_deref(),
        Some(vcpus.to_string().as_str()),
        "the guest sees the wrong number of vCPUs\n{}",
        vm.console()
    );
    assert_memtotal(&vm, memory_mib.into());
    assert_balloon_bound(&vm);
    assert_clean_kernel_log(&vm);
    // The serial console takes input too: the guest's shell answers.
    assert_eq!(vm.run("nproc", CMD).unwrap().trim(), vcpus.to_string());
    assert!(
        vm.exit_status().is_none(),
        "the VMM ended while the guest was up"
    );
}

#[test]
fn boots_debian_with_1_vcpu() {
    let Some(_) = e2e::host() else { return };
    boots_and_sees_its_machine(1, 256);
}

#[test]
fn boots_debian_with_2_vcpus() {
    let Some(_) = e2e::host() else { return };
    boots_and_sees_its_machine(2, 512);
}

#[test]
fn boots_the_elf_vmlinux() {
    let Some(host) = e2e::host() else { return };
    let vm = boot_kernel(host, &host.guest_vmlinux(), 1, 256, "poweroff");
    vm.wait_for(READY, boot_timeout(host)).unwrap();
    assert_eq!(vm.wait_exit_status(CMD).unwrap(), Exit::Code(0));
}

#[test]
fn guest_power_off_ends_the_vmm_with_0() {
    let Some(host) = e2e::host() else { return };
    let vm = boot(host, 1, 256, "poweroff");
    vm.wait_for(READY, boot_timeout(host)).unwrap();
    vm.wait_for("GUEST-POWEROFF", CMD).unwrap();
    let exit = vm.wait_exit_status(CMD).unwrap();
    assert_eq!(
        exit,
        Exit::Code(0),
        "guest power off must end the VMM with 0\n{}\n--- VMM stderr ---\n{}",
        vm.console(),
        vm.stderr()
    );
}

#[test]
fn sigterm_ends_the_vmm_cleanly() {
    let Some(host) = e2e::host() else { return };
    let vm = boot(host, 2, 256, "stay");
    vm.wait_for(READY, boot_timeout(host)).unwrap();
    vm.signal(libc::SIGTERM);
    let exit = vm.wait_exit_status(CMD).unwrap();
    // The VMM handles the signal and exits by itself with 128 + 15; dying of it is not clean.
    assert_eq!(
        exit,
        Exit::Code(128 + libc::SIGTERM),
        "SIGTERM must make the VMM exit by itself with 143\n--- VMM stderr ---\n{}",
        vm.stderr()
    );
    assert!(!vm.stderr().contains("panicked"), "{}", vm.stderr());
}

#[test]
fn rest_api_answers_on_its_unix_socket() {
    let Some(host) = e2e::host() else { return };
    let socket = host.socket_path("api");
    let cmdline = format!("{GUEST_CMDLINE} scenario=stay");
    let vm = host
        .start_vm(&[
            "--kernel",
            &host.guest_kernel(),
            "--initramfs",
            &host.guest_initramfs(),
            "--cmdline",
            &cmdline,
            "--memory-mib",
            "256",
            "--api-socket",
            &socket,
        ])
        .expect("start the VMM");
    vm.wait_for(READY, boot_timeout(host)).unwrap();
    let (status, body) = vm.api("GET", "/", None).unwrap();
    assert_eq!(status, 200, "GET / answered {status}: {body}");
    let (status, body) = vm.api("GET", "/no-such-route", None).unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("fault_message"), "{body}");
}
