//! The VMM's API path without KVM, for tests, demos and the API benchmark (`testing` feature).
//!
//! [`HeadlessVmm::serve`] runs the API server and, behind it, what `main` runs: the real
//! configuration phase ([`configure_until_start`]), and on `InstanceStart` the real handler
//! ([`ApiHandler`]) and its direct reads, the real virtio-balloon and virtio-mem devices and the
//! real memory manager over guest memory that is really mapped, on an event loop of their own.
//! Only KVM is missing: no vCPU runs, memory slots are registered with nobody, and a
//! [`guest::Guest`] stands in for Linux's drivers, moving the balloon and the plugged size
//! through the devices' queues when told to ([`HeadlessVmm::settle`]) or at a steady pace.
//!
//! So every rule and message a client sees here is the VMM's own: no second implementation to
//! drift from it.

pub mod guest;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use api::{
    ApiMessage, ApiRequest, ApiResponse, ApiResult, DirectReads, ServerConfig, ServerHandle,
};
use balloon::testing::NoSlots;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::api_bridge::{
    configure_until_start, start_failed, ApiHandler, RunningVm, StartDecision, VmView,
};
use crate::config::{PartialConfig, VmConfig};
use crate::vm::{self, Subscriber, VmError};
use guest::Guest;

/// How the simulated guest follows the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestPace {
    /// Only when the test asks ([`HeadlessVmm::settle`]): tests see exact states, no clock.
    OnRequest,
    /// Every `every`, at most `balloon_mib` of balloon and `hotplug_mib` of plugging: progress
    /// a client polling the API can watch (vmmctl `--wait`, the benchmark).
    Steady {
        /// How often the guest moves.
        every: Duration,
        /// Most balloon change per step, MiB.
        balloon_mib: u64,
        /// Most plugging per step, MiB.
        hotplug_mib: u64,
    },
}

/// How the headless VMM behaves.
#[derive(Debug, Clone, Copy)]
pub struct HeadlessOptions {
    /// How the simulated guest follows the devices.
    pub guest: GuestPace,
    /// Delay before the VMM thread gets each request (to test the server's timeout).
    pub reply_delay: Duration,
}

impl Default for HeadlessOptions {
    fn default() -> Self {
        Self {
            guest: GuestPace::OnRequest,
            reply_delay: Duration::ZERO,
        }
    }
}

/// Answers GETs on the API thread once the VM runs, as `main` arranges with
/// `ServerHandle::set_direct_reads`; before that every request goes to the VMM thread.
#[derive(Default)]
struct LateReads(OnceLock<Arc<VmView>>);

impl DirectReads for LateReads {
    fn read(&self, request: &ApiRequest) -> Option<ApiResult> {
        self.0.get()?.read(request)
    }
}

/// What a test asks of the VMM thread.
enum Command {
    /// Run the guest until the devices are where they were asked to be; answer when done.
    Settle(Sender<()>),
}

