//! The guest controls every byte of the balloon's virtqueues: descriptor tables, avail rings,
//! PFN arrays, stats buffers, reported ranges, config writes, resets.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    balloon::testing::fuzz::balloon_queues(data);
});
