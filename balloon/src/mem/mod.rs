//! virtio-mem (virtio 1.2 section 5.15), device side.
//!
//! - `mod.rs` (this file): spec constants, wire layout, configuration, errors, counters.
//! - [`device`]: block states, request rules, config space, control API.
//! - [`event_handler`]: the glue to the VMM's event loop.
//!
//! Conventions: a "block" is `block_size` bytes of the device region, aligned to `block_size`
//! from guest physical address 0; a "memory block" is Linux's hot-(un)plug unit, 128 MiB on
//! x86-64 below 64 GiB of RAM. The usable region always starts at `addr`.

pub mod device;
pub mod event_handler;

pub use device::VirtioMem;

use memory::units::{MIB, PAGE_SIZE};

/// Feature bits (virtio 1.2 section 5.15.3).
pub mod features {
    /// node_id is an ACPI PXM (not offered: the VMM builds no SRAT).
    pub const ACPI_PXM: u32 = 0;
    /// The driver does not read unplugged memory, so the host may protect it.
    pub const UNPLUGGED_INACCESSIBLE: u32 = 1;
    /// The modern (virtio 1.x) interface; always offered.
    pub const VERSION_1: u32 = virtio::VIRTIO_F_VERSION_1;
}

/// Request types (virtio 1.2 section 5.15.6).
pub mod request {
    /// Plug `nb_blocks` blocks at `addr`.
    pub const PLUG: u16 = 0;
    /// Unplug `nb_blocks` blocks at `addr`.
    pub const UNPLUG: u16 = 1;
    /// Unplug every block of the region.
    pub const UNPLUG_ALL: u16 = 2;
    /// Ask whether `nb_blocks` blocks at `addr` are plugged.
    pub const STATE: u16 = 3;
    /// Size of a request on the wire: le16 type, 3 x le16 padding, le64 addr, le16 nb_blocks,
    /// 3 x le16 padding.
    pub const SIZE: usize = 24;
}

/// Response types and states.
pub mod response {
    /// Response: the request was done.
    pub const ACK: u16 = 0;
    /// Response: the request was refused (a host decision, e.g. beyond `requested_size`).
    pub const NACK: u16 = 1;
    /// Response: try again later (the host is busy or could not complete it).
    pub const BUSY: u16 = 2;
    /// Response: the request was malformed.
    pub const ERROR: u16 = 3;
    /// State: every block asked about is plugged.
    pub const STATE_PLUGGED: u16 = 0;
    /// State: every block asked about is unplugged.
    pub const STATE_UNPLUGGED: u16 = 1;
    /// State: some are plugged, some are not.
    pub const STATE_MIXED: u16 = 2;
    /// Size of a response on the wire: le16 type, 3 x le16 padding, le16 state.
    pub const SIZE: usize = 10;
}

/// Config space layout (virtio 1.2 section 5.15.4); every field is read-only for the driver.
pub mod config_offsets {
    /// `block_size` (le64).
    pub const BLOCK_SIZE: u64 = 0;
    /// `node_id` (le16, padded to 8 bytes).
    pub const NODE_ID: u64 = 8;
    /// `addr` (le64): guest physical start of the region.
    pub const ADDR: u64 = 16;
    /// `region_size` (le64).
    pub const REGION_SIZE: u64 = 24;
    /// `usable_region_size` (le64).
    pub const USABLE_REGION_SIZE: u64 = 32;
    /// `plugged_size` (le64).
    pub const PLUGGED_SIZE: u64 = 40;
    /// `requested_size` (le64).
    pub const REQUESTED_SIZE: u64 = 48;
    /// Size of the config space.
    pub const SIZE: u64 = 56;
}

/// Linux's memory block size on x86-64 (below 64 GiB of boot RAM): the unit Linux hot-adds.
pub const LINUX_MEMORY_BLOCK_SIZE: u64 = 128 * MIB;

/// Queue size offered.
pub const QUEUE_SIZE: u16 = 128;

