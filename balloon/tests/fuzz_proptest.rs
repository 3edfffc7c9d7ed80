//! The fuzz targets of `balloon/fuzz`, run as property tests on stable Rust: random byte strings
//! drive each device's queue handler (see `balloon::testing::fuzz`).

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 800, ..ProptestConfig::default() })]

    #[test]
    fn balloon_queues(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        balloon::testing::fuzz::balloon_queues(&data);
    }

    #[test]
    fn mem_queue(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        balloon::testing::fuzz::mem_queue(&data);
    }
}
