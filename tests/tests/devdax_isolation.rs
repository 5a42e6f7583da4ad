//! Tenants against each other on device-dax pools, in the dax VM (tests/vm/run-in-vm), each
//! attack written as the attack: a reader trying every route to write its device lease, and
//! ex-holders that keep their fd and mapping — one writing all the time — while the next
//! tenant is served the same memory, on a dynamic and on a static (pmem) region.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use membroker_client::{CreateLease, Lease};
use membroker_tests::tenant::{
    VICTIM, as_nobody as tenant, attack_as_nobody, reader_refused_everywhere, refused as errno,
    victim_lease,
};
use membroker_tests::{TestBroker, in_dax_vm, stdout_ok, wait_until};
use rustix::io::Errno;

const MIB: u64 = 1 << 20;

fn all_zero(lease: &Lease) -> bool {
    let map = lease.map().unwrap();
    let mut buf = vec![0xffu8; 16 * MIB as usize];
    (0..map.len()).step_by(buf.len()).all(|offset| {
        let len = buf.len().min(map.len() - offset);
        map.read_at(offset, &mut buf[..len]).unwrap();
        buf[..len].iter().all(|&b| b == 0)
    })
}

fn wait_scrubbed(broker: &TestBroker) {
    wait_until(Duration::from_secs(120), "scrubbing to finish", || {
        broker.client().df().unwrap()[0].scrubbing == 0
    });
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn a_device_lease_reader_cannot_write_by_any_route() {
    if !in_dax_vm(
        "a_device_lease_reader_cannot_write_by_any_route",
        &["--dax-size", "256M"],
    ) {
        return;
    }
    membroker_tests::reset_dax_region();
    let broker = TestBroker::start(&["--pool", "devdax:d:region0", "--socket-group", "65534"]);
    let shared = victim_lease(&broker, 64 * MIB);
    assert_eq!(
        attack_as_nobody(&broker, "root/shared", "ro"),
        reader_refused_everywhere()
    );
    let mut word = vec![0u8; VICTIM.len()];
    shared.map().unwrap().read_at(0, &mut word).unwrap();
    assert_eq!(word, VICTIM, "the victim's bytes");

    // The owner reopens its own fd writable (a VMM handing /proc/self/fd/N to QEMU).
    broker
        .client()
        .create(
            CreateLease::new("tenant/ram", 64 * MIB)
                .persistent(true)
                .owner(65534),
        )
        .unwrap();
    let lines = attack_as_nobody(&broker, "tenant/ram", "rw");
    for route in ["reopen-rw ok", "reopen-rw-mmap-write ok"] {
        assert!(lines.iter().any(|l| l == route), "{route}: {lines:?}");
    }
}

/// The hand-over attack on a broker serving one region from `pool`: uid 65534 gets a lease of
/// the whole region; one of its processes keeps writing through its mapping after releasing
/// it, another keeps its fd, while the lease is removed, scrubbed and the same memory leased
/// to the next tenant.
fn hand_over(pool: &str) {
    let broker = &TestBroker::start(&["--pool", pool, "--socket-group", "65534"]);
    let (name, size) = ("old/ram", broker.client().df().unwrap()[0].free);
    broker
        .client()
        .create(CreateLease::new(name, size).persistent(true).owner(65534))
        .unwrap();
    let mut scribbler = tenant(broker, &["scribble", name]);
    assert_eq!(scribbler.line(), "released");
    let mut keeper = tenant(broker, &["keep", name]);
    assert_eq!(keeper.line(), "released");
    assert_eq!(scribbler.line(), "pass 1", "writes after release");
    stdout_ok(&broker.run_cli(&["rm", name]));
    wait_scrubbed(broker);
    let mut status = None;
    wait_until(Duration::from_secs(30), "the scribbler to stop", || {
        status = scribbler.child.try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(
        status.unwrap().signal(),
        Some(libc::SIGBUS),
        "the old mapping faults with SIGBUS once the lease is released: {status:?}"
    );
    let next = broker
        .client()
        .create(CreateLease::new("next/ram", size).persistent(true))
        .unwrap();
    assert!(all_zero(&next), "the next tenant reads only zeros");
    use std::io::Write;
    writeln!(keeper.child.stdin.as_mut().unwrap(), "remap").unwrap();
    assert_eq!(
        keeper.line(),
        errno("remap", Errno::NXIO),
        "the old fd maps nothing any more"
    );
    assert!(all_zero(&next), "nothing of the old holders landed");
    let df = broker.client().df().unwrap().remove(0);
    assert_eq!((df.used, df.scrubbing, df.leases), (size, 0, 1));
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn released_device_memory_reaches_no_ex_holder() {
    if !in_dax_vm(
        "released_device_memory_reaches_no_ex_holder",
        &["--dax-size", "256M"],
    ) {
        return;
    }
    membroker_tests::reset_dax_region();
    hand_over("devdax:d:region0");
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn released_static_device_memory_reaches_no_ex_holder() {
    if !in_dax_vm(
        "released_static_device_memory_reaches_no_ex_holder",
        &["--pmem", "--dax-size", "256M"],
    ) {
        return;
    }
    membroker_tests::make_pmem_devdax();
    hand_over("devdax:pmem:region0");
}