/// How the VMM configures the device (`--hotplug total_mib=..,block_mib=..`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemConfig {
    /// Guest physical address of the hot-add region (aligned to 128 MiB by the VMM).
    pub addr: u64,
    /// Size of the region in bytes.
    pub region_size: u64,
    /// Plug granularity: a power of two, at least 4 KiB (the CLI asks for at least 2 MiB).
    pub block_size: u64,
    /// NUMA node (only meaningful with ACPI_PXM, which is not offered).
    pub node_id: u16,
    /// Initial requested size in bytes.
    pub requested_size: u64,
    /// Offer UNPLUGGED_INACCESSIBLE.
    pub unplugged_inaccessible: bool,
    /// Size of the request queue.
    pub queue_size: u16,
}

impl MemConfig {
    /// A region at `addr` of `region_size` bytes with 2 MiB blocks, nothing requested.
    pub fn new(addr: u64, region_size: u64) -> Self {
        MemConfig {
            addr,
            region_size,
            block_size: 2 * MIB,
            node_id: 0,
            requested_size: 0,
            unplugged_inaccessible: true,
            queue_size: QUEUE_SIZE,
        }
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), MemError> {
        let bs = self.block_size;
        if bs < PAGE_SIZE || !bs.is_power_of_two() {
            return Err(MemError::BadBlockSize(bs));
        }
        if self.addr & (bs - 1) != 0 {
            return Err(MemError::UnalignedAddr {
                addr: self.addr,
                block_size: bs,
            });
        }
        if self.region_size == 0 || self.region_size & (bs - 1) != 0 {
            return Err(MemError::BadRegionSize {
                size: self.region_size,
                block_size: bs,
            });
        }
        if self.addr.checked_add(self.region_size).is_none() {
            return Err(MemError::RegionOverflow {
                addr: self.addr,
                size: self.region_size,
            });
        }
        let qs = self.queue_size;
        if qs == 0 || qs > 32768 || !qs.is_power_of_two() {
            return Err(MemError::BadQueueSize(qs));
        }
        check_requested(self.requested_size, self.region_size, bs)
    }
}

pub(crate) fn check_requested(
    size: u64,
    region_size: u64,
    block_size: u64,
) -> Result<(), MemError> {
    // block_size is a validated power of two.
    if size & (block_size - 1) != 0 {
        return Err(MemError::UnalignedRequest { size, block_size });
    }
    if size > region_size {
        return Err(MemError::RequestTooLarge { size, region_size });
    }
    Ok(())
}

/// Errors of the configuration and control API.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemError {
    /// The block size is not a power of two of at least 4 KiB.
    #[error("block size {0:#x} is not a power of two of at least 4 KiB")]
    BadBlockSize(u64),
    /// The region does not start on a block boundary.
    #[error("region address {addr:#x} is not aligned to the block size {block_size:#x}")]
    UnalignedAddr {
        /// The region's guest physical address.
        addr: u64,
        /// The block size.
        block_size: u64,
    },
    /// The region is empty or not a whole number of blocks.
    #[error("region size {size:#x} is not a non-zero multiple of the block size {block_size:#x}")]
    BadRegionSize {
        /// The region's size in bytes.
        size: u64,
        /// The block size.
        block_size: u64,
    },
    /// The region runs past the end of the 64-bit address space.
    #[error("region {addr:#x}+{size:#x} overflows the address space")]
    RegionOverflow {
        /// The region's guest physical address.
        addr: u64,
        /// Its size in bytes.
        size: u64,
    },
    /// The requested size is not a whole number of blocks.
    #[error("requested size {size:#x} is not a multiple of the block size {block_size:#x}")]
    UnalignedRequest {
        /// The size asked for, bytes.
        size: u64,
        /// The block size.
        block_size: u64,
    },
    /// The requested size is more than the region holds.
    #[error("requested size {size:#x} exceeds the region size {region_size:#x}")]
    RequestTooLarge {
        /// The size asked for, bytes.
        size: u64,
        /// The region's size.
        region_size: u64,
    },
    /// The configured queue size cannot be offered.
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadQueueSize(u16),
    /// An eventfd or timer for the device could not be created.
    #[error("cannot set up the device: {0}")]
    Io(String),
}

