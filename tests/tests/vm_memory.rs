//! `Lease::guest_region` (the client's `vm-memory` feature) on leases from the real broker:
//! the region is the lease's memory, shared with every other holder, and outlives the
//! `Lease` value it came from.

use membroker_client::vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use membroker_client::{CreateLease, PageSize};
use membroker_tests::TestBroker;

const MIB: u64 = 1 << 20;

#[test]
fn guest_region_is_the_lease_memory() {
    let broker = TestBroker::start(&["--pool", "memfd:t:16M"]);
    let mut vmm = broker.client();
    let lease = vmm
        .create(CreateLease::new("vm/ram", 2 * MIB).persistent(true))
        .unwrap();
    let region = lease.guest_region(GuestAddress(MIB)).unwrap();
    assert_eq!(region.start_addr(), GuestAddress(MIB));
    assert_eq!(region.len(), 2 * MIB);
    assert_eq!(region.prot(), libc::PROT_READ | libc::PROT_WRITE);
    assert_eq!(region.flags() & libc::MAP_SHARED, libc::MAP_SHARED);
    assert_eq!(region.is_hugetlbfs(), Some(false));
    let offset = region.file_offset().expect("a file-backed region");
    assert_eq!(offset.start(), 0);
    let memory = GuestMemoryMmap::from_regions(vec![region]).unwrap();
    assert_eq!(memory.last_addr(), GuestAddress(3 * MIB - 1));

    // The region owns its fd: it stays usable after the Lease value is dropped.
    drop(lease);
    memory
        .write_slice(b"from the guest", GuestAddress(MIB + 0x1000))
        .unwrap();

    // Another holder sees the guest's bytes, and the guest sees its.
    let mut other = broker.client();
    let map = other.open("vm/ram", true).unwrap().map().unwrap();
    let mut seen = [0u8; 14];
    map.read_at(0x1000, &mut seen).unwrap();
    assert_eq!(&seen, b"from the guest");
    map.write_at(2 * MIB as usize - 4, b"last").unwrap();
    let mut seen = [0u8; 4];
    memory
        .read_slice(&mut seen, GuestAddress(3 * MIB - 4))
        .unwrap();
    assert_eq!(&seen, b"last");
    assert!(
        memory.write_slice(b"x", GuestAddress(3 * MIB)).is_err(),
        "past the end of the lease"
    );
}

#[test]
fn read_only_lease_gives_a_read_only_region() {
    let broker = TestBroker::start(&["--pool", "memfd:t:16M"]);
    let mut owner = broker.client();
    owner
        .create(CreateLease::new("vm/ram", MIB).persistent(true))
        .unwrap();
    let lease = broker.client().open("vm/ram", false).unwrap();
    let region = lease.guest_region(GuestAddress(0)).unwrap();
    assert_eq!(region.prot(), libc::PROT_READ);
}

#[test]
fn guest_base_must_be_page_aligned_and_fit() {
    let broker = TestBroker::start(&["--pool", "memfd:t:16M"]);
    let lease = broker
        .client()
        .create(CreateLease::new("vm/ram", MIB))
        .unwrap();
    let err = lease.guest_region(GuestAddress(0x800)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "lease vm/ram: guest base 0x800 is not aligned to the lease's 4K pages"
    );
    let err = lease.guest_region(GuestAddress(!0xfff)).unwrap_err();
    assert!(err.to_string().contains("overflows"), "{err}");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn huge_page_lease_gives_a_hugetlb_region_at_aligned_bases() {
    let _pages = membroker_tests::HugePages::reserve(2048, 4);
    let broker = TestBroker::start(&["--pool", "memfd:h2:8M:2M"]);
    let lease = broker
        .client()
        .create(CreateLease::new("vm/ram", 4 * MIB).page_size(PageSize::Huge2M))
        .unwrap();
    let err = lease.guest_region(GuestAddress(MIB)).unwrap_err();
    assert!(err.to_string().contains("2M pages"), "{err}");
    let region = lease.guest_region(GuestAddress(4 * MIB)).unwrap();
    assert_eq!(region.is_hugetlbfs(), Some(true));
    let memory = GuestMemoryMmap::from_regions(vec![region]).unwrap();
    memory
        .write_obj(0x1234_5678u32, GuestAddress(6 * MIB))
        .unwrap();
    let map = lease.map().unwrap();
    let mut seen = [0u8; 4];
    map.read_at(2 * MIB as usize, &mut seen).unwrap();
    assert_eq!(u32::from_le_bytes(seen), 0x1234_5678);
}
