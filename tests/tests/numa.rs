//! NUMA placement, page by page, in the two-node VM (`tests/vm/run-in-vm --numa`: half of the
//! RAM and a dax region on each node). One boot runs every case: memfd pools bound to a node
//! (4 KiB shmem and 2 MiB hugetlb, strict), device-dax pools taking their region's node,
//! `create --node`, and the shim following a QEMU-like `mbind`.

use std::process::Command;

use membroker_client::{CreateLease, ErrorCode, PageSize};
use membroker_tests::sys::page_nodes;
use membroker_tests::{
    Helper, TestBroker, bin_path, in_dax_vm, physical_address, stdout_ok, wait_until,
};

#[path = "../shim/support.rs"]
mod support;

const MIB: u64 = 1 << 20;

fn sysfs(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_string()
}

fn hugepages(node: u32, what: &str) -> String {
    format!("/sys/devices/system/node/node{node}/hugepages/hugepages-2048kB/{what}")
}

/// How many of `nodes` are `node`, and the statuses that are not, for a failure message.
fn all_on(nodes: &[i32], node: i32, what: &str) {
    let off: Vec<(usize, i32)> = nodes
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, n)| *n != node)
        .collect();
    assert!(
        off.is_empty(),
        "{what}: {} of {} pages not on node {node} (page, node or -errno): {:?}",
        off.len(),
        nodes.len(),
        &off[..off.len().min(16)]
    );
    println!("{what}: all {} pages on node {node}", nodes.len());
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the two-node VM (tests/vm/run-in-vm --numa); run with --features devdax"
)]
fn numa_placement() {
    // Built (if stale) on the host: the VM runs no cargo.
    support::shim_path();
    if !in_dax_vm("numa_placement", &["--numa", "--dax-size", "128M"]) {
        return;
    }
    assert_eq!(sysfs("/sys/devices/system/node/has_memory"), "0-1");
    for node in [0, 1] {
        std::fs::write(hugepages(node, "nr_hugepages"), "8").expect("reserve huge pages");
        assert_eq!(sysfs(&hugepages(node, "nr_hugepages")), "8", "node {node}");
    }
    let broker = TestBroker::start(&[
        "--pool",
        "memfd:n0:128M:node=0",
        "--pool",
        "memfd:n1:128M:node=1",
        "--pool",
        "memfd:h1:64M:2M:node=1",
        "--pool",
        "devdax:d0:region0",
        "--pool",
        "devdax:d1:region1",
    ]);
    df_shows_nodes(&broker);
    memfd_pages_on_their_node(&broker);
    hugetlb_pages_from_their_node_only(&broker);
    devdax_pools_on_their_region_node(&broker);
    shim_follows_mbind(&broker);
    qemu_host_nodes_bind(&broker);
}

fn df_shows_nodes(broker: &TestBroker) {
    let nodes: Vec<(String, Option<u32>)> = broker
        .client()
        .df()
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.node))
        .collect();
    let want = [("n0", 0), ("n1", 1), ("h1", 1), ("d0", 0), ("d1", 1)]
        .map(|(name, node)| (name.to_string(), Some(node)));
    assert_eq!(nodes, want);
    let table = stdout_ok(&broker.cli().arg("df").output().unwrap());
    assert!(
        table.lines().next().unwrap().contains("  NODE  "),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout_ok(
        &broker.cli().args(["df", "--json"]).output().unwrap(),
    ))
    .unwrap();
    assert_eq!(json[4]["node"], 1, "{json}");
    let err = membroker_tests::stderr_err(
        &broker
            .cli()
            .args(["create", "x", "--size", "2M", "--node", "2"])
            .output()
            .unwrap(),
    );
    assert!(err.contains("no pool on NUMA node 2"), "{err}");
}

