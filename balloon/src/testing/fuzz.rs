//! Fuzz harnesses: each turns arbitrary bytes into a guest that writes descriptor tables, avail
//! rings and buffer contents at will into a small mmap'd guest memory, notifies, resets and
//! reconfigures, and checks the device's invariants after every step. Shared by the cargo-fuzz
//! targets in `balloon/fuzz` and the proptest runs in `tests/fuzz_proptest.rs`.

use std::sync::Arc;

use virtio::{GuestMemoryMmap, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::backend::PageRange;
use crate::balloon::{queue_roles, Balloon, BalloonConfig};
use crate::mem::{MemConfig, VirtioMem};

/// Reads the input; zero once exhausted.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.data.is_empty()
    }
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }
}

const QSIZE: u16 = 8;
const RAM_LO: usize = 64 << 10;
const RAM_HI_START: u64 = 128 << 10;
const DATA: u64 = 0x8000;

fn small_memory() -> GuestMemoryMmap {
    guest_memory(&[(0, RAM_LO), (RAM_HI_START, 64 << 10)])
}

/// A guest address: mostly inside the data area, sometimes anywhere.
fn addr(inp: &mut Input) -> u64 {
    match inp.u8() % 4 {
        0 => inp.u64(),
        1 => RAM_HI_START + u64::from(inp.u16()),
        _ => DATA + u64::from(inp.u16() % 0x8000),
    }
}

fn write_desc(inp: &mut Input, mem: &GuestMemoryMmap, q: &DriverQueue) {
    let idx = u16::from(inp.u8()) % QSIZE;
    let a = addr(inp);
    let len = if inp.u8() & 7 == 0 {
        inp.u32()
    } else {
        u32::from(inp.u16() % 1200)
    };
    let flags = u16::from(inp.u8() & 7);
    let next = u16::from(inp.u8() % (QSIZE as u8 + 2));
    q.write_desc(mem, idx, a, len, flags, next);
}

fn write_data(inp: &mut Input, mem: &GuestMemoryMmap) {
    let at = DATA + u64::from(inp.u16() % 0x7c00);
    if inp.u8() & 1 == 0 {
        // Small PFNs: in RAM, in the hole, past the end.
        let n = usize::from(inp.u8() % 64);
        let pfns: Vec<u32> = (0..n).map(|_| u32::from(inp.u8() % 64)).collect();
        let _ = mem.write_slice(&pfn_bytes(&pfns), GuestAddress(at));
    } else {
        let n = usize::from(inp.u8());
        let b = inp.bytes(n).to_vec();
        let _ = mem.write_slice(&b, GuestAddress(at));
    }
}

/// Drives a balloon's queues with arbitrary descriptors and contents.
pub fn balloon_queues(data: &[u8]) {
    let mut inp = Input { data };
    let mem = small_memory();
    let backend = Arc::new(FakeBalloonBackend::from_memory(&mem));
    let cfg = inp.u8();
    let config = BalloonConfig {
        stats: cfg & 1 != 0,
        free_page_reporting: cfg & 2 != 0,
        deflate_on_oom: cfg & 4 != 0,
        stats_interval: std::time::Duration::ZERO,
        queue_size: QSIZE,
        ..BalloonConfig::default()
    };
    let mut dev = Balloon::new(config, backend.clone()).expect("balloon");
    let interrupt = Arc::new(TestInterrupt::default());
    let mut queues: Vec<DriverQueue> = Vec::new();
    let activate = |dev: &mut Balloon, inp: &mut Input, queues: &mut Vec<DriverQueue>| {
        let accepted = dev.avail_features() & (u64::from(inp.u8()) | (1 << 32));
        let n = queue_roles(accepted).len();
        *queues = (0..n)
            .map(|i| DriverQueue::new(&mem, 0x1000 * (i as u64 + 1), QSIZE))
            .collect();
        dev.ack_features(accepted);
        let _ = dev.activate(activation(&mem, queues, interrupt.clone(), accepted));
    };
    activate(&mut dev, &mut inp, &mut queues);
    while !inp.done() {
        let op = inp.u8();
        let qi = usize::from(inp.u8()) % queues.len().max(1);
        match op % 8 {
            0 | 1 => write_desc(&mut inp, &mem, &queues[qi]),
            2 => write_data(&mut inp, &mem),
            3 => {
                let head = u16::from(inp.u8() % (QSIZE as u8 + 2));
                queues[qi].publish(&mem, head);
                dev.process_queue(qi);
            }
            4 => {
                let idx = inp.u16();
                queues[qi].set_avail_idx(&mem, idx);
                dev.process_queue(qi);
            }
            5 => {
                dev.request_stats();
            }
            6 => match inp.u8() % 3 {
                0 => {
                    let off = u64::from(inp.u8() % 24);
                    let n = usize::from(inp.u8() % 9);
                    let b = inp.bytes(n).to_vec();
                    dev.write_config(off, &b);
                }
                1 => {
                    let _ = dev.set_target_mib(u64::from(inp.u8()));
                }
                _ => {
                    let mut b = [0u8; 8];
                    dev.read_config(u64::from(inp.u8()), &mut b);
                }
            },
            _ => {
                dev.reset();
                activate(&mut dev, &mut inp, &mut queues);
            }
        }
        assert_eq!(
            dev.ballooned_bytes(),
            backend.ballooned().len() as u64 * 4096,
            "device and backend disagree on ballooned pages"
        );
    }
}

