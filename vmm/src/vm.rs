//! Building and running one virtual machine, step by step:
//! 1. open KVM, create the VM with its in-kernel IOAPIC/PIC/LAPIC and PIT;
//! 2. create guest RAM through the memory manager, which registers it as KVM memory slots;
//! 3. put the platform devices (serial, power, keyboard controller) on the port I/O bus and the
//!    virtio-mmio devices on the MMIO bus, with irqfds and ioeventfds;
//! 4. write the ACPI tables, then the kernel, initramfs, command line and boot information;
//! 5. create and configure the vCPUs and start their threads;
//! 6. run the event loop until the guest powers off, resets, fails, or a signal arrives.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balloon::{Balloon, BalloonBackend, BalloonConfig, MemBackend, MemConfig, VirtioMem};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use log::info;
use memory::units::MIB;
use memory::{Backing, MemoryManager, RegionKind, RegionSpec};
use virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use virtio::VirtioDevice;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, MmioDeviceInfo};
use crate::boot;
use crate::bus::{Bus, BusDevice};
use crate::config::{BalloonOptions, HotplugOptions, SerialOut, VmConfig};
use crate::devices::power::{AcpiPower, ExitHandle, ExitReason, I8042};
use crate::devices::serial::SerialConsole;
use crate::event_loop::Control;
use crate::layout::{
    self, ACPI_SLEEP_PORT, COM1_IRQ, COM1_PORT, I8042_PORT, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR,
};
use crate::memory_timer::MemoryTimer;
use crate::slots::KvmSlots;
use crate::vcpu::{self, VcpuContext};