/// A headless VMM serving the API. Drop the [`ServerHandle`] first, then this.
pub struct HeadlessVmm {
    wakes: Arc<AtomicU64>,
    commands: Sender<Command>,
    kick: EventFd,
    stop: EventFd,
    running: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HeadlessVmm {
    /// Starts the API server on `cfg` and the VMM thread behind it, waiting for the API to
    /// configure and start the VM.
    pub fn serve(
        cfg: ServerConfig,
        opts: HeadlessOptions,
    ) -> std::io::Result<(ServerHandle, HeadlessVmm)> {
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let (vmm_tx, vmm_rx) = mpsc::channel::<ApiMessage>();
        let wakes = Arc::new(AtomicU64::new(0));
        let reads = Arc::new(LateReads::default());
        let (server_tx, wake_fn) = if opts.reply_delay.is_zero() {
            let (w, count) = (wake.try_clone()?, wakes.clone());
            let wake_fn: api::WakeFn = Arc::new(move || {
                count.fetch_add(1, Ordering::Relaxed);
                let _ = w.write(1);
            });
            (vmm_tx, wake_fn)
        } else {
            // A relay between the server and the VMM thread that waits before handing over.
            let (tx, rx) = mpsc::channel::<ApiMessage>();
            let (w, delay) = (wake.try_clone()?, opts.reply_delay);
            std::thread::spawn(move || {
                for msg in rx {
                    std::thread::sleep(delay);
                    if vmm_tx.send(msg).is_err() {
                        return;
                    }
                    let _ = w.write(1);
                }
            });
            let count = wakes.clone();
            let wake_fn: api::WakeFn = Arc::new(move || {
                count.fetch_add(1, Ordering::Relaxed);
            });
            (tx, wake_fn)
        };
        let server = api::spawn_server(cfg, server_tx, wake_fn).map_err(std::io::Error::other)?;
        server.set_direct_reads(reads.clone());
        let (commands, command_rx) = mpsc::channel();
        let running = Arc::new(AtomicBool::new(false));
        let thread = {
            let kick = kick.try_clone()?;
            let stop = stop.try_clone()?;
            let running = running.clone();
            std::thread::Builder::new()
                .name("headless-vmm".into())
                .spawn(move || {
                    vmm_thread(VmmThread {
                        rx: vmm_rx,
                        wake,
                        reads,
                        commands: command_rx,
                        kick,
                        stop,
                        running,
                        pace: opts.guest,
                    })
                })?
        };
        Ok((
            server,
            HeadlessVmm {
                wakes,
                commands,
                kick,
                stop,
                running,
                thread: Some(thread),
            },
        ))
    }

    /// Requests that went to the VMM thread (the server wakes it once for each).
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// Whether the VM has started.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Lets the guest do everything the devices ask (inflate or deflate to the balloon's
    /// target, plug or unplug to virtio-mem's requested size) and the VMM react to it (a
    /// held-back balloon target), until nothing moves. Does nothing before the VM starts.
    pub fn settle(&self) {
        if !self.is_running() {
            return;
        }
        let (tx, rx) = mpsc::channel();
        if self.commands.send(Command::Settle(tx)).is_ok() {
            let _ = self.kick.write(1);
            let _ = rx.recv();
        }
    }
}

impl Drop for HeadlessVmm {
    fn drop(&mut self) {
        // Before the start the thread waits on the request channel and ends when the server
        // (dropped first) closes it; once running it ends on the stop event.
        if self.is_running() {
            let _ = self.stop.write(1);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

struct VmmThread {
    rx: Receiver<ApiMessage>,
    wake: EventFd,
    reads: Arc<LateReads>,
    commands: Receiver<Command>,
    kick: EventFd,
    stop: EventFd,
    running: Arc<AtomicBool>,
    pace: GuestPace,
}

/// The devices and memory of a started headless VM.
struct Machine {
    running: RunningVm,
    guest: Guest,
}

impl Machine {
    /// What `Vm::new` and `Vm::start` build, minus KVM, plus a guest that probes the devices.
    fn build(config: &VmConfig) -> Result<Machine, VmError> {
        let specs = vm::region_specs(config);
        let manager = vm::memory_manager(&specs, Box::new(NoSlots), config)?;
        let mem = manager.guest_memory().clone();
        let manager = Arc::new(Mutex::new(manager));
        let balloon = match &config.balloon {
            Some(o) => Some(Arc::new(Mutex::new(vm::balloon_device(
                o,
                &manager,
                config.memory_bytes(),
            )?))),
            None => None,
        };
        let virtio_mem = match &config.hotplug {
            Some(o) => Some(Arc::new(Mutex::new(vm::virtio_mem_device(
                o,
                &manager,
                config.memory_bytes(),
            )?))),
            None => None,
        };
        let boot_ram = crate::layout::ram_ranges(config.memory_bytes());
        let guest = Guest::probe(mem, &boot_ram, balloon.clone(), virtio_mem.clone());
        Ok(Machine {
            running: RunningVm {
                boot_mib: config.memory_mib,
                hotplug: config.hotplug,
                balloon,
                virtio_mem,
                manager,
            },
            guest,
        })
    }
}

fn vmm_thread(t: VmmThread) {
    let mut partial = PartialConfig::default();
    let (machine, reply) = loop {
        match configure_until_start(&t.rx, &mut partial) {
            StartDecision::ChannelClosed => return,
            StartDecision::Start { config, reply } => match Machine::build(&config) {
                Ok(m) => break (m, reply),
                Err(e) => {
                    if let Some(r) = reply {
                        r.respond(Err(start_failed(&e)));
                    }
                }
            },
        }
    };
    let Machine { running, guest } = machine;
    let mut events: EventManager<Subscriber> = EventManager::new().expect("an epoll instance");
    let devices: Vec<Subscriber> = [
        running.balloon.clone().map(|b| b as Subscriber),
        running.virtio_mem.clone().map(|m| m as Subscriber),
    ]
    .into_iter()
    .flatten()
    .collect();
    // The manager's own timer, as in the real VMM: it releases deferred discards and compacts.
    let timer = Arc::new(Mutex::new(crate::memory_timer::MemoryTimer::new(
        running.manager.clone(),
    )));
    events.add_subscriber(timer.clone());
    let handler = ApiHandler::new(t.rx, t.wake, running).expect("the API handler's eventfds");
    let _ = t.reads.0.set(handler.view());
    events.add_subscriber(Arc::new(Mutex::new(handler)));
    for d in devices {
        events.add_subscriber(d);
    }
    let stopped = Arc::new(AtomicBool::new(false));
    let driver = GuestDriver::new(guest, t.pace, t.kick, t.commands, t.stop, stopped.clone())
        .expect("the guest driver's timer");
    events.add_subscriber(Arc::new(Mutex::new(driver)));
    t.running.store(true, Ordering::Release);
    if let Some(r) = reply {
        r.respond(Ok(ApiResponse::Empty));
    }
    while !stopped.load(Ordering::Acquire) {
        if events.run().is_err() {
            return;
        }
        timer.lock().unwrap_or_else(|p| p.into_inner()).after_turn();
    }
}

/// The guest on the event loop: steps on its timer (steady pace), on request (settle), and
/// stops the loop on the stop event.
struct GuestDriver {
    guest: Guest,
    pace: GuestPace,
    timer: TimerFd,
    kick: EventFd,
    commands: Receiver<Command>,
    stop: EventFd,
    stopped: Arc<AtomicBool>,
    /// A settle in progress: who waits, and how many event-loop turns in a row moved nothing.
    settling: Vec<Sender<()>>,
    quiet_turns: u32,
}

impl GuestDriver {
    fn new(
        guest: Guest,
        pace: GuestPace,
        kick: EventFd,
        commands: Receiver<Command>,
        stop: EventFd,
        stopped: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let mut timer = TimerFd::new()?;
        if let GuestPace::Steady { every, .. } = pace {
            timer.reset(every, Some(every))?;
        }
        Ok(Self {
            guest,
            pace,
            timer,
            kick,
            commands,
            stop,
            stopped,
            settling: Vec::new(),
            quiet_turns: 0,
        })
    }

    /// One turn of a settle. The VMM reacts to the guest on the same event loop (virtio-mem's
    /// plugged-size event may release a held-back balloon target), so a settle ends only after
    /// two turns in a row in which the guest found nothing to do.
    fn settle_turn(&mut self) {
        if self.settling.is_empty() {
            return;
        }
        if self.guest.step_all() {
            self.quiet_turns = 0;
        } else {
            self.quiet_turns += 1;
        }
        if self.quiet_turns >= 2 {
            self.quiet_turns = 0;
            for who in self.settling.drain(..) {
                let _ = who.send(());
            }
        } else {
            let _ = self.kick.write(1);
        }
    }
}

impl MutEventSubscriber for GuestDriver {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.timer.as_raw_fd(),
            self.kick.as_raw_fd(),
            self.stop.as_raw_fd(),
        ] {
            ops.add(Events::with_data_raw(fd, fd as u32, EventSet::IN))
                .expect("the guest driver's events");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.stop.as_raw_fd() {
            self.stopped.store(true, Ordering::Release);
        } else if fd == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            if let GuestPace::Steady {
                balloon_mib,
                hotplug_mib,
                ..
            } = self.pace
            {
                self.guest.step(balloon_mib << 8, hotplug_mib << 20);
            }
        } else if fd == self.kick.as_raw_fd() {
            let _ = self.kick.read();
            while let Ok(Command::Settle(who)) = self.commands.try_recv() {
                self.settling.push(who);
            }
            self.settle_turn();
        }
    }
}
