//! The VMM: a KVM machine that boots Linux, with virtio-mmio devices for memory resizing.
//!
//! `main.rs` parses the command line; [`vm::Vm`] narrates the boot sequence. The guest physical
//! map is in [`layout`].

pub mod acpi;
pub mod api_bridge;
pub mod arch;
pub mod boot;
pub mod bus;
pub mod config;
pub mod configure;
pub mod devices;
pub mod event_loop;
pub mod jail;
pub mod layout;
pub mod lifecycle;
pub mod memory_timer;
pub mod privileges;
pub mod resize;
pub mod seccomp;
pub mod slots;
#[cfg(feature = "testing")]
pub mod testing;
pub mod vcpu;
pub mod vm;