/// Why the VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and do you have access to it?)")]
    KvmOpen(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// More vCPUs than this host's KVM allows.
    #[error("{asked} vCPUs asked, but this host's KVM allows at most {max}")]
    TooManyVcpus {
        /// vCPUs asked for.
        asked: u8,
        /// KVM's limit.
        max: usize,
    },
    /// Guest memory could not be created.
    #[error("cannot allocate {mib} MiB of guest memory: {detail} (the host cannot map that much)")]
    Memory {
        /// How much was asked for.
        mib: u64,
        /// The manager's error.
        detail: String,
    },
    /// The kernel, initramfs or command line could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The ACPI tables could not be built or written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// A vCPU's boot state could not be set.
    #[error(transparent)]
    Regs(#[from] crate::arch::regs::RegsError),
    /// The serial output file could not be opened.
    #[error("cannot open serial output {path}: {source}")]
    SerialFile {
        /// The path given.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// More virtio devices than there are virtio-mmio slots.
    #[error("no free virtio-mmio slot: at most {0} devices")]
    TooManyDevices(usize),
    /// A device could not be created or placed.
    #[error("device set-up failed: {0}")]
    Device(String),
    /// The event loop could not be set up or failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// Any other system call failed.
    #[error("system error: {0}")]
    Io(#[from] std::io::Error),
}

/// The hot-add region: each plugged block is its own KVM memory slot (so unplugged memory is
/// not mapped into the guest at all): the blocks, and the `boot_slots` of boot RAM, must fit in
/// KVM's slot limit.
fn check_hotplug_slots(kvm: &Kvm, h: &HotplugOptions, boot_slots: u64) -> Result<(), VmError> {
    let blocks = h.total_mib / h.block_mib;
    let slots = kvm.get_nr_memslots() as u64;
    if blocks + boot_slots > slots {
        return Err(VmError::Device(format!(
            "hot-add memory of {} MiB in blocks of {} MiB needs {blocks} KVM memory \
             slots and this host allows {slots}: use blocks of at least {} MiB \
             (block_size_mib, --hotplug block_mib)",
            h.total_mib,
            h.block_mib,
            (h.total_mib / slots.saturating_sub(boot_slots).max(1)).next_power_of_two()
        )));
    }
    Ok(())
}

/// Where the guest console's output goes: the VMM's stdout, or a file appended to.
fn serial_output(serial: &SerialOut) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match serial {
        SerialOut::Stdout => Box::new(std::io::stdout()),
        SerialOut::File(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| VmError::SerialFile {
                    path: p.display().to_string(),
                    source,
                })?,
        ),
    })
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A device's event handler as the event loop holds it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A VM being built: everything before the vCPUs start.
pub struct Vm {
    config: VmConfig,
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    manager: Arc<Mutex<MemoryManager>>,
    /// The manager's wake-ups; also asked after every event-loop turn.
    memory_timer: Arc<Mutex<MemoryTimer>>,
    pio: Bus,
    mmio: Bus,
    virtio: Vec<MmioDeviceInfo>,
    serial: Arc<Mutex<SerialConsole>>,
    exit: Arc<ExitHandle>,
    event_manager: EventManager<Subscriber>,
    balloon: Option<Arc<Mutex<Balloon>>>,
    virtio_mem: Option<Arc<Mutex<VirtioMem>>>,
    vcpu_threads: Vec<std::thread::JoinHandle<()>>,
    /// Loaded and configured, not yet running ([`Vm::load`], [`Vm::start_vcpus`]).
    loaded_vcpus: Vec<kvm_ioctls::VcpuFd>,
}

impl Vm {
    /// Steps 1 to 3 for the platform devices. Virtio devices are added with
    /// [`Vm::add_virtio_device`] before [`Vm::run`].
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        Self::with_kvm(config, Kvm::new().map_err(VmError::KvmOpen)?)
    }

    /// [`Vm::new`] on an open /dev/kvm (opened before the process dropped its privileges).
    pub fn with_kvm(config: VmConfig, kvm: Kvm) -> Result<Self, VmError> {
        let max = kvm.get_max_vcpus();
        if config.vcpus as usize > max {
            return Err(VmError::TooManyVcpus {
                asked: config.vcpus,
                max,
            });
        }
        let vm_fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_err("set the TSS address"))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("set the identity map address"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("create the in-kernel interrupt controllers"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("create the PIT"))?;

        if let Some(host_mib) = host_memory_mib() {
            if config.memory_mib > host_mib {
                return Err(VmError::Memory {
                    mib: config.memory_mib,
                    detail: format!("the host has only {host_mib} MiB of RAM"),
                });
            }
        }
        let vm_fd = Arc::new(vm_fd);
        let specs = region_specs(&config);
        if let Some(h) = &config.hotplug {
            check_hotplug_slots(&kvm, h, specs.len() as u64 - 1)?;
        }
        let manager = memory_manager(&specs, Box::new(KvmSlots::new(vm_fd.clone())), &config)?;
        let mem = manager.guest_memory().clone();
        let manager = Arc::new(Mutex::new(manager));

        let exit = ExitHandle::new()?;
        let mut pio = Bus::new();
        let serial_irq = EventFd::new(EFD_NONBLOCK)?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("register the serial irqfd"))?;
        let out = serial_output(&config.serial)?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(serial_irq, out)));
        insert(&mut pio, serial.clone(), COM1_PORT as u64, 8)?;
        insert(
            &mut pio,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            I8042_PORT as u64,
            5,
        )?;
        insert(
            &mut pio,
            Arc::new(Mutex::new(AcpiPower::new(exit.clone()))),
            ACPI_SLEEP_PORT as u64,
            2,
        )?;

        let mut event_manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
        let memory_timer = Arc::new(Mutex::new(MemoryTimer::new(manager.clone())));
        event_manager.add_subscriber(memory_timer.clone());
        let balloon_opts = config.balloon.clone();
        let hotplug_opts = config.hotplug;
        let mut vm = Self {
            config,
            kvm,
            vm_fd,
            mem,
            manager,
            memory_timer,
            pio,
            mmio: Bus::new(),
            virtio: Vec::new(),
            serial,
            exit,
            event_manager,
            balloon: None,
            virtio_mem: None,
            vcpu_threads: Vec::new(),
            loaded_vcpus: Vec::new(),
        };
        if let Some(opts) = balloon_opts {
            vm.add_balloon(&opts)?;
        }
        if let Some(opts) = hotplug_opts {
            vm.add_virtio_mem(&opts)?;
        }
        Ok(vm)
    }

    /// The virtio-mem device over the hot-add region.
    fn add_virtio_mem(&mut self, opts: &HotplugOptions) -> Result<(), VmError> {
        let dev = virtio_mem_device(opts, &self.manager, self.config.memory_bytes())?;
        let dev = Arc::new(Mutex::new(dev));
        self.add_virtio_device(dev.clone(), dev.clone())?;
        self.virtio_mem = Some(dev);
        Ok(())
    }

    /// The virtio-mem device, if configured.
    pub fn virtio_mem(&self) -> Option<Arc<Mutex<VirtioMem>>> {
        self.virtio_mem.clone()
    }

    /// The virtio-balloon, releasing memory through the memory manager.
    fn add_balloon(&mut self, opts: &BalloonOptions) -> Result<(), VmError> {
        let dev = balloon_device(opts, &self.manager, self.config.memory_bytes())?;
        let dev = Arc::new(Mutex::new(dev));
        self.add_virtio_device(dev.clone(), dev.clone())?;
        self.balloon = Some(dev);
        Ok(())
    }

    /// The balloon device, if configured.
    pub fn balloon(&self) -> Option<Arc<Mutex<Balloon>>> {
        self.balloon.clone()
    }

    /// The guest-memory manager (offline tracking, discard, hot-add).
    pub fn memory_manager(&self) -> Arc<Mutex<MemoryManager>> {
        self.manager.clone()
    }

    /// Put a virtio device behind a virtio-mmio window: bus, ioeventfds on QueueNotify, irqfd.
    /// `subscriber` is the same device as an event-loop subscriber.
    pub fn add_virtio_device(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        subscriber: Subscriber,
    ) -> Result<(), VmError> {
        let index = self.virtio.len();
        let gsi = *layout::VIRTIO_IRQS
            .get(index)
            .ok_or(VmError::TooManyDevices(layout::VIRTIO_IRQS.len()))?;
        let addr = layout::virtio_mmio_addr(index);
        let transport = MmioTransport::new(device, self.mem.clone())?;
        for (q, fd) in transport.queue_notify_fds().iter().enumerate() {
            self.vm_fd
                .register_ioevent(
                    fd.as_ref(),
                    &IoEventAddress::Mmio(addr + QUEUE_NOTIFY_OFFSET),
                    q as u32,
                )
                .map_err(kvm_err("register a queue ioeventfd"))?;
        }
        self.vm_fd
            .register_irqfd(transport.interrupt().fd(), gsi)
            .map_err(kvm_err("register a virtio irqfd"))?;
        insert(
            &mut self.mmio,
            Arc::new(Mutex::new(transport)),
            addr,
            MMIO_WINDOW_SIZE,
        )?;
        self.event_manager.add_subscriber(subscriber);
        self.virtio.push(MmioDeviceInfo {
            addr,
            len: MMIO_WINDOW_SIZE,
            gsi,
        });
        Ok(())
    }

    /// Where a stop is requested: the signal thread (`lifecycle`) asks through it.
    pub fn exit_handle(&self) -> Arc<ExitHandle> {
        self.exit.clone()
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Add an event-loop subscriber that is not a virtio device (e.g. the API bridge).
    pub fn add_subscriber(&mut self, s: Subscriber) {
        self.event_manager.add_subscriber(s);
    }

    /// Steps 4 and 5: load the guest and start the vCPUs. A failure leaves no vCPU running.
    pub fn start(&mut self) -> Result<(), VmError> {
        self.load()?;
        self.start_vcpus()
    }

    /// Step 4 and the first half of 5: write the ACPI tables, load the kernel, initramfs and
    /// command line, create and configure the vCPUs; nothing runs yet. The files are read here:
    /// a VMM that drops its privileges does so after this ([`Vm::start_vcpus`] then).
    pub fn load(&mut self) -> Result<(), VmError> {
        let tables = acpi::build(self.config.vcpus, &self.virtio)?;
        tables.write(&self.mem)?;
        let boot = boot::load(
            &self.mem,
            self.config.memory_bytes(),
            &self.config.kernel,
            self.config.initramfs.as_deref(),
            &self.config.cmdline,
            tables.rsdp_addr,
        )?;

        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report supported CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..self.config.vcpus {
            let fd = self
                .vm_fd
                .create_vcpu(id as u64)
                .map_err(kvm_err("create a vCPU"))?;
            vcpu::configure(
                &fd,
                id,
                self.config.vcpus,
                &supported,
                &self.mem,
                boot.entry,
            )?;
            vcpus.push(fd);
        }
        info!("loaded: {} vCPU(s), entry {:?}", vcpus.len(), boot.entry);
        self.loaded_vcpus = vcpus;
        Ok(())
    }

    /// The second half of step 5: start a thread per loaded vCPU ([`Vm::load`] first).
    pub fn start_vcpus(&mut self) -> Result<(), VmError> {
        let vcpus = std::mem::take(&mut self.loaded_vcpus);
        if vcpus.is_empty() {
            return Err(VmError::Device(
                "no vCPUs to start: the VM was not loaded".into(),
            ));
        }
        let ctx = Arc::new(VcpuContext {
            pio: Arc::new(std::mem::take(&mut self.pio)),
            mmio: Arc::new(std::mem::take(&mut self.mmio)),
            exit: self.exit.clone(),
        });
        info!(
            "starting {} vCPU(s) with {} MiB",
            self.config.vcpus, self.config.memory_mib
        );
        vcpu::install_kick_handler()?;
        for (id, fd) in vcpus.into_iter().enumerate() {
            self.vcpu_threads
                .push(vcpu::spawn(id as u8, fd, ctx.clone())?);
        }
        Ok(())
    }

    /// Step 6: serve devices and the API until the VM stops; returns why. The vCPUs
    /// are stopped before guest memory can be unmapped.
    pub fn run_until_exit(mut self) -> Result<ExitReason, VmError> {
        let result = match Control::new(self.exit.clone(), self.serial.clone()) {
            Ok(control) => {
                self.event_manager
                    .add_subscriber(Arc::new(Mutex::new(control)));
                // The filter goes on before the first turn: every event served is filtered.
                match crate::seccomp::enter(crate::seccomp::ThreadKind::Vmm) {
                    Ok(()) => self.serve(),
                    Err(e) => {
                        self.exit.request(ExitReason::Error);
                        Err(VmError::EventLoop(e.to_string()))
                    }
                }
            }
            Err(e) => {
                self.exit.request(ExitReason::Error);
                Err(VmError::Io(e))
            }
        };
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush();
        let threads = std::mem::take(&mut self.vcpu_threads);
        if !vcpu::stop_all(threads, Duration::from_secs(2)) {
            // A vCPU may still be in the guest: keep its memory mapped until the process exits.
            std::mem::forget(self);
        }
        result
    }

    /// The event loop proper, until an exit is requested.
    fn serve(&mut self) -> Result<ExitReason, VmError> {
        loop {
            if let Err(e) = self.event_manager.run() {
                self.exit.request(ExitReason::Error);
                return Err(VmError::EventLoop(format!("{e:?}")));
            }
            self.memory_timer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .after_turn();
            if let Some(reason) = self.exit.reason() {
                return Ok(reason);
            }
        }
    }
}