/// Drives a virtio-mem request queue with arbitrary descriptors and requests.
pub fn mem_queue(data: &[u8]) {
    let mut inp = Input { data };
    let mem = small_memory();
    let bs = 4096u64 << (inp.u8() % 11); // 4 KiB .. 4 MiB
    let region_addr = 1u64 << 30;
    let region_size = 64 << 20;
    let config = MemConfig {
        block_size: bs,
        requested_size: (u64::from(inp.u8()) * bs).min(region_size),
        queue_size: QSIZE,
        ..MemConfig::new(region_addr, region_size)
    };
    let backend = Arc::new(FakeMemBackend::new(PageRange::new(
        region_addr >> 12,
        region_size >> 12,
    )));
    let mut dev = VirtioMem::new(config, backend.clone()).expect("virtio-mem");
    let interrupt = Arc::new(TestInterrupt::default());
    let mut q = DriverQueue::new(&mem, 0x1000, QSIZE);
    let activate = |dev: &mut VirtioMem, q: &mut DriverQueue| {
        *q = DriverQueue::new(&mem, 0x1000, QSIZE);
        let f = dev.avail_features();
        dev.ack_features(f);
        let _ = dev.activate(activation(
            &mem,
            std::slice::from_ref(q),
            interrupt.clone(),
            f,
        ));
    };
    activate(&mut dev, &mut q);
    while !inp.done() {
        match inp.u8() % 8 {
            0 => write_desc(&mut inp, &mem, &q),
            1 => write_data(&mut inp, &mem),
            2 | 3 => {
                // A well-shaped request with fuzzed fields, then a response buffer.
                let kind = u16::from(inp.u8() % 5);
                let a = match inp.u8() % 4 {
                    0 => inp.u64(),
                    _ => region_addr
                        .wrapping_add(u64::from(inp.u16()).wrapping_mul(bs / 2))
                        .wrapping_sub(bs),
                };
                let nb = if inp.u8() & 7 == 0 {
                    inp.u16()
                } else {
                    u16::from(inp.u8() % 40)
                };
                let at = DATA + u64::from(inp.u16() % 0x7000);
                let _ = mem.write_slice(&mem_request_bytes(kind, a, nb), GuestAddress(at));
                let resp_len = if inp.u8() & 7 == 0 {
                    u32::from(inp.u8() % 16)
                } else {
                    10
                };
                q.add(
                    &mem,
                    &[Desc::read(at, 24), Desc::write(at + 0x100, resp_len)],
                );
                dev.process_queue();
            }
            4 => {
                let head = u16::from(inp.u8() % (QSIZE as u8 + 2));
                q.publish(&mem, head);
                dev.process_queue();
            }
            5 => {
                let idx = inp.u16();
                q.set_avail_idx(&mem, idx);
                dev.process_queue();
            }
            6 => {
                let _ = dev.set_requested_size(u64::from(inp.u8()) * bs);
                let b = inp.bytes(2).to_vec();
                dev.write_config(u64::from(inp.u8()), &b);
            }
            _ => {
                dev.reset();
                activate(&mut dev, &mut q);
            }
        }
        let s = dev.state();
        assert_eq!(
            s.plugged_size,
            backend.plugged_pages() * 4096,
            "device and backend disagree"
        );
        assert!(s.usable_region_size <= s.region_size);
        assert_eq!(s.usable_region_size % bs, 0);
        if let Some(last) = dev.plugged_ranges().last() {
            assert!(
                last.end() << 12 <= region_addr + s.usable_region_size,
                "plugged past usable"
            );
        }
    }
}
