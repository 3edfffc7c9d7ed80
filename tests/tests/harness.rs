//! The harness itself, driven with a shell in place of the VMM: console lines, waiting for
//! markers, typing commands, RSS, signals and exit codes, in whichever mode this machine uses.
//! These need no working VMM, so they tell a harness bug from a VMM bug.

use std::time::Duration;

use e2e::Mode;

const T: Duration = Duration::from_secs(60);

fn shell(host: &e2e::TestHost) -> e2e::Vm {
    let vm = host
        .start_process(&["sh", "-c", "echo booting; echo VMM-GUEST-READY; exec sh"])
        .expect("start a shell");
    vm.wait_for("VMM-GUEST-READY", T).expect("ready line");
    vm
}

#[test]
fn console_lines_markers_and_commands() {
    let Some(host) = e2e::host() else { return };
    let vm = shell(host);
    assert!(vm.console().starts_with("booting\nVMM-GUEST-READY\n"));
    assert_eq!(vm.run("echo one; echo two", T).unwrap(), "one\ntwo\n");
    assert_eq!(vm.run("uname -s", T).unwrap(), "Linux\n");
    let (status, out) = vm
        .run_status("echo oops; exit_code() { return 3; }; exit_code", T)
        .unwrap();
    assert_eq!((status, out.as_str()), (3, "oops\n"));
    assert!(matches!(
        vm.run("false", T),
        Err(e2e::Error::Command { status: 1, .. })
    ));
    // wait_for only looks past its previous match.
    vm.send_console("echo MARK-1; echo MARK-2\n");
    assert_eq!(vm.wait_for("MARK-", T).unwrap(), "MARK-1");
    assert_eq!(vm.wait_for("MARK-", T).unwrap(), "MARK-2");
    let err = vm
        .wait_for("never printed", Duration::from_secs(1))
        .unwrap_err();
    assert!(
        err.to_string().contains("MARK-2"),
        "the error shows the console tail: {err}"
    );
}

#[test]
fn rss_signal_and_exit_status() {
    let Some(host) = e2e::host() else { return };
    let vm = shell(host);
    let rss = vm.rss_kib().expect("rss");
    assert!(
        rss > 0 && rss < 1 << 20,
        "a shell's RSS is a few hundred KiB, got {rss}"
    );
    vm.signal(libc::SIGTERM);
    assert_eq!(
        vm.wait_exit_status(T).unwrap(),
        e2e::Exit::Signal(libc::SIGTERM)
    );
    assert_eq!(vm.wait_exit(T).unwrap(), 128 + libc::SIGTERM);
    let err = vm.wait_for("anything", T).unwrap_err();
    assert!(matches!(err, e2e::Error::Exited { .. }), "{err}");

    let vm = host.start_process(&["sh", "-c", "exit 7"]).unwrap();
    assert_eq!(vm.wait_exit(T).unwrap(), 7);
}

#[test]
fn test_host_has_kvm_and_guest_image() {
    let Some(host) = e2e::host() else { return };
    let (exit, out) = host
        .exec(
            &["ls", "-l", &host.guest_kernel(), &host.guest_initramfs()],
            T,
        )
        .unwrap();
    assert_eq!(
        exit,
        e2e::Exit::Code(0),
        "guest image missing where the VMM runs: {out}"
    );
    if host.mode() == Mode::Nested {
        let (_, dmesg) = host.exec(&["dmesg"], T).unwrap();
        assert!(
            dmesg.contains("Nested Paging enabled"),
            "kvm_amd without NPT:\n{dmesg}"
        );
        let (exit, _) = host.exec(&["test", "-c", "/dev/kvm"], T).unwrap();
        assert_eq!(exit, e2e::Exit::Code(0), "no /dev/kvm in the test host");
    }
}