fn memfd_pages_on_their_node(broker: &TestBroker) {
    let mut client = broker.client();
    for node in [1, 0] {
        let name = format!("memfd4k-{node}");
        let lease = client
            .create(
                CreateLease::new(&name, 16 * MIB)
                    .node(node)
                    .page_size(PageSize::Base4K),
            )
            .unwrap();
        assert_eq!(lease.info().pool, format!("n{node}"));
        let map = lease.map().unwrap();
        map.touch(4096, 0x5a).unwrap();
        let nodes = page_nodes(map.as_ptr(), map.len() / 4096, 4096).unwrap();
        all_on(&nodes, node as i32, &format!("4K lease on node {node}"));
        // The file's policy keeps pages a holder punched out and touched again on the node,
        // even when the holder runs on the other node's CPU (local allocation would not).
        let mut cpu = rustix::thread::CpuSet::new();
        cpu.set(if node == 1 { 0 } else { 1 });
        rustix::thread::sched_setaffinity(None, &cpu).expect("pin to the other node's CPU");
        let punch = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        rustix::fs::fallocate(&lease, punch, 0, 4 * MIB).expect("punch");
        map.touch(4096, 0x33).unwrap();
        let nodes = page_nodes(map.as_ptr(), map.len() / 4096, 4096).unwrap();
        all_on(
            &nodes,
            node as i32,
            &format!("4K lease on node {node}, punched, touched from the other node"),
        );
    }
    let mut all = rustix::thread::CpuSet::new();
    all.set(0);
    all.set(1);
    rustix::thread::sched_setaffinity(None, &all).expect("unpin");
    // The CLI picks the pool by node.
    let out = stdout_ok(
        &broker
            .cli()
            .args([
                "create",
                "cli-node1",
                "--size",
                "4M",
                "--node",
                "1",
                "--json",
            ])
            .output()
            .unwrap(),
    );
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["pool"], "n1", "{out}");
    // So does exec, for the leases it creates.
    let exec = broker
        .cli()
        .args([
            "exec",
            "--node",
            "1",
            "--persistent",
            "--lease",
            "exec-node1:4M",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    stdout_ok(&exec);
    assert_eq!(broker.client().stat("exec-node1").unwrap().pool, "n1");
}

fn hugetlb_pages_from_their_node_only(broker: &TestBroker) {
    let mut client = broker.client();
    let free = |node| sysfs(&hugepages(node, "free_hugepages"));
    assert_eq!((free(0), free(1)), ("8".into(), "8".into()));
    let lease = client
        .create(CreateLease::new("huge-1", 12 * MIB).pool("h1").node(1))
        .unwrap();
    assert_eq!(
        (free(0), free(1)),
        ("8".into(), "2".into()),
        "6 huge pages from node 1, none from node 0"
    );
    let map = lease.map().unwrap();
    map.touch(2 << 20, 0xa5).unwrap();
    let nodes = page_nodes(map.as_ptr(), map.len() >> 21, 2 << 20).unwrap();
    all_on(&nodes, 1, "2M hugetlb lease on node 1");
    // Strict: node 1 has 2 huge pages left and node 0 has 8; 8 MiB must fail, not spill.
    let err = client
        .create(
            CreateLease::new("huge-2", 8 * MIB)
                .node(1)
                .page_size(PageSize::Huge2M),
        )
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::OutOfMemory), "{err}");
    assert!(err.to_string().contains("NUMA node 1"), "{err}");
    assert_eq!(
        (free(0), free(1)),
        ("8".into(), "2".into()),
        "nothing spilled"
    );
    println!("2M: a lease larger than node 1's free huge pages fails: {err}");
}

fn devdax_pools_on_their_region_node(broker: &TestBroker) {
    let mut client = broker.client();
    for node in [0u32, 1] {
        let lease = client
            .create(
                CreateLease::new(format!("dax-{node}"), 32 * MIB)
                    .pool(format!("d{node}"))
                    .node(node),
            )
            .unwrap();
        let info = lease.info().clone();
        assert_eq!(info.pool, format!("d{node}"));
        let device = info.device.clone().expect("a device lease");
        assert_eq!(
            sysfs(&format!("/sys/bus/dax/devices/{device}/target_node")),
            node.to_string()
        );
        // Every page's physical address is in the lease's extents, which lie in region
        // `node` (the SRAT puts each region's range on its node).
        let region_start = if node == 0 {
            4u64 << 30
        } else {
            (4u64 << 30) + (128 + 512) * MIB
        };
        let region = region_start..region_start + 128 * MIB;
        let map = lease.map().unwrap();
        map.touch(2 << 20, 1).unwrap();
        for i in 0..map.len() >> 21 {
            let phys = physical_address(map.as_ptr() as usize + (i << 21));
            assert!(
                info.extents
                    .iter()
                    .any(|e| (e.start..e.start + e.len).contains(&phys))
                    && region.contains(&phys),
                "page {i} of {device} at {phys:#x}, outside region{node} {region:x?}"
            );
        }
        println!("devdax lease {device}: every page in region{node}, target_node {node}");
    }
}