/// Guest RAM for `config` as memory-manager regions: boot RAM around the 32-bit MMIO hole, then
/// the hot-add region (reserved address space only, born offline). Used by [`Vm::new`] and the
/// headless VMM of the tests.
pub fn region_specs(config: &VmConfig) -> Vec<RegionSpec> {
    let backing = if config.thp {
        Backing::PrivateAnonymousHuge
    } else {
        Backing::PrivateAnonymous
    };
    let mut specs: Vec<RegionSpec> = layout::ram_ranges(config.memory_bytes())
        .into_iter()
        .map(|(guest_addr, size)| RegionSpec {
            guest_addr,
            size,
            backing,
            kind: RegionKind::BootRam,
        })
        .collect();
    if let Some(h) = &config.hotplug {
        specs.push(RegionSpec {
            guest_addr: layout::hotplug_base(config.memory_bytes()),
            size: h.total_mib * MIB,
            backing,
            kind: RegionKind::Hotplug {
                block_size: h.block_mib * MIB,
            },
        });
    }
    specs
}

/// The memory manager over `specs`, registering slots through `slots`.
pub fn memory_manager(
    specs: &[RegionSpec],
    slots: Box<dyn memory::SlotMapper>,
    config: &VmConfig,
) -> Result<MemoryManager, VmError> {
    // Inflates are acknowledged first; the manager releases their host memory afterwards
    // (16 MiB batches right after the turn that filled them, or after 2 ms without inflates:
    // memory_timer.rs), so the guest's wait per request is the device's, not madvise's.
    let manager = MemoryManager::new(specs, slots).map_err(|e| VmError::Memory {
        mib: config.memory_mib,
        detail: e.to_string(),
    })?;
    Ok(manager)
}

