//! How a guest asks to power off or reset: the ACPI hardware-reduced sleep control register
//! (FADT SLEEP_CONTROL_REG, `poweroff`), the ACPI reset register, and the i8042 keyboard
//! controller's reset line (`reboot=k`).
//!
//! Each hands the request to an [`ExitHandle`]; the VMM's event loop does the rest.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::layout::ACPI_RESET_VALUE;

/// Why the VM stops, and the VMM's exit code for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off: exit code 0.
    PowerOff,
    /// The guest reset (reboot, triple fault, `panic=-1`): exit code 2.
    Reset,
    /// The VMM hit a fatal error running the guest: exit code 1.
    Error,
    /// SIGTERM / SIGINT: exit code 128 + signal.
    Signal(i32),
}

impl ExitReason {
    /// The VMM's exit status for this reason (see the README's exit codes).
    pub fn exit_code(self) -> i32 {
        match self {
            ExitReason::PowerOff => 0,
            ExitReason::Error => 1,
            ExitReason::Reset => 2,
            ExitReason::Signal(s) => 128 + s,
        }
    }

    fn encode(self) -> i32 {
        match self {
            ExitReason::PowerOff => 1,
            ExitReason::Reset => 2,
            ExitReason::Error => 3,
            ExitReason::Signal(s) => 0x100 + s,
        }
    }

    fn decode(v: i32) -> Option<Self> {
        match v {
            1 => Some(ExitReason::PowerOff),
            2 => Some(ExitReason::Reset),
            3 => Some(ExitReason::Error),
            v if v >= 0x100 => Some(ExitReason::Signal(v - 0x100)),
            _ => None,
        }
    }
}

/// Shared by vCPU threads and devices: the first reason recorded wins; the eventfd wakes the
/// event loop.
pub struct ExitHandle {
    reason: AtomicI32,
    evt: EventFd,
}

impl ExitHandle {
    /// A handle with no reason recorded.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            reason: AtomicI32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// Records `reason` unless one was recorded before, and wakes the event loop.
    pub fn request(&self, reason: ExitReason) {
        let _ =
            self.reason
                .compare_exchange(0, reason.encode(), Ordering::SeqCst, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    /// The reason recorded first, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        ExitReason::decode(self.reason.load(Ordering::SeqCst))
    }

    /// Signalled on every request, for the event loop to watch.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// ACPI sleep control (offset 0) and reset (offset 1) registers, one byte each.
pub struct AcpiPower {
    exit: Arc<ExitHandle>,
}

impl AcpiPower {
    /// Registers that report power-off and reset to `exit`.
    pub fn new(exit: Arc<ExitHandle>) -> Self {
        Self { exit }
    }
}

/// SLP_EN in the sleep control register (ACPI 6.4 section 4.8.3.7).
const SLP_EN: u8 = 1 << 5;
/// The sleep type the DSDT's `_S5_` object announces for soft-off.
pub const S5_SLEEP_TYPE: u8 = 5;

impl BusDevice for AcpiPower {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 if v & SLP_EN != 0 && (v >> 2) & 0x7 == S5_SLEEP_TYPE => {
                self.exit.request(ExitReason::PowerOff)
            }
            1 if v == ACPI_RESET_VALUE => self.exit.request(ExitReason::Reset),
            _ => {}
        }
    }
}

/// Just enough of the i8042 keyboard controller for Linux to probe it and to reset through it.
pub struct I8042 {
    exit: Arc<ExitHandle>,
}

impl I8042 {
    /// A controller whose reset command reports to `exit`.
    pub fn new(exit: Arc<ExitHandle>) -> Self {
        Self { exit }
    }
}

/// Command 0xfe on port 0x64 pulses the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No data, input buffer empty: Linux finds no keyboard and moves on.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Registered at 0x60 with length 5, so the command port 0x64 is offset 4.
        if offset == 4 && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_sleep_request_powers_off_and_first_reason_wins() {
        let exit = ExitHandle::new().unwrap();
        let mut p = AcpiPower::new(exit.clone());
        p.write(0, &[(3 << 2) | SLP_EN]); // S3: ignored
        assert_eq!(exit.reason(), None);
        p.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        p.write(1, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        assert_eq!(exit.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn keyboard_controller_reset() {
        let exit = ExitHandle::new().unwrap();
        let mut k = I8042::new(exit.clone());
        k.write(0, &[CMD_RESET_CPU]); // data port: not a command
        assert_eq!(exit.reason(), None);
        k.write(4, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
        assert_eq!(ExitReason::Reset.exit_code(), 2);
        assert_eq!(ExitReason::Signal(15).exit_code(), 143);
    }
}
