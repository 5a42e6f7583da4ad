//! `df`'s estimates of what the kernel spends on a pool's memory, checked against the kernel in
//! the project's VM (tests/vm/run-in-vm), and the defaults that spend least: device-dax pools
//! take 1G alignment where the region allows it, and a hugetlb pool on a kernel that keeps all
//! of its huge pages' struct pages says so.

use membroker_client::{CreateLease, PageSize, PoolInfo};
use membroker_tests::meminfo::free_kib;
use membroker_tests::{TestBroker, in_dax_vm, reset_dax_region, stdout_ok, wait_until};

use std::time::Duration;

const GIB: u64 = 1 << 30;
/// How far the estimate may be from the measured figure: 10 % of it, and never less than
/// 128 KiB, for what a new device costs besides its struct pages (sysfs nodes, its inode,
/// the broker's own records) and for readings taken a moment apart. Measured: a 1 GiB lease
/// took 60 KiB at 1G (estimate 40), 4140 KiB at 2M (estimate 4128).
const TOLERANCE_SHARE: f64 = 0.10;
const TOLERANCE_MIN_KIB: u64 = 128;

fn pool(broker: &TestBroker) -> PoolInfo {
    broker.client().df().unwrap().remove(0)
}

/// Free memory a 1 GiB lease of the pool `spec` takes (KiB), and the pool's `df` with it.
fn lease_cost(spec: &str) -> (u64, PoolInfo) {
    reset_dax_region();
    let broker = TestBroker::start(&["--pool", spec]);
    assert_eq!(
        pool(&broker).kernel_overhead,
        0,
        "no lease: no struct pages"
    );
    let mut client = broker.client();
    // A lease made and scrubbed first: the broker's threads, heap and journal have grown to
    // serving size, so what the measured lease takes is its own.
    drop(client.create(CreateLease::new("warm", GIB)).unwrap());
    client.release("warm").unwrap();
    wait_until(
        Duration::from_secs(60),
        "the warm-up lease scrubbed",
        || pool(&broker).scrubbing == 0,
    );
    let before = free_kib();
    let lease = client.create(CreateLease::new("vm/ram", GIB)).unwrap();
    let after = free_kib();
    let info = pool(&broker);
    drop(lease);
    (before.saturating_sub(after), info)
}

fn check(spec: &str, align: PageSize) {
    let (measured_kib, info) = lease_cost(spec);
    assert_eq!(info.page_size, align, "{spec}");
    let estimate_kib = info.kernel_overhead / 1024;
    let tolerance = TOLERANCE_MIN_KIB.max((estimate_kib as f64 * TOLERANCE_SHARE) as u64);
    println!(
        "{spec}: 1 GiB lease took {measured_kib} KiB, estimate {estimate_kib} KiB (±{tolerance})"
    );
    assert!(
        measured_kib.abs_diff(estimate_kib) <= tolerance,
        "{spec}: a 1 GiB lease took {measured_kib} KiB of kernel memory, df estimates \
         {estimate_kib} KiB (tolerance {tolerance} KiB)"
    );
    assert!(
        info.broker_metadata > 0 && info.broker_metadata < 64 << 10,
        "broker metadata of one lease: {} bytes",
        info.broker_metadata
    );
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn device_dax_kernel_overhead_matches_the_kernel() {
    if !in_dax_vm(
        "device_dax_kernel_overhead_matches_the_kernel",
        &["--dax-size", "2G", "--ram", "1G"],
    ) {
        return;
    }
    // The region holds a whole aligned GiB: the default is 1G, whose struct pages cost least.
    check("devdax:d:region0", PageSize::Huge1G);
    check("devdax:d:region0:2M", PageSize::Huge2M);

    // `df` shows both figures, as columns and in --json.
    reset_dax_region();
    let mut broker = TestBroker::start(&["--pool", "devdax:d:region0:2M"]);
    broker
        .client()
        .create(CreateLease::new("vm/ram", GIB).persistent(true))
        .unwrap();
    let table = stdout_ok(&broker.run_cli(&["df"]));
    assert!(
        table.contains("KERNEL") && table.contains("BROKER"),
        "{table}"
    );
    assert!(table.contains("4.0 MiB"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout_ok(&broker.run_cli(&["df", "--json"]))).unwrap();
    let overhead = json[0]["kernel_overhead"]
        .as_u64()
        .expect("kernel_overhead");
    assert_eq!(overhead, (4 << 20) + (32 << 10), "{json}");
    assert!(
        json[0]["broker_metadata"]
            .as_u64()
            .expect("broker_metadata")
            > 0
    );

    // Restarted without ALIGN, the broker keeps its leases' 2M rather than the 1G default.
    broker.terminate();
    let state = broker.state_dir();
    let again = TestBroker::start(&[
        "--pool",
        "devdax:d:region0",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(pool(&again).page_size, PageSize::Huge2M, "{}", again.log());
    assert_eq!(pool(&again).leases, 1);
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn hugetlb_pool_warns_when_the_kernel_keeps_its_struct_pages() {
    if !in_dax_vm(
        "hugetlb_pool_warns_when_the_kernel_keeps_its_struct_pages",
        &["--no-dax"],
    ) {
        return;
    }
    const SYSCTL: &str = "/proc/sys/vm/hugetlb_optimize_vmemmap";
    let warning = "set vm.hugetlb_optimize_vmemmap=1";
    std::fs::write(SYSCTL, "0").unwrap();
    let broker = TestBroker::start(&["--pool", "memfd:h:1G:2M"]);
    assert!(broker.log().contains(warning), "{}", broker.log());
    assert_eq!(pool(&broker).kernel_overhead, 16 << 20);
    drop(broker);

    std::fs::write(SYSCTL, "1").unwrap();
    let broker = TestBroker::start(&["--pool", "memfd:h:1G:2M", "--pool", "memfd:s:1G"]);
    assert!(!broker.log().contains(warning), "{}", broker.log());
    let pools = broker.client().df().unwrap();
    assert_eq!(pools[0].kernel_overhead, (2 << 20) + (32 << 10));
    assert_eq!(pools[1].kernel_overhead, 16 << 20, "4K pages share nothing");
}