/// The shim under a QEMU-like `mbind`: guest RAM mapped the way QEMU maps it, then bound to
/// node 1 (`host-nodes=1,policy=bind`), lands on a lease of a node-1 pool before it is touched.
fn shim_follows_mbind(broker: &TestBroker) {
    let mut cmd = Command::new(bin_path("mb-shim-helper"));
    cmd.env("LD_PRELOAD", support::shim_path())
        .env("MEMBROKER_SOCKET", broker.socket())
        .env("MEMBROKER_LEASE_PREFIX", "numa/vm")
        .env("MEMBROKER_MIN_SIZE", "16M")
        .stderr(std::process::Stdio::piped());
    let mut helper = Helper::spawn(cmd);
    assert!(helper.line().starts_with("ready"));
    let mut block = |n: usize| {
        let reply = helper.send("alloc 16M");
        assert_eq!(
            reply.split_whitespace().nth(1),
            Some(n.to_string().as_str()),
            "{reply}"
        );
    };
    block(0);
    block(1);
    block(2);
    block(3);
    let mut client = broker.client();
    let pool = |client: &mut membroker_client::Client, i: usize| {
        client.stat(&format!("numa/vm/ram{i}")).unwrap().pool
    };
    assert_eq!(pool(&mut client, 0), "n0", "the default pool first");
    // bind to node 1: a lease of the node-1 pool, under the same name, every page on node 1.
    assert_eq!(helper.send("mbind 0 bind 1"), "ok 0 0");
    assert_eq!(pool(&mut client, 0), "n1");
    assert_eq!(helper.send("nodes 0"), "ok 1:4096");
    let maps = helper.send("numa_maps 0");
    assert!(
        maps.contains("file=/memfd:membroker:numa/vm/ram0") && maps.contains("N1=4096"),
        "{maps}"
    );
    println!("shim, bind 1: {maps}");
    // bind to the node it is on already, and the default policy: nothing changes.
    assert_eq!(helper.send("mbind 1 bind 0"), "ok 0 0");
    assert_eq!(helper.send("mbind 1 default"), "ok 0 0");
    assert_eq!(pool(&mut client, 1), "n0");
    assert_eq!(helper.send("nodes 1"), "ok 0:4096");
    // preferred: the node's pool when there is one.
    assert_eq!(helper.send("mbind 2 preferred 1"), "ok 0 0");
    assert_eq!(pool(&mut client, 2), "n1");
    assert_eq!(helper.send("nodes 2"), "ok 1:4096");
    // interleave over two nodes cannot be one lease: a clear refusal.
    assert_eq!(
        helper.send("mbind 3 interleave 0,1"),
        format!("ok -1 {}", libc::EINVAL)
    );
    assert_eq!(pool(&mut client, 3), "n0");
    // bind to a node no pool is on: refused, and the block keeps its lease.
    assert_eq!(
        helper.send("mbind 3 bind 2"),
        format!("ok -1 {}", libc::EINVAL)
    );
    assert_eq!(pool(&mut client, 3), "n0");
    let mut stderr = String::new();
    let mut pipe = helper.child.stderr.take().expect("stderr piped");
    drop(helper);
    std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
    assert!(stderr.contains("interleave"), "{stderr}");
    assert!(
        stderr.contains("no pool of the broker is on NUMA node 2 with 4K pages"),
        "{stderr}"
    );
    println!("shim, refusals: {}", stderr.trim());
}

/// Real QEMU under the shim, as libvirt's `<memnode cellid='0' mode='strict' nodeset='1'/>`
/// runs it: a memory backend bound to host node 1. Stopped before its first instruction (`-S`):
/// by then its guest RAM is a lease of the node-1 pool, every page on node 1.
fn qemu_host_nodes_bind(broker: &TestBroker) {
    let mut qemu = stopped_qemu(broker, "numa/qemu", "host-nodes=1,policy=bind");
    let mut client = broker.client();
    wait_until(
        std::time::Duration::from_secs(120),
        "QEMU's guest RAM on a lease of the node-1 pool",
        || {
            client
                .stat("numa/qemu/ram0")
                .is_ok_and(|l| l.pool == "n1" && !l.holders.is_empty())
        },
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", qemu.pid())).unwrap();
    let ram: Vec<&str> = maps
        .lines()
        .filter(|l| l.contains("/memfd:membroker:numa/qemu/ram0"))
        .collect();
    assert_eq!(ram.len(), 1, "QEMU maps the lease once: {maps}");
    let lease = client.open("numa/qemu/ram0", false).unwrap();
    let map = lease.map().unwrap();
    for page in (0..map.len()).step_by(4096) {
        map.load(page).unwrap();
    }
    let nodes = page_nodes(map.as_ptr(), map.len() / 4096, 4096).unwrap();
    all_on(&nodes, 1, "QEMU host-nodes=1,policy=bind");
    qemu.kill();
    let stderr = qemu.stderr.lock().unwrap().clone();
    assert!(!stderr.contains("membroker-preload"), "{stderr}");
    // Interleaving over both nodes cannot be one lease: QEMU stops, saying why.
    let qemu = stopped_qemu(broker, "numa/qemu2", "host-nodes=0-1,policy=interleave");
    let (ok, stderr) = qemu.wait_exit(std::time::Duration::from_secs(120));
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("policy interleave over nodes [0, 1] cannot be followed")
            && stderr.contains("cannot bind memory to host NUMA nodes"),
        "{stderr}"
    );
    println!("QEMU, interleave: {}", stderr.trim());
}

/// QEMU under the shim with one 64 MiB memory backend of these NUMA options, stopped before
/// its first instruction.
fn stopped_qemu(broker: &TestBroker, prefix: &str, numa: &str) -> support::Qemu {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-S", "-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-machine", "pc", "-accel", "tcg", "-m", "64M"])
        .arg("-object")
        .arg(format!("memory-backend-ram,id=m0,size=64M,{numa}"))
        .args(["-numa", "node,nodeid=0,memdev=m0"])
        .env("LD_PRELOAD", support::shim_path())
        .env("MEMBROKER_SOCKET", broker.socket())
        .env("MEMBROKER_LEASE_PREFIX", prefix);
    support::Qemu::spawn(cmd)
}
