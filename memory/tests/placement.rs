//! Where guest RAM lands in the host address space: each region at a host address with the same
//! offset in a 2 MiB page as its guest address (so transparent huge pages can back guest huge
//! pages, and KVM can map them as such), and nothing of the reservation used to place it left
//! mapped. In its own test binary: placement depends on what other threads map at the same time.

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
        let end = r.host_addr + r.size as usize;
        // The reservation around a region placed in one, had it stayed, would be PROT_NONE
        // right below and right above it. (A region under 2 MiB is placed anywhere: a thread
        // stack's guard page may well be right above it.)
        for (a, b, perms) in &maps {
            assert!(
                r.size < HUGE_PAGE_SIZE
                    || !(perms.starts_with("---") && (*b == r.host_addr || *a == end)),
                "{what}: a PROT_NONE mapping 0x{a:x}-0x{b:x} right beside it"
            );
        }
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
}
