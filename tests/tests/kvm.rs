//! The example VMM (`membroker-kvm-vmm`, examples/kvm-vmm) for real: a real-mode guest on
//! /dev/kvm whose RAM is a persistent lease counts its runs in that RAM, across VMM restarts
//! and a `membroker upgrade` between two runs.

use std::process::Output;
use std::time::Duration;

use membroker_client::{LeaseState, PageSize};
use membroker_tests::{TestBroker, bin_path, stderr_err, stdout_ok};

/// A memfd broker whose upgrades our own group may ask for.
fn broker() -> TestBroker {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need KVM"
    );
    let gid = rustix::process::getgid().as_raw().to_string();
    TestBroker::start(&["--pool", "memfd:t:64M", "--admin-group", &gid])
}

fn vmm(broker: &TestBroker, lease: &str, size: &str, extra: &[&str]) -> Output {
    std::process::Command::new(bin_path("membroker-kvm-vmm"))
        .arg("--socket")
        .arg(broker.socket())
        .args(["--lease", lease, "--size", size])
        .args(extra)
        .output()
        .expect("run membroker-kvm-vmm")
}

/// Runs the VMM on a 1 MiB lease and returns the line it printed.
fn run_guest(broker: &TestBroker, lease: &str) -> String {
    stdout_ok(&vmm(broker, lease, "1M", &[]))
        .trim_end()
        .to_string()
}

/// The counter as the guest left it in the lease (u32 at guest-physical 0x500).
fn stored_counter(broker: &TestBroker, lease: &str) -> u32 {
    let mut client = broker.client();
    let lease = client.open(lease, false).expect("open the lease");
    let mut bytes = [0u8; 4];
    lease.map().unwrap().read_at(0x500, &mut bytes).unwrap();
    u32::from_le_bytes(bytes)
}

#[test]
#[cfg_attr(
    not(feature = "kvm"),
    ignore = "runs a guest on /dev/kvm: run with --features kvm (scripts/test does)"
)]
fn guest_counts_its_runs_in_the_lease() {
    let broker = broker();
    assert_eq!(run_guest(&broker, "vm/ram"), "MEMBROKER-KVM 1");
    assert_eq!(run_guest(&broker, "vm/ram"), "MEMBROKER-KVM 2");
    assert_eq!(stored_counter(&broker, "vm/ram"), 2);

    // The lease outlives the VMM that created it, and nobody holds it in between (the reader
    // above let go when its connection closed, which the broker sees a moment later).
    membroker_tests::wait_until(Duration::from_secs(5), "vm/ram idle", || {
        broker.client().stat("vm/ram").unwrap().state == LeaseState::Idle
    });
    let info = broker.client().stat("vm/ram").unwrap();
    assert!(info.persistent, "{info:?}");
    assert_eq!(info.state, LeaseState::Idle, "{info:?}");
    assert_eq!(info.size, 1 << 20);

    // Another lease is another machine.
    assert_eq!(run_guest(&broker, "vm/other"), "MEMBROKER-KVM 1");
    assert_eq!(run_guest(&broker, "vm/ram"), "MEMBROKER-KVM 3");
}

#[test]
#[cfg_attr(
    not(feature = "kvm"),
    ignore = "runs a guest on /dev/kvm: run with --features kvm (scripts/test does)"
)]
fn guest_memory_survives_a_broker_upgrade_between_runs() {
    let broker = broker();
    assert_eq!(run_guest(&broker, "vm/ram"), "MEMBROKER-KVM 1");
    let upgrade = stdout_ok(&broker.run_cli(&["upgrade"]));
    assert!(upgrade.contains("leases kept: 1"), "{upgrade}");
    assert_eq!(run_guest(&broker, "vm/ram"), "MEMBROKER-KVM 2");
    let upgrade = stdout_ok(&broker.run_cli(&["upgrade"]));
    assert!(upgrade.contains("leases kept: 1"), "{upgrade}");
    assert_eq!(run_guest(&broker, "vm/ram"), "MEMBROKER-KVM 3");
    assert_eq!(stored_counter(&broker, "vm/ram"), 3);
}

#[test]
#[cfg_attr(
    not(feature = "kvm"),
    ignore = "runs a guest on /dev/kvm: run with --features kvm (scripts/test does)"
)]
fn vmm_refuses_a_lease_of_another_size_and_too_little_ram() {
    let broker = broker();
    assert_eq!(run_guest(&broker, "vm/ram"), "MEMBROKER-KVM 1");
    let err = stderr_err(&vmm(&broker, "vm/ram", "2M", &[]));
    assert!(
        err.contains("lease vm/ram is 1 MiB, --size asks for 2 MiB"),
        "{err}"
    );
    let err = stderr_err(&vmm(&broker, "vm/small", "4K", &[]));
    assert!(err.contains("too small"), "{err}");
    // Neither failure touched the guest's memory.
    assert_eq!(run_guest(&broker, "vm/ram"), "MEMBROKER-KVM 2");
}

#[test]
#[cfg_attr(
    not(all(feature = "kvm", feature = "privileged")),
    ignore = "runs a guest on /dev/kvm in hugetlb memory (root): run with --features kvm,privileged (scripts/test does)"
)]
fn guest_runs_in_2m_huge_pages() {
    let _pages = membroker_tests::HugePages::reserve(2048, 2);
    let gid = rustix::process::getgid().as_raw().to_string();
    let broker = TestBroker::start(&["--pool", "memfd:h2:4M:2M", "--admin-group", &gid]);
    let run = || stdout_ok(&vmm(&broker, "vm/huge", "2M", &["--pool", "h2"]));
    assert_eq!(run().trim_end(), "MEMBROKER-KVM 1");
    stdout_ok(&broker.run_cli(&["upgrade"]));
    assert_eq!(run().trim_end(), "MEMBROKER-KVM 2");
    let info = broker.client().stat("vm/huge").unwrap();
    assert_eq!(info.page_size, PageSize::Huge2M, "{info:?}");
    assert_eq!(stored_counter(&broker, "vm/huge"), 2);
}
