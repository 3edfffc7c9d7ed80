//! The guest controls every byte of the virtio-mem request queue: descriptors, requests
//! (type, address, block count), response buffers, config writes, resets.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    balloon::testing::fuzz::mem_queue(data);
});