/// The virtio-balloon for the user's options, backed by the memory manager.
pub fn balloon_device(
    opts: &BalloonOptions,
    manager: &Arc<Mutex<MemoryManager>>,
    memory_bytes: u64,
) -> Result<Balloon, VmError> {
    let cfg = BalloonConfig {
        amount_mib: opts.amount_mib,
        stats: opts.stats_interval_s > 0,
        stats_interval: Duration::from_secs(opts.stats_interval_s),
        deflate_on_oom: opts.deflate_on_oom,
        free_page_reporting: opts.free_page_reporting,
        ..BalloonConfig::default()
    };
    // The manager is the balloon's backend (balloon::manager implements it).
    let backend: Arc<dyn BalloonBackend> = manager.clone();
    let mut dev = Balloon::new(cfg, backend).map_err(|e| VmError::Device(e.to_string()))?;
    dev.set_guest_ram_bytes(memory_bytes);
    Ok(dev)
}

/// The virtio-mem device over the hot-add region, backed by the memory manager.
pub fn virtio_mem_device(
    opts: &HotplugOptions,
    manager: &Arc<Mutex<MemoryManager>>,
    memory_bytes: u64,
) -> Result<VirtioMem, VmError> {
    let mut cfg = MemConfig::new(layout::hotplug_base(memory_bytes), opts.total_mib * MIB);
    cfg.block_size = opts.block_mib * MIB;
    cfg.requested_size = opts.requested_mib * MIB;
    let backend: Arc<dyn MemBackend> = manager.clone();
    VirtioMem::new(cfg, backend).map_err(|e| VmError::Device(e.to_string()))
}

fn insert(
    bus: &mut Bus,
    dev: Arc<Mutex<dyn BusDevice>>,
    base: u64,
    len: u64,
) -> Result<(), VmError> {
    bus.insert(dev, base, len)
        .map_err(|e| VmError::Device(e.to_string()))
}

/// The virtio-mmio transport sits on the MMIO bus as it is.
impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
}

/// The host's physical memory (MemTotal), if /proc/meminfo says.
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib >> 10)
}
