//! Where guest RAM lands in the host address space: each region at a host address with the same
//! offset in a 2 MiB page as its guest address (so transparent huge pages can back guest huge
//! pages, and KVM can map them as such), and no other mapping merged into its VMA. In its own
//! test binary: placement depends on what other threads map at the same time.

mod common;

use common::*;
use memory::{Backing, HUGE_PAGE_SIZE, PAGE_SIZE};

/// `(start, end, perms)` of every line of /proc/self/maps.
fn maps() -> Vec<(usize, usize, String)> {
    std::fs::read_to_string("/proc/self/maps")
        .expect("/proc/self/maps")
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            let (a, b) = f.next().unwrap().split_once('-').unwrap();
            let hex = |s| usize::from_str_radix(s, 16).unwrap();
            (hex(a), hex(b), f.next().unwrap().to_string())
        })
        .collect()
}

#[test]
fn regions_are_huge_page_aligned_with_their_guest_addresses() {
    let specs = [
        boot(0, 64 * MIB, Backing::PrivateAnonymous),
        boot(
            65 * MIB,
            6 * MIB + 3 * PAGE_SIZE,
            Backing::PrivateAnonymousHuge,
        ),
        boot(80 * MIB + 3 * PAGE_SIZE, 4 * MIB, Backing::SharedAnonymous),
        boot(97 * MIB + PAGE_SIZE, 2 * MIB, Backing::SharedMemfd),
        boot(120 * MIB, MIB, Backing::PrivateAnonymous),
        hotplug(GIB, 256 * MIB, Backing::PrivateAnonymous, 128 * MIB),
    ];
    let (m, _) = manager(&specs);
    // What the VMM allocates next (malloc's mmap'd blocks, thread stacks) takes the highest
    // gaps that fit: any left right against guest RAM.
    let blocks: Vec<Vec<u8>> = (0..16).map(|i| vec![i as u8 + 1; 1 << 20]).collect();
    let maps = maps();
    for r in m.regions() {
        let what = format!(
            "{:?} region at guest 0x{:x}, host 0x{:x}",
            r.backing, r.guest_addr, r.host_addr
        );
        if r.size >= HUGE_PAGE_SIZE {
            assert_eq!(
                (r.host_addr as u64).wrapping_sub(r.guest_addr) % HUGE_PAGE_SIZE,
                0,
                "{what}: host and guest offsets in a 2 MiB page differ"
            );
        }
        // No other mapping shares its VMA (regions may merge with each other). A neighbour
        // merged in would be backed by the region's transparent huge pages: 2 MiB of host
        // memory for a few KiB of malloc (the guard pages around each region keep them apart).
        let (a, b, _) = maps
            .iter()
            .find(|(a, b, _)| *a <= r.host_addr && r.host_addr < *b)
            .expect("the region is in /proc/self/maps");
        let guest: u64 = m
            .regions()
            .iter()
            .filter(|g| g.host_addr >= *a && g.host_addr + g.size as usize <= *b)
            .map(|g| g.size)
            .sum();
        assert_eq!(
            guest,
            (b - a) as u64,
            "{what}: its VMA 0x{a:x}-0x{b:x} holds more than guest RAM"
        );
        if r.kind == memory::RegionKind::BootRam {
            touch(&m, r.guest_addr, 8, 0x5a);
            touch(&m, r.guest_addr + r.size - 8, 8, 0xa5);
            assert_eq!(read_u64(&m, r.guest_addr), 0x5a5a_5a5a_5a5a_5a5a, "{what}");
            assert_eq!(
                read_u64(&m, r.guest_addr + r.size - 8),
                0xa5a5_a5a5_a5a5_a5a5,
                "{what}"
            );
        }
    }
    drop(blocks);
}
