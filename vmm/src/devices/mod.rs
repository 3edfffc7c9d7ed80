//! Platform devices the VMM emulates itself: the serial console and the few legacy and ACPI
//! registers a guest uses to power off or reset.

pub mod power;
pub mod serial;