/// A snapshot of the device's sizes, as the config space shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemState {
    /// Guest physical address of the region.
    pub addr: u64,
    /// Size of the region in bytes.
    pub region_size: u64,
    /// Plug granularity in bytes.
    pub block_size: u64,
    /// How much of the region the guest may plug into.
    pub usable_region_size: u64,
    /// Bytes plugged now.
    pub plugged_size: u64,
    /// Bytes the host asks the guest to have plugged.
    pub requested_size: u64,
}

/// Counters the VMM reads, each exported under its field name ([`MemCounters::named`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemCounters {
    /// PLUG requests received.
    pub plug_requests: u64,
    /// UNPLUG requests received.
    pub unplug_requests: u64,
    /// UNPLUG_ALL requests received.
    pub unplug_all_requests: u64,
    /// STATE requests received.
    pub state_requests: u64,
    /// Requests of a type the spec does not define.
    pub unknown_requests: u64,
    /// Requests answered ACK.
    pub acks: u64,
    /// Requests answered NACK.
    pub nacks: u64,
    /// Requests answered BUSY.
    pub busy: u64,
    /// Requests answered ERROR.
    pub errors: u64,
    /// Chains the device could not answer (no room for a response, wrong direction,
    /// unreadable request); returned with length 0.
    pub malformed_buffers: u64,
    /// Driver writes to the (read-only) config space.
    pub config_writes_refused: u64,
    /// Plugs or unplugs the memory manager could not complete (answered BUSY).
    pub backend_errors: u64,
    /// Config-change interrupts sent (a new requested size, a finished unplug).
    pub config_interrupts: u64,
}

impl MemCounters {
    /// Every counter with its field name, for the VMM's metrics.
    pub fn named(&self) -> [(&'static str, u64); 13] {
        [
            ("plug_requests", self.plug_requests),
            ("unplug_requests", self.unplug_requests),
            ("unplug_all_requests", self.unplug_all_requests),
            ("state_requests", self.state_requests),
            ("unknown_requests", self.unknown_requests),
            ("acks", self.acks),
            ("nacks", self.nacks),
            ("busy", self.busy),
            ("errors", self.errors),
            ("malformed_buffers", self.malformed_buffers),
            ("config_writes_refused", self.config_writes_refused),
            ("backend_errors", self.backend_errors),
            ("config_interrupts", self.config_interrupts),
        ]
    }
}

/// A guest mistake, counted and logged (rate limited).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MemFault {
    /// A request whose blocks break the spec's rules; answered ERROR.
    #[error("request {kind} {addr:#x}+{nb_blocks} blocks: {reason}")]
    BadRequest {
        /// The request type.
        kind: u16,
        /// Guest physical address it named.
        addr: u64,
        /// Blocks it covered.
        nb_blocks: u16,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// A request type the spec does not define; answered ERROR.
    #[error("unknown request type {0}")]
    UnknownRequest(u16),
    /// The descriptor chain could not carry a request and its response.
    #[error("request chain unusable: {0}")]
    BadChain(String),
    /// The driver wrote the config space, which is read-only.
    #[error("config write of {len} bytes at offset {offset:#x}: the config space is read-only")]
    ReadOnlyConfig {
        /// Offset written.
        offset: u64,
        /// Bytes written.
        len: usize,
    },
}

impl MemFault {
    /// Index of the kind, for rate-limited logging.
    pub fn kind(&self) -> usize {
        match self {
            MemFault::BadRequest { .. } => 0,
            MemFault::UnknownRequest(_) => 1,
            MemFault::BadChain(_) => 2,
            MemFault::ReadOnlyConfig { .. } => 3,
        }
    }
}

pub(crate) const FAULT_KINDS: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field is in `named` once (a new field breaks this literal until it is added).
    #[test]
    fn every_counter_is_named() {
        let c = MemCounters {
            plug_requests: 1,
            unplug_requests: 2,
            unplug_all_requests: 3,
            state_requests: 4,
            unknown_requests: 5,
            acks: 6,
            nacks: 7,
            busy: 8,
            errors: 9,
            malformed_buffers: 10,
            config_writes_refused: 11,
            backend_errors: 12,
            config_interrupts: 13,
        };
        let mut values: Vec<u64> = c.named().iter().map(|(_, v)| *v).collect();
        values.sort_unstable();
        assert_eq!(values, (1..=13).collect::<Vec<u64>>());
    }
}
